//! Delivery of one directive on both paths: one message per subscribed node (path 2) and one status write
//! per member cluster's mirror (path 1), concurrently, never one per volume, and with no client-side rate
//! limiter on this path.
//!
//! Path 1 writes go through one writer task per (cluster, group) that always writes the latest status it
//! was given: a slow or unreachable cluster delays nobody else, and writes to one mirror never reorder.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use kube::{Client, ResourceExt};
use lockstep_api::{
    domain::{GroupEpoch, Path},
    v1alpha1::{ConsistencyGroup, ConsistencyGroupStatus},
};
use tokio::sync::watch;

use crate::{clusters::Member, metrics::Metrics, mirror, sessions};

/// How long one mirror write may take before it is abandoned (the writer tries the latest status again).
const MIRROR_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between attempts at a mirror whose cluster fails.
const MIRROR_RETRY: Duration = Duration::from_millis(500);

type WriterKey = (String, String);

/// Sends directives on both paths.
#[derive(Clone)]
pub struct Fanout {
    sessions: sessions::Sessions,
    metrics: Metrics,
    writers: Arc<Mutex<BTreeMap<WriterKey, watch::Sender<Option<ConsistencyGroupStatus>>>>>,
}

impl Fanout {
    /// A fan-out over these sessions.
    pub fn new(sessions: sessions::Sessions, metrics: Metrics) -> Self {
        Self {
            sessions,
            metrics,
            writers: Arc::default(),
        }
    }

    /// Sends `point` to every node of `clusters` over gRPC and writes `status` into the mirror of every
    /// non-hub member cluster in `targets` that is reached through its API server. Returns at once; the
    /// mirror writes proceed in the background.
    pub async fn send(
        &self,
        group: &ConsistencyGroup,
        point: &GroupEpoch,
        status: Option<&ConsistencyGroupStatus>,
        clusters: &[String],
        targets: &[Member],
    ) {
        let name = group.name_any();
        let sent = self.sessions.send_directive(clusters, point, &name);
        self.metrics.directives(Path::Grpc, point.stage, sent);
        tracing::info!(epoch = point.epoch, stage = %point.stage, nodes = sent, "directive sent over gRPC");
        let Some(status) = status else { return };
        for member in targets {
            if self.mirror_status(member, &name, status) {
                self.metrics.directives(Path::Api, point.stage, 1);
            }
        }
    }

    /// Hands a group's status to the writer of its mirror in `member` (when that cluster has a mirror: not
    /// the hub, reached through its API server). A status behind the last one handed over, in (epoch,
    /// stage), is dropped: a mirror never moves backwards, even when a freeze sent before persisting
    /// overtakes a reconcile of the older state. Returns whether it was handed over.
    pub fn mirror_status(
        &self,
        member: &Member,
        group: &str,
        status: &ConsistencyGroupStatus,
    ) -> bool {
        if member.local || !member.paths.includes(Path::Api) {
            return false;
        }
        let Ok(client) = &member.client else {
            return false;
        };
        let mirrored = mirror::mirror_status(status, &member.name);
        let writer = self.writer(&member.name, group, client);
        writer.send_if_modified(|latest| {
            let behind = latest
                .as_ref()
                .is_some_and(|latest| mirrored.position() < latest.position());
            if behind || latest.as_ref() == Some(&mirrored) {
                return false;
            }
            *latest = Some(mirrored.clone());
            true
        });
        true
    }

    /// The writer of one (cluster, group) mirror, started on first use.
    fn writer(
        &self,
        cluster: &str,
        group: &str,
        client: &Client,
    ) -> watch::Sender<Option<ConsistencyGroupStatus>> {
        let mut writers = self
            .writers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = (cluster.to_owned(), group.to_owned());
        if let Some(sender) = writers.get(&key)
            && !sender.is_closed()
        {
            return sender.clone();
        }
        let (sender, receiver) = watch::channel(None);
        tokio::spawn(write_latest(client.clone(), key.clone(), receiver));
        writers.insert(key, sender.clone());
        sender
    }
}

/// Writes the latest status handed to it into one mirror, retrying until it lands or a newer one comes.
async fn write_latest(
    client: Client,
    (cluster, group): WriterKey,
    mut receiver: watch::Receiver<Option<ConsistencyGroupStatus>>,
) {
    while receiver.changed().await.is_ok() {
        loop {
            let Some(status) = receiver.borrow_and_update().clone() else {
                break;
            };
            let write = mirror::write_status(&client, &cluster, &group, &status);
            match tokio::time::timeout(MIRROR_WRITE_TIMEOUT, write).await {
                Ok(Ok(())) => break,
                // The mirror is gone (its group deleted, or not written yet): the next mirror write
                // brings the status along.
                Ok(Err(error)) if error.is_not_found() => {
                    tracing::debug!(%cluster, %group, %error, "mirror status not written: no mirror");
                    break;
                }
                Ok(Err(error)) => {
                    tracing::warn!(%cluster, %group, %error, "mirror status not written; retrying")
                }
                Err(_) => {
                    tracing::warn!(%cluster, %group, "mirror status write timed out; retrying")
                }
            }
            // Wait a little, or for a newer status, then write the latest.
            if let Ok(Err(_closed)) = tokio::time::timeout(MIRROR_RETRY, receiver.changed()).await {
                return;
            }
        }
    }
}
