//! Authorization: AuthorizationPolicy and PeerAuthentication compiled for per-connection
//! checks by the node agents (as ztunnel applies them at L4) and per-request checks by the
//! waypoint (as Istio ambient's waypoints apply them at L7).
//!
//! Who enforces what, as in Istio ambient: a policy with `targetRefs` is attached to a Service
//! or a waypoint (a `Gateway`) and is enforced by the waypoint only ([`Authz::check_http`],
//! [`Authz::check_tcp`]);
//! every other policy (with a `selector`, or neither) is enforced by the node agents only
//! ([`Authz::check`]). The rule semantics below are the same for both; only the L7 fields
//! differ, as described there.
//!
//! Scope at L4: a policy in [`ROOT_NAMESPACE`] without selector applies mesh-wide; one in another
//! namespace without selector applies to that namespace; one with `selector.matchLabels`
//! applies to the workloads of its namespace whose labels contain every selector label, and in
//! the root namespace to the matching workloads of every namespace. An empty `matchLabels`
//! selects every workload (of its namespace, or of the mesh in the root namespace).
//!
//! Matching: a policy matches when any rule matches; a policy without rules matches nothing
//! (an ALLOW policy without rules therefore allows nothing, a DENY policy without rules denies
//! nothing), while an empty rule (`rules: [{}]`) matches everything. A rule matches when some
//! `from` source and some `to` operation match (an absent `from` or `to` matches everything);
//! within a source or operation every present field must match and every present `not*` field
//! must not; every `when` condition must hold (a value matching one of its `values`, if given,
//! and none of its `notValues`). Fields evaluated at L4: principals, namespaces,
//! serviceAccounts, ipBlocks (source) and ports (destination), with their `not*` forms, and the
//! conditions on `source.ip`, `source.namespace`, `source.principal` and `destination.port`. A
//! source without identity (plaintext) fails the identity fields and passes their `not*`
//! forms; a condition without a value likewise. L7-only fields (methods, paths, hosts, and
//! `request.headers[...]` conditions) cannot be evaluated here: an ALLOW rule with them never
//! matches, DENY and AUDIT rules match as if they were absent (the safe side in both cases).
//!
//! Decision: any DENY match denies; else, with no ALLOW policy applying, the connection is
//! allowed; else an ALLOW match allows and anything else is denied. AUDIT policies never
//! change the verdict; those that match are listed. Policies are evaluated DENY, then ALLOW,
//! then AUDIT; within an action mesh-wide policies first, then namespace ones, then
//! workload-selector ones (root namespace first), each group in `namespace/name` order. The
//! deciding policy is the first match in that order.
//!
//! At L7 ([`Authz::check_http`]): the policies that apply to a request are those of the
//! service's namespace whose `targetRefs` name the Service (kind `Service`) or its waypoint
//! (kind `Gateway`), and those of the root namespace naming the waypoint (or, for a service of
//! the root namespace, the Service). Same decision and order, root-namespace policies first;
//! the L7 fields are evaluated: `methods` / `notMethods` exactly (case-sensitive), `paths` /
//! `notPaths` against the path without its query, with Istio's string match (`*` alone, one
//! leading or trailing `*`, otherwise exact), `hosts` / `notHosts` the same way against the
//! authority as sent but without regard to case (`*` needs one), `request.headers[name]`
//! conditions against the header's values as sent (bytes; several joined with `,`), `ports`
//! against the service port.
//!
//! A plain TCP port behind a waypoint ([`Authz::check_tcp`]) is decided by the same attached
//! policies with the L4 rule semantics: nothing to read `methods` or `paths` from, so an
//! ALLOW rule with them never matches and DENY and AUDIT rules match as if they were absent,
//! as Istio documents for TCP traffic.

mod explain;
mod peer;
mod rules;

/// Why a connection admitted earlier was closed: a policy change no longer admits it (the
/// access logs' `error`, agent and waypoint alike).
pub const CLOSED_BY_POLICY: &str = "closed: the policy in force no longer admits it";

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use crate::{ns_name, sorted};
use serde::Serialize;
use sinew_identity::SpiffeId;
use sinew_model::{
    Action, AuthorizationPolicySpec, MtlsMode, Object, PeerAuthenticationSpec, ROOT_NAMESPACE,
    Resource,
};

use self::{
    explain::Explainer,
    peer::PeerAuth,
    rules::{NoTrace, Policy, Request, Trace},
};

/// The destination of a connection: the workload's namespace and labels, and the port.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    /// The destination workload's namespace.
    pub namespace: &'a str,
    /// The destination workload's labels (what selectors match).
    pub labels: &'a BTreeMap<String, String>,
    /// The destination port.
    pub port: u16,
}

/// An HTTP request as L7 policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    /// The method, such as `GET` (compared exactly, so uppercase as sent).
    pub method: &'a str,
    /// The path, without query (anything from a `?` on is ignored all the same). Compared as
    /// given: normalizing it is the caller's job.
    pub path: &'a str,
    /// The authority as sent (`Host`, or HTTP/2's `:authority`), what `hosts` match: bytes,
    /// as a header value may hold more than text; empty when there is none.
    pub host: &'a [u8],
    /// The request headers, what `when` conditions on `request.headers[...]` read; `None`
    /// reads as a request without any.
    pub headers: Option<&'a http::HeaderMap>,
}

impl<'a> HttpRequest<'a> {
    /// A request with method and path only (no host, no headers), as `sinew explain` asks.
    pub fn new(method: &'a str, path: &'a str) -> Self {
        Self { method, path, host: b"", headers: None }
    }

    /// The same request with anything from a `?` dropped from the path, so that a query can
    /// never make a path miss a DENY rule.
    fn without_query(&self) -> Self {
        let path = self.path.split_once('?').map_or(self.path, |(path, _)| path);
        Self { path, ..*self }
    }
}

/// What the waypoint serves the request for.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The service's namespace.
    pub namespace: &'a str,
    /// The service's name (what `targetRefs` of kind `Service` name).
    pub service: &'a str,
    /// The waypoint's name (what `targetRefs` of kind `Gateway` name); `None` when it has none.
    pub waypoint: Option<&'a str>,
    /// The service port the request came in on (what `ports` and `notPorts` match).
    pub port: u16,
}

/// The source of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// The peer's verified identity; `None` for plaintext.
    pub identity: Option<&'a SpiffeId>,
    /// The peer's address (an IPv4-mapped IPv6 address is treated as IPv4).
    pub ip: IpAddr,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The connection may proceed.
    Allow,
    /// The connection is refused.
    Deny,
}

/// The outcome of an authorization check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Allow or deny.
    pub verdict: Verdict,
    /// `namespace/name` of the deciding policy (the DENY that matched, the ALLOW that
    /// matched); `None` when decided by default.
    pub policy: Option<String>,
    /// One short sentence, such as `denied by DENY policy shop/deny-sleep (rule 0)`.
    pub reason: Cow<'static, str>,
    /// `namespace/name` of every AUDIT policy that matched, in evaluation order.
    pub audited: Vec<String>,
}

impl Decision {
    /// True when the verdict is [`Verdict::Allow`].
    pub fn allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

/// What a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Every workload of the mesh (root namespace, no selector).
    Mesh,
    /// Every workload of the policy's namespace (no selector).
    Namespace,
    /// Workloads whose labels match the selector.
    Workload,
    /// A Service, attached with `targetRefs` (kind `Service`): enforced by its waypoint.
    Service,
    /// Every service of a waypoint, attached with `targetRefs` (kind `Gateway`).
    Gateway,
}

/// How one applicable policy was evaluated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyTrace {
    /// `namespace/name`.
    pub policy: String,
    /// ALLOW, DENY or AUDIT.
    pub action: Action,
    /// Why it applies.
    pub scope: Scope,
    /// Whether one of its rules matched.
    pub matched: bool,
    /// The rule that matched, or for each rule the first field that failed (for each source
    /// or operation when none matched), such as
    /// `rule 0: from[0].source.principals: cluster.local/ns/a/sa/b not in [cluster.local/ns/a/sa/c]`.
    pub why: Vec<String>,
}

/// A decision with the evaluation of every applicable policy, for the admin API and CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The decision, the same [`Authz::check`] returns.
    pub decision: Decision,
    /// One entry per applicable policy, in evaluation order (DENY, ALLOW, AUDIT).
    pub policies: Vec<PolicyTrace>,
    /// The PeerAuthentication mode resolved for the destination (see [`Authz::mtls_mode`]); for
    /// [`Authz::explain_http`] and [`Authz::explain_tcp`], the mode of the service's namespace
    /// (a waypoint has no workload labels for selectors to match).
    pub mtls_mode: MtlsMode,
}

/// Policies of one scope, split by action.
#[derive(Debug, Clone, Default)]
struct Group {
    deny: Vec<Policy>,
    allow: Vec<Policy>,
    audit: Vec<Policy>,
}

impl Group {
    fn of(&self, action: Action) -> &[Policy] {
        match action {
            Action::Deny => &self.deny,
            Action::Allow => &self.allow,
            Action::Audit => &self.audit,
        }
    }

    fn push(&mut self, policy: Policy) {
        match policy.action {
            Action::Deny => self.deny.push(policy),
            Action::Allow => self.allow.push(policy),
            Action::Audit => self.audit.push(policy),
        }
    }
}

/// The policies of one (non-root) namespace.
#[derive(Debug, Clone, Default)]
struct NamespacePolicies {
    /// No selector.
    wide: Group,
    /// With a selector.
    selected: Group,
}

/// Every AuthorizationPolicy and PeerAuthentication, compiled and grouped for look-up.
#[derive(Debug, Clone, Default)]
pub struct Authz {
    /// Root namespace, no selector.
    mesh: Group,
    /// Root namespace, with a selector: matching workloads of every namespace.
    root_selected: Group,
    namespaces: HashMap<String, NamespacePolicies>,
    /// Policies with `targetRefs`, by namespace: enforced at L7 only.
    targeted: HashMap<String, Group>,
    policies: usize,
    peers: PeerAuth,
}

impl Authz {
    /// Compiles the AuthorizationPolicies and PeerAuthentications among `resources` (other
    /// kinds are ignored). With two resources of the same kind, namespace and name, the first
    /// is kept.
    pub fn build<'a>(resources: impl IntoIterator<Item = &'a Resource>) -> Self {
        let (mut policies, mut peers) = (Vec::new(), Vec::new());
        for r in resources {
            match r {
                Resource::AuthorizationPolicy(p) => policies.push(p),
                Resource::PeerAuthentication(p) => peers.push(p),
                _ => {}
            }
        }
        Self::from_objects(policies, peers)
    }

    pub(crate) fn from_objects(
        policies: Vec<&Object<AuthorizationPolicySpec>>,
        peers: Vec<&Object<PeerAuthenticationSpec>>,
    ) -> Self {
        let mut authz = Self { peers: PeerAuth::build(sorted(peers)), ..Self::default() };
        for p in sorted(policies) {
            let (ns, name) = ns_name(p);
            authz.policies += 1;
            if let Some(first) = p.spec.targets().next() {
                // The scope a trace shows is worked out per request or connection
                // (`Policy::targeted_scope`).
                let scope = if first.kind == "Service" { Scope::Service } else { Scope::Gateway };
                let policy = Policy::new(ns, name, scope, &p.spec);
                authz.targeted.entry(ns.to_owned()).or_default().push(policy);
                continue;
            }
            let selected = p.spec.selector.is_some();
            let scope = match (ns == ROOT_NAMESPACE, selected) {
                (true, false) => Scope::Mesh,
                (false, false) => Scope::Namespace,
                (_, true) => Scope::Workload,
            };
            let policy = Policy::new(ns, name, scope, &p.spec);
            let group = match (ns == ROOT_NAMESPACE, selected) {
                (true, false) => &mut authz.mesh,
                (true, true) => &mut authz.root_selected,
                (false, false) => &mut authz.namespaces.entry(ns.to_owned()).or_default().wide,
                (false, true) => &mut authz.namespaces.entry(ns.to_owned()).or_default().selected,
            };
            group.push(policy);
        }
        authz
    }

    /// Whether deciding for a workload of `namespace` needs its labels: some
    /// AuthorizationPolicy (of the namespace, or of the root namespace for every namespace)
    /// or PeerAuthentication (of the namespace) selects workloads by label. A destination
    /// whose labels are unknown (no Workload has its address) cannot be decided then, and
    /// is refused rather than let past the policies that might select it.
    pub fn selects_by_label(&self, namespace: &str) -> bool {
        // `selector: {}` selects every workload: it needs no labels.
        let by_label = |g: &Group| {
            [&g.deny, &g.allow, &g.audit]
                .iter()
                .flat_map(|v| v.iter())
                .any(|p| !p.selector.is_empty())
        };
        by_label(&self.root_selected)
            || self.namespaces.get(namespace).is_some_and(|n| by_label(&n.selected))
            || self.peers.selects_by_label(namespace)
    }

    /// True when there is no AuthorizationPolicy at all: every connection and every request is
    /// allowed. (PeerAuthentications do not count; they do not take part in [`Authz::check`].)
    pub fn is_empty(&self) -> bool {
        self.policies == 0
    }

    /// Decides a connection. Allocates nothing when no policy applies; otherwise only the
    /// deciding policy's name, the reason and the AUDIT list.
    /// Policies with `targetRefs` are not considered: the waypoint enforces them.
    pub fn check(&self, dst: &Destination<'_>, src: &Source<'_>) -> Decision {
        self.decide(dst, src, &mut NoTrace)
    }

    /// Decides a connection like [`Authz::check`] (same evaluation, same decision) and says
    /// how every applicable policy was evaluated.
    pub fn explain(&self, dst: &Destination<'_>, src: &Source<'_>) -> Explanation {
        let mut explainer = Explainer::new(src, dst.port);
        let decision = self.decide(dst, src, &mut explainer);
        Explanation {
            decision,
            policies: explainer.finish(),
            mtls_mode: self.mtls_mode(dst.namespace, dst.labels, dst.port),
        }
    }

    /// Decides an HTTP request at the waypoint, by the policies attached with `targetRefs` to
    /// the target's service or waypoint (see the module docs): same decision order and rule
    /// semantics as [`Authz::check`], with the L7 fields evaluated. Policies with a selector,
    /// or with neither selector nor `targetRefs`, are not considered: the node agents enforce
    /// them. Allocates nothing when no policy applies.
    pub fn check_http(
        &self,
        target: &Target<'_>,
        src: &Source<'_>,
        req: &HttpRequest<'_>,
    ) -> Decision {
        self.decide_targeted(target, src, Some(&req.without_query()), &mut NoTrace)
    }

    /// Decides a connection to a plain TCP port at the waypoint, by the policies attached to
    /// the target's service or waypoint as for [`Authz::check_http`], with the L4 rule
    /// semantics (see the module docs). Allocates nothing when no policy applies.
    pub fn check_tcp(&self, target: &Target<'_>, src: &Source<'_>) -> Decision {
        self.decide_targeted(target, src, None, &mut NoTrace)
    }

    /// Decides a connection like [`Authz::check_tcp`] (same evaluation, same decision) and
    /// says how every applicable policy was evaluated.
    pub fn explain_tcp(&self, target: &Target<'_>, src: &Source<'_>) -> Explanation {
        let mut explainer = Explainer::targeted(src, target, None);
        let decision = self.decide_targeted(target, src, None, &mut explainer);
        Explanation {
            decision,
            policies: explainer.finish(),
            mtls_mode: self.mtls_mode(target.namespace, &BTreeMap::new(), target.port),
        }
    }

    /// Decides an HTTP request like [`Authz::check_http`] (same evaluation, same decision) and
    /// says how every applicable policy was evaluated.
    pub fn explain_http(
        &self,
        target: &Target<'_>,
        src: &Source<'_>,
        req: &HttpRequest<'_>,
    ) -> Explanation {
        let req = req.without_query();
        let mut explainer = Explainer::targeted(src, target, Some(&req));
        let decision = self.decide_targeted(target, src, Some(&req), &mut explainer);
        Explanation {
            decision,
            policies: explainer.finish(),
            mtls_mode: self.mtls_mode(target.namespace, &BTreeMap::new(), target.port),
        }
    }

    /// The keys (`namespace/name`) of the policies with `targetRefs`, in namespace order.
    pub fn targeted_policies(&self) -> impl Iterator<Item = &str> {
        let mut namespaces: Vec<_> = self.targeted.iter().collect();
        namespaces.sort_by_key(|(ns, _)| *ns);
        namespaces.into_iter().flat_map(|(_, g)| {
            g.deny.iter().chain(&g.allow).chain(&g.audit).map(|p| p.key.as_str())
        })
    }

    /// The policies with `targetRefs` that nothing enforces, each with why: every Service they
    /// name is missing from `services` or has no waypoint, and no service uses a waypoint they
    /// name. Agents leave such policies to a waypoint, so a DENY among them denies nothing:
    /// worth a warning, as istiod marks them in their status.
    pub fn unbound_policies(&self, services: &[&crate::ServiceInfo]) -> Vec<String> {
        let mut out = Vec::new();
        let mut namespaces: Vec<_> = self.targeted.iter().collect();
        namespaces.sort_by_key(|(ns, _)| *ns);
        for (ns, group) in namespaces {
            for p in group.deny.iter().chain(&group.allow).chain(&group.audit) {
                let bound = p.targets.iter().any(|t| match t {
                    rules::TargetRef::Service(name) => services
                        .iter()
                        .any(|s| s.namespace == *ns && s.name == *name && s.waypoint.is_some()),
                    rules::TargetRef::Gateway(name) => services.iter().any(|s| {
                        s.waypoint.as_deref() == Some(name.as_str())
                            && (ns == ROOT_NAMESPACE || s.namespace == *ns)
                    }),
                });
                if !bound && !p.targets.is_empty() {
                    out.push(format!(
                        "AuthorizationPolicy {} is enforced nowhere: its targetRefs name no Service \
                         that has a waypoint (label sinew.io/use-waypoint on it or its namespace) \
                         and no waypoint in use; node agents enforce only policies with a selector \
                         or neither",
                        p.key
                    ));
                }
            }
        }
        out
    }

    /// True when any policy targets this service or waypoint (so the waypoint can skip
    /// evaluation otherwise: [`Authz::check_http`] and [`Authz::check_tcp`] would allow by
    /// default).
    pub fn has_targeted_policies(&self, target: &Target<'_>) -> bool {
        [Action::Deny, Action::Allow, Action::Audit]
            .into_iter()
            .any(|action| self.applicable_targeted(*target, action).next().is_some())
    }

    /// The mTLS mode for a destination port: a PeerAuthentication of its namespace whose
    /// selector matches its labels wins (its `portLevelMtls` entry for `port`, the workload
    /// port, first), then its namespace's one without selector, then the mesh-wide one (root
    /// namespace, no selector); UNSET inherits from the next level and the default is
    /// PERMISSIVE, so the result is never [`MtlsMode::Unset`]. Where several apply at one
    /// level, the oldest (`creationTimestamp`, then name) is used, as in Istio.
    pub fn mtls_mode(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        port: u16,
    ) -> MtlsMode {
        self.peers.mode(namespace, labels, port)
    }

    /// The policies of `action` that apply to `dst`, in evaluation order.
    fn applicable<'s>(
        &'s self,
        dst: Destination<'s>,
        action: Action,
    ) -> impl Iterator<Item = &'s Policy> + 's {
        let ns = self.namespaces.get(dst.namespace);
        let wide = ns.map_or(&[][..], |n| n.wide.of(action));
        let selected = ns.map_or(&[][..], |n| n.selected.of(action));
        self.mesh.of(action).iter().chain(wide).chain(
            self.root_selected
                .of(action)
                .iter()
                .chain(selected)
                .filter(move |p| p.selects(dst.labels)),
        )
    }

    /// The policies of `action` attached to `target` with `targetRefs`, in evaluation order:
    /// the root namespace's, then the target namespace's.
    fn applicable_targeted<'s>(
        &'s self,
        target: Target<'s>,
        action: Action,
    ) -> impl Iterator<Item = &'s Policy> + 's {
        let of = |ns: &str| self.targeted.get(ns).map_or(&[][..], |g| g.of(action));
        let own = if target.namespace == ROOT_NAMESPACE { &[][..] } else { of(target.namespace) };
        of(ROOT_NAMESPACE).iter().chain(own).filter(move |p| p.targets(&target))
    }

    /// The L4 evaluation behind both `check` and `explain`.
    fn decide<T: Trace>(&self, dst: &Destination<'_>, src: &Source<'_>, t: &mut T) -> Decision {
        let req = Request {
            identity: src.identity,
            ip: src.ip.to_canonical(),
            port: dst.port,
            http: None,
        };
        let dst = *dst;
        decide(&req, |action| self.applicable(dst, action), t)
    }

    /// The waypoint's evaluation behind `check_http`, `explain_http` (`http` already without
    /// query), `check_tcp` and `explain_tcp` (no `http`).
    fn decide_targeted<T: Trace>(
        &self,
        target: &Target<'_>,
        src: &Source<'_>,
        http: Option<&HttpRequest<'_>>,
        t: &mut T,
    ) -> Decision {
        let req = Request {
            identity: src.identity,
            ip: src.ip.to_canonical(),
            port: target.port,
            http: http.copied(),
        };
        let target = *target;
        decide(&req, |action| self.applicable_targeted(target, action), t)
    }
}

/// The one evaluation behind every `check_*` and `explain_*`, over the
/// policies `applicable` gives for each action, in evaluation order. With a tracer that is not
/// `ON`, it stops at the deciding match; with one, it evaluates every applicable policy. The
/// decision is the same: the first match in evaluation order decides.
fn decide<'s, T, I>(req: &Request<'_>, applicable: impl Fn(Action) -> I, t: &mut T) -> Decision
where
    T: Trace,
    I: Iterator<Item = &'s Policy>,
{
    let first_match = |action, t: &mut T| {
        let mut found = None;
        let mut applies = false;
        for p in applicable(action) {
            applies = true;
            if let Some(rule) = p.first_match(req, t)
                && found.is_none()
            {
                found = Some((p, rule));
                if !T::ON {
                    break;
                }
            }
        }
        (found, applies)
    };
    let (deny, _) = first_match(Action::Deny, t);
    let (allow, allow_applies) = match deny {
        Some(_) if !T::ON => (None, true),
        _ => first_match(Action::Allow, t),
    };
    let mut audited = Vec::new();
    for p in applicable(Action::Audit) {
        if p.first_match(req, t).is_some() {
            audited.push(p.key.clone());
        }
    }
    let (verdict, policy, reason) = match (deny, allow) {
        (Some((p, rule)), _) => {
            let l7 = req.http.is_none() && p.rules.get(rule).is_some_and(|r| r.l7.is_some());
            let note = if l7 { ", L7 fields ignored at L4" } else { "" };
            let reason = format!("denied by DENY policy {} (rule {rule}{note})", p.key);
            (Verdict::Deny, Some(p.key.clone()), Cow::Owned(reason))
        }
        (None, _) if !allow_applies => {
            (Verdict::Allow, None, Cow::Borrowed("allowed: no ALLOW policy applies"))
        }
        (None, Some((p, rule))) => {
            let reason = format!("allowed by ALLOW policy {} (rule {rule})", p.key);
            (Verdict::Allow, Some(p.key.clone()), Cow::Owned(reason))
        }
        (None, None) => {
            let names = list_names(applicable(Action::Allow));
            let reason = format!("denied: ALLOW policies apply ({names}) and none matches");
            (Verdict::Deny, None, Cow::Owned(reason))
        }
    };
    Decision { verdict, policy, reason, audited }
}

/// Up to three policy names, then how many more.
fn list_names<'a>(policies: impl Iterator<Item = &'a Policy>) -> String {
    const SHOWN: usize = 3;
    let mut out = String::new();
    let mut count = 0;
    for p in policies {
        if count < SHOWN {
            if count > 0 {
                out.push_str(", ");
            }
            out.push_str(&p.key);
        }
        count += 1;
    }
    if count > SHOWN {
        out.push_str(&format!(" and {} more", count - SHOWN));
    }
    out
}
