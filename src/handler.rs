//! The one place a request becomes a `Result` and a `Result` becomes an HTTP response.
//!
//! One tracing span per request carries `repo`, `reference` and `cache`; one log line per
//! request says what happened.

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::StreamBody;
use tracing::{Instrument, field};

use crate::body::Body;
use crate::cache::flight::Reader;
use crate::error::{Error, Origin, Result};
use crate::oci::image_ref::Name;
use crate::oci::route::{self, Route};
use crate::oci::{API_VERSION_HEADER, DIGEST_HEADER, range};

use crate::proxy::{BlobBody, CacheResult, ClientInfo, Listed, Proxy};
use crate::sendfile::Loans;

/// What a request turned out to be, for metrics.
struct Served {
    kind: &'static str,
    upstream: String,
    cache: Option<CacheResult>,
}

/// Serves one request.
pub async fn handle<B>(proxy: Arc<Proxy>, req: Request<B>) -> Response<Body> {
    let start = Instant::now();
    let method = req.method().clone();
    let target_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    let max = proxy.config().limits.max_uri_length;
    if target_len > max {
        // Checked before anything looks at the path, and not logged in full.
        tracing::debug!(len = target_len, "request target too long");
        return Error::UriTooLong {
            len: target_len,
            max,
        }
        .to_response(method == Method::HEAD);
    }
    let path = req.uri().path().to_owned();
    if let Some(resp) = operator_endpoint(&proxy, &method, &path) {
        return resp;
    }
    let span = tracing::info_span!(
        "request",
        %method,
        path = %path,
        upstream = field::Empty,
        repo = field::Empty,
        reference = field::Empty,
        cache = field::Empty,
        user = field::Empty,
    );
    async move {
        let head = method == Method::HEAD;
        let mut served = Served {
            kind: "other",
            upstream: String::new(),
            cache: None,
        };
        let mut resp = match dispatch(&proxy, &req, &mut served).await {
            Ok(r) => r,
            Err(e) => {
                if let Some(reason) = e.denial_reason() {
                    proxy
                        .metrics()
                        .access_denied
                        .with_label_values(&[reason])
                        .inc();
                }
                match e.origin() {
                    Origin::Client => tracing::debug!(error = %e, "bad request"),
                    Origin::Upstream => tracing::warn!(error = %e, "upstream failure"),
                    Origin::Storage | Origin::Internal => {
                        tracing::error!(error = %e, "request failed")
                    }
                }
                e.to_response(head)
            }
        };
        resp.headers_mut()
            .insert(API_VERSION_HEADER, HeaderValue::from_static("registry/2.0"));
        let bytes = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let elapsed = start.elapsed();
        let m = proxy.metrics();
        let status_class = match resp.status().as_u16() {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        // A fixed set: any token is a method to hyper, and each label value is a series kept
        // for good.
        let method_label = match method {
            Method::GET => "GET",
            Method::HEAD => "HEAD",
            _ => "other",
        };
        m.requests
            .with_label_values(&[served.kind, method_label, status_class, &served.upstream])
            .inc();
        m.request_duration
            .with_label_values(&[served.kind])
            .observe(elapsed.as_secs_f64());
        if let Some(cache) = served.cache {
            m.lookups
                .with_label_values(&[served.kind, &served.upstream, cache.as_str()])
                .inc();
        }
        // Whole bodies are counted here; streamed blob bodies as their chunks go out.
        if let (Some(cache), crate::body::Body::Full(Some(b))) = (served.cache, resp.body()) {
            m.served_bytes
                .with_label_values(&[source_of(cache)])
                .inc_by(b.len() as u64);
        }
        tracing::info!(
            status = resp.status().as_u16(),
            bytes = %bytes,
            ms = elapsed.as_secs_f64() * 1000.0,
            "served"
        );
        resp
    }
    .instrument(span)
    .await
}

/// Where the bytes of an answer with this cache result came from.
fn source_of(cache: CacheResult) -> &'static str {
    match cache {
        CacheResult::Hit | CacheResult::Stale | CacheResult::Revalidated => "cache",
        CacheResult::Miss | CacheResult::Coalesced | CacheResult::Passthrough => "upstream",
        CacheResult::Shared => "bucket",
    }
}

/// `/metrics`, `/healthz` and `/readyz`, beside the registry API.
pub fn operator_endpoint(proxy: &Proxy, method: &Method, path: &str) -> Option<Response<Body>> {
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return None;
    }
    if method != Method::GET && method != Method::HEAD {
        return Some(Error::Unsupported(method.to_string()).to_response(false));
    }
    let (status, content_type, body) = match path {
        "/metrics" => {
            let (ct, body) = proxy.render_metrics();
            (StatusCode::OK, ct, body)
        }
        "/healthz" => (StatusCode::OK, "text/plain".into(), b"ok\n".to_vec()),
        _ => match proxy.readiness() {
            Ok(()) => (StatusCode::OK, "text/plain".into(), b"ready\n".to_vec()),
            Err(why) => {
                tracing::warn!(reason = %why, "not ready");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain".into(),
                    format!("not ready: {why}\n").into_bytes(),
                )
            }
        },
    };
    let len = body.len();
    Some(
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CONTENT_LENGTH, len)
            .header(header::CACHE_CONTROL, "no-store")
            .body(if method == Method::HEAD {
                Body::empty()
            } else {
                Body::full(body)
            })
            .expect("valid response"),
    )
}

/// The admin API (see `admin_listen`).
pub async fn admin_endpoint(
    proxy: &Arc<Proxy>,
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Option<Response<Body>> {
    let params: Vec<(String, String)> = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let one = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let result: Result<serde_json::Value> = match (method, path) {
        (&Method::GET, "/admin/ls") => {
            let (store, index) = proxy.store_and_index();
            let (up, repo) = (
                one("upstream").map(str::to_owned),
                one("repo").map(str::to_owned),
            );
            tokio::task::spawn_blocking(move || {
                crate::cache::lifecycle::list(&store, &index, up.as_deref(), repo.as_deref())
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))
            .and_then(|r| r.map_err(Error::from))
            .map(|rows| serde_json::json!(rows))
        }
        (&Method::POST | &Method::DELETE, "/admin/purge") => proxy
            .purge(one("repo"), one("tag"), one("digest"))
            .await
            .map(|p| serde_json::json!(p)),
        (&Method::POST, "/admin/warm") => {
            let images: Vec<&str> = params
                .iter()
                .filter(|(k, _)| k == "image")
                .map(|(_, v)| v.as_str())
                .collect();
            if images.is_empty() {
                Err(Error::NameInvalid("give ?image=REF (repeatable)".into()))
            } else {
                let platforms: Vec<String> = params
                    .iter()
                    .filter(|(k, _)| k == "platform")
                    .map(|(_, v)| v.clone())
                    .collect();
                let mut done = Vec::new();
                let mut failed = None;
                for image in images {
                    match proxy.warm(image, &platforms).await {
                        Ok(w) => done.push(w),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                match failed {
                    Some(e) => Err(e),
                    None => Ok(serde_json::json!(done)),
                }
            }
        }
        (_, "/admin/ls" | "/admin/purge" | "/admin/warm") => {
            Err(Error::Unsupported(method.to_string()))
        }
        _ => return None,
    };
    Some(match result {
        Ok(v) => {
            let body = v.to_string();
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CONTENT_LENGTH, body.len())
                .body(Body::full(body))
                .expect("valid response")
        }
        Err(e) => e.to_response(false),
    })
}

async fn dispatch<B>(
    proxy: &Arc<Proxy>,
    req: &Request<B>,
    served: &mut Served,
) -> Result<Response<Body>> {
    let parsed = route::Request::parse(req.uri().path(), req.uri().query())?;
    served.kind = match parsed.route {
        Route::Manifest { .. } => "manifest",
        Route::Blob { .. } => "blob",
        Route::TagsList { .. } => "tags",
        Route::Referrers { .. } => "referrers",
        _ => "other",
    };
    let method = req.method();
    if method != Method::GET && method != Method::HEAD {
        return Err(Error::Unsupported(format!("{method}")));
    }
    let head = method == Method::HEAD;
    let span = tracing::Span::current();
    let access = proxy.access();
    let who = access
        .authenticate(req.headers().get(header::AUTHORIZATION))
        .await?;
    if let Some(w) = &who {
        span.record("user", w.name.as_str());
    }
    let client = ClientInfo {
        accept: req
            .headers()
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", "),
        // Credentials for regcache itself never go upstream.
        authorization: req
            .headers()
            .get(header::AUTHORIZATION)
            .filter(|_| !access.is_enabled())
            .cloned(),
    };
    let to = Reaching {
        proxy,
        who: &who,
        ns: parsed.ns.as_deref(),
        span: &span,
    };
    match parsed.route {
        Route::Base => {
            access.check_base(&who)?;
            proxy.check_base(&client).await?;
            Ok(json_response(StatusCode::OK, "{}", head))
        }
        Route::Catalog => Err(Error::NotFound),
        Route::Upload { .. } => Err(Error::Unsupported("pushing".into())),
        Route::Manifest { name, reference } => {
            let t = target(&to, &name, &reference.to_string(), served)?;
            let (m, cache) = proxy.manifest(&t, &reference, &client).await?;
            span.record("cache", cache.as_str());
            served.cache = Some(cache);
            let len = m.bytes.len();
            let resp = Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, &m.media_type)
                .header(header::CONTENT_LENGTH, len)
                .header(DIGEST_HEADER, m.digest.to_string())
                .header(header::ETAG, format!("\"{}\"", m.digest))
                .header("cache-status", cache.cache_status());
            let body = if head {
                Body::empty()
            } else {
                Body::full(m.bytes.clone())
            };
            resp.body(body).map_err(|e| Error::Internal(e.to_string()))
        }
        Route::Blob { name, digest } => {
            let t = target(&to, &name, &digest.to_string(), served)?;
            let answer = proxy.blob(&t, &digest, head, &client).await?;
            span.record("cache", answer.cache.as_str());
            served.cache = Some(answer.cache);
            // A passed-through body is the whole blob (a server may ignore Range), and only
            // GET has ranges (RFC 9110, 14.2): HEAD describes the whole blob.
            let range_header = req
                .headers()
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok())
                .filter(|_| !head && !matches!(answer.body, BlobBody::Passthrough(_)));
            let mut resp = Response::builder()
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(DIGEST_HEADER, digest.to_string())
                .header(header::ETAG, format!("\"{digest}\""))
                .header(header::CACHE_CONTROL, crate::oci::BLOB_CACHE_CONTROL)
                .header("cache-status", answer.cache.cache_status());
            let (status, start, end) = match answer.size {
                None => (StatusCode::OK, 0, None),
                Some(size) => {
                    resp = resp.header(header::ACCEPT_RANGES, "bytes");
                    match range::parse(range_header, size) {
                        range::RangeAnswer::Full => {
                            resp = resp.header(header::CONTENT_LENGTH, size);
                            (StatusCode::OK, 0, Some(size))
                        }
                        range::RangeAnswer::Partial { start, end } => {
                            resp = resp.header(header::CONTENT_LENGTH, end - start + 1).header(
                                header::CONTENT_RANGE,
                                format!("bytes {start}-{end}/{size}"),
                            );
                            (StatusCode::PARTIAL_CONTENT, start, Some(end + 1))
                        }
                        range::RangeAnswer::Unsatisfiable => {
                            return Err(Error::RangeNotSatisfiable { size });
                        }
                    }
                }
            };
            if let BlobBody::Passthrough(b) = &answer.body {
                let body = if head {
                    None
                } else {
                    b.lock().expect("passthrough body").take()
                };
                if body.is_some() {
                    // Counted whole here; a broken transfer is an error the client sees.
                    if let Some(n) = answer.size {
                        proxy
                            .metrics()
                            .served_bytes
                            .with_label_values(&["upstream"])
                            .inc_by(n);
                    }
                }
                return resp
                    .status(status)
                    .body(body.unwrap_or_else(Body::empty))
                    .map_err(|e| Error::Internal(e.to_string()));
            }
            let body = match answer.reader(start, end) {
                Some(reader) if !head => {
                    let source = source_of(answer.cache);
                    // Bytes on disk go out by sendfile where the connection can.
                    let reader = match req.extensions().get::<Arc<Loans>>() {
                        Some(loans) => reader.lend_to(Arc::clone(loans)),
                        None => reader,
                    };
                    let counter = proxy.metrics().served_bytes.with_label_values(&[source]);
                    stream(reader, counter)
                }
                _ => Body::empty(),
            };
            resp.status(status)
                .body(body)
                .map_err(|e| Error::Internal(e.to_string()))
        }
        Route::TagsList { name } => listing(&to, req, &name, Listed::Tags, &client, served).await,
        Route::Referrers { name, digest } => {
            let listed = Listed::Referrers(digest);
            listing(&to, req, &name, listed, &client, served).await
        }
    }
}

/// A `tags/list` or referrers answer, with its pagination links pointing back at us.
async fn listing<B>(
    to: &Reaching<'_>,
    req: &Request<B>,
    name: &Name,
    listed: Listed,
    client: &ClientInfo,
    served: &mut Served,
) -> Result<Response<Body>> {
    let endpoint = listed.endpoint();
    let t = target(to, name, &endpoint, served)?;
    let query = req.uri().query().map(strip_ns);
    let (list, cache) = to
        .proxy
        .listing(&t, &listed, query.as_deref(), client)
        .await?;
    to.span.record("cache", cache.as_str());
    served.cache = Some(cache);
    let mut resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_LENGTH, list.body.len())
        .header("cache-status", cache.cache_status());
    if let Some(ct) = &list.content_type {
        resp = resp.header(header::CONTENT_TYPE, ct);
    }
    if let Some(f) = &list.filters_applied {
        resp = resp.header("oci-filters-applied", f);
    }
    if let Some(link) = list.link.as_ref().and_then(|l| {
        // The base URLs the upstream was built from (checked when the config loaded).
        let upstream = to.proxy.config().upstreams.get(&t.upstream.name);
        let urls: Vec<url::Url> = upstream
            .into_iter()
            .flat_map(|u| &u.urls)
            .filter_map(|u| u.parse().ok())
            .collect();
        rewrite_link(l, &urls, t.repo.as_str(), name.as_str(), &endpoint, to.ns)
    }) {
        resp = resp.header(header::LINK, link);
    }
    let body = match req.method() == Method::HEAD {
        true => Body::empty(),
        false => Body::full(list.body.clone()),
    };
    resp.body(body).map_err(|e| Error::Internal(e.to_string()))
}

/// What every route that reaches an upstream needs to find its target.
struct Reaching<'a> {
    proxy: &'a Proxy,
    who: &'a crate::access::Client,
    ns: Option<&'a str>,
    span: &'a tracing::Span,
}

/// Resolves `name` to its upstream and repository, names them in the request's span and
/// metrics, and checks that the client may pull it (before any cache lookup or upstream
/// contact).
fn target(
    to: &Reaching<'_>,
    name: &Name,
    reference: &str,
    served: &mut Served,
) -> Result<crate::proxy::Target> {
    let t = to.proxy.resolve(name, to.ns)?;
    to.span.record("upstream", t.upstream.name.as_str());
    to.span.record("repo", t.repo.as_str());
    to.span.record("reference", reference);
    served.upstream.clone_from(&t.upstream.name);
    to.proxy
        .access()
        .authorize(to.who, &t.upstream.name, t.repo.as_str())?;
    Ok(t)
}

fn json_response(status: StatusCode, body: &'static str, head: bool) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len())
        .body(if head {
            Body::empty()
        } else {
            Body::full(body)
        })
        .expect("valid response")
}

/// A body that follows a blob reader. A reader error aborts the body, so the client sees a
/// broken transfer rather than a short or wrong blob.
fn stream(reader: Reader, served: prometheus::IntCounter) -> Body {
    let chunks = futures_util::stream::unfold(reader, move |mut r| {
        let served = served.clone();
        async move {
            let next = r.next_chunk().await?;
            if let Ok(chunk) = &next {
                served.inc_by(chunk.len() as u64);
            }
            Some((next.map(http_body::Frame::data), r))
        }
    });
    Body::stream(StreamBody::new(chunks))
}

/// The tags/list query without containerd's `ns`, which is ours, not upstream's.
fn strip_ns(query: &str) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(url::form_urlencoded::parse(query.as_bytes()).filter(|(k, _)| k != "ns"))
        .finish()
}

/// Rewrites upstream's pagination links so the client asks us, under its own name.
///
/// Every `<URI-Reference>` in the `Link` value (RFC 8288) is resolved as a client would resolve
/// it, against the request regcache made to one of `upstream`'s base URLs. One that names the
/// repository's `endpoint` (`tags/list`, `referrers/<digest>`) there (below the base URL's
/// path, or at the origin's root, as registries behind a path prefix also answer) becomes our
/// own `/v2/<client_repo>/<endpoint>?<its query>`, plus `ns` when the client routed by it. The
/// origin is not checked: an absolute link to the same list anywhere would send the client
/// around us. Other links, and the parameters of every link, pass through as they are.
fn rewrite_link(
    link: &HeaderValue,
    upstream: &[url::Url],
    upstream_repo: &str,
    client_repo: &str,
    endpoint: &str,
    ns: Option<&str>,
) -> Option<HeaderValue> {
    let s = link.to_str().ok()?;
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len() + 32);
    // `s[..copied]` is in `out`; `<` inside a quoted parameter value starts no URI.
    let (mut copied, mut i, mut quoted) = (0, 0, false);
    while i < b.len() {
        match b[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'<' if !quoted => {
                let Some(len) = s[i + 1..].find('>') else {
                    break;
                };
                let uri = &s[i + 1..i + 1 + len];
                if let Some(ours) =
                    link_target(uri, upstream, upstream_repo, client_repo, endpoint, ns)
                {
                    out.push_str(&s[copied..=i]);
                    out.push_str(&ours);
                    copied = i + 1 + len;
                }
                i += len + 1;
            }
            _ => {}
        }
        i += 1;
    }
    out.push_str(&s[copied..]);
    HeaderValue::from_str(&out).ok()
}

/// Our path for one link's URI, when it names the repository's `endpoint` upstream.
fn link_target(
    uri: &str,
    upstream: &[url::Url],
    upstream_repo: &str,
    client_repo: &str,
    endpoint: &str,
    ns: Option<&str>,
) -> Option<String> {
    let list = format!("/v2/{upstream_repo}/{endpoint}");
    let resolved = upstream.iter().find_map(|base| {
        let base_path = base.path().trim_end_matches('/');
        let mut request = base.clone();
        request.set_path(&format!("{base_path}{list}"));
        request.set_query(None);
        request.set_fragment(None);
        let to = request.join(uri.trim()).ok()?;
        let path = to.path();
        let names_list = path == list || path.strip_prefix(base_path) == Some(list.as_str());
        (matches!(to.scheme(), "http" | "https") && names_list).then_some(to)
    })?;
    let mut ours = format!("/v2/{client_repo}/{endpoint}");
    let query = resolved.query().filter(|q| !q.is_empty());
    if let Some(q) = query {
        ours.push('?');
        ours.push_str(q);
    }
    if let Some(ns) = ns {
        ours.push(if query.is_some() { '&' } else { '?' });
        ours.push_str("ns=");
        ours.extend(url::form_urlencoded::byte_serialize(ns.as_bytes()));
    }
    Some(ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(urls: &[&str]) -> Vec<url::Url> {
        urls.iter().map(|u| u.parse().unwrap()).collect()
    }

    #[test]
    fn link_rewriting() {
        let hub = urls(&["https://registry-1.docker.io"]);
        let l = HeaderValue::from_static("</v2/library/alpine/tags/list?n=2&last=b>; rel=\"next\"");
        assert_eq!(
            rewrite_link(&l, &hub, "library/alpine", "alpine", "tags/list", None).unwrap(),
            "</v2/alpine/tags/list?n=2&last=b>; rel=\"next\""
        );
        assert_eq!(
            rewrite_link(
                &l,
                &hub,
                "library/alpine",
                "library/alpine",
                "tags/list",
                Some("docker.io")
            )
            .unwrap(),
            "</v2/library/alpine/tags/list?n=2&last=b&ns=docker.io>; rel=\"next\""
        );
        let abs = HeaderValue::from_static(
            "<https://registry-1.docker.io/v2/library/alpine/tags/list?last=b>; rel=\"next\"",
        );
        assert_eq!(
            rewrite_link(&abs, &hub, "library/alpine", "alpine", "tags/list", None).unwrap(),
            "</v2/alpine/tags/list?last=b>; rel=\"next\""
        );
    }

    /// An upstream below a base path (Artifactory's `/artifactory/api/docker/<repo-key>`)
    /// links below it too; the client must get our path, not the base path in front of it.
    #[test]
    fn link_rewriting_drops_the_upstream_base_path() {
        let art = urls(&[
            "https://art-1.example/artifactory/api/docker/remote",
            "https://art.example/artifactory/api/docker/remote/",
        ]);
        let want = "</v2/art/team/app/tags/list?n=2&last=b>; rel=\"next\"";
        for link in [
            "</artifactory/api/docker/remote/v2/team/app/tags/list?n=2&last=b>; rel=\"next\"",
            "<https://art.example/artifactory/api/docker/remote/v2/team/app/tags/list?n=2&last=b>; rel=\"next\"",
            "<HTTPS://ART.example:443/artifactory/api/docker/remote/v2/team/app/tags/list?n=2&last=b>; rel=\"next\"",
            // At the origin's root, as a registry behind a path prefix often answers too.
            "</v2/team/app/tags/list?n=2&last=b>; rel=\"next\"",
            // Relative to the request's own path.
            "<list?n=2&last=b>; rel=\"next\"",
        ] {
            let l = HeaderValue::from_str(link).unwrap();
            assert_eq!(
                rewrite_link(&l, &art, "team/app", "art/team/app", "tags/list", None).unwrap(),
                want,
                "{link}"
            );
        }
        let l = HeaderValue::from_static(
            "</artifactory/api/docker/remote/v2/team/app/tags/list>; rel=\"next\"",
        );
        assert_eq!(
            rewrite_link(
                &l,
                &art,
                "team/app",
                "team/app",
                "tags/list",
                Some("art.example")
            )
            .unwrap(),
            "</v2/team/app/tags/list?ns=art.example>; rel=\"next\""
        );
        // Another repository's list, another path on the upstream, another scheme: untouched.
        for link in [
            "</artifactory/api/docker/remote/v2/team/other/tags/list?n=2>; rel=\"next\"",
            "</artifactory/api/docker/remote/v2/_catalog?n=2>; rel=\"next\"",
            "</artifactory/api/docker/elsewhere/v2/team/app/tags/list?n=2>; rel=\"next\"",
            "<ftp://art.example/v2/team/app/tags/list>; rel=\"next\"",
        ] {
            let l = HeaderValue::from_str(link).unwrap();
            assert_eq!(
                rewrite_link(&l, &art, "team/app", "art/team/app", "tags/list", None).unwrap(),
                link
            );
        }
    }

    /// Every link of a value with several is rewritten, wherever it starts.
    #[test]
    fn link_rewriting_rewrites_every_link() {
        let ghcr = urls(&["https://ghcr.example"]);
        let l = HeaderValue::from_static(
            "<https://docs.example/tags>; rel=\"help\"; title=\"a <b>, c\", \
             <https://ghcr.example/v2/team/app/tags/list?n=1>; rel=\"first\", \
             </v2/team/app/tags/list?n=1&last=b>; rel=\"next\"",
        );
        assert_eq!(
            rewrite_link(
                &l,
                &ghcr,
                "team/app",
                "ghcr.io/team/app",
                "tags/list",
                Some("ghcr.io")
            )
            .unwrap(),
            "<https://docs.example/tags>; rel=\"help\"; title=\"a <b>, c\", \
             </v2/ghcr.io/team/app/tags/list?n=1&ns=ghcr.io>; rel=\"first\", \
             </v2/ghcr.io/team/app/tags/list?n=1&last=b&ns=ghcr.io>; rel=\"next\""
        );
        // A quoted `\"` does not end the quoted string; an unclosed `<` leaves the rest as is.
        let l = HeaderValue::from_static(
            "</v2/team/app/tags/list?n=1>; title=\"\\\" <x>\", </v2/team/app/tags/list?n=2",
        );
        assert_eq!(
            rewrite_link(&l, &ghcr, "team/app", "app", "tags/list", None).unwrap(),
            "</v2/app/tags/list?n=1>; title=\"\\\" <x>\", </v2/team/app/tags/list?n=2"
        );
    }

    /// A referrers answer's pages (OCI distribution spec 1.1) come back to us the same way.
    #[test]
    fn link_rewriting_of_referrers_pages() {
        let hub = urls(&["https://registry-1.docker.io"]);
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let endpoint = format!("referrers/{d}");
        let l = HeaderValue::from_str(&format!(
            "</v2/library/alpine/referrers/{d}?artifactType=x&next=2>; rel=\"next\""
        ))
        .unwrap();
        assert_eq!(
            rewrite_link(
                &l,
                &hub,
                "library/alpine",
                "alpine",
                &endpoint,
                Some("docker.io")
            )
            .unwrap(),
            format!("</v2/alpine/referrers/{d}?artifactType=x&next=2&ns=docker.io>; rel=\"next\"")
        );
        // Another subject's answer is not this one's next page: untouched.
        let other =
            HeaderValue::from_static("</v2/library/alpine/referrers/sha256:00>; rel=\"next\"");
        assert_eq!(
            rewrite_link(&other, &hub, "library/alpine", "alpine", &endpoint, None).unwrap(),
            other
        );
    }

    #[test]
    fn ns_is_ours() {
        assert_eq!(strip_ns("n=2&ns=ghcr.io&last=x"), "n=2&last=x");
    }
}
