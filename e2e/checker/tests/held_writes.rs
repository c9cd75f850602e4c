//! The workload against a volume that holds its writes (never acknowledges them), beside real
//! `qemu-nbd` volumes: the lanes go on writing elsewhere until each is stuck on the held volume, and
//! what was acknowledged is a consistent state.

mod support;

use lockstep_checker::workload::StopReason;
use lockstep_checker::{
    CheckOptions, Layout, Source, WorkloadError, WorkloadHandle, WorkloadOptions, check_sources,
};
use std::time::Duration;
use support::{HoldingServer, QemuNbd, TestResult, sparse_file};

const SIZE: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn lanes_stop_one_by_one_on_a_held_volume() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut servers = Vec::new();
    for i in [0, 2] {
        let file = dir.path().join(format!("vol{i}.img"));
        sparse_file(&file, SIZE)?;
        servers.push(
            QemuNbd::unix(
                &file,
                &format!("vol{i}"),
                &dir.path().join(format!("vol{i}.sock")),
                false,
            )
            .await?,
        );
    }
    let held = HoldingServer::start(&dir.path().join("held.sock"), "vol1", SIZE)?;
    let layout = Layout::with_lanes(3, 3, 4, 0)?;
    let addresses = vec![
        servers[0].address.clone(),
        held.address.clone(),
        servers[1].address.clone(),
    ];
    let mut handle = WorkloadHandle::spawn(addresses, WorkloadOptions::new(layout, Some(50)));

    // Every lane ends up waiting on a write to volume 1.
    let stuck = |p: &lockstep_checker::Progress| {
        p.in_flight.len() == 3
            && p.in_flight
                .iter()
                .enumerate()
                .all(|(l, f)| f.is_some_and(|s| layout.locate(l as u32, s).volume == 1))
    };
    let progress = handle
        .wait_until("every lane waiting on volume 1", stuck, WAIT)
        .await?;
    // Lane l starts on volume l: lane 0 wrote 1 write, lane 1 none, lane 2 two.
    assert_eq!(progress.last_acked, vec![1, 0, 2], "{progress:?}");
    let report = handle.stop_and_join().await?;
    assert_eq!(report.stopped, StopReason::Cancelled, "{report}");
    assert_eq!(
        report.in_flight_at_stop,
        vec![Some(2), Some(1), Some(3)],
        "{report}"
    );

    // Volume 1's secondary never received anything; the others hold what was acknowledged.
    let empty = dir.path().join("vol1-secondary.img");
    sparse_file(&empty, SIZE)?;
    let sources = vec![
        Source::File(servers[0].file.clone()),
        Source::File(empty),
        Source::File(servers[1].file.clone()),
    ];
    let v = check_sources(
        &sources,
        &CheckOptions::lanes(report.last_acked.clone()).run(report.run_id),
    )
    .await?;
    assert_eq!(v.prefix_ends(), Some(&[1u64, 0, 2][..]), "{v}");
    for s in servers {
        s.kill().await?;
    }
    Ok(())
}

#[tokio::test]
async fn cancel_while_a_server_never_answers_the_handshake() -> TestResult {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("mute.sock");
    let listener = tokio::net::UnixListener::bind(&socket)?;
    // Accepts connections and says nothing.
    let mute = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let address = lockstep_checker::NbdAddress::Unix {
        socket,
        export: "x".into(),
    };
    let handle = WorkloadHandle::spawn(
        vec![address],
        WorkloadOptions::new(Layout::new(1, 4, 0)?, Some(5)),
    );
    let result = handle.stop_and_join().await;
    assert!(
        matches!(result, Err(WorkloadError::CancelledBeforeStart)),
        "{result:?}"
    );
    mute.abort();
    Ok(())
}

/// With a span, lanes that avoid the held volume keep writing to completion while the others wait.
#[tokio::test]
async fn lanes_off_the_held_volume_keep_writing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let held = HoldingServer::start(&dir.path().join("held.sock"), "vol0", SIZE)?;
    let mut servers = Vec::new();
    for i in [1, 2] {
        let file = dir.path().join(format!("vol{i}.img"));
        sparse_file(&file, SIZE)?;
        let socket = dir.path().join(format!("vol{i}.sock"));
        servers.push(QemuNbd::unix(&file, &format!("vol{i}"), &socket, false).await?);
    }
    // Lane 0 cycles over volumes 0, 1; lane 1 over 1, 2; lane 2 over 2, 0.
    let layout = Layout::with_span(3, 3, 2, 8, 0)?;
    let mut addresses = vec![held.address.clone()];
    addresses.extend(servers.iter().map(|s| s.address.clone()));
    let mut handle = WorkloadHandle::spawn(addresses, WorkloadOptions::new(layout, Some(40)));
    let goal = |p: &lockstep_checker::Progress| {
        p.last_acked(1) == 40
            && p.in_flight.first() == Some(&Some(1))
            && p.in_flight.get(2) == Some(&Some(2))
    };
    let progress = handle
        .wait_until("lane 1 done, lanes 0 and 2 held", goal, WAIT)
        .await?;
    assert_eq!(progress.last_acked, vec![0, 40, 1], "{progress:?}");
    let report = handle.stop_and_join().await?;
    assert_eq!(report.stopped, StopReason::Cancelled, "{report}");

    let empty = dir.path().join("vol0-secondary.img");
    sparse_file(&empty, SIZE)?;
    let mut sources = vec![Source::File(empty)];
    sources.extend(servers.iter().map(|s| Source::File(s.file.clone())));
    let options = CheckOptions::lanes(report.last_acked.clone()).run(report.run_id);
    let v = check_sources(&sources, &options).await?;
    assert_eq!(v.prefix_ends(), Some(&[0u64, 40, 1][..]), "{v}");
    for s in servers {
        s.kill().await?;
    }
    Ok(())
}
