//! `replicator-bench`: 4 KiB write IOPS and latency through the replicator, measured with
//! `qemu-img bench` over NBD/TCP on loopback, at queue depth 1 and 16, for:
//!
//! - replicated, client cache `none` (no FUA): acknowledged once the primary has the write in its file and
//!   the secondary has it durable (fdatasync, group commit);
//! - replicated + FUA (client cache `writethrough`): durable on both sides before the acknowledgement;
//! - replication off + FUA: durable on the primary only (the same durability as the first row, on one
//!   disk instead of the other);
//! - replication off, no FUA;
//! - `qemu-nbd` on the same file, without and with FUA.
//!
//! IOPS come from `qemu-img bench`'s run time; the mean latency is queue depth / IOPS; p50 / p99 are
//! measured inside the replicator's NBD server (from a request's arrival to its reply being queued), so
//! they are not available for `qemu-nbd`. Figures only: nothing is asserted.
//!
//! `qemu-nbd` runs with its defaults made explicit, `--cache=writeback --aio=threads`: like the
//! replicator it writes through the page cache and calls `fdatasync` for FUA and FLUSH, so both do the
//! same work per request (`--cache=none` would add O_DIRECT device writes to every request).
//!
//! The rounds interleave the cases (each round runs every case once, in order), so every ratio is also
//! computed within each round, between runs minutes apart at most; the median of those per-round ratios
//! is printed beside the ratio of the median rows.
#![allow(clippy::print_stdout)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use lockstep_replicator::secondary::{Secondary, SecondaryConfig};
use lockstep_replicator::{CopyConfig, Primary, PrimaryConfig, VolumeConfig};

#[derive(Debug, Parser)]
#[command(
    about = "4 KiB write benchmark: replicated vs replication off vs qemu-nbd, via qemu-img bench"
)]
struct Args {
    /// Writes per run at queue depth 1.
    #[arg(long, default_value_t = 3000)]
    count_qd1: u64,
    /// Writes per run at queue depth 16.
    #[arg(long, default_value_t = 20000)]
    count_qd16: u64,
    /// Rounds over all cases (interleaved, to spread the machine's drift); the median round is shown.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Directory for the volume files (default: a temporary directory under $TMPDIR).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    Replicated,
    Off,
    QemuNbd,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    label: &'static str,
    server: Server,
    fua: bool,
}

const CASES: [Case; 6] = [
    Case {
        label: "replicated (secondary fdatasync)",
        server: Server::Replicated,
        fua: false,
    },
    Case {
        label: "replicated + FUA (both fdatasync)",
        server: Server::Replicated,
        fua: true,
    },
    Case {
        label: "replication off + FUA (fdatasync)",
        server: Server::Off,
        fua: true,
    },
    Case {
        label: "replication off, no FUA",
        server: Server::Off,
        fua: false,
    },
    Case {
        label: "qemu-nbd, no FUA",
        server: Server::QemuNbd,
        fua: false,
    },
    Case {
        label: "qemu-nbd + FUA",
        server: Server::QemuNbd,
        fua: true,
    },
];

#[derive(Debug, Clone)]
struct Row {
    round: u32,
    case: Case,
    depth: u32,
    iops: f64,
    mean_us: f64,
    p50_us: Option<u32>,
    p99_us: Option<u32>,
}

fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(idx).copied()
}

async fn qemu_img_bench(url: &str, fua: bool, count: u64, depth: u32) -> anyhow::Result<f64> {
    let cache = if fua { "writethrough" } else { "none" };
    let out = tokio::process::Command::new("qemu-img")
        .args([
            "bench",
            "-f",
            "raw",
            "-w",
            "-t",
            cache,
            "-s",
            "4096",
            "-c",
            &count.to_string(),
            "-d",
            &depth.to_string(),
            "--pattern",
            "171",
            url,
        ])
        .output()
        .await
        .context("running qemu-img bench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "qemu-img bench failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let secs = stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")
                .and_then(|r| r.strip_suffix(" seconds."))
        })
        .and_then(|s| s.parse::<f64>().ok())
        .with_context(|| format!("unexpected qemu-img bench output: {stdout}"))?;
    Ok(secs)
}

fn prefill(path: &Path, bytes: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0x5au8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn wait_for_port(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("qemu-nbd did not start listening on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn run_case(
    round: u32,
    case: Case,
    files: [&Path; 2],
    secondary: SocketAddr,
    size: u64,
    counts: [(u32, u64); 2],
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    // The replicated volume has its own file (a volume served unreplicated in between would need a
    // full resync); replication off and qemu-nbd share the other one.
    let primary_file = if case.server == Server::Replicated {
        files[0]
    } else {
        files[1]
    };
    match case.server {
        Server::Replicated | Server::Off => {
            let copy = (case.server == Server::Replicated).then(|| CopyConfig {
                secondary: secondary.to_string(),
                timeout: Duration::from_secs(30),
            });
            let primary = Primary::start(PrimaryConfig {
                volumes: vec![VolumeConfig::new(
                    "vol1",
                    primary_file.to_owned(),
                    Some(size),
                    copy,
                )],
                nbd_listen: Some("127.0.0.1:0".parse()?),
                nbd_socket: None,
                record_latency: true,
                control_socket: None,
            })
            .await?;
            let addr = primary.nbd_addr().context("no NBD address")?;
            let url = format!("nbd://{addr}/vol1");
            // Warm up (connections, page cache), unmeasured.
            qemu_img_bench(&url, case.fua, 500, 16).await?;
            for (depth, count) in counts {
                primary.take_latencies();
                let secs = qemu_img_bench(&url, case.fua, count, depth).await?;
                let mut lat = primary.take_latencies();
                lat.sort_unstable();
                let iops = count as f64 / secs;
                rows.push(Row {
                    round,
                    case,
                    depth,
                    iops,
                    mean_us: f64::from(depth) / iops * 1e6,
                    p50_us: percentile(&lat, 0.50),
                    p99_us: percentile(&lat, 0.99),
                });
            }
            if let Some(v) = primary.volume("vol1") {
                let status = v.status();
                if status.pending != 0 || status.dirty_bytes != 0 {
                    bail!("unexpected volume state after the run: {status:?}");
                }
            }
        }
        Server::QemuNbd => {
            let port = free_port()?;
            let mut child = tokio::process::Command::new("qemu-nbd")
                .args(["-f", "raw", "-x", "vol1", "-b", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .args(["-t", "-e", "4", "--cache=writeback", "--aio=threads"])
                .arg(primary_file)
                .kill_on_drop(true)
                .spawn()
                .context("starting qemu-nbd")?;
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
            wait_for_port(addr).await?;
            let url = format!("nbd://{addr}/vol1");
            qemu_img_bench(&url, case.fua, 500, 16).await?;
            for (depth, count) in counts {
                let secs = qemu_img_bench(&url, case.fua, count, depth).await?;
                let iops = count as f64 / secs;
                rows.push(Row {
                    round,
                    case,
                    depth,
                    iops,
                    mean_us: f64::from(depth) / iops * 1e6,
                    p50_us: None,
                    p99_us: None,
                });
            }
            child.kill().await.ok();
        }
    }
    Ok(rows)
}

fn fmt_us(v: Option<u32>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn find(rows: &[Row], label: &str, depth: u32) -> Option<Row> {
    rows.iter()
        .find(|r| r.case.label == label && r.depth == depth)
        .cloned()
}

/// The machine's load average (1, 5, 15 minutes), as the kernel prints it.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".into(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

/// One of issue 5's targets: `metric(ours) / metric(theirs)` at `depth`, at least or at most `limit`.
struct Target {
    what: &'static str,
    ours: &'static str,
    theirs: &'static str,
    depth: u32,
    metric: fn(&Row) -> f64,
    at_least: bool,
    limit: f64,
}

fn targets() -> [Target; 8] {
    let latency = |what, ours, theirs| Target {
        what,
        ours,
        theirs,
        depth: 1,
        metric: |r| r.mean_us,
        at_least: false,
        limit: 1.5,
    };
    let throughput = |what, ours, theirs, depth, limit| Target {
        what,
        ours,
        theirs,
        depth,
        metric: |r| r.iops,
        at_least: true,
        limit,
    };
    let [replicated, replicated_fua, off_fua, off, qemu, qemu_fua] = CASES.map(|c| c.label);
    [
        latency("replicated vs off+FUA: QD1 latency", replicated, off_fua),
        throughput(
            "replicated vs off+FUA: QD16 IOPS",
            replicated,
            off_fua,
            16,
            0.7,
        ),
        latency(
            "replicated+FUA vs off+FUA: QD1 latency",
            replicated_fua,
            off_fua,
        ),
        throughput(
            "replicated+FUA vs off+FUA: QD16 IOPS",
            replicated_fua,
            off_fua,
            16,
            0.7,
        ),
        throughput("off vs qemu-nbd, no FUA: QD1 IOPS", off, qemu, 1, 1.0),
        throughput("off vs qemu-nbd, no FUA: QD16 IOPS", off, qemu, 16, 1.0),
        throughput("off vs qemu-nbd, FUA: QD1 IOPS", off_fua, qemu_fua, 1, 1.0),
        throughput(
            "off vs qemu-nbd, FUA: QD16 IOPS",
            off_fua,
            qemu_fua,
            16,
            1.0,
        ),
    ]
}

/// A target's ratio within each round: the median, and every round's value.
fn per_round_ratios(all: &[Row], rounds: u32, target: &Target) -> Option<(f64, Vec<f64>)> {
    let ratios: Vec<f64> = (0..rounds)
        .filter_map(|round| {
            let pick = |label: &str| {
                all.iter()
                    .find(|r| r.round == round && r.case.label == label && r.depth == target.depth)
            };
            Some((target.metric)(pick(target.ours)?) / (target.metric)(pick(target.theirs)?))
        })
        .collect();
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    Some((*sorted.get(sorted.len() / 2)?, ratios))
}

fn fmt_ratios(ratios: &[f64]) -> String {
    ratios
        .iter()
        .map(|r| format!("{r:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_owned()
        }
    };
    let size = (args.count_qd1.max(args.count_qd16).max(500) * 4096).next_multiple_of(1 << 20);
    let replicated_file = dir.join("primary-replicated");
    let primary_file = dir.join("primary-vol1");
    let secondary_dir = dir.join("secondary");
    std::fs::create_dir_all(&secondary_dir)?;
    // Allocate both files up front so no case pays for block allocation.
    prefill(&replicated_file, size)?;
    prefill(&primary_file, size)?;
    prefill(&secondary_dir.join("vol1"), size)?;
    let secondary = Secondary::start(SecondaryConfig {
        listen: "127.0.0.1:0".parse()?,
        dir: secondary_dir,
    })
    .await?;

    println!(
        "4 KiB sequential writes, qemu-img bench over NBD/TCP loopback; {} CPUs; files in {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        dir.display()
    );
    println!(
        "count: {} at QD1, {} at QD16, median of {} rounds; mean = QD / IOPS (client side); p50/p99 measured in the replicator's server (request in -> reply queued)",
        args.count_qd1,
        args.count_qd16,
        args.rounds.max(1)
    );
    println!("load average at start: {}", load_average());
    let rounds = args.rounds.max(1);
    let counts = [(1, args.count_qd1), (16, args.count_qd16)];
    let mut all: Vec<Row> = Vec::new();
    for round in 0..rounds {
        for case in CASES {
            all.extend(
                run_case(
                    round,
                    case,
                    [&replicated_file, &primary_file],
                    secondary.local_addr(),
                    size,
                    counts,
                )
                .await?,
            );
        }
        println!(
            "round {} of {rounds} done (load average {})",
            round + 1,
            load_average()
        );
    }
    // Per case and depth, the round with the median IOPS.
    let mut rows = Vec::new();
    for case in CASES {
        for (depth, _) in counts {
            let mut runs: Vec<Row> = all
                .iter()
                .filter(|r| r.case.label == case.label && r.depth == depth)
                .cloned()
                .collect();
            runs.sort_by(|a, b| a.iops.total_cmp(&b.iops));
            if let Some(median) = runs.get(runs.len() / 2) {
                rows.push(median.clone());
            }
        }
    }
    println!();
    println!(
        "| {:<36} | {:>3} | {:>9} | {:>9} | {:>7} | {:>7} |",
        "case", "QD", "IOPS", "mean µs", "p50 µs", "p99 µs"
    );
    println!(
        "|{:-<38}|{:-<5}|{:-<11}|{:-<11}|{:-<9}|{:-<9}|",
        "", "", "", "", "", ""
    );
    for r in &rows {
        println!(
            "| {:<36} | {:>3} | {:>9.0} | {:>9.0} | {:>7} | {:>7} |",
            r.case.label,
            r.depth,
            r.iops,
            r.mean_us,
            fmt_us(r.p50_us),
            fmt_us(r.p99_us)
        );
    }
    println!();
    println!(
        "Targets (issue 5): ratio of the median rows; in brackets the median of the per-round ratios, then each round's"
    );
    for target in targets() {
        let (Some(ra), Some(rb)) = (
            find(&rows, target.ours, target.depth),
            find(&rows, target.theirs, target.depth),
        ) else {
            continue;
        };
        let ratio = (target.metric)(&ra) / (target.metric)(&rb);
        let met = if target.at_least {
            ratio >= target.limit
        } else {
            ratio <= target.limit
        };
        let per_round = per_round_ratios(&all, rounds, &target)
            .map(|(median, each)| format!(" [{median:.2}; {}]", fmt_ratios(&each)))
            .unwrap_or_default();
        println!(
            "  {}: {ratio:.2}{per_round} (target {} {}: {})",
            target.what,
            if target.at_least { ">=" } else { "<=" },
            target.limit,
            if met { "met" } else { "MISSED" }
        );
    }
    println!("load average at end: {}", load_average());
    Ok(())
}
