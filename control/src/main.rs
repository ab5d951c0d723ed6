//! `sinew-control`: flags, the CA, the file source, and the gRPC server.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use sinew_control::{
    admin::AdminState, ca::CaService, discovery::Registry, source::FileSource, tokens::Tokens,
};
use tokio::sync::watch;
use tracing::info;

#[derive(Parser)]
#[command(name = "sinew-control", version, about = "Sinew control service: CA and configuration")]
struct Args {
    /// Directory of resource YAML (watched; changes apply live).
    #[arg(long, default_value = "/etc/sinew")]
    config_dir: PathBuf,
    /// gRPC listen address (CA and discovery).
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Where the CA root lives: generated on first start, or ca-cert.pem/ca-key.pem supplied.
    #[arg(long, default_value = "/var/lib/sinew-control/ca")]
    ca_dir: PathBuf,
    /// Trust domain of the SPIFFE ids.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Bootstrap tokens: `<node> <token>` per line.
    #[arg(long, default_value = "/etc/sinew-control/tokens")]
    tokens: PathBuf,
    /// Admin endpoint: /ready, /metrics, /clients, /config_dump. Port 15014 as istiod's
    /// monitoring port: the node's agent, on the same host in local mode, has 15000.
    #[arg(long, default_value = "127.0.0.1:15014")]
    admin: SocketAddr,
    /// Serve gRPC without TLS (debugging only: tokens then cross the wire in the clear).
    #[arg(long)]
    plaintext: bool,
    /// Where the last good configuration is kept across restarts, so a file that is broken
    /// when control starts keeps serving what it last held (default: in --ca-dir).
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Default (and maximum) certificate lifetime in seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    cert_ttl_secs: u64,
}

/// The last good configuration's file name in --ca-dir, control's own state directory.
const STATE_FILE: &str = "last-good-config.json";

/// The tokens' times across restarts (`sinew_control::tokens::Memory`), in --ca-dir.
const TOKEN_MEMORY_FILE: &str = "token-times.json";

#[tokio::main]
async fn main() -> Result<()> {
    sinew_telemetry::init_logging();
    let args = Args::parse();
    if !sinew_model::is_dns_subdomain(&args.trust_domain) {
        anyhow::bail!("--trust-domain {:?}: not a DNS name", args.trust_domain);
    }
    let ttl = Duration::from_secs(args.cert_ttl_secs);
    if !(sinew_control::ca::MIN_TTL..=sinew_control::ca::MAX_TTL).contains(&ttl) {
        anyhow::bail!(
            "--cert-ttl-secs {}: must be between {} and {} seconds",
            args.cert_ttl_secs,
            sinew_control::ca::MIN_TTL.as_secs(),
            sinew_control::ca::MAX_TTL.as_secs()
        );
    }
    let tokens = Tokens::load(&args.tokens)?;
    let ca = sinew_identity::Ca::load_or_generate(&args.ca_dir, &args.trust_domain)?;
    // After the CA, which creates --ca-dir on a first start.
    let token_memory = args.ca_dir.join(TOKEN_MEMORY_FILE);
    let tokens = sinew_control::tokens::restore(tokens, &token_memory);
    let state = args.state_file.clone().unwrap_or_else(|| args.ca_dir.join(STATE_FILE));
    let (source, first) = FileSource::new(&args.config_dir, Some(&state));
    let errors = source.errors();
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(source.run(tx));
    let ca = Arc::new(ca);
    let tls = if args.plaintext { None } else { Some(sinew_control::server_tls(ca.clone())?) };
    let ca = CaService::new(ca, tokens, rx.clone(), ttl).remember_tokens_in(token_memory);
    tokio::spawn(sinew_control::tokens::watch_file(args.tokens.clone(), ca.tokens()));
    let registry = Arc::new(Registry::default());
    let admin = AdminState {
        registry: registry.clone(),
        ca: ca.stats.clone(),
        errors,
        snapshots: rx.clone(),
    };
    let bind = |addr: SocketAddr, flag: &'static str| async move {
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {flag} {addr}"))
    };
    let admin_listener = bind(args.admin, "--admin").await?;
    let listener = bind(args.listen, "--listen").await?;
    info!(listen = %args.listen, admin = %args.admin, config = %args.config_dir.display(), "sinew-control ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = sinew_control::serve(listener, tls, rx, ca, registry) => r?,
        r = sinew_control::admin::serve(admin_listener, admin) => r?,
        _ = tokio::signal::ctrl_c() => info!("stopping"),
        _ = term.recv() => info!("stopping"),
    }
    Ok(())
}
