//! The kept image: an undo log that lets a secondary return to the state it held when a resync began.
//!
//! A resync copies dirty regions in any order, so from its first write until it finishes the secondary
//! holds no state the application was ever in. Before the first resync write lands, the secondary keeps
//! the frozen image: every block ([`BLOCK`] bytes) it is about to overwrite is appended to the volume's
//! undo log (its offset and original bytes) and the log is `fdatasync`ed *before* the overwrite is
//! applied. Each block is saved once per kept image (the first save holds the image's bytes; later
//! writes to it need nothing), so the log never holds more than the volume's blocks: it is bounded by
//! the volume's size plus [`RECORD_HEADER`] bytes per block. The space is reserved when the image is
//! kept ([`UndoLog::create`]); a volume that cannot get it is refused, and a save that fails later
//! refuses the write that needed it — the image is never silently dropped.
//!
//! **Layout.** `.NAME.undo` beside the volume file `NAME` (volume names never start with a dot): a
//! header ([`HEADER_LEN`] bytes: magic, version, block size, the kept image's epoch, the volume's size,
//! a checksum) written to a scratch file, synced and renamed into place (so the log exists whole or not
//! at all), then records: offset, length, kind (bytes, or a block of zeroes stored without its bytes),
//! checksum over the header's epoch and the record, then the bytes. A record whose checksum does not
//! match ends the log: only the tail written by a crash can be torn, and the overwrite it protected was
//! never applied (the log is synced first), so it is cut off on [`UndoLog::open`].
//!
//! **Rolling back** writes every saved block back, `fdatasync`s the volume, then removes the log. A crash
//! part-way leaves the log in place and the next roll-back does the same writes again (idempotent).

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How a refusal for want of undo-log space begins, wherever it is passed on (the replication link's
/// `Error` frame, the primary's `CopyFailed`, the sidecar's reports): the reason `UndoLogOutOfSpace`.
pub const OUT_OF_SPACE: &str = "undo log out of space";

/// The unit saved in the log.
pub const BLOCK: u64 = 4096;
/// Length of the log's header.
pub const HEADER_LEN: u64 = 40;
/// Length of a record's header (the bytes follow).
pub const RECORD_HEADER: u64 = 24;
/// The most blocks one save reads and appends at once (a long trim is saved in pieces of this).
const RUN_BLOCKS: u64 = 256;
/// `LSUNDO01`.
const MAGIC: u64 = 0x4c53_554e_444f_3031;
/// 2: the four-lane checksum.
const VERSION: u32 = 2;
const KIND_BYTES: u32 = 0;
const KIND_ZEROES: u32 = 1;

/// Why the kept image could not be kept, opened or restored.
#[derive(Debug, thiserror::Error)]
pub enum UndoError {
    /// A file operation failed.
    #[error("undo log {path}: {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Not enough space to keep the image (the whole log is reserved when the image is kept): the
    /// filesystem's ENOSPC, or more than the secondary's limit on one undo log. Its message starts with
    /// [`OUT_OF_SPACE`], which the primary, the sidecar and the operator recognise.
    #[error(
        "undo log out of space: {path}: keeping the image needs up to {needed} bytes: {source}"
    )]
    NoSpace {
        /// The file.
        path: String,
        /// The bytes the log may need.
        needed: u64,
        /// The error.
        source: std::io::Error,
    },
    /// The log's header is not one this replicator wrote.
    #[error("undo log {path}: {why}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

impl UndoError {
    fn io(op: &'static str, path: &Path, source: std::io::Error) -> UndoError {
        UndoError::Io {
            op,
            path: path.display().to_string(),
            source,
        }
    }
}

/// The undo log of volume `name` in directory `dir`.
pub fn log_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.undo"))
}

/// A 64-bit checksum: FNV-1a's constants over 8-byte words in four independent lanes (so the
/// multiplications overlap), folded together, then the tail bytes. Detects a torn or never-written
/// record; not cryptographic. It runs over every saved byte, so it is built for speed.
fn checksum(parts: &[&[u8]]) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    const SEEDS: [u64; 4] = [
        0xcbf2_9ce4_8422_2325,
        0x8422_2325_cbf2_9ce4,
        0x9ce4_cbf2_2325_8422,
        0x2325_8422_9ce4_cbf2,
    ];
    let word = |bytes: &[u8]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(bytes);
        u64::from_le_bytes(w)
    };
    let mix = |hash: u64, w: u64| {
        let hash = (hash ^ w).wrapping_mul(PRIME);
        hash ^ (hash >> 29)
    };
    let mut hash = SEEDS[0];
    for part in parts {
        let mut lanes = SEEDS;
        let mut quads = part.chunks_exact(32);
        for quad in &mut quads {
            for (lane, bytes) in lanes.iter_mut().zip(quad.chunks_exact(8)) {
                *lane = mix(*lane, word(bytes));
            }
        }
        for lane in lanes {
            hash = mix(hash, lane);
        }
        let mut words = quads.remainder().chunks_exact(8);
        for bytes in &mut words {
            hash = mix(hash, word(bytes));
        }
        for byte in words.remainder() {
            hash = (hash ^ u64::from(*byte)).wrapping_mul(PRIME);
        }
        hash = mix(hash, part.len() as u64);
    }
    hash
}

fn header_bytes(epoch: u64, size: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[0..8].copy_from_slice(&MAGIC.to_be_bytes());
    h[8..12].copy_from_slice(&VERSION.to_be_bytes());
    h[12..16].copy_from_slice(&(BLOCK as u32).to_be_bytes());
    h[16..24].copy_from_slice(&epoch.to_be_bytes());
    h[24..32].copy_from_slice(&size.to_be_bytes());
    let sum = checksum(&[&h[0..32]]);
    h[32..40].copy_from_slice(&sum.to_be_bytes());
    h
}

fn record_sum(epoch: u64, offset: u64, length: u32, kind: u32, data: &[u8]) -> u64 {
    checksum(&[
        &epoch.to_be_bytes(),
        &offset.to_be_bytes(),
        &length.to_be_bytes(),
        &kind.to_be_bytes(),
        data,
    ])
}

fn sync_dir(dir: &Path) -> Result<(), UndoError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| UndoError::io("fsync directory", dir, e))
}

/// The most the log of a volume of `size` bytes can grow to.
pub fn max_log_len(size: u64) -> u64 {
    HEADER_LEN + size.div_ceil(BLOCK) * RECORD_HEADER + size
}

/// One volume's kept image: which blocks are saved, and the log they are saved in.
#[derive(Debug)]
pub struct UndoLog {
    path: PathBuf,
    file: Arc<File>,
    epoch: u64,
    size: u64,
    /// One bit per block: saved since the image was kept.
    saved: Vec<u64>,
    saved_blocks: u64,
    /// Where the next record goes.
    end: u64,
    /// Records appended since the last sync.
    unsynced: bool,
    /// Kept between saves: the bytes read from the volume, and the records' headers.
    read_buf: Vec<u8>,
    header_buf: Vec<[u8; RECORD_HEADER as usize]>,
}

/// What a roll-back did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolledBack {
    /// The epoch of the image restored.
    pub epoch: u64,
    /// How many blocks were written back.
    pub blocks: u64,
}

impl UndoLog {
    /// Keeps the image of volume `name` (`size` bytes) at `epoch`: creates its log durably (header
    /// synced, renamed into place, directory synced) and reserves the space it may need.
    pub fn create(dir: &Path, name: &str, epoch: u64, size: u64) -> Result<UndoLog, UndoError> {
        UndoLog::create_within(dir, name, epoch, size, None)
    }

    /// [`UndoLog::create`], refused like a full filesystem (ENOSPC) when the log may need more than
    /// `limit` bytes.
    pub fn create_within(
        dir: &Path,
        name: &str,
        epoch: u64,
        size: u64,
        limit: Option<u64>,
    ) -> Result<UndoLog, UndoError> {
        let path = log_path(dir, name);
        let needed = max_log_len(size);
        if limit.is_some_and(|limit| needed > limit) {
            return Err(UndoError::NoSpace {
                path: path.display().to_string(),
                needed,
                source: std::io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error()),
            });
        }
        let scratch = dir.join(format!(".{name}.undo.new"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&scratch)
            .map_err(|e| UndoError::io("create", &scratch, e))?;
        match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::KEEP_SIZE, 0, needed) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::NOSPC || e == rustix::io::Errno::FBIG => {
                let _ = std::fs::remove_file(&scratch);
                return Err(UndoError::NoSpace {
                    path: path.display().to_string(),
                    needed,
                    source: e.into(),
                });
            }
            // A filesystem without fallocate: the space is found (or not) record by record.
            Err(e) => tracing::debug!(error = %e, "undo log space not reserved"),
        }
        file.write_all_at(&header_bytes(epoch, size), 0)
            .and_then(|()| file.sync_all())
            .map_err(|e| UndoError::io("write header", &scratch, e))?;
        std::fs::rename(&scratch, &path).map_err(|e| UndoError::io("rename", &path, e))?;
        sync_dir(dir)?;
        tracing::info!(
            volume = name,
            epoch,
            size,
            "keeping the image: undo log created"
        );
        Ok(UndoLog {
            path,
            file: Arc::new(file),
            epoch,
            size,
            saved: vec![0; size.div_ceil(BLOCK).div_ceil(64) as usize],
            saved_blocks: 0,
            end: HEADER_LEN,
            unsynced: false,
            read_buf: Vec::new(),
            header_buf: Vec::new(),
        })
    }

    /// Opens the kept image of volume `name`, if there is one: reads its records back (which blocks are
    /// saved) and cuts off a tail torn by a crash.
    pub fn open(dir: &Path, name: &str) -> Result<Option<UndoLog>, UndoError> {
        let path = log_path(dir, name);
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(UndoError::io("open", &path, e)),
        };
        let corrupt = |why: &str| UndoError::Corrupt {
            path: path.display().to_string(),
            why: why.to_owned(),
        };
        let mut h = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(|_| corrupt("header missing"))?;
        let word = |at: usize| u64::from_be_bytes(h[at..at + 8].try_into().unwrap_or_default());
        let epoch = word(16);
        let size = word(24);
        if h != header_bytes(epoch, size) {
            return Err(corrupt("bad header (not an undo log of this version)"));
        }
        let len = file
            .metadata()
            .map_err(|e| UndoError::io("stat", &path, e))?
            .len();
        let mut log = UndoLog {
            path,
            file: Arc::new(file),
            epoch,
            size,
            saved: vec![0; size.div_ceil(BLOCK).div_ceil(64) as usize],
            saved_blocks: 0,
            end: HEADER_LEN,
            unsynced: false,
            read_buf: Vec::new(),
            header_buf: Vec::new(),
        };
        let mut buf = vec![0u8; BLOCK as usize];
        while let Some((offset, length, kind)) = log.record_at(log.end, len, &mut buf) {
            log.mark(offset / BLOCK);
            log.end += RECORD_HEADER
                + if kind == KIND_BYTES {
                    u64::from(length)
                } else {
                    0
                };
        }
        if log.end < len {
            tracing::warn!(log = %log.path.display(), valid = log.end, len, "undo log: torn tail cut off");
            log.file
                .set_len(log.end)
                .and_then(|()| log.file.sync_all())
                .map_err(|e| UndoError::io("truncate torn tail", &log.path, e))?;
        }
        Ok(Some(log))
    }

    /// The record at `at`, if it is whole and its checksum matches; its bytes (if any) into `buf`.
    fn record_at(&self, at: u64, len: u64, buf: &mut [u8]) -> Option<(u64, u32, u32)> {
        if at + RECORD_HEADER > len {
            return None;
        }
        let mut r = [0u8; RECORD_HEADER as usize];
        self.file.read_exact_at(&mut r, at).ok()?;
        let offset = u64::from_be_bytes(r[0..8].try_into().ok()?);
        let length = u32::from_be_bytes(r[8..12].try_into().ok()?);
        let kind = u32::from_be_bytes(r[12..16].try_into().ok()?);
        let sum = u64::from_be_bytes(r[16..24].try_into().ok()?);
        let valid_range = offset % BLOCK == 0
            && offset < self.size
            && u64::from(length) == BLOCK.min(self.size - offset);
        if !valid_range || !matches!(kind, KIND_BYTES | KIND_ZEROES) {
            return None;
        }
        let data = &mut buf[..length as usize];
        if kind == KIND_BYTES {
            if at + RECORD_HEADER + u64::from(length) > len {
                return None;
            }
            self.file.read_exact_at(data, at + RECORD_HEADER).ok()?;
        } else {
            data.fill(0);
        }
        let stored = if kind == KIND_BYTES {
            &data[..]
        } else {
            &[][..]
        };
        (record_sum(self.epoch, offset, length, kind, stored) == sum)
            .then_some((offset, length, kind))
    }

    fn is_saved(&self, block: u64) -> bool {
        self.saved[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn mark(&mut self, block: u64) {
        if !self.is_saved(block) {
            self.saved[(block / 64) as usize] |= 1 << (block % 64);
            self.saved_blocks += 1;
        }
    }

    /// The epoch of the kept image.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// How many blocks are saved.
    pub fn saved_blocks(&self) -> u64 {
        self.saved_blocks
    }

    /// The log's length in bytes.
    pub fn len(&self) -> u64 {
        self.end
    }

    /// Whether the log holds no block yet.
    pub fn is_empty(&self) -> bool {
        self.saved_blocks == 0
    }

    /// Saves every block of `[offset, offset+length)` not saved yet, reading its bytes from the volume
    /// file `data` (a block not saved has not been written since the image was kept, so the file holds
    /// the image's bytes). Appended, not yet durable: call [`UndoLog::sync`] before the overwrite.
    /// Returns how many blocks were saved.
    pub fn preserve(&mut self, data: &File, offset: u64, length: u64) -> Result<u64, UndoError> {
        let end = offset.saturating_add(length).min(self.size);
        if offset >= end {
            return Ok(0);
        }
        let mut saved = 0;
        let mut block = offset / BLOCK;
        let last = end.div_ceil(BLOCK);
        while block < last {
            if self.is_saved(block) {
                block += 1;
                continue;
            }
            // A run of blocks not saved yet (at most RUN_BLOCKS): one read, one append. The buffers
            // are kept between calls (no allocation, no page faults, no zeroing per save).
            let first = block;
            while block < last && !self.is_saved(block) && block - first < RUN_BLOCKS {
                block += 1;
            }
            let start = first * BLOCK;
            let stop = (block * BLOCK).min(self.size);
            let len = (stop - start) as usize;
            if self.read_buf.len() < len {
                self.read_buf.resize(len, 0);
            }
            let bytes = &mut self.read_buf[..len];
            read_full_at(data, bytes, start)
                .map_err(|e| UndoError::io("read blocks", &self.path, e))?;
            // One record header per block, then the block's bytes (none for a block of zeroes),
            // written with one pwritev straight from the read buffer.
            let headers = &mut self.header_buf;
            headers.clear();
            let mut stored_len = 0u64;
            for (i, chunk) in bytes.chunks(BLOCK as usize).enumerate() {
                let at = start + i as u64 * BLOCK;
                let length = chunk.len() as u32;
                let kind = if chunk.iter().all(|b| *b == 0) {
                    KIND_ZEROES
                } else {
                    KIND_BYTES
                };
                let stored = if kind == KIND_BYTES { chunk } else { &[][..] };
                let mut header = [0u8; RECORD_HEADER as usize];
                header[0..8].copy_from_slice(&at.to_be_bytes());
                header[8..12].copy_from_slice(&length.to_be_bytes());
                header[12..16].copy_from_slice(&kind.to_be_bytes());
                header[16..24].copy_from_slice(
                    &record_sum(self.epoch, at, length, kind, stored).to_be_bytes(),
                );
                headers.push(header);
                stored_len += RECORD_HEADER + stored.len() as u64;
            }
            let mut slices = Vec::with_capacity(2 * headers.len());
            for (header, chunk) in headers.iter().zip(bytes.chunks(BLOCK as usize)) {
                slices.push(std::io::IoSlice::new(header));
                if u32::from_be_bytes([header[12], header[13], header[14], header[15]])
                    == KIND_BYTES
                {
                    slices.push(std::io::IoSlice::new(chunk));
                }
            }
            write_all_vectored_at(&self.file, &mut slices, self.end).map_err(|e| {
                if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
                    UndoError::NoSpace {
                        path: self.path.display().to_string(),
                        needed: max_log_len(self.size),
                        source: e,
                    }
                } else {
                    UndoError::io("append", &self.path, e)
                }
            })?;
            self.end += stored_len;
            for b in first..block {
                self.mark(b);
            }
            self.unsynced = true;
            saved += block - first;
        }
        Ok(saved)
    }

    /// Whether records were appended since the last sync.
    pub fn needs_sync(&self) -> bool {
        self.unsynced
    }

    /// A handle to `fdatasync` the log off the async runtime; call [`UndoLog::synced`] once it returned.
    pub fn sync_handle(&self) -> Arc<File> {
        Arc::clone(&self.file)
    }

    /// Records that a sync started after the last append returned successfully.
    pub fn synced(&mut self) {
        self.unsynced = false;
    }

    /// Makes every appended record durable.
    pub fn sync(&mut self) -> Result<(), UndoError> {
        if self.unsynced {
            self.file
                .sync_data()
                .map_err(|e| UndoError::io("fdatasync", &self.path, e))?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Writes every saved block back into the volume file `data`, syncs it, then removes the log: the
    /// volume holds the kept image again. Safe to repeat after a crash part-way (the log stays until the
    /// volume is synced).
    pub fn roll_back(self, data: &File) -> Result<RolledBack, UndoError> {
        self.roll_back_collecting(data, &mut Vec::new())
    }

    /// [`UndoLog::roll_back`], adding each range written back to `restored` as `(offset, length)`.
    pub fn roll_back_collecting(
        self,
        data: &File,
        restored: &mut Vec<(u64, u64)>,
    ) -> Result<RolledBack, UndoError> {
        let len = self
            .file
            .metadata()
            .map_err(|e| UndoError::io("stat", &self.path, e))?
            .len()
            .max(self.end);
        let mut buf = vec![0u8; BLOCK as usize];
        let mut at = HEADER_LEN;
        let mut blocks = 0;
        while let Some((offset, length, kind)) = self.record_at(at, len, &mut buf) {
            data.write_all_at(&buf[..length as usize], offset)
                .map_err(|e| UndoError::io("write back", &self.path, e))?;
            restored.push((offset, u64::from(length)));
            blocks += 1;
            at += RECORD_HEADER
                + if kind == KIND_BYTES {
                    u64::from(length)
                } else {
                    0
                };
        }
        data.sync_all()
            .map_err(|e| UndoError::io("fsync volume", &self.path, e))?;
        let epoch = self.epoch;
        self.discard()?;
        Ok(RolledBack { epoch, blocks })
    }

    /// Drops the kept image: removes the log (durably).
    pub fn discard(self) -> Result<(), UndoError> {
        std::fs::remove_file(&self.path).map_err(|e| UndoError::io("remove", &self.path, e))?;
        if let Some(dir) = self.path.parent() {
            sync_dir(dir)?;
        }
        tracing::info!(log = %self.path.display(), epoch = self.epoch, "kept image dropped");
        Ok(())
    }
}

/// Writes every slice at `offset` onwards, in order (`pwritev`, again after a short write).
fn write_all_vectored_at(
    file: &File,
    mut slices: &mut [std::io::IoSlice<'_>],
    mut offset: u64,
) -> std::io::Result<()> {
    while !slices.is_empty() {
        match rustix::io::pwritev(file, slices, offset) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => {
                offset += n as u64;
                std::io::IoSlice::advance_slices(&mut slices, n);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeroes (a sparse file
/// may be shorter than its volume until written).
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Rolls volume `name` in `dir` back to its kept image, if it has one (the volume must not be written
/// meanwhile: stop its replication first). Returns what was restored, or `None` without a kept image.
pub fn roll_back(dir: &Path, name: &str) -> Result<Option<RolledBack>, UndoError> {
    Ok(roll_back_reporting(dir, name)?.map(|report| report.done))
}

/// What a roll-back did, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollBackReport {
    /// The epoch restored and the blocks written back.
    pub done: RolledBack,
    /// The ranges written back, `(offset, length)` each, in log order.
    pub restored: Vec<(u64, u64)>,
}

/// [`roll_back`], also returning the ranges written back as `(offset, length)` (what the resync had
/// overwritten since the image).
pub fn roll_back_reporting(dir: &Path, name: &str) -> Result<Option<RollBackReport>, UndoError> {
    let Some(log) = UndoLog::open(dir, name)? else {
        return Ok(None);
    };
    let path = dir.join(name);
    let data = OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| UndoError::io("open volume", &path, e))?;
    let mut restored = Vec::new();
    let done = log.roll_back_collecting(&data, &mut restored)?;
    tracing::info!(
        volume = name,
        epoch = done.epoch,
        blocks = done.blocks,
        "rolled back to the kept image"
    );
    Ok(Some(RollBackReport { done, restored }))
}

/// The volumes in `dir` that keep an image.
pub fn kept_volumes(dir: &Path) -> Result<Vec<String>, UndoError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| UndoError::io("list", dir, e))? {
        let entry = entry.map_err(|e| UndoError::io("list", dir, e))?;
        let file = entry.file_name();
        if let Some(name) = file
            .to_str()
            .and_then(|f| f.strip_prefix('.'))
            .and_then(|f| f.strip_suffix(".undo"))
            .filter(|name| crate::wire::valid_volume_name(name))
        {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// The epoch of volume `name`'s kept image, if it has one.
pub fn kept_epoch(dir: &Path, name: &str) -> Result<Option<u64>, UndoError> {
    Ok(UndoLog::open(dir, name)?.map(|log| log.epoch()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn volume(dir: &Path, name: &str, bytes: &[u8]) -> File {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// Saves, syncs and overwrites, as the secondary does.
    fn overwrite(log: &mut UndoLog, data: &File, offset: u64, bytes: &[u8]) {
        log.preserve(data, offset, bytes.len() as u64).unwrap();
        log.sync().unwrap();
        data.write_all_at(bytes, offset).unwrap();
    }

    #[test]
    fn rolling_back_restores_the_kept_image_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let size = 10 * BLOCK + 100; // a short last block
        let mut image = pattern(size as usize, 7);
        image[(2 * BLOCK) as usize..(3 * BLOCK) as usize].fill(0); // a block of zeroes
        let data = volume(dir.path(), "v", &image);
        let mut log = UndoLog::create(dir.path(), "v", 3, size).unwrap();
        overwrite(&mut log, &data, 100, &pattern(3 * BLOCK as usize, 1)); // unaligned, 4 blocks
        overwrite(&mut log, &data, 2 * BLOCK, &pattern(10, 2)); // saved already
        overwrite(&mut log, &data, 10 * BLOCK, &pattern(100, 3)); // the short block
        assert_eq!(log.saved_blocks(), 5);
        assert!(log.len() <= max_log_len(size));
        assert_ne!(std::fs::read(dir.path().join("v")).unwrap(), image);
        drop(log);
        let done = roll_back(dir.path(), "v").unwrap().unwrap();
        assert_eq!(
            done,
            RolledBack {
                epoch: 3,
                blocks: 5
            }
        );
        assert_eq!(std::fs::read(dir.path().join("v")).unwrap(), image);
        assert!(!log_path(dir.path(), "v").exists());
        assert_eq!(roll_back(dir.path(), "v").unwrap(), None);
    }

    #[test]
    fn each_block_is_saved_once_so_the_log_stays_within_the_volume_size() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 * BLOCK;
        let image = pattern(size as usize, 9);
        let data = volume(dir.path(), "v", &image);
        let mut log = UndoLog::create(dir.path(), "v", 1, size).unwrap();
        for round in 0..5u8 {
            for block in 0..64 {
                overwrite(
                    &mut log,
                    &data,
                    block * BLOCK,
                    &pattern(BLOCK as usize, round),
                );
            }
        }
        assert_eq!(log.saved_blocks(), 64);
        assert_eq!(log.len(), max_log_len(size));
        log.roll_back(&data).unwrap();
        assert_eq!(std::fs::read(dir.path().join("v")).unwrap(), image);
    }

    #[test]
    fn a_reopened_log_knows_its_blocks_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8 * BLOCK;
        let image = pattern(size as usize, 4);
        let data = volume(dir.path(), "v", &image);
        let mut log = UndoLog::create(dir.path(), "v", 5, size).unwrap();
        overwrite(&mut log, &data, 0, &pattern(2 * BLOCK as usize, 1));
        let whole = log.len();
        drop(log);
        // A crash while appending the next record: half a record, and its block never overwritten.
        let file = OpenOptions::new()
            .write(true)
            .open(log_path(dir.path(), "v"))
            .unwrap();
        file.write_all_at(&[0xab; 1000], whole).unwrap();
        drop(file);
        let mut log = UndoLog::open(dir.path(), "v").unwrap().unwrap();
        assert_eq!((log.epoch(), log.saved_blocks(), log.len()), (5, 2, whole));
        assert_eq!(
            std::fs::metadata(log_path(dir.path(), "v")).unwrap().len(),
            whole
        );
        // Saved blocks are not saved again; a new one is.
        overwrite(&mut log, &data, BLOCK, &pattern(2 * BLOCK as usize, 2));
        assert_eq!(log.saved_blocks(), 3);
        drop(log);
        assert_eq!(
            roll_back(dir.path(), "v").unwrap().unwrap(),
            RolledBack {
                epoch: 5,
                blocks: 3
            }
        );
        assert_eq!(std::fs::read(dir.path().join("v")).unwrap(), image);
    }

    #[test]
    fn a_roll_back_interrupted_part_way_is_finished_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 * BLOCK;
        let image = pattern(size as usize, 6);
        let data = volume(dir.path(), "v", &image);
        let mut log = UndoLog::create(dir.path(), "v", 2, size).unwrap();
        overwrite(&mut log, &data, 0, &pattern(size as usize, 8));
        drop(log);
        // The first roll-back wrote one block back, then the machine stopped (the log stays).
        let mut first = vec![0u8; BLOCK as usize];
        first.copy_from_slice(&image[..BLOCK as usize]);
        data.write_all_at(&first, 0).unwrap();
        assert_eq!(
            roll_back(dir.path(), "v").unwrap().unwrap(),
            RolledBack {
                epoch: 2,
                blocks: 4
            }
        );
        assert_eq!(std::fs::read(dir.path().join("v")).unwrap(), image);
    }

    #[test]
    fn a_bad_header_is_refused_and_a_missing_log_is_no_image() {
        let dir = tempfile::tempdir().unwrap();
        assert!(UndoLog::open(dir.path(), "v").unwrap().is_none());
        std::fs::write(log_path(dir.path(), "v"), [1u8; 100]).unwrap();
        assert!(matches!(
            UndoLog::open(dir.path(), "v"),
            Err(UndoError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_log_that_cannot_get_its_space_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // More than any filesystem here can reserve.
        match UndoLog::create(dir.path(), "v", 1, 1 << 62) {
            Err(UndoError::NoSpace { needed, .. }) => assert_eq!(needed, max_log_len(1 << 62)),
            other => panic!("expected NoSpace, got {other:?}"),
        }
        assert!(!log_path(dir.path(), "v").exists());
    }

    #[test]
    fn a_log_over_the_limit_is_refused_as_out_of_space_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let size = 16 * BLOCK;
        let refused = UndoLog::create_within(dir.path(), "v", 1, size, Some(max_log_len(size) - 1))
            .unwrap_err();
        assert!(matches!(refused, UndoError::NoSpace { .. }));
        let said = refused.to_string();
        assert!(said.starts_with(OUT_OF_SPACE), "{said}");
        assert!(
            said.contains(&format!("needs up to {} bytes", max_log_len(size))),
            "{said}"
        );
        assert!(!log_path(dir.path(), "v").exists());
        UndoLog::create_within(dir.path(), "v", 1, size, Some(max_log_len(size))).unwrap();
        assert!(log_path(dir.path(), "v").exists());
    }
}
