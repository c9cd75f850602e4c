//! Fuzz target for a secondary's `Replicator` service (issue 33's failover side): a real secondary with
//! three volume files (one keeping the image of epoch 1), its control socket and NBD, called with
//! hostile sequences of Promote, Fence, Reverse, State, ListVolumes and the directives — unknown, empty
//! and hostile volume handles, group UIDs and peers, epochs 0 to `u64::MAX`, old-site ranges anywhere
//! up to `u64::MAX` — and with arbitrary bytes as the body of each call.
//!
//! What must hold: no panic on any thread and the service keeps answering; every refusal is a clean
//! status (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, or gRPC's own INTERNAL for bytes that are
//! not the message); a call refused for a malformed or unknown argument changes nothing; a promoted
//! volume stays promoted, at its epoch (nothing streams to it here to demote it), and a fenced one
//! stays fenced. Cases: `LOCKSTEP_FUZZ_CASES` (`scripts/fuzz.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use lockstep_api::fuzz::RawCodec;
use lockstep_api::proto::replicator::v1 as pb;
use lockstep_replicator::secondary::SecondaryConfig;
use lockstep_replicator::testing::control_client;
use lockstep_replicator::{SecondaryNode, SecondaryNodeConfig};
use pb::replicator_client::ReplicatorClient;
use proptest::prelude::*;
use tonic::transport::Channel;
use tonic::{Code, Status};

const VOLUMES: [&str; 3] = ["v1", "v2", "v3"];
const GROUPS: [&str; 2] = ["g1", "g2"];

fn hostile_string() -> impl Strategy<Value = String> + Clone {
    lockstep_api::fuzz::hostile_string(
        &["ｖ1", "v1\u{0}", "../v1", ".v1.promoted.json"],
        200..=64 * 1024,
    )
}

fn volumes() -> impl Strategy<Value = Vec<String>> {
    let volume = prop_oneof![
        10 => proptest::sample::select(VOLUMES.to_vec()).prop_map(str::to_owned),
        1 => hostile_string(),
    ];
    proptest::collection::vec(volume, 0..4)
}

fn group() -> impl Strategy<Value = String> {
    prop_oneof![
        10 => proptest::sample::select(GROUPS.to_vec()).prop_map(str::to_owned),
        1 => Just(String::new()),
        1 => hostile_string(),
    ]
}

fn epoch() -> impl Strategy<Value = u64> {
    prop_oneof![12 => 0u64..4, 1 => Just(u64::MAX), 1 => any::<u64>()]
}

fn peer() -> impl Strategy<Value = String> {
    prop_oneof![
        // Nothing listens there: the reverse link fails and the volume holds.
        6 => Just("127.0.0.1:9".to_owned()),
        1 => Just(String::new()),
        1 => Just("127.0.0.1:0".to_owned()),
        1 => hostile_string(),
    ]
}

fn ranges() -> impl Strategy<Value = Vec<pb::VolumeRanges>> {
    let range = prop_oneof![
        6 => (0u64..MIB, 0u64..MIB),
        1 => (any::<u64>(), any::<u64>()),
        1 => (Just(u64::MAX), Just(1u64)),
    ]
    .prop_map(|(offset, length)| pb::ByteRange { offset, length });
    let volume = (
        prop_oneof![4 => proptest::sample::select(VOLUMES.to_vec()).prop_map(str::to_owned), 1 => hostile_string()],
        proptest::collection::vec(range, 0..4),
    )
        .prop_map(|(volume_handle, ranges)| pb::VolumeRanges {
            volume_handle,
            ranges,
        });
    proptest::collection::vec(volume, 0..3)
}

#[derive(Debug, Clone)]
enum Call {
    Promote(pb::FailoverRequest),
    Fence(pb::FailoverRequest),
    Reverse(pb::ReverseRequest),
    Suspend(pb::DirectiveRequest),
    Resume(pb::DirectiveRequest),
    State(String),
    /// Arbitrary bytes as the body of a call to one of the methods.
    Raw(usize, Vec<u8>),
}

const METHODS: [&str; 6] = [
    "Promote",
    "Fence",
    "Reverse",
    "State",
    "ListVolumes",
    "Suspend",
];

fn call() -> impl Strategy<Value = Call> {
    let failover = || {
        (volumes(), group(), epoch(), any::<bool>()).prop_map(
            |(volume_handles, group_uid, epoch, primary_site_lost)| pb::FailoverRequest {
                volume_handles,
                group_uid,
                epoch,
                primary_site_lost,
            },
        )
    };
    let directive = || {
        (volumes(), group(), epoch()).prop_map(|(volume_handles, group_uid, epoch)| {
            pb::DirectiveRequest {
                volume_handles,
                group_uid,
                epoch,
                fail_safe: false,
            }
        })
    };
    let reverse = (volumes(), group(), epoch(), peer(), ranges()).prop_map(
        |(volume_handles, group_uid, epoch, peer, old_site_changes)| pb::ReverseRequest {
            volume_handles,
            group_uid,
            epoch,
            peer,
            old_site_changes,
        },
    );
    prop_oneof![
        5 => failover().prop_map(Call::Promote),
        2 => failover().prop_map(Call::Fence),
        3 => reverse.prop_map(Call::Reverse),
        1 => directive().prop_map(Call::Suspend),
        1 => directive().prop_map(Call::Resume),
        1 => prop_oneof![proptest::sample::select(VOLUMES.to_vec()).prop_map(str::to_owned), hostile_string()]
            .prop_map(Call::State),
        2 => (0..METHODS.len(), proptest::collection::vec(any::<u8>(), 0..256))
            .prop_map(|(method, body)| Call::Raw(method, body)),
    ]
}

/// Per volume: (promoted epoch, fenced epoch, replica).
type Seen = (Option<u64>, Option<u64>, bool);

async fn seen(client: &mut ReplicatorClient<Channel>) -> BTreeMap<String, Seen> {
    tokio::time::timeout(
        Duration::from_secs(60),
        client.list_volumes(pb::ListVolumesRequest {}),
    )
    .await
    .expect("ListVolumes answered within a minute")
    .expect("the service still lists its volumes")
    .into_inner()
    .volumes
    .into_iter()
    .map(|s| {
        (
            s.volume_handle,
            (s.promoted_epoch, s.fenced_epoch, s.replica),
        )
    })
    .collect()
}

fn clean_refusal(status: &Status) -> bool {
    match status.code() {
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition => true,
        Code::Internal => status
            .message()
            .contains("failed to decode Protobuf message"),
        _ => false,
    }
}

async fn make(
    client: &mut ReplicatorClient<Channel>,
    channel: &Channel,
    call: &Call,
) -> Result<(), Status> {
    match call.clone() {
        Call::Promote(request) => client.promote(request).await.map(|_| ()),
        Call::Fence(request) => client.fence(request).await.map(|_| ()),
        Call::Reverse(request) => client.reverse(request).await.map(|_| ()),
        Call::Suspend(request) => client.suspend(request).await.map(|_| ()),
        Call::Resume(request) => client.resume(request).await.map(|_| ()),
        Call::State(volume_handle) => client
            .state(pb::StateRequest { volume_handle })
            .await
            .map(|_| ()),
        Call::Raw(method, body) => {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            grpc.ready().await.unwrap();
            let path = http::uri::PathAndQuery::try_from(format!(
                "/lockstep.replicator.v1.Replicator/{}",
                METHODS[method % METHODS.len()]
            ))
            .unwrap();
            grpc.unary(tonic::Request::new(body), path, RawCodec)
                .await
                .map(|_| ())
        }
    }
}

#[test]
fn a_secondarys_failover_service_refuses_hostile_calls_cleanly_and_keeps_its_promotions() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secondary_dir = dir.path().join("secondary");
    std::fs::create_dir_all(&secondary_dir).unwrap();
    for name in VOLUMES {
        std::fs::write(secondary_dir.join(name), vec![0u8; MIB as usize]).unwrap();
    }
    // v3 keeps the image of epoch 1 (a resync had started after that freeze).
    drop(lockstep_replicator::undo::UndoLog::create(&secondary_dir, "v3", 1, MIB).unwrap());
    let socket = dir.path().join("control.sock");
    let (_node, channel) = runtime.block_on(async {
        let node = SecondaryNode::start(SecondaryNodeConfig::serving(
            SecondaryConfig::plaintext("127.0.0.1:0".parse().unwrap(), secondary_dir.clone()),
            socket.clone(),
        ))
        .await
        .unwrap();
        drop(control_client(&socket).await);
        (
            node,
            lockstep_replicator::failover_cli::channel(&socket)
                .await
                .unwrap(),
        )
    });
    let client = ReplicatorClient::new(channel.clone());
    let answered = fuzz_service(
        &runtime,
        file!(),
        300,
        call(),
        || {
            let mut client = client.clone();
            async move { seen(&mut client).await }
        },
        |call| {
            let (mut client, channel, call) = (client.clone(), channel.clone(), call.clone());
            async move { make(&mut client, &channel, &call).await }
        },
        |call| call_name(call).to_owned(),
        clean_refusal,
        |FuzzStep {
             call,
             before,
             after,
             ..
         }| {
            for (volume, (promoted, fenced, _)) in before {
                let (now_promoted, now_fenced, _) = &after[volume];
                if promoted.is_some() {
                    prop_assert_eq!(
                        now_promoted,
                        promoted,
                        "{} lost its promotion after {:?}",
                        volume,
                        call
                    );
                }
                if fenced.is_some() {
                    prop_assert_eq!(
                        now_fenced,
                        fenced,
                        "{} changed its fence after {:?}",
                        volume,
                        call
                    );
                }
            }
            Ok(())
        },
    );
    println!("failover service fuzz: answers {answered:?}");
}

fn call_name(call: &Call) -> &'static str {
    match call {
        Call::Promote(_) => "Promote",
        Call::Fence(_) => "Fence",
        Call::Reverse(_) => "Reverse",
        Call::Suspend(_) => "Suspend",
        Call::Resume(_) => "Resume",
        Call::State(_) => "State",
        Call::Raw(..) => "Raw",
    }
}
