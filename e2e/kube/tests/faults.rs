//! Faults of the real control plane: kube-apiserver restarted, and etcd stopped and started again.
//! What was written survives both (it lives in etcd, fsynced), the admin's client goes on working
//! after each, and while etcd is down the API server says it is not ready. A client's link cut (reset)
//! fails its requests; restored, they succeed again.
//!
//! Without the binaries (`./scripts/build-kube.sh`) this test fails in CI and says it skipped elsewhere.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use lockstep_kube::{ClusterOptions, KubeBinaries, RealCluster};
use lockstep_replicator::linkcut::LinkMode;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_survive_an_api_server_restart_and_an_etcd_stop() -> TestResult {
    let Some(binaries) = KubeBinaries::for_tests()? else {
        return Ok(());
    };
    let cluster = RealCluster::start(&binaries, &ClusterOptions::default()).await?;
    let config_maps: Api<ConfigMap> = Api::default_namespaced(cluster.client());
    let written = ConfigMap {
        metadata: ObjectMeta {
            name: Some("survivor".into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([("epoch".to_string(), "7".to_string())])),
        ..ConfigMap::default()
    };
    config_maps.create(&PostParams::default(), &written).await?;

    cluster.restart_apiserver().await?;
    let read = config_maps.get("survivor").await?;
    assert_eq!(read.data, written.data);

    cluster.stop_etcd();
    // The API server notices on its next etcd health check.
    let mut answers = Vec::new();
    for _ in 0..120 {
        let readyz = cluster
            .client()
            .request_text(http::Request::get("/readyz").body(Vec::new())?)
            .await;
        if readyz.is_err() {
            break;
        }
        answers.push(readyz);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(
        answers.len() < 120,
        "/readyz still answered {:?} a minute after etcd stopped",
        answers.last()
    );
    cluster.start_etcd().await?;
    let read = config_maps.get("survivor").await?;
    assert_eq!(read.data, written.data);

    let cuttable = cluster
        .cuttable_client("admin-via-link", cluster.admin_token())
        .await?;
    let through_link: Api<ConfigMap> = Api::default_namespaced(cuttable.client.clone());
    through_link.get("survivor").await?;
    cuttable.link.set_mode(LinkMode::Reset);
    let cut = through_link.get("survivor").await;
    assert!(
        cut.is_err(),
        "a request through a reset link answered {cut:?}"
    );
    cuttable.link.set_mode(LinkMode::Pass);
    let read = through_link.get("survivor").await?;
    assert_eq!(read.data, written.data);
    Ok(())
}
