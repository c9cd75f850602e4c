//! Fault hooks for tests: hang every request (or only new watches), add latency, fail a fraction of requests with `500` or
//! `429`, drop open watches. (Refusing connections and stopping are on [`crate::TestApiServer`], since
//! they close the listener.) Health endpoints (`/healthz`, `/livez`, `/readyz`) are exempt from failures
//! and latency but not from a hang.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// Which error a failing request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// `500 InternalError`.
    InternalError,
    /// `429 TooManyRequests` with `Retry-After: 1`.
    TooManyRequests,
}

/// The fault switches of one server. Cheap to flip from tests at any time.
#[derive(Debug)]
pub struct Faults {
    hang: watch::Sender<bool>,
    hang_watches: watch::Sender<bool>,
    latency_ms: AtomicU64,
    fail_permille: AtomicU32,
    fail_code: AtomicU16,
    drops: watch::Sender<u64>,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            hang: watch::Sender::new(false),
            hang_watches: watch::Sender::new(false),
            latency_ms: AtomicU64::new(0),
            fail_permille: AtomicU32::new(0),
            fail_code: AtomicU16::new(500),
            drops: watch::Sender::new(0),
        }
    }
}

impl Faults {
    /// While `true`, requests are accepted but not answered (they are answered once it is `false` again,
    /// unless the client gave up).
    pub fn set_hang(&self, hang: bool) {
        self.hang.send_replace(hang);
    }

    /// While `true`, new watch requests wait before they start (other requests are answered): a watcher
    /// that lost its stream stays away while the test makes changes, e.g. to outrun the watch history.
    pub fn set_hang_watches(&self, hang: bool) {
        self.hang_watches.send_replace(hang);
    }

    /// Delay added before every request is handled.
    pub fn set_latency(&self, latency: Duration) {
        self.latency_ms.store(
            latency.as_millis().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    /// Fails about `fraction` (0.0–1.0) of the requests with `failure`. `0.0` turns it off.
    pub fn fail_requests(&self, fraction: f64, failure: Failure) {
        let permille = (fraction.clamp(0.0, 1.0) * 1000.0).round() as u32;
        let code = match failure {
            Failure::InternalError => 500,
            Failure::TooManyRequests => 429,
        };
        self.fail_code.store(code, Ordering::Relaxed);
        self.fail_permille.store(permille, Ordering::Relaxed);
    }

    /// Ends every open watch stream now (clients see the stream end and watch again).
    pub fn drop_watches(&self) {
        self.drops.send_modify(|n| *n += 1);
    }

    /// Clears every fault.
    pub fn clear(&self) {
        self.set_hang(false);
        self.set_hang_watches(false);
        self.set_latency(Duration::ZERO);
        self.fail_requests(0.0, Failure::InternalError);
    }

    pub(crate) fn watch_drops(&self) -> watch::Receiver<u64> {
        self.drops.subscribe()
    }

    /// Waits while watches are hung.
    pub(crate) async fn before_watch(&self) {
        let mut hang = self.hang_watches.subscribe();
        let _ = hang.wait_for(|h| !*h).await;
    }

    /// Waits while hung, then for the latency; returns the injected failure code, if this request fails.
    pub(crate) async fn before_request(&self, exempt: bool) -> Option<u16> {
        let mut hang = self.hang.subscribe();
        // The sender lives as long as `self`, so this only ends when the hang is lifted.
        let _ = hang.wait_for(|h| !*h).await;
        if exempt {
            return None;
        }
        let latency = self.latency_ms.load(Ordering::Relaxed);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        let permille = self.fail_permille.load(Ordering::Relaxed);
        if permille > 0 && (crate::random_u64() % 1000) < u64::from(permille) {
            return Some(self.fail_code.load(Ordering::Relaxed));
        }
        None
    }
}
