//! Fuzzes the NBD codec: request headers (classified against an export size taken from the input),
//! option headers, INFO/GO data and export names. Nothing may panic, and an executed request must lie
//! inside the export.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep_replicator::nbd::proto::{self, Command, Verdict};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 + proto::REQUEST_LEN {
        let _ = proto::parse_info_request(data);
        let _ = proto::parse_export_name(data);
        return;
    }
    let size = u64::from_be_bytes(data[..8].try_into().unwrap_or([0; 8]));
    let mut header = [0u8; proto::REQUEST_LEN];
    header.copy_from_slice(&data[8..8 + proto::REQUEST_LEN]);
    if let Ok(h) = proto::parse_request_header(&header) {
        match proto::classify(&h, size) {
            Verdict::Execute(Command::Read { offset, length })
            | Verdict::Execute(Command::Write { offset, length, .. })
            | Verdict::Execute(Command::Trim { offset, length, .. }) => {
                assert!(offset.checked_add(u64::from(length)).is_some_and(|e| e <= size));
            }
            _ => {}
        }
    }
    let mut opt = [0u8; proto::OPTION_HEADER_LEN];
    opt.copy_from_slice(&data[8..8 + proto::OPTION_HEADER_LEN]);
    let _ = proto::parse_option_header(&opt);
    let rest = &data[8 + proto::REQUEST_LEN..];
    let _ = proto::parse_info_request(rest);
    let _ = proto::parse_export_name(rest);
});
