//! Which node a volume is on comes from what no node writes — the PersistentVolume's node affinity —
//! and a node's ReplicationNode (path 1) counts only for volumes on that node: a compromised node that
//! claims and acknowledges another node's volume neither takes it over nor releases the group.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::core::v1::{
        CSIPersistentVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
        PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeSpec,
        VolumeNodeAffinity,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use lockstep_api::{
    domain::{ClusterPaths, Policy, Stage},
    v1alpha1::{
        ConsistencyGroup, ConsistencyGroupSpec, GroupMember, MemberCluster, MemberClusterSpec,
        ReplicationNode, ReplicationNodeSpec,
    },
};
use lockstep_operator::{Operator, Options};
use serde_json::json;

mod common;

use common::{cluster, eventually};

fn options() -> Options {
    Options {
        kubeconfig: None,
        hub_name: "hub-east".into(),
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        resync_interval: Duration::from_millis(200),
        leader_election: false,
        namespace: "lockstep-system".into(),
        identity: "operator-0".into(),
        lease_duration: Duration::from_secs(2),
        max_sessions_per_cluster: lockstep_operator::sessions::DEFAULT_SESSIONS_PER_CLUSTER,
        control_security: lockstep_operator::ControlSecurity::insecure_plaintext(),
    }
}

/// A PVC `orders/<pvc>` bound to a CSI PV with handle `handle`, whose node affinity names `node`.
async fn volume_on(client: &Client, pvc: &str, handle: &str, node: &str) {
    let pv = PersistentVolume {
        metadata: ObjectMeta {
            name: Some(format!("pv-{handle}")),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            csi: Some(CSIPersistentVolumeSource {
                driver: "nbd.lockstep.dev".into(),
                volume_handle: handle.into(),
                ..Default::default()
            }),
            node_affinity: Some(VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: "kubernetes.io/hostname".into(),
                            operator: "In".into(),
                            values: Some(vec![node.into()]),
                        }]),
                        match_fields: None,
                    }],
                }),
            }),
            ..Default::default()
        }),
        status: None,
    };
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .unwrap();
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(pvc.into()),
            namespace: Some("orders".into()),
            labels: Some(BTreeMap::new()),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            volume_name: Some(format!("pv-{handle}")),
            ..Default::default()
        }),
        status: None,
    };
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), "orders")
        .create(&PostParams::default(), &claim)
        .await
        .unwrap();
}

async fn node_status(client: &Client, node: &str, status: serde_json::Value) {
    let api = Api::<ReplicationNode>::all(client.clone());
    if api.get_opt(node).await.unwrap().is_none() {
        let object = ReplicationNode::new(
            node,
            ReplicationNodeSpec {
                node_name: node.into(),
                cluster: "east".into(),
            },
        );
        api.create(&PostParams::default(), &object).await.unwrap();
    }
    let patch =
        json!({"apiVersion": "lockstep.dev/v1alpha1", "kind": "ReplicationNode", "status": status});
    api.patch_status(
        node,
        &PatchParams::apply("test-sidecar").force(),
        &Patch::Apply(&patch),
    )
    .await
    .unwrap();
}

fn member<'a>(
    group: &'a ConsistencyGroup,
    pvc: &str,
) -> Option<&'a lockstep_api::v1alpha1::MemberVolumeStatus> {
    group
        .status
        .as_ref()?
        .members
        .iter()
        .find(|member| member.pvc == pvc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_claiming_and_acknowledging_another_nodes_volume_neither_takes_it_nor_releases() {
    let (_server, hub) = cluster().await;
    volume_on(&hub, "wal", "vol-wal", "e1").await;
    volume_on(&hub, "data", "vol-data", "e2").await;
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
                },
            ),
        )
        .await
        .unwrap();
    let replicating = |handles: &[&str]| {
        json!(
            handles
                .iter()
                .map(|h| json!({"volumeHandle": h, "state": "Replicating", "epoch": 0}))
                .collect::<Vec<_>>()
        )
    };
    node_status(
        &hub,
        "e1",
        json!({"volumes": replicating(&["vol-wal"]), "volumeCount": 1}),
    )
    .await;
    // e2 is compromised: it claims e1's volume as its own too.
    node_status(
        &hub,
        "e2",
        json!({"volumes": replicating(&["vol-wal", "vol-data"]), "volumeCount": 2}),
    )
    .await;
    let operator = Operator::start(hub.clone(), &options()).await.unwrap();
    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    let spec = ConsistencyGroupSpec {
        members: vec![GroupMember {
            cluster: "east".into(),
            namespace: "orders".into(),
            pvc_names: Some(vec!["wal".into(), "data".into()]),
            selector: None,
        }],
        policy: Policy::FreezeAndGo,
        hold_timeout: "30s".into(),
        release: None,
        resync: None,
        freeze: None,
    };
    groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("orders-db", spec),
        )
        .await
        .unwrap();
    // The PVs' node affinity decides: wal on e1 although e2 claims it too.
    let group = eventually("wal on e1, data on e2", || async {
        let group = groups.get("orders-db").await.ok()?;
        (member(&group, "wal")?.node.as_deref() == Some("e1")
            && member(&group, "data")?.node.as_deref() == Some("e2"))
        .then_some(group)
    })
    .await;
    let uid = group.metadata.uid.clone().unwrap();

    // e1's copy fails: the group freezes.
    node_status(
        &hub,
        "e1",
        json!({"volumes": replicating(&["vol-wal"]), "volumeCount": 1, "failureCount": 1, "failures": [{
            "volumeHandle": "vol-wal", "groupUid": uid, "epochSeen": 0, "sequence": 1,
            "error": "link cut", "since": "2026-01-01T00:00:00Z"}]}),
    )
    .await;
    eventually("frozen at epoch 1", || async {
        (groups.get("orders-db").await.ok()?.position() == (1, Stage::Freeze)).then_some(())
    })
    .await;
    // e2 acknowledges both volumes, e1's included: only its own counts, so the group waits.
    node_status(
        &hub,
        "e2",
        json!({"volumes": replicating(&["vol-wal", "vol-data"]), "volumeCount": 2, "enforced": [{
            "groupUid": uid, "epoch": 1, "stage": "Freeze", "volumeHandles": ["vol-wal", "vol-data"]}]}),
    )
    .await;
    let group = eventually("e2's own acknowledgement recorded", || async {
        let group = groups.get("orders-db").await.ok()?;
        let ack = member(&group, "data")?.acknowledged.as_ref()?;
        ((ack.epoch, ack.stage) == (1, Stage::Freeze)).then_some(group)
    })
    .await;
    assert!(
        member(&group, "wal")
            .unwrap()
            .acknowledged
            .as_ref()
            .is_none_or(|ack| ack.epoch < 1),
        "e2 acknowledged e1's volume: {:?}",
        group.status
    );
    assert_eq!(
        group.position(),
        (1, Stage::Freeze),
        "released on e2's word"
    );
    // e1 acknowledges its own: the group is released.
    node_status(
        &hub,
        "e1",
        json!({"volumes": replicating(&["vol-wal"]), "volumeCount": 1, "enforced": [{
            "groupUid": uid, "epoch": 1, "stage": "Freeze", "volumeHandles": ["vol-wal"]}]}),
    )
    .await;
    eventually("released once e1 acknowledged", || async {
        (groups.get("orders-db").await.ok()?.position() >= (1, Stage::Release)).then_some(())
    })
    .await;
    operator.shutdown().await;
}
