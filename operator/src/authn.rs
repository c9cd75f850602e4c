//! Authentication of the sidecars on the gRPC Control path: the bearer token of each call, verified
//! against the MemberClusters' ServiceAccount keys ([`crate::identity`]), which are re-read whenever a
//! MemberCluster changes. Refusals are counted by reason (`lockstep_control_refused_total`) and logged
//! once per peer and reason, never once per message. A token signed by a key no MemberCluster lists is
//! remembered for the cluster the message names, which shows it in that MemberCluster's
//! `ServiceAccountKeys` condition (the cluster rotated its signing keys, most likely).
//!
//! A MemberCluster whose spec lists no keys but whose API server the hub reaches gets the keys that API
//! server publishes (`/openid/v1/jwks`, readable by every ServiceAccount through the default
//! `system:service-account-issuer-discovery` binding): fetched by [`watch_published_keys`] when the
//! cluster is connected, every [`PUBLISHED_KEYS_REFRESH`], and again soon after a sidecar of that
//! cluster presents an unknown key id (a rotation). Verification itself stays offline: a member API
//! server that goes down keeps its last keys, so the gRPC path goes on authenticating exactly when it is
//! the path that works. (A TokenReview per call would tie every gRPC call to that API server.)

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

/// How often the keys a member cluster's API server publishes are read again.
pub const PUBLISHED_KEYS_REFRESH: Duration = Duration::from_secs(300);

/// The soonest the published keys are read again after an unknown key id was presented.
pub const PUBLISHED_KEYS_MIN_INTERVAL: Duration = Duration::from_secs(5);

/// The largest JWKS a member API server may publish (the spec field's bound).
const PUBLISHED_KEYS_MAX_BYTES: usize = 65_536;

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
    /// The JWKS each reachable member cluster's API server published, with a count of changes.
    published: Mutex<Published>,
    /// Woken when a sidecar presents an unknown key id: the published keys are read again.
    rotation: tokio::sync::Notify,
}

#[derive(Default)]
struct Published {
    changes: u64,
    keys: BTreeMap<String, String>,
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
    /// [`Published::changes`] when the keys were built.
    published_changes: u64,
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
            published: Mutex::default(),
            rotation: tokio::sync::Notify::new(),
        }
    }

    /// The key sets of the MemberClusters as they are now (rebuilt when one changed).
    pub fn key_sets(&self) -> Arc<KeySets> {
        let clusters = self.clusters.state();
        let versions: Vec<(String, Option<String>)> = clusters
            .iter()
            .map(|cluster| (cluster.name_any(), cluster.resource_version()))
            .collect();
        let published = lock(&self.published);
        let mut cache = lock(&self.cache);
        if cache.versions != versions || cache.published_changes != published.changes {
            cache.keys = Arc::new(KeySets::build(clusters.iter().map(|cluster| {
                let name = cluster.metadata.name.as_deref().unwrap_or_default();
                let keys = cluster
                    .spec
                    .service_account_keys
                    .as_deref()
                    .or_else(|| published.keys.get(name).map(String::as_str));
                (name, keys)
            })));
            cache.versions = versions;
            cache.published_changes = published.changes;
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
            self.rotation.notify_waiters();
        }
        verified
    }

    /// Whether `cluster`'s keys are the ones its API server publishes (its spec lists none).
    pub fn uses_published_keys(&self, cluster: &str) -> bool {
        lock(&self.published).keys.contains_key(cluster)
            && self
                .clusters
                .state()
                .iter()
                .any(|c| c.name_any() == cluster && c.spec.service_account_keys.is_none())
    }

    /// Takes `jwks` as what `cluster`'s API server publishes now.
    fn publish(&self, cluster: &str, jwks: String) {
        let mut published = lock(&self.published);
        if published.keys.get(cluster) != Some(&jwks) {
            published.keys.insert(cluster.to_owned(), jwks);
            published.changes += 1;
            drop(published);
            // Keys changed: an unknown key id may be known now, or is seen again.
            lock(&self.unknown).remove(cluster);
        }
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

/// Why a member API server's published keys could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PublishedKeysError {
    /// The request failed.
    #[error("reading /openid/v1/jwks: {0}")]
    Request(#[from] kube::Error),
    /// The answer is too large to be a key set.
    #[error("/openid/v1/jwks answered {0} bytes, more than a key set ({PUBLISHED_KEYS_MAX_BYTES})")]
    TooLarge(usize),
}

/// Reads the JWKS `client`'s API server publishes.
pub async fn published_keys(client: &kube::Client) -> Result<String, PublishedKeysError> {
    let request = http::Request::get("/openid/v1/jwks")
        .body(Vec::new())
        .map_err(kube::Error::HttpError)?;
    let jwks = client.request_text(request).await?;
    if jwks.len() > PUBLISHED_KEYS_MAX_BYTES {
        return Err(PublishedKeysError::TooLarge(jwks.len()));
    }
    Ok(jwks)
}

/// Keeps `cluster`'s published keys in `authenticator`, read from its API server through `client`, for
/// as long as the task runs: at once, every [`PUBLISHED_KEYS_REFRESH`], and soon after an unknown key
/// id was presented. A failed read keeps the last keys.
pub async fn watch_published_keys(
    authenticator: Arc<Authenticator>,
    cluster: String,
    client: kube::Client,
) {
    loop {
        let unknown_when_read = authenticator.unknown_key(&cluster);
        match published_keys(&client).await {
            Ok(jwks) => authenticator.publish(&cluster, jwks),
            Err(error) => {
                tracing::debug!(%cluster, %error, "published ServiceAccount keys not read")
            }
        }
        tokio::time::sleep(PUBLISHED_KEYS_MIN_INTERVAL).await;
        let rotated = authenticator.rotation.notified();
        let mut rotated = std::pin::pin!(rotated);
        rotated.as_mut().enable();
        // A key id first presented since the last read: read again now (at most every few seconds).
        let unknown = authenticator.unknown_key(&cluster);
        if unknown.is_some() && unknown != unknown_when_read {
            continue;
        }
        let _ = tokio::time::timeout(PUBLISHED_KEYS_REFRESH, rotated).await;
    }
}
