//! Checking a data dir: every committed file re-hashed against the digest its path names, and
//! the index reconciled with the files (`regcache verify`, and the cheap half at start-up).

use std::fs::{self, File};
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};

use super::blobs::{Store, StoredFile};
use super::index::Index;
use crate::oci::digest::{Algorithm, Digest, Verifier};

/// What a verification found.
#[derive(Debug, Default)]
pub struct Report {
    /// Files hashed, and their bytes.
    pub checked: u64,
    pub bytes: u64,
    /// Files whose bytes do not match their digest.
    pub corrupt: Vec<PathBuf>,
    /// Files under `blobs/` whose path names no digest.
    pub strays: Vec<PathBuf>,
    /// Index entries whose file is missing.
    pub dangling: u64,
    /// Whether the problems were repaired (files removed, entries dropped).
    pub repaired: bool,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.strays.is_empty() && self.dangling == 0
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "checked {} objects ({} bytes): {} corrupt, {} stray files, {} index entries without a file",
            self.checked,
            self.bytes,
            self.corrupt.len(),
            self.strays.len(),
            self.dangling
        )?;
        let verb = if self.repaired { "removed" } else { "found" };
        for p in &self.corrupt {
            writeln!(f, "corrupt ({verb}): {}", p.display())?;
        }
        for p in &self.strays {
            writeln!(f, "stray ({verb}): {}", p.display())?;
        }
        Ok(())
    }
}

fn hash_file(path: &Path, algorithm: Algorithm) -> io::Result<(Digest, u64)> {
    let mut f = File::open(path)?;
    let mut v = Verifier::new(algorithm);
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            return Ok((v.finish(), n));
        }
        v.update(&buf[..k]);
        n += k as u64;
    }
}

/// Re-hashes every committed file and checks the index against the files (blocking). With
/// `repair`, corrupt and stray files are removed and their index entries dropped.
pub fn verify(store: &Store, index: &Index, repair: bool) -> io::Result<Report> {
    let mut report = Report {
        repaired: repair,
        ..Report::default()
    };
    for file in store.files()? {
        let path = file.path;
        let Some(digest) = file.digest else {
            if repair {
                fs::remove_file(&path)?;
            }
            report.strays.push(path);
            continue;
        };
        let (actual, size) = hash_file(&path, digest.algorithm())?;
        report.checked += 1;
        report.bytes += size;
        if actual != digest {
            if repair {
                fs::remove_file(&path)?;
                index.forget(&digest).map_err(io::Error::other)?;
            }
            report.corrupt.push(path);
        }
    }
    report.dangling = drop_dangling(store, index, repair)?;
    if repair {
        index.flush().map_err(io::Error::other)?;
    }
    Ok(report)
}

/// Index entries (blobs and manifests) whose file is gone; dropped when `remove`.
pub fn drop_dangling(store: &Store, index: &Index, remove: bool) -> io::Result<u64> {
    let mut n = 0;
    for (upstream, digest) in index.entries().map_err(io::Error::other)? {
        if !store.path(&digest).exists() {
            n += 1;
            if remove {
                index
                    .forget_for(&upstream, &digest)
                    .map_err(io::Error::other)?;
            }
        }
    }
    Ok(n)
}

/// Start-up reconciliation after a crash: drops index entries whose file is gone, and hashes
/// every file no upstream's index names (a crash between commit and indexing leaves one):
/// a good one stays and is indexed again when an upstream confirms it, a bad one is removed.
/// `files` is the store's listing ([`Store::files`]); the bad ones (and any removed meanwhile)
/// are taken out of it.
/// Returns (entries dropped, unindexed files kept, files removed).
pub fn reconcile(
    store: &Store,
    index: &Index,
    files: &mut Vec<StoredFile>,
) -> io::Result<(u64, u64, u64)> {
    let dropped = drop_dangling(store, index, true)?;
    let known = index.holders().map_err(io::Error::other)?;
    let (mut kept, mut removed) = (0, 0);
    let mut bad = Vec::new();
    for file in files.iter() {
        let (path, Some(digest)) = (&file.path, &file.digest) else {
            continue;
        };
        if known.contains_key(digest) {
            continue;
        }
        // The server is already serving: a file may be evicted or purged mid-walk.
        let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
        let actual = match hash_file(path, digest.algorithm()) {
            Ok((actual, _)) => actual,
            Err(e) if gone(&e) => {
                bad.push(path.clone());
                continue;
            }
            Err(e) => return Err(e),
        };
        if &actual == digest {
            kept += 1;
            continue;
        }
        match fs::remove_file(path) {
            Ok(()) => removed += 1,
            Err(e) if gone(&e) => {}
            Err(e) => return Err(e),
        }
        bad.push(path.clone());
    }
    files.retain(|f| !bad.contains(&f.path));
    Ok((dropped, kept, removed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn finds_and_repairs_corrupt_files_strays_and_dangling_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let index = Index::open(&dir.path().join("index")).unwrap();
        let good = Bytes::from_static(b"good content");
        let bad = Bytes::from_static(b"will be damaged");
        let (dg, db) = (Digest::sha256_of(&good), Digest::sha256_of(&bad));
        store.write_small(&dg, good.clone()).await.unwrap();
        store.write_small(&db, bad.clone()).await.unwrap();
        index.put_blob("docker.io", &dg, good.len() as u64).unwrap();
        index.put_blob("docker.io", &db, bad.len() as u64).unwrap();
        index.put_blob("ghcr", &db, bad.len() as u64).unwrap();
        let gone = Digest::sha256_of(b"never written");
        index.put_blob("docker.io", &gone, 1).unwrap();
        fs::write(store.path(&db), b"damaged bytes!!").unwrap();
        fs::write(store.blobs_dir().join("sha256").join("stray"), b"x").unwrap();

        let r = verify(&store, &index, false).unwrap();
        assert_eq!(r.checked, 2);
        assert_eq!(r.corrupt, vec![store.path(&db)]);
        assert_eq!(r.strays.len(), 1);
        assert_eq!(r.dangling, 1);
        assert!(!r.is_clean());
        assert!(store.path(&db).exists(), "a dry run removes nothing");

        let r = verify(&store, &index, true).unwrap();
        assert_eq!(r.corrupt.len(), 1);
        assert!(!store.path(&db).exists());
        assert_eq!(
            index.blob("ghcr", &db).unwrap(),
            None,
            "every upstream's entry"
        );
        assert_eq!(index.blob("docker.io", &gone).unwrap(), None);
        assert_eq!(
            index.blob("docker.io", &dg).unwrap(),
            Some(good.len() as u64)
        );

        let r = verify(&store, &index, false).unwrap();
        assert!(r.is_clean(), "{r}");
        assert_eq!(r.checked, 1);

        // Unindexed files: a good one stays, a bad one goes; dangling entries are dropped.
        let orphan = Bytes::from_static(b"committed, never indexed");
        let orphan_d = Digest::sha256_of(&orphan);
        store.write_small(&orphan_d, orphan).await.unwrap();
        let broken = Bytes::from_static(b"committed, then damaged");
        let broken_d = Digest::sha256_of(&broken);
        store.write_small(&broken_d, broken).await.unwrap();
        fs::write(store.path(&broken_d), b"garbage").unwrap();
        index.put_blob("docker.io", &gone, 1).unwrap();
        let mut files = store.files().unwrap();
        let listed = files.len();
        assert_eq!(reconcile(&store, &index, &mut files).unwrap(), (1, 1, 1));
        assert_eq!(
            files.len(),
            listed - 1,
            "the removed file leaves the listing"
        );
        assert!(store.path(&orphan_d).exists());
        assert!(!store.path(&broken_d).exists());
        assert!(
            store.path(&dg).exists(),
            "indexed files are not re-hashed or touched"
        );
    }
}
