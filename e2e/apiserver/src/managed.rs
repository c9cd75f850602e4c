//! Field ownership (`metadata.managedFields`) and server-side apply, simplified.
//!
//! # How ownership works here
//! - A **field** is a path to a leaf of the object: a scalar, a list (lists are atomic: owned and replaced
//!   whole, never merged by key), or an empty map. `metadata.labels.<key>` and
//!   `metadata.annotations.<key>` are fields; `metadata.finalizers` and `metadata.ownerReferences` are
//!   atomic fields; the rest of `metadata`, `apiVersion` and `kind` are never owned. `status` belongs to the
//!   `/status` subresource when the type has one, to the main resource otherwise.
//! - Each manager has at most one entry per (operation `Apply`/`Update`, subresource), recorded in
//!   `metadata.managedFields` as kube-apiserver does (`fieldsType: FieldsV1`, `f:`-prefixed keys; a leaf is
//!   written as `{}`).
//! - **Update** (create, `PUT`, JSON/merge/strategic `PATCH`, by the request's `fieldManager`, or the
//!   first word of the `User-Agent`): the manager takes every field whose value it changed or added; the
//!   other managers lose those fields. Fields that vanished are forgotten.
//! - **Apply** (`application/apply-patch+yaml`, `fieldManager` required): a *conflict* is a field in the
//!   applied configuration that another manager owns with a different value than the applied one. Any
//!   conflict refuses the apply with `409 Conflict` (one cause per field, `conflict with "<manager>"`, and `using v1` after an Update manager, as kube-apiserver prints them)
//!   unless `force=true`, which moves those fields to the applier. Owning a field with the *same* value is
//!   shared ownership, not a conflict. The configuration is merged into the live object (maps deeply,
//!   lists and scalars replaced). A field the applier owned before, that its new configuration leaves out,
//!   and that no other manager owns, is removed from the object. The applier's entry then holds exactly
//!   the fields of its configuration.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// A field: the keys leading to a leaf.
pub type FieldPath = Vec<String>;

/// Which part of an object a write addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The main resource; `status` is included only when the type has no status subresource.
    Main {
        /// Whether the type has a `/status` subresource.
        status_subresource: bool,
    },
    /// The `/status` subresource: only `status`.
    Status,
}

impl Scope {
    fn subresource(self) -> Option<&'static str> {
        match self {
            Scope::Main { .. } => None,
            Scope::Status => Some("status"),
        }
    }

    fn includes(self, top: &str) -> bool {
        match (self, top) {
            (_, "apiVersion" | "kind") => false,
            (Scope::Status, key) => key == "status",
            (Scope::Main { status_subresource }, "status") => !status_subresource,
            (Scope::Main { .. }, _) => true,
        }
    }
}

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The field manager.
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    /// The apiVersion the manager wrote with.
    pub api_version: String,
    /// When the entry last changed.
    pub time: String,
    /// `status` for the status subresource.
    pub subresource: Option<String>,
    /// The fields owned.
    pub fields: BTreeSet<FieldPath>,
}

impl Entry {
    /// The manager as kube-apiserver names it in a conflict: `"name"`, ` with subresource "status"`,
    /// and ` using <apiVersion>` for an Update.
    pub fn printed(&self) -> String {
        let mut out = format!("\"{}\"", self.manager);
        if let Some(sub) = &self.subresource {
            out.push_str(&format!(" with subresource \"{sub}\""));
        }
        if self.operation == "Update" {
            out.push_str(&format!(" using {}", self.api_version));
        }
        out
    }
}

/// Reads `metadata.managedFields`.
pub fn read(object: &Value) -> Vec<Entry> {
    let Some(list) = object
        .get("metadata")
        .and_then(|m| m.get("managedFields"))
        .and_then(Value::as_array)
    else {
        return vec![];
    };
    list.iter()
        .filter_map(|e| {
            let s = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_string);
            let mut fields = BTreeSet::new();
            if let Some(f) = e.get("fieldsV1") {
                decode(f, &mut Vec::new(), &mut fields);
            }
            Some(Entry {
                manager: s("manager")?,
                operation: s("operation").unwrap_or_else(|| "Update".into()),
                api_version: s("apiVersion").unwrap_or_default(),
                time: s("time").unwrap_or_default(),
                subresource: s("subresource").filter(|s| !s.is_empty()),
                fields,
            })
        })
        .collect()
}

fn decode(node: &Value, prefix: &mut Vec<String>, out: &mut BTreeSet<FieldPath>) {
    let children: Vec<(&String, &Value)> = node
        .as_object()
        .map(|m| m.iter().filter(|(k, _)| k.starts_with("f:")).collect())
        .unwrap_or_default();
    if children.is_empty() {
        if !prefix.is_empty() {
            out.insert(prefix.clone());
        }
        return;
    }
    for (k, v) in children {
        prefix.push(k[2..].to_string());
        decode(v, prefix, out);
        prefix.pop();
    }
}

fn encode(fields: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for path in fields {
        let mut node = &mut root;
        for seg in path {
            let entry = node
                .entry(format!("f:{seg}"))
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            match entry.as_object_mut() {
                Some(next) => node = next,
                None => break,
            }
        }
    }
    Value::Object(root)
}

/// Writes `metadata.managedFields` (removed when there are no entries).
pub fn write(object: &mut Value, entries: &[Entry]) {
    let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": encode(&e.fields),
            });
            if let (Some(sub), Some(obj)) = (&e.subresource, v.as_object_mut()) {
                obj.insert("subresource".into(), Value::String(sub.clone()));
            }
            v
        })
        .collect();
    if list.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert("managedFields".into(), Value::Array(list));
    }
}

fn leaves(value: &Value, prefix: &mut Vec<String>, out: &mut BTreeSet<FieldPath>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                prefix.push(k.clone());
                leaves(v, prefix, out);
                prefix.pop();
            }
        }
        _ => {
            out.insert(prefix.clone());
        }
    }
}

/// The fields of `object` that a write in `scope` can own.
pub fn fields(object: &Value, scope: Scope) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    let Some(map) = object.as_object() else {
        return out;
    };
    for (key, value) in map {
        if key == "metadata" {
            if matches!(scope, Scope::Status) {
                continue;
            }
            for m in ["labels", "annotations"] {
                if let Some(entries) = value.get(m).and_then(Value::as_object) {
                    for k in entries.keys() {
                        out.insert(vec!["metadata".into(), m.into(), k.clone()]);
                    }
                }
            }
            for m in ["finalizers", "ownerReferences"] {
                if value.get(m).is_some() {
                    out.insert(vec!["metadata".into(), m.into()]);
                }
            }
        } else if scope.includes(key) {
            leaves(value, &mut vec![key.clone()], &mut out);
        }
    }
    out
}

/// The value at a field path.
pub fn get<'a>(object: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = object;
    for seg in path {
        cur = cur.get(seg)?;
    }
    Some(cur)
}

/// Removes the field at `path`, and every map on the way that the removal left empty (kube-apiserver drops
/// a struct whose last owned field an apply removed, rather than leaving `{}` behind).
fn remove(object: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some(map) = object.as_object_mut() else {
        return;
    };
    if rest.is_empty() {
        map.remove(first);
        return;
    }
    if let Some(child) = map.get_mut(first) {
        let was_empty = child.as_object().is_some_and(|m| m.is_empty());
        remove(child, rest);
        if !was_empty && child.as_object().is_some_and(|m| m.is_empty()) {
            map.remove(first);
        }
    }
}

fn deep_merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                match t.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        deep_merge(existing, v)
                    }
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// Merges an apply configuration into `target`, within `scope`.
fn merge_config(target: &mut Value, config: &Value, scope: Scope) {
    let (Some(t), Some(c)) = (target.as_object_mut(), config.as_object()) else {
        return;
    };
    for (key, value) in c {
        if key == "metadata" {
            if matches!(scope, Scope::Status) {
                continue;
            }
            let meta = t
                .entry("metadata")
                .or_insert_with(|| Value::Object(Map::new()));
            for m in ["labels", "annotations"] {
                if let Some(v) = value.get(m).filter(|v| v.is_object())
                    && let Some(meta) = meta.as_object_mut()
                {
                    let slot = meta.entry(m).or_insert_with(|| Value::Object(Map::new()));
                    deep_merge(slot, v);
                }
            }
            for m in ["finalizers", "ownerReferences"] {
                if let (Some(v), Some(meta)) = (value.get(m), meta.as_object_mut()) {
                    meta.insert(m.into(), v.clone());
                }
            }
        } else if scope.includes(key) {
            match t.get_mut(key) {
                Some(existing) => deep_merge(existing, value),
                None => {
                    t.insert(key.clone(), value.clone());
                }
            }
        }
    }
}

fn entry_mut<'a>(
    entries: &'a mut Vec<Entry>,
    manager: &str,
    operation: &str,
    scope: Scope,
    api_version: &str,
    now: &str,
) -> &'a mut Entry {
    let sub = scope.subresource().map(str::to_string);
    let idx = entries
        .iter()
        .position(|e| e.manager == manager && e.operation == operation && e.subresource == sub);
    let idx = match idx {
        Some(i) => i,
        None => {
            entries.push(Entry {
                manager: manager.into(),
                operation: operation.into(),
                api_version: api_version.into(),
                time: now.into(),
                subresource: sub,
                fields: BTreeSet::new(),
            });
            entries.len() - 1
        }
    };
    let e = &mut entries[idx];
    e.api_version = api_version.into();
    e.time = now.into();
    e
}

fn forget_vanished(entries: &mut Vec<Entry>, object: &Value) {
    for e in entries.iter_mut() {
        e.fields.retain(|p| get(object, p).is_some());
    }
    entries.retain(|e| !e.fields.is_empty());
}

/// Records an Update by `manager` that turned `old` (absent on create) into `new`, rewriting
/// `new.metadata.managedFields`.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    scope: Scope,
    api_version: &str,
    now: &str,
) {
    let mut entries = old.map(read).unwrap_or_default();
    let changed: BTreeSet<FieldPath> = fields(new, scope)
        .into_iter()
        .filter(|p| old.and_then(|o| get(o, p)) != get(new, p))
        .collect();
    if !changed.is_empty() {
        for e in entries.iter_mut() {
            e.fields.retain(|p| !changed.contains(p));
        }
        entry_mut(&mut entries, manager, "Update", scope, api_version, now)
            .fields
            .extend(changed);
    }
    forget_vanished(&mut entries, new);
    write(new, &entries);
}

/// Server-side apply of `config` by `manager` onto `live` (or onto `skeleton` when the object does not
/// exist yet). Returns the new object, or the conflicts as `(printed manager, .field.path)`.
pub fn apply(
    live: &Value,
    config: &Value,
    manager: &str,
    force: bool,
    scope: Scope,
    api_version: &str,
    now: &str,
) -> Result<Value, Vec<(String, String)>> {
    let mut entries = read(live);
    let sub = scope.subresource().map(str::to_string);
    let applied = fields(config, scope);
    let mut conflicts = Vec::new();
    for e in &entries {
        if e.manager == manager {
            continue;
        }
        for p in e.fields.intersection(&applied) {
            if get(live, p) != get(config, p) {
                conflicts.push((e.printed(), format!(".{}", p.join("."))));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        conflicts.sort();
        conflicts.dedup();
        return Err(conflicts);
    }
    let mut new = live.clone();
    // Fields this manager applied before and now leaves out go, unless someone else owns them.
    let previously: BTreeSet<FieldPath> = entries
        .iter()
        .filter(|e| e.manager == manager && e.operation == "Apply" && e.subresource == sub)
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    for p in previously.difference(&applied) {
        let shared = entries
            .iter()
            .any(|e| !(e.manager == manager && e.subresource == sub) && e.fields.contains(p));
        if !shared {
            remove(&mut new, p);
        }
    }
    merge_config(&mut new, config, scope);
    if force {
        for e in entries.iter_mut().filter(|e| e.manager != manager) {
            e.fields
                .retain(|p| !applied.contains(p) || get(live, p) == get(config, p));
        }
    }
    // An Update entry of the same manager gives way to its Apply.
    for e in entries
        .iter_mut()
        .filter(|e| e.manager == manager && e.operation == "Update" && e.subresource == sub)
    {
        e.fields.retain(|p| !applied.contains(p));
    }
    entry_mut(&mut entries, manager, "Apply", scope, api_version, now).fields = applied;
    forget_vanished(&mut entries, &new);
    write(&mut new, &entries);
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAIN: Scope = Scope::Main {
        status_subresource: true,
    };

    fn owners(object: &Value, field: &[&str]) -> Vec<String> {
        let path: FieldPath = field.iter().map(|s| s.to_string()).collect();
        read(object)
            .into_iter()
            .filter(|e| e.fields.contains(&path))
            .map(|e| e.manager)
            .collect()
    }

    #[test]
    fn two_appliers_conflict_share_and_force() -> Result<(), Vec<(String, String)>> {
        let live = json!({"metadata": {"name": "x"}, "spec": {}});
        let a = apply(
            &live,
            &json!({"spec": {"a": 1, "shared": "s"}}),
            "alice",
            false,
            MAIN,
            "v1",
            "t",
        )?;
        // Same value: shared, no conflict.
        let b = apply(
            &a,
            &json!({"spec": {"b": 2, "shared": "s"}}),
            "bob",
            false,
            MAIN,
            "v1",
            "t",
        )?;
        assert_eq!(owners(&b, &["spec", "shared"]), vec!["alice", "bob"]);
        // Different value: conflict, unless forced.
        let refused = apply(
            &b,
            &json!({"spec": {"a": 9}}),
            "bob",
            false,
            MAIN,
            "v1",
            "t",
        );
        assert_eq!(
            refused,
            Err(vec![("\"alice\"".to_string(), ".spec.a".to_string())])
        );
        let forced = apply(&b, &json!({"spec": {"a": 9}}), "bob", true, MAIN, "v1", "t")?;
        assert_eq!(forced["spec"]["a"], 9);
        assert_eq!(owners(&forced, &["spec", "a"]), vec!["bob"]);
        // bob dropped "b" and "shared" from his config: "b" goes, "shared" stays (alice owns it).
        assert!(forced["spec"].get("b").is_none());
        assert_eq!(forced["spec"]["shared"], "s");
        Ok(())
    }

    #[test]
    fn an_apply_that_drops_a_whole_struct_removes_it_not_leaves_it_empty()
    -> Result<(), Vec<(String, String)>> {
        let live = json!({"metadata": {"name": "x"}, "status": {"epoch": 1}});
        let first = apply(
            &live,
            &json!({"status": {"epoch": 1, "trigger": {"reason": "CopyFailed", "node": "n"}}}),
            "op",
            false,
            Scope::Status,
            "v1",
            "t",
        )?;
        assert_eq!(first["status"]["trigger"]["reason"], "CopyFailed");
        let second = apply(
            &first,
            &json!({"status": {"epoch": 1}}),
            "op",
            false,
            Scope::Status,
            "v1",
            "t",
        )?;
        assert!(second["status"].get("trigger").is_none(), "{second}");
        assert_eq!(second["status"]["epoch"], 1);
        Ok(())
    }

    #[test]
    fn updates_take_changed_fields_and_status_is_separate() -> Result<(), Vec<(String, String)>> {
        let live = json!({"metadata": {"name": "x"}});
        let a = apply(
            &live,
            &json!({"spec": {"a": 1}, "status": {"s": 1}}),
            "alice",
            false,
            MAIN,
            "v1",
            "t",
        )?;
        assert!(
            a.get("status").is_none(),
            "status is not written through the main resource"
        );
        let mut b = a.clone();
        b["spec"]["a"] = json!(2);
        record_update(Some(&a), &mut b, "kubectl-edit", MAIN, "v1", "t");
        assert_eq!(owners(&b, &["spec", "a"]), vec!["kubectl-edit"]);
        let s = apply(
            &b,
            &json!({"status": {"s": 1}}),
            "sidecar",
            false,
            Scope::Status,
            "v1",
            "t",
        )?;
        assert_eq!(s["status"]["s"], 1);
        assert_eq!(owners(&s, &["status", "s"]), vec!["sidecar"]);
        Ok(())
    }
}
