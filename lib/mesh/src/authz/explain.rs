//! The tracer behind `Authz::explain`, `Authz::explain_http` and `Authz::explain_tcp`: turns
//! what the evaluation went through into words.

use std::{borrow::Cow, fmt::Display};

use sinew_model::Action;

use super::{
    HttpRequest, PolicyTrace, Source, Target,
    rules::{Field, Miss, Policy, Request, Trace},
};

/// Collects the misses of the policy being evaluated, then one [`PolicyTrace`] per policy.
pub(super) struct Explainer<'a> {
    source: Source<'a>,
    port: u16,
    /// What the waypoint serves the connection or request for; `None` at the agents.
    target: Option<Target<'a>>,
    /// The request, at the waypoint; `None` at L4 (the agents, and TCP at the waypoint).
    http: Option<HttpRequest<'a>>,
    misses: Vec<(usize, Miss)>,
    traces: Vec<PolicyTrace>,
}

impl<'a> Explainer<'a> {
    /// For an L4 check.
    pub fn new(source: &Source<'a>, port: u16) -> Self {
        Self {
            source: *source,
            port,
            target: None,
            http: None,
            misses: Vec::new(),
            traces: Vec::new(),
        }
    }

    /// For the waypoint: an HTTP request (the path already without query), or a TCP
    /// connection (`None`).
    pub fn targeted(
        source: &Source<'a>,
        target: &Target<'a>,
        http: Option<&HttpRequest<'a>>,
    ) -> Self {
        Self { target: Some(*target), http: http.copied(), ..Self::new(source, target.port) }
    }

    pub fn finish(self) -> Vec<PolicyTrace> {
        self.traces
    }

    fn describe(&self, policy: &Policy, rule: usize, miss: Miss) -> String {
        let rule = policy.rules.get(rule);
        match miss {
            Miss::L7 => format!(
                "{}: L7 field, not evaluated at L4: an ALLOW rule with it never matches",
                rule.and_then(|r| r.l7.as_deref()).unwrap_or("an L7 field")
            ),
            Miss::From { index, field } => {
                let path = format!("from[{index}].source.{}", field.name());
                let Some(source) = rule.and_then(|r| r.from.get(index)) else {
                    return path;
                };
                let s = &source.spec;
                let list = match field {
                    Field::Principals => &s.principals,
                    Field::NotPrincipals => &s.not_principals,
                    Field::Namespaces => &s.namespaces,
                    Field::NotNamespaces => &s.not_namespaces,
                    Field::ServiceAccounts => &s.service_accounts,
                    Field::NotServiceAccounts => &s.not_service_accounts,
                    Field::IpBlocks => &s.ip_blocks,
                    Field::NotIpBlocks => &s.not_ip_blocks,
                    Field::Ports
                    | Field::NotPorts
                    | Field::Methods
                    | Field::NotMethods
                    | Field::Paths
                    | Field::NotPaths
                    | Field::Hosts
                    | Field::NotHosts => return path,
                };
                match self.source_value(field) {
                    Some(value) => in_list(&path, field, value, list),
                    None => format!("{path}: plaintext source has no identity"),
                }
            }
            Miss::To { index, field } => {
                let path = format!("to[{index}].operation.{}", field.name());
                let Some(op) = rule.and_then(|r| r.to.get(index)) else {
                    return path;
                };
                let http = self.http;
                let (value, list) = match field {
                    Field::Methods => (http.map(|r| Cow::from(r.method)), &op.methods),
                    Field::NotMethods => (http.map(|r| Cow::from(r.method)), &op.not_methods),
                    Field::Paths => (http.map(|r| Cow::from(r.path)), &op.paths),
                    Field::NotPaths => (http.map(|r| Cow::from(r.path)), &op.not_paths),
                    Field::Hosts => (http.map(|r| host_text(r.host)), &op.hosts),
                    Field::NotHosts => (http.map(|r| host_text(r.host)), &op.not_hosts),
                    _ => {
                        let list = if field == Field::NotPorts { &op.not_ports } else { &op.ports };
                        let ports: Vec<u16> = list.iter().map(|p| p.0).collect();
                        return in_list(&path, field, self.port, &ports);
                    }
                };
                match value {
                    Some(value) => in_list(&path, field, value, list),
                    None => path,
                }
            }
            Miss::When { index, negated } => {
                let Some(c) = rule.and_then(|r| r.when.get(index)) else {
                    return format!("when[{index}]");
                };
                let (list, relation) =
                    if negated { (&c.spec.not_values, "in") } else { (&c.spec.values, "not in") };
                let path = format!("when[{index}] {}", c.spec.key);
                let req = Request {
                    identity: self.source.identity,
                    ip: self.source.ip.to_canonical(),
                    port: self.port,
                    http: self.http,
                };
                match c.value(&req) {
                    Some(value) => {
                        let what = if negated { " notValues" } else { "" };
                        format!("{path}: {value} {relation}{what} [{}]", list.join(", "))
                    }
                    None => format!("{path}: no value (no identity, or no such header)"),
                }
            }
        }
    }

    /// What a source field was compared with; `None` for an identity field without identity.
    fn source_value(&self, field: Field) -> Option<String> {
        let id = self.source.identity;
        match field {
            Field::Principals | Field::NotPrincipals => id.map(|id| id.principal()),
            Field::Namespaces | Field::NotNamespaces => id.map(|id| id.namespace.clone()),
            Field::ServiceAccounts | Field::NotServiceAccounts => {
                id.map(|id| format!("{}/{}", id.namespace, id.service_account))
            }
            _ => Some(self.source.ip.to_canonical().to_string()),
        }
    }
}

fn in_list<V: Display, T: Display>(path: &str, field: Field, value: V, list: &[T]) -> String {
    let items: Vec<String> = list.iter().map(ToString::to_string).collect();
    let relation = if field.negated() { "in" } else { "not in" };
    format!("{path}: {value} {relation} [{}]", items.join(", "))
}

fn action_name(action: Action) -> &'static str {
    match action {
        Action::Allow => "ALLOW",
        Action::Deny => "DENY",
        Action::Audit => "AUDIT",
    }
}

impl Trace for Explainer<'_> {
    const ON: bool = true;

    fn miss(&mut self, rule: usize, miss: Miss) {
        self.misses.push((rule, miss));
    }

    fn policy(&mut self, policy: &Policy, matched: Option<usize>) {
        let misses = std::mem::take(&mut self.misses);
        let mut why = Vec::new();
        match matched {
            Some(rule) => {
                why.push(format!("rule {rule} matched"));
                if self.http.is_none()
                    && let Some(l7) = policy.rules.get(rule).and_then(|r| r.l7.as_deref())
                {
                    why.push(format!(
                        "rule {rule}: {l7}: L7 field ignored at L4: a {} rule matches without it \
                         (fail safe)",
                        action_name(policy.action)
                    ));
                }
            }
            None if policy.rules.is_empty() => why.push("no rules: matches nothing".to_owned()),
            None => {
                for (rule, miss) in misses {
                    why.push(format!("rule {rule}: {}", self.describe(policy, rule, miss)));
                }
            }
        }
        self.traces.push(PolicyTrace {
            policy: policy.key.clone(),
            action: policy.action,
            scope: match &self.target {
                Some(target) => policy.targeted_scope(target),
                None => policy.scope,
            },
            matched: matched.is_some(),
            why,
        });
    }
}

/// A host as explanations show it: the bytes as text (any that are not shown as U+FFFD),
/// `(none)` for a request without one.
fn host_text(host: &[u8]) -> Cow<'_, str> {
    if host.is_empty() { Cow::Borrowed("(none)") } else { String::from_utf8_lossy(host) }
}
