//! Path 1 in: the reports and acknowledgements a member cluster's ReplicationNodes carry, checked against
//! the node that wrote them and handed to each group as one batch.

use super::*;

impl Engine {
    /// The reports and acknowledgements seen in a member cluster's ReplicationNode (path 1), handed to
    /// each group as one batch.
    pub async fn from_replication_nodes(
        &self,
        cluster: &str,
        node: &lockstep_api::v1alpha1::ReplicationNode,
    ) {
        let Some(status) = &node.status else { return };
        let node_name = &node.spec.node_name;
        // A node speaks only for its own volumes, on this path too: volumes a group resolves in this
        // cluster to another node (or to no single node) are dropped from its reports and
        // acknowledgements. (Which ReplicationNode a sidecar may write is the chart's admission policy.)
        let mut foreign: BTreeSet<String> = BTreeSet::new();
        let mut own = BTreeMap::<&str, Vec<lockstep_api::v1alpha1::MemberVolumeStatus>>::new();
        for uid in status
            .failures
            .iter()
            .map(|failure| failure.group_uid.as_str())
            .chain(
                status
                    .enforced
                    .iter()
                    .map(|enforced| enforced.group_uid.as_str()),
            )
        {
            if !own.contains_key(uid) {
                let members = self
                    .last_status(uid)
                    .await
                    .map(|status| status.members)
                    .unwrap_or_default();
                own.insert(uid, members);
            }
        }
        let mut on_this_node = |uid: &str, handle: &str| {
            let elsewhere = own.get(uid).is_some_and(|members| {
                members.iter().any(|member| {
                    member.cluster == cluster
                        && member.volume_handle.as_deref() == Some(handle)
                        && member.node.as_deref() != Some(node_name.as_str())
                })
            });
            if elsewhere {
                foreign.insert(handle.to_owned());
            }
            !elsewhere
        };
        let mut by_group: BTreeMap<&str, Vec<Event>> = BTreeMap::new();
        for failure in status
            .failures
            .iter()
            .filter(|failure| on_this_node(&failure.group_uid, &failure.volume_handle))
        {
            let event = Event::Report(freeze::Report {
                path: Path::Api,
                cluster: cluster.to_owned(),
                node: node.spec.node_name.clone(),
                volume_handle: failure.volume_handle.clone(),
                epoch_seen: failure.epoch_seen,
                message: lockstep_api::domain::bounded_message(&failure.error),
            });
            by_group.entry(&failure.group_uid).or_default().push(event);
        }
        for volume in &status.volumes {
            let (Some(group_uid), Some(held)) = (&volume.group_uid, &volume.hold_timeout) else {
                continue;
            };
            let event = Event::HoldTimedOut(freeze::HoldTimeoutReport {
                path: Path::Api,
                cluster: cluster.to_owned(),
                volume_handle: volume.volume_handle.clone(),
                epoch: held.epoch,
                failed_writes: held.failed_writes,
                since: Some(held.since.clone()),
            });
            by_group.entry(group_uid).or_default().push(event);
        }
        for enforced in &status.enforced {
            let volume_handles: Vec<String> = enforced
                .volume_handles
                .iter()
                .filter(|handle| on_this_node(&enforced.group_uid, handle))
                .cloned()
                .collect();
            let event = Event::Ack(freeze::Ack {
                path: Path::Api,
                cluster: cluster.to_owned(),
                epoch: enforced.epoch,
                stage: enforced.stage,
                volume_handles,
                fail_safe: enforced.fail_safe,
            });
            by_group.entry(&enforced.group_uid).or_default().push(event);
        }
        if !foreign.is_empty() {
            let named: Vec<&str> = foreign.iter().take(20).map(String::as_str).collect();
            self.inner.authenticator.refused(
                None,
                &format!("{cluster}/{node_name} (ReplicationNode)"),
                "not_own_volume",
                &format!(
                    "ReplicationNode {node_name} of cluster {cluster} names volumes on other nodes, ignored: {}",
                    named.join(", ")
                ),
            );
        }
        for (uid, events) in by_group {
            self.handle_many_quietly(uid, events).await;
        }
    }
}
