//! Mutual TLS on the replication link: who may stream to a secondary, and which secondary a primary
//! trusts.
//!
//! Both ends hold one [`LinkTls`]: their own certificate and key, and the CA bundle that signs the *other*
//! side's certificates (a secondary trusts the primary site's CA, a primary the secondary site's CA). The
//! secondary serves with its certificate and refuses every client that presents no certificate chaining
//! to its bundle; the primary verifies that the secondary's certificate chains to its bundle and names
//! the host it dialled (`secondary=HOST:PORT`: a DNS name or an IP address in the certificate), and
//! presents its own. A certificate used on the link must carry a DNS name (subject alternative name):
//! the first one is the side's **identity** — on a secondary, a primary's identity is what owns its
//! volumes (see [`crate::owners`]).
//!
//! [`LinkSecurity::Plaintext`] (the CLI's `--insecure-plaintext`, and library tests) authenticates
//! nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;
use tokio_util::either::Either;

/// A replication connection as the primary holds it: plaintext or TLS.
pub type ClientStream = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;
/// A replication connection as the secondary holds it: plaintext or TLS.
pub type ServerStream = Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>;

/// How one end of the replication link is secured.
#[derive(Debug, Clone)]
pub enum LinkSecurity {
    /// Plaintext, unauthenticated: anyone who reaches the secondary may stream to it (tests only, or
    /// behind `--insecure-plaintext`).
    Plaintext,
    /// Mutual TLS with these certificates.
    Tls(Arc<LinkTls>),
}

/// Why the link's certificates could not be loaded, or a TLS connection not made.
#[derive(Debug, thiserror::Error)]
pub enum LinkTlsError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM block is missing or malformed.
    #[error("{what}: {why}")]
    Pem {
        /// Which input (a file, or what it holds).
        what: String,
        /// What is wrong.
        why: String,
    },
    /// The certificate names no DNS name, so it identifies nobody.
    #[error(
        "{0}: the certificate carries no DNS name (subject alternative name); the first one is the identity on the replication link"
    )]
    NoIdentity(String),
    /// rustls refused the certificate, the key or the CA bundle.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The secondary's address names no host a certificate can be verified for.
    #[error("{0:?} is not HOST:PORT with a DNS name or an IP address a certificate can name")]
    ServerName(String),
    /// The TLS handshake failed.
    #[error("TLS handshake with {peer} failed: {source}")]
    Handshake {
        /// Who was at the other end.
        peer: String,
        /// Why (a certificate that does not chain to the CA bundle shows here).
        source: std::io::Error,
    },
}

/// One end's certificate, key and the CA bundle it trusts for the other end; ready-made rustls
/// configurations for both roles.
#[derive(Debug)]
pub struct LinkTls {
    identity: String,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn pem_error(what: &str, why: impl std::fmt::Display) -> LinkTlsError {
    LinkTlsError::Pem {
        what: what.to_owned(),
        why: why.to_string(),
    }
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, LinkTlsError> {
    let found = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, e))?;
    if found.is_empty() {
        return Err(pem_error(what, "no CERTIFICATE block"));
    }
    Ok(found)
}

/// The identity a certificate carries on the link: its first DNS subject alternative name.
pub fn identity_of(certificate: &CertificateDer<'_>) -> Option<String> {
    let parsed = webpki::EndEntityCert::try_from(certificate).ok()?;
    parsed.valid_dns_names().next().map(str::to_owned)
}

impl LinkTls {
    /// Reads the certificate chain, its key and the CA bundle trusted for the other end from files.
    pub fn load(cert: &Path, key: &Path, peer_ca: &Path) -> Result<LinkTls, LinkTlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| LinkTlsError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let name = |path: &Path| path.display().to_string();
        Self::build(
            (&read(cert)?, &name(cert)),
            (&read(key)?, &name(key)),
            (&read(peer_ca)?, &name(peer_ca)),
        )
    }

    /// The same from PEM text (tests, and certificates made in-process).
    pub fn from_pem(cert: &str, key: &str, peer_ca: &str) -> Result<LinkTls, LinkTlsError> {
        Self::build(
            (cert.as_bytes(), "the certificate"),
            (key.as_bytes(), "the key"),
            (peer_ca.as_bytes(), "the CA bundle"),
        )
    }

    fn build(
        (cert, cert_name): (&[u8], &str),
        (key, key_name): (&[u8], &str),
        (peer_ca, ca_name): (&[u8], &str),
    ) -> Result<LinkTls, LinkTlsError> {
        let chain = certificates(cert, cert_name)?;
        let identity = chain
            .first()
            .and_then(identity_of)
            .ok_or_else(|| LinkTlsError::NoIdentity(cert_name.to_owned()))?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| pem_error(key_name, e))?;
        let mut roots = RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(certificates(peer_ca, ca_name)?);
        if added == 0 {
            return Err(pem_error(ca_name, "no usable CA certificate in it"));
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config =
            |e: rustls::Error| LinkTlsError::Config(format!("{cert_name}, {key_name}: {e}"));
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()
                .map_err(|e| LinkTlsError::Config(format!("{ca_name}: {e}")))?;
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config)?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(config)?;
        Ok(LinkTls {
            identity,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// This end's identity (its certificate's first DNS name).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Secondary side: the TLS handshake on an accepted connection; returns the stream and the
    /// primary's identity. A client without a certificate, or with one the bundle does not sign, fails.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        peer: std::net::SocketAddr,
    ) -> Result<(ServerStream, String), LinkTlsError> {
        let handshake = |source| LinkTlsError::Handshake {
            peer: format!("primary {peer}"),
            source,
        };
        let stream = tokio_rustls::TlsAcceptor::from(Arc::clone(&self.server))
            .accept(tcp)
            .await
            .map_err(handshake)?;
        let identity = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(<[_]>::first)
            .and_then(identity_of)
            .ok_or_else(|| LinkTlsError::NoIdentity(format!("primary {peer}")))?;
        Ok((Either::Right(stream), identity))
    }

    /// Primary side: the TLS handshake with the secondary at `address` (`HOST:PORT`), whose certificate
    /// must name `HOST`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        address: &str,
    ) -> Result<ClientStream, LinkTlsError> {
        let host = address
            .rsplit_once(':')
            .map(|(host, _port)| host.trim_start_matches('[').trim_end_matches(']'))
            .filter(|host| !host.is_empty())
            .ok_or_else(|| LinkTlsError::ServerName(address.to_owned()))?;
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| LinkTlsError::ServerName(address.to_owned()))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::clone(&self.client))
            .connect(name, tcp)
            .await
            .map_err(|source| LinkTlsError::Handshake {
                peer: format!("the secondary at {address}"),
                source,
            })?;
        Ok(Either::Right(stream))
    }
}

/// Certificates for the link made in-process with real keys and signatures (tests, the benchmark,
/// the end-to-end harness): one CA per site.
pub struct SiteCa {
    pem: String,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl std::fmt::Debug for SiteCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteCa").finish_non_exhaustive()
    }
}

impl SiteCa {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Result<SiteCa, rcgen::Error> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate()?)?;
        Ok(SiteCa {
            pem: issuer.pem(),
            issuer,
        })
    }

    /// The CA's certificate (PEM): the bundle the other site trusts.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A certificate for `identity` (its first DNS name) that also names `hosts` (DNS names or IP
    /// addresses the other end dials): (certificate PEM, key PEM).
    pub fn issue(&self, identity: &str, hosts: &[&str]) -> Result<(String, String), rcgen::Error> {
        let names = std::iter::once(identity)
            .chain(hosts.iter().copied())
            .map(str::to_owned)
            .collect::<Vec<_>>();
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(names)?.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A [`LinkTls`] for `identity` (naming `hosts` too) signed by this CA, trusting `peer` for the
    /// other end.
    pub fn link_tls(
        &self,
        identity: &str,
        hosts: &[&str],
        peer: &SiteCa,
    ) -> Result<Arc<LinkTls>, LinkTlsError> {
        let (cert, key) = self
            .issue(identity, hosts)
            .map_err(|e| LinkTlsError::Config(format!("issuing a certificate: {e}")))?;
        LinkTls::from_pem(&cert, &key, peer.pem()).map(Arc::new)
    }
}
