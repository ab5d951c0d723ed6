//! Control's own TLS: a serving certificate from its own CA, re-issued at half life while
//! control runs (a certificate issued once at start would expire under a long-running control
//! and take every agent's connection with it), and client certificates verified against the
//! trust bundle when presented (a node bootstraps with a token, without one).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use sinew_identity::{Ca, SpiffeId};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tracing::{debug, warn};

/// Errors building control's TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA could not issue the serving certificate.
    #[error("control's serving certificate: {0}")]
    Issue(#[from] sinew_identity::CaError),
    /// rustls refused a part of the configuration.
    #[error("control's TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The serving certificate in force and when to re-issue it.
struct Current {
    key: Arc<CertifiedKey>,
    renew_at: SystemTime,
}

/// Hands rustls the serving certificate, re-issued from the CA once past half its life.
struct Renewing {
    ca: Arc<Ca>,
    id: SpiffeId,
    ttl: Duration,
    current: Mutex<Current>,
}

impl std::fmt::Debug for Renewing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renewing").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Renewing {
    fn issue(ca: &Ca, id: &SpiffeId, ttl: Duration) -> Result<Current, TlsError> {
        let (key_pem, cert_pem) = ca.issue(id, &[crate::SERVER_NAME], ttl)?;
        let config = |e: String| TlsError::Config(e);
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| config(e.to_string()))?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| config(e.to_string()))?;
        let signer =
            provider().key_provider.load_private_key(key).map_err(|e| config(e.to_string()))?;
        let now = SystemTime::now();
        // `issue` may shorten the lifetime to the CA's own end.
        let not_after = chain
            .first()
            .and_then(|c| sinew_identity::not_after_of_der(c).ok())
            .unwrap_or(now + ttl);
        let life = not_after.duration_since(now).unwrap_or_default();
        Ok(Current { key: Arc::new(CertifiedKey::new(chain, signer)), renew_at: now + life / 2 })
    }
}

impl ResolvesServerCert for Renewing {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if SystemTime::now() >= current.renew_at {
            match Self::issue(&self.ca, &self.id, self.ttl) {
                Ok(next) => {
                    debug!(id = %self.id, "serving certificate re-issued");
                    *current = next;
                }
                // The one in force serves until it expires; the next handshake tries again.
                Err(e) => warn!(error = %e, "cannot re-issue control's serving certificate"),
            }
        }
        Some(current.key.clone())
    }
}

/// Control's TLS configuration: a serving certificate for [`crate::SERVER_NAME`] (and
/// control's SPIFFE id) from `ca`, living `ttl` and re-issued at half life; client
/// certificates optional, verified against the CA's bundle; HTTP/2 (gRPC) only.
pub fn server_config(ca: Arc<Ca>, ttl: Duration) -> Result<Arc<ServerConfig>, TlsError> {
    let id = SpiffeId::new(ca.trust_domain(), sinew_identity::NODE_NAMESPACE, "sinew-control")
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let current = Renewing::issue(&ca, &id, ttl)?;
    let mut roots = rustls::RootCertStore::empty();
    for pem in ca.bundle() {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| TlsError::Config(format!("trust bundle: {e}")))?;
            roots.add(cert).map_err(|e| TlsError::Config(format!("trust bundle: {e}")))?;
        }
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let resolver = Renewing { ca, id, ttl, current: Mutex::new(current) };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts on `listener` and yields connections once their TLS handshake is done, each
/// within [`crate::TLS_HANDSHAKE_TIMEOUT`] and in its own task, so a slow or silent peer
/// holds up no one else. tonic reads the peer's certificates from the stream it gets.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(crate::TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    /// Connects as a client trusting `ca`'s roots and returns the serving certificate seen.
    async fn handshake(addr: std::net::SocketAddr, ca: &Ca) -> CertificateDer<'static> {
        let mut roots = rustls::RootCertStore::empty();
        for pem in ca.bundle() {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(cert.unwrap()).unwrap();
            }
        }
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(crate::SERVER_NAME).unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("the handshake verifies the serving certificate");
        tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
    }

    #[tokio::test]
    async fn the_serving_certificate_is_re_issued_before_it_expires() {
        let ca = Arc::new(Ca::generate("cluster.local").unwrap());
        let config = server_config(ca.clone(), Duration::from_secs(2)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = incoming(listener, config);
        tokio::spawn(async move { while accepted.next().await.is_some() {} });
        let first = handshake(addr, &ca).await;
        // Past the first certificate's end: a fixed certificate would fail the handshake.
        tokio::time::sleep(Duration::from_millis(3000)).await;
        let second = handshake(addr, &ca).await;
        assert_ne!(first, second, "a new certificate");
        let not_after = sinew_identity::not_after_of_der(&second).unwrap();
        assert!(not_after > SystemTime::now(), "valid now");
    }
}
