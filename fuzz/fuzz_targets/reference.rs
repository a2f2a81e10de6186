//! Repository names, tags, references, digests and image references: never panic, and what
//! parses prints back to something that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use regcache::oci::digest::Digest;
use regcache::oci::image_ref::{ImageRef, Name};
use regcache::oci::reference::{Reference, RepoName, Tag};

fn round_trip<T>(s: &str)
where
    T: std::str::FromStr + std::fmt::Display + std::fmt::Debug + PartialEq,
{
    if let Ok(v) = s.parse::<T>() {
        let again: T = v
            .to_string()
            .parse()
            .unwrap_or_else(|_| panic!("{v} (from {s:?}) does not parse back"));
        assert_eq!(v, again, "{s:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    round_trip::<Digest>(s);
    round_trip::<RepoName>(s);
    round_trip::<Tag>(s);
    round_trip::<Reference>(s);
    let _ = s.parse::<Name>();
    if let Ok(r) = s.parse::<ImageRef>() {
        let _ = r.reference();
        let _ = r.request_name();
        let _ = r.to_string().parse::<ImageRef>();
    }
});
