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
    // Errors only by default (the demo's own output is its timeline), and not kube's connection errors
    // from clients still retrying while the simulated API servers shut down at the end.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,kube_client=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    lockstep_e2e::run(Cli::parse().options).await
}
