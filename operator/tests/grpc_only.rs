//! A gRPC-only member cluster (its sidecars dial out; the hub never reads its API server) against the
//! operator over real gRPC and a test API server as the hub: what the operator learnt from the sidecars
//! survives an operator restart, every answer says whether it was applied, and membership changes reach
//! the connected sidecars.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use kube::{Api, Client, api::PostParams};
use lockstep_api::{
    domain::{ClusterPaths, Policy, Stage, condition},
    proto::control::v1::{
        self as pb, AckRequest, NodeIdentity, ReportRequest, SubscribeRequest,
        control_client::ControlClient, control_message::Kind,
    },
    v1alpha1::{
        ConsistencyGroup, ConsistencyGroupSpec, GroupMember, MemberCluster, MemberClusterSpec,
    },
};
use lockstep_operator::Operator;
use tokio_stream::StreamExt;

mod common;

use common::{cluster, eventually, next_directive, options};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The hub (a test API server) with one GrpcOnly member cluster, `edge`.
async fn hub_with_edge() -> (lockstep_testapi::TestApiServer, Client) {
    let (server, hub) = cluster().await;
    let edge = MemberClusterSpec {
        paths: ClusterPaths::GrpcOnly,
        local: false,
        kubeconfig_secret_ref: None,
        network: Some("lte".into()),
        service_account_keys: None,
        volume_binding: Default::default(),
    };
    Api::<MemberCluster>::all(hub.clone())
        .create(&PostParams::default(), &MemberCluster::new("edge", edge))
        .await
        .unwrap();
    (server, hub)
}

fn edge_group(pvcs: &[&str], policy: Policy) -> ConsistencyGroupSpec {
    ConsistencyGroupSpec {
        members: vec![GroupMember {
            cluster: "edge".into(),
            namespace: "orders".into(),
            pvc_names: Some(pvcs.iter().map(|pvc| (*pvc).to_owned()).collect()),
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

fn edge_node(node: &str) -> NodeIdentity {
    NodeIdentity {
        cluster: "edge".into(),
        node: node.into(),
    }
}

/// What an edge sidecar resolved: `orders/<pvc>` on volume `vol-edge-<pvc>`.
fn resolved_volume(pvc: &str) -> pb::ResolvedVolume {
    pb::ResolvedVolume {
        namespace: "orders".into(),
        pvc: pvc.into(),
        persistent_volume: format!("pv-edge-{pvc}"),
        volume_handle: format!("vol-edge-{pvc}"),
    }
}

/// A sidecar stand-in on `node` subscribes, saying it serves `pvcs`.
async fn subscribe(
    operator: &Operator,
    node: &str,
    pvcs: &[&str],
) -> (
    ControlClient<tonic::transport::Channel>,
    tonic::Streaming<pb::ControlMessage>,
) {
    let mut control = ControlClient::connect(format!("http://{}", operator.grpc_addr))
        .await
        .unwrap();
    let stream = control
        .subscribe(SubscribeRequest {
            node: Some(edge_node(node)),
            volumes: pvcs.iter().map(|pvc| resolved_volume(pvc)).collect(),
            seen: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    (control, stream)
}

fn condition_of(group: &ConsistencyGroup, type_: &str) -> Option<(bool, String)> {
    let status = group.status.as_ref()?;
    let found = status.conditions.iter().find(|c| c.type_ == type_)?;
    Some((found.status == "True", found.message.clone()))
}

async fn group_where(
    hub: &Client,
    what: &str,
    check: impl Fn(&ConsistencyGroup) -> bool,
) -> ConsistencyGroup {
    eventually(what, || {
        let (hub, check) = (hub.clone(), &check);
        async move {
            let group = common::get_with_volumes(&hub, "edge-db").await?;
            check(&group).then_some(group)
        }
    })
    .await
}

fn acknowledged(group: &ConsistencyGroup, pvc: &str) -> Option<(u64, Stage)> {
    let member = group
        .status
        .as_ref()?
        .members
        .iter()
        .find(|member| member.pvc == pvc)?;
    member
        .acknowledged
        .as_ref()
        .map(|ack| (ack.epoch, ack.stage))
}

fn ack(node: &str, point: &pb::GroupEpoch, pvcs: &[&str]) -> AckRequest {
    AckRequest {
        node: Some(edge_node(node)),
        enforced: Some(point.clone()),
        volume_handles: pvcs.iter().map(|pvc| format!("vol-edge-{pvc}")).collect(),
        fail_safe: false,
    }
}

/// The freeze of `edge-db` started by a copy failure edge-1 reports, and its directive.
/// Sends an acknowledgement until the operator answers that it applied it (as a sidecar retries one the
/// operator could not take yet: a restarted operator resolves the members first).
async fn ack_until_applied(
    control: &ControlClient<tonic::transport::Channel>,
    request: AckRequest,
) {
    eventually("the acknowledgement applied", || {
        let (mut control, request) = (control.clone(), request.clone());
        async move {
            let answer = control.ack(request).await.ok()?.into_inner();
            answer.applied.then_some(())
        }
    })
    .await;
}

async fn freeze_from_edge_1(
    control: &mut ControlClient<tonic::transport::Channel>,
    stream: &mut tonic::Streaming<pb::ControlMessage>,
    uid: &str,
) -> pb::GroupEpoch {
    let failure = pb::CopyFailure {
        group_uid: uid.to_owned(),
        volume_handle: "vol-edge-wal".into(),
        epoch_seen: 0,
        sequence: 7,
        error: "link down".into(),
        since_unix_ms: 0,
    };
    control
        .report(ReportRequest {
            node: Some(edge_node("edge-1")),
            failures: vec![failure],
            volumes: vec![resolved_volume("wal")],
            hold_timeouts: vec![],
            states: vec![],
        })
        .await
        .unwrap();
    next_directive(stream, |target| target.stage == pb::Stage::Freeze as i32).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_only_members_acknowledgement_survives_an_operator_restart() -> TestResult {
    let (_server, hub) = hub_with_edge().await;
    let operator = Operator::start(hub.clone(), &options()).await?;
    let (mut edge_1, mut edge_1_stream) = subscribe(&operator, "edge-1", &["wal"]).await;
    let (_edge_2, _edge_2_stream) = subscribe(&operator, "edge-2", &["data"]).await;
    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    let spec = edge_group(&["wal", "data"], Policy::FreezeAndStop);
    groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("edge-db", spec),
        )
        .await?;
    let group = group_where(&hub, "edge-db resolved", |group| {
        condition_of(group, condition::MEMBERS_RESOLVED).is_some_and(|(resolved, _)| resolved)
    })
    .await;
    let uid = group.metadata.uid.clone().unwrap();

    // edge-1 fails a copy, freezes and acknowledges; edge-2 has not acknowledged yet.
    let freeze = freeze_from_edge_1(&mut edge_1, &mut edge_1_stream, &uid).await;
    assert_eq!(freeze.epoch, 1);
    edge_1.ack(ack("edge-1", &freeze, &["wal"])).await?;
    let engine = operator.engine().clone();
    eventually("wal acknowledged at 1 in the operator's record", || {
        let (engine, uid) = (engine.clone(), uid.clone());
        async move {
            let status = engine.last_status(&uid).await?;
            let wal = status.members.iter().find(|member| member.pvc == "wal")?;
            let ack = wal.acknowledged.as_ref()?;
            ((ack.epoch, ack.stage) == (1, Stage::Freeze)).then_some(())
        }
    })
    .await;

    // The operator is killed; a new one starts. It rebuilds the members from the shards, the decision
    // and each node's acknowledgement of all its volumes from the status: wal's stands although edge-1
    // does not come back.
    operator.abort();
    drop((edge_1, edge_1_stream));
    let operator = Operator::start(hub.clone(), &options()).await?;
    let restarted = eventually("the new operator's record", || {
        let (operator, hub) = (&operator, hub.clone());
        async move {
            let group = common::as_decided(operator, &hub, "edge-db").await?;
            (group.status.as_ref()?.members.len() == 2).then_some(group)
        }
    })
    .await;
    assert_eq!(
        acknowledged(&restarted, "wal"),
        Some((1, Stage::Freeze)),
        "{:?}",
        restarted.status
    );

    // Only edge-2 comes back and acknowledges: with wal's acknowledgement kept, the group is frozen.
    let (edge_2, _edge_2_stream) = subscribe(&operator, "edge-2", &["data"]).await;
    ack_until_applied(&edge_2, ack("edge-2", &freeze, &["data"])).await;
    let frozen = group_where(&hub, "edge-db frozen at epoch 1", |group| {
        condition_of(group, condition::FROZEN).is_some_and(|(frozen, _)| frozen)
    })
    .await;
    assert_eq!(frozen.position(), (1, Stage::Freeze));
    let frozen = common::status_with_volumes(&hub, "edge-db").await;
    assert_eq!(
        frozen
            .members
            .iter()
            .map(|member| (
                member.pvc.as_str(),
                member
                    .acknowledged
                    .as_ref()
                    .map(|ack| (ack.epoch, ack.stage))
            ))
            .collect::<Vec<_>>(),
        vec![
            ("data", Some((1, Stage::Freeze))),
            ("wal", Some((1, Stage::Freeze)))
        ],
        "the shards list both acknowledgements once the group is frozen"
    );
    operator.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_answer_says_whether_it_was_applied() -> TestResult {
    let (_server, hub) = hub_with_edge().await;
    let operator = Operator::start(hub.clone(), &options()).await?;
    let (mut edge_1, mut edge_1_stream) = subscribe(&operator, "edge-1", &["wal"]).await;
    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    let spec = edge_group(&["wal", "data"], Policy::FreezeAndStop);
    groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("edge-db", spec),
        )
        .await?;
    let group = group_where(&hub, "wal resolved", |group| {
        group.status.as_ref().is_some_and(|status| {
            status
                .members
                .iter()
                .any(|member| member.pvc == "wal" && member.volume_handle.is_some())
        })
    })
    .await;
    let uid = group.metadata.uid.clone().unwrap();

    // A group this hub does not know: NOT_FOUND, never OK.
    let stray = pb::GroupEpoch {
        group_uid: "no-such-group".into(),
        epoch: 1,
        stage: pb::Stage::Freeze as i32,
    };
    let refused = edge_1
        .ack(ack("edge-1", &stray, &["wal"]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");

    let freeze = freeze_from_edge_1(&mut edge_1, &mut edge_1_stream, &uid).await;
    // An answer that says "not applied" gives its reason, and the sidecar sends the acknowledgement
    // again until one says "applied" (the freeze's own status write may still be on its way).
    eventually("edge-1's acknowledgement applied", || {
        let (mut edge_1, freeze) = (edge_1.clone(), freeze.clone());
        async move {
            let answer = edge_1
                .ack(ack("edge-1", &freeze, &["wal"]))
                .await
                .ok()?
                .into_inner();
            assert!(answer.applied || !answer.reason.is_empty(), "{answer:?}");
            answer.applied.then_some(())
        }
    })
    .await;

    // data is served by edge-2, whose sidecar has not told the operator yet: not applied.
    // Keep edge-2's stream open for the rest of the test: a dropped stream closes its session, and a
    // session that is gone may be taken for a node that went away.
    let (mut edge_2, _edge_2_stream) = {
        let mut control = ControlClient::connect(format!("http://{}", operator.grpc_addr)).await?;
        let answer = control
            .ack(ack("edge-2", &freeze, &["data"]))
            .await?
            .into_inner();
        assert!(!answer.applied, "{answer:?}");
        assert!(!answer.reason.is_empty(), "{answer:?}");
        subscribe(&operator, "edge-2", &["data"]).await
    };
    // Once edge-2 subscribed with its volumes, the same acknowledgement is applied.
    eventually("edge-2's acknowledgement applied", || {
        let mut edge_2 = edge_2.clone();
        let freeze = freeze.clone();
        async move {
            let answer = edge_2.ack(ack("edge-2", &freeze, &["data"])).await.ok()?;
            answer.into_inner().applied.then_some(())
        }
    })
    .await;
    group_where(&hub, "edge-db frozen", |group| {
        condition_of(group, condition::FROZEN).is_some_and(|(frozen, _)| frozen)
    })
    .await;
    let frozen = common::status_with_volumes(&hub, "edge-db").await;
    let data = frozen.members.iter().find(|m| m.pvc == "data").unwrap();
    assert_eq!(
        data.acknowledged.as_ref().map(|ack| (ack.epoch, ack.stage)),
        Some((1, Stage::Freeze))
    );
    let _ = &mut edge_2;
    operator.shutdown().await;
    Ok(())
}

async fn next_membership(
    stream: &mut tonic::Streaming<pb::ControlMessage>,
    what: &str,
    want: impl Fn(&pb::Membership) -> bool,
) -> pb::Membership {
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(message) = stream.next().await {
            if let Some(Kind::Membership(membership)) = message.unwrap().kind
                && want(&membership)
            {
                return Some(membership);
            }
        }
        None
    })
    .await;
    found
        .unwrap_or_else(|_| panic!("no membership {what} within the deadline"))
        .expect("the stream stays open")
}

fn pvcs_of(membership: &pb::Membership, group: &str) -> Option<Vec<String>> {
    let group = membership
        .groups
        .iter()
        .find(|listed| listed.group_name == group)?;
    let mut pvcs: Vec<String> = group
        .volumes
        .iter()
        .map(|volume| volume.pvc.clone())
        .collect();
    pvcs.sort();
    pvcs.dedup();
    Some(pvcs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn groups_created_changed_and_deleted_after_a_sidecar_subscribed_reach_it() -> TestResult {
    let (_server, hub) = hub_with_edge().await;
    let operator = Operator::start(hub.clone(), &options()).await?;
    let (_edge_1, mut stream) = subscribe(&operator, "edge-1", &["wal"]).await;
    next_membership(&mut stream, "on subscribing", |membership| {
        membership.groups.is_empty()
    })
    .await;

    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("edge-db", edge_group(&["wal"], Policy::FreezeAndGo)),
        )
        .await?;
    let created = next_membership(&mut stream, "naming the new group", |membership| {
        pvcs_of(membership, "edge-db").is_some()
    })
    .await;
    assert_eq!(
        pvcs_of(&created, "edge-db").unwrap(),
        vec!["wal".to_owned()]
    );

    let spec = serde_json::json!({"spec": {"members": [{
        "cluster": "edge", "namespace": "orders", "pvcNames": ["wal", "data"]
    }]}});
    groups
        .patch(
            "edge-db",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&spec),
        )
        .await?;
    next_membership(&mut stream, "naming the added PVC", |membership| {
        pvcs_of(membership, "edge-db") == Some(vec!["data".to_owned(), "wal".to_owned()])
    })
    .await;

    groups
        .delete("edge-db", &kube::api::DeleteParams::default())
        .await?;
    next_membership(&mut stream, "without the deleted group", |membership| {
        membership.groups.is_empty()
    })
    .await;
    operator.shutdown().await;
    Ok(())
}

/// A sidecar takes a group missing from a membership as deleted and lets its volumes go, frozen or not
/// (seen on kube-apiserver: a frozen volume let go replicated writes that depended on held ones). An
/// operator that has just started has not listed the hub's groups, nor read their volumes back from the
/// shards: it must say nothing until it can name them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_operator_never_tells_a_sidecar_that_its_group_is_gone() -> TestResult {
    let (server, hub) = hub_with_edge().await;
    let operator = Operator::start(hub.clone(), &options()).await?;
    let edge_1 = subscribe(&operator, "edge-1", &["wal"]).await;
    let edge_2 = subscribe(&operator, "edge-2", &["data"]).await;
    Api::<ConsistencyGroup>::all(hub.clone())
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("edge-db", edge_group(&["wal", "data"], Policy::FreezeAndGo)),
        )
        .await?;
    group_where(&hub, "edge-db resolved", |group| {
        condition_of(group, condition::MEMBERS_RESOLVED).is_some_and(|(resolved, _)| resolved)
    })
    .await;
    operator.abort();
    drop((edge_1, edge_2));

    // The new operator's reads of the hub are slow: the sidecar subscribes before they are answered.
    server.faults().set_latency(Duration::from_millis(1500));
    let operator = Operator::start(hub.clone(), &options()).await?;
    let (_edge_1, mut stream) = subscribe(&operator, "edge-1", &["wal"]).await;
    let first = next_membership(&mut stream, "from the new operator", |_| true).await;
    server.faults().set_latency(Duration::ZERO);
    assert_eq!(
        pvcs_of(&first, "edge-db"),
        Some(vec!["data".to_owned(), "wal".to_owned()]),
        "the first membership the new operator sent: {first:?}"
    );
    operator.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_only_volumes_replication_state_reaches_the_group() -> TestResult {
    let (_server, hub) = hub_with_edge().await;
    let operator = Operator::start(hub.clone(), &options()).await?;
    let (mut edge_1, _stream) = subscribe(&operator, "edge-1", &["wal"]).await;
    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("edge-db", edge_group(&["wal"], Policy::FreezeAndGo)),
        )
        .await?;
    let group = group_where(&hub, "edge-db resolved", |group| {
        condition_of(group, condition::MEMBERS_RESOLVED).is_some_and(|(resolved, _)| resolved)
    })
    .await;
    let uid = group.metadata.uid.clone().unwrap();
    // The sidecar confirmed the volume at (0, Resume) and acknowledged it: resuming, as far as the
    // operator knows, until the node says it replicates (an API cluster's ReplicationNode says so).
    let resume = pb::GroupEpoch {
        group_uid: uid.clone(),
        epoch: 0,
        stage: pb::Stage::Resume as i32,
    };
    let answer = edge_1
        .ack(ack("edge-1", &resume, &["wal"]))
        .await?
        .into_inner();
    assert!(answer.applied, "{answer:?}");
    edge_1
        .report(ReportRequest {
            node: Some(edge_node("edge-1")),
            failures: vec![],
            volumes: vec![],
            hold_timeouts: vec![],
            states: vec![pb::VolumeReplication {
                volume_handle: "vol-edge-wal".into(),
                group_uid: uid.clone(),
                state: pb::ReplicationState::Replicating as i32,
                epoch: 0,
                stage: pb::Stage::Resume as i32,
            }],
        })
        .await?;
    let replicating = group_where(&hub, "wal replicating", |group| {
        group.status.as_ref().is_some_and(|status| {
            status.members.iter().any(|member| {
                member.pvc == "wal"
                    && member.state == Some(lockstep_api::domain::VolumeState::Replicating)
            })
        })
    })
    .await;
    assert_eq!(replicating.position(), (0, Stage::Resume));
    operator.shutdown().await;
    Ok(())
}
