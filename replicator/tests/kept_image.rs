//! The kept image (issue 32): a secondary asked to keep its image saves every block before a write
//! overwrites it, and rolls back to it byte for byte — also after being killed (SIGKILL) in the middle
//! of a resync and restarted; an older kept image stays when a newer one is asked for; a drop removes
//! it. Real TCP, real files, the real binary for the kill.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use lockstep_replicator::secondary::{Secondary, SecondaryConfig};
use lockstep_replicator::undo::{RolledBack, log_path};
use lockstep_replicator::wire::{Frame, FrameCodec};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

const SIZE: u64 = 4 * 1024 * 1024;
const VOLUME: &str = "vol1";

type Link = Framed<TcpStream, FrameCodec>;

async fn hello(
    addr: std::net::SocketAddr,
    first_seq: u64,
    keep: Option<u64>,
) -> (Link, Option<u64>) {
    let mut link = Framed::new(TcpStream::connect(addr).await.unwrap(), FrameCodec);
    link.send(Frame::Hello {
        volume: VOLUME.into(),
        size: SIZE,
        first_seq,
        keep,
        drop_image: None,
    })
    .await
    .unwrap();
    match next(&mut link).await {
        Frame::Welcome { next_seq, kept } => {
            assert_eq!(next_seq, first_seq);
            (link, kept)
        }
        other => panic!("expected welcome, got {other:?}"),
    }
}

async fn next(link: &mut Link) -> Frame {
    tokio::time::timeout(Duration::from_secs(20), link.next())
        .await
        .expect("an answer within 20 s")
        .expect("the connection open")
        .expect("a well-formed frame")
}

/// Waits for the acknowledgement of `seq`.
async fn acked(link: &mut Link, seq: u64) {
    loop {
        match next(link).await {
            Frame::Ack { seq: got } if got >= seq => return,
            Frame::Ack { .. } => {}
            other => panic!("expected an ack, got {other:?}"),
        }
    }
}

/// Deterministic, distinct bytes per write.
fn bytes(seed: u64, len: usize) -> Bytes {
    (0..len)
        .map(|i| {
            (i as u64)
                .wrapping_mul(2654435761)
                .wrapping_add(seed * 7919) as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// The writes of a resync and of the application during it: unaligned, overlapping, one trim.
fn resync_frames(first_seq: u64, count: u64) -> Vec<Frame> {
    (0..count)
        .map(|i| {
            let seq = first_seq + i;
            let offset = (i * 37 * 4096 + i * 511) % (SIZE - 200_000);
            if i % 17 == 5 {
                Frame::Trim {
                    seq,
                    offset,
                    length: 70_000,
                }
            } else {
                Frame::Write {
                    seq,
                    offset,
                    data: bytes(seq, 1000 + (i as usize * 3001) % 150_000),
                }
            }
        })
        .collect()
}

/// Fills the secondary with the frozen image (no image kept yet); returns its bytes and the next seq.
async fn frozen_image(addr: std::net::SocketAddr, dir: &Path) -> (Vec<u8>, u64) {
    let (mut link, kept) = hello(addr, 1, None).await;
    assert_eq!(kept, None);
    for i in 0..40u64 {
        let offset = i * 100_003 % (SIZE - 70_000);
        link.send(Frame::Write {
            seq: 1 + i,
            offset,
            data: bytes(1000 + i, 65_000),
        })
        .await
        .unwrap();
    }
    acked(&mut link, 40).await;
    drop(link);
    (std::fs::read(dir.join(VOLUME)).unwrap(), 41)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_over_a_kept_image_rolls_back_to_it_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let secondary = Secondary::start(SecondaryConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        dir: dir.path().to_path_buf(),
        security: lockstep_replicator::LinkSecurity::Plaintext,
    })
    .await
    .unwrap();
    let (image, seq) = frozen_image(secondary.local_addr(), dir.path()).await;

    let (mut link, kept) = hello(secondary.local_addr(), seq, Some(4)).await;
    assert_eq!(kept, Some(4), "the welcome says which image is kept");
    let frames = resync_frames(seq, 200);
    for frame in &frames {
        link.send(frame.clone()).await.unwrap();
    }
    acked(&mut link, seq + 199).await;
    let resynced = std::fs::read(dir.path().join(VOLUME)).unwrap();
    assert_ne!(resynced, image, "the resync changed the secondary");
    let log_len = std::fs::metadata(log_path(dir.path(), VOLUME))
        .unwrap()
        .len();
    assert!(
        log_len <= lockstep_replicator::undo::max_log_len(SIZE),
        "the log ({log_len} bytes) stays within the volume's bound"
    );
    assert_eq!(secondary.kept_image(VOLUME).unwrap(), Some(4));

    // Roll back (the connection is taken over first): the frozen image, byte for byte.
    let done = secondary.roll_back(VOLUME).await.unwrap().unwrap();
    assert_eq!(done.epoch, 4);
    assert!(done.blocks > 0);
    assert_eq!(std::fs::read(dir.path().join(VOLUME)).unwrap(), image);
    assert!(!log_path(dir.path(), VOLUME).exists());
    assert_eq!(secondary.kept_image(VOLUME).unwrap(), None);
    assert_eq!(secondary.roll_back(VOLUME).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_kept_image_stays_and_a_drop_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let secondary = Secondary::start(SecondaryConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        dir: dir.path().to_path_buf(),
        security: lockstep_replicator::LinkSecurity::Plaintext,
    })
    .await
    .unwrap();
    let (image, seq) = frozen_image(secondary.local_addr(), dir.path()).await;
    let (mut link, kept) = hello(secondary.local_addr(), seq, Some(4)).await;
    assert_eq!(kept, Some(4));
    for frame in resync_frames(seq, 50) {
        link.send(frame).await.unwrap();
    }
    acked(&mut link, seq + 49).await;
    drop(link);

    // A freeze during the resync, then a resync at epoch 5: the image of epoch 4 stays.
    let seq = seq + 50;
    let (mut link, kept) = hello(secondary.local_addr(), seq, Some(5)).await;
    assert_eq!(kept, Some(4), "the older, complete image is kept");
    for frame in resync_frames(seq, 50) {
        link.send(frame).await.unwrap();
    }
    // A drop of an older epoch than the kept one leaves it.
    link.send(Frame::DropImage { epoch: 3 }).await.unwrap();
    let seq = seq + 50;
    link.send(Frame::Write {
        seq,
        offset: 0,
        data: bytes(9, 4096),
    })
    .await
    .unwrap();
    acked(&mut link, seq).await;
    assert_eq!(secondary.kept_image(VOLUME).unwrap(), Some(4));
    let done = secondary.roll_back(VOLUME).await.unwrap().unwrap();
    assert_eq!(done.epoch, 4);
    assert_eq!(std::fs::read(dir.path().join(VOLUME)).unwrap(), image);

    // Kept again, then dropped once every volume is in sync: the log is gone.
    let (mut link, kept) = hello(secondary.local_addr(), seq + 1, Some(6)).await;
    assert_eq!(kept, Some(6));
    for frame in resync_frames(seq + 1, 20) {
        link.send(frame).await.unwrap();
    }
    link.send(Frame::DropImage { epoch: 6 }).await.unwrap();
    link.send(Frame::Write {
        seq: seq + 21,
        offset: 0,
        data: bytes(10, 4096),
    })
    .await
    .unwrap();
    acked(&mut link, seq + 21).await;
    assert!(!log_path(dir.path(), VOLUME).exists());
    assert_eq!(secondary.kept_image(VOLUME).unwrap(), None);
    drop(link);
    let (_link, kept) = hello(secondary.local_addr(), seq + 22, None).await;
    assert_eq!(kept, None);
}

/// The replicator binary serving as a secondary on `port`.
fn spawn_secondary(dir: &Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lockstep-replicator"))
        .args([
            "secondary",
            "--insecure-plaintext",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--dir",
        ])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn connect_retrying(
    addr: std::net::SocketAddr,
    seq: u64,
    keep: Option<u64>,
) -> (Link, Option<u64>) {
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            return hello(addr, seq, keep).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the secondary at {addr} never listened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_killed_mid_resync_restarts_still_able_to_roll_back() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = spawn_secondary(dir.path(), port);
    let (mut link, _) = connect_retrying(addr, 1, None).await;
    drop(link);
    let (image, seq) = frozen_image(addr, dir.path()).await;

    // The resync starts; the secondary is killed while writes are in flight.
    let (mut resync, kept) = hello(addr, seq, Some(7)).await;
    assert_eq!(kept, Some(7));
    for frame in resync_frames(seq, 400) {
        resync.send(frame).await.unwrap();
    }
    acked(&mut resync, seq + 20).await;
    child.kill().unwrap();
    child.wait().unwrap();
    drop(resync);

    // Restarted: it still keeps the image of epoch 7 (the primary does not ask again), and the resync
    // goes on over it.
    let mut child = spawn_secondary(dir.path(), port);
    let seq = seq + 400;
    (link, _) = connect_retrying(addr, seq, None).await;
    drop(link);
    let (mut link, kept) = hello(addr, seq, None).await;
    assert_eq!(
        kept,
        Some(7),
        "the restarted secondary still keeps the image"
    );
    for frame in resync_frames(seq, 100) {
        link.send(frame).await.unwrap();
    }
    acked(&mut link, seq + 99).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_ne!(std::fs::read(dir.path().join(VOLUME)).unwrap(), image);

    // The operator rolls the stopped secondary back with the binary: the frozen image.
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep-replicator"))
        .args(["rollback", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("vol1: rolled back to the image of epoch 7"),
        "{said}"
    );
    assert_eq!(std::fs::read(dir.path().join(VOLUME)).unwrap(), image);
    assert_eq!(
        lockstep_replicator::undo::roll_back(dir.path(), VOLUME).unwrap(),
        None::<RolledBack>
    );
}
