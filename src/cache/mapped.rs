//! Committed blobs served from a memory mapping: the bytes go from the page cache to the
//! socket with one copy instead of two (no `pread` into a buffer first).
//!
//! The one `unsafe` in regcache. A mapping is sound while nobody truncates or rewrites the
//! file under it, and regcache never does that to a committed blob: content is written to
//! `tmp/`, verified, then renamed to its digest's path and never opened for writing again;
//! eviction and purge unlink it, which leaves open mappings valid until they are dropped.
//! (A person truncating files in the data dir by hand would make a reader fault; that is the
//! same class of damage as editing them, which `regcache verify` exists to find.)

use std::fs::File;
use std::io;

use bytes::Bytes;

/// `len` bytes of the committed file at `pos`, mapped and faulted in (call off the async
/// threads: populating may read from disk). The mapping is unmapped when the last `Bytes`
/// referring to it is dropped, so memory stays bounded by the chunks in flight.
#[allow(unsafe_code)]
pub fn map_at(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    // Mappings start on a page boundary.
    let page = rustix::param::page_size() as u64;
    let start = pos - pos % page;
    let skip = (pos - start) as usize;
    // SAFETY: see the module comment: the file is a committed blob, never written again.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(start)
            .len(skip + len)
            .populate()
            .map(file)?
    };
    Ok(Bytes::from_owner(map).slice(skip..))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn maps_any_range_of_a_file() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all(&data).unwrap();
        for (pos, len) in [
            (0, data.len()),
            (1, 10),
            (4095, 2),
            (4096, 4096),
            (5000, 7388),
        ] {
            let got = map_at(&f, pos as u64, len).unwrap();
            assert_eq!(&got[..], &data[pos..pos + len], "{pos}+{len}");
        }
    }
}
