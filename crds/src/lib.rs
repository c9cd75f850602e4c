//! Lockstep's API: the custom resource types, the gRPC protocols and the shared domain types.
//!
//! - [`v1alpha1`]: `ConsistencyGroup`, `MemberCluster` and `ReplicationNode` (group `lockstep.dev`).
//! - [`proto`]: the `Control` (sidecar ↔ operator) and `Replicator` (sidecar → replicator) gRPC services.
//! - [`domain`]: epochs, stages, policies, phases and paths, shared by everything above.
//! - [`conditions`]: standard conditions with honest transition times and observed generations.
//! - [`crds`]: the CustomResourceDefinitions as generated from the types; `crdgen` writes them to YAML.
//! - `fuzz` (feature `fuzz`, for tests): what the fuzz targets of every crate share.

pub mod conditions;
pub mod crds;
pub mod domain;
#[cfg(feature = "fuzz")]
pub mod fuzz;
#[cfg(feature = "mutants")]
pub mod mutants;
pub mod proto;
pub mod v1alpha1;
