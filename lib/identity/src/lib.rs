//! Workload identity: SPIFFE ids, the certificate authority that signs X.509 SVIDs, and the
//! checks a peer's certificate must pass.
//!
//! SVIDs follow DESIGN.md: one URI SAN `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, ECDSA P-256,
//! empty subject, EKU server and client auth, 24 h by default, renewed at half life. The CA
//! signs a CSR only for the identity the caller (the control service, after node
//! authorization) names; the CSR proves possession of the key and may not ask for anything
//! else. A trust bundle holds several roots so a root can be rotated without downtime.
#![forbid(unsafe_code)]

mod ca;
mod spiffe;

pub use ca::{
    BACKDATE, Ca, CaError, DEFAULT_TTL, new_csr, not_after_of_der, not_before_of_der,
    plug_in_ca_files_for_tests, renew_at, spiffe_id_of_der, verify_leaf, write_atomic,
};
pub use spiffe::{NODE_NAMESPACE, SpiffeId, SpiffeIdError};
