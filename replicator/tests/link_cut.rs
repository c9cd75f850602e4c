//! Cutting the replication link (reset, blackhole) or a secondary refusing makes the next write fail with
//! an I/O error and emits `CopyFailed`; every write a client saw acknowledged is on the secondary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use common::*;
use lockstep_replicator::linkcut::LinkMode;
use lockstep_replicator::nbd::proto;
use lockstep_replicator::{CopyFailed, Event, ReplMode};
use tokio::sync::broadcast;

async fn next_copy_failed(events: &mut broadcast::Receiver<Event>) -> CopyFailed {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
            Ok(Ok(Event::CopyFailed(ev))) => return ev,
            Ok(Ok(_)) => {}
            other => panic!("expected CopyFailed, got {other:?}"),
        }
    }
}

async fn cut_then_write(mode: LinkMode, timeout: Duration) -> (Pair, CopyFailed) {
    let pair = start_pair(&[("vol1", 4 * MIB)], true, timeout).await;
    let mut events = pair.primary.subscribe();
    let url = pair.tcp_url("vol1");
    let out = qemu_io(&url, &["write -P 0xa1 0 64k", "write -f -P 0xa2 64k 64k"]).await;
    assert!(out.clean(), "{out:?}");
    pair.link.as_ref().unwrap().set_mode(mode);
    let before = SystemTime::now();
    let out = qemu_io(&url, &["write -P 0xa3 128k 64k"]).await;
    assert!(
        !out.success && out.stdout.contains("Input/output error"),
        "write after cut: {out:?}"
    );
    let ev = next_copy_failed(&mut events).await;
    assert_eq!(ev.volume, "vol1");
    // Two writes (sequences 0 and 1) were copied; the first not copied is 2.
    assert_eq!(ev.sequence, 2);
    assert!(ev.since + Duration::from_secs(1) >= before);
    // Later writes fail too: nothing unreplicated is ever acknowledged.
    let out = qemu_io(&url, &["write -P 0xa4 192k 4k"]).await;
    assert!(!out.success, "{out:?}");
    let status = pair.primary.volume("vol1").unwrap().status();
    assert!(
        matches!(status.replication.mode, ReplMode::Held { first_seq: 2, .. }),
        "{status:?}"
    );
    assert_eq!(status.replication.last_acked, Some(1));
    let dirty = pair.primary.volume("vol1").unwrap().dirty_regions();
    assert_eq!(
        dirty,
        vec![(128 * 1024, 128 * 1024)],
        "the uncopied writes are dirty"
    );
    // The secondary holds both acknowledged writes; reads on the primary still work.
    let s = pair.secondary_file("vol1");
    assert!(read_file_at(&s, 0, 65536).iter().all(|&b| b == 0xa1));
    assert!(read_file_at(&s, 65536, 65536).iter().all(|&b| b == 0xa2));
    let out = qemu_io(&url, &["read -P 0xa1 0 64k"]).await;
    assert!(out.clean(), "{out:?}");
    (pair, ev)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reset_link_fails_next_write_and_emits_copy_failed() {
    let (_pair, ev) = cut_then_write(LinkMode::Reset, Duration::from_secs(30)).await;
    assert!(ev.error.contains("replication link"), "{ev:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blackholed_link_times_out() {
    let (_pair, ev) = cut_then_write(LinkMode::Blackhole, Duration::from_millis(300)).await;
    assert!(ev.error.contains("did not acknowledge"), "{ev:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secondary_refusal_is_a_copy_failure() {
    // A directory where the secondary's volume file should be: the secondary cannot open it and says so.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("vol1")).unwrap();
    let secondary = lockstep_replicator::secondary::Secondary::start(
        lockstep_replicator::secondary::SecondaryConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            dir: dir.path().to_owned(),
            security: lockstep_replicator::LinkSecurity::Plaintext,
        },
    )
    .await
    .unwrap();
    let primary = lockstep_replicator::Primary::start(lockstep_replicator::PrimaryConfig {
        volumes: vec![lockstep_replicator::VolumeConfig {
            hold_timeout: HOLD_TIMEOUT,
            ..lockstep_replicator::VolumeConfig::new(
                "vol1",
                dir.path().join("primary-vol1"),
                Some(MIB),
                Some(lockstep_replicator::CopyConfig {
                    secondary: secondary.local_addr().to_string(),
                    timeout: Duration::from_secs(30),
                    security: lockstep_replicator::LinkSecurity::Plaintext,
                }),
            )
        }],
        nbd_listen: Some("127.0.0.1:0".parse().unwrap()),
        nbd_socket: None,
        record_latency: false,
        control_socket: None,
    })
    .await
    .unwrap();
    let vol = Arc::clone(primary.volume("vol1").unwrap());
    eventually("the refusal", || async {
        matches!(vol.status().replication.mode, ReplMode::Held { .. }).then_some(())
    })
    .await;
    let ReplMode::Held {
        error, first_seq, ..
    } = vol.status().replication.mode
    else {
        unreachable!()
    };
    assert!(error.contains("secondary refused"), "{error}");
    assert_eq!(first_seq, 0);
    let out = qemu_io(
        &format!("nbd://{}/vol1", primary.nbd_addr().unwrap()),
        &["write 0 4k"],
    )
    .await;
    assert!(!out.success, "{out:?}");
}

/// Block `(client, i)`: 4 KiB, self-describing.
fn block(client: u64, i: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for (n, chunk) in b.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&client.to_le_bytes());
        chunk[8..16].copy_from_slice(&(i ^ n as u64).to_le_bytes());
    }
    b
}

async fn concurrent_writers_then_cut(mode: LinkMode, timeout: Duration) {
    const CLIENTS: u64 = 4;
    const SLOTS: u64 = 256;
    let pair = start_pair(&[("vol1", CLIENTS * SLOTS * 4096)], true, timeout).await;
    let mut events = pair.primary.subscribe();
    let acked_total = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let addr = pair.nbd_addr();
        let acked_total = Arc::clone(&acked_total);
        // Each client writes its slots round and round until writes fail (the cut), then a few more.
        tasks.push(tokio::spawn(async move {
            let mut client = RawClient::connect(addr, "vol1").await;
            let mut acked = Vec::new();
            let mut failed = Vec::new();
            for i in 0..1_000_000u64 {
                let offset = (c * SLOTS + i % SLOTS) * 4096;
                let flags = if i % 3 == 0 { proto::CMD_FLAG_FUA } else { 0 };
                let reply = client
                    .request(proto::CMD_WRITE, flags, offset, 4096, &block(c, i))
                    .await
                    .expect("server answers");
                if reply.error == 0 {
                    assert!(
                        failed.is_empty(),
                        "a write was acknowledged after an earlier one failed"
                    );
                    acked.push(i);
                    acked_total.fetch_add(1, Ordering::SeqCst);
                } else {
                    assert_eq!(reply.error, proto::EIO);
                    failed.push(i);
                    if failed.len() >= 3 {
                        break;
                    }
                }
            }
            (c, acked, failed)
        }));
    }
    eventually("some acknowledged writes", || async {
        (acked_total.load(Ordering::SeqCst) >= 200).then_some(())
    })
    .await;
    pair.link.as_ref().unwrap().set_mode(mode);
    let ev = next_copy_failed(&mut events).await;
    let mut acked_count = 0u64;
    let s = pair.secondary_file("vol1");
    for t in tasks {
        let (c, acked, failed) = t.await.unwrap();
        assert_eq!(failed.len(), 3, "client {c} must see the cut");
        acked_count += acked.len() as u64;
        // Per slot: the secondary holds the last acknowledged write, or a later one that failed (its
        // copy may have landed before the link broke) — never anything older.
        let mut last_acked = std::collections::BTreeMap::new();
        for &i in &acked {
            last_acked.insert(i % SLOTS, i);
        }
        for (slot, i) in last_acked {
            let got = read_file_at(&s, (c * SLOTS + slot) * 4096, 4096);
            let allowed: BTreeSet<u64> = std::iter::once(i)
                .chain(failed.iter().copied().filter(|f| f % SLOTS == slot))
                .collect();
            assert!(
                allowed.iter().any(|&a| got == block(c, a)),
                "acknowledged write ({c},{i}) missing on the secondary"
            );
        }
    }
    assert!(ev.sequence >= acked_count, "{ev:?} but {acked_count} acked");
    let status = pair.primary.volume("vol1").unwrap().status();
    assert!(
        status
            .replication
            .last_acked
            .is_some_and(|a| a + 1 >= acked_count)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_reset_never_acknowledge_unreplicated() {
    concurrent_writers_then_cut(LinkMode::Reset, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_blackhole_never_acknowledge_unreplicated() {
    concurrent_writers_then_cut(LinkMode::Blackhole, Duration::from_millis(300)).await;
}
