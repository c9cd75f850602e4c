//! Fault scenarios: what the tests in `tests/faults.rs` share. A [`Harness`] is a [`World`] with the real
//! control system — the operator in the hub and one sidecar per node — which it can kill (abort, with no
//! orderly shutdown) and start again; the dependent-write workload across the group's volumes; the
//! faults (links cut, a node cut off from both control paths, the gRPC path refused, a replicator
//! killed); and the end every scenario shares, [`Harness::finish`]: the consistency checker on the
//! secondaries, every acknowledged write on the primaries, the faults cleared, a resync back to
//! Replicating, and primaries and secondaries identical.
//!
//! Where the clusters come from is a [`Target`]: test API servers started for each scenario (the
//! default), or real clusters named by [`KUBECONFIGS_VAR`] (`east=/path,west=/path`). Faults that need
//! control of an API server are skipped on real clusters, with the reason ([`Skipped`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use lockstep_api::conditions;
use lockstep_api::domain::{Phase, Policy, Stage, condition};
use lockstep_api::v1alpha1::{ConsistencyGroup, MemberCluster};
use lockstep_checker::{
    CheckOptions, Layout, OnError, Source, Verdict, WorkloadHandle, WorkloadOptions,
};
use lockstep_operator::Operator;
use lockstep_replicator::linkcut::{LinkCut, LinkMode};
use lockstep_replicator::{Event, Primary, ReplMode, VolumeStatus};
use lockstep_sidecar::Sidecar;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::cluster::{ApiSource, ClusterError, SimCluster};
use crate::control::ControlError;
use crate::faults::LinkCutMode;
use crate::operated::{operator_options, sidecar_options, watch_group};
use crate::service::{Endpoint, ReadyService};
use crate::timeline::{Timeline, Watchdog};
use crate::world::{World, WorldError, WorldSpec};
use lockstep_kube::backend::Backend;

/// The environment variable naming real clusters' kubeconfigs: `east=/path/one,west=/path/two`.
pub const KUBECONFIGS_VAR: &str = "LOCKSTEP_E2E_KUBECONFIGS";
/// How long the control system may take to get somewhere (resolve, freeze, release, resync).
const DEADLINE: Duration = Duration::from_secs(60);
/// The leader Lease's duration when two operator replicas run ([`Setup::standby_operator`]).
pub const LEASE_DURATION: Duration = Duration::from_secs(3);

/// Why a scenario could not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// The world could not be built.
    #[error(transparent)]
    World(#[from] WorldError),
    /// A cluster failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// Watching the group failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The workload failed.
    #[error("workload: {0}")]
    Workload(Box<lockstep_checker::WorkloadError>),
    /// The workload did not get where it had to.
    #[error("workload: {0}")]
    Wait(Box<lockstep_checker::WaitError>),
    /// The layout is unusable.
    #[error("layout: {0}")]
    Layout(#[from] lockstep_checker::layout::LayoutError),
    /// The checker could not read the images.
    #[error("checker: {0}")]
    Check(#[from] lockstep_checker::CheckError),
    /// A component did not start.
    #[error("{what} did not start: {why}")]
    Start {
        /// Which.
        what: String,
        /// Why.
        why: String,
    },
    /// `LOCKSTEP_E2E_KUBECONFIGS` is malformed or does not name every cluster.
    #[error("{KUBECONFIGS_VAR}: {0}")]
    Target(String),
    /// A proxy or a file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// Something did not happen in time.
    #[error("{0} did not happen within {1:?}")]
    Timeout(String, Duration),
    /// The harness was asked for something it was not set up for.
    #[error("{0}")]
    Setup(String),
}

impl From<lockstep_checker::WorkloadError> for FaultError {
    fn from(e: lockstep_checker::WorkloadError) -> Self {
        FaultError::Workload(Box::new(e))
    }
}

impl From<lockstep_checker::WaitError> for FaultError {
    fn from(e: lockstep_checker::WaitError) -> Self {
        FaultError::Wait(Box::new(e))
    }
}

fn start_failed(what: impl Into<String>) -> impl FnOnce(String) -> FaultError {
    let what = what.into();
    move |why| FaultError::Start { what, why }
}

/// A scenario skipped on real clusters, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped(pub String);

/// Where the clusters come from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Target {
    /// A test API server per cluster, started by the scenario; every fault can be injected.
    #[default]
    TestServers,
    /// A real kube-apiserver (on its own etcd) per cluster, started by the scenario from the binaries
    /// `scripts/build-kube.sh` builds; every fault can be injected.
    RealServers,
    /// Real clusters, by name: the scenario creates its objects there under names of its own (a fresh
    /// namespace and group per run), and skips faults that need control of an API server.
    Kubeconfigs(BTreeMap<String, PathBuf>),
}

impl Target {
    /// [`KUBECONFIGS_VAR`] when set and not empty; else real API servers when `LOCKSTEP_APISERVER=kube`;
    /// test API servers otherwise.
    pub fn from_env() -> Result<Target, FaultError> {
        match std::env::var(KUBECONFIGS_VAR) {
            Ok(text) if !text.trim().is_empty() => Target::parse(&text),
            _ => match Backend::from_env().map_err(|e| FaultError::Target(e.to_string()))? {
                Backend::Kube => Ok(Target::RealServers),
                Backend::Test => Ok(Target::TestServers),
            },
        }
    }

    /// Parses `name=path,name=path`.
    pub fn parse(text: &str) -> Result<Target, FaultError> {
        let mut clusters = BTreeMap::new();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (name, path) = item
                .split_once('=')
                .ok_or_else(|| FaultError::Target(format!("{item:?} is not name=path")))?;
            clusters.insert(name.trim().to_owned(), PathBuf::from(path.trim()));
        }
        Ok(Target::Kubeconfigs(clusters))
    }

    /// Whether the API servers are real clusters' (which the suite cannot stop).
    pub fn is_real(&self) -> bool {
        matches!(self, Target::Kubeconfigs(_))
    }

    /// Points `spec` at the target: on real clusters, every cluster at its kubeconfig, and the
    /// namespace, volume handles (PersistentVolume names) and group renamed with a suffix of this run so
    /// that runs do not collide.
    /// Returns the suffix.
    fn apply(&self, spec: &mut WorldSpec) -> Result<Option<String>, FaultError> {
        let paths = match self {
            Target::TestServers => return Ok(None),
            Target::RealServers => {
                for cluster in &mut spec.clusters {
                    cluster.api_source = ApiSource::RealServer;
                }
                return Ok(None);
            }
            Target::Kubeconfigs(paths) => paths,
        };
        let suffix = run_suffix();
        for cluster in &mut spec.clusters {
            let path = paths.get(&cluster.name).ok_or_else(|| {
                FaultError::Target(format!("no kubeconfig for cluster {}", cluster.name))
            })?;
            cluster.api_source = ApiSource::Kubeconfig(path.clone());
            cluster.namespace = format!("{}-{suffix}", cluster.namespace);
            for v in &mut cluster.volumes {
                v.handle = format!("{}-{suffix}", v.handle);
            }
        }
        for member in &mut spec.group.spec.members {
            member.namespace = format!("{}-{suffix}", member.namespace);
        }
        let name = spec.group.metadata.name.clone().unwrap_or_default();
        spec.group.metadata.name = Some(format!("{name}-{suffix}"));
        Ok(Some(suffix))
    }
}

fn run_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{:06x}", (nanos ^ std::process::id()) & 0xff_ffff)
}

/// How the sidecars reach the operator's gRPC Control service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GrpcPath {
    /// At its listener.
    #[default]
    Open,
    /// At a port nothing listens on: every call is refused, so everything goes over the API servers.
    Refused,
}

/// What a scenario starts with.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The world; [`Setup::new`] takes the repository's example.
    pub world: WorldSpec,
    /// The group's policy.
    pub policy: Policy,
    /// How the sidecars reach the operator.
    pub grpc: GrpcPath,
    /// Clusters whose sidecar reaches both control paths (its API server, the operator's gRPC) through
    /// proxies that [`Harness::isolate`] cuts.
    pub proxied: Vec<String>,
    /// The sidecars' fail-safe interval.
    pub fail_safe_interval: Duration,
    /// Volumes that are not members of the group at the start (a claim that joins it later); the
    /// workload writes to them too.
    pub joining_later: Vec<String>,
    /// Writes acknowledged before [`Harness::start`] returns.
    pub writes_before_fault: u64,
    /// Two operator replicas with leader election instead of one: the first leads and reaches the hub
    /// through a proxy that [`Harness::blackhole_leader_hub`] silences; the sidecars dial both through a
    /// [`ReadyService`]. (Killing and restarting the operator is for one replica only.)
    pub standby_operator: bool,
    /// Member clusters reached only over gRPC (an edge cluster behind NAT): MemberCluster
    /// `paths: GrpcOnly` without a kubeconfig, the group's member named by its PVCs, and a sidecar without
    /// the API path that resolves those PVCs through its own API server.
    pub grpc_only: Vec<String>,
    /// The gRPC Control path as the chart sets it up: TLS (the sidecars verify the operator against a
    /// CA file) and every sidecar authenticated by its node's ServiceAccount token, verified against
    /// its MemberCluster's keys. Off: plaintext, unauthenticated (the scenarios about other things).
    pub secure: bool,
}

impl Setup {
    /// The repository's example (east: postgres-wal and postgres-data, west: reporting; 4 MiB volumes)
    /// with `policy`.
    pub fn new(policy: Policy) -> Result<Setup, FaultError> {
        Ok(Setup {
            world: WorldSpec::example(4 << 20)?,
            policy,
            grpc: GrpcPath::Open,
            proxied: Vec::new(),
            fail_safe_interval: Duration::from_secs(10),
            joining_later: Vec::new(),
            writes_before_fault: 150,
            standby_operator: false,
            grpc_only: Vec::new(),
            secure: false,
        })
    }
}

fn options_grpc_only(grpc_only: &[String], cluster: &str) -> bool {
    grpc_only.iter().any(|name| name == cluster)
}

/// Makes `cluster` a gRPC-only member of the world: no kubeconfig, `paths: GrpcOnly`, and its member of
/// the group named by PVCs (a hub cannot list a gRPC-only cluster's claims to match a selector).
fn make_grpc_only(world: &mut WorldSpec, cluster: &str) -> Result<(), FaultError> {
    let member_cluster = world
        .member_clusters
        .iter_mut()
        .find(|mc| mc.metadata.name.as_deref() == Some(cluster))
        .ok_or_else(|| FaultError::Setup(format!("no MemberCluster {cluster}")))?;
    if member_cluster.spec.local {
        return Err(FaultError::Setup(format!(
            "{cluster} is the hub: it cannot be gRPC-only"
        )));
    }
    member_cluster.spec.paths = lockstep_api::domain::ClusterPaths::GrpcOnly;
    member_cluster.spec.kubeconfig_secret_ref = None;
    let spec = world
        .clusters
        .iter()
        .find(|c| c.name == cluster)
        .ok_or_else(|| FaultError::Setup(format!("no cluster {cluster}")))?;
    let pvcs: Vec<String> = spec.volumes.iter().map(|v| v.pvc.clone()).collect();
    for member in &mut world.group.spec.members {
        if member.cluster == cluster && member.pvc_names.is_none() {
            member.pvc_names = Some(pvcs.clone());
            member.selector = None;
        }
    }
    Ok(())
}

/// One node's two control paths, through proxies that can be cut.
struct NodePaths {
    api: LinkCut,
    grpc: LinkCut,
}

/// What a scenario found at its end.
#[derive(Debug)]
pub struct Outcome {
    /// The checker on the secondaries, against the writes acknowledged when the first copy failed.
    pub secondaries: Verdict,
    /// The checker on the primaries once the workload stopped, requiring every acknowledged write:
    /// consistent means nothing acknowledged was lost.
    pub primaries: Verdict,
    /// The group once it was back to Replicating.
    pub resynced: ConsistencyGroup,
    /// Per group volume, where its primary and secondary differed at the end (`None`: identical).
    pub differences: Vec<(String, Option<u64>)>,
}

impl Outcome {
    /// Every promise kept: secondaries consistent, nothing acknowledged lost, copies identical.
    pub fn holds(&self) -> bool {
        self.secondaries.is_consistent()
            && self.primaries.is_consistent()
            && self.differences.iter().all(|(_, d)| d.is_none())
    }
}

/// A running scenario. Dropping it stops everything it started.
pub struct Harness {
    /// The clusters and the group.
    pub world: World,
    /// What happened, for failure messages.
    pub timeline: Timeline,
    target: Target,
    /// On real clusters, this run's suffix of names.
    suffix: Option<String>,
    operator: Option<Operator>,
    /// The second replica, standing by, with [`Setup::standby_operator`].
    standby: Option<Operator>,
    /// The first replica's route to the hub, with [`Setup::standby_operator`].
    leader_route: Option<LinkCut>,
    /// The Service in front of both replicas, with [`Setup::standby_operator`].
    service: Option<ReadyService>,
    /// Where the operator's gRPC listener is (kept across restarts), or the Service in front of the
    /// replicas: what the sidecars dial.
    grpc_addr: Option<SocketAddr>,
    grpc: GrpcPath,
    /// Clusters whose sidecars run without the API path.
    grpc_only: Vec<String>,
    fail_safe_interval: Duration,
    sidecars: Vec<Option<Sidecar>>,
    paths: BTreeMap<String, NodePaths>,
    events_tx: mpsc::UnboundedSender<(String, Event)>,
    events: mpsc::UnboundedReceiver<(String, Event)>,
    listeners: BTreeMap<String, tokio::task::AbortHandle>,
    listener_tasks: JoinSet<()>,
    workload: Option<WorkloadHandle>,
    stopped: Option<lockstep_checker::WorkloadReport>,
    run_id: u64,
    workload_volumes: Vec<String>,
    acked_at_failure: Option<Vec<u64>>,
    /// TLS and identities, with [`Setup::secure`].
    credentials: Option<crate::security::Credentials>,
    /// Ends the test process, with the timeline, if the scenario runs past its limit.
    _watchdog: Watchdog,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("world", &self.world)
            .field("target", &self.target)
            .field("operator", &self.operator.is_some())
            .field("workload_volumes", &self.workload_volumes)
            .finish_non_exhaustive()
    }
}

impl Harness {
    /// Builds the world on `target`, starts the operator and the sidecars, waits until the group has
    /// resolved every member and replicates, and starts the workload over the group's volumes. Each
    /// step is said on `timeline`.
    pub async fn start(
        mut setup: Setup,
        target: Target,
        timeline: Timeline,
    ) -> Result<Harness, FaultError> {
        let watchdog = Watchdog::from_env(&timeline);
        setup.world.group.spec.policy = setup.policy;
        for cluster in &setup.grpc_only {
            make_grpc_only(&mut setup.world, cluster)?;
        }
        let credentials = if setup.secure {
            let names: Vec<String> = setup
                .world
                .member_clusters
                .iter()
                .filter_map(|mc| mc.metadata.name.clone())
                .collect();
            let credentials = crate::security::Credentials::new(names.iter().map(String::as_str))?;
            for member_cluster in &mut setup.world.member_clusters {
                let name = member_cluster.metadata.name.clone().unwrap_or_default();
                member_cluster.spec.service_account_keys = credentials.jwks(&name);
            }
            Some(credentials)
        } else {
            None
        };
        let suffix = target.apply(&mut setup.world)?;
        if let Target::Kubeconfigs(_) = &target {
            forget_member_clusters(&setup.world).await?;
        }
        let world = World::start(setup.world, &timeline).await?;
        let (events_tx, events) = mpsc::unbounded_channel();
        let workload_volumes: Vec<String> = world
            .volumes()
            .map(|(_, v)| v.spec.handle.clone())
            .collect();
        let members = (workload_volumes.len() - setup.joining_later.len()) as u32;
        let sidecars = world.clusters.iter().map(|_| None).collect();
        let mut harness = Harness {
            world,
            timeline,
            target,
            suffix,
            operator: None,
            standby: None,
            leader_route: None,
            service: None,
            grpc_addr: None,
            grpc: setup.grpc,
            grpc_only: setup.grpc_only.clone(),
            fail_safe_interval: setup.fail_safe_interval,
            sidecars,
            paths: BTreeMap::new(),
            events_tx,
            events,
            listeners: BTreeMap::new(),
            listener_tasks: JoinSet::new(),
            workload: None,
            stopped: None,
            run_id: 0,
            workload_volumes,
            acked_at_failure: None,
            credentials,
            _watchdog: watchdog,
        };
        for name in harness.cluster_names() {
            harness.listen(&name)?;
        }
        if setup.standby_operator {
            harness.start_replicas().await?;
        } else {
            harness.start_operator().await?;
        }
        for name in &setup.proxied {
            harness.proxy_paths(name).await?;
        }
        for name in harness.cluster_names() {
            harness.start_sidecar(&name).await?;
        }
        harness
            .wait_group(
                "every member resolved, replicating in sync (ConsistentImage)",
                |g| {
                    g.status.as_ref().is_some_and(|s| {
                        s.member_count >= members
                            && s.phase == Some(Phase::Replicating)
                            && conditions::status_of(&s.conditions, condition::CONSISTENT_IMAGE)
                                == Some(true)
                    })
                },
            )
            .await?;
        harness.start_workload(setup.writes_before_fault).await?;
        Ok(harness)
    }

    /// The scenario's TLS and identities ([`Setup::secure`]).
    pub fn credentials(&self) -> Option<&crate::security::Credentials> {
        self.credentials.as_ref()
    }

    /// The scenario's TLS and identities, to rotate them.
    pub fn credentials_mut(&mut self) -> Option<&mut crate::security::Credentials> {
        self.credentials.as_mut()
    }

    /// Where the operator's gRPC Control service listens (or the Service in front of the replicas).
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_addr
    }

    /// Whether the clusters are real ones.
    pub fn on_real_clusters(&self) -> bool {
        self.target.is_real()
    }

    /// The reason a fault that stops an API server is skipped on real clusters.
    pub fn api_server_control(&self) -> Result<(), Skipped> {
        if self.on_real_clusters() {
            Err(Skipped(
                "stopping a member's API server needs control of it; the clusters are real ones"
                    .into(),
            ))
        } else {
            Ok(())
        }
    }

    fn cluster_names(&self) -> Vec<String> {
        self.world
            .clusters
            .iter()
            .map(|c| c.name().to_owned())
            .collect()
    }

    fn index(&self, cluster: &str) -> Result<usize, FaultError> {
        self.world
            .clusters
            .iter()
            .position(|c| c.name() == cluster)
            .ok_or_else(|| FaultError::Setup(format!("no cluster {cluster}")))
    }

    /// The cluster named `name`.
    pub fn cluster(&self, name: &str) -> Result<&SimCluster, FaultError> {
        Ok(&self.world.clusters[self.index(name)?])
    }

    /// The replication state of volume `handle` (as its primary sees it).
    pub fn volume_status(&self, handle: &str) -> Result<VolumeStatus, FaultError> {
        let (cluster, _) = self
            .world
            .find_volume(handle)
            .ok_or_else(|| FaultError::Setup(format!("no volume {handle}")))?;
        Ok(cluster.volume_status(handle)?)
    }

    /// The handle the scenario calls `name` (`east-postgres-data`): on real clusters handles carry this
    /// run's suffix.
    pub fn handle(&self, name: &str) -> Result<String, FaultError> {
        let handle = match &self.suffix {
            Some(suffix) => format!("{name}-{suffix}"),
            None => name.to_owned(),
        };
        self.world
            .find_volume(&handle)
            .map(|_| handle.clone())
            .ok_or_else(|| FaultError::Setup(format!("no volume {handle}")))
    }

    /// Forwards the replication events of `cluster`'s primary (again, after a restart).
    fn listen(&mut self, cluster: &str) -> Result<(), FaultError> {
        if let Some(old) = self.listeners.remove(cluster) {
            old.abort();
        }
        let mut rx = self.cluster(cluster)?.primary.subscribe();
        let tx = self.events_tx.clone();
        let name = cluster.to_owned();
        let handle = self.listener_tasks.spawn(async move {
            while let Ok(event) = rx.recv().await {
                if tx.send((name.clone(), event)).is_err() {
                    break;
                }
            }
        });
        self.listeners.insert(cluster.to_owned(), handle);
        Ok(())
    }

    // ---- the control system ----

    /// Starts an operator in the hub, on the gRPC port of the one before it (the sidecars dial that).
    pub async fn start_operator(&mut self) -> Result<(), FaultError> {
        let mut options = operator_options(self.world.hub().name());
        if let Some(addr) = self.grpc_addr {
            options.grpc_listen = addr;
        }
        if let Some(credentials) = &self.credentials {
            options.control_security = lockstep_operator::ControlSecurity::tls(
                &credentials.cert_file(),
                &credentials.key_file(),
            );
        }
        // A killed operator's listener closes as its task unwinds: retry the port briefly.
        let mut attempts = 0;
        let operator = loop {
            match Operator::start(self.world.hub().client.clone(), &options).await {
                Ok(operator) => break operator,
                Err(e) if attempts < 50 && self.grpc_addr.is_some() => {
                    tracing::debug!(error = %e, "operator port still taken");
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(start_failed("the operator")(e.to_string())),
            }
        };
        self.timeline.say(format!(
            "{}: operator started (gRPC Control at {})",
            self.world.hub().name(),
            operator.grpc_addr
        ));
        self.grpc_addr = Some(operator.grpc_addr);
        self.operator = Some(operator);
        Ok(())
    }

    /// Starts two operator replicas with leader election: the first, reaching the hub through a proxy,
    /// leads before the second starts; the sidecars dial a Service in front of both.
    async fn start_replicas(&mut self) -> Result<(), FaultError> {
        let hub = self.world.hub();
        let route = LinkCut::start(resolve(&hub.api_url).await?)
            .await
            .map_err(|source| FaultError::Io {
                what: "proxy to the hub".into(),
                source,
            })?;
        let replica = |identity: &str| {
            let mut options = operator_options(hub.name());
            options.leader_election = true;
            options.identity = identity.to_owned();
            options.lease_duration = LEASE_DURATION;
            options
        };
        let client = client_through(hub, route.addr()).await?;
        let first = Operator::start(client, &replica("operator-0"))
            .await
            .map_err(|e| start_failed("operator-0")(e.to_string()))?;
        let http = first.http_addr;
        poll_async("operator-0 leads", || async move {
            crate::service::ready(http).await.then_some(())
        })
        .await?;
        let second = Operator::start(hub.client.clone(), &replica("operator-1"))
            .await
            .map_err(|e| start_failed("operator-1")(e.to_string()))?;
        let endpoints = [&first, &second].map(|o| Endpoint {
            grpc: o.grpc_addr,
            http: o.http_addr,
        });
        let service = ReadyService::start(endpoints.to_vec())
            .await
            .map_err(|source| FaultError::Io {
                what: "the operator Service".into(),
                source,
            })?;
        self.timeline.say(format!(
            "{}: operator-0 leads (its route to the hub proxied), operator-1 stands by; the sidecars dial \
             both through a Service at {} that routes to the ready one",
            hub.name(),
            service.addr()
        ));
        self.grpc_addr = Some(service.addr());
        self.operator = Some(first);
        self.standby = Some(second);
        self.leader_route = Some(route);
        self.service = Some(service);
        Ok(())
    }

    /// The operator replica `index` (0: the first, 1: the standby of [`Setup::standby_operator`]).
    pub fn replica(&self, index: usize) -> Option<&Operator> {
        match index {
            0 => self.operator.as_ref(),
            1 => self.standby.as_ref(),
            _ => None,
        }
    }

    /// Silences the first replica's route to the hub (every byte dropped: its requests neither fail nor
    /// answer), or lets it through again.
    pub fn blackhole_leader_hub(&self, cut: bool) -> Result<(), FaultError> {
        let route = self
            .leader_route
            .as_ref()
            .ok_or_else(|| FaultError::Setup("no standby operator was set up".into()))?;
        route.set_mode(if cut {
            LinkMode::Blackhole
        } else {
            LinkMode::Pass
        });
        self.timeline.say(if cut {
            "fault: operator-0's route to the hub blackholed"
        } else {
            "fault cleared: operator-0 reaches the hub again"
        });
        Ok(())
    }

    /// Kills the operator: every task aborted at once, no orderly shutdown (its gRPC streams end as a
    /// dead process's connections would).
    pub fn kill_operator(&mut self) {
        if let Some(operator) = self.operator.take() {
            operator.abort();
            self.timeline.say("fault: operator killed");
        }
    }

    /// Starts `cluster`'s sidecar (through its proxies when it has them).
    pub async fn start_sidecar(&mut self, cluster: &str) -> Result<(), FaultError> {
        let i = self.index(cluster)?;
        let grpc_addr = self
            .grpc_addr
            .ok_or_else(|| FaultError::Setup("no operator started".into()))?;
        let c = &self.world.clusters[i];
        let socket = c
            .control_socket
            .clone()
            .ok_or_else(|| FaultError::Setup(format!("{cluster}: no replicator socket")))?;
        let paths = self.paths.get(cluster);
        let scheme = if self.credentials.is_some() {
            "https"
        } else {
            "http"
        };
        let endpoint = match (self.grpc, paths) {
            (GrpcPath::Refused, _) => format!("{scheme}://{}", refused_addr()?),
            (GrpcPath::Open, Some(p)) => format!("{scheme}://{}", p.grpc.addr()),
            (GrpcPath::Open, None) => format!("{scheme}://{grpc_addr}"),
        };
        let client = match paths {
            Some(p) => client_through(c, p.api.addr()).await?,
            None => c.client.clone(),
        };
        let mut options = sidecar_options(c, &socket, &endpoint);
        if let Some(credentials) = &self.credentials {
            options.insecure_plaintext_control = false;
            options.operator_ca_file = Some(credentials.ca_file());
            options.token_file = credentials.token_file(cluster, &c.spec.node)?;
        }
        options.fail_safe_interval = self.fail_safe_interval;
        options.no_api_path = options_grpc_only(&self.grpc_only, cluster);
        let sidecar = Sidecar::start(options, Some(client))
            .await
            .map_err(|e| start_failed(format!("{cluster}'s sidecar"))(e.to_string()))?;
        self.timeline.say(format!(
            "{cluster}: sidecar on {} started (operator {endpoint}{}{})",
            c.spec.node,
            if options_grpc_only(&self.grpc_only, cluster) {
                ", gRPC only"
            } else {
                ""
            },
            if paths.is_some() {
                ", both paths through cuttable proxies"
            } else {
                ""
            }
        ));
        self.sidecars[i] = Some(sidecar);
        Ok(())
    }

    /// Kills `cluster`'s sidecar: every task aborted at once.
    pub fn kill_sidecar(&mut self, cluster: &str) -> Result<(), FaultError> {
        let i = self.index(cluster)?;
        if let Some(sidecar) = self.sidecars[i].take() {
            sidecar.abort();
            self.timeline
                .say(format!("fault: {cluster}'s sidecar killed"));
        }
        Ok(())
    }

    /// How many `kind` calls (`suspend`, `release`, `resume`, `configure`) `cluster`'s sidecar made to its
    /// replicator that failed even after the sidecar's retries (0 while no sidecar runs there).
    pub fn replicator_calls_failed(&self, cluster: &str, kind: &str) -> Result<u64, FaultError> {
        self.sidecar_count(cluster, |metrics| {
            metrics
                .replicator_calls
                .get_or_create(&lockstep_sidecar::metrics::PathLabels {
                    path: kind.to_owned(),
                    state: "error".to_owned(),
                })
                .get()
        })
    }

    /// How many times `cluster`'s sidecar saw a secondary fail to keep the frozen image for `reason`
    /// (its `kept_image_failures` metric; 0 while no sidecar runs there).
    pub fn kept_image_failures(&self, cluster: &str, reason: &str) -> Result<u64, FaultError> {
        self.sidecar_count(cluster, |metrics| {
            metrics
                .kept_image_failures
                .get_or_create(&lockstep_sidecar::metrics::ReasonLabels {
                    reason: reason.to_owned(),
                })
                .get()
        })
    }

    /// A counter of `cluster`'s sidecar's metrics, read by `read` (0 while no sidecar runs there).
    fn sidecar_count(
        &self,
        cluster: &str,
        read: impl Fn(&lockstep_sidecar::metrics::Metrics) -> u64,
    ) -> Result<u64, FaultError> {
        let i = self.index(cluster)?;
        Ok(self.sidecars[i]
            .as_ref()
            .map_or(0, |sidecar| read(sidecar.metrics())))
    }

    /// Puts proxies (link-cut proxies, like the replication links') between `cluster`'s sidecar and its
    /// API server, and between it and the operator's gRPC listener.
    async fn proxy_paths(&mut self, cluster: &str) -> Result<(), FaultError> {
        let c = self.cluster(cluster)?;
        let api_addr = resolve(&c.api_url).await?;
        let grpc_addr = self
            .grpc_addr
            .ok_or_else(|| FaultError::Setup("no operator started".into()))?;
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| FaultError::Io { what, source }
        };
        let api = LinkCut::start(api_addr)
            .await
            .map_err(io("proxy to the API server"))?;
        let grpc = LinkCut::start(grpc_addr)
            .await
            .map_err(io("proxy to the operator"))?;
        self.paths
            .insert(cluster.to_owned(), NodePaths { api, grpc });
        Ok(())
    }

    /// Cuts `cluster`'s node off from both control paths (connections reset), or lets it through again.
    pub fn isolate(&self, cluster: &str, cut: bool) -> Result<(), FaultError> {
        let paths = self
            .paths
            .get(cluster)
            .ok_or_else(|| FaultError::Setup(format!("{cluster}'s paths are not proxied")))?;
        let mode = if cut { LinkMode::Reset } else { LinkMode::Pass };
        paths.api.set_mode(mode);
        paths.grpc.set_mode(mode);
        self.timeline.say(if cut {
            format!("fault: {cluster}'s node cut off from its API server and from the operator")
        } else {
            format!("fault cleared: {cluster}'s node reaches its API server and the operator again")
        });
        Ok(())
    }

    // ---- the replicator ----

    /// Kills `cluster`'s replicator: its tasks and connections dropped at once, nothing flushed beyond
    /// what it had persisted. Returns once none of its volumes is alive any more.
    pub async fn kill_replicator(&mut self, cluster: &str) -> Result<(), FaultError> {
        let i = self.index(cluster)?;
        let c = &self.world.clusters[i];
        let volumes: Vec<Weak<lockstep_replicator::Volume>> = c
            .volumes
            .iter()
            .filter_map(|v| c.primary.volume(&v.spec.handle))
            .map(Arc::downgrade)
            .collect();
        // An idle primary stands in until the restart, so the cluster always has one.
        let placeholder = Primary::start(lockstep_replicator::PrimaryConfig {
            volumes: Vec::new(),
            nbd_listen: Some(([127, 0, 0, 1], 0).into()),
            nbd_socket: None,
            record_latency: false,
            control_socket: None,
        })
        .await
        .map_err(|e| start_failed("a placeholder primary")(e.to_string()))?;
        drop(std::mem::replace(
            &mut self.world.clusters[i].primary,
            placeholder,
        ));
        self.timeline
            .say(format!("fault: {cluster}'s replicator killed"));
        poll(&format!("{cluster}'s replicator gone"), || {
            volumes.iter().all(|v| v.upgrade().is_none()).then_some(())
        })
        .await
    }

    /// Starts `cluster`'s replicator again with the same volumes (their data and persisted state).
    pub async fn restart_replicator(&mut self, cluster: &str) -> Result<(), FaultError> {
        let i = self.index(cluster)?;
        let config = self.world.clusters[i].primary_config.clone();
        let primary = Primary::start(config)
            .await
            .map_err(|e| start_failed(format!("{cluster}'s replicator"))(e.to_string()))?;
        self.world.clusters[i].primary = primary;
        self.listen(cluster)?;
        self.timeline
            .say(format!("{cluster}: replicator started again"));
        Ok(())
    }

    /// Kills `cluster`'s secondary (the remote site's replicator): its listener and every replication
    /// connection end at once (see [`lockstep_replicator::secondary::Secondary::kill`]); its files stay.
    pub async fn kill_secondary(&mut self, cluster: &str) -> Result<(), FaultError> {
        let i = self.index(cluster)?;
        self.world.clusters[i].secondary.kill().await;
        self.timeline
            .say(format!("fault: {cluster}'s secondary killed"));
        Ok(())
    }

    /// Starts `cluster`'s secondary again on its address and directory (its volumes and undo logs).
    pub async fn restart_secondary(&mut self, cluster: &str) -> Result<(), FaultError> {
        let i = self.index(cluster)?;
        let c = &self.world.clusters[i];
        let config = lockstep_replicator::secondary::SecondaryConfig {
            listen: c.secondary.local_addr(),
            dir: c.dir.join("secondary"),
            security: c.secondary_security.clone(),
        };
        let secondary = lockstep_replicator::secondary::Secondary::start(config)
            .await
            .map_err(|e| start_failed(format!("{cluster}'s secondary"))(e.to_string()))?;
        self.world.clusters[i].secondary = secondary;
        self.timeline
            .say(format!("{cluster}: secondary started again"));
        Ok(())
    }

    // ---- workload and faults ----

    async fn start_workload(&mut self, writes: u64) -> Result<(), FaultError> {
        let volumes = self.workload_volumes.len() as u32;
        let layout = Layout::with_span(volumes, 3, 2.min(volumes), 64, 0)?;
        let mut options = WorkloadOptions::new(layout, None);
        options.on_error = OnError::Retry;
        options.retry_backoff = Duration::from_millis(20);
        options.flush_at_end = false;
        self.run_id = options.run_id;
        let addresses = self
            .workload_volumes
            .iter()
            .filter_map(|h| self.world.find_volume(h).map(|(_, v)| v.nbd.clone()))
            .collect();
        let mut workload = WorkloadHandle::spawn(addresses, options);
        workload.wait_for_acked(writes, DEADLINE).await?;
        self.timeline.say(format!(
            "workload: 3 lanes over {}; {} writes acknowledged",
            self.workload_volumes.join(", "),
            workload.current().acked
        ));
        self.workload = Some(workload);
        Ok(())
    }

    fn workload(&mut self) -> Result<&mut WorkloadHandle, FaultError> {
        self.workload
            .as_mut()
            .ok_or_else(|| FaultError::Setup("the workload is not running".into()))
    }

    /// Stops the workload (its in-flight writes cancelled), so that the secondaries stand still for the
    /// checker even where volumes still replicate.
    pub async fn stop_workload(&mut self) -> Result<(), FaultError> {
        if let Some(workload) = self.workload.take() {
            let report = workload.stop_and_join().await?;
            self.timeline.say(format!("workload stopped: {report}"));
            self.stopped = Some(report);
        }
        Ok(())
    }

    /// Writes acknowledged so far, all lanes together.
    pub fn acked(&self) -> u64 {
        self.workload.as_ref().map_or(0, |w| w.current().acked)
    }

    /// Waits until `more` writes beyond those acknowledged now are acknowledged.
    pub async fn wait_for_more_writes(&mut self, more: u64) -> Result<(), FaultError> {
        let target = self.acked() + more;
        self.workload()?.wait_for_acked(target, DEADLINE).await?;
        Ok(())
    }

    /// Cuts the replication links of `volumes` (names as in the example) at once.
    pub fn cut(&self, volumes: &[&str], how: LinkCutMode) -> Result<(), FaultError> {
        for name in volumes {
            let handle = self.handle(name)?;
            let (cluster, _) = self
                .world
                .find_volume(&handle)
                .ok_or_else(|| FaultError::Setup(format!("no volume {handle}")))?;
            cluster.cut_link(&handle, how)?;
            self.timeline.say(format!(
                "fault: replication link of {handle} ({}) {how}",
                cluster.name()
            ));
        }
        Ok(())
    }

    /// Waits for the first failed copy and notes what the workload had acknowledged then: every one of
    /// those writes was copied, so the secondaries must reach them.
    pub async fn wait_for_copy_failure(&mut self) -> Result<String, FaultError> {
        let failed = tokio::time::timeout(DEADLINE, async {
            while let Some((cluster, event)) = self.events.recv().await {
                if let Event::CopyFailed(f) = event {
                    return Some((cluster, f));
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| FaultError::Timeout("a failed copy".into(), DEADLINE))?;
        let (cluster, f) = failed;
        let acked = self
            .workload
            .as_ref()
            .map(|w| w.current().last_acked)
            .unwrap_or_default();
        self.timeline.say(format!(
            "{cluster}: CopyFailed: volume {}, write #{}: {}; acknowledged per lane: {acked:?}",
            f.volume, f.sequence, f.error
        ));
        self.acked_at_failure.get_or_insert(acked);
        Ok(f.volume)
    }

    /// Polls the hub's group until `goal` holds.
    pub async fn wait_group(
        &self,
        what: &'static str,
        goal: impl Fn(&ConsistencyGroup) -> bool,
    ) -> Result<ConsistencyGroup, FaultError> {
        Ok(watch_group(&self.world, &self.timeline, what, DEADLINE, goal).await?)
    }

    /// Polls volume `name`'s replication state until `goal` holds.
    pub async fn wait_volume(
        &self,
        name: &str,
        what: &str,
        goal: impl Fn(&VolumeStatus) -> bool,
    ) -> Result<VolumeStatus, FaultError> {
        let handle = self.handle(name)?;
        let status = poll(&format!("{handle} {what}"), || {
            self.volume_status(&handle).ok().filter(|s| goal(s))
        })
        .await?;
        self.timeline.say(format!(
            "{handle}: {} at epoch {} ({} writes held)",
            crate::control::mode_words_of(&status.replication.mode),
            status.replication.epoch,
            status.replication.held
        ));
        Ok(status)
    }

    /// Waits until `cluster`'s volumes hold at least one write between them.
    pub async fn wait_held(&self, cluster: &str) -> Result<usize, FaultError> {
        let c = self.cluster(cluster)?;
        let held = poll(&format!("{cluster} holding a write"), || {
            let held: usize = c
                .volumes
                .iter()
                .filter_map(|v| c.volume_status(&v.spec.handle).ok())
                .map(|s| s.replication.held)
                .sum();
            (held > 0).then_some(held)
        })
        .await?;
        self.timeline.say(format!("{cluster}: {held} writes held"));
        Ok(held)
    }

    /// Merge-patches the group's spec (a person's intent).
    pub async fn patch_spec(&self, spec: serde_json::Value) -> Result<(), FaultError> {
        let patch = json!({ "spec": spec });
        Api::<ConsistencyGroup>::all(self.world.hub().client.clone())
            .patch(
                &self.world.group_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|source| ClusterError::Kube {
                cluster: self.world.hub().name().to_owned(),
                what: format!("patching the spec of cg {}", self.world.group_name),
                source,
            })?;
        self.timeline.say(format!(
            "kubectl patch cg {} --type merge -p '{patch}'",
            self.world.group_name
        ));
        Ok(())
    }

    /// Sets labels on claim `pvc` of `cluster` (how a claim joins a group by selector).
    pub async fn label_claim(
        &self,
        cluster: &str,
        pvc: &str,
        labels: serde_json::Value,
    ) -> Result<(), FaultError> {
        let c = self.cluster(cluster)?;
        Api::<PersistentVolumeClaim>::namespaced(c.client.clone(), &c.spec.namespace)
            .patch(
                pvc,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": labels}})),
            )
            .await
            .map_err(|source| ClusterError::Kube {
                cluster: cluster.to_owned(),
                what: format!("labelling pvc {pvc}"),
                source,
            })?;
        self.timeline
            .say(format!("{cluster}: pvc {pvc} labelled {labels}"));
        Ok(())
    }

    /// Stops the workload and runs the checker on the primaries, requiring every acknowledged write:
    /// consistent means nothing acknowledged was lost.
    pub async fn stop_workload_and_check_primaries(&mut self) -> Result<Verdict, FaultError> {
        self.stop_workload().await?;
        let report = self
            .stopped
            .take()
            .ok_or_else(|| FaultError::Setup("the workload never ran".into()))?;
        let primaries = lockstep_checker::check_sources(
            &self.sources(|v| v.primary_source()),
            &CheckOptions::lanes(report.last_acked.clone()).run(self.run_id),
        )
        .await?;
        self.timeline.say(format!(
            "checker on the primaries (every acknowledged write): {}",
            primaries.to_string().trim_end()
        ));
        Ok(primaries)
    }

    /// The checker on the secondaries now, against the writes acknowledged at the first failed copy.
    pub async fn check_secondaries(&self) -> Result<Verdict, FaultError> {
        let acked = self
            .acked_at_failure
            .clone()
            .ok_or_else(|| FaultError::Setup("no copy has failed yet".into()))?;
        let sources = self.sources(|v| v.secondary_source());
        let verdict =
            lockstep_checker::check_sources(&sources, &CheckOptions::lanes(acked).run(self.run_id))
                .await?;
        self.timeline.say(format!(
            "checker on the secondaries: {}",
            verdict.to_string().trim_end()
        ));
        Ok(verdict)
    }

    fn sources(&self, which: impl Fn(&crate::cluster::SimVolume) -> Source) -> Vec<Source> {
        self.workload_volumes
            .iter()
            .filter_map(|h| self.world.find_volume(h).map(|(_, v)| which(v)))
            .collect()
    }

    /// The end every scenario shares: the checker on the secondaries; the workload stopped and every
    /// acknowledged write checked on the primaries; links and paths restored; `spec.resync.epoch` set
    /// to the current epoch unless the group already replicates; Replicating again, and every group
    /// volume's primary and secondary identical. The control system is shut down after.
    pub async fn finish(mut self) -> Result<Outcome, FaultError> {
        let secondaries = self.check_secondaries().await?;
        let primaries = self.stop_workload_and_check_primaries().await?;
        for c in &self.world.clusters {
            for v in &c.volumes {
                if !c.link_is_up(&v.spec.handle)? {
                    c.restore_link(&v.spec.handle)?;
                }
            }
        }
        for paths in self.paths.values() {
            paths.api.set_mode(LinkMode::Pass);
            paths.grpc.set_mode(LinkMode::Pass);
        }
        if let Some(route) = &self.leader_route {
            route.set_mode(LinkMode::Pass);
        }
        let group_volumes = self.group_volume_count();
        // Back means what a person would check: Replicating at a Resume, every member there, and the
        // ConsistentImage condition True (it can trail the phase by a report: a member's state report
        // from the resync may land after its acknowledgement of the resume).
        let back = |g: &ConsistencyGroup| {
            g.status.as_ref().is_some_and(|s| {
                s.phase == Some(Phase::Replicating)
                    && s.members.len() >= group_volumes
                    && g.position().1 == Stage::Resume
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "ConsistentImage" && c.status == "True")
            })
        };
        let mut resynced = self.world.group_with_volumes().await?;
        // A failure reported late (after the resync began) freezes the group again at a higher epoch:
        // safe, and said on the timeline; the resync is then asked for at that epoch.
        for _ in 0..3 {
            if back(&resynced) {
                break;
            }
            let (epoch, _) = resynced.position();
            self.patch_spec(json!({"resync": {"epoch": epoch}})).await?;
            resynced = self
                .wait_group("back to Replicating, every member in sync", |g| {
                    back(g)
                        || (g.position().0 > epoch && g.position().1 == Stage::Release)
                        || (g.position().0 > epoch
                            && g.status.as_ref().and_then(|s| s.phase) == Some(Phase::Frozen))
                })
                .await?;
            if !back(&resynced) {
                self.timeline.say(format!(
                    "the group froze again at epoch {} during the resync",
                    resynced.position().0
                ));
            }
        }
        let mut differences = Vec::new();
        for (_, v) in self.world.volumes() {
            let identical = poll_async(&format!("{} identical", v.spec.handle), || async move {
                lockstep_checker::first_difference(&v.primary_source(), &v.secondary_source())
                    .await
                    .ok()
                    .flatten()
                    .is_none()
                    .then_some(())
            })
            .await;
            let diff = match identical {
                Ok(()) => None,
                Err(_) => {
                    lockstep_checker::first_difference(&v.primary_source(), &v.secondary_source())
                        .await?
                }
            };
            self.timeline.say(match diff {
                None => format!(
                    "{}: primary and secondary identical, byte for byte",
                    v.spec.handle
                ),
                Some(at) => format!(
                    "{}: primary and secondary differ from byte {at}",
                    v.spec.handle
                ),
            });
            differences.push((v.spec.handle.clone(), diff));
        }
        self.shutdown().await;
        Ok(Outcome {
            secondaries,
            primaries,
            resynced,
            differences,
        })
    }

    fn group_volume_count(&self) -> usize {
        self.world.volumes().count()
    }

    /// Stops the sidecars and the operator (in order), and on real clusters deletes what the scenario
    /// created there.
    pub async fn shutdown(&mut self) {
        if self.on_real_clusters()
            && let Err(e) = self.delete_created().await
        {
            self.timeline
                .say(format!("cleaning up the real clusters: {e}"));
        }
        for sidecar in self.sidecars.iter_mut().filter_map(Option::take) {
            sidecar.shutdown().await;
        }
        for operator in [self.operator.take(), self.standby.take()]
            .into_iter()
            .flatten()
        {
            operator.shutdown().await;
        }
        self.service = None;
        self.listener_tasks.abort_all();
    }

    /// On real clusters: the group (its finalizer runs while the operator still does), then each
    /// cluster's claims, volumes and namespace.
    async fn delete_created(&self) -> Result<(), FaultError> {
        let hub = self.world.hub();
        let kube_err = |cluster: &str, what: String| {
            let cluster = cluster.to_owned();
            move |source| ClusterError::Kube {
                cluster,
                what,
                source,
            }
        };
        let groups = Api::<ConsistencyGroup>::all(hub.client.clone());
        let dp = DeleteParams::default();
        if let Err(e) = groups.delete(&self.world.group_name, &dp).await {
            self.timeline.say(format!("deleting the group: {e}"));
        }
        let (groups, name) = (&groups, &self.world.group_name);
        poll_async("the group deleted", || async move {
            matches!(groups.get_opt(name).await, Ok(None)).then_some(())
        })
        .await?;
        for c in &self.world.clusters {
            let claims =
                Api::<PersistentVolumeClaim>::namespaced(c.client.clone(), &c.spec.namespace);
            let volumes = Api::<PersistentVolume>::all(c.client.clone());
            for v in &c.volumes {
                let _ = claims.delete(&v.spec.pvc, &dp).await;
                volumes
                    .delete(&format!("pv-{}", v.spec.handle), &dp)
                    .await
                    .map_err(kube_err(c.name(), format!("deleting pv-{}", v.spec.handle)))?;
            }
            let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(c.client.clone());
            namespaces
                .delete(&c.spec.namespace, &dp)
                .await
                .map_err(kube_err(
                    c.name(),
                    format!("deleting ns {}", c.spec.namespace),
                ))?;
        }
        Ok(())
    }
}

/// On real clusters, the MemberClusters (and kubeconfig Secrets) of an earlier run are replaced.
async fn forget_member_clusters(spec: &WorldSpec) -> Result<(), FaultError> {
    let Some(hub) = spec.clusters.first() else {
        return Ok(());
    };
    let ApiSource::Kubeconfig(path) = &hub.api_source else {
        return Ok(());
    };
    let file = kube::config::Kubeconfig::read_from(path)
        .map_err(|e| FaultError::Target(format!("{}: {e}", path.display())))?;
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .map_err(|e| FaultError::Target(format!("{}: {e}", path.display())))?;
    let client = kube::Client::try_from(config).map_err(|e| FaultError::Target(format!("{e}")))?;
    let dp = DeleteParams::default();
    for mc in &spec.member_clusters {
        let name = mc.metadata.name.clone().unwrap_or_default();
        let _ = Api::<MemberCluster>::all(client.clone())
            .delete(&name, &dp)
            .await;
        if let Some(secret) = &mc.spec.kubeconfig_secret_ref {
            let _ = Api::<Secret>::namespaced(client.clone(), &secret.namespace)
                .delete(&secret.name, &dp)
                .await;
        }
    }
    Ok(())
}

/// A loopback address nothing listens on.
fn refused_addr() -> Result<SocketAddr, FaultError> {
    let io = |source| FaultError::Io {
        what: "finding a free port".into(),
        source,
    };
    std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(io)?
        .local_addr()
        .map_err(io)
}

/// The socket address of an API server URL (`scheme://host[:port][/path]`).
async fn resolve(url: &str) -> Result<SocketAddr, FaultError> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
    let authority = rest.split('/').next().unwrap_or_default();
    let default_port = if scheme == "http" { 80 } else { 443 };
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (
            host,
            port.parse()
                .map_err(|e| FaultError::Setup(format!("API server URL {url}: {e}")))?,
        ),
        _ => (authority, default_port),
    };
    let host = host.trim_matches(['[', ']']);
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| FaultError::Io {
            what: format!("resolving {url}"),
            source,
        })?
        .next()
        .ok_or_else(|| FaultError::Setup(format!("{url} resolves to no address")))
}

/// A client of `cluster`'s API server through the proxy at `proxy` (TLS still checked against the
/// server's own name).
async fn client_through(
    cluster: &SimCluster,
    proxy: SocketAddr,
) -> Result<kube::Client, FaultError> {
    let failed =
        |e: String| FaultError::Setup(format!("{}: a client through a proxy: {e}", cluster.name()));
    let file = kube::config::Kubeconfig::read_from(&cluster.kubeconfig)
        .map_err(|e| failed(e.to_string()))?;
    let mut config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .map_err(|e| failed(e.to_string()))?;
    let scheme = config
        .cluster_url
        .scheme_str()
        .unwrap_or("https")
        .to_owned();
    if scheme == "https" && config.tls_server_name.is_none() {
        config.tls_server_name = config.cluster_url.host().map(str::to_owned);
    }
    config.cluster_url = match format!("{scheme}://{proxy}").parse() {
        Ok(uri) => uri,
        Err(e) => return Err(failed(format!("{e}"))),
    };
    kube::Client::try_from(config).map_err(|e| failed(e.to_string()))
}

/// Polls `check` every 20 ms until it answers, for up to [`DEADLINE`].
async fn poll<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> Result<T, FaultError> {
    poll_async(what, || std::future::ready(check())).await
}

/// Polls `check` every 20 ms until it answers, for up to [`DEADLINE`] (the workspace's one polling
/// loop, `lockstep_replicator::testing::poll_until`).
async fn poll_async<T, F>(what: &str, check: impl FnMut() -> F) -> Result<T, FaultError>
where
    F: std::future::Future<Output = Option<T>>,
{
    lockstep_replicator::testing::poll_until(what, DEADLINE, check)
        .await
        .map_err(|timed_out| FaultError::Timeout(timed_out.what, timed_out.within))
}

/// Whether `status` is suspended at `epoch`.
pub fn suspended_at(status: &VolumeStatus, epoch: u64) -> bool {
    matches!(status.replication.mode, ReplMode::Suspended { epoch: e, .. } if e == epoch)
}
