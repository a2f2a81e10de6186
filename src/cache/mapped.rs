//! Committed blobs served from a memory mapping: the bytes go from the page cache to the
//! socket with one copy instead of two (no `pread` into a buffer first), or with none when the
//! connection can `sendfile` them (`crate::sendfile`).
//!
//! The library's `unsafe` lives here (the binary's one, a `mallopt` call, is in `main.rs`). A
//! mapping is sound while nobody truncates or rewrites the file under it, and regcache never
//! does that to a committed blob: content is written to `tmp/`, verified, then renamed to its
//! digest's path and never opened for writing again; eviction and purge unlink it, which leaves
//! open mappings valid until they are dropped. A fill's temp file is only appended to, so the
//! part its writer has written is as fixed as a committed blob: that part, and only that part,
//! may be mapped while the fill runs (a failed fill's file is unlinked, not truncated).
//! (A person truncating files in the data dir by hand would make a reader fault; that is the
//! same class of damage as editing them, which `regcache verify` exists to find.)

use std::fs::File;
use std::io;

/// `len` bytes of a file at `pos` that never change (see above), mapped read-only.
pub struct Mapping {
    map: memmap2::Mmap,
    /// Bytes between the page boundary the mapping starts on and `pos`.
    skip: usize,
}

impl Mapping {
    /// Maps `pos..pos + len` of `file`, a committed blob or a fill's written part. Nothing is
    /// read until someone touches the bytes (or [`in_memory`] reads them in).
    #[allow(unsafe_code)]
    pub fn new(file: &File, pos: u64, len: usize) -> io::Result<Mapping> {
        // Mappings start on a page boundary.
        let page = rustix::param::page_size() as u64;
        let start = pos - pos % page;
        let skip = (pos - start) as usize;
        let mut options = memmap2::MmapOptions::new();
        options.offset(start).len(skip + len);
        // SAFETY: see the module comment: these bytes of the file are never written again.
        let map = unsafe { options.map(file)? };
        Ok(Mapping { map, skip })
    }
}

/// The pages under `bytes`, a part of a live [`Mapping`]: their start, rounded down to the
/// page boundary (which is still inside the mapping, as mappings start on one), and length.
fn pages_of(bytes: &[u8]) -> (*mut libc::c_void, usize) {
    let page = rustix::param::page_size();
    let addr = bytes.as_ptr() as usize;
    let start = addr - addr % page;
    (start as *mut libc::c_void, addr + bytes.len() - start)
}

/// Whether every page under `bytes`, a part of a live mapping, is in the page cache. Asks
/// the kernel (`mincore`); touches nothing.
#[allow(unsafe_code)]
fn resident(bytes: &[u8]) -> io::Result<bool> {
    let (start, len) = pages_of(bytes);
    let mut pages = vec![0u8; len.div_ceil(rustix::param::page_size())];
    // SAFETY: the range lies in a live mapping and starts on a page boundary (`pages_of`), and
    // `pages` has one byte per page of it, as mincore(2) requires.
    let rc = unsafe { libc::mincore(start, len, pages.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pages.iter().all(|p| p & 1 == 1))
}

/// Reads every page under `bytes`, a part of a live mapping, into the page cache now (call
/// off the async threads).
#[allow(unsafe_code)]
fn populate(bytes: &[u8]) -> io::Result<()> {
    let (start, len) = pages_of(bytes);
    // SAFETY: the range lies in a live read-only file mapping and starts on a page boundary;
    // MADV_POPULATE_READ only faults its pages in, as reading them would.
    let rc = unsafe { libc::madvise(start, len, libc::MADV_POPULATE_READ) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) {
        return Err(err);
    }
    // Linux before 5.14 has no MADV_POPULATE_READ: read one byte of each page instead.
    let page = rustix::param::page_size();
    let touched = (bytes.iter().step_by(page))
        .chain(bytes.last())
        .fold(0u8, |acc, b| acc ^ b);
    std::hint::black_box(touched);
    Ok(())
}

/// `part` of a mapping, once every page under it is in the page cache, so reading it (or
/// `sendfile` of it) does not wait for the disk: at once when it is (a hot blob: `mincore`
/// reads nothing, and the copy that touches the bytes later only maps pages in, or nothing
/// when this mapping touched them before), else after reading it in on a blocking thread. (A
/// page evicted in between is read by that later copy's fault; the next chunk is checked
/// again.)
pub async fn in_memory<T: AsRef<[u8]> + Send + 'static>(part: T) -> io::Result<T> {
    if resident(part.as_ref())? {
        return Ok(part);
    }
    super::blobs::blocking(move || {
        populate(part.as_ref())?;
        Ok(part)
    })
    .await
}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.skip..]
    }
}

/// `pos..pos + len` of `file` mapped, with every page in the page cache ([`in_memory`]).
pub async fn map_in_memory(file: &File, pos: u64, len: usize) -> io::Result<Mapping> {
    in_memory(Mapping::new(file, pos, len)?).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
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
            let got = Bytes::from_owner(Mapping::new(&f, pos as u64, len).unwrap());
            assert_eq!(&got[..], &data[pos..pos + len], "{pos}+{len}");
            let lazy = Mapping::new(&f, pos as u64, len).unwrap();
            populate(lazy.as_ref()).unwrap();
            assert!(resident(lazy.as_ref()).unwrap(), "{pos}+{len} populated");
            assert_eq!(lazy.as_ref(), &data[pos..pos + len], "{pos}+{len} lazy");
        }
    }

    /// A range the page cache dropped is seen as such, and is read in (off the async
    /// threads) before it is handed out; once in memory it maps as it is. Byte-exact both ways.
    #[tokio::test]
    async fn a_range_out_of_the_page_cache_is_read_in_before_it_is_handed_out() {
        // On disk (not tmpfs, whose pages cannot be dropped): under the crate's `target/`.
        let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        std::fs::create_dir_all(&target).unwrap();
        let dir = tempfile::tempdir_in(&target).unwrap();
        let mut f = tempfile::tempfile_in(dir.path()).unwrap();
        let data: Vec<u8> = (0..64 * 4096).map(|i| (i * 13 % 251) as u8).collect();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        let (pos, len) = (4096 * 3 + 5, 4096 * 20);
        let want = &data[pos as usize..pos as usize + len];
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        assert!(
            !resident(Mapping::new(&f, pos, len).unwrap().as_ref()).unwrap(),
            "dropped pages are not resident"
        );
        let got = map_in_memory(&f, pos, len).await.unwrap();
        assert!(
            resident(got.as_ref()).unwrap(),
            "read in before it is handed out"
        );
        assert_eq!(got.as_ref(), want);
        drop(got);
        let again = map_in_memory(&f, pos, len).await.unwrap();
        assert_eq!(again.as_ref(), want, "mapped as it is, once in memory");
        drop(again);

        // The same for a part of a file mapped whole.
        let whole = Bytes::from_owner(Mapping::new(&f, 0, data.len()).unwrap());
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let part = whole.slice(pos as usize..pos as usize + len);
        assert!(!resident(&part).unwrap(), "dropped pages are not resident");
        let part = in_memory(part).await.unwrap();
        assert!(resident(&part).unwrap(), "read in before it is handed out");
        assert_eq!(&part[..], want);
    }
}
