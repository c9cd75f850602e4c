//! `lockstep-replicator promote | fence | reverse`: the failover verbs of the `Replicator` service from
//! the command line, for the disaster-recovery runbook (README "Disaster recovery"). Each dials a
//! replicator's control socket, asks, and prints the answer: `promote` and `reverse` a line per volume,
//! `fence` JSON (what the old site wrote after the image), which `reverse --old-site-changes` reads.

use std::path::{Path, PathBuf};

use lockstep_api::proto::replicator::v1 as pb;
use pb::replicator_client::ReplicatorClient;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

/// Flags shared by the three verbs.
#[derive(Debug, Clone, clap::Args)]
pub struct VerbArgs {
    /// The replicator's control socket (`--control-socket` of `primary` or `secondary`).
    #[arg(long)]
    pub control_socket: PathBuf,
    /// The group's UID.
    #[arg(long)]
    pub group: String,
    /// The epoch: of the image (promote, fence), or the reverse replication resumes at.
    #[arg(long)]
    pub epoch: u64,
    /// A volume (CSI handle). Repeatable.
    #[arg(long = "volume", required = true)]
    pub volumes: Vec<String>,
}

/// Flags of `lockstep-replicator promote`.
#[derive(Debug, Clone, clap::Args)]
pub struct PromoteArgs {
    /// The socket, group, epoch and volumes.
    #[command(flatten)]
    pub verb: VerbArgs,
    /// The primary site is lost: cut a replication stream still open from it (half-open after a
    /// partition) instead of refusing.
    #[arg(long)]
    pub primary_site_lost: bool,
}

/// Flags of `lockstep-replicator reverse`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReverseArgs {
    /// The socket, group, epoch and volumes.
    #[command(flatten)]
    pub verb: VerbArgs,
    /// The old site's secondary (`host:port`), started over the fenced old primary's files.
    #[arg(long)]
    pub peer: String,
    /// What `fence` printed at the old site (JSON): its writes after the image, overwritten and
    /// reported as discarded.
    #[arg(long)]
    pub old_site_changes: Option<PathBuf>,
}

/// What `fence` prints, and `reverse --old-site-changes` reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fenced {
    /// The group.
    pub group_uid: String,
    /// The epoch fenced at.
    pub epoch: u64,
    /// Per volume, what its peer lacks.
    pub volumes: Vec<FencedVolume>,
}

/// One fenced volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FencedVolume {
    /// The volume.
    pub volume_handle: String,
    /// The ranges `[offset, length]` written here after the image (its dirty-region map).
    pub ranges: Vec<(u64, u64)>,
    /// The bytes they cover.
    pub bytes: u64,
}

/// Why a verb failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The control socket did not answer.
    #[error("connecting to the replicator at {socket}: {source}")]
    Connect {
        /// The socket.
        socket: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The replicator does not implement the verb.
    #[error("the replicator at {socket} does not support failover: {message}")]
    Unsupported {
        /// The socket.
        socket: String,
        /// What it said.
        message: String,
    },
    /// The replicator refused or failed the request.
    #[error("{verb} refused by the replicator at {socket} ({code:?}): {message}")]
    Refused {
        /// The verb.
        verb: &'static str,
        /// The socket.
        socket: String,
        /// The gRPC code.
        code: tonic::Code,
        /// What it said.
        message: String,
    },
    /// The old-site changes file could not be read.
    #[error("--old-site-changes {path}: {why}")]
    Changes {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
}

/// A gRPC channel to the unix socket `socket`.
pub async fn channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    use tonic::transport::{Endpoint, Uri};
    let path = socket.to_owned();
    Endpoint::from_static("http://replicator.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
}

/// A `Replicator` client on the unix socket `socket`.
pub async fn connect(socket: &Path) -> Result<ReplicatorClient<Channel>, tonic::transport::Error> {
    Ok(ReplicatorClient::new(channel(socket).await?))
}

async fn client(verb: &VerbArgs) -> Result<ReplicatorClient<Channel>, CliError> {
    connect(&verb.control_socket)
        .await
        .map_err(|source| CliError::Connect {
            socket: verb.control_socket.display().to_string(),
            source,
        })
}

fn refused(verb: &'static str, args: &VerbArgs, status: tonic::Status) -> CliError {
    let socket = args.control_socket.display().to_string();
    if status.code() == tonic::Code::Unimplemented {
        return CliError::Unsupported {
            socket,
            message: status.message().to_owned(),
        };
    }
    CliError::Refused {
        verb,
        socket,
        code: status.code(),
        message: status.message().to_owned(),
    }
}

fn request(args: &VerbArgs, primary_site_lost: bool) -> pb::FailoverRequest {
    pb::FailoverRequest {
        volume_handles: args.volumes.clone(),
        group_uid: args.group.clone(),
        epoch: args.epoch,
        primary_site_lost,
    }
}

fn ranges(volume: &pb::FailoverVolume) -> Vec<(u64, u64)> {
    volume.ranges.iter().map(|r| (r.offset, r.length)).collect()
}

fn handle(volume: &pb::FailoverVolume) -> &str {
    volume
        .state
        .as_ref()
        .map_or("(unnamed)", |s| s.volume_handle.as_str())
}

/// Promotes; returns a line per volume.
pub async fn promote(args: &PromoteArgs) -> Result<Vec<String>, CliError> {
    let answer = client(&args.verb)
        .await?
        .promote(request(&args.verb, args.primary_site_lost))
        .await
        .map_err(|s| refused("Promote", &args.verb, s))?
        .into_inner();
    Ok(answer
        .volumes
        .iter()
        .map(|v| {
            format!(
                "{}: promoted from the image of epoch {} ({} bytes restored from the kept image); served as a primary at this site",
                handle(v),
                v.image_epoch,
                v.range_bytes
            )
        })
        .collect())
}

/// Fences; returns what each volume holds that its peer lacks.
pub async fn fence(args: &VerbArgs) -> Result<Fenced, CliError> {
    let answer = client(args)
        .await?
        .fence(request(args, false))
        .await
        .map_err(|s| refused("Fence", args, s))?
        .into_inner();
    Ok(Fenced {
        group_uid: args.group.clone(),
        epoch: args.epoch,
        volumes: answer
            .volumes
            .iter()
            .map(|v| FencedVolume {
                volume_handle: handle(v).to_owned(),
                ranges: ranges(v),
                bytes: v.range_bytes,
            })
            .collect(),
    })
}

/// Reverses; returns a line per volume naming what the old site discards.
pub async fn reverse(args: &ReverseArgs) -> Result<Vec<String>, CliError> {
    let old_site_changes = match &args.old_site_changes {
        None => Vec::new(),
        Some(path) => {
            let bad = |why: String| CliError::Changes {
                path: path.display().to_string(),
                why,
            };
            let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            let fenced: Fenced = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
            if fenced.group_uid != args.verb.group {
                return Err(bad(format!(
                    "it is of group {:?}, not {:?}",
                    fenced.group_uid, args.verb.group
                )));
            }
            fenced
                .volumes
                .into_iter()
                .map(|v| pb::VolumeRanges {
                    volume_handle: v.volume_handle,
                    ranges: v
                        .ranges
                        .into_iter()
                        .map(|(offset, length)| pb::ByteRange { offset, length })
                        .collect(),
                })
                .collect()
        }
    };
    let answer = client(&args.verb)
        .await?
        .reverse(pb::ReverseRequest {
            volume_handles: args.verb.volumes.clone(),
            group_uid: args.verb.group.clone(),
            epoch: args.verb.epoch,
            peer: args.peer.clone(),
            old_site_changes,
        })
        .await
        .map_err(|s| refused("Reverse", &args.verb, s))?
        .into_inner();
    Ok(answer
        .volumes
        .iter()
        .map(|v| {
            format!(
                "{}: replicating to {} from epoch {}; the old site's writes after the image are discarded: {} bytes in {} ranges {:?}",
                handle(v),
                args.peer,
                args.verb.epoch,
                v.range_bytes,
                v.ranges.len(),
                ranges(v)
            )
        })
        .collect())
}
