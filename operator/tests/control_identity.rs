//! Node identity on the gRPC Control path: every call presents a projected ServiceAccount token,
//! verified against the MemberClusters' signing keys. A raw client without a valid token is refused
//! (UNAUTHENTICATED); node A's valid token cannot speak for node B (PERMISSION_DENIED); a token whose
//! key no MemberCluster lists raises a condition and a metric; MemberClusters sharing a key are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, time::Duration};

use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};
use lockstep_api::{
    domain::{ClusterPaths, Policy},
    proto::control::v1::{
        AckRequest, CopyFailure, GroupEpoch, NodeIdentity, ReportRequest, ResolvedVolume, Stage,
        SubscribeRequest, control_client::ControlClient,
    },
    v1alpha1::{
        ConsistencyGroup, ConsistencyGroupSpec, GroupMember, MemberCluster, MemberClusterSpec,
    },
};
use lockstep_operator::{ControlSecurity, Operator, Options, identity::TokenSigner};
use tonic::{Code, transport::Channel};

mod common;

use common::{TestCa, cluster, eventually, tls_channel};

fn options(security: ControlSecurity) -> Options {
    Options {
        kubeconfig: None,
        hub_name: "hub-east".into(),
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        resync_interval: Duration::from_millis(200),
        leader_election: false,
        namespace: "lockstep-system".into(),
        identity: "operator-0".into(),
        lease_duration: Duration::from_secs(2),
        max_sessions_per_cluster: lockstep_operator::sessions::DEFAULT_SESSIONS_PER_CLUSTER,
        max_group_volumes: lockstep_operator::DEFAULT_MAX_GROUP_VOLUMES,
        control_security: security,
    }
}

async fn member(hub: &Client, name: &str, keys: &str) {
    let spec = MemberClusterSpec {
        paths: ClusterPaths::GrpcOnly,
        local: false,
        kubeconfig_secret_ref: None,
        network: None,
        service_account_keys: Some(keys.to_owned()),
        volume_binding: Default::default(),
    };
    Api::<MemberCluster>::all(hub.clone())
        .create(&PostParams::default(), &MemberCluster::new(name, spec))
        .await
        .unwrap();
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A token of the sidecar on `node`, signed by `signer`.
fn token(signer: &TokenSigner, node: &str) -> String {
    signer
        .pod_token(
            "lockstep.dev/control",
            "lockstep",
            "lockstep-sidecar",
            &format!("lockstep-sidecar-{node}"),
            node,
            now(),
            600,
        )
        .unwrap()
}

/// Puts a bearer token on every call (none when `None`).
#[derive(Clone)]
struct Bearer(Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        Ok(request)
    }
}

type Client2 = ControlClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// A raw Control client over TLS presenting `token` (none when `None`).
fn client(channel: &Channel, token: Option<String>) -> Client2 {
    ControlClient::with_interceptor(channel.clone(), Bearer(token))
}

fn node(cluster: &str, node: &str) -> Option<NodeIdentity> {
    Some(NodeIdentity {
        cluster: cluster.into(),
        node: node.into(),
    })
}

async fn report(client: &mut Client2, cluster: &str, name: &str) -> Result<(), tonic::Status> {
    client
        .report(ReportRequest {
            node: node(cluster, name),
            ..ReportRequest::default()
        })
        .await
        .map(|_| ())
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: operator\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

async fn condition(hub: &Client, cluster: &str) -> Option<(String, String, String)> {
    let object = Api::<MemberCluster>::all(hub.clone())
        .get(cluster)
        .await
        .ok()?;
    let condition = object
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "ServiceAccountKeys")?;
    Some((condition.status, condition.reason, condition.message))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_valid_token_of_the_named_node_is_heard() {
    let (_server, hub) = cluster().await;
    let east = TokenSigner::generate().unwrap();
    let west = TokenSigner::generate().unwrap();
    member(&hub, "east", &east.jwks()).await;
    member(&hub, "west", &west.jwks()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("control CA");
    let ca_file = ca.write_ca(dir.path(), "ca.crt");
    let (cert, key) = ca.write_serving(dir.path());
    let operator = Operator::start(hub.clone(), &options(ControlSecurity::tls(&cert, &key)))
        .await
        .unwrap();
    let channel = tls_channel(operator.grpc_addr, &ca_file).await.unwrap();

    // No credential: every call is refused, with a sentence saying what to present.
    let mut anonymous = client(&channel, None);
    let refused = report(&mut anonymous, "west", "west-node-1")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("no credential"), "{refused:?}");
    let refused = anonymous
        .ack(AckRequest {
            node: node("west", "west-node-1"),
            enforced: Some(GroupEpoch {
                group_uid: "uid".into(),
                epoch: 1,
                stage: Stage::Freeze as i32,
            }),
            volume_handles: vec!["vol-west-1".into()],
            fail_safe: false,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let refused = anonymous
        .subscribe(SubscribeRequest {
            node: node("west", "west-node-1"),
            ..SubscribeRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    // Garbage, and a token of another audience.
    let mut garbage = client(&channel, Some("not-a-token".into()));
    let refused = report(&mut garbage, "west", "west-node-1")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("malformed"), "{refused:?}");

    // east-node-1's valid token speaks for east-node-1 only.
    let mut east_1 = client(&channel, Some(token(&east, "east-node-1")));
    report(&mut east_1, "east", "east-node-1").await.unwrap();
    for (cluster, name) in [
        ("east", "east-node-2"),
        ("west", "west-node-1"),
        ("west", "east-node-1"),
    ] {
        let refused = report(&mut east_1, cluster, name).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(
            refused
                .message()
                .contains("the credential is node east-node-1 of cluster east"),
            "{refused:?}"
        );
        let refused = east_1
            .subscribe(SubscribeRequest {
                node: node(cluster, name),
                ..SubscribeRequest::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    }
    // west's key signs for west.
    let mut west_1 = client(&channel, Some(token(&west, "west-node-1")));
    report(&mut west_1, "west", "west-node-1").await.unwrap();

    // A key no MemberCluster lists (west rotated its keys): refused, and said on west's MemberCluster.
    let rotated = TokenSigner::generate().unwrap();
    let mut stale = client(&channel, Some(token(&rotated, "west-node-1")));
    let refused = report(&mut stale, "west", "west-node-1").await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains(rotated.kid()), "{refused:?}");
    let (status, _, message) = eventually("west's UnknownKeyId condition", || async {
        condition(&hub, "west")
            .await
            .filter(|c| c.1 == "UnknownKeyId")
    })
    .await;
    assert_eq!(status, "False");
    assert!(message.contains(rotated.kid()), "{message}");
    assert_eq!(
        condition(&hub, "east").await.map(|c| (c.0, c.1)),
        Some(("True".into(), "KeysLoaded".into()))
    );
    let metrics = http_get(operator.http_addr, "/metrics").await;
    for reason in ["missing", "malformed", "other_node", "unknown_key"] {
        assert!(
            metrics.contains(&format!(
                "lockstep_control_refused_total{{reason=\"{reason}\"}}"
            )),
            "{reason}: {metrics}"
        );
    }

    // A MemberCluster that shares east's key: both are refused until it goes.
    member(&hub, "copy-of-east", &east.jwks()).await;
    let refused = eventually("east refused while its key is shared", || {
        let mut east_1 = east_1.clone();
        async move { report(&mut east_1, "east", "east-node-1").await.err() }
    })
    .await;
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("copy-of-east"), "{refused:?}");
    eventually("east's KeysRefused condition", || async {
        condition(&hub, "east")
            .await
            .filter(|c| c.1 == "KeysRefused")
    })
    .await;
    Api::<MemberCluster>::all(hub.clone())
        .delete("copy-of-east", &DeleteParams::default())
        .await
        .unwrap();
    eventually("east heard again", || {
        let mut east_1 = east_1.clone();
        async move { report(&mut east_1, "east", "east-node-1").await.ok() }
    })
    .await;
    operator.shutdown().await;
}

fn resolved(pvc: &str) -> ResolvedVolume {
    ResolvedVolume {
        namespace: "orders".into(),
        pvc: pvc.into(),
        persistent_volume: format!("pv-{pvc}"),
        volume_handle: format!("vol-{pvc}"),
    }
}

async fn group_where(
    hub: &Client,
    what: &str,
    check: impl Fn(&ConsistencyGroup) -> bool,
) -> ConsistencyGroup {
    eventually(what, || {
        let (hub, check) = (hub.clone(), &check);
        async move {
            let group = common::get_with_volumes(&hub, "edge-db").await?;
            check(&group).then_some(group)
        }
    })
    .await
}

fn node_of(group: &ConsistencyGroup, pvc: &str) -> Option<String> {
    group
        .status
        .as_ref()?
        .members
        .iter()
        .find(|member| member.pvc == pvc)?
        .node
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_acknowledges_and_reports_only_for_its_own_volumes() {
    let (_server, hub) = cluster().await;
    let edge = TokenSigner::generate().unwrap();
    member(&hub, "edge", &edge.jwks()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("control CA");
    let ca_file = ca.write_ca(dir.path(), "ca.crt");
    let (cert, key) = ca.write_serving(dir.path());
    let operator = Operator::start(hub.clone(), &options(ControlSecurity::tls(&cert, &key)))
        .await
        .unwrap();
    let channel = tls_channel(operator.grpc_addr, &ca_file).await.unwrap();
    let group = ConsistencyGroup::new(
        "edge-db",
        ConsistencyGroupSpec {
            members: vec![GroupMember {
                cluster: "edge".into(),
                namespace: "orders".into(),
                pvc_names: Some(vec!["wal".into(), "data".into()]),
                selector: None,
            }],
            policy: Policy::FreezeAndGo,
            hold_timeout: "30s".into(),
            release: None,
            resync: None,
            freeze: None,
            failover: None,
        },
    );
    Api::<ConsistencyGroup>::all(hub.clone())
        .create(&PostParams::default(), &group)
        .await
        .unwrap();

    // edge-1 serves wal, edge-2 serves data; each subscribes with its own token.
    let mut edge_1 = client(&channel, Some(token(&edge, "edge-1")));
    let mut edge_2 = client(&channel, Some(token(&edge, "edge-2")));
    let _stream_1 = edge_1
        .subscribe(SubscribeRequest {
            node: node("edge", "edge-1"),
            volumes: vec![resolved("wal")],
            seen: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let _stream_2 = edge_2
        .subscribe(SubscribeRequest {
            node: node("edge", "edge-2"),
            volumes: vec![resolved("data")],
            seen: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let group = group_where(&hub, "both volumes resolved to their nodes", |group| {
        node_of(group, "wal").as_deref() == Some("edge-1")
            && node_of(group, "data").as_deref() == Some("edge-2")
    })
    .await;
    let uid = group.metadata.uid.clone().unwrap();
    let point = GroupEpoch {
        group_uid: uid.clone(),
        epoch: 0,
        stage: Stage::Resume as i32,
    };

    // edge-1, with its own valid token, acknowledges data (edge-2's) or reports a failure of it: refused.
    let forged = edge_1
        .ack(AckRequest {
            node: node("edge", "edge-1"),
            enforced: Some(point.clone()),
            volume_handles: vec!["vol-wal".into(), "vol-data".into()],
            fail_safe: false,
        })
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::PermissionDenied, "{forged:?}");
    assert!(
        forged.message().contains("vol-data (on edge-2)"),
        "{forged:?}"
    );
    let forged = edge_1
        .report(ReportRequest {
            node: node("edge", "edge-1"),
            failures: vec![CopyFailure {
                group_uid: uid.clone(),
                volume_handle: "vol-data".into(),
                epoch_seen: 0,
                sequence: 1,
                error: "forged".into(),
                since_unix_ms: 0,
            }],
            ..ReportRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::PermissionDenied, "{forged:?}");
    // Its own volume: heard.
    edge_1
        .ack(AckRequest {
            node: node("edge", "edge-1"),
            enforced: Some(point.clone()),
            volume_handles: vec!["vol-wal".into()],
            fail_safe: false,
        })
        .await
        .unwrap();

    // edge-1 claims data too: two nodes claim it and nothing binds it, so it is unresolved (a release
    // waits for it) rather than taken over; and neither node speaks for it.
    edge_1
        .report(ReportRequest {
            node: node("edge", "edge-1"),
            volumes: vec![resolved("wal"), resolved("data")],
            ..ReportRequest::default()
        })
        .await
        .unwrap();
    let group = group_where(&hub, "data contested", |group| {
        node_of(group, "data").is_none()
            && group.status.as_ref().is_some_and(|status| {
                status.conditions.iter().any(|c| {
                    c.type_ == "MembersResolved"
                        && c.status == "False"
                        && c.message
                            .contains("claimed by several nodes (edge-1, edge-2)")
                })
            })
    })
    .await;
    assert_eq!(node_of(&group, "wal").as_deref(), Some("edge-1"));
    let refused = edge_2
        .ack(AckRequest {
            node: node("edge", "edge-2"),
            enforced: Some(point.clone()),
            volume_handles: vec!["vol-data".into()],
            fail_safe: false,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let metrics = http_get(operator.http_addr, "/metrics").await;
    assert!(
        metrics.contains("lockstep_control_refused_total{reason=\"not_own_volume\"}"),
        "{metrics}"
    );
    operator.shutdown().await;
}
