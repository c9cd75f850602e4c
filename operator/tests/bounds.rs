//! Oversized input never blocks a group (issue 21 item 2), against a real test API server over HTTP, the
//! operator and a real gRPC client playing a gRPC-only cluster's sidecar: Control messages over 64 KiB
//! are answered RESOURCE_EXHAUSTED, a long copy error is cut to 1 KiB before it reaches the status, a
//! status write the API server refuses drops its events with a Warning Event and a metric instead of
//! blocking every later decision, and a group whose selectors resolve more volumes than the status
//! can list is reported Degraded and says why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{Api, Client, api::PostParams};
use lockstep_api::{
    domain::{ClusterPaths, Phase, Policy, condition},
    proto::control::v1::{
        self as pb, NodeIdentity, ReportRequest, SubscribeRequest, control_client::ControlClient,
    },
    v1alpha1::{
        ConsistencyGroup, ConsistencyGroupSpec, GroupMember, MemberCluster, MemberClusterSpec,
    },
};
use lockstep_operator::{Operator, Options};
use lockstep_testapi::TestApiServer;
use serde_json::json;
use tonic::transport::Channel;

mod common;

use common::{cluster, eventually, options, volume};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const KIB: usize = 1024;

async fn member_cluster(hub: &Client, name: &str, paths: ClusterPaths, local: bool) {
    let spec = MemberClusterSpec {
        paths,
        local,
        kubeconfig_secret_ref: None,
        network: None,
        service_account_keys: None,
        volume_binding: Default::default(),
    };
    Api::<MemberCluster>::all(hub.clone())
        .create(&PostParams::default(), &MemberCluster::new(name, spec))
        .await
        .unwrap();
}

/// A hub (`east`, local) and a gRPC-only member cluster `edge`, and the operator.
async fn edge_world() -> (TestApiServer, Client, Operator) {
    let (server, hub) = cluster().await;
    member_cluster(&hub, "east", ClusterPaths::Both, true).await;
    member_cluster(&hub, "edge", ClusterPaths::GrpcOnly, false).await;
    let operator = Operator::start(hub.clone(), &options()).await.unwrap();
    (server, hub, operator)
}

fn edge_node() -> NodeIdentity {
    NodeIdentity {
        cluster: "edge".into(),
        node: "edge-1".into(),
    }
}

fn group_spec(members: Vec<GroupMember>) -> ConsistencyGroupSpec {
    ConsistencyGroupSpec {
        members,
        policy: Policy::FreezeAndStop,
        hold_timeout: "30s".into(),
        release: None,
        resync: None,
        freeze: None,
        failover: None,
    }
}

fn condition_of(group: &ConsistencyGroup, type_: &str) -> Option<(bool, String, String)> {
    let status = group.status.as_ref()?;
    let found = status.conditions.iter().find(|c| c.type_ == type_)?;
    Some((
        found.status == "True",
        found.reason.clone(),
        found.message.clone(),
    ))
}

/// The edge node's sidecar subscribes with the PVCs `pvcs` (volume handle `vol-<pvc>`), and the group
/// `edge-db` names them; returns the open stream (kept open: it carries the node's resolution) and the
/// group's UID once every member is resolved.
async fn edge_group(
    hub: &Client,
    control: &mut ControlClient<Channel>,
    pvcs: &[&str],
) -> (tonic::Streaming<pb::ControlMessage>, String) {
    let volumes = pvcs
        .iter()
        .map(|pvc| pb::ResolvedVolume {
            namespace: "orders".into(),
            pvc: (*pvc).into(),
            persistent_volume: format!("pv-{pvc}"),
            volume_handle: format!("vol-{pvc}"),
        })
        .collect();
    let stream = control
        .subscribe(SubscribeRequest {
            node: Some(edge_node()),
            volumes,
            seen: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let member = GroupMember {
        cluster: "edge".into(),
        namespace: "orders".into(),
        pvc_names: Some(pvcs.iter().map(|pvc| (*pvc).to_owned()).collect()),
        selector: None,
    };
    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("edge-db", group_spec(vec![member])),
        )
        .await
        .unwrap();
    let group = eventually("edge-db resolved", || {
        let groups = groups.clone();
        async move {
            let group = groups.get("edge-db").await.ok()?;
            let (resolved, _, _) = condition_of(&group, condition::MEMBERS_RESOLVED)?;
            resolved.then_some(group)
        }
    })
    .await;
    (stream, group.metadata.uid.clone().unwrap())
}

fn failure(uid: &str, pvc: &str, error: String) -> pb::CopyFailure {
    pb::CopyFailure {
        group_uid: uid.into(),
        volume_handle: format!("vol-{pvc}"),
        epoch_seen: 0,
        sequence: 1,
        error,
        since_unix_ms: k8s_openapi::jiff::Timestamp::now().as_millisecond(),
    }
}

async fn report(
    control: &mut ControlClient<Channel>,
    failures: Vec<pb::CopyFailure>,
) -> Result<(), tonic::Status> {
    control
        .report(ReportRequest {
            node: Some(edge_node()),
            failures,
            volumes: vec![],
            hold_timeouts: vec![],
            states: vec![],
        })
        .await
        .map(|_| ())
}

/// The group once its status shows epoch 1.
async fn at_epoch_1(hub: &Client) -> ConsistencyGroup {
    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    eventually("edge-db persisted at epoch 1", || {
        let groups = groups.clone();
        async move {
            let group = groups.get("edge-db").await.ok()?;
            (group.status.as_ref()?.epoch == 1).then_some(group)
        }
    })
    .await
}

/// A plain HTTP/1.0 GET on the operator's HTTP listener; `None` on any failure.
async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: operator\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await.ok()?;
    Some(body)
}

/// The Events recorded about an object (by name): (type, reason, note).
async fn events_about(client: &Client, name: &str) -> Vec<(String, String, String)> {
    Api::<k8s_openapi::api::events::v1::Event>::all(client.clone())
        .list(&Default::default())
        .await
        .map(|list| {
            list.items
                .into_iter()
                .filter(|event| {
                    event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                })
                .map(|event| {
                    (
                        event.type_.unwrap_or_default(),
                        event.reason.unwrap_or_default(),
                        event.note.unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_messages_over_64_kib_are_refused_and_a_long_copy_error_is_cut_to_1_kib()
-> TestResult {
    let (_server, hub, operator) = edge_world().await;
    let mut control = ControlClient::connect(format!("http://{}", operator.grpc_addr)).await?;
    let (_stream, uid) = edge_group(&hub, &mut control, &["wal", "data"]).await;

    for (what, size) in [("2 MiB", 2 * KIB * KIB), ("100 KiB", 100 * KIB)] {
        let refused = report(&mut control, vec![failure(&uid, "wal", "x".repeat(size))])
            .await
            .expect_err("an oversized Report is refused");
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "a {what} Report: {refused:?}"
        );
    }
    let huge_subscription = control
        .subscribe(SubscribeRequest {
            node: Some(NodeIdentity {
                cluster: "edge".into(),
                node: "n".repeat(100 * KIB),
            }),
            volumes: vec![],
            seen: vec![],
        })
        .await
        .expect_err("an oversized Subscribe is refused");
    assert_eq!(
        huge_subscription.code(),
        tonic::Code::ResourceExhausted,
        "{huge_subscription:?}"
    );

    // Under the message limit but far over what a status may hold: the group still freezes, and the
    // error the status shows is cut to 1 KiB, saying so.
    let long_error = format!("copy to the secondary failed: {}", "e".repeat(48 * KIB));
    report(&mut control, vec![failure(&uid, "wal", long_error)]).await?;
    let group = at_epoch_1(&hub).await;
    let message = group.status.unwrap().trigger.unwrap().message.unwrap();
    assert!(message.len() <= KIB, "{} bytes", message.len());
    assert!(
        message.starts_with("copy to the secondary failed: eee"),
        "{message}"
    );
    assert!(message.contains("[truncated"), "{message}");
    operator.shutdown().await;
    Ok(())
}

/// Narrows `status.trigger.message` of the ConsistencyGroup CRD on the API server to `max` characters,
/// so that a status the operator writes is refused as invalid.
async fn narrow_trigger_message(hub: &Client, max: i64) {
    let crds = Api::<CustomResourceDefinition>::all(hub.clone());
    let name = "consistencygroups.lockstep.dev";
    let mut crd = serde_json::to_value(crds.get(name).await.unwrap()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        ["trigger"]["properties"]["message"]["maxLength"] = json!(max);
    let crd: CustomResourceDefinition = serde_json::from_value(crd).unwrap();
    crds.replace(name, &PostParams::default(), &crd)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_write_the_api_server_refuses_drops_its_events_with_a_warning_and_the_group_moves_on()
-> TestResult {
    let (_server, hub, operator) = edge_world().await;
    let mut control = ControlClient::connect(format!("http://{}", operator.grpc_addr)).await?;
    let (_stream, uid) = edge_group(&hub, &mut control, &["wal", "data"]).await;
    narrow_trigger_message(&hub, 16).await;

    // The status this report decides is refused by the API server (422): the operator drops the event,
    // answers the sender that it was not applied, and says so in a Warning Event on the group and a
    // metric.
    let refused_error = "the link to the secondary was cut by a test".to_owned();
    let answer = report(&mut control, vec![failure(&uid, "wal", refused_error)])
        .await
        .expect_err("the sender is told its report was not applied");
    assert_eq!(answer.code(), tonic::Code::FailedPrecondition, "{answer:?}");
    let (_, reason, note) = eventually("a Warning Event on the group", || {
        let hub = hub.clone();
        async move {
            events_about(&hub, "edge-db")
                .await
                .into_iter()
                .find(|(type_, reason, _)| type_ == "Warning" && reason == "StatusRefused")
        }
    })
    .await;
    assert!(note.contains("refused"), "{reason}: {note}");
    let metrics = eventually("the dropped events counted", || async {
        let metrics = http_get(operator.http_addr, "/metrics").await?;
        metrics
            .lines()
            .any(|line| {
                line.starts_with("lockstep_events_dropped_total{group=\"edge-db\"}")
                    && !line.ends_with(" 0")
            })
            .then_some(metrics)
    })
    .await;
    assert!(metrics.contains("lockstep_events_dropped_total"));

    // A later report the status can hold is decided and persisted: the refused one is not retried ahead
    // of it forever.
    report(&mut control, vec![failure(&uid, "data", "cut".to_owned())]).await?;
    let group = at_epoch_1(&hub).await;
    let trigger = group.status.unwrap().trigger.unwrap();
    assert_eq!(trigger.message.as_deref(), Some("cut"));
    assert_eq!(trigger.volume_handle.as_deref(), Some("vol-data"));
    operator.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_selector_resolves_more_volumes_than_the_operator_holds_is_degraded_and_says_why()
-> TestResult {
    let (_server, hub) = cluster().await;
    member_cluster(&hub, "east", ClusterPaths::Both, true).await;
    let operator = Operator::start(
        hub.clone(),
        &Options {
            max_group_volumes: 1024,
            ..options()
        },
    )
    .await?;
    // 1 025 bound claims labelled app=big in the hub: one more than this operator lets a group hold.
    let claims: Vec<String> = (0..1025).map(|i| format!("big-{i:04}")).collect();
    for chunk in claims.chunks(64) {
        futures::future::join_all(chunk.iter().map(|pvc| volume(&hub, pvc, "big", pvc, "e1")))
            .await;
    }
    let member = GroupMember {
        cluster: "east".into(),
        namespace: "orders".into(),
        pvc_names: None,
        selector: Some(LabelSelector {
            match_labels: Some([("app".to_owned(), "big".to_owned())].into()),
            match_expressions: None,
        }),
    };
    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("big", group_spec(vec![member])),
        )
        .await?;
    let group = eventually("the big group reported Degraded", || {
        let groups = groups.clone();
        async move {
            let group = groups.get("big").await.ok()?;
            (group.status.as_ref()?.phase == Some(Phase::Degraded)).then_some(group)
        }
    })
    .await;
    let (resolved, reason, message) = condition_of(&group, condition::MEMBERS_RESOLVED).unwrap();
    assert!(!resolved);
    assert_eq!(reason, "TooManyVolumes");
    assert!(
        message.contains("1025") && message.contains("1024"),
        "{message}"
    );
    assert_eq!(group.status.unwrap().member_count, 1024);

    operator.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_gets_at_most_its_limit_of_grpc_sessions() -> TestResult {
    let (_server, hub) = cluster().await;
    member_cluster(&hub, "edge", ClusterPaths::GrpcOnly, false).await;
    let options = Options {
        max_sessions_per_cluster: 2,
        max_group_volumes: lockstep_operator::DEFAULT_MAX_GROUP_VOLUMES,
        control_security: lockstep_operator::ControlSecurity::insecure_plaintext(),
        ..options()
    };
    let operator = Operator::start(hub.clone(), &options).await?;
    let mut control = ControlClient::connect(format!("http://{}", operator.grpc_addr)).await?;
    let subscribe = |node: &str| SubscribeRequest {
        node: Some(NodeIdentity {
            cluster: "edge".into(),
            node: node.into(),
        }),
        volumes: vec![],
        seen: vec![],
    };
    let _first = control.subscribe(subscribe("edge-1")).await?;
    let _second = control.subscribe(subscribe("edge-2")).await?;
    let refused = control
        .subscribe(subscribe("edge-3"))
        .await
        .expect_err("a third node of edge is refused");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    // A node that reconnects replaces its own session: not refused.
    let _again = control.subscribe(subscribe("edge-1")).await?;
    operator.shutdown().await;
    Ok(())
}

/// How many decision batches held more than `events` events, from the operator's metrics.
async fn batches_larger_than(operator: &Operator, events: u32) -> u64 {
    let metrics = http_get(operator.http_addr, "/metrics").await.unwrap();
    let value = |prefix: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .and_then(|value| value.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    value("lockstep_decision_batch_events_count ")
        - value(&format!(
            "lockstep_decision_batch_events_bucket{{le=\"{events}.0\"}} "
        ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failures_of_one_report_are_decided_as_one_batch() -> TestResult {
    let (_server, hub, operator) = edge_world().await;
    let mut control = ControlClient::connect(format!("http://{}", operator.grpc_addr)).await?;
    let pvcs = ["a", "b", "c", "d", "e", "f", "g", "h"];
    let (_stream, uid) = edge_group(&hub, &mut control, &pvcs).await;
    assert_eq!(batches_larger_than(&operator, 4).await, 0);
    let failures = pvcs
        .iter()
        .map(|pvc| failure(&uid, pvc, format!("{pvc}: link cut")))
        .collect();
    report(&mut control, failures).await?;
    at_epoch_1(&hub).await;
    assert!(
        batches_larger_than(&operator, 4).await >= 1,
        "the report's eight failures were decided together"
    );
    operator.shutdown().await;
    Ok(())
}
