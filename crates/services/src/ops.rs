//! The operations endpoint shared by the services: `GET /healthz` and `GET /metrics`.
//!
//! Health is a set of named checks that the service sets as it works ("postgres", "mongodb",
//! "delivery", …). `/healthz` answers 200 with `ok` when every check passes, otherwise 503 with one
//! line per failing check, so a probe and a human read the same thing.
//!
//! Metrics go through the `metrics` facade into one process-wide Prometheus recorder.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::Context;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Named health checks, shared between the service and its endpoint.
#[derive(Debug, Default)]
pub struct Health {
    checks: Mutex<BTreeMap<&'static str, Option<String>>>,
    /// Facts worth showing that do not make the service unhealthy (e.g. dead letters recorded).
    notes: Mutex<BTreeMap<&'static str, String>>,
}

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::new(Health::default())
    }

    pub fn ok(&self, check: &'static str) {
        self.checks.lock().unwrap().insert(check, None);
    }

    pub fn failing(&self, check: &'static str, reason: impl Into<String>) {
        self.checks
            .lock()
            .unwrap()
            .insert(check, Some(reason.into()));
    }

    /// Shows `text` under `name` on `/healthz` without failing it.
    pub fn note(&self, name: &'static str, text: impl Into<String>) {
        self.notes.lock().unwrap().insert(name, text.into());
    }

    /// The notes, one `name: text` line each.
    pub fn notes(&self) -> String {
        let notes = self.notes.lock().unwrap();
        notes
            .iter()
            .map(|(name, text)| format!("{name}: {text}\n"))
            .collect()
    }

    /// `Ok(())` when every check passes; otherwise the failing checks, one per line.
    pub fn report(&self) -> Result<(), String> {
        let checks = self.checks.lock().unwrap();
        let failing: Vec<String> = checks
            .iter()
            .filter_map(|(name, reason)| reason.as_ref().map(|r| format!("{name}: {r}")))
            .collect();
        if failing.is_empty() {
            Ok(())
        } else {
            Err(failing.join("\n"))
        }
    }
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder is installed (a test harness); ours still renders.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// The `/healthz` and `/metrics` routes, for a service that serves them beside its own routes.
pub fn router(health: Arc<Health>) -> axum::Router {
    axum::Router::new()
        .route(
            "/healthz",
            get(move || {
                let health = health.clone();
                async move {
                    let notes = health.notes();
                    match health.report() {
                        Ok(()) => (StatusCode::OK, format!("ok\n{notes}")),
                        Err(failing) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("{failing}\n{notes}"),
                        ),
                    }
                }
            }),
        )
        .route("/metrics", get(|| async { metrics().render() }))
}

/// A bound, not yet serving, operations endpoint. Binding first lets a service fail at start-up
/// on a taken port, and lets tests use port 0 and learn the address.
pub struct OpsServer {
    listener: tokio::net::TcpListener,
}

impl OpsServer {
    pub async fn bind(addr: SocketAddr) -> anyhow::Result<OpsServer> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on --http-addr {addr}"))?;
        metrics();
        Ok(OpsServer { listener })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn serve(
        self,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let app = router(health);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .context("the HTTP endpoint failed")
    }
}

/// Binds and spawns the endpoint when `addr` is set; returns the bound address.
pub async fn spawn(
    addr: Option<SocketAddr>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<SocketAddr>> {
    let Some(addr) = addr else { return Ok(None) };
    let server = OpsServer::bind(addr).await?;
    let local = server.local_addr();
    tokio::spawn(async move {
        if let Err(error) = server.serve(health, shutdown).await {
            tracing::error!(error = format!("{error:#}"), "The HTTP endpoint stopped.");
        }
    });
    tracing::info!(%local, "Serving /healthz and /metrics.");
    Ok(Some(local))
}
