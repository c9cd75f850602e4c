//! Replication events the library publishes (a `tokio::sync::broadcast` channel per process).

use std::time::SystemTime;

use crate::volume::VolumeStatus;

/// Something about a volume's replication that its control system must hear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A write could not be copied to the secondary; it and every later write are held.
    CopyFailed(CopyFailed),
    /// Held writes outlived the hold timeout and failed with an I/O error.
    HoldTimedOut(HoldTimedOut),
    /// A volume's state changed (suspended, released, resynced, confirmed...).
    StateChanged(Box<VolumeStatus>),
}

/// A copy to the secondary failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyFailed {
    /// The volume (its export name).
    pub volume: String,
    /// The first write sequence on this volume that was not copied: the oldest write waiting for the
    /// secondary when the failure was detected, or — if none was waiting — the next write's sequence.
    pub sequence: u64,
    /// The volume's group ("" for none).
    pub group_uid: String,
    /// The epoch the replicator knew for the volume.
    pub epoch_known: u64,
    /// What failed, for people.
    pub error: String,
    /// When the failure was detected.
    pub since: SystemTime,
}

/// Held writes failed at the hold timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldTimedOut {
    /// The volume.
    pub volume: String,
    /// How many held writes failed.
    pub failed_writes: u64,
}
