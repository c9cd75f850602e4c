//! The kept image through the `Replicator` service (issue 32 item 2): `KeepImage(e)` before
//! `Resume(e)` makes the secondary keep the frozen image through the resync (its undo log exists, the
//! volume's state names the epoch, and rolling the secondary back restores the frozen image byte for
//! byte); `DropImage(e)` removes it; `RollBack` on a primary answers UNIMPLEMENTED with a message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use lockstep_replicator::testing::control_client as client;

use std::time::Duration;

use common::*;
use lockstep_api::proto::replicator::v1 as pb;
use lockstep_replicator::secondary::{Secondary, SecondaryConfig};
use lockstep_replicator::undo::log_path;
use lockstep_replicator::{CopyConfig, Primary, PrimaryConfig, VolumeConfig};
use pb::replicator_client::ReplicatorClient;
use tonic::transport::Channel;

const GROUP: &str = "group-uid-1";
const VOLUME: &str = "vol1";

fn directive(epoch: u64) -> pb::DirectiveRequest {
    pb::DirectiveRequest {
        volume_handles: vec![VOLUME.into()],
        group_uid: GROUP.into(),
        epoch,
        fail_safe: false,
    }
}

fn image(epoch: u64) -> pb::ImageRequest {
    pb::ImageRequest {
        volume_handles: vec![VOLUME.into()],
        group_uid: GROUP.into(),
        epoch,
    }
}

/// Confirms the volume in `GROUP` at `(epoch, stage)`, as its sidecar does.
async fn configure(c: &mut ReplicatorClient<Channel>, epoch: u64, stage: pb::Stage) {
    c.configure(pb::ConfigureRequest {
        volume_handle: VOLUME.into(),
        group_uid: GROUP.into(),
        epoch,
        stage: stage.into(),
        hold_timeout_ms: 120_000,
    })
    .await
    .unwrap();
}

async fn state(c: &mut ReplicatorClient<Channel>) -> pb::VolumeState {
    c.state(pb::StateRequest {
        volume_handle: VOLUME.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    for _ in 0..3000 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

/// A primary and its secondary in this process, the volume configured in `GROUP`, written, frozen at
/// epoch 1 and released, and written more.
struct FrozenPair {
    dir: tempfile::TempDir,
    secondary_dir: std::path::PathBuf,
    secondary: Secondary,
    primary: Primary,
    ctl: ReplicatorClient<Channel>,
    nbd: RawClient,
    /// The secondary's volume as frozen at epoch 1.
    frozen: Vec<u8>,
}

/// The primary's replicator: the volume (confirmed by its control system), served over NBD, and the
/// control socket, all under `dir`.
fn primary_config(dir: &std::path::Path, secondary: &Secondary) -> PrimaryConfig {
    PrimaryConfig {
        volumes: vec![VolumeConfig {
            require_confirmation: true,
            ..VolumeConfig::new(
                VOLUME,
                dir.join("primary").join(VOLUME),
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
        control_socket: Some(dir.join("control.sock")),
    }
}

async fn frozen_pair(undo_log_limit: Option<u64>) -> FrozenPair {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("primary")).unwrap();
    let secondary_dir = dir.path().join("secondary");
    let secondary = Secondary::start(SecondaryConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        dir: secondary_dir.clone(),
        security: lockstep_replicator::LinkSecurity::Plaintext,
    })
    .await
    .unwrap();
    secondary.set_undo_log_limit(undo_log_limit);
    let primary = Primary::start(primary_config(dir.path(), &secondary))
        .await
        .unwrap();
    let mut ctl = client(&dir.path().join("control.sock")).await;
    configure(&mut ctl, 0, pb::Stage::Unspecified).await;
    let mut nbd = RawClient::connect(primary.nbd_addr().unwrap(), VOLUME).await;
    for i in 0..16u64 {
        assert_eq!(nbd.write(i * 200_000, &[i as u8 + 1; 8192]).await, Some(0));
    }

    // Frozen at epoch 1 and released: the secondary holds the image; the primary runs on.
    ctl.suspend(directive(1)).await.unwrap();
    ctl.release(directive(1)).await.unwrap();
    let frozen = std::fs::read(secondary_dir.join(VOLUME)).unwrap();
    for i in 0..16u64 {
        assert_eq!(nbd.write(i * 200_000 + 4096, &[0xee; 8192]).await, Some(0));
    }
    FrozenPair {
        dir,
        secondary_dir,
        secondary,
        primary,
        ctl,
        nbd,
        frozen,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keep_image_before_resume_keeps_the_frozen_image_and_drop_image_removes_it() {
    let FrozenPair {
        dir,
        secondary_dir,
        secondary,
        primary: _primary,
        mut ctl,
        mut nbd,
        frozen,
    } = frozen_pair(None).await;

    // Keep the image, then resume: the resync copies over it, the image stays in the undo log.
    let kept = ctl.keep_image(image(1)).await.unwrap().into_inner();
    assert_eq!(kept.volumes[0].epoch, Some(1));
    ctl.resume(directive(1)).await.unwrap();
    until("resynced", async || {
        state(&mut ctl).await.mode == pb::Mode::Replicating as i32
    })
    .await;
    assert_eq!(state(&mut ctl).await.kept_image_epoch, Some(1));
    assert!(log_path(&secondary_dir, VOLUME).exists());
    assert_eq!(secondary.kept_image(VOLUME).unwrap(), Some(1));
    let resynced = std::fs::read(secondary_dir.join(VOLUME)).unwrap();
    assert_ne!(resynced, frozen);
    assert_eq!(
        resynced,
        std::fs::read(dir.path().join("primary").join(VOLUME)).unwrap(),
        "the resync brought the secondary in sync"
    );

    // A primary's replicator does not roll secondaries back: it says so and where it is done.
    let refused = ctl.roll_back(image(1)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented);
    assert!(refused.message().contains("lockstep-replicator rollback"));

    // The group is in sync at the new point: the image goes.
    ctl.drop_image(image(1)).await.unwrap();
    until("the undo log removed", async || {
        !log_path(&secondary_dir, VOLUME).exists()
    })
    .await;
    assert_eq!(secondary.kept_image(VOLUME).unwrap(), None);
    assert_eq!(state(&mut ctl).await.kept_image_epoch, None);
    // Replication goes on.
    assert_eq!(nbd.write(0, &[0x77; 4096]).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kept_image_rolls_the_secondary_back_to_the_freeze() {
    let FrozenPair {
        dir: _dir,
        secondary_dir,
        secondary,
        primary,
        mut ctl,
        mut nbd,
        frozen,
    } = frozen_pair(None).await;
    ctl.keep_image(image(1)).await.unwrap();
    ctl.resume(directive(1)).await.unwrap();
    until("resynced", async || {
        state(&mut ctl).await.mode == pb::Mode::Replicating as i32
    })
    .await;
    // More writes after the resync, still over the kept image.
    for i in 0..16u64 {
        assert_eq!(nbd.write(i * 100_000, &[0x55; 4096]).await, Some(0));
    }
    // The primary site is lost: the secondary rolls back to the image of the freeze.
    drop(nbd);
    drop(ctl);
    drop(primary);
    let done = secondary.roll_back(VOLUME).await.unwrap().unwrap();
    assert_eq!(done.epoch, 1);
    assert_eq!(std::fs::read(secondary_dir.join(VOLUME)).unwrap(), frozen);
}

/// A replicator restarted while its group resumed comes back released at the freeze, and its sidecar
/// confirms it at the group's point, (1, Resume), with a `Configure` rather than `KeepImage` and
/// `Resume`: the resync that starts must keep the secondary's frozen image all the same (the simulator
/// found the other secondaries keeping theirs while this one was overwritten out of order).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replicator_confirmed_into_a_resume_after_a_restart_keeps_the_frozen_image() {
    let FrozenPair {
        dir,
        secondary_dir,
        secondary,
        primary,
        ctl,
        nbd,
        frozen,
    } = frozen_pair(None).await;
    drop(nbd);
    drop(ctl);
    drop(primary);
    let primary = Primary::start(primary_config(dir.path(), &secondary))
        .await
        .unwrap();
    let mut ctl = client(&dir.path().join("control.sock")).await;
    configure(&mut ctl, 1, pb::Stage::Resume).await;
    until("resynced", async || {
        state(&mut ctl).await.mode == pb::Mode::Replicating as i32
    })
    .await;
    assert_eq!(secondary.kept_image(VOLUME).unwrap(), Some(1));
    assert_eq!(
        std::fs::read(secondary_dir.join(VOLUME)).unwrap(),
        std::fs::read(dir.path().join("primary").join(VOLUME)).unwrap(),
        "the resync brought the secondary in sync"
    );
    // The primary site is lost: the secondary rolls back to the image of the freeze.
    drop(ctl);
    drop(primary);
    let done = secondary.roll_back(VOLUME).await.unwrap().unwrap();
    assert_eq!(done.epoch, 1);
    assert_eq!(std::fs::read(secondary_dir.join(VOLUME)).unwrap(), frozen);
}

/// Running out of undo-log space (here the secondary's limit on one log, refused exactly as ENOSPC) is
/// reported, never a silent resync without the image: the resync is refused before any write lands,
/// the primary's `CopyFailed` names the reason, and the secondary still holds the frozen image. With
/// room again, the next freeze's resync keeps the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secondary_out_of_undo_log_space_refuses_the_resync_and_says_why() {
    let FrozenPair {
        dir: _dir,
        secondary_dir,
        secondary,
        primary: _primary,
        mut ctl,
        nbd: _nbd,
        frozen,
    } = frozen_pair(Some(64 * 1024)).await;
    let mut events = ctl
        .watch_events(pb::WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    ctl.keep_image(image(1)).await.unwrap();
    ctl.resume(directive(1)).await.unwrap();
    let failed = next_copy_failed(&mut events).await;
    assert_eq!(failed.volume_handle, VOLUME);
    assert!(
        failed
            .error
            .contains(lockstep_replicator::undo::OUT_OF_SPACE),
        "{}",
        failed.error
    );
    assert!(failed.error.contains("needs up to"), "{}", failed.error);
    until("held", async || {
        state(&mut ctl).await.mode == pb::Mode::Held as i32
    })
    .await;
    assert!(!log_path(&secondary_dir, VOLUME).exists());
    assert_eq!(
        std::fs::read(secondary_dir.join(VOLUME)).unwrap(),
        frozen,
        "no resync write landed without the image kept"
    );

    // Room again: frozen at epoch 2 (the secondary still holds the same image), the resync keeps it.
    secondary.set_undo_log_limit(None);
    ctl.suspend(directive(2)).await.unwrap();
    ctl.release(directive(2)).await.unwrap();
    ctl.keep_image(image(2)).await.unwrap();
    ctl.resume(directive(2)).await.unwrap();
    until("resynced", async || {
        state(&mut ctl).await.mode == pb::Mode::Replicating as i32
    })
    .await;
    assert_eq!(secondary.kept_image(VOLUME).unwrap(), Some(2));
    let done = secondary.roll_back(VOLUME).await.unwrap().unwrap();
    assert_eq!(done.epoch, 2);
    assert_eq!(std::fs::read(secondary_dir.join(VOLUME)).unwrap(), frozen);
}
