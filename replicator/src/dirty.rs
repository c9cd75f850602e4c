//! The dirty-region map: which parts of a volume its secondary may lack.
//!
//! Every write whose copy the secondary did not acknowledge is recorded here, at [`CHUNK`] granularity.
//! In part 1 the map lives in memory and only grows; persisting it beside the volume and resynchronising
//! from it come with suspend/resume.

use std::collections::BTreeSet;

/// Granularity of the map in bytes.
pub const CHUNK: u64 = 64 * 1024;

/// A set of dirty chunks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyMap {
    chunks: BTreeSet<u64>,
}

impl DirtyMap {
    /// Records `[offset, offset + length)` as dirty.
    pub fn mark(&mut self, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        let first = offset / CHUNK;
        let last = offset.saturating_add(length - 1) / CHUNK;
        self.chunks.extend(first..=last);
    }

    /// Whether any byte of `[offset, offset + length)` is dirty.
    pub fn is_dirty(&self, offset: u64, length: u64) -> bool {
        if length == 0 {
            return false;
        }
        let first = offset / CHUNK;
        let last = offset.saturating_add(length - 1) / CHUNK;
        self.chunks.range(first..=last).next().is_some()
    }

    /// Whether every byte of `[offset, offset + length)` is dirty (true for an empty range).
    pub fn is_dirty_all(&self, offset: u64, length: u64) -> bool {
        if length == 0 {
            return true;
        }
        let first = offset / CHUNK;
        let last = offset.saturating_add(length - 1) / CHUNK;
        (first..=last).all(|c| self.chunks.contains(&c))
    }

    /// Clears every chunk overlapping `[offset, offset + length)` (used once a resync copied those
    /// chunks, which are always whole chunks or the volume's tail).
    pub fn clear(&mut self, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        let first = offset / CHUNK;
        let last = offset.saturating_add(length - 1) / CHUNK;
        let doomed: Vec<u64> = self.chunks.range(first..=last).copied().collect();
        for c in doomed {
            self.chunks.remove(&c);
        }
    }

    /// The dirty regions split into pieces of at most `max` bytes (a multiple of [`CHUNK`]) and clamped
    /// to a volume of `size` bytes.
    pub fn pieces(&self, max: u64, size: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for (mut offset, length) in self.regions() {
            let end = (offset + length).min(size);
            while offset < end {
                let n = (end - offset).min(max.max(CHUNK));
                out.push((offset, n));
                offset += n;
            }
        }
        out
    }

    /// Bytes covered (a whole chunk per dirty chunk).
    pub fn dirty_bytes(&self) -> u64 {
        self.chunks.len() as u64 * CHUNK
    }

    /// The dirty regions as merged `(offset, length)` ranges, in order.
    pub fn regions(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &c in &self.chunks {
            match out.last_mut() {
                Some((off, len)) if *off + *len == c * CHUNK => *len += CHUNK,
                _ => out.push((c * CHUNK, CHUNK)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_and_merges() {
        let mut m = DirtyMap::default();
        m.mark(0, 1);
        m.mark(CHUNK, CHUNK + 1);
        m.mark(10 * CHUNK, 0);
        assert_eq!(m.regions(), vec![(0, 3 * CHUNK)]);
        assert!(m.is_dirty(2 * CHUNK, 1));
        assert!(!m.is_dirty(3 * CHUNK, CHUNK));
        assert_eq!(m.dirty_bytes(), 3 * CHUNK);
        assert!(m.is_dirty_all(10, CHUNK * 2));
        assert!(!m.is_dirty_all(10, CHUNK * 3));
        assert_eq!(
            m.pieces(2 * CHUNK, 2 * CHUNK + 10),
            vec![(0, 2 * CHUNK), (2 * CHUNK, 10)]
        );
        m.clear(2 * CHUNK, 10);
        assert_eq!(m.regions(), vec![(0, 2 * CHUNK)]);
    }
}
