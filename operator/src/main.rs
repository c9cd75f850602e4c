//! `lockstep-operator`: parses flags and calls [`lockstep_operator::run`].

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "The Lockstep operator: the control system that freezes every member of a consistency group."
)]
struct Cli {
    #[command(flatten)]
    options: lockstep_operator::Options,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    lockstep_operator::run(Cli::parse().options).await
}
