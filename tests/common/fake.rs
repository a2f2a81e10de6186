//! A tiny in-process upstream for what a real registry cannot do on demand: token auth,
//! corrupt bytes, stalls, resets and redirects. It records every request it sees.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

use super::{BoxBody, Seen};

pub type Parts = http::request::Parts;

pub struct Fake {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    _stop: oneshot::Sender<()>,
}

impl Fake {
    /// Serves every request with `handler`.
    pub async fn start<F, Fut>(handler: F) -> Fake
    where
        F: Fn(Parts) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = http::Response<BoxBody>> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let handler = Arc::new(handler);
        let (stop, mut stopped) = oneshot::channel();
        let seen2 = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => a.unwrap(),
                    _ = &mut stopped => return,
                };
                let (handler, seen) = (Arc::clone(&handler), Arc::clone(&seen2));
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (handler, seen) = (Arc::clone(&handler), Arc::clone(&seen));
                        async move {
                            let (parts, _) = req.into_parts();
                            seen.lock().unwrap().push(Seen {
                                method: parts.method.to_string(),
                                path: parts.uri.to_string(),
                                authorization: parts
                                    .headers
                                    .get("authorization")
                                    .map(|v| v.to_str().unwrap().to_owned()),
                            });
                            Ok::<_, std::convert::Infallible>(handler(parts).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Fake {
            addr,
            seen,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn count(&self, method: &str, fragment: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.method == method && s.path.contains(fragment))
            .count()
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A response with a status, headers and body.
pub fn respond(
    status: u16,
    headers: &[(&str, &str)],
    body: impl Into<bytes::Bytes>,
) -> http::Response<BoxBody> {
    let body = body.into();
    let mut b = http::Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.header("content-length", body.len())
        .body(super::full(body))
        .unwrap()
}

/// Faults a [`FakeRegistry`] can be told to produce; change them while it runs with `set`.
#[derive(Clone, Default)]
pub struct Faults {
    /// Demand a Bearer token from `/token` (Docker Hub's flow).
    pub token_auth: bool,
    /// With `token_auth`: the `Authorization` the token endpoint demands (None: anonymous ok).
    pub token_requires: Option<String>,
    /// Flip a byte of every blob and of every manifest fetched by digest.
    pub corrupt: bool,
    /// Send half of every blob, then reset the connection.
    pub reset_blobs: bool,
    /// Hold manifest HEADs this long before answering.
    pub stall_head: Option<std::time::Duration>,
    /// Answer blob GETs with a 307 to `{base}/cdn/{digest}` (a CDN on another origin).
    pub redirect_blobs_to: Option<String>,
    /// Answer every registry request (but `/v2/` and `/token`) with this status.
    pub status: Option<u16>,
    /// Send blob bodies in this many pieces with this pause before each.
    pub drip: Option<(usize, std::time::Duration)>,
    /// Send the first half of every blob body at once, then pause this long before the rest.
    pub stall_blobs: Option<std::time::Duration>,
    /// Send blob bodies chunked, and answer blob HEADs, without a Content-Length.
    pub chunked: bool,
    /// Docker Hub's rate-limit headers on every answer: (limit, remaining).
    pub ratelimit: Option<(u32, u32)>,
    /// Registry quirks: manifests as `application/json` without `Docker-Content-Digest`, and
    /// `HEAD` on manifests answered 405 (with `chunked`, blob HEADs without the digest too).
    pub quirks: bool,
    /// Answer blob GETs `200` with `Content-Length: 0` and no bytes, whatever the blob.
    pub empty_blobs: bool,
    /// Blob requests in this repository (as upstream sees it, e.g. `library/app`) wait this
    /// long, then answer 404 `BLOB_UNKNOWN` even for blobs the fake has.
    pub missing_blobs_in: Option<(String, std::time::Duration)>,
}

/// Requests the fake is busy with (handler running or body still being sent).
#[derive(Default)]
pub struct Load {
    pub now: std::sync::atomic::AtomicUsize,
    pub peak: std::sync::atomic::AtomicUsize,
    /// Blob bodies sent to their last byte.
    pub blobs_completed: std::sync::atomic::AtomicUsize,
}

/// Counts one busy request while alive.
struct Busy(Arc<Load>);

impl Busy {
    fn new(load: &Arc<Load>) -> Busy {
        use std::sync::atomic::Ordering::SeqCst;
        let now = load.now.fetch_add(1, SeqCst) + 1;
        load.peak.fetch_max(now, SeqCst);
        Busy(Arc::clone(load))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The token a [`FakeRegistry`] hands out.
pub const FAKE_TOKEN: &str = "fake-upstream-token";

#[derive(Default)]
struct Content {
    /// `repo:reference` -> (media type, bytes); references are tags and digests.
    manifests: std::collections::HashMap<String, (String, bytes::Bytes)>,
    blobs: std::collections::HashMap<String, bytes::Bytes>,
    tags: std::collections::BTreeMap<String, Vec<String>>,
}

/// A minimal pull-only registry with switchable faults.
pub struct FakeRegistry {
    pub fake: Fake,
    pub load: Arc<Load>,
    faults: Arc<Mutex<Faults>>,
    content: Arc<Mutex<Content>>,
}

impl FakeRegistry {
    pub async fn start(faults: Faults) -> FakeRegistry {
        let faults = Arc::new(Mutex::new(faults));
        let content: Arc<Mutex<Content>> = Arc::default();
        let load: Arc<Load> = Arc::default();
        let (f, c, l) = (Arc::clone(&faults), Arc::clone(&content), Arc::clone(&load));
        let fake = Fake::start(move |parts| {
            let faults = f.lock().unwrap().clone();
            let (c, l) = (Arc::clone(&c), Arc::clone(&l));
            async move {
                let busy = Busy::new(&l);
                let mut resp = serve(parts, &faults, &c, busy).await;
                if let Some((limit, remaining)) = faults.ratelimit {
                    let h = resp.headers_mut();
                    h.insert(
                        "ratelimit-limit",
                        format!("{limit};w=21600").parse().unwrap(),
                    );
                    h.insert(
                        "ratelimit-remaining",
                        format!("{remaining};w=21600").parse().unwrap(),
                    );
                }
                resp
            }
        })
        .await;
        FakeRegistry {
            fake,
            load,
            faults,
            content,
        }
    }

    pub fn url(&self) -> String {
        self.fake.url()
    }

    pub fn set(&self, change: impl FnOnce(&mut Faults)) {
        change(&mut self.faults.lock().unwrap());
    }

    /// Publishes `image` (and its children) as `repo:tag`.
    pub fn add(&self, repo: &str, tag: &str, image: &super::Image) {
        let mut c = self.content.lock().unwrap();
        let entry = (image.media_type.clone(), image.manifest.clone());
        c.manifests.insert(format!("{repo}:{tag}"), entry.clone());
        c.manifests
            .insert(format!("{repo}:{}", image.digest()), entry);
        for (d, mt, bytes) in image.child_manifests() {
            c.manifests.insert(format!("{repo}:{d}"), (mt, bytes));
        }
        for b in image.blobs() {
            c.blobs.insert(super::image::sha256(&b), b);
        }
        let tags = c.tags.entry(repo.to_owned()).or_default();
        if !tags.iter().any(|t| t == tag) {
            tags.push(tag.to_owned());
            tags.sort();
        }
    }

    pub fn count(&self, method: &str, fragment: &str) -> usize {
        self.fake.count(method, fragment)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.fake.requests()
    }
}

fn challenge(host: &str, scope: Option<&str>) -> http::Response<BoxBody> {
    let mut v = format!("Bearer realm=\"http://{host}/token\",service=\"fake\"");
    if let Some(scope) = scope {
        v.push_str(&format!(",scope=\"{scope}\""));
    }
    respond(
        401,
        &[
            ("www-authenticate", &v),
            ("content-type", "application/json"),
        ],
        r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
    )
}

async fn serve(
    parts: Parts,
    faults: &Faults,
    content: &Mutex<Content>,
    busy: Busy,
) -> http::Response<BoxBody> {
    let host = parts
        .headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_owned();
    let auth = parts
        .headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    let path = parts.uri.path().to_owned();
    let head = parts.method == http::Method::HEAD;

    if path == "/token" {
        if faults.token_requires.is_some() && auth != faults.token_requires {
            return respond(401, &[], r#"{"details":"incorrect username or password"}"#);
        }
        let body = format!(r#"{{"token":"{FAKE_TOKEN}","expires_in":300}}"#);
        return respond(200, &[("content-type", "application/json")], body);
    }
    if let Some(digest) = path.strip_prefix("/cdn/") {
        let blob = content.lock().unwrap().blobs.get(digest).cloned();
        return match blob {
            Some(b) => respond(200, &[("content-type", "application/octet-stream")], b),
            None => respond(404, &[], ""),
        };
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return respond(404, &[], "");
    };
    let (repo, kind, reference) = if rest.is_empty() {
        ("", "base", "")
    } else if let Some((repo, r)) = rest.rsplit_once("/manifests/") {
        (repo, "manifest", r)
    } else if let Some((repo, r)) = rest.rsplit_once("/blobs/") {
        (repo, "blob", r)
    } else if let Some(repo) = rest.strip_suffix("/tags/list") {
        (repo, "tags", "")
    } else {
        return respond(404, &[], "");
    };
    if faults.token_auth && auth.as_deref() != Some(&format!("Bearer {FAKE_TOKEN}")) {
        let scope = (!repo.is_empty()).then(|| format!("repository:{repo}:pull"));
        return challenge(&host, scope.as_deref());
    }
    if kind == "base" {
        return respond(200, &[("content-type", "application/json")], "{}");
    }
    if let Some(status) = faults.status {
        return respond(
            status,
            &[("retry-after", "7"), ("content-type", "application/json")],
            r#"{"errors":[{"code":"UNKNOWN","message":"injected"}]}"#,
        );
    }
    match kind {
        "manifest" => {
            if head && let Some(d) = faults.stall_head {
                tokio::time::sleep(d).await;
            }
            if head && faults.quirks {
                return respond(405, &[], "");
            }
            let found = content
                .lock()
                .unwrap()
                .manifests
                .get(&format!("{repo}:{reference}"))
                .cloned();
            let Some((mt, mut bytes)) = found else {
                return respond(404, &[], r#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#);
            };
            let digest = super::image::sha256(&bytes);
            if faults.corrupt && reference.starts_with("sha256:") {
                bytes = corrupt(&bytes);
            }
            if faults.quirks {
                return respond(200, &[("content-type", "application/json")], bytes);
            }
            respond(
                200,
                &[("content-type", &mt), ("docker-content-digest", &digest)],
                bytes,
            )
        }
        "blob" => {
            if let Some((missing, delay)) = &faults.missing_blobs_in
                && missing == repo
            {
                tokio::time::sleep(*delay).await;
                return respond(404, &[], r#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#);
            }
            let Some(bytes) = content.lock().unwrap().blobs.get(reference).cloned() else {
                return respond(404, &[], r#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#);
            };
            if let Some(cdn) = &faults.redirect_blobs_to
                && !head
            {
                return respond(307, &[("location", &format!("{cdn}/cdn/{reference}"))], "");
            }
            let headers = [
                ("content-type", "application/octet-stream"),
                ("docker-content-digest", reference),
            ];
            if faults.empty_blobs && !head {
                return respond(200, &headers, "");
            }
            if faults.reset_blobs && !head {
                return half_then_reset(&bytes, &headers);
            }
            let bytes = if faults.corrupt {
                corrupt(&bytes)
            } else {
                bytes
            };
            if head && faults.chunked {
                // A stream of unknown length: no Content-Length in the head either.
                let none = futures_util::stream::empty::<
                    Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>,
                >();
                let mut r =
                    http::Response::new(super::BoxBody::new(http_body_util::StreamBody::new(none)));
                // With `quirks`, not even the digest: a 200 that names no blob (a login page).
                for (k, v) in headers
                    .iter()
                    .filter(|(k, _)| !faults.quirks || *k == "content-type")
                {
                    r.headers_mut().insert(*k, v.parse().unwrap());
                }
                return r;
            }
            if head {
                return respond(200, &headers, bytes);
            }
            let (pieces, first, pause) = match (faults.stall_blobs, faults.drip) {
                (Some(stall), _) => (2, std::time::Duration::ZERO, stall),
                (None, Some((pieces, pause))) => (pieces, pause, pause),
                (None, None) => (1, std::time::Duration::ZERO, std::time::Duration::ZERO),
            };
            let r = drip(bytes, &headers, pieces, first, pause, busy);
            if faults.chunked {
                let (mut parts, body) = r.into_parts();
                parts.headers.remove("content-length");
                return http::Response::from_parts(parts, body);
            }
            r
        }
        _ => {
            let tags = content.lock().unwrap().tags.get(repo).cloned();
            let Some(tags) = tags else {
                return respond(404, &[], r#"{"errors":[{"code":"NAME_UNKNOWN"}]}"#);
            };
            // Paginate by `n` and `last` as the spec says, with a relative Link.
            let q: std::collections::HashMap<String, String> =
                url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
                    .into_owned()
                    .collect();
            let after: Vec<String> = tags
                .into_iter()
                .filter(|t| q.get("last").is_none_or(|l| t > l))
                .collect();
            let n = q
                .get("n")
                .and_then(|n| n.parse().ok())
                .unwrap_or(usize::MAX);
            let page: Vec<String> = after.iter().take(n).cloned().collect();
            let body = serde_json::json!({"name": repo, "tags": page}).to_string();
            if after.len() > page.len() {
                let last = page.last().cloned().unwrap_or_default();
                let link = format!("</v2/{repo}/tags/list?n={n}&last={last}>; rel=\"next\"");
                respond(
                    200,
                    &[("content-type", "application/json"), ("link", &link)],
                    body,
                )
            } else {
                respond(200, &[("content-type", "application/json")], body)
            }
        }
    }
}

fn corrupt(b: &bytes::Bytes) -> bytes::Bytes {
    let mut v = b.to_vec();
    let mid = v.len() / 2;
    v[mid] ^= 0xff;
    v.into()
}

/// Headers promising the whole blob, half of it, then a broken connection.
fn half_then_reset(b: &bytes::Bytes, headers: &[(&str, &str)]) -> http::Response<BoxBody> {
    use http_body_util::BodyExt as _;
    let half = b.slice(..b.len() / 2);
    let frames = futures_util::stream::iter(vec![
        Ok(hyper::body::Frame::data(half)),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "injected reset",
        )),
    ]);
    let mut r = http::Response::builder().status(200);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.header("content-length", b.len())
        .body(http_body_util::StreamBody::new(frames).boxed())
        .unwrap()
}

/// A body sent in `pieces` parts, the first after `first`, each other after `pause`; `busy`
/// lives until the last byte is out.
fn drip(
    b: bytes::Bytes,
    headers: &[(&str, &str)],
    pieces: usize,
    first: std::time::Duration,
    pause: std::time::Duration,
    busy: Busy,
) -> http::Response<BoxBody> {
    use http_body_util::BodyExt as _;
    let step = b.len().div_ceil(pieces.max(1)).max(1);
    let len = b.len();
    let frames = futures_util::stream::unfold((0usize, Some(busy)), move |(at, busy)| {
        let b = b.clone();
        async move {
            if at >= b.len() {
                return None;
            }
            let wait = if at == 0 { first } else { pause };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let end = (at + step).min(b.len());
            let busy = if end == b.len() {
                if let Some(busy) = &busy {
                    busy.0
                        .blobs_completed
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                None
            } else {
                busy
            };
            Some((
                Ok::<_, std::io::Error>(hyper::body::Frame::data(b.slice(at..end))),
                (end, busy),
            ))
        }
    });
    let mut r = http::Response::builder().status(200);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.header("content-length", len)
        .body(http_body_util::StreamBody::new(frames).boxed())
        .unwrap()
}
