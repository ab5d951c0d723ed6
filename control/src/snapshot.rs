//! An immutable view of the configuration as clients receive it, with what changed since the
//! previous one (so a thousand up-to-date clients cost one diff, not a thousand).

use std::{collections::BTreeMap, sync::Arc};

use sinew_model::{Resource, Store};

/// One resource as sent: its content version and JSON body.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Content hash (16 hex digits); equal across control restarts for equal content.
    pub version: Arc<str>,
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
    /// The snapshot `changed` and `removed` are relative to.
    pub prev_version: u64,
    /// The resources.
    pub resources: BTreeMap<Arc<str>, Entry>,
    /// Keys added or changed since `prev_version`.
    pub changed: Vec<Arc<str>>,
    /// Keys removed since `prev_version`.
    pub removed: Vec<Arc<str>>,
}

/// A resource's version: FNV-1a 64 of its JSON, the same in every build and Rust release
/// (std's hasher may change between releases, and versions must stay equal across a control
/// upgrade for resuming clients to skip what they hold).
pub fn content_hash(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl Snapshot {
    /// Builds the snapshot of a store, reusing the entries of `previous` for resources that
    /// did not change (serializing 10,000 workloads on every edit would dominate a push).
    pub fn from_store(store: &Store, system_version: u64, previous: Option<&Snapshot>) -> Self {
        let mut changed = Vec::new();
        let resources: BTreeMap<Arc<str>, Entry> = store
            .resources()
            .into_iter()
            .map(|(key, r)| {
                let key = key.to_string();
                if let Some((k, old)) =
                    previous.and_then(|p| p.resources.get_key_value(key.as_str()))
                    && old.resource.as_ref() == r
                {
                    return (k.clone(), old.clone());
                }
                let body = r.to_json();
                let version: Arc<str> = format!("{:016x}", content_hash(&body)).into();
                let key: Arc<str> = key.into();
                changed.push(key.clone());
                (key, Entry { version, body: body.into(), resource: Arc::new(r.clone()) })
            })
            .collect();
        let removed = previous
            .map(|p| p.resources.keys().filter(|k| !resources.contains_key(*k)).cloned().collect())
            .unwrap_or_default();
        let prev_version = previous.map_or(0, |p| p.system_version);
        Self { system_version, prev_version, resources, changed, removed }
    }

    /// True when nothing changed relative to the previous snapshot.
    pub fn is_unchanged(&self) -> bool {
        self.changed.is_empty() && self.removed.is_empty()
    }

    /// Keys that differ between `self` (what a client holds) and `newer`, by merge join.
    pub fn diff(&self, newer: &Snapshot) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
        let changed = newer
            .resources
            .iter()
            .filter(|(k, e)| self.resources.get(*k).is_none_or(|old| old.version != e.version))
            .map(|(k, _)| k.clone())
            .collect();
        let removed =
            self.resources.keys().filter(|k| !newer.resources.contains_key(*k)).cloned().collect();
        (changed, removed)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_are_fnv1a_64_of_the_json_in_every_build() {
        // Published FNV-1a 64 test vectors: the same in any build, across Rust releases.
        assert_eq!(super::content_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::content_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(super::content_hash(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
