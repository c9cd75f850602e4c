//! The NBD client's I/O: one connection, one request at a time, simple replies only.
//!
//! A request whose future is dropped half-way (cancelled) or that fails at the transport leaves the
//! connection in an unknown state: the client then refuses further requests ([`NbdError::Broken`]), and
//! the caller reconnects.

use super::address::NbdAddress;
use super::proto::{self, Command, ExportInfo, ProtoError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest read or write sent as one request; longer ones are split.
pub const MAX_REQUEST: usize = 1 << 20;
/// The longest option reply the client accepts.
const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// A byte stream the client can run over.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// Errors of the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The transport failed (connection refused, reset, closed early...).
    #[error("NBD transport: {0}")]
    Io(#[from] std::io::Error),
    /// The server broke the protocol.
    #[error("NBD protocol: {0}")]
    Protocol(#[from] ProtoError),
    /// The server refused to open the export.
    #[error("NBD server refused export {export:?}: {reply}{}", if message.is_empty() { String::new() } else { format!(" ({message})") })]
    Refused {
        /// The export asked for.
        export: String,
        /// The error reply's name.
        reply: &'static str,
        /// The server's message, if any.
        message: String,
    },
    /// The server answered a command with an error.
    #[error("NBD {command:?} at offset {offset} length {length} failed: {name} ({code})")]
    Command {
        /// The command.
        command: Command,
        /// Its offset.
        offset: u64,
        /// Its length.
        length: u32,
        /// The NBD error code (errno values).
        code: u32,
        /// The code's name.
        name: &'static str,
    },
    /// The export cannot do what was asked.
    #[error("NBD export does not support {0}")]
    Unsupported(&'static str),
    /// An earlier request failed at the transport or was cancelled: the connection is unusable.
    #[error("NBD connection is broken by an earlier failed or cancelled request")]
    Broken,
}

impl NbdError {
    /// Whether the connection is lost (as opposed to the server refusing one command): a caller that wants
    /// to go on must reconnect.
    pub fn connection_lost(&self) -> bool {
        !matches!(self, NbdError::Command { .. } | NbdError::Unsupported(_))
    }
}

/// An open NBD export.
pub struct NbdClient {
    io: Box<dyn Transport>,
    info: ExportInfo,
    next_cookie: u64,
    broken: bool,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("info", &self.info)
            .field("broken", &self.broken)
            .finish()
    }
}

impl NbdClient {
    /// Connects to `address` and opens its export.
    pub async fn connect(address: &NbdAddress) -> Result<Self, NbdError> {
        match address {
            NbdAddress::Tcp { host, port, export } => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                Self::handshake(Box::new(stream), export).await
            }
            NbdAddress::Unix { socket, export } => {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Self::handshake(Box::new(stream), export).await
            }
        }
    }

    /// Negotiates `export` over an already connected stream (fixed newstyle, `NBD_OPT_GO`, falling back to
    /// `NBD_OPT_EXPORT_NAME`).
    pub async fn handshake(mut io: Box<dyn Transport>, export: &str) -> Result<Self, NbdError> {
        let mut greeting = [0u8; 18];
        io.read_exact(&mut greeting).await?;
        let server_flags = proto::decode_greeting(&greeting)?;
        let fixed = server_flags & proto::FLAG_FIXED_NEWSTYLE != 0;
        let no_zeroes = server_flags & proto::FLAG_NO_ZEROES != 0;
        let mut client_flags = 0;
        if fixed {
            client_flags |= proto::CLIENT_FIXED_NEWSTYLE;
        }
        if no_zeroes {
            client_flags |= proto::CLIENT_NO_ZEROES;
        }
        io.write_all(&client_flags.to_be_bytes()).await?;
        let info = if fixed {
            match go(&mut io, export).await? {
                Some(info) => info,
                None => export_name(&mut io, export, no_zeroes).await?,
            }
        } else {
            export_name(&mut io, export, no_zeroes).await?
        };
        Ok(Self {
            io,
            info,
            next_cookie: 1,
            broken: false,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// What the server said about the export.
    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub async fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_REQUEST);
            let at = offset + done as u64;
            let chunk = &mut buf[done..done + n];
            self.request(Command::Read, 0, at, n as u32, &[], chunk)
                .await?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset`; with `fua`, the server makes it durable before replying.
    pub async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        if self.info.read_only() {
            return Err(NbdError::Unsupported("writes (the export is read-only)"));
        }
        if fua && !self.info.can_fua() {
            return Err(NbdError::Unsupported("FUA"));
        }
        let flags = if fua { proto::CMD_FLAG_FUA } else { 0 };
        for (i, chunk) in data.chunks(MAX_REQUEST).enumerate() {
            let at = offset + (i * MAX_REQUEST) as u64;
            self.request(
                Command::Write,
                flags,
                at,
                chunk.len() as u32,
                chunk,
                &mut [],
            )
            .await?;
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub async fn flush(&mut self) -> Result<(), NbdError> {
        if !self.info.can_flush() {
            return Err(NbdError::Unsupported("FLUSH"));
        }
        self.request(Command::Flush, 0, 0, 0, &[], &mut []).await
    }

    /// Ends the session politely and closes the connection.
    pub async fn disconnect(mut self) -> Result<(), NbdError> {
        if self.broken {
            return Err(NbdError::Broken);
        }
        let cookie = self.cookie();
        let header = proto::encode_request(0, Command::Disconnect, cookie, 0, 0);
        self.io.write_all(&header).await?;
        self.io.flush().await?;
        self.io.shutdown().await?;
        Ok(())
    }

    fn cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        c
    }

    async fn request(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        data: &[u8],
        into: &mut [u8],
    ) -> Result<(), NbdError> {
        if self.broken {
            return Err(NbdError::Broken);
        }
        // Stays set if this future is dropped or fails at the transport.
        self.broken = true;
        let cookie = self.cookie();
        let mut msg = Vec::with_capacity(28 + data.len());
        msg.extend_from_slice(&proto::encode_request(
            flags, command, cookie, offset, length,
        ));
        msg.extend_from_slice(data);
        self.io.write_all(&msg).await?;
        self.io.flush().await?;
        let mut header = [0u8; 16];
        self.io.read_exact(&mut header).await?;
        let reply = proto::decode_simple_reply(&header)?;
        if reply.cookie != cookie {
            return Err(ProtoError::Malformed("reply cookie (not the request's)").into());
        }
        if reply.error != 0 {
            self.broken = false;
            return Err(NbdError::Command {
                command,
                offset,
                length,
                code: reply.error,
                name: proto::error_name(reply.error),
            });
        }
        if command == Command::Read {
            self.io.read_exact(into).await?;
        }
        self.broken = false;
        Ok(())
    }
}

/// `NBD_OPT_GO`; `None` when the server does not know the option.
async fn go(io: &mut Box<dyn Transport>, export: &str) -> Result<Option<ExportInfo>, NbdError> {
    io.write_all(&proto::encode_option(
        proto::OPT_GO,
        &proto::encode_go_data(export),
    ))
    .await?;
    io.flush().await?;
    let mut info = None;
    loop {
        let mut header = [0u8; 20];
        io.read_exact(&mut header).await?;
        let reply = proto::decode_option_reply(&header)?;
        if reply.option != proto::OPT_GO {
            return Err(ProtoError::Malformed("option reply (answers another option)").into());
        }
        if reply.length > MAX_OPTION_REPLY {
            return Err(ProtoError::Malformed("option reply (too long)").into());
        }
        let mut data = vec![0u8; reply.length as usize];
        io.read_exact(&mut data).await?;
        match reply.reply {
            proto::REP_INFO => {
                if let Some(i) = proto::decode_info(&data)? {
                    info = Some(i);
                }
            }
            proto::REP_ACK => {
                return match info {
                    Some(i) => Ok(Some(i)),
                    None => Err(ProtoError::Malformed(
                        "NBD_OPT_GO (acknowledged without NBD_INFO_EXPORT)",
                    )
                    .into()),
                };
            }
            proto::REP_ERR_UNSUP => return Ok(None),
            r if r & proto::REP_FLAG_ERROR != 0 => {
                // Tell the server we give up; it may already have closed, which is fine.
                let _ = io
                    .write_all(&proto::encode_option(proto::OPT_ABORT, &[]))
                    .await;
                return Err(NbdError::Refused {
                    export: export.to_owned(),
                    reply: proto::option_error_name(r),
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            // Unknown non-error replies must be ignored.
            _ => {}
        }
    }
}

/// `NBD_OPT_EXPORT_NAME`: the server closes the connection if it does not know the export.
async fn export_name(
    io: &mut Box<dyn Transport>,
    export: &str,
    no_zeroes: bool,
) -> Result<ExportInfo, NbdError> {
    io.write_all(&proto::encode_option(
        proto::OPT_EXPORT_NAME,
        export.as_bytes(),
    ))
    .await?;
    io.flush().await?;
    let mut b = [0u8; 10];
    io.read_exact(&mut b).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            NbdError::Refused {
                export: export.to_owned(),
                reply: "connection closed after NBD_OPT_EXPORT_NAME",
                message: String::new(),
            }
        } else {
            NbdError::Io(e)
        }
    })?;
    if !no_zeroes {
        let mut zeroes = [0u8; 124];
        io.read_exact(&mut zeroes).await?;
    }
    Ok(proto::decode_export_name_reply(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    const SIZE: u64 = 4 << 20;

    async fn read_option(s: &mut DuplexStream) -> std::io::Result<(u32, Vec<u8>)> {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).await?;
        assert_eq!(&h[0..8], b"IHAVEOPT");
        let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        Ok((opt, data))
    }

    fn option_reply(opt: u32, reply: u32, data: &[u8]) -> Vec<u8> {
        let mut out = proto::OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        out.extend_from_slice(&opt.to_be_bytes());
        out.extend_from_slice(&reply.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    /// A tiny in-memory server: `go` selects whether it knows `NBD_OPT_GO`; serves reads, writes, flush.
    async fn serve(mut s: DuplexStream, go: bool) -> std::io::Result<Vec<u8>> {
        let mut disk = vec![0u8; SIZE as usize];
        let mut greeting = b"NBDMAGICIHAVEOPT".to_vec();
        greeting
            .extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&greeting).await?;
        let mut cf = [0u8; 4];
        s.read_exact(&mut cf).await?;
        let flags = proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_FLUSH | proto::TFLAG_SEND_FUA;
        loop {
            let (opt, data) = read_option(&mut s).await?;
            match opt {
                proto::OPT_GO if go => {
                    assert_eq!(&data[4..data.len() - 2], b"vol");
                    let mut info = proto::INFO_EXPORT.to_be_bytes().to_vec();
                    info.extend_from_slice(&SIZE.to_be_bytes());
                    info.extend_from_slice(&flags.to_be_bytes());
                    s.write_all(&option_reply(opt, proto::REP_INFO, &info))
                        .await?;
                    s.write_all(&option_reply(opt, proto::REP_ACK, &[])).await?;
                    break;
                }
                proto::OPT_EXPORT_NAME => {
                    assert_eq!(data, b"vol");
                    let mut r = SIZE.to_be_bytes().to_vec();
                    r.extend_from_slice(&flags.to_be_bytes());
                    s.write_all(&r).await?;
                    break;
                }
                _ => {
                    s.write_all(&option_reply(opt, proto::REP_ERR_UNSUP, b"no"))
                        .await?
                }
            }
        }
        loop {
            let mut h = [0u8; 28];
            s.read_exact(&mut h).await?;
            let cmd = u16::from_be_bytes([h[6], h[7]]);
            let cookie = &h[8..16];
            let off = u64::from_be_bytes(h[16..24].try_into().unwrap_or_default()) as usize;
            let len = u32::from_be_bytes(h[24..28].try_into().unwrap_or_default()) as usize;
            let mut reply = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            let error: u32 = if off + len > disk.len() { 22 } else { 0 };
            match cmd {
                0 => {
                    reply.extend_from_slice(&error.to_be_bytes());
                    reply.extend_from_slice(cookie);
                    if error == 0 {
                        reply.extend_from_slice(&disk[off..off + len]);
                    }
                }
                1 => {
                    let mut data = vec![0u8; len];
                    s.read_exact(&mut data).await?;
                    if error == 0 {
                        disk[off..off + len].copy_from_slice(&data);
                    }
                    reply.extend_from_slice(&error.to_be_bytes());
                    reply.extend_from_slice(cookie);
                }
                2 => return Ok(disk),
                _ => {
                    reply.extend_from_slice(&0u32.to_be_bytes());
                    reply.extend_from_slice(cookie);
                }
            }
            s.write_all(&reply).await?;
        }
    }

    async fn exercise(go: bool) -> Result<(), Box<dyn std::error::Error>> {
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(serve(b, go));
        let mut c = NbdClient::handshake(Box::new(a), "vol").await?;
        assert_eq!(c.size(), SIZE);
        assert!(c.info().can_fua() && c.info().can_flush());
        let data: Vec<u8> = (0..3 * MAX_REQUEST / 2).map(|i| (i % 251) as u8).collect();
        c.write(4096, &data, true).await?;
        c.flush().await?;
        let mut back = vec![0u8; data.len()];
        c.read(4096, &mut back).await?;
        assert_eq!(back, data);
        let err = c.write(SIZE, &[1u8; 512], false).await;
        assert!(
            matches!(err, Err(NbdError::Command { code: 22, .. })),
            "{err:?}"
        );
        assert!(err.is_err_and(|e| !e.connection_lost()));
        c.disconnect().await?;
        let disk = server.await??;
        assert_eq!(&disk[4096..4096 + data.len()], &data[..]);
        Ok(())
    }

    #[tokio::test]
    async fn opt_go() -> Result<(), Box<dyn std::error::Error>> {
        exercise(true).await
    }

    #[tokio::test]
    async fn falls_back_to_export_name() -> Result<(), Box<dyn std::error::Error>> {
        exercise(false).await
    }
}
