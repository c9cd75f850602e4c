//! The client of the node's `Replicator` gRPC service, over a unix socket.
//!
//! It turns the core's [`Operation`]s into RPCs and the replicator's answers into the core's
//! [`Carried`] records. The channel is lazy: it (re)connects on demand, so a replicator restart only
//! fails the calls made while it is down.

use std::path::{Path as FsPath, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use lockstep_api::domain::{Position, Stage};
use lockstep_api::proto::replicator::v1 as pb;
use pb::replicator_client::ReplicatorClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::enforce::{Carried, Level, Operation};

/// Errors talking to the replicator.
#[derive(Debug, thiserror::Error)]
pub enum ReplicatorError {
    /// The endpoint could not be built.
    #[error("replicator endpoint: {0}")]
    Endpoint(#[from] tonic::transport::Error),
    /// An RPC failed.
    #[error("replicator {call} failed: {status}")]
    Call {
        /// The RPC.
        call: &'static str,
        /// The status.
        status: Box<tonic::Status>,
    },
}

/// A replication event, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplicatorEvent {
    /// A copy failed; the write is held.
    CopyFailed(pb::CopyFailed),
    /// Held writes failed at the hold timeout.
    HoldTimedOut(pb::HoldTimedOut),
    /// A volume's state changed.
    StateChanged(pb::VolumeState),
}

/// The replicator client.
#[derive(Debug, Clone)]
pub struct Replicator {
    client: ReplicatorClient<Channel>,
    socket: PathBuf,
}

impl Replicator {
    /// A client of the replicator at `socket` (connects lazily).
    pub fn new(socket: &FsPath, timeout: Duration) -> Result<Self, ReplicatorError> {
        let path = socket.to_path_buf();
        let endpoint = Endpoint::try_from("http://replicator.invalid")?
            .timeout(timeout)
            .connect_timeout(timeout);
        let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }));
        Ok(Self {
            client: ReplicatorClient::new(channel),
            socket: socket.to_path_buf(),
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &FsPath {
        &self.socket
    }

    /// Every volume the replicator serves, as the core's records.
    pub async fn list(&self) -> Result<Vec<Carried>, ReplicatorError> {
        let response = self
            .client
            .clone()
            .list_volumes(pb::ListVolumesRequest {})
            .await
            .map_err(|status| call("ListVolumes", status))?;
        Ok(response.into_inner().volumes.iter().map(carried).collect())
    }

    /// Opens the event stream.
    pub async fn watch(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<ReplicatorEvent, tonic::Status>>, ReplicatorError>
    {
        use futures::StreamExt;
        let stream = self
            .client
            .clone()
            .watch_events(pb::WatchEventsRequest {})
            .await
            .map_err(|status| call("WatchEvents", status))?
            .into_inner();
        Ok(stream.filter_map(|event| async move {
            match event {
                Err(status) => Some(Err(status)),
                Ok(event) => match event.kind? {
                    pb::replication_event::Kind::CopyFailed(f) => {
                        Some(Ok(ReplicatorEvent::CopyFailed(f)))
                    }
                    pb::replication_event::Kind::HoldTimedOut(t) => {
                        Some(Ok(ReplicatorEvent::HoldTimedOut(t)))
                    }
                    pb::replication_event::Kind::StateChanged(s) => {
                        Some(Ok(ReplicatorEvent::StateChanged(s)))
                    }
                },
            }
        }))
    }

    /// Drops the kept image of `epoch` or older on `volumes`: the group is in sync at a newer point.
    /// A replicator that keeps no image has nothing to drop.
    pub async fn drop_image(
        &self,
        group_uid: &str,
        epoch: u64,
        volumes: &[String],
    ) -> Result<(), ReplicatorError> {
        let request = pb::ImageRequest {
            volume_handles: volumes.to_vec(),
            group_uid: group_uid.to_owned(),
            epoch,
        };
        match self.client.clone().drop_image(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == tonic::Code::Unimplemented => Ok(()),
            Err(status) => Err(call("DropImage", status)),
        }
    }

    /// Runs one operation.
    pub async fn apply(&self, operation: &Operation) -> Result<(), ReplicatorError> {
        let mut client = self.client.clone();
        match operation {
            Operation::Suspend {
                group_uid,
                epoch,
                volumes,
                fail_safe,
            } => {
                client
                    .suspend(directive(group_uid, *epoch, volumes, *fail_safe))
                    .await
                    .map_err(|s| call("Suspend", s))?;
            }
            Operation::Release {
                group_uid,
                epoch,
                volumes,
            } => {
                client
                    .release(directive(group_uid, *epoch, volumes, false))
                    .await
                    .map_err(|s| call("Release", s))?;
            }
            Operation::Resume {
                group_uid,
                epoch,
                volumes,
            } => {
                // The secondaries keep the frozen image through the resync (DESIGN rule 7), asked
                // before the resume starts copying. A replicator that cannot resumes without it.
                let keep = pb::ImageRequest {
                    volume_handles: volumes.clone(),
                    group_uid: group_uid.clone(),
                    epoch: *epoch,
                };
                match client.keep_image(keep).await {
                    Ok(_) => {}
                    Err(status) if status.code() == tonic::Code::Unimplemented => {
                        tracing::warn!(
                            group_uid,
                            epoch,
                            message = status.message(),
                            "the replicator keeps no image through a resync: a site lost during it leaves no consistent copy"
                        );
                    }
                    Err(status) => return Err(call("KeepImage", status)),
                }
                client
                    .resume(directive(group_uid, *epoch, volumes, false))
                    .await
                    .map_err(|s| call("Resume", s))?;
            }
            Operation::Configure {
                volume,
                group_uid,
                epoch,
                stage,
                hold_timeout_ms,
            } => {
                client
                    .configure(pb::ConfigureRequest {
                        volume_handle: volume.clone(),
                        group_uid: group_uid.clone(),
                        epoch: *epoch,
                        stage: configure_stage(*epoch, *stage).into(),
                        hold_timeout_ms: *hold_timeout_ms,
                    })
                    .await
                    .map_err(|s| call("Configure", s))?;
            }
        }
        Ok(())
    }
}

/// The stage a `Configure` names: the baseline (Replicating at epoch 0, before any freeze) is sent as
/// unspecified, which the replicator reads as "replicating, never frozen" rather than as a resume.
pub fn configure_stage(epoch: u64, stage: Stage) -> pb::Stage {
    if epoch == 0 && stage == Stage::Resume {
        pb::Stage::Unspecified
    } else {
        pb::Stage::from(stage)
    }
}

fn call(call: &'static str, status: tonic::Status) -> ReplicatorError {
    ReplicatorError::Call {
        call,
        status: Box::new(status),
    }
}

fn directive(
    group_uid: &str,
    epoch: u64,
    volumes: &[String],
    fail_safe: bool,
) -> pb::DirectiveRequest {
    pb::DirectiveRequest {
        volume_handles: volumes.to_vec(),
        group_uid: group_uid.to_owned(),
        epoch,
        fail_safe,
    }
}

/// What a volume carries, from the replicator's state. An unset or unknown stage is read as the
/// baseline (replicating at that epoch); a fail-safe suspension keeps its mark.
pub fn carried(state: &pb::VolumeState) -> Carried {
    let stage = Position::decode(
        state.epoch,
        pb::Stage::try_from(state.stage)
            .ok()
            .and_then(|s| Stage::try_from(s).ok()),
    )
    .stage;
    let level = if state.fail_safe {
        Level::fail_safe(state.epoch)
    } else {
        Level::point(state.epoch, stage)
    };
    Carried {
        volume: state.volume_handle.clone(),
        group_uid: (!state.group_uid.is_empty()).then(|| state.group_uid.clone()),
        level,
        confirmed: state.mode != pb::Mode::Unconfirmed as i32,
        held_after_failure: (state.mode == pb::Mode::Held as i32)
            .then(|| state.last_acked_sequence.saturating_add(1)),
        resyncing: state.mode == pb::Mode::Resyncing as i32,
    }
}

/// The domain's view of a replicator mode.
pub fn volume_state(mode: i32) -> lockstep_api::domain::VolumeState {
    use lockstep_api::domain::VolumeState as V;
    match pb::Mode::try_from(mode) {
        Ok(pb::Mode::Replicating) => V::Replicating,
        Ok(pb::Mode::Held) => V::Held,
        Ok(pb::Mode::Suspended) => V::Suspended,
        Ok(pb::Mode::Running) => V::Running,
        Ok(pb::Mode::Resyncing) => V::Resyncing,
        Ok(pb::Mode::Standalone) => V::Standalone,
        Ok(pb::Mode::Unconfirmed) | Ok(pb::Mode::Unspecified) | Err(_) => V::Unconfirmed,
    }
}
