//! A replicator killed with writes in flight (written on the primary, not yet on the secondary) and started
//! again from what it persisted: the primary and the secondary must not stay different where nothing
//! records it. A write not yet acknowledged may be on the primary's disk after the crash — the application
//! or its recovery reads it there and builds on it — so the secondary must get it too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Weak};
use std::time::Duration;

use common::*;
use lockstep_replicator::ReplMode;
use lockstep_replicator::linkcut::LinkMode;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_in_flight_at_a_crash_reach_the_secondary_after_the_restart() {
    let pair = start_pair(&[("vol1", 4 * MIB)], true, Duration::from_secs(60)).await;
    let url = pair.tcp_url("vol1");
    let (primary_file, secondary_file) = (pair.primary_file("vol1"), pair.secondary_file("vol1"));
    let out = qemu_io(&url, &["write -P 0xa1 0 64k"]).await;
    assert!(out.clean(), "{out:?}");

    // The copy of the next write hangs: it is on the primary, not on the secondary, not acknowledged.
    pair.link.as_ref().unwrap().set_mode(LinkMode::Blackhole);
    let in_flight = tokio::spawn({
        let url = url.clone();
        async move { qemu_io(&url, &["write -P 0xb2 64k 64k"]).await }
    });
    eventually("the write on the primary's disk", || {
        let file = primary_file.clone();
        async move {
            read_file_at(&file, 65536, 65536)
                .iter()
                .all(|&b| b == 0xb2)
                .then_some(())
        }
    })
    .await;
    assert!(!in_flight.is_finished(), "acknowledged without its copy");

    // Killed: no orderly shutdown, nothing persisted beyond what it had.
    let Pair {
        dir: _dir,
        secondary: _secondary,
        link,
        primary,
        primary_config,
    } = pair;
    let volume: Weak<lockstep_replicator::Volume> = Arc::downgrade(primary.volume("vol1").unwrap());
    drop(primary);
    eventually("the killed volume gone", || async {
        volume.upgrade().is_none().then_some(())
    })
    .await;
    let _ = in_flight.await;

    // Started again with the link back: once it replicates with nothing left to copy, both sides agree.
    link.as_ref().unwrap().set_mode(LinkMode::Pass);
    let primary = lockstep_replicator::Primary::start(primary_config)
        .await
        .unwrap();
    let volume = primary.volume("vol1").unwrap();
    eventually("replicating with nothing dirty", || {
        let status = volume.status();
        async move {
            (status.replication.mode == ReplMode::Replicating
                && status.replication.dirty_bytes == 0)
                .then_some(())
        }
    })
    .await;
    let primary = std::fs::read(&primary_file).unwrap();
    let secondary = std::fs::read(&secondary_file).unwrap();
    let first_difference = primary.iter().zip(&secondary).position(|(a, b)| a != b);
    assert_eq!(
        first_difference, None,
        "the primary and the secondary differ, and nothing says so (the write in flight at the crash is on the primary only)"
    );
}
