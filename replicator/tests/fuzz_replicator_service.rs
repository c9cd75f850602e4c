//! Fuzz target for the `Replicator` gRPC service: a real primary (three volumes replicating to a real
//! secondary) serving the service on a unix socket, called with hostile sequences of Configure, Suspend,
//! Release, Resume, State and the kept-image calls — unknown, empty, duplicated and hostile volume
//! handles and group UIDs, epochs 0 to `u64::MAX`, unset and unknown stages, hold timeouts from 0 to
//! `u64::MAX` ms — and with arbitrary bytes as the body of each call.
//!
//! What must hold: no panic on any thread and the service keeps answering; every refusal is a clean
//! status (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, UNIMPLEMENTED for a roll-back, or gRPC's own
//! INTERNAL for bytes that are not the message); a volume never goes backwards in (epoch, stage) within
//! its group; a release succeeds only on a volume suspended at exactly its epoch; a call refused for a
//! malformed or unknown argument changes nothing. Cases: `LOCKSTEP_FUZZ_CASES` (`scripts/fuzz.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use hyper_util::rt::TokioIo;
use lockstep_api::fuzz::RawCodec;
use lockstep_api::proto::replicator::v1 as pb;
use lockstep_replicator::secondary::{Secondary, SecondaryConfig};
use lockstep_replicator::{CopyConfig, Primary, PrimaryConfig, VolumeConfig};
use pb::replicator_client::ReplicatorClient;
use proptest::prelude::*;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

const VOLUMES: [&str; 3] = ["v1", "v2", "v3"];
const GROUPS: [&str; 2] = ["g1", "g2"];

// ---- Hostile calls -------------------------------------------------------------------------------

fn hostile_string() -> impl Strategy<Value = String> + Clone {
    lockstep_api::fuzz::hostile_string(&["ｖ1", "v1\u{0}", "../v1"], 200..=256 * 1024)
}

fn volume() -> impl Strategy<Value = String> {
    prop_oneof![
        10 => proptest::sample::select(VOLUMES.to_vec()).prop_map(str::to_owned),
        1 => hostile_string(),
    ]
}

fn volumes() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(volume(), 0..4)
}

fn group() -> impl Strategy<Value = String> {
    prop_oneof![
        10 => proptest::sample::select(GROUPS.to_vec()).prop_map(str::to_owned),
        1 => hostile_string(),
    ]
}

fn epoch() -> impl Strategy<Value = u64> {
    prop_oneof![
        12 => 0u64..5,
        1 => Just(u64::MAX - 1),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

fn stage() -> impl Strategy<Value = i32> {
    prop_oneof![1 => Just(0), 9 => lockstep_api::fuzz::wire_enum(3)]
}

#[derive(Debug, Clone)]
enum Call {
    Configure(pb::ConfigureRequest),
    Suspend(pb::DirectiveRequest),
    Release(pb::DirectiveRequest),
    Resume(pb::DirectiveRequest),
    State(String),
    KeepImage(pb::ImageRequest),
    DropImage(pb::ImageRequest),
    RollBack(pb::ImageRequest),
    /// Arbitrary bytes as the body of a call to one of the methods.
    Raw(usize, Vec<u8>),
}

const METHODS: [&str; 8] = [
    "Configure",
    "Suspend",
    "Release",
    "Resume",
    "State",
    "KeepImage",
    "DropImage",
    "ListVolumes",
];

fn call() -> impl Strategy<Value = Call> {
    let directive = || {
        (volumes(), group(), epoch(), any::<bool>()).prop_map(
            |(volume_handles, group_uid, epoch, fail_safe)| pb::DirectiveRequest {
                volume_handles,
                group_uid,
                epoch,
                fail_safe,
            },
        )
    };
    let image = || {
        (volumes(), group(), epoch()).prop_map(|(volume_handles, group_uid, epoch)| {
            pb::ImageRequest {
                volume_handles,
                group_uid,
                epoch,
            }
        })
    };
    let configure = (
        volume(),
        prop_oneof![5 => group(), 1 => Just(String::new())],
        epoch(),
        stage(),
        prop_oneof![
            Just(0u64),
            Just(1),
            Just(10_000),
            Just(u64::MAX),
            any::<u64>()
        ],
    )
        .prop_map(
            |(volume_handle, group_uid, epoch, stage, hold_timeout_ms)| pb::ConfigureRequest {
                volume_handle,
                group_uid,
                epoch,
                stage,
                hold_timeout_ms,
            },
        );
    prop_oneof![
        4 => configure.prop_map(Call::Configure),
        4 => directive().prop_map(Call::Suspend),
        4 => directive().prop_map(Call::Release),
        3 => directive().prop_map(Call::Resume),
        1 => volume().prop_map(Call::State),
        1 => image().prop_map(Call::KeepImage),
        1 => image().prop_map(Call::DropImage),
        1 => image().prop_map(Call::RollBack),
        2 => (0..METHODS.len(), proptest::collection::vec(any::<u8>(), 0..256))
            .prop_map(|(method, body)| Call::Raw(method, body)),
    ]
}

// ---- The service ---------------------------------------------------------------------------------

async fn channel(socket: &Path) -> Channel {
    let path = socket.to_owned();
    Endpoint::try_from("http://replicator.invalid")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap()
}

/// Where a volume is, as the service says: its group, (epoch, stage) and mode.
type Position = (String, u64, i32, i32);

async fn positions(client: &mut ReplicatorClient<Channel>) -> BTreeMap<String, Position> {
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
    .map(|state| {
        (
            state.volume_handle,
            (state.group_uid, state.epoch, state.stage, state.mode),
        )
    })
    .collect()
}

fn clean_refusal(status: &Status) -> bool {
    match status.code() {
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::Unimplemented => {
            true
        }
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
        Call::Configure(request) => client.configure(request).await.map(|_| ()),
        Call::Suspend(request) => client.suspend(request).await.map(|_| ()),
        Call::Release(request) => client.release(request).await.map(|_| ()),
        Call::Resume(request) => client.resume(request).await.map(|_| ()),
        Call::State(volume_handle) => client
            .state(pb::StateRequest { volume_handle })
            .await
            .map(|_| ()),
        Call::KeepImage(request) => client.keep_image(request).await.map(|_| ()),
        Call::DropImage(request) => client.drop_image(request).await.map(|_| ()),
        Call::RollBack(request) => client.roll_back(request).await.map(|_| ()),
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
fn the_replicator_service_refuses_hostile_calls_cleanly_and_never_goes_backwards() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("primary")).unwrap();
    let socket = dir.path().join("control.sock");
    let (_secondary, _primary, channel) = runtime.block_on(async {
        let secondary = Secondary::start(SecondaryConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            dir: dir.path().join("secondary"),
            security: lockstep_replicator::LinkSecurity::Plaintext,
        })
        .await
        .unwrap();
        let primary = Primary::start(PrimaryConfig {
            volumes: VOLUMES
                .iter()
                .map(|name| VolumeConfig {
                    require_confirmation: true,
                    ..VolumeConfig::new(
                        name,
                        dir.path().join("primary").join(name),
                        Some(MIB),
                        Some(CopyConfig {
                            secondary: secondary.local_addr().to_string(),
                            timeout: Duration::from_secs(5),
                            security: lockstep_replicator::LinkSecurity::Plaintext,
                        }),
                    )
                })
                .collect(),
            nbd_listen: Some("127.0.0.1:0".parse().unwrap()),
            nbd_socket: None,
            record_latency: false,
            control_socket: Some(socket.clone()),
        })
        .await
        .unwrap();
        let channel = channel(&socket).await;
        (secondary, primary, channel)
    });
    let client = ReplicatorClient::new(channel.clone());
    let answered = fuzz_service(
        &runtime,
        file!(),
        500,
        call(),
        || {
            let mut client = client.clone();
            async move { positions(&mut client).await }
        },
        |call| {
            let (mut client, channel, call) = (client.clone(), channel.clone(), call.clone());
            async move { make(&mut client, &channel, &call).await }
        },
        |call| {
            let text = format!("{call:?}");
            text.split('(').next().unwrap_or_default().to_owned()
        },
        clean_refusal,
        |FuzzStep {
             call,
             result,
             before,
             after,
         }| {
            for (volume, (group, epoch, stage, _)) in after {
                let (old_group, old_epoch, old_stage, _) = &before[volume];
                if group == old_group && !group.is_empty() {
                    prop_assert!(
                        (epoch, stage) >= (old_epoch, old_stage),
                        "{} went back from ({}, {}) to ({}, {}) in {} after {:?}",
                        volume,
                        old_epoch,
                        old_stage,
                        epoch,
                        stage,
                        group,
                        call
                    );
                }
            }
            if let (Call::Release(request), Ok(())) = (call, result) {
                for volume in &request.volume_handles {
                    let (group, epoch, _, mode) = &before[volume];
                    prop_assert!(
                        *group == request.group_uid
                            && *epoch == request.epoch
                            && (*mode == pb::Mode::Suspended as i32
                                || *mode == pb::Mode::Running as i32),
                        "released {} at {} in {}, which was at {:?}",
                        volume,
                        request.epoch,
                        request.group_uid,
                        before[volume]
                    );
                }
            }
            Ok(())
        },
    );
    println!("replicator service fuzz: answers {answered:?}");
}
