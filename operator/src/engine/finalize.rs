//! The deletion finalizer: a deleted group releases and resumes its volumes before it goes (rule 9).

use super::*;

impl Engine {
    /// Deletion (rule 9): resume the group's volumes, wait until they acknowledged (or twice the hold
    /// timeout), say so in an Event, remove the mirrors, then let the object go.
    pub(super) async fn finalize(&self, uid: &str, name: &str) -> Result<(), EngineError> {
        let api = Api::<ConsistencyGroup>::all(self.inner.hub.clone());
        let group = api.get(name).await?;
        if !group
            .finalizers()
            .iter()
            .any(|finalizer| finalizer == FINALIZER)
        {
            return Ok(());
        }
        self.handle_observed(uid, name, Event::Evaluate, None)
            .await?;
        let group = api.get(name).await?;
        let grace = lockstep_api::domain::parse_duration(&group.spec.hold_timeout)
            .unwrap_or(std::time::Duration::from_secs(30))
            * 2;
        let deadline_passed = group
            .metadata
            .deletion_timestamp
            .as_ref()
            .is_some_and(|since| {
                let elapsed = k8s_openapi::jiff::Timestamp::now().duration_since(since.0);
                elapsed.unsigned_abs() > grace
            });
        let status =
            crate::ledger::hydrate(group.status.clone(), self.volume_record(uid).as_deref())
                .unwrap_or_default();
        let Some(missing) = freeze::deletion_outcome(&status, deadline_passed) else {
            return Ok(());
        };
        let members = self.members().await;
        // Under the group's lock, so that no mirror write of a reconcile that began before the deletion
        // lands after the removal and leaves an orphan.
        let lock = self.lock_for(uid);
        let _mirrors = lock.memory.lock().await;
        for cluster in Self::member_clusters_of(&group) {
            let Some(member) = members.get(&cluster) else {
                continue;
            };
            let Ok(client) = &member.client else { continue };
            if member.local {
                continue;
            }
            if let Err(error) = mirror::remove(client, &cluster, &self.inner.hub_name, &group).await
            {
                tracing::warn!(%error, "mirror not removed");
            }
        }
        self.remove_shards(uid, &group).await;
        if missing.is_empty() {
            let message = format!(
                "deleted: every member volume resumed normal replication; the group's consistency guarantees ended (epoch {})",
                status.epoch
            );
            self.record(&group, false, "Deleted", &message).await;
        } else {
            let message = format!(
                "deleted after {grace:?} without the resume acknowledged by {}: their sidecars resume them when they next hear of it",
                missing.join(", ")
            );
            self.record(&group, true, "DeletedUnacknowledged", &message)
                .await;
        }
        let finalizers = group
            .finalizers()
            .iter()
            .filter(|finalizer| *finalizer != FINALIZER)
            .cloned()
            .collect();
        self.set_finalizers(name, &group, finalizers).await
    }

    pub(super) async fn set_finalizers(
        &self,
        name: &str,
        group: &ConsistencyGroup,
        finalizers: Vec<String>,
    ) -> Result<(), EngineError> {
        let api = Api::<ConsistencyGroup>::all(self.inner.hub.clone());
        let patch = serde_json::json!({
            "metadata": { "finalizers": finalizers, "resourceVersion": group.resource_version() }
        });
        match api
            .patch(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(error)) if error.code == 409 || error.code == 404 => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}
