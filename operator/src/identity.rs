//! Node identity on the gRPC Control path: which node of which member cluster is speaking.
//!
//! Every sidecar presents a projected, Pod-bound ServiceAccount token (audience `lockstep.dev/control`,
//! a short lifetime) as `authorization: Bearer`. The operator verifies it offline, against the member
//! clusters' ServiceAccount signing keys (a JWKS, what `kubectl get --raw /openid/v1/jwks` prints,
//! stored in each MemberCluster's `spec.serviceAccountKeys`), so it works for clusters whose API server
//! the hub cannot reach (GrpcOnly):
//! - the **cluster** is the MemberCluster whose key set holds the token's key id (`kid`), never the
//!   `iss` string, which any cluster can choose; two MemberClusters with a key in common are refused
//!   (neither authenticates anyone until the overlap is gone);
//! - the **node** is the `kubernetes.io.node.name` claim, which the API server puts in tokens bound to a
//!   Pod (Kubernetes 1.32 and later); a token bound to no Pod, or without a node, is refused;
//! - the token must be signed (RS256 or ES256), unexpired, for the audience, no longer lived than the
//!   limit, and issued to the sidecars' ServiceAccount (any Pod on a node can ask for a token with any
//!   audience; only the sidecar's account speaks for the node).
//!
//! A credential of node A therefore never authenticates as node B, and a Secret shared by a DaemonSet
//! is never needed. Everything here is pure: keys in, identity or refusal out.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use ring::signature::{self, UnparsedPublicKey};

/// The audience sidecars ask their tokens for, unless the operator is told otherwise.
pub const DEFAULT_AUDIENCE: &str = "lockstep.dev/control";

/// Tokens whose exp is this far past are still taken (clocks differ a little between clusters).
pub const CLOCK_SKEW_SECONDS: i64 = 60;

/// Who is speaking, as the token proves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// The MemberCluster whose keys signed the token.
    pub cluster: String,
    /// The node the token's Pod is bound to.
    pub node: String,
    /// The Pod (namespace/name) the token is bound to.
    pub pod: String,
}

/// Why a token does not authenticate; each says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No `authorization: Bearer` metadata.
    #[error(
        "no credential: present the node's projected ServiceAccount token as 'authorization: Bearer <token>'"
    )]
    Missing,
    /// Not a JWT, or claims of the wrong shape.
    #[error("the token is malformed: {0}")]
    Malformed(String),
    /// The key id is in no MemberCluster's key set.
    #[error(
        "the token's key id {kid:?} is in no MemberCluster's serviceAccountKeys (a rotated signing key? put the cluster's current JWKS in its MemberCluster)"
    )]
    UnknownKey {
        /// The key id.
        kid: String,
    },
    /// The key id is in a MemberCluster that is refused (keys shared with another).
    #[error("the token's key belongs to MemberCluster {cluster}, which is refused: {why}")]
    RefusedCluster {
        /// The cluster.
        cluster: String,
        /// Why.
        why: String,
    },
    /// The signature does not verify, or the algorithm is not the key's.
    #[error("the token's signature does not verify with key {kid:?} of MemberCluster {cluster}")]
    Signature {
        /// The cluster.
        cluster: String,
        /// The key id.
        kid: String,
    },
    /// The audience is not ours.
    #[error("the token is not for audience {wanted:?} (it is for {found:?})")]
    Audience {
        /// Ours.
        wanted: String,
        /// The token's.
        found: Vec<String>,
    },
    /// Expired, not yet valid, or living longer than the limit.
    #[error("the token is not valid now: {0}")]
    Lifetime(String),
    /// Not bound to a Pod on a node.
    #[error(
        "the token is not bound to a Pod on a node (no kubernetes.io.pod or kubernetes.io.node.name claim; a projected token needs Kubernetes 1.32 or later)"
    )]
    Unbound,
    /// Issued to another ServiceAccount than the sidecars'.
    #[error("the token is for {found:?}, not for the sidecars' ServiceAccount {wanted:?}")]
    ServiceAccount {
        /// The sidecars' account (system:serviceaccount:namespace:name).
        wanted: String,
        /// The token's subject.
        found: String,
    },
}

impl Refusal {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed(_) => "malformed",
            Self::UnknownKey { .. } => "unknown_key",
            Self::RefusedCluster { .. } => "refused_cluster",
            Self::Signature { .. } => "signature",
            Self::Audience { .. } => "audience",
            Self::Lifetime(_) => "lifetime",
            Self::Unbound => "unbound",
            Self::ServiceAccount { .. } => "service_account",
        }
    }
}

/// A public key of a JWKS.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PublicKey {
    /// RSA modulus and exponent (big-endian), for RS256.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// A P-256 point (uncompressed, 65 bytes), for ES256.
    P256(Vec<u8>),
}

#[derive(serde::Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(serde::Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

fn b64(text: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|error| format!("not base64url: {error}"))
}

/// Parses a JWKS into (kid, key); keys without a kid, or of kinds kube does not use, are an error.
fn parse_jwks(text: &str) -> Result<Vec<(String, PublicKey)>, String> {
    let jwks: Jwks = serde_json::from_str(text).map_err(|error| format!("not a JWKS: {error}"))?;
    if jwks.keys.is_empty() {
        return Err("the JWKS holds no key".into());
    }
    jwks.keys
        .into_iter()
        .map(|key| {
            let kid = key
                .kid
                .filter(|kid| !kid.is_empty())
                .ok_or("a key without a kid")?;
            let field = |value: Option<String>, name: &str| {
                value.ok_or_else(|| format!("key {kid:?} has no {name:?}"))
            };
            let public = match (key.kty.as_str(), key.crv.as_deref()) {
                ("RSA", _) => PublicKey::Rsa {
                    n: b64(&field(key.n, "n")?)?,
                    e: b64(&field(key.e, "e")?)?,
                },
                ("EC", Some("P-256")) => {
                    let (x, y) = (b64(&field(key.x, "x")?)?, b64(&field(key.y, "y")?)?);
                    if x.len() != 32 || y.len() != 32 {
                        return Err(format!("key {kid:?}: a P-256 point has 32-byte x and y"));
                    }
                    PublicKey::P256([&[0x04][..], &x, &y].concat())
                }
                (kty, crv) => {
                    return Err(format!(
                        "key {kid:?}: kty {kty:?} crv {crv:?} is not RSA or EC P-256"
                    ));
                }
            };
            Ok((kid, public))
        })
        .collect()
}

/// Every MemberCluster's ServiceAccount keys, by key id, and the clusters refused.
#[derive(Debug, Clone, Default)]
pub struct KeySets {
    by_kid: BTreeMap<String, (String, PublicKey)>,
    /// Clusters whose keys authenticate no one, and why (malformed, or shared with another cluster).
    refused: BTreeMap<String, String>,
    /// How many keys each accepted cluster has.
    counts: BTreeMap<String, usize>,
}

impl KeySets {
    /// The key sets of `clusters`: (MemberCluster name, its `spec.serviceAccountKeys`).
    pub fn build<'a>(clusters: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> Self {
        let mut parsed: BTreeMap<String, Vec<(String, PublicKey)>> = BTreeMap::new();
        let mut refused = BTreeMap::new();
        for (cluster, jwks) in clusters {
            let Some(jwks) = jwks else { continue };
            match parse_jwks(jwks) {
                Ok(keys) => {
                    parsed.insert(cluster.to_owned(), keys);
                }
                Err(why) => {
                    refused.insert(cluster.to_owned(), format!("serviceAccountKeys: {why}"));
                }
            }
        }
        // A key id (or the same key under another id) in two clusters: which cluster a token comes
        // from would be ambiguous, so both are refused.
        let mut owners_by_kid: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        let mut owners_by_key: BTreeMap<&PublicKey, BTreeSet<&str>> = BTreeMap::new();
        for (cluster, keys) in &parsed {
            for (kid, key) in keys {
                owners_by_kid.entry(kid).or_default().insert(cluster);
                owners_by_key.entry(key).or_default().insert(cluster);
            }
        }
        let owners: Vec<BTreeSet<&str>> = owners_by_kid
            .into_values()
            .chain(owners_by_key.into_values())
            .collect();
        for clusters in owners.iter().filter(|owners| owners.len() > 1) {
            for cluster in clusters {
                let others: Vec<&str> = clusters.iter().copied().filter(|c| c != cluster).collect();
                refused.entry((*cluster).to_owned()).or_insert_with(|| {
                    format!(
                        "its serviceAccountKeys share a key with MemberCluster {}: a token's cluster would be ambiguous",
                        others.join(", ")
                    )
                });
            }
        }
        let mut by_kid = BTreeMap::new();
        let mut counts = BTreeMap::new();
        for (cluster, keys) in parsed {
            counts.insert(cluster.clone(), keys.len());
            for (kid, key) in keys {
                by_kid.insert(kid, (cluster.clone(), key));
            }
        }
        for cluster in refused.keys() {
            counts.remove(cluster);
        }
        Self {
            by_kid,
            refused,
            counts,
        }
    }

    /// Why `cluster`'s keys are refused, if they are.
    pub fn refused(&self, cluster: &str) -> Option<&str> {
        self.refused.get(cluster).map(String::as_str)
    }

    /// How many keys `cluster` has that authenticate (0 when refused or none given).
    pub fn keys_of(&self, cluster: &str) -> usize {
        self.counts.get(cluster).copied().unwrap_or(0)
    }
}

/// What a token must be, besides signed by a member cluster's key.
#[derive(Debug, Clone)]
pub struct Expectations {
    /// The audience (`aud` must contain it).
    pub audience: String,
    /// The sidecars' ServiceAccount as `system:serviceaccount:<namespace>:<name>`.
    pub service_account: String,
    /// The longest lifetime (exp - iat) taken, in seconds.
    pub max_lifetime_seconds: i64,
}

#[derive(serde::Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(serde::Deserialize)]
struct Claims {
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    exp: Option<i64>,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default, rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(serde::Deserialize)]
struct KubernetesClaims {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    pod: Option<NamedObject>,
    #[serde(default)]
    node: Option<NamedObject>,
}

#[derive(serde::Deserialize)]
struct NamedObject {
    name: String,
}

/// Verifies `token` at `now` (seconds since the Unix epoch) against `keys`.
pub fn verify(
    keys: &KeySets,
    token: &str,
    expect: &Expectations,
    now: i64,
) -> Result<Authenticated, Refusal> {
    let malformed = |what: &str| Refusal::Malformed(what.to_owned());
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("not a JWT (three base64url parts)"));
    };
    let header: Header = serde_json::from_slice(&b64(header).map_err(|e| malformed(&e))?)
        .map_err(|_| malformed("the header is not JSON"))?;
    let kid = header
        .kid
        .ok_or_else(|| malformed("the header names no key id"))?;
    let Some((cluster, key)) = keys.by_kid.get(&kid) else {
        return Err(Refusal::UnknownKey { kid });
    };
    if let Some(why) = keys.refused(cluster) {
        return Err(Refusal::RefusedCluster {
            cluster: cluster.clone(),
            why: why.to_owned(),
        });
    }
    let signed = &token[..header_and_payload_len(token)];
    let signature = b64(signature).map_err(|e| malformed(&e))?;
    let verified = match (header.alg.as_str(), key) {
        ("RS256", PublicKey::Rsa { n, e }) => signature::RsaPublicKeyComponents { n, e }
            .verify(
                &signature::RSA_PKCS1_2048_8192_SHA256,
                signed.as_bytes(),
                &signature,
            )
            .is_ok(),
        ("ES256", PublicKey::P256(point)) => {
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(signed.as_bytes(), &signature)
                .is_ok()
        }
        _ => false,
    };
    if !verified {
        return Err(Refusal::Signature {
            cluster: cluster.clone(),
            kid,
        });
    }
    let claims: Claims = serde_json::from_slice(&b64(payload).map_err(|e| malformed(&e))?)
        .map_err(|error| Refusal::Malformed(format!("the claims: {error}")))?;
    let audiences = match claims.aud {
        Some(Audience::One(one)) => vec![one],
        Some(Audience::Many(many)) => many,
        None => Vec::new(),
    };
    if !audiences.contains(&expect.audience) {
        return Err(Refusal::Audience {
            wanted: expect.audience.clone(),
            found: audiences,
        });
    }
    let (Some(exp), Some(iat)) = (claims.exp, claims.iat) else {
        return Err(Refusal::Lifetime("no exp or iat claim".into()));
    };
    if exp + CLOCK_SKEW_SECONDS < now {
        return Err(Refusal::Lifetime(format!("expired {}s ago", now - exp)));
    }
    if claims.nbf.unwrap_or(iat) > now + CLOCK_SKEW_SECONDS {
        return Err(Refusal::Lifetime("not valid yet".into()));
    }
    if exp - iat > expect.max_lifetime_seconds {
        return Err(Refusal::Lifetime(format!(
            "it lives {}s, longer than the {}s allowed (request the projected token with expirationSeconds <= {})",
            exp - iat,
            expect.max_lifetime_seconds,
            expect.max_lifetime_seconds
        )));
    }
    let subject = claims.sub.unwrap_or_default();
    if subject != expect.service_account {
        return Err(Refusal::ServiceAccount {
            wanted: expect.service_account.clone(),
            found: subject,
        });
    }
    let kubernetes = claims.kubernetes.ok_or(Refusal::Unbound)?;
    let (Some(pod), Some(node)) = (kubernetes.pod, kubernetes.node) else {
        return Err(Refusal::Unbound);
    };
    if node.name.is_empty() || pod.name.is_empty() {
        return Err(Refusal::Unbound);
    }
    Ok(Authenticated {
        cluster: cluster.clone(),
        node: node.name,
        pod: format!("{}/{}", kubernetes.namespace.unwrap_or_default(), pod.name),
    })
}

fn header_and_payload_len(token: &str) -> usize {
    token.rfind('.').unwrap_or(token.len())
}

/// Signs tokens as kube-apiserver does (ES256, its claims), for tests and demos: real keys, real
/// signatures. Not used by the operator itself.
pub struct TokenSigner {
    pair: ring::signature::EcdsaKeyPair,
    kid: String,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// A signing key could not be made.
#[derive(Debug, thiserror::Error)]
#[error("could not make or use a P-256 signing key")]
pub struct SignerError;

impl TokenSigner {
    /// A new P-256 key pair; its key id is derived from the public key, as kube-apiserver does.
    pub fn generate() -> Result<Self, SignerError> {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
        let rng = ring::rand::SystemRandom::new();
        let document = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| SignerError)?;
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, document.as_ref(), &rng)
                .map_err(|_| SignerError)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, pair.public_key().as_ref());
        let kid = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref());
        Ok(Self { pair, kid, rng })
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWKS holding the public key, as `/openid/v1/jwks` prints it.
    pub fn jwks(&self) -> String {
        use ring::signature::KeyPair;
        let point = self.pair.public_key().as_ref();
        let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        serde_json::json!({"keys": [{
            "use": "sig", "kty": "EC", "kid": self.kid, "crv": "P-256", "alg": "ES256",
            "x": encode(&point[1..33]), "y": encode(&point[33..65]),
        }]})
        .to_string()
    }

    /// Signs `claims` (a JSON object).
    pub fn sign(&self, claims: &serde_json::Value) -> Result<String, SignerError> {
        let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let header = serde_json::json!({"alg": "ES256", "kid": self.kid});
        let signed = format!(
            "{}.{}",
            encode(header.to_string().as_bytes()),
            encode(claims.to_string().as_bytes())
        );
        let signature = self
            .pair
            .sign(&self.rng, signed.as_bytes())
            .map_err(|_| SignerError)?;
        Ok(format!("{signed}.{}", encode(signature.as_ref())))
    }

    /// A token as the kubelet's projection gets it: for `audience`, issued to ServiceAccount
    /// `namespace/service_account`, bound to Pod `pod` on `node`, living `lifetime` seconds from `now`.
    #[allow(clippy::too_many_arguments)]
    pub fn pod_token(
        &self,
        audience: &str,
        namespace: &str,
        service_account: &str,
        pod: &str,
        node: &str,
        now: i64,
        lifetime: i64,
    ) -> Result<String, SignerError> {
        self.sign(&serde_json::json!({
            "aud": [audience],
            "exp": now + lifetime,
            "iat": now,
            "nbf": now,
            "iss": "https://kubernetes.default.svc.cluster.local",
            "jti": format!("{pod}-{now}"),
            "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
            "kubernetes.io": {
                "namespace": namespace,
                "node": {"name": node, "uid": format!("uid-{node}")},
                "pod": {"name": pod, "uid": format!("uid-{pod}")},
                "serviceaccount": {"name": service_account, "uid": format!("uid-{service_account}")},
            },
        }))
    }
}

#[cfg(test)]
mod tests;
