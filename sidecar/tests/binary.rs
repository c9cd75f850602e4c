//! The `lockstep-sidecar` binary: flags and environment, a clear refusal of a configuration without a
//! path, and a graceful exit on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lockstep-sidecar");

#[test]
fn help_lists_the_flags() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--node-name",
        "--cluster-name",
        "--kubeconfig",
        "--operator-endpoint",
        "--replicator-socket",
        "--namespace",
        "--fail-safe-interval",
        "--rpc-timeout",
        "--listen",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help:\n{text}");
    }
}

#[test]
fn no_path_at_all_is_refused_with_a_sentence() {
    let out = Command::new(BIN)
        .args([
            "--node-name",
            "n1",
            "--cluster-name",
            "east",
            "--no-api-path",
        ])
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("no path configured"), "{text}");
}

#[test]
fn sigterm_shuts_down_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .env("NODE_NAME", "n1")
        .env("LOCKSTEP_CLUSTER", "east")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .args(["--no-api-path", "--operator-endpoint", "http://127.0.0.1:9"])
        .arg("--insecure-plaintext-control")
        .args(["--listen", "127.0.0.1:0", "--replicator-socket"])
        .arg(dir.path().join("absent.sock"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let started = lines.by_ref().take(200).any(|line| {
        line.map(|l| l.contains("lockstep-sidecar started"))
            .unwrap_or(false)
    });
    assert!(started, "the sidecar did not start");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_operator_endpoint_without_a_ca_or_the_plaintext_opt_in_is_refused_with_a_sentence() {
    let out = Command::new(BIN)
        .args([
            "--node-name",
            "n1",
            "--cluster-name",
            "east",
            "--no-api-path",
        ])
        .args(["--operator-endpoint", "http://127.0.0.1:9"])
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("--operator-ca-file"), "{text}");

    // With a CA, the endpoint must be https://.
    let out = Command::new(BIN)
        .args([
            "--node-name",
            "n1",
            "--cluster-name",
            "east",
            "--no-api-path",
        ])
        .args(["--operator-endpoint", "http://127.0.0.1:9"])
        .args(["--operator-ca-file", "/nonexistent/ca.crt"])
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("expected an https:// endpoint"), "{text}");
}
