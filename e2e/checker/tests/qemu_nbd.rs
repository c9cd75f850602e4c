//! The workload against real `qemu-nbd` servers, and the checker on copies of their files.

mod support;

use lockstep_checker::check::{Found, LinkState, Problem};
use lockstep_checker::workload::StopReason;
use lockstep_checker::{
    BLOCK_SIZE, CheckOptions, Layout, NbdAddress, OnError, Source, Verdict, WorkloadHandle,
    WorkloadOptions, check_sources,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::{QemuNbd, TestResult, copy_files, unix_volumes};

const VOLUME_SIZE: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(60);

async fn check_files(
    files: &[PathBuf],
    options: &CheckOptions,
) -> Result<Verdict, Box<dyn std::error::Error>> {
    let sources: Vec<Source> = files.iter().cloned().map(Source::File).collect();
    Ok(check_sources(&sources, options).await?)
}

fn addresses(servers: &[QemuNbd]) -> Vec<NbdAddress> {
    servers.iter().map(|s| s.address.clone()).collect()
}

fn files(servers: &[QemuNbd]) -> Vec<PathBuf> {
    servers.iter().map(|s| s.file.clone()).collect()
}

fn copy_block(from: &Path, to: &Path, offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let mut f = std::fs::File::open(from)?;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(&mut buf)?;
    let mut t = std::fs::OpenOptions::new().write(true).open(to)?;
    t.seek(SeekFrom::Start(offset))?;
    t.write_all(&buf)
}

async fn kill_all(servers: impl IntoIterator<Item = QemuNbd>) -> std::io::Result<()> {
    for s in servers {
        s.kill().await?;
    }
    Ok(())
}

/// Three volumes, a run that wraps the region twice, written in two phases; then the checker on exact
/// copies, an earlier prefix, a copy with a middle write removed, empty copies, and over NBD.
#[tokio::test]
async fn workload_on_qemu_nbd_then_check_copies() -> TestResult {
    let dir = tempfile::tempdir()?;
    let servers = unix_volumes(dir.path(), 3, VOLUME_SIZE).await?;
    let layout = Layout::new(3, 16, 4)?; // period 48
    let mut opts = WorkloadOptions::new(layout, Some(40));
    opts.fua = true;
    let run_id = opts.run_id;

    let first = WorkloadHandle::spawn(addresses(&servers), opts.clone())
        .join()
        .await?;
    assert_eq!(first.stopped, StopReason::Completed, "{first}");
    assert_eq!(
        (first.last_acked.clone(), first.acked),
        (vec![40], 40),
        "{first}"
    );
    let snap = copy_files(&servers, dir.path(), "snap40")?;

    opts.start_after = vec![40];
    opts.writes = Some(63);
    opts.fua = false;
    let second = WorkloadHandle::spawn(addresses(&servers), opts)
        .join()
        .await?;
    assert_eq!(second.stopped, StopReason::Completed, "{second}");
    assert_eq!(
        (second.last_acked.clone(), second.first_failure.clone()),
        (vec![103], None)
    );
    let full = copy_files(&servers, dir.path(), "full")?;

    // An exact copy passes.
    let v = check_files(&full, &CheckOptions::new(103)).await?;
    assert_eq!(v.prefix_end(), Some(103), "{v}");
    match &v {
        Verdict::Consistent(c) => {
            assert_eq!(c.run_id, run_id);
            assert_eq!(c.volumes.iter().map(|s| s.blocks).sum::<u64>(), 48);
        }
        Verdict::Inconsistent(_) => unreachable!(),
    }

    // An earlier consistent prefix passes with that prefix, and fails if more was acknowledged.
    let v = check_files(&snap, &CheckOptions::new(40).run(run_id)).await?;
    assert_eq!(v.prefix_end(), Some(40), "{v}");
    let v = check_files(&snap, &CheckOptions::new(41).run(run_id)).await?;
    let behind = Problem::Behind {
        lane: 0,
        prefix_end: 40,
        required: 41,
    };
    assert_eq!(v.problems(), &[behind], "{v}");
    let v = check_files(&full, &CheckOptions::new(104)).await?;
    assert!(!v.is_consistent() && v.gaps().is_empty(), "{v}");

    // A middle write removed: the slot of write 80 gets back what it held before (write 32, from the
    // snapshot).
    let loc = layout.locate(0, 80);
    let holed: Vec<PathBuf> = copy_files(&servers, dir.path(), "holed")?;
    copy_block(
        &snap[loc.volume as usize],
        &holed[loc.volume as usize],
        loc.offset,
    )?;
    let v = check_files(&holed, &CheckOptions::new(60)).await?;
    assert!(!v.is_consistent(), "{v}");
    assert_eq!(v.gaps().len(), 1, "{v}");
    let gap = &v.gaps()[0];
    assert_eq!(
        (gap.missing, gap.location, &gap.found),
        (80, loc, &Found::Older { seq: 32 })
    );
    assert!(
        gap.chain
            .iter()
            .any(|l| l.seq == 81 && l.state == LinkState::Present),
        "{v}"
    );
    let text = v.to_string();
    assert!(text.contains("write 80 is missing"), "{text}");
    assert!(
        text.contains("write 81 was issued only after write 80"),
        "{text}"
    );

    // Empty copies fail.
    let empty: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("empty{i}.img")))
        .collect();
    for f in &empty {
        support::sparse_file(f, VOLUME_SIZE)?;
    }
    let v = check_files(&empty, &CheckOptions::new(0)).await?;
    assert_eq!(v.problems(), &[Problem::Empty], "{v}");

    // The checker reads over NBD too: serve the full copies read-only.
    let mut readers = Vec::new();
    for (i, f) in full.iter().enumerate() {
        let socket = dir.path().join(format!("copy{i}.sock"));
        readers.push(QemuNbd::unix(f, &format!("copy{i}"), &socket, true).await?);
    }
    let sources: Vec<Source> = readers
        .iter()
        .map(|r| Source::Nbd(r.address.clone()))
        .collect();
    let v = check_sources(&sources, &CheckOptions::new(103)).await?;
    assert_eq!(v.prefix_end(), Some(103), "{v}");

    kill_all(readers.into_iter().chain(servers)).await?;
    Ok(())
}

/// Several lanes write concurrently; copies taken at the end pass, and a copy where one volume's
/// secondary stopped receiving writes while the others went on (what a suspended volume that
/// acknowledged writes without holding them would leave) fails.
#[tokio::test]
async fn concurrent_lanes_and_a_volume_left_behind() -> TestResult {
    let dir = tempfile::tempdir()?;
    let servers = unix_volumes(dir.path(), 3, VOLUME_SIZE).await?;
    let layout = Layout::with_lanes(3, 4, 8, 0)?;
    let mut handle =
        WorkloadHandle::spawn(addresses(&servers), WorkloadOptions::new(layout, Some(90)));
    handle.wait_for_acked(60, WAIT).await?;
    let early = copy_files(&servers, dir.path(), "early")?;
    let report = handle.join().await?;
    assert_eq!(report.stopped, StopReason::Completed, "{report}");
    assert_eq!(
        (report.last_acked.clone(), report.acked),
        (vec![90; 4], 360),
        "{report}"
    );

    let v = check_files(&files(&servers), &CheckOptions::lanes(vec![90; 4])).await?;
    assert_eq!(v.prefix_ends(), Some(&[90u64; 4][..]), "{v}");

    // (The early copy alone is not checked: copying live files one after another is not an atomic
    // snapshot of the group.)

    // Volume 1 left behind: its secondary is the early copy, the others the final files.
    let mixed = vec![
        servers[0].file.clone(),
        early[1].clone(),
        servers[2].file.clone(),
    ];
    let v = check_files(&mixed, &CheckOptions::lanes(Vec::new())).await?;
    assert!(!v.is_consistent(), "{v}");
    assert!(!v.gaps().is_empty(), "{v}");
    kill_all(servers).await?;
    Ok(())
}

/// A caller follows progress while the workload runs, then cancels it.
#[tokio::test]
async fn progress_and_cancel() -> TestResult {
    let dir = tempfile::tempdir()?;
    let servers = unix_volumes(dir.path(), 2, VOLUME_SIZE).await?;
    let layout = Layout::new(2, 8, 0)?;
    let mut handle = WorkloadHandle::spawn(addresses(&servers), WorkloadOptions::new(layout, None));
    let seen = handle.wait_for_acked(50, WAIT).await?;
    assert!(
        seen.last_acked(0) >= 50 && seen.first_failure.is_none(),
        "{seen:?}"
    );
    let report = handle.stop_and_join().await?;
    assert_eq!(report.stopped, StopReason::Cancelled, "{report}");
    let last = report.last_acked[0];
    assert!(last >= 50);

    let v = check_files(&files(&servers), &CheckOptions::new(last)).await?;
    // A write cancelled in flight may or may not have landed.
    let end = v.prefix_end().ok_or_else(|| v.to_string())?;
    assert!(
        end == last || Some(end) == report.in_flight_at_stop[0],
        "{v} / {report}"
    );
    kill_all(servers).await?;
    Ok(())
}

/// A volume's server dies mid-run: the workload stops at the first failed write and records it; what was
/// written is a consistent prefix reaching the last acknowledged write.
#[tokio::test]
async fn server_killed_mid_run_stops_at_first_failure() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut servers = unix_volumes(dir.path(), 3, VOLUME_SIZE).await?;
    let layout = Layout::new(3, 8, 0)?;
    let all_files = files(&servers);
    let mut handle = WorkloadHandle::spawn(addresses(&servers), WorkloadOptions::new(layout, None));
    handle.wait_for_acked(20, WAIT).await?;
    servers.remove(1).kill().await?;
    let report = handle.join().await?;
    assert_eq!(report.stopped, StopReason::Failed, "{report}");
    let failure = report.first_failure.clone().ok_or("no failure recorded")?;
    let last = report.last_acked[0];
    assert_eq!((failure.volume, failure.seq), (1, last + 1), "{report}");
    assert_eq!(failure.acked_before, vec![last], "{report}");
    assert_eq!(layout.locate(0, failure.seq).volume, 1);

    let v = check_files(&all_files, &CheckOptions::new(last)).await?;
    let end = v.prefix_end().ok_or_else(|| v.to_string())?;
    assert!(end == last || end == failure.seq, "{v} / {report}");
    kill_all(servers).await?;
    Ok(())
}

/// With `OnError::Retry` the workload retries the same write, reconnects once the server is back, and the
/// chain stays gap-free.
#[tokio::test]
async fn retry_reconnects_and_keeps_the_chain() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut servers = unix_volumes(dir.path(), 2, VOLUME_SIZE).await?;
    let layout = Layout::new(2, 8, 0)?;
    let mut opts = WorkloadOptions::new(layout, Some(120));
    opts.on_error = OnError::Retry;
    opts.retry_backoff = Duration::from_millis(5);
    let mut handle = WorkloadHandle::spawn(addresses(&servers), opts);
    handle.wait_for_acked(20, WAIT).await?;
    let victim = servers.remove(0);
    let (file, address) = (victim.file.clone(), victim.address.clone());
    victim.kill().await?;
    let stalled = handle
        .wait_until("a failed write", |p| p.failures > 0, WAIT)
        .await?;
    assert!(!stalled.done, "{stalled:?}");
    servers.insert(0, QemuNbd::restart(&file, &address, false).await?);

    let report = handle.join().await?;
    assert_eq!(report.stopped, StopReason::Completed, "{report}");
    assert_eq!(report.last_acked, vec![120], "{report}");
    let failure = report.first_failure.clone().ok_or("no failure recorded")?;
    assert_eq!(failure.volume, 0);
    let v = check_files(&files(&servers), &CheckOptions::new(120)).await?;
    assert_eq!(v.prefix_end(), Some(120), "{v}");
    kill_all(servers).await?;
    Ok(())
}

/// `first_difference` compares images byte for byte, from files and over NBD.
#[tokio::test]
async fn first_difference_finds_the_first_differing_byte() -> TestResult {
    use lockstep_checker::first_difference;
    let dir = tempfile::tempdir()?;
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    let mut data = vec![7u8; 3 << 20];
    std::fs::write(&a, &data)?;
    std::fs::write(&b, &data)?;
    let (fa, fb) = (Source::File(a.clone()), Source::File(b.clone()));
    assert_eq!(first_difference(&fa, &fb).await?, None);
    data[(2 << 20) + 5] = 8;
    std::fs::write(&b, &data)?;
    assert_eq!(first_difference(&fa, &fb).await?, Some((2 << 20) + 5));
    let server = QemuNbd::unix(&b, "b", &dir.path().join("b.sock"), true).await?;
    let nb = Source::Nbd(server.address.clone());
    assert_eq!(first_difference(&fa, &nb).await?, Some((2 << 20) + 5));
    assert_eq!(first_difference(&fb, &nb).await?, None);
    std::fs::write(&a, &data[..4096])?;
    assert_eq!(first_difference(&fa, &fb).await?, Some(4096));
    server.kill().await?;
    Ok(())
}
