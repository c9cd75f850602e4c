//! The Lockstep sidecar: the per-node agent that reports copy failures and enforces freezes.
//!
//! This crate is a library whose binary only parses flags and calls [`run`], so later crates' tests can
//! start it in-process.
//!
//! Modules: [`enforce`] (the pure enforcement core).

pub mod enforce;

/// Start-up options.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Options {}

/// Runs the component until it is asked to stop.
pub async fn run(_options: Options) -> anyhow::Result<()> {
    tracing::info!("lockstep-sidecar has no work yet: see its issue");
    Ok(())
}
