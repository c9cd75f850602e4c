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
//! - [`demo`]: the scenario: workload, cut, freeze, checker verdict, link restored;
//! - [`timeline`], [`kubectl`]: what the demo prints;
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
pub mod operated;
pub mod timeline;
pub mod world;

use control::{ManualFreeze, ReplicatorApi};
use demo::ScenarioOptions;
use faults::LinkCutMode;
use timeline::Timeline;

/// Flags of `lockstep-demo`; the defaults are the embedded example.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// The volume whose replication link is cut (east-postgres-wal, east-postgres-data or west-reporting).
    #[arg(long, default_value = "east-postgres-data")]
    pub cut: String,
    /// How the link is cut: its connections reset, or every byte silently dropped.
    #[arg(long, value_enum, default_value_t = LinkCutMode::Reset)]
    pub cut_mode: LinkCutMode,
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
            cut: d.cut,
            cut_mode: d.cut_mode,
            lanes: d.lanes,
            volume_mib: d.volume_mib,
            policy: PolicyFlag::FreezeAndGo,
            control: ControlFlag::Operator,
        }
    }
}

impl Options {
    /// The scenario these flags ask for.
    pub fn scenario(&self) -> ScenarioOptions {
        ScenarioOptions {
            cut: self.cut.clone(),
            cut_mode: self.cut_mode,
            lanes: self.lanes,
            volume_mib: self.volume_mib,
            policy: Some(self.policy.into()),
            ..ScenarioOptions::default()
        }
    }
}

/// How the demo reaches the replicators: through their `Replicator` gRPC service on each node's unix
/// socket, as a sidecar does.
pub const REPLICATOR_API: ReplicatorApi = ReplicatorApi::Grpc;

/// Runs the demo, printing its timeline; fails when the checker finds the secondaries inconsistent.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let timeline = Timeline::new(true);
    let report = match options.control {
        ControlFlag::Demo => {
            let mut control = ManualFreeze::new(REPLICATOR_API);
            demo::run_scenario(&options.scenario(), &mut control, &timeline).await?
        }
        ControlFlag::Operator => {
            let mut control = operated::OperatorControl::new();
            demo::run_scenario(&options.scenario(), &mut control, &timeline).await?
        }
    };
    if !report.verdict.is_consistent() {
        anyhow::bail!("the secondaries are not consistent");
    }
    Ok(())
}
