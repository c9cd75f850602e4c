//! [`World`]: several simulated clusters, the first of them the hub, with Lockstep's objects applied in
//! the hub — one `MemberCluster` per cluster (and the Secret holding each remote member's kubeconfig) and
//! a `ConsistencyGroup` over their volumes.
//!
//! The default world is the repository's own example: `examples/consistencygroup-two-cluster.yaml`
//! (group `orders-db`: east's `postgres-wal` and `postgres-data` by name, west's reporting volume by
//! label), with east as the hub (`examples/membercluster-hub.yaml`) and west reached by both paths
//! (`examples/membercluster-both.yaml`). [`WorldSpec::sized`] generates larger worlds of the same shape.
//!
//! [`World::start_with_kubectl`] applies the CRDs, MemberClusters, kubeconfig Secrets and the group with
//! the real `kubectl`, as a person would (the repository's example files where the world is the example,
//! else manifests written into the world's directory); [`World::start`] creates them with kube-rs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use lockstep_api::v1alpha1::{ConsistencyGroup, MemberCluster};
use serde_json::json;

use crate::cluster::{ClusterError, ClusterSpec, SimCluster, SimVolume, VolumeSpec};
use crate::kubectl::{self, Kubectl, KubectlError};
use crate::timeline::Timeline;

/// The example group the demo applies.
pub const EXAMPLE_GROUP: &str = include_str!("../../../examples/consistencygroup-two-cluster.yaml");
/// The example MemberCluster of the hub.
pub const EXAMPLE_HUB_MEMBER: &str = include_str!("../../../examples/membercluster-hub.yaml");
/// The example MemberCluster of a member reached by both paths.
pub const EXAMPLE_REMOTE_MEMBER: &str = include_str!("../../../examples/membercluster-both.yaml");

/// Why a world could not be built or read.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    /// A cluster failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// An embedded manifest does not parse.
    #[error("manifest {what}: {source}")]
    Manifest {
        /// Which.
        what: &'static str,
        /// Why.
        source: serde_yaml_ng::Error,
    },
    /// The temporary directory could not be made.
    #[error("temporary directory: {0}")]
    TempDir(std::io::Error),
    /// A world needs at least one cluster.
    #[error("a world needs at least one cluster")]
    NoClusters,
    /// A kubectl command failed.
    #[error(transparent)]
    Kubectl(#[from] KubectlError),
    /// A manifest could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A generated world was asked for with an impossible shape.
    #[error("a world needs 2 to {max} clusters and at least one volume per cluster (asked: {clusters} clusters, {volumes} volumes)", max = CLUSTER_NAMES.len())]
    Shape {
        /// Clusters asked for.
        clusters: usize,
        /// Volumes asked for, in total.
        volumes: usize,
    },
    /// The group has no UID after it was created.
    #[error("consistency group {0} has no uid")]
    NoUid(String),
}

/// The names of generated clusters, in order; the first is the hub.
pub const CLUSTER_NAMES: [&str; 8] = [
    "east", "west", "north", "south", "central", "coast", "inland", "metro",
];
/// The example's number of clusters.
pub const EXAMPLE_CLUSTERS: usize = 2;
/// The example's number of volumes, in total.
pub const EXAMPLE_VOLUMES: usize = 3;
/// The example files the demo applies, as paths from the repository's root, with their text.
pub const EXAMPLE_FILES: [(&str, &str); 3] = [
    ("examples/membercluster-hub.yaml", EXAMPLE_HUB_MEMBER),
    ("examples/membercluster-both.yaml", EXAMPLE_REMOTE_MEMBER),
    ("examples/consistencygroup-two-cluster.yaml", EXAMPLE_GROUP),
];
/// Lockstep's namespace in the hub, where remote members' kubeconfig Secrets live.
const LOCKSTEP_NAMESPACE: &str = "lockstep";

/// What to build.
#[derive(Debug, Clone)]
pub struct WorldSpec {
    /// The clusters; the first is the hub.
    pub clusters: Vec<ClusterSpec>,
    /// The MemberClusters to apply in the hub. A remote member's `kubeconfigSecretRef` gets a Secret
    /// with that cluster's kubeconfig.
    pub member_clusters: Vec<MemberCluster>,
    /// The group to apply in the hub.
    pub group: ConsistencyGroup,
}

impl WorldSpec {
    /// The repository's example: east (hub) with `orders/postgres-wal` and `orders/postgres-data`, west
    /// with `orders/reporting` labelled `app.kubernetes.io/name=orders-reporting`; volumes of `size`
    /// bytes.
    pub fn example(size: u64) -> Result<WorldSpec, WorldError> {
        let parse_mc = |what, text| {
            serde_yaml_ng::from_str::<MemberCluster>(text)
                .map_err(|source| WorldError::Manifest { what, source })
        };
        let group =
            serde_yaml_ng::from_str::<ConsistencyGroup>(EXAMPLE_GROUP).map_err(|source| {
                WorldError::Manifest {
                    what: "consistencygroup-two-cluster.yaml",
                    source,
                }
            })?;
        Ok(WorldSpec {
            clusters: vec![
                ClusterSpec::new("east", "orders")
                    .volume(VolumeSpec::new("east", "postgres-wal", size))
                    .volume(VolumeSpec::new("east", "postgres-data", size)),
                ClusterSpec::new("west", "orders").volume(
                    VolumeSpec::new("west", "reporting", size)
                        .label("app.kubernetes.io/name", "orders-reporting"),
                ),
            ],
            member_clusters: vec![
                parse_mc("membercluster-hub.yaml", EXAMPLE_HUB_MEMBER)?,
                parse_mc("membercluster-both.yaml", EXAMPLE_REMOTE_MEMBER)?,
            ],
            group,
        })
    }
}

impl WorldSpec {
    /// The example ([`WorldSpec::example`]) for 2 clusters and 3 volumes; otherwise a generated world
    /// of the same shape: clusters named from [`CLUSTER_NAMES`] (the first the hub, every other reached by
    /// both paths with its kubeconfig in a Secret), `volumes` spread over them as evenly as they go —
    /// claims `orders/vol-N`, handles `<cluster>-vol-N` — and one FreezeAndGo group `orders-db` over all.
    pub fn sized(clusters: usize, volumes: usize, size: u64) -> Result<WorldSpec, WorldError> {
        if (clusters, volumes) == (EXAMPLE_CLUSTERS, EXAMPLE_VOLUMES) {
            return Self::example(size);
        }
        if !(2..=CLUSTER_NAMES.len()).contains(&clusters) || volumes < clusters {
            return Err(WorldError::Shape { clusters, volumes });
        }
        let namespace = "orders";
        let mut cluster_specs = Vec::new();
        let mut member_clusters = Vec::new();
        let mut members = Vec::new();
        for (i, name) in CLUSTER_NAMES.iter().take(clusters).enumerate() {
            let count = volumes / clusters + usize::from(i < volumes % clusters);
            let pvcs: Vec<String> = (1..=count).map(|n| format!("vol-{n}")).collect();
            let mut spec = ClusterSpec::new(name, namespace);
            for pvc in &pvcs {
                spec = spec.volume(VolumeSpec::new(name, pvc, size));
            }
            cluster_specs.push(spec);
            let paths = if i == 0 {
                json!({"local": true, "paths": "Both", "network": format!("dc-{name}")})
            } else {
                json!({"paths": "Both", "network": format!("dc-{name}"), "kubeconfigSecretRef": {
                    "namespace": LOCKSTEP_NAMESPACE, "name": format!("{name}-kubeconfig"), "key": "kubeconfig",
                }})
            };
            member_clusters.push(from_json(
                "a generated MemberCluster",
                json!({"apiVersion": "lockstep.dev/v1alpha1", "kind": "MemberCluster",
                       "metadata": {"name": name}, "spec": paths}),
            )?);
            members.push(json!({"cluster": name, "namespace": namespace, "pvcNames": pvcs}));
        }
        let group = from_json(
            "the generated ConsistencyGroup",
            json!({"apiVersion": "lockstep.dev/v1alpha1", "kind": "ConsistencyGroup",
                   "metadata": {"name": "orders-db"},
                   "spec": {"policy": "FreezeAndGo", "holdTimeout": "30s", "members": members}}),
        )?;
        Ok(WorldSpec {
            clusters: cluster_specs,
            member_clusters,
            group,
        })
    }

    /// The volume a scenario cuts unless told: the hub's second volume (the example's
    /// `east-postgres-data`), else its first.
    pub fn default_cut(&self) -> Option<String> {
        let hub = self.clusters.first()?;
        hub.volumes
            .get(1)
            .or(hub.volumes.first())
            .map(|v| v.handle.clone())
    }
}

fn from_json<T: serde::de::DeserializeOwned>(
    what: &'static str,
    value: serde_json::Value,
) -> Result<T, WorldError> {
    serde_json::from_value(value).map_err(|source| WorldError::Manifest {
        what,
        source: serde::de::Error::custom(source),
    })
}

/// Running simulated clusters with the group applied. Dropping it stops everything and removes its
/// files.
#[derive(Debug)]
pub struct World {
    /// The clusters; the first is the hub.
    pub clusters: Vec<SimCluster>,
    /// The group's name in the hub.
    pub group_name: String,
    /// The group's UID in the hub: epochs belong to it.
    pub group_uid: String,
    /// The group as created.
    pub group: ConsistencyGroup,
    /// The kubectl that applied the objects ([`World::start_with_kubectl`]), for the scenario's own
    /// commands.
    pub kubectl: Option<Kubectl>,
    // Last, so the clusters stop before their files go.
    dir: tempfile::TempDir,
}

impl World {
    /// Starts every cluster, then applies the member clusters, their kubeconfig Secrets and the group in
    /// the hub with kube-rs, saying each step on `timeline`.
    pub async fn start(spec: WorldSpec, timeline: &Timeline) -> Result<World, WorldError> {
        Self::start_applying(spec, false, timeline).await
    }

    /// [`World::start`], with the CRDs, the member clusters, their kubeconfig Secrets and the group
    /// applied by the real `kubectl` (each command said on `timeline`); fails at once, naming
    /// `scripts/install-tools.sh`, when there is no kubectl.
    pub async fn start_with_kubectl(
        spec: WorldSpec,
        timeline: &Timeline,
    ) -> Result<World, WorldError> {
        Self::start_applying(spec, true, timeline).await
    }

    async fn start_applying(
        spec: WorldSpec,
        with_kubectl: bool,
        timeline: &Timeline,
    ) -> Result<World, WorldError> {
        if spec.clusters.is_empty() {
            return Err(WorldError::NoClusters);
        }
        let dir = tempfile::Builder::new()
            .prefix("lockstep-demo-")
            .tempdir()
            .map_err(WorldError::TempDir)?;
        let kubectl = if with_kubectl {
            Some(Kubectl::find(&dir.path().join("kubectl-cache"))?)
        } else {
            None
        };
        timeline.say(format!("working directory {}", dir.path().display()));
        if let Some(k) = &kubectl {
            timeline.say(format!(
                "kubectl: {} (from {}), run as `kubectl --kubeconfig {}/<cluster>/kubeconfig …`",
                k.binary().display(),
                Kubectl::repository()
                    .canonicalize()
                    .unwrap_or_else(|_| Kubectl::repository())
                    .display(),
                dir.path().display()
            ));
        }
        let mut clusters = Vec::new();
        for c in spec.clusters {
            let path = dir.path().join(&c.name);
            clusters.push(SimCluster::start_with(c, &path, kubectl.as_ref(), timeline).await?);
        }
        let hub = &clusters[0];
        let hub_name = hub.name().to_owned();
        let group_name = spec.group.metadata.name.clone().unwrap_or_default();
        let group = match &kubectl {
            Some(k) => {
                apply_with_kubectl(
                    k,
                    &clusters,
                    &spec.member_clusters,
                    &spec.group,
                    dir.path(),
                    timeline,
                )
                .await?;
                Api::<ConsistencyGroup>::all(hub.client.clone())
                    .get(&group_name)
                    .await
                    .map_err(|source| ClusterError::Kube {
                        cluster: hub_name.clone(),
                        what: format!("reading cg {group_name}"),
                        source,
                    })?
            }
            None => {
                create_with_client(&clusters, &spec.member_clusters, &spec.group, timeline).await?
            }
        };
        let group_name = group.metadata.name.clone().unwrap_or_default();
        let group_uid = group
            .metadata
            .uid
            .clone()
            .ok_or_else(|| WorldError::NoUid(group_name.clone()))?;
        timeline.say(format!(
            "{hub_name}: applied {} ({:?}, holdTimeout {}, uid {group_uid})\n{}",
            kubectl::cg_line(&group),
            group.spec.policy,
            group.spec.hold_timeout,
            group
                .spec
                .members
                .iter()
                .map(|m| {
                    let which = match (&m.pvc_names, &m.selector) {
                        (Some(names), _) => format!("pvcs {}", names.join(", ")),
                        (None, Some(sel)) => format!(
                            "pvcs labelled {}",
                            sel.match_labels
                                .iter()
                                .flatten()
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect::<Vec<_>>()
                                .join(",")
                        ),
                        (None, None) => "no pvcs".into(),
                    };
                    format!("  member {}/{}: {which}", m.cluster, m.namespace)
                })
                .collect::<Vec<_>>()
                .join("\n")
        ));
        Ok(World {
            clusters,
            group_name,
            group_uid,
            group,
            kubectl,
            dir,
        })
    }

    /// Stops every cluster, then removes the world's files — retrying for a while, as tasks of the
    /// stopped replicators may still be finishing a write (a plain drop can leave files behind then).
    pub async fn close(self) {
        let World { clusters, dir, .. } = self;
        drop(clusters);
        let path = dir.keep();
        for _ in 0..40 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            match std::fs::remove_dir_all(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => continue,
                _ if path.exists() => continue,
                _ => return,
            }
        }
        tracing::warn!(dir = %path.display(), "the world's files could not all be removed");
    }

    /// The hub.
    pub fn hub(&self) -> &SimCluster {
        &self.clusters[0]
    }

    /// Every volume, cluster by cluster in spec order: the workload's volume order.
    pub fn volumes(&self) -> impl Iterator<Item = (&SimCluster, &SimVolume)> {
        self.clusters
            .iter()
            .flat_map(|c| c.volumes.iter().map(move |v| (c, v)))
    }

    /// The cluster and volume with handle `handle`.
    pub fn find_volume(&self, handle: &str) -> Option<(&SimCluster, &SimVolume)> {
        self.volumes().find(|(_, v)| v.spec.handle == handle)
    }

    /// The directory holding every file of the world.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The group as the hub has it now.
    pub async fn group_now(&self) -> Result<ConsistencyGroup, ClusterError> {
        Api::<ConsistencyGroup>::all(self.hub().client.clone())
            .get(&self.group_name)
            .await
            .map_err(|source| ClusterError::Kube {
                cluster: self.hub().name().to_owned(),
                what: format!("reading cg {}", self.group_name),
                source,
            })
    }

    /// The group with its member volumes and its consistent image's volumes filled in from its
    /// ConsistencyGroupShards (what `kubectl get cgshard -l lockstep.dev/group-uid=<uid>` lists), and
    /// whether the shards were current: they follow the group's status in the background, and name the
    /// status's (epoch, stage) and phase and list every member once they caught up (a member that joined
    /// during a freeze is written while the group is Freezing, so its shard's phase tells that its
    /// acknowledgement is not there yet). While a group is Freezing no other shard is rewritten: they
    /// count as current then.
    pub async fn group_with_shards(&self) -> Result<(ConsistencyGroup, bool), ClusterError> {
        let shards =
            Api::<lockstep_api::v1alpha1::ConsistencyGroupShard>::all(self.hub().client.clone());
        let mut group = self.group_now().await?;
        let uid = group.metadata.uid.clone().unwrap_or_default();
        let listed = shards
            .list(&kube::api::ListParams::default().labels(&format!(
                "{}={uid}",
                lockstep_api::v1alpha1::GROUP_UID_LABEL
            )))
            .await
            .map_err(|source| ClusterError::Kube {
                cluster: self.hub().name().to_owned(),
                what: format!("listing the shards of cg {}", self.group_name),
                source,
            })?;
        let Some(status) = group.status.as_mut() else {
            return Ok((group, true));
        };
        let volumes = lockstep_api::v1alpha1::GroupVolumes::from_shards(
            listed.items.iter().map(|shard| &shard.spec),
        );
        let current = (listed.items.iter().all(|shard| {
            (shard.spec.epoch, shard.spec.stage, shard.spec.phase)
                == (status.epoch, status.stage, status.phase)
        }) && volumes.members.len() == status.member_count as usize)
            || status.phase == Some(lockstep_api::domain::Phase::Freezing);
        status.members = volumes.members;
        if let Some(image) = status.consistent_image.as_mut()
            && volumes.image_epoch == Some(image.epoch)
        {
            image.volumes = volumes.image;
        }
        Ok((group, current))
    }

    /// [`Self::group_with_shards`] once the shards are current (waiting up to 30 s, then as they are).
    pub async fn group_with_volumes(&self) -> Result<ConsistencyGroup, ClusterError> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let (group, current) = self.group_with_shards().await?;
            if current || tokio::time::Instant::now() >= deadline {
                return Ok(group);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// The group's conditions as they are now with `updates` applied (type, status, reason, message),
    /// transition times kept where a status does not change: a value for a status patch.
    pub async fn conditions_with(
        &self,
        updates: &[(&str, bool, &str, String)],
    ) -> Result<serde_json::Value, ClusterError> {
        use lockstep_api::conditions::{ConditionUpdate, set};
        let group = self.group_now().await?;
        let mut conditions = group
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        );
        for (type_, status, reason, message) in updates {
            set(
                &mut conditions,
                ConditionUpdate {
                    type_,
                    status: *status,
                    reason,
                    message: message.clone(),
                },
                group.metadata.generation,
                &now,
            );
        }
        Ok(json!(conditions))
    }

    /// Merge-patches the group's status in the hub (what the operator does; the demo does it while the
    /// operator is not built).
    pub async fn patch_group_status(
        &self,
        status: serde_json::Value,
    ) -> Result<ConsistencyGroup, ClusterError> {
        Api::<ConsistencyGroup>::all(self.hub().client.clone())
            .patch_status(
                &self.group_name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await
            .map_err(|source| ClusterError::Kube {
                cluster: self.hub().name().to_owned(),
                what: format!("patching the status of cg {}", self.group_name),
                source,
            })
    }
}

/// Creates the member clusters, their kubeconfig Secrets and the group in the hub with kube-rs.
async fn create_with_client(
    clusters: &[SimCluster],
    member_clusters: &[MemberCluster],
    group: &ConsistencyGroup,
    timeline: &Timeline,
) -> Result<ConsistencyGroup, WorldError> {
    let hub = &clusters[0];
    let hub_name = hub.name().to_owned();
    let kube = |what: String| {
        let cluster = hub_name.clone();
        move |source| ClusterError::Kube {
            cluster,
            what,
            source,
        }
    };
    let pp = PostParams::default();
    for mc in member_clusters {
        if let Some(secret_ref) = &mc.spec.kubeconfig_secret_ref {
            let target = mc.metadata.name.as_deref().unwrap_or_default();
            if let Some(member) = clusters.iter().find(|c| c.name() == target) {
                let kubeconfig =
                    std::fs::read(&member.kubeconfig).map_err(|source| ClusterError::Io {
                        cluster: target.to_owned(),
                        what: "reading its kubeconfig".into(),
                        source,
                    })?;
                ensure_namespace(&hub.client, &secret_ref.namespace)
                    .await
                    .map_err(kube(format!("creating namespace {}", secret_ref.namespace)))?;
                let secret = Secret {
                    metadata: kube::api::ObjectMeta {
                        name: Some(secret_ref.name.clone()),
                        namespace: Some(secret_ref.namespace.clone()),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([(
                        secret_ref.key.clone(),
                        ByteString(kubeconfig),
                    )])),
                    ..Default::default()
                };
                Api::<Secret>::namespaced(hub.client.clone(), &secret_ref.namespace)
                    .create(&pp, &secret)
                    .await
                    .map_err(kube(format!("creating secret {}", secret_ref.name)))?;
                timeline.say(format!(
                    "{hub_name}: secret/{}/{} holds {target}'s kubeconfig ({})",
                    secret_ref.namespace, secret_ref.name, member.api_url
                ));
            }
        }
        let created = Api::<MemberCluster>::all(hub.client.clone())
            .create(&pp, mc)
            .await
            .map_err(kube("creating a MemberCluster".into()))?;
        timeline.say(format!(
            "{hub_name}: applied {}",
            kubectl::mc_line(&created)
        ));
    }
    Ok(Api::<ConsistencyGroup>::all(hub.client.clone())
        .create(&pp, group)
        .await
        .map_err(kube("creating the ConsistencyGroup".into()))?)
}

/// Applies the member clusters, their kubeconfig Secrets and the group in the hub with kubectl: the
/// repository's example file for an object that is the example, else a manifest written to
/// `<dir>/manifests/`.
async fn apply_with_kubectl(
    kubectl: &Kubectl,
    clusters: &[SimCluster],
    member_clusters: &[MemberCluster],
    group: &ConsistencyGroup,
    dir: &Path,
    timeline: &Timeline,
) -> Result<(), WorldError> {
    let hub = &clusters[0];
    let (hub_name, hub_config) = (hub.name(), hub.kubeconfig.as_path());
    let mut namespaces = BTreeSet::new();
    for mc in member_clusters {
        let name = mc.metadata.name.as_deref().unwrap_or_default();
        if let Some(secret_ref) = &mc.spec.kubeconfig_secret_ref
            && let Some(member) = clusters.iter().find(|c| c.name() == name)
        {
            let ns = secret_ref.namespace.as_str();
            if namespaces.insert(ns.to_owned()) {
                kubectl
                    .run(hub_name, hub_config, &["create", "namespace", ns], timeline)
                    .await?;
            }
            let from_file = format!(
                "--from-file={}={}",
                secret_ref.key,
                member.kubeconfig.display()
            );
            kubectl
                .run(
                    hub_name,
                    hub_config,
                    &[
                        "-n",
                        ns,
                        "create",
                        "secret",
                        "generic",
                        &secret_ref.name,
                        &from_file,
                    ],
                    timeline,
                )
                .await?;
        }
        let file = manifest(mc, &format!("membercluster-{name}.yaml"), dir)?;
        kubectl
            .run(hub_name, hub_config, &["apply", "-f", &file], timeline)
            .await?;
    }
    let name = group.metadata.name.as_deref().unwrap_or_default();
    let file = manifest(group, &format!("consistencygroup-{name}.yaml"), dir)?;
    kubectl
        .run(hub_name, hub_config, &["apply", "-f", &file], timeline)
        .await?;
    Ok(())
}

/// The file to apply for `object`: the repository's example file (a path from the repository's root)
/// when the object is that example, else the object written to `<dir>/manifests/<file_name>`.
fn manifest<T>(object: &T, file_name: &str, dir: &Path) -> Result<String, WorldError>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let wanted = serde_json::to_value(object).ok();
    for (path, text) in EXAMPLE_FILES {
        let example = serde_yaml_ng::from_str::<T>(text)
            .ok()
            .and_then(|e| serde_json::to_value(e).ok());
        if wanted.is_some() && example == wanted {
            return Ok(path.to_owned());
        }
    }
    let manifests = dir.join("manifests");
    let path = manifests.join(file_name);
    let write_err = |source| WorldError::Write {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&manifests).map_err(write_err)?;
    let yaml = serde_yaml_ng::to_string(object).map_err(|source| WorldError::Manifest {
        what: "a generated manifest",
        source,
    })?;
    std::fs::write(&path, yaml).map_err(write_err)?;
    Ok(path.display().to_string())
}

async fn ensure_namespace(client: &kube::Client, name: &str) -> Result<(), kube::Error> {
    let ns = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        ..Default::default()
    };
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_clusters_and_three_volumes_are_the_example() {
        let spec = WorldSpec::sized(2, 3, 1 << 20).unwrap();
        assert_eq!(spec.group.metadata.name.as_deref(), Some("orders-db"));
        assert_eq!(spec.default_cut().as_deref(), Some("east-postgres-data"));
        for (path, text) in EXAMPLE_FILES {
            let applied = if path.contains("consistencygroup") {
                manifest(&spec.group, "x.yaml", Path::new("/nonexistent")).unwrap()
            } else {
                let mc: MemberCluster = serde_yaml_ng::from_str(text).unwrap();
                manifest(&mc, "x.yaml", Path::new("/nonexistent")).unwrap()
            };
            assert_eq!(applied, path);
        }
    }

    #[test]
    fn a_generated_world_spreads_the_volumes_and_names_every_claim_in_its_group() {
        let spec = WorldSpec::sized(3, 5, 1 << 20).unwrap();
        let names: Vec<&str> = spec.clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["east", "west", "north"]);
        let counts: Vec<usize> = spec.clusters.iter().map(|c| c.volumes.len()).collect();
        assert_eq!(counts, [2, 2, 1]);
        assert_eq!(spec.default_cut().as_deref(), Some("east-vol-2"));
        let pvcs: Vec<Vec<String>> = spec
            .group
            .spec
            .members
            .iter()
            .map(|m| m.pvc_names.clone().unwrap_or_default())
            .collect();
        assert_eq!(
            pvcs,
            [
                vec!["vol-1", "vol-2"],
                vec!["vol-1", "vol-2"],
                vec!["vol-1"]
            ]
        );
        assert!(spec.member_clusters[0].spec.local);
        let secret = spec.member_clusters[2]
            .spec
            .kubeconfig_secret_ref
            .as_ref()
            .unwrap();
        assert_eq!(secret.name, "north-kubeconfig");
    }

    #[test]
    fn impossible_shapes_are_refused() {
        assert!(matches!(
            WorldSpec::sized(1, 3, 1 << 20),
            Err(WorldError::Shape { .. })
        ));
        assert!(matches!(
            WorldSpec::sized(9, 9, 1 << 20),
            Err(WorldError::Shape { .. })
        ));
        assert!(matches!(
            WorldSpec::sized(4, 3, 1 << 20),
            Err(WorldError::Shape { .. })
        ));
    }
}
