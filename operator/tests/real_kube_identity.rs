//! A real token against real keys: kube-apiserver v1.34.4 (built from source) mints a projected-style
//! token (TokenRequest, audience lockstep.dev/control, 600 s, bound to a Pod on a Node), and the
//! operator's verifier, given only the JWKS that server publishes at /openid/v1/jwks, names the node;
//! and a MemberCluster that lists no keys gets the ones its API server publishes, read by the operator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, Pod, ServiceAccount},
};
use kube::api::{Api, ObjectMeta, PostParams};
use lockstep_api::{
    domain::ClusterPaths,
    proto::control::v1::{NodeIdentity, ReportRequest, control_client::ControlClient},
    v1alpha1::{MemberCluster, MemberClusterSpec},
};
use lockstep_kube::{ClusterOptions, KubeBinaries, RealCluster};
use lockstep_operator::{
    ControlSecurity, Operator, Options,
    identity::{self, Expectations, KeySets, Refusal},
};
use tonic::Code;

mod common;

use common::{TestCa, create_namespace, eventually, tls_channel};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

async fn token_for(
    cluster: &RealCluster,
    node: &str,
    audience: &str,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    // The Node and a Pod of the sidecars' ServiceAccount bound to it.
    cluster
        .service_account_on_node("lockstep", "lockstep-sidecar", node)
        .await?;
    let pod_name = format!("lockstep-sidecar-{node}");
    let pod = Api::<Pod>::namespaced(cluster.client(), "lockstep")
        .get(&pod_name)
        .await?;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod_name),
                uid: pod.metadata.uid,
            }),
        },
        ..TokenRequest::default()
    };
    let minted = Api::<ServiceAccount>::namespaced(cluster.client(), "lockstep")
        .create_token_request("lockstep-sidecar", &PostParams::default(), &request)
        .await?;
    Ok(minted.status.map(|status| status.token).unwrap_or_default())
}

/// The sidecars' ServiceAccount, lockstep/lockstep-sidecar.
async fn sidecar_account(client: &kube::Client) -> TestResult {
    Api::<ServiceAccount>::namespaced(client.clone(), "lockstep")
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: ObjectMeta {
                    name: Some("lockstep-sidecar".into()),
                    ..ObjectMeta::default()
                },
                ..ServiceAccount::default()
            },
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_minted_by_real_kube_apiserver_names_its_node() -> TestResult {
    let Some(binaries) = KubeBinaries::for_tests()? else {
        return Ok(());
    };
    let cluster = RealCluster::start(&binaries, &ClusterOptions::default()).await?;
    let client = cluster.client();
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some("lockstep".into()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await?;
    sidecar_account(&client).await?;

    // What a person puts into the MemberCluster: `kubectl get --raw /openid/v1/jwks`.
    let jwks = client
        .request_text(http::Request::get("/openid/v1/jwks").body(Vec::new())?)
        .await?;
    let keys = KeySets::build([("east", Some(jwks.as_str()))]);
    assert_eq!(keys.keys_of("east"), 1, "{jwks}");
    let expect = Expectations {
        audience: identity::DEFAULT_AUDIENCE.into(),
        service_account: "system:serviceaccount:lockstep:lockstep-sidecar".into(),
        max_lifetime_seconds: 600,
    };
    let now = k8s_openapi::jiff::Timestamp::now().as_second();

    let token = token_for(&cluster, "node-a", identity::DEFAULT_AUDIENCE).await?;
    let who = identity::verify(&keys, &token, &expect, now)?;
    assert_eq!(who.cluster, "east");
    assert_eq!(who.node, "node-a");
    assert_eq!(who.pod, "lockstep/lockstep-sidecar-node-a");

    let other = token_for(&cluster, "node-b", identity::DEFAULT_AUDIENCE).await?;
    assert_eq!(
        identity::verify(&keys, &other, &expect, now)?.node,
        "node-b"
    );

    // A token for the API server's own audience is not one for Lockstep.
    let api_token = token_for(
        &cluster,
        "node-a",
        "https://kubernetes.default.svc.cluster.local",
    )
    .await?;
    assert!(matches!(
        identity::verify(&keys, &api_token, &expect, now),
        Err(Refusal::Audience { .. })
    ));
    // Another cluster's keys do not verify it: its key id is unknown there.
    let elsewhere = KeySets::build([(
        "west",
        Some(identity::TokenSigner::generate()?.jwks().as_str()),
    )]);
    assert!(matches!(
        identity::verify(&elsewhere, &token, &expect, now),
        Err(Refusal::UnknownKey { .. })
    ));
    cluster.stop();
    Ok(())
}

/// Reports as `node` of cluster east over `channel`, presenting `token`.
async fn report_as(
    channel: &tonic::transport::Channel,
    token: &str,
    node: &str,
) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(ReportRequest {
        node: Some(NodeIdentity {
            cluster: "east".into(),
            node: node.into(),
        }),
        ..ReportRequest::default()
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|_| tonic::Status::internal("token not ASCII"))?,
    );
    ControlClient::new(channel.clone())
        .report(request)
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cluster_listing_no_keys_uses_those_its_api_server_publishes() -> TestResult {
    let Some(binaries) = KubeBinaries::for_tests()? else {
        return Ok(());
    };
    let cluster = RealCluster::start(&binaries, &ClusterOptions::default()).await?;
    let client = cluster.client();
    lockstep_kube::crds::install_crds(&client).await?;
    create_namespace(&client, "lockstep").await;
    sidecar_account(&client).await?;
    // The hub is its own member cluster, and nobody copied its keys into the MemberCluster.
    let spec = MemberClusterSpec {
        paths: ClusterPaths::Both,
        local: true,
        kubeconfig_secret_ref: None,
        network: None,
        service_account_keys: None,
        volume_binding: Default::default(),
    };
    Api::<MemberCluster>::all(client.clone())
        .create(&PostParams::default(), &MemberCluster::new("east", spec))
        .await?;
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new("control CA");
    let ca_file = ca.write_ca(dir.path(), "ca.crt");
    let (cert, key) = ca.write_serving(dir.path());
    let options = Options {
        kubeconfig: None,
        hub_name: "east".into(),
        grpc_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        resync_interval: std::time::Duration::from_millis(300),
        leader_election: false,
        namespace: "lockstep".into(),
        identity: "operator-0".into(),
        lease_duration: std::time::Duration::from_secs(2),
        max_sessions_per_cluster: lockstep_operator::sessions::DEFAULT_SESSIONS_PER_CLUSTER,
        max_group_volumes: lockstep_operator::DEFAULT_MAX_GROUP_VOLUMES,
        control_security: ControlSecurity::tls(&cert, &key),
    };
    let operator = Operator::start(client.clone(), &options).await?;
    let clusters = Api::<MemberCluster>::all(client.clone());
    let keys_condition = |clusters: Api<MemberCluster>| async move {
        let condition = clusters
            .get("east")
            .await
            .ok()?
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "ServiceAccountKeys")?;
        Some((condition.status, condition.reason, condition.message))
    };
    let (_, _, message) = eventually("the published keys loaded", || async {
        keys_condition(clusters.clone())
            .await
            .filter(|(status, _, _)| status == "True")
    })
    .await;
    assert!(message.contains("/openid/v1/jwks"), "{message}");

    // A Pod-bound token the real server minted for node-a speaks for node-a, and only for it.
    let channel = tls_channel(operator.grpc_addr, &ca_file).await?;
    let token = token_for(&cluster, "node-a", identity::DEFAULT_AUDIENCE).await?;
    report_as(&channel, &token, "node-a").await?;
    let refused = report_as(&channel, &token, "node-b").await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // A token signed by a key this cluster does not publish is refused, and the condition says so.
    let forger = identity::TokenSigner::generate()?;
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let forged = forger.pod_token(
        identity::DEFAULT_AUDIENCE,
        "lockstep",
        "lockstep-sidecar",
        "lockstep-sidecar-node-a",
        "node-a",
        now,
        600,
    )?;
    let refused = report_as(&channel, &forged, "node-a").await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let (_, reason, message) = eventually("UnknownKeyId on the MemberCluster", || async {
        keys_condition(clusters.clone())
            .await
            .filter(|(status, _, _)| status == "False")
    })
    .await;
    assert_eq!(reason, "UnknownKeyId", "{message}");
    assert!(message.contains("does not publish"), "{message}");
    // The real node's token still works: the forged one changed nothing.
    report_as(&channel, &token, "node-a").await?;
    operator.shutdown().await;
    cluster.stop();
    Ok(())
}
