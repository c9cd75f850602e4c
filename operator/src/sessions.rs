//! The sidecars subscribed over gRPC (path 2): one open `Subscribe` stream per node.
//!
//! A directive goes to every session of the group's member clusters: one message per node, never one per
//! volume. A cluster's membership goes to its sessions when they subscribe and whenever it changes. A sidecar of a gRPC-only cluster also tells, here, which PVCs it resolved on its node; member
//! resolution reads them back.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use lockstep_api::{
    domain::{GroupEpoch, Stage, VolumeState},
    proto::control::v1::{self as pb, ControlMessage, control_message::Kind},
};
use tokio::sync::mpsc;

use crate::members::{ReportedState, ReportedVolume};

/// How many messages may wait for a slow sidecar before the stream counts as stuck and is closed. A freeze
/// of hundreds of groups sends each node two directives per group within a moment (the stream's task
/// drains them as the runtime gets to it), so the buffer holds a few of those bursts; a directive is a
/// few hundred bytes, and the buffer takes memory only while it fills.
const SESSION_BUFFER: usize = 4_096;

/// A node's identity: (member cluster, node name).
pub type NodeKey = (String, String);

struct Session {
    id: u64,
    sender: mpsc::Sender<Result<ControlMessage, tonic::Status>>,
    volumes: Vec<ReportedVolume>,
    /// Each volume's replication state as the node last reported it, with the (epoch, stage) it carried.
    states: BTreeMap<String, VolumeReplication>,
}

/// A volume's replication state as its sidecar reported it, at the (epoch, stage) it carried.
pub type VolumeReplication = (VolumeState, u64, Stage);

/// How many sessions one member cluster may have open, unless the operator is told otherwise.
pub const DEFAULT_SESSIONS_PER_CLUSTER: usize = 10_000;

/// A cluster already has as many sessions as it may: a new node's subscription is refused.
#[derive(Debug, thiserror::Error)]
#[error("member cluster {cluster:?} already has {limit} gRPC sessions open, the most it may have")]
pub struct TooManySessions {
    /// The cluster.
    pub cluster: String,
    /// Its limit.
    pub limit: usize,
}

/// The registry of open streams, shared by the gRPC service and the fan-out.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Mutex<Inner>>,
    /// How many sessions one cluster may have open.
    per_cluster: usize,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::with_limit(DEFAULT_SESSIONS_PER_CLUSTER)
    }
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    by_node: BTreeMap<NodeKey, Session>,
    /// The membership last sent to each cluster's sessions, without the groups' current points (the
    /// directives carry those).
    memberships: BTreeMap<String, pb::Membership>,
    /// The directive last sent for each group (by UID).
    directives_sent: BTreeMap<String, DirectiveSent>,
}

/// A group's directive as last sent: which point, when, and how many times it was sent before.
struct DirectiveSent {
    point: GroupEpoch,
    at: Instant,
    repeats: u32,
}

/// A directive resent again and again waits at most `2^MAX_RESEND_DOUBLINGS` resend intervals.
const MAX_RESEND_DOUBLINGS: u32 = 5;

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("open", &self.lock().by_node.len())
            .field("per_cluster", &self.per_cluster)
            .finish()
    }
}

impl Sessions {
    /// A registry in which each cluster may have at most `per_cluster` sessions open.
    pub fn with_limit(per_cluster: usize) -> Self {
        Self {
            inner: Arc::default(),
            per_cluster,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned registry only means a panic elsewhere; its data stays usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Opens a session for a node, replacing (and so closing) an older one of the same node; a node new
    /// to a cluster that already has its limit of sessions is refused.
    pub fn open(
        &self,
        node: NodeKey,
        volumes: Vec<ReportedVolume>,
    ) -> Result<(u64, mpsc::Receiver<Result<ControlMessage, tonic::Status>>), TooManySessions> {
        let mut inner = self.lock();
        if !inner.by_node.contains_key(&node) {
            let open = inner
                .by_node
                .keys()
                .filter(|(cluster, _)| *cluster == node.0)
                .count();
            if open >= self.per_cluster {
                return Err(TooManySessions {
                    cluster: node.0,
                    limit: self.per_cluster,
                });
            }
        }
        let (sender, receiver) = mpsc::channel(SESSION_BUFFER);
        inner.next_id += 1;
        let id = inner.next_id;
        inner.by_node.insert(
            node,
            Session {
                id,
                sender,
                volumes,
                states: BTreeMap::new(),
            },
        );
        Ok((id, receiver))
    }

    /// Closes a session, unless a newer one of the same node replaced it.
    pub fn close(&self, node: &NodeKey, id: u64) {
        let mut inner = self.lock();
        if inner
            .by_node
            .get(node)
            .is_some_and(|session| session.id == id)
        {
            inner.by_node.remove(node);
        }
    }

    /// Records the volumes a node's sidecar resolved (sent with a report or a subscription); false when
    /// the node holds no open session (its next subscription carries them).
    pub fn record_volumes(&self, node: &NodeKey, volumes: Vec<ReportedVolume>) -> bool {
        match self.lock().by_node.get_mut(node) {
            Some(session) => {
                session.volumes = volumes;
                true
            }
            None => false,
        }
    }

    /// Records the replication states a node's sidecar reported (gRPC-only clusters have no
    /// ReplicationNode); false when the node holds no open session (it sends them again on subscribing).
    pub fn record_states(
        &self,
        node: &NodeKey,
        states: BTreeMap<String, VolumeReplication>,
    ) -> bool {
        match self.lock().by_node.get_mut(node) {
            Some(session) => {
                session.states = states;
                true
            }
            None => false,
        }
    }

    /// The replication state of each volume the sessions of a cluster reported.
    pub fn reported_states(&self, cluster: &str) -> BTreeMap<(String, String), ReportedState> {
        self.lock()
            .by_node
            .iter()
            .filter(|((session_cluster, _), _)| session_cluster == cluster)
            .flat_map(|((_, node), session)| {
                session
                    .states
                    .iter()
                    .map(|(handle, &(state, epoch, stage))| {
                        let reported = ReportedState {
                            state,
                            epoch,
                            stage,
                        };
                        ((handle.clone(), node.clone()), reported)
                    })
            })
            .collect()
    }

    /// The volumes the sessions of a cluster reported.
    pub fn reported_volumes(&self, cluster: &str) -> Vec<ReportedVolume> {
        self.lock()
            .by_node
            .iter()
            .filter(|((session_cluster, _), _)| session_cluster == cluster)
            .flat_map(|(_, session)| session.volumes.iter().cloned())
            .collect()
    }

    /// How many sessions a cluster has open.
    pub fn count(&self, cluster: &str) -> usize {
        self.lock()
            .by_node
            .keys()
            .filter(|(session_cluster, _)| session_cluster == cluster)
            .count()
    }

    /// Sends a message to every session of the given clusters; returns how many took it. A session whose
    /// buffer is full or whose stream is gone is closed: its sidecar reconnects and is sent the current
    /// state again.
    fn send_within(inner: &mut Inner, clusters: &[String], message: &ControlMessage) -> usize {
        let mut sent = 0;
        inner.by_node.retain(|(cluster, node), session| {
            if !clusters.iter().any(|wanted| wanted == cluster) {
                return true;
            }
            match session.sender.try_send(Ok(message.clone())) {
                Ok(()) => {
                    sent += 1;
                    true
                }
                Err(error) => {
                    tracing::warn!(%cluster, %node, %error, "closing a gRPC session that cannot take a message");
                    false
                }
            }
        });
        sent
    }

    /// Sends a group's directive to every session of `clusters`; returns how many took it. Remembered for
    /// [`Self::send_directive_again`].
    pub fn send_directive(
        &self,
        clusters: &[String],
        point: &GroupEpoch,
        group_name: &str,
    ) -> usize {
        self.send_directive_again(clusters, point, group_name, Duration::ZERO)
            .unwrap_or_default()
    }

    /// Sends a group's directive again, as [`Self::send_directive`] — unless the same directive was sent
    /// too recently (returns `None` then): `interval` after its first send, then twice as long after each
    /// repeat, up to [`MAX_RESEND_DOUBLINGS`] doublings. A repeat is cheap for one group, but hundreds of
    /// groups frozen at once stay unacknowledged for seconds: resent every `interval`, they filled the
    /// sessions' buffers until the sessions were closed.
    pub fn send_directive_again(
        &self,
        clusters: &[String],
        point: &GroupEpoch,
        group_name: &str,
        interval: Duration,
    ) -> Option<usize> {
        self.send_directive_at(clusters, point, group_name, interval, Instant::now())
    }

    fn send_directive_at(
        &self,
        clusters: &[String],
        point: &GroupEpoch,
        group_name: &str,
        interval: Duration,
        now: Instant,
    ) -> Option<usize> {
        let mut inner = self.lock();
        let repeats = match inner.directives_sent.get(&point.group_uid) {
            Some(sent) if &sent.point == point => {
                let gap = interval * (1u32 << sent.repeats.min(MAX_RESEND_DOUBLINGS));
                if now.saturating_duration_since(sent.at) < gap {
                    return None;
                }
                sent.repeats.saturating_add(1)
            }
            _ => 0,
        };
        inner.directives_sent.insert(
            point.group_uid.clone(),
            DirectiveSent {
                point: point.clone(),
                at: now,
                repeats,
            },
        );
        Some(Self::send_within(
            &mut inner,
            clusters,
            &directive(point, group_name),
        ))
    }

    /// Forgets the directives sent for groups that no longer exist.
    pub fn forget_directives_except(&self, groups: &std::collections::BTreeSet<&str>) {
        self.lock()
            .directives_sent
            .retain(|uid, _| groups.contains(uid.as_str()));
    }

    /// Sends a cluster's membership (every group with members there) to each of its sessions when it
    /// differs from the one they were sent last (a group created, changed or deleted), and to `joining`
    /// (a node that just subscribed) in any case; returns how many sessions took it.
    pub fn push_membership(
        &self,
        cluster: &str,
        membership: pb::Membership,
        joining: Option<&NodeKey>,
    ) -> usize {
        let mut compared = membership.clone();
        for group in &mut compared.groups {
            group.current = None;
        }
        let message = ControlMessage {
            kind: Some(Kind::Membership(membership)),
        };
        // Under one lock: two pushes never leave a cluster's sessions with the older of two memberships.
        let mut inner = self.lock();
        if inner.memberships.get(cluster) == Some(&compared) {
            let joined = joining
                .and_then(|node| inner.by_node.get(node))
                .is_some_and(|session| session.sender.try_send(Ok(message)).is_ok());
            return usize::from(joined);
        }
        inner.memberships.insert(cluster.to_owned(), compared);
        Self::send_within(&mut inner, &[cluster.to_owned()], &message)
    }

    /// Forgets the membership last sent to a cluster: the next one pushed goes to all its sessions.
    pub fn forget_membership(&self, cluster: &str) {
        self.lock().memberships.remove(cluster);
    }

    /// The clusters with at least one open session.
    pub fn clusters(&self) -> Vec<String> {
        let mut clusters: Vec<String> = self
            .lock()
            .by_node
            .keys()
            .map(|(cluster, _)| cluster.clone())
            .collect();
        clusters.dedup();
        clusters
    }

    /// Sends a message to one session of a node, if it is open; `false` once it is not — closed, or
    /// replaced by a newer session of the same node (whose own heartbeat task serves it), so the task
    /// that sends it heartbeats ends.
    pub fn send_to_session(&self, node: &NodeKey, id: u64, message: ControlMessage) -> bool {
        self.lock()
            .by_node
            .get(node)
            .filter(|session| session.id == id)
            .is_some_and(|session| session.sender.try_send(Ok(message)).is_ok())
    }

    /// Sends a message to one node's session, if it is open.
    pub fn send_to_node(&self, node: &NodeKey, message: ControlMessage) -> bool {
        self.lock()
            .by_node
            .get(node)
            .is_some_and(|session| session.sender.try_send(Ok(message)).is_ok())
    }

    /// Closes every session (this replica lost the leadership): the sidecars reconnect to the leader.
    pub fn close_all(&self) {
        let mut inner = self.lock();
        inner.by_node.clear();
        inner.memberships.clear();
    }

    /// Every open session's node.
    pub fn nodes(&self) -> Vec<NodeKey> {
        self.lock().by_node.keys().cloned().collect()
    }
}

/// The directive message for a point of a group.
pub fn directive(point: &GroupEpoch, group_name: &str) -> ControlMessage {
    ControlMessage {
        kind: Some(Kind::Directive(pb::Directive {
            target: Some(pb::GroupEpoch::from(point)),
            group_name: group_name.to_owned(),
        })),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    impl Sessions {
        fn open_ok(
            &self,
            node: NodeKey,
            volumes: Vec<ReportedVolume>,
        ) -> (u64, mpsc::Receiver<Result<ControlMessage, tonic::Status>>) {
            self.open(node, volumes).unwrap()
        }
    }

    fn key(cluster: &str, node: &str) -> NodeKey {
        (cluster.to_owned(), node.to_owned())
    }

    #[tokio::test]
    async fn a_directive_reaches_each_node_of_the_member_clusters_once() {
        let sessions = Sessions::default();
        let (_, mut east_a) = sessions.open_ok(key("east", "a"), Vec::new());
        let (_, mut east_b) = sessions.open_ok(key("east", "b"), Vec::new());
        let (_, mut west) = sessions.open_ok(key("west", "a"), Vec::new());
        let point = GroupEpoch::new("uid", 1, Stage::Freeze).unwrap();
        let sent = sessions.send_directive(&["east".to_owned()], &point, "orders");
        assert_eq!(sent, 2);
        assert!(east_a.try_recv().is_ok() && east_b.try_recv().is_ok());
        assert!(east_a.try_recv().is_err(), "one message per node");
        assert!(west.try_recv().is_err(), "west is not a member cluster");
    }

    #[tokio::test]
    async fn a_directive_is_sent_again_only_once_its_interval_has_passed() {
        let sessions = Sessions::default();
        let (_, mut east) = sessions.open_ok(key("east", "a"), Vec::new());
        let east_only = ["east".to_owned()];
        let freeze = GroupEpoch::new("uid", 1, Stage::Freeze).unwrap();
        let hour = Duration::from_secs(3600);
        assert_eq!(sessions.send_directive(&east_only, &freeze, "orders"), 1);
        assert_eq!(
            sessions.send_directive_again(&east_only, &freeze, "orders", hour),
            None,
            "sent a moment ago"
        );
        assert_eq!(
            sessions.send_directive_again(&east_only, &freeze, "orders", Duration::ZERO),
            Some(1),
            "its interval has passed"
        );
        let release = GroupEpoch::new("uid", 1, Stage::Release).unwrap();
        assert_eq!(
            sessions.send_directive_again(&east_only, &release, "orders", hour),
            Some(1),
            "another point is sent at once"
        );
        let other = GroupEpoch::new("other-uid", 1, Stage::Freeze).unwrap();
        assert_eq!(
            sessions.send_directive_again(&east_only, &other, "billing", hour),
            Some(1),
            "so is another group's"
        );
        let received = std::iter::from_fn(|| east.try_recv().ok()).count();
        assert_eq!(received, 4);
    }

    #[tokio::test]
    async fn a_directive_resent_again_and_again_waits_twice_as_long_each_time() {
        let sessions = Sessions::default();
        let (_, mut east) = sessions.open_ok(key("east", "a"), Vec::new());
        let east_only = ["east".to_owned()];
        let freeze = GroupEpoch::new("uid", 1, Stage::Freeze).unwrap();
        let second = Duration::from_secs(1);
        let start = Instant::now();
        let at = |seconds: f64| start + Duration::from_secs_f64(seconds);
        let send = |point: &GroupEpoch, seconds: f64| {
            sessions.send_directive_at(&east_only, point, "orders", second, at(seconds))
        };
        assert_eq!(send(&freeze, 0.0), Some(1), "the first send");
        // Resent after 1 s, then 2 s, 4 s, 8 s, 16 s, 32 s, and 32 s from then on.
        let mut last = 0.0;
        for gap in [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 32.0] {
            assert_eq!(
                send(&freeze, last + gap - 0.5),
                None,
                "{gap} s after {last} s"
            );
            assert_eq!(send(&freeze, last + gap), Some(1), "{gap} s after {last} s");
            last += gap;
        }
        let release = GroupEpoch::new("uid", 1, Stage::Release).unwrap();
        assert_eq!(send(&release, last + 0.1), Some(1), "a new point at once");
        assert_eq!(send(&release, last + 0.6), None);
        assert_eq!(
            send(&release, last + 1.1),
            Some(1),
            "and its resends start again from one interval"
        );
        let received = std::iter::from_fn(|| east.try_recv().ok()).count();
        assert_eq!(received, 1 + 7 + 2);
    }

    fn membership(group: &str, epoch: u64) -> pb::Membership {
        pb::Membership {
            groups: vec![pb::GroupMembership {
                group_name: group.to_owned(),
                current: Some(pb::GroupEpoch::from(
                    &GroupEpoch::new("uid", epoch, Stage::Freeze).unwrap(),
                )),
                hold_timeout_ms: 30_000,
                volumes: Vec::new(),
                created_unix_ms: 0,
                in_sync_epoch: 0,
            }],
        }
    }

    #[tokio::test]
    async fn a_membership_goes_to_a_cluster_when_it_changes_and_to_a_node_joining_it() {
        let sessions = Sessions::default();
        let (_, mut a) = sessions.open_ok(key("east", "a"), Vec::new());
        assert_eq!(
            sessions.push_membership("east", membership("orders", 1), None),
            1
        );
        assert!(a.try_recv().is_ok());
        assert_eq!(
            sessions.push_membership("east", membership("orders", 2), None),
            0,
            "a new point alone is the directives' business"
        );
        let (_, mut b) = sessions.open_ok(key("east", "b"), Vec::new());
        let joining = key("east", "b");
        assert_eq!(
            sessions.push_membership("east", membership("orders", 2), Some(&joining)),
            1
        );
        assert!(b.try_recv().is_ok() && a.try_recv().is_err());
        // The group found in sync after a resume: gRPC-only sidecars drop their kept images on it.
        let mut in_sync = membership("orders", 2);
        in_sync.groups[0].in_sync_epoch = 2;
        assert_eq!(sessions.push_membership("east", in_sync, None), 2);
        assert!(a.try_recv().is_ok() && b.try_recv().is_ok());
        assert_eq!(
            sessions.push_membership("east", membership("billing", 2), None),
            2
        );
        assert!(a.try_recv().is_ok() && b.try_recv().is_ok());
    }

    #[tokio::test]
    async fn a_reconnecting_node_replaces_its_old_session_and_gone_streams_are_dropped() {
        let sessions = Sessions::default();
        let (old, _old_receiver) = sessions.open_ok(key("east", "a"), Vec::new());
        let (_, receiver) = sessions.open_ok(key("east", "a"), Vec::new());
        sessions.close(&key("east", "a"), old);
        assert_eq!(
            sessions.count("east"),
            1,
            "closing the replaced session leaves the new one"
        );
        drop(receiver);
        let point = GroupEpoch::new("uid", 1, Stage::Freeze).unwrap();
        assert_eq!(
            sessions.send_directive(&["east".to_owned()], &point, "g"),
            0
        );
        assert_eq!(sessions.count("east"), 0);
    }

    fn heartbeat() -> ControlMessage {
        ControlMessage {
            kind: Some(Kind::Heartbeat(pb::Heartbeat { sent_unix_ms: 1 })),
        }
    }

    #[tokio::test]
    async fn a_cluster_has_at_most_its_limit_of_sessions_and_a_reconnecting_node_is_not_refused() {
        let sessions = Sessions::with_limit(2);
        let _a = sessions.open_ok(key("east", "a"), Vec::new());
        let _b = sessions.open_ok(key("east", "b"), Vec::new());
        let refused = sessions.open(key("east", "c"), Vec::new());
        assert!(refused.is_err(), "a third node of east is refused");
        assert_eq!(sessions.count("east"), 2);
        let _again = sessions.open_ok(key("east", "a"), Vec::new());
        let _west = sessions.open_ok(key("west", "a"), Vec::new());
        assert_eq!((sessions.count("east"), sessions.count("west")), (2, 1));
    }

    #[tokio::test]
    async fn a_replaced_session_takes_no_more_heartbeats_so_its_task_ends() {
        let sessions = Sessions::default();
        let (old, _old_receiver) = sessions.open_ok(key("east", "a"), Vec::new());
        let (new, mut receiver) = sessions.open_ok(key("east", "a"), Vec::new());
        assert!(
            !sessions.send_to_session(&key("east", "a"), old, heartbeat()),
            "the replaced session's heartbeat task is told to end"
        );
        assert!(
            receiver.try_recv().is_err(),
            "nor does its heartbeat reach the new stream"
        );
        assert!(sessions.send_to_session(&key("east", "a"), new, heartbeat()));
        assert!(receiver.try_recv().is_ok());
    }
}
