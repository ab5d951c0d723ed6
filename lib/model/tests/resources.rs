//! Every kind parses from Kubernetes-shaped YAML; every kind of bad input is named precisely;
//! the store never lets a bad version replace a good one.

use std::path::Path;

use sinew_model::{ConfigError, Resource, Store, parse_file};

const ALL_KINDS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    sinew.io/dataplane-mode: ambient
    sinew.io/use-waypoint: shop-waypoint
---
apiVersion: sinew.io/v1alpha1
kind: Workload
metadata:
  name: reviews-v1-abc
  namespace: shop
  labels: {app: reviews, version: v1}
spec:
  serviceAccount: reviews
  node: node-1
  ips: [198.18.1.10, "2001:2:0:1::10"]
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIPs: [198.19.0.10]
  ports:
    - {name: http, port: 9080, targetPort: 8080, appProtocol: http}
  selector: {app: reviews}
---
apiVersion: security.sinew.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewers, namespace: shop}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/shop/sa/productpage"]
            notNamespaces: [untrusted]
            ipBlocks: [198.18.0.0/15]
      to:
        - operation: {ports: ["9080"], methods: [GET], paths: ["/reviews/*"], hosts: ["*.shop"]}
      when:
        - {key: "request.headers[x-team]", values: [reviews]}
        - {key: source.ip, notValues: [198.18.9.0/24]}
---
apiVersion: security.sinew.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
  portLevelMtls:
    9090: {mode: PERMISSIVE}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
    - matches:
        - path: {type: PathPrefix, value: /reviews}
          headers: [{name: x-canary, value: "true"}]
          queryParams: [{type: RegularExpression, name: user, value: "^[a-z]+$"}]
          method: GET
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-route, value: canary}], remove: [x-debug]}
        - type: RequestMirror
          requestMirror: {backendRef: {name: reviews-shadow, port: 9080}, percent: 10}
      backendRefs:
        - {name: reviews-v1, port: 9080, weight: 90}
        - {name: reviews-v2, port: 9080, weight: 10}
      timeouts: {request: 10s, backendRequest: 2s}
      retry: {codes: [503], attempts: 3, backoff: 100ms}
    - matches: [{path: {type: Exact, value: /old}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: cart, namespace: shop}
spec:
  parentRefs: [{name: cart}]
  rules:
    - matches: [{method: {service: shop.Cart, method: Add}}]
      backendRefs: [{name: cart-v2, port: 50051}]
---
apiVersion: networking.sinew.io/v1alpha1
kind: DestinationPolicy
metadata: {name: reviews, namespace: shop}
spec:
  service: reviews
  loadBalancer: {consistentHash: {httpHeaderName: x-user}}
  connectionPool: {maxConnections: 100, maxPendingRequests: 10, maxRequests: 1000, connectTimeout: 1s}
  outlierDetection: {consecutiveErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50}
"#;

fn errors_of(text: &str) -> Vec<ConfigError> {
    parse_file(Path::new("f.yaml"), text)
        .expect("parses as YAML")
        .into_iter()
        .filter_map(Result::err)
        .flat_map(|r| r.errors)
        .collect()
}

fn fields(errors: &[ConfigError]) -> Vec<(&str, &str)> {
    errors.iter().map(|e| (e.resource.as_str(), e.field.as_str())).collect()
}

#[test]
fn every_kind_parses() {
    let docs = parse_file(Path::new("all.yaml"), ALL_KINDS).unwrap();
    let kinds: Vec<&str> = docs
        .iter()
        .map(|d| d.as_ref().map(Resource::kind).unwrap_or_else(|e| panic!("{:?}", e.errors)))
        .collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "Workload",
            "Service",
            "AuthorizationPolicy",
            "PeerAuthentication",
            "HTTPRoute",
            "GRPCRoute",
            "DestinationPolicy"
        ]
    );
    let Ok(Resource::HttpRoute(route)) = &docs[5] else { panic!() };
    assert_eq!(route.spec.rules[0].backend_refs[1].weight, 10);
    assert_eq!(route.spec.rules[0].timeouts.as_ref().unwrap().request.unwrap().0.as_secs(), 10);
}

#[test]
fn every_kind_round_trips_through_json() {
    for doc in parse_file(Path::new("all.yaml"), ALL_KINDS).unwrap() {
        let r = doc.unwrap();
        let back = Resource::from_json("control", &r.to_json())
            .unwrap_or_else(|e| panic!("{}: {e:?}", r.kind()));
        assert_eq!(back, r);
    }
    let err = Resource::from_json("control", b"{\"kind\": \"Service\"}").unwrap_err();
    assert!(err[0].to_string().starts_with("control: Service/: "), "{err:?}");
}

#[test]
fn unknown_fields_are_named_with_their_path() {
    let e = errors_of(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{name: svc}]\n  rules:\n    - matches: [{pathh: {value: /}}]\n",
    );
    assert_eq!(fields(&e), [("HTTPRoute/shop/r", "spec.rules[0].matches[0].pathh")]);
    assert!(e[0].message.contains("unknown field `pathh`"), "{}", e[0].message);
    assert!(
        e[0].to_string()
            .starts_with("f.yaml: HTTPRoute/shop/r: spec.rules[0].matches[0].pathh: unknown field")
    );
}

#[test]
fn out_of_range_values_are_named_all_at_once() {
    let e = errors_of(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{name: svc}]\n  rules:\n    - backendRefs: [{name: a, port: 80, weight: 2000000}]\n      matches: [{path: {type: RegularExpression, value: \"([\"}}]\n      retry: {codes: [200]}\n",
    );
    assert_eq!(
        fields(&e),
        [
            ("HTTPRoute/shop/r", "spec.rules[0].matches[0].path.value"),
            ("HTTPRoute/shop/r", "spec.rules[0].retry.codes[0]"),
            ("HTTPRoute/shop/r", "spec.rules[0].backendRefs[0].weight"),
        ]
    );
    let e = errors_of(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: shop}\nspec:\n  ports: [{port: 70000}]\n",
    );
    assert_eq!(fields(&e), [("Service/shop/s", "spec.ports[0].port")]);
    assert!(e[0].message.contains("out of range"), "{}", e[0].message);
}

#[test]
fn backend_filters_are_limited_to_the_kinds_applied_per_backend() {
    let e = errors_of(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{name: svc}]\n  rules:\n    - backendRefs:\n      - name: a\n        port: 80\n        filters:\n        - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-b, value: a}]}}\n        - {type: RequestRedirect, requestRedirect: {statusCode: 301}}\n",
    );
    assert_eq!(fields(&e), [("HTTPRoute/shop/r", "spec.rules[0].backendRefs[0].filters[1].type")]);
    assert!(e[0].message.contains("put it on the rule"), "{}", e[0].message);
}

#[test]
fn dataplane_mode_labels_are_ambient_or_none_on_namespaces_and_workloads() {
    for kind in ["Namespace", "Workload"] {
        let (api, ns, spec) = match kind {
            "Namespace" => ("v1", "", ""),
            _ => (
                "sinew.io/v1alpha1",
                ", namespace: shop",
                "\nspec: {serviceAccount: web, node: n1, ips: [198.18.1.10]}",
            ),
        };
        let doc = |mode: &str| {
            format!(
                "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: a{ns}, labels: {{sinew.io/dataplane-mode: {mode}}}}}{spec}\n"
            )
        };
        assert!(errors_of(&doc("ambient")).is_empty() && errors_of(&doc("none")).is_empty());
        let e = errors_of(&doc("on"));
        assert_eq!(e.len(), 1, "{kind}: {e:?}");
        assert_eq!(e[0].field, "metadata.labels.sinew.io/dataplane-mode", "{kind}");
        assert!(e[0].message.contains("must be \"ambient\" or \"none\""), "{}", e[0].message);
    }
}

#[test]
fn header_modifier_lists_are_bounded_as_in_gateway_api() {
    let entries = |n: usize| {
        (0..n).map(|i| format!("{{name: x-h{i}, value: v}}")).collect::<Vec<_>>().join(", ")
    };
    let route = |set: &str, add: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec:\n  parentRefs: [{{name: svc}}]\n  rules:\n    - filters:\n      - {{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{set}], add: [{add}]}}}}\n      backendRefs: [{{name: a, port: 80}}]\n"
        )
    };
    assert!(errors_of(&route(&entries(16), &entries(16))).is_empty());
    let e = errors_of(&route(&entries(17), &entries(3)));
    assert_eq!(
        fields(&e),
        [("HTTPRoute/shop/r", "spec.rules[0].filters[0].responseHeaderModifier.set")]
    );
    assert!(e[0].message.contains("17 entries: at most 16"), "{}", e[0].message);
    // And the filters themselves, so that many small modifiers cannot add up either.
    let filter =
        "{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-a, value: b}]}}";
    let many = vec![filter; 17].join(", ");
    let e = errors_of(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec:\n  parentRefs: [{{name: svc}}]\n  rules:\n    - filters: [{many}]\n      backendRefs: [{{name: a, port: 80}}]\n"
    ));
    assert_eq!(fields(&e), [("HTTPRoute/shop/r", "spec.rules[0].filters")]);
    assert!(e[0].message.contains("17 filters: at most 16"), "{}", e[0].message);
}

#[test]
fn filter_values_the_waypoint_could_not_apply_are_named() {
    let e = errors_of(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{name: svc}]\n  rules:\n    - filters:\n      - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: \"x a\", value: ok}], add: [{name: x-b, value: \"a\\nb\"}], remove: [\"\"]}}\n      - {type: URLRewrite, urlRewrite: {hostname: \"Bad_Host\", path: {type: ReplaceFullPath, replaceFullPath: \"no-slash\"}}}\n      - {type: RequestRedirect, requestRedirect: {statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: \"x\"}}}\n      - {type: RequestMirror, requestMirror: {backendRef: {name: Bad, port: 80}}}\n      backendRefs: [{name: a, port: 80}]\n",
    );
    assert_eq!(
        fields(&e),
        [
            ("HTTPRoute/shop/r", "spec.rules[0].filters[0].requestHeaderModifier.set[0].name"),
            ("HTTPRoute/shop/r", "spec.rules[0].filters[0].requestHeaderModifier.add[0].value"),
            ("HTTPRoute/shop/r", "spec.rules[0].filters[0].requestHeaderModifier.remove[0]"),
            ("HTTPRoute/shop/r", "spec.rules[0].filters[1].urlRewrite.hostname"),
            ("HTTPRoute/shop/r", "spec.rules[0].filters[1].urlRewrite.path.replaceFullPath"),
            (
                "HTTPRoute/shop/r",
                "spec.rules[0].filters[2].requestRedirect.path.replacePrefixMatch"
            ),
            ("HTTPRoute/shop/r", "spec.rules[0].filters[3].requestMirror.backendRef.name"),
            // A redirect answers: a rewrite beside it would mean nothing.
            ("HTTPRoute/shop/r", "spec.rules[0].filters"),
        ]
    );
}

#[test]
fn filters_gateway_api_does_not_allow_where_they_stand_are_named() {
    let route = |kind: &str, rule: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata: {{name: r, namespace: shop}}\nspec:\n  parentRefs: [{{name: svc}}]\n  rules:\n{rule}"
        )
    };
    // ReplacePrefixMatch with an Exact match: no prefix to replace (it went through unrewritten).
    let e = errors_of(&route(
        "HTTPRoute",
        "    - matches: [{path: {type: Exact, value: /foo/bar}}]\n      filters:\n      - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}\n      backendRefs: [{name: a, port: 80}]\n",
    ));
    assert_eq!(fields(&e), [("HTTPRoute/shop/r", "spec.rules[0].filters")]);
    assert!(e[0].message.contains("needs every match of the rule to be a PathPrefix"), "{}", e[0]);
    let ok = errors_of(&route(
        "HTTPRoute",
        "    - matches: [{path: {type: PathPrefix, value: /foo}}]\n      filters:\n      - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}\n      backendRefs: [{name: a, port: 80}]\n",
    ));
    assert!(ok.is_empty(), "{ok:?}");
    // GRPCRoute has no redirect or rewrite.
    let e = errors_of(&route(
        "GRPCRoute",
        "    - filters:\n      - {type: RequestRedirect, requestRedirect: {statusCode: 301}}\n      - {type: URLRewrite, urlRewrite: {hostname: other}}\n      backendRefs: [{name: a, port: 80}]\n",
    ));
    assert_eq!(
        fields(&e),
        [
            ("GRPCRoute/shop/r", "spec.rules[0].filters[0].requestRedirect"),
            ("GRPCRoute/shop/r", "spec.rules[0].filters[1].urlRewrite"),
        ]
    );
}

#[test]
fn envelope_mistakes_are_named() {
    let e = errors_of(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n---\nkind: Gizmo\nmetadata: {name: g}\n---\napiVersion: v2\nkind: Namespace\nmetadata: {name: n, namespace: x}\n---\napiVersion: sinew.io/v1alpha1\nkind: Workload\nmetadata: {name: w, namespace: shop}\n",
    );
    assert_eq!(
        fields(&e),
        [
            ("Service/s", "metadata.namespace"),
            ("Gizmo/g", "kind"),
            ("Namespace/n", "apiVersion"),
            ("Namespace/n", "metadata.namespace"),
            ("Workload/shop/w", "spec"),
        ]
    );
}

#[test]
fn policy_fields_are_checked() {
    let e = errors_of(
        "apiVersion: security.sinew.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  action: DENY\n  rules:\n    - from: [{source: {ipBlocks: [300.0.0.0/8], serviceAccounts: [\"a/b/c\"], principals: [\"a*b\"]}}]\n      to: [{operation: {ports: [\"http\"]}}]\n",
    );
    assert_eq!(
        fields(&e),
        [("AuthorizationPolicy/shop/p", "spec.rules[0].to[0].operation.ports[0]")]
    );
    let e = errors_of(
        "apiVersion: security.sinew.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  action: DENY\n  rules:\n    - from: [{source: {ipBlocks: [300.0.0.0/8], serviceAccounts: [\"a/b/c\"], principals: [\"a*b\"]}}]\n",
    );
    assert_eq!(
        fields(&e),
        [
            ("AuthorizationPolicy/shop/p", "spec.rules[0].from[0].source.principals[0]"),
            ("AuthorizationPolicy/shop/p", "spec.rules[0].from[0].source.serviceAccounts[0]"),
            ("AuthorizationPolicy/shop/p", "spec.rules[0].from[0].source.ipBlocks[0]"),
        ]
    );
    // Methods: any upper-case RFC 9110 token (WebDAV, SSDP), nothing in lower case.
    let e = errors_of(
        "apiVersion: security.sinew.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  rules:\n    - to: [{operation: {methods: [GET, M-SEARCH, PROPFIND, get, \"GE T\"]}}]\n",
    );
    assert_eq!(
        fields(&e),
        [
            ("AuthorizationPolicy/shop/p", "spec.rules[0].to[0].operation.methods[3]"),
            ("AuthorizationPolicy/shop/p", "spec.rules[0].to[0].operation.methods[4]"),
        ]
    );
}

#[test]
fn store_keeps_the_last_good_version() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    let ns = |name: &str, mode: &str| {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    sinew.io/dataplane-mode: {mode}\n"
        )
    };
    write("a.yaml", &format!("{}---\n{}", ns("shop", "ambient"), ns("blog", "ambient")));
    write("b.yaml", &ns("wiki", "ambient"));
    let mut store = Store::new();
    assert!(store.reload_dir(dir.path()).is_empty());
    assert!(store.namespace_is_ambient("shop") && store.namespace_is_ambient("blog"));

    // shop turns invalid, blog is unlabelled (valid): blog changes, shop keeps its last good.
    write("a.yaml", &format!("{}---\n{}", ns("shop", "sometimes"), ns("blog", "none")));
    // b.yaml breaks as YAML: all of it stays as it was.
    write("b.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: [\n");
    let errors = store.reload_dir(dir.path());
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0]
            .to_string()
            .contains("a.yaml: Namespace/shop: metadata.labels.sinew.io/dataplane-mode")
    );
    assert!(errors[1].to_string().contains("b.yaml: document 1: -: YAML syntax"));
    assert!(store.namespace_is_ambient("shop"), "the bad version must not replace the good one");
    assert!(!store.namespace_is_ambient("blog"), "the rest of the batch applies");
    assert!(store.namespace_is_ambient("wiki"));

    // A removed file takes its resources with it; a duplicate is reported, the first kept.
    std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
    write("c.yaml", &ns("blog", "ambient"));
    let errors = store.reload_dir(dir.path());
    assert!(store.namespace("wiki").is_none());
    assert!(!store.namespace_is_ambient("blog"));
    assert_eq!(
        fields(&errors),
        [
            ("Namespace/shop", "metadata.labels.sinew.io/dataplane-mode"),
            ("Namespace/blog", "metadata.name")
        ]
    );
    assert!(
        errors[1].to_string().contains("c.yaml: Namespace/blog: metadata.name: also defined in"),
        "{errors:?}"
    );

    // An unreadable directory keeps everything.
    let errors = store.reload_dir(&dir.path().join("missing"));
    assert_eq!(errors.len(), 1);
    assert!(store.namespace_is_ambient("shop"));
}

#[test]
fn a_document_broken_in_its_kind_or_name_takes_nothing_out_of_service() {
    let dir = tempfile::tempdir().unwrap();
    let write = |text: &str| std::fs::write(dir.path().join("a.yaml"), text).unwrap();
    let ns = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    sinew.io/dataplane-mode: ambient\n"
        )
    };
    write(&format!("{}---\n{}", ns("shop"), ns("blog")));
    let mut store = Store::new();
    assert!(store.reload_dir(dir.path()).is_empty());

    // shop's kind is misspelled, blog's name lost its indentation: neither can be matched to
    // what it replaces, so both keep their last good version.
    write(&format!(
        "{}---\napiVersion: v1\nkind: Namespace\nmetadata:\nname: blog\n",
        ns("shop").replace("kind: Namespace", "kind: Namespac")
    ));
    let errors = store.reload_dir(dir.path());
    assert_eq!(
        fields(&errors),
        [("Namespac/shop", "kind"), ("Namespace/", "metadata.name"), ("Namespace/", "metadata")]
    );
    assert!(errors[1].to_string().ends_with("metadata.name: missing"), "{errors:?}");
    assert!(store.namespace_is_ambient("shop") && store.namespace_is_ambient("blog"));

    // Fixed, with blog removed on purpose: now it goes.
    write(&ns("shop"));
    assert!(store.reload_dir(dir.path()).is_empty());
    assert!(store.namespace("blog").is_none() && store.namespace_is_ambient("shop"));

    // Twice in one file: reported, and the first definition is used.
    write(&format!("{}---\n{}", ns("shop"), ns("shop").replace("ambient", "none")));
    let errors = store.reload_dir(dir.path());
    assert_eq!(fields(&errors), [("Namespace/shop", "metadata.name")]);
    assert!(errors[0].to_string().contains("defined twice in this file"), "{errors:?}");
    assert!(store.namespace_is_ambient("shop"));
}

#[test]
fn a_resource_over_a_mebibyte_is_refused() {
    let principals: Vec<String> =
        (0..40_000).map(|i| format!("cluster.local/ns/shop/sa/client-{i:08}")).collect();
    let text = format!(
        "apiVersion: security.sinew.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: big, namespace: shop}}\nspec:\n  action: ALLOW\n  rules: [{{from: [{{source: {{principals: [{}]}}}}]}}]\n",
        principals.join(", ")
    );
    let e = errors_of(&text);
    assert_eq!(fields(&e), [("AuthorizationPolicy/shop/big", "-")]);
    assert!(e[0].message.contains("a resource may have 1048576 at most"), "{}", e[0].message);
}

#[test]
fn zero_timeouts_redirect_codes_and_backend_groups_follow_gateway_api() {
    let route = |rule: &str| {
        errors_of(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec:\n  parentRefs: [{{name: svc}}]\n  rules:\n    - {rule}\n"
        ))
    };
    // 0s turns the request timeout off, so a per-try timeout under it is fine.
    assert!(
        route("{timeouts: {request: 0s, backendRequest: 10s}, backendRefs: [{name: a, port: 80}]}")
            .is_empty()
    );
    for code in [301, 302, 303, 307, 308] {
        let rule = format!(
            "{{filters: [{{type: RequestRedirect, requestRedirect: {{statusCode: {code}}}}}]}}"
        );
        assert!(route(&rule).is_empty(), "{code}");
    }
    let e = route("{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 304}}]}");
    assert_eq!(
        fields(&e),
        [("HTTPRoute/shop/r", "spec.rules[0].filters[0].requestRedirect.statusCode")]
    );
    let e = route("{backendRefs: [{name: a, port: 80, group: example.com}]}");
    assert_eq!(fields(&e), [("HTTPRoute/shop/r", "spec.rules[0].backendRefs[0].group")]);
}

#[test]
fn kubectl_output_loads_and_a_bad_creation_time_is_named() {
    let exported = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  uid: 4f1c2a7e-0000-4000-8000-000000000001\n  resourceVersion: \"12345\"\n  generation: 2\n  creationTimestamp: \"2024-01-02T03:04:05Z\"\n  managedFields:\n  - manager: kubectl\n    operation: Update\n  labels: {sinew.io/dataplane-mode: ambient}\nspec: {finalizers: [kubernetes]}\nstatus: {phase: Active}\n";
    let e = errors_of(exported);
    // Namespace's spec is not ours to model: the only complaint may be about it.
    assert!(e.iter().all(|e| e.field.starts_with("spec")), "{e:?}");
    let e = errors_of(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, creationTimestamp: yesterday}\n",
    );
    assert_eq!(fields(&e), [("Namespace/shop", "metadata.creationTimestamp")]);
    // `kubectl create --dry-run -o yaml` writes a null time.
    let e = errors_of(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, creationTimestamp: null}\n",
    );
    assert!(e.is_empty(), "{e:?}");
}

#[test]
fn outlier_detection_takes_istios_names_and_refuses_a_zero_ejection_time() {
    let policy = |od: &str| {
        format!(
            "apiVersion: networking.sinew.io/v1alpha1\nkind: DestinationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n  service: reviews\n  outlierDetection: {od}\n"
        )
    };
    let ok = errors_of(&policy("{consecutive5xxErrors: 0, consecutiveGatewayErrors: 3}"));
    assert!(ok.is_empty(), "{ok:?}");
    let e = errors_of(&policy("{baseEjectionTime: 0s}"));
    assert_eq!(
        fields(&e),
        [("DestinationPolicy/shop/p", "spec.outlierDetection.baseEjectionTime")]
    );
}

#[test]
fn a_hashing_cookie_takes_a_name_or_istios_object() {
    let policy = |cookie: &str| {
        format!(
            "apiVersion: networking.sinew.io/v1alpha1\nkind: DestinationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n  service: reviews\n  loadBalancer: {{consistentHash: {{httpCookie: {cookie}}}}}\n"
        )
    };
    for ok in ["session", "{name: session, path: /, ttl: 1h}", "{name: session, ttl: 0s}"] {
        let e = errors_of(&policy(ok));
        assert!(e.is_empty(), "{ok}: {e:?}");
    }
    let e = errors_of(&policy("{name: 'bad name', path: nope}"));
    assert_eq!(
        fields(&e),
        [
            ("DestinationPolicy/shop/p", "spec.loadBalancer.consistentHash.httpCookie.name"),
            ("DestinationPolicy/shop/p", "spec.loadBalancer.consistentHash.httpCookie.path"),
        ]
    );
    // What control sends is read back the same by a client.
    let parsed: Vec<sinew_model::Resource> =
        parse_file(Path::new("f.yaml"), &policy("{name: session, path: /a, ttl: 30s}"))
            .unwrap()
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
    let back = sinew_model::Resource::from_json("t", &parsed[0].to_json()).unwrap();
    assert_eq!(back, parsed[0]);
    // A bare name is written back bare (clients of an older release read only that form),
    // and an unknown field of the object is refused, not ignored.
    let bare: Vec<sinew_model::Resource> = parse_file(Path::new("f.yaml"), &policy("session"))
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let json = String::from_utf8(bare[0].to_json()).unwrap();
    assert!(json.contains(r#""httpCookie":"session""#), "{json}");
    assert!(!errors_of(&policy("{name: session, tll: 1h}")).is_empty(), "a typo is refused");
}

/// The README's examples are resources as written: every YAML block parses and validates.
#[test]
fn the_readme_examples_are_valid() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let mut blocks = 0;
    for block in readme.split("```yaml\n").skip(1) {
        let yaml = block.split("```").next().unwrap_or_default();
        for doc in parse_file(Path::new("README.md"), yaml).expect("YAML") {
            if let Err(r) = doc {
                panic!("{:?}\n{yaml}", r.errors);
            }
        }
        blocks += 1;
    }
    assert!(blocks >= 2, "the README's YAML examples went missing");
}

#[test]
fn an_istio_destination_rule_reads_as_a_destination_policy() {
    let rule = |api: &str, spec: &str| {
        format!(
            "apiVersion: {api}\nkind: DestinationRule\nmetadata: {{name: r, namespace: shop}}\n\
             spec:\n{spec}"
        )
    };
    let spec = "  host: reviews\n  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n    \
                connectionPool:\n      tcp: {maxConnections: 10, connectTimeout: 2s}\n      \
                http: {http1MaxPendingRequests: 5, http2MaxRequests: 50}\n    \
                outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 30s}\n";
    for api in ["networking.istio.io/v1", "networking.istio.io/v1beta1"] {
        let docs = parse_file(Path::new("dr.yaml"), &rule(api, spec)).unwrap();
        let Ok(Resource::DestinationRule(r)) = &docs[0] else { panic!("{docs:?}") };
        let (ns, p) = r.spec.policy("shop").unwrap();
        assert_eq!((ns.as_str(), p.service.as_str()), ("shop", "reviews"));
        let pool = p.connection_pool.unwrap();
        assert_eq!(
            (pool.max_connections, pool.max_pending_requests, pool.max_requests),
            (Some(10), Some(5), Some(50))
        );
        assert_eq!(pool.connect_timeout.unwrap().0.as_secs(), 2);
        assert_eq!(p.outlier_detection.unwrap().consecutive_5xx_errors, Some(3));
        let back = Resource::from_json("control", &docs[0].as_ref().unwrap().to_json()).unwrap();
        assert_eq!(&back, docs[0].as_ref().unwrap());
    }
    // Istio's other names for the default algorithm.
    for simple in ["LEAST_CONN", "UNSPECIFIED"] {
        let spec =
            format!("  host: reviews\n  trafficPolicy: {{loadBalancer: {{simple: {simple}}}}}\n");
        assert!(errors_of(&rule("networking.istio.io/v1", &spec)).is_empty(), "{simple}");
    }
    // The host's forms.
    let service = |host: &str| {
        let spec = sinew_model::DestinationRuleSpec { host: host.into(), ..Default::default() };
        spec.service("shop")
    };
    let at = |ns: &str, name: &str| Some((ns.to_owned(), name.to_owned()));
    assert_eq!(service("reviews"), at("shop", "reviews"));
    assert_eq!(service("reviews.bank"), at("bank", "reviews"));
    assert_eq!(service("reviews.bank.svc"), at("bank", "reviews"));
    assert_eq!(service("reviews.bank.svc.cluster.local"), at("bank", "reviews"));
    assert_eq!(service("*.bank.svc.cluster.local"), None);
    assert_eq!(service("example.com.org"), None);
    assert_eq!(service("reviews.bank.cluster.local"), None);
    assert_eq!(service("reviews.bank.svc.example.org"), None);
    // What Sinew does not apply is refused by name, not ignored.
    let refused = |spec: &str| {
        fields(&errors_of(&rule("networking.istio.io/v1", spec)))
            .iter()
            .map(|(_, f)| f.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(refused("  host: reviews\n  subsets: [{name: v1}]\n"), ["spec.subsets"]);
    assert_eq!(refused("  host: \"*.example.com\"\n"), ["spec.host"]);
    assert_eq!(refused("  host: reviews\n  exportTo: [\".\"]\n"), ["spec.exportTo[0]"]);
    assert_eq!(
        refused("  host: reviews\n  trafficPolicy: {connectionPool: {tcp: {maxConnections: 0}}}\n"),
        ["spec.trafficPolicy.connectionPool.tcp.maxConnections"]
    );
    assert_eq!(
        refused("  host: reviews\n  trafficPolicy: {connectionPool: {http: {idleTimeout: 1s}}}\n"),
        ["spec.trafficPolicy.connectionPool.http.idleTimeout"]
    );
    assert_eq!(
        refused(
            "  host: reviews\n  trafficPolicy: {loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}}\n"
        ),
        ["spec.trafficPolicy.loadBalancer.simple"]
    );
    // What earlier releases wrote beside every consistentHash still reads.
    assert!(
        refused("  host: reviews\n  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST, consistentHash: {useSourceIp: true}}}\n")
            .is_empty()
    );
}

#[test]
fn which_destination_rule_configures_a_service() {
    let rule = |ns: &str, name: &str, host: &str, created: &str, errors: u32| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, \
             namespace: {ns}, creationTimestamp: \"{created}\"}}\nspec:\n  host: {host}\n  \
             trafficPolicy: {{outlierDetection: {{consecutiveErrors: {errors}}}}}\n---\n"
        )
    };
    let yaml = [
        rule("shop", "b-newer", "web", "2026-02-01T00:00:00Z", 1),
        rule("shop", "a-older", "web", "2026-01-01T00:00:00Z", 2),
        rule("sinew-system", "mesh-wide", "web.shop.svc.cluster.local", "2025-01-01T00:00:00Z", 3),
        rule("sinew-system", "for-db", "db.shop", "2025-01-01T00:00:00Z", 4),
        rule("client", "clients-own", "db.shop.svc", "2024-01-01T00:00:00Z", 5),
        "apiVersion: networking.sinew.io/v1alpha1\nkind: DestinationPolicy\nmetadata: {name: p, \
         namespace: shop}\nspec: {service: cache}\n---\n"
            .to_owned(),
        rule("shop", "for-cache", "cache", "2024-01-01T00:00:00Z", 6),
    ]
    .concat();
    let resources: Vec<Resource> = parse_file(Path::new("dr.yaml"), &yaml)
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{:?}", e.errors)))
        .collect();
    let (policies, left_out) = sinew_model::destination_policies(&resources);
    let gateway = |key: &str| {
        let o = policies[key].outlier_detection.as_ref().unwrap();
        // Istio's deprecated consecutiveErrors: gateway errors, the 5xx count off.
        assert_eq!(o.consecutive_5xx_errors, Some(0), "{key}");
        o.consecutive_gateway_errors.unwrap()
    };
    assert_eq!(gateway("shop/web"), 2, "the Service's namespace first, the oldest there");
    assert_eq!(gateway("shop/db"), 4, "then the root namespace");
    assert!(policies["shop/cache"].outlier_detection.is_none(), "a DestinationPolicy wins");
    assert_eq!(left_out.len(), 4, "{left_out:?}");
    assert!(
        left_out
            .iter()
            .any(|p| p.contains("client/clients-own") && p.contains("clients of namespace client"))
    );
    assert!(
        left_out.iter().any(|p| p.contains("shop/b-newer") && p.contains("already configures"))
    );
}
