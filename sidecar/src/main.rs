//! `lockstep-sidecar`: parses flags and calls [`lockstep_sidecar::run`].

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "The Lockstep sidecar: the per-node agent that reports copy failures and enforces freezes."
)]
struct Cli {
    #[command(flatten)]
    options: lockstep_sidecar::Options,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    lockstep_sidecar::run(Cli::parse().options).await
}
