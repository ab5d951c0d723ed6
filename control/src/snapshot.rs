//! An immutable view of the configuration as clients receive it.

use std::{
    collections::BTreeMap,
    hash::{Hash, Hasher},
    sync::Arc,
};

use sinew_model::{Resource, Store};

/// One resource as sent: its key, content version and JSON body.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Content hash (16 hex digits); equal across control restarts for equal content.
    pub version: String,
    /// Kubernetes-shaped JSON, shared by every response that carries it.
    pub body: bytes::Bytes,
    /// The typed resource, for the control service's own decisions (node authorization).
    pub resource: Arc<Resource>,
}

/// Every resource in service, by key (`Kind/namespace/name`).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Increases with every published change.
    pub system_version: u64,
    /// The resources.
    pub resources: BTreeMap<String, Entry>,
}

impl Snapshot {
    /// Builds the snapshot of a store, reusing the entries of `previous` for resources that
    /// did not change (serializing 10,000 workloads on every edit would dominate a push).
    pub fn from_store(store: &Store, system_version: u64, previous: Option<&Snapshot>) -> Self {
        let resources = store
            .resources()
            .into_iter()
            .map(|(key, r)| {
                let key = key.to_string();
                if let Some(old) = previous.and_then(|p| p.resources.get(&key))
                    && old.resource.as_ref() == r
                {
                    return (key, old.clone());
                }
                let body = r.to_json();
                let mut h = std::hash::DefaultHasher::new();
                body.hash(&mut h);
                let version = format!("{:016x}", h.finish());
                (key, Entry { version, body: body.into(), resource: Arc::new(r.clone()) })
            })
            .collect();
        Self { system_version, resources }
    }

    /// True when both hold the same resources at the same versions.
    pub fn same_content(&self, other: &Self) -> bool {
        self.resources.len() == other.resources.len()
            && self
                .resources
                .iter()
                .zip(&other.resources)
                .all(|((k1, e1), (k2, e2))| k1 == k2 && e1.version == e2.version)
    }
}
