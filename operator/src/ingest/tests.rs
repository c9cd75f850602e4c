//! Tests of the one validator: the same input refused for the same reason, or turned into the same
//! events, whichever path brought it; and its limits equal to the ReplicationNode CRD's schema.

#![allow(clippy::unwrap_used)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResourceExt;
use lockstep_api::{
    proto::control::v1::{self as pb, AckRequest, ReportRequest},
    v1alpha1::{
        CopyFailureReport, Enforcement, NodeHoldTimeout, NodeVolume, ReplicationNode,
        ReplicationNodeSpec, ReplicationNodeStatus,
    },
};

use super::*;

const UID: &str = "0b6c3f0e-uid";

fn since() -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap())
}

/// One report, written both ways: a gRPC `Report` and `Ack` from `edge/edge-1`, and the same in
/// ReplicationNode `edge-1`'s status.
struct Both {
    failure: (String, String, u64),
    hold: (String, String, u64, u64),
    ack: (String, u64, Stage, Vec<String>),
    node: String,
}

impl Default for Both {
    fn default() -> Self {
        Self {
            failure: (UID.into(), "vol-wal".into(), 1),
            hold: (UID.into(), "vol-data".into(), 1, 3),
            ack: (UID.into(), 1, Stage::Freeze, vec!["vol-wal".into()]),
            node: "edge-1".into(),
        }
    }
}

impl Both {
    /// The gRPC report and acknowledgement, in the shared form (as one).
    fn grpc(&self) -> Sent {
        let node = ("edge".to_owned(), self.node.clone());
        let mut sent = grpc::report(
            &node,
            &ReportRequest {
                node: None,
                failures: vec![pb::CopyFailure {
                    group_uid: self.failure.0.clone(),
                    volume_handle: self.failure.1.clone(),
                    epoch_seen: self.failure.2,
                    sequence: 1,
                    error: "link cut".into(),
                    since_unix_ms: 0,
                }],
                volumes: vec![],
                hold_timeouts: vec![pb::HoldTimeout {
                    group_uid: self.hold.0.clone(),
                    volume_handle: self.hold.1.clone(),
                    epoch: self.hold.2,
                    failed_writes: self.hold.3,
                    since_unix_ms: since().0.as_millisecond(),
                }],
                states: vec![],
            },
        );
        sent.acks = grpc::ack(
            &node,
            &AckRequest {
                node: None,
                enforced: Some(pb::GroupEpoch {
                    group_uid: self.ack.0.clone(),
                    epoch: self.ack.1,
                    stage: pb::Stage::from(self.ack.2).into(),
                }),
                volume_handles: self.ack.3.clone(),
                fail_safe: false,
            },
        )
        .acks;
        sent
    }

    /// The same in a ReplicationNode's status, in the shared form.
    fn api(&self) -> Sent {
        let mut node = ReplicationNode::new(
            &self.node,
            ReplicationNodeSpec {
                node_name: self.node.clone(),
                cluster: "edge".into(),
            },
        );
        node.status = Some(ReplicationNodeStatus {
            volumes: vec![NodeVolume {
                volume_handle: self.hold.1.clone(),
                pvc: None,
                group_uid: Some(self.hold.0.clone()),
                state: VolumeState::Held,
                epoch: self.hold.2,
                stage: None,
                hold_timeout: Some(NodeHoldTimeout {
                    epoch: self.hold.2,
                    failed_writes: self.hold.3,
                    since: since(),
                }),
            }],
            volume_count: 1,
            failures: vec![CopyFailureReport {
                volume_handle: self.failure.1.clone(),
                group_uid: self.failure.0.clone(),
                epoch_seen: self.failure.2,
                sequence: 1,
                error: "link cut".into(),
                since: since(),
            }],
            failure_count: 1,
            enforced: vec![Enforcement {
                group_uid: self.ack.0.clone(),
                epoch: self.ack.1,
                stage: self.ack.2,
                volume_handles: self.ack.3.clone(),
                fail_safe: false,
                at: None,
            }],
            conditions: vec![],
        });
        api::sent("edge", &node).unwrap()
    }

    /// Both checked: they must agree (refused for the same reason, or the same events but for the path).
    fn checked(&self) -> Result<NodeReport, Refusal> {
        let (grpc, api) = (check(self.grpc()), check(self.api()));
        match (&grpc, &api) {
            (Err(grpc), Err(api)) => assert_eq!(grpc, api, "refused alike"),
            (Ok(grpc), Ok(api)) => {
                let mut api = api.clone();
                api.path = Path::Grpc;
                for event in api.events.values_mut().flatten() {
                    match event {
                        Event::Report(report) => report.path = Path::Grpc,
                        Event::HoldTimedOut(held) => held.path = Path::Grpc,
                        Event::Ack(ack) => ack.path = Path::Grpc,
                        Event::Seen { .. } | Event::Evaluate => {}
                    }
                }
                assert_eq!(*grpc, api, "the same events");
            }
            _ => panic!("the paths disagree: gRPC {grpc:?}, API {api:?}"),
        }
        grpc
    }
}

fn reason(both: Both) -> &'static str {
    both.checked().unwrap_err().reason()
}

#[test]
fn a_well_formed_report_becomes_the_same_events_on_both_paths() {
    let report = Both::default().checked().unwrap();
    assert_eq!(report.node, ("edge".to_owned(), "edge-1".to_owned()));
    let kinds: Vec<&str> = report.events[UID]
        .iter()
        .map(|event| match event {
            Event::Report(_) => "report",
            Event::HoldTimedOut(_) => "hold timeout",
            Event::Ack(_) => "ack",
            Event::Seen { .. } | Event::Evaluate => "other",
        })
        .collect();
    assert_eq!(kinds, ["report", "hold timeout", "ack"]);
}

#[test]
fn every_malformed_part_is_refused_for_the_same_reason_on_both_paths() {
    let long = |length: usize| "x".repeat(length);
    let cases: Vec<(&str, Both)> = vec![
        (
            "no_node",
            Both {
                node: String::new(),
                ..Both::default()
            },
        ),
        (
            "name_too_long",
            Both {
                node: long(MAX_NODE_NAME + 1),
                ..Both::default()
            },
        ),
        (
            "no_group_uid",
            Both {
                failure: (String::new(), "vol-wal".into(), 1),
                ..Both::default()
            },
        ),
        (
            "group_uid_too_long",
            Both {
                ack: (long(MAX_GROUP_UID + 1), 1, Stage::Freeze, vec![]),
                ..Both::default()
            },
        ),
        (
            "no_volume_handle",
            Both {
                hold: (UID.into(), String::new(), 1, 3),
                ..Both::default()
            },
        ),
        (
            "volume_handle_too_long",
            Both {
                ack: (
                    UID.into(),
                    1,
                    Stage::Freeze,
                    vec![long(MAX_VOLUME_HANDLE + 1)],
                ),
                ..Both::default()
            },
        ),
        (
            "epoch_beyond_max",
            Both {
                failure: (UID.into(), "vol-wal".into(), MAX_EPOCH + 1),
                ..Both::default()
            },
        ),
        (
            "no_failed_write",
            Both {
                hold: (UID.into(), "vol-data".into(), 1, 0),
                ..Both::default()
            },
        ),
        (
            "too_many",
            Both {
                ack: (
                    UID.into(),
                    1,
                    Stage::Freeze,
                    vec!["vol-wal".into(); MAX_ACK_VOLUMES + 1],
                ),
                ..Both::default()
            },
        ),
    ];
    for (expected, both) in cases {
        assert_eq!(reason(both), expected);
    }
    // At the limits, accepted.
    Both {
        node: long(MAX_NODE_NAME),
        failure: (long(MAX_GROUP_UID), long(MAX_VOLUME_HANDLE), MAX_EPOCH),
        ack: (
            UID.into(),
            MAX_EPOCH,
            Stage::Resume,
            vec!["vol-wal".into(); MAX_ACK_VOLUMES],
        ),
        ..Both::default()
    }
    .checked()
    .unwrap();
}

#[test]
fn what_only_grpc_can_leave_unset_is_refused() {
    let node = ("edge".to_owned(), "edge-1".to_owned());
    let unset_stage = grpc::ack(
        &node,
        &AckRequest {
            node: None,
            enforced: Some(pb::GroupEpoch {
                group_uid: UID.into(),
                epoch: 1,
                stage: pb::Stage::Unspecified.into(),
            }),
            volume_handles: vec![],
            fail_safe: false,
        },
    );
    assert_eq!(
        check(unset_stage).unwrap_err().reason(),
        "stage_unspecified"
    );
    let no_point = grpc::ack(&node, &AckRequest::default());
    assert_eq!(check(no_point).unwrap_err().reason(), "no_group_uid");
    let state = |state: pb::ReplicationState, stage: pb::Stage| ReportRequest {
        states: vec![pb::VolumeReplication {
            volume_handle: "vol-wal".into(),
            group_uid: UID.into(),
            state: state.into(),
            epoch: 1,
            stage: stage.into(),
        }],
        ..ReportRequest::default()
    };
    let unset_state = state(pb::ReplicationState::Unspecified, pb::Stage::Freeze);
    assert_eq!(
        check(grpc::report(&node, &unset_state))
            .unwrap_err()
            .reason(),
        "state_unspecified"
    );
    let unset_stage = state(pb::ReplicationState::Held, pb::Stage::Unspecified);
    assert_eq!(
        check(grpc::report(&node, &unset_stage))
            .unwrap_err()
            .reason(),
        "stage_unspecified"
    );
    let held = check(grpc::report(
        &node,
        &state(pb::ReplicationState::Held, pb::Stage::Freeze),
    ))
    .unwrap();
    assert_eq!(
        held.states["vol-wal"],
        (VolumeState::Held, 1, Stage::Freeze)
    );
}

#[test]
fn a_long_copy_error_is_cut_not_refused() {
    let mut sent = Both::default().grpc();
    sent.failures[0].error = "e".repeat(64 * 1024);
    let report = check(sent).unwrap();
    let Event::Report(failure) = &report.events[UID][0] else {
        panic!("a report first")
    };
    assert!(failure.message.len() <= lockstep_api::domain::MESSAGE_LIMIT);
}

/// The `maxLength`, `maxItems`, `minimum` or `maximum` at `pointer` in the ReplicationNode CRD's schema
/// (bounds of numbers are written as floats).
fn schema_limit(pointer: &str, key: &str) -> f64 {
    let crd = serde_json::to_value(ReplicationNode::crd()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    schema
        .pointer(pointer)
        .and_then(|at| at[key].as_f64())
        .unwrap_or_else(|| panic!("no {key} at {pointer}"))
}

#[test]
fn the_limits_are_the_replication_node_schemas() {
    let limit = |limit: usize| limit as f64;
    let status = "/properties/status/properties";
    for (pointer, key, expected) in [
        (
            "/properties/spec/properties/nodeName".to_owned(),
            "maxLength",
            limit(MAX_NODE_NAME),
        ),
        (
            "/properties/spec/properties/cluster".to_owned(),
            "maxLength",
            limit(MAX_CLUSTER_NAME),
        ),
        (
            format!("{status}/failures"),
            "maxItems",
            limit(MAX_FAILURES),
        ),
        (format!("{status}/volumes"), "maxItems", limit(MAX_VOLUMES)),
        (format!("{status}/enforced"), "maxItems", limit(MAX_ACKS)),
        (
            format!("{status}/enforced/items/properties/volumeHandles"),
            "maxItems",
            limit(MAX_ACK_VOLUMES),
        ),
        (
            format!("{status}/enforced/items/properties/volumeHandles/items"),
            "maxLength",
            limit(MAX_VOLUME_HANDLE),
        ),
        (
            format!("{status}/failures/items/properties/volumeHandle"),
            "maxLength",
            limit(MAX_VOLUME_HANDLE),
        ),
        (
            format!("{status}/failures/items/properties/groupUid"),
            "maxLength",
            limit(MAX_GROUP_UID),
        ),
        (
            format!("{status}/enforced/items/properties/groupUid"),
            "maxLength",
            limit(MAX_GROUP_UID),
        ),
        (
            format!("{status}/failures/items/properties/epochSeen"),
            "maximum",
            MAX_EPOCH as f64,
        ),
        (
            format!("{status}/volumes/items/properties/holdTimeout/properties/failedWrites"),
            "minimum",
            1.0,
        ),
    ] {
        assert!(
            (schema_limit(&pointer, key) - expected).abs() < 0.5,
            "{pointer} {key}: the schema says {}, the validator {expected}",
            schema_limit(&pointer, key)
        );
    }
}
