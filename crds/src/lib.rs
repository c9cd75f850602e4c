//! Lockstep's API: the custom resource types, the gRPC protocols and the shared domain types.
