//! The control loop: fetch → decide ([`crate::freeze`]) → send and persist → record, one group at a time.
//!
//! Every event about a group — a report or acknowledgement from either path, a change of the group, a
//! periodic evaluation — goes through [`Engine::handle`], which serialises the group's decisions behind a
//! lock, reads the group fresh from the hub, decides, sends a freeze at once (before persisting, rule 1),
//! persists the status with a resourceVersion precondition (a deposed or racing writer gets 409 and
//! decides again on fresh state), and only then sends a release or resume. State lives in the API server:
//! a restarted operator picks up where the status says.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Instant,
};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::PostParams,
    runtime::{
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        reflector::Store,
    },
};
use lockstep_api::{
    conditions::{self, ConditionUpdate},
    domain::{ClaimOrder, GroupEpoch, Path, Stage, condition},
    v1alpha1::{ConsistencyGroup, ConsistencyGroupStatus, MemberCluster},
};
use tracing::Instrument;

use crate::{
    clusters::{self, Member},
    fanout::Fanout,
    freeze::{self, Decision, Event},
    listed::Listed,
    members,
    members::ClusterView,
    metrics::Metrics,
    mirror,
    sessions::{self, Sessions},
};

/// The finalizer by which a deleted group releases and resumes its volumes before it goes (rule 9).
pub const FINALIZER: &str = "lockstep.dev/release-on-delete";

/// One member cluster's last view and when it was read, behind a lock so concurrent reconciles read once.
type CachedView = Arc<tokio::sync::Mutex<Option<(Instant, ClusterView)>>>;

/// How long one read of a member cluster serves the groups reconciled after it.
const VIEW_REUSE: std::time::Duration = std::time::Duration::from_millis(250);

/// How many undecided events one group's inbox keeps while its decisions fail.
const INBOX_LIMIT: usize = 10_000;

/// How many member volumes a group's status lists (`status.members` has this `maxItems`).
const STATUS_MEMBERS_LIMIT: usize = 1024;

/// How many Events on member claims one decision publishes at once.
const CLAIM_EVENTS_IN_FLIGHT: usize = 16;

/// How often a conflicting status write is retried on fresh state before the event is dropped (the next
/// evaluation or the sender's retry brings it back).
const CONFLICT_RETRIES: usize = 5;

/// Errors of one decision.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The hub's API server failed.
    #[error("hub API server: {0}")]
    Hub(#[from] kube::Error),
    /// The decision could not be made.
    #[error(transparent)]
    Decide(#[from] freeze::DecideError),
    /// The group is not known (deleted, or a report for a group that never existed).
    #[error("no ConsistencyGroup with UID {0:?}")]
    UnknownGroup(String),
    /// This replica is not the leader: only the leader decides and writes.
    #[error("this operator replica is not the leader")]
    NotLeader,
    /// Another writer kept changing the group.
    #[error("the status of group {0} kept conflicting; will decide again")]
    Conflicts(String),
    /// The hub's API server refused the status decided for the group as invalid or too large: the same
    /// events would decide the same status again, so they are dropped rather than retried.
    #[error("the API server refused the status of group {group} ({code}): {message}")]
    StatusRefused {
        /// The group.
        group: String,
        /// The HTTP status code.
        code: u16,
        /// What the API server said.
        message: String,
    },
}

/// Whether the API server's answer to a status write refuses that status for good (invalid, too large,
/// forbidden), rather than for now: a conflict, a timeout, throttling and 5xx are worth a retry, and a
/// group that is gone (404) is handled as unknown on the next read.
fn refuses_for_good(code: u16) -> bool {
    (400..500).contains(&code) && !matches!(code, 404 | 408 | 409 | 429)
}

/// The control system's shared state.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    hub: Client,
    hub_name: String,
    groups: Store<ConsistencyGroup>,
    member_clusters: Store<MemberCluster>,
    /// Whether `member_clusters` has been listed once.
    clusters_listed: Listed,
    sessions: Sessions,
    fanout: Fanout,
    metrics: Metrics,
    recorder: Recorder,
    /// One lock per group UID: decisions about a group never interleave.
    locks: Mutex<BTreeMap<String, Arc<GroupLock>>>,
    /// Connected member clusters, by name.
    members: tokio::sync::RwLock<BTreeMap<String, Member>>,
    /// Whether this replica holds the leader Lease (always true without leader election).
    leader: tokio::sync::watch::Receiver<bool>,
    /// Lockstep's namespace in every cluster (the sidecars' Leases live there).
    lease_namespace: String,
    /// The last view read of each member cluster.
    views: Mutex<BTreeMap<String, CachedView>>,
    /// Verifies the sidecars' tokens on the gRPC path.
    authenticator: Arc<crate::authn::Authenticator>,
}

/// One group's decisions: the lock that serialises them and the inbox where events wait for it.
#[derive(Default)]
struct GroupLock {
    memory: tokio::sync::Mutex<GroupMemory>,
    inbox: Mutex<Batch>,
    /// The (epoch, stage) this operator last persisted, ahead of the reflector's copy for a moment.
    persisted: Mutex<Option<(u64, Stage)>>,
}

impl GroupLock {
    fn persisted(&self) -> Option<(u64, Stage)> {
        *self
            .persisted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_persisted(&self, position: (u64, Stage)) {
        let mut persisted = self
            .persisted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *persisted = (*persisted).max(Some(position));
    }

    fn inbox(&self, events: Vec<Event>, observation: Option<Observation>) {
        let mut inbox = self
            .inbox
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        inbox.needs_fresh_read |= events.iter().any(|event| matches!(event, Event::Evaluate));
        inbox.events.extend(events);
        // Concurrent reconciles can deliver their reads out of order: keep the newest.
        if let Some(observation) = observation
            && inbox
                .observation
                .as_ref()
                .is_none_or(|queued| queued.read_at <= observation.read_at)
        {
            inbox.observation = Some(observation);
        }
    }

    /// Puts the events of a failed batch back in front of those that arrived since, up to
    /// [`INBOX_LIMIT`] events (the oldest go first: a hub down for long must not grow it without bound).
    fn requeue(&self, mut events: Vec<Event>) {
        let mut inbox = self
            .inbox
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        events.append(&mut inbox.events);
        let excess = events.len().saturating_sub(INBOX_LIMIT);
        if excess > 0 {
            tracing::warn!(
                dropped = excess,
                "decision inbox full: oldest events dropped"
            );
        }
        inbox.events = events.split_off(excess);
        inbox.needs_fresh_read = true;
    }

    fn take_inbox(&self) -> Option<Batch> {
        let mut inbox = self
            .inbox
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (!inbox.events.is_empty()).then(|| std::mem::take(&mut *inbox))
    }
}

/// Events about one group waiting to be decided together.
#[derive(Default)]
struct Batch {
    events: Vec<Event>,
    /// The latest resolution of the members read for a reconcile in the batch.
    observation: Option<Observation>,
    /// An evaluation is in the batch: the spec may have changed, so the group is read afresh.
    needs_fresh_read: bool,
}

/// What the engine remembers of a group between decisions (never needed for safety).
#[derive(Default)]
struct GroupMemory {
    /// When the current freeze started, for the freeze-latency metric.
    freeze_started: Option<(u64, Instant)>,
    /// The group as this operator last wrote it (what the API server answered to the write).
    last_written: Option<ConsistencyGroup>,
    /// The claims on volumes of other groups refused at the last resolution (an Event says when they
    /// change).
    refused_claims: Vec<String>,
    /// When the views of the last resolution applied were read: an older one, delivered late by a
    /// concurrent reconcile, would move volume states back (a volume replicating shown resyncing again).
    last_observation: Option<Instant>,
}

impl GroupMemory {
    /// Whether a resolution whose views were read at `read_at` may be applied: never one read before the
    /// last one applied (it would move volume states back). Records it when it may.
    fn accepts_observation(&mut self, read_at: Instant) -> bool {
        let newer = self.last_observation.is_none_or(|last| last <= read_at);
        if newer {
            self.last_observation = Some(read_at);
        }
        newer
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("hub_name", &self.inner.hub_name)
            .finish()
    }
}

impl Engine {
    /// Builds the engine over reflector stores of the hub's groups and member clusters (with whether the
    /// latter has been listed once); `options` gives the hub's name and Lockstep's namespace.
    pub fn new(
        hub: Client,
        options: &crate::Options,
        groups: Store<ConsistencyGroup>,
        (member_clusters, clusters_listed): (Store<MemberCluster>, Listed),
        sessions: Sessions,
        metrics: Metrics,
        leader: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let hub_name = options.hub_name.clone();
        let lease_namespace = options.namespace.clone();
        let reporter = Reporter {
            controller: "lockstep-operator".into(),
            instance: Some(hub_name.clone()),
        };
        let fanout = Fanout::new(sessions.clone(), metrics.clone());
        let security = &options.control_security;
        let authenticator = Arc::new(crate::authn::Authenticator::new(
            member_clusters.clone(),
            &security.token_audience,
            &security.sidecar_service_account,
            security.token_max_lifetime,
            metrics.clone(),
        ));
        Self {
            inner: Arc::new(Inner {
                recorder: Recorder::new(hub.clone(), reporter),
                hub,
                hub_name,
                groups,
                member_clusters,
                clusters_listed,
                sessions,
                fanout,
                metrics,
                locks: Mutex::default(),
                members: tokio::sync::RwLock::default(),
                leader,
                lease_namespace,
                views: Mutex::default(),
                authenticator,
            }),
        }
    }

    /// Verifies the sidecars' tokens on the gRPC path.
    pub fn authenticator(&self) -> &crate::authn::Authenticator {
        &self.inner.authenticator
    }

    /// The same verifier, shared with a task.
    pub fn authenticator_handle(&self) -> Arc<crate::authn::Authenticator> {
        Arc::clone(&self.inner.authenticator)
    }

    /// Whether this replica is the leader (only the leader serves Control and writes).
    pub fn is_leader(&self) -> bool {
        *self.inner.leader.borrow()
    }

    /// The hub's identity, as mirrors are labelled with it.
    pub fn hub_name(&self) -> &str {
        &self.inner.hub_name
    }

    /// The gRPC sessions.
    pub fn sessions(&self) -> &Sessions {
        &self.inner.sessions
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The group with this UID, from the hub's reflector.
    pub fn group_by_uid(&self, uid: &str) -> Option<Arc<ConsistencyGroup>> {
        self.inner
            .groups
            .state()
            .into_iter()
            .find(|group| group.metadata.uid.as_deref() == Some(uid))
    }

    /// Every group of the hub.
    pub fn groups(&self) -> Vec<Arc<ConsistencyGroup>> {
        self.inner.groups.state()
    }

    /// The current (epoch, stage) of a group, as last persisted: what this operator wrote last, or what
    /// the hub's reflector shows, whichever is further (positions only grow).
    pub fn current(&self, uid: &str) -> Option<GroupEpoch> {
        let group = self.group_by_uid(uid)?;
        let written = self.existing_lock(uid).and_then(|lock| lock.persisted());
        let (epoch, stage) =
            written.map_or(group.position(), |written| written.max(group.position()));
        Some(GroupEpoch {
            group_uid: uid.to_owned(),
            epoch,
            stage,
        })
    }

    /// The group's status as last persisted: the copy this operator wrote last, else the hub's reflector's.
    pub async fn last_status(&self, uid: &str) -> Option<ConsistencyGroupStatus> {
        if let Some(lock) = self.existing_lock(uid) {
            let memory = lock.memory.lock().await;
            if let Some(written) = &memory.last_written {
                return written.status.clone();
            }
        }
        self.group_by_uid(uid)?.status.clone()
    }

    /// The member clusters of a group (by name, from its spec).
    pub fn member_clusters_of(group: &ConsistencyGroup) -> Vec<String> {
        let mut clusters: Vec<String> = group
            .spec
            .members
            .iter()
            .map(|member| member.cluster.clone())
            .collect();
        clusters.sort();
        clusters.dedup();
        clusters
    }

    fn existing_lock(&self, uid: &str) -> Option<Arc<GroupLock>> {
        let locks = self
            .inner
            .locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.get(uid).cloned()
    }

    fn lock_for(&self, uid: &str) -> Arc<GroupLock> {
        let mut locks = self
            .inner
            .locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.entry(uid.to_owned()).or_default().clone()
    }

    /// Decides one event about a group and carries the decision out.
    pub async fn handle(&self, uid: &str, event: Event) -> Result<(), EngineError> {
        let name = self
            .group_by_uid(uid)
            .map(|group| group.name_any())
            .ok_or_else(|| EngineError::UnknownGroup(uid.to_owned()))?;
        let span = tracing::info_span!("decide", group = %name, event = event_kind(&event));
        self.handle_named(uid, &name, event).instrument(span).await
    }

    async fn handle_named(&self, uid: &str, name: &str, event: Event) -> Result<(), EngineError> {
        self.handle_observed(uid, name, event, None).await
    }

    /// Queues the event in the group's inbox, then decides everything queued there in one batch: events
    /// that arrive while a decision is being persisted (the acknowledgements of a freeze, a burst of
    /// reports) wait for the lock together and cost one status write, not one each. An event decided in
    /// another caller's batch returns `Ok` here; a failed batch is retried by its senders and by the next
    /// periodic evaluation, as a failed decision always was.
    async fn handle_observed(
        &self,
        uid: &str,
        name: &str,
        event: Event,
        observation: Option<Observation>,
    ) -> Result<(), EngineError> {
        self.handle_all(uid, name, vec![event], observation).await
    }

    async fn handle_all(
        &self,
        uid: &str,
        name: &str,
        events: Vec<Event>,
        observation: Option<Observation>,
    ) -> Result<(), EngineError> {
        if !self.is_leader() {
            return Err(EngineError::NotLeader);
        }
        for event in &events {
            match event {
                Event::Report(report) => self.inner.metrics.report(report.path),
                Event::Ack(ack) => self.inner.metrics.ack(ack.path),
                Event::HoldTimedOut(_) | Event::Seen { .. } | Event::Evaluate => {}
            }
        }
        let group_lock = self.lock_for(uid);
        group_lock.inbox(events, observation);
        let mut memory = group_lock.memory.lock().await;
        let Some(batch) = group_lock.take_inbox() else {
            return Ok(()); // decided in the batch of the caller before us
        };
        self.inner.metrics.decision_batch(batch.events.len());
        let result = self
            .decide_and_apply(uid, name, &batch, &group_lock, &mut memory)
            .await;
        match &result {
            Err(EngineError::Hub(_) | EngineError::Conflicts(_)) => {
                // Not lost with the batch: the next event or periodic evaluation decides them again, on
                // a fresh read (they are idempotent: every report and acknowledgement names its epoch).
                group_lock.requeue(batch.events);
            }
            Err(EngineError::StatusRefused { code, message, .. }) => {
                // Retried, the batch would be refused again, ahead of every later event, forever: it is
                // dropped, and said so. Senders still holding a failure report it again.
                self.drop_refused(uid, name, batch.events.len(), *code, message);
            }
            _ => {}
        }
        result
    }

    /// Reads the group (or takes the copy this operator last wrote, when nothing in the batch asks for a
    /// fresh read), decides the batch, sends a freeze at once, persists, then sends a release or resume.
    async fn decide_and_apply(
        &self,
        uid: &str,
        name: &str,
        batch: &Batch,
        group_lock: &GroupLock,
        memory: &mut GroupMemory,
    ) -> Result<(), EngineError> {
        let api = Api::<ConsistencyGroup>::all(self.inner.hub.clone());
        // Events from sidecars may be decided on the copy this operator last wrote: only spec edits can
        // have changed the group since, and a stale copy either decides nothing new (the next evaluation
        // reads afresh) or fails its write on the resourceVersion precondition and is read again.
        let mut cached = memory
            .last_written
            .take()
            .filter(|_| !batch.needs_fresh_read);
        for _ in 0..CONFLICT_RETRIES {
            let mut group = match cached.take() {
                Some(group) => group,
                None => api.get(name).await?,
            };
            if group.metadata.uid.as_deref() != Some(uid) {
                return Err(EngineError::UnknownGroup(uid.to_owned()));
            }
            let read = group.status.clone();
            let refused = batch
                .observation
                .as_ref()
                .filter(|observation| memory.accepts_observation(observation.read_at))
                .map(|observation| apply_resolution(&mut group, observation));
            let decision = freeze::decide_batch(&group, &batch.events, &now())?;
            if let Some(point) = &decision.freeze_now {
                // Rule 1: freeze at once, on both paths, before anything is persisted.
                memory.freeze_started = Some((point.epoch, Instant::now()));
                self.send(&group, point, Some(&decision.status)).await;
            }
            if read.as_ref() != Some(&decision.status) {
                match self.persist(&api, &group, &decision.status).await {
                    Ok(written) => {
                        group_lock.set_persisted(freeze::position(&decision.status));
                        memory.last_written = Some(written);
                        let (failed, volumes) = freeze::hold_timeout_growth(
                            read.as_ref()
                                .and_then(|status| status.hold_timeouts.as_ref()),
                            decision.status.hold_timeouts.as_ref(),
                        );
                        self.inner.metrics.held_writes_failed(name, failed);
                        if !volumes.is_empty() {
                            let (engine, group, status) =
                                (self.clone(), group.clone(), decision.status.clone());
                            tokio::spawn(
                                async move {
                                    engine
                                        .record_hold_timeouts_on_claims(&group, &status, &volumes)
                                        .await;
                                }
                                .instrument(tracing::Span::current()),
                            );
                        }
                    }
                    Err(kube::Error::Api(status)) if status.code == 409 => {
                        tracing::debug!("status conflict; deciding again on fresh state");
                        continue;
                    }
                    Err(kube::Error::Api(status)) if refuses_for_good(status.code) => {
                        return Err(EngineError::StatusRefused {
                            group: name.to_owned(),
                            code: status.code,
                            message: status.message.clone(),
                        });
                    }
                    Err(error) => return Err(error.into()),
                }
            } else {
                memory.last_written = Some(group.clone()).filter(|_| batch.observation.is_none());
            }
            if let Some(refused) = refused {
                self.report_refused_claims(&group, refused, memory);
            }
            self.after_persist(&group, &decision, memory).await;
            return Ok(());
        }
        Err(EngineError::Conflicts(name.to_owned()))
    }

    /// Says on the group, with a Warning Event, which of its claims are refused because another group
    /// holds the volume (rule 5) — when that changes, not at every reconcile.
    fn report_refused_claims(
        &self,
        group: &ConsistencyGroup,
        refused: Vec<String>,
        memory: &mut GroupMemory,
    ) {
        if refused == memory.refused_claims {
            return;
        }
        memory.refused_claims = refused.clone();
        if refused.is_empty() {
            return;
        }
        tracing::warn!(refused = ?refused, "claims on volumes of other groups refused");
        let (engine, group) = (self.clone(), group.clone());
        let message = format!(
            "{} volume(s) refused: {}",
            refused.len(),
            refused.join("; ")
        );
        tokio::spawn(
            async move {
                engine.record(&group, true, "ClaimRefused", &message).await;
            }
            .instrument(tracing::Span::current()),
        );
    }

    /// Counts the events of a batch whose status the API server refused and records a Warning Event on
    /// the group saying so (in the background, off the group's lock).
    fn drop_refused(&self, uid: &str, name: &str, events: usize, code: u16, message: &str) {
        tracing::warn!(
            group = name,
            events,
            code,
            %message,
            "the API server refused the decided status: events dropped"
        );
        self.inner.metrics.events_dropped(name, events);
        let Some(group) = self.group_by_uid(uid) else {
            return;
        };
        let note = format!(
            "the API server refused the status decided from {events} reports and acknowledgements ({code}: {message}); \
             they were dropped so that later ones can be decided (a sidecar still holding a failure reports it again)"
        );
        let engine = self.clone();
        tokio::spawn(
            async move {
                engine.record(&group, true, "StatusRefused", &note).await;
            }
            .instrument(tracing::Span::current()),
        );
    }

    async fn persist(
        &self,
        api: &Api<ConsistencyGroup>,
        group: &ConsistencyGroup,
        status: &ConsistencyGroupStatus,
    ) -> Result<ConsistencyGroup, kube::Error> {
        let mut updated = group.clone();
        updated.status = Some(status.clone());
        // The resourceVersion read above is the precondition: a concurrent writer (or a deposed leader) loses.
        api.replace_status(&group.name_any(), &PostParams::default(), &updated)
            .await
    }

    async fn after_persist(
        &self,
        group: &ConsistencyGroup,
        decision: &Decision,
        memory: &mut GroupMemory,
    ) {
        if let Some(point) = &decision.after_persist {
            self.send(group, point, Some(&decision.status)).await;
        }
        let frozen =
            conditions::status_of(&decision.status.conditions, condition::FROZEN) == Some(true);
        if frozen
            && let Some((epoch, started)) = memory.freeze_started
            && epoch == decision.status.epoch
        {
            self.inner.metrics.freeze_completed(started.elapsed());
            memory.freeze_started = None;
        }
        if !decision.notes.is_empty() {
            self.publish_notes(
                group.clone(),
                decision.status.clone(),
                decision.notes.clone(),
            );
        }
    }

    /// Records the notes of a decision as Events on the group and, for holds and releases, on every
    /// member claim — in the background, off the group's lock: a hundred claims' Events must not delay
    /// the acknowledgements queued behind the decision.
    fn publish_notes(
        &self,
        group: ConsistencyGroup,
        status: ConsistencyGroupStatus,
        notes: Vec<freeze::Note>,
    ) {
        let engine = self.clone();
        let span = tracing::Span::current();
        tokio::spawn(
            async move {
                for note in &notes {
                    engine
                        .record(&group, note.warning, note.reason, &note.message)
                        .await;
                    if matches!(note.reason, "Freezing" | "Released" | "Resyncing") {
                        engine.record_on_claims(&group, &status, note).await;
                    }
                }
            }
            .instrument(span),
        );
    }

    /// Tells application owners: an Event on every member PVC (in its own cluster) when its writes are
    /// held, released unreplicated, or resynchronised. Clusters without an API path are skipped.
    async fn record_on_claims(
        &self,
        group: &ConsistencyGroup,
        status: &ConsistencyGroupStatus,
        note: &freeze::Note,
    ) {
        let members = self.members().await;
        let reporter = Reporter {
            controller: "lockstep-operator".into(),
            instance: Some(self.inner.hub_name.clone()),
        };
        let message = match note.reason {
            "Freezing" => format!(
                "writes to this volume are held (not acknowledged) while ConsistencyGroup {} freezes at epoch {}; \
                 they are released once every member is frozen, or fail with an I/O error after {}",
                group.name_any(),
                status.epoch,
                group.spec.hold_timeout
            ),
            "Released" => format!(
                "held writes released at epoch {}: this volume runs unreplicated until ConsistencyGroup {} is resynchronised",
                status.epoch,
                group.name_any()
            ),
            _ => format!("ConsistencyGroup {}: {}", group.name_any(), note.message),
        };
        let event = KubeEvent {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.to_owned(),
            note: Some(message),
            action: note.reason.to_owned(),
            secondary: Some(group.object_ref(&())),
        };
        let mut publishing = Vec::new();
        for (cluster, member) in &members {
            let Ok(client) = &member.client else { continue };
            let recorder = Recorder::new(client.clone(), reporter.clone());
            for volume in status
                .members
                .iter()
                .filter(|volume| &volume.cluster == cluster)
            {
                let (recorder, event) = (recorder.clone(), &event);
                publishing.push(async move { publish_on_claim(&recorder, event, volume).await });
            }
        }
        // Concurrently, a few at a time per operator: one slow cluster delays no other claim's Event.
        futures::stream::iter(publishing)
            .buffer_unordered(CLAIM_EVENTS_IN_FLIGHT)
            .collect::<Vec<()>>()
            .await;
    }

    /// Tells the owners of the claims whose held writes just failed at the hold timeout (a Warning on each
    /// such PVC, in its own cluster). Clusters without an API path are skipped.
    async fn record_hold_timeouts_on_claims(
        &self,
        group: &ConsistencyGroup,
        status: &ConsistencyGroupStatus,
        volumes: &[(String, String)],
    ) {
        let members = self.members().await;
        let reporter = Reporter {
            controller: "lockstep-operator".into(),
            instance: Some(self.inner.hub_name.clone()),
        };
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "HoldTimedOut".to_owned(),
            note: Some(format!(
                "held writes to this volume failed with an I/O error after holdTimeout {} while ConsistencyGroup {} is frozen at epoch {}; \
                 later writes fail the same way until the group is released or resynchronised",
                group.spec.hold_timeout,
                group.name_any(),
                status.epoch
            )),
            action: "HoldTimedOut".to_owned(),
            secondary: Some(group.object_ref(&())),
        };
        for volume in status.members.iter().filter(|volume| {
            volumes.iter().any(|(cluster, handle)| {
                *cluster == volume.cluster && volume.volume_handle.as_ref() == Some(handle)
            })
        }) {
            let Some(Ok(client)) = members.get(&volume.cluster).map(|member| &member.client) else {
                continue;
            };
            let recorder = Recorder::new(client.clone(), reporter.clone());
            publish_on_claim(&recorder, &event, volume).await;
        }
    }

    /// Sends a directive on both paths; a release or resume is also mirrored with the status it belongs to.
    async fn send(
        &self,
        group: &ConsistencyGroup,
        point: &GroupEpoch,
        status: Option<&ConsistencyGroupStatus>,
    ) {
        let members = self.inner.members.read().await.clone();
        let clusters = Self::member_clusters_of(group);
        let targets: Vec<Member> = clusters
            .iter()
            .filter_map(|name| members.get(name).cloned())
            .collect();
        self.inner
            .fanout
            .send(group, point, status, &clusters, &targets)
            .await;
    }

    /// Records a Kubernetes Event on the group.
    pub async fn record(
        &self,
        group: &ConsistencyGroup,
        warning: bool,
        reason: &str,
        message: &str,
    ) {
        let event = KubeEvent {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(lockstep_api::domain::bounded_message(message)),
            action: reason.to_owned(),
            secondary: None,
        };
        if let Err(error) = self
            .inner
            .recorder
            .publish(&event, &group.object_ref(&()))
            .await
        {
            tracing::warn!(%error, reason, "could not record an event");
        }
    }

    /// Connects member clusters that are new, changed or failed last time, probes each API server, and
    /// writes every MemberCluster's status (Reachable, gRPC sessions) when it changed.
    pub async fn refresh_members(&self) {
        // Before the first list of MemberClusters the store is empty: that is not "no clusters".
        self.inner.clusters_listed.wait().await;
        tracing::debug!("member clusters listed");
        let previous = self.inner.members.read().await.clone();
        let mut connected = BTreeMap::new();
        let mut probes = Vec::new();
        for cluster in self.inner.member_clusters.state() {
            let version = cluster.resource_version();
            let member = match previous.get(&cluster.name_any()) {
                Some(known) if known.client.is_ok() && known.version == version => known.clone(),
                _ => clusters::connect(&self.inner.hub, &cluster).await,
            };
            connected.insert(member.name.clone(), member.clone());
            probes.push(async move {
                let reachable = clusters::probe(&member).await;
                self.write_member_status(&cluster, &member, reachable).await;
            });
        }
        *self.inner.members.write().await = connected;
        tracing::debug!("member clusters connected; probing");
        // Probed concurrently: one unreachable cluster delays no other.
        futures::future::join_all(probes).await;
    }

    /// The `ServiceAccountKeys` condition of a member cluster reached over gRPC: whether its sidecars'
    /// tokens can be verified.
    fn keys_condition(&self, cluster: &str) -> ConditionUpdate<'static> {
        let authenticator = &self.inner.authenticator;
        let keys = authenticator.key_sets();
        let (status, reason, message) = if let Some(why) = keys.refused(cluster) {
            (
                false,
                "KeysRefused",
                format!("{why}; no sidecar of this cluster authenticates on the gRPC path"),
            )
        } else if let Some(kid) = authenticator.unknown_key(cluster)
            && authenticator.uses_published_keys(cluster)
        {
            (
                false,
                "UnknownKeyId",
                format!(
                    "a sidecar naming this cluster presented a token signed with key id {kid:?}, which the cluster's API server does not publish (/openid/v1/jwks): the token is not from this cluster"
                ),
            )
        } else if let Some(kid) = authenticator.unknown_key(cluster) {
            (
                false,
                "UnknownKeyId",
                format!(
                    "a sidecar naming this cluster presented a token signed with key id {kid:?}, which is not in spec.serviceAccountKeys: if the cluster rotated its signing keys, put its current JWKS (kubectl get --raw /openid/v1/jwks) there"
                ),
            )
        } else if keys.keys_of(cluster) == 0 {
            (
                false,
                "NoKeys",
                "spec.serviceAccountKeys is empty and no keys were read from the cluster's API server: this cluster's sidecars cannot authenticate on the gRPC path (put the output of kubectl get --raw /openid/v1/jwks there)".to_owned(),
            )
        } else if authenticator.uses_published_keys(cluster) {
            (
                true,
                "KeysLoaded",
                format!(
                    "{} ServiceAccount signing keys, as the cluster's API server publishes them (/openid/v1/jwks, read again on rotation): sidecars prove their node with tokens they signed",
                    keys.keys_of(cluster)
                ),
            )
        } else {
            (
                true,
                "KeysLoaded",
                format!(
                    "{} ServiceAccount signing keys: sidecars prove their node with tokens they signed",
                    keys.keys_of(cluster)
                ),
            )
        };
        ConditionUpdate {
            type_: "ServiceAccountKeys",
            status,
            reason,
            message,
        }
    }

    async fn write_member_status(
        &self,
        cluster: &MemberCluster,
        member: &Member,
        reachable: Result<(), String>,
    ) {
        let sessions = u32::try_from(self.inner.sessions.count(&member.name)).unwrap_or(u32::MAX);
        let mut status = cluster.status.clone().unwrap_or_default();
        let api_path = member.paths.includes(Path::Api);
        let update = match (&reachable, api_path) {
            (Ok(()), _) => ConditionUpdate {
                type_: "Reachable",
                status: true,
                reason: "ApiServerAnswers",
                message: format!("the API server answers; {sessions} sidecars hold a gRPC stream"),
            },
            (Err(_), false) => ConditionUpdate {
                type_: "Reachable",
                status: sessions > 0,
                reason: if sessions > 0 {
                    "SidecarsConnected"
                } else {
                    "NoSidecarConnected"
                },
                message: format!("GrpcOnly: {sessions} sidecars hold a gRPC stream"),
            },
            (Err(why), true) => ConditionUpdate {
                type_: "Reachable",
                status: false,
                reason: "ApiServerUnreachable",
                message: format!("{why}; {sessions} sidecars hold a gRPC stream"),
            },
        };
        let before = status.clone();
        conditions::set(
            &mut status.conditions,
            update,
            cluster.metadata.generation,
            &now(),
        );
        if member.paths.includes(Path::Grpc) {
            conditions::set(
                &mut status.conditions,
                self.keys_condition(&member.name),
                cluster.metadata.generation,
                &now(),
            );
        }
        status.grpc_sessions = sessions;
        status.observed_generation = cluster.metadata.generation;
        if reachable.is_ok() && api_path {
            status.last_api_contact = Some(now());
        }
        let changed = {
            let mut a = before.clone();
            let mut b = status.clone();
            a.last_api_contact = None;
            b.last_api_contact = None;
            a != b
        };
        if !changed {
            return;
        }
        let patch = serde_json::json!({
            "apiVersion": "lockstep.dev/v1alpha1",
            "kind": "MemberCluster",
            "metadata": {"name": member.name},
            "status": status,
        });
        let params = kube::api::PatchParams::apply(mirror::FIELD_MANAGER).force();
        let api = Api::<MemberCluster>::all(self.inner.hub.clone());
        // Bounded: the resync loop waits for every member's status, and a hub that accepts the
        // connection but never answers must not stop it.
        let patch = kube::api::Patch::Apply(&patch);
        let write = api.patch_status(&member.name, &params, &patch);
        match tokio::time::timeout(clusters::API_TIMEOUT, write).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(cluster = %member.name, %error, "MemberCluster status not written");
            }
            Err(_) => tracing::warn!(
                cluster = %member.name,
                timeout = ?clusters::API_TIMEOUT,
                "MemberCluster status not written: the hub did not answer in time"
            ),
        }
    }

    /// Connected member clusters.
    pub async fn members(&self) -> BTreeMap<String, Member> {
        self.inner.members.read().await.clone()
    }

    /// Level-triggered reconcile of one group: resolve its members (MembersResolved), evaluate in the
    /// same decision, and keep its mirrors current.
    pub async fn reconcile(&self, group: Arc<ConsistencyGroup>) -> Result<(), EngineError> {
        let name = group.name_any();
        let uid = group
            .metadata
            .uid
            .clone()
            .ok_or_else(|| EngineError::UnknownGroup(name.clone()))?;
        let span = tracing::info_span!("reconcile", group = %name);
        async {
            if group.metadata.deletion_timestamp.is_some() {
                return self.finalize(&uid, &name).await;
            }
            if !group
                .finalizers()
                .iter()
                .any(|finalizer| finalizer == FINALIZER)
            {
                let mut finalizers = group.finalizers().to_vec();
                finalizers.push(FINALIZER.to_owned());
                self.set_finalizers(&name, &group, finalizers).await?;
            }
            if self.inner.members.read().await.is_empty() {
                // A new operator (a restart mid-freeze) has not connected the member clusters yet:
                // resolving now would drop every member with its acknowledgements, and the sidecars,
                // having acknowledged, would not send them again.
                self.refresh_members().await;
            }
            let observation = self.observe(&uid, &group).await;
            self.handle_observed(&uid, &name, Event::Evaluate, Some(observation))
                .await?;
            self.mirror(&uid, &name).await
        }
        .instrument(span)
        .await
    }

    /// Deletion (rule 9): resume the group's volumes, wait until they acknowledged (or twice the hold
    /// timeout), say so in an Event, remove the mirrors, then let the object go.
    async fn finalize(&self, uid: &str, name: &str) -> Result<(), EngineError> {
        let api = Api::<ConsistencyGroup>::all(self.inner.hub.clone());
        let group = api.get(name).await?;
        if !group
            .finalizers()
            .iter()
            .any(|finalizer| finalizer == FINALIZER)
        {
            return Ok(());
        }
        self.handle_observed(uid, name, Event::Evaluate, None)
            .await?;
        let group = api.get(name).await?;
        let grace = lockstep_api::domain::parse_duration(&group.spec.hold_timeout)
            .unwrap_or(std::time::Duration::from_secs(30))
            * 2;
        let deadline_passed = group
            .metadata
            .deletion_timestamp
            .as_ref()
            .is_some_and(|since| {
                let elapsed = k8s_openapi::jiff::Timestamp::now().duration_since(since.0);
                elapsed.unsigned_abs() > grace
            });
        let status = group.status.clone().unwrap_or_default();
        let Some(missing) = freeze::deletion_outcome(&status, deadline_passed) else {
            return Ok(());
        };
        let members = self.members().await;
        // Under the group's lock, so that no mirror write of a reconcile that began before the deletion
        // lands after the removal and leaves an orphan.
        let lock = self.lock_for(uid);
        let _mirrors = lock.memory.lock().await;
        for cluster in Self::member_clusters_of(&group) {
            let Some(member) = members.get(&cluster) else {
                continue;
            };
            let Ok(client) = &member.client else { continue };
            if member.local {
                continue;
            }
            if let Err(error) = mirror::remove(client, &cluster, &self.inner.hub_name, &group).await
            {
                tracing::warn!(%error, "mirror not removed");
            }
        }
        if missing.is_empty() {
            let message = format!(
                "deleted: every member volume resumed normal replication; the group's consistency guarantees ended (epoch {})",
                status.epoch
            );
            self.record(&group, false, "Deleted", &message).await;
        } else {
            let message = format!(
                "deleted after {grace:?} without the resume acknowledged by {}: their sidecars resume them when they next hear of it",
                missing.join(", ")
            );
            self.record(&group, true, "DeletedUnacknowledged", &message)
                .await;
        }
        let finalizers = group
            .finalizers()
            .iter()
            .filter(|finalizer| *finalizer != FINALIZER)
            .cloned()
            .collect();
        self.set_finalizers(name, &group, finalizers).await
    }

    async fn set_finalizers(
        &self,
        name: &str,
        group: &ConsistencyGroup,
        finalizers: Vec<String>,
    ) -> Result<(), EngineError> {
        let api = Api::<ConsistencyGroup>::all(self.inner.hub.clone());
        let patch = serde_json::json!({
            "metadata": { "finalizers": finalizers, "resourceVersion": group.resource_version() }
        });
        match api
            .patch(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(error)) if error.code == 409 || error.code == 404 => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// One member cluster's view, shared by every group reconciled within [`VIEW_REUSE`]: a resync round
    /// lists each cluster once, not once per group. Returns when it was read.
    async fn view_of(&self, member: &Member) -> (Instant, ClusterView) {
        let lock = {
            let mut views = self
                .inner
                .views
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            views.entry(member.name.clone()).or_default().clone()
        };
        let mut cached = lock.lock().await;
        if let Some((read, view)) = cached.as_ref()
            && read.elapsed() < VIEW_REUSE
        {
            return (*read, view.clone());
        }
        let read = Instant::now();
        let view = clusters::view(member, &self.inner.sessions, &self.inner.lease_namespace).await;
        *cached = Some((read, view.clone()));
        (read, view)
    }

    /// What the member clusters show of a group's members, read without holding the group's lock.
    async fn observe(&self, uid: &str, group: &ConsistencyGroup) -> Observation {
        let members = self.members().await;
        let mut views = BTreeMap::new();
        let mut read_at = Instant::now();
        for cluster in Self::member_clusters_of(group) {
            if let Some(member) = members.get(&cluster) {
                let (read, view) = self.view_of(member).await;
                read_at = read_at.min(read);
                views.insert(cluster, view);
            }
        }
        let claimed_elsewhere = self.claimed_elsewhere(uid, group, &views);
        Observation {
            views,
            claimed_elsewhere,
            read_at,
        }
    }

    /// The volumes of `views` that other groups of this hub hold ahead of this one (rule 5).
    fn claimed_elsewhere(
        &self,
        uid: &str,
        group: &ConsistencyGroup,
        views: &BTreeMap<String, ClusterView>,
    ) -> members::Claims {
        let groups = self.inner.groups.state();
        let ordered: Vec<(Arc<ConsistencyGroup>, ClaimOrder)> = groups
            .iter()
            .filter_map(|other| Some((other.clone(), other.claim_order()?)))
            .collect();
        let Some(my_order) = group.claim_order() else {
            return members::Claims::new();
        };
        let me = claimant_of(group, &my_order);
        let others: Vec<members::Claimant<'_>> = ordered
            .iter()
            .filter(|(other, _)| other.metadata.uid.as_deref() != Some(uid))
            .map(|(other, order)| claimant_of(other, order))
            .collect();
        members::claimed_elsewhere(&me, &others, views)
    }

    /// Writes the group's mirror into every member cluster reached through its API server (not the hub),
    /// unless the group is being deleted (its finalizer removes the mirrors, under the same lock).
    async fn mirror(&self, uid: &str, name: &str) -> Result<(), EngineError> {
        let lock = self.lock_for(uid);
        let _mirrors = lock.memory.lock().await;
        let group = Api::<ConsistencyGroup>::all(self.inner.hub.clone())
            .get(name)
            .await?;
        if group.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        let members = self.members().await;
        for cluster in Self::member_clusters_of(&group) {
            let Some(member) = members.get(&cluster) else {
                continue;
            };
            let Ok(client) = &member.client else { continue };
            if member.local {
                continue;
            }
            match mirror::apply(client, &cluster, &self.inner.hub_name, &group).await {
                Ok(()) => {
                    if let Some(status) = &group.status {
                        self.inner.fanout.mirror_status(member, name, status);
                    }
                }
                Err(error) => tracing::warn!(%error, "mirror not written"),
            }
        }
        Ok(())
    }

    /// The reports and acknowledgements seen in a member cluster's ReplicationNode (path 1), handed to
    /// each group as one batch.
    pub async fn from_replication_nodes(
        &self,
        cluster: &str,
        node: &lockstep_api::v1alpha1::ReplicationNode,
    ) {
        let Some(status) = &node.status else { return };
        let node_name = &node.spec.node_name;
        // A node speaks only for its own volumes, on this path too: volumes a group resolves in this
        // cluster to another node (or to no single node) are dropped from its reports and
        // acknowledgements. (Which ReplicationNode a sidecar may write is the chart's admission policy.)
        let mut foreign: BTreeSet<String> = BTreeSet::new();
        let mut own = BTreeMap::<&str, Vec<lockstep_api::v1alpha1::MemberVolumeStatus>>::new();
        for uid in status
            .failures
            .iter()
            .map(|failure| failure.group_uid.as_str())
            .chain(
                status
                    .enforced
                    .iter()
                    .map(|enforced| enforced.group_uid.as_str()),
            )
        {
            if !own.contains_key(uid) {
                let members = self
                    .last_status(uid)
                    .await
                    .map(|status| status.members)
                    .unwrap_or_default();
                own.insert(uid, members);
            }
        }
        let mut on_this_node = |uid: &str, handle: &str| {
            let elsewhere = own.get(uid).is_some_and(|members| {
                members.iter().any(|member| {
                    member.cluster == cluster
                        && member.volume_handle.as_deref() == Some(handle)
                        && member.node.as_deref() != Some(node_name.as_str())
                })
            });
            if elsewhere {
                foreign.insert(handle.to_owned());
            }
            !elsewhere
        };
        let mut by_group: BTreeMap<&str, Vec<Event>> = BTreeMap::new();
        for failure in status
            .failures
            .iter()
            .filter(|failure| on_this_node(&failure.group_uid, &failure.volume_handle))
        {
            let event = Event::Report(freeze::Report {
                path: Path::Api,
                cluster: cluster.to_owned(),
                node: node.spec.node_name.clone(),
                volume_handle: failure.volume_handle.clone(),
                epoch_seen: failure.epoch_seen,
                message: lockstep_api::domain::bounded_message(&failure.error),
            });
            by_group.entry(&failure.group_uid).or_default().push(event);
        }
        for volume in &status.volumes {
            let (Some(group_uid), Some(held)) = (&volume.group_uid, &volume.hold_timeout) else {
                continue;
            };
            let event = Event::HoldTimedOut(freeze::HoldTimeoutReport {
                path: Path::Api,
                cluster: cluster.to_owned(),
                volume_handle: volume.volume_handle.clone(),
                epoch: held.epoch,
                failed_writes: held.failed_writes,
                since: Some(held.since.clone()),
            });
            by_group.entry(group_uid).or_default().push(event);
        }
        for enforced in &status.enforced {
            let volume_handles: Vec<String> = enforced
                .volume_handles
                .iter()
                .filter(|handle| on_this_node(&enforced.group_uid, handle))
                .cloned()
                .collect();
            let event = Event::Ack(freeze::Ack {
                path: Path::Api,
                cluster: cluster.to_owned(),
                epoch: enforced.epoch,
                stage: enforced.stage,
                volume_handles,
                fail_safe: enforced.fail_safe,
            });
            by_group.entry(&enforced.group_uid).or_default().push(event);
        }
        if !foreign.is_empty() {
            let named: Vec<&str> = foreign.iter().take(20).map(String::as_str).collect();
            self.inner.authenticator.refused(
                None,
                &format!("{cluster}/{node_name} (ReplicationNode)"),
                "not_own_volume",
                &format!(
                    "ReplicationNode {node_name} of cluster {cluster} names volumes on other nodes, ignored: {}",
                    named.join(", ")
                ),
            );
        }
        for (uid, events) in by_group {
            self.handle_many_quietly(uid, events).await;
        }
    }

    /// Decides several events about one group as one batch (one read, at most one status write).
    pub async fn handle_many(&self, uid: &str, events: Vec<Event>) -> Result<(), EngineError> {
        let name = self
            .group_by_uid(uid)
            .map(|group| group.name_any())
            .ok_or_else(|| EngineError::UnknownGroup(uid.to_owned()))?;
        let span = tracing::info_span!("decide", group = %name, events = events.len());
        self.handle_all(uid, &name, events, None)
            .instrument(span)
            .await
    }

    /// Handles several events about one group as one batch; a failure is only worth a log line.
    pub async fn handle_many_quietly(&self, uid: &str, events: Vec<Event>) {
        if let Err(error) = self.handle_many(uid, events).await {
            tracing::warn!(%error, group_uid = uid, "events not handled");
        }
    }

    /// Handles an event whose failure is only worth a log line (the sender retries; reconciles repeat).
    pub async fn handle_quietly(&self, uid: &str, event: Event) {
        if let Err(error) = self.handle(uid, event).await {
            tracing::warn!(%error, group_uid = uid, "event not handled");
        }
    }

    /// Sends the current directive of every group with members in `cluster` to one node (a sidecar that
    /// just subscribed: "send again, collect acknowledgements again").
    pub fn current_directives_for(&self, cluster: &str) -> Vec<(GroupEpoch, String)> {
        self.groups()
            .iter()
            .filter(|group| {
                group
                    .spec
                    .members
                    .iter()
                    .any(|member| member.cluster == cluster)
            })
            .filter_map(|group| {
                let uid = group.metadata.uid.clone()?;
                let (epoch, stage) = group.position();
                group.status.as_ref()?.stage?;
                Some((
                    GroupEpoch {
                        group_uid: uid,
                        epoch,
                        stage,
                    },
                    group.name_any(),
                ))
            })
            .filter(|(point, _)| point.stage != Stage::Resume || point.epoch > 0)
            .collect()
    }

    /// Sends each group's current directive again, over gRPC, to the connected sidecars of every member
    /// cluster with a volume that has not acknowledged it. A persisted point whose send was lost (the
    /// replica that decided it died between persisting and sending, or a stream dropped the message)
    /// reaches a gRPC-only member no other way until it resubscribes; enforcing is idempotent, so a
    /// repeat costs nothing. Returns how many nodes were sent a directive.
    pub fn resend_unacknowledged(&self) -> usize {
        let mut sent = 0;
        for group in self.groups() {
            let (Some(uid), Some(status)) = (group.metadata.uid.clone(), group.status.as_ref())
            else {
                continue;
            };
            let (epoch, stage) = group.position();
            if status.stage.is_none() || (stage == Stage::Resume && epoch == 0) {
                continue; // never froze: nothing to send
            }
            let behind: BTreeSet<String> = status
                .members
                .iter()
                .filter(|member| {
                    member
                        .acknowledged
                        .as_ref()
                        .is_none_or(|ack| (ack.epoch, ack.stage) < (epoch, stage))
                })
                .map(|member| member.cluster.clone())
                .collect();
            if behind.is_empty() {
                continue;
            }
            let point = GroupEpoch {
                group_uid: uid,
                epoch,
                stage,
            };
            let clusters: Vec<String> = behind.into_iter().collect();
            let nodes = self
                .inner
                .sessions
                .send_to_clusters(&clusters, &sessions::directive(&point, &group.name_any()));
            tracing::debug!(group = %group.name_any(), epoch, ?stage, nodes, "directive sent again to unacknowledged clusters");
            sent += nodes;
        }
        sent
    }
}

/// What the member clusters showed of a group's members.
struct Observation {
    views: BTreeMap<String, ClusterView>,
    claimed_elsewhere: members::Claims,
    /// When the oldest of `views` was read.
    read_at: Instant,
}

/// A group as a claimant of volumes: its spec, its last resolution and whether it is at a replicating
/// point (Replicating, or resumed), where it lets go of volumes it no longer claims.
fn claimant_of<'a>(group: &'a ConsistencyGroup, order: &'a ClaimOrder) -> members::Claimant<'a> {
    let status = group.status.as_ref();
    members::Claimant {
        name: group.metadata.name.as_deref().unwrap_or_default(),
        order,
        spec_members: &group.spec.members,
        status_members: status.map_or(&[], |status| status.members.as_slice()),
        replicating: group.position().1 == Stage::Resume,
    }
}

/// Resolves the members into the group's status (members, count, MembersResolved), keeping
/// acknowledgements recorded in that status; returns the claims refused because another group holds the
/// volume.
fn apply_resolution(group: &mut ConsistencyGroup, observation: &Observation) -> Vec<String> {
    let generation = group.metadata.generation;
    let status = group.status.get_or_insert_with(Default::default);
    let resolution = members::resolve(
        &group.spec.members,
        &observation.views,
        &status.members,
        &observation.claimed_elsewhere,
    );
    let resolved_volumes = resolution.members.len();
    let too_many = resolved_volumes > STATUS_MEMBERS_LIMIT;
    status.members = resolution.members;
    // The status lists at most STATUS_MEMBERS_LIMIT volumes (the API server refuses more, and a group
    // whose status cannot be written can neither freeze on record nor release): the rest stay out of
    // it and the group counts as unresolved, so no release acts on an image it cannot list.
    status.members.truncate(STATUS_MEMBERS_LIMIT);
    status.member_count = u32::try_from(status.members.len()).unwrap_or(u32::MAX);
    let update = ConditionUpdate {
        type_: condition::MEMBERS_RESOLVED,
        status: resolution.resolved && !too_many,
        reason: if too_many {
            "TooManyVolumes"
        } else if resolution.resolved {
            "Resolved"
        } else if !resolution.refused.is_empty() {
            "ClaimedByAnotherGroup"
        } else {
            "Unresolved"
        },
        message: if too_many {
            format!(
                "the members resolve to {resolved_volumes} volumes, more than the {STATUS_MEMBERS_LIMIT} the status can list: \
                 narrow the selectors or split the group; until then the group is Degraded and a freeze is not released"
            )
        } else if resolution.resolved {
            let mut message = format!(
                "{} member volumes resolved to volumes and nodes",
                status.member_count
            );
            if !resolution.stale.is_empty() {
                message.push_str("; ");
                message.push_str(&resolution.stale.join("; "));
            }
            message
        } else {
            resolution
                .problems
                .iter()
                .chain(&resolution.stale)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        },
    };
    conditions::set(&mut status.conditions, update, generation, &now());
    resolution.refused
}

/// Records an Event on a member volume's claim, in the claim's cluster (a failure is only logged).
async fn publish_on_claim(
    recorder: &Recorder,
    event: &KubeEvent,
    volume: &lockstep_api::v1alpha1::MemberVolumeStatus,
) {
    let claim = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolumeClaim".into()),
        namespace: Some(volume.namespace.clone()),
        name: Some(volume.pvc.clone()),
        ..Default::default()
    };
    if let Err(error) = recorder.publish(event, &claim).await {
        tracing::debug!(cluster = %volume.cluster, pvc = %volume.pvc, %error, "could not record an event on a claim");
    }
}

fn event_kind(event: &Event) -> &'static str {
    match event {
        Event::Report(_) => "report",
        Event::Ack(_) => "ack",
        Event::HoldTimedOut(_) => "hold-timeout",
        Event::Seen { .. } => "seen",
        Event::Evaluate => "evaluate",
    }
}

/// The current time as Kubernetes writes it.
pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn seen(epoch: u64) -> Event {
        Event::Seen { epoch }
    }

    #[test]
    fn events_queue_until_one_caller_takes_them_all() {
        let lock = GroupLock::default();
        lock.inbox(vec![seen(1)], None);
        lock.inbox(vec![seen(2), seen(3)], None);
        let batch = lock.take_inbox().unwrap();
        assert_eq!(batch.events, vec![seen(1), seen(2), seen(3)]);
        assert!(
            !batch.needs_fresh_read,
            "sidecar events may use the last written copy"
        );
        assert!(
            lock.take_inbox().is_none(),
            "a later caller finds its event decided"
        );
        lock.inbox(vec![Event::Evaluate], None);
        assert!(lock.take_inbox().unwrap().needs_fresh_read);
    }

    fn observation(read_at: Instant) -> Observation {
        Observation {
            views: BTreeMap::new(),
            claimed_elsewhere: members::Claims::new(),
            read_at,
        }
    }

    #[test]
    fn a_read_delivered_late_never_replaces_or_overrides_a_newer_one() {
        let older = Instant::now();
        let newer = older + std::time::Duration::from_millis(5);
        let lock = GroupLock::default();
        lock.inbox(vec![seen(1)], Some(observation(newer)));
        lock.inbox(vec![seen(2)], Some(observation(older)));
        let batch = lock.take_inbox().unwrap();
        assert_eq!(batch.observation.map(|o| o.read_at), Some(newer));

        let mut memory = GroupMemory::default();
        assert!(memory.accepts_observation(newer));
        assert!(
            memory.accepts_observation(newer),
            "the same read again, on a retry"
        );
        assert!(!memory.accepts_observation(older));
    }

    #[test]
    fn a_failed_batch_goes_back_before_newer_events_and_is_read_afresh() {
        let lock = GroupLock::default();
        lock.inbox(vec![seen(1), seen(2)], None);
        let failed = lock.take_inbox().unwrap();
        lock.inbox(vec![seen(3)], None);
        lock.requeue(failed.events);
        let again = lock.take_inbox().unwrap();
        assert_eq!(again.events, vec![seen(1), seen(2), seen(3)]);
        assert!(again.needs_fresh_read);
    }

    #[test]
    fn a_requeued_inbox_keeps_at_most_its_limit_dropping_the_oldest() {
        let lock = GroupLock::default();
        let many: Vec<Event> = (0..INBOX_LIMIT as u64 + 5).map(seen).collect();
        lock.requeue(many);
        let kept = lock.take_inbox().unwrap().events;
        assert_eq!(kept.len(), INBOX_LIMIT);
        assert_eq!(kept.first(), Some(&seen(5)));
    }
}
