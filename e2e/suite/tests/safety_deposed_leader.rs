//! Issue 21, item 4, end to end: two operator replicas, the leader's route to the hub blackholed (its
//! requests neither fail nor answer). Within the lease duration the standby takes over and the old
//! leader answers not ready and refuses Control; the sidecars, dialing both through a Service, reach the
//! new leader; and a freeze started then (a link cut) completes. Ends with the consistency checker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
use common::{all_handles, finish, image, start};

use lockstep_api::domain::{Policy, Stage};
use lockstep_api::proto::control::v1::{
    NodeIdentity, ReportRequest, control_client::ControlClient,
};
use lockstep_e2e::faults::LinkCutMode;
use lockstep_e2e::scenario::{Harness, Setup};
use lockstep_e2e::service::ready;

/// Polls `check` until it holds, or panics naming `what` (with the timeline) after a generous deadline:
/// nothing here asserts how fast.
async fn eventually<F: std::future::Future<Output = bool>>(
    h: &Harness,
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let deadline = lockstep_replicator::testing::EVENTUALLY_DEADLINE;
    let held = lockstep_replicator::testing::poll_until(what, deadline, || {
        let holds = check();
        async move { holds.await.then_some(()) }
    })
    .await;
    if let Err(timed_out) = held {
        panic!("{timed_out}\n{}", h.timeline.text());
    }
    h.timeline.say(what);
}

/// The gRPC code a Control `Report` with nothing in it is answered with at `addr` (`Ok` when served).
async fn report_code(addr: std::net::SocketAddr) -> tonic::Code {
    let Ok(mut control) = ControlClient::connect(format!("http://{addr}")).await else {
        return tonic::Code::Unavailable;
    };
    let request = ReportRequest {
        node: Some(NodeIdentity {
            cluster: "east".into(),
            node: "probe".into(),
        }),
        ..Default::default()
    };
    match control.report(request).await {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_the_hub_is_replaced_within_the_lease_and_a_freeze_then_completes() {
    let mut setup = Setup::new(Policy::FreezeAndGo).unwrap();
    setup.standby_operator = true;
    let mut h = start(setup).await;
    let (old, new) = {
        let (old, new) = (h.replica(0).unwrap(), h.replica(1).unwrap());
        (
            (old.http_addr, old.grpc_addr),
            (new.http_addr, new.grpc_addr),
        )
    };
    assert!(ready(old.0).await, "{}", h.timeline.text());
    assert!(
        !ready(new.0).await,
        "one leader at a time\n{}",
        h.timeline.text()
    );

    h.blackhole_leader_hub(true).unwrap();
    eventually(&h, "operator-0 answers not ready", || async {
        !ready(old.0).await
    })
    .await;
    eventually(&h, "operator-0 answers Control UNAVAILABLE", || async {
        report_code(old.1).await == tonic::Code::Unavailable
    })
    .await;
    eventually(&h, "operator-1 leads and answers ready", || async {
        ready(new.0).await
    })
    .await;
    let sessions = h.replica(1).unwrap().engine().sessions().clone();
    let clusters = h.world.clusters.len();
    eventually(&h, "every sidecar subscribed to operator-1", || {
        let nodes = sessions.nodes();
        async move { nodes.len() >= clusters }
    })
    .await;

    // A freeze started now, with the old leader still cut off, completes under the new one.
    h.cut(&["east-postgres-data"], LinkCutMode::Reset).unwrap();
    let failed = ok!(h, h.wait_for_copy_failure());
    assert_eq!(failed, h.handle("east-postgres-data").unwrap());
    let group = ok!(
        h,
        h.wait_group("released", |g| {
            let (epoch, stage) = g.position();
            epoch > 0 && stage == Stage::Release
        })
    );
    assert_eq!(image(&group), all_handles(&h), "{}", h.timeline.text());
    assert!(!ready(old.0).await, "{}", h.timeline.text());
    ok!(h, h.wait_for_more_writes(30));
    finish(h).await;
}
