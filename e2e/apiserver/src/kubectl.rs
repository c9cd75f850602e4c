//! Finding the real `kubectl` that tests and the demo run against the test API server.
//!
//! `scripts/install-tools.sh` installs kubectl when the machine has none and prints an env file to
//! source; that file puts it on `PATH` and sets `LOCKSTEP_KUBECTL_DIR` to a directory of versioned
//! binaries `kubectl.1.NN` (the machine's own, or a link to the installed one). [`versions_dir`] and
//! [`versions`] find those; [`find`] picks one, falling back to plain `kubectl` on `PATH`.

use std::path::{Path, PathBuf};

/// Where machines with the Google Cloud SDK keep their versioned kubectl binaries.
const CLOUD_SDK_BIN: &str = "/usr/lib/google-cloud-sdk/bin";

/// No kubectl could be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no kubectl found (looked for kubectl.1.NN in {looked_in} and for kubectl on PATH): run \
     `source \"$(./scripts/install-tools.sh)\"` from the repository first"
)]
pub struct KubectlNotFound {
    /// The directory searched for versioned binaries.
    pub looked_in: String,
}

/// Which of several versioned binaries to pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// The oldest `kubectl.1.NN`.
    Oldest,
    /// The newest `kubectl.1.NN`.
    Newest,
}

/// The directory of versioned binaries: `LOCKSTEP_KUBECTL_DIR`, else the directory the `kubectl` on
/// `PATH` links into when it holds `kubectl.1.NN` files, else the Cloud SDK's.
pub fn versions_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LOCKSTEP_KUBECTL_DIR") {
        return PathBuf::from(dir);
    }
    match on_path().and_then(|p| p.parent().map(Path::to_path_buf)) {
        Some(dir) if !versions(&dir).is_empty() => dir,
        _ => PathBuf::from(CLOUD_SDK_BIN),
    }
}

/// The `kubectl.1.NN` binaries in `dir`, by minor version, oldest first.
pub fn versions(dir: &Path) -> Vec<(u32, PathBuf)> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().to_string();
                    let minor = name.strip_prefix("kubectl.1.")?.parse().ok()?;
                    Some((minor, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// The `kubectl` on `PATH`, links resolved.
pub fn on_path() -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|p| p.join("kubectl"))
        .find(|p| p.is_file())
        .and_then(|p| std::fs::canonicalize(p).ok())
}

/// The versioned binary `pick` names in [`versions_dir`], else the `kubectl` on `PATH`.
pub fn find(pick: Pick) -> Result<PathBuf, KubectlNotFound> {
    let dir = versions_dir();
    let all = versions(&dir);
    let versioned = match pick {
        Pick::Oldest => all.first(),
        Pick::Newest => all.last(),
    };
    versioned
        .map(|(_, p)| p.clone())
        .or_else(on_path)
        .ok_or_else(|| KubectlNotFound {
            looked_in: dir.display().to_string(),
        })
}
