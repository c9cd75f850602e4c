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

/// A new operator's first reconciles — one per group, all at once — found no member cluster connected
/// and each connected every cluster, reading its kubeconfig Secret from the hub: with 500 groups of 5
/// clusters, 2 500 reads slowed the hub past its timeouts and no group resolved within 10 minutes.
/// The clusters are connected once, whatever the number of groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_starting_with_many_groups_reads_each_kubeconfig_once() {
    let (hub_server, hub) = cluster().await;
    let (west_server, _west) = cluster().await;
    let yaml = serde_yaml_ng::to_string(&west_server.kubeconfig().unwrap()).unwrap();
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("west-kubeconfig".into()),
            namespace: Some("lockstep-system".into()),
            ..Default::default()
        },
        string_data: Some([("kubeconfig".to_owned(), yaml)].into()),
        ..Default::default()
    };
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(hub.clone(), "lockstep-system")
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let west = lockstep_api::v1alpha1::MemberClusterSpec {
        paths: lockstep_api::domain::ClusterPaths::Both,
        local: false,
        kubeconfig_secret_ref: Some(lockstep_api::v1alpha1::SecretKeyRef {
            namespace: "lockstep-system".into(),
            name: "west-kubeconfig".into(),
            key: "kubeconfig".into(),
        }),
        network: None,
        service_account_keys: None,
        volume_binding: VolumeBinding::Required,
    };
    Api::<lockstep_api::v1alpha1::MemberCluster>::all(hub.clone())
        .create(
            &PostParams::default(),
            &lockstep_api::v1alpha1::MemberCluster::new("west", west),
        )
        .await
        .unwrap();
    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    const GROUPS: usize = 30;
    for index in 0..GROUPS {
        let mut spec = common::orders_group(&["wal"]);
        spec.members[0].cluster = "west".into();
        groups
            .create(
                &PostParams::default(),
                &ConsistencyGroup::new(&format!("group-{index}"), spec),
            )
            .await
            .unwrap();
    }

    // The hub answers slowly, as a busy one does: every first reconcile starts before any connects.
    hub_server
        .faults()
        .set_latency(std::time::Duration::from_millis(50));
    hub_server.audit().clear();
    let operator = Operator::start(hub.clone(), &options()).await.unwrap();
    eventually("every group reconciled", || async {
        let listed = groups.list(&Default::default()).await.ok()?;
        listed
            .items
            .iter()
            .all(|group| group.status.is_some())
            .then_some(())
    })
    .await;
    hub_server.faults().set_latency(std::time::Duration::ZERO);
    let reads = counted(&hub_server, "get", "secrets");
    assert!(
        reads <= 2,
        "{reads} reads of the member cluster's kubeconfig for {GROUPS} groups"
    );
    operator.shutdown().await;
}
