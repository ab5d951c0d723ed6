//! `sinew-agent`: the node agent binary. Parses flags, joins its cgroup, loads the programs,
//! re-adopts pods and serves the local API.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use sinew_node_agent::{
    api,
    bpf::{self, Capture},
    cgroup,
    pods::{self, Registry, Settings},
    proxy::Stats,
};
use tracing::info;

#[derive(Parser)]
#[command(name = "sinew-agent", version, about = "Sinew node agent")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent.
    Run(RunArgs),
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
    /// Directory of resource YAML (Namespace enrollment labels).
    #[arg(long, default_value = "/etc/sinew")]
    config_dir: PathBuf,
    /// The compiled capture programs; by default `sinew.bpf.o` next to the binary or in
    /// `../ebpf/` from it (where `cargo xtask build-ebpf` puts it).
    #[arg(long)]
    ebpf_object: Option<PathBuf>,
    /// Data path worker threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

fn main() -> Result<()> {
    sinew_telemetry::init_logging();
    match Cli::parse().cmd {
        Cmd::Run(args) => run(args),
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
    let object = find_object(args.ebpf_object)?;
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    // Each proxied connection holds two sockets and two pipes: use all descriptors allowed.
    raise_nofile();
    // Before any thread exists, so the whole process moves.
    cgroup::join(&own).with_context(|| format!("joining the agent cgroup {}", own.display()))?;
    let capture = Capture::load(&object, &args.common.bpffs_dir, &own)?;
    let settings = Settings {
        bpffs_dir: args.common.bpffs_dir.clone(),
        state_dir: args.common.state_dir.clone(),
        config_dir: args.config_dir,
        cgroup_root,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers)
        .enable_all()
        .thread_name("sinew-worker")
        .build()?;
    runtime.block_on(async move {
        let registry = Arc::new(Registry::new(settings, capture, Arc::new(Stats::default())));
        let restored = {
            let r = registry.clone();
            tokio::task::spawn_blocking(move || r.restore()).await??
        };
        let socket = &args.common.api_socket;
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // A stale socket from a killed agent would make bind fail.
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket)
            .with_context(|| format!("binding the local API at {}", socket.display()))?;
        std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        info!(api = %socket.display(), object = %object.display(), restored, "sinew-agent ready");
        let server = tokio::spawn(api::serve(listener, registry.clone()));
        let reconciler = tokio::spawn(reconcile_loop(registry));
        shutdown_signal().await;
        server.abort();
        reconciler.abort();
        // Pins stay: enrolled pods keep failing closed until the agent is back.
        info!("sinew-agent stopping; pinned capture stays in place");
        Ok(())
    })
}

/// Picks up namespace label changes from the config directory.
async fn reconcile_loop(registry: Arc<Registry>) {
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let r = registry.clone();
        let _ = tokio::task::spawn_blocking(move || r.reconcile()).await;
    }
}

/// How often the config directory is re-read for namespace enrollment changes.
const RECONCILE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

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
