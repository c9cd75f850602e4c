//! What the fuzz targets of every crate share (feature `fuzz`, for tests only): their case count and
//! where they keep failures, hostile strings, and a gRPC codec that sends arbitrary bytes as the body
//! of a call.

use proptest::prelude::*;
use prost::bytes::{Buf, BufMut};
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

/// The configuration of a fuzz target: `LOCKSTEP_FUZZ_CASES` cases when set (`scripts/fuzz.sh`), else
/// `default`, sized so that every fuzz target together stays within CI's budget. A failure's seed is
/// saved next to the target's source (`tests/<target>.proptest-regressions`) and replayed first on
/// every later run.
pub fn config(default: u32) -> proptest::test_runner::Config {
    let cases = std::env::var("LOCKSTEP_FUZZ_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(default);
    proptest::test_runner::Config {
        cases,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..proptest::test_runner::Config::default()
    }
}

/// Strings a hostile peer sends: empty, control characters, `look_alikes` (Unicode look-alikes of the
/// names the target uses, names with a NUL or a path in them), arbitrary text, and now and then one of a
/// `huge` length (around the limit the receiver is meant to enforce).
pub fn hostile_string(
    look_alikes: &[&'static str],
    huge: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = String> + Clone + use<> {
    prop_oneof![
        3 => Just(String::new()),
        3 => proptest::collection::vec(0u8..0x20, 1..8)
            .prop_map(|bytes| bytes.into_iter().map(char::from).collect()),
        2 => proptest::sample::select(look_alikes.to_vec()).prop_map(str::to_owned),
        4 => any::<String>(),
        1 => huge.prop_map(|length| "x".repeat(length)),
    ]
}

/// A protobuf enum's value on the wire: mostly one of the `known` values 1..=known, sometimes unset (0)
/// or any other.
pub fn wire_enum(known: i32) -> impl Strategy<Value = i32> + Clone {
    prop_oneof![8 => 1..=known, 1 => Just(0), 1 => any::<i32>()]
}

/// A gRPC codec that passes bytes through as they are, both ways: the body of a call is whatever the
/// fuzzer made, and the answer's body is returned undecoded.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut bytes = vec![0; src.remaining()];
        src.copy_to_slice(&mut bytes);
        Ok(Some(bytes))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        *self
    }
    fn decoder(&mut self) -> RawCodec {
        *self
    }
}
