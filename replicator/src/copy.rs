//! Synchronous copy of a volume's writes to its secondary: the replication link task (the I/O side of
//! [`crate::hold`], which owns the state).
//!
//! **Order.** Every write gets its sequence number and enters both the local store queue and the copy
//! queue under the volume's lock, so the secondary receives writes in sequence order and applies them in
//! that order. The secondary acknowledges cumulatively; a write's copy completes when an ack covers its
//! sequence.
//!
//! **Ack rule.** The NBD server acknowledges a write only when both its local write and its copy
//! completed successfully (they run in parallel).
//!
//! **Failure.** The link task reports a connection error, an `Error` frame from the secondary, a
//! protocol violation, or a write the secondary has not acknowledged within [`CopyConfig::timeout`]
//! (counted from when the write entered the copy queue). The state machine then holds every write whose
//! copy did not complete ([`crate::hold::ReplState::link_failed`]). Nothing is ever acknowledged
//! unreplicated except by a release.
//!
//! **Security.** With [`LinkSecurity::Tls`] every connection is mutual TLS (see [`crate::link_tls`]): a
//! secondary whose certificate does not verify, or one that refuses this primary (it does not own the
//! volume), fails the copy like any other secondary error.

use std::sync::Weak;
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::{Encoder, FramedRead};

use crate::hold::LinkItem;
use crate::link_tls::{ClientStream, LinkSecurity};
use crate::volume::Volume;
use crate::wire::{Frame, FrameCodec, FrameError};

/// Where and how strictly a volume is copied.
#[derive(Debug, Clone)]
pub struct CopyConfig {
    /// The secondary's replication address (`host:port`).
    pub secondary: String,
    /// How long a write may wait for the secondary's acknowledgement before the copy counts as failed.
    pub timeout: Duration,
    /// Plaintext, or mutual TLS (the CA bundle signs the secondary's certificate).
    pub security: LinkSecurity,
}

impl CopyConfig {
    /// A copy over a plaintext link: nothing is authenticated (tests).
    pub fn plaintext(secondary: &str, timeout: Duration) -> CopyConfig {
        CopyConfig {
            secondary: secondary.to_owned(),
            timeout,
            security: LinkSecurity::Plaintext,
        }
    }
}

/// Why a write's copy did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    /// The connection to the secondary failed or could not be made.
    #[error("replication link: {0}")]
    Link(String),
    /// The secondary did not acknowledge in time.
    #[error("secondary did not acknowledge within {0:?}")]
    Timeout(Duration),
    /// The secondary refused or failed a write.
    #[error("secondary refused sequence {seq}: {message}")]
    Secondary {
        /// The sequence it refused.
        seq: u64,
        /// Its message.
        message: String,
    },
    /// The secondary broke the protocol.
    #[error("replication protocol: {0}")]
    Protocol(String),
    /// The write was held longer than the hold timeout.
    #[error("held longer than the hold timeout ({0:?})")]
    HoldTimeout(Duration),
    /// The volume's state could not be persisted.
    #[error("persisting the volume state: {0}")]
    Persist(String),
    /// The volume was fenced at this epoch (its secondary was promoted): the write is refused.
    #[error(
        "the volume is fenced since epoch {0} (its secondary was promoted): writes are refused"
    )]
    Fenced(u64),
}

/// Why reading the secondary's frames failed, as a copy error.
fn link_failed(error: FrameError) -> CopyError {
    match error {
        // The frame error's own text already says "replication link: ": the copy error says it once.
        FrameError::Io(io) => CopyError::Link(io.to_string()),
        other => CopyError::Protocol(other.to_string()),
    }
}

/// How often the link task checks the oldest write's age against the timeout.
fn watchdog_period(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(1), Duration::from_millis(50))
}

/// Runs one replication link for a volume until it fails or the volume is dropped: connects, says
/// hello, streams queued frames, applies acknowledgements, and watches the oldest write's age.
pub(crate) async fn run_link(
    volume: Weak<Volume>,
    generation: u64,
    config: CopyConfig,
    hello: Frame,
    rx: mpsc::UnboundedReceiver<LinkItem>,
) {
    let timeout = config.timeout;
    let watchdog = {
        let volume = volume.clone();
        async move {
            let mut tick = tokio::time::interval(watchdog_period(timeout));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(volume) = volume.upgrade() else {
                    return Ok(());
                };
                if !volume.link_current(generation) {
                    // Closed (suspend, resume): end quietly, even if the socket is blackholed.
                    return Ok(());
                }
                if volume
                    .oldest_pending()
                    .is_some_and(|t| t.elapsed() > timeout)
                {
                    return Err(CopyError::Timeout(timeout));
                }
            }
        }
    };
    let link = stream(volume.clone(), generation, &config, hello, rx);
    let result = tokio::select! {
        r = watchdog => r,
        r = link => r,
    };
    if let Err(error) = result
        && let Some(volume) = volume.upgrade()
    {
        tracing::warn!(volume = %volume.name(), %error, "copy to the secondary failed");
        volume.copy_failed(generation, &error);
    }
}

/// Whether the secondary answers: one connection, a hello, its welcome within [`CopyConfig::timeout`].
/// The connection is closed at once (a link that follows takes the volume over anyway).
pub(crate) async fn probe(config: &CopyConfig, hello: Frame) -> Result<(), CopyError> {
    let attempt = async {
        let tcp = TcpStream::connect(&config.secondary)
            .await
            .map_err(|e| CopyError::Link(e.to_string()))?;
        let (rd, mut wr) = tokio::io::split(secure(config, tcp).await?);
        let mut buf = BytesMut::new();
        FrameCodec
            .encode(&hello, &mut buf)
            .map_err(|e| CopyError::Protocol(e.to_string()))?;
        send(&mut wr, &mut buf).await?;
        match FramedRead::new(rd, FrameCodec).next().await {
            Some(Ok(Frame::Welcome { .. })) => Ok(()),
            Some(Ok(Frame::Error { seq, message })) => Err(CopyError::Secondary { seq, message }),
            Some(Ok(other)) => Err(CopyError::Protocol(format!(
                "expected welcome, got {other:?}"
            ))),
            Some(Err(e)) => Err(link_failed(e)),
            None => Err(CopyError::Link("secondary closed the connection".into())),
        }
    };
    tokio::time::timeout(config.timeout, attempt)
        .await
        .map_err(|_| CopyError::Timeout(config.timeout))?
}

/// The TLS handshake on a new connection, if the link is secured.
async fn secure(config: &CopyConfig, tcp: TcpStream) -> Result<ClientStream, CopyError> {
    tcp.set_nodelay(true)
        .map_err(|e| CopyError::Link(e.to_string()))?;
    match &config.security {
        LinkSecurity::Plaintext => Ok(ClientStream::Left(tcp)),
        LinkSecurity::Tls(tls) => tls
            .connect(tcp, &config.secondary)
            .await
            .map_err(|e| CopyError::Link(e.to_string())),
    }
}

/// Writes out and clears `buf` (flushed: TLS may hold bytes back otherwise).
async fn send<W: AsyncWrite + Unpin>(wr: &mut W, buf: &mut BytesMut) -> Result<(), CopyError> {
    wr.write_all(buf)
        .await
        .map_err(|e| CopyError::Link(e.to_string()))?;
    wr.flush()
        .await
        .map_err(|e| CopyError::Link(e.to_string()))?;
    buf.clear();
    Ok(())
}

async fn connect(config: &CopyConfig) -> Result<ClientStream, CopyError> {
    // Retry until the watchdog decides (only a write waiting too long makes an unreachable secondary a
    // failure; an idle volume keeps trying). A TLS handshake that fails is not retried: it fails the copy.
    let addr = &config.secondary;
    let mut delay = Duration::from_millis(20);
    loop {
        match TcpStream::connect(addr).await {
            Ok(tcp) => return secure(config, tcp).await,
            Err(e) => {
                tracing::debug!(%addr, error = %e, "secondary not reachable yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        }
    }
}

async fn stream(
    volume: Weak<Volume>,
    generation: u64,
    config: &CopyConfig,
    hello: Frame,
    mut rx: mpsc::UnboundedReceiver<LinkItem>,
) -> Result<(), CopyError> {
    let first_seq = match &hello {
        Frame::Hello { first_seq, .. } => *first_seq,
        _ => return Err(CopyError::Protocol("link must open with hello".into())),
    };
    let (rd, mut wr) = tokio::io::split(connect(config).await?);
    let mut buf = BytesMut::new();
    FrameCodec
        .encode(&hello, &mut buf)
        .map_err(|e| CopyError::Protocol(e.to_string()))?;
    send(&mut wr, &mut buf).await?;
    let mut frames = FramedRead::new(rd, FrameCodec);
    match frames.next().await {
        Some(Ok(Frame::Welcome { next_seq, kept })) if next_seq == first_seq => {
            if let Some(volume) = volume.upgrade() {
                volume.secondary_keeps(kept);
            }
        }
        Some(Ok(Frame::Error { seq, message })) => {
            return Err(CopyError::Secondary { seq, message });
        }
        Some(Ok(other)) => {
            return Err(CopyError::Protocol(format!(
                "expected welcome, got {other:?}"
            )));
        }
        Some(Err(e)) => return Err(link_failed(e)),
        None => return Err(CopyError::Link("secondary closed the connection".into())),
    }

    let writer = async move {
        while let Some(item) = rx.recv().await {
            let mut next = Some(item);
            while let Some(item) = next {
                let frame = match item {
                    LinkItem::Frame(frame) => frame,
                    LinkItem::Deferred { seq, offset, data } => {
                        // Send what is buffered first: the data may take a moment to read.
                        send(&mut wr, &mut buf).await?;
                        let data = data
                            .await
                            .map_err(|_| CopyError::Link("resync read dropped".into()))?
                            .map_err(|e| CopyError::Link(e.to_string()))?;
                        Frame::Write { seq, offset, data }
                    }
                };
                FrameCodec
                    .encode(&frame, &mut buf)
                    .map_err(|e| CopyError::Protocol(e.to_string()))?;
                next = if buf.len() < 1024 * 1024 {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            send(&mut wr, &mut buf).await?;
        }
        // The volume is gone or the link was closed (suspend): nothing more to copy.
        Ok(())
    };
    let reader = async move {
        loop {
            match frames.next().await {
                Some(Ok(Frame::Ack { seq })) => {
                    let Some(volume) = volume.upgrade() else {
                        return Ok(());
                    };
                    volume.copy_acked(generation, seq)?;
                }
                Some(Ok(Frame::Error { seq, message })) => {
                    return Err(CopyError::Secondary { seq, message });
                }
                Some(Ok(other)) => {
                    return Err(CopyError::Protocol(format!("unexpected frame {other:?}")));
                }
                Some(Err(e)) => return Err(link_failed(e)),
                None => return Err(CopyError::Link("secondary closed the connection".into())),
            }
        }
    };
    tokio::select! {
        r = writer => r,
        r = reader => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_link_says_replication_link_once() {
        let reset = std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        );
        let error = link_failed(FrameError::Io(reset));
        assert_eq!(
            error.to_string(),
            "replication link: connection reset by peer"
        );
        assert_eq!(
            link_failed(FrameError::BadMagic(7)).to_string(),
            "replication protocol: bad frame magic 0x7"
        );
    }
}
