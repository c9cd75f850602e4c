//! Issue 30: the container images `scripts/images.sh` builds, checked as a registry and a node meet them.
//! The three images are built (from the debug binaries cargo builds for the tests; a release build is the
//! script's default), every blob's digest and size is checked against its content, the configuration
//! names the entrypoint, a numeric non-root user, amd64 and the OCI labels; each `oci-archive` is unpacked
//! by umoci (a reader of its own) and the binary's `--version` runs inside its own root file system as the
//! image's user, so a library missing from the image fails the test (and removing one does). The chart
//! with default values names exactly the built images, and the same commit builds the same digests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

const COMPONENTS: [&str; 3] = [
    "lockstep-operator",
    "lockstep-sidecar",
    "lockstep-replicator",
];
const VERSION: &str = env!("CARGO_PKG_VERSION");
const SOURCE: &str = env!("CARGO_PKG_REPOSITORY");
/// The images' user: numeric, so the kubelet can check `runAsNonRoot` without a passwd lookup.
const USER: &str = "65532:65532";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `program` (found on `PATH`, where `scripts/install-tools.sh` puts it) and returns its output.
fn run(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
    let program = program.as_ref();
    Command::new(program).args(args).output().unwrap_or_else(|e| {
        panic!(
            "{}: {e}: run the tests through ./scripts/test.sh, or `source \"$(./scripts/install-tools.sh)\"` first",
            program.to_string_lossy()
        )
    })
}

fn succeeded(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
    let output = run(&program, args);
    assert!(
        output.status.success(),
        "{} {args:?} failed: {}",
        program.as_ref().to_string_lossy(),
        text(&output)
    );
    output
}

/// Figures for the person running the tests: written to stderr itself, which the test harness does not
/// capture, so `./scripts/test.sh` shows them.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "images: {line}");
}

/// One line of the script's `images.tsv`.
#[derive(Debug, Clone, PartialEq)]
struct Image {
    reference: String,
    digest: String,
    layer_bytes: u64,
}

/// Runs `scripts/images.sh OPTIONS OUT` and returns the images it lists.
fn build(out: &Path, options: &[String]) -> Vec<Image> {
    let script = workspace().join("scripts/images.sh");
    let mut args: Vec<&str> = options.iter().map(String::as_str).collect();
    args.push(out.to_str().unwrap());
    let output = succeeded(&script, &args);
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            assert_eq!(fields.len(), 3, "images.tsv line {line:?}");
            Image {
                reference: fields[0].to_string(),
                digest: fields[1].to_string(),
                layer_bytes: fields[2].parse().unwrap(),
            }
        })
        .collect()
}

struct Built {
    dir: PathBuf,
    /// The script's options that chose the binaries.
    options: Vec<String>,
    images: Vec<Image>,
}

/// Where the binaries come from: the debug binaries beside this test's own executable, which
/// `cargo test --workspace` has just built in the same build (a `cargo build -p` of the three would
/// resolve features apart from it and build them all again), or, when they are missing (this test run
/// alone), a `--profile dev` build of the three by the script. Either way the images and the tests are
/// the same; a release build is the script's default.
fn binary_options() -> Vec<String> {
    let executable = std::env::current_exe().unwrap();
    let profile_dir = executable.parent().and_then(Path::parent).unwrap();
    if COMPONENTS.iter().all(|c| profile_dir.join(c).is_file()) {
        vec!["--bin-dir".into(), profile_dir.to_str().unwrap().into()]
    } else {
        vec!["--profile".into(), "dev".into()]
    }
}

/// The three images, built once per test binary into the target directory's scratch space.
fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("images");
        let _ = fs::remove_dir_all(&dir);
        let options = binary_options();
        let images = build(&dir, &options);
        let references: Vec<&str> = images.iter().map(|i| i.reference.as_str()).collect();
        let expected: Vec<String> = COMPONENTS
            .iter()
            .map(|c| format!("ghcr.io/lockstep-dev/{c}:{VERSION}"))
            .collect();
        assert_eq!(references, expected);
        Built {
            dir,
            options,
            images,
        }
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

/// The blob `descriptor` names in `layout`, after checking its digest and size against its content.
fn blob(layout: &Path, descriptor: &Value) -> Vec<u8> {
    let digest = descriptor["digest"].as_str().unwrap();
    let hex = digest.strip_prefix("sha256:").unwrap();
    let bytes = fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(sha256_hex(&bytes), hex, "blob {digest} has another digest");
    assert_eq!(
        Some(bytes.len() as u64),
        descriptor["size"].as_u64(),
        "size of blob {digest}"
    );
    bytes
}

/// Every regular file below `dir`, as paths from `dir`, and their total size.
fn files(dir: &Path) -> (BTreeSet<PathBuf>, u64) {
    let mut found = BTreeSet::new();
    let mut bytes = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in fs::read_dir(&next).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                bytes += entry.metadata().unwrap().len();
                found.insert(entry.path().strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    (found, bytes)
}

/// Runs `args` inside `rootfs` as the image's user with the image's environment: `chroot` as root (as CI
/// runs), in a user namespace (`unshare -r --root`) otherwise.
fn run_inside(rootfs: &Path, env: &[Value], args: &[&str]) -> Output {
    let rootfs = rootfs.to_str().unwrap();
    let root = is_root();
    let mut command = if root {
        let mut c = Command::new(on_path("chroot"));
        c.arg(format!("--userspec={USER}")).arg(rootfs);
        c
    } else {
        let mut c = Command::new(on_path("unshare"));
        c.args(["--map-root-user", &format!("--root={rootfs}")]);
        c
    };
    command.args(args).env_clear();
    for pair in env {
        let (key, value) = pair.as_str().unwrap().split_once('=').unwrap();
        command.env(key, value);
    }
    command.output().unwrap()
}

/// `program`'s path on this process's `PATH` (the command's own environment is the image's).
fn on_path(program: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{program} is not on PATH"))
}

fn is_root() -> bool {
    String::from_utf8(succeeded("id", &["-u"]).stdout)
        .unwrap()
        .trim()
        == "0"
}

#[test]
fn each_image_is_whole_names_its_entrypoint_user_and_labels_and_runs_inside_its_own_root() {
    let built = built();
    let revision = String::from_utf8(
        succeeded(
            "git",
            &["-C", workspace().to_str().unwrap(), "rev-parse", "HEAD"],
        )
        .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let scratch = tempfile::tempdir().unwrap();
    for (component, image) in COMPONENTS.into_iter().zip(&built.images) {
        // The oci-archive, the file people load, holds the layout.
        let layout = scratch.path().join(component);
        fs::create_dir(&layout).unwrap();
        let archive = built.dir.join(format!("{component}.oci.tar"));
        succeeded(
            "tar",
            &[
                "-xf",
                archive.to_str().unwrap(),
                "-C",
                layout.to_str().unwrap(),
            ],
        );
        let index_bytes = fs::read(layout.join("index.json")).unwrap();
        assert_eq!(
            index_bytes,
            fs::read(built.dir.join(component).join("index.json")).unwrap()
        );
        assert_eq!(
            json(&fs::read(layout.join("oci-layout")).unwrap())["imageLayoutVersion"],
            "1.0.0"
        );

        let index = json(&index_bytes);
        assert_eq!(
            index["mediaType"],
            "application/vnd.oci.image.index.v1+json"
        );
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 1, "{component}: {index}");
        let descriptor = &manifests[0];
        assert_eq!(descriptor["digest"], image.digest.as_str());
        assert_eq!(
            descriptor["platform"],
            serde_json::json!({"architecture": "amd64", "os": "linux"})
        );
        let annotations = &descriptor["annotations"];
        assert_eq!(annotations["org.opencontainers.image.ref.name"], VERSION);
        assert_eq!(
            annotations["io.containerd.image.name"],
            image.reference.as_str()
        );

        let manifest = json(&blob(&layout, descriptor));
        assert_eq!(
            manifest["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(
            manifest["config"]["mediaType"],
            "application/vnd.oci.image.config.v1+json"
        );
        let config = json(&blob(&layout, &manifest["config"]));
        assert_eq!(config["architecture"], "amd64", "{component}");
        assert_eq!(config["os"], "linux", "{component}");
        let settings = &config["config"];
        assert_eq!(settings["User"], USER, "{component}");
        let entrypoint = format!("/usr/local/bin/{component}");
        assert_eq!(settings["Entrypoint"], serde_json::json!([entrypoint]));
        let labels = &settings["Labels"];
        assert_eq!(labels["org.opencontainers.image.source"], SOURCE);
        assert_eq!(labels["org.opencontainers.image.version"], VERSION);
        assert_eq!(
            labels["org.opencontainers.image.revision"],
            revision.as_str()
        );
        assert_eq!(labels["org.opencontainers.image.title"], component);
        assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
        assert_eq!(&manifest["annotations"], labels);

        // Every layer: its digest is the compressed content's, its diff_id the uncompressed content's.
        let layers = manifest["layers"].as_array().unwrap();
        let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
        assert_eq!(layers.len(), diff_ids.len(), "{component}");
        let mut layer_bytes = 0;
        for (layer, diff_id) in layers.iter().zip(diff_ids) {
            assert_eq!(
                layer["mediaType"],
                "application/vnd.oci.image.layer.v1.tar+gzip"
            );
            blob(&layout, layer);
            layer_bytes += layer["size"].as_u64().unwrap();
            let hex = layer["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:");
            let path = layout.join("blobs/sha256").join(hex);
            let tar = succeeded("gzip", &["-dc", path.to_str().unwrap()]).stdout;
            assert_eq!(
                diff_id.as_str().unwrap(),
                format!("sha256:{}", sha256_hex(&tar))
            );
        }
        assert_eq!(layer_bytes, image.layer_bytes);

        // Unpacked by umoci, the binary runs in its own root, as the image's user: every library it
        // needs is there, and only those (ldd of the image's binary, on this machine, names them).
        let bundle = scratch.path().join(format!("{component}.bundle"));
        let image_ref = format!("{}:{VERSION}", layout.to_str().unwrap());
        succeeded(
            "umoci",
            &["unpack", "--image", &image_ref, bundle.to_str().unwrap()],
        );
        let rootfs = bundle.join("rootfs");
        let passwd = fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
        assert!(
            passwd.contains("\nlockstep:x:65532:65532:"),
            "{component}: {passwd}"
        );
        let certificates =
            fs::read_to_string(rootfs.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
        assert!(certificates.contains("-----BEGIN CERTIFICATE-----"));
        let binary = rootfs.join(entrypoint.trim_start_matches('/'));
        let ldd = String::from_utf8(succeeded("ldd", &[binary.to_str().unwrap()]).stdout).unwrap();
        let linked: BTreeSet<PathBuf> = ldd
            .split_whitespace()
            .filter(|word| word.starts_with('/'))
            .map(|path| Path::new(path).strip_prefix("/").unwrap().to_path_buf())
            .collect();
        let (contents, unpacked_bytes) = files(&rootfs);
        let libraries: BTreeSet<PathBuf> = contents
            .iter()
            .filter(|path| path.to_string_lossy().contains(".so"))
            .cloned()
            .collect();
        assert_eq!(libraries, linked, "{component}: the image's libraries");

        let env = settings["Env"].as_array().unwrap();
        let version = run_inside(&rootfs, env, &[&entrypoint, "--version"]);
        assert!(version.status.success(), "{component}: {}", text(&version));
        assert_eq!(
            String::from_utf8_lossy(&version.stdout),
            format!("{component} {VERSION}\n")
        );

        // Without a library it links, the same run fails, naming it: the run above proves they are there.
        let libgcc = linked
            .iter()
            .find(|path| path.ends_with("libgcc_s.so.1"))
            .unwrap_or_else(|| panic!("{component} does not link libgcc_s: {ldd}"));
        fs::remove_file(rootfs.join(libgcc)).unwrap();
        let broken = run_inside(&rootfs, env, &[&entrypoint, "--version"]);
        assert!(!broken.status.success(), "{component} ran without libgcc_s");
        assert!(text(&broken).contains("libgcc_s.so.1"), "{}", text(&broken));

        report(&format!(
            "{} {}: {:.1} MB compressed, {:.1} MB unpacked (debug binaries; `scripts/images.sh OUT` builds release ones)",
            image.reference,
            image.digest,
            layer_bytes as f64 / 1e6,
            unpacked_bytes as f64 / 1e6
        ));
    }
}

#[test]
fn the_chart_with_default_values_names_exactly_the_built_operator_and_sidecar_images() {
    let built = built();
    let helm = std::env::var_os("LOCKSTEP_TOOLS")
        .map(|dir| PathBuf::from(dir).join("bin/helm"))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("helm"));
    let chart = workspace().join("deploy/helm/lockstep");
    // clusterName has no default: the chart refuses to render without it.
    let rendered = succeeded(
        &helm,
        &[
            "template",
            "lockstep",
            chart.to_str().unwrap(),
            "--namespace",
            "lockstep",
            "--set",
            "clusterName=east",
        ],
    );
    let mut named = BTreeSet::new();
    for document in serde_yaml_ng::Deserializer::from_slice(&rendered.stdout) {
        let document: serde_json::Value = serde::Deserialize::deserialize(document).unwrap();
        collect_images(&document, &mut named);
    }
    let expected: BTreeSet<String> = built
        .images
        .iter()
        .filter(|image| !image.reference.contains("/lockstep-replicator:"))
        .map(|image| image.reference.clone())
        .collect();
    assert_eq!(named, expected);
}

/// Every `image` a container of `value` names.
fn collect_images(value: &Value, named: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if key == "containers" || key == "initContainers" {
                    for container in child.as_array().into_iter().flatten() {
                        if let Some(image) = container["image"].as_str() {
                            named.insert(image.to_string());
                        }
                    }
                }
                collect_images(child, named);
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_images(item, named)),
        _ => {}
    }
}

#[test]
fn the_same_commit_and_binaries_build_the_same_images() {
    let built = built();
    let again = tempfile::tempdir().unwrap();
    let images = build(again.path(), &built.options);
    assert_eq!(images, built.images);
    for component in COMPONENTS {
        let archive = format!("{component}.oci.tar");
        assert!(
            fs::read(again.path().join(&archive)).unwrap()
                == fs::read(built.dir.join(&archive)).unwrap(),
            "{archive} differs between two builds"
        );
    }
}
