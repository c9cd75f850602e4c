//! Path 2 in: a gRPC `Report` or `Ack` put in the form both paths share, and a refusal of the one
//! validator turned into the INVALID_ARGUMENT a sidecar understands.

use lockstep_api::{
    domain::{Path, Stage},
    proto::control::v1::{self as pb, AckRequest, ReportRequest},
};
use tonic::Status;

use super::{Refusal, Sent, SentAck, SentFailure, SentHoldTimeout, SentState};
use crate::{members::ReportedVolume, metrics::Metrics, sessions::NodeKey};

/// The node a message speaks for, as it names it; a missing, empty or overlong name is refused (logged
/// and counted as the validator refuses it).
pub fn node_key(
    node: Option<&pb::NodeIdentity>,
    what: &str,
    metrics: &Metrics,
) -> Result<NodeKey, Status> {
    let (cluster, name) = node.map_or(("", ""), |node| (node.cluster.as_str(), node.node.as_str()));
    super::check_node(cluster, name)
        .map_err(|refusal| refused(&refusal, what, metrics, cluster, name))
}

/// Logs and counts `refusal` of a gRPC `what` (report, acknowledgement, subscription) from `node` of
/// `cluster`; the status answering it.
pub fn refused(
    refusal: &Refusal,
    what: &str,
    metrics: &Metrics,
    cluster: &str,
    node: &str,
) -> Status {
    refusal.record(metrics, Path::Grpc, cluster, node);
    Status::invalid_argument(format!("malformed {what}: {refusal}"))
}

/// A wire stage, `None` when unset or unknown.
fn stage(stage: i32) -> Option<Stage> {
    pb::Stage::try_from(stage)
        .ok()
        .and_then(|stage| Stage::try_from(stage).ok())
}

/// What a `Report` from `node` says, in the form both paths share.
pub fn report(node: &NodeKey, request: &ReportRequest) -> Sent {
    let mut sent = Sent::from_node(Path::Grpc, &node.0, &node.1);
    sent.failures = request
        .failures
        .iter()
        .map(|failure| SentFailure {
            group_uid: failure.group_uid.clone(),
            volume_handle: failure.volume_handle.clone(),
            epoch_seen: failure.epoch_seen,
            error: failure.error.clone(),
        })
        .collect();
    sent.hold_timeouts = request
        .hold_timeouts
        .iter()
        .map(|held| SentHoldTimeout {
            group_uid: held.group_uid.clone(),
            volume_handle: held.volume_handle.clone(),
            epoch: held.epoch,
            failed_writes: held.failed_writes,
            since: k8s_openapi::jiff::Timestamp::from_millisecond(held.since_unix_ms)
                .ok()
                .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time),
        })
        .collect();
    sent.states = request
        .states
        .iter()
        .map(|reported| SentState {
            volume_handle: reported.volume_handle.clone(),
            state: pb::ReplicationState::try_from(reported.state)
                .ok()
                .and_then(pb::ReplicationState::to_domain),
            epoch: reported.epoch,
            stage: stage(reported.stage),
        })
        .collect();
    sent
}

/// What an `Ack` from `node` says, in the form both paths share: one acknowledgement (of no group when it
/// names no point).
pub fn ack(node: &NodeKey, request: &AckRequest) -> Sent {
    let mut sent = Sent::from_node(Path::Grpc, &node.0, &node.1);
    let point = request.enforced.clone().unwrap_or_default();
    sent.acks = vec![SentAck {
        group_uid: point.group_uid,
        epoch: point.epoch,
        stage: stage(point.stage),
        volume_handles: request.volume_handles.clone(),
        fail_safe: request.fail_safe,
    }];
    sent
}

/// The resolved volumes a sidecar of `node` lists (those with a volume handle and a claim), as the cluster
/// view takes them.
pub fn reported_volumes(node: &NodeKey, volumes: &[pb::ResolvedVolume]) -> Vec<ReportedVolume> {
    volumes
        .iter()
        .filter(|volume| !volume.volume_handle.is_empty() && !volume.pvc.is_empty())
        .map(|volume| ReportedVolume {
            namespace: volume.namespace.clone(),
            pvc: volume.pvc.clone(),
            persistent_volume: volume.persistent_volume.clone(),
            volume_handle: volume.volume_handle.clone(),
            node: node.1.clone(),
        })
        .collect()
}
