//! Each group's per-volume record: kept in memory between decisions ([`Engine::record`]), rebuilt from the
//! `ConsistencyGroupShard`s after a restart ([`Engine::restored_record`]), and written to them in the
//! background by one writer task per group ([`Engine::publish_record`]).
//!
//! The writer writes a shard only when it changed, and while the group is Freezing only the shards whose
//! membership changed (a volume that joined must learn it to acknowledge) or that had not been written
//! with the states the freeze's image was decided from (a restart would rebuild another image out of
//! them): from a failed copy to the release decision a freeze that found the shards current writes the
//! group's status and its mirrors, never a shard per node. Shards
//! of a node go to the hub and, for a member cluster reached through its API server, to that cluster,
//! where the node's sidecar watches them.

use super::*;

use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use lockstep_api::{
    domain::Phase,
    v1alpha1::{
        ConsistencyGroupShard, ConsistencyGroupShardSpec, GROUP_UID_LABEL, HUB_LABEL, ShardKey,
    },
};
use tokio::sync::watch;

use crate::ledger;

/// How long the writer waits before trying failed shard writes again.
const RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The writer task of one group's shards (told apart by a number): it writes the latest full status
/// handed to it, and ends when its sender is dropped; its task, to wait for its last write.
pub(super) type ShardSender = (
    u64,
    watch::Sender<Option<Arc<ConsistencyGroupStatus>>>,
    tokio::task::JoinHandle<()>,
);

/// How long a deleted group's shard writer may take to finish the write in progress.
const WRITER_END: std::time::Duration = std::time::Duration::from_secs(10);

/// Numbers the writers.
static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Engine {
    /// The full status this operator decided last for a group (every member volume), if it has one.
    pub fn volume_record(&self, uid: &str) -> Option<Arc<ConsistencyGroupStatus>> {
        self.inner
            .records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(uid)
            .cloned()
    }

    /// The record of a group, rebuilt from the persisted status and the hub's shards when this operator
    /// has none yet (after a restart or a failover). `None` when the group has no status yet.
    pub(super) async fn restored_record(
        &self,
        uid: &str,
        persisted: Option<&ConsistencyGroupStatus>,
    ) -> Result<Option<Arc<ConsistencyGroupStatus>>, EngineError> {
        if let Some(record) = self.volume_record(uid) {
            return Ok(Some(record));
        }
        let Some(persisted) = persisted else {
            return Ok(None);
        };
        let shards = self.hub_shards(uid).await?;
        let specs: Vec<ConsistencyGroupShardSpec> =
            shards.into_iter().map(|shard| shard.spec).collect();
        let record = Arc::new(ledger::restore(persisted, &specs));
        tracing::info!(
            shards = specs.len(),
            volumes = record.members.len(),
            "per-volume record rebuilt from the shards"
        );
        self.inner
            .records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(uid.to_owned(), record.clone());
        Ok(Some(record))
    }

    async fn hub_shards(&self, uid: &str) -> Result<Vec<ConsistencyGroupShard>, kube::Error> {
        shards_in(&self.inner.hub, uid).await
    }

    /// Keeps `full` as the group's record and hands it to the group's shard writer.
    pub(super) fn publish_record(
        &self,
        group: &ConsistencyGroup,
        full: Arc<ConsistencyGroupStatus>,
    ) {
        let Some(uid) = group.metadata.uid.clone() else {
            return;
        };
        self.inner
            .records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(uid.clone(), full.clone());
        if self
            .inner
            .shards_stopped
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let mut writers = self
            .inner
            .shard_writers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let sender = writers.entry(uid.clone()).or_insert_with(|| {
            let (sender, receiver) = watch::channel(None);
            let id = WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let writer = ShardWriter {
                engine: self.clone(),
                id,
                owner: group.clone(),
                uid,
                hub: None,
                members: BTreeMap::new(),
            };
            let task = tokio::spawn(
                writer
                    .run(receiver)
                    .instrument(tracing::info_span!("shards", group = %group.name_any())),
            );
            (id, sender, task)
        });
        sender.1.send_replace(Some(full));
    }

    /// Stops every shard writer (their senders dropped, each ends after the write in progress), for
    /// good: an operator shut down starts none again.
    pub fn stop_shard_writers(&self) {
        self.inner
            .shards_stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner
            .shard_writers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
    }

    /// Drops the record of a group (another writer's status came in between): the next decision
    /// rebuilds it.
    pub(super) fn forget_record(&self, uid: &str) {
        self.inner
            .records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(uid);
    }

    /// Forgets a writer that stopped because this replica no longer leads: the next record published
    /// starts a fresh one, which lists what is written first (another leader wrote in between).
    fn forget_writer(&self, uid: &str, writer: u64) {
        let mut writers = self
            .inner
            .shard_writers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if writers
            .get(uid)
            .is_some_and(|(current, _, _)| *current == writer)
        {
            writers.remove(uid);
        }
    }

    /// Forgets a deleted group's record, stops its writer and deletes its shards in the hub and the
    /// member clusters.
    pub(super) async fn remove_shards(&self, uid: &str, group: &ConsistencyGroup) {
        let writer = self
            .inner
            .shard_writers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(uid);
        // Its sender dropped, the writer ends after the write in progress: wait for it, or that write
        // could land after the deletion below and leave a shard behind (seen on kube-apiserver).
        if let Some((_, sender, mut task)) = writer {
            drop(sender);
            if tokio::time::timeout(WRITER_END, &mut task).await.is_err() {
                tracing::warn!("the shard writer did not end in time; stopped");
                task.abort();
            }
        }
        self.inner
            .records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(uid);
        let mut clients = vec![("hub".to_owned(), self.inner.hub.clone())];
        let members = self.members().await;
        for cluster in Self::member_clusters_of(group) {
            if let Some(member) = members.get(&cluster)
                && let Ok(client) = &member.client
                && !member.local
            {
                clients.push((cluster, client.clone()));
            }
        }
        let selector = format!(
            "{GROUP_UID_LABEL}={uid},{HUB_LABEL}={}",
            self.inner.hub_name
        );
        for (cluster, client) in clients {
            let api = Api::<ConsistencyGroupShard>::all(client);
            if let Err(error) = api
                .delete_collection(
                    &DeleteParams::default(),
                    &ListParams::default().labels(&selector),
                )
                .await
            {
                tracing::warn!(%cluster, %error, "shards not removed");
            }
        }
    }
}

/// The shards of a group in one cluster.
async fn shards_in(client: &Client, uid: &str) -> Result<Vec<ConsistencyGroupShard>, kube::Error> {
    let api = Api::<ConsistencyGroupShard>::all(client.clone());
    let selector = format!("{GROUP_UID_LABEL}={uid}");
    Ok(api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .filter(|shard| shard.spec.group_uid == uid)
        .collect())
}

/// The shards of a group in one cluster, by key.
async fn listed_shards(
    client: &Client,
    uid: &str,
) -> Result<BTreeMap<ShardKey, ConsistencyGroupShardSpec>, kube::Error> {
    Ok(shards_in(client, uid)
        .await?
        .into_iter()
        .map(|shard| (shard.spec.key(), shard.spec))
        .collect())
}

/// Writes one group's shards: what it last wrote where, so that it writes only what changed.
struct ShardWriter {
    engine: Engine,
    /// This writer's number in the engine's map.
    id: u64,
    owner: ConsistencyGroup,
    uid: String,
    /// The shards in the hub, as last written (listed on first use).
    hub: Option<BTreeMap<ShardKey, ConsistencyGroupShardSpec>>,
    /// The shards in each member cluster reached through its API server, as last written.
    members: BTreeMap<String, BTreeMap<ShardKey, ConsistencyGroupShardSpec>>,
}

impl ShardWriter {
    async fn run(mut self, mut receiver: watch::Receiver<Option<Arc<ConsistencyGroupStatus>>>) {
        loop {
            let Some(full) = receiver.borrow_and_update().clone() else {
                if receiver.changed().await.is_err() {
                    return;
                }
                continue;
            };
            if !self.engine.is_leader() {
                // Another replica leads (and writes); this one must not write an older record later.
                self.engine.forget_writer(&self.uid, self.id);
                return;
            }
            let complete = self.write(&full).await;
            if complete {
                if receiver.changed().await.is_err() {
                    return;
                }
            } else {
                // Something failed: try again a little later, or as soon as a newer record arrives.
                tokio::select! {
                    changed = receiver.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }

    /// Writes the shards of `full` that changed, into the hub and the member clusters. Returns whether
    /// everything it meant to write landed.
    async fn write(&mut self, full: &ConsistencyGroupStatus) -> bool {
        let name = self.owner.name_any();
        let target = ledger::shard_specs(&name, &self.uid, full);
        let freezing = full.phase == Some(Phase::Freezing);
        let hub_client = self.engine.inner.hub.clone();
        if self.hub.is_none() {
            match listed_shards(&hub_client, &self.uid).await {
                Ok(shards) => self.hub = Some(shards),
                Err(error) => {
                    tracing::warn!(%error, "hub shards not listed");
                    return false;
                }
            }
        }
        let mut complete = true;
        let owner_reference = self.owner.controller_owner_ref(&());
        let mut hub_written = self.hub.take().unwrap_or_default();
        complete &= self
            .sync(
                "hub",
                &hub_client,
                &target,
                &mut hub_written,
                freezing,
                owner_reference,
            )
            .await;
        self.hub = Some(hub_written);
        let members = self.engine.members().await;
        for cluster in Engine::member_clusters_of(&self.owner) {
            let Some(member) = members.get(&cluster) else {
                continue;
            };
            let Ok(client) = &member.client else { continue };
            if member.local {
                continue;
            }
            let theirs: BTreeMap<ShardKey, ConsistencyGroupShardSpec> = target
                .iter()
                .filter(|(key, _)| key.cluster == cluster)
                .map(|(key, spec)| (key.clone(), spec.clone()))
                .collect();
            let mut written = match self.members.remove(&cluster) {
                Some(written) => written,
                None => match listed_shards(client, &self.uid).await {
                    Ok(shards) => shards,
                    Err(error) => {
                        tracing::warn!(%cluster, %error, "member cluster's shards not listed");
                        complete = false;
                        continue;
                    }
                },
            };
            complete &= self
                .sync(&cluster, client, &theirs, &mut written, freezing, None)
                .await;
            self.members.insert(cluster, written);
        }
        complete
    }

    /// Brings one cluster's shards of the group to `target`, writing only what changed (while
    /// `freezing`, only shards whose membership changed, and removing none).
    async fn sync(
        &self,
        cluster: &str,
        client: &Client,
        target: &BTreeMap<ShardKey, ConsistencyGroupShardSpec>,
        written: &mut BTreeMap<ShardKey, ConsistencyGroupShardSpec>,
        freezing: bool,
        owner: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
    ) -> bool {
        let api = Api::<ConsistencyGroupShard>::all(client.clone());
        let group = self.owner.name_any();
        let membership = ledger::membership_changed(written, target);
        let mut complete = true;
        for (key, spec) in target {
            let unchanged = written.get(key) == Some(spec);
            // While freezing: only a shard whose membership changed, or that a restart would read a
            // different image out of (not written since a state change before the freeze began).
            let held_back = freezing
                && !membership.contains(key)
                && !ledger::image_behind(written.get(key), spec);
            if unchanged || held_back {
                continue;
            }
            let name = key.object_name(&group);
            let mut labels: BTreeMap<String, String> = key
                .labels()
                .into_iter()
                .map(|(label, value)| (label.to_owned(), value))
                .collect();
            labels.insert(HUB_LABEL.to_owned(), self.engine.inner.hub_name.clone());
            labels.insert(GROUP_UID_LABEL.to_owned(), self.uid.clone());
            let object = serde_json::json!({
                "apiVersion": "lockstep.dev/v1alpha1",
                "kind": "ConsistencyGroupShard",
                "metadata": {
                    "name": name,
                    "labels": labels,
                    "ownerReferences": owner.iter().collect::<Vec<_>>(),
                },
                "spec": spec,
            });
            let params = PatchParams::apply(mirror::FIELD_MANAGER).force();
            match api.patch(&name, &params, &Patch::Apply(&object)).await {
                Ok(_) => {
                    written.insert(key.clone(), spec.clone());
                }
                Err(error) => {
                    tracing::warn!(%cluster, shard = %name, %error, "shard not written");
                    complete = false;
                }
            }
        }
        if freezing {
            return complete;
        }
        let gone: Vec<ShardKey> = written
            .keys()
            .filter(|key| !target.contains_key(*key))
            .cloned()
            .collect();
        for key in gone {
            let name = key.object_name(&group);
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    written.remove(&key);
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    written.remove(&key);
                }
                Err(error) => {
                    tracing::warn!(%cluster, shard = %name, %error, "shard not removed");
                    complete = false;
                }
            }
        }
        complete
    }
}
