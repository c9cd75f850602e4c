//! Mirrors: a copy of each hub group in every member cluster other than the hub, so that `kubectl get cg`
//! answers there and the cluster's sidecars learn groups, members and epochs through their own API server
//! (path 1).
//!
//! A mirror is labelled with the hub's identity and the hub group's UID, and annotated with the hub
//! group's creation time (the claim order of rule 5). Its spec is the hub's (edits made
//! in the mirror are overwritten by server-side apply with force); its status carries the epoch, stage, conditions
//! and counts; the cluster's shards list its members. A mirror another hub owns is never touched.

use std::collections::BTreeMap;

use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
};
use lockstep_api::v1alpha1::{
    ConsistencyGroup, ConsistencyGroupStatus, GROUP_CREATED_ANNOTATION, GROUP_UID_LABEL, HUB_LABEL,
};
use serde_json::json;

/// The field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "lockstep-operator";

/// Why a mirror was not written.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// A group of that name in the member cluster belongs to another hub, or is no mirror at all.
    #[error(
        "cluster {cluster} already has a ConsistencyGroup {name:?} owned by {owner}: left untouched"
    )]
    OwnedElsewhere {
        /// The member cluster.
        cluster: String,
        /// The group's name.
        name: String,
        /// Who owns it: another hub, or a person.
        owner: String,
    },
    /// The member cluster's API server refused or failed.
    #[error("cluster {cluster}: {source}")]
    Api {
        /// The member cluster.
        cluster: String,
        /// The error.
        #[source]
        source: kube::Error,
    },
}

impl MirrorError {
    /// Whether the member cluster answered that the mirror does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Api { source: kube::Error::Api(status), .. } if status.code == 404)
    }
}

/// The status a mirror in `cluster` carries: the hub's (bounded) status, counting that cluster's members
/// (the cluster's shards list them).
pub fn mirror_status(hub_status: &ConsistencyGroupStatus, cluster: &str) -> ConsistencyGroupStatus {
    let member_count = hub_status
        .volumes
        .iter()
        .flat_map(|counts| counts.clusters.iter())
        .find(|counts| counts.cluster == cluster)
        .map_or(0, |counts| counts.volumes);
    ConsistencyGroupStatus {
        member_count,
        members: Vec::new(),
        node_acknowledgements: hub_status
            .node_acknowledgements
            .iter()
            .filter(|record| record.cluster == cluster)
            .cloned()
            .collect(),
        ..hub_status.clone()
    }
}

/// Writes (creates or updates) the mirror of `group` into a member cluster: labels and spec. Its status
/// goes through [`crate::fanout::Fanout::mirror_status`], which never moves it backwards.
pub async fn apply(
    client: &Client,
    cluster: &str,
    hub_name: &str,
    group: &ConsistencyGroup,
) -> Result<(), MirrorError> {
    let name = group.name_any();
    let uid = group.group_uid().unwrap_or_default().to_owned();
    let api = Api::<ConsistencyGroup>::all(client.clone());
    let api_error = |source| MirrorError::Api {
        cluster: cluster.to_owned(),
        source,
    };
    let existing = api.get_opt(&name).await.map_err(api_error)?;
    if let Some(existing) = &existing {
        let labels = existing.labels();
        let owner = match labels.get(HUB_LABEL) {
            Some(hub) if hub == hub_name && labels.get(GROUP_UID_LABEL) == Some(&uid) => None,
            Some(hub) if hub == hub_name => Some(format!(
                "an older group of this hub (UID {:?})",
                labels.get(GROUP_UID_LABEL)
            )),
            Some(hub) => Some(format!("hub {hub:?}")),
            None => Some("no hub (a group created in that cluster)".to_owned()),
        };
        if let Some(owner) = owner {
            return Err(MirrorError::OwnedElsewhere {
                cluster: cluster.to_owned(),
                name,
                owner,
            });
        }
    }
    let labels = BTreeMap::from([
        (HUB_LABEL.to_owned(), hub_name.to_owned()),
        (GROUP_UID_LABEL.to_owned(), uid),
    ]);
    // The hub group's creation time goes along: with the UID it orders claims on a volume, the same way
    // in every cluster (rule 5); the mirror's own creation time is that of the copy.
    let annotations: BTreeMap<String, String> = group
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|created| (GROUP_CREATED_ANNOTATION.to_owned(), created.0.to_string()))
        .into_iter()
        .collect();
    let object = json!({
        "apiVersion": "lockstep.dev/v1alpha1",
        "kind": "ConsistencyGroup",
        "metadata": { "name": name, "labels": labels, "annotations": annotations },
        "spec": group.spec,
    });
    // Written only when it differs: a reconcile of an unchanged group writes nothing (steady state),
    // and an edit made in the mirror differs, so it is overwritten.
    let current = existing.as_ref().is_some_and(|existing| {
        existing.spec == group.spec
            && labels
                .iter()
                .all(|(key, value)| existing.labels().get(key) == Some(value))
            && annotations
                .iter()
                .all(|(key, value)| existing.annotations().get(key) == Some(value))
    });
    if !current {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch(&name, &params, &Patch::Apply(&object))
            .await
            .map_err(api_error)?;
    }
    // The status goes along when the mirror has none as recent: a new mirror, or one whose status the
    // fan-out could not write while it was missing. A mirror already at or past this status is left to
    // the fan-out, which orders its writes: this copy (from a reconcile) may be older than what it wrote.
    let mirrored_position = existing
        .as_ref()
        .and_then(|existing| existing.status.as_ref())
        .map(ConsistencyGroupStatus::position);
    if let Some(status) = &group.status
        && mirrored_position.is_none_or(|mirrored| mirrored < status.position())
    {
        write_status(client, cluster, &name, &mirror_status(status, cluster)).await?;
    }
    Ok(())
}

/// Writes a mirror's status (server-side apply on the status subresource).
pub async fn write_status(
    client: &Client,
    cluster: &str,
    name: &str,
    status: &ConsistencyGroupStatus,
) -> Result<(), MirrorError> {
    let api = Api::<ConsistencyGroup>::all(client.clone());
    let object = json!({
        "apiVersion": "lockstep.dev/v1alpha1",
        "kind": "ConsistencyGroup",
        "metadata": { "name": name },
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(name, &params, &Patch::Apply(&object))
        .await
        .map_err(|source| MirrorError::Api {
            cluster: cluster.to_owned(),
            source,
        })?;
    Ok(())
}

/// Deletes the mirror of a group from a member cluster, if this hub owns it.
pub async fn remove(
    client: &Client,
    cluster: &str,
    hub_name: &str,
    group: &ConsistencyGroup,
) -> Result<(), MirrorError> {
    let name = group.name_any();
    let api = Api::<ConsistencyGroup>::all(client.clone());
    let api_error = |source| MirrorError::Api {
        cluster: cluster.to_owned(),
        source,
    };
    let Some(existing) = api.get_opt(&name).await.map_err(api_error)? else {
        return Ok(());
    };
    if existing.labels().get(HUB_LABEL).map(String::as_str) != Some(hub_name)
        || existing.labels().get(GROUP_UID_LABEL).map(String::as_str) != group.group_uid()
    {
        return Ok(());
    }
    api.delete(&name, &Default::default())
        .await
        .map_err(api_error)?;
    Ok(())
}
