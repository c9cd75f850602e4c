//! The consistency checker: do the secondaries, taken together, hold exactly a prefix of the dependent
//! chain?
//!
//! The core ([`check`]) is pure: it takes [`Image`]s (what each secondary holds, block by block) and
//! returns a [`Verdict`]. [`scan`] reads images from files or NBD exports.
//!
//! # Why it is sound with overwrites
//! Placement is a pure function of the sequence ([`Layout`]), so the state after a prefix `1..=k` is
//! determined: each slot holds the newest write `≤ k` landing there, or whatever it held before the run.
//! If the secondaries hold any prefix at all, it is `1..=M` where `M` is the newest write present: a write
//! `k > M` would be in its slot (nothing newer can have overwritten it). So the checker takes `M`, computes
//! for every slot the write the prefix `1..=M` puts there, and calls every slot that does not hold it a
//! gap. Writes that a later generation has overwritten are not required: the state is the same whether or
//! not they ever reached the secondary.
//!
//! One slot may legitimately hold a torn block: the one write `M + 1` could have been in flight (never
//! acknowledged) when replication stopped. The checker accepts a corrupt or foreign block there, and only
//! there, and says so in the verdict.

use crate::block::{self, Content};
use crate::layout::{BLOCK_SIZE, Layout, Location};
use crate::nbd::{NbdAddress, NbdClient, NbdError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use tokio::io::AsyncReadExt;

/// How many gaps a verdict's `Display` spells out.
const SHOWN_GAPS: usize = 10;

/// Where a secondary image is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file (the reference replicator's secondary keeps plain files).
    File(PathBuf),
    /// An NBD export.
    Nbd(NbdAddress),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Nbd(a) => write!(f, "{a}"),
        }
    }
}

/// What one secondary holds: the non-zero 4 KiB blocks, by byte offset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Image {
    /// A name for reports (the file or the address).
    pub label: String,
    /// Every block that is not all zeros, by byte offset.
    pub blocks: BTreeMap<u64, Content>,
}

impl Image {
    /// Decodes an image held in memory.
    pub fn from_bytes(label: impl Into<String>, bytes: &[u8]) -> Self {
        let mut image = Image {
            label: label.into(),
            blocks: BTreeMap::new(),
        };
        image.add_bytes(0, bytes);
        image
    }

    fn add_bytes(&mut self, offset: u64, bytes: &[u8]) {
        for (i, chunk) in bytes.chunks(BLOCK_SIZE as usize).enumerate() {
            let content = block::decode(chunk);
            if content != Content::Zero {
                self.blocks.insert(offset + i as u64 * BLOCK_SIZE, content);
            }
        }
    }

    fn at(&self, offset: u64) -> &Content {
        self.blocks.get(&offset).unwrap_or(&Content::Zero)
    }
}

/// Errors that prevent a verdict.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// No image was given.
    #[error("no secondary images given")]
    NoImages,
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An NBD export could not be read.
    #[error("reading {address}: {source}")]
    Nbd {
        /// The export.
        address: NbdAddress,
        /// Why.
        source: NbdError,
    },
    /// Blocks of several runs are present and no run id was given.
    #[error("blocks of several runs are present ({}): name the run to check", .0.iter().map(|r| format!("{r:#x}")).collect::<Vec<_>>().join(", "))]
    AmbiguousRun(Vec<u64>),
    /// Blocks of the run disagree on the layout.
    #[error("blocks of run {run_id:#x} disagree on the layout: {a:?} and {b:?}")]
    LayoutMismatch {
        /// The run.
        run_id: u64,
        /// One layout.
        a: Layout,
        /// Another.
        b: Layout,
    },
    /// The run's layout has a different number of volumes than images were given.
    #[error(
        "run {run_id} wrote {volumes} volumes but {images} secondary images were given (give them in volume order)"
    )]
    VolumeCount {
        /// The run.
        run_id: u64,
        /// Volumes in the layout.
        volumes: u32,
        /// Images given.
        images: usize,
    },
}

/// What the caller knows about the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckOptions {
    /// The last write acknowledged before the first failed copy: the secondaries must reach it.
    pub acked_before_failure: u64,
    /// The run to check; `None` takes the only run present.
    pub run_id: Option<u64>,
}

/// What a slot holds instead of the write the prefix puts there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Found {
    /// Nothing (zeros).
    Zero,
    /// An older write of the same run (an earlier generation of the slot).
    Older {
        /// Its sequence.
        seq: u64,
    },
    /// A block of the same run that belongs in another slot.
    Elsewhere {
        /// Its sequence.
        seq: u64,
        /// Where it belongs.
        belongs: Location,
    },
    /// A block of another run.
    OtherRun {
        /// That run.
        run_id: u64,
        /// Its sequence.
        seq: u64,
    },
    /// A damaged block.
    Corrupt {
        /// Why it does not decode.
        reason: String,
    },
    /// Data that is not a workload block.
    Foreign,
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::Zero => write!(f, "zeros (never written)"),
            Found::Older { seq } => write!(f, "write {seq} (an older generation of that slot)"),
            Found::Elsewhere { seq, belongs } => {
                write!(f, "write {seq}, which belongs on {belongs}")
            }
            Found::OtherRun { run_id, seq } => {
                write!(f, "write {seq} of another run ({run_id:#x})")
            }
            Found::Corrupt { reason } => write!(f, "a damaged block ({reason})"),
            Found::Foreign => write!(f, "data that is not a workload block"),
        }
    }
}

/// The state of one write of the chain on the secondaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum LinkState {
    /// The write is in its slot.
    Present,
    /// A later write to the same slot has replaced it (normal for a long run).
    Overwritten {
        /// The write now in the slot.
        by: u64,
    },
    /// The write is not there and nothing later has replaced it.
    Missing,
}

/// One write of the chain, as evidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainLink {
    /// The write.
    pub seq: u64,
    /// Where it belongs.
    pub location: Location,
    /// Whether it is there.
    pub state: LinkState,
}

impl std::fmt::Display for ChainLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = &self.location;
        match self.state {
            LinkState::Present => {
                write!(f, "{} present (vol {} slot {})", self.seq, l.volume, l.slot)
            }
            LinkState::Overwritten { by } => {
                write!(
                    f,
                    "{} overwritten by {by} (vol {} slot {})",
                    self.seq, l.volume, l.slot
                )
            }
            LinkState::Missing => {
                write!(f, "{} MISSING (vol {} slot {})", self.seq, l.volume, l.slot)
            }
        }
    }
}

/// A write the secondaries lack although later writes, which depend on it, are present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// The missing write.
    pub missing: u64,
    /// Where it should be.
    pub location: Location,
    /// The image that should hold it.
    pub image: String,
    /// What is there instead.
    pub found: Found,
    /// The chain around it: the write before, the missing one, the next present ones and the newest.
    pub chain: Vec<ChainLink>,
}

/// A problem other than a gap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Problem {
    /// The secondaries hold no write of the run at all.
    Empty,
    /// The secondaries stop short of a write that was acknowledged before the first failed copy.
    Behind {
        /// The last write of the gap-free prefix held.
        prefix_end: u64,
        /// The write they must reach.
        required: u64,
    },
    /// A block of the run sits where the layout does not put it.
    Misplaced {
        /// Its sequence.
        seq: u64,
        /// The image it was found in.
        image: String,
        /// Its byte offset there.
        offset: u64,
        /// Where it belongs.
        belongs: Location,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Empty => write!(
                f,
                "the secondaries hold no write of the run: an empty secondary does not pass"
            ),
            Problem::Behind {
                prefix_end,
                required,
            } => write!(
                f,
                "the secondaries hold writes 1..={prefix_end} without a gap, short of write {required}, \
                 which was acknowledged before the first failed copy"
            ),
            Problem::Misplaced {
                seq,
                image,
                offset,
                belongs,
            } => {
                write!(
                    f,
                    "write {seq} was found in {image} at byte offset {offset}, but belongs on {belongs}"
                )
            }
        }
    }
}

/// One secondary's share of the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSummary {
    /// Volume index.
    pub volume: u32,
    /// The image's label.
    pub image: String,
    /// Blocks of the run in their slots.
    pub blocks: u64,
    /// The newest of them.
    pub newest: Option<u64>,
}

/// The secondaries hold exactly a prefix of the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistentReport {
    /// The run.
    pub run_id: u64,
    /// Its layout.
    pub layout: Layout,
    /// The prefix is `1..=prefix_end`.
    pub prefix_end: u64,
    /// What the caller required.
    pub acked_before_failure: u64,
    /// The slot of write `prefix_end + 1`, if it holds a torn block (that write was in flight).
    pub torn_frontier: Option<Location>,
    /// Per volume.
    pub volumes: Vec<VolumeSummary>,
}

/// The secondaries do not hold a prefix reaching the required write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InconsistentReport {
    /// The run, if any block of it was found.
    pub run_id: Option<u64>,
    /// Its layout, if known.
    pub layout: Option<Layout>,
    /// The newest write present.
    pub newest: u64,
    /// Writes `1..=contiguous_through` are all accounted for.
    pub contiguous_through: u64,
    /// What the caller required.
    pub acked_before_failure: u64,
    /// Missing writes, in sequence order, with evidence.
    pub gaps: Vec<Gap>,
    /// Other problems.
    pub problems: Vec<Problem>,
    /// Per volume.
    pub volumes: Vec<VolumeSummary>,
}

/// The checker's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "verdict")]
pub enum Verdict {
    /// The secondaries hold a gap-free prefix reaching the required write.
    Consistent(ConsistentReport),
    /// They do not.
    Inconsistent(InconsistentReport),
}

impl Verdict {
    /// Whether the check passed.
    pub fn is_consistent(&self) -> bool {
        matches!(self, Verdict::Consistent(_))
    }

    /// The end of the prefix held, when consistent.
    pub fn prefix_end(&self) -> Option<u64> {
        match self {
            Verdict::Consistent(c) => Some(c.prefix_end),
            Verdict::Inconsistent(_) => None,
        }
    }

    /// The gaps found (empty when consistent).
    pub fn gaps(&self) -> &[Gap] {
        match self {
            Verdict::Consistent(_) => &[],
            Verdict::Inconsistent(i) => &i.gaps,
        }
    }

    /// The problems other than gaps (empty when consistent).
    pub fn problems(&self) -> &[Problem] {
        match self {
            Verdict::Consistent(_) => &[],
            Verdict::Inconsistent(i) => &i.problems,
        }
    }
}

fn write_volumes(f: &mut std::fmt::Formatter<'_>, volumes: &[VolumeSummary]) -> std::fmt::Result {
    for v in volumes {
        match v.newest {
            Some(n) => writeln!(
                f,
                "  volume {} ({}): {} blocks of the run, newest write {n}",
                v.volume, v.image, v.blocks
            )?,
            None => writeln!(
                f,
                "  volume {} ({}): no block of the run",
                v.volume, v.image
            )?,
        }
    }
    Ok(())
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Consistent(c) => {
                writeln!(
                    f,
                    "CONSISTENT: the {} secondaries of run {:#x} hold exactly writes 1..={}, reaching write {} \
                     (acknowledged before the first failed copy).",
                    c.layout.volumes(),
                    c.run_id,
                    c.prefix_end,
                    c.acked_before_failure
                )?;
                if let Some(t) = c.torn_frontier {
                    writeln!(
                        f,
                        "  {t} holds a torn block: write {} was in flight, never acknowledged.",
                        c.prefix_end + 1
                    )?;
                }
                write_volumes(f, &c.volumes)
            }
            Verdict::Inconsistent(i) => {
                match i.run_id {
                    Some(run) => writeln!(
                        f,
                        "INCONSISTENT: run {run:#x}: writes 1..={} are all accounted for; the newest write present is {}; \
                         {} gap(s), {} other problem(s).",
                        i.contiguous_through,
                        i.newest,
                        i.gaps.len(),
                        i.problems.len()
                    )?,
                    None => writeln!(f, "INCONSISTENT: no block of the run was found.")?,
                }
                for g in i.gaps.iter().take(SHOWN_GAPS) {
                    writeln!(
                        f,
                        "  gap: write {} is missing from {} of {}; that slot holds {}.",
                        g.missing, g.location, g.image, g.found
                    )?;
                    let chain: Vec<String> = g.chain.iter().map(ToString::to_string).collect();
                    writeln!(f, "       chain: {}", chain.join(" -> "))?;
                    if let Some(later) = g
                        .chain
                        .iter()
                        .find(|l| l.seq > g.missing && l.state == LinkState::Present)
                    {
                        writeln!(
                            f,
                            "       write {} was issued only after write {} was acknowledged, yet it is on the secondaries and {} is not.",
                            later.seq, g.missing, g.missing
                        )?;
                    }
                }
                if i.gaps.len() > SHOWN_GAPS {
                    let last = i.gaps.last().map_or(0, |g| g.missing);
                    writeln!(
                        f,
                        "  ... and {} more gaps, up to write {last}",
                        i.gaps.len() - SHOWN_GAPS
                    )?;
                }
                for p in &i.problems {
                    writeln!(f, "  problem: {p}")?;
                }
                write_volumes(f, &i.volumes)
            }
        }
    }
}

/// Reads one secondary image.
pub async fn scan(source: &Source) -> Result<Image, CheckError> {
    const CHUNK: usize = 1 << 20;
    let mut image = Image {
        label: source.to_string(),
        blocks: BTreeMap::new(),
    };
    let mut buf = vec![0u8; CHUNK];
    match source {
        Source::File(path) => {
            let io = |source| CheckError::Io {
                path: path.clone(),
                source,
            };
            let mut file = tokio::fs::File::open(path).await.map_err(io)?;
            let mut offset = 0u64;
            loop {
                // Fill the chunk fully (short reads happen) so blocks stay aligned.
                let mut filled = 0;
                while filled < CHUNK {
                    let n = file.read(&mut buf[filled..]).await.map_err(io)?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                image.add_bytes(offset, &buf[..filled]);
                offset += filled as u64;
                if filled < CHUNK {
                    break;
                }
            }
        }
        Source::Nbd(address) => {
            let nbd = |source| CheckError::Nbd {
                address: address.clone(),
                source,
            };
            let mut client = NbdClient::connect(address).await.map_err(nbd)?;
            let size = client.size();
            let mut offset = 0u64;
            while offset < size {
                let n = (size - offset).min(CHUNK as u64) as usize;
                client.read(offset, &mut buf[..n]).await.map_err(nbd)?;
                image.add_bytes(offset, &buf[..n]);
                offset += n as u64;
            }
            // The data is read; a failed goodbye does not change it.
            if let Err(e) = client.disconnect().await {
                tracing::debug!(%address, error = %e, "NBD disconnect failed after reading");
            }
        }
    }
    Ok(image)
}

/// Reads every source (in volume order) and checks them.
pub async fn check_sources(
    sources: &[Source],
    options: &CheckOptions,
) -> Result<Verdict, CheckError> {
    let mut images = Vec::with_capacity(sources.len());
    for s in sources {
        images.push(scan(s).await?);
    }
    check(&images, options)
}

/// Checks the secondaries, given in volume order.
pub fn check(images: &[Image], options: &CheckOptions) -> Result<Verdict, CheckError> {
    if images.is_empty() {
        return Err(CheckError::NoImages);
    }
    let empty = |images: &[Image]| {
        Verdict::Inconsistent(InconsistentReport {
            run_id: options.run_id,
            layout: None,
            newest: 0,
            contiguous_through: 0,
            acked_before_failure: options.acked_before_failure,
            gaps: Vec::new(),
            problems: vec![Problem::Empty],
            volumes: images
                .iter()
                .enumerate()
                .map(|(v, i)| VolumeSummary {
                    volume: v as u32,
                    image: i.label.clone(),
                    blocks: 0,
                    newest: None,
                })
                .collect(),
        })
    };

    // Which run, which layout.
    let headers = || {
        images.iter().enumerate().flat_map(|(v, img)| {
            img.blocks.iter().filter_map(move |(&off, c)| match c {
                Content::Block(h) => Some((v, off, *h)),
                _ => None,
            })
        })
    };
    let run_id = match options.run_id {
        Some(r) => r,
        None => {
            let runs: BTreeSet<u64> = headers().map(|(_, _, h)| h.run_id).collect();
            match runs.len() {
                0 => return Ok(empty(images)),
                1 => runs.into_iter().next().unwrap_or_default(),
                _ => return Err(CheckError::AmbiguousRun(runs.into_iter().collect())),
            }
        }
    };
    let mut layout: Option<Layout> = None;
    for (_, _, h) in headers().filter(|(_, _, h)| h.run_id == run_id) {
        match layout {
            None => layout = Some(h.layout),
            Some(l) if l != h.layout => {
                return Err(CheckError::LayoutMismatch {
                    run_id,
                    a: l,
                    b: h.layout,
                });
            }
            Some(_) => {}
        }
    }
    let Some(layout) = layout else {
        return Ok(empty(images));
    };
    if images.len() != layout.volumes() as usize {
        return Err(CheckError::VolumeCount {
            run_id,
            volumes: layout.volumes(),
            images: images.len(),
        });
    }

    // Blocks of the run in their place, and misplaced ones.
    let mut problems = Vec::new();
    let mut newest = 0u64;
    let mut present = BTreeSet::new();
    let mut volumes: Vec<VolumeSummary> = images
        .iter()
        .enumerate()
        .map(|(v, i)| VolumeSummary {
            volume: v as u32,
            image: i.label.clone(),
            blocks: 0,
            newest: None,
        })
        .collect();
    for (v, off, h) in headers().filter(|(_, _, h)| h.run_id == run_id) {
        let belongs = layout.locate(h.seq);
        if belongs.volume as usize == v && belongs.offset == off {
            newest = newest.max(h.seq);
            present.insert(h.seq);
            let s = &mut volumes[v];
            s.blocks += 1;
            s.newest = s.newest.max(Some(h.seq));
        } else {
            problems.push(Problem::Misplaced {
                seq: h.seq,
                image: images[v].label.clone(),
                offset: off,
                belongs,
            });
        }
    }
    if newest == 0 {
        let mut verdict = empty(images);
        if let Verdict::Inconsistent(r) = &mut verdict {
            r.run_id = Some(run_id);
            r.layout = Some(layout);
            r.problems.extend(problems);
        }
        return Ok(verdict);
    }

    // Every slot against the prefix 1..=newest.
    let content_at = |loc: Location| images[loc.volume as usize].at(loc.offset);
    let link = |seq: u64| {
        let location = layout.locate(seq);
        let state = match content_at(location) {
            Content::Block(h) if h.run_id == run_id && h.seq == seq => LinkState::Present,
            Content::Block(h)
                if h.run_id == run_id && h.seq > seq && layout.locate(h.seq) == location =>
            {
                LinkState::Overwritten { by: h.seq }
            }
            _ => LinkState::Missing,
        };
        ChainLink {
            seq,
            location,
            state,
        }
    };
    let frontier = layout.locate(newest + 1);
    let mut torn_frontier = None;
    let mut missing: Vec<(u64, Location, Found)> = Vec::new();
    for loc in layout.locations() {
        let Some(expected) = layout.newest_at_or_before(loc.volume, loc.slot, newest) else {
            continue;
        };
        let found = match content_at(loc) {
            Content::Block(h) if h.run_id == run_id && h.seq == expected => continue,
            Content::Block(h)
                if h.run_id == run_id && h.seq < expected && layout.locate(h.seq) == loc =>
            {
                Found::Older { seq: h.seq }
            }
            Content::Block(h) if h.run_id == run_id => Found::Elsewhere {
                seq: h.seq,
                belongs: layout.locate(h.seq),
            },
            Content::Block(h) => Found::OtherRun {
                run_id: h.run_id,
                seq: h.seq,
            },
            Content::Corrupt(why) => Found::Corrupt {
                reason: why.to_string(),
            },
            Content::Foreign => Found::Foreign,
            Content::Zero => Found::Zero,
        };
        if loc == frontier && matches!(found, Found::Corrupt { .. } | Found::Foreign) {
            torn_frontier = Some(loc);
            continue;
        }
        missing.push((expected, loc, found));
    }
    missing.sort_by_key(|(seq, _, _)| *seq);

    // Evidence: the chain around each gap.
    let gaps: Vec<Gap> = missing
        .into_iter()
        .map(|(seq, location, found)| {
            let mut seqs: Vec<u64> = Vec::new();
            if seq > 1 {
                seqs.push(seq - 1);
            }
            seqs.push(seq);
            seqs.extend(present.range(seq + 1..).take(2));
            if !seqs.contains(&newest) {
                seqs.push(newest);
            }
            Gap {
                missing: seq,
                location,
                image: images[location.volume as usize].label.clone(),
                found,
                chain: seqs.into_iter().map(link).collect(),
            }
        })
        .collect();

    let contiguous_through = gaps.first().map_or(newest, |g| g.missing - 1);
    if contiguous_through < options.acked_before_failure {
        problems.push(Problem::Behind {
            prefix_end: contiguous_through,
            required: options.acked_before_failure,
        });
    }
    if gaps.is_empty() && problems.is_empty() {
        return Ok(Verdict::Consistent(ConsistentReport {
            run_id,
            layout,
            prefix_end: newest,
            acked_before_failure: options.acked_before_failure,
            torn_frontier,
            volumes,
        }));
    }
    Ok(Verdict::Inconsistent(InconsistentReport {
        run_id: Some(run_id),
        layout: Some(layout),
        newest,
        contiguous_through,
        acked_before_failure: options.acked_before_failure,
        gaps,
        problems,
        volumes,
    }))
}
