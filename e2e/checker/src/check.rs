//! The consistency checker: do the secondaries, taken together, hold a state the application could have
//! seen at one instant?
//!
//! The core ([`check`]) is pure: it takes [`Image`]s (what each secondary holds, block by block) and
//! returns a [`Verdict`]. [`scan`] reads images from files or NBD exports.
//!
//! What is checked, for the workload's lanes (each a strict chain of writes, see [`crate::layout`]):
//! 1. every lane's writes on the secondaries form a gap-free prefix `1..=M` of the lane;
//! 2. every write present depends only on writes present: a block records, for every lane, the last
//!    write acknowledged when it was issued, and that write must be within that lane's prefix;
//! 3. each lane's prefix reaches the write the caller says was acknowledged before the first failed copy;
//! 4. the secondaries are not empty.
//!
//! # Why it is sound with overwrites
//! Placement is a pure function of (lane, sequence) ([`Layout`]), so the state after a lane's prefix
//! `1..=k` is determined: each of the lane's slots holds its newest write `≤ k` landing there, or what
//! it held before the run. If a lane's slots hold any prefix at all, it is `1..=M` where `M` is the
//! lane's newest write present: a write `k > M` would be in its slot (nothing newer can have overwritten
//! it). So the checker takes `M`, computes for every slot the write the prefix `1..=M` puts there, and
//! calls every slot that does not hold it a gap. Writes that a later generation has overwritten are not
//! required: the state is the same whether or not they ever reached the secondary.
//!
//! One slot per lane may legitimately hold a torn block: the lane's write `M + 1` could have been in
//! flight (never acknowledged) when replication stopped. The checker accepts a corrupt or foreign block
//! there, and only there, and says so in the verdict.

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
    #[error("blocks of several runs are present ({}): name the run to check", hex_list(.0))]
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
    /// More lanes were given acknowledged writes than the run has.
    #[error("run {run_id:#x} has {lanes} lanes, but acknowledged writes were given for {given}")]
    LaneCount {
        /// The run.
        run_id: u64,
        /// Lanes in the layout.
        lanes: u32,
        /// Entries given.
        given: usize,
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

fn hex_list(runs: &[u64]) -> String {
    runs.iter()
        .map(|r| format!("{r:#x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the caller knows about the run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckOptions {
    /// Per lane, the last write acknowledged before the first failed copy: the secondaries must reach
    /// it. Missing entries require nothing.
    pub acked_before_failure: Vec<u64>,
    /// The run to check; `None` takes the only run present.
    pub run_id: Option<u64>,
}

impl CheckOptions {
    /// For a single-lane run: the secondaries must reach write `acked`.
    pub fn new(acked: u64) -> Self {
        Self {
            acked_before_failure: vec![acked],
            run_id: None,
        }
    }

    /// Per lane, the writes the secondaries must reach.
    pub fn lanes(acked: Vec<u64>) -> Self {
        Self {
            acked_before_failure: acked,
            run_id: None,
        }
    }

    /// Checks only run `run_id`.
    pub fn run(mut self, run_id: u64) -> Self {
        self.run_id = Some(run_id);
        self
    }

    fn required(&self, lane: u32) -> u64 {
        self.acked_before_failure
            .get(lane as usize)
            .copied()
            .unwrap_or(0)
    }
}

/// What a slot holds instead of the write the prefix puts there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Found {
    /// Nothing (zeros).
    Zero,
    /// An older write of the same lane (an earlier generation of the slot).
    Older {
        /// Its sequence.
        seq: u64,
    },
    /// A block of the run that belongs in another place.
    Elsewhere {
        /// Its lane.
        lane: u32,
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
            Found::Older { seq } => write!(f, "write {seq}, an older generation of that slot"),
            Found::Elsewhere { lane, seq, belongs } => {
                write!(f, "write {seq} of lane {lane}, which belongs on {belongs}")
            }
            Found::OtherRun { run_id, seq } => {
                write!(f, "write {seq} of another run ({run_id:#x})")
            }
            Found::Corrupt { reason } => write!(f, "a damaged block ({reason})"),
            Found::Foreign => write!(f, "data that is not a workload block"),
        }
    }
}

/// The state of one write of a lane on the secondaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum LinkState {
    /// The write is in its slot.
    Present,
    /// A later write of the lane has replaced it in its slot (normal for a long run).
    Overwritten {
        /// The write now in the slot.
        by: u64,
    },
    /// The write is not there and nothing later has replaced it.
    Missing,
}

/// One write of a lane's chain, as evidence.
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

/// A write the secondaries lack although a later write of its lane, which depends on it, is present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// The lane.
    pub lane: u32,
    /// The missing write.
    pub missing: u64,
    /// Where it should be.
    pub location: Location,
    /// The image that should hold it.
    pub image: String,
    /// What is there instead.
    pub found: Found,
    /// The lane's chain around it: the write before, the missing one, the next present ones, the newest.
    pub chain: Vec<ChainLink>,
}

/// A problem other than a gap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Problem {
    /// The secondaries hold no write of the run at all.
    Empty,
    /// A lane stops short of a write that was acknowledged before the first failed copy.
    Behind {
        /// The lane.
        lane: u32,
        /// The last write of the lane's gap-free prefix held.
        prefix_end: u64,
        /// The write it must reach.
        required: u64,
    },
    /// A write is present although a write of another lane it depends on is not.
    Dependency {
        /// The lane of the present write.
        lane: u32,
        /// The present write (the earliest of its lane with this problem).
        seq: u64,
        /// Where it is.
        location: Location,
        /// The lane it depends on.
        on_lane: u32,
        /// The write of that lane acknowledged before it was issued.
        on_seq: u64,
        /// How far that lane's gap-free prefix reaches.
        held_through: u64,
        /// Where that lane's first missing write belongs.
        first_missing: Location,
    },
    /// A block of the run sits where the layout does not put it.
    Misplaced {
        /// Its lane.
        lane: u32,
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
            Problem::Empty => {
                write!(
                    f,
                    "the secondaries hold no write of the run: an empty secondary does not pass"
                )
            }
            Problem::Behind {
                lane,
                prefix_end,
                required,
            } => write!(
                f,
                "lane {lane}: the secondaries hold writes 1..={prefix_end} without a gap, short of write \
                 {required}, which was acknowledged before the first failed copy"
            ),
            Problem::Dependency {
                lane,
                seq,
                location,
                on_lane,
                on_seq,
                held_through,
                first_missing,
            } => write!(
                f,
                "write {seq} of lane {lane} is present ({location}), but it was issued after write {on_seq} of \
                 lane {on_lane} was acknowledged, and lane {on_lane} is held only through write {held_through} \
                 (write {} belongs on {first_missing})",
                held_through + 1
            ),
            Problem::Misplaced {
                lane,
                seq,
                image,
                offset,
                belongs,
            } => write!(
                f,
                "write {seq} of lane {lane} was found in {image} at byte offset {offset}, but belongs on {belongs}"
            ),
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
}

/// The secondaries hold a consistent state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistentReport {
    /// The run.
    pub run_id: u64,
    /// Its layout.
    pub layout: Layout,
    /// Per lane, the prefix held is `1..=prefix_ends[lane]`.
    pub prefix_ends: Vec<u64>,
    /// What the caller required, per lane.
    pub acked_before_failure: Vec<u64>,
    /// Slots holding a torn block: the lane's next write was in flight.
    pub torn: Vec<Location>,
    /// Per volume.
    pub volumes: Vec<VolumeSummary>,
}

/// The secondaries do not hold a consistent state reaching the required writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InconsistentReport {
    /// The run, if any block of it was found.
    pub run_id: Option<u64>,
    /// Its layout, if known.
    pub layout: Option<Layout>,
    /// Per lane, the newest write present.
    pub newest: Vec<u64>,
    /// Per lane, writes `1..=contiguous_through[lane]` are all accounted for.
    pub contiguous_through: Vec<u64>,
    /// What the caller required, per lane.
    pub acked_before_failure: Vec<u64>,
    /// Missing writes, by lane and sequence, with evidence.
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
    /// The secondaries hold a gap-free prefix of every lane, with every dependency present, reaching the
    /// required writes.
    Consistent(ConsistentReport),
    /// They do not.
    Inconsistent(InconsistentReport),
}

impl Verdict {
    /// Whether the check passed.
    pub fn is_consistent(&self) -> bool {
        matches!(self, Verdict::Consistent(_))
    }

    /// The end of lane 0's prefix (the whole chain of a single-lane run), when consistent.
    pub fn prefix_end(&self) -> Option<u64> {
        self.prefix_ends().and_then(|p| p.first().copied())
    }

    /// Every lane's prefix end, when consistent.
    pub fn prefix_ends(&self) -> Option<&[u64]> {
        match self {
            Verdict::Consistent(c) => Some(&c.prefix_ends),
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
        writeln!(
            f,
            "  volume {} ({}): {} blocks of the run",
            v.volume, v.image, v.blocks
        )?;
    }
    Ok(())
}

fn ranges(ends: &[u64]) -> String {
    match ends {
        [] => "nothing".to_owned(),
        [one] => format!("writes 1..={one}"),
        many => many
            .iter()
            .enumerate()
            .map(|(l, e)| format!("lane {l}: 1..={e}"))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Consistent(c) => {
                writeln!(
                    f,
                    "CONSISTENT: the {} secondaries of run {:#x} hold exactly {}, with every dependency present; \
                     required (acknowledged before the first failed copy): {}.",
                    c.layout.volumes(),
                    c.run_id,
                    ranges(&c.prefix_ends),
                    ranges(&c.acked_before_failure).replace("1..=", "")
                )?;
                for t in &c.torn {
                    let next = c.prefix_ends.get(t.lane as usize).map_or(0, |e| e + 1);
                    writeln!(
                        f,
                        "  {t} holds a torn block: write {next} of lane {} was in flight, never acknowledged.",
                        t.lane
                    )?;
                }
                write_volumes(f, &c.volumes)
            }
            Verdict::Inconsistent(i) => {
                match i.run_id {
                    Some(run) => writeln!(
                        f,
                        "INCONSISTENT: run {run:#x}: accounted for without a gap: {}; newest present: {}; \
                         {} gap(s), {} other problem(s).",
                        ranges(&i.contiguous_through),
                        ranges(&i.newest).replace("1..=", ""),
                        i.gaps.len(),
                        i.problems.len()
                    )?,
                    None => writeln!(f, "INCONSISTENT: no block of the run was found.")?,
                }
                let lanes = i.layout.map_or(1, |l| l.lanes());
                for g in i.gaps.iter().take(SHOWN_GAPS) {
                    let of_lane = if lanes > 1 {
                        format!(" of lane {}", g.lane)
                    } else {
                        String::new()
                    };
                    writeln!(
                        f,
                        "  gap: write {}{of_lane} is missing from {} of {}; that slot holds {}.",
                        g.missing, g.location, g.image, g.found
                    )?;
                    let chain: Vec<String> = g.chain.iter().map(ToString::to_string).collect();
                    writeln!(f, "       chain{of_lane}: {}", chain.join(" -> "))?;
                    if let Some(later) = g
                        .chain
                        .iter()
                        .find(|l| l.seq > g.missing && l.state == LinkState::Present)
                    {
                        writeln!(
                            f,
                            "       write {} was issued only after write {} was acknowledged, yet it is on the \
                             secondaries and {} is not.",
                            later.seq, g.missing, g.missing
                        )?;
                    }
                }
                if i.gaps.len() > SHOWN_GAPS {
                    writeln!(f, "  ... and {} more gaps", i.gaps.len() - SHOWN_GAPS)?;
                }
                for p in &i.problems {
                    writeln!(f, "  problem: {p}")?;
                }
                write_volumes(f, &i.volumes)
            }
        }
    }
}

/// Reads a source front to back.
enum Reader<'a> {
    File {
        path: &'a std::path::Path,
        file: tokio::fs::File,
    },
    Nbd {
        address: &'a NbdAddress,
        client: NbdClient,
        offset: u64,
    },
}

impl<'a> Reader<'a> {
    async fn open(source: &'a Source) -> Result<Self, CheckError> {
        match source {
            Source::File(path) => {
                let file = tokio::fs::File::open(path)
                    .await
                    .map_err(|source| CheckError::Io {
                        path: path.clone(),
                        source,
                    })?;
                Ok(Reader::File { path, file })
            }
            Source::Nbd(address) => {
                let client =
                    NbdClient::connect(address)
                        .await
                        .map_err(|source| CheckError::Nbd {
                            address: address.clone(),
                            source,
                        })?;
                Ok(Reader::Nbd {
                    address,
                    client,
                    offset: 0,
                })
            }
        }
    }

    /// Fills `buf` with the next bytes; fewer only at the end, 0 after it.
    async fn next(&mut self, buf: &mut [u8]) -> Result<usize, CheckError> {
        match self {
            Reader::File { path, file } => {
                // Short reads happen: fill the buffer so blocks stay aligned.
                let mut filled = 0;
                while filled < buf.len() {
                    let n =
                        file.read(&mut buf[filled..])
                            .await
                            .map_err(|source| CheckError::Io {
                                path: path.to_path_buf(),
                                source,
                            })?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                Ok(filled)
            }
            Reader::Nbd {
                address,
                client,
                offset,
            } => {
                let n = (client.size() - *offset).min(buf.len() as u64) as usize;
                client
                    .read(*offset, &mut buf[..n])
                    .await
                    .map_err(|source| CheckError::Nbd {
                        address: (*address).clone(),
                        source,
                    })?;
                *offset += n as u64;
                Ok(n)
            }
        }
    }

    async fn close(self) {
        if let Reader::Nbd {
            address, client, ..
        } = self
        {
            // The data is read; a failed goodbye does not change it.
            if let Err(e) = client.disconnect().await {
                tracing::debug!(%address, error = %e, "NBD disconnect failed after reading");
            }
        }
    }
}

const CHUNK: usize = 1 << 20;

/// Reads one secondary image.
pub async fn scan(source: &Source) -> Result<Image, CheckError> {
    let mut image = Image {
        label: source.to_string(),
        blocks: BTreeMap::new(),
    };
    let mut buf = vec![0u8; CHUNK];
    let mut reader = Reader::open(source).await?;
    let mut offset = 0u64;
    loop {
        let n = reader.next(&mut buf).await?;
        if n == 0 {
            break;
        }
        image.add_bytes(offset, &buf[..n]);
        offset += n as u64;
    }
    reader.close().await;
    Ok(image)
}

/// Compares two images byte for byte (e.g. a primary and its secondary after a resync): the offset of
/// the first byte that differs, or where the shorter one ends; `None` when they are identical.
pub async fn first_difference(a: &Source, b: &Source) -> Result<Option<u64>, CheckError> {
    let (mut ra, mut rb) = (Reader::open(a).await?, Reader::open(b).await?);
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut offset = 0u64;
    let found = loop {
        let na = ra.next(&mut ba).await?;
        let nb = rb.next(&mut bb).await?;
        if let Some(i) = ba[..na.min(nb)]
            .iter()
            .zip(&bb[..na.min(nb)])
            .position(|(x, y)| x != y)
        {
            break Some(offset + i as u64);
        }
        if na != nb {
            break Some(offset + na.min(nb) as u64);
        }
        if na == 0 {
            break None;
        }
        offset += na as u64;
    };
    ra.close().await;
    rb.close().await;
    Ok(found)
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
    let summaries = |counts: &[u64]| -> Vec<VolumeSummary> {
        images
            .iter()
            .enumerate()
            .map(|(v, i)| VolumeSummary {
                volume: v as u32,
                image: i.label.clone(),
                blocks: counts.get(v).copied().unwrap_or(0),
            })
            .collect()
    };
    let empty = |run_id, layout, problems: Vec<Problem>| {
        let mut all = vec![Problem::Empty];
        all.extend(problems);
        Verdict::Inconsistent(InconsistentReport {
            run_id,
            layout,
            newest: Vec::new(),
            contiguous_through: Vec::new(),
            acked_before_failure: options.acked_before_failure.clone(),
            gaps: Vec::new(),
            problems: all,
            volumes: summaries(&[]),
        })
    };

    // Which run, which layout.
    let headers = || {
        images.iter().enumerate().flat_map(|(v, img)| {
            img.blocks.iter().filter_map(move |(&off, c)| match c {
                Content::Block(h) => Some((v, off, h)),
                _ => None,
            })
        })
    };
    let run_id = match options.run_id {
        Some(r) => r,
        None => {
            let runs: BTreeSet<u64> = headers().map(|(_, _, h)| h.run_id).collect();
            match runs.len() {
                0 => return Ok(empty(None, None, Vec::new())),
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
        return Ok(empty(Some(run_id), None, Vec::new()));
    };
    if images.len() != layout.volumes() as usize {
        return Err(CheckError::VolumeCount {
            run_id,
            volumes: layout.volumes(),
            images: images.len(),
        });
    }
    let lanes = layout.lanes() as usize;
    if options
        .acked_before_failure
        .iter()
        .skip(lanes)
        .any(|&a| a > 0)
    {
        return Err(CheckError::LaneCount {
            run_id,
            lanes: layout.lanes(),
            given: options.acked_before_failure.len(),
        });
    }

    // Blocks of the run in their place, and misplaced ones.
    let mut problems = Vec::new();
    let mut newest = vec![0u64; lanes];
    let mut present: BTreeMap<(u32, u64), &block::BlockHeader> = BTreeMap::new();
    let mut counts = vec![0u64; images.len()];
    for (v, off, h) in headers().filter(|(_, _, h)| h.run_id == run_id) {
        let belongs = layout.locate(h.lane, h.seq);
        if belongs.volume as usize == v && belongs.offset == off {
            newest[h.lane as usize] = newest[h.lane as usize].max(h.seq);
            present.insert((h.lane, h.seq), h);
            counts[v] += 1;
        } else {
            problems.push(Problem::Misplaced {
                lane: h.lane,
                seq: h.seq,
                image: images[v].label.clone(),
                offset: off,
                belongs,
            });
        }
    }
    if newest.iter().all(|&n| n == 0) {
        return Ok(empty(Some(run_id), Some(layout), problems));
    }

    // Every slot against its lane's prefix 1..=newest.
    let content_at = |loc: Location| images[loc.volume as usize].at(loc.offset);
    let link = |lane: u32, seq: u64| {
        let location = layout.locate(lane, seq);
        let state = match content_at(location) {
            Content::Block(h) if h.run_id == run_id && h.lane == lane && h.seq == seq => {
                LinkState::Present
            }
            Content::Block(h)
                if h.run_id == run_id
                    && h.lane == lane
                    && h.seq > seq
                    && layout.locate(lane, h.seq) == location =>
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
    let mut torn = Vec::new();
    let mut missing: Vec<(u32, u64, Location, Found)> = Vec::new();
    for loc in layout.locations() {
        let lane_newest = newest[loc.lane as usize];
        let Some(expected) =
            layout.newest_at_or_before(loc.lane, loc.volume, loc.slot, lane_newest)
        else {
            continue;
        };
        let found = match content_at(loc) {
            Content::Block(h) if h.run_id == run_id && h.lane == loc.lane && h.seq == expected => {
                continue;
            }
            Content::Block(h)
                if h.run_id == run_id
                    && h.lane == loc.lane
                    && h.seq < expected
                    && layout.locate(h.lane, h.seq) == loc =>
            {
                Found::Older { seq: h.seq }
            }
            Content::Block(h) if h.run_id == run_id => Found::Elsewhere {
                lane: h.lane,
                seq: h.seq,
                belongs: layout.locate(h.lane, h.seq),
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
        let frontier = layout.locate(loc.lane, lane_newest + 1);
        if loc == frontier && matches!(found, Found::Corrupt { .. } | Found::Foreign) {
            torn.push(loc);
            continue;
        }
        missing.push((loc.lane, expected, loc, found));
    }
    missing.sort_by_key(|(lane, seq, _, _)| (*lane, *seq));

    // Evidence: each lane's chain around each gap.
    let gaps: Vec<Gap> = missing
        .into_iter()
        .map(|(lane, seq, location, found)| {
            let mut seqs: Vec<u64> = Vec::new();
            if seq > 1 {
                seqs.push(seq - 1);
            }
            seqs.push(seq);
            seqs.extend(
                present
                    .range((lane, seq + 1)..(lane, u64::MAX))
                    .map(|(&(_, s), _)| s)
                    .take(2),
            );
            let lane_newest = newest[lane as usize];
            if !seqs.contains(&lane_newest) {
                seqs.push(lane_newest);
            }
            Gap {
                lane,
                missing: seq,
                location,
                image: images[location.volume as usize].label.clone(),
                found,
                chain: seqs.into_iter().map(|s| link(lane, s)).collect(),
            }
        })
        .collect();

    let mut contiguous_through = newest.clone();
    for g in &gaps {
        let c = &mut contiguous_through[g.lane as usize];
        *c = (*c).min(g.missing - 1);
    }

    // Dependencies across lanes: the earliest present write of each lane that depends on a missing one.
    for l in 0..layout.lanes() {
        for j in (0..layout.lanes()).filter(|&j| j != l) {
            let held = contiguous_through[j as usize];
            let violation = present
                .range((l, 0)..=(l, u64::MAX))
                .map(|(_, h)| *h)
                .find(|h| h.deps.get(j as usize).is_some_and(|&d| d > held));
            if let Some(h) = violation {
                problems.push(Problem::Dependency {
                    lane: l,
                    seq: h.seq,
                    location: layout.locate(l, h.seq),
                    on_lane: j,
                    on_seq: h.deps[j as usize],
                    held_through: held,
                    first_missing: layout.locate(j, held + 1),
                });
            }
        }
    }

    for l in 0..layout.lanes() {
        let required = options.required(l);
        let prefix_end = contiguous_through[l as usize];
        if prefix_end < required {
            problems.push(Problem::Behind {
                lane: l,
                prefix_end,
                required,
            });
        }
    }
    if gaps.is_empty() && problems.is_empty() {
        return Ok(Verdict::Consistent(ConsistentReport {
            run_id,
            layout,
            prefix_ends: newest,
            acked_before_failure: options.acked_before_failure.clone(),
            torn,
            volumes: summaries(&counts),
        }));
    }
    Ok(Verdict::Inconsistent(InconsistentReport {
        run_id: Some(run_id),
        layout: Some(layout),
        newest,
        contiguous_through,
        acked_before_failure: options.acked_before_failure.clone(),
        gaps,
        problems,
        volumes: summaries(&counts),
    }))
}
