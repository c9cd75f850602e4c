//! Issue 21 item 3, end to end: a volume is never left held outside any group. A group is deleted
//! mid-freeze while one member's node is cut off from both control paths, its volume suspended by its
//! sidecar's fail-safe and its replication link cut; the operator lets the group go after twice the hold
//! timeout. When the node is restored, its sidecar learns the group is gone (the mirror deleted, the operator's membership
//! no longer naming it) and lets go of the volume, which resyncs and replicates in no group; a new group
//! naming it then resolves it and replicates it. The consistency checker runs on the secondaries while
//! the group still stood (its guarantees end with it, rule 9); west's copies end identical.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
use common::start;

use std::time::{Duration, Instant};

use kube::Api;
use kube::api::{DeleteParams, PostParams};
use lockstep_api::domain::{Phase, Policy, Stage};
use lockstep_api::v1alpha1::ConsistencyGroup;
use lockstep_e2e::faults::LinkCutMode;
use lockstep_e2e::scenario::{Harness, Setup, suspended_at};
use lockstep_replicator::ReplMode;
use serde_json::json;

/// Polls `f` every 100 ms for up to `within`, or panics with the timeline.
async fn until<T, F, Fut>(h: &Harness, what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            h.timeline.say(format!("reached: {what}"));
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            h.timeline.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_deleted_while_a_node_is_cut_off_lets_its_volume_go_and_a_new_group_claims_it() {
    let began = Instant::now();
    let mut setup = Setup::new(Policy::FreezeAndGo).unwrap();
    setup.proxied = vec!["west".into()];
    setup.fail_safe_interval = Duration::from_secs(2);
    // The finalizer lets an unreachable member go after twice this.
    setup.world.group.spec.hold_timeout = "5s".into();
    let mut h = start(setup).await;
    let reporting = h.handle("west-reporting").unwrap();
    let hub = h.world.hub().client.clone();
    let hub_client = hub.clone();
    let groups: Api<ConsistencyGroup> = Api::all(hub);

    // West's node is cut off from both control paths, then its replication link fails: its sidecar's
    // fail-safe suspends the volume, holding its writes; the operator hears nothing.
    h.isolate("west", true).unwrap();
    h.cut(&["west-reporting"], LinkCutMode::Reset).unwrap();
    ok!(h, h.wait_for_copy_failure());
    ok!(
        h,
        h.wait_volume("west-reporting", "suspended by the fail-safe", |s| {
            matches!(
                s.replication.mode,
                ReplMode::Suspended {
                    fail_safe: true,
                    ..
                }
            )
        })
    );
    // East's link fails too: the operator freezes the group, east suspends, and the release waits for
    // west, which it cannot reach (stuck mid-freeze).
    h.cut(&["east-postgres-wal"], LinkCutMode::Reset).unwrap();
    ok!(
        h,
        h.wait_group("freezing at epoch 1", |g| g.position()
            == (1, Stage::Freeze))
    );
    ok!(
        h,
        h.wait_volume("east-postgres-wal", "suspended at epoch 1", |s| {
            suspended_at(s, 1)
        })
    );
    ok!(h, h.stop_workload());
    let verdict = ok!(h, h.check_secondaries());
    assert!(verdict.is_consistent(), "{verdict}\n{}", h.timeline.text());

    // The group is deleted while west is away: the finalizer resumes east and, after twice the hold
    // timeout without west's acknowledgement, lets the group go.
    let name = h.world.group_name.clone();
    let deleted_at = Instant::now();
    groups
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("deleting cg {name}: {e}\n{}", h.timeline.text()));
    h.timeline
        .say(format!("cg {name} deleted while west is cut off"));
    until(
        &h,
        "the deleted group gone",
        Duration::from_secs(90),
        || {
            let groups = groups.clone();
            let name = name.clone();
            async move { matches!(groups.get_opt(&name).await, Ok(None)).then_some(()) }
        },
    )
    .await;
    h.timeline.say(format!(
        "the finalizer let the group go {:.1} s after the deletion",
        deleted_at.elapsed().as_secs_f64()
    ));
    let still = h.volume_status(&reporting).unwrap();
    assert!(
        matches!(still.replication.mode, ReplMode::Suspended { .. }),
        "west is still cut off: its volume is still suspended ({still:?})"
    );

    // East, connected throughout, learns the group is gone (its membership is pushed when a group is
    // deleted): once its link is back its volumes end replicating in no group, nothing held.
    let wal = h.handle("east-postgres-wal").unwrap();
    h.cluster("east").unwrap().restore_link(&wal).unwrap();
    for volume in ["east-postgres-wal", "east-postgres-data"] {
        let status = ok!(
            h,
            h.wait_volume(volume, "replicating in no group", |s| {
                s.replication.group_uid.is_empty()
                    && s.replication.mode == ReplMode::Replicating
                    && s.replication.dirty_bytes == 0
            })
        );
        assert_eq!(status.replication.held, 0, "{volume}: {status:?}");
    }

    // West returns (its control paths and its link): the sidecar learns the group is gone and lets go
    // of the volume, which resyncs and replicates in no group.
    h.cluster("west").unwrap().restore_link(&reporting).unwrap();
    h.isolate("west", false).unwrap();
    let status = ok!(
        h,
        h.wait_volume("west-reporting", "replicating in no group", |s| {
            s.replication.group_uid.is_empty()
                && s.replication.mode == ReplMode::Replicating
                && s.replication.dirty_bytes == 0
        })
    );
    assert_eq!(status.replication.held, 0, "{status:?}");

    // A new group naming it resolves it and replicates it.
    let again: ConsistencyGroup = serde_json::from_value(json!({
        "apiVersion": "lockstep.dev/v1alpha1",
        "kind": "ConsistencyGroup",
        "metadata": {"name": "reporting-again"},
        "spec": {
            "policy": "FreezeAndGo",
            "holdTimeout": "5s",
            "members": [{"cluster": "west", "namespace": "orders", "pvcNames": ["reporting"]}],
        },
    }))
    .unwrap();
    let created = groups
        .create(&PostParams::default(), &again)
        .await
        .unwrap_or_else(|e| panic!("creating cg reporting-again: {e}\n{}", h.timeline.text()));
    let uid = created.metadata.uid.clone().unwrap();
    h.timeline.say(format!(
        "cg reporting-again created (uid {uid}) naming west's reporting"
    ));
    let handle = reporting.clone();
    until(
        &h,
        "cg reporting-again resolved and Replicating",
        Duration::from_secs(60),
        || {
            let groups = groups.clone();
            let handle = handle.clone();
            let hub = hub_client.clone();
            let uid = uid.clone();
            async move {
                let group = groups.get_opt("reporting-again").await.ok().flatten()?;
                let status = group.status?;
                // Its volumes are listed in its shards.
                let volumes = lockstep_api::v1alpha1::GroupVolumes::read(&hub, &uid)
                    .await
                    .ok()?;
                (status.phase == Some(Phase::Replicating)
                    && volumes
                        .members
                        .iter()
                        .any(|m| m.volume_handle.as_deref() == Some(handle.as_str())))
                .then_some(())
            }
        },
    )
    .await;
    ok!(
        h,
        h.wait_volume("west-reporting", "replicating in the new group", |s| {
            s.replication.group_uid == uid && s.replication.mode == ReplMode::Replicating
        })
    );

    // West's secondary is whole again: its copies are identical.
    let (_, volume) = h.world.find_volume(&reporting).unwrap();
    let difference =
        lockstep_checker::first_difference(&volume.primary_source(), &volume.secondary_source())
            .await
            .unwrap();
    assert_eq!(difference, None, "{}", h.timeline.text());
    h.timeline.say(format!(
        "scenario done in {:.1} s",
        began.elapsed().as_secs_f64()
    ));
    println!("{}", h.timeline.text());
    let _ = groups
        .delete("reporting-again", &DeleteParams::default())
        .await;
    h.shutdown().await;
}
