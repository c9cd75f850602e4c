//! Lockstep end to end: simulated clusters, fault injection, scenarios and the demo.
//!
//! - [`cluster`]: a simulated member cluster — a test API server with Lockstep's CRDs, a namespace, a
//!   node, and real replicated volumes (replicator primary over NBD, link-cut proxy, secondary) with
//!   their PersistentVolumes and bound claims;
//! - [`world`]: several clusters, the first the hub, with MemberClusters and a ConsistencyGroup applied;
//! - [`faults`]: replication links cut and restored, API servers stopped and started;
//! - [`control`]: the [`control::ControlSystem`] seam, and the demo freezing the replicators itself
//!   through their gRPC service ([`control::ManualFreeze`], `--control demo`);
//! - [`operated`]: the real control system — the operator in the hub and a sidecar per node
//!   ([`operated::OperatorControl`], the demo's default);
//! - [`scenario`]: the fault scenarios' harness (`tests/faults.rs`), on test API servers or real clusters;
//! - [`service`]: a Service in front of operator replicas, routing new connections to the ready one;
//! - [`demo`]: the scenario: workload, cut, freeze, checker verdict, link restored;
//! - [`observe`]: the sidecars' API path as the scenario sees it (ReplicationNode changes, stamped);
//! - [`timeline`], [`kubectl`]: what the demo prints, and the real kubectl it runs;
//! - [`freeze_bench`]: the freeze benchmark (binary `lockstep-freeze-bench`).
//!
//! The binary `lockstep-demo` only parses flags and calls [`run`], so tests run the same scenario
//! in-process.

pub mod cluster;
pub mod control;
pub mod demo;
pub mod faults;
pub mod freeze_bench;
pub mod kubectl;
pub mod observe;
pub mod operated;
pub mod scenario;
pub mod security;
pub mod service;
pub mod timeline;
pub mod world;

use control::{ManualFreeze, ReplicatorApi};
use demo::ScenarioOptions;
use faults::{ControlPathFault, LinkCutMode};
use timeline::Timeline;

/// Flags of `lockstep-demo`; the defaults are the embedded example.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Simulated clusters (2 to 8); the first is the hub. 2 with 3 volumes is the repository's example
    /// (east and west); any other shape is generated alike.
    #[arg(long, default_value_t = world::EXAMPLE_CLUSTERS)]
    pub clusters: usize,
    /// Replicated volumes in total, spread over the clusters (at least one per cluster).
    #[arg(long, default_value_t = world::EXAMPLE_VOLUMES)]
    pub volumes: usize,
    /// The volume whose replication link is cut (default: the hub's second volume, east-postgres-data in
    /// the example).
    #[arg(long)]
    pub cut: Option<String>,
    /// The fault injected.
    #[arg(long, value_enum, default_value_t = FaultFlag::LinkCut)]
    pub fault: FaultFlag,
    /// Concurrent dependent-write chains of the workload.
    #[arg(long, default_value_t = 3)]
    pub lanes: u32,
    /// Size of every volume, in MiB.
    #[arg(long, default_value_t = 16)]
    pub volume_mib: u64,
    /// Who freezes: the operator and sidecars, or the demo itself (through the replicators' gRPC
    /// service, in the operator's order).
    #[arg(long, value_enum, default_value_t = ControlFlag::Operator)]
    pub control: ControlFlag,
    /// The group's policy (the example's is freeze-and-go).
    #[arg(long, value_enum, default_value_t = PolicyFlag::FreezeAndGo)]
    pub policy: PolicyFlag,
    /// The clusters' API servers: `test`, the embedded test API server (starts in milliseconds), or
    /// `kube`, a real kube-apiserver on etcd per cluster, built from source at the pinned version
    /// (`./scripts/demo.sh` builds them on first use, a few minutes).
    #[arg(long, value_enum, default_value_t = ApiServerFlag::Test)]
    pub apiserver: ApiServerFlag,
}

/// `--apiserver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ApiServerFlag {
    /// The embedded test API server.
    Test,
    /// Real kube-apiserver and etcd.
    Kube,
}

/// `--fault`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultFlag {
    /// The replication link's connections are reset: the primary sees the failure at once.
    LinkCut,
    /// Every byte on the replication link is dropped: the copy fails at its timeout (2 s).
    LinkBlackhole,
    /// The link is cut and the last member cluster's API server is stopped: that member freezes over
    /// gRPC only.
    ApiDown,
    /// The link is cut and the sidecars' gRPC path to the operator is down: every member freezes
    /// through the API servers.
    GrpcDown,
}

impl FaultFlag {
    /// How the link is cut.
    pub fn cut_mode(self) -> LinkCutMode {
        match self {
            FaultFlag::LinkBlackhole => LinkCutMode::Blackhole,
            _ => LinkCutMode::Reset,
        }
    }

    /// The control path down while the link is cut.
    pub fn path_fault(self) -> Option<ControlPathFault> {
        match self {
            FaultFlag::ApiDown => Some(ControlPathFault::ApiDown),
            FaultFlag::GrpcDown => Some(ControlPathFault::GrpcDown),
            FaultFlag::LinkCut | FaultFlag::LinkBlackhole => None,
        }
    }
}

/// `--control`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ControlFlag {
    /// The demo suspends and releases the replicators itself, through their gRPC service.
    Demo,
    /// The operator (in-process) and one sidecar per node, over both paths.
    Operator,
}

/// `--policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyFlag {
    /// Once every member is frozen, release the held writes; primaries run on unreplicated.
    FreezeAndGo,
    /// Keep the writes held until a person acts (the demo sets spec.resync.epoch).
    FreezeAndStop,
}

impl From<PolicyFlag> for lockstep_api::domain::Policy {
    fn from(flag: PolicyFlag) -> Self {
        match flag {
            PolicyFlag::FreezeAndGo => Self::FreezeAndGo,
            PolicyFlag::FreezeAndStop => Self::FreezeAndStop,
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        let d = ScenarioOptions::default();
        Self {
            clusters: d.clusters,
            volumes: d.volumes,
            cut: None,
            fault: FaultFlag::LinkCut,
            lanes: d.lanes,
            volume_mib: d.volume_mib,
            policy: PolicyFlag::FreezeAndGo,
            control: ControlFlag::Operator,
            apiserver: ApiServerFlag::Test,
        }
    }
}

impl Options {
    /// The scenario these flags ask for; an impossible world shape is refused here.
    pub fn scenario(&self) -> Result<ScenarioOptions, world::WorldError> {
        let d = ScenarioOptions::default();
        let cut = match &self.cut {
            Some(cut) => cut.clone(),
            None => world::WorldSpec::sized(self.clusters, self.volumes, 1 << 20)?
                .default_cut()
                .unwrap_or(d.cut),
        };
        Ok(ScenarioOptions {
            cut,
            cut_mode: self.fault.cut_mode(),
            path_fault: self.fault.path_fault(),
            clusters: self.clusters,
            volumes: self.volumes,
            lanes: self.lanes,
            volume_mib: self.volume_mib,
            policy: Some(self.policy.into()),
            api_source: match self.apiserver {
                ApiServerFlag::Test => cluster::ApiSource::TestServer,
                ApiServerFlag::Kube => cluster::ApiSource::RealServer,
            },
            ..d
        })
    }
}

/// How the demo reaches the replicators: through their `Replicator` gRPC service on each node's unix
/// socket, as a sidecar does.
pub const REPLICATOR_API: ReplicatorApi = ReplicatorApi::Grpc;

/// Runs the demo, printing its timeline; fails when the checker finds the secondaries inconsistent.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let timeline = Timeline::new(true);
    let scenario = options.scenario()?;
    let report = match options.control {
        ControlFlag::Demo => {
            let mut control = ManualFreeze::new(REPLICATOR_API);
            demo::run_scenario(&scenario, &mut control, &timeline).await?
        }
        ControlFlag::Operator => {
            let mut control = operated::OperatorControl::new();
            demo::run_scenario(&scenario, &mut control, &timeline).await?
        }
    };
    if !report.verdict.is_consistent() {
        anyhow::bail!("the secondaries are not consistent");
    }
    if !report.primaries.is_consistent() {
        anyhow::bail!("acknowledged writes are missing on the primaries");
    }
    Ok(())
}
