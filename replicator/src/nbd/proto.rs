//! The NBD wire protocol (fixed newstyle handshake, simple replies) as pure functions: constants,
//! parsers and encoders, with no I/O.
//!
//! Everything a peer sends is parsed here and classified into a [`Verdict`] before the server acts on
//! it, so the rules for malformed and out-of-range requests live in one place that can be tested
//! exhaustively (see the proptests at the bottom and `replicator/fuzz`).

/// `NBDMAGIC`, the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, and the prefix of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of every transmission-phase request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this server understands.
pub const CLIENT_FLAGS_KNOWN: u32 = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;

/// `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_ERR_UNSUP`.
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
/// `NBD_REP_ERR_INVALID`.
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
/// `NBD_REP_ERR_UNKNOWN`.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
/// `NBD_REP_ERR_TOO_BIG`.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;

/// `NBD_INFO_EXPORT`.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_BLOCK_SIZE`.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the flags field is valid.
pub const TX_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the server supports `NBD_CMD_FLUSH`.
pub const TX_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the server supports `NBD_CMD_FLAG_FUA`.
pub const TX_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the server supports `NBD_CMD_TRIM`.
pub const TX_SEND_TRIM: u16 = 1 << 5;
/// The transmission flags this server advertises.
pub const TX_FLAGS: u16 = TX_HAS_FLAGS | TX_SEND_FLUSH | TX_SEND_FUA | TX_SEND_TRIM;

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_FLAG_FUA`.
pub const CMD_FLAG_FUA: u16 = 1 << 0;

/// `EIO`.
pub const EIO: u32 = 5;
/// `EINVAL`.
pub const EINVAL: u32 = 22;
/// `ENOSPC`.
pub const ENOSPC: u32 = 28;

/// The largest READ or WRITE payload accepted (and advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// The largest option payload accepted during the handshake; larger ones end the connection.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// The longest export name.
pub const MAX_NAME_LEN: usize = 4096;

/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of an option header.
pub const OPTION_HEADER_LEN: usize = 16;

/// Why a peer's bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A magic number did not match.
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    /// A length field does not match the data.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A name that is not UTF-8 or too long.
    #[error("bad export name")]
    BadName,
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The server's first bytes: `NBDMAGIC`, `IHAVEOPT` and the handshake flags.
pub fn server_greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// What the client's flags allow, or why the connection must close.
pub fn parse_client_flags(flags: u32) -> Result<ClientFlags, ProtoError> {
    if flags & !CLIENT_FLAGS_KNOWN != 0 {
        return Err(ProtoError::Malformed("unknown client flags"));
    }
    if flags & CLIENT_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::Malformed("client is not fixed newstyle"));
    }
    Ok(ClientFlags {
        no_zeroes: flags & CLIENT_FLAG_NO_ZEROES != 0,
    })
}

/// The client's handshake flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// Omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

/// An option's header: which option and how many bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option (`NBD_OPT_*`).
    pub option: u32,
    /// Length of the option data that follows.
    pub length: u32,
}

/// Parses an option header.
pub fn parse_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
    let magic = be_u64(b, 0).ok_or(ProtoError::Malformed("option header"))?;
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    Ok(OptionHeader {
        option: be_u32(b, 8).ok_or(ProtoError::Malformed("option header"))?,
        length: be_u32(b, 12).ok_or(ProtoError::Malformed("option header"))?,
    })
}

/// Encodes an option header (used by clients: the tests and the benchmark).
pub fn encode_option_header(h: &OptionHeader) -> [u8; OPTION_HEADER_LEN] {
    let mut out = [0u8; OPTION_HEADER_LEN];
    out[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[8..12].copy_from_slice(&h.option.to_be_bytes());
    out[12..16].copy_from_slice(&h.length.to_be_bytes());
    out
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export asked for ("" means the default export).
    pub name: String,
    /// The information items asked for (`NBD_INFO_*`).
    pub items: Vec<u16>,
}

/// Parses the data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, ProtoError> {
    let name_len = be_u32(data, 0).ok_or(ProtoError::Malformed("info request"))? as usize;
    if name_len > MAX_NAME_LEN {
        return Err(ProtoError::BadName);
    }
    let name_end = 4usize
        .checked_add(name_len)
        .ok_or(ProtoError::Malformed("info request"))?;
    let name = data
        .get(4..name_end)
        .ok_or(ProtoError::Malformed("info request name"))?;
    let name = std::str::from_utf8(name).map_err(|_| ProtoError::BadName)?;
    let count = be_u16(data, name_end).ok_or(ProtoError::Malformed("info request count"))? as usize;
    let items_at = name_end + 2;
    if data.len() != items_at + 2 * count {
        return Err(ProtoError::Malformed("info request items"));
    }
    let items = (0..count)
        .filter_map(|i| be_u16(data, items_at + 2 * i))
        .collect();
    Ok(InfoRequest {
        name: name.to_owned(),
        items,
    })
}

/// Encodes the data of `NBD_OPT_INFO` / `NBD_OPT_GO` (used by clients and round-trip tests).
pub fn encode_info_request(req: &InfoRequest) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + req.name.len() + 2 * req.items.len());
    out.extend_from_slice(&(req.name.len() as u32).to_be_bytes());
    out.extend_from_slice(req.name.as_bytes());
    out.extend_from_slice(&(req.items.len() as u16).to_be_bytes());
    for item in &req.items {
        out.extend_from_slice(&item.to_be_bytes());
    }
    out
}

/// Parses the data of `NBD_OPT_EXPORT_NAME`.
pub fn parse_export_name(data: &[u8]) -> Result<String, ProtoError> {
    if data.len() > MAX_NAME_LEN {
        return Err(ProtoError::BadName);
    }
    std::str::from_utf8(data)
        .map(str::to_owned)
        .map_err(|_| ProtoError::BadName)
}

/// Encodes an option reply.
pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// The data of an `NBD_REP_SERVER` reply naming one export.
pub fn server_reply_data(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// The data of an `NBD_REP_INFO` reply carrying `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size.to_be_bytes());
    out[10..12].copy_from_slice(&flags.to_be_bytes());
    out
}

/// The data of an `NBD_REP_INFO` reply carrying `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> [u8; 14] {
    let mut out = [0u8; 14];
    out[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&minimum.to_be_bytes());
    out[6..10].copy_from_slice(&preferred.to_be_bytes());
    out[10..14].copy_from_slice(&maximum.to_be_bytes());
    out
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags and, unless `no_zeroes`, 124 zeroes.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

/// A transmission-phase request header, as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// The command (`NBD_CMD_*`).
    pub command: u16,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (for WRITE, the payload that follows).
    pub length: u32,
}

/// Parses a request header; a bad magic means the stream cannot be trusted any more.
pub fn parse_request_header(b: &[u8; REQUEST_LEN]) -> Result<RequestHeader, ProtoError> {
    let field = "request header";
    let magic = be_u32(b, 0).ok_or(ProtoError::Malformed(field))?;
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic(u64::from(magic)));
    }
    Ok(RequestHeader {
        flags: be_u16(b, 4).ok_or(ProtoError::Malformed(field))?,
        command: be_u16(b, 6).ok_or(ProtoError::Malformed(field))?,
        cookie: be_u64(b, 8).ok_or(ProtoError::Malformed(field))?,
        offset: be_u64(b, 16).ok_or(ProtoError::Malformed(field))?,
        length: be_u32(b, 24).ok_or(ProtoError::Malformed(field))?,
    })
}

/// Encodes a request header (used by clients: the tests and the benchmark).
pub fn encode_request_header(h: &RequestHeader) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&h.flags.to_be_bytes());
    out[6..8].copy_from_slice(&h.command.to_be_bytes());
    out[8..16].copy_from_slice(&h.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&h.offset.to_be_bytes());
    out[24..28].copy_from_slice(&h.length.to_be_bytes());
    out
}

/// Encodes a simple reply header (data, for a successful READ, follows it).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A simple reply header, parsed (used by clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0 or an errno.
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

/// Parses a simple reply header (used by clients).
pub fn parse_simple_reply(b: &[u8; SIMPLE_REPLY_LEN]) -> Result<SimpleReply, ProtoError> {
    let field = "reply header";
    let magic = be_u32(b, 0).ok_or(ProtoError::Malformed(field))?;
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(ProtoError::BadMagic(u64::from(magic)));
    }
    Ok(SimpleReply {
        error: be_u32(b, 4).ok_or(ProtoError::Malformed(field))?,
        cookie: be_u64(b, 8).ok_or(ProtoError::Malformed(field))?,
    })
}

/// A request the server will carry out, validated against the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes at `offset` (inside the export).
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u32,
    },
    /// Write the `length` payload bytes that follow at `offset` (inside the export).
    Write {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u32,
        /// Force unit access: durable before the reply.
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Discard a range (inside the export).
    Trim {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u32,
        /// Force unit access.
        fua: bool,
    },
    /// End the session once in-flight requests are answered.
    Disconnect,
}

/// What to do with a request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Carry it out.
    Execute(Command),
    /// Reply with `errno` without acting; first read and drop `discard` payload bytes.
    Reject {
        /// The NBD error to reply with.
        errno: u32,
        /// Payload bytes that follow the header and must be skipped.
        discard: u32,
    },
    /// The request cannot be answered safely: close the connection.
    Disconnect(&'static str),
}

fn in_range(offset: u64, length: u32, size: u64) -> bool {
    offset
        .checked_add(u64::from(length))
        .is_some_and(|end| end <= size)
}

/// Classifies a request header against an export of `size` bytes.
///
/// The rules: a WRITE whose payload is larger than [`MAX_PAYLOAD`] ends the connection (draining it
/// would let a peer make the server read unbounded data); a WRITE or TRIM outside the export gets
/// `ENOSPC` / `EINVAL` after its payload is skipped; a READ outside the export or larger than
/// [`MAX_PAYLOAD`] gets `EINVAL`; unknown flags and unknown commands get `EINVAL`.
pub fn classify(h: &RequestHeader, size: u64) -> Verdict {
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let unknown_flags = h.flags & !CMD_FLAG_FUA != 0;
    match h.command {
        CMD_WRITE => {
            if h.length > MAX_PAYLOAD {
                return Verdict::Disconnect("write payload too large");
            }
            if unknown_flags {
                return Verdict::Reject {
                    errno: EINVAL,
                    discard: h.length,
                };
            }
            if !in_range(h.offset, h.length, size) {
                return Verdict::Reject {
                    errno: ENOSPC,
                    discard: h.length,
                };
            }
            Verdict::Execute(Command::Write {
                offset: h.offset,
                length: h.length,
                fua,
            })
        }
        CMD_READ => {
            if unknown_flags || h.length > MAX_PAYLOAD || !in_range(h.offset, h.length, size) {
                return Verdict::Reject {
                    errno: EINVAL,
                    discard: 0,
                };
            }
            Verdict::Execute(Command::Read {
                offset: h.offset,
                length: h.length,
            })
        }
        CMD_TRIM => {
            if unknown_flags || !in_range(h.offset, h.length, size) {
                return Verdict::Reject {
                    errno: EINVAL,
                    discard: 0,
                };
            }
            Verdict::Execute(Command::Trim {
                offset: h.offset,
                length: h.length,
                fua,
            })
        }
        CMD_FLUSH => {
            if unknown_flags {
                return Verdict::Reject {
                    errno: EINVAL,
                    discard: 0,
                };
            }
            Verdict::Execute(Command::Flush)
        }
        CMD_DISC => Verdict::Execute(Command::Disconnect),
        _ => Verdict::Reject {
            errno: EINVAL,
            discard: 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> impl Strategy<Value = RequestHeader> {
        (
            any::<u16>(),
            0u16..10,
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
        )
            .prop_map(|(flags, command, cookie, offset, length)| RequestHeader {
                flags,
                command,
                cookie,
                offset,
                length,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]

        #[test]
        fn arbitrary_request_bytes_never_panic(bytes in proptest::array::uniform28(any::<u8>()), size in any::<u64>()) {
            if let Ok(h) = parse_request_header(&bytes) {
                let _ = classify(&h, size);
            }
        }

        #[test]
        fn request_round_trips(h in header()) {
            prop_assert_eq!(parse_request_header(&encode_request_header(&h)), Ok(h));
        }

        #[test]
        fn executed_requests_stay_inside_the_export(h in header(), size in any::<u64>()) {
            match classify(&h, size) {
                Verdict::Execute(Command::Read { offset, length })
                | Verdict::Execute(Command::Write { offset, length, .. })
                | Verdict::Execute(Command::Trim { offset, length, .. }) => {
                    prop_assert!(offset.checked_add(u64::from(length)).is_some_and(|e| e <= size));
                    prop_assert!(length <= MAX_PAYLOAD || h.command == CMD_TRIM);
                }
                Verdict::Reject { discard, .. } => {
                    prop_assert!(discard == 0 || (h.command == CMD_WRITE && discard <= MAX_PAYLOAD));
                }
                _ => {}
            }
        }

        #[test]
        fn arbitrary_option_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64), hdr in proptest::array::uniform16(any::<u8>())) {
            let _ = parse_option_header(&hdr);
            let _ = parse_info_request(&data);
            let _ = parse_export_name(&data);
        }

        #[test]
        fn info_request_round_trips(name in "[a-z0-9/._-]{0,40}", items in proptest::collection::vec(any::<u16>(), 0..8)) {
            let req = InfoRequest { name, items };
            prop_assert_eq!(parse_info_request(&encode_info_request(&req)), Ok(req));
        }

        #[test]
        fn option_header_round_trips(option in any::<u32>(), length in any::<u32>()) {
            let h = OptionHeader { option, length };
            prop_assert_eq!(parse_option_header(&encode_option_header(&h)), Ok(h));
        }

        #[test]
        fn reply_round_trips(error in any::<u32>(), cookie in any::<u64>()) {
            prop_assert_eq!(parse_simple_reply(&simple_reply(error, cookie)), Ok(SimpleReply { error, cookie }));
        }
    }

    #[test]
    fn out_of_range_write_is_refused_with_enospc_and_payload_skipped() {
        let h = RequestHeader {
            flags: 0,
            command: CMD_WRITE,
            cookie: 7,
            offset: 4096,
            length: 512,
        };
        assert_eq!(
            classify(&h, 4096),
            Verdict::Reject {
                errno: ENOSPC,
                discard: 512
            }
        );
        let wrap = RequestHeader {
            offset: u64::MAX - 10,
            ..h
        };
        assert!(matches!(
            classify(&wrap, u64::MAX),
            Verdict::Reject { errno: ENOSPC, .. }
        ));
    }

    #[test]
    fn oversized_write_disconnects() {
        let h = RequestHeader {
            flags: 0,
            command: CMD_WRITE,
            cookie: 1,
            offset: 0,
            length: MAX_PAYLOAD + 1,
        };
        assert!(matches!(classify(&h, u64::MAX), Verdict::Disconnect(_)));
    }
}
