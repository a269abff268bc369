//! The admin listener: Prometheus metrics and health over HTTP (loopback by default).
//!
//! Routes:
//! - `GET /metrics` — Prometheus text exposition (`metrics-exporter-prometheus`).
//! - `GET /healthz` — `{"status":"ok"}` while the proxy runs.
//!
//! HTTP is served by axum; nothing here is hand-written protocol code. It never touches the
//! data path.

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::metrics::Metrics;

/// Content type of the Prometheus text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves the admin routes until `stop` is cancelled.
pub(crate) async fn run_admin(listener: TcpListener, metrics: Metrics, stop: CancellationToken) {
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { ([(CONTENT_TYPE, PROMETHEUS_TEXT)], metrics.render()) }
            }),
        )
        .route("/healthz", get(healthz));
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        warn!(error = %e, "admin listener failed");
    }
}

async fn healthz() -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "application/json")],
        "{\"status\":\"ok\"}\n",
    )
}
