//! Helpers shared by the operator's integration tests: polling with a deadline, a test API server with the
//! project's CRDs, bound claims.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        CSIPersistentVolumeSource, Namespace, PersistentVolume, PersistentVolumeClaim,
        PersistentVolumeClaimSpec, PersistentVolumeSpec, VolumeResourceRequirements,
    },
    apimachinery::pkg::api::resource::Quantity,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, Client, api::PostParams};
use lockstep_api::v1alpha1::ConsistencyGroup;
use lockstep_kube::backend::{ApiServer, Backend};
use lockstep_testapi::{Options as ApiOptions, TestApiServer};

/// Polls until a check returns `Some` (the workspace's one `eventually`).
pub use lockstep_replicator::testing::eventually;

/// The operator's options for a test: a hub `hub-east`, listening on free ports of 127.0.0.1, gRPC in
/// plaintext, resyncing every 200 ms.
pub fn options() -> lockstep_operator::Options {
    lockstep_operator::Options {
        kubeconfig: None,
        hub_name: "hub-east".into(),
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        resync_interval: std::time::Duration::from_millis(200),
        leader_election: false,
        namespace: "lockstep-system".into(),
        identity: "operator-0".into(),
        lease_duration: std::time::Duration::from_secs(2),
        max_sessions_per_cluster: lockstep_operator::sessions::DEFAULT_SESSIONS_PER_CLUSTER,
        max_group_volumes: lockstep_operator::DEFAULT_MAX_GROUP_VOLUMES,
        control_security: lockstep_operator::ControlSecurity::insecure_plaintext(),
    }
}

/// A test API server with the project's CRDs installed and the namespaces `orders`, `lockstep` and
/// `lockstep-system`.
pub async fn cluster() -> (TestApiServer, Client) {
    init_tracing();
    let server = TestApiServer::start(ApiOptions::default()).await.unwrap();
    let client = server.client().await.unwrap();
    prepare(&client).await;
    (server, client)
}

/// An API server of the kind `LOCKSTEP_APISERVER` names (the test API server unless it says `kube`),
/// RBAC enforced, prepared as [`cluster`] prepares one; and its admin client.
pub async fn api_server() -> (ApiServer, Client) {
    init_tracing();
    let server = ApiServer::start(Backend::from_env().unwrap())
        .await
        .unwrap();
    let client = server.admin().await.unwrap();
    prepare(&client).await;
    (server, client)
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "lockstep_operator=info".into()),
        )
        .try_init();
}

/// Installs the project's CRDs (waiting until they are Established) and the namespaces `orders`,
/// `lockstep` and `lockstep-system`.
async fn prepare(client: &Client) {
    lockstep_kube::crds::install_crds(client).await.unwrap();
    for namespace in ["orders", "lockstep", "lockstep-system"] {
        create_namespace(client, namespace).await;
    }
}

/// Waits until every CRD of the project is Established.
pub async fn crds_established(client: &Client) {
    lockstep_kube::crds::crds_established(client).await.unwrap();
}

/// Waits until the group `orders-db` is `done`; returns it as then seen.
pub async fn wait_for_group(
    groups: &Api<ConsistencyGroup>,
    what: &str,
    done: impl Fn(&ConsistencyGroup) -> bool,
) -> ConsistencyGroup {
    eventually(what, || {
        let groups = groups.clone();
        let done = &done;
        async move {
            let group = groups.get("orders-db").await.ok()?;
            done(&group).then_some(group)
        }
    })
    .await
}

/// Merges `spec` into the group `orders-db`'s spec.
pub async fn patch_spec(groups: &Api<ConsistencyGroup>, spec: serde_json::Value) {
    groups
        .patch(
            "orders-db",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&serde_json::json!({ "spec": spec })),
        )
        .await
        .unwrap();
}

/// Creates a namespace.
pub async fn create_namespace(client: &Client, name: &str) {
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
}

/// A PVC `orders/<pvc>` labelled `app=<app>`, bound to a CSI PV `pv-<handle>` with volume handle `handle`
/// whose node affinity names `node` (where the operator takes the volume's node from).
pub async fn volume(client: &Client, pvc: &str, app: &str, handle: &str, node: &str) {
    volume_with(client, pvc, app, handle, Some(node)).await
}

/// As [`volume`], with a PV whose node affinity names `node`, or that names no node.
pub async fn volume_with(client: &Client, pvc: &str, app: &str, handle: &str, node: Option<&str>) {
    let pv = PersistentVolume {
        metadata: ObjectMeta {
            name: Some(format!("pv-{handle}")),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            csi: Some(CSIPersistentVolumeSource {
                driver: "nbd.lockstep.dev".into(),
                volume_handle: handle.into(),
                ..Default::default()
            }),
            // What kube-apiserver's validation requires of a PV and its claim.
            capacity: Some(BTreeMap::from([(
                "storage".to_owned(),
                Quantity("1Mi".into()),
            )])),
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            node_affinity: node.map(lockstep_kube::fixtures::hostname_affinity),
            ..Default::default()
        }),
        status: None,
    };
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .unwrap();
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(pvc.into()),
            namespace: Some("orders".into()),
            labels: Some(BTreeMap::from([("app".to_owned(), app.to_owned())])),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            volume_name: Some(format!("pv-{handle}")),
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity("1Mi".into()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    };
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), "orders")
        .create(&PostParams::default(), &claim)
        .await
        .unwrap();
}

/// The next directive on a sidecar's Subscribe stream whose target `want` accepts (30 s at most).
pub async fn next_directive(
    stream: &mut tonic::Streaming<lockstep_api::proto::control::v1::ControlMessage>,
    want: impl Fn(&lockstep_api::proto::control::v1::GroupEpoch) -> bool,
) -> lockstep_api::proto::control::v1::GroupEpoch {
    use lockstep_api::proto::control::v1::control_message::Kind;
    use tokio_stream::StreamExt;
    let found = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(message) = stream.next().await {
            if let Some(Kind::Directive(directive)) = message.unwrap().kind
                && let Some(target) = directive.target
                && want(&target)
            {
                return Some(target);
            }
        }
        None
    })
    .await;
    found
        .expect("a directive within the deadline")
        .expect("the stream stays open")
}

/// A test certificate authority (real keys and signatures, made with rcgen).
pub struct TestCa {
    pub pem: String,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        Self {
            pem: issuer.pem(),
            issuer,
        }
    }

    /// A serving certificate for `names` (DNS names or IP addresses): (certificate PEM, key PEM).
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a certificate for 127.0.0.1 and localhost and its key into `dir` as `tls.crt` and
    /// `tls.key` (as a Secret volume holds them), replacing what was there; returns their paths.
    pub fn write_serving(&self, dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let (cert, key) = self.issue(&["127.0.0.1", "localhost"]);
        let (cert_file, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
        // Written aside and renamed, as the kubelet swaps a Secret volume's files.
        std::fs::write(dir.join(".tls.key.new"), key).unwrap();
        std::fs::write(dir.join(".tls.crt.new"), cert).unwrap();
        std::fs::rename(dir.join(".tls.key.new"), &key_file).unwrap();
        std::fs::rename(dir.join(".tls.crt.new"), &cert_file).unwrap();
        (cert_file, key_file)
    }

    /// Writes this CA's certificate into `dir/name`; returns its path.
    pub fn write_ca(&self, dir: &std::path::Path, name: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.pem).unwrap();
        path
    }
}

/// A gRPC channel to `addr` over TLS, trusting the CA bundle in `ca_file`; connects now.
pub async fn tls_channel(
    addr: std::net::SocketAddr,
    ca_file: &std::path::Path,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(lockstep_sidecar::tls::TlsConnector::new(ca_file, None))
        .await
}

/// The group's status as a person reads it: the status in the hub, with every member volume and the
/// consistent image's volumes from the group's ConsistencyGroupShards. Shards are written in the
/// background after a decision, so this waits until every shard names the status's (epoch, stage) and
/// they list `memberCount` volumes (while the group is Freezing, shards are not rewritten: then it takes
/// the status alone).
pub async fn status_with_volumes(
    hub: &Client,
    name: &str,
) -> lockstep_api::v1alpha1::ConsistencyGroupStatus {
    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    eventually("the group's shards caught up with its status", || {
        let (groups, hub) = (groups.clone(), hub.clone());
        async move {
            let group = groups.get(name).await.ok()?;
            let uid = group.metadata.uid.clone()?;
            let mut status = group.status.clone()?;
            if status.phase == Some(lockstep_api::domain::Phase::Freezing) {
                return Some(status);
            }
            let api = Api::<lockstep_api::v1alpha1::ConsistencyGroupShard>::all(hub.clone());
            let shards = api
                .list(&kube::api::ListParams::default().labels(&format!(
                    "{}={uid}",
                    lockstep_api::v1alpha1::GROUP_UID_LABEL
                )))
                .await
                .ok()?;
            let current = shards.items.iter().all(|shard| {
                (shard.spec.epoch, shard.spec.stage) == (status.epoch, status.stage)
                    && shard.spec.phase == status.phase
            });
            let volumes = lockstep_api::v1alpha1::GroupVolumes::from_shards(
                shards.items.iter().map(|shard| &shard.spec),
            );
            if !current || volumes.members.len() != status.member_count as usize {
                return None;
            }
            status.members = volumes.members;
            if let Some(image) = status.consistent_image.as_mut()
                && volumes.image_epoch == Some(image.epoch)
            {
                image.volumes = volumes.image;
            }
            Some(status)
        }
    })
    .await
}

/// The group as a person reads it with `kubectl get cg` and `kubectl get cgshard`: its status with the
/// member volumes and the image's volumes its shards list now (shards follow the status in the
/// background: poll).
pub async fn get_with_volumes(client: &Client, name: &str) -> Option<ConsistencyGroup> {
    let mut group = Api::<ConsistencyGroup>::all(client.clone())
        .get(name)
        .await
        .ok()?;
    // The hub group's UID; a mirror in a member cluster names it in a label, beside that cluster's shards.
    let uid = group.group_uid()?.to_owned();
    let volumes = lockstep_api::v1alpha1::GroupVolumes::read(client, &uid)
        .await
        .ok()?;
    if let Some(status) = group.status.as_mut() {
        status.members = volumes.members;
        if let Some(image) = status.consistent_image.as_mut()
            && volumes.image_epoch == Some(image.epoch)
        {
            image.volumes = volumes.image;
        }
    }
    Some(group)
}

/// The group as `operator` decided it last: its object in the hub with the status the operator holds in
/// memory (every member volume and acknowledgement, which the shards show only once a freeze is decided).
pub async fn as_decided(
    operator: &lockstep_operator::Operator,
    hub: &Client,
    name: &str,
) -> Option<ConsistencyGroup> {
    let mut group = Api::<ConsistencyGroup>::all(hub.clone())
        .get(name)
        .await
        .ok()?;
    let uid = group.metadata.uid.clone()?;
    group.status = operator.engine().last_status(&uid).await;
    Some(group)
}

/// Writes `node`'s ReplicationNode status in member cluster `east` (creating the object first), as that
/// node's sidecar does on path 1.
pub async fn node_status(client: &Client, node: &str, status: serde_json::Value) {
    let api = Api::<lockstep_api::v1alpha1::ReplicationNode>::all(client.clone());
    if api.get_opt(node).await.unwrap().is_none() {
        let object = lockstep_api::v1alpha1::ReplicationNode::new(
            node,
            lockstep_api::v1alpha1::ReplicationNodeSpec {
                node_name: node.into(),
                cluster: "east".into(),
            },
        );
        api.create(&PostParams::default(), &object).await.unwrap();
    }
    let patch = serde_json::json!({"apiVersion": "lockstep.dev/v1alpha1", "kind": "ReplicationNode", "status": status});
    api.patch_status(
        node,
        &kube::api::PatchParams::apply("test-sidecar").force(),
        &kube::api::Patch::Apply(&patch),
    )
    .await
    .unwrap();
}

/// The hub as its own member cluster, taking volumes' nodes as `binding` says.
pub async fn local_member(hub: &Client, binding: lockstep_api::domain::VolumeBinding) {
    Api::<lockstep_api::v1alpha1::MemberCluster>::all(hub.clone())
        .create(
            &PostParams::default(),
            &lockstep_api::v1alpha1::MemberCluster::new(
                "east",
                lockstep_api::v1alpha1::MemberClusterSpec {
                    paths: lockstep_api::domain::ClusterPaths::Both,
                    local: true,
                    kubeconfig_secret_ref: None,
                    network: None,
                    service_account_keys: None,
                    volume_binding: binding,
                },
            ),
        )
        .await
        .unwrap();
}

/// A FreezeAndGo group (hold timeout 30s) of the PVCs `pvcs` in `east/orders`.
pub fn orders_group(pvcs: &[&str]) -> lockstep_api::v1alpha1::ConsistencyGroupSpec {
    lockstep_api::v1alpha1::ConsistencyGroupSpec {
        members: vec![lockstep_api::v1alpha1::GroupMember {
            cluster: "east".into(),
            namespace: "orders".into(),
            pvc_names: Some(pvcs.iter().map(|pvc| (*pvc).to_owned()).collect()),
            selector: None,
        }],
        policy: lockstep_api::domain::Policy::FreezeAndGo,
        hold_timeout: "30s".into(),
        release: None,
        resync: None,
        freeze: None,
        failover: None,
    }
}

/// The value of one series (`name{labels}` exactly as exposed) on a Prometheus text page.
pub fn sample_value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}
