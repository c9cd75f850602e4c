//! The Helm chart (`deploy/helm/lockstep`) as people meet it: `helm lint`, bad values refused with a
//! message that says what to do, `helm install` / `helm upgrade` and a plain `kubectl apply` of the rendered
//! chart onto an API server, and the chart's RBAC *enforced* while the real operator and sidecars, signed
//! in as the chart's ServiceAccounts, run a planned freeze, a resync and a group's deletion across two
//! clusters — so every permission the chart grants is one they use, and none they use is missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use lockstep_api::domain::{ClusterPaths, Phase, Policy, Stage};
use lockstep_api::v1alpha1::{
    ConsistencyGroup, ConsistencyGroupSpec, GroupMember, MemberCluster, MemberClusterSpec,
    SecretKeyRef,
};
use lockstep_kube::backend::{ApiServer, Backend};
use lockstep_operator::{Operator, Options};
use lockstep_replicator::testing::{NodeSpec, ReplicatorNode};
use lockstep_sidecar::Sidecar;
use lockstep_testapi::TestApiServer;

mod common;

use common::{crds_established, create_namespace, eventually, patch_spec, volume, wait_for_group};

const NAMESPACE: &str = "lockstep";
const OPERATOR: &str = "system:serviceaccount:lockstep:lockstep-operator";
const SIDECAR: &str = "system:serviceaccount:lockstep:lockstep-sidecar";
const MEMBER_ACCESS: &str = "system:serviceaccount:lockstep:lockstep-member-access";

fn chart() -> PathBuf {
    manifest_dir().join("../deploy/helm/lockstep")
}

/// A tool installed by `scripts/install-tools.sh` (into `$LOCKSTEP_TOOLS/bin`), or found on `PATH`.
fn tool(name: &str) -> PathBuf {
    let installed = std::env::var_os("LOCKSTEP_TOOLS")
        .map(|dir| PathBuf::from(dir).join("bin").join(name))
        .filter(|path| path.exists());
    let path = installed.unwrap_or_else(|| PathBuf::from(name));
    assert!(
        Command::new(&path).arg("version").output().is_ok(),
        "{name} not found: run the tests through ./scripts/test.sh, or `source \"$(./scripts/install-tools.sh)\"` first"
    );
    path
}

fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap()
}

fn helm(args: &[&str]) -> Output {
    run(&tool("helm"), args)
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `--set` arguments of the hub (operator and sidecar) and of another member cluster.
const HUB_VALUES: &[&str] = &["--set", "clusterName=east"];
const MEMBER_VALUES: &[&str] = &[
    "--set",
    "clusterName=west,operator.enabled=false,memberAccess.enabled=true,sidecar.operatorEndpoint=https://hub.example:7443",
];

#[test]
fn the_chart_lints_and_refuses_bad_values_with_a_message_that_says_what_to_do() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    for values in [HUB_VALUES, MEMBER_VALUES] {
        let output = helm(&[&["lint", "--strict", chart], values].concat());
        assert!(output.status.success(), "{}", text(&output));
    }
    let refused = |set: &str, expected: &str| {
        let output = helm(&["template", "lockstep", chart, "--set", set]);
        assert!(!output.status.success(), "{set} was accepted");
        let message = text(&output);
        assert!(message.contains(expected), "{set}: {message}");
    };
    refused(
        "operator.replicas=2",
        "clusterName is required when the sidecar runs",
    );
    refused(
        "clusterName=east,operator.replicas=2,operator.leaderElection=false",
        "/operator/leaderElection",
    );
    refused(
        "clusterName=east,sidecar.failSafeInterval=5",
        "/sidecar/failSafeInterval",
    );
    refused("clusterName=East_1", "/clusterName");
    refused(
        "clusterName=west,operator.enabled=false,sidecar.apiPath=false",
        "the sidecar needs at least one path to the operator",
    );
    refused(
        "clusterName=west,operator.enabled=false,sidecar.operatorEndpoint=http://hub.example:7443",
        "must be https://",
    );
    refused(
        "clusterName=east,controlTls.certManager.enabled=true",
        "issuerRef.name",
    );
}

/// `helm install` of the chart into `lockstep` on the API server `kubeconfig` signs in to, as the
/// administrator.
fn helm_install(kubeconfig: &Path, values: &[&str]) {
    let chart = chart();
    let output = helm(
        &[
            &[
                "install",
                "lockstep",
                chart.to_str().unwrap(),
                "--namespace",
                NAMESPACE,
                "--create-namespace",
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
            ],
            values,
        ]
        .concat(),
    );
    assert!(output.status.success(), "helm install: {}", text(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_upgrade_and_a_kubectl_apply_of_the_rendered_chart_create_every_object() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestApiServer::start(Default::default()).await.unwrap();
    let client = server.client().await.unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    helm_install(&kubeconfig, HUB_VALUES);
    crds_established(&client).await;
    let deployments = Api::<Deployment>::namespaced(client.clone(), NAMESPACE);
    let operator = deployments.get("lockstep-operator").await.unwrap();
    assert_eq!(operator.spec.as_ref().unwrap().replicas, Some(2));
    let args = operator.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(args.contains(&"--leader-election".to_owned()), "{args:?}");
    // TLS on by default, and only the sidecars' ServiceAccount speaks for a node.
    for arg in [
        "--grpc-tls-cert-file=/etc/lockstep/control-tls/tls.crt",
        "--sidecar-service-account=lockstep:lockstep-sidecar",
    ] {
        assert!(args.contains(&arg.to_owned()), "{args:?}");
    }
    assert!(
        !args.contains(&"--grpc-insecure-plaintext".to_owned()),
        "{args:?}"
    );
    let sidecars = Api::<DaemonSet>::namespaced(client.clone(), NAMESPACE)
        .get("lockstep-sidecar")
        .await
        .unwrap();
    let args = sidecars.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(args.contains(&"--cluster-name=east".to_owned()), "{args:?}");
    assert!(
        args.contains(&"--operator-ca-file=/etc/lockstep/control-ca/ca.crt".to_owned()),
        "{args:?}"
    );
    assert!(
        args.contains(
            &"--operator-endpoint=https://lockstep-operator.lockstep.svc:7443".to_owned()
        ),
        "{args:?}"
    );

    // An upgrade changes what it says and nothing else.
    let chart = chart();
    let output = helm(&[
        "upgrade",
        "lockstep",
        chart.to_str().unwrap(),
        "--namespace",
        NAMESPACE,
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--set",
        "clusterName=east,operator.replicas=3",
    ]);
    assert!(output.status.success(), "helm upgrade: {}", text(&output));
    let operator = deployments.get("lockstep-operator").await.unwrap();
    assert_eq!(operator.spec.unwrap().replicas, Some(3));

    // GitOps tools apply the rendered chart: the same objects through `kubectl apply`.
    let plain = TestApiServer::start(Default::default()).await.unwrap();
    let plain_kubeconfig = dir.path().join("plain");
    plain.write_kubeconfig(&plain_kubeconfig).unwrap();
    let plain_client = plain.client().await.unwrap();
    create_namespace(&plain_client, NAMESPACE).await;
    let rendered = helm(
        &[
            &[
                "template",
                "lockstep",
                chart.to_str().unwrap(),
                "--namespace",
                NAMESPACE,
                "--include-crds",
            ],
            MEMBER_VALUES,
        ]
        .concat(),
    );
    assert!(rendered.status.success(), "{}", text(&rendered));
    let manifests = dir.path().join("rendered.yaml");
    std::fs::write(&manifests, &rendered.stdout).unwrap();
    let output = run(
        &tool("kubectl"),
        &[
            "--kubeconfig",
            plain_kubeconfig.to_str().unwrap(),
            "apply",
            "--server-side",
            "-f",
            manifests.to_str().unwrap(),
        ],
    );
    assert!(output.status.success(), "kubectl apply: {}", text(&output));
    crds_established(&plain_client).await;
    Api::<ClusterRole>::all(plain_client.clone())
        .get("lockstep-member-access")
        .await
        .unwrap();
    let token = Api::<Secret>::namespaced(plain_client.clone(), NAMESPACE)
        .get("lockstep-member-access-token")
        .await
        .unwrap();
    assert_eq!(
        token.type_.as_deref(),
        Some("kubernetes.io/service-account-token")
    );
    assert!(
        Api::<Deployment>::namespaced(plain_client, NAMESPACE)
            .get_opt("lockstep-operator")
            .await
            .unwrap()
            .is_none(),
        "a member cluster runs no operator"
    );
}

/// One node: the shared replicator fixture serving one volume copied to a secondary, and its bound
/// claim.
async fn start_node(admin: &Client, cluster: &str, name: &str) -> ReplicatorNode {
    let node = NodeSpec::new(&[name], 1 << 20).start().await.unwrap();
    volume(admin, name, "orders", name, &node_of(cluster)).await;
    node
}

/// The node's sidecar, signed in as the chart's sidecar ServiceAccount in a Pod on the node.
async fn sidecar(
    replicator: &ReplicatorNode,
    server: &ApiServer,
    cluster: &str,
    endpoint: &str,
) -> Sidecar {
    let node = node_of(cluster);
    let mut options = lockstep_sidecar::Options::new(&node, cluster);
    options.namespace = NAMESPACE.into();
    options.replicator_socket = replicator.control_socket().unwrap();
    options.operator_endpoint = Some(endpoint.to_owned());
    options.insecure_plaintext_control = true;
    options.listen = "127.0.0.1:0".parse().unwrap();
    options.inventory_interval = Duration::from_millis(300);
    options.lease_duration = Duration::from_secs(3);
    let (client, _) = server.identity(SIDECAR, Some(&node)).await.unwrap();
    Sidecar::start(options, Some(client)).await.unwrap()
}

/// The name of the one node of `cluster`.
fn node_of(cluster: &str) -> String {
    format!("{cluster}-node")
}

fn phase_is(phase: Phase) -> impl Fn(&ConsistencyGroup) -> bool {
    move |group| {
        group
            .status
            .as_ref()
            .is_some_and(|status| status.phase == Some(phase))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_charts_rbac_enforced_its_service_accounts_freeze_resync_and_delete_a_group() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    // The test API server, or real kube-apiservers with LOCKSTEP_APISERVER=kube: RBAC enforced on both.
    let backend = Backend::from_env().unwrap();
    let east = ApiServer::start(backend).await.unwrap();
    let west = ApiServer::start(backend).await.unwrap();
    let (east_admin, west_admin) = (east.admin().await.unwrap(), west.admin().await.unwrap());
    for (name, server, values) in [("east", &east, HUB_VALUES), ("west", &west, MEMBER_VALUES)] {
        let kubeconfig = dir.path().join(format!("kubeconfig-{name}"));
        server.write_kubeconfig(&kubeconfig).unwrap();
        helm_install(&kubeconfig, values);
    }
    for admin in [&east_admin, &west_admin] {
        crds_established(admin).await;
        create_namespace(admin, "orders").await;
    }
    let east_node = start_node(&east_admin, "east", "wal").await;
    let west_node = start_node(&west_admin, "west", "reporting").await;

    // The hub reaches west as west's member-access ServiceAccount.
    let (_, west_kubeconfig) = west.identity(MEMBER_ACCESS, None).await.unwrap();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("west".into()),
            namespace: Some(NAMESPACE.into()),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([("kubeconfig".to_owned(), west_kubeconfig)])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(east_admin.clone(), NAMESPACE)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let clusters = Api::<MemberCluster>::all(east_admin.clone());
    let local = MemberClusterSpec {
        paths: ClusterPaths::Both,
        local: true,
        kubeconfig_secret_ref: None,
        network: None,
        service_account_keys: None,
        volume_binding: Default::default(),
    };
    let remote = MemberClusterSpec {
        paths: ClusterPaths::Both,
        local: false,
        kubeconfig_secret_ref: Some(SecretKeyRef {
            namespace: NAMESPACE.into(),
            name: "west".into(),
            key: "kubeconfig".into(),
        }),
        network: None,
        service_account_keys: None,
        volume_binding: Default::default(),
    };
    for (name, spec) in [("east", local), ("west", remote)] {
        clusters
            .create(&PostParams::default(), &MemberCluster::new(name, spec))
            .await
            .unwrap();
    }

    let options = Options {
        kubeconfig: None,
        hub_name: "east".into(),
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        resync_interval: Duration::from_millis(300),
        leader_election: true,
        namespace: NAMESPACE.into(),
        identity: "lockstep-operator-0".into(),
        lease_duration: Duration::from_secs(5),
        max_sessions_per_cluster: lockstep_operator::sessions::DEFAULT_SESSIONS_PER_CLUSTER,
        max_group_volumes: lockstep_operator::DEFAULT_MAX_GROUP_VOLUMES,
        control_security: lockstep_operator::ControlSecurity::insecure_plaintext(),
    };
    let (operator_client, _) = east.identity(OPERATOR, None).await.unwrap();
    let operator = Operator::start(operator_client, &options).await.unwrap();
    let endpoint = format!("http://{}", operator.grpc_addr);
    let _sidecars = [
        sidecar(&east_node, &east, "east", &endpoint).await,
        sidecar(&west_node, &west, "west", &endpoint).await,
    ];

    let groups = Api::<ConsistencyGroup>::all(east_admin.clone());
    let member = |cluster: &str, pvc: &str| GroupMember {
        cluster: cluster.into(),
        namespace: "orders".into(),
        pvc_names: Some(vec![pvc.to_owned()]),
        selector: None,
    };
    let spec = ConsistencyGroupSpec {
        members: vec![member("east", "wal"), member("west", "reporting")],
        policy: Policy::FreezeAndGo,
        hold_timeout: "30s".into(),
        release: None,
        resync: None,
        freeze: None,
        failover: None,
    };
    groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("orders-db", spec),
        )
        .await
        .unwrap();
    wait_for_group(&groups, "both members resolved, replicating", |group| {
        phase_is(Phase::Replicating)(group)
            && group.status.as_ref().is_some_and(|s| s.member_count == 2)
    })
    .await;

    // A planned freeze: both volumes suspended and acknowledged, then released (FreezeAndGo).
    patch_spec(&groups, serde_json::json!({"freeze": {"epoch": 0}})).await;
    wait_for_group(&groups, "frozen at epoch 1 and released", |group| {
        group.position() == (1, Stage::Release)
    })
    .await;
    patch_spec(&groups, serde_json::json!({"resync": {"epoch": 1}})).await;
    wait_for_group(&groups, "resynced and replicating", |group| {
        group.position() == (1, Stage::Resume) && phase_is(Phase::Replicating)(group)
    })
    .await;

    // Deletion: the finalizer resumes the volumes, removes the mirror, and lets the group go.
    groups
        .delete("orders-db", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the group deleted", || {
        let groups = groups.clone();
        async move {
            groups
                .get_opt("orders-db")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
    let mirrors = Api::<ConsistencyGroup>::all(west_admin.clone());
    eventually("the mirror in west removed", || {
        let mirrors = mirrors.clone();
        async move {
            let left = mirrors.list(&Default::default()).await.ok()?.items;
            left.is_empty().then_some(())
        }
    })
    .await;
    operator.shutdown().await;

    for (cluster, server, users) in [
        ("east", &east, [OPERATOR, SIDECAR]),
        ("west", &west, [MEMBER_ACCESS, SIDECAR]),
    ] {
        let denied = server.denials(&users).unwrap();
        assert!(
            denied.is_empty(),
            "the chart's RBAC refused in {cluster} ({}):\n{}",
            backend.name(),
            denied.join("\n")
        );
        let requesters = server.requesters().unwrap();
        for user in users {
            assert!(
                requesters.contains(user),
                "{user} made no request in {cluster}"
            );
        }
    }
}

/// The crate's directory: where cargo says it is when it runs this (a binary reused from a build in
/// another checkout of the same tree would otherwise read that checkout's files), else where it was built.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}
