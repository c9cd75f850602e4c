//! The Lockstep operator: the control system that freezes every member of a consistency group.
//!
//! This crate is a library whose binary only parses flags and calls [`run`], so later crates' tests can
//! start it in-process ([`Operator::start`]).
//!
//! - [`freeze`]: the pure decisions (group status + event → new status, directives, events).
//! - [`members`]: the pure resolution of a group's members to volumes and nodes.
//! - [`engine`]: fetch → decide → send and persist → record, one group at a time.
//! - [`clusters`], [`mirror`], [`fanout`], [`sessions`], [`control`]: member clusters, mirrors, the two
//!   delivery paths and the gRPC `Control` service.
//! - [`ingest`]: one validator and one event type for what nodes send on either path.
//! - [`tls`]: TLS on the Control service, its certificate reloaded when it changes on disk.
//! - [`leader`]: leader election on a Lease, leading only within the renew deadline.
//! - [`metrics`]: Prometheus metrics; [`http`]: `/healthz`, `/readyz`, `/metrics`.

pub mod authn;
pub mod clusters;
pub mod control;
pub mod engine;
pub mod fanout;
pub mod freeze;
pub mod history;
pub mod http;
pub mod identity;
pub mod ingest;
pub mod leader;
pub mod ledger;
pub mod listed;
pub mod member_cache;
pub mod members;
pub mod metrics;
pub mod mirror;
pub mod reconciles;
mod rounds;
pub mod sessions;
pub mod tls;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use futures::StreamExt;
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, reflector, watcher},
};
use lockstep_api::{
    proto::control::v1::control_server::ControlServer,
    v1alpha1::{ConsistencyGroup, MemberCluster},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    engine::Engine,
    listed::Listed,
    metrics::Metrics,
    reconciles::{Reconciles, RunningReconcile},
    sessions::Sessions,
};

/// Start-up options (flags and environment).
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Kubeconfig of the hub cluster; in-cluster configuration (or $KUBECONFIG) when absent.
    #[arg(long, env = "LOCKSTEP_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// This hub's identity: mirrors in member clusters are labelled with it.
    #[arg(long, env = "LOCKSTEP_HUB_NAME", default_value = "hub")]
    pub hub_name: String,
    /// Where the gRPC Control service listens (sidecars dial it).
    #[arg(long, env = "LOCKSTEP_GRPC_LISTEN", default_value = "0.0.0.0:7443")]
    pub grpc_listen: SocketAddr,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    #[arg(long, env = "LOCKSTEP_HTTP_LISTEN", default_value = "0.0.0.0:8080")]
    pub http_listen: SocketAddr,
    /// How often every group is reconciled even when nothing changed (members resolved, mirrors written).
    #[arg(long, env = "LOCKSTEP_RESYNC_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub resync_interval: Duration,
    /// Run several replicas: only the holder of the leader Lease serves Control and writes.
    #[arg(long, env = "LOCKSTEP_LEADER_ELECTION")]
    pub leader_election: bool,
    /// The namespace of the leader Lease (Lockstep's namespace).
    #[arg(long, env = "LOCKSTEP_NAMESPACE", default_value = "lockstep")]
    pub namespace: String,
    /// This replica's identity in the leader Lease (the Pod's name).
    #[arg(long, env = "POD_NAME", default_value = "lockstep-operator")]
    pub identity: String,
    /// How long the leader Lease lasts without renewal: a standby takes over within it.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// How many sidecars (one gRPC session each, by node name) one member cluster may have subscribed at
    /// once: a further node is answered RESOURCE_EXHAUSTED, so one peer inventing node names cannot open
    /// sessions without limit.
    #[arg(long, env = "LOCKSTEP_MAX_SESSIONS_PER_CLUSTER", default_value_t = sessions::DEFAULT_SESSIONS_PER_CLUSTER)]
    pub max_sessions_per_cluster: usize,
    /// How many volumes one group may resolve to (its status counts them and its shards list them, so
    /// this bounds the operator's memory): a group that resolves to more is Degraded, says why, and
    /// never releases a freeze.
    #[arg(long, env = "LOCKSTEP_MAX_GROUP_VOLUMES", default_value_t = DEFAULT_MAX_GROUP_VOLUMES)]
    pub max_group_volumes: usize,
    /// TLS and authentication of the gRPC Control service.
    #[command(flatten)]
    pub control_security: ControlSecurity,
}

/// The default of [`Options::max_group_volumes`].
pub const DEFAULT_MAX_GROUP_VOLUMES: usize = 20_000;

/// TLS and authentication of the gRPC Control service: TLS with a certificate from files, and every
/// sidecar authenticated by its node's ServiceAccount token; plaintext only by an explicit opt-in.
#[derive(Debug, Clone, clap::Args)]
pub struct ControlSecurity {
    /// The Control service's serving certificate chain (PEM); read again whenever it changes on disk.
    #[arg(
        long,
        env = "LOCKSTEP_GRPC_TLS_CERT_FILE",
        requires = "grpc_tls_key_file"
    )]
    pub grpc_tls_cert_file: Option<PathBuf>,
    /// The private key (PEM, PKCS#8, PKCS#1 or SEC1) of the serving certificate.
    #[arg(
        long,
        env = "LOCKSTEP_GRPC_TLS_KEY_FILE",
        requires = "grpc_tls_cert_file"
    )]
    pub grpc_tls_key_file: Option<PathBuf>,
    /// INSECURE, for tests and for a migration from a release without TLS only: also serve plaintext
    /// connections (alone: only plaintext). Their messages are not authenticated: anyone who reaches
    /// the port can then report, acknowledge and subscribe as any node.
    #[arg(long, env = "LOCKSTEP_GRPC_INSECURE_PLAINTEXT")]
    pub grpc_insecure_plaintext: bool,
    /// The audience of the projected ServiceAccount tokens sidecars present.
    #[arg(long, env = "LOCKSTEP_TOKEN_AUDIENCE", default_value = identity::DEFAULT_AUDIENCE)]
    pub token_audience: String,
    /// The sidecars' ServiceAccount, as namespace:name, in every member cluster: only its tokens speak
    /// for a node (any Pod may ask for a token with any audience).
    #[arg(
        long,
        env = "LOCKSTEP_SIDECAR_SERVICE_ACCOUNT",
        default_value = "lockstep:lockstep-sidecar"
    )]
    pub sidecar_service_account: String,
    /// The longest lifetime (exp - iat) of a token taken; the chart projects them with 600 s.
    #[arg(long, env = "LOCKSTEP_TOKEN_MAX_LIFETIME", default_value = "10m", value_parser = parse_duration)]
    pub token_max_lifetime: Duration,
}

impl ControlSecurity {
    /// Plaintext only, unauthenticated: for tests that are not about security.
    pub fn insecure_plaintext() -> Self {
        Self {
            grpc_tls_cert_file: None,
            grpc_tls_key_file: None,
            grpc_insecure_plaintext: true,
            ..Self::tls(std::path::Path::new(""), std::path::Path::new(""))
        }
    }

    /// TLS with the certificate and key in these files (and no plaintext).
    pub fn tls(cert: &std::path::Path, key: &std::path::Path) -> Self {
        Self {
            grpc_tls_cert_file: Some(cert.to_path_buf()),
            grpc_tls_key_file: Some(key.to_path_buf()),
            grpc_insecure_plaintext: false,
            token_audience: identity::DEFAULT_AUDIENCE.to_owned(),
            sidecar_service_account: "lockstep:lockstep-sidecar".to_owned(),
            token_max_lifetime: Duration::from_secs(600),
        }
    }

    /// How the Control service is served; loads the certificate (a start-up error when it does not).
    fn transport(&self) -> anyhow::Result<tls::Transport> {
        match (&self.grpc_tls_cert_file, &self.grpc_tls_key_file) {
            (Some(cert), Some(key)) => {
                let certificate = Arc::new(tls::ReloadingCertificate::load(cert, key)?);
                if self.grpc_insecure_plaintext {
                    tracing::warn!(
                        "INSECURE: the gRPC Control service also accepts plaintext connections, whose messages are not authenticated (--grpc-insecure-plaintext): remove the flag once every sidecar dials with TLS"
                    );
                }
                Ok(tls::Transport::Tls {
                    config: certificate.server_config()?,
                    plaintext_too: self.grpc_insecure_plaintext,
                })
            }
            _ if self.grpc_insecure_plaintext => {
                tracing::warn!(
                    "INSECURE: the gRPC Control service runs without TLS and without authentication (--grpc-insecure-plaintext): anyone who reaches its port can report, acknowledge and subscribe as any node"
                );
                Ok(tls::Transport::Plaintext)
            }
            _ => anyhow::bail!(
                "the gRPC Control service needs a certificate: give --grpc-tls-cert-file and --grpc-tls-key-file (or, for tests and migration only, --grpc-insecure-plaintext)"
            ),
        }
    }
}

/// The name of the leader Lease.
pub const LEADER_LEASE: &str = "lockstep-operator-leader";

fn parse_duration(text: &str) -> Result<Duration, String> {
    lockstep_api::domain::parse_duration(text).map_err(|error| error.to_string())
}

/// A running operator.
#[derive(Debug)]
pub struct Operator {
    /// The address the gRPC Control service listens on.
    pub grpc_addr: SocketAddr,
    /// The address of the health and metrics endpoints.
    pub http_addr: SocketAddr,
    engine: Engine,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// Builds a client from a kubeconfig file, or the default configuration.
pub async fn client_from(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    let Some(path) = kubeconfig else {
        return Ok(Client::try_default().await?);
    };
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

impl Operator {
    /// Starts the operator against the hub `client`: reflectors, reconcile loop, member watches, the
    /// gRPC service and the HTTP endpoints.
    pub async fn start(client: Client, options: &Options) -> anyhow::Result<Self> {
        let transport = options.control_security.transport()?;
        let shutdown = CancellationToken::new();
        let metrics = Metrics::default();
        let sessions = Sessions::with_limit(options.max_sessions_per_cluster);
        let mut tasks = Vec::new();
        let leader = if options.leader_election {
            let election = leader::LeaderElection::new(
                client.clone(),
                &options.namespace,
                LEADER_LEASE,
                &options.identity,
                options.lease_duration,
            );
            let (leading, leader) = tokio::sync::watch::channel(false);
            // Aborting this task leaves the Lease to expire, as after a crash: a standby takes over
            // within the lease duration.
            tasks.push(tokio::spawn(election.run(leading)));
            let mut changes = leader.clone();
            let sessions = sessions.clone();
            let identity = options.identity.clone();
            tasks.push(spawn_until(&shutdown, async move {
                while changes.changed().await.is_ok() {
                    let leading = *changes.borrow_and_update();
                    tracing::info!(%identity, leading, "leadership changed");
                    if !leading {
                        // The sidecars reconnect, through the Service, to the replica that leads.
                        sessions.close_all();
                    }
                }
            }));
            leader
        } else {
            tokio::sync::watch::channel(true).1
        };

        let (groups, groups_writer) = reflector::store::<ConsistencyGroup>();
        let (member_clusters, clusters_writer) = reflector::store::<MemberCluster>();
        let (groups_listed, task) = Listed::watch(groups.clone());
        tasks.push(task);
        let (clusters_listed, task) = Listed::watch(member_clusters.clone());
        tasks.push(task);
        let engine = Engine::new(
            client.clone(),
            options,
            (groups.clone(), groups_listed.clone()),
            (member_clusters, clusters_listed),
            sessions,
            metrics.clone(),
            leader.clone(),
        );

        // What every reconcile may change for the connected sidecars: the clusters' memberships, and
        // directives whose send was lost. Each reconcile asks for it; asks made while it runs coalesce
        // into one more run. Run after each of hundreds of groups' reconciles, each pass over every group
        // made a freeze of many groups quadratic.
        let fan_out = Arc::new(tokio::sync::Notify::new());
        tasks.push(spawn_until(&shutdown, {
            let (engine, fan_out) = (engine.clone(), fan_out.clone());
            async move {
                loop {
                    fan_out.notified().await;
                    if engine.is_leader() {
                        // A group created or changed reaches the connected sidecars now.
                        control::push_memberships(&engine);
                        // Directives whose send was lost reach the nodes that have not acknowledged
                        // them.
                        engine.resend_unacknowledged();
                    }
                }
            }
        }));

        // The hub's groups: a reflector, and a reconcile as soon as one changes.
        let group_changes = {
            let engine = engine.clone();
            let stream = watcher(
                Api::<ConsistencyGroup>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff()
            .reflect(groups_writer)
            .applied_objects();
            let reconciles = Arc::new(Reconciles::default());
            async move {
                let mut stream = std::pin::pin!(stream);
                while let Some(change) = stream.next().await {
                    match change {
                        Ok(_) if !engine.is_leader() => {}
                        Ok(group) => {
                            let Some(uid) = group.metadata.uid.clone() else {
                                continue;
                            };
                            // One reconcile at a time per group; changes meanwhile wait, the latest wins.
                            let Some(group) = reconciles.offer(&uid, group) else {
                                continue;
                            };
                            let running = RunningReconcile::new(reconciles.clone(), uid);
                            let engine = engine.clone();
                            let fan_out = fan_out.clone();
                            tokio::spawn(async move {
                                let mut next = Some(group);
                                while let Some(group) = next {
                                    if let Err(error) = engine.reconcile(Arc::new(group)).await {
                                        tracing::warn!(%error, "reconcile failed");
                                    }
                                    fan_out.notify_one();
                                    next = running.next();
                                }
                            });
                        }
                        Err(error) => tracing::warn!(%error, "watching ConsistencyGroups"),
                    }
                }
            }
        };
        tasks.push(spawn_until(&shutdown, group_changes));
        let clusters_stream = watcher(
            Api::<MemberCluster>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(clusters_writer)
        .for_each(|_| futures::future::ready(()));
        tasks.push(spawn_until(&shutdown, clusters_stream));

        // The periodic reconcile of everything, which also (re)connects member clusters and their watches.
        tasks.push(spawn_until(
            &shutdown,
            rounds::resync_loop(engine.clone(), options.resync_interval),
        ));

        // Path 2: the gRPC Control service.
        let grpc_listener = tokio::net::TcpListener::bind(options.grpc_listen).await?;
        let grpc_addr = grpc_listener.local_addr()?;
        let service = ControlServer::new(control::ControlService::new(engine.clone()))
            .max_decoding_message_size(MAX_CONTROL_MESSAGE);
        tasks.push(tokio::spawn(serve_control(
            Arc::new(grpc_listener),
            transport,
            service,
            leader.clone(),
            shutdown.clone(),
        )));

        let http_listener = tokio::net::TcpListener::bind(options.http_listen).await?;
        let http_addr = http_listener.local_addr()?;
        tasks.push(tokio::spawn(http::serve(
            http_listener,
            metrics,
            groups_listed,
            leader,
            shutdown.clone(),
        )));

        tracing::info!(%grpc_addr, %http_addr, hub = %options.hub_name, "operator started");
        Ok(Self {
            grpc_addr,
            http_addr,
            engine,
            shutdown,
            tasks,
        })
    }

    /// The engine, for tests that look inside.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Stops every task at once, without the orderly shutdown (a crash, for tests): the sidecars'
    /// gRPC streams end as their connections would, and nothing is handed over.
    pub fn abort(self) {
        self.engine.sessions().close_all();
        self.engine.stop_shard_writers();
        for task in &self.tasks {
            task.abort();
        }
    }

    /// Stops every task and waits for them.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.engine.sessions().close_all();
        self.engine.stop_shard_writers();
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
    }
}

/// Serves the gRPC Control service on `listener` until `shutdown`. Each time this replica stops leading,
/// the server is shut down gracefully — an HTTP/2 GOAWAY on every connection, which close once their
/// calls end (the Subscribe streams were ended with the sessions) — and served again on the same
/// listener: the sidecars' clients connect anew, and the Service sends the new connections to the
/// replica that leads. Otherwise a sidecar's calls went on over its connection to the deposed replica,
/// each answered UNAVAILABLE.
async fn serve_control(
    listener: Arc<tokio::net::TcpListener>,
    transport: tls::Transport,
    service: ControlServer<control::ControlService>,
    leader: tokio::sync::watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    // The servers that are draining their connections: aborted with this task.
    let mut draining = tokio::task::JoinSet::new();
    loop {
        let generation = CancellationToken::new();
        let incoming = tls::incoming(Arc::clone(&listener), transport.clone(), generation.clone());
        let served = tonic::transport::Server::builder()
            .layer(tower::util::MapResponseLayer::new(
                resource_exhausted_for_oversized as fn(_) -> _,
            ))
            .add_service(service.clone())
            .serve_with_incoming_shutdown(incoming, generation.clone().cancelled_owned());
        draining.spawn(async move {
            if let Err(error) = served.await {
                tracing::error!(%error, "the gRPC Control service stopped");
            }
        });
        let mut leading = leader.clone();
        let deposed = async move {
            // Ends once this replica has led and then stopped leading; never without leader election.
            if leading.wait_for(|leads| *leads).await.is_err()
                || leading.wait_for(|leads| !*leads).await.is_err()
            {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => {
                generation.cancel();
                while draining.join_next().await.is_some() {}
                return;
            }
            () = deposed => {
                tracing::info!("no longer leading: closing every gRPC connection");
                generation.cancel();
            }
        }
        while draining.try_join_next().is_some() {}
    }
}

/// The largest Control message a sidecar may send (a node's report of every failure it holds is far
/// smaller): a larger one is answered RESOURCE_EXHAUSTED before it is decoded, so one peer cannot make the
/// operator hold megabytes, nor carry them into a status the API server would refuse.
pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;

/// tonic answers a message over the decoding limit with OUT_OF_RANGE; gRPC's status codes say
/// RESOURCE_EXHAUSTED for a message larger than the receiver accepts, which is what a sidecar is told.
/// Such an answer carries its status in the headers (trailers-only), where this rewrites it.
fn resource_exhausted_for_oversized(
    mut response: ::http::Response<tonic::body::Body>,
) -> ::http::Response<tonic::body::Body> {
    let headers = response.headers_mut();
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|status| status.as_bytes() == b"11");
    let too_large = headers
        .get("grpc-message")
        .and_then(|message| message.to_str().ok())
        .is_some_and(|message| {
            message.contains("message length too large")
                || message.contains("message%20length%20too%20large")
        });
    if out_of_range && too_large {
        headers.insert(
            "grpc-status",
            ::http::HeaderValue::from_static("8"), // RESOURCE_EXHAUSTED
        );
    }
    response
}

/// Aborts a task when dropped (a detached JoinHandle would let it run on).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn spawn_until<F>(shutdown: &CancellationToken, work: F) -> JoinHandle<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = work => {}
        }
    })
}

/// Runs the operator until SIGTERM or Ctrl-C.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let client = client_from(options.kubeconfig.as_deref()).await?;
    let operator = Operator::start(client, &options).await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
    operator.shutdown().await;
    Ok(())
}
