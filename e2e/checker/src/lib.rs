//! The dependent-write workload and the consistency checker.
//!
//! - [`workload`] writes strict chains ("lanes") of self-describing blocks ([`block`]) across the volumes
//!   of a group, placed by [`layout`], through the crate's own NBD client ([`nbd`]);
//! - [`mod@check`] reads only the secondaries and says whether, together, they hold a state the
//!   application could have seen at one instant: a gap-free prefix of every lane, with every write's
//!   dependencies present, reaching the writes acknowledged before the first failed copy;
//! - [`synth`] builds the images of such states for tests.
//!
//! This crate is a library whose binary only parses flags and calls [`run`], so later crates' tests can
//! drive it in-process.
//!
//! # Use from a test
//! ```no_run
//! use lockstep_checker::{CheckOptions, Layout, NbdAddress, Source, WorkloadHandle, WorkloadOptions};
//! use std::time::Duration;
//!
//! # async fn demo(primaries: Vec<NbdAddress>, secondaries: Vec<std::path::PathBuf>) -> Result<(), Box<dyn std::error::Error>> {
//! // Three volumes, three concurrent lanes each cycling over two volumes (so while one volume holds,
//! // a lane that avoids it keeps writing to the others), 256 slots per lane, until cancelled.
//! let layout = Layout::with_span(3, 3, 2, 256, 0)?;
//! let mut workload = WorkloadHandle::spawn(primaries, WorkloadOptions::new(layout, None));
//! workload.wait_for_acked(100, Duration::from_secs(30)).await?;
//! // ... cut a link; once the replicator reports the failed copy (and before any release), take the
//! // lanes' acknowledged writes: every one of them must be on the secondaries.
//! let acked = workload.current().last_acked;
//! // ... suspend, release ...
//! let report = workload.stop_and_join().await?;
//! let sources: Vec<Source> = secondaries.into_iter().map(Source::File).collect();
//! let verdict = lockstep_checker::check_sources(&sources, &CheckOptions::lanes(acked).run(report.run_id)).await?;
//! assert!(verdict.is_consistent(), "{verdict}");
//! # Ok(())
//! # }
//! ```

pub mod block;
pub mod check;
pub mod layout;
pub mod nbd;
pub mod synth;
pub mod workload;

pub use check::{
    CheckError, CheckOptions, Image, Source, Verdict, check, check_sources, first_difference, scan,
};
pub use layout::{BLOCK_SIZE, Layout, Location};
pub use nbd::{NbdAddress, NbdClient, NbdError};
pub use workload::{
    OnError, Progress, StopReason, WaitError, WorkloadError, WorkloadHandle, WorkloadOptions,
    WorkloadReport, run_workload,
};

use std::path::PathBuf;
use std::time::Duration;

/// Start-up options.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The binary's subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Write a dependent chain of blocks across the volumes.
    Workload(WorkloadArgs),
    /// Check that the secondaries hold a gap-free prefix of every lane, with every dependency present.
    Check(CheckArgs),
}

/// Flags of `workload`.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkloadArgs {
    /// A volume, as nbd://host:port/export or nbd+unix:///export?socket=PATH; repeat in volume order.
    #[arg(long = "volume", required = true)]
    pub volumes: Vec<NbdAddress>,
    /// How many writes each lane issues; without it, write until interrupted.
    #[arg(long)]
    pub writes: Option<u64>,
    /// Concurrent writers, each a strict dependent chain.
    #[arg(long, default_value_t = 1)]
    pub lanes: u32,
    /// How many volumes each lane cycles over (default: all).
    #[arg(long)]
    pub span: Option<u32>,
    /// Slots per lane on each volume: the region a lane cycles through (4 KiB each).
    #[arg(long, default_value_t = 1024)]
    pub slots: u64,
    /// First block of the region on every volume.
    #[arg(long, default_value_t = 0)]
    pub base_block: u64,
    /// The run id (decimal or 0x-hex); a fresh one by default.
    #[arg(long, value_parser = parse_u64)]
    pub run_id: Option<u64>,
    /// To continue a run: the last write already written, per lane (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub start_after: Vec<u64>,
    /// Send writes with FUA.
    #[arg(long)]
    pub fua: bool,
    /// What to do when a write fails.
    #[arg(long, value_enum, default_value_t = OnError::Stop)]
    pub on_error: OnError,
    /// Milliseconds between retries of a failed write.
    #[arg(long, default_value_t = 50)]
    pub retry_backoff_ms: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `check`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// A secondary image: a file, or an NBD URI; repeat in volume order.
    #[arg(long = "secondary", required = true)]
    pub secondaries: Vec<String>,
    /// The last write acknowledged before the first failed copy, per lane (comma-separated): the
    /// secondaries must reach it.
    #[arg(long, value_delimiter = ',', required = true)]
    pub acked_before_failure: Vec<u64>,
    /// The run to check (decimal or 0x-hex); by default the only run present.
    #[arg(long, value_parser = parse_u64)]
    pub run_id: Option<u64>,
    /// Print the verdict as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_u64(s: &str) -> Result<u64, std::num::ParseIntError> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
}

/// Turns a `--secondary` value into a source: NBD URIs are exports, anything else a file.
pub fn parse_source(s: &str) -> Result<Source, nbd::AddressError> {
    if s.starts_with("nbd://") || s.starts_with("nbd+unix://") {
        Ok(Source::Nbd(s.parse()?))
    } else {
        Ok(Source::File(PathBuf::from(s)))
    }
}

/// Runs the chosen subcommand. A check that finds the secondaries inconsistent prints the verdict and
/// returns an error, so the process exits non-zero.
pub async fn run(options: Options) -> anyhow::Result<()> {
    match options.command {
        Command::Workload(a) => {
            let volumes = a.volumes.len() as u32;
            let span = a.span.unwrap_or(volumes);
            let layout = Layout::with_span(volumes, a.lanes, span, a.slots, a.base_block)?;
            let mut opts = WorkloadOptions::new(layout, a.writes);
            if let Some(id) = a.run_id {
                opts.run_id = id;
            }
            opts.start_after = a.start_after;
            opts.fua = a.fua;
            opts.on_error = a.on_error;
            opts.retry_backoff = Duration::from_millis(a.retry_backoff_ms);
            eprintln!("run id {:#x}", opts.run_id);
            let handle = WorkloadHandle::spawn(a.volumes, opts);
            let cancel = handle.cancel.clone();
            // SIGINT or SIGTERM stops the workload; the report is still printed.
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let interrupt = tokio::spawn(async move {
                tokio::select! {
                    r = tokio::signal::ctrl_c() => if r.is_err() { return },
                    _ = term.recv() => {}
                }
                cancel.cancel();
            });
            let report = handle.join().await;
            interrupt.abort();
            let report = report?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{report}");
            }
            Ok(())
        }
        Command::Check(a) => {
            let sources = a
                .secondaries
                .iter()
                .map(|s| parse_source(s))
                .collect::<Result<Vec<_>, _>>()?;
            let opts = CheckOptions {
                acked_before_failure: a.acked_before_failure,
                run_id: a.run_id,
            };
            let verdict = check_sources(&sources, &opts).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&verdict)?);
            } else {
                print!("{verdict}");
            }
            if verdict.is_consistent() {
                Ok(())
            } else {
                anyhow::bail!("the secondaries are not consistent")
            }
        }
    }
}
