//! The sled index: which digests each upstream is known to have, manifest media types, and
//! tag -> digest with the time the tag was last confirmed upstream.
//!
//! Keys are `upstream \0 ...`; values are small JSON documents. The files themselves live in
//! [`super::blobs::Store`]; an entry whose file is gone is treated as absent and dropped.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::oci::digest::Digest;
use crate::oci::reference::{RepoName, Tag};

/// The index database.
#[derive(Clone)]
pub struct Index {
    blobs: sled::Tree,
    manifests: sled::Tree,
    tags: sled::Tree,
    /// digest -> last use (ms since the epoch, big-endian), written in batches.
    access: sled::Tree,
    /// `upstream \0 digest \0 repo` -> (): the repositories upstream served a digest for
    /// (private content isolation: a digest is served only for repositories known to hold it).
    seen_in: sled::Tree,
}

/// A manifest known for an upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub media_type: String,
    pub size: u64,
}

/// A tag's last known target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagEntry {
    pub digest: String,
    pub media_type: String,
    /// When upstream last confirmed this tag, in milliseconds since the Unix epoch.
    pub checked_ms: u64,
}

impl TagEntry {
    pub fn digest(&self) -> Option<Digest> {
        self.digest.parse().ok()
    }

    /// How long ago upstream confirmed the tag.
    pub fn age(&self, now: SystemTime) -> Duration {
        Duration::from_millis(millis(now).saturating_sub(self.checked_ms))
    }
}

pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn key(parts: &[&str]) -> Vec<u8> {
    parts.join("\0").into_bytes()
}

impl Index {
    pub fn open(path: &Path) -> sled::Result<Index> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(64 << 20)
            .flush_every_ms(Some(500))
            .open()?;
        Ok(Index {
            blobs: db.open_tree("blobs")?,
            manifests: db.open_tree("manifests")?,
            tags: db.open_tree("tags")?,
            access: db.open_tree("access")?,
            seen_in: db.open_tree("seen_in")?,
        })
    }

    /// The size of a blob this upstream is known to serve, if recorded.
    pub fn blob(&self, upstream: &str, digest: &Digest) -> sled::Result<Option<u64>> {
        Ok(self
            .blobs
            .get(key(&[upstream, &digest.to_string()]))?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    pub fn put_blob(&self, upstream: &str, digest: &Digest, size: u64) -> sled::Result<()> {
        self.blobs
            .insert(key(&[upstream, &digest.to_string()]), &size.to_be_bytes())?;
        Ok(())
    }

    pub fn remove_blob(&self, upstream: &str, digest: &Digest) -> sled::Result<()> {
        self.blobs.remove(key(&[upstream, &digest.to_string()]))?;
        Ok(())
    }

    pub fn manifest(&self, upstream: &str, digest: &Digest) -> sled::Result<Option<ManifestEntry>> {
        get_json(&self.manifests, key(&[upstream, &digest.to_string()]))
    }

    pub fn put_manifest(
        &self,
        upstream: &str,
        digest: &Digest,
        e: &ManifestEntry,
    ) -> sled::Result<()> {
        put_json(&self.manifests, key(&[upstream, &digest.to_string()]), e)
    }

    pub fn remove_manifest(&self, upstream: &str, digest: &Digest) -> sled::Result<()> {
        self.manifests
            .remove(key(&[upstream, &digest.to_string()]))?;
        Ok(())
    }

    pub fn tag(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
    ) -> sled::Result<Option<TagEntry>> {
        get_json(&self.tags, key(&[upstream, repo.as_str(), tag.as_str()]))
    }

    pub fn put_tag(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        e: &TagEntry,
    ) -> sled::Result<()> {
        put_json(&self.tags, key(&[upstream, repo.as_str(), tag.as_str()]), e)
    }

    pub fn remove_tag(&self, upstream: &str, repo: &RepoName, tag: &Tag) -> sled::Result<()> {
        self.tags
            .remove(key(&[upstream, repo.as_str(), tag.as_str()]))?;
        Ok(())
    }

    /// Records last-use times (one batch per flush, not one write per request).
    pub fn put_access(&self, uses: &[(Digest, u64)]) -> sled::Result<()> {
        let mut batch = sled::Batch::default();
        for (d, ms) in uses {
            batch.insert(d.to_string().as_bytes(), &ms.to_be_bytes());
        }
        self.access.apply_batch(batch)
    }

    /// When a digest was last used, if recorded.
    pub fn access(&self, digest: &Digest) -> sled::Result<Option<u64>> {
        Ok(self
            .access
            .get(digest.to_string().as_bytes())?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    /// For every digest with an entry: the upstreams holding it, and whether it is a manifest.
    pub fn holders(&self) -> sled::Result<std::collections::HashMap<Digest, (Vec<String>, bool)>> {
        let mut out: std::collections::HashMap<Digest, (Vec<String>, bool)> = Default::default();
        for (tree, is_manifest) in [(&self.blobs, false), (&self.manifests, true)] {
            for kv in tree.iter() {
                let (k, _) = kv?;
                let k = String::from_utf8_lossy(&k);
                if let Some((up, d)) = k.split_once('\0')
                    && let Ok(d) = d.parse::<Digest>()
                {
                    let e = out.entry(d).or_default();
                    e.1 |= is_manifest;
                    if !e.0.iter().any(|u| u == up) {
                        e.0.push(up.to_owned());
                    }
                }
            }
        }
        Ok(out)
    }

    /// Every (upstream, digest) with a blob or manifest entry.
    pub fn entries(&self) -> sled::Result<Vec<(String, Digest)>> {
        let mut out = Vec::new();
        for tree in [&self.blobs, &self.manifests] {
            for kv in tree.iter() {
                let (k, _) = kv?;
                let k = String::from_utf8_lossy(&k);
                if let Some((up, d)) = k.split_once('\0')
                    && let Ok(d) = d.parse()
                {
                    out.push((up.to_owned(), d));
                }
            }
        }
        Ok(out)
    }

    /// Records that upstream served (or confirmed) `digest` for `repo`.
    pub fn put_seen(&self, upstream: &str, digest: &Digest, repo: &RepoName) -> sled::Result<()> {
        self.seen_in.insert(
            key(&[upstream, &digest.to_string(), repo.as_str()]),
            &[] as &[u8],
        )?;
        Ok(())
    }

    /// Whether upstream is known to hold `digest` in `repo`.
    pub fn seen(&self, upstream: &str, digest: &Digest, repo: &RepoName) -> sled::Result<bool> {
        self.seen_in
            .contains_key(key(&[upstream, &digest.to_string(), repo.as_str()]))
    }

    /// Drops one upstream's blob and manifest entries for a digest.
    pub fn forget_for(&self, upstream: &str, digest: &Digest) -> sled::Result<()> {
        self.remove_blob(upstream, digest)?;
        self.remove_manifest(upstream, digest)?;
        let mut prefix = key(&[upstream, &digest.to_string()]);
        prefix.push(0);
        for k in self.seen_in.scan_prefix(prefix).keys() {
            self.seen_in.remove(k?)?;
        }
        Ok(())
    }

    /// Drops every upstream's entries for a digest (its file is gone or bad).
    pub fn forget(&self, digest: &Digest) -> sled::Result<()> {
        for (up, d) in self.entries()? {
            if &d == digest {
                self.forget_for(&up, &d)?;
            }
        }
        self.forget_access(digest)
    }

    /// Drops a digest's last-use record.
    pub fn forget_access(&self, digest: &Digest) -> sled::Result<()> {
        self.access.remove(digest.to_string().as_bytes())?;
        Ok(())
    }

    /// Every tag entry: (upstream, repo, tag, digest).
    pub fn tags(&self) -> sled::Result<Vec<(String, String, String, String)>> {
        let mut out = Vec::new();
        for kv in self.tags.iter() {
            let (k, v) = kv?;
            let k = String::from_utf8_lossy(&k).into_owned();
            let mut parts = k.splitn(3, '\0');
            let (Some(up), Some(repo), Some(tag)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if let Ok(e) = serde_json::from_slice::<TagEntry>(&v) {
                out.push((up.to_owned(), repo.to_owned(), tag.to_owned(), e.digest));
            }
        }
        Ok(out)
    }

    /// Whether the index answers a read.
    pub fn check(&self) -> sled::Result<()> {
        self.tags.first().map(|_| ())
    }

    /// Writes everything to disk (at shutdown).
    pub fn flush(&self) -> sled::Result<()> {
        // One flush writes the whole database, every tree included.
        self.tags.flush()?;
        Ok(())
    }
}

fn get_json<T: for<'de> Deserialize<'de>>(
    tree: &sled::Tree,
    k: Vec<u8>,
) -> sled::Result<Option<T>> {
    Ok(tree.get(k)?.and_then(|v| serde_json::from_slice(&v).ok()))
}

fn put_json<T: Serialize>(tree: &sled::Tree, k: Vec<u8>, v: &T) -> sled::Result<()> {
    tree.insert(k, serde_json::to_vec(v).expect("index entries serialize"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"x");
        let repo: RepoName = "library/alpine".parse().unwrap();
        let tag: Tag = "3.19".parse().unwrap();
        assert_eq!(idx.blob("hub", &d).unwrap(), None);
        idx.put_blob("hub", &d, 42).unwrap();
        assert_eq!(idx.blob("hub", &d).unwrap(), Some(42));
        assert_eq!(idx.blob("other", &d).unwrap(), None);
        let e = TagEntry {
            digest: d.to_string(),
            media_type: "m".into(),
            checked_ms: millis(SystemTime::now()) - 1500,
        };
        idx.put_tag("hub", &repo, &tag, &e).unwrap();
        let got = idx.tag("hub", &repo, &tag).unwrap().unwrap();
        assert_eq!(got, e);
        assert!(got.age(SystemTime::now()) >= Duration::from_millis(1500));
        idx.remove_tag("hub", &repo, &tag).unwrap();
        assert_eq!(idx.tag("hub", &repo, &tag).unwrap(), None);
        let other: RepoName = "library/alpine2".parse().unwrap();
        idx.put_seen("hub", &d, &repo).unwrap();
        assert!(idx.seen("hub", &d, &repo).unwrap());
        assert!(!idx.seen("hub", &d, &other).unwrap());
        assert!(!idx.seen("other", &d, &repo).unwrap());
        idx.forget_for("hub", &d).unwrap();
        assert!(!idx.seen("hub", &d, &repo).unwrap());
    }
}
