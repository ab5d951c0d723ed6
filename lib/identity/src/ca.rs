//! The certificate authority: a root generated on first start and persisted, or supplied by the
//! operator, possibly an intermediate under the operator's root (Istio's plug-in CA layout);
//! CSR signing; leaf verification against a bundle of roots, through the chain it carries.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::{
    certificate::X509Certificate,
    extensions::{GeneralName, ParsedExtension},
    pem::Pem,
};

use crate::SpiffeId;

/// Default SVID lifetime.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Root lifetime when generated.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Below this much life left the CA refuses to sign (certificates of seconds would be
/// renewed in a loop).
const MIN_LEFT: Duration = Duration::from_secs(60);
/// Backdating against clock skew between nodes.
const SKEW: Duration = Duration::from_secs(5 * 60);
/// The most a certificate's `notBefore` is set before its issue (clock skew between nodes).
pub const BACKDATE: Duration = SKEW;

/// Errors of the CA, each naming the file or what was refused.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A CA file does not hold what it should.
    #[error("{path}: {reason}")]
    BadFile {
        /// File.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The CSR cannot be used.
    #[error("CSR refused: {0}")]
    Csr(String),
    /// A certificate does not verify.
    #[error("certificate refused: {0}")]
    Verify(String),
    /// Generating or signing failed.
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
    /// The signing certificate is (nearly) at its end: nothing useful can be issued.
    #[error("{0}")]
    Expiring(String),
}

/// A signing root and the trust bundle it serves.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate's `notAfter` (the earliest of its chain's): nothing it signs
    /// outlives it.
    not_after: SystemTime,
    /// An intermediate signer's chain (PEM, the signer first, no root): sent after every
    /// certificate it issues, so peers that trust only the root can verify them. Empty for
    /// a root signer.
    chain: Vec<String>,
    root_pem: String,
    bundle: Vec<String>,
    trust_domain: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.bundle.len())
            .finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io { path: path.to_path_buf(), source }
}

fn offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn random_serial() -> Result<SerialNumber, CaError> {
    // 16 random bytes from a fresh key's randomness source, without another RNG dependency:
    // the key's DER is random past its fixed header.
    let k = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let der = k.serialize_der();
    let mut bytes: Vec<u8> = der[der.len() - 16..].to_vec();
    bytes[0] &= 0x7f; // positive
    Ok(SerialNumber::from_slice(&bytes))
}

impl Ca {
    /// A new self-signed root for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "sinew");
        dn.push(DnType::CommonName, format!("sinew root {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = offset(now - SKEW);
        params.not_after = offset(now + ROOT_TTL);
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        let root_pem = cert.pem();
        Ok(Self {
            not_after: now + ROOT_TTL,
            chain: Vec::new(),
            issuer: Issuer::new(params, key),
            bundle: vec![root_pem.clone()],
            root_pem,
            trust_domain: trust_domain.into(),
        })
    }

    /// Loads `ca-cert.pem` and `ca-key.pem` from `dir`, or generates and persists them
    /// (directory 0700, key 0600) on first start. `roots.pem`, when present, adds roots to
    /// the trust bundle (the previous root during a rotation). Istio's plug-in CA files work
    /// as they are: `ca-cert.pem` may be an intermediate (followed by its chain, or with
    /// `cert-chain.pem` beside it), and `root-cert.pem` holds its root.
    pub fn load_or_generate(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let (cert, key) = (dir.join("ca-cert.pem"), dir.join("ca-key.pem"));
        // Present while a first start writes its root: a crash between the key and the
        // certificate leaves it, and the next start generates again instead of failing on
        // a key without a certificate until someone cleans up by hand.
        let generating = dir.join(".generating");
        if let Ok(marker) = std::fs::metadata(&generating).and_then(|m| m.modified()) {
            // Only what that start wrote (not older than its marker): files an operator put
            // there since stay.
            for partial in [&cert, &key] {
                let modified = std::fs::metadata(partial).and_then(|m| m.modified());
                // Written after the marker, within a minute of it (a marker dated at the end
                // of time, or later than the files, leaves them be).
                let written_then = |t: std::time::SystemTime| {
                    marker <= t
                        && marker.checked_add(Duration::from_secs(60)).is_some_and(|end| t <= end)
                };
                if modified.is_ok_and(written_then) {
                    let _ = std::fs::remove_file(partial);
                }
            }
            let _ = std::fs::remove_file(&generating);
        }
        let mut ca = if cert.exists() || key.exists() {
            Self::load(&cert, &key, trust_domain)?
        } else {
            let ca = Self::generate(trust_domain)?;
            write_private_dir(dir)?;
            write_file(&generating, b"", 0o600)?;
            write_file(&key, ca.issuer.key().serialize_pem().as_bytes(), 0o600)?;
            write_file(&cert, ca.root_pem.as_bytes(), 0o644)?;
            std::fs::remove_file(&generating).map_err(io(&generating))?;
            ca
        };
        let chain = dir.join("cert-chain.pem");
        if chain.exists() {
            ca.add_chain_pem(&chain)?;
        }
        for extra in ["root-cert.pem", "roots.pem"] {
            let extra = dir.join(extra);
            if extra.exists() {
                ca.add_roots_pem(&extra)?;
            }
        }
        ca.check_chain().map_err(|reason| CaError::BadFile { path: cert, reason })?;
        Ok(ca)
    }

    /// Loads an operator-supplied root (cert-manager, Vault, ...) from PEM files.
    pub fn load(cert: &Path, key: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let cert_pem = std::fs::read_to_string(cert).map_err(io(cert))?;
        let key_pem = std::fs::read_to_string(key).map_err(io(key))?;
        let bad =
            |path: &Path, reason: String| CaError::BadFile { path: path.to_path_buf(), reason };
        let key_pair = KeyPair::from_pem(&key_pem)
            .map_err(|e| bad(key, format!("not a PEM private key: {e}")))?;
        let parsed = parse_pems(&cert_pem).map_err(|r| bad(cert, r))?;
        let first = parsed.first().ok_or_else(|| bad(cert, "no certificate in the file".into()))?;
        let x509 = first.parse_x509().map_err(|e| bad(cert, format!("not a certificate: {e}")))?;
        if !x509.is_ca() {
            return Err(bad(cert, "not a CA certificate (basicConstraints CA:false)".into()));
        }
        let validity = x509.validity();
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(validity.not_after.timestamp().max(0) as u64);
        let not_before = SystemTime::UNIX_EPOCH
            + Duration::from_secs(validity.not_before.timestamp().max(0) as u64);
        let now = SystemTime::now();
        if not_after <= now || not_before > now + SKEW {
            return Err(bad(
                cert,
                format!(
                    "the CA certificate is not valid now (valid {} to {})",
                    validity.not_before, validity.not_after
                ),
            ));
        }
        if x509.public_key().raw
            != rcgen::PublicKeyData::subject_public_key_info(&key_pair).as_slice()
        {
            return Err(bad(key, format!("does not match the certificate in {}", cert.display())));
        }
        let signer_pem = pem_encode("CERTIFICATE", &first.contents);
        let issuer = Issuer::from_ca_cert_pem(&signer_pem, key_pair)
            .map_err(|e| bad(cert, e.to_string()))?;
        let mut ca = Self {
            issuer,
            not_after,
            chain: Vec::new(),
            bundle: Vec::new(),
            root_pem: String::new(),
            trust_domain: trust_domain.into(),
        };
        // The signer, then whatever follows it in the file: roots go to the bundle, the
        // rest (an intermediate signer and the intermediates above it) to the chain.
        ca.sort_in(&parsed).map_err(|r| bad(cert, r))?;
        Ok(ca)
    }

    /// Adds the certificates of a PEM file as the signer's chain (`cert-chain.pem`, Istio's
    /// layout: the signer, the intermediates above it, maybe the root), roots to the bundle.
    pub fn add_chain_pem(&mut self, path: &Path) -> Result<(), CaError> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let bad = |reason: String| CaError::BadFile { path: path.to_path_buf(), reason };
        let pems = parse_pems(&text).map_err(bad)?;
        self.sort_in(&pems).map_err(bad)
    }

    /// Files each certificate under the bundle (self-signed) or the chain (others), once.
    fn sort_in(&mut self, pems: &[Pem]) -> Result<(), String> {
        for p in pems {
            let x = p.parse_x509().map_err(|e| format!("not a certificate: {e}"))?;
            let pem = pem_encode("CERTIFICATE", &p.contents);
            if is_self_signed(&x) {
                if !self.bundle.contains(&pem) {
                    self.bundle.push(pem);
                }
            } else {
                if !x.is_ca() {
                    return Err("the chain holds a certificate that is not a CA".into());
                }
                let ends = SystemTime::UNIX_EPOCH
                    + Duration::from_secs(x.validity().not_after.timestamp().max(0) as u64);
                self.not_after = self.not_after.min(ends);
                if !self.chain.contains(&pem) {
                    self.chain.push(pem);
                }
            }
        }
        if let Some(root) = self.bundle.first() {
            self.root_pem.clone_from(root);
        }
        Ok(())
    }

    /// Whether what the CA signs verifies against its bundle through its chain: a signer
    /// with no root in the bundle would issue certificates nobody accepts.
    fn check_chain(&self) -> Result<(), String> {
        if self.bundle.is_empty() {
            return Err("the signing certificate is an intermediate and no root came with it: \
                        put its root in root-cert.pem or roots.pem beside it"
                .into());
        }
        let chain = self.chain.concat();
        if chain.is_empty() {
            return Ok(());
        }
        verify_chain(&chain, &self.bundle, SystemTime::now()).map(|_| ()).map_err(|e| {
            format!("the signing certificate does not chain to a root of the bundle: {e}")
        })
    }

    /// Adds every certificate of a PEM file to the trust bundle (not as a signer).
    pub fn add_roots_pem(&mut self, path: &Path) -> Result<(), CaError> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let pems = parse_pems(&text)
            .map_err(|reason| CaError::BadFile { path: path.to_path_buf(), reason })?;
        for p in pems {
            p.parse_x509().map_err(|e| CaError::BadFile {
                path: path.to_path_buf(),
                reason: format!("not a certificate: {e}"),
            })?;
            let pem = pem_encode("CERTIFICATE", &p.contents);
            if !self.bundle.contains(&pem) {
                self.bundle.push(pem);
            }
        }
        Ok(())
    }

    /// `ttl`, shortened so a certificate issued now expires no later than the CA (an
    /// operator's CA near its end, say a 90-day one from cert-manager or Vault).
    fn ttl_within(&self, ttl: Duration) -> Result<Duration, CaError> {
        let left = self.not_after.duration_since(SystemTime::now()).unwrap_or_default();
        if left < MIN_LEFT {
            return Err(CaError::Expiring(format!(
                "the signing CA certificate expires in {} s: rotate it (README, root rotation)",
                left.as_secs()
            )));
        }
        Ok(ttl.min(left))
    }

    /// When the signing certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The first root of the bundle (PEM): the signer itself, or an intermediate signer's
    /// root.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Every trusted root, PEM, signing root first.
    pub fn bundle(&self) -> &[String] {
        &self.bundle
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Signs `csr_pem` as `id` for `ttl`. The caller has authorized `id`; the CSR only proves
    /// possession of an ECDSA P-256 key, and any identity it asks for must be `id`.
    pub fn sign(&self, csr_pem: &str, id: &SpiffeId, ttl: Duration) -> Result<String, CaError> {
        if id.trust_domain != self.trust_domain {
            return Err(CaError::Csr(format!(
                "{id} is outside trust domain {}",
                self.trust_domain
            )));
        }
        check_csr_key(csr_pem)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::Csr("the key must be ECDSA P-256".into()));
        }
        let want = id.to_string();
        for san in &csr.params.subject_alt_names {
            match san {
                SanType::URI(uri) if uri.as_str() == want => {}
                other => {
                    return Err(CaError::Csr(format!(
                        "asks for {other:?}; only {want} can be granted"
                    )));
                }
            }
        }
        let params = leaf_params(id, &[], self.ttl_within(ttl)?)?;
        let leaf = params.signed_by(&csr.public_key, &self.issuer)?.pem();
        Ok(leaf + &self.chain.concat())
    }

    /// Issues a key and certificate for a service of the mesh itself (the control service's
    /// TLS identity): the SPIFFE id plus DNS names clients verify. Returns (key PEM, cert PEM).
    pub fn issue(
        &self,
        id: &SpiffeId,
        dns_names: &[&str],
        ttl: Duration,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert =
            leaf_params(id, dns_names, self.ttl_within(ttl)?)?.signed_by(&key, &self.issuer)?;
        Ok((key.serialize_pem(), cert.pem() + &self.chain.concat()))
    }
}

/// An SVID's parameters: the URI SAN (and DNS names if any), empty subject, TLS usages.
fn leaf_params(
    id: &SpiffeId,
    dns_names: &[&str],
    ttl: Duration,
) -> Result<CertificateParams, CaError> {
    let bad = |e: rcgen::Error| CaError::Csr(format!("{id}: {e}"));
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(bad)?)];
    for d in dns_names {
        params.subject_alt_names.push(SanType::DnsName((*d).try_into().map_err(bad)?));
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    params.not_before = offset(now - SKEW.min(ttl / 4));
    params.not_after = offset(now + ttl);
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

/// A new key and a CSR for `id` (what an agent sends). Returns (key PEM, CSR PEM).
pub fn new_csr(id: &SpiffeId) -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names =
        vec![SanType::URI(id.to_string().try_into().map_err(|e| CaError::Csr(format!("{e}")))?)];
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// When a certificate valid from `not_before` to `not_after` should be renewed: half-way.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    not_before + life / 2
}

/// Checks a leaf SVID against a bundle of roots (any may have signed it), its validity at
/// `now`, its key usage for TLS, and returns its SPIFFE id and expiry.
pub fn verify_leaf(
    leaf_pem: &str,
    bundle: &[String],
    now: SystemTime,
) -> Result<(SpiffeId, SystemTime), CaError> {
    let v = |s: String| CaError::Verify(s);
    let leaf = parse_pems(leaf_pem).map_err(v)?;
    let leaf = leaf.first().ok_or_else(|| v("no certificate".into()))?;
    let leaf = leaf.parse_x509().map_err(|e| v(format!("unreadable certificate: {e}")))?;
    let at = x509_parser::time::ASN1Time::from_timestamp(
        now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() as i64,
    )
    .map_err(|e| v(e.to_string()))?;
    if !leaf.validity().is_valid_at(at) {
        return Err(v(format!(
            "not valid now (valid {} to {})",
            leaf.validity().not_before,
            leaf.validity().not_after
        )));
    }
    verify_chain(leaf_pem, bundle, now).map_err(v)?;
    let id = spiffe_id_of(&leaf).map_err(v)?;
    let expiry = SystemTime::UNIX_EPOCH
        + Duration::from_secs(leaf.validity().not_after.timestamp().max(0) as u64);
    Ok((id, expiry))
}

/// The CSR's own key (not its signature algorithm, which is all rcgen's parse looks at: a
/// P-384 key signing with ecdsa-with-SHA256 passed) must be an uncompressed P-256 point.
fn check_csr_key(csr_pem: &str) -> Result<(), CaError> {
    use x509_parser::{
        certification_request::X509CertificationRequest,
        oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY},
        prelude::FromDer,
    };
    let bad = |m: String| CaError::Csr(m);
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes())
        .map_err(|e| bad(format!("not a PEM CSR: {e}")))?;
    let (_, req) = X509CertificationRequest::from_der(&pem.contents)
        .map_err(|e| bad(format!("not a CSR: {e}")))?;
    let spki = &req.certification_request_info.subject_pki;
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY
        || curve != Some(OID_EC_P256)
        || spki.subject_public_key.data.len() != 65
    {
        return Err(bad("the key must be ECDSA P-256".into()));
    }
    Ok(())
}

/// Test support: an operator's root and an intermediate under it, written to `dir` as
/// Istio's plug-in CA files (`ca-cert.pem` the intermediate, `ca-key.pem` its key, and with
/// `with_root_file`, `root-cert.pem`); returns the root's PEM.
#[doc(hidden)]
pub fn plug_in_ca_files_for_tests(dir: &Path, with_root_file: bool) -> Result<String, CaError> {
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut root = CertificateParams::default();
    root.distinguished_name.push(DnType::CommonName, "operator root");
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let root_pem = root.clone().self_signed(&root_key)?.pem();
    let root_issuer = Issuer::new(root, root_key);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut mid = CertificateParams::default();
    mid.distinguished_name.push(DnType::CommonName, "sinew intermediate");
    mid.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    mid.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let mid_pem = mid.signed_by(&key, &root_issuer)?.pem();
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    write_file(&dir.join("ca-cert.pem"), mid_pem.as_bytes(), 0o644)?;
    write_file(&dir.join("ca-key.pem"), key.serialize_pem().as_bytes(), 0o600)?;
    if with_root_file {
        write_file(&dir.join("root-cert.pem"), root_pem.as_bytes(), 0o644)?;
    }
    Ok(root_pem)
}

/// Whether the first certificate of `pem` reaches a root of `bundle`, directly or through the
/// CA certificates after it (an intermediate signer's chain), each valid at `now`.
fn verify_chain(pem: &str, bundle: &[String], now: SystemTime) -> Result<(), String> {
    let at = x509_parser::time::ASN1Time::from_timestamp(
        now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() as i64,
    )
    .map_err(|e| e.to_string())?;
    let certs = parse_pems(pem)?;
    let parsed: Vec<X509Certificate<'_>> = certs
        .iter()
        .map(|p| p.parse_x509().map_err(|e| format!("unreadable certificate: {e}")))
        .collect::<Result<_, _>>()?;
    let root_pems: Vec<Pem> =
        bundle.iter().map(|r| parse_pems(r)).collect::<Result<Vec<_>, _>>()?.concat();
    let roots: Vec<X509Certificate<'_>> = root_pems
        .iter()
        .map(|p| p.parse_x509().map_err(|e| format!("unreadable root: {e}")))
        .collect::<Result<_, _>>()?;
    let mut current = parsed.first().ok_or("no certificate")?;
    // Each step climbs one certificate of the chain, which is short: bounded by its length.
    for _ in 0..=parsed.len() {
        let signed_by = |c: &X509Certificate<'_>| {
            current.issuer() == c.subject()
                && current.verify_signature(Some(c.public_key())).is_ok()
                && c.validity().is_valid_at(at)
        };
        if roots.iter().any(&signed_by) {
            return Ok(());
        }
        match parsed[1..].iter().find(|c| c.is_ca() && signed_by(c)) {
            Some(next) => current = next,
            None => break,
        }
    }
    Err("not signed by any root of the trust bundle".into())
}

fn is_self_signed(c: &X509Certificate<'_>) -> bool {
    c.issuer() == c.subject() && c.verify_signature(None).is_ok()
}

/// When a DER certificate became valid (its `notBefore`).
pub fn not_before_of_der(der: &[u8]) -> Result<SystemTime, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    Ok(SystemTime::UNIX_EPOCH
        + Duration::from_secs(cert.validity().not_before.timestamp().max(0) as u64))
}

/// When a DER certificate expires (its `notAfter`).
pub fn not_after_of_der(der: &[u8]) -> Result<SystemTime, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    Ok(SystemTime::UNIX_EPOCH
        + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64))
}

/// The SPIFFE id of a DER certificate whose chain was already verified (by rustls).
pub fn spiffe_id_of_der(der: &[u8]) -> Result<SpiffeId, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    spiffe_id_of(&cert)
}

fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, String> {
    let mut uris = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(u) = name {
                    uris.push(*u);
                }
            }
        }
    }
    match uris.as_slice() {
        [one] => one.parse().map_err(|e: crate::SpiffeIdError| e.to_string()),
        _ => Err(format!("an SVID has exactly one URI SAN, this one has {}", uris.len())),
    }
}

fn parse_pems(text: &str) -> Result<Vec<Pem>, String> {
    let mut out = Vec::new();
    for p in Pem::iter_from_buffer(text.as_bytes()) {
        let p = p.map_err(|e| format!("bad PEM: {e}"))?;
        if p.label == "CERTIFICATE" {
            out.push(p);
        }
    }
    Ok(out)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n =
            chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn write_private_dir(dir: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    write_atomic(path, data, mode).map_err(io(path))
}

/// Writes `path` whole or not at all, with permissions `mode`: a temporary file beside it,
/// synced, then renamed over it, so after a crash or a power loss the file is the old one or
/// the new one, never a torn or empty one a restart would start from. For keys, caches and
/// state.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", sa).unwrap()
    }

    /// A CA certificate and key written to `dir`, valid from `from` to `to` (seconds from now).
    fn ca_files(dir: &Path, from: i64, to: i64) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let at = |s: i64| offset(SystemTime::now()) + time::Duration::seconds(s);
        (params.not_before, params.not_after) = (at(from), at(to));
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (dir.join("ca-cert.pem"), dir.join("ca-key.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    #[test]
    fn an_intermediate_ca_signs_certificates_that_carry_its_chain_to_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = plug_in_ca_files_for_tests(dir.path(), true).unwrap();
        let ca = Ca::load_or_generate(dir.path(), "cluster.local").unwrap();
        // The bundle is the root alone: peers trust the operator's root, not the intermediate.
        assert_eq!(ca.bundle().len(), 1);
        let (_key, csr) = new_csr(&id("reviews")).unwrap();
        let pem = ca.sign(&csr, &id("reviews"), DEFAULT_TTL).unwrap();
        assert_eq!(parse_pems(&pem).unwrap().len(), 2, "the leaf, then the intermediate");
        let (got, _) = verify_leaf(&pem, std::slice::from_ref(&root), SystemTime::now()).unwrap();
        assert_eq!(got, id("reviews"));
        // Without the intermediate the leaf does not reach the root.
        let leaf_only = pem_encode("CERTIFICATE", &parse_pems(&pem).unwrap()[0].contents);
        assert!(verify_leaf(&leaf_only, &[root], SystemTime::now()).is_err());
        // Another root does not accept it either.
        let stranger = Ca::generate("cluster.local").unwrap();
        assert!(verify_leaf(&pem, stranger.bundle(), SystemTime::now()).is_err());
        // An intermediate without its root is named: it would sign what nobody accepts.
        let lone = tempfile::tempdir().unwrap();
        plug_in_ca_files_for_tests(lone.path(), false).unwrap();
        let err = Ca::load_or_generate(lone.path(), "cluster.local").unwrap_err().to_string();
        assert!(err.contains("ca-cert.pem: the signing certificate is an intermediate"), "{err}");
    }

    #[test]
    fn nothing_signed_outlives_the_ca_and_an_expired_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = ca_files(dir.path(), -60, 3600);
        let ca = Ca::load(&c, &k, "cluster.local").unwrap();
        let (_key, csr) = new_csr(&id("reviews")).unwrap();
        let pem = ca.sign(&csr, &id("reviews"), DEFAULT_TTL).unwrap();
        let (_, expiry) = verify_leaf(&pem, ca.bundle(), SystemTime::now()).unwrap();
        assert!(expiry <= ca.not_after(), "the leaf outlives its CA");
        let (_, own) = ca.issue(&id("control"), &["sinew-control"], DEFAULT_TTL).unwrap();
        assert!(verify_leaf(&own, ca.bundle(), SystemTime::now()).unwrap().1 <= ca.not_after());
        for (from, to) in [(-7200, -60), (3600, 7200)] {
            let (c, k) = ca_files(dir.path(), from, to);
            let err = Ca::load(&c, &k, "cluster.local").unwrap_err().to_string();
            assert!(err.contains("ca-cert.pem: the CA certificate is not valid now"), "{err}");
        }
    }

    #[test]
    fn signs_an_svid_with_the_design_shape() {
        let ca = Ca::generate("cluster.local").unwrap();
        let (_key, csr) = new_csr(&id("reviews")).unwrap();
        let pem = ca.sign(&csr, &id("reviews"), DEFAULT_TTL).unwrap();
        let (got, expiry) = verify_leaf(&pem, ca.bundle(), SystemTime::now()).unwrap();
        assert_eq!(got, id("reviews"));
        let left = expiry.duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(23 * 3600) && left <= DEFAULT_TTL, "{left:?}");
        let der = Pem::iter_from_buffer(pem.as_bytes()).next().unwrap().unwrap();
        let cert = der.parse_x509().unwrap();
        assert!(cert.subject().iter().next().is_none(), "subject must be empty");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!cert.is_ca());
    }

    #[test]
    fn a_csr_cannot_ask_for_another_identity_or_domain() {
        let ca = Ca::generate("cluster.local").unwrap();
        let (_key, csr) = new_csr(&id("admin")).unwrap();
        let err = ca.sign(&csr, &id("reviews"), DEFAULT_TTL).unwrap_err().to_string();
        assert!(
            err.contains("only spiffe://cluster.local/ns/shop/sa/reviews can be granted"),
            "{err}"
        );
        let other = SpiffeId::new("evil.local", "shop", "reviews").unwrap();
        assert!(ca.sign(&csr, &other, DEFAULT_TTL).is_err());
        assert!(
            ca.sign(
                "-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n-----END CERTIFICATE REQUEST-----\n",
                &id("a"),
                DEFAULT_TTL
            )
            .is_err()
        );
    }

    #[test]
    fn untrusted_and_expired_certificates_are_refused() {
        let (ca, other) =
            (Ca::generate("cluster.local").unwrap(), Ca::generate("cluster.local").unwrap());
        let (_k, csr) = new_csr(&id("a")).unwrap();
        let pem = other.sign(&csr, &id("a"), DEFAULT_TTL).unwrap();
        let err = verify_leaf(&pem, ca.bundle(), SystemTime::now()).unwrap_err().to_string();
        assert!(err.contains("not signed by any root"), "{err}");
        let short = ca.sign(&csr, &id("a"), Duration::from_secs(60)).unwrap();
        let later = SystemTime::now() + Duration::from_secs(3600);
        assert!(
            verify_leaf(&short, ca.bundle(), later)
                .unwrap_err()
                .to_string()
                .contains("not valid now")
        );
    }

    #[test]
    fn root_rotation_accepts_both_roots_during_the_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let old = Ca::load_or_generate(&dir.path().join("old"), "cluster.local").unwrap();
        let new_dir = dir.path().join("new");
        let mut new = Ca::load_or_generate(&new_dir, "cluster.local").unwrap();
        std::fs::write(new_dir.join("roots.pem"), old.root_pem()).unwrap();
        new = {
            drop(new);
            Ca::load_or_generate(&new_dir, "cluster.local").unwrap()
        };
        assert_eq!(new.bundle().len(), 2);
        let (_k, csr) = new_csr(&id("a")).unwrap();
        for signer in [&old, &new] {
            let pem = signer.sign(&csr, &id("a"), DEFAULT_TTL).unwrap();
            assert_eq!(verify_leaf(&pem, new.bundle(), SystemTime::now()).unwrap().0, id("a"));
        }
    }

    #[test]
    fn a_csr_for_another_key_type_is_refused() {
        let ca = Ca::generate("cluster.local").unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id("a").to_string().try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let err = ca.sign(&csr, &id("a"), DEFAULT_TTL).unwrap_err().to_string();
        assert!(err.contains("the key must be ECDSA P-256"), "{err}");
        let (_, good) = new_csr(&id("a")).unwrap();
        assert!(check_csr_key(&good).is_ok());
    }

    #[test]
    fn a_first_start_cut_short_generates_again() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        // A crash after the key, before the certificate.
        write_private_dir(&ca_dir).unwrap();
        std::fs::write(ca_dir.join(".generating"), "").unwrap();
        std::fs::write(ca_dir.join("ca-key.pem"), "half").unwrap();
        let ca = Ca::load_or_generate(&ca_dir, "cluster.local").unwrap();
        assert!(!ca_dir.join(".generating").exists());
        let again = Ca::load_or_generate(&ca_dir, "cluster.local").unwrap();
        assert_eq!(ca.root_pem(), again.root_pem(), "kept once whole");
    }

    #[test]
    fn a_marker_newer_than_the_files_leaves_them_be() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let first = Ca::load_or_generate(&ca_dir, "cluster.local").unwrap();
        // A marker left with a date after the root's files (a clock set back since, say):
        // they are not a cut-short start's, so they stay.
        let marker = std::fs::File::create(ca_dir.join(".generating")).unwrap();
        let later = std::time::SystemTime::now() + Duration::from_secs(10 * 365 * 24 * 3600);
        marker.set_modified(later).unwrap();
        let again = Ca::load_or_generate(&ca_dir, "cluster.local").unwrap();
        assert_eq!(first.root_pem(), again.root_pem());
        assert!(!ca_dir.join(".generating").exists());
    }

    #[test]
    fn root_is_persisted_privately_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let first = Ca::load_or_generate(&ca_dir, "cluster.local").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca_dir.join("ca-key.pem")), 0o600);
        assert_eq!(mode(&ca_dir), 0o700);
        let again = Ca::load_or_generate(&ca_dir, "cluster.local").unwrap();
        assert_eq!(first.root_pem(), again.root_pem());
        // A key that does not belong to the certificate is named.
        let other = Ca::generate("cluster.local").unwrap();
        std::fs::write(ca_dir.join("ca-key.pem"), other.issuer.key().serialize_pem()).unwrap();
        let err = Ca::load_or_generate(&ca_dir, "cluster.local").unwrap_err().to_string();
        assert!(err.contains("ca-key.pem: does not match the certificate"), "{err}");
        std::fs::write(ca_dir.join("ca-cert.pem"), "not pem").unwrap();
        assert!(
            Ca::load_or_generate(&ca_dir, "cluster.local").unwrap_err().to_string().contains("ca-")
        );
    }

    #[test]
    fn renewal_is_at_half_life() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(renew_at(t0, t0 + Duration::from_secs(100)), t0 + Duration::from_secs(50));
    }
}
