//! Test support (cargo feature `test-support`): the scaffolding every crate's tests share.
//!
//! - [`ReplicatorNode`]: one node's replication, in-process — a [`Primary`] serving N volumes, each
//!   copied to the node's [`Secondary`] through its own [`LinkCut`] proxy (the fault injection point),
//!   over a plaintext link or mutual TLS with one CA per site, optionally with the `Replicator` gRPC
//!   control socket.
//! - [`control_client`] (feature `control` too): a `Replicator` gRPC client on a node's control socket.
//! - [`eventually`] / [`poll_until`]: poll a check until it yields a value, with a deadline and a message
//!   saying what never happened (never fixed sleeps, never timing assertions).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::link_tls::SiteCa;
use crate::linkcut::{LinkCut, LinkMode};
use crate::secondary::{Secondary, SecondaryConfig};
use crate::{
    CopyConfig, DEFAULT_HOLD_TIMEOUT, LinkSecurity, LinkTlsError, Primary, PrimaryConfig,
    StartError, VolumeConfig,
};

/// How long [`eventually`] waits: generous, so that a loaded machine never fails a test.
pub const EVENTUALLY_DEADLINE: Duration = Duration::from_secs(60);

/// A check that never yielded a value before its deadline.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {within:?} waiting for {what}")]
pub struct TimedOut {
    /// What was waited for.
    pub what: String,
    /// How long.
    pub within: Duration,
}

/// Polls `check` every 20 ms until it returns `Some`, or fails naming `what` after `within`.
pub async fn poll_until<T, F, Fut>(
    what: &str,
    within: Duration,
    mut check: F,
) -> Result<T, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(TimedOut {
                what: what.to_owned(),
                within,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` until it returns `Some`; a test assertion: panics naming `what` after
/// [`EVENTUALLY_DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll_until(what, EVENTUALLY_DEADLINE, check).await {
        Ok(value) => value,
        Err(timed_out) => panic!("{timed_out}"),
    }
}

/// A `Replicator` gRPC client on the unix socket `socket`, once it accepts a connection; a test
/// helper: panics after [`EVENTUALLY_DEADLINE`].
#[cfg(feature = "control")]
pub async fn control_client(
    socket: &Path,
) -> lockstep_api::proto::replicator::v1::replicator_client::ReplicatorClient<
    tonic::transport::Channel,
> {
    eventually(
        &format!("the control socket {} to accept", socket.display()),
        || async move { crate::failover_cli::connect(socket).await.ok() },
    )
    .await
}

/// How the replication link of a [`ReplicatorNode`] is secured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeLink {
    /// Plaintext, nobody authenticated.
    Plaintext,
    /// Mutual TLS as in production: one CA per site (made for the node), the primary's identity the
    /// node's name, the secondary's certificate naming the loopback address the primary dials.
    Tls {
        /// Names the sites' CAs (`<site> primary site`, `<site> secondary site`) and the secondary
        /// (`<site>-secondary`).
        site: String,
        /// The primary's identity.
        node: String,
    },
}

/// What a [`ReplicatorNode`] runs.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// The volumes: export name and size in bytes.
    pub volumes: Vec<(String, u64)>,
    /// Where the files go; `None`: a temporary directory removed with the node.
    pub dir: Option<PathBuf>,
    /// The link's security.
    pub link: NodeLink,
    /// How long a write may wait for the secondary before the copy counts as failed.
    pub copy_timeout: Duration,
    /// How long a held write waits before it fails (until a sidecar configures another).
    pub hold_timeout: Duration,
    /// Volumes start unconfirmed, holding all I/O until configured (as under a sidecar).
    pub require_confirmation: bool,
    /// Serve NBD over TCP on a loopback port.
    pub nbd_tcp: bool,
    /// Serve NBD on the unix socket `<dir>/nbd.sock`.
    pub nbd_unix: bool,
    /// Serve the `Replicator` gRPC service on the unix socket `<dir>/control.sock`.
    pub control_socket: bool,
}

impl NodeSpec {
    /// `volumes` of `size` bytes each, a plaintext link, a 5 s copy timeout, the default hold timeout,
    /// volumes unconfirmed at start, NBD over TCP, and the control socket.
    pub fn new(volumes: &[&str], size: u64) -> NodeSpec {
        NodeSpec {
            volumes: volumes.iter().map(|v| ((*v).to_owned(), size)).collect(),
            dir: None,
            link: NodeLink::Plaintext,
            copy_timeout: Duration::from_secs(5),
            hold_timeout: DEFAULT_HOLD_TIMEOUT,
            require_confirmation: true,
            nbd_tcp: true,
            nbd_unix: false,
            control_socket: true,
        }
    }

    /// Mutual TLS on the link (see [`NodeLink::Tls`]).
    pub fn tls(mut self, site: &str, node: &str) -> NodeSpec {
        self.link = NodeLink::Tls {
            site: site.to_owned(),
            node: node.to_owned(),
        };
        self
    }

    /// Files under `dir` (kept when the node stops).
    pub fn in_dir(mut self, dir: &Path) -> NodeSpec {
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// Starts the node.
    pub async fn start(self) -> Result<ReplicatorNode, NodeError> {
        ReplicatorNode::start(self).await
    }
}

/// Why a [`ReplicatorNode`] could not start, or has no such volume.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A file, directory or socket failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The link's certificates could not be made.
    #[error("making the replication link's certificates: {0}")]
    Certificates(String),
    /// The primary did not start.
    #[error("starting the primary: {0}")]
    Primary(#[from] StartError),
    /// The node serves no such volume.
    #[error("the node serves no volume {0}")]
    NoVolume(String),
}

impl From<LinkTlsError> for NodeError {
    fn from(e: LinkTlsError) -> Self {
        NodeError::Certificates(e.to_string())
    }
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.to_owned();
    move |source| NodeError::Io { what, source }
}

/// The two ends of a mutually authenticated link, as in production: one CA per site; the primary's
/// identity is `node`, the secondary's certificate names `<site>-secondary` and 127.0.0.1 (what the
/// primary dials). Returns (the primary's end, the secondary's end).
pub fn tls_link(site: &str, node: &str) -> Result<(LinkSecurity, LinkSecurity), NodeError> {
    let ca = |name: String| SiteCa::new(&name).map_err(|e| NodeError::Certificates(e.to_string()));
    let primary_site = ca(format!("{site} primary site"))?;
    let secondary_site = ca(format!("{site} secondary site"))?;
    let primary = primary_site.link_tls(node, &[], &secondary_site)?;
    let secondary =
        secondary_site.link_tls(&format!("{site}-secondary"), &["127.0.0.1"], &primary_site)?;
    Ok((LinkSecurity::Tls(primary), LinkSecurity::Tls(secondary)))
}

/// One node's replication, in-process: a primary serving every volume, each copied through its own
/// [`LinkCut`] to the node's secondary. Files: `<dir>/primary/<volume>` and `<dir>/secondary/<volume>`.
/// Dropping it stops everything (and removes a temporary directory).
#[derive(Debug)]
pub struct ReplicatorNode {
    /// The primary (a test may replace it, e.g. to kill and restart the replicator).
    pub primary: Primary,
    /// What the primary was started with (to start it again).
    pub primary_config: PrimaryConfig,
    /// The secondary (the remote site) of every volume.
    pub secondary: Secondary,
    /// How the secondary serves the link (to start it again the same way).
    pub secondary_security: LinkSecurity,
    /// Each volume's link, in spec order.
    pub links: Vec<LinkCut>,
    /// What it runs.
    pub spec: NodeSpec,
    dir: PathBuf,
    _temporary: Option<tempfile::TempDir>,
}

impl ReplicatorNode {
    /// Starts the secondary, one link per volume and the primary.
    pub async fn start(spec: NodeSpec) -> Result<ReplicatorNode, NodeError> {
        let (temporary, dir) = match &spec.dir {
            Some(dir) => (None, dir.clone()),
            None => {
                let temporary =
                    tempfile::tempdir().map_err(io("creating a temporary directory"))?;
                let dir = temporary.path().to_path_buf();
                (Some(temporary), dir)
            }
        };
        std::fs::create_dir_all(dir.join("primary")).map_err(io("creating the primary's dir"))?;
        let (primary_link, secondary_link) = match &spec.link {
            NodeLink::Plaintext => (LinkSecurity::Plaintext, LinkSecurity::Plaintext),
            NodeLink::Tls { site, node } => tls_link(site, node)?,
        };
        let secondary = Secondary::start(SecondaryConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            dir: dir.join("secondary"),
            security: secondary_link.clone(),
        })
        .await
        .map_err(io("starting the secondary"))?;
        let mut links = Vec::new();
        let mut volumes = Vec::new();
        for (name, size) in &spec.volumes {
            let link = LinkCut::start(secondary.local_addr())
                .await
                .map_err(io("starting a link-cut proxy"))?;
            volumes.push(VolumeConfig {
                hold_timeout: spec.hold_timeout,
                require_confirmation: spec.require_confirmation,
                ..VolumeConfig::new(
                    name,
                    dir.join("primary").join(name),
                    Some(*size),
                    Some(CopyConfig {
                        secondary: link.addr().to_string(),
                        timeout: spec.copy_timeout,
                        security: primary_link.clone(),
                    }),
                )
            });
            links.push(link);
        }
        let primary_config = PrimaryConfig {
            volumes,
            nbd_listen: spec.nbd_tcp.then(|| ([127, 0, 0, 1], 0).into()),
            nbd_socket: spec.nbd_unix.then(|| dir.join("nbd.sock")),
            record_latency: false,
            control_socket: spec.control_socket.then(|| dir.join("control.sock")),
        };
        let primary = Primary::start(primary_config.clone()).await?;
        Ok(ReplicatorNode {
            primary,
            primary_config,
            secondary,
            secondary_security: secondary_link,
            links,
            spec,
            dir,
            _temporary: temporary,
        })
    }

    /// The directory holding the node's files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The primary's file of `volume`.
    pub fn primary_file(&self, volume: &str) -> PathBuf {
        self.dir.join("primary").join(volume)
    }

    /// The secondary's file of `volume`.
    pub fn secondary_file(&self, volume: &str) -> PathBuf {
        self.dir.join("secondary").join(volume)
    }

    /// The unix socket of the `Replicator` gRPC service (what a sidecar dials), when served.
    pub fn control_socket(&self) -> Option<PathBuf> {
        self.primary_config.control_socket.clone()
    }

    /// The NBD unix socket, when served.
    pub fn nbd_socket(&self) -> Option<PathBuf> {
        self.primary_config.nbd_socket.clone()
    }

    /// The primary's NBD address over TCP, when served.
    pub fn nbd_addr(&self) -> Option<SocketAddr> {
        self.primary.nbd_addr()
    }

    /// An NBD URL of `volume`: over TCP when served (`nbd://127.0.0.1:PORT/volume`), else over the unix
    /// socket (`nbd+unix:///volume?socket=PATH`).
    pub fn nbd_url(&self, volume: &str) -> Result<String, NodeError> {
        self.index(volume)?;
        match (self.nbd_addr(), self.nbd_socket()) {
            (Some(addr), _) => Ok(format!("nbd://{addr}/{volume}")),
            (None, Some(socket)) => Ok(format!("nbd+unix:///{volume}?socket={}", socket.display())),
            (None, None) => Err(NodeError::Io {
                what: format!("reaching {volume} over NBD"),
                source: std::io::Error::other("the node serves no NBD"),
            }),
        }
    }

    /// The link of `volume`.
    pub fn link(&self, volume: &str) -> Result<&LinkCut, NodeError> {
        Ok(&self.links[self.index(volume)?])
    }

    /// Breaks the link of `volume` the way `mode` says (see [`LinkMode`]).
    pub fn cut(&self, volume: &str, mode: LinkMode) -> Result<(), NodeError> {
        self.link(volume)?.set_mode(mode);
        Ok(())
    }

    /// Heals the link of `volume`.
    pub fn heal(&self, volume: &str) -> Result<(), NodeError> {
        self.cut(volume, LinkMode::Pass)
    }

    fn index(&self, volume: &str) -> Result<usize, NodeError> {
        self.spec
            .volumes
            .iter()
            .position(|(name, _)| name == volume)
            .ok_or_else(|| NodeError::NoVolume(volume.to_owned()))
    }
}
