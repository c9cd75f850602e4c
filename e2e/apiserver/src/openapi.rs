//! OpenAPI v3 as kube-apiserver publishes it: `/openapi/v3` lists one document per group-version, and
//! `/openapi/v3/api/v1`, `/openapi/v3/apis/{group}/{version}` hold that group-version's paths and schemas.
//!
//! What kubectl needs from them, and what is here:
//! - every resource path with its operations, each carrying `x-kubernetes-group-version-kind` and the
//!   `fieldValidation`, `fieldManager`, `dryRun` (and `force` for PATCH) query parameters, so kubectl
//!   sees server-side field validation and lets the server refuse unknown fields (`fieldValidation=Strict`);
//! - for custom resources, the CRD's `openAPIV3Schema` (with `apiVersion`, `kind` and `metadata` filled in
//!   as kube-apiserver does), so `kubectl explain` prints the field docs;
//! - for built-in kinds, the schemas `k8s-openapi` carries (so `kubectl explain pod.spec` works too).

use serde_json::{Map, Value, json};

use crate::resources::{Registry, ResourceType};

const OBJECT_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";

/// `gv` as it appears in `/openapi/v3` keys: `api/v1` or `apis/{group}/{version}`.
fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`. `hash` changes whenever the documents may have (the client caches by it).
pub fn root(registry: &Registry, hash: &str) -> Value {
    let mut paths = Map::new();
    for t in registry.all() {
        for v in &t.versions {
            let key = gv_path(&t.group, &v.name);
            let url = format!("/openapi/v3/{key}?hash={hash}");
            paths.insert(key, json!({"serverRelativeURL": url}));
        }
    }
    json!({"paths": Value::Object(paths)})
}

/// The schema id kube-apiserver gives a kind: reversed group, version, kind (`dev.lockstep.v1alpha1.Kind`).
fn schema_id(t: &ResourceType, version: &str) -> String {
    if !t.custom
        && let Some(title) = crate::builtin_schema::schema(&t.group, &t.plural)
            .and_then(|s| s.get("title").and_then(Value::as_str).map(str::to_string))
    {
        return title;
    }
    if t.group.is_empty() {
        return format!("io.k8s.api.core.{version}.{}", t.kind);
    }
    let reversed: Vec<&str> = t.group.split('.').rev().collect();
    format!("{}.{version}.{}", reversed.join("."), t.kind)
}

fn gvk(t: &ResourceType, version: &str) -> Value {
    json!({"group": t.group, "version": version, "kind": t.kind})
}

fn param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "description": description, "schema": {"type": "string", "uniqueItems": true}})
}

fn operation(
    t: &ResourceType,
    version: &str,
    action: &str,
    id: &str,
    write: bool,
    patch: bool,
) -> Value {
    let mut params = vec![];
    if write {
        params.push(param(
            "dryRun",
            "When present, indicates that modifications should not be persisted.",
        ));
        params.push(param("fieldManager", "fieldManager is a name associated with the actor or entity that is making these changes."));
        params.push(param(
            "fieldValidation",
            "fieldValidation instructs the server on how to handle objects in the request containing unknown or duplicate fields: Ignore, Warn or Strict.",
        ));
    }
    if patch {
        params.push(json!({"name": "force", "in": "query", "schema": {"type": "boolean", "uniqueItems": true}}));
    }
    let reference = json!({"$ref": format!("#/components/schemas/{}", schema_id(t, version))});
    json!({
        "operationId": format!("{id}{}", t.kind),
        "parameters": params,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": reference}}}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk(t, version),
    })
}

/// The schema of a built-in kind and the definitions it refers to, from `k8s-openapi`.
fn builtin_schemas(t: &ResourceType, version: &str, schemas: &mut Map<String, Value>) -> bool {
    let Some(generated) = crate::builtin_schema::schema(&t.group, &t.plural) else {
        return false;
    };
    let mut root = (*generated).clone();
    if let Some(defs) = root
        .pointer("/components/schemas")
        .and_then(Value::as_object)
    {
        for (name, def) in defs {
            schemas.insert(name.clone(), def.clone());
        }
    }
    if let Some(obj) = root.as_object_mut() {
        for key in ["$schema", "title", "components"] {
            obj.remove(key);
        }
        obj.insert(
            "x-kubernetes-group-version-kind".into(),
            json!([gvk(t, version)]),
        );
    }
    schemas.insert(schema_id(t, version), root);
    true
}

/// The schema published for one kind and version.
fn kind_schema(t: &ResourceType, version: &str) -> Value {
    let mut schema = t
        .version(version)
        .and_then(|v| v.schema.as_ref())
        .map(|s| s.raw().clone())
        .unwrap_or_else(|| json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
    if let Some(obj) = schema.as_object_mut() {
        let props = obj.entry("properties").or_insert_with(|| json!({}));
        if let Some(props) = props.as_object_mut() {
            props.insert(
                "apiVersion".into(),
                json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."}),
            );
            props.insert(
                "kind".into(),
                json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."}),
            );
            props.insert(
                "metadata".into(),
                json!({"allOf": [{"$ref": format!("#/components/schemas/{OBJECT_META}")}],
                       "description": "Standard object's metadata."}),
            );
        }
        obj.insert(
            "x-kubernetes-group-version-kind".into(),
            json!([gvk(t, version)]),
        );
    }
    schema
}

fn object_meta() -> Value {
    let s = |d: &str| json!({"type": "string", "description": d});
    let map = |d: &str| json!({"type": "object", "additionalProperties": {"type": "string"}, "description": d});
    json!({
        "type": "object",
        "description": "ObjectMeta is metadata that all persisted resources must have.",
        "properties": {
            "name": s("Name must be unique within a namespace."),
            "generateName": s("An optional prefix, used by the server, to generate a unique name."),
            "namespace": s("Namespace defines the space within which each name must be unique."),
            "uid": s("UID is the unique in time and space value for this object."),
            "resourceVersion": s("An opaque value that represents the internal version of this object."),
            "generation": {"type": "integer", "format": "int64", "description": "A sequence number representing a specific generation of the desired state."},
            "creationTimestamp": {"type": "string", "format": "date-time", "description": "The time this object was created."},
            "deletionTimestamp": {"type": "string", "format": "date-time", "description": "The time after which this resource will be deleted."},
            "deletionGracePeriodSeconds": {"type": "integer", "format": "int64"},
            "labels": map("Map of string keys and values that can be used to organize and categorize objects."),
            "annotations": map("Annotations is an unstructured key value map stored with a resource."),
            "finalizers": {"type": "array", "items": {"type": "string"}, "description": "Must be empty before the object is deleted from the registry."},
            "ownerReferences": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
            "managedFields": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
        }
    })
}

/// `/openapi/v3/api/v1` or `/openapi/v3/apis/{group}/{version}`; `None` if nothing is served there.
pub fn group_version(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let types: Vec<&std::sync::Arc<ResourceType>> = registry
        .all()
        .filter(|t| t.group == group && t.version(version).is_some())
        .collect();
    if types.is_empty() {
        return None;
    }
    let mut paths = Map::new();
    let mut schemas = Map::new();
    schemas.insert(OBJECT_META.into(), object_meta());
    let prefix = format!("/{}", gv_path(group, version));
    for t in types {
        let (collection, item) = if t.namespaced {
            (
                format!("{prefix}/namespaces/{{namespace}}/{}", t.plural),
                format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", t.plural),
            )
        } else {
            (
                format!("{prefix}/{}", t.plural),
                format!("{prefix}/{}/{{name}}", t.plural),
            )
        };
        paths.insert(
            collection,
            json!({
                "get": operation(t, version, "list", "list", false, false),
                "post": operation(t, version, "post", "create", true, false),
                "delete": operation(t, version, "deletecollection", "deletecollection", false, false),
            }),
        );
        paths.insert(
            item.clone(),
            json!({
                "get": operation(t, version, "get", "read", false, false),
                "put": operation(t, version, "put", "replace", true, false),
                "patch": operation(t, version, "patch", "patch", true, true),
                "delete": operation(t, version, "delete", "delete", false, false),
            }),
        );
        if t.status_subresource {
            paths.insert(
                format!("{item}/status"),
                json!({
                    "get": operation(t, version, "get", "readStatus", false, false),
                    "put": operation(t, version, "put", "replaceStatus", true, false),
                    "patch": operation(t, version, "patch", "patchStatus", true, true),
                }),
            );
        }
        if t.custom || !builtin_schemas(t, version, &mut schemas) {
            schemas.insert(schema_id(t, version), kind_schema(t, version));
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": crate::discovery::GIT_VERSION},
        "paths": Value::Object(paths),
        "components": {"schemas": Value::Object(schemas)},
    }))
}
