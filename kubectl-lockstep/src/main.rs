//! `kubectl-lockstep`: found by `kubectl plugin list` on PATH, run as `kubectl lockstep ...`.

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = kubectl_lockstep::Cli::parse();
    match kubectl_lockstep::run(&cli).await {
        Ok(text) => {
            print!("{text}");
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
