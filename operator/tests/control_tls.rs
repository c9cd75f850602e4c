//! The gRPC Control service over TLS: it serves the certificate in its files, and a certificate
//! replaced on disk is served to the next connection without a restart (a pair that does not load
//! leaves the last good one serving); a plaintext client, or one that does not trust the certificate,
//! never reaches the service.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use lockstep_api::proto::control::v1::{
    NodeIdentity, ReportRequest, control_client::ControlClient,
};
use lockstep_operator::{ControlSecurity, Operator, Options};
use tonic::transport::Channel;

mod common;

use common::{TestCa, cluster, tls_channel};

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

/// Whether a call over `channel` reached the Control service: applied (a plaintext connection, not
/// authenticated) or refused for its missing credential (TLS), as opposed to a transport error.
async fn answered(channel: Channel) -> bool {
    let report = ReportRequest {
        node: Some(NodeIdentity {
            cluster: "east".into(),
            node: "node-1".into(),
        }),
        ..ReportRequest::default()
    };
    match ControlClient::new(channel).report(report).await {
        Ok(_) => true,
        Err(status) => {
            status.code() == tonic::Code::Unauthenticated
                && status.message().contains("no credential")
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_certificate_is_replaced_on_disk_without_a_restart() {
    let (_server, hub) = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let first = TestCa::new("first CA");
    let second = TestCa::new("second CA");
    let first_ca = first.write_ca(dir.path(), "first.crt");
    let second_ca = second.write_ca(dir.path(), "second.crt");
    let tls = tempfile::tempdir().unwrap();
    let (cert, key) = first.write_serving(tls.path());
    let operator = Operator::start(hub, &options(ControlSecurity::tls(&cert, &key)))
        .await
        .unwrap();
    let addr = operator.grpc_addr;

    let open = tls_channel(addr, &first_ca).await.unwrap();
    assert!(answered(open.clone()).await, "TLS with the right CA");
    assert!(
        tls_channel(addr, &second_ca).await.is_err(),
        "a client that does not trust the certificate is refused"
    );
    let plaintext = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    assert!(
        !answered(plaintext).await,
        "a plaintext client never reaches the service"
    );

    // Rotation: the second CA's certificate replaces the first on disk.
    second.write_serving(tls.path());
    assert!(answered(tls_channel(addr, &second_ca).await.unwrap()).await);
    assert!(
        tls_channel(addr, &first_ca).await.is_err(),
        "new connections get the new certificate"
    );
    assert!(
        answered(open.clone()).await,
        "a connection opened before the rotation goes on"
    );

    // A certificate whose key does not fit leaves the last good pair serving.
    let (stray_cert, _) = first.issue(&["127.0.0.1"]);
    std::fs::write(&cert, stray_cert).unwrap();
    assert!(answered(tls_channel(addr, &second_ca).await.unwrap()).await);
    // Once a fitting pair is back, it is served.
    first.write_serving(tls.path());
    assert!(answered(tls_channel(addr, &first_ca).await.unwrap()).await);
    operator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_without_a_certificate_or_the_plaintext_opt_in_does_not_start() {
    let (_server, hub) = cluster().await;
    let security = ControlSecurity {
        grpc_insecure_plaintext: false,
        ..ControlSecurity::insecure_plaintext()
    };
    let error = Operator::start(hub.clone(), &options(security))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("--grpc-tls-cert-file"),
        "{error}"
    );
    let dir = tempfile::tempdir().unwrap();
    let missing = ControlSecurity::tls(&dir.path().join("tls.crt"), &dir.path().join("tls.key"));
    let error = Operator::start(hub, &options(missing)).await.unwrap_err();
    assert!(error.to_string().contains("tls.crt"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_migration_plaintext_and_tls_are_served_on_one_port() {
    let (_server, hub) = cluster().await;
    let ca = TestCa::new("CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write_ca(dir.path(), "ca.crt");
    let (cert, key) = ca.write_serving(dir.path());
    let mut security = ControlSecurity::tls(&cert, &key);
    security.grpc_insecure_plaintext = true;
    let operator = Operator::start(hub, &options(security)).await.unwrap();
    let addr = operator.grpc_addr;
    assert!(answered(tls_channel(addr, &ca_file).await.unwrap()).await);
    let plaintext = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert!(answered(plaintext).await);
    operator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_certs_sh_makes_a_certificate_the_operator_serves_and_the_sidecars_verify() {
    let (_server, hub) = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("control");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/certs.sh");
    let run = std::process::Command::new(&script)
        .args(["init", out.to_str().unwrap(), "--ip", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for manifest in ["hub-control-tls.yaml", "control-ca.yaml"] {
        let text = std::fs::read_to_string(out.join(manifest)).unwrap();
        let secret: k8s_openapi::api::core::v1::Secret = serde_yaml_ng::from_str(&text).unwrap();
        assert!(secret.data.unwrap().contains_key("ca.crt"), "{manifest}");
    }
    let operator = Operator::start(
        hub,
        &options(ControlSecurity::tls(
            &out.join("tls.crt"),
            &out.join("tls.key"),
        )),
    )
    .await
    .unwrap();
    assert!(
        answered(
            tls_channel(operator.grpc_addr, &out.join("ca.crt"))
                .await
                .unwrap()
        )
        .await
    );
    // Run again: the CA is kept and a new serving certificate issued, served without a restart.
    let before = std::fs::read(out.join("tls.crt")).unwrap();
    let run = std::process::Command::new(&script)
        .args(["init", out.to_str().unwrap(), "--ip", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(run.status.success());
    assert_ne!(before, std::fs::read(out.join("tls.crt")).unwrap());
    assert!(
        answered(
            tls_channel(operator.grpc_addr, &out.join("ca.crt"))
                .await
                .unwrap()
        )
        .await
    );
    operator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_sidecar_upgraded_before_its_operator_is_refused_clearly_not_silently_served() {
    // Migration, sidecars first: the operator is still plaintext. The TLS client's handshake fails
    // (never a plaintext fallback), so that path is down and said so, while the API path carries
    // freezes; with the operator upgraded first (allowPlaintext), both are served (test above).
    let (_server, hub) = cluster().await;
    let operator = Operator::start(hub, &options(ControlSecurity::insecure_plaintext()))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = TestCa::new("CA").write_ca(dir.path(), "ca.crt");
    let error = tls_channel(operator.grpc_addr, &ca_file).await.unwrap_err();
    let text = std::error::Error::source(&error)
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(text.contains("TLS handshake with the operator"), "{text}");
    assert!(text.contains("still serving plaintext"), "{text}");
    operator.shutdown().await;
}
