//! The gRPC `Control` service (path 2): sidecars report failures, subscribe to directives and acknowledge.
//!
//! Every call is authenticated (see [`crate::authn`]): the node it speaks for is the node its token
//! proves, never merely the node the message names.
//!
//! Malformed messages (no node identity, an unset stage, no group UID...) are refused with InvalidArgument,
//! logged and counted, by the validator both paths share (see [`crate::ingest`]). Every answer says whether it was applied: a report or acknowledgement that could not be
//! decided is answered with an error status (NOT_FOUND for a group this hub does not know, UNAVAILABLE when
//! this replica is not the leader or the decision was not persisted); an acknowledgement whose volumes are
//! not resolved members yet is answered `applied: false` with the reason. The sender sends it again.

use std::{collections::BTreeMap, pin::Pin, time::Duration};

use futures::Stream;
use lockstep_api::{
    domain::{GroupEpoch, Path},
    proto::control::v1::{
        self as pb, AckRequest, AckResponse, ControlMessage, ReportRequest, ReportResponse,
        SubscribeRequest, control_message::Kind, control_server::Control,
    },
    v1alpha1::ConsistencyGroupStatus,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{
    engine::{Engine, EngineError},
    freeze::Event,
    ingest::{self, grpc},
    sessions::{self, NodeKey},
};

mod membership;
mod speaker;

use membership::membership;
pub use membership::push_memberships;

/// How often a subscribed sidecar hears a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// The `Control` service.
#[derive(Debug, Clone)]
pub struct ControlService {
    engine: Engine,
}

impl ControlService {
    /// A service deciding through `engine`.
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }
}

impl ControlService {
    fn leader_only(&self) -> Result<(), Status> {
        if self.engine.is_leader() {
            Ok(())
        } else {
            Err(Status::unavailable(
                "this operator replica is not the leader; retry (the Service routes to the leader)",
            ))
        }
    }
}

/// The error status for a decision that could not be made: the sender sends it again, except for a group
/// this hub does not know (NOT_FOUND: sent again only while the sender still knows the group).
fn not_decided(node: &NodeKey, error: EngineError) -> Status {
    tracing::warn!(cluster = %node.0, node = %node.1, %error, "not applied");
    match error {
        EngineError::UnknownGroup(uid) => unknown_group(&uid),
        EngineError::NotLeader => Status::unavailable(
            "this operator replica is not the leader; retry (the Service routes to the leader)",
        ),
        EngineError::Decide(error) => Status::failed_precondition(error.to_string()),
        error @ (EngineError::Hub(_) | EngineError::Conflicts(_)) => {
            Status::unavailable(format!("not persisted, send it again: {error}"))
        }
        // Dropped: the same message would decide the same refused status again.
        error @ EngineError::StatusRefused { .. } => {
            Status::failed_precondition(format!("dropped: {error}"))
        }
    }
}

/// How many volumes a reason names at most.
const NAMED_IN_REASON: usize = 20;

/// Why an acknowledgement of `point` from `cluster` naming `handles` is not (yet) in `status`: the volumes
/// that are not resolved members of the group in that cluster, and those without the point recorded.
fn unrecorded(
    status: Option<&ConsistencyGroupStatus>,
    cluster: &str,
    point: &GroupEpoch,
    handles: &[String],
) -> Option<String> {
    let members = status
        .map(|status| status.members.as_slice())
        .unwrap_or_default();
    let by_handle: std::collections::HashMap<&str, &lockstep_api::v1alpha1::MemberVolumeStatus> =
        members
            .iter()
            .filter(|member| member.cluster == cluster)
            .filter_map(|member| Some((member.volume_handle.as_deref()?, member)))
            .collect();
    let mut unresolved = Vec::new();
    let mut unrecorded = Vec::new();
    for handle in handles {
        let member = by_handle.get(handle.as_str());
        match member {
            None => unresolved.push(handle.as_str()),
            Some(member)
                if member
                    .acknowledged
                    .as_ref()
                    .is_none_or(|ack| (ack.epoch, ack.stage) < (point.epoch, point.stage)) =>
            {
                unrecorded.push(handle.as_str());
            }
            Some(_) => {}
        }
    }
    let name = |volumes: &[&str]| {
        let mut named = volumes
            .iter()
            .take(NAMED_IN_REASON)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        if volumes.len() > NAMED_IN_REASON {
            named.push_str(&format!(" and {} more", volumes.len() - NAMED_IN_REASON));
        }
        named
    };
    let mut reasons = Vec::new();
    if !unresolved.is_empty() {
        reasons.push(format!(
            "not (yet) resolved members of the group in cluster {cluster}: {}",
            name(&unresolved)
        ));
    }
    if !unrecorded.is_empty() {
        reasons.push(format!("{point} not recorded for {}", name(&unrecorded)));
    }
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

/// NOT_FOUND for a group this hub does not know (sent again only while the sender still knows it).
fn unknown_group(uid: &str) -> Status {
    Status::not_found(format!("no ConsistencyGroup with UID {uid:?} on this hub"))
}

fn refuse(what: &str, node: &NodeKey, reason: impl std::fmt::Display) -> Status {
    tracing::warn!(cluster = %node.0, node = %node.1, %reason, "refused a malformed {what}");
    Status::invalid_argument(format!("malformed {what}: {reason}"))
}

type ControlStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

/// `status` with its message cut to [`lockstep_api::domain::MESSAGE_LIMIT`] bytes: a message may echo
/// what the caller sent (a group UID of 60 KiB), and gRPC carries it in a header that a client refuses
/// past its limit — resetting the stream with a protocol error instead of the refusal.
fn bounded_status(status: Status) -> Status {
    if status.message().len() <= lockstep_api::domain::MESSAGE_LIMIT {
        return status;
    }
    Status::new(
        status.code(),
        lockstep_api::domain::bounded_message(status.message()),
    )
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn report(
        &self,
        request: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        self.take_report(request).await.map_err(bounded_status)
    }

    type SubscribeStream = ControlStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.open_subscription(request)
            .await
            .map_err(bounded_status)
    }

    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        self.take_ack(request).await.map_err(bounded_status)
    }
}

impl ControlService {
    async fn take_report(
        &self,
        request: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        let speaker = self.authenticate(&request, "report", request.get_ref().node.as_ref())?;
        self.leader_only()?;
        let request = request.into_inner();
        let mut named: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for failure in &request.failures {
            named
                .entry(&failure.group_uid)
                .or_default()
                .push(&failure.volume_handle);
        }
        for held in &request.hold_timeouts {
            named
                .entry(&held.group_uid)
                .or_default()
                .push(&held.volume_handle);
        }
        for state in &request.states {
            named
                .entry(&state.group_uid)
                .or_default()
                .push(&state.volume_handle);
        }
        for (uid, handles) in named {
            self.own_volumes_only(&speaker, "report", uid, handles)
                .await?;
        }
        let node = speaker.node;
        // Every entry is checked, by the validator both paths share, before anything is recorded or
        // decided (a refused report changes nothing); then each group's entries are decided as one batch
        // (one read, at most one status write), not one decision per failure.
        let report = ingest::check(grpc::report(&node, &request)).map_err(|refusal| {
            grpc::refused(&refusal, "report", self.engine.metrics(), &node.0, &node.1)
        })?;
        let mut reasons = Vec::new();
        if !request.volumes.is_empty()
            && !self
                .engine
                .sessions()
                .record_volumes(&node, grpc::reported_volumes(&node, &request.volumes))
        {
            reasons.push(
                "resolved volumes not recorded: the node holds no Subscribe stream (its next subscription carries them)"
                    .to_owned(),
            );
        }
        if !report.states.is_empty() {
            // Without an open stream they are dropped: the sidecar sends them again on subscribing.
            self.engine.sessions().record_states(&node, report.states);
        }
        let delivered = ingest::deliver(&self.engine, Path::Grpc, report.events).await;
        let groups = delivered
            .decided
            .iter()
            .filter_map(|uid| self.engine.current(uid))
            .map(|current| pb::GroupEpoch::from(&current))
            .collect();
        if let Some(uid) = delivered.unknown_group {
            // The entries of known groups were decided (a freeze is never held back); the sender is
            // told about the group this hub does not know.
            return Err(unknown_group(&uid));
        }
        if let Some(error) = delivered.not_decided {
            return Err(not_decided(&node, error));
        }
        Ok(Response::new(ReportResponse {
            groups,
            applied: reasons.is_empty(),
            reason: reasons.join("; "),
        }))
    }

    async fn open_subscription(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<ControlStream>, Status> {
        let speaker =
            self.authenticate(&request, "subscription", request.get_ref().node.as_ref())?;
        let node = speaker.node.clone();
        self.leader_only()?;
        let request = request.into_inner();
        let mut seen = Vec::new();
        for point in &request.seen {
            seen.push(
                GroupEpoch::try_from(point)
                    .map_err(|error| refuse("subscription", &node, error))?,
            );
        }
        let (id, receiver) = self
            .engine
            .sessions()
            .open(
                node.clone(),
                grpc::reported_volumes(&node, &request.volumes),
            )
            .map_err(|refused| {
                tracing::warn!(cluster = %node.0, node = %node.1, %refused, "subscription refused");
                Status::resource_exhausted(refused.to_string())
            })?;
        tracing::info!(cluster = %node.0, node = %node.1, "sidecar subscribed");
        match membership(&self.engine, &node.0) {
            Some(membership) => {
                self.engine
                    .sessions()
                    .push_membership(&node.0, membership, Some(&node));
            }
            // Not complete yet: sent to this node with the others once it is.
            None => self.engine.sessions().forget_membership(&node.0),
        }
        for (point, name) in self.engine.current_directives_for(&node.0) {
            self.engine
                .sessions()
                .send_to_node(&node, sessions::directive(&point, &name));
        }
        // Rule 8: a node that saw a higher epoch than this hub persisted makes the hub adopt it — a
        // node proven by its token only for groups with members in its cluster.
        for point in seen {
            if speaker.verified
                && self
                    .engine
                    .group_by_uid(&point.group_uid)
                    .is_none_or(|group| {
                        !group
                            .spec
                            .members
                            .iter()
                            .any(|member| member.cluster == node.0)
                    })
            {
                tracing::info!(cluster = %node.0, node = %node.1, group_uid = %point.group_uid, "a subscription's seen point for a group with no member in its cluster ignored");
                continue;
            }
            self.engine
                .handle_quietly(&point.group_uid, Event::Seen { epoch: point.epoch })
                .await;
        }
        let sessions = self.engine.sessions().clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(HEARTBEAT);
            loop {
                ticker.tick().await;
                let sent_unix_ms = k8s_openapi::jiff::Timestamp::now().as_millisecond();
                let heartbeat = ControlMessage {
                    kind: Some(Kind::Heartbeat(pb::Heartbeat { sent_unix_ms })),
                };
                if !sessions.send_to_session(&node, id, heartbeat) {
                    sessions.close(&node, id);
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn take_ack(
        &self,
        request: Request<AckRequest>,
    ) -> Result<Response<AckResponse>, Status> {
        let speaker =
            self.authenticate(&request, "acknowledgement", request.get_ref().node.as_ref())?;
        let node = speaker.node.clone();
        self.leader_only()?;
        let request = request.into_inner();
        let report = ingest::check(grpc::ack(&node, &request)).map_err(|refusal| {
            grpc::refused(
                &refusal,
                "acknowledgement",
                self.engine.metrics(),
                &node.0,
                &node.1,
            )
        })?;
        let point = report
            .events
            .iter()
            .find_map(|(uid, events)| {
                events.iter().find_map(|event| match event {
                    Event::Ack(ack) => Some(GroupEpoch {
                        group_uid: uid.clone(),
                        epoch: ack.epoch,
                        stage: ack.stage,
                    }),
                    _ => None,
                })
            })
            .ok_or_else(|| refuse("acknowledgement", &node, "no point named"))?;
        self.own_volumes_only(
            &speaker,
            "acknowledgement",
            &point.group_uid,
            request.volume_handles.iter().map(String::as_str),
        )
        .await?;
        let delivered = ingest::deliver(&self.engine, Path::Grpc, report.events).await;
        if let Some(uid) = delivered.unknown_group {
            return Err(unknown_group(&uid));
        }
        if let Some(error) = delivered.not_decided {
            return Err(not_decided(&node, error));
        }
        // Applied only if the acknowledgement is in the group's status now: volumes the operator has not
        // resolved yet (a gRPC-only node's, before its sidecar reported them) are sent again.
        let status = self.engine.decided_status(&point.group_uid).await;
        let reason = unrecorded(status.as_deref(), &node.0, &point, &request.volume_handles);
        if let Some(reason) = &reason {
            tracing::info!(cluster = %node.0, node = %node.1, %point, %reason, "acknowledgement not applied");
        }
        let current = self
            .engine
            .current(&point.group_uid)
            .map(|current| pb::GroupEpoch::from(&current));
        Ok(Response::new(AckResponse {
            current,
            applied: reason.is_none(),
            reason: reason.unwrap_or_default(),
        }))
    }
}
