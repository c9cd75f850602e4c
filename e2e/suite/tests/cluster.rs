//! One simulated cluster on its own: the CRDs are served, the claims are bound to PersistentVolumes that
//! name the replicator's exports, writes reach the secondary, and the faults act for real — a cut link
//! makes the replicator report a failed copy and hold the write, a stopped API server refuses requests
//! and comes back with its objects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::Api;
use lockstep_api::v1alpha1::ConsistencyGroup;
use lockstep_checker::{NbdClient, Source};
use lockstep_e2e::cluster::{CSI_DRIVER, ClusterSpec, SimCluster, VolumeSpec};
use lockstep_e2e::faults::LinkCutMode;
use lockstep_e2e::timeline::Timeline;
use lockstep_replicator::{Event, ReplMode};

async fn one_volume(dir: &std::path::Path) -> SimCluster {
    let spec = ClusterSpec::new("east", "orders")
        .volume(VolumeSpec::new("east", "wal", 4 << 20).label("app", "db"));
    SimCluster::start(spec, dir, &Timeline::new(false))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_are_bound_to_the_replicated_exports_and_writes_reach_the_secondary() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = one_volume(dir.path()).await;

    // The CRDs are served: an empty list of groups, not a 404.
    let groups = Api::<ConsistencyGroup>::all(cluster.client.clone())
        .list(&Default::default())
        .await
        .unwrap();
    assert!(groups.items.is_empty());

    let claim = Api::<PersistentVolumeClaim>::namespaced(cluster.client.clone(), "orders")
        .get("wal")
        .await
        .unwrap();
    assert_eq!(claim.status.unwrap().phase.as_deref(), Some("Bound"));
    let pv_name = claim.spec.unwrap().volume_name.unwrap();
    assert_eq!(claim.metadata.labels.unwrap()["app"], "db");
    let pv = Api::<PersistentVolume>::all(cluster.client.clone())
        .get(&pv_name)
        .await
        .unwrap();
    let csi = pv.spec.unwrap().csi.unwrap();
    assert_eq!(csi.driver, CSI_DRIVER);
    assert_eq!(csi.volume_handle, "east-wal");

    // A write over NBD is on the secondary once acknowledged.
    let volume = cluster.volume("east-wal").unwrap();
    let mut client = NbdClient::connect(&volume.nbd).await.unwrap();
    client.write(8192, &[7u8; 4096], false).await.unwrap();
    client.disconnect().await.unwrap();
    let difference =
        lockstep_checker::first_difference(&volume.primary_source(), &volume.secondary_source())
            .await
            .unwrap();
    assert_eq!(difference, None);
    assert!(matches!(volume.secondary_source(), Source::File(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_holds_the_write_and_reports_the_failed_copy() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = one_volume(dir.path()).await;
    let mut events = cluster.primary.subscribe();
    let volume = cluster.volume("east-wal").unwrap();
    let mut client = NbdClient::connect(&volume.nbd).await.unwrap();
    client.write(0, &[1u8; 4096], false).await.unwrap();

    cluster.cut_link("east-wal", LinkCutMode::Reset).unwrap();
    assert!(!cluster.link_is_up("east-wal").unwrap());
    let write = tokio::spawn(async move {
        let result = client.write(4096, &[2u8; 4096], false).await;
        (client, result)
    });
    let failed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Event::CopyFailed(f) = events.recv().await.unwrap() {
                return f;
            }
        }
    })
    .await
    .expect("no CopyFailed within 30 s");
    assert_eq!(failed.volume, "east-wal");
    let status = cluster.volume_status("east-wal").unwrap();
    assert!(
        matches!(status.replication.mode, ReplMode::Held { .. }),
        "{:?}",
        status.replication.mode
    );
    assert!(!write.is_finished(), "the held write was answered");

    cluster.restore_link("east-wal").unwrap();
    assert!(cluster.link_is_up("east-wal").unwrap());
    write.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_api_server_refuses_requests_and_restarts_with_its_objects() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = one_volume(dir.path()).await;
    let claims = Api::<PersistentVolumeClaim>::namespaced(cluster.client.clone(), "orders");
    cluster.stop_api_server().await.unwrap();
    assert!(claims.get("wal").await.is_err());
    cluster.start_api_server().await.unwrap();
    assert_eq!(
        claims.get("wal").await.unwrap().metadata.name.as_deref(),
        Some("wal")
    );
}
