//! The HTTP client for one upstream: pooled HTTP/1.1 and HTTP/2 over rustls, timeouts, failover
//! across URLs, the 401 -> token -> retry dance, and redirects that never carry our
//! `Authorization` to another host.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use url::Url;

use super::auth::{Auth, Challenge, TokenResponse, parse_challenge};
use super::connect::{AcceptAnyCertificate, Connector};
use super::credentials::{Credentials, server_name};
use super::guard::{BreakerState, Guard, GuardConfig, Outcome, Refusal};
use crate::config::UpstreamConfig;
use crate::metrics::Metrics;
use crate::oci::reference::RepoName;

type HttpClient = Client<HttpsConnector<Connector>, Empty<Bytes>>;

const MAX_REDIRECTS: usize = 5;
const MAX_TOKEN_RESPONSE: usize = 1 << 20;
const USER_AGENT: &str = concat!("regcache/", env!("CARGO_PKG_VERSION"));

/// Why an upstream exchange failed before it produced a response.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Io(String),
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
    #[error("bad redirect location {0:?}")]
    BadRedirect(String),
    #[error("token endpoint {realm}: {reason}")]
    Token { realm: String, reason: String },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("paused for {:?} more: upstream answered 429 Too Many Requests", .0)]
    RateLimited(Duration),
    #[error("circuit breaker open after repeated failures; next try in {:?}", .0)]
    CircuitOpen(Duration),
}

impl UpstreamError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, UpstreamError::Timeout(_))
    }

    /// How long until asking again makes sense, when regcache itself holds back.
    pub fn retry_in(&self) -> Option<Duration> {
        match self {
            UpstreamError::RateLimited(d) | UpstreamError::CircuitOpen(d) => Some(*d),
            _ => None,
        }
    }

    /// The `reason` label of `regcache_upstream_errors_total`, for upstream failures.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            UpstreamError::Connect(_) => Some("connect"),
            UpstreamError::Timeout(_) => Some("timeout"),
            UpstreamError::Io(_) => Some("reset"),
            UpstreamError::Token { .. } => Some("token"),
            _ => None,
        }
    }

    /// Whether this says the upstream is unwell (as opposed to a refusal of ours).
    fn is_upstream_failure(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(_)
                | UpstreamError::Timeout(_)
                | UpstreamError::Io(_)
                | UpstreamError::Token { .. }
        )
    }
}

/// What to ask an upstream for.
pub struct UpstreamRequest<'a> {
    pub method: Method,
    pub repo: &'a RepoName,
    /// The part after `/v2/<repo>/`, e.g. `manifests/latest`.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub accept: Option<&'a str>,
    /// The client's own `Authorization`, forwarded only when the upstream is configured to.
    pub client_auth: Option<&'a HeaderValue>,
}

/// A configured upstream registry.
pub struct Upstream {
    pub name: String,
    urls: Vec<Url>,
    preferred: AtomicUsize,
    client: HttpClient,
    auth: Arc<Auth>,
    credentials: Credentials,
    pass_client_auth: bool,
    /// regcache fetches with credentials of its own: cached content may be private.
    private: bool,
    verify_access: bool,
    response_timeout: Duration,
    read_timeout: Duration,
    guard: Guard,
    metrics: Arc<Metrics>,
}

impl Upstream {
    pub fn new(
        name: &str,
        cfg: &UpstreamConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Upstream, UpstreamError> {
        let urls = cfg
            .urls
            .iter()
            .map(|u| Url::parse(u).map_err(|e| UpstreamError::BadRedirect(format!("{u}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &cfg.ca_file {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| UpstreamError::Tls(format!("{}: {e}", path.display())))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| UpstreamError::Tls(format!("{}: {e}", path.display())))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| UpstreamError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        if cfg.insecure {
            tracing::warn!(
                upstream = name,
                "insecure = true: this upstream's TLS certificate is not checked"
            );
            tls.dangerous()
                .set_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)));
        }
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_nodelay(true);
        let connector = Connector::new(http, cfg.proxy.as_deref());
        for url in &urls {
            if let Some(proxy) = connector.proxy_for(url) {
                tracing::info!(upstream = name, %url, %proxy, "upstream reached through a proxy");
            }
        }
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        let server = urls.first().map(server_name).unwrap_or_default();
        let credentials = Credentials::new(&server, cfg);
        metrics.set_breaker(name, BreakerState::Closed);
        Ok(Upstream {
            name: name.to_owned(),
            urls,
            preferred: AtomicUsize::new(0),
            client,
            auth: Auth::new(),
            credentials,
            pass_client_auth: cfg.pass_client_auth,
            private: cfg.has_credentials(),
            verify_access: cfg.verify_access,
            response_timeout: cfg.response_timeout,
            read_timeout: cfg.read_timeout,
            guard: Guard::new(GuardConfig {
                max_concurrent: cfg.max_concurrent,
                failure_threshold: cfg.breaker_failures,
                open_for: cfg.breaker_open_for,
            }),
            metrics,
        })
    }

    /// Whether the client's own `Authorization` goes upstream (and decides what it may see).
    pub fn passes_client_auth(&self) -> bool {
        self.pass_client_auth
    }

    /// Whether regcache pulls here with credentials of its own, so a cached digest is served
    /// for a repository only once that repository is known to hold it.
    pub fn is_private(&self) -> bool {
        self.private
    }

    /// Whether a cached digest is re-checked upstream (`HEAD`) once per `tag_ttl`.
    pub fn verifies_access(&self) -> bool {
        self.verify_access
    }

    /// Longest silence a caller should accept inside a response body.
    pub fn read_timeout(&self) -> Duration {
        self.read_timeout
    }

    /// Counts a failure of this upstream by reason (see `regcache_upstream_errors_total`).
    pub fn count_error(&self, reason: &str) {
        self.metrics
            .upstream_errors
            .with_label_values(&[&self.name, reason])
            .inc();
    }

    /// Counts body bytes fetched from this upstream.
    pub fn count_fetched(&self, bytes: u64) {
        self.metrics
            .fetched_bytes
            .with_label_values(&[&self.name])
            .inc_by(bytes);
    }

    /// The circuit breaker's state.
    pub fn breaker(&self) -> BreakerState {
        self.guard.state()
    }

    /// Sends a registry API request, authenticating and following redirects as needed.
    ///
    /// The request waits for one of the upstream's `max_concurrent` slots and is refused at
    /// once while upstream is rate limiting us or the breaker is open. The slot travels in the
    /// response's extensions: it is freed when the response (its parts) is dropped, so keep
    /// the parts alive while reading the body.
    pub async fn send(
        &self,
        req: UpstreamRequest<'_>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.guarded(self.send_admitted(req)).await
    }

    /// `GET /v2/` with the client's `Authorization` (on a `pass_client_auth` upstream): a 401
    /// carries the challenge a client must answer, admitted and counted as [`send`] is.
    ///
    /// [`send`]: Upstream::send
    pub async fn ping(
        &self,
        client_auth: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        // Never a client's credentials to an upstream that does not take them.
        let client_auth = client_auth.filter(|_| self.pass_client_auth);
        self.guarded(self.send_failover(&Method::GET, "v2/", None, client_auth))
            .await
    }

    /// Runs one exchange in an upstream slot, refused while rate limited or the breaker is
    /// open, and records how it went.
    async fn guarded(
        &self,
        exchange: impl Future<Output = Result<Response<Incoming>, UpstreamError>>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let admission = self.guard.admit().await.map_err(|r| match r {
            Refusal::RateLimited(d) => UpstreamError::RateLimited(d),
            Refusal::CircuitOpen(d) => UpstreamError::CircuitOpen(d),
        })?;
        let result = exchange.await;
        let outcome = match &result {
            Ok(resp) if resp.status() == StatusCode::TOO_MANY_REQUESTS => {
                Outcome::RateLimited(super::guard::retry_after(resp.headers()))
            }
            Ok(resp) if resp.status().is_server_error() => Outcome::Failure,
            Err(e) if e.is_upstream_failure() => Outcome::Failure,
            Err(UpstreamError::Credentials(_)) => Outcome::Neutral,
            _ => Outcome::Success,
        };
        let reason = match &result {
            Ok(resp) if resp.status() == StatusCode::TOO_MANY_REQUESTS => Some("http_429"),
            Ok(resp) if resp.status().is_server_error() => Some("http_5xx"),
            Ok(_) => None,
            Err(e) => e.reason(),
        };
        if let Some(reason) = reason {
            self.count_error(reason);
        }
        if let Ok(resp) = &result {
            self.metrics.observe_ratelimit(&self.name, resp.headers());
        }
        let (permit, change) = admission.record(outcome);
        if let Some(state) = change {
            self.metrics.set_breaker(&self.name, state);
            match state {
                BreakerState::Open => {
                    tracing::warn!(upstream = %self.name, "circuit breaker open: upstream keeps failing; answering from cache or with errors until it recovers")
                }
                BreakerState::Closed => {
                    tracing::info!(upstream = %self.name, "circuit breaker closed: upstream answers again")
                }
                BreakerState::HalfOpen => {}
            }
        }
        if let Outcome::RateLimited(after) = outcome {
            tracing::warn!(upstream = %self.name, retry_after = ?after, "upstream answered 429; pausing requests to it");
        }
        result.map(|mut resp| {
            resp.extensions_mut().insert(Arc::new(permit));
            resp
        })
    }

    async fn send_admitted(
        &self,
        req: UpstreamRequest<'_>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        if self.pass_client_auth {
            return self.send_as(&req, None).await;
        }
        let creds = self.credentials(req.repo).await?;
        let resp = self.send_as(&req, creds.as_ref()).await?;
        if resp.status() == StatusCode::UNAUTHORIZED && self.credentials.refresh(req.repo).await {
            // Credentials from a helper or a file may have rotated: ask for them again, once.
            tracing::info!(upstream = %self.name, repo = %req.repo, "credentials refused; fetching them again");
            self.auth
                .forget_token(&format!("repository:{}:pull", req.repo))
                .await;
            let creds = self.credentials(req.repo).await?;
            return self.send_as(&req, creds.as_ref()).await;
        }
        Ok(resp)
    }

    async fn credentials(&self, repo: &RepoName) -> Result<Option<HeaderValue>, UpstreamError> {
        self.credentials
            .header(repo)
            .await
            .map_err(|e| UpstreamError::Credentials(e.to_string()))
    }

    /// One request with `creds` (Basic, for the token realm or a Basic challenge): a cached
    /// token up front when there is one, else the 401 -> token -> retry dance, once.
    async fn send_as(
        &self,
        req: &UpstreamRequest<'_>,
        creds: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let scope = format!("repository:{}:pull", req.repo);
        let mut authz = if self.pass_client_auth {
            req.client_auth.cloned()
        } else {
            self.authorization(&scope, creds).await?
        };
        let mut path = format!("v2/{}/{}", req.repo, req.path);
        if let Some(q) = req.query {
            path.push('?');
            path.push_str(q);
        }
        let mut retried = false;
        loop {
            let resp = self
                .send_failover(&req.method, &path, req.accept, authz.as_ref())
                .await?;
            // A 401 from where a redirect led (a CDN, a storage bucket) is not this registry's
            // challenge: its realm must not get this upstream's credentials.
            let foreign = resp.extensions().get::<ForeignOrigin>().is_some();
            if resp.status() != StatusCode::UNAUTHORIZED
                || self.pass_client_auth
                || retried
                || foreign
            {
                return Ok(resp);
            }
            retried = true;
            let challenge = resp
                .headers()
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .filter_map(parse_challenge)
                .next();
            let next = match challenge {
                Some(Challenge::Bearer {
                    realm,
                    service,
                    scope: asked,
                }) => {
                    self.auth.remember_bearer(&realm, service.as_deref());
                    self.auth.forget_token(&scope).await;
                    let asked = asked.unwrap_or_else(|| scope.clone());
                    self.fetch_token(&realm, service.as_deref(), &asked, creds)
                        .await?
                }
                Some(Challenge::Basic) => {
                    self.auth.remember_basic();
                    creds.cloned()
                }
                None => None,
            };
            match next {
                Some(h) if Some(&h) != authz.as_ref() => authz = Some(h),
                _ => return Ok(resp),
            }
        }
    }

    /// The credentials to send up front: a cached token, a token fetched from the realm this
    /// upstream challenged with before, or Basic credentials once it asked for them.
    async fn authorization(
        &self,
        scope: &str,
        creds: Option<&HeaderValue>,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        if let Some(t) = self.auth.token(scope).await {
            return Ok(Some(t));
        }
        if let Some((realm, service)) = self.auth.known_bearer() {
            return self
                .fetch_token(&realm, service.as_deref(), scope, creds)
                .await;
        }
        // A password goes only where the upstream asked for one: never up front to a registry
        // whose scheme is not known yet (it may want a token from another service).
        Ok(creds.filter(|_| self.auth.wants_basic()).cloned())
    }

    /// Gets a token from a Bearer realm (anonymously or with Basic credentials) and caches it.
    /// A refusal by the token endpoint is `Ok(None)`: the upstream's 401 then stands.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        creds: Option<&HeaderValue>,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        let token_err = |reason: String| UpstreamError::Token {
            realm: realm.to_owned(),
            reason,
        };
        let mut url = Url::parse(realm).map_err(|e| token_err(e.to_string()))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let count = |result: &str| {
            self.metrics
                .token_fetches
                .with_label_values(&[&self.name, result])
                .inc();
        };
        let resp = self
            .exchange(&Method::GET, &url, None, creds)
            .await
            .inspect_err(|_| count("error"))?;
        match resp.status() {
            s if s.is_success() => count("ok"),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                count("refused");
                return Ok(None);
            }
            s => {
                count("error");
                return Err(token_err(format!("answered {s}")));
            }
        }
        // The exchange's deadline covers the headers only; a token endpoint that stalls in
        // its body would otherwise hold this upstream's slot for good.
        let body = Limited::new(resp.into_body(), MAX_TOKEN_RESPONSE).collect();
        let body = tokio::time::timeout(self.read_timeout, body)
            .await
            .map_err(|_| UpstreamError::Timeout(self.read_timeout))?
            .map_err(|e| token_err(e.to_string()))?
            .to_bytes();
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| token_err(e.to_string()))?;
        let token = parsed
            .into_token(Instant::now())
            .ok_or_else(|| token_err("no token in the answer".into()))?;
        let header = token.header.clone();
        self.auth.store_token(scope.to_owned(), token).await;
        Ok(Some(header))
    }

    /// Tries each URL in turn, starting with the last one that worked. Connection failures and
    /// 5xx answers move on to the next URL; the last URL's answer is returned whatever it is.
    async fn send_failover(
        &self,
        method: &Method,
        path: &str,
        accept: Option<&str>,
        authz: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let n = self.urls.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut last_err = None;
        for i in 0..n {
            let idx = (first + i) % n;
            let url = join(&self.urls[idx], path)?;
            match self.follow(method, url, accept, authz).await {
                Ok(resp) if resp.status().is_server_error() && i + 1 < n => {
                    tracing::warn!(upstream = %self.name, url = %self.urls[idx], status = %resp.status(), "upstream URL failing; trying the next");
                }
                Ok(resp) => {
                    if idx != first {
                        self.preferred.store(idx, Ordering::Relaxed);
                    }
                    return Ok(resp);
                }
                Err(e) => {
                    if n > 1 {
                        tracing::warn!(upstream = %self.name, url = %self.urls[idx], error = %e, "upstream URL failing; trying the next");
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or(UpstreamError::Connect("no URL answered".into())))
    }

    /// One request, following redirects. `Authorization` goes only to the original origin.
    async fn follow(
        &self,
        method: &Method,
        mut url: Url,
        accept: Option<&str>,
        authz: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let origin = url.origin();
        for _ in 0..=MAX_REDIRECTS {
            let same_origin = url.origin() == origin;
            let mut resp = self
                .exchange(method, &url, accept, authz.filter(|_| same_origin))
                .await?;
            if !resp.status().is_redirection() || !resp.headers().contains_key(header::LOCATION) {
                if !same_origin {
                    resp.extensions_mut().insert(ForeignOrigin);
                }
                return Ok(resp);
            }
            let loc = &resp.headers()[header::LOCATION];
            let loc = loc
                .to_str()
                .map_err(|_| UpstreamError::BadRedirect("<binary>".into()))?;
            url = url
                .join(loc)
                .map_err(|_| UpstreamError::BadRedirect(loc.to_owned()))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(UpstreamError::BadRedirect(loc.to_owned()));
            }
        }
        Err(UpstreamError::TooManyRedirects)
    }

    /// A single HTTP exchange with the response-header deadline.
    async fn exchange(
        &self,
        method: &Method,
        url: &Url,
        accept: Option<&str>,
        authz: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(url.as_str())
            .header(header::USER_AGENT, USER_AGENT);
        if let Some(a) = accept {
            req = req.header(header::ACCEPT, a);
        }
        if let Some(a) = authz {
            req = req.header(header::AUTHORIZATION, a.clone());
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| UpstreamError::BadRedirect(e.to_string()))?;
        let started = Instant::now();
        let result =
            match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
                Err(_) => Err(UpstreamError::Timeout(self.response_timeout)),
                Ok(Ok(resp)) => Ok(resp),
                Ok(Err(e)) if e.is_connect() => Err(UpstreamError::Connect(error_chain(&e))),
                Ok(Err(e)) => Err(UpstreamError::Io(error_chain(&e))),
            };
        let status = match &result {
            Ok(resp) => resp.status().as_str().to_owned(),
            Err(_) => "error".to_owned(),
        };
        self.metrics
            .upstream_requests
            .with_label_values(&[&self.name, method.as_str(), &status])
            .inc();
        self.metrics
            .upstream_duration
            .with_label_values(&[&self.name])
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

/// Marks a response that came from another origin than the one asked, after a redirect.
#[derive(Clone, Copy)]
struct ForeignOrigin;

fn join(base: &Url, path: &str) -> Result<Url, UpstreamError> {
    let mut s = base.as_str().trim_end_matches('/').to_owned();
    s.push('/');
    s.push_str(path);
    Url::parse(&s).map_err(|e| UpstreamError::BadRedirect(format!("{s}: {e}")))
}

/// An error with its causes, for logs (hyper's top-level messages say little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
