//! Smoke test of the freeze benchmark: a tiny cell per path (4 volumes, 3 trials) runs end to end through
//! the real operator and sidecars, on the test API server and on real kube-apiservers side by side, and
//! the table, CSV and SVG come out. No timing is asserted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use lockstep_e2e::ApiServerFlag;
use lockstep_e2e::freeze_bench::{self, Options, PathChoice};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_cell_per_path_freezes_every_trial_and_writes_the_table_and_plot() {
    let out = tempfile::tempdir().unwrap();
    // Real kube-apiservers too where the binaries are built (always in CI: a missing build fails there).
    let kube = lockstep_kube::KubeBinaries::for_tests().unwrap().is_some();
    let apiserver = if kube {
        vec![ApiServerFlag::Test, ApiServerFlag::Kube]
    } else {
        vec![ApiServerFlag::Test]
    };
    let backends = apiserver.len();
    let options = Options {
        volumes: vec![4],
        groups: 1,
        paths: vec![PathChoice::Both, PathChoice::Api, PathChoice::Grpc],
        trials: 3,
        warmup: 1,
        clusters: 2,
        nodes_per_cluster: 2,
        settle_ms: Duration::from_millis(50),
        // Idle for a few of the operator's periodic reconciles: nothing but Leases may be written.
        operator_resync_ms: Duration::from_millis(500),
        steady_ms: Duration::from_millis(6000),
        apiserver,
        out: out.path().to_path_buf(),
        check: true,
        ..Options::default()
    };
    let rows = freeze_bench::run(options).await.unwrap();
    assert_eq!(rows.len(), 3 * backends);
    for row in &rows {
        assert_eq!((row.volumes, row.nodes), (4, 4), "{row:?}");
        assert_eq!((row.trials, row.lost), (3, 0), "every trial froze: {row:?}");
        // Each volume was suspended before the group was frozen, and the held write released after.
        assert!(row.suspended.max > 0.0 && row.frozen.max > 0.0, "{row:?}");
        assert!(row.stall.p50 >= row.suspended.p50, "{row:?}");
        // `--check` refused steady-state writes and large objects; the figures are there to print.
        assert_eq!(row.steady_writes(), 0, "{:?}", row.steady);
        // The count sees writes: the sidecars renew their Leases where they have an API path.
        let renewed = row.steady.per_second("leases") > 0.0;
        assert_eq!(renewed, row.paths != PathChoice::Grpc, "{:?}", row.steady);
        assert!(
            row.largest.contains_key("ConsistencyGroup")
                && row.largest.contains_key("ConsistencyGroupShard"),
            "{:?}",
            row.largest
        );
    }
    let csv = std::fs::read_to_string(out.path().join("freeze-bench.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 3 * backends, "{csv}");
    assert!(
        csv.lines().any(|l| l.starts_with("test,4,grpc,2,4,3,0,")),
        "{csv}"
    );
    if kube {
        assert!(
            csv.lines().any(|l| l.starts_with("kube,4,both,2,4,3,0,")),
            "{csv}"
        );
    }
    let svg = std::fs::read_to_string(out.path().join("freeze-bench.svg")).unwrap();
    assert!(svg.contains("<polyline") && svg.contains("api"), "{svg}");
    assert!(out.path().join("freeze-bench.txt").exists());
}

/// The many-groups cell, small: 5 groups of 4 volumes, each with a volume on every node. A trial cuts one
/// node's replication link (every volume there fails its copy): every group freezes, each trial on
/// another node; then all are resynced, idle (nothing but Leases written) and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_with_a_volume_on_a_node_whose_link_fails_all_freeze() {
    let out = tempfile::tempdir().unwrap();
    // 2 member clusters of 2 nodes (the default), the test API server.
    let options = Options {
        groups: 5,
        volumes: vec![20],
        clusters: 2,
        paths: vec![PathChoice::Both],
        trials: 3,
        warmup: 1,
        steady_ms: Duration::from_millis(3000),
        operator_resync_ms: Duration::from_millis(500),
        check: true,
        out: out.path().to_path_buf(),
        ..Options::default()
    };
    let rows = freeze_bench::run(options).await.unwrap();
    let [row] = rows.as_slice() else {
        panic!("one cell: {rows:?}")
    };
    assert_eq!((row.volumes, row.groups, row.nodes), (20, 5, 4), "{row:?}");
    // Every group froze in every measured trial: 5 groups x 3 trials, none lost.
    assert_eq!((row.trials, row.lost), (3, 0), "{row:?}");
    assert!(
        row.frozen.p50 > 0.0 && row.frozen.max >= row.frozen.p50,
        "{row:?}"
    );
    assert_eq!(row.steady_writes(), 0, "{:?}", row.steady);
    let csv = std::fs::read_to_string(out.path().join("freeze-bench.csv")).unwrap();
    assert!(
        csv.lines()
            .any(|l| l.starts_with("test,20,both,2,4,3,0,") && l.ends_with(",5")),
        "{csv}"
    );
}
