//! [`NodeStatusLog`]: the sidecars' API path as the scenario sees it — every change of every
//! `ReplicationNode` in every cluster, stamped when the watch delivered it. A sidecar writes its node's
//! outstanding copy failures (the report, path 1) and what it enforced (the acknowledgement, path 1) there;
//! the freeze timeline shows when each first appeared.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use lockstep_api::domain::Stage;
use lockstep_api::v1alpha1::ReplicationNode;

use crate::timeline::Milestone;
use crate::world::World;

/// One stamped snapshot of a node's status.
type Snapshot = (Instant, String, ReplicationNode);

/// Watches every cluster's ReplicationNodes until dropped.
#[derive(Debug)]
pub struct NodeStatusLog {
    snapshots: Arc<Mutex<Vec<Snapshot>>>,
    watches: tokio::task::JoinSet<()>,
}

impl NodeStatusLog {
    /// Starts one watch per cluster of `world`.
    pub fn start(world: &World) -> Self {
        let snapshots: Arc<Mutex<Vec<Snapshot>>> = Arc::default();
        let mut watches = tokio::task::JoinSet::new();
        for cluster in &world.clusters {
            let api: Api<ReplicationNode> = Api::all(cluster.client.clone());
            let (name, log) = (cluster.name().to_owned(), snapshots.clone());
            watches.spawn(async move {
                let mut changes = watcher(api, watcher::Config::default())
                    .default_backoff()
                    .applied_objects()
                    .boxed();
                while let Some(change) = changes.next().await {
                    if let Ok(node) = change {
                        log.lock().unwrap_or_else(PoisonError::into_inner).push((
                            Instant::now(),
                            name.clone(),
                            node,
                        ));
                    }
                }
            });
        }
        Self { snapshots, watches }
    }

    /// When each node first showed, in its cluster's API server, a copy failure of `group_uid`'s volumes
    /// and the enforcement of (`epoch`, Freeze) and (`epoch`, Release) on each volume.
    pub fn milestones(&self, group_uid: &str, epoch: u64) -> Vec<Milestone> {
        let snapshots = self
            .snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut said = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for (at, cluster, node) in snapshots {
            let Some(status) = &node.status else {
                continue;
            };
            let node_name = &node.spec.node_name;
            for failure in status.failures.iter().filter(|f| f.group_uid == group_uid) {
                if said.insert(("failure", failure.volume_handle.clone(), Stage::Freeze)) {
                    out.push(Milestone {
                        at,
                        what: format!(
                            "{cluster}/{node_name}: failure of {} written to {cluster}'s ReplicationNode status (report, API path)",
                            failure.volume_handle
                        ),
                    });
                }
            }
            for enforced in status
                .enforced
                .iter()
                .filter(|e| e.group_uid == group_uid && e.epoch == epoch)
            {
                for volume in &enforced.volume_handles {
                    if said.insert(("enforced", volume.clone(), enforced.stage)) {
                        out.push(Milestone {
                            at,
                            what: format!(
                                "{cluster}/{node_name}: {} at epoch {epoch} on {volume} written to {cluster}'s ReplicationNode status (acknowledgement, API path)",
                                enforced.stage
                            ),
                        });
                    }
                }
            }
        }
        out
    }
}

impl Drop for NodeStatusLog {
    fn drop(&mut self) {
        self.watches.abort_all();
    }
}
