//! Issue 20 item 4, end to end: a release is acknowledged only once its state is durable. The group
//! freezes (FreezeAndStop); then east's disk fills up — every write of its replicator's state files
//! fails (their scratch files lead to `/dev/full`) — and a person releases the freeze. East cannot write
//! "released", so its volumes stay suspended and hold their writes, however often its sidecar retries.
//! East's replicator is then killed, the disk gets room again, and the replicator restarts from the
//! state on disk; the release completes and the group is resynced. The checker on the secondaries, the
//! nothing-lost check on the primaries and the byte comparison after the resync all pass: no write was
//! acknowledged that the dirty map on disk did not cover.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
use common::{frozen, start};

use std::path::PathBuf;

use lockstep_api::domain::{Phase, Policy, Stage};
use lockstep_e2e::faults::LinkCutMode;
use lockstep_e2e::scenario::{Harness, Setup, suspended_at};
use lockstep_replicator::hold::Persisted;
use lockstep_replicator::volume::{state_path, state_scratch_path};

const EAST_VOLUMES: [&str; 2] = ["east-postgres-wal", "east-postgres-data"];

/// The state file of volume `name` (as the example names it).
fn state_file(h: &Harness, name: &str) -> PathBuf {
    let handle = h.handle(name).unwrap();
    let (_, volume) = h.world.find_volume(&handle).unwrap();
    state_path(&volume.primary_path)
}

fn on_disk(h: &Harness, name: &str) -> Persisted {
    serde_json::from_slice(&std::fs::read(state_file(h, name)).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_east_cannot_write_holds_until_east_restarts_and_the_resync_loses_nothing() {
    let mut h = start(Setup::new(Policy::FreezeAndStop).unwrap()).await;
    if h.on_real_clusters() {
        // The fault is a full disk under an in-process replicator; real clusters run their own.
        return;
    }
    h.cut(&["west-reporting"], LinkCutMode::Reset).unwrap();
    ok!(h, h.wait_for_copy_failure());
    let group = ok!(h, h.wait_group("frozen", frozen));
    let (epoch, stage) = group.position();
    assert_eq!(stage, Stage::Freeze);

    // East's disk is full: no state file of its replicator can be written any more.
    for name in EAST_VOLUMES {
        std::os::unix::fs::symlink("/dev/full", state_scratch_path(&state_file(&h, name))).unwrap();
    }
    h.timeline
        .say("fault: east's disk is full (its replicator's state files cannot be written)");
    ok!(
        h,
        h.patch_spec(serde_json::json!({"release": {"epoch": epoch}}))
    );
    // West releases; east's sidecar tries, retries, and gives up at least once.
    ok!(
        h,
        h.wait_volume("west-reporting", "released", |s| {
            s.replication.epoch == epoch
                && s.replication.stage == Some(lockstep_replicator::Stage::Release)
        })
    );
    let east_failures = {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let failed = h.replicator_calls_failed("east", "release").unwrap();
            if failed > 0 {
                break failed;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "east's release never failed: it was acknowledged without its state on disk\n{}",
                h.timeline.text()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    h.timeline.say(format!(
        "east's sidecar: {east_failures} release calls failed after retries"
    ));
    // East still holds at (epoch, Freeze), in memory and on disk; the group is not released there.
    for name in EAST_VOLUMES {
        let status = h.volume_status(&h.handle(name).unwrap()).unwrap();
        assert!(
            suspended_at(&status, epoch)
                && status.replication.stage == Some(lockstep_replicator::Stage::Freeze),
            "{name}: {status:?}\n{}",
            h.timeline.text()
        );
        let disk = on_disk(&h, name);
        assert_eq!(
            (disk.mode.as_str(), disk.epoch),
            ("suspended", epoch),
            "{name}"
        );
    }

    // East's replicator dies with the disk full; the disk gets room; it starts again from its files.
    ok!(h, h.kill_replicator("east"));
    for name in EAST_VOLUMES {
        std::fs::remove_file(state_scratch_path(&state_file(&h, name))).unwrap();
    }
    h.timeline.say("fault cleared: east's disk has room again");
    ok!(h, h.restart_replicator("east"));
    for name in EAST_VOLUMES {
        let restarted = h.volume_status(&h.handle(name).unwrap()).unwrap();
        assert_eq!(
            (restarted.replication.epoch, restarted.replication.stage),
            (epoch, Some(lockstep_replicator::Stage::Freeze)),
            "{name} restarted from the state on disk\n{}",
            h.timeline.text()
        );
    }
    // The sidecar confirms the volumes at the group's release: written now, so they run.
    for name in EAST_VOLUMES {
        ok!(
            h,
            h.wait_volume(name, "released", |s| {
                s.replication.epoch == epoch
                    && s.replication.stage == Some(lockstep_replicator::Stage::Release)
            })
        );
    }
    ok!(
        h,
        h.wait_group("running", |g| g.status.as_ref().and_then(|s| s.phase)
            == Some(Phase::Running))
    );
    ok!(h, h.wait_for_more_writes(30));

    let timeline = h.timeline.clone();
    let outcome = h
        .finish()
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", timeline.text()));
    let text = timeline.text();
    assert!(
        outcome.secondaries.is_consistent(),
        "{}\n{text}",
        outcome.secondaries
    );
    assert!(
        outcome.primaries.is_consistent(),
        "acknowledged writes lost: {}\n{text}",
        outcome.primaries
    );
    for (volume, difference) in &outcome.differences {
        assert_eq!(
            *difference, None,
            "{volume} differs after the resync\n{text}"
        );
    }
    assert!(outcome.holds());
}
