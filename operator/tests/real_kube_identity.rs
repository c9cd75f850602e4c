//! A real token against real keys: kube-apiserver v1.34.4 (built from source) mints a projected-style
//! token (TokenRequest, audience lockstep.dev/control, 600 s, bound to a Pod on a Node), and the
//! operator's verifier, given only the JWKS that server publishes at /openid/v1/jwks, names the node.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, Pod, ServiceAccount},
};
use kube::api::{Api, ObjectMeta, PostParams};
use lockstep_kube::{ClusterOptions, KubeBinaries, RealCluster};
use lockstep_operator::identity::{self, Expectations, KeySets, Refusal};

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
