//! One way in for what nodes send: a report or acknowledgement that came over gRPC ([`grpc`]) or in a
//! ReplicationNode's status ([`api`]) is put in one form ([`Sent`]), checked by one validator
//! ([`check`]) and becomes one checked form ([`NodeReport`]: the node and the decision core's events by
//! group). The same input is refused or accepted the same way whichever path brought it, with the same
//! reason; every refusal is logged and counted in `lockstep_reports_refused_total{path, reason}`.
//!
//! The limits are those the ReplicationNode CRD's schema states (a test holds them equal), so a status a
//! member cluster's API server accepted under that schema is never refused here; the operator checks
//! again because it does not trust a member cluster's API server to have the schema it expects, and gRPC
//! has no schema at all.

pub mod api;
pub mod grpc;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use lockstep_api::domain::{MAX_EPOCH, Path, Stage, VolumeState};

use crate::{
    engine::{Engine, EngineError},
    freeze::{self, Event},
    metrics::Metrics,
    sessions::{NodeKey, VolumeReplication},
};

/// Longest MemberCluster name (ReplicationNode `spec.cluster`).
pub const MAX_CLUSTER_NAME: usize = 63;
/// Longest node name (ReplicationNode `spec.nodeName`).
pub const MAX_NODE_NAME: usize = 253;
/// Longest group UID.
pub const MAX_GROUP_UID: usize = 128;
/// Longest CSI volume handle.
pub const MAX_VOLUME_HANDLE: usize = 1024;
/// Most failures one report carries.
pub const MAX_FAILURES: usize = 1024;
/// Most volumes (hold timeouts, replication states) one report carries.
pub const MAX_VOLUMES: usize = 1024;
/// Most acknowledgements one report carries.
pub const MAX_ACKS: usize = 256;
/// Most volume handles one acknowledgement names.
pub const MAX_ACK_VOLUMES: usize = 1024;

/// A copy failure as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct SentFailure {
    pub group_uid: String,
    pub volume_handle: String,
    pub epoch_seen: u64,
    pub error: String,
}

/// Held writes failed at a group's hold timeout, as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct SentHoldTimeout {
    pub group_uid: String,
    pub volume_handle: String,
    pub epoch: u64,
    pub failed_writes: u64,
    pub since: Option<Time>,
}

/// An acknowledgement of a group's (epoch, stage) as sent; `stage` is `None` where the sender left it
/// unset.
#[derive(Debug, Clone, PartialEq)]
pub struct SentAck {
    pub group_uid: String,
    pub epoch: u64,
    pub stage: Option<Stage>,
    pub volume_handles: Vec<String>,
    pub fail_safe: bool,
}

/// A volume's replication state as sent; `state` and `stage` are `None` where the sender left them unset.
#[derive(Debug, Clone, PartialEq)]
pub struct SentState {
    pub volume_handle: String,
    pub state: Option<VolumeState>,
    pub epoch: u64,
    pub stage: Option<Stage>,
}

/// What one node sent on either path, nothing checked yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    pub path: Path,
    pub cluster: String,
    pub node: String,
    pub failures: Vec<SentFailure>,
    pub hold_timeouts: Vec<SentHoldTimeout>,
    pub acks: Vec<SentAck>,
    pub states: Vec<SentState>,
}

impl Sent {
    /// Nothing yet, from `node` of `cluster` on `path`.
    pub fn from_node(path: Path, cluster: &str, node: &str) -> Self {
        Self {
            path,
            cluster: cluster.to_owned(),
            node: node.to_owned(),
            failures: Vec::new(),
            hold_timeouts: Vec::new(),
            acks: Vec::new(),
            states: Vec::new(),
        }
    }
}

/// What a node sent, checked: the decision core's events by group UID, and the volumes' replication
/// states by volume handle.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeReport {
    pub path: Path,
    pub node: NodeKey,
    pub events: BTreeMap<String, Vec<Event>>,
    pub states: BTreeMap<String, VolumeReplication>,
}

/// Why what a node sent is refused (all of it: a refused report changes nothing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the node identity needs both a cluster and a node name")]
    NoNode,
    #[error("the {what} name is {length} bytes long, longer than {limit}")]
    NameTooLong {
        what: &'static str,
        length: usize,
        limit: usize,
    },
    #[error("a {what} without a group UID")]
    NoGroupUid { what: &'static str },
    #[error("a {what} with a group UID of {length} bytes, longer than {MAX_GROUP_UID}")]
    GroupUidTooLong { what: &'static str, length: usize },
    #[error("a {what} without a volume handle")]
    NoVolumeHandle { what: &'static str },
    #[error("a {what} with a volume handle of {length} bytes, longer than {MAX_VOLUME_HANDLE}")]
    VolumeHandleTooLong { what: &'static str, length: usize },
    #[error("a {what} naming epoch {epoch}, above the largest epoch {MAX_EPOCH}")]
    EpochBeyondMax { what: &'static str, epoch: u64 },
    #[error("a {what} without a stage")]
    StageUnspecified { what: &'static str },
    #[error("a volume state without a replication state")]
    StateUnspecified,
    #[error("a hold timeout without a failed write")]
    NoFailedWrite,
    #[error("{count} {what}, more than {limit}")]
    TooMany {
        what: &'static str,
        count: usize,
        limit: usize,
    },
    #[error("a ReplicationNode that does not decode: {0}")]
    Undecodable(String),
}

impl Refusal {
    /// The reason, as the `reason` label of `lockstep_reports_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoNode => "no_node",
            Self::NameTooLong { .. } => "name_too_long",
            Self::NoGroupUid { .. } => "no_group_uid",
            Self::GroupUidTooLong { .. } => "group_uid_too_long",
            Self::NoVolumeHandle { .. } => "no_volume_handle",
            Self::VolumeHandleTooLong { .. } => "volume_handle_too_long",
            Self::EpochBeyondMax { .. } => "epoch_beyond_max",
            Self::StageUnspecified { .. } => "stage_unspecified",
            Self::StateUnspecified => "state_unspecified",
            Self::NoFailedWrite => "no_failed_write",
            Self::TooMany { .. } => "too_many",
            Self::Undecodable(_) => "undecodable",
        }
    }

    /// Logs and counts the refusal of what `node` of `cluster` sent on `path`.
    pub fn record(&self, metrics: &Metrics, path: Path, cluster: &str, node: &str) {
        let (cluster, node) = (
            lockstep_api::domain::bounded_message(cluster),
            lockstep_api::domain::bounded_message(node),
        );
        tracing::warn!(%path, %cluster, %node, reason = self.reason(), refusal = %self, "refused a malformed report");
        metrics.report_refused(path, self.reason());
    }
}

/// Checks the node's identity alone: both names present and within their limits.
pub fn check_node(cluster: &str, node: &str) -> Result<NodeKey, Refusal> {
    if cluster.is_empty() || node.is_empty() {
        return Err(Refusal::NoNode);
    }
    for (what, name, limit) in [
        ("cluster", cluster, MAX_CLUSTER_NAME),
        ("node", node, MAX_NODE_NAME),
    ] {
        if name.len() > limit {
            return Err(Refusal::NameTooLong {
                what,
                length: name.len(),
                limit,
            });
        }
    }
    Ok((cluster.to_owned(), node.to_owned()))
}

fn check_count(what: &'static str, count: usize, limit: usize) -> Result<(), Refusal> {
    if count > limit {
        return Err(Refusal::TooMany { what, count, limit });
    }
    Ok(())
}

fn check_group_uid(what: &'static str, uid: &str) -> Result<(), Refusal> {
    if uid.is_empty() {
        return Err(Refusal::NoGroupUid { what });
    }
    if uid.len() > MAX_GROUP_UID {
        return Err(Refusal::GroupUidTooLong {
            what,
            length: uid.len(),
        });
    }
    Ok(())
}

fn check_volume_handle(what: &'static str, handle: &str, required: bool) -> Result<(), Refusal> {
    if required && handle.is_empty() {
        return Err(Refusal::NoVolumeHandle { what });
    }
    if handle.len() > MAX_VOLUME_HANDLE {
        return Err(Refusal::VolumeHandleTooLong {
            what,
            length: handle.len(),
        });
    }
    Ok(())
}

fn check_epoch(what: &'static str, epoch: u64) -> Result<(), Refusal> {
    if epoch > MAX_EPOCH {
        return Err(Refusal::EpochBeyondMax { what, epoch });
    }
    Ok(())
}

fn check_stage(what: &'static str, stage: Option<Stage>) -> Result<Stage, Refusal> {
    stage.ok_or(Refusal::StageUnspecified { what })
}

/// The one validator: refuses the whole of what was sent at its first malformed part, else turns it into
/// the decision core's events, by group, and the volumes' states. A copy error is cut to
/// [`lockstep_api::domain::MESSAGE_LIMIT`] bytes, never refused for its length.
pub fn check(sent: Sent) -> Result<NodeReport, Refusal> {
    let node = check_node(&sent.cluster, &sent.node)?;
    check_count("failures", sent.failures.len(), MAX_FAILURES)?;
    check_count("hold timeouts", sent.hold_timeouts.len(), MAX_VOLUMES)?;
    check_count("volume states", sent.states.len(), MAX_VOLUMES)?;
    check_count("acknowledgements", sent.acks.len(), MAX_ACKS)?;
    let mut events: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    for failure in sent.failures {
        check_group_uid("failure", &failure.group_uid)?;
        check_volume_handle("failure", &failure.volume_handle, true)?;
        check_epoch("failure", failure.epoch_seen)?;
        events
            .entry(failure.group_uid)
            .or_default()
            .push(Event::Report(freeze::Report {
                path: sent.path,
                cluster: node.0.clone(),
                node: node.1.clone(),
                volume_handle: failure.volume_handle,
                epoch_seen: failure.epoch_seen,
                message: lockstep_api::domain::bounded_message(&failure.error),
            }));
    }
    for held in sent.hold_timeouts {
        check_group_uid("hold timeout", &held.group_uid)?;
        check_volume_handle("hold timeout", &held.volume_handle, true)?;
        check_epoch("hold timeout", held.epoch)?;
        if held.failed_writes == 0 {
            return Err(Refusal::NoFailedWrite);
        }
        events
            .entry(held.group_uid)
            .or_default()
            .push(Event::HoldTimedOut(freeze::HoldTimeoutReport {
                path: sent.path,
                cluster: node.0.clone(),
                volume_handle: held.volume_handle,
                epoch: held.epoch,
                failed_writes: held.failed_writes,
                since: held.since,
            }));
    }
    for ack in sent.acks {
        check_group_uid("acknowledgement", &ack.group_uid)?;
        check_epoch("acknowledgement", ack.epoch)?;
        let stage = check_stage("acknowledgement", ack.stage)?;
        check_count(
            "volumes in one acknowledgement",
            ack.volume_handles.len(),
            MAX_ACK_VOLUMES,
        )?;
        for handle in &ack.volume_handles {
            check_volume_handle("acknowledgement", handle, false)?;
        }
        events
            .entry(ack.group_uid)
            .or_default()
            .push(Event::Ack(freeze::Ack {
                path: sent.path,
                cluster: node.0.clone(),
                epoch: ack.epoch,
                stage,
                volume_handles: ack.volume_handles,
                fail_safe: ack.fail_safe,
            }));
    }
    let mut states = BTreeMap::new();
    for reported in sent.states {
        check_volume_handle("volume state", &reported.volume_handle, true)?;
        check_epoch("volume state", reported.epoch)?;
        let stage = check_stage("volume state", reported.stage)?;
        let state = reported.state.ok_or(Refusal::StateUnspecified)?;
        states.insert(reported.volume_handle, (state, reported.epoch, stage));
    }
    Ok(NodeReport {
        path: sent.path,
        node,
        events,
        states,
    })
}

/// [`check`], logging and counting a refusal.
pub fn check_and_record(sent: Sent, metrics: &Metrics) -> Result<NodeReport, Refusal> {
    let (path, cluster, node) = (sent.path, sent.cluster.clone(), sent.node.clone());
    check(sent).inspect_err(|refusal| refusal.record(metrics, path, &cluster, &node))
}

/// What became of a checked report's events.
#[derive(Debug, Default)]
pub struct Delivered {
    /// The groups whose events were decided.
    pub decided: Vec<String>,
    /// The first group named that this hub does not know: its events are dropped (and counted as
    /// `unknown_group`), the other groups' are decided all the same (a freeze is never held back).
    pub unknown_group: Option<String>,
    /// The first decision that could not be made.
    pub not_decided: Option<EngineError>,
}

/// How many groups named in one report are decided at once. Each decision is a read and a status write
/// under the group's own lock; one after the other, a link failure that fails a volume of 500 groups on
/// one node would freeze the last of them 500 status writes after the first.
const CONCURRENT_DECISIONS: usize = 32;

/// Hands each group's events to the engine as one batch (one read, at most one status write), several
/// groups at a time.
pub async fn deliver(
    engine: &Engine,
    path: Path,
    events: BTreeMap<String, Vec<Event>>,
) -> Delivered {
    use futures::StreamExt;

    let mut delivered = Delivered::default();
    let mut known = Vec::with_capacity(events.len());
    for (uid, events) in events {
        if engine.group_by_uid(&uid).is_none() {
            tracing::warn!(%path, group_uid = %lockstep_api::domain::bounded_message(&uid), "report for a group this hub does not know");
            engine.metrics().report_refused(path, UNKNOWN_GROUP);
            delivered.unknown_group.get_or_insert(uid);
            continue;
        }
        known.push((uid, events));
    }
    let mut decisions = futures::stream::iter(known)
        .map(|(uid, events)| async move {
            let result = engine.handle_many(&uid, events).await;
            (uid, result)
        })
        .buffered(CONCURRENT_DECISIONS);
    while let Some((uid, result)) = decisions.next().await {
        match result {
            Ok(()) => delivered.decided.push(uid),
            Err(error) => {
                tracing::warn!(%path, %error, group_uid = %uid, "events not handled");
                delivered.not_decided.get_or_insert(error);
            }
        }
    }
    delivered
}

/// The `reason` label counting events for a group this hub does not know.
pub const UNKNOWN_GROUP: &str = "unknown_group";

#[cfg(test)]
mod tests;
