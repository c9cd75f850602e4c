//! `/healthz`, `/readyz` (leading, and the hub's groups have been listed) and `/metrics` (Prometheus text).

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio_util::sync::CancellationToken;

use crate::{listed::Listed, metrics::Metrics};

#[derive(Clone)]
struct HttpState {
    metrics: Metrics,
    groups_listed: Listed,
    leader: tokio::sync::watch::Receiver<bool>,
}

/// Serves the endpoints until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    groups_listed: Listed,
    leader: tokio::sync::watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics_text))
        .with_state(HttpState {
            metrics,
            groups_listed,
            leader,
        });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(error) = served {
        tracing::error!(%error, "the HTTP endpoints stopped");
    }
}

/// Ready when leading and the hub's groups are listed: a Service in front of the replicas then routes
/// sidecars to the leader only.
async fn ready(State(state): State<HttpState>) -> impl IntoResponse {
    if !*state.leader.borrow() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "standby: another replica holds the leader Lease, or this one could not renew it in time",
        );
    }
    if state.groups_listed.is_listed() {
        (StatusCode::OK, "ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the hub's groups are not listed yet",
        )
    }
}

async fn metrics_text(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        {
            state.metrics.set_leader(*state.leader.borrow());
            state.metrics.encode()
        },
    )
}
