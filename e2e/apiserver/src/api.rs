//! The verbs on resources — get, list, create, update, patch (JSON, merge, strategic, apply), delete,
//! deletecollection — for the main resource and the `/status` subresource, as kube-apiserver answers them.
//! Watch is in [`crate::watch`]; HTTP is in [`crate::http`]. Every write runs under the store's lock from
//! read to commit, so a resourceVersion precondition and the commit are one step.
//!
//! Rules kept here: `status` of a type with a status subresource changes only through `/status` (and is
//! dropped on create of a custom resource); `metadata.generation` starts at 1 and grows only when something
//! other than `metadata` and (such a) `status` changes, and when the object is marked for deletion; a
//! write that changes nothing does not get a new resourceVersion; an object with finalizers is deleted by
//! setting `deletionTimestamp` (it then takes no new finalizers), and goes when the last finalizer is
//! removed; bodies over 3 MiB get `413`, ConfigMaps and Secrets over 1 MiB of data `422`, and objects
//! over etcd's 1.5 MiB `500`; deleting a namespace deletes what is in it; deleting a CRD deletes its
//! objects and unregisters its type. Owner references are not garbage-collected.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use crate::error::{ApiError, Cause, go_quote};
use crate::managed::{self, Scope};
use crate::patch::{self, PatchType};
use crate::resources::{self, CRD_GROUP, CRD_PLURAL, ResourceType};
use crate::selector::{FieldSelector, LabelSelector, Selectors};
use crate::store::{ChangeKind, Inner, ObjectKey, resource_version};

/// What a request addresses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Target {
    /// API group (empty for core).
    pub group: String,
    /// Version.
    pub version: String,
    /// Namespace from the path.
    pub namespace: Option<String>,
    /// Resource plural.
    pub plural: String,
    /// Object name.
    pub name: Option<String>,
    /// Subresource, e.g. `status`.
    pub subresource: Option<String>,
}

impl Target {
    /// Parses `/api/v1/...` and `/apis/{group}/{version}/...` resource paths. `None` for anything else.
    pub fn parse(path: &str) -> Option<Self> {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match segs.as_slice() {
            ["api", version, rest @ ..] => (String::new(), version.to_string(), rest),
            ["apis", group, version, rest @ ..] => (group.to_string(), version.to_string(), rest),
            _ => return None,
        };
        let owned = |s: &&str| s.to_string();
        let (namespace, rest) = match rest {
            // /namespaces/{ns}/{plural}... but not /namespaces/{name}/status|finalize.
            ["namespaces", ns, plural, tail @ ..]
                if !(tail.is_empty() && matches!(*plural, "status" | "finalize")) =>
            {
                (Some(ns.to_string()), [&[*plural][..], tail].concat())
            }
            other => (None, other.to_vec()),
        };
        let (plural, name, subresource) = match rest.as_slice() {
            [plural] => (owned(plural), None, None),
            [plural, name] => (owned(plural), Some(owned(name)), None),
            [plural, name, sub] => (owned(plural), Some(owned(name)), Some(owned(sub))),
            _ => return None,
        };
        if plural.is_empty() || name.as_deref() == Some("") {
            return None;
        }
        Some(Self {
            group,
            version,
            namespace,
            plural,
            name,
            subresource,
        })
    }
}

/// The query string, decoded.
#[derive(Debug, Clone, Default)]
pub struct Query(HashMap<String, String>);

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let decoded = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match decoded {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Query {
    /// Parses a raw query string.
    pub fn parse(raw: Option<&str>) -> Self {
        let map = raw
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (percent_decode(k), percent_decode(v)),
                None => (percent_decode(p), String::new()),
            })
            .collect();
        Self(map)
    }

    /// A parameter's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// A boolean parameter (`true` or `1`).
    pub fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }

    /// The label and field selectors.
    pub fn selectors(&self) -> Result<Selectors, ApiError> {
        Ok(Selectors {
            labels: LabelSelector::parse(self.get("labelSelector").unwrap_or_default())?,
            fields: FieldSelector::parse(self.get("fieldSelector").unwrap_or_default())?,
        })
    }

    fn dry_run(&self) -> bool {
        self.get("dryRun").is_some_and(|v| v == "All")
    }
}

/// A successful answer: HTTP code, body, and `Warning` headers.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// HTTP status.
    pub code: u16,
    /// JSON body.
    pub body: Value,
    /// Texts for `Warning: 299 - "..."` headers.
    pub warnings: Vec<String>,
}

impl Outcome {
    fn ok(body: Value) -> Self {
        Self {
            code: 200,
            body,
            warnings: vec![],
        }
    }
}

/// A request on a resource, everything but the lock.
#[derive(Debug)]
pub struct Call<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// What it addresses.
    pub target: &'a Target,
    /// The query.
    pub query: &'a Query,
    /// The body.
    pub body: &'a [u8],
    /// `Content-Type`.
    pub content_type: &'a str,
    /// `User-Agent`, for the default field manager.
    pub user_agent: &'a str,
    /// `Accept`, for Table answers.
    pub accept: &'a str,
    /// The time to stamp (RFC 3339).
    pub now: &'a str,
}

impl Call<'_> {
    fn manager(&self) -> String {
        match self.query.get("fieldManager") {
            Some(m) if !m.is_empty() => m.to_string(),
            _ => self
                .user_agent
                .split(['/', ' '])
                .next()
                .filter(|s| !s.is_empty())
                .unwrap_or("unknown")
                .to_string(),
        }
    }

    fn api_version(&self) -> String {
        if self.target.group.is_empty() {
            self.target.version.clone()
        } else {
            format!("{}/{}", self.target.group, self.target.version)
        }
    }
}

/// Resolves the request's type, refusing a namespace on a cluster-scoped type and the reverse for
/// single objects.
pub fn resolve(inner: &Inner, target: &Target) -> Result<std::sync::Arc<ResourceType>, ApiError> {
    let t = inner
        .registry
        .lookup(&target.group, &target.version, &target.plural)
        .ok_or_else(ApiError::no_route)?;
    if target.namespace.is_some() && !t.namespaced {
        return Err(ApiError::no_route());
    }
    if t.namespaced && target.namespace.is_none() && target.name.is_some() {
        return Err(ApiError::no_route());
    }
    match target.subresource.as_deref() {
        None => {}
        Some("status") if t.status_subresource => {}
        Some("finalize") if t.plural == "namespaces" => {}
        Some(_) => return Err(ApiError::no_route()),
    }
    Ok(t)
}

/// Runs a non-watch request.
pub fn handle(inner: &mut Inner, call: &Call<'_>) -> Result<Outcome, ApiError> {
    let t = resolve(inner, call.target)?;
    match (call.method, call.target.name.is_some()) {
        ("GET", true) => {
            let object = get(inner, &t, call)?;
            if crate::table::wants_table(call.accept) {
                let meta = json!({"resourceVersion": inner.rv().to_string()});
                let include = call.query.get("includeObject");
                return Ok(Outcome::ok(crate::table::table(
                    &t,
                    &call.target.version,
                    &[object],
                    meta,
                    include,
                )));
            }
            Ok(Outcome::ok(object))
        }
        ("GET", false) => {
            let mut listed = list(inner, &t, call)?;
            if crate::table::wants_table(call.accept) {
                let items = match listed.get_mut("items").map(Value::take) {
                    Some(Value::Array(items)) => items,
                    _ => vec![],
                };
                let meta = listed.get("metadata").cloned().unwrap_or_default();
                let include = call.query.get("includeObject");
                return Ok(Outcome::ok(crate::table::table(
                    &t,
                    &call.target.version,
                    &items,
                    meta,
                    include,
                )));
            }
            Ok(Outcome::ok(listed))
        }
        ("POST", false) if call.target.subresource.is_none() => create(inner, &t, call),
        ("PUT", true) => update(inner, &t, call),
        ("PATCH", true) => patch(inner, &t, call),
        ("DELETE", true) if call.target.subresource.is_none() => {
            delete(inner, &t, call).map(Outcome::ok)
        }
        ("DELETE", false) => delete_collection(inner, &t, call).map(Outcome::ok),
        (method, _) => Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource: {method}"
        ))),
    }
}

fn key_of(target: &Target) -> ObjectKey {
    (
        target.namespace.clone().unwrap_or_default(),
        target.name.clone().unwrap_or_default(),
    )
}

fn existing(inner: &Inner, t: &ResourceType, target: &Target) -> Result<Value, ApiError> {
    inner
        .get(&t.storage, &key_of(target))
        .cloned()
        .ok_or_else(|| {
            ApiError::not_found(
                &t.group,
                &t.plural,
                target.name.as_deref().unwrap_or_default(),
            )
        })
}

fn get(inner: &Inner, t: &ResourceType, call: &Call<'_>) -> Result<Value, ApiError> {
    Ok(t.to_served(existing(inner, t, call.target)?, &call.target.version))
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// `continue` tokens: `<rv>-<hex(namespace)>-<hex(name)>` of the last object sent.
fn parse_continue(token: &str) -> Result<(u64, ObjectKey), ApiError> {
    let bad = || ApiError::bad_request(format!("invalid continue token {token:?}"));
    let mut parts = token.splitn(3, '-');
    let rv = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let ns = parts.next().and_then(unhex).ok_or_else(bad)?;
    let name = parts.next().and_then(unhex).ok_or_else(bad)?;
    Ok((rv, (ns, name)))
}

fn list(inner: &Inner, t: &ResourceType, call: &Call<'_>) -> Result<Value, ApiError> {
    let selectors = call.query.selectors()?;
    let limit: usize = call
        .query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let (list_rv, after) = match call.query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let (rv, key) = parse_continue(token)?;
            (rv, Some(key))
        }
        None => (inner.rv(), None),
    };
    let mut items = Vec::new();
    let mut last: Option<ObjectKey> = None;
    let mut more = false;
    for (key, object) in inner.list(&t.storage, call.target.namespace.as_deref(), after.as_ref()) {
        if !selectors.matches(object) {
            continue;
        }
        if items.len() == limit {
            more = true;
            break;
        }
        items.push(t.to_served(object.clone(), &call.target.version));
        last = Some(key.clone());
    }
    let mut meta = Map::new();
    meta.insert("resourceVersion".into(), Value::String(list_rv.to_string()));
    if more && let Some((ns, name)) = last {
        meta.insert(
            "continue".into(),
            Value::String(format!("{list_rv}-{}-{}", hex(&ns), hex(&name))),
        );
    }
    Ok(json!({
        "kind": t.list_kind,
        "apiVersion": t.api_version(&call.target.version),
        "metadata": Value::Object(meta),
        "items": items,
    }))
}

fn parse_body(call: &Call<'_>) -> Result<Value, ApiError> {
    if call.content_type.contains("protobuf") {
        return crate::protobuf::decode(call.body)
            .ok_or_else(|| ApiError::unsupported_body(call.content_type));
    }
    if call.content_type.contains("cbor") {
        return Err(ApiError::unsupported_body(call.content_type));
    }
    let v: Value = if call.content_type.contains("yaml") {
        // Clients sending apply patches (`application/apply-patch+yaml`) mostly send JSON, a subset of
        // YAML that serde_json parses several times faster.
        match serde_json::from_slice(call.body) {
            Ok(v) => v,
            Err(_) => serde_yaml_ng::from_slice(call.body)
                .map_err(|e| ApiError::bad_request(format!("invalid YAML: {e}")))?,
        }
    } else {
        serde_json::from_slice(call.body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))?
    };
    if !v.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    Ok(v)
}

/// `metadata` as a map, made one if it is missing or not a map. `None` only if the object is not a map.
fn meta_mut(object: &mut Value) -> Option<&mut Map<String, Value>> {
    let top = object.as_object_mut()?;
    let meta = top
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    meta.as_object_mut()
}

fn meta_str<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    object
        .get("metadata")
        .and_then(|m| m.get(key))
        .and_then(Value::as_str)
}

fn check_kind(t: &ResourceType, call: &Call<'_>, body: &Value) -> Result<(), ApiError> {
    let kind = body.get("kind").and_then(Value::as_str).unwrap_or_default();
    let api_version = body
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !kind.is_empty() && kind != t.kind {
        return Err(ApiError::bad_request(format!(
            "the kind {kind} in the body does not match the resource {}",
            t.plural
        )));
    }
    if !api_version.is_empty() && api_version != call.api_version() {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({})",
            call.api_version()
        )));
    }
    Ok(())
}

/// A lowercase RFC 1123 subdomain, as kube-apiserver requires of object names: at most 253 characters,
/// dot-separated labels of lowercase letters, digits and hyphens, each starting and ending with a letter
/// or digit (`a..b` and `a.-b` are refused).
pub fn name_ok(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn generate_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = crate::random_u64();
    (0..5)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

/// Checks the custom-resource schema, pruning and defaulting first. Returns the pruned field paths.
fn validate_custom(
    t: &ResourceType,
    version: &str,
    object: &mut Value,
    old: Option<&Value>,
    name: &str,
) -> Result<Vec<String>, ApiError> {
    let Some(schema) = t.version(version).and_then(|v| v.schema.clone()) else {
        return Ok(vec![]);
    };
    let pruned = schema.prune(object);
    *object = schema.apply_defaults(object);
    let causes = schema.validate(object, old);
    if !causes.is_empty() {
        return Err(ApiError::invalid(&t.kind, &t.group, name, &causes));
    }
    Ok(pruned)
}

/// Shapes `new` as the successor of `old` (absent on create) and commits it. `record` names the manager
/// of an Update (None for an apply, whose ownership is already written).
struct Write<'a> {
    t: &'a ResourceType,
    call: &'a Call<'a>,
    scope: Scope,
    record: Option<String>,
}

impl Write<'_> {
    fn finish(
        &self,
        inner: &mut Inner,
        old: Option<&Value>,
        mut new: Value,
    ) -> Result<Outcome, ApiError> {
        let t = self.t;
        let call = self.call;
        let name = meta_str(&new, "name").unwrap_or_default().to_string();
        let mut warnings = Vec::new();
        // Validation (custom resources: schema and CEL; built-ins: field names), then field validation
        // for the unknown fields that were dropped.
        let old_served = old.map(|o| t.to_served(o.clone(), &call.target.version));
        let mut served = t.to_served(new, &call.target.version);
        let pruned = if t.custom {
            validate_custom(
                t,
                &call.target.version,
                &mut served,
                old_served.as_ref(),
                &name,
            )?
        } else {
            match crate::builtin_schema::schema(&t.group, &t.plural) {
                Some(schema) => crate::builtin_schema::prune(&schema, &mut served),
                None => vec![],
            }
        };
        new = t.to_stored(served);
        if !pruned.is_empty() {
            let unknown: Vec<String> = pruned
                .iter()
                .map(|p| format!("unknown field \"{}\"", &p[1..]))
                .collect();
            match call.query.get("fieldValidation").unwrap_or("Warn") {
                "Strict" => {
                    return Err(ApiError::bad_request(format!(
                        "strict decoding error: {}",
                        unknown.join(", ")
                    )));
                }
                "Ignore" => {}
                _ => warnings.extend(unknown),
            }
        }
        let crd_type = if t.group == CRD_GROUP && t.plural == CRD_PLURAL {
            let crd_t = resources::from_crd(&new)?;
            if let Some(other) = inner.registry.get(&crd_t.group, &crd_t.plural)
                && !other.custom
            {
                return Err(ApiError::invalid(
                    &t.kind,
                    &t.group,
                    &name,
                    &[Cause {
                        reason: "FieldValueInvalid".into(),
                        message: format!(
                            "Invalid value: \"{}\": the name of a built-in resource",
                            crd_t.plural
                        ),
                        field: "spec.names.plural".into(),
                    }],
                ));
            }
            Some(crd_t)
        } else {
            None
        };
        if !name_ok(&name) {
            return Err(ApiError::invalid(
                &t.kind,
                &t.group,
                &name,
                &[Cause {
                    reason: "FieldValueInvalid".into(),
                    message: format!(
                        "Invalid value: {}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
                        go_quote(&name)
                    ),
                    field: "metadata.name".into(),
                }],
            ));
        }
        if !t.custom && t.group.is_empty() {
            data_size_limit(t, &new, &name)?;
        }
        // An object being deleted takes no new finalizers.
        if let Some(o) = old
            && o.pointer("/metadata/deletionTimestamp")
                .is_some_and(|d| !d.is_null())
        {
            let list = |object: &Value| -> Vec<String> {
                object
                    .pointer("/metadata/finalizers")
                    .and_then(Value::as_array)
                    .map(|l| {
                        l.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let before = list(o);
            let mut added: Vec<String> = list(&new)
                .into_iter()
                .filter(|f| !before.contains(f))
                .collect();
            added.sort();
            added.dedup();
            if !added.is_empty() {
                let shown: Vec<String> = added.iter().map(|f| format!("{f:?}")).collect();
                return Err(ApiError::invalid(
                    &t.kind,
                    &t.group,
                    &name,
                    &[Cause {
                        reason: "FieldValueForbidden".into(),
                        message: format!(
                            "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
                            shown.join(", ")
                        ),
                        field: "metadata.finalizers".into(),
                    }],
                ));
            }
        }
        // Generation.
        if t.tracks_generation {
            let generation = match old {
                None => 1,
                Some(o) => {
                    let g = o
                        .get("metadata")
                        .and_then(|m| m.get("generation"))
                        .and_then(Value::as_i64)
                        .unwrap_or(1);
                    if spec_changed(o, &new, t.status_subresource) {
                        g + 1
                    } else {
                        g
                    }
                }
            };
            if let Some(meta) = meta_mut(&mut new) {
                meta.insert("generation".into(), generation.into());
            }
        }
        if let Some(manager) = &self.record {
            managed::record_update(
                old,
                &mut new,
                manager,
                self.scope,
                &call.api_version(),
                call.now,
            );
        }
        if let Some(crd_t) = &crd_type {
            let status = resources::crd_status(&new, crd_t, call.now);
            if let Some(obj) = new.as_object_mut() {
                obj.insert("status".into(), status);
            }
        }
        // etcd's limit on one request (1.5 MiB), here on the object's JSON.
        if serde_json::to_vec(&new).map_or(0, |v| v.len()) > ETCD_MAX_REQUEST_BYTES {
            return Err(ApiError::etcd_too_large());
        }
        let dry = call.query.dry_run();
        let committed = match old {
            None => {
                // As kube-apiserver (and etcd's create): a taken name is found only once the object is
                // valid, so an invalid object is refused as invalid even under an existing name.
                let key = (
                    call.target.namespace.clone().unwrap_or_default(),
                    name.clone(),
                );
                if inner.get(&t.storage, &key).is_some() {
                    return Err(ApiError::already_exists(&t.group, &t.plural, &name));
                }
                if dry {
                    new
                } else {
                    inner.commit(ChangeKind::Added, &t.storage, new)?
                }
            }
            Some(o) if same_object(o, &new) => o.clone(),
            Some(_) => {
                let finished = new
                    .get("metadata")
                    .is_some_and(|m| m.get("deletionTimestamp").is_some_and(|d| !d.is_null()))
                    && new
                        .get("metadata")
                        .and_then(|m| m.get("finalizers"))
                        .and_then(Value::as_array)
                        .is_none_or(Vec::is_empty);
                if dry {
                    new
                } else if finished {
                    inner.commit(ChangeKind::Deleted, &t.storage, new)?
                } else {
                    inner.commit(ChangeKind::Modified, &t.storage, new)?
                }
            }
        };
        Ok(Outcome {
            code: if old.is_none() { 201 } else { 200 },
            body: t.to_served(committed, &call.target.version),
            warnings,
        })
    }
}

/// etcd's default `--max-request-bytes`.
const ETCD_MAX_REQUEST_BYTES: usize = 1536 * 1024;

/// The most data a ConfigMap or Secret holds (kube-apiserver's `MaxSecretSize`).
const MAX_DATA_BYTES: usize = 1024 * 1024;

/// ConfigMaps and Secrets hold at most 1 MiB of values (decoded), refused as kube-apiserver words it.
fn data_size_limit(t: &ResourceType, object: &Value, name: &str) -> Result<(), ApiError> {
    let values = |key: &str| {
        object
            .get(key)
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
    };
    let decoded = |b64: &str| {
        ((b64.len() / 4) * 3).saturating_sub(b64.bytes().rev().take_while(|b| *b == b'=').count())
    };
    let (size, field) = match t.plural.as_str() {
        "configmaps" => (
            values("data").iter().map(|v| v.len()).sum::<usize>()
                + values("binaryData")
                    .iter()
                    .map(|v| decoded(v))
                    .sum::<usize>(),
            "[]",
        ),
        "secrets" => (
            values("data").iter().map(|v| decoded(v)).sum::<usize>()
                + values("stringData").iter().map(|v| v.len()).sum::<usize>(),
            "data",
        ),
        _ => return Ok(()),
    };
    if size <= MAX_DATA_BYTES {
        return Ok(());
    }
    Err(ApiError::invalid(
        &t.kind,
        &t.group,
        name,
        &[Cause {
            reason: "FieldValueTooLong".into(),
            message: format!("Too long: may not be more than {MAX_DATA_BYTES} bytes"),
            field: field.into(),
        }],
    ))
}

fn without(object: &Value, keys: &[&str]) -> Value {
    let mut o = object.clone();
    if let Some(map) = o.as_object_mut() {
        for k in keys {
            map.remove(*k);
        }
    }
    o
}

fn spec_changed(old: &Value, new: &Value, status_subresource: bool) -> bool {
    let keys: &[&str] = if status_subresource {
        &["metadata", "status"]
    } else {
        &["metadata"]
    };
    without(old, keys) != without(new, keys)
}

fn same_object(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(meta) = meta_mut(&mut v) {
            meta.remove("resourceVersion");
            meta.remove("managedFields");
        }
        v
    };
    strip(old) == strip(new)
}

/// Copies what a client may not change from the stored object.
fn carry_metadata(old: &Value, new: &mut Value) {
    let keep = [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "managedFields",
        "name",
        "namespace",
    ];
    let old_meta = old.get("metadata").cloned().unwrap_or_default();
    let Some(meta) = meta_mut(new) else {
        return;
    };
    for k in keep {
        match old_meta.get(k) {
            Some(v) => {
                meta.insert(k.into(), v.clone());
            }
            None => {
                meta.remove(k);
            }
        }
    }
}

fn create(inner: &mut Inner, t: &ResourceType, call: &Call<'_>) -> Result<Outcome, ApiError> {
    let body = parse_body(call)?;
    check_kind(t, call, &body)?;
    let new = t.to_stored(body);
    create_object(inner, t, call, new, Some(call.manager()))
}

fn create_object(
    inner: &mut Inner,
    t: &ResourceType,
    call: &Call<'_>,
    mut new: Value,
    record: Option<String>,
) -> Result<Outcome, ApiError> {
    let path_ns = call.target.namespace.clone();
    {
        let Some(meta) = meta_mut(&mut new) else {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        };
        if let Some(ns) = &path_ns {
            match meta.get("namespace").and_then(Value::as_str) {
                Some(body_ns) if !body_ns.is_empty() && body_ns != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {
                    meta.insert("namespace".into(), Value::String(ns.clone()));
                }
            }
        } else {
            meta.remove("namespace");
        }
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if name.is_empty() {
            match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    let generated = format!("{prefix}{}", generate_suffix());
                    meta.insert("name".into(), Value::String(generated));
                }
                _ => {
                    return Err(ApiError::invalid(
                        &t.kind,
                        &t.group,
                        "",
                        &[Cause {
                            reason: "FieldValueRequired".into(),
                            message: "Required value: name or generateName is required".into(),
                            field: "metadata.name".into(),
                        }],
                    ));
                }
            }
        }
        meta.insert("uid".into(), Value::String(crate::uid()));
        meta.insert(
            "creationTimestamp".into(),
            Value::String(call.now.to_string()),
        );
        for k in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ] {
            meta.remove(k);
        }
        if record.is_some() {
            meta.remove("managedFields");
        }
    }
    if let Some(ns) = &path_ns {
        let ns_key = (String::new(), ns.clone());
        if inner
            .get(&(String::new(), "namespaces".into()), &ns_key)
            .is_none()
        {
            return Err(ApiError::not_found("", "namespaces", ns));
        }
    }
    if let Some(obj) = new.as_object_mut() {
        if t.custom && t.status_subresource {
            obj.remove("status");
        }
        if t.plural == "namespaces" && t.group.is_empty() {
            obj.insert("status".into(), json!({"phase": "Active"}));
        }
    }
    Write {
        t,
        call,
        scope: Scope::Main {
            status_subresource: t.status_subresource,
        },
        record,
    }
    .finish(inner, None, new)
}

fn scope_of(t: &ResourceType, call: &Call<'_>) -> Scope {
    match call.target.subresource.as_deref() {
        Some("status") => Scope::Status,
        _ => Scope::Main {
            status_subresource: t.status_subresource,
        },
    }
}

/// Builds the successor from the client's version of the object, keeping what this scope cannot change.
fn successor(scope: Scope, old: &Value, mut proposed: Value) -> Value {
    match scope {
        Scope::Status => {
            let mut new = old.clone();
            if let Some(obj) = new.as_object_mut() {
                match proposed.get("status") {
                    Some(s) => obj.insert("status".into(), s.clone()),
                    None => obj.remove("status"),
                };
            }
            new
        }
        Scope::Main { status_subresource } => {
            carry_metadata(old, &mut proposed);
            if status_subresource && let Some(obj) = proposed.as_object_mut() {
                match old.get("status") {
                    Some(s) => obj.insert("status".into(), s.clone()),
                    None => obj.remove("status"),
                };
            }
            proposed
        }
    }
}

fn check_rv(t: &ResourceType, old: &Value, proposed: &Value, name: &str) -> Result<(), ApiError> {
    match meta_str(proposed, "resourceVersion") {
        Some(rv)
            if !rv.is_empty() && rv != meta_str(old, "resourceVersion").unwrap_or_default() =>
        {
            Err(ApiError::stale(&t.group, &t.plural, name))
        }
        _ => Ok(()),
    }
}

fn update(inner: &mut Inner, t: &ResourceType, call: &Call<'_>) -> Result<Outcome, ApiError> {
    let body = parse_body(call)?;
    check_kind(t, call, &body)?;
    let name = call.target.name.clone().unwrap_or_default();
    if meta_str(&body, "name").is_some_and(|n| n != name) {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    let old = existing(inner, t, call.target)?;
    check_rv(t, &old, &body, &name)?;
    let scope = scope_of(t, call);
    let new = successor(scope, &old, t.to_stored(body));
    Write {
        t,
        call,
        scope,
        record: Some(call.manager()),
    }
    .finish(inner, Some(&old), new)
}

fn patch(inner: &mut Inner, t: &ResourceType, call: &Call<'_>) -> Result<Outcome, ApiError> {
    let kind = PatchType::from_content_type(call.content_type)?;
    let scope = scope_of(t, call);
    let name = call.target.name.clone().unwrap_or_default();
    let current = inner.get(&t.storage, &key_of(call.target)).cloned();
    if kind == PatchType::Apply {
        let manager = match call.query.get("fieldManager") {
            Some(m) if !m.is_empty() => m.to_string(),
            _ => {
                return Err(ApiError::bad_request(
                    "PATCH, application/apply-patch+yaml requests must have a fieldManager",
                ));
            }
        };
        let config = parse_body(call)?;
        check_kind(t, call, &config)?;
        if meta_str(&config, "name").is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        let force = call.query.flag("force");
        let config = t.to_stored(config);
        let live = match &current {
            Some(c) => {
                check_rv(t, c, &config, &name)?;
                c.clone()
            }
            None if scope == Scope::Status => {
                return Err(ApiError::not_found(&t.group, &t.plural, &name));
            }
            None => {
                let mut skeleton = json!({"metadata": {"name": name}});
                if let (Some(ns), Some(meta)) = (&call.target.namespace, meta_mut(&mut skeleton)) {
                    meta.insert("namespace".into(), Value::String(ns.clone()));
                }
                t.to_stored(skeleton)
            }
        };
        let new = managed::apply(
            &live,
            &config,
            &manager,
            force,
            scope,
            &call.api_version(),
            call.now,
        )
        .map_err(|conflicts| ApiError::apply_conflicts(&t.group, &t.plural, &name, &conflicts))?;
        return match &current {
            None => create_object(inner, t, call, new, None),
            Some(old) => Write {
                t,
                call,
                scope,
                record: None,
            }
            .finish(inner, Some(old), new),
        };
    }
    let old = current.ok_or_else(|| ApiError::not_found(&t.group, &t.plural, &name))?;
    let mut served = t.to_served(old.clone(), &call.target.version);
    patch::apply(kind, &mut served, call.body)?;
    let proposed = t.to_stored(served);
    check_rv(t, &old, &proposed, &name)?;
    let new = successor(scope, &old, proposed);
    Write {
        t,
        call,
        scope,
        record: Some(call.manager()),
    }
    .finish(inner, Some(&old), new)
}

fn finalizers(object: &Value) -> bool {
    object
        .get("metadata")
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty())
}

fn delete(inner: &mut Inner, t: &ResourceType, call: &Call<'_>) -> Result<Value, ApiError> {
    let name = call.target.name.clone().unwrap_or_default();
    let old = existing(inner, t, call.target)?;
    if !call.body.is_empty()
        && let Ok(options) = serde_json::from_slice::<Value>(call.body)
        && let Some(pre) = options.get("preconditions")
    {
        if let Some(uid) = pre.get("uid").and_then(Value::as_str)
            && Some(uid) != meta_str(&old, "uid")
        {
            return Err(ApiError::conflict(
                &t.group,
                &t.plural,
                &name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&old, "uid").unwrap_or_default()
                ),
            ));
        }
        if let Some(rv) = pre.get("resourceVersion").and_then(Value::as_str)
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(
                &t.group,
                &t.plural,
                &name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta_str(&old, "resourceVersion").unwrap_or_default()
                ),
            ));
        }
    }
    if call.query.dry_run() {
        return Ok(t.to_served(old, &call.target.version));
    }
    delete_object(inner, t, old, call.now).map(|v| t.to_served(v, &call.target.version))
}

/// Deletes one stored object (or marks it, if it has finalizers), cascading for namespaces and CRDs.
fn delete_object(
    inner: &mut Inner,
    t: &ResourceType,
    old: Value,
    now: &str,
) -> Result<Value, ApiError> {
    if finalizers(&old) {
        if old
            .get("metadata")
            .and_then(|m| m.get("deletionTimestamp"))
            .is_some()
        {
            return Ok(old);
        }
        let mut marked = old;
        if let Some(meta) = meta_mut(&mut marked) {
            meta.insert("deletionTimestamp".into(), Value::String(now.to_string()));
            meta.insert("deletionGracePeriodSeconds".into(), 0.into());
            // As kube-apiserver marks an object for deletion: its generation grows.
            if let Some(generation) = meta.get("generation").and_then(Value::as_i64)
                && generation > 0
            {
                meta.insert("generation".into(), (generation + 1).into());
            }
        }
        if t.plural == "namespaces"
            && t.group.is_empty()
            && let Some(obj) = marked.as_object_mut()
        {
            obj.insert("status".into(), json!({"phase": "Terminating"}));
        }
        return inner.commit(ChangeKind::Modified, &t.storage, marked);
    }
    let (_, name) = crate::store::object_key(&old);
    if t.group.is_empty() && t.plural == "namespaces" {
        delete_namespaced_contents(inner, &name, now)?;
    }
    if t.group == CRD_GROUP && t.plural == CRD_PLURAL {
        let group = old
            .pointer("/spec/group")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let plural = old
            .pointer("/spec/names/plural")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let storage = (group, plural);
        let keys: Vec<ObjectKey> = inner
            .list(&storage, None, None)
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            if let Some(obj) = inner.get(&storage, &key).cloned() {
                inner.commit(ChangeKind::Deleted, &storage, obj)?;
            }
        }
    }
    inner.commit(ChangeKind::Deleted, &t.storage, old)
}

fn delete_namespaced_contents(
    inner: &mut Inner,
    namespace: &str,
    now: &str,
) -> Result<(), ApiError> {
    let types: Vec<std::sync::Arc<ResourceType>> = inner
        .registry
        .all()
        .filter(|t| t.namespaced && t.storage == t.key())
        .cloned()
        .collect();
    for t in types {
        let objects: Vec<Value> = inner
            .list(&t.storage, Some(namespace), None)
            .map(|(_, v)| v.clone())
            .collect();
        for object in objects {
            delete_object(inner, &t, object, now)?;
        }
    }
    Ok(())
}

fn delete_collection(
    inner: &mut Inner,
    t: &ResourceType,
    call: &Call<'_>,
) -> Result<Value, ApiError> {
    let selectors = call.query.selectors()?;
    let objects: Vec<Value> = inner
        .list(&t.storage, call.target.namespace.as_deref(), None)
        .filter(|(_, v)| selectors.matches(v))
        .map(|(_, v)| v.clone())
        .collect();
    let mut items = Vec::new();
    for object in objects {
        let done = if call.query.dry_run() {
            object
        } else {
            delete_object(inner, t, object, call.now)?
        };
        items.push(t.to_served(done, &call.target.version));
    }
    Ok(
        json!({"kind": t.list_kind, "apiVersion": t.api_version(&call.target.version),
              "metadata": {"resourceVersion": inner.rv().to_string()}, "items": items}),
    )
}

/// The resourceVersion a watch or list asked for: `None` for "any"/"latest" (unset or `0`).
pub fn requested_rv(query: &Query) -> Result<Option<u64>, ApiError> {
    match query.get("resourceVersion") {
        None | Some("") | Some("0") => Ok(None),
        Some(rv) => rv
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))),
    }
}

/// The stored object's resourceVersion (helper for watch filters).
pub fn rv_of(object: &Value) -> u64 {
    resource_version(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_resource_paths() {
        let t = Target::parse("/api/v1/namespaces/default/configmaps/x");
        assert_eq!(
            t.map(|t| (t.namespace, t.plural, t.name)),
            Some((
                Some("default".into()),
                "configmaps".into(),
                Some("x".into())
            ))
        );
        let t = Target::parse("/api/v1/namespaces/default");
        assert_eq!(
            t.map(|t| (t.namespace, t.plural, t.name)),
            Some((None, "namespaces".into(), Some("default".into())))
        );
        let t = Target::parse("/api/v1/namespaces/default/status");
        assert_eq!(
            t.map(|t| (t.name, t.subresource)),
            Some((Some("default".into()), Some("status".into())))
        );
        let t = Target::parse("/apis/lockstep.dev/v1alpha1/consistencygroups/g/status");
        assert_eq!(
            t.map(|t| (t.group, t.subresource)),
            Some(("lockstep.dev".into(), Some("status".into())))
        );
        assert_eq!(Target::parse("/healthz"), None);
    }

    #[test]
    fn query_decoding_and_continue_tokens() -> Result<(), ApiError> {
        let q = Query::parse(Some("labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=1"));
        assert_eq!(q.get("labelSelector"), Some("app=web,tier in (a)"));
        assert!(q.flag("watch"));
        let token = format!("7-{}-{}", hex("ns"), hex("a-b"));
        assert_eq!(parse_continue(&token)?, (7, ("ns".into(), "a-b".into())));
        Ok(())
    }
}
