//! The largest objects the control system writes, as watches see them: the hub's groups and shards, the
//! member clusters' mirrored groups and ReplicationNodes. Every version a watch delivers is measured as
//! the JSON the API server stores (managedFields included), so the figure is what etcd holds.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use lockstep_api::v1alpha1::{ConsistencyGroup, ConsistencyGroupShard, ReplicationNode};
use serde::Serialize;
use tokio::task::JoinHandle;

/// The bound the issue sets on any object Lockstep writes, at any group size.
pub const OBJECT_BOUND_BYTES: usize = 64 * 1024;

/// The largest version seen of one kind of object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Largest {
    /// Its serialized size.
    pub bytes: usize,
    /// Which object (`cluster/name`).
    pub name: String,
}

/// Watches that keep the largest object seen per kind (`ConsistencyGroup`, `ConsistencyGroupShard`,
/// `mirror` for a member cluster's copy of a group, `ReplicationNode`).
pub struct ObjectSizes {
    largest: Arc<Mutex<BTreeMap<&'static str, Largest>>>,
    watches: Vec<JoinHandle<()>>,
}

impl ObjectSizes {
    /// Starts the watches: the hub's groups and shards, each member's mirrors and ReplicationNodes.
    pub fn start(hub: &Client, members: &[(String, Client)]) -> Self {
        let largest = Arc::new(Mutex::new(BTreeMap::new()));
        let mut watches = vec![
            spawn(
                Api::<ConsistencyGroup>::all(hub.clone()),
                "ConsistencyGroup",
                "hub",
                &largest,
            ),
            spawn(
                Api::<ConsistencyGroupShard>::all(hub.clone()),
                "ConsistencyGroupShard",
                "hub",
                &largest,
            ),
        ];
        for (name, client) in members {
            watches.push(spawn(
                Api::<ConsistencyGroup>::all(client.clone()),
                "mirror",
                name,
                &largest,
            ));
            watches.push(spawn(
                Api::<ReplicationNode>::all(client.clone()),
                "ReplicationNode",
                name,
                &largest,
            ));
        }
        ObjectSizes { largest, watches }
    }

    /// The largest object seen so far per kind.
    pub fn largest(&self) -> BTreeMap<&'static str, Largest> {
        self.largest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for ObjectSizes {
    fn drop(&mut self) {
        for watch in &self.watches {
            watch.abort();
        }
    }
}

fn spawn<K>(
    api: Api<K>,
    kind: &'static str,
    cluster: &str,
    largest: &Arc<Mutex<BTreeMap<&'static str, Largest>>>,
) -> JoinHandle<()>
where
    K: Resource
        + Clone
        + std::fmt::Debug
        + Serialize
        + serde::de::DeserializeOwned
        + Send
        + 'static,
    K::DynamicType: Default,
{
    let (largest, cluster) = (largest.clone(), cluster.to_owned());
    tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .touched_objects();
        let mut stream = std::pin::pin!(stream);
        while let Some(object) = stream.next().await {
            let Ok(object) = object else { continue };
            let bytes = serde_json::to_vec(&object).map_or(0, |json| json.len());
            let mut largest = largest.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = largest.entry(kind).or_insert_with(|| Largest {
                bytes: 0,
                name: String::new(),
            });
            if bytes > entry.bytes {
                *entry = Largest {
                    bytes,
                    name: format!("{cluster}/{}", object.name_any()),
                };
            }
        }
    })
}
