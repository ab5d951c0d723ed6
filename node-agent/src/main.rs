//! `sinew-agent`: the node agent binary. Parses flags, joins its cgroup, loads the programs,
//! re-adopts pods and serves the local API.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use sinew_control_client::ControlSettings;
use sinew_node_agent::{
    admin, api,
    bpf::{self, Capture},
    certs::{CertSource, Certs},
    cgroup, config,
    pods::{self, Registry, Settings},
    proxy::Ctx,
    telemetry::AccessLog,
};
use sinew_workers::{Pinning, Workers};
use tracing::{info, warn};

#[derive(Parser)]
#[command(name = "sinew-agent", version, about = "Sinew node agent")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent.
    Run(Box<RunArgs>),
    /// Remove everything Sinew attached on this host (stop the agent first).
    Cleanup(Common),
}

#[derive(Args)]
struct Common {
    /// The local API socket.
    #[arg(long, default_value = sinew_local_api::DEFAULT_SOCKET)]
    api_socket: PathBuf,
    /// Where maps and per-pod links are pinned.
    #[arg(long, default_value = "/sys/fs/bpf/sinew")]
    bpffs_dir: PathBuf,
    /// Where the agent keeps its pod list.
    #[arg(long, default_value = "/var/lib/sinew")]
    state_dir: PathBuf,
    /// The agent's own cgroup, relative to the cgroup v2 mount.
    #[arg(long, default_value = "sinew-agent")]
    cgroup: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// Directory of resource YAML, read directly when no control service is given
    /// (capture-only mode: no certificates, so no mutual TLS between agents).
    #[arg(long, default_value = "/etc/sinew")]
    config_dir: PathBuf,
    /// The control service (`https://host:15012`): certificates and configuration.
    #[arg(long)]
    control: Option<String>,
    /// PEM roots that sign the control service's certificate (its CA's `ca-cert.pem`).
    #[arg(long)]
    control_ca: Option<PathBuf>,
    /// File holding this node's bootstrap token for the control service.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// This node's name, as workloads' `spec.node` names it.
    #[arg(long)]
    node: Option<String>,
    /// Trust domain of workload identities.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Admin endpoint: /metrics, /config_dump, /certs, /explain.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: std::net::SocketAddr,
    /// Access log: a file, `-` for standard output, `off` for none. One JSON line per
    /// connection.
    #[arg(long, default_value = "-")]
    access_log: String,
    /// The compiled capture programs; by default `sinew.bpf.o` next to the binary or in
    /// `../ebpf/` from it (where `cargo xtask build-ebpf` puts it).
    #[arg(long)]
    ebpf_object: Option<PathBuf>,
    /// Data path worker threads, 1 to 4 [default: half the CPUs, at least 1, at most 2]. The agent
    /// shares its node with the workloads whose bytes it carries: on 2 cores one worker
    /// served 25 % more HTTP requests/s through the mesh than two (`cargo xtask bench l4`).
    #[arg(long)]
    workers: Option<usize>,
    /// Pin workers to CPUs: `auto` pins each to its own when there is one per CPU the agent
    /// may use (never with one worker); `off` never does.
    #[arg(long, default_value_t = Pinning::Auto)]
    pin_workers: Pinning,
    /// A source address whose plaintext reaches pods without mTLS or policy (repeatable):
    /// the address the node's CNI rewrites kubelet's health probes to, so that they pass
    /// under STRICT (istio-cni uses 169.254.7.127 and fd16:9254:7127:1337:ffff:ffff:ffff:ffff,
    /// for connections opened on the node only). Never the node's own address: forwarded
    /// traffic (a NodePort) can arrive from it.
    #[arg(long = "trust-plaintext-from", value_name = "IP")]
    trust_plaintext_from: Vec<std::net::IpAddr>,
    /// On SIGTERM, how long open connections may go on before the agent exits; new ones are
    /// refused from the signal on (pods fail closed until an agent is back).
    #[arg(long, default_value = "20s", value_parser = sinew_model::Duration::parse)]
    drain_timeout: sinew_model::Duration,
}

fn main() -> Result<()> {
    sinew_telemetry::init_logging();
    match Cli::parse().cmd {
        Cmd::Run(args) => run(*args),
        Cmd::Cleanup(args) => cleanup(&args),
    }
}

fn own_cgroup(common: &Common) -> Result<(PathBuf, PathBuf)> {
    let root = cgroup::v2_mount()?;
    let rel = common.cgroup.strip_prefix("/").unwrap_or(&common.cgroup);
    if rel.components().any(|c| !matches!(c, std::path::Component::Normal(_)))
        || rel.as_os_str().is_empty()
    {
        bail!(
            "--cgroup {}: must be a relative path below the cgroup v2 mount",
            common.cgroup.display()
        );
    }
    Ok((root.clone(), root.join(rel)))
}

fn find_object(explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("--ebpf-object {}: no such file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating the agent binary")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidates = [dir.join("sinew.bpf.o"), dir.join("../ebpf/sinew.bpf.o")];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no eBPF object at {} or {}: build it with `cargo xtask build-ebpf` or pass --ebpf-object",
                candidates[0].display(),
                candidates[1].display()
            )
        })
}

fn run(args: RunArgs) -> Result<()> {
    let (cgroup_root, own) = own_cgroup(&args.common)?;
    let object = find_object(args.ebpf_object.clone())?;
    let worker_count = args.workers.unwrap_or_else(default_workers);
    let max = sinew_ebpf_common::WORKER_SLOTS as usize;
    if !(1..=max).contains(&worker_count) {
        bail!(
            "--workers {worker_count}: must be 1 to {max} (inbound capture spreads over {max} slots)"
        );
    }
    // Each proxied connection holds two sockets and two pipes: use all descriptors allowed.
    raise_nofile();
    // Before any thread exists, so the whole process moves.
    cgroup::join(&own).with_context(|| format!("joining the agent cgroup {}", own.display()))?;
    let capture = Capture::load(&object, &args.common.bpffs_dir, &own)?;
    let settings = Settings {
        bpffs_dir: args.common.bpffs_dir.clone(),
        state_dir: args.common.state_dir.clone(),
        cgroup_root,
        agent_cgroup: own.canonicalize().unwrap_or_else(|_| own.clone()),
    };
    if !sinew_model::is_dns_subdomain(&args.trust_domain) {
        bail!("--trust-domain {:?}: not a DNS name", args.trust_domain);
    }
    for ip in &args.trust_plaintext_from {
        // No connection comes from these: a value that trusts nothing is a mistake.
        let canonical = ip.to_canonical();
        if canonical.is_unspecified() || canonical.is_multicast() {
            bail!("--trust-plaintext-from {ip}: not an address a connection can come from");
        }
    }
    let access = AccessLog::open(&args.access_log)
        .with_context(|| format!("--access-log {}", args.access_log))?;
    let control = control_settings(&args)?;
    // Control, the local API, admin and enrollment run on this thread (enrollment on its
    // blocking pool, so `setns` churn stays off the data path); connections run on the
    // workers, each served start to end by the worker that accepted it.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let workers = Workers::start(worker_count, "sinew-worker", args.pin_workers)?;
    let handles = workers.handles().to_vec();
    runtime.block_on(async move {
        let (mesh, certs, _config_task, known) = match control {
            Some(c) => {
                let node_id = sinew_identity::SpiffeId::node(&args.trust_domain, &c.node)
                    .with_context(|| format!("--node {:?}", c.node))?;
                // The node's certificate follows the trust bundle too, once the stream carries it.
                let (node_bundle, node_bundle_rx) = tokio::sync::watch::channel(None);
                let credentials = c.node_credentials(&node_id, node_bundle_rx).await;
                let (mesh, task, mut known, bundle) = config::from_control(sinew_control_client::ClientConfig {
                    endpoint: c.endpoint.clone(),
                    name: c.node.clone(),
                    role: "agent".into(),
                    cache_dir: c.cache_dir.clone(),
                    credentials: credentials.clone(),
                });
                sinew_control_client::forward_bundle(bundle.clone(), node_bundle);
                // Without a cache, wait (bounded) for control's first answer, so pods
                // enrolled right after start are judged against real configuration.
                let view_known =
                    tokio::time::timeout(FIRST_CONFIG_WAIT, known.wait_for(|k| *k)).await.is_ok();
                if !view_known {
                    warn!("no configuration from control yet; starting without it");
                }
                let source = CertSource {
                    endpoint: c.endpoint,
                    credentials,
                    cache_dir: c.cache_dir,
                    bundle,
                };
                (mesh, Certs::new(Some(source), tokio::runtime::Handle::current()), task, known)
            }
            None => {
                let (mesh, task) = config::from_dir(args.config_dir.clone());
                // Read before this returns: configuration from the start (and for good, so
                // the sender can go).
                let (_, known) = tokio::sync::watch::channel(true);
                (mesh, Certs::new(None, tokio::runtime::Handle::current()), task, known)
            }
        };
        let mut ctx =
            Ctx::new(args.trust_domain.clone(), mesh, Arc::new(certs), access, handles.len());
        ctx.trusted_plaintext =
            args.trust_plaintext_from.iter().map(|ip| ip.to_canonical()).collect();
        let ctx = Arc::new(ctx);
        let registry = Arc::new(Registry::new(settings, capture, ctx, handles, known.clone()));
        let restored = {
            let r = registry.clone();
            let view_known = *known.borrow();
            tokio::task::spawn_blocking(move || r.restore(view_known)).await??
        };
        // Loading the programs parsed the kernel's BTF (megabytes, freed since): hand the
        // freed heap back so the idle agent stays small.
        trim_heap();
        let socket = &args.common.api_socket;
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // A stale socket from a killed agent would make bind fail; but never remove what is
        // not a socket (a mistyped path), nor the socket of an agent still answering.
        prepare_socket_path(socket)?;
        let listener = tokio::net::UnixListener::bind(socket)
            .with_context(|| format!("binding the local API at {}", socket.display()))?;
        std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .with_context(|| format!("restricting {} to root", socket.display()))?;
        let admin_listener = tokio::net::TcpListener::bind(args.admin)
            .await
            .with_context(|| format!("--admin {}", args.admin))?;
        info!(api = %socket.display(), admin = %args.admin, object = %object.display(), restored, workers = worker_count, cpus = ?workers.cpus(), mode = if registry.ctx().certs.enabled() { "mesh" } else { "capture-only" }, "sinew-agent ready");
        let server = tokio::spawn(api::serve(listener, registry.clone()));
        let admin = tokio::spawn(admin::serve(admin_listener, registry.clone()));
        let access = registry.ctx().access.clone();
        let reconciler = tokio::spawn(reconcile_loop(registry.clone(), known));
        shutdown_signal().await;
        server.abort();
        // Drain, as ztunnel does on SIGTERM: no new connections, the open ones finish for up
        // to --drain-timeout (a second signal ends it at once). The reconciler goes on, so a
        // policy change still closes what it no longer admits; its captures are refused.
        let limit = args.drain_timeout.0;
        info!(open = registry.ctx().stats.open(), ?limit, "draining");
        let cut = tokio::select! {
            cut = registry.drain(limit) => cut,
            () = shutdown_signal() => registry.ctx().stats.open(),
        };
        if cut > 0 {
            // Reset, not closed (a close could pass for a whole answer), and logged.
            warn!(cut, "connections still open at the end of the drain: reset");
            registry.ctx().stop.notify_waiters();
            let logged = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
            while registry.ctx().stats.open() > 0 && tokio::time::Instant::now() < logged {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        reconciler.abort();
        admin.abort();
        // The last connections' lines, before the process goes.
        access.flush(std::time::Duration::from_secs(1));
        // Pins stay: enrolled pods keep failing closed until the agent is back.
        info!("sinew-agent stopping; pinned capture stays in place");
        Ok(())
    })
}

/// Half the CPUs this process may use, at least 1 and at most 2 (as ztunnel's default).
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).clamp(1, 2))
}

/// Applies every new mesh view: namespace enrollment changes, then a re-check of live
/// inbound connections against the policies now in force.
/// Pins of pods out of the mesh are released only once the view is configuration
/// (`known`): an agent that has heard nothing from control knows no namespace in the mesh.
async fn reconcile_loop(registry: Arc<Registry>, mut known: tokio::sync::watch::Receiver<bool>) {
    let mut mesh = registry.ctx().mesh.clone();
    // Pods that should be captured but are not (a re-adoption or capture that failed: a
    // port taken in the pod, no descriptors) are tried again this often, not only when the
    // configuration next changes.
    let mut retry = tokio::time::interval(CAPTURE_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    retry.tick().await;
    loop {
        tokio::select! {
            changed = mesh.changed() => if changed.is_err() { return },
            // Configuration just became known: apply it in full.
            Ok(()) = known.changed() => {}
            _ = retry.tick() => {
                let r = registry.clone();
                let _ = tokio::task::spawn_blocking(move || r.reconcile(false)).await;
                continue;
            }
        }
        let view = mesh.borrow_and_update().clone();
        let releases = *known.borrow_and_update();
        let r = registry.clone();
        let _ = tokio::task::spawn_blocking(move || r.reconcile(releases)).await;
        let closed = registry.ctx().live.recheck(&view);
        if closed > 0 {
            info!(closed, "policy change: closed live connections it no longer admits");
        }
    }
}

/// How often captures that failed are tried again.
const CAPTURE_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a starting agent without a configuration cache waits for control's first answer.
const FIRST_CONFIG_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn control_settings(args: &RunArgs) -> Result<Option<ControlSettings>> {
    let Some(endpoint) = args.control.clone() else {
        if args.control_ca.is_some() || args.token_file.is_some() {
            bail!("--control-ca and --token-file need --control");
        }
        return Ok(None);
    };
    let node = match &args.node {
        Some(n) => n.clone(),
        None => nix::unistd::gethostname()
            .context("--node not given and the host name is unreadable")?
            .to_string_lossy()
            .into_owned(),
    };
    Ok(Some(ControlSettings::load(
        endpoint,
        args.control_ca.as_deref(),
        args.token_file.as_deref(),
        node,
        args.common.state_dir.join("control"),
    )?))
}

fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory at the top of glibc's heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn cleanup(common: &Common) -> Result<()> {
    if std::os::unix::net::UnixStream::connect(&common.api_socket).is_ok() {
        bail!(
            "an agent is answering at {}: stop it first (cleanup with a live agent would leave its pods uncaptured)",
            common.api_socket.display()
        );
    }
    let removed = bpf::remove_all(&common.bpffs_dir)?;
    println!(
        "{} {}",
        if removed { "removed" } else { "nothing pinned at" },
        common.bpffs_dir.display()
    );
    let state = pods::state_file(&common.state_dir);
    if std::fs::remove_file(&state).is_ok() {
        println!("removed {}", state.display());
    }
    let _ = std::fs::remove_file(&common.api_socket);
    if let Ok((_, own)) = own_cgroup(common)
        && std::fs::remove_dir(&own).is_ok()
    {
        println!("removed cgroup {}", own.display());
    }
    Ok(())
}

/// Clears the way for the local API socket at `path`: a stale socket goes; a path that is
/// not a socket, or a socket another agent still answers on, is refused with the reason.
fn prepare_socket_path(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    if !meta.file_type().is_socket() {
        bail!(
            "--api-socket {}: exists and is not a socket; refusing to replace it",
            path.display()
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!(
            "--api-socket {}: another sinew-agent answers there (one agent per node)",
            path.display()
        ),
        // Nobody listens: a killed agent's socket.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        Err(e) => bail!("--api-socket {}: cannot tell whether it is in use: {e}", path.display()),
    }
    std::fs::remove_file(path).with_context(|| format!("removing the stale {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_socket_path_replaces_only_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        // A mistyped path onto a file: refused, the file kept.
        let file = dir.path().join("pods.json");
        std::fs::write(&file, "{}").unwrap();
        let err = prepare_socket_path(&file).unwrap_err().to_string();
        assert!(err.contains("is not a socket"), "{err}");
        assert!(file.exists());
        // A socket an agent answers on: refused.
        let live = dir.path().join("live.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
        let err = prepare_socket_path(&live).unwrap_err().to_string();
        assert!(err.contains("another sinew-agent answers there"), "{err}");
        // A stale one (its agent gone): removed. Nothing there: fine.
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        prepare_socket_path(&stale).unwrap();
        assert!(!stale.exists());
        prepare_socket_path(&dir.path().join("none.sock")).unwrap();
    }
}
