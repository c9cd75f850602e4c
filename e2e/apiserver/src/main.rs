//! `lockstep-testapi`: parses flags and calls [`lockstep_testapi::run`].

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "A test Kubernetes API server: real HTTP, watch, CRDs with schema and CEL validation."
)]
struct Cli {
    #[command(flatten)]
    options: lockstep_testapi::CliOptions,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    lockstep_testapi::run(Cli::parse().options).await
}
