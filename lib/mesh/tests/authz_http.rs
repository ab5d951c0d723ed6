//! L7 authorization at the waypoint: policies attached with `targetRefs`, methods and paths
//! evaluated, `check_http` agreeing with `explain_http`, and the split with L4 (`check` ignores
//! `targetRefs` policies, `check_http` ignores the others).

mod common;

use std::{collections::BTreeMap, net::IpAddr};

use common::{Rng, resources};
use sinew_identity::SpiffeId;
use sinew_mesh::{
    Authz, Decision, Destination, Explanation, HttpRequest, Scope, Source, Target, Verdict,
};
use sinew_model::{Action, MtlsMode, Resource};

fn policy(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.sinew.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, \
         namespace: {ns}}}\nspec: {spec}\n---\n"
    )
}

/// A policy attached to Service `service` of `ns`; `rest` is the rest of the spec.
fn on_service(ns: &str, name: &str, service: &str, rest: &str) -> String {
    policy(ns, name, &format!("{{targetRefs: [{{kind: Service, name: {service}}}], {rest}}}"))
}

/// A policy attached to waypoint `waypoint`; `rest` is the rest of the spec.
fn on_waypoint(ns: &str, name: &str, waypoint: &str, rest: &str) -> String {
    policy(
        ns,
        name,
        &format!(
            "{{targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: \
             {waypoint}}}], {rest}}}"
        ),
    )
}

fn authz(docs: &[String]) -> Authz {
    Authz::build(&resources(&docs.concat()))
}

/// A request: the service it is for and its waypoint, the source, the method and path.
#[derive(Clone)]
struct Req {
    ns: String,
    service: String,
    waypoint: Option<String>,
    port: u16,
    id: Option<SpiffeId>,
    ip: IpAddr,
    method: String,
    path: String,
    host: Vec<u8>,
    headers: http::HeaderMap,
}

impl Req {
    /// `GET /` to `service` of `ns` on port 80 through waypoint `waypoint`, from
    /// `cluster.local/ns/client/sa/client` at 10.0.0.9.
    fn to(ns: &str, service: &str) -> Self {
        Self {
            ns: ns.into(),
            service: service.into(),
            waypoint: Some("waypoint".into()),
            port: 80,
            id: Some(SpiffeId::new("cluster.local", "client", "client").unwrap()),
            ip: "10.0.0.9".parse().unwrap(),
            method: "GET".into(),
            path: "/".into(),
            host: format!("{service}.{ns}").into_bytes(),
            headers: http::HeaderMap::new(),
        }
    }

    fn host(mut self, host: impl AsRef<[u8]>) -> Self {
        self.host = host.as_ref().to_vec();
        self
    }

    fn header(mut self, name: &'static str, value: impl AsRef<[u8]>) -> Self {
        self.headers.append(name, http::HeaderValue::from_bytes(value.as_ref()).unwrap());
        self
    }

    fn get(self, path: &str) -> Self {
        self.call("GET", path)
    }

    fn call(mut self, method: &str, path: &str) -> Self {
        (self.method, self.path) = (method.into(), path.into());
        self
    }

    fn via(mut self, waypoint: Option<&str>) -> Self {
        self.waypoint = waypoint.map(str::to_owned);
        self
    }

    fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    fn from(mut self, ns: &str, sa: &str) -> Self {
        self.id = Some(SpiffeId::new("cluster.local", ns, sa).unwrap());
        self
    }

    fn plaintext(mut self) -> Self {
        self.id = None;
        self
    }

    fn ip(mut self, ip: &str) -> Self {
        self.ip = ip.parse().unwrap();
        self
    }

    fn target(&self) -> Target<'_> {
        Target {
            namespace: &self.ns,
            service: &self.service,
            waypoint: self.waypoint.as_deref(),
            port: self.port,
        }
    }

    fn source(&self) -> Source<'_> {
        Source { identity: self.id.as_ref(), ip: self.ip }
    }

    /// `explain_http`, after checking that its decision is `check_http`'s.
    fn explain(&self, a: &Authz) -> Explanation {
        let req = HttpRequest {
            method: &self.method,
            path: &self.path,
            host: &self.host,
            headers: Some(&self.headers),
        };
        let (target, src) = (self.target(), self.source());
        let explanation = a.explain_http(&target, &src, &req);
        assert_eq!(explanation.decision, a.check_http(&target, &src, &req), "disagree");
        explanation
    }

    fn decide(&self, a: &Authz) -> Decision {
        self.explain(a).decision
    }

    fn allowed(&self, a: &Authz) -> bool {
        self.decide(a).allowed()
    }

    /// `explain_tcp` for a connection to a plain TCP port of the same target, after checking
    /// that its decision is `check_tcp`'s.
    fn explain_tcp(&self, a: &Authz) -> Explanation {
        let (target, src) = (self.target(), self.source());
        let explanation = a.explain_tcp(&target, &src);
        assert_eq!(explanation.decision, a.check_tcp(&target, &src), "TCP disagrees");
        explanation
    }

    /// The L4 decision for a connection to the same namespace and port.
    fn l4(&self, a: &Authz) -> Decision {
        let labels = BTreeMap::from([("app".to_owned(), self.service.clone())]);
        let dst = Destination { namespace: &self.ns, labels: &labels, port: self.port };
        let decision = a.check(&dst, &self.source());
        assert_eq!(a.explain(&dst, &self.source()).decision, decision, "L4 disagrees");
        decision
    }
}

#[test]
fn deny_on_method_and_path_denies_only_that_request() {
    let a = authz(&[on_service(
        "shop",
        "deny-post-admin",
        "reviews",
        "action: DENY, rules: [{to: [{operation: {methods: [POST], paths: [/admin]}}]}]",
    )]);
    let d = Req::to("shop", "reviews").call("POST", "/admin").decide(&a);
    assert_eq!((d.verdict, d.policy.as_deref()), (Verdict::Deny, Some("shop/deny-post-admin")));
    assert_eq!(d.reason, "denied by DENY policy shop/deny-post-admin (rule 0)");
    assert!(!Req::to("shop", "reviews").call("POST", "/admin?force=1").allowed(&a), "query");
    for (method, path) in [("GET", "/admin"), ("POST", "/admin/x"), ("post", "/admin")] {
        let d = Req::to("shop", "reviews").call(method, path).decide(&a);
        assert_eq!(d.reason, "allowed: no ALLOW policy applies", "{method} {path}");
    }
    let e = Req::to("shop", "reviews").call("GET", "/admin").explain(&a);
    assert_eq!(e.policies[0].why, ["rule 0: to[0].operation.methods: GET not in [POST]"]);
    assert_eq!(e.policies[0].scope, Scope::Service);
    let e = Req::to("shop", "reviews").call("POST", "/x").explain(&a);
    assert_eq!(e.policies[0].why, ["rule 0: to[0].operation.paths: /x not in [/admin]"]);
}

#[test]
fn a_tcp_port_behind_the_waypoint_is_decided_by_the_attached_policies_at_l4() {
    // Istio's rules for TCP traffic: an ALLOW rule with HTTP fields never matches, a DENY
    // rule matches without them; source and port fields are evaluated as usual.
    let a = authz(&[
        on_service(
            "shop",
            "deny-posts",
            "db",
            "action: DENY, rules: [{from: [{source: {serviceAccounts: [batch]}}], to: \
             [{operation: {methods: [POST]}}]}]",
        ),
        on_service(
            "shop",
            "allow-web",
            "db",
            "rules: [{from: [{source: {principals: [cluster.local/ns/front/sa/web]}}]}, {to: \
             [{operation: {paths: [/health]}}]}]",
        ),
        on_service(
            "shop",
            "audit-all",
            "db",
            "action: AUDIT, rules: [{to: [{operation: {ports: [5432]}}]}]",
        ),
    ]);
    let db = Req::to("shop", "db").port(5432);
    let e = db.clone().from("front", "web").explain_tcp(&a);
    assert_eq!(e.decision.reason, "allowed by ALLOW policy shop/allow-web (rule 0)");
    assert_eq!(e.decision.audited, ["shop/audit-all"]);
    assert!(e.policies.iter().all(|p| p.scope == Scope::Service), "{:?}", e.policies);
    // Rule 1 of the ALLOW only lists a path: it admits no TCP connection.
    let e = db.clone().from("front", "api").explain_tcp(&a);
    assert_eq!(e.decision.reason, "denied: ALLOW policies apply (shop/allow-web) and none matches");
    let allow = e.policies.iter().find(|p| p.policy == "shop/allow-web").unwrap();
    assert_eq!(
        allow.why[1],
        "rule 1: to[0].operation.paths: L7 field, not evaluated at L4: an ALLOW rule with it \
         never matches"
    );
    // The DENY names a method: at L4 it matches on its source alone (the safe side).
    let e = db.clone().from("shop", "batch").explain_tcp(&a);
    assert_eq!(
        e.decision.reason,
        "denied by DENY policy shop/deny-posts (rule 0, L7 fields ignored at L4)"
    );
    // The same policies over HTTP evaluate the method and path.
    let batch = Req::to("shop", "db").from("shop", "batch");
    assert!(!batch.clone().call("POST", "/x").allowed(&a));
    assert!(batch.get("/health").allowed(&a), "a GET is not a POST, and /health is allowed");
    // Policies attached elsewhere do not apply.
    assert!(Req::to("shop", "cache").port(5432).explain_tcp(&a).decision.allowed());
    assert!(!a.has_targeted_policies(&Req::to("shop", "cache").target()));
}

#[test]
fn hosts_match_the_authority_without_regard_to_case() {
    let a = authz(&[on_service(
        "shop",
        "hosts",
        "reviews",
        "rules: [{to: [{operation: {hosts: [reviews.shop, \"*.example.com\", \"api.example.com:*\"]}}]}]",
    )]);
    for host in ["reviews.shop", "REVIEWS.shop", "www.Example.com", "api.example.com:8080"] {
        assert!(Req::to("shop", "reviews").host(host).allowed(&a), "{host}");
    }
    for host in ["reviews.shop:80", "example.com", ""] {
        assert!(!Req::to("shop", "reviews").host(host).allowed(&a), "{host}");
    }
    // Bytes outside ASCII are compared as sent, not taken for a missing host.
    let deny = authz(&[on_service(
        "shop",
        "no-internal",
        "reviews",
        "action: DENY, rules: [{to: [{operation: {hosts: [\"internal.*\"]}}]}]",
    )]);
    assert!(!Req::to("shop", "reviews").host(b"internal.x\x80").allowed(&deny));
    // `*` needs a host.
    let any = authz(&[on_service(
        "shop",
        "any",
        "reviews",
        "rules: [{to: [{operation: {hosts: [\"*\"]}}]}]",
    )]);
    assert!(Req::to("shop", "reviews").host("x").allowed(&any));
    let e = Req::to("shop", "reviews").host("").explain(&any);
    assert_eq!(e.policies[0].why, ["rule 0: to[0].operation.hosts: (none) not in [*]"]);
    let e = Req::to("shop", "reviews").host("evil.org").explain(&a);
    assert_eq!(
        e.policies[0].why,
        [
            "rule 0: to[0].operation.hosts: evil.org not in [reviews.shop, *.example.com, api.example.com:*]"
        ]
    );
}

#[test]
fn header_conditions() {
    let a = authz(&[on_service(
        "shop",
        "deny-guests",
        "reviews",
        "action: DENY, rules: [{when: [{key: \"request.headers[X-User]\", notValues: [\"admin-*\"]}]}]",
    )]);
    assert!(Req::to("shop", "reviews").header("x-user", "admin-ann").allowed(&a));
    let e = Req::to("shop", "reviews").header("x-user", "guest").explain(&a);
    assert_eq!(e.decision.reason, "denied by DENY policy shop/deny-guests (rule 0)");
    // A value with bytes outside ASCII is compared as sent, not taken for a missing header.
    assert!(Req::to("shop", "reviews").header("x-user", b"admin-\x80").allowed(&a));
    assert!(!Req::to("shop", "reviews").header("x-user", b"guest\x80").allowed(&a));
    // No header: `notValues` passes, so the DENY matches.
    assert!(!Req::to("shop", "reviews").allowed(&a));
    // Several values are joined with `,`, as Envoy's matchers see them.
    let r = Req::to("shop", "reviews").header("x-user", "admin-a").header("x-user", "b");
    assert!(r.allowed(&a), "admin-a,b starts with admin-");
    let allow = authz(&[on_service(
        "shop",
        "only-admins",
        "reviews",
        "rules: [{when: [{key: \"request.headers[x-user]\", values: [\"admin-*\"]}]}]",
    )]);
    let e = Req::to("shop", "reviews").header("x-user", "bob").explain(&allow);
    assert_eq!(
        e.policies[0].why,
        ["rule 0: when[0] request.headers[x-user]: bob not in [admin-*]"]
    );
    let e = Req::to("shop", "reviews").explain(&allow);
    assert_eq!(
        e.policies[0].why,
        ["rule 0: when[0] request.headers[x-user]: no value (no identity, or no such header)"]
    );
    // A TCP port: the header cannot be read, so the ALLOW admits nothing.
    assert!(!Req::to("shop", "reviews").port(5432).explain_tcp(&allow).decision.allowed());
}

#[test]
fn allow_a_list_of_paths() {
    let a = authz(&[on_service(
        "shop",
        "allow-paths",
        "reviews",
        "rules: [{to: [{operation: {paths: [/health, \"/api/*\"], ports: [80]}}]}]",
    )]);
    for path in ["/health", "/api/", "/api/v1/reviews", "/health?verbose"] {
        let d = Req::to("shop", "reviews").get(path).decide(&a);
        assert_eq!(d.reason, "allowed by ALLOW policy shop/allow-paths (rule 0)", "{path}");
    }
    for path in ["/", "/healthz", "/api", "/other/api/x"] {
        let d = Req::to("shop", "reviews").get(path).decide(&a);
        assert_eq!(d.reason, "denied: ALLOW policies apply (shop/allow-paths) and none matches");
    }
    let e = Req::to("shop", "reviews").get("/other?q=1").explain(&a);
    assert_eq!(
        e.policies[0].why,
        ["rule 0: to[0].operation.paths: /other not in [/health, /api/*]"],
        "the query is not part of the path"
    );
    let e = Req::to("shop", "reviews").get("/health").port(8080).explain(&a);
    assert_eq!(e.policies[0].why, ["rule 0: to[0].operation.ports: 8080 not in [80]"]);
}

#[test]
fn not_paths_and_not_methods() {
    let a = authz(&[on_service(
        "shop",
        "deny-private",
        "reviews",
        "action: DENY, rules: [{to: [{operation: {notPaths: [\"/public/*\", /], notMethods: \
         [GET, HEAD]}}]}]",
    )]);
    assert!(Req::to("shop", "reviews").get("/private").allowed(&a), "GET is in notMethods");
    assert!(!Req::to("shop", "reviews").call("POST", "/private").allowed(&a));
    assert!(Req::to("shop", "reviews").call("POST", "/public/form").allowed(&a));
    assert!(Req::to("shop", "reviews").call("DELETE", "/").allowed(&a));
    let e = Req::to("shop", "reviews").call("PUT", "/public/x").explain(&a);
    assert_eq!(
        e.policies[0].why,
        ["rule 0: to[0].operation.notPaths: /public/x in [/public/*, /]"]
    );
    let e = Req::to("shop", "reviews").call("HEAD", "/x").explain(&a);
    assert_eq!(e.policies[0].why, ["rule 0: to[0].operation.notMethods: HEAD in [GET, HEAD]"]);
}

#[test]
fn path_wildcards() {
    let deny = |pattern: &str| {
        authz(&[on_service(
            "shop",
            "p",
            "reviews",
            &format!("action: DENY, rules: [{{to: [{{operation: {{paths: [\"{pattern}\"]}}}}]}}]"),
        )])
    };
    for (pattern, path, want_denied) in [
        ("*", "/anything", true),
        ("*", "/", true),
        ("/api/*", "/api/v1", true),
        ("/api/*", "/api/", true),
        ("/api/*", "/api", false),
        ("/api*", "/apiary", true),
        ("*.css", "/static/site.css", true),
        ("*.css", "/static/site.css.map", false),
        ("/exact", "/exact", true),
        ("/exact", "/exact/", false),
        ("/exact", "/EXACT", false),
        ("*/x*", "/a/x*", true),
        ("*/x*", "/a/xy", false),
    ] {
        let denied = !Req::to("shop", "reviews").get(path).allowed(&deny(pattern));
        assert_eq!(denied, want_denied, "{pattern} against {path}");
    }
}

#[test]
fn principal_and_path_combined() {
    let a = authz(&[on_service(
        "shop",
        "web-api",
        "reviews",
        "rules: [{from: [{source: {principals: [cluster.local/ns/front/sa/web]}}], to: \
         [{operation: {methods: [GET], paths: [\"/api/*\"]}}]}, {from: [{source: {ipBlocks: \
         [10.1.0.0/16]}}]}]",
    )]);
    assert!(Req::to("shop", "reviews").from("front", "web").get("/api/x").allowed(&a));
    assert!(!Req::to("shop", "reviews").from("front", "web").get("/admin").allowed(&a));
    assert!(!Req::to("shop", "reviews").from("front", "web").call("PUT", "/api/x").allowed(&a));
    assert!(!Req::to("shop", "reviews").from("front", "api").get("/api/x").allowed(&a));
    assert!(!Req::to("shop", "reviews").plaintext().get("/api/x").allowed(&a));
    let d = Req::to("shop", "reviews").plaintext().ip("10.1.2.3").get("/admin").decide(&a);
    assert_eq!(d.reason, "allowed by ALLOW policy shop/web-api (rule 1)");
    let e = Req::to("shop", "reviews").from("front", "api").get("/api/x").explain(&a);
    assert_eq!(
        e.policies[0].why,
        [
            "rule 0: from[0].source.principals: cluster.local/ns/front/sa/api not in \
             [cluster.local/ns/front/sa/web]",
            "rule 1: from[0].source.ipBlocks: 10.0.0.9 not in [10.1.0.0/16]",
        ]
    );
}

#[test]
fn a_policy_on_another_service_does_not_apply() {
    let deny_all = "action: DENY, rules: [{}]";
    let a = authz(&[
        on_service("shop", "deny-ratings", "ratings", deny_all),
        on_service("bank", "deny-reviews", "reviews", deny_all),
    ]);
    let reviews = Req::to("shop", "reviews");
    let e = reviews.explain(&a);
    assert_eq!(e.decision.reason, "allowed: no ALLOW policy applies");
    assert!(e.policies.is_empty(), "{:?}", e.policies);
    assert!(!a.has_targeted_policies(&reviews.target()), "bank's reviews is another service");
    let ratings = Req::to("shop", "ratings");
    assert!(a.has_targeted_policies(&ratings.target()));
    assert_eq!(ratings.decide(&a).policy.as_deref(), Some("shop/deny-ratings"));
    assert!(!Req::to("bank", "reviews").allowed(&a));
}

#[test]
fn a_gateway_target_applies_to_every_service_of_its_waypoint() {
    let a = authz(&[
        on_waypoint(
            "shop",
            "deny-delete",
            "waypoint",
            "action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]",
        ),
        on_waypoint(
            "sinew-system",
            "mesh-deny-debug",
            "waypoint",
            "action: DENY, rules: [{to: [{operation: {paths: [\"/debug/*\"]}}]}]",
        ),
        on_waypoint("bank", "bank-deny-all", "waypoint", "action: DENY, rules: [{}]"),
    ]);
    for service in ["reviews", "ratings"] {
        let e = Req::to("shop", service).call("DELETE", "/x").explain(&a);
        assert_eq!(e.decision.policy.as_deref(), Some("shop/deny-delete"), "{service}");
        let scopes: Vec<Scope> = e.policies.iter().map(|p| p.scope).collect();
        assert_eq!(scopes, [Scope::Gateway, Scope::Gateway], "root namespace first");
        assert_eq!(e.policies[0].policy, "sinew-system/mesh-deny-debug");
        assert!(Req::to("shop", service).get("/x").allowed(&a));
    }
    let debug = Req::to("shop", "reviews").get("/debug/pprof");
    assert_eq!(debug.decide(&a).policy.as_deref(), Some("sinew-system/mesh-deny-debug"));
    assert!(!Req::to("other", "x").get("/debug/x").allowed(&a), "root: every namespace");
    assert!(Req::to("other", "x").call("DELETE", "/").allowed(&a), "shop's is shop's");
    for waypoint in [Some("other-waypoint"), None] {
        let r = Req::to("shop", "reviews").via(waypoint).call("DELETE", "/debug/x");
        assert!(r.allowed(&a), "{waypoint:?}");
        assert!(!a.has_targeted_policies(&r.target()), "{waypoint:?}");
    }
}

#[test]
fn one_policy_on_a_service_and_its_waypoint_is_evaluated_once() {
    let a = authz(&[policy(
        "shop",
        "both",
        "{targetRefs: [{kind: Gateway, name: waypoint}, {kind: Service, group: core, name: \
         reviews}], action: AUDIT, rules: [{}]}",
    )]);
    let e = Req::to("shop", "reviews").explain(&a);
    assert_eq!(e.decision.audited, ["shop/both"]);
    assert_eq!(e.policies.len(), 1);
    assert_eq!(e.policies[0].scope, Scope::Service, "the service is the closer attachment");
    let e = Req::to("shop", "ratings").explain(&a);
    assert_eq!((e.decision.audited.len(), e.policies[0].scope), (1, Scope::Gateway));
}

#[test]
fn target_refs_policies_are_ignored_at_l4() {
    let a = authz(&[
        on_service("shop", "deny-all", "reviews", "action: DENY, rules: [{}]"),
        on_waypoint(
            "sinew-system",
            "mesh-allow-none",
            "waypoint",
            "rules: [{from: [{source: {namespaces: [nobody]}}]}]",
        ),
    ]);
    assert!(!a.is_empty());
    let d = Req::to("shop", "reviews").l4(&a);
    assert_eq!(
        (d.verdict, d.reason.as_ref()),
        (Verdict::Allow, "allowed: no ALLOW policy applies")
    );
    assert!(!Req::to("shop", "reviews").allowed(&a), "the waypoint enforces it");
}

#[test]
fn selector_and_namespace_policies_are_not_used_at_l7() {
    let a = authz(&[
        policy(
            "shop",
            "deny-reviews",
            "{selector: {matchLabels: {app: reviews}}, action: DENY, rules: [{}]}",
        ),
        policy("shop", "deny-ns", "{action: DENY, rules: [{to: [{operation: {methods: [GET]}}]}]}"),
        policy("sinew-system", "mesh-allow-none", "{action: ALLOW}"),
    ]);
    let r = Req::to("shop", "reviews");
    assert!(!r.l4(&a).allowed(), "the node agent enforces them");
    let e = r.explain(&a);
    assert_eq!(e.decision.reason, "allowed: no ALLOW policy applies");
    assert!(e.policies.is_empty());
    assert!(!a.has_targeted_policies(&r.target()));
}

#[test]
fn audit_is_reported_and_never_changes_the_verdict() {
    let a = authz(&[
        on_service(
            "shop",
            "audit-admin",
            "reviews",
            "action: AUDIT, rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]",
        ),
        on_service(
            "shop",
            "allow-get",
            "reviews",
            "rules: [{to: [{operation: {methods: [GET]}}]}]",
        ),
    ]);
    let d = Req::to("shop", "reviews").get("/admin/users").decide(&a);
    assert_eq!((d.verdict, d.audited), (Verdict::Allow, vec!["shop/audit-admin".to_owned()]));
    let d = Req::to("shop", "reviews").call("POST", "/admin").decide(&a);
    assert_eq!((d.verdict, d.audited.len()), (Verdict::Deny, 1), "audited even when denied");
    assert!(Req::to("shop", "reviews").get("/").decide(&a).audited.is_empty());
}

#[test]
fn explanation_of_a_request_serializes() {
    let a = authz(&[on_service(
        "shop",
        "deny-post",
        "reviews",
        "action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]",
    )]);
    let e = Req::to("shop", "reviews").call("POST", "/").explain(&a);
    assert_eq!(e.mtls_mode, MtlsMode::Permissive);
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["decision"]["verdict"], "deny");
    assert_eq!(json["decision"]["reason"], "denied by DENY policy shop/deny-post (rule 0)");
    assert_eq!(json["policies"][0]["scope"], "service");
    assert_eq!(json["policies"][0]["why"][0], "rule 0 matched");
    assert_eq!(json["policies"][0]["why"].as_array().map(Vec::len), Some(1), "no L4 note");
}

#[test]
fn check_http_equals_explain_http_on_a_table() {
    let a = authz(&[
        on_waypoint(
            "sinew-system",
            "deny-ops",
            "waypoint",
            "action: DENY, rules: [{from: [{source: {namespaces: [ops]}}], to: [{operation: \
             {notMethods: [GET]}}]}]",
        ),
        on_service(
            "shop",
            "allow",
            "reviews",
            "rules: [{from: [{source: {principals: [\"*/sa/web\"]}}], to: [{operation: {ports: \
             [80], paths: [\"/api/*\"]}}]}, {to: [{operation: {paths: [/health]}}]}]",
        ),
        on_service(
            "shop",
            "audit",
            "reviews",
            "action: AUDIT, rules: [{to: [{operation: {notPaths: [/health]}}]}]",
        ),
        on_service(
            "bank",
            "allow-db",
            "db",
            "rules: [{from: [{source: {serviceAccounts: [shop/api]}}]}]",
        ),
    ]);
    let cases = [
        Req::to("shop", "reviews").from("front", "web").get("/api/x"),
        Req::to("shop", "reviews").from("front", "web").get("/api/x").port(81),
        Req::to("shop", "reviews").from("front", "web").get("/admin"),
        Req::to("shop", "reviews").plaintext().get("/health"),
        Req::to("shop", "reviews").from("ops", "web").call("POST", "/health"),
        Req::to("shop", "reviews").from("ops", "web").get("/health"),
        Req::to("bank", "db").from("shop", "api").call("PUT", "/"),
        Req::to("bank", "db").from("bank", "api"),
        Req::to("bank", "other").from("ops", "x").call("DELETE", "/"),
        Req::to("bank", "other").from("ops", "x").call("DELETE", "/").via(None),
    ];
    let verdicts: Vec<bool> = cases.iter().map(|c| c.allowed(&a)).collect();
    assert_eq!(verdicts, [true, false, false, true, false, true, true, false, false, true]);
}

const NAMESPACES: &[&str] = &["a", "b", "sinew-system"];
const SERVICES: &[&str] = &["web", "db"];
const WAYPOINTS: &[&str] = &["wp", "other"];
const PRINCIPALS: &[&str] = &["*", "cluster.local/ns/a/sa/x", "cluster.local/ns/a/*", "*/sa/y"];
const SOURCE_NS: &[&str] = &["a", "b", "*"];
const BLOCKS: &[&str] = &["10.0.0.0/24", "2001:db8::/32", "10.0.1.5"];
const PORTS: &[&str] = &["80", "443", "8080"];
const METHODS: &[&str] = &["GET", "POST", "DELETE"];
const PATH_PATTERNS: &[&str] = &["*", "/api/*", "/api", "*.css", "/", "/admin*"];
const PATHS: &[&str] = &["/", "/api", "/api/v1", "/admin", "/site.css", "/x/api/y.css"];
const IPS: &[&str] = &["10.0.0.1", "10.0.1.5", "2001:db8::1", "::ffff:10.0.0.1", "192.168.0.1"];

fn random_fields(rng: &mut Rng, fields: &[(&str, &[&str])]) -> String {
    let parts: Vec<String> = fields
        .iter()
        .filter_map(|(name, items)| rng.list(items).map(|l| format!("{name}: {l}")))
        .collect();
    parts.join(", ")
}

fn random_rule(rng: &mut Rng) -> String {
    let source: [(&str, &[&str]); 5] = [
        ("principals", PRINCIPALS),
        ("notPrincipals", PRINCIPALS),
        ("namespaces", SOURCE_NS),
        ("notNamespaces", SOURCE_NS),
        ("ipBlocks", BLOCKS),
    ];
    let operation: [(&str, &[&str]); 6] = [
        ("ports", PORTS),
        ("notPorts", PORTS),
        ("methods", METHODS),
        ("notMethods", METHODS),
        ("paths", PATH_PATTERNS),
        ("notPaths", PATH_PATTERNS),
    ];
    let mut parts = Vec::new();
    for (key, inner, fields) in
        [("from", "source", &source[..]), ("to", "operation", &operation[..])]
    {
        if rng.below(3) > 0 {
            let entries: Vec<String> = (0..rng.below(3))
                .map(|_| format!("{{{inner}: {{{}}}}}", random_fields(rng, fields)))
                .collect();
            parts.push(format!("{key}: [{}]", entries.join(", ")));
        }
    }
    format!("{{{}}}", parts.join(", "))
}

/// 1-2 target refs, a selector, or neither.
fn random_attachment(rng: &mut Rng) -> String {
    match rng.below(4) {
        0 => format!("selector: {{matchLabels: {{app: {}}}}}, ", rng.pick(SERVICES)),
        1 => String::new(),
        _ => {
            let refs: Vec<String> = (0..1 + rng.below(2))
                .map(|_| match rng.below(2) {
                    0 => format!("{{kind: Service, name: {}}}", rng.pick(SERVICES)),
                    _ => format!("{{kind: Gateway, name: {}}}", rng.pick(WAYPOINTS)),
                })
                .collect();
            format!("targetRefs: [{}], ", refs.join(", "))
        }
    }
}

fn random_policies(rng: &mut Rng) -> String {
    let mut docs = String::new();
    for i in 0..rng.below(6) {
        let action = rng.pick(&["ALLOW", "DENY", "AUDIT"]);
        let attachment = random_attachment(rng);
        let rules: Vec<String> = (0..rng.below(3)).map(|_| random_rule(rng)).collect();
        let spec = format!("{{{attachment}action: {action}, rules: [{}]}}", rules.join(", "));
        docs.push_str(&policy(rng.pick(NAMESPACES), &format!("p{i}"), &spec));
    }
    docs
}

fn random_req(rng: &mut Rng) -> Req {
    let waypoint = [None, Some("wp"), Some("other")][rng.below(3)];
    let mut r = Req::to(rng.pick(NAMESPACES), rng.pick(SERVICES))
        .via(waypoint)
        .port(rng.pick(PORTS).parse().unwrap())
        .ip(rng.pick(IPS))
        .call(rng.pick(METHODS), rng.pick(PATHS));
    r = match rng.below(3) {
        0 => r.plaintext(),
        _ => r.from(rng.pick(&["a", "b"]), rng.pick(&["x", "y"])),
    };
    r
}

/// The decision, derived again from the traces alone.
fn verdict_from_traces(e: &Explanation) -> Verdict {
    let matched = |action| e.policies.iter().any(|p| p.action == action && p.matched);
    let applies = e.policies.iter().any(|p| p.action == Action::Allow);
    if matched(Action::Deny) || (applies && !matched(Action::Allow)) {
        Verdict::Deny
    } else {
        Verdict::Allow
    }
}

fn targeted(r: &Resource) -> bool {
    matches!(r, Resource::AuthorizationPolicy(p) if p.spec.targets().next().is_some())
}

/// A DENY on `r`'s service matching exactly its source, port, method and path.
fn exact_deny(r: &Req) -> String {
    let principal = r.id.as_ref().map(|id| format!("principals: [\"{}\"], ", id.principal()));
    on_service(
        &r.ns,
        "zz-deny",
        &r.service,
        &format!(
            "action: DENY, rules: [{{from: [{{source: {{{}ipBlocks: [\"{}\"]}}}}], to: \
             [{{operation: {{ports: [{}], methods: [{}], paths: [\"{}\"]}}}}]}}]",
            principal.unwrap_or_default(),
            r.ip,
            r.port,
            r.method,
            r.path
        ),
    )
}

#[test]
fn random_policy_sets_agree_and_split_between_l4_and_l7() {
    let mut rng = Rng(0x5eed_7a11_0bad_cafe);
    for round in 0..3000 {
        let yaml = random_policies(&mut rng);
        let parsed = resources(&yaml);
        let a = Authz::build(&parsed);
        let r = random_req(&mut rng);
        let ctx = format!("round {round}: {} {} {:?}\n{yaml}", r.method, r.path, r.target());
        let e = r.explain(&a);
        assert_eq!(e.decision.verdict, verdict_from_traces(&e), "{ctx}");
        let audited: Vec<&str> = e
            .policies
            .iter()
            .filter(|p| p.action == Action::Audit && p.matched)
            .map(|p| p.policy.as_str())
            .collect();
        assert_eq!(e.decision.audited, audited, "{ctx}");
        assert!(e.policies.iter().all(|p| matches!(p.scope, Scope::Service | Scope::Gateway)));
        assert_eq!(a.has_targeted_policies(&r.target()), !e.policies.is_empty(), "{ctx}");

        let with_query = r.clone().call(&r.method, &format!("{}?q=/admin", r.path));
        assert_eq!(with_query.decide(&a), e.decision, "query {ctx}");

        let (l7, l4): (Vec<Resource>, Vec<Resource>) = parsed.iter().cloned().partition(targeted);
        assert_eq!(r.decide(&Authz::build(&l7)), e.decision, "L7 takes targetRefs only {ctx}");
        assert_eq!(r.l4(&Authz::build(&l4)), r.l4(&a), "L4 ignores targetRefs {ctx}");

        let d = r.decide(&Authz::build(&resources(&format!("{yaml}{}", exact_deny(&r)))));
        assert_eq!(d.verdict, Verdict::Deny, "{ctx}");
        assert!(d.policy.is_some(), "{ctx}");
    }
}

#[test]
fn the_single_target_ref_form_attaches_as_target_refs_does() {
    let a = authz(&[policy(
        "shop",
        "deny-all",
        "{targetRef: {kind: Service, name: reviews}, action: DENY, rules: [{}]}",
    )]);
    assert!(!Req::to("shop", "reviews").allowed(&a));
    assert!(Req::to("shop", "ratings").allowed(&a));
    assert!(Req::to("shop", "reviews").l4(&a).allowed(), "not the agents'");
}
