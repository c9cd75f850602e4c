//! The replication stream between a primary and its secondary: frames and their codec, no I/O.
//!
//! One TCP connection carries one volume. The primary opens with [`Frame::Hello`] (volume name, size,
//! the first sequence number it will send); the secondary answers [`Frame::Welcome`]. Then the primary
//! sends [`Frame::Write`] and [`Frame::Trim`] with consecutive sequence numbers, and the secondary
//! answers [`Frame::Ack`] (cumulative: every sequence up to and including `seq` is durable) or
//! [`Frame::Error`] (it refused or failed `seq`, and closes the connection).
//!
//! **Kept image** (see [`crate::undo`]). A `Hello` may ask the secondary to keep its image at an epoch
//! before the writes that follow land (flag [`FLAG_KEEP`], the epoch in 8 bytes after the name); the
//! `Welcome` then says which image the secondary keeps (flag [`FLAG_KEEP`], the epoch in `offset`) — an
//! older one it already kept stays. [`Frame::DropImage`] (between writes, no sequence) drops a kept image.
//!
//! Every frame starts with a fixed 28-byte header, big-endian:
//! `magic u32 | kind u8 | flags u8 | reserved u16 (0) | seq u64 | offset u64 | length u32`,
//! followed by `length` payload bytes for `Hello` (the name, then the kept epoch if flagged), `Write`
//! (the data) and `Error` (a message). The decoder refuses anything else: a wrong magic, an unknown
//! kind, flags other than [`FLAG_KEEP`] on `Hello` and `Welcome`, non-zero reserved bits,
//! a payload larger than [`MAX_WRITE`], a name that is not a valid volume name, a message that is not
//! UTF-8, or a range whose end overflows.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// `LSR1`.
pub const FRAME_MAGIC: u32 = 0x4c53_5231;
/// Length of a frame header.
pub const HEADER_LEN: usize = 28;
/// The largest write payload (matches the NBD server's maximum request).
pub const MAX_WRITE: u32 = 32 * 1024 * 1024;
/// The longest volume name.
pub const MAX_NAME: u32 = 255;
/// The longest error message.
pub const MAX_MESSAGE: u32 = 4096;

const KIND_HELLO: u8 = 1;
const KIND_WRITE: u8 = 2;
const KIND_TRIM: u8 = 3;
const KIND_DROP_IMAGE: u8 = 4;
const KIND_WELCOME: u8 = 0x81;
const KIND_ACK: u8 = 0x82;
const KIND_ERROR: u8 = 0x83;
/// On `Hello`: keep the image at the epoch that follows the name. On `Welcome`: an image is kept, at
/// the epoch in `offset`.
pub const FLAG_KEEP: u8 = 1;
/// On `Hello`: first drop a kept image of the epoch that follows (after the kept epoch, if any) or older.
pub const FLAG_DROP: u8 = 2;

/// One message of the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Primary → secondary, first: which volume, its size, the first sequence that follows.
    Hello {
        /// The volume name (see [`valid_volume_name`]).
        volume: String,
        /// The volume's size in bytes.
        size: u64,
        /// The sequence of the first write frame that follows.
        first_seq: u64,
        /// Keep the image at this epoch before any write that follows lands.
        keep: Option<u64>,
        /// Drop a kept image of this epoch or older first (a drop the primary could not send on a link).
        drop_image: Option<u64>,
    },
    /// Primary → secondary: write `data` at `offset`.
    Write {
        /// The write's sequence number on its volume.
        seq: u64,
        /// Byte offset.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// Primary → secondary: discard a range.
    Trim {
        /// Sequence number.
        seq: u64,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u32,
    },
    /// Secondary → primary: ready; expects `next_seq` next.
    Welcome {
        /// The sequence the secondary expects next.
        next_seq: u64,
        /// The epoch of the image the secondary keeps, if it keeps one.
        kept: Option<u64>,
    },
    /// Primary → secondary, between writes: drop the kept image if it is of `epoch` or older.
    DropImage {
        /// The newest epoch whose image may go.
        epoch: u64,
    },
    /// Secondary → primary: every sequence up to `seq` is durable.
    Ack {
        /// Highest durable sequence.
        seq: u64,
    },
    /// Secondary → primary: `seq` was refused or failed; the connection ends.
    Error {
        /// The sequence concerned.
        seq: u64,
        /// What went wrong, for people.
        message: String,
    },
}

/// Why bytes on the replication link were refused.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The header did not start with [`FRAME_MAGIC`].
    #[error("bad frame magic {0:#x}")]
    BadMagic(u32),
    /// An unknown frame kind.
    #[error("unknown frame kind {0:#x}")]
    UnknownKind(u8),
    /// A malformed field.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// The socket failed.
    #[error("replication link: {0}")]
    Io(#[from] std::io::Error),
}

/// Whether `name` may name a volume (and a file in the secondary's directory): 1–255 bytes of
/// `[A-Za-z0-9._-]`, not starting with a dot.
pub fn valid_volume_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME as usize
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// The codec for [`Frame`]s (both directions).
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameCodec;

struct Header {
    kind: u8,
    flags: u8,
    seq: u64,
    offset: u64,
    length: u32,
}

fn parse_header(b: &[u8]) -> Result<Header, FrameError> {
    let mut b = &b[..HEADER_LEN];
    let magic = b.get_u32();
    if magic != FRAME_MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let kind = b.get_u8();
    let flags = b.get_u8();
    let reserved = b.get_u16();
    let allowed = match kind {
        KIND_HELLO => FLAG_KEEP | FLAG_DROP,
        KIND_WELCOME => FLAG_KEEP,
        _ => 0,
    };
    if flags & !allowed != 0 || reserved != 0 {
        return Err(FrameError::Malformed("non-zero flags or reserved bits"));
    }
    let seq = b.get_u64();
    let offset = b.get_u64();
    let length = b.get_u32();
    let max = match kind {
        KIND_HELLO => MAX_NAME + 16,
        KIND_WRITE => MAX_WRITE,
        KIND_ERROR => MAX_MESSAGE,
        KIND_TRIM | KIND_WELCOME | KIND_ACK | KIND_DROP_IMAGE => u32::MAX,
        other => return Err(FrameError::UnknownKind(other)),
    };
    if length > max {
        return Err(FrameError::Malformed("payload too large"));
    }
    if matches!(kind, KIND_WRITE | KIND_TRIM) && offset.checked_add(u64::from(length)).is_none() {
        return Err(FrameError::Malformed("range overflows"));
    }
    let welcome_kept = kind == KIND_WELCOME && flags & FLAG_KEEP != 0;
    if matches!(kind, KIND_WELCOME | KIND_ACK | KIND_DROP_IMAGE)
        && ((offset != 0 && !welcome_kept && kind != KIND_DROP_IMAGE)
            || length != 0
            || (kind == KIND_DROP_IMAGE && seq != 0))
    {
        return Err(FrameError::Malformed("unexpected fields"));
    }
    Ok(Header {
        kind,
        flags,
        seq,
        offset,
        length,
    })
}

fn payload_len(h: &Header) -> usize {
    match h.kind {
        KIND_HELLO | KIND_WRITE | KIND_ERROR => h.length as usize,
        _ => 0,
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < HEADER_LEN {
            src.reserve(HEADER_LEN - src.len());
            return Ok(None);
        }
        let h = parse_header(src)?;
        let need = HEADER_LEN + payload_len(&h);
        if src.len() < need {
            src.reserve(need - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let payload = src.split_to(payload_len(&h)).freeze();
        let frame = match h.kind {
            KIND_HELLO => {
                let mut name = &payload[..];
                let mut epoch_after_name = |flag: u8| {
                    if h.flags & flag == 0 {
                        return Ok(None);
                    }
                    let at = name
                        .len()
                        .checked_sub(8)
                        .ok_or(FrameError::Malformed("epoch missing"))?;
                    let mut epoch = &name[at..];
                    name = &name[..at];
                    Ok::<_, FrameError>(Some(epoch.get_u64()))
                };
                // The epochs follow the name in flag order; read from the end.
                let drop_image = epoch_after_name(FLAG_DROP)?;
                let keep = epoch_after_name(FLAG_KEEP)?;
                let volume = std::str::from_utf8(name)
                    .map_err(|_| FrameError::Malformed("volume name is not UTF-8"))?;
                if !valid_volume_name(volume) {
                    return Err(FrameError::Malformed("invalid volume name"));
                }
                Frame::Hello {
                    volume: volume.to_owned(),
                    size: h.offset,
                    first_seq: h.seq,
                    keep,
                    drop_image,
                }
            }
            KIND_WRITE => Frame::Write {
                seq: h.seq,
                offset: h.offset,
                data: payload,
            },
            KIND_TRIM => Frame::Trim {
                seq: h.seq,
                offset: h.offset,
                length: h.length,
            },
            KIND_WELCOME => Frame::Welcome {
                next_seq: h.seq,
                kept: (h.flags & FLAG_KEEP != 0).then_some(h.offset),
            },
            KIND_DROP_IMAGE => Frame::DropImage { epoch: h.offset },
            KIND_ACK => Frame::Ack { seq: h.seq },
            KIND_ERROR => Frame::Error {
                seq: h.seq,
                message: std::str::from_utf8(&payload)
                    .map_err(|_| FrameError::Malformed("message is not UTF-8"))?
                    .to_owned(),
            },
            other => return Err(FrameError::UnknownKind(other)),
        };
        Ok(Some(frame))
    }
}

fn put_header(dst: &mut BytesMut, kind: u8, seq: u64, offset: u64, length: u32) {
    put_flagged(dst, kind, 0, seq, offset, length);
}

fn put_flagged(dst: &mut BytesMut, kind: u8, flags: u8, seq: u64, offset: u64, length: u32) {
    // Only frames with a payload carry it after the header (a trim's length is not a payload): reserve
    // for those only. Found by `cargo fuzz` (a 4 GiB trim made the encoder reserve 4 GiB).
    let payload = match kind {
        KIND_HELLO | KIND_WRITE | KIND_ERROR => length as usize,
        _ => 0,
    };
    dst.reserve(HEADER_LEN + payload);
    dst.put_u32(FRAME_MAGIC);
    dst.put_u8(kind);
    dst.put_u8(flags);
    dst.put_u16(0);
    dst.put_u64(seq);
    dst.put_u64(offset);
    dst.put_u32(length);
}

/// Truncates `s` to at most `max` bytes on a character boundary.
fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.encode(&frame, dst)
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        match frame {
            Frame::Hello {
                volume,
                size,
                first_seq,
                keep,
                drop_image,
            } => {
                if !valid_volume_name(volume) {
                    return Err(FrameError::Malformed("invalid volume name"));
                }
                let mut flags = 0;
                let mut extra = 0;
                if keep.is_some() {
                    flags |= FLAG_KEEP;
                    extra += 8;
                }
                if drop_image.is_some() {
                    flags |= FLAG_DROP;
                    extra += 8;
                }
                put_flagged(
                    dst,
                    KIND_HELLO,
                    flags,
                    *first_seq,
                    *size,
                    volume.len() as u32 + extra,
                );
                dst.put_slice(volume.as_bytes());
                for epoch in [keep, drop_image].into_iter().flatten() {
                    dst.put_u64(*epoch);
                }
            }
            Frame::Write { seq, offset, data } => {
                let length = u32::try_from(data.len())
                    .ok()
                    .filter(|l| *l <= MAX_WRITE)
                    .ok_or(FrameError::Malformed("payload too large"))?;
                put_header(dst, KIND_WRITE, *seq, *offset, length);
                dst.put_slice(data);
            }
            Frame::Trim {
                seq,
                offset,
                length,
            } => put_header(dst, KIND_TRIM, *seq, *offset, *length),
            Frame::Welcome { next_seq, kept } => match kept {
                Some(epoch) => put_flagged(dst, KIND_WELCOME, FLAG_KEEP, *next_seq, *epoch, 0),
                None => put_header(dst, KIND_WELCOME, *next_seq, 0, 0),
            },
            Frame::DropImage { epoch } => put_header(dst, KIND_DROP_IMAGE, 0, *epoch, 0),
            Frame::Ack { seq } => put_header(dst, KIND_ACK, *seq, 0, 0),
            Frame::Error { seq, message } => {
                let message = clip(message, MAX_MESSAGE as usize);
                put_header(dst, KIND_ERROR, *seq, 0, message.len() as u32);
                dst.put_slice(message.as_bytes());
            }
        }
        Ok(())
    }
}

/// Whether `buffered` starts with a whole frame (header and payload), so decoding it will not wait for
/// the socket. Bytes that are no frame header count as whole: decoding them fails at once.
pub fn whole_frame_buffered(buffered: &[u8]) -> bool {
    if buffered.len() < HEADER_LEN {
        return false;
    }
    match parse_header(buffered) {
        Ok(h) => buffered.len() - HEADER_LEN >= payload_len(&h),
        Err(_) => true,
    }
}

/// Decodes every complete frame in `bytes` until an error or the end (for fuzzing and tests).
pub fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(frame) = FrameCodec.decode(&mut buf)? {
        out.push(frame);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (
                "[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,30}",
                any::<u64>(),
                any::<u64>(),
                any::<Option<u64>>(),
                any::<Option<u64>>()
            )
                .prop_map(|(volume, size, first_seq, keep, drop_image)| {
                    Frame::Hello {
                        volume,
                        size,
                        first_seq,
                        keep,
                        drop_image,
                    }
                }),
            (
                any::<u64>(),
                0u64..u64::MAX / 2,
                proptest::collection::vec(any::<u8>(), 0..2048)
            )
                .prop_map(|(seq, offset, data)| Frame::Write {
                    seq,
                    offset,
                    data: Bytes::from(data)
                }),
            (any::<u64>(), 0u64..u64::MAX / 2, any::<u32>()).prop_map(|(seq, offset, length)| {
                Frame::Trim {
                    seq,
                    offset,
                    length,
                }
            }),
            (any::<u64>(), any::<Option<u64>>())
                .prop_map(|(next_seq, kept)| Frame::Welcome { next_seq, kept }),
            any::<u64>().prop_map(|epoch| Frame::DropImage { epoch }),
            any::<u64>().prop_map(|seq| Frame::Ack { seq }),
            (any::<u64>(), "\\PC{0,100}").prop_map(|(seq, message)| Frame::Error { seq, message }),
        ]
    }

    #[test]
    fn a_frame_counts_as_buffered_only_when_whole() {
        let mut buf = BytesMut::new();
        FrameCodec
            .encode(
                &Frame::Write {
                    seq: 1,
                    offset: 0,
                    data: Bytes::from(vec![7u8; 4096]),
                },
                &mut buf,
            )
            .unwrap();
        assert!(whole_frame_buffered(&buf));
        assert!(!whole_frame_buffered(&buf[..buf.len() - 1]));
        assert!(!whole_frame_buffered(&buf[..HEADER_LEN - 1]));
        let mut ack = BytesMut::new();
        FrameCodec.encode(&Frame::Ack { seq: 1 }, &mut ack).unwrap();
        assert!(whole_frame_buffered(&ack));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3_000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_all(&bytes);
        }

        #[test]
        fn valid_header_with_arbitrary_tail_never_panics(kind in any::<u8>(), seq in any::<u64>(), offset in any::<u64>(), length in 0u32..600, tail in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut buf = BytesMut::new();
            put_header(&mut buf, kind, seq, offset, length);
            buf.extend_from_slice(&tail);
            let _ = decode_all(&buf);
        }

        #[test]
        fn frames_round_trip(frames in proptest::collection::vec(frame(), 1..8), split in any::<prop::sample::Index>()) {
            let mut buf = BytesMut::new();
            for f in &frames {
                FrameCodec.encode(f, &mut buf).unwrap();
            }
            // Feed in two pieces to exercise partial frames.
            let at = split.index(buf.len() + 1);
            let rest = buf.split_off(at);
            let mut codec = FrameCodec;
            let mut out = Vec::new();
            while let Some(f) = codec.decode(&mut buf).unwrap() { out.push(f); }
            buf.extend_from_slice(&rest);
            while let Some(f) = codec.decode(&mut buf).unwrap() { out.push(f); }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(out, frames);
        }
    }

    #[test]
    fn encoding_a_huge_trim_does_not_reserve_its_length() {
        let mut buf = BytesMut::new();
        FrameCodec
            .encode(
                &Frame::Trim {
                    seq: 1,
                    offset: 0,
                    length: u32::MAX,
                },
                &mut buf,
            )
            .unwrap();
        assert_eq!(buf.len(), HEADER_LEN);
        assert!(buf.capacity() < 1 << 20);
    }

    #[test]
    fn refuses_bad_names_and_oversized_payloads() {
        for name in ["", ".hidden", "../etc", "a/b", "x y"] {
            assert!(!valid_volume_name(name), "{name}");
        }
        let mut buf = BytesMut::new();
        put_header(&mut buf, KIND_HELLO, 0, 10, 2);
        buf.extend_from_slice(b"..");
        assert!(decode_all(&buf).is_err());
        let mut buf = BytesMut::new();
        put_header(&mut buf, KIND_WRITE, 0, 0, MAX_WRITE + 1);
        assert!(matches!(decode_all(&buf), Err(FrameError::Malformed(_))));
        let mut buf = BytesMut::new();
        put_header(&mut buf, KIND_WRITE, 0, u64::MAX, 1);
        assert!(matches!(decode_all(&buf), Err(FrameError::Malformed(_))));
        let mut buf = BytesMut::new();
        put_header(&mut buf, 0x42, 0, 0, 0);
        assert!(matches!(
            decode_all(&buf),
            Err(FrameError::UnknownKind(0x42))
        ));
    }
}
