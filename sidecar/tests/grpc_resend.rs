//! What a sidecar sends the operator again over gRPC: its acknowledgements on every new Subscribe stream
//! (an operator restarted or failed over has not heard them) and every acknowledgement the operator
//! answered as not applied. Real gRPC to a test `Control` server, a recording Replicator service; every
//! wait polls with a generous deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;

use common::*;
use lockstep_api::proto::control::v1 as cpb;

fn acks_of(control: &FakeControl, epoch: u64, stage: cpb::Stage) -> usize {
    control
        .acks()
        .iter()
        .filter(|a| {
            a.enforced
                .as_ref()
                .is_some_and(|e| e.epoch == epoch && e.stage == stage as i32)
        })
        .count()
}

async fn grpc_only_sidecar(
    rep: &FakeReplicator,
    control: &FakeControl,
) -> lockstep_sidecar::Sidecar {
    control.set_membership("uid-g", 0, cpb::Stage::Resume, &["v1", "v2"]);
    let mut options = options(rep);
    options.no_api_path = true;
    options.operator_endpoint = Some(control.endpoint());
    options.insecure_plaintext_control = true;
    start(options, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_acknowledgement_answered_not_applied_is_sent_again_until_applied() {
    let rep = FakeReplicator::start(&["v1", "v2"]).await;
    let control = FakeControl::start().await;
    control.state.not_applying.store(true, Ordering::SeqCst);
    let sidecar = grpc_only_sidecar(&rep, &control).await;
    eventually("subscribed", || control.subscribers() > 0).await;

    control.push("uid-g", 1, cpb::Stage::Freeze);
    eventually(
        "the acknowledgement sent again after a not-applied answer",
        || acks_of(&control, 1, cpb::Stage::Freeze) >= 2,
    )
    .await;
    control.state.not_applying.store(false, Ordering::SeqCst);
    eventually("acknowledged with the volume list", || {
        control.acked(1, cpb::Stage::Freeze, &["v1", "v2"], false)
    })
    .await;
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_new_subscribe_stream_sends_the_acknowledgement_again() {
    let rep = FakeReplicator::start(&["v1", "v2"]).await;
    let control = FakeControl::start().await;
    let sidecar = grpc_only_sidecar(&rep, &control).await;
    eventually("subscribed", || control.subscribers() > 0).await;
    control.push("uid-g", 1, cpb::Stage::Freeze);
    eventually("acknowledged", || {
        control.acked(1, cpb::Stage::Freeze, &["v1", "v2"], false)
    })
    .await;
    let before = acks_of(&control, 1, cpb::Stage::Freeze);
    let subscribed = control.state.subscribes.lock().unwrap().len();

    // The operator restarts: a new one has heard nothing. The sidecar subscribes again and says what it
    // enforced, although nothing changed on the node.
    control.stop();
    control.restart().await;
    eventually("subscribed again", || {
        control.state.subscribes.lock().unwrap().len() > subscribed
    })
    .await;
    eventually("the acknowledgement sent on the new stream", || {
        acks_of(&control, 1, cpb::Stage::Freeze) > before
    })
    .await;
    let again = control
        .state
        .subscribes
        .lock()
        .unwrap()
        .last()
        .cloned()
        .unwrap();
    assert!(
        again
            .seen
            .iter()
            .any(|p| p.group_uid == "uid-g" && p.epoch == 1),
        "{again:?}"
    );
    sidecar.shutdown().await;
}
