//! The `Replicator` gRPC service (`lockstep.replicator.v1`), served on a unix socket: how the node's
//! sidecar lists volumes, watches replication events, confirms / configures volumes and directs suspend,
//! release and resume at epochs. Every directive is handed to the volume's state machine
//! ([`crate::hold`]), which refuses or ignores what DESIGN.md rules 2, 3, 6 and 8 forbid.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use lockstep_api::proto::replicator::v1 as pb;
use pb::replicator_server::{Replicator, ReplicatorServer};
use tokio::net::UnixListener;
use tokio::sync::broadcast;
use tokio_stream::wrappers::{BroadcastStream, UnixListenerStream};
use tonic::{Request, Response, Status};

use crate::events::Event;
use crate::failover::{FailoverError, Site, quoted};
use crate::hold::{DirectiveError, Mode, Stage};
use crate::nbd::Exports;
use crate::volume::{Volume, VolumeStatus};

/// The service over a set of volumes.
#[derive(Debug, Clone)]
pub struct ControlService {
    exports: Exports,
    events: broadcast::Sender<Event>,
    /// Where the secondaries are: the failover side (Promote, Reverse) and the secondary volumes.
    site: Option<Arc<Site>>,
}

/// What a replicator serving only primaries answers to a verb served where the secondaries are.
const SERVED_AT_SECONDARIES: &str = "this replicator serves primaries and does not support failover \
     here: {verb} is served where the secondaries are (`lockstep-replicator secondary \
     --control-socket PATH`)";

impl ControlService {
    /// A service for `exports`, publishing `events`.
    pub fn new(exports: Exports, events: broadcast::Sender<Event>) -> Self {
        ControlService {
            exports,
            events,
            site: None,
        }
    }

    /// The service of a secondary: its promoted volumes (and their events), Promote and Reverse, and
    /// its secondary volumes in ListVolumes and State.
    pub fn for_secondary(site: Arc<Site>) -> Self {
        ControlService {
            exports: site.exports().clone(),
            events: site.events().clone(),
            site: Some(site),
        }
    }

    fn site(&self, verb: &str) -> Result<&Arc<Site>, Status> {
        self.site
            .as_ref()
            .ok_or_else(|| Status::unimplemented(SERVED_AT_SECONDARIES.replace("{verb}", verb)))
    }

    /// A served volume's state, naming the epoch it was promoted from on a secondary.
    fn describe(&self, volume: &Volume) -> pb::VolumeState {
        let mut state = state_to_pb(&volume.status());
        state.promoted_epoch = self
            .site
            .as_ref()
            .and_then(|site| site.promoted_epoch(volume.name()));
        state
    }

    /// The state of a secondary volume (not promoted) on a secondary's control surface.
    fn replica_state(site: &Site, name: &str) -> pb::VolumeState {
        pb::VolumeState {
            volume_handle: name.to_owned(),
            kept_image_epoch: site.kept_image(name),
            replica: true,
            ..pb::VolumeState::default()
        }
    }

    fn volume(&self, name: &str) -> Result<Arc<Volume>, Status> {
        self.exports
            .get(name)
            .filter(|v| v.name() == name)
            .ok_or_else(|| Status::not_found(format!("no volume {}", quoted(name))))
    }

    /// Serves on a unix socket until the task is dropped. Dropping it also ends every accepted
    /// connection (tonic serves each on a task of its own, which would otherwise run on), so a dropped
    /// [`crate::Primary`] is gone for its clients as a killed process is.
    pub async fn serve_unix(self, listener: UnixListener) -> Result<(), tonic::transport::Error> {
        let killed = tokio_util::sync::CancellationToken::new();
        let _kill_connections_when_dropped = killed.clone().drop_guard();
        let incoming = UnixListenerStream::new(listener)
            .map(move |accepted| accepted.map(|stream| Killable::new(stream, &killed)));
        tonic::transport::Server::builder()
            .add_service(ReplicatorServer::new(self))
            .serve_with_incoming(incoming)
            .await
    }
}

/// An accepted connection that fails every read and write once its server is gone.
struct Killable {
    stream: tokio::net::UnixStream,
    killed: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl Killable {
    fn new(stream: tokio::net::UnixStream, killed: &tokio_util::sync::CancellationToken) -> Self {
        Killable {
            stream,
            killed: Box::pin(killed.clone().cancelled_owned()),
        }
    }

    fn check(&mut self, cx: &mut std::task::Context<'_>) -> std::io::Result<()> {
        match self.killed.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => Err(std::io::ErrorKind::ConnectionAborted.into()),
            std::task::Poll::Pending => Ok(()),
        }
    }
}

macro_rules! unless_killed {
    ($self:ident, $cx:ident, $call:expr) => {{
        let this = $self.get_mut();
        if let Err(e) = this.check($cx) {
            return std::task::Poll::Ready(Err(e));
        }
        let stream = Pin::new(&mut this.stream);
        $call(stream)
    }};
}

impl tokio::io::AsyncRead for Killable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        unless_killed!(self, cx, |s: Pin<&mut tokio::net::UnixStream>| s
            .poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for Killable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        unless_killed!(self, cx, |s: Pin<&mut tokio::net::UnixStream>| s
            .poll_write(cx, buf))
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        unless_killed!(self, cx, |s: Pin<&mut tokio::net::UnixStream>| s
            .poll_flush(cx))
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Killable {
    type ConnectInfo = <tokio::net::UnixStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// The longest group UID the service takes (a Kubernetes UID is 36 bytes): a group UID is kept in the
/// volume's state and named in every answer about it.
pub const MAX_GROUP_UID: usize = 253;

/// Refuses a group UID longer than [`MAX_GROUP_UID`].
fn bounded_group(group_uid: &str) -> Result<(), Status> {
    if group_uid.len() > MAX_GROUP_UID {
        return Err(Status::invalid_argument(format!(
            "a group UID of {} bytes (at most {MAX_GROUP_UID}): {}",
            group_uid.len(),
            quoted(group_uid)
        )));
    }
    Ok(())
}

/// Binds the control socket (removing a stale socket file).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
}

fn stage_to_pb(stage: Option<Stage>) -> pb::Stage {
    match stage {
        None => pb::Stage::Unspecified,
        Some(Stage::Freeze) => pb::Stage::Freeze,
        Some(Stage::Release) => pb::Stage::Release,
        Some(Stage::Resume) => pb::Stage::Resume,
    }
}

fn stage_from_pb(stage: i32) -> Result<Option<Stage>, Status> {
    match pb::Stage::try_from(stage) {
        Ok(pb::Stage::Unspecified) => Ok(None),
        Ok(pb::Stage::Freeze) => Ok(Some(Stage::Freeze)),
        Ok(pb::Stage::Release) => Ok(Some(Stage::Release)),
        Ok(pb::Stage::Resume) => Ok(Some(Stage::Resume)),
        Err(_) => Err(Status::invalid_argument(format!("unknown stage {stage}"))),
    }
}

fn mode_to_pb(mode: &Mode) -> pb::Mode {
    match mode {
        Mode::Unconfirmed => pb::Mode::Unconfirmed,
        Mode::Standalone => pb::Mode::Standalone,
        Mode::Replicating => pb::Mode::Replicating,
        Mode::Held { .. } => pb::Mode::Held,
        Mode::Suspended { .. } => pb::Mode::Suspended,
        Mode::Running { .. } => pb::Mode::Running,
        Mode::Resyncing { .. } => pb::Mode::Resyncing,
    }
}

/// A volume's status as the protocol's `VolumeState`.
pub fn state_to_pb(status: &VolumeStatus) -> pb::VolumeState {
    let s = &status.replication;
    pb::VolumeState {
        volume_handle: status.name.clone(),
        group_uid: s.group_uid.clone(),
        epoch: s.epoch,
        stage: stage_to_pb(s.stage).into(),
        mode: mode_to_pb(&s.mode).into(),
        fail_safe: s.fail_safe,
        held_writes: s.held as u64,
        dirty_bytes: s.dirty_bytes,
        last_acked_sequence: s.last_acked.unwrap_or(0),
        hold_timeout_ms: u64::try_from(s.hold_timeout.as_millis()).unwrap_or(u64::MAX),
        secondary: status.secondary.clone(),
        kept_image_epoch: status.kept_image,
        fenced_epoch: status.fenced,
        promoted_epoch: None,
        replica: false,
    }
}

fn event_to_pb(event: Event) -> pb::ReplicationEvent {
    use pb::replication_event::Kind;
    let kind = match event {
        Event::CopyFailed(e) => Kind::CopyFailed(pb::CopyFailed {
            volume_handle: e.volume,
            sequence: e.sequence,
            group_uid: e.group_uid,
            epoch_known: e.epoch_known,
            error: e.error,
            since_unix_ms: e
                .since
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        }),
        Event::HoldTimedOut(e) => Kind::HoldTimedOut(pb::HoldTimedOut {
            volume_handle: e.volume,
            failed_writes: e.failed_writes,
        }),
        Event::StateChanged(s) => Kind::StateChanged(state_to_pb(&s)),
    };
    pb::ReplicationEvent { kind: Some(kind) }
}

fn failover_status(e: FailoverError) -> Status {
    match e {
        FailoverError::Invalid(_) => Status::invalid_argument(e.to_string()),
        FailoverError::NoVolume { .. } => Status::not_found(e.to_string()),
        FailoverError::Refused(_) => Status::failed_precondition(e.to_string()),
        FailoverError::Directive(d) => directive_status(d),
        FailoverError::RollBack { .. } | FailoverError::File { .. } | FailoverError::Volume(_) => {
            Status::internal(e.to_string())
        }
    }
}

fn ranges_to_pb(ranges: &[(u64, u64)]) -> (Vec<pb::ByteRange>, u64) {
    (
        ranges
            .iter()
            .map(|(offset, length)| pb::ByteRange {
                offset: *offset,
                length: *length,
            })
            .collect(),
        ranges.iter().map(|(_, length)| length).sum(),
    )
}

fn failover_volume(
    state: pb::VolumeState,
    image_epoch: u64,
    ranges: &[(u64, u64)],
) -> pb::FailoverVolume {
    let (ranges, range_bytes) = ranges_to_pb(ranges);
    pb::FailoverVolume {
        state: Some(state),
        image_epoch,
        ranges,
        range_bytes,
    }
}

fn directive_status(e: DirectiveError) -> Status {
    match e {
        DirectiveError::NotReplicated(_) | DirectiveError::Refused(_) => {
            Status::failed_precondition(e.to_string())
        }
        DirectiveError::WrongGroup { .. } => Status::failed_precondition(e.to_string()),
        DirectiveError::Persist(_) => Status::internal(e.to_string()),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ReplicationEvent, Status>> + Send>>;

#[derive(Clone, Copy)]
enum Directive {
    Suspend,
    Release,
    Resume,
}

impl ControlService {
    /// The named volumes of a request for group `group_uid`, every one resolved first so that an
    /// unknown name changes nothing.
    fn group_volumes(&self, group_uid: &str, names: &[String]) -> Result<Vec<Arc<Volume>>, Status> {
        if group_uid.is_empty() {
            return Err(Status::invalid_argument("the request names no group"));
        }
        bounded_group(group_uid)?;
        names.iter().map(|name| self.volume(name)).collect()
    }

    async fn directive(
        &self,
        request: pb::DirectiveRequest,
        what: Directive,
    ) -> Result<Response<pb::DirectiveResponse>, Status> {
        let volumes = self.group_volumes(&request.group_uid, &request.volume_handles)?;
        // The volumes together: each persists its own state file, so a group's suspend costs one
        // state write, not one per volume in a row.
        let results = futures::future::join_all(volumes.iter().map(|volume| {
            let (group, epoch) = (&request.group_uid, request.epoch);
            async move {
                match what {
                    Directive::Suspend => volume.suspend(group, epoch, request.fail_safe).await,
                    Directive::Release => volume.release(group, epoch).await,
                    Directive::Resume => volume.resume(group, epoch).await,
                }
            }
        }))
        .await;
        let states = results
            .into_iter()
            .map(|result| result.map(|status| state_to_pb(&status)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(directive_status)?;
        Ok(Response::new(pb::DirectiveResponse { volumes: states }))
    }
}

impl ControlService {
    /// Applies a kept-image request to every named volume of the group (all resolved first).
    fn image(
        &self,
        request: pb::ImageRequest,
        apply: impl Fn(&Volume, u64) -> Option<u64>,
    ) -> Result<Response<pb::ImageResponse>, Status> {
        let volumes = self.group_volumes(&request.group_uid, &request.volume_handles)?;
        if let Some(other) = volumes
            .iter()
            .find(|v| v.status().replication.group_uid != request.group_uid)
        {
            return Err(Status::failed_precondition(format!(
                "volume {} is not in group {}",
                other.name(),
                quoted(&request.group_uid)
            )));
        }
        let kept = volumes
            .iter()
            .map(|volume| pb::KeptImage {
                volume_handle: volume.name().to_owned(),
                epoch: apply(volume, request.epoch),
            })
            .collect();
        Ok(Response::new(pb::ImageResponse { volumes: kept }))
    }
}

#[tonic::async_trait]
impl Replicator for ControlService {
    async fn list_volumes(
        &self,
        _request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let mut volumes: Vec<pb::VolumeState> = self
            .exports
            .all()
            .iter()
            .map(|v| self.describe(v))
            .collect();
        if let Some(site) = &self.site {
            volumes.extend(
                site.replicas()
                    .iter()
                    .map(|name| Self::replica_state(site, name)),
            );
        }
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        _request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let stream = BroadcastStream::new(self.events.subscribe()).map(|item| match item {
            Ok(event) => Ok(event_to_pb(event)),
            // The watcher fell behind: end its stream so it re-lists rather than miss an event.
            Err(e) => Err(Status::data_loss(format!("events lost ({e}); list again"))),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn configure(
        &self,
        request: Request<pb::ConfigureRequest>,
    ) -> Result<Response<pb::VolumeState>, Status> {
        let r = request.into_inner();
        let volume = self.volume(&r.volume_handle)?;
        bounded_group(&r.group_uid)?;
        let stage = stage_from_pb(r.stage)?;
        let hold_timeout =
            (r.hold_timeout_ms > 0).then(|| Duration::from_millis(r.hold_timeout_ms));
        let status = volume
            .configure(&r.group_uid, r.epoch, stage, hold_timeout)
            .await
            .map_err(directive_status)?;
        Ok(Response::new(state_to_pb(&status)))
    }

    async fn suspend(
        &self,
        request: Request<pb::DirectiveRequest>,
    ) -> Result<Response<pb::DirectiveResponse>, Status> {
        self.directive(request.into_inner(), Directive::Suspend)
            .await
    }

    async fn release(
        &self,
        request: Request<pb::DirectiveRequest>,
    ) -> Result<Response<pb::DirectiveResponse>, Status> {
        self.directive(request.into_inner(), Directive::Release)
            .await
    }

    async fn resume(
        &self,
        request: Request<pb::DirectiveRequest>,
    ) -> Result<Response<pb::DirectiveResponse>, Status> {
        self.directive(request.into_inner(), Directive::Resume)
            .await
    }

    async fn keep_image(
        &self,
        request: Request<pb::ImageRequest>,
    ) -> Result<Response<pb::ImageResponse>, Status> {
        self.image(request.into_inner(), |volume, epoch| {
            volume.set_keep_image(epoch);
            Some(epoch)
        })
    }

    async fn drop_image(
        &self,
        request: Request<pb::ImageRequest>,
    ) -> Result<Response<pb::ImageResponse>, Status> {
        self.image(request.into_inner(), |volume, epoch| {
            volume.drop_image(epoch);
            volume.kept_image()
        })
    }

    async fn roll_back(
        &self,
        _request: Request<pb::ImageRequest>,
    ) -> Result<Response<pb::ImageResponse>, Status> {
        Err(Status::unimplemented(
            "this replicator serves primaries; a secondary is rolled back where it runs: `lockstep-replicator rollback --dir DIR [--volume NAME]` with the secondary stopped",
        ))
    }

    async fn state(
        &self,
        request: Request<pb::StateRequest>,
    ) -> Result<Response<pb::VolumeState>, Status> {
        let name = &request.get_ref().volume_handle;
        if let Some(site) = &self.site
            && site.is_replica(name)
        {
            return Ok(Response::new(Self::replica_state(site, name)));
        }
        let volume = self.volume(name)?;
        Ok(Response::new(self.describe(&volume)))
    }

    async fn promote(
        &self,
        request: Request<pb::FailoverRequest>,
    ) -> Result<Response<pb::FailoverResponse>, Status> {
        let site = self.site("Promote")?;
        let r = request.into_inner();
        bounded_group(&r.group_uid)?;
        let promoted = site
            .promote(
                &r.group_uid,
                r.epoch,
                &r.volume_handles,
                r.primary_site_lost,
            )
            .await
            .map_err(failover_status)?;
        let volumes = promoted
            .iter()
            .map(|p| failover_volume(self.describe(&p.volume), p.epoch, &p.rolled_back))
            .collect();
        Ok(Response::new(pb::FailoverResponse { volumes }))
    }

    async fn fence(
        &self,
        request: Request<pb::FailoverRequest>,
    ) -> Result<Response<pb::FailoverResponse>, Status> {
        let r = request.into_inner();
        let volumes = self.group_volumes(&r.group_uid, &r.volume_handles)?;
        let mut answers = Vec::new();
        for volume in volumes {
            let (_, lacking) = volume
                .fence(&r.group_uid, r.epoch)
                .await
                .map_err(directive_status)?;
            answers.push(failover_volume(self.describe(&volume), r.epoch, &lacking));
        }
        Ok(Response::new(pb::FailoverResponse { volumes: answers }))
    }

    async fn reverse(
        &self,
        request: Request<pb::ReverseRequest>,
    ) -> Result<Response<pb::FailoverResponse>, Status> {
        let site = self.site("Reverse")?;
        let r = request.into_inner();
        bounded_group(&r.group_uid)?;
        let mut changes = std::collections::BTreeMap::<String, Vec<(u64, u64)>>::new();
        for v in &r.old_site_changes {
            changes
                .entry(v.volume_handle.clone())
                .or_default()
                .extend(v.ranges.iter().map(|b| (b.offset, b.length)));
        }
        let reversed = site
            .reverse(&r.group_uid, r.epoch, &r.peer, &r.volume_handles, &changes)
            .await
            .map_err(failover_status)?;
        let volumes = reversed
            .iter()
            .map(|(volume, discarded)| failover_volume(self.describe(volume), r.epoch, discarded))
            .collect();
        Ok(Response::new(pb::FailoverResponse { volumes }))
    }
}
