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
pub mod sizes;

use std::path::PathBuf;

use lockstep_kube::backend::Backend;
use std::time::{Duration, Instant};

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
    /// `--check`: something other than a Lease was written while nothing happened.
    #[error("written in steady state (nothing failing, nothing asked): {0}")]
    SteadyWrites(String),
    /// `--check`: an object over the 64 KiB bound was written.
    #[error("an object over 64 KiB was written: {0}")]
    ObjectTooLarge(String),
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

/// How many windows of `--steady-ms` a cell waits for one without writes (Leases excepted).
const QUIET_WINDOWS: usize = 6;

fn milliseconds(text: &str) -> Result<Duration, String> {
    text.parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|e| format!("milliseconds: {e}"))
}

fn seconds(text: &str) -> Result<Duration, String> {
    text.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|e| format!("seconds: {e}"))
}

/// Flags of `lockstep-freeze-bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Volume counts, one cell each (per path).
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    pub volumes: Vec<usize>,
    /// Groups each cell's volumes are split into (consecutive volumes, spanning every node). Above 1, a
    /// trial cuts one node's replication link instead — every volume there fails its copy — and every
    /// group with a volume on that node must freeze; the figures are then per group (frozen only).
    #[arg(long, default_value_t = 1)]
    pub groups: usize,
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
    /// How long each cell watches what is written while nothing happens, after its last trial's
    /// resync, in milliseconds (cover a few of the operator's periodic reconciles).
    #[arg(long, default_value = "5000", value_parser = milliseconds)]
    pub steady_ms: Duration,
    /// How long each cell's set-up may take (members resolved, every volume confirmed), in seconds.
    #[arg(long, default_value = "300", value_parser = seconds)]
    pub setup_secs: Duration,
    /// Also a test: each cell's group is deleted after its trials (its finalizer lets every volume go
    /// and removes its shards), and the run fails unless every trial froze, released and resynced and
    /// every deletion completed, and unless nothing but Leases was written in steady state and no
    /// object written exceeded 64 KiB.
    #[arg(long)]
    pub check: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            volumes: vec![10, 100, 1000],
            groups: 1,
            paths: vec![PathChoice::Both, PathChoice::Api, PathChoice::Grpc],
            trials: 50,
            warmup: 2,
            clusters: 3,
            nodes_per_cluster: 2,
            settle_ms: Duration::from_millis(200),
            operator_resync_ms: Duration::from_millis(2000),
            steady_ms: Duration::from_millis(5000),
            setup_secs: fleet::SETUP_DEADLINE,
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
        groups: options.groups,
        clusters: options.clusters,
        nodes_per_cluster: options.nodes_per_cluster,
        paths,
        operator_resync: options.operator_resync_ms,
        backend,
        setup: options.setup_secs,
    };
    let mut fleet = Fleet::start(&spec).await?;
    let mut trials = Vec::new();
    let mut per_group = Vec::new();
    let outcome = async {
        for index in 0..options.warmup + options.trials {
            if options.groups > 1 {
                let frozen = fleet.link_failure(index).await?;
                if index >= options.warmup {
                    per_group.extend(frozen);
                }
            } else {
                let marks = fleet.trial(index).await;
                if index >= options.warmup {
                    trials.push(marks);
                }
            }
            fleet.resync(options.settle_ms).await?;
        }
        // Steady state: once the last resync's trailing writes have landed (volumes reporting
        // Replicating, their shards, the claims' Events), nothing but Lease renewals may be written. A
        // window with writes is followed by another, up to QUIET_WINDOWS: writes that recur at least
        // once a window (the operator's periodic reconcile, every 2 s) never leave one quiet.
        let idle = Instant::now();
        let mut steady = fleet.steady(options.steady_ms).await?;
        for _ in 1..QUIET_WINDOWS {
            if steady.writes_beyond_leases().is_empty() {
                break;
            }
            steady = fleet.steady(options.steady_ms).await?;
        }
        steady.idle_before = idle.elapsed().saturating_sub(steady.window);
        let largest = fleet.largest_objects();
        if options.check {
            let took = fleet.delete_groups().await?;
            println!(
                "deleted: {} group(s) of {volumes} volumes and their shards gone in {} ms",
                options.groups.max(1),
                took.as_millis()
            );
        }
        Ok::<_, BenchError>((steady, largest))
    }
    .await;
    let nodes = fleet.nodes();
    fleet.shutdown().await;
    let (steady, largest) = outcome?;
    let mut result = if options.groups > 1 {
        CellResult::from_groups(
            backend.name(),
            volumes,
            options.groups,
            paths,
            options.clusters,
            nodes,
            options.trials,
            &per_group,
        )
    } else {
        CellResult::from_trials(
            backend.name(),
            volumes,
            paths,
            options.clusters,
            nodes,
            &trials,
        )
    };
    result.steady = steady;
    result.largest = largest;
    Ok(result)
}

/// `--check`: every trial completed, nothing but Leases written in steady state, no object over the
/// bound.
fn check(row: &CellResult) -> Result<(), BenchError> {
    if row.lost > 0 {
        return Err(BenchError::Lost {
            lost: row.lost,
            trials: row.trials + row.lost,
            volumes: row.volumes,
            paths: row.paths,
        });
    }
    if row.steady_writes() > 0 {
        return Err(BenchError::SteadyWrites(format!(
            "{:?} in {:.1} s",
            row.steady.writes_beyond_leases(),
            row.steady.window.as_secs_f64()
        )));
    }
    if let Some((kind, largest)) = row
        .largest
        .iter()
        .find(|(_, l)| l.bytes > sizes::OBJECT_BOUND_BYTES)
    {
        return Err(BenchError::ObjectTooLarge(format!(
            "{kind} {} is {} bytes",
            largest.name, largest.bytes
        )));
    }
    Ok(())
}

/// Runs every cell, printing each row as it comes, then writes the table (text and CSV) and the plot
/// into `--out`.
pub async fn run(options: Options) -> Result<Vec<CellResult>, BenchError> {
    let mut rows = Vec::new();
    println!(
        "freeze benchmark: {} member clusters x {} nodes, {} group(s) per cell, {} trials per cell (+{} warm-up)",
        options.clusters,
        options.nodes_per_cluster,
        options.groups.max(1),
        options.trials,
        options.warmup
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
                print!("{}", row.details());
                if options.check {
                    check(&row)?;
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
