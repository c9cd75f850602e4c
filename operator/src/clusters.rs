//! Member clusters: a kube `Client` per `MemberCluster` (the hub's own for `local: true`, else from the
//! kubeconfig in its Secret), and what each cluster shows the resolution ([`ClusterView`]).
//!
//! A cluster that cannot be reached gives a view with `unavailable` set, within a bounded time: one
//! member never stalls the others.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{PersistentVolume, PersistentVolumeClaim, Secret},
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
};
use lockstep_api::{
    domain::ClusterPaths,
    v1alpha1::{MemberCluster, ReplicationNode},
};

use crate::{members::ClusterView, sessions::Sessions};

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
    /// The client for its API server, or why there is none.
    pub client: Result<Client, String>,
    /// The MemberCluster's resourceVersion the client was built from.
    pub version: Option<String>,
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
    Member {
        name,
        paths: spec.paths,
        local: spec.local,
        client,
        version: cluster.resource_version(),
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

async fn client_from_secret(
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
    for reported in &view.reported {
        view.node_of_volume
            .insert(reported.volume_handle.clone(), reported.node.clone());
    }
    let client = match &member.client {
        Ok(client) => client.clone(),
        Err(reason) => {
            view.unavailable = Some(reason.clone());
            return view;
        }
    };
    let listed = tokio::time::timeout(API_TIMEOUT, async {
        let params = ListParams::default();
        let claims = Api::<PersistentVolumeClaim>::all(client.clone())
            .list(&params)
            .await?;
        let volumes = Api::<PersistentVolume>::all(client.clone())
            .list(&params)
            .await?;
        let nodes = Api::<ReplicationNode>::all(client.clone())
            .list(&params)
            .await?;
        let leases = Api::<Lease>::namespaced(client, lease_namespace)
            .list(&params)
            .await?;
        Ok::<_, kube::Error>((claims.items, volumes.items, nodes.items, leases.items))
    })
    .await;
    match listed {
        Ok(Ok((claims, volumes, nodes, leases))) => {
            view.silent_nodes = silent_nodes(&leases);
            view.claims = claims;
            view.volumes = volumes;
            view.node_of_volume.extend(nodes_of_volumes(&nodes));
            view.state_of_volume = nodes
                .iter()
                .flat_map(|node| node.status.iter().flat_map(|status| status.volumes.iter()))
                .map(|volume| {
                    let stage = volume.stage.unwrap_or(lockstep_api::domain::Stage::Resume);
                    (
                        volume.volume_handle.clone(),
                        (volume.state, volume.epoch, stage),
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
    view
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

/// The node serving each volume, from the ReplicationNodes the sidecars keep.
pub fn nodes_of_volumes(nodes: &[ReplicationNode]) -> BTreeMap<String, String> {
    nodes
        .iter()
        .flat_map(|node| {
            let name = node.spec.node_name.clone();
            node.status
                .iter()
                .flat_map(|status| status.volumes.iter())
                .map(move |volume| (volume.volume_handle.clone(), name.clone()))
        })
        .collect()
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
    fn a_sidecar_that_stopped_renewing_its_lease_is_silent() {
        let leases = [lease("alive", 1), lease("gone", 60)];
        assert_eq!(silent_nodes(&leases), BTreeSet::from(["gone".to_owned()]));
    }
}
