//! Listings: `tags/list` and `referrers/<digest>` answers.
//!
//! Neither is content-addressed: each is upstream's word at the time. An answer is reused for
//! its TTL (`tags_list_ttl`, `referrers_ttl`), concurrent misses share one upstream request, and
//! while upstream is down the last answer is served for up to `max_stale` past its TTL, as a
//! cached tag is. A referrers answer is what signature checks at admission (notation, cosign,
//! Ratify, Kyverno) read, so an outage must not turn it into an error while the images it
//! describes are still served. On a `pass_client_auth` upstream what a client may list is
//! upstream's to say, every time: nothing is shared.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, header};

use super::{
    CacheResult, ClientInfo, MAX_DOCUMENT, Proxy, Target, expect_ok, read_document, send,
    serves_stale,
};
use crate::cache::flight::Group;
use crate::config::CacheConfig;
use crate::error::{Error, Result};
use crate::oci::digest::Digest;
use crate::oci::media_type;
use crate::oci::reference::RepoName;
use crate::upstream::UpstreamRequest;

/// Largest tag list regcache accepts from upstream: the spec sets no limit, and a repository
/// with years of nightly tags (with gcr.io's per-digest `manifest` map) passes 4 MiB.
const MAX_TAGS_LIST: usize = 32 << 20;
/// Bytes of listings kept, fresh and stale.
const LISTINGS_MEMORY: u64 = 64 << 20;
/// What a kept listing costs beyond its key and body (headers, bookkeeping), in bytes.
const ENTRY_OVERHEAD: usize = 256;

/// Which listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed {
    /// `tags/list`.
    Tags,
    /// `referrers/<digest>`: the manifests whose `subject` is this one.
    Referrers(Digest),
}

impl Listed {
    /// The endpoint below `/v2/<name>/`.
    pub fn endpoint(&self) -> String {
        match self {
            Listed::Tags => "tags/list".to_owned(),
            Listed::Referrers(d) => format!("referrers/{d}"),
        }
    }

    fn accept(&self) -> &'static str {
        match self {
            Listed::Tags => "application/json",
            Listed::Referrers(_) => media_type::OCI_INDEX,
        }
    }

    fn limit(&self) -> usize {
        match self {
            Listed::Tags => MAX_TAGS_LIST,
            Listed::Referrers(_) => MAX_DOCUMENT,
        }
    }

    fn ttl(&self, cache: &CacheConfig) -> Duration {
        match self {
            Listed::Tags => cache.tags_list_ttl,
            Listed::Referrers(_) => cache.referrers_ttl,
        }
    }

    /// What upstream's 404 means. For referrers it is "this registry has no referrers API"
    /// (OCI distribution spec 1.1): not `NAME_UNKNOWN`, which clients (oras-go) read as a
    /// missing repository, so that they fall back to the `sha256-<hex>` tag.
    fn not_found(&self, repo: &RepoName) -> Error {
        match self {
            Listed::Tags => Error::NameUnknown(format!("repository {repo} not known upstream")),
            Listed::Referrers(_) => Error::NotFound,
        }
    }
}

/// A listing as upstream gave it.
pub struct Listing {
    pub body: Bytes,
    pub content_type: Option<HeaderValue>,
    pub link: Option<HeaderValue>,
    /// `OCI-Filters-Applied`: the filters (`artifactType`) upstream applied to a referrers
    /// answer. Without it the client filters.
    pub filters_applied: Option<HeaderValue>,
    fetched: Instant,
}

/// (upstream, repository, endpoint, query).
type ListingKey = (String, RepoName, String, String);

/// Concurrent misses of one listing share one upstream request.
type ListingFlights = Group<ListingKey, Result<Arc<Listing>, Arc<Error>>>;

/// The listings kept, and the fetches in flight.
pub(super) struct Listings {
    kept: moka::future::Cache<ListingKey, Arc<Listing>>,
    flights: Arc<ListingFlights>,
}

impl Listings {
    pub(super) fn new(cache: &CacheConfig) -> Listings {
        // Kept past the TTL, for serving stale; memory bounds them.
        let fresh = cache.tags_list_ttl.max(cache.referrers_ttl);
        let kept = moka::future::Cache::builder()
            .max_capacity(LISTINGS_MEMORY)
            .weigher(
                |(up, repo, endpoint, query): &ListingKey, l: &Arc<Listing>| {
                    // The key too: a query can be as long as a request target, and an empty
                    // answer's key is most of what it holds.
                    let key = up.len() + repo.as_str().len() + endpoint.len() + query.len();
                    (key + l.body.len() + ENTRY_OVERHEAD)
                        .try_into()
                        .unwrap_or(u32::MAX)
                },
            )
            .time_to_live(fresh.saturating_add(cache.max_stale))
            .build();
        Listings {
            kept,
            flights: Arc::default(),
        }
    }
}

impl Proxy {
    /// A listing: kept within its TTL, else upstream's answer (one request for concurrent
    /// misses), else, while upstream is down, the kept one up to `max_stale` past its TTL.
    /// `query` is the client's, without `ns`.
    pub async fn listing(
        &self,
        t: &Target,
        listed: &Listed,
        query: Option<&str>,
        client: &ClientInfo,
    ) -> Result<(Arc<Listing>, CacheResult)> {
        let cache = &self.config.cache;
        let ttl = listed.ttl(cache);
        let key = (
            t.upstream.name.clone(),
            t.repo.clone(),
            listed.endpoint(),
            query.unwrap_or("").to_owned(),
        );
        let shared = !t.upstream.passes_client_auth();
        let kept = match shared {
            true => self.listings.kept.get(&key).await,
            false => None,
        };
        if let Some(l) = &kept
            && (l.fetched.elapsed() < ttl || cache.offline)
        {
            return Ok((Arc::clone(l), CacheResult::Hit));
        }
        if cache.offline {
            return Err(match listed {
                Listed::Tags => Error::NameUnknown(format!(
                    "tags of {} are not cached and regcache is offline",
                    t.repo
                )),
                // As an upstream without the API answers, so that clients fall back to the
                // `sha256-<hex>` tag, which may be cached.
                Listed::Referrers(_) => Error::NotFound,
            });
        }
        // An upstream without the referrers API says so for every subject: asked once per
        // `negative_ttl`, not at every signature check.
        let unsupported = (t.upstream.name.clone(), t.repo.clone(), key.2.clone());
        let remembers = shared && matches!(listed, Listed::Referrers(_));
        if remembers && self.missing_tags.contains_key(&unsupported) {
            return Err(Error::NotFound);
        }
        let (fetched, joined) = if shared {
            let (t, listed, kept) = (t.clone(), listed.clone(), self.listings.kept.clone());
            let query = query.map(str::to_owned);
            let (r, joined) = self
                .listings
                .flights
                .run(key.clone(), move || async move {
                    // A shared upstream gets regcache's credentials, never a client's.
                    let anyone = ClientInfo::default();
                    let got = fetch(&t, &listed, query.as_deref(), &anyone).await;
                    let l = Arc::new(got.map_err(Arc::new)?);
                    // Kept before the flight ends, so no request after it asks again.
                    kept.insert(key, Arc::clone(&l)).await;
                    Ok(l)
                })
                .await;
            (r.map_err(Error::Shared), joined)
        } else {
            (fetch(t, listed, query, client).await.map(Arc::new), false)
        };
        match fetched {
            Ok(l) => {
                let how = match joined {
                    true => CacheResult::Coalesced,
                    false => CacheResult::Miss,
                };
                Ok((l, how))
            }
            Err(e) if remembers && matches!(e.root(), Error::NotFound) => {
                self.missing_tags.insert(unsupported, ());
                Err(e)
            }
            Err(e) => match kept {
                Some(l) if serves_stale(&e) && l.fetched.elapsed() < ttl + cache.max_stale => {
                    let age = l.fetched.elapsed();
                    tracing::warn!(upstream = %t.upstream.name, repo = %t.repo, listing = %listed.endpoint(), age_s = age.as_secs(), reason = %e, "serving cached listing stale");
                    Ok((l, CacheResult::Stale))
                }
                _ => Err(e),
            },
        }
    }
}

/// Asks upstream for a listing and checks what came back.
async fn fetch(
    t: &Target,
    listed: &Listed,
    query: Option<&str>,
    client: &ClientInfo,
) -> Result<Listing> {
    let endpoint = listed.endpoint();
    let resp = send(
        t,
        UpstreamRequest {
            method: http::Method::GET,
            repo: &t.repo,
            path: &endpoint,
            query,
            accept: Some(listed.accept()),
            client_auth: client.authorization.as_ref(),
        },
    )
    .await?;
    let resp = expect_ok(t, resp, || listed.not_found(&t.repo))?;
    let (parts, body) = resp.into_parts();
    let body = read_document(t, body, listed.limit()).await?;
    let header = |name| parts.headers.get(name).cloned();
    let mut content_type = header(header::CONTENT_TYPE.as_str());
    if let Listed::Referrers(_) = listed {
        // Clients parse it as an image index: a captive portal's page or a truncated answer
        // is upstream's failure (and a reason to serve the last good one), not the client's.
        if !is_index(&body) {
            return Err(Error::UpstreamInvalid {
                upstream: t.upstream.name.clone(),
                what: format!("a {endpoint} answer that is not an image index"),
            });
        }
        content_type = Some(HeaderValue::from_static(media_type::OCI_INDEX));
    }
    Ok(Listing {
        body,
        content_type,
        link: header(header::LINK.as_str()),
        filters_applied: header("oci-filters-applied"),
        fetched: Instant::now(),
    })
}

/// Whether `body` is an image index: a JSON object with a list of descriptors (each with a
/// valid digest, a media type and a size) and, if it names one, the index media type.
fn is_index(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Index {
        media_type: Option<String>,
        // Go servers write an empty list as `null`; the key itself must be there.
        #[serde(deserialize_with = "null_as_empty")]
        manifests: Vec<Descriptor>,
    }
    fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Descriptor>, D::Error> {
        use serde::Deserialize as _;
        Option::<Vec<Descriptor>>::deserialize(d).map(Option::unwrap_or_default)
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Descriptor {
        digest: String,
        #[serde(rename = "mediaType")]
        _media_type: String,
        #[serde(rename = "size")]
        _size: u64,
    }
    serde_json::from_slice::<Index>(body).is_ok_and(|i| {
        i.media_type.is_none_or(|m| m == media_type::OCI_INDEX)
            && i.manifests
                .iter()
                .all(|d| d.digest.parse::<Digest>().is_ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_referrers_answer_must_be_an_image_index() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let ok = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":1,"artifactType":"application/vnd.example.sbom"}}]}}"#
        );
        assert!(is_index(ok.as_bytes()));
        assert!(is_index(br#"{"schemaVersion":2,"manifests":[]}"#));
        assert!(is_index(
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":null}"#
        ));
        for bad in [
            &b"<html>log in</html>"[..],
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json""#,
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","manifests":[]}"#,
            br#"{"tags":["a"]}"#,
            br#"[]"#,
            // A descriptor without a valid digest, or without its size.
            br#"{"manifests":[{"mediaType":"a/b","digest":"sha256:aa","size":1}]}"#,
            br#"{"manifests":[{"mediaType":"a/b","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}]}"#,
        ] {
            assert!(!is_index(bad), "{}", String::from_utf8_lossy(bad));
        }
    }
}
