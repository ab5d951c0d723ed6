//! How a node-local client (agent or waypoint) reaches the control service: settings from
//! its flags, then its node identity, used from then on instead of the bootstrap token.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use sinew_identity::SpiffeId;
use tracing::warn;

use crate::{CertConfig, ClientTls, Credentials};

/// Where the control service is and how to prove who we are.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// `https://host:port` (or `http://` for debugging).
    pub endpoint: String,
    /// This node's name.
    pub node: String,
    /// Bootstrap token.
    pub token: Option<String>,
    /// The file it came from, read again on each use (see [`Credentials::token_file`]).
    pub token_file: Option<PathBuf>,
    /// Roots of the control service's certificate, PEM.
    pub roots_pem: Option<String>,
    /// Where configuration and certificates are cached.
    pub cache_dir: PathBuf,
}

/// A flag value that cannot be used; names the flag and the file.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {value}: {reason}")]
pub struct SettingsError {
    /// The flag.
    pub flag: &'static str,
    /// Its value.
    pub value: String,
    /// Why.
    pub reason: String,
}

impl ControlSettings {
    /// Reads and checks the flags `--control`, `--control-ca`, `--token-file` and `--node`.
    pub fn load(
        endpoint: String,
        control_ca: Option<&Path>,
        token_file: Option<&Path>,
        node: String,
        cache_dir: PathBuf,
    ) -> Result<Self, SettingsError> {
        let err = |flag, value: &str, reason: String| SettingsError {
            flag,
            value: value.to_owned(),
            reason,
        };
        if !endpoint.starts_with("https://") && !endpoint.starts_with("http://") {
            return Err(err("--control", &endpoint, "expected https://<host>:<port>".into()));
        }
        if !sinew_model::is_dns_subdomain(&node) {
            return Err(err("--node", &node, "not a node name".into()));
        }
        let read = |flag, p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| err(flag, &p.display().to_string(), e.to_string()))
        };
        let token = match token_file {
            Some(p) => {
                let t = read("--token-file", p)?.trim().to_owned();
                if t.is_empty() {
                    return Err(err("--token-file", &p.display().to_string(), "empty".into()));
                }
                Some(t)
            }
            None => None,
        };
        let roots_pem = match control_ca {
            Some(p) => Some(read("--control-ca", p)?),
            None if endpoint.starts_with("https://") => {
                return Err(err(
                    "--control",
                    &endpoint,
                    "TLS needs --control-ca (the control CA's ca-cert.pem)".into(),
                ));
            }
            None => None,
        };
        let token_file = token_file.map(Path::to_path_buf);
        Ok(Self { endpoint, node, token, token_file, roots_pem, cache_dir })
    }

    /// Credentials toward the control service: the bootstrap token, plus the node's own
    /// certificate once it has one (from the cache, or asked for now with the token, waiting
    /// up to 5 s), kept renewed in the background at half life: every new channel presents
    /// the current one. If control cannot be reached the token alone is used meanwhile, and
    /// cached configuration keeps serving.
    /// `bundle`: the trust bundle control publishes (fed once the configuration stream is
    /// up, see [`crate::forward_bundle`]); the node's certificate is renewed when it changes,
    /// as workload certificates are.
    pub async fn node_credentials(
        &self,
        node_id: &SpiffeId,
        bundle: crate::BundleUpdates,
    ) -> Credentials {
        let bootstrap = Credentials {
            token: self.token.clone(),
            token_file: self.token_file.clone(),
            tls: self.roots_pem.clone().map(|roots_pem| ClientTls::new(roots_pem, None)),
        };
        let Some(roots_pem) = self.roots_pem.clone() else { return bootstrap };
        let cfg = CertConfig {
            endpoint: self.endpoint.clone(),
            credentials: bootstrap,
            identity: node_id.clone(),
            ttl: None,
            cache_dir: self.cache_dir.clone(),
        };
        // The renewal task runs (and caches) for the process's lifetime: its handle is let go.
        let (mut svids, _task) =
            crate::start_certificate_following(cfg, bundle, crate::BUNDLE_RENEWAL_SPREAD);
        let ready = matches!(
            tokio::time::timeout(Duration::from_secs(5), svids.wait_for(Option::is_some)).await,
            Ok(Ok(_))
        );
        if !ready {
            warn!(node = %node_id, "no node certificate yet (control unreachable?): using the bootstrap token until one comes");
        }
        Credentials {
            token: self.token.clone(),
            token_file: self.token_file.clone(),
            tls: Some(ClientTls { roots_pem, identity: None, renewed: Some(svids) }),
        }
    }
}
