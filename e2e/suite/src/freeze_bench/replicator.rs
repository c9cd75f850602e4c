//! A light in-memory replicator for the freeze benchmark: the real `Replicator` gRPC service (proto
//! `lockstep.replicator.v1`) on a unix socket, serving one node's volumes without a data path, so a
//! node can carry hundreds of volumes. It keeps each volume's group, (epoch, stage) and mode with the
//! reference replicator's rules (never backwards; `Release(e)` refused unless suspended at exactly `e`),
//! emits a `StateChanged` event per volume whose state changes, as the reference one does, and stamps
//! the moments a trial measures into a shared [`Probe`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use futures::{Stream, StreamExt};
use lockstep_api::proto::replicator::v1 as pb;
use pb::replicator_server::{Replicator, ReplicatorServer};
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// What one trial has seen so far, stamped where it happens.
#[derive(Debug, Clone, Default)]
pub struct TrialMarks {
    /// The epoch the trial's freeze must reach.
    pub epoch: u64,
    /// The volume whose copy failed (its write is held).
    pub failed_volume: String,
    /// How many volumes the group has.
    pub total: usize,
    /// When the copy failure was raised.
    pub started: Option<Instant>,
    /// Volumes suspended at `epoch` so far.
    pub suspended: BTreeSet<String>,
    /// When the last of them was suspended.
    pub all_suspended: Option<Instant>,
    /// When the hub's group first showed `epoch` at stage Release (every volume acknowledged).
    pub frozen: Option<Instant>,
    /// When the first `Release(epoch)` reached a replicator.
    pub first_release: Option<Instant>,
    /// When the held write of the failed volume was released.
    pub held_write_released: Option<Instant>,
}

impl TrialMarks {
    /// True once every moment the trial measures has been seen.
    pub fn complete(&self) -> bool {
        self.all_suspended.is_some()
            && self.frozen.is_some()
            && self.first_release.is_some()
            && self.held_write_released.is_some()
    }
}

/// The moments of the current trial, shared by every replicator and the hub watch.
#[derive(Debug, Default)]
pub struct Probe {
    marks: Mutex<Option<TrialMarks>>,
    changed: Notify,
}

impl Probe {
    fn lock(&self) -> MutexGuard<'_, Option<TrialMarks>> {
        self.marks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts recording a trial.
    pub fn arm(&self, marks: TrialMarks) {
        *self.lock() = Some(marks);
    }

    /// Stops recording; returns what was seen.
    pub fn disarm(&self) -> Option<TrialMarks> {
        self.lock().take()
    }

    /// What was seen so far.
    pub fn snapshot(&self) -> Option<TrialMarks> {
        self.lock().clone()
    }

    /// A future that completes at the next change of the marks (enable it before checking them).
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Applies `update` to the armed trial, if any, and wakes the waiter.
    pub fn record(&self, update: impl FnOnce(&mut TrialMarks)) {
        let mut marks = self.lock();
        if let Some(marks) = marks.as_mut() {
            update(marks);
            self.changed.notify_waiters();
        }
    }
}

/// Why a replicator could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReplicatorError {
    /// The unix socket could not be bound.
    #[error("binding {path}: {source}")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

struct Inner {
    volumes: Mutex<BTreeMap<String, pb::VolumeState>>,
    events: broadcast::Sender<pb::ReplicationEvent>,
    probe: Arc<Probe>,
    stop: CancellationToken,
}

/// One node's in-memory replicator, serving on a unix socket until stopped.
#[derive(Clone)]
pub struct MemoryReplicator {
    inner: Arc<Inner>,
    socket: PathBuf,
}

impl std::fmt::Debug for MemoryReplicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryReplicator")
            .field("socket", &self.socket)
            .finish()
    }
}

fn position(state: &pb::VolumeState) -> (u64, i32) {
    (state.epoch, state.stage)
}

impl MemoryReplicator {
    /// Serves `volumes` (unconfirmed until a sidecar configures them) on `socket`.
    pub fn start(
        socket: &Path,
        volumes: &[String],
        probe: Arc<Probe>,
    ) -> Result<Self, ReplicatorError> {
        let listener =
            tokio::net::UnixListener::bind(socket).map_err(|source| ReplicatorError::Bind {
                path: socket.to_path_buf(),
                source,
            })?;
        let states = volumes
            .iter()
            .map(|handle| {
                let state = pb::VolumeState {
                    volume_handle: handle.clone(),
                    mode: pb::Mode::Unconfirmed as i32,
                    secondary: "memory".to_owned(),
                    ..Default::default()
                };
                (handle.clone(), state)
            })
            .collect();
        let (events, _) = broadcast::channel(4096);
        let replicator = Self {
            inner: Arc::new(Inner {
                volumes: Mutex::new(states),
                events,
                probe,
                stop: CancellationToken::new(),
            }),
            socket: socket.to_path_buf(),
        };
        let service = ReplicatorServer::new(replicator.clone());
        let stop = replicator.inner.stop.clone();
        let incoming = futures::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(stream, _)| stream);
            Some((accepted, listener))
        });
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "the in-memory replicator stopped");
            }
        });
        Ok(replicator)
    }

    /// The unix socket it serves on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops serving.
    pub fn stop(&self) {
        self.inner.stop.cancel();
    }

    fn volumes(&self) -> MutexGuard<'_, BTreeMap<String, pb::VolumeState>> {
        self.inner
            .volumes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every volume's state.
    pub fn states(&self) -> Vec<pb::VolumeState> {
        self.volumes().values().cloned().collect()
    }

    /// True when the sidecar is watching the events (a copy failure raised now reaches it).
    pub fn watched(&self) -> bool {
        self.inner.events.receiver_count() > 0
    }

    /// A write to `volume` whose copy failed: the volume holds it, and the failure is announced.
    pub fn fail_copy(&self, volume: &str, sequence: u64) {
        let failed = {
            let mut volumes = self.volumes();
            let Some(state) = volumes.get_mut(volume) else {
                return;
            };
            state.mode = pb::Mode::Held as i32;
            state.held_writes += 1;
            pb::CopyFailed {
                volume_handle: volume.to_owned(),
                sequence,
                group_uid: state.group_uid.clone(),
                epoch_known: state.epoch,
                error: "benchmark: copy to the secondary failed".to_owned(),
                since_unix_ms: k8s_openapi::jiff::Timestamp::now().as_millisecond(),
            }
        };
        self.emit(pb::replication_event::Kind::CopyFailed(failed));
    }

    fn emit(&self, kind: pb::replication_event::Kind) {
        // No receiver is not an error: the sidecar re-lists when it (re)connects.
        let _ = self
            .inner
            .events
            .send(pb::ReplicationEvent { kind: Some(kind) });
    }

    fn announce(&self, changed: Vec<pb::VolumeState>) {
        for state in changed {
            self.emit(pb::replication_event::Kind::StateChanged(state));
        }
    }

    /// Applies a directive to each named volume with `apply` (which returns whether the state changed),
    /// all or nothing; announces the changes.
    fn directive(
        &self,
        request: &pb::DirectiveRequest,
        apply: impl Fn(&mut pb::VolumeState) -> Result<bool, Status>,
    ) -> Result<Response<pb::DirectiveResponse>, Status> {
        let (answer, changed) = {
            let mut volumes = self.volumes();
            let mut updated = Vec::new();
            for handle in &request.volume_handles {
                let state = volumes
                    .get(handle)
                    .ok_or_else(|| Status::not_found(format!("no volume {handle}")))?;
                if state.group_uid != request.group_uid {
                    return Err(Status::failed_precondition(format!(
                        "{handle} is not in group {}",
                        request.group_uid
                    )));
                }
                let mut state = state.clone();
                let changed = apply(&mut state)?;
                updated.push((state, changed));
            }
            let mut answer = Vec::new();
            let mut changed = Vec::new();
            for (state, was_changed) in updated {
                volumes.insert(state.volume_handle.clone(), state.clone());
                if was_changed {
                    changed.push(state.clone());
                }
                answer.push(state);
            }
            (answer, changed)
        };
        self.announce(changed);
        Ok(Response::new(pb::DirectiveResponse { volumes: answer }))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ReplicationEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Replicator for MemoryReplicator {
    async fn list_volumes(
        &self,
        _: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        Ok(Response::new(pb::ListVolumesResponse {
            volumes: self.states(),
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        _: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let stream = tokio_stream_of(self.inner.events.subscribe())
            .take_until(self.inner.stop.clone().cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn configure(
        &self,
        request: Request<pb::ConfigureRequest>,
    ) -> Result<Response<pb::VolumeState>, Status> {
        let request = request.into_inner();
        let (state, changed) = {
            let mut volumes = self.volumes();
            let state = volumes
                .get_mut(&request.volume_handle)
                .ok_or_else(|| Status::not_found("no such volume"))?;
            let before = state.clone();
            if state.group_uid != request.group_uid {
                state.group_uid = request.group_uid.clone();
                state.epoch = 0;
                state.stage = 0;
            }
            state.hold_timeout_ms = request.hold_timeout_ms;
            if (request.epoch, request.stage) >= position(state)
                || state.mode == pb::Mode::Unconfirmed as i32
            {
                state.epoch = request.epoch.max(state.epoch);
                state.stage = request.stage;
                state.fail_safe = false;
                state.mode = match pb::Stage::try_from(request.stage) {
                    _ if request.group_uid.is_empty() => pb::Mode::Standalone,
                    Ok(pb::Stage::Freeze) => pb::Mode::Suspended,
                    Ok(pb::Stage::Release) => pb::Mode::Running,
                    _ => pb::Mode::Replicating,
                } as i32;
            }
            (state.clone(), *state != before)
        };
        if changed {
            self.announce(vec![state.clone()]);
        }
        Ok(Response::new(state))
    }

    async fn suspend(
        &self,
        request: Request<pb::DirectiveRequest>,
    ) -> Result<Response<pb::DirectiveResponse>, Status> {
        let request = request.into_inner();
        let answer = self.directive(&request, |state| {
            let before = state.clone();
            if request.fail_safe {
                state.fail_safe = true;
            } else if (request.epoch, pb::Stage::Freeze as i32) > position(state) {
                state.epoch = request.epoch;
                state.stage = pb::Stage::Freeze as i32;
                state.fail_safe = false;
            }
            state.mode = pb::Mode::Suspended as i32;
            Ok(*state != before)
        })?;
        let now = Instant::now();
        self.inner.probe.record(|marks| {
            if request.epoch != marks.epoch || request.fail_safe {
                return;
            }
            marks
                .suspended
                .extend(request.volume_handles.iter().cloned());
            if marks.all_suspended.is_none() && marks.suspended.len() >= marks.total {
                marks.all_suspended = Some(now);
            }
        });
        Ok(answer)
    }

    async fn release(
        &self,
        request: Request<pb::DirectiveRequest>,
    ) -> Result<Response<pb::DirectiveResponse>, Status> {
        let request = request.into_inner();
        let answer = self.directive(&request, |state| {
            let suspended_here = state.mode == pb::Mode::Suspended as i32
                && state.epoch == request.epoch
                && !state.fail_safe;
            let released_here = state.mode == pb::Mode::Running as i32
                && state.epoch == request.epoch
                && state.stage == pb::Stage::Release as i32;
            if released_here {
                return Ok(false);
            }
            if !suspended_here {
                return Err(Status::failed_precondition(format!(
                    "{} is not suspended at epoch {}",
                    state.volume_handle, request.epoch
                )));
            }
            state.stage = pb::Stage::Release as i32;
            state.mode = pb::Mode::Running as i32;
            state.held_writes = 0;
            Ok(true)
        })?;
        let now = Instant::now();
        self.inner.probe.record(|marks| {
            if request.epoch != marks.epoch {
                return;
            }
            marks.first_release.get_or_insert(now);
            if request.volume_handles.contains(&marks.failed_volume) {
                marks.held_write_released.get_or_insert(now);
            }
        });
        Ok(answer)
    }

    async fn resume(
        &self,
        request: Request<pb::DirectiveRequest>,
    ) -> Result<Response<pb::DirectiveResponse>, Status> {
        let request = request.into_inner();
        self.directive(&request, |state| {
            let before = state.clone();
            if (request.epoch, pb::Stage::Resume as i32) >= position(state) {
                state.epoch = request.epoch;
                state.stage = pb::Stage::Resume as i32;
                state.mode = pb::Mode::Replicating as i32;
                state.fail_safe = false;
                state.held_writes = 0;
                state.dirty_bytes = 0;
            }
            Ok(*state != before)
        })
    }

    async fn state(
        &self,
        request: Request<pb::StateRequest>,
    ) -> Result<Response<pb::VolumeState>, Status> {
        let handle = request.into_inner().volume_handle;
        self.volumes()
            .get(&handle)
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no volume {handle}")))
    }

    async fn keep_image(
        &self,
        _request: Request<pb::ImageRequest>,
    ) -> Result<Response<pb::ImageResponse>, Status> {
        Err(Status::unimplemented(
            "this replicator keeps no image through a resync",
        ))
    }

    async fn drop_image(
        &self,
        _request: Request<pb::ImageRequest>,
    ) -> Result<Response<pb::ImageResponse>, Status> {
        Err(Status::unimplemented(
            "this replicator keeps no image through a resync",
        ))
    }

    async fn roll_back(
        &self,
        _request: Request<pb::ImageRequest>,
    ) -> Result<Response<pb::ImageResponse>, Status> {
        Err(Status::unimplemented(
            "this replicator keeps no image through a resync",
        ))
    }

    async fn promote(
        &self,
        _request: Request<pb::FailoverRequest>,
    ) -> Result<Response<pb::FailoverResponse>, Status> {
        Err(Status::unimplemented(NO_FAILOVER))
    }

    async fn fence(
        &self,
        _request: Request<pb::FailoverRequest>,
    ) -> Result<Response<pb::FailoverResponse>, Status> {
        Err(Status::unimplemented(NO_FAILOVER))
    }

    async fn reverse(
        &self,
        _request: Request<pb::ReverseRequest>,
    ) -> Result<Response<pb::FailoverResponse>, Status> {
        Err(Status::unimplemented(NO_FAILOVER))
    }
}

/// What it answers to Promote, Fence and Reverse.
const NO_FAILOVER: &str = "the freeze benchmark's in-memory replicator does not support failover: it holds no volume data to promote, fence or reverse";

/// The events as a stream; a receiver that lagged skips what it missed (the sidecar re-lists on every
/// state change anyway).
fn tokio_stream_of(
    receiver: broadcast::Receiver<pb::ReplicationEvent>,
) -> impl Stream<Item = Result<pb::ReplicationEvent, Status>> + Send {
    futures::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(event) => return Some((Ok(event), receiver)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}
