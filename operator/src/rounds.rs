//! The operator's periodic round — member clusters reconnected, ReplicationNode watches started for new
//! ones, every group reconciled, memberships pushed, unacknowledged directives resent, the census counted
//! — and path 1 in: the watch of each member cluster's ReplicationNodes.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::StreamExt;
use kube::{
    Client,
    runtime::{WatchStreamExt, watcher},
};

use crate::{
    AbortOnDrop, authn, clusters, control,
    engine::Engine,
    ingest,
    member_cache::{MemberCache, decode_event},
};

/// Every interval: reconnect member clusters, start ReplicationNode watches for new ones, reconcile every
/// group, and count groups and volumes for the metrics.
///
/// The ReplicationNode watches are owned by this loop: when it is stopped (the operator shut down or
/// aborted), they stop with it. Detached, they outlived their operator and went on deciding about
/// ReplicationNode changes on its frozen view of the hub — beside the operator started after it.
pub(crate) async fn resync_loop(engine: Engine, interval: Duration) {
    // Per member cluster: the MemberCluster version its client came from, and the watch of its nodes.
    let mut node_watches: BTreeMap<String, (Option<String>, AbortOnDrop<()>)> = BTreeMap::new();
    // Per member cluster: the MemberCluster version its client came from, and the reader of its keys.
    let mut key_watches: BTreeMap<String, (Option<String>, AbortOnDrop<()>)> = BTreeMap::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if !engine.is_leader() {
            continue;
        }
        tracing::debug!("resync: refreshing member clusters");
        engine.refresh_members().await;
        tracing::debug!("resync: member clusters refreshed");
        for (name, member) in engine.members().await {
            let Ok(client) = member.client else { continue };
            // A reconnected member (new kubeconfig) gets a new reader of its published keys.
            if key_watches
                .get(&name)
                .is_none_or(|(version, _)| *version != member.version)
            {
                let reader = tokio::spawn(authn::watch_published_keys(
                    engine.authenticator_handle(),
                    name.clone(),
                    client.clone(),
                ));
                key_watches.insert(name.clone(), (member.version.clone(), AbortOnDrop(reader)));
            }
            // And a new watch of its nodes, which fills the new client's cache.
            if node_watches
                .get(&name)
                .is_some_and(|(version, task)| *version == member.version && !task.0.is_finished())
            {
                continue;
            }
            let watch = tokio::spawn(watch_replication_nodes(
                engine.clone(),
                name.clone(),
                client,
                member.cache.clone(),
            ));
            node_watches.insert(name, (member.version.clone(), AbortOnDrop(watch)));
        }
        let groups = engine.groups();
        let reconciles = groups.iter().map(|group| {
            let engine = engine.clone();
            let group = group.clone();
            async move {
                if let Err(error) = engine.reconcile(group).await {
                    tracing::warn!(%error, "reconcile failed");
                }
            }
        });
        futures::future::join_all(reconciles).await;
        tracing::debug!("resync: every group reconciled");
        // Resolutions found and groups deleted since the last round reach the connected sidecars.
        control::push_memberships(&engine);
        // Directives whose send was lost reach the nodes that have not acknowledged them.
        engine.resend_unacknowledged();
        let groups = engine.groups();
        let phases: Vec<_> = groups
            .iter()
            .filter_map(|group| {
                Some((
                    group.metadata.name.as_deref()?,
                    group.status.as_ref()?.phase?,
                ))
            })
            .collect();
        let states: Vec<_> = groups
            .iter()
            .filter_map(|group| group.metadata.uid.as_deref())
            .flat_map(|uid| {
                let members = engine.member_volumes_of(uid);
                members
                    .iter()
                    .filter_map(|member| member.state)
                    .collect::<Vec<_>>()
            })
            .collect();
        engine.metrics().census(&phases, &states);
    }
}

/// Path 1 of reports and acknowledgements: a member cluster's ReplicationNodes, kept in its `cache` too
/// (what the views read instead of listing them).
async fn watch_replication_nodes(
    engine: Engine,
    cluster: String,
    client: Client,
    cache: Option<Arc<MemberCache>>,
) {
    // Read untyped: one node that does not decode is refused alone, never the whole list.
    let stream = watcher(
        clusters::replication_nodes(client),
        watcher::Config::default(),
    )
    .default_backoff()
    // Decoded once, for the cache and for path 1.
    .map(move |event| {
        let event = event.map(decode_event);
        if let (Ok(event), Some(cache)) = (&event, &cache) {
            cache.nodes.apply(event);
        }
        event
    })
    .applied_objects();
    // Nodes are handled concurrently: one node's decision waiting for its group's lock must not hold
    // back another node's acknowledgement, which would then miss the batch. Reordering two updates of
    // one node is harmless: every report and acknowledgement names its epoch (rules 3 and 4).
    stream
        .for_each_concurrent(REPLICATION_NODES_IN_FLIGHT, |change| {
            let (engine, cluster) = (&engine, &cluster);
            async move {
                match change {
                    Ok(node) => {
                        tracing::debug!(%cluster, node = %node.name, "ReplicationNode changed");
                        ingest::api::from_decoded(engine, cluster, node).await;
                    }
                    Err(error) => tracing::debug!(%cluster, %error, "watching ReplicationNodes"),
                }
            }
        })
        .await;
}

/// How many ReplicationNode changes of one member cluster are handled at once.
const REPLICATION_NODES_IN_FLIGHT: usize = 64;
