//! `kubectl lockstep`, run through the real `kubectl` (the plugin's directory on PATH) against running
//! clusters — the repository's example (east, the hub, and west) with the real operator, sidecars and
//! replicators — through a freeze: status, timeline, a stale release refused, the release, members, the
//! resync, and certs. On the test API server, or a real kube-apiserver with LOCKSTEP_APISERVER=kube.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{Api, api::PostParams};
use lockstep_api::{
    domain::{Phase, Policy, Stage},
    v1alpha1::{ConsistencyGroup, ConsistencyGroupSpec},
};
use lockstep_e2e::{
    faults::LinkCutMode,
    scenario::{Harness, Setup, Target},
    timeline::Timeline,
};
use lockstep_testapi::kubectl::{Pick, find};
use serde_json::Value;

/// What one `kubectl` run printed.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs the real kubectl with the plugin's directory first on PATH.
struct Kubectl {
    binary: PathBuf,
    kubeconfig: PathBuf,
    path: std::ffi::OsString,
}

impl Kubectl {
    fn new(kubeconfig: &Path) -> Self {
        let plugin = Path::new(env!("CARGO_BIN_EXE_kubectl-lockstep"));
        let mut dirs = vec![plugin.parent().unwrap().to_path_buf()];
        dirs.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        Self {
            binary: find(Pick::Newest).unwrap(),
            kubeconfig: kubeconfig.to_path_buf(),
            path: std::env::join_paths(dirs).unwrap(),
        }
    }

    /// `kubectl <args>`; kubectl hands a plugin every argument after its name, `--kubeconfig` included.
    async fn run(&self, args: &[&str], timeline: &Timeline) -> Ran {
        let output = tokio::process::Command::new(&self.binary)
            .args(args)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .env("PATH", &self.path)
            .kill_on_drop(true)
            .output()
            .await
            .unwrap();
        let ran = Ran {
            ok: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        timeline.say(format!(
            "$ kubectl {}\n{}{}",
            args.join(" "),
            ran.stdout,
            ran.stderr
        ));
        ran
    }

    /// `kubectl <args>`, which must succeed; its output.
    async fn ok(&self, args: &[&str], timeline: &Timeline) -> String {
        let ran = self.run(args, timeline).await;
        assert!(
            ran.ok,
            "kubectl {args:?} failed: {}\n{}",
            ran.stderr,
            timeline.text()
        );
        ran.stdout
    }

    /// `kubectl <args> -o json`, parsed.
    async fn json(&self, args: &[&str], timeline: &Timeline) -> Value {
        let mut with = args.to_vec();
        with.extend(["-o", "json"]);
        let text = self.ok(&with, timeline).await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }
}

fn phase_is(phase: Phase) -> impl Fn(&ConsistencyGroup) -> bool {
    move |g| g.status.as_ref().and_then(|s| s.phase) == Some(phase)
}

async fn start() -> Harness {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .try_init();
    let timeline = Timeline::new(std::env::var_os("LOCKSTEP_E2E_PRINT").is_some());
    Harness::start(
        Setup::new(Policy::FreezeAndStop).unwrap(),
        Target::from_env().unwrap(),
        timeline.clone(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", timeline.text()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_timeline_release_members_and_resync_through_kubectl_after_a_freeze() {
    let mut h = start().await;
    let t = h.timeline.clone();
    let kubectl = Kubectl::new(&h.world.hub().kubeconfig);

    let plugins = kubectl.ok(&["plugin", "list"], &t).await;
    assert!(plugins.contains("kubectl-lockstep"), "{plugins}");
    let none = kubectl.run(&["lockstep", "status", "nope"], &t).await;
    assert!(!none.ok);
    assert_eq!(
        none.stderr.trim(),
        r#"error: no ConsistencyGroup named "nope" (kubectl get cg lists them)"#
    );
    let quiet = kubectl.ok(&["lockstep", "timeline", "orders-db"], &t).await;
    assert_eq!(quiet, "orders-db has not frozen yet\n");

    // West's reporting volume loses its link: the group freezes and, FreezeAndStop, holds its writes.
    h.cut(&["west-reporting"], LinkCutMode::Reset).unwrap();
    h.wait_for_copy_failure().await.unwrap();
    h.wait_group("frozen", phase_is(Phase::Frozen))
        .await
        .unwrap();
    let west = h.handle("west-reporting").unwrap();
    // The volumes' shards are written after the group's status: until they catch up, status says so.
    h.world.group_with_volumes().await.unwrap();

    let status = kubectl.json(&["lockstep", "status", "orders-db"], &t).await;
    assert_eq!(status["phase"], "Frozen", "{status}");
    assert_eq!(status.get("volumesAsOf"), None, "{status}");
    assert_eq!(
        (status["epoch"].as_u64(), status["stage"].as_str()),
        (Some(1), Some("Freeze"))
    );
    assert_eq!(status["policy"], "FreezeAndStop");
    assert_eq!(
        (status["members"].as_u64(), status["suspended"].as_u64()),
        (Some(3), Some(3))
    );
    let volumes = status["volumes"].as_array().unwrap();
    let mut claims: Vec<(String, String)> = volumes
        .iter()
        .map(|v| {
            (
                v["cluster"].as_str().unwrap().to_owned(),
                v["pvc"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    claims.sort();
    assert_eq!(
        claims,
        [
            ("east", "postgres-data"),
            ("east", "postgres-wal"),
            ("west", "reporting")
        ]
        .map(|(c, p)| (c.to_owned(), p.to_owned()))
    );
    for volume in volumes {
        assert_eq!(volume["state"], "Suspended", "{volume}");
        assert!(
            volume["acknowledged"]
                .as_str()
                .unwrap()
                .starts_with("1/Freeze via "),
            "{volume}"
        );
    }
    let table = kubectl.ok(&["lockstep", "status", "orders-db"], &t).await;
    assert!(table.starts_with("GROUP "), "{table}");
    assert!(
        table.contains(&format!("Trigger: CopyFailed on west/{west}")),
        "{table}"
    );
    for needed in [
        "Frozen",
        "FreezeAndStop",
        "reporting",
        "postgres-wal",
        "CONDITION",
    ] {
        assert!(table.contains(needed), "{needed} in\n{table}");
    }

    let timeline = kubectl
        .json(&["lockstep", "timeline", "orders-db"], &t)
        .await;
    let freeze = &timeline["freezes"][0];
    assert_eq!(
        timeline["freezes"].as_array().unwrap().len(),
        1,
        "{timeline}"
    );
    assert_eq!(
        (freeze["epoch"].as_u64(), freeze["reason"].as_str()),
        (Some(1), Some("CopyFailed"))
    );
    assert_eq!(freeze["volume"], format!("west/{west}"));
    assert!(
        matches!(freeze["path"].as_str(), Some("api" | "grpc")),
        "{freeze}"
    );
    assert_eq!(freeze["outcome"], "AwaitingRelease");
    let (suspended, frozen) = (
        freeze["suspendedMs"].as_i64().unwrap(),
        freeze["frozenMs"].as_i64().unwrap(),
    );
    assert!(0 <= suspended && suspended <= frozen, "{freeze}");
    let yaml = kubectl
        .ok(&["lockstep", "timeline", "orders-db", "-o", "yaml"], &t)
        .await;
    assert!(yaml.contains("outcome: AwaitingRelease"), "{yaml}");

    // A release naming an epoch that is not the current one is refused, in one sentence.
    let stale = kubectl
        .run(&["lockstep", "release", "orders-db", "--epoch", "0"], &t)
        .await;
    assert!(!stale.ok);
    assert_eq!(stale.stderr.trim().lines().count(), 1, "{}", stale.stderr);
    assert!(
        stale
            .stderr
            .contains("epoch 0 is stale: group orders-db is at epoch 1"),
        "{}",
        stale.stderr
    );

    let released = kubectl.ok(&["lockstep", "release", "orders-db"], &t).await;
    assert!(
        released.contains(r#"patch: {"spec":{"release":{"epoch":1}}}"#),
        "{released}"
    );
    assert!(
        released.contains("consistencygroup.lockstep.dev/orders-db patched: release at epoch 1"),
        "{released}"
    );
    h.wait_group("released", |g| g.position() == (1, Stage::Release))
        .await
        .unwrap();
    let again = kubectl.run(&["lockstep", "release", "orders-db"], &t).await;
    assert!(
        !again.ok && again.stderr.contains("already released at epoch 1"),
        "{}",
        again.stderr
    );
    let timeline = kubectl
        .json(&["lockstep", "timeline", "orders-db"], &t)
        .await;
    let freeze = &timeline["freezes"][0];
    assert_eq!(freeze["outcome"], "Released");
    assert!(
        freeze["releasedMs"].as_i64().unwrap() >= freeze["frozenMs"].as_i64().unwrap(),
        "{freeze}"
    );

    let members = kubectl
        .json(&["lockstep", "members", "orders-db"], &t)
        .await;
    for member in members["members"].as_array().unwrap() {
        assert_eq!(member["resolved"], true, "{member}");
        for field in ["persistentVolume", "volumeHandle", "node"] {
            assert!(member[field].is_string(), "{field} of {member}");
        }
    }
    let west_member = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["pvc"] == "reporting")
        .unwrap();
    assert_eq!(west_member["volumeHandle"], west.as_str());

    // A group naming claims that do not exist: members says why each is unresolved.
    let orphan: ConsistencyGroupSpec = serde_json::from_value(serde_json::json!({
        "members": [
            {"cluster": "east", "namespace": "orders", "pvcNames": ["missing"]},
            {"cluster": "west", "namespace": "orders", "pvcNames": ["gone"]},
        ],
    }))
    .unwrap();
    Api::<ConsistencyGroup>::all(h.world.hub().client.clone())
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("orphans", orphan),
        )
        .await
        .unwrap();
    let orphans = kubectl.ok(&["lockstep", "members", "orphans"], &t).await;
    // East is the hub itself; west is read through the kubeconfig Secret its MemberCluster names.
    assert!(
        orphans.contains("Unresolved: cluster east has no PVC orders/missing"),
        "{orphans}"
    );
    assert!(
        orphans.contains("Unresolved: cluster west has no PVC orders/gone"),
        "{orphans}"
    );

    // The link is back; the resync, asked through the plugin, brings every member in sync.
    let cluster = h.world.find_volume(&west).unwrap().0;
    cluster.restore_link(&west).unwrap();
    let resync = kubectl.json(&["lockstep", "resync", "orders-db"], &t).await;
    assert_eq!(
        (resync["epoch"].as_u64(), resync["applied"].as_bool()),
        (Some(1), Some(true)),
        "{resync}"
    );
    h.wait_group("in sync again", |g| {
        g.position() == (1, Stage::Resume) && phase_is(Phase::Replicating)(g)
    })
    .await
    .unwrap();
    let timeline = kubectl.ok(&["lockstep", "timeline", "orders-db"], &t).await;
    assert!(timeline.starts_with("EPOCH "), "{timeline}");
    assert!(timeline.contains("Resynced"), "{timeline}");

    // The Control path's certificates, in the namespace the chart uses.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["lockstep-operator.east.example".into()]).unwrap();
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let pem = params.self_signed(&key).unwrap().pem();
    let mut secret = Secret::default();
    secret.metadata.name = Some("lockstep-control-tls".into());
    secret.data = Some([("tls.crt".to_owned(), ByteString(pem.into_bytes()))].into());
    Api::<Secret>::namespaced(h.world.hub().client.clone(), "lockstep")
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let certs = kubectl
        .ok(&["lockstep", "certs", "-n", "lockstep"], &t)
        .await;
    assert!(certs.contains("lockstep-control-tls   tls.crt"), "{certs}");
    assert!(certs.contains("2099-01-01T00:00:00Z"), "{certs}");
    assert!(
        certs.contains("Secret lockstep/lockstep-control-ca: not found"),
        "{certs}"
    );

    h.shutdown().await;
}
