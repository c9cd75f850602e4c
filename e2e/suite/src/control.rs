//! The control system seam: who freezes the group when a copy fails.
//!
//! A scenario runs against any [`ControlSystem`]: the operator and the sidecars
//! ([`crate::operated::OperatorControl`], the demo's default), or the demo itself ([`ManualFreeze`]):
//! on a failed copy it raises the group's epoch, suspends every member volume at that epoch, records the
//! freeze in the group's status, and (FreezeAndGo) releases the held writes — what the operator does,
//! minus the two paths. Choosing one is one line of the caller.
//!
//! [`NodeControl`] is how the demo drives one node's replicator: through the replicator's `Replicator`
//! gRPC service on its unix socket ([`NodeControl::Grpc`], as a sidecar does), or — while the primary
//! serves no control socket — through the same directives called in-process on its volumes
//! ([`NodeControl::InProcess`]).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use lockstep_api::domain::{Phase, Policy, Stage, condition};
use lockstep_api::proto::replicator::v1 as pb;
use lockstep_replicator::{ReplMode, VolumeStatus};
use pb::replicator_client::ReplicatorClient;
use serde_json::json;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::cluster::{ClusterError, SimCluster};
use crate::kubectl;
use crate::timeline::{Milestone, Timeline};
use crate::world::World;

/// How long the members may take to resynchronise.
const RESYNC_DEADLINE: Duration = Duration::from_secs(60);
/// How long a replicator may take to confirm a directive.
const DIRECTIVE_DEADLINE: Duration = Duration::from_secs(10);

/// Why the control system could not act.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A cluster or its API server failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The replicator cannot do this (yet).
    #[error("{0}")]
    Unsupported(String),
    /// The gRPC endpoint could not be built.
    #[error("replicator endpoint: {0}")]
    Endpoint(#[from] tonic::transport::Error),
    /// A replicator call failed.
    #[error("{node}: replicator {call} failed: {status}")]
    Call {
        /// The node.
        node: String,
        /// The RPC.
        call: &'static str,
        /// Its status.
        status: Box<tonic::Status>,
    },
    /// A replicator refused or failed a directive.
    #[error("{node}: {call}: {source}")]
    Directive {
        /// The node.
        node: String,
        /// The directive.
        call: &'static str,
        /// Why.
        source: lockstep_replicator::DirectiveError,
    },
    /// A volume did not reach the state asked for in time.
    #[error("{node}: volume {volume} did not become {wanted} within {within:?}")]
    Timeout {
        /// The node.
        node: String,
        /// The volume.
        volume: String,
        /// The state waited for.
        wanted: &'static str,
        /// How long.
        within: Duration,
    },
}

/// A failed copy, as the control system hears of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyFailure {
    /// The member cluster.
    pub cluster: String,
    /// The node.
    pub node: String,
    /// The volume handle.
    pub volume: String,
    /// The first write sequence on the volume that was not copied.
    pub sequence: u64,
    /// What failed.
    pub error: String,
}

/// What a freeze achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreezeOutcome {
    /// The epoch of the freeze.
    pub epoch: u64,
    /// The volumes that acknowledged it: the consistent image.
    pub frozen: Vec<String>,
    /// Whether the held writes were released (FreezeAndGo, when the replicators can release).
    pub released: bool,
}

/// What a thaw achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThawOutcome {
    /// Every member resynchronised and copies synchronously again.
    Resumed,
    /// The replicators cannot resume; why.
    Unsupported(String),
}

/// Whoever freezes the group: the demo itself today, the operator and sidecars tomorrow.
pub trait ControlSystem {
    /// One line saying who the control system is.
    fn describe(&self) -> String;

    /// The group was applied: resolve its members and confirm each volume's group, epoch and hold timeout
    /// to its replicator (the sidecars' job). Returns the volumes enrolled.
    fn enroll(
        &mut self,
        world: &World,
        timeline: &Timeline,
    ) -> impl Future<Output = Result<Vec<String>, ControlError>>;

    /// A copy failed in a member: freeze every member volume of the group and, under FreezeAndGo,
    /// release the held writes. Returns once the freeze is complete.
    fn freeze(
        &mut self,
        world: &World,
        failure: &CopyFailure,
        timeline: &Timeline,
    ) -> impl Future<Output = Result<FreezeOutcome, ControlError>>;

    /// The failed link is back: resynchronise every member and return the group to Replicating. Returns
    /// once every member is in sync.
    fn thaw(
        &mut self,
        world: &World,
        timeline: &Timeline,
    ) -> impl Future<Output = Result<ThawOutcome, ControlError>>;

    /// Takes the gRPC path between the sidecars and the control system down (`down`) or back up. A
    /// control system without that path says so.
    fn set_grpc_path(&mut self, down: bool) -> Result<(), ControlError> {
        let _ = down;
        Err(ControlError::Unsupported(format!(
            "{} has no gRPC path to take down",
            self.describe()
        )))
    }

    /// What the control system saw so far (reports and acknowledgements received, directives sent),
    /// each stamped when seen; none by default.
    fn milestones(&self) -> Vec<Milestone> {
        Vec::new()
    }
}

/// A volume's state after a directive, for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeReport {
    /// The volume.
    pub handle: String,
    /// Its replication state, in words.
    pub state: String,
    /// Writes held now, when the replicator says.
    pub held_writes: Option<u64>,
    /// Bytes its secondary lacks.
    pub dirty_bytes: u64,
}

impl std::fmt::Display for VolumeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.handle, self.state)?;
        if let Some(held) = self.held_writes {
            write!(f, ", {held} writes held")?;
        }
        write!(f, ", {} KiB dirty", self.dirty_bytes.div_ceil(1024))
    }
}

/// How the demo reaches the replicators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicatorApi {
    /// The `Replicator` gRPC service on each node's unix socket.
    Grpc,
    /// The same directives, called on the primary's volumes in this process.
    InProcess,
}

/// One node's replicator, as the demo drives it.
#[derive(Debug)]
pub enum NodeControl<'a> {
    /// Through the replicator's gRPC service.
    Grpc {
        /// The node.
        node: String,
        /// The client.
        client: ReplicatorClient<Channel>,
    },
    /// In-process, on the primary's volumes.
    InProcess(&'a SimCluster),
}

/// Connects to a unix socket for tonic.
#[derive(Debug, Clone)]
struct UnixConnector(PathBuf);

impl tonic::codegen::Service<Uri> for UnixConnector {
    type Response = TokioIo<UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(UnixStream::connect(path).await?)) })
    }
}

/// A client of the `Replicator` service on `socket` (connects lazily).
pub fn replicator_client(socket: &Path) -> Result<ReplicatorClient<Channel>, ControlError> {
    let endpoint = Endpoint::try_from("http://replicator.invalid")?
        .timeout(DIRECTIVE_DEADLINE)
        .connect_timeout(DIRECTIVE_DEADLINE);
    Ok(ReplicatorClient::new(endpoint.connect_with_connector_lazy(
        UnixConnector(socket.to_path_buf()),
    )))
}

fn mode_words(mode: i32) -> String {
    match pb::Mode::try_from(mode) {
        Ok(pb::Mode::Replicating) => "replicating".into(),
        Ok(pb::Mode::Held) => "holding (copy failed)".into(),
        Ok(pb::Mode::Suspended) => "suspended".into(),
        Ok(pb::Mode::Running) => "running unreplicated".into(),
        Ok(pb::Mode::Resyncing) => "resyncing".into(),
        Ok(pb::Mode::Unconfirmed) => "unconfirmed".into(),
        Ok(pb::Mode::Standalone) => "standalone".into(),
        Ok(pb::Mode::Unspecified) | Err(_) => format!("mode {mode}"),
    }
}

fn report_of(state: &pb::VolumeState) -> VolumeReport {
    let mut words = mode_words(state.mode);
    if state.epoch > 0 {
        words.push_str(&format!(" at epoch {}", state.epoch));
    }
    VolumeReport {
        handle: state.volume_handle.clone(),
        state: words,
        held_writes: Some(state.held_writes),
        dirty_bytes: state.dirty_bytes,
    }
}

/// A volume's replication mode, in words.
pub fn mode_words_of(mode: &ReplMode) -> String {
    match mode {
        ReplMode::Unconfirmed => "unconfirmed (I/O waits)".into(),
        ReplMode::Standalone => "standalone".into(),
        ReplMode::Replicating => "replicating".into(),
        ReplMode::Held { first_seq, .. } => {
            format!("holding writes (copy failed at write #{first_seq})")
        }
        ReplMode::Suspended { epoch, .. } => format!("suspended at epoch {epoch}"),
        ReplMode::Running { epoch } => format!("running unreplicated (released at epoch {epoch})"),
        ReplMode::Resyncing { epoch } => format!("resyncing (epoch {epoch})"),
    }
}

fn report_of_status(s: &VolumeStatus) -> VolumeReport {
    VolumeReport {
        handle: s.name.clone(),
        state: mode_words_of(&s.replication.mode),
        held_writes: Some(s.replication.held as u64),
        dirty_bytes: s.replication.dirty_bytes,
    }
}

/// A directive, for in-process volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Directive {
    Suspend,
    Release,
    Resume,
}

impl Directive {
    fn call(self) -> &'static str {
        match self {
            Directive::Suspend => "Suspend",
            Directive::Release => "Release",
            Directive::Resume => "Resume",
        }
    }
}

impl<'a> NodeControl<'a> {
    /// The control of `cluster`'s node through `api`.
    pub fn new(cluster: &'a SimCluster, api: ReplicatorApi) -> Result<Self, ControlError> {
        match api {
            ReplicatorApi::InProcess => Ok(NodeControl::InProcess(cluster)),
            ReplicatorApi::Grpc => match &cluster.control_socket {
                Some(socket) => Ok(NodeControl::Grpc {
                    node: cluster.spec.node.clone(),
                    client: replicator_client(socket)?,
                }),
                None => Err(ControlError::Unsupported(format!(
                    "{}: the replicator serves no control socket",
                    cluster.spec.node
                ))),
            },
        }
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        match self {
            NodeControl::Grpc { node, .. } => node,
            NodeControl::InProcess(cluster) => &cluster.spec.node,
        }
    }

    fn call_err(node: &str, call: &'static str) -> impl FnOnce(tonic::Status) -> ControlError {
        let node = node.to_owned();
        move |status| ControlError::Call {
            node,
            call,
            status: Box::new(status),
        }
    }

    /// Confirms the volumes' group, epoch and hold timeout (what a sidecar does when a volume joins).
    pub async fn configure(
        &self,
        handles: &[String],
        group_uid: &str,
        epoch: u64,
        hold_timeout: Duration,
    ) -> Result<Vec<VolumeReport>, ControlError> {
        let mut out = Vec::new();
        for handle in handles {
            match self {
                NodeControl::Grpc { node, client } => {
                    let state = client
                        .clone()
                        .configure(pb::ConfigureRequest {
                            volume_handle: handle.clone(),
                            group_uid: group_uid.to_owned(),
                            epoch,
                            stage: if epoch == 0 {
                                pb::Stage::Unspecified
                            } else {
                                pb::Stage::Resume
                            }
                            .into(),
                            hold_timeout_ms: hold_timeout.as_millis() as u64,
                        })
                        .await
                        .map_err(Self::call_err(node, "Configure"))?;
                    out.push(report_of(&state.into_inner()));
                }
                NodeControl::InProcess(cluster) => {
                    let volume = cluster.replicated_volume(handle)?;
                    let status = volume
                        .configure(
                            group_uid,
                            epoch,
                            (epoch > 0).then_some(lockstep_replicator::Stage::Resume),
                            Some(hold_timeout),
                        )
                        .await
                        .map_err(|source| ControlError::Directive {
                            node: cluster.spec.node.clone(),
                            call: "Configure",
                            source,
                        })?;
                    out.push(report_of_status(&status));
                }
            }
        }
        Ok(out)
    }

    async fn direct(
        &self,
        directive: Directive,
        handles: &[String],
        group_uid: &str,
        epoch: u64,
    ) -> Result<Vec<VolumeReport>, ControlError> {
        match self {
            NodeControl::Grpc { node, client } => {
                let request = pb::DirectiveRequest {
                    volume_handles: handles.to_vec(),
                    group_uid: group_uid.to_owned(),
                    epoch,
                    fail_safe: false,
                };
                let mut client = client.clone();
                let response = match directive {
                    Directive::Suspend => client.suspend(request).await,
                    Directive::Release => client.release(request).await,
                    Directive::Resume => client.resume(request).await,
                }
                .map_err(Self::call_err(node, directive.call()))?;
                Ok(response
                    .into_inner()
                    .volumes
                    .iter()
                    .map(report_of)
                    .collect())
            }
            NodeControl::InProcess(cluster) => {
                let mut out = Vec::new();
                for handle in handles {
                    let volume = cluster.replicated_volume(handle)?;
                    let status = match directive {
                        Directive::Suspend => volume.suspend(group_uid, epoch, false).await,
                        Directive::Release => volume.release(group_uid, epoch).await,
                        Directive::Resume => volume.resume(group_uid, epoch).await,
                    }
                    .map_err(|source| ControlError::Directive {
                        node: cluster.spec.node.clone(),
                        call: directive.call(),
                        source,
                    })?;
                    out.push(report_of_status(&status));
                }
                Ok(out)
            }
        }
    }

    /// Whether every volume of `handles` copies synchronously with nothing dirty and nothing held.
    pub async fn in_sync(&self, handles: &[String]) -> Result<bool, ControlError> {
        for handle in handles {
            let synced = match self {
                NodeControl::Grpc { node, client } => {
                    let s = client
                        .clone()
                        .state(pb::StateRequest {
                            volume_handle: handle.clone(),
                        })
                        .await
                        .map_err(Self::call_err(node, "State"))?
                        .into_inner();
                    s.mode == i32::from(pb::Mode::Replicating)
                        && s.dirty_bytes == 0
                        && s.held_writes == 0
                }
                NodeControl::InProcess(cluster) => {
                    let s = cluster.volume_status(handle)?;
                    s.replication.mode == ReplMode::Replicating
                        && s.replication.dirty_bytes == 0
                        && s.replication.held == 0
                }
            };
            if !synced {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Stops copying and holds every write of `handles` at `epoch`; returns once they are suspended.
    pub async fn suspend(
        &self,
        handles: &[String],
        group_uid: &str,
        epoch: u64,
    ) -> Result<Vec<VolumeReport>, ControlError> {
        self.direct(Directive::Suspend, handles, group_uid, epoch)
            .await
    }

    /// Acknowledges the held writes of `handles` (primary-only) at exactly `epoch`.
    pub async fn release(
        &self,
        handles: &[String],
        group_uid: &str,
        epoch: u64,
    ) -> Result<Vec<VolumeReport>, ControlError> {
        self.direct(Directive::Release, handles, group_uid, epoch)
            .await
    }

    /// Resynchronises `handles` and copies synchronously again.
    pub async fn resume(
        &self,
        handles: &[String],
        group_uid: &str,
        epoch: u64,
    ) -> Result<Vec<VolumeReport>, ControlError> {
        self.direct(Directive::Resume, handles, group_uid, epoch)
            .await
    }
}

/// The demo as the control system: it freezes the replicators itself, in the operator's order.
#[derive(Debug)]
pub struct ManualFreeze {
    api: ReplicatorApi,
    epoch: u64,
}

impl ManualFreeze {
    /// Drives the replicators through `api`.
    pub fn new(api: ReplicatorApi) -> Self {
        Self { api, epoch: 0 }
    }

    fn nodes<'w>(
        &self,
        world: &'w World,
    ) -> Result<Vec<(NodeControl<'w>, Vec<String>)>, ControlError> {
        world
            .clusters
            .iter()
            .map(|c| {
                let handles = c.volumes.iter().map(|v| v.spec.handle.clone()).collect();
                Ok((NodeControl::new(c, self.api)?, handles))
            })
            .collect()
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn members_status(world: &World) -> serde_json::Value {
    json!(
        world
            .volumes()
            .map(|(c, v)| json!({
                "cluster": c.name(),
                "namespace": c.spec.namespace,
                "pvc": v.spec.pvc,
                "persistentVolume": format!("pv-{}", v.spec.handle),
                "volumeHandle": v.spec.handle,
                "node": c.spec.node,
            }))
            .collect::<Vec<_>>()
    )
}

/// The image's volumes, as the status lists them: each handle with its cluster.
fn image_volumes(world: &World, handles: &[String]) -> serde_json::Value {
    json!(
        world
            .volumes()
            .filter(|(_, v)| handles.contains(&v.spec.handle))
            .map(|(c, v)| json!({"cluster": c.name(), "volumeHandle": v.spec.handle}))
            .collect::<Vec<_>>()
    )
}

impl ControlSystem for ManualFreeze {
    fn describe(&self) -> String {
        match self.api {
            ReplicatorApi::Grpc => {
                "the demo itself freezes the replicators, through their Replicator \
                                    gRPC service (each node's unix socket), in the operator's order"
                    .into()
            }
            ReplicatorApi::InProcess => {
                "the demo itself freezes the replicators, with directives called \
                                         in-process, in the operator's order"
                    .into()
            }
        }
    }

    async fn enroll(
        &mut self,
        world: &World,
        timeline: &Timeline,
    ) -> Result<Vec<String>, ControlError> {
        let hold_timeout = lockstep_api::domain::parse_duration(&world.group.spec.hold_timeout)
            .unwrap_or(lockstep_replicator::DEFAULT_HOLD_TIMEOUT);
        let (epoch, _) = world.group_now().await?.position();
        let mut enrolled = Vec::new();
        for (node, handles) in &self.nodes(world)? {
            let reports = node
                .configure(handles, &world.group_uid, epoch, hold_timeout)
                .await?;
            timeline.say(format!(
                "control: {} confirmed in group {} (hold timeout {:?}): {}",
                node.node(),
                world.group_name,
                hold_timeout,
                reports
                    .iter()
                    .map(|r| format!("{} {}", r.handle, r.state))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
            enrolled.extend(handles.iter().cloned());
        }
        let group = world
            .patch_group_status(json!({
                "phase": Phase::Replicating,
                "epoch": epoch,
                "memberCount": enrolled.len(),
                "members": members_status(world),
                "conditions": world.conditions_with(&[
                    (condition::MEMBERS_RESOLVED, true, "AllMembersResolved",
                     format!("{} member volumes resolved and confirmed", enrolled.len())),
                    (condition::FROZEN, false, "Replicating", "no freeze in progress".into()),
                    (condition::CONSISTENT_IMAGE, true, "InSync",
                     "every member copies synchronously".into()),
                ]).await?,
            }))
            .await?;
        timeline.say(format!(
            "control: members resolved | {}",
            kubectl::cg_line(&group)
        ));
        Ok(enrolled)
    }

    async fn freeze(
        &mut self,
        world: &World,
        failure: &CopyFailure,
        timeline: &Timeline,
    ) -> Result<FreezeOutcome, ControlError> {
        let epoch = world.group_now().await?.position().0.max(self.epoch) + 1;
        self.epoch = epoch;
        let total = world.volumes().count();
        let group = world
            .patch_group_status(json!({
                "phase": Phase::Freezing,
                "epoch": epoch,
                "stage": Stage::Freeze,
                "memberCount": total,
                "members": members_status(world),
                "trigger": {
                    "reason": "CopyFailed",
                    "cluster": failure.cluster,
                    "node": failure.node,
                    "volumeHandle": failure.volume,
                    "message": failure.error,
                    "at": now(),
                },
            }))
            .await?;
        timeline.say(format!(
            "control: epoch {epoch} issued: freeze every member of {} | {}",
            world.group_name,
            kubectl::cg_line(&group)
        ));
        let nodes = self.nodes(world)?;
        let mut frozen = Vec::new();
        for (node, handles) in &nodes {
            let reports = node.suspend(handles, &world.group_uid, epoch).await?;
            timeline.say(format!(
                "control: {} suspended at epoch {epoch}: {}",
                node_name(node),
                reports
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
            frozen.extend(reports.into_iter().map(|r| r.handle));
        }
        let group = world
            .patch_group_status(json!({
                "phase": Phase::Frozen,
                "consistentImage": {"epoch": epoch, "volumes": image_volumes(world, &frozen)},
                "conditions": world.conditions_with(&[
                    (condition::FROZEN, true, "AllMembersAcknowledged",
                     format!("all {total} member volumes acknowledged epoch {epoch}")),
                    (condition::CONSISTENT_IMAGE, true, "Frozen",
                     format!("the secondaries hold the image of epoch {epoch}")),
                ]).await?,
            }))
            .await?;
        timeline.say(format!(
            "control: freeze complete: all {} member volumes suspended at epoch {epoch}; the secondaries hold the consistent image | {}",
            frozen.len(),
            kubectl::cg_line(&group)
        ));
        let mut released = false;
        if world.group.spec.policy == Policy::FreezeAndStop {
            timeline.say(
                "control: FreezeAndStop: the held writes stay held (not acknowledged) until a person \
                 sets spec.release.epoch or spec.resync.epoch, or the hold timeout fails them",
            );
        }
        if world.group.spec.policy == Policy::FreezeAndGo {
            let mut refused = None;
            for (node, handles) in &nodes {
                match node.release(handles, &world.group_uid, epoch).await {
                    Ok(reports) => timeline.say(format!(
                        "control: {} released at epoch {epoch}: {}",
                        node_name(node),
                        reports
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("; ")
                    )),
                    Err(ControlError::Unsupported(why)) => {
                        refused = Some(why);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            match refused {
                None => {
                    released = true;
                    let group = world
                        .patch_group_status(
                            json!({"phase": Phase::Running, "stage": Stage::Release}),
                        )
                        .await?;
                    timeline.say(format!(
                        "control: FreezeAndGo: held writes released; primaries run on unreplicated | {}",
                        kubectl::cg_line(&group)
                    ));
                }
                Some(why) => timeline.say(format!("control: FreezeAndGo release skipped: {why}")),
            }
        }
        Ok(FreezeOutcome {
            epoch,
            frozen,
            released,
        })
    }

    async fn thaw(
        &mut self,
        world: &World,
        timeline: &Timeline,
    ) -> Result<ThawOutcome, ControlError> {
        let epoch = self.epoch;
        let nodes = self.nodes(world)?;
        for (node, handles) in &nodes {
            match node.resume(handles, &world.group_uid, epoch).await {
                Ok(reports) => timeline.say(format!(
                    "control: {} resuming at epoch {epoch}: {}",
                    node_name(node),
                    reports
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                )),
                Err(ControlError::Unsupported(why)) => {
                    timeline.say(format!("control: resume skipped: {why}"));
                    return Ok(ThawOutcome::Unsupported(why));
                }
                Err(e) => return Err(e),
            }
        }
        let group = world
            .patch_group_status(json!({
                "phase": Phase::Resyncing,
                "stage": Stage::Resume,
                "conditions": world.conditions_with(&[
                    (condition::FROZEN, false, "Resumed", format!("resumed at epoch {epoch}")),
                    (condition::CONSISTENT_IMAGE, false, "Resyncing",
                     "the secondaries are inconsistent until every member is in sync".into()),
                ]).await?,
            }))
            .await?;
        timeline.say(format!(
            "control: resync started | {}",
            kubectl::cg_line(&group)
        ));
        let deadline = tokio::time::Instant::now() + RESYNC_DEADLINE;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for (node, handles) in &nodes {
            loop {
                tick.tick().await;
                if node.in_sync(handles).await? {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(ControlError::Timeout {
                        node: node.node().to_owned(),
                        volume: handles.join(", "),
                        wanted: "in sync",
                        within: RESYNC_DEADLINE,
                    });
                }
            }
        }
        let group = world
            .patch_group_status(json!({
                "phase": Phase::Replicating,
                "conditions": world.conditions_with(&[(
                    condition::CONSISTENT_IMAGE,
                    true,
                    "InSync",
                    "every member copies synchronously".into(),
                )]).await?,
            }))
            .await?;
        timeline.say(format!(
            "control: every member in sync again | {}",
            kubectl::cg_line(&group)
        ));
        Ok(ThawOutcome::Resumed)
    }
}

fn node_name(node: &NodeControl<'_>) -> String {
    node.node().to_owned()
}
