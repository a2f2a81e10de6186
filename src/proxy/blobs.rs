//! Blobs: local first; on a miss one upstream GET whose bytes stream to every asker while the
//! fill writes, verifies and commits them.

use std::fs::File;
use std::sync::Arc;

use http::{Method, header};

use super::{CacheResult, ClientInfo, Proxy, Target, expect_ok, send};
use crate::cache::flight::{Fill, FillSpec, Reader};
use crate::error::{Error, Result};
use crate::oci::digest::Digest;
use crate::upstream::UpstreamRequest;

/// Where a blob answer's bytes come from.
pub enum BlobBody {
    /// A committed file.
    File(Arc<File>),
    /// A fill in flight.
    Fill(Arc<Fill>),
    /// Nothing to send (HEAD answered from upstream).
    None,
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
            BlobBody::File(f) => Some(Reader::complete(Arc::clone(f), start, end.or(self.size)?)),
            BlobBody::Fill(fill) => Some(fill.reader(start, end)),
            BlobBody::None => None,
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
        let up = &t.upstream.name;
        if self.index.blob(up, digest)?.is_some() {
            if let Some((file, size)) = self.store.open_blob(digest).await? {
                self.touch(digest);
                return Ok(hit(file, size));
            }
            self.index.remove_blob(up, digest)?;
        }
        // Before the cross-upstream check: a fill of ours that just committed is on disk but
        // not yet in the index, and joining it costs nothing.
        if let Some(fill) = self.fills.get(up, digest) {
            return joined(fill, CacheResult::Coalesced).await;
        }
        if self.config.cache.offline {
            // Content is content: in offline mode any upstream's copy will do.
            if let Some((file, size)) = self.store.open_blob(digest).await? {
                return Ok(hit(file, size));
            }
            return Err(Error::BlobUnknown(format!(
                "{digest} is not cached and regcache is offline"
            )));
        }
        if self.store.contains(digest).await {
            // Fetched through another upstream: serve it once this upstream confirms it has it.
            if let Some(size) = self.upstream_head(t, digest, client).await?
                && let Some((file, len)) = self.store.open_blob(digest).await?
                && len == size
            {
                self.index.put_blob(up, digest, size)?;
                return Ok(hit(file, len));
            }
        }
        if head {
            let size = self
                .upstream_head(t, digest, client)
                .await?
                .ok_or_else(|| Error::BlobUnknown(digest.to_string()))?;
            return Ok(BlobAnswer {
                size: Some(size),
                body: BlobBody::None,
                cache: CacheResult::Miss,
            });
        }
        let spec = FillSpec {
            upstream: Arc::clone(&t.upstream),
            digest: digest.clone(),
            store: self.store.clone(),
            metrics: Arc::clone(&self.metrics),
        };
        let (target, d, client) = (t.clone(), digest.clone(), client.clone());
        let source = async move {
            let path = format!("blobs/{d}");
            let resp = send(
                &target,
                UpstreamRequest {
                    method: Method::GET,
                    repo: &target.repo,
                    path: &path,
                    query: None,
                    accept: None,
                    client_auth: client.authorization.as_ref(),
                },
            )
            .await?;
            expect_ok(&target, resp, || Error::BlobUnknown(d.to_string()))
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
        let (fill, was_joined) = self.fills.join_or_start(spec, source, on_commit)?;
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

    /// The blob's size per an upstream HEAD; `None` when upstream does not have it.
    async fn upstream_head(
        &self,
        t: &Target,
        digest: &Digest,
        client: &ClientInfo,
    ) -> Result<Option<u64>> {
        let path = format!("blobs/{digest}");
        let resp = send(
            t,
            UpstreamRequest {
                method: Method::HEAD,
                repo: &t.repo,
                path: &path,
                query: None,
                accept: None,
                client_auth: client.authorization.as_ref(),
            },
        )
        .await?;
        if resp.status() == http::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = expect_ok(t, resp, || Error::BlobUnknown(digest.to_string()))?;
        Ok(resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()))
    }
}

fn hit(file: Arc<File>, size: u64) -> BlobAnswer {
    BlobAnswer {
        size: Some(size),
        body: BlobBody::File(file),
        cache: CacheResult::Hit,
    }
}

async fn joined(fill: Arc<Fill>, cache: CacheResult) -> Result<BlobAnswer> {
    let size = fill.started().await.map_err(Error::Shared)?;
    // Joining a verified fill whose commit is still under way is as good as a file on disk.
    let cache = if cache == CacheResult::Coalesced && fill.is_done() {
        CacheResult::Hit
    } else {
        cache
    };
    Ok(BlobAnswer {
        size,
        body: BlobBody::Fill(fill),
        cache,
    })
}
