//! Path 2: the operator's gRPC `Control` service.
//!
//! Three loops share one lazy channel: [`subscribe`] keeps the long-lived `Subscribe` stream open
//! (reconnecting with backoff; directives and memberships go to the core; every subscription carries the
//! PVCs this node resolved and the points it has seen), [`acknowledge`] sends each new acknowledgement with
//! `Ack`, and [`report`] sends outstanding failures with `Report`, each retried with backoff until the
//! operator answers it applied. Every new stream makes the other two send their state again: the operator
//! at its other end may have restarted, or be a new leader, and heard none of it. Answers that name a
//! group's current point are fed to the core too: they were read from this path.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lockstep_api::domain::{ClaimOrder, GroupEpoch, Path};
use lockstep_api::proto::control::v1 as pb;
use pb::control_client::ControlClient;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::agent::{Context, Snapshot};
use crate::enforce::{HoldTimeout, Input};
use crate::metrics::Metrics;
use crate::report::Backoff;
use crate::tls::{Credentials, TlsConnector};

/// A Control client whose calls carry this node's credentials.
type Client = ControlClient<InterceptedService<Channel, Credentials>>;

/// Errors setting up the gRPC path.
#[derive(Debug, thiserror::Error)]
pub enum GrpcPathError {
    /// The endpoint's scheme does not match the security asked for.
    #[error(
        "operator endpoint {endpoint:?}: expected an {wanted} endpoint (https:// with --operator-ca-file; http:// only with --insecure-plaintext-control)"
    )]
    Scheme {
        /// The endpoint.
        endpoint: String,
        /// The scheme expected.
        wanted: &'static str,
    },
    /// The endpoint is not a valid URI.
    #[error("operator endpoint {endpoint:?}: {source}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// gRPC path settings.
#[derive(Debug, Clone)]
pub struct GrpcConfig {
    /// The operator's Control endpoint, e.g. `http://lockstep-operator.lockstep:9443`.
    pub endpoint: String,
    /// TLS and credentials, or plaintext.
    pub security: ClientSecurity,
    /// Per-call timeout for Report and Ack; connect timeout.
    pub timeout: Duration,
    /// Reconnect when the stream is silent this long (the operator sends heartbeats).
    pub idle_timeout: Duration,
}

/// How the sidecar dials the operator.
#[derive(Debug, Clone)]
pub enum ClientSecurity {
    /// TLS, verifying the operator's certificate; every call carries the node's ServiceAccount token.
    Tls {
        /// The CA bundle the operator's certificate must chain to (read on every connection).
        ca_file: std::path::PathBuf,
        /// The name the certificate must carry; the endpoint's host when absent.
        server_name: Option<String>,
        /// The projected ServiceAccount token (read on every call).
        token_file: std::path::PathBuf,
    },
    /// INSECURE: plaintext, no credentials, nothing verified (tests, migration).
    Plaintext,
}

/// Channels to the operator: one for the stream (no per-call deadline), one for unary calls.
#[derive(Clone)]
pub struct GrpcPath {
    stream: Client,
    unary: Client,
    config: GrpcConfig,
    /// A client of this cluster's own API server, to resolve named PVCs (gRPC-only clusters).
    resolver: Option<kube::Client>,
    /// PVCs resolved to volumes this node serves, reported to the operator.
    resolved: Arc<std::sync::Mutex<BTreeMap<(String, String), pb::ResolvedVolume>>>,
    /// Whether reports carry the node's volume states (a gRPC-only node: no ReplicationNode says them).
    report_states: bool,
    /// How many Subscribe streams opened so far: each new one may reach an operator that heard nothing of
    /// this node (restarted, or a new leader), so the other loops send their state again.
    streams: Arc<watch::Sender<u64>>,
}

impl std::fmt::Debug for GrpcPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcPath")
            .field("config", &self.config)
            .field("resolver", &self.resolver.is_some())
            .finish_non_exhaustive()
    }
}

impl GrpcPath {
    /// Builds lazy channels to the endpoint.
    pub fn new(config: GrpcConfig) -> Result<Self, GrpcPathError> {
        // tonic dials the endpoint's host and port; TLS (an https:// endpoint) is this crate's connector.
        let dialed = match &config.security {
            ClientSecurity::Tls { .. } => config
                .endpoint
                .strip_prefix("https://")
                .map(|rest| format!("http://{rest}"))
                .ok_or_else(|| GrpcPathError::Scheme {
                    endpoint: config.endpoint.clone(),
                    wanted: "https://",
                })?,
            ClientSecurity::Plaintext => {
                if !config.endpoint.starts_with("http://") {
                    return Err(GrpcPathError::Scheme {
                        endpoint: config.endpoint.clone(),
                        wanted: "http://",
                    });
                }
                config.endpoint.clone()
            }
        };
        let endpoint = |with_timeout: bool| {
            let e = Endpoint::from_shared(dialed.clone())
                .map_err(|source| GrpcPathError::Endpoint {
                    endpoint: config.endpoint.clone(),
                    source,
                })?
                .connect_timeout(config.timeout)
                .tcp_nodelay(true);
            Ok::<_, GrpcPathError>(if with_timeout {
                e.timeout(config.timeout)
            } else {
                e
            })
        };
        let (credentials, channel): (Credentials, &dyn Fn(Endpoint) -> Channel) = match &config
            .security
        {
            ClientSecurity::Tls {
                ca_file,
                server_name,
                token_file,
            } => {
                let connector = TlsConnector::new(ca_file, server_name.clone());
                (
                    Credentials::token_file(token_file),
                    &move |endpoint: Endpoint| {
                        endpoint.connect_with_connector_lazy(connector.clone())
                    },
                )
            }
            ClientSecurity::Plaintext => {
                tracing::warn!(endpoint = %config.endpoint, "INSECURE: the gRPC path to the operator is plaintext (--insecure-plaintext-control): the operator is not verified and an impostor could send directives");
                (Credentials::none(), &|endpoint: Endpoint| {
                    endpoint.connect_lazy()
                })
            }
        };
        Ok(Self {
            stream: ControlClient::with_interceptor(channel(endpoint(false)?), credentials.clone()),
            unary: ControlClient::with_interceptor(channel(endpoint(true)?), credentials),
            config,
            resolver: None,
            resolved: Arc::default(),
            streams: Arc::new(watch::channel(0).0),
            report_states: false,
        })
    }

    /// Resolves PVCs named without a volume handle through this cluster's API server.
    pub fn with_resolver(mut self, client: kube::Client) -> Self {
        self.resolver = Some(client);
        self
    }

    /// Reports carry the node's volume states: the operator hears them from nothing else (no API path).
    pub fn with_volume_states(mut self) -> Self {
        self.report_states = true;
        self
    }

    /// The PVCs resolved to volumes this node serves.
    pub fn resolved_volumes(&self) -> Vec<pb::ResolvedVolume> {
        match self.resolved.lock() {
            Ok(map) => map.values().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().values().cloned().collect(),
        }
    }

    fn remember(&self, volumes: BTreeMap<(String, String), pb::ResolvedVolume>) -> bool {
        let mut map = match self.resolved.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        if *map == volumes {
            false
        } else {
            *map = volumes;
            true
        }
    }

    /// Starts the three loops.
    pub fn spawn(self, context: Arc<Context>) -> Vec<tokio::task::JoinHandle<()>> {
        vec![
            tokio::spawn(subscribe(self.clone(), context.clone())),
            tokio::spawn(acknowledge(self.clone(), context.clone())),
            tokio::spawn(report(self, context)),
        ]
    }
}

fn identity(context: &Context) -> pb::NodeIdentity {
    pb::NodeIdentity {
        cluster: context.cluster.clone(),
        node: context.node.clone(),
    }
}

/// Feeds a point read from this path to the core; malformed ones are refused and logged.
fn feed_point(context: &Context, message: Option<&pb::GroupEpoch>, why: &str) {
    let Some(message) = message else {
        tracing::warn!(why, "gRPC message without a group point refused");
        return;
    };
    match GroupEpoch::try_from(message) {
        Ok(target) => context.send(Input::Directive {
            path: Path::Grpc,
            target,
        }),
        Err(error) => {
            tracing::warn!(%error, why, "malformed gRPC group point refused");
            Metrics::count(&context.metrics.reports, "grpc", "malformed");
        }
    }
}

/// Keeps the Subscribe stream open.
pub async fn subscribe(path: GrpcPath, context: Arc<Context>) {
    let mut backoff = Backoff::default();
    // Groups the last membership listed, to notice groups that left and to skip those unchanged.
    let mut listed = Listed::default();
    loop {
        if context.stop.is_cancelled() {
            return;
        }
        // Name what the volumes carry (rule 8): wait a little for the replicator's inventory first.
        let mut snapshots = context.snapshot.clone();
        let _ = tokio::time::timeout(
            path.config.timeout,
            snapshots.wait_for(|s| s.inventory_known),
        )
        .await;
        let request = pb::SubscribeRequest {
            node: Some(identity(&context)),
            volumes: path.resolved_volumes(),
            seen: context
                .snapshot
                .borrow()
                .seen
                .iter()
                .map(pb::GroupEpoch::from)
                .collect(),
        };
        let mut client = path.stream.clone();
        let opened = tokio::select! {
            _ = context.stop.cancelled() => return,
            opened = tokio::time::timeout(path.config.timeout, client.subscribe(request)) => opened,
        };
        let mut stream = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                tracing::warn!(%status, "gRPC Subscribe refused");
                down(&context, &mut backoff).await;
                continue;
            }
            Err(_) => {
                tracing::warn!("gRPC Subscribe timed out");
                down(&context, &mut backoff).await;
                continue;
            }
        };
        tracing::info!(endpoint = %path.config.endpoint, "gRPC Subscribe stream open");
        context.metrics.set_path_up("grpc", true);
        path.streams.send_modify(|opened| *opened += 1);
        loop {
            let next = tokio::select! {
                _ = context.stop.cancelled() => return,
                next = tokio::time::timeout(path.config.idle_timeout, stream.next()) => next,
            };
            let message = match next {
                Err(_) => {
                    tracing::warn!("gRPC stream silent past the idle timeout; reconnecting");
                    break;
                }
                Ok(None) => {
                    tracing::warn!("gRPC stream closed by the operator");
                    break;
                }
                Ok(Some(Err(status))) => {
                    tracing::warn!(%status, "gRPC stream failed");
                    break;
                }
                Ok(Some(Ok(message))) => message,
            };
            backoff.reset();
            match message.kind {
                Some(pb::control_message::Kind::Directive(directive)) => {
                    feed_point(&context, directive.target.as_ref(), "directive");
                }
                Some(pb::control_message::Kind::Membership(membership)) => {
                    membership_update(&path, &context, membership, &mut listed).await;
                }
                Some(pb::control_message::Kind::Heartbeat(_)) => {}
                None => tracing::warn!("empty gRPC control message refused"),
            }
        }
        down(&context, &mut backoff).await;
    }
}

async fn down(context: &Context, backoff: &mut Backoff) {
    context.metrics.set_path_up("grpc", false);
    let _ = context.sleep(backoff.next_delay()).await;
}

/// Resolves a PVC to its PersistentVolume and CSI volume handle through this cluster's API server.
async fn resolve(client: &kube::Client, namespace: &str, pvc: &str) -> Option<(String, String)> {
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
    let claims: kube::Api<PersistentVolumeClaim> = kube::Api::namespaced(client.clone(), namespace);
    let claim = claims.get_opt(pvc).await.ok().flatten()?;
    let pv = claim.spec?.volume_name.filter(|n| !n.is_empty())?;
    let volumes: kube::Api<PersistentVolume> = kube::Api::all(client.clone());
    let handle = volumes
        .get_opt(&pv)
        .await
        .ok()
        .flatten()?
        .spec?
        .csi?
        .volume_handle;
    Some((pv, handle))
}

/// What the last Membership said of each group, and what this node made of it.
///
/// The operator pushes a cluster's whole membership whenever any of its groups changes (a freeze of 500
/// groups is some 1 500 pushes, each naming every group). A group whose entry is the same as last time,
/// with every volume resolved then and the node serving the same volumes, is not fed to the core again:
/// its directive would be refused as stale and its membership would change nothing, but each input
/// re-enforces every group (a wave of pushes cost O(groups³) enforcement per sidecar).
#[derive(Default)]
struct Listed {
    /// The volumes this node served when the entries below were read.
    served: BTreeSet<String>,
    /// By group UID.
    groups: BTreeMap<String, ListedGroup>,
}

struct ListedGroup {
    /// The entry as the operator sent it.
    entry: pb::GroupMembership,
    /// Every PVC it names had a volume handle (from the operator or resolved here): nothing to retry.
    complete: bool,
    /// Its volumes this node serves, by (namespace, PVC).
    resolved: Vec<((String, String), pb::ResolvedVolume)>,
}

async fn membership_update(
    path: &GrpcPath,
    context: &Context,
    membership: pb::Membership,
    listed: &mut Listed,
) {
    let served: BTreeSet<String> = context
        .snapshot
        .borrow()
        .volumes
        .iter()
        .map(|v| v.volume.clone())
        .collect();
    if served != listed.served {
        listed.groups.clear();
        listed.served = served.clone();
    }
    let mut now = BTreeMap::new();
    let mut resolved = BTreeMap::new();
    for group in membership.groups {
        let Some(current) = group.current.as_ref() else {
            tracing::warn!(group = %group.group_name, "membership without a current point refused");
            continue;
        };
        let target = match GroupEpoch::try_from(current) {
            Ok(target) => target,
            Err(error) => {
                tracing::warn!(%error, group = %group.group_name, "malformed membership refused");
                continue;
            }
        };
        if let Some(known) = listed.groups.remove(&target.group_uid)
            && known.complete
            && known.entry == group
        {
            resolved.extend(known.resolved.iter().cloned());
            now.insert(target.group_uid, known);
            continue;
        }
        let entry_as_sent = group.clone();
        let mut complete = true;
        let mut resolved_here = Vec::new();
        // The membership lists the group's volumes in this cluster; this node's are those it serves
        // (the core keeps only those). A PVC named without a volume handle is resolved here.
        let mut volumes = BTreeSet::new();
        let known: BTreeSet<(&str, &str)> = group
            .volumes
            .iter()
            .filter(|v| !v.volume_handle.is_empty())
            .map(|v| (v.namespace.as_str(), v.pvc.as_str()))
            .collect();
        for entry in &group.volumes {
            let mut entry = entry.clone();
            if entry.volume_handle.is_empty()
                && known.contains(&(entry.namespace.as_str(), entry.pvc.as_str()))
            {
                continue; // the operator resolved it already: the entry with the handle counts
            }
            if entry.volume_handle.is_empty()
                && let Some(client) = &path.resolver
            {
                if let Some((pv, handle)) = resolve(client, &entry.namespace, &entry.pvc).await {
                    entry.persistent_volume = pv;
                    entry.volume_handle = handle;
                } else {
                    tracing::debug!(namespace = %entry.namespace, pvc = %entry.pvc, "PVC not resolved (yet)");
                }
            }
            if entry.volume_handle.is_empty() {
                complete = false;
                continue;
            }
            if served.contains(&entry.volume_handle) {
                context.remember_claims([(
                    entry.volume_handle.clone(),
                    lockstep_api::v1alpha1::ClaimRef {
                        namespace: entry.namespace.clone(),
                        name: entry.pvc.clone(),
                    },
                )]);
                let key = (entry.namespace.clone(), entry.pvc.clone());
                resolved.insert(key.clone(), entry.clone());
                resolved_here.push((key, entry.clone()));
            }
            volumes.insert(entry.volume_handle);
        }
        now.insert(
            target.group_uid.clone(),
            ListedGroup {
                entry: entry_as_sent,
                complete,
                resolved: resolved_here,
            },
        );
        // Every member in sync at the group's resume: the images kept through its resync may go (the
        // membership says so; a gRPC-only cluster has no mirrored group to read the phase from).
        let mine: BTreeSet<String> = volumes.intersection(&served).cloned().collect();
        if group.in_sync_epoch > 0 && !mine.is_empty() {
            context.send(Input::GroupInSync {
                group_uid: target.group_uid.clone(),
                epoch: group.in_sync_epoch,
                volumes: mine,
            });
        }
        context.send(Input::Directive {
            path: Path::Grpc,
            target: target.clone(),
        });
        let hold_timeout_ms = crate::enforce::bounded_hold_timeout_ms(group.hold_timeout_ms);
        if hold_timeout_ms != group.hold_timeout_ms {
            tracing::warn!(
                group = %group.group_name,
                sent_ms = group.hold_timeout_ms,
                kept_ms = hold_timeout_ms,
                "a membership named a hold timeout outside 1s..10m: kept within it"
            );
        }
        context.send(Input::Membership {
            path: Path::Grpc,
            order: ClaimOrder::new(Some(group.created_unix_ms), target.group_uid.clone()),
            group_uid: target.group_uid,
            group_name: group.group_name,
            volumes,
            hold_timeout_ms,
        });
    }
    for gone in listed.groups.keys() {
        context.send(Input::GroupGone {
            path: Path::Grpc,
            group_uid: gone.clone(),
        });
    }
    listed.groups = now;
    context.send(Input::Synced(Path::Grpc));
    if path.remember(resolved) {
        // Tell the operator which of the named PVCs this node serves (how a gRPC-only member resolves).
        let request = pb::ReportRequest {
            node: Some(identity(context)),
            failures: Vec::new(),
            volumes: path.resolved_volumes(),
            hold_timeouts: Vec::new(),
            states: Vec::new(),
        };
        match path.unary.clone().report(request).await {
            Ok(answer) if !answer.get_ref().applied => {
                tracing::warn!(reason = %answer.get_ref().reason, "resolved volumes not taken; the next Subscribe carries them")
            }
            Ok(_) => tracing::info!("resolved volumes reported over gRPC"),
            Err(status) => {
                tracing::warn!(%status, "reporting resolved volumes failed; the next Subscribe carries them")
            }
        }
    }
}

/// An acknowledgement the operator has not taken yet, and when to send it again.
struct Retry {
    ack: crate::enforce::Ack,
    at: Instant,
    backoff: Backoff,
}

/// How many groups' acknowledgements are in flight at once. The operator decides each as it arrives (a
/// release is a status write): one after the other, a node with a volume in each of 500 groups frozen
/// together would release the last group 500 decisions after the first.
const CONCURRENT_ACKS: usize = 32;

/// Sends the latest acknowledgement of every group with `Ack` until the operator answers it applied: at
/// once when it is new, again with backoff after an error or a not-applied answer (volumes the operator
/// has not resolved yet, a group it does not know yet, a replica that is not the leader), and again on
/// every new Subscribe stream (a restarted operator, or a new leader, has not heard it; the directive it
/// sends on connect is one this node already enforced, which produces no new acknowledgement).
pub async fn acknowledge(path: GrpcPath, context: Arc<Context>) {
    let mut sent: BTreeMap<String, crate::enforce::Ack> = BTreeMap::new();
    let mut retries: BTreeMap<String, Retry> = BTreeMap::new();
    let mut snapshots = context.snapshot.clone();
    let mut streams = path.streams.subscribe();
    let mut new_stream = false;
    loop {
        if std::mem::take(&mut new_stream) {
            sent.clear();
            retries.clear();
        }
        let now = Instant::now();
        let pending: Vec<crate::enforce::Ack> = snapshots
            .borrow_and_update()
            .acks
            .values()
            .filter(|p| sent.get(&p.ack.point.group_uid) != Some(&p.ack))
            .filter(|p| {
                retries
                    .get(&p.ack.point.group_uid)
                    .is_none_or(|retry| retry.ack != p.ack || retry.at <= now)
            })
            .map(|p| p.ack.clone())
            .collect();
        let node = identity(&context);
        let answers = futures::stream::iter(pending.into_iter().map(|ack| {
            let mut client = path.unary.clone();
            let request = pb::AckRequest {
                node: Some(node.clone()),
                enforced: Some(pb::GroupEpoch::from(&ack.point)),
                volume_handles: ack.volumes.clone(),
                fail_safe: ack.fail_safe,
            };
            async move {
                let answer = client.ack(request).await;
                (ack, answer)
            }
        }))
        .buffer_unordered(CONCURRENT_ACKS);
        let mut answers = std::pin::pin!(answers);
        while let Some((ack, answer)) = answers.next().await {
            let uid = ack.point.group_uid.clone();
            let not_taken = match answer {
                Ok(response) => {
                    let response = response.into_inner();
                    feed_point(&context, response.current.as_ref(), "ack answer");
                    if response.applied {
                        Metrics::count(&context.metrics.acks, "grpc", "ok");
                        tracing::info!(point = %ack.point, volumes = ?ack.volumes, "acknowledged over gRPC");
                        None
                    } else {
                        Metrics::count(&context.metrics.acks, "grpc", "not_applied");
                        Some(response.reason)
                    }
                }
                Err(status) => {
                    Metrics::count(&context.metrics.acks, "grpc", "error");
                    Some(status.to_string())
                }
            };
            match not_taken {
                None => {
                    retries.remove(&uid);
                    sent.insert(uid, ack);
                }
                Some(reason) => {
                    tracing::debug!(%reason, point = %ack.point, "gRPC Ack not applied; will send it again");
                    let retry = retries.entry(uid).or_insert_with(|| Retry {
                        ack: ack.clone(),
                        at: now,
                        backoff: Backoff::default(),
                    });
                    if retry.ack != ack {
                        retry.ack = ack;
                        retry.backoff.reset();
                    }
                    retry.at = Instant::now() + retry.backoff.next_delay();
                }
            }
        }
        let wake = retries.values().map(|retry| retry.at).min();
        tokio::select! {
            _ = context.stop.cancelled() => return,
            changed = snapshots.changed() => if changed.is_err() { return },
            changed = streams.changed() => match changed {
                Ok(()) => new_stream = true,
                Err(_) => return,
            },
            _ = tokio::time::sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
        }
    }
}

/// The gRPC form of a hold timeout.
fn hold_timeout_message(hold: &HoldTimeout) -> pb::HoldTimeout {
    pb::HoldTimeout {
        group_uid: hold.group_uid.clone(),
        volume_handle: hold.volume.clone(),
        epoch: hold.epoch,
        failed_writes: hold.failed_writes,
        since_unix_ms: hold.since_unix_ms,
    }
}

/// The node's volume states in a group, as a report carries them.
fn volume_states(snapshot: &Snapshot) -> Vec<pb::VolumeReplication> {
    snapshot
        .volumes
        .iter()
        .filter_map(|volume| {
            let (group_uid, level) = (volume.group_uid.as_ref()?, volume.level?);
            Some(pb::VolumeReplication {
                volume_handle: volume.volume.clone(),
                group_uid: group_uid.clone(),
                state: pb::ReplicationState::from(snapshot.volume_state(volume)).into(),
                epoch: level.epoch,
                stage: pb::Stage::from(level.stage()).into(),
            })
        })
        .collect()
}

/// Sends outstanding failures with `Report` until acknowledged (a higher epoch seen by either path):
/// at once, then with backoff on failure, and again every `resend` while still outstanding. Hold
/// timeouts ride on the same call, sent whenever they changed since the operator last took them.
pub async fn report(path: GrpcPath, context: Arc<Context>) {
    let mut snapshots = context.snapshot.clone();
    let mut backoff = Backoff::default();
    let resend = Duration::from_secs(5);
    let mut last_sent: Option<tokio::time::Instant> = None;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut holds_sent: Vec<HoldTimeout> = Vec::new();
    let mut states_sent: Option<Vec<pb::VolumeReplication>> = None;
    let mut streams = path.streams.subscribe();
    let mut new_stream = false;
    loop {
        if std::mem::take(&mut new_stream) {
            // A new stream, perhaps to an operator that heard nothing: every outstanding failure and
            // hold timeout goes again, now.
            holds_sent.clear();
            states_sent = None;
            last_sent = None;
            retry_at = None;
            backoff.reset();
        }
        let snapshot: Snapshot = snapshots.borrow_and_update().clone();
        let pending = context.reports.pending(&snapshot.failures, Path::Grpc);
        if snapshot.hold_timeouts.is_empty() {
            holds_sent.clear(); // nothing to tell: the group resumed or froze again
        }
        let holds_pending = snapshot.hold_timeouts != holds_sent;
        let states = if path.report_states {
            volume_states(&snapshot)
        } else {
            Vec::new()
        };
        let states_pending =
            path.report_states && snapshot.inventory_known && states_sent.as_ref() != Some(&states);
        let now = tokio::time::Instant::now();
        let failures_due = !snapshot.failures.is_empty()
            && (!pending.is_empty() || last_sent.is_none_or(|t| now >= t + resend));
        let due =
            (failures_due || holds_pending || states_pending) && retry_at.is_none_or(|t| now >= t);
        if due {
            let request = pb::ReportRequest {
                node: Some(identity(&context)),
                failures: snapshot
                    .failures
                    .iter()
                    .map(|f| pb::CopyFailure {
                        group_uid: f.group_uid.clone(),
                        volume_handle: f.volume.clone(),
                        epoch_seen: f.epoch_seen,
                        sequence: f.sequence,
                        error: f.error.clone(),
                        since_unix_ms: f.since_unix_ms,
                    })
                    .collect(),
                // Resolutions travel with every Subscribe and the membership's report: a failure's
                // delivery must not wait for the node's stream.
                volumes: Vec::new(),
                hold_timeouts: snapshot
                    .hold_timeouts
                    .iter()
                    .map(hold_timeout_message)
                    .collect(),
                states: states.clone(),
            };
            let answer = path
                .unary
                .clone()
                .report(request)
                .await
                .and_then(|response| {
                    let response = response.into_inner();
                    if response.applied {
                        Ok(response)
                    } else {
                        Err(tonic::Status::unavailable(response.reason))
                    }
                });
            match answer {
                Ok(response) => {
                    Metrics::count(&context.metrics.reports, "grpc", "ok");
                    if !pending.is_empty() {
                        tracing::info!(failures = pending.len(), "reported over gRPC");
                    }
                    if holds_pending {
                        tracing::info!(
                            volumes = snapshot.hold_timeouts.len(),
                            "hold timeouts reported over gRPC"
                        );
                    }
                    context.reports.delivered(&snapshot.failures, Path::Grpc);
                    holds_sent = snapshot.hold_timeouts.clone();
                    states_sent = Some(states);
                    for group in &response.groups {
                        feed_point(&context, Some(group), "report answer");
                    }
                    backoff.reset();
                    last_sent = Some(tokio::time::Instant::now());
                    retry_at = None;
                }
                Err(status) => {
                    Metrics::count(&context.metrics.reports, "grpc", "error");
                    tracing::debug!(%status, "gRPC Report failed; will retry");
                    retry_at = Some(tokio::time::Instant::now() + backoff.next_delay());
                }
            }
        }
        let wake = retry_at.unwrap_or_else(|| {
            last_sent.map_or(tokio::time::Instant::now() + resend, |t| t + resend)
        });
        let waiting =
            !snapshot.failures.is_empty() || snapshot.hold_timeouts != holds_sent || states_pending;
        tokio::select! {
            _ = context.stop.cancelled() => return,
            changed = snapshots.changed() => if changed.is_err() { return },
            changed = streams.changed() => match changed {
                Ok(()) => new_stream = true,
                Err(_) => return,
            },
            _ = tokio::time::sleep_until(wake), if waiting => {}
        }
    }
}
