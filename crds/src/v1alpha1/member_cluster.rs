//! `MemberCluster`: one cluster whose volumes can be members of groups, and the paths that reach it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::domain::{ClusterPaths, VolumeBinding};

/// A cluster whose volumes can be members of ConsistencyGroups, and how the operator reaches it: through
/// its API server (with a kubeconfig Secret), through the gRPC Control service its sidecars dial, or both.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "lockstep.dev",
    version = "v1alpha1",
    kind = "MemberCluster",
    doc = "A cluster whose volumes can be members of ConsistencyGroups, and the paths (API server, gRPC or both) that reach it.",
    plural = "memberclusters",
    shortname = "mc",
    category = "lockstep",
    status = "MemberClusterStatus",
    printcolumn = r#"{"name":"Paths","type":"string","jsonPath":".spec.paths","description":"Which paths reach the cluster."}"#,
    printcolumn = r#"{"name":"Network","type":"string","jsonPath":".spec.network"}"#,
    printcolumn = r#"{"name":"Reachable","type":"string","jsonPath":".status.conditions[?(@.type==\"Reachable\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(has(self.paths) && self.paths == 'GrpcOnly') || (has(self.local) && self.local) || has(self.kubeconfigSecretRef)",
        "message": "a member cluster reached through its API server needs kubeconfigSecretRef (or local: true for the hub itself)"
    },
    {
        "rule": "!has(self.paths) || self.paths != 'GrpcOnly' || !has(self.kubeconfigSecretRef)",
        "message": "a GrpcOnly member cluster has no kubeconfig: its sidecars dial the operator; remove kubeconfigSecretRef or use paths Both"
    },
    {
        "rule": "!(has(self.local) && self.local && has(self.paths) && self.paths == 'GrpcOnly')",
        "message": "the hub cluster (local: true) is always reached through its own API server: use paths Both or ApiOnly"
    }
]))]
pub struct MemberClusterSpec {
    /// Which paths reach the cluster: Both (default), ApiOnly (its nodes have no route to the operator's
    /// gRPC Service) or GrpcOnly (the hub cannot reach its API server; its sidecars dial out).
    #[serde(default)]
    pub paths: ClusterPaths,

    /// True for the hub cluster itself, where the operator runs: it is reached with the operator's own
    /// credentials and gets no mirrors.
    #[serde(default)]
    pub local: bool,

    /// The Secret holding a kubeconfig for the cluster's API server. Required unless paths is GrpcOnly or
    /// local is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig_secret_ref: Option<SecretKeyRef>,

    /// The network the cluster is on, for people and for spreading the two paths over different networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    // `kubectl get memberclusters` prints it: a control character (an escape sequence) would rewrite the
    // reader's terminal, a format character (a right-to-left override) would disguise the value.
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": r"!self.matches('[\\p{Cc}\\p{Cf}]')",
        "message": "network may not contain control or format characters: kubectl prints it to people as it is"
    }]))]
    pub network: Option<String>,

    /// The cluster's ServiceAccount token signing keys, as a JSON Web Key Set: what `kubectl get --raw
    /// /openid/v1/jwks` prints in that cluster. Its sidecars prove their node with projected
    /// ServiceAccount tokens on the gRPC path, which the operator verifies against these keys (offline:
    /// the hub need not reach the cluster). Public keys, not secrets; update it when the cluster rotates
    /// its signing keys (old and new side by side). No two MemberClusters may share a key. Without it,
    /// no sidecar of the cluster can use the gRPC path over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub service_account_keys: Option<String>,

    /// Where a volume's node comes from when the hub reads the cluster: Required (default) — only the
    /// PersistentVolume's `kubernetes.io/hostname` node affinity or an attached VolumeAttachment, which no
    /// node can write; a volume bound by neither stays unresolved — or SidecarClaims, which also takes the
    /// word of the one sidecar claiming an unbound volume (for drivers whose volumes name no node). On a
    /// GrpcOnly cluster only sidecar claims exist, and a volume two nodes claim is unresolved.
    #[serde(default)]
    pub volume_binding: VolumeBinding,
}

/// A key of a Secret in the hub.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's namespace.
    #[schemars(length(min = 1, max = 63))]
    #[schemars(extend("x-kubernetes-validations" = [super::namespace_rule()]))]
    pub namespace: String,
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    #[schemars(extend("x-kubernetes-validations" = [super::object_name_rule("name", "Secret name")]))]
    pub name: String,
    /// The key whose value is the kubeconfig: letters, digits, '-', '_' and '.', as Secret keys are.
    #[serde(default = "default_kubeconfig_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

fn default_kubeconfig_key() -> String {
    "kubeconfig".to_owned()
}

/// How the operator sees the cluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberClusterStatus {
    /// When the operator last heard from the cluster's API server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_api_contact: Option<Time>,
    /// How many of the cluster's sidecars hold an open gRPC stream to the operator.
    #[serde(default)]
    pub grpc_sessions: u32,
    /// The generation of the spec this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Reachable (per path, in the message) and Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub conditions: Vec<Condition>,
}
