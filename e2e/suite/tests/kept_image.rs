//! The kept image (issue 32): the secondaries keep the frozen image through a resync, so losing the
//! primary site in the middle of one still leaves a consistent copy. Here the resync starts with one
//! volume's link still blackholed: the other volumes resync over their secondaries (past the frozen
//! image) while it cannot, its copy fails and the group freezes again during the resync — the group
//! keeps naming the first image. Then the primary site is lost (workload, replicators and links), the
//! secondaries are rolled back, and the checker finds the frozen image consistent and complete.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
use common::start;

use lockstep_api::domain::{Policy, Stage};
use lockstep_api::v1alpha1::ConsistencyGroup;
use lockstep_e2e::faults::LinkCutMode;
use lockstep_e2e::scenario::Setup;

fn released_after(from: u64) -> impl Fn(&ConsistencyGroup) -> bool {
    move |g| {
        let (epoch, stage) = g.position();
        epoch > from && stage == Stage::Release
    }
}

fn condition_message(group: &ConsistencyGroup, type_: &str) -> String {
    group
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_lost_during_a_resync_after_a_second_failure_rolls_back_to_the_frozen_image() {
    let mut h = start(Setup::new(Policy::FreezeAndGo).unwrap()).await;
    h.cut(&["west-reporting"], LinkCutMode::Blackhole).unwrap();
    ok!(h, h.wait_for_copy_failure());
    ok!(h, h.wait_group("released at epoch 1", released_after(0)));
    // The primaries run on unreplicated: the secondaries stay at the image of epoch 1.
    ok!(h, h.wait_for_more_writes(60));

    // The resync starts while west-reporting's link is still blackholed: east's volumes copy over their
    // secondaries (kept images), west-reporting cannot, its copy fails, the group freezes again.
    ok!(h, h.patch_spec(serde_json::json!({"resync": {"epoch": 1}})));
    let group = ok!(
        h,
        h.wait_group("frozen again during the resync", released_after(1))
    );
    let kept = group
        .status
        .as_ref()
        .and_then(|s| s.consistent_image.as_ref())
        .map(|i| (i.epoch, i.volumes.len()));
    assert_eq!(
        kept,
        Some((1, 3)),
        "the group names the first image\n{}",
        h.timeline.text()
    );
    let message = condition_message(&group, "ConsistentImage");
    assert!(message.contains("keep the image of epoch 1"), "{message}");
    h.timeline.say(format!("ConsistentImage: {message}"));

    // The primary site is lost: the workload, every replicator and every link.
    ok!(h, h.stop_workload());
    for cluster in ["east", "west"] {
        ok!(h, h.kill_replicator(cluster));
    }
    let names = ["east-postgres-wal", "east-postgres-data", "west-reporting"];
    h.cut(&names, LinkCutMode::Reset).unwrap();

    // Roll every secondary back to the image it keeps.
    let mut rolled = 0;
    for name in names {
        let handle = h.handle(name).unwrap();
        let (cluster, _) = h.world.find_volume(&handle).unwrap();
        if let Some(done) = cluster.secondary.roll_back(&handle).await.unwrap() {
            assert_eq!(done.epoch, 1);
            rolled += 1;
            h.timeline.say(format!(
                "{handle}: secondary rolled back to the image of epoch 1 ({} blocks)",
                done.blocks
            ));
        }
    }
    assert!(rolled > 0, "the resync had overwritten some secondary");
    let verdict = ok!(h, h.check_secondaries());
    assert!(verdict.is_consistent(), "{verdict}\n{}", h.timeline.text());
    h.shutdown().await;
}
