//! Route selection, weighted backends and rewrites, on resources parsed from YAML with the
//! real schema.

use std::{cmp::Reverse, path::Path};

use http::HeaderMap;
use sinew_l7::route::{RequestView, RouteTable, modify_headers, redirect_location, rewrite_path};
use sinew_model::{HeaderModifier, HttpFilter, PathModifier, RequestRedirect, Resource};

mod common;

const API: &str = "gateway.networking.k8s.io/v1";

fn resources(yaml: &str) -> Vec<Resource> {
    sinew_model::parse_file(Path::new("t.yaml"), yaml)
        .expect("YAML parses")
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("rejected: {:?}\n{yaml}", e.errors)))
        .collect()
}

fn build(yaml: &str) -> (RouteTable, Vec<String>) {
    RouteTable::build(&resources(yaml))
}

/// An HTTPRoute in namespace `shop` with flow-style `parentRefs` and `rules`.
fn http_route(name: &str, parents: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: {API}\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  parentRefs: {parents}\n  rules: {rules}\n"
    )
}

/// An HTTPRoute on service `shop/web` whose rules each have one match and no backends.
fn web_route(name: &str, matches: &[&str]) -> String {
    let rules: Vec<String> = matches.iter().map(|m| format!("{{matches: [{m}]}}")).collect();
    http_route(name, "[{name: web}]", &format!("[{}]", rules.join(", ")))
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in pairs {
        h.append(
            http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            value.parse().expect("value"),
        );
    }
    h
}

/// (route, rule index, matched prefix) selected for `method path?query` to `shop/web:port`
/// from a client in namespace shop.
fn pick_in(
    t: &RouteTable,
    port: u16,
    method: &str,
    target: &str,
    h: &HeaderMap,
) -> Option<(String, usize, Option<String>)> {
    pick_as(t, "shop", port, method, target, h)
}

/// Like [`pick_in`], from a client in namespace `client`.
fn pick_as(
    t: &RouteTable,
    client: &str,
    port: u16,
    method: &str,
    target: &str,
    h: &HeaderMap,
) -> Option<(String, usize, Option<String>)> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let req = RequestView { method, path, query, headers: h };
    t.select("shop", "web", port, client, &req)
        .map(|s| (s.rule.route.clone(), s.rule.index, s.matched_prefix.map(str::to_owned)))
}

fn pick(t: &RouteTable, target: &str) -> Option<(String, usize)> {
    pick_in(t, 80, "GET", target, &HeaderMap::new()).map(|(r, i, _)| (r, i))
}

fn at(route: &str, index: usize) -> Option<(String, usize)> {
    Some((format!("shop/{route}"), index))
}

#[test]
fn exact_beats_prefix() {
    let (t, problems) = build(&web_route(
        "r",
        &["{path: {type: PathPrefix, value: /a}}", "{path: {type: Exact, value: /a/b}}"],
    ));
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(pick(&t, "/a/b"), at("r", 1));
    assert_eq!(pick(&t, "/a/b/"), at("r", 0));
    assert_eq!(pick(&t, "/a/c"), at("r", 0));
}

#[test]
fn longest_prefix_wins() {
    let (t, _) = build(&web_route(
        "r",
        &["{path: {value: /}}", "{path: {value: /a/b}}", "{path: {value: /a}}"],
    ));
    assert_eq!(pick(&t, "/a/b/c"), at("r", 1));
    assert_eq!(pick(&t, "/a/bc"), at("r", 2));
    assert_eq!(pick(&t, "/x"), at("r", 0));
    let prefix = pick_in(&t, 80, "GET", "/a/b/c", &HeaderMap::new()).and_then(|p| p.2);
    assert_eq!(prefix.as_deref(), Some("/a/b"));
}

#[test]
fn prefix_is_element_wise() {
    let (t, _) = build(&web_route("r", &["{path: {value: /foo}}"]));
    for hit in ["/foo", "/foo/", "/foo/bar"] {
        assert_eq!(pick(&t, hit), at("r", 0), "{hit}");
    }
    for miss in ["/foobar", "/fo", "/", "/bar/foo"] {
        assert_eq!(pick(&t, miss), None, "{miss}");
    }
    // A trailing slash in the prefix is ignored.
    let (t, _) = build(&web_route("r", &["{path: {value: /foo/}}"]));
    assert_eq!(pick(&t, "/foo"), at("r", 0));
    assert_eq!(pick(&t, "/foo/x"), at("r", 0));
    assert_eq!(pick(&t, "/foobar"), None);
}

#[test]
fn regex_is_a_full_match_ranked_below_prefixes_as_in_istio() {
    let (t, _) = build(&web_route(
        "r",
        &[
            "{path: {value: /b}}",
            "{path: {type: RegularExpression, value: '/a/[0-9]+'}}",
            "{path: {type: Exact, value: /a/1}}",
            "{path: {type: RegularExpression, value: '/a/[0-9]+/x'}}",
            "{path: {value: /a/9}}",
        ],
    ));
    assert_eq!(pick(&t, "/a/12"), at("r", 1));
    assert_eq!(pick(&t, "/a/12x"), None, "not a full match");
    assert_eq!(pick(&t, "/a/1"), at("r", 2), "exact beats regex");
    assert_eq!(pick(&t, "/a/1/x"), at("r", 3));
    assert_eq!(pick(&t, "/a/9"), at("r", 4), "a prefix beats a regex (Istio's getURIRank)");
    assert_eq!(pick(&t, "/x/a/12"), None);
    let (t, _) = build(&web_route(
        "r",
        &[
            "{path: {type: RegularExpression, value: '/.*'}}",
            "{path: {type: RegularExpression, value: '/a.*'}}",
        ],
    ));
    assert_eq!(pick(&t, "/ab"), at("r", 1), "the longer pattern wins");
}

#[test]
fn method_then_headers_then_query_break_ties() {
    let (t, _) = build(&web_route(
        "r",
        &[
            "{queryParams: [{name: q, value: '1'}, {name: r, value: '1'}]}",
            "{headers: [{name: x-a, value: '1'}], queryParams: [{name: q, value: '1'}]}",
            "{headers: [{name: x-a, value: '1'}, {name: x-b, value: '1'}]}",
            "{method: POST}",
        ],
    ));
    let all = headers(&[("x-a", "1"), ("x-b", "1")]);
    let sel = |m: &str, target: &str, h: &HeaderMap| pick_in(&t, 80, m, target, h).map(|p| p.1);
    assert_eq!(sel("POST", "/?q=1&r=1", &all), Some(3), "a method beats headers");
    assert_eq!(sel("GET", "/?q=1&r=1", &all), Some(2), "more headers win");
    assert_eq!(sel("GET", "/?q=1&r=1", &headers(&[("x-a", "1")])), Some(1));
    assert_eq!(sel("GET", "/?q=1&r=1", &HeaderMap::new()), Some(0));
    assert_eq!(sel("GET", "/?q=1", &HeaderMap::new()), None);
    // The first value of a parameter counts, compared raw.
    assert_eq!(sel("GET", "/?q=2&q=1&r=1", &HeaderMap::new()), None);
    assert_eq!(sel("GET", "/?r=1&q=1&q=2", &HeaderMap::new()), Some(0));
    assert_eq!(sel("GET", "/?q=%31&r=1", &HeaderMap::new()), None);
}

#[test]
fn path_outranks_method_and_headers() {
    let (t, _) = build(&web_route(
        "r",
        &["{method: GET, headers: [{name: x-a, value: '1'}]}", "{path: {value: /a}}"],
    ));
    let h = headers(&[("x-a", "1")]);
    assert_eq!(pick_in(&t, 80, "GET", "/a", &h).map(|p| p.1), Some(1));
    assert_eq!(pick_in(&t, 80, "GET", "/b", &h).map(|p| p.1), Some(0));
}

#[test]
fn full_ties_go_to_the_alphabetically_first_route_then_rule_order() {
    let m = "{path: {value: /a}}";
    let yaml = [web_route("zeta", &[m]), web_route("alpha", &[m, m]), web_route("mid", &[m])];
    let (t, _) = build(&yaml.concat());
    assert_eq!(pick(&t, "/a"), at("alpha", 0));
    // Order of the resources does not matter.
    let (t, _) = build(&[yaml[2].clone(), yaml[1].clone(), yaml[0].clone()].concat());
    assert_eq!(pick(&t, "/a"), at("alpha", 0));
    // Within a rule the first match that matches is reported.
    let (t, _) = build(&web_route("r", &["{path: {value: /a}}, {path: {value: /a/}}"]));
    assert_eq!(
        pick_in(&t, 80, "GET", "/a", &HeaderMap::new()).and_then(|p| p.2),
        Some("/a".into())
    );
}

#[test]
fn header_matches_ignore_name_case_and_join_repeats() {
    let (t, _) = build(&web_route(
        "r",
        &[
            "{headers: [{name: X-Env, value: canary}, {type: RegularExpression, name: x-ids, value: '1,2'}]}",
        ],
    ));
    let h = headers(&[("x-env", "canary"), ("X-IDS", "1"), ("x-ids", "2")]);
    assert_eq!(pick_in(&t, 80, "GET", "/", &h).map(|p| p.1), Some(0));
    let h = headers(&[("x-env", "Canary"), ("x-ids", "1,2")]);
    assert_eq!(pick_in(&t, 80, "GET", "/", &h), None, "values are case-sensitive");
    let h = headers(&[("x-env", "canary")]);
    assert_eq!(pick_in(&t, 80, "GET", "/", &h), None, "a missing header never matches");
}

#[test]
fn other_services_ports_and_misses() {
    let yaml = [
        http_route("p80", "[{name: web, port: 80}]", "[{matches: [{path: {value: /a}}]}]"),
        http_route("other", "[{name: api}]", "[{}]"),
        http_route("far", "[{name: web, namespace: prod}]", "[{}]"),
        http_route("two", "[{name: web, port: 81}, {name: web, port: 82}]", "[{}]"),
    ]
    .concat();
    let (t, problems) = build(&yaml);
    assert!(problems.is_empty(), "{problems:?}");
    let h = HeaderMap::new();
    let route = |port, target| pick_in(&t, port, "GET", target, &h).map(|p| p.0);
    assert_eq!(route(80, "/a"), Some("shop/p80".into()));
    assert_eq!(route(80, "/b"), None, "no match: None");
    assert_eq!(route(8080, "/a"), None, "parentRef.port limits the route");
    assert_eq!(route(81, "/a"), Some("shop/two".into()));
    assert_eq!(route(82, "/b"), Some("shop/two".into()));
    assert!(t.has_routes("shop", "web") && t.has_routes("shop", "api"));
    assert!(t.has_routes("prod", "web"), "parent namespace as written");
    assert!(!t.has_routes("shop", "db") && !t.has_routes("prod", "api"));
    let req = RequestView { method: "GET", path: "/x", query: None, headers: &h };
    // A consumer route (shop's, on prod/web) applies to shop's clients only.
    let far = t.select("prod", "web", 1234, "shop", &req).expect("far route");
    assert_eq!((far.rule.route.as_str(), far.matched_prefix), ("shop/far", Some("/")));
    assert!(t.select("prod", "web", 1234, "prod", &req).is_none(), "not for prod's clients");
    assert!(!t.attached("prod", "web", 1234, "prod"));
    assert!(t.attached("prod", "web", 1234, "shop"));
    assert!(t.select("shop", "db", 80, "shop", &req).is_none());
}

#[test]
fn gateway_parents_are_reported_and_ignored() {
    let yaml = [
        http_route("gw", "[{kind: Gateway, group: gateway.networking.k8s.io, name: edge}]", "[{}]"),
        http_route(
            "both",
            "[{kind: Gateway, group: gateway.networking.k8s.io, name: edge}, {name: web}]",
            "[{}]",
        ),
    ]
    .concat();
    let (t, problems) = build(&yaml);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with("HTTPRoute shop/gw: "), "{problems:?}");
    assert!(problems[0].contains("ignored"));
    assert!(problems[1].starts_with("HTTPRoute shop/both: "), "{problems:?}");
    assert!(!t.has_routes("shop", "edge"));
    assert_eq!(pick(&t, "/"), at("both", 0));
}

#[test]
fn rules_carry_backends_filters_timeouts_and_retry() {
    let rules = "[{backendRefs: [{name: v1, port: 8080}, {name: v2, namespace: canary, port: 80, \
                 weight: 3, filters: [{type: RequestHeaderModifier, requestHeaderModifier: \
                 {set: [{name: x-v, value: '2'}]}}]}], filters: [{type: LocalRateLimit, \
                 localRateLimit: {maxTokens: 5, tokensPerFill: 1, fillInterval: 1s}}], \
                 timeouts: {request: 5s}, retry: {codes: [503], attempts: 2}}]";
    let (t, problems) = build(&http_route("r", "[{name: web}]", rules));
    assert!(problems.is_empty(), "{problems:?}");
    let h = HeaderMap::new();
    let req = RequestView { method: "GET", path: "/", query: None, headers: &h };
    let rule = t.select("shop", "web", 80, "shop", &req).expect("selected").rule;
    assert_eq!((rule.kind, rule.index), ("HTTPRoute", 0));
    let b: Vec<_> =
        rule.backends.iter().map(|b| (&*b.namespace, &*b.name, b.port, b.weight)).collect();
    assert_eq!(b, [("shop", "v1", 8080, 1), ("canary", "v2", 80, 3)]);
    assert_eq!(rule.backends[1].filters.len(), 1);
    assert!(matches!(rule.filters[..], [HttpFilter::LocalRateLimit { .. }]));
    assert_eq!(rule.timeouts.request.map(|d| d.0.as_secs()), Some(5));
    assert_eq!(rule.retry.as_ref().map(|r| r.codes.clone()), Some(vec![503]));
}

#[test]
fn grpc_method_forms() {
    let yaml = format!(
        "apiVersion: {API}\nkind: GRPCRoute\nmetadata: {{name: g, namespace: shop}}\nspec:\n  \
         parentRefs: [{{name: web}}]\n  rules:\n  \
         - matches: [{{method: {{service: shop.Cart, method: Add}}}}]\n    \
           backendRefs: [{{name: cart-v2, port: 9000}}]\n  \
         - matches: [{{method: {{service: shop.Cart}}}}]\n  \
         - matches: [{{method: {{method: Get}}}}]\n  \
         - matches: [{{method: {{type: RegularExpression, service: 'shop\\..*', method: 'Del.*'}}}}]\n  \
         - matches: [{{headers: [{{name: x-tenant, value: a}}]}}]\n"
    );
    let (t, problems) = build(&yaml);
    assert!(problems.is_empty(), "{problems:?}");
    let h = HeaderMap::new();
    let sel = |path: &str, h: &HeaderMap| pick_in(&t, 50051, "POST", path, h).map(|p| (p.1, p.2));
    assert_eq!(sel("/shop.Cart/Add", &h), Some((0, None)));
    assert_eq!(sel("/shop.Cart/Remove", &h), Some((1, Some("/shop.Cart".into()))));
    assert_eq!(
        sel("/shop.Cart/Get", &h),
        Some((1, Some("/shop.Cart".into()))),
        "more service characters beat a method match"
    );
    assert_eq!(sel("/other.Svc/Get", &h), Some((2, None)));
    assert_eq!(sel("/shop.Orders/Delete", &h), Some((3, None)));
    assert_eq!(sel("/shopXOrders/Delete", &h), None);
    assert_eq!(sel("/shop.Cartx/Add", &h), None);
    assert_eq!(sel("/x.Y/Z", &headers(&[("x-tenant", "a")])), Some((4, Some("/".into()))));
    let req = RequestView { method: "POST", path: "/shop.Cart/Add", query: None, headers: &h };
    let rule = t.select("shop", "web", 1, "shop", &req).expect("selected").rule;
    assert_eq!(
        (rule.kind, rule.route.as_str(), rule.backends[0].port),
        ("GRPCRoute", "shop/g", 9000)
    );
}

#[test]
fn grpc_routes_override_http_routes_on_the_ports_they_share() {
    let grpc = format!(
        "---\napiVersion: {API}\nkind: GRPCRoute\nmetadata: {{name: g, namespace: shop}}\nspec:\n  \
         parentRefs: [{{name: web, port: 80}}]\n  rules:\n  \
         - matches: [{{method: {{service: shop.Cart}}}}]\n"
    );
    let http = web_route(
        "h",
        &["{path: {type: PathPrefix, value: /}}", "{path: {type: Exact, value: /shop.Cart/Add}}"],
    );
    let (t, problems) = build(&format!("{grpc}{http}"));
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with("HTTPRoute shop/h: conflicted"), "{problems:?}");
    let h = HeaderMap::new();
    // Port 80: only the GRPCRoute applies; what it does not match is a 404.
    let on_80 = |path: &str| pick_in(&t, 80, "POST", path, &h).map(|p| p.0);
    assert_eq!(on_80("/shop.Cart/Add"), Some("shop/g".into()));
    assert_eq!(on_80("/index.html"), None);
    assert!(t.attached("shop", "web", 80, "shop"));
    // Another port: the HTTPRoute alone.
    assert_eq!(pick_in(&t, 8080, "GET", "/index.html", &h).map(|p| p.0), Some("shop/h".into()));
}

fn weighted(weights: &[u32]) -> sinew_l7::route::CompiledRule {
    let refs: Vec<String> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| format!("{{name: b{i}, port: 80, weight: {w}}}"))
        .collect();
    let rules = format!("[{{backendRefs: [{}]}}]", refs.join(", "));
    let (t, _) = build(&http_route("r", "[{name: web}]", &rules));
    let h = HeaderMap::new();
    let req = RequestView { method: "GET", path: "/", query: None, headers: &h };
    t.select("shop", "web", 80, "shop", &req).expect("selected").rule.clone()
}

fn counts(weights: &[u32], draws: u64) -> Vec<u64> {
    let rule = weighted(weights);
    let mut counts = vec![0; weights.len()];
    for rnd in 0..draws {
        let b = rule.pick_backend(rnd).expect("a backend");
        let i: usize = b.name[1..].parse().expect("index");
        counts[i] += 1;
    }
    counts
}

#[test]
fn weighted_pick_is_exact_over_a_full_cycle() {
    assert_eq!(counts(&[90, 10], 100), [90, 10]);
    assert_eq!(counts(&[90, 10], 200), [180, 20]);
    assert_eq!(counts(&[0, 3, 0, 1], 4), [0, 3, 0, 1]);
    assert_eq!(counts(&[1, 1, 1], 300), [100, 100, 100]);
    assert!(weighted(&[0, 0]).pick_backend(7).is_none());
    assert!(weighted(&[]).pick_backend(0).is_none());
    let big = weighted(&[1_000_000, 1_000_000, 0]);
    assert_eq!(big.pick_backend(u64::MAX).map(|b| b.name.as_str()), Some("b1"));
}

#[test]
fn header_modifier_removes_sets_and_adds() {
    let hv = |name: &str, value: &str| sinew_model::HeaderValue {
        name: name.into(),
        value: value.into(),
    };
    let mut h = headers(&[
        ("x-keep", "1"),
        ("x-set", "old"),
        ("x-set", "older"),
        ("x-rm", "1"),
        ("x-add", "a"),
    ]);
    let m = HeaderModifier {
        set: vec![
            hv("X-Set", "new"),
            hv("bad name", "v"),
            hv("x-bad-value", "a\nb"),
            hv("X-New", "n"),
        ],
        add: vec![hv("X-Add", "b"), hv("x-rm", "again")],
        remove: vec!["X-RM".into(), "not a name".into()],
    };
    modify_headers(&mut h, &m);
    let all = |name: &str| -> Vec<&str> {
        h.get_all(name).iter().map(|v| v.to_str().expect("ascii")).collect()
    };
    assert_eq!(all("x-keep"), ["1"]);
    assert_eq!(all("x-set"), ["new"]);
    assert_eq!(all("x-new"), ["n"]);
    assert_eq!(all("x-add"), ["a", "b"]);
    assert_eq!(all("x-rm"), ["again"], "remove applies before add");
    assert!(all("x-bad-value").is_empty());
    assert_eq!(h.len(), 6);
}

#[test]
fn rewrite_path_follows_the_gateway_api_table() {
    let prefix = |to: &str| PathModifier::ReplacePrefixMatch { replace_prefix_match: to.into() };
    // Gateway API HTTPPathModifier examples, then the brief's.
    let table = [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
        ("/foo", "/foo", "/bar", "/bar"),
        ("/foo/", "/foo", "/bar", "/bar/"),
        ("/foo/x", "/foo", "/bar", "/bar/x"),
        ("/foo/x", "/foo", "/", "/x"),
        ("/foo/x/y", "/", "/api", "/api/foo/x/y"),
        ("/foo//x", "/foo", "/bar", "/bar/x"),
    ];
    for (path, matched, to, want) in table {
        assert_eq!(rewrite_path(path, Some(matched), &prefix(to)), want, "{path} {matched} {to}");
    }
    assert_eq!(rewrite_path("/foobar", Some("/foo"), &prefix("/x")), "/foobar", "not a prefix");
    assert_eq!(rewrite_path("/foo", None, &prefix("/x")), "/foo", "no prefix matched");
    let full = PathModifier::ReplaceFullPath { replace_full_path: "/new".into() };
    assert_eq!(rewrite_path("/foo/bar", Some("/foo"), &full), "/new");
    assert_eq!(rewrite_path("/foo/bar", None, &full), "/new");
}

/// The redirect of a route whose only filter is `requestRedirect: {fields}`.
fn redirect(fields: &str) -> RequestRedirect {
    let rules =
        format!("[{{filters: [{{type: RequestRedirect, requestRedirect: {{{fields}}}}}]}}]");
    let (t, _) = build(&http_route("r", "[{name: web}]", &rules));
    let h = HeaderMap::new();
    let req = RequestView { method: "GET", path: "/", query: None, headers: &h };
    match &t.select("shop", "web", 80, "shop", &req).expect("selected").rule.filters[..] {
        [HttpFilter::RequestRedirect { request_redirect }] => request_redirect.clone(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn redirect_locations() {
    let loc = |fields: &str, host: &str, port: Option<u16>, path: &str, query: Option<&str>| {
        redirect_location(&redirect(fields), "http", host, port, path, Some("/old"), query)
    };
    let to_https = "scheme: https";
    assert_eq!(
        loc(to_https, "shop.example", Some(8080), "/a", Some("q=1")),
        "https://shop.example/a?q=1"
    );
    assert_eq!(loc(to_https, "shop.example", Some(80), "/a", None), "https://shop.example/a");
    assert_eq!(loc("scheme: https, port: 8443", "h", Some(80), "/a", None), "https://h:8443/a");
    assert_eq!(loc("scheme: https, port: 80", "h", None, "/a", None), "https://h:80/a");
    assert_eq!(loc("port: 443", "h", Some(80), "/", None), "http://h:443/");
    assert_eq!(
        loc("hostname: new.example", "h", Some(8080), "/a", Some("x=y&z")),
        "http://new.example:8080/a?x=y&z"
    );
    assert_eq!(loc("hostname: new.example", "h", Some(80), "/a", None), "http://new.example/a");
    assert_eq!(loc("hostname: new.example", "h", None, "/a", Some("")), "http://new.example/a");
    let path = "path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}";
    assert_eq!(loc(path, "h", Some(80), "/old/x", Some("k=v")), "http://h/new/x?k=v");
    let full = "path: {type: ReplaceFullPath, replaceFullPath: /elsewhere}, statusCode: 301";
    assert_eq!(loc(full, "h", None, "/old/x", None), "http://h/elsewhere");
    assert_eq!(redirect(full).status_code, 301);
    assert_eq!(loc(to_https, "::1", None, "/", None), "https://[::1]/");
    assert_eq!(loc("port: 8080", "", None, "/a", Some("q")), "/a?q", "no host: relative");
}

mod property {
    //! Random route sets and requests: `select` must return the candidate with the best
    //! precedence key among those that match, computed here by brute force.

    use super::*;

    use crate::common::XorShift as Rng;

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum PathKind {
        Exact,
        Prefix,
        Regex,
    }

    #[derive(Debug)]
    struct Match {
        path: Option<(PathKind, &'static str)>,
        method: Option<&'static str>,
        /// (name, value, is regex)
        headers: Vec<(&'static str, &'static str, bool)>,
        query: Vec<(&'static str, &'static str, bool)>,
    }

    #[derive(Debug)]
    struct Route {
        namespace: &'static str,
        name: &'static str,
        /// (service namespace, service, port)
        parent: (&'static str, &'static str, Option<u16>),
        /// Each rule's matches (empty: everything).
        rules: Vec<Vec<Match>>,
    }

    const PREFIXES: &[&str] = &["/", "/a", "/a/", "/a/b", "/ab", "/b"];
    const EXACTS: &[&str] = &["/", "/a", "/a/b", "/ab", "/a/"];
    const REGEXES: &[&str] = &["/a.*", "/[ab]+", "/a/b", ".*", "/a/[bc]", "/(a|b)/?.*"];
    const PATHS: &[&str] = &["/", "/a", "/a/", "/a/b", "/ab", "/b", "/a/b/c", "/a/c", "/abc"];
    const HEADERS: &[&str] = &["x-a", "X-B", "x-C"];
    const QUERY: &[&str] = &["q", "r"];
    const VALUES: &[&str] = &["1", "2"];
    const VALUE_REGEXES: &[&str] = &["[12]", "2", "1|3", ".*"];

    fn gen_values(
        rng: &mut Rng,
        names: &[&'static str],
    ) -> Vec<(&'static str, &'static str, bool)> {
        rng.subset(names, 2)
            .into_iter()
            .map(|n| {
                if rng.below(3) == 0 {
                    (n, rng.pick(VALUE_REGEXES), true)
                } else {
                    (n, rng.pick(VALUES), false)
                }
            })
            .collect()
    }

    fn gen_match(rng: &mut Rng) -> Match {
        let path = match rng.below(4) {
            0 => None,
            1 => Some((PathKind::Exact, rng.pick(EXACTS))),
            2 => Some((PathKind::Prefix, rng.pick(PREFIXES))),
            _ => Some((PathKind::Regex, rng.pick(REGEXES))),
        };
        Match {
            path,
            method: rng.pick(&[None, None, Some("GET"), Some("POST")]),
            headers: gen_values(rng, HEADERS),
            query: gen_values(rng, QUERY),
        }
    }

    fn gen_routes(rng: &mut Rng) -> Vec<Route> {
        let names = rng.subset(&["a", "b", "c", "d", "e"], 5);
        names
            .into_iter()
            .map(|name| Route {
                namespace: rng.pick(&["shop", "shop", "zone"]),
                name,
                parent: rng.pick(&[
                    ("shop", "web", None),
                    ("shop", "web", None),
                    ("shop", "web", Some(80)),
                    ("shop", "web", Some(81)),
                    ("shop", "api", None),
                ]),
                rules: (0..1 + rng.below(3))
                    .map(|_| (0..rng.below(4)).map(|_| gen_match(rng)).collect())
                    .collect(),
            })
            .collect()
    }

    fn q(s: &str) -> String {
        format!("'{}'", s.replace('\'', "''"))
    }

    fn values_yaml(list: &[(&str, &str, bool)]) -> String {
        let items: Vec<String> = list
            .iter()
            .map(|(n, v, re)| {
                let kind = if *re { "RegularExpression" } else { "Exact" };
                format!("{{type: {kind}, name: {}, value: {}}}", q(n), q(v))
            })
            .collect();
        format!("[{}]", items.join(", "))
    }

    fn route_yaml(r: &Route) -> String {
        let (ns, svc, port) = r.parent;
        let port = port.map(|p| format!(", port: {p}")).unwrap_or_default();
        let rules: Vec<String> = r
            .rules
            .iter()
            .map(|matches| {
                let ms: Vec<String> = matches
                    .iter()
                    .map(|m| {
                        let mut parts = Vec::new();
                        if let Some((kind, value)) = m.path {
                            let kind = match kind {
                                PathKind::Exact => "Exact",
                                PathKind::Prefix => "PathPrefix",
                                PathKind::Regex => "RegularExpression",
                            };
                            parts.push(format!("path: {{type: {kind}, value: {}}}", q(value)));
                        }
                        if let Some(method) = m.method {
                            parts.push(format!("method: {method}"));
                        }
                        parts.push(format!("headers: {}", values_yaml(&m.headers)));
                        parts.push(format!("queryParams: {}", values_yaml(&m.query)));
                        format!("{{{}}}", parts.join(", "))
                    })
                    .collect();
                format!("{{matches: [{}]}}", ms.join(", "))
            })
            .collect();
        format!(
            "---\napiVersion: {API}\nkind: HTTPRoute\nmetadata: {{name: {}, namespace: {}}}\n\
             spec:\n  parentRefs: [{{name: {svc}, namespace: {ns}{port}}}]\n  rules: [{}]\n",
            r.name,
            r.namespace,
            rules.join(", ")
        )
    }

    struct Request {
        method: &'static str,
        path: &'static str,
        query: String,
        headers: Vec<(&'static str, &'static str)>,
    }

    fn gen_request(rng: &mut Rng) -> Request {
        let headers = rng.subset(HEADERS, 3).into_iter().map(|n| (n, rng.pick(VALUES))).collect();
        let query: Vec<String> = (0..rng.below(4))
            .map(|_| format!("{}={}", rng.pick(QUERY), rng.pick(VALUES)))
            .collect();
        Request {
            method: rng.pick(&["GET", "POST"]),
            path: rng.pick(PATHS),
            query: query.join("&"),
            headers,
        }
    }

    fn full(re: &str, s: &str) -> bool {
        thread_local! {
            static CACHE: std::cell::RefCell<std::collections::HashMap<String, regex::Regex>> =
                Default::default();
        }
        CACHE.with_borrow_mut(|cache| {
            cache
                .entry(re.to_owned())
                .or_insert_with(|| regex::Regex::new(&format!("^(?:{re})$")).expect("test regex"))
                .is_match(s)
        })
    }

    fn value_ok(want: &str, regex: bool, got: Option<&str>) -> bool {
        got.is_some_and(|v| if regex { full(want, v) } else { v == want })
    }

    /// Independent of the crate: segment lists, and linear lookups.
    fn matches(m: &Match, req: &Request) -> bool {
        let segments =
            |p: &str| p.split('/').filter(|s| !s.is_empty()).map(str::to_owned).collect::<Vec<_>>();
        let path_ok = match m.path {
            None => true,
            Some((PathKind::Exact, v)) => req.path == v,
            Some((PathKind::Prefix, v)) => segments(req.path).starts_with(&segments(v)),
            Some((PathKind::Regex, v)) => full(v, req.path),
        };
        let header = |name: &str| {
            req.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| *v)
        };
        let param = |name: &str| {
            req.query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v)
        };
        path_ok
            && m.method.is_none_or(|x| x == req.method)
            && m.headers.iter().all(|(n, v, re)| value_ok(v, *re, header(n)))
            && m.query.iter().all(|(n, v, re)| value_ok(v, *re, param(n)))
    }

    type Key =
        (u8, Reverse<usize>, Reverse<bool>, Reverse<usize>, Reverse<usize>, String, usize, usize);

    fn key(r: &Route, rule: usize, index: usize, m: &Match) -> Key {
        let (rank, len) = match m.path {
            Some((PathKind::Exact, _)) => (0, 0),
            Some((PathKind::Prefix, v)) => (1, v.trim_end_matches('/').len()),
            Some((PathKind::Regex, v)) => (2, v.len()),
            None => (1, 0),
        };
        (
            rank,
            Reverse(len),
            Reverse(m.method.is_some()),
            Reverse(m.headers.len()),
            Reverse(m.query.len()),
            format!("{}/{}", r.namespace, r.name),
            rule,
            index,
        )
    }

    /// (route, rule, matched prefix) by brute force, for a request from a client of
    /// namespace `client` to shop/web:80: the client's own consumer routes if it has any on
    /// that port, else shop's producer routes.
    fn expected(
        routes: &[Route],
        req: &Request,
        client: &str,
    ) -> Option<(String, usize, Option<String>)> {
        let everything = Match { path: None, method: None, headers: vec![], query: vec![] };
        let on_web_80 = |r: &&Route| {
            let (ns, svc, port) = r.parent;
            (ns, svc) == ("shop", "web") && port.is_none_or(|p| p == 80)
        };
        let consumer =
            client != "shop" && routes.iter().filter(on_web_80).any(|r| r.namespace == client);
        let from = if consumer { client } else { "shop" };
        let mut best: Option<(Key, Option<String>)> = None;
        for r in routes.iter().filter(on_web_80) {
            if r.namespace != from {
                continue;
            }
            for (i, rule) in r.rules.iter().enumerate() {
                let ms: Vec<&Match> =
                    if rule.is_empty() { vec![&everything] } else { rule.iter().collect() };
                for (j, m) in ms.into_iter().enumerate() {
                    if !matches(m, req) {
                        continue;
                    }
                    let k = key(r, i, j, m);
                    let prefix = match m.path {
                        None => Some("/".to_owned()),
                        Some((PathKind::Prefix, v)) => Some(v.to_owned()),
                        _ => None,
                    };
                    if best.as_ref().is_none_or(|(b, _)| k < *b) {
                        best = Some((k, prefix));
                    }
                }
            }
        }
        best.map(|(k, prefix)| (k.5, k.6, prefix))
    }

    #[test]
    fn select_returns_the_best_matching_candidate() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let (mut selected, mut none) = (0, 0);
        for _ in 0..400 {
            let routes = gen_routes(&mut rng);
            let yaml: String = routes.iter().map(route_yaml).collect();
            let (table, problems) = build(&yaml);
            assert!(problems.is_empty(), "{problems:?}");
            for _ in 0..25 {
                let req = gen_request(&mut rng);
                let pairs: Vec<(&str, &str)> = req.headers.clone();
                let h = headers(&pairs);
                let target = if req.query.is_empty() {
                    req.path.to_owned()
                } else {
                    format!("{}?{}", req.path, req.query)
                };
                for client in ["shop", "zone"] {
                    let got = pick_as(&table, client, 80, req.method, &target, &h);
                    let want = expected(&routes, &req, client);
                    assert_eq!(
                        got, want,
                        "{client}: {} {target} {:?}\n{yaml}",
                        req.method, req.headers
                    );
                    if got.is_some() { selected += 1 } else { none += 1 }
                }
            }
        }
        // Both outcomes are exercised.
        assert!(selected > 1000 && none > 1000, "selected {selected}, none {none}");
    }
}

#[test]
fn among_equal_matches_the_older_route_wins() {
    let dated = |name: &str, created: &str| {
        format!(
            "---\napiVersion: {API}\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop, \
             creationTimestamp: \"{created}\"}}\nspec:\n  parentRefs: [{{name: web}}]\n  rules: [{{}}]\n"
        )
    };
    // "a" sorts first by name, but "z" is older; an undated route comes after both.
    let yaml = [
        dated("a", "2024-05-01T00:00:00Z"),
        dated("z", "2023-01-01T00:00:00Z"),
        http_route("b", "[{name: web}]", "[{}]"),
    ]
    .concat();
    let (t, problems) = build(&yaml);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(pick(&t, "/"), at("z", 0));
    let undated =
        [http_route("b", "[{name: web}]", "[{}]"), http_route("a", "[{name: web}]", "[{}]")]
            .concat();
    let (t, _) = build(&undated);
    assert_eq!(pick(&t, "/"), at("a", 0), "without timestamps, by name");
}
