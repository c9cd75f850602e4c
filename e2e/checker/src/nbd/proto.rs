//! The NBD wire format the client uses, without I/O: fixed newstyle negotiation (`NBD_OPT_GO`, falling
//! back to `NBD_OPT_EXPORT_NAME`), and transmission with simple replies (`READ`, `WRITE` with optional
//! `FUA`, `FLUSH`, `DISC`). See the NBD protocol document (`doc/proto.md` of the NBD project).

/// `NBDMAGIC`, the first 8 bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the prefix of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants the zero bytes omitted.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// Bit set on every error reply.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`: the option is not known to the server.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// `NBD_INFO_EXPORT`.
pub const INFO_EXPORT: u16 = 0;

/// Transmission flag: the flags field is valid.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server accepts `NBD_CMD_FLUSH`.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the server accepts `NBD_CMD_FLAG_FUA`.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;

/// The transmission commands this client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read = 0,
    /// `NBD_CMD_WRITE`.
    Write = 1,
    /// `NBD_CMD_DISC`.
    Disconnect = 2,
    /// `NBD_CMD_FLUSH`.
    Flush = 3,
}

/// What the server told the client about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`TFLAG_*`).
    pub flags: u16,
}

impl ExportInfo {
    /// Whether the export refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_HAS_FLAGS != 0 && self.flags & TFLAG_READ_ONLY != 0
    }
    /// Whether `NBD_CMD_FLUSH` may be sent.
    pub fn can_flush(&self) -> bool {
        self.flags & TFLAG_HAS_FLAGS != 0 && self.flags & TFLAG_SEND_FLUSH != 0
    }
    /// Whether `NBD_CMD_FLAG_FUA` may be set.
    pub fn can_fua(&self) -> bool {
        self.flags & TFLAG_HAS_FLAGS != 0 && self.flags & TFLAG_SEND_FUA != 0
    }
}

/// A protocol violation found while decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A magic number was wrong.
    #[error("bad {what} magic {got:#x}")]
    Magic {
        /// Which magic.
        what: &'static str,
        /// What arrived.
        got: u64,
    },
    /// A field was malformed.
    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// Decodes the server's 18-byte greeting; returns its handshake flags.
pub fn decode_greeting(b: &[u8; 18]) -> Result<u16, ProtoError> {
    let magic = u64::from_be_bytes(array(&b[0..8]));
    if magic != NBD_MAGIC {
        return Err(ProtoError::Magic {
            what: "NBDMAGIC",
            got: magic,
        });
    }
    let newstyle = u64::from_be_bytes(array(&b[8..16]));
    if newstyle != IHAVEOPT {
        // Oldstyle servers send the export size here; this client does not speak oldstyle.
        return Err(ProtoError::Magic {
            what: "IHAVEOPT (oldstyle servers are not supported)",
            got: newstyle,
        });
    }
    Ok(u16::from_be_bytes(array(&b[16..18])))
}

/// Encodes an option request.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Encodes the data of `NBD_OPT_GO` for `name`, requesting no extra information.
pub fn encode_go_data(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + name.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out
}

/// The fixed part of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option it answers.
    pub option: u32,
    /// `REP_*`.
    pub reply: u32,
    /// Length of the data that follows.
    pub length: u32,
}

/// Decodes the 20-byte header of an option reply.
pub fn decode_option_reply(b: &[u8; 20]) -> Result<OptionReplyHeader, ProtoError> {
    let magic = u64::from_be_bytes(array(&b[0..8]));
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtoError::Magic {
            what: "option reply",
            got: magic,
        });
    }
    Ok(OptionReplyHeader {
        option: u32::from_be_bytes(array(&b[8..12])),
        reply: u32::from_be_bytes(array(&b[12..16])),
        length: u32::from_be_bytes(array(&b[16..20])),
    })
}

/// Decodes the data of an `NBD_REP_INFO` reply: `Some` for `NBD_INFO_EXPORT`, `None` for other kinds.
pub fn decode_info(data: &[u8]) -> Result<Option<ExportInfo>, ProtoError> {
    if data.len() < 2 {
        return Err(ProtoError::Malformed("NBD_REP_INFO"));
    }
    if u16::from_be_bytes(array(&data[0..2])) != INFO_EXPORT {
        return Ok(None);
    }
    if data.len() != 12 {
        return Err(ProtoError::Malformed("NBD_INFO_EXPORT"));
    }
    Ok(Some(ExportInfo {
        size: u64::from_be_bytes(array(&data[2..10])),
        flags: u16::from_be_bytes(array(&data[10..12])),
    }))
}

/// Decodes the 10 bytes (size, flags) that answer `NBD_OPT_EXPORT_NAME`.
pub fn decode_export_name_reply(b: &[u8; 10]) -> ExportInfo {
    ExportInfo {
        size: u64::from_be_bytes(array(&b[0..8])),
        flags: u16::from_be_bytes(array(&b[8..10])),
    }
}

/// Encodes a transmission request header (28 bytes); a write's data follows it.
pub fn encode_request(
    flags: u16,
    command: Command,
    cookie: u64,
    offset: u64,
    length: u32,
) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&(command as u16).to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&length.to_be_bytes());
    b
}

/// A simple reply's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// errno-style error, 0 for success.
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

/// Decodes the 16-byte header of a simple reply.
pub fn decode_simple_reply(b: &[u8; 16]) -> Result<SimpleReply, ProtoError> {
    let magic = u32::from_be_bytes(array(&b[0..4]));
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(ProtoError::Magic {
            what: "simple reply",
            got: u64::from(magic),
        });
    }
    Ok(SimpleReply {
        error: u32::from_be_bytes(array(&b[4..8])),
        cookie: u64::from_be_bytes(array(&b[8..16])),
    })
}

/// The name of an NBD error code.
pub fn error_name(code: u32) -> &'static str {
    match code {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// The name of an option error reply.
pub fn option_error_name(reply: u32) -> &'static str {
    match reply & !REP_FLAG_ERROR {
        1 => "NBD_REP_ERR_UNSUP",
        2 => "NBD_REP_ERR_POLICY",
        3 => "NBD_REP_ERR_INVALID",
        4 => "NBD_REP_ERR_PLATFORM",
        5 => "NBD_REP_ERR_TLS_REQD",
        6 => "NBD_REP_ERR_UNKNOWN",
        7 => "NBD_REP_ERR_SHUTDOWN",
        8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        9 => "NBD_REP_ERR_TOO_BIG",
        _ => "unknown option error",
    }
}

fn array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting() {
        let mut g = [0u8; 18];
        g[0..8].copy_from_slice(b"NBDMAGIC");
        g[8..16].copy_from_slice(b"IHAVEOPT");
        g[17] = 3;
        assert_eq!(decode_greeting(&g), Ok(3));
        g[8] = 0;
        assert!(decode_greeting(&g).is_err());
    }

    #[test]
    fn request_and_reply() {
        let r = encode_request(CMD_FLAG_FUA, Command::Write, 7, 4096, 512);
        assert_eq!(&r[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&r[4..8], &[0, 1, 0, 1]);
        let mut rep = [0u8; 16];
        rep[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        rep[7] = 5;
        rep[15] = 7;
        assert_eq!(
            decode_simple_reply(&rep),
            Ok(SimpleReply {
                error: 5,
                cookie: 7
            })
        );
    }

    #[test]
    fn info_export() {
        let mut d = vec![0u8, 0];
        d.extend_from_slice(&65536u64.to_be_bytes());
        d.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_SEND_FUA).to_be_bytes());
        let info = decode_info(&d).ok().flatten();
        assert_eq!(
            info.map(|i| (i.size, i.can_fua(), i.read_only())),
            Some((65536, true, false))
        );
        assert_eq!(decode_info(&[0, 3, 0, 0]), Ok(None));
    }
}
