//! The `lockstep-checker` binary, as a user runs it, against `qemu-nbd` over TCP.

mod support;

use std::process::Output;
use support::{QemuNbd, TestResult, sparse_file};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_lockstep-checker");

async fn run(args: &[&str]) -> std::io::Result<Output> {
    Command::new(BIN).args(args).output().await
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn workload_then_check_through_the_binary() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut servers = Vec::new();
    for i in 0..2 {
        let file = dir.path().join(format!("vol{i}.img"));
        sparse_file(&file, 1 << 20)?;
        servers.push(QemuNbd::tcp(&file, &format!("vol{i}"), false).await?);
    }
    let vols: Vec<String> = servers.iter().map(|s| s.address.to_string()).collect();
    let out = run(&[
        "workload", "--volume", &vols[0], "--volume", &vols[1], "--writes", "50", "--slots", "8",
        "--fua", "--json",
    ])
    .await?;
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["last_acked"], serde_json::json!([50]), "{report}");
    assert_eq!(report["stopped"], "completed", "{report}");

    let files: Vec<String> = servers
        .iter()
        .map(|s| s.file.display().to_string())
        .collect();
    let ok = run(&[
        "check",
        "--secondary",
        &files[0],
        "--secondary",
        &files[1],
        "--acked-before-failure",
        "50",
    ])
    .await?;
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(text(&ok).contains("CONSISTENT"), "{}", text(&ok));

    // Over NBD, as URIs, while the servers still run.
    let ok = run(&[
        "check",
        "--secondary",
        &vols[0],
        "--secondary",
        &vols[1],
        "--acked-before-failure",
        "50",
        "--json",
    ])
    .await?;
    assert!(ok.status.success(), "{}", text(&ok));
    let verdict: serde_json::Value = serde_json::from_slice(&ok.stdout)?;
    assert_eq!(verdict["verdict"], "consistent", "{verdict}");
    assert_eq!(verdict["prefix_ends"], serde_json::json!([50]), "{verdict}");

    let behind = run(&[
        "check",
        "--secondary",
        &files[0],
        "--secondary",
        &files[1],
        "--acked-before-failure",
        "51",
    ])
    .await?;
    assert!(!behind.status.success(), "{}", text(&behind));
    assert!(text(&behind).contains("INCONSISTENT"), "{}", text(&behind));

    // Volume order matters: swapped secondaries are misplaced.
    let swapped = run(&[
        "check",
        "--secondary",
        &files[1],
        "--secondary",
        &files[0],
        "--acked-before-failure",
        "1",
    ])
    .await?;
    assert!(!swapped.status.success(), "{}", text(&swapped));

    for s in servers {
        s.kill().await?;
    }
    Ok(())
}

/// `workload` without `--writes` runs until SIGTERM, then prints its report.
#[tokio::test]
async fn workload_stops_on_sigterm_and_reports() -> TestResult {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("vol0.img");
    sparse_file(&file, 1 << 20)?;
    let server = QemuNbd::tcp(&file, "vol0", false).await?;
    let child = Command::new(BIN)
        .args([
            "workload",
            "--volume",
            &server.address.to_string(),
            "--slots",
            "8",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    // Poll the file until the workload has written something, with a deadline.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read(&file)?.iter().all(|&b| b == 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no write reached the volume"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let pid = child.id().ok_or("no pid")?;
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    assert!(status.success());
    let out = child.wait_with_output().await?;
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["stopped"], "cancelled", "{report}");
    server.kill().await?;
    Ok(())
}
