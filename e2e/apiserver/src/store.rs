//! The object store: every object as JSON in a `BTreeMap` per type behind one lock, one global
//! monotonically increasing resourceVersion, a bounded history of changes for watches to resume from, a
//! broadcast channel that delivers every change (and bookmark ticks) in order, and — in durable mode — an
//! append-only JSON-lines log in the data directory.
//!
//! # The data directory
//! `state.jsonl` holds one JSON record a line. A line `{"snapshot":true,"rv":N}` starts a snapshot, followed by
//! one `{"type":"SNAPSHOT",...}` record per object; every change after it is appended as
//! `{"rv":N,"type":"ADDED|MODIFIED|DELETED","group":...,"resource":...,"object":{...}}` and flushed to the
//! operating system before the request is answered (no `fsync`: a killed process loses nothing, a power cut
//! may). When the log outgrows twice the number of objects (and at least 10 000 records) it is rewritten as
//! a fresh snapshot. On start the file is replayed: objects, resourceVersions, CRD registrations and the
//! changes after the snapshot (as watch history) come back, so a watch can resume across a restart.
//! A torn last line (a crash mid-write) is ignored.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::error::{ApiError, ServerError};
use crate::resources::{self, CRD_GROUP, CRD_PLURAL, Registry, TypeKey};

/// The most changes a watch may fall behind the live stream before it is ended (the client resumes from
/// its last resourceVersion, out of the history). The ring keeps its last `WATCH_RING` changes alive
/// whether anyone reads them or not, so it stays small.
const WATCH_RING: usize = 4_096;

/// The most the kept history may hold, in estimated bytes of JSON: beside its count limit, large objects
/// written often (a ReplicationNode of a thousand volumes) would otherwise keep gigabytes alive. A watch
/// older than what is kept gets 410 Gone and lists again, as against kube-apiserver's watch cache.
const HISTORY_BYTES: usize = 64 << 20;

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Removed.
    Deleted,
}

impl ChangeKind {
    /// The watch event type.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Added => "ADDED",
            ChangeKind::Modified => "MODIFIED",
            ChangeKind::Deleted => "DELETED",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "ADDED" => Some(Self::Added),
            "MODIFIED" => Some(Self::Modified),
            "DELETED" => Some(Self::Deleted),
            _ => None,
        }
    }
}

/// One committed change.
#[derive(Debug)]
pub struct Change {
    /// The resourceVersion it was committed at.
    pub rv: u64,
    /// Added, modified or deleted.
    pub kind: ChangeKind,
    /// The storage key of the object's type.
    pub storage: TypeKey,
    /// The object after the change (for a deletion: its last state, at the deletion's resourceVersion).
    pub object: Value,
    /// The object before the change (for selector transitions in watches).
    pub old: Option<Value>,
}

impl Change {
    /// Roughly how many bytes of JSON the change holds (the object, and before it the old one).
    pub fn approx_bytes(&self) -> usize {
        approx_json_bytes(&self.object) + self.old.as_ref().map_or(0, approx_json_bytes)
    }
}

/// Roughly the length of `value` serialised as JSON, counted without serialising it.
fn approx_json_bytes(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => 8,
        Value::String(s) => s.len() + 2,
        Value::Array(items) => {
            2 + items
                .iter()
                .map(|v| approx_json_bytes(v) + 1)
                .sum::<usize>()
        }
        Value::Object(fields) => {
            2 + fields
                .iter()
                .map(|(k, v)| k.len() + 4 + approx_json_bytes(v))
                .sum::<usize>()
        }
    }
}

/// What watches receive, in commit order.
#[derive(Debug, Clone)]
pub enum Message {
    /// A committed change.
    Change(Arc<Change>),
    /// Every change up to this resourceVersion has been sent: watches may send a BOOKMARK.
    Tick(u64),
}

/// `(namespace, name)`; the namespace is empty for cluster-scoped objects.
pub type ObjectKey = (String, String);

/// The key of an object.
pub fn object_key(object: &Value) -> ObjectKey {
    let meta = object.get("metadata");
    let s = |k: &str| {
        meta.and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (s("namespace"), s("name"))
}

/// The resourceVersion of an object as a number (0 when absent or not a number).
pub fn resource_version(object: &Value) -> u64 {
    object
        .get("metadata")
        .and_then(|m| m.get("resourceVersion"))
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

struct Log {
    path: PathBuf,
    file: BufWriter<File>,
    records: usize,
}

impl Log {
    fn append(&mut self, record: &Value) -> Result<(), std::io::Error> {
        serde_json::to_writer(&mut self.file, record)?;
        self.file.write_all(b"\n")?;
        self.file.flush()?;
        self.records += 1;
        Ok(())
    }
}

/// The state behind the lock. Methods here are the only way objects change.
pub struct Inner {
    rv: u64,
    objects: HashMap<TypeKey, BTreeMap<ObjectKey, Value>>,
    count: usize,
    history: VecDeque<Arc<Change>>,
    history_cap: usize,
    /// The estimated size of the kept history ([`Change::approx_bytes`] summed).
    history_bytes: usize,
    oldest: u64,
    /// The types served, changed by CRD writes under the same lock.
    pub registry: Registry,
    log: Option<Log>,
    tx: broadcast::Sender<Message>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("rv", &self.rv)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// The current (latest committed) resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// The oldest resourceVersion a watch can start from.
    pub fn oldest(&self) -> u64 {
        self.oldest
    }

    /// One object, stored shape.
    pub fn get(&self, storage: &TypeKey, key: &ObjectKey) -> Option<&Value> {
        self.objects.get(storage).and_then(|m| m.get(key))
    }

    /// Objects of a type, in one namespace or all, ordered by (namespace, name), after `after` if given.
    pub fn list<'a>(
        &'a self,
        storage: &TypeKey,
        namespace: Option<&'a str>,
        after: Option<&'a ObjectKey>,
    ) -> impl Iterator<Item = (&'a ObjectKey, &'a Value)> + 'a {
        self.objects
            .get(storage)
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(move |(k, _)| namespace.is_none_or(|ns| k.0 == ns))
            .filter(move |(k, _)| after.is_none_or(|a| *k > a))
    }

    /// How many objects there are of all types.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Commits a change: gives it the next resourceVersion, logs it, applies it, and tells the watches.
    /// Returns the object as committed.
    pub fn commit(
        &mut self,
        kind: ChangeKind,
        storage: &TypeKey,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        let rv = self.rv + 1;
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        if let Some(log) = &mut self.log {
            let record = json!({"rv": rv, "type": kind.as_str(), "group": storage.0,
                                "resource": storage.1, "object": object});
            log.append(&record).map_err(|e| {
                tracing::error!(path = %log.path.display(), error = %e, "cannot append to the log");
                ApiError::internal(format!("storage: {e}"))
            })?;
        }
        self.rv = rv;
        let old = self.apply(kind, storage, object.clone());
        if storage.0 == CRD_GROUP && storage.1 == CRD_PLURAL {
            self.sync_crd(kind, &object);
        }
        let change = Arc::new(Change {
            rv,
            kind,
            storage: storage.clone(),
            object: object.clone(),
            old,
        });
        self.remember(change.clone());
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(Message::Change(change));
        self.maybe_compact();
        Ok(object)
    }

    fn apply(&mut self, kind: ChangeKind, storage: &TypeKey, object: Value) -> Option<Value> {
        let key = object_key(&object);
        let map = self.objects.entry(storage.clone()).or_default();
        let old = match kind {
            ChangeKind::Deleted => map.remove(&key),
            _ => map.insert(key, object),
        };
        match (kind, &old) {
            (ChangeKind::Deleted, Some(_)) => self.count -= 1,
            (ChangeKind::Added | ChangeKind::Modified, None) => self.count += 1,
            _ => {}
        }
        old
    }

    fn sync_crd(&mut self, kind: ChangeKind, crd: &Value) {
        let key = (
            crd.pointer("/spec/group")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            crd.pointer("/spec/names/plural")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        );
        match kind {
            ChangeKind::Deleted => self.registry.unregister(&key),
            _ => match resources::from_crd(crd) {
                Ok(t) => self.registry.register(t),
                Err(e) => tracing::warn!(error = %e, "a stored CRD no longer registers"),
            },
        }
    }

    fn remember(&mut self, change: Arc<Change>) {
        self.history_bytes += change.approx_bytes();
        self.history.push_back(change);
        while self.history.len() > self.history_cap
            || (self.history_bytes > HISTORY_BYTES && self.history.len() > 1)
        {
            if let Some(dropped) = self.history.pop_front() {
                self.history_bytes -= dropped.approx_bytes();
                self.oldest = dropped.rv;
            }
        }
    }

    /// The changes after `rv`, and a receiver for every later one; 410 Gone when `rv` is older than the
    /// kept history (or newer than the latest commit).
    pub fn watch_from(
        &self,
        rv: u64,
    ) -> Result<(Vec<Arc<Change>>, broadcast::Receiver<Message>), ApiError> {
        // Older than the history, or newer than anything committed (a client of another incarnation):
        // either way the client must list again.
        if rv < self.oldest || rv > self.rv {
            return Err(ApiError::gone(rv, self.oldest));
        }
        let backlog = self.history.iter().filter(|c| c.rv > rv).cloned().collect();
        Ok((backlog, self.tx.subscribe()))
    }

    /// Sends a bookmark tick at the current resourceVersion.
    pub fn tick(&self) {
        let _ = self.tx.send(Message::Tick(self.rv));
    }

    fn maybe_compact(&mut self) {
        let threshold = (self.count * 2).max(10_000);
        if self.log.as_ref().is_some_and(|l| l.records > threshold)
            && let Err(e) = self.compact()
        {
            tracing::error!(error = %e, "log compaction failed; the log keeps growing");
        }
    }

    fn compact(&mut self) -> Result<(), ServerError> {
        let Some(log) = &self.log else {
            return Ok(());
        };
        let path = log.path.clone();
        let tmp = path.with_extension("jsonl.tmp");
        let storage_err = |p: &Path, source| ServerError::Storage {
            path: p.to_path_buf(),
            source,
        };
        {
            let file = File::create(&tmp).map_err(|e| storage_err(&tmp, e))?;
            let mut w = BufWriter::new(file);
            let mut line = |v: &Value| -> Result<(), ServerError> {
                serde_json::to_writer(&mut w, v).map_err(|e| storage_err(&tmp, e.into()))?;
                w.write_all(b"\n").map_err(|e| storage_err(&tmp, e))
            };
            line(&json!({"snapshot": true, "rv": self.rv}))?;
            for (storage, objects) in &self.objects {
                for object in objects.values() {
                    line(&json!({"rv": resource_version(object), "type": "SNAPSHOT",
                                 "group": storage.0, "resource": storage.1, "object": object}))?;
                }
            }
            w.flush().map_err(|e| storage_err(&tmp, e))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| storage_err(&path, e))?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| storage_err(&path, e))?;
        self.log = Some(Log {
            path,
            file: BufWriter::new(file),
            records: 0,
        });
        Ok(())
    }
}

/// The store: [`Inner`] behind a lock.
#[derive(Debug)]
pub struct Store {
    inner: Mutex<Inner>,
}

/// Namespaces every cluster starts with.
const INITIAL_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

impl Store {
    /// Opens a store: in memory when `data_dir` is `None`, else replayed from (and logged to)
    /// `data_dir/state.jsonl`. `history` bounds the changes kept for watches to resume from.
    pub fn open(data_dir: Option<&Path>, history: usize, now: &str) -> Result<Self, ServerError> {
        let (tx, _) = broadcast::channel(WATCH_RING);
        let mut inner = Inner {
            rv: 0,
            objects: HashMap::new(),
            count: 0,
            history: VecDeque::new(),
            history_cap: history.max(1),
            history_bytes: 0,
            oldest: 0,
            registry: Registry::new(),
            log: None,
            tx,
        };
        if let Some(dir) = data_dir {
            std::fs::create_dir_all(dir).map_err(|source| ServerError::Storage {
                path: dir.to_path_buf(),
                source,
            })?;
            let path = dir.join("state.jsonl");
            let records = if path.exists() {
                inner.replay(&path)?
            } else {
                0
            };
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| ServerError::Storage {
                    path: path.clone(),
                    source,
                })?;
            inner.log = Some(Log {
                path,
                file: BufWriter::new(file),
                records,
            });
        }
        if inner.rv == 0 {
            let ns_key = (String::new(), "namespaces".to_string());
            for ns in INITIAL_NAMESPACES {
                let object = json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": ns, "uid": crate::uid(), "creationTimestamp": now,
                                 "labels": {"kubernetes.io/metadata.name": ns}},
                    "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
                inner
                    .commit(ChangeKind::Added, &ns_key, object)
                    .map_err(|e| ServerError::Storage {
                        path: data_dir.map(Path::to_path_buf).unwrap_or_default(),
                        source: std::io::Error::other(e.message),
                    })?;
            }
        }
        Ok(Self {
            inner: Mutex::new(inner),
        })
    }

    /// Locks the state. A panic while it was held leaves the state as the last commit made it, so the
    /// lock is recovered rather than poisoned for good.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn replay(&mut self, path: &Path) -> Result<usize, ServerError> {
        let file = File::open(path).map_err(|source| ServerError::Storage {
            path: path.to_path_buf(),
            source,
        })?;
        let lines: Vec<String> = BufReader::new(file)
            .lines()
            .collect::<Result<_, _>>()
            .map_err(|source| ServerError::Storage {
                path: path.to_path_buf(),
                source,
            })?;
        let total = lines.len();
        let mut records = 0;
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let record: Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(_) if i + 1 == total => {
                    tracing::warn!(path = %path.display(), "ignoring a torn last line");
                    break;
                }
                Err(e) => {
                    return Err(ServerError::Corrupt {
                        path: path.to_path_buf(),
                        line: i + 1,
                        message: e.to_string(),
                    });
                }
            };
            let rv = record.get("rv").and_then(Value::as_u64).unwrap_or(0);
            if record.get("snapshot").and_then(Value::as_bool) == Some(true) {
                self.rv = rv;
                self.oldest = rv;
                continue;
            }
            let corrupt = |message: &str| ServerError::Corrupt {
                path: path.to_path_buf(),
                line: i + 1,
                message: message.into(),
            };
            let kind_str = record
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let storage = (
                record
                    .get("group")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                record
                    .get("resource")
                    .and_then(Value::as_str)
                    .ok_or_else(|| corrupt("no resource"))?
                    .to_string(),
            );
            let object = record
                .get("object")
                .cloned()
                .ok_or_else(|| corrupt("no object"))?;
            let is_crd = storage.0 == CRD_GROUP && storage.1 == CRD_PLURAL;
            if kind_str == "SNAPSHOT" {
                self.apply(ChangeKind::Added, &storage, object.clone());
                if is_crd {
                    self.sync_crd(ChangeKind::Added, &object);
                }
                continue;
            }
            let kind = ChangeKind::parse(kind_str).ok_or_else(|| corrupt("unknown record type"))?;
            records += 1;
            self.rv = self.rv.max(rv);
            let old = self.apply(kind, &storage, object.clone());
            if is_crd {
                self.sync_crd(kind, &object);
            }
            self.remember(Arc::new(Change {
                rv,
                kind,
                storage,
                object,
                old,
            }));
        }
        Ok(records)
    }
}
