//! `lockstep-freeze-bench`: parses flags and calls [`lockstep_e2e::freeze_bench::run`].

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Freeze latency from a failed copy to a frozen group, by volume count and path."
)]
struct Cli {
    #[command(flatten)]
    options: lockstep_e2e::freeze_bench::Options,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Warnings only by default (RUST_LOG=lockstep_operator=debug,... to profile), and not kube's
    // connection errors from clients still retrying while a cell's API servers shut down.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,kube_client=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    lockstep_e2e::freeze_bench::run(Cli::parse().options).await?;
    Ok(())
}
