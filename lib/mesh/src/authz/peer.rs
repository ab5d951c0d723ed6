//! PeerAuthentication: the mTLS mode of each destination.

use std::collections::{BTreeMap, HashMap};

use sinew_model::{MtlsMode, Object, PeerAuthenticationSpec, ROOT_NAMESPACE};

/// The modes of one namespace.
#[derive(Debug, Clone, Default)]
struct NamespaceModes {
    /// Without selector (the oldest).
    wide: Option<MtlsMode>,
    /// With a selector, by name.
    selected: Vec<(BTreeMap<String, String>, MtlsMode)>,
}

/// Every PeerAuthentication, by level.
#[derive(Debug, Clone, Default)]
pub(super) struct PeerAuth {
    /// Root namespace, no selector (the oldest).
    mesh: Option<MtlsMode>,
    namespaces: HashMap<String, NamespaceModes>,
}

impl PeerAuth {
    /// `objects` sorted by namespace and name, each key once. Where several apply at one
    /// level the oldest wins (by `creationTimestamp`, then name), as in Istio; a selector
    /// without labels (`selector: {}`) is no selector, as istiod reads it (so in the root
    /// namespace it sets the mesh-wide mode).
    pub fn build(mut objects: Vec<&Object<PeerAuthenticationSpec>>) -> Self {
        objects.sort_by_cached_key(|o| {
            let created = &o.metadata.creation_timestamp;
            ((created.is_none(), created.clone()), o.metadata.name.clone())
        });
        let mut out = Self::default();
        for o in objects {
            let ns = o.metadata.namespace.as_deref().unwrap_or_default();
            let mode = o.spec.mtls.as_ref().map_or(MtlsMode::Unset, |m| m.mode);
            let selector = o.spec.selector.as_ref().filter(|s| !s.match_labels.is_empty());
            match selector {
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

    /// Whether a PeerAuthentication of `namespace` selects workloads by label.
    pub fn selects_by_label(&self, namespace: &str) -> bool {
        self.namespaces.get(namespace).is_some_and(|n| !n.selected.is_empty())
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
