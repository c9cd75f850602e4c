//! How the sidecar reaches the operator's Control service securely.
//!
//! - [`TlsConnector`]: every connection is TLS, and the operator's certificate must chain to the CA
//!   bundle in `--operator-ca-file` and name the endpoint's host (or `--operator-server-name`). The
//!   bundle is read again on every connection, so a rotated CA reaches the next reconnect. An operator
//!   whose certificate does not verify is never spoken to: none of its directives is enforced.
//! - [`Credentials`]: every call carries the node's projected ServiceAccount token as
//!   `authorization: Bearer`, read from its file on every call (the kubelet rotates it).
//! - Plaintext (`--insecure-plaintext-control`, an `http://` endpoint) sends no token and verifies
//!   nothing: for tests and a migration from a release without TLS only, and logged as such.

use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;

/// Where a projected ServiceAccount token is mounted, unless told otherwise.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/lockstep.dev/control/token";

/// Why a connection to the operator could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The endpoint names no host.
    #[error("the operator endpoint {0} names no host")]
    NoHost(String),
    /// The CA bundle could not be read or holds no certificate.
    #[error("the operator CA bundle {path}: {what}")]
    CaBundle {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The name to verify is not a DNS name or an IP address.
    #[error("{0:?} is not a name a certificate can be verified for")]
    ServerName(String),
    /// TCP or TLS failed (a certificate that does not chain to the CA shows here).
    #[error("connecting to the operator at {address}: {source}")]
    Io {
        /// host:port.
        address: String,
        /// Why.
        source: io::Error,
    },
    /// The TLS handshake failed: a certificate that does not chain to the CA or names another host, or
    /// an operator that does not speak TLS (still plaintext, mid-migration).
    #[error(
        "TLS handshake with the operator at {address} failed: {source} (an operator certificate that does not chain to --operator-ca-file or names another host, or an operator still serving plaintext)"
    )]
    Handshake {
        /// host:port.
        address: String,
        /// Why.
        source: io::Error,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Dials the operator over TLS, verifying its certificate against a CA bundle read on every connection.
#[derive(Debug, Clone)]
pub struct TlsConnector {
    ca_file: PathBuf,
    server_name: Option<String>,
}

impl TlsConnector {
    /// A connector trusting the CAs in `ca_file`; the certificate must name `server_name`, or the
    /// endpoint's host when that is `None`.
    pub fn new(ca_file: &Path, server_name: Option<String>) -> Self {
        Self {
            ca_file: ca_file.to_path_buf(),
            server_name,
        }
    }

    fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, ConnectError> {
        let bundle = |what: String| ConnectError::CaBundle {
            path: self.ca_file.clone(),
            what,
        };
        let pem = std::fs::read(&self.ca_file).map_err(|error| bundle(error.to_string()))?;
        let certificates = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| bundle(error.to_string()))?;
        let mut roots = RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(certificates);
        if added == 0 {
            return Err(bundle("no usable CA certificate in it".into()));
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    async fn connect(
        self,
        uri: http::Uri,
    ) -> Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, ConnectError> {
        let host = uri
            .host()
            .map(|host| {
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned()
            })
            .filter(|host| !host.is_empty())
            .ok_or_else(|| ConnectError::NoHost(uri.to_string()))?;
        let port = uri.port_u16().unwrap_or(443);
        let name = self.server_name.clone().unwrap_or_else(|| host.clone());
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| ConnectError::ServerName(name))?;
        let config = self.client_config()?;
        let address = format!("{host}:{port}");
        let io = |source| ConnectError::Io {
            address: address.clone(),
            source,
        };
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(io)?;
        let _ = tcp.set_nodelay(true);
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(server_name, tcp)
            .await
            .map_err(|source| ConnectError::Handshake {
                address: address.clone(),
                source,
            })?;
        Ok(TokioIo::new(stream))
    }
}

impl tower::Service<http::Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

/// Puts the node's ServiceAccount token on every call (none on a plaintext path: it would travel in
/// the clear).
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    token_file: Option<PathBuf>,
}

impl Credentials {
    /// The token in `file`, read on every call.
    pub fn token_file(file: &Path) -> Self {
        Self {
            token_file: Some(file.to_path_buf()),
        }
    }

    /// No credentials (plaintext).
    pub fn none() -> Self {
        Self::default()
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(file) = &self.token_file else {
            return Ok(request);
        };
        let token = std::fs::read_to_string(file).map_err(|error| {
            tonic::Status::unauthenticated(format!(
                "this sidecar has no ServiceAccount token to present ({}: {error}); is the projected token volume mounted?",
                file.display()
            ))
        })?;
        let value = format!("Bearer {}", token.trim())
            .parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>()
            .map_err(|_| {
                tonic::Status::unauthenticated(format!(
                    "the ServiceAccount token in {} is not a token",
                    file.display()
                ))
            })?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}
