//! MeshIndex: look-ups by address and name, endpoints, enrollment and waypoints.

mod common;

use std::{net::IpAddr, sync::Arc};

use common::{namespace, resources};
use sinew_mesh::{MeshIndex, WorkloadInfo};

fn workload(ns: &str, name: &str, sa: &str, ips: &str, labels: &str) -> String {
    format!(
        "apiVersion: sinew.io/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {ns}, \
         labels: {{{labels}}}}}\nspec: {{serviceAccount: {sa}, node: node-1, ips: [{ips}]}}\n---\n"
    )
}

fn service(ns: &str, name: &str, labels: &str, vips: &str, selector: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}, labels: \
         {{{labels}}}}}\nspec:\n  clusterIPs: [{vips}]\n  selector: {{{selector}}}\n  ports:\n  \
         - {{name: http, port: 80, targetPort: 8080}}\n  - {{port: 443}}\n---\n"
    )
}

fn index(yaml: &str) -> MeshIndex {
    MeshIndex::build(&resources(yaml))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn names(list: &[Arc<WorkloadInfo>]) -> Vec<String> {
    list.iter().map(|w| w.key()).collect()
}

/// The fixture most tests share: an enrolled `shop` with a waypoint, an unenrolled `other`.
fn shop() -> MeshIndex {
    let yaml = [
        namespace("shop", "sinew.io/dataplane-mode: ambient, sinew.io/use-waypoint: shop-wp"),
        namespace("other", "sinew.io/dataplane-mode: none"),
        workload("shop", "web-1", "web", "10.0.0.1, \"2001:db8::1\"", "app: web, tier: front"),
        workload("shop", "web-2", "web", "10.0.0.2", "app: web"),
        workload("shop", "db-1", "db", "10.0.0.3", "app: db"),
        workload("other", "web-9", "web", "10.0.9.1", "app: web"),
        workload("nowhere", "lone", "default", "10.0.7.7", ""),
        service("shop", "web", "", "10.96.0.10, \"fd00::10\"", "app: web"),
        service("shop", "pinned", "sinew.io/use-waypoint: special", "10.96.0.11", "app: db"),
        service("shop", "bare", "", "10.96.0.12", ""),
        service("other", "web", "", "10.96.1.10", "app: web"),
    ]
    .concat();
    index(&yaml)
}

#[test]
fn workload_by_ip_v4_v6_and_mapped() {
    let idx = shop();
    let w = idx.workload_by_ip(ip("10.0.0.1")).expect("v4");
    assert_eq!(w.key(), "shop/web-1");
    assert_eq!(w.service_account, "web");
    assert_eq!(w.node, "node-1");
    assert_eq!(
        idx.workload_by_ip(ip("2001:db8::1")).map(|w| w.key()).as_deref(),
        Some("shop/web-1")
    );
    assert_eq!(
        idx.workload_by_ip(ip("::ffff:10.0.0.2")).map(|w| w.key()).as_deref(),
        Some("shop/web-2")
    );
    assert!(idx.workload_by_ip(ip("10.0.0.99")).is_none());
    assert!(Arc::ptr_eq(idx.workload("shop", "web-1").unwrap(), w));
    assert!(idx.workload("shop", "nope").is_none() && idx.workload("nope", "web-1").is_none());
    let all: Vec<String> = idx.workloads().map(|w| w.key()).collect();
    assert_eq!(all, ["nowhere/lone", "other/web-9", "shop/db-1", "shop/web-1", "shop/web-2"]);
}

#[test]
fn mapped_workload_address_is_found_by_v4() {
    let idx = index(&workload("shop", "m", "web", "\"::ffff:10.1.1.1\"", ""));
    assert_eq!(idx.workload_by_ip(ip("10.1.1.1")).map(|w| w.key()).as_deref(), Some("shop/m"));
    assert_eq!(idx.workload("shop", "m").unwrap().ips, [ip("::ffff:10.1.1.1")]);
}

#[test]
fn duplicate_ip_goes_to_first_by_key_whatever_the_order() {
    let b = workload("shop", "b", "web", "10.0.0.5", "");
    let a = workload("shop", "a", "web", "10.0.0.5, 10.0.0.6", "");
    for yaml in [format!("{b}{a}"), format!("{a}{b}")] {
        let idx = index(&yaml);
        assert_eq!(idx.workload_by_ip(ip("10.0.0.5")).unwrap().name, "a");
        assert!(idx.workload("shop", "b").is_some(), "the loser is still indexed by name");
    }
}

#[test]
fn service_by_vip_and_target_port() {
    let idx = shop();
    let svc = idx.service_by_vip(ip("10.96.0.10")).expect("v4 vip");
    assert_eq!((svc.namespace.as_str(), svc.name.as_str()), ("shop", "web"));
    assert!(Arc::ptr_eq(idx.service_by_vip(ip("fd00::10")).unwrap(), svc));
    assert!(Arc::ptr_eq(idx.service_by_vip(ip("::ffff:10.96.0.10")).unwrap(), svc));
    assert!(idx.service_by_vip(ip("10.0.0.1")).is_none(), "a workload address is no VIP");
    assert_eq!(svc.target_port(80), Some(8080));
    assert_eq!(svc.target_port(443), Some(443));
    assert_eq!(svc.target_port(8080), None);
    assert_eq!(idx.service("other", "web").unwrap().vips, [ip("10.96.1.10")]);
    assert_eq!(idx.services().count(), 4);
}

#[test]
fn endpoints_by_selector_within_the_namespace() {
    let idx = shop();
    let web = idx.service("shop", "web").unwrap();
    assert_eq!(names(&web.endpoints), ["shop/web-1", "shop/web-2"], "other/web-9 excluded");
    assert_eq!(names(&idx.service("other", "web").unwrap().endpoints), ["other/web-9"]);
    assert_eq!(names(&idx.service("shop", "pinned").unwrap().endpoints), ["shop/db-1"]);
    assert!(idx.service("shop", "bare").unwrap().endpoints.is_empty(), "empty selector");
    let two_labels = index(
        &[
            workload("shop", "a", "web", "10.0.0.1", "app: web, tier: front"),
            workload("shop", "b", "web", "10.0.0.2", "app: web"),
            service("shop", "front", "", "10.96.0.1", "app: web, tier: front"),
        ]
        .concat(),
    );
    assert_eq!(names(&two_labels.service("shop", "front").unwrap().endpoints), ["shop/a"]);
}

#[test]
fn a_workload_label_enrolls_or_excludes_one_pod() {
    let idx = index(
        &[
            namespace("shop", "sinew.io/dataplane-mode: ambient"),
            namespace("other", ""),
            workload("shop", "db-1", "db", "10.0.0.3", "sinew.io/dataplane-mode: none"),
            workload("shop", "web-1", "web", "10.0.0.1", ""),
            workload("other", "web-9", "web", "10.0.9.1", "sinew.io/dataplane-mode: ambient"),
            workload("other", "web-8", "web", "10.0.9.2", ""),
        ]
        .concat(),
    );
    // Out of an ambient namespace, into one that is not; the rest follow their namespace.
    assert!(
        !idx.workload("shop", "db-1").unwrap().in_mesh && !idx.pod_in_mesh("shop", "db-1", &[])
    );
    assert!(
        idx.workload("other", "web-9").unwrap().in_mesh && idx.pod_in_mesh("other", "web-9", &[])
    );
    assert!(
        idx.workload("shop", "web-1").unwrap().in_mesh && idx.pod_in_mesh("shop", "web-1", &[])
    );
    assert!(!idx.workload("other", "web-8").unwrap().in_mesh);
    assert!(!idx.pod_in_mesh("other", "web-8", &[]));
    // A pod with no Workload (yet): its namespace decides.
    assert!(idx.pod_in_mesh("shop", "new", &[]) && !idx.pod_in_mesh("other", "new", &[]));
    // A pod named otherwise than its Workload: found at its address, in its namespace only.
    assert!(!idx.pod_in_mesh("shop", "db-1-abc", &[ip("10.0.0.3")]));
    assert!(idx.pod_in_mesh("other", "x", &[ip("10.0.9.1")]));
    assert!(idx.pod_in_mesh("shop", "x", &[ip("10.0.9.1")]), "another namespace's Workload");
}

#[test]
fn in_mesh_from_the_namespace_label() {
    let idx = shop();
    assert!(idx.workload("shop", "web-1").unwrap().in_mesh);
    assert!(!idx.workload("other", "web-9").unwrap().in_mesh, "dataplane-mode: none");
    assert!(!idx.workload("nowhere", "lone").unwrap().in_mesh, "no Namespace resource");
    assert!(idx.namespace_is_ambient("shop"));
    assert!(!idx.namespace_is_ambient("other") && !idx.namespace_is_ambient("nowhere"));
}

#[test]
fn waypoint_from_namespace_and_service_labels() {
    let idx = shop();
    assert_eq!(idx.workload("shop", "web-1").unwrap().waypoint.as_deref(), Some("shop-wp"));
    assert_eq!(idx.workload("other", "web-9").unwrap().waypoint, None);
    assert_eq!(idx.service("shop", "web").unwrap().waypoint.as_deref(), Some("shop-wp"));
    assert_eq!(idx.service("shop", "pinned").unwrap().waypoint.as_deref(), Some("special"));
    assert_eq!(idx.service("other", "web").unwrap().waypoint, None);
}

#[test]
fn identity_key_and_policies() {
    let policy = "apiVersion: security.sinew.io/v1\nkind: AuthorizationPolicy\nmetadata: \
                  {name: deny-all, namespace: shop}\nspec: {action: DENY, rules: [{}]}\n";
    let idx =
        index(&[workload("shop", "web-1", "web", "10.0.0.1", ""), policy.to_owned()].concat());
    let w = idx.workload("shop", "web-1").unwrap();
    assert_eq!(w.key(), "shop/web-1");
    let id = w.identity("cluster.local").unwrap();
    assert_eq!(id.principal(), "cluster.local/ns/shop/sa/web");
    assert!(w.identity("Not A Domain").is_err());
    assert!(!idx.authz().is_empty());
    let empty = MeshIndex::default();
    assert!(empty.authz().is_empty() && empty.workloads().next().is_none());
    assert!(empty.workload_by_ip(ip("10.0.0.1")).is_none());
}

#[test]
fn only_the_waypoint_of_a_service_the_destination_serves_counts_as_its_waypoint() {
    let yaml = [
        namespace("shop", "sinew.io/dataplane-mode: ambient, sinew.io/use-waypoint: shop-wp"),
        namespace("other", "sinew.io/dataplane-mode: ambient"),
        workload("shop", "shop-wp", "waypoint", "10.0.0.50", ""),
        workload("shop", "web-1", "web", "10.0.0.1", "app: web"),
        workload("shop", "lonely", "lonely", "10.0.0.9", "app: none"),
        workload("other", "db-1", "db", "10.0.9.1", "app: db"),
        // A workload of `other` labels a service of its own to name itself as waypoint.
        workload("other", "fake-wp", "fake", "10.0.9.50", "app: fake"),
        service("shop", "web", "", "10.96.0.10", "app: web"),
        service("other", "mine", "sinew.io/use-waypoint: fake-wp", "10.96.1.11", "app: fake"),
        service("other", "db", "", "10.96.1.10", "app: db"),
    ]
    .concat();
    let idx = index(&yaml);
    let id = |s: &str| -> sinew_identity::SpiffeId { s.parse().unwrap() };
    let real = id("spiffe://cluster.local/ns/shop/sa/waypoint");
    let fake = id("spiffe://cluster.local/ns/other/sa/fake");
    // shop's waypoint speaks for clients of shop/web's endpoints, IPv4-mapped forms included.
    assert!(idx.is_waypoint_for(&real, ip("10.0.0.50"), "cluster.local", ip("10.0.0.1")));
    assert!(idx.is_waypoint_for(&real, ip("10.0.0.50"), "cluster.local", ip("::ffff:10.0.0.1")));
    // Not for a pod no service of its selects, nor across namespaces, nor in another domain.
    assert!(!idx.is_waypoint_for(&real, ip("10.0.0.50"), "cluster.local", ip("10.0.0.9")));
    assert!(!idx.is_waypoint_for(&real, ip("10.0.0.50"), "cluster.local", ip("10.0.9.1")));
    assert!(!idx.is_waypoint_for(&real, ip("10.0.0.50"), "other.domain", ip("10.0.0.1")));
    // The self-declared waypoint only for its own service's endpoints (itself), never for
    // shop's pods or its namespace's other services.
    assert!(!idx.is_waypoint_for(&fake, ip("10.0.9.50"), "cluster.local", ip("10.0.0.1")));
    assert!(!idx.is_waypoint_for(&fake, ip("10.0.9.50"), "cluster.local", ip("10.0.9.1")));
    assert!(idx.is_waypoint_for(&fake, ip("10.0.9.50"), "cluster.local", ip("10.0.9.50")));
    // The waypoint's identity from another address (a workload sharing its service
    // account) does not count; its own address in IPv4-mapped form does.
    assert!(!idx.is_waypoint_for(&real, ip("10.0.0.1"), "cluster.local", ip("10.0.0.1")));
    assert!(idx.is_waypoint_for(&real, ip("::ffff:10.0.0.50"), "cluster.local", ip("10.0.0.1")));
}

#[test]
fn istio_workload_and_service_names_for_metrics() {
    let idx = index(
        &[
            workload("shop", "web-1", "web", "10.0.0.1", "app: web, version: v2"),
            workload(
                "shop",
                "api-1",
                "api",
                "10.0.0.2",
                "app: api, app.kubernetes.io/name: api-k8s, service.istio.io/canonical-revision: r7",
            ),
            workload("shop", "bare-1", "bare", "10.0.0.3", ""),
            service("shop", "web", "", "10.96.0.10", "app: web"),
        ]
        .concat(),
    );
    let w = |i| idx.workload_by_ip(ip(i)).expect("workload");
    let web = w("10.0.0.1");
    assert_eq!((web.app(), web.version()), ("web", "v2"));
    assert_eq!((web.canonical_service(), web.canonical_revision()), ("web", "v2"));
    let api = w("10.0.0.2");
    assert_eq!((api.canonical_service(), api.canonical_revision()), ("api-k8s", "r7"));
    let bare = w("10.0.0.3");
    assert_eq!((bare.app(), bare.version()), ("unknown", "unknown"));
    assert_eq!((bare.canonical_service(), bare.canonical_revision()), ("bare-1", "latest"));
    let svc = idx.service_by_vip(ip("10.96.0.10")).expect("service");
    assert_eq!(svc.hostname(), "web.shop.svc.cluster.local");
    // Inbound, the service is guessed from the endpoint and its target port (8080 behind 80).
    assert_eq!(idx.service_of_endpoint(web, 8080).map(|s| s.name.as_str()), Some("web"));
    assert!(idx.service_of_endpoint(web, 9999).is_none());
    assert!(idx.service_of_endpoint(bare, 8080).is_none());
}

#[test]
fn policies_attached_to_nothing_with_a_waypoint_are_reported() {
    let policy = |ns: &str, name: &str, target: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: \
             {name}, namespace: {ns}}}\nspec: {{targetRefs: [{target}], action: DENY, rules: \
             [{{}}]}}\n---\n"
        )
    };
    let yaml = [
        namespace("shop", "sinew.io/dataplane-mode: ambient"),
        service("shop", "web", "sinew.io/use-waypoint: wp", "198.18.200.1", "app: web"),
        service("shop", "db", "", "198.18.200.2", "app: db"),
        policy("shop", "on-web", "{kind: Service, name: web}"),
        policy("shop", "on-db", "{kind: Service, name: db}"),
        policy("shop", "on-nothing", "{kind: Service, name: gone}"),
        policy("shop", "on-wp", "{kind: Gateway, name: wp}"),
        policy("shop", "on-other-wp", "{kind: Gateway, name: other}"),
        // One bound target is enough.
        policy("shop", "on-both", "{kind: Service, name: db}, {kind: Service, name: web}"),
    ]
    .concat();
    let unbound = index(&yaml).unbound_policies(true);
    let named: Vec<&str> =
        unbound.iter().map(|m| m.split_whitespace().nth(1).unwrap_or_default()).collect();
    assert_eq!(named, ["shop/on-db", "shop/on-nothing", "shop/on-other-wp"], "{unbound:?}");
    assert!(unbound[0].contains("enforced nowhere"), "{}", unbound[0]);
    // Without control no waypoint runs: every attached policy is enforced nowhere.
    assert_eq!(index(&yaml).unbound_policies(false).len(), 6);
}
