//! Which node a volume is on comes from what no node writes — the PersistentVolume's node affinity —
//! and a node's ReplicationNode (path 1) counts only for volumes on that node: a compromised node that
//! claims and acknowledges another node's volume neither takes it over nor releases the group.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use lockstep_api::{
    domain::{ClusterPaths, Stage, VolumeBinding, VolumeState, condition},
    v1alpha1::{ConsistencyGroup, MemberCluster, MemberClusterSpec},
};
use lockstep_operator::Operator;
use serde_json::json;

mod common;

use common::{cluster, eventually, local_member, node_status, options, volume, volume_with};

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
    volume(&hub, "wal", "orders", "vol-wal", "e1").await;
    volume(&hub, "data", "orders", "vol-data", "e2").await;
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
    let spec = common::orders_group(&["wal", "data"]);
    groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("orders-db", spec),
        )
        .await
        .unwrap();
    // The PVs' node affinity decides: wal on e1 although e2 claims it too.
    let group = eventually("wal on e1, data on e2", || async {
        let group = common::get_with_volumes(&hub, "orders-db").await?;
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
        let group = common::as_decided(&operator, &hub, "orders-db").await?;
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

/// `node`'s ReplicationNode lists vol-wal in `state`.
async fn wal_reported(hub: &Client, node: &str, state: &str) {
    let volumes = json!([{"volumeHandle": "vol-wal", "state": state, "epoch": 0}]);
    node_status(hub, node, json!({"volumes": volumes, "volumeCount": 1})).await;
}

/// The operator, and a group `orders-db` of the PVC wal.
async fn operator_with_wal_group(hub: &Client) -> (Operator, Api<ConsistencyGroup>) {
    let operator = Operator::start(hub.clone(), &options()).await.unwrap();
    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("orders-db", common::orders_group(&["wal"])),
        )
        .await
        .unwrap();
    (operator, groups)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_bound_to_no_node_stays_unresolved_until_the_cluster_trusts_sidecar_claims() {
    let (_server, hub) = cluster().await;
    // A PV with no node affinity, never attached: only e1's own word says where it is.
    volume_with(&hub, "wal", "orders", "vol-wal", None).await;
    local_member(&hub, VolumeBinding::Required).await;
    wal_reported(&hub, "e1", "Replicating").await;
    let (operator, groups) = operator_with_wal_group(&hub).await;
    let message = eventually("MembersResolved=False saying why", || async {
        let group = groups.get("orders-db").await.ok()?;
        let condition = group
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == condition::MEMBERS_RESOLVED)?;
        (condition.status == "False").then_some(condition.message)
    })
    .await;
    assert!(
        message.contains("east/orders/wal (volume vol-wal) is bound to no node")
            && message.contains("volumeBinding: Required"),
        "{message}"
    );
    let group = common::as_decided(&operator, &hub, "orders-db")
        .await
        .unwrap();
    assert_eq!(
        member(&group, "wal").unwrap().node,
        None,
        "{:?}",
        group.status
    );

    // The person decides to trust the sidecars of this cluster: e1's claim now places the volume.
    Api::<MemberCluster>::all(hub.clone())
        .patch(
            "east",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"volumeBinding": "SidecarClaims"}})),
        )
        .await
        .unwrap();
    eventually("wal resolved on e1", || async {
        let group = common::get_with_volumes(&hub, "orders-db").await?;
        (member(&group, "wal")?.node.as_deref() == Some("e1")).then_some(())
    })
    .await;
    operator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_node_reporting_a_volumes_state_does_not_change_it() {
    let (_server, hub) = cluster().await;
    volume(&hub, "wal", "orders", "vol-wal", "e1").await;
    local_member(&hub, VolumeBinding::Required).await;
    wal_reported(&hub, "e1", "Resyncing").await;
    let (operator, _groups) = operator_with_wal_group(&hub).await;
    eventually("wal Resyncing on e1", || async {
        let group = common::get_with_volumes(&hub, "orders-db").await?;
        let wal = member(&group, "wal")?;
        (wal.node.as_deref() == Some("e1") && wal.state == Some(VolumeState::Resyncing))
            .then_some(())
    })
    .await;
    // e2, compromised, says the volume is Replicating (in sync): were it believed, the group would
    // publish a consistent image that volume is not part of.
    wal_reported(&hub, "e2", "Replicating").await;
    // Then e1 says its volume is Unconfirmed: once the group shows that, the operator has read both
    // reports together, and e1's is the one that counts.
    wal_reported(&hub, "e1", "Unconfirmed").await;
    eventually("wal Unconfirmed, as e1 says", || async {
        let group = common::get_with_volumes(&hub, "orders-db").await?;
        (member(&group, "wal")?.state == Some(VolumeState::Unconfirmed)).then_some(())
    })
    .await;
    operator.shutdown().await;
}
