//! `kubectl lockstep`: a ConsistencyGroup's status across its member clusters, its freeze timeline, its
//! members (PVC → PV → handle → node, and why one is unresolved), the person-driven intents (freeze,
//! release, resync) with the current epoch filled in, and the Control path's certificates.
//!
//! Each subcommand reads what it needs, builds a report (a plain serializable value), and
//! prints it as a table, JSON or YAML ([`output`]). Errors are one sentence ([`PluginError`]).

pub mod certs;
pub mod connect;
pub mod intents;
pub mod members;
pub mod output;
pub mod status;
pub mod timeline;

use clap::{Parser, Subcommand};

pub use output::Format;

/// `kubectl lockstep`: see and steer Lockstep's consistency groups.
#[derive(Debug, Parser)]
#[command(
    name = "kubectl lockstep",
    bin_name = "kubectl lockstep",
    version,
    about
)]
pub struct Cli {
    /// Output format: table, json or yaml.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// The kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context (default: its current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The namespace of Lockstep's Secrets (certs); default: the context's namespace, else `lockstep`.
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Phase, epoch, policy, and each member volume's state across the member clusters.
    Status {
        /// The ConsistencyGroup.
        group: String,
    },
    /// The group's last freezes, each step in milliseconds from its trigger.
    Timeline {
        /// The ConsistencyGroup.
        group: String,
    },
    /// Takes a planned freeze: sets spec.freeze.epoch to the current epoch.
    Freeze(intents::IntentArgs),
    /// Releases the held writes of a frozen group: sets spec.release.epoch to the current epoch.
    Release(intents::IntentArgs),
    /// Resynchronises a frozen or released group: sets spec.resync.epoch to the current epoch.
    Resync(intents::IntentArgs),
    /// Each member volume: PVC → PV → volume handle → node, and why one is unresolved.
    Members {
        /// The ConsistencyGroup.
        group: String,
    },
    /// The certificates of the gRPC Control path (the chart's TLS Secrets) and when they expire.
    Certs(certs::CertArgs),
}

/// Why a subcommand failed, in one sentence.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// No usable kubeconfig.
    #[error("{0}")]
    Kubeconfig(String),
    /// The API server refused or failed a request.
    #[error("{what}: {message}")]
    Api {
        /// What was being read or written.
        what: String,
        /// What the API server said.
        message: String,
    },
    /// No such group.
    #[error("no ConsistencyGroup named {0:?} (kubectl get cg lists them)")]
    NoGroup(String),
    /// An intent refused before it was written.
    #[error("{0}")]
    Refused(String),
    /// The report could not be printed.
    #[error("cannot print the report: {0}")]
    Output(String),
}

impl PluginError {
    /// A failed request, said as "`what`: `what the API server said`".
    pub fn api(what: impl Into<String>, error: kube::Error) -> Self {
        let message = match error {
            kube::Error::Api(status) => status.message.clone(),
            other => other.to_string(),
        };
        Self::Api {
            what: what.into(),
            message,
        }
    }
}

/// Runs one command and returns what it prints.
pub async fn run(cli: &Cli) -> Result<String, PluginError> {
    let connection = connect::Connection::open(cli).await?;
    match &cli.command {
        Command::Status { group } => {
            output::render(&status::report(&connection, group).await?, cli.output)
        }
        Command::Timeline { group } => {
            output::render(&timeline::report(&connection, group).await?, cli.output)
        }
        Command::Freeze(args) => {
            let report = intents::apply(&connection, intents::Intent::Freeze, args).await?;
            output::render(&report, cli.output)
        }
        Command::Release(args) => {
            let report = intents::apply(&connection, intents::Intent::Release, args).await?;
            output::render(&report, cli.output)
        }
        Command::Resync(args) => {
            let report = intents::apply(&connection, intents::Intent::Resync, args).await?;
            output::render(&report, cli.output)
        }
        Command::Members { group } => {
            output::render(&members::report(&connection, group).await?, cli.output)
        }
        Command::Certs(args) => {
            output::render(&certs::report(&connection, args).await?, cli.output)
        }
    }
}
