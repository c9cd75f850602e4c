//! The demo scenario, in-process: two simulated clusters, three replicated volumes, the dependent-write
//! workload, one link cut, the freeze, the checker on the secondaries, the link restored and resynced —
//! the CRDs, the group and the resync intent applied with the real kubectl (run
//! `source "$(./scripts/install-tools.sh)"` first). Also a generated world of three clusters and five
//! volumes, and the freeze with the gRPC path down.
//!
//! A negative control shows the scenario and the checker catch a broken freeze: a control system that
//! releases each volume as soon as it has suspended it — before every member is frozen, against
//! DESIGN.md rule 1 — lets a suspended volume acknowledge writes early, and the checker fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use lockstep_e2e::control::{
    ControlError, ControlSystem, CopyFailure, FreezeOutcome, ManualFreeze, NodeControl, ThawOutcome,
};
use lockstep_e2e::demo::{ScenarioOptions, ScenarioReport, run_scenario};
use lockstep_e2e::faults::ControlPathFault;
use lockstep_e2e::timeline::Timeline;
use lockstep_e2e::world::World;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_freeze_keeps_the_secondaries_consistent_and_resync_makes_them_identical() {
    let timeline = Timeline::new(false);
    let mut control = ManualFreeze::new(lockstep_e2e::REPLICATOR_API);
    let options = ScenarioOptions::default();
    let report = run_scenario(&options, &mut control, &timeline)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", timeline.text()));
    let text = timeline.text();
    assert!(report.verdict.is_consistent(), "{}\n{text}", report.verdict);
    assert!(
        report.primaries.is_consistent(),
        "{}\n{text}",
        report.primaries
    );
    assert_eq!(report.failure.volume, options.cut, "{text}");
    assert_eq!(report.freeze.epoch, 1, "{text}");
    assert_eq!(report.freeze.frozen.len(), 3, "{text}");
    assert!(report.freeze.released, "{text}");
    assert_eq!(report.thaw, ThawOutcome::Resumed, "{text}");
    // The workload ran on after the release, unreplicated, and the resync copied all of it.
    assert!(
        report
            .workload
            .last_acked
            .iter()
            .zip(&report.acked_before_failure)
            .any(|(end, at_failure)| end > at_failure),
        "{text}"
    );
    for (volume, difference) in &report.differences {
        assert_eq!(
            *difference, None,
            "{volume} differs after the resync\n{text}"
        );
    }
    assert!(text.contains("verdict: CONSISTENT"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn freeze_and_stop_keeps_the_writes_held_until_the_resync_and_stays_consistent() {
    let timeline = Timeline::new(false);
    let mut control = ManualFreeze::new(lockstep_e2e::REPLICATOR_API);
    let options = ScenarioOptions {
        policy: Some(lockstep_api::domain::Policy::FreezeAndStop),
        cut: "west-reporting".into(),
        ..ScenarioOptions::default()
    };
    let report = run_scenario(&options, &mut control, &timeline)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", timeline.text()));
    let text = timeline.text();
    assert!(report.verdict.is_consistent(), "{}\n{text}", report.verdict);
    assert!(!report.freeze.released, "{text}");
    assert!(
        report.primaries.is_consistent(),
        "{}\n{text}",
        report.primaries
    );
    assert_eq!(report.thaw, ThawOutcome::Resumed, "{text}");
    for (volume, difference) in &report.differences {
        assert_eq!(
            *difference, None,
            "{volume} differs after the resync\n{text}"
        );
    }
}

/// Runs the scenario with the operator and the sidecars and checks what a person would: the checker
/// passes on the secondaries, nothing acknowledged was lost on the primaries, every volume froze and was
/// released at epoch 1 and is identical to its secondary after the resync, and `kubectl get cg -A`
/// shows the group back in Replicating in every cluster.
async fn operated_scenario(options: &ScenarioOptions) -> (ScenarioReport, String) {
    let timeline = Timeline::new(false);
    let mut control = lockstep_e2e::operated::OperatorControl::new();
    let report = run_scenario(options, &mut control, &timeline)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", timeline.text()));
    let text = timeline.text();
    assert!(report.verdict.is_consistent(), "{}\n{text}", report.verdict);
    assert!(
        report.primaries.is_consistent(),
        "{}\n{text}",
        report.primaries
    );
    assert_eq!(report.failure.volume, options.cut, "{text}");
    assert_eq!(report.freeze.epoch, 1, "{text}");
    assert_eq!(report.freeze.frozen.len(), options.volumes, "{text}");
    assert!(report.freeze.released, "{text}");
    assert_eq!(report.thaw, ThawOutcome::Resumed, "{text}");
    for (volume, difference) in &report.differences {
        assert_eq!(
            *difference, None,
            "{volume} differs after the resync\n{text}"
        );
        let said = |what: &str| {
            report
                .freeze_timeline
                .iter()
                .any(|(_, line)| line.contains(&format!("/{volume}: {what}")))
        };
        assert!(said("frozen at epoch 1"), "{volume} not frozen\n{text}");
        assert!(
            said("held writes released"),
            "{volume} not released\n{text}"
        );
    }
    assert!(
        report
            .freeze_timeline
            .iter()
            .any(|(_, line)| line.starts_with("operator: failure report received over")),
        "{text}"
    );
    assert!(
        report
            .freeze_timeline
            .iter()
            .any(|(_, line)| line.ends_with("(acknowledgement, API path)")),
        "no sidecar wrote an acknowledgement to its ReplicationNode\n{text}"
    );
    assert!(
        text.contains(
            r#"$ kubectl patch cg orders-db --type=merge -p '{"spec":{"resync":{"epoch":1}}}'"#
        ),
        "{text}"
    );
    // `kubectl get cg -A` in every cluster: the printer columns, the group (or its mirror) Replicating.
    let gets: Vec<&str> = text
        .split("$ kubectl get cg -A\n")
        .skip(1)
        .map(|after| after.lines().nth(1).unwrap_or_default())
        .collect();
    assert_eq!(gets.len(), options.clusters, "{text}");
    for row in gets {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells.get(..3),
            Some(&["orders-db", "Replicating", "1"][..]),
            "{text}"
        );
    }
    // `kubectl get cgshard` in the hub: each node's volumes of the group, one shard per node.
    let shards: Vec<&str> = text
        .split("$ kubectl get cgshard\n")
        .nth(1)
        .unwrap_or_default()
        .lines()
        .map(str::trim_start)
        .take_while(|line| line.starts_with("NAME") || line.starts_with("orders-db."))
        .collect();
    let header: Vec<&str> = shards
        .first()
        .map_or(vec![], |h| h.split_whitespace().collect());
    assert_eq!(
        header.get(..6),
        Some(&["NAME", "GROUP", "CLUSTER", "NODE", "EPOCH", "VOLUMES"][..]),
        "{text}"
    );
    assert_eq!(
        shards.len() - 1,
        options.clusters,
        "one shard per node\n{text}"
    );
    assert!(text.contains("verdict: CONSISTENT"), "{text}");
    (report, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_and_sidecars_freeze_the_group_and_the_secondaries_stay_consistent() {
    let options = ScenarioOptions::default();
    let (report, text) = operated_scenario(&options).await;
    let mut image = report.freeze.frozen.clone();
    image.sort();
    assert_eq!(
        image,
        ["east-postgres-data", "east-postgres-wal", "west-reporting"],
        "{text}"
    );
    // The example is applied from the repository's files, the CRDs too.
    for file in [
        "crds/lockstep.dev_consistencygroups.yaml",
        "examples/membercluster-hub.yaml",
        "examples/membercluster-both.yaml",
        "examples/consistencygroup-two-cluster.yaml",
    ] {
        assert!(
            text.contains(&format!("-f {file}")),
            "{file} not applied\n{text}"
        );
    }
    assert!(text.contains("secret/west-kubeconfig created"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_clusters_and_five_volumes_freeze_together() {
    let options = ScenarioOptions {
        clusters: 3,
        volumes: 5,
        cut: "north-vol-1".into(),
        ..ScenarioOptions::default()
    };
    let (report, text) = operated_scenario(&options).await;
    let mut image = report.freeze.frozen.clone();
    image.sort();
    assert_eq!(
        image,
        [
            "east-vol-1",
            "east-vol-2",
            "north-vol-1",
            "west-vol-1",
            "west-vol-2"
        ],
        "{text}"
    );
    assert!(
        text.contains("consistencygroup.lockstep.dev/orders-db created"),
        "{text}"
    );
    assert!(
        text.contains("membercluster.lockstep.dev/north created"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_grpc_path_down_the_group_freezes_through_the_api_servers() {
    let options = ScenarioOptions {
        path_fault: Some(ControlPathFault::GrpcDown),
        ..ScenarioOptions::default()
    };
    let (report, text) = operated_scenario(&options).await;
    let heard_over = |what: &str, path: &str| {
        report
            .freeze_timeline
            .iter()
            .any(|(_, line)| line.starts_with(&format!("operator: {what} received over {path}")))
    };
    assert!(heard_over("failure report", "api"), "{text}");
    assert!(!heard_over("failure report", "grpc"), "{text}");
    assert!(heard_over("acknowledgement", "api"), "{text}");
    assert!(!heard_over("acknowledgement", "grpc"), "{text}");
    // Every volume's sidecar acknowledged in its ReplicationNode: the only path left.
    for (volume, _) in &report.differences {
        assert!(
            report
                .freeze_timeline
                .iter()
                .any(|(_, line)| line.contains(&format!("at epoch 1 on {volume} written to"))),
            "{volume}: no acknowledgement in its ReplicationNode\n{text}"
        );
    }
}

/// A broken control system: it suspends and at once releases each volume in turn, waiting after each
/// release until that volume has acknowledged some writes primary-only while the others still copy.
struct EarlyRelease {
    inner: ManualFreeze,
}

impl ControlSystem for EarlyRelease {
    fn describe(&self) -> String {
        "BROKEN on purpose: releases each volume before the others are suspended".into()
    }

    async fn enroll(
        &mut self,
        world: &World,
        timeline: &Timeline,
    ) -> Result<Vec<String>, ControlError> {
        self.inner.enroll(world, timeline).await
    }

    async fn freeze(
        &mut self,
        world: &World,
        _failure: &CopyFailure,
        timeline: &Timeline,
    ) -> Result<FreezeOutcome, ControlError> {
        let epoch = 1;
        let mut frozen = Vec::new();
        for cluster in &world.clusters {
            let node = NodeControl::new(cluster, lockstep_e2e::REPLICATOR_API)?;
            for v in &cluster.volumes {
                let handle = vec![v.spec.handle.clone()];
                node.suspend(&handle, &world.group_uid, epoch).await?;
                node.release(&handle, &world.group_uid, epoch).await?;
                timeline.say(format!("broken control: {} released early", v.spec.handle));
                frozen.push(v.spec.handle.clone());
                // Let it acknowledge writes primary-only while the volumes after it still copy.
                let start = cluster.volume_status(&v.spec.handle)?.replication.next_seq;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                let mut tick = tokio::time::interval(Duration::from_millis(5));
                while cluster.volume_status(&v.spec.handle)?.replication.next_seq < start + 30
                    && tokio::time::Instant::now() < deadline
                {
                    tick.tick().await;
                }
            }
        }
        Ok(FreezeOutcome {
            epoch,
            frozen,
            released: true,
        })
    }

    async fn thaw(&mut self, _: &World, _: &Timeline) -> Result<ThawOutcome, ControlError> {
        Ok(ThawOutcome::Unsupported("not needed by this test".into()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_released_before_every_member_is_suspended_makes_the_checker_fail() {
    let timeline = Timeline::new(false);
    let mut control = EarlyRelease {
        inner: ManualFreeze::new(lockstep_e2e::REPLICATOR_API),
    };
    let report = run_scenario(&ScenarioOptions::default(), &mut control, &timeline)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", timeline.text()));
    let text = timeline.text();
    assert!(
        !report.verdict.is_consistent(),
        "the checker passed a broken freeze:\n{}\n{text}",
        report.verdict
    );
    assert!(!report.verdict.gaps().is_empty(), "{}", report.verdict);
    assert!(text.contains("verdict: INCONSISTENT"), "{text}");
}

/// `./scripts/demo.sh --apiserver kube` (the binary it runs): the same story on real kube-apiservers,
/// saying which Kubernetes it ran on, ends CONSISTENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_on_real_api_servers_ends_consistent() {
    if lockstep_kube::KubeBinaries::for_tests().unwrap().is_none() {
        return;
    }
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_lockstep-demo"))
        .args(["--apiserver", "kube"])
        .env("LOCKSTEP_KUBE_BIN", lockstep_kube::KubeBinaries::dir())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    let version = lockstep_kube::pinned_version();
    assert!(
        text.contains(&format!("east: kube-apiserver {version} on etcd up at"))
            && text.contains(&format!("west: kube-apiserver {version} on etcd up at")),
        "{text}"
    );
    assert!(text.contains("verdict: CONSISTENT"), "{text}");
}
