//! `kubectl lockstep members GROUP`: each member volume's chain PVC → PV → volume handle → node as the
//! operator resolved it (the group's ConsistencyGroupShards), and for a volume it could not resolve,
//! why: read from that member cluster's API server the way the operator reads it (the hub for `local`
//! clusters, the kubeconfig Secret the MemberCluster names otherwise; a GrpcOnly cluster cannot be read).

use k8s_openapi::api::{
    core::v1::{PersistentVolume, PersistentVolumeClaim},
    storage::v1::VolumeAttachment,
};
use kube::{Api, Client, api::ListParams};
use lockstep_api::{
    domain::ClusterPaths,
    v1alpha1::{ConsistencyGroup, MemberCluster, MemberVolumeStatus},
};
use serde::Serialize;

use crate::{
    PluginError,
    connect::Connection,
    output::{Report, or_dash, table},
    status::VolumeLine,
};

/// What `members` prints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MembersReport {
    /// The group.
    pub group: String,
    /// The MembersResolved condition's message: the operator's own summary.
    pub members_resolved: Option<String>,
    /// Every member volume.
    pub members: Vec<VolumeLine>,
}

/// Reads the group, its shards, and for each unresolved volume its member cluster.
pub async fn report(connection: &Connection, name: &str) -> Result<MembersReport, PluginError> {
    let group = connection.group(name).await?;
    let volumes = connection.volumes(&group).await?;
    let mut members: Vec<VolumeLine> = volumes.members.iter().map(VolumeLine::of).collect();
    members.extend(named_but_not_listed(&group, &volumes.members));
    for member in members.iter_mut().filter(|member| !member.resolved) {
        member.why = Some(why_unresolved(connection, member).await);
    }
    let members_resolved = group.status.as_ref().and_then(|status| {
        status
            .conditions
            .iter()
            .find(|condition| condition.type_ == "MembersResolved")
            .map(|condition| condition.message.clone())
    });
    Ok(MembersReport {
        group: name.to_owned(),
        members_resolved,
        members,
    })
}

/// Claims the spec names by name that no shard lists (the operator has not listed them yet).
fn named_but_not_listed(
    group: &ConsistencyGroup,
    listed: &[MemberVolumeStatus],
) -> Vec<VolumeLine> {
    let mut missing = Vec::new();
    for member in &group.spec.members {
        for pvc in member.pvc_names.iter().flatten() {
            let known = listed.iter().any(|volume| {
                volume.cluster == member.cluster
                    && volume.namespace == member.namespace
                    && &volume.pvc == pvc
            });
            if !known {
                missing.push(VolumeLine {
                    cluster: member.cluster.clone(),
                    namespace: member.namespace.clone(),
                    pvc: pvc.clone(),
                    persistent_volume: None,
                    volume_handle: None,
                    node: None,
                    state: None,
                    acknowledged: None,
                    resolved: false,
                    why: None,
                });
            }
        }
    }
    missing
}

/// Why `member` is unresolved, in one sentence, from its member cluster.
async fn why_unresolved(connection: &Connection, member: &VolumeLine) -> String {
    let cluster = &member.cluster;
    let client = match member_client(connection, cluster).await {
        Ok(client) => client,
        Err(reason) => return reason,
    };
    let claim = format!("PVC {}/{}", member.namespace, member.pvc);
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &member.namespace);
    let pvc = match claims.get_opt(&member.pvc).await {
        Ok(Some(pvc)) => pvc,
        Ok(None) => return format!("cluster {cluster} has no {claim}"),
        Err(error) => return format!("cannot read {claim} in cluster {cluster}: {error}"),
    };
    let Some(pv_name) = pvc.spec.as_ref().and_then(|spec| spec.volume_name.clone()) else {
        let phase = pvc
            .status
            .as_ref()
            .and_then(|status| status.phase.clone())
            .unwrap_or_else(|| "Pending".to_owned());
        return format!("{claim} is {phase}: not bound to a PersistentVolume yet");
    };
    let pv = match Api::<PersistentVolume>::all(client.clone())
        .get_opt(&pv_name)
        .await
    {
        Ok(Some(pv)) => pv,
        Ok(None) => {
            return format!(
                "{claim} names PV {pv_name}, which does not exist in cluster {cluster}"
            );
        }
        Err(error) => return format!("cannot read PV {pv_name} in cluster {cluster}: {error}"),
    };
    let Some(handle) = pv
        .spec
        .as_ref()
        .and_then(|spec| spec.csi.as_ref())
        .map(|csi| csi.volume_handle.clone())
    else {
        return format!(
            "PV {pv_name} is not a CSI volume: Lockstep's sidecar serves CSI volumes only"
        );
    };
    // Without the right to list VolumeAttachments, only the PV's node affinity can name a node.
    let attachments = Api::<VolumeAttachment>::all(client)
        .list(&ListParams::default())
        .await
        .map(|list| list.items)
        .unwrap_or_default();
    let bound = lockstep_operator::clusters::bound_nodes(&[std::sync::Arc::new(pv)], &attachments);
    match bound.get(&handle) {
        Some(node) => format!(
            "cluster {cluster} binds PV {pv_name} (handle {handle}) to node {node}, but the operator has not resolved it yet: see the group's MembersResolved condition"
        ),
        None => format!(
            "PV {pv_name} (handle {handle}) names no node: no required kubernetes.io/hostname node affinity and no attached VolumeAttachment (for drivers that name none, set the MemberCluster's volumeBinding: SidecarClaims)"
        ),
    }
}

/// A client for member cluster `cluster`'s API server as the operator builds it, or why there is none.
async fn member_client(connection: &Connection, cluster: &str) -> Result<Client, String> {
    let hub = &connection.client;
    let member = Api::<MemberCluster>::all(hub.clone())
        .get_opt(cluster)
        .await
        .map_err(|error| format!("cannot read MemberCluster {cluster}: {error}"))?
        .ok_or_else(|| format!("the hub has no MemberCluster named {cluster}"))?;
    if member.spec.local {
        return Ok(hub.clone());
    }
    if member.spec.paths == ClusterPaths::GrpcOnly {
        return Err(format!(
            "cluster {cluster} is GrpcOnly: the hub cannot read it; the volume resolves once exactly one of its sidecars claims it"
        ));
    }
    let Some(reference) = &member.spec.kubeconfig_secret_ref else {
        return Err(format!(
            "MemberCluster {cluster} names no kubeconfigSecretRef"
        ));
    };
    lockstep_operator::clusters::client_from_secret(
        hub,
        &reference.namespace,
        &reference.name,
        &reference.key,
    )
    .await
    .map_err(|reason| format!("cannot reach cluster {cluster}: {reason}"))
}

impl Report for MembersReport {
    fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .members
            .iter()
            .map(|member| {
                vec![
                    member.cluster.clone(),
                    member.namespace.clone(),
                    member.pvc.clone(),
                    or_dash(member.persistent_volume.as_ref()),
                    or_dash(member.volume_handle.as_ref()),
                    or_dash(member.node.as_ref()),
                    if member.resolved {
                        "Resolved".to_owned()
                    } else {
                        format!("Unresolved: {}", member.why.as_deref().unwrap_or("?"))
                    },
                ]
            })
            .collect();
        let mut text = table(
            &[
                "CLUSTER",
                "NAMESPACE",
                "PVC",
                "PV",
                "VOLUME HANDLE",
                "NODE",
                "RESOLUTION",
            ],
            &rows,
        );
        if let Some(summary) = &self.members_resolved {
            text.push_str(&format!("MembersResolved: {summary}\n"));
        }
        text
    }
}
