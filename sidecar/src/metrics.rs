//! Prometheus metrics and the `/healthz`, `/readyz`, `/metrics` endpoints.
//!
//! Labels are group, path and state — never a volume or a write (DESIGN.md).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Labels: a path and a result or state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    /// `api` or `grpc`.
    pub path: String,
    /// What happened.
    pub state: String,
}

/// Labels: a group, a path and a state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    /// The group's name (or UID when the name is unknown).
    pub group: String,
    /// `api`, `grpc` or `local`.
    pub path: String,
    /// What happened.
    pub state: String,
}

/// Labels: why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// CamelCase, as in the group's conditions (e.g. `UndoLogOutOfSpace`).
    pub reason: String,
}

/// Labels: a group.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailSafeLabels {
    /// The group's name (or UID when the name is unknown).
    pub group: String,
}

/// The sidecar's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Directives by group, path and outcome (`enforced`, `stale`, `refused`).
    pub directives: Family<GroupLabels, Counter>,
    /// Reports sent by path and result.
    pub reports: Family<PathLabels, Counter>,
    /// Acknowledgements sent by path and result.
    pub acks: Family<PathLabels, Counter>,
    /// Whether each path is up (1) or down (0).
    pub path_up: Family<PathLabels, Gauge>,
    /// Local volumes by group and state.
    pub volumes: Family<GroupLabels, Gauge>,
    /// Fail-safe suspensions taken, by group.
    pub fail_safes: Family<GroupLabels, Counter>,
    /// 1 for each group whose fail-safe suspension is in force on this node.
    pub fail_safe_in_force: Family<FailSafeLabels, Gauge>,
    /// Replicator operations by kind and result.
    pub replicator_calls: Family<PathLabels, Counter>,
    /// Copy failures of volumes in no group (the replicator runs them primary-only, changes tracked,
    /// until the secondary answers), by result.
    pub copy_failures_outside_groups: Family<PathLabels, Counter>,
    /// Secondaries of this node's volumes that could not keep the frozen image through a resync, by
    /// reason.
    pub kept_image_failures: Family<ReasonLabels, Counter>,
    /// Set once the inventory is known and a path has delivered its view.
    pub ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lockstep_sidecar");
        let directives = Family::<GroupLabels, Counter>::default();
        let reports = Family::<PathLabels, Counter>::default();
        let acks = Family::<PathLabels, Counter>::default();
        let path_up = Family::<PathLabels, Gauge>::default();
        let volumes = Family::<GroupLabels, Gauge>::default();
        let fail_safes = Family::<GroupLabels, Counter>::default();
        let fail_safe_in_force = Family::<FailSafeLabels, Gauge>::default();
        let replicator_calls = Family::<PathLabels, Counter>::default();
        let copy_failures_outside_groups = Family::<PathLabels, Counter>::default();
        let kept_image_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "directives",
            "Directives received, by group, path and outcome",
            directives.clone(),
        );
        registry.register(
            "reports",
            "Failure reports sent, by path and result",
            reports.clone(),
        );
        registry.register(
            "acks",
            "Acknowledgements sent, by path and result",
            acks.clone(),
        );
        registry.register("path_up", "Whether each path is reachable", path_up.clone());
        registry.register(
            "volumes",
            "Local volumes by group and state",
            volumes.clone(),
        );
        registry.register(
            "fail_safes",
            "Fail-safe suspensions taken, by group",
            fail_safes.clone(),
        );
        registry.register(
            "fail_safe_in_force",
            "1 for each group this node holds suspended by its own fail-safe (a failed write reached neither path); lifted only by a directive at a higher epoch",
            fail_safe_in_force.clone(),
        );
        registry.register(
            "replicator_calls",
            "Replicator operations, by kind (path label) and result",
            replicator_calls.clone(),
        );
        registry.register(
            "copy_failures_outside_groups",
            "Copy failures of volumes in no group, run primary-only with their changes tracked until the secondary answers",
            copy_failures_outside_groups.clone(),
        );
        registry.register(
            "kept_image_failures",
            "Secondaries that could not keep the frozen image through a resync (the resync was refused), by reason",
            kept_image_failures.clone(),
        );
        Self {
            registry,
            directives,
            reports,
            acks,
            path_up,
            volumes,
            fail_safes,
            fail_safe_in_force,
            replicator_calls,
            copy_failures_outside_groups,
            kept_image_failures,
            ready: AtomicBool::new(false),
        }
    }

    /// Counts one event on a path.
    pub fn count(family: &Family<PathLabels, Counter>, path: &str, state: &str) {
        family
            .get_or_create(&PathLabels {
                path: path.to_owned(),
                state: state.to_owned(),
            })
            .inc();
    }

    /// Sets a path's reachability.
    pub fn set_path_up(&self, path: &str, up: bool) {
        self.path_up
            .get_or_create(&PathLabels {
                path: path.to_owned(),
                state: "up".to_owned(),
            })
            .set(i64::from(up));
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "metrics listener accept failed");
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&request, &metrics)) }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "metrics connection ended");
            }
        });
    }
}

fn respond<B>(request: &Request<B>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, body) = match request.uri().path() {
        "/healthz" | "/livez" => (StatusCode::OK, "ok\n".to_owned()),
        "/readyz" if metrics.ready.load(Ordering::Relaxed) => (StatusCode::OK, "ok\n".to_owned()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the replicator's inventory and a path\n".to_owned(),
        ),
        "/metrics" => (StatusCode::OK, metrics.encode()),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Binds the endpoint address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
