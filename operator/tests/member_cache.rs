//! Member clusters' claims, volumes and ReplicationNodes are watched, not listed every round: with 10 000
//! volumes a list per round moved 20 000 objects and 20 KiB of status a node from each cluster every time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kube::{Api, api::PostParams};
use lockstep_api::{domain::VolumeBinding, v1alpha1::ConsistencyGroup};
use lockstep_operator::Operator;

mod common;

use common::{cluster, eventually, local_member, options, volume};

/// How many of the group's member volumes are resolved to a volume and node.
fn resolved(group: &ConsistencyGroup) -> u32 {
    group
        .status
        .iter()
        .flat_map(|status| status.volumes.iter())
        .flat_map(|counts| counts.clusters.iter())
        .map(|cluster| cluster.volumes - cluster.unresolved)
        .sum()
}

fn counted(server: &lockstep_testapi::TestApiServer, verb: &str, resource: &str) -> usize {
    server
        .audit()
        .entries()
        .iter()
        .filter(|entry| entry.attributes.verb == verb && entry.attributes.resource == resource)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_volumes_and_nodes_are_watched_while_every_round_reads_the_leases() {
    let (server, hub) = cluster().await;
    volume(&hub, "wal", "orders", "vol-wal", "e1").await;
    local_member(&hub, VolumeBinding::Required).await;
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
    eventually("wal resolved", || async {
        let group = groups.get("orders-db").await.ok()?;
        (resolved(&group) == 1).then_some(())
    })
    .await;

    // From now on, rounds read the sidecars' Leases (live: they decide whether the cluster answers) but
    // take the claims, volumes and ReplicationNodes from the watches.
    server.audit().clear();
    eventually("ten more rounds", || async {
        (counted(&server, "list", "leases") >= 10).then_some(())
    })
    .await;
    let node_lists = counted(&server, "list", "replicationnodes");
    assert!(node_lists <= 1, "{node_lists} lists of nodes in 10 rounds");
    // At most a watch's own (re)list, never one per round.
    let claim_lists = counted(&server, "list", "persistentvolumeclaims");
    assert!(
        claim_lists <= 1,
        "{claim_lists} lists of claims in 10 rounds"
    );
    assert!(counted(&server, "list", "persistentvolumes") <= 1);

    // A claim created now is seen through the watch: data joins the group.
    volume(&hub, "data", "orders", "vol-data", "e1").await;
    eventually("data resolved through the watch", || async {
        let group = groups.get("orders-db").await.ok()?;
        (resolved(&group) == 2).then_some(())
    })
    .await;
    assert!(counted(&server, "list", "persistentvolumeclaims") <= 1);
    operator.shutdown().await;
}
