//! The real kubectl (the newest `kubectl.1.NN` of the machine) against a real kube-apiserver on etcd,
//! built from source at the pinned version: `/version` names that version; the CRDs apply and become
//! Established; every example applies, and applies again unchanged; `get cg` shows the printer
//! columns; `explain` prints field docs; server-side apply owns fields; every `examples/invalid/`
//! manifest is refused with the text of its `# expect:` header in the real server's answer.
//!
//! One cluster for the whole file (it takes tens of seconds to start). Without the binaries
//! (`./scripts/build-kube.sh`) this test fails in CI and says it skipped elsewhere.

use std::path::{Path, PathBuf};
use std::process::Output;

use kube::api::{Api, ApiResource, DynamicObject};
use lockstep_kube::{ClusterOptions, KubeBinaries, RealCluster, pinned_version};
use lockstep_testapi::invalid_examples::InvalidExample;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Kubectl {
    binary: PathBuf,
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    async fn run(&self, args: &[&str]) -> Result<Output, std::io::Error> {
        tokio::process::Command::new(&self.binary)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args)
            .current_dir(repo())
            .kill_on_drop(true)
            .output()
            .await
    }

    /// Runs and requires success; returns stdout.
    async fn ok(&self, args: &[&str]) -> Result<String, String> {
        let out = self.run(args).await.map_err(|e| format!("{args:?}: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            return Err(format!(
                "kubectl {args:?} failed: {stdout}{}",
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_against_the_real_api_server() -> TestResult {
    let Some(binaries) = KubeBinaries::for_tests()? else {
        return Ok(());
    };
    let cluster = RealCluster::start(&binaries, &ClusterOptions::default()).await?;
    let dir = tempfile::tempdir()?;
    let k = Kubectl {
        binary: lockstep_testapi::kubectl::find(lockstep_testapi::kubectl::Pick::Newest)?,
        kubeconfig: cluster.kubeconfig().to_path_buf(),
        cache: dir.path().join("cache"),
    };

    // The server is the pinned release, and says so (Helm checks a chart's kubeVersion against it).
    let version = cluster.client().apiserver_version().await?;
    assert_eq!(version.git_version, pinned_version());
    let out = k.ok(&["version", "-o", "json"]).await?;
    assert!(out.contains(pinned_version()), "kubectl version: {out}");

    let out = k.ok(&["apply", "-f", "crds/"]).await?;
    assert!(
        out.contains(
            "customresourcedefinition.apiextensions.k8s.io/consistencygroups.lockstep.dev created"
        ),
        "{out}"
    );
    k.ok(&[
        "wait",
        "--for=condition=Established",
        "crd",
        "--all",
        "--timeout=60s",
    ])
    .await?;

    let out = k.ok(&["apply", "-f", "examples/"]).await?;
    assert!(
        out.contains("consistencygroup.lockstep.dev/orders-db created"),
        "{out}"
    );
    let again = k.ok(&["apply", "-f", "examples/"]).await?;
    assert!(again.contains("orders-db unchanged"), "{again}");

    // Printer columns, as the real server's table converter prints them.
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

    // Field docs from the real server's OpenAPI v3.
    let out = k.ok(&["explain", "cg.spec.members"]).await?;
    for field in ["cluster", "namespace", "pvcNames", "selector"] {
        assert!(out.contains(field), "explain lacks {field}: {out}");
    }

    // Server-side apply: a field manager owns what it applied, in the real managedFields.
    k.ok(&[
        "apply",
        "--server-side",
        "--field-manager=lockstep-test",
        "-f",
        "examples/consistencygroup-two-cluster.yaml",
        "--force-conflicts",
    ])
    .await?;
    let groups: Api<DynamicObject> = Api::all_with(
        cluster.client(),
        &ApiResource {
            group: "lockstep.dev".into(),
            version: "v1alpha1".into(),
            api_version: "lockstep.dev/v1alpha1".into(),
            kind: "ConsistencyGroup".into(),
            plural: "consistencygroups".into(),
        },
    );
    let group = groups.get("orders-db").await?;
    let managers: Vec<String> = group
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.iter().any(|m| m == "lockstep-test"),
        "managers: {managers:?}"
    );

    // Every invalid example refused by the real server, with the text its header promises.
    let invalid = InvalidExample::read_all(&repo().join("examples/invalid"))?;
    assert!(!invalid.is_empty());
    let mut mismatches = Vec::new();
    for example in invalid {
        let file = example.file_for_kubectl(dir.path())?;
        let err = k.fails(&["apply", "-f", &file.to_string_lossy()]).await?;
        if !err.contains(&example.expect) {
            mismatches.push(format!(
                "{}: expected {:?} in {err:?}",
                example.file_name, example.expect
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    Ok(())
}
