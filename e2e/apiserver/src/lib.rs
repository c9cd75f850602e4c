//! A test Kubernetes API server: real HTTP, watch, CRDs with schema and CEL validation.
//!
//! This crate is a library whose binary only parses flags and calls [`run`], so later crates' tests can
//! start it in-process. Its real work arrives with its own issue.

/// Start-up options.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Options {}

/// Runs the component until it is asked to stop.
pub async fn run(_options: Options) -> anyhow::Result<()> {
    tracing::info!("lockstep-testapi has no work yet: see its issue");
    Ok(())
}
