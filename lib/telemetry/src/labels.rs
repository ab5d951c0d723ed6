//! The workload and service labels Istio puts on its standard metrics (`istio_tcp_*` from
//! ztunnel, `istio_requests_total` and friends from waypoints), shared by the agent's and the
//! waypoint's label sets (flattened into them), so Kiali and Istio's dashboards read Sinew's
//! series as they read Istio's.

use prometheus_client::encoding::EncodeLabelSet;
use sinew_mesh::{ServiceInfo, WorkloadInfo};

/// Istio's cluster id when none is configured.
pub const CLUSTER: &str = "Kubernetes";

const UNKNOWN: &str = "unknown";

/// The `source_*` labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SourceLabels {
    /// Workload name.
    pub source_workload: String,
    /// Workload namespace.
    pub source_workload_namespace: String,
    /// `spiffe://...`, or `unknown` (plaintext).
    pub source_principal: String,
    /// `app` label.
    pub source_app: String,
    /// `version` label.
    pub source_version: String,
    /// Canonical service.
    pub source_canonical_service: String,
    /// Canonical revision.
    pub source_canonical_revision: String,
    /// Cluster id.
    pub source_cluster: String,
}

/// The `destination_*` labels, service ones included.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DestinationLabels {
    /// Workload name.
    pub destination_workload: String,
    /// Workload namespace.
    pub destination_workload_namespace: String,
    /// `spiffe://...`, or `unknown`.
    pub destination_principal: String,
    /// `app` label.
    pub destination_app: String,
    /// `version` label.
    pub destination_version: String,
    /// The service's hostname (`<name>.<namespace>.svc.cluster.local`), or `unknown`.
    pub destination_service: String,
    /// The service's name.
    pub destination_service_name: String,
    /// The service's namespace.
    pub destination_service_namespace: String,
    /// Canonical service.
    pub destination_canonical_service: String,
    /// Canonical revision.
    pub destination_canonical_revision: String,
    /// Cluster id.
    pub destination_cluster: String,
}

/// One side's workload values: from its Workload when known, else its namespace (if that
/// much is known) and `unknown` for the rest.
struct Side {
    workload: String,
    namespace: String,
    principal: String,
    app: String,
    version: String,
    canonical_service: String,
    canonical_revision: String,
    cluster: String,
}

impl Side {
    fn of(
        workload: Option<&WorkloadInfo>,
        namespace: Option<&str>,
        principal: Option<String>,
    ) -> Self {
        let unknown = || UNKNOWN.to_owned();
        let namespace = namespace
            .map(str::to_owned)
            .or_else(|| workload.map(|w| w.namespace.clone()))
            .unwrap_or_else(unknown);
        let principal = principal.unwrap_or_else(unknown);
        match workload {
            Some(w) => Self {
                workload: w.name.clone(),
                namespace,
                principal,
                app: w.app().to_owned(),
                version: w.version().to_owned(),
                canonical_service: w.canonical_service().to_owned(),
                canonical_revision: w.canonical_revision().to_owned(),
                cluster: CLUSTER.to_owned(),
            },
            None => Self {
                workload: unknown(),
                namespace,
                principal,
                app: unknown(),
                version: unknown(),
                canonical_service: unknown(),
                canonical_revision: unknown(),
                cluster: unknown(),
            },
        }
    }
}

impl SourceLabels {
    /// The source `workload` (if known), its `namespace` (defaults to the workload's) and
    /// `principal` (`None`: plaintext).
    pub fn new(
        workload: Option<&WorkloadInfo>,
        namespace: Option<&str>,
        principal: Option<String>,
    ) -> Self {
        let s = Side::of(workload, namespace, principal);
        Self {
            source_workload: s.workload,
            source_workload_namespace: s.namespace,
            source_principal: s.principal,
            source_app: s.app,
            source_version: s.version,
            source_canonical_service: s.canonical_service,
            source_canonical_revision: s.canonical_revision,
            source_cluster: s.cluster,
        }
    }
}

impl DestinationLabels {
    /// The destination `workload` (if known), its `namespace` and `principal`, and the
    /// `service` addressed (if any).
    pub fn new(
        workload: Option<&WorkloadInfo>,
        namespace: Option<&str>,
        principal: Option<String>,
        service: Option<&ServiceInfo>,
    ) -> Self {
        let s = Side::of(workload, namespace, principal);
        let unknown = || UNKNOWN.to_owned();
        Self {
            destination_workload: s.workload,
            destination_workload_namespace: s.namespace,
            destination_principal: s.principal,
            destination_app: s.app,
            destination_version: s.version,
            destination_service: service.map_or_else(unknown, ServiceInfo::hostname),
            destination_service_name: service.map_or_else(unknown, |s| s.name.clone()),
            destination_service_namespace: service.map_or_else(unknown, |s| s.namespace.clone()),
            destination_canonical_service: s.canonical_service,
            destination_canonical_revision: s.canonical_revision,
            destination_cluster: s.cluster,
        }
    }
}
