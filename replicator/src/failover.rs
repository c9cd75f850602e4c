//! Disaster recovery where the secondaries are (issue 33): promoting secondary volumes to primaries from
//! the image of a freeze, and replicating them back to the old site once it returns.
//!
//! - **Promote** (group, epoch): each volume must have no live replication stream (its primary is
//!   suspended or gone) and keep either no image or the image of exactly that epoch (a kept image of
//!   another epoch means the image of `epoch` is not complete). A kept image is rolled back first. The
//!   volume is then served as a primary at this site ([`Volume`], exported over this site's NBD),
//!   running released at `epoch` with every change tracked in its dirty map — the map starts with the
//!   ranges the roll-back restored, which the old site holds newer data in. A marker file
//!   `.NAME.promoted.json` beside the volume records the promotion, so a restarted secondary serves it
//!   again and refuses replication streams for it.
//! - **Reverse** (peer, the old site's changes after the image): the promoted volume replicates to the
//!   old site's secondary (started over the fenced old primary's files), resynchronising what changed
//!   here since the promotion plus what the old site wrote after the image; those old-site ranges are
//!   reported as discarded.
//! - A promoted volume takes no replication stream until it is fenced; the first stream for a fenced
//!   one (the reverse replication of a planned switch back) demotes it: it is no longer exported and
//!   its marker goes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::copy::CopyConfig;
use crate::events::Event;
use crate::hold::{DirectiveError, Persisted, Stage};
use crate::link_tls::LinkSecurity;
use crate::nbd::Exports;
use crate::secondary::Registry;
use crate::undo::UndoError;
use crate::volume::{
    DEFAULT_HOLD_TIMEOUT, Volume, VolumeConfig, VolumeError, replace_durably, state_path,
};
use crate::wire::valid_volume_name;

/// What a promotion recorded (the marker file beside the volume).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotionRecord {
    /// The group.
    pub group_uid: String,
    /// The epoch of the image the volume was promoted from.
    pub epoch: u64,
    /// The ranges the roll-back to the kept image restored `(offset, length)`: the old site wrote them
    /// after the image.
    pub rolled_back: Vec<(u64, u64)>,
    /// When, in milliseconds since the Unix epoch.
    pub promoted_unix_ms: u64,
}

/// The marker of volume `name`'s promotion in directory `dir`.
pub fn promotion_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.promoted.json"))
}

/// Why a failover request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// No such secondary volume here.
    #[error("no secondary volume {volume} in {dir}")]
    NoVolume {
        /// The volume.
        volume: String,
        /// The secondary's directory.
        dir: String,
    },
    /// The request does not apply in the volume's state; the text says why.
    #[error("{0}")]
    Refused(String),
    /// The kept image could not be restored.
    #[error("rolling volume {volume} back to its kept image: {source}")]
    RollBack {
        /// The volume.
        volume: String,
        /// Why.
        source: UndoError,
    },
    /// A file could not be written or read.
    #[error("volume {volume}: {what}: {why}")]
    File {
        /// The volume.
        volume: String,
        /// What was being done.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// The promoted volume could not be served.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The promoted volume refused a directive.
    #[error(transparent)]
    Directive(#[from] DirectiveError),
}

/// One promoted volume, as a promotion answers.
#[derive(Debug, Clone)]
pub struct Promoted {
    /// The volume served.
    pub volume: Arc<Volume>,
    /// The epoch of the image it was promoted from.
    pub epoch: u64,
    /// The ranges the roll-back restored.
    pub rolled_back: Vec<(u64, u64)>,
}

/// How promoted volumes are served and replicated.
#[derive(Debug, Clone)]
pub struct PromotedSettings {
    /// How long a write may wait for the old site's acknowledgement once reversed.
    pub copy_timeout: Duration,
    /// How long a held write waits before it fails.
    pub hold_timeout: Duration,
    /// The link's security towards the old site (this secondary's own certificate).
    pub security: LinkSecurity,
}

/// The failover side of a secondary: its promoted volumes, exported for applications.
#[derive(Debug)]
pub struct Site {
    dir: PathBuf,
    registry: Arc<Registry>,
    exports: Exports,
    events: broadcast::Sender<Event>,
    records: Mutex<BTreeMap<String, PromotionRecord>>,
    settings: Mutex<PromotedSettings>,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Merges `(offset, length)` ranges into sorted, disjoint ones.
pub fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|(_, length)| *length > 0);
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (offset, length) in ranges {
        let end = offset.saturating_add(length);
        match merged.last_mut() {
            Some((at, len)) if offset <= at.saturating_add(*len) => {
                *len = (*len).max(end - *at);
            }
            _ => merged.push((offset, length)),
        }
    }
    merged
}

impl Site {
    pub(crate) fn new(dir: PathBuf, registry: Arc<Registry>, security: LinkSecurity) -> Site {
        let (events, _) = broadcast::channel(1024);
        Site {
            dir,
            registry,
            exports: Exports::default(),
            events,
            records: Mutex::new(BTreeMap::new()),
            settings: Mutex::new(PromotedSettings {
                copy_timeout: Duration::from_secs(5),
                hold_timeout: DEFAULT_HOLD_TIMEOUT,
                security,
            }),
        }
    }

    /// The promoted volumes, as exported.
    pub fn exports(&self) -> &Exports {
        &self.exports
    }

    /// The promoted volumes' replication events.
    pub fn events(&self) -> &broadcast::Sender<Event> {
        &self.events
    }

    /// The secondary's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sets how promoted volumes are served and replicated (applies to volumes promoted or reversed from
    /// now on).
    pub fn set_settings(&self, copy_timeout: Duration, hold_timeout: Duration) {
        let mut settings = self.settings.lock().unwrap_or_else(PoisonError::into_inner);
        settings.copy_timeout = copy_timeout;
        settings.hold_timeout = hold_timeout;
    }

    fn settings(&self) -> PromotedSettings {
        self.settings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn record(&self, name: &str) -> Option<PromotionRecord> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// The epoch of the image volume `name` was promoted from, if it is promoted here.
    pub fn promoted_epoch(&self, name: &str) -> Option<u64> {
        self.record(name).map(|r| r.epoch)
    }

    /// Whether `name` names a secondary volume's file here (not a state file beside one).
    fn is_volume_file(&self, name: &str) -> bool {
        valid_volume_name(name)
            && !name.ends_with(".lockstep.json")
            && !name.ends_with(".json.tmp")
            && self.dir.join(name).is_file()
    }

    /// Whether volume `name` is a secondary here (its file exists and it is not promoted).
    pub fn is_replica(&self, name: &str) -> bool {
        self.is_volume_file(name) && self.record(name).is_none()
    }

    /// The secondary volumes here that are not promoted.
    pub fn replicas(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| self.is_replica(name))
            .collect();
        names.sort();
        names
    }

    /// The epoch of the image volume `name` keeps, if any.
    pub fn kept_image(&self, name: &str) -> Option<u64> {
        crate::undo::kept_epoch(&self.dir, name).ok().flatten()
    }

    /// Serves again the volumes promoted before a restart (their marker files).
    pub fn restore(&self) -> Result<(), FailoverError> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let file = entry.file_name();
            let Some(name) = file
                .to_str()
                .and_then(|f| f.strip_prefix('.'))
                .and_then(|f| f.strip_suffix(".promoted.json"))
            else {
                continue;
            };
            if !valid_volume_name(name) {
                continue;
            }
            let record = read_record(&self.dir, name)?;
            let volume = self.open(name)?;
            tracing::info!(
                volume = name,
                epoch = record.epoch,
                fenced = ?volume.fenced(),
                "serving the volume promoted before the restart"
            );
            self.records
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(name.to_owned(), record);
            self.exports.insert(volume);
        }
        Ok(())
    }

    fn open(&self, name: &str) -> Result<Arc<Volume>, FailoverError> {
        let settings = self.settings();
        let config = VolumeConfig {
            hold_timeout: settings.hold_timeout,
            track_changes: true,
            ..VolumeConfig::new(name, self.dir.join(name), None, None)
        };
        Ok(Volume::open(config, self.events.clone())?)
    }

    /// Whether a replication stream for volume `name` may be served now (called holding the volume's
    /// lease). A promoted volume is refused unless fenced; a fenced one is demoted first (no longer
    /// exported, its marker removed), so the stream makes it a secondary again.
    pub(crate) fn admit_stream(&self, name: &str) -> Result<(), String> {
        if !promotion_path(&self.dir, name).exists() {
            return Ok(());
        }
        let record = self.record(name);
        let volume = self.exports.get(name).filter(|v| v.name() == name);
        match (&record, volume.as_ref().and_then(|v| v.fenced())) {
            (Some(_), Some(fenced)) => {
                self.exports.remove(name);
                self.records
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(name);
                let marker = promotion_path(&self.dir, name);
                std::fs::remove_file(&marker)
                    .and_then(|()| crate::volume::sync_parent(&marker))
                    .map_err(|e| format!("volume {name}: removing {}: {e}", marker.display()))?;
                tracing::warn!(
                    volume = name,
                    fenced,
                    "the promoted volume, fenced, becomes a secondary again: a primary streams to it"
                );
                Ok(())
            }
            _ => Err(format!(
                "volume {name} was promoted here{} and serves writes at this site: it takes no \
                 replication stream until it is fenced",
                record.map_or(String::new(), |r| format!(
                    " from the image of epoch {}",
                    r.epoch
                ))
            )),
        }
    }

    /// Promotes the named secondary volumes of `group` from the image of `epoch` (see the module
    /// documentation). Every volume is checked before any is changed; one already promoted at the same
    /// (group, epoch) is answered as it is. With `primary_site_lost`, a replication stream still open
    /// is cut rather than refused (a half-open connection from a partitioned site never closes).
    pub async fn promote(
        &self,
        group: &str,
        epoch: u64,
        names: &[String],
        primary_site_lost: bool,
    ) -> Result<Vec<Promoted>, FailoverError> {
        if group.is_empty() {
            return Err(FailoverError::Invalid("the request names no group".into()));
        }
        if names.is_empty() {
            return Err(FailoverError::Invalid("the request names no volume".into()));
        }
        let mut todo: Vec<String> = Vec::new();
        let mut answers = Vec::new();
        let mut unique: Vec<&String> = Vec::new();
        for name in names {
            if !unique.contains(&name) {
                unique.push(name);
            }
        }
        for name in unique {
            match self.check_promotable(group, epoch, name, primary_site_lost)? {
                Some(done) => answers.push(done),
                None => todo.push(name.clone()),
            }
        }
        for name in todo {
            answers.push(self.promote_one(group, epoch, &name).await?);
        }
        Ok(answers)
    }

    /// `Some` when `name` is already promoted at (group, epoch); `None` when it may be promoted.
    fn check_promotable(
        &self,
        group: &str,
        epoch: u64,
        name: &str,
        primary_site_lost: bool,
    ) -> Result<Option<Promoted>, FailoverError> {
        if !self.is_volume_file(name) {
            return Err(FailoverError::NoVolume {
                volume: quoted(name),
                dir: self.dir.display().to_string(),
            });
        }
        if let Some(record) = self.record(name) {
            let volume = self.exports.get(name).filter(|v| v.name() == name);
            return match volume {
                Some(volume) if record.group_uid == group && record.epoch == epoch => {
                    Ok(Some(Promoted {
                        volume,
                        epoch,
                        rolled_back: record.rolled_back,
                    }))
                }
                _ => Err(FailoverError::Refused(format!(
                    "volume {name} is already promoted, for group {:?} from the image of epoch {}",
                    record.group_uid, record.epoch
                ))),
            };
        }
        if self.registry.streaming(name) && !primary_site_lost {
            return Err(FailoverError::Refused(format!(
                "volume {name} is not suspended: its primary still streams writes to it (a \
                 replication connection is open); freeze the group at epoch {epoch} before \
                 promoting, or say the primary site is lost (primary_site_lost) to cut the stream"
            )));
        }
        match crate::undo::kept_epoch(&self.dir, name) {
            Ok(Some(kept)) if kept != epoch => Err(FailoverError::Refused(format!(
                "volume {name} has no complete image of epoch {epoch}: a resync started after the \
                 freeze of epoch {kept}, whose image it keeps; promote from epoch {kept}"
            ))),
            Ok(_) => Ok(None),
            Err(source) => Err(FailoverError::RollBack {
                volume: name.to_owned(),
                source,
            }),
        }
    }

    async fn promote_one(
        &self,
        group: &str,
        epoch: u64,
        name: &str,
    ) -> Result<Promoted, FailoverError> {
        // Hold the volume's lease (cutting a stream still open): no replication stream is served
        // while it is promoted, and once the marker exists every stream is refused.
        let lock = self.registry.take_over(name);
        let _lease = lock.lock_owned().await;
        let rolled = {
            let (dir, volume) = (self.dir.clone(), name.to_owned());
            tokio::task::spawn_blocking(move || crate::undo::roll_back_reporting(&dir, &volume))
                .await
                .map_err(|e| FailoverError::File {
                    volume: name.to_owned(),
                    what: "rolling back",
                    why: format!("the roll-back task stopped: {e}"),
                })?
                .map_err(|source| FailoverError::RollBack {
                    volume: name.to_owned(),
                    source,
                })?
        };
        let rolled_back = match rolled {
            Some(report) if report.done.epoch == epoch => merge_ranges(report.restored),
            Some(crate::undo::RollBackReport { done, .. }) => {
                return Err(FailoverError::Refused(format!(
                    "volume {name} kept the image of epoch {}, not {epoch}; it is rolled back to \
                     that image: promote from epoch {}",
                    done.epoch, done.epoch
                )));
            }
            None => Vec::new(),
        };
        let settings = self.settings();
        let state = Persisted {
            group_uid: group.to_owned(),
            epoch,
            stage: Some(Stage::Release),
            mode: "running".into(),
            fail_safe: false,
            hold_timeout_ms: u64::try_from(settings.hold_timeout.as_millis()).unwrap_or(u64::MAX),
            dirty: rolled_back.clone(),
            fenced: None,
            active: Vec::new(),
        };
        let record = PromotionRecord {
            group_uid: group.to_owned(),
            epoch,
            rolled_back: rolled_back.clone(),
            promoted_unix_ms: now_unix_ms(),
        };
        let data = self.dir.join(name);
        write_json(
            name,
            &state_path(&data),
            &state,
            "writing the promoted state",
        )?;
        write_json(
            name,
            &promotion_path(&self.dir, name),
            &record,
            "writing the promotion marker",
        )?;
        let volume = self.open(name)?;
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), record);
        self.exports.insert(Arc::clone(&volume));
        tracing::warn!(
            volume = name,
            group,
            epoch,
            rolled_back_ranges = rolled_back.len(),
            "promoted: served as a primary at this site from the image of the epoch"
        );
        Ok(Promoted {
            volume,
            epoch,
            rolled_back,
        })
    }

    /// Replicates the named promoted volumes of `group` to `peer` (the old site's secondary) from
    /// `epoch` on, resynchronising what changed here plus `old_site_changes` (what the old site wrote
    /// after the image, per volume) and what the promotion rolled back. Returns, per volume, the
    /// old-site ranges discarded (overwritten with this site's data).
    pub async fn reverse(
        &self,
        group: &str,
        epoch: u64,
        peer: &str,
        names: &[String],
        old_site_changes: &BTreeMap<String, Vec<(u64, u64)>>,
    ) -> Result<Vec<(Arc<Volume>, Vec<(u64, u64)>)>, FailoverError> {
        if !valid_peer(peer) {
            return Err(FailoverError::Invalid(format!(
                "the peer must be the old site's secondary as host:port, not {}",
                quoted(peer)
            )));
        }
        if let Some(stranger) = old_site_changes.keys().find(|v| !names.contains(v)) {
            return Err(FailoverError::Invalid(format!(
                "old-site changes for volume {}, which the request does not name",
                quoted(stranger)
            )));
        }
        let mut plan = Vec::new();
        for name in names {
            let (Some(record), Some(volume)) = (
                self.record(name),
                self.exports.get(name).filter(|v| v.name() == name),
            ) else {
                return Err(FailoverError::Refused(format!(
                    "volume {} is not promoted here: only a promoted volume replicates back to the \
                     old site",
                    quoted(name)
                )));
            };
            if record.group_uid != group {
                return Err(FailoverError::Refused(format!(
                    "volume {name} was promoted for group {:?}, not {group:?}",
                    record.group_uid
                )));
            }
            if epoch < record.epoch {
                return Err(FailoverError::Refused(format!(
                    "volume {name} was promoted from the image of epoch {}: the reverse replication \
                     resumes at that epoch or later, not {epoch}",
                    record.epoch
                )));
            }
            if let Some(fenced) = volume.fenced() {
                return Err(FailoverError::Refused(format!(
                    "volume {name} is fenced since epoch {fenced}: it replicates to nobody"
                )));
            }
            let changes = old_site_changes.get(name).cloned().unwrap_or_default();
            if let Some((offset, length)) = changes.iter().find(|(offset, length)| {
                offset
                    .checked_add(*length)
                    .is_none_or(|end| end > volume.size())
            }) {
                return Err(FailoverError::Invalid(format!(
                    "old-site change of volume {name} at {offset} (+{length}) is outside the \
                     volume ({} bytes)",
                    volume.size()
                )));
            }
            let discarded = merge_ranges([changes, record.rolled_back.clone()].concat());
            plan.push((volume, discarded));
        }
        let settings = self.settings();
        for (volume, discarded) in &plan {
            volume.add_dirty(discarded).await?;
            volume.set_secondary(CopyConfig {
                secondary: peer.to_owned(),
                timeout: settings.copy_timeout,
                security: settings.security.clone(),
            });
            volume.resume(group, epoch).await?;
            let bytes: u64 = discarded.iter().map(|(_, length)| length).sum();
            tracing::warn!(
                volume = volume.name(),
                peer,
                epoch,
                discarded_bytes = bytes,
                "replicating back to the old site; its writes after the image are discarded"
            );
        }
        Ok(plan)
    }
}

/// `text` from a request, quoted for an answer and cut after 64 characters: an answer's status must
/// stay small enough for a gRPC client's headers.
pub(crate) fn quoted(text: &str) -> String {
    const SHOWN: usize = 64;
    if text.chars().nth(SHOWN).is_none() {
        return format!("{text:?}");
    }
    let head: String = text.chars().take(SHOWN).collect();
    format!("{head:?}… ({} bytes)", text.len())
}

/// Whether `peer` reads as `host:port` (a host name or address of at most 253 bytes, a port).
fn valid_peer(peer: &str) -> bool {
    peer.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && host.len() <= 253
            && !host.chars().any(|c| c.is_whitespace() || c.is_control())
            && port.parse::<u16>().is_ok_and(|p| p > 0)
    })
}

fn read_record(dir: &Path, name: &str) -> Result<PromotionRecord, FailoverError> {
    let path = promotion_path(dir, name);
    let bad = |why: String| FailoverError::File {
        volume: name.to_owned(),
        what: "reading the promotion marker",
        why: format!("{}: {why}", path.display()),
    };
    let bytes = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))
}

fn write_json(
    name: &str,
    path: &Path,
    value: &impl Serialize,
    what: &'static str,
) -> Result<(), FailoverError> {
    let failed = |why: String| FailoverError::File {
        volume: name.to_owned(),
        what,
        why: format!("{}: {why}", path.display()),
    };
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| failed(e.to_string()))?;
    let scratch = path.with_extension("json.tmp");
    replace_durably(path, &scratch, &bytes).map_err(|e| failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::{merge_ranges, valid_peer};

    #[test]
    fn a_peer_is_host_and_port() {
        assert!(valid_peer("127.0.0.1:7001"));
        assert!(valid_peer("[::1]:7001"));
        assert!(valid_peer("west-node-1.example:7001"));
        for bad in [
            "",
            "7001",
            "host:",
            ":7001",
            "host:0",
            "host:70000",
            "a b:1",
            "h\u{0}:1",
        ] {
            assert!(!valid_peer(bad), "{bad:?}");
        }
        assert!(!valid_peer(&format!("{}:1", "h".repeat(254))));
    }

    #[test]
    fn ranges_merge_into_sorted_disjoint_ones() {
        assert_eq!(
            merge_ranges(vec![(100, 10), (0, 50), (40, 20), (200, 0), (110, 5)]),
            vec![(0, 60), (100, 15)]
        );
        assert_eq!(merge_ranges(Vec::new()), Vec::new());
    }
}
