//! What the operator keeps of each member cluster between rounds, watched rather than listed every
//! round: its PersistentVolumeClaims, PersistentVolumes and VolumeAttachments (one reflector per kind,
//! `managedFields` stripped: the bulk of a small object), and its ReplicationNodes, decoded once per
//! change by the watch that also carries path 1 in (`rounds.rs`). At 10 000 volumes a list per round
//! moved 20 000 objects and every node's status (20 KiB a node) from every cluster through JSON each
//! time, four times a second while groups were being reconciled; a watch moves only what changed.
//!
//! A view takes a kind from the cache once it has been listed; until then it lists it as before.
//! Whether the cluster answers is still decided by a live read of the view (its sidecars' Leases), so a
//! cluster that went away is still reported unreachable rather than served from a stale cache.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{PersistentVolume, PersistentVolumeClaim},
    storage::v1::VolumeAttachment,
};
use kube::{
    Api, Client, ResourceExt,
    api::DynamicObject,
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use lockstep_api::v1alpha1::ReplicationNode;
use tokio::task::JoinHandle;

use crate::{clusters::decode_replication_node, listed::Listed};

/// The watched claims, volumes, attachments and ReplicationNodes of one member cluster. Dropping the last
/// handle stops the watches it started (the ReplicationNodes' watch is the resync loop's).
pub struct MemberCache {
    claims: Store<PersistentVolumeClaim>,
    volumes: Store<PersistentVolume>,
    attachments: Store<VolumeAttachment>,
    claims_listed: Listed,
    volumes_listed: Listed,
    attachments_listed: Listed,
    /// Written by the cluster's ReplicationNode watch.
    pub nodes: NodeStore,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for MemberCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberCache")
            .field("claims", &self.claims.len())
            .field("volumes", &self.volumes.len())
            .finish()
    }
}

impl Drop for MemberCache {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts a reflector of every object of kind `K` in the cluster, without managedFields.
fn watch_all<K>(client: Client, tasks: &mut Vec<JoinHandle<()>>) -> (Store<K>, Listed)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let (listed, task) = Listed::watch(store.clone());
    tasks.push(task);
    let stream = watcher(Api::<K>::all(client), watcher::Config::default())
        .default_backoff()
        .modify(|object| object.managed_fields_mut().clear())
        .reflect(writer)
        .applied_objects();
    tasks.push(tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            if let Err(error) = event {
                tracing::debug!(%error, kind = %K::kind(&()), "member cluster watch failed; retrying");
            }
        }
    }));
    (store, listed)
}

impl MemberCache {
    /// Starts watching the claims and volumes of the cluster `client` talks to.
    pub fn start(client: &Client) -> Arc<Self> {
        let mut tasks = Vec::new();
        let (claims, claims_listed) = watch_all(client.clone(), &mut tasks);
        let (volumes, volumes_listed) = watch_all(client.clone(), &mut tasks);
        // A cluster (or a test API server) that does not serve VolumeAttachments is never listed: its
        // views go on asking, and take none.
        let (attachments, attachments_listed) = watch_all(client.clone(), &mut tasks);
        Arc::new(Self {
            claims,
            volumes,
            attachments,
            claims_listed,
            volumes_listed,
            attachments_listed,
            nodes: NodeStore::default(),
            tasks,
        })
    }

    /// Every VolumeAttachment of the cluster, once listed.
    pub fn attachments(&self) -> Option<Vec<VolumeAttachment>> {
        self.attachments_listed.is_listed().then(|| {
            self.attachments
                .state()
                .iter()
                .map(|a| (**a).clone())
                .collect()
        })
    }

    /// Every claim and volume of the cluster, once both have been listed: shared with the reflector's
    /// store, not copied (a cluster of 10 000 claims is read every few hundred milliseconds).
    pub fn snapshot(&self) -> Option<ClaimsAndVolumes> {
        if !(self.claims_listed.is_listed() && self.volumes_listed.is_listed()) {
            return None;
        }
        Some((self.claims.state(), self.volumes.state()))
    }
}

/// A cluster's claims and volumes, shared with the reflectors' stores.
pub type ClaimsAndVolumes = (Vec<Arc<PersistentVolumeClaim>>, Vec<Arc<PersistentVolume>>);

/// One ReplicationNode as its watch delivered it, decoded once for the cache and for path 1: its name,
/// and the node or why it does not decode.
#[derive(Debug, Clone)]
pub struct DecodedNode {
    /// The object's name.
    pub name: String,
    /// The node, or why it does not decode.
    pub node: Result<Arc<ReplicationNode>, String>,
}

impl DecodedNode {
    /// Decodes `object` (see [`decode_replication_node`]).
    pub fn of(object: DynamicObject) -> Self {
        Self {
            name: object.name_any(),
            node: decode_replication_node(object).map(Arc::new),
        }
    }
}

/// A watch event of ReplicationNodes with each object decoded once.
pub fn decode_event(event: watcher::Event<DynamicObject>) -> watcher::Event<DecodedNode> {
    match event {
        watcher::Event::Apply(object) => watcher::Event::Apply(DecodedNode::of(object)),
        watcher::Event::Delete(object) => watcher::Event::Delete(DecodedNode::of(object)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(object) => watcher::Event::InitApply(DecodedNode::of(object)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// A member cluster's ReplicationNodes as its watch last listed and changed them, decoded. A node that
/// does not decode is left out (the watch's ingest says why).
#[derive(Debug, Default)]
pub struct NodeStore(Mutex<NodeStoreState>);

#[derive(Debug, Default)]
struct NodeStoreState {
    /// Whether a complete list has been seen.
    listed: bool,
    nodes: BTreeMap<String, Arc<ReplicationNode>>,
    /// A relist in progress: served from `nodes` until it completes.
    relisting: Option<BTreeMap<String, Arc<ReplicationNode>>>,
}

impl NodeStore {
    /// Takes one event of the cluster's ReplicationNode watch.
    pub fn apply(&self, event: &watcher::Event<DecodedNode>) {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            watcher::Event::Init => state.relisting = Some(BTreeMap::new()),
            watcher::Event::InitApply(decoded) => {
                if let (Some(relisting), Ok(node)) = (state.relisting.as_mut(), &decoded.node) {
                    relisting.insert(decoded.name.clone(), node.clone());
                }
            }
            watcher::Event::InitDone => {
                if let Some(listed) = state.relisting.take() {
                    state.nodes = listed;
                    state.listed = true;
                }
            }
            watcher::Event::Apply(decoded) => match &decoded.node {
                Ok(node) => {
                    state.nodes.insert(decoded.name.clone(), node.clone());
                }
                Err(_) => {
                    state.nodes.remove(&decoded.name);
                }
            },
            watcher::Event::Delete(decoded) => {
                state.nodes.remove(&decoded.name);
            }
        }
    }

    /// Every node, once a complete list has been seen.
    pub fn snapshot(&self) -> Option<Vec<Arc<ReplicationNode>>> {
        let state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        state
            .listed
            .then(|| state.nodes.values().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, handle: &str) -> DecodedNode {
        DecodedNode::of(raw(name, handle))
    }

    fn raw(name: &str, handle: &str) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "lockstep.dev/v1alpha1",
            "kind": "ReplicationNode",
            "metadata": {"name": name},
            "spec": {"nodeName": name, "cluster": "east"},
            "status": {"volumes": [{"volumeHandle": handle, "state": "Replicating"}]},
        }))
        .unwrap()
    }

    fn handles(store: &NodeStore) -> Option<Vec<String>> {
        store.snapshot().map(|nodes| {
            nodes
                .iter()
                .flat_map(|n| n.status.iter().flat_map(|s| s.volumes.iter()))
                .map(|v| v.volume_handle.clone())
                .collect()
        })
    }

    #[test]
    fn nodes_are_served_once_listed_and_a_relist_replaces_them_when_complete() {
        let store = NodeStore::default();
        store.apply(&watcher::Event::Init);
        store.apply(&watcher::Event::InitApply(node("n1", "a")));
        assert_eq!(handles(&store), None, "not listed yet");
        store.apply(&watcher::Event::InitDone);
        assert_eq!(handles(&store), Some(vec!["a".to_owned()]));
        store.apply(&watcher::Event::Apply(node("n2", "b")));
        store.apply(&watcher::Event::Apply(node("n1", "c")));
        assert_eq!(handles(&store), Some(vec!["c".to_owned(), "b".to_owned()]));
        store.apply(&watcher::Event::Delete(node("n2", "b")));
        assert_eq!(handles(&store), Some(vec!["c".to_owned()]));
        // A relist (the watch restarted) serves the old nodes until it is complete, then only its own.
        store.apply(&watcher::Event::Init);
        store.apply(&watcher::Event::InitApply(node("n3", "d")));
        assert_eq!(handles(&store), Some(vec!["c".to_owned()]));
        store.apply(&watcher::Event::InitDone);
        assert_eq!(handles(&store), Some(vec!["d".to_owned()]));
    }

    #[test]
    fn a_node_that_no_longer_decodes_is_left_out() {
        let store = NodeStore::default();
        store.apply(&watcher::Event::Init);
        store.apply(&watcher::Event::InitApply(node("n1", "a")));
        store.apply(&watcher::Event::InitDone);
        let mut broken = raw("n1", "a");
        broken.data["status"]["volumes"][0]["state"] = json!("Sideways");
        let broken = DecodedNode::of(broken);
        assert!(broken.node.is_err());
        store.apply(&watcher::Event::Apply(broken));
        assert_eq!(handles(&store), Some(vec![]));
    }
}
