//! Path 1 in: the reports and acknowledgements a member cluster's ReplicationNode carries, checked by the
//! one validator, held to the node that wrote them and handed to each group as one batch.
//!
//! The volumes' replication states in the same status are not ingested here: the member cluster's view
//! reads them from the ReplicationNodes (see [`crate::clusters`]).

use std::collections::{BTreeMap, BTreeSet};

use kube::api::DynamicObject;
use lockstep_api::{domain::Path, v1alpha1::ReplicationNode};

use super::{Refusal, Sent, SentAck, SentFailure, SentHoldTimeout};
use crate::{engine::Engine, freeze::Event, member_cache::DecodedNode};

/// What `node`, of member cluster `cluster`, says in its status, in the form both paths share; `None`
/// while it has no status.
pub fn sent(cluster: &str, node: &ReplicationNode) -> Option<Sent> {
    let status = node.status.as_ref()?;
    let mut sent = Sent::from_node(Path::Api, cluster, &node.spec.node_name);
    sent.failures = status
        .failures
        .iter()
        .map(|failure| SentFailure {
            group_uid: failure.group_uid.clone(),
            volume_handle: failure.volume_handle.clone(),
            epoch_seen: failure.epoch_seen,
            error: failure.error.clone(),
        })
        .collect();
    sent.hold_timeouts = status
        .volumes
        .iter()
        .filter_map(|volume| {
            let (group_uid, held) = (volume.group_uid.as_ref()?, volume.hold_timeout.as_ref()?);
            Some(SentHoldTimeout {
                group_uid: group_uid.clone(),
                volume_handle: volume.volume_handle.clone(),
                epoch: held.epoch,
                failed_writes: held.failed_writes,
                since: Some(held.since.clone()),
            })
        })
        .collect();
    sent.acks = status
        .enforced
        .iter()
        .map(|enforced| SentAck {
            group_uid: enforced.group_uid.clone(),
            epoch: enforced.epoch,
            stage: Some(enforced.stage),
            volume_handles: enforced.volume_handles.clone(),
            fail_safe: enforced.fail_safe,
        })
        .collect();
    Some(sent)
}

/// Takes in a ReplicationNode as watched (untyped, see [`crate::clusters::replication_nodes`]): one that
/// does not decode is refused alone (logged, counted as `undecodable`), the others are taken in.
pub async fn from_object(engine: &Engine, cluster: &str, object: DynamicObject) {
    from_decoded(engine, cluster, DecodedNode::of(object)).await;
}

/// [`from_object`] for a ReplicationNode already decoded (by the watch that also caches it).
pub async fn from_decoded(engine: &Engine, cluster: &str, decoded: DecodedNode) {
    match decoded.node {
        Ok(node) => from_replication_node(engine, cluster, &node).await,
        Err(error) => {
            Refusal::Undecodable(error).record(engine.metrics(), Path::Api, cluster, &decoded.name)
        }
    }
}

/// Takes in what a member cluster's ReplicationNode says (path 1): refused whole when malformed (logged and
/// counted), else each group's events decided as one batch.
pub async fn from_replication_node(engine: &Engine, cluster: &str, node: &ReplicationNode) {
    let Some(sent) = sent(cluster, node) else {
        return;
    };
    let Ok(report) = super::check_and_record(sent, engine.metrics()) else {
        return;
    };
    let events = own_volumes_only(engine, cluster, &node.spec.node_name, report.events).await;
    // Failures are logged where they happen; a ReplicationNode has nobody to answer.
    super::deliver(engine, Path::Api, events).await;
}

/// A node speaks only for its own volumes, on this path too: volumes a group resolves in this cluster to
/// another node (or to no single node) are dropped from its reports and acknowledgements, and said so.
/// (Which ReplicationNode a sidecar may write is the chart's admission policy.)
async fn own_volumes_only(
    engine: &Engine,
    cluster: &str,
    node_name: &str,
    mut events: BTreeMap<String, Vec<Event>>,
) -> BTreeMap<String, Vec<Event>> {
    let mut foreign: BTreeSet<String> = BTreeSet::new();
    for (uid, events) in &mut events {
        if !events
            .iter()
            .any(|event| matches!(event, Event::Report(_) | Event::Ack(_)))
        {
            continue;
        }
        let members = engine.member_volumes_of(uid);
        // This cluster's member volumes resolved to another node (or to none), by handle: looked up
        // once per handle rather than searched (a node acknowledges hundreds of volumes of a group of
        // thousands).
        let elsewhere_handles: std::collections::HashSet<&str> = members
            .iter()
            .filter(|member| member.cluster == cluster && member.node.as_deref() != Some(node_name))
            .filter_map(|member| member.volume_handle.as_deref())
            .collect();
        let mut on_this_node = |handle: &str| {
            let elsewhere = elsewhere_handles.contains(handle);
            if elsewhere {
                foreign.insert(handle.to_owned());
            }
            !elsewhere
        };
        events.retain_mut(|event| match event {
            Event::Report(report) => on_this_node(&report.volume_handle),
            Event::Ack(ack) => {
                ack.volume_handles.retain(|handle| on_this_node(handle));
                true
            }
            Event::HoldTimedOut(_) | Event::Seen { .. } | Event::Evaluate => true,
        });
    }
    events.retain(|_, events| !events.is_empty());
    if !foreign.is_empty() {
        let named: Vec<&str> = foreign.iter().take(20).map(String::as_str).collect();
        engine.authenticator().refused(
            None,
            &format!("{cluster}/{node_name} (ReplicationNode)"),
            "not_own_volume",
            &format!(
                "ReplicationNode {node_name} of cluster {cluster} names volumes on other nodes, ignored: {}",
                named.join(", ")
            ),
        );
    }
    events
}
