//! Upgrading the operator mid-freeze: a group frozen by an operator that listed every member volume in
//! the group's status (before ConsistencyGroupShards) is finished by this one, which takes that list
//! once, releases only when every member acknowledged, and from then on keeps the status bounded and
//! the volumes in shards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use lockstep_api::{
    domain::{Phase, Stage, VolumeBinding},
    v1alpha1::ConsistencyGroup,
};
use lockstep_operator::Operator;
use serde_json::json;

mod common;

use common::{cluster, eventually, local_member, node_status, options, volume};

fn member(pvc: &str, node: &str, acknowledged: Option<(u64, &str)>) -> serde_json::Value {
    let mut member = json!({
        "cluster": "east", "namespace": "orders", "pvc": pvc, "persistentVolume": format!("pv-{pvc}"),
        "volumeHandle": format!("vol-{pvc}"), "node": node, "state": "Suspended", "imageEpoch": 1,
    });
    if let Some((epoch, stage)) = acknowledged {
        member["acknowledged"] = json!({"epoch": epoch, "stage": stage, "path": "Api"});
    }
    member
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_frozen_by_an_operator_before_shards_is_finished_by_this_one() {
    let (_server, hub) = cluster().await;
    volume(&hub, "wal", "orders", "vol-wal", "e1").await;
    volume(&hub, "data", "orders", "vol-data", "e2").await;
    local_member(&hub, VolumeBinding::Required).await;
    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    let spec = common::orders_group(&["wal", "data"]);
    groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("orders-db", spec),
        )
        .await
        .unwrap();
    // What the old operator left: frozen at epoch 1, wal acknowledged, data not yet, every member in
    // the status.
    let old_status = json!({"status": {
        "phase": "Freezing", "epoch": 1, "stage": "Freeze", "memberCount": 2,
        "trigger": {"reason": "CopyFailed", "cluster": "east", "node": "e1", "volumeHandle": "vol-wal"},
        "members": [member("data", "e2", None), member("wal", "e1", Some((1, "Freeze")))],
    }});
    groups
        .patch_status(
            "orders-db",
            &PatchParams::default(),
            &Patch::Merge(&old_status),
        )
        .await
        .unwrap();
    let uid = groups.get("orders-db").await.unwrap().metadata.uid.unwrap();
    node_status(
        &hub,
        "e1",
        json!({"volumes": [{"volumeHandle": "vol-wal", "state": "Suspended", "epoch": 1, "stage": "Freeze"}],
               "volumeCount": 1}),
    )
    .await;

    let operator = Operator::start(hub.clone(), &options()).await.unwrap();
    // The new operator rewrites the status its way (counts, no list) and keeps the freeze: wal's
    // acknowledgement came with the old status, data's is missing, so nothing is released.
    let waiting = eventually("the new operator's first status", || async {
        let group = groups.get("orders-db").await.ok()?;
        let counts = group.status.as_ref()?.volumes.clone()?;
        Some((group, counts))
    })
    .await;
    assert_eq!(
        waiting.0.position(),
        (1, Stage::Freeze),
        "{:?}",
        waiting.0.status
    );
    assert_eq!(waiting.1.frozen, 1, "{:?}", waiting.1);
    assert!(waiting.0.status.unwrap().members.is_empty());

    // e2 acknowledges data on path 1: every member did, the group is released.
    node_status(
        &hub,
        "e2",
        json!({"volumes": [{"volumeHandle": "vol-data", "state": "Suspended", "epoch": 1, "stage": "Freeze"}],
               "volumeCount": 1,
               "enforced": [{"groupUid": uid, "epoch": 1, "stage": "Freeze", "volumeHandles": ["vol-data"]}]}),
    )
    .await;
    let released = eventually("released at epoch 1", || async {
        let group = groups.get("orders-db").await.ok()?;
        (group.position() == (1, Stage::Release)).then_some(group)
    })
    .await;
    let status = released.status.unwrap();
    assert_eq!(status.phase, Some(Phase::Running));
    assert!(
        status.members.is_empty(),
        "the status no longer lists volumes: {:?}",
        status.members
    );
    assert_eq!(status.member_count, 2);
    assert_eq!(status.consistent_image.as_ref().unwrap().volume_count, 2);

    // The volumes, with both acknowledgements and the image, are in the shards now.
    let shown = common::status_with_volumes(&hub, "orders-db").await;
    let acknowledged: Vec<(String, Option<(u64, Stage)>)> = shown
        .members
        .iter()
        .map(|m| {
            (
                m.pvc.clone(),
                m.acknowledged.as_ref().map(|a| (a.epoch, a.stage)),
            )
        })
        .collect();
    assert_eq!(
        acknowledged,
        vec![
            ("data".to_owned(), Some((1, Stage::Freeze))),
            ("wal".to_owned(), Some((1, Stage::Freeze))),
        ]
    );
    let image: Vec<String> = shown
        .consistent_image
        .unwrap()
        .volumes
        .into_iter()
        .map(|v| v.volume_handle)
        .collect();
    assert_eq!(image, vec!["vol-data", "vol-wal"]);
    operator.shutdown().await;
}
