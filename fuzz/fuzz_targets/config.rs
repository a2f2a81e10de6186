//! Config text: parsing and validation report problems, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = regcache::Config::parse(s, std::path::Path::new("<fuzz>"));
    }
});
