//! L4 authorization: Istio semantics for scoping, matching and the decision order, and
//! `check` agreeing with `explain` everywhere.

mod common;

use std::{collections::BTreeMap, net::IpAddr};

use common::{Rng, resources};
use sinew_identity::SpiffeId;
use sinew_mesh::{Authz, Decision, Destination, Explanation, Scope, Source, Verdict};
use sinew_model::{Action, MtlsMode, Resource};

fn policy(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.sinew.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, \
         namespace: {ns}}}\nspec: {spec}\n---\n"
    )
}

fn peer(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.sinew.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, \
         namespace: {ns}}}\nspec: {spec}\n---\n"
    )
}

fn authz(docs: &[String]) -> Authz {
    Authz::build(&resources(&docs.concat()))
}

/// A connection: destination namespace, labels and port; source identity and address.
#[derive(Clone)]
struct Conn {
    ns: String,
    labels: BTreeMap<String, String>,
    port: u16,
    id: Option<SpiffeId>,
    ip: IpAddr,
}

impl Conn {
    /// To `ns` on port 80, from `cluster.local/ns/client/sa/client` at 10.0.0.9.
    fn to(ns: &str) -> Self {
        Self {
            ns: ns.into(),
            labels: BTreeMap::new(),
            port: 80,
            id: Some(SpiffeId::new("cluster.local", "client", "client").unwrap()),
            ip: "10.0.0.9".parse().unwrap(),
        }
    }

    fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
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

    fn with_id(mut self, id: &str) -> Self {
        self.id = Some(id.parse().unwrap());
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

    /// `explain`, after checking that its decision is `check`'s.
    fn explain(&self, a: &Authz) -> Explanation {
        let dst = Destination { namespace: &self.ns, labels: &self.labels, port: self.port };
        let src = Source { identity: self.id.as_ref(), ip: self.ip };
        let explanation = a.explain(&dst, &src);
        assert_eq!(explanation.decision, a.check(&dst, &src), "check and explain disagree");
        explanation
    }

    fn decide(&self, a: &Authz) -> Decision {
        self.explain(a).decision
    }

    fn allowed(&self, a: &Authz) -> bool {
        self.decide(a).allowed()
    }
}

#[test]
fn no_policies_allow() {
    let a = Authz::default();
    assert!(a.is_empty());
    let d = Conn::to("shop").plaintext().decide(&a);
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!((d.policy, d.reason.as_ref()), (None, "allowed: no ALLOW policy applies"));
    assert!(matches!(d.reason, std::borrow::Cow::Borrowed(_)), "no allocation for the default");
}

#[test]
fn deny_by_service_account_blocks_only_that_account() {
    let spec = "{action: DENY, rules: [{from: [{source: {serviceAccounts: [sleep]}}]}]}";
    let a = authz(&[policy("shop", "deny-sleep", spec)]);
    let d = Conn::to("shop").from("shop", "sleep").decide(&a);
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.policy.as_deref(), Some("shop/deny-sleep"));
    assert_eq!(d.reason, "denied by DENY policy shop/deny-sleep (rule 0)");
    assert!(Conn::to("shop").from("shop", "web").allowed(&a));
    assert!(Conn::to("shop").from("other", "sleep").allowed(&a), "bare name: the policy's ns");
    let qualified = "{action: DENY, rules: [{from: [{source: {serviceAccounts: [other/sleep]}}]}]}";
    let a = authz(&[policy("shop", "deny-other", qualified)]);
    assert!(!Conn::to("shop").from("other", "sleep").allowed(&a));
    assert!(Conn::to("shop").from("shop", "sleep").allowed(&a));
}

#[test]
fn allow_admits_only_listed_principals_and_namespaces() {
    let a = authz(&[policy(
        "shop",
        "allow-web",
        "{rules: [{from: [{source: {principals: [cluster.local/ns/front/sa/web]}}, \
         {source: {namespaces: [ops]}}]}]}",
    )]);
    let d = Conn::to("shop").from("front", "web").decide(&a);
    assert_eq!((d.verdict, d.policy.as_deref()), (Verdict::Allow, Some("shop/allow-web")));
    assert_eq!(d.reason, "allowed by ALLOW policy shop/allow-web (rule 0)");
    assert!(Conn::to("shop").from("ops", "anything").allowed(&a));
    let d = Conn::to("shop").from("front", "other").decide(&a);
    assert_eq!((d.verdict, d.policy), (Verdict::Deny, None));
    assert_eq!(d.reason, "denied: ALLOW policies apply (shop/allow-web) and none matches");
    assert!(!Conn::to("shop").plaintext().allowed(&a));
    assert!(Conn::to("elsewhere").plaintext().allowed(&a), "no ALLOW applies there");
}

#[test]
fn deny_wins_over_allow_and_audit_never_changes_the_verdict() {
    let all = "rules: [{from: [{source: {namespaces: [front]}}]}]";
    let a = authz(&[
        policy("shop", "allow", &format!("{{action: ALLOW, {all}}}")),
        policy("shop", "deny", &format!("{{action: DENY, {all}}}")),
        policy("shop", "audit", &format!("{{action: AUDIT, {all}}}")),
        policy(
            "shop",
            "audit-other",
            "{action: AUDIT, rules: [{to: [{operation: {ports: [1]}}]}]}",
        ),
    ]);
    let d = Conn::to("shop").from("front", "web").decide(&a);
    assert_eq!((d.verdict, d.policy.as_deref()), (Verdict::Deny, Some("shop/deny")));
    assert_eq!(d.audited, ["shop/audit"], "AUDIT is reported even when denied");

    let audit_only = authz(&[policy("shop", "audit", &format!("{{action: AUDIT, {all}}}"))]);
    let d = Conn::to("shop").from("front", "web").decide(&audit_only);
    assert_eq!((d.verdict, d.audited), (Verdict::Allow, vec!["shop/audit".to_owned()]));
    assert_eq!(d.reason, "allowed: no ALLOW policy applies", "AUDIT is not an ALLOW");
    assert!(Conn::to("shop").from("back", "web").decide(&audit_only).audited.is_empty());
}

#[test]
fn mesh_namespace_and_other_namespace_scopes() {
    let deny_ops = "{action: DENY, rules: [{from: [{source: {namespaces: [ops]}}]}]}";
    let a = authz(&[
        policy("sinew-system", "mesh-deny-ops", deny_ops),
        policy("shop", "allow-front", "{rules: [{from: [{source: {namespaces: [front]}}]}]}"),
    ]);
    for ns in ["shop", "bank", "sinew-system"] {
        let d = Conn::to(ns).from("ops", "x").decide(&a);
        assert_eq!(d.policy.as_deref(), Some("sinew-system/mesh-deny-ops"), "{ns}");
    }
    assert!(Conn::to("shop").from("front", "x").allowed(&a));
    assert!(!Conn::to("shop").from("back", "x").allowed(&a));
    assert!(Conn::to("bank").from("back", "x").allowed(&a), "shop's ALLOW is not bank's");
    let scopes: Vec<Scope> =
        Conn::to("shop").explain(&a).policies.iter().map(|p| p.scope).collect();
    assert_eq!(scopes, [Scope::Mesh, Scope::Namespace]);
}

#[test]
fn workload_selector_scoping() {
    let deny_all = "action: DENY, rules: [{}]";
    let a = authz(&[
        policy(
            "shop",
            "deny-db",
            &format!("{{selector: {{matchLabels: {{app: db}}}}, {deny_all}}}"),
        ),
        policy(
            "sinew-system",
            "deny-legacy",
            &format!("{{selector: {{matchLabels: {{legacy: \"true\"}}}}, {deny_all}}}"),
        ),
    ]);
    assert!(!Conn::to("shop").label("app", "db").allowed(&a));
    assert!(Conn::to("shop").label("app", "web").allowed(&a));
    assert!(Conn::to("bank").label("app", "db").allowed(&a), "selector is namespace-local");
    for ns in ["shop", "bank"] {
        let e = Conn::to(ns).label("legacy", "true").explain(&a);
        assert_eq!(e.decision.policy.as_deref(), Some("sinew-system/deny-legacy"));
        assert_eq!(e.policies[0].scope, Scope::Workload);
    }
    assert!(Conn::to("bank").label("legacy", "false").allowed(&a));
    assert!(Conn::to("bank").explain(&a).policies.is_empty());
}

#[test]
fn ip_blocks_v4_v6_and_mapped_sources() {
    let a = authz(&[policy(
        "shop",
        "allow-nets",
        "{rules: [{from: [{source: {ipBlocks: [10.1.0.0/16, \"2001:db8::/32\", 192.168.1.7]}}]}]}",
    )]);
    for ip in ["10.1.2.3", "::ffff:10.1.2.3", "2001:db8::42", "192.168.1.7"] {
        assert!(Conn::to("shop").ip(ip).plaintext().allowed(&a), "{ip}");
    }
    for ip in ["10.2.0.1", "2001:db9::1", "192.168.1.8", "::ffff:10.2.0.1"] {
        assert!(!Conn::to("shop").ip(ip).allowed(&a), "{ip}");
    }
    let why = &Conn::to("shop").ip("10.2.0.1").explain(&a).policies[0].why;
    assert_eq!(
        why,
        &[
            "rule 0: from[0].source.ipBlocks: 10.2.0.1 not in [10.1.0.0/16, 2001:db8::/32, 192.168.1.7]"
        ]
    );
}

#[test]
fn not_ip_blocks() {
    let a = authz(&[policy(
        "shop",
        "deny-outside",
        "{action: DENY, rules: [{from: [{source: {notIpBlocks: [10.0.0.0/8, \"fd00::/8\"]}}]}]}",
    )]);
    assert!(Conn::to("shop").ip("10.9.9.9").allowed(&a));
    assert!(Conn::to("shop").ip("::ffff:10.9.9.9").allowed(&a), "mapped folds to v4");
    assert!(Conn::to("shop").ip("fd00::1").allowed(&a));
    assert!(!Conn::to("shop").ip("172.16.0.1").allowed(&a));
    assert!(!Conn::to("shop").ip("2001:db8::1").allowed(&a));
}

#[test]
fn ports_and_not_ports() {
    let a = authz(&[
        policy("shop", "allow-web", "{rules: [{to: [{operation: {ports: [80, \"443\"]}}]}]}"),
        policy(
            "shop",
            "deny-admin",
            "{action: DENY, rules: [{to: [{operation: {notPorts: [80, 443, 9000]}}]}]}",
        ),
    ]);
    assert!(Conn::to("shop").port(80).allowed(&a));
    assert!(Conn::to("shop").port(443).allowed(&a));
    let d = Conn::to("shop").port(9000).decide(&a);
    assert_eq!((d.verdict, d.policy), (Verdict::Deny, None), "not in ALLOW, not DENY either");
    let e = Conn::to("shop").port(8080).explain(&a);
    assert_eq!(e.decision.policy.as_deref(), Some("shop/deny-admin"));
    assert_eq!(e.policies[1].why, ["rule 0: to[0].operation.ports: 8080 not in [80, 443]"]);
    let e = Conn::to("shop").port(80).explain(&a);
    assert_eq!(e.policies[0].why, ["rule 0: to[0].operation.notPorts: 80 in [80, 443, 9000]"]);
}

#[test]
fn principal_wildcards() {
    let allow = |p: &str| {
        authz(&[policy(
            "shop",
            "p",
            &format!("{{rules: [{{from: [{{source: {{principals: [\"{p}\"]}}}}]}}]}}"),
        )])
    };
    let id = "spiffe://cluster.local/ns/front/sa/web";
    for (pattern, want) in [
        ("*", true),
        ("cluster.local/ns/front/sa/web", true),
        ("cluster.local/ns/front/*", true),
        ("cluster.local/ns/fr*", true),
        ("*/sa/web", true),
        ("*/ns/front/sa/web", true),
        ("*web", true),
        ("cluster.local/ns/back/*", false),
        ("*/sa/api", false),
        ("cluster.local/ns/front/sa/we", false),
        ("other.domain/ns/front/sa/web", false),
    ] {
        assert_eq!(Conn::to("shop").with_id(id).allowed(&allow(pattern)), want, "{pattern}");
        assert!(!Conn::to("shop").plaintext().allowed(&allow(pattern)), "{pattern}: plaintext");
    }
}

#[test]
fn plaintext_sources_against_identity_fields() {
    let deny = |field: &str, value: &str| {
        authz(&[policy(
            "shop",
            "d",
            &format!(
                "{{action: DENY, rules: [{{from: [{{source: {{{field}: [\"{value}\"]}}}}]}}]}}"
            ),
        )])
    };
    for (field, value) in [("principals", "*"), ("namespaces", "*"), ("serviceAccounts", "client")]
    {
        assert!(Conn::to("shop").plaintext().allowed(&deny(field, value)), "{field}");
    }
    for (field, value) in
        [("notPrincipals", "*"), ("notNamespaces", "client"), ("notServiceAccounts", "x/y")]
    {
        assert!(!Conn::to("shop").plaintext().allowed(&deny(field, value)), "{field}");
    }
    assert!(Conn::to("shop").allowed(&deny("notPrincipals", "*")), "mTLS passes");
    assert!(!Conn::to("shop").from("a", "b").allowed(&deny("notNamespaces", "client")));
    let e = Conn::to("shop").plaintext().explain(&deny("principals", "*"));
    assert_eq!(
        e.policies[0].why,
        ["rule 0: from[0].source.principals: plaintext source has no identity"]
    );
}

#[test]
fn not_principals_and_not_namespaces_with_identity() {
    let a = authz(&[policy(
        "shop",
        "allow-not-ops",
        "{rules: [{from: [{source: {namespaces: [\"*\"], notNamespaces: [ops], \
         notPrincipals: [\"*/sa/root\"]}}]}]}",
    )]);
    assert!(Conn::to("shop").from("front", "web").allowed(&a));
    assert!(!Conn::to("shop").from("ops", "web").allowed(&a));
    assert!(!Conn::to("shop").from("front", "root").allowed(&a));
    assert!(!Conn::to("shop").plaintext().allowed(&a), "namespaces: [*] needs an identity");
    let e = Conn::to("shop").from("ops", "web").explain(&a);
    assert_eq!(e.policies[0].why, ["rule 0: from[0].source.notNamespaces: ops in [ops]"]);
    let e = Conn::to("shop").from("front", "root").explain(&a);
    assert_eq!(
        e.policies[0].why,
        ["rule 0: from[0].source.notPrincipals: cluster.local/ns/front/sa/root in [*/sa/root]"]
    );
}

#[test]
fn namespaces_match_with_a_prefix_or_suffix_wildcard() {
    let a = authz(&[policy(
        "shop",
        "allow-prod",
        "{rules: [{from: [{source: {namespaces: [\"prod-*\", \"*-edge\"]}}]}]}",
    )]);
    assert!(Conn::to("shop").from("prod-eu", "web").allowed(&a));
    assert!(Conn::to("shop").from("eu-edge", "web").allowed(&a));
    assert!(!Conn::to("shop").from("staging", "web").allowed(&a));
    // A `*` inside, or a name with other characters, is refused at load.
    for bad in ["pr*d", "*prod*", "Prod-*", "*"] {
        let doc = policy(
            "shop",
            "x",
            &format!("{{rules: [{{from: [{{source: {{namespaces: [\"{bad}\"]}}}}]}}]}}"),
        );
        let parsed = sinew_model::parse_file(std::path::Path::new("t.yaml"), &doc).expect("YAML");
        let refused = parsed.iter().any(|r| r.is_err());
        assert_eq!(refused, bad != "*", "{bad}");
    }
}

#[test]
fn l7_fields_never_match_in_allow() {
    let a = authz(&[policy(
        "shop",
        "allow-get",
        "{rules: [{to: [{operation: {ports: [80]}}, {operation: {methods: [GET]}}]}, \
         {from: [{source: {namespaces: [ops]}}]}]}",
    )]);
    let e = Conn::to("shop").from("front", "web").explain(&a);
    assert_eq!(e.decision.verdict, Verdict::Deny);
    assert_eq!(
        e.policies[0].why[0].as_str(),
        "rule 0: to[1].operation.methods: L7 field, not evaluated at L4: an ALLOW rule with it never matches"
    );
    assert!(Conn::to("shop").from("ops", "web").allowed(&a), "rule 1 has no L7 field");
}

#[test]
fn l7_fields_are_ignored_in_deny_and_audit() {
    let a = authz(&[
        policy(
            "shop",
            "deny-post",
            "{action: DENY, rules: [{to: [{operation: {methods: [POST], ports: [80]}}]}]}",
        ),
        policy(
            "shop",
            "audit-admin",
            "{action: AUDIT, rules: [{to: [{operation: {paths: [/admin*]}}]}]}",
        ),
    ]);
    let e = Conn::to("shop").port(80).explain(&a);
    assert_eq!(e.decision.verdict, Verdict::Deny);
    assert_eq!(
        e.decision.reason,
        "denied by DENY policy shop/deny-post (rule 0, L7 fields ignored at L4)"
    );
    assert_eq!(e.decision.audited, ["shop/audit-admin"]);
    assert!(
        e.policies[0].why[1].contains("methods: L7 field ignored at L4"),
        "{:?}",
        e.policies[0].why
    );
    let d = Conn::to("shop").port(81).decide(&a);
    assert_eq!((d.verdict, d.audited.len()), (Verdict::Allow, 1), "ports still apply");
}

#[test]
fn empty_rules_match_nothing_and_an_empty_rule_matches_everything() {
    let allow_nothing = authz(&[policy("shop", "p", "{action: ALLOW}")]);
    let e = Conn::to("shop").explain(&allow_nothing);
    assert_eq!(e.decision.reason, "denied: ALLOW policies apply (shop/p) and none matches");
    assert_eq!(e.policies[0].why, ["no rules: matches nothing"]);
    let no_spec = resources(
        "apiVersion: security.sinew.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec: {}\n",
    );
    assert!(!Conn::to("shop").allowed(&Authz::build(&no_spec)), "spec: {{}} allows nothing");
    assert!(Conn::to("shop").allowed(&authz(&[policy("shop", "p", "{action: DENY}")])));
    assert!(
        Conn::to("shop")
            .decide(&authz(&[policy("shop", "p", "{action: AUDIT}")]))
            .audited
            .is_empty()
    );
    assert!(Conn::to("shop").plaintext().allowed(&authz(&[policy("shop", "p", "{rules: [{}]}")])));
    let deny_all = authz(&[policy("shop", "p", "{action: DENY, rules: [{}]}")]);
    assert!(!Conn::to("shop").plaintext().allowed(&deny_all));
    let empty_parts = authz(&[policy("shop", "p", "{action: DENY, rules: [{from: [], to: []}]}")]);
    assert!(!Conn::to("shop").allowed(&empty_parts), "empty from/to match everything");
}

#[test]
fn first_deny_in_evaluation_order_decides_whatever_the_input_order() {
    let deny = "{action: DENY, rules: [{}]}";
    let docs = [
        policy("shop", "b-deny", deny),
        policy(
            "shop",
            "w-deny",
            "{selector: {matchLabels: {app: web}}, action: DENY, rules: [{}]}",
        ),
        policy("sinew-system", "z-mesh", deny),
        policy("shop", "a-deny", deny),
    ];
    let mut reversed = docs.clone();
    reversed.reverse();
    for a in [authz(&docs), authz(&reversed)] {
        let e = Conn::to("shop").label("app", "web").explain(&a);
        assert_eq!(e.decision.policy.as_deref(), Some("sinew-system/z-mesh"));
        let order: Vec<&str> = e.policies.iter().map(|p| p.policy.as_str()).collect();
        assert_eq!(order, ["sinew-system/z-mesh", "shop/a-deny", "shop/b-deny", "shop/w-deny"]);
        assert!(e.policies.iter().all(|p| p.matched && p.action == Action::Deny));
    }
}

#[test]
fn explanation_serializes_as_json() {
    let a = authz(&[
        policy(
            "shop",
            "deny-sleep",
            "{action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/sleep]}}]}]}",
        ),
        peer("shop", "strict", "{mtls: {mode: STRICT}}"),
    ]);
    let e = Conn::to("shop").from("shop", "web").explain(&a);
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["decision"]["verdict"], "allow");
    assert_eq!(json["decision"]["policy"], serde_json::Value::Null);
    assert_eq!(json["mtls_mode"], "STRICT");
    let p = &json["policies"][0];
    assert_eq!(p["policy"], "shop/deny-sleep");
    assert_eq!(p["action"], "DENY");
    assert_eq!(p["scope"], "namespace");
    assert_eq!(p["matched"], false);
    assert_eq!(
        p["why"][0],
        "rule 0: from[0].source.principals: cluster.local/ns/shop/sa/web not in [cluster.local/ns/shop/sa/sleep]"
    );
}

#[test]
fn peer_authentication_precedence() {
    let labels = |app: &str| BTreeMap::from([("app".to_owned(), app.to_owned())]);
    let a = authz(&[
        peer("sinew-system", "mesh", "{mtls: {mode: STRICT}}"),
        peer("shop", "ns", "{mtls: {mode: PERMISSIVE}}"),
        peer("shop", "legacy", "{selector: {matchLabels: {app: legacy}}, mtls: {mode: DISABLE}}"),
        peer("shop", "inherit", "{selector: {matchLabels: {app: inherit}}, mtls: {mode: UNSET}}"),
        peer("bank", "unset", "{}"),
        peer("bank", "web-strict", "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}"),
    ]);
    assert_eq!(a.mtls_mode("shop", &labels("legacy"), 8080), MtlsMode::Disable, "workload wins");
    assert_eq!(a.mtls_mode("shop", &labels("web"), 8080), MtlsMode::Permissive, "namespace");
    assert_eq!(
        a.mtls_mode("shop", &labels("inherit"), 8080),
        MtlsMode::Permissive,
        "UNSET: namespace"
    );
    assert_eq!(a.mtls_mode("bank", &labels("db"), 8080), MtlsMode::Strict, "UNSET namespace: mesh");
    assert_eq!(a.mtls_mode("bank", &labels("web"), 8080), MtlsMode::Strict);
    assert_eq!(a.mtls_mode("other", &BTreeMap::new(), 8080), MtlsMode::Strict, "mesh");
    assert_eq!(
        a.mtls_mode("bank", &labels("legacy"), 8080),
        MtlsMode::Strict,
        "selector is ns-local"
    );
    assert!(a.is_empty(), "PeerAuthentications are not authorization policies");
    let none = Authz::default();
    assert_eq!(none.mtls_mode("shop", &BTreeMap::new(), 8080), MtlsMode::Permissive, "default");
    let unset = authz(&[peer("sinew-system", "mesh", "{mtls: {mode: UNSET}}")]);
    assert_eq!(unset.mtls_mode("shop", &BTreeMap::new(), 8080), MtlsMode::Permissive);

    // `selector: {}` is no selector: mesh-wide in the root namespace, namespace-wide elsewhere.
    let empty = authz(&[
        peer("sinew-system", "m", "{selector: {}, mtls: {mode: STRICT}}"),
        peer("bank", "n", "{selector: {matchLabels: {}}, mtls: {mode: DISABLE}}"),
    ]);
    assert_eq!(empty.mtls_mode("shop", &BTreeMap::new(), 8080), MtlsMode::Strict);
    assert_eq!(empty.mtls_mode("bank", &labels("db"), 8080), MtlsMode::Disable);

    // Two at one level: the oldest wins, whatever the names.
    let aged = |name: &str, ts: &str, mode: &str| {
        format!(
            "apiVersion: security.sinew.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, \
             namespace: shop, creationTimestamp: \"{ts}\"}}\nspec: {{mtls: {{mode: {mode}}}}}\n---\n"
        )
    };
    let both = authz(&[
        aged("a", "2026-05-01T00:00:00Z", "PERMISSIVE"),
        aged("b", "2026-01-01T00:00:00Z", "STRICT"),
    ]);
    assert_eq!(both.mtls_mode("shop", &BTreeMap::new(), 8080), MtlsMode::Strict);
}

#[test]
fn port_level_modes_override_their_workload_policy_on_their_ports() {
    let labels = |app: &str| BTreeMap::from([("app".to_owned(), app.to_owned())]);
    let a = authz(&[
        peer("shop", "ns", "{mtls: {mode: STRICT}}"),
        // Istio's usual case: STRICT, but a metrics port scraped in plaintext.
        peer(
            "shop",
            "web",
            "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {9090: \
             {mode: PERMISSIVE}, \"9091\": {mode: DISABLE}, 9092: {mode: UNSET}}}",
        ),
        // Only ports: the rest inherits from the namespace.
        peer(
            "shop",
            "db",
            "{selector: {matchLabels: {app: db}}, portLevelMtls: {5432: {mode: PERMISSIVE}}}",
        ),
    ]);
    let mode = |app: &str, port: u16| a.mtls_mode("shop", &labels(app), port);
    assert_eq!(mode("web", 8080), MtlsMode::Strict);
    assert_eq!(mode("web", 9090), MtlsMode::Permissive);
    assert_eq!(mode("web", 9091), MtlsMode::Disable, "a port given as a string");
    assert_eq!(mode("web", 9092), MtlsMode::Strict, "UNSET: the workload's mode");
    assert_eq!(mode("db", 5432), MtlsMode::Permissive);
    assert_eq!(mode("db", 5433), MtlsMode::Strict, "the namespace's");
    assert_eq!(mode("cache", 9090), MtlsMode::Strict, "another workload's ports are its own");
}

#[test]
fn port_level_modes_need_a_selector_and_valid_ports() {
    let refused = |spec: &str| -> Option<String> {
        let yaml = peer("shop", "p", spec);
        match sinew_model::parse_file(std::path::Path::new("p.yaml"), &yaml) {
            Err(e) => Some(e.to_string()),
            Ok(r) => r
                .into_iter()
                .next()?
                .err()
                .map(|r| r.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")),
        }
    };
    for spec in [
        "{mtls: {mode: STRICT}, portLevelMtls: {9090: {mode: PERMISSIVE}}}",
        "{selector: {matchLabels: {}}, portLevelMtls: {9090: {mode: PERMISSIVE}}}",
    ] {
        let err = refused(spec).unwrap_or_else(|| panic!("accepted: {spec}"));
        assert!(err.contains("spec.portLevelMtls") && err.contains("selector"), "{err}");
    }
    for port in ["0", "70000", "x"] {
        let spec = format!(
            "{{selector: {{matchLabels: {{app: a}}}}, portLevelMtls: {{\"{port}\": {{}}}}}}"
        );
        assert!(refused(&spec).is_some(), "port {port}");
    }
    let fine = "{selector: {matchLabels: {app: a}}, portLevelMtls: {9090: {mode: STRICT}}}";
    assert_eq!(refused(fine), None);
}

#[test]
fn when_conditions_on_l4_attributes() {
    let a = authz(&[policy(
        "shop",
        "conditions",
        "{rules: [{when: [{key: source.namespace, values: [\"front*\"]}, {key: destination.port, \
         notValues: [\"9090\"]}]}, {when: [{key: source.ip, values: [10.1.0.0/16]}, {key: \
         source.principal, notValues: [cluster.local/ns/back/sa/*]}]}]}",
    )]);
    assert!(Conn::to("shop").from("front", "web").allowed(&a));
    assert!(Conn::to("shop").from("front-2", "web").port(8080).allowed(&a));
    let e = Conn::to("shop").from("front", "web").port(9090).explain(&a);
    assert_eq!(
        e.policies[0].why,
        [
            "rule 0: when[1] destination.port: 9090 in notValues [9090]",
            "rule 1: when[0] source.ip: 10.0.0.9 not in [10.1.0.0/16]",
        ]
    );
    let e = Conn::to("shop").from("back", "web").explain(&a);
    assert_eq!(e.policies[0].why[0], "rule 0: when[0] source.namespace: back not in [front*]");
    // Without an identity, `values` fail and `notValues` pass.
    let e = Conn::to("shop").plaintext().explain(&a);
    assert_eq!(
        e.policies[0].why[0],
        "rule 0: when[0] source.namespace: no value (no identity, or no such header)"
    );
    assert!(Conn::to("shop").plaintext().ip("10.1.2.3").allowed(&a));
    assert!(
        !Conn::to("shop").with_id("spiffe://cluster.local/ns/back/sa/a").ip("10.1.2.3").allowed(&a)
    );
}

#[test]
fn a_header_condition_is_l7() {
    // An ALLOW rule with one never matches a connection; a DENY rule matches without it.
    let a = authz(&[
        policy(
            "shop",
            "allow-header",
            "{rules: [{when: [{key: \"request.headers[x-user]\", values: [admin]}]}]}",
        ),
        policy(
            "bank",
            "deny-header",
            "{action: DENY, rules: [{from: [{source: {namespaces: [client]}}], when: [{key: \
             \"request.headers[x-user]\", notValues: [admin]}]}]}",
        ),
    ]);
    let e = Conn::to("shop").explain(&a);
    assert!(!e.decision.allowed());
    assert_eq!(
        e.policies[0].why,
        ["rule 0: when[0] request.headers[x-user]: L7 field, not evaluated at L4: an ALLOW \
             rule with it never matches"]
    );
    let d = Conn::to("bank").decide(&a);
    assert_eq!(
        d.reason,
        "denied by DENY policy bank/deny-header (rule 0, L7 fields ignored at L4)"
    );
}

#[test]
fn condition_keys_and_values_are_checked() {
    let refused = |when: &str| -> String {
        let yaml = policy("shop", "p", &format!("{{rules: [{{when: [{when}]}}]}}"));
        let docs = sinew_model::parse_file(std::path::Path::new("p.yaml"), &yaml).unwrap();
        let r = docs.into_iter().next().unwrap().expect_err(when);
        r.errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    };
    let e = refused("{key: \"request.auth.claims[iss]\", values: [x]}");
    assert!(e.contains("rules[0].when[0].key") && e.contains("does not evaluate"), "{e}");
    let e = refused("{key: source.nonsense, values: [x]}");
    assert!(e.contains("is not a condition key"), "{e}");
    assert!(refused("{key: source.ip}").contains("needs values or notValues"));
    assert!(refused("{key: source.ip, values: [nowhere]}").contains("when[0].values[0]"));
    assert!(refused("{key: destination.port, notValues: [\"0\"]}").contains("not a port"));
    assert!(refused("{key: \"request.headers[]\", values: [x]}").contains("not an HTTP header"));
    assert!(refused("{key: source.namespace, values: [\"a*b\"]}").contains("prefix or suffix"));
}

#[test]
fn check_equals_explain_on_a_table() {
    let a = authz(&[
        policy(
            "sinew-system",
            "deny-ops",
            "{action: DENY, rules: [{from: [{source: {namespaces: [ops]}}]}]}",
        ),
        policy(
            "shop",
            "allow",
            "{rules: [{from: [{source: {principals: [\"*/sa/web\"]}}], to: [{operation: {ports: [80]}}]}, {from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]}",
        ),
        policy("shop", "audit", "{action: AUDIT, rules: [{to: [{operation: {notPorts: [80]}}]}]}"),
        policy(
            "sinew-system",
            "allow-db",
            "{selector: {matchLabels: {app: db}}, rules: [{from: [{source: {serviceAccounts: [shop/api]}}]}]}",
        ),
    ]);
    let cases = [
        Conn::to("shop").from("front", "web"),
        Conn::to("shop").from("front", "web").port(81).ip("192.168.0.1"),
        Conn::to("shop").from("ops", "web"),
        Conn::to("shop").plaintext().ip("10.2.3.4").port(22),
        Conn::to("shop").plaintext().ip("192.168.0.1"),
        Conn::to("bank").label("app", "db").from("shop", "api"),
        Conn::to("bank").label("app", "db").from("bank", "api"),
        Conn::to("bank"),
    ];
    let verdicts: Vec<bool> = cases.iter().map(|c| c.allowed(&a)).collect();
    assert_eq!(verdicts, [true, false, false, true, false, true, false, true]);
}

const NAMESPACES: &[&str] = &["a", "b", "sinew-system"];
const PRINCIPALS: &[&str] =
    &["*", "cluster.local/ns/a/sa/x", "cluster.local/ns/a/*", "*/sa/y", "other/ns/b/sa/x"];
const SOURCE_NS: &[&str] = &["a", "b", "*"];
const ACCOUNTS: &[&str] = &["x", "b/y", "a/x"];
const BLOCKS: &[&str] = &["10.0.0.0/24", "2001:db8::/32", "10.0.1.5", "::ffff:10.0.1.0/120"];
const PORTS: &[&str] = &["80", "443", "8080"];
const IPS: &[&str] = &["10.0.0.1", "10.0.1.5", "2001:db8::1", "::ffff:10.0.0.1", "192.168.0.1"];

fn random_fields(rng: &mut Rng, fields: &[(&str, &[&str])]) -> String {
    let parts: Vec<String> = fields
        .iter()
        .filter_map(|(name, items)| rng.list(items).map(|l| format!("{name}: {l}")))
        .collect();
    parts.join(", ")
}

fn random_rule(rng: &mut Rng) -> String {
    let source = [
        ("principals", PRINCIPALS),
        ("notPrincipals", PRINCIPALS),
        ("namespaces", SOURCE_NS),
        ("notNamespaces", SOURCE_NS),
        ("serviceAccounts", ACCOUNTS),
        ("notServiceAccounts", ACCOUNTS),
        ("ipBlocks", BLOCKS),
        ("notIpBlocks", BLOCKS),
    ];
    let operation: [(&str, &[&str]); 4] =
        [("ports", PORTS), ("notPorts", PORTS), ("methods", &["GET"]), ("paths", &["/x*"])];
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

fn random_policies(rng: &mut Rng) -> String {
    let mut docs = String::new();
    for i in 0..rng.below(5) {
        let action = rng.pick(&["ALLOW", "DENY", "AUDIT"]);
        let selector = match rng.below(3) {
            0 => format!("selector: {{matchLabels: {{app: {}}}}}, ", rng.pick(&["web", "db"])),
            _ => String::new(),
        };
        let rules: Vec<String> = (0..rng.below(3)).map(|_| random_rule(rng)).collect();
        let spec = format!("{{{selector}action: {action}, rules: [{}]}}", rules.join(", "));
        docs.push_str(&policy(rng.pick(NAMESPACES), &format!("p{i}"), &spec));
    }
    docs
}

fn random_conn(rng: &mut Rng) -> Conn {
    let mut c = Conn::to(rng.pick(NAMESPACES))
        .label("app", rng.pick(&["web", "db"]))
        .port(rng.pick(PORTS).parse().unwrap())
        .ip(rng.pick(IPS));
    c = match rng.below(3) {
        0 => c.plaintext(),
        _ => c.from(rng.pick(&["a", "b"]), rng.pick(&["x", "y"])),
    };
    c
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

#[test]
fn random_policy_sets_agree_and_a_matching_deny_always_denies() {
    let mut rng = Rng(0x5eed_1234_abcd_0042);
    for round in 0..3000 {
        let yaml = random_policies(&mut rng);
        let parsed = resources(&yaml);
        let a = Authz::build(&parsed);
        let conn = random_conn(&mut rng);
        let ctx = format!("round {round}\n{yaml}");
        let e = conn.explain(&a);
        assert_eq!(e.decision.verdict, verdict_from_traces(&e), "{ctx}");
        let audited: Vec<&str> = e
            .policies
            .iter()
            .filter(|p| p.action == Action::Audit && p.matched)
            .map(|p| p.policy.as_str())
            .collect();
        assert_eq!(e.decision.audited, audited, "{ctx}");
        assert!(e.mtls_mode != MtlsMode::Unset);

        let mapped = conn.ip.to_canonical() != conn.ip;
        if let (IpAddr::V4(v4), false) = (conn.ip, mapped) {
            let as_mapped = conn.clone().ip(&v4.to_ipv6_mapped().to_string());
            assert_eq!(as_mapped.decide(&a), e.decision, "mapped source {ctx}");
        }

        let without_audit: Vec<Resource> = parsed
            .iter()
            .filter(|r| !matches!(r, Resource::AuthorizationPolicy(p) if p.spec.action == Action::Audit))
            .cloned()
            .collect();
        assert_eq!(conn.decide(&Authz::build(&without_audit)).verdict, e.decision.verdict, "{ctx}");

        let principal =
            conn.id.as_ref().map(|id| format!("principals: [\"{}\"], ", id.principal()));
        let spec = format!(
            "{{action: DENY, rules: [{{from: [{{source: {{{}ipBlocks: [\"{}\"]}}}}], to: [{{operation: {{ports: [{}]}}}}]}}]}}",
            principal.unwrap_or_default(),
            conn.ip,
            conn.port
        );
        let more = format!("{yaml}{}", policy(&conn.ns, "zz-deny", &spec));
        let d = conn.decide(&Authz::build(&resources(&more)));
        assert_eq!(d.verdict, Verdict::Deny, "{ctx}");
        assert!(d.policy.is_some(), "{ctx}");
    }
}

#[test]
fn label_selection_is_known_per_namespace() {
    let a = authz(&[
        policy("shop", "sel", "{selector: {matchLabels: {app: db}}, rules: [{}]}"),
        policy("bank", "wide", "{rules: [{}]}"),
        peer("pay", "p", "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}"),
    ]);
    assert!(a.selects_by_label("shop"));
    assert!(!a.selects_by_label("bank"), "namespace-wide policies need no labels");
    assert!(a.selects_by_label("pay"), "a selecting PeerAuthentication needs them too");
    assert!(!a.selects_by_label("other"));
    let root =
        authz(&[policy("sinew-system", "r", "{selector: {matchLabels: {app: x}}, rules: [{}]}")]);
    assert!(root.selects_by_label("any"), "root-namespace selectors apply everywhere");
    let all = authz(&[policy("sinew-system", "r", "{selector: {}, rules: [{}]}")]);
    assert!(!all.selects_by_label("any"), "selector: {{}} selects every workload, labels or not");
}
