//! rustls configurations for HBONE (DESIGN.md, "Tunnel"): TLS 1.3 only, AES-GCM, ALPN `h2`,
//! no SNI, no resumption, SPIFFE identities on both sides.
//!
//! The server requires a client certificate chaining to the trust bundle and carrying a
//! SPIFFE id of the same trust domain; the client requires the server's certificate to chain
//! to the bundle and to carry one of the identities expected for that destination. Names are
//! never checked: pods are reached by address and identified by their SPIFFE id.

use std::sync::{Arc, OnceLock};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
    client::{
        ClientConfig, Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::{
        NoServerSessionStorage, ParsedCertificate, ServerConfig, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::{CertifiedKey, SingleCertAndKey},
};
use sinew_identity::{SpiffeId, not_after_of_der, spiffe_id_of_der};

/// The only ALPN protocol spoken.
pub const ALPN_H2: &[u8] = b"h2";

/// A certificate, key or bundle that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// PEM or DER that does not parse.
    #[error("{what}: {reason}")]
    Invalid {
        /// Which input.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn invalid(what: &'static str) -> impl Fn(String) -> TlsError {
    move |reason| TlsError::Invalid { what, reason }
}

/// ring with the TLS 1.3 AES-GCM suites only (AES-128 first: faster, and ztunnel offers both).
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::ring::cipher_suite::{
                TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384,
            };
            let mut p = rustls::crypto::ring::default_provider();
            p.cipher_suites = vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384];
            Arc::new(p)
        })
        .clone()
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// A workload's credentials: its SVID, key and the trust bundle it checks peers against.
#[derive(Clone)]
pub struct Identity {
    id: SpiffeId,
    /// When the certificate expires.
    not_after: std::time::SystemTime,
    key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    server: Arc<OnceLock<Arc<ServerConfig>>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Identity {
    /// Parses an SVID (certificate chain PEM, PKCS#8 key PEM) and its trust bundle (PEM roots).
    pub fn from_pem(cert_pem: &str, key_pem: &str, bundle: &[String]) -> Result<Self, TlsError> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| invalid("certificate")(e.to_string()))?;
        let leaf = chain.first().ok_or_else(|| invalid("certificate")("no certificate".into()))?;
        let id = spiffe_id_of_der(leaf).map_err(invalid("certificate"))?;
        let not_after = not_after_of_der(leaf).map_err(invalid("certificate"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| invalid("private key")(e.to_string()))?;
        let signer = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| invalid("private key")(e.to_string()))?;
        let certified = CertifiedKey::new(chain, signer);
        certified.keys_match().map_err(|e| invalid("private key")(e.to_string()))?;
        let mut roots = RootCertStore::empty();
        for pem in bundle {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| invalid("trust bundle")(e.to_string()))?;
                roots.add(cert).map_err(|e| invalid("trust bundle")(e.to_string()))?;
            }
        }
        if roots.is_empty() {
            return Err(invalid("trust bundle")("no roots".into()));
        }
        Ok(Self {
            id,
            not_after,
            key: Arc::new(certified),
            roots: Arc::new(roots),
            server: Arc::new(OnceLock::new()),
        })
    }

    /// The SPIFFE id the certificate carries.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// When the certificate expires.
    pub fn not_after(&self) -> std::time::SystemTime {
        self.not_after
    }

    /// True when `other` is this very certificate and bundle (not a renewal or a rotation):
    /// connections made with one may carry streams for the other.
    pub fn same_credentials(&self, other: &Identity) -> bool {
        Arc::ptr_eq(&self.key, &other.key) && Arc::ptr_eq(&self.roots, &other.roots)
    }

    /// The server side (built once per identity and shared by all its connections): requires
    /// a client certificate from the bundle with a SPIFFE id of our trust domain.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        if let Some(c) = self.server.get() {
            return Ok(c.clone());
        }
        let inner = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| invalid("trust bundle")(e.to_string()))?;
        let verifier =
            Arc::new(SameTrustDomain { inner, trust_domain: self.id.trust_domain.clone() });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(self.key.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        let config = Arc::new(config);
        Ok(self.server.get_or_init(|| config).clone())
    }

    /// The client side toward a destination that must prove one of `expected`.
    pub fn client_config(&self, expected: &[SpiffeId]) -> Result<Arc<ClientConfig>, TlsError> {
        let verifier =
            Arc::new(ExpectedServer { roots: self.roots.clone(), expected: expected.to_vec() });
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(self.key.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.resumption = Resumption::disabled();
        config.enable_sni = false;
        Ok(Arc::new(config))
    }
}

/// The server name handed to rustls for a destination address: an IP, so no SNI is sent.
pub fn server_name(addr: std::net::SocketAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.ip().into())
}

/// The SPIFFE id of a peer's leaf certificate, if it has one.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    spiffe_id_of_der(certs?.first()?).ok()
}

/// Client certificates: a chain to the bundle (webpki), then a SPIFFE id of our trust domain.
#[derive(Debug)]
struct SameTrustDomain {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SameTrustDomain {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: they would list our roots to anyone who connects.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        match spiffe_id_of_der(end_entity) {
            Ok(id) if id.trust_domain == self.trust_domain => Ok(ClientCertVerified::assertion()),
            Ok(id) => Err(rustls::Error::General(format!(
                "client {id} is not of trust domain {}",
                self.trust_domain
            ))),
            Err(e) => Err(rustls::Error::General(format!("client certificate: {e}"))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server certificates: a chain to the bundle, then one of the expected SPIFFE ids.
#[derive(Debug)]
struct ExpectedServer {
    roots: Arc<RootCertStore>,
    expected: Vec<SpiffeId>,
}

impl ServerCertVerifier for ExpectedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            algorithms().all,
        )?;
        let id = spiffe_id_of_der(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(std::io::Error::other(e)),
            )))
        })?;
        if self.expected.contains(&id) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server is {id}, expected one of {:?}",
                self.expected.iter().map(ToString::to_string).collect::<Vec<_>>()
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered.
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}
