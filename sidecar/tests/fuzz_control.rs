//! Fuzz targets for everything that reaches a sidecar from outside its enforcement core: what the
//! operator pushes on the `Subscribe` stream and answers to `Report` and `Ack`, and what the node's
//! replicator reports (its volume states and events). Arbitrary bytes go to every message's decoder;
//! hostile directives and memberships go over a real gRPC stream on 127.0.0.1 through the sidecar's own
//! gRPC path (decode → validation) into the enforcement core; hostile replicator states go through the
//! sidecar's own conversion into the core.
//!
//! What must hold: no panic; malformed points (no group, unset or unknown stage, an epoch beyond the
//! largest) never reach the core; hold timeouts reach it only within the range a group may have; and the
//! core never issues an operation or an acknowledgement at an epoch no path or volume told it of,
//! releases only at the highest epoch seen, never moves a volume backwards, and never lowers what it
//! has seen. Cases: `LOCKSTEP_FUZZ_CASES` (`scripts/fuzz.sh` runs them long).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use lockstep_api::domain::{ClaimOrder, GroupEpoch, MAX_EPOCH, Path, Stage};
use lockstep_api::fuzz::{config as fuzz_config, wire_enum};
use lockstep_api::proto::control::v1 as cpb;
use lockstep_api::proto::replicator::v1 as rpb;
use lockstep_sidecar::agent::{Agent, AgentConfig};
use lockstep_sidecar::enforce::{
    Enforcer, HOLD_TIMEOUT_RANGE_MS, Input, Level, Operation, bounded_hold_timeout_ms,
};
use lockstep_sidecar::grpc_path::{self, ClientSecurity, GrpcConfig, GrpcPath};
use lockstep_sidecar::metrics::Metrics;
use lockstep_sidecar::replicator::{Replicator, carried};
use proptest::prelude::*;
use prost::Message;
use tokio_util::sync::CancellationToken;

const GROUPS: [&str; 2] = ["g1", "g2"];
const VOLUMES: [&str; 3] = ["v1", "v2", "v3"];

// ---- Hostile values ------------------------------------------------------------------------------

fn hostile_string() -> impl Strategy<Value = String> + Clone {
    lockstep_api::fuzz::hostile_string(
        &["ｇ1", "g1\u{200b}", "v1\u{0}", "../v1"],
        1024..=512 * 1024,
    )
}

fn group_uid() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => proptest::sample::select(GROUPS.to_vec()).prop_map(str::to_owned),
        1 => hostile_string(),
    ]
}

fn volume() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => proptest::sample::select(VOLUMES.to_vec()).prop_map(str::to_owned),
        1 => hostile_string(),
    ]
}

fn epoch() -> impl Strategy<Value = u64> {
    prop_oneof![
        12 => 0u64..5,
        1 => Just(MAX_EPOCH),
        1 => Just(MAX_EPOCH + 1),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

fn wire_point() -> impl Strategy<Value = cpb::GroupEpoch> {
    (group_uid(), epoch(), wire_enum(3)).prop_map(|(group_uid, epoch, stage)| cpb::GroupEpoch {
        group_uid,
        epoch,
        stage,
    })
}

fn hold_timeout_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(999),
        Just(1_000),
        Just(30_000),
        Just(600_000),
        Just(600_001),
        Just(u64::MAX),
        any::<u64>(),
    ]
}

fn unix_ms() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        Just(-1),
        Just(i64::MIN),
        Just(i64::MAX),
        any::<i64>()
    ]
}

/// What a hostile operator pushes on the stream.
fn control_message() -> impl Strategy<Value = cpb::ControlMessage> {
    use cpb::control_message::Kind;
    let resolved = (
        hostile_string(),
        hostile_string(),
        hostile_string(),
        volume(),
    )
        .prop_map(
            |(namespace, pvc, persistent_volume, volume_handle)| cpb::ResolvedVolume {
                namespace,
                pvc,
                persistent_volume,
                volume_handle,
            },
        );
    let membership = (
        hostile_string(),
        proptest::option::weighted(0.9, wire_point()),
        hold_timeout_ms(),
        proptest::collection::vec(resolved, 0..4),
        unix_ms(),
        prop_oneof![Just(0u64), 0..5u64, Just(u64::MAX)],
    )
        .prop_map(
            |(group_name, current, hold_timeout_ms, volumes, created_unix_ms, in_sync_epoch)| {
                cpb::GroupMembership {
                    group_name,
                    current,
                    hold_timeout_ms,
                    volumes,
                    created_unix_ms,
                    in_sync_epoch,
                }
            },
        );
    prop_oneof![
        6 => (proptest::option::weighted(0.9, wire_point()), hostile_string()).prop_map(
            |(target, group_name)| cpb::ControlMessage {
                kind: Some(Kind::Directive(cpb::Directive { target, group_name })),
            }
        ),
        3 => proptest::collection::vec(membership, 0..3).prop_map(|groups| cpb::ControlMessage {
            kind: Some(Kind::Membership(cpb::Membership { groups })),
        }),
        1 => unix_ms().prop_map(|sent_unix_ms| cpb::ControlMessage {
            kind: Some(Kind::Heartbeat(cpb::Heartbeat { sent_unix_ms })),
        }),
        1 => Just(cpb::ControlMessage { kind: None }),
    ]
}

/// A volume state as a hostile (or broken) replicator reports it.
fn replicator_state() -> impl Strategy<Value = rpb::VolumeState> {
    (
        volume(),
        prop_oneof![3 => group_uid(), 1 => Just(String::new())],
        epoch(),
        wire_enum(3),
        wire_enum(7),
        any::<bool>(),
    )
        .prop_map(
            |(volume_handle, group_uid, epoch, stage, mode, fail_safe)| rpb::VolumeState {
                volume_handle,
                group_uid,
                epoch,
                stage,
                mode,
                fail_safe,
                ..rpb::VolumeState::default()
            },
        )
}

/// What the replicator tells the core: its inventory (through the sidecar's conversion) and its events.
fn replicator_input() -> impl Strategy<Value = Input> {
    prop_oneof![
        3 => proptest::collection::vec(replicator_state(), 0..4)
            .prop_map(|states| Input::Inventory(states.iter().map(carried).collect())),
        2 => (volume(), any::<u64>(), hostile_string(), unix_ms()).prop_map(
            |(volume, sequence, error, since_unix_ms)| Input::CopyFailed {
                volume,
                sequence,
                error,
                since_unix_ms,
            }
        ),
        1 => (volume(), any::<u64>(), unix_ms()).prop_map(|(volume, failed_writes, at_unix_ms)| {
            Input::HoldTimedOut { volume, failed_writes, at_unix_ms }
        }),
        1 => proptest::collection::vec(volume(), 0..3)
            .prop_map(|volumes| Input::OperationFailed { volumes }),
        1 => Just(Input::FailSafeTimer),
    ]
}

/// What a path hands the core after its validation: points it accepted, memberships with bounded hold
/// timeouts (as both paths bound them).
fn path_input() -> impl Strategy<Value = Input> {
    let path = prop_oneof![Just(Path::Api), Just(Path::Grpc)];
    let stage = prop_oneof![
        Just(Stage::Freeze),
        Just(Stage::Release),
        Just(Stage::Resume)
    ];
    prop_oneof![
        6 => (path.clone(), group_uid(), 0u64..5, stage).prop_filter_map(
            "a path refuses points without a group",
            |(path, uid, epoch, stage)| {
                GroupEpoch::new(&uid, epoch, stage).ok().map(|target| Input::Directive { path, target })
            }
        ),
        3 => (
            path.clone(),
            group_uid().prop_filter("a path refuses groups without a UID", |uid| !uid.is_empty()),
            hostile_string(),
            unix_ms(),
            proptest::collection::btree_set(volume(), 0..4),
            hold_timeout_ms(),
        )
            .prop_map(|(path, group_uid, group_name, created, volumes, hold)| Input::Membership {
                path,
                order: ClaimOrder::new(Some(created), group_uid.clone()),
                group_uid,
                group_name,
                volumes,
                hold_timeout_ms: bounded_hold_timeout_ms(hold),
            }),
        1 => (path.clone(), group_uid())
            .prop_map(|(path, group_uid)| Input::GroupGone { path, group_uid }),
        1 => path.prop_map(Input::Synced),
        1 => (group_uid(), epoch(), proptest::collection::btree_set(volume(), 0..3)).prop_map(
            |(group_uid, epoch, volumes)| Input::GroupInSync { group_uid, epoch, volumes }
        ),
    ]
}

// ---- The core's invariants -----------------------------------------------------------------------

/// What the core was told, per group, and where each volume was last sent: the reference the invariants
/// are checked against.
#[derive(Debug, Default)]
struct Told {
    /// The highest level per group any path delivered or any volume carried.
    highest: BTreeMap<String, Level>,
    /// Per volume, the group and level of the last operation since its level was last known anew.
    sent: BTreeMap<String, (String, Level)>,
}

impl Told {
    fn raise(&mut self, group: &str, level: Level) {
        let entry = self.highest.entry(group.to_owned()).or_insert(level);
        *entry = (*entry).max(level);
    }
}

/// Feeds one input to the core and checks its outcome against what the core was told.
fn feed(core: &mut Enforcer, told: &mut Told, input: Input) -> Result<(), TestCaseError> {
    match &input {
        Input::Directive { target, .. } => {
            prop_assert!(
                !target.group_uid.is_empty(),
                "a point without a group reached the core"
            );
            prop_assert!(
                target.epoch <= MAX_EPOCH,
                "epoch {} beyond the largest reached the core",
                target.epoch
            );
            told.raise(&target.group_uid, Level::point(target.epoch, target.stage));
        }
        Input::Membership {
            hold_timeout_ms, ..
        } => {
            prop_assert!(
                *hold_timeout_ms == 0 || HOLD_TIMEOUT_RANGE_MS.contains(hold_timeout_ms),
                "hold timeout {hold_timeout_ms} ms reached the core"
            );
        }
        Input::Inventory(volumes) => {
            for volume in volumes {
                if let Some(group) = &volume.group_uid {
                    told.raise(group, volume.level);
                }
                told.sent.remove(&volume.volume);
            }
        }
        Input::OperationFailed { volumes } => {
            for volume in volumes {
                told.sent.remove(volume);
            }
        }
        _ => {}
    }
    let seen_before: BTreeMap<String, Level> = core
        .groups()
        .into_iter()
        .filter_map(|group| Some((group.group_uid, group.seen?)))
        .collect();
    let outcome = core.handle(input.clone());
    for operation in &outcome.operations {
        let (group, level) = match operation {
            Operation::Suspend { group_uid, .. }
            | Operation::Release { group_uid, .. }
            | Operation::Resume { group_uid, .. } => (group_uid.clone(), operation.level()),
            Operation::Configure {
                group_uid,
                hold_timeout_ms,
                ..
            } => {
                prop_assert!(
                    *hold_timeout_ms == 0 || HOLD_TIMEOUT_RANGE_MS.contains(hold_timeout_ms),
                    "{operation:?} after {input:?}"
                );
                (group_uid.clone(), operation.level())
            }
        };
        if group.is_empty() {
            // Let go of: the volume leaves every group, and a later group's epochs start anew.
            for volume in operation.volumes() {
                told.sent.remove(&volume);
            }
            continue;
        }
        let highest = told.highest.get(&group).map(|level| level.epoch);
        prop_assert!(
            highest.is_some_and(|epoch| level.epoch <= epoch),
            "{operation:?} at an epoch nothing told of (highest {highest:?}) after {input:?}"
        );
        if let Operation::Release { epoch, .. } = operation {
            prop_assert_eq!(
                core.seen_epoch(&group),
                Some(*epoch),
                "{:?} after {:?}",
                operation,
                input
            );
        }
        for volume in operation.volumes() {
            if let Some((sent_group, sent_level)) = told.sent.get(&volume)
                && *sent_group == group
            {
                prop_assert!(
                    level >= *sent_level,
                    "{volume} sent back from {sent_level} to {level} by {operation:?} after {input:?}"
                );
            }
            told.sent.insert(volume, (group.clone(), level));
        }
    }
    for ack in &outcome.acks {
        let highest = told.highest.get(&ack.point.group_uid).copied();
        let level = Level::point(ack.point.epoch, ack.point.stage);
        prop_assert!(
            highest.is_some_and(|highest| if ack.fail_safe {
                ack.point.epoch <= highest.epoch
            } else {
                level <= highest
            }),
            "{ack:?} beyond what the core was told ({highest:?}) after {input:?}"
        );
    }
    for group in core.groups() {
        if let (Some(before), Some(after)) = (seen_before.get(&group.group_uid), group.seen) {
            prop_assert!(
                after >= *before,
                "{} saw {} then {} after {:?}",
                group.group_uid,
                before,
                after,
                input
            );
        }
    }
    Ok(())
}

// ---- Arbitrary bytes and the core in-process -----------------------------------------------------

proptest! {
    #![proptest_config(fuzz_config(2_000))]

    /// Everything the operator and the replicator send a sidecar decodes arbitrary bytes to a message or
    /// a clean error.
    #[test]
    fn messages_a_sidecar_receives_decode_arbitrary_bytes_without_panicking(
        bytes in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        let _ = cpb::ControlMessage::decode(bytes.as_slice());
        let _ = cpb::AckResponse::decode(bytes.as_slice());
        let _ = cpb::ReportResponse::decode(bytes.as_slice());
        let _ = rpb::ListVolumesResponse::decode(bytes.as_slice());
        let _ = rpb::ReplicationEvent::decode(bytes.as_slice());
        let _ = rpb::DirectiveResponse::decode(bytes.as_slice());
        let _ = rpb::VolumeState::decode(bytes.as_slice());
        let _ = rpb::ImageResponse::decode(bytes.as_slice());
    }
}

proptest! {
    #![proptest_config(fuzz_config(1_000))]

    /// Hostile replicator states and events interleaved with what the paths deliver: the core keeps its
    /// invariants.
    #[test]
    fn the_enforcement_core_keeps_its_invariants_under_hostile_input(
        inputs in proptest::collection::vec(
            prop_oneof![3 => path_input(), 2 => replicator_input()], 1..40),
    ) {
        let mut core = Enforcer::new();
        let mut told = Told::default();
        for input in inputs {
            feed(&mut core, &mut told, input)?;
        }
    }
}

// ---- The real gRPC path, over a socket -----------------------------------------------------------

/// A sidecar's gRPC path subscribed to a test Control server; what it hands the core arrives on
/// `inputs`, which nothing else reads.
struct Stream {
    control: FakeControl,
    inputs: tokio::sync::mpsc::UnboundedReceiver<Input>,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Stream {
    async fn open() -> Self {
        let control = FakeControl::start().await;
        let dir = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        // The replicator is never called: only the gRPC path runs, not the agent.
        let replicator =
            Replicator::new(&dir.path().join("absent.sock"), Duration::from_secs(1)).unwrap();
        let (_agent, context, inputs) = Agent::new(
            NODE.into(),
            CLUSTER.into(),
            replicator,
            Arc::new(Metrics::new()),
            AgentConfig {
                inventory_interval: Duration::from_secs(3600),
                fail_safe_interval: Duration::from_secs(3600),
                paths: Default::default(),
            },
            stop.clone(),
        );
        let path = GrpcPath::new(GrpcConfig {
            endpoint: control.endpoint(),
            security: ClientSecurity::Plaintext,
            timeout: Duration::from_millis(100),
            idle_timeout: Duration::from_secs(3600),
        })
        .unwrap();
        tokio::spawn(grpc_path::subscribe(path, context));
        eventually("the gRPC path subscribed", || control.subscribers() > 0).await;
        Self {
            control,
            inputs,
            stop,
            _dir: dir,
        }
    }

    /// Pushes `messages` down the stream, then a marker directive; returns what the path handed the
    /// core before the marker.
    async fn deliver(&mut self, messages: &[cpb::ControlMessage], marker: u64) -> Vec<Input> {
        for message in messages {
            self.control.out.send(message.clone()).unwrap();
        }
        self.control
            .out
            .send(cpb::ControlMessage {
                kind: Some(cpb::control_message::Kind::Directive(cpb::Directive {
                    target: Some(cpb::GroupEpoch {
                        group_uid: "marker".into(),
                        epoch: marker,
                        stage: cpb::Stage::Freeze as i32,
                    }),
                    group_name: "marker".into(),
                })),
            })
            .unwrap();
        let mut delivered = Vec::new();
        loop {
            let input = tokio::time::timeout(Duration::from_secs(60), self.inputs.recv())
                .await
                .expect("the marker within a minute")
                .expect("the path runs");
            match input {
                Input::Directive { target, .. } if target.group_uid == "marker" => {
                    if target.epoch == marker {
                        return delivered;
                    }
                }
                Input::Synced(_) => {}
                input => delivered.push(input),
            }
        }
    }
}

#[test]
fn hostile_operator_messages_over_grpc_reach_the_core_only_validated() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stream = std::cell::RefCell::new(runtime.block_on(Stream::open()));
    let marker = std::cell::Cell::new(0u64);
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        source_file: Some(file!()),
        // Each case talks to a real server: shrinking is bounded in time, not only in steps.
        max_shrink_time: 120_000,
        ..fuzz_config(500)
    });
    let strategy = (
        proptest::collection::vec(control_message(), 1..12),
        proptest::collection::vec(replicator_input(), 0..4),
    );
    let delivered_inputs = std::cell::Cell::new(0usize);
    runner
        .run(&strategy, |(messages, replicator)| {
            marker.set(marker.get() + 1);
            let inputs = runtime.block_on(stream.borrow_mut().deliver(&messages, marker.get()));
            delivered_inputs.set(delivered_inputs.get() + inputs.len());
            let mut core = Enforcer::new();
            let mut told = Told::default();
            // The replicator's view first (as on start-up), then what the operator sent, checked
            // input by input.
            for input in replicator.into_iter().chain(inputs) {
                if let Input::Membership { group_uid, .. } | Input::GroupGone { group_uid, .. } =
                    &input
                {
                    prop_assert!(
                        !group_uid.is_empty(),
                        "a membership without a group reached the core"
                    );
                }
                feed(&mut core, &mut told, input)?;
            }
            Ok(())
        })
        .unwrap();
    stream.borrow().stop.cancel();
    println!(
        "gRPC path fuzz: {} cases, {} inputs handed to the core",
        runner.config().cases,
        delivered_inputs.get()
    );
}
