//! The kept image (issue 32): the secondaries keep the frozen image through a resync, so losing the
//! primary site in the middle of one still leaves a consistent copy. Here the resync starts with one
//! volume's link still blackholed: the other volumes resync over their secondaries (past the frozen
//! image) while it cannot, its copy fails and the group freezes again during the resync — the group
//! keeps naming the first image. Then the primary site is lost (workload, replicators and links), the
//! secondaries are rolled back, and the checker finds the frozen image consistent and complete.
//!
//! A secondary killed mid-resync: restarted, it still keeps the image it had begun to overwrite, and
//! rolling back to it after the primary site is lost gives the checker a consistent, complete image.
//!
//! gRPC-only members: their sidecars learn that the group is in sync again from the Control stream's
//! membership (they have no mirrored group to read the phase from) and drop the kept images too.
//!
//! Out of undo-log space: a secondary that cannot keep the image refuses the resync; the group shows it
//! (ImageKept False, reason UndoLogOutOfSpace, naming volume and node; a Warning Event; the sidecar's
//! metric), keeps the frozen image, and resyncs keeping it once there is room.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
use common::start;

use common::{condition, finish};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::ListParams;
use lockstep_api::domain::{Phase, Policy, Stage};
use lockstep_api::v1alpha1::ConsistencyGroup;
use lockstep_e2e::faults::LinkCutMode;
use lockstep_e2e::scenario::{Harness, Setup};
use lockstep_replicator::testing::poll_until;
use lockstep_replicator::undo::RolledBack;

/// How long a condition of these scenarios may take to appear.
const WAIT: std::time::Duration = std::time::Duration::from_secs(30);

const CLUSTERS: [&str; 2] = ["east", "west"];

/// The primary site is lost (the workload, every replicator and every link), every secondary is rolled
/// back to the image it keeps (which must be epoch 1's), and the checker must find the secondaries
/// consistent and complete. Returns what each roll-back restored.
async fn lose_the_primary_site_and_roll_back(h: &mut Harness) -> Vec<RolledBack> {
    ok!(h, h.stop_workload());
    for cluster in CLUSTERS {
        ok!(h, h.kill_replicator(cluster));
    }
    let names = ["east-postgres-wal", "east-postgres-data", "west-reporting"];
    h.cut(&names, LinkCutMode::Reset).unwrap();
    let mut rolled = Vec::new();
    for name in names {
        let handle = h.handle(name).unwrap();
        let (cluster, _) = h.world.find_volume(&handle).unwrap();
        if let Some(done) = cluster.secondary.roll_back(&handle).await.unwrap() {
            assert_eq!(done.epoch, 1);
            h.timeline.say(format!(
                "{handle}: secondary rolled back to the image of epoch 1 ({} blocks)",
                done.blocks
            ));
            rolled.push(done);
        }
    }
    let verdict = ok!(h, h.check_secondaries());
    assert!(verdict.is_consistent(), "{verdict}\n{}", h.timeline.text());
    rolled
}

/// West-reporting's link reset: the group freezes at epoch 1 and is released, the primaries write on,
/// and the link is back (ready for a resync). Returns west-reporting's handle.
async fn frozen_released_and_written(h: &mut Harness) -> String {
    h.cut(&["west-reporting"], LinkCutMode::Reset).unwrap();
    ok!(h, h.wait_for_copy_failure());
    ok!(h, h.wait_group("released at epoch 1", released_after(0)));
    ok!(h, h.wait_for_more_writes(60));
    let west = h.handle("west-reporting").unwrap();
    h.world
        .find_volume(&west)
        .unwrap()
        .0
        .restore_link(&west)
        .unwrap();
    west
}

fn released_after(from: u64) -> impl Fn(&ConsistencyGroup) -> bool {
    move |g| {
        let (epoch, stage) = g.position();
        epoch > from && stage == Stage::Release
    }
}

/// The epoch of the image the group names.
fn image_epoch(group: &ConsistencyGroup) -> Option<u64> {
    group
        .status
        .as_ref()?
        .consistent_image
        .as_ref()
        .map(|image| image.epoch)
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

    let rolled = lose_the_primary_site_and_roll_back(&mut h).await;
    assert!(
        rolled.iter().any(|done| done.blocks > 0),
        "the resync had overwritten some secondary"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secondary_out_of_undo_log_space_refuses_the_resync_and_the_group_says_so() {
    let mut h = start(Setup::new(Policy::FreezeAndGo).unwrap()).await;
    // Every secondary may reserve almost nothing for an undo log: it is refused as a full disk is.
    for cluster in CLUSTERS {
        h.cluster(cluster)
            .unwrap()
            .secondary
            .set_undo_log_limit(Some(4096));
    }
    h.timeline
        .say("every secondary: one undo log may reserve at most 4096 bytes");
    frozen_released_and_written(&mut h).await;

    // The resync: the secondaries cannot keep the image, refuse it (none is overwritten), and the group
    // freezes again.
    ok!(h, h.patch_spec(serde_json::json!({"resync": {"epoch": 1}})));
    let group = ok!(
        h,
        h.wait_group("ImageKept False", |g| condition(g, "ImageKept").as_deref()
            == Some("False"))
    );
    let kept = group
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "ImageKept"))
        .cloned()
        .unwrap();
    h.timeline.say(format!(
        "ImageKept False, {}: {}",
        kept.reason, kept.message
    ));
    assert_eq!(kept.reason, "UndoLogOutOfSpace");
    // It names the volume, its node and its cluster.
    let named = h
        .world
        .volumes()
        .find(|(_, v)| kept.message.contains(&format!("volume {} ", v.spec.handle)))
        .map(|(c, _)| (c.spec.node.clone(), c.name().to_owned()));
    let (node, cluster) = named.unwrap_or_else(|| panic!("no volume named in {}", kept.message));
    for needed in [
        format!("(node {node}, cluster {cluster})"),
        "undo log out of space".to_owned(),
        "image of epoch 1".to_owned(),
    ] {
        assert!(
            kept.message.contains(&needed),
            "{needed:?} in {}",
            kept.message
        );
    }
    assert_eq!(
        image_epoch(&group),
        Some(1),
        "the group still names the frozen image"
    );
    // Events are recorded off the group's lock, a moment after the status.
    let events = Api::<Event>::all(h.world.hub().client.clone());
    let out_of_space = |event: &Event| {
        event.reason.as_deref() == Some("UndoLogOutOfSpace")
            && event.type_.as_deref() == Some("Warning")
            && event
                .note
                .as_deref()
                .is_some_and(|note| note.contains("undo log out of space"))
    };
    let seen = std::cell::RefCell::new(Vec::new());
    let recorded = poll_until("the UndoLogOutOfSpace Event", WAIT, || async {
        *seen.borrow_mut() = events.list(&ListParams::default()).await.ok()?.items;
        seen.borrow().iter().any(out_of_space).then_some(())
    })
    .await;
    assert!(
        recorded.is_ok(),
        "no UndoLogOutOfSpace Event: {:?}",
        seen.borrow()
            .iter()
            .map(|e| (&e.reason, &e.note))
            .collect::<Vec<_>>()
    );
    let counted: u64 = CLUSTERS
        .iter()
        .map(|cluster| h.kept_image_failures(cluster, "UndoLogOutOfSpace").unwrap())
        .sum();
    assert!(counted >= 1, "the sidecars' metric counts it");

    // Room again: the resync keeps the image and the group replicates in sync. The checker first finds
    // the secondaries still at the frozen image (no resync write landed without it), then the resync
    // completes.
    for cluster in CLUSTERS {
        h.cluster(cluster)
            .unwrap()
            .secondary
            .set_undo_log_limit(None);
    }
    h.timeline
        .say("every secondary: undo logs no longer limited");
    let outcome = finish(h).await;
    assert_eq!(
        condition(&outcome.resynced, "ImageKept").as_deref(),
        Some("True")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_only_members_kept_image_is_dropped_once_the_group_is_in_sync_again() {
    let mut setup = Setup::new(Policy::FreezeAndGo).unwrap();
    setup.grpc_only = vec!["west".into()];
    let mut h = start(setup).await;
    let west = frozen_released_and_written(&mut h).await;

    // The resync: every secondary keeps the image of epoch 1 while it is overwritten.
    ok!(h, h.patch_spec(serde_json::json!({"resync": {"epoch": 1}})));
    let west_secondary = &h.cluster("west").unwrap().secondary;
    let mut kept_seen = None;
    let in_sync = |g: &ConsistencyGroup| {
        g.status.as_ref().is_some_and(|s| {
            s.phase == Some(Phase::Replicating) && s.stage == Some(Stage::Resume) && s.epoch == 1
        })
    };
    for _ in 0..6000 {
        if kept_seen.is_none() {
            kept_seen = west_secondary.kept_image(&west).unwrap();
        }
        if in_sync(&h.world.group_now().await.unwrap()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(
        kept_seen,
        Some(1),
        "west's secondary kept the image of epoch 1 during the resync\n{}",
        h.timeline.text()
    );
    ok!(h, h.wait_group("replicating in sync at epoch 1", in_sync));

    // Back in sync: the gRPC-only member drops its kept image like the others.
    let still_kept = || {
        h.world
            .volumes()
            .filter(|(c, v)| c.secondary.kept_image(&v.spec.handle).unwrap().is_some())
            .map(|(_, v)| v.spec.handle.clone())
            .collect::<Vec<_>>()
    };
    let dropped = poll_until("every kept image dropped", WAIT, || async {
        still_kept().is_empty().then_some(())
    })
    .await;
    assert!(
        dropped.is_ok(),
        "kept images not dropped: {:?}\n{}",
        still_kept(),
        h.timeline.text()
    );
    h.timeline.say(format!(
        "{west}: kept image dropped on the gRPC-only member"
    ));
    // Replicating in sync: once the workload stops, the secondaries hold every acknowledged write.
    let primaries = ok!(h, h.stop_workload_and_check_primaries());
    assert!(
        primaries.is_consistent(),
        "{primaries}\n{}",
        h.timeline.text()
    );
    let secondaries = ok!(h, h.check_secondaries());
    assert!(
        secondaries.is_consistent(),
        "{secondaries}\n{}",
        h.timeline.text()
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secondary_killed_mid_resync_and_restarted_can_still_roll_back() {
    let mut h = start(Setup::new(Policy::FreezeAndGo).unwrap()).await;
    frozen_released_and_written(&mut h).await;
    // West cannot resync (its link silently drops everything), so the group cannot get back in sync and
    // east's secondaries keep the image until the end.
    h.cut(&["west-reporting"], LinkCutMode::Blackhole).unwrap();
    ok!(h, h.patch_spec(serde_json::json!({"resync": {"epoch": 1}})));

    // East's resync is overwriting its secondaries (blocks saved in an undo log): kill that secondary.
    let east: Vec<String> = ["east-postgres-wal", "east-postgres-data"]
        .iter()
        .map(|name| h.handle(name).unwrap())
        .collect();
    let secondary_dir = h.cluster("east").unwrap().dir.join("secondary");
    let overwriting = || {
        east.iter().any(|handle| {
            std::fs::metadata(lockstep_replicator::undo::log_path(&secondary_dir, handle))
                .is_ok_and(|log| log.len() > lockstep_replicator::undo::HEADER_LEN)
        })
    };
    let mut waited = 0;
    while !overwriting() {
        assert!(
            waited < 6000,
            "east's resync never began overwriting\n{}",
            h.timeline.text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        waited += 1;
    }
    ok!(h, h.kill_secondary("east"));

    // The links fail: the group freezes again during the resync and keeps naming the image of epoch 1.
    let group = ok!(
        h,
        h.wait_group("frozen again during the resync", released_after(1))
    );
    assert_eq!(
        image_epoch(&group),
        Some(1),
        "the group names the first image\n{}",
        h.timeline.text()
    );

    // Restarted, east's secondary still keeps the image of epoch 1 where the resync had begun.
    ok!(h, h.restart_secondary("east"));
    let kept: Vec<&String> = east
        .iter()
        .filter(|handle| {
            h.cluster("east")
                .unwrap()
                .secondary
                .kept_image(handle)
                .unwrap()
                == Some(1)
        })
        .collect();
    assert!(!kept.is_empty(), "east keeps no image after its restart");
    h.timeline.say(format!(
        "east's restarted secondary keeps the image of epoch 1 on {kept:?}"
    ));

    let rolled = lose_the_primary_site_and_roll_back(&mut h).await;
    assert!(
        rolled.iter().any(|done| done.blocks > 0),
        "the resync had overwritten east's secondary"
    );
    h.shutdown().await;
}
