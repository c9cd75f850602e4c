//! [`TestApiServer`]: a running server on a loopback port — start, stop, start again on the same port,
//! refuse connections, reach its fault hooks, and get a kubeconfig or a `kube::Client` for it.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::authz::AuditLog;
use crate::error::ServerError;
use crate::faults::Faults;
use crate::http::{Shared, serve};
use crate::store::Store;

/// How to start a server.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Port on 127.0.0.1; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Keep objects here across restarts (durable mode); in memory when absent.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// How many changes are kept for watches to resume from; older resourceVersions get 410 Gone.
    #[arg(long, default_value_t = 10_000)]
    pub history: usize,
    /// Interval between BOOKMARK events on watches that allow them, in milliseconds.
    #[arg(long, default_value_t = 1_000)]
    pub bookmark_interval_ms: u64,
    /// Enforce RBAC: refuse (403) what the stored Roles, ClusterRoles and bindings do not allow. Bearer
    /// tokens name users (see [`crate::authz`]); requests without one are the administrator.
    #[arg(long)]
    pub authorize: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            port: 0,
            data_dir: None,
            history: 10_000,
            bookmark_interval_ms: 1_000,
            authorize: false,
        }
    }
}

struct Running {
    accept: JoinHandle<()>,
    ticker: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Running {
    /// Closes the listener and every open connection (watches included), and returns once they are
    /// closed: no request is answered after this.
    async fn shut_down(self) {
        let _ = self.stop.send(true);
        self.ticker.abort();
        let _ = self.accept.await;
    }

    fn abort(&self) {
        self.accept.abort();
        self.ticker.abort();
    }
}

/// A test API server on a loopback port. Dropping it stops it.
pub struct TestApiServer {
    addr: SocketAddr,
    options: Options,
    faults: Arc<Faults>,
    audit: Arc<AuditLog>,
    store: Mutex<Option<Arc<Store>>>,
    running: Mutex<Option<Running>>,
}

impl std::fmt::Debug for TestApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestApiServer")
            .field("addr", &self.addr)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    let err = |source| ServerError::Bind { addr, source };
    let socket = TcpSocket::new_v4().map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |req| serve(shared.clone(), req));
                        if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                            tracing::debug!(error = %e, "connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    // Every connection, watches included, is cut and gone before `stop` returns.
    connections.shutdown().await;
}

impl TestApiServer {
    /// Starts a server. In durable mode (`data_dir`), objects and resourceVersions are loaded from there.
    pub async fn start(options: Options) -> Result<Self, ServerError> {
        let listener = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, options.port)))?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, options.port)),
            source,
        })?;
        let server = Self {
            addr,
            options,
            faults: Arc::new(Faults::default()),
            audit: Arc::new(AuditLog::default()),
            store: Mutex::new(None),
            running: Mutex::new(None),
        };
        server.launch(listener)?;
        tracing::info!(url = %server.url(), "test API server started");
        Ok(server)
    }

    fn launch(&self, listener: TcpListener) -> Result<(), ServerError> {
        let store = {
            let mut slot = self.store.lock().unwrap_or_else(|e| e.into_inner());
            match slot.as_ref() {
                Some(s) => s.clone(),
                None => {
                    let s = Arc::new(Store::open(
                        self.options.data_dir.as_deref(),
                        self.options.history,
                        &crate::now(),
                    )?);
                    *slot = Some(s.clone());
                    s
                }
            }
        };
        let shared = Arc::new(Shared {
            store: store.clone(),
            faults: self.faults.clone(),
            address: self.addr.to_string(),
            authorize: self.options.authorize,
            audit: self.audit.clone(),
        });
        let interval = Duration::from_millis(self.options.bookmark_interval_ms.max(10));
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                store.lock().tick();
            }
        });
        let (stop, stopped) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, shared, stopped));
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = running.replace(Running {
            accept,
            ticker,
            stop,
        }) {
            old.abort();
        }
        Ok(())
    }

    fn take_running(&self) -> Option<Running> {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Stops at once, without waiting for the connections to close (for `Drop`).
    fn halt(&self) {
        if let Some(running) = self.take_running() {
            running.abort();
        }
    }

    /// Stops the server: the listener closes (new connections are refused) and every open connection and
    /// watch is cut. In durable mode the in-memory state is dropped too, and [`restart`](Self::restart)
    /// reloads it from the data directory; in memory mode the state is kept, like an API server whose
    /// etcd survived.
    pub async fn stop(&self) {
        if let Some(running) = self.take_running() {
            running.shut_down().await;
            if self.options.data_dir.is_some() {
                *self.store.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            tracing::info!(url = %self.url(), "test API server stopped");
        }
    }

    /// Starts a stopped server again on the same port (stopping it first if it runs).
    pub async fn restart(&self) -> Result<(), ServerError> {
        self.stop().await;
        let listener = bind(self.addr)?;
        self.launch(listener)?;
        tracing::info!(url = %self.url(), "test API server restarted");
        Ok(())
    }

    /// Closes the listener and every connection but keeps the state, so connecting is refused until
    /// [`accept_connections`](Self::accept_connections).
    pub async fn refuse_connections(&self) {
        if let Some(running) = self.take_running() {
            running.shut_down().await;
        }
    }

    /// Listens again after [`refuse_connections`](Self::refuse_connections) (a no-op if listening).
    pub async fn accept_connections(&self) -> Result<(), ServerError> {
        if self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return Ok(());
        }
        let listener = bind(self.addr)?;
        self.launch(listener)
    }

    /// Whether the server is listening.
    pub fn is_running(&self) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The fault switches.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Every resource request so far, with who asked and whether RBAC allows it.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The latest resourceVersion committed (None while stopped in durable mode).
    pub fn resource_version(&self) -> Option<u64> {
        let store = self.store.lock().unwrap_or_else(|e| e.into_inner()).clone();
        store.map(|s| s.lock().rv())
    }

    /// A kubeconfig with one cluster, context and (credential-less) user, all named `lockstep-testapi`,
    /// namespace `default`: the administrator.
    pub fn kubeconfig(&self) -> Result<kube::config::Kubeconfig, ServerError> {
        self.kubeconfig_as(None)
    }

    /// Like [`kubeconfig`](Self::kubeconfig), authenticating as `user` with a bearer token (see
    /// [`crate::authz`]: `system:serviceaccount:<namespace>:<name>` is that ServiceAccount).
    pub fn kubeconfig_as(
        &self,
        user: Option<&str>,
    ) -> Result<kube::config::Kubeconfig, ServerError> {
        serde_json::from_value(self.kubeconfig_json(user))
            .map_err(|e| ServerError::Kubeconfig(e.to_string()))
    }

    fn kubeconfig_json(&self, user: Option<&str>) -> serde_json::Value {
        let name = "lockstep-testapi";
        let credentials = match user {
            Some(token) => json!({"token": token}),
            None => json!({}),
        };
        json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": name, "cluster": {"server": self.url()}}],
            "users": [{"name": name, "user": credentials}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": "default"}}],
            "current-context": name,
            "preferences": {},
        })
    }

    /// Writes the kubeconfig as YAML to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), ServerError> {
        let yaml = serde_yaml_ng::to_string(&self.kubeconfig_json(None))
            .map_err(|e| ServerError::Kubeconfig(e.to_string()))?;
        std::fs::write(path, yaml).map_err(|source| ServerError::Storage {
            path: path.to_path_buf(),
            source,
        })
    }

    /// A `kube::Client` for this server, built from its kubeconfig.
    pub async fn client(&self) -> Result<kube::Client, ServerError> {
        self.client_as(None).await
    }

    /// A `kube::Client` authenticating as `user` (see [`kubeconfig_as`](Self::kubeconfig_as)).
    pub async fn client_as(&self, user: Option<&str>) -> Result<kube::Client, ServerError> {
        let config = kube::Config::from_custom_kubeconfig(
            self.kubeconfig_as(user)?,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .map_err(|e| ServerError::Kubeconfig(e.to_string()))?;
        kube::Client::try_from(config).map_err(|e| ServerError::Kubeconfig(e.to_string()))
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.halt();
    }
}
