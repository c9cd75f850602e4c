//! `lockstep-checker`: parses flags and calls [`lockstep_checker::run`].

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "The dependent-write workload and the consistency checker."
)]
struct Cli {
    #[command(flatten)]
    options: lockstep_checker::Options,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    lockstep_checker::run(Cli::parse().options).await
}
