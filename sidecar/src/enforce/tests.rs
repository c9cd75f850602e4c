//! Tests of the enforcement core: unit tests of each rule, and proptests over random interleavings of
//! directives from the two paths checked against a model replicator that refuses what a real one refuses.

use super::*;
use proptest::prelude::*;

const G: &str = "group-uid";
/// When group `G` was created, in milliseconds since the Unix epoch.
const FIRST_CREATED_MS: i64 = 1_700_000_000_000;

fn point(epoch: u64, stage: Stage) -> GroupEpoch {
    GroupEpoch {
        group_uid: G.to_owned(),
        epoch,
        stage,
    }
}

fn fresh(volume: &str) -> Carried {
    Carried {
        volume: volume.to_owned(),
        group_uid: None,
        level: Level::point(0, Stage::Resume),
        confirmed: false,
        held_after_failure: None,
        resyncing: false,
    }
}

fn carrying(volume: &str, level: Level, confirmed: bool) -> Carried {
    Carried {
        volume: volume.to_owned(),
        group_uid: Some(G.to_owned()),
        level,
        confirmed,
        held_after_failure: None,
        resyncing: false,
    }
}

fn membership(path: Path, volumes: &[&str]) -> Input {
    Input::Membership {
        path,
        group_uid: G.to_owned(),
        group_name: "orders".to_owned(),
        order: ClaimOrder::new(Some(FIRST_CREATED_MS), G),
        volumes: volumes.iter().map(|v| (*v).to_owned()).collect(),
        hold_timeout_ms: 10_000,
    }
}

fn directive(path: Path, epoch: u64, stage: Stage) -> Input {
    Input::Directive {
        path,
        target: point(epoch, stage),
    }
}

fn names(volumes: &[&str]) -> Vec<String> {
    volumes.iter().map(|v| (*v).to_owned()).collect()
}

fn configure(volume: &str, epoch: u64, stage: Stage) -> Operation {
    Operation::Configure {
        volume: volume.to_owned(),
        group_uid: G.to_owned(),
        epoch,
        stage,
        hold_timeout_ms: 10_000,
    }
}

fn suspend(epoch: u64, volumes: &[&str], fail_safe: bool) -> Operation {
    Operation::Suspend {
        group_uid: G.to_owned(),
        epoch,
        volumes: names(volumes),
        fail_safe,
    }
}

fn resume(epoch: u64, volumes: &[&str]) -> Operation {
    Operation::Resume {
        group_uid: G.to_owned(),
        epoch,
        volumes: names(volumes),
    }
}

fn ack(epoch: u64, stage: Stage, volumes: &[&str], fail_safe: bool) -> Ack {
    Ack {
        point: point(epoch, stage),
        volumes: names(volumes),
        fail_safe,
    }
}

/// A node with two fresh volumes in the group, replicating at (0, Resume), confirmed.
fn replicating() -> Enforcer {
    let mut core = Enforcer::new();
    core.handle(Input::Inventory(vec![
        fresh("v1"),
        fresh("v2"),
        fresh("other"),
    ]));
    core.handle(membership(Path::Api, &["v1", "v2"]));
    let out = core.handle(directive(Path::Api, 0, Stage::Resume));
    assert_eq!(
        out.operations,
        vec![
            configure("v1", 0, Stage::Resume),
            configure("v2", 0, Stage::Resume)
        ]
    );
    assert_eq!(out.acks, vec![ack(0, Stage::Resume, &["v1", "v2"], false)]);
    core
}

#[test]
fn a_freeze_suspends_the_groups_volumes_once_and_is_acknowledged_with_the_list() {
    for first in [Path::Api, Path::Grpc] {
        let mut core = replicating();
        let out = core.handle(directive(first, 1, Stage::Freeze));
        assert_eq!(out.operations, vec![suspend(1, &["v1", "v2"], false)]);
        assert_eq!(out.acks, vec![ack(1, Stage::Freeze, &["v1", "v2"], false)]);
        for path in [Path::Api, Path::Grpc, first, Path::Api] {
            let again = core.handle(directive(path, 1, Stage::Freeze));
            assert!(again.operations.is_empty() && again.acks.is_empty());
            assert!(matches!(again.refused[..], [Refusal::Stale { .. }]));
        }
    }
}

#[test]
fn stale_and_reordered_directives_change_nothing() {
    let mut core = replicating();
    core.handle(directive(Path::Grpc, 2, Stage::Release));
    for (epoch, stage) in [
        (1, Stage::Freeze),
        (2, Stage::Freeze),
        (1, Stage::Resume),
        (2, Stage::Release),
        (0, Stage::Resume),
    ] {
        let out = core.handle(directive(Path::Api, epoch, stage));
        assert!(
            out.operations.is_empty() && out.acks.is_empty(),
            "{epoch} {stage}"
        );
    }
}

#[test]
fn release_without_the_freeze_suspends_first() {
    let mut core = replicating();
    let out = core.handle(directive(Path::Api, 1, Stage::Release));
    assert_eq!(
        out.operations,
        vec![
            suspend(1, &["v1", "v2"], false),
            Operation::Release {
                group_uid: G.to_owned(),
                epoch: 1,
                volumes: names(&["v1", "v2"]),
            }
        ]
    );
    assert_eq!(out.acks, vec![ack(1, Stage::Release, &["v1", "v2"], false)]);
}

#[test]
fn release_after_the_freeze_only_releases_and_resume_only_resumes() {
    let mut core = replicating();
    core.handle(directive(Path::Api, 1, Stage::Freeze));
    let out = core.handle(directive(Path::Grpc, 1, Stage::Release));
    assert_eq!(
        out.operations,
        vec![Operation::Release {
            group_uid: G.to_owned(),
            epoch: 1,
            volumes: names(&["v1", "v2"]),
        }]
    );
    let out = core.handle(directive(Path::Api, 1, Stage::Resume));
    assert_eq!(out.operations, vec![resume(1, &["v1", "v2"])]);
    assert_eq!(out.acks, vec![ack(1, Stage::Resume, &["v1", "v2"], false)]);
}

#[test]
fn a_missed_freeze_is_resumed_at_the_new_epoch() {
    let mut core = replicating();
    core.handle(directive(Path::Api, 1, Stage::Freeze));
    // Epoch 2 passed entirely while this node was cut off: its volumes are suspended at 1.
    let out = core.handle(directive(Path::Api, 2, Stage::Resume));
    assert_eq!(
        out.operations,
        vec![
            suspend(2, &["v1", "v2"], false),
            Operation::Resume {
                group_uid: G.to_owned(),
                epoch: 2,
                volumes: names(&["v1", "v2"]),
            }
        ]
    );
}

#[test]
fn a_replicating_volume_skipping_an_epoch_is_only_recorded() {
    let mut core = replicating();
    let out = core.handle(directive(Path::Api, 3, Stage::Resume));
    assert_eq!(
        out.operations,
        vec![
            configure("v1", 3, Stage::Resume),
            configure("v2", 3, Stage::Resume)
        ]
    );
}

#[test]
fn the_fail_safe_suspends_at_the_epoch_last_seen_and_only_a_higher_epoch_lifts_it() {
    let mut core = replicating();
    core.handle(directive(Path::Api, 4, Stage::Resume));
    // Nothing to protect: the timer does nothing.
    let out = core.handle(Input::FailSafeTimer);
    assert!(out.operations.is_empty() && out.fail_safe_taken.is_empty());

    core.handle(Input::CopyFailed {
        volume: "v1".into(),
        sequence: 9,
        error: "link down".into(),
        since_unix_ms: 1,
    });
    assert_eq!(core.failures().len(), 1);
    assert_eq!(core.failures()[0].epoch_seen, 4);
    assert!(core.holds_unreported_risk());
    let out = core.handle(Input::FailSafeTimer);
    assert_eq!(out.operations, vec![suspend(4, &["v1", "v2"], true)]);
    assert_eq!(out.acks, vec![ack(4, Stage::Freeze, &["v1", "v2"], true)]);
    assert_eq!(out.fail_safe_taken, vec![G.to_owned()]);
    assert!(!core.holds_unreported_risk());
    assert!(core.handle(Input::FailSafeTimer).operations.is_empty());

    // Directives at the fail-safe's epoch do not lift it.
    for stage in [Stage::Freeze, Stage::Release, Stage::Resume] {
        let out = core.handle(directive(Path::Grpc, 4, stage));
        assert!(out.operations.is_empty());
    }
    let out = core.handle(directive(Path::Grpc, 5, Stage::Release));
    assert_eq!(
        out.operations,
        vec![
            suspend(5, &["v1", "v2"], false),
            Operation::Release {
                group_uid: G.to_owned(),
                epoch: 5,
                volumes: names(&["v1", "v2"]),
            }
        ]
    );
    assert!(
        core.failures().is_empty(),
        "a higher epoch acknowledges the report"
    );
}

#[test]
fn a_restarted_sidecar_confirms_a_frozen_volume_without_touching_it() {
    let mut core = Enforcer::new();
    core.handle(Input::Inventory(vec![
        carrying("v1", Level::point(3, Stage::Freeze), false),
        carrying("v2", Level::point(3, Stage::Freeze), false),
    ]));
    core.handle(membership(Path::Grpc, &["v1", "v2"]));
    let out = core.handle(directive(Path::Grpc, 3, Stage::Freeze));
    assert_eq!(
        out.operations,
        vec![
            configure("v1", 3, Stage::Freeze),
            configure("v2", 3, Stage::Freeze)
        ]
    );
    assert_eq!(out.acks, vec![ack(3, Stage::Freeze, &["v1", "v2"], false)]);
    assert_eq!(core.seen(), vec![point(3, Stage::Freeze)]);
}

#[test]
fn a_volume_is_never_confirmed_older_than_it_carries() {
    let mut core = Enforcer::new();
    core.handle(Input::Inventory(vec![carrying(
        "v1",
        Level::point(3, Stage::Freeze),
        false,
    )]));
    core.handle(membership(Path::Api, &["v1"]));
    let out = core.handle(directive(Path::Api, 2, Stage::Resume));
    assert!(out.operations.is_empty());
    assert!(matches!(out.refused[..], [Refusal::CarriesNewer { .. }]));
    // The node still says it has seen epoch 3 (rule 8: the operator adopts it).
    assert_eq!(core.seen(), vec![point(3, Stage::Freeze)]);
    let out = core.handle(directive(Path::Api, 3, Stage::Freeze));
    assert_eq!(out.operations, vec![configure("v1", 3, Stage::Freeze)]);
}

#[test]
fn a_directive_before_the_membership_is_kept_and_enforced_when_the_volumes_arrive() {
    let mut core = Enforcer::new();
    core.handle(Input::Inventory(vec![fresh("v1")]));
    let out = core.handle(directive(Path::Grpc, 2, Stage::Freeze));
    assert!(out.operations.is_empty());
    let out = core.handle(membership(Path::Api, &["v1"]));
    assert_eq!(out.operations, vec![configure("v1", 2, Stage::Freeze)]);
    assert_eq!(out.acks, vec![ack(2, Stage::Freeze, &["v1"], false)]);
}

#[test]
fn a_volume_joining_a_frozen_group_is_suspended_and_the_ack_grows() {
    let mut core = replicating();
    core.handle(directive(Path::Grpc, 1, Stage::Freeze));
    let out = core.handle(membership(Path::Grpc, &["other"]));
    assert_eq!(out.operations, vec![configure("other", 1, Stage::Freeze)]);
    assert_eq!(
        out.acks,
        vec![ack(1, Stage::Freeze, &["other", "v1", "v2"], false)]
    );
    // A volume leaving a path's view but still listed by the other stays in the group.
    let out = core.handle(Input::GroupGone {
        path: Path::Grpc,
        group_uid: G.into(),
    });
    assert_eq!(out.acks, vec![ack(1, Stage::Freeze, &["v1", "v2"], false)]);
    assert!(
        out.operations.is_empty(),
        "a leaving volume stays suspended"
    );
}

#[test]
fn volumes_not_served_here_and_double_claims_are_refused() {
    let mut core = replicating();
    let out = core.handle(membership(Path::Api, &["v1", "v2", "elsewhere"]));
    assert!(out.refused.contains(&Refusal::NotOwned {
        group_uid: G.into(),
        volume: "elsewhere".into()
    }));
    let out = core.handle(Input::Membership {
        path: Path::Api,
        group_uid: "zzz-second".into(),
        group_name: "second".into(),
        order: ClaimOrder::new(Some(FIRST_CREATED_MS + 1_000), "zzz-second"),
        volumes: ["v1".to_owned()].into(),
        hold_timeout_ms: 1000,
    });
    assert!(out.refused.contains(&Refusal::DoubleClaim {
        group_uid: "zzz-second".into(),
        volume: "v1".into(),
        claimed_by: G.into()
    }));
    let out = core.handle(Input::Directive {
        path: Path::Api,
        target: GroupEpoch {
            group_uid: "zzz-second".into(),
            epoch: 7,
            stage: Stage::Freeze,
        },
    });
    assert!(out.operations.is_empty(), "{out:?}");
    let out = core.handle(Input::CopyFailed {
        volume: "unknown".into(),
        sequence: 1,
        error: String::new(),
        since_unix_ms: 0,
    });
    assert!(matches!(
        out.refused[..],
        [Refusal::FailureOutsideGroup { .. }]
    ));
}

fn timed_out(volume: &str, failed_writes: u64, at_unix_ms: i64) -> Input {
    Input::HoldTimedOut {
        volume: volume.to_owned(),
        failed_writes,
        at_unix_ms,
    }
}

fn hold_timeout(volume: &str, epoch: u64, failed_writes: u64, since_unix_ms: i64) -> HoldTimeout {
    HoldTimeout {
        volume: volume.to_owned(),
        group_uid: G.to_owned(),
        epoch,
        failed_writes,
        since_unix_ms,
    }
}

#[test]
fn hold_timeouts_add_up_per_volume_and_epoch_until_the_group_resumes() {
    let mut core = replicating();
    core.handle(directive(Path::Api, 3, Stage::Freeze));
    let out = core.handle(timed_out("v1", 2, 1_000));
    assert!(
        out.operations.is_empty() && out.refused.is_empty(),
        "{out:?}"
    );
    core.handle(timed_out("v1", 3, 2_000));
    core.handle(timed_out("v2", 1, 2_500));
    assert_eq!(
        core.hold_timeouts(),
        vec![
            hold_timeout("v1", 3, 5, 1_000),
            hold_timeout("v2", 3, 1, 2_500)
        ],
        "a running total per volume, since the first"
    );
    // The release keeps them: they are what happened during epoch 3.
    core.handle(directive(Path::Grpc, 3, Stage::Release));
    assert_eq!(core.hold_timeouts().len(), 2);
    // The resume forgets them.
    core.handle(directive(Path::Grpc, 3, Stage::Resume));
    assert!(core.hold_timeouts().is_empty());
}

#[test]
fn a_hold_timeout_before_the_freeze_arrives_names_the_epoch_seen_and_a_new_freeze_starts_afresh() {
    let mut core = replicating();
    core.handle(Input::CopyFailed {
        volume: "v1".into(),
        sequence: 9,
        error: "link cut".into(),
        since_unix_ms: 500,
    });
    // Both paths down: the fail-safe suspends at epoch 0, and held writes time out there.
    core.handle(Input::FailSafeTimer);
    core.handle(timed_out("v1", 4, 1_000));
    assert_eq!(core.hold_timeouts(), vec![hold_timeout("v1", 0, 4, 1_000)]);
    // The operator's freeze at a higher epoch: the old record goes; later timeouts count afresh.
    core.handle(directive(Path::Api, 1, Stage::Freeze));
    assert!(core.hold_timeouts().is_empty());
    core.handle(timed_out("v1", 1, 3_000));
    assert_eq!(core.hold_timeouts(), vec![hold_timeout("v1", 1, 1, 3_000)]);
}

#[test]
fn malformed_hold_timeouts_and_those_outside_a_group_are_refused() {
    let mut core = replicating();
    core.handle(directive(Path::Api, 1, Stage::Freeze));
    let out = core.handle(timed_out("v1", 0, 1_000));
    assert!(matches!(
        out.refused[..],
        [Refusal::MalformedHoldTimeout { .. }]
    ));
    let out = core.handle(timed_out("", 3, 1_000));
    assert!(matches!(
        out.refused[..],
        [Refusal::MalformedHoldTimeout { .. }]
    ));
    let out = core.handle(timed_out("other", 3, 1_000));
    assert!(matches!(
        out.refused[..],
        [Refusal::HoldTimeoutOutsideGroup { .. }]
    ));
    assert!(core.hold_timeouts().is_empty());
    // A volume that leaves the group takes its record with it.
    core.handle(timed_out("v2", 1, 1_000));
    assert_eq!(core.hold_timeouts().len(), 1);
    core.handle(membership(Path::Api, &["v1"]));
    assert!(core.hold_timeouts().is_empty());
}

#[test]
fn a_volume_leaving_a_frozen_group_stays_suspended_until_that_group_replicates() {
    let mut core = replicating();
    core.handle(Input::Synced(Path::Api));
    core.handle(directive(Path::Api, 2, Stage::Freeze));
    // v2 moves to another group while the first is frozen: refused, left suspended.
    core.handle(membership(Path::Api, &["v1"]));
    let other = |epoch, stage| Input::Directive {
        path: Path::Api,
        target: GroupEpoch {
            group_uid: "other-group".into(),
            epoch,
            stage,
        },
    };
    core.handle(other(0, Stage::Resume));
    let out = core.handle(Input::Membership {
        path: Path::Api,
        group_uid: "other-group".into(),
        group_name: "other".into(),
        order: ClaimOrder::new(Some(FIRST_CREATED_MS + 1_000), "other-group"),
        volumes: ["v2".to_owned()].into(),
        hold_timeout_ms: 1000,
    });
    assert!(out.operations.is_empty(), "{out:?}");
    assert!(matches!(out.refused[..], [Refusal::StillFrozen { .. }]));
    // Once the first group replicates again, v2 joins the other group.
    let out = core.handle(directive(Path::Grpc, 2, Stage::Resume));
    assert!(out.operations.iter().any(|op| matches!(
        op,
        Operation::Configure { volume, group_uid, .. } if volume == "v2" && group_uid == "other-group"
    )));
}

#[test]
fn after_a_restart_a_second_groups_claim_read_first_takes_no_volume_from_the_group_it_carries() {
    // Simulation seed 68 found it: a restarted sidecar read a second group's membership (listing v1, a
    // later claim) before its own group's, while v1 carried its group frozen at 2 and the group had
    // resumed at 2. The group "had let v1 go", so v1 was configured into no group — its freeze undone
    // mid-resync — and then joined the second group. Until every path delivered its complete view the
    // group a volume carries may still list it: nothing is taken from it before then.
    let mut core = Enforcer::with_paths([Path::Api, Path::Grpc].into());
    core.handle(Input::Inventory(vec![carrying(
        "v1",
        Level::point(2, Stage::Freeze),
        true,
    )]));
    core.handle(directive(Path::Grpc, 2, Stage::Resume));
    let second = |volumes: &[&str]| Input::Membership {
        path: Path::Api,
        group_uid: "second-group".into(),
        group_name: "second".into(),
        order: ClaimOrder::new(Some(FIRST_CREATED_MS + 1_000), "second-group"),
        volumes: volumes.iter().map(|v| (*v).to_owned()).collect(),
        hold_timeout_ms: 1000,
    };
    let mut operations = core.handle(second(&["v1"])).operations;
    operations.extend(
        core.handle(Input::Directive {
            path: Path::Api,
            target: GroupEpoch {
                group_uid: "second-group".into(),
                epoch: 1,
                stage: Stage::Release,
            },
        })
        .operations,
    );
    assert!(operations.is_empty(), "{operations:?}");
    // Its own group's membership arrives: v1 stays in it and resumes at 2.
    let out = core.handle(membership(Path::Api, &["v1"]));
    assert!(
        out.operations
            .iter()
            .all(|op| !matches!(op, Operation::Configure { group_uid, .. } if group_uid != G)),
        "{:?}",
        out.operations
    );
    for path in [Path::Api, Path::Grpc] {
        core.handle(Input::Synced(path));
    }
    assert_eq!(group_of_volume(&core, "v1").as_deref(), Some(G));
}

fn let_go(volume: &str) -> Operation {
    Operation::Configure {
        volume: volume.to_owned(),
        group_uid: String::new(),
        epoch: 0,
        stage: Stage::Resume,
        hold_timeout_ms: DEFAULT_HOLD_TIMEOUT_MS,
    }
}

fn group_of_volume(core: &Enforcer, volume: &str) -> Option<String> {
    core.volumes()
        .into_iter()
        .find(|v| v.volume == volume)
        .and_then(|v| v.group_uid)
}

#[test]
fn a_volume_leaving_a_frozen_group_for_no_group_is_let_go_once_that_group_replicates() {
    let mut core = replicating();
    core.handle(Input::Synced(Path::Api));
    core.handle(directive(Path::Api, 2, Stage::Freeze));
    // v2 leaves the frozen group and joins no other: it stays suspended (rule 5).
    let out = core.handle(membership(Path::Api, &["v1"]));
    assert!(out.operations.is_empty(), "{out:?}");
    assert_eq!(group_of_volume(&core, "v2").as_deref(), Some(G));
    // The group replicates again: v1 resumes with it, and v2 is let go of — configured into no group,
    // which resyncs it and replicates — instead of staying suspended in a group that no longer names it.
    let out = core.handle(directive(Path::Api, 2, Stage::Resume));
    assert_eq!(
        out.operations,
        vec![
            let_go("v2"),
            Operation::Resume {
                group_uid: G.into(),
                epoch: 2,
                volumes: names(&["v1"]),
            },
        ]
    );
    assert_eq!(out.acks, vec![ack(2, Stage::Resume, &["v1"], false)]);
    assert_eq!(group_of_volume(&core, "v2"), None);
    // Once, not on every input.
    assert!(core.handle(Input::Synced(Path::Grpc)).operations.is_empty());
}

#[test]
fn a_volume_leaving_a_frozen_group_for_another_is_let_go_before_it_joins() {
    let mut core = replicating();
    core.handle(Input::Synced(Path::Api));
    core.handle(directive(Path::Api, 2, Stage::Freeze));
    core.handle(membership(Path::Api, &["v1"]));
    let other = Input::Membership {
        path: Path::Api,
        group_uid: "other-group".into(),
        group_name: "other".into(),
        order: ClaimOrder::new(Some(FIRST_CREATED_MS + 1_000), "other-group"),
        volumes: ["v2".to_owned()].into(),
        hold_timeout_ms: 1000,
    };
    core.handle(Input::Directive {
        path: Path::Api,
        target: GroupEpoch {
            group_uid: "other-group".into(),
            epoch: 0,
            stage: Stage::Resume,
        },
    });
    core.handle(other);
    // Once the first group replicates, v2 is let go of (its suspension in the old group ends: a
    // `Configure` naming a new group alone would leave the replicator suspended at the old epoch),
    // then joins the other group.
    let out = core.handle(directive(Path::Api, 2, Stage::Resume));
    let for_v2: Vec<&Operation> = out
        .operations
        .iter()
        .filter(|op| op.volumes() == names(&["v2"]))
        .collect();
    assert_eq!(
        for_v2,
        vec![
            &let_go("v2"),
            &Operation::Configure {
                volume: "v2".into(),
                group_uid: "other-group".into(),
                epoch: 0,
                stage: Stage::Resume,
                hold_timeout_ms: 1000,
            }
        ]
    );
}

#[test]
fn a_volume_of_a_group_deleted_while_it_was_away_is_let_go_once_no_path_lists_the_group() {
    let mut core = replicating();
    core.handle(membership(Path::Grpc, &["v1", "v2"]));
    core.handle(Input::Synced(Path::Api));
    core.handle(Input::Synced(Path::Grpc));
    core.handle(directive(Path::Grpc, 3, Stage::Freeze));
    // The group is deleted while this node is cut off; the node returns. One path no longer lists the
    // group: the other still does, so the volumes stay suspended.
    let out = core.handle(Input::GroupGone {
        path: Path::Api,
        group_uid: G.into(),
    });
    assert!(out.operations.is_empty(), "{out:?}");
    // Neither path lists it: the group is gone (rule 9), its volumes are let go of.
    let out = core.handle(Input::GroupGone {
        path: Path::Grpc,
        group_uid: G.into(),
    });
    assert_eq!(out.operations, vec![let_go("v1"), let_go("v2")]);
    assert_eq!(group_of_volume(&core, "v1"), None);
    // A new group can claim them.
    let out = core.handle(Input::Directive {
        path: Path::Api,
        target: GroupEpoch {
            group_uid: "new-group".into(),
            epoch: 0,
            stage: Stage::Resume,
        },
    });
    assert!(out.operations.is_empty());
    let out = core.handle(Input::Membership {
        path: Path::Api,
        group_uid: "new-group".into(),
        group_name: "new".into(),
        order: ClaimOrder::new(Some(FIRST_CREATED_MS + 1_000), "new-group"),
        volumes: ["v1".to_owned()].into(),
        hold_timeout_ms: 1000,
    });
    assert!(out.refused.is_empty(), "{out:?}");
    assert_eq!(
        out.operations,
        vec![Operation::Configure {
            volume: "v1".into(),
            group_uid: "new-group".into(),
            epoch: 0,
            stage: Stage::Resume,
            hold_timeout_ms: 1000,
        }]
    );
}

#[test]
fn a_restarted_sidecar_lets_go_of_a_volume_whose_group_no_path_lists() {
    let mut core = Enforcer::new();
    core.handle(Input::Inventory(vec![carrying(
        "v1",
        Level::point(3, Stage::Release),
        false,
    )]));
    // Before a path delivered its complete view, nothing is known: the volume stays held, unconfirmed.
    let out = core.handle(Input::Directive {
        path: Path::Grpc,
        target: GroupEpoch {
            group_uid: "another-group".into(),
            epoch: 1,
            stage: Stage::Resume,
        },
    });
    assert!(out.operations.is_empty(), "{out:?}");
    // A path's complete view lists no such group: it is gone, the volume is let go of.
    let out = core.handle(Input::Synced(Path::Grpc));
    assert_eq!(out.operations, vec![let_go("v1")]);
}

#[test]
fn volumes_in_no_group_are_confirmed_standalone_once_a_path_is_synced() {
    let mut core = replicating();
    let out = core.handle(Input::Synced(Path::Api));
    assert_eq!(
        out.operations,
        vec![Operation::Configure {
            volume: "other".into(),
            group_uid: String::new(),
            epoch: 0,
            stage: Stage::Resume,
            hold_timeout_ms: DEFAULT_HOLD_TIMEOUT_MS,
        }]
    );
    assert!(core.handle(Input::Synced(Path::Grpc)).operations.is_empty());
}

#[test]
fn nothing_acts_before_the_inventory_and_a_failed_operation_waits_for_the_next() {
    let mut core = Enforcer::new();
    core.handle(membership(Path::Api, &["v1"]));
    assert!(
        core.handle(directive(Path::Api, 1, Stage::Freeze))
            .operations
            .is_empty()
    );
    let out = core.handle(Input::Inventory(vec![fresh("v1")]));
    assert_eq!(out.operations, vec![configure("v1", 1, Stage::Freeze)]);
    core.handle(Input::OperationFailed {
        volumes: names(&["v1"]),
    });
    // The replicator says it never got there: it is brought there again.
    let out = core.handle(Input::Inventory(vec![carrying(
        "v1",
        Level::point(0, Stage::Resume),
        true,
    )]));
    assert_eq!(out.operations, vec![suspend(1, &["v1"], false)]);
}

// ---- proptests -------------------------------------------------------------------------------------

/// A model replicator: refuses (panics on) what a real one refuses, so every sequence the core emits
/// must be valid.
#[derive(Debug, Clone, Default)]
struct ModelVolume {
    level: Option<Level>,
    history: Vec<(&'static str, Level)>,
}

impl ModelVolume {
    fn apply(&mut self, op: &Operation) {
        let target = op.level();
        let kind = match op {
            Operation::Suspend { .. } => "suspend",
            Operation::Release { .. } => "release",
            Operation::Resume { .. } => "resume",
            Operation::Configure { .. } => "configure",
        };
        if kind == "configure" {
            // The replicator's Configure confirms and brings the volume to the point itself.
            assert!(
                self.level.is_none_or(|l| target >= l),
                "configure {target} below {:?}",
                self.level
            );
        }
        match op {
            Operation::Release { epoch, .. } => assert_eq!(
                self.level,
                Some(Level::point(*epoch, Stage::Freeze)),
                "Release({epoch}) on a volume not suspended at exactly {epoch}"
            ),
            Operation::Resume { epoch, .. } => {
                let level = self.level.unwrap_or(Level::point(0, Stage::Resume));
                assert!(
                    level.epoch == *epoch && matches!(level.rank, Rank::Freeze | Rank::Release),
                    "Resume({epoch}) from {level}"
                );
            }
            _ => {}
        }
        if kind != "configure"
            && let Some(last) = self.history.iter().rev().find(|(k, _)| *k != "configure")
        {
            assert!(
                target > last.1,
                "{kind} {target} after {} {}",
                last.0,
                last.1
            );
        }
        if let Some(last) = self.history.last() {
            assert!(
                target >= last.1,
                "{kind} {target} after {} {}",
                last.0,
                last.1
            );
        }
        if kind == "configure" {
            assert!(
                self.history
                    .iter()
                    .all(|(k, l)| *k != "configure" || *l != target),
                "configured twice at {target}"
            );
        }
        self.history.push((kind, target));
        if self.level.is_none_or(|l| target > l) {
            self.level = Some(target);
        }
    }
}

/// The operator's points: (0, Resume), then for each later epoch a freeze, perhaps a release, perhaps a
/// resume.
fn operator_points() -> impl Strategy<Value = Vec<(u64, Stage)>> {
    prop::collection::vec((any::<bool>(), any::<bool>()), 1..6).prop_map(|epochs| {
        let mut points = vec![(0, Stage::Resume)];
        for (i, (release, resume)) in epochs.into_iter().enumerate() {
            let e = i as u64 + 1;
            points.push((e, Stage::Freeze));
            if release {
                points.push((e, Stage::Release));
            }
            if resume {
                points.push((e, Stage::Resume));
            }
        }
        points
    })
}

#[derive(Debug, Clone)]
enum Event {
    Deliver(usize, Path),
    Join(Path, usize),
    CopyFailed(usize),
    FailSafe,
}

fn scenario() -> impl Strategy<Value = (Vec<(u64, Stage)>, Vec<Event>)> {
    operator_points().prop_flat_map(|points| {
        let n = points.len();
        let event = prop_oneof![
            8 => (0..n, prop_oneof![Just(Path::Api), Just(Path::Grpc)])
                .prop_map(|(i, p)| Event::Deliver(i, p)),
            2 => (prop_oneof![Just(Path::Api), Just(Path::Grpc)], 0..3usize)
                .prop_map(|(p, k)| Event::Join(p, k)),
            1 => (0..3usize).prop_map(Event::CopyFailed),
            1 => Just(Event::FailSafe),
        ];
        (Just(points), prop::collection::vec(event, 1..40))
    })
}

const VOLUMES: [&str; 3] = ["a", "b", "c"];

fn run(points: &[(u64, Stage)], events: &[Event]) -> (Enforcer, BTreeMap<String, ModelVolume>) {
    let mut core = Enforcer::new();
    let mut model: BTreeMap<String, ModelVolume> = BTreeMap::new();
    let mut feed = |core: &mut Enforcer, input: Input| {
        let out = core.handle(input);
        for op in &out.operations {
            for volume in op.volumes() {
                model.entry(volume).or_default().apply(op);
            }
        }
        for ack in &out.acks {
            for volume in &ack.volumes {
                let level = model.get(volume).and_then(|m| m.level);
                let expected = if ack.fail_safe {
                    Level::fail_safe(ack.point.epoch)
                } else {
                    Level::point(ack.point.epoch, ack.point.stage)
                };
                assert!(
                    level.is_some_and(|l| l.satisfies(expected)),
                    "ack {} lists {volume} at {level:?}",
                    ack.point
                );
            }
        }
    };
    feed(
        &mut core,
        Input::Inventory(VOLUMES.iter().map(|v| fresh(v)).collect()),
    );
    let mut members: BTreeMap<Path, BTreeSet<String>> = BTreeMap::new();
    for event in events {
        let input = match event {
            Event::Deliver(i, path) => {
                let (epoch, stage) = points[*i];
                directive(*path, epoch, stage)
            }
            Event::Join(path, k) => {
                let set = members.entry(*path).or_default();
                set.insert(VOLUMES[*k].to_owned());
                Input::Membership {
                    path: *path,
                    group_uid: G.to_owned(),
                    group_name: "g".into(),
                    order: ClaimOrder::new(Some(FIRST_CREATED_MS), G),
                    volumes: set.clone(),
                    hold_timeout_ms: 10_000,
                }
            }
            Event::CopyFailed(k) => Input::CopyFailed {
                volume: VOLUMES[*k].to_owned(),
                sequence: 1,
                error: "cut".into(),
                since_unix_ms: 0,
            },
            Event::FailSafe => Input::FailSafeTimer,
        };
        // Every input twice: the second time changes nothing.
        feed(&mut core, input.clone());
        let again = core.handle(input);
        assert!(again.operations.is_empty(), "repeat acted: {again:?}");
        assert!(again.acks.is_empty(), "repeat acknowledged: {again:?}");
    }
    (core, model)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Per volume, operations are monotone in (epoch, stage), each point enforced at most once, every
    /// Release at exactly the epoch of the suspension, and acks only list volumes that got there.
    #[test]
    fn random_interleavings_of_two_paths_enforce_each_point_once((points, events) in scenario()) {
        let (core, model) = run(&points, &events);
        // Every volume in the group ends at the highest point delivered (or the fail-safe above it).
        let delivered = events.iter().filter_map(|e| match e {
            Event::Deliver(i, _) => Some(points[*i]),
            _ => None,
        }).max();
        let members: BTreeSet<usize> = events.iter().filter_map(|e| match e {
            Event::Join(_, k) => Some(*k),
            _ => None,
        }).collect();
        if let Some((epoch, stage)) = delivered {
            let view = core.groups();
            let group = view.iter().find(|g| g.group_uid == G);
            let fail_safe = group.and_then(|g| g.fail_safe);
            for k in members {
                let level = model.get(VOLUMES[k]).and_then(|m| m.level);
                let expected = match fail_safe {
                    Some(e) => Level::fail_safe(e),
                    None => Level::point(epoch, stage),
                };
                // Under a fail-safe, a volume never confirmed is left alone: it holds its I/O anyway.
                let unconfirmed_ok = fail_safe.is_some() && level.is_none();
                prop_assert!(
                    unconfirmed_ok || level.is_some_and(|l| l.satisfies(expected)),
                    "{} at {:?}, expected {}", VOLUMES[k], level, expected
                );
            }
        }
    }

    /// The same directives delivered in any order, on either path, duplicated, end in the same place as
    /// delivering only the highest.
    #[test]
    fn order_and_duplicates_do_not_matter(
        points in operator_points(),
        order in prop::collection::vec((any::<prop::sample::Index>(), any::<bool>()), 1..30),
    ) {
        let events: Vec<Event> = [Event::Join(Path::Api, 0), Event::Join(Path::Grpc, 1)]
            .into_iter()
            .chain(order.iter().map(|(i, api)| {
                Event::Deliver(i.index(points.len()), if *api { Path::Api } else { Path::Grpc })
            }))
            .collect();
        let (_, model) = run(&points, &events);
        let highest = order.iter().map(|(i, _)| points[i.index(points.len())]).max();
        let Some(highest) = highest else { return Ok(()) };
        let only: Vec<Event> = vec![
            Event::Join(Path::Api, 0),
            Event::Join(Path::Grpc, 1),
            Event::Deliver(points.iter().position(|p| *p == highest).unwrap_or(0), Path::Api),
        ];
        let (_, direct) = run(&points, &only);
        for v in ["a", "b"] {
            prop_assert_eq!(
                model.get(v).and_then(|m| m.level),
                direct.get(v).and_then(|m| m.level)
            );
        }
    }
}

/// The membership of another group, created `created_ms` after `G`.
fn other_membership(uid: &str, created_after_ms: i64, volumes: &[&str]) -> Input {
    Input::Membership {
        path: Path::Api,
        group_uid: uid.into(),
        group_name: uid.into(),
        order: ClaimOrder::new(Some(FIRST_CREATED_MS + created_after_ms), uid),
        volumes: volumes.iter().map(|v| (*v).to_owned()).collect(),
        hold_timeout_ms: 1000,
    }
}

fn other_directive(uid: &str, epoch: u64, stage: Stage) -> Input {
    Input::Directive {
        path: Path::Api,
        target: GroupEpoch {
            group_uid: uid.into(),
            epoch,
            stage,
        },
    }
}

fn touches(out: &Outcome, uid: &str) -> bool {
    out.operations.iter().any(|op| match op {
        Operation::Suspend { group_uid, .. }
        | Operation::Release { group_uid, .. }
        | Operation::Resume { group_uid, .. }
        | Operation::Configure { group_uid, .. } => group_uid == uid,
    })
}

#[test]
fn a_later_claim_is_refused_and_never_acted_on_whatever_its_uid() {
    // "aaa-later" sorts before G by UID but was created after it: the first claim (G's) wins.
    let mut core = replicating();
    core.handle(other_directive("aaa-later", 0, Stage::Resume));
    let out = core.handle(other_membership("aaa-later", 1_000, &["v1"]));
    assert!(!touches(&out, "aaa-later"), "{out:?}");
    assert!(
        out.refused.contains(&Refusal::DoubleClaim {
            group_uid: "aaa-later".into(),
            volume: "v1".into(),
            claimed_by: G.into()
        }),
        "{out:?}"
    );
    let out = core.handle(other_directive("aaa-later", 3, Stage::Freeze));
    assert!(out.operations.is_empty(), "{out:?}");
    // A cut in G freezes every volume of G, the contested one included.
    let out = core.handle(directive(Path::Api, 1, Stage::Freeze));
    assert_eq!(out.operations, vec![suspend(1, &["v1", "v2"], false)]);
    assert_eq!(out.acks, vec![ack(1, Stage::Freeze, &["v1", "v2"], false)]);
    // And a copy failure on it is reported in G.
    let out = core.handle(Input::CopyFailed {
        volume: "v1".into(),
        sequence: 9,
        error: "cut".into(),
        since_unix_ms: 0,
    });
    assert!(out.refused.is_empty(), "{out:?}");
    assert!(core.failures().iter().all(|f| f.group_uid == G));
}

#[test]
fn after_a_restart_a_later_claim_heard_first_takes_nothing() {
    // The replicator says v1 and v2 carry G (replicating, unconfirmed after the restart); the later
    // group's membership arrives before G's.
    let mut core = Enforcer::new();
    core.handle(Input::Inventory(vec![
        carrying("v1", Level::point(0, Stage::Resume), false),
        carrying("v2", Level::point(0, Stage::Resume), false),
    ]));
    core.handle(other_directive("aaa-later", 0, Stage::Resume));
    let out = core.handle(other_membership("aaa-later", 1_000, &["v1"]));
    assert!(!touches(&out, "aaa-later"), "{out:?}");
    core.handle(directive(Path::Api, 0, Stage::Resume));
    let out = core.handle(membership(Path::Api, &["v1", "v2"]));
    assert!(!touches(&out, "aaa-later"), "{out:?}");
    assert_eq!(
        out.operations,
        vec![
            configure("v1", 0, Stage::Resume),
            configure("v2", 0, Stage::Resume)
        ]
    );
    let out = core.handle(Input::Synced(Path::Api));
    assert!(!touches(&out, "aaa-later"), "{out:?}");
}

#[test]
fn a_volume_leaves_its_group_for_an_earlier_claim_only_at_a_replicating_point() {
    // G holds v1 and is frozen when an older group (created before G) comes to claim v1: v1 stays in
    // G, released and resumed with it, and moves only once G replicates again.
    let mut core = replicating();
    core.handle(directive(Path::Api, 1, Stage::Freeze));
    core.handle(other_directive("zzz-older", 0, Stage::Resume));
    let out = core.handle(other_membership("zzz-older", -1_000, &["v1"]));
    assert!(!touches(&out, "zzz-older"), "{out:?}");
    let out = core.handle(directive(Path::Api, 1, Stage::Release));
    assert_eq!(
        out.operations,
        vec![Operation::Release {
            group_uid: G.into(),
            epoch: 1,
            volumes: names(&["v1", "v2"]),
        }]
    );
    let out = core.handle(directive(Path::Api, 1, Stage::Resume));
    assert!(
        out.operations.iter().any(|op| matches!(
            op,
            Operation::Configure { volume, group_uid, .. } if volume == "v1" && group_uid == "zzz-older"
        )),
        "{out:?}"
    );
    assert_eq!(
        out.acks.iter().find(|a| a.point.group_uid == G),
        Some(&ack(1, Stage::Resume, &["v2"], false))
    );
}

#[test]
fn a_hold_timeout_outside_1s_to_10m_is_clamped_into_it() {
    // The CRD admits 1s..10m; a membership message could carry anything (issue 21 item 5).
    for (given, kept) in [(1, 1_000), (u64::MAX, 600_000), (10_000, 10_000)] {
        let mut core = Enforcer::new();
        core.handle(Input::Inventory(vec![fresh("v1")]));
        core.handle(Input::Membership {
            path: Path::Grpc,
            group_uid: G.to_owned(),
            group_name: "orders".to_owned(),
            order: ClaimOrder::new(Some(FIRST_CREATED_MS), G),
            volumes: ["v1".to_owned()].into(),
            hold_timeout_ms: given,
        });
        let out = core.handle(directive(Path::Grpc, 0, Stage::Resume));
        assert!(
            out.operations.iter().any(|operation| matches!(
                operation,
                Operation::Configure { hold_timeout_ms, .. } if *hold_timeout_ms == kept
            )),
            "{given} ms: {:?}",
            out.operations
        );
    }
}

#[test]
fn the_fail_safe_interval_stays_below_the_groups_hold_timeout() {
    let core = replicating(); // hold timeout 10 s
    let short = Duration::from_secs(5);
    assert_eq!(core.fail_safe_interval(G, short), short);
    for configured in [Duration::from_secs(10), Duration::from_secs(60)] {
        let interval = core.fail_safe_interval(G, configured);
        assert!(
            interval < Duration::from_secs(10) && !interval.is_zero(),
            "{configured:?} gave {interval:?}"
        );
    }
    let unknown = core.fail_safe_interval("no-such-group", Duration::from_secs(60));
    assert!(unknown < Duration::from_millis(DEFAULT_HOLD_TIMEOUT_MS));
}

#[test]
fn refusals_name_groups_by_name_with_their_uid() {
    let names = |uid: &str| match uid {
        "uid-1" => Some("orders-db"),
        "uid-2" => Some("billing-db"),
        _ => None,
    };
    let double = Refusal::DoubleClaim {
        group_uid: "uid-2".into(),
        volume: "vol-a".into(),
        claimed_by: "uid-1".into(),
    };
    assert_eq!(
        double.describe(names),
        "volume vol-a is claimed by group orders-db (uid uid-1) and also by group billing-db (uid uid-2)"
    );
    let not_owned = Refusal::NotOwned {
        group_uid: "uid-1".into(),
        volume: "vol-b".into(),
    };
    assert_eq!(
        not_owned.describe(names),
        "group orders-db (uid uid-1) names volume vol-b, which this node does not serve"
    );
    let frozen = Refusal::StillFrozen {
        volume: "vol-c".into(),
        group_uid: "uid-3".into(),
        frozen_in: "uid-1".into(),
    };
    assert_eq!(
        frozen.describe(names),
        "volume vol-c stays in group orders-db (uid uid-1) until that group lets it go at a replicating point; not joining group uid-3"
    );
}

#[test]
fn a_volume_the_replicator_holds_after_a_failed_copy_is_a_failure_even_unannounced() {
    // The replicator announced the failed copy while this sidecar was not listening (it restarted):
    // its volume list still says the volume holds writes, and that is reported like the event.
    let mut core = replicating();
    core.handle(directive(Path::Api, 2, Stage::Resume));
    assert!(core.failures().is_empty());
    let mut held = carrying("v1", Level::point(2, Stage::Resume), true);
    held.held_after_failure = Some(17);
    core.handle(Input::Inventory(vec![
        held.clone(),
        carrying("v2", Level::point(2, Stage::Resume), true),
    ]));
    let failures = core.failures();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(
        (
            failures[0].volume.as_str(),
            failures[0].sequence,
            failures[0].epoch_seen
        ),
        ("v1", 17, 2)
    );
    // Listed again, it is still one failure.
    core.handle(Input::Inventory(vec![held]));
    assert_eq!(core.failures().len(), 1);
}

#[test]
fn a_volume_found_in_a_fail_safe_suspension_after_a_restart_is_reported_and_freezes_the_group() {
    // Simulation seed 7578 found it: a copy failed while the member cluster was cut off, the sidecar
    // took its fail-safe (suspended at epoch 2), restarted before any path came back, and the new
    // sidecar — which only looked for volumes *held* after a failed copy — forgot the failure. The
    // operator never heard of it, the group stayed replicating at 2, and the volume stayed suspended,
    // failing every write at the hold timeout. A fail-safe is taken only for a failure not yet
    // acknowledged: found in the volume list, it is that failure, reported at the epoch it carries.
    let mut core = replicating();
    core.handle(directive(Path::Api, 2, Stage::Resume));
    core.handle(Input::Inventory(vec![
        carrying("v1", Level::fail_safe(2), true),
        carrying("v2", Level::point(2, Stage::Resume), true),
    ]));
    let failures = core.failures();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(
        (failures[0].volume.as_str(), failures[0].epoch_seen),
        ("v1", 2)
    );
    // The freeze it brings lifts the fail-safe and answers the report.
    let out = core.handle(directive(Path::Api, 3, Stage::Freeze));
    assert!(core.failures().is_empty(), "{:?}", core.failures());
    assert!(
        out.operations
            .iter()
            .any(|op| op.volumes().contains(&"v1".to_owned())
                && op.level() == Level::point(3, Stage::Freeze)),
        "{:?}",
        out.operations
    );
}

#[test]
fn a_sidecar_restarted_while_cut_off_takes_its_fail_safe_at_the_epoch_its_volumes_carry() {
    // Restarted with no path answering: v1 holds writes after a failed copy at epoch 3, v2 replicates
    // at 3. The fail-safe suspends both at 3 — at 0 it would have suspended nothing carrying 3 — and
    // the group's current point (3, Resume) does not lift it: only a later epoch does.
    let mut core = Enforcer::with_paths([Path::Api, Path::Grpc].into());
    let mut held = carrying("v1", Level::point(3, Stage::Resume), true);
    held.held_after_failure = Some(9);
    let inventory = vec![held, carrying("v2", Level::point(3, Stage::Resume), true)];
    core.handle(Input::Inventory(inventory.clone()));
    core.handle(membership(Path::Api, &["v1", "v2"]));
    // The volume list is read again (every poll): now v1's failure has a group.
    core.handle(Input::Inventory(inventory));
    assert_eq!(core.failures().len(), 1);
    let out = core.handle(Input::FailSafeTimer);
    assert_eq!(out.operations, vec![suspend(3, &["v1", "v2"], true)]);
    let out = core.handle(directive(Path::Api, 3, Stage::Resume));
    assert!(out.operations.is_empty(), "{:?}", out.operations);
    assert!(matches!(out.refused[..], [Refusal::BelowFailSafe { .. }]));
    let out = core.handle(directive(Path::Api, 4, Stage::Freeze));
    assert_eq!(out.operations, vec![suspend(4, &["v1", "v2"], false)]);
}

#[test]
fn a_volume_still_listed_as_held_at_an_epoch_the_group_left_is_no_new_failure() {
    // Held at epoch 2, then the group froze at 3 (that freeze answered the failure): a volume list read
    // before the suspension reached the replicator must not freeze the group again.
    let mut core = replicating();
    core.handle(directive(Path::Api, 3, Stage::Freeze));
    let mut held = carrying("v1", Level::point(2, Stage::Resume), true);
    held.held_after_failure = Some(5);
    core.handle(Input::Inventory(vec![
        held,
        carrying("v2", Level::point(3, Stage::Freeze), true),
    ]));
    assert!(core.failures().is_empty(), "{:?}", core.failures());
}

/// A copy that fails after the group froze (a write in flight as the freeze landed) is answered by that
/// freeze: it is not reported, so that the resume at the same epoch does not freeze the group again for
/// it. A failure during the resync is reported at that epoch.
#[test]
fn a_copy_failing_while_frozen_is_not_reported_after_the_resume() {
    let failed = |core: &mut Enforcer, sequence| {
        core.handle(Input::CopyFailed {
            volume: "v1".into(),
            sequence,
            error: "link cut".into(),
            since_unix_ms: 500,
        });
    };
    let mut core = replicating();
    failed(&mut core, 1);
    assert_eq!(core.failures().len(), 1, "reported while replicating");
    core.handle(directive(Path::Api, 1, Stage::Freeze));
    assert!(core.failures().is_empty(), "answered by the freeze");
    failed(&mut core, 2);
    core.handle(directive(Path::Api, 1, Stage::Release));
    failed(&mut core, 3);
    assert!(core.failures().is_empty(), "{:?}", core.failures());
    core.handle(directive(Path::Api, 1, Stage::Resume));
    assert!(core.failures().is_empty(), "{:?}", core.failures());
    failed(&mut core, 4);
    let failures = core.failures();
    assert_eq!(failures.len(), 1);
    assert_eq!((failures[0].sequence, failures[0].epoch_seen), (4, 1));
}

/// Seen on kube-apiserver: an operator that had just replaced a killed one sent a membership without the
/// frozen group (it had not listed it yet) while the API path was still listing; the sidecar let both
/// frozen volumes go and they replicated writes that depended on ones the group had lost. A sidecar
/// running both paths takes a group as gone only once each has delivered a complete view without it.
#[test]
fn a_frozen_group_missing_from_one_path_while_the_other_still_lists_is_not_let_go() {
    let mut core = Enforcer::with_paths([Path::Api, Path::Grpc].into());
    core.handle(Input::Inventory(vec![fresh("v1"), fresh("v2")]));
    core.handle(membership(Path::Grpc, &["v1", "v2"]));
    core.handle(Input::Synced(Path::Grpc));
    core.handle(directive(Path::Grpc, 0, Stage::Resume));
    core.handle(directive(Path::Grpc, 1, Stage::Freeze));
    // A new operator's first membership does not name the group; the API path has not listed yet.
    let out = core.handle(Input::GroupGone {
        path: Path::Grpc,
        group_uid: G.to_owned(),
    });
    let out_synced = core.handle(Input::Synced(Path::Grpc));
    for out in [out, out_synced] {
        assert!(
            !out.operations.contains(&let_go("v1")) && !out.operations.contains(&let_go("v2")),
            "{out:?}"
        );
    }
    assert_eq!(group_of_volume(&core, "v1").as_deref(), Some(G));
    // The API path lists the group: still frozen in it.
    core.handle(membership(Path::Api, &["v1", "v2"]));
    assert!(core.handle(Input::Synced(Path::Api)).operations.is_empty());
    assert_eq!(group_of_volume(&core, "v2").as_deref(), Some(G));
    // Deleted for real: both paths complete without it, and the volumes go.
    let out = core.handle(Input::GroupGone {
        path: Path::Api,
        group_uid: G.to_owned(),
    });
    assert_eq!(out.operations, vec![let_go("v1"), let_go("v2")]);
    assert_eq!(group_of_volume(&core, "v1"), None);
}

#[test]
fn a_sidecar_running_one_path_lets_a_deleted_frozen_group_go_on_that_path_alone() {
    let mut core = Enforcer::with_paths([Path::Grpc].into());
    core.handle(Input::Inventory(vec![fresh("v1")]));
    core.handle(membership(Path::Grpc, &["v1"]));
    core.handle(Input::Synced(Path::Grpc));
    core.handle(directive(Path::Grpc, 1, Stage::Freeze));
    core.handle(Input::GroupGone {
        path: Path::Grpc,
        group_uid: G.to_owned(),
    });
    let out = core.handle(Input::Synced(Path::Grpc));
    assert_eq!(group_of_volume(&core, "v1"), None, "{out:?}");
}

/// The state reported for `volume`, as the paths send it.
fn state_of(core: &Enforcer, volume: &str) -> VolumeState {
    let failures = core.failures();
    core.volumes()
        .iter()
        .find(|v| v.volume == volume)
        .map(|v| v.state(&failures))
        .unwrap()
}

#[test]
fn a_resumed_volume_is_resyncing_until_a_listing_says_its_resync_is_done() {
    let mut core = replicating();
    core.handle(directive(Path::Grpc, 1, Stage::Freeze));
    core.handle(directive(Path::Grpc, 1, Stage::Release));
    assert_eq!(state_of(&core, "v1"), VolumeState::Running);
    let out = core.handle(directive(Path::Grpc, 1, Stage::Resume));
    assert_eq!(out.operations, vec![resume(1, &["v1", "v2"])]);
    assert_eq!(out.acks, vec![ack(1, Stage::Resume, &["v1", "v2"], false)]);
    // Acknowledged at (1, Resume), yet not in sync: the operator would count it in the next image.
    assert_eq!(state_of(&core, "v1"), VolumeState::Resyncing);

    // The replicator lists v1 still copying, v2 done.
    let at_resume = |volume: &str, resyncing: bool| Carried {
        resyncing,
        ..carrying(volume, Level::point(1, Stage::Resume), true)
    };
    core.handle(Input::Inventory(vec![
        at_resume("v1", true),
        at_resume("v2", false),
        fresh("other"),
    ]));
    assert_eq!(state_of(&core, "v1"), VolumeState::Resyncing);
    assert_eq!(state_of(&core, "v2"), VolumeState::Replicating);
    core.handle(Input::Inventory(vec![
        at_resume("v1", false),
        at_resume("v2", false),
        fresh("other"),
    ]));
    assert_eq!(state_of(&core, "v1"), VolumeState::Replicating);

    // A freeze stops the resync: suspended, and not resyncing once released again.
    core.handle(Input::Inventory(vec![
        at_resume("v1", true),
        at_resume("v2", false),
        fresh("other"),
    ]));
    core.handle(directive(Path::Grpc, 2, Stage::Freeze));
    assert_eq!(state_of(&core, "v1"), VolumeState::Suspended);
    core.handle(directive(Path::Grpc, 2, Stage::Release));
    assert_eq!(state_of(&core, "v1"), VolumeState::Running);
    assert!(core.volumes().iter().all(|v| !v.resyncing));
}

/// Found by the simulator (seed 11473 of a soak): a replicator restarted while its group replicated came
/// back unconfirmed with chunks to resynchronise; its sidecar confirmed it at the group's point (1, Resume)
/// with a `Configure`, which started that resync, and reported it replicating — in sync — until its next
/// listing. The resync's copy failed, the volume was reported Held (taken as in sync), and the freeze
/// that failure started named an image whose secondary was half resynchronised.
#[test]
fn a_volume_confirmed_into_replication_resyncs_until_a_listing_says_it_is_done_even_if_its_copy_fails()
 {
    let mut core = Enforcer::new();
    let at_resume = |resyncing: bool, held: Option<u64>, confirmed: bool| Carried {
        resyncing,
        held_after_failure: held,
        ..carrying("v1", Level::point(1, Stage::Resume), confirmed)
    };
    // Restarted: unconfirmed, carrying the group's point.
    core.handle(Input::Inventory(vec![at_resume(false, None, false)]));
    core.handle(membership(Path::Api, &["v1"]));
    let out = core.handle(directive(Path::Api, 1, Stage::Resume));
    assert_eq!(out.operations, vec![configure("v1", 1, Stage::Resume)]);
    assert_eq!(state_of(&core, "v1"), VolumeState::Resyncing);

    // Its resync's copy fails: it holds writes, and its secondary is still not in sync.
    core.handle(Input::CopyFailed {
        volume: "v1".into(),
        sequence: 7,
        error: "secondary did not acknowledge".into(),
        since_unix_ms: 0,
    });
    assert_eq!(state_of(&core, "v1"), VolumeState::Resyncing);
    core.handle(Input::Inventory(vec![at_resume(false, Some(7), true)]));
    assert_eq!(state_of(&core, "v1"), VolumeState::Resyncing);

    // Confirmed with nothing to copy, a listing says so at once.
    let mut core = Enforcer::new();
    core.handle(Input::Inventory(vec![at_resume(false, None, false)]));
    core.handle(membership(Path::Api, &["v1"]));
    core.handle(directive(Path::Api, 1, Stage::Resume));
    core.handle(Input::Inventory(vec![at_resume(false, None, true)]));
    assert_eq!(state_of(&core, "v1"), VolumeState::Replicating);
}
