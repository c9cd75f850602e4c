//! `lockstep-demo`: parses flags and calls [`lockstep_e2e::run`].

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Lockstep end to end: simulated clusters, fault injection, scenarios, benchmarks and the demo."
)]
struct Cli {
    #[command(flatten)]
    options: lockstep_e2e::Options,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    lockstep_e2e::run(Cli::parse().options).await
}
