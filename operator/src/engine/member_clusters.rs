//! Member clusters: connecting to them, probing them, and writing each MemberCluster's status and
//! conditions (reachability, ServiceAccount keys).

use super::*;

impl Engine {
    /// Connects the member clusters if nothing has yet, once for every caller: a new operator's first
    /// reconciles (one per group, hundreds at once) each found none connected, and each read every
    /// cluster's kubeconfig Secret from the hub — 2 500 reads for 500 groups of 5 clusters, which
    /// slowed the hub past its timeouts, so that the connections failed and were tried again.
    pub(super) async fn connect_members_once(&self) {
        if !self.inner.members.read().await.is_empty() {
            return;
        }
        let _connecting = self.inner.connecting.lock().await;
        if self.inner.members.read().await.is_empty() {
            self.connect_and_probe().await;
        }
    }

    /// Connects member clusters that are new, changed or failed last time, probes each API server, and
    /// writes every MemberCluster's status (Reachable, gRPC sessions) when it changed. One at a time.
    pub async fn refresh_members(&self) {
        let _connecting = self.inner.connecting.lock().await;
        self.connect_and_probe().await;
    }

    async fn connect_and_probe(&self) {
        // Before the first list of MemberClusters the store is empty: that is not "no clusters".
        self.inner.clusters_listed.wait().await;
        tracing::debug!("member clusters listed");
        let previous = self.inner.members.read().await.clone();
        let mut connected = BTreeMap::new();
        let mut probes = Vec::new();
        for cluster in self.inner.member_clusters.state() {
            let version = cluster
                .metadata
                .generation
                .map(|generation| generation.to_string());
            let member = match previous.get(&cluster.name_any()) {
                Some(known) if known.client.is_ok() && known.version == version => known.clone(),
                _ => clusters::connect(&self.inner.hub, &cluster).await,
            };
            connected.insert(member.name.clone(), member.clone());
            probes.push(async move {
                let reachable = clusters::probe(&member).await;
                self.write_member_status(&cluster, &member, reachable).await;
            });
        }
        *self.inner.members.write().await = connected;
        tracing::debug!("member clusters connected; probing");
        // Probed concurrently: one unreachable cluster delays no other.
        futures::future::join_all(probes).await;
    }

    /// The `ServiceAccountKeys` condition of a member cluster reached over gRPC: whether its sidecars'
    /// tokens can be verified.
    pub(super) fn keys_condition(&self, cluster: &str) -> ConditionUpdate<'static> {
        let authenticator = &self.inner.authenticator;
        let keys = authenticator.key_sets();
        let (status, reason, message) = if let Some(why) = keys.refused(cluster) {
            (
                false,
                "KeysRefused",
                format!("{why}; no sidecar of this cluster authenticates on the gRPC path"),
            )
        } else if let Some(kid) = authenticator.unknown_key(cluster)
            && authenticator.uses_published_keys(cluster)
        {
            (
                false,
                "UnknownKeyId",
                format!(
                    "a sidecar naming this cluster presented a token signed with key id {kid:?}, which the cluster's API server does not publish (/openid/v1/jwks): the token is not from this cluster"
                ),
            )
        } else if let Some(kid) = authenticator.unknown_key(cluster) {
            (
                false,
                "UnknownKeyId",
                format!(
                    "a sidecar naming this cluster presented a token signed with key id {kid:?}, which is not in spec.serviceAccountKeys: if the cluster rotated its signing keys, put its current JWKS (kubectl get --raw /openid/v1/jwks) there"
                ),
            )
        } else if keys.keys_of(cluster) == 0 {
            (
                false,
                "NoKeys",
                "spec.serviceAccountKeys is empty and no keys were read from the cluster's API server: this cluster's sidecars cannot authenticate on the gRPC path (put the output of kubectl get --raw /openid/v1/jwks there)".to_owned(),
            )
        } else if authenticator.uses_published_keys(cluster) {
            (
                true,
                "KeysLoaded",
                format!(
                    "{} ServiceAccount signing keys, as the cluster's API server publishes them (/openid/v1/jwks, read again on rotation): sidecars prove their node with tokens they signed",
                    keys.keys_of(cluster)
                ),
            )
        } else {
            (
                true,
                "KeysLoaded",
                format!(
                    "{} ServiceAccount signing keys: sidecars prove their node with tokens they signed",
                    keys.keys_of(cluster)
                ),
            )
        };
        ConditionUpdate {
            type_: "ServiceAccountKeys",
            status,
            reason,
            message,
        }
    }

    pub(super) async fn write_member_status(
        &self,
        cluster: &MemberCluster,
        member: &Member,
        reachable: Result<(), String>,
    ) {
        let sessions = u32::try_from(self.inner.sessions.count(&member.name)).unwrap_or(u32::MAX);
        let mut status = cluster.status.clone().unwrap_or_default();
        let api_path = member.paths.includes(Path::Api);
        let update = match (&reachable, api_path) {
            (Ok(()), _) => ConditionUpdate {
                type_: "Reachable",
                status: true,
                reason: "ApiServerAnswers",
                message: format!("the API server answers; {sessions} sidecars hold a gRPC stream"),
            },
            (Err(_), false) => ConditionUpdate {
                type_: "Reachable",
                status: sessions > 0,
                reason: if sessions > 0 {
                    "SidecarsConnected"
                } else {
                    "NoSidecarConnected"
                },
                message: format!("GrpcOnly: {sessions} sidecars hold a gRPC stream"),
            },
            (Err(why), true) => ConditionUpdate {
                type_: "Reachable",
                status: false,
                reason: "ApiServerUnreachable",
                message: format!("{why}; {sessions} sidecars hold a gRPC stream"),
            },
        };
        let before = status.clone();
        // Ready says what Reachable says: the condition kstatus (Flux) and Argo CD's health check read.
        let ready = ConditionUpdate {
            type_: lockstep_api::domain::condition::READY,
            ..update.clone()
        };
        for update in [update, ready] {
            conditions::set(
                &mut status.conditions,
                update,
                cluster.metadata.generation,
                &now(),
            );
        }
        if member.paths.includes(Path::Grpc) {
            conditions::set(
                &mut status.conditions,
                self.keys_condition(&member.name),
                cluster.metadata.generation,
                &now(),
            );
        }
        let mut paths = Vec::new();
        if api_path {
            paths.push((Path::Api, reachable.is_ok()));
        }
        if member.paths.includes(Path::Grpc) {
            paths.push((Path::Grpc, sessions > 0));
        }
        self.inner
            .metrics
            .member_cluster(&member.name, &paths, sessions);
        status.grpc_sessions = sessions;
        status.observed_generation = cluster.metadata.generation;
        if reachable.is_ok() && api_path {
            status.last_api_contact = Some(now());
        }
        let changed = {
            let mut a = before.clone();
            let mut b = status.clone();
            a.last_api_contact = None;
            b.last_api_contact = None;
            a != b
        };
        if !changed {
            return;
        }
        let patch = serde_json::json!({
            "apiVersion": "lockstep.dev/v1alpha1",
            "kind": "MemberCluster",
            "metadata": {"name": member.name},
            "status": status,
        });
        let params = kube::api::PatchParams::apply(mirror::FIELD_MANAGER).force();
        let api = Api::<MemberCluster>::all(self.inner.hub.clone());
        // Bounded: the resync loop waits for every member's status, and a hub that accepts the
        // connection but never answers must not stop it.
        let patch = kube::api::Patch::Apply(&patch);
        let write = api.patch_status(&member.name, &params, &patch);
        match tokio::time::timeout(clusters::API_TIMEOUT, write).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(cluster = %member.name, %error, "MemberCluster status not written");
            }
            Err(_) => tracing::warn!(
                cluster = %member.name,
                timeout = ?clusters::API_TIMEOUT,
                "MemberCluster status not written: the hub did not answer in time"
            ),
        }
    }

    /// Connected member clusters.
    pub async fn members(&self) -> BTreeMap<String, Member> {
        self.inner.members.read().await.clone()
    }
}
