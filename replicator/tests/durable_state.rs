//! A directive is answered only once the state it leads to is durable (DESIGN.md rules 2 and 6): the
//! volume's (group, epoch, stage) and the dirty-region map covering its held writes. Here the state file
//! cannot be written — its scratch file leads to `/dev/full`, a full disk — so a release or suspend
//! fails, the volume stays held at its old stage, a retry writes the state again (it is not "already
//! done"), and no held write is acknowledged until the state that covers it is on disk.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use lockstep_replicator::testing::control_client as client;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use lockstep_api::proto::replicator::v1 as pb;
use lockstep_replicator::dirty::CHUNK;
use lockstep_replicator::hold::{Persisted, Stage};
use lockstep_replicator::nbd::proto::EIO;
use lockstep_replicator::secondary::{Secondary, SecondaryConfig};
use lockstep_replicator::volume::{state_path, state_scratch_path};
use lockstep_replicator::{CopyConfig, Primary, PrimaryConfig, VolumeConfig};
use pb::replicator_client::ReplicatorClient;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

const GROUP: &str = "group-uid-1";
const VOLUME: &str = "vol1";

/// One replicated volume with a control socket, unconfirmed at start.
struct Node {
    dir: tempfile::TempDir,
    _secondary: Secondary,
    primary: Primary,
}

impl Node {
    async fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("primary")).unwrap();
        let secondary = Secondary::start(SecondaryConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            dir: dir.path().join("secondary"),
            security: lockstep_replicator::LinkSecurity::Plaintext,
        })
        .await
        .unwrap();
        let primary = Primary::start(PrimaryConfig {
            volumes: vec![VolumeConfig {
                require_confirmation: true,
                ..VolumeConfig::new(
                    VOLUME,
                    dir.path().join("primary").join(VOLUME),
                    Some(4 * MIB),
                    Some(CopyConfig {
                        secondary: secondary.local_addr().to_string(),
                        timeout: Duration::from_secs(5),
                        security: lockstep_replicator::LinkSecurity::Plaintext,
                    }),
                )
            }],
            nbd_listen: Some("127.0.0.1:0".parse().unwrap()),
            nbd_socket: None,
            record_latency: false,
            control_socket: Some(dir.path().join("control.sock")),
        })
        .await
        .unwrap();
        Node {
            dir,
            _secondary: secondary,
            primary,
        }
    }

    fn state_file(&self) -> PathBuf {
        state_path(&self.dir.path().join("primary").join(VOLUME))
    }

    /// The state as it is on disk.
    fn on_disk(&self) -> Persisted {
        serde_json::from_slice(&std::fs::read(self.state_file()).unwrap()).unwrap()
    }

    /// From now on every write of the state file fails: its scratch file is on a full disk.
    fn fail_state_writes(&self) {
        std::os::unix::fs::symlink("/dev/full", state_scratch_path(&self.state_file())).unwrap();
    }

    /// The disk has room again.
    fn heal_state_writes(&self) {
        std::fs::remove_file(state_scratch_path(&self.state_file())).unwrap();
    }

    /// Writes 4 KiB of `byte` at `offset` on a connection of its own; the answer is the NBD error.
    fn write(&self, offset: u64, byte: u8) -> JoinHandle<Option<u32>> {
        let addr = self.primary.nbd_addr().unwrap();
        tokio::spawn(async move {
            let mut c = RawClient::connect(addr, VOLUME).await;
            c.write(offset, &[byte; 4096]).await
        })
    }
}

fn directive(epoch: u64) -> pb::DirectiveRequest {
    pb::DirectiveRequest {
        volume_handles: vec![VOLUME.into()],
        group_uid: GROUP.into(),
        epoch,
        fail_safe: false,
    }
}

async fn state(c: &mut ReplicatorClient<Channel>) -> pb::VolumeState {
    c.state(pb::StateRequest {
        volume_handle: VOLUME.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

async fn wait_held(c: &mut ReplicatorClient<Channel>, held: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while state(c).await.held_writes < held {
        assert!(
            std::time::Instant::now() < deadline,
            "{held} writes never held"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Started, confirmed in the group at epoch 1, one write replicated.
async fn replicating() -> (Node, ReplicatorClient<Channel>) {
    let node = Node::start().await;
    let mut ctl = client(&node.dir.path().join("control.sock")).await;
    ctl.configure(pb::ConfigureRequest {
        volume_handle: VOLUME.into(),
        group_uid: GROUP.into(),
        epoch: 1,
        stage: pb::Stage::Unspecified.into(),
        hold_timeout_ms: 120_000,
    })
    .await
    .unwrap();
    assert_eq!(node.write(0, 0x11).await.unwrap(), Some(0));
    (node, ctl)
}

fn covers(p: &Persisted, offset: u64) -> bool {
    p.dirty
        .iter()
        .any(|&(start, length)| start <= offset && offset < start + length)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_whose_state_write_fails_keeps_holding_until_a_retry_persists_it() {
    let (node, mut ctl) = replicating().await;
    ctl.suspend(directive(2)).await.unwrap();
    // A write while suspended: its chunk is in the map on disk before it lands, then it is held.
    let held = node.write(3 * CHUNK, 0x22);
    wait_held(&mut ctl, 1).await;
    assert!(covers(&node.on_disk(), 3 * CHUNK));
    node.fail_state_writes();

    let err = ctl.release(directive(2)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
    // The sidecar retries a failed call: the retry must write the state again, not find it done.
    let retry = ctl.release(directive(2)).await;
    assert!(
        retry.is_err(),
        "a retried release was answered although its state was never written: {retry:?}"
    );
    let s = state(&mut ctl).await;
    assert_eq!(
        (s.mode, s.epoch, s.stage, s.held_writes),
        (
            i32::from(pb::Mode::Suspended),
            2,
            i32::from(pb::Stage::Freeze),
            1
        ),
        "still held at the old stage"
    );
    // A write to a chunk the map on disk does not cover cannot be recorded: it fails before it lands
    // (a crash could otherwise leave it on the primary with nothing saying the secondary lacks it).
    assert_eq!(node.write(4 * CHUNK, 0x44).await.unwrap(), Some(EIO));
    let primary = node.dir.path().join("primary").join(VOLUME);
    assert_eq!(read_file_at(&primary, 4 * CHUNK, 4096), vec![0; 4096]);
    let disk = node.on_disk();
    assert_eq!((disk.mode.as_str(), disk.epoch), ("suspended", 2));
    assert!(!held.is_finished(), "a held write was acknowledged");

    // The disk has room again: the retry persists the release, then the held write completes.
    node.heal_state_writes();
    let r = ctl.release(directive(2)).await.unwrap().into_inner();
    assert_eq!(r.volumes[0].mode, i32::from(pb::Mode::Running));
    assert_eq!(r.volumes[0].stage, i32::from(pb::Stage::Release));
    assert_eq!(held.await.unwrap(), Some(0));
    let disk = node.on_disk();
    assert_eq!(
        (disk.mode.as_str(), disk.epoch, disk.stage),
        ("running", 2, Some(Stage::Release))
    );
    assert!(
        covers(&disk, 3 * CHUNK),
        "the map on disk covers the released write: {disk:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_suspend_whose_state_write_fails_is_not_acknowledged_until_a_retry_persists_it() {
    let (node, mut ctl) = replicating().await;
    node.fail_state_writes();
    let err = ctl.suspend(directive(2)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
    // Freezing is always safe: the volume holds although its suspension is not on disk yet, and a
    // write it cannot record fails rather than land.
    assert_eq!(node.write(5 * CHUNK, 0x33).await.unwrap(), Some(EIO));
    let retry = ctl.suspend(directive(2)).await;
    assert!(
        retry.is_err(),
        "a retried suspend was acknowledged although its state was never written: {retry:?}"
    );
    let disk = node.on_disk();
    assert_eq!((disk.mode.as_str(), disk.epoch), ("replicating", 1));

    node.heal_state_writes();
    let r = ctl.suspend(directive(2)).await.unwrap().into_inner();
    assert_eq!(r.volumes[0].mode, i32::from(pb::Mode::Suspended));
    let disk = node.on_disk();
    assert_eq!(
        (disk.mode.as_str(), disk.epoch, disk.stage),
        ("suspended", 2, Some(Stage::Freeze))
    );
    let held = node.write(5 * CHUNK, 0x33);
    wait_held(&mut ctl, 1).await;
    assert!(covers(&node.on_disk(), 5 * CHUNK));
    assert!(!held.is_finished(), "held until the release");
    ctl.release(directive(2)).await.unwrap();
    assert_eq!(held.await.unwrap(), Some(0));
}
