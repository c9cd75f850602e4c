//! Fuzz targets for the replication link: arbitrary bytes, split anywhere, to the frame decoder; and a
//! real secondary on 127.0.0.1 fed hostile streams (valid frames with hostile fields — sequence numbers
//! at the edges, writes and trims past the end, frames only a secondary sends, a second hello, kept-image
//! requests — and the same bytes corrupted, truncated or followed by garbage).
//!
//! What must hold: no panic on any thread; every answer is a frame a primary understands (Welcome, Ack,
//! Error); acknowledgements never run past what was sent; an acknowledged write is in the secondary's
//! file and nothing else is (no write outside the volume, no file outside the directory); and the
//! secondary keeps serving a well-behaved primary afterwards. Cases: `LOCKSTEP_FUZZ_CASES`
//! (`scripts/fuzz.sh` runs them long).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::*;
use futures::{SinkExt, StreamExt};
use lockstep_api::fuzz::config as fuzz_config;
use lockstep_replicator::secondary::{Secondary, SecondaryConfig};
use lockstep_replicator::wire::{Frame, FrameCodec};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder, Framed};

// ---- The decoder, in-process ---------------------------------------------------------------------

proptest! {
    #![proptest_config(fuzz_config(2_000))]

    /// Valid frames, corrupted at a few bytes and fed in arbitrary pieces: every piece decodes to frames,
    /// "more needed" or a clean error, never a panic; and the frames decoded are the same however the
    /// bytes were split.
    #[test]
    fn corrupted_frame_streams_decode_cleanly_however_they_are_split(
        frames in proptest::collection::vec(frame(), 1..6),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = BytesMut::new();
        for frame in &frames {
            let _ = FrameCodec.encode(frame, &mut bytes);
        }
        let mut bytes = bytes.to_vec();
        for (at, value) in &flips {
            if !bytes.is_empty() {
                let at = at.index(bytes.len());
                bytes[at] = *value;
            }
        }
        bytes.extend_from_slice(&tail);
        let whole = decode_in_pieces(&bytes, &[]);
        let mut cuts: Vec<usize> = cuts.iter().map(|cut| cut.index(bytes.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(decode_in_pieces(&bytes, &cuts), whole);
    }
}

/// The frames decoded from `bytes` delivered in pieces ending at `cuts`, and the error that ended them.
fn decode_in_pieces(bytes: &[u8], cuts: &[usize]) -> (Vec<Frame>, Option<String>) {
    let mut codec = FrameCodec;
    let mut buffer = BytesMut::new();
    let mut frames = Vec::new();
    let mut start = 0;
    for end in cuts.iter().copied().chain([bytes.len()]) {
        buffer.extend_from_slice(&bytes[start..end.max(start)]);
        start = end.max(start);
        loop {
            match codec.decode(&mut buffer) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(error) => return (frames, Some(error.to_string())),
            }
        }
    }
    (frames, None)
}

// ---- Hostile streams ---------------------------------------------------------------------------------

fn seq() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0u64..4, 1 => Just(u64::MAX - 1), 1 => Just(u64::MAX), 1 => any::<u64>()]
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => (0u64..=16).prop_map(|blocks| blocks * 512),
        2 => 0u64..9000,
        1 => Just(u64::MAX),
        1 => Just(i64::MAX as u64 + 1),
    ]
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0u64..9000, 1 => Just(u64::MAX - 8), 1 => any::<u64>()]
}

fn volume_name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => Just("case".to_owned()),
        1 => "[a-z0-9._-]{1,12}".prop_filter("not hidden", |name| !name.starts_with('.')),
    ]
}

/// Any frame, with hostile fields; the encoder refuses what the decoder would (bad names, huge
/// payloads), so those bytes are made by corruption instead.
fn frame() -> impl Strategy<Value = Frame> {
    let epoch = prop_oneof![Just(0u64), Just(1), Just(u64::MAX), any::<u64>()];
    prop_oneof![
        2 => (volume_name(), size(), seq(), proptest::option::of(epoch.clone()), proptest::option::of(epoch.clone()))
            .prop_map(|(volume, size, first_seq, keep, drop_image)| Frame::Hello { volume, size, first_seq, keep, drop_image }),
        8 => (seq(), offset(), proptest::collection::vec(any::<u8>(), 0..1500))
            .prop_map(|(seq, offset, data)| Frame::Write { seq, offset, data: data.into() }),
        2 => (seq(), offset(), prop_oneof![0u32..9000, Just(u32::MAX)])
            .prop_map(|(seq, offset, length)| Frame::Trim { seq, offset, length }),
        1 => epoch.prop_map(|epoch| Frame::DropImage { epoch }),
        1 => (seq(), proptest::option::of(any::<u64>())).prop_map(|(next_seq, kept)| Frame::Welcome { next_seq, kept }),
        1 => seq().prop_map(|seq| Frame::Ack { seq }),
        1 => (seq(), "\\PC{0,40}").prop_map(|(seq, message)| Frame::Error { seq, message }),
    ]
}

/// A stream a hostile primary sends: mostly a hello and frames whose sequence numbers follow it (so
/// they get past the first check), sometimes anything.
#[derive(Debug, Clone)]
struct Hostile {
    hello: Option<Frame>,
    frames: Vec<Frame>,
    /// Sequence numbers follow the hello's (else they are as generated).
    in_order: bool,
    /// Bytes overwritten after encoding, and garbage appended: the stream is then not checked against
    /// a model, only for clean answers.
    flips: Vec<(prop::sample::Index, u8)>,
    tail: Vec<u8>,
}

fn hostile() -> impl Strategy<Value = Hostile> {
    let hello = (size(), seq(), proptest::option::weighted(0.2, 0u64..3)).prop_map(
        |(size, first_seq, keep)| Frame::Hello {
            volume: "case".into(),
            size,
            first_seq,
            keep,
            drop_image: None,
        },
    );
    (
        proptest::option::weighted(0.9, hello),
        proptest::collection::vec(frame(), 0..10),
        proptest::bool::weighted(0.8),
        prop_oneof![
            3 => Just(Vec::new()),
            1 => proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ],
        prop_oneof![3 => Just(Vec::new()), 1 => proptest::collection::vec(any::<u8>(), 1..200)],
    )
        .prop_map(|(hello, frames, in_order, flips, tail)| Hostile {
            hello,
            frames,
            in_order,
            flips,
            tail,
        })
}

impl Hostile {
    /// The frames as sent, sequence numbers renumbered after the hello's when in order.
    fn frames(&self) -> Vec<Frame> {
        let mut next = match &self.hello {
            Some(Frame::Hello { first_seq, .. }) => *first_seq,
            _ => 0,
        };
        let mut frames: Vec<Frame> = self.hello.iter().cloned().collect();
        for frame in &self.frames {
            let mut frame = frame.clone();
            if self.in_order
                && let Frame::Write { seq, .. } | Frame::Trim { seq, .. } = &mut frame
            {
                *seq = next;
                next = next.wrapping_add(1);
            }
            frames.push(frame);
        }
        frames
    }

    fn clean(&self) -> bool {
        self.flips.is_empty() && self.tail.is_empty()
    }
}

/// What the secondary's file must hold after it acknowledged every write and trim up to `acked`: the
/// frames after the hello applied in order to zeroes, checking that each acknowledged one was inside the
/// volume. `None` when the hello did not open a volume this model covers.
fn expected_image(frames: &[Frame], acked: Option<u64>) -> Result<Option<Vec<u8>>, String> {
    let Some(Frame::Hello {
        volume,
        size,
        first_seq,
        ..
    }) = frames.first()
    else {
        return Ok(None);
    };
    if volume != "case" || *size > 1 << 20 {
        return Ok(None);
    }
    let mut image = vec![0u8; *size as usize];
    let Some(acked) = acked else {
        return Ok(Some(image));
    };
    let mut expected = *first_seq;
    for frame in &frames[1..] {
        let (seq, offset, length, data) = match frame {
            Frame::Write { seq, offset, data } => (*seq, *offset, data.len() as u64, Some(data)),
            Frame::Trim {
                seq,
                offset,
                length,
            } => (*seq, *offset, u64::from(*length), None),
            Frame::DropImage { .. } => continue,
            _ => break,
        };
        if seq != expected || seq > acked {
            break;
        }
        let end = offset
            .checked_add(length)
            .filter(|end| *end <= *size)
            .ok_or_else(|| format!("acknowledged {frame:?} outside a volume of {size} bytes"))?;
        let range = offset as usize..end as usize;
        match data {
            Some(data) => image[range].copy_from_slice(data),
            None => image[range].fill(0),
        }
        if seq == acked {
            return Ok(Some(image));
        }
        expected = expected.wrapping_add(1);
    }
    Err(format!(
        "acknowledged sequence {acked}, which was never sent in order"
    ))
}

/// Everything the secondary answers until it closes the connection.
async fn answers(link: &mut Framed<TcpStream, FrameCodec>) -> Result<Vec<Frame>, String> {
    let mut answers = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), link.next()).await {
            Err(_) => {
                return Err(format!(
                    "no answer and no close within 30 s after {answers:?}"
                ));
            }
            Ok(None) => return Ok(answers),
            Ok(Some(Err(error))) => {
                // A reset after the secondary refused is a close; anything else must decode.
                if matches!(&error, lockstep_replicator::wire::FrameError::Io(_)) {
                    return Ok(answers);
                }
                return Err(format!(
                    "an answer that is no frame: {error} after {answers:?}"
                ));
            }
            Ok(Some(Ok(frame))) => answers.push(frame),
        }
    }
}

/// A well-behaved primary still gets its write acknowledged.
async fn still_serving(secondary: &Secondary, case: u64) {
    let mut link = Framed::new(
        TcpStream::connect(secondary.local_addr()).await.unwrap(),
        FrameCodec,
    );
    link.send(Frame::Hello {
        volume: "live".into(),
        size: 4096,
        first_seq: case,
        keep: None,
        drop_image: None,
    })
    .await
    .unwrap();
    assert_eq!(
        link.next().await.unwrap().unwrap(),
        Frame::Welcome {
            next_seq: case,
            kept: None
        }
    );
    link.send(Frame::Write {
        seq: case,
        offset: 512,
        data: vec![7u8; 512].into(),
    })
    .await
    .unwrap();
    assert_eq!(
        link.next().await.unwrap().unwrap(),
        Frame::Ack { seq: case },
        "the secondary stopped serving a well-behaved primary"
    );
}

#[test]
fn a_secondary_fed_hostile_streams_answers_cleanly_and_keeps_only_acknowledged_writes() {
    let panics = watch_panics();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secondary = runtime
        .block_on(Secondary::start(SecondaryConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            dir: dir.path().join("secondary"),
            security: lockstep_replicator::LinkSecurity::Plaintext,
        }))
        .unwrap();
    let case = std::cell::Cell::new(0u64);
    let refused = std::cell::Cell::new(0usize);
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        source_file: Some(file!()),
        // Each case talks to a real server: shrinking is bounded in time, not only in steps.
        max_shrink_time: 120_000,
        ..fuzz_config(1_000)
    });
    runner
        .run(&hostile(), |hostile| {
            case.set(case.get() + 1);
            // A fresh volume per case: the model starts from zeroes.
            let _ = std::fs::remove_file(dir.path().join("secondary").join("case"));
            let _ = std::fs::remove_file(dir.path().join("secondary").join(".case.undo"));
            let panicked_before = panics.count();
            let frames = hostile.frames();
            let mut bytes = BytesMut::new();
            for frame in &frames {
                FrameCodec.encode(frame, &mut bytes).unwrap();
            }
            let mut bytes = bytes.to_vec();
            for (at, value) in &hostile.flips {
                let at = at.index(bytes.len().max(1));
                if let Some(byte) = bytes.get_mut(at) {
                    *byte = *value;
                }
            }
            bytes.extend_from_slice(&hostile.tail);
            let answers = runtime.block_on(async {
                let mut raw = TcpStream::connect(secondary.local_addr()).await.unwrap();
                // The secondary may refuse and close before reading everything: a failed write is fine.
                let _ = raw.write_all(&bytes).await;
                let _ = raw.shutdown().await;
                let mut link = Framed::new(raw, FrameCodec);
                answers(&mut link).await
            });
            let answers = answers.map_err(TestCaseError::fail)?;
            prop_assert_eq!(
                panics.count(),
                panicked_before,
                "a panic serving {:?}",
                frames
            );
            let mut acked = None;
            for (index, answer) in answers.iter().enumerate() {
                match answer {
                    Frame::Welcome { .. } => {
                        prop_assert_eq!(index, 0, "a second welcome: {:?}", answers)
                    }
                    Frame::Ack { seq } => {
                        prop_assert!(
                            acked.is_none_or(|acked| *seq > acked),
                            "acknowledgements went back: {:?}",
                            answers
                        );
                        acked = Some(*seq);
                    }
                    Frame::Error { .. } => {
                        refused.set(refused.get() + 1);
                        prop_assert_eq!(
                            index,
                            answers.len() - 1,
                            "answers after an error: {:?}",
                            answers
                        );
                    }
                    other => prop_assert!(false, "the secondary sent {:?}", other),
                }
            }
            if hostile.clean() {
                let image = expected_image(&frames, acked).map_err(TestCaseError::fail)?;
                let file = dir.path().join("secondary").join("case");
                if let (Some(image), Some(Frame::Welcome { .. })) = (image, answers.first()) {
                    let held = std::fs::read(&file).unwrap();
                    prop_assert_eq!(held.len(), image.len(), "the volume file changed size");
                    prop_assert!(
                        held == image,
                        "the secondary's file differs from the acknowledged writes"
                    );
                }
            }
            // Nothing outside the directory.
            let outside: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|entry| entry.unwrap().file_name())
                .filter(|name| name != "secondary")
                .collect();
            prop_assert!(
                outside.is_empty(),
                "files outside the secondary's directory: {:?}",
                outside
            );
            runtime.block_on(still_serving(&secondary, case.get()));
            Ok(())
        })
        .unwrap();
    println!(
        "replication link fuzz: {} hostile streams, {} refused with an error frame",
        runner.config().cases,
        refused.get()
    );
}
