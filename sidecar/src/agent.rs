//! The agent: one task that owns the [`Enforcer`], feeds it the inputs of both paths and the
//! replicator, runs the resulting operations on the replicator and publishes a [`Snapshot`] that the
//! paths send on (acknowledgements, reports, status).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lockstep_api::domain::{GroupEpoch, Path, VolumeState};
use lockstep_api::v1alpha1::ClaimRef;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use futures::StreamExt;

use crate::enforce::{
    Ack, Enforcer, Failure, GroupView, HoldTimeout, Input, Operation, Refusal, VolumeView,
};
use crate::metrics::{FailSafeLabels, GroupLabels, Metrics};
use crate::replicator::{Replicator, ReplicatorEvent};
use crate::report::{Backoff, Reports};

/// At most this many queued inputs are handled before the node's snapshot is published.
const INPUTS_PER_SNAPSHOT: usize = 64;

/// At most this many replicator operations of one burst run at once.
const CONCURRENT_OPERATIONS: usize = 32;

/// An acknowledgement as published: what, and when it was first produced (ms since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedAck {
    /// The acknowledgement.
    pub ack: Ack,
    /// When the node enforced it.
    pub at_unix_ms: i64,
}

/// What the paths send: the core's state after the last input.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The latest acknowledgement per group.
    pub acks: BTreeMap<String, PublishedAck>,
    /// Outstanding failures.
    pub failures: Vec<Failure>,
    /// Held writes failed by the hold timeout, per volume, until the group resumes or freezes again.
    pub hold_timeouts: Vec<HoldTimeout>,
    /// The highest point seen or carried per group.
    pub seen: Vec<GroupEpoch>,
    /// The local volumes.
    pub volumes: Vec<VolumeView>,
    /// The known groups.
    pub groups: Vec<GroupView>,
    /// The replicator's inventory is known.
    pub inventory_known: bool,
}

impl Snapshot {
    /// The volume state a sidecar reports for a volume.
    pub fn volume_state(&self, volume: &VolumeView) -> VolumeState {
        volume.state(&self.failures)
    }
}

/// What the paths share with the agent.
#[derive(Debug)]
pub struct Context {
    /// This node's name.
    pub node: String,
    /// This cluster's MemberCluster name.
    pub cluster: String,
    /// Inputs to the core.
    pub inputs: mpsc::UnboundedSender<Input>,
    /// The core's latest state.
    pub snapshot: watch::Receiver<Snapshot>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Which path delivered which failure.
    pub reports: Reports,
    /// Cancelled on shutdown.
    pub stop: CancellationToken,
    /// The claim bound to each volume, as a path named it (for the node status).
    claims: std::sync::Mutex<BTreeMap<String, ClaimRef>>,
    /// Asks the agent to list the replicator's volumes again (see [`Context::want_inventory`]).
    inventory_wanted: tokio::sync::Notify,
}

impl Context {
    /// Asks the agent to re-read what the replicator's volumes carry. The agent lists them itself,
    /// between its own operations: a listing taken while it configured volumes and read after would
    /// say they were still unconfirmed, and configure them again — for ever, at thousands of volumes,
    /// each configuration answered by another listing. Requests made before the agent lists are
    /// answered by one listing.
    pub fn want_inventory(&self) {
        self.inventory_wanted.notify_one();
    }

    /// Remembers the claims a path named for volumes (volume handle → claim).
    pub fn remember_claims(&self, named: impl IntoIterator<Item = (String, ClaimRef)>) {
        let mut claims = self
            .claims
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        claims.extend(named);
    }

    /// The claim bound to each volume, as the paths named them.
    pub fn claims(&self) -> BTreeMap<String, ClaimRef> {
        self.claims
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Feeds an input to the core (dropped after shutdown).
    pub fn send(&self, input: Input) {
        if self.inputs.send(input).is_err() {
            tracing::debug!("input after shutdown dropped");
        }
    }

    /// Sleeps, or returns false when stopping.
    pub async fn sleep(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// Agent timings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Re-list the replicator's volumes this often.
    pub inventory_interval: Duration,
    /// Fail safe after a failure reached neither path this long.
    pub fail_safe_interval: Duration,
    /// The control paths this sidecar runs (see [`Enforcer::with_paths`]).
    pub paths: BTreeSet<Path>,
}

/// The agent's state.
pub struct Agent {
    core: Enforcer,
    replicator: Replicator,
    context: Arc<Context>,
    publish: watch::Sender<Snapshot>,
    acks: BTreeMap<String, PublishedAck>,
    config: AgentConfig,
    logged: std::collections::BTreeSet<String>,
    /// Per group, the epoch whose kept images were dropped.
    images_dropped: BTreeMap<String, u64>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Agent {
    /// A new agent and its shared context.
    pub fn new(
        node: String,
        cluster: String,
        replicator: Replicator,
        metrics: Arc<Metrics>,
        config: AgentConfig,
        stop: CancellationToken,
    ) -> (Self, Arc<Context>, mpsc::UnboundedReceiver<Input>) {
        let (inputs, receiver) = mpsc::unbounded_channel();
        let (publish, snapshot) = watch::channel(Snapshot::default());
        let context = Arc::new(Context {
            node,
            cluster,
            inputs,
            snapshot,
            metrics,
            reports: Reports::new(),
            stop,
            claims: std::sync::Mutex::default(),
            inventory_wanted: tokio::sync::Notify::new(),
        });
        let agent = Self {
            core: Enforcer::with_paths(config.paths.clone()),
            replicator,
            context: context.clone(),
            publish,
            acks: BTreeMap::new(),
            config,
            logged: std::collections::BTreeSet::new(),
            images_dropped: BTreeMap::new(),
        };
        (agent, context, receiver)
    }

    /// Runs until the context stops.
    pub async fn run(mut self, mut inputs: mpsc::UnboundedReceiver<Input>) {
        let stop = self.context.stop.clone();
        let mut inventory = tokio::time::interval(self.config.inventory_interval);
        // Often enough for the shortest per-group interval too (half of a 1s hold timeout).
        let check = (self.config.fail_safe_interval / 4)
            .clamp(Duration::from_millis(20), Duration::from_millis(125));
        let mut fail_safe = tokio::time::interval(check);
        fail_safe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        inventory.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let context = self.context.clone();
        loop {
            // In this order: the fail-safe check is never held back by a stream of inputs, and the
            // inputs already queued go before a listing asked for after them (a copy failure's own
            // error, not the listing's "held", names the failure).
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = fail_safe.tick() => {
                    let failures = self.core.failures();
                    let (core, configured) = (&self.core, self.config.fail_safe_interval);
                    if self.context.reports.fail_safe_due(
                        &failures,
                        |group_uid| core.fail_safe_interval(group_uid, configured),
                        Instant::now(),
                    ) {
                        self.process(Input::FailSafeTimer).await;
                    }
                }
                input = inputs.recv() => match input {
                    Some(input) => {
                        // A burst (a freeze over both paths, hundreds of groups' memberships) is taken
                        // whole, then published once: a snapshot of every volume and group per input
                        // was most of a node's time with 500 groups on it.
                        let mut burst = vec![input];
                        while burst.len() < INPUTS_PER_SNAPSHOT {
                            match inputs.try_recv() {
                                Ok(input) => burst.push(input),
                                Err(_) => break,
                            }
                        }
                        self.handle_inputs(burst).await;
                        self.publish_snapshot();
                    }
                    None => break,
                },
                _ = inventory.tick() => self.refresh_inventory().await,
                () = context.inventory_wanted.notified() => self.refresh_inventory().await,
            }
        }
    }

    async fn refresh_inventory(&mut self) {
        match self.replicator.list().await {
            Ok(volumes) => {
                self.context.metrics.set_path_up("replicator", true);
                mark_ready(&self.context.metrics);
                self.process(Input::Inventory(volumes)).await;
            }
            Err(error) => {
                self.context.metrics.set_path_up("replicator", false);
                tracing::warn!(%error, "cannot list the replicator's volumes");
            }
        }
    }

    /// The group's name for logs and metrics, or its UID while the name is unknown. Called once per
    /// volume for every snapshot: a lookup, not a view of every group (that made a freeze of 1000
    /// volumes on one node quadratic).
    fn group_name(&self, uid: &str) -> String {
        self.core.group_name(uid).unwrap_or(uid).to_owned()
    }

    /// Handles one input and publishes what the node now shows.
    async fn process(&mut self, input: Input) {
        self.handle_inputs([input]).await;
        self.publish_snapshot();
    }

    /// Handles a burst of inputs: the core decides each in order, then the replicator's operations of
    /// all of them run — those on disjoint volumes concurrently, those on one volume in the order
    /// decided — and only then are the acknowledgements kept for the next snapshot. A freeze of many
    /// groups on one node is a burst of directives, each suspending a few volumes: one after the other
    /// they took the node two state-file syncs per volume in a row.
    async fn handle_inputs(&mut self, inputs: impl IntoIterator<Item = Input>) {
        let mut decided = Decided::default();
        for input in inputs {
            if let Input::GroupInSync {
                group_uid,
                epoch,
                volumes,
            } = input
            {
                // Dropping a kept image comes after every operation decided before it.
                self.apply(std::mem::take(&mut decided)).await;
                self.drop_images(group_uid, epoch, volumes).await;
                continue;
            }
            let out = self.decide(input);
            decided.operations.extend(out.operations);
            decided.acks.extend(out.acks);
        }
        self.apply(decided).await;
    }

    /// Drops the kept images of a group whose members are all in sync again.
    async fn drop_images(&mut self, group_uid: String, epoch: u64, volumes: BTreeSet<String>) {
        let done = self.images_dropped.get(&group_uid) >= Some(&epoch);
        if done || volumes.is_empty() {
            return;
        }
        let volumes: Vec<String> = volumes.into_iter().collect();
        match self
            .replicator
            .drop_image(&group_uid, epoch, &volumes)
            .await
        {
            Ok(()) => {
                tracing::info!(
                    group_uid,
                    epoch,
                    "every member in sync: kept images dropped"
                );
                self.images_dropped.insert(group_uid, epoch);
            }
            Err(error) => {
                tracing::warn!(%error, group_uid, epoch, "dropping the kept images failed; retried on the group's next update");
            }
        }
    }

    /// The core's decision on one input, its refusals and fail-safes logged and counted.
    fn decide(&mut self, input: Input) -> crate::enforce::Outcome {
        if let Input::Membership {
            group_uid,
            group_name,
            hold_timeout_ms,
            ..
        } = &input
        {
            let hold =
                Duration::from_millis(crate::enforce::bounded_hold_timeout_ms(*hold_timeout_ms));
            let configured = self.config.fail_safe_interval;
            let note = format!("fail-safe {group_uid} {hold:?}");
            if !hold.is_zero() && configured >= hold && self.logged.insert(note) {
                tracing::warn!(
                    group = %group_name,
                    group_uid = %group_uid,
                    fail_safe_interval = ?configured,
                    hold_timeout = ?hold,
                    used = ?hold / 2,
                    "the fail-safe interval is not below the group's hold timeout: half the hold timeout is used for it"
                );
            }
        }
        let directive = match &input {
            Input::Directive { path, target } => Some((*path, target.clone())),
            _ => None,
        };
        let out = self.core.handle(input);
        if let Some((path, target)) = directive {
            let state = if out
                .refused
                .iter()
                .any(|r| matches!(r, Refusal::Stale { .. } | Refusal::BelowFailSafe { .. }))
            {
                "stale"
            } else {
                "enforced"
            };
            self.context
                .metrics
                .directives
                .get_or_create(&GroupLabels {
                    group: self.group_name(&target.group_uid),
                    path: path.to_string(),
                    state: state.to_owned(),
                })
                .inc();
            if state == "enforced" {
                tracing::info!(%target, %path, "directive");
            }
        }
        for refusal in &out.refused {
            match refusal {
                Refusal::Stale { .. } => tracing::debug!(%refusal, "ignored"),
                Refusal::FailureOutsideGroup { volume } => {
                    // No group to freeze: the replicator runs it primary-only, changes tracked, and
                    // resynchronises it once the secondary answers.
                    tracing::warn!(%volume, "copy failed on a volume in no group: primary-only with its changes tracked until the secondary answers");
                    Metrics::count(
                        &self.context.metrics.copy_failures_outside_groups,
                        "local",
                        "primary-only",
                    );
                }
                _ => {
                    // Standing refusals (a volume not served here, a double claim) come back with
                    // every input: log each once.
                    if self.logged.len() > 1024 {
                        self.logged.clear();
                    }
                    if self.logged.insert(refusal.to_string()) {
                        let refusal = refusal.describe(|uid| self.core.group_name(uid));
                        tracing::warn!(%refusal, "refused");
                    }
                }
            }
        }
        for uid in &out.fail_safe_taken {
            tracing::warn!(group = %self.group_name(uid), group_uid = %uid, "fail-safe: a failed write reached neither path; suspending the group's volumes");
            self.context
                .metrics
                .fail_safes
                .get_or_create(&fail_safe_taken(self.group_name(uid)))
                .inc();
        }
        out
    }

    /// Runs the decided operations and keeps the acknowledgements whose volumes all succeeded. An
    /// operation that failed (after retries) and every operation not yet started when it did are
    /// reported to the core as failed: it re-learns those volumes from the replicator's next listing and
    /// acknowledges them afresh.
    async fn apply(&mut self, decided: Decided) {
        let Decided {
            operations,
            mut acks,
        } = decided;
        let mut failed: BTreeSet<String> = BTreeSet::new();
        let mut waves = operation_waves(operations).into_iter();
        for wave in waves.by_ref() {
            let results: Vec<(Operation, bool)> = futures::stream::iter(wave)
                .map(|operation| {
                    let replicator = self.replicator.clone();
                    let metrics = self.context.metrics.clone();
                    async move {
                        let ok = apply_with_retries(&replicator, &metrics, &operation).await;
                        (operation, ok)
                    }
                })
                .buffer_unordered(CONCURRENT_OPERATIONS)
                .collect()
                .await;
            failed.extend(
                results
                    .into_iter()
                    .filter(|(_, ok)| !ok)
                    .flat_map(|(operation, _)| operation.volumes()),
            );
            if !failed.is_empty() {
                break;
            }
        }
        let skipped: Vec<String> = waves.flatten().flat_map(|o| o.volumes()).collect();
        if !skipped.is_empty() {
            tracing::warn!(
                volumes = skipped.len(),
                "operations after a failed one not run; re-learnt from the replicator"
            );
        }
        failed.extend(skipped);
        if !failed.is_empty() {
            acks.retain(|ack| !ack.volumes.iter().any(|v| failed.contains(v)));
            let _ = self.core.handle(Input::OperationFailed {
                volumes: failed.into_iter().collect(),
            });
        }
        for ack in acks {
            self.acks.insert(
                ack.point.group_uid.clone(),
                PublishedAck {
                    ack,
                    at_unix_ms: now_ms(),
                },
            );
        }
    }

    fn publish_snapshot(&mut self) {
        let failures = self.core.failures();
        self.context.reports.track(&failures, Instant::now());
        let volumes = self.core.volumes();
        let groups = self.core.groups();
        let snapshot = Snapshot {
            acks: self.acks.clone(),
            failures,
            hold_timeouts: self.core.hold_timeouts(),
            seen: self.core.seen(),
            volumes,
            groups,
            inventory_known: self.core.inventory_known(),
        };
        // Volumes by group and state, for the metrics.
        let metrics = &self.context.metrics;
        metrics.volumes.clear();
        for volume in &snapshot.volumes {
            let group = volume
                .group_uid
                .as_deref()
                .map_or_else(|| "none".to_owned(), |uid| self.group_name(uid));
            metrics
                .volumes
                .get_or_create(&GroupLabels {
                    group,
                    path: "local".to_owned(),
                    state: format!("{:?}", snapshot.volume_state(volume)),
                })
                .inc();
        }
        // Each group this node knows has its fail-safe series from the start: the gauge at 0 or 1,
        // and, once the group's name is known (the label it keeps), the counter at 0 until the
        // first fail-safe is taken.
        metrics.fail_safe_in_force.clear();
        for group in &snapshot.groups {
            metrics
                .fail_safe_in_force
                .get_or_create(&FailSafeLabels {
                    group: self.group_name(&group.group_uid),
                })
                .set(i64::from(group.fail_safe.is_some()));
            if !group.name.is_empty() {
                metrics
                    .fail_safes
                    .get_or_create(&fail_safe_taken(group.name.clone()))
                    .inc_by(0);
            }
        }
        self.publish.send_if_modified(|current| {
            if *current == snapshot {
                false
            } else {
                *current = snapshot;
                true
            }
        });
    }
}

/// The labels of a group's fail-safe counter.
/// What the core decided on a burst of inputs, in order: the replicator operations to run and the
/// acknowledgements that hold once they succeed.
#[derive(Debug, Default)]
struct Decided {
    operations: Vec<Operation>,
    acks: Vec<Ack>,
}

/// The operations in waves: each wave's operations touch disjoint volumes and may run together; an
/// operation goes in the wave after the last one holding an earlier operation on any of its volumes, so
/// each volume sees its operations in the order decided.
fn operation_waves(operations: Vec<Operation>) -> Vec<Vec<Operation>> {
    let mut last_wave: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut waves: Vec<Vec<Operation>> = Vec::new();
    for operation in operations {
        let names = operation.volume_names();
        let wave = names
            .iter()
            .filter_map(|name| last_wave.get(*name).map(|w| w + 1))
            .max()
            .unwrap_or(0);
        for name in names {
            last_wave.insert(name.to_owned(), wave);
        }
        if waves.len() <= wave {
            waves.resize_with(wave + 1, Vec::new);
        }
        waves[wave].push(operation);
    }
    waves
}

/// Runs one operation on the replicator, retried a few times with backoff; whether it succeeded.
async fn apply_with_retries(
    replicator: &Replicator,
    metrics: &Metrics,
    operation: &Operation,
) -> bool {
    let kind = match operation {
        Operation::Suspend { .. } => "suspend",
        Operation::Release { .. } => "release",
        Operation::Resume { .. } => "resume",
        Operation::Configure { .. } => "configure",
    };
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(400));
    let mut attempt = 0;
    loop {
        attempt += 1;
        match replicator.apply(operation).await {
            Ok(()) => {
                tracing::info!(?operation, "replicator");
                Metrics::count(&metrics.replicator_calls, kind, "ok");
                return true;
            }
            Err(error) if attempt < 4 => {
                tracing::warn!(%error, ?operation, "replicator call failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(error) => {
                tracing::error!(%error, ?operation, "replicator call failed");
                Metrics::count(&metrics.replicator_calls, kind, "error");
                return false;
            }
        }
    }
}

fn fail_safe_taken(group: String) -> GroupLabels {
    GroupLabels {
        group,
        path: "local".to_owned(),
        state: "taken".to_owned(),
    }
}

/// Watches the replicator's events: copy failures go to the core; other changes refresh the inventory.
pub async fn watch_replicator(context: Arc<Context>, replicator: Replicator) {
    let mut backoff = Backoff::default();
    loop {
        if context.stop.is_cancelled() {
            return;
        }
        let stream = match replicator.watch().await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "cannot watch the replicator's events");
                if !context.sleep(backoff.next_delay()).await {
                    return;
                }
                continue;
            }
        };
        // A (re)started stream: the replicator may have restarted, so re-learn what volumes carry.
        context.want_inventory();
        futures::pin_mut!(stream);
        // An event read while coalescing a burst of state changes, to be handled next.
        let mut next = None;
        loop {
            use futures::{FutureExt, StreamExt};
            let event = match next.take() {
                Some(event) => event,
                None => tokio::select! {
                    _ = context.stop.cancelled() => return,
                    event = stream.next() => event,
                },
            };
            match event {
                Some(Ok(ReplicatorEvent::CopyFailed(failed))) => {
                    backoff.reset();
                    // Bounded here, where the failure enters the sidecar: both paths carry it, and a
                    // status holds at most this much (issue 21 item 2).
                    let error = lockstep_api::domain::bounded_message(&failed.error);
                    tracing::warn!(volume = %failed.volume_handle, %error, "copy failed");
                    if let Some(reason) = lockstep_api::domain::kept_image_failure(&error) {
                        tracing::error!(volume = %failed.volume_handle, reason, %error, "the secondary cannot keep the frozen image: the resync is refused");
                        context
                            .metrics
                            .kept_image_failures
                            .get_or_create(&crate::metrics::ReasonLabels {
                                reason: reason.to_owned(),
                            })
                            .inc();
                    }
                    context.send(Input::CopyFailed {
                        volume: failed.volume_handle,
                        sequence: failed.sequence,
                        error,
                        since_unix_ms: failed.since_unix_ms,
                    });
                }
                Some(Ok(ReplicatorEvent::HoldTimedOut(timed_out))) => {
                    backoff.reset();
                    tracing::warn!(volume = %timed_out.volume_handle, failed_writes = timed_out.failed_writes, "held writes failed at the hold timeout");
                    context.send(Input::HoldTimedOut {
                        volume: timed_out.volume_handle,
                        failed_writes: timed_out.failed_writes,
                        at_unix_ms: now_ms(),
                    });
                }
                Some(Ok(ReplicatorEvent::StateChanged(_))) => {
                    backoff.reset();
                    // A freeze changes every volume at once: the changes already queued behind this
                    // one are read now and answered by one re-read, not one each.
                    while let Some(queued) = stream.next().now_or_never() {
                        if !matches!(queued, Some(Ok(ReplicatorEvent::StateChanged(_)))) {
                            next = Some(queued);
                            break;
                        }
                    }
                    // A resync may have started or finished: re-read what the volumes carry and do.
                    context.want_inventory();
                }
                Some(Err(status)) => {
                    tracing::warn!(%status, "replicator event stream failed");
                    break;
                }
                None => break,
            }
        }
        if !context.sleep(backoff.next_delay()).await {
            return;
        }
    }
}

/// Marks the replicator ready in the metrics once the first inventory is in.
pub fn mark_ready(metrics: &Metrics) {
    metrics.ready.store(true, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suspend(group: &str, volumes: &[&str]) -> Operation {
        Operation::Suspend {
            group_uid: group.to_owned(),
            epoch: 1,
            volumes: volumes.iter().map(|v| (*v).to_owned()).collect(),
            fail_safe: false,
        }
    }

    fn resume(group: &str, volumes: &[&str]) -> Operation {
        Operation::Resume {
            group_uid: group.to_owned(),
            epoch: 2,
            volumes: volumes.iter().map(|v| (*v).to_owned()).collect(),
        }
    }

    #[test]
    fn operations_on_disjoint_volumes_share_a_wave_and_each_volume_keeps_its_order() {
        let operations = vec![
            suspend("a", &["a1", "a2"]),
            suspend("b", &["b1"]),
            resume("a", &["a1"]),
            suspend("c", &["c1"]),
            resume("b", &["b1", "a2"]),
            resume("a", &["a1"]),
        ];
        let waves = operation_waves(operations.clone());
        assert_eq!(
            waves,
            vec![
                vec![
                    operations[0].clone(),
                    operations[1].clone(),
                    operations[3].clone()
                ],
                vec![operations[2].clone(), operations[4].clone()],
                vec![operations[5].clone()],
            ]
        );
        assert!(operation_waves(Vec::new()).is_empty());
    }
}
