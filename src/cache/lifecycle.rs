//! Bounded disk: last-use tracking and eviction.
//!
//! Uses are recorded in memory and written to the index in batches. Eviction removes the least
//! recently used content until the cache is under 90% of `max_size` and the file system has
//! `min_free_disk` (plus 10%) free; content unused for longer than its upstream's `max_age` goes
//! whatever the size. Pinned images are never removed, and manifests go only after every blob.
//! A file a reader has open stays readable after it is unlinked, so eviction never breaks a
//! download in progress; fills write to `tmp/`, which eviction never touches.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use super::blobs::Store;
use super::index::{Index, millis};
use crate::oci::digest::Digest;

/// Recent uses not yet written to the index.
#[derive(Default)]
pub struct Uses {
    recent: Mutex<HashMap<Digest, u64>>,
}

impl Uses {
    /// Notes that `digest` was just served or stored.
    pub fn touch(&self, digest: &Digest) {
        let now = millis(SystemTime::now());
        self.recent
            .lock()
            .expect("uses")
            .insert(digest.clone(), now);
    }

    /// Writes the recorded uses to the index in one batch.
    pub fn flush(&self, index: &Index) -> sled::Result<()> {
        let batch: Vec<(Digest, u64)> = self.recent.lock().expect("uses").drain().collect();
        if batch.is_empty() {
            return Ok(());
        }
        index.put_access(&batch)
    }
}

/// What bounds the cache.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// 0: no cap.
    pub max_size: u64,
    /// 0: no floor.
    pub min_free_disk: u64,
    pub max_age: Option<Duration>,
    pub max_age_by_upstream: HashMap<String, Duration>,
}

impl Policy {
    pub fn is_active(&self) -> bool {
        self.max_size > 0
            || self.min_free_disk > 0
            || self.max_age.is_some()
            || !self.max_age_by_upstream.is_empty()
    }
}

/// One object chosen for removal.
#[derive(Debug, Clone)]
pub struct Victim {
    pub digest: Digest,
    /// The upstreams whose index entries name it.
    pub holders: Vec<String>,
    pub size: u64,
    pub last_use_ms: u64,
    pub reason: &'static str,
}

/// What eviction would remove.
#[derive(Debug, Default)]
pub struct Plan {
    pub victims: Vec<Victim>,
    pub usage_before: u64,
    pub freed: u64,
}

struct Candidate {
    digest: Digest,
    size: u64,
    last_use_ms: u64,
    manifest: bool,
    holders: Vec<String>,
}

/// Chooses what to evict (blocking: walks the store and reads the index).
pub fn plan(
    store: &Store,
    index: &Index,
    policy: &Policy,
    pinned: &HashSet<Digest>,
    free_disk: Option<u64>,
    now: SystemTime,
) -> io::Result<Plan> {
    let holders = index.holders().map_err(io::Error::other)?;
    let mut candidates = Vec::new();
    let mut usage = 0;
    for file in store.files()? {
        usage += file.size;
        let (Some(digest), size, mtime) = (file.digest, file.size, file.modified) else {
            continue;
        };
        if pinned.contains(&digest) {
            continue;
        }
        let last_use_ms = index
            .access(&digest)
            .map_err(io::Error::other)?
            .unwrap_or_else(|| millis(mtime));
        let (ups, manifest) = holders.get(&digest).cloned().unwrap_or_default();
        candidates.push(Candidate {
            digest,
            size,
            last_use_ms,
            manifest,
            holders: ups,
        });
    }
    let now_ms = millis(now);
    let mut out = Plan {
        usage_before: usage,
        ..Plan::default()
    };
    // Age first: content every holder's max_age has passed.
    let mut rest = Vec::new();
    for c in candidates {
        let ages: Vec<Option<Duration>> = if c.holders.is_empty() {
            vec![policy.max_age]
        } else {
            c.holders
                .iter()
                .map(|u| {
                    policy
                        .max_age_by_upstream
                        .get(u)
                        .copied()
                        .or(policy.max_age)
                })
                .collect()
        };
        let idle = Duration::from_millis(now_ms.saturating_sub(c.last_use_ms));
        if ages.iter().all(|a| a.is_some_and(|a| idle > a)) {
            out.freed += c.size;
            out.victims.push(victim(&c, "max_age"));
        } else {
            rest.push(c);
        }
    }
    // Then size: least recently used first, blobs before manifests.
    let low_water = (policy.max_size > 0).then(|| policy.max_size / 10 * 9);
    let need_free = match (policy.min_free_disk, free_disk) {
        (0, _) | (_, None) => 0,
        (floor, Some(free)) => (floor + floor / 10).saturating_sub(free),
    };
    rest.sort_by_key(|c| (c.manifest, c.last_use_ms));
    for c in rest {
        let over_cap = low_water.is_some_and(|low| usage - out.freed > low);
        let short_of_space = out.freed < need_free;
        if !over_cap && !short_of_space {
            break;
        }
        out.freed += c.size;
        out.victims.push(victim(
            &c,
            if over_cap {
                "max_size"
            } else {
                "min_free_disk"
            },
        ));
    }
    Ok(out)
}

fn victim(c: &Candidate, reason: &'static str) -> Victim {
    Victim {
        digest: c.digest.clone(),
        holders: c.holders.clone(),
        size: c.size,
        last_use_ms: c.last_use_ms,
        reason,
    }
}

/// Removes the planned objects: files first, then their index entries.
pub async fn execute(plan: &Plan, store: &Store, index: &Index) -> io::Result<u64> {
    let mut removed = 0;
    for v in &plan.victims {
        store.remove(&v.digest).await?;
        // The plan knows who holds it: no scan of the index per object.
        for up in &v.holders {
            index.forget_for(up, &v.digest).map_err(io::Error::other)?;
        }
        index.forget_access(&v.digest).map_err(io::Error::other)?;
        removed += 1;
    }
    Ok(removed)
}

impl Policy {
    /// The policy a config asks for.
    pub fn from_config(config: &crate::config::Config) -> Policy {
        Policy {
            max_size: config.cache.max_size,
            min_free_disk: config.cache.min_free_disk,
            max_age: config.cache.max_age,
            max_age_by_upstream: config
                .upstreams
                .iter()
                .filter_map(|(n, u)| Some((n.clone(), u.max_age?)))
                .collect(),
        }
    }
}

/// The digests of every pinned image that is cached: each pin is resolved like a pull, through
/// the router, to its cached tag (or digest).
pub fn pinned(config: &crate::config::Config, store: &Store, index: &Index) -> HashSet<Digest> {
    let router = crate::proxy::Router::new(config);
    let read = |d: &Digest| std::fs::read(store.path(d)).ok();
    let mut out = HashSet::new();
    for pin in &config.cache.pin {
        let Ok(r) = pin.parse::<crate::oci::image_ref::ImageRef>() else {
            continue;
        };
        let name = r.request_name();
        let Ok(route) = router.route(&name, None) else {
            continue;
        };
        let root = match (&r.digest, &r.tag) {
            (Some(d), _) => Some(d.clone()),
            (None, tag) => {
                let tag = tag
                    .clone()
                    .unwrap_or_else(|| "latest".parse().expect("valid tag"));
                index
                    .tag(&route.upstream, &route.repo, &tag)
                    .ok()
                    .flatten()
                    .and_then(|e| e.digest())
            }
        };
        if let Some(root) = root {
            out.extend(image_digests(&root, &read));
        }
    }
    out
}

/// Every digest an image needs: the manifest, and for an index every child; for a manifest
/// its config and layers. `read` gives a cached manifest's bytes.
pub fn image_digests(root: &Digest, read: &dyn Fn(&Digest) -> Option<Vec<u8>>) -> HashSet<Digest> {
    let mut out = HashSet::new();
    let mut todo = vec![root.clone()];
    while let Some(d) = todo.pop() {
        if !out.insert(d.clone()) {
            continue;
        }
        let Some(bytes) = read(&d) else { continue };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        let digest_at = |x: &serde_json::Value| x["digest"].as_str().and_then(|s| s.parse().ok());
        for child in v["manifests"].as_array().into_iter().flatten() {
            todo.extend(digest_at(child));
        }
        out.extend(digest_at(&v["config"]));
        for layer in v["layers"].as_array().into_iter().flatten() {
            out.extend(digest_at(layer));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    async fn put(store: &Store, index: &Index, content: &str, used_ms: u64) -> Digest {
        let b = Bytes::from(content.to_owned());
        let d = Digest::sha256_of(&b);
        store.write_small(&d, b.clone()).await.unwrap();
        index.put_blob("docker.io", &d, b.len() as u64).unwrap();
        index.put_access(&[(d.clone(), used_ms)]).unwrap();
        d
    }

    #[tokio::test]
    async fn least_recently_used_goes_first_and_pins_stay() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let index = Index::open(&dir.path().join("index")).unwrap();
        let now = SystemTime::now();
        let t = millis(now);
        // Five 100-byte objects used at different times.
        let mut ds = Vec::new();
        for i in 0..5u64 {
            let content = format!("{i}{}", "x".repeat(99));
            ds.push(put(&store, &index, &content, t - 1000 * (5 - i)).await);
        }
        let policy = Policy {
            max_size: 350,
            ..Policy::default()
        };
        // Usage 500 > 350: down to 315 (90%), so the two oldest go, unless pinned.
        let p = plan(&store, &index, &policy, &HashSet::new(), None, now).unwrap();
        let gone: Vec<_> = p.victims.iter().map(|v| v.digest.clone()).collect();
        assert_eq!(gone, vec![ds[0].clone(), ds[1].clone()]);
        let pinned: HashSet<Digest> = [ds[0].clone()].into();
        let p = plan(&store, &index, &policy, &pinned, None, now).unwrap();
        let gone: Vec<_> = p.victims.iter().map(|v| v.digest.clone()).collect();
        assert_eq!(gone, vec![ds[1].clone(), ds[2].clone()]);

        execute(&p, &store, &index).await.unwrap();
        assert!(!store.path(&ds[1]).exists());
        assert!(store.path(&ds[0]).exists());
        assert_eq!(index.blob("docker.io", &ds[1]).unwrap(), None);
    }

    #[tokio::test]
    async fn low_free_space_evicts_oldest_until_the_floor_plus_a_tenth_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let index = Index::open(&dir.path().join("index")).unwrap();
        let now = SystemTime::now();
        let t = millis(now);
        let mut ds = Vec::new();
        for i in 0..4u64 {
            let content = format!("{i}{}", "y".repeat(99));
            ds.push(put(&store, &index, &content, t - 1000 * (4 - i)).await);
        }
        let policy = Policy {
            min_free_disk: 200,
            ..Policy::default()
        };
        // 50 bytes free, 220 wanted, 170 short: the two oldest 100-byte objects go.
        let p = plan(&store, &index, &policy, &HashSet::new(), Some(50), now).unwrap();
        let gone: Vec<_> = p.victims.iter().map(|v| v.digest.clone()).collect();
        assert_eq!(gone, ds[..2].to_vec());
        assert!(p.victims.iter().all(|v| v.reason == "min_free_disk"));
        // Enough free: nothing goes.
        let p = plan(&store, &index, &policy, &HashSet::new(), Some(10_000), now).unwrap();
        assert!(p.victims.is_empty());
    }

    #[tokio::test]
    async fn max_age_per_upstream() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let index = Index::open(&dir.path().join("index")).unwrap();
        let now = SystemTime::now();
        let old = put(&store, &index, "old", millis(now) - 10_000).await;
        let fresh = put(&store, &index, "fresh", millis(now) - 1_000).await;
        let policy = Policy {
            max_age_by_upstream: [("docker.io".to_owned(), Duration::from_secs(5))].into(),
            ..Policy::default()
        };
        let p = plan(&store, &index, &policy, &HashSet::new(), None, now).unwrap();
        assert_eq!(p.victims.len(), 1);
        assert_eq!(p.victims[0].digest, old);
        assert_eq!(p.victims[0].reason, "max_age");
        let _ = fresh;
    }

    #[test]
    fn an_image_pins_its_children_config_and_layers() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let index_doc = format!(r#"{{"manifests":[{{"digest":"{}"}}]}}"#, d('b'));
        let child = format!(
            r#"{{"config":{{"digest":"{}"}},"layers":[{{"digest":"{}"}}]}}"#,
            d('c'),
            d('e')
        );
        let read = |x: &Digest| -> Option<Vec<u8>> {
            if x.to_string() == d('a') {
                Some(index_doc.clone().into_bytes())
            } else if x.to_string() == d('b') {
                Some(child.clone().into_bytes())
            } else {
                None
            }
        };
        let got = image_digests(&d('a').parse().unwrap(), &read);
        let want: HashSet<Digest> = ['a', 'b', 'c', 'e']
            .iter()
            .map(|c| d(*c).parse().unwrap())
            .collect();
        assert_eq!(got, want);
    }
}

/// One cached tag, for `regcache ls` and `/admin/ls`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub upstream: String,
    pub repo: String,
    pub tag: String,
    pub digest: String,
    /// The manifest plus every config and layer it names that is on disk.
    pub size: u64,
    /// Last use of the manifest, ms since the epoch (0: unknown).
    pub last_use_ms: u64,
}

/// Every cached tag, optionally of one upstream and one repository.
pub fn list(
    store: &Store,
    index: &Index,
    upstream: Option<&str>,
    repo: Option<&str>,
) -> io::Result<Vec<Listed>> {
    let read = |d: &Digest| std::fs::read(store.path(d)).ok();
    let mut out = Vec::new();
    for (up, r, tag, digest) in index.tags().map_err(io::Error::other)? {
        if upstream.is_some_and(|u| u != up) || repo.is_some_and(|x| x != r) {
            continue;
        }
        let Ok(d) = digest.parse::<Digest>() else {
            continue;
        };
        let size = image_digests(&d, &read)
            .iter()
            .filter_map(|x| std::fs::metadata(store.path(x)).ok())
            .map(|m| m.len())
            .sum();
        let last_use_ms = index.access(&d).map_err(io::Error::other)?.unwrap_or(0);
        out.push(Listed {
            upstream: up,
            repo: r,
            tag,
            digest,
            size,
            last_use_ms,
        });
    }
    out.sort_by(|a, b| (&a.upstream, &a.repo, &a.tag).cmp(&(&b.upstream, &b.repo, &b.tag)));
    Ok(out)
}
