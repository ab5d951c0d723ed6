//! PeerAuthentication: the mTLS mode of each destination.

use std::collections::{BTreeMap, HashMap};

use sinew_model::{MtlsMode, Object, PeerAuthenticationSpec, ROOT_NAMESPACE};

/// The modes of one namespace.
#[derive(Debug, Clone, Default)]
struct NamespaceModes {
    /// Without selector (the first by name).
    wide: Option<MtlsMode>,
    /// With a selector, by name.
    selected: Vec<(BTreeMap<String, String>, MtlsMode)>,
}

/// Every PeerAuthentication, by level.
#[derive(Debug, Clone, Default)]
pub(super) struct PeerAuth {
    /// Root namespace, no selector (the first by name).
    mesh: Option<MtlsMode>,
    namespaces: HashMap<String, NamespaceModes>,
}

impl PeerAuth {
    /// `objects` sorted by namespace and name, each key once.
    pub fn build(objects: Vec<&Object<PeerAuthenticationSpec>>) -> Self {
        let mut out = Self::default();
        for o in objects {
            let ns = o.metadata.namespace.as_deref().unwrap_or_default();
            let mode = o.spec.mtls.as_ref().map_or(MtlsMode::Unset, |m| m.mode);
            match &o.spec.selector {
                None if ns == ROOT_NAMESPACE => {
                    out.mesh.get_or_insert(mode);
                }
                None => {
                    out.namespaces.entry(ns.to_owned()).or_default().wide.get_or_insert(mode);
                }
                Some(sel) => out
                    .namespaces
                    .entry(ns.to_owned())
                    .or_default()
                    .selected
                    .push((sel.match_labels.clone(), mode)),
            }
        }
        out
    }

    pub fn mode(&self, namespace: &str, labels: &BTreeMap<String, String>) -> MtlsMode {
        let ns = self.namespaces.get(namespace);
        let workload = ns.and_then(|n| {
            n.selected
                .iter()
                .find(|(sel, _)| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
                .map(|&(_, mode)| mode)
        });
        [workload, ns.and_then(|n| n.wide), self.mesh]
            .into_iter()
            .flatten()
            .find(|&m| m != MtlsMode::Unset)
            .unwrap_or(MtlsMode::Permissive)
    }
}
