//! Leader election against a real test API server over HTTP, two operator replicas and a real gRPC
//! client: a leader whose route to the hub is blackholed (a proxy that drops every byte, so no request
//! fails — they just never answer) stops answering ready and serving Control within one lease duration,
//! its Subscribe streams end, the standby takes over, and once the route is back and the Lease is free
//! again it serves again. A sidecar that dials the replicas through a Service (each new connection to a
//! replica answering ready) is sent to the new leader: the deposed one closes its connections.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, time::Duration};

use kube::Client;
use lockstep_api::proto::control::v1::{
    NodeIdentity, ReportRequest, SubscribeRequest, control_client::ControlClient,
};
use lockstep_operator::{Operator, Options};
use lockstep_replicator::linkcut::{LinkCut, LinkMode};
use tokio_stream::StreamExt;

mod common;

use common::{cluster, eventually};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn replica(identity: &str) -> Options {
    Options {
        kubeconfig: None,
        hub_name: "hub-east".into(),
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        resync_interval: Duration::from_millis(200),
        leader_election: true,
        namespace: "lockstep-system".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(2),
        max_sessions_per_cluster: lockstep_operator::sessions::DEFAULT_SESSIONS_PER_CLUSTER,
        max_group_volumes: lockstep_operator::DEFAULT_MAX_GROUP_VOLUMES,
        control_security: lockstep_operator::ControlSecurity::insecure_plaintext(),
    }
}

/// A client of the hub whose every connection goes through `proxy`.
fn client_through(proxy: &LinkCut) -> Client {
    let url = format!("http://{}", proxy.addr()).parse().unwrap();
    Client::try_from(kube::Config::new(url)).unwrap()
}

/// The status code `/readyz` answers with, or `None` when nothing answers.
async fn readyz(addr: SocketAddr) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /readyz HTTP/1.0\r\nHost: operator\r\n\r\n")
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

fn node() -> NodeIdentity {
    NodeIdentity {
        cluster: "east".into(),
        node: "e1".into(),
    }
}

/// The gRPC code a Control `Report` with nothing in it is answered with (`Ok` when served).
async fn report_code(addr: SocketAddr) -> tonic::Code {
    let Ok(mut control) = ControlClient::connect(format!("http://{addr}")).await else {
        return tonic::Code::Unavailable;
    };
    let request = ReportRequest {
        node: Some(node()),
        ..Default::default()
    };
    match control.report(request).await {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn a_leader_cut_off_from_the_hub_stops_serving_within_the_lease_and_the_standby_takes_over()
-> TestResult {
    let (server, hub) = cluster().await;
    let route = LinkCut::start(server.addr()).await?;
    let first = Operator::start(client_through(&route), &replica("operator-a")).await?;
    eventually("operator-a answers ready", || async {
        (readyz(first.http_addr).await == Some(200)).then_some(())
    })
    .await;
    let second = Operator::start(hub.clone(), &replica("operator-b")).await?;
    assert_eq!(report_code(first.grpc_addr).await, tonic::Code::Ok);
    let mut control = ControlClient::connect(format!("http://{}", first.grpc_addr)).await?;
    let mut stream = control
        .subscribe(SubscribeRequest {
            node: Some(node()),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(
        stream.next().await.is_some_and(|message| message.is_ok()),
        "the leader serves a subscription"
    );
    assert_ne!(
        readyz(second.http_addr).await,
        Some(200),
        "one leader at a time"
    );

    // The leader's route to the hub goes silent: nothing fails, nothing answers.
    route.set_mode(LinkMode::Blackhole);

    eventually("the cut-off leader stops answering ready", || async {
        (readyz(first.http_addr).await != Some(200)).then_some(())
    })
    .await;
    eventually("the cut-off leader answers Control UNAVAILABLE", || async {
        (report_code(first.grpc_addr).await == tonic::Code::Unavailable).then_some(())
    })
    .await;
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the cut-off leader ends its Subscribe streams"
    );
    eventually("the standby leads", || async {
        (readyz(second.http_addr).await == Some(200)).then_some(())
    })
    .await;
    assert_eq!(report_code(second.grpc_addr).await, tonic::Code::Ok);

    // The route comes back and the other replica goes away: the first leads and serves again.
    route.set_mode(LinkMode::Pass);
    second.shutdown().await;
    eventually("operator-a leads again", || async {
        (readyz(first.http_addr).await == Some(200)).then_some(())
    })
    .await;
    assert_eq!(report_code(first.grpc_addr).await, tonic::Code::Ok);
    first.shutdown().await;
    Ok(())
}

/// A Service in front of the replicas' gRPC listeners, as kube-proxy is: each new connection goes to the
/// first replica whose `/readyz` answers 200; open connections stay where they are.
async fn service(replicas: Vec<(SocketAddr, SocketAddr)>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let replicas = replicas.clone();
            tokio::spawn(async move {
                for (grpc, http) in replicas {
                    if readyz(http).await == Some(200)
                        && let Ok(mut upstream) = tokio::net::TcpStream::connect(grpc).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_deposed_leader_sends_its_sidecars_through_the_service_to_the_new_leader() -> TestResult {
    let (server, hub) = cluster().await;
    let route = LinkCut::start(server.addr()).await?;
    let first = Operator::start(client_through(&route), &replica("operator-a")).await?;
    eventually("operator-a answers ready", || async {
        (readyz(first.http_addr).await == Some(200)).then_some(())
    })
    .await;
    let second = Operator::start(hub.clone(), &replica("operator-b")).await?;
    let endpoint = service(vec![
        (first.grpc_addr, first.http_addr),
        (second.grpc_addr, second.http_addr),
    ])
    .await;
    // One client, as a sidecar keeps one: its calls reach whichever replica its connection is to.
    let control = ControlClient::connect(format!("http://{endpoint}")).await?;
    let report = || {
        let mut control = control.clone();
        async move {
            let request = ReportRequest {
                node: Some(node()),
                ..Default::default()
            };
            control.report(request).await.map(|_| ())
        }
    };
    report().await?;
    let mut stream = control
        .clone()
        .subscribe(SubscribeRequest {
            node: Some(node()),
            ..Default::default()
        })
        .await?
        .into_inner();

    route.set_mode(LinkMode::Blackhole);
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the deposed leader ends its Subscribe streams"
    );
    eventually("the standby leads", || async {
        (readyz(second.http_addr).await == Some(200)).then_some(())
    })
    .await;
    eventually("the sidecar's calls reach the new leader", || async {
        report().await.ok()
    })
    .await;
    let mut stream = control
        .clone()
        .subscribe(SubscribeRequest {
            node: Some(node()),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(
        stream.next().await.is_some_and(|message| message.is_ok()),
        "the new leader serves the subscription"
    );
    assert!(
        second
            .engine()
            .sessions()
            .nodes()
            .contains(&("east".into(), "e1".into())),
        "the session is on the new leader"
    );
    second.shutdown().await;
    first.shutdown().await;
    Ok(())
}
