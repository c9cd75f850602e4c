//! The soak runner: seeds in parallel, seeds per second, faults by kind and violations; or one seed
//! replayed with its trace.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::Parser;
use lockstep_sim::{Config, Mutant, run};

/// Runs simulation seeds.
#[derive(Debug, Parser)]
#[command(name = "lockstep-sim")]
struct Cli {
    /// How many seeds to run.
    #[arg(long, default_value_t = 1000)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    threads: u64,
    /// Replays one seed and prints what it did.
    #[arg(long)]
    replay: Option<u64>,
    /// Member clusters in the world.
    #[arg(long, default_value_t = Config::default().clusters)]
    clusters: usize,
    /// Nodes per member cluster.
    #[arg(long, default_value_t = Config::default().nodes_per_cluster)]
    nodes_per_cluster: usize,
    /// Volumes per node.
    #[arg(long, default_value_t = Config::default().volumes_per_node)]
    volumes_per_node: usize,
    /// Prints progress (seeds done, seeds/s, violations so far) every this many seconds; 0: never.
    #[arg(long, default_value_t = 0)]
    progress: u64,
    /// Plants a defect, by name (`--mutant list` lists them; the cores' need `--features mutants`).
    #[arg(long)]
    mutant: Option<String>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let mut config = Config {
        clusters: cli.clusters,
        nodes_per_cluster: cli.nodes_per_cluster,
        volumes_per_node: cli.volumes_per_node,
        ..Config::default()
    };
    if let Some(name) = &cli.mutant {
        let all = Mutant::all();
        let names: Vec<String> = all.iter().map(|m| format!("{m:?}")).collect();
        match all.into_iter().find(|m| format!("{m:?}") == *name) {
            Some(mutant) => config.mutant = Some(mutant),
            None => {
                println!("defects this build can plant:\n  {}", names.join("\n  "));
                return std::process::ExitCode::from(u8::from(name != "list") * 2);
            }
        }
    }
    if let Some(seed) = cli.replay {
        return match run(seed, &config) {
            Ok(summary) => {
                println!("seed {seed}: ok, {summary:?}");
                std::process::ExitCode::SUCCESS
            }
            Err(violation) => {
                println!("{violation}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let started = Instant::now();
    let next = AtomicU64::new(cli.first);
    let done = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let last_report = AtomicU64::new(0);
    let end = cli.first + cli.seeds;
    let results: Vec<(BTreeMap<&'static str, u64>, Vec<String>, u64)> =
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..cli.threads.max(1))
                .map(|_| {
                    scope.spawn(|| {
                        let mut faults = BTreeMap::new();
                        let mut violations = Vec::new();
                        let mut steps = 0;
                        loop {
                            let seed = next.fetch_add(1, Ordering::Relaxed);
                            if seed >= end {
                                break;
                            }
                            let outcome = run(seed, &config);
                            let seeds = done.fetch_add(1, Ordering::Relaxed) + 1;
                            report_progress(&cli, &started, &last_report, seeds, &failed);
                            match outcome {
                                Ok(summary) => {
                                    steps += summary.steps;
                                    for (kind, count) in summary.faults {
                                        *faults.entry(kind).or_default() += count;
                                    }
                                }
                                Err(violation) => {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                    println!("seed {seed}: {}", violation.what);
                                    violations.push(format!(
                                        "seed {seed}: {} (replay: {})",
                                        violation.what, violation.replay
                                    ));
                                }
                            }
                        }
                        (faults, violations, steps)
                    })
                })
                .collect();
            workers
                .into_iter()
                .filter_map(|worker| worker.join().ok())
                .collect()
        });
    let elapsed = started.elapsed().as_secs_f64();
    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    let mut violations = Vec::new();
    let mut steps = 0;
    for (f, v, s) in results {
        for (kind, count) in f {
            *faults.entry(kind).or_default() += count;
        }
        violations.extend(v);
        steps += s;
    }
    println!(
        "{} seeds in {elapsed:.1} s: {:.0} seeds/s, {:.0} steps/s, {} violations",
        cli.seeds,
        cli.seeds as f64 / elapsed,
        steps as f64 / elapsed,
        violations.len()
    );
    for (kind, count) in &faults {
        println!("  {count:>10}  {kind}");
    }
    for violation in violations.iter().take(20) {
        println!("{violation}");
    }
    if violations.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// Prints progress once `--progress` seconds have passed since the last report (`last_report`, in
/// seconds since the start): the worker that finishes a seed first after that moment prints it.
fn report_progress(
    cli: &Cli,
    started: &Instant,
    last_report: &AtomicU64,
    seeds: u64,
    failed: &AtomicU64,
) {
    if cli.progress == 0 {
        return;
    }
    let elapsed = started.elapsed();
    let now = elapsed.as_secs();
    let last = last_report.load(Ordering::Relaxed);
    if now < last + cli.progress
        || last_report
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    println!(
        "progress: {seeds} seeds in {:.0} s ({:.0} seeds/s), {} violations",
        elapsed.as_secs_f64(),
        seeds as f64 / elapsed.as_secs_f64(),
        failed.load(Ordering::Relaxed)
    );
}
