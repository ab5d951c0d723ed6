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
    /// Kubernetes-shaped JSON.
    pub body: Arc<[u8]>,
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
    /// Builds the snapshot of a store.
    pub fn from_store(store: &Store, system_version: u64) -> Self {
        let resources = store
            .resources()
            .into_iter()
            .map(|(key, r)| {
                let body = r.to_json();
                let mut h = std::hash::DefaultHasher::new();
                body.hash(&mut h);
                let entry = Entry {
                    version: format!("{:016x}", h.finish()),
                    body: body.into(),
                    resource: Arc::new(r.clone()),
                };
                (key.to_string(), entry)
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
