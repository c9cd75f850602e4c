//! The real Helm against a real kube-apiserver at the pinned version: the chart installs (its
//! `kubeVersion` accepts the server's `/version`) with its CRDs, Deployment, DaemonSet and RBAC; a
//! ServiceAccount token minted through TokenRequest (`kubectl create token`) signs the operator in, and
//! the real RBAC authorizer lets it read the groups but not delete them; the sidecar's identity, a token
//! bound to a Pod on a node, carries the node's name (TokenReview) and may keep its Lease but not read
//! Secrets; the chart uninstalls, and its
//! namespace is deleted (by the real kube-controller-manager's namespace controller).
//!
//! Without the binaries (`./scripts/build-kube.sh`) this test fails in CI and says it skipped elsewhere.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams};
use kube::api::{ObjectMeta, PostParams};
use lockstep_kube::{ClusterOptions, KubeBinaries, RealCluster};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Helm: `$LOCKSTEP_TOOLS/bin/helm` (where `scripts/install-tools.sh` puts it), else `helm` on PATH.
fn helm_binary() -> PathBuf {
    std::env::var_os("LOCKSTEP_TOOLS")
        .map(|tools| PathBuf::from(tools).join("bin/helm"))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("helm"))
}

/// Runs a command and requires success; returns stdout.
async fn run_ok(program: &Path, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .current_dir(repo())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("{} {args:?}: {e}", program.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(format!(
            "{} {args:?} failed: {stdout}{}",
            program.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(stdout)
}

fn replication_nodes() -> ApiResource {
    ApiResource {
        group: "lockstep.dev".into(),
        version: "v1alpha1".into(),
        api_version: "lockstep.dev/v1alpha1".into(),
        kind: "ReplicationNode".into(),
        plural: "replicationnodes".into(),
    }
}

/// A ReplicationNode `name` that says it is node `node`'s.
fn replication_node(name: &str, node: &str) -> DynamicObject {
    DynamicObject::new(name, &replication_nodes()).data(serde_json::json!({
        "spec": {"nodeName": node, "cluster": "east"}
    }))
}

fn consistency_groups() -> ApiResource {
    ApiResource {
        group: "lockstep.dev".into(),
        version: "v1alpha1".into(),
        api_version: "lockstep.dev/v1alpha1".into(),
        kind: "ConsistencyGroup".into(),
        plural: "consistencygroups".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_installs_the_chart_and_its_identities_meet_the_real_rbac() -> TestResult {
    let Some(binaries) = KubeBinaries::for_tests()? else {
        return Ok(());
    };
    let options = ClusterOptions {
        controller_manager: true,
        audit: true,
        ..ClusterOptions::default()
    };
    let cluster = RealCluster::start(&binaries, &options).await?;
    let kubeconfig = cluster.kubeconfig().to_string_lossy().to_string();
    let helm = helm_binary();
    let kubectl = lockstep_testapi::kubectl::find(lockstep_testapi::kubectl::Pick::Newest)?;
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache").to_string_lossy().to_string();

    let out = run_ok(
        &helm,
        &[
            "install",
            "lockstep",
            "deploy/helm/lockstep",
            "--kubeconfig",
            &kubeconfig,
            "--namespace",
            "lockstep",
            "--create-namespace",
            "--set",
            "clusterName=east",
        ],
    )
    .await?;
    assert!(out.contains("STATUS: deployed"), "{out}");

    let client = cluster.client();
    let operator = Api::<Deployment>::namespaced(client.clone(), "lockstep")
        .get("lockstep-operator")
        .await?;
    assert_eq!(
        operator.spec.and_then(|s| s.replicas),
        Some(2),
        "the operator's replicas"
    );
    Api::<DaemonSet>::namespaced(client.clone(), "lockstep")
        .get("lockstep-sidecar")
        .await?;

    // The operator's identity: a token from TokenRequest, signed by the cluster's ServiceAccount key.
    let token = run_ok(
        &kubectl,
        &[
            "--kubeconfig",
            &kubeconfig,
            "--cache-dir",
            &cache,
            "create",
            "token",
            "lockstep-operator",
            "--namespace",
            "lockstep",
        ],
    )
    .await?;
    let (_, operator_client) = cluster
        .kubeconfig_for_token("lockstep-operator", token.trim())
        .await?;
    let groups: Api<DynamicObject> = Api::all_with(operator_client, &consistency_groups());
    groups.list(&ListParams::default()).await?;
    let refused = groups
        .delete("orders-db", &DeleteParams::default())
        .await
        .err()
        .ok_or("the operator's ServiceAccount deleted a ConsistencyGroup")?;
    match refused {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(
                status
                    .message
                    .contains("system:serviceaccount:lockstep:lockstep-operator"),
                "{status:?}"
            );
        }
        other => return Err(format!("expected a 403 from RBAC, got {other}").into()),
    }
    // The audit log (how other tests prove that RBAC refused nothing) records the refusal.
    let refusals: Vec<_> = cluster
        .audit_events()?
        .into_iter()
        .filter(|event| event.forbidden)
        .collect();
    assert!(
        refusals.iter().any(|event| event.user
            == "system:serviceaccount:lockstep:lockstep-operator"
            && event.verb == "delete"
            && event.code == 403
            && event.uri.contains("/consistencygroups/orders-db")),
        "{refusals:?}"
    );

    // The sidecar's identity: a token bound to a Pod on node "wal", as the kubelet there would mount it.
    let sidecar = cluster
        .service_account_on_node("lockstep", "lockstep-sidecar", "wal")
        .await?;
    assert_eq!(
        sidecar.user,
        "system:serviceaccount:lockstep:lockstep-sidecar"
    );
    let review = Api::<TokenReview>::all(client.clone())
        .create(
            &PostParams::default(),
            &TokenReview {
                spec: TokenReviewSpec {
                    token: Some(sidecar.token.clone()),
                    ..TokenReviewSpec::default()
                },
                ..TokenReview::default()
            },
        )
        .await?;
    let status = review.status.ok_or("a TokenReview without status")?;
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    let user = status.user.ok_or("a TokenReview without user")?;
    assert_eq!(user.username.as_deref(), Some(sidecar.user.as_str()));
    let extra = user.extra.unwrap_or_default();
    assert_eq!(
        extra.get("authentication.kubernetes.io/node-name"),
        Some(&vec!["wal".to_string()]),
        "{extra:?}"
    );
    // The chart's node restriction (a ValidatingAdmissionPolicy): the sidecar on "wal" writes its own
    // ReplicationNode and Lease, and nobody else's, nor the operator's leader Lease. The API server starts
    // enforcing a new policy within a second or two: the first refusal is waited for.
    let leases = Api::<Lease>::namespaced(sidecar.client.clone(), "lockstep");
    let nodes = Api::<DynamicObject>::all_with(sidecar.client.clone(), &replication_nodes());
    let refusal = |what: &'static str| {
        move |result: Result<DynamicObject, kube::Error>| -> Result<String, String> {
            match result {
                Err(kube::Error::Api(status)) if status.code == 403 || status.code == 422 => {
                    Ok(status.message)
                }
                other => Err(format!("{what}: expected a refusal, got {other:?}")),
            }
        }
    };
    let mut waited = 0;
    let other_node = loop {
        let result = nodes
            .create(&PostParams::default(), &replication_node("bob", "bob"))
            .await;
        match refusal("another node's ReplicationNode")(result) {
            Ok(message) => break message,
            Err(_) if waited < 100 => {
                // Not yet enforced: undo and try again.
                let _ = nodes.delete("bob", &DeleteParams::default()).await;
                waited += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    assert!(
        other_node.contains("ValidatingAdmissionPolicy 'lockstep-sidecar-node-restriction'")
            && other_node.contains(
                "the sidecar on node wal may write only its own replicationnodes \"wal\", not \"bob\""
            ),
        "{other_node}"
    );
    let lying = refusal("a ReplicationNode declaring another node")(
        nodes
            .create(&PostParams::default(), &replication_node("wal", "bob"))
            .await,
    )?;
    assert!(
        lying.contains("the sidecar on node wal may not declare spec.nodeName \"bob\""),
        "{lying}"
    );
    nodes
        .create(&PostParams::default(), &replication_node("wal", "wal"))
        .await?;
    let lease = |name: &str| Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Lease::default()
    };
    leases
        .create(&PostParams::default(), &lease("lockstep-sidecar-wal"))
        .await?;
    for name in ["lockstep-sidecar-bob", "lockstep-operator-leader"] {
        match leases.create(&PostParams::default(), &lease(name)).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 403, "{status:?}");
                assert!(
                    status.message.contains(&format!(
                        "may write only its own leases \"lockstep-sidecar-wal\", not \"{name}\""
                    )),
                    "{status:?}"
                );
            }
            other => return Err(format!("the sidecar on wal wrote Lease {name}: {other:?}").into()),
        }
    }
    // A sidecar token bound to no Pod (so naming no node) writes nothing.
    let unbound = cluster
        .service_account("lockstep", "lockstep-sidecar")
        .await?;
    match Api::<Lease>::namespaced(unbound.client.clone(), "lockstep")
        .create(&PostParams::default(), &lease("lockstep-sidecar-wal2"))
        .await
    {
        Err(kube::Error::Api(status)) => assert!(
            status.message.contains("the sidecar's token names no node"),
            "{status:?}"
        ),
        other => return Err(format!("a token naming no node wrote a Lease: {other:?}").into()),
    }
    match Api::<Secret>::namespaced(sidecar.client.clone(), "lockstep")
        .list(&ListParams::default())
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => return Err(format!("the sidecar listed Secrets: {other:?}").into()),
    }

    // No kubelet confirms the end of a Pod bound to a node: delete the identity's Pod at once, or the
    // namespace's deletion waits for it forever.
    Api::<Pod>::namespaced(client.clone(), "lockstep")
        .delete(
            "lockstep-sidecar-wal",
            &DeleteParams::default().grace_period(0),
        )
        .await?;

    let out = run_ok(
        &helm,
        &[
            "uninstall",
            "lockstep",
            "--kubeconfig",
            &kubeconfig,
            "--namespace",
            "lockstep",
        ],
    )
    .await?;
    assert!(out.contains("uninstalled"), "{out}");
    // kubectl waits until the namespace is gone: the namespace controller emptied and finalized it.
    let out = run_ok(
        &kubectl,
        &[
            "--kubeconfig",
            &kubeconfig,
            "--cache-dir",
            &cache,
            "delete",
            "namespace",
            "lockstep",
            "--wait",
            "--timeout=120s",
        ],
    )
    .await?;
    assert!(out.contains("namespace \"lockstep\" deleted"), "{out}");
    Ok(())
}
