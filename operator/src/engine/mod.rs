//! The control loop: fetch → decide ([`crate::freeze`]) → send and persist → record, one group at a time.
//!
//! Every event about a group — a report or acknowledgement from either path, a change of the group, a
//! periodic evaluation — goes through [`Engine::handle`], which serialises the group's decisions behind a
//! lock, reads the group fresh from the hub, decides, sends a freeze at once (before persisting, rule 1),
//! persists the status with a resourceVersion precondition (a deposed or racing writer gets 409 and
//! decides again on fresh state), and only then sends a release or resume. State lives in the API server:
//! a restarted operator picks up where the status says.
//!
//! One file per job:
//! - `queue`: each group's inbox and lock; events arriving during a decision are decided as one batch;
//! - `decide`: decide → send a freeze → persist → send a release or resume, for one batch;
//! - `observe`: the member-view cache, member resolution, and the periodic reconcile of a group;
//! - `directives`: mirrors in member clusters, the points each cluster should hold, resending;
//! - `finalize`: the deletion finalizer;
//! - `events`: Events on groups and on member claims;
//! - `member_clusters`: connecting to member clusters and writing MemberCluster status.
//!
//! What nodes send, on either path, comes in through [`crate::ingest`] (one validator, one event type).

mod decide;
mod directives;
mod events;
mod finalize;
mod member_clusters;
mod observe;
mod queue;
mod shards;

use observe::{CachedView, Observation, apply_resolution};
use queue::{Batch, GroupLock, GroupMemory};

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
    freeze::{self, Event},
    listed::Listed,
    members,
    members::ClusterView,
    metrics::Metrics,
    mirror,
    sessions::Sessions,
};

/// The finalizer by which a deleted group releases and resumes its volumes before it goes (rule 9).
pub const FINALIZER: &str = "lockstep.dev/release-on-delete";

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

/// The control system's shared state.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    hub: Client,
    hub_name: String,
    groups: Store<ConsistencyGroup>,
    /// Whether `groups` has been listed once.
    groups_listed: Listed,
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
    /// Held while the member clusters are connected and probed: one refresh at a time.
    connecting: tokio::sync::Mutex<()>,
    /// Whether this replica holds the leader Lease (always true without leader election).
    leader: tokio::sync::watch::Receiver<bool>,
    /// Lockstep's namespace in every cluster (the sidecars' Leases live there).
    lease_namespace: String,
    /// The last view read of each member cluster.
    views: Mutex<BTreeMap<String, CachedView>>,
    /// Verifies the sidecars' tokens on the gRPC path.
    authenticator: Arc<crate::authn::Authenticator>,
    /// The full status (every member volume) last decided for each group, by UID.
    records: Mutex<BTreeMap<String, Arc<ConsistencyGroupStatus>>>,
    /// The writer of each group's shards, by UID.
    shard_writers: Mutex<BTreeMap<String, shards::ShardSender>>,
    /// How many volumes one group may resolve to.
    max_group_volumes: usize,
    /// Set when the operator shuts down: no shard writer starts after it.
    shards_stopped: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("hub_name", &self.inner.hub_name)
            .finish()
    }
}

impl Engine {
    /// Builds the engine over reflector stores of the hub's groups and member clusters (each with whether
    /// it has been listed once); `options` gives the hub's name and Lockstep's namespace.
    pub fn new(
        hub: Client,
        options: &crate::Options,
        (groups, groups_listed): (Store<ConsistencyGroup>, Listed),
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
                groups_listed,
                member_clusters,
                clusters_listed,
                sessions,
                fanout,
                metrics,
                locks: Mutex::default(),
                members: tokio::sync::RwLock::default(),
                connecting: tokio::sync::Mutex::default(),
                leader,
                lease_namespace,
                views: Mutex::default(),
                authenticator,
                records: Mutex::default(),
                shard_writers: Mutex::default(),
                max_group_volumes: options.max_group_volumes,
                shards_stopped: std::sync::atomic::AtomicBool::new(false),
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

    /// Every group of the hub, once the hub's groups have been listed: before that (just after a start or
    /// a failover) a group missing from the store may exist.
    pub fn listed_groups(&self) -> Option<Vec<Arc<ConsistencyGroup>>> {
        self.inner
            .groups_listed
            .is_listed()
            .then(|| self.inner.groups.state())
    }

    /// Whether this operator knows a group's member volumes: it decided or restored them, or the group
    /// has never been decided (it has none yet). A group decided by an earlier operator has its volumes in
    /// shards until its first reconcile here restores them (its bounded status lists none).
    pub fn knows_members_of(&self, group: &ConsistencyGroup) -> bool {
        let Some(uid) = group.metadata.uid.as_deref() else {
            return true;
        };
        self.volume_record(uid).is_some()
            || group
                .status
                .as_ref()
                .is_none_or(|status| !status.members.is_empty())
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

    /// The group's full status (every member volume) as last decided: the copy this operator wrote last,
    /// else the hub's reflector's, with the per-volume record this operator keeps.
    pub async fn last_status(&self, uid: &str) -> Option<ConsistencyGroupStatus> {
        let record = self.volume_record(uid);
        if let Some(lock) = self.existing_lock(uid) {
            let memory = lock.memory.lock().await;
            if let Some(written) = &memory.last_written {
                return crate::ledger::hydrate(written.status.clone(), record.as_deref());
            }
        }
        crate::ledger::hydrate(self.group_by_uid(uid)?.status.clone(), record.as_deref())
    }

    /// The group's full status as this operator last decided it, for the checks on a call (whose
    /// volumes these are, which acknowledgements are recorded): its record, shared, without waiting for
    /// a decision in progress or copying thousands of volumes; [`Self::last_status`] while it has no
    /// record yet.
    pub async fn decided_status(&self, uid: &str) -> Option<Arc<ConsistencyGroupStatus>> {
        match self.volume_record(uid) {
            Some(record) => Some(record),
            None => self.last_status(uid).await.map(Arc::new),
        }
    }

    /// The member volumes of a group, as last decided (none before its first decision): shared with the
    /// group's record, not copied (a group has up to thousands).
    pub fn member_volumes_of(&self, uid: &str) -> MemberVolumes {
        if let Some(record) = self.volume_record(uid) {
            return MemberVolumes(Some(record));
        }
        MemberVolumes(
            self.group_by_uid(uid)
                .and_then(|group| group.status.clone())
                .map(Arc::new),
        )
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
}

/// A group's member volumes as last decided, shared with the status they belong to.
#[derive(Debug, Clone, Default)]
pub struct MemberVolumes(Option<Arc<ConsistencyGroupStatus>>);

impl std::ops::Deref for MemberVolumes {
    type Target = [lockstep_api::v1alpha1::MemberVolumeStatus];

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().map_or(&[], |status| &status.members)
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
