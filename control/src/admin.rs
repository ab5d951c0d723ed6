//! The admin endpoint: readiness, Prometheus metrics, connected clients with the versions they
//! acknowledged, and a config dump (resources in service and current rejections).

use std::{
    fmt,
    sync::{Arc, Mutex, atomic::Ordering},
};

use axum::{Json, Router, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};
use serde_json::json;
use sinew_model::ConfigError;
use tokio::{net::TcpListener, sync::watch};

use crate::{ca::CaStats, discovery::Registry, snapshot::Snapshot};

/// What the admin endpoint reads.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// Discovery clients and counters.
    pub registry: Arc<Registry>,
    /// CA counters.
    pub ca: Arc<CaStats>,
    /// Rejections of the last reload.
    pub errors: Arc<Mutex<Vec<ConfigError>>>,
    /// What is in service.
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let m = ConstCounter::new(v);
    m.encode(enc.encode_descriptor(name, help, None, m.metric_type())?)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> fmt::Result {
    let m = ConstGauge::new(v);
    m.encode(enc.encode_descriptor(name, help, None, m.metric_type())?)
}

impl Collector for AdminState {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let snap = self.snapshots.borrow().clone();
        let r = &self.registry;
        gauge(
            &mut enc,
            "sinew_control_clients",
            "Connected discovery clients",
            r.clients().len() as i64,
        )?;
        gauge(
            &mut enc,
            "sinew_control_resources",
            "Resources in service",
            snap.resources.len() as i64,
        )?;
        gauge(
            &mut enc,
            "sinew_control_config_version",
            "System version in service",
            snap.system_version as i64,
        )?;
        let errors = self.errors.lock().expect("errors lock poisoned").len();
        gauge(
            &mut enc,
            "sinew_control_config_errors",
            "Rejections in the last reload",
            errors as i64,
        )?;
        counter(
            &mut enc,
            "sinew_control_responses",
            "Discovery responses sent",
            r.responses_sent.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "sinew_control_resources_sent",
            "Resources sent",
            r.resources_sent.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "sinew_control_acks",
            "Responses acknowledged",
            r.acks.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "sinew_control_nacks",
            "Responses rejected by clients",
            r.nacks.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "sinew_control_certificates_issued",
            "Certificates signed",
            self.ca.issued.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "sinew_control_certificates_refused",
            "Signing requests refused",
            self.ca.refused.load(Ordering::Relaxed),
        )
    }
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    let metrics = {
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(state.clone()));
        Arc::new(reg)
    };
    let clients = state.clone();
    let dump = state;
    Router::new()
        .route("/ready", get(|| async { "ready\n" }))
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    let mut out = String::new();
                    match prometheus_client::encoding::text::encode(&mut out, &metrics) {
                        Ok(()) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], out).into_response(),
                        Err(_) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "encoding failed").into_response(),
                    }
                }
            }),
        )
        .route("/clients", get(move || async move { Json(clients.registry.clients()) }))
        .route(
            "/config_dump",
            get(move || async move {
                let snap = dump.snapshots.borrow().clone();
                let resources: serde_json::Map<String, serde_json::Value> = snap
                    .resources
                    .iter()
                    .map(|(k, e)| {
                        let body: serde_json::Value = serde_json::from_slice(&e.body).unwrap_or_default();
                        (k.to_string(), json!({ "version": e.version.as_ref(), "resource": body }))
                    })
                    .collect();
                let errors: Vec<String> = dump.errors.lock().expect("errors lock poisoned").iter().map(ToString::to_string).collect();
                Json(json!({ "systemVersion": snap.system_version, "resources": resources, "errors": errors }))
            }),
        )
}

/// Serves the admin router on `listener`.
pub async fn serve(listener: TcpListener, state: AdminState) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}
