//! The gRPC path is TLS: the sidecar speaks only to an operator whose certificate chains to its CA
//! bundle (an impostor's directives are never enforced, and it never sees the node's token), and
//! presents its ServiceAccount token, read from its file on every call, to the real one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use lockstep_api::proto::control::v1 as cpb;

struct Files {
    _dir: tempfile::TempDir,
    ca: std::path::PathBuf,
    token: std::path::PathBuf,
}

fn files(ca: &TestCa, token: &str) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    Files {
        ca: ca_file,
        token: token_file,
        _dir: dir,
    }
}

fn tls_options(
    rep: &FakeReplicator,
    control: &FakeControl,
    files: &Files,
) -> lockstep_sidecar::Options {
    let mut options = options(rep);
    options.no_api_path = true;
    options.operator_endpoint = Some(control.endpoint());
    options.operator_ca_file = Some(files.ca.clone());
    options.token_file = files.token.clone();
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_whose_certificate_does_not_chain_to_the_ca_is_never_obeyed() {
    let rep = FakeReplicator::start(&["v1", "v2"]).await;
    let trusted = TestCa::new("lockstep control CA");
    let impostor_ca = TestCa::new("impostor CA");
    let impostor = FakeControl::start_tls(impostor_ca.server_config()).await;
    // The impostor would release a freeze at epoch 1 on every volume.
    impostor.set_membership("uid-g", 1, cpb::Stage::Release, &["v1", "v2"]);
    let files = files(&trusted, "token-of-node-1");
    let sidecar = start(tls_options(&rep, &impostor, &files), None).await;

    // The sidecar dials, refuses the certificate, and dials again (with backoff).
    eventually("two handshakes refused", || {
        impostor.failed_handshakes() >= 2
    })
    .await;
    impostor.push("uid-g", 1, cpb::Stage::Release);
    eventually("a third handshake refused", || {
        impostor.failed_handshakes() >= 3
    })
    .await;

    assert!(impostor.state.subscribes.lock().unwrap().is_empty());
    assert!(impostor.reports().is_empty() && impostor.acks().is_empty());
    assert!(
        impostor.authorizations().is_empty(),
        "the token never reaches an unverified server"
    );
    assert!(rep.calls("release").is_empty(), "{:?}", rep.all_calls());
    assert!(rep.calls("suspend").is_empty(), "{:?}", rep.all_calls());
    assert!(rep.calls("configure").is_empty(), "{:?}", rep.all_calls());
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sidecar_verifies_the_operator_and_presents_its_token_read_on_every_call() {
    let rep = FakeReplicator::start(&["v1", "v2"]).await;
    let ca = TestCa::new("lockstep control CA");
    let control = FakeControl::start_tls(ca.server_config()).await;
    control.set_membership("uid-g", 0, cpb::Stage::Resume, &["v1", "v2"]);
    let files = files(&ca, "token-one\n");
    let sidecar = start(tls_options(&rep, &control, &files), None).await;

    eventually("subscribed over TLS", || control.subscribers() > 0).await;
    assert_eq!(control.authorizations()[0], "Bearer token-one");
    control.push("uid-g", 1, cpb::Stage::Freeze);
    eventually("acknowledged over TLS", || {
        control.acked(1, cpb::Stage::Freeze, &["v1", "v2"], false)
    })
    .await;

    // The kubelet rotated the token: the next call carries the new one.
    std::fs::write(&files.token, "token-two").unwrap();
    control.push("uid-g", 1, cpb::Stage::Release);
    eventually("release acknowledged", || {
        control.acked(1, cpb::Stage::Release, &["v1", "v2"], false)
    })
    .await;
    assert_eq!(
        control.authorizations().last().map(String::as_str),
        Some("Bearer token-two")
    );
    assert_eq!(control.failed_handshakes(), 0);
    sidecar.shutdown().await;
}
