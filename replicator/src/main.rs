//! `lockstep-replicator`: parses flags and calls [`lockstep_replicator::run`].

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "The Lockstep reference replicator: NBD-served volumes copied synchronously to a secondary."
)]
struct Cli {
    #[command(flatten)]
    options: lockstep_replicator::Options,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    lockstep_replicator::run(Cli::parse().options).await
}
