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
        paths: vec![PathChoice::Both, PathChoice::Api, PathChoice::Grpc],
        trials: 3,
        warmup: 1,
        clusters: 2,
        nodes_per_cluster: 2,
        settle_ms: Duration::from_millis(50),
        operator_resync_ms: Duration::from_millis(2000),
        apiserver,
        out: out.path().to_path_buf(),
        check: true,
    };
    let rows = freeze_bench::run(options).await.unwrap();
    assert_eq!(rows.len(), 3 * backends);
    for row in &rows {
        assert_eq!((row.volumes, row.nodes), (4, 4), "{row:?}");
        assert_eq!((row.trials, row.lost), (3, 0), "every trial froze: {row:?}");
        // Each volume was suspended before the group was frozen, and the held write released after.
        assert!(row.suspended.max > 0.0 && row.frozen.max > 0.0, "{row:?}");
        assert!(row.stall.p50 >= row.suspended.p50, "{row:?}");
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
