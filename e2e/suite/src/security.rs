//! The credentials of a secure scenario: a CA and the operator's serving certificate (files, as a
//! Secret volume holds them), each member cluster's ServiceAccount signing key (its JWKS goes into its
//! MemberCluster) and the sidecars' projected tokens (files, as the kubelet writes them). Real keys and
//! signatures throughout (rcgen, ring).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use lockstep_operator::identity::TokenSigner;

use crate::scenario::FaultError;

/// How long the sidecars' tokens live (the chart projects them with this).
pub const TOKEN_LIFETIME_SECONDS: i64 = 600;

fn setup_error(what: impl std::fmt::Display) -> FaultError {
    FaultError::Setup(format!("credentials: {what}"))
}

/// One CA.
struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Result<Self, FaultError> {
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(setup_error)?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().map_err(setup_error)?;
        Ok(Self {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).map_err(setup_error)?,
        })
    }

    /// A serving certificate for the loopback address: (certificate PEM, key PEM).
    fn serving(&self) -> Result<(String, String), FaultError> {
        let key = rcgen::KeyPair::generate().map_err(setup_error)?;
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .map_err(setup_error)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(setup_error)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A scenario's credentials.
pub struct Credentials {
    dir: tempfile::TempDir,
    ca: Ca,
    signers: BTreeMap<String, TokenSigner>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("dir", &self.dir.path())
            .field("clusters", &self.signers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn write(path: &Path, text: &str) -> Result<(), FaultError> {
    // Written aside and renamed, as the kubelet swaps a mounted Secret's or token's file.
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).map_err(setup_error)?;
    std::fs::rename(&aside, path).map_err(setup_error)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Credentials {
    /// A CA with the operator's serving certificate, and a signing key per cluster.
    pub fn new<'a>(clusters: impl IntoIterator<Item = &'a str>) -> Result<Self, FaultError> {
        let dir = tempfile::tempdir().map_err(setup_error)?;
        let ca = Ca::new("lockstep control CA")?;
        let (cert, key) = ca.serving()?;
        let credentials = Self {
            signers: clusters
                .into_iter()
                .map(|cluster| {
                    Ok((
                        cluster.to_owned(),
                        TokenSigner::generate().map_err(setup_error)?,
                    ))
                })
                .collect::<Result<_, FaultError>>()?,
            dir,
            ca,
        };
        write(&credentials.key_file(), &key)?;
        write(&credentials.cert_file(), &cert)?;
        write(&credentials.ca_file(), &credentials.ca.issuer.pem())?;
        Ok(credentials)
    }

    /// The operator's certificate chain.
    pub fn cert_file(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }

    /// The operator's key.
    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("tls.key")
    }

    /// The CA bundle the sidecars trust.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// What `kubectl get --raw /openid/v1/jwks` prints in `cluster`.
    pub fn jwks(&self, cluster: &str) -> Option<String> {
        self.signers.get(cluster).map(TokenSigner::jwks)
    }

    /// A token of the sidecar on `node` of `cluster`, as its projected volume holds it.
    pub fn token(&self, cluster: &str, node: &str) -> Result<String, FaultError> {
        let signer = self
            .signers
            .get(cluster)
            .ok_or_else(|| setup_error(format!("no signing key for cluster {cluster}")))?;
        signer
            .pod_token(
                lockstep_operator::identity::DEFAULT_AUDIENCE,
                "lockstep",
                "lockstep-sidecar",
                &format!("lockstep-sidecar-{node}"),
                node,
                now(),
                TOKEN_LIFETIME_SECONDS,
            )
            .map_err(setup_error)
    }

    /// Writes the token of the sidecar on `node` of `cluster` to its file; returns the path.
    pub fn token_file(&self, cluster: &str, node: &str) -> Result<PathBuf, FaultError> {
        let path = self.dir.path().join(format!("token-{cluster}-{node}"));
        write(&path, &self.token(cluster, node)?)?;
        Ok(path)
    }

    /// Rotates to a new CA as an operator of a cluster would: the sidecars' bundle first holds both CAs,
    /// then the operator's certificate and key are replaced by ones of the new CA. Returns a file with the
    /// new CA alone (a client trusting only it reaches the operator only once the rotation took).
    pub fn rotate(&mut self) -> Result<PathBuf, FaultError> {
        let new = Ca::new("lockstep control CA (rotated)")?;
        let bundle = format!("{}{}", self.ca.issuer.pem(), new.issuer.pem());
        write(&self.ca_file(), &bundle)?;
        let (cert, key) = new.serving()?;
        write(&self.key_file(), &key)?;
        write(&self.cert_file(), &cert)?;
        let only_new = self.dir.path().join("new-ca.crt");
        write(&only_new, &new.issuer.pem())?;
        self.ca = new;
        Ok(only_new)
    }
}
