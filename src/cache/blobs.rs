//! Content-addressed files: `blobs/<algorithm>/<2 hex>/<hex>`.
//!
//! Invariant: a file at its final path holds exactly the bytes of its digest. Content is written
//! to `tmp/` while it is hashed, fsynced, and renamed into place only when the digest matched, so
//! a crash leaves at worst a temp file, which [`Store::open`] removes.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use moka::ops::compute::Op;
use std::os::unix::fs::MetadataExt as _;

use crate::oci::digest::Digest;

/// The blob and manifest file store under one data directory.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    blobs: PathBuf,
    tmp: PathBuf,
    next_tmp: AtomicU64,
    /// Committed bytes and files, counted once at open and kept current by commit and remove.
    bytes: AtomicU64,
    objects: AtomicU64,
    /// Held while a commit or removal looks at a blob's path and changes it, so two of them
    /// on one digest (fills through two upstreams, say) count it once.
    renaming: std::sync::Mutex<()>,
    /// Small blobs served lately, kept open and mapped whole (see [`Committed`]).
    open: moka::sync::Cache<Digest, Committed>,
}

/// Committed content, open.
#[derive(Clone)]
pub struct Committed {
    pub file: Arc<File>,
    pub size: u64,
    /// The whole file mapped, for a blob of at most [`MAPPED_MAX`] bytes. Such a blob is
    /// served from this one mapping, kept while it is in use: its pages are mapped in once,
    /// where a larger blob is mapped, faulted in and unmapped again chunk by chunk for every
    /// request (which for a 5 MiB blob took a third of regcache's CPU; BENCHMARKS.md).
    pub mapped: Option<Bytes>,
}

/// The largest blob kept mapped whole: a config or a small layer, served many times a second
/// where one is hot.
const MAPPED_MAX: u64 = 8 * 1024 * 1024;
/// The bytes of the blobs kept open and mapped whole, counted at least [`OPEN_MIN_WEIGHT`]
/// each. Their pages, once touched, count in regcache's RSS, but they are the page cache's
/// clean pages, which the kernel reclaims under pressure as it does unmapped ones.
const MAPPED_BUDGET: u64 = 32 * 1024 * 1024;
/// What a blob kept open weighs at least: bounds the open files to 256.
const OPEN_MIN_WEIGHT: u64 = 128 * 1024;
/// How long an unrequested blob stays open.
const OPEN_IDLE: std::time::Duration = std::time::Duration::from_secs(300);

/// A temp file being filled; removed on drop unless committed.
pub struct TempFile {
    pub file: Arc<File>,
    path: PathBuf,
    committed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Store {
    /// Opens (creating) the store under `data_dir` and removes temp files a crash left behind.
    pub fn open(data_dir: &Path) -> io::Result<Store> {
        let blobs = data_dir.join("blobs");
        let tmp = data_dir.join("tmp");
        fs::create_dir_all(&blobs)?;
        fs::create_dir_all(&tmp)?;
        let mut removed = 0;
        for entry in fs::read_dir(&tmp)? {
            fs::remove_file(entry?.path())?;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(removed, "removed temp files left by an earlier run");
        }
        Ok(Store::view(data_dir))
    }

    /// The store of a data dir as it is, for reading only: nothing created or cleaned (a
    /// server may be running on it).
    pub fn view(data_dir: &Path) -> Store {
        Store {
            inner: Arc::new(Inner {
                blobs: data_dir.join("blobs"),
                tmp: data_dir.join("tmp"),
                next_tmp: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                objects: AtomicU64::new(0),
                renaming: std::sync::Mutex::default(),
                open: moka::sync::Cache::builder()
                    .max_capacity(MAPPED_BUDGET)
                    .weigher(|_, c: &Committed| {
                        u32::try_from(c.size.max(OPEN_MIN_WEIGHT)).unwrap_or(u32::MAX)
                    })
                    .time_to_idle(OPEN_IDLE)
                    .build(),
            }),
        }
    }

    /// Whether the data dir takes a write (a temp file created, written and removed).
    pub fn check_writable(&self) -> io::Result<()> {
        use std::io::Write as _;
        let path = self.inner.tmp.join(format!("ready.{}", std::process::id()));
        let result = File::create(&path).and_then(|mut f| f.write_all(b"ok"));
        let _ = fs::remove_file(&path);
        result
    }

    /// Adds what an earlier run left to the usage counters: the `files` (from [`Store::files`])
    /// last modified before `before`, when this run started committing (commits after that
    /// count themselves).
    pub fn count_existing(&self, files: &[StoredFile], before: std::time::SystemTime) {
        let (bytes, objects) = files
            .iter()
            .filter(|f| f.modified < before)
            .fold((0, 0), |(b, n), f| (b + f.size, n + 1));
        self.inner.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.inner.objects.fetch_add(objects, Ordering::Relaxed);
        tracing::info!(bytes, objects, "cache content counted");
    }

    /// Committed bytes and objects (blobs and manifests) on disk.
    pub fn usage(&self) -> (u64, u64) {
        (
            self.inner.bytes.load(Ordering::Relaxed),
            self.inner.objects.load(Ordering::Relaxed),
        )
    }

    /// The directory of committed content.
    pub fn blobs_dir(&self) -> &Path {
        &self.inner.blobs
    }

    /// Where the content of `digest` lives once committed.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.inner
            .blobs
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    /// Opens committed content, or `None` when absent. A small blob served lately is still
    /// open, and mapped whole.
    pub async fn open_blob(&self, digest: &Digest) -> io::Result<Option<Committed>> {
        if let Some(c) = self.inner.open.get(digest) {
            return Ok(Some(c));
        }
        let (path, key, open) = (self.path(digest), digest.clone(), self.inner.open.clone());
        blocking(move || {
            // A kept file can have been unlinked since it was opened: removed (see
            // `Store::remove`), or replaced by the same content committed again. It is closed
            // here, and the path opened again; each retry needs another unlink meanwhile.
            for _ in 0..3 {
                let file = match File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e),
                };
                let size = file.metadata()?.len();
                if !(1..=MAPPED_MAX).contains(&size) {
                    return Ok(Some(Committed {
                        file: Arc::new(file),
                        size,
                        mapped: None,
                    }));
                }
                // One mapping per blob, however many requests open it at once: the first
                // maps it, the others wait for it (on their blocking threads) and share it.
                let kept = open
                    .try_get_with_by_ref(&key, || {
                        let mapped =
                            Bytes::from_owner(super::Mapping::new(&file, 0, size as usize)?);
                        Ok(Committed {
                            file: Arc::new(file),
                            size,
                            mapped: Some(mapped),
                        })
                    })
                    .map_err(|e: Arc<io::Error>| io::Error::new(e.kind(), e.to_string()))?;
                if kept.file.metadata()?.nlink() > 0 {
                    return Ok(Some(kept));
                }
                open.entry_by_ref(&key)
                    .and_compute_with(|entry| match entry {
                        Some(e) if Arc::ptr_eq(&e.value().file, &kept.file) => Op::Remove,
                        _ => Op::Nop,
                    });
            }
            Ok(None)
        })
        .await
    }

    /// Whether committed content exists.
    pub async fn contains(&self, digest: &Digest) -> bool {
        tokio::fs::try_exists(self.path(digest))
            .await
            .unwrap_or(false)
    }

    /// Reads small committed content (a manifest) whole.
    pub async fn read_small(&self, digest: &Digest) -> io::Result<Option<Bytes>> {
        match tokio::fs::read(self.path(digest)).await {
            Ok(v) => Ok(Some(Bytes::from(v))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A new temp file for content of `digest`, readable and writable by position.
    pub fn temp(&self, digest: &Digest) -> io::Result<TempFile> {
        let n = self.inner.next_tmp.fetch_add(1, Ordering::Relaxed);
        let path = self.inner.tmp.join(format!(
            "{}-{}.{}.{n}",
            digest.algorithm().as_str(),
            digest.hex(),
            std::process::id()
        ));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(TempFile {
            file: Arc::new(file),
            path,
            committed: false,
        })
    }

    /// Makes verified temp content durable and visible under its digest (blocking).
    pub fn commit(&self, mut temp: TempFile, digest: &Digest) -> io::Result<()> {
        temp.file.sync_all()?;
        let dest = self.path(digest);
        let dir = dest.parent().expect("blob paths have a parent");
        fs::create_dir_all(dir)?;
        let size = temp.file.metadata()?.len();
        {
            let _renaming = self.inner.renaming.lock().expect("renaming");
            let replaced = fs::metadata(&dest).map(|m| m.len()).ok();
            fs::rename(&temp.path, &dest)?;
            temp.committed = true;
            match replaced {
                // The file it replaced is unlinked: close it if kept open, so its space is
                // freed.
                Some(old) => {
                    self.inner.open.invalidate(digest);
                    self.uncount(old, 0);
                    self.inner.bytes.fetch_add(size, Ordering::Relaxed);
                }
                None => {
                    self.inner.bytes.fetch_add(size, Ordering::Relaxed);
                    self.inner.objects.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        File::open(dir)?.sync_all()
    }

    /// Writes small content whose digest the caller has verified.
    pub async fn write_small(&self, digest: &Digest, bytes: Bytes) -> io::Result<()> {
        let store = self.clone();
        let digest = digest.clone();
        blocking(move || {
            use std::os::unix::fs::FileExt;
            let temp = store.temp(&digest)?;
            temp.file.write_all_at(&bytes, 0)?;
            store.commit(temp, &digest)
        })
        .await
    }

    /// Removes committed content (after corruption is found, or by eviction).
    pub async fn remove(&self, digest: &Digest) -> io::Result<()> {
        let unlinked = self.unlink(digest).await;
        // Then closed and unmapped too, so the disk space is freed (a reader still sending it
        // keeps its own handle until done). After the unlink: an open racing this one sees
        // the file unlinked once it has kept it (see `open_blob`), or is closed here.
        self.inner.open.invalidate(digest);
        unlinked
    }

    /// Unlinks committed content and uncounts it.
    async fn unlink(&self, digest: &Digest) -> io::Result<()> {
        let (store, path) = (self.clone(), self.path(digest));
        blocking(move || {
            let _renaming = store.inner.renaming.lock().expect("renaming");
            let size = match fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            match fs::remove_file(&path) {
                Ok(()) => {
                    store.uncount(size, 1);
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Takes `bytes` and `objects` off the usage count, never below zero (a file removed
    /// while the start-up walk counts the store may not have been counted yet).
    fn uncount(&self, bytes: u64, objects: u64) {
        let sub = |n: &AtomicU64, by: u64| {
            let _ = n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(by))
            });
        };
        sub(&self.inner.bytes, bytes);
        sub(&self.inner.objects, objects);
    }
}

/// A file under `blobs/`, as [`Store::files`] finds it.
#[derive(Debug, Clone)]
pub struct StoredFile {
    pub path: PathBuf,
    /// The digest its path names (`blobs/<algorithm>/<2 hex>/<hex>`); `None` for a stray.
    pub digest: Option<Digest>,
    pub size: u64,
    pub modified: std::time::SystemTime,
}

impl Store {
    /// Every committed file, with the digest its path names (blocking: walks the directory).
    pub fn files(&self) -> io::Result<Vec<StoredFile>> {
        let mut out = Vec::new();
        let mut dirs = vec![self.inner.blobs.clone()];
        while let Some(dir) = dirs.pop() {
            for e in fs::read_dir(&dir)? {
                let e = e?;
                let t = e.file_type()?;
                if t.is_dir() {
                    dirs.push(e.path());
                } else if t.is_file() {
                    let m = e.metadata()?;
                    let path = e.path();
                    out.push(StoredFile {
                        digest: self.digest_of(&path),
                        size: m.len(),
                        modified: m.modified().unwrap_or(std::time::UNIX_EPOCH),
                        path,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// The digest a committed file's path names, the inverse of [`Store::path`].
    fn digest_of(&self, path: &Path) -> Option<Digest> {
        let rel = path.strip_prefix(&self.inner.blobs).ok()?;
        let parts: Vec<&str> = rel.iter().filter_map(|p| p.to_str()).collect();
        let [alg, shard, hex] = parts.as_slice() else {
            return None;
        };
        let d: Digest = format!("{alg}:{hex}").parse().ok()?;
        (shard.len() == 2 && hex.starts_with(shard)).then_some(d)
    }

    /// Bytes free (for regcache's user) and total on the data dir's file system.
    pub fn free_space(&self) -> Option<(u64, u64)> {
        let fs = rustix::fs::statvfs(&self.inner.blobs).ok()?;
        Some((
            fs.f_bavail.saturating_mul(fs.f_frsize),
            fs.f_blocks.saturating_mul(fs.f_frsize),
        ))
    }
}

/// Runs blocking file work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commit_and_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = Bytes::from_static(b"hello");
        let d = Digest::sha256_of(&data);
        assert!(!store.contains(&d).await);
        store.write_small(&d, data.clone()).await.unwrap();
        assert_eq!(store.read_small(&d).await.unwrap().unwrap(), data);
        assert_eq!(store.open_blob(&d).await.unwrap().unwrap().size, 5);
        assert_eq!(store.usage(), (5, 1));
        // committing the same content again changes nothing
        store.write_small(&d, data.clone()).await.unwrap();
        assert_eq!(store.usage(), (5, 1));

        // an uncommitted temp file vanishes when dropped, and leftovers go at the next open
        let t = store.temp(&d).unwrap();
        drop(t);
        let leftover = store.temp(&d).unwrap();
        std::mem::forget(leftover);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1);
        let reopened = Store::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        // the reopened store counts what an earlier run left
        let opened = std::time::SystemTime::now();
        reopened.count_existing(&reopened.files().unwrap(), opened);
        assert_eq!(reopened.usage(), (5, 1));
        reopened.remove(&d).await.unwrap();
        assert_eq!(reopened.usage(), (0, 0));
    }

    /// A small blob stays open and mapped whole between requests, until it is removed or
    /// replaced; a large or empty one is opened for each request and never mapped whole.
    #[tokio::test]
    async fn small_blobs_stay_open_and_mapped_until_removed_or_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let small = Bytes::from(vec![7u8; 10_000]);
        let large = Bytes::from(vec![1u8; MAPPED_MAX as usize + 1]);
        let empty = Bytes::new();
        for data in [&small, &large, &empty] {
            store
                .write_small(&Digest::sha256_of(data), data.clone())
                .await
                .unwrap();
        }
        let open = |data: &Bytes| {
            let (store, d) = (store.clone(), Digest::sha256_of(data));
            async move { store.open_blob(&d).await.unwrap().unwrap() }
        };
        let (a, b) = (open(&small).await, open(&small).await);
        assert_eq!(a.mapped.as_deref(), Some(&small[..]));
        assert!(Arc::ptr_eq(&a.file, &b.file), "kept open");
        let mapping = |c: &Committed| c.mapped.as_ref().map(|m| m.as_ptr());
        assert_eq!(mapping(&a), mapping(&b), "one mapping");
        for data in [&large, &empty] {
            let (x, y) = (open(data).await, open(data).await);
            assert_eq!((x.size, x.mapped.is_none()), (data.len() as u64, true));
            assert!(!Arc::ptr_eq(&x.file, &y.file), "opened per request");
        }
        let d = Digest::sha256_of(&small);
        // The same content committed again replaces the file: the replaced one is closed.
        store.write_small(&d, small.clone()).await.unwrap();
        let c = open(&small).await;
        assert_eq!(c.file.metadata().unwrap().nlink(), 1, "the file now linked");
        assert_eq!(c.mapped.as_deref(), Some(&small[..]));
        assert!(
            !Arc::ptr_eq(&a.file, &c.file),
            "the replaced file is closed"
        );
        store.remove(&d).await.unwrap();
        assert!(
            store.open_blob(&d).await.unwrap().is_none(),
            "closed once removed"
        );
    }

    /// A task that opens `d` as soon as everyone waiting on `start` is there.
    fn open_at(
        store: &Store,
        d: &Digest,
        start: &Arc<tokio::sync::Barrier>,
    ) -> tokio::task::JoinHandle<Option<Committed>> {
        let (store, d, start) = (store.clone(), d.clone(), Arc::clone(start));
        tokio::spawn(async move {
            start.wait().await;
            store.open_blob(&d).await.unwrap()
        })
    }

    /// Requests that first open a small blob at the same moment (a restart, then a fleet
    /// pulling the same layer) share one mapping: each its own would each bring the whole
    /// blob into RSS.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_first_opens_share_one_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = Bytes::from(vec![9u8; 3_000_000]);
        let d = Digest::sha256_of(&data);
        store.write_small(&d, data.clone()).await.unwrap();
        let start = Arc::new(tokio::sync::Barrier::new(32));
        let opens: Vec<_> = (0..32).map(|_| open_at(&store, &d, &start)).collect();
        let mut mappings = std::collections::HashSet::new();
        for open in opens {
            let blob = open.await.unwrap().unwrap();
            assert_eq!(blob.mapped.as_deref(), Some(&data[..]));
            mappings.insert(blob.mapped.as_ref().map(|m| m.as_ptr() as usize));
        }
        assert_eq!(mappings.len(), 1, "32 concurrent opens, one mapping");
    }

    /// A small blob removed while it is first opened is not kept open: once both are done, it
    /// is gone (no mapping of the unlinked file held, its space not kept, nothing served).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_blob_removed_while_first_opened_is_not_kept_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = Bytes::from(vec![5u8; 1_000_000]);
        let d = Digest::sha256_of(&data);
        for _ in 0..300 {
            store.write_small(&d, data.clone()).await.unwrap();
            let start = Arc::new(tokio::sync::Barrier::new(2));
            let open = open_at(&store, &d, &start);
            start.wait().await;
            store.remove(&d).await.unwrap();
            let opened = open.await.unwrap();
            if let Some(c) = &opened {
                assert_eq!(
                    c.mapped.as_deref(),
                    Some(&data[..]),
                    "opened before removal"
                );
            }
            assert!(
                store.open_blob(&d).await.unwrap().is_none(),
                "removed, so not served from a mapping kept open"
            );
        }
    }

    /// Commits of one digest racing each other (fills through two upstreams), and removals,
    /// count the file once: the usage ends at exactly what is on disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_commits_and_removals_count_each_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = Bytes::from_static(b"one layer, many upstreams");
        let d = Digest::sha256_of(&data);
        for round in 0..100 {
            let racers: Vec<_> = (0..4)
                .map(|i| {
                    let (store, d, data) = (store.clone(), d.clone(), data.clone());
                    tokio::spawn(async move {
                        if round % 2 == 1 && i == 0 {
                            store.remove(&d).await
                        } else {
                            store.write_small(&d, data).await
                        }
                    })
                })
                .collect();
            for r in racers {
                r.await.unwrap().unwrap();
            }
            let on_disk = store.contains(&d).await;
            let want = if on_disk {
                (data.len() as u64, 1)
            } else {
                (0, 0)
            };
            assert_eq!(store.usage(), want, "round {round}");
        }
    }
}
