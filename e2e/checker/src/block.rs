//! The self-describing 4 KiB block the workload writes, and its decoding.
//!
//! Layout of a block (little-endian):
//!
//! | bytes       | field                                                        |
//! |-------------|--------------------------------------------------------------|
//! | 0..8        | magic `LKSTPBLK`                                             |
//! | 8..10       | format version (1)                                           |
//! | 10..12      | reserved, zero                                               |
//! | 12..16      | volume index                                                 |
//! | 16..24      | run id                                                       |
//! | 24..32      | sequence number within the lane (≥ 1)                        |
//! | 32..40      | sequence of the lane's previous write (`seq - 1`)            |
//! | 40..44      | number of volumes of the run                                 |
//! | 44..48      | lane                                                         |
//! | 48..56      | slots per lane and volume                                    |
//! | 56..64      | first block of the region                                    |
//! | 64..72      | slot (within the lane's part of the region)                  |
//! | 72..76      | number of lanes `L`                                          |
//! | 76..80      | span: how many volumes each lane cycles over                 |
//! | 80..80+8L   | dependencies: per lane, the last write acknowledged when this one was issued (own lane: `seq - 1`) |
//! | ..4092      | pattern fill, a pseudo-random stream of (run, lane, seq)     |
//! | 4092..4096  | CRC-32C of bytes 0..4092                                     |
//!
//! A block thus names its run, its place in the dependent chains and the whole layout, so a checker can
//! read images without being told how they were written.

use crate::layout::{BLOCK_SIZE, Layout};
use serde::{Deserialize, Serialize};

/// The magic that opens every workload block.
pub const MAGIC: [u8; 8] = *b"LKSTPBLK";
/// The block format version this crate writes and reads.
pub const VERSION: u16 = 1;
const BLOCK: usize = BLOCK_SIZE as usize;
const DEPS_START: usize = 80;
const CRC_START: usize = BLOCK - 4;

/// The header of a valid workload block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockHeader {
    /// The run that wrote it.
    pub run_id: u64,
    /// The lane (writer) that wrote it.
    pub lane: u32,
    /// Its place in the lane's dependent chain, from 1.
    pub seq: u64,
    /// The lane's write it depends on (`seq - 1`; 0 for the first).
    pub prev_seq: u64,
    /// The volume it was written to.
    pub volume: u32,
    /// The slot it was written to.
    pub slot: u64,
    /// The run's layout.
    pub layout: Layout,
    /// For every lane, the last write acknowledged when this one was issued: it depends on all of them.
    pub deps: Vec<u64>,
}

impl BlockHeader {
    /// The header of write `seq` of `lane` of run `run_id` under `layout`, issued when the lanes had
    /// acknowledged `acked` (missing entries count as 0; the lane's own entry is always `seq - 1`).
    pub fn new(run_id: u64, lane: u32, seq: u64, layout: Layout, acked: &[u64]) -> Self {
        let loc = layout.locate(lane, seq);
        let mut deps = vec![0u64; layout.lanes() as usize];
        for (d, a) in deps.iter_mut().zip(acked) {
            *d = *a;
        }
        if let Some(own) = deps.get_mut(lane as usize) {
            *own = seq.saturating_sub(1);
        }
        Self {
            run_id,
            lane,
            seq,
            prev_seq: seq.saturating_sub(1),
            volume: loc.volume,
            slot: loc.slot,
            layout,
            deps,
        }
    }
}

/// Why bytes that carry the magic are not a valid block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Corruption {
    /// The checksum does not match.
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Stored CRC-32C.
        stored: u32,
        /// Computed CRC-32C.
        computed: u32,
    },
    /// A format version this crate does not read.
    #[error("unknown block format version {0}")]
    Version(u16),
    /// The fields contradict each other (the layout, the chain link or the placement).
    #[error("inconsistent header: {0}")]
    Header(String),
    /// The pattern fill is not the one for this run, lane and sequence.
    #[error("pattern fill does not match run, lane and sequence")]
    Pattern,
}

/// What a 4 KiB block of an image holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    /// All zeros: never written (or a hole of a sparse file).
    Zero,
    /// A valid workload block.
    Block(BlockHeader),
    /// Carries the magic but is not a valid block (e.g. a torn write).
    Corrupt(Corruption),
    /// Non-zero data that is not a workload block.
    Foreign,
}

/// CRC-32C (Castagnoli), table-driven.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Fills `out` with the pattern of (`run_id`, `lane`, `seq`): a splitmix64 stream.
fn fill_pattern(run_id: u64, lane: u32, seq: u64, out: &mut [u8]) {
    let mut state = run_id
        ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ u64::from(lane).wrapping_mul(0xD6E8_FEB8_6659_FD93)
        ^ 0x4C4B_5354_5042_4C4B;
    for chunk in out.chunks_mut(8) {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let bytes = z.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Encodes write `seq` of `lane` of run `run_id` under `layout` as a 4 KiB block; `acked` are the
/// lanes' acknowledged writes when it was issued (see [`BlockHeader::new`]).
pub fn encode(run_id: u64, lane: u32, seq: u64, layout: Layout, acked: &[u64]) -> Vec<u8> {
    encode_header(&BlockHeader::new(run_id, lane, seq, layout, acked))
}

/// Encodes a block with exactly this header (tests use it to build malformed blocks). `deps` beyond the
/// layout's lanes are ignored; missing ones are written as 0.
pub fn encode_header(h: &BlockHeader) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..10].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&h.volume.to_le_bytes());
    b[16..24].copy_from_slice(&h.run_id.to_le_bytes());
    b[24..32].copy_from_slice(&h.seq.to_le_bytes());
    b[32..40].copy_from_slice(&h.prev_seq.to_le_bytes());
    b[40..44].copy_from_slice(&h.layout.volumes().to_le_bytes());
    b[44..48].copy_from_slice(&h.lane.to_le_bytes());
    b[48..56].copy_from_slice(&h.layout.slots().to_le_bytes());
    b[56..64].copy_from_slice(&h.layout.base().to_le_bytes());
    b[64..72].copy_from_slice(&h.slot.to_le_bytes());
    b[72..76].copy_from_slice(&h.layout.lanes().to_le_bytes());
    b[76..80].copy_from_slice(&h.layout.span().to_le_bytes());
    let lanes = h.layout.lanes() as usize;
    for (i, d) in h.deps.iter().take(lanes).enumerate() {
        b[DEPS_START + 8 * i..DEPS_START + 8 * i + 8].copy_from_slice(&d.to_le_bytes());
    }
    fill_pattern(
        h.run_id,
        h.lane,
        h.seq,
        &mut b[DEPS_START + 8 * lanes..CRC_START],
    );
    let crc = crc32c(&b[..CRC_START]);
    b[CRC_START..].copy_from_slice(&crc.to_le_bytes());
    b
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes one block of an image. A slice shorter than 4 KiB (the tail of an image) reads as if padded
/// with zeros.
pub fn decode(bytes: &[u8]) -> Content {
    if bytes.len() < BLOCK {
        let mut padded = vec![0u8; BLOCK];
        padded[..bytes.len()].copy_from_slice(bytes);
        return decode(&padded);
    }
    let b = &bytes[..BLOCK];
    if b.iter().all(|&x| x == 0) {
        return Content::Zero;
    }
    if b[0..8] != MAGIC {
        return Content::Foreign;
    }
    let stored = u32_at(b, CRC_START);
    let computed = crc32c(&b[..CRC_START]);
    if stored != computed {
        return Content::Corrupt(Corruption::Checksum { stored, computed });
    }
    let version = u16_at(b, 8);
    if version != VERSION {
        return Content::Corrupt(Corruption::Version(version));
    }
    match parse_header(b) {
        Ok(h) => {
            let start = DEPS_START + 8 * h.deps.len();
            let mut expect = vec![0u8; CRC_START - start];
            fill_pattern(h.run_id, h.lane, h.seq, &mut expect);
            if b[start..CRC_START] == expect[..] {
                Content::Block(h)
            } else {
                Content::Corrupt(Corruption::Pattern)
            }
        }
        Err(why) => Content::Corrupt(Corruption::Header(why)),
    }
}

fn parse_header(b: &[u8]) -> Result<BlockHeader, String> {
    if u16_at(b, 10) != 0 {
        return Err("reserved fields are not zero".into());
    }
    let (volumes, lanes, span) = (u32_at(b, 40), u32_at(b, 72), u32_at(b, 76));
    let layout = Layout::with_span(volumes, lanes, span, u64_at(b, 48), u64_at(b, 56))
        .map_err(|e| e.to_string())?;
    let deps = (0..layout.lanes() as usize)
        .map(|i| u64_at(b, DEPS_START + 8 * i))
        .collect();
    let h = BlockHeader {
        run_id: u64_at(b, 16),
        lane: u32_at(b, 44),
        seq: u64_at(b, 24),
        prev_seq: u64_at(b, 32),
        volume: u32_at(b, 12),
        slot: u64_at(b, 64),
        layout,
        deps,
    };
    if h.seq == 0 {
        return Err("sequence 0".into());
    }
    if h.lane >= layout.lanes() {
        return Err(format!("lane {} of a {}-lane run", h.lane, layout.lanes()));
    }
    let own = h.deps[h.lane as usize];
    if h.prev_seq != h.seq - 1 || own != h.seq - 1 {
        return Err(format!(
            "write {} of lane {} names previous write {} and own dependency {}, not {}",
            h.seq,
            h.lane,
            h.prev_seq,
            own,
            h.seq - 1
        ));
    }
    let loc = layout.locate(h.lane, h.seq);
    if (h.volume, h.slot) != (loc.volume, loc.slot) {
        return Err(format!(
            "write {} of lane {} claims volume {} slot {}, but the layout puts it on {loc}",
            h.seq, h.lane, h.volume, h.slot
        ));
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn round_trip_and_damage() -> Result<(), crate::layout::LayoutError> {
        let layout = Layout::with_lanes(3, 2, 8, 1)?;
        let h = BlockHeader::new(42, 1, 17, layout, &[5, 99]);
        assert_eq!(h.deps, vec![5, 16]);
        let mut b = encode(42, 1, 17, layout, &[5, 99]);
        assert_eq!(decode(&b), Content::Block(h));
        b[100] ^= 1;
        assert!(matches!(
            decode(&b),
            Content::Corrupt(Corruption::Checksum { .. })
        ));
        assert_eq!(decode(&[0u8; 4096]), Content::Zero);
        assert_eq!(decode(&[7u8; 10]), Content::Foreign);
        let mut h = BlockHeader::new(42, 0, 17, layout, &[]);
        h.prev_seq = 3;
        assert!(matches!(
            decode(&encode_header(&h)),
            Content::Corrupt(Corruption::Header(_))
        ));
        let mut h = BlockHeader::new(42, 0, 17, layout, &[]);
        h.deps[0] = 2;
        assert!(matches!(
            decode(&encode_header(&h)),
            Content::Corrupt(Corruption::Header(_))
        ));
        Ok(())
    }
}
