//! The resource types the server knows: the built-in kinds and those registered by
//! CustomResourceDefinitions, with the names discovery reports (issue 4 builds `/api`, `/apis` and
//! OpenAPI from [`Registry`]).
//!
//! A type is addressed by `(group, plural)`; each type names the storage key its objects live under
//! ([`ResourceType::storage`]): the same as its own key except for `events.k8s.io/v1` events, which share the
//! core `events` storage and are converted field by field on the way in and out, as kube-apiserver does.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::error::{ApiError, Cause};
use crate::schema::Schema;

/// Where a type's objects are stored: `(group, plural)`.
pub type TypeKey = (String, String);

/// How objects of a type are converted between their served shape and their stored shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// Served as stored (only `apiVersion` is rewritten to the version asked for).
    None,
    /// `events.k8s.io/v1` `Event`, stored as core `v1` `Event`.
    EventsV1,
}

/// One served version of a type.
#[derive(Debug, Clone)]
pub struct Version {
    /// The version name, e.g. `v1alpha1`.
    pub name: String,
    /// The validation schema (custom resources only).
    pub schema: Option<Arc<Schema>>,
    /// `additionalPrinterColumns`, as written in the CRD (custom resources only).
    pub printer_columns: Vec<Value>,
}

/// A resource type: names, scope, versions, subresources.
#[derive(Debug, Clone)]
pub struct ResourceType {
    /// API group; empty for the core group.
    pub group: String,
    /// Plural resource name, e.g. `configmaps`.
    pub plural: String,
    /// Singular name, e.g. `configmap`.
    pub singular: String,
    /// Kind, e.g. `ConfigMap`.
    pub kind: String,
    /// List kind, e.g. `ConfigMapList`.
    pub list_kind: String,
    /// Short names, e.g. `cm`.
    pub short_names: Vec<String>,
    /// Categories, e.g. `all`.
    pub categories: Vec<String>,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Served versions, the preferred one first.
    pub versions: Vec<Version>,
    /// The version objects are stored as.
    pub storage_version: String,
    /// Whether `/status` is a subresource (then writes to the object ignore `status`).
    pub status_subresource: bool,
    /// Whether `metadata.generation` is kept.
    pub tracks_generation: bool,
    /// Registered by a CustomResourceDefinition.
    pub custom: bool,
    /// Storage key.
    pub storage: TypeKey,
    /// Conversion between served and stored shapes.
    pub conversion: Conversion,
}

impl ResourceType {
    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    /// The served version named `name`.
    pub fn version(&self, name: &str) -> Option<&Version> {
        self.versions.iter().find(|v| v.name == name)
    }

    /// This type's own key.
    pub fn key(&self) -> TypeKey {
        (self.group.clone(), self.plural.clone())
    }

    /// Converts a stored object to the served shape of `version`.
    pub fn to_served(&self, mut object: Value, version: &str) -> Value {
        if self.conversion == Conversion::EventsV1 {
            rename_fields(&mut object, EVENT_RENAMES, false);
        }
        if let Some(obj) = object.as_object_mut() {
            obj.insert(
                "apiVersion".into(),
                Value::String(self.api_version(version)),
            );
            obj.insert("kind".into(), Value::String(self.kind.clone()));
        }
        object
    }

    /// Converts a served object (as received) to the stored shape.
    pub fn to_stored(&self, mut object: Value) -> Value {
        if self.conversion == Conversion::EventsV1 {
            rename_fields(&mut object, EVENT_RENAMES, true);
            if let Some(obj) = object.as_object_mut() {
                obj.insert("apiVersion".into(), Value::String("v1".into()));
                obj.insert("kind".into(), Value::String("Event".into()));
            }
        } else if let Some(obj) = object.as_object_mut() {
            obj.insert(
                "apiVersion".into(),
                Value::String(self.api_version(&self.storage_version)),
            );
            obj.insert("kind".into(), Value::String(self.kind.clone()));
        }
        object
    }
}

/// `(core v1 Event field, events.k8s.io/v1 Event field)`.
const EVENT_RENAMES: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
    ("reportingComponent", "reportingController"),
];

fn rename_fields(object: &mut Value, renames: &[(&str, &str)], to_core: bool) {
    let Some(obj) = object.as_object_mut() else {
        return;
    };
    for (core, v1) in renames {
        let (from, to) = if to_core { (*v1, *core) } else { (*core, *v1) };
        if let Some(value) = obj.remove(from) {
            obj.insert(to.to_string(), value);
        }
    }
}

/// A compact description of a built-in type: `(group, version, plural, kind, namespaced, short names,
/// status subresource)`.
type BuiltIn = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    bool,
    &'static [&'static str],
    bool,
);

const BUILT_INS: &[BuiltIn] = &[
    ("", "v1", "namespaces", "Namespace", false, &["ns"], true),
    ("", "v1", "nodes", "Node", false, &["no"], true),
    (
        "",
        "v1",
        "persistentvolumes",
        "PersistentVolume",
        false,
        &["pv"],
        true,
    ),
    (
        "",
        "v1",
        "persistentvolumeclaims",
        "PersistentVolumeClaim",
        true,
        &["pvc"],
        true,
    ),
    ("", "v1", "secrets", "Secret", true, &[], false),
    ("", "v1", "configmaps", "ConfigMap", true, &["cm"], false),
    ("", "v1", "pods", "Pod", true, &["po"], true),
    ("", "v1", "services", "Service", true, &["svc"], true),
    (
        "",
        "v1",
        "serviceaccounts",
        "ServiceAccount",
        true,
        &["sa"],
        false,
    ),
    ("", "v1", "events", "Event", true, &["ev"], false),
    (
        "events.k8s.io",
        "v1",
        "events",
        "Event",
        true,
        &["ev"],
        false,
    ),
    (
        "coordination.k8s.io",
        "v1",
        "leases",
        "Lease",
        true,
        &[],
        false,
    ),
    (
        "apps",
        "v1",
        "deployments",
        "Deployment",
        true,
        &["deploy"],
        true,
    ),
    ("apps", "v1", "daemonsets", "DaemonSet", true, &["ds"], true),
    (
        "apps",
        "v1",
        "statefulsets",
        "StatefulSet",
        true,
        &["sts"],
        true,
    ),
    (
        "policy",
        "v1",
        "poddisruptionbudgets",
        "PodDisruptionBudget",
        true,
        &["pdb"],
        true,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "clusterroles",
        "ClusterRole",
        false,
        &[],
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "clusterrolebindings",
        "ClusterRoleBinding",
        false,
        &[],
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "roles",
        "Role",
        true,
        &[],
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "rolebindings",
        "RoleBinding",
        true,
        &[],
        false,
    ),
    // Stored and served, not enforced: the test API server runs no admission policies (a difference from
    // kube-apiserver the README lists).
    (
        "admissionregistration.k8s.io",
        "v1",
        "validatingadmissionpolicies",
        "ValidatingAdmissionPolicy",
        false,
        &[],
        true,
    ),
    (
        "admissionregistration.k8s.io",
        "v1",
        "validatingadmissionpolicybindings",
        "ValidatingAdmissionPolicyBinding",
        false,
        &[],
        false,
    ),
    (
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        false,
        &["crd", "crds"],
        true,
    ),
];

/// The group and plural of CustomResourceDefinitions.
pub const CRD_GROUP: &str = "apiextensions.k8s.io";
/// The plural of CustomResourceDefinitions.
pub const CRD_PLURAL: &str = "customresourcedefinitions";

fn built_in(b: &BuiltIn) -> ResourceType {
    let (group, version, plural, kind, namespaced, short, status) = *b;
    let in_all = matches!(
        plural,
        "pods" | "services" | "deployments" | "daemonsets" | "statefulsets"
    );
    let conversion = if group == "events.k8s.io" {
        Conversion::EventsV1
    } else {
        Conversion::None
    };
    let storage = if conversion == Conversion::EventsV1 {
        (String::new(), "events".to_string())
    } else {
        (group.to_string(), plural.to_string())
    };
    ResourceType {
        group: group.into(),
        plural: plural.into(),
        singular: kind.to_lowercase(),
        kind: kind.into(),
        list_kind: format!("{kind}List"),
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: if in_all { vec!["all".into()] } else { vec![] },
        namespaced,
        versions: vec![Version {
            name: version.into(),
            schema: None,
            printer_columns: vec![],
        }],
        storage_version: version.into(),
        status_subresource: status,
        tracks_generation: status,
        custom: false,
        storage,
        conversion,
    }
}

/// The types the server serves, by `(group, plural)`.
#[derive(Debug, Clone)]
pub struct Registry {
    types: BTreeMap<TypeKey, Arc<ResourceType>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// The built-in types only.
    pub fn new() -> Self {
        let types = BUILT_INS
            .iter()
            .map(|b| {
                let t = built_in(b);
                (t.key(), Arc::new(t))
            })
            .collect();
        Self { types }
    }

    /// The type served at `group/version/plural`.
    pub fn lookup(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        let t = self.types.get(&(group.to_string(), plural.to_string()))?;
        t.version(version)?;
        Some(t.clone())
    }

    /// The type registered under `(group, plural)`, whatever its versions.
    pub fn get(&self, group: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types
            .get(&(group.to_string(), plural.to_string()))
            .cloned()
    }

    /// Every type, ordered by group then plural.
    pub fn all(&self) -> impl Iterator<Item = &Arc<ResourceType>> {
        self.types.values()
    }

    /// Registers (or re-registers) the type a CRD defines.
    pub fn register(&mut self, t: ResourceType) {
        self.types.insert(t.key(), Arc::new(t));
    }

    /// Forgets the type a CRD defined.
    pub fn unregister(&mut self, key: &TypeKey) {
        if self.types.get(key).is_some_and(|t| t.custom) {
            self.types.remove(key);
        }
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

fn strings_at(v: &Value, path: &[&str]) -> Vec<String> {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(next) => cur = next,
            None => return vec![],
        }
    }
    cur.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Reads the type a CustomResourceDefinition defines, refusing (422) a definition kube-apiserver would
/// refuse for the reasons checked here: names, scope, versions, exactly one storage version, schemas.
pub fn from_crd(crd: &Value) -> Result<ResourceType, ApiError> {
    let name = str_at(crd, &["metadata", "name"]).unwrap_or_default();
    let mut causes = Vec::new();
    let mut need = |field: &str, value: Option<&str>| -> String {
        match value {
            Some(v) if !v.is_empty() => v.to_string(),
            _ => {
                causes.push(Cause {
                    reason: "FieldValueRequired".into(),
                    message: "Required value".into(),
                    field: field.into(),
                });
                String::new()
            }
        }
    };
    let group = need("spec.group", str_at(crd, &["spec", "group"]));
    let plural = need(
        "spec.names.plural",
        str_at(crd, &["spec", "names", "plural"]),
    );
    let kind = need("spec.names.kind", str_at(crd, &["spec", "names", "kind"]));
    let scope = need("spec.scope", str_at(crd, &["spec", "scope"]));
    if !plural.is_empty() && !group.is_empty() && name != format!("{plural}.{group}") {
        causes.push(Cause {
            reason: "FieldValueInvalid".into(),
            message: format!(
                "Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"
            ),
            field: "metadata.name".into(),
        });
    }
    if !scope.is_empty() && scope != "Namespaced" && scope != "Cluster" {
        causes.push(Cause {
            reason: "FieldValueNotSupported".into(),
            message: format!(
                "Unsupported value: \"{scope}\": supported values: \"Cluster\", \"Namespaced\""
            ),
            field: "spec.scope".into(),
        });
    }
    let empty = Vec::new();
    let versions_json = crd
        .get("spec")
        .and_then(|s| s.get("versions"))
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    if versions_json.is_empty() {
        causes.push(Cause {
            reason: "FieldValueRequired".into(),
            message: "Required value: must have exactly one version marked as storage version"
                .into(),
            field: "spec.versions".into(),
        });
    }
    let mut versions = Vec::new();
    let mut storage_versions = Vec::new();
    let mut status_subresource = false;
    for (i, v) in versions_json.iter().enumerate() {
        let vname = str_at(v, &["name"]).unwrap_or_default().to_string();
        if v.get("storage").and_then(Value::as_bool) == Some(true) {
            storage_versions.push(vname.clone());
        }
        if v.get("subresources")
            .and_then(|s| s.get("status"))
            .is_some()
        {
            status_subresource = true;
        }
        let schema = match v.get("schema").and_then(|s| s.get("openAPIV3Schema")) {
            Some(raw) => match Schema::new(raw.clone()) {
                Ok(s) => Some(Arc::new(s)),
                Err(message) => {
                    causes.push(Cause {
                        reason: "FieldValueInvalid".into(),
                        message: format!("Invalid value: \"object\": {message}"),
                        field: format!("spec.versions[{i}].schema.openAPIV3Schema"),
                    });
                    None
                }
            },
            None => None,
        };
        if v.get("served").and_then(Value::as_bool) != Some(false) {
            versions.push(Version {
                name: vname,
                schema,
                printer_columns: v
                    .get("additionalPrinterColumns")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
            });
        }
    }
    if !versions_json.is_empty() && storage_versions.len() != 1 {
        causes.push(Cause {
            reason: "FieldValueInvalid".into(),
            message: format!(
                "Invalid value: {:?}: must have exactly one version marked as storage version",
                storage_versions
            ),
            field: "spec.versions".into(),
        });
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid(
            "CustomResourceDefinition",
            CRD_GROUP,
            name,
            &causes,
        ));
    }
    let names = |field: &str| str_at(crd, &["spec", "names", field]).map(str::to_string);
    Ok(ResourceType {
        singular: names("singular").unwrap_or_else(|| kind.to_lowercase()),
        list_kind: names("listKind").unwrap_or_else(|| format!("{kind}List")),
        short_names: strings_at(crd, &["spec", "names", "shortNames"]),
        categories: strings_at(crd, &["spec", "names", "categories"]),
        namespaced: scope == "Namespaced",
        storage_version: storage_versions.pop().unwrap_or_default(),
        versions,
        status_subresource,
        tracks_generation: true,
        custom: true,
        storage: (group.clone(), plural.clone()),
        conversion: Conversion::None,
        group,
        plural,
        kind,
    })
}

/// The status kube-apiserver's CRD controllers give an accepted definition: `Established` and
/// `NamesAccepted`, the accepted names and the stored versions.
pub fn crd_status(crd: &Value, t: &ResourceType, now: &str) -> Value {
    let mut accepted = Map::new();
    accepted.insert("plural".into(), t.plural.clone().into());
    accepted.insert("singular".into(), t.singular.clone().into());
    accepted.insert("kind".into(), t.kind.clone().into());
    accepted.insert("listKind".into(), t.list_kind.clone().into());
    if !t.short_names.is_empty() {
        accepted.insert("shortNames".into(), t.short_names.clone().into());
    }
    if !t.categories.is_empty() {
        accepted.insert("categories".into(), t.categories.clone().into());
    }
    // A condition keeps its transition time while it stays True.
    let since = |kind: &str| -> String {
        crd.pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|cs| {
                cs.iter().find(|c| {
                    c.get("type").and_then(Value::as_str) == Some(kind)
                        && c.get("status").and_then(Value::as_str) == Some("True")
                })
            })
            .and_then(|c| c.get("lastTransitionTime").and_then(Value::as_str))
            .unwrap_or(now)
            .to_string()
    };
    let condition = |kind: &str, reason: &str, message: &str| {
        serde_json::json!({"type": kind, "status": "True", "lastTransitionTime": since(kind),
                           "reason": reason, "message": message})
    };
    let mut stored: Vec<String> = crd
        .get("status")
        .map(|s| strings_at(s, &["storedVersions"]))
        .unwrap_or_default();
    if !stored.contains(&t.storage_version) {
        stored.push(t.storage_version.clone());
    }
    serde_json::json!({
        "acceptedNames": Value::Object(accepted),
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "storedVersions": stored,
    })
}
