//! Schemas of the built-in kinds, from `k8s-openapi` (through `schemars`, in OpenAPI 3 form): used to
//! drop and report unknown fields of built-in objects (`fieldValidation=Strict` refuses them, `Warn`
//! warns, as kube-apiserver does, whose decoding into Go types drops them). Only field names are checked:
//! built-in objects are not otherwise validated.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use k8s_openapi::api::{admissionregistration, apps, coordination, core, events, policy, rbac};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde_json::Value;

fn generate<T: JsonSchema>() -> Arc<Value> {
    let mut generator = SchemaSettings::openapi3().into_generator();
    Arc::new(generator.root_schema_for::<T>().to_value())
}

fn all() -> &'static HashMap<(&'static str, &'static str), Arc<Value>> {
    static SCHEMAS: OnceLock<HashMap<(&'static str, &'static str), Arc<Value>>> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        HashMap::from([
            (("", "namespaces"), generate::<core::v1::Namespace>()),
            (("", "nodes"), generate::<core::v1::Node>()),
            (
                ("", "persistentvolumes"),
                generate::<core::v1::PersistentVolume>(),
            ),
            (
                ("", "persistentvolumeclaims"),
                generate::<core::v1::PersistentVolumeClaim>(),
            ),
            (("", "secrets"), generate::<core::v1::Secret>()),
            (("", "configmaps"), generate::<core::v1::ConfigMap>()),
            (("", "pods"), generate::<core::v1::Pod>()),
            (("", "services"), generate::<core::v1::Service>()),
            (
                ("", "serviceaccounts"),
                generate::<core::v1::ServiceAccount>(),
            ),
            (("", "events"), generate::<core::v1::Event>()),
            (("events.k8s.io", "events"), generate::<events::v1::Event>()),
            (
                ("coordination.k8s.io", "leases"),
                generate::<coordination::v1::Lease>(),
            ),
            (("apps", "deployments"), generate::<apps::v1::Deployment>()),
            (("apps", "daemonsets"), generate::<apps::v1::DaemonSet>()),
            (
                ("apps", "statefulsets"),
                generate::<apps::v1::StatefulSet>(),
            ),
            (
                ("policy", "poddisruptionbudgets"),
                generate::<policy::v1::PodDisruptionBudget>(),
            ),
            (
                ("rbac.authorization.k8s.io", "clusterroles"),
                generate::<rbac::v1::ClusterRole>(),
            ),
            (
                ("rbac.authorization.k8s.io", "clusterrolebindings"),
                generate::<rbac::v1::ClusterRoleBinding>(),
            ),
            (
                ("rbac.authorization.k8s.io", "roles"),
                generate::<rbac::v1::Role>(),
            ),
            (
                ("rbac.authorization.k8s.io", "rolebindings"),
                generate::<rbac::v1::RoleBinding>(),
            ),
            (
                (
                    "admissionregistration.k8s.io",
                    "validatingadmissionpolicies",
                ),
                generate::<admissionregistration::v1::ValidatingAdmissionPolicy>(),
            ),
            (
                (
                    "admissionregistration.k8s.io",
                    "validatingadmissionpolicybindings",
                ),
                generate::<admissionregistration::v1::ValidatingAdmissionPolicyBinding>(),
            ),
            (
                ("apiextensions.k8s.io", "customresourcedefinitions"),
                generate::<CustomResourceDefinition>(),
            ),
        ])
    })
}

/// The schema of a built-in kind (with its referenced definitions under `components.schemas`).
pub fn schema(group: &str, plural: &str) -> Option<Arc<Value>> {
    all().get(&(group, plural)).cloned()
}

fn resolve<'a>(node: &'a Value, root: &'a Value) -> &'a Value {
    let mut cur = node;
    for _ in 0..16 {
        let reference = cur
            .get("$ref")
            .or_else(|| {
                cur.get("allOf")
                    .and_then(Value::as_array)
                    .filter(|a| a.len() == 1)
                    .and_then(|a| a[0].get("$ref"))
            })
            .and_then(Value::as_str);
        match reference
            .and_then(|r| r.strip_prefix("#/components/schemas/"))
            .and_then(|name| {
                root.pointer("/components/schemas")
                    .and_then(|s| s.get(name))
            }) {
            Some(next) => cur = next,
            None => break,
        }
    }
    cur
}

/// Removes fields the kind does not have (outside `metadata`), returning their paths (`.spec.foo`).
pub fn prune(root: &Value, object: &mut Value) -> Vec<String> {
    let mut pruned = Vec::new();
    if let Some(obj) = object.as_object_mut() {
        let props = root.get("properties").and_then(Value::as_object);
        let keys: Vec<String> = obj.keys().cloned().collect();
        for key in keys {
            if matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            match props.and_then(|p| p.get(&key)) {
                Some(sub) => {
                    if let Some(v) = obj.get_mut(&key) {
                        walk(resolve(sub, root), root, v, &format!(".{key}"), &mut pruned);
                    }
                }
                None => {
                    obj.remove(&key);
                    pruned.push(format!(".{key}"));
                }
            }
        }
    }
    pruned
}

fn walk(schema: &Value, root: &Value, value: &mut Value, path: &str, pruned: &mut Vec<String>) {
    if schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
    {
        return;
    }
    match value {
        Value::Object(obj) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            // A schema that says nothing about its fields (e.g. RawExtension, JSON) accepts anything.
            if props.is_none() && additional.is_none() {
                return;
            }
            let keys: Vec<String> = obj.keys().cloned().collect();
            for key in keys {
                let sub = props
                    .and_then(|p| p.get(&key))
                    .or(additional.filter(|a| a.is_object()));
                match sub {
                    Some(sub) => {
                        if let Some(v) = obj.get_mut(&key) {
                            walk(
                                resolve(sub, root),
                                root,
                                v,
                                &format!("{path}.{key}"),
                                pruned,
                            );
                        }
                    }
                    None if additional == Some(&Value::Bool(true)) => {}
                    None => {
                        obj.remove(&key);
                        pruned.push(format!("{path}.{key}"));
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items") {
                let sub = resolve(sub, root);
                for (i, item) in items.iter_mut().enumerate() {
                    walk(sub, root, item, &format!("{path}[{i}]"), pruned);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_fields_of_built_in_kinds() {
        let Some(pod) = schema("", "pods") else {
            panic!("no pod schema");
        };
        let mut obj = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "i", "imagePullPolicy": "Always", "bogus": 1,
                                     "resources": {"limits": {"cpu": "1"}}}],
                     "nodeSelector": {"a": "b"}, "typo": true}});
        let pruned = prune(&pod, &mut obj);
        assert_eq!(
            pruned,
            vec![
                ".spec.containers[0].bogus".to_string(),
                ".spec.typo".to_string()
            ]
        );
        assert_eq!(
            obj["spec"]["containers"][0]["resources"]["limits"]["cpu"],
            "1"
        );
        let Some(crd) = schema("apiextensions.k8s.io", "customresourcedefinitions") else {
            panic!("no CRD schema");
        };
        let mut crd_obj = json!({"spec": {"group": "g", "versions": [{"name": "v1", "schema": {"openAPIV3Schema":
            {"type": "object", "properties": {"spec": {"type": "object", "x-kubernetes-validations": [{"rule": "true"}]}}}}}]}});
        assert_eq!(prune(&crd, &mut crd_obj), Vec::<String>::new());
    }
}
