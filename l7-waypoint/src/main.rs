//! `sinew-waypoint`: flags, identity and configuration from the control service, the HBONE
//! listener, and the admin endpoint.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Parser;
use http::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sinew_control_client::{
    CertConfig, ClientConfig, ControlSettings, start_certificate_following, start_config,
};
use sinew_hbone::Inbound;
use sinew_identity::SpiffeId;
use sinew_l7_waypoint::{
    proxy::{self, Downstream},
    state::{Setup, Snapshot, Waypoint},
    telemetry::AccessLog,
};
use sinew_workers::{Pinning, Workers};
use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, info, warn};

/// Largest request head accepted: Envoy's default (`max_request_headers_kb` 60), so
/// requests with large cookies that Istio serves are served here too (431 beyond).
const MAX_HEADER_BYTES: usize = 60 << 10;

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A client connection that moves no byte either way for this long is closed (Envoy's
/// default connection idle timeout, 1 h).
const CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Parser)]
#[command(name = "sinew-waypoint", version, about = "Sinew L7 waypoint")]
struct Args {
    /// The waypoint's name: services and namespaces labelled `sinew.io/use-waypoint=<name>`
    /// send it their traffic; it is also its Workload's name.
    #[arg(long)]
    name: String,
    /// Its namespace.
    #[arg(long)]
    namespace: String,
    /// Its service account (its identity).
    #[arg(long, default_value = "waypoint")]
    service_account: String,
    /// The node it runs on.
    #[arg(long, required_unless_present = "plain_http")]
    node: Option<String>,
    /// The control service (`https://host:15012`).
    #[arg(long, required_unless_present = "plain_http")]
    control: Option<String>,
    /// Benchmark mode: serve plain HTTP here and proxy every request to `--plain-upstream`
    /// through the same HTTP engine (routing, filters, balancing, metrics), without the mesh.
    #[arg(long, requires = "plain_upstream")]
    plain_http: Option<SocketAddr>,
    /// The upstream of `--plain-http` (`<ip>:<port>`, not loopback).
    #[arg(long)]
    plain_upstream: Option<SocketAddr>,
    /// PEM roots of the control service's certificate.
    #[arg(long)]
    control_ca: Option<PathBuf>,
    /// The node's bootstrap token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// HBONE listener.
    #[arg(long, default_value = "[::]:15008")]
    listen: SocketAddr,
    /// Admin endpoint: /metrics, /ready.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Where configuration and the certificate are cached.
    #[arg(long, default_value = "/var/lib/sinew-waypoint")]
    state_dir: PathBuf,
    /// Access log: a file, `-` for standard output, `off`.
    #[arg(long, default_value = "-")]
    access_log: String,
    /// OpenTelemetry collector (`http://host:4318`): one span per request, OTLP/HTTP JSON.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Worker threads, each serving its connections start to end (thread per core), 1 to
    /// 1024.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: u16,
    /// Pin workers to CPUs: `auto` pins each to its own when there is one per CPU the
    /// process may use; `off` never does.
    #[arg(long, default_value_t = Pinning::Auto)]
    pin_workers: Pinning,
    /// How long a request's stream may move nothing either way before it ends: a 408 before
    /// its response has started, a reset after (Envoy's `stream_idle_timeout`, whose 5-minute
    /// default this is); `0s` turns it off.
    #[arg(long, default_value = "5m", value_parser = sinew_model::Duration::parse)]
    stream_idle_timeout: sinew_model::Duration,
    /// On SIGTERM, how long the requests in hand may go on before the waypoint exits; its
    /// connections are told to go at once and new ones are closed.
    #[arg(long, default_value = "20s", value_parser = sinew_model::Duration::parse)]
    drain_timeout: sinew_model::Duration,
}

fn main() -> Result<()> {
    sinew_telemetry::init_logging();
    let args = Args::parse();
    let id = SpiffeId::new(&args.trust_domain, &args.namespace, &args.service_account)
        .with_context(|| {
            format!("--namespace {} --service-account {}", args.namespace, args.service_account)
        })?;
    let access = AccessLog::open(&args.access_log)
        .with_context(|| format!("--access-log {}", args.access_log))?;
    if let Some(e) = &args.otlp_endpoint
        && !e.starts_with("http://")
    {
        bail!("--otlp-endpoint {e:?}: expected http://<host>:<port>");
    }
    // The control plane (configuration, certificates, admin) runs on this thread; requests
    // run on the workers, one connection per worker from accept to close.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let workers = Workers::start(usize::from(args.workers), "sinew-waypoint", args.pin_workers)?;
    info!(workers = args.workers, cpus = ?workers.cpus(), "workers started");
    if let (Some(listen), Some(upstream)) = (args.plain_http, args.plain_upstream) {
        let stream_idle = stream_idle(&args);
        return runtime.block_on(run_plain(listen, upstream, id, access, &workers, stream_idle));
    }
    let (Some(endpoint), Some(node)) = (args.control.clone(), args.node.clone()) else {
        bail!("--control and --node are required");
    };
    let control = ControlSettings::load(
        endpoint,
        args.control_ca.as_deref(),
        args.token_file.as_deref(),
        node,
        args.state_dir.join("control"),
    )?;
    runtime.block_on(run(args, id, access, control, &workers))
}

/// Binds `listen` once per worker (an `SO_REUSEPORT` group; an address in use by anyone else
/// is an error) and serves the accepted connections with `serve`, spread evenly over the
/// workers ([`sinew_workers::serve_balanced`]).
fn listen_on_workers<F, Fut>(
    workers: &Workers,
    listen: SocketAddr,
    what: &str,
    serve: F,
) -> Result<()>
where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let group = sinew_workers::reuseport_group(listen, workers.len())
        .with_context(|| format!("{what} {listen}"))?;
    sinew_workers::serve_balanced(workers, group, serve);
    Ok(())
}

/// Until SIGTERM or Ctrl-C.
async fn until_stopped() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

/// `--stream-idle-timeout`, `None` when off.
fn stream_idle(args: &Args) -> Option<Duration> {
    Some(args.stream_idle_timeout.0).filter(|d| !d.is_zero())
}

/// `--plain-http`: the HTTP engine alone, for benchmarks against other proxies.
async fn run_plain(
    listen: SocketAddr,
    upstream: SocketAddr,
    id: SpiffeId,
    access: AccessLog,
    workers: &Workers,
    stream_idle: Option<Duration>,
) -> Result<()> {
    let yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: bench}}\n---\n\
         apiVersion: sinew.io/v1alpha1\nkind: Workload\nmetadata: {{name: upstream, namespace: bench, labels: {{app: upstream}}}}\n\
         spec: {{node: bench, ips: [\"{ip}\"]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: bench, namespace: bench}}\n\
         spec: {{clusterIPs: [\"198.18.254.254\"], ports: [{{port: 80, targetPort: {port}}}], selector: {{app: upstream}}}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: bench, namespace: bench}}\n\
         spec: {{parentRefs: [{{kind: Service, name: bench}}], rules: [{{matches: [{{path: {{type: PathPrefix, value: /}}}}], backendRefs: [{{name: bench, port: 80}}]}}]}}\n",
        ip = upstream.ip(),
        port = upstream.port()
    );
    let parsed = sinew_model::parse_file(std::path::Path::new("--plain-upstream"), &yaml)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut resources = Vec::new();
    for r in parsed {
        match r {
            Ok(r) => resources.push(r),
            Err(rej) => bail!("--plain-upstream {upstream}: {:?}", rej.errors),
        }
    }
    let snapshot = Arc::new(Snapshot::build(resources.iter()));
    let service = snapshot.mesh.service("bench", "bench").cloned().context("bench service")?;
    let (_snap_tx, snapshots) = watch::channel(snapshot);
    let (_svid_tx, svid) = watch::channel(None);
    let setup = Setup {
        name: "bench".into(),
        id: id.clone(),
        access,
        otlp: None,
        plain: true,
        workers: workers.len(),
        stream_idle,
    };
    let wp = Waypoint::new(setup, snapshots, svid);
    let id = Arc::new(id);
    listen_on_workers(workers, listen, "--plain-http", move |tcp, peer| {
        let down = Arc::new(Downstream::new(&wp, service.clone(), 80, id.clone(), peer));
        let wp = wp.clone();
        async move {
            let service =
                hyper::service::service_fn(move |req| proxy::handle(wp.clone(), down.clone(), req));
            let _ = http_server().serve_connection(TokioIo::new(tcp), service).await;
        }
    })?;
    info!(%listen, %upstream, workers = workers.len(), "sinew-waypoint serving plain HTTP (benchmark mode)");
    until_stopped().await
}

async fn run(
    args: Args,
    id: SpiffeId,
    access: AccessLog,
    control: ControlSettings,
    workers: &Workers,
) -> Result<()> {
    let node_id = SpiffeId::node(&args.trust_domain, &control.node)?;
    // The node's certificate follows the trust bundle too, once the stream carries it.
    let (node_bundle, node_bundle_rx) = watch::channel(None);
    let credentials = control.node_credentials(&node_id, node_bundle_rx).await;
    let (mut views, _config_task) = start_config(ClientConfig {
        endpoint: control.endpoint.clone(),
        name: format!("{}.{}", args.name, args.namespace),
        role: "waypoint".into(),
        cache_dir: control.cache_dir.clone(),
        credentials: credentials.clone(),
    });
    // Renewed at half life, and at once when control publishes a new trust bundle.
    let bundle = sinew_control_client::bundle_updates(views.clone(), |v| v.trust_bundle.clone());
    sinew_control_client::forward_bundle(bundle.clone(), node_bundle);
    let (svid, _cert_task) = start_certificate_following(
        CertConfig {
            endpoint: control.endpoint.clone(),
            credentials,
            identity: id.clone(),
            ttl: None,
            cache_dir: control.cache_dir.clone(),
        },
        bundle,
        sinew_control_client::BUNDLE_RENEWAL_SPREAD,
    );
    let build = |v: &sinew_control_client::ConfigView| {
        let mut s = Snapshot::build(v.resources.values().map(|h| &*h.resource));
        // As the agent judges it: a sync completed, or a cache that held something.
        s.synced = v.synced && (v.acks > 0 || !v.resources.is_empty());
        Arc::new(s)
    };
    let first = views.borrow_and_update().clone();
    let (tx, snapshots) = watch::channel(build(&first));
    tokio::spawn(async move {
        while views.changed().await.is_ok() {
            let view = views.borrow_and_update().clone();
            tx.send_replace(build(&view));
        }
    });
    let otlp = args.otlp_endpoint.clone().map(sinew_l7_waypoint::otlp::Exporter::start);
    let setup = Setup {
        name: args.name.clone(),
        id: id.clone(),
        access,
        otlp,
        plain: false,
        workers: workers.len(),
        stream_idle: stream_idle(&args),
    };
    let wp = Waypoint::new(setup, snapshots, svid);
    let w = wp.clone();
    listen_on_workers(workers, args.listen, "--listen", move |tcp, peer| {
        connection(w.clone(), tcp, peer)
    })?;
    let admin =
        TcpListener::bind(args.admin).await.with_context(|| format!("--admin {}", args.admin))?;
    tokio::spawn(serve_admin(admin, wp.clone()));
    info!(listen = %args.listen, identity = %id, workers = workers.len(), "sinew-waypoint ready");
    until_stopped().await?;
    // Drain as Envoy does: connections are told to go and new ones closed; the requests in
    // hand finish for up to --drain-timeout (a second signal ends it at once).
    let open = || wp.open.load(std::sync::atomic::Ordering::Relaxed);
    info!(open = open(), limit = ?args.drain_timeout.0, "sinew-waypoint draining");
    wp.draining.send_replace(true);
    let drain = async {
        let deadline = tokio::time::Instant::now() + args.drain_timeout.0;
        while open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        () = drain => {}
        r = until_stopped() => r?,
    }
    if open() > 0 {
        warn!(open = open(), "connections still open at the end of the drain: cut");
    }
    info!("sinew-waypoint stopping");
    if let Some(otlp) = &wp.otlp {
        otlp.stop(Duration::from_secs(2)).await;
    }
    wp.access.flush(Duration::from_secs(1));
    Ok(())
}

/// Most HBONE connections not yet authenticated (in their TLS and HTTP/2 handshakes, 10 s
/// each at most): anyone who can reach the port may open them, and past this many the
/// waypoint closes new ones at once instead of holding descriptors and memory for each.
static HANDSHAKES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1024);

async fn connection(wp: Arc<Waypoint>, tcp: tokio::net::TcpStream, peer: SocketAddr) {
    let Ok(permit) = HANDSHAKES.try_acquire() else {
        return debug!(%peer, "too many HBONE handshakes at once: closing");
    };
    if *wp.draining.borrow() {
        return debug!(%peer, "draining: closing a new HBONE connection");
    }
    let Some(identity) = wp.identity() else {
        return debug!(%peer, "no valid certificate: refusing HBONE");
    };
    let config = match identity.server_config() {
        Ok(c) => c,
        Err(e) => return warn!(error = %e, "TLS configuration"),
    };
    let w = wp.clone();
    let _open = Open::count(&wp.open);
    // A drain tells the client to go away (GOAWAY): its open streams finish, new ones go
    // to another waypoint.
    let drained = wp.drained();
    let served = sinew_hbone::serve_connection_until(
        tcp,
        peer,
        config,
        permit,
        drained,
        sinew_hbone::PING_INTERVAL,
        move |inbound| tunnel(w.clone(), inbound),
    )
    .await;
    if let Err(e) = served {
        debug!(%peer, error = %e, "HBONE connection ended");
    }
}

/// Counts an HBONE connection in [`Waypoint::open`] while it lives, also when its task is
/// cancelled or panics (a drain would otherwise wait for it in vain).
struct Open<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Open<'a> {
    fn count(open: &'a std::sync::atomic::AtomicUsize) -> Self {
        open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(open)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One CONNECT: the authority names a service VIP and port; HTTP is served on the stream.
async fn tunnel(wp: Arc<Waypoint>, inbound: Inbound) {
    let authority = inbound.authority;
    let snapshot = wp.snapshot.borrow().clone();
    let Some(service) = snapshot.mesh.service_by_vip(authority.ip()).cloned() else {
        debug!(%authority, "CONNECT to an address that is not a service VIP");
        return inbound.refuse(StatusCode::BAD_REQUEST);
    };
    let client = inbound.forwarded_for().unwrap_or(inbound.peer_addr);
    if service.is_tcp_port(authority.port()) {
        return sinew_l7_waypoint::tcp::serve(wp, inbound, service, authority.port(), client).await;
    }
    let down =
        Arc::new(Downstream::new(&wp, service, authority.port(), inbound.peer.clone(), client));
    let stream = match inbound.accept() {
        // hyper may close without a shutdown (after a 400, say): end the stream cleanly so
        // the client still reads the answer.
        Ok(s) => s.close_gracefully_on_drop(),
        Err(e) => return debug!(error = %e, "CONNECT accept failed"),
    };
    let resets = Arc::new(sinew_l7_waypoint::idle::Resets::default());
    let drained = wp.drained();
    let (stream, activity) = sinew_l7_waypoint::idle::Watched::new(stream);
    let (watched, active) = (resets.clone(), activity.clone());
    let service = hyper::service::service_fn(move |req| {
        let (wp, down, watch) = (wp.clone(), down.clone(), watched.start());
        // In flight until its response body ends (a stream, a long poll).
        let in_flight = active.request();
        async move {
            let resp = proxy::handle(wp, down, req).await;
            watch.finished();
            resp.map(|r| r.map(|body| sinew_l7_waypoint::idle::Holding::new(body, in_flight)))
        }
    });
    let server = http_server();
    let serve = server.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(serve);
    let closing = tokio::select! {
        served = serve.as_mut() => {
            if let Err(e) = served {
                debug!(%authority, error = %e, "HTTP connection ended with an error");
            }
            return;
        }
        why = activity.expired(HEADER_READ_TIMEOUT, CONNECTION_IDLE_TIMEOUT) => why,
        () = resets.abusive() => {
            warn!(%authority, "closing a connection whose requests are mostly reset at once (HTTP/2 rapid reset)");
            "rapid reset"
        }
        () = drained => "draining",
    };
    // GOAWAY (HTTP/2) or close after the request in hand (HTTP/1.1), then a bound; a drain
    // has its own (--drain-timeout, which ends the process).
    debug!(%authority, why = closing, "closing the HTTP connection");
    serve.as_mut().graceful_shutdown();
    if closing == "draining" {
        let _ = serve.await;
    } else {
        let _ = tokio::time::timeout(GRACEFUL_CLOSE, serve).await;
    }
}

/// How long a connection being closed (idle, abusive) may take to finish what it has.
const GRACEFUL_CLOSE: Duration = Duration::from_secs(10);

/// The HTTP server settings of every client connection.
fn http_server() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Oversized header blocks are refused (431 on HTTP/1.1, a stream error on HTTP/2).
    builder.http1().max_buf_size(MAX_HEADER_BYTES);
    builder.http2().max_header_list_size(MAX_HEADER_BYTES as u32);
    // A client gets 30 s to send a request's headers (hyper's default, which needs a timer):
    // without one, a client that sends part of a request holds its connection forever.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    // No HTTP/2 keepalive pings here: a vanished client node is found by the HBONE layer's
    // pings under this stream, and pings would keep an idle connection from ever looking
    // idle (see `idle`).
    builder
}

async fn serve_admin(listener: TcpListener, wp: Arc<Waypoint>) {
    use axum::{Router, extract::State, routing::get};
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(w): State<Arc<Waypoint>>| async move {
                let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                ([(axum::http::header::CONTENT_TYPE, kind)], w.metrics.encode())
            }),
        )
        .route(
            "/ready",
            get(|State(w): State<Arc<Waypoint>>| async move {
                if *w.draining.borrow() {
                    (StatusCode::SERVICE_UNAVAILABLE, "stopping\n")
                } else if w.identity().is_none() {
                    (StatusCode::SERVICE_UNAVAILABLE, "no valid certificate\n")
                } else if !w.snapshot.borrow().synced {
                    (StatusCode::SERVICE_UNAVAILABLE, "no whole configuration from control yet\n")
                } else {
                    (StatusCode::OK, "ready\n")
                }
            }),
        )
        .with_state(wp);
    let _ = axum::serve(listener, app).await;
}
