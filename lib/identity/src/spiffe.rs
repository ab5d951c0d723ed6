//! SPIFFE ids of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::{fmt, str::FromStr};

/// The namespace of the mesh's own identities (node agents, the control service).
pub const NODE_NAMESPACE: &str = "sinew-system";

/// A workload's SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    /// Trust domain, such as `cluster.local`.
    pub trust_domain: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
}

/// Why a string is not a workload SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>: {reason}")]
pub struct SpiffeIdError {
    /// What was parsed.
    pub input: String,
    /// What is wrong.
    pub reason: &'static str,
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

impl SpiffeId {
    /// An id from its parts (checked like a parsed one).
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// A node agent's own identity: `spiffe://<td>/ns/sinew-system/sa/node.<node>`.
    pub fn node(trust_domain: &str, node: &str) -> Result<Self, SpiffeIdError> {
        Self::new(trust_domain, NODE_NAMESPACE, &format!("node.{node}"))
    }

    /// The node this id belongs to, when it is a node agent's identity.
    pub fn node_name(&self) -> Option<&str> {
        (self.namespace == NODE_NAMESPACE)
            .then(|| self.service_account.strip_prefix("node."))
            .flatten()
    }

    /// The id without its scheme, as Istio writes principals: `<td>/ns/<ns>/sa/<sa>`.
    pub fn principal(&self) -> String {
        format!("{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| SpiffeIdError { input: s.to_owned(), reason };
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| err("no spiffe:// scheme"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => {
                if !segment_ok(td) || !segment_ok(ns) || !segment_ok(sa) {
                    return Err(err(
                        "segments must be non-empty lowercase letters, digits, '-', '.', '_'",
                    ));
                }
                Ok(Self {
                    trust_domain: (*td).into(),
                    namespace: (*ns).into(),
                    service_account: (*sa).into(),
                })
            }
            _ => Err(err("expected /ns/<namespace>/sa/<service-account> after the trust domain")),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.principal())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/reviews".parse().unwrap();
        assert_eq!(id.namespace, "shop");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/reviews");
        assert_eq!(id.principal(), "cluster.local/ns/shop/sa/reviews");
        assert_eq!(id.node_name(), None);
        let node = SpiffeId::node("cluster.local", "node-1.rack-2").unwrap();
        assert_eq!(
            node.to_string(),
            "spiffe://cluster.local/ns/sinew-system/sa/node.node-1.rack-2"
        );
        assert_eq!(node.node_name(), Some("node-1.rack-2"));
        for bad in [
            "cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://Cluster/ns/a/sa/b",
            "spiffe://td/ns//sa/b",
            "spiffe://td/xx/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}
