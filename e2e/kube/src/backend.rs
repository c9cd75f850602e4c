//! One API server for tests, of either kind: the embedded `lockstep-testapi` (starts in milliseconds)
//! or a real kube-apiserver on etcd ([`RealCluster`]). A test written against [`ApiServer`] runs on
//! both; `LOCKSTEP_APISERVER=kube` picks the real one ([`Backend::from_env`]), and then missing
//! binaries are an error, never a skip: the run asked for the real server.
//!
//! Identities are the one place the two differ underneath: the test API server takes a bearer token as
//! the user's name, the real one signs ServiceAccount tokens through TokenRequest (bound to a Pod on a
//! Node where a node's identity is asked for, as a kubelet would mount it).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use lockstep_testapi::TestApiServer;

use crate::{ClusterOptions, KubeBinaries, KubeError, RealCluster};

/// Which API server a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `lockstep-testapi`, in-process.
    Test,
    /// kube-apiserver and etcd, built from source at the pinned version.
    Kube,
}

impl Backend {
    /// `LOCKSTEP_APISERVER`: `kube` for the real server, `test` (or unset) for the test API server.
    pub fn from_env() -> Result<Self, BackendError> {
        match std::env::var("LOCKSTEP_APISERVER").as_deref() {
            Err(_) | Ok("" | "test") => Ok(Self::Test),
            Ok("kube") => Ok(Self::Kube),
            Ok(other) => Err(BackendError::UnknownBackend(other.to_owned())),
        }
    }

    /// How the backend is named in messages and `LOCKSTEP_APISERVER`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Test => "test",
            Self::Kube => "kube",
        }
    }
}

/// What can go wrong starting or using an [`ApiServer`].
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// `LOCKSTEP_APISERVER` names no backend.
    #[error("LOCKSTEP_APISERVER={0:?}: expected \"test\" or \"kube\"")]
    UnknownBackend(String),
    /// The real cluster failed.
    #[error(transparent)]
    Kube(#[from] KubeError),
    /// The test API server failed.
    #[error("test API server: {0}")]
    Test(String),
    /// An identity that is not a ServiceAccount was asked of the real server (it signs in only
    /// ServiceAccounts and its admin).
    #[error("{0:?} is not a ServiceAccount user (system:serviceaccount:NAMESPACE:NAME)")]
    NotAServiceAccount(String),
}

impl From<lockstep_testapi::ServerError> for BackendError {
    fn from(e: lockstep_testapi::ServerError) -> Self {
        test_error(e)
    }
}

fn test_error(e: impl fmt::Display) -> BackendError {
    BackendError::Test(e.to_string())
}

/// An API server of either kind.
pub enum ApiServer {
    /// The test API server.
    Test(TestApiServer),
    /// A real kube-apiserver on etcd, with its audit log on.
    Kube(Box<RealCluster>),
}

impl fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Test(server) => write!(f, "ApiServer::Test({})", server.addr()),
            Self::Kube(cluster) => write!(f, "ApiServer::Kube({})", cluster.url()),
        }
    }
}

impl ApiServer {
    /// Starts an API server of the kind `backend` names, enforcing RBAC (the real server always does;
    /// its admin is in `system:masters`).
    pub async fn start(backend: Backend) -> Result<Self, BackendError> {
        match backend {
            Backend::Test => {
                let options = lockstep_testapi::Options {
                    authorize: true,
                    ..Default::default()
                };
                Ok(Self::Test(
                    TestApiServer::start(options).await.map_err(test_error)?,
                ))
            }
            Backend::Kube => {
                let binaries = KubeBinaries::locate()?;
                let options = ClusterOptions {
                    audit: true,
                    ..ClusterOptions::default()
                };
                Ok(Self::Kube(Box::new(
                    RealCluster::start(&binaries, &options).await?,
                )))
            }
        }
    }

    /// Which kind it is.
    pub fn backend(&self) -> Backend {
        match self {
            Self::Test(_) => Backend::Test,
            Self::Kube(_) => Backend::Kube,
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        match self {
            Self::Test(server) => server.url(),
            Self::Kube(cluster) => cluster.url().to_owned(),
        }
    }

    /// A client with the admin identity.
    pub async fn admin(&self) -> Result<kube::Client, BackendError> {
        match self {
            Self::Test(server) => server.client().await.map_err(test_error),
            Self::Kube(cluster) => Ok(cluster.client()),
        }
    }

    /// The admin's kubeconfig, as YAML (for a Secret another cluster's operator reads).
    pub fn admin_kubeconfig_yaml(&self) -> Result<String, BackendError> {
        match self {
            Self::Test(server) => {
                serde_yaml_ng::to_string(&server.kubeconfig().map_err(test_error)?)
                    .map_err(test_error)
            }
            Self::Kube(cluster) => read(cluster.kubeconfig()),
        }
    }

    /// Writes the admin's kubeconfig to `path` (for kubectl or helm).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), BackendError> {
        match self {
            Self::Test(server) => server.write_kubeconfig(path).map_err(test_error),
            Self::Kube(cluster) => {
                std::fs::copy(cluster.kubeconfig(), path)
                    .map(drop)
                    .map_err(|e| {
                        KubeError::Io {
                            what: format!("writing {}", path.display()),
                            source: e,
                        }
                        .into()
                    })
            }
        }
    }

    /// A client and its kubeconfig (YAML) signed in as `user`, a ServiceAccount
    /// (`system:serviceaccount:NAMESPACE:NAME`) that must exist; with `node`, the identity of that
    /// ServiceAccount in a Pod on `node` (the real server puts the node's name into it).
    pub async fn identity(
        &self,
        user: &str,
        node: Option<&str>,
    ) -> Result<(kube::Client, String), BackendError> {
        match self {
            Self::Test(server) => {
                let client = server.client_as(Some(user)).await.map_err(test_error)?;
                let config = server.kubeconfig_as(Some(user)).map_err(test_error)?;
                Ok((
                    client,
                    serde_yaml_ng::to_string(&config).map_err(test_error)?,
                ))
            }
            Self::Kube(cluster) => {
                let (namespace, name) = user
                    .strip_prefix("system:serviceaccount:")
                    .and_then(|rest| rest.split_once(':'))
                    .ok_or_else(|| BackendError::NotAServiceAccount(user.to_owned()))?;
                let identity = match node {
                    Some(node) => {
                        cluster
                            .service_account_on_node(namespace, name, node)
                            .await?
                    }
                    None => cluster.service_account(namespace, name).await?,
                };
                Ok((identity.client, read(&identity.kubeconfig)?))
            }
        }
    }

    /// Faults: stops the API server (it refuses connections until [`ApiServer::start_again`]).
    pub async fn stop(&self) {
        match self {
            Self::Test(server) => server.stop().await,
            Self::Kube(cluster) => cluster.stop_apiserver(),
        }
    }

    /// Faults: starts a stopped API server again, on the same address and data.
    pub async fn start_again(&self) -> Result<(), BackendError> {
        match self {
            Self::Test(server) => server.restart().await.map_err(test_error),
            Self::Kube(cluster) => Ok(cluster.start_apiserver().await?),
        }
    }

    /// Every request of one of `users` that the RBAC authorizer refused, as its message.
    pub fn denials(&self, users: &[&str]) -> Result<Vec<String>, BackendError> {
        Ok(match self {
            Self::Test(server) => server
                .audit()
                .entries()
                .iter()
                .filter(|entry| !entry.allowed && users.contains(&entry.user.as_str()))
                .map(|entry| entry.attributes.forbidden_message(&entry.user))
                .collect(),
            Self::Kube(cluster) => cluster
                .audit_events()?
                .into_iter()
                .filter(|event| event.forbidden && users.contains(&event.user.as_str()))
                .map(|event| format!("{} {}: {}", event.verb, event.uri, event.reason))
                .collect(),
        })
    }

    /// Every request so far by a client that changes an object, as `verb resource` (`patch
    /// consistencygroups/status`), counted — the API server's own writes (its loopback, e.g. the
    /// `kubernetes` Service's endpoints) and its controllers' excepted: what a component writes while nothing happens (steady state) is read as the difference
    /// of two of these. The test API server keeps the latest 100 000 requests: call
    /// [`ApiServer::forget_requests`] before a window that counts.
    pub fn write_requests(&self) -> Result<BTreeMap<String, u64>, BackendError> {
        let mut counts = BTreeMap::new();
        match self {
            Self::Test(server) => {
                for entry in server.audit().entries() {
                    let a = &entry.attributes;
                    if is_write(a.verb) {
                        let resource = match &a.subresource {
                            Some(sub) => format!("{}/{sub}", a.resource),
                            None => a.resource.clone(),
                        };
                        *counts.entry(format!("{} {resource}", a.verb)).or_default() += 1;
                    }
                }
            }
            Self::Kube(cluster) => {
                for event in cluster.audit_events()? {
                    if is_write(&event.verb) && !is_control_plane(&event.user) {
                        let resource = resource_of(&event.uri);
                        *counts
                            .entry(format!("{} {resource}", event.verb))
                            .or_default() += 1;
                    }
                }
            }
        }
        Ok(counts)
    }

    /// Forgets the requests recorded so far where the server can (the test API server's bounded log);
    /// a real server's audit log only grows, and [`ApiServer::write_requests`] differences still hold.
    pub fn forget_requests(&self) {
        if let Self::Test(server) = self {
            server.audit().clear();
        }
    }

    /// Every user that made a request so far.
    pub fn requesters(&self) -> Result<BTreeSet<String>, BackendError> {
        Ok(match self {
            Self::Test(server) => server
                .audit()
                .entries()
                .iter()
                .map(|entry| entry.user.clone())
                .collect(),
            Self::Kube(cluster) => cluster
                .audit_events()?
                .into_iter()
                .map(|event| event.user)
                .collect(),
        })
    }
}

/// Whether `user` is the API server itself or one of its controllers (not a client under test).
fn is_control_plane(user: &str) -> bool {
    user == "system:apiserver" || user.starts_with("system:kube-")
}

/// Whether a request with this verb changes objects.
fn is_write(verb: &str) -> bool {
    matches!(
        verb,
        "create" | "update" | "patch" | "delete" | "deletecollection"
    )
}

/// The resource (and subresource) a request path names: `/apis/G/V/namespaces/N/R/NAME/SUB` → `R/SUB`.
fn resource_of(uri: &str) -> String {
    let path = uri.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let rest = match segments.first() {
        Some(&"api") => segments.get(2..),
        Some(&"apis") => segments.get(3..),
        _ => None,
    }
    .unwrap_or_default();
    let rest = match rest {
        ["namespaces", _, resource, tail @ ..] => (resource, tail),
        [resource, tail @ ..] => (resource, tail),
        [] => return String::new(),
    };
    match rest {
        (resource, [_, sub, ..]) => format!("{resource}/{sub}"),
        (resource, _) => (*resource).to_owned(),
    }
}

fn read(path: &Path) -> Result<String, BackendError> {
    std::fs::read_to_string(path).map_err(|e| {
        KubeError::Io {
            what: format!("reading {}", path.display()),
            source: e,
        }
        .into()
    })
}

#[cfg(test)]
mod tests {
    use super::resource_of;

    #[test]
    fn a_request_path_names_its_resource_and_subresource() {
        assert_eq!(
            resource_of(
                "/apis/lockstep.dev/v1alpha1/consistencygroups/bench/status?fieldManager=x"
            ),
            "consistencygroups/status"
        );
        assert_eq!(
            resource_of("/apis/coordination.k8s.io/v1/namespaces/lockstep/leases/node-0"),
            "leases"
        );
        assert_eq!(resource_of("/api/v1/namespaces/apps/events"), "events");
        assert_eq!(resource_of("/api/v1/namespaces"), "namespaces");
        assert_eq!(resource_of("/healthz"), "");
    }
}
