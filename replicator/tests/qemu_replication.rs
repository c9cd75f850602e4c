//! Real NBD clients (`qemu-io`, `qemu-img`) write through the replicator over TCP and a unix socket;
//! the secondary ends up byte-identical to the primary, and what was written reads back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use lockstep_replicator::{Primary, PrimaryConfig, ReplMode, VolumeConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qemu_writes_are_replicated_and_read_back() {
    let pair = start_pair(
        &[("vol1", 8 * MIB), ("vol2", 4 * MIB)],
        false,
        Duration::from_secs(10),
    )
    .await;
    let tcp = pair.tcp_url("vol1");
    let unix = pair.unix_url("vol1");

    let out = qemu_io(
        &tcp,
        &[
            "write -P 0xab 0 1M",
            "write -f -P 0xcd 1M 64k",
            "aio_write -P 0x11 2M 4k",
            "aio_write -P 0x22 2052k 60k",
            "aio_write -P 0x33 3M 1M",
            "aio_flush",
            "flush",
        ],
    )
    .await;
    assert!(out.clean(), "qemu-io over tcp: {out:?}");

    let out = qemu_io(
        &unix,
        &[
            "write -P 0xef 4M 512k",
            "write -P 0x44 7M 1M",
            "discard 7M 64k",
            "flush",
        ],
    )
    .await;
    assert!(out.clean(), "qemu-io over unix: {out:?}");

    // Overlapping writes in flight together must land in the same order on both sides.
    let mut cmds = Vec::new();
    for i in 0..32u32 {
        cmds.push(format!(
            "aio_write -P {} {} 8k",
            i + 1,
            6 * MIB + u64::from(i % 4) * 4096
        ));
    }
    cmds.push("aio_flush".into());
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let out = qemu_io(&tcp, &cmds).await;
    assert!(out.clean(), "overlapping aio writes: {out:?}");

    let out = qemu_io(&pair.tcp_url("vol2"), &["write -P 0x77 0 4M"]).await;
    assert!(out.clean(), "qemu-io vol2: {out:?}");

    for vol in ["vol1", "vol2"] {
        let p = pair.primary_file(vol);
        let s = pair.secondary_file(vol);
        let cmp = qemu_img_compare(p.to_str().unwrap(), s.to_str().unwrap()).await;
        assert!(cmp.success, "{vol}: primary and secondary differ: {cmp:?}");
        assert_eq!(
            std::fs::metadata(&s).unwrap().len(),
            std::fs::metadata(&p).unwrap().len()
        );
    }
    // The NBD view matches the secondary too.
    let cmp = qemu_img_compare(&tcp, pair.secondary_file("vol1").to_str().unwrap()).await;
    assert!(cmp.success, "nbd view vs secondary: {cmp:?}");

    // Read back through both transports.
    let out = qemu_io(
        &tcp,
        &[
            "read -P 0xab 0 1M",
            "read -P 0xcd 1M 64k",
            "read -P 0x11 2M 4k",
            "read -P 0x22 2052k 60k",
            "read -P 0x33 3M 1M",
            "read -P 0x44 7232k 960k",
            "read -P 0 7M 64k",
        ],
    )
    .await;
    assert!(out.clean(), "read back over tcp: {out:?}");
    let out = qemu_io(&unix, &["read -P 0xef 4M 512k"]).await;
    assert!(out.clean(), "read back over unix: {out:?}");
    let status = pair.primary.volume("vol1").unwrap().status();
    assert_eq!(status.replication.mode, ReplMode::Replicating);
    assert_eq!(status.replication.pending, 0);
    assert_eq!(
        status.replication.last_acked,
        Some(status.replication.next_seq - 1)
    );
    assert_eq!(status.replication.dirty_bytes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_lists_and_reads_exports() {
    let pair = start_pair(&[("vol1", 2 * MIB)], false, Duration::from_secs(10)).await;
    let out = qemu_io(&pair.tcp_url("vol1"), &["write -P 0x5a 0 2M"]).await;
    assert!(out.clean(), "{out:?}");
    let info = tool("qemu-img", &["info", "-f", "raw", &pair.tcp_url("vol1")]).await;
    assert!(info.success && info.stdout.contains("2 MiB"), "{info:?}");
    let conv = pair.dir.path().join("copy.raw");
    let out = tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &pair.unix_url("vol1"),
            conv.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.success, "{out:?}");
    assert!(
        read_file_at(&conv, 0, 2 * MIB as usize)
            .iter()
            .all(|&b| b == 0x5a)
    );
    // An export that does not exist is refused.
    let out = qemu_io(&pair.tcp_url("nope"), &["read 0 4k"]).await;
    assert!(!out.clean(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_off_serves_the_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("solo");
    let primary = Primary::start(PrimaryConfig {
        volumes: vec![VolumeConfig::new("solo", path.clone(), Some(MIB), None)],
        nbd_listen: Some("127.0.0.1:0".parse().unwrap()),
        nbd_socket: None,
        record_latency: false,
        control_socket: None,
    })
    .await
    .unwrap();
    let url = format!("nbd://{}/solo", primary.nbd_addr().unwrap());
    let out = qemu_io(
        &url,
        &[
            "write -f -P 0x99 4k 8k",
            "read -P 0x99 4k 8k",
            "read -P 0 0 4k",
        ],
    )
    .await;
    assert!(out.clean(), "{out:?}");
    assert!(read_file_at(&path, 4096, 8192).iter().all(|&b| b == 0x99));
    assert_eq!(
        primary.volume("solo").unwrap().status().replication.mode,
        ReplMode::Standalone
    );
    // The default export (empty name) is the only one.
    let out = qemu_io(
        &format!("nbd://{}", primary.nbd_addr().unwrap()),
        &["read -P 0x99 4k 8k"],
    )
    .await;
    assert!(out.clean(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_served_unreplicated_before_is_fully_resynced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol1");
    let primary = Primary::start(PrimaryConfig {
        volumes: vec![VolumeConfig::new("vol1", path.clone(), Some(2 * MIB), None)],
        nbd_listen: Some("127.0.0.1:0".parse().unwrap()),
        nbd_socket: None,
        record_latency: false,
        control_socket: None,
    })
    .await
    .unwrap();
    let url = format!("nbd://{}/vol1", primary.nbd_addr().unwrap());
    let out = qemu_io(&url, &["write -P 0x61 0 1M", "write -P 0x62 1536k 512k"]).await;
    assert!(out.clean(), "{out:?}");
    drop(primary);
    // Now replicated: the secondary never saw those writes, so the whole volume is resynchronised.
    let secondary = lockstep_replicator::secondary::Secondary::start(
        lockstep_replicator::secondary::SecondaryConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            dir: dir.path().join("secondary"),
            security: lockstep_replicator::LinkSecurity::Plaintext,
        },
    )
    .await
    .unwrap();
    let primary = Primary::start(PrimaryConfig {
        volumes: vec![VolumeConfig::new(
            "vol1",
            path.clone(),
            Some(2 * MIB),
            Some(lockstep_replicator::CopyConfig {
                secondary: secondary.local_addr().to_string(),
                timeout: Duration::from_secs(10),
                security: lockstep_replicator::LinkSecurity::Plaintext,
            }),
        )],
        nbd_listen: Some("127.0.0.1:0".parse().unwrap()),
        nbd_socket: None,
        record_latency: false,
        control_socket: None,
    })
    .await
    .unwrap();
    let vol = primary.volume("vol1").unwrap().clone();
    eventually("the resync", || async {
        (vol.status().replication.mode == ReplMode::Replicating).then_some(())
    })
    .await;
    assert_eq!(vol.status().replication.dirty_bytes, 0);
    let cmp = qemu_img_compare(
        path.to_str().unwrap(),
        dir.path().join("secondary").join("vol1").to_str().unwrap(),
    )
    .await;
    assert!(cmp.success, "{cmp:?}");
}
