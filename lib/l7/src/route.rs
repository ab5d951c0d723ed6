//! Gateway API (v1) `HTTPRoute` and `GRPCRoute` selection for routes attached to Services
//! (GAMMA), and the path, header and redirect rewrites their filters describe.
//!
//! [`RouteTable::build`] compiles every route once: each `(route, rule, match)` becomes a
//! candidate of every Service the route attaches to, with its precedence key computed and
//! the candidates sorted, so [`RouteTable::select`] is a linear scan that returns the first
//! candidate that matches.
//!
//! Attachment (GAMMA): a `parentRef` of kind `Service` (the default) in group `""` attaches
//! the route to that Service, in the route's namespace unless the ref names one; a `port`
//! limits the route to that service port. `Gateway` parents are not served yet: they are
//! reported and ignored. `hostnames` are ignored, since a request to a Service's frontend
//! already names its destination.
//!
//! Producer and consumer routes (GEP-1426): a route in its Service's namespace (a producer
//! route) applies to every client; a route in another namespace (a consumer route) applies
//! only to clients of its own namespace, and for them it replaces the producer routes of
//! that Service and port. So no namespace can change another namespace's traffic.
//! [`RouteTable::select`] takes the client's namespace for this; when routes apply to a
//! request's port but none matches, [`RouteTable::attached`] tells the caller to answer 404
//! rather than forward to the Service (a route replaces the implicit routing).
//!
//! Precedence among all rules of all routes attached to the same Service and port:
//! 1. an `Exact` path over a `PathPrefix` over a `RegularExpression` (Gateway API leaves
//!    regular expressions' rank to the implementation; this is Istio's, `getURIRank`, so
//!    routes moved from Istio pick the same rules);
//! 2. among prefixes the longest (a trailing `/` not counted), among regular expressions the
//!    longest pattern;
//! 3. a match with a method over one without;
//! 4. more header matches;
//! 5. more query parameter matches;
//! 6. the older route by `metadata.creationTimestamp` (routes without one after those with
//!    one), then `{namespace}/{name}` in alphabetical order (then the kind, `GRPCRoute` before
//!    `HTTPRoute`);
//! 7. rule order within the route, then match order within the rule.
//!
//! A `GRPCRoute` method match becomes a path match: service and method an `Exact`
//! `/{service}/{method}`, service only a `PathPrefix` `/{service}`, method only a regular
//! expression `/[^/]+/{method}`, and type `RegularExpression` the expression
//! `/{service}/{method}` with `[^/]+` for the missing part. It is ranked as GRPCRoute asks:
//! more characters of service first, then of method, then more header matches (a
//! service-only match beats a method-only one). GRPCRoutes and HTTPRoutes never compete: on
//! a Service port both attach to, only the GRPCRoutes apply (GEP-1294).

use std::{borrow::Cow, cmp::Reverse, collections::BTreeMap};

use http::{HeaderMap, HeaderName, HeaderValue};
use regex::Regex;
use sinew_model::{
    BackendRef, GrpcMethodMatch, GrpcRouteMatch, GrpcRouteSpec, HeaderModifier, HttpFilter,
    HttpRouteMatch, HttpRouteSpec, Object, ParentRef, PathMatch, PathMatchType, PathModifier,
    RequestRedirect, Resource, Retry, StringMatchType, Timeouts, ValueMatch,
};

/// A request as routing sees it.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// The method, such as `GET`.
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// The query, without the `?`, when the request has one.
    pub query: Option<&'a str>,
    /// The request headers.
    pub headers: &'a HeaderMap,
}

/// One backend of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The Service's namespace (the route's unless the backendRef names one).
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// The service port.
    pub port: u16,
    /// Relative weight; 0 is never picked.
    pub weight: u32,
    /// Filters applied when this backend is picked, after the rule's.
    pub filters: Vec<HttpFilter>,
}

/// A rule ready to serve.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    /// The route, as `namespace/name`.
    pub route: String,
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: &'static str,
    /// The rule's index within the route.
    pub index: usize,
    /// Weighted backends (none: the caller answers 500 unless a filter answers).
    pub backends: Vec<Backend>,
    /// The rule's filters, in order.
    pub filters: Vec<HttpFilter>,
    /// Timeouts (all unset for a `GRPCRoute`).
    pub timeouts: Timeouts,
    /// Retries (none for a `GRPCRoute`).
    pub retry: Option<Retry>,
}

impl CompiledRule {
    /// A weighted choice using `rnd` (any `u64`, such as a random one): `rnd % total weight`
    /// falls in one backend's share of the cumulative weights. Backends of weight 0 are never
    /// chosen; `None` when there is no backend or every weight is 0 (callers answer 500).
    pub fn pick_backend(&self, rnd: u64) -> Option<&Backend> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let target = rnd % total;
        let mut cumulative = 0u64;
        self.backends.iter().find(|b| {
            cumulative += u64::from(b.weight);
            target < cumulative
        })
    }
}

/// The match that selected a rule (needed for `ReplacePrefixMatch`).
#[derive(Debug, Clone)]
pub struct Selected<'a> {
    /// The rule.
    pub rule: &'a CompiledRule,
    /// The `PathPrefix` value that matched (`/` for a rule or match without a path), `None`
    /// for an `Exact` or `RegularExpression` path.
    pub matched_prefix: Option<&'a str>,
}

/// All routes, by parent service.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// namespace -> service name -> its routes.
    services: BTreeMap<String, BTreeMap<String, ServiceRoutes>>,
}

/// The rules attached to one Service, and their matches in precedence order.
#[derive(Debug, Clone, Default)]
struct ServiceRoutes {
    rules: Vec<CompiledRule>,
    /// Sorted by `key`, best first.
    candidates: Vec<Candidate>,
}

impl ServiceRoutes {
    /// Names each HTTPRoute that a GRPCRoute of the same group (producer, or one consumer
    /// namespace) overrides on a port they share (see `RouteTable::applicable`).
    fn report_conflicts(&self, namespace: &str, name: &str, problems: &mut Vec<String>) {
        let overlap = |a: &Option<Vec<u16>>, b: &Option<Vec<u16>>| match (a, b) {
            (Some(a), Some(b)) => a.iter().any(|p| b.contains(p)),
            _ => true,
        };
        let mut reported = std::collections::BTreeSet::new();
        for h in self.candidates.iter().filter(|c| c.key.kind == "HTTPRoute") {
            let conflicted = self.candidates.iter().any(|g| {
                g.key.kind == "GRPCRoute" && g.consumer == h.consumer && overlap(&g.ports, &h.ports)
            });
            if conflicted && reported.insert(h.key.route.as_str()) {
                problems.push(format!(
                    "HTTPRoute {}: conflicted: GRPCRoutes attach to service {namespace}/{name} on \
                     the same port, and only they apply there (Gateway API GEP-1294)",
                    h.key.route
                ));
            }
        }
    }
}

/// One match of one rule, as attached to one Service.
#[derive(Debug, Clone)]
struct Candidate {
    key: Key,
    /// The route's namespace when it is not the Service's (a consumer route): it applies
    /// only to clients of that namespace.
    consumer: Option<String>,
    /// `None`: every port.
    ports: Option<Vec<u16>>,
    /// Index into [`ServiceRoutes::rules`].
    rule: usize,
    matcher: Matcher,
}

/// Precedence, smallest first (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    path_rank: u8,
    path_len: Reverse<usize>,
    has_method: Reverse<bool>,
    headers: Reverse<usize>,
    query: Reverse<usize>,
    /// The route's creation time, older first; routes without one after those with one.
    created: (bool, Option<String>),
    route: String,
    kind: &'static str,
    rule: usize,
    index: usize,
}

/// The precedence rank of every GRPCRoute match (see the module documentation).
const GRPC_RANK: u8 = 1;

#[derive(Debug, Clone)]
enum PathMatcher {
    Exact(String),
    /// The value as written (it is what `ReplacePrefixMatch` replaces).
    Prefix(String),
    /// The pattern's length, and the compiled full-match expression (`None`: never matches).
    Regex(usize, Option<Regex>),
}

#[derive(Debug, Clone)]
enum ValueMatcher {
    Exact(String),
    /// `None`: the expression did not compile, so it never matches.
    Regex(Option<Regex>),
}

#[derive(Debug, Clone)]
struct Matcher {
    path: PathMatcher,
    /// `None` name: not a valid header name, never matches.
    headers: Vec<(Option<HeaderName>, ValueMatcher)>,
    query: Vec<(String, ValueMatcher)>,
    method: Option<String>,
    /// Precedence in place of the path's (GRPCRoute: service characters, then method).
    rank: Option<(u8, usize)>,
}

/// One rule of a route before attachment, with its matches.
struct RuleIn {
    rule: CompiledRule,
    matchers: Vec<Matcher>,
}

/// Collects problems about one route, each prefixed with `KIND namespace/name: `.
struct Problems<'p> {
    label: String,
    out: &'p mut Vec<String>,
}

impl Problems<'_> {
    fn add(&mut self, msg: impl std::fmt::Display) {
        self.out.push(format!("{}: {msg}", self.label));
    }

    /// Compiles `pattern` to match whole strings; a bad pattern is reported and never matches.
    fn full_regex(&mut self, field: &str, pattern: &str) -> Option<Regex> {
        match Regex::new(&format!("^(?:{pattern})$")) {
            Ok(re) => Some(re),
            Err(e) => {
                self.add(format_args!("{field}: invalid regular expression, never matches: {e}"));
                None
            }
        }
    }
}

impl RouteTable {
    /// Compiles every `HTTPRoute` and `GRPCRoute` in `resources` (other kinds ignored).
    /// Problems (Gateway parents, unknown parent kinds, bad expressions) are returned as
    /// human strings naming the route (`HTTPRoute shop/r: ...`); nothing panics.
    pub fn build<'a>(resources: impl IntoIterator<Item = &'a Resource>) -> (Self, Vec<String>) {
        let mut table = Self::default();
        let mut problems = Vec::new();
        for resource in resources {
            match resource {
                Resource::HttpRoute(o) => table.add_http(o, &mut problems),
                Resource::GrpcRoute(o) => table.add_grpc(o, &mut problems),
                _ => {}
            }
        }
        for (namespace, services) in &mut table.services {
            for (name, service) in services {
                service.candidates.sort_by(|a, b| a.key.cmp(&b.key));
                service.report_conflicts(namespace, name, &mut problems);
            }
        }
        (table, problems)
    }

    /// True when any route is attached to service `namespace/name` (any port).
    pub fn has_routes(&self, namespace: &str, name: &str) -> bool {
        self.services.get(namespace).is_some_and(|s| s.contains_key(name))
    }

    /// The candidates that apply to a client of namespace `client` on service port `port`:
    /// that namespace's consumer routes if it has any for this port, else the producer
    /// routes; and among those, only GRPCRoutes when there are any (Gateway API GEP-1294:
    /// route kinds on one Service port conflict, and GRPCRoute wins).
    fn applicable<'a, 'c>(
        service: &'a ServiceRoutes,
        port: u16,
        client: &'c str,
    ) -> impl Iterator<Item = &'a Candidate> + use<'a, 'c> {
        let on_port = move |c: &&Candidate| c.ports.as_ref().is_none_or(|p| p.contains(&port));
        let own = service
            .candidates
            .iter()
            .filter(on_port)
            .any(|c| c.consumer.as_deref() == Some(client));
        let in_group = move |c: &&Candidate| {
            if own { c.consumer.as_deref() == Some(client) } else { c.consumer.is_none() }
        };
        let grpc = service
            .candidates
            .iter()
            .filter(on_port)
            .filter(in_group)
            .any(|c| c.key.kind == "GRPCRoute");
        service
            .candidates
            .iter()
            .filter(on_port)
            .filter(in_group)
            .filter(move |c| !grpc || c.key.kind == "GRPCRoute")
    }

    /// True when routes attached to service `namespace/name` apply to a client of namespace
    /// `client` on service port `port`: a request none of them matches gets 404.
    pub fn attached(&self, namespace: &str, name: &str, port: u16, client: &str) -> bool {
        self.services
            .get(namespace)
            .and_then(|s| s.get(name))
            .is_some_and(|s| Self::applicable(s, port, client).next().is_some())
    }

    /// The rule for a request from a client of namespace `client` to service
    /// `namespace/name` on service port `port`, by Gateway API precedence among the routes
    /// that apply to that client; `None` when none matches (see [`RouteTable::attached`]:
    /// 404 if routes apply, else the caller forwards to the service itself).
    pub fn select<'a>(
        &'a self,
        namespace: &str,
        name: &str,
        port: u16,
        client: &str,
        req: &RequestView<'_>,
    ) -> Option<Selected<'a>> {
        let service = self.services.get(namespace)?.get(name)?;
        Self::applicable(service, port, client).filter(|c| c.matcher.matches(req)).find_map(|c| {
            Some(Selected {
                rule: service.rules.get(c.rule)?,
                matched_prefix: match &c.matcher.path {
                    PathMatcher::Prefix(p) => Some(p.as_str()),
                    _ => None,
                },
            })
        })
    }

    fn add_http(&mut self, o: &Object<HttpRouteSpec>, problems: &mut Vec<String>) {
        let (namespace, mut p) = start(o, "HTTPRoute", problems);
        let rules = o
            .spec
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut rule =
                    compiled_rule(o, "HTTPRoute", &namespace, i, &r.backend_refs, &mut p);
                rule.filters.clone_from(&r.filters);
                rule.timeouts = r.timeouts.clone().unwrap_or_default();
                rule.retry.clone_from(&r.retry);
                RuleIn { rule, matchers: http_matchers(&r.matches, i, &mut p) }
            })
            .collect();
        self.attach(o, "HTTPRoute", &namespace, &o.spec.parent_refs, rules, &mut p);
    }

    fn add_grpc(&mut self, o: &Object<GrpcRouteSpec>, problems: &mut Vec<String>) {
        let (namespace, mut p) = start(o, "GRPCRoute", problems);
        let rules = o
            .spec
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut rule =
                    compiled_rule(o, "GRPCRoute", &namespace, i, &r.backend_refs, &mut p);
                rule.filters.clone_from(&r.filters);
                RuleIn { rule, matchers: grpc_matchers(&r.matches, i, &mut p) }
            })
            .collect();
        self.attach(o, "GRPCRoute", &namespace, &o.spec.parent_refs, rules, &mut p);
    }

    /// Attaches a compiled route to each Service parent.
    fn attach<S>(
        &mut self,
        o: &Object<S>,
        kind: &'static str,
        namespace: &str,
        parents: &[ParentRef],
        rules: Vec<RuleIn>,
        p: &mut Problems<'_>,
    ) {
        let route = format!("{namespace}/{}", o.metadata.name);
        let created = o.metadata.creation_timestamp.clone();
        for ((svc_ns, svc_name), ports) in service_parents(namespace, parents, p) {
            let consumer = (svc_ns != namespace).then(|| namespace.to_owned());
            let service = self.services.entry(svc_ns).or_default().entry(svc_name).or_default();
            for r in &rules {
                let rule = service.rules.len();
                service.rules.push(r.rule.clone());
                for (index, matcher) in r.matchers.iter().enumerate() {
                    let (path_rank, path_len) = matcher.rank.unwrap_or_else(|| matcher.path.rank());
                    let key = Key {
                        path_rank,
                        path_len: Reverse(path_len),
                        has_method: Reverse(matcher.method.is_some()),
                        headers: Reverse(matcher.headers.len()),
                        query: Reverse(matcher.query.len()),
                        created: (created.is_none(), created.clone()),
                        route: route.clone(),
                        kind,
                        rule: r.rule.index,
                        index,
                    };
                    service.candidates.push(Candidate {
                        key,
                        consumer: consumer.clone(),
                        ports: ports.clone(),
                        rule,
                        matcher: matcher.clone(),
                    });
                }
            }
        }
    }
}

/// The route's namespace and its problem collector.
fn start<'p, S>(o: &Object<S>, kind: &str, out: &'p mut Vec<String>) -> (String, Problems<'p>) {
    let namespace = o.metadata.namespace.clone().unwrap_or_default();
    let mut p = Problems { label: format!("{kind} {namespace}/{}", o.metadata.name), out };
    if namespace.is_empty() {
        p.add("no metadata.namespace; using \"default\"");
        return ("default".into(), p);
    }
    (namespace, p)
}

/// The Services a route attaches to, each with its ports (`None`: every port). Gateway and
/// unknown parents are reported.
fn service_parents(
    namespace: &str,
    parents: &[ParentRef],
    p: &mut Problems<'_>,
) -> BTreeMap<(String, String), Option<Vec<u16>>> {
    let mut out: BTreeMap<(String, String), Option<Vec<u16>>> = BTreeMap::new();
    let mut gateways = 0;
    for (i, parent) in parents.iter().enumerate() {
        let kind = parent.kind.as_deref().unwrap_or("Service");
        let group = parent.group.as_deref().unwrap_or("");
        match (kind, group) {
            ("Service", "" | "core") => {}
            ("Gateway", _) => {
                gateways += 1;
                continue;
            }
            _ => {
                p.add(format_args!(
                    "parentRefs[{i}]: {kind} in group {group:?} is not a Service parent; ignored"
                ));
                continue;
            }
        }
        let ns = parent.namespace.clone().unwrap_or_else(|| namespace.to_owned());
        let entry = out.entry((ns, parent.name.clone())).or_insert_with(|| Some(Vec::new()));
        match (entry.as_mut(), parent.port) {
            (Some(ports), Some(port)) => ports.push(port.0),
            _ => *entry = None,
        }
    }
    if gateways > 0 {
        if out.is_empty() {
            p.add("attached only to Gateways, which are not served yet; the route is ignored");
        } else {
            p.add(format_args!("{gateways} Gateway parent(s) ignored: not served yet"));
        }
    }
    out
}

/// A rule's backends; filters, timeouts and retry left empty.
fn compiled_rule<S>(
    o: &Object<S>,
    kind: &'static str,
    namespace: &str,
    index: usize,
    refs: &[BackendRef],
    p: &mut Problems<'_>,
) -> CompiledRule {
    let mut backends = Vec::with_capacity(refs.len());
    for (j, b) in refs.iter().enumerate() {
        let kind = b.kind.as_deref().unwrap_or("Service");
        let group = b.group.as_deref().unwrap_or("");
        if kind != "Service" || !matches!(group, "" | "core") {
            p.add(format_args!(
                "rules[{index}].backendRefs[{j}]: {kind} in group {group:?} is not a Service; \
                 ignored"
            ));
            continue;
        }
        backends.push(Backend {
            namespace: b.namespace.clone().unwrap_or_else(|| namespace.to_owned()),
            name: b.name.clone(),
            port: b.port.0,
            weight: b.weight,
            filters: b.filters.clone(),
        });
    }
    CompiledRule {
        route: format!("{namespace}/{}", o.metadata.name),
        kind,
        index,
        backends,
        filters: Vec::new(),
        timeouts: Timeouts::default(),
        retry: None,
    }
}

fn http_matchers(matches: &[HttpRouteMatch], rule: usize, p: &mut Problems<'_>) -> Vec<Matcher> {
    if matches.is_empty() {
        return vec![Matcher::everything()];
    }
    matches
        .iter()
        .enumerate()
        .map(|(j, m)| {
            let field = format!("rules[{rule}].matches[{j}]");
            let path = match &m.path {
                None => PathMatcher::Prefix("/".into()),
                Some(PathMatch { kind: PathMatchType::Exact, value }) => {
                    PathMatcher::Exact(value.clone())
                }
                Some(PathMatch { kind: PathMatchType::PathPrefix, value }) => {
                    PathMatcher::Prefix(value.clone())
                }
                Some(PathMatch { kind: PathMatchType::RegularExpression, value }) => {
                    PathMatcher::Regex(value.len(), p.full_regex(&format!("{field}.path"), value))
                }
            };
            Matcher {
                path,
                headers: header_matchers(&m.headers, &field, p),
                query: first_by_name(&m.query_params, |a, b| a == b)
                    .map(|q| (q.name.clone(), value_matcher(q, &field, "queryParams", p)))
                    .collect(),
                method: m.method.clone(),
                rank: None,
            }
        })
        .collect()
}

fn grpc_matchers(matches: &[GrpcRouteMatch], rule: usize, p: &mut Problems<'_>) -> Vec<Matcher> {
    if matches.is_empty() {
        return vec![Matcher::everything()];
    }
    matches
        .iter()
        .enumerate()
        .map(|(j, m)| {
            let field = format!("rules[{rule}].matches[{j}]");
            let path = match &m.method {
                None => PathMatcher::Prefix("/".into()),
                Some(method) => grpc_path(method, &format!("{field}.method"), p),
            };
            // GRPCRoute precedence: more characters of service, then of method, then headers.
            let chars = |s: Option<&String>| s.map_or(0, String::len);
            let (service, method) = match &m.method {
                Some(mm) => (chars(mm.service.as_ref()), chars(mm.method.as_ref())),
                None => (0, 0),
            };
            Matcher {
                path,
                headers: header_matchers(&m.headers, &field, p),
                query: Vec::new(),
                method: None,
                rank: Some((GRPC_RANK, service * 10_000 + method)),
            }
        })
        .collect()
}

/// A gRPC method match as a path match (see the module documentation).
fn grpc_path(m: &GrpcMethodMatch, field: &str, p: &mut Problems<'_>) -> PathMatcher {
    let (service, method) = (m.service.as_deref(), m.method.as_deref());
    let regex = |pattern: String, p: &mut Problems<'_>| {
        let re = p.full_regex(field, &pattern);
        PathMatcher::Regex(pattern.len(), re)
    };
    match (m.kind, service, method) {
        (StringMatchType::Exact, Some(s), Some(m)) => PathMatcher::Exact(format!("/{s}/{m}")),
        (StringMatchType::Exact, Some(s), None) => PathMatcher::Prefix(format!("/{s}")),
        (StringMatchType::Exact, None, Some(m)) => regex(format!("/[^/]+/{}", regex::escape(m)), p),
        (StringMatchType::RegularExpression, Some(_), _)
        | (StringMatchType::RegularExpression, _, Some(_)) => regex(
            format!("/(?:{})/(?:{})", service.unwrap_or("[^/]+"), method.unwrap_or("[^/]+")),
            p,
        ),
        (_, None, None) => PathMatcher::Prefix("/".into()),
    }
}

/// The first match of each name (Gateway API: later ones with an equivalent name are ignored).
fn first_by_name<'m>(
    list: &'m [ValueMatch],
    same: impl Fn(&str, &str) -> bool + 'm,
) -> impl Iterator<Item = &'m ValueMatch> + 'm {
    list.iter()
        .enumerate()
        .filter(move |(i, m)| !list[..*i].iter().any(|earlier| same(&earlier.name, &m.name)))
        .map(|(_, m)| m)
}

fn header_matchers(
    list: &[ValueMatch],
    field: &str,
    p: &mut Problems<'_>,
) -> Vec<(Option<HeaderName>, ValueMatcher)> {
    first_by_name(list, |a, b| a.eq_ignore_ascii_case(b))
        .map(|h| {
            let name = HeaderName::from_bytes(h.name.as_bytes()).ok();
            if name.is_none() {
                p.add(format_args!("{field}.headers: {:?} is not a header name", h.name));
            }
            (name, value_matcher(h, field, "headers", p))
        })
        .collect()
}

fn value_matcher(m: &ValueMatch, field: &str, list: &str, p: &mut Problems<'_>) -> ValueMatcher {
    match m.kind {
        StringMatchType::Exact => ValueMatcher::Exact(m.value.clone()),
        StringMatchType::RegularExpression => {
            ValueMatcher::Regex(p.full_regex(&format!("{field}.{list}[{}]", m.name), &m.value))
        }
    }
}

impl Matcher {
    /// A rule without matches: `PathPrefix /`.
    fn everything() -> Self {
        Self {
            path: PathMatcher::Prefix("/".into()),
            headers: Vec::new(),
            query: Vec::new(),
            method: None,
            rank: None,
        }
    }

    fn matches(&self, req: &RequestView<'_>) -> bool {
        self.method.as_deref().is_none_or(|m| m == req.method)
            && self.path.matches(req.path)
            && self.headers.iter().all(|(name, value)| {
                name.as_ref()
                    .and_then(|n| header_value(req.headers, n))
                    .is_some_and(|v| value.matches(&v))
            })
            && self.query.iter().all(|(name, value)| {
                query_value(req.query, name).is_some_and(|v| value.matches(v.as_bytes()))
            })
    }
}

impl PathMatcher {
    /// (rank, length): see the module documentation.
    fn rank(&self) -> (u8, usize) {
        match self {
            Self::Exact(_) => (0, 0),
            Self::Prefix(p) => (2, p.trim_end_matches('/').len()),
            Self::Regex(len, _) => (3, *len),
        }
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(v) => path == v,
            Self::Prefix(p) => {
                p.trim_end_matches('/').is_empty() || strip_prefix(path, p).is_some()
            }
            Self::Regex(_, re) => re.as_ref().is_some_and(|re| re.is_match(path)),
        }
    }
}

impl ValueMatcher {
    fn matches(&self, value: &[u8]) -> bool {
        match self {
            Self::Exact(v) => value == v.as_bytes(),
            Self::Regex(re) => re
                .as_ref()
                .zip(std::str::from_utf8(value).ok())
                .is_some_and(|(re, v)| re.is_match(v)),
        }
    }
}

/// A header's value; repeated headers are joined with `,` (RFC 9110, section 5.3).
fn header_value<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<Cow<'h, [u8]>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(Cow::Borrowed(first.as_bytes()));
    };
    let mut joined = first.as_bytes().to_vec();
    for v in std::iter::once(second).chain(values) {
        joined.push(b',');
        joined.extend_from_slice(v.as_bytes());
    }
    Some(Cow::Owned(joined))
}

/// The first value of query parameter `name`, raw (nothing decoded); `a` alone has value `""`.
fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
        (n == name).then_some(v)
    })
}

/// The rest of `path` after `prefix` on a segment boundary (a trailing `/` in the prefix is
/// ignored): `""` or a string starting with `/`; `None` when the prefix does not match.
fn strip_prefix<'p>(path: &'p str, prefix: &str) -> Option<&'p str> {
    let rest = path.strip_prefix(prefix.trim_end_matches('/'))?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// Applies a `HeaderModifier`: `remove` deletes every value, then `set` replaces, then `add`
/// appends another value (equivalent to a `,`-joined one), as Envoy orders them. Names are
/// case-insensitive; invalid names or values are skipped.
pub fn modify_headers(headers: &mut HeaderMap, m: &HeaderModifier) {
    for name in &m.remove {
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(name);
        }
    }
    let parse = |h: &sinew_model::HeaderValue| {
        Some((
            HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            HeaderValue::from_str(&h.value).ok()?,
        ))
    };
    // A full map (thousands of names) takes no more rather than failing the request; the
    // lists are bounded when validated, so only a request already that large gets here.
    for (name, value) in m.set.iter().filter_map(parse) {
        let _ = headers.try_insert(name, value);
    }
    for (name, value) in m.add.iter().filter_map(parse) {
        let _ = headers.try_append(name, value);
    }
}

/// The new path for a `URLRewrite` or `RequestRedirect` path modifier: `ReplaceFullPath`, or
/// `ReplacePrefixMatch`, which swaps the matched prefix and keeps the rest with exactly one
/// `/` at the seam (prefix `/foo` replaced by `/bar`: `/foo` -> `/bar`, `/foo/` -> `/bar/`,
/// `/foo/x` -> `/bar/x`; replaced by `/`: `/foo/x` -> `/x`, `/foo` -> `/`). Without a matched
/// prefix, or when it does not prefix `path`, the path is unchanged.
pub fn rewrite_path(path: &str, matched_prefix: Option<&str>, m: &PathModifier) -> String {
    let with = match m {
        PathModifier::ReplaceFullPath { replace_full_path: p } if p.is_empty() => {
            return "/".into();
        }
        PathModifier::ReplaceFullPath { replace_full_path: p } => return p.clone(),
        PathModifier::ReplacePrefixMatch { replace_prefix_match: with } => with,
    };
    let Some(rest) = matched_prefix.and_then(|prefix| strip_prefix(path, prefix)) else {
        return path.to_owned();
    };
    let head = with.trim_end_matches('/');
    let mut out = String::with_capacity(head.len() + rest.len() + 1);
    if !head.is_empty() && !head.starts_with('/') {
        out.push('/');
    }
    out.push_str(head);
    if !rest.is_empty() {
        out.push('/');
        out.push_str(rest.trim_start_matches('/'));
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// The `Location` of a `RequestRedirect`, given the request's scheme (`http`), host
/// (authority without port, may be empty), port, path, the prefix that matched and query.
/// Scheme, hostname, port and path are replaced as configured. Without a configured port, a
/// configured scheme implies its default port, otherwise the request's port is kept; the
/// default ports (80 for http, 443 for https) are omitted. The query is kept. Without any
/// host the Location is relative (path and query only).
pub fn redirect_location(
    r: &RequestRedirect,
    scheme: &str,
    host: &str,
    port: Option<u16>,
    path: &str,
    matched_prefix: Option<&str>,
    query: Option<&str>,
) -> String {
    let scheme = r.scheme.as_deref().unwrap_or(scheme);
    let host = r.hostname.as_deref().unwrap_or(host);
    let default_port = match scheme {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    };
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => Some(p.0),
        (None, Some(_)) => default_port,
        (None, None) => port,
    };
    let path = match &r.path {
        Some(m) => rewrite_path(path, matched_prefix, m),
        None => path.to_owned(),
    };
    let mut out = String::new();
    if !host.is_empty() {
        out.push_str(scheme);
        out.push_str("://");
        if host.contains(':') && !host.starts_with('[') {
            out.push('[');
            out.push_str(host);
            out.push(']');
        } else {
            out.push_str(host);
        }
        if let Some(p) = port.filter(|p| Some(*p) != default_port) {
            out.push(':');
            out.push_str(&p.to_string());
        }
    }
    if !path.starts_with('/') {
        out.push('/');
    }
    out.push_str(&path);
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        out.push('?');
        out.push_str(q);
    }
    out
}
