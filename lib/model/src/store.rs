//! Parsing YAML documents into resources, and the store that keeps the last good version of
//! each across reloads.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::de::DeserializeOwned;

use crate::{
    ConfigError, KINDS, Namespace, Object, ObjectMeta, Resource, ResourceKey, Validate,
    validate::{Errors, is_dns_label, is_dns_subdomain},
};

/// The envelope every document shares, with the spec's type.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Envelope<S> {
    #[allow(dead_code, reason = "checked against KINDS before typed parsing")]
    api_version: String,
    #[allow(dead_code, reason = "dispatched on before typed parsing")]
    kind: String,
    metadata: ObjectMeta,
    #[serde(default = "Option::default")]
    spec: Option<S>,
    /// What the API server reports (`kubectl get -o yaml` has it): accepted, not kept.
    #[serde(default)]
    #[allow(dead_code, reason = "accepted and dropped")]
    status: crate::ServerSet,
}

/// Deserializes one kind with the failing field's path, then validates every field.
pub(crate) fn typed<S>(value: serde_yaml::Value) -> Result<Object<S>, Vec<(String, String)>>
where
    S: DeserializeOwned + Validate,
{
    let env: Envelope<S> = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "-".to_owned() } else { path };
        vec![(field, e.into_inner().to_string())]
    })?;
    let Some(mut spec) = env.spec.or_else(S::empty) else {
        return Err(vec![("spec".into(), "missing".into())]);
    };
    let mut errors = Errors::default();
    errors.at("spec", |e| spec.validate(e));
    if !errors.found.is_empty() {
        return Err(errors.found);
    }
    spec.normalize();
    Ok(Object { metadata: env.metadata, spec })
}

/// A document that did not validate: its identity when it could be told, and every problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Kind, namespace and name, when the document named them.
    pub key: Option<ResourceKey>,
    /// Every problem, each naming file, resource and field.
    pub errors: Vec<ConfigError>,
}

/// Parses one YAML document. `Ok(None)` for an empty document.
pub fn parse_document(
    file: &Path,
    index: usize,
    value: serde_yaml::Value,
) -> Result<Option<Resource>, Rejected> {
    if value.is_null() {
        return Ok(None);
    }
    let text = |k: &str| value.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let meta = |k: &str| {
        value
            .get("metadata")
            .and_then(|m| m.get(k))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let (kind, api, name, namespace) =
        (text("kind"), text("apiVersion"), meta("name"), meta("namespace"));
    let known = KINDS.iter().find(|(k, _, _)| *k == kind);
    let label = match known {
        Some((k, _, true)) if !namespace.is_empty() => format!("{k}/{namespace}/{name}"),
        Some((k, _, _)) => format!("{k}/{name}"),
        None if !kind.is_empty() => format!("{kind}/{name}"),
        None => format!("document {}", index + 1),
    };
    let fail = |key: Option<ResourceKey>, found: Vec<(String, String)>| {
        let errors = found
            .into_iter()
            .map(|(field, message)| ConfigError {
                file: file.to_path_buf(),
                resource: label.clone(),
                field,
                message,
            })
            .collect();
        Rejected { key, errors }
    };
    let Some(&(kind, want_api, namespaced)) = known else {
        let known: Vec<&str> = KINDS.iter().map(|k| k.0).collect();
        let msg = if kind.is_empty() {
            "missing".to_owned()
        } else {
            format!("unknown kind {kind:?} (known: {})", known.join(", "))
        };
        return Err(fail(None, vec![("kind".into(), msg)]));
    };
    let key = ResourceKey {
        kind,
        namespace: if namespaced { namespace.clone() } else { String::new() },
        name: name.clone(),
    };
    let mut found = Vec::new();
    // Istio's own apiVersion is accepted for the kinds Sinew shares with Istio, so existing
    // policies apply unchanged.
    let istio_alias = (want_api == "security.sinew.io/v1"
        && matches!(api.as_str(), "security.istio.io/v1" | "security.istio.io/v1beta1"))
        || (want_api == "networking.istio.io/v1"
            && matches!(
                api.as_str(),
                "networking.istio.io/v1beta1" | "networking.istio.io/v1alpha3"
            ));
    if api != want_api && !istio_alias {
        found.push((
            "apiVersion".to_owned(),
            format!("must be {want_api:?} for {kind}, not {api:?}"),
        ));
    }
    // `null` is what `kubectl create --dry-run -o yaml` writes: no time.
    if let Some(ts) = value.get("metadata").and_then(|m| m.get("creationTimestamp"))
        && !ts.is_null()
        && !ts.as_str().is_some_and(is_timestamp)
    {
        found.push((
            "metadata.creationTimestamp".to_owned(),
            format!("{ts:?} is not an RFC 3339 UTC time such as 2024-01-02T03:04:05Z"),
        ));
    }
    if name.is_empty() {
        found.push(("metadata.name".to_owned(), "missing".to_owned()));
    } else if kind == "Namespace" && !is_dns_label(&name) {
        found.push(("metadata.name".to_owned(), format!("{name:?} is not an RFC 1123 label")));
    } else if !is_dns_subdomain(&name) {
        found.push(("metadata.name".to_owned(), format!("{name:?} is not a valid name")));
    }
    match (namespaced, namespace.is_empty()) {
        (true, true) => found.push((
            "metadata.namespace".to_owned(),
            format!("{kind} is namespaced: set metadata.namespace"),
        )),
        (true, false) if !is_dns_label(&namespace) => found.push((
            "metadata.namespace".to_owned(),
            format!("{namespace:?} is not a namespace name"),
        )),
        (false, false) => found.push((
            "metadata.namespace".to_owned(),
            format!("{kind} is cluster-scoped: remove metadata.namespace"),
        )),
        _ => {}
    }
    match crate::parse_kind(kind, value) {
        Some(Ok(resource)) if found.is_empty() => {
            let labels = match &resource {
                Resource::Namespace(ns) => Some(&ns.metadata.labels),
                Resource::Workload(w) => Some(&w.metadata.labels),
                _ => None,
            };
            if let Some(mode) = labels.and_then(|l| l.get(crate::DATAPLANE_MODE_LABEL))
                && mode != crate::DATAPLANE_MODE_AMBIENT
                && mode != "none"
            {
                let field = format!("metadata.labels.{}", crate::DATAPLANE_MODE_LABEL);
                return Err(fail(
                    Some(key),
                    vec![(field, format!("must be \"ambient\" or \"none\", not {mode:?}"))],
                ));
            }
            // Bounded, as Kubernetes bounds objects: every client receives each resource.
            let size = resource.to_json().len();
            if size > crate::MAX_RESOURCE_BYTES {
                return Err(fail(
                    Some(key),
                    vec![(
                        "-".into(),
                        format!(
                            "{size} bytes as JSON; a resource may have {} at most",
                            crate::MAX_RESOURCE_BYTES
                        ),
                    )],
                ));
            }
            Ok(Some(resource))
        }
        Some(Ok(_)) => Err(fail(Some(key), found)),
        Some(Err(more)) => {
            found.extend(more);
            Err(fail(Some(key), found))
        }
        None => unreachable!("kind {kind} is in KINDS"),
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z`, as the API server writes `creationTimestamp` (whole
/// seconds, so such times order as strings).
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && match b.len() {
            20 => b[19] == b'Z',
            n => b[19] == b'.' && n > 21 && digits(20..n - 1) && b[n - 1] == b'Z',
        }
}

/// What one file held the last time it was read.
#[derive(Debug, Default, Clone)]
struct FileState {
    resources: BTreeMap<ResourceKey, Resource>,
    /// (modified, length, inode) when read: an unchanged file is not parsed again.
    stamp: Option<(std::time::SystemTime, u64, u64)>,
    errors: Vec<ConfigError>,
}

fn stamp(path: &Path) -> Option<(std::time::SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Parses a whole file: every valid resource, every rejected one (with its key when known),
/// or a file-level error that makes the whole file unreadable.
pub fn parse_file(file: &Path, text: &str) -> Result<Vec<Result<Resource, Rejected>>, ConfigError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value =
            serde::Deserialize::deserialize(doc).map_err(|e: serde_yaml::Error| ConfigError {
                file: file.to_path_buf(),
                resource: format!("document {}", i + 1),
                field: "-".into(),
                message: format!("YAML syntax: {e}"),
            })?;
        match parse_document(file, i, value) {
            Ok(Some(r)) => out.push(Ok(r)),
            Ok(None) => {}
            Err(e) => out.push(Err(e)),
        }
    }
    Ok(out)
}

/// The last good version of every resource of a configuration directory.
#[derive(Debug, Default, Clone)]
pub struct Store {
    files: BTreeMap<PathBuf, FileState>,
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Re-reads every `*.yaml`/`*.yml` file of `dir` and returns what was rejected.
    ///
    /// A valid resource replaces its previous version; a rejected one keeps its previous
    /// version (if any) in service, and so does every other resource the file held before
    /// (a document whose kind or name is what broke cannot be matched to what it replaced);
    /// a file that cannot be read or parsed keeps all of its previous resources; a file that
    /// is gone takes its resources with it. A resource defined twice in one file is reported
    /// and its first definition used. Files whose
    /// modification time, length and inode are unchanged are not parsed again.
    pub fn reload_dir(&mut self, dir: &Path) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                errors.push(ConfigError {
                    file: dir.to_path_buf(),
                    resource: "-".into(),
                    field: "-".into(),
                    message: format!(
                        "cannot read directory ({e}); keeping the last good configuration"
                    ),
                });
                return errors;
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        paths.sort();
        let mut next = BTreeMap::new();
        for path in paths {
            let previous = self.files.get(&path).cloned().unwrap_or_default();
            let now = stamp(&path);
            if now.is_some() && now == previous.stamp {
                errors.extend(previous.errors.iter().cloned());
                next.insert(path, previous);
                continue;
            }
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| ConfigError {
                    file: path.clone(),
                    resource: "-".into(),
                    field: "-".into(),
                    message: format!("cannot read file: {e}"),
                })
                .and_then(|text| parse_file(&path, &text));
            let state = match parsed {
                Err(e) => FileState { resources: previous.resources, stamp: now, errors: vec![e] },
                Ok(docs) => {
                    let mut state = FileState { stamp: now, ..Default::default() };
                    let mut rejected = false;
                    for doc in docs {
                        match doc {
                            Ok(r) if state.resources.contains_key(&r.key()) => {
                                state.errors.push(ConfigError {
                                    file: path.clone(),
                                    resource: r.key().to_string(),
                                    field: "metadata.name".into(),
                                    message: "defined twice in this file; the first is used".into(),
                                });
                            }
                            Ok(r) => {
                                state.resources.insert(r.key(), r);
                            }
                            Err(Rejected { errors: errs, .. }) => {
                                state.errors.extend(errs);
                                rejected = true;
                            }
                        }
                    }
                    // A rejected document cannot take anything out of service, even one
                    // whose kind or name is what broke (and so cannot be matched to what it
                    // replaces): with any rejection, every previous resource this version
                    // does not hold keeps its last good version.
                    if rejected {
                        for (key, old) in previous.resources {
                            state.resources.entry(key).or_insert(old);
                        }
                    }
                    state
                }
            };
            errors.extend(state.errors.iter().cloned());
            next.insert(path, state);
        }
        self.files = next;
        // The same resource in two files: the first file (in name order) wins.
        let mut seen: BTreeMap<ResourceKey, PathBuf> = BTreeMap::new();
        for (path, state) in &self.files {
            for key in state.resources.keys() {
                if let Some(first) = seen.get(key) {
                    errors.push(ConfigError {
                        file: path.clone(),
                        resource: key.to_string(),
                        field: "metadata.name".into(),
                        message: format!("also defined in {}; that one is used", first.display()),
                    });
                } else {
                    seen.insert(key.clone(), path.clone());
                }
            }
        }
        errors
    }

    /// Each file's resources in service, to carry the last good configuration over a
    /// restart ([`Store::restore`]).
    pub fn last_good(&self) -> Vec<(&Path, Vec<&Resource>)> {
        self.files
            .iter()
            .map(|(path, state)| (path.as_path(), state.resources.values().collect()))
            .collect()
    }

    /// A store that holds `last_good` (saved before a restart) as what each file held: the
    /// next [`Store::reload_dir`] reads every file again, and a file that is now broken, or
    /// has a rejected document, keeps these versions as if the process had never stopped,
    /// while a file that is gone takes them along. Without this a restart with a broken file
    /// would serve less than before, and clients would be told to remove the rest.
    pub fn restore(last_good: Vec<(PathBuf, Vec<Resource>)>) -> Self {
        let files = last_good
            .into_iter()
            .map(|(path, resources)| {
                let resources = resources.into_iter().map(|r| (r.key(), r)).collect();
                (path, FileState { resources, stamp: None, errors: vec![] })
            })
            .collect();
        Self { files }
    }

    /// Every resource in service, each key once.
    pub fn resources(&self) -> BTreeMap<&ResourceKey, &Resource> {
        let mut out = BTreeMap::new();
        for state in self.files.values() {
            for (k, r) in &state.resources {
                out.entry(k).or_insert(r);
            }
        }
        out
    }

    /// A namespace by name.
    pub fn namespace(&self, name: &str) -> Option<&Object<crate::NamespaceSpec>> {
        let key = ResourceKey { kind: "Namespace", namespace: String::new(), name: name.into() };
        match self.resources().get(&key) {
            Some(Resource::Namespace(ns)) => Some(ns),
            _ => None,
        }
    }

    /// True when `namespace` exists and carries the ambient label.
    pub fn namespace_is_ambient(&self, namespace: &str) -> bool {
        self.namespace(namespace).is_some_and(Namespace::is_ambient)
    }
}

impl Namespace for Object<crate::NamespaceSpec> {
    fn is_ambient(&self) -> bool {
        self.metadata.labels.get(crate::DATAPLANE_MODE_LABEL).map(String::as_str)
            == Some(crate::DATAPLANE_MODE_AMBIENT)
    }
}
