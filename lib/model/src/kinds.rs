//! The spec of every kind, with Kubernetes / Istio / Gateway API field names, and their checks.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    Validate,
    validate::{Duration, Errors, Port, dns_label, is_dns_label, is_dns_subdomain},
};

// ---- Namespace ----

/// `Namespace.spec` (nothing Sinew reads; enrollment is in labels).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    /// Kubernetes' finalizers, accepted and ignored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finalizers: Vec<String>,
}

impl Validate for NamespaceSpec {
    fn validate(&self, _: &mut Errors) {}

    fn empty() -> Option<Self> {
        Some(Self::default())
    }
}

// ---- Workload ----

/// `Workload.spec`: a pod or VM, where it runs and as whom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// The identity it holds: `spiffe://<td>/ns/<namespace>/sa/<serviceAccount>`.
    #[serde(default = "default_sa")]
    pub service_account: String,
    /// The node it runs on; only that node's agent may get its certificate.
    pub node: String,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
}

fn default_sa() -> String {
    "default".into()
}

impl Validate for WorkloadSpec {
    fn validate(&self, e: &mut Errors) {
        dns_label(e, "serviceAccount", &self.service_account);
        e.check(is_dns_subdomain(&self.node), "node", || {
            format!("{:?} is not a node name", self.node)
        });
        e.check(!self.ips.is_empty(), "ips", || "a workload needs at least one address".into());
        e.each("ips", &self.ips, |e, ip| {
            e.check(!ip.is_unspecified() && !ip.is_loopback() && !ip.is_multicast(), "", || {
                format!("{ip} cannot be a workload address")
            })
        });
    }
}

// ---- Service ----

/// `Service.spec`: virtual IPs, ports, and the workloads behind them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Virtual IPs (empty: headless).
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<IpAddr>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Workloads whose labels match are the endpoints.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

/// One service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    /// Optional name (an RFC 1123 label).
    #[serde(default)]
    pub name: Option<String>,
    /// The service port.
    pub port: Port,
    /// The workload port (defaults to `port`).
    #[serde(default)]
    pub target_port: Option<Port>,
    /// Only TCP is carried.
    #[serde(default = "tcp")]
    pub protocol: String,
    /// `http`, `http2`, `grpc`, `tcp`...: how a waypoint should treat it.
    #[serde(default)]
    pub app_protocol: Option<String>,
}

fn tcp() -> String {
    "TCP".into()
}

impl Validate for ServiceSpec {
    fn validate(&self, e: &mut Errors) {
        e.check(!self.ports.is_empty(), "ports", || "a service needs at least one port".into());
        e.each("ports", &self.ports, |e, p| {
            if let Some(n) = &p.name {
                dns_label(e, "name", n);
            }
            e.check(p.protocol == "TCP", "protocol", || {
                format!("{:?}: only TCP is supported", p.protocol)
            });
        });
        let mut seen = std::collections::BTreeSet::new();
        e.each("ports", &self.ports, |e, p| {
            e.check(seen.insert(p.port), "port", || format!("port {} is listed twice", p.port.0));
        });
        e.each("clusterIPs", &self.cluster_ips, |e, ip| {
            e.check(!ip.is_unspecified() && !ip.is_multicast(), "", || {
                format!("{ip} cannot be a service address")
            });
        });
    }
}

// ---- AuthorizationPolicy ----

/// `matchLabels` selector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    /// Every label must match.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Admit what matches.
    #[default]
    Allow,
    /// Refuse what matches.
    Deny,
    /// Log what matches as a would-be denial, admit it.
    Audit,
}

/// `AuthorizationPolicy.spec` (Istio's field names and semantics).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Workloads it applies to; absent: the whole namespace (or mesh, in the root namespace).
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    /// Services or waypoints (`Gateway`) it is attached to, as in Istio ambient: such a policy
    /// is enforced by the waypoint, at L7, and not by the node agents. Exclusive with
    /// `selector`.
    #[serde(default, rename = "targetRefs")]
    pub target_refs: Vec<PolicyTargetRef>,
    /// Istio's earlier single form of `targetRefs` (deprecated since 1.22), exclusive with it;
    /// moved into `targetRefs` once validated, so it is never sent on.
    #[serde(default, rename = "targetRef", skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetRef>,
    /// ALLOW (default), DENY or AUDIT.
    #[serde(default)]
    pub action: Action,
    /// Any rule matching makes the policy match; no rules: the policy matches nothing (an
    /// ALLOW policy then allows nothing, a DENY policy denies nothing), as in Istio.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// `targetRefs[i]`: a Service, or a waypoint as a Gateway API `Gateway`, in the policy's
/// namespace (a root-namespace policy targeting a `Gateway` applies to every waypoint of that
/// name).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTargetRef {
    /// `""` or `core` for a Service, `""` or `gateway.networking.k8s.io` for a Gateway.
    #[serde(default)]
    pub group: Option<String>,
    /// `Service` or `Gateway`.
    pub kind: String,
    /// The Service's or the waypoint's name.
    pub name: String,
}

impl Validate for PolicyTargetRef {
    fn validate(&self, e: &mut Errors) {
        let groups: &[&str] = match self.kind.as_str() {
            "Service" => &["", "core"],
            "Gateway" => &["", "gateway.networking.k8s.io"],
            kind => {
                e.add("kind", format!("{kind:?} is not a target kind: Service or Gateway"));
                &[]
            }
        };
        if let Some(group) = &self.group
            && !groups.is_empty()
        {
            e.check(groups.contains(&group.as_str()), "group", || {
                let allowed: Vec<String> = groups.iter().map(|g| format!("{g:?}")).collect();
                format!("{group:?} is not the group of {}: {}", self.kind, allowed.join(" or "))
            });
        }
        dns_label(e, "name", &self.name);
    }
}

/// One rule: every present part must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Sources; any may match.
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    /// Operations; any may match.
    #[serde(default)]
    pub to: Vec<RuleTo>,
    /// Conditions; all must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// `when[i]`: a condition on one attribute of the connection or request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Condition {
    /// The attribute (see [`ConditionKey`]).
    pub key: String,
    /// Values of which the attribute must match one.
    #[serde(default)]
    pub values: Vec<String>,
    /// Values the attribute must match none of.
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// The attributes a condition can test: Istio's keys that need no JWT and no proxy-protocol
/// or `X-Forwarded-For` trust configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionKey {
    /// `source.ip`: the peer address (values are addresses or CIDRs).
    SourceIp,
    /// `source.namespace`: the namespace of the peer's identity.
    SourceNamespace,
    /// `source.principal`: the peer's identity, `<trust domain>/ns/<ns>/sa/<sa>`.
    SourcePrincipal,
    /// `destination.port`: the destination port (values are port numbers).
    DestinationPort,
    /// `request.headers[<name>]`: an HTTP request header (L7), the name lower-cased.
    RequestHeader(String),
}

/// The keys [`ConditionKey::parse`] accepts, for messages.
const CONDITION_KEYS: &str = "source.ip, source.namespace, source.principal, destination.port, \
                              request.headers[<name>]";

impl ConditionKey {
    /// Parses a `when` key; the error says why a key is refused.
    pub fn parse(key: &str) -> Result<Self, String> {
        Ok(match key {
            "source.ip" => Self::SourceIp,
            "source.namespace" => Self::SourceNamespace,
            "source.principal" => Self::SourcePrincipal,
            "destination.port" => Self::DestinationPort,
            _ => {
                if let Some(name) =
                    key.strip_prefix("request.headers[").and_then(|k| k.strip_suffix(']'))
                {
                    let token =
                        |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
                    if name.is_empty() || !name.bytes().all(token) {
                        return Err(format!("{key:?}: {name:?} is not an HTTP header name"));
                    }
                    return Ok(Self::RequestHeader(name.to_ascii_lowercase()));
                }
                let known = ["remote.ip", "destination.ip", "connection.sni"].contains(&key)
                    || key.starts_with("request.auth.")
                    || key.starts_with("experimental.");
                return Err(if known {
                    format!(
                        "{key:?} is an Istio condition Sinew does not evaluate (it supports {CONDITION_KEYS})"
                    )
                } else {
                    format!("{key:?} is not a condition key (supported: {CONDITION_KEYS})")
                });
            }
        })
    }

    /// True for a key only an HTTP request has.
    pub fn is_l7(&self) -> bool {
        matches!(self, Self::RequestHeader(_))
    }
}

/// `from[i]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFrom {
    /// The source.
    pub source: Source,
}

/// `to[i]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleTo {
    /// The operation.
    pub operation: Operation,
}

/// Who a connection or request comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    /// `<trust-domain>/ns/<ns>/sa/<sa>`, with `*` prefix or suffix wildcards.
    #[serde(default)]
    pub principals: Vec<String>,
    /// Negated `principals`.
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// Source namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Negated `namespaces`.
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Source service accounts as `<ns>/<sa>` or `<sa>` (same namespace).
    #[serde(default)]
    pub service_accounts: Vec<String>,
    /// Negated `serviceAccounts`.
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    /// Source addresses or CIDRs.
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    /// Negated `ipBlocks`.
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
}

/// What is being done.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    /// Destination ports.
    #[serde(default)]
    pub ports: Vec<Port>,
    /// Negated `ports`.
    #[serde(default)]
    pub not_ports: Vec<Port>,
    /// HTTP methods (L7, waypoint only).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Negated `methods`.
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// HTTP paths with `*` prefix or suffix wildcards (L7, waypoint only).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Negated `paths`.
    #[serde(default)]
    pub not_paths: Vec<String>,
    /// HTTP hosts (`Host` or `:authority` as sent, port included), compared without regard to
    /// case, with `*` prefix or suffix wildcards (L7, waypoint only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Negated `hosts`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
}

/// Parses `ipBlocks` entries: a CIDR or a single address.
pub fn parse_ip_block(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>().ok().or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

fn wildcard_ok(s: &str) -> bool {
    !s.is_empty() && (s == "*" || !s.trim_start_matches('*').trim_end_matches('*').contains('*'))
}

impl AuthorizationPolicySpec {
    /// What the policy is attached to: `targetRefs`, or the single `targetRef`.
    pub fn targets(&self) -> impl Iterator<Item = &PolicyTargetRef> {
        self.target_ref.iter().chain(&self.target_refs)
    }
}

impl Validate for AuthorizationPolicySpec {
    fn normalize(&mut self) {
        if let Some(t) = self.target_ref.take() {
            self.target_refs.insert(0, t);
        }
    }

    fn validate(&self, e: &mut Errors) {
        e.check(self.selector.is_none() || self.target_refs.is_empty(), "targetRefs", || {
            "selector and targetRefs are exclusive".to_owned()
        });
        e.check(self.selector.is_none() || self.target_ref.is_none(), "targetRef", || {
            "selector and targetRef are exclusive".to_owned()
        });
        e.check(self.target_refs.is_empty() || self.target_ref.is_none(), "targetRef", || {
            "targetRef and targetRefs are exclusive".to_owned()
        });
        e.each("targetRefs", &self.target_refs, |e, t| t.validate(e));
        if let Some(t) = &self.target_ref {
            e.at("targetRef", |e| t.validate(e));
        }
        e.each("rules", &self.rules, |e, rule| {
            e.each("from", &rule.from, |e, f| {
                e.at("source", |e| f.source.validate(e));
            });
            e.each("to", &rule.to, |e, t| {
                e.at("operation", |e| t.operation.validate(e));
            });
            e.each("when", &rule.when, |e, c| c.validate(e));
        });
    }
}

impl Validate for Source {
    fn validate(&self, e: &mut Errors) {
        for (field, list) in
            [("principals", &self.principals), ("notPrincipals", &self.not_principals)]
        {
            e.each(field, list, |e, p| {
                e.check(wildcard_ok(p), "", || format!("{p:?}: `*` only as a prefix or suffix"))
            });
        }
        for (field, list) in
            [("namespaces", &self.namespaces), ("notNamespaces", &self.not_namespaces)]
        {
            // As Istio: a name, `*`, or a prefix or suffix match (`prod-*`, `*-test`).
            e.each(field, list, |e, n| {
                let name = n.strip_prefix('*').or_else(|| n.strip_suffix('*')).unwrap_or(n);
                let ok = n == "*"
                    || (wildcard_ok(n)
                        && !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
                e.check(ok, "", || {
                    format!(
                        "{n:?} is not a namespace name, `*`, or one with `*` as prefix or suffix"
                    )
                })
            });
        }
        for (field, list) in [
            ("serviceAccounts", &self.service_accounts),
            ("notServiceAccounts", &self.not_service_accounts),
        ] {
            e.each(field, list, |e, sa| {
                let ok = match sa.split_once('/') {
                    Some((ns, name)) => is_dns_label(ns) && is_dns_label(name),
                    None => is_dns_label(sa),
                };
                e.check(ok, "", || {
                    format!("{sa:?} is not <namespace>/<service account> or <service account>")
                });
            });
        }
        for (field, list) in [("ipBlocks", &self.ip_blocks), ("notIpBlocks", &self.not_ip_blocks)] {
            e.each(field, list, |e, b| {
                e.check(parse_ip_block(b).is_some(), "", || {
                    format!("{b:?} is not an address or CIDR")
                })
            });
        }
    }
}

impl Validate for Condition {
    fn validate(&self, e: &mut Errors) {
        let key = match ConditionKey::parse(&self.key) {
            Ok(k) => k,
            Err(message) => return e.add("key", message),
        };
        e.check(!self.values.is_empty() || !self.not_values.is_empty(), "", || {
            "a condition needs values or notValues".into()
        });
        for (field, list) in [("values", &self.values), ("notValues", &self.not_values)] {
            e.each(field, list, |e, v| {
                let problem = match key {
                    ConditionKey::SourceIp => parse_ip_block(v)
                        .is_none()
                        .then(|| format!("{v:?} is not an address or CIDR")),
                    ConditionKey::DestinationPort => v
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0)
                        .is_none()
                        .then(|| format!("{v:?} is not a port number")),
                    _ => {
                        (!wildcard_ok(v)).then(|| format!("{v:?}: `*` only as a prefix or suffix"))
                    }
                };
                if let Some(message) = problem {
                    e.add("", message);
                }
            });
        }
    }
}

impl Validate for Operation {
    fn validate(&self, e: &mut Errors) {
        for (field, list) in [("hosts", &self.hosts), ("notHosts", &self.not_hosts)] {
            e.each(field, list, |e, h| {
                e.check(wildcard_ok(h), "", || format!("{h:?}: `*` only as a prefix or suffix"))
            });
        }
        for (field, list) in [("methods", &self.methods), ("notMethods", &self.not_methods)] {
            e.each(field, list, |e, m| {
                // An RFC 9110 token without lower case (methods match exactly, and a lower-
                // case one would never see a request): `GET`, `M-SEARCH`, `PROPFIND`.
                let ok = !m.is_empty()
                    && m.bytes().all(|b| {
                        b.is_ascii_uppercase()
                            || b.is_ascii_digit()
                            || b"!#$%&'*+-.^_`|~".contains(&b)
                    });
                e.check(ok, "", || format!("{m:?} is not an HTTP method (upper case)"))
            });
        }
        for (field, list) in [("paths", &self.paths), ("notPaths", &self.not_paths)] {
            e.each(field, list, |e, p| {
                e.check(wildcard_ok(p) && (p.starts_with('/') || p.starts_with('*')), "", || {
                    format!("{p:?} is not a path")
                })
            });
        }
    }
}

// ---- PeerAuthentication ----

/// mTLS mode of inbound traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the namespace or mesh.
    #[default]
    Unset,
    /// mTLS only.
    Strict,
    /// mTLS or plaintext.
    Permissive,
    /// Plaintext (not recommended).
    Disable,
}

/// `PeerAuthentication.spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads it applies to; absent: the namespace (or mesh, in the root namespace).
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    /// The mode.
    #[serde(default)]
    pub mtls: Option<Mtls>,
    /// Modes for some workload ports (the port the application listens on), over `mtls`;
    /// only with a selector, as Istio has it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<Port, Mtls>,
}

/// `mtls`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mtls {
    /// STRICT, PERMISSIVE, UNSET or DISABLE.
    #[serde(default)]
    pub mode: MtlsMode,
}

impl Validate for PeerAuthenticationSpec {
    fn validate(&self, e: &mut Errors) {
        // istiod refuses these too: a mesh or namespace policy has no workload to take ports
        // from.
        let selects = self.selector.as_ref().is_some_and(|s| !s.match_labels.is_empty());
        e.check(self.port_level_mtls.is_empty() || selects, "portLevelMtls", || {
            "port-level modes need a selector with matchLabels (they apply to a workload's ports)"
                .into()
        });
    }
}

// ---- HTTPRoute / GRPCRoute (Gateway API v1) ----

/// `parentRefs[i]`: the Service (or waypoint) the route attaches to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    /// `""` (core) for a Service, `gateway.networking.k8s.io` for a Gateway.
    #[serde(default)]
    pub group: Option<String>,
    /// `Service` or `Gateway`.
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace (defaults to the route's).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Port of the parent.
    #[serde(default)]
    pub port: Option<Port>,
}

/// `backendRefs[i]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendRef {
    /// `""` (core) only: backends are Services.
    #[serde(default)]
    pub group: Option<String>,
    /// `Service` only.
    #[serde(default)]
    pub kind: Option<String>,
    /// Service name.
    pub name: String,
    /// Namespace (defaults to the route's).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Service port.
    pub port: Port,
    /// Relative weight, 0 to 1,000,000 (default 1).
    #[serde(default = "one")]
    pub weight: u32,
    /// Filters applied when this backend is picked.
    #[serde(default)]
    pub filters: Vec<HttpFilter>,
}

fn one() -> u32 {
    1
}

/// Path match type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatchType {
    /// Whole path.
    Exact,
    /// Path prefix on `/` boundaries.
    #[default]
    PathPrefix,
    /// Regular expression.
    RegularExpression,
}

/// Header, query or method-name match type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum StringMatchType {
    /// Exact value.
    #[default]
    Exact,
    /// Regular expression.
    RegularExpression,
}

/// `matches[i].path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    /// Match type (default PathPrefix).
    #[serde(default, rename = "type")]
    pub kind: PathMatchType,
    /// Value (default `/`).
    #[serde(default = "slash")]
    pub value: String,
}

fn slash() -> String {
    "/".into()
}

/// A header or query parameter match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    /// Match type (default Exact).
    #[serde(default, rename = "type")]
    pub kind: StringMatchType,
    /// Header or parameter name.
    pub name: String,
    /// Value or expression.
    pub value: String,
}

/// `rules[i].matches[j]`: every present part must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteMatch {
    /// Path.
    #[serde(default)]
    pub path: Option<PathMatch>,
    /// Headers.
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    /// Query parameters.
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    /// Method.
    #[serde(default)]
    pub method: Option<String>,
}

/// Header modifier.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderModifier {
    /// Replace or add.
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    /// Append.
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    /// Remove by name.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValue {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// Path rewrite in redirects and URL rewrites.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum PathModifier {
    /// Replace the whole path.
    ReplaceFullPath {
        /// New path.
        #[serde(rename = "replaceFullPath")]
        replace_full_path: String,
    },
    /// Replace the matched prefix.
    ReplacePrefixMatch {
        /// New prefix.
        #[serde(rename = "replacePrefixMatch")]
        replace_prefix_match: String,
    },
}

/// `RequestRedirect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestRedirect {
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: Option<String>,
    /// New host.
    #[serde(default)]
    pub hostname: Option<String>,
    /// New path.
    #[serde(default)]
    pub path: Option<PathModifier>,
    /// New port.
    #[serde(default)]
    pub port: Option<Port>,
    /// 301 or 302 (default 302).
    #[serde(default = "found")]
    pub status_code: u16,
}

fn found() -> u16 {
    302
}

/// `URLRewrite`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UrlRewrite {
    /// New host.
    #[serde(default)]
    pub hostname: Option<String>,
    /// New path.
    #[serde(default)]
    pub path: Option<PathModifier>,
}

/// `RequestMirror`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestMirror {
    /// Where copies go.
    pub backend_ref: MirrorBackend,
    /// Share of requests copied, 0-100 (default 100).
    #[serde(default = "hundred")]
    pub percent: u32,
}

fn hundred() -> u32 {
    100
}

/// A mirror target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorBackend {
    /// Service name.
    pub name: String,
    /// Namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Port.
    pub port: Port,
}

/// `filters[i]`: the Gateway API's tagged filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum HttpFilter {
    /// Modify request headers.
    RequestHeaderModifier {
        /// The change.
        #[serde(rename = "requestHeaderModifier")]
        request_header_modifier: HeaderModifier,
    },
    /// Modify response headers.
    ResponseHeaderModifier {
        /// The change.
        #[serde(rename = "responseHeaderModifier")]
        response_header_modifier: HeaderModifier,
    },
    /// Answer with a redirect.
    RequestRedirect {
        /// The redirect.
        #[serde(rename = "requestRedirect")]
        request_redirect: RequestRedirect,
    },
    /// Rewrite host or path.
    #[serde(rename = "URLRewrite")]
    UrlRewrite {
        /// The rewrite.
        #[serde(rename = "urlRewrite")]
        url_rewrite: UrlRewrite,
    },
    /// Copy requests to another backend.
    RequestMirror {
        /// The mirror.
        #[serde(rename = "requestMirror")]
        request_mirror: RequestMirror,
    },
    /// Sinew extension: delay or abort a share of requests (Istio's fault injection).
    FaultInjection {
        /// The faults.
        #[serde(rename = "faultInjection")]
        fault_injection: FaultInjection,
    },
    /// Sinew extension: a token bucket per waypoint for the rule's requests; over the limit,
    /// 429 with rate-limit headers.
    LocalRateLimit {
        /// The bucket.
        #[serde(rename = "localRateLimit")]
        local_rate_limit: LocalRateLimit,
    },
}

/// `faultInjection`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultInjection {
    /// Delay a share of requests.
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    /// Answer a share of requests with an error status.
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

/// `faultInjection.delay`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelay {
    /// How long.
    pub fixed_delay: Duration,
    /// Share of requests, 0-100.
    pub percentage: u32,
}

/// `faultInjection.abort`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbort {
    /// The status answered (400-599).
    pub http_status: u16,
    /// Share of requests, 0-100.
    pub percentage: u32,
}

/// `localRateLimit`: `maxTokens` in the bucket, `tokensPerFill` added every `fillInterval`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalRateLimit {
    /// Bucket size (the burst).
    pub max_tokens: u32,
    /// Tokens added per fill.
    pub tokens_per_fill: u32,
    /// Fill period.
    pub fill_interval: Duration,
}

/// `rules[i].timeouts`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Timeouts {
    /// The whole request, retries and the response body included (0s: none).
    #[serde(default)]
    pub request: Option<Duration>,
    /// Each try, to the end of its response (0s: none).
    #[serde(default)]
    pub backend_request: Option<Duration>,
}

/// `rules[i].retry` (Gateway API's experimental shape).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// HTTP status codes (5xx, or 4xx like 429) that are retried.
    #[serde(default)]
    pub codes: Vec<u16>,
    /// Retries after the first try.
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Base backoff between tries (jittered, doubling).
    #[serde(default)]
    pub backoff: Option<Duration>,
}

/// `HTTPRoute.spec.rules[i]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteRule {
    /// Any match selects the rule; none: everything.
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    /// Filters.
    #[serde(default)]
    pub filters: Vec<HttpFilter>,
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    /// Retries.
    #[serde(default)]
    pub retry: Option<Retry>,
}

/// `HTTPRoute.spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    /// Services the route attaches to.
    pub parent_refs: Vec<ParentRef>,
    /// Host names it applies to.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules.
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

/// gRPC method match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcMethodMatch {
    /// Exact (default) or RegularExpression.
    #[serde(default, rename = "type")]
    pub kind: StringMatchType,
    /// Fully qualified service, such as `shop.Cart`.
    #[serde(default)]
    pub service: Option<String>,
    /// Method name.
    #[serde(default)]
    pub method: Option<String>,
}

/// `GRPCRoute.spec.rules[i].matches[j]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcRouteMatch {
    /// Method.
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    /// Metadata (headers).
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
}

/// `GRPCRoute.spec.rules[i]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteRule {
    /// Any match selects the rule.
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    /// Filters (header modifiers and mirrors).
    #[serde(default)]
    pub filters: Vec<HttpFilter>,
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

/// `GRPCRoute.spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    /// Services the route attaches to.
    pub parent_refs: Vec<ParentRef>,
    /// Host names.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules.
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

fn regex_ok(e: &mut Errors, field: &str, re: &str) {
    if let Err(err) = regex::Regex::new(re) {
        e.add(field, format!("invalid regular expression: {err}"));
    }
}

fn validate_value_matches(e: &mut Errors, field: &str, list: &[ValueMatch], headers: bool) {
    e.each(field, list, |e, m| {
        let name_ok = !m.name.is_empty()
            && m.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && (!headers || !m.name.starts_with(':'));
        e.check(name_ok, "name", || format!("{:?} is not a valid name", m.name));
        if m.kind == StringMatchType::RegularExpression {
            regex_ok(e, "value", &m.value);
        }
    });
}

fn validate_refs(e: &mut Errors, parents: &[ParentRef], backends: &[&[BackendRef]]) {
    e.check(!parents.is_empty(), "parentRefs", || "a route needs at least one parent".into());
    e.each("parentRefs", parents, |e, p| {
        dns_label(e, "name", &p.name);
        let kind = p.kind.as_deref().unwrap_or("Service");
        e.check(matches!(kind, "Service" | "Gateway"), "kind", || {
            format!("{kind:?}: only Service or Gateway")
        });
    });
    for (i, list) in backends.iter().enumerate() {
        e.at(format!("rules[{i}]"), |e| {
            e.each("backendRefs", list, |e, b| {
                dns_label(e, "name", &b.name);
                e.check(b.weight <= 1_000_000, "weight", || {
                    format!("{} is out of range 0-1000000", b.weight)
                });
                let kind = b.kind.as_deref().unwrap_or("Service");
                e.check(kind == "Service", "kind", || {
                    format!("{kind:?}: backends must be Services")
                });
                let group = b.group.as_deref().unwrap_or("");
                e.check(matches!(group, "" | "core"), "group", || {
                    format!("{group:?}: backends must be Services of the core group (\"\")")
                });
                validate_filters(e, &b.filters);
                // The waypoint applies these per backend; the rest only per rule.
                e.each("filters", &b.filters, |e, f| {
                    e.check(
                        matches!(
                            f,
                            HttpFilter::RequestHeaderModifier { .. }
                                | HttpFilter::ResponseHeaderModifier { .. }
                                | HttpFilter::RequestMirror { .. }
                        ),
                        "type",
                        || {
                            "on a backendRef only RequestHeaderModifier, ResponseHeaderModifier \
                             and RequestMirror are supported; put it on the rule"
                                .into()
                        },
                    );
                });
            });
        });
    }
}

/// An HTTP field name (RFC 9110 token), not a pseudo-header.
fn header_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// An HTTP field value: visible ASCII, spaces and tabs (no CR, LF or NUL).
fn header_value_ok(value: &str) -> bool {
    value.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

/// Filters per rule or per backendRef, Gateway API's `maxItems`.
const MAX_FILTERS: usize = 16;

/// Entries per list of a header modifier (`set`, `add`, `remove`), Gateway API's `maxItems`.
const MAX_HEADER_MODIFIER_ENTRIES: usize = 16;

/// Header modifier entries the waypoint could not apply are refused here: skipped at run
/// time they would fail silently (a `remove` of a sensitive header doing nothing).
fn validate_header_modifier(e: &mut Errors, field: &str, m: &HeaderModifier) {
    e.at(field, |e| {
        // Gateway API's own bound: a request's header map has room for a few thousand
        // names at most, and a route that would overflow it could not be served.
        for (list, n) in [("set", m.set.len()), ("add", m.add.len()), ("remove", m.remove.len())] {
            e.check(n <= MAX_HEADER_MODIFIER_ENTRIES, list, || {
                format!("{n} entries: at most {MAX_HEADER_MODIFIER_ENTRIES}, as in Gateway API")
            });
        }
        for (list, values) in [("set", &m.set), ("add", &m.add)] {
            e.each(list, values, |e, h| {
                e.check(header_name_ok(&h.name), "name", || {
                    format!("{:?} is not a header name", h.name)
                });
                e.check(header_value_ok(&h.value), "value", || {
                    format!("{:?} is not a header value (visible ASCII only)", h.value)
                });
            });
        }
        e.each("remove", &m.remove, |e, name| {
            e.check(header_name_ok(name), "", || format!("{name:?} is not a header name"));
        });
    });
}

fn validate_path_modifier(e: &mut Errors, field: &str, p: &PathModifier) {
    let (which, value) = match p {
        PathModifier::ReplaceFullPath { replace_full_path: v } => ("replaceFullPath", v),
        PathModifier::ReplacePrefixMatch { replace_prefix_match: v } => ("replacePrefixMatch", v),
    };
    // Empty is Gateway API's "remove the prefix" (`/foo/bar` with prefix `/foo` becomes
    // `/bar`), or a full path of `/`.
    let ok = value.is_empty() || (value.starts_with('/') && header_value_ok(value));
    e.check(ok, &format!("{field}.{which}"), || {
        format!("{value:?} must be empty or a path starting with /")
    });
}

fn validate_hostname(e: &mut Errors, field: &str, h: &Option<String>) {
    if let Some(h) = h {
        e.check(is_dns_subdomain(h), field, || format!("{h:?} is not a host name"));
    }
}

fn validate_filters(e: &mut Errors, filters: &[HttpFilter]) {
    // Gateway API's bound, as on each header modifier's lists: together they keep what a
    // route may add to a request well inside what a header map holds.
    e.check(filters.len() <= MAX_FILTERS, "filters", || {
        format!("{} filters: at most {MAX_FILTERS}, as in Gateway API", filters.len())
    });
    e.each("filters", filters, |e, f| match f {
        HttpFilter::RequestHeaderModifier { request_header_modifier: m } => {
            validate_header_modifier(e, "requestHeaderModifier", m);
        }
        HttpFilter::ResponseHeaderModifier { response_header_modifier: m } => {
            validate_header_modifier(e, "responseHeaderModifier", m);
        }
        HttpFilter::UrlRewrite { url_rewrite: u } => {
            validate_hostname(e, "urlRewrite.hostname", &u.hostname);
            if let Some(p) = &u.path {
                validate_path_modifier(e, "urlRewrite.path", p);
            }
        }
        HttpFilter::RequestRedirect { request_redirect: r } => {
            e.check(
                matches!(r.status_code, 301 | 302 | 303 | 307 | 308),
                "requestRedirect.statusCode",
                || format!("{} must be 301, 302, 303, 307 or 308", r.status_code),
            );
            if let Some(s) = &r.scheme {
                e.check(matches!(s.as_str(), "http" | "https"), "requestRedirect.scheme", || {
                    format!("{s:?} must be http or https")
                });
            }
            validate_hostname(e, "requestRedirect.hostname", &r.hostname);
            if let Some(p) = &r.path {
                validate_path_modifier(e, "requestRedirect.path", p);
            }
        }
        HttpFilter::RequestMirror { request_mirror: m } => {
            e.check(m.percent <= 100, "requestMirror.percent", || {
                format!("{} is out of range 0-100", m.percent)
            });
            dns_label(e, "requestMirror.backendRef.name", &m.backend_ref.name);
        }
        HttpFilter::FaultInjection { fault_injection: f } => {
            e.check(f.delay.is_some() || f.abort.is_some(), "faultInjection", || {
                "needs a delay or an abort".into()
            });
            if let Some(d) = &f.delay {
                e.check(d.percentage <= 100, "faultInjection.delay.percentage", || {
                    format!("{} is out of range 0-100", d.percentage)
                });
            }
            if let Some(a) = &f.abort {
                e.check(a.percentage <= 100, "faultInjection.abort.percentage", || {
                    format!("{} is out of range 0-100", a.percentage)
                });
                e.check(
                    (400..=599).contains(&a.http_status),
                    "faultInjection.abort.httpStatus",
                    || format!("{} is not an error status (400-599)", a.http_status),
                );
            }
        }
        HttpFilter::LocalRateLimit { local_rate_limit: l } => {
            e.check(l.max_tokens > 0, "localRateLimit.maxTokens", || "must be at least 1".into());
            e.check(l.tokens_per_fill > 0, "localRateLimit.tokensPerFill", || {
                "must be at least 1".into()
            });
            e.check(!l.fill_interval.0.is_zero(), "localRateLimit.fillInterval", || {
                "must be longer than 0".into()
            });
        }
    });
}

impl Validate for HttpRouteSpec {
    fn validate(&self, e: &mut Errors) {
        e.each("hostnames", &self.hostnames, |e, h| {
            e.check(is_dns_subdomain(h.trim_start_matches("*.")), "", || {
                format!("{h:?} is not a host name")
            })
        });
        e.each("rules", &self.rules, |e, r| {
            e.each("matches", &r.matches, |e, m| {
                if let Some(p) = &m.path {
                    match p.kind {
                        PathMatchType::RegularExpression => regex_ok(e, "path.value", &p.value),
                        _ => e.check(p.value.starts_with('/'), "path.value", || {
                            format!("{:?} must start with /", p.value)
                        }),
                    }
                }
                validate_value_matches(e, "headers", &m.headers, true);
                validate_value_matches(e, "queryParams", &m.query_params, false);
                if let Some(method) = &m.method {
                    e.check(
                        [
                            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                            "PATCH",
                        ]
                        .contains(&method.as_str()),
                        "method",
                        || format!("{method:?} is not an HTTP method"),
                    );
                }
            });
            validate_filters(e, &r.filters);
            // Gateway API: ReplacePrefixMatch only with PathPrefix matches (there is no prefix
            // to replace otherwise), and a redirect answers, so a rewrite beside it means nothing.
            let prefix_modifier = |p: &Option<PathModifier>| {
                matches!(p, Some(PathModifier::ReplacePrefixMatch { .. }))
            };
            let replaces_prefix = r.filters.iter().any(|f| match f {
                HttpFilter::UrlRewrite { url_rewrite: u } => prefix_modifier(&u.path),
                HttpFilter::RequestRedirect { request_redirect: r } => prefix_modifier(&r.path),
                _ => false,
            });
            e.check(
                !replaces_prefix
                    || r.matches.iter().all(|m| {
                        m.path.as_ref().is_none_or(|p| p.kind == PathMatchType::PathPrefix)
                    }),
                "filters",
                || "replacePrefixMatch needs every match of the rule to be a PathPrefix".into(),
            );
            let has = |f: fn(&HttpFilter) -> bool| r.filters.iter().any(f);
            e.check(
                !(has(|f| matches!(f, HttpFilter::RequestRedirect { .. }))
                    && has(|f| matches!(f, HttpFilter::UrlRewrite { .. }))),
                "filters",
                || "requestRedirect and urlRewrite cannot be on the same rule".into(),
            );
            if let Some(t) = &r.timeouts
                && let (Some(req), Some(per_try)) = (t.request, t.backend_request)
                && !req.0.is_zero()
            {
                // 0s turns a timeout off (Gateway API), so it bounds nothing.
                e.check(per_try <= req, "timeouts.backendRequest", || {
                    "must not exceed timeouts.request".into()
                });
            }
            if let Some(retry) = &r.retry {
                e.each("retry.codes", &retry.codes, |e, c| {
                    e.check((400..600).contains(c), "", || format!("{c} is not a 4xx or 5xx code"))
                });
                e.check(retry.attempts.is_none_or(|a| a <= 10), "retry.attempts", || {
                    "at most 10".into()
                });
            }
        });
        let backends: Vec<&[BackendRef]> =
            self.rules.iter().map(|r| r.backend_refs.as_slice()).collect();
        validate_refs(e, &self.parent_refs, &backends);
    }
}

impl Validate for GrpcRouteSpec {
    fn validate(&self, e: &mut Errors) {
        e.each("rules", &self.rules, |e, r| {
            e.each("matches", &r.matches, |e, m| {
                if let Some(method) = &m.method {
                    e.check(method.service.is_some() || method.method.is_some(), "method", || {
                        "needs service or method".into()
                    });
                    if method.kind == StringMatchType::RegularExpression {
                        for v in method.service.iter().chain(&method.method) {
                            regex_ok(e, "method", v);
                        }
                    }
                }
                validate_value_matches(e, "headers", &m.headers, true);
            });
            validate_filters(e, &r.filters);
            // Paths are gRPC methods: Gateway API's GRPCRoute has no redirect or rewrite.
            e.each("filters", &r.filters, |e, f| {
                let kind = match f {
                    HttpFilter::UrlRewrite { .. } => Some("urlRewrite"),
                    HttpFilter::RequestRedirect { .. } => Some("requestRedirect"),
                    _ => None,
                };
                e.check(kind.is_none(), kind.unwrap_or_default(), || {
                    "not a GRPCRoute filter".into()
                });
            });
        });
        let backends: Vec<&[BackendRef]> =
            self.rules.iter().map(|r| r.backend_refs.as_slice()).collect();
        validate_refs(e, &self.parent_refs, &backends);
    }
}

// ---- DestinationPolicy ----

/// Load-balancing algorithm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LbAlgorithm {
    /// Power of two choices over EWMA latency (the default). Istio's deprecated `LEAST_CONN`
    /// and its `UNSPECIFIED` (the default there too) read as this.
    #[default]
    #[serde(alias = "LEAST_CONN", alias = "UNSPECIFIED")]
    LeastRequest,
    /// Round robin.
    RoundRobin,
    /// Random.
    Random,
}

/// The cookie consistent hashing reads (Istio's `httpCookie`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "HttpCookieForm", into = "HttpCookieForm", rename_all = "camelCase")]
pub struct HttpCookie {
    /// Cookie name.
    pub name: String,
    /// `Path` of a generated cookie (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Generate the cookie, with this `Max-Age`, when a request lacks it; `0s`: a session
    /// cookie. Absent: never generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
}

/// `httpCookie` as written: a bare name (Sinew's first form) or Istio's object; written back
/// as a bare name when it is only one, so clients of an older release still read it.
#[derive(Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum HttpCookieForm {
    Name(String),
    Full(HttpCookieObject),
}

/// Istio's `httpCookie` object (its `attributes` are not supported: refused, not ignored).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpCookieObject {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ttl: Option<Duration>,
}

impl From<HttpCookieForm> for HttpCookie {
    fn from(f: HttpCookieForm) -> Self {
        match f {
            HttpCookieForm::Name(name) => Self { name, path: None, ttl: None },
            HttpCookieForm::Full(HttpCookieObject { name, path, ttl }) => Self { name, path, ttl },
        }
    }
}

impl From<HttpCookie> for HttpCookieForm {
    fn from(c: HttpCookie) -> Self {
        match (c.path, c.ttl) {
            (None, None) => Self::Name(c.name),
            (path, ttl) => Self::Full(HttpCookieObject { name: c.name, path, ttl }),
        }
    }
}

impl From<&str> for HttpCookie {
    fn from(name: &str) -> Self {
        Self { name: name.into(), path: None, ttl: None }
    }
}

/// Consistent hashing key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConsistentHash {
    /// Hash this request header.
    #[serde(default)]
    pub http_header_name: Option<String>,
    /// Hash this cookie: its name, or Istio's `{name, path, ttl}` (with a `ttl`, a client
    /// without the cookie gets one, so its next requests stick to the same endpoint).
    #[serde(default)]
    pub http_cookie: Option<HttpCookie>,
    /// Hash the source address.
    #[serde(default)]
    pub use_source_ip: bool,
}

/// `loadBalancer`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancer {
    /// Algorithm (default `LEAST_REQUEST`); exclusive with `consistentHash`, as in Istio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simple: Option<LbAlgorithm>,
    /// Consistent hashing instead.
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHash>,
}

/// `connectionPool`: circuit-breaking limits per destination.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPool {
    /// Connections open at once.
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection.
    #[serde(default)]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight.
    #[serde(default)]
    pub max_requests: Option<u32>,
    /// Connect timeout.
    #[serde(default)]
    pub connect_timeout: Option<Duration>,
}

/// `outlierDetection`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx (connect failures, resets and timeouts count as 503) before ejection
    /// (default 5; 0 turns this count off). Istio's name.
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    /// Consecutive gateway errors, 502, 503 and 504 (and connect failures, resets and
    /// timeouts) only, before ejection (default off): an application's own 500s do not count.
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    /// Sinew's earlier name for `consecutive5xxErrors`, which wins when both are given.
    #[serde(default)]
    pub consecutive_errors: Option<u32>,
    /// How often ejections are evaluated (Envoy's sweep). Accepted, not used: an endpoint is
    /// ejected at its failure in a row and comes back when its time is up, not at a sweep.
    #[serde(default)]
    pub interval: Option<Duration>,
    /// First ejection time, multiplied by the number of ejections.
    #[serde(default)]
    pub base_ejection_time: Option<Duration>,
    /// Cap on the ejected share of endpoints, 0-100 (default 10).
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
}

/// `DestinationPolicy.spec`: how clients treat a service's endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationPolicySpec {
    /// The Service (in the policy's namespace).
    pub service: String,
    /// Load balancing.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
    /// Limits.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPool>,
    /// Ejection of failing endpoints.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
}

impl Validate for DestinationPolicySpec {
    fn validate(&self, e: &mut Errors) {
        dns_label(e, "service", &self.service);
        if let Some(lb) = &self.load_balancer {
            e.at("loadBalancer", |e| validate_load_balancer(e, lb));
        }
        if let Some(p) = &self.connection_pool {
            for (field, v) in [
                ("maxConnections", p.max_connections),
                ("maxPendingRequests", p.max_pending_requests),
                ("maxRequests", p.max_requests),
            ] {
                e.check(v != Some(0), &format!("connectionPool.{field}"), || {
                    "must be at least 1".into()
                });
            }
        }
        if let Some(o) = &self.outlier_detection {
            e.at("outlierDetection", |e| validate_outlier_detection(e, o));
        }
    }
}

/// `loadBalancer`, of a DestinationPolicy or a DestinationRule.
fn validate_load_balancer(e: &mut Errors, lb: &LoadBalancer) {
    let Some(h) = &lb.consistent_hash else { return };
    // Istio's two forms of `lbPolicy`: taking one and dropping the other would be a guess.
    // The default is let through: earlier releases wrote `simple: LEAST_REQUEST` beside every
    // `consistentHash` (in control's messages and the saved and cached configurations).
    e.check(lb.simple.is_none_or(|s| s == LbAlgorithm::LeastRequest), "simple", || {
        "simple and consistentHash are exclusive".into()
    });
    let keys =
        h.http_header_name.is_some() as u8 + h.http_cookie.is_some() as u8 + h.use_source_ip as u8;
    e.check(keys == 1, "consistentHash", || {
        "exactly one of httpHeaderName, httpCookie, useSourceIp".into()
    });
    if let Some(c) = &h.http_cookie {
        let token = |s: &str| {
            !s.is_empty()
                && s.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
        };
        e.check(token(&c.name), "consistentHash.httpCookie.name", || {
            format!("{:?} is not a cookie name", c.name)
        });
        if let Some(p) = &c.path {
            let ok = p.starts_with('/') && p.bytes().all(|b| b.is_ascii_graphic() && b != b';');
            e.check(ok, "consistentHash.httpCookie.path", || format!("{p:?} is not a cookie path"));
        }
    }
}

/// `outlierDetection`, of a DestinationPolicy or a DestinationRule.
fn validate_outlier_detection(e: &mut Errors, o: &OutlierDetection) {
    e.check(o.max_ejection_percent.is_none_or(|p| p <= 100), "maxEjectionPercent", || {
        format!("{} is out of range 0-100", o.max_ejection_percent.unwrap_or_default())
    });
    e.check(o.consecutive_errors != Some(0), "consecutiveErrors", || {
        "must be at least 1 (consecutive5xxErrors: 0 turns the 5xx count off)".into()
    });
    e.check(
        o.base_ejection_time.is_none_or(|d| d.0 >= std::time::Duration::from_millis(1)),
        "baseEjectionTime",
        || "must be at least 1ms".into(),
    );
}

// ---- DestinationRule (Istio, networking.istio.io) ----

/// Istio's `DestinationRule.spec`, the part a waypoint applies: the `trafficPolicy` of one
/// Service of the mesh, read as a [`DestinationPolicySpec`]. What Sinew does not apply
/// (`subsets`, `tls`, `portLevelSettings`, `workloadSelector`, HTTP pool settings other than
/// the two limits) is refused by name rather than ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// The Service: `name` (of the rule's namespace) or `name.namespace.svc.cluster.local`
    /// as in Istio, or `name.namespace` and `name.namespace.svc` (Kubernetes DNS's shorter
    /// forms); other domains are not Services of the mesh.
    pub host: String,
    /// What applies to its traffic.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Where the rule is visible; only `*` (everywhere, Istio's default) is supported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
}

/// `trafficPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// Load balancing (the same fields as a DestinationPolicy's).
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
    /// Istio's connection pool, by protocol.
    #[serde(default)]
    pub connection_pool: Option<IstioConnectionPool>,
    /// Ejection of failing endpoints (the same fields as a DestinationPolicy's).
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
}

/// Istio's `connectionPool`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IstioConnectionPool {
    /// `tcp`.
    #[serde(default)]
    pub tcp: Option<IstioTcpPool>,
    /// `http`.
    #[serde(default)]
    pub http: Option<IstioHttpPool>,
}

/// Istio's `connectionPool.tcp`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IstioTcpPool {
    /// Connections open at once to the service.
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Connect timeout.
    #[serde(default)]
    pub connect_timeout: Option<Duration>,
}

/// Istio's `connectionPool.http`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IstioHttpPool {
    /// Requests waiting for a connection.
    #[serde(default, rename = "http1MaxPendingRequests")]
    pub http1_max_pending_requests: Option<u32>,
    /// Requests in flight.
    #[serde(default, rename = "http2MaxRequests")]
    pub http2_max_requests: Option<u32>,
}

impl DestinationRuleSpec {
    /// The Service `host` names, for a rule of `namespace`: (namespace, name); `None` for a
    /// host outside the mesh's Services (another domain, a wildcard).
    pub fn service(&self, namespace: &str) -> Option<(String, String)> {
        let parts: Vec<&str> = self.host.split('.').collect();
        let (name, ns) = match parts.as_slice() {
            [name] => (*name, namespace),
            [name, ns] | [name, ns, "svc"] | [name, ns, "svc", "cluster", "local"] => (*name, *ns),
            _ => return None,
        };
        (is_dns_label(name) && is_dns_label(ns)).then(|| (ns.to_owned(), name.to_owned()))
    }

    /// The rule as a [`DestinationPolicySpec`] of its Service's namespace: (namespace,
    /// policy); `None` when `host` is no Service of the mesh.
    pub fn policy(&self, namespace: &str) -> Option<(String, DestinationPolicySpec)> {
        let (ns, service) = self.service(namespace)?;
        let t = self.traffic_policy.clone().unwrap_or_default();
        let pool = t.connection_pool.map(|p| {
            let (tcp, http) = (p.tcp.unwrap_or_default(), p.http.unwrap_or_default());
            ConnectionPool {
                max_connections: tcp.max_connections,
                max_pending_requests: http.http1_max_pending_requests,
                max_requests: http.http2_max_requests,
                connect_timeout: tcp.connect_timeout,
            }
        });
        // Istio's deprecated `consecutiveErrors` counts gateway errors (502, 503, 504) and turns
        // the 5xx count off; in a DestinationPolicy the same name is Sinew's earlier name for
        // the 5xx count.
        let outlier = t.outlier_detection.map(|mut o| {
            if let Some(n) = o.consecutive_errors.take() {
                o.consecutive_gateway_errors = o.consecutive_gateway_errors.or(Some(n));
                o.consecutive_5xx_errors = o.consecutive_5xx_errors.or(Some(0));
            }
            o
        });
        let policy = DestinationPolicySpec {
            service,
            load_balancer: t.load_balancer,
            connection_pool: pool,
            outlier_detection: outlier,
        };
        Some((ns, policy))
    }
}

/// The DestinationPolicy of each Service (`<namespace>/<name>`) that `resources` configure,
/// and why some were left out. A DestinationPolicy wins; else a DestinationRule of the
/// Service's namespace, else one of the root namespace, the oldest first (by
/// `creationTimestamp`, then name), as Istio picks among rules. A rule of another namespace
/// is for clients there (Istio's lookup starts at the client's namespace), never a waypoint's:
/// it is left out.
pub fn destination_policies<'a>(
    resources: impl IntoIterator<Item = &'a crate::Resource>,
) -> (std::collections::HashMap<String, DestinationPolicySpec>, Vec<String>) {
    let mut out = std::collections::HashMap::new();
    let mut rules = Vec::new();
    for r in resources {
        match r {
            crate::Resource::DestinationPolicy(o) => {
                let ns = o.metadata.namespace.as_deref().unwrap_or_default();
                out.insert(format!("{ns}/{}", o.spec.service), o.spec.clone());
            }
            crate::Resource::DestinationRule(o) => rules.push(o),
            _ => {}
        }
    }
    let mut problems = Vec::new();
    let mut candidates = Vec::new();
    for o in rules {
        let rule_ns = o.metadata.namespace.as_deref().unwrap_or_default();
        let rule = format!("DestinationRule {rule_ns}/{}", o.metadata.name);
        let Some((ns, policy)) = o.spec.policy(rule_ns) else { continue };
        let key = format!("{ns}/{}", policy.service);
        let rank = match rule_ns {
            n if n == ns => 0,
            crate::ROOT_NAMESPACE => 1,
            _ => {
                problems.push(format!(
                    "{rule} is not applied: it is for clients of namespace {rule_ns}, and \
                     Service {key} is served by its waypoint (put it in namespace {ns})"
                ));
                continue;
            }
        };
        let created = o.metadata.creation_timestamp.clone();
        let age = (rank, created.is_none(), created, o.metadata.name.clone());
        candidates.push((key, age, rule, policy));
    }
    candidates.sort_by(|a, b| a.1.cmp(&b.1));
    for (key, _, rule, policy) in candidates {
        if out.contains_key(&key) {
            problems.push(format!(
                "{rule} is not applied: a DestinationPolicy or an earlier DestinationRule \
                 already configures Service {key}"
            ));
            continue;
        }
        out.insert(key, policy);
    }
    (out, problems)
}

impl Validate for DestinationRuleSpec {
    fn validate(&self, e: &mut Errors) {
        e.check(self.service("default").is_some(), "host", || {
            format!(
                "{:?} is not a Service of the mesh (name, name.namespace, name.namespace.svc \
                 or name.namespace.svc.cluster.local)",
                self.host
            )
        });
        e.each("exportTo", &self.export_to, |e, x| {
            e.check(x == "*", "", || format!("{x:?}: only \"*\" (everywhere) is supported"))
        });
        let Some(t) = &self.traffic_policy else { return };
        e.at("trafficPolicy", |e| {
            if let Some(lb) = &t.load_balancer {
                e.at("loadBalancer", |e| validate_load_balancer(e, lb));
            }
            if let Some(p) = &t.connection_pool {
                let tcp = p.tcp.as_ref();
                let http = p.http.as_ref();
                for (field, v) in [
                    ("connectionPool.tcp.maxConnections", tcp.and_then(|t| t.max_connections)),
                    (
                        "connectionPool.http.http1MaxPendingRequests",
                        http.and_then(|h| h.http1_max_pending_requests),
                    ),
                    (
                        "connectionPool.http.http2MaxRequests",
                        http.and_then(|h| h.http2_max_requests),
                    ),
                ] {
                    e.check(v != Some(0), field, || "must be at least 1".into());
                }
            }
            if let Some(o) = &t.outlier_detection {
                e.at("outlierDetection", |e| validate_outlier_detection(e, o));
            }
        });
    }
}

/// Namespace helpers.
pub trait Namespace {
    /// True when the namespace carries `sinew.io/dataplane-mode=ambient`.
    fn is_ambient(&self) -> bool;
}
