//! `Range` headers against a blob size: never panic, and a partial answer is inside the blob.
#![no_main]

use libfuzzer_sys::fuzz_target;
use regcache::oci::range::{RangeAnswer, parse};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().unwrap());
    let Ok(header) = std::str::from_utf8(&data[8..]) else {
        return;
    };
    for size in [size, size % 1024, 0] {
        match parse(Some(header), size) {
            RangeAnswer::Partial { start, end } => {
                assert!(
                    start <= end && end < size,
                    "{header:?} {size}: {start}-{end}"
                );
            }
            RangeAnswer::Full | RangeAnswer::Unsatisfiable => {}
        }
    }
});
