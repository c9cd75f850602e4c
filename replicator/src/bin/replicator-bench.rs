//! `replicator-bench`: 4 KiB write IOPS and latency through the replicator over NBD/TCP on loopback,
//! at queue depth 1 and 16, for:
//!
//! - replicated, no FUA: acknowledged once the primary has the write in its file and the secondary has
//!   it durable (fdatasync, group commit);
//! - replicated + FUA: durable on both sides before the acknowledgement;
//! - replicated over an authenticated link: the first case with the link in mutual TLS (certificates
//!   made in-process, one CA per site), to a secondary of its own;
//! - replication off + FUA: durable on the primary only (the same durability as the first row, on one
//!   disk instead of the other);
//! - replication off, no FUA;
//! - `qemu-nbd` on the same file, without and with FUA.
//!
//! Every case is measured by the same client, built in: one TCP connection (fixed newstyle handshake,
//! `NBD_OPT_GO`, or `NBD_OPT_EXPORT_NAME` if the server has no GO), sequential 4 KiB `NBD_CMD_WRITE`s
//! (with `NBD_CMD_FLAG_FUA` for the FUA cases) kept `QD` in flight, replies matched by cookie. Each
//! request is timed from just before it is sent to the moment its reply is read, so IOPS, p50 and p99
//! are client-side figures for every server alike. `--qemu-img` adds `qemu-img bench`'s IOPS for the same
//! writes as a cross-check of the built-in client. Figures only: nothing is asserted.
//!
//! `qemu-nbd` runs with its defaults made explicit, `--cache=writeback --aio=threads`: like the
//! replicator it writes through the page cache and calls `fdatasync` for FUA and FLUSH, so both do the
//! same work per request (`--cache=none` would add O_DIRECT device writes to every request).
//!
//! The secondary runs in this process but on a tokio runtime of its own, as it would in its own process
//! (on another node, in a deployment); the client and the primary share the main runtime.
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
use lockstep_replicator::link_tls::SiteCa;
use lockstep_replicator::secondary::{Secondary, SecondaryConfig};
use lockstep_replicator::{CopyConfig, LinkSecurity, Primary, PrimaryConfig, VolumeConfig};

use client::NbdClient;

#[derive(Debug, Parser)]
#[command(
    about = "4 KiB write benchmark: replicated vs replication off vs qemu-nbd, client-side latency"
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
    /// Also run `qemu-img bench` for every case and depth and show its IOPS (a cross-check).
    #[arg(long)]
    qemu_img: bool,
    /// Directory for the volume files (default: a temporary directory under $TMPDIR).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run only the cases whose label contains this text (for profiling one case), e.g. `--only "off + FUA"`.
    #[arg(long)]
    only: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    Replicated,
    /// Replicated over a mutual-TLS link.
    ReplicatedTls,
    Off,
    QemuNbd,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    label: &'static str,
    server: Server,
    fua: bool,
}

const CASES: [Case; 7] = [
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
        label: "replicated, TLS link (secondary fdatasync)",
        server: Server::ReplicatedTls,
        fua: false,
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
    /// Writes per second over the run, client side.
    iops: f64,
    mean_us: f64,
    p50_us: f64,
    p99_us: f64,
    /// `qemu-img bench`'s IOPS for the same writes, with `--qemu-img`.
    qemu_img_iops: Option<f64>,
}

/// The export every server offers.
const EXPORT: &str = "vol1";
/// The longest one run may take before it counts as a stall.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len().saturating_sub(1)) as f64 * p).round() as usize;
    sorted.get(idx).copied().unwrap_or(f64::NAN)
}

/// One run of the built-in client: `count` writes at `depth`, timed per request.
async fn measure(
    addr: SocketAddr,
    fua: bool,
    count: u64,
    depth: u32,
) -> anyhow::Result<(f64, f64, f64, f64)> {
    let mut client = NbdClient::connect(addr, EXPORT).await?;
    let started = Instant::now();
    let latencies = tokio::time::timeout(RUN_TIMEOUT, client.write_run(count, depth, fua))
        .await
        .with_context(|| format!("{count} writes at QD{depth} took over {RUN_TIMEOUT:?}"))??;
    let secs = started.elapsed().as_secs_f64();
    client.disconnect().await?;
    let mut us: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    us.sort_by(f64::total_cmp);
    let mean = us.iter().sum::<f64>() / us.len().max(1) as f64;
    Ok((
        count as f64 / secs,
        mean,
        percentile(&us, 0.50),
        percentile(&us, 0.99),
    ))
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
            &client::BLOCK.to_string(),
            "-c",
            &count.to_string(),
            "-d",
            &depth.to_string(),
            "--pattern",
            &client::PATTERN.to_string(),
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
    Ok(count as f64 / secs)
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

/// What a run measures, the same for every case.
#[derive(Debug, Clone, Copy)]
struct Plan {
    counts: [(u32, u64); 2],
    qemu_img: bool,
}

/// Runs every depth of `plan` against the NBD server at `addr`.
async fn measure_all(
    round: u32,
    case: Case,
    addr: SocketAddr,
    plan: Plan,
) -> anyhow::Result<Vec<Row>> {
    // Warm up (connection, page cache), unmeasured.
    measure(addr, case.fua, 500, 16).await?;
    let mut rows = Vec::new();
    for (depth, count) in plan.counts {
        let (iops, mean_us, p50_us, p99_us) = measure(addr, case.fua, count, depth).await?;
        let qemu_img_iops = if plan.qemu_img {
            let url = format!("nbd://{addr}/{EXPORT}");
            Some(qemu_img_bench(&url, case.fua, count, depth).await?)
        } else {
            None
        };
        rows.push(Row {
            round,
            case,
            depth,
            iops,
            mean_us,
            p50_us,
            p99_us,
            qemu_img_iops,
        });
    }
    Ok(rows)
}

/// Starts the secondary on a runtime of its own, as its own process would have (in a deployment it is
/// on another node): sharing the primary's and the client's workers would add their queueing to its
/// path. Returns its address; it serves until the process ends.
fn start_secondary(dir: PathBuf, security: LinkSecurity) -> anyhow::Result<SocketAddr> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("secondary")
        .enable_all()
        .build()?;
    let (started, addr) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("secondary".into())
        .spawn(move || {
            runtime.block_on(async move {
                let secondary = Secondary::start(SecondaryConfig {
                    listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                    dir,
                    security,
                })
                .await;
                match secondary {
                    Ok(secondary) => {
                        let _ = started.send(Ok(secondary.local_addr()));
                        secondary.wait().await;
                    }
                    Err(e) => {
                        let _ = started.send(Err(e));
                    }
                }
            });
        })?;
    addr.recv()
        .context("the secondary's thread ended")?
        .context("starting the secondary")
}

/// The replicator serving [`EXPORT`] from `file` on a loopback port, copied to a secondary if `copy`.
async fn start_primary(
    file: &Path,
    size: u64,
    copy: Option<CopyConfig>,
) -> anyhow::Result<(Primary, SocketAddr)> {
    let primary = Primary::start(PrimaryConfig {
        volumes: vec![VolumeConfig::new(EXPORT, file.to_owned(), Some(size), copy)],
        nbd_listen: Some("127.0.0.1:0".parse()?),
        nbd_socket: None,
        record_latency: false,
        control_socket: None,
    })
    .await?;
    let addr = primary.nbd_addr().context("no NBD address")?;
    Ok((primary, addr))
}

/// Where the replicated cases copy to: the plaintext secondary, and the TLS one with the primary's
/// link security.
#[derive(Debug, Clone)]
struct Secondaries {
    plaintext: SocketAddr,
    tls: SocketAddr,
    primary_tls: LinkSecurity,
}

/// The two secondaries (each on a runtime of its own, with a directory of its own under `dir`).
fn start_secondaries(dir: &Path) -> anyhow::Result<Secondaries> {
    let primary_site = SiteCa::new("bench primary site")?;
    let secondary_site = SiteCa::new("bench secondary site")?;
    let primary_tls =
        LinkSecurity::Tls(primary_site.link_tls("bench-primary", &[], &secondary_site)?);
    let secondary_tls = LinkSecurity::Tls(secondary_site.link_tls(
        "bench-secondary",
        &["127.0.0.1"],
        &primary_site,
    )?);
    Ok(Secondaries {
        plaintext: start_secondary(dir.join("secondary"), LinkSecurity::Plaintext)?,
        tls: start_secondary(dir.join("secondary-tls"), secondary_tls)?,
        primary_tls,
    })
}

async fn run_case(
    round: u32,
    case: Case,
    files: [&Path; 3],
    secondaries: &Secondaries,
    size: u64,
    plan: Plan,
) -> anyhow::Result<Vec<Row>> {
    // Each replicated volume has its own file (a volume served unreplicated in between would need a
    // full resync); replication off and qemu-nbd share the last one.
    let primary_file = match case.server {
        Server::Replicated => files[0],
        Server::ReplicatedTls => files[1],
        Server::Off | Server::QemuNbd => files[2],
    };
    match case.server {
        Server::Replicated | Server::ReplicatedTls | Server::Off => {
            let copy = match case.server {
                Server::Replicated => Some(CopyConfig::plaintext(
                    &secondaries.plaintext.to_string(),
                    Duration::from_secs(30),
                )),
                Server::ReplicatedTls => Some(CopyConfig {
                    secondary: secondaries.tls.to_string(),
                    timeout: Duration::from_secs(30),
                    security: secondaries.primary_tls.clone(),
                }),
                _ => None,
            };
            let (primary, addr) = start_primary(primary_file, size, copy).await?;
            let rows = measure_all(round, case, addr, plan).await?;
            if let Some(v) = primary.volume(EXPORT) {
                let status = v.status();
                if status.replication.pending != 0 || status.replication.dirty_bytes != 0 {
                    bail!("unexpected volume state after the run: {status:?}");
                }
            }
            Ok(rows)
        }
        Server::QemuNbd => {
            let port = free_port()?;
            let mut child = tokio::process::Command::new("qemu-nbd")
                .args(["-f", "raw", "-x", EXPORT, "-b", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .args(["-t", "-e", "4", "--cache=writeback", "--aio=threads"])
                .arg(primary_file)
                .kill_on_drop(true)
                .spawn()
                .context("starting qemu-nbd")?;
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
            wait_for_port(addr).await?;
            let rows = measure_all(round, case, addr, plan).await;
            child.kill().await.ok();
            rows
        }
    }
}

fn find(rows: &[Row], label: &str, depth: u32) -> Option<Row> {
    rows.iter()
        .find(|r| r.case.label == label && r.depth == depth)
        .cloned()
}

/// The table of median rows, with `qemu-img bench`'s IOPS if it ran.
fn print_table(rows: &[Row], qemu_img: bool) {
    let extra = |v: &str| {
        if qemu_img {
            format!(" {v:>13} |")
        } else {
            String::new()
        }
    };
    println!();
    println!(
        "| {:<42} | {:>3} | {:>7} | {:>7} | {:>7} | {:>7} |{}",
        "case",
        "QD",
        "IOPS",
        "mean µs",
        "p50 µs",
        "p99 µs",
        extra("qemu-img IOPS")
    );
    println!(
        "|{:-<44}|{:-<5}|{:-<9}|{:-<9}|{:-<9}|{:-<9}|{}",
        "",
        "",
        "",
        "",
        "",
        "",
        if qemu_img {
            "-".repeat(15) + "|"
        } else {
            String::new()
        }
    );
    for r in rows {
        let qemu = r
            .qemu_img_iops
            .map_or_else(|| "-".into(), |v| format!("{v:.0}"));
        println!(
            "| {:<42} | {:>3} | {:>7.0} | {:>7.0} | {:>7.0} | {:>7.0} |{}",
            r.case.label,
            r.depth,
            r.iops,
            r.mean_us,
            r.p50_us,
            r.p99_us,
            extra(&qemu)
        );
    }
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
    /// The bound; `None` for a comparison printed for reference only.
    limit: Option<f64>,
    /// What a comparison for reference compares.
    reference: &'static str,
}

fn targets() -> [Target; 10] {
    const TWO_COPIES: &str = "two durable copies against one";
    let latency = |what, ours, theirs, limit| Target {
        what,
        ours,
        theirs,
        depth: 1,
        metric: |r| r.p50_us,
        at_least: false,
        limit,
        reference: TWO_COPIES,
    };
    let throughput = |what, ours, theirs, depth, limit| Target {
        what,
        ours,
        theirs,
        depth,
        metric: |r| r.iops,
        at_least: true,
        limit,
        reference: TWO_COPIES,
    };
    let [
        replicated,
        replicated_fua,
        tls,
        off_fua,
        off,
        qemu,
        qemu_fua,
    ] = CASES.map(|c| c.label);
    const TLS_COST: &str = "the authenticated link against plaintext";
    [
        Target {
            reference: TLS_COST,
            ..latency(
                "TLS link vs plaintext: QD1 p50 latency",
                tls,
                replicated,
                None,
            )
        },
        Target {
            reference: TLS_COST,
            ..throughput(
                "TLS link vs plaintext: QD16 IOPS",
                tls,
                replicated,
                16,
                None,
            )
        },
        // The comparison: one durable copy each (the secondary's, the primary's).
        latency(
            "replicated vs off+FUA: QD1 p50 latency",
            replicated,
            off_fua,
            Some(1.5),
        ),
        throughput(
            "replicated vs off+FUA: QD16 IOPS",
            replicated,
            off_fua,
            16,
            Some(0.7),
        ),
        // Two durable copies against one, on the same disk here: for reference.
        latency(
            "replicated+FUA vs off+FUA: QD1 p50 latency",
            replicated_fua,
            off_fua,
            None,
        ),
        throughput(
            "replicated+FUA vs off+FUA: QD16 IOPS",
            replicated_fua,
            off_fua,
            16,
            None,
        ),
        throughput("off vs qemu-nbd, no FUA: QD1 IOPS", off, qemu, 1, Some(1.0)),
        throughput(
            "off vs qemu-nbd, no FUA: QD16 IOPS",
            off,
            qemu,
            16,
            Some(1.0),
        ),
        throughput(
            "off vs qemu-nbd, FUA: QD1 IOPS",
            off_fua,
            qemu_fua,
            1,
            Some(1.0),
        ),
        throughput(
            "off vs qemu-nbd, FUA: QD16 IOPS",
            off_fua,
            qemu_fua,
            16,
            Some(1.0),
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
    let replicated_tls_file = dir.join("primary-replicated-tls");
    let primary_file = dir.join("primary-vol1");
    // Allocate every file up front so no case pays for block allocation.
    for file in [&replicated_file, &replicated_tls_file, &primary_file] {
        prefill(file, size)?;
    }
    for secondary_dir in ["secondary", "secondary-tls"].map(|d| dir.join(d)) {
        std::fs::create_dir_all(&secondary_dir)?;
        prefill(&secondary_dir.join("vol1"), size)?;
    }
    let secondaries = start_secondaries(&dir)?;

    println!(
        "4 KiB sequential writes over NBD/TCP loopback, built-in client (one connection); {} CPUs; files in {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        dir.display()
    );
    println!(
        "count: {} at QD1, {} at QD16, median round (by IOPS) of {}; IOPS, mean, p50 and p99 all client side (request sent -> reply read)",
        args.count_qd1,
        args.count_qd16,
        args.rounds.max(1)
    );
    println!("load average at start: {}", load_average());
    let rounds = args.rounds.max(1);
    let selected: Vec<Case> = CASES
        .into_iter()
        .filter(|c| {
            args.only
                .as_ref()
                .is_none_or(|only| c.label.contains(only.as_str()))
        })
        .collect();
    if selected.is_empty() {
        bail!("--only {:?} matches no case", args.only.unwrap_or_default());
    }
    let counts = [(1, args.count_qd1), (16, args.count_qd16)];
    let plan = Plan {
        counts,
        qemu_img: args.qemu_img,
    };
    let mut all: Vec<Row> = Vec::new();
    for round in 0..rounds {
        for case in selected.iter().copied() {
            all.extend(
                run_case(
                    round,
                    case,
                    [&replicated_file, &replicated_tls_file, &primary_file],
                    &secondaries,
                    size,
                    plan,
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
    print_table(&rows, args.qemu_img);
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
        let per_round = per_round_ratios(&all, rounds, &target)
            .map(|(median, each)| format!(" [{median:.2}; {}]", fmt_ratios(&each)))
            .unwrap_or_default();
        let verdict = match target.limit {
            None => format!("for reference: {}", target.reference),
            Some(limit) => {
                let met = if target.at_least {
                    ratio >= limit
                } else {
                    ratio <= limit
                };
                format!(
                    "target {} {limit}: {}",
                    if target.at_least { ">=" } else { "<=" },
                    if met { "met" } else { "MISSED" }
                )
            }
        };
        println!("  {}: {ratio:.2}{per_round} ({verdict})", target.what);
    }
    println!("load average at end: {}", load_average());
    Ok(())
}

/// A small NBD client for timing writes: fixed newstyle handshake, simple replies, one TCP connection.
mod client {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::{Mutex, PoisonError};
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail, ensure};
    use lockstep_replicator::nbd::proto;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::Semaphore;

    /// The bytes of every write (qemu-img bench's `--pattern 171`).
    pub const PATTERN: u8 = 171;
    /// The size of every write.
    pub const BLOCK: u32 = 4096;
    /// The longest option reply data accepted.
    const MAX_REPLY_DATA: u32 = proto::MAX_OPTION_LEN;

    /// A connection in the transmission phase.
    pub struct NbdClient<S> {
        stream: S,
        /// The export's size in bytes.
        pub size: u64,
        /// The export's transmission flags.
        pub flags: u16,
    }

    impl NbdClient<TcpStream> {
        /// Connects over TCP and opens `export`.
        pub async fn connect(addr: SocketAddr, export: &str) -> anyhow::Result<Self> {
            let stream = TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            stream.set_nodelay(true)?;
            NbdClient::handshake(stream, export).await
        }
    }

    async fn read_u16<S: AsyncRead + Unpin>(s: &mut S) -> anyhow::Result<u16> {
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await?;
        Ok(u16::from_be_bytes(b))
    }

    async fn read_u64<S: AsyncRead + Unpin>(s: &mut S) -> anyhow::Result<u64> {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).await?;
        Ok(u64::from_be_bytes(b))
    }

    async fn send_option<S: AsyncWrite + Unpin>(
        s: &mut S,
        option: u32,
        data: &[u8],
    ) -> anyhow::Result<()> {
        let length = u32::try_from(data.len()).context("option data too long")?;
        let mut buf = proto::encode_option_header(&proto::OptionHeader { option, length }).to_vec();
        buf.extend_from_slice(data);
        s.write_all(&buf).await?;
        Ok(())
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> NbdClient<S> {
        /// Runs the fixed newstyle handshake on `stream`: `NBD_OPT_GO`, or `NBD_OPT_EXPORT_NAME` if
        /// the server does not support GO.
        pub async fn handshake(mut stream: S, export: &str) -> anyhow::Result<Self> {
            let magic = read_u64(&mut stream)
                .await
                .context("reading the greeting")?;
            ensure!(magic == proto::NBD_MAGIC, "bad greeting magic {magic:#x}");
            let opt = read_u64(&mut stream)
                .await
                .context("reading the greeting")?;
            ensure!(opt == proto::IHAVEOPT, "not a newstyle server ({opt:#x})");
            let server_flags = read_u16(&mut stream)
                .await
                .context("reading the greeting")?;
            ensure!(
                server_flags & proto::FLAG_FIXED_NEWSTYLE != 0,
                "server is not fixed newstyle"
            );
            let no_zeroes = server_flags & proto::FLAG_NO_ZEROES != 0;
            let mut client_flags = proto::CLIENT_FLAG_FIXED_NEWSTYLE;
            if no_zeroes {
                client_flags |= proto::CLIENT_FLAG_NO_ZEROES;
            }
            stream.write_all(&client_flags.to_be_bytes()).await?;

            let go = proto::encode_info_request(&proto::InfoRequest {
                name: export.to_owned(),
                items: Vec::new(),
            });
            send_option(&mut stream, proto::OPT_GO, &go).await?;
            let mut export_info = None;
            loop {
                let mut header = [0u8; 20];
                stream
                    .read_exact(&mut header)
                    .await
                    .context("reading an option reply")?;
                let magic = u64::from_be_bytes(header[0..8].try_into()?);
                ensure!(
                    magic == proto::OPTION_REPLY_MAGIC,
                    "bad option reply magic {magic:#x}"
                );
                let option = u32::from_be_bytes(header[8..12].try_into()?);
                ensure!(
                    option == proto::OPT_GO,
                    "reply to option {option}, not to GO"
                );
                let reply_type = u32::from_be_bytes(header[12..16].try_into()?);
                let len = u32::from_be_bytes(header[16..20].try_into()?);
                ensure!(
                    len <= MAX_REPLY_DATA,
                    "option reply of {len} bytes is too long"
                );
                let mut data = vec![0u8; len as usize];
                stream
                    .read_exact(&mut data)
                    .await
                    .context("reading an option reply")?;
                match reply_type {
                    proto::REP_ACK => break,
                    proto::REP_INFO => {
                        let kind = data.get(0..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
                        if kind == Some(proto::INFO_EXPORT) {
                            ensure!(data.len() == 12, "NBD_INFO_EXPORT of {len} bytes");
                            let mut size = [0u8; 8];
                            size.copy_from_slice(&data[2..10]);
                            export_info = Some((
                                u64::from_be_bytes(size),
                                u16::from_be_bytes([data[10], data[11]]),
                            ));
                        }
                    }
                    proto::REP_ERR_UNSUP => {
                        return NbdClient::export_name(stream, export, no_zeroes).await;
                    }
                    t if t & (1 << 31) != 0 => {
                        bail!(
                            "server refused export {export:?}: error {t:#x} {}",
                            String::from_utf8_lossy(&data)
                        )
                    }
                    // Other informational replies (NBD_REP_SERVER, ...) carry nothing needed here.
                    _ => {}
                }
            }
            let (size, flags) = export_info.context("GO acknowledged without NBD_INFO_EXPORT")?;
            Ok(NbdClient {
                stream,
                size,
                flags,
            })
        }

        /// The older way in: `NBD_OPT_EXPORT_NAME`, answered with size and flags (no option reply).
        async fn export_name(mut stream: S, export: &str, no_zeroes: bool) -> anyhow::Result<Self> {
            send_option(&mut stream, proto::OPT_EXPORT_NAME, export.as_bytes()).await?;
            let size = read_u64(&mut stream)
                .await
                .context("reading the EXPORT_NAME reply")?;
            let flags = read_u16(&mut stream)
                .await
                .context("reading the EXPORT_NAME reply")?;
            if !no_zeroes {
                let mut zeroes = [0u8; 124];
                stream
                    .read_exact(&mut zeroes)
                    .await
                    .context("reading the EXPORT_NAME reply")?;
            }
            Ok(NbdClient {
                stream,
                size,
                flags,
            })
        }

        /// Writes `count` sequential [`BLOCK`]-byte blocks from offset 0 (wrapping at the export's end),
        /// `depth` in flight, with the FUA flag if `fua`; returns each request's latency (send to reply),
        /// in completion order. Any error reply, unknown cookie or malformed reply is an error.
        pub async fn write_run(
            &mut self,
            count: u64,
            depth: u32,
            fua: bool,
        ) -> anyhow::Result<Vec<Duration>> {
            ensure!(depth > 0, "queue depth 0");
            let blocks = self.size / u64::from(BLOCK);
            ensure!(blocks > 0, "export of {} bytes is too small", self.size);
            ensure!(
                !fua || self.flags & proto::TX_SEND_FUA != 0,
                "the server does not take FUA (transmission flags {:#x})",
                self.flags
            );
            let flags = if fua { proto::CMD_FLAG_FUA } else { 0 };
            let credits = Semaphore::new(depth as usize);
            let in_flight: Mutex<HashMap<u64, Instant>> = Mutex::new(HashMap::new());
            let (mut rx, mut tx) = tokio::io::split(&mut self.stream);
            let send = async {
                let mut buf = vec![PATTERN; proto::REQUEST_LEN + BLOCK as usize];
                for cookie in 0..count {
                    credits.acquire().await?.forget();
                    let header = proto::encode_request_header(&proto::RequestHeader {
                        flags,
                        command: proto::CMD_WRITE,
                        cookie,
                        offset: (cookie % blocks) * u64::from(BLOCK),
                        length: BLOCK,
                    });
                    buf[..proto::REQUEST_LEN].copy_from_slice(&header);
                    in_flight
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(cookie, Instant::now());
                    tx.write_all(&buf).await.context("sending a write")?;
                }
                Ok::<(), anyhow::Error>(())
            };
            let receive = async {
                let mut latencies = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
                let mut header = [0u8; proto::SIMPLE_REPLY_LEN];
                for _ in 0..count {
                    rx.read_exact(&mut header)
                        .await
                        .context("reading a reply")?;
                    let at = Instant::now();
                    let reply = proto::parse_simple_reply(&header).context("malformed reply")?;
                    let sent = in_flight
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&reply.cookie)
                        .with_context(|| {
                            format!(
                                "reply to cookie {:#x}, which is not in flight",
                                reply.cookie
                            )
                        })?;
                    ensure!(
                        reply.error == 0,
                        "write {} failed with error {}",
                        reply.cookie,
                        reply.error
                    );
                    latencies.push(at - sent);
                    credits.add_permits(1);
                }
                Ok(latencies)
            };
            let ((), latencies) = tokio::try_join!(send, receive)?;
            Ok(latencies)
        }

        /// Sends `NBD_CMD_DISC` and closes the connection.
        pub async fn disconnect(mut self) -> anyhow::Result<()> {
            let header = proto::encode_request_header(&proto::RequestHeader {
                flags: 0,
                command: proto::CMD_DISC,
                cookie: u64::MAX,
                offset: 0,
                length: 0,
            });
            self.stream.write_all(&header).await?;
            self.stream.shutdown().await?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::client::{BLOCK, NbdClient, PATTERN};
    use super::*;
    use lockstep_replicator::nbd::proto;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A fake server: sends `bytes` and ends its side, then reads and drops whatever the client sends.
    fn fake(bytes: Vec<u8>) -> DuplexStream {
        let (client, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let (mut server, mut out) = tokio::io::split(server);
            out.write_all(&bytes).await.unwrap();
            out.shutdown().await.unwrap();
            let mut sink = vec![0u8; 1 << 16];
            while server.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        });
        client
    }

    /// A greeting and a GO answered with an 8 MiB export that takes FUA.
    fn good_handshake() -> Vec<u8> {
        let mut b = proto::server_greeting().to_vec();
        let info = proto::info_export(8 << 20, proto::TX_FLAGS);
        b.extend(proto::option_reply(proto::OPT_GO, proto::REP_INFO, &info));
        b.extend(proto::option_reply(proto::OPT_GO, proto::REP_ACK, &[]));
        b
    }

    async fn handshake_error(bytes: Vec<u8>) -> String {
        match NbdClient::handshake(fake(bytes), EXPORT).await {
            Ok(_) => panic!("handshake accepted"),
            Err(e) => format!("{e:#}"),
        }
    }

    async fn run_error(replies: &[u8]) -> String {
        let mut bytes = good_handshake();
        bytes.extend_from_slice(replies);
        let mut client = NbdClient::handshake(fake(bytes), EXPORT).await.unwrap();
        assert_eq!(client.size, 8 << 20);
        match client.write_run(4, 2, true).await {
            Ok(_) => panic!("run accepted"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[tokio::test]
    async fn malformed_handshakes_are_errors() {
        let mut bad_magic = good_handshake();
        bad_magic[0] ^= 1;
        assert!(handshake_error(bad_magic).await.contains("greeting magic"));

        let mut too_long = proto::server_greeting().to_vec();
        too_long.extend(proto::option_reply(proto::OPT_GO, proto::REP_INFO, &[]));
        too_long[18 + 16..18 + 20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(handshake_error(too_long).await.contains("too long"));

        let mut no_info = proto::server_greeting().to_vec();
        no_info.extend(proto::option_reply(proto::OPT_GO, proto::REP_ACK, &[]));
        assert!(handshake_error(no_info).await.contains("NBD_INFO_EXPORT"));

        let mut short_info = proto::server_greeting().to_vec();
        short_info.extend(proto::option_reply(
            proto::OPT_GO,
            proto::REP_INFO,
            &[0, 0, 1],
        ));
        assert!(
            handshake_error(short_info)
                .await
                .contains("NBD_INFO_EXPORT")
        );

        let mut refused = proto::server_greeting().to_vec();
        refused.extend(proto::option_reply(
            proto::OPT_GO,
            proto::REP_ERR_UNKNOWN,
            b"no",
        ));
        assert!(handshake_error(refused).await.contains("refused"));

        let truncated = proto::server_greeting()[..10].to_vec();
        assert!(handshake_error(truncated).await.contains("greeting"));
    }

    #[tokio::test]
    async fn export_name_is_the_fallback_when_go_is_unsupported() {
        let mut b = proto::server_greeting().to_vec();
        b.extend(proto::option_reply(
            proto::OPT_GO,
            proto::REP_ERR_UNSUP,
            &[],
        ));
        b.extend(proto::export_name_reply(1 << 20, proto::TX_FLAGS, true));
        let client = NbdClient::handshake(fake(b), EXPORT).await.unwrap();
        assert_eq!((client.size, client.flags), (1 << 20, proto::TX_FLAGS));
    }

    #[tokio::test]
    async fn malformed_or_unexpected_replies_are_errors() {
        let mut bad_magic = proto::simple_reply(0, 0);
        bad_magic[0] ^= 1;
        assert!(run_error(&bad_magic).await.contains("malformed reply"));
        let unknown = proto::simple_reply(0, 99);
        assert!(run_error(&unknown).await.contains("not in flight"));
        let mut twice = proto::simple_reply(0, 0).to_vec();
        twice.extend(proto::simple_reply(0, 0));
        assert!(run_error(&twice).await.contains("not in flight"));
        let failed = proto::simple_reply(proto::EIO, 0);
        assert!(run_error(&failed).await.contains("error 5"));
        let short = &proto::simple_reply(0, 0)[..7];
        assert!(run_error(short).await.contains("reading a reply"));
    }

    #[tokio::test]
    async fn fua_is_refused_by_a_server_that_does_not_offer_it() {
        let mut b = proto::server_greeting().to_vec();
        let info = proto::info_export(1 << 20, proto::TX_HAS_FLAGS);
        b.extend(proto::option_reply(proto::OPT_GO, proto::REP_INFO, &info));
        b.extend(proto::option_reply(proto::OPT_GO, proto::REP_ACK, &[]));
        let mut client = NbdClient::handshake(fake(b), EXPORT).await.unwrap();
        let e = client.write_run(1, 1, true).await.unwrap_err();
        assert!(format!("{e:#}").contains("FUA"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn timed_writes_through_the_replicator_land_and_are_all_answered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        let (_primary, addr) = start_primary(&path, 1 << 20, None).await.unwrap();
        for (count, depth, fua) in [(300, 16, true), (40, 1, false), (1, 16, false)] {
            let mut client = NbdClient::connect(addr, EXPORT).await.unwrap();
            assert_eq!(client.size, 1 << 20);
            let latencies = client.write_run(count, depth, fua).await.unwrap();
            assert_eq!(latencies.len() as u64, count);
            client.disconnect().await.unwrap();
        }
        // 300 writes wrap around the 256 blocks: every block holds the pattern.
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len() as u64, 256 * u64::from(BLOCK));
        assert!(data.iter().all(|&b| b == PATTERN));
        let (iops, mean, p50, p99) = measure(addr, false, 64, 4).await.unwrap();
        assert!(iops > 0.0 && mean > 0.0 && p50 > 0.0 && p99 >= p50);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn timed_writes_through_qemu_nbd_are_all_answered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        prefill(&path, 1 << 20).unwrap();
        let port = free_port().unwrap();
        let mut child = tokio::process::Command::new("qemu-nbd")
            .args(["-f", "raw", "-x", EXPORT, "-b", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(["-t", "-e", "4"])
            .arg(&path)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_for_port(addr).await.unwrap();
        for (count, depth, fua) in [(300, 16, true), (20, 1, false)] {
            let mut client = NbdClient::connect(addr, EXPORT).await.unwrap();
            assert_eq!(client.size, 1 << 20);
            let latencies = client.write_run(count, depth, fua).await.unwrap();
            assert_eq!(latencies.len() as u64, count);
            client.disconnect().await.unwrap();
        }
        child.kill().await.unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data.iter().all(|&b| b == PATTERN));
    }
}
