//! Real kubectl against the test API server: the oldest and the newest of the machine's versioned
//! kubectl binaries (`kubectl.1.NN` beside the file the `kubectl` command links to; set
//! `LOCKSTEP_KUBECTL_DIR` to look elsewhere — a directory holding one version runs just that one), each
//! with a fresh `--cache-dir`: CRDs apply and become Established, the examples apply, `get` shows the printer columns,
//! `explain` prints field docs, invalid examples and unknown fields are refused with their messages,
//! `patch`, `apply --server-side`, and `delete` waiting for a finalizer; built-in kinds refuse unknown
//! fields and `explain` them.

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use common::{TestResult, eventually, server};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use lockstep_testapi::invalid_examples::InvalidExample;
use serde_json::json;

fn repo() -> PathBuf {
    manifest_dir().join("../..")
}

/// The binary to test: the oldest (`newest == false`) or newest version.
fn kubectl(newest: bool) -> Result<PathBuf, String> {
    use lockstep_testapi::kubectl::{Pick, find, versions, versions_dir};
    if versions(&versions_dir()).is_empty() {
        return Err(format!(
            "no kubectl.1.NN binaries in {}",
            versions_dir().display()
        ));
    }
    find(if newest { Pick::Newest } else { Pick::Oldest }).map_err(|e| e.to_string())
}

struct Kubectl {
    binary: PathBuf,
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args)
            .current_dir(repo())
            .kill_on_drop(true);
        cmd
    }

    async fn run(&self, args: &[&str]) -> Result<Output, std::io::Error> {
        self.command(args).output().await
    }

    /// Runs and requires success; returns stdout.
    async fn ok(&self, args: &[&str]) -> Result<String, String> {
        let out = self.run(args).await.map_err(|e| format!("{args:?}: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            return Err(format!(
                "kubectl {args:?} failed: {}{}",
                stdout,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(stdout)
    }

    /// Runs and requires failure; returns stderr.
    async fn fails(&self, args: &[&str]) -> Result<String, String> {
        let out = self.run(args).await.map_err(|e| format!("{args:?}: {e}"))?;
        if out.status.success() {
            return Err(format!(
                "kubectl {args:?} succeeded: {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

async fn scenario(newest: bool) -> TestResult {
    let (server, client) = server().await?;
    let dir = tempfile::tempdir()?;
    let k = Kubectl {
        binary: kubectl(newest)?,
        kubeconfig: dir.path().join("kubeconfig"),
        cache: dir.path().join("cache"),
    };
    server.write_kubeconfig(&k.kubeconfig)?;
    let version = k.ok(&["version", "-o", "json"]).await?;
    assert!(version.contains("v1.33.0"), "server version: {version}");

    let out = k.ok(&["apply", "-f", "crds/"]).await?;
    assert!(
        out.contains("consistencygroups.lockstep.dev created"),
        "{out}"
    );
    k.ok(&[
        "wait",
        "--for=condition=Established",
        "crd",
        "--all",
        "--timeout=30s",
    ])
    .await?;
    let out = k.ok(&["apply", "-f", "examples/"]).await?;
    assert!(
        out.contains("consistencygroup.lockstep.dev/orders-db created"),
        "{out}"
    );
    let again = k.ok(&["apply", "-f", "examples/"]).await?;
    assert!(again.contains("orders-db unchanged"), "{again}");

    // Printer columns.
    let out = k.ok(&["get", "cg"]).await?;
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        vec![
            "NAME",
            "PHASE",
            "EPOCH",
            "MEMBERS",
            "ACKNOWLEDGED",
            "SUSPENDED",
            "FROZEN",
            "AGE"
        ],
        "{out}"
    );
    assert!(out.contains("orders-db"), "{out}");

    // Field docs.
    let out = k.ok(&["explain", "cg.spec.members"]).await?;
    for field in ["cluster", "namespace", "pvcNames", "selector"] {
        assert!(out.contains(field), "explain lacks {field}: {out}");
    }

    // Invalid examples: refused with their own message.
    let invalid = InvalidExample::read_all(&repo().join("examples/invalid"))?;
    assert!(!invalid.is_empty());
    for example in invalid {
        let file = example.file_for_kubectl(dir.path())?;
        let err = k.fails(&["apply", "-f", &file.to_string_lossy()]).await?;
        assert!(
            err.contains(&example.expect),
            "{}: expected {:?} in {err:?}",
            example.file_name,
            example.expect
        );
    }

    // An unknown field.
    let unknown = dir.path().join("unknown.yaml");
    std::fs::write(
        &unknown,
        "apiVersion: lockstep.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata:\n  name: typo\nspec:\n  polcy: FreezeAndGo\n  members:\n  - cluster: east\n    namespace: a\n    pvcNames: [x]\n",
    )?;
    let err = k
        .fails(&["apply", "-f", &unknown.to_string_lossy()])
        .await?;
    assert!(err.contains("unknown field \"spec.polcy\""), "{err}");

    // Unknown fields of built-in kinds too, named as kube-apiserver names them; their docs for explain.
    let deployment = dir.path().join("deployment.yaml");
    std::fs::write(
        &deployment,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\nspec:\n  selector:\n    matchLabels: {a: b}\n  template:\n    metadata:\n      labels: {a: b}\n    spec:\n      containers:\n      - name: c\n        image: busybox\n        imagePullPolcy: Always\n",
    )?;
    let err = k
        .fails(&["apply", "-f", &deployment.to_string_lossy()])
        .await?;
    assert!(
        err.contains("unknown field \"spec.template.spec.containers[0].imagePullPolcy\""),
        "{err}"
    );
    let out = k
        .ok(&["explain", "pod.spec.containers.imagePullPolicy"])
        .await?;
    assert!(out.contains("imagePullPolicy"), "{out}");

    // Typed generators (protobuf bodies in kubectl 1.33).
    k.ok(&["create", "namespace", "orders"]).await?;
    k.ok(&[
        "-n",
        "orders",
        "create",
        "configmap",
        "cfg",
        "--from-literal=a=b",
    ])
    .await?;
    k.ok(&[
        "-n",
        "orders",
        "create",
        "secret",
        "generic",
        "sec",
        "--from-literal=password=hunter2",
    ])
    .await?;
    let data = k
        .ok(&[
            "-n",
            "orders",
            "get",
            "configmap",
            "cfg",
            "-o",
            "jsonpath={.data.a}",
        ])
        .await?;
    assert_eq!(data, "b");
    let secret = k
        .ok(&[
            "-n",
            "orders",
            "get",
            "secret",
            "sec",
            "-o",
            "jsonpath={.data.password}",
        ])
        .await?;
    assert_eq!(secret, "aHVudGVyMg==");

    // Patch, and server-side apply.
    let out = k
        .ok(&[
            "patch",
            "cg",
            "orders-db",
            "--type=merge",
            "-p",
            r#"{"spec":{"holdTimeout":"45s"}}"#,
        ])
        .await?;
    assert!(out.contains("patched"), "{out}");
    let timeout = k
        .ok(&[
            "get",
            "cg",
            "orders-db",
            "-o",
            "jsonpath={.spec.holdTimeout}",
        ])
        .await?;
    assert_eq!(timeout, "45s");
    let out = k
        .ok(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            "examples/consistencygroup-two-cluster.yaml",
        ])
        .await?;
    assert!(out.contains("serverside-applied"), "{out}");
    let timeout = k
        .ok(&[
            "get",
            "cg",
            "orders-db",
            "-o",
            "jsonpath={.spec.holdTimeout}",
        ])
        .await?;
    assert_eq!(
        timeout, "30s",
        "the applied manifest wins with --force-conflicts"
    );

    // `get -w` prints changes as rows with the printer columns.
    let mut watching = k
        .command(&["get", "cg", "-w"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = watching.stdout.take().ok_or("no stdout")?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut read_until = async |want: &[&str]| -> Result<String, String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, lines.next_line()).await {
                Ok(Ok(Some(line))) if want.iter().all(|w| line.contains(w)) => return Ok(line),
                Ok(Ok(Some(_))) => {}
                other => return Err(format!("kubectl get -w: no line with {want:?}: {other:?}")),
            }
        }
    };
    read_until(&["orders-db"]).await?;
    let groups_status = ApiResource {
        group: "lockstep.dev".into(),
        version: "v1alpha1".into(),
        api_version: "lockstep.dev/v1alpha1".into(),
        kind: "ConsistencyGroup".into(),
        plural: "consistencygroups".into(),
    };
    let status_api: Api<DynamicObject> = Api::all_with(client.clone(), &groups_status);
    status_api
        .patch_status(
            "orders-db",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Frozen", "epoch": 7}})),
        )
        .await?;
    let row = read_until(&["orders-db", "Frozen"]).await?;
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells.get(1..3), Some(&["Frozen", "7"][..]), "{row}");
    watching.kill().await?;

    // Delete waits for the finalizer.
    let groups = ApiResource {
        group: "lockstep.dev".into(),
        version: "v1alpha1".into(),
        api_version: "lockstep.dev/v1alpha1".into(),
        kind: "ConsistencyGroup".into(),
        plural: "consistencygroups".into(),
    };
    let cgs: Api<DynamicObject> = Api::all_with(client.clone(), &groups);
    let finalize =
        |list: serde_json::Value| Patch::Merge(json!({"metadata": {"finalizers": list}}));
    cgs.patch(
        "orders-db",
        &PatchParams::default(),
        &finalize(json!(["lockstep.dev/test"])),
    )
    .await?;
    let mut deleting = k
        .command(&["delete", "cg", "orders-db", "--timeout=60s"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    eventually(30, "deletionTimestamp", || async {
        cgs.get("orders-db")
            .await
            .ok()?
            .metadata
            .deletion_timestamp
            .map(|_| ())
    })
    .await?;
    assert!(
        deleting.try_wait()?.is_none(),
        "kubectl delete returned while the finalizer was there"
    );
    cgs.patch("orders-db", &PatchParams::default(), &finalize(json!(null)))
        .await?;
    let done = tokio::time::timeout(Duration::from_secs(60), deleting.wait_with_output()).await??;
    assert!(done.status.success());
    assert!(String::from_utf8_lossy(&done.stdout).contains("deleted"));
    assert!(cgs.get_opt("orders-db").await?.is_none());
    let out = k
        .ok(&["delete", "-f", "examples/", "--ignore-not-found"])
        .await?;
    assert!(
        out.contains("membercluster.lockstep.dev \"east\" deleted"),
        "{out}"
    );
    let left = k.ok(&["get", "mc", "-o", "name"]).await?;
    assert_eq!(left.trim(), "", "every MemberCluster deleted");
    Ok(())
}

#[tokio::test]
async fn the_oldest_kubectl() -> TestResult {
    scenario(false).await
}

#[tokio::test]
async fn the_newest_kubectl() -> TestResult {
    scenario(true).await
}

/// The crate's directory: where cargo says it is when it runs this (a binary reused from a build in
/// another checkout of the same tree would otherwise read that checkout's files), else where it was built.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}
