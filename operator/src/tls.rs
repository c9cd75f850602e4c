//! TLS on the gRPC Control service.
//!
//! The serving certificate and key are read from files and read again when either changes on disk (a
//! Secret updated by a person, a script or cert-manager): [`ReloadingCertificate`] looks at the files'
//! metadata on every handshake, so a rotation reaches the next connection without a restart, and a pair
//! that does not load (half written, or a key that does not match) leaves the last good one serving.
//! Handshakes run concurrently, off the accept loop, each within [`HANDSHAKE_TIMEOUT`].
//!
//! Plaintext is served only when the operator is started with `--grpc-insecure-plaintext` (tests, and a
//! migration from a release without TLS): alone, every connection is plaintext; beside a certificate,
//! each connection is told apart by its first byte (a TLS ClientHello starts with 0x16), so sidecars
//! can move to TLS one by one. Plaintext connections are never authenticated (see [`crate::identity`]).

use std::{
    io,
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::CancellationToken;

/// How long a new connection may take to complete its TLS handshake (or to send its first byte).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate and key that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file holds no usable PEM.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The key does not sign for the certificate, or is of an unsupported kind.
    #[error("the key in {key} does not fit the certificate in {cert}: {what}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        what: String,
    },
}

/// What identifies one version of the files: modification time, size and inode of each.
type Stamp = [(SystemTime, u64, u64); 2];

/// The serving certificate, read again from its files whenever they change.
#[derive(Debug)]
pub struct ReloadingCertificate {
    cert: PathBuf,
    key: PathBuf,
    loaded: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    /// The stamp of the files last tried (loaded or not: a broken pair is tried again once it changes).
    tried: Option<Stamp>,
    current: Arc<CertifiedKey>,
}

impl ReloadingCertificate {
    /// Loads the pair now: the operator does not start with a certificate it cannot serve.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let tried = stamp(cert, key).ok();
        let current = Arc::new(load_pair(cert, key)?);
        Ok(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            loaded: Mutex::new(Loaded { tried, current }),
        })
    }

    /// The certificate to serve now: read again first if its files changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = match stamp(&self.cert, &self.key) {
            Ok(now) => now,
            Err(error) => {
                tracing::warn!(%error, "the Control service's certificate files are unreadable; serving the last one loaded");
                return loaded.current.clone();
            }
        };
        if loaded.tried != Some(now) {
            loaded.tried = Some(now);
            match load_pair(&self.cert, &self.key) {
                Ok(pair) => {
                    tracing::info!(cert = %self.cert.display(), "the Control service's certificate changed on disk: new connections use the new one");
                    loaded.current = Arc::new(pair);
                }
                Err(error) => tracing::warn!(
                    %error,
                    "the Control service's certificate changed on disk but does not load; serving the last good one until it changes again"
                ),
            }
        }
        loaded.current.clone()
    }

    /// A rustls server configuration serving this certificate over HTTP/2.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn stamp(cert: &Path, key: &Path) -> io::Result<Stamp> {
    let one = |path: &Path| {
        let metadata = std::fs::metadata(path)?;
        Ok::<_, io::Error>((metadata.modified()?, metadata.len(), metadata.ino()))
    };
    Ok([one(cert)?, one(key)?])
}

fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let chain = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem {
            path: cert.to_path_buf(),
            what: error.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: cert.to_path_buf(),
            what: "no CERTIFICATE block".into(),
        });
    }
    let private = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|error| TlsError::Pem {
        path: key.to_path_buf(),
        what: error.to_string(),
    })?;
    let mismatch = |what: String| TlsError::Mismatch {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        what,
    };
    let signing = rustls::crypto::ring::sign::any_supported_type(&private)
        .map_err(|error| mismatch(error.to_string()))?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match()
        .map_err(|error| mismatch(error.to_string()))?;
    Ok(pair)
}

/// How the Control service's connections are served.
#[derive(Debug, Clone)]
pub enum Transport {
    /// TLS with the given configuration; with `plaintext_too`, plaintext connections are served beside.
    Tls {
        /// The server configuration (its certificate resolver reloads).
        config: Arc<rustls::ServerConfig>,
        /// Also serve plaintext (migration only).
        plaintext_too: bool,
    },
    /// Plaintext only (tests and migration only).
    Plaintext,
}

/// What the Control service knows about a connection, in every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// Whether the connection is TLS (only TLS connections carry credentials).
    pub tls: bool,
}

/// One accepted connection, TLS or plaintext.
pub struct Connection {
    io: Io,
    info: ConnectionInfo,
}

enum Io {
    Tls(Box<TlsStream<TcpStream>>),
    Plain(TcpStream),
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
            Io::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
            Io::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
            Io::Plain(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
            Io::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}

/// The first byte of every TLS connection (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Accepts connections on `listener` until `stop`, and yields them once their handshakes are done.
/// Handshakes run concurrently, so a slow or silent peer holds back no other; a failed one is logged.
pub fn incoming(
    listener: Arc<TcpListener>,
    transport: Transport,
    stop: CancellationToken,
) -> impl futures::Stream<Item = io::Result<Connection>> + Send + 'static {
    let (sender, receiver) = tokio::sync::mpsc::channel::<io::Result<Connection>>(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => return,
                () = sender.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Such errors (out of file descriptors, a connection reset before it was taken) are
                    // about one connection or a passing condition: keep accepting, after a breath.
                    tracing::warn!(%error, "accepting a Control connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let sender = sender.clone();
            let transport = transport.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(stream, remote, transport))
                    .await
                {
                    Ok(Ok(connection)) => {
                        let _ = sender.send(Ok(connection)).await;
                    }
                    Ok(Err(error)) => {
                        tracing::info!(%remote, %error, "Control connection refused: TLS handshake failed (a client without TLS, or one that does not trust this certificate?)");
                    }
                    Err(_) => {
                        tracing::info!(%remote, "Control connection closed: no handshake within {HANDSHAKE_TIMEOUT:?}");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

async fn handshake(
    stream: TcpStream,
    remote: SocketAddr,
    transport: Transport,
) -> io::Result<Connection> {
    let plain = |stream| Connection {
        io: Io::Plain(stream),
        info: ConnectionInfo {
            remote: Some(remote),
            tls: false,
        },
    };
    let config = match transport {
        Transport::Plaintext => return Ok(plain(stream)),
        Transport::Tls {
            config,
            plaintext_too,
        } => {
            if plaintext_too {
                let mut first = [0u8; 1];
                let peeked = stream.peek(&mut first).await?;
                if peeked == 0 || first[0] != TLS_HANDSHAKE_RECORD {
                    return Ok(plain(stream));
                }
            }
            config
        }
    };
    let stream = TlsAcceptor::from(config).accept(stream).await?;
    Ok(Connection {
        io: Io::Tls(Box::new(stream)),
        info: ConnectionInfo {
            remote: Some(remote),
            tls: true,
        },
    })
}
