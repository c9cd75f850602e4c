//! A test Kubernetes API server: real HTTP, watch, CRDs with schema and CEL validation.
//!
//! No kube-apiserver can be had on the project's machines, so this crate serves the Kubernetes API for
//! tests and the demo: the operator, the sidecars, kube-rs and kubectl talk to it as to kube-apiserver.
//! It is test infrastructure, not a product.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use lockstep_testapi::{Options, TestApiServer};
//! let server = TestApiServer::start(Options::default()).await?;
//! let client = server.client().await?; // a kube::Client
//! server.faults().drop_watches();       // fault hooks
//! server.stop().await;                  // connections refused
//! server.restart().await?;              // same port, same objects
//! # Ok(()) }
//! ```
//!
//! # What it serves
//! - HTTP/1.1 JSON on 127.0.0.1; errors as `meta/v1 Status` with kube-apiserver's reasons and wording
//!   (404 `NotFound`, 409 `AlreadyExists`/`Conflict`, 410 `Expired`, 413 over 3 MiB, 422 `Invalid` with
//!   causes); `e2e/kube/tests/differential.rs` compares them with a real kube-apiserver's.
//! - `/healthz`, `/livez`, `/readyz`, `/version` (v1.33.0), plain-JSON discovery (`/api`, `/apis`, …),
//!   OpenAPI v3 ([`openapi`]) and Table answers for `kubectl get` ([`table`]): real kubectl works against it.
//! - Built-in kinds (unknown fields dropped, or refused with `fieldValidation=Strict`): Namespace, Node, PersistentVolume, PersistentVolumeClaim,
//!   Secret, ConfigMap, Pod, Service, ServiceAccount, Event (core and `events.k8s.io`, one storage),
//!   Lease, Deployment, DaemonSet, StatefulSet, PodDisruptionBudget, RBAC roles and bindings,
//!   CustomResourceDefinition.
//!   Nothing runs them: no scheduler, no controllers, no garbage collector.
//! - CRDs register their resource on create (names, short names, categories, scope, served versions,
//!   status subresource) and get `NamesAccepted` and `Established` at once; custom resources are pruned,
//!   defaulted and validated ([`schema`]).
//! - Verbs ([`api`]), watches ([`watch`]), field ownership and server-side apply ([`managed`] documents
//!   exactly how ownership is simplified), patches ([`patch`]), selectors ([`selector`]).
//! - One global resourceVersion; durable mode keeps everything in a data directory ([`store`]).
//! - Fault hooks ([`Faults`], and [`TestApiServer::stop`], [`TestApiServer::refuse_connections`]).
//! - [`kubectl`] finds the real kubectl that tests and the demo run against it; [`invalid_examples`] reads
//!   the corpus of hostile manifests that tests send to this server and to kube-apiserver.
//! - An audit log of every resource request and, on demand, RBAC enforced from the stored Roles and
//!   bindings, with bearer tokens naming users ([`authz`]).
//!
//! # What it does not do
//! - Request bodies in CBOR, and in protobuf other than Namespace, ConfigMap and Secret ([`protobuf`]),
//!   get `415`: kubectl 1.33's typed generators for other kinds (`kubectl create deployment …`) fail;
//!   `kubectl apply`, `get`, `patch`, `delete`, `wait`, `explain` work (they speak JSON).
//!   `/openapi/v2` is an empty document.
//! - No real authentication (a bearer token is the user name), no admission webhooks, conversion webhooks (versions of a CRD differ
//!   only in `apiVersion`), garbage collection of owner references, or controllers (a Pod stays as written).
//! - Built-in kinds are checked for unknown field names only ([`builtin_schema`]), not for values or
//!   required fields.
//! - Strategic merge patch is a JSON merge patch (lists are replaced, not merged by key); server-side
//!   apply treats lists as atomic ([`managed`]).
//! - Lists are always served at the latest resourceVersion (`resourceVersionMatch` is ignored); a
//!   paginated list reports its first page's resourceVersion, so a watch started from it may repeat a change
//!   the later pages already showed (never miss one).
//! - Aggregated discovery is not served: clients fall back to the plain documents, as kubectl does.

pub mod api;
pub mod authz;
pub mod builtin_schema;
pub mod discovery;
pub mod error;
pub mod faults;
pub mod http;
pub mod invalid_examples;
pub mod kubectl;
pub mod managed;
pub mod openapi;
pub mod patch;
pub mod protobuf;
pub mod resources;
pub mod schema;
pub mod selector;
mod server;
pub mod store;
pub mod table;
pub mod watch;

use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;

pub use error::{ApiError, ServerError};
pub use faults::{Failure, Faults};
pub use server::{Options, TestApiServer};

/// Flags of the `lockstep-testapi` binary.
#[derive(Debug, Clone, clap::Args)]
pub struct CliOptions {
    /// Server options.
    #[command(flatten)]
    pub server: Options,
    /// Write a kubeconfig for the server here once it listens.
    #[arg(long)]
    pub kubeconfig_out: Option<PathBuf>,
}

/// Runs the server until Ctrl-C.
pub async fn run(options: CliOptions) -> anyhow::Result<()> {
    let server = TestApiServer::start(options.server).await?;
    if let Some(path) = &options.kubeconfig_out {
        server.write_kubeconfig(path)?;
        tracing::info!(path = %path.display(), "kubeconfig written");
    }
    println!("lockstep-testapi listening on {}", server.url());
    tokio::signal::ctrl_c().await?;
    server.stop().await;
    Ok(())
}

/// 64 random bits (from the standard library's per-process random hasher keys).
pub(crate) fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// A random RFC 4122 version-4 UUID.
pub(crate) fn uid() -> String {
    let (a, b) = (random_u64(), random_u64());
    let b = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    let a = (a & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// Now, as kube-apiserver stamps times (RFC 3339, seconds, `Z`).
pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
