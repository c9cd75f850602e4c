//! Fuzz targets for everything a sidecar (or anyone who reaches the port) can send the operator's
//! `Control` service: arbitrary bytes to each request's decoder, in-process and as the body of a real
//! gRPC call; structurally valid but hostile `Report`, `Ack` and `Subscribe` sequences through the real
//! service on 127.0.0.1 (decode → validation → decision core → the hub), checked against a group the
//! fixture's sidecars make freeze and release; and hostile events straight into the decision core.
//!
//! What must hold: no panic (the service keeps answering); every refusal is a clean status a sidecar
//! understands; the group's epoch never goes backwards nor past the largest epoch; a release is never
//! decided before every resolved member acknowledged the freeze at the current epoch; a refused message
//! changes nothing. Cases: `LOCKSTEP_FUZZ_CASES` (`scripts/fuzz.sh` runs them long).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{sync::Arc, time::Duration};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::{Api, api::PostParams};
use lockstep_api::{
    domain::{ClusterPaths, MAX_EPOCH, Path, Policy, Stage},
    proto::control::v1::{
        self as pb, AckRequest, NodeIdentity, ReportRequest, SubscribeRequest,
        control_client::ControlClient,
    },
    v1alpha1::{
        ConsistencyGroup, ConsistencyGroupSpec, ConsistencyGroupStatus, GroupMember, MemberCluster,
        MemberClusterSpec, MemberVolumeStatus,
    },
};
use lockstep_operator::{Operator, Options, freeze};
use proptest::prelude::*;
use prost::Message;
use tonic::{Code, Status, transport::Channel};

use common::{cluster, eventually};
use lockstep_api::fuzz::{RawCodec, config as fuzz_config, wire_enum};

// ---------------------------------------------------------------------------------------------------
// Hostile values
// ---------------------------------------------------------------------------------------------------

/// Strings a hostile peer sends: empty, control characters, look-alikes of the fixture's names, arbitrary
/// text, and values around the service's 64 KiB message limit.
fn hostile_string() -> impl Strategy<Value = String> + Clone {
    lockstep_api::fuzz::hostile_string(
        &[
            "еdge",         // Cyrillic е
            "edge\u{200b}", // zero-width space
            "ｅｄｇｅ-1",   // full-width
            "vol-edge-wal\u{0}",
            "../../etc/passwd",
        ],
        40 * 1024..=160 * 1024,
    )
}

/// Epochs: the group's current and next one (resolved at call time), the edges of the range and beyond.
#[derive(Debug, Clone, Copy)]
enum Epoch {
    Current,
    Next,
    Literal(u64),
}

fn epoch() -> impl Strategy<Value = Epoch> {
    prop_oneof![
        6 => Just(Epoch::Current),
        3 => Just(Epoch::Next),
        1 => Just(Epoch::Literal(0)),
        1 => Just(Epoch::Literal(MAX_EPOCH)),
        1 => Just(Epoch::Literal(MAX_EPOCH + 1)),
        1 => Just(Epoch::Literal(u64::MAX)),
        1 => any::<u64>().prop_map(Epoch::Literal),
    ]
}

#[derive(Debug, Clone)]
enum Uid {
    Group,
    Other(String),
}

fn uid() -> impl Strategy<Value = Uid> {
    prop_oneof![5 => Just(Uid::Group), 1 => hostile_string().prop_map(Uid::Other)]
}

#[derive(Debug, Clone)]
enum Node {
    Edge(&'static str),
    Other(String, String),
}

fn node() -> impl Strategy<Value = Option<Node>> {
    prop_oneof![
        8 => prop_oneof![Just("edge-1"), Just("edge-2")].prop_map(|n| Some(Node::Edge(n))),
        2 => (hostile_string(), hostile_string()).prop_map(|(c, n)| Some(Node::Other(c, n))),
        1 => Just(None),
    ]
}

fn handle() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just("vol-edge-wal".to_owned()),
        4 => Just("vol-edge-data".to_owned()),
        2 => hostile_string(),
    ]
}

fn resolved_volume() -> impl Strategy<Value = pb::ResolvedVolume> {
    (
        prop_oneof![3 => Just("orders".to_owned()), 1 => hostile_string()],
        prop_oneof![2 => Just("wal".to_owned()), 2 => Just("data".to_owned()), 1 => hostile_string()],
        hostile_string(),
        handle(),
    )
        .prop_map(
            |(namespace, pvc, persistent_volume, volume_handle)| pb::ResolvedVolume {
                namespace,
                pvc,
                persistent_volume,
                volume_handle,
            },
        )
}

/// One call a hostile sidecar makes, with its symbolic parts resolved against the group at call time.
#[derive(Debug, Clone)]
enum Call {
    Report {
        node: Option<Node>,
        failures: Vec<(Uid, String, Epoch, String)>,
        volumes: Vec<pb::ResolvedVolume>,
        holds: Vec<(Uid, String, Epoch, u64, i64)>,
        states: Vec<(String, Uid, i32, Epoch, i32)>,
    },
    Ack {
        node: Option<Node>,
        point: Option<(Uid, Epoch, i32)>,
        handles: Vec<String>,
        fail_safe: bool,
    },
    Subscribe {
        node: Option<Node>,
        volumes: Vec<pb::ResolvedVolume>,
        seen: Vec<(Uid, Epoch, i32)>,
    },
    /// Arbitrary bytes as the body of a call to one of the three methods.
    Raw { method: usize, body: Vec<u8> },
}

fn call() -> impl Strategy<Value = Call> {
    let failure = (uid(), handle(), epoch(), hostile_string());
    let hold = (
        uid(),
        handle(),
        epoch(),
        prop_oneof![Just(0u64), Just(1), any::<u64>()],
        any::<i64>(),
    );
    let state = (handle(), uid(), wire_enum(7), epoch(), wire_enum(3));
    let point = || (uid(), epoch(), wire_enum(3));
    prop_oneof![
        4 => (
            node(),
            proptest::collection::vec(failure, 0..3),
            proptest::collection::vec(resolved_volume(), 0..3),
            proptest::collection::vec(hold, 0..2),
            proptest::collection::vec(state, 0..3),
        )
            .prop_map(|(node, failures, volumes, holds, states)| Call::Report {
                node,
                failures,
                volumes,
                holds,
                states
            }),
        5 => (
            node(),
            proptest::option::weighted(0.9, point()),
            proptest::collection::vec(handle(), 0..4),
            any::<bool>(),
        )
            .prop_map(|(node, point, handles, fail_safe)| Call::Ack {
                node,
                point,
                handles,
                fail_safe
            }),
        2 => (
            node(),
            proptest::collection::vec(resolved_volume(), 0..3),
            proptest::collection::vec(point(), 0..3),
        )
            .prop_map(|(node, volumes, seen)| Call::Subscribe { node, volumes, seen }),
        2 => (0usize..3, proptest::collection::vec(any::<u8>(), 0..512))
            .prop_map(|(method, body)| Call::Raw { method, body }),
    ]
}

// ---------------------------------------------------------------------------------------------------
// Arbitrary bytes, in-process
// ---------------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(fuzz_config(2_000))]

    /// Every request the service takes decodes arbitrary bytes to a message or a clean error.
    #[test]
    fn control_requests_decode_arbitrary_bytes_without_panicking(
        bytes in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        let _ = ReportRequest::decode(bytes.as_slice());
        let _ = SubscribeRequest::decode(bytes.as_slice());
        let _ = AckRequest::decode(bytes.as_slice());
    }
}

// ---------------------------------------------------------------------------------------------------
// The decision core, fed hostile events
// ---------------------------------------------------------------------------------------------------

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap())
}

/// A resolved two-volume group in one cluster, replicating at epoch 0.
fn core_group(policy: Policy) -> ConsistencyGroup {
    let mut group = ConsistencyGroup::new("edge-db", edge_group(policy));
    group.metadata = ObjectMeta {
        name: Some("edge-db".into()),
        uid: Some("uid-1".into()),
        generation: Some(1),
        ..ObjectMeta::default()
    };
    let mut status = ConsistencyGroupStatus {
        members: ["wal", "data"]
            .iter()
            .map(|pvc| MemberVolumeStatus {
                cluster: "edge".into(),
                namespace: "orders".into(),
                pvc: (*pvc).into(),
                persistent_volume: Some(format!("pv-edge-{pvc}")),
                volume_handle: Some(format!("vol-edge-{pvc}")),
                node: Some("edge-1".into()),
                state: None,
                acknowledged: None,
                image_epoch: None,
            })
            .collect(),
        member_count: 2,
        ..ConsistencyGroupStatus::default()
    };
    lockstep_api::conditions::set(
        &mut status.conditions,
        lockstep_api::conditions::ConditionUpdate {
            type_: lockstep_api::domain::condition::MEMBERS_RESOLVED,
            status: true,
            reason: "Resolved",
            message: "every member resolved".into(),
        },
        Some(1),
        &now(),
    );
    group.status = Some(status);
    group
}

fn core_epoch(epoch: Epoch, current: u64) -> u64 {
    match epoch {
        Epoch::Current => current,
        Epoch::Next => current.saturating_add(1),
        Epoch::Literal(epoch) => epoch,
    }
}

/// A hostile event, past the service's validation (which refuses epochs above the largest and unset
/// stages, so those reach the core only as [`Event::Seen`]).
#[derive(Debug, Clone)]
enum CoreEvent {
    Report(String, String, String, Epoch, String),
    Ack(String, Epoch, Stage, Vec<String>, bool),
    Hold(String, String, Epoch, u64),
    Seen(Epoch),
    Evaluate,
}

fn core_event() -> impl Strategy<Value = CoreEvent> {
    let cluster = prop_oneof![4 => Just("edge".to_owned()), 1 => hostile_string()];
    let stage = prop_oneof![
        Just(Stage::Freeze),
        Just(Stage::Release),
        Just(Stage::Resume)
    ];
    prop_oneof![
        3 => (cluster.clone(), hostile_string(), handle(), epoch(), hostile_string())
            .prop_map(|(c, n, h, e, m)| CoreEvent::Report(c, n, h, e, m)),
        5 => (cluster.clone(), epoch(), stage, proptest::collection::vec(handle(), 0..4), any::<bool>())
            .prop_map(|(c, e, s, h, f)| CoreEvent::Ack(c, e, s, h, f)),
        1 => (cluster, handle(), epoch(), any::<u64>())
            .prop_map(|(c, h, e, n)| CoreEvent::Hold(c, h, e, n)),
        1 => epoch().prop_map(CoreEvent::Seen),
        1 => Just(CoreEvent::Evaluate),
    ]
}

fn to_event(event: &CoreEvent, current: u64) -> freeze::Event {
    let bounded = |epoch| core_epoch(epoch, current).min(MAX_EPOCH);
    match event.clone() {
        CoreEvent::Report(cluster, node, volume_handle, epoch, message) => {
            freeze::Event::Report(freeze::Report {
                path: Path::Grpc,
                cluster,
                node,
                volume_handle,
                epoch_seen: bounded(epoch),
                message: lockstep_api::domain::bounded_message(&message),
            })
        }
        CoreEvent::Ack(cluster, epoch, stage, volume_handles, fail_safe) => {
            freeze::Event::Ack(freeze::Ack {
                path: Path::Grpc,
                cluster,
                epoch: bounded(epoch),
                stage,
                volume_handles,
                fail_safe,
            })
        }
        CoreEvent::Hold(cluster, volume_handle, epoch, failed_writes) => {
            freeze::Event::HoldTimedOut(freeze::HoldTimeoutReport {
                path: Path::Grpc,
                cluster,
                volume_handle,
                epoch: bounded(epoch),
                failed_writes,
                since: None,
            })
        }
        CoreEvent::Seen(epoch) => freeze::Event::Seen {
            epoch: core_epoch(epoch, current),
        },
        CoreEvent::Evaluate => freeze::Event::Evaluate,
    }
}

/// Whether every resolved member acknowledged at least the freeze of `epoch`.
fn every_member_acknowledged(status: &ConsistencyGroupStatus, epoch: u64) -> bool {
    status
        .members
        .iter()
        .filter(|member| member.volume_handle.is_some())
        .all(|member| {
            member
                .acknowledged
                .as_ref()
                .is_some_and(|ack| (ack.epoch, ack.stage) >= (epoch, Stage::Freeze))
        })
}

proptest! {
    #![proptest_config(fuzz_config(1_000))]

    /// Hostile events one at a time and in batches: the epoch never goes backwards nor beyond the
    /// largest, grows only by a freeze sent at once, and a release is decided only at the current epoch
    /// once every resolved member acknowledged its freeze.
    #[test]
    fn the_decision_core_keeps_its_invariants_under_hostile_events(
        policy in prop_oneof![Just(Policy::FreezeAndGo), Just(Policy::FreezeAndStop)],
        steps in proptest::collection::vec(
            (proptest::collection::vec(core_event(), 1..4), any::<bool>()), 1..30),
    ) {
        let mut group = core_group(policy);
        for (events, batched) in &steps {
            let before = group.status.clone().unwrap_or_default();
            let events: Vec<freeze::Event> =
                events.iter().map(|event| to_event(event, before.epoch)).collect();
            let decisions = if *batched {
                vec![freeze::decide_batch(&group, &events, &now()).unwrap()]
            } else {
                let mut decisions = Vec::new();
                for event in &events {
                    let decision = freeze::decide(&group, event, &now()).unwrap();
                    group.status = Some(decision.status.clone());
                    decisions.push(decision);
                }
                decisions
            };
            let mut previous = before.epoch;
            for decision in &decisions {
                let epoch = decision.status.epoch;
                prop_assert!(epoch >= previous, "the epoch went back from {previous} to {epoch}");
                prop_assert!(epoch <= MAX_EPOCH, "epoch {epoch} beyond the largest");
                if epoch > previous {
                    prop_assert_eq!(decision.freeze_now.as_ref().map(|point| point.epoch), Some(epoch));
                }
                if let Some(point) = &decision.after_persist && point.stage == Stage::Release {
                    prop_assert_eq!(point.epoch, epoch);
                    prop_assert!(every_member_acknowledged(&decision.status, epoch),
                        "released at {} before every member acknowledged: {:?}", epoch, decision.status.members);
                }
                previous = epoch;
            }
            if let Some(last) = decisions.last() {
                group.status = Some(last.status.clone());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The real service over a socket
// ---------------------------------------------------------------------------------------------------

fn options() -> Options {
    Options {
        kubeconfig: None,
        hub_name: "hub".into(),
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        resync_interval: Duration::from_millis(200),
        leader_election: false,
        namespace: "lockstep-system".into(),
        identity: "operator-0".into(),
        lease_duration: Duration::from_secs(2),
        max_sessions_per_cluster: 64,
        max_group_volumes: lockstep_operator::DEFAULT_MAX_GROUP_VOLUMES,
        control_security: lockstep_operator::ControlSecurity::insecure_plaintext(),
    }
}

fn edge_group(policy: Policy) -> ConsistencyGroupSpec {
    ConsistencyGroupSpec {
        members: vec![GroupMember {
            cluster: "edge".into(),
            namespace: "orders".into(),
            pvc_names: Some(vec!["wal".into(), "data".into()]),
            selector: None,
        }],
        policy,
        hold_timeout: "30s".into(),
        release: None,
        resync: None,
        freeze: None,
        failover: None,
    }
}

fn edge_volume(pvc: &str) -> pb::ResolvedVolume {
    pb::ResolvedVolume {
        namespace: "orders".into(),
        pvc: pvc.into(),
        persistent_volume: format!("pv-edge-{pvc}"),
        volume_handle: format!("vol-edge-{pvc}"),
    }
}

/// Sends `body` as the request of a Control method, as it is.
async fn raw_call(channel: &Channel, method: usize, body: Vec<u8>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|error| Status::unavailable(format!("channel not ready: {error}")))?;
    let path = ["Report", "Subscribe", "Ack"][method % 3];
    let path =
        http::uri::PathAndQuery::try_from(format!("/lockstep.control.v1.Control/{path}")).unwrap();
    if path.path().ends_with("Subscribe") {
        let mut stream = grpc
            .server_streaming(tonic::Request::new(body), path, RawCodec)
            .await?
            .into_inner();
        // The first message (or the end): the stream is dropped, which closes the session.
        stream.message().await.map(|_| ())
    } else {
        grpc.unary(tonic::Request::new(body), path, RawCodec)
            .await
            .map(|_| ())
    }
}

/// The fixture: the operator, the two edge sidecars' streams and the group's UID.
struct Fixture {
    operator: Operator,
    channel: Channel,
    uid: String,
    _server: lockstep_testapi::TestApiServer,
    _streams: Vec<tonic::Streaming<pb::ControlMessage>>,
}

impl Fixture {
    async fn start() -> Self {
        let (server, hub) = cluster().await;
        let edge = MemberClusterSpec {
            paths: ClusterPaths::GrpcOnly,
            local: false,
            kubeconfig_secret_ref: None,
            network: None,
            service_account_keys: None,
            volume_binding: Default::default(),
        };
        Api::<MemberCluster>::all(hub.clone())
            .create(&PostParams::default(), &MemberCluster::new("edge", edge))
            .await
            .unwrap();
        let operator = Operator::start(hub.clone(), &options()).await.unwrap();
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", operator.grpc_addr))
                .unwrap()
                .connect()
                .await
                .unwrap();
        let mut streams = Vec::new();
        for (node, pvc) in [("edge-1", "wal"), ("edge-2", "data")] {
            let stream = ControlClient::new(channel.clone())
                .subscribe(SubscribeRequest {
                    node: Some(NodeIdentity {
                        cluster: "edge".into(),
                        node: node.into(),
                    }),
                    volumes: vec![edge_volume(pvc)],
                    seen: vec![],
                })
                .await
                .unwrap()
                .into_inner();
            streams.push(stream);
        }
        Api::<ConsistencyGroup>::all(hub.clone())
            .create(
                &PostParams::default(),
                &ConsistencyGroup::new("edge-db", edge_group(Policy::FreezeAndGo)),
            )
            .await
            .unwrap();
        let uid = eventually("edge-db resolved", || {
            let hub = hub.clone();
            async move {
                let group = common::get_with_volumes(&hub, "edge-db").await?;
                let resolved = group
                    .status
                    .as_ref()?
                    .members
                    .iter()
                    .all(|member| member.volume_handle.is_some())
                    && group.status.as_ref()?.members.len() == 2;
                resolved.then(|| group.metadata.uid.clone()).flatten()
            }
        })
        .await;
        Self {
            operator,
            channel,
            uid,
            _server: server,
            _streams: streams,
        }
    }

    /// The group's status as the operator decided it: the persisted decision with every member volume
    /// from the operator's record (the shards follow it in the background).
    async fn status(&self) -> ConsistencyGroupStatus {
        self.operator
            .engine()
            .last_status(&self.uid)
            .await
            .unwrap_or_default()
    }
}

/// The node identity a call names.
fn identity(node: &Option<Node>) -> Option<NodeIdentity> {
    node.as_ref().map(|node| match node {
        Node::Edge(name) => NodeIdentity {
            cluster: "edge".into(),
            node: (*name).into(),
        },
        Node::Other(cluster, node) => NodeIdentity {
            cluster: cluster.clone(),
            node: node.clone(),
        },
    })
}

fn group_point(uid: &Uid, group: &str, epoch: Epoch, current: u64, stage: i32) -> pb::GroupEpoch {
    pb::GroupEpoch {
        group_uid: resolve_uid(uid, group),
        epoch: core_epoch(epoch, current),
        stage,
    }
}

fn resolve_uid(uid: &Uid, group: &str) -> String {
    match uid {
        Uid::Group => group.to_owned(),
        Uid::Other(other) => other.clone(),
    }
}

/// Whether a status is one the service may answer with: a refusal a sidecar understands. Unavailable
/// only as "send it again"; Internal only as gRPC's own word for bytes that are not the message.
fn clean_refusal(status: &Status) -> bool {
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::PermissionDenied
        | Code::ResourceExhausted
        | Code::OutOfRange => true,
        Code::Unavailable => {
            status.message().starts_with("not persisted")
                || status
                    .message()
                    .starts_with("this operator replica is not the leader")
        }
        Code::Internal => status
            .message()
            .contains("failed to decode Protobuf message"),
        _ => false,
    }
}

/// A refusal that must have changed nothing (the message was malformed, too large or not allowed).
fn refused_outright(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::InvalidArgument
            | Code::PermissionDenied
            | Code::ResourceExhausted
            | Code::OutOfRange
            | Code::Internal
    )
}

/// The volumes a node's session holds, as the operator recorded them.
fn recorded_volumes(operator: &Operator, node: &NodeIdentity) -> Vec<(String, String, String)> {
    let mut volumes: Vec<_> = operator
        .engine()
        .sessions()
        .reported_volumes(&node.cluster)
        .into_iter()
        .filter(|volume| volume.node == node.node)
        .map(|volume| (volume.namespace, volume.pvc, volume.volume_handle))
        .collect();
    volumes.sort();
    volumes
}

/// Makes one call; returns its refusal, if any, after checking it is clean and that the service still
/// answers.
async fn make(fixture: &Fixture, call: &Call, current: u64) -> Result<(), Status> {
    let uid = fixture.uid.as_str();
    let mut control = ControlClient::new(fixture.channel.clone());
    let result = match call {
        Call::Report {
            node,
            failures,
            volumes,
            holds,
            states,
        } => {
            let request = ReportRequest {
                node: identity(node),
                failures: failures
                    .iter()
                    .map(|(group, handle, epoch, error)| pb::CopyFailure {
                        group_uid: resolve_uid(group, uid),
                        volume_handle: handle.clone(),
                        epoch_seen: core_epoch(*epoch, current),
                        sequence: 1,
                        error: error.clone(),
                        since_unix_ms: 0,
                    })
                    .collect(),
                volumes: volumes.clone(),
                hold_timeouts: holds
                    .iter()
                    .map(|(group, handle, epoch, failed, since)| pb::HoldTimeout {
                        group_uid: resolve_uid(group, uid),
                        volume_handle: handle.clone(),
                        epoch: core_epoch(*epoch, current),
                        failed_writes: *failed,
                        since_unix_ms: *since,
                    })
                    .collect(),
                states: states
                    .iter()
                    .map(
                        |(handle, group, state, epoch, stage)| pb::VolumeReplication {
                            volume_handle: handle.clone(),
                            group_uid: resolve_uid(group, uid),
                            state: *state,
                            epoch: core_epoch(*epoch, current),
                            stage: *stage,
                        },
                    )
                    .collect(),
            };
            let recorded_before = request
                .node
                .as_ref()
                .map(|node| recorded_volumes(&fixture.operator, node));
            let result = control.report(request.clone()).await.map(|_| ());
            if let (Err(status), Some(node), Some(before)) =
                (&result, &request.node, recorded_before)
                && refused_outright(status)
            {
                // A refused report records none of the volumes it carries.
                let mut carried: Vec<_> = request
                    .volumes
                    .iter()
                    .filter(|volume| !volume.volume_handle.is_empty() && !volume.pvc.is_empty())
                    .map(|volume| {
                        (
                            volume.namespace.clone(),
                            volume.pvc.clone(),
                            volume.volume_handle.clone(),
                        )
                    })
                    .collect();
                carried.sort();
                let after = recorded_volumes(&fixture.operator, node);
                assert!(
                    after == before || after != carried || request.volumes.is_empty(),
                    "a report refused with {status:?} recorded its volumes {carried:?}"
                );
            }
            result
        }
        Call::Ack {
            node,
            point,
            handles,
            fail_safe,
        } => control
            .ack(AckRequest {
                node: identity(node),
                enforced: point
                    .as_ref()
                    .map(|(group, epoch, stage)| group_point(group, uid, *epoch, current, *stage)),
                volume_handles: handles.clone(),
                fail_safe: *fail_safe,
            })
            .await
            .map(|_| ()),
        Call::Subscribe {
            node,
            volumes,
            seen,
        } => {
            let request = SubscribeRequest {
                node: identity(node),
                volumes: volumes.clone(),
                seen: seen
                    .iter()
                    .map(|(group, epoch, stage)| group_point(group, uid, *epoch, current, *stage))
                    .collect(),
            };
            match control.subscribe(request).await {
                // The first message, then the stream is dropped (the session closes).
                Ok(response) => response.into_inner().message().await.map(|_| ()),
                Err(status) => Err(status),
            }
        }
        Call::Raw { method, body } => raw_call(&fixture.channel, *method, body.clone()).await,
    };
    if let Err(status) = &result {
        assert!(clean_refusal(status), "{call:?} answered {status:?}");
    }
    result
}

/// Both edge nodes acknowledge the group's current point, as well-behaved sidecars do between the
/// hostile calls (so freezes are released and the hostile calls meet every stage).
async fn well_behaved(fixture: &Fixture, status: &ConsistencyGroupStatus) {
    let mut control = ControlClient::new(fixture.channel.clone());
    let (epoch, stage) = status.position();
    for (node, pvc) in [("edge-1", "wal"), ("edge-2", "data")] {
        let answer = control
            .ack(AckRequest {
                node: Some(NodeIdentity {
                    cluster: "edge".into(),
                    node: node.into(),
                }),
                enforced: Some(pb::GroupEpoch {
                    group_uid: fixture.uid.clone(),
                    epoch,
                    stage: pb::Stage::from(stage).into(),
                }),
                volume_handles: vec![format!("vol-edge-{pvc}")],
                fail_safe: false,
            })
            .await;
        if let Err(status) = &answer {
            assert!(
                clean_refusal(status),
                "a well-formed ack answered {status:?}"
            );
        }
    }
}

fn check_invariants(before: &ConsistencyGroupStatus, after: &ConsistencyGroupStatus, what: &str) {
    assert!(
        after.epoch >= before.epoch,
        "{what}: the epoch went back from {} to {}",
        before.epoch,
        after.epoch
    );
    assert!(
        after.epoch <= MAX_EPOCH,
        "{what}: epoch {} beyond the largest",
        after.epoch
    );
    // Checked where the release is decided (a member resolved anew later — another node, another PV —
    // starts without an acknowledgement, and the release stands).
    if after.position() == (after.epoch, Stage::Release) && before.position() != after.position() {
        let mut kept = after.clone();
        kept.members.retain(|member| {
            before.members.iter().any(|earlier| {
                (
                    &earlier.cluster,
                    &earlier.volume_handle,
                    &earlier.persistent_volume,
                    &earlier.node,
                ) == (
                    &member.cluster,
                    &member.volume_handle,
                    &member.persistent_volume,
                    &member.node,
                )
            })
        });
        assert!(
            every_member_acknowledged(&kept, after.epoch),
            "{what}: released at {} before every member acknowledged: {:?}",
            after.epoch,
            after.members
        );
    }
}

#[test]
fn the_control_service_refuses_hostile_calls_cleanly_and_keeps_its_invariants() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fixture = Arc::new(runtime.block_on(Fixture::start()));
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        source_file: Some(file!()),
        // Each case talks to a real server: shrinking is bounded in time, not only in steps.
        max_shrink_time: 120_000,
        ..fuzz_config(200)
    });
    let strategy = (proptest::collection::vec(call(), 1..6), any::<bool>());
    runner
        .run(&strategy, |(calls, behave)| {
            runtime.block_on(async {
                for call in &calls {
                    let before = fixture.status().await;
                    let result = make(&fixture, call, before.epoch).await;
                    let after = fixture.status().await;
                    check_invariants(&before, &after, &format!("{call:?}"));
                    if let Err(status) = &result
                        && refused_outright(status)
                    {
                        assert_eq!(
                            after.position(),
                            before.position(),
                            "{call:?} was refused ({status:?}) but moved the group"
                        );
                    }
                }
                if behave {
                    let before = fixture.status().await;
                    well_behaved(&fixture, &before).await;
                    check_invariants(&before, &fixture.status().await, "well-behaved acks");
                }
                // Still serving: a well-formed, empty report is answered.
                ControlClient::new(fixture.channel.clone())
                    .report(ReportRequest {
                        node: Some(NodeIdentity {
                            cluster: "edge".into(),
                            node: "edge-1".into(),
                        }),
                        ..ReportRequest::default()
                    })
                    .await
                    .expect("the service still answers after hostile calls");
            });
            Ok(())
        })
        .unwrap();
    let status = runtime.block_on(fixture.status());
    println!(
        "control service fuzz: {} cases, the group ended at {:?}",
        runner.config().cases,
        status.position()
    );
}
