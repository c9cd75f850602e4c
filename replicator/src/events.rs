//! Replication events the library publishes (a `tokio::sync::broadcast` channel per process).

use std::time::SystemTime;

/// Something about a volume's replication that its control system must hear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A write could not be copied to the secondary.
    CopyFailed(CopyFailed),
}

/// A copy to the secondary failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyFailed {
    /// The volume (its export name).
    pub volume: String,
    /// The first write sequence on this volume that was not copied: the oldest write waiting for the
    /// secondary when the failure was detected, or — if none was waiting — the next write's sequence.
    pub sequence: u64,
    /// What failed, for people.
    pub error: String,
    /// When the failure was detected.
    pub since: SystemTime,
}
