//! Issue 20, item 1: a volume belongs to at most one group. Later groups claiming the first group's
//! PVCs (by name, and by `selector: {}`) are applied while the workload runs; the operator is restarted;
//! then a replication link is cut. The first group keeps every volume and freezes all of them, the later
//! groups are refused (their MembersResolved condition and a Warning Event name the first group), and
//! the secondaries are consistent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
use common::{all_handles, finish, image, start};

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{ListParams, PostParams};
use lockstep_api::domain::{Policy, Stage};
use lockstep_api::v1alpha1::ConsistencyGroup;
use lockstep_e2e::faults::LinkCutMode;
use lockstep_e2e::scenario::{Harness, Setup};
use serde_json::json;

/// How long a state the control system reaches on its own may take before the scenario fails.
const DEADLINE: Duration = Duration::from_secs(60);

fn condition(group: &ConsistencyGroup, type_: &str) -> Option<(String, String, String)> {
    group
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Polls the hub's group `name` until `goal` holds.
async fn wait_for(
    h: &Harness,
    name: &str,
    what: &str,
    goal: impl Fn(&ConsistencyGroup) -> bool,
) -> ConsistencyGroup {
    let api = Api::<ConsistencyGroup>::all(h.world.hub().client.clone());
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut last = None;
    loop {
        if let Ok(group) = api.get(name).await {
            if goal(&group) {
                h.timeline.say(format!("cg {name}: {what}"));
                return group;
            }
            last = Some(group);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cg {name} never reached {what}; last seen: {:?}\n{}",
            last.and_then(|g| g.status),
            h.timeline.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many member volumes the group's status counts as not resolved to a volume and node.
fn unresolved(status: &lockstep_api::v1alpha1::ConsistencyGroupStatus) -> u32 {
    status
        .volumes
        .iter()
        .flat_map(|counts| counts.clusters.iter())
        .map(|cluster| cluster.unresolved)
        .sum()
}

/// Refused: MembersResolved is False, naming `holder`, and no member volume is counted.
fn refused_naming(holder: &str) -> impl Fn(&ConsistencyGroup) -> bool {
    let holder = format!("already belongs to group {holder:?}");
    move |g| {
        condition(g, "MembersResolved").is_some_and(|(status, reason, message)| {
            status == "False" && reason == "ClaimedByAnotherGroup" && message.contains(&holder)
        }) && g
            .status
            .as_ref()
            .is_some_and(|s| unresolved(s) == s.member_count)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn later_groups_claiming_the_first_groups_pvcs_are_refused_across_an_operator_restart_and_a_cut()
 {
    let mut h = start(Setup::new(Policy::FreezeAndGo).unwrap()).await;
    let first = h.world.group_name.clone();
    let first_uid = h.world.group_uid.clone();
    let east_namespace = h.cluster("east").unwrap().spec.namespace.clone();
    let west_namespace = h.cluster("west").unwrap().spec.namespace.clone();
    // Named to sort before the first group; their UIDs are random, so the first claim must win by
    // creation time whatever the names and UIDs.
    let later = [
        (
            "aaa-orders-copy",
            json!([
                {"cluster": "east", "namespace": east_namespace, "pvcNames": ["postgres-wal", "postgres-data"]},
                {"cluster": "west", "namespace": west_namespace, "selector": {}},
            ]),
        ),
        (
            "aab-orders-everything",
            json!([{"cluster": "east", "namespace": east_namespace, "selector": {}}]),
        ),
    ];
    let api = Api::<ConsistencyGroup>::all(h.world.hub().client.clone());
    // creationTimestamp has a second's grain, and groups made in the same second are ordered by UID: the
    // later groups are made in a later second than the first, so that only the rule decides.
    let created = api
        .get(&first)
        .await
        .unwrap()
        .metadata
        .creation_timestamp
        .unwrap()
        .0;
    while k8s_openapi::jiff::Timestamp::now().as_second() <= created.as_second() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (name, members) in &later {
        let group: ConsistencyGroup = serde_json::from_value(json!({
            "apiVersion": "lockstep.dev/v1alpha1",
            "kind": "ConsistencyGroup",
            "metadata": {"name": name},
            "spec": {"policy": "FreezeAndGo", "members": members},
        }))
        .unwrap();
        api.create(&PostParams::default(), &group).await.unwrap();
        h.timeline
            .say(format!("kubectl apply: cg {name}, claiming {first}'s PVCs"));
    }
    for (name, _) in &later {
        wait_for(&h, name, "refused", refused_naming(&first)).await;
    }
    ok!(h, h.wait_for_more_writes(30));

    h.kill_operator();
    ok!(h, h.start_operator());
    // The new operator has decided again: the first group still holds every volume, the later ones
    // are still refused.
    ok!(
        h,
        h.wait_group("every member still resolved", |g| {
            g.status
                .as_ref()
                .is_some_and(|s| s.member_count == 3 && unresolved(s) == 0)
        })
    );
    for (name, _) in &later {
        wait_for(&h, name, "still refused", refused_naming(&first)).await;
    }
    ok!(h, h.wait_for_more_writes(30));

    // A cut on a contested volume freezes every volume of the first group.
    h.cut(&["east-postgres-wal"], LinkCutMode::Reset).unwrap();
    ok!(h, h.wait_for_copy_failure());
    let group = ok!(
        h,
        h.wait_group("released at epoch 1", |g| g.position()
            == (1, Stage::Release))
    );
    assert_eq!(image(&group), all_handles(&h), "{}", h.timeline.text());
    for handle in all_handles(&h) {
        let status = h.volume_status(&handle).unwrap();
        assert_eq!(
            (
                status.replication.group_uid.as_str(),
                status.replication.epoch
            ),
            (first_uid.as_str(), 1),
            "{handle} froze in the first group\n{}",
            h.timeline.text()
        );
    }
    for (name, _) in &later {
        let group = api.get(name).await.unwrap();
        assert!(
            refused_naming(&first)(&group),
            "{name}: {:?}\n{}",
            group.status,
            h.timeline.text()
        );
        assert_eq!(group.position().0, 0, "{name} never froze");
    }
    // Each refused group carries a Warning Event naming the group that holds its PVCs.
    let events = Api::<Event>::all(h.world.hub().client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    for (name, _) in &later {
        assert!(
            events.items.iter().any(|event| {
                event.reason.as_deref() == Some("ClaimRefused")
                    && event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(*name)
                    && event
                        .note
                        .as_deref()
                        .is_some_and(|note| note.contains(&format!("group {first:?}")))
            }),
            "no ClaimRefused Event on {name}: {:?}\n{}",
            events
                .items
                .iter()
                .map(|e| (&e.reason, &e.regarding, &e.note))
                .collect::<Vec<_>>(),
            h.timeline.text()
        );
    }
    finish(h).await;
}
