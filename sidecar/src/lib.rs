//! The Lockstep sidecar: the per-node agent that reports copy failures and enforces freezes.
//!
//! It runs beside the CSI driver on every node. It learns its replicator's volumes, hears which groups
//! they belong to and the groups' (epoch, stage) over two independent paths — the Kubernetes API server
//! (mirrored ConsistencyGroups) and the operator's gRPC `Control` stream — enforces the highest point
//! seen by either exactly once, and acknowledges on both. A copy failure is reported on both paths at
//! once; if neither can be reached for the fail-safe interval, it suspends the group's volumes itself.
//!
//! This crate is a library whose binary only parses flags and calls [`run`], so later crates' tests can
//! start it in-process with [`Sidecar::start`].
//!
//! Modules: [`enforce`] (the pure enforcement core), [`report`] (reports on both paths, backoff),
//! [`agent`] (the task that owns the core and drives the replicator), [`api_path`] (path 1),
//! [`grpc_path`] (path 2), [`replicator`] (the Replicator client), [`metrics`] (Prometheus, health).

pub mod agent;
pub mod api_path;
pub mod enforce;
pub mod grpc_path;
pub mod metrics;
pub mod replicator;
pub mod report;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::agent::{Agent, AgentConfig};
use crate::grpc_path::{GrpcConfig, GrpcPath};
use crate::metrics::Metrics;
use crate::replicator::Replicator;
use lockstep_api::domain::Path;

/// How long [`Sidecar::shutdown`] waits for its tasks to stop before aborting them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

fn duration(text: &str) -> Result<Duration, String> {
    lockstep_api::domain::parse_duration(text).map_err(|e| e.to_string())
}

/// Start-up options (flags and environment).
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// This node's name (the Kubernetes node the sidecar runs on).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// This cluster's MemberCluster name, as the hub knows it.
    #[arg(long, env = "LOCKSTEP_CLUSTER")]
    pub cluster_name: String,
    /// A kubeconfig for this cluster's API server; in-cluster configuration when absent.
    #[arg(long, env = "LOCKSTEP_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Do not use the API server path (a gRPC-only configuration).
    #[arg(long, env = "LOCKSTEP_NO_API_PATH")]
    pub no_api_path: bool,
    /// The operator's gRPC Control endpoint (e.g. https://lockstep-operator.lockstep:7443, the operator's
    /// default --grpc-listen port); without it
    /// the sidecar runs API-only.
    #[arg(long, env = "LOCKSTEP_OPERATOR_ENDPOINT")]
    pub operator_endpoint: Option<String>,
    /// The CA bundle (PEM) the operator's certificate must chain to; read again on every connection.
    #[arg(long, env = "LOCKSTEP_OPERATOR_CA_FILE")]
    pub operator_ca_file: Option<PathBuf>,
    /// The name the operator's certificate must carry, when it is not the endpoint's host (a load
    /// balancer's address, say).
    #[arg(long, env = "LOCKSTEP_OPERATOR_SERVER_NAME")]
    pub operator_server_name: Option<String>,
    /// This node's projected ServiceAccount token (audience lockstep.dev/control), presented on every
    /// call to the operator and read again each time (the kubelet rotates it).
    #[arg(long, env = "LOCKSTEP_TOKEN_FILE", default_value = tls::DEFAULT_TOKEN_FILE)]
    pub token_file: PathBuf,
    /// INSECURE, for tests and a migration from a release without TLS only: dial an http:// endpoint
    /// in plaintext, verifying nothing (an impostor could send directives) and presenting no token.
    #[arg(long, env = "LOCKSTEP_INSECURE_PLAINTEXT_CONTROL")]
    pub insecure_plaintext_control: bool,
    /// The replicator's unix socket.
    #[arg(
        long,
        env = "LOCKSTEP_REPLICATOR_SOCKET",
        default_value = "/run/lockstep/replicator.sock"
    )]
    pub replicator_socket: PathBuf,
    /// Lockstep's namespace (where the node Leases live).
    #[arg(long, env = "LOCKSTEP_NAMESPACE", default_value = "lockstep")]
    pub namespace: String,
    /// Suspend a group's volumes when a failed write reached neither path for this long (keep it below
    /// the groups' hold timeouts).
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub fail_safe_interval: Duration,
    /// Timeout of each call to the operator and the replicator.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub rpc_timeout: Duration,
    /// Reconnect the gRPC stream after this long without a message (heartbeats included).
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub grpc_idle_timeout: Duration,
    /// The node Lease's duration; renewed every third of it.
    #[arg(long, default_value = "15s", value_parser = duration)]
    pub lease_duration: Duration,
    /// Re-list the replicator's volumes this often.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub inventory_interval: Duration,
    /// Serve /healthz, /readyz and /metrics here.
    #[arg(long, env = "LOCKSTEP_LISTEN", default_value = "0.0.0.0:9090")]
    pub listen: SocketAddr,
}

impl Options {
    /// Options with the defaults, for a node of a cluster.
    pub fn new(node_name: &str, cluster_name: &str) -> Self {
        Self {
            node_name: node_name.to_owned(),
            cluster_name: cluster_name.to_owned(),
            kubeconfig: None,
            no_api_path: false,
            operator_endpoint: None,
            operator_ca_file: None,
            operator_server_name: None,
            token_file: PathBuf::from(tls::DEFAULT_TOKEN_FILE),
            insecure_plaintext_control: false,
            replicator_socket: PathBuf::from("/run/lockstep/replicator.sock"),
            namespace: "lockstep".to_owned(),
            fail_safe_interval: Duration::from_secs(5),
            rpc_timeout: Duration::from_secs(5),
            grpc_idle_timeout: Duration::from_secs(30),
            lease_duration: Duration::from_secs(15),
            inventory_interval: Duration::from_secs(10),
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
        }
    }
}

/// Errors starting the sidecar.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// Neither path is configured.
    #[error("no path configured: give --operator-endpoint, or leave the API server path on")]
    NoPath,
    /// The gRPC path has no way to verify the operator.
    #[error(
        "--operator-endpoint needs --operator-ca-file to verify the operator's certificate (or, for tests and migration only, --insecure-plaintext-control with an http:// endpoint)"
    )]
    NoOperatorCa,
    /// The kubeconfig could not be read.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// The kube client could not be built.
    #[error("kube client: {0}")]
    Kube(#[from] kube::Error),
    /// The replicator endpoint.
    #[error(transparent)]
    Replicator(#[from] replicator::ReplicatorError),
    /// The gRPC path.
    #[error(transparent)]
    Grpc(#[from] grpc_path::GrpcPathError),
    /// The health/metrics listener.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running sidecar.
#[derive(Debug)]
pub struct Sidecar {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    metrics_addr: SocketAddr,
    metrics: Arc<Metrics>,
}

impl Sidecar {
    /// Starts every task. `client` overrides the kubeconfig (tests pass one). With the API path off it
    /// is used only to resolve named PVCs for the gRPC path.
    pub async fn start(
        options: Options,
        client: Option<kube::Client>,
    ) -> Result<Self, SidecarError> {
        if options.no_api_path && options.operator_endpoint.is_none() {
            return Err(SidecarError::NoPath);
        }
        let security = match (
            &options.operator_ca_file,
            options.insecure_plaintext_control,
        ) {
            (_, true) => grpc_path::ClientSecurity::Plaintext,
            (Some(ca_file), false) => grpc_path::ClientSecurity::Tls {
                ca_file: ca_file.clone(),
                server_name: options.operator_server_name.clone(),
                token_file: options.token_file.clone(),
            },
            (None, false) if options.operator_endpoint.is_some() => {
                return Err(SidecarError::NoOperatorCa);
            }
            (None, false) => grpc_path::ClientSecurity::Plaintext,
        };
        let client = match client {
            Some(client) => Some(client),
            None if options.no_api_path => match kube_client(&options).await {
                // Without path 1 the local API server still resolves named PVCs, when reachable.
                Ok(client) => Some(client),
                Err(error) => {
                    tracing::info!(%error, "no local API server: PVCs must come resolved from the operator");
                    None
                }
            },
            None => Some(kube_client(&options).await?),
        };
        let stop = CancellationToken::new();
        let metrics = Arc::new(Metrics::new());
        let listener =
            metrics::bind(options.listen)
                .await
                .map_err(|source| SidecarError::Listen {
                    addr: options.listen,
                    source,
                })?;
        let metrics_addr = listener
            .local_addr()
            .map_err(|source| SidecarError::Listen {
                addr: options.listen,
                source,
            })?;
        let replicator = Replicator::new(&options.replicator_socket, options.rpc_timeout)?;
        let (agent, context, inputs) = Agent::new(
            options.node_name.clone(),
            options.cluster_name.clone(),
            replicator.clone(),
            metrics.clone(),
            AgentConfig {
                inventory_interval: options.inventory_interval,
                fail_safe_interval: options.fail_safe_interval,
                paths: [
                    options.operator_endpoint.is_some().then_some(Path::Grpc),
                    (!options.no_api_path).then_some(Path::Api),
                ]
                .into_iter()
                .flatten()
                .collect(),
            },
            stop.clone(),
        );
        // Every task's logs name the node (a test or benchmark runs many sidecars in one process).
        let span = tracing::info_span!("sidecar", cluster = %options.cluster_name, node = %options.node_name);
        let mut tasks = JoinSet::new();
        tasks.spawn(
            metrics::serve(listener, metrics.clone(), stop.clone()).instrument(span.clone()),
        );
        tasks.spawn(agent.run(inputs).instrument(span.clone()));
        tasks.spawn(agent::watch_replicator(context.clone(), replicator).instrument(span.clone()));
        if let Some(endpoint) = &options.operator_endpoint {
            let path = GrpcPath::new(GrpcConfig {
                endpoint: endpoint.clone(),
                security: security.clone(),
                timeout: options.rpc_timeout,
                idle_timeout: options.grpc_idle_timeout,
            })?;
            let path = match &client {
                Some(client) => path.with_resolver(client.clone()),
                None => path,
            };
            let path = if options.no_api_path {
                path.with_volume_states()
            } else {
                path
            };
            tasks.spawn(
                grpc_path::subscribe(path.clone(), context.clone()).instrument(span.clone()),
            );
            tasks.spawn(
                grpc_path::acknowledge(path.clone(), context.clone()).instrument(span.clone()),
            );
            tasks.spawn(grpc_path::report(path, context.clone()).instrument(span.clone()));
        }
        if let Some(client) = client.filter(|_| !options.no_api_path) {
            tasks.spawn(
                api_path::watch_groups(client.clone(), context.clone()).instrument(span.clone()),
            );
            tasks.spawn(
                api_path::write_status(client.clone(), context.clone()).instrument(span.clone()),
            );
            tasks.spawn(
                api_path::renew_lease(
                    client,
                    context.clone(),
                    options.namespace.clone(),
                    options.lease_duration,
                )
                .instrument(span.clone()),
            );
        }
        tracing::info!(
            node = %options.node_name,
            cluster = %options.cluster_name,
            grpc = options.operator_endpoint.is_some(),
            api = !options.no_api_path,
            %metrics_addr,
            "lockstep-sidecar started"
        );
        Ok(Self {
            stop,
            tasks,
            metrics_addr,
            metrics,
        })
    }

    /// Where /healthz, /readyz and /metrics are served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Stops every task and waits for them, for at most [`SHUTDOWN_GRACE`]; a task still in a call
    /// that does not end (a request to an unreachable API server or operator) is then aborted.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                still_running = self.tasks.len(),
                "tasks did not stop within {SHUTDOWN_GRACE:?}: aborting them"
            );
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
    }

    /// Stops every task at once, without waiting (a crash, for tests).
    pub fn abort(mut self) {
        self.stop.cancel();
        self.tasks.abort_all();
    }
}

async fn kube_client(options: &Options) -> Result<kube::Client, SidecarError> {
    let config = match &options.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| SidecarError::Kubeconfig(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| SidecarError::Kubeconfig(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| SidecarError::Kubeconfig(e.to_string()))?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// Runs the sidecar until SIGTERM or Ctrl-C, then shuts down gracefully.
pub async fn run(options: Options) -> anyhow::Result<()> {
    // Listen for SIGTERM before anything starts, so an early one is a graceful stop too.
    let signal = shutdown_signal()?;
    let sidecar = Sidecar::start(options, None).await?;
    signal.await;
    tracing::info!("shutting down");
    sidecar.shutdown().await;
    Ok(())
}

#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = interrupt.recv() => {},
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
