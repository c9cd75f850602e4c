//! `lockstep-checker`: parses flags and calls [`lockstep_checker::run`].

use clap::Parser;
use std::process::ExitCode;

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
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match lockstep_checker::run(Cli::parse().options).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Every error of this crate already names its cause in its message.
            eprintln!("lockstep-checker: {e}");
            ExitCode::FAILURE
        }
    }
}
