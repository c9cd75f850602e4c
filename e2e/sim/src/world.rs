//! The simulated world: a hub group decided by the operator's real freeze core
//! ([`lockstep_operator::freeze`]), one sidecar per node running the real enforcement core
//! ([`lockstep_sidecar::enforce::Enforcer`]), each primary volume running the replicator's real hold
//! state machine ([`lockstep_replicator::hold::ReplState`], see [`replicator`]), model secondaries,
//! both report paths with their faults, and an application issuing dependent writes — all on one seeded
//! event queue with simulated time, checked after every step.
//!
//! What is modelled rather than run: the replicator process around its hold machine (state file, resync
//! driver, link, timers, crashes: [`replicator`]), the secondaries (the writes they hold and the image they
//! keep through a resync, dropped once every volume is in sync again), the transports (a gRPC message may
//! be lost, duplicated, delayed or reordered; the API path is level-triggered: the latest object is read,
//! late, and not at all while that member's API server is down) and member resolution (the members are
//! resolved once, as the engine would; the volume states the sidecars report are taken into them with
//! the operator's own rule).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use lockstep_api::{
    conditions::{self, ConditionUpdate},
    domain::{ClaimOrder, GroupEpoch, Path, Policy, Stage, condition},
    v1alpha1::{
        ConsistencyGroup, ConsistencyGroupSpec, ConsistencyGroupStatus, EpochIntent, GroupMember,
        MemberVolumeStatus,
    },
};
use lockstep_operator::freeze;
use lockstep_operator::members::ReportedState;
use lockstep_replicator::hold;
use lockstep_sidecar::enforce::{self, Carried, Enforcer, Input, Level, Operation, Outcome};

use crate::rng::Rng;

mod replicator;

use replicator::{REPLICATOR_TICK, Volume};

/// Simulated milliseconds.
pub type Ms = u64;

/// The group's UID.
const UID: &str = "sim-group";
/// A second group that lists the same volumes after the first claimed them: every sidecar must refuse
/// it (DESIGN.md rule 5), never act on it.
const ROGUE: &str = "sim-rogue";
/// The control paths every sidecar runs, as deployed.
const BOTH_PATHS: [Path; 2] = [Path::Api, Path::Grpc];
/// How often sidecars report, read their paths and poll their replicator.
const SIDECAR_TICK: Ms = 250;
/// How often the operator evaluates and sends its current point again.
const OPERATOR_TICK: Ms = 200;

/// A defect planted to show the invariants catch it: in the model replicator, or — with the `mutants`
/// feature — in the real operator and sidecar cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutant {
    /// The replicator's real hold machine acknowledges new writes while suspended (primary-only, before
    /// any release): `ReplState::break_ack_while_suspended`.
    AckWhileSuspended,
    /// The replicator's real hold machine lets a copied write land on the primary before its chunk is
    /// in the activity map (`ReplState::break_activity_map`): a crash then leaves it on the primary
    /// with nothing recording that the secondary lacks it.
    WriteLandsUncovered,
    /// A defect in the operator's freeze core or the sidecar's enforcement core.
    #[cfg(feature = "mutants")]
    Core(lockstep_api::mutants::Mutant),
}

impl Mutant {
    /// Every planted defect this build can plant.
    pub fn all() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut all = vec![Self::AckWhileSuspended, Self::WriteLandsUncovered];
        #[cfg(feature = "mutants")]
        all.extend(lockstep_api::mutants::Mutant::ALL.map(Self::Core));
        all
    }

    /// False for a defect the simulation shows cannot be reached: a sidecar that lifts its fail-safe
    /// on a directive at the fail-safe's own epoch. Such a directive is never above what the sidecar
    /// has seen while a fail-safe is in force (the simulator counts "directive at its fail-safe's own
    /// epoch refused": zero over every soak), because a failure is recorded only while the volume
    /// replicates — at `(e, Resume)`, the last point of its epoch — and a sidecar restarted while cut
    /// off knows no group, so it takes no fail-safe until a path answers.
    pub fn reachable(self) -> bool {
        #[cfg(feature = "mutants")]
        if self == Self::Core(lockstep_api::mutants::Mutant::FailSafeLiftedAtSameEpoch) {
            return false;
        }
        true
    }
}

/// Plants a seed's defect in the real cores (they read it per thread) and removes it when the seed ends.
struct Planted;

impl Planted {
    #[allow(unused_variables)]
    fn new(mutant: Option<Mutant>) -> Self {
        #[cfg(feature = "mutants")]
        lockstep_api::mutants::plant(match mutant {
            Some(Mutant::Core(m)) => Some(m),
            _ => None,
        });
        Self
    }
}

impl Drop for Planted {
    fn drop(&mut self) {
        #[cfg(feature = "mutants")]
        lockstep_api::mutants::plant(None);
    }
}

/// One simulation's shape.
#[derive(Debug, Clone)]
pub struct Config {
    /// Member clusters (at least 2).
    pub clusters: usize,
    /// Nodes per cluster.
    pub nodes_per_cluster: usize,
    /// Volumes per node; the same handles repeat in every cluster.
    pub volumes_per_node: usize,
    /// Application threads, each issuing one write at a time.
    pub threads: usize,
    /// How long faults are drawn, in simulated milliseconds.
    pub fault_ms: Ms,
    /// The group's hold timeout.
    pub hold_timeout_ms: Ms,
    /// The sidecars' fail-safe interval.
    pub fail_safe_ms: Ms,
    /// A planted defect.
    pub mutant: Option<Mutant>,
}

impl Config {
    /// The command that replays `seed` in this world, with its trace.
    pub fn replay_command(&self, seed: u64) -> String {
        let default = Self::default();
        let mut command = "cargo run --release -p lockstep-sim".to_owned();
        if self
            .mutant
            .is_some_and(|m| !matches!(m, Mutant::AckWhileSuspended | Mutant::WriteLandsUncovered))
        {
            command.push_str(" --features mutants");
        }
        command.push_str(&format!(" -- --replay {seed}"));
        for (flag, value, usual) in [
            ("--clusters", self.clusters, default.clusters),
            (
                "--nodes-per-cluster",
                self.nodes_per_cluster,
                default.nodes_per_cluster,
            ),
            (
                "--volumes-per-node",
                self.volumes_per_node,
                default.volumes_per_node,
            ),
        ] {
            if value != usual {
                command.push_str(&format!(" {flag} {value}"));
            }
        }
        if let Some(mutant) = self.mutant {
            command.push_str(&format!(" --mutant '{mutant:?}'"));
        }
        command
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            clusters: 2,
            nodes_per_cluster: 2,
            volumes_per_node: 1,
            threads: 3,
            fault_ms: 60_000,
            hold_timeout_ms: 5_000,
            fail_safe_ms: 2_000,
            mutant: None,
        }
    }
}

/// What one seed did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Events processed.
    pub steps: u64,
    /// Writes the application issued, and how many were acknowledged.
    pub writes: usize,
    /// Writes acknowledged.
    pub acknowledged: usize,
    /// Writes failed with an I/O error at the hold timeout.
    pub failed: usize,
    /// The group's epoch at the end.
    pub epoch: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
}

/// An invariant that did not hold.
#[derive(Debug, Clone, thiserror::Error)]
#[error("seed {seed}: {what} (at {at_ms} ms, step {step})\nreplay: {replay}\n{trace}")]
pub struct Violation {
    /// The seed.
    pub seed: u64,
    /// The command that replays it, with its trace.
    pub replay: String,
    /// Which invariant, in a sentence.
    pub what: String,
    /// Simulated time.
    pub at_ms: Ms,
    /// Step number.
    pub step: u64,
    /// The last steps, for people.
    pub trace: String,
}

#[derive(Debug)]
struct Write {
    volume: usize,
    /// How many writes were acknowledged when this one was issued: it depends on all of them.
    predecessors: usize,
    thread: usize,
}

#[derive(Debug)]
struct Sidecar {
    cluster: usize,
    name: String,
    volumes: Vec<usize>,
    enforcer: Enforcer,
    up: bool,
    incarnation: u64,
    members_sent: [bool; 2],
    last_heard: Ms,
    /// The last acknowledged point of each volume.
    acked: BTreeMap<String, (GroupEpoch, bool)>,
    /// The volume states last sent over gRPC.
    states_sent: Vec<(String, ReportedState)>,
}

#[derive(Debug, Clone)]
enum ToOperator {
    Report {
        cluster: usize,
        node: String,
        failures: Vec<enforce::Failure>,
    },
    Ack {
        cluster: usize,
        ack: enforce::Ack,
    },
    Seen {
        epoch: u64,
    },
    HoldTimedOut {
        cluster: usize,
        timeouts: Vec<enforce::HoldTimeout>,
    },
    /// What the node's volumes of the group are doing, as its sidecar reports them.
    States {
        cluster: usize,
        node: String,
        states: Vec<(String, ReportedState)>,
    },
}

#[derive(Debug, Clone)]
enum Step {
    Issue {
        thread: usize,
    },
    CopyArrives {
        volume: usize,
        incarnation: u64,
        cuts: u64,
        generation: u64,
        seq: u64,
        writes: Vec<usize>,
    },
    CopyAcked {
        volume: usize,
        incarnation: u64,
        cuts: u64,
        generation: u64,
        seq: u64,
    },
    /// A new link's hello reaches the secondary.
    HelloArrives {
        volume: usize,
        cuts: u64,
        keep: Option<u64>,
    },
    ReplicatorTick {
        volume: usize,
    },
    /// An event on a replicator's stream reaches its sidecar.
    ReplicatorEvent {
        sidecar: usize,
        incarnation: u64,
        input: Input,
    },
    ProbeSecondary {
        volume: usize,
        incarnation: u64,
    },
    /// A node's replicator is killed, and restarted at `until` from its state files.
    ReplicatorDown {
        sidecar: usize,
        until: Ms,
    },
    ReplicatorUp {
        sidecar: usize,
    },
    /// A node's replicator cannot write its state files until `until`.
    StateWritesFail {
        sidecar: usize,
        until: Ms,
    },
    GrpcToOperator {
        message: ToOperator,
        incarnation: u64,
    },
    GrpcToSidecar {
        sidecar: usize,
        target: GroupEpoch,
        incarnation: u64,
    },
    ReadNode {
        sidecar: usize,
    },
    ReadMirror {
        sidecar: usize,
    },
    SidecarTick {
        sidecar: usize,
    },
    OperatorTick,
    LinkCut {
        volume: usize,
        until: Ms,
    },
    LinkHealed {
        volume: usize,
    },
    GrpcCut {
        cluster: usize,
        until: Ms,
    },
    GrpcHealed {
        cluster: usize,
    },
    ApiDown {
        cluster: usize,
        until: Ms,
    },
    ApiUp {
        cluster: usize,
    },
    OperatorDown {
        until: Ms,
    },
    OperatorUp,
    SidecarDown {
        sidecar: usize,
        until: Ms,
    },
    SidecarUp {
        sidecar: usize,
    },
    /// A member names an epoch the operator never sent (a buggy or hostile sidecar, or one that remembers
    /// a deleted group of the same name).
    BogusEpoch,
    /// Both paths to a member cluster cut at once (its sidecars' fail-safe is for this).
    Partition {
        cluster: usize,
        until: Ms,
    },
    PersonResyncs,
    Heal,
}

/// A ReplicationNode's status, as the operator reads it.
#[derive(Debug, Clone, Default)]
struct NodeStatus {
    failures: Vec<enforce::Failure>,
    enforced: Vec<enforce::Ack>,
    states: Vec<(String, ReportedState)>,
}

struct World {
    seed: u64,
    config: Config,
    rng: Rng,
    now: Ms,
    step: u64,
    queue: BinaryHeap<Reverse<(Ms, u64, usize)>>,
    steps: Vec<Option<Step>>,
    volumes: Vec<Volume>,
    writes: Vec<Write>,
    sidecars: Vec<Sidecar>,
    group: ConsistencyGroup,
    operator_up: bool,
    operator_incarnation: u64,
    grpc_up: Vec<bool>,
    api_up: Vec<bool>,
    mirrors: Vec<Option<GroupEpoch>>,
    nodes: Vec<NodeStatus>,
    /// Writes acknowledged to the application, in order.
    acknowledged: Vec<usize>,
    /// Per write: on the effective secondary image (the kept one during a resync).
    on_image: Vec<bool>,
    /// The lowest index into `acknowledged` whose write is not on the effective image.
    first_missing: usize,
    /// The highest `predecessors` of a write on the effective image.
    max_predecessors: usize,
    /// Whether this seed's second group lists the first group's volumes.
    rogue: bool,
    healing: bool,
    /// The monotonic instant of simulated time 0, for the replicators' state machines.
    clock_base: std::time::Instant,
    tracing: bool,
    /// How many of the last steps a trace keeps (`LOCKSTEP_SIM_TRACE_LINES`, default 200).
    trace_lines: usize,
    trace: std::collections::VecDeque<String>,
    summary: Summary,
}

/// Runs one seed; a violated invariant is returned with the steps that led to it.
pub fn run(seed: u64, config: &Config) -> Result<Summary, Box<Violation>> {
    // Fast without a trace; a seed that fails runs again, exactly the same, recording one.
    simulate(seed, config, false).or_else(|_| simulate(seed, config, true))
}

fn simulate(seed: u64, config: &Config, tracing: bool) -> Result<Summary, Box<Violation>> {
    let _planted = Planted::new(config.mutant);
    let mut world = World::new(seed, config.clone());
    world.tracing = tracing;
    world.start();
    let end = config.fault_ms + 2 * config.hold_timeout_ms + config.fail_safe_ms + 5_000;
    while let Some(Reverse((at, _, index))) = world.queue.pop() {
        if at > end {
            break;
        }
        world.now = at;
        world.step += 1;
        let Some(step) = world.steps[index].take() else {
            continue;
        };
        if world.tracing {
            world.note(format!("{step:?}"));
        }
        world.handle(step)?;
    }
    world.now = end;
    world.liveness()?;
    world.summary.steps = world.step;
    world.summary.writes = world.writes.len();
    world.summary.acknowledged = world.acknowledged.len();
    world.summary.epoch = world.group.status.as_ref().map_or(0, |s| s.epoch);
    Ok(world.summary)
}

fn time(ms: Ms) -> Time {
    let base = 1_700_000_000_000_i64;
    let at = base + i64::try_from(ms).unwrap_or(i64::MAX / 2);
    Time(k8s_openapi::jiff::Timestamp::from_millisecond(at).unwrap_or_default())
}

fn level_of(point: &GroupEpoch) -> Level {
    Level::point(point.epoch, point.stage)
}

fn position(group: &ConsistencyGroup) -> (u64, Stage) {
    group
        .status
        .as_ref()
        .map_or((0, Stage::Resume), ConsistencyGroupStatus::position)
}

impl World {
    fn new(seed: u64, config: Config) -> Self {
        let mut volumes = Vec::new();
        let mut sidecars = Vec::new();
        let mut members = Vec::new();
        let mut statuses = Vec::new();
        for cluster in 0..config.clusters.max(2) {
            let mut pvcs = Vec::new();
            for node in 0..config.nodes_per_cluster.max(1) {
                let name = format!("c{cluster}-node-{node}");
                let mut mine = Vec::new();
                for i in 0..config.volumes_per_node.max(1) {
                    // The same handles in every cluster: a volume is (cluster, handle).
                    let handle = format!("vol-{node}-{i}");
                    let pvc = format!("pvc-{node}-{i}");
                    statuses.push(MemberVolumeStatus {
                        cluster: format!("c{cluster}"),
                        namespace: "app".into(),
                        pvc: pvc.clone(),
                        persistent_volume: Some(format!("pv-{handle}")),
                        volume_handle: Some(handle.clone()),
                        node: Some(name.clone()),
                        state: None,
                        acknowledged: None,
                        image_epoch: None,
                    });
                    pvcs.push(pvc);
                    mine.push(volumes.len());
                    volumes.push(Volume::new(cluster, sidecars.len(), handle));
                }
                sidecars.push(Sidecar {
                    cluster,
                    name,
                    volumes: mine,
                    enforcer: Enforcer::with_paths(BOTH_PATHS.into()),
                    up: true,
                    incarnation: 0,
                    members_sent: [false; 2],
                    last_heard: 0,
                    acked: BTreeMap::new(),
                    states_sent: Vec::new(),
                });
            }
            members.push(GroupMember {
                cluster: format!("c{cluster}"),
                namespace: "app".into(),
                pvc_names: Some(pvcs),
                selector: None,
            });
        }
        let mut rng = Rng::new(seed);
        let rogue = rng.chance(500);
        let policy = if rng.chance(500) {
            Policy::FreezeAndGo
        } else {
            Policy::FreezeAndStop
        };
        let spec = ConsistencyGroupSpec {
            members,
            policy,
            hold_timeout: format!("{}s", config.hold_timeout_ms / 1000),
            release: None,
            resync: None,
            freeze: None,
            failover: None,
        };
        let mut status = ConsistencyGroupStatus {
            member_count: u32::try_from(statuses.len()).unwrap_or(u32::MAX),
            members: statuses,
            ..ConsistencyGroupStatus::default()
        };
        conditions::set(
            &mut status.conditions,
            ConditionUpdate {
                type_: condition::MEMBERS_RESOLVED,
                status: true,
                reason: "Resolved",
                message: "resolved by the simulation".into(),
            },
            Some(1),
            &time(0),
        );
        let group = ConsistencyGroup {
            metadata: ObjectMeta {
                name: Some("sim".into()),
                uid: Some(UID.into()),
                generation: Some(1),
                ..ObjectMeta::default()
            },
            spec,
            status: Some(status),
        };
        let clusters = config.clusters.max(2);
        let nodes = sidecars.len();
        Self {
            seed,
            config,
            rng,
            now: 0,
            step: 0,
            queue: BinaryHeap::new(),
            steps: Vec::new(),
            volumes,
            writes: Vec::new(),
            sidecars,
            group,
            operator_up: true,
            operator_incarnation: 0,
            grpc_up: vec![true; clusters],
            api_up: vec![true; clusters],
            mirrors: vec![None; clusters],
            nodes: vec![NodeStatus::default(); nodes],
            acknowledged: Vec::new(),
            on_image: Vec::new(),
            first_missing: 0,
            max_predecessors: 0,
            rogue,
            healing: false,
            clock_base: std::time::Instant::now(),
            tracing: false,
            trace_lines: std::env::var("LOCKSTEP_SIM_TRACE_LINES")
                .ok()
                .and_then(|lines| lines.parse().ok())
                .unwrap_or(200),
            trace: std::collections::VecDeque::new(),
            summary: Summary::default(),
        }
    }

    fn at(&mut self, delay: Ms, step: Step) {
        let index = self.steps.len();
        self.steps.push(Some(step));
        self.queue
            .push(Reverse((self.now + delay, index as u64, index)));
    }

    fn at_time(&mut self, at: Ms, step: Step) {
        self.at(at.saturating_sub(self.now), step);
    }

    fn note(&mut self, line: String) {
        if !self.tracing {
            return;
        }
        if self.trace.len() >= self.trace_lines {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("{:>7} ms  {line}", self.now));
    }

    fn violation(&self, what: String) -> Box<Violation> {
        Box::new(Violation {
            seed: self.seed,
            replay: self.config.replay_command(self.seed),
            what,
            at_ms: self.now,
            step: self.step,
            trace: Vec::from(self.trace.clone()).join("\n"),
        })
    }

    fn fault(&mut self, kind: &'static str) {
        *self.summary.faults.entry(kind).or_default() += 1;
    }

    fn start(&mut self) {
        for volume in 0..self.volumes.len() {
            // Nothing can fail yet: no write was issued, no fault drawn.
            let _ = self.replicator_starts(volume);
            let delay = self.rng.between(1, REPLICATOR_TICK);
            self.at(delay, Step::ReplicatorTick { volume });
        }
        for sidecar in 0..self.sidecars.len() {
            self.sidecar_starts(sidecar);
            let delay = self.rng.between(1, SIDECAR_TICK);
            self.at(delay, Step::SidecarTick { sidecar });
        }
        self.at(OPERATOR_TICK, Step::OperatorTick);
        for thread in 0..self.config.threads.max(1) {
            let delay = self.rng.between(500, 1500);
            self.at(delay, Step::Issue { thread });
        }
        self.schedule_faults();
        let heal = self.config.fault_ms;
        self.at(heal, Step::Heal);
    }

    /// Draws the seed's faults over the fault window.
    fn schedule_faults(&mut self) {
        let mut t = 1_000;
        while t < self.config.fault_ms {
            t += self.rng.between(500, 4_000);
            let length = self.rng.between(200, 6_000);
            let step = match self.rng.between(0, 13) {
                0..=2 => Step::LinkCut {
                    volume: self.rng.index(self.volumes.len()),
                    until: t + length,
                },
                3 | 4 => Step::GrpcCut {
                    cluster: self.rng.index(self.grpc_up.len()),
                    until: t + length,
                },
                5 | 6 => Step::ApiDown {
                    cluster: self.rng.index(self.api_up.len()),
                    until: t + length,
                },
                7 => Step::OperatorDown {
                    until: t + length / 3,
                },
                8 => Step::SidecarDown {
                    sidecar: self.rng.index(self.sidecars.len()),
                    until: t + length / 3,
                },
                9 => Step::PersonResyncs,
                10 => Step::BogusEpoch,
                11 => Step::Partition {
                    cluster: self.rng.index(self.api_up.len()),
                    until: t + length,
                },
                12 => Step::ReplicatorDown {
                    sidecar: self.rng.index(self.sidecars.len()),
                    until: t + length / 3,
                },
                _ => Step::StateWritesFail {
                    sidecar: self.rng.index(self.sidecars.len()),
                    until: t + length / 3,
                },
            };
            let delay = t.saturating_sub(self.now);
            self.at(delay, step);
        }
    }

    fn handle(&mut self, step: Step) -> Result<(), Box<Violation>> {
        match step {
            Step::Issue { thread } => self.issue(thread)?,
            Step::CopyArrives {
                volume,
                incarnation,
                cuts,
                generation,
                seq,
                writes,
            } => self.copy_arrives(volume, incarnation, cuts, generation, seq, writes)?,
            Step::CopyAcked {
                volume,
                incarnation,
                cuts,
                generation,
                seq,
            } => self.copy_acked(volume, incarnation, cuts, generation, seq)?,
            Step::HelloArrives { volume, cuts, keep } => self.hello_arrives(volume, cuts, keep)?,
            Step::ReplicatorTick { volume } => {
                self.replicator_tick(volume)?;
                self.at(REPLICATOR_TICK, Step::ReplicatorTick { volume });
            }
            Step::ReplicatorEvent {
                sidecar,
                incarnation,
                input,
            } => {
                if self.sidecars[sidecar].incarnation == incarnation {
                    self.sidecar_input(sidecar, input)?;
                }
            }
            Step::ProbeSecondary {
                volume,
                incarnation,
            } => self.probe_secondary(volume, incarnation)?,
            Step::ReplicatorDown { sidecar, until } if !self.healing => {
                self.fault("replicator killed");
                for volume in self.sidecars[sidecar].volumes.clone() {
                    if self.volumes[volume].repl.is_some() {
                        self.replicator_crashes(volume)?;
                    }
                }
                self.at_time(until, Step::ReplicatorUp { sidecar });
            }
            Step::ReplicatorUp { sidecar } => self.replicators_up(sidecar)?,
            Step::StateWritesFail { sidecar, until } if !self.healing => {
                self.fault("replicator state writes failing");
                for volume in self.sidecars[sidecar].volumes.clone() {
                    self.volumes[volume].state_writes_fail_until = until;
                }
            }
            Step::GrpcToOperator {
                message,
                incarnation,
            } => {
                if self.operator_up && incarnation == self.operator_incarnation {
                    if let ToOperator::States {
                        cluster,
                        node,
                        states,
                    } = &message
                    {
                        self.take_states(*cluster, node, states);
                    }
                    let events = self.events_of(message);
                    self.decide(events)?;
                }
            }
            Step::GrpcToSidecar {
                sidecar,
                target,
                incarnation,
            } => {
                let s = &self.sidecars[sidecar];
                if s.up && s.incarnation == incarnation && self.grpc_up[s.cluster] {
                    self.sidecars[sidecar].last_heard = self.now;
                    self.sidecar_input(
                        sidecar,
                        Input::Directive {
                            path: Path::Grpc,
                            target,
                        },
                    )?;
                }
            }
            Step::ReadNode { sidecar } => {
                let cluster = self.sidecars[sidecar].cluster;
                if self.operator_up && self.api_up[cluster] {
                    let (node, states) = (
                        self.sidecars[sidecar].name.clone(),
                        self.nodes[sidecar].states.clone(),
                    );
                    self.take_states(cluster, &node, &states);
                    let events = self.events_of_node(sidecar);
                    self.decide(events)?;
                }
            }
            Step::ReadMirror { sidecar } => {
                let cluster = self.sidecars[sidecar].cluster;
                if self.sidecars[sidecar].up
                    && self.api_up[cluster]
                    && let Some(target) = self.mirrors[cluster].clone()
                {
                    self.sidecars[sidecar].last_heard = self.now;
                    self.sidecar_input(
                        sidecar,
                        Input::Directive {
                            path: Path::Api,
                            target,
                        },
                    )?;
                }
            }
            Step::SidecarTick { sidecar } => {
                self.sidecar_tick(sidecar)?;
                self.at(SIDECAR_TICK, Step::SidecarTick { sidecar });
            }
            Step::OperatorTick => {
                if self.operator_up {
                    self.decide(vec![freeze::Event::Evaluate])?;
                    let (epoch, stage) = position(&self.group);
                    self.broadcast(GroupEpoch {
                        group_uid: UID.into(),
                        epoch,
                        stage,
                    });
                    for sidecar in 0..self.sidecars.len() {
                        let delay = self.rng.between(1, 60);
                        self.at(delay, Step::ReadNode { sidecar });
                    }
                }
                self.at(OPERATOR_TICK, Step::OperatorTick);
            }
            Step::LinkCut { volume, until } if !self.healing => {
                self.fault("link cut");
                let v = &mut self.volumes[volume];
                v.link_up = false;
                // The connection is broken: what is on the wire is lost, and nothing more goes on it.
                v.cuts += 1;
                v.drop_link();
                self.at_time(until, Step::LinkHealed { volume });
            }
            Step::LinkHealed { volume } => self.volumes[volume].link_up = true,
            Step::GrpcCut { cluster, until } if !self.healing => {
                self.fault("gRPC path cut");
                self.grpc_up[cluster] = false;
                self.at_time(until, Step::GrpcHealed { cluster });
            }
            Step::GrpcHealed { cluster } => self.grpc_up[cluster] = true,
            Step::ApiDown { cluster, until } if !self.healing => {
                self.fault("member API server down");
                self.api_up[cluster] = false;
                self.at_time(until, Step::ApiUp { cluster });
            }
            Step::ApiUp { cluster } => self.api_up[cluster] = true,
            Step::OperatorDown { until } if !self.healing => {
                self.fault("operator restarted");
                self.operator_up = false;
                self.operator_incarnation += 1;
                self.at_time(until, Step::OperatorUp);
            }
            Step::OperatorUp => self.operator_up = true,
            Step::SidecarDown { sidecar, until } if !self.healing => {
                self.fault("sidecar restarted");
                self.sidecars[sidecar].up = false;
                self.sidecars[sidecar].incarnation += 1;
                self.at_time(until, Step::SidecarUp { sidecar });
            }
            Step::SidecarUp { sidecar } => self.sidecar_starts(sidecar),
            Step::BogusEpoch if !self.healing && self.operator_up => {
                self.fault("a member named an epoch never sent");
                let epoch = position(&self.group).0 + self.rng.between(2, 6);
                self.decide(vec![freeze::Event::Seen { epoch }])?;
            }
            Step::Partition { cluster, until } if !self.healing => {
                self.fault("member cluster partitioned");
                self.grpc_up[cluster] = false;
                self.api_up[cluster] = false;
                self.at_time(until, Step::GrpcHealed { cluster });
                self.at_time(until, Step::ApiUp { cluster });
                // Half the time a node of the cut-off cluster reboots meanwhile: its new sidecar starts
                // with no path answering, from what its replicator carries.
                let nodes: Vec<usize> = (0..self.sidecars.len())
                    .filter(|&s| self.sidecars[s].cluster == cluster)
                    .collect();
                if self.rng.chance(500) && !nodes.is_empty() {
                    let sidecar = nodes[self.rng.index(nodes.len())];
                    let length = until.saturating_sub(self.now);
                    let down = self.rng.between(100, (length / 2).max(100));
                    let up = down + self.rng.between(200, 1_500);
                    self.at(
                        down,
                        Step::SidecarDown {
                            sidecar,
                            until: self.now + up,
                        },
                    );
                }
            }
            Step::PersonResyncs => {
                self.person_resyncs();
                if self.healing {
                    self.at(1_000, Step::PersonResyncs);
                }
            }
            Step::Heal => {
                self.healing = true;
                for v in &mut self.volumes {
                    v.link_up = true;
                    v.state_writes_fail_until = 0;
                }
                for sidecar in 0..self.sidecars.len() {
                    self.replicators_up(sidecar)?;
                }
                self.grpc_up.iter_mut().for_each(|up| *up = true);
                self.api_up.iter_mut().for_each(|up| *up = true);
                self.operator_up = true;
                for sidecar in 0..self.sidecars.len() {
                    if !self.sidecars[sidecar].up {
                        self.sidecar_starts(sidecar);
                    }
                }
                // People thaw the group once the faults are over, and again should it freeze again.
                self.at(1_000, Step::PersonResyncs);
            }
            Step::LinkCut { .. }
            | Step::GrpcCut { .. }
            | Step::ApiDown { .. }
            | Step::OperatorDown { .. }
            | Step::SidecarDown { .. }
            | Step::ReplicatorDown { .. }
            | Step::StateWritesFail { .. }
            | Step::BogusEpoch
            | Step::Partition { .. } => {}
        }
        Ok(())
    }

    // --- The application -------------------------------------------------------------------------

    fn issue(&mut self, thread: usize) -> Result<(), Box<Violation>> {
        let volume = self.rng.index(self.volumes.len());
        let write = self.writes.len();
        self.writes.push(Write {
            volume,
            predecessors: self.acknowledged.len(),
            thread,
        });
        self.on_image.push(false);
        self.primary_write(volume, write)
    }

    fn completed(&mut self, write: usize, ok: bool) -> Result<(), Box<Violation>> {
        if ok {
            if !self.on_image[write] && self.tracing {
                self.note(format!(
                    "  write {write} acknowledged, not on the secondary image"
                ));
            }
            self.acknowledged.push(write);
            self.advance_first_missing()?;
        } else {
            self.summary.failed += 1;
        }
        let thread = self.writes[write].thread;
        let think = self.rng.between(10, 300);
        self.at(think, Step::Issue { thread });
        Ok(())
    }

    /// The sidecar carries out one of its core's operations: the core must never move a confirmed
    /// volume back, nor act on a second group's claim. Returns the volumes it failed for.
    fn operate_on(
        &mut self,
        sidecar: usize,
        operation: &Operation,
    ) -> Result<Vec<String>, Box<Violation>> {
        let level = operation.level();
        let group_uid = match operation {
            Operation::Suspend { group_uid, .. }
            | Operation::Release { group_uid, .. }
            | Operation::Resume { group_uid, .. }
            | Operation::Configure { group_uid, .. } => group_uid,
        };
        if group_uid == ROGUE {
            return Err(self.violation(format!(
                "{} acted on a second group's claim: {operation:?} (its volumes are the first group's)",
                self.sidecars[sidecar].name
            )));
        }
        for handle in operation.volumes() {
            let Some(&volume) = self.sidecars[sidecar]
                .volumes
                .iter()
                .find(|&&v| self.volumes[v].handle == handle)
            else {
                continue;
            };
            let Some(before) = self.volumes[volume].carried() else {
                continue;
            };
            if before.confirmed && before.group_uid.as_deref() == Some(UID) && level < before.level
            {
                return Err(self.violation(format!(
                    "{} of {} moved back from {:?} to {level:?} by {operation:?}",
                    self.volumes[volume].handle, self.sidecars[sidecar].name, before.level
                )));
            }
            if self.tracing {
                let snapshot = self.volumes[volume].snapshot();
                self.note(format!(
                    "  {} applies {operation:?} to {} ({:?})",
                    self.sidecars[sidecar].name,
                    self.volumes[volume].handle,
                    snapshot.map(|s| (s.mode, s.held, s.dirty_bytes)),
                ));
            }
        }
        self.replicator_call(sidecar, operation)
    }

    // --- The consistency checker -----------------------------------------------------------------

    fn onto_image(&mut self, write: usize) -> Result<(), Box<Violation>> {
        if self.on_image[write] {
            return Ok(());
        }
        self.on_image[write] = true;
        self.max_predecessors = self.max_predecessors.max(self.writes[write].predecessors);
        self.advance_first_missing()
    }

    fn advance_first_missing(&mut self) -> Result<(), Box<Violation>> {
        while self.first_missing < self.acknowledged.len()
            && self.on_image[self.acknowledged[self.first_missing]]
        {
            self.first_missing += 1;
        }
        self.check_image()
    }

    /// Dependent-write consistency of the secondaries: a write on them has every write acknowledged
    /// before it was issued on them too.
    fn check_image(&self) -> Result<(), Box<Violation>> {
        if self.max_predecessors > self.first_missing {
            let missing = self.acknowledged[self.first_missing];
            let dependent = (0..self.writes.len())
                .find(|&w| self.on_image[w] && self.writes[w].predecessors > self.first_missing)
                .unwrap_or_default();
            return Err(self.violation(format!(
                "the secondaries are not dependent-write consistent: write {dependent} (on {}) is on its secondary, but write {missing} (on {}), acknowledged before it was issued, is not",
                self.volumes[self.writes[dependent].volume].handle,
                self.volumes[self.writes[missing].volume].handle
            )));
        }
        Ok(())
    }

    fn recompute_image(&mut self) -> Result<(), Box<Violation>> {
        self.on_image.iter_mut().for_each(|on| *on = false);
        self.max_predecessors = 0;
        for v in 0..self.volumes.len() {
            let image: Vec<usize> = match &self.volumes[v].kept {
                Some(kept) => kept.iter().copied().collect(),
                None => self.volumes[v].image.iter().copied().collect(),
            };
            for write in image {
                self.on_image[write] = true;
                self.max_predecessors = self.max_predecessors.max(self.writes[write].predecessors);
            }
        }
        self.first_missing = 0;
        self.advance_first_missing()
    }

    // --- The sidecars ----------------------------------------------------------------------------

    fn sidecar_starts(&mut self, sidecar: usize) {
        let s = &mut self.sidecars[sidecar];
        s.up = true;
        s.enforcer = Enforcer::with_paths(BOTH_PATHS.into());
        s.members_sent = [false; 2];
        s.acked.clear();
        s.states_sent.clear();
        s.last_heard = self.now;
        if let Some(inventory) = self.inventory(sidecar) {
            let _ = self.sidecar_input(sidecar, Input::Inventory(inventory));
        }
    }

    /// The node's replicator's volume list, as the sidecar reads it; `None` while the replicator is
    /// down (the listing fails).
    fn inventory(&self, sidecar: usize) -> Option<Vec<Carried>> {
        self.sidecars[sidecar]
            .volumes
            .iter()
            .map(|&v| self.volumes[v].carried())
            .collect()
    }

    fn sidecar_input(&mut self, sidecar: usize, input: Input) -> Result<(), Box<Violation>> {
        if !self.sidecars[sidecar].up {
            return Ok(());
        }
        let outcome: Outcome = self.sidecars[sidecar].enforcer.handle(input);
        if !outcome.fail_safe_taken.is_empty() {
            self.fault("sidecar took its fail-safe");
        }
        if outcome.refused.iter().any(|refusal| {
            matches!(refusal, enforce::Refusal::BelowFailSafe { target, epoch } if target.epoch == *epoch)
        }) {
            self.fault("directive at its fail-safe's own epoch refused");
        }
        let mut failed: Vec<String> = Vec::new();
        for operation in &outcome.operations {
            failed.extend(self.operate_on(sidecar, operation)?);
        }
        let mut acks = outcome.acks;
        if !failed.is_empty() {
            // As the agent does: no acknowledgement for a volume whose operation failed, and the core
            // forgets what those volumes carry until the next listing.
            acks.retain(|ack| !ack.volumes.iter().any(|v| failed.contains(v)));
            let _ = self.sidecars[sidecar]
                .enforcer
                .handle(Input::OperationFailed { volumes: failed });
        }
        for ack in acks {
            if ack.point.group_uid != UID {
                continue; // the second group's, should it ever ack: its volumes are checked above
            }
            for volume in &ack.volumes {
                self.sidecars[sidecar]
                    .acked
                    .insert(volume.clone(), (ack.point.clone(), ack.fail_safe));
            }
            self.send_to_operator(
                sidecar,
                ToOperator::Ack {
                    cluster: self.sidecars[sidecar].cluster,
                    ack,
                },
            );
        }
        // As the sidecar publishes after every input: the states go as soon as they change.
        let states = self.states_of(sidecar);
        if states != self.sidecars[sidecar].states_sent {
            self.sidecars[sidecar].states_sent = states.clone();
            self.send_states(sidecar, states);
        }
        Ok(())
    }

    fn send_states(&mut self, sidecar: usize, states: Vec<(String, ReportedState)>) {
        let (cluster, node) = (
            self.sidecars[sidecar].cluster,
            self.sidecars[sidecar].name.clone(),
        );
        self.send_to_operator(
            sidecar,
            ToOperator::States {
                cluster,
                node,
                states,
            },
        );
    }

    /// The states the sidecar reports for its volumes of the group (the real core decides them).
    fn states_of(&self, sidecar: usize) -> Vec<(String, ReportedState)> {
        let enforcer = &self.sidecars[sidecar].enforcer;
        let failures = enforcer.failures();
        enforcer
            .volumes()
            .into_iter()
            .filter(|view| view.group_uid.as_deref() == Some(UID))
            .filter_map(|view| {
                let level = view.level?;
                let reported = ReportedState {
                    state: view.state(&failures),
                    epoch: level.epoch,
                    stage: level.stage(),
                };
                Some((view.volume, reported))
            })
            .collect()
    }

    fn sidecar_tick(&mut self, sidecar: usize) -> Result<(), Box<Violation>> {
        if !self.sidecars[sidecar].up {
            return Ok(());
        }
        let cluster = self.sidecars[sidecar].cluster;
        let paths = [
            (Path::Api, self.api_up[cluster]),
            (Path::Grpc, self.grpc_up[cluster]),
        ];
        for (index, (path, up)) in paths.into_iter().enumerate() {
            if up && !self.sidecars[sidecar].members_sent[index] {
                self.sidecars[sidecar].members_sent[index] = true;
                let volumes: BTreeSet<String> = self.sidecars[sidecar]
                    .volumes
                    .iter()
                    .map(|&v| self.volumes[v].handle.clone())
                    .collect();
                // The second group's membership is read first: the claim order must decide, not
                // the order of reading.
                let mut groups = vec![(UID, "sim", 1)];
                if self.rogue {
                    groups.insert(0, (ROGUE, "rogue", 2));
                }
                for (uid, name, order) in groups {
                    self.sidecar_input(
                        sidecar,
                        Input::Membership {
                            path,
                            group_uid: uid.into(),
                            group_name: name.into(),
                            order: ClaimOrder::new(Some(order), uid),
                            volumes: volumes.clone(),
                            hold_timeout_ms: self.config.hold_timeout_ms,
                        },
                    )?;
                }
                self.sidecar_input(sidecar, Input::Synced(path))?;
                if self.rogue {
                    // The second group runs its own life: released at its epoch 1.
                    let target = GroupEpoch {
                        group_uid: ROGUE.into(),
                        epoch: 1,
                        stage: Stage::Release,
                    };
                    self.sidecar_input(sidecar, Input::Directive { path, target })?;
                }
            }
        }
        if self.grpc_up[cluster] {
            self.sidecars[sidecar].last_heard = self.now;
        }
        if let Some(inventory) = self.inventory(sidecar) {
            self.sidecar_input(sidecar, Input::Inventory(inventory))?;
        }
        let failures = self.sidecars[sidecar].enforcer.failures();
        let timeouts = self.sidecars[sidecar].enforcer.hold_timeouts();
        let acks = self.acks_of(sidecar);
        // Path 1: the ReplicationNode, written when the member's API server answers.
        if self.api_up[cluster] {
            self.nodes[sidecar] = NodeStatus {
                failures: failures.clone(),
                enforced: acks.clone(),
                states: self.states_of(sidecar),
            };
            let delay = self.rng.between(1, 100);
            self.at(delay, Step::ReadNode { sidecar });
            let delay = self.rng.between(1, 100);
            self.at(delay, Step::ReadMirror { sidecar });
        }
        // Path 2: gRPC, sent again until the operator moves on.
        let node = self.sidecars[sidecar].name.clone();
        if !failures.is_empty() {
            self.send_to_operator(
                sidecar,
                ToOperator::Report {
                    cluster,
                    node,
                    failures,
                },
            );
        }
        if !timeouts.is_empty() {
            self.send_to_operator(sidecar, ToOperator::HoldTimedOut { cluster, timeouts });
        }
        for ack in acks {
            self.send_to_operator(sidecar, ToOperator::Ack { cluster, ack });
        }
        if let Some(epoch) = self.sidecars[sidecar].enforcer.seen_epoch(UID) {
            self.send_to_operator(sidecar, ToOperator::Seen { epoch });
        }
        self.send_states(sidecar, self.states_of(sidecar));
        let both_down = !self.api_up[cluster] && !self.grpc_up[cluster];
        if both_down
            && self.now.saturating_sub(self.sidecars[sidecar].last_heard)
                >= self.config.fail_safe_ms
        {
            self.sidecar_input(sidecar, Input::FailSafeTimer)?;
        }
        Ok(())
    }

    /// The sidecar's latest acknowledgements, one per point.
    fn acks_of(&self, sidecar: usize) -> Vec<enforce::Ack> {
        let mut by_point: BTreeMap<(u64, Stage, bool), Vec<String>> = BTreeMap::new();
        for (volume, (point, fail_safe)) in &self.sidecars[sidecar].acked {
            by_point
                .entry((point.epoch, point.stage, *fail_safe))
                .or_default()
                .push(volume.clone());
        }
        by_point
            .into_iter()
            .map(|((epoch, stage, fail_safe), volumes)| enforce::Ack {
                point: GroupEpoch {
                    group_uid: UID.into(),
                    epoch,
                    stage,
                },
                volumes,
                fail_safe,
            })
            .collect()
    }

    fn send_to_operator(&mut self, sidecar: usize, message: ToOperator) {
        let cluster = self.sidecars[sidecar].cluster;
        if !self.grpc_up[cluster] {
            return;
        }
        let faulty = !self.healing;
        if faulty && self.rng.chance(50) {
            self.fault("gRPC message lost");
            return;
        }
        let copies = if faulty && self.rng.chance(30) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = self.rng.between(1, 40);
            self.at(
                delay,
                Step::GrpcToOperator {
                    message: message.clone(),
                    incarnation: self.operator_incarnation,
                },
            );
        }
    }

    // --- The operator ----------------------------------------------------------------------------

    fn events_of(&self, message: ToOperator) -> Vec<freeze::Event> {
        match message {
            ToOperator::Report {
                cluster,
                node,
                failures,
            } => failures
                .into_iter()
                .map(|failure| {
                    freeze::Event::Report(freeze::Report {
                        path: Path::Grpc,
                        cluster: format!("c{cluster}"),
                        node: node.clone(),
                        volume_handle: failure.volume,
                        epoch_seen: failure.epoch_seen,
                        message: failure.error,
                    })
                })
                .collect(),
            ToOperator::Ack { cluster, ack } => vec![self.ack_event(Path::Grpc, cluster, ack)],
            ToOperator::Seen { epoch } => vec![freeze::Event::Seen { epoch }],
            // Taken into the members by the resolution (`take_states`), not a freeze event.
            ToOperator::States { .. } => Vec::new(),
            ToOperator::HoldTimedOut { cluster, timeouts } => timeouts
                .into_iter()
                .map(|timeout| {
                    freeze::Event::HoldTimedOut(freeze::HoldTimeoutReport {
                        path: Path::Grpc,
                        cluster: format!("c{cluster}"),
                        volume_handle: timeout.volume,
                        epoch: timeout.epoch,
                        failed_writes: timeout.failed_writes,
                        since: None,
                    })
                })
                .collect(),
        }
    }

    /// The engine's member resolution: a node's report of its volumes' states, taken by the members
    /// it serves with the operator's real rule (`ReportedState::apply_to`), before the next decision.
    fn take_states(&mut self, cluster: usize, node: &str, states: &[(String, ReportedState)]) {
        let Some(status) = self.group.status.as_mut() else {
            return;
        };
        let cluster = format!("c{cluster}");
        for (handle, reported) in states {
            if let Some(member) = status.members.iter_mut().find(|m| {
                m.cluster == cluster
                    && m.volume_handle.as_deref() == Some(handle.as_str())
                    && m.node.as_deref() == Some(node)
            }) {
                reported.apply_to(member);
            }
        }
    }

    fn ack_event(&self, path: Path, cluster: usize, ack: enforce::Ack) -> freeze::Event {
        freeze::Event::Ack(freeze::Ack {
            path,
            cluster: format!("c{cluster}"),
            epoch: ack.point.epoch,
            stage: ack.point.stage,
            volume_handles: ack.volumes,
            fail_safe: ack.fail_safe,
        })
    }

    fn events_of_node(&self, sidecar: usize) -> Vec<freeze::Event> {
        let cluster = self.sidecars[sidecar].cluster;
        let status = &self.nodes[sidecar];
        let mut events: Vec<freeze::Event> = status
            .failures
            .iter()
            .map(|failure| {
                freeze::Event::Report(freeze::Report {
                    path: Path::Api,
                    cluster: format!("c{cluster}"),
                    node: self.sidecars[sidecar].name.clone(),
                    volume_handle: failure.volume.clone(),
                    epoch_seen: failure.epoch_seen,
                    message: failure.error.clone(),
                })
            })
            .collect();
        events.extend(
            status
                .enforced
                .iter()
                .map(|ack| self.ack_event(Path::Api, cluster, ack.clone())),
        );
        events
    }

    fn decide(&mut self, events: Vec<freeze::Event>) -> Result<(), Box<Violation>> {
        if events.is_empty() {
            return Ok(());
        }
        let decision = match freeze::decide_batch(&self.group, &events, &time(self.now)) {
            Ok(decision) => decision,
            Err(error) => return Err(self.violation(format!("the freeze core refused: {error}"))),
        };
        if let Some(point) = &decision.freeze_now {
            self.broadcast(point.clone());
            // Rule 1 lets the operator die between sending a freeze and persisting it.
            if !self.healing && self.rng.chance(20) {
                self.fault("operator died before persisting a freeze");
                self.operator_up = false;
                self.operator_incarnation += 1;
                let delay = self.rng.between(200, 2_000);
                self.at(delay, Step::OperatorUp);
                return Ok(());
            }
        }
        let before = position(&self.group);
        if self.group.status.as_ref() != Some(&decision.status) {
            let after = decision.status.position();
            if after.0 < before.0 {
                return Err(self.violation(format!(
                    "the group's epoch went back from {} to {}",
                    before.0, after.0
                )));
            }
            // Only the epoch after the persisted one can have been sent (rule 8): none further is
            // ever decided, whatever a member claims.
            if after.0 > before.0 + 1 {
                return Err(self.violation(format!(
                    "the group's epoch jumped from {} to {}, past any epoch ever sent",
                    before.0, after.0
                )));
            }
            if after.1 == Stage::Release && after > before {
                self.check_release(after.0)?;
            }
            let named = |status: Option<&ConsistencyGroupStatus>| {
                status
                    .and_then(|s| s.consistent_image.as_ref())
                    .map(|image| image.epoch)
            };
            if named(Some(&decision.status)) == Some(after.0)
                && named(self.group.status.as_ref()) != Some(after.0)
                && let Some(image) = &decision.status.consistent_image
            {
                self.check_named_image(image)?;
            }
            self.group.status = Some(decision.status);
        }
        if let Some(point) = decision.after_persist {
            self.broadcast(point);
        }
        Ok(())
    }

    /// The image a freeze names as its own is what the named volumes' secondaries hold now, with no
    /// rollback: those contents must be dependent-write consistent. A volume counted in sync while its
    /// resync was still overwriting its secondary (its own writes copied out of order) breaks this,
    /// though the kept images — what the global check reads — stay consistent.
    fn check_named_image(
        &self,
        image: &lockstep_api::v1alpha1::ConsistentImage,
    ) -> Result<(), Box<Violation>> {
        let named: Vec<bool> = self
            .volumes
            .iter()
            .map(|v| {
                let cluster = format!("c{}", v.cluster);
                image
                    .volumes
                    .iter()
                    .any(|i| i.cluster == cluster && i.volume_handle == v.handle)
            })
            .collect();
        let on = |write: usize| {
            let volume = self.writes[write].volume;
            named[volume] && self.volumes[volume].image.contains(&write)
        };
        let first_missing = self
            .acknowledged
            .iter()
            .position(|&w| named[self.writes[w].volume] && !on(w))
            .unwrap_or(self.acknowledged.len());
        let dependent =
            (0..self.writes.len()).find(|&w| on(w) && self.writes[w].predecessors > first_missing);
        if let Some(dependent) = dependent {
            let missing = self.acknowledged[first_missing];
            return Err(self.violation(format!(
                "the group names the image of epoch {} ({} volumes), but its secondaries as they are are not dependent-write consistent: write {dependent} (on {}) is there, write {missing} (on {}), acknowledged before it was issued, is not",
                image.epoch,
                image.volumes.len(),
                self.volumes[self.writes[dependent].volume].handle,
                self.volumes[self.writes[missing].volume].handle
            )));
        }
        Ok(())
    }

    /// A release at `epoch` is decided only when every member volume is suspended at that epoch (or
    /// further): no dependent write can reach a secondary after its predecessor was lost.
    fn check_release(&self, epoch: u64) -> Result<(), Box<Violation>> {
        for v in &self.volumes {
            if !v.frozen_at(epoch) {
                return Err(self.violation(format!(
                    "release at epoch {epoch} decided while c{}/{} is {:?}",
                    v.cluster,
                    v.handle,
                    v.snapshot()
                        .map(|s| (s.mode, s.epoch, s.stage))
                        .or_else(|| v.state_file.as_ref().map(|p| (
                            hold::Mode::Unconfirmed,
                            p.epoch,
                            p.stage
                        ))),
                )));
            }
        }
        Ok(())
    }

    /// Sends a point on both paths: pushed over gRPC to every sidecar, written to every reachable
    /// member's mirror.
    fn broadcast(&mut self, target: GroupEpoch) {
        for sidecar in 0..self.sidecars.len() {
            let cluster = self.sidecars[sidecar].cluster;
            if !self.grpc_up[cluster] {
                continue;
            }
            if !self.healing && self.rng.chance(50) {
                self.fault("gRPC message lost");
                continue;
            }
            let delay = self.rng.between(1, 40);
            let incarnation = self.sidecars[sidecar].incarnation;
            self.at(
                delay,
                Step::GrpcToSidecar {
                    sidecar,
                    target: target.clone(),
                    incarnation,
                },
            );
        }
        for cluster in 0..self.mirrors.len() {
            if !self.api_up[cluster] {
                continue;
            }
            let newer = self.mirrors[cluster]
                .as_ref()
                .is_none_or(|old| level_of(&target) > level_of(old));
            if newer {
                self.mirrors[cluster] = Some(target.clone());
            }
        }
    }

    fn person_resyncs(&mut self) {
        let (epoch, stage) = position(&self.group);
        if stage == Stage::Resume {
            return;
        }
        // A person thaws a frozen group (FreezeAndStop: first releases it, as the runbook says).
        if stage == Stage::Freeze && self.group.spec.policy == Policy::FreezeAndStop {
            self.group.spec.release = Some(EpochIntent { epoch });
        }
        self.group.spec.resync = Some(EpochIntent { epoch });
    }

    fn liveness(&mut self) -> Result<(), Box<Violation>> {
        let (epoch, stage) = position(&self.group);
        if stage != Stage::Resume {
            return Err(self.violation(format!(
                "after the heal phase the group is still at epoch {epoch} stage {stage:?}"
            )));
        }
        self.replicators_in_sync()
    }
}
