//! Compiled policy rules and how one connection or HTTP request is matched against them.
//!
//! Matching never allocates: a principal is compared against `<td>/ns/<ns>/sa/<sa>` piece by
//! piece instead of being formatted, and a failed match reports only which field failed
//! ([`Miss`]); [`super::explain`] turns that into words when someone asks.

use std::{borrow::Cow, collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use sinew_identity::SpiffeId;
use sinew_model::{
    Action, AuthorizationPolicySpec, Condition, ConditionKey, Operation, PolicyTargetRef, Rule,
};

use super::{HttpRequest, Scope, Target};

/// The connection or request being checked, with the source address already canonical.
pub(super) struct Request<'a> {
    pub identity: Option<&'a SpiffeId>,
    pub ip: IpAddr,
    pub port: u16,
    /// The HTTP request (path without query) at the waypoint; `None` for an L4 check, where
    /// the L7 fields cannot be evaluated.
    pub http: Option<HttpRequest<'a>>,
}

/// A source or operation field that did not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Field {
    Principals,
    NotPrincipals,
    Namespaces,
    NotNamespaces,
    ServiceAccounts,
    NotServiceAccounts,
    IpBlocks,
    NotIpBlocks,
    Ports,
    NotPorts,
    Methods,
    NotMethods,
    Paths,
    NotPaths,
    Hosts,
    NotHosts,
}

impl Field {
    /// The field's name in the policy, as written in YAML.
    pub fn name(self) -> &'static str {
        match self {
            Self::Principals => "principals",
            Self::NotPrincipals => "notPrincipals",
            Self::Namespaces => "namespaces",
            Self::NotNamespaces => "notNamespaces",
            Self::ServiceAccounts => "serviceAccounts",
            Self::NotServiceAccounts => "notServiceAccounts",
            Self::IpBlocks => "ipBlocks",
            Self::NotIpBlocks => "notIpBlocks",
            Self::Ports => "ports",
            Self::NotPorts => "notPorts",
            Self::Methods => "methods",
            Self::NotMethods => "notMethods",
            Self::Paths => "paths",
            Self::NotPaths => "notPaths",
            Self::Hosts => "hosts",
            Self::NotHosts => "notHosts",
        }
    }

    /// True for the `not*` forms, which fail when the value is in the list.
    pub fn negated(self) -> bool {
        matches!(
            self,
            Self::NotPrincipals
                | Self::NotNamespaces
                | Self::NotServiceAccounts
                | Self::NotIpBlocks
                | Self::NotPorts
                | Self::NotMethods
                | Self::NotPaths
                | Self::NotHosts
        )
    }
}

/// Why a rule did not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Miss {
    /// An ALLOW rule with an L7-only part (see [`CompiledRule::l7`]): it never matches at L4.
    L7,
    /// `from[index]` failed on `field` (reported for every source when none matched).
    From { index: usize, field: Field },
    /// `to[index]` failed on `field` (reported for every operation when none matched).
    To { index: usize, field: Field },
    /// `when[index]` failed: no value matched its `values` or (`negated`) one matched its
    /// `notValues`.
    When { index: usize, negated: bool },
}

/// Receives what an evaluation went through. [`NoTrace`] for `check`, the explainer for
/// `explain`: both run the very same evaluation, so they cannot disagree.
pub(super) trait Trace {
    /// Whether misses are wanted, and whether evaluation must go on past the deciding match.
    const ON: bool;
    /// A rule of the policy being evaluated did not match.
    fn miss(&mut self, rule: usize, miss: Miss);
    /// A policy was evaluated: the first rule that matched, if any.
    fn policy(&mut self, policy: &Policy, matched: Option<usize>);
}

/// The hot path's tracer: records nothing.
pub(super) struct NoTrace;

impl Trace for NoTrace {
    const ON: bool = false;
    fn miss(&mut self, _: usize, _: Miss) {}
    fn policy(&mut self, _: &Policy, _: Option<usize>) {}
}

/// What a `targetRefs` entry attaches a policy to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::authz) enum TargetRef {
    /// A Service of the policy's namespace, by name.
    Service(String),
    /// A waypoint, by name.
    Gateway(String),
}

impl TargetRef {
    /// `None` for a kind or group that validation refuses: such an entry attaches to nothing.
    fn new(t: &PolicyTargetRef) -> Option<Self> {
        match (t.kind.as_str(), t.group.as_deref().unwrap_or_default()) {
            ("Service", "" | "core") => Some(Self::Service(t.name.clone())),
            ("Gateway", "" | "gateway.networking.k8s.io") => Some(Self::Gateway(t.name.clone())),
            _ => None,
        }
    }
}

/// One AuthorizationPolicy, ready to evaluate.
#[derive(Debug, Clone)]
pub(super) struct Policy {
    /// `namespace/name`.
    pub key: String,
    pub namespace: String,
    pub action: Action,
    /// The L4 scope; for a policy with `targetRefs`, see [`Policy::targeted_scope`].
    pub scope: Scope,
    /// `matchLabels` (empty unless `scope` is `Workload`, where empty selects everything).
    pub selector: BTreeMap<String, String>,
    /// `targetRefs`, those that can attach to something.
    pub targets: Vec<TargetRef>,
    pub rules: Vec<CompiledRule>,
}

impl Policy {
    pub fn new(namespace: &str, name: &str, scope: Scope, spec: &AuthorizationPolicySpec) -> Self {
        Self {
            key: format!("{namespace}/{name}"),
            namespace: namespace.to_owned(),
            action: spec.action,
            scope,
            selector: spec.selector.as_ref().map(|s| s.match_labels.clone()).unwrap_or_default(),
            targets: spec.targets().filter_map(TargetRef::new).collect(),
            rules: spec.rules.iter().map(CompiledRule::new).collect(),
        }
    }

    /// Whether the policy is attached to `target`'s service (a Service of the target's
    /// namespace) or to its waypoint (a Gateway of that name; the caller has already kept
    /// only policies of the target's namespace or the root namespace).
    pub fn targets(&self, target: &Target<'_>) -> bool {
        self.targets.iter().any(|t| match t {
            TargetRef::Service(name) => {
                *name == target.service && self.namespace == target.namespace
            }
            TargetRef::Gateway(name) => target.waypoint == Some(name.as_str()),
        })
    }

    /// Why a policy with `targetRefs` applies to `target`: its service, else its waypoint.
    pub fn targeted_scope(&self, target: &Target<'_>) -> Scope {
        let service = self.targets.iter().any(|t| {
            matches!(t, TargetRef::Service(name) if *name == target.service)
                && self.namespace == target.namespace
        });
        if service { Scope::Service } else { Scope::Gateway }
    }

    /// Whether a workload with these labels is selected (always, for mesh and namespace scope).
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// The first rule that matches. No rules: nothing matches (Istio: an ALLOW policy without
    /// rules allows nothing, a DENY policy without rules denies nothing).
    pub fn first_match<T: Trace>(&self, req: &Request<'_>, t: &mut T) -> Option<usize> {
        let matched = self
            .rules
            .iter()
            .enumerate()
            .find(|(i, rule)| rule.matches(*i, self.action, &self.namespace, req, t))
            .map(|(i, _)| i);
        t.policy(self, matched);
        matched
    }
}

/// One rule, with its IP blocks parsed.
#[derive(Debug, Clone)]
pub(super) struct CompiledRule {
    pub from: Vec<CompiledSource>,
    pub to: Vec<Operation>,
    pub when: Vec<CompiledCondition>,
    /// The first L7-only part, which an L4 check cannot evaluate, as written
    /// (`to[0].operation.methods`, `when[1] request.headers[x-user]`).
    pub l7: Option<String>,
}

impl CompiledRule {
    fn new(rule: &Rule) -> Self {
        let when: Vec<_> = rule.when.iter().map(CompiledCondition::new).collect();
        let in_to =
            rule.to.iter().enumerate().find_map(|(i, t)| {
                l7_field(&t.operation).map(|f| format!("to[{i}].operation.{f}"))
            });
        let in_when = || {
            rule.when
                .iter()
                .enumerate()
                .find(|(_, c)| ConditionKey::parse(&c.key).is_ok_and(|k| k.is_l7()))
                .map(|(i, c)| format!("when[{i}] {}", c.key))
        };
        Self {
            from: rule.from.iter().map(|f| CompiledSource::new(&f.source)).collect(),
            to: rule.to.iter().map(|t| t.operation.clone()).collect(),
            l7: in_to.or_else(in_when),
            when,
        }
    }

    /// Every present part matches: some source and some operation. At L4 (no HTTP request)
    /// an ALLOW rule with L7 fields never matches, and DENY and AUDIT rules ignore those
    /// fields (a broader match is the safe side for them, istiod's stated intent; ztunnel
    /// itself skips DENY entries that hold only L7 fields).
    fn matches<T: Trace>(
        &self,
        index: usize,
        action: Action,
        policy_ns: &str,
        req: &Request<'_>,
        t: &mut T,
    ) -> bool {
        if action == Action::Allow && req.http.is_none() && self.l7.is_some() {
            t.miss(index, Miss::L7);
            return false;
        }
        if !self.from.is_empty() && !self.from.iter().any(|s| s.check(req, policy_ns).is_ok()) {
            if T::ON {
                for (i, s) in self.from.iter().enumerate() {
                    if let Err(field) = s.check(req, policy_ns) {
                        t.miss(index, Miss::From { index: i, field });
                    }
                }
            }
            return false;
        }
        if !self.to.is_empty() && !self.to.iter().any(|op| check_operation(op, req).is_ok()) {
            if T::ON {
                for (i, op) in self.to.iter().enumerate() {
                    if let Err(field) = check_operation(op, req) {
                        t.miss(index, Miss::To { index: i, field });
                    }
                }
            }
            return false;
        }
        for (i, c) in self.when.iter().enumerate() {
            if let Err(negated) = c.check(req, action) {
                t.miss(index, Miss::When { index: i, negated });
                return false;
            }
        }
        true
    }
}

fn l7_field(op: &Operation) -> Option<&'static str> {
    [
        (!op.methods.is_empty(), "methods"),
        (!op.not_methods.is_empty(), "notMethods"),
        (!op.paths.is_empty(), "paths"),
        (!op.not_paths.is_empty(), "notPaths"),
        (!op.hosts.is_empty(), "hosts"),
        (!op.not_hosts.is_empty(), "notHosts"),
    ]
    .into_iter()
    .find_map(|(present, name)| present.then_some(name))
}

/// `from[i].source` with its IP blocks parsed once.
#[derive(Debug, Clone)]
pub(super) struct CompiledSource {
    pub spec: sinew_model::Source,
    ip_blocks: Vec<IpNet>,
    not_ip_blocks: Vec<IpNet>,
}

impl CompiledSource {
    fn new(spec: &sinew_model::Source) -> Self {
        // An unparsable block (validation refuses them) is dropped: it never matches. A
        // non-empty `ipBlocks` whose blocks all failed then matches nothing, as it should.
        let parse = |list: &[String]| list.iter().filter_map(|b| parse_block(b)).collect();
        Self {
            ip_blocks: parse(&spec.ip_blocks),
            not_ip_blocks: parse(&spec.not_ip_blocks),
            spec: spec.clone(),
        }
    }

    /// `Ok` when every present field matches, else the first that does not, in the order
    /// the fields are declared. A source without identity (plaintext) fails `principals`,
    /// `namespaces` and `serviceAccounts` and passes their `not*` forms, as in Istio.
    pub fn check(&self, req: &Request<'_>, policy_ns: &str) -> Result<(), Field> {
        let s = &self.spec;
        let with_id = |list: &[String], f: fn(&str, &SpiffeId, &str) -> bool| {
            req.identity.is_some_and(|id| list.iter().any(|p| f(p, id, policy_ns)))
        };
        let principal: fn(&str, &SpiffeId, &str) -> bool = |p, id, _| principal_matches(p, id);
        let namespace: fn(&str, &SpiffeId, &str) -> bool =
            |p, id, _| wildcard_matches(p, &[&id.namespace]);
        let account: fn(&str, &SpiffeId, &str) -> bool = service_account_matches;
        let in_blocks = |nets: &[IpNet]| nets.iter().any(|n| n.contains(&req.ip));
        first_failure([
            (Field::Principals, &s.principals, &|| with_id(&s.principals, principal)),
            (Field::NotPrincipals, &s.not_principals, &|| with_id(&s.not_principals, principal)),
            (Field::Namespaces, &s.namespaces, &|| with_id(&s.namespaces, namespace)),
            (Field::NotNamespaces, &s.not_namespaces, &|| with_id(&s.not_namespaces, namespace)),
            (Field::ServiceAccounts, &s.service_accounts, &|| {
                with_id(&s.service_accounts, account)
            }),
            (Field::NotServiceAccounts, &s.not_service_accounts, &|| {
                with_id(&s.not_service_accounts, account)
            }),
            (Field::IpBlocks, &s.ip_blocks, &|| in_blocks(&self.ip_blocks)),
            (Field::NotIpBlocks, &s.not_ip_blocks, &|| in_blocks(&self.not_ip_blocks)),
        ])
    }
}

/// `Ok` when every present field matches, else the first that does not. Without an HTTP
/// request (L4) the L7 fields are skipped: see [`CompiledRule::matches`] for why that is safe.
fn check_operation(op: &Operation, req: &Request<'_>) -> Result<(), Field> {
    let port = req.port;
    first_failure([
        (Field::Ports, &op.ports, &|| op.ports.iter().any(|p| p.0 == port)),
        (Field::NotPorts, &op.not_ports, &|| op.not_ports.iter().any(|p| p.0 == port)),
    ])?;
    let Some(http) = req.http else { return Ok(()) };
    let method = |list: &[String]| list.iter().any(|m| *m == http.method);
    let path = |list: &[String]| list.iter().any(|p| wildcard_matches(p, &[http.path]));
    let host = |list: &[String]| list.iter().any(|p| host_matches(p, http.host));
    first_failure([
        (Field::Methods, &op.methods, &|| method(&op.methods)),
        (Field::NotMethods, &op.not_methods, &|| method(&op.not_methods)),
        (Field::Paths, &op.paths, &|| path(&op.paths)),
        (Field::NotPaths, &op.not_paths, &|| path(&op.not_paths)),
        (Field::Hosts, &op.hosts, &|| host(&op.hosts)),
        (Field::NotHosts, &op.not_hosts, &|| host(&op.not_hosts)),
    ])
}

/// `when[i]`, its addresses and ports parsed once.
#[derive(Debug, Clone)]
pub(super) struct CompiledCondition {
    /// `None` for a key validation refuses (which no resource that passed it has): such a
    /// condition is decided on the safe side, as an L7 field at L4 is (see
    /// [`CompiledCondition::check`]).
    key: Option<ConditionKey>,
    pub spec: Condition,
    nets: [Vec<IpNet>; 2],
    ports: [Vec<u16>; 2],
}

impl CompiledCondition {
    fn new(spec: &Condition) -> Self {
        let lists = [&spec.values, &spec.not_values];
        Self {
            nets: lists.map(|l| l.iter().filter_map(|v| parse_block(v)).collect()),
            ports: lists.map(|l| l.iter().filter_map(|v| v.parse().ok()).collect()),
            key: ConditionKey::parse(&spec.key).ok(),
            spec: spec.clone(),
        }
    }

    /// The attribute's value as text (for explanations); `None` when the connection or
    /// request has none (no identity, no such header) or, at L4, an HTTP one.
    pub fn value(&self, req: &Request<'_>) -> Option<String> {
        match self.key.as_ref()? {
            ConditionKey::SourceIp => Some(req.ip.to_string()),
            ConditionKey::DestinationPort => Some(req.port.to_string()),
            ConditionKey::SourceNamespace => req.identity.map(|id| id.namespace.clone()),
            ConditionKey::SourcePrincipal => req.identity.map(|id| id.principal()),
            ConditionKey::RequestHeader(name) => {
                header(req.http?.headers?, name).map(|v| String::from_utf8_lossy(&v).into_owned())
            }
        }
    }

    /// Whether the attribute matches one entry of `values` (`0`) or `notValues` (`1`);
    /// `None` when there is no value to compare.
    fn any_match(&self, list: usize, req: &Request<'_>) -> Option<bool> {
        let strings = if list == 0 { &self.spec.values } else { &self.spec.not_values };
        Some(match self.key.as_ref()? {
            ConditionKey::SourceIp => self.nets[list].iter().any(|n| n.contains(&req.ip)),
            ConditionKey::DestinationPort => self.ports[list].contains(&req.port),
            ConditionKey::SourceNamespace => {
                let id = req.identity?;
                strings.iter().any(|p| wildcard_matches(p, &[&id.namespace]))
            }
            ConditionKey::SourcePrincipal => {
                let id = req.identity?;
                strings.iter().any(|p| principal_matches(p, id))
            }
            ConditionKey::RequestHeader(name) => {
                let value = header(req.http?.headers?, name)?;
                strings.iter().any(|p| bytes_match(p, &value, false))
            }
        })
    }

    /// `Ok` when the condition holds; `Err(negated)` as in [`Miss::When`]. A missing value
    /// fails `values` and passes `notValues`, as a plaintext source does with identity
    /// fields. At L4 a header condition is skipped, as L7 fields are (see
    /// [`CompiledRule::matches`]). A key that cannot be evaluated holds for a DENY or AUDIT
    /// rule and fails an ALLOW rule: the rule then denies more, never admits more.
    pub fn check(&self, req: &Request<'_>, action: Action) -> Result<(), bool> {
        let Some(key) = &self.key else {
            return if action == Action::Allow { Err(false) } else { Ok(()) };
        };
        if key.is_l7() && req.http.is_none() {
            return Ok(());
        }
        if !self.spec.values.is_empty() && self.any_match(0, req) != Some(true) {
            return Err(false);
        }
        if !self.spec.not_values.is_empty() && self.any_match(1, req) == Some(true) {
            return Err(true);
        }
        Ok(())
    }
}

/// Header `name`'s values as sent, several joined with `,` as Envoy's matchers see them;
/// `None` when absent. Bytes, not text: a value with bytes outside ASCII (which HTTP/1.1
/// allows) is compared as it is, never taken for a missing header.
fn header<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<Cow<'h, [u8]>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?.as_bytes();
    let Some(second) = values.next() else { return Some(Cow::Borrowed(first)) };
    let mut out = first.to_vec();
    for v in std::iter::once(second).chain(values) {
        out.push(b',');
        out.extend_from_slice(v.as_bytes());
    }
    Some(Cow::Owned(out))
}

/// Istio's string match of `pattern` against bytes as sent: `*` matches any value (present:
/// callers pass only values that exist), a leading `*` a suffix, a trailing one a prefix,
/// else exact; `ignore_case` compares ASCII letters without regard to case (`hosts`).
fn bytes_match(pattern: &str, value: &[u8], ignore_case: bool) -> bool {
    let eq = |a: &[u8], b: &[u8]| if ignore_case { a.eq_ignore_ascii_case(b) } else { a == b };
    if pattern == "*" {
        true
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        let suffix = suffix.as_bytes();
        value.len() >= suffix.len() && eq(&value[value.len() - suffix.len()..], suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        let prefix = prefix.as_bytes();
        value.len() >= prefix.len() && eq(&value[..prefix.len()], prefix)
    } else {
        eq(value, pattern.as_bytes())
    }
}

/// Istio's `hosts` match: case-blind, the port as sent; `*` needs a host (Istio checks the
/// header is present).
fn host_matches(pattern: &str, host: &[u8]) -> bool {
    !host.is_empty() && bytes_match(pattern, host, true)
}

/// A field, its list, and whether the value is in that list (computed only when needed).
type Check<'a, T> = (Field, &'a [T], &'a dyn Fn() -> bool);

/// The first failing check, in order: a non-empty positive field needs the value in its list,
/// a non-empty `not*` field needs it absent.
fn first_failure<T, const N: usize>(checks: [Check<'_, T>; N]) -> Result<(), Field> {
    match checks.into_iter().find(|(f, list, found)| !list.is_empty() && found() == f.negated()) {
        Some((field, _, _)) => Err(field),
        None => Ok(()),
    }
}

/// A CIDR or a single address; an IPv4-mapped IPv6 block is folded to IPv4 like the source
/// addresses it is compared with.
pub(super) fn parse_block(s: &str) -> Option<IpNet> {
    let net = sinew_model::parse_ip_block(s)?;
    Some(match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    })
}

fn principal_matches(pattern: &str, id: &SpiffeId) -> bool {
    wildcard_matches(
        pattern,
        &[&id.trust_domain, "/ns/", &id.namespace, "/sa/", &id.service_account],
    )
}

/// `<ns>/<sa>`, or a bare `<sa>` of the policy's namespace.
fn service_account_matches(pattern: &str, id: &SpiffeId, policy_ns: &str) -> bool {
    let (ns, sa) = pattern.split_once('/').unwrap_or((policy_ns, pattern));
    id.namespace == ns && id.service_account == sa
}

/// Istio's string match on a value given as consecutive pieces: `*` matches anything, a
/// leading `*` makes a suffix match, a trailing one a prefix match, anything else is exact
/// (so a `*` in the middle is a literal character, never a wildcard).
pub(super) fn wildcard_matches(pattern: &str, value: &[&str]) -> bool {
    if pattern == "*" {
        true
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        ends_with(value, suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        starts_with(value, prefix)
    } else {
        equals(value, pattern)
    }
}

fn equals(parts: &[&str], mut rest: &str) -> bool {
    for part in parts {
        match rest.strip_prefix(part) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}

fn starts_with(parts: &[&str], mut prefix: &str) -> bool {
    for part in parts {
        if prefix.len() <= part.len() {
            return part.starts_with(prefix);
        }
        match prefix.strip_prefix(part) {
            Some(r) => prefix = r,
            None => return false,
        }
    }
    prefix.is_empty()
}

fn ends_with(parts: &[&str], mut suffix: &str) -> bool {
    for part in parts.iter().rev() {
        if suffix.len() <= part.len() {
            return part.ends_with(suffix);
        }
        match suffix.strip_suffix(part) {
            Some(r) => suffix = r,
            None => return false,
        }
    }
    suffix.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Piecewise matching agrees with matching the joined string, for patterns cut at every
    /// position of real and near-miss principals.
    #[test]
    fn piecewise_matches_joined() {
        let parts = ["cluster.local", "/ns/", "shop", "/sa/", "web"];
        let joined: String = parts.concat();
        let others = ["cluster.local/ns/shop/sa/webx", "xcluster.local/ns/shop/sa/web", "", "é"];
        for s in std::iter::once(joined.as_str()).chain(others) {
            for cut in (0..=s.len()).filter(|&i| s.is_char_boundary(i)) {
                let (head, tail) = s.split_at(cut);
                for pattern in [format!("{head}*"), format!("*{tail}"), head.to_owned()] {
                    let want = if pattern == "*" {
                        true
                    } else if let Some(sfx) = pattern.strip_prefix('*') {
                        joined.ends_with(sfx)
                    } else if let Some(pfx) = pattern.strip_suffix('*') {
                        joined.starts_with(pfx)
                    } else {
                        joined == pattern
                    };
                    assert_eq!(wildcard_matches(&pattern, &parts), want, "{pattern}");
                }
            }
        }
    }

    #[test]
    fn a_condition_that_cannot_be_evaluated_takes_the_safe_side() {
        let c = CompiledCondition::new(&Condition {
            key: "request.auth.claims[iss]".into(),
            values: vec!["x".into()],
            not_values: vec![],
        });
        let req = Request { identity: None, ip: [10, 0, 0, 1].into(), port: 80, http: None };
        assert_eq!(c.check(&req, Action::Allow), Err(false), "an ALLOW rule admits nothing");
        assert_eq!(c.check(&req, Action::Deny), Ok(()), "a DENY rule matches without it");
        assert_eq!(c.check(&req, Action::Audit), Ok(()));
    }

    #[test]
    fn mapped_blocks_fold_to_v4() {
        assert_eq!(parse_block("::ffff:10.0.0.0/104"), "10.0.0.0/8".parse().ok());
        assert_eq!(parse_block("::ffff:10.0.0.1"), "10.0.0.1/32".parse().ok());
        assert_eq!(parse_block("::ffff:0:0/80"), "::ffff:0:0/80".parse().ok());
        assert_eq!(parse_block("nonsense"), None);
    }
}
