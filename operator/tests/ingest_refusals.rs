//! Every refusal of the one validator, on both paths: the same malformed input sent by node e1 of the
//! member cluster east over gRPC (a real call to the operator's Control service on 127.0.0.1) and written
//! into e1's ReplicationNode status (through the API server the operator watches) is refused for the same
//! reason — counted in `lockstep_reports_refused_total{path, reason}` — and changes nothing: the well-formed
//! failure travelling with it does not freeze the group. The same failure sent alone then does, so the
//! refusal is what held it back.
//!
//! A member cluster's API server checks ReplicationNodes against the CRD's schema, which states the same
//! limits; the operator does not rely on it (a member cluster's CRD may be older, or altered), so the API
//! path tests install a ReplicationNode CRD whose schema checks nothing. An unset stage or replication
//! state cannot be written on that path at all (the fields are enums, in the schema and in the operator's
//! types): there the test shows the API server refusing it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use lockstep_api::{
    domain::{ClusterPaths, MAX_EPOCH},
    proto::control::v1::{
        self as pb, AckRequest, NodeIdentity, ReportRequest, control_client::ControlClient,
    },
    v1alpha1::{ConsistencyGroup, MemberCluster, MemberClusterSpec, ReplicationNode},
};
use lockstep_operator::Operator;
use serde_json::json;
use tonic::Code;

use common::{cluster, eventually, options, volume};

/// The malformed inputs, one per reason the validator refuses for.
#[derive(Debug, Clone, Copy)]
enum Malformed {
    NoNode,
    NodeNameTooLong,
    NoGroupUid,
    GroupUidTooLong,
    NoVolumeHandle,
    VolumeHandleTooLong,
    EpochBeyondMax,
    NoFailedWrite,
    TooManyFailures,
    UnknownGroup,
}

impl Malformed {
    /// The `reason` it is counted under.
    fn reason(self) -> &'static str {
        match self {
            Self::NoNode => "no_node",
            Self::NodeNameTooLong => "name_too_long",
            Self::NoGroupUid => "no_group_uid",
            Self::GroupUidTooLong => "group_uid_too_long",
            Self::NoVolumeHandle => "no_volume_handle",
            Self::VolumeHandleTooLong => "volume_handle_too_long",
            Self::EpochBeyondMax => "epoch_beyond_max",
            Self::NoFailedWrite => "no_failed_write",
            Self::TooManyFailures => "too_many",
            Self::UnknownGroup => "unknown_group",
        }
    }

    /// What e1 sends: the malformed part, with the well-formed failure of vol-wal (which alone freezes
    /// the group) where a report carries it.
    fn input(self, uid: &str) -> Input {
        let valid = (uid.to_owned(), "vol-wal".to_owned(), 0);
        let mut input = Input {
            node: "e1".into(),
            failures: vec![valid.clone()],
            hold: None,
            ack: None,
        };
        match self {
            Self::NoNode => input.node = String::new(),
            Self::NodeNameTooLong => input.node = "e".repeat(254),
            Self::NoGroupUid => input
                .failures
                .insert(0, (String::new(), "vol-wal".into(), 0)),
            Self::GroupUidTooLong => input
                .failures
                .insert(0, ("u".repeat(129), "vol-wal".into(), 0)),
            Self::NoVolumeHandle => input.failures.insert(0, (uid.into(), String::new(), 0)),
            Self::VolumeHandleTooLong => {
                input.failures.clear();
                input.ack = Some((uid.into(), 0, vec!["v".repeat(1025)]));
            }
            Self::EpochBeyondMax => input
                .failures
                .insert(0, (uid.into(), "vol-wal".into(), MAX_EPOCH + 1)),
            Self::NoFailedWrite => input.hold = Some((uid.into(), "vol-wal".into(), 0, 0)),
            Self::TooManyFailures => input.failures = vec![valid; 1025],
            Self::UnknownGroup => {
                input.failures = vec![("no-such-group".into(), "vol-wal".into(), 0)]
            }
        }
        input
    }
}

/// What e1 sends, path aside.
struct Input {
    node: String,
    /// (group UID, volume handle, epoch seen).
    failures: Vec<(String, String, u64)>,
    /// (group UID, volume handle, epoch, failed writes).
    hold: Option<(String, String, u64, u64)>,
    /// (group UID, epoch, volume handles), acknowledging a freeze.
    ack: Option<(String, u64, Vec<String>)>,
}

impl Input {
    /// Sends it over gRPC: an `Ack` when it acknowledges, else a `Report`.
    async fn send(&self, control: &mut ControlClient<tonic::transport::Channel>) -> tonic::Status {
        let node = Some(NodeIdentity {
            cluster: "east".into(),
            node: self.node.clone(),
        });
        let answer = if let Some((uid, epoch, handles)) = &self.ack {
            control
                .ack(AckRequest {
                    node,
                    enforced: Some(pb::GroupEpoch {
                        group_uid: uid.clone(),
                        epoch: *epoch,
                        stage: pb::Stage::Freeze.into(),
                    }),
                    volume_handles: handles.clone(),
                    fail_safe: false,
                })
                .await
                .map(|_| ())
        } else {
            control
                .report(ReportRequest {
                    node,
                    failures: self.failures.iter().map(failure).collect(),
                    hold_timeouts: self
                        .hold
                        .iter()
                        .map(|(uid, handle, epoch, failed_writes)| pb::HoldTimeout {
                            group_uid: uid.clone(),
                            volume_handle: handle.clone(),
                            epoch: *epoch,
                            failed_writes: *failed_writes,
                            since_unix_ms: 1_800_000_000_000,
                        })
                        .collect(),
                    ..ReportRequest::default()
                })
                .await
                .map(|_| ())
        };
        answer.expect_err("the malformed input is refused")
    }

    /// The same as a ReplicationNode's status.
    fn status(&self) -> serde_json::Value {
        let mut volumes =
            vec![json!({"volumeHandle": "vol-wal", "state": "Replicating", "epoch": 0})];
        if let Some((uid, handle, epoch, failed_writes)) = &self.hold {
            volumes.push(
                json!({"volumeHandle": handle, "state": "Held", "epoch": epoch,
                "groupUid": uid, "holdTimeout": {"epoch": epoch, "failedWrites": failed_writes,
                "since": "2027-01-15T08:00:00Z"}}),
            );
        }
        let failures: Vec<_> = self
            .failures
            .iter()
            .map(|(uid, handle, epoch)| {
                json!({"volumeHandle": handle, "groupUid": uid, "epochSeen": epoch, "sequence": 1,
                    "error": "link cut", "since": "2027-01-15T08:00:00Z"})
            })
            .collect();
        let enforced: Vec<_> = self
            .ack
            .iter()
            .map(|(uid, epoch, handles)| {
                json!({"groupUid": uid, "epoch": epoch, "stage": "Freeze", "volumeHandles": handles})
            })
            .collect();
        json!({"volumes": volumes, "volumeCount": volumes.len(), "failures": failures,
            "failureCount": failures.len(), "enforced": enforced})
    }
}

fn failure((uid, handle, epoch): &(String, String, u64)) -> pb::CopyFailure {
    pb::CopyFailure {
        group_uid: uid.clone(),
        volume_handle: handle.clone(),
        epoch_seen: *epoch,
        sequence: 1,
        error: "link cut".into(),
        since_unix_ms: 0,
    }
}

/// A hub that is its own member cluster east, PVC wal on node e1, a group `orders-db` of it resolved,
/// and the operator; the group's UID.
async fn world(hub: &Client) -> (Operator, String) {
    volume(hub, "wal", "orders", "vol-wal", "e1").await;
    Api::<MemberCluster>::all(hub.clone())
        .create(
            &PostParams::default(),
            &MemberCluster::new(
                "east",
                MemberClusterSpec {
                    paths: ClusterPaths::Both,
                    local: true,
                    kubeconfig_secret_ref: None,
                    network: None,
                    service_account_keys: None,
                    volume_binding: Default::default(),
                },
            ),
        )
        .await
        .unwrap();
    let operator = Operator::start(hub.clone(), &options()).await.unwrap();
    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    let spec = common::orders_group(&["wal"]);
    groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("orders-db", spec),
        )
        .await
        .unwrap();
    let uid = eventually("wal resolved on e1", || async {
        let group = common::get_with_volumes(hub, "orders-db").await?;
        let status = group.status.as_ref()?;
        let on_e1 = status
            .members
            .iter()
            .any(|member| member.node.as_deref() == Some("e1"));
        on_e1.then(|| group.metadata.uid.clone()).flatten()
    })
    .await;
    (operator, uid)
}

/// How many refusals on `path` for `reason` the operator's metrics count.
fn refused(operator: &Operator, path: &str, reason: &str) -> u64 {
    let prefix = format!("lockstep_reports_refused_total{{path=\"{path}\",reason=\"{reason}\"}} ");
    operator
        .engine()
        .metrics()
        .encode()
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

/// The group's epoch, and whether anything triggered a freeze.
async fn epoch_and_trigger(hub: &Client) -> (u64, bool) {
    let group = Api::<ConsistencyGroup>::all(hub.clone())
        .get("orders-db")
        .await
        .unwrap();
    let status = group.status.unwrap_or_default();
    (status.epoch, status.trigger.is_some())
}

async fn frozen(hub: &Client, what: &str) {
    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    eventually(what, || async {
        (groups.get("orders-db").await.ok()?.status?.epoch >= 1).then_some(())
    })
    .await;
}

/// Sends the malformed input over gRPC: refused with INVALID_ARGUMENT naming what is wrong (NOT_FOUND
/// for a group this hub does not know), counted, nothing changed; then the well-formed failure alone
/// freezes the group.
async fn over_grpc(malformed: Malformed) {
    let (_server, hub) = cluster().await;
    let (operator, uid) = world(&hub).await;
    let mut control = ControlClient::connect(format!("http://{}", operator.grpc_addr))
        .await
        .unwrap();
    let status = malformed.input(&uid).send(&mut control).await;
    let expected = match malformed {
        Malformed::UnknownGroup => Code::NotFound,
        _ => Code::InvalidArgument,
    };
    assert_eq!(status.code(), expected, "{malformed:?}: {status:?}");
    assert!(
        refused(&operator, "grpc", malformed.reason()) >= 1,
        "{malformed:?} counted as {}",
        malformed.reason()
    );
    assert_eq!(
        epoch_and_trigger(&hub).await,
        (0, false),
        "{malformed:?} changed the group"
    );
    control
        .report(ReportRequest {
            node: Some(NodeIdentity {
                cluster: "east".into(),
                node: "e1".into(),
            }),
            failures: vec![failure(&(uid, "vol-wal".into(), 0))],
            ..ReportRequest::default()
        })
        .await
        .unwrap();
    frozen(&hub, "the well-formed failure alone freezes the group").await;
    operator.shutdown().await;
}

/// Replaces the ReplicationNode CRD's schema with one that checks nothing, as an altered or older CRD in
/// a member cluster might.
async fn schema_checking_nothing(hub: &Client) {
    let crds = Api::<CustomResourceDefinition>::all(hub.clone());
    let name = "replicationnodes.lockstep.dev";
    let mut crd = serde_json::to_value(crds.get(name).await.unwrap()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"] =
        json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    let crd: CustomResourceDefinition = serde_json::from_value(crd).unwrap();
    crds.replace(name, &PostParams::default(), &crd)
        .await
        .unwrap();
    common::crds_established(hub).await;
}

/// Writes ReplicationNode `e1`, its spec naming `node`, with `status`.
async fn write_node(
    hub: &Client,
    node: &str,
    status: serde_json::Value,
) -> Result<(), kube::Error> {
    let api = Api::<ReplicationNode>::all(hub.clone());
    let object = json!({"apiVersion": "lockstep.dev/v1alpha1", "kind": "ReplicationNode",
        "metadata": {"name": "e1"}, "spec": {"nodeName": node, "cluster": "east"}});
    let params = PatchParams::apply("test-sidecar").force();
    api.patch("e1", &params, &Patch::Apply(&object)).await?;
    let status =
        json!({"apiVersion": "lockstep.dev/v1alpha1", "kind": "ReplicationNode", "status": status});
    api.patch_status("e1", &params, &Patch::Apply(&status))
        .await
        .map(|_| ())
}

/// Writes the well-formed failure of vol-wal alone into e1's ReplicationNode; waits for the freeze.
async fn freezes_through_api(hub: &Client, uid: &str, what: &str) {
    let valid = Input {
        node: "e1".into(),
        failures: vec![(uid.to_owned(), "vol-wal".into(), 0)],
        hold: None,
        ack: None,
    };
    write_node(hub, "e1", valid.status()).await.unwrap();
    frozen(hub, what).await;
}

/// Writes the malformed input into e1's ReplicationNode: counted as refused for the same reason as over
/// gRPC, nothing changed; then the well-formed failure alone freezes the group.
async fn through_api(malformed: Malformed) {
    let (_server, hub) = cluster().await;
    schema_checking_nothing(&hub).await;
    let (operator, uid) = world(&hub).await;
    let input = malformed.input(&uid);
    write_node(&hub, &input.node, input.status()).await.unwrap();
    eventually(&format!("{malformed:?} counted as refused"), || async {
        (refused(&operator, "api", malformed.reason()) >= 1).then_some(())
    })
    .await;
    assert_eq!(
        epoch_and_trigger(&hub).await,
        (0, false),
        "{malformed:?} changed the group"
    );
    freezes_through_api(
        &hub,
        &uid,
        "the well-formed failure alone freezes the group",
    )
    .await;
    operator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refuses_a_report_naming_no_node() {
    over_grpc(Malformed::NoNode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_a_replication_node_naming_no_node() {
    through_api(Malformed::NoNode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refuses_a_node_name_too_long() {
    over_grpc(Malformed::NodeNameTooLong).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_a_node_name_too_long() {
    through_api(Malformed::NodeNameTooLong).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refuses_a_failure_without_a_group_uid() {
    over_grpc(Malformed::NoGroupUid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_a_failure_without_a_group_uid() {
    through_api(Malformed::NoGroupUid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refuses_a_group_uid_too_long() {
    over_grpc(Malformed::GroupUidTooLong).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_a_group_uid_too_long() {
    through_api(Malformed::GroupUidTooLong).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refuses_a_failure_without_a_volume_handle() {
    over_grpc(Malformed::NoVolumeHandle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_a_failure_without_a_volume_handle() {
    through_api(Malformed::NoVolumeHandle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refuses_an_acknowledged_volume_handle_too_long() {
    over_grpc(Malformed::VolumeHandleTooLong).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_an_acknowledged_volume_handle_too_long() {
    through_api(Malformed::VolumeHandleTooLong).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refuses_an_epoch_beyond_the_largest() {
    over_grpc(Malformed::EpochBeyondMax).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_an_epoch_beyond_the_largest() {
    through_api(Malformed::EpochBeyondMax).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refuses_a_hold_timeout_without_a_failed_write() {
    over_grpc(Malformed::NoFailedWrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_a_hold_timeout_without_a_failed_write() {
    through_api(Malformed::NoFailedWrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refuses_too_many_failures() {
    over_grpc(Malformed::TooManyFailures).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_too_many_failures() {
    through_api(Malformed::TooManyFailures).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refuses_a_failure_of_a_group_this_hub_does_not_know() {
    over_grpc(Malformed::UnknownGroup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_a_failure_of_a_group_this_hub_does_not_know() {
    through_api(Malformed::UnknownGroup).await;
}

/// A ReplicationNode with a value the operator's types do not know (a stage "Bogus", which only a CRD
/// that checks less lets through) is refused alone, counted as `undecodable`: the cluster's other nodes
/// are still read — its volumes resolve, its failure freezes the group — where one such node used to fail
/// the list of every node of the cluster (no resolution, no path 1, logged only at DEBUG).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_a_replication_node_that_does_not_decode_alone() {
    let (_server, hub) = cluster().await;
    schema_checking_nothing(&hub).await;
    let nodes = lockstep_operator::clusters::replication_nodes(hub.clone());
    let params = PatchParams::apply("test-sidecar").force();
    let object = json!({"apiVersion": "lockstep.dev/v1alpha1", "kind": "ReplicationNode",
        "metadata": {"name": "e9"}, "spec": {"nodeName": "e9", "cluster": "east"}});
    nodes
        .patch("e9", &params, &Patch::Apply(&object))
        .await
        .unwrap();
    let status = json!({"apiVersion": "lockstep.dev/v1alpha1", "kind": "ReplicationNode",
        "status": {"enforced": [{"groupUid": "any", "epoch": 0, "stage": "Bogus",
        "volumeHandles": []}]}});
    nodes
        .patch_status("e9", &params, &Patch::Apply(&status))
        .await
        .unwrap();
    // Listed before the operator starts: its first list of the cluster's nodes holds e9.
    let (operator, uid) = world(&hub).await;
    eventually("e9 counted as undecodable", || async {
        (refused(&operator, "api", "undecodable") >= 1).then_some(())
    })
    .await;
    freezes_through_api(
        &hub,
        &uid,
        "e1's failure freezes the group beside the undecodable e9",
    )
    .await;
    operator.shutdown().await;
}

/// An acknowledgement or a volume state with the stage or the replication state unset: over gRPC (where
/// they are numbers) refused by the validator; in a ReplicationNode (where they are enums) refused by the
/// API server. Either way nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refuses_an_unset_stage_or_replication_state() {
    let (_server, hub) = cluster().await;
    let (operator, uid) = world(&hub).await;
    let mut control = ControlClient::connect(format!("http://{}", operator.grpc_addr))
        .await
        .unwrap();
    let e1 = Some(NodeIdentity {
        cluster: "east".into(),
        node: "e1".into(),
    });
    let unset_stage = control
        .ack(AckRequest {
            node: e1.clone(),
            enforced: Some(pb::GroupEpoch {
                group_uid: uid.clone(),
                epoch: 0,
                stage: pb::Stage::Unspecified.into(),
            }),
            volume_handles: vec!["vol-wal".into()],
            fail_safe: false,
        })
        .await
        .unwrap_err();
    assert_eq!(unset_stage.code(), Code::InvalidArgument, "{unset_stage:?}");
    let unset_state = control
        .report(ReportRequest {
            node: e1,
            failures: vec![failure(&(uid, "vol-wal".into(), 0))],
            states: vec![pb::VolumeReplication {
                volume_handle: "vol-wal".into(),
                group_uid: String::new(),
                state: pb::ReplicationState::Unspecified.into(),
                epoch: 0,
                stage: pb::Stage::Resume.into(),
            }],
            ..ReportRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unset_state.code(), Code::InvalidArgument, "{unset_state:?}");
    assert!(refused(&operator, "grpc", "stage_unspecified") >= 1);
    assert!(refused(&operator, "grpc", "state_unspecified") >= 1);
    assert_eq!(epoch_and_trigger(&hub).await, (0, false));
    operator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_an_unset_stage_or_replication_state() {
    let (_server, hub) = cluster().await;
    let (operator, uid) = world(&hub).await;
    let unset_stage = json!({"enforced": [{"groupUid": uid, "epoch": 0, "stage": "Unspecified",
        "volumeHandles": ["vol-wal"]}]});
    let unset_state = json!({"volumes": [{"volumeHandle": "vol-wal", "state": "Unspecified",
        "epoch": 0}], "volumeCount": 1, "failures": [{"volumeHandle": "vol-wal", "groupUid": uid,
        "epochSeen": 0, "sequence": 1, "error": "link cut", "since": "2027-01-15T08:00:00Z"}],
        "failureCount": 1});
    for status in [unset_stage, unset_state] {
        match write_node(&hub, "e1", status).await {
            Err(kube::Error::Api(response)) => assert_eq!(response.code, 422, "{response:?}"),
            other => panic!("an unset stage or state written: {other:?}"),
        }
    }
    assert_eq!(epoch_and_trigger(&hub).await, (0, false));
    operator.shutdown().await;
}
