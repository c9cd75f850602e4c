//! Where each write of the dependent chain lands: a pure, deterministic placement.
//!
//! Sequence numbers start at 1. Write `seq` goes to volume `(seq - 1) % volumes` (round robin), and within
//! that volume to slot `((seq - 1) / volumes) % slots` of a region of `slots` blocks starting at block
//! `base`. A run longer than `volumes * slots` writes therefore overwrites older blocks: the *generation*
//! of a write is how many times its slot had been written before it.
//!
//! Because placement is a pure function of the sequence, the secondaries after any prefix `1..=k` of the
//! chain are fully determined: each slot holds the newest write `≤ k` that maps to it, or nothing. That is
//! what lets the checker stay sound with overwrites: it checks each slot against the newest generation
//! the claimed prefix puts there (see [`Layout::newest_at_or_before`]).

use serde::{Deserialize, Serialize};

/// The size of one workload block, in bytes.
pub const BLOCK_SIZE: u64 = 4096;

/// A block's place: which volume, which slot of the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Location {
    /// Index of the volume (position in the workload's volume list, and in the checker's image list).
    pub volume: u32,
    /// Slot within the volume's region.
    pub slot: u64,
    /// Byte offset of the block within the volume.
    pub offset: u64,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "volume {} slot {} (byte offset {})",
            self.volume, self.slot, self.offset
        )
    }
}

/// Errors in a layout's parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// No volumes.
    #[error("a layout needs at least one volume")]
    NoVolumes,
    /// No slots.
    #[error("a layout needs at least one slot per volume")]
    NoSlots,
    /// The region holds a single block in all: a torn write there would erase the only evidence of the
    /// write before it.
    #[error("a layout needs at least two slots in all (volumes × slots ≥ 2)")]
    SingleSlot,
    /// The region does not fit in a 64-bit byte offset.
    #[error("region of {slots} slots at block {base} overflows a 64-bit byte offset")]
    TooLarge {
        /// Slots requested.
        slots: u64,
        /// First block requested.
        base: u64,
    },
}

/// The placement parameters of a run. Every block records them, so images describe themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Layout {
    volumes: u32,
    slots: u64,
    base: u64,
}

impl Layout {
    /// A layout over `volumes` volumes, each with a region of `slots` blocks starting at block `base`.
    pub fn new(volumes: u32, slots: u64, base: u64) -> Result<Self, LayoutError> {
        if volumes == 0 {
            return Err(LayoutError::NoVolumes);
        }
        if slots == 0 {
            return Err(LayoutError::NoSlots);
        }
        if volumes == 1 && slots == 1 {
            return Err(LayoutError::SingleSlot);
        }
        base.checked_add(slots)
            .and_then(|end| end.checked_mul(BLOCK_SIZE))
            .ok_or(LayoutError::TooLarge { slots, base })?;
        Ok(Self {
            volumes,
            slots,
            base,
        })
    }

    /// Number of volumes.
    pub fn volumes(&self) -> u32 {
        self.volumes
    }

    /// Slots per volume.
    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// First block of the region, on every volume.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The smallest volume size, in bytes, that holds the region.
    pub fn required_volume_size(&self) -> u64 {
        // `new` checked that this does not overflow.
        (self.base + self.slots) * BLOCK_SIZE
    }

    /// Volume and slot of write `seq` (`seq ≥ 1`).
    pub fn locate(&self, seq: u64) -> Location {
        let index = seq.saturating_sub(1);
        let volume = (index % u64::from(self.volumes)) as u32;
        let slot = (index / u64::from(self.volumes)) % self.slots;
        self.location(volume, slot)
    }

    /// The location of `slot` on `volume`.
    pub fn location(&self, volume: u32, slot: u64) -> Location {
        Location {
            volume,
            slot,
            offset: (self.base + slot) * BLOCK_SIZE,
        }
    }

    /// The slot whose block sits at byte `offset`, if that is inside the region.
    pub fn slot_at_offset(&self, offset: u64) -> Option<u64> {
        if !offset.is_multiple_of(BLOCK_SIZE) {
            return None;
        }
        let block = offset / BLOCK_SIZE;
        (block >= self.base && block < self.base + self.slots).then(|| block - self.base)
    }

    /// How many writes to the same slot came before `seq`.
    pub fn generation(&self, seq: u64) -> u64 {
        seq.saturating_sub(1) / u64::from(self.volumes) / self.slots
    }

    /// The newest write `≤ k` that lands on (`volume`, `slot`): what that slot holds after the prefix
    /// `1..=k`. `None` when no write of the prefix lands there.
    pub fn newest_at_or_before(&self, volume: u32, slot: u64, k: u64) -> Option<u64> {
        if volume >= self.volumes || slot >= self.slots {
            return None;
        }
        // Writes landing on (volume, slot) are 1 + volume + volumes * (slot + slots * g), g = 0, 1, ...
        let first = 1 + u64::from(volume) + u64::from(self.volumes) * slot;
        if k < first {
            return None;
        }
        let period = u64::from(self.volumes) * self.slots;
        Some(first + (k - first) / period * period)
    }

    /// Every location of the region, volume by volume.
    pub fn locations(&self) -> impl Iterator<Item = Location> + '_ {
        (0..self.volumes).flat_map(move |v| (0..self.slots).map(move |s| self.location(v, s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_then_slots_then_wraps() -> Result<(), LayoutError> {
        let l = Layout::new(3, 2, 10)?;
        let placed: Vec<(u32, u64)> = (1..=8)
            .map(|s| (l.locate(s).volume, l.locate(s).slot))
            .collect();
        assert_eq!(
            placed,
            vec![
                (0, 0),
                (1, 0),
                (2, 0),
                (0, 1),
                (1, 1),
                (2, 1),
                (0, 0),
                (1, 0)
            ]
        );
        assert_eq!(l.locate(1).offset, 10 * BLOCK_SIZE);
        assert_eq!(l.generation(6), 0);
        assert_eq!(l.generation(7), 1);
        assert_eq!(l.required_volume_size(), 12 * BLOCK_SIZE);
        Ok(())
    }

    #[test]
    fn newest_matches_brute_force() -> Result<(), LayoutError> {
        for (v, s) in [(1, 2), (2, 1), (2, 3), (3, 1), (4, 5)] {
            let l = Layout::new(v, s, 0)?;
            for k in 0..60 {
                for loc in l.locations() {
                    let brute = (1..=k).rev().find(|&q| l.locate(q) == loc);
                    assert_eq!(
                        l.newest_at_or_before(loc.volume, loc.slot, k),
                        brute,
                        "{l:?} k={k} {loc}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn rejects_bad_parameters() {
        assert_eq!(Layout::new(0, 1, 0), Err(LayoutError::NoVolumes));
        assert_eq!(Layout::new(1, 0, 0), Err(LayoutError::NoSlots));
        assert_eq!(Layout::new(1, 1, 0), Err(LayoutError::SingleSlot));
        assert!(Layout::new(1, u64::MAX, 1).is_err());
    }
}
