//! Sinew's resource model: Kubernetes-shaped resources (apiVersion, kind, metadata, spec) read
//! from a directory of YAML files, validated field by field.
//!
//! This first cut carries the `Namespace` resource, whose `sinew.io/dataplane-mode=ambient`
//! label enrolls a namespace in the mesh. Loading never fails as a whole: every document that
//! does not validate becomes a [`ConfigError`] naming the file, the resource and the field,
//! and the valid ones still load.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// The label that enrolls a namespace, and its enrolling value.
pub const DATAPLANE_MODE_LABEL: &str = "sinew.io/dataplane-mode";
/// The value of [`DATAPLANE_MODE_LABEL`] that enrolls a namespace.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";

/// One rejected resource or file, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {resource}: {field}: {message}", file = .file.display())]
pub struct ConfigError {
    /// The file the resource came from.
    pub file: PathBuf,
    /// `Kind/name`, or `document N` when the document has no usable kind or name.
    pub resource: String,
    /// The field path, such as `metadata.labels`, or `-` for the document as a whole.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// A mesh namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
}

impl Namespace {
    /// True when the namespace's traffic is captured by the mesh.
    pub fn is_ambient(&self) -> bool {
        self.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some(DATAPLANE_MODE_AMBIENT)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawNamespace {
    api_version: String,
    #[allow(dead_code, reason = "checked by the kind dispatch before this type is used")]
    kind: String,
    metadata: RawMetadata,
    #[serde(default)]
    #[allow(dead_code, reason = "Namespace has no spec fields Sinew reads")]
    spec: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetadata {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    #[allow(dead_code, reason = "accepted for kubectl-style files; not used")]
    annotations: BTreeMap<String, String>,
}

/// Everything valid in a configuration directory, and what was rejected.
#[derive(Debug, Default)]
pub struct Config {
    /// Valid namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Every rejected file or resource.
    pub errors: Vec<ConfigError>,
}

impl Config {
    /// True when `namespace` exists and carries the ambient label.
    pub fn namespace_is_ambient(&self, namespace: &str) -> bool {
        self.namespaces.get(namespace).is_some_and(Namespace::is_ambient)
    }
}

/// Whether `s` is an RFC 1123 label, as Kubernetes requires of namespace names.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Reads every `*.yaml`/`*.yml` file of `dir` (not recursive), in name order.
pub fn load_dir(dir: &Path) -> Config {
    let mut config = Config::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            config.errors.push(ConfigError {
                file: dir.to_path_buf(),
                resource: "-".into(),
                field: "-".into(),
                message: format!("cannot read directory: {e}"),
            });
            return config;
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => load_str(&file, &text, &mut config),
            Err(e) => config.errors.push(ConfigError {
                file,
                resource: "-".into(),
                field: "-".into(),
                message: format!("cannot read file: {e}"),
            }),
        }
    }
    config
}

/// Adds the resources of one multi-document YAML text to `config`.
pub fn load_str(file: &Path, text: &str, config: &mut Config) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let err = |resource: String, field: &str, message: String| ConfigError {
            file: file.to_path_buf(),
            resource,
            field: field.into(),
            message,
        };
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                config.errors.push(err(format!("document {}", i + 1), "-", e.to_string()));
                // A syntax error ends the stream: later documents cannot be located reliably.
                break;
            }
        };
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_owned();
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or_default()
            .to_owned();
        let resource =
            if kind.is_empty() { format!("document {}", i + 1) } else { format!("{kind}/{name}") };
        match kind.as_str() {
            "Namespace" => match parse_namespace(value) {
                Ok(ns) => {
                    config.namespaces.insert(ns.name.clone(), ns);
                }
                Err((field, message)) => config.errors.push(err(resource, &field, message)),
            },
            // Kinds served by later components are accepted and ignored here.
            "" => config.errors.push(err(resource, "kind", "missing".into())),
            _ => {}
        }
    }
}

fn parse_namespace(value: serde_yaml::Value) -> Result<Namespace, (String, String)> {
    let raw: RawNamespace =
        serde_yaml::from_value(value).map_err(|e| (field_of(&e.to_string()), e.to_string()))?;
    if raw.api_version != "v1" {
        return Err(("apiVersion".into(), format!("must be v1, not {:?}", raw.api_version)));
    }
    if !is_dns_label(&raw.metadata.name) {
        return Err((
            "metadata.name".into(),
            format!("{:?} is not a valid namespace name (RFC 1123 label)", raw.metadata.name),
        ));
    }
    if let Some(mode) = raw.metadata.labels.get(DATAPLANE_MODE_LABEL)
        && mode != DATAPLANE_MODE_AMBIENT
        && mode != "none"
    {
        return Err((
            format!("metadata.labels.{DATAPLANE_MODE_LABEL}"),
            format!("must be \"ambient\" or \"none\", not {mode:?}"),
        ));
    }
    Ok(Namespace { name: raw.metadata.name, labels: raw.metadata.labels })
}

/// Best-effort field name from a serde message such as "unknown field `foo`, expected ...".
fn field_of(message: &str) -> String {
    message.split('`').nth(1).map(str::to_owned).unwrap_or_else(|| "-".into())
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Namespace/{}", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Config {
        let mut c = Config::default();
        load_str(Path::new("ns.yaml"), text, &mut c);
        c
    }

    #[test]
    fn ambient_label_enrolls() {
        let c = load(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    sinew.io/dataplane-mode: ambient\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: plain\n",
        );
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        assert!(c.namespace_is_ambient("shop"));
        assert!(!c.namespace_is_ambient("plain"));
        assert!(!c.namespace_is_ambient("absent"));
    }

    #[test]
    fn bad_documents_are_named_and_the_rest_loads() {
        let c = load(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: Bad_Name\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: ok\n  colour: blue\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: good\n  labels:\n    sinew.io/dataplane-mode: sometimes\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: fine\n",
        );
        let fields: Vec<_> =
            c.errors.iter().map(|e| (e.resource.as_str(), e.field.as_str())).collect();
        assert_eq!(
            fields,
            [
                ("Namespace/Bad_Name", "metadata.name"),
                ("Namespace/ok", "colour"),
                ("Namespace/good", "metadata.labels.sinew.io/dataplane-mode"),
            ]
        );
        assert!(c.errors[0].to_string().starts_with("ns.yaml: Namespace/Bad_Name: metadata.name:"));
        assert_eq!(c.namespaces.keys().collect::<Vec<_>>(), ["fine"]);
    }

    #[test]
    fn syntax_error_names_the_file() {
        let c = load("kind: Namespace\nmetadata: [unclosed\n");
        assert_eq!(c.errors.len(), 1);
        assert_eq!(c.errors[0].resource, "document 1");
    }

    #[test]
    fn directory_loading_skips_other_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not yaml: [").unwrap();
        let c = load_dir(dir.path());
        assert!(c.errors.is_empty());
        assert!(c.namespaces.contains_key("a"));
        assert!(!load_dir(&dir.path().join("missing")).errors.is_empty());
    }
}
