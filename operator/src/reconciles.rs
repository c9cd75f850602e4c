//! The reconciles a group's changes start: at most one runs per group. A change that arrives while one
//! runs waits, replacing any change waiting before it, and the latest one is reconciled when the running
//! one ends (as kube-runtime's controller does). The reconcile stays level-triggered — the group's last
//! state is always reconciled after its last change — but a burst of status writes (one per decision
//! while thousands of volumes acknowledge a freeze) costs two reconciles, not one each: every reconcile
//! resolves every member volume and takes the group's decision lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lockstep_api::v1alpha1::ConsistencyGroup;

/// Which groups have a reconcile running, and the change waiting behind each.
#[derive(Debug, Default)]
pub struct Reconciles {
    /// By group UID: present while a reconcile runs; the change waiting for it to end, if any.
    running: Mutex<HashMap<String, Option<ConsistencyGroup>>>,
}

impl Reconciles {
    /// A change to the group with `uid`: returns it when it is to be reconciled now (none runs); `None`
    /// when it waits for the running one (replacing an older change waiting).
    pub fn offer(&self, uid: &str, group: ConsistencyGroup) -> Option<ConsistencyGroup> {
        let mut running = self.lock();
        match running.get_mut(uid) {
            Some(waiting) => {
                *waiting = Some(group);
                None
            }
            None => {
                running.insert(uid.to_owned(), None);
                Some(group)
            }
        }
    }

    /// A reconcile of `uid` ended: the change that waited for it, to reconcile next, or `None` — and
    /// then none runs any more.
    pub fn next(&self, uid: &str) -> Option<ConsistencyGroup> {
        let mut running = self.lock();
        let waiting = running.get_mut(uid)?.take();
        if waiting.is_none() {
            running.remove(uid);
        }
        waiting
    }

    /// Forgets a running reconcile that ended without [`Self::next`] (it panicked): the group's next
    /// change starts one again.
    fn abandon(&self, uid: &str) {
        self.lock().remove(uid);
    }

    /// How many groups have a reconcile running.
    #[cfg(test)]
    fn running(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<ConsistencyGroup>>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Held by the task running a group's reconciles: should that task panic, the group is not left marked
/// as running for good.
pub struct RunningReconcile {
    reconciles: Arc<Reconciles>,
    uid: String,
}

impl RunningReconcile {
    /// The guard of the reconciles of `uid` that [`Reconciles::offer`] let run.
    pub fn new(reconciles: Arc<Reconciles>, uid: String) -> Self {
        Self { reconciles, uid }
    }

    /// The next change to reconcile (see [`Reconciles::next`]).
    pub fn next(&self) -> Option<ConsistencyGroup> {
        self.reconciles.next(&self.uid)
    }
}

impl Drop for RunningReconcile {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.reconciles.abandon(&self.uid);
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    fn group(resource_version: &str) -> ConsistencyGroup {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "lockstep.dev/v1alpha1",
            "kind": "ConsistencyGroup",
            "metadata": {"name": "orders-db", "resourceVersion": resource_version},
            "spec": {"members": [{"cluster": "east", "namespace": "orders", "pvcNames": ["wal"]}]},
        }))
        .expect("a valid ConsistencyGroup")
    }

    fn version(group: Option<ConsistencyGroup>) -> Option<String> {
        group.and_then(|g| g.metadata.resource_version)
    }

    #[test]
    fn changes_during_a_reconcile_wait_and_only_the_latest_is_reconciled_next() {
        let reconciles = Reconciles::default();
        assert_eq!(
            version(reconciles.offer("a", group("1"))).as_deref(),
            Some("1")
        );
        assert!(reconciles.offer("a", group("2")).is_none());
        assert!(reconciles.offer("a", group("3")).is_none());
        // Another group is not held back.
        assert_eq!(
            version(reconciles.offer("b", group("7"))).as_deref(),
            Some("7")
        );
        assert_eq!(reconciles.running(), 2);
        assert_eq!(version(reconciles.next("a")).as_deref(), Some("3"));
        assert!(reconciles.next("a").is_none());
        assert_eq!(reconciles.running(), 1);
        // Nothing runs for "a" any more: its next change is reconciled at once.
        assert_eq!(
            version(reconciles.offer("a", group("4"))).as_deref(),
            Some("4")
        );
    }

    #[test]
    fn a_reconcile_task_that_panics_does_not_leave_its_group_running() {
        let reconciles = Arc::new(Reconciles::default());
        assert!(reconciles.offer("a", group("1")).is_some());
        let guard = RunningReconcile::new(reconciles.clone(), "a".to_owned());
        let panicked = std::thread::spawn(move || {
            let _guard = guard;
            panic!("reconcile panicked");
        })
        .join();
        assert!(panicked.is_err());
        assert_eq!(reconciles.running(), 0);
        assert!(reconciles.offer("a", group("2")).is_some());
    }

    #[test]
    fn a_guard_dropped_normally_leaves_the_bookkeeping_to_next() {
        let reconciles = Arc::new(Reconciles::default());
        assert!(reconciles.offer("a", group("1")).is_some());
        let guard = RunningReconcile::new(reconciles.clone(), "a".to_owned());
        assert!(reconciles.offer("a", group("2")).is_none());
        assert_eq!(version(guard.next()).as_deref(), Some("2"));
        drop(guard);
        // The change handed out by next() is running: a newer one waits for it.
        assert!(reconciles.offer("a", group("3")).is_none());
    }
}
