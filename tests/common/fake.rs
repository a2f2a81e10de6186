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
