//! The README's "Deploying by hand" recipe, run as written: every shell block between the
//! `<!-- by-hand:begin NAME -->` and `<!-- by-hand:end -->` markers, in order, each in its own `bash`,
//! starting the built binaries as separate processes (two test API servers, replicators and secondaries,
//! a sidecar per node, the operator) and driving them with the real `kubectl` and `lockstep-checker`:
//! a group, a dependent-write workload, a lost secondary, the freeze, and the consistency check.
//!
//! The blocks use fixed loopback ports, as a person's copy would (16443, 26443, 17001, 27001, 7443,
//! 18080). The binaries come from this test's target directory; those missing (a run of this test alone)
//! are built first with `cargo build`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use lockstep_testapi::kubectl::Pick;

/// The binaries the recipe runs.
const BINARIES: [(&str, &str); 5] = [
    ("lockstep-testapi", "lockstep-testapi"),
    ("lockstep-replicator", "lockstep-replicator"),
    ("lockstep-sidecar", "lockstep-sidecar"),
    ("lockstep-operator", "lockstep-operator"),
    ("lockstep-checker", "lockstep-checker"),
];
/// The recipe's blocks, in the README's order.
const STEPS: [&str; 8] = [
    "api-servers",
    "member-clusters",
    "replicators",
    "volumes",
    "control",
    "group",
    "failure",
    "check",
];
/// How long one block may run (its own commands wait with shorter timeouts).
const BLOCK_DEADLINE: Duration = Duration::from_secs(240);

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository's root")
}

/// The README's by-hand blocks: (name, shell text), in order.
fn blocks(readme: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut rest = readme;
    while let Some(start) = rest.find("<!-- by-hand:begin ") {
        let after = &rest[start + "<!-- by-hand:begin ".len()..];
        let name_end = after.find(" -->").expect("a by-hand marker ends with -->");
        let name = after[..name_end].trim().to_owned();
        let end = after
            .find("<!-- by-hand:end -->")
            .unwrap_or_else(|| panic!("by-hand block {name} has no end marker"));
        let body = &after[name_end + " -->".len()..end];
        let open = body
            .find("```sh\n")
            .unwrap_or_else(|| panic!("by-hand block {name} has no ```sh fence"));
        let code = &body[open + "```sh\n".len()..];
        let close = code
            .find("```")
            .unwrap_or_else(|| panic!("by-hand block {name} has no closing fence"));
        found.push((name, code[..close].to_owned()));
        rest = &after[end..];
    }
    found
}

/// The directory holding the workspace's built binaries (this test runs from its `deps/`).
fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let deps = exe.parent().expect("deps/");
    deps.parent()
        .expect("the profile's directory")
        .to_path_buf()
}

/// Builds the binaries that are missing from `dir`.
fn ensure_binaries(dir: &Path) {
    let missing: Vec<&str> = BINARIES
        .iter()
        .filter(|(_, bin)| !dir.join(bin).is_file())
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return;
    }
    let mut cargo = std::process::Command::new(env!("CARGO"));
    cargo.current_dir(repository()).args(["build", "--bins"]);
    for package in &missing {
        cargo.args(["-p", package]);
    }
    let status = cargo.status().expect("cargo build runs");
    assert!(status.success(), "cargo build of {missing:?} failed");
}

/// Every process group a block started; stopped on drop, with whatever the blocks left running.
struct Groups(Vec<u32>);

impl Drop for Groups {
    fn drop(&mut self) {
        for signal in ["-TERM", "-KILL"] {
            for group in &self.0 {
                let _ = std::process::Command::new("kill")
                    .args([signal, "--", &format!("-{group}")])
                    .stderr(Stdio::null())
                    .status();
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// The last lines of every log in `dir`, for a failure's message.
fn logs(dir: &Path) -> String {
    let mut text = String::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    entries.sort();
    for path in entries
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
    {
        let content = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = content.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        text.push_str(&format!("--- {} (last lines)\n{tail}\n", path.display()));
    }
    text
}

/// Runs one block in `bash -e -o pipefail`, in its own process group, and returns its output.
async fn run_block(
    name: &str,
    code: &str,
    work: &Path,
    env_path: &str,
    groups: &mut Groups,
) -> String {
    let started = Instant::now();
    let mut command = tokio::process::Command::new("bash");
    command
        .args(["-e", "-o", "pipefail", "-c", code])
        .current_dir(work)
        .env("REPO", repository())
        .env("PATH", env_path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = command.spawn().expect("bash starts");
    if let Some(pid) = child.id() {
        groups.0.push(pid);
    }
    let output = tokio::time::timeout(BLOCK_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "block {name} did not finish within {BLOCK_DEADLINE:?}\n{}",
                logs(work)
            )
        })
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    println!(
        "== by-hand block {name} ({:.1}s, {})\n{stdout}{stderr}",
        started.elapsed().as_secs_f64(),
        output.status
    );
    assert!(
        output.status.success(),
        "block {name} failed ({}):\n{code}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n{}",
        output.status,
        logs(work)
    );
    stdout
}

#[tokio::test]
async fn the_readme_deployment_by_hand_freezes_and_the_secondaries_pass_the_checker() {
    let started = Instant::now();
    let readme = std::fs::read_to_string(repository().join("README.md")).expect("README.md");
    let blocks = blocks(&readme);
    let names: Vec<&str> = blocks.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, STEPS, "the README's by-hand blocks, in order");

    let bin = binary_dir();
    ensure_binaries(&bin);
    let work = tempfile::Builder::new()
        .prefix("lockstep-by-hand-")
        .tempdir()
        .expect("a working directory");
    // The real kubectl, as `kubectl` on the PATH (a versioned binary: see DESIGN.md).
    let kubectl = lockstep_testapi::kubectl::find(Pick::Newest)
        .expect("kubectl (scripts/install-tools.sh installs it)");
    let tools = work.path().join("tools");
    std::fs::create_dir_all(&tools).expect("tools dir");
    std::os::unix::fs::symlink(&kubectl, tools.join("kubectl")).expect("kubectl link");
    let env_path = format!(
        "{}:{}:{}",
        tools.display(),
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = work.path().join("run");
    std::fs::create_dir_all(&run).expect("run dir");

    let mut groups = Groups(Vec::new());
    let mut outputs = std::collections::BTreeMap::new();
    for (name, code) in &blocks {
        let out = run_block(name, code, &run, &env_path, &mut groups).await;
        outputs.insert(name.clone(), out);
    }

    // What a person checks: the group froze (epoch 1), released (Running) and the checker passed.
    let epoch = std::process::Command::new(&kubectl)
        .current_dir(&run)
        .args([
            "--kubeconfig",
            "east.kubeconfig",
            "get",
            "cg",
            "orders-db",
            "-o",
            "jsonpath={.status.epoch} {.status.phase} {.status.trigger.message}",
        ])
        .output()
        .expect("kubectl runs");
    let seen = String::from_utf8_lossy(&epoch.stdout).into_owned();
    println!("== the group after the failure: {seen}");
    assert!(
        seen.starts_with("1 Running"),
        "the group froze once and released: {seen}\n{}",
        logs(&run)
    );
    assert_eq!(
        seen.matches("replication link:").count(),
        1,
        "the trigger names the broken link once: {seen}"
    );
    assert!(
        outputs["group"].contains("orders-db"),
        "{}",
        outputs["group"]
    );
    assert!(
        outputs["check"].starts_with("CONSISTENT"),
        "the checker's verdict: {}",
        outputs["check"]
    );
    println!(
        "== the README's by-hand deployment: {:.1}s in all",
        started.elapsed().as_secs_f64()
    );
    drop(groups);
}
