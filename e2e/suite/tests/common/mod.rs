//! What the scenario tests share: starting a harness with its timeline, running a step or failing with
//! the timeline, finishing with every promise checked, and reading a group's image and conditions.
#![allow(dead_code)] // each test binary uses its own part of this module

use lockstep_api::domain::Phase;
use lockstep_api::v1alpha1::ConsistencyGroup;
use lockstep_e2e::scenario::{Harness, Outcome, Setup, Target};
use lockstep_e2e::timeline::Timeline;

/// Starts a scenario on the target the environment names, panicking with the timeline on failure.
pub async fn start(setup: Setup) -> Harness {
    start_on(setup, Target::from_env().unwrap()).await
}

/// Starts a scenario on `target`, panicking with the timeline on failure.
pub async fn start_on(setup: Setup, target: Target) -> Harness {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .try_init();
    let timeline = Timeline::new(std::env::var_os("LOCKSTEP_E2E_PRINT").is_some());
    Harness::start(setup, target, timeline.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", timeline.text()))
}

/// Runs `step`, or panics with the error and the timeline so far.
macro_rules! ok {
    ($h:expr, $step:expr) => {
        match $step.await {
            Ok(v) => v,
            Err(e) => panic!("{e}\n{}", $h.timeline.text()),
        }
    };
}

/// Finishes the scenario and asserts every promise: secondaries consistent, nothing acknowledged lost,
/// Replicating again with primaries and secondaries identical and the image whole.
pub async fn finish(h: Harness) -> Outcome {
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
    // On failure, the whole status: which condition said what, and each member's state.
    assert_eq!(
        condition(&outcome.resynced, "ConsistentImage").as_deref(),
        Some("True"),
        "{}\n{text}",
        serde_json::to_string_pretty(&outcome.resynced.status).unwrap_or_default()
    );
    outcome
}

/// The status (True/False) of a condition of the group.
pub fn condition(group: &ConsistencyGroup, type_: &str) -> Option<String> {
    group
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

/// The volume handles of the group's consistent image, sorted.
pub fn image(group: &ConsistencyGroup) -> Vec<String> {
    let mut handles: Vec<String> = group
        .status
        .as_ref()
        .and_then(|s| s.consistent_image.as_ref())
        .map(|i| i.volumes.iter().map(|v| v.volume_handle.clone()).collect())
        .unwrap_or_default();
    handles.sort();
    handles
}

/// Every volume handle of the scenario's world, sorted.
pub fn all_handles(h: &Harness) -> Vec<String> {
    let mut handles: Vec<String> = h
        .world
        .volumes()
        .map(|(_, v)| v.spec.handle.clone())
        .collect();
    handles.sort();
    handles
}

/// The group is Frozen.
pub fn frozen(g: &ConsistencyGroup) -> bool {
    g.status.as_ref().and_then(|s| s.phase) == Some(Phase::Frozen)
}
