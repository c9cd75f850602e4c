//! Member clusters: a kube `Client` per `MemberCluster` (the hub's own for `local: true`, else from the
//! kubeconfig in its Secret), and what each cluster shows the resolution ([`ClusterView`]).
//!
//! A cluster that cannot be reached gives a view with `unavailable` set, within a bounded time: one
//! member never stalls the others.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{PersistentVolume, PersistentVolumeClaim, Secret},
    storage::v1::VolumeAttachment,
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{ApiResource, DynamicObject, ListParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use lockstep_api::{
    domain::{ClusterPaths, VolumeBinding},
    v1alpha1::{MemberCluster, ReplicationNode},
};

use crate::{
    member_cache::MemberCache,
    members::{ClusterView, ReportedState},
    sessions::Sessions,
};

/// How long one member cluster may take to answer a list before it counts as unreachable.
pub const API_TIMEOUT: Duration = Duration::from_secs(5);

/// One member cluster as the operator reaches it.
#[derive(Clone)]
pub struct Member {
    /// The MemberCluster's name.
    pub name: String,
    /// Which paths reach it.
    pub paths: ClusterPaths,
    /// True for the hub itself (no mirror).
    pub local: bool,
    /// Where its volumes' nodes come from.
    pub volume_binding: VolumeBinding,
    /// The client for its API server, or why there is none.
    pub client: Result<Client, String>,
    /// The MemberCluster's generation (its spec) the client was built from. Not its resourceVersion:
    /// the operator's own status writes (a sidecar connecting changes the Reachable message) must not
    /// reconnect the cluster, which restarts its claim and volume watches with a full list of each.
    pub version: Option<String>,
    /// Its claims, volumes, attachments and ReplicationNodes, watched (none without an API client).
    pub cache: Option<Arc<MemberCache>>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("name", &self.name)
            .field("paths", &self.paths)
            .field("local", &self.local)
            .field("client", &self.client.as_ref().map(|_| "connected"))
            .finish()
    }
}

/// Builds the client for a member cluster. Never fails: a problem becomes the reason in `client`.
pub async fn connect(hub: &Client, cluster: &MemberCluster) -> Member {
    let name = cluster.name_any();
    let spec = &cluster.spec;
    let client = if spec.local {
        Ok(hub.clone())
    } else if spec.paths == ClusterPaths::GrpcOnly {
        Err("the cluster is GrpcOnly: the hub does not reach its API server".to_owned())
    } else {
        match &spec.kubeconfig_secret_ref {
            None => Err("no kubeconfigSecretRef".to_owned()),
            Some(reference) => {
                client_from_secret(hub, &reference.namespace, &reference.name, &reference.key).await
            }
        }
    };
    if let Err(reason) = &client {
        tracing::debug!(cluster = %name, %reason, "member cluster has no API client");
    }
    let cache = client.as_ref().ok().map(MemberCache::start);
    Member {
        name,
        paths: spec.paths,
        local: spec.local,
        volume_binding: spec.volume_binding,
        client,
        version: cluster
            .metadata
            .generation
            .map(|generation| generation.to_string()),
        cache,
    }
}

/// Whether the member's API server answers, within a bounded time.
pub async fn probe(member: &Member) -> Result<(), String> {
    let client = member.client.as_ref().map_err(Clone::clone)?;
    match tokio::time::timeout(API_TIMEOUT, client.apiserver_version()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(format!(
            "the API server of cluster {} failed: {error}",
            member.name
        )),
        Err(_) => Err(format!(
            "the API server of cluster {} did not answer within {API_TIMEOUT:?}",
            member.name
        )),
    }
}

/// A client for the API server of the kubeconfig in key `key` of Secret `namespace`/`name` (read through
/// `hub`), or why there is none, in one sentence.
pub async fn client_from_secret(
    hub: &Client,
    namespace: &str,
    name: &str,
    key: &str,
) -> Result<Client, String> {
    let secrets = Api::<Secret>::namespaced(hub.clone(), namespace);
    let secret = tokio::time::timeout(API_TIMEOUT, secrets.get(name))
        .await
        .map_err(|_| format!("reading Secret {namespace}/{name} took over {API_TIMEOUT:?}"))?
        .map_err(|error| format!("cannot read Secret {namespace}/{name}: {error}"))?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .map(|value| value.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|data| data.get(key))
                .map(|value| value.clone().into_bytes())
        })
        .ok_or_else(|| format!("Secret {namespace}/{name} has no key {key:?}"))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("Secret {namespace}/{name} key {key:?} is not UTF-8 text"))?;
    let kubeconfig = Kubeconfig::from_yaml(&text).map_err(|error| {
        format!("Secret {namespace}/{name} key {key:?} is not a valid kubeconfig: {error}")
    })?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|error| {
            format!("Secret {namespace}/{name} key {key:?} is not a usable kubeconfig: {error}")
        })?;
    Client::try_from(config)
        .map_err(|error| format!("cannot build a client from Secret {namespace}/{name}: {error}"))
}

/// What a member cluster shows: its PVCs, PVs and the node serving each volume (API path), plus what its
/// sidecars reported over gRPC.
pub async fn view(member: &Member, sessions: &Sessions, lease_namespace: &str) -> ClusterView {
    let mut view = ClusterView {
        paths: member.paths,
        reported: sessions.reported_volumes(&member.name),
        // What a gRPC-only cluster's sidecars said; an API server that answers says it below instead.
        state_of_volume: sessions.reported_states(&member.name),
        ..ClusterView::default()
    };
    let claimed = view
        .reported
        .iter()
        .map(|reported| (reported.volume_handle.clone(), reported.node.clone()));
    (view.node_of_volume, view.contested) = sole_claims(claimed);
    let client = match &member.client {
        Ok(client) => client.clone(),
        Err(reason) => {
            view.unavailable = Some(reason.clone());
            return view;
        }
    };
    let cache = member.cache.as_deref();
    let listed = tokio::time::timeout(API_TIMEOUT, async {
        let params = ListParams::default();
        // Live, and small (one Lease a node): whether the cluster answers at all.
        let leases = Api::<Lease>::namespaced(client.clone(), lease_namespace)
            .list(&params)
            .await?;
        let (claims, volumes) = match cache.and_then(MemberCache::snapshot) {
            Some(cached) => cached,
            None => (
                Api::<PersistentVolumeClaim>::all(client.clone())
                    .list(&params)
                    .await?
                    .items
                    .into_iter()
                    .map(Arc::new)
                    .collect(),
                Api::<PersistentVolume>::all(client.clone())
                    .list(&params)
                    .await?
                    .items
                    .into_iter()
                    .map(Arc::new)
                    .collect(),
            ),
        };
        let nodes = match cache.and_then(|cache| cache.nodes.snapshot()) {
            Some(nodes) => nodes,
            // A ReplicationNode that does not decode is left out here; the watch of path 1 says why.
            None => replication_nodes(client.clone())
                .list(&params)
                .await?
                .items
                .into_iter()
                .filter_map(|node| decode_replication_node(node).ok().map(Arc::new))
                .collect(),
        };
        Ok::<_, kube::Error>((claims, volumes, nodes, leases.items))
    })
    .await;
    match listed {
        Ok(Ok((claims, volumes, nodes, leases))) => {
            // VolumeAttachments (written by the attach/detach controller) are optional: a cluster, or a
            // test API server, that does not serve them leaves the PVs' node affinity alone.
            let attachments = match cache.and_then(MemberCache::attachments) {
                Some(attachments) => attachments,
                None => tokio::time::timeout(
                    API_TIMEOUT,
                    Api::<VolumeAttachment>::all(client.clone()).list(&ListParams::default()),
                )
                .await
                .ok()
                .and_then(Result::ok)
                .map(|list| list.items)
                .unwrap_or_default(),
            };
            view.bound_node_of_volume = bound_nodes(&volumes, &attachments);
            view.binding_required = member.volume_binding == VolumeBinding::Required;
            view.silent_nodes = silent_nodes(&leases);
            view.claims = claims;
            view.volumes = volumes;
            let reported = std::mem::take(&mut view.reported);
            let claimed = reported
                .iter()
                .map(|reported| (reported.volume_handle.clone(), reported.node.clone()))
                .chain(claims_of_nodes(&nodes));
            (view.node_of_volume, view.contested) = sole_claims(claimed);
            view.reported = reported;
            view.state_of_volume = nodes
                .iter()
                .flat_map(|node| {
                    let reporter = node.spec.node_name.as_str();
                    node.status
                        .iter()
                        .flat_map(|status| status.volumes.iter())
                        .map(move |volume| (reporter, volume))
                })
                .map(|(reporter, volume)| {
                    let stage =
                        lockstep_api::domain::Position::decode(volume.epoch, volume.stage).stage;
                    (
                        (volume.volume_handle.clone(), reporter.to_owned()),
                        ReportedState {
                            state: volume.state,
                            epoch: volume.epoch,
                            stage,
                        },
                    )
                })
                .collect();
        }
        Ok(Err(error)) => {
            view.unavailable = Some(format!(
                "API server of cluster {} failed: {error}",
                member.name
            ))
        }
        Err(_) => {
            view.unavailable = Some(format!(
                "API server of cluster {} did not answer within {API_TIMEOUT:?}",
                member.name
            ))
        }
    }
    view.indexed()
}

/// Nodes whose sidecar Lease (`lockstep-sidecar-<node>`) was not renewed within its duration.
pub fn silent_nodes(leases: &[Lease]) -> BTreeSet<String> {
    let now = k8s_openapi::jiff::Timestamp::now();
    leases
        .iter()
        .filter_map(|lease| {
            let node = lease
                .metadata
                .name
                .as_deref()?
                .strip_prefix("lockstep-sidecar-")?;
            let spec = lease.spec.as_ref()?;
            let renewed = spec.renew_time.as_ref()?.0;
            let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
            let expired = now.as_second() > renewed.as_second() + duration;
            expired.then(|| node.to_owned())
        })
        .collect()
}

/// A member cluster's ReplicationNodes, read untyped: one object the operator cannot decode (a value its
/// types do not know, which a member cluster whose CRD checks less than Lockstep's lets through) is left
/// out alone (see [`decode_replication_node`]) instead of failing the list, or the watch, of every node of
/// the cluster.
pub fn replication_nodes(client: Client) -> Api<DynamicObject> {
    Api::all_with(client, &ApiResource::erase::<ReplicationNode>(&()))
}

/// One ReplicationNode read by [`replication_nodes`], decoded; the decoder's complaint when it does not.
pub fn decode_replication_node(object: DynamicObject) -> Result<ReplicationNode, String> {
    serde_json::to_value(object)
        .and_then(serde_json::from_value)
        .map_err(|error| error.to_string())
}

/// The (volume handle, node) claims of the ReplicationNodes the sidecars keep: each node says which
/// volumes it serves.
pub fn claims_of_nodes(
    nodes: &[Arc<ReplicationNode>],
) -> impl Iterator<Item = (String, String)> + '_ {
    nodes.iter().flat_map(|node| {
        let name = node.spec.node_name.clone();
        node.status
            .iter()
            .flat_map(|status| status.volumes.iter())
            .map(move |volume| (volume.volume_handle.clone(), name.clone()))
    })
}

/// Claims → the node of each handle exactly one node claims, and the handles several nodes claim.
pub fn sole_claims(
    claims: impl IntoIterator<Item = (String, String)>,
) -> (BTreeMap<String, String>, BTreeMap<String, BTreeSet<String>>) {
    let mut by_handle: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (handle, node) in claims {
        by_handle.entry(handle).or_default().insert(node);
    }
    let mut sole = BTreeMap::new();
    let mut contested = BTreeMap::new();
    for (handle, nodes) in by_handle {
        if nodes.len() == 1 {
            if let Some(node) = nodes.into_iter().next() {
                sole.insert(handle, node);
            }
        } else {
            contested.insert(handle, nodes);
        }
    }
    (sole, contested)
}

/// The node each CSI volume is bound to by what no node writes: its PersistentVolume's required node
/// affinity naming one `kubernetes.io/hostname`, else a VolumeAttachment that is attached. A volume
/// attached to two nodes (a multi-attach) is bound to none.
pub fn bound_nodes(
    volumes: &[Arc<PersistentVolume>],
    attachments: &[VolumeAttachment],
) -> BTreeMap<String, String> {
    let mut bound = BTreeMap::new();
    let mut handle_of_pv = BTreeMap::new();
    for pv in volumes {
        let Some(spec) = &pv.spec else { continue };
        let Some(handle) = spec.csi.as_ref().map(|csi| csi.volume_handle.clone()) else {
            continue;
        };
        if let Some(name) = &pv.metadata.name {
            handle_of_pv.insert(name.clone(), handle.clone());
        }
        let hostnames: BTreeSet<&str> = spec
            .node_affinity
            .iter()
            .flat_map(|affinity| affinity.required.iter())
            .flat_map(|required| required.node_selector_terms.iter())
            .flat_map(|term| term.match_expressions.iter().flatten())
            .filter(|expression| {
                expression.key == "kubernetes.io/hostname" && expression.operator == "In"
            })
            .flat_map(|expression| expression.values.iter().flatten())
            .map(String::as_str)
            .collect();
        if let [node] = hostnames.into_iter().collect::<Vec<_>>()[..] {
            bound.insert(handle, node.to_owned());
        }
    }
    let mut attached: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for attachment in attachments {
        let is_attached = attachment
            .status
            .as_ref()
            .is_some_and(|status| status.attached);
        let Some(handle) = attachment
            .spec
            .source
            .persistent_volume_name
            .as_ref()
            .and_then(|pv| handle_of_pv.get(pv))
        else {
            continue;
        };
        if is_attached {
            attached
                .entry(handle.clone())
                .or_default()
                .insert(attachment.spec.node_name.clone());
        }
    }
    for (handle, nodes) in attached {
        if nodes.len() == 1
            && let Some(node) = nodes.into_iter().next()
        {
            bound.entry(handle).or_insert(node);
        }
    }
    bound
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::coordination::v1::LeaseSpec,
        apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
        jiff::{SignedDuration, Timestamp},
    };

    use super::*;

    fn lease(node: &str, renewed_seconds_ago: i64) -> Lease {
        let renewed = Timestamp::now() - SignedDuration::from_secs(renewed_seconds_ago);
        Lease {
            metadata: ObjectMeta {
                name: Some(format!("lockstep-sidecar-{node}")),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(renewed)),
                lease_duration_seconds: Some(15),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_handle_two_nodes_claim_is_contested_and_a_binding_names_one_node() {
        use k8s_openapi::api::{
            core::v1::{
                CSIPersistentVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
                PersistentVolumeSpec, VolumeNodeAffinity,
            },
            storage::v1::{VolumeAttachmentSource, VolumeAttachmentSpec, VolumeAttachmentStatus},
        };
        let claims = [
            ("vol-a".to_owned(), "node-a".to_owned()),
            ("vol-b".to_owned(), "node-b".to_owned()),
            ("vol-b".to_owned(), "node-a".to_owned()),
        ];
        let (sole, contested) = sole_claims(claims);
        assert_eq!(
            sole,
            BTreeMap::from([("vol-a".to_owned(), "node-a".to_owned())])
        );
        assert_eq!(
            contested["vol-b"],
            BTreeSet::from(["node-a".to_owned(), "node-b".to_owned()])
        );

        let pv = |name: &str, handle: &str, hostname: Option<&str>| PersistentVolume {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeSpec {
                csi: Some(CSIPersistentVolumeSource {
                    driver: "nbd.lockstep.dev".into(),
                    volume_handle: handle.into(),
                    ..Default::default()
                }),
                node_affinity: hostname.map(|node| VolumeNodeAffinity {
                    required: Some(NodeSelector {
                        node_selector_terms: vec![NodeSelectorTerm {
                            match_expressions: Some(vec![NodeSelectorRequirement {
                                key: "kubernetes.io/hostname".into(),
                                operator: "In".into(),
                                values: Some(vec![node.into()]),
                            }]),
                            match_fields: None,
                        }],
                    }),
                }),
                ..Default::default()
            }),
            status: None,
        };
        let attachment = |pv: &str, node: &str, attached: bool| VolumeAttachment {
            metadata: ObjectMeta {
                name: Some(format!("{pv}-{node}")),
                ..Default::default()
            },
            spec: VolumeAttachmentSpec {
                attacher: "nbd.lockstep.dev".into(),
                node_name: node.into(),
                source: VolumeAttachmentSource {
                    persistent_volume_name: Some(pv.into()),
                    ..Default::default()
                },
            },
            status: Some(VolumeAttachmentStatus {
                attached,
                ..Default::default()
            }),
        };
        let volumes = [
            pv("pv-a", "vol-a", Some("node-a")),
            pv("pv-b", "vol-b", None),
            pv("pv-c", "vol-c", None),
            pv("pv-d", "vol-d", None),
        ]
        .map(Arc::new);
        let attachments = [
            attachment("pv-b", "node-b", true),
            attachment("pv-c", "node-c", false),
            attachment("pv-d", "node-a", true),
            attachment("pv-d", "node-b", true),
        ];
        let bound = bound_nodes(&volumes, &attachments);
        assert_eq!(
            bound,
            BTreeMap::from([
                ("vol-a".to_owned(), "node-a".to_owned()),
                ("vol-b".to_owned(), "node-b".to_owned()),
            ])
        );
    }

    #[test]
    fn a_sidecar_that_stopped_renewing_its_lease_is_silent() {
        let leases = [lease("alive", 1), lease("gone", 60)];
        assert_eq!(silent_nodes(&leases), BTreeSet::from(["gone".to_owned()]));
    }
}
