//! How regcache reaches an upstream: straight, or through an HTTP proxy with `CONNECT`, and
//! whether the upstream's certificate is checked.
//!
//! The proxy is the upstream's `proxy` key when set (`"none"`: always straight), else the
//! environment as curl reads it (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`, in
//! either case). Every destination, plain HTTP too, goes through a `CONNECT` tunnel, so TLS
//! stays end to end and the proxy sees only host and port; credentials in the proxy URL are
//! sent as `Proxy-Authorization: Basic`. Token endpoints on other hosts are proxied by the
//! same rules, per destination.

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
    /// `proxy`: the upstream's `proxy` setting (None: from the environment).
    pub fn new(direct: HttpConnector, proxy: Option<&str>) -> Connector {
        let matcher = match proxy {
            Some(p) if p == NO_PROXY => None,
            Some(p) => Some(Matcher::builder().all(p.to_owned()).build()),
            None => Some(Matcher::from_env()),
        };
        Connector {
            direct,
            proxies: matcher.map(Arc::new),
        }
    }

    /// The proxy a request to `url` goes through, without credentials (for logs).
    pub fn proxy_for(&self, url: &url::Url) -> Option<String> {
        let dst: Uri = url.as_str().parse().ok()?;
        let i = self.proxies.as_ref()?.intercept(&dst)?;
        let uri = i.uri();
        Some(format!(
            "{}://{}:{}",
            uri.scheme_str().unwrap_or("http"),
            uri.host()?,
            uri.port_u16().unwrap_or(80)
        ))
    }
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
