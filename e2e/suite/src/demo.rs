//! The demo scenario: simulated clusters (by default the example's two, east the hub and west, with
//! three replicated volumes), the dependent-write workload across every volume, one replication link cut
//! (optionally with a control path down), the freeze and its timeline relative to the failure, the
//! consistency checker's verdict on the secondaries, the check that nothing acknowledged was lost on the
//! primaries, and the link restored and resynced. The CRDs, the group and the resync intent are applied
//! with the real kubectl, and `kubectl get cg -A` shows the group in every cluster.
//!
//! [`run_scenario`] runs it against any [`ControlSystem`], saying each step on a [`Timeline`]; the
//! binary prints the timeline as it happens, tests keep it and assert on the [`ScenarioReport`].

use std::time::{Duration, Instant, SystemTime};

use lockstep_api::domain::Policy;
use lockstep_api::v1alpha1::ConsistencyGroup;
use lockstep_checker::{
    CheckOptions, Layout, OnError, Progress, Source, Verdict, WorkloadHandle, WorkloadOptions,
    WorkloadReport,
};
use lockstep_replicator::{Event, ReplMode};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::cluster::{ApiSource, ClusterError};
use crate::control::{ControlError, ControlSystem, CopyFailure, FreezeOutcome, ThawOutcome};
use crate::faults::{ControlPathFault, LinkCutMode};
use crate::kubectl::{self, KubectlError};
use crate::observe::NodeStatusLog;
use crate::timeline::{Milestone, Timeline};
use crate::world::{EXAMPLE_CLUSTERS, EXAMPLE_VOLUMES, World, WorldError, WorldSpec};

/// How long the workload may take to get going, and a failure to be reported.
const STEP_DEADLINE: Duration = Duration::from_secs(30);
/// The window over which writes per second are measured for display.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// What the scenario does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioOptions {
    /// The volume whose replication link is cut.
    pub cut: String,
    /// How the link is cut.
    pub cut_mode: LinkCutMode,
    /// Size of every volume, in MiB.
    pub volume_mib: u64,
    /// Concurrent dependent-write chains.
    pub lanes: u32,
    /// How many volumes each lane cycles over.
    pub span: u32,
    /// Slots per lane on each volume.
    pub slots: u64,
    /// Writes acknowledged before the link is cut.
    pub writes_before_cut: u64,
    /// The group's policy; `None` keeps the example's (FreezeAndGo).
    pub policy: Option<Policy>,
    /// Simulated clusters (2 is the example; see [`WorldSpec::sized`]).
    pub clusters: usize,
    /// Replicated volumes in total (3 is the example).
    pub volumes: usize,
    /// Apply the CRDs, the group and the resync intent with the real kubectl (else kube-rs).
    pub kubectl: bool,
    /// A control path taken down while the link is cut.
    pub path_fault: Option<ControlPathFault>,
    /// The clusters' API servers: the embedded test API server, or real kube-apiservers on etcd.
    pub api_source: ApiSource,
}

impl Default for ScenarioOptions {
    fn default() -> Self {
        Self {
            cut: "east-postgres-data".into(),
            cut_mode: LinkCutMode::Reset,
            volume_mib: 16,
            lanes: 3,
            span: 2,
            slots: 256,
            writes_before_cut: 300,
            policy: None,
            clusters: EXAMPLE_CLUSTERS,
            volumes: EXAMPLE_VOLUMES,
            kubectl: true,
            path_fault: None,
            api_source: ApiSource::TestServer,
        }
    }
}

/// Why the scenario could not run to its verdict.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The world could not be built.
    #[error(transparent)]
    World(#[from] WorldError),
    /// A cluster failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The control system failed.
    #[error("control system: {0}")]
    Control(#[from] ControlError),
    /// The workload failed.
    #[error("workload: {0}")]
    Workload(#[from] lockstep_checker::WorkloadError),
    /// The workload did not get where it had to.
    #[error("workload: {0}")]
    Wait(#[from] lockstep_checker::WaitError),
    /// The layout is unusable.
    #[error("layout: {0}")]
    Layout(#[from] lockstep_checker::layout::LayoutError),
    /// The checker could not read the images.
    #[error("checker: {0}")]
    Check(#[from] lockstep_checker::CheckError),
    /// The volume to cut is not in the world.
    #[error("no volume {0} to cut (the volumes are {1})")]
    NoSuchVolume(String, String),
    /// A kubectl command failed.
    #[error(transparent)]
    Kubectl(#[from] KubectlError),
    /// No failed copy was reported in time.
    #[error("no replicator reported a failed copy within {0:?} of the cut")]
    NoFailure(Duration),
}

/// What the scenario found.
#[derive(Debug)]
pub struct ScenarioReport {
    /// The checker's verdict on the secondaries.
    pub verdict: Verdict,
    /// The checker's verdict on the primaries once the workload stopped, requiring every acknowledged
    /// write: consistent means nothing acknowledged was lost.
    pub primaries: Verdict,
    /// Per lane, the last write acknowledged when the failure was reported: the secondaries must hold it.
    pub acked_before_failure: Vec<u64>,
    /// The failure that started the freeze.
    pub failure: CopyFailure,
    /// The freeze.
    pub freeze: FreezeOutcome,
    /// The thaw.
    pub thaw: ThawOutcome,
    /// The workload's own account.
    pub workload: WorkloadReport,
    /// Per volume, where its primary and secondary first differ after the thaw (`None`: identical).
    pub differences: Vec<(String, Option<u64>)>,
    /// The freeze's timeline: what happened, by time since the failed copy was detected (negative:
    /// before), in order.
    pub freeze_timeline: Vec<(f64, String)>,
}

/// Runs the scenario on the repository's example world, or the generated one its options ask for (see
/// [`WorldSpec::sized`]).
pub async fn run_scenario<C: ControlSystem>(
    options: &ScenarioOptions,
    control: &mut C,
    timeline: &Timeline,
) -> Result<ScenarioReport, ScenarioError> {
    timeline.say(format!(
        "Lockstep demo: {} simulated clusters, {} replicated volumes in one ConsistencyGroup, \
         a dependent-write workload, one replication link cut{}",
        options.clusters,
        options.volumes,
        options
            .path_fault
            .map_or_else(String::new, |f| format!(" with {f}"))
    ));
    let mut spec = WorldSpec::sized(options.clusters, options.volumes, options.volume_mib << 20)?;
    if let Some(policy) = options.policy {
        spec.group.spec.policy = policy;
    }
    for cluster in &mut spec.clusters {
        cluster.api_source = options.api_source.clone();
    }
    let world = if options.kubectl {
        World::start_with_kubectl(spec, timeline).await?
    } else {
        World::start(spec, timeline).await?
    };
    let outcome = run_in_world(&world, options, control, timeline).await;
    world.close().await;
    outcome
}

/// Runs the scenario in an existing world.
pub async fn run_in_world<C: ControlSystem>(
    world: &World,
    options: &ScenarioOptions,
    control: &mut C,
    timeline: &Timeline,
) -> Result<ScenarioReport, ScenarioError> {
    let handles: Vec<String> = world
        .volumes()
        .map(|(_, v)| v.spec.handle.clone())
        .collect();
    let (cut_cluster, _) = world
        .find_volume(&options.cut)
        .ok_or_else(|| ScenarioError::NoSuchVolume(options.cut.clone(), handles.join(", ")))?;
    timeline.say(format!("control system: {}", control.describe()));

    // Replication events from every node, before anything can fail.
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut listeners = JoinSet::new();
    for cluster in &world.clusters {
        let mut rx = cluster.primary.subscribe();
        let tx = events_tx.clone();
        let (name, node) = (cluster.name().to_owned(), cluster.spec.node.clone());
        listeners.spawn(async move {
            while let Ok(event) = rx.recv().await {
                if tx
                    .send((Instant::now(), name.clone(), node.clone(), event))
                    .is_err()
                {
                    break;
                }
            }
        });
    }

    control.enroll(world, timeline).await?;
    let node_statuses = NodeStatusLog::start(world);

    // The workload.
    let volumes = handles.len() as u32;
    // Enough lanes that every volume is written (lane i cycles over volumes i .. i + span).
    let span = options.span.min(volumes);
    let lanes = options.lanes.max(volumes + 1 - span);
    let layout = Layout::with_span(volumes, lanes, span, options.slots, 0)?;
    let mut wopts = WorkloadOptions::new(layout, None);
    wopts.on_error = OnError::Retry;
    wopts.retry_backoff = Duration::from_millis(20);
    wopts.flush_at_end = false;
    let run_id = wopts.run_id;
    let addresses = world.volumes().map(|(_, v)| v.nbd.clone()).collect();
    let mut workload = WorkloadHandle::spawn(addresses, wopts);
    workload
        .wait_for_acked(options.writes_before_cut, STEP_DEADLINE)
        .await?;
    let rate = writes_per_second(&workload).await;
    timeline.say(format!(
        "workload: run {run_id:#x}, {} lanes over {} ({} volumes each), every write issued after the \
         previous one was acknowledged; {} acknowledged so far, {rate:.0} writes/s, each copied synchronously",
        lanes,
        handles.join(", "),
        layout.span(),
        workload.current().acked,
    ));

    // The fault.
    let path_down = take_path_down(world, options.path_fault, control, timeline).await?;
    cut_cluster.cut_link(&options.cut, options.cut_mode)?;
    timeline.say(format!(
        "fault: replication link of {} ({}) {}",
        options.cut,
        cut_cluster.name(),
        options.cut_mode
    ));
    let (cluster, node, failed) = tokio::time::timeout(STEP_DEADLINE, async {
        while let Some((_, cluster, node, event)) = events.recv().await {
            if let Event::CopyFailed(f) = event {
                return Some((cluster, node, f));
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .ok_or(ScenarioError::NoFailure(STEP_DEADLINE))?;
    // The moment the replicator detected the failure: the freeze timeline's zero.
    let failed_at = SystemTime::now()
        .duration_since(failed.since)
        .ok()
        .and_then(|ago| Instant::now().checked_sub(ago))
        .unwrap_or_else(Instant::now);
    // Every write acknowledged by now was copied (a write is acknowledged only once its secondary has
    // it, until a release), so the secondaries must reach these.
    let at_failure = workload.current();
    let acked_before_failure = at_failure.last_acked.clone();
    let failure = CopyFailure {
        cluster: cluster.clone(),
        node: node.clone(),
        volume: failed.volume.clone(),
        sequence: failed.sequence,
        error: failed.error.clone(),
    };
    timeline.say(format!(
        "{cluster}/{node}: CopyFailed: volume {}, write #{} not copied: {}",
        failed.volume, failed.sequence, failed.error
    ));
    if let Some(c) = world.clusters.iter().find(|c| c.name() == cluster) {
        let status = c.volume_status(&failed.volume)?;
        timeline.say(format!(
            "{cluster}/{node}: {} is {}; {} writes held (not acknowledged)",
            failed.volume,
            crate::control::mode_words_of(&status.replication.mode),
            status.replication.held
        ));
    }
    timeline.say(format!(
        "workload: acknowledged per lane when the failure was reported: {:?}{}",
        acked_before_failure,
        in_flight(&at_failure)
    ));

    // The freeze.
    let freeze = control.freeze(world, &failure, timeline).await?;
    let rate = writes_per_second(&workload).await;
    let now = workload.current();
    timeline.say(format!(
        "workload: {rate:.0} writes/s after the freeze ({}); {} writes acknowledged, {} failed attempts{}",
        if freeze.released {
            "primaries run on, unreplicated"
        } else {
            "FreezeAndStop: writes stay held until a person releases or resyncs"
        },
        now.acked,
        now.failures,
        in_flight(&now)
    ));
    let mut seen = Vec::new();
    while let Ok((at, cluster, _, event)) = events.try_recv() {
        seen.push((at, cluster, event));
    }
    let mut milestones = control.milestones();
    milestones.extend(node_statuses.milestones(&world.group_uid, freeze.epoch));
    let freeze_timeline = freeze_timeline(failed_at, &failure, freeze.epoch, &seen, &milestones);
    timeline.say(format!(
        "the freeze, from the failed copy (+0 ms: {} detected the failure of write #{} on {}):\n{}",
        failure.node,
        failure.sequence,
        failure.volume,
        freeze_timeline
            .iter()
            .map(|(ms, what)| format!("{ms:>+9.1} ms  {what}"))
            .collect::<Vec<_>>()
            .join("\n")
    ));

    // The verdict, on the secondaries only, while the primaries run on.
    let sources: Vec<Source> = world.volumes().map(|(_, v)| v.secondary_source()).collect();
    timeline.say(format!(
        "checker: reading the {} secondaries (the disaster-recovery site): {}",
        sources.len(),
        sources
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let verdict = lockstep_checker::check_sources(
        &sources,
        &CheckOptions::lanes(acked_before_failure.clone()).run(run_id),
    )
    .await?;
    timeline.say(format!("checker: {}", verdict.to_string().trim_end()));

    let report = workload.stop_and_join().await?;
    timeline.say(format!("workload stopped: {report}"));
    // Nothing acknowledged was lost: the primaries hold every lane up to its last acknowledged write.
    let primaries: Vec<Source> = world.volumes().map(|(_, v)| v.primary_source()).collect();
    let on_primaries = lockstep_checker::check_sources(
        &primaries,
        &CheckOptions::lanes(report.last_acked.clone()).run(run_id),
    )
    .await?;
    timeline.say(if on_primaries.is_consistent() {
        format!(
            "primaries: every acknowledged write is there (per lane up to {:?}), nothing lost",
            report.last_acked
        )
    } else {
        format!(
            "primaries: acknowledged writes are MISSING: {}",
            on_primaries.to_string().trim_end()
        )
    });

    // Back to normal.
    bring_path_back(world, path_down, control, timeline).await?;
    for c in &world.clusters {
        for v in &c.volumes {
            if !c.link_is_up(&v.spec.handle)? {
                c.restore_link(&v.spec.handle)?;
                timeline.say(format!(
                    "fault cleared: replication link of {} ({}) restored",
                    v.spec.handle,
                    c.name()
                ));
            }
        }
    }
    // The person's intent, named by epoch so that it acts once: thaw and resync.
    let intent = serde_json::json!({"spec": {"resync": {"epoch": freeze.epoch}}});
    set_resync_intent(world, &intent, timeline).await?;
    let thaw = control.thaw(world, timeline).await?;
    let mut differences = Vec::new();
    for (c, v) in world.volumes() {
        let diff =
            lockstep_checker::first_difference(&v.primary_source(), &v.secondary_source()).await?;
        let status = c.volume_status(&v.spec.handle)?;
        timeline.say(match diff {
            None => format!(
                "compare: {} primary and secondary are identical, byte for byte",
                v.spec.handle
            ),
            Some(at) => format!(
                "compare: {} primary and secondary differ from byte {at} ({} KiB dirty, never copied){}",
                v.spec.handle,
                status.replication.dirty_bytes.div_ceil(1024),
                match &thaw {
                    ThawOutcome::Resumed => "",
                    ThawOutcome::Unsupported(_) => ": resync needs the replicator's Resume",
                }
            ),
        });
        differences.push((v.spec.handle.clone(), diff));
    }
    show_groups(world, timeline).await?;
    timeline.say(format!(
        "verdict: {}",
        if verdict.is_consistent() {
            format!(
                "CONSISTENT: the secondaries hold a state the application was in, frozen at epoch {}",
                freeze.epoch
            )
        } else {
            "INCONSISTENT: the secondaries hold a state the application was never in".to_owned()
        }
    ));
    listeners.abort_all();
    Ok(ScenarioReport {
        verdict,
        primaries: on_primaries,
        acked_before_failure,
        failure,
        freeze,
        thaw,
        workload: report,
        differences,
        freeze_timeline,
    })
}

/// Takes the control path `fault` names down, saying so; returns it, to be brought back.
async fn take_path_down<C: ControlSystem>(
    world: &World,
    fault: Option<ControlPathFault>,
    control: &mut C,
    timeline: &Timeline,
) -> Result<Option<ControlPathFault>, ScenarioError> {
    match fault {
        None => {}
        Some(ControlPathFault::ApiDown) => {
            let member = world.clusters.last().unwrap_or(world.hub());
            member.stop_api_server().await?;
            timeline.say(format!(
                "fault: {}'s API server stopped (connections refused): its sidecar has only the gRPC path",
                member.name()
            ));
        }
        Some(ControlPathFault::GrpcDown) => {
            control.set_grpc_path(true)?;
            timeline.say(
                "fault: the sidecars' gRPC connections to the operator reset and refused: only the API path is left",
            );
        }
    }
    Ok(fault)
}

/// Brings back the control path [`take_path_down`] took down.
async fn bring_path_back<C: ControlSystem>(
    world: &World,
    fault: Option<ControlPathFault>,
    control: &mut C,
    timeline: &Timeline,
) -> Result<(), ScenarioError> {
    match fault {
        None => {}
        Some(ControlPathFault::ApiDown) => {
            let member = world.clusters.last().unwrap_or(world.hub());
            member.start_api_server().await?;
            timeline.say(format!(
                "fault cleared: {}'s API server is back",
                member.name()
            ));
        }
        Some(ControlPathFault::GrpcDown) => {
            control.set_grpc_path(false)?;
            timeline.say("fault cleared: the gRPC path to the operator is back");
        }
    }
    Ok(())
}

/// The person's intent to thaw and resync, named by epoch so that it acts once: `kubectl patch` in the
/// hub (or the same merge patch through kube-rs in a world without kubectl).
async fn set_resync_intent(
    world: &World,
    intent: &serde_json::Value,
    timeline: &Timeline,
) -> Result<(), ScenarioError> {
    let hub = world.hub();
    if let Some(k) = &world.kubectl {
        let patch = intent.to_string();
        let args = [
            "patch",
            "cg",
            world.group_name.as_str(),
            "--type=merge",
            "-p",
            &patch,
        ];
        k.run(hub.name(), &hub.kubeconfig, &args, timeline).await?;
        return Ok(());
    }
    kube::Api::<ConsistencyGroup>::all(hub.client.clone())
        .patch(
            &world.group_name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(intent),
        )
        .await
        .map_err(|source| ClusterError::Kube {
            cluster: hub.name().to_owned(),
            what: format!("setting spec.resync.epoch of cg {}", world.group_name),
            source,
        })?;
    timeline.say(format!(
        "{}: spec.resync set on cg {}: {intent}",
        hub.name(),
        world.group_name
    ));
    Ok(())
}

/// The group in every cluster: `kubectl get cg -A` (the hub's group and the operator's mirror in every
/// other member), or one-line summaries read with kube-rs in a world without kubectl.
async fn show_groups(world: &World, timeline: &Timeline) -> Result<(), ScenarioError> {
    if let Some(k) = &world.kubectl {
        for c in &world.clusters {
            k.run(c.name(), &c.kubeconfig, &["get", "cg", "-A"], timeline)
                .await?;
        }
        // Every volume of the group, per node, from its shards in the hub.
        let hub = world.hub();
        k.run(hub.name(), &hub.kubeconfig, &["get", "cgshard"], timeline)
            .await?;
        return Ok(());
    }
    let group = world.group_now().await?;
    timeline.say(format!(
        "{}: {}",
        world.hub().name(),
        kubectl::cg_line(&group)
    ));
    for c in world.clusters.iter().skip(1) {
        let mirror = kube::Api::<ConsistencyGroup>::all(c.client.clone())
            .get_opt(&world.group_name)
            .await
            .map_err(|source| ClusterError::Kube {
                cluster: c.name().to_owned(),
                what: format!("reading the mirror of cg {}", world.group_name),
                source,
            })?;
        timeline.say(match mirror {
            Some(m) => format!("{}: {} (mirror)", c.name(), kubectl::cg_line(&m)),
            None => format!("{}: no mirror of cg/{}", c.name(), world.group_name),
        });
    }
    Ok(())
}

/// The freeze, in order, in milliseconds from `failed_at`: each member volume frozen and released by its
/// replicator at `epoch` (from the replicators' own events), and what the control system saw.
fn freeze_timeline(
    failed_at: Instant,
    failure: &CopyFailure,
    epoch: u64,
    replicator_events: &[(Instant, String, Event)],
    milestones: &[Milestone],
) -> Vec<(f64, String)> {
    let ms = |at: Instant| match at.checked_duration_since(failed_at) {
        Some(after) => after.as_secs_f64() * 1e3,
        None => -(failed_at.duration_since(at).as_secs_f64() * 1e3),
    };
    let mut lines = Vec::new();
    let mut frozen = std::collections::BTreeSet::new();
    let mut released = std::collections::BTreeSet::new();
    for (at, cluster, event) in replicator_events {
        let Event::StateChanged(status) = event else {
            continue;
        };
        let volume = &status.name;
        match status.replication.mode {
            ReplMode::Suspended { epoch: e, .. } if e == epoch && frozen.insert(volume.clone()) => {
                lines.push((
                    ms(*at),
                    format!(
                        "{cluster}/{volume}: frozen at epoch {e} by its replicator (writes held)"
                    ),
                ));
            }
            ReplMode::Running { epoch: e, .. } if e == epoch && released.insert(volume.clone()) => {
                lines.push((
                    ms(*at),
                    format!(
                        "{cluster}/{volume}: held writes released (primary-only now, changes tracked for the resync)"
                    ),
                ));
            }
            _ => {}
        }
    }
    // The control system's milestones of this freeze: from just before the failure (a report can
    // overtake the replicator's event to this process) until now.
    let since = failed_at.checked_sub(Duration::from_millis(100));
    for m in milestones {
        if since.is_none_or(|s| m.at >= s) {
            lines.push((ms(m.at), m.what.clone()));
        }
    }
    lines.sort_by(|a, b| a.0.total_cmp(&b.0));
    lines.insert(
        0,
        (
            0.0,
            format!(
                "{}/{}: copy of write #{} on {} failed",
                failure.cluster, failure.node, failure.sequence, failure.volume
            ),
        ),
    );
    lines
}

fn in_flight(p: &Progress) -> String {
    let waiting: Vec<String> = p
        .in_flight
        .iter()
        .enumerate()
        .filter_map(|(lane, s)| s.map(|s| format!("lane {lane} write {s}")))
        .collect();
    if waiting.is_empty() {
        String::new()
    } else {
        format!("; waiting for an answer: {}", waiting.join(", "))
    }
}

/// Acknowledged writes per second over [`RATE_WINDOW`] (a measurement for display, not a wait).
async fn writes_per_second(workload: &WorkloadHandle) -> f64 {
    let before = workload.current().acked;
    let start = tokio::time::Instant::now();
    tokio::time::sleep(RATE_WINDOW).await;
    let after = workload.current().acked;
    (after - before) as f64 / start.elapsed().as_secs_f64()
}
