//! Synthetic secondaries, for tests: the exact bytes each volume holds after a cut of a history.
//!
//! A [`History`] is a sequence of writes, each issued after every earlier one was acknowledged, so each
//! write depends on all earlier ones (its block records the lanes' acknowledged frontier). A *cut* keeps
//! each lane's writes up to some sequence; the images of a cut are what a replicator's secondaries hold
//! if exactly those writes reached them. Tests damage them to make inconsistent ones.

use crate::block;
use crate::layout::{BLOCK_SIZE, Layout};

/// One write of a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// Its lane.
    pub lane: u32,
    /// Its sequence within the lane.
    pub seq: u64,
    /// The lanes' acknowledged writes when it was issued.
    pub deps: Vec<u64>,
}

/// A history of writes of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    layout: Layout,
    run_id: u64,
    writes: Vec<Write>,
}

impl History {
    /// The history where the lanes named by `schedule` write one after another, each write acknowledged
    /// before the next is issued. Lanes outside the layout are skipped.
    pub fn sequential(
        layout: Layout,
        run_id: u64,
        schedule: impl IntoIterator<Item = u32>,
    ) -> Self {
        let mut frontier = vec![0u64; layout.lanes() as usize];
        let mut writes = Vec::new();
        for lane in schedule {
            let Some(next) = frontier.get(lane as usize).map(|s| s + 1) else {
                continue;
            };
            let mut deps = frontier.clone();
            deps[lane as usize] = next - 1;
            writes.push(Write {
                lane,
                seq: next,
                deps,
            });
            frontier[lane as usize] = next;
        }
        Self {
            layout,
            run_id,
            writes,
        }
    }

    /// `k` writes of lane 0.
    pub fn single_lane(layout: Layout, run_id: u64, k: u64) -> Self {
        Self::sequential(layout, run_id, std::iter::repeat_n(0, k as usize))
    }

    /// The layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The writes, in issue order.
    pub fn writes(&self) -> &[Write] {
        &self.writes
    }

    /// Each lane's last write among the first `n` writes.
    pub fn frontier_after(&self, n: usize) -> Vec<u64> {
        let mut f = vec![0u64; self.layout.lanes() as usize];
        for w in self.writes.iter().take(n) {
            f[w.lane as usize] = w.seq;
        }
        f
    }

    /// The block of write `i`.
    pub fn block(&self, i: usize) -> Vec<u8> {
        let w = &self.writes[i];
        block::encode(self.run_id, w.lane, w.seq, self.layout, &w.deps)
    }

    /// What the slot of write `i` held just before it: the lane's previous write there, or zeros.
    pub fn block_before(&self, i: usize) -> Vec<u8> {
        let w = &self.writes[i];
        let loc = self.layout.locate(w.lane, w.seq);
        (0..i)
            .rev()
            .find(|&j| {
                self.writes[j].lane == w.lane
                    && self.layout.locate(w.lane, self.writes[j].seq) == loc
            })
            .map_or_else(|| vec![0u8; BLOCK_SIZE as usize], |j| self.block(j))
    }

    /// The images holding each lane's writes `1..=ends[lane]` (missing entries: none of the lane).
    pub fn images_for(&self, ends: &[u64]) -> Vec<Vec<u8>> {
        let size = self.layout.required_volume_size() as usize;
        let mut images = vec![vec![0u8; size]; self.layout.volumes() as usize];
        for (i, w) in self.writes.iter().enumerate() {
            if w.seq <= ends.get(w.lane as usize).copied().unwrap_or(0) {
                let loc = self.layout.locate(w.lane, w.seq);
                put(&mut images[loc.volume as usize], loc.offset, &self.block(i));
            }
        }
        images
    }

    /// The images after the first `n` writes.
    pub fn images_after(&self, n: usize) -> Vec<Vec<u8>> {
        self.images_for(&self.frontier_after(n))
    }
}

/// The images (one per volume) after writes `1..=k` of lane 0 of run `run_id`.
pub fn prefix_images(layout: Layout, run_id: u64, k: u64) -> Vec<Vec<u8>> {
    History::single_lane(layout, run_id, k).images_for(&[k])
}

/// Overwrites the block at `offset` of `image` with `data`.
pub fn put(image: &mut [u8], offset: u64, data: &[u8]) {
    let at = offset as usize;
    image[at..at + data.len()].copy_from_slice(data);
}
