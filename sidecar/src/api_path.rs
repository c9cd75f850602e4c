//! Path 1: the Kubernetes API server of this node's cluster.
//!
//! - [`watch_groups`]: the (mirrored) ConsistencyGroups in this cluster and this node's
//!   ConsistencyGroupShards. A group's status gives its current (epoch, stage) — a missing stage is the
//!   baseline "Replicating at that epoch" — and the node's shards its member volumes here.
//! - [`write_status`]: this node's `ReplicationNode` (server-side apply, field manager
//!   `lockstep-sidecar`): volumes, outstanding failures (path 1 of the report) and what was enforced
//!   (path 1 of the acknowledgement). Written when something changes, retried with backoff on failure.
//! - [`renew_lease`]: liveness, a `coordination.k8s.io` Lease per node in Lockstep's namespace, so the
//!   status is not rewritten every few seconds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use lockstep_api::conditions::{self, ConditionUpdate};
use lockstep_api::domain::{ClaimOrder, GroupEpoch, Path, parse_duration};
use lockstep_api::v1alpha1::{
    CLUSTER_LABEL, ClaimRef, ConsistencyGroup, ConsistencyGroupShard, ConsistencyGroupShardSpec,
    CopyFailureReport, Enforcement, MemberVolumeStatus, NODE_LABEL, NodeHoldTimeout, NodeVolume,
    ReplicationNode, ReplicationNodeStatus, label_value, node_label_value,
};
use serde_json::json;

use crate::agent::{Context, Snapshot};
use crate::enforce::{DEFAULT_HOLD_TIMEOUT_MS, Input};
use crate::metrics::Metrics;
use crate::report::Backoff;

/// The field manager of every write this sidecar makes.
pub const FIELD_MANAGER: &str = "lockstep-sidecar";
pub use lockstep_api::v1alpha1::GROUP_UID_LABEL;

/// The group UID of a (possibly mirrored) ConsistencyGroup: the hub's UID, from the mirror's
/// [`GROUP_UID_LABEL`], or the object's own UID in the hub.
pub fn group_uid(group: &ConsistencyGroup) -> Option<String> {
    group
        .group_uid()
        .filter(|uid| !uid.is_empty())
        .map(str::to_owned)
}

/// What one group object says to this node: its point (if it has a status) and this node's volumes.
pub fn read_group(
    group: &ConsistencyGroup,
    cluster: &str,
    node: &str,
) -> Option<(Option<GroupEpoch>, BTreeSet<String>, u64)> {
    let uid = group_uid(group)?;
    let status = group.status.as_ref();
    let point = status.map(|s| {
        let (epoch, stage) = s.position();
        GroupEpoch {
            group_uid: uid.clone(),
            epoch,
            stage,
        }
    });
    let volumes = status
        .map(|s| {
            s.members
                .iter()
                .filter(|m| m.cluster == cluster && m.node.as_deref() == Some(node))
                .filter_map(|m| m.volume_handle.clone())
                .filter(|h| !h.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let hold = parse_duration(&group.spec.hold_timeout)
        .ok()
        .and_then(|d| u64::try_from(d.as_millis()).ok())
        .unwrap_or(DEFAULT_HOLD_TIMEOUT_MS);
    Some((point, volumes, hold))
}

fn feed_group(
    context: &Context,
    group: &ConsistencyGroup,
    shard_volumes: &[MemberVolumeStatus],
) -> Option<String> {
    let Some((point, mut volumes, hold_timeout_ms)) =
        read_group(group, &context.cluster, &context.node)
    else {
        tracing::warn!(group = %group.name_any(), "ConsistencyGroup without a UID refused");
        return None;
    };
    let uid = group_uid(group)?;
    let own = |m: &&MemberVolumeStatus| {
        m.cluster == context.cluster && m.node.as_deref() == Some(&*context.node)
    };
    volumes.extend(
        shard_volumes
            .iter()
            .filter(own)
            .filter_map(|m| m.volume_handle.clone())
            .filter(|h| !h.is_empty()),
    );
    context.remember_claims(
        group
            .status
            .iter()
            .flat_map(|status| status.members.iter())
            .chain(shard_volumes)
            .filter(own)
            .filter_map(|m| {
                let handle = m.volume_handle.clone().filter(|h| !h.is_empty())?;
                Some((
                    handle,
                    ClaimRef {
                        namespace: m.namespace.clone(),
                        name: m.pvc.clone(),
                    },
                ))
            }),
    );
    // Every member in sync at the group's resume: the images kept through its resync may go.
    if let Some(epoch) = group.in_sync_at() {
        context.send(Input::GroupInSync {
            group_uid: uid.clone(),
            epoch,
            volumes: volumes.clone(),
        });
    }
    // The point first, so that volumes joining are brought straight to it.
    if let Some(target) = point {
        context.send(Input::Directive {
            path: Path::Api,
            target,
        });
    }
    context.send(Input::Membership {
        path: Path::Api,
        group_uid: uid.clone(),
        group_name: group.name_any(),
        order: group
            .claim_order()
            .unwrap_or_else(|| ClaimOrder::new(None, uid.clone())),
        volumes,
        hold_timeout_ms,
    });
    Some(uid)
}

/// What path 1 shows this node: the groups of its cluster and its own shards of them. A group's
/// membership is fed only once both have been listed, so that a restarted sidecar never sees a group
/// without its volumes for a moment (that would read as the volumes leaving it).
#[derive(Default)]
struct ApiView {
    groups: BTreeMap<String, ConsistencyGroup>,
    relisting_groups: BTreeMap<String, ConsistencyGroup>,
    groups_listed: bool,
    shards: BTreeMap<String, ConsistencyGroupShardSpec>,
    relisting_shards: BTreeMap<String, ConsistencyGroupShardSpec>,
    shards_listed: bool,
}

impl ApiView {
    fn ready(&self) -> bool {
        self.groups_listed && self.shards_listed
    }

    /// This node's member volumes of a group, from its shards.
    fn volumes_of(&self, uid: &str) -> Vec<MemberVolumeStatus> {
        self.shards
            .values()
            .filter(|shard| shard.group_uid == uid)
            .flat_map(|shard| shard.volumes.iter().cloned())
            .collect()
    }

    fn feed(&self, context: &Context, uid: &str) {
        if let Some(group) = self.groups.get(uid).filter(|_| self.ready()) {
            feed_group(context, group, &self.volumes_of(uid));
        }
    }

    fn feed_all(&self, context: &Context) {
        for uid in self.groups.keys() {
            self.feed(context, uid);
        }
    }
}

/// Watches the ConsistencyGroups of this cluster, and this node's ConsistencyGroupShards, until stopped.
pub async fn watch_groups(client: Client, context: Arc<Context>) {
    let groups = watcher(
        Api::<ConsistencyGroup>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff();
    let selector = format!(
        "{CLUSTER_LABEL}={},{NODE_LABEL}={}",
        label_value(&context.cluster),
        node_label_value(Some(&context.node)),
    );
    let shards = watcher(
        Api::<ConsistencyGroupShard>::all(client),
        watcher::Config::default().labels(&selector),
    )
    .default_backoff();
    futures::pin_mut!(groups);
    futures::pin_mut!(shards);
    let mut view = ApiView::default();
    loop {
        tokio::select! {
            _ = context.stop.cancelled() => return,
            event = groups.next() => {
                let Some(event) = event else { return };
                on_group_event(&context, &mut view, event);
            }
            event = shards.next() => {
                let Some(event) = event else { return };
                on_shard_event(&context, &mut view, event);
            }
        }
    }
}

fn on_group_event(
    context: &Context,
    view: &mut ApiView,
    event: Result<watcher::Event<ConsistencyGroup>, watcher::Error>,
) {
    match event {
        Ok(watcher::Event::Apply(group)) => {
            context.metrics.set_path_up("api", true);
            let Some(uid) = group_uid(&group) else {
                tracing::warn!(group = %group.name_any(), "ConsistencyGroup without a UID refused");
                return;
            };
            view.groups.insert(uid.clone(), group);
            view.feed(context, &uid);
        }
        Ok(watcher::Event::Delete(group)) => {
            if let Some(uid) = group_uid(&group) {
                view.groups.remove(&uid);
                context.send(Input::GroupGone {
                    path: Path::Api,
                    group_uid: uid,
                });
            }
        }
        Ok(watcher::Event::Init) => view.relisting_groups.clear(),
        Ok(watcher::Event::InitApply(group)) => {
            if let Some(uid) = group_uid(&group) {
                view.relisting_groups.insert(uid, group);
            }
        }
        Ok(watcher::Event::InitDone) => {
            context.metrics.set_path_up("api", true);
            let listed = std::mem::take(&mut view.relisting_groups);
            for gone in view.groups.keys().filter(|uid| !listed.contains_key(*uid)) {
                context.send(Input::GroupGone {
                    path: Path::Api,
                    group_uid: gone.clone(),
                });
            }
            view.groups = listed;
            let was_ready = view.ready();
            view.groups_listed = true;
            view.feed_all(context);
            if view.ready() {
                context.send(Input::Synced(Path::Api));
            }
            if !was_ready {
                tracing::info!(groups = view.groups.len(), "ConsistencyGroups listed");
            }
        }
        Err(error) => {
            context.metrics.set_path_up("api", false);
            tracing::warn!(%error, "ConsistencyGroup watch failed; retrying");
        }
    }
}

fn on_shard_event(
    context: &Context,
    view: &mut ApiView,
    event: Result<watcher::Event<ConsistencyGroupShard>, watcher::Error>,
) {
    match event {
        Ok(watcher::Event::Apply(shard)) => {
            let uid = shard.spec.group_uid.clone();
            view.shards.insert(shard.name_any(), shard.spec);
            view.feed(context, &uid);
        }
        Ok(watcher::Event::Delete(shard)) => {
            view.shards.remove(&shard.name_any());
            view.feed(context, &shard.spec.group_uid);
        }
        Ok(watcher::Event::Init) => view.relisting_shards.clear(),
        Ok(watcher::Event::InitApply(shard)) => {
            view.relisting_shards.insert(shard.name_any(), shard.spec);
        }
        Ok(watcher::Event::InitDone) => {
            view.shards = std::mem::take(&mut view.relisting_shards);
            view.shards_listed = true;
            view.feed_all(context);
            if view.ready() {
                context.send(Input::Synced(Path::Api));
            }
            tracing::info!(
                shards = view.shards.len(),
                "this node's ConsistencyGroupShards listed"
            );
        }
        Err(error) => {
            tracing::warn!(%error, "ConsistencyGroupShard watch failed; retrying");
        }
    }
}

fn time(ms: i64) -> Time {
    Time(Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// The `ReplicationNode` status for a snapshot, with the claims the paths named for its volumes.
pub fn node_status(
    snapshot: &Snapshot,
    claims: &std::collections::BTreeMap<String, ClaimRef>,
) -> ReplicationNodeStatus {
    let volumes: Vec<NodeVolume> = snapshot
        .volumes
        .iter()
        .map(|v| NodeVolume {
            volume_handle: v.volume.clone(),
            pvc: claims.get(&v.volume).cloned(),
            group_uid: v.group_uid.clone(),
            state: snapshot.volume_state(v),
            epoch: v.level.map_or(0, |l| l.epoch),
            stage: v.level.map(|l| l.stage()),
            hold_timeout: snapshot
                .hold_timeouts
                .iter()
                .find(|h| h.volume == v.volume && v.group_uid.as_ref() == Some(&h.group_uid))
                .map(|h| NodeHoldTimeout {
                    epoch: h.epoch,
                    failed_writes: h.failed_writes,
                    since: time(h.since_unix_ms),
                }),
        })
        .collect();
    let failures: Vec<CopyFailureReport> = snapshot
        .failures
        .iter()
        .map(|f| CopyFailureReport {
            volume_handle: f.volume.clone(),
            group_uid: f.group_uid.clone(),
            epoch_seen: f.epoch_seen,
            sequence: f.sequence,
            error: lockstep_api::domain::bounded_message(&f.error),
            since: time(f.since_unix_ms),
        })
        .collect();
    let enforced: Vec<Enforcement> = snapshot
        .acks
        .values()
        .map(|p| Enforcement {
            group_uid: p.ack.point.group_uid.clone(),
            epoch: p.ack.point.epoch,
            stage: p.ack.point.stage,
            volume_handles: p.ack.volumes.clone(),
            fail_safe: p.ack.fail_safe,
            at: Some(time(p.at_unix_ms)),
        })
        .collect();
    ReplicationNodeStatus {
        volume_count: u32::try_from(volumes.len()).unwrap_or(u32::MAX),
        volumes,
        failure_count: u32::try_from(failures.len()).unwrap_or(u32::MAX),
        failures,
        enforced,
        conditions: Vec::new(),
    }
}

/// Sets the node's conditions: Ready (the replicator's volumes are known and no fail-safe suspension is
/// in force) and HoldTimedOut (held writes failed at a hold timeout), keeping the transition times of
/// `previous`. Each names `generation`, the ReplicationNode's `metadata.generation` they were written
/// for, as kstatus and Argo CD read Ready.
pub fn set_node_conditions(
    status: &mut ReplicationNodeStatus,
    snapshot: &Snapshot,
    previous: &[Condition],
    generation: Option<i64>,
    now: &Time,
) {
    let mut list = previous.to_vec();
    let fail_safes: Vec<String> = snapshot
        .groups
        .iter()
        .filter_map(|g| {
            g.fail_safe
                .map(|epoch| format!("{} at epoch {epoch}", g.name))
        })
        .collect();
    let ready = ConditionUpdate {
        type_: lockstep_api::domain::condition::READY,
        status: snapshot.inventory_known && fail_safes.is_empty(),
        reason: if !snapshot.inventory_known {
            "ReplicatorUnknown"
        } else if !fail_safes.is_empty() {
            "FailSafe"
        } else {
            "Serving"
        },
        message: if !snapshot.inventory_known {
            "the replicator's volumes are not known yet".to_owned()
        } else if !fail_safes.is_empty() {
            format!(
                "suspended by its own fail-safe (a failed write reached neither path): {}; only a directive at a higher epoch lifts it",
                fail_safes.join(", ")
            )
        } else {
            format!("{} volumes served", snapshot.volumes.len())
        },
    };
    conditions::set(&mut list, ready, generation, now);
    let failed: u64 = snapshot
        .hold_timeouts
        .iter()
        .fold(0, |total, h| total.saturating_add(h.failed_writes));
    let held = ConditionUpdate {
        type_: "HoldTimedOut",
        status: !snapshot.hold_timeouts.is_empty(),
        reason: if snapshot.hold_timeouts.is_empty() {
            "NoHeldWriteFailed"
        } else {
            "HeldWritesFailed"
        },
        message: if snapshot.hold_timeouts.is_empty() {
            "no held write failed at a hold timeout".to_owned()
        } else {
            let volumes: Vec<String> = snapshot
                .hold_timeouts
                .iter()
                .map(|h| format!("{} ({} at epoch {})", h.volume, h.failed_writes, h.epoch))
                .collect();
            format!(
                "{failed} held writes failed with an I/O error at the hold timeout: {}; writes keep failing until the group is released or resumes",
                volumes.join(", ")
            )
        },
    };
    conditions::set(&mut list, held, generation, now);
    status.conditions = list;
}

/// Keeps this node's `ReplicationNode` status current: on every change, retried with backoff.
pub async fn write_status(client: Client, context: Arc<Context>) {
    let api: Api<ReplicationNode> = Api::all(client);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let name = context.node.clone();
    let mut snapshots = context.snapshot.clone();
    let mut backoff = Backoff::default();
    let mut created = false;
    let mut written: Option<ReplicationNodeStatus> = None;
    // The object's generation, from the API server's answers to our writes.
    let mut generation: Option<i64> = None;
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        let mut status = node_status(&snapshot, &context.claims());
        let previous = written
            .as_ref()
            .map(|w| w.conditions.clone())
            .unwrap_or_default();
        set_node_conditions(
            &mut status,
            &snapshot,
            &previous,
            generation,
            &Time(Timestamp::now()),
        );
        let mut ok = true;
        if !created {
            let object = json!({
                "apiVersion": "lockstep.dev/v1alpha1",
                "kind": "ReplicationNode",
                "metadata": {"name": name},
                "spec": {"nodeName": context.node, "cluster": context.cluster},
            });
            match api.patch(&name, &params, &Patch::Apply(&object)).await {
                Ok(node) => {
                    created = true;
                    if node.metadata.generation != generation {
                        // Conditions name the generation: compute them again for this one.
                        generation = node.metadata.generation;
                        continue;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot apply the ReplicationNode");
                    ok = false;
                }
            }
        }
        if ok && written.as_ref() != Some(&status) {
            let object = json!({
                "apiVersion": "lockstep.dev/v1alpha1",
                "kind": "ReplicationNode",
                "metadata": {"name": name},
                "status": status,
            });
            match api
                .patch_status(&name, &params, &Patch::Apply(&object))
                .await
            {
                Ok(node) => {
                    Metrics::count(&context.metrics.reports, "api", "ok");
                    context.metrics.set_path_up("api", true);
                    context.reports.delivered(&snapshot.failures, Path::Api);
                    if !snapshot.failures.is_empty() {
                        tracing::info!(
                            failures = snapshot.failures.len(),
                            "reported through the API server"
                        );
                    }
                    written = Some(status);
                    if node.metadata.generation != generation {
                        // The spec changed under us: say which generation the conditions saw.
                        generation = node.metadata.generation;
                        continue;
                    }
                }
                Err(error) => {
                    Metrics::count(&context.metrics.reports, "api", "error");
                    context.metrics.set_path_up("api", false);
                    tracing::debug!(%error, "ReplicationNode status write failed; will retry");
                    if matches!(&error, kube::Error::Api(s) if s.code == 404) {
                        created = false;
                    }
                    ok = false;
                }
            }
        }
        if ok {
            backoff.reset();
            tokio::select! {
                _ = context.stop.cancelled() => return,
                changed = snapshots.changed() => if changed.is_err() { return },
            }
        } else if !context.sleep(backoff.next_delay()).await {
            return;
        }
    }
}

/// Renews this node's Lease in `namespace` every `duration / 3`.
pub async fn renew_lease(
    client: Client,
    context: Arc<Context>,
    namespace: String,
    duration: Duration,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let name = format!("lockstep-sidecar-{}", context.node);
    let seconds = i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let period = (duration / 3).max(Duration::from_millis(100));
    let mut backoff = Backoff::default();
    loop {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(context.node.clone()),
                lease_duration_seconds: Some(seconds),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..LeaseSpec::default()
            }),
        };
        let mut object = serde_json::to_value(&lease).unwrap_or_default();
        if let Some(map) = object.as_object_mut() {
            map.insert("apiVersion".into(), json!("coordination.k8s.io/v1"));
            map.insert("kind".into(), json!("Lease"));
        }
        let delay = match api.patch(&name, &params, &Patch::Apply(&object)).await {
            Ok(_) => {
                backoff.reset();
                period
            }
            Err(error) => {
                tracing::debug!(%error, "Lease renewal failed; will retry");
                backoff.next_delay().min(period)
            }
        };
        if !context.sleep(delay).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::PublishedAck;
    use crate::enforce::{Ack, Failure, HoldTimeout, Level, VolumeView};
    use lockstep_api::domain::{Stage, VolumeState};

    fn group(labels: serde_json::Value, status: serde_json::Value) -> ConsistencyGroup {
        serde_json::from_value(json!({
            "apiVersion": "lockstep.dev/v1alpha1",
            "kind": "ConsistencyGroup",
            "metadata": {"name": "orders", "uid": "mirror-uid", "labels": labels},
            "spec": {"holdTimeout": "1m30s", "members": [{"cluster": "east", "namespace": "shop", "pvcNames": ["a"]}]},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn kept_images_go_only_once_the_operator_found_the_group_in_sync() {
        let at = |status| group(json!({}), status).in_sync_at();
        assert_eq!(
            at(json!({"epoch": 3, "stage": "Resume", "phase": "Replicating"})),
            Some(3)
        );
        // Still resyncing, frozen, running, or never frozen: the kept images stay.
        assert_eq!(
            at(json!({"epoch": 3, "stage": "Resume", "phase": "Resyncing"})),
            None
        );
        assert_eq!(
            at(json!({"epoch": 3, "stage": "Freeze", "phase": "Frozen"})),
            None
        );
        assert_eq!(
            at(json!({"epoch": 3, "stage": "Release", "phase": "Running"})),
            None
        );
        assert_eq!(at(json!({"epoch": 0, "phase": "Replicating"})), None);
    }

    #[test]
    fn a_mirror_names_the_hub_groups_uid_and_this_nodes_volumes() {
        let g = group(
            json!({GROUP_UID_LABEL: "hub-uid", "lockstep.dev/hub": "hub"}),
            json!({"epoch": 4, "members": [
                {"cluster": "east", "namespace": "shop", "pvc": "a", "volumeHandle": "va", "node": "n1"},
                {"cluster": "east", "namespace": "shop", "pvc": "b", "volumeHandle": "vb", "node": "n2"},
                {"cluster": "west", "namespace": "shop", "pvc": "c", "volumeHandle": "vc", "node": "n1"},
                {"cluster": "east", "namespace": "shop", "pvc": "d", "node": "n1"}
            ]}),
        );
        let (point, volumes, hold) = read_group(&g, "east", "n1").unwrap();
        // A missing stage is the baseline: replicating at that epoch.
        assert_eq!(
            point,
            Some(GroupEpoch::new("hub-uid", 4, Stage::Resume).unwrap())
        );
        assert_eq!(volumes, ["va".to_owned()].into());
        assert_eq!(hold, 90_000);
        let own = group(json!({}), json!({"epoch": 2, "stage": "Freeze"}));
        let (point, volumes, _) = read_group(&own, "east", "n1").unwrap();
        assert_eq!(
            point,
            Some(GroupEpoch::new("mirror-uid", 2, Stage::Freeze).unwrap())
        );
        assert!(volumes.is_empty());
    }

    #[test]
    fn the_node_status_lists_volumes_failures_and_enforcements() {
        let snapshot = Snapshot {
            acks: [(
                "g".to_owned(),
                PublishedAck {
                    ack: Ack {
                        point: GroupEpoch::new("g", 3, Stage::Freeze).unwrap(),
                        volumes: vec!["va".into()],
                        fail_safe: true,
                    },
                    at_unix_ms: 1_700_000_000_000,
                },
            )]
            .into(),
            failures: vec![Failure {
                volume: "vb".into(),
                group_uid: "g".into(),
                epoch_seen: 2,
                sequence: 7,
                error: "x".repeat(5000),
                since_unix_ms: 1_700_000_000_000,
            }],
            hold_timeouts: vec![HoldTimeout {
                volume: "va".into(),
                group_uid: "g".into(),
                epoch: 3,
                failed_writes: 12,
                since_unix_ms: 1_700_000_001_000,
            }],
            seen: vec![],
            volumes: vec![
                VolumeView {
                    volume: "va".into(),
                    group_uid: Some("g".into()),
                    level: Some(Level::fail_safe(3)),
                    confirmed: true,
                    resyncing: false,
                },
                VolumeView {
                    volume: "vb".into(),
                    group_uid: Some("g".into()),
                    level: Some(Level::point(2, Stage::Resume)),
                    confirmed: true,
                    resyncing: false,
                },
                VolumeView {
                    volume: "vc".into(),
                    group_uid: None,
                    level: None,
                    confirmed: false,
                    resyncing: false,
                },
            ],
            groups: vec![],
            inventory_known: true,
        };
        let claims = [(
            "vb".to_owned(),
            ClaimRef {
                namespace: "shop".into(),
                name: "pvc-b".into(),
            },
        )]
        .into();
        let status = node_status(&snapshot, &claims);
        assert_eq!(status.volume_count, 3);
        assert_eq!(status.volumes[0].pvc, None);
        assert_eq!(status.volumes[1].pvc.as_ref().unwrap().name, "pvc-b");
        let states: Vec<VolumeState> = status.volumes.iter().map(|v| v.state).collect();
        assert_eq!(
            states,
            [
                VolumeState::Suspended,
                VolumeState::Held,
                VolumeState::Unconfirmed
            ]
        );
        assert_eq!(status.failure_count, 1);
        assert_eq!(status.failures[0].epoch_seen, 2);
        assert_eq!(
            status.failures[0].error.len(),
            1024,
            "bounded as the schema says"
        );
        let held = status.volumes[0].hold_timeout.as_ref().unwrap();
        assert_eq!((held.epoch, held.failed_writes), (3, 12));
        assert!(status.volumes[1].hold_timeout.is_none());
        assert_eq!(status.enforced.len(), 1);
        assert!(status.enforced[0].fail_safe);
        assert_eq!(status.enforced[0].stage, Stage::Freeze);
        // It serialises to what the CRD accepts (camelCase, Time as RFC 3339).
        let json = serde_json::to_value(&status).unwrap();
        assert!(
            json["failures"][0]["since"]
                .as_str()
                .unwrap()
                .starts_with("2023-11-14T")
        );
        assert_eq!(json["enforced"][0]["volumeHandles"], json!(["va"]));
        assert_eq!(json["volumes"][0]["holdTimeout"]["failedWrites"], json!(12));

        // Conditions: ready, and the hold timeout said; the transition time moves only on a change.
        let mut with_conditions = status.clone();
        set_node_conditions(&mut with_conditions, &snapshot, &[], Some(3), &time(1_000));
        let held = with_conditions
            .conditions
            .iter()
            .find(|c| c.type_ == "HoldTimedOut")
            .unwrap();
        assert_eq!(held.status, "True");
        assert!(
            held.message.contains("12 held writes failed"),
            "{}",
            held.message
        );
        assert_eq!(
            conditions::status_of(&with_conditions.conditions, "Ready"),
            Some(true)
        );
        assert!(
            with_conditions
                .conditions
                .iter()
                .all(|c| c.observed_generation == Some(3)),
            "every condition names the generation it was written for"
        );
        let mut later = status.clone();
        let cleared = Snapshot {
            hold_timeouts: Vec::new(),
            ..snapshot.clone()
        };
        set_node_conditions(
            &mut later,
            &cleared,
            &with_conditions.conditions,
            Some(3),
            &time(2_000),
        );
        let ready = later
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(
            ready.last_transition_time,
            time(1_000),
            "unchanged status keeps its time"
        );
        let held = later
            .conditions
            .iter()
            .find(|c| c.type_ == "HoldTimedOut")
            .unwrap();
        assert_eq!(
            (held.status.as_str(), held.last_transition_time.clone()),
            ("False", time(2_000))
        );
    }
}
