//! PeerAuthentication: the mTLS mode of each destination.

use std::collections::{BTreeMap, HashMap};

use sinew_model::{MtlsMode, Object, PeerAuthenticationSpec, ROOT_NAMESPACE};

/// The modes of one namespace.
#[derive(Debug, Clone, Default)]
struct NamespaceModes {
    /// Without selector (the oldest).
    wide: Option<MtlsMode>,
    /// With a selector, by age.
    selected: Vec<Selected>,
}

/// A PeerAuthentication with a selector.
#[derive(Debug, Clone)]
struct Selected {
    labels: BTreeMap<String, String>,
    mode: MtlsMode,
    /// `portLevelMtls`: workload ports with modes of their own.
    ports: BTreeMap<u16, MtlsMode>,
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
                Some(sel) => {
                    let ports = o.spec.port_level_mtls.iter().map(|(p, m)| (p.0, m.mode));
                    out.namespaces.entry(ns.to_owned()).or_default().selected.push(Selected {
                        labels: sel.match_labels.clone(),
                        mode,
                        ports: ports.collect(),
                    })
                }
            }
        }
        out
    }

    /// Whether a PeerAuthentication of `namespace` selects workloads by label.
    pub fn selects_by_label(&self, namespace: &str) -> bool {
        self.namespaces.get(namespace).is_some_and(|n| !n.selected.is_empty())
    }

    /// The mode of workload `port` of a workload of `namespace` with `labels`: the port's
    /// own mode in the selecting policy, then that policy's, the namespace's and the mesh's
    /// (UNSET inherits from the next).
    pub fn mode(&self, namespace: &str, labels: &BTreeMap<String, String>, port: u16) -> MtlsMode {
        let ns = self.namespaces.get(namespace);
        let workload = ns.and_then(|n| {
            n.selected.iter().find(|s| s.labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
        });
        [
            workload.and_then(|w| w.ports.get(&port).copied()),
            workload.map(|w| w.mode),
            ns.and_then(|n| n.wide),
            self.mesh,
        ]
        .into_iter()
        .flatten()
        .find(|&m| m != MtlsMode::Unset)
        .unwrap_or(MtlsMode::Permissive)
    }
}
