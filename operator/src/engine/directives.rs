//! Where directives go besides the gRPC push: the mirrors in member clusters, the current points each
//! cluster's sidecars should hold, and resending what a node has not acknowledged.

use super::*;

/// How long a directive is left to be acknowledged before it is sent again to the nodes that have not.
pub const RESEND_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl Engine {
    /// Writes the group's mirror into every member cluster reached through its API server (not the hub),
    /// unless the group is being deleted (its finalizer removes the mirrors, under the same lock).
    pub(super) async fn mirror(&self, uid: &str, name: &str) -> Result<(), EngineError> {
        let lock = self.lock_for(uid);
        let _mirrors = lock.memory.lock().await;
        let group = Api::<ConsistencyGroup>::all(self.inner.hub.clone())
            .get(name)
            .await?;
        if group.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        let members = self.members().await;
        for cluster in Self::member_clusters_of(&group) {
            let Some(member) = members.get(&cluster) else {
                continue;
            };
            let Ok(client) = &member.client else { continue };
            if member.local {
                continue;
            }
            match mirror::apply(client, &cluster, &self.inner.hub_name, &group).await {
                Ok(()) => {
                    if let Some(status) = &group.status {
                        self.inner.fanout.mirror_status(member, name, status);
                    }
                }
                Err(error) => tracing::warn!(%error, "mirror not written"),
            }
        }
        Ok(())
    }

    /// Sends the current directive of every group with members in `cluster` to one node (a sidecar that
    /// just subscribed: "send again, collect acknowledgements again").
    pub fn current_directives_for(&self, cluster: &str) -> Vec<(GroupEpoch, String)> {
        self.groups()
            .iter()
            .filter(|group| {
                group
                    .spec
                    .members
                    .iter()
                    .any(|member| member.cluster == cluster)
            })
            .filter_map(|group| {
                let uid = group.metadata.uid.clone()?;
                let (epoch, stage) = group.position();
                group.status.as_ref()?.stage?;
                Some((
                    GroupEpoch {
                        group_uid: uid,
                        epoch,
                        stage,
                    },
                    group.name_any(),
                ))
            })
            .filter(|(point, _)| point.stage != Stage::Resume || point.epoch > 0)
            .collect()
    }

    /// Sends each group's current directive again, over gRPC, to the connected sidecars of every member
    /// cluster with a volume that has not acknowledged it. A persisted point whose send was lost (the
    /// replica that decided it died between persisting and sending, or a stream dropped the message)
    /// reaches a gRPC-only member no other way until it resubscribes; enforcing is idempotent, so a
    /// repeat costs nothing. Returns how many nodes were sent a directive.
    pub fn resend_unacknowledged(&self) -> usize {
        let mut sent = 0;
        let groups = self.groups();
        let uids: BTreeSet<&str> = groups
            .iter()
            .filter_map(|group| group.metadata.uid.as_deref())
            .collect();
        self.inner.sessions.forget_directives_except(&uids);
        for group in &groups {
            let (Some(uid), Some(status)) = (group.metadata.uid.clone(), group.status.as_ref())
            else {
                continue;
            };
            let (epoch, stage) = group.position();
            if status.stage.is_none() || (stage == Stage::Resume && epoch == 0) {
                continue; // never froze: nothing to send
            }
            let behind: BTreeSet<String> = self
                .member_volumes_of(&uid)
                .iter()
                .filter(|member| {
                    member
                        .acknowledged
                        .as_ref()
                        .is_none_or(|ack| (ack.epoch, ack.stage) < (epoch, stage))
                })
                .map(|member| member.cluster.clone())
                .collect();
            if behind.is_empty() {
                continue;
            }
            let point = GroupEpoch {
                group_uid: uid,
                epoch,
                stage,
            };
            let clusters: Vec<String> = behind.into_iter().collect();
            let Some(nodes) = self.inner.sessions.send_directive_again(
                &clusters,
                &point,
                &group.name_any(),
                RESEND_INTERVAL,
            ) else {
                continue; // sent a moment ago: its acknowledgements are on their way
            };
            tracing::debug!(group = %group.name_any(), epoch, ?stage, nodes, "directive sent again to unacknowledged clusters");
            sent += nodes;
        }
        sent
    }
}
