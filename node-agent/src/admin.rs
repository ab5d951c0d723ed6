//! The agent's admin endpoint (localhost by default): Prometheus metrics, readiness, the
//! configuration and certificates in force, and policy explanations.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use serde_json::json;
use tokio::net::TcpListener;

use crate::pods::Registry;

/// Serves until the task is aborted.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/stats/prometheus", get(metrics))
        .route("/ready", get(ready))
        .route("/healthz/ready", get(ready))
        .route("/config_dump", get(config_dump))
        .route("/certs", get(certs))
        .route("/explain", get(explain))
        .with_state(registry);
    let _ = axum::serve(listener, app).await;
}

/// Ready once the configuration is known: before, enrolling a pod is refused (the CNI plugin
/// retries), so a readiness probe must not pass.
async fn ready(State(r): State<Arc<Registry>>) -> impl IntoResponse {
    if r.draining() {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "stopping\n")
    } else if r.configuration_known() {
        (axum::http::StatusCode::OK, "ready\n")
    } else {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "no configuration from control yet\n")
    }
}

async fn metrics(State(r): State<Arc<Registry>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        r.ctx().metrics.encode(),
    )
}

async fn config_dump(State(r): State<Arc<Registry>>) -> impl IntoResponse {
    let mesh = r.ctx().mesh.borrow().clone();
    let workloads: Vec<_> = mesh
        .workloads()
        .map(|w| {
            json!({
                "workload": w.key(), "node": w.node, "serviceAccount": w.service_account,
                "ips": w.ips, "inMesh": w.in_mesh, "labels": w.labels,
            })
        })
        .collect();
    Json(json!({
        "pods": r.status().pods,
        "workloads": workloads,
        "liveInboundConnections": r.ctx().live.len(),
        "hbonePool": format!("{:?}", r.ctx().pool_stats()),
    }))
}

async fn certs(State(r): State<Arc<Registry>>) -> impl IntoResponse {
    Json(r.ctx().certs.dump())
}

async fn explain(
    State(r): State<Arc<Registry>>,
    Query(q): Query<Vec<(String, String)>>,
) -> impl IntoResponse {
    let get = |key: &str| q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let headers: Vec<String> =
        q.iter().filter(|(k, _)| k == "header").map(|(_, v)| v.clone()).collect();
    let (Some(src), Some(dst)) = (get("src"), get("dst")) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"error": "query parameters src (<namespace>/<name> or address) and dst (<address>:<port>) are required"}),
            ),
        );
    };
    let mesh = r.ctx().mesh.borrow().clone();
    let request = crate::explain::RequestSpec {
        method: get("method"),
        path: get("path"),
        host: get("host"),
        headers: &headers,
    };
    match crate::explain::explain(&mesh, &r.ctx().trust_domain, src, dst, &request) {
        Ok(v) => (StatusCode::OK, Json(v)),
        Err(e) => (StatusCode::BAD_REQUEST, Json(json!({ "error": e }))),
    }
}
