//! The dependent-write workload and the consistency checker.
//!
//! This crate is a library whose binary only parses flags and calls [`run`], so later crates' tests can
//! start it in-process. Its real work arrives with its own issue.

/// Start-up options.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Options {}

/// Runs the component until it is asked to stop.
pub async fn run(_options: Options) -> anyhow::Result<()> {
    tracing::info!("lockstep-checker has no work yet: see its issue");
    Ok(())
}
