//! Reports of failed copies on both paths, until acknowledged.
//!
//! A failure is reported at once and concurrently on the API path (the `ReplicationNode` status) and the
//! gRPC path (`Control.Report`), each retried with [`Backoff`], until a higher epoch of its group is seen
//! by either path (DESIGN.md rule 4; the core then drops it from its outstanding failures). [`Reports`]
//! remembers which path delivered which failure: the fail-safe acts only for a failure that reached
//! neither path for the whole fail-safe interval.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lockstep_api::domain::Path;

use crate::enforce::Failure;

/// Exponential backoff between retries on one path: doubles from `min` to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff from `min` to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The delay before the next attempt; doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Back to the shortest delay after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

/// A failure's identity: the same failure keeps it until acknowledged.
pub type FailureKey = (String, String, u64);

/// The key of a failure.
pub fn key(failure: &Failure) -> FailureKey {
    (
        failure.group_uid.clone(),
        failure.volume.clone(),
        failure.epoch_seen,
    )
}

#[derive(Debug, Default)]
struct Entry {
    first_seen: Option<Instant>,
    delivered: BTreeSet<Path>,
}

/// Which path delivered which outstanding failure.
#[derive(Debug, Default)]
pub struct Reports {
    entries: Mutex<BTreeMap<FailureKey, Entry>>,
}

impl Reports {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<FailureKey, Entry>) -> T) -> T {
        match self.entries.lock() {
            Ok(mut guard) => f(&mut guard),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Tracks the outstanding failures (forgetting acknowledged ones), noting when each was first seen.
    pub fn track(&self, outstanding: &[Failure], now: Instant) {
        let keys: BTreeSet<FailureKey> = outstanding.iter().map(key).collect();
        self.with(|entries| {
            entries.retain(|k, _| keys.contains(k));
            for k in keys {
                entries.entry(k).or_default().first_seen.get_or_insert(now);
            }
        });
    }

    /// The outstanding failures a path has not delivered yet.
    pub fn pending(&self, outstanding: &[Failure], path: Path) -> Vec<Failure> {
        self.with(|entries| {
            outstanding
                .iter()
                .filter(|f| {
                    entries
                        .get(&key(f))
                        .is_none_or(|e| !e.delivered.contains(&path))
                })
                .cloned()
                .collect()
        })
    }

    /// Records that a path delivered these failures.
    pub fn delivered(&self, failures: &[Failure], path: Path) {
        self.with(|entries| {
            for f in failures {
                entries.entry(key(f)).or_default().delivered.insert(path);
            }
        });
    }

    /// True when some outstanding failure has reached neither path for at least the fail-safe interval of
    /// its group (`interval`, given the group UID).
    pub fn fail_safe_due(
        &self,
        outstanding: &[Failure],
        interval: impl Fn(&str) -> Duration,
        now: Instant,
    ) -> bool {
        self.with(|entries| {
            outstanding.iter().any(|f| {
                entries.get(&key(f)).is_some_and(|e| {
                    e.delivered.is_empty()
                        && e.first_seen.is_some_and(|t| {
                            now.saturating_duration_since(t) >= interval(&f.group_uid)
                        })
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(volume: &str, epoch: u64) -> Failure {
        Failure {
            volume: volume.into(),
            group_uid: "g".into(),
            epoch_seen: epoch,
            sequence: 1,
            error: "cut".into(),
            since_unix_ms: 0,
        }
    }

    #[test]
    fn backoff_doubles_to_its_ceiling_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 350, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn each_path_delivers_on_its_own_and_acknowledged_failures_are_forgotten() {
        let reports = Reports::new();
        let t0 = Instant::now();
        let out = vec![failure("a", 3), failure("b", 3)];
        reports.track(&out, t0);
        assert_eq!(reports.pending(&out, Path::Api).len(), 2);
        reports.delivered(&out[..1], Path::Api);
        assert_eq!(reports.pending(&out, Path::Api), vec![failure("b", 3)]);
        assert_eq!(reports.pending(&out, Path::Grpc).len(), 2);
        // Acknowledged (a higher epoch was seen): gone.
        reports.track(&[], t0);
        assert!(reports.pending(&[failure("a", 3)], Path::Api).len() == 1);
    }

    #[test]
    fn the_fail_safe_is_due_only_for_a_failure_no_path_delivered_for_the_interval() {
        let reports = Reports::new();
        let t0 = Instant::now();
        let out = vec![failure("a", 1)];
        reports.track(&out, t0);
        let interval = Duration::from_secs(2);
        assert!(!reports.fail_safe_due(&out, |_| interval, t0 + Duration::from_secs(1)));
        assert!(reports.fail_safe_due(&out, |_| interval, t0 + Duration::from_secs(2)));
        reports.delivered(&out, Path::Grpc);
        assert!(!reports.fail_safe_due(&out, |_| interval, t0 + Duration::from_secs(9)));
        // Tracking again keeps the first-seen time.
        let later = vec![failure("b", 1)];
        reports.track(&later, t0);
        reports.track(&later, t0 + Duration::from_secs(5));
        assert!(reports.fail_safe_due(&later, |_| interval, t0 + Duration::from_secs(3)));
    }
}
