//! Which primary a secondary volume belongs to: the identity (see [`crate::link_tls`]) of the primary
//! whose stream first created it, kept durably in `.NAME.owner` beside the volume file `NAME` (volume
//! names never start with a dot), so it survives a restart of the secondary.
//!
//! On an authenticated link a stream for a volume is accepted only from its owner; another primary is
//! refused with a message naming the volume and both identities. To give a volume to another primary
//! on purpose, [`release`] it (`lockstep-replicator release-volume --dir DIR --volume NAME`, or delete
//! `DIR/.NAME.owner`): the next primary to stream it owns it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// Why a stream for a volume was refused, or its owner could not be read or recorded.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    /// Another primary owns the volume.
    #[error(
        "volume {volume} belongs to primary {owner}; primary {claimant} is refused (to re-assign it on purpose: `lockstep-replicator release-volume --dir DIR --volume {volume}` on the secondary)"
    )]
    OtherPrimary {
        /// The volume.
        volume: String,
        /// The primary that owns it.
        owner: String,
        /// The primary that was refused.
        claimant: String,
    },
    /// The owner file could not be read or written.
    #[error("volume {volume}'s owner file {path}: {why}")]
    File {
        /// The volume.
        volume: String,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
}

/// The file recording volume `name`'s owner in `dir`.
pub fn owner_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.owner"))
}

fn file_error(dir: &Path, name: &str, why: impl std::fmt::Display) -> OwnerError {
    OwnerError::File {
        volume: name.to_owned(),
        path: owner_path(dir, name),
        why: why.to_string(),
    }
}

/// The identity owning volume `name`, if one does. An unreadable or empty file is an error (the
/// volume is then refused to everyone until it is released).
pub fn owner(dir: &Path, name: &str) -> Result<Option<String>, OwnerError> {
    match std::fs::read(owner_path(dir, name)) {
        Ok(bytes) => match std::str::from_utf8(&bytes).map(str::trim) {
            Ok(owner) if !owner.is_empty() => Ok(Some(owner.to_owned())),
            _ => Err(file_error(
                dir,
                name,
                "holds no identity (release the volume)",
            )),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file_error(dir, name, e)),
    }
}

/// Forgets volume `name`'s owner; returns who it was, if anyone.
pub fn release(dir: &Path, name: &str) -> Result<Option<String>, OwnerError> {
    // A broken file is released too: that is how it is mended.
    let previous = owner(dir, name).unwrap_or_else(|_| Some("(unreadable)".into()));
    match std::fs::remove_file(owner_path(dir, name)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file_error(dir, name, e)),
    }
    crate::volume::sync_parent(&owner_path(dir, name)).map_err(|e| file_error(dir, name, e))?;
    Ok(previous)
}

/// The owners of one secondary's volumes: checks and records them one claim at a time, and remembers
/// which refusals were already logged.
#[derive(Debug)]
pub struct Owners {
    dir: PathBuf,
    /// Held across a claim's read and write; holds the (claimant, volume) pairs refused so far.
    refused: Mutex<HashSet<(String, String)>>,
}

impl Owners {
    /// The owners of the volumes in `dir`.
    pub fn new(dir: &Path) -> Owners {
        Owners {
            dir: dir.to_path_buf(),
            refused: Mutex::new(HashSet::new()),
        }
    }

    /// Accepts `claimant`'s stream for volume `name` if it owns the volume, or makes it the owner if
    /// nobody does (recorded durably before this returns). A refusal is logged at WARN the first time
    /// for each claimant and volume, then at DEBUG (a refused primary keeps retrying).
    pub fn claim(&self, name: &str, claimant: &str) -> Result<(), OwnerError> {
        let mut refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        let result = match owner(&self.dir, name) {
            Ok(Some(owner)) if owner == claimant => {
                refused.remove(&(claimant.to_owned(), name.to_owned()));
                Ok(())
            }
            Ok(Some(owner)) => Err(OwnerError::OtherPrimary {
                volume: name.to_owned(),
                owner,
                claimant: claimant.to_owned(),
            }),
            Ok(None) => {
                let path = owner_path(&self.dir, name);
                let scratch = self.dir.join(format!(".{name}.owner.new"));
                crate::volume::replace_durably(&path, &scratch, format!("{claimant}\n").as_bytes())
                    .map_err(|e| file_error(&self.dir, name, e))?;
                tracing::info!(
                    volume = name,
                    owner = claimant,
                    "the volume now belongs to this primary"
                );
                Ok(())
            }
            Err(e) => Err(e),
        };
        if let Err(error) = &result {
            if refused.insert((claimant.to_owned(), name.to_owned())) {
                tracing::warn!(volume = name, primary = claimant, %error, "replication stream refused");
            } else {
                tracing::debug!(volume = name, primary = claimant, %error, "replication stream refused again");
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The log lines written while `f` runs (this thread only).
    fn logged(f: impl FnOnce()) -> String {
        let buffer = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = Arc::clone(&buffer);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || LogSink(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buffer.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    struct LogSink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for LogSink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_refusal_is_a_warning_once_per_primary_and_volume() {
        let dir = tempfile::tempdir().unwrap();
        let owners = Owners::new(dir.path());
        let log = logged(|| {
            owners.claim("vol1", "east-node-1").unwrap();
            for _ in 0..3 {
                let refused = owners.claim("vol1", "east-node-2").unwrap_err();
                assert!(matches!(refused, OwnerError::OtherPrimary { .. }));
            }
            owners.claim("vol1", "east-node-1").unwrap();
        });
        let warnings = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("replication stream refused"))
            .count();
        assert_eq!(warnings, 1, "{log}");
        assert_eq!(
            log.matches("replication stream refused again").count(),
            2,
            "{log}"
        );
        assert_eq!(
            owner(dir.path(), "vol1").unwrap().as_deref(),
            Some("east-node-1")
        );
    }

    #[test]
    fn an_empty_owner_file_refuses_everyone_until_released() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(owner_path(dir.path(), "vol1"), "\n").unwrap();
        let owners = Owners::new(dir.path());
        assert!(matches!(
            owners.claim("vol1", "east-node-1"),
            Err(OwnerError::File { .. })
        ));
        assert_eq!(
            release(dir.path(), "vol1").unwrap().as_deref(),
            Some("(unreadable)")
        );
        owners.claim("vol1", "east-node-1").unwrap();
        assert_eq!(
            release(dir.path(), "vol1").unwrap().as_deref(),
            Some("east-node-1")
        );
        assert_eq!(release(dir.path(), "vol1").unwrap(), None);
    }
}
