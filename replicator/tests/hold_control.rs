//! Part 2 through real NBD and real gRPC: a copy failure holds writes; the test, acting as the control
//! system, suspends every volume, releases at the epoch, and resumes; hold timeouts fail held writes
//! with EIO; directives at wrong, stale or duplicated epochs change nothing; a killed and restarted
//! replicator keeps its suspension and dirty map and holds I/O until confirmed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use lockstep_replicator::testing::control_client as client;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use lockstep_api::proto::replicator::v1 as pb;
use lockstep_replicator::linkcut::LinkMode;
use lockstep_replicator::secondary::{Secondary, SecondaryConfig};
use lockstep_replicator::testing::{NodeSpec, ReplicatorNode};
use pb::replicator_client::ReplicatorClient;
use tonic::transport::Channel;

const GROUP: &str = "group-uid-1";

fn directive(volumes: &[&str], epoch: u64) -> pb::DirectiveRequest {
    pb::DirectiveRequest {
        volume_handles: volumes.iter().map(|v| (*v).to_owned()).collect(),
        group_uid: GROUP.into(),
        epoch,
        fail_safe: false,
    }
}

fn configure(volume: &str, epoch: u64, stage: pb::Stage, hold_ms: u64) -> pb::ConfigureRequest {
    pb::ConfigureRequest {
        volume_handle: volume.into(),
        group_uid: GROUP.into(),
        epoch,
        stage: stage.into(),
        hold_timeout_ms: hold_ms,
    }
}

async fn state(c: &mut ReplicatorClient<Channel>, volume: &str) -> pb::VolumeState {
    c.state(pb::StateRequest {
        volume_handle: volume.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

async fn wait_mode(c: &mut ReplicatorClient<Channel>, volume: &str, mode: pb::Mode) {
    let c2 = c.clone();
    eventually("the volume's mode", || {
        let mut c = c2.clone();
        async move { (state(&mut c, volume).await.mode == i32::from(mode)).then_some(()) }
    })
    .await;
}

const VOLUMES: [&str; 3] = ["vol1", "vol2", "vol3"];

/// Three volumes, each with its own cuttable link, a control socket, volumes unconfirmed at start.
async fn start_cluster() -> ReplicatorNode {
    NodeSpec::new(&VOLUMES, 4 * MIB).start().await.unwrap()
}

fn control(node: &ReplicatorNode) -> PathBuf {
    node.control_socket().unwrap()
}

/// Block `i` of the dependent chain: 4 KiB naming its sequence.
fn chain_block(i: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for chunk in b.chunks_mut(8) {
        chunk.copy_from_slice(&(i + 1).to_le_bytes());
    }
    b
}

fn chain_place(i: u64) -> (usize, u64) {
    ((i % 3) as usize, (i / 3) * 4096)
}

/// The longest prefix of the chain the secondaries hold, and whether anything beyond it is there.
fn check_secondaries(c: &ReplicatorNode, upto: u64) -> (u64, Vec<u64>) {
    let mut prefix = 0;
    let mut beyond = Vec::new();
    let mut gap = false;
    for i in 0..upto {
        let (v, off) = chain_place(i);
        let present = read_file_at(&c.secondary_file(VOLUMES[v]), off, 4096) == chain_block(i);
        if present && !gap {
            prefix = i + 1;
        } else if present {
            beyond.push(i);
        } else {
            gap = true;
        }
    }
    (prefix, beyond)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_hold_suspend_release_resume_keeps_the_secondaries_consistent() {
    let c = start_cluster().await;
    let mut ctl = client(&control(&c)).await;
    let mut events = ctl
        .watch_events(pb::WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();

    // Fail closed: I/O waits until the sidecar confirms.
    for v in VOLUMES {
        assert_eq!(
            state(&mut ctl, v).await.mode,
            i32::from(pb::Mode::Unconfirmed)
        );
    }
    let mut early = RawClient::connect(c.primary.nbd_addr().unwrap(), "vol1").await;
    let pending =
        tokio::time::timeout(Duration::from_millis(300), early.write(0, &[9u8; 512])).await;
    assert!(pending.is_err(), "a write completed before confirmation");
    for v in VOLUMES {
        let s = ctl
            .configure(configure(v, 1, pb::Stage::Unspecified, 60_000))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.mode, i32::from(pb::Mode::Replicating));
    }
    drop(early);

    // The dependent chain: each write issued only after the previous one was acknowledged.
    let acked = Arc::new(AtomicU64::new(0));
    let addr = c.primary.nbd_addr().unwrap();
    let workload = {
        let acked = Arc::clone(&acked);
        tokio::spawn(async move {
            let mut clients = Vec::new();
            for v in VOLUMES {
                clients.push(RawClient::connect(addr, v).await);
            }
            for i in 0..u64::MAX {
                let (v, off) = chain_place(i);
                match clients[v].write(off, &chain_block(i)).await {
                    Some(0) => acked.store(i + 1, Ordering::SeqCst),
                    other => return (i, other),
                }
                if i + 1 == 900 {
                    return (i + 1, None);
                }
            }
            unreachable!()
        })
    };
    eventually("60 acknowledged writes", || async {
        (acked.load(Ordering::SeqCst) >= 60).then_some(())
    })
    .await;

    // Cut vol2's link: its next write is held, so the chain stops there.
    c.links[1].set_mode(LinkMode::Reset);
    let failed = loop {
        match events.next().await.unwrap().unwrap().kind.unwrap() {
            pb::replication_event::Kind::CopyFailed(f) => break f,
            _ => continue,
        }
    };
    assert_eq!(failed.volume_handle, "vol2");
    assert_eq!(failed.group_uid, GROUP);
    assert_eq!(failed.epoch_known, 1);
    let ctl2 = ctl.clone();
    eventually("vol2's write held", || {
        let mut c = ctl2.clone();
        async move { (state(&mut c, "vol2").await.held_writes >= 1).then_some(()) }
    })
    .await;
    let acked_at_hold = acked.load(Ordering::SeqCst);
    assert!(!workload.is_finished(), "the chain waits on the held write");

    // Release before any suspend is refused; suspend the three one by one.
    let err = ctl.release(directive(&["vol2"], 2)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    for v in VOLUMES {
        let r = ctl.suspend(directive(&[v], 2)).await.unwrap().into_inner();
        assert_eq!(r.volumes[0].mode, i32::from(pb::Mode::Suspended));
        assert_eq!(r.volumes[0].epoch, 2);
    }
    // Duplicates and stale directives change nothing; release at a wrong epoch is refused.
    let dup = ctl
        .suspend(directive(&VOLUMES, 2))
        .await
        .unwrap()
        .into_inner();
    assert!(
        dup.volumes
            .iter()
            .all(|s| s.mode == i32::from(pb::Mode::Suspended) && s.epoch == 2)
    );
    let stale = ctl
        .suspend(directive(&["vol1"], 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stale.volumes[0].epoch, 2);
    for wrong in [1, 3] {
        let err = ctl.release(directive(&VOLUMES, wrong)).await.unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::FailedPrecondition,
            "release at {wrong}"
        );
    }
    let other_group = pb::DirectiveRequest {
        group_uid: "another-group".into(),
        ..directive(&["vol1"], 2)
    };
    assert!(ctl.release(other_group).await.is_err());
    assert_eq!(
        acked.load(Ordering::SeqCst),
        acked_at_hold,
        "nothing acknowledged while held"
    );

    // The frozen image: a gap-free prefix reaching at least every acknowledged write, nothing beyond.
    let (prefix, beyond) = check_secondaries(&c, acked_at_hold + 3);
    assert!(
        prefix >= acked_at_hold,
        "prefix {prefix} < acknowledged {acked_at_hold}"
    );
    assert!(
        beyond.is_empty(),
        "writes beyond a gap on the secondaries: {beyond:?}"
    );

    // Release at exactly 2: the held write completes, the chain continues on the primaries.
    let r = ctl
        .release(directive(&VOLUMES, 2))
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.volumes
            .iter()
            .all(|s| s.mode == i32::from(pb::Mode::Running))
    );
    assert!(
        ctl.release(directive(&VOLUMES, 2)).await.is_ok(),
        "a duplicate release is harmless"
    );
    eventually("writes after the release", || async {
        (acked.load(Ordering::SeqCst) >= acked_at_hold + 30).then_some(())
    })
    .await;
    // The secondaries keep the frozen image.
    let frozen = check_secondaries(&c, acked_at_hold + 30);
    assert_eq!(frozen.0, prefix);
    assert!(frozen.1.is_empty());
    let s = state(&mut ctl, "vol1").await;
    assert!(s.dirty_bytes > 0);

    // The link returns; resume at 2 resynchronises while the chain keeps writing.
    c.links[1].set_mode(LinkMode::Pass);
    let r = ctl
        .resume(directive(&VOLUMES, 2))
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.volumes
            .iter()
            .all(|s| s.stage == i32::from(pb::Stage::Resume))
    );
    for v in VOLUMES {
        wait_mode(&mut ctl, v, pb::Mode::Replicating).await;
    }
    let (end, error) = workload.await.unwrap();
    assert_eq!((end, error), (900, None));
    for v in VOLUMES {
        let s = state(&mut ctl, v).await;
        assert_eq!(s.dirty_bytes, 0, "{v}");
        let cmp = qemu_img_compare(
            c.primary_file(v).to_str().unwrap(),
            c.secondary_file(v).to_str().unwrap(),
        )
        .await;
        assert!(cmp.success, "{v}: {cmp:?}");
    }
    let (prefix, beyond) = check_secondaries(&c, 900);
    assert_eq!((prefix, beyond.len()), (900, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hold_timeout_fails_held_writes_and_keeps_holding() {
    let c = start_cluster().await;
    let mut ctl = client(&control(&c)).await;
    for v in VOLUMES {
        ctl.configure(configure(v, 1, pb::Stage::Unspecified, 400))
            .await
            .unwrap();
    }
    let url = format!("nbd://{}/vol1", c.primary.nbd_addr().unwrap());
    let out = qemu_io(&url, &["write -P 0x31 0 64k"]).await;
    assert!(out.clean(), "{out:?}");
    let mut events = ctl
        .watch_events(pb::WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    c.links[0].set_mode(LinkMode::Blackhole);
    let out = qemu_io(&url, &["write -P 0x32 64k 64k"]).await;
    assert!(
        !out.success && out.stdout.contains("Input/output error"),
        "{out:?}"
    );
    let mut saw_failed = false;
    let timed_out = loop {
        match events.next().await.unwrap().unwrap().kind.unwrap() {
            pb::replication_event::Kind::CopyFailed(_) => saw_failed = true,
            pb::replication_event::Kind::HoldTimedOut(t) => break t,
            pb::replication_event::Kind::StateChanged(_) => {}
        }
    };
    assert!(saw_failed);
    assert_eq!(timed_out.volume_handle, "vol1");
    assert!(timed_out.failed_writes >= 1);
    // Still holding: the next write waits, then fails too; nothing held is acknowledged.
    let s = state(&mut ctl, "vol1").await;
    assert_eq!(s.mode, i32::from(pb::Mode::Held));
    let out = qemu_io(&url, &["write -P 0x33 128k 4k"]).await;
    assert!(!out.success, "{out:?}");
    let s = state(&mut ctl, "vol1").await;
    assert_eq!(s.mode, i32::from(pb::Mode::Held));
    assert_eq!(s.held_writes, 0);
    assert!(s.dirty_bytes >= 64 * 1024);
    // The other volumes are unaffected.
    let out = qemu_io(
        &format!("nbd://{}/vol3", c.primary.nbd_addr().unwrap()),
        &["write 0 4k"],
    )
    .await;
    assert!(out.clean(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_replicator_restarts_suspended_and_unconfirmed() {
    let dir = tempfile::tempdir().unwrap();
    let secondary = Secondary::start(SecondaryConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        dir: dir.path().join("secondary"),
        security: lockstep_replicator::LinkSecurity::Plaintext,
    })
    .await
    .unwrap();
    let data = dir.path().join("vol1");
    let control = dir.path().join("control.sock");
    let nbd = dir.path().join("nbd.sock");
    let start = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_lockstep-replicator"))
            .arg("primary")
            .arg("--volume")
            .arg(format!(
                "vol1={},size=4M,secondary={}",
                data.display(),
                secondary.local_addr()
            ))
            .arg("--nbd-socket")
            .arg(&nbd)
            .arg("--control-socket")
            .arg(&control)
            .arg("--insecure-plaintext")
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let url = format!("nbd+unix:///vol1?socket={}", nbd.display());

    let mut child = start();
    let mut ctl = client(&control).await;
    ctl.configure(configure("vol1", 4, pb::Stage::Unspecified, 60_000))
        .await
        .unwrap();
    let out = qemu_io(&url, &["write -P 0x41 0 64k"]).await;
    assert!(out.clean(), "{out:?}");
    ctl.suspend(directive(&["vol1"], 5)).await.unwrap();
    // A write while suspended is held; kill the replicator under it.
    let held = tokio::spawn({
        let url = url.clone();
        async move { qemu_io(&url, &["write -P 0x42 1M 64k"]).await }
    });
    let c2 = ctl.clone();
    eventually("vol1's write held", || {
        let mut c = c2.clone();
        async move { (state(&mut c, "vol1").await.held_writes == 1).then_some(()) }
    })
    .await;
    child.kill().await.unwrap();
    let out = held.await.unwrap();
    assert!(
        !out.success,
        "the held write was never acknowledged: {out:?}"
    );

    // Restarted: unconfirmed, still at (5, Freeze), the dirty map kept.
    let _child = start();
    let mut ctl = client(&control).await;
    let s = state(&mut ctl, "vol1").await;
    assert_eq!(s.mode, i32::from(pb::Mode::Unconfirmed));
    assert_eq!((s.epoch, s.stage), (5, i32::from(pb::Stage::Freeze)));
    assert!(s.dirty_bytes >= 64 * 1024, "{s:?}");
    // I/O waits; an older confirmation is ignored and does not confirm.
    let waiting = tokio::spawn({
        let url = url.clone();
        async move { qemu_io(&url, &["write -P 0x43 2M 4k"]).await }
    });
    let s = ctl
        .configure(configure("vol1", 4, pb::Stage::Resume, 60_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.mode, i32::from(pb::Mode::Unconfirmed));
    assert_eq!(s.epoch, 5);
    // Confirmed at its own point: suspended, still holding.
    let s = ctl
        .configure(configure("vol1", 5, pb::Stage::Freeze, 60_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.mode, i32::from(pb::Mode::Suspended));
    let c2 = ctl.clone();
    eventually("vol1's write held again", || {
        let mut c = c2.clone();
        async move { (state(&mut c, "vol1").await.held_writes == 1).then_some(()) }
    })
    .await;
    assert!(!waiting.is_finished());
    // Release at exactly 5: the held write completes.
    ctl.release(directive(&["vol1"], 5)).await.unwrap();
    let out = waiting.await.unwrap();
    assert!(out.clean(), "{out:?}");
    // Resume at 6 (a new epoch, e.g. after the group thawed): resync, identical copies.
    ctl.resume(directive(&["vol1"], 6)).await.unwrap();
    wait_mode(&mut ctl, "vol1", pb::Mode::Replicating).await;
    let cmp = qemu_img_compare(
        data.to_str().unwrap(),
        dir.path().join("secondary").join("vol1").to_str().unwrap(),
    )
    .await;
    assert!(cmp.success, "{cmp:?}");
}

/// A lane of dependent writes alternating between vol1 and vol3 (never vol2, whose link is cut), while
/// the control system suspends vol1, then — after the lane had every chance to move on — vol2 and vol3.
/// Returns the lane's prefix on the secondaries and the writes found beyond a gap.
async fn lane_scenario(broken: bool) -> (u64, Vec<u64>) {
    let c = start_cluster().await;
    let mut ctl = client(&control(&c)).await;
    for v in VOLUMES {
        ctl.configure(configure(v, 1, pb::Stage::Unspecified, 60_000))
            .await
            .unwrap();
    }
    if broken {
        c.primary
            .volume("vol1")
            .unwrap()
            .break_ack_while_suspended();
    }
    let lane =
        |i: u64| -> (usize, u64) { (if i.is_multiple_of(2) { 0 } else { 2 }, (i / 2) * 4096) };
    let acked = Arc::new(AtomicU64::new(0));
    let addr = c.primary.nbd_addr().unwrap();
    let workload = {
        let acked = Arc::clone(&acked);
        tokio::spawn(async move {
            let mut vol1 = RawClient::connect(addr, "vol1").await;
            let mut vol3 = RawClient::connect(addr, "vol3").await;
            for i in 0..400u64 {
                let (v, off) = lane(i);
                let client = if v == 0 { &mut vol1 } else { &mut vol3 };
                if client.write(off, &chain_block(i)).await != Some(0) {
                    return;
                }
                acked.store(i + 1, Ordering::SeqCst);
            }
        })
    };
    eventually("lane progress", || async {
        (acked.load(Ordering::SeqCst) >= 20).then_some(())
    })
    .await;
    // vol2's copy fails (its write is held), and the control system starts freezing: vol1 first.
    c.links[1].set_mode(LinkMode::Reset);
    let held = tokio::spawn(async move {
        let mut vol2 = RawClient::connect(addr, "vol2").await;
        vol2.write(0, &[7u8; 4096]).await
    });
    let ctl2 = ctl.clone();
    eventually("vol2's write held", || {
        let mut c = ctl2.clone();
        async move { (state(&mut c, "vol2").await.held_writes >= 1).then_some(()) }
    })
    .await;
    ctl.suspend(directive(&["vol1"], 2)).await.unwrap();
    let at_suspend = acked.load(Ordering::SeqCst);
    // Correct semantics: the lane's next vol1 write is held, so the lane stops. Broken: it runs on.
    let ctl2 = ctl.clone();
    let progressed = Arc::clone(&acked);
    eventually("the lane stopped (or run on when broken)", || {
        let mut c = ctl2.clone();
        let progressed = Arc::clone(&progressed);
        async move {
            if broken {
                (progressed.load(Ordering::SeqCst) >= at_suspend + 20).then_some(())
            } else {
                (state(&mut c, "vol1").await.held_writes >= 1).then_some(())
            }
        }
    })
    .await;
    ctl.suspend(directive(&["vol2"], 2)).await.unwrap();
    ctl.suspend(directive(&["vol3"], 2)).await.unwrap();
    let upto = acked.load(Ordering::SeqCst) + 2;
    // The lane's consistency on the secondaries: a gap-free prefix, nothing beyond a gap.
    let mut prefix = 0;
    let mut beyond = Vec::new();
    let mut gap = false;
    for i in 0..upto {
        let (v, off) = lane(i);
        let present = read_file_at(&c.secondary_file(VOLUMES[v]), off, 4096) == chain_block(i);
        if present && !gap {
            prefix = i + 1;
        } else if present {
            beyond.push(i);
        } else {
            gap = true;
        }
    }
    workload.abort();
    held.abort();
    (prefix, beyond)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn suspended_volumes_hold_so_a_lane_cannot_run_ahead() {
    let (prefix, beyond) = lane_scenario(false).await;
    assert!(prefix >= 20);
    assert!(
        beyond.is_empty(),
        "gap on the secondaries: {beyond:?} after prefix {prefix}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledging_while_suspended_is_caught() {
    // The deliberately broken mode: vol1 acknowledges writes while suspended, so the lane's writes to
    // vol3 (not yet suspended) reach vol3's secondary although the vol1 writes before them never reach
    // vol1's: the check finds writes beyond a gap.
    let (prefix, beyond) = lane_scenario(true).await;
    assert!(
        !beyond.is_empty(),
        "the broken mode went unnoticed (prefix {prefix})"
    );
}
