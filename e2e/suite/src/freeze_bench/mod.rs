//! The freeze benchmark (`lockstep-freeze-bench`): how long from a failed copy to a frozen group, by
//! group size and by path.
//!
//! Each cell (volume count × paths) builds a [`fleet::Fleet`] — test API servers over real HTTP, the
//! real operator and one real sidecar per node talking real HTTP and gRPC, in-memory replicators behind
//! the real `Replicator` gRPC service — then runs trials. A trial fails one volume's copy (a write is
//! held) and stamps, from the moment the replicator announces `CopyFailed`:
//! - **suspended**: every volume of the group suspended at the new epoch (the last `Suspend` served);
//! - **frozen** (the freeze latency): the hub's group at the new epoch, stage Release — the operator had
//!   every volume's acknowledgement of the freeze and persisted the release decision (it sends the release
//!   right after), as seen by a watch on the hub;
//! - **stall**: the held write released (the `Release` of its volume served) — what the workload waits.
//!
//! Between trials the group is thawed with `spec.resync.epoch` set to the trial's epoch, and the next
//! trial starts once the group and every volume are Replicating at that epoch (plus `--settle-ms`), so
//! each trial freezes at a fresh epoch from the same steady state.

pub mod fleet;
pub mod replicator;
pub mod report;

use std::path::PathBuf;

use lockstep_kube::backend::Backend;
use std::time::Duration;

use fleet::{CellSpec, Fleet};
use report::CellResult;

/// Which paths reach the member clusters in a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum PathChoice {
    /// Both paths (MemberCluster `paths: Both`; sidecars with the API server and the gRPC stream).
    Both,
    /// The API server only (`ApiOnly`; sidecars without an operator endpoint).
    Api,
    /// gRPC only (`GrpcOnly`, no kubeconfig; sidecars with `--no-api-path`).
    Grpc,
}

impl std::fmt::Display for PathChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathChoice::Both => "both",
            PathChoice::Api => "api",
            PathChoice::Grpc => "grpc",
        })
    }
}

/// Why the benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A test API server failed to start or to take the CRDs.
    #[error("test API server: {0}")]
    ApiServer(String),
    /// A request to an API server failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: kube::Error,
    },
    /// A component did not start.
    #[error("starting {0}")]
    Start(String),
    /// An in-memory replicator did not start.
    #[error("replicator: {0}")]
    Replicator(String),
    /// Something did not happen in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// `--check`: shards left in the hub after the group's deletion completed.
    #[error("{0} shards of the deleted group were left in the hub")]
    ShardsLeft(usize),
    /// `--check`: trials that did not complete.
    #[error("{lost} of {trials} trials did not complete at {volumes} volumes ({paths:?})")]
    Lost {
        /// Trials lost.
        lost: usize,
        /// Trials run.
        trials: usize,
        /// The cell's volume count.
        volumes: usize,
        /// The cell's paths.
        paths: PathChoice,
    },
    /// A file could not be written.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A kubeconfig could not be rendered.
    #[error("kubeconfig: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
}

fn milliseconds(text: &str) -> Result<Duration, String> {
    text.parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|e| format!("milliseconds: {e}"))
}

/// Flags of `lockstep-freeze-bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Volume counts, one cell each (per path).
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    pub volumes: Vec<usize>,
    /// Which paths reach the members: both, api (API server only), grpc (gRPC only).
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "both,api,grpc"
    )]
    pub paths: Vec<PathChoice>,
    /// Measured trials per cell.
    #[arg(long, default_value_t = 50)]
    pub trials: usize,
    /// Unmeasured trials first, per cell (connections warm, caches filled).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Member clusters (the hub is one more API server, holding the group and running the operator).
    #[arg(long, default_value_t = 3)]
    pub clusters: usize,
    /// Nodes (sidecars, replicators) per member cluster; fixed across volume counts.
    #[arg(long, default_value_t = 2)]
    pub nodes_per_cluster: usize,
    /// Pause after each resync before the next trial, in milliseconds (lets trailing writes land).
    #[arg(long, default_value = "200", value_parser = milliseconds)]
    pub settle_ms: Duration,
    /// The operator's periodic reconcile interval, in milliseconds (its default is 2000).
    #[arg(long, default_value = "2000", value_parser = milliseconds)]
    pub operator_resync_ms: Duration,
    /// The API servers, one set of cells each, side by side in one table: `test` (the test API
    /// server) and/or `kube` (kube-apiserver and etcd built from source; `./scripts/build-kube.sh`).
    #[arg(long, value_delimiter = ',', value_enum, default_value = "test")]
    pub apiserver: Vec<crate::ApiServerFlag>,
    /// Where the table goes: freeze-bench.csv, freeze-bench.txt and freeze-bench.svg.
    #[arg(long, default_value = "target/freeze-bench")]
    pub out: PathBuf,
    /// Also a test: each cell's group is deleted after its trials (its finalizer lets every volume go
    /// and removes its shards), and the run fails unless every trial froze, released and resynced and
    /// every deletion completed.
    #[arg(long)]
    pub check: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            volumes: vec![10, 100, 1000],
            paths: vec![PathChoice::Both, PathChoice::Api, PathChoice::Grpc],
            trials: 50,
            warmup: 2,
            clusters: 3,
            nodes_per_cluster: 2,
            settle_ms: Duration::from_millis(200),
            operator_resync_ms: Duration::from_millis(2000),
            apiserver: vec![crate::ApiServerFlag::Test],
            out: PathBuf::from("target/freeze-bench"),
            check: false,
        }
    }
}

/// Runs one cell: builds it, runs the warm-up and measured trials, tears it down.
pub async fn run_cell(
    options: &Options,
    backend: Backend,
    volumes: usize,
    paths: PathChoice,
) -> Result<CellResult, BenchError> {
    let spec = CellSpec {
        volumes,
        clusters: options.clusters,
        nodes_per_cluster: options.nodes_per_cluster,
        paths,
        operator_resync: options.operator_resync_ms,
        backend,
    };
    let mut fleet = Fleet::start(&spec).await?;
    let mut trials = Vec::new();
    let outcome = async {
        for index in 0..options.warmup + options.trials {
            let marks = fleet.trial(index).await;
            if index >= options.warmup {
                trials.push(marks);
            }
            fleet.resync(options.settle_ms).await?;
        }
        if options.check {
            let took = fleet.delete_group().await?;
            println!(
                "deleted: the group of {volumes} volumes and its shards gone in {} ms",
                took.as_millis()
            );
        }
        Ok::<(), BenchError>(())
    }
    .await;
    let nodes = fleet.nodes();
    fleet.shutdown().await;
    outcome?;
    Ok(CellResult::from_trials(
        backend.name(),
        volumes,
        paths,
        options.clusters,
        nodes,
        &trials,
    ))
}

/// Runs every cell, printing each row as it comes, then writes the table (text and CSV) and the plot
/// into `--out`.
pub async fn run(options: Options) -> Result<Vec<CellResult>, BenchError> {
    let mut rows = Vec::new();
    println!(
        "freeze benchmark: {} member clusters x {} nodes, {} trials per cell (+{} warm-up)",
        options.clusters, options.nodes_per_cluster, options.trials, options.warmup
    );
    for &apiserver in &options.apiserver {
        let backend = match apiserver {
            crate::ApiServerFlag::Test => Backend::Test,
            crate::ApiServerFlag::Kube => Backend::Kube,
        };
        for &paths in &options.paths {
            for &volumes in &options.volumes {
                let row = run_cell(&options, backend, volumes, paths).await?;
                print!("{}", report::table(std::slice::from_ref(&row)));
                if options.check && row.lost > 0 {
                    return Err(BenchError::Lost {
                        lost: row.lost,
                        trials: row.trials + row.lost,
                        volumes,
                        paths,
                    });
                }
                rows.push(row);
            }
        }
    }
    // Side by side: each (paths, volumes) cell of every backend on adjacent lines.
    rows.sort_by_key(|r| (r.paths, r.volumes, r.apiserver != "test"));
    let table = report::table(&rows);
    println!("\n{table}");
    std::fs::create_dir_all(&options.out)?;
    std::fs::write(options.out.join("freeze-bench.txt"), &table)?;
    std::fs::write(options.out.join("freeze-bench.csv"), report::csv(&rows))?;
    std::fs::write(options.out.join("freeze-bench.svg"), report::svg(&rows))?;
    println!(
        "written: {}/freeze-bench.{{txt,csv,svg}}",
        options.out.display()
    );
    Ok(rows)
}
