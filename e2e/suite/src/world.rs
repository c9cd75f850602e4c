//! [`World`]: several simulated clusters, the first of them the hub, with Lockstep's objects applied in
//! the hub — one `MemberCluster` per cluster (and the Secret holding each remote member's kubeconfig) and
//! a `ConsistencyGroup` over their volumes.
//!
//! The default world is the repository's own example: `examples/consistencygroup-two-cluster.yaml`
//! (group `orders-db`: east's `postgres-wal` and `postgres-data` by name, west's reporting volume by
//! label), with east as the hub (`examples/membercluster-hub.yaml`) and west reached by both paths
//! (`examples/membercluster-both.yaml`).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use lockstep_api::v1alpha1::{ConsistencyGroup, MemberCluster};
use serde_json::json;

use crate::cluster::{ClusterError, ClusterSpec, SimCluster, SimVolume, VolumeSpec};
use crate::kubectl;
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
    /// The group has no UID after it was created.
    #[error("consistency group {0} has no uid")]
    NoUid(String),
}

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
    // Last, so the clusters stop before their files go.
    dir: tempfile::TempDir,
}

impl World {
    /// Starts every cluster, then applies the member clusters, their kubeconfig Secrets and the group in
    /// the hub, saying each step on `timeline`.
    pub async fn start(spec: WorldSpec, timeline: &Timeline) -> Result<World, WorldError> {
        if spec.clusters.is_empty() {
            return Err(WorldError::NoClusters);
        }
        let dir = tempfile::Builder::new()
            .prefix("lockstep-demo-")
            .tempdir()
            .map_err(WorldError::TempDir)?;
        timeline.say(format!("working directory {}", dir.path().display()));
        let mut clusters = Vec::new();
        for c in spec.clusters {
            let path = dir.path().join(&c.name);
            clusters.push(SimCluster::start(c, &path, timeline).await?);
        }
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
        for mc in &spec.member_clusters {
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
        let group = Api::<ConsistencyGroup>::all(hub.client.clone())
            .create(&pp, &spec.group)
            .await
            .map_err(kube("creating the ConsistencyGroup".into()))?;
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
            dir,
        })
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
