//! Workloads and services indexed by name and address, with what their namespace says about
//! enrollment and waypoints.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use sinew_identity::{SpiffeId, SpiffeIdError};
use sinew_model::{
    DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, NamespaceSpec, Object, Resource, ServicePort,
    ServiceSpec, USE_WAYPOINT_LABEL, WorkloadSpec,
};

use crate::{Authz, ns_name, sorted};

/// A workload (pod or VM) as the data plane needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The service account its identity is issued for.
    pub service_account: String,
    /// The node it runs on.
    pub node: String,
    /// Its addresses, as configured.
    pub ips: Vec<IpAddr>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// In the mesh: its own `sinew.io/dataplane-mode` label (`ambient` or `none`, as Istio
    /// enrolls or excludes a single pod) or, without one, its namespace's.
    pub in_mesh: bool,
    /// `sinew.io/use-waypoint` of its namespace, if any (an empty value counts as none).
    pub waypoint: Option<String>,
}

impl WorkloadInfo {
    /// Its SPIFFE id in `trust_domain`.
    pub fn identity(&self, trust_domain: &str) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::new(trust_domain, &self.namespace, &self.service_account)
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn label(&self, keys: &[&str]) -> Option<&str> {
        keys.iter().find_map(|k| self.labels.get(*k)).map(String::as_str)
    }

    /// Its `app` label, as Istio's metrics report it (`unknown` when absent).
    pub fn app(&self) -> &str {
        self.label(&["app"]).unwrap_or("unknown")
    }

    /// Its `version` label, as Istio's metrics report it (`unknown` when absent).
    pub fn version(&self) -> &str {
        self.label(&["version"]).unwrap_or("unknown")
    }

    /// Istio's canonical service: `service.istio.io/canonical-name`, else
    /// `app.kubernetes.io/name`, else `app`, else the workload's name.
    pub fn canonical_service(&self) -> &str {
        self.label(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"])
            .unwrap_or(&self.name)
    }

    /// Istio's canonical revision: `service.istio.io/canonical-revision`, else
    /// `app.kubernetes.io/version`, else `version`, else `latest`.
    pub fn canonical_revision(&self) -> &str {
        self.label(&["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"])
            .unwrap_or("latest")
    }
}

/// A service as the data plane needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Its virtual IPs, as configured (empty: headless).
    pub vips: Vec<IpAddr>,
    /// Its ports.
    pub ports: Vec<ServicePort>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its own `sinew.io/use-waypoint` label, else its namespace's (an empty value counts as
    /// none).
    pub waypoint: Option<String>,
    /// The workloads of its namespace whose labels contain every selector label, by name (an
    /// empty selector selects none).
    pub endpoints: Vec<Arc<WorkloadInfo>>,
}

/// The DNS suffix of service hostnames (Kubernetes' default cluster domain), as Istio's
/// `destination_service` label carries them.
pub const SERVICE_DOMAIN: &str = "svc.cluster.local";

impl ServiceInfo {
    /// `<name>.<namespace>.svc.cluster.local`.
    pub fn hostname(&self) -> String {
        format!("{}.{}.{SERVICE_DOMAIN}", self.name, self.namespace)
    }

    /// The workload port behind service port `port` (its `targetPort`, else `port` itself);
    /// `None` when the service has no such port.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports.iter().find(|p| p.port.0 == port).map(|p| p.target_port.unwrap_or(p.port).0)
    }

    /// Whether service port `port` is declared plain TCP: `appProtocol: tcp`, or a port named
    /// `tcp` or `tcp-*` (Istio's naming convention). A waypoint passes such ports through
    /// unparsed and authorizes them at L4.
    pub fn is_tcp_port(&self, port: u16) -> bool {
        self.ports.iter().filter(|p| p.port.0 == port).any(|p| {
            p.app_protocol.as_deref().is_some_and(|a| a.eq_ignore_ascii_case("tcp"))
                || p.name.as_deref().is_some_and(|n| n == "tcp" || n.starts_with("tcp-"))
        })
    }
}

/// What a Namespace resource says.
#[derive(Debug, Clone, Default)]
struct NamespaceInfo {
    ambient: bool,
    waypoint: Option<String>,
}

/// Workloads, services and policies, built once per configuration change and queried per
/// connection. The default is empty.
///
/// Where two objects conflict, the first in `(namespace, name)` order wins, whatever order the
/// resources came in: two workloads claiming one IP leave it to the first; two services
/// claiming one VIP likewise. Addresses are indexed canonically (an IPv4-mapped IPv6 address
/// as IPv4), and looked up the same way.
#[derive(Debug, Clone, Default)]
pub struct MeshIndex {
    /// namespace -> name -> workload.
    workloads: BTreeMap<String, BTreeMap<String, Arc<WorkloadInfo>>>,
    by_ip: HashMap<IpAddr, Arc<WorkloadInfo>>,
    /// namespace -> name -> service.
    services: BTreeMap<String, BTreeMap<String, Arc<ServiceInfo>>>,
    by_vip: HashMap<IpAddr, Arc<ServiceInfo>>,
    /// `namespace/name` of a workload -> the services it is an endpoint of, in name order.
    services_of: HashMap<String, Vec<Arc<ServiceInfo>>>,
    ambient: HashSet<String>,
    authz: Authz,
}

/// `sinew.io/use-waypoint` from a label map, empty meaning none.
fn waypoint_label(labels: &BTreeMap<String, String>) -> Option<String> {
    labels.get(USE_WAYPOINT_LABEL).filter(|w| !w.is_empty()).cloned()
}

impl MeshIndex {
    /// Indexes `resources` (validated ones; anything else is indexed as well as it can be,
    /// never refused). Of two resources with the same kind, namespace and name, the first is
    /// kept.
    pub fn build<'a>(resources: impl IntoIterator<Item = &'a Resource>) -> Self {
        let (mut namespaces, mut workloads, mut services) = (Vec::new(), Vec::new(), Vec::new());
        let (mut policies, mut peers) = (Vec::new(), Vec::new());
        for r in resources {
            match r {
                Resource::Namespace(o) => namespaces.push(o),
                Resource::Workload(o) => workloads.push(o),
                Resource::Service(o) => services.push(o),
                Resource::AuthorizationPolicy(o) => policies.push(o),
                Resource::PeerAuthentication(o) => peers.push(o),
                _ => {}
            }
        }
        let namespaces = namespace_infos(namespaces);
        let mut index = Self {
            ambient: namespaces.iter().filter(|(_, n)| n.ambient).map(|(k, _)| k.clone()).collect(),
            authz: Authz::from_objects(policies, peers),
            ..Self::default()
        };
        for w in sorted(workloads) {
            let info = Arc::new(workload_info(w, &namespaces));
            for ip in &info.ips {
                index.by_ip.entry(ip.to_canonical()).or_insert_with(|| info.clone());
            }
            let by_name = index.workloads.entry(info.namespace.clone()).or_default();
            by_name.insert(info.name.clone(), info);
        }
        for s in sorted(services) {
            let info = Arc::new(index.service_info(s, &namespaces));
            for ip in &info.vips {
                index.by_vip.entry(ip.to_canonical()).or_insert_with(|| info.clone());
            }
            for e in &info.endpoints {
                index.services_of.entry(e.key()).or_default().push(info.clone());
            }
            let by_name = index.services.entry(info.namespace.clone()).or_default();
            by_name.insert(info.name.clone(), info);
        }
        index
    }

    fn service_info(
        &self,
        s: &Object<ServiceSpec>,
        namespaces: &HashMap<String, NamespaceInfo>,
    ) -> ServiceInfo {
        let (ns, name) = ns_name(s);
        let selector = &s.spec.selector;
        let endpoints = match self.workloads.get(ns) {
            Some(workloads) if !selector.is_empty() => workloads
                .values()
                .filter(|w| selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        ServiceInfo {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            vips: s.spec.cluster_ips.clone(),
            ports: s.spec.ports.clone(),
            labels: s.metadata.labels.clone(),
            waypoint: waypoint_label(&s.metadata.labels)
                .or_else(|| namespaces.get(ns).and_then(|n| n.waypoint.clone())),
            endpoints,
        }
    }

    /// The workload that holds `ip`.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<WorkloadInfo>> {
        self.by_ip.get(&ip.to_canonical())
    }

    /// A workload by namespace and name.
    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Arc<WorkloadInfo>> {
        self.workloads.get(namespace)?.get(name)
    }

    /// Every workload, in `(namespace, name)` order.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<WorkloadInfo>> {
        self.workloads.values().flat_map(BTreeMap::values)
    }

    /// The service that holds virtual IP `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<ServiceInfo>> {
        self.by_vip.get(&ip.to_canonical())
    }

    /// A service by namespace and name.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<ServiceInfo>> {
        self.services.get(namespace)?.get(name)
    }

    /// The service a connection arriving at `workload` on `port` most likely came through
    /// (ztunnel's inbound guess): the first of its namespace, in name order, that has the
    /// workload as an endpoint and a port whose target is `port`.
    pub fn service_of_endpoint(
        &self,
        workload: &WorkloadInfo,
        port: u16,
    ) -> Option<&Arc<ServiceInfo>> {
        self.services_of
            .get(&workload.key())?
            .iter()
            .find(|s| s.ports.iter().any(|p| p.target_port.unwrap_or(p.port).0 == port))
    }

    /// Every service, in `(namespace, name)` order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceInfo>> {
        self.services.values().flat_map(BTreeMap::values)
    }

    /// Whether `peer` is the waypoint of a service that workload address `destination` serves:
    /// the workload the service's `sinew.io/use-waypoint` names, in the service's namespace.
    /// Only such a peer may name the original client of what it forwards there, so a workload
    /// cannot speak for others by labelling some service of its own.
    pub fn is_waypoint_for(
        &self,
        peer: &SpiffeId,
        peer_ip: IpAddr,
        trust_domain: &str,
        destination: IpAddr,
    ) -> bool {
        let peer_ip = peer_ip.to_canonical();
        // Services select workloads of their own namespace, and name a waypoint there: only
        // the destination's namespace is searched (this runs for each tunnel a waypoint opens).
        let Some(dest) = self.workload_by_ip(destination) else { return false };
        if peer.namespace != dest.namespace {
            return false;
        }
        let Some(services) = self.services.get(&dest.namespace) else { return false };
        services.values().any(|s| {
            s.endpoints.iter().any(|e| Arc::ptr_eq(e, dest))
                && s.waypoint
                    .as_deref()
                    .and_then(|w| self.workload(&s.namespace, w))
                    // The connection must come from the waypoint's own address too: another
                    // workload that shares its service account has its identity, not its IP.
                    .filter(|w| w.ips.iter().any(|ip| ip.to_canonical() == peer_ip))
                    .and_then(|w| w.identity(trust_domain).ok())
                    .is_some_and(|id| id == *peer)
        })
    }

    /// True when namespace `ns` exists and is labelled `sinew.io/dataplane-mode=ambient`.
    pub fn namespace_is_ambient(&self, ns: &str) -> bool {
        self.ambient.contains(ns)
    }

    /// Whether pod `name` of namespace `ns`, at `ips`, is to be captured: its Workload's own
    /// `sinew.io/dataplane-mode` label decides (`ambient` enrolls it in a namespace that is
    /// not, `none` keeps it out of one that is, as Istio's pod label does), else its
    /// namespace's. The Workload is [`Self::pod_workload`]'s.
    pub fn pod_in_mesh(&self, ns: &str, name: &str, ips: &[IpAddr]) -> bool {
        self.pod_workload(ns, name, ips)
            .and_then(|w| dataplane_mode(&w.labels))
            .unwrap_or_else(|| self.namespace_is_ambient(ns))
    }

    /// The Workload of pod `name` of namespace `ns`, at `ips`: its namesake, or else the one
    /// of its namespace at one of its addresses, which is how peers find it (so that the
    /// tunnel they choose toward it, by [`WorkloadInfo::in_mesh`], and its capture agree).
    pub fn pod_workload(&self, ns: &str, name: &str, ips: &[IpAddr]) -> Option<&Arc<WorkloadInfo>> {
        self.workload(ns, name).or_else(|| {
            ips.iter().filter_map(|ip| self.workload_by_ip(*ip)).find(|w| w.namespace == ns)
        })
    }

    /// The authorization policies and peer authentications.
    pub fn authz(&self) -> &Authz {
        &self.authz
    }

    /// The policies with `targetRefs` that nothing enforces, each with why (see
    /// [`Authz::unbound_policies`]); with `waypoints` false (an agent without control, where no
    /// waypoint runs), every one.
    pub fn unbound_policies(&self, waypoints: bool) -> Vec<String> {
        if !waypoints {
            return self
                .authz
                .targeted_policies()
                .map(|key| {
                    format!(
                        "AuthorizationPolicy {key} is enforced nowhere: it is attached with \
                         targetRefs, which only a waypoint enforces, and an agent without \
                         control runs with none"
                    )
                })
                .collect();
        }
        let services: Vec<&ServiceInfo> = self.services().map(|s| &**s).collect();
        self.authz.unbound_policies(&services)
    }
}

fn namespace_infos(namespaces: Vec<&Object<NamespaceSpec>>) -> HashMap<String, NamespaceInfo> {
    sorted(namespaces)
        .into_iter()
        .map(|n| {
            let labels = &n.metadata.labels;
            let info = NamespaceInfo {
                ambient: labels.get(DATAPLANE_MODE_LABEL).map(String::as_str)
                    == Some(DATAPLANE_MODE_AMBIENT),
                waypoint: waypoint_label(labels),
            };
            (n.metadata.name.clone(), info)
        })
        .collect()
}

/// A workload's own choice, when its labels make one: `ambient` in, anything else (`none`,
/// the one other value validation admits) out.
fn dataplane_mode(labels: &BTreeMap<String, String>) -> Option<bool> {
    labels.get(DATAPLANE_MODE_LABEL).map(|m| m == DATAPLANE_MODE_AMBIENT)
}

fn workload_info(
    w: &Object<WorkloadSpec>,
    namespaces: &HashMap<String, NamespaceInfo>,
) -> WorkloadInfo {
    let (ns, name) = ns_name(w);
    let ns_info = namespaces.get(ns);
    WorkloadInfo {
        namespace: ns.to_owned(),
        name: name.to_owned(),
        service_account: w.spec.service_account.clone(),
        node: w.spec.node.clone(),
        ips: w.spec.ips.clone(),
        labels: w.metadata.labels.clone(),
        in_mesh: dataplane_mode(&w.metadata.labels).unwrap_or(ns_info.is_some_and(|n| n.ambient)),
        waypoint: ns_info.and_then(|n| n.waypoint.clone()),
    }
}
