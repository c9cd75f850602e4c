//! Custom-resource validation as kube-apiserver does it, in its order: prune unknown fields, apply
//! defaults, check the structural OpenAPI v3 schema (types, required, enums, bounds, lengths, item counts,
//! patterns, list-type uniqueness), then evaluate the CEL `x-kubernetes-validations` (with `oldSelf` on
//! update) through `kube-cel`.
//!
//! Field errors are worded like kube-apiserver's (`spec.x: Required value`,
//! `spec.x: Invalid value: 0: spec.x in body should be greater than or equal to 1`,
//! `spec: Invalid value: "object": <rule message>`), so a test or a person can match them.

use serde_json::{Map, Value};

use crate::error::{Cause, go_quote};

/// A version's `openAPIV3Schema` with its CEL rules compiled once.
#[derive(Debug)]
pub struct Schema {
    raw: Value,
    /// The rules, compiled over [`rule_tree`] of the schema; `None` when the schema has none.
    cel: Option<(Value, kube_cel::CompiledSchema)>,
}

impl Schema {
    /// Compiles the schema's CEL rules; a rule that does not compile refuses the schema.
    pub fn new(raw: Value) -> Result<Self, String> {
        let cel = match rule_tree(&raw) {
            None => None,
            Some(tree) => {
                let compiled = kube_cel::compile_schema(&tree);
                let mut errors = Vec::new();
                collect_compile_errors(&compiled, &mut errors);
                if !errors.is_empty() {
                    return Err(format!("compilation failed: {}", errors.join("; ")));
                }
                Some((tree, compiled))
            }
        };
        Ok(Self { raw, cel })
    }

    /// The schema as written in the CRD.
    pub fn raw(&self) -> &Value {
        &self.raw
    }

    /// Removes fields the schema does not know (unless `x-kubernetes-preserve-unknown-fields`), returning
    /// their paths, e.g. `.spec.foo`, for `fieldValidation=Strict|Warn`.
    pub fn prune(&self, object: &mut Value) -> Vec<String> {
        let mut pruned = Vec::new();
        if let Some(obj) = object.as_object_mut() {
            let props = self.raw.get("properties").and_then(Value::as_object);
            let preserve = preserves(&self.raw);
            let keys: Vec<String> = obj.keys().cloned().collect();
            for key in keys {
                if matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                match props.and_then(|p| p.get(&key)) {
                    Some(sub) => {
                        if let Some(v) = obj.get_mut(&key) {
                            prune_value(sub, v, &format!(".{key}"), &mut pruned);
                        }
                    }
                    None if preserve => {}
                    None => {
                        obj.remove(&key);
                        pruned.push(format!(".{key}"));
                    }
                }
            }
        }
        pruned
    }

    /// Fills in schema defaults (only under parents that are present, as kube-apiserver does).
    pub fn apply_defaults(&self, object: &Value) -> Value {
        kube_cel::apply_defaults(&self.raw, object)
    }

    /// Checks the structural schema and then the CEL rules (unless a blocking schema error skips them).
    /// Empty when valid.
    pub fn validate(&self, object: &Value, old: Option<&Value>) -> Vec<Cause> {
        let mut causes = Vec::new();
        if let (Some(obj), Some(props)) = (
            object.as_object(),
            self.raw.get("properties").and_then(Value::as_object),
        ) {
            // The root: metadata, apiVersion and kind are the server's business, not the schema's.
            for (key, sub) in props {
                if matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                match obj.get(key) {
                    Some(v) => check(sub, v, key, &mut causes),
                    None if is_required(&self.raw, key) => causes.push(required(key)),
                    None => {}
                }
            }
        }
        // As kube-apiserver: an error of a blocking kind (a wrong type, an unsupported enum value, a
        // missing required field, a string or list too long) skips the rules and says so; after other
        // schema errors (a pattern, a bound) the rules still run and add theirs.
        if self.cel.is_some() && causes.iter().any(|c| BLOCKING.contains(&c.reason.as_str())) {
            causes.push(Cause {
                reason: "FieldValueInvalid".into(),
                message: "Invalid value: null: some validation rules were not checked because the object was invalid; correct the existing errors to complete validation".into(),
                field: "<nil>".into(),
            });
            return causes;
        }
        let Some((tree, cel)) = &self.cel else {
            return causes;
        };
        // Only what the rules can see is converted for CEL (kube-cel converts every node it walks,
        // subtree and all): a status listing 1000 volumes, none of them under a rule, costs nothing.
        let object = rule_view(tree, object);
        let old = old.map(|old| rule_view(tree, old));
        if let Err(errors) = kube_cel::validate_compiled(cel, &object, old.as_ref()) {
            for e in errors.iter() {
                let field = e.field_path.trim_start_matches('.').to_string();
                let message = match e.reason.as_deref() {
                    _ if e.kind == kube_cel::ErrorKind::EvaluationError => format!(
                        "Invalid value: \"{}\": {} evaluating rule: {}",
                        type_at(&self.raw, &field),
                        evaluation_error(&e.message),
                        rule_message(&self.raw, &e.rule)
                    ),
                    Some("FieldValueForbidden") => format!("Forbidden: {}", e.message),
                    Some("FieldValueRequired") => format!("Required value: {}", e.message),
                    Some("FieldValueDuplicate") => format!("Duplicate value: {}", e.message),
                    _ => format!(
                        "Invalid value: \"{}\": {}",
                        type_at(&self.raw, &field),
                        e.message
                    ),
                };
                causes.push(Cause {
                    reason: e
                        .reason
                        .clone()
                        .unwrap_or_else(|| "FieldValueInvalid".into()),
                    message,
                    field,
                });
            }
        }
        causes
    }
}

/// A rule's runtime error as cel-go (in kube-apiserver) words it, where the two differ in wording only:
/// a string that is no duration or timestamp.
fn evaluation_error(message: &str) -> String {
    let detail = message
        .strip_prefix("rule evaluation error: ")
        .unwrap_or(message);
    for (function, target) in [
        ("duration", "google.protobuf.Duration"),
        ("timestamp", "google.protobuf.Timestamp"),
    ] {
        if detail.contains(&format!("Error executing function '{function}'")) {
            return format!("type conversion error from 'string' to '{target}'");
        }
    }
    detail.to_owned()
}

/// How kube-apiserver names a rule in an evaluation error: its message, else the rule itself.
fn rule_message(schema: &Value, rule: &str) -> String {
    fn find(schema: &Value, rule: &str) -> Option<String> {
        match schema {
            Value::Object(map) => {
                let here = map
                    .get("x-kubernetes-validations")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .find(|v| v.get("rule").and_then(Value::as_str) == Some(rule))
                    .and_then(|v| v.get("message").and_then(Value::as_str))
                    .map(|m| m.trim().to_owned())
                    .filter(|m| !m.is_empty());
                here.or_else(|| map.values().find_map(|v| find(v, rule)))
            }
            Value::Array(items) => items.iter().find_map(|v| find(v, rule)),
            _ => None,
        }
    }
    find(schema, rule).unwrap_or_else(|| rule.to_owned())
}

/// Schema errors after which kube-apiserver evaluates no CEL rule (its `hasBlockingErr`).
const BLOCKING: &[&str] = &[
    "FieldValueNotSupported",
    "FieldValueRequired",
    "FieldValueTooLong",
    "FieldValueTooMany",
    "FieldValueTypeInvalid",
];

/// The part of a schema the CEL rules live in: a node with rules is kept whole (its rules may read any
/// of it), a node without keeps only the children that lead to rules, and a subtree with no rule is
/// dropped. `None` when the schema has no rule at all. kube-apiserver likewise evaluates each rule on its
/// own node and converts nothing for the rest.
fn rule_tree(schema: &Value) -> Option<Value> {
    let node = schema.as_object()?;
    let has_rules = node
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .is_some_and(|rules| !rules.is_empty());
    if has_rules {
        return Some(schema.clone());
    }
    let mut kept = Map::new();
    if let Some(properties) = node.get("properties").and_then(Value::as_object) {
        let properties: Map<String, Value> = properties
            .iter()
            .filter_map(|(name, sub)| Some((name.clone(), rule_tree(sub)?)))
            .collect();
        if !properties.is_empty() {
            kept.insert("properties".into(), Value::Object(properties));
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(sub) = node.get(key).and_then(rule_tree) {
            kept.insert(key.into(), sub);
        }
    }
    if kept.is_empty() {
        return None;
    }
    for key in ["type", "x-kubernetes-preserve-unknown-fields"] {
        if let Some(value) = node.get(key) {
            kept.insert(key.into(), value.clone());
        }
    }
    Some(Value::Object(kept))
}

/// `value` as the rules of `tree` (a [`rule_tree`]) see it: whole under a node with rules, elsewhere
/// only the fields that lead to one. Paths and list indices are unchanged, so errors name the same
/// fields.
fn rule_view(tree: &Value, value: &Value) -> Value {
    if tree.get("x-kubernetes-validations").is_some() {
        return value.clone();
    }
    match value {
        Value::Object(fields) => {
            let properties = tree.get("properties").and_then(Value::as_object);
            let additional = tree.get("additionalProperties");
            let view = fields
                .iter()
                .filter_map(|(name, field)| {
                    // A structural schema has properties or additionalProperties, never both.
                    let sub = properties.and_then(|p| p.get(name)).or(additional)?;
                    Some((name.clone(), rule_view(sub, field)))
                })
                .collect();
            Value::Object(view)
        }
        Value::Array(items) => match tree.get("items") {
            Some(sub) => Value::Array(items.iter().map(|item| rule_view(sub, item)).collect()),
            None => Value::Array(Vec::new()),
        },
        other => other.clone(),
    }
}

fn collect_compile_errors(c: &kube_cel::CompiledSchema, out: &mut Vec<String>) {
    for e in c.compilation_errors() {
        out.push(e.to_string());
    }
    for child in c.properties.values() {
        collect_compile_errors(child, out);
    }
    for child in c.items.iter().chain(c.additional_properties.iter()) {
        collect_compile_errors(child, out);
    }
    for child in c.all_of.iter().chain(&c.one_of).chain(&c.any_of) {
        collect_compile_errors(child, out);
    }
}

fn preserves(schema: &Value) -> bool {
    schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
}

fn prune_value(schema: &Value, value: &mut Value, path: &str, pruned: &mut Vec<String>) {
    match value {
        Value::Object(obj) => {
            let embedded = schema
                .get("x-kubernetes-embedded-resource")
                .and_then(Value::as_bool)
                == Some(true);
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let preserve = preserves(schema);
            let keys: Vec<String> = obj.keys().cloned().collect();
            for key in keys {
                if embedded && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let sub = props.and_then(|p| p.get(&key)).or(additional);
                match sub {
                    Some(sub) => {
                        if let Some(v) = obj.get_mut(&key) {
                            prune_value(sub, v, &format!("{path}.{key}"), pruned);
                        }
                    }
                    None if preserve
                        || schema.get("additionalProperties") == Some(&Value::Bool(true)) => {}
                    None => {
                        obj.remove(&key);
                        pruned.push(format!("{path}.{key}"));
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    prune_value(sub, item, &format!("{path}[{i}]"), pruned);
                }
            }
        }
        _ => {}
    }
}

fn is_required(schema: &Value, key: &str) -> bool {
    schema
        .get("required")
        .and_then(Value::as_array)
        .is_some_and(|r| r.iter().any(|k| k.as_str() == Some(key)))
}

fn required(field: &str) -> Cause {
    Cause {
        reason: "FieldValueRequired".into(),
        message: "Required value".into(),
        field: field.into(),
    }
}

fn invalid(field: &str, value: &Value, detail: String) -> Cause {
    Cause {
        reason: "FieldValueInvalid".into(),
        message: format!("Invalid value: {}: {detail}", show(value)),
        field: field.into(),
    }
}

/// A value as Go's field errors print it: strings quoted, scalars plain, composites by type.
fn show(value: &Value) -> String {
    match value {
        Value::String(s) => go_quote(s),
        Value::Object(_) => "\"object\"".into(),
        Value::Array(_) => "\"array\"".into(),
        Value::Null => "\"null\"".into(),
        other => other.to_string(),
    }
}

/// The JSON type of a value as kube-apiserver names it in `must be of type` errors (`number` for 1.5).
pub fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_ok(expected: &str, value: &Value) -> bool {
    match (expected, value) {
        ("object", Value::Object(_))
        | ("array", Value::Array(_))
        | ("string", Value::String(_)) => true,
        ("boolean", Value::Bool(_)) | ("number", Value::Number(_)) => true,
        ("integer", Value::Number(n)) => {
            n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        _ => false,
    }
}

/// Checks one value against its schema node, pushing kube-apiserver-worded causes.
fn check(schema: &Value, value: &Value, path: &str, causes: &mut Vec<Cause>) {
    if value.is_null() {
        if schema.get("nullable").and_then(Value::as_bool) == Some(true) {
            return;
        }
        if let Some(t) = schema.get("type").and_then(Value::as_str) {
            causes.push(Cause {
                reason: "FieldValueTypeInvalid".into(),
                message: format!(
                    "Invalid value: \"null\": {path} in body must be of type {t}: \"null\""
                ),
                field: path.into(),
            });
        }
        return;
    }
    let int_or_string = schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true);
    if int_or_string {
        if !(value.is_string() || type_ok("integer", value)) {
            causes.push(Cause {
                reason: "FieldValueTypeInvalid".into(),
                message: format!(
                    "Invalid value: \"{}\": {path} in body must be of type integer,string: \"{}\"",
                    json_type(value),
                    json_type(value)
                ),
                field: path.into(),
            });
            return;
        }
    } else if let Some(t) = schema.get("type").and_then(Value::as_str)
        && !type_ok(t, value)
    {
        causes.push(Cause {
            reason: "FieldValueTypeInvalid".into(),
            message: format!(
                "Invalid value: \"{}\": {path} in body must be of type {t}: \"{}\"",
                json_type(value),
                json_type(value)
            ),
            field: path.into(),
        });
        return;
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        let supported: Vec<String> = options.iter().map(show_enum).collect();
        causes.push(Cause {
            reason: "FieldValueNotSupported".into(),
            message: format!(
                "Unsupported value: {}: supported values: {}",
                show_enum(value),
                supported.join(", ")
            ),
            field: path.into(),
        });
    }
    match value {
        Value::String(s) => check_string(schema, s, value, path, causes),
        Value::Number(n) => check_number(schema, n.as_f64().unwrap_or(0.0), value, path, causes),
        Value::Array(items) => check_array(schema, items, path, causes),
        Value::Object(obj) => check_object(schema, obj, path, causes),
        _ => {}
    }
    for sub in schema
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        check(sub, value, path, causes);
    }
    for (key, word) in [("anyOf", "any of"), ("oneOf", "exactly one of")] {
        if let Some(branches) = schema.get(key).and_then(Value::as_array) {
            let passing = branches
                .iter()
                .filter(|b| {
                    let mut c = Vec::new();
                    check(b, value, path, &mut c);
                    c.is_empty()
                })
                .count();
            let ok = if key == "anyOf" {
                passing >= 1
            } else {
                passing == 1
            };
            if !ok {
                causes.push(invalid(
                    path,
                    value,
                    format!("{path} in body must match {word} the schemas"),
                ));
            }
        }
    }
}

fn show_enum(v: &Value) -> String {
    match v {
        Value::String(s) => go_quote(s),
        other => other.to_string(),
    }
}

fn num(schema: &Value, key: &str) -> Option<f64> {
    schema.get(key).and_then(Value::as_f64)
}

fn fmt_num(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{}", f as i64)
    } else {
        f.to_string()
    }
}

fn check_string(schema: &Value, s: &str, value: &Value, path: &str, causes: &mut Vec<Cause>) {
    let len = s.chars().count() as f64;
    if let Some(max) = num(schema, "maxLength")
        && len > max
    {
        causes.push(Cause {
            reason: "FieldValueTooLong".into(),
            message: format!("Too long: may not be more than {} bytes", fmt_num(max)),
            field: path.into(),
        });
    }
    if let Some(min) = num(schema, "minLength")
        && len < min
    {
        causes.push(invalid(
            path,
            value,
            format!(
                "{path} in body should be at least {} chars long",
                fmt_num(min)
            ),
        ));
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        match compiled_pattern(pattern) {
            Ok(re) if re.is_match(s) => {}
            Ok(_) => causes.push(invalid(
                path,
                value,
                format!("{path} in body should match '{pattern}'"),
            )),
            Err(e) => causes.push(invalid(
                path,
                value,
                format!("pattern '{pattern}' does not compile: {e}"),
            )),
        }
    }
    if schema.get("format").and_then(Value::as_str) == Some("date-time")
        && chrono::DateTime::parse_from_rfc3339(s).is_err()
    {
        causes.push(invalid(
            path,
            value,
            format!("{path} in body must be of type date-time: {}", go_quote(s)),
        ));
    }
}

fn check_number(schema: &Value, n: f64, value: &Value, path: &str, causes: &mut Vec<Cause>) {
    let exclusive = |k: &str| schema.get(k).and_then(Value::as_bool) == Some(true);
    if let Some(min) = num(schema, "minimum") {
        if exclusive("exclusiveMinimum") && n <= min {
            causes.push(invalid(
                path,
                value,
                format!("{path} in body should be greater than {}", fmt_num(min)),
            ));
        } else if n < min {
            causes.push(invalid(
                path,
                value,
                format!(
                    "{path} in body should be greater than or equal to {}",
                    fmt_num(min)
                ),
            ));
        }
    }
    if let Some(max) = num(schema, "maximum") {
        if exclusive("exclusiveMaximum") && n >= max {
            causes.push(invalid(
                path,
                value,
                format!("{path} in body should be less than {}", fmt_num(max)),
            ));
        } else if n > max {
            causes.push(invalid(
                path,
                value,
                format!(
                    "{path} in body should be less than or equal to {}",
                    fmt_num(max)
                ),
            ));
        }
    }
    if let Some(m) = num(schema, "multipleOf")
        && m != 0.0
        && (n / m).fract() != 0.0
    {
        causes.push(invalid(
            path,
            value,
            format!("{path} in body should be a multiple of {}", fmt_num(m)),
        ));
    }
}

fn check_array(schema: &Value, items: &[Value], path: &str, causes: &mut Vec<Cause>) {
    let len = items.len() as f64;
    if let Some(max) = num(schema, "maxItems")
        && len > max
    {
        causes.push(Cause {
            reason: "FieldValueTooMany".into(),
            message: format!(
                "Too many: {}: must have at most {} items",
                items.len(),
                fmt_num(max)
            ),
            field: path.into(),
        });
    }
    if let Some(min) = num(schema, "minItems")
        && len < min
    {
        causes.push(invalid(
            path,
            &Value::from(items.len()),
            format!("{path} in body should have at least {} items", fmt_num(min)),
        ));
    }
    if let Some(sub) = schema.get("items") {
        for (i, item) in items.iter().enumerate() {
            check(sub, item, &format!("{path}[{i}]"), causes);
        }
    }
    match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("set") => {
            for (i, item) in items.iter().enumerate() {
                if items[..i].contains(item) {
                    causes.push(Cause {
                        reason: "FieldValueDuplicate".into(),
                        message: format!("Duplicate value: {item}"),
                        field: format!("{path}[{i}]"),
                    });
                }
            }
        }
        Some("map") => {
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|k| k.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let key_of = |item: &Value| -> Value {
                let mut m = Map::new();
                for k in &keys {
                    if let Some(v) = item.get(*k) {
                        m.insert((*k).to_string(), v.clone());
                    }
                }
                Value::Object(m)
            };
            for (i, item) in items.iter().enumerate() {
                let key = key_of(item);
                if items[..i].iter().any(|prev| key_of(prev) == key) {
                    causes.push(Cause {
                        reason: "FieldValueDuplicate".into(),
                        message: format!("Duplicate value: {key}"),
                        field: format!("{path}[{i}]"),
                    });
                }
            }
        }
        _ => {}
    }
}

fn check_object(schema: &Value, obj: &Map<String, Value>, path: &str, causes: &mut Vec<Cause>) {
    let embedded = schema
        .get("x-kubernetes-embedded-resource")
        .and_then(Value::as_bool)
        == Some(true);
    if let Some(required_keys) = schema.get("required").and_then(Value::as_array) {
        for key in required_keys.iter().filter_map(Value::as_str) {
            if !obj.contains_key(key) {
                causes.push(required(&format!("{path}.{key}")));
            }
        }
    }
    let len = obj.len() as f64;
    if let Some(max) = num(schema, "maxProperties")
        && len > max
    {
        causes.push(Cause {
            reason: "FieldValueTooMany".into(),
            message: format!(
                "Too many: {}: must have at most {} items",
                obj.len(),
                fmt_num(max)
            ),
            field: path.into(),
        });
    }
    if let Some(min) = num(schema, "minProperties")
        && len < min
    {
        causes.push(invalid(
            path,
            &Value::from(obj.len()),
            format!(
                "{path} in body should have at least {} properties",
                fmt_num(min)
            ),
        ));
    }
    let props = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    for (key, v) in obj {
        if embedded && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        if let Some(sub) = props.and_then(|p| p.get(key)) {
            check(sub, v, &format!("{path}.{key}"), causes);
        } else if let Some(sub) = additional {
            check(sub, v, &format!("{path}[{key}]"), causes);
        }
    }
}

/// The schema type at a kube-cel field path such as `spec.members[0]` (for `Invalid value: "<type>"`).
fn type_at(schema: &Value, path: &str) -> String {
    let mut node = schema;
    for segment in path.split('.').filter(|s| !s.is_empty()) {
        let (name, indexes) = match segment.find('[') {
            Some(i) => (&segment[..i], segment[i..].matches('[').count()),
            None => (segment, 0),
        };
        if !name.is_empty() {
            match node.get("properties").and_then(|p| p.get(name)) {
                Some(next) => node = next,
                None => return "object".into(),
            }
        }
        for _ in 0..indexes {
            match node
                .get("items")
                .or_else(|| node.get("additionalProperties"))
            {
                Some(next) => node = next,
                None => return "object".into(),
            }
        }
    }
    node.get("type")
        .and_then(Value::as_str)
        .unwrap_or("object")
        .to_string()
}

/// A schema's `pattern`, compiled once per process: a CRD has a handful of patterns but a write of a
/// large object checks them against thousands of values (compiling each time took a seventh of the
/// test API server's CPU in the freeze benchmark).
fn compiled_pattern(pattern: &str) -> Result<regex::Regex, String> {
    static PATTERNS: std::sync::LazyLock<
        std::sync::Mutex<std::collections::HashMap<String, Result<regex::Regex, String>>>,
    > = std::sync::LazyLock::new(Default::default);
    let mut patterns = PATTERNS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(compiled) = patterns.get(pattern) {
        return compiled.clone();
    }
    let compiled = regex::Regex::new(pattern).map_err(|e| e.to_string());
    patterns.insert(pattern.to_owned(), compiled.clone());
    compiled
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        let raw = json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["size"],
                    "properties": {
                        "size": {"type": "integer", "minimum": 1, "maximum": 5},
                        "mode": {"type": "string", "enum": ["A", "B"], "default": "A"},
                        "name": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5},
                        "items": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                    },
                    "x-kubernetes-validations": [{"rule": "self.size != 3", "message": "three is right out"}]
                },
                "status": {"type": "object", "properties": {
                    "epoch": {"type": "integer",
                              "x-kubernetes-validations": [{"rule": "self >= oldSelf", "message": "epoch may not decrease"}]}
                }}
            }
        });
        match Schema::new(raw) {
            Ok(s) => s,
            Err(e) => panic!("schema: {e}"),
        }
    }

    fn messages(causes: &[Cause]) -> Vec<String> {
        causes.iter().map(Cause::display).collect()
    }

    #[test]
    fn prunes_unknown_fields_but_keeps_preserved_ones() {
        let s = schema();
        let mut obj = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "a"}, "extra": 1,
                             "spec": {"size": 1, "bogus": true, "free": {"anything": [1]}}});
        let pruned = s.prune(&mut obj);
        assert_eq!(
            pruned,
            vec![".extra".to_string(), ".spec.bogus".to_string()]
        );
        assert_eq!(obj["spec"]["free"]["anything"], json!([1]));
        assert_eq!(obj["metadata"]["name"], "a");
    }

    #[test]
    fn rules_see_their_own_nodes_whole_and_nothing_without_a_rule() {
        let raw = json!({"type": "object", "properties": {
            "spec": {"type": "object",
                     "x-kubernetes-validations": [{"rule": "self.a == self.b"}],
                     "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
            "status": {"type": "object", "properties": {
                "epoch": {"type": "integer", "x-kubernetes-validations": [{"rule": "self >= oldSelf"}]},
                "members": {"type": "array", "items": {"type": "object",
                            "properties": {"name": {"type": "string"}}}},
                "rows": {"type": "array", "items": {"type": "object", "properties": {
                    "n": {"type": "integer", "x-kubernetes-validations": [{"rule": "self > 0"}]},
                    "note": {"type": "string"}}}}}}}});
        let tree = rule_tree(&raw).unwrap();
        let object = json!({"metadata": {"name": "x"},
                            "spec": {"a": 1, "b": 1, "extra": true},
                            "status": {"epoch": 2, "members": [{"name": "v"}],
                                       "rows": [{"n": 1, "note": "kept out"}]}});
        assert_eq!(
            rule_view(&tree, &object),
            json!({"spec": {"a": 1, "b": 1, "extra": true},
                   "status": {"epoch": 2, "rows": [{"n": 1}]}})
        );
        assert!(
            rule_tree(&json!({"type": "object", "properties": {"a": {"type": "string"}}}))
                .is_none()
        );
        // The rules still judge, and name, the same fields.
        let s = Schema::new(raw).unwrap();
        let bad =
            json!({"spec": {"a": 1, "b": 1}, "status": {"epoch": 1, "rows": [{"n": 1}, {"n": 0}]}});
        let old = json!({"spec": {"a": 1, "b": 1}, "status": {"epoch": 2}});
        let mut fields: Vec<_> = s
            .validate(&bad, Some(&old))
            .into_iter()
            .map(|c| c.field)
            .collect();
        fields.sort();
        assert_eq!(fields, vec!["status.epoch", "status.rows[1].n"]);
    }

    #[test]
    fn applies_defaults() {
        let obj = schema().apply_defaults(&json!({"spec": {"size": 1}}));
        assert_eq!(obj["spec"]["mode"], "A");
    }

    #[test]
    fn structural_errors_read_like_kube_apiserver() {
        let s = schema();
        let causes = s.validate(
            &json!({"spec": {"mode": "C", "name": "ABC", "items": ["a", "b", "c"]}}),
            None,
        );
        let msgs = messages(&causes);
        assert!(
            msgs.contains(&"spec.size: Required value".to_string()),
            "{msgs:?}"
        );
        assert!(
            msgs.contains(
                &"spec.mode: Unsupported value: \"C\": supported values: \"A\", \"B\"".to_string()
            ),
            "{msgs:?}"
        );
        assert!(
            msgs.contains(
                &"spec.name: Invalid value: \"ABC\": spec.name in body should match '^[a-z]+$'"
                    .to_string()
            ),
            "{msgs:?}"
        );
        assert!(
            msgs.contains(&"spec.items: Too many: 3: must have at most 2 items".to_string()),
            "{msgs:?}"
        );
        let causes = s.validate(&json!({"spec": {"size": 9}}), None);
        assert_eq!(
            messages(&causes),
            vec![
                "spec.size: Invalid value: 9: spec.size in body should be less than or equal to 5"
            ]
        );
        let causes = s.validate(&json!({"spec": {"size": "x"}}), None);
        assert_eq!(causes[0].reason, "FieldValueTypeInvalid");
    }

    #[test]
    fn cel_rules_and_transition_rules_carry_their_message() {
        let s = schema();
        let causes = s.validate(&json!({"spec": {"size": 3}}), None);
        assert_eq!(
            messages(&causes),
            vec!["spec: Invalid value: \"object\": three is right out"]
        );
        let old = json!({"spec": {"size": 1}, "status": {"epoch": 4}});
        assert!(
            s.validate(
                &json!({"spec": {"size": 1}, "status": {"epoch": 5}}),
                Some(&old)
            )
            .is_empty()
        );
        let causes = s.validate(
            &json!({"spec": {"size": 1}, "status": {"epoch": 3}}),
            Some(&old),
        );
        assert_eq!(
            messages(&causes),
            vec!["status.epoch: Invalid value: \"integer\": epoch may not decrease"]
        );
    }

    #[test]
    fn a_rule_that_does_not_compile_refuses_the_schema() {
        let raw = json!({"type": "object", "x-kubernetes-validations": [{"rule": "self.a >"}]});
        assert!(Schema::new(raw).is_err());
    }
}
