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
}

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
        let store = Store {
            inner: Arc::new(Inner {
                blobs,
                tmp,
                next_tmp: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                objects: AtomicU64::new(0),
            }),
        };
        // Count what an earlier run left, off the startup path. Files written from now on are
        // counted by `commit` instead, so the walk skips anything newer than this.
        let opened = std::time::SystemTime::now();
        let counting = store.clone();
        std::thread::Builder::new()
            .name("regcache-du".into())
            .spawn(move || {
                let (bytes, objects) = disk_usage(&counting.inner.blobs, opened);
                counting.inner.bytes.fetch_add(bytes, Ordering::Relaxed);
                counting.inner.objects.fetch_add(objects, Ordering::Relaxed);
                tracing::info!(bytes, objects, "cache content counted");
            })?;
        Ok(store)
    }

    /// Whether the data dir takes a write (a temp file created, written and removed).
    pub fn check_writable(&self) -> io::Result<()> {
        use std::io::Write as _;
        let path = self.inner.tmp.join(format!("ready.{}", std::process::id()));
        let result = File::create(&path).and_then(|mut f| f.write_all(b"ok"));
        let _ = fs::remove_file(&path);
        result
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

    /// Opens committed content: the file and its size, or `None` when absent.
    pub async fn open_blob(&self, digest: &Digest) -> io::Result<Option<(Arc<File>, u64)>> {
        let path = self.path(digest);
        blocking(move || match File::open(&path) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((Arc::new(f), len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
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
        let existed = dest.exists();
        let size = temp.file.metadata()?.len();
        fs::rename(&temp.path, &dest)?;
        temp.committed = true;
        if !existed {
            self.inner.bytes.fetch_add(size, Ordering::Relaxed);
            self.inner.objects.fetch_add(1, Ordering::Relaxed);
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
        let path = self.path(digest);
        let size = match tokio::fs::metadata(&path).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {
                self.inner.bytes.fetch_sub(size, Ordering::Relaxed);
                self.inner.objects.fetch_sub(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Bytes and files under `dir`, recursively, last modified before `before`.
fn disk_usage(dir: &Path, before: std::time::SystemTime) -> (u64, u64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return (0, 0);
    };
    let (mut bytes, mut files) = (0, 0);
    for e in entries.flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => {
                let (b, f) = disk_usage(&e.path(), before);
                bytes += b;
                files += f;
            }
            Ok(t) if t.is_file() => {
                if let Ok(m) = e.metadata()
                    && m.modified().is_ok_and(|t| t < before)
                {
                    bytes += m.len();
                    files += 1;
                }
            }
            _ => {}
        }
    }
    (bytes, files)
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
        let (_, len) = store.open_blob(&d).await.unwrap().unwrap();
        assert_eq!(len, 5);
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
        // the reopened store counts what is there (in the background)
        for _ in 0..100 {
            if reopened.usage() == (5, 1) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(reopened.usage(), (5, 1));
        reopened.remove(&d).await.unwrap();
        assert_eq!(reopened.usage(), (0, 0));
    }
}
