//! The mesh as a data plane sees it: workloads and services indexed by address, and
//! authorization (AuthorizationPolicy, PeerAuthentication) compiled for per-connection checks
//! by the node agents and per-request checks by the waypoint.
//!
//! A [`MeshIndex`] is built once per configuration change from validated
//! [`sinew_model::Resource`]s and then queried on every connection by the node agent and on
//! every request by the L7 waypoint. Building does the work (IP blocks parsed, policies grouped
//! by scope and action, endpoints resolved) so that queries are map look-ups and short scans.
//! Nothing here panics on any input: a value that cannot be used (an unparsable IP block, an
//! identity that is not a valid SPIFFE id) simply never matches.
//!
//! Authorization follows Istio's semantics as DESIGN.md restates them for L4: any DENY match
//! denies; with no ALLOW policy applying the connection is allowed; otherwise an ALLOW match is
//! needed. AUDIT policies never change the verdict and are only reported. [`Authz::check`] is
//! the hot path; [`Authz::explain`] runs the same evaluation while recording why each policy
//! matched or not, for the admin API and the CLI. Policies attached with `targetRefs` are
//! left to the waypoint, which asks [`Authz::check_http`] (and [`Authz::explain_http`]) with the
//! method, path, host and headers of each request, and [`Authz::check_tcp`] (and
//! [`Authz::explain_tcp`]) for each connection to a plain TCP port.
#![forbid(unsafe_code)]

mod authz;
mod index;

pub use authz::{
    Authz, CLOSED_BY_POLICY, Decision, Destination, Explanation, HttpRequest, PolicyTrace, Scope,
    Source, Target, Verdict,
};
pub use index::{MeshIndex, SERVICE_DOMAIN, ServiceInfo, WorkloadInfo};

/// Logs a warning for each of `problems` not in `warned` yet; `warned` becomes `problems`,
/// so each is warned about once per configuration change that brings it, and again if it
/// comes back. For what a configuration does not do although it was accepted: policies
/// enforced nowhere ([`MeshIndex::unbound_policies`]), rules left out.
pub fn warn_once(problems: Vec<String>, warned: &mut Vec<String>) {
    for message in problems.iter().filter(|m| !warned.contains(m)) {
        tracing::warn!("{message}");
    }
    *warned = problems;
}

use sinew_model::Object;

/// `(namespace, name)` of a resource. A namespaced kind always has a namespace once
/// validated; an absent one is taken as `""` rather than refused.
fn ns_name<S>(o: &Object<S>) -> (&str, &str) {
    (o.metadata.namespace.as_deref().unwrap_or_default(), &o.metadata.name)
}

/// Sorted by `(namespace, name)`; of two objects with the same key the first given is kept.
fn sorted<S>(mut objects: Vec<&Object<S>>) -> Vec<&Object<S>> {
    objects.sort_by(|a, b| ns_name(a).cmp(&ns_name(b)));
    objects.dedup_by(|a, b| ns_name(a) == ns_name(b));
    objects
}
