//! How regcache reaches an upstream: straight, or through an HTTP proxy with `CONNECT`, and
//! whether the upstream's certificate is checked.
//!
//! The proxy is the upstream's `proxy` key when set (`"none"`: always straight), else the
//! environment as curl reads it (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`, in
//! either case). Every destination, plain HTTP too, goes through a `CONNECT` tunnel, so TLS
//! stays end to end and the proxy sees only host and port; credentials in the proxy URL are
//! sent as `Proxy-Authorization: Basic`. Token endpoints on other hosts are proxied by the
//! same rules, per destination.
//!
//! Invariant: a proxy is reached over plain HTTP only. The environment may name an `https://`
//! or `socks5://` proxy (the `proxy` key cannot); regcache would speak plain HTTP to it, with
//! the credentials in clear, so such a proxy is reported at start and never connected to.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The `proxy` value that means "never a proxy, whatever the environment says".
pub const NO_PROXY: &str = "none";

/// A connector that tunnels through a proxy where the rules say so.
#[derive(Clone)]
pub struct Connector {
    direct: HttpConnector,
    proxies: Option<Arc<Matcher>>,
}

impl Connector {
    /// `proxy`: the upstream's `proxy` setting (None: from the environment, whose proxies
    /// that are not plain HTTP are logged here and refused when a connection would use them).
    pub fn new(direct: HttpConnector, proxy: Option<&str>) -> Connector {
        let matcher = match proxy {
            Some(p) if p == NO_PROXY => None,
            Some(p) => Some(Matcher::builder().all(p.to_owned()).build()),
            None => {
                for problem in env_proxy_problems(|name| std::env::var(name).ok()) {
                    tracing::error!(
                        "{problem}; upstreams it would proxy cannot be reached until it is fixed"
                    );
                }
                Some(Matcher::from_env())
            }
        };
        Connector::with_matcher(direct, matcher)
    }

    fn with_matcher(direct: HttpConnector, matcher: Option<Matcher>) -> Connector {
        Connector {
            direct,
            proxies: matcher.map(Arc::new),
        }
    }

    /// The proxy a request to `url` goes through, without credentials (for logs).
    pub fn proxy_for(&self, url: &url::Url) -> Option<String> {
        let dst: Uri = url.as_str().parse().ok()?;
        let i = self.proxies.as_ref()?.intercept(&dst)?;
        Some(shown(i.uri()))
    }
}

/// Why a proxy that is not `http://` is refused.
const NOT_PLAIN_HTTP: &str = "regcache speaks plain HTTP to a proxy (CONNECT, credentials in \
    clear), so it must be an http:// URL";

/// Whether regcache can speak to the proxy at `uri`: plain HTTP, the one kind `Tunnel` knows.
fn is_plain_http(uri: &Uri) -> bool {
    uri.scheme() == Some(&http::uri::Scheme::HTTP)
}

/// A proxy's `scheme://host:port`, without credentials (for logs and errors).
fn shown(uri: &Uri) -> String {
    let (scheme, host) = (
        uri.scheme_str().unwrap_or("http"),
        uri.host().unwrap_or("?"),
    );
    match uri.port_u16() {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    }
}

/// The proxies the environment names (read through `var`, as hyper-util's
/// `Matcher::from_env` reads them) that are not plain HTTP, each as `VARIABLE: problem`. Only
/// a variable that is used counts: `ALL_PROXY` when `HTTPS_PROXY` or `HTTP_PROXY` leaves a
/// scheme to it.
pub fn env_proxy_problems(var: impl Fn(&str) -> Option<String>) -> Vec<String> {
    // hyper-util takes the first of each pair that is set, even when empty.
    let first = |names: [&'static str; 2]| names.into_iter().find_map(|n| Some((n, var(n)?)));
    let all = first(["ALL_PROXY", "all_proxy"]);
    let mut problems = Vec::new();
    for (names, dst) in [
        (["HTTPS_PROXY", "https_proxy"], "https://regcache.invalid/"),
        (["HTTP_PROXY", "http_proxy"], "http://regcache.invalid/"),
    ] {
        // What hyper-util makes of a value (it skips one it cannot use, for `ALL_PROXY`).
        let proxy = |(name, value): (&'static str, String)| {
            let dst: Uri = dst.parse().expect("a valid URI");
            let i = Matcher::builder().all(value).build().intercept(&dst)?;
            Some((name, i))
        };
        let used = first(names)
            .and_then(proxy)
            .or_else(|| all.clone().and_then(proxy));
        if let Some((name, i)) = used
            && !is_plain_http(i.uri())
        {
            let problem = format!("{name}: {}: {NOT_PLAIN_HTTP}", shown(i.uri()));
            if !problems.contains(&problem) {
                problems.push(problem);
            }
        }
    }
    problems
}

impl Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let intercept = self.proxies.as_ref().and_then(|m| m.intercept(&dst));
        let mut direct = self.direct.clone();
        match intercept {
            None => Box::pin(async move { direct.call(dst).await.map_err(Into::into) }),
            Some(i) if !is_plain_http(i.uri()) => {
                let proxy = shown(i.uri());
                Box::pin(async move {
                    Err(format!("proxy {proxy}: {NOT_PLAIN_HTTP}; not connecting to it").into())
                })
            }
            Some(i) => {
                let mut tunnel = Tunnel::new(i.uri().clone(), direct);
                if let Some(auth) = i.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                // Named by host and port only: the proxy URL may carry a password.
                let proxy = format!(
                    "{}:{}",
                    i.uri().host().unwrap_or("?"),
                    i.uri().port_u16().unwrap_or(80)
                );
                Box::pin(async move {
                    // `Tunnel` assumes 443 when the URL has no port; plain HTTP means 80.
                    let target = with_port(&dst)?;
                    std::future::poll_fn(|cx| tunnel.poll_ready(cx)).await?;
                    tunnel
                        .call(target)
                        .await
                        .map_err(|e| format!("through proxy {proxy}: {e}").into())
                })
            }
        }
    }
}

/// `dst` with its port spelled out.
fn with_port(dst: &Uri) -> Result<Uri, BoxError> {
    let host = dst.host().ok_or("no host in the upstream URL")?;
    let port = dst
        .port_u16()
        .unwrap_or(if dst.scheme_str() == Some("http") {
            80
        } else {
            443
        });
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    Ok(Uri::builder()
        .scheme(dst.scheme_str().unwrap_or("https"))
        .authority(format!("{host}:{port}"))
        .path_and_query("/")
        .build()?)
}

/// A certificate verifier for `insecure = true` upstreams: any certificate chain and name is
/// accepted, but the handshake signatures are still checked against the presented key.
#[derive(Debug)]
pub struct AcceptAnyCertificate(pub Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn ports_are_spelled_out_for_the_tunnel() {
        let p = |s: &str| with_port(&s.parse().unwrap()).unwrap().to_string();
        assert_eq!(
            p("http://registry.example/v2/"),
            "http://registry.example:80/"
        );
        assert_eq!(
            p("https://registry.example/v2/"),
            "https://registry.example:443/"
        );
        assert_eq!(p("http://127.0.0.1:5000/v2/x"), "http://127.0.0.1:5000/");
    }

    #[test]
    fn environment_proxies_must_be_plain_http() {
        let problems = |vars: &[(&str, &str)]| {
            env_proxy_problems(|name| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v).to_owned())
            })
        };
        let p = problems(&[("HTTPS_PROXY", "https://user:secret@proxy.corp:443")]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("HTTPS_PROXY: https://proxy.corp:443"),
            "{p:?}"
        );
        assert!(
            !p[0].contains("secret"),
            "no password in the message: {p:?}"
        );
        let p = problems(&[("https_proxy", "socks5://proxy.corp:1080")]);
        assert!(
            p.len() == 1 && p[0].starts_with("https_proxy: socks5://"),
            "{p:?}"
        );
        // ALL_PROXY serves both schemes when nothing more specific is set: named once.
        let p = problems(&[("ALL_PROXY", "socks5h://proxy.corp:1080")]);
        assert!(p.len() == 1 && p[0].starts_with("ALL_PROXY: "), "{p:?}");
        // Plain HTTP proxies, a bare host:port (read as http), and an ALL_PROXY that nothing
        // falls back to are fine.
        assert_eq!(
            problems(&[
                ("HTTPS_PROXY", "http://user:pw@proxy.corp:3128"),
                ("http_proxy", "proxy.corp:3128"),
                ("ALL_PROXY", "socks5://proxy.corp:1080"),
                ("NO_PROXY", "*"),
            ]),
            Vec::<String>::new()
        );
        assert_eq!(problems(&[]), Vec::<String>::new());
    }

    /// A TLS or SOCKS proxy is never sent a plain `CONNECT` with the credentials in clear.
    #[tokio::test]
    async fn a_proxy_that_is_not_plain_http_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        for scheme in ["https", "socks5"] {
            let matcher = Matcher::builder()
                .all(format!("{scheme}://user:secret@127.0.0.1:{port}"))
                .build();
            let mut connector = Connector::with_matcher(http.clone(), Some(matcher));
            let dst: Uri = "https://registry.example/v2/".parse().unwrap();
            let err = tokio::time::timeout(Duration::from_secs(1), connector.call(dst))
                .await
                .expect("refused at once, not connected")
                .expect_err("refused");
            assert!(
                err.to_string()
                    .contains(&format!("{scheme}://127.0.0.1:{port}")),
                "{err}"
            );
            assert!(!err.to_string().contains("secret"), "{err}");
        }
        let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        assert!(accepted.is_err(), "the proxy was connected to");
    }

    #[test]
    fn none_means_straight_and_a_url_means_that_proxy() {
        let none = Connector::new(HttpConnector::new(), Some(NO_PROXY));
        let url = url::Url::parse("https://ghcr.io/v2/").unwrap();
        assert_eq!(none.proxy_for(&url), None);
        let via = Connector::new(
            HttpConnector::new(),
            Some("http://user:secret@proxy.corp:3128"),
        );
        assert_eq!(
            via.proxy_for(&url).as_deref(),
            Some("http://proxy.corp:3128"),
            "no credentials in what is shown"
        );
    }
}
