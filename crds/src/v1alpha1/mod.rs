//! The `lockstep.dev/v1alpha1` custom resources.
//!
//! Every field's doc comment becomes its `kubectl explain` text. Validation a schema cannot express lives
//! in CEL rules (`x-kubernetes-validations`) next to the field it checks; every list and string such a
//! rule touches is bounded so that kube-apiserver's cost estimator accepts the rule.

mod consistency_group;
mod history;
mod member_cluster;
mod replication_node;
mod shard;

pub use consistency_group::*;
pub use history::*;
pub use member_cluster::*;
pub use replication_node::*;
pub use shard::*;

/// The API group of every Lockstep resource.
pub const GROUP: &str = "lockstep.dev";
/// The version of this module's resources.
pub const VERSION: &str = "v1alpha1";

/// A CEL rule that `self` is a lowercase RFC 1123 subdomain (what Kubernetes requires of object names, so
/// of MemberCluster and Node names), refusing any other value with a message that names `field` and the
/// value: uppercase, underscores, empty dot-separated parts, control characters and Unicode look-alikes
/// (a Cyrillic `а` for a Latin `a`) would otherwise name an object that can never exist.
fn object_name_rule(field: &str, what: &str) -> serde_json::Value {
    let requirement = "lowercase letters, digits, hyphens and dots, each dot-separated part starting and ending with a letter or digit";
    serde_json::json!({
        "rule": r"self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')",
        "message": format!("{field} is not a valid {what}: {requirement}"),
        "messageExpression": format!("'{field} \"' + self + '\" is not a valid {what}: {requirement}'"),
    })
}

/// A CEL rule that `self` is a Kubernetes namespace name (a lowercase RFC 1123 label), refusing any other
/// value with a message that names it.
fn namespace_rule() -> serde_json::Value {
    let requirement =
        "lowercase letters, digits and hyphens, starting and ending with a letter or digit";
    serde_json::json!({
        "rule": "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
        "message": format!("namespace is not a valid Kubernetes namespace name: {requirement}"),
        "messageExpression": format!("'namespace \"' + self + '\" is not a valid Kubernetes namespace name: {requirement}'"),
    })
}
