//! Manifests: by digest immutable; by tag cached for `tag_ttl`, then revalidated with a HEAD,
//! served stale when upstream fails.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, StatusCode, header};

use super::isolation::Kind;
use super::{
    CacheResult, ClientInfo, Proxy, Target, expect_ok, head, read_document, send, serves_stale,
    status_error,
};
use crate::cache::index::{ManifestEntry, TagEntry, millis};
use crate::error::{Error, Result};
use crate::oci::DIGEST_HEADER;
use crate::oci::digest::Digest;
use crate::oci::media_type::{self, UPSTREAM_ACCEPT};
use crate::oci::reference::{Reference, Tag};
use crate::upstream::UpstreamRequest;

/// A manifest as the upstream sent it, byte for byte.
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// What revalidating a tag found.
#[derive(Clone)]
pub enum Revalidation {
    Unchanged,
    Changed(Arc<Manifest>),
}

impl Proxy {
    /// A manifest by tag or digest.
    pub async fn manifest(
        self: &Arc<Self>,
        t: &Target,
        reference: &Reference,
        client: &ClientInfo,
    ) -> Result<(Arc<Manifest>, CacheResult)> {
        self.client_check(t, Kind::Manifest, &reference.to_string(), client)
            .await?;
        match reference {
            Reference::Digest(d) => {
                if let Some(m) = self.known_manifest(&t.upstream.name, d).await? {
                    self.may_serve(t, Kind::Manifest, d, client).await?;
                    return Ok((m, CacheResult::Hit));
                }
                if self.config.cache.offline {
                    return Err(offline_miss(t, reference));
                }
                self.fetch(t, reference, UPSTREAM_ACCEPT, client).await
            }
            Reference::Tag(tag) => {
                if self.config.cache.offline {
                    return self.offline_tag(t, tag).await;
                }
                let key = (t.upstream.name.clone(), t.repo.clone(), tag.to_string());
                if self.missing_tags.contains_key(&key) {
                    return Err(Error::ManifestUnknown(format!(
                        "{}:{tag} (upstream said so less than {:?} ago)",
                        t.repo, self.config.cache.negative_ttl
                    )));
                }
                let result = self.tagged_manifest(t, tag, client).await;
                // Only a 404 to a request that took every type says the tag is missing: a
                // narrow `Accept` gets 404 for a tag of another type (an index, say).
                if let Err(e) = &result
                    && matches!(e.root(), Error::ManifestUnknown(_))
                    && takes_every_type(client)
                {
                    self.missing_tags.insert(key, ());
                }
                result
            }
        }
    }

    /// A tag from the cache alone, however old.
    async fn offline_tag(&self, t: &Target, tag: &Tag) -> Result<(Arc<Manifest>, CacheResult)> {
        let reference = Reference::Tag(tag.clone());
        let Some(digest) = self
            .index
            .tag(&t.upstream.name, &t.repo, tag)?
            .and_then(|e| e.digest())
        else {
            return Err(offline_miss(t, &reference));
        };
        match self.load_manifest(&t.upstream.name, &digest).await? {
            Some(m) => Ok((m, CacheResult::Hit)),
            None => Err(offline_miss(t, &reference)),
        }
    }

    async fn tagged_manifest(
        self: &Arc<Self>,
        t: &Target,
        tag: &Tag,
        client: &ClientInfo,
    ) -> Result<(Arc<Manifest>, CacheResult)> {
        let up = &t.upstream.name;
        let reference = Reference::Tag(tag.clone());
        // A client that cannot take every modern type gets what upstream picks for it, uncached.
        if !takes_every_type(client) {
            return self.fetch(t, &reference, &client.accept, client).await;
        }
        let Some(entry) = self.index.tag(up, &t.repo, tag)? else {
            return self.fetch(t, &reference, UPSTREAM_ACCEPT, client).await;
        };
        let Some(digest) = entry.digest() else {
            return self.fetch(t, &reference, UPSTREAM_ACCEPT, client).await;
        };
        let cache = &self.config.cache;
        let age = entry.age(SystemTime::now());
        let cached = self.load_manifest(up, &digest).await?;
        if age < cache.tag_ttl
            && let Some(m) = &cached
        {
            return Ok((Arc::clone(m), CacheResult::Hit));
        }
        // A tag whose manifest was evicted has nothing stale to give: it waits for upstream.
        let may_serve_stale = cached.is_some() && age < cache.tag_ttl + cache.max_stale;
        let key = (
            up.clone(),
            t.repo.clone(),
            tag.to_string(),
            "revalidate".to_owned(),
        );
        let this = Arc::clone(self);
        let (target, tag_owned, client_owned) = (t.clone(), tag.clone(), client.clone());
        let flight = self.revalidations.run(key, move || async move {
            this.revalidate(&target, &tag_owned, &digest, &client_owned)
                .await
                .map_err(Arc::new)
        });
        let outcome = if may_serve_stale {
            tokio::time::timeout(cache.revalidate_timeout, flight)
                .await
                .ok()
        } else {
            Some(flight.await)
        };
        let stale = |why: &str| {
            let m = cached.clone().expect("stale only when cached");
            serve_stale(t, tag, m, age, why)
        };
        match outcome {
            None => Ok(stale(&format!(
                "revalidation took longer than {:?}",
                cache.revalidate_timeout
            ))),
            Some((Ok(Revalidation::Unchanged), _)) => match &cached {
                Some(m) => Ok((Arc::clone(m), CacheResult::Revalidated)),
                None => self.fetch(t, &reference, UPSTREAM_ACCEPT, client).await,
            },
            Some((Ok(Revalidation::Changed(m)), joined)) => Ok((
                m,
                if joined {
                    CacheResult::Coalesced
                } else {
                    CacheResult::Miss
                },
            )),
            Some((Err(e), _)) if may_serve_stale && serves_stale(&e) => Ok(stale(&e.to_string())),
            Some((Err(e), _)) => Err(Error::Shared(e)),
        }
    }

    /// Asks upstream whether a cached tag still points at `cached`; refetches if it moved.
    async fn revalidate(
        self: &Arc<Self>,
        t: &Target,
        tag: &Tag,
        cached: &Digest,
        client: &ClientInfo,
    ) -> Result<Revalidation> {
        let up = &t.upstream.name;
        let path = format!("manifests/{tag}");
        let resp = head(t, &path, Some(UPSTREAM_ACCEPT), client).await?;
        let status = resp.status();
        let current = resp
            .headers()
            .get(DIGEST_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        if !matches!(
            status,
            StatusCode::OK | StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_FOUND
        ) {
            return Err(status_error(t, status, resp.headers(), || unreachable!()));
        }
        // Free the upstream slot before a follow-up GET needs one.
        drop(resp);
        match (status, current) {
            (StatusCode::OK, Some(d)) if &d == cached => {
                let media_type = self
                    .index
                    .manifest(up, cached)?
                    .map(|m| m.media_type)
                    .unwrap_or_default();
                self.index.put_tag(
                    up,
                    &t.repo,
                    tag,
                    &TagEntry {
                        digest: d.to_string(),
                        media_type,
                        checked_ms: millis(SystemTime::now()),
                    },
                )?;
                Ok(Revalidation::Unchanged)
            }
            // Moved, or a registry that gives no digest on HEAD or does not allow HEAD: GET it.
            (StatusCode::OK, _) | (StatusCode::METHOD_NOT_ALLOWED, _) => {
                let m = self
                    .fetch_now(t, &Reference::Tag(tag.clone()), UPSTREAM_ACCEPT, client)
                    .await?;
                Ok(if &m.digest == cached {
                    Revalidation::Unchanged
                } else {
                    Revalidation::Changed(m)
                })
            }
            // 404, the only status left: the tag is gone upstream.
            _ => {
                self.index.remove_tag(up, &t.repo, tag)?;
                Err(Error::ManifestUnknown(format!("{}:{tag}", t.repo)))
            }
        }
    }

    /// A manifest this upstream is known to have, from memory or disk.
    async fn known_manifest(
        &self,
        upstream: &str,
        digest: &Digest,
    ) -> Result<Option<Arc<Manifest>>> {
        if self.index.manifest(upstream, digest)?.is_none() {
            return Ok(None);
        }
        self.load_manifest(upstream, digest).await
    }

    /// Loads a manifest whose index entry exists, preferring memory.
    async fn load_manifest(
        &self,
        upstream: &str,
        digest: &Digest,
    ) -> Result<Option<Arc<Manifest>>> {
        self.touch(digest);
        if let Some(m) = self.hot_manifests.get(digest) {
            return Ok(Some(m));
        }
        let Some(entry) = self.index.manifest(upstream, digest)? else {
            return Ok(None);
        };
        let Some(bytes) = self.store.read_small(digest).await? else {
            self.index.remove_manifest(upstream, digest)?;
            return Ok(None);
        };
        let m = Arc::new(Manifest {
            digest: digest.clone(),
            media_type: entry.media_type,
            bytes,
        });
        self.hot_manifests.insert(digest.clone(), Arc::clone(&m));
        Ok(Some(m))
    }

    /// Fetches from upstream, once for all concurrent askers of the same thing.
    async fn fetch(
        self: &Arc<Self>,
        t: &Target,
        reference: &Reference,
        accept: &str,
        client: &ClientInfo,
    ) -> Result<(Arc<Manifest>, CacheResult)> {
        let key = (
            t.upstream.name.clone(),
            t.repo.clone(),
            reference.to_string(),
            accept.to_owned(),
        );
        let this = Arc::clone(self);
        let (target, reference, accept_owned, client) = (
            t.clone(),
            reference.clone(),
            accept.to_owned(),
            client.clone(),
        );
        let (result, joined) = self
            .manifest_flights
            .run(key, move || async move {
                this.fetch_now(&target, &reference, &accept_owned, &client)
                    .await
                    .map_err(Arc::new)
            })
            .await;
        let m = result.map_err(Error::Shared)?;
        Ok((
            m,
            if joined {
                CacheResult::Coalesced
            } else {
                CacheResult::Miss
            },
        ))
    }

    /// GETs a manifest, verifies its digest, stores it, and (for a tag fetched with the full
    /// `Accept`) records the tag.
    async fn fetch_now(
        &self,
        t: &Target,
        reference: &Reference,
        accept: &str,
        client: &ClientInfo,
    ) -> Result<Arc<Manifest>> {
        let up = &t.upstream.name;
        let path = format!("manifests/{reference}");
        let resp = send(
            t,
            UpstreamRequest {
                method: Method::GET,
                repo: &t.repo,
                path: &path,
                query: None,
                accept: Some(accept),
                client_auth: client.authorization.as_ref(),
            },
        )
        .await?;
        let resp = expect_ok(t, resp, || {
            Error::ManifestUnknown(format!("{}:{reference}", t.repo))
        })?;
        let (parts, body) = resp.into_parts();
        let claimed = parts
            .headers
            .get(DIGEST_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let bytes = read_document(t, body, super::MAX_DOCUMENT).await?;
        let media_type = if media_type::is_generic(content_type) {
            media_type::sniff(&bytes)
                .or(content_type.map(Cow::Borrowed))
                .unwrap_or(Cow::Borrowed(media_type::OCI_MANIFEST))
                .into_owned()
        } else {
            content_type.unwrap_or_default().to_owned()
        };
        let algorithm = match (reference, &claimed) {
            (Reference::Digest(d), _) => d.algorithm(),
            (Reference::Tag(_), Some(c)) => c.algorithm(),
            (Reference::Tag(_), None) => crate::oci::digest::Algorithm::Sha256,
        };
        let actual = Digest::of(algorithm, &bytes);
        let expected = match reference {
            Reference::Digest(d) => Some(d),
            Reference::Tag(_) => claimed.as_ref(),
        };
        if let Some(expected) = expected
            && expected != &actual
        {
            t.upstream.count_error("digest_mismatch");
            return Err(Error::DigestMismatch {
                upstream: up.clone(),
                expected: expected.to_string(),
                actual: actual.to_string(),
            });
        }
        self.store.write_small(&actual, bytes.clone()).await?;
        self.committed(&actual);
        self.index.put_manifest(
            up,
            &actual,
            &ManifestEntry {
                media_type: media_type.clone(),
                size: bytes.len() as u64,
            },
        )?;
        self.note_seen(up, &actual, &t.repo)?;
        if let Reference::Tag(tag) = reference
            && accept == UPSTREAM_ACCEPT
        {
            self.index.put_tag(
                up,
                &t.repo,
                tag,
                &TagEntry {
                    digest: actual.to_string(),
                    media_type: media_type.clone(),
                    checked_ms: millis(SystemTime::now()),
                },
            )?;
        }
        let m = Arc::new(Manifest {
            digest: actual.clone(),
            media_type,
            bytes,
        });
        self.hot_manifests.insert(actual, Arc::clone(&m));
        Ok(m)
    }
}

/// What a client hears about uncached content while regcache is offline.
fn offline_miss(t: &Target, reference: &Reference) -> Error {
    Error::ManifestUnknown(format!(
        "{}:{reference} is not cached and regcache is offline",
        t.repo
    ))
}

/// A cached tag's manifest served past its TTL because upstream did not answer in time.
fn serve_stale(
    t: &Target,
    tag: &Tag,
    m: Arc<Manifest>,
    age: std::time::Duration,
    why: &str,
) -> (Arc<Manifest>, CacheResult) {
    tracing::warn!(upstream = %t.upstream.name, repo = %t.repo, %tag, age_s = age.as_secs(), reason = %why, "serving cached tag stale");
    (m, CacheResult::Stale)
}

/// Whether the client takes every modern manifest type, so that upstream's answer to
/// [`UPSTREAM_ACCEPT`] suits it and can be cached.
fn takes_every_type(client: &ClientInfo) -> bool {
    media_type::accepts_all(
        [client.accept.as_str()],
        &[
            media_type::OCI_INDEX,
            media_type::DOCKER_MANIFEST_LIST,
            media_type::OCI_MANIFEST,
            media_type::DOCKER_MANIFEST_V2,
        ],
    )
}
