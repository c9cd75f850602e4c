//! One benchmark cell's world: a hub and member clusters (test API servers over real HTTP) with bound
//! PVCs, `MemberCluster`s restricted to the cell's paths, one `ConsistencyGroup` over every volume; the
//! real operator in-process against the hub; per node, an in-memory replicator on a unix socket and the
//! real sidecar. [`Fleet::trial`] fails one copy and stamps the moments of the freeze;
//! [`Fleet::resync`] brings the group back to Replicating at the new epoch for the next trial.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, Namespace, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeSpec, Secret, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use lockstep_api::domain::{ClusterPaths, Policy, Stage, condition};
use lockstep_api::proto::replicator::v1 as pb;
use lockstep_api::v1alpha1::{
    ConsistencyGroup, ConsistencyGroupSpec, GroupMember, MemberCluster, MemberClusterSpec,
    SecretKeyRef,
};
use lockstep_kube::backend::{ApiServer, Backend};
use lockstep_operator::Operator;
use lockstep_sidecar::Sidecar;
use lockstep_testapi::TestApiServer;
use tokio::task::JoinHandle;

use super::replicator::{MemoryReplicator, Probe, TrialMarks};
use super::sizes::ObjectSizes;
use super::{BenchError, PathChoice};

/// Lockstep's namespace in every cluster.
const SYSTEM_NAMESPACE: &str = "lockstep";
/// The group a one-group cell freezes (groups of a many-groups cell are `bench-000`, `bench-001`, ...).
const GROUP: &str = "bench";
/// At most this many PVCs per (cluster, namespace) member entry (the CRD allows 4 096 names per entry and
/// over a group; larger groups select their PVCs by label, which a gRPC-only member cannot).
const CLAIMS_PER_NAMESPACE: usize = 1000;
/// The label every bench PVC carries (its group's name as the value), which the group selects them by
/// where the hub can list them.
const CLAIM_LABEL: &str = "lockstep.dev/bench";
/// How long a trial's freeze, or the set-up and resync around it, may take before it counts as lost —
/// with one group; see [`Fleet::deadline`].
const DEADLINE: Duration = Duration::from_secs(60);
/// What each group beyond the first adds to [`DEADLINE`]: hundreds of groups resync one decision (a
/// status write) each, on the same two cores as every API server and sidecar of the cell.
const DEADLINE_PER_GROUP: Duration = Duration::from_millis(250);
/// How long the set-up (members resolved, every volume confirmed) may take.
pub const SETUP_DEADLINE: Duration = Duration::from_secs(300);

/// The shape of one cell.
#[derive(Debug, Clone)]
pub struct CellSpec {
    /// Volumes in the cell, over all its groups.
    pub volumes: usize,
    /// Groups the volumes are split into (consecutive volumes, so each group of 6 or more spans every
    /// node of the default 3 x 2 cell).
    pub groups: usize,
    /// Member clusters (besides the hub, which holds the group and runs the operator).
    pub clusters: usize,
    /// Nodes (sidecars) per member cluster.
    pub nodes_per_cluster: usize,
    /// Which paths reach the members.
    pub paths: PathChoice,
    /// The operator's periodic reconcile interval.
    pub operator_resync: Duration,
    /// The API servers: the test API server or real kube-apiservers on etcd.
    pub backend: Backend,
    /// How long the set-up may take, until every member is resolved and confirmed.
    pub setup: Duration,
}

/// Where one volume lives.
#[derive(Debug, Clone)]
struct Placement {
    /// The group the volume is a member of.
    group: String,
    handle: String,
    pvc: String,
    namespace: String,
    cluster: usize,
    node: usize,
}

struct MemberSim {
    name: String,
    api: ApiServer,
    client: Client,
}

/// A running cell.
pub struct Fleet {
    hub: ApiServer,
    hub_client: Client,
    members: Vec<MemberSim>,
    placements: Vec<Placement>,
    /// The groups' names.
    groups: Vec<String>,
    replicators: Vec<MemoryReplicator>,
    operator: Option<Operator>,
    /// The runtime the operator runs on (threads named [`OPERATOR_THREADS`]).
    operator_runtime: Option<tokio::runtime::Runtime>,
    sidecars: Vec<Sidecar>,
    probe: Arc<Probe>,
    hub_watch: JoinHandle<()>,
    /// The hub's groups as the watch has them (polled while waiting, without asking the API server).
    hub_groups: reflector::Store<ConsistencyGroup>,
    sizes: ObjectSizes,
    epoch: u64,
    sequence: u64,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("members", &self.members.len())
            .field("volumes", &self.placements.len())
            .field("sidecars", &self.sidecars.len())
            .field("epoch", &self.epoch)
            .finish()
    }
}

fn kube_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Kube { what, source }
}

fn cluster_name(index: usize) -> String {
    const NAMES: [&str; 6] = ["east", "west", "south", "north", "central", "edge"];
    NAMES
        .get(index)
        .map_or_else(|| format!("member-{index}"), |name| (*name).to_owned())
}

fn node_name(cluster: usize, node: usize) -> String {
    format!("{}-node-{node}", cluster_name(cluster))
}

/// The name of group `index` of a cell of `groups`.
fn group_name(index: usize, groups: usize) -> String {
    if groups <= 1 {
        GROUP.to_owned()
    } else {
        format!("{GROUP}-{index:03}")
    }
}

/// Spreads the volumes round-robin over the clusters, then over each cluster's nodes, in namespaces of
/// at most [`CLAIMS_PER_NAMESPACE`] claims; consecutive volumes form each group.
fn place(spec: &CellSpec) -> Vec<Placement> {
    let clusters = spec.clusters.max(1);
    let nodes = spec.nodes_per_cluster.max(1);
    let groups = spec.groups.max(1);
    let per_group = spec.volumes.div_ceil(groups).max(1);
    (0..spec.volumes)
        .map(|i| {
            let in_cluster = i / clusters;
            Placement {
                group: group_name(i / per_group, groups),
                handle: format!("vol-{i:04}"),
                pvc: format!("data-{i:04}"),
                namespace: format!("bench-{}", in_cluster / CLAIMS_PER_NAMESPACE),
                cluster: i % clusters,
                node: in_cluster % nodes,
            }
        })
        .collect()
}

async fn ensure_namespace(client: &Client, name: &str) -> Result<(), BenchError> {
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        ..Default::default()
    };
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(error) => Err(kube_error(format!("creating namespace {name}"))(error)),
    }
}

async fn start_cluster(name: &str, backend: Backend) -> Result<(ApiServer, Client), BenchError> {
    let api = match backend {
        // Authorization off, as before: the benchmark measures Lockstep, not the test server's RBAC.
        Backend::Test => ApiServer::Test(
            TestApiServer::start(lockstep_testapi::Options::default())
                .await
                .map_err(|e| BenchError::ApiServer(e.to_string()))?,
        ),
        Backend::Kube => ApiServer::start(Backend::Kube)
            .await
            .map_err(|e| BenchError::ApiServer(e.to_string()))?,
    };
    let client = api
        .admin()
        .await
        .map_err(|e| BenchError::ApiServer(e.to_string()))?;
    crate::cluster::install_crds(name, &client)
        .await
        .map_err(|e| BenchError::ApiServer(e.to_string()))?;
    ensure_namespace(&client, SYSTEM_NAMESPACE).await?;
    Ok((api, client))
}

/// A CSI PV for the volume and a PVC bound to it.
async fn create_volume(client: &Client, placement: &Placement) -> Result<(), BenchError> {
    let pv_name = format!("pv-{}", placement.handle);
    let pv = PersistentVolume {
        metadata: ObjectMeta {
            name: Some(pv_name.clone()),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            csi: Some(CSIPersistentVolumeSource {
                driver: "nbd.lockstep.dev".into(),
                volume_handle: placement.handle.clone(),
                ..Default::default()
            }),
            // What kube-apiserver's validation requires of a PV and its claim.
            capacity: Some(BTreeMap::from([(
                "storage".to_owned(),
                Quantity("1Gi".into()),
            )])),
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            node_affinity: Some(lockstep_kube::fixtures::hostname_affinity(&node_name(
                placement.cluster,
                placement.node,
            ))),
            ..Default::default()
        }),
        status: None,
    };
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .map_err(kube_error(format!("creating {pv_name}")))?;
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(placement.pvc.clone()),
            namespace: Some(placement.namespace.clone()),
            labels: Some(BTreeMap::from([(
                CLAIM_LABEL.to_owned(),
                placement.group.clone(),
            )])),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            volume_name: Some(pv_name),
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity("1Gi".into()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    };
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), &placement.namespace)
        .create(&PostParams::default(), &claim)
        .await
        .map_err(kube_error(format!("creating PVC {}", placement.pvc)))?;
    Ok(())
}

fn member_paths(paths: PathChoice) -> ClusterPaths {
    match paths {
        PathChoice::Both => ClusterPaths::Both,
        PathChoice::Api => ClusterPaths::ApiOnly,
        PathChoice::Grpc => ClusterPaths::GrpcOnly,
    }
}

/// A group: per (cluster, namespace), its PVCs by name (the form every kind of member supports) or,
/// where the hub can list them (`by_label`), by label.
fn group_spec(
    members: &[MemberSim],
    placements: &[Placement],
    group: &str,
    by_label: bool,
) -> ConsistencyGroupSpec {
    let mut claims: BTreeMap<(usize, String), Vec<String>> = BTreeMap::new();
    for placement in placements.iter().filter(|p| p.group == group) {
        claims
            .entry((placement.cluster, placement.namespace.clone()))
            .or_default()
            .push(placement.pvc.clone());
    }
    ConsistencyGroupSpec {
        members: claims
            .into_iter()
            .filter_map(|((cluster, namespace), pvcs)| {
                Some(GroupMember {
                    cluster: members.get(cluster)?.name.clone(),
                    namespace,
                    pvc_names: (!by_label).then_some(pvcs),
                    selector: by_label.then(|| LabelSelector {
                        match_labels: Some(BTreeMap::from([(
                            CLAIM_LABEL.to_owned(),
                            group.to_owned(),
                        )])),
                        match_expressions: None,
                    }),
                })
            })
            .collect(),
        policy: Policy::FreezeAndGo,
        hold_timeout: "5m".to_owned(),
        release: None,
        resync: None,
        freeze: None,
        failover: None,
    }
}

impl Fleet {
    /// Builds the cell and waits until the group's members are resolved and every volume is confirmed
    /// in the group, Replicating.
    pub async fn start(spec: &CellSpec) -> Result<Fleet, BenchError> {
        let dir = tempfile::Builder::new()
            .prefix("lockstep-freeze-bench-")
            .tempdir()
            .map_err(BenchError::Io)?;
        let (hub, hub_client) = start_cluster("hub", spec.backend).await?;
        let mut members = Vec::new();
        for index in 0..spec.clusters.max(1) {
            let name = cluster_name(index);
            let (api, client) = start_cluster(&name, spec.backend).await?;
            members.push(MemberSim { name, api, client });
        }
        let placements = place(spec);
        for member in &members {
            let mut namespaces: Vec<&str> =
                placements.iter().map(|p| p.namespace.as_str()).collect();
            namespaces.sort_unstable();
            namespaces.dedup();
            for namespace in namespaces {
                ensure_namespace(&member.client, namespace).await?;
            }
        }
        futures::stream::iter(placements.iter().filter_map(|placement| {
            let client = members.get(placement.cluster)?.client.clone();
            Some(async move { create_volume(&client, placement).await })
        }))
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;

        let paths = member_paths(spec.paths);
        for member in &members {
            let secret_ref = (paths != ClusterPaths::GrpcOnly).then(|| SecretKeyRef {
                namespace: SYSTEM_NAMESPACE.to_owned(),
                name: format!("{}-kubeconfig", member.name),
                key: "kubeconfig".to_owned(),
            });
            if let Some(reference) = &secret_ref {
                let kubeconfig = member
                    .api
                    .admin_kubeconfig_yaml()
                    .map_err(|e| BenchError::ApiServer(e.to_string()))?;
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(reference.name.clone()),
                        namespace: Some(reference.namespace.clone()),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([(
                        reference.key.clone(),
                        ByteString(kubeconfig.into_bytes()),
                    )])),
                    ..Default::default()
                };
                Api::<Secret>::namespaced(hub_client.clone(), SYSTEM_NAMESPACE)
                    .create(&PostParams::default(), &secret)
                    .await
                    .map_err(kube_error("creating a kubeconfig Secret"))?;
            }
            let cluster = MemberCluster::new(
                &member.name,
                MemberClusterSpec {
                    paths,
                    local: false,
                    kubeconfig_secret_ref: secret_ref,
                    network: Some(format!("dc-{}", member.name)),
                    service_account_keys: None,
                    volume_binding: Default::default(),
                },
            );
            Api::<MemberCluster>::all(hub_client.clone())
                .create(&PostParams::default(), &cluster)
                .await
                .map_err(kube_error("creating a MemberCluster"))?;
        }
        let groups: Vec<String> = (0..spec.groups.max(1))
            .map(|index| group_name(index, spec.groups))
            .collect();
        let by_label = spec.paths != PathChoice::Grpc;
        futures::stream::iter(groups.iter().map(|name| {
            let group =
                ConsistencyGroup::new(name, group_spec(&members, &placements, name, by_label));
            let api = Api::<ConsistencyGroup>::all(hub_client.clone());
            async move {
                api.create(&PostParams::default(), &group)
                    .await
                    .map_err(kube_error(format!("creating ConsistencyGroup {name}")))
            }
        }))
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;

        let probe = Arc::new(Probe::default());
        let mut replicators = Vec::new();
        for cluster in 0..members.len() {
            for node in 0..spec.nodes_per_cluster.max(1) {
                let volumes: Vec<String> = placements
                    .iter()
                    .filter(|p| p.cluster == cluster && p.node == node)
                    .map(|p| p.handle.clone())
                    .collect();
                let socket = dir
                    .path()
                    .join(format!("{}.sock", node_name(cluster, node)));
                replicators.push(
                    MemoryReplicator::start(&socket, &volumes, probe.clone())
                        .map_err(|e| BenchError::Replicator(e.to_string()))?,
                );
            }
        }

        let options = lockstep_operator::Options {
            kubeconfig: None,
            hub_name: "hub".into(),
            grpc_listen: ([127, 0, 0, 1], 0).into(),
            http_listen: ([127, 0, 0, 1], 0).into(),
            resync_interval: spec.operator_resync,
            leader_election: false,
            namespace: SYSTEM_NAMESPACE.into(),
            identity: "operator-0".into(),
            lease_duration: Duration::from_secs(15),
            max_sessions_per_cluster: lockstep_operator::sessions::DEFAULT_SESSIONS_PER_CLUSTER,
            max_group_volumes: lockstep_operator::DEFAULT_MAX_GROUP_VOLUMES,
            control_security: lockstep_operator::ControlSecurity::insecure_plaintext(),
        };
        // The operator on its own runtime, its threads named, so that its CPU time can be read apart
        // from the API servers', sidecars' and replicators' that share this process.
        let operator_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(OPERATOR_THREADS)
            .enable_all()
            .build()
            .map_err(|e| BenchError::Start(format!("the operator's runtime: {e}")))?;
        let hub_kubeconfig = hub
            .admin_kubeconfig_yaml()
            .map_err(|e| BenchError::ApiServer(e.to_string()))?;
        let operator = operator_runtime
            .spawn(async move {
                let kubeconfig = kube::config::Kubeconfig::from_yaml(&hub_kubeconfig)
                    .map_err(|e| e.to_string())?;
                let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                    .await
                    .map_err(|e| e.to_string())?;
                let client = Client::try_from(config).map_err(|e| e.to_string())?;
                Operator::start(client, &options)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| BenchError::Start(format!("the operator: {e}")))?
            .map_err(|e| BenchError::Start(format!("the operator: {e}")))?;
        let endpoint = format!("http://{}", operator.grpc_addr);
        let mut sidecars = Vec::new();
        for (cluster, member) in members.iter().enumerate() {
            for node in 0..spec.nodes_per_cluster.max(1) {
                let index = cluster * spec.nodes_per_cluster.max(1) + node;
                let Some(replicator) = replicators.get(index) else {
                    continue;
                };
                let mut o = lockstep_sidecar::Options::new(&node_name(cluster, node), &member.name);
                o.replicator_socket = replicator.socket().to_path_buf();
                o.operator_endpoint = (spec.paths != PathChoice::Api).then(|| endpoint.clone());
                o.no_api_path = spec.paths == PathChoice::Grpc;
                o.insecure_plaintext_control = true;
                o.namespace = SYSTEM_NAMESPACE.into();
                o.listen = ([127, 0, 0, 1], 0).into();
                o.fail_safe_interval = Duration::from_secs(60);
                let sidecar = Sidecar::start(o, Some(member.client.clone()))
                    .await
                    .map_err(|e| BenchError::Start(format!("a sidecar: {e}")))?;
                sidecars.push(sidecar);
            }
        }
        let (hub_groups, writer) = reflector::store();
        let hub_watch = tokio::spawn(watch_hub(hub_client.clone(), probe.clone(), writer));
        hub_groups
            .wait_until_ready()
            .await
            .map_err(|e| BenchError::Start(format!("the hub's group watch: {e}")))?;
        let member_clients: Vec<(String, Client)> = members
            .iter()
            .map(|member| (member.name.clone(), member.client.clone()))
            .collect();
        let sizes = ObjectSizes::start(&hub_client, &member_clients);
        let fleet = Fleet {
            hub,
            hub_client,
            members,
            placements,
            groups,
            replicators,
            operator: Some(operator),
            operator_runtime: Some(operator_runtime),
            sidecars,
            probe,
            hub_watch,
            hub_groups,
            sizes,
            epoch: 0,
            sequence: 0,
            _dir: dir,
        };
        fleet.wait_ready(spec.setup).await?;
        Ok(fleet)
    }

    fn groups(&self) -> Api<ConsistencyGroup> {
        Api::all(self.hub_client.clone())
    }

    /// Every group of the cell as the hub's watch has it (may lag the API server a little: for polling).
    /// Shared, not copied: copying 500 groups' statuses every 50 ms took 14% of the machine from the
    /// system measured.
    fn watched_groups(&self) -> Vec<std::sync::Arc<ConsistencyGroup>> {
        self.hub_groups.state()
    }

    /// Every group of the cell as the hub has it now.
    async fn list_groups(&self) -> Result<Vec<ConsistencyGroup>, BenchError> {
        Ok(self
            .groups()
            .list(&kube::api::ListParams::default())
            .await
            .map_err(kube_error("listing the groups"))?
            .items)
    }

    /// True when every volume is confirmed in its group at that group's (epoch, Resume), replicating.
    /// `positions`: per group name, its UID and epoch.
    fn replicators_at(&self, positions: &BTreeMap<String, (String, u64)>) -> bool {
        self.replicators
            .iter()
            .all(|replicator| replicator.watched())
            && self.unconfirmed(positions) == 0
    }

    /// How many volumes are not (yet) confirmed in their group at its (epoch, Resume), replicating.
    fn unconfirmed(&self, positions: &BTreeMap<String, (String, u64)>) -> usize {
        let group_of: BTreeMap<&str, &str> = self
            .placements
            .iter()
            .map(|p| (p.handle.as_str(), p.group.as_str()))
            .collect();
        let confirmed = |state: &pb::VolumeState| {
            let Some((uid, epoch)) = group_of
                .get(state.volume_handle.as_str())
                .and_then(|group| positions.get(*group))
            else {
                return false;
            };
            let wanted_stage = if *epoch == 0 {
                [pb::Stage::Unspecified as i32, pb::Stage::Resume as i32]
            } else {
                [pb::Stage::Resume as i32; 2]
            };
            state.group_uid == *uid
                && state.epoch == *epoch
                && wanted_stage.contains(&state.stage)
                && state.mode == pb::Mode::Replicating as i32
        };
        self.replicators
            .iter()
            .flat_map(|replicator| replicator.states())
            .filter(|state| !confirmed(state))
            .count()
    }

    /// Per group name, its UID and current epoch.
    fn positions<G: std::borrow::Borrow<ConsistencyGroup>>(
        groups: &[G],
    ) -> BTreeMap<String, (String, u64)> {
        groups
            .iter()
            .map(|group| {
                let group = group.borrow();
                (
                    group.name_any(),
                    (
                        group.metadata.uid.clone().unwrap_or_default(),
                        group.position().0,
                    ),
                )
            })
            .collect()
    }

    async fn wait_ready(&self, setup: Duration) -> Result<(), BenchError> {
        let deadline = Instant::now() + setup;
        loop {
            let groups = self.watched_groups();
            let resolved = groups
                .iter()
                .filter(|group| {
                    group.status.as_ref().is_some_and(|status| {
                        lockstep_api::conditions::status_of(
                            &status.conditions,
                            condition::MEMBERS_RESOLVED,
                        ) == Some(true)
                    })
                })
                .count();
            let members: usize = groups
                .iter()
                .filter_map(|group| group.status.as_ref())
                .map(|status| status.member_count as usize)
                .sum();
            if resolved == self.groups.len()
                && members == self.placements.len()
                && self.replicators_at(&Self::positions(&groups))
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                // Why the first group still waits, as its condition says it.
                let waiting = groups
                    .iter()
                    .filter_map(|group| {
                        let status = group.status.as_ref()?;
                        let resolved = status
                            .conditions
                            .iter()
                            .find(|c| c.type_ == condition::MEMBERS_RESOLVED)?;
                        (resolved.status != "True").then(|| {
                            let message: String = resolved.message.chars().take(400).collect();
                            format!("; cg/{}: {message}", group.name_any())
                        })
                    })
                    .next()
                    .unwrap_or_default();
                let unconfirmed = self.unconfirmed(&Self::positions(&groups));
                return Err(BenchError::Timeout(format!(
                    "members resolved ({members} of {} volumes; {resolved} of {} groups) and every \
                     volume confirmed by its replicator ({unconfirmed} not yet){waiting}",
                    self.placements.len(),
                    self.groups.len()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fails the copy of one volume (chosen by `index`, spread over nodes and clusters) and waits until
    /// the freeze is done: every volume suspended, the hub's group at stage Release, the held write
    /// released. Returns the moments seen (some missing when it timed out).
    pub async fn trial(&mut self, index: usize) -> TrialMarks {
        let volumes = self.placements.len().max(1);
        let pick = (index * 7 + index / volumes) % volumes;
        let Some(placement) = self.placements.get(pick).cloned() else {
            return TrialMarks::default();
        };
        let nodes = self.sidecars.len() / self.members.len().max(1);
        let replicator = self
            .replicators
            .get(placement.cluster * nodes.max(1) + placement.node)
            .cloned();
        let Some(replicator) = replicator else {
            return TrialMarks::default();
        };
        let target = self.epoch + 1;
        self.sequence += 1;
        self.probe.arm(TrialMarks {
            epoch: target,
            failed_volume: placement.handle.clone(),
            total: self.placements.len(),
            started: Some(Instant::now()),
            ..TrialMarks::default()
        });
        replicator.fail_copy(&placement.handle, self.sequence);
        let deadline = tokio::time::Instant::now() + self.deadline();
        loop {
            let notified = self.probe.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.probe.snapshot().is_some_and(|marks| marks.complete()) {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        self.probe.disarm().unwrap_or_default()
    }

    /// Asks every group for a resync at its current epoch (the trial's) and waits until every group and
    /// every volume are back to Replicating there, then `settle` more for trailing writes.
    pub async fn resync(&mut self, settle: Duration) -> Result<(), BenchError> {
        let groups = self.list_groups().await?;
        let mut positions = Self::positions(&groups);
        let asked: Vec<(String, u64)> = groups
            .iter()
            .map(|group| (group.name_any(), group.position().0))
            .collect();
        self.ask_resync(asked).await?;
        self.epoch = positions
            .values()
            .map(|(_, epoch)| *epoch)
            .max()
            .unwrap_or(0);
        let deadline = Instant::now() + self.deadline();
        loop {
            let groups = self.watched_groups();
            // Not phase Replicating: a gRPC-only member's volumes never report their state back as
            // Replicating (no ReplicationNode), so such a group stays Resyncing; a freeze only needs the
            // stage to be Resume, and every acknowledgement of the resume in keeps the trials apart.
            // The status counts the volumes that acknowledged its current (epoch, stage).
            let acknowledged = |s: &lockstep_api::v1alpha1::ConsistencyGroupStatus| {
                s.volumes.as_ref().map_or(0, |counts| counts.acknowledged)
            };
            let behind: Vec<&std::sync::Arc<ConsistencyGroup>> = groups
                .iter()
                .filter(|group| {
                    let epoch = positions.get(&group.name_any()).map_or(0, |(_, e)| *e);
                    let resumed = group
                        .status
                        .as_ref()
                        .is_some_and(|s| s.member_count > 0 && acknowledged(s) == s.member_count);
                    group.position() != (epoch, Stage::Resume) || !resumed
                })
                .collect();
            if behind.is_empty() && self.replicators_at(&positions) {
                break;
            }
            // A group that froze again after the resync was asked (a copy failing on the loaded machine,
            // say) ignores a resync of its old epoch: it is asked again at its new one, and said.
            let refrozen: Vec<(String, u64)> = behind
                .iter()
                .filter(|group| group.position().1 != Stage::Resume)
                .filter(|group| {
                    positions
                        .get(&group.name_any())
                        .is_some_and(|(_, asked)| *asked != group.position().0)
                })
                .map(|group| {
                    let trigger = group.status.as_ref().and_then(|s| s.trigger.as_ref());
                    eprintln!(
                        "note: {} froze again at epoch {} before its resync ({}: {}); resync asked at that epoch",
                        group.name_any(),
                        group.position().0,
                        trigger.map_or("-", |t| t.reason.as_str()),
                        trigger.and_then(|t| t.message.as_deref()).unwrap_or("-"),
                    );
                    (group.name_any(), group.position().0)
                })
                .collect();
            if !refrozen.is_empty() {
                for (name, epoch) in &refrozen {
                    if let Some(position) = positions.get_mut(name) {
                        position.1 = *epoch;
                    }
                }
                self.ask_resync(refrozen).await?;
                continue;
            }
            if Instant::now() >= deadline {
                let Some(group) = behind.first() else {
                    return Err(BenchError::Timeout(
                        "every volume back to Replicating at its replicator".to_owned(),
                    ));
                };
                let phase = group.status.as_ref().and_then(|s| s.phase);
                let unacknowledged = group
                    .status
                    .as_ref()
                    .map_or(0, |s| s.member_count.saturating_sub(acknowledged(s)));
                // Where the missing acknowledgements are: per cluster, and the nodes the status names.
                let clusters: Vec<String> = group
                    .status
                    .iter()
                    .flat_map(|s| s.volumes.iter().flat_map(|v| v.clusters.iter()))
                    .map(|c| format!("{} {}/{}", c.cluster, c.acknowledged, c.volumes))
                    .collect();
                let stragglers: BTreeSet<String> = group
                    .status
                    .iter()
                    .flat_map(|s| s.stragglers.iter())
                    .map(|s| format!("{}/{}", s.cluster, s.node.as_deref().unwrap_or("-")))
                    .collect();
                return Err(BenchError::Timeout(format!(
                    "{} of {} groups back to Replicating; {} at {:?}, {phase:?}: {unacknowledged} \
                     members without the resume acknowledged (acknowledged per cluster: {}; named \
                     stragglers on {}); replicators all resumed: {}",
                    groups.len() - behind.len(),
                    groups.len(),
                    group.name_any(),
                    group.position(),
                    clusters.join(", "),
                    stragglers.into_iter().collect::<Vec<_>>().join(", "),
                    self.replicators_at(&positions)
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(settle).await;
        Ok(())
    }

    /// Asks each named group for a resync at the epoch given.
    async fn ask_resync(&self, groups: Vec<(String, u64)>) -> Result<(), BenchError> {
        futures::stream::iter(groups.into_iter().map(|(name, epoch)| {
            let api = self.groups();
            async move {
                let patch = serde_json::json!({"spec": {"resync": {"epoch": epoch}}});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(kube_error(format!("asking {name} for a resync")))
            }
        }))
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
        Ok(())
    }

    /// Many groups at once: cuts the replication link of one node (trial `index` picks which) — every
    /// volume there fails its copy, holding a write — and returns, per group with a volume on that node,
    /// how long from the cut until the hub showed it frozen (its next epoch at stage Release: every member
    /// acknowledged and the release decided); `None` for a group not frozen within the deadline.
    pub async fn link_failure(
        &mut self,
        index: usize,
    ) -> Result<Vec<Option<Duration>>, BenchError> {
        let nodes = self.replicators.len().max(1);
        let per_cluster = (self.sidecars.len() / self.members.len().max(1)).max(1);
        let (cluster, node) = ((index % nodes) / per_cluster, (index % nodes) % per_cluster);
        let Some(replicator) = self.replicators.get(index % nodes).cloned() else {
            return Ok(Vec::new());
        };
        let on_node: Vec<&Placement> = self
            .placements
            .iter()
            .filter(|p| p.cluster == cluster && p.node == node)
            .collect();
        let current = Self::positions(&self.list_groups().await?);
        // Per affected group, the epoch its freeze must reach.
        let mut waiting: BTreeMap<String, u64> = on_node
            .iter()
            .filter_map(|p| Some((p.group.clone(), current.get(&p.group)?.1 + 1)))
            .collect();
        let affected = waiting.len();
        // The watch is running (its initial list read) before the link is cut.
        let stream = watcher(self.groups(), watcher::Config::default())
            .default_backoff()
            .applied_objects();
        let mut stream = std::pin::pin!(stream);
        let mut listed = BTreeSet::new();
        let deadline = tokio::time::Instant::now() + self.deadline();
        while listed.len() < self.groups.len() {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(Ok(group))) => {
                    listed.insert(group.name_any());
                }
                Ok(Some(Err(_))) => {}
                Ok(None) | Err(_) => {
                    return Err(BenchError::Timeout("the hub's groups listed".to_owned()));
                }
            }
        }
        let started = Instant::now();
        for placement in &on_node {
            self.sequence += 1;
            replicator.fail_copy(&placement.handle, self.sequence);
        }
        let mut frozen = Vec::with_capacity(affected);
        while !waiting.is_empty() {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(Ok(group))) => {
                    let (epoch, stage) = group.position();
                    let name = group.name_any();
                    if waiting.get(&name).is_some_and(|&target| epoch >= target)
                        && stage >= Stage::Release
                    {
                        waiting.remove(&name);
                        frozen.push(Some(started.elapsed()));
                    }
                }
                Ok(Some(Err(_))) => {}
                Ok(None) | Err(_) => break,
            }
        }
        frozen.extend(std::iter::repeat_n(None, waiting.len()));
        Ok(frozen)
    }

    /// Deletes every group, waits until the hub no longer has them (their finalizers let every volume go
    /// and deleted the shards before letting them go), checks that no shard is left, and returns how
    /// long the deletion took.
    pub async fn delete_groups(&mut self) -> Result<Duration, BenchError> {
        let started = Instant::now();
        let groups = self.list_groups().await?;
        futures::stream::iter(groups.iter().map(|group| {
            let (api, name, deadline) = (self.groups(), group.name_any(), self.deadline());
            let uid = group.metadata.uid.clone().unwrap_or_default();
            async move {
                api.delete(&name, &kube::api::DeleteParams::default())
                    .await
                    .map_err(kube_error(format!("deleting {name}")))?;
                let deleted = kube::runtime::wait::await_condition(
                    api,
                    &name,
                    kube::runtime::wait::conditions::is_deleted(&uid),
                );
                match tokio::time::timeout(deadline, deleted).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(error)) => Err(BenchError::Timeout(format!(
                        "{name} deleted (watching it failed: {error})"
                    ))),
                    Err(_) => Err(BenchError::Timeout(format!("{name} deleted"))),
                }
            }
        }))
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
        let took = started.elapsed();
        let shards_left =
            Api::<lockstep_api::v1alpha1::ConsistencyGroupShard>::all(self.hub_client.clone())
                .list(&kube::api::ListParams::default())
                .await
                .map_err(kube_error("listing the shards"))?
                .items
                .len();
        if shards_left > 0 {
            return Err(BenchError::ShardsLeft(shards_left));
        }
        Ok(took)
    }

    /// Counts every request that changes an object, on the hub and every member cluster, for `window`
    /// of steady state (nothing failing, nothing asked): what the control system writes while idle.
    pub async fn steady(&self, window: Duration) -> Result<SteadyState, BenchError> {
        let servers: Vec<&ApiServer> = std::iter::once(&self.hub)
            .chain(self.members.iter().map(|member| &member.api))
            .collect();
        let count = |servers: &[&ApiServer]| -> Result<BTreeMap<String, u64>, BenchError> {
            let mut total = BTreeMap::new();
            for server in servers {
                let counts = server
                    .write_requests()
                    .map_err(|e| BenchError::ApiServer(e.to_string()))?;
                for (request, n) in counts {
                    *total.entry(request).or_default() += n;
                }
            }
            Ok(total)
        };
        for server in &servers {
            server.forget_requests();
        }
        let before = count(&servers)?;
        let cpu_before = operator_cpu();
        tokio::time::sleep(window).await;
        let after = count(&servers)?;
        let operator_cpu = operator_cpu()
            .zip(cpu_before)
            .map(|(after, before)| after.saturating_sub(before));
        let writes = after
            .into_iter()
            .filter_map(|(request, n)| {
                let grown = n.saturating_sub(before.get(&request).copied().unwrap_or(0));
                (grown > 0).then_some((request, grown))
            })
            .collect();
        Ok(SteadyState {
            window,
            idle_before: Duration::ZERO,
            writes,
            operator_cpu,
        })
    }

    /// The largest object of each kind the watches saw so far.
    pub fn largest_objects(&self) -> BTreeMap<&'static str, super::sizes::Largest> {
        self.sizes.largest()
    }

    /// Sidecars (nodes) in the cell.
    pub fn nodes(&self) -> usize {
        self.sidecars.len()
    }

    /// How long a trial, a resync or a deletion may take before it counts as lost: [`DEADLINE`], and
    /// [`DEADLINE_PER_GROUP`] for each group beyond the first.
    fn deadline(&self) -> Duration {
        let more = u32::try_from(self.groups.len().saturating_sub(1)).unwrap_or(u32::MAX);
        DEADLINE + DEADLINE_PER_GROUP.saturating_mul(more)
    }

    /// Stops everything.
    pub async fn shutdown(mut self) {
        self.hub_watch.abort();
        for sidecar in self.sidecars.drain(..) {
            sidecar.shutdown().await;
        }
        if let (Some(operator), Some(runtime)) =
            (self.operator.take(), self.operator_runtime.take())
        {
            let _ = runtime.spawn(operator.shutdown()).await;
            runtime.shutdown_background();
        }
        for replicator in &self.replicators {
            replicator.stop();
        }
        for member in &self.members {
            member.api.stop().await;
        }
        self.hub.stop().await;
        // Dropping the API servers stops a real cluster's etcd and removes its files.
    }
}

/// What was written while nothing happened.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SteadyState {
    /// How long it was watched.
    pub window: Duration,
    /// How long the cell sat idle before the window (the last resync's trailing writes drained).
    pub idle_before: Duration,
    /// Requests that changed objects, by `verb resource`, over every API server of the cell.
    pub writes: BTreeMap<String, u64>,
    /// CPU time the operator's threads spent in the window (None where /proc cannot tell).
    pub operator_cpu: Option<Duration>,
}

impl SteadyState {
    /// The writes, Lease renewals excepted (liveness is a Lease per node and the operator's own).
    pub fn writes_beyond_leases(&self) -> BTreeMap<&str, u64> {
        self.writes
            .iter()
            .filter(|(request, _)| !request.ends_with(" leases"))
            .map(|(request, n)| (request.as_str(), *n))
            .collect()
    }

    /// Writes per second of `request`s matching `resource` (`consistencygroups` counts its status too).
    pub fn per_second(&self, resource: &str) -> f64 {
        let n: u64 = self
            .writes
            .iter()
            .filter(|(request, _)| {
                request
                    .split_once(' ')
                    .is_some_and(|(_, r)| r == resource || r.starts_with(&format!("{resource}/")))
            })
            .map(|(_, n)| n)
            .sum();
        n as f64 / self.window.as_secs_f64().max(f64::EPSILON)
    }
}

/// The name of the operator's runtime threads (at most 15 bytes: what /proc keeps of a thread's name).
const OPERATOR_THREADS: &str = "bench-operator";

/// The CPU time (user and system) the operator's live threads have spent, from `/proc/self/task`; None
/// where that cannot be read. Clock ticks are USER_HZ, 100 a second on Linux.
pub fn operator_cpu() -> Option<Duration> {
    const TICKS_PER_SECOND: u64 = 100;
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task")
        .ok()
        .into_iter()
        .flatten()
    {
        let Ok(task) = task else { continue };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // "tid (name) state ppid ...": the name may hold spaces, the fields follow its last ')'.
        let Some((head, fields)) = stat.rsplit_once(')') else {
            continue;
        };
        if head.split_once('(').map(|(_, name)| name) != Some(OPERATOR_THREADS) {
            continue;
        }
        let fields: Vec<&str> = fields.split_whitespace().collect();
        // utime and stime are the 14th and 15th fields of the line, the 12th and 13th after the name.
        for field in fields.get(11..13).into_iter().flatten() {
            ticks += field.parse::<u64>().unwrap_or(0);
        }
    }
    (ticks > 0).then(|| Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND))
}

/// Stamps the moment the hub's group shows the trial's epoch at stage Release: the operator had every
/// volume's acknowledgement of the freeze and persisted the release decision.
async fn watch_hub(
    client: Client,
    probe: Arc<Probe>,
    writer: reflector::store::Writer<ConsistencyGroup>,
) {
    let stream = watcher(
        Api::<ConsistencyGroup>::all(client),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .applied_objects();
    let mut stream = std::pin::pin!(stream);
    while let Some(change) = stream.next().await {
        let Ok(group) = change else { continue };
        let now = Instant::now();
        let (epoch, stage) = group.position();
        probe.record(|marks| {
            if epoch == marks.epoch && stage >= Stage::Release {
                marks.frozen.get_or_insert(now);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operator_threads_cpu_time_is_read_from_proc() {
        assert_eq!(operator_cpu(), None, "no operator thread yet");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinning = stop.clone();
        let spinner = std::thread::Builder::new()
            .name(OPERATOR_THREADS.to_owned())
            .spawn(move || {
                let mut n = 0u64;
                while !spinning.load(std::sync::atomic::Ordering::Relaxed) {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            })
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut cpu = None;
        while cpu.is_none() && Instant::now() < deadline {
            cpu = operator_cpu();
            std::thread::yield_now();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spinner.join().unwrap();
        assert!(
            cpu.is_some_and(|cpu| cpu >= Duration::from_millis(10)),
            "{cpu:?}"
        );
    }
}
