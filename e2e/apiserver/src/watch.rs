//! Watch streams: `?watch=true` answered as kube-apiserver does, one JSON event a line
//! (`{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":{...}}`), every change in commit order
//! exactly once.
//!
//! - No `resourceVersion` (or `0`): the current objects first, as synthetic `ADDED` events, then changes.
//! - `resourceVersion=N`: the changes after `N` from the kept history, then live ones; an `N` older than the
//!   history gets one `ERROR` event carrying a `410 Expired` Status (as kube-apiserver's watch cache does),
//!   and the stream ends.
//! - `sendInitialEvents=true`: the current objects as `ADDED`, then a `BOOKMARK` annotated
//!   `k8s.io/initial-events-end: "true"`.
//! - `allowWatchBookmarks=true`: a `BOOKMARK` at the latest resourceVersion every bookmark interval, once
//!   that is newer than the watch's own (kube-apiserver sends none while nothing has changed anywhere).
//! - Selectors: an object that starts matching arrives as `ADDED`, one that stops matching as `DELETED`.
//! - Asked for Tables (`kubectl get -w`), each event carries a one-row `Table`.
//! - The stream ends at `timeoutSeconds`, when the client goes, when the fault hook drops watches, or when
//!   the watcher falls too far behind (the client then resumes from its last resourceVersion).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::api::{Query, Target, requested_rv, resolve};
use crate::error::ApiError;
use crate::resources::ResourceType;
use crate::selector::Selectors;
use crate::store::{Change, ChangeKind, Message, Store};

fn line(kind: &str, object: Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

struct Filter {
    t: Arc<ResourceType>,
    version: String,
    namespace: Option<String>,
    selectors: Selectors,
    /// `Some(includeObject)` when the client asked for Tables (`kubectl get -w`).
    table: Option<Option<String>>,
}

impl Filter {
    /// A stored object as this watch shows it: served shape, or a one-row Table.
    fn render(&self, object: &Value) -> Value {
        let served = self.t.to_served(object.clone(), &self.version);
        match &self.table {
            None => served,
            Some(include) => {
                let rv = served
                    .pointer("/metadata/resourceVersion")
                    .cloned()
                    .unwrap_or_default();
                let meta = json!({"resourceVersion": rv});
                crate::table::table(&self.t, &self.version, &[served], meta, include.as_deref())
            }
        }
    }

    fn matches(&self, object: &Value) -> bool {
        let ns_ok = self.namespace.as_deref().is_none_or(|ns| {
            object
                .get("metadata")
                .and_then(|m| m.get("namespace"))
                .and_then(Value::as_str)
                == Some(ns)
        });
        ns_ok && self.selectors.matches(object)
    }

    /// The event a change becomes for this watch, if any.
    fn event(&self, change: &Change) -> Option<Bytes> {
        if change.storage != self.t.storage {
            return None;
        }
        let now = self.matches(&change.object);
        let before = change.old.as_ref().is_some_and(|o| self.matches(o));
        let kind = match change.kind {
            ChangeKind::Added if now => "ADDED",
            ChangeKind::Modified if now && before => "MODIFIED",
            ChangeKind::Modified if now => "ADDED",
            ChangeKind::Modified if before => "DELETED",
            ChangeKind::Deleted if now || before => "DELETED",
            _ => return None,
        };
        Some(line(kind, self.render(&change.object)))
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        line(
            "BOOKMARK",
            json!({"kind": self.t.kind, "apiVersion": self.t.api_version(&self.version), "metadata": meta}),
        )
    }
}

/// Starts a watch; returns the receiving end of its lines. Errors before the stream starts (unknown
/// type, bad selector) are returned as errors; a too-old resourceVersion becomes an `ERROR` event.
pub fn start(
    store: &Arc<Store>,
    target: &Target,
    query: &Query,
    accept: &str,
    mut dropped: tokio::sync::watch::Receiver<u64>,
) -> Result<mpsc::Receiver<Bytes>, ApiError> {
    let selectors = query.selectors()?;
    let requested = requested_rv(query)?;
    let bookmarks = query.flag("allowWatchBookmarks");
    let send_initial = query.flag("sendInitialEvents");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs);
    let (tx, out) = mpsc::channel::<Bytes>(1024);
    let inner = store.lock();
    let t = resolve(&inner, target)?;
    let filter = Filter {
        t,
        version: target.version.clone(),
        namespace: target.namespace.clone(),
        selectors,
        table: crate::table::wants_table(accept)
            .then(|| query.get("includeObject").map(str::to_string)),
    };
    let mut initial = Vec::new();
    let start_rv = match requested {
        Some(rv) if !send_initial => rv,
        _ => {
            for (_, object) in inner.list(&filter.t.storage, filter.namespace.as_deref(), None) {
                if filter.selectors.matches(object) {
                    initial.push(line("ADDED", filter.render(object)));
                }
            }
            inner.rv()
        }
    };
    if send_initial {
        initial.push(filter.bookmark(start_rv, true));
    }
    let (backlog, mut rx) = match inner.watch_from(start_rv) {
        Ok(ok) => ok,
        Err(gone) => {
            drop(inner);
            let _ = tx.try_send(line("ERROR", gone.to_status()));
            return Ok(out);
        }
    };
    drop(inner);
    dropped.borrow_and_update();
    tokio::spawn(async move {
        let deadline = timeout.map(|d| tokio::time::Instant::now() + d);
        let mut last = start_rv;
        let mut last_bookmark = start_rv;
        for l in initial {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        for change in backlog {
            last = change.rv;
            if let Some(l) = filter.event(&change)
                && tx.send(l).await.is_err()
            {
                return;
            }
        }
        loop {
            let msg = tokio::select! {
                biased;
                _ = tx.closed() => break,
                _ = dropped.changed() => break,
                _ = sleep_until(deadline) => break,
                msg = rx.recv() => msg,
            };
            let l = match msg {
                Ok(Message::Change(change)) => {
                    if change.rv <= last {
                        continue;
                    }
                    last = change.rv;
                    filter.event(&change)
                }
                Ok(Message::Tick(rv)) => {
                    // As kube-apiserver's watch cache: only past the watch's own resourceVersion.
                    if !bookmarks || rv <= start_rv || rv < last_bookmark || rv < last {
                        continue;
                    }
                    last_bookmark = rv;
                    Some(filter.bookmark(rv, false))
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(
                        missed = n,
                        "a watch fell behind; ending it so the client resumes"
                    );
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            };
            if let Some(l) = l
                && tx.send(l).await.is_err()
            {
                break;
            }
        }
    });
    Ok(out)
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
