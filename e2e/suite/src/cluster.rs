//! A simulated member cluster: one test API server with Lockstep's CRDs installed, a namespace, one
//! node, and for each volume a real replicated volume — served over NBD by a replicator primary, copied
//! synchronously to a replicator secondary through a link-cut proxy — with the PersistentVolume and bound
//! PersistentVolumeClaim that name it, as a CSI driver would have created them.
//!
//! ```text
//!  workload ──NBD (unix socket)──▶ primary ──▶ LinkCut (one per volume) ──▶ secondary ──▶ <dir>/secondary/<handle>
//!                                  <dir>/primary/<handle>
//! ```
//!
//! Everything runs in this process, on loopback ports and under one directory; dropping the cluster stops
//! it. The primary serves every volume of the cluster, as one node's replicator does: the node is the
//! shared fixture `lockstep_replicator::testing::ReplicatorNode`, its link over mutual TLS.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, Patch, PatchParams, PostParams};
use lockstep_checker::{NbdAddress, Source};
use lockstep_kube::backend::{ApiServer, Backend, BackendError};
use lockstep_replicator::linkcut::LinkCut;
use lockstep_replicator::secondary::Secondary;
use lockstep_replicator::testing::{NodeLink, NodeSpec, ReplicatorNode};
use lockstep_replicator::{Primary, PrimaryConfig, VolumeStatus};
use lockstep_testapi::TestApiServer;
use serde_json::json;

use crate::kubectl::Kubectl;
use crate::timeline::Timeline;

/// The CSI driver the simulated PersistentVolumes name.
pub const CSI_DRIVER: &str = "nbd.lockstep.dev";
/// The StorageClass the simulated claims and volumes name.
pub const STORAGE_CLASS: &str = "lockstep-nbd";
/// How long start-up steps (CRDs established, objects created) may take.
const STARTUP_DEADLINE: Duration = Duration::from_secs(30);

/// Why a simulated cluster could not be built or driven.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The cluster's API server (test or real, started by the suite) failed.
    #[error("{cluster}: API server: {source}")]
    ApiServer {
        /// The cluster.
        cluster: String,
        /// Why.
        source: Box<BackendError>,
    },
    /// A Kubernetes request failed.
    #[error("{cluster}: {what}: {source}")]
    Kube {
        /// The cluster.
        cluster: String,
        /// What was being done.
        what: String,
        /// Why.
        source: kube::Error,
    },
    /// The node's replication (primary, secondary, links) could not start.
    #[error("{cluster}: replicator: {source}")]
    Replicator {
        /// The cluster.
        cluster: String,
        /// Why.
        source: lockstep_replicator::testing::NodeError,
    },
    /// Lockstep's CRDs could not be installed.
    #[error("{cluster}: {source}")]
    Crds {
        /// The cluster.
        cluster: String,
        /// Why.
        source: lockstep_kube::crds::CrdError,
    },
    /// A file or socket failed.
    #[error("{cluster}: {what}: {source}")]
    Io {
        /// The cluster.
        cluster: String,
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A Kubernetes object could not be built (a bug in this crate).
    #[error("{cluster}: building {what}: {source}")]
    Object {
        /// The cluster.
        cluster: String,
        /// The object.
        what: String,
        /// Why.
        source: serde_json::Error,
    },
    /// Something did not happen in time.
    #[error("{cluster}: {what} did not happen within {within:?}")]
    Timeout {
        /// The cluster.
        cluster: String,
        /// What was waited for.
        what: String,
        /// How long.
        within: Duration,
    },
    /// A kubectl command failed.
    #[error(transparent)]
    Kubectl(#[from] crate::kubectl::KubectlError),
    /// A kubeconfig of a real cluster could not be used.
    #[error("{cluster}: kubeconfig {path}: {why}")]
    Kubeconfig {
        /// The cluster.
        cluster: String,
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The fault needs control of the cluster's API server, and this one is a real cluster's.
    #[error("{cluster}: its API server is a real cluster's, which this suite cannot stop or start")]
    NotControllable {
        /// The cluster.
        cluster: String,
    },
    /// A volume name that the cluster does not have.
    #[error("{cluster}: no volume {volume}")]
    NoVolume {
        /// The cluster.
        cluster: String,
        /// The volume.
        volume: String,
    },
}

/// One volume of a simulated cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// The PersistentVolumeClaim's name.
    pub pvc: String,
    /// The CSI volume handle: the replicator's export name and the secondary's file name.
    pub handle: String,
    /// Size in bytes (a multiple of 1 MiB).
    pub size: u64,
    /// Labels of the claim (for groups that select their claims).
    pub labels: BTreeMap<String, String>,
}

impl VolumeSpec {
    /// A volume of `size` bytes whose claim is `pvc`, with handle `<cluster>-<pvc>`.
    pub fn new(cluster: &str, pvc: &str, size: u64) -> Self {
        Self {
            pvc: pvc.to_owned(),
            handle: format!("{cluster}-{pvc}"),
            size,
            labels: BTreeMap::new(),
        }
    }

    /// Adds a label to the claim.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }
}

/// Where a cluster's API server comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ApiSource {
    /// A test API server started for the cluster (and stopped with it).
    #[default]
    TestServer,
    /// A real kube-apiserver on etcd started for the cluster (built from source at the pinned version;
    /// stopped with it).
    RealServer,
    /// A running cluster's API server, reached with this kubeconfig; the suite creates its objects
    /// there (CRDs kept when present) and never stops it.
    Kubeconfig(PathBuf),
}

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// The cluster's name (also its MemberCluster's name in the hub).
    pub name: String,
    /// The namespace of the claims.
    pub namespace: String,
    /// The one node serving the volumes.
    pub node: String,
    /// The volumes.
    pub volumes: Vec<VolumeSpec>,
    /// How long a write may wait for its secondary's acknowledgement before the copy counts as failed.
    pub copy_timeout: Duration,
    /// How long a held write may wait before it fails, until the volume is configured with its group's.
    pub hold_timeout: Duration,
    /// Its API server.
    pub api_source: ApiSource,
}

impl ClusterSpec {
    /// A cluster `name` with namespace `namespace`, node `<name>-node-1`, no volumes yet, a 2 s copy
    /// timeout and the replicator's default hold timeout.
    pub fn new(name: &str, namespace: &str) -> Self {
        Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            node: format!("{name}-node-1"),
            volumes: Vec::new(),
            copy_timeout: Duration::from_secs(2),
            hold_timeout: lockstep_replicator::DEFAULT_HOLD_TIMEOUT,
            api_source: ApiSource::TestServer,
        }
    }

    /// Adds a volume.
    pub fn volume(mut self, volume: VolumeSpec) -> Self {
        self.volumes.push(volume);
        self
    }
}

/// A running replicated volume.
#[derive(Debug)]
pub struct SimVolume {
    /// What it is.
    pub spec: VolumeSpec,
    /// The primary's backing file.
    pub primary_path: PathBuf,
    /// The secondary's file.
    pub secondary_path: PathBuf,
    /// Where applications reach it over NBD.
    pub nbd: NbdAddress,
    /// The replication link between the primary and the secondary (the fault injection point).
    pub link: LinkCut,
}

impl SimVolume {
    /// The primary's data, for comparisons.
    pub fn primary_source(&self) -> Source {
        Source::File(self.primary_path.clone())
    }

    /// The secondary's data, for the checker.
    pub fn secondary_source(&self) -> Source {
        Source::File(self.secondary_path.clone())
    }
}

/// A running simulated cluster. Dropping it stops everything it started.
pub struct SimCluster {
    /// What it was built from.
    pub spec: ClusterSpec,
    /// Its API server when the suite started it (test or real); `None` for a running cluster's
    /// ([`ApiSource::Kubeconfig`]).
    pub api: Option<ApiServer>,
    /// Its API server's URL.
    pub api_url: String,
    /// A client of its API server.
    pub client: kube::Client,
    /// A kubeconfig file for its API server (for kubectl and the operator).
    pub kubeconfig: PathBuf,
    /// The node's replicator primary, serving every volume.
    pub primary: Primary,
    /// What the primary was started with (to start it again after a kill).
    pub primary_config: PrimaryConfig,
    /// The replicator secondary (the remote site) of every volume.
    pub secondary: Secondary,
    /// How the secondary serves the replication link (to start it again the same way).
    pub secondary_security: lockstep_replicator::LinkSecurity,
    /// The unix socket of the node replicator's `Replicator` gRPC service (what the node's sidecar
    /// dials).
    pub control_socket: Option<PathBuf>,
    /// The volumes, in spec order.
    pub volumes: Vec<SimVolume>,
    /// The directory holding its files.
    pub dir: PathBuf,
}

impl std::fmt::Debug for SimCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimCluster")
            .field("spec", &self.spec)
            .field("api", &self.api)
            .field("primary", &self.primary)
            .field("volumes", &self.volumes)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl SimCluster {
    /// Starts the API server (CRDs established, namespace, node), the secondary, one link per volume, the
    /// primary, and creates each volume's PersistentVolume and bound claim. Files go under `dir`.
    pub async fn start(
        spec: ClusterSpec,
        dir: &Path,
        timeline: &Timeline,
    ) -> Result<SimCluster, ClusterError> {
        Self::start_with(spec, dir, None, timeline).await
    }

    /// [`SimCluster::start`], with Lockstep's CRDs applied by the real `kubectl` when one is given
    /// (`kubectl apply -f crds/…` and `kubectl wait` until Established), as a person installs them.
    pub async fn start_with(
        spec: ClusterSpec,
        dir: &Path,
        kubectl: Option<&Kubectl>,
        timeline: &Timeline,
    ) -> Result<SimCluster, ClusterError> {
        let name = spec.name.clone();
        let io = |what: &str| {
            let cluster = name.clone();
            let what = what.to_owned();
            move |source| ClusterError::Io {
                cluster,
                what,
                source,
            }
        };
        let api_err = |source: BackendError| ClusterError::ApiServer {
            cluster: name.clone(),
            source: Box::new(source),
        };
        std::fs::create_dir_all(dir.join("primary")).map_err(io("creating the primary dir"))?;

        let (api, client, kubeconfig, api_url) = match &spec.api_source {
            ApiSource::TestServer => {
                let api = TestApiServer::start(lockstep_testapi::Options::default())
                    .await
                    .map_err(|e| api_err(e.into()))?;
                let client = api.client().await.map_err(|e| api_err(e.into()))?;
                let kubeconfig = dir.join("kubeconfig");
                api.write_kubeconfig(&kubeconfig)
                    .map_err(|e| api_err(e.into()))?;
                timeline.say(format!("{name}: API server up at {}", api.url()));
                let url = api.url();
                (Some(ApiServer::Test(api)), client, kubeconfig, url)
            }
            ApiSource::RealServer => {
                let api = ApiServer::start(Backend::Kube).await.map_err(api_err)?;
                let client = api.admin().await.map_err(api_err)?;
                let kubeconfig = dir.join("kubeconfig");
                api.write_kubeconfig(&kubeconfig).map_err(api_err)?;
                let url = api.url();
                let version = client
                    .apiserver_version()
                    .await
                    .map(|v| v.git_version)
                    .unwrap_or_else(|e| format!("(version unknown: {e})"));
                timeline.say(format!(
                    "{name}: kube-apiserver {version} on etcd up at {url}"
                ));
                (Some(api), client, kubeconfig, url)
            }
            ApiSource::Kubeconfig(path) => {
                let (client, url) = connect(&name, path).await?;
                timeline.say(format!(
                    "{name}: real cluster at {url} (kubeconfig {})",
                    path.display()
                ));
                (None, client, path.clone(), url)
            }
        };

        match kubectl {
            Some(kubectl) => apply_crds(&name, &kubeconfig, kubectl, timeline).await?,
            None => {
                install_crds(&name, &client).await?;
                timeline.say(format!(
                    "{name}: CRDs installed and Established: {}",
                    lockstep_api::crds::all()
                        .iter()
                        .map(|c| c.spec.names.plural.clone())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        create(&name, &client, namespace_object(&spec.namespace)).await?;
        if api.is_some() {
            // A real cluster has its nodes; the simulated node exists only in a test API server.
            create(&name, &client, node_object(&spec.node)).await?;
        }

        // The replication link is secured as in production: mutual TLS with one CA per site (made
        // here, once per cluster); the primary's identity is its node's name.
        let node = NodeSpec {
            volumes: spec
                .volumes
                .iter()
                .map(|v| (v.handle.clone(), v.size))
                .collect(),
            dir: Some(dir.to_path_buf()),
            link: NodeLink::Tls {
                site: name.clone(),
                node: spec.node.clone(),
            },
            copy_timeout: spec.copy_timeout,
            hold_timeout: spec.hold_timeout,
            require_confirmation: false,
            nbd_tcp: false,
            nbd_unix: true,
            control_socket: true,
        }
        .start()
        .await
        .map_err(|source| ClusterError::Replicator {
            cluster: name.clone(),
            source,
        })?;
        let socket = node.nbd_socket().unwrap_or_default();
        let control_socket = node.control_socket();
        let primary_files: Vec<PathBuf> = spec
            .volumes
            .iter()
            .map(|v| node.primary_file(&v.handle))
            .collect();
        let secondary_files: Vec<PathBuf> = spec
            .volumes
            .iter()
            .map(|v| node.secondary_file(&v.handle))
            .collect();
        let ReplicatorNode {
            primary,
            primary_config,
            secondary,
            secondary_security,
            links,
            ..
        } = node;
        timeline.say(format!(
            "{name}: replicator on {} serving {} over NBD at {}; secondary (remote site) at {}, over mutual TLS (per-site CAs)",
            spec.node,
            spec.volumes
                .iter()
                .map(|v| v.handle.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            socket.display(),
            secondary.local_addr()
        ));

        let mut volumes = Vec::new();
        let files = primary_files.into_iter().zip(secondary_files);
        for ((v, link), (primary_path, secondary_path)) in spec.volumes.iter().zip(links).zip(files)
        {
            create_bound_claim(&name, &client, &spec, v).await?;
            timeline.say(format!(
                "{name}: pvc {}/{} bound to pv pv-{} (csi {CSI_DRIVER}, volumeHandle {}), {} MiB, copied through link {} -> {}",
                spec.namespace,
                v.pvc,
                v.handle,
                v.handle,
                v.size >> 20,
                link.addr(),
                secondary.local_addr()
            ));
            volumes.push(SimVolume {
                spec: v.clone(),
                primary_path,
                secondary_path,
                nbd: NbdAddress::Unix {
                    socket: socket.clone(),
                    export: v.handle.clone(),
                },
                link,
            });
        }
        Ok(SimCluster {
            spec,
            api,
            api_url,
            client,
            kubeconfig,
            primary,
            primary_config,
            secondary,
            secondary_security,
            control_socket,
            volumes,
            dir: dir.to_path_buf(),
        })
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The volume with handle `handle`.
    pub fn volume(&self, handle: &str) -> Result<&SimVolume, ClusterError> {
        self.volumes
            .iter()
            .find(|v| v.spec.handle == handle)
            .ok_or_else(|| ClusterError::NoVolume {
                cluster: self.spec.name.clone(),
                volume: handle.to_owned(),
            })
    }

    /// The primary's volume `handle`.
    pub fn replicated_volume(
        &self,
        handle: &str,
    ) -> Result<&std::sync::Arc<lockstep_replicator::Volume>, ClusterError> {
        self.primary
            .volume(handle)
            .ok_or_else(|| ClusterError::NoVolume {
                cluster: self.spec.name.clone(),
                volume: handle.to_owned(),
            })
    }

    /// The replication state of volume `handle`, as the primary sees it.
    pub fn volume_status(&self, handle: &str) -> Result<VolumeStatus, ClusterError> {
        self.primary
            .volume(handle)
            .map(|v| v.status())
            .ok_or_else(|| ClusterError::NoVolume {
                cluster: self.spec.name.clone(),
                volume: handle.to_owned(),
            })
    }
}

/// A client of the cluster `kubeconfig` names, and its API server's URL.
async fn connect(cluster: &str, kubeconfig: &Path) -> Result<(kube::Client, String), ClusterError> {
    let failed = |why: String| ClusterError::Kubeconfig {
        cluster: cluster.to_owned(),
        path: kubeconfig.to_path_buf(),
        why,
    };
    let file =
        kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| failed(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .map_err(|e| failed(e.to_string()))?;
    let url = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).map_err(|e| failed(e.to_string()))?;
    Ok((client, url))
}

fn kube_err(cluster: &str, what: impl Into<String>) -> impl FnOnce(kube::Error) -> ClusterError {
    let (cluster, what) = (cluster.to_owned(), what.into());
    move |source| ClusterError::Kube {
        cluster,
        what,
        source,
    }
}

/// Creates every Lockstep CRD (an existing one is kept) and waits until each is Established.
pub async fn install_crds(cluster: &str, client: &kube::Client) -> Result<(), ClusterError> {
    lockstep_kube::crds::install_crds(client)
        .await
        .map_err(|source| ClusterError::Crds {
            cluster: cluster.to_owned(),
            source,
        })
}

/// The repository's generated CRD manifests, as paths from the repository's root.
pub fn crd_manifests() -> Vec<String> {
    lockstep_api::crds::all()
        .iter()
        .map(|c| format!("crds/lockstep.dev_{}.yaml", c.spec.names.plural))
        .collect()
}

/// Applies the repository's CRD manifests with kubectl and waits until every CRD is Established.
async fn apply_crds(
    cluster: &str,
    kubeconfig: &Path,
    kubectl: &Kubectl,
    timeline: &Timeline,
) -> Result<(), ClusterError> {
    let manifests = crd_manifests();
    let mut args = vec!["apply"];
    for m in &manifests {
        args.extend(["-f", m.as_str()]);
    }
    kubectl.run(cluster, kubeconfig, &args, timeline).await?;
    let wait = "--for=condition=Established";
    let within = format!("--timeout={}s", STARTUP_DEADLINE.as_secs());
    kubectl
        .run(
            cluster,
            kubeconfig,
            &["wait", wait, "crd", "--all", &within],
            timeline,
        )
        .await?;
    Ok(())
}

/// Creates a cluster-scoped object.
async fn create<K>(
    cluster: &str,
    client: &kube::Client,
    object: Result<K, serde_json::Error>,
) -> Result<K, ClusterError>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    let object = object.map_err(|source| ClusterError::Object {
        cluster: cluster.to_owned(),
        what: K::kind(&()).into_owned(),
        source,
    })?;
    let name = object.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::all(client.clone());
    api.create(&PostParams::default(), &object)
        .await
        .map_err(kube_err(
            cluster,
            format!("creating {} {name}", K::kind(&())),
        ))
}

fn namespace_object(name: &str) -> Result<Namespace, serde_json::Error> {
    serde_json::from_value(json!({"metadata": {"name": name}}))
}

fn node_object(name: &str) -> Result<Node, serde_json::Error> {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
    }))
}

/// Creates the volume's PersistentVolume and its claim, and marks both Bound, as the CSI provisioner
/// and the PV controller would.
async fn create_bound_claim(
    cluster: &str,
    client: &kube::Client,
    spec: &ClusterSpec,
    v: &VolumeSpec,
) -> Result<(), ClusterError> {
    let size = format!("{}Mi", v.size >> 20);
    let pv_name = format!("pv-{}", v.handle);
    let pv: Result<PersistentVolume, _> = serde_json::from_value(json!({
        "metadata": {"name": pv_name},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": STORAGE_CLASS,
            "csi": {"driver": CSI_DRIVER, "volumeHandle": v.handle},
            "claimRef": {
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "namespace": spec.namespace, "name": v.pvc,
            },
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [spec.node]},
            ]}]}},
        },
    }));
    create(cluster, client, pv).await?;
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": v.pvc, "namespace": spec.namespace, "labels": v.labels},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": STORAGE_CLASS,
            "resources": {"requests": {"storage": size}},
            "volumeName": pv_name,
        },
    }))
    .map_err(|source| ClusterError::Object {
        cluster: cluster.to_owned(),
        what: "PersistentVolumeClaim".into(),
        source,
    })?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &spec.namespace);
    claims
        .create(&PostParams::default(), &pvc)
        .await
        .map_err(kube_err(cluster, format!("creating pvc {}", v.pvc)))?;
    let bound = Patch::Merge(json!({"status": {"phase": "Bound"}}));
    let pp = PatchParams::default();
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    volumes
        .patch_status(&pv_name, &pp, &bound)
        .await
        .map_err(kube_err(cluster, format!("binding pv {pv_name}")))?;
    let claim_bound = Patch::Merge(json!({"status": {
        "phase": "Bound",
        "accessModes": ["ReadWriteOnce"],
        "capacity": {"storage": size},
    }}));
    claims
        .patch_status(&v.pvc, &pp, &claim_bound)
        .await
        .map_err(kube_err(cluster, format!("binding pvc {}", v.pvc)))?;
    Ok(())
}
