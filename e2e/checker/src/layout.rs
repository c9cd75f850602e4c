//! Where each write of the workload lands: a pure, deterministic placement.
//!
//! The workload runs one or more *lanes*: independent writers, each a strict chain of writes numbered
//! from 1 (write `s + 1` of a lane is issued only after its write `s` was acknowledged). Every volume's
//! region (starting at block `base`) gives each lane `slots` blocks of its own: lane `l` owns slots
//! `l * slots .. (l + 1) * slots`. Each lane cycles over `span` consecutive volumes starting at its own
//! index: write `s` of lane `l` goes to volume `(l + (s - 1) % span) % volumes`, to the lane's slot
//! `((s - 1) / span) % slots`. A lane longer than `span * slots` writes overwrites its older blocks; the
//! *generation* of a write is how many times its slot was written before it.
//!
//! With `span < volumes` a lane never touches some volumes, so it keeps writing while another volume
//! holds its writes — which lets a test see what the other volumes do meanwhile (e.g. 3 volumes, 3
//! lanes, span 2: while volume 0 holds, lane 1 still writes to volumes 1 and 2).
//!
//! Because placement is a pure function of (lane, sequence), what a lane's slots hold after its prefix
//! `1..=k` is determined: each slot holds the newest write `≤ k` of the lane that maps to it, or
//! nothing. That is what keeps the checker sound with overwrites (see [`Layout::newest_at_or_before`]).

use serde::{Deserialize, Serialize};

/// The size of one workload block, in bytes.
pub const BLOCK_SIZE: u64 = 4096;
/// The most lanes a run may have (each block records every lane's acknowledged frontier).
pub const MAX_LANES: u32 = 64;

/// A block's place: which lane's slot, on which volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Location {
    /// The lane owning the slot.
    pub lane: u32,
    /// Index of the volume (position in the workload's volume list, and in the checker's image list).
    pub volume: u32,
    /// Slot within the lane's part of the region.
    pub slot: u64,
    /// Byte offset of the block within the volume.
    pub offset: u64,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "volume {} lane {} slot {} (byte offset {})",
            self.volume, self.lane, self.slot, self.offset
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
    #[error("a layout needs at least one slot per lane and volume")]
    NoSlots,
    /// No lanes, or too many.
    #[error("a layout needs 1 to {MAX_LANES} lanes, not {0}")]
    Lanes(u32),
    /// The span is 0 or more than the volumes.
    #[error("a lane spans 1 to {volumes} volumes, not {span}")]
    Span {
        /// Span requested.
        span: u32,
        /// Volumes of the layout.
        volumes: u32,
    },
    /// A lane has a single block in all: a torn write there would erase the only evidence of the write
    /// before it.
    #[error("a layout needs at least two slots per lane in all (span × slots ≥ 2)")]
    SingleSlot,
    /// The region does not fit in a 64-bit byte offset.
    #[error("region of {lanes} × {slots} slots at block {base} overflows a 64-bit byte offset")]
    TooLarge {
        /// Lanes requested.
        lanes: u32,
        /// Slots per lane requested.
        slots: u64,
        /// First block requested.
        base: u64,
    },
}

/// The placement parameters of a run. Every block records them, so images describe themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Layout {
    volumes: u32,
    lanes: u32,
    span: u32,
    slots: u64,
    base: u64,
}

impl Layout {
    /// A single-lane layout over `volumes` volumes, each with a region of `slots` blocks starting at
    /// block `base`.
    pub fn new(volumes: u32, slots: u64, base: u64) -> Result<Self, LayoutError> {
        Self::with_lanes(volumes, 1, slots, base)
    }

    /// A layout of `lanes` lanes over `volumes` volumes, every lane writing to every volume; each lane
    /// has `slots` blocks on every volume, in a region starting at block `base`.
    pub fn with_lanes(
        volumes: u32,
        lanes: u32,
        slots: u64,
        base: u64,
    ) -> Result<Self, LayoutError> {
        Self::with_span(volumes, lanes, volumes, slots, base)
    }

    /// Like [`Layout::with_lanes`], but each lane cycles over only `span` volumes (see the module docs).
    pub fn with_span(
        volumes: u32,
        lanes: u32,
        span: u32,
        slots: u64,
        base: u64,
    ) -> Result<Self, LayoutError> {
        if volumes == 0 {
            return Err(LayoutError::NoVolumes);
        }
        if slots == 0 {
            return Err(LayoutError::NoSlots);
        }
        if lanes == 0 || lanes > MAX_LANES {
            return Err(LayoutError::Lanes(lanes));
        }
        if span == 0 || span > volumes {
            return Err(LayoutError::Span { span, volumes });
        }
        if span == 1 && slots == 1 {
            return Err(LayoutError::SingleSlot);
        }
        slots
            .checked_mul(u64::from(lanes))
            .and_then(|n| n.checked_add(base))
            .and_then(|end| end.checked_mul(BLOCK_SIZE))
            .ok_or(LayoutError::TooLarge { lanes, slots, base })?;
        Ok(Self {
            volumes,
            lanes,
            span,
            slots,
            base,
        })
    }

    /// Number of volumes.
    pub fn volumes(&self) -> u32 {
        self.volumes
    }

    /// Number of lanes.
    pub fn lanes(&self) -> u32 {
        self.lanes
    }

    /// How many volumes each lane cycles over.
    pub fn span(&self) -> u32 {
        self.span
    }

    /// Slots per lane on each volume.
    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// First block of the region, on every volume.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Writes of a lane before it starts overwriting its own blocks.
    pub fn period(&self) -> u64 {
        u64::from(self.span) * self.slots
    }

    /// The smallest volume size, in bytes, that holds the region.
    pub fn required_volume_size(&self) -> u64 {
        // `with_span` checked that this does not overflow.
        (self.base + u64::from(self.lanes) * self.slots) * BLOCK_SIZE
    }

    /// Whether `lane` writes to `volume`.
    pub fn lane_writes_to(&self, lane: u32, volume: u32) -> bool {
        self.span_index(lane, volume).is_some()
    }

    /// The position of `volume` in `lane`'s cycle, if the lane writes to it.
    fn span_index(&self, lane: u32, volume: u32) -> Option<u64> {
        let v = u64::from(self.volumes);
        let i = (u64::from(volume) + v - u64::from(lane) % v) % v;
        (volume < self.volumes && i < u64::from(self.span)).then_some(i)
    }

    /// Where write `seq` (`≥ 1`) of `lane` lands.
    pub fn locate(&self, lane: u32, seq: u64) -> Location {
        let index = seq.saturating_sub(1);
        let (v, span) = (u64::from(self.volumes), u64::from(self.span));
        let volume = ((u64::from(lane) + index % span) % v) as u32;
        let slot = (index / span) % self.slots;
        self.location(lane, volume, slot)
    }

    /// The location of `slot` of `lane` on `volume`.
    pub fn location(&self, lane: u32, volume: u32, slot: u64) -> Location {
        let block = self.base + u64::from(lane) * self.slots + slot;
        Location {
            lane,
            volume,
            slot,
            offset: block * BLOCK_SIZE,
        }
    }

    /// The lane and slot whose block sits at byte `offset`, if that is inside the region.
    pub fn slot_at_offset(&self, offset: u64) -> Option<(u32, u64)> {
        if !offset.is_multiple_of(BLOCK_SIZE) {
            return None;
        }
        let block = (offset / BLOCK_SIZE).checked_sub(self.base)?;
        let lane = block / self.slots;
        (lane < u64::from(self.lanes)).then_some((lane as u32, block % self.slots))
    }

    /// How many writes to the same slot came before `seq`.
    pub fn generation(&self, seq: u64) -> u64 {
        seq.saturating_sub(1) / self.period()
    }

    /// The newest write `≤ k` of `lane` that lands on (`volume`, `slot`): what that slot holds after the
    /// lane's prefix `1..=k`. `None` when no write of the prefix lands there.
    pub fn newest_at_or_before(&self, lane: u32, volume: u32, slot: u64, k: u64) -> Option<u64> {
        if slot >= self.slots || lane >= self.lanes {
            return None;
        }
        // Writes of `lane` landing on (volume, slot) have index s - 1 = i + span * (slot + slots * g),
        // where i is the volume's position in the lane's cycle, for g = 0, 1, ...
        let i = self.span_index(lane, volume)?;
        let first = 1 + i + u64::from(self.span) * slot;
        if k < first {
            return None;
        }
        let period = self.period();
        Some(first + (k - first) / period * period)
    }

    /// Every location of the region: lane by lane, volume by volume.
    pub fn locations(&self) -> impl Iterator<Item = Location> + '_ {
        (0..self.lanes).flat_map(move |l| {
            (0..self.volumes)
                .flat_map(move |v| (0..self.slots).map(move |s| self.location(l, v, s)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_then_slots_then_wraps() -> Result<(), LayoutError> {
        let l = Layout::new(3, 2, 10)?;
        let placed: Vec<(u32, u64)> = (1..=8)
            .map(|s| (l.locate(0, s).volume, l.locate(0, s).slot))
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
        assert_eq!(l.locate(0, 1).offset, 10 * BLOCK_SIZE);
        assert_eq!(l.generation(6), 0);
        assert_eq!(l.generation(7), 1);
        assert_eq!(l.required_volume_size(), 12 * BLOCK_SIZE);
        Ok(())
    }

    #[test]
    fn lanes_have_their_own_slots_and_start_apart() -> Result<(), LayoutError> {
        let l = Layout::with_lanes(3, 2, 4, 1)?;
        let first = Location {
            lane: 1,
            volume: 1,
            slot: 0,
            offset: (1 + 4) * BLOCK_SIZE,
        };
        assert_eq!(l.locate(1, 1), first);
        assert_eq!(l.slot_at_offset((1 + 4 + 3) * BLOCK_SIZE), Some((1, 3)));
        assert_eq!(l.slot_at_offset(BLOCK_SIZE), Some((0, 0)));
        assert_eq!(l.slot_at_offset(0), None);
        assert_eq!(l.slot_at_offset(9 * BLOCK_SIZE), None);
        assert_eq!(l.required_volume_size(), 9 * BLOCK_SIZE);
        Ok(())
    }

    #[test]
    fn a_span_keeps_lanes_off_some_volumes() -> Result<(), LayoutError> {
        let l = Layout::with_span(3, 3, 2, 4, 0)?;
        let vols = |lane| {
            (1..=6)
                .map(|s| l.locate(lane, s).volume)
                .collect::<Vec<_>>()
        };
        assert_eq!(vols(0), vec![0, 1, 0, 1, 0, 1]);
        assert_eq!(vols(1), vec![1, 2, 1, 2, 1, 2]);
        assert_eq!(vols(2), vec![2, 0, 2, 0, 2, 0]);
        assert!(!l.lane_writes_to(1, 0) && l.lane_writes_to(1, 2));
        assert_eq!(l.newest_at_or_before(1, 0, 0, 100), None);
        assert_eq!(l.period(), 8);
        Ok(())
    }

    #[test]
    fn newest_matches_brute_force() -> Result<(), LayoutError> {
        let cases = [
            (1, 1, 1, 2),
            (2, 1, 2, 1),
            (2, 3, 2, 3),
            (3, 2, 3, 1),
            (4, 3, 4, 5),
            (3, 3, 2, 2),
            (4, 5, 1, 3),
        ];
        for (v, lanes, span, s) in cases {
            let l = Layout::with_span(v, lanes, span, s, 0)?;
            for k in 0..60 {
                for loc in l.locations() {
                    let brute = (1..=k).rev().find(|&q| l.locate(loc.lane, q) == loc);
                    let newest = l.newest_at_or_before(loc.lane, loc.volume, loc.slot, k);
                    assert_eq!(newest, brute, "{l:?} k={k} {loc}");
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
        assert_eq!(Layout::with_lanes(2, 0, 1, 0), Err(LayoutError::Lanes(0)));
        let too_many = MAX_LANES + 1;
        assert_eq!(
            Layout::with_lanes(2, too_many, 1, 0),
            Err(LayoutError::Lanes(too_many))
        );
        assert!(Layout::new(1, u64::MAX, 1).is_err());
        assert_eq!(
            Layout::with_span(3, 1, 0, 4, 0),
            Err(LayoutError::Span {
                span: 0,
                volumes: 3
            })
        );
        assert_eq!(
            Layout::with_span(3, 1, 4, 4, 0),
            Err(LayoutError::Span {
                span: 4,
                volumes: 3
            })
        );
        assert_eq!(
            Layout::with_span(3, 1, 1, 1, 0),
            Err(LayoutError::SingleSlot)
        );
    }
}
