//! "Why may (or may not) this source reach that destination?", for the admin API and the
//! `sinew explain` command: the same evaluation the data path runs, with every policy shown.

use std::net::{IpAddr, SocketAddr};

use serde_json::{Value, json};
use sinew_mesh::{Destination, MeshIndex, Source};
use sinew_model::MtlsMode;

/// Explains `source` (`<namespace>/<name>` or an address) reaching `destination`
/// (`<address>:<port>`, a pod or a service VIP) under `mesh`.
pub fn explain(
    mesh: &MeshIndex,
    trust_domain: &str,
    source: &str,
    destination: &str,
) -> Result<Value, String> {
    let src_workload = match source.split_once('/') {
        Some((ns, name)) => Some(
            mesh.workload(ns, name)
                .ok_or_else(|| format!("source {source:?}: no such workload"))?
                .clone(),
        ),
        None => {
            let ip: IpAddr = source.parse().map_err(|_| {
                format!("source {source:?}: expected <namespace>/<name> or an address")
            })?;
            mesh.workload_by_ip(ip).cloned()
        }
    };
    let src_ip: Option<IpAddr> = match &src_workload {
        Some(w) => w.ips.first().copied(),
        None => source.parse().ok(),
    };
    let dst: SocketAddr = destination
        .parse()
        .map_err(|_| format!("destination {destination:?}: expected <address>:<port>"))?;
    let (targets, service) = match mesh.service_by_vip(dst.ip()) {
        Some(svc) => {
            let port = svc.target_port(dst.port()).ok_or_else(|| {
                format!(
                    "destination {destination}: service {}/{} has no such port",
                    svc.namespace, svc.name
                )
            })?;
            let eps: Vec<_> = svc.endpoints.iter().map(|w| (w.clone(), port)).collect();
            (eps, Some(format!("{}/{}", svc.namespace, svc.name)))
        }
        None => match mesh.workload_by_ip(dst.ip()) {
            Some(w) => (vec![(w.clone(), dst.port())], None),
            None => {
                return Ok(json!({
                    "source": source, "destination": destination,
                    "verdict": "allow",
                    "reason": "the destination is not a mesh workload: traffic passes through as plain TCP and no policy applies",
                }));
            }
        },
    };
    let identity = match &src_workload {
        Some(w) if w.in_mesh => Some(w.identity(trust_domain).map_err(|e| e.to_string())?),
        _ => None,
    };
    let mut endpoints = Vec::new();
    for (w, port) in &targets {
        let dest = Destination { namespace: &w.namespace, labels: &w.labels, port: *port };
        let ip = src_ip.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let mut e = json!({
            "workload": w.key(),
            "port": port,
            "inMesh": w.in_mesh,
        });
        if !w.in_mesh {
            e["verdict"] = json!("allow");
            e["reason"] =
                json!("the destination's namespace is not in the mesh: no policy applies");
        } else {
            let explanation =
                mesh.authz().explain(&dest, &Source { identity: identity.as_ref(), ip });
            let strict = identity.is_none()
                && mesh.authz().mtls_mode(&w.namespace, &w.labels) == MtlsMode::Strict;
            let (verdict, reason) = if strict {
                (
                    "deny".to_string(),
                    "STRICT mTLS: the source has no mesh identity (plaintext)".to_string(),
                )
            } else {
                let d = &explanation.decision;
                (if d.allowed() { "allow" } else { "deny" }.to_string(), d.reason.to_string())
            };
            e["verdict"] = json!(verdict);
            e["reason"] = json!(reason);
            e["transport"] =
                json!(if identity.is_some() { "HBONE (mutual TLS)" } else { "plaintext" });
            e["explanation"] = serde_json::to_value(&explanation).unwrap_or(Value::Null);
        }
        endpoints.push(e);
    }
    let verdict = if endpoints.iter().all(|e| e["verdict"] == "allow") {
        "allow"
    } else if endpoints.iter().all(|e| e["verdict"] == "deny") {
        "deny"
    } else {
        "mixed"
    };
    Ok(json!({
        "source": {
            "input": source,
            "workload": src_workload.as_ref().map(|w| w.key()),
            "identity": identity.as_ref().map(|i| i.to_string()),
            "address": src_ip,
        },
        "destination": destination,
        "service": service,
        "verdict": verdict,
        "endpoints": endpoints,
    }))
}
