//! Sinew's resource model, defined once for the control service, the node agent and the
//! waypoint: Kubernetes-shaped resources (apiVersion, kind, metadata, spec) with every field
//! validated.
//!
//! Kinds: `Namespace` (enrollment and waypoint labels), `Workload`, `Service`,
//! `AuthorizationPolicy`, `PeerAuthentication`, Gateway API v1 `HTTPRoute` and `GRPCRoute`, and
//! `DestinationPolicy` (load balancing, connection limits, outlier detection).
//!
//! [`parse_document`] turns one YAML document into a [`Resource`] or a list of
//! [`ConfigError`]s naming the file, the resource and each bad field (all of them, not just
//! the first). [`Store`] keeps the last good version of every resource across reloads of a
//! directory: a rejected resource never replaces a good one, and the rest of the batch applies.
#![forbid(unsafe_code)]

mod kinds;
mod store;
mod validate;

use std::{collections::BTreeMap, fmt, path::PathBuf};

pub use kinds::*;
use serde::{Deserialize, Serialize};
pub use store::{Rejected, Store, parse_document, parse_file};
pub use validate::{Duration, Port, is_dns_label, is_dns_subdomain};

/// The label that enrolls a namespace (or, on a Workload, that one pod), and its enrolling
/// value.
pub const DATAPLANE_MODE_LABEL: &str = "sinew.io/dataplane-mode";
/// The value of [`DATAPLANE_MODE_LABEL`] that enrolls (`none` excludes).
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// The label that sends a namespace's or service's traffic through a waypoint.
pub const USE_WAYPOINT_LABEL: &str = "sinew.io/use-waypoint";
/// Policies in this namespace apply mesh-wide (Istio's root namespace, renamed).
pub const ROOT_NAMESPACE: &str = "sinew-system";

/// One rejected file, resource or field, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {resource}: {field}: {message}", file = .file.display())]
pub struct ConfigError {
    /// The file the resource came from.
    pub file: PathBuf,
    /// `Kind/namespace/name`, `Kind/name` for cluster-scoped kinds, or `document N`.
    pub resource: String,
    /// The field path, such as `spec.rules[0].backendRefs[1].weight`, or `-`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// `metadata`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Name.
    pub name: String,
    /// Namespace (required for namespaced kinds, refused for cluster-scoped ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations (kept, not interpreted).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// When the object was created (RFC 3339, UTC, as the API server writes it): between
    /// routes of equal precedence the older wins (Gateway API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    // Fields the API server sets: accepted, so `kubectl get -o yaml` output loads, and
    // dropped.
    #[serde(default, skip_serializing)]
    uid: ServerSet,
    #[serde(default, skip_serializing)]
    resource_version: ServerSet,
    #[serde(default, skip_serializing)]
    generation: ServerSet,
    #[serde(default, skip_serializing)]
    managed_fields: ServerSet,
    #[serde(default, skip_serializing)]
    owner_references: ServerSet,
    #[serde(default, skip_serializing)]
    finalizers: ServerSet,
    #[serde(default, skip_serializing)]
    self_link: ServerSet,
}

/// A field the API server sets, accepted whatever its value and not kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerSet;

impl<'de> Deserialize<'de> for ServerSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| ServerSet)
    }
}

/// A resource of one kind: its metadata and its validated spec.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Object<S> {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: S,
}

/// What identifies a resource: kind, namespace (empty for cluster-scoped kinds), name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ResourceKey {
    /// Kind.
    pub kind: &'static str,
    /// Namespace, empty for cluster-scoped kinds.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind, self.name)
        } else {
            write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
        }
    }
}

macro_rules! resources {
    ($($variant:ident($spec:ty) = $kind:literal, $api:literal, $namespaced:literal;)*) => {
        /// Every resource kind Sinew reads.
        #[derive(Debug, Clone, PartialEq, Serialize)]
        #[serde(tag = "kind")]
        #[allow(clippy::large_enum_variant, reason = "resources are few and long-lived")]
        pub enum Resource {
            $(
                #[doc = concat!("`", $kind, "` (", $api, ").")]
                #[serde(rename = $kind)]
                $variant(Object<$spec>),
            )*
        }

        /// (kind, apiVersion, namespaced) of every kind.
        pub const KINDS: &[(&str, &str, bool)] = &[$(($kind, $api, $namespaced)),*];

        impl Resource {
            /// The resource's kind.
            pub fn kind(&self) -> &'static str {
                match self { $(Self::$variant(_) => $kind,)* }
            }

            /// The resource's metadata.
            pub fn metadata(&self) -> &ObjectMeta {
                match self { $(Self::$variant(o) => &o.metadata,)* }
            }
        }

        pub(crate) fn parse_kind(
            kind: &str,
            value: serde_yaml::Value,
        ) -> Option<Result<Resource, Vec<(String, String)>>> {
            match kind {
                $($kind => Some(store::typed::<$spec>(value).map(Resource::$variant)),)*
                _ => None,
            }
        }
    };
}

resources! {
    Namespace(NamespaceSpec) = "Namespace", "v1", false;
    Workload(WorkloadSpec) = "Workload", "sinew.io/v1alpha1", true;
    Service(ServiceSpec) = "Service", "v1", true;
    AuthorizationPolicy(AuthorizationPolicySpec) = "AuthorizationPolicy", "security.sinew.io/v1", true;
    PeerAuthentication(PeerAuthenticationSpec) = "PeerAuthentication", "security.sinew.io/v1", true;
    HttpRoute(HttpRouteSpec) = "HTTPRoute", "gateway.networking.k8s.io/v1", true;
    GrpcRoute(GrpcRouteSpec) = "GRPCRoute", "gateway.networking.k8s.io/v1", true;
    DestinationPolicy(DestinationPolicySpec) = "DestinationPolicy", "networking.sinew.io/v1alpha1", true;
    DestinationRule(DestinationRuleSpec) = "DestinationRule", "networking.istio.io/v1", true;
}

/// The largest resource, as JSON, that the model accepts (Kubernetes stores objects of up to
/// about 1.5 MiB): the control service slices its responses by size with this in mind.
pub const MAX_RESOURCE_BYTES: usize = 1024 * 1024;

impl Resource {
    /// The resource as Kubernetes-shaped JSON (apiVersion, kind, metadata, spec): what the
    /// control service sends and [`Resource::from_json`] reads back, validating again.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_value(self).expect("resources always serialize");
        let api = KINDS.iter().find(|k| k.0 == self.kind()).map(|k| k.1).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("apiVersion".into(), api.into());
        }
        serde_json::to_vec(&v).expect("JSON values always serialize")
    }

    /// Parses and validates a resource received as JSON; `source` names where it came from.
    pub fn from_json(source: &str, body: &[u8]) -> Result<Self, Vec<ConfigError>> {
        let value: serde_yaml::Value = serde_json::from_slice(body).map_err(|e| {
            vec![ConfigError {
                file: source.into(),
                resource: "-".into(),
                field: "-".into(),
                message: format!("not JSON: {e}"),
            }]
        })?;
        match store::parse_document(std::path::Path::new(source), 0, value) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(vec![ConfigError {
                file: source.into(),
                resource: "-".into(),
                field: "-".into(),
                message: "empty".into(),
            }]),
            Err(rejected) => Err(rejected.errors),
        }
    }

    /// The resource's identity.
    pub fn key(&self) -> ResourceKey {
        let m = self.metadata();
        ResourceKey {
            kind: self.kind(),
            namespace: m.namespace.clone().unwrap_or_default(),
            name: m.name.clone(),
        }
    }
}

/// A spec that checks its own fields. Each problem is `(field path below spec, message)`.
pub trait Validate: Sized {
    /// Every problem found, or none.
    fn validate(&self, errors: &mut validate::Errors);

    /// The spec of a document without one, or `None` when `spec` is required.
    fn empty() -> Option<Self> {
        None
    }

    /// Rewrites a valid spec in its one canonical form (run after [`Validate::validate`]),
    /// so that what the control service sends reads the same to a client of an earlier
    /// release. Nothing by default.
    fn normalize(&mut self) {}
}
