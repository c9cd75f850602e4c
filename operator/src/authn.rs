//! Authentication of the sidecars on the gRPC Control path: the bearer token of each call, verified
//! against the MemberClusters' ServiceAccount keys ([`crate::identity`]), which are re-read whenever a
//! MemberCluster changes. Refusals are counted by reason (`lockstep_control_refused_total`) and logged
//! once per peer and reason, never once per message. A token signed by a key no MemberCluster lists is
//! remembered for the cluster the message names, which shows it in that MemberCluster's
//! `ServiceAccountKeys` condition (the cluster rotated its signing keys, most likely).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use kube::{ResourceExt, runtime::reflector::Store};
use lockstep_api::v1alpha1::MemberCluster;

use crate::{
    identity::{self, Authenticated, Expectations, KeySets, Refusal},
    metrics::Metrics,
};

/// How many (peer, reason) pairs are remembered as logged before the memory starts again.
const LOGGED_PEERS: usize = 10_000;

/// Verifies the sidecars' tokens.
pub struct Authenticator {
    clusters: Store<MemberCluster>,
    expect: Expectations,
    metrics: Metrics,
    cache: Mutex<Cached>,
    /// The last unknown key id presented for each MemberCluster (by the cluster the message named).
    unknown: Mutex<BTreeMap<String, String>>,
    /// Peers (address, what, reason) whose refusal was logged.
    logged: Mutex<BTreeSet<(Option<IpAddr>, String, &'static str)>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("expect", &self.expect)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Cached {
    /// (name, resourceVersion) of every MemberCluster the keys were built from.
    versions: Vec<(String, Option<String>)>,
    keys: Arc<KeySets>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Authenticator {
    /// Verifies tokens for `audience`, issued to `service_account` (`namespace:name`) and living at
    /// most `max_lifetime`, against the keys of the MemberClusters in `clusters`.
    pub fn new(
        clusters: Store<MemberCluster>,
        audience: &str,
        service_account: &str,
        max_lifetime: Duration,
        metrics: Metrics,
    ) -> Self {
        let service_account = match service_account.split_once(':') {
            Some((namespace, name)) => format!("system:serviceaccount:{namespace}:{name}"),
            None => format!("system:serviceaccount:lockstep:{service_account}"),
        };
        Self {
            clusters,
            expect: Expectations {
                audience: audience.to_owned(),
                service_account,
                max_lifetime_seconds: i64::try_from(max_lifetime.as_secs()).unwrap_or(i64::MAX),
            },
            metrics,
            cache: Mutex::default(),
            unknown: Mutex::default(),
            logged: Mutex::default(),
        }
    }

    /// The key sets of the MemberClusters as they are now (rebuilt when one changed).
    pub fn key_sets(&self) -> Arc<KeySets> {
        let clusters = self.clusters.state();
        let versions: Vec<(String, Option<String>)> = clusters
            .iter()
            .map(|cluster| (cluster.name_any(), cluster.resource_version()))
            .collect();
        let mut cache = lock(&self.cache);
        if cache.versions != versions {
            cache.keys = Arc::new(KeySets::build(clusters.iter().map(|cluster| {
                (
                    cluster.metadata.name.as_deref().unwrap_or_default(),
                    cluster.spec.service_account_keys.as_deref(),
                )
            })));
            cache.versions = versions;
            // A spec changed: the unknown key ids it may have added are known now, or are seen again.
            lock(&self.unknown).clear();
        }
        cache.keys.clone()
    }

    /// Verifies the `authorization` metadata of a call whose message speaks for `claimed_cluster`.
    pub fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        claimed_cluster: &str,
    ) -> Result<Authenticated, Refusal> {
        let token = metadata
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or(Refusal::Missing)?;
        let keys = self.key_sets();
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        let verified = identity::verify(&keys, token, &self.expect, now);
        if let Err(Refusal::UnknownKey { kid }) = &verified
            && self
                .clusters
                .state()
                .iter()
                .any(|cluster| cluster.name_any() == claimed_cluster)
        {
            lock(&self.unknown).insert(claimed_cluster.to_owned(), kid.clone());
        }
        verified
    }

    /// The unknown key id last presented by a sidecar naming `cluster`, since its spec last changed.
    pub fn unknown_key(&self, cluster: &str) -> Option<String> {
        lock(&self.unknown).get(cluster).cloned()
    }

    /// Counts a refusal, and logs it the first time this peer is refused for this reason.
    pub fn refused(
        &self,
        peer: Option<IpAddr>,
        speaking_for: &str,
        reason: &'static str,
        message: &str,
    ) {
        self.metrics.control_refused(reason);
        let mut logged = lock(&self.logged);
        if logged.len() >= LOGGED_PEERS {
            logged.clear();
        }
        if logged.insert((peer, speaking_for.to_owned(), reason)) {
            tracing::warn!(
                peer = ?peer,
                speaking_for,
                reason,
                %message,
                "Control call refused (logged once per peer and reason; counted in lockstep_control_refused_total)"
            );
        }
    }
}
