//! The Lockstep operator: the control system that freezes every member of a consistency group.
//!
//! This crate is a library whose binary only parses flags and calls [`run`], so later crates' tests can
//! start it in-process.
//!
//! - [`freeze`]: the pure decisions (group status + event → new status, directives, events).
//! - [`members`]: the pure resolution of a group's members to volumes and nodes.

pub mod freeze;
pub mod members;

/// Start-up options.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Options {}

/// Runs the component until it is asked to stop.
pub async fn run(_options: Options) -> anyhow::Result<()> {
    tracing::info!("lockstep-operator has no work yet: see its issue");
    Ok(())
}
