//! The demo scenario: two simulated clusters (east, the hub, and west), three replicated volumes, the
//! dependent-write workload across all three, one replication link cut, the freeze, the consistency
//! checker's verdict on the secondaries, and the link restored.
//!
//! [`run_scenario`] runs it against any [`ControlSystem`], saying each step on a [`Timeline`]; the
//! binary prints the timeline as it happens, tests keep it and assert on the [`ScenarioReport`].

use std::time::Duration;

use lockstep_api::domain::Policy;
use lockstep_api::v1alpha1::ConsistencyGroup;
use lockstep_checker::{
    CheckOptions, Layout, OnError, Progress, Source, Verdict, WorkloadHandle, WorkloadOptions,
    WorkloadReport,
};
use lockstep_replicator::Event;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::cluster::ClusterError;
use crate::control::{ControlError, ControlSystem, CopyFailure, FreezeOutcome, ThawOutcome};
use crate::faults::LinkCutMode;
use crate::kubectl;
use crate::timeline::Timeline;
use crate::world::{World, WorldError, WorldSpec};

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
}

/// Runs the scenario on the repository's example world (see [`WorldSpec::example`]).
pub async fn run_scenario<C: ControlSystem>(
    options: &ScenarioOptions,
    control: &mut C,
    timeline: &Timeline,
) -> Result<ScenarioReport, ScenarioError> {
    timeline.say(
        "Lockstep demo: two simulated clusters, three replicated volumes in one ConsistencyGroup, \
         a dependent-write workload, one replication link cut",
    );
    let mut spec = WorldSpec::example(options.volume_mib << 20)?;
    if let Some(policy) = options.policy {
        spec.group.spec.policy = policy;
    }
    let world = World::start(spec, timeline).await?;
    run_in_world(&world, options, control, timeline).await
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
                if tx.send((name.clone(), node.clone(), event)).is_err() {
                    break;
                }
            }
        });
    }

    control.enroll(world, timeline).await?;

    // The workload.
    let volumes = handles.len() as u32;
    let layout = Layout::with_span(
        volumes,
        options.lanes,
        options.span.min(volumes),
        options.slots,
        0,
    )?;
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
        options.lanes,
        handles.join(", "),
        layout.span(),
        workload.current().acked,
    ));

    // The fault.
    cut_cluster.cut_link(&options.cut, options.cut_mode)?;
    timeline.say(format!(
        "fault: replication link of {} ({}) {}",
        options.cut,
        cut_cluster.name(),
        options.cut_mode
    ));
    let (cluster, node, failed) = tokio::time::timeout(STEP_DEADLINE, async {
        while let Some((cluster, node, event)) = events.recv().await {
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
            crate::control::mode_words_of(&status.mode),
            status.held
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
    kube::Api::<ConsistencyGroup>::all(world.hub().client.clone())
        .patch(
            &world.group_name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&intent),
        )
        .await
        .map_err(|source| ClusterError::Kube {
            cluster: world.hub().name().to_owned(),
            what: format!("setting spec.resync.epoch of cg {}", world.group_name),
            source,
        })?;
    timeline.say(format!(
        "{}: kubectl patch cg {} --type merge -p '{intent}'",
        world.hub().name(),
        world.group_name
    ));
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
                status.dirty_bytes.div_ceil(1024),
                match &thaw {
                    ThawOutcome::Resumed => "",
                    ThawOutcome::Unsupported(_) => ": resync needs the replicator's Resume",
                }
            ),
        });
        differences.push((v.spec.handle.clone(), diff));
    }
    let group = world.group_now().await?;
    timeline.say(format!(
        "{}: {}",
        world.hub().name(),
        kubectl::cg_line(&group)
    ));
    // The operator mirrors the group into every other member cluster, so `kubectl get cg` answers there.
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
    })
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
