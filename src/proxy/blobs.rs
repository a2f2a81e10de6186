//! Blobs: local first; on a miss one upstream GET whose bytes stream to every asker while the
//! fill writes, verifies and commits them.

use std::sync::Arc;

use http::{Method, header};

use super::isolation::Kind;
use super::{CacheResult, ClientInfo, Proxy, Target, expect_ok, head, send};
use crate::cache::blobs::Committed;
use crate::cache::flight::{Fill, FillSpec, Reader, Source};
use crate::error::{Error, Result};
use crate::oci::DIGEST_HEADER;
use crate::oci::digest::Digest;
use crate::upstream::{Upstream, UpstreamRequest};

/// Where a blob answer's bytes come from.
pub enum BlobBody {
    /// Committed content.
    File(Committed),
    /// A fill in flight.
    Fill(Arc<Fill>),
    /// Nothing to send (HEAD answered from upstream).
    None,
    /// Upstream's body passed straight through, verified, not cached (the disk takes no
    /// writes). Taken once.
    Passthrough(std::sync::Mutex<Option<crate::body::Body>>),
}

/// A blob answer before the range is applied.
pub struct BlobAnswer {
    pub size: Option<u64>,
    pub body: BlobBody,
    pub cache: CacheResult,
}

impl BlobAnswer {
    /// A reader of bytes `start..end`; `None` for a bodiless answer.
    pub fn reader(&self, start: u64, end: Option<u64>) -> Option<Reader> {
        match &self.body {
            BlobBody::File(blob) => Some(Reader::complete(blob, start, end.or(self.size)?)),
            BlobBody::Fill(fill) => Some(fill.reader(start, end)),
            BlobBody::None | BlobBody::Passthrough(_) => None,
        }
    }
}

impl Proxy {
    /// A blob for GET (streamed, filling the cache) or HEAD (never downloads on a miss).
    pub async fn blob(
        self: &Arc<Self>,
        t: &Target,
        digest: &Digest,
        head: bool,
        client: &ClientInfo,
    ) -> Result<BlobAnswer> {
        self.client_check(t, Kind::Blob, &digest.to_string(), client)
            .await?;
        // Another request's fill went through its own repository, which lacks the blob or is
        // denied it: this request's repository gets a fetch of its own, once the failed fill
        // has left the flight.
        let first = self.blob_checked(t, digest, head, client).await;
        let Err(Failure::TheirRepository(fill, _)) = first else {
            return first.map_err(Failure::into_error);
        };
        fill.settled().await;
        (self.blob_checked(t, digest, head, client).await).map_err(Failure::into_error)
    }

    async fn blob_checked(
        self: &Arc<Self>,
        t: &Target,
        digest: &Digest,
        head: bool,
        client: &ClientInfo,
    ) -> Result<BlobAnswer, Failure> {
        let up = &t.upstream.name;
        // One look at each: whatever is served from them below passed `may_serve` (a fill
        // found later is checked where it is joined).
        let indexed = self.index.blob(up, digest)?.is_some();
        let filling = if indexed {
            None
        } else {
            self.fills.get(up, digest)
        };
        if indexed || filling.is_some() {
            self.may_serve(t, Kind::Blob, digest, client).await?;
        }
        if indexed {
            if let Some(blob) = self.store.open_blob(digest).await? {
                self.touch(digest);
                return Ok(hit(blob));
            }
            self.index.remove_blob(up, digest)?;
        }
        // Before the cross-upstream check: a fill of ours that just committed is on disk but
        // not yet in the index, and joining it costs nothing.
        if let Some(fill) = filling {
            return joined(fill, CacheResult::Coalesced).await;
        }
        if self.config.cache.offline {
            // Content is content: in offline mode another upstream's copy will do, when both
            // that upstream's content and this one's are public. (A private upstream's blob, or
            // a manifest stored under the same digest, is never served through another.)
            let public = |u: &Upstream| !u.is_private() && !u.passes_client_auth();
            let shared = public(&t.upstream)
                && self
                    .upstreams
                    .values()
                    .filter(|u| public(u))
                    .any(|u| matches!(self.index.blob(&u.name, digest), Ok(Some(_))));
            if shared && let Some(blob) = self.store.open_blob(digest).await? {
                return Ok(hit(blob));
            }
            return Err(Error::BlobUnknown(format!(
                "{digest} is not cached and regcache is offline"
            ))
            .into());
        }
        if self.store.contains(digest).await {
            // Fetched through another upstream: serve it once this upstream confirms it has it.
            // Upstream must say which blob it has: by its size, or (when it sends none) by
            // naming the digest, so that a 200 from a login page confirms nothing.
            if let Some(said) = self.upstream_head(t, digest, client).await?
                && let Some(blob) = self.store.open_blob(digest).await?
                && said
                    .size
                    .map_or(said.names_digest, |size| blob.size == size)
            {
                let size = blob.size;
                self.index.put_blob(up, digest, size)?;
                self.note_seen(up, digest, &t.repo)?;
                return Ok(hit(blob));
            }
        }
        let bucket = self.bucket.clone();
        if head {
            if let Some(b) = &bucket
                && let Some(size) = b.head(up, digest).await
            {
                // The copy came from this upstream, maybe for another repository.
                self.may_serve(t, Kind::Blob, digest, client).await?;
                return Ok(BlobAnswer {
                    size: Some(size),
                    body: BlobBody::None,
                    cache: CacheResult::Shared,
                });
            }
            let said = self
                .upstream_head(t, digest, client)
                .await?
                .ok_or_else(|| Error::BlobUnknown(digest.to_string()))?;
            return Ok(BlobAnswer {
                size: said.size,
                body: BlobBody::None,
                cache: CacheResult::Miss,
            });
        }
        let spec = FillSpec {
            upstream: Arc::clone(&t.upstream),
            digest: digest.clone(),
            store: self.store.clone(),
            metrics: Arc::clone(&self.metrics),
            bucket: bucket.clone(),
        };
        let (target, d, asker) = (t.clone(), digest.clone(), client.clone());
        let seen_by = Arc::downgrade(self);
        let source = async move {
            // Another replica may have fetched it already.
            if let Some(b) = &bucket
                && let Some(copy) = bucket_copy(b, &seen_by, &target, &d, &asker).await?
            {
                return Ok(copy);
            }
            let path = format!("blobs/{d}");
            let resp = send(
                &target,
                UpstreamRequest {
                    method: Method::GET,
                    repo: &target.repo,
                    path: &path,
                    query: None,
                    accept: None,
                    client_auth: asker.authorization.as_ref(),
                },
            )
            .await?;
            let resp = expect_ok(&target, resp, || Error::BlobUnknown(d.to_string()))?;
            // Upstream serves it in this repository: known there from now on (also for
            // requests that join this fill before it commits).
            if let Some(p) = seen_by.upgrade() {
                p.note_seen(&target.upstream.name, &d, &target.repo)?;
            }
            Ok(Source::upstream(resp))
        };
        let (index, up_name, d) = (self.index.clone(), up.clone(), digest.clone());
        let this = Arc::downgrade(self);
        let on_commit = move |size| {
            if let Err(e) = index.put_blob(&up_name, &d, size) {
                tracing::error!(digest = %d, error = %e, "blob committed but not indexed");
            }
            if let Some(p) = this.upgrade() {
                p.committed(&d);
            }
        };
        if let Some(why) = self.disk_unavailable() {
            return Ok(self.passthrough(t, digest, client, &why).await?);
        }
        match self.fills.join_or_start(spec, source, on_commit) {
            Ok((fill, was_joined)) => {
                // Another repository's fill may have started since the check above.
                if was_joined {
                    self.may_serve(t, Kind::Blob, digest, client).await?;
                }
                joined(
                    fill,
                    if was_joined {
                        CacheResult::Coalesced
                    } else {
                        CacheResult::Miss
                    },
                )
                .await
            }
            Err(e) => Ok(self.passthrough(t, digest, client, &e.to_string()).await?),
        }
    }

    /// Why the disk cannot take a new blob now, if it cannot: less free space than
    /// `min_free_disk` (at least [`PASSTHROUGH_FLOOR`]).
    fn disk_unavailable(&self) -> Option<String> {
        let floor = self.config.cache.min_free_disk.max(PASSTHROUGH_FLOOR);
        let (free, _) = self.store.free_space()?;
        (free < floor).then(|| format!("{free} bytes free on the data dir, below {floor}"))
    }

    /// Streams a blob from upstream to this one client without caching it, when the disk
    /// cannot take it; the digest is still checked before the last byte goes out.
    async fn passthrough(
        &self,
        t: &Target,
        digest: &Digest,
        client: &ClientInfo,
        why: &str,
    ) -> Result<BlobAnswer> {
        tracing::warn!(upstream = %t.upstream.name, %digest, reason = %why, "cache not writable; passing the blob through uncached");
        self.metrics.passthrough.inc();
        let path = format!("blobs/{digest}");
        let resp = send(
            t,
            UpstreamRequest {
                method: Method::GET,
                repo: &t.repo,
                path: &path,
                query: None,
                accept: None,
                client_auth: client.authorization.as_ref(),
            },
        )
        .await?;
        let resp = expect_ok(t, resp, || Error::BlobUnknown(digest.to_string()))?;
        let size = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = verified(resp, digest.clone(), size, Arc::clone(&t.upstream));
        Ok(BlobAnswer {
            size,
            body: BlobBody::Passthrough(std::sync::Mutex::new(Some(body))),
            cache: CacheResult::Passthrough,
        })
    }

    /// What an upstream HEAD says of the blob; `None` when upstream does not have it.
    async fn upstream_head(
        &self,
        t: &Target,
        digest: &Digest,
        client: &ClientInfo,
    ) -> Result<Option<UpstreamHead>> {
        let path = format!("blobs/{digest}");
        let resp = head(t, &path, None, client).await?;
        if resp.status() == http::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = expect_ok(t, resp, || Error::BlobUnknown(digest.to_string()))?;
        let header = |name| resp.headers().get(name).and_then(|v| v.to_str().ok());
        Ok(Some(UpstreamHead {
            size: header(header::CONTENT_LENGTH.as_str()).and_then(|v| v.parse().ok()),
            names_digest: header(DIGEST_HEADER).and_then(|v| v.parse::<Digest>().ok())
                == Some(digest.clone()),
        }))
    }
}

/// An upstream HEAD's 200 for a blob.
struct UpstreamHead {
    /// Its `Content-Length` (a registry sends one; some behind gateways do not).
    size: Option<u64>,
    /// Whether its `Docker-Content-Digest` names the blob asked for.
    names_digest: bool,
}

/// The shared bucket's copy of `digest` as a fill source, if it has one this request may
/// have. The copy came from this upstream but maybe for another repository: for a private
/// upstream it is used once upstream confirms the repository holds it (upstream's refusal is
/// the answer), as a copy on disk would be. That check waits for a bucket HEAD saying the
/// copy exists, so a miss in the bucket costs no upstream HEAD.
async fn bucket_copy(
    bucket: &Arc<crate::cache::bucket::Bucket>,
    proxy: &std::sync::Weak<Proxy>,
    t: &Target,
    digest: &Digest,
    client: &ClientInfo,
) -> Result<Option<Source>> {
    let up = &t.upstream.name;
    if t.upstream.is_private() {
        if bucket.head(up, digest).await.is_none() {
            return Ok(None);
        }
        let Some(p) = proxy.upgrade() else {
            return Ok(None);
        };
        p.may_serve(t, Kind::Blob, digest, client).await?;
    }
    Ok(bucket.open(up, digest).await)
}

fn hit(blob: Committed) -> BlobAnswer {
    BlobAnswer {
        size: Some(blob.size),
        body: BlobBody::File(blob),
        cache: CacheResult::Hit,
    }
}

/// Why a blob was not answered.
enum Failure {
    Error(Error),
    /// A fill this request joined failed for the repository it was started for (upstream
    /// has no such blob there, or denies it), which may not be this request's.
    TheirRepository(Arc<Fill>, Arc<Error>),
}

impl Failure {
    fn into_error(self) -> Error {
        match self {
            Failure::Error(e) => e,
            Failure::TheirRepository(_, e) => Error::Shared(e),
        }
    }
}

impl<E: Into<Error>> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure::Error(e.into())
    }
}

async fn joined(fill: Arc<Fill>, cache: CacheResult) -> Result<BlobAnswer, Failure> {
    let size = match fill.started().await {
        Ok(size) => size,
        Err(e)
            if cache == CacheResult::Coalesced
                && matches!(
                    e.root(),
                    Error::BlobUnknown(_)
                        | Error::UpstreamDenied { .. }
                        | Error::UpstreamChallenge { .. }
                ) =>
        {
            return Err(Failure::TheirRepository(fill, e));
        }
        Err(e) => return Err(Error::Shared(e).into()),
    };
    // An empty answer is complete once its headers are out: it waits for the digest check.
    if size == Some(0) {
        fill.verified().await.map_err(Error::Shared)?;
    }
    // Joining a verified fill whose commit is still under way is as good as a file on disk.
    let cache = if cache == CacheResult::Coalesced && fill.is_done() {
        CacheResult::Hit
    } else if cache == CacheResult::Miss && fill.from_bucket() {
        CacheResult::Shared
    } else {
        cache
    };
    Ok(BlobAnswer {
        size,
        body: BlobBody::Fill(fill),
        cache,
    })
}

/// Below this much free space on the data dir, new blobs pass through uncached.
const PASSTHROUGH_FLOOR: u64 = 16 << 20;

/// Upstream's body, hashed as it passes; the last chunk is held until the digest (and the
/// length) checked out, so a wrong blob never arrives whole.
fn verified(
    resp: http::Response<hyper::body::Incoming>,
    digest: Digest,
    size: Option<u64>,
    upstream: Arc<crate::upstream::Upstream>,
) -> crate::body::Body {
    use http_body_util::BodyExt as _;
    struct State {
        // The parts carry the upstream slot: held until the body is done.
        _slot: http::response::Parts,
        body: hyper::body::Incoming,
        verifier: Option<crate::oci::digest::Verifier>,
        held: Option<bytes::Bytes>,
        seen: u64,
    }
    let (parts, body) = resp.into_parts();
    let state = State {
        _slot: parts,
        body,
        verifier: Some(crate::oci::digest::Verifier::new(digest.algorithm())),
        held: None,
        seen: 0,
    };
    let read_timeout = upstream.read_timeout();
    let chunks = futures_util::stream::unfold(Some(state), move |st| {
        let (digest, upstream) = (digest.clone(), Arc::clone(&upstream));
        async move {
            let mut st = st?;
            loop {
                let frame = match tokio::time::timeout(read_timeout, st.body.frame()).await {
                    Err(_) => {
                        upstream.count_error("timeout");
                        return Some((Err(std::io::Error::other("upstream stalled")), None));
                    }
                    Ok(f) => f,
                };
                match frame {
                    Some(Ok(f)) => {
                        let Ok(data) = f.into_data() else { continue };
                        if data.is_empty() {
                            continue;
                        }
                        st.seen += data.len() as u64;
                        upstream.count_fetched(data.len() as u64);
                        if let Some(v) = st.verifier.as_mut() {
                            v.update(&data);
                        }
                        if let Some(prev) = st.held.replace(data) {
                            return Some((Ok(http_body::Frame::data(prev)), Some(st)));
                        }
                    }
                    Some(Err(e)) => {
                        upstream.count_error("reset");
                        return Some((Err(std::io::Error::other(e)), None));
                    }
                    None => {
                        let actual = st.verifier.take().map(|v| v.finish());
                        let whole = size.is_none_or(|s| s == st.seen);
                        if actual.as_ref() != Some(&digest) || !whole {
                            upstream.count_error("digest_mismatch");
                            return Some((
                                Err(std::io::Error::other(format!(
                                    "upstream sent bytes that do not match {digest}"
                                ))),
                                None,
                            ));
                        }
                        return st
                            .held
                            .take()
                            .map(|last| (Ok(http_body::Frame::data(last)), None));
                    }
                }
            }
        }
    });
    crate::body::Body::stream(http_body_util::StreamBody::new(chunks))
}
