//! The pull-through policy: which upstream a name goes to, and when to ask it.
//!
//! - Manifests by digest and blobs are immutable: local first, upstream once (single flight).
//! - Tags are remote-first with a TTL: within `tag_ttl` no upstream contact; after it a `HEAD`
//!   revalidates (bounded by `revalidate_timeout`), and if upstream fails the cached tag is
//!   served stale for up to `max_stale`.
//! - A blob on disk is served for any repository of the upstream that fetched it; for another
//!   upstream only after that upstream confirms it has the blob (a `HEAD`).

pub mod admin;
mod blobs;
mod isolation;
mod listings;
mod manifests;
pub mod router;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;

pub use blobs::{BlobAnswer, BlobBody};
pub use listings::{Listed, Listing};
pub use manifests::Manifest;
pub use router::{Route, Router};

use crate::cache::blobs::Store;
use crate::cache::flight::{Fills, Group};
use crate::cache::index::Index;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::oci::image_ref::Name;
use crate::oci::reference::RepoName;
use crate::upstream::{Upstream, UpstreamError, UpstreamRequest};

/// What the cache did for a request, reported in `Cache-Status` and the request log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    /// Served from the cache without asking upstream.
    Hit,
    /// Fetched from upstream (and stored where it is cacheable).
    Miss,
    /// Joined a fetch already in flight for the same object.
    Coalesced,
    /// Upstream confirmed the cached tag.
    Revalidated,
    /// Served from the cache because upstream failed or was too slow.
    Stale,
    /// Streamed from upstream without caching: the disk takes no writes.
    Passthrough,
    /// Not on this replica's disk; fetched from the bucket shared with other replicas.
    Shared,
}

impl CacheResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Coalesced => "coalesced",
            CacheResult::Revalidated => "revalidated",
            CacheResult::Stale => "stale",
            CacheResult::Passthrough => "passthrough",
            CacheResult::Shared => "shared",
        }
    }

    /// The RFC 9211 `Cache-Status` value.
    pub fn cache_status(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            CacheResult::Hit => "regcache; hit",
            CacheResult::Miss => "regcache; fwd=uri-miss; stored",
            CacheResult::Coalesced => "regcache; fwd=uri-miss; collapsed",
            CacheResult::Revalidated => "regcache; fwd=stale; fwd-status=200",
            CacheResult::Stale => "regcache; hit; detail=stale-upstream-unavailable",
            CacheResult::Passthrough => {
                "regcache; fwd=uri-miss; detail=not-stored-disk-unavailable"
            }
            CacheResult::Shared => "regcache; hit; detail=shared-bucket",
        })
    }
}

/// Where a request goes: an upstream and the repository name there.
#[derive(Clone)]
pub struct Target {
    pub upstream: Arc<Upstream>,
    pub repo: RepoName,
}

/// The client's side of a request that matters upstream.
#[derive(Default, Clone)]
pub struct ClientInfo {
    /// The `Accept` header values, joined.
    pub accept: String,
    /// The client's `Authorization`, forwarded only to upstreams configured to receive it.
    pub authorization: Option<HeaderValue>,
}

/// Largest manifest regcache accepts from upstream (the OCI spec's 4 MiB).
pub const MAX_DOCUMENT: usize = 4 << 20;

type ManifestKey = (String, RepoName, String, String);
type TagsKey = (String, RepoName, String);
/// Concurrent fetches of one manifest share one upstream request.
type ManifestFlights = Group<ManifestKey, Result<Arc<Manifest>, Arc<Error>>>;

/// The cache and its upstreams.
pub struct Proxy {
    config: Arc<Config>,
    /// Client authentication and access rules.
    access: crate::access::Access,
    upstreams: HashMap<String, Arc<Upstream>>,
    /// Route name (upstream name or host, lowercase) -> upstream name.
    router: Router,
    store: Store,
    index: Index,
    hot_manifests: moka::sync::Cache<crate::oci::digest::Digest, Arc<Manifest>>,
    /// `tags/list` and referrers answers.
    listings: listings::Listings,
    /// Tags upstream recently said it does not have, and repositories (keyed by a referrers
    /// endpoint) where it said it has no referrers API.
    missing_tags: moka::sync::Cache<TagsKey, ()>,
    /// (upstream, repo, digest) an upstream `HEAD` confirmed within `tag_ttl`
    /// (`verify_access`).
    access_checked: moka::sync::Cache<(String, RepoName, crate::oci::digest::Digest), ()>,
    manifest_flights: Arc<ManifestFlights>,
    revalidations: Arc<Group<ManifestKey, Result<manifests::Revalidation, Arc<Error>>>>,
    fills: Arc<Fills>,
    /// The tier shared with other replicas (`storage.kind = "s3"`).
    bucket: Option<Arc<crate::cache::bucket::Bucket>>,
    metrics: Arc<Metrics>,
    /// Last uses not yet written to the index (for LRU eviction).
    uses: crate::cache::lifecycle::Uses,
    /// Pokes the GC loop when a commit takes the cache over its cap.
    gc_now: Arc<tokio::sync::Notify>,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("index: {0}")]
    Index(#[from] sled::Error),
    #[error("upstream {name}: {source}")]
    Upstream { name: String, source: UpstreamError },
    #[error("{}", .0.join("; "))]
    Access(Vec<String>),
    #[error("{0}")]
    Bucket(String),
}

impl Proxy {
    pub fn new(config: Arc<Config>) -> Result<Arc<Proxy>, StartError> {
        let access = crate::access::Access::from_config(&config).map_err(StartError::Access)?;
        let data = &config.data_dir;
        // The index first: its lock fails a second process on a data dir in use before the
        // store's opening clears `tmp/`, where the running one's fills are being written.
        let index = Index::open(&data.join("index"))?;
        let store = Store::open(data).map_err(|source| StartError::DataDir {
            path: data.clone(),
            source,
        })?;
        // One walk of the store, off the start-up path: reconcile the index with the files
        // (after a crash the index may name files that never made it to disk, and files may
        // lack their entry; until then a missing file is dropped when asked for, and an
        // unindexed one is served once an upstream confirms it), then count what is there.
        {
            let (store, index) = (store.clone(), index.clone());
            let opened = std::time::SystemTime::now();
            std::thread::Builder::new()
                .name("regcache-startup".into())
                .spawn(move || {
                    let mut files = match store.files() {
                        Ok(f) => f,
                        Err(e) => {
                            tracing::warn!(error = %e, "listing the cache failed");
                            return;
                        }
                    };
                    match crate::cache::verify::reconcile(&store, &index, &mut files) {
                        Ok((0, 0, 0)) => {}
                        Ok((dropped, kept, removed)) => tracing::info!(
                            dropped_entries = dropped,
                            unindexed_kept = kept,
                            unindexed_corrupt_removed = removed,
                            "index reconciled with the files"
                        ),
                        Err(e) => tracing::warn!(error = %e, "reconciling the index failed"),
                    }
                    store.count_existing(&files, opened);
                })
                .map_err(|source| StartError::DataDir {
                    path: data.clone(),
                    source,
                })?;
        }
        let metrics = Arc::new(Metrics::new());
        let mut upstreams = HashMap::new();
        for (name, cfg) in &config.upstreams {
            let up = Upstream::new(name, cfg, Arc::clone(&metrics)).map_err(|source| {
                StartError::Upstream {
                    name: name.clone(),
                    source,
                }
            })?;
            upstreams.insert(name.clone(), Arc::new(up));
        }
        let router = Router::new(&config);
        let hot_manifests = moka::sync::Cache::builder()
            .max_capacity(config.cache.manifest_memory)
            .weigher(|_, m: &Arc<Manifest>| m.bytes.len().try_into().unwrap_or(u32::MAX))
            .build();
        let listings = listings::Listings::new(&config.cache);
        let missing_tags = moka::sync::Cache::builder()
            .max_capacity(if config.cache.negative_ttl.is_zero() {
                0
            } else {
                100_000
            })
            .time_to_live(
                config
                    .cache
                    .negative_ttl
                    .max(std::time::Duration::from_millis(1)),
            )
            .build();
        let access_checked = moka::sync::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(config.cache.tag_ttl)
            .build();
        let bucket = match config.storage.kind {
            crate::config::StorageKind::Local => None,
            crate::config::StorageKind::S3 => Some(Arc::new(
                crate::cache::bucket::Bucket::new(&config.storage.s3, Arc::clone(&metrics))
                    .map_err(StartError::Bucket)?,
            )),
        };
        Ok(Arc::new(Proxy {
            access_checked,
            config,
            access,
            upstreams,
            router,
            store,
            index,
            hot_manifests,
            listings,
            missing_tags,
            manifest_flights: Arc::default(),
            revalidations: Arc::default(),
            fills: Arc::default(),
            bucket,
            metrics,
            uses: Default::default(),
            gc_now: Arc::default(),
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The tier shared with other replicas, if configured.
    pub fn bucket(&self) -> Option<&Arc<crate::cache::bucket::Bucket>> {
        self.bucket.as_ref()
    }

    /// Who may pull what.
    pub fn access(&self) -> &crate::access::Access {
        &self.access
    }

    /// The store and index, for listings off the async threads.
    pub fn store_and_index(&self) -> (Store, Index) {
        (self.store.clone(), self.index.clone())
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The metrics exposition, with the disk gauges brought up to date.
    pub fn render_metrics(&self) -> (String, Vec<u8>) {
        let (bytes, objects) = self.store.usage();
        self.metrics.cache_bytes.set(bytes as i64);
        self.metrics.cache_objects.set(objects as i64);
        if let Some((free, total)) = self.store.free_space() {
            self.metrics.disk_free.set(free as i64);
            self.metrics.disk_size.set(total as i64);
        }
        self.metrics.render()
    }

    /// Why the cache cannot serve, if it cannot: the index must answer and the data dir must
    /// take a write.
    pub fn readiness(&self) -> std::result::Result<(), String> {
        self.index.check().map_err(|e| format!("index: {e}"))?;
        self.store
            .check_writable()
            .map_err(|e| format!("data dir: {e}"))
    }

    /// Runs the lifecycle loop until the proxy is dropped: writes last uses to the index and
    /// evicts by size, free space and age every `gc_interval`, or at once when a commit takes
    /// the cache over `max_size`. Holds the proxy only while working.
    pub fn start_lifecycle(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let interval = self.config.cache.gc_interval;
        let wake = Arc::clone(&self.gc_now);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(interval) => {}
                }
                let Some(proxy) = weak.upgrade() else { return };
                if let Err(e) = proxy.collect(false).await {
                    tracing::warn!(error = %e, "cache eviction failed");
                }
                drop(proxy);
            }
        });
    }

    /// One lifecycle pass (see [`Proxy::start_lifecycle`]); with `dry_run`, only the plan.
    pub async fn collect(
        self: &Arc<Self>,
        dry_run: bool,
    ) -> std::io::Result<crate::cache::lifecycle::Plan> {
        use crate::cache::lifecycle;
        self.uses
            .flush(&self.index)
            .map_err(std::io::Error::other)?;
        let policy = lifecycle::Policy::from_config(&self.config);
        if !policy.is_active() {
            return Ok(lifecycle::Plan::default());
        }
        let this = Arc::clone(self);
        let plan = tokio::task::spawn_blocking(move || {
            let pinned = lifecycle::pinned(&this.config, &this.store, &this.index);
            let free = this.store.free_space().map(|(free, _)| free);
            lifecycle::plan(
                &this.store,
                &this.index,
                &policy,
                &pinned,
                free,
                std::time::SystemTime::now(),
            )
        })
        .await
        .map_err(std::io::Error::other)??;
        if !dry_run && !plan.victims.is_empty() {
            for v in &plan.victims {
                self.hot_manifests.invalidate(&v.digest);
            }
            let n = lifecycle::execute(&plan, &self.store, &self.index).await?;
            self.metrics.evictions.inc_by(n);
            tracing::info!(objects = n, bytes = plan.freed, "evicted cached content");
        }
        Ok(plan)
    }

    /// Notes a use of cached content (for LRU eviction); cheap, in memory.
    pub(crate) fn touch(&self, digest: &crate::oci::digest::Digest) {
        self.uses.touch(digest);
    }

    /// After a commit: wake the lifecycle loop if the cache is over its cap.
    pub(crate) fn committed(&self, digest: &crate::oci::digest::Digest) {
        self.touch(digest);
        let cap = self.config.cache.max_size;
        if cap > 0 && self.store.usage().0 > cap {
            self.gc_now.notify_one();
        }
    }

    /// Waits (up to `deadline`) for background work to end: blob fills committing, and
    /// revalidations finishing. Each holds the index; a restart on the same data dir needs it.
    pub async fn drain(self: &Arc<Self>, deadline: std::time::Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            // Only our own reference left: no task holds the proxy, no fill is running, and
            // no blob is still on its way to the shared bucket.
            let uploading = self.bucket.as_ref().map_or(0, |b| b.uploads_in_flight());
            if self.fills.is_empty() && Arc::strong_count(self) == 1 && uploading == 0 {
                return true;
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Writes the index out (at shutdown).
    pub fn flush(&self) -> Result<()> {
        self.uses.flush(&self.index)?;
        Ok(self.index.flush()?)
    }

    /// `/v2/`, when the default upstream is the one that passes the client's credentials on:
    /// upstream's word on them. dockerd and containers/image (podman, CRI-O, skopeo) ping
    /// `/v2/` first and send credentials only where it challenged them, so the challenge must
    /// be upstream's. With several such upstreams `/v2/` cannot know which one the client
    /// means, and a challenge from the wrong one would send the client's password to that
    /// one's realm: it answers 200, as without any. While upstream cannot answer (within
    /// `revalidate_timeout`), the ping succeeds and the requests after it get the errors;
    /// offline, upstream is not asked.
    pub async fn check_base(&self, client: &ClientInfo) -> Result<()> {
        let mut passing = self.upstreams.values().filter(|u| u.passes_client_auth());
        let (Some(up), None) = (passing.next(), passing.next()) else {
            return Ok(());
        };
        if up.name != self.config.default_upstream || self.config.cache.offline {
            return Ok(());
        }
        let wait = self.config.cache.revalidate_timeout;
        let Ok(Ok(resp)) = tokio::time::timeout(wait, up.ping(client.authorization.as_ref())).await
        else {
            return Ok(());
        };
        let (parts, body) = resp.into_parts();
        // Read to its end, so that the connection goes back to the pool.
        let _ = tokio::time::timeout(wait, Limited::new(body, 64 << 10).collect()).await;
        match parts.status {
            StatusCode::UNAUTHORIZED => Err(Error::UpstreamChallenge {
                upstream: up.name.clone(),
                repo: "/v2/".to_owned(),
                challenge: parts.headers.get(header::WWW_AUTHENTICATE).cloned(),
            }),
            _ => Ok(()),
        }
    }

    /// Maps a client's repository name (and containerd's `ns`) to an upstream repository:
    /// `ns` first, then aliases, then a path prefix naming an upstream, else the default
    /// upstream. Docker Hub's one-component names get `library/`.
    pub fn resolve(&self, name: &Name, ns: Option<&str>) -> Result<Target> {
        let route = self.router.route(name, ns)?;
        Ok(Target {
            upstream: Arc::clone(&self.upstreams[&route.upstream]),
            repo: route.repo,
        })
    }
}

/// A `HEAD` of `path` (e.g. `blobs/<digest>`) in the target's repository, with the client's
/// credentials where the upstream passes them on.
async fn head(
    t: &Target,
    path: &str,
    accept: Option<&str>,
    client: &ClientInfo,
) -> Result<Response<Incoming>> {
    send(
        t,
        UpstreamRequest {
            method: http::Method::HEAD,
            repo: &t.repo,
            path,
            query: None,
            accept,
            client_auth: client.authorization.as_ref(),
        },
    )
    .await
}

/// Sends a request to a target's upstream, mapping transport failures.
async fn send(t: &Target, req: UpstreamRequest<'_>) -> Result<Response<Incoming>> {
    t.upstream.send(req).await.map_err(|source| match source {
        UpstreamError::RateLimited(d) => Error::UpstreamRateLimited {
            upstream: t.upstream.name.clone(),
            retry_after: Some(HeaderValue::from(d.as_secs().max(1))),
        },
        source => Error::Upstream {
            upstream: t.upstream.name.clone(),
            source,
        },
    })
}

/// Failures that mean "upstream is unwell", where a cached answer beats an error.
fn serves_stale(e: &Error) -> bool {
    match e.root() {
        Error::Upstream { .. }
        | Error::UpstreamRateLimited { .. }
        | Error::UpstreamInvalid { .. }
        | Error::DigestMismatch { .. } => true,
        Error::UpstreamStatus { status, .. } => status.is_server_error(),
        _ => false,
    }
}

/// Passes a 2xx answer on; turns every other status into the error a client should see.
fn expect_ok(
    t: &Target,
    resp: Response<Incoming>,
    not_found: impl FnOnce() -> Error,
) -> Result<Response<Incoming>> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    Err(status_error(t, status, resp.headers(), not_found))
}

fn status_error(
    t: &Target,
    status: StatusCode,
    headers: &HeaderMap,
    not_found: impl FnOnce() -> Error,
) -> Error {
    let upstream = t.upstream.name.clone();
    match status {
        StatusCode::NOT_FOUND => not_found(),
        // The client's own credentials were asked for: let it answer the challenge.
        StatusCode::UNAUTHORIZED if t.upstream.passes_client_auth() => Error::UpstreamChallenge {
            upstream,
            repo: t.repo.to_string(),
            challenge: headers.get(header::WWW_AUTHENTICATE).cloned(),
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Error::UpstreamDenied {
            upstream,
            repo: t.repo.to_string(),
            status,
        },
        StatusCode::TOO_MANY_REQUESTS => Error::UpstreamRateLimited {
            upstream,
            retry_after: headers.get(header::RETRY_AFTER).cloned(),
        },
        status => Error::UpstreamStatus { upstream, status },
    }
}

/// Reads a small upstream body (manifest, tag list) whole, within `limit` bytes and the deadline.
async fn read_document(t: &Target, body: Incoming, limit: usize) -> Result<Bytes> {
    let deadline = t.upstream.read_timeout();
    let upstream_err = |source| Error::Upstream {
        upstream: t.upstream.name.clone(),
        source,
    };
    let result = match tokio::time::timeout(deadline, Limited::new(body, limit).collect()).await {
        Err(_) => Err(UpstreamError::Timeout(deadline)),
        Ok(Err(e)) => Err(UpstreamError::Io(e.to_string())),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    };
    match result {
        Ok(bytes) => {
            t.upstream.count_fetched(bytes.len() as u64);
            Ok(bytes)
        }
        Err(e) => {
            if let Some(reason) = e.reason() {
                t.upstream.count_error(reason);
            }
            Err(upstream_err(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn proxy(extra: &str) -> (tempfile::TempDir, Arc<Proxy>) {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"
            data_dir = "{}"
            [upstreams."docker.io"]
            urls = ["https://registry-1.docker.io"]
            [upstreams.ghcr]
            urls = ["https://ghcr.io"]
            [upstreams.corp]
            urls = ["https://registry.corp.example:5443"]
            hosts = ["registry.corp.example"]
            {extra}
            "#,
            dir.path().display()
        );
        let config = Config::parse(&text, Path::new("t")).unwrap();
        (dir, Proxy::new(Arc::new(config)).unwrap())
    }

    fn resolve(p: &Proxy, name: &str, ns: Option<&str>) -> Result<(String, String)> {
        let t = p.resolve(&name.parse::<Name>().unwrap(), ns)?;
        Ok((t.upstream.name.clone(), t.repo.to_string()))
    }

    #[test]
    fn routes_every_way() {
        let (_d, p) = proxy("[aliases]\nmyapp = \"registry.corp.example/team/myapp\"");
        let r = |n, ns| resolve(&p, n, ns).unwrap();
        // (a) registry-mirror style, with Docker Hub's library/ for one-component names
        assert_eq!(
            r("alpine", None),
            ("docker.io".into(), "library/alpine".into())
        );
        assert_eq!(
            r("library/alpine", None),
            ("docker.io".into(), "library/alpine".into())
        );
        assert_eq!(r("team/app", None), ("docker.io".into(), "team/app".into()));
        // (b) path prefix: upstream name or host
        assert_eq!(
            r("ghcr/owner/img", None),
            ("ghcr".into(), "owner/img".into())
        );
        assert_eq!(
            r("ghcr.io/owner/img", None),
            ("ghcr".into(), "owner/img".into())
        );
        assert_eq!(
            r("docker.io/alpine", None),
            ("docker.io".into(), "library/alpine".into())
        );
        assert_eq!(
            r("registry.corp.example/a/b/c", None),
            ("corp".into(), "a/b/c".into())
        );
        // (c) containerd's ns
        assert_eq!(
            r("owner/img", Some("ghcr.io")),
            ("ghcr".into(), "owner/img".into())
        );
        assert_eq!(
            r("alpine", Some("docker.io")),
            ("docker.io".into(), "library/alpine".into())
        );
        assert_eq!(
            r("x/y", Some("registry.corp.example:5443")),
            ("corp".into(), "x/y".into())
        );
        // (d) aliases, also as Docker's mirror traffic names them
        assert_eq!(r("myapp", None), ("corp".into(), "team/myapp".into()));
        assert_eq!(
            r("library/myapp", None),
            ("corp".into(), "team/myapp".into())
        );
    }

    #[test]
    fn unknown_registries_are_refused() {
        let (_d, p) = proxy("");
        for (name, ns) in [
            ("quay.io/x/y", None),
            ("localhost/x", None),
            ("x/y", Some("nowhere.example")),
        ] {
            let e = resolve(&p, name, ns).unwrap_err();
            assert_eq!(e.code_and_status().0, "NAME_UNKNOWN", "{name}");
        }
    }
}
