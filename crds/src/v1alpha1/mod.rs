//! The `lockstep.dev/v1alpha1` custom resources.
//!
//! Every field's doc comment becomes its `kubectl explain` text. Validation a schema cannot express lives
//! in CEL rules (`x-kubernetes-validations`) next to the field it checks; every list and string such a
//! rule touches is bounded so that kube-apiserver's cost estimator accepts the rule.

mod consistency_group;
mod member_cluster;
mod replication_node;

pub use consistency_group::*;
pub use member_cluster::*;
pub use replication_node::*;

/// The API group of every Lockstep resource.
pub const GROUP: &str = "lockstep.dev";
/// The version of this module's resources.
pub const VERSION: &str = "v1alpha1";
