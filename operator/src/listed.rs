//! Whether a reflector store has had its first complete list, for any number of waiting tasks.
//!
//! kube-runtime's `Store::wait_until_ready` (5.0) keeps a single waker: it polls one oneshot receiver
//! behind a mutex, so of several tasks waiting at once only the last one to poll is woken when the list
//! completes, and the others wait forever. The operator's resync loop and the first reconciles waited on
//! the MemberCluster store at once, and the resync loop could hang before its first tick: no
//! ReplicationNode watches, no periodic reconcile, and a resync that never got back to Replicating.
//!
//! [`Listed::watch`] starts the one task that waits on the store, and it publishes the answer through a
//! `watch` channel, which wakes every waiter.

use std::hash::Hash;

use kube::runtime::reflector::{Lookup, Store};
use tokio::{sync::watch, task::JoinHandle};

/// Whether a store has been listed once; cheap to clone.
#[derive(Debug, Clone)]
pub struct Listed(watch::Receiver<bool>);

impl Listed {
    /// Starts the task that waits for `store`'s first complete list. It ends then, or when the store's
    /// writer is dropped before it (and then [`Listed::wait`] answers false).
    pub fn watch<K>(store: Store<K>) -> (Listed, JoinHandle<()>)
    where
        K: Lookup + Clone + Send + Sync + 'static,
        K::DynamicType: Eq + Hash + Clone + Send + Sync,
    {
        let (listed, receiver) = watch::channel(false);
        let task = tokio::spawn(async move {
            if store.wait_until_ready().await.is_ok() {
                let _ = listed.send(true);
            }
        });
        (Listed(receiver), task)
    }

    /// Whether the first list has completed.
    pub fn is_listed(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits for the first list; false if it will never come (the store's writer is gone).
    pub async fn wait(&self) -> bool {
        self.0.clone().wait_for(|listed| *listed).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::{reflector, watcher};

    use super::*;

    const WAITERS: usize = 8;

    /// Spawns `WAITERS` tasks waiting at once (the way the resync loop and reconciles wait on the
    /// MemberCluster store) and returns once every one of them has parked in its wait: each counts
    /// itself and then waits in the same poll, on this single-threaded test runtime.
    async fn park_waiters<F>(wait: impl Fn() -> F) -> tokio::task::JoinHandle<bool>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let parked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let waiting: Vec<_> = (0..WAITERS)
            .map(|_| {
                let (parked, wait) = (parked.clone(), wait());
                tokio::spawn(async move {
                    parked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    wait.await;
                })
            })
            .collect();
        while parked.load(std::sync::atomic::Ordering::SeqCst) < WAITERS {
            tokio::task::yield_now().await;
        }
        // Whether all of them return once the list completes (the tests run on paused time: the
        // deadline passes as soon as every task is idle, without waiting for the clock).
        tokio::spawn(async move {
            let all = futures::future::join_all(waiting);
            tokio::time::timeout(Duration::from_secs(5), all)
                .await
                .is_ok()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn every_task_waiting_for_the_first_list_is_woken() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let (listed, _task) = Listed::watch(store);
        assert!(!listed.is_listed());
        let waiting = park_waiters(|| {
            let listed = listed.clone();
            async move { assert!(listed.wait().await) }
        })
        .await;
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        assert!(waiting.await.unwrap(), "a waiter was never woken");
    }

    /// The upstream behaviour this module exists for: if kube-runtime fixes it, this test fails and
    /// the module can go.
    #[tokio::test(start_paused = true)]
    async fn kube_runtime_wakes_only_one_of_several_tasks_waiting_on_a_store() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let waiting = park_waiters(|| {
            let store = store.clone();
            async move { store.wait_until_ready().await.unwrap() }
        })
        .await;
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        assert!(!waiting.await.unwrap(), "every waiter was woken");
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_whose_writer_is_gone_is_never_listed() {
        let (store, writer) = reflector::store::<ConfigMap>();
        let (listed, _task) = Listed::watch(store);
        drop(writer);
        assert!(!listed.wait().await);
        assert!(!listed.is_listed());
    }
}
