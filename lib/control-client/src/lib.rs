//! The control service's client, shared by node agents and waypoints.
//!
//! - [`start_config`]: one discovery stream, reconnecting with backoff and jitter, resuming
//!   from the versions held; every response is validated before it is applied (else NACKed,
//!   the last good configuration stays), then cached on disk so a restarted client serves
//!   while the control service is down.
//! - [`start_certificate`]: an SVID for one identity, cached on disk (0600), renewed at half
//!   life; the old one keeps serving while renewal fails.
#![forbid(unsafe_code)]

mod bootstrap;
mod certs;
mod config;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

pub use bootstrap::{ControlSettings, SettingsError};
pub use certs::{
    BUNDLE_RENEWAL_SPREAD, BundleUpdates, CertConfig, Svid, bundle_updates, forward_bundle,
    request_certificate, start_certificate, start_certificate_following,
};
pub use config::{ClientConfig, ConfigView, Held, start_config};

/// How a client proves itself and checks the control service.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// Bootstrap token, sent as `authorization: Bearer <token>` when present.
    pub token: Option<String>,
    /// The file the token is kept in, read again for every request (the token as read at
    /// start when it cannot be): an operator who replaces a node's token (control then
    /// refuses node certificates issued before) updates the file, and the running agent
    /// bootstraps with the new one instead of being locked out until restarted.
    pub token_file: Option<std::path::PathBuf>,
    /// TLS: the roots that sign the control service's certificate, and the client's own
    /// certificate (a node identity) when it has one. `None`: plaintext (tests, debugging).
    pub tls: Option<ClientTls>,
}

/// TLS settings toward the control service.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// Trusted roots, PEM.
    pub roots_pem: String,
    /// (certificate PEM, key PEM) presented to the control service.
    pub identity: Option<(String, String)>,
    /// A certificate kept renewed ([`start_certificate`]): each new channel presents the
    /// one it holds then, while still valid, in place of `identity`. A node certificate
    /// copied once would expire under a long-lived agent and lock it out of control.
    pub renewed: Option<tokio::sync::watch::Receiver<Option<Arc<Svid>>>>,
}

impl ClientTls {
    /// Trusting `roots_pem`, presenting `identity` (or nothing).
    pub fn new(roots_pem: String, identity: Option<(String, String)>) -> Self {
        Self { roots_pem, identity, renewed: None }
    }

    /// The certificate and key to present now, if any.
    fn current_identity(&self) -> Option<(String, String)> {
        let live = self.renewed.as_ref().and_then(|rx| rx.borrow().clone());
        match live {
            Some(svid) if svid.expires > SystemTime::now() => {
                Some((svid.cert_pem.clone(), svid.key_pem.clone()))
            }
            _ => self.identity.clone(),
        }
    }
}

/// Opens a channel to `endpoint` (`http://` or `https://`) with `credentials`' TLS settings.
pub(crate) async fn connect(
    endpoint: &str,
    credentials: &Credentials,
) -> Result<tonic::transport::Channel, ClientError> {
    let connect_err = |source| ClientError::Connect { endpoint: endpoint.to_owned(), source };
    let mut ep = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .map_err(connect_err)?
        .connect_timeout(Duration::from_secs(2))
        // A half-open connection (control's host gone) must end the stream so the client
        // reconnects, not leave it waiting for updates forever.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(Duration::from_secs(30)));
    if let Some(tls) = &credentials.tls {
        let mut cfg = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&tls.roots_pem))
            .domain_name(CONTROL_SERVER_NAME);
        if let Some((cert, key)) = tls.current_identity() {
            cfg = cfg.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        ep = ep.tls_config(cfg).map_err(connect_err)?;
    }
    ep.connect().await.map_err(connect_err)
}

/// Adds the bootstrap token, if any, to a request.
pub(crate) fn authorize<T>(
    request: &mut tonic::Request<T>,
    credentials: &Credentials,
) -> Result<(), ClientError> {
    let fresh = credentials.token_file.as_ref().and_then(|p| {
        let t = std::fs::read_to_string(p).ok()?.trim().to_owned();
        (!t.is_empty()).then_some(t)
    });
    if let Some(token) = fresh.as_ref().or(credentials.token.as_ref()) {
        let value = format!("Bearer {token}").parse().map_err(|_| {
            tonic::Status::invalid_argument("the token is not a valid header value")
        })?;
        request.metadata_mut().insert(sinew_api::AUTHORIZATION, value);
    }
    Ok(())
}

/// The DNS name the control service's certificate carries.
pub const CONTROL_SERVER_NAME: &str = "sinew-control";

/// Errors talking to the control service.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint could not be reached.
    #[error("control service {endpoint}: {source}")]
    Connect {
        /// Endpoint.
        endpoint: String,
        /// Cause.
        source: tonic::transport::Error,
    },
    /// The control service answered with an error.
    #[error("control service: {0}")]
    Status(#[from] tonic::Status),
    /// A local cache file could not be used.
    #[error("cache {path}: {reason}")]
    Cache {
        /// File.
        path: String,
        /// Why.
        reason: String,
    },
    /// Key or certificate handling failed.
    #[error(transparent)]
    Identity(#[from] sinew_identity::CaError),
}

/// Exponential backoff with jitter: 100 ms doubling to 5 s, each wait between 50 % and 100 %.
#[derive(Debug)]
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub(crate) fn new() -> Self {
        Self(Duration::from_millis(100))
    }

    pub(crate) fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }

    pub(crate) fn next(&mut self) -> Duration {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let wait = self.0.mul_f64(0.5 + (nanos % 1000) as f64 / 2000.0);
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        wait
    }
}

pub(crate) fn write_private(path: &std::path::Path, data: &[u8]) -> Result<(), ClientError> {
    let err = |e: std::io::Error| ClientError::Cache {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // Whole: after a power loss the cache is the old one or the new one, never an empty file
    // a restarted client would start from.
    sinew_identity::write_atomic(path, data, 0o600).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new();
        let first = b.next();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..10 {
            b.next();
        }
        let late = b.next();
        assert!(late >= Duration::from_millis(2500) && late <= Duration::from_secs(5), "{late:?}");
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }
}
