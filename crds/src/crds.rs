//! The CustomResourceDefinitions generated from the types, and their committed YAML form.
//!
//! `cargo run -p lockstep-api --bin crdgen` writes one file per CRD into `crds/`; a test fails when the
//! committed files differ from what the types generate.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;

use crate::v1alpha1::{ConsistencyGroup, ConsistencyGroupShard, MemberCluster, ReplicationNode};

/// The command that regenerates the committed CRD YAML.
pub const REGENERATE_COMMAND: &str = "cargo run -p lockstep-api --bin crdgen";

/// Where the Helm chart keeps its copy of the CRDs, from the repository's root.
pub const HELM_CHART_CRDS: &str = "deploy/helm/lockstep/crds";

/// Every CRD of the project, every string in it bounded (see [`bound_foreign_strings`]).
pub fn all() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![
        ConsistencyGroup::crd(),
        MemberCluster::crd(),
        ReplicationNode::crd(),
        ConsistencyGroupShard::crd(),
    ];
    for version in crds.iter_mut().flat_map(|crd| crd.spec.versions.iter_mut()) {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|schema| schema.open_api_v3_schema.as_mut())
        {
            bound_foreign_strings(schema);
        }
    }
    crds
}

/// Gives the strings of Kubernetes' own types (conditions, label selectors, times), whose schemas carry no
/// `maxLength`, the bounds Kubernetes validates them with (a condition's message is cut to
/// [`crate::domain::MESSAGE_LIMIT`] by [`crate::conditions::set`]). The project's own fields state theirs
/// on the types.
fn bound_foreign_strings(schema: &mut JSONSchemaProps) {
    if schema.type_.as_deref() == Some("string")
        && schema.format.as_deref() == Some("date-time")
        && schema.max_length.is_none()
    {
        schema.max_length = Some(64); // RFC 3339 with nanoseconds is 35 characters
    }
    if let Some(properties) = schema.properties.as_mut() {
        for (name, child) in properties.iter_mut() {
            match name.as_str() {
                "conditions" => {
                    if let Some(JSONSchemaPropsOrArray::Schema(condition)) = child.items.as_mut() {
                        bound_properties(
                            condition,
                            &[
                                ("type", 316),
                                ("status", 16),
                                ("reason", 1024),
                                ("message", crate::domain::MESSAGE_LIMIT as i64),
                            ],
                        );
                    }
                }
                "selector" => bound_label_selector(child),
                _ => {}
            }
            bound_foreign_strings(child);
        }
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = schema.items.as_mut() {
        bound_foreign_strings(items);
    }
}

/// A label selector: keys are qualified names (a 253-character prefix, a slash, 63 characters), values
/// label values (63).
fn bound_label_selector(selector: &mut JSONSchemaProps) {
    let Some(properties) = selector.properties.as_mut() else {
        return;
    };
    if let Some(labels) = properties.get_mut("matchLabels")
        && let Some(JSONSchemaPropsOrBool::Schema(value)) = labels.additional_properties.as_mut()
    {
        value.max_length.get_or_insert(63);
    }
    if let Some(expressions) = properties.get_mut("matchExpressions")
        && let Some(JSONSchemaPropsOrArray::Schema(expression)) = expressions.items.as_mut()
    {
        bound_properties(expression, &[("key", 317), ("operator", 16)]);
        // An unknown operator is refused at admission, named: `Unsupported value: "Equals"`.
        if let Some(operator) = expression
            .properties
            .as_mut()
            .and_then(|properties| properties.get_mut("operator"))
        {
            operator.enum_ = Some(
                ["In", "NotIn", "Exists", "DoesNotExist"]
                    .into_iter()
                    .map(|op| serde_json::Value::String(op.to_owned()).into())
                    .collect(),
            );
        }
        if let Some(values) = expression
            .properties
            .as_mut()
            .and_then(|properties| properties.get_mut("values"))
            && let Some(JSONSchemaPropsOrArray::Schema(value)) = values.items.as_mut()
        {
            value.max_length.get_or_insert(63);
        }
    }
}

fn bound_properties(schema: &mut JSONSchemaProps, limits: &[(&str, i64)]) {
    let Some(properties) = schema.properties.as_mut() else {
        return;
    };
    for (name, limit) in limits {
        if let Some(property) = properties.get_mut(*name) {
            property.max_length.get_or_insert(*limit);
        }
    }
}

/// The file name a CRD is committed under, e.g. `lockstep.dev_consistencygroups.yaml`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural)
}

/// The YAML document committed for a CRD, with a header saying how it was made.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml_ng::Error> {
    let body = serde_yaml_ng::to_string(crd)?;
    Ok(format!(
        "# Generated by `{REGENERATE_COMMAND}` from the types in crds/src/v1alpha1. Do not edit.\n---\n{body}"
    ))
}
