//! Test fixtures: a recording `Replicator` gRPC double on a unix socket, a test `Control` server on a
//! loopback port (standing in for the operator), the test API server with Lockstep's CRDs, and polling
//! waits with generous deadlines (never fixed sleeps, never timing assertions).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use lockstep_api::proto::control::v1 as cpb;
use lockstep_api::proto::replicator::v1 as rpb;
use lockstep_api::v1alpha1::{ConsistencyGroup, ReplicationNode};
use lockstep_sidecar::{Options, Sidecar};
use lockstep_testapi::TestApiServer;
use serde_json::json;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub const CLUSTER: &str = "east";
pub const NODE: &str = "node-1";
pub const GROUP: &str = "orders";

/// Polls `check` until it holds; panics with `what` when it never does (the workspace's one
/// `eventually`, for a check that answers yes or no).
pub async fn eventually<F: FnMut() -> bool>(what: &str, mut check: F) {
    lockstep_replicator::testing::eventually(what, || std::future::ready(check().then_some(())))
        .await
}

/// As [`eventually`], with an async check.
pub async fn eventually_async<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    lockstep_replicator::testing::eventually(what, || {
        let holds = check();
        async move { holds.await.then_some(()) }
    })
    .await
}

// ---- Replicator double ---------------------------------------------------------------------------

/// One recorded replicator call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub kind: &'static str,
    pub volumes: Vec<String>,
    pub group: String,
    pub epoch: u64,
    pub stage: i32,
    pub fail_safe: bool,
}

#[derive(Debug, Default)]
pub struct ReplicatorState {
    pub volumes: Mutex<BTreeMap<String, rpb::VolumeState>>,
    pub calls: Mutex<Vec<Call>>,
    /// Whether a `Configure` that changes a volume announces its new state (as the reference
    /// replicator and the benchmark's do).
    pub announce_changes: std::sync::atomic::AtomicBool,
    /// Volumes whose `Suspend` fails (unavailable), as a replicator that cannot write its state would.
    pub refused_suspends: Mutex<std::collections::BTreeSet<String>>,
}

/// A recording Replicator service: keeps each volume's group, epoch, stage and mode.
#[derive(Debug, Clone)]
pub struct FakeReplicator {
    pub state: Arc<ReplicatorState>,
    pub events: broadcast::Sender<rpb::ReplicationEvent>,
    pub socket: PathBuf,
    stop: CancellationToken,
    _dir: Arc<tempfile::TempDir>,
}

impl FakeReplicator {
    /// Serves `volumes` (fresh: no group, unconfirmed, replicating once confirmed).
    pub async fn start(volumes: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("replicator.sock");
        let state = Arc::new(ReplicatorState::default());
        for v in volumes {
            state.volumes.lock().unwrap().insert(
                (*v).to_owned(),
                rpb::VolumeState {
                    volume_handle: (*v).to_owned(),
                    mode: rpb::Mode::Unconfirmed as i32,
                    ..Default::default()
                },
            );
        }
        let (events, _) = broadcast::channel(64);
        let fake = Self {
            state,
            events,
            socket,
            stop: CancellationToken::new(),
            _dir: Arc::new(dir),
        };
        fake.serve();
        fake
    }

    fn serve(&self) {
        let listener = tokio::net::UnixListener::bind(&self.socket).unwrap();
        let service = rpb::replicator_server::ReplicatorServer::new(self.clone());
        let stop = self.stop.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await
                .unwrap();
        });
    }

    /// From now on, a `Configure` that changes a volume announces the new state on the event stream.
    pub fn announce_changes(&self) {
        self.state
            .announce_changes
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// From now on, a `Suspend` naming any of `volumes` fails (an empty list: none does).
    pub fn refuse_suspends(&self, volumes: &[&str]) {
        *self.state.refused_suspends.lock().unwrap() =
            volumes.iter().map(|v| (*v).to_owned()).collect();
    }

    /// The recorded calls of a kind.
    pub fn calls(&self, kind: &str) -> Vec<Call> {
        self.state
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.kind == kind)
            .cloned()
            .collect()
    }

    pub fn all_calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }

    pub fn volume(&self, name: &str) -> rpb::VolumeState {
        self.state.volumes.lock().unwrap()[name].clone()
    }

    /// A copy failure on a volume (its write is held), once the sidecar watches the events.
    pub async fn fail_copy(&self, volume: &str) {
        let events = self.events.clone();
        eventually("the sidecar watches replication events", move || {
            events.receiver_count() > 0
        })
        .await;
        let known = {
            let mut volumes = self.state.volumes.lock().unwrap();
            let v = volumes.get_mut(volume).unwrap();
            v.mode = rpb::Mode::Held as i32;
            v.epoch
        };
        let _ = self.events.send(rpb::ReplicationEvent {
            kind: Some(rpb::replication_event::Kind::CopyFailed(rpb::CopyFailed {
                volume_handle: volume.to_owned(),
                sequence: 42,
                group_uid: String::new(),
                epoch_known: known,
                error: "link cut".to_owned(),
                since_unix_ms: 1_700_000_000_000,
            })),
        });
    }

    /// Held writes of a volume failed at the hold timeout, once the sidecar watches the events.
    pub async fn time_out_holds(&self, volume: &str, failed_writes: u64) {
        let events = self.events.clone();
        eventually("the sidecar watches replication events", move || {
            events.receiver_count() > 0
        })
        .await;
        let _ = self.events.send(rpb::ReplicationEvent {
            kind: Some(rpb::replication_event::Kind::HoldTimedOut(
                rpb::HoldTimedOut {
                    volume_handle: volume.to_owned(),
                    failed_writes,
                },
            )),
        });
    }

    /// As after a replicator restart: every volume waits for a confirmation again.
    pub fn unconfirm_all(&self) {
        for v in self.state.volumes.lock().unwrap().values_mut() {
            v.mode = rpb::Mode::Unconfirmed as i32;
        }
    }

    fn record(&self, call: Call) {
        self.state.calls.lock().unwrap().push(call);
    }

    fn states(&self, names: &[String]) -> Vec<rpb::VolumeState> {
        let volumes = self.state.volumes.lock().unwrap();
        names
            .iter()
            .filter_map(|n| volumes.get(n).cloned())
            .collect()
    }
}

fn position(v: &rpb::VolumeState) -> (u64, i32) {
    (v.epoch, v.stage)
}

#[tonic::async_trait]
impl rpb::replicator_server::Replicator for FakeReplicator {
    async fn list_volumes(
        &self,
        _: Request<rpb::ListVolumesRequest>,
    ) -> Result<Response<rpb::ListVolumesResponse>, Status> {
        let volumes = self
            .state
            .volumes
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect();
        Ok(Response::new(rpb::ListVolumesResponse { volumes }))
    }

    type WatchEventsStream =
        Pin<Box<dyn Stream<Item = Result<rpb::ReplicationEvent, Status>> + Send + 'static>>;

    async fn watch_events(
        &self,
        _: Request<rpb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let stream = tokio_stream::wrappers::BroadcastStream::new(self.events.subscribe())
            .filter_map(|e| async move { e.ok().map(Ok) })
            .take_until(self.stop.clone().cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn configure(
        &self,
        request: Request<rpb::ConfigureRequest>,
    ) -> Result<Response<rpb::VolumeState>, Status> {
        let r = request.into_inner();
        self.record(Call {
            kind: "configure",
            volumes: vec![r.volume_handle.clone()],
            group: r.group_uid.clone(),
            epoch: r.epoch,
            stage: r.stage,
            fail_safe: false,
        });
        let mut volumes = self.state.volumes.lock().unwrap();
        let v = volumes
            .get_mut(&r.volume_handle)
            .ok_or_else(|| Status::not_found("no such volume"))?;
        let before = v.clone();
        if v.group_uid != r.group_uid {
            v.group_uid = r.group_uid.clone();
            v.epoch = 0;
            v.stage = 0;
        }
        if (r.epoch, r.stage) >= position(v) {
            v.epoch = r.epoch;
            v.stage = r.stage;
            v.fail_safe = false;
            v.mode = match rpb::Stage::try_from(r.stage) {
                Ok(rpb::Stage::Freeze) => rpb::Mode::Suspended,
                Ok(rpb::Stage::Release) => rpb::Mode::Running,
                _ => rpb::Mode::Replicating,
            } as i32;
        }
        if *v != before
            && self
                .state
                .announce_changes
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            let _ = self.events.send(rpb::ReplicationEvent {
                kind: Some(rpb::replication_event::Kind::StateChanged(v.clone())),
            });
        }
        Ok(Response::new(v.clone()))
    }

    async fn suspend(
        &self,
        request: Request<rpb::DirectiveRequest>,
    ) -> Result<Response<rpb::DirectiveResponse>, Status> {
        let r = request.into_inner();
        self.record(Call {
            kind: "suspend",
            volumes: r.volume_handles.clone(),
            group: r.group_uid.clone(),
            epoch: r.epoch,
            stage: rpb::Stage::Freeze as i32,
            fail_safe: r.fail_safe,
        });
        {
            let refused = self.state.refused_suspends.lock().unwrap();
            if let Some(volume) = r.volume_handles.iter().find(|v| refused.contains(*v)) {
                return Err(Status::unavailable(format!(
                    "the state of {volume} cannot be written"
                )));
            }
        }
        {
            let mut volumes = self.state.volumes.lock().unwrap();
            for name in &r.volume_handles {
                let v = volumes
                    .get_mut(name)
                    .ok_or_else(|| Status::not_found("no such volume"))?;
                if v.group_uid != r.group_uid {
                    return Err(Status::failed_precondition("wrong group"));
                }
                if r.fail_safe {
                    v.fail_safe = true;
                } else if (r.epoch, rpb::Stage::Freeze as i32) > position(v) {
                    v.epoch = r.epoch;
                    v.stage = rpb::Stage::Freeze as i32;
                    v.fail_safe = false;
                }
                v.mode = rpb::Mode::Suspended as i32;
            }
        }
        Ok(Response::new(rpb::DirectiveResponse {
            volumes: self.states(&r.volume_handles),
        }))
    }

    async fn release(
        &self,
        request: Request<rpb::DirectiveRequest>,
    ) -> Result<Response<rpb::DirectiveResponse>, Status> {
        let r = request.into_inner();
        self.record(Call {
            kind: "release",
            volumes: r.volume_handles.clone(),
            group: r.group_uid.clone(),
            epoch: r.epoch,
            stage: rpb::Stage::Release as i32,
            fail_safe: false,
        });
        {
            let mut volumes = self.state.volumes.lock().unwrap();
            for name in &r.volume_handles {
                let v = volumes
                    .get_mut(name)
                    .ok_or_else(|| Status::not_found("no such volume"))?;
                if v.mode != rpb::Mode::Suspended as i32 || v.epoch != r.epoch || v.fail_safe {
                    return Err(Status::failed_precondition("not suspended at that epoch"));
                }
                v.stage = rpb::Stage::Release as i32;
                v.mode = rpb::Mode::Running as i32;
            }
        }
        Ok(Response::new(rpb::DirectiveResponse {
            volumes: self.states(&r.volume_handles),
        }))
    }

    async fn resume(
        &self,
        request: Request<rpb::DirectiveRequest>,
    ) -> Result<Response<rpb::DirectiveResponse>, Status> {
        let r = request.into_inner();
        self.record(Call {
            kind: "resume",
            volumes: r.volume_handles.clone(),
            group: r.group_uid.clone(),
            epoch: r.epoch,
            stage: rpb::Stage::Resume as i32,
            fail_safe: false,
        });
        {
            let mut volumes = self.state.volumes.lock().unwrap();
            for name in &r.volume_handles {
                let v = volumes
                    .get_mut(name)
                    .ok_or_else(|| Status::not_found("no such volume"))?;
                v.epoch = r.epoch;
                v.stage = rpb::Stage::Resume as i32;
                v.mode = rpb::Mode::Replicating as i32;
                v.fail_safe = false;
            }
        }
        Ok(Response::new(rpb::DirectiveResponse {
            volumes: self.states(&r.volume_handles),
        }))
    }

    async fn state(
        &self,
        request: Request<rpb::StateRequest>,
    ) -> Result<Response<rpb::VolumeState>, Status> {
        let name = request.into_inner().volume_handle;
        let volumes = self.state.volumes.lock().unwrap();
        volumes
            .get(&name)
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::not_found("no such volume"))
    }

    async fn keep_image(
        &self,
        _request: Request<rpb::ImageRequest>,
    ) -> Result<Response<rpb::ImageResponse>, Status> {
        Err(Status::unimplemented(
            "this replicator keeps no image through a resync",
        ))
    }

    async fn drop_image(
        &self,
        _request: Request<rpb::ImageRequest>,
    ) -> Result<Response<rpb::ImageResponse>, Status> {
        Err(Status::unimplemented(
            "this replicator keeps no image through a resync",
        ))
    }

    async fn roll_back(
        &self,
        _request: Request<rpb::ImageRequest>,
    ) -> Result<Response<rpb::ImageResponse>, Status> {
        Err(Status::unimplemented(
            "this replicator keeps no image through a resync",
        ))
    }

    async fn promote(
        &self,
        _request: Request<rpb::FailoverRequest>,
    ) -> Result<Response<rpb::FailoverResponse>, Status> {
        Err(Status::unimplemented(NO_FAILOVER))
    }

    async fn fence(
        &self,
        _request: Request<rpb::FailoverRequest>,
    ) -> Result<Response<rpb::FailoverResponse>, Status> {
        Err(Status::unimplemented(NO_FAILOVER))
    }

    async fn reverse(
        &self,
        _request: Request<rpb::ReverseRequest>,
    ) -> Result<Response<rpb::FailoverResponse>, Status> {
        Err(Status::unimplemented(NO_FAILOVER))
    }
}

/// What it answers to Promote, Fence and Reverse.
const NO_FAILOVER: &str = "the sidecar tests' fake replicator does not support failover: it holds no volume data to promote, fence or reverse";

// ---- Control server ------------------------------------------------------------------------------

#[derive(Debug, Default)]
pub struct ControlState {
    pub reports: Mutex<Vec<cpb::ReportRequest>>,
    pub acks: Mutex<Vec<cpb::AckRequest>>,
    pub subscribes: Mutex<Vec<cpb::SubscribeRequest>>,
    /// Sent to every new subscriber first.
    pub membership: Mutex<Option<cpb::Membership>>,
    /// The current point per group, for answers.
    pub current: Mutex<BTreeMap<String, cpb::GroupEpoch>>,
    /// While set, every call is refused (as by a cut network), even on open connections.
    pub refusing: std::sync::atomic::AtomicBool,
    /// While set, acknowledgements are answered OK but not applied (as by an operator that has not
    /// resolved the volumes yet).
    pub not_applying: std::sync::atomic::AtomicBool,
    /// The `authorization` metadata of every call, in order ("" when absent).
    pub authorizations: Mutex<Vec<String>>,
    /// TLS handshakes that failed (a client that does not trust this server's certificate).
    pub failed_handshakes: std::sync::atomic::AtomicUsize,
}

/// A test `Control` server on a loopback port: records reports, acks and subscriptions, pushes
/// directives, sends heartbeats; can be stopped (connections refused) and started again on its port.
#[derive(Debug, Clone)]
pub struct FakeControl {
    pub state: Arc<ControlState>,
    pub out: broadcast::Sender<cpb::ControlMessage>,
    pub addr: SocketAddr,
    stop: Arc<Mutex<CancellationToken>>,
    /// Serves TLS with this configuration when set.
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl FakeControl {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// A Control server that speaks TLS with `config` (its certificate, no client certificates).
    pub async fn start_tls(config: Arc<rustls::ServerConfig>) -> Self {
        Self::start_with(Some(config)).await
    }

    async fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (out, _) = broadcast::channel(64);
        let control = Self {
            state: Arc::new(ControlState::default()),
            out,
            addr,
            stop: Arc::new(Mutex::new(CancellationToken::new())),
            tls,
        };
        control.serve(listener);
        // Heartbeats.
        let out = control.out.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = out.send(cpb::ControlMessage {
                    kind: Some(cpb::control_message::Kind::Heartbeat(cpb::Heartbeat {
                        sent_unix_ms: 0,
                    })),
                });
            }
        });
        control
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let token = CancellationToken::new();
        *self.stop.lock().unwrap() = token.clone();
        let service = cpb::control_server::ControlServer::new(ControlService {
            control: self.clone(),
            token: token.clone(),
        });
        if let Some(config) = self.tls.clone() {
            let state = self.state.clone();
            let incoming = tls_incoming(listener, config, state);
            tokio::spawn(async move {
                let _ = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
                    .await;
            });
            return;
        }
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    token.cancelled_owned(),
                )
                .await;
        });
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The `authorization` metadata of every call so far.
    pub fn authorizations(&self) -> Vec<String> {
        self.state.authorizations.lock().unwrap().clone()
    }

    /// How many TLS handshakes failed so far.
    pub fn failed_handshakes(&self) -> usize {
        self.state
            .failed_handshakes
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops serving: streams end, new connections are refused.
    pub fn stop(&self) {
        self.state
            .refusing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop.lock().unwrap().cancel();
    }

    /// Serves again on the same port.
    pub async fn restart(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(listener) => {
                    self.state
                        .refusing
                        .store(false, std::sync::atomic::Ordering::SeqCst);
                    return self.serve(listener);
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("rebind {}: {e}", self.addr),
            }
        }
    }

    pub fn set_membership(&self, group_uid: &str, epoch: u64, stage: cpb::Stage, volumes: &[&str]) {
        self.set_membership_with(group_uid, epoch, stage, volumes, true);
    }

    /// A membership naming PVCs only (`pvc-<volume>`), for the sidecar to resolve itself.
    pub fn set_membership_by_pvc(
        &self,
        group_uid: &str,
        epoch: u64,
        stage: cpb::Stage,
        volumes: &[&str],
    ) {
        self.set_membership_with(group_uid, epoch, stage, volumes, false);
    }

    fn set_membership_with(
        &self,
        group_uid: &str,
        epoch: u64,
        stage: cpb::Stage,
        volumes: &[&str],
        with_handles: bool,
    ) {
        self.set_groups(&[(group_uid, epoch, stage, volumes)], with_handles);
    }

    /// The cluster's whole membership: several groups, each (uid, epoch, stage, volumes).
    pub fn set_memberships(&self, groups: &[(&str, u64, cpb::Stage, &[&str])]) {
        self.set_groups(groups, true);
    }

    fn set_groups(&self, groups: &[(&str, u64, cpb::Stage, &[&str])], with_handles: bool) {
        let mut memberships = Vec::new();
        for (group_uid, epoch, stage, volumes) in groups {
            let current = cpb::GroupEpoch {
                group_uid: (*group_uid).to_owned(),
                epoch: *epoch,
                stage: *stage as i32,
            };
            self.state
                .current
                .lock()
                .unwrap()
                .insert((*group_uid).to_owned(), current.clone());
            memberships.push(cpb::GroupMembership {
                group_name: GROUP.to_owned(),
                current: Some(current),
                hold_timeout_ms: 30_000,
                created_unix_ms: 0,
                in_sync_epoch: 0,
                volumes: volumes
                    .iter()
                    .map(|v| cpb::ResolvedVolume {
                        namespace: "shop".into(),
                        pvc: format!("pvc-{v}"),
                        persistent_volume: if with_handles {
                            format!("pv-{v}")
                        } else {
                            String::new()
                        },
                        volume_handle: if with_handles {
                            (*v).to_owned()
                        } else {
                            String::new()
                        },
                    })
                    .collect(),
            });
        }
        let membership = cpb::Membership {
            groups: memberships,
        };
        *self.state.membership.lock().unwrap() = Some(membership.clone());
        let _ = self.out.send(cpb::ControlMessage {
            kind: Some(cpb::control_message::Kind::Membership(membership)),
        });
    }

    /// Pushes a directive down every open stream.
    pub fn push(&self, group_uid: &str, epoch: u64, stage: cpb::Stage) {
        let target = cpb::GroupEpoch {
            group_uid: group_uid.to_owned(),
            epoch,
            stage: stage as i32,
        };
        self.state
            .current
            .lock()
            .unwrap()
            .insert(group_uid.to_owned(), target.clone());
        let _ = self.out.send(cpb::ControlMessage {
            kind: Some(cpb::control_message::Kind::Directive(cpb::Directive {
                target: Some(target),
                group_name: GROUP.to_owned(),
            })),
        });
    }

    pub fn subscribers(&self) -> usize {
        self.out.receiver_count()
    }

    pub fn acks(&self) -> Vec<cpb::AckRequest> {
        self.state.acks.lock().unwrap().clone()
    }

    pub fn reports(&self) -> Vec<cpb::ReportRequest> {
        self.state.reports.lock().unwrap().clone()
    }

    /// True when an Ack for (epoch, stage) listed exactly `volumes`.
    pub fn acked(&self, epoch: u64, stage: cpb::Stage, volumes: &[&str], fail_safe: bool) -> bool {
        self.acks().iter().any(|a| {
            a.enforced
                .as_ref()
                .is_some_and(|e| e.epoch == epoch && e.stage == stage as i32)
                && a.volume_handles == volumes
                && a.fail_safe == fail_safe
        })
    }
}

struct ControlService {
    control: FakeControl,
    token: CancellationToken,
}

/// A TLS connection to the test Control server (tonic wants its connections `Connected`).
pub struct TlsConnection(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = ();

    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for TlsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Accepts TLS connections, counting the handshakes that fail.
fn tls_incoming(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    state: Arc<ControlState>,
) -> impl Stream<Item = std::io::Result<TlsConnection>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, sender, state) = (acceptor.clone(), sender.clone(), state.clone());
            tokio::spawn(async move {
                match acceptor.accept(stream).await {
                    Ok(stream) => {
                        let _ = sender.send(Ok(TlsConnection(stream))).await;
                    }
                    Err(_) => {
                        state
                            .failed_handshakes
                            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

/// A test certificate authority.
pub struct TestCa {
    pub pem: String,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        Self {
            pem: issuer.pem(),
            issuer,
        }
    }

    /// A serving certificate for `names` (DNS names or IP addresses): (certificate PEM, key PEM).
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A rustls server configuration serving a certificate of this CA for 127.0.0.1 and localhost.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        use rustls_pki_types::pem::PemObject;
        let (cert, key) = self.issue(&["127.0.0.1", "localhost"]);
        let chain = rustls_pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }
}

fn authorization<T>(request: &Request<T>) -> String {
    request
        .metadata()
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

impl ControlService {
    fn record_authorization<T>(&self, request: &Request<T>) {
        self.control
            .state
            .authorizations
            .lock()
            .unwrap()
            .push(authorization(request));
    }

    fn refuse(&self) -> Result<(), Status> {
        if self.token.is_cancelled()
            || self
                .control
                .state
                .refusing
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            Err(Status::unavailable("refused"))
        } else {
            Ok(())
        }
    }
}

#[tonic::async_trait]
impl cpb::control_server::Control for ControlService {
    async fn report(
        &self,
        request: Request<cpb::ReportRequest>,
    ) -> Result<Response<cpb::ReportResponse>, Status> {
        self.refuse()?;
        self.record_authorization(&request);
        let r = request.into_inner();
        let current = self.control.state.current.lock().unwrap().clone();
        let groups = r
            .failures
            .iter()
            .filter_map(|f| current.get(&f.group_uid).cloned())
            .collect();
        self.control.state.reports.lock().unwrap().push(r);
        Ok(Response::new(cpb::ReportResponse {
            groups,
            applied: true,
            reason: String::new(),
        }))
    }

    type SubscribeStream =
        Pin<Box<dyn Stream<Item = Result<cpb::ControlMessage, Status>> + Send + 'static>>;

    async fn subscribe(
        &self,
        request: Request<cpb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.refuse()?;
        self.record_authorization(&request);
        self.control
            .state
            .subscribes
            .lock()
            .unwrap()
            .push(request.into_inner());
        let first: Vec<Result<cpb::ControlMessage, Status>> = self
            .control
            .state
            .membership
            .lock()
            .unwrap()
            .clone()
            .map(|m| {
                Ok(cpb::ControlMessage {
                    kind: Some(cpb::control_message::Kind::Membership(m)),
                })
            })
            .into_iter()
            .collect();
        let live = tokio_stream::wrappers::BroadcastStream::new(self.control.out.subscribe())
            .filter_map(|m| async move { m.ok().map(Ok) });
        let stream = futures::stream::iter(first)
            .chain(live)
            .take_until(self.token.clone().cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ack(
        &self,
        request: Request<cpb::AckRequest>,
    ) -> Result<Response<cpb::AckResponse>, Status> {
        self.refuse()?;
        self.record_authorization(&request);
        let r = request.into_inner();
        let current = r.enforced.as_ref().and_then(|e| {
            self.control
                .state
                .current
                .lock()
                .unwrap()
                .get(&e.group_uid)
                .cloned()
        });
        self.control.state.acks.lock().unwrap().push(r);
        let applied = !self
            .control
            .state
            .not_applying
            .load(std::sync::atomic::Ordering::SeqCst);
        Ok(Response::new(cpb::AckResponse {
            current,
            applied,
            reason: if applied {
                String::new()
            } else {
                "the volumes are not resolved members yet".into()
            },
        }))
    }
}

// ---- API server ----------------------------------------------------------------------------------

/// A test API server with Lockstep's CRDs and namespace.
pub async fn api_server() -> (TestApiServer, Client) {
    let server = TestApiServer::start(lockstep_testapi::Options::default())
        .await
        .unwrap();
    let client = server.client().await.unwrap();
    lockstep_kube::crds::install_crds(&client).await.unwrap();
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "lockstep"}})).unwrap(),
        )
        .await
        .unwrap();
    (server, client)
}

/// Stops the test API server and waits until it really answers no more. `TestApiServer::stop` aborts its
/// accept task and returns; the connection tasks are aborted only when that task is dropped on a worker
/// thread, so a request sent on an open keep-alive connection right after `stop()` can still be served
/// (measured: 2 of 40 requests sent at once after `stop()`, on an idle machine). A test that means "the
/// API path is down" must not let the sidecar deliver a report through such a connection.
pub async fn stop_api_server(server: &TestApiServer, client: &Client) {
    server.stop().await;
    let nodes: Api<ReplicationNode> = Api::all(client.clone());
    eventually_async("the stopped API server to answer no more", || {
        let nodes = nodes.clone();
        async move { nodes.list(&Default::default()).await.is_err() }
    })
    .await;
}

/// Creates the group (as the operator's mirror would look) with this node's volumes resolved, at
/// epoch 0 with no stage. Returns its UID.
pub async fn create_group(client: &Client, volumes: &[&str]) -> String {
    let groups: Api<ConsistencyGroup> = Api::all(client.clone());
    let group: ConsistencyGroup = serde_json::from_value(json!({
        "apiVersion": "lockstep.dev/v1alpha1",
        "kind": "ConsistencyGroup",
        "metadata": {"name": GROUP},
        "spec": {
            "holdTimeout": "30s",
            "members": [{"cluster": CLUSTER, "namespace": "shop", "pvcNames": volumes.iter().map(|v| format!("pvc-{v}")).collect::<Vec<_>>()}]
        }
    }))
    .unwrap();
    let created = groups.create(&PostParams::default(), &group).await.unwrap();
    let uid = created.metadata.uid.clone().unwrap();
    groups
        .patch_status(
            GROUP,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"epoch": 0}})),
        )
        .await
        .unwrap();
    // The members, in one ConsistencyGroupShard per node, as the operator writes them: this node's
    // volumes, and a volume on another node that this sidecar must not take for its own.
    let this_node: Vec<_> = volumes
        .iter()
        .map(|v| {
            json!({"cluster": CLUSTER, "namespace": "shop", "pvc": format!("pvc-{v}"),
                   "volumeHandle": v, "node": NODE})
        })
        .collect();
    let other_node = vec![json!({"cluster": CLUSTER, "namespace": "shop",
        "pvc": "pvc-elsewhere", "volumeHandle": "vol-elsewhere", "node": "node-2"})];
    let shards: Api<lockstep_api::v1alpha1::ConsistencyGroupShard> = Api::all(client.clone());
    for (node, members) in [(NODE, this_node), ("node-2", other_node)] {
        let key = lockstep_api::v1alpha1::ShardKey {
            cluster: CLUSTER.to_owned(),
            node: Some(node.to_owned()),
            part: 0,
        };
        let mut labels: std::collections::BTreeMap<String, String> = key
            .labels()
            .into_iter()
            .map(|(label, value)| (label.to_owned(), value))
            .collect();
        labels.insert(
            lockstep_api::v1alpha1::GROUP_UID_LABEL.to_owned(),
            uid.clone(),
        );
        let shard: lockstep_api::v1alpha1::ConsistencyGroupShard = serde_json::from_value(json!({
            "apiVersion": "lockstep.dev/v1alpha1",
            "kind": "ConsistencyGroupShard",
            "metadata": {"name": key.object_name(GROUP), "labels": labels},
            "spec": {"group": GROUP, "groupUid": uid, "cluster": CLUSTER, "node": node,
                     "volumes": members, "volumeCount": volumes.len()},
        }))
        .unwrap();
        shards.create(&PostParams::default(), &shard).await.unwrap();
    }
    uid
}

/// Sets the group's (epoch, stage) in its status, as the operator does on path 1.
pub async fn set_point(client: &Client, epoch: u64, stage: &str) {
    let groups: Api<ConsistencyGroup> = Api::all(client.clone());
    groups
        .patch_status(
            GROUP,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"epoch": epoch, "stage": stage}})),
        )
        .await
        .unwrap();
}

/// This node's ReplicationNode, if written.
pub async fn replication_node(client: &Client) -> Option<ReplicationNode> {
    let nodes: Api<ReplicationNode> = Api::all(client.clone());
    nodes.get_opt(NODE).await.ok().flatten()
}

// ---- Sidecar ---------------------------------------------------------------------------------------

pub fn options(replicator: &FakeReplicator) -> Options {
    let mut options = Options::new(NODE, CLUSTER);
    options.replicator_socket = replicator.socket.clone();
    options.listen = "127.0.0.1:0".parse().unwrap();
    options.rpc_timeout = Duration::from_secs(2);
    options.inventory_interval = Duration::from_millis(500);
    options.fail_safe_interval = Duration::from_secs(2);
    options.grpc_idle_timeout = Duration::from_secs(5);
    options.lease_duration = Duration::from_secs(3);
    options
}

pub async fn start(options: Options, client: Option<Client>) -> Sidecar {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    Sidecar::start(options, client).await.unwrap()
}

/// Creates namespace `shop` with a bound PVC `pvc-<v>` and a CSI PV `pv-<v>` (handle `v`) per volume.
pub async fn create_claims(client: &Client, volumes: &[&str]) {
    use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim};
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "shop"}})).unwrap(),
        )
        .await
        .unwrap();
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "shop");
    for v in volumes {
        pvs.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": format!("pv-{v}")},
                "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                         "csi": {"driver": "lockstep.dev", "volumeHandle": v}}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
        pvcs.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": format!("pvc-{v}"), "namespace": "shop"},
                "spec": {"accessModes": ["ReadWriteOnce"], "volumeName": format!("pv-{v}"),
                         "resources": {"requests": {"storage": "1Gi"}}}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    }
}
