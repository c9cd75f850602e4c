//! Synthetic secondaries, for tests: the exact bytes each volume holds after a prefix of a run.
//!
//! These are what a perfect replicator's secondaries hold after writes `1..=k`; tests damage them to
//! make inconsistent ones.

use crate::block;
use crate::layout::{BLOCK_SIZE, Layout};

/// The images (one per volume, each `layout.required_volume_size()` bytes) after writes `1..=k` of run
/// `run_id`.
pub fn prefix_images(layout: Layout, run_id: u64, k: u64) -> Vec<Vec<u8>> {
    let size = layout.required_volume_size() as usize;
    let mut images = vec![vec![0u8; size]; layout.volumes() as usize];
    for loc in layout.locations() {
        if let Some(seq) = layout.newest_at_or_before(loc.volume, loc.slot, k) {
            put(
                &mut images[loc.volume as usize],
                loc.offset,
                &block::encode(run_id, seq, layout),
            );
        }
    }
    images
}

/// What the slot of write `seq` held just before it: the previous generation's block, or zeros.
pub fn before(layout: Layout, run_id: u64, seq: u64) -> Vec<u8> {
    let loc = layout.locate(seq);
    match layout.newest_at_or_before(loc.volume, loc.slot, seq.saturating_sub(1)) {
        Some(older) => block::encode(run_id, older, layout),
        None => vec![0u8; BLOCK_SIZE as usize],
    }
}

/// Overwrites the 4 KiB block at `offset` of `image` with `data`.
pub fn put(image: &mut [u8], offset: u64, data: &[u8]) {
    let at = offset as usize;
    image[at..at + data.len()].copy_from_slice(data);
}
