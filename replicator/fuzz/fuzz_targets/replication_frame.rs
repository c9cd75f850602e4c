//! Fuzzes the replication frame decoder: arbitrary bytes never panic, and every frame decoded
//! re-encodes to bytes that decode to the same frame.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use lockstep_replicator::wire::{FrameCodec, decode_all};
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    let Ok(frames) = decode_all(data) else {
        return;
    };
    for frame in frames {
        let mut buf = BytesMut::new();
        if FrameCodec.encode(&frame, &mut buf).is_ok() {
            let again = FrameCodec.decode(&mut buf);
            assert!(matches!(again, Ok(Some(ref f)) if *f == frame));
        }
    }
});
