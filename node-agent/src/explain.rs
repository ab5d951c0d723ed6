//! "Why may (or may not) this source reach that destination?", for the admin API and the
//! `sinew explain` command: the same evaluation the data path runs, with every policy shown.

use std::net::{IpAddr, SocketAddr};

use serde_json::{Value, json};
use sinew_mesh::{Destination, HttpRequest, MeshIndex, Source, Target};
use sinew_model::MtlsMode;

/// The HTTP request to explain a waypoint's policies for, each part as given.
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestSpec<'a> {
    /// Method; `GET` when not given.
    pub method: Option<&'a str>,
    /// Path; `/` when not given.
    pub path: Option<&'a str>,
    /// Host (`Host` or `:authority`, as sent); the service's hostname when not given.
    pub host: Option<&'a str>,
    /// Other headers, each `Name: value`.
    pub headers: &'a [String],
}

/// `Name: value` lines as a header map; the error names the line at fault.
fn header_map(lines: &[String]) -> Result<http::HeaderMap, String> {
    let mut map = http::HeaderMap::new();
    for line in lines {
        let bad = |why: &str| format!("header {line:?}: {why}");
        let (name, value) = line.split_once(':').ok_or_else(|| bad("expected `Name: value`"))?;
        let name = http::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| bad("not a header name"))?;
        let value =
            http::HeaderValue::from_str(value.trim()).map_err(|_| bad("not a header value"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// Explains `source` (`<namespace>/<name>` or an address) reaching `destination`
/// (`<address>:<port>`, a pod or a service VIP) under `mesh`. For a service behind a
/// waypoint the waypoint's policies are evaluated too, for `request` (a plain TCP port: the
/// connection, with the L4 rule semantics), and the endpoints' L4 policies see the original
/// client's
/// identity arriving from the waypoint's address, as the data path does.
pub fn explain(
    mesh: &MeshIndex,
    trust_domain: &str,
    source: &str,
    destination: &str,
    request: &RequestSpec<'_>,
) -> Result<Value, String> {
    let headers = header_map(request.headers)?;
    let src_workload = match source.split_once('/') {
        Some((ns, name)) => Some(
            mesh.workload(ns, name)
                .ok_or_else(|| format!("source {source:?}: no such workload"))?
                .clone(),
        ),
        None => {
            let ip: IpAddr = source.parse().map_err(|_| {
                format!("source {source:?}: expected <namespace>/<name> or an address")
            })?;
            mesh.workload_by_ip(ip).cloned()
        }
    };
    let dst: SocketAddr = destination
        .parse()
        .map_err(|_| format!("destination {destination:?}: expected <address>:<port>"))?;
    // A dual-stack source connects from its address of the destination's family.
    let src_ip: Option<IpAddr> = match &src_workload {
        Some(w) => w.ips.iter().find(|ip| ip.is_ipv4() == dst.is_ipv4()).or(w.ips.first()).copied(),
        None => source.parse().ok(),
    };
    let source_in_mesh = src_workload.as_ref().is_some_and(|w| w.in_mesh);
    // Only sources in the mesh go through a waypoint (others are not captured).
    let via_waypoint = match mesh.service_by_vip(dst.ip()) {
        Some(svc) if source_in_mesh => match &svc.waypoint {
            Some(name) => Some((
                svc.clone(),
                mesh.workload(&svc.namespace, name).cloned().ok_or_else(|| {
                    format!(
                        "service {}/{} uses waypoint {name:?}, which is not a workload of its namespace",
                        svc.namespace, svc.name
                    )
                })?,
            )),
            None => None,
        },
        _ => None,
    };
    let (targets, service) = match mesh.service_by_vip(dst.ip()) {
        Some(svc) => {
            let port = svc.target_port(dst.port()).ok_or_else(|| {
                format!(
                    "destination {destination}: service {}/{} has no such port",
                    svc.namespace, svc.name
                )
            })?;
            // As the data path picks them: endpoints with an address of the VIP's family.
            let eps: Vec<_> = svc
                .endpoints
                .iter()
                .filter(|w| w.ips.iter().any(|ip| ip.is_ipv4() == dst.is_ipv4()))
                .map(|w| (w.clone(), port))
                .collect();
            if eps.is_empty() && via_waypoint.is_none() {
                return Ok(json!({
                    "source": source, "destination": destination,
                    "service": format!("{}/{}", svc.namespace, svc.name),
                    "verdict": "deny",
                    "reason": format!("service {}/{} has no endpoints of this address family: the connection is refused", svc.namespace, svc.name),
                }));
            }
            (eps, Some(format!("{}/{}", svc.namespace, svc.name)))
        }
        None => match mesh.workload_by_ip(dst.ip()) {
            Some(w) => (vec![(w.clone(), dst.port())], None),
            None => {
                return Ok(json!({
                    "source": source, "destination": destination,
                    "verdict": "allow",
                    "reason": "the destination is not a mesh workload: traffic passes through as plain TCP and no policy applies",
                }));
            }
        },
    };
    let identity = match &src_workload {
        Some(w) if w.in_mesh => Some(w.identity(trust_domain).map_err(|e| e.to_string())?),
        _ => None,
    };
    // Through a waypoint (for a source in the mesh: others are not captured and reach the
    // endpoint directly): its L7 policies first, then the endpoints see the client's
    // identity from the waypoint's address.
    let mut l7 = None;
    let mut arriving_from = src_ip;
    if let Some((svc, wp)) = via_waypoint.as_ref().filter(|_| identity.is_some()) {
        let (method, path) = (request.method.unwrap_or("GET"), request.path.unwrap_or("/"));
        let target = Target {
            namespace: &svc.namespace,
            service: &svc.name,
            waypoint: Some(&wp.name),
            port: dst.port(),
        };
        let src = Source {
            identity: identity.as_ref(),
            ip: src_ip.unwrap_or(IpAddr::from([0, 0, 0, 0])),
        };
        // A plain TCP port is passed through, authorized with the L4 rule semantics.
        let (explanation, request) = if svc.is_tcp_port(dst.port()) {
            (mesh.authz().explain_tcp(&target, &src), "TCP connection".to_owned())
        } else {
            // Unless told otherwise, as a client naming the service by its hostname sends it.
            let host = request.host.map_or_else(|| svc.hostname(), str::to_owned);
            let req = HttpRequest {
                host: host.as_bytes(),
                headers: Some(&headers),
                ..HttpRequest::new(method, path)
            };
            let others = match request.headers {
                [] => "no other headers".to_owned(),
                lines => lines.join(", "),
            };
            let request = format!("{method} {path} (Host: {host}, {others})");
            (mesh.authz().explain_http(&target, &src, &req), request)
        };
        let d = &explanation.decision;
        l7 = Some(json!({
            "waypoint": wp.key(),
            "request": request,
            "verdict": if d.allowed() { "allow" } else { "deny" },
            "reason": d.reason.to_string(),
            "explanation": serde_json::to_value(&explanation).unwrap_or(Value::Null),
        }));
        arriving_from = wp.ips.iter().find(|ip| ip.is_ipv4() == dst.is_ipv4()).copied();
    }
    let mut endpoints = Vec::new();
    for (w, port) in &targets {
        let dest = Destination { namespace: &w.namespace, labels: &w.labels, port: *port };
        let ip = arriving_from.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let mut e = json!({
            "workload": w.key(),
            "port": port,
            "inMesh": w.in_mesh,
        });
        if !w.in_mesh {
            e["verdict"] = json!("allow");
            e["reason"] = json!(
                "the destination is not in the mesh (its namespace, or its own sinew.io/dataplane-mode label): no policy applies"
            );
        } else {
            let explanation =
                mesh.authz().explain(&dest, &Source { identity: identity.as_ref(), ip });
            let strict = identity.is_none()
                && mesh.authz().mtls_mode(&w.namespace, &w.labels, *port) == MtlsMode::Strict;
            let (verdict, reason) = if strict {
                (
                    "deny".to_string(),
                    "STRICT mTLS: the source has no mesh identity (plaintext)".to_string(),
                )
            } else {
                let d = &explanation.decision;
                (if d.allowed() { "allow" } else { "deny" }.to_string(), d.reason.to_string())
            };
            e["verdict"] = json!(verdict);
            e["reason"] = json!(reason);
            e["transport"] =
                json!(if identity.is_some() { "HBONE (mutual TLS)" } else { "plaintext" });
            e["explanation"] = serde_json::to_value(&explanation).unwrap_or(Value::Null);
        }
        endpoints.push(e);
    }
    let verdict = if l7.as_ref().is_some_and(|l| l["verdict"] == "deny") || endpoints.is_empty() {
        // No endpoint (of the destination's family) behind a waypoint: nothing answers.
        "deny"
    } else if endpoints.iter().all(|e| e["verdict"] == "allow") {
        "allow"
    } else if endpoints.iter().all(|e| e["verdict"] == "deny") {
        "deny"
    } else {
        "mixed"
    };
    Ok(json!({
        "source": {
            "input": source,
            "workload": src_workload.as_ref().map(|w| w.key()),
            "identity": identity.as_ref().map(|i| i.to_string()),
            "address": src_ip,
        },
        "destination": destination,
        "service": service,
        "waypoint": l7,
        "verdict": verdict,
        "endpoints": endpoints,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh() -> MeshIndex {
        mesh_of(mesh_yaml())
    }

    fn mesh_of(yaml: &str) -> MeshIndex {
        let resources: Vec<_> = sinew_model::parse_file(std::path::Path::new("t.yaml"), yaml)
            .expect("YAML")
            .into_iter()
            .map(|r| r.expect("valid"))
            .collect();
        MeshIndex::build(&resources)
    }

    fn mesh_yaml() -> &'static str {
        "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {sinew.io/dataplane-mode: ambient}}
---
apiVersion: sinew.io/v1alpha1
kind: Workload
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {serviceAccount: client, node: n1, ips: [198.18.1.10]}
---
apiVersion: sinew.io/v1alpha1
kind: Workload
metadata: {name: api-1, namespace: shop, labels: {app: api}}
spec: {serviceAccount: api, node: n2, ips: [198.18.2.10]}
---
apiVersion: sinew.io/v1alpha1
kind: Workload
metadata: {name: wp, namespace: shop, labels: {app: wp}}
spec: {serviceAccount: wp, node: n1, ips: [198.18.3.10]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop, labels: {sinew.io/use-waypoint: wp}}
spec: {clusterIPs: [198.18.200.1], selector: {app: api}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: security.sinew.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec: {targetRefs: [{kind: Service, name: api}], action: DENY, rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]}
---
apiVersion: security.sinew.io/v1
kind: AuthorizationPolicy
metadata: {name: from-client-via-wp, namespace: shop}
spec: {selector: {matchLabels: {app: api}}, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client], ipBlocks: [198.18.3.10/32]}}]}]}
"
    }

    #[test]
    fn explain_refuses_what_the_data_path_refuses_and_picks_the_family() {
        let extra = "\
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: shop}
spec: {clusterIPs: [198.18.200.2], selector: {app: nobody}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty-wp, namespace: shop, labels: {sinew.io/use-waypoint: wp}}
spec: {clusterIPs: [198.18.200.3], selector: {app: nobody}, ports: [{port: 80}]}
---
apiVersion: sinew.io/v1alpha1
kind: Workload
metadata: {name: dual, namespace: shop, labels: {app: dual}}
spec: {serviceAccount: dual, node: n1, ips: [198.18.1.20, \"2001:2::20\"]}
---
apiVersion: sinew.io/v1alpha1
kind: Workload
metadata: {name: v6-server, namespace: shop, labels: {app: v6}}
spec: {serviceAccount: v6, node: n2, ips: [\"2001:2::30\"]}
---
apiVersion: security.sinew.io/v1
kind: AuthorizationPolicy
metadata: {name: v6-only, namespace: shop}
spec: {selector: {matchLabels: {app: v6}}, rules: [{from: [{source: {ipBlocks: [\"2001:2::/64\"]}}]}]}
";
        let m = mesh_of(&format!("{}{extra}", mesh_yaml()));
        // A service with no endpoints: the data path refuses, so explain says deny.
        let e =
            explain(&m, "cluster.local", "shop/client", "198.18.200.2:80", &RequestSpec::default())
                .unwrap();
        assert_eq!(e["verdict"], "deny", "{e:#}");
        // Behind a waypoint too: it passes the request on to nobody.
        let e =
            explain(&m, "cluster.local", "shop/client", "198.18.200.3:80", &RequestSpec::default())
                .unwrap();
        assert_eq!(e["verdict"], "deny", "{e:#}");
        // A dual-stack source toward an IPv6 destination is judged by its IPv6 address.
        let e =
            explain(&m, "cluster.local", "shop/dual", "[2001:2::30]:8080", &RequestSpec::default())
                .unwrap();
        assert_eq!(e["verdict"], "allow", "{e:#}");
    }

    #[test]
    fn a_service_behind_a_waypoint_is_explained_through_it() {
        let m = mesh();
        let e =
            explain(&m, "cluster.local", "shop/client", "198.18.200.1:80", &RequestSpec::default())
                .unwrap();
        assert_eq!(e["waypoint"]["waypoint"], "shop/wp", "{e:#}");
        assert_eq!(
            e["waypoint"]["request"],
            "GET / (Host: api.shop.svc.cluster.local, no other headers)"
        );
        // The endpoint sees the client's identity from the waypoint's address.
        assert_eq!(e["endpoints"][0]["verdict"], "allow", "{e:#}");
        assert_eq!(e["verdict"], "allow");
        // The waypoint's L7 DENY decides for a request it matches.
        let e = explain(
            &m,
            "cluster.local",
            "shop/client",
            "198.18.200.1:80",
            &RequestSpec { path: Some("/admin/users"), ..Default::default() },
        )
        .unwrap();
        assert_eq!(e["waypoint"]["verdict"], "deny", "{e:#}");
        assert_eq!(e["verdict"], "deny");
        // A source outside the mesh is not captured: it reaches the endpoint directly.
        let e =
            explain(&m, "cluster.local", "198.18.9.9", "198.18.200.1:80", &RequestSpec::default())
                .unwrap();
        assert!(e["waypoint"].is_null(), "{e:#}");
        // Straight to the pod (no waypoint), the client's own address does not pass ipBlocks.
        let e = explain(
            &m,
            "cluster.local",
            "shop/client",
            "198.18.2.10:8080",
            &RequestSpec::default(),
        )
        .unwrap();
        assert!(e["waypoint"].is_null());
        assert_eq!(e["verdict"], "deny", "{e:#}");
    }

    #[test]
    fn the_request_explained_can_name_its_host_and_headers() {
        let extra = "\
---
apiVersion: security.sinew.io/v1
kind: AuthorizationPolicy
metadata: {name: admins-only, namespace: shop}
spec: {targetRefs: [{kind: Service, name: api}], rules: [{to: [{operation: {hosts: [\"api.shop*\"]}}], when: [{key: \"request.headers[x-role]\", values: [admin]}]}]}
";
        let m = mesh_of(&format!("{}{extra}", mesh_yaml()));
        let vip = "198.18.200.1:80";
        let ask = |host: Option<&str>, headers: &[String]| {
            let r = RequestSpec { host, headers, ..Default::default() };
            explain(&m, "cluster.local", "shop/client", vip, &r)
        };
        let admin = ["X-Role: admin".to_owned()];
        let e = ask(None, &admin).unwrap();
        assert_eq!(e["waypoint"]["verdict"], "allow", "{e:#}");
        assert_eq!(
            e["waypoint"]["request"],
            "GET / (Host: api.shop.svc.cluster.local, X-Role: admin)"
        );
        let e = ask(Some("evil.example"), &admin).unwrap();
        assert_eq!(e["waypoint"]["verdict"], "deny", "{e:#}");
        let e = ask(None, &[]).unwrap();
        assert_eq!(e["waypoint"]["verdict"], "deny", "no x-role header: {e:#}");
        let err = ask(None, &["no colon".to_owned()]).unwrap_err();
        assert_eq!(err, "header \"no colon\": expected `Name: value`");
    }

    #[test]
    fn a_tcp_port_behind_a_waypoint_is_explained_as_a_connection() {
        let extra = "\
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop, labels: {sinew.io/use-waypoint: wp}}
spec: {clusterIPs: [198.18.200.4], selector: {app: api}, ports: [{port: 5432, appProtocol: tcp}]}
---
apiVersion: security.sinew.io/v1
kind: AuthorizationPolicy
metadata: {name: no-client-writes, namespace: shop}
spec: {targetRefs: [{kind: Service, name: db}], action: DENY, rules: [{from: [{source: {serviceAccounts: [client]}}], to: [{operation: {methods: [POST]}}]}]}
";
        let m = mesh_of(&format!("{}{extra}", mesh_yaml()));
        // No method to read on a TCP connection: the DENY matches on its source alone.
        let e = explain(
            &m,
            "cluster.local",
            "shop/client",
            "198.18.200.4:5432",
            &RequestSpec::default(),
        )
        .unwrap();
        assert_eq!(e["waypoint"]["request"], "TCP connection", "{e:#}");
        assert_eq!(
            e["waypoint"]["reason"],
            "denied by DENY policy shop/no-client-writes (rule 0, L7 fields ignored at L4)"
        );
        assert_eq!(e["verdict"], "deny");
        // Another source passes the waypoint, then meets the endpoint's own L4 ALLOW.
        let e =
            explain(&m, "cluster.local", "shop/wp", "198.18.200.4:5432", &RequestSpec::default())
                .unwrap();
        assert_eq!(e["waypoint"]["verdict"], "allow", "{e:#}");
    }
}
