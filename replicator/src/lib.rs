//! The Lockstep reference replicator: file-backed volumes served over NBD and copied synchronously to a
//! secondary.
//!
//! One binary, two modes. `primary` serves sparse-file volumes to applications over NBD (TCP and/or a
//! unix socket) and copies every write to the secondary before acknowledging it; `secondary` receives the
//! ordered replication streams and applies them durably, and serves the volumes it promotes at the
//! disaster-recovery site as primaries. The binary only parses flags and calls [`run`];
//! tests and later crates start [`Primary`] and [`secondary::Secondary`] in-process.
//!
//! Modules: [`nbd`] (protocol codec and server), [`wire`] (replication frames), [`store`] (ordered file
//! I/O with group commit), [`hold`] (the per-volume replication state machine: copy, hold, suspend /
//! release / resume, hold timeout, persisted state), [`copy`] (the replication link), [`volume`],
//! [`secondary`], [`dirty`] (dirty-region map), [`events`], `control` (the `Replicator` gRPC service,
//! feature `control`, on by default), [`linkcut`] (a fault-injecting TCP proxy for tests), [`link_tls`]
//! (mutual TLS on the replication link), [`owners`] (which primary a secondary volume belongs to),
//! [`failover`] (disaster recovery where the secondaries are: promote, reverse; [`SecondaryNode`] serves
//! it), `failover_cli` (feature `control`: `promote`, `fence`, `reverse` on the command line) and
//! `testing` (feature `test-support`: the fixtures the tests of every crate share).
//!
//! Durability: the secondary acknowledges a write only after an `fdatasync` of its file that followed
//! the write returned (group commit: one `fdatasync` per batch of queued writes). The primary
//! acknowledges a write to its NBD client only when the write is in its own file (durable too if the
//! client asked for FUA) **and** the secondary acknowledged it — or, after a release, when the persisted
//! dirty-region map covers it.

#[cfg(feature = "control")]
pub mod control;
pub mod copy;
pub mod dirty;
pub mod events;
pub mod failover;
#[cfg(feature = "control")]
pub mod failover_cli;
pub mod hold;
pub mod link_tls;
pub mod linkcut;
pub mod nbd;
pub mod owners;
pub mod secondary;
pub mod store;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod undo;
pub mod undo_writer;
pub mod volume;
pub mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

pub use copy::{CopyConfig, CopyError};
pub use events::{CopyFailed, Event, HoldTimedOut};
pub use hold::{DirectiveError, Mode as ReplMode, Stage};
pub use link_tls::{LinkSecurity, LinkTls, LinkTlsError};
pub use volume::{DEFAULT_HOLD_TIMEOUT, Volume, VolumeConfig, VolumeError, VolumeStatus};

/// Start-up options.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// What to run.
    #[command(subcommand)]
    pub mode: Mode,
}

/// The binary's modes.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Mode {
    /// Serve volumes over NBD and copy their writes to a secondary.
    Primary(PrimaryArgs),
    /// Receive replication streams and apply them to files in a directory.
    Secondary(SecondaryArgs),
    /// Roll secondary volumes back to the image they keep (the secondary must not be running on them):
    /// after the primary site was lost during a resync.
    Rollback(RollbackArgs),
    /// Forget which primary owns secondary volumes, so that the next primary to stream one owns it
    /// (re-assigning a volume to another primary on purpose).
    ReleaseVolume(ReleaseArgs),
    /// Disaster recovery: serve secondary volumes as primaries at this site from the image of an epoch
    /// (asks a `secondary --control-socket`).
    #[cfg(feature = "control")]
    Promote(failover_cli::PromoteArgs),
    /// Disaster recovery: make primaries refuse every write from now on; prints (JSON) what each wrote
    /// after the image, for `reverse --old-site-changes`.
    #[cfg(feature = "control")]
    Fence(failover_cli::VerbArgs),
    /// Disaster recovery: replicate promoted volumes back to the old site's secondary, discarding what
    /// the old site wrote after the image.
    #[cfg(feature = "control")]
    Reverse(failover_cli::ReverseArgs),
}

/// Flags of `lockstep-replicator release-volume`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReleaseArgs {
    /// Directory of the secondary volume files.
    #[arg(long)]
    pub dir: PathBuf,
    /// The volumes to release. Repeatable.
    #[arg(long = "volume", required = true)]
    pub volumes: Vec<String>,
}

/// How the replication link is secured (flags of both `primary` and `secondary`).
#[derive(Debug, Clone, clap::Args)]
pub struct LinkArgs {
    /// This end's certificate for the replication link (PEM, the chain from the leaf). Its first DNS
    /// name is this end's identity: a secondary volume belongs to the primary identity that first
    /// streams it.
    #[arg(long, requires_all = ["link_key", "link_ca"], conflicts_with = "insecure_plaintext")]
    pub link_cert: Option<PathBuf>,
    /// The private key of `--link-cert` (PEM).
    #[arg(long, requires = "link_cert")]
    pub link_key: Option<PathBuf>,
    /// The CA bundle that signs the other end's certificates (PEM): on a secondary the primary site's
    /// CA, on a primary the secondary site's CA.
    #[arg(long, requires = "link_cert")]
    pub link_ca: Option<PathBuf>,
    /// Run the replication link in plaintext, unauthenticated: anyone who reaches a secondary can
    /// stream to it. For tests and a migration only; logged as INSECURE.
    #[arg(long)]
    pub insecure_plaintext: bool,
}

impl LinkArgs {
    /// The link's security as the flags ask: TLS with the files (loaded now), or plaintext if asked.
    pub fn security(&self) -> Result<LinkSecurity, StartError> {
        match (&self.link_cert, &self.link_key, &self.link_ca) {
            (Some(cert), Some(key), Some(ca)) => {
                let tls = LinkTls::load(cert, key, ca)?;
                tracing::info!(identity = tls.identity(), ca = %ca.display(), "replication link: mutual TLS");
                Ok(LinkSecurity::Tls(std::sync::Arc::new(tls)))
            }
            _ if self.insecure_plaintext => {
                tracing::warn!("INSECURE: the replication link is plaintext and unauthenticated (--insecure-plaintext): anyone who reaches the secondary can stream to it");
                Ok(LinkSecurity::Plaintext)
            }
            _ => Err(StartError::Config(
                "the replication link needs --link-cert, --link-key and --link-ca (mutual TLS), or --insecure-plaintext".into(),
            )),
        }
    }
}

/// Flags of `lockstep-replicator rollback`.
#[derive(Debug, Clone, clap::Args)]
pub struct RollbackArgs {
    /// Directory of the secondary volume files.
    #[arg(long)]
    pub dir: PathBuf,
    /// The volumes to roll back (every volume that keeps an image if none is given). Repeatable.
    #[arg(long = "volume")]
    pub volumes: Vec<String>,
}

/// Flags of `lockstep-replicator primary`.
#[derive(Debug, Clone, clap::Args)]
pub struct PrimaryArgs {
    /// A volume: `NAME=PATH[,size=SIZE][,secondary=HOST:PORT]` (SIZE like 1G, 512M, 4096). Repeatable.
    /// A volume without `secondary=` is served with replication off.
    #[arg(long = "volume", required = true)]
    pub volumes: Vec<String>,
    /// NBD over TCP on this address.
    #[arg(long)]
    pub nbd_listen: Option<SocketAddr>,
    /// NBD over a unix socket at this path.
    #[arg(long)]
    pub nbd_socket: Option<PathBuf>,
    /// How long a write may wait for the secondary's acknowledgement, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub copy_timeout_ms: u64,
    /// Serve every volume with replication off, ignoring `secondary=`.
    #[arg(long)]
    pub replication_off: bool,
    /// How long a held write waits before failing with an I/O error, in milliseconds (until the sidecar
    /// configures the group's own).
    #[arg(long, default_value_t = 30_000)]
    pub hold_timeout_ms: u64,
    /// Serve the `Replicator` gRPC service on this unix socket. Volumes then start unconfirmed: their I/O
    /// waits until the sidecar confirms their group, epoch and stage (fail closed).
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    /// The replication link's security (needed when a volume has a secondary).
    #[command(flatten)]
    pub link: LinkArgs,
}

/// Flags of `lockstep-replicator secondary`.
#[derive(Debug, Clone, clap::Args)]
pub struct SecondaryArgs {
    /// Listen for primaries on this address.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Directory of the secondary volume files (one per volume, named after it).
    #[arg(long)]
    pub dir: PathBuf,
    /// The replication link's security.
    #[command(flatten)]
    pub link: LinkArgs,
    /// The most space one volume's undo log (its kept image) may reserve, in bytes; an image that may
    /// need more is refused as if the filesystem were full ("undo log out of space"). Unset: only the
    /// filesystem's free space limits it.
    #[arg(long, value_name = "BYTES")]
    pub undo_log_max_bytes: Option<u64>,
    /// Serve the `Replicator` gRPC service on this unix socket (what the disaster-recovery site's
    /// sidecar or operator dials): ListVolumes, State, Promote, Fence, Reverse, and the directives for
    /// promoted volumes.
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    /// Serve promoted volumes over NBD on this TCP address.
    #[arg(long)]
    pub nbd_listen: Option<SocketAddr>,
    /// Serve promoted volumes over NBD on this unix socket.
    #[arg(long)]
    pub nbd_socket: Option<PathBuf>,
    /// Once a promoted volume replicates back to the old site: how long a write may wait for its
    /// acknowledgement, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub copy_timeout_ms: u64,
    /// How long a held write of a promoted volume waits before failing, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub hold_timeout_ms: u64,
}

/// Why the replicator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A flag or configuration value is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// A volume could not be opened.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// A socket could not be bound.
    #[error("bind: {0}")]
    Bind(#[from] std::io::Error),
    /// The replication link's certificates could not be loaded.
    #[error("replication link: {0}")]
    Tls(#[from] LinkTlsError),
}

/// Parses a size such as `4096`, `512K`, `64M`, `1G`, `2T` (binary units; an optional trailing `iB`/`B`).
pub fn parse_size(s: &str) -> Result<u64, StartError> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| StartError::Config(format!("bad size {s:?}")))
}

/// Parses a `--volume` value: `NAME=PATH[,size=SIZE][,secondary=HOST:PORT]`.
pub fn parse_volume(spec: &str, copy_timeout: Duration) -> Result<VolumeConfig, StartError> {
    // Hold timeout and confirmation are set by the caller.
    let bad = |why: &str| StartError::Config(format!("--volume {spec:?}: {why}"));
    let mut parts = spec.split(',');
    let (name, path) = parts
        .next()
        .and_then(|p| p.split_once('='))
        .ok_or_else(|| bad("expected NAME=PATH"))?;
    let mut config = VolumeConfig::new(name, PathBuf::from(path), None, None);
    for part in parts {
        match part.split_once('=') {
            Some(("size", v)) => config.size = Some(parse_size(v)?),
            Some(("secondary", v)) => {
                // Secured by the caller.
                config.copy = Some(CopyConfig::plaintext(v, copy_timeout));
            }
            _ => return Err(bad("unknown field")),
        }
    }
    Ok(config)
}

/// How to run a primary.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    /// The volumes.
    pub volumes: Vec<VolumeConfig>,
    /// NBD over TCP.
    pub nbd_listen: Option<SocketAddr>,
    /// NBD over a unix socket.
    pub nbd_socket: Option<PathBuf>,
    /// Record WRITE latencies (for the benchmark).
    pub record_latency: bool,
    /// Serve the `Replicator` gRPC service on this unix socket.
    pub control_socket: Option<PathBuf>,
}

/// Serves `server` over NBD on a TCP address and/or a unix socket, adding the tasks to `tasks`;
/// returns the TCP address bound.
async fn serve_nbd(
    server: &Arc<nbd::NbdServer>,
    listen: Option<SocketAddr>,
    socket: &Option<PathBuf>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<Option<SocketAddr>, StartError> {
    let mut tcp = None;
    if let Some(addr) = listen {
        let listener = TcpListener::bind(addr).await?;
        tcp = Some(listener.local_addr()?);
        tasks.push(tokio::spawn(Arc::clone(server).serve_tcp(listener)));
    }
    if let Some(path) = socket {
        // A stale socket file from an earlier run would make bind fail.
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        tasks.push(tokio::spawn(Arc::clone(server).serve_unix(listener)));
    }
    Ok(tcp)
}

/// Serves the `Replicator` service on the unix socket `path` (a stale socket file is replaced).
#[cfg(feature = "control")]
fn serve_control(
    path: &std::path::Path,
    service: control::ControlService,
) -> Result<JoinHandle<()>, StartError> {
    let listener = control::bind(path)?;
    Ok(tokio::spawn(async move {
        if let Err(e) = service.serve_unix(listener).await {
            tracing::error!(error = %e, "the control service stopped");
        }
    }))
}

#[cfg(not(feature = "control"))]
fn no_control_service() -> StartError {
    StartError::Config("built without the control service (feature `control`)".into())
}

/// A running primary; stops serving when dropped.
#[derive(Debug)]
pub struct Primary {
    /// The volumes it serves (a primary's set never changes).
    volumes: std::collections::BTreeMap<String, Arc<Volume>>,
    events: broadcast::Sender<Event>,
    tcp: Option<SocketAddr>,
    unix: Option<PathBuf>,
    latency: Option<Arc<nbd::LatencyRecorder>>,
    _tasks: Tasks,
}

/// Serving tasks, aborted when dropped.
#[derive(Debug, Default)]
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl Primary {
    /// Opens the volumes, starts their replication links and the NBD listeners.
    pub async fn start(config: PrimaryConfig) -> Result<Primary, StartError> {
        if config.nbd_listen.is_none() && config.nbd_socket.is_none() {
            return Err(StartError::Config(
                "give --nbd-listen, --nbd-socket or both".into(),
            ));
        }
        let (events, _) = broadcast::channel(1024);
        let mut volumes = Vec::new();
        for v in config.volumes {
            if volumes.iter().any(|o: &Arc<Volume>| o.name() == v.name) {
                return Err(StartError::Config(format!("volume {} given twice", v.name)));
            }
            volumes.push(Volume::open(v, events.clone())?);
        }
        let by_name = volumes
            .iter()
            .map(|v| (v.name().to_owned(), Arc::clone(v)))
            .collect();
        let exports = nbd::Exports::new(volumes);
        let latency = config
            .record_latency
            .then(|| Arc::new(nbd::LatencyRecorder::default()));
        let server = match &latency {
            Some(l) => nbd::NbdServer::with_latency(exports, Arc::clone(l)),
            None => nbd::NbdServer::new(exports),
        };
        let mut tasks = Vec::new();
        let tcp = serve_nbd(&server, config.nbd_listen, &config.nbd_socket, &mut tasks).await?;
        #[cfg(feature = "control")]
        if let Some(path) = &config.control_socket {
            let service = control::ControlService::new(server.exports().clone(), events.clone());
            tasks.push(serve_control(path, service)?);
        }
        #[cfg(not(feature = "control"))]
        if config.control_socket.is_some() {
            return Err(no_control_service());
        }
        Ok(Primary {
            volumes: by_name,
            events,
            tcp,
            unix: config.nbd_socket,
            latency,
            _tasks: Tasks(tasks),
        })
    }

    /// The NBD TCP address, if serving TCP.
    pub fn nbd_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// The NBD unix socket, if serving one.
    pub fn nbd_socket(&self) -> Option<&std::path::Path> {
        self.unix.as_deref()
    }

    /// Subscribes to replication events (only events after this call are seen).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The volume named `name`.
    pub fn volume(&self, name: &str) -> Option<&Arc<Volume>> {
        self.volumes.get(name)
    }

    /// WRITE latencies recorded so far, if recording (microseconds).
    pub fn take_latencies(&self) -> Vec<u32> {
        self.latency.as_ref().map(|l| l.take()).unwrap_or_default()
    }
}

/// How to run a secondary with its failover side.
#[derive(Debug, Clone)]
pub struct SecondaryNodeConfig {
    /// The secondary itself.
    pub secondary: secondary::SecondaryConfig,
    /// NBD over TCP for promoted volumes.
    pub nbd_listen: Option<SocketAddr>,
    /// NBD over a unix socket for promoted volumes.
    pub nbd_socket: Option<PathBuf>,
    /// Serve the `Replicator` gRPC service on this unix socket.
    pub control_socket: Option<PathBuf>,
    /// A promoted volume's copy timeout once it replicates back.
    pub copy_timeout: Duration,
    /// A promoted volume's hold timeout.
    pub hold_timeout: Duration,
}

impl SecondaryNodeConfig {
    /// A secondary with NBD on a loopback port and the control socket at `control_socket` (tests).
    pub fn serving(secondary: secondary::SecondaryConfig, control_socket: PathBuf) -> Self {
        SecondaryNodeConfig {
            secondary,
            nbd_listen: Some(([127, 0, 0, 1], 0).into()),
            nbd_socket: None,
            control_socket: Some(control_socket),
            copy_timeout: Duration::from_secs(5),
            hold_timeout: DEFAULT_HOLD_TIMEOUT,
        }
    }
}

/// A running secondary with its failover side: promoted volumes served over NBD and the `Replicator`
/// service (see [`failover`]). Stops serving when dropped.
#[derive(Debug)]
pub struct SecondaryNode {
    /// The secondary.
    pub secondary: secondary::Secondary,
    tcp: Option<SocketAddr>,
    tasks: Tasks,
}

impl SecondaryNode {
    /// Starts the secondary, serves again the volumes promoted before, and starts NBD and the control
    /// service as configured.
    pub async fn start(config: SecondaryNodeConfig) -> Result<SecondaryNode, StartError> {
        let secondary = secondary::Secondary::start(config.secondary).await?;
        let site = Arc::clone(secondary.site());
        site.set_settings(config.copy_timeout, config.hold_timeout);
        site.restore()
            .map_err(|e| StartError::Config(format!("serving the promoted volumes again: {e}")))?;
        let server = nbd::NbdServer::new(site.exports().clone());
        let mut tasks = Vec::new();
        let tcp = serve_nbd(&server, config.nbd_listen, &config.nbd_socket, &mut tasks).await?;
        #[cfg(feature = "control")]
        if let Some(path) = &config.control_socket {
            let service = control::ControlService::for_secondary(Arc::clone(&site));
            tasks.push(serve_control(path, service)?);
        }
        #[cfg(not(feature = "control"))]
        if config.control_socket.is_some() {
            return Err(no_control_service());
        }
        Ok(SecondaryNode {
            secondary,
            tcp,
            tasks: Tasks(tasks),
        })
    }

    /// The NBD TCP address of promoted volumes, if serving TCP.
    pub fn nbd_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// The failover side (promoted volumes).
    pub fn site(&self) -> &Arc<failover::Site> {
        self.secondary.site()
    }

    /// Stops abruptly, as a killed process would (see [`secondary::Secondary::kill`]); NBD and the
    /// control service stop too.
    pub async fn kill(mut self) {
        let tasks = std::mem::take(&mut self.tasks.0);
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
        for volume in self.site().exports().all() {
            self.site().exports().remove(volume.name());
        }
        self.secondary.kill().await;
    }
}

/// Runs the component until it is asked to stop (SIGINT / SIGTERM).
pub async fn run(options: Options) -> anyhow::Result<()> {
    match options.mode {
        Mode::Primary(args) => {
            let timeout = Duration::from_millis(args.copy_timeout_ms);
            let mut volumes = args
                .volumes
                .iter()
                .map(|spec| parse_volume(spec, timeout))
                .collect::<Result<Vec<_>, _>>()?;
            for v in &mut volumes {
                if args.replication_off {
                    v.copy = None;
                }
                v.hold_timeout = Duration::from_millis(args.hold_timeout_ms);
                v.require_confirmation = args.control_socket.is_some();
            }
            if volumes.iter().any(|v| v.copy.is_some()) {
                let security = args.link.security()?;
                for copy in volumes.iter_mut().filter_map(|v| v.copy.as_mut()) {
                    copy.security = security.clone();
                }
            }
            let primary = Primary::start(PrimaryConfig {
                volumes,
                nbd_listen: args.nbd_listen,
                nbd_socket: args.nbd_socket,
                record_latency: false,
                control_socket: args.control_socket,
            })
            .await?;
            let mut events = primary.subscribe();
            tracing::info!(tcp = ?primary.nbd_addr(), unix = ?primary.nbd_socket(), "primary serving");
            tokio::select! {
                () = shutdown_signal() => {}
                () = async {
                    while let Ok(event) = events.recv().await {
                        log_event(&event);
                    }
                } => {}
            }
            Ok(())
        }
        Mode::Secondary(args) => {
            let node = SecondaryNode::start(SecondaryNodeConfig {
                secondary: secondary::SecondaryConfig {
                    listen: args.listen,
                    dir: args.dir,
                    security: args.link.security()?,
                },
                nbd_listen: args.nbd_listen,
                nbd_socket: args.nbd_socket,
                control_socket: args.control_socket,
                copy_timeout: Duration::from_millis(args.copy_timeout_ms),
                hold_timeout: Duration::from_millis(args.hold_timeout_ms),
            })
            .await?;
            node.secondary.set_undo_log_limit(args.undo_log_max_bytes);
            tracing::info!(
                addr = %node.secondary.local_addr(),
                nbd = ?node.nbd_addr(),
                "secondary serving"
            );
            shutdown_signal().await;
            Ok(())
        }
        Mode::Rollback(args) => {
            let volumes = if args.volumes.is_empty() {
                undo::kept_volumes(&args.dir)?
            } else {
                args.volumes
            };
            for volume in volumes {
                match undo::roll_back(&args.dir, &volume)? {
                    Some(done) => println!(
                        "{volume}: rolled back to the image of epoch {} ({} blocks)",
                        done.epoch, done.blocks
                    ),
                    None => println!("{volume}: keeps no image"),
                }
            }
            Ok(())
        }
        #[cfg(feature = "control")]
        Mode::Promote(args) => {
            for line in failover_cli::promote(&args).await? {
                println!("{line}");
            }
            Ok(())
        }
        #[cfg(feature = "control")]
        Mode::Fence(args) => {
            let fenced = failover_cli::fence(&args).await?;
            println!("{}", serde_json::to_string_pretty(&fenced)?);
            Ok(())
        }
        #[cfg(feature = "control")]
        Mode::Reverse(args) => {
            for line in failover_cli::reverse(&args).await? {
                println!("{line}");
            }
            Ok(())
        }
        Mode::ReleaseVolume(args) => {
            for volume in args.volumes {
                if !wire::valid_volume_name(&volume) {
                    return Err(
                        StartError::Config(format!("{volume:?} is not a volume name")).into(),
                    );
                }
                match owners::release(&args.dir, &volume)? {
                    Some(owner) => println!(
                        "{volume}: released from primary {owner}; the next primary to stream it owns it"
                    ),
                    None => println!("{volume}: belonged to no primary"),
                }
            }
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// How loud a replication event is in the log: a failed copy and failed held writes are warnings; a
/// volume's routine state change (configured, suspended, released, resynced) is information.
fn event_level(event: &Event) -> tracing::Level {
    match event {
        Event::CopyFailed(_) | Event::HoldTimedOut(_) => tracing::Level::WARN,
        Event::StateChanged(_) => tracing::Level::INFO,
    }
}

/// Logs a replication event at [`event_level`].
fn log_event(event: &Event) {
    if event_level(event) == tracing::Level::WARN {
        tracing::warn!(?event, "replication event");
    } else {
        tracing::info!(?event, "replication event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routine_state_changes_are_information_and_failures_warnings() {
        let status = VolumeStatus {
            name: "vol-a".into(),
            replication: crate::hold::Snapshot {
                mode: ReplMode::Replicating,
                group_uid: "uid-1".into(),
                epoch: 1,
                stage: Some(Stage::Freeze),
                fail_safe: false,
                next_seq: 8,
                last_acked: Some(6),
                pending: 0,
                held: 1,
                dirty_bytes: 0,
                hold_timeout: Duration::from_secs(30),
            },
            secondary: "127.0.0.1:7001".into(),
            kept_image: None,
            fenced: None,
        };
        assert_eq!(
            event_level(&Event::StateChanged(Box::new(status))),
            tracing::Level::INFO
        );
        let failed = CopyFailed {
            volume: "vol-a".into(),
            sequence: 7,
            group_uid: String::new(),
            epoch_known: 0,
            error: "replication link: connection reset by peer".into(),
            since: std::time::SystemTime::now(),
        };
        assert_eq!(
            event_level(&Event::CopyFailed(failed)),
            tracing::Level::WARN
        );
        let timed_out = HoldTimedOut {
            volume: "vol-a".into(),
            failed_writes: 1,
        };
        assert_eq!(
            event_level(&Event::HoldTimedOut(timed_out)),
            tracing::Level::WARN
        );
    }

    #[test]
    fn the_link_needs_its_certificates_or_an_explicit_insecure_flag() {
        let args = |cert: Option<PathBuf>, key, ca, insecure_plaintext| LinkArgs {
            link_cert: cert,
            link_key: key,
            link_ca: ca,
            insecure_plaintext,
        };
        let refused = args(None, None, None, false).security().unwrap_err();
        assert!(
            refused.to_string().contains("--insecure-plaintext"),
            "{refused}"
        );
        assert!(matches!(
            args(None, None, None, true).security(),
            Ok(LinkSecurity::Plaintext)
        ));

        let dir = tempfile::tempdir().unwrap();
        let (own, peer) = (
            link_tls::SiteCa::new("east").unwrap(),
            link_tls::SiteCa::new("west").unwrap(),
        );
        let (cert, key) = own.issue("east-node-1", &[]).unwrap();
        let files = ["link.crt", "link.key", "peer-ca.crt"].map(|f| dir.path().join(f));
        for (path, text) in files.iter().zip([&cert, &key, &peer.pem().to_owned()]) {
            std::fs::write(path, text).unwrap();
        }
        let [cert, key, ca] = files.map(Some);
        match args(cert.clone(), key.clone(), ca, false).security() {
            Ok(LinkSecurity::Tls(tls)) => assert_eq!(tls.identity(), "east-node-1"),
            other => panic!("expected TLS, got {other:?}"),
        }
        // A CA bundle that is not one is refused with the file's name.
        let wrong = args(cert, key, Some(dir.path().join("link.key")), false)
            .security()
            .unwrap_err();
        assert!(wrong.to_string().contains("link.key"), "{wrong}");
    }

    #[test]
    fn sizes_and_volume_specs_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
        let v = parse_volume(
            "vol1=/tmp/v1,size=1M,secondary=127.0.0.1:7000",
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(v.name, "vol1");
        assert_eq!(v.size, Some(1 << 20));
        assert_eq!(v.copy.unwrap().secondary, "127.0.0.1:7000");
        assert!(parse_volume("nopath", Duration::from_secs(1)).is_err());
    }
}
