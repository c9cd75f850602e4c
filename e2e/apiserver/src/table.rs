//! `meta.k8s.io/v1` `Table` answers (asked for with `Accept: application/json;as=Table;v=v1;g=meta.k8s.io`),
//! which is how `kubectl get` prints columns: custom resources get `NAME` plus the CRD's
//! `additionalPrinterColumns` (or `NAME`, `AGE` when there are none), evaluated from their JSONPath
//! (`.a.b`, `.a[0].b`, `.a[?(@.k=="v")].b`); built-in kinds get `NAME`, a few kind-specific columns, `AGE`.
//! Dates are shown as ages (`5s`, `3m2s`, `4h`, `2d`), as kube-apiserver does.

use serde_json::{Value, json};

use crate::resources::ResourceType;

/// Whether an `Accept` header asks for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

struct Column {
    name: String,
    kind: String,
    format: String,
    description: String,
    priority: i64,
    path: String,
}

fn columns(t: &ResourceType, version: &str) -> Vec<Column> {
    let col = |name: &str, kind: &str, path: &str, description: &str| Column {
        name: name.into(),
        kind: kind.into(),
        format: if name == "Name" {
            "name".into()
        } else {
            String::new()
        },
        description: description.into(),
        priority: 0,
        path: path.into(),
    };
    let name = col(
        "Name",
        "string",
        ".metadata.name",
        "Name must be unique within a namespace.",
    );
    let age = col(
        "Age",
        "date",
        ".metadata.creationTimestamp",
        "CreationTimestamp is the time this object was created.",
    );
    if t.custom {
        let printer = t
            .version(version)
            .map(|v| v.printer_columns.clone())
            .unwrap_or_default();
        if printer.is_empty() {
            return vec![name, age];
        }
        let mut out = vec![name];
        for p in printer {
            let s = |k: &str| {
                p.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            out.push(Column {
                name: s("name"),
                kind: s("type"),
                format: s("format"),
                description: s("description"),
                priority: p.get("priority").and_then(Value::as_i64).unwrap_or(0),
                path: s("jsonPath"),
            });
        }
        return out;
    }
    let mut out = vec![name];
    match (t.group.as_str(), t.plural.as_str()) {
        ("", "namespaces") => out.push(col(
            "Status",
            "string",
            ".status.phase",
            "The phase of the namespace.",
        )),
        ("", "configmaps") | ("", "secrets") => out.push(col(
            "Data",
            "data-count",
            ".data",
            "Number of data entries.",
        )),
        ("", "pods") => out.push(col(
            "Status",
            "string",
            ".status.phase",
            "The phase of the pod.",
        )),
        ("", "persistentvolumeclaims") => {
            out.push(col(
                "Status",
                "string",
                ".status.phase",
                "The phase of the claim.",
            ));
            out.push(col(
                "Volume",
                "string",
                ".spec.volumeName",
                "The bound volume.",
            ));
        }
        ("", "persistentvolumes") => out.push(col(
            "Status",
            "string",
            ".status.phase",
            "The phase of the volume.",
        )),
        ("", "events") => {
            out.push(col("Type", "string", ".type", "The event type."));
            out.push(col("Reason", "string", ".reason", "The event reason."));
            out.push(col("Message", "string", ".message", "The event message."));
        }
        ("coordination.k8s.io", "leases") => {
            out.push(col(
                "Holder",
                "string",
                ".spec.holderIdentity",
                "The lease holder.",
            ));
        }
        _ => {}
    }
    out.push(age);
    out
}

/// Evaluates a printer-column JSONPath against an object: `None` when a step is missing.
pub fn json_path<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = object;
    let mut rest = path
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .trim_start_matches('.');
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('[') {
            let end = after.find(']')?;
            let inside = &after[..end];
            rest = after[end + 1..].trim_start_matches('.');
            let items = cur.as_array()?;
            if let Some(filter) = inside
                .strip_prefix("?(@.")
                .and_then(|f| f.strip_suffix(')'))
            {
                let (key, want) = filter.split_once("==")?;
                let want = want.trim().trim_matches('"').trim_matches('\'');
                cur = items.iter().find(|i| {
                    i.get(key.trim()).is_some_and(|v| match v {
                        Value::String(s) => s == want,
                        other => serde_json::from_str::<Value>(want).ok().as_ref() == Some(other),
                    })
                })?;
            } else {
                cur = items.get(inside.trim().parse::<usize>().ok()?)?;
            }
            continue;
        }
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        cur = cur.get(&rest[..end])?;
        rest = rest[end..].trim_start_matches('.');
    }
    Some(cur)
}

/// A duration the way kube-apiserver's `HumanDuration` prints it.
pub fn human_duration(secs: i64) -> String {
    let s = secs.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86_400);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        }
    } else if h < 3 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if d < 8 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else if d < 365 * 2 {
        format!("{d}d")
    } else {
        format!("{}y", d / 365)
    }
}

fn cell(column: &Column, object: &Value, now: chrono::DateTime<chrono::Utc>) -> Value {
    if column.kind == "data-count" {
        let n = object
            .get("data")
            .and_then(Value::as_object)
            .map_or(0, |m| m.len())
            + object
                .get("binaryData")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len());
        return json!(n);
    }
    let Some(v) = json_path(object, &column.path) else {
        return Value::Null;
    };
    match (column.kind.as_str(), v) {
        ("date", Value::String(s)) => match chrono::DateTime::parse_from_rfc3339(s) {
            Ok(t) => Value::String(human_duration(
                (now - t.with_timezone(&chrono::Utc)).num_seconds(),
            )),
            Err(_) => Value::String(s.clone()),
        },
        (_, Value::Array(_) | Value::Object(_)) => Value::String(v.to_string()),
        _ => v.clone(),
    }
}

/// A Table of `objects` (served shape). `include` is the `includeObject` parameter.
pub fn table(
    t: &ResourceType,
    version: &str,
    objects: &[Value],
    list_meta: Value,
    include: Option<&str>,
) -> Value {
    let cols = columns(t, version);
    let now = chrono::Utc::now();
    let definitions: Vec<Value> = cols
        .iter()
        .map(|c| {
            let kind = if c.kind == "data-count" { "integer" } else { c.kind.as_str() };
            json!({"name": c.name, "type": kind, "format": c.format, "description": c.description, "priority": c.priority})
        })
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let cells: Vec<Value> = cols.iter().map(|c| cell(c, o, now)).collect();
            let object = match include {
                Some("None") => Value::Null,
                Some("Object") => o.clone(),
                _ => json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                            "metadata": o.get("metadata").cloned().unwrap_or_default()}),
            };
            json!({"cells": cells, "object": object})
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": definitions,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths_and_durations() {
        let o = json!({"status": {"epoch": 3, "conditions": [{"type": "Ready", "status": "False"},
                                                            {"type": "Frozen", "status": "True"}]},
                       "list": [{"a": 1}]});
        assert_eq!(json_path(&o, ".status.epoch"), Some(&json!(3)));
        assert_eq!(
            json_path(&o, ".status.conditions[?(@.type==\"Frozen\")].status"),
            Some(&json!("True"))
        );
        assert_eq!(json_path(&o, ".list[0].a"), Some(&json!(1)));
        assert_eq!(json_path(&o, ".status.missing"), None);
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(182), "3m2s");
        assert_eq!(human_duration(4 * 3600), "4h");
        assert_eq!(human_duration(3 * 86_400 + 3600), "3d1h");
    }

    #[test]
    fn accept_headers() {
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
        ));
        assert!(!wants_table("application/json"));
    }
}
