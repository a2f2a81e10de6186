//! The accept loop: HTTP/1.1 and h2c on one listener, and graceful shutdown that lets
//! in-flight requests finish within a grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::handler;
use crate::metrics::Metrics;
use crate::proxy::{Proxy, StartError};

/// How long shutdown waits for in-flight requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Deadline for a client to send its request headers (slow-header clients are dropped).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A bound, not yet serving, regcache.
pub struct Server {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    admin_listener: Option<TcpListener>,
    proxy: Arc<Proxy>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Start(#[from] StartError),
}

impl Server {
    /// Opens the cache and binds the listener (port 0 picks a free port).
    pub async fn bind(config: Config) -> Result<Server, ServeError> {
        let addr = config.listen;
        let proxy = Proxy::new(Arc::new(config))?;
        proxy.start_lifecycle();
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        let metrics_listener = match proxy.config().metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServeError::Bind { addr, source })?,
            ),
            None => None,
        };
        let admin_listener = match proxy.config().admin_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServeError::Bind { addr, source })?,
            ),
            None => None,
        };
        Ok(Server {
            listener,
            metrics_listener,
            admin_listener,
            proxy,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    /// The admin listener's address, when `admin_listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener"))
    }

    /// The metrics-only listener's address, when `metrics_listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener"))
    }

    /// Serves until `shutdown` completes, then drains connections for up to [`SHUTDOWN_GRACE`].
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Server {
            listener,
            metrics_listener,
            admin_listener,
            proxy,
        } = self;
        tracing::info!(addr = %listener.local_addr().expect("bound"), data_dir = %proxy.config().data_dir.display(), "regcache listening");
        notify_systemd("READY=1\nSTATUS=serving");
        let (stop_metrics, metrics_stopped) = tokio::sync::watch::channel(false);
        if let Some(l) = metrics_listener {
            tracing::info!(addr = %l.local_addr().expect("bound"), "metrics listening");
            tokio::spawn(serve_side(
                l,
                Arc::clone(&proxy),
                metrics_stopped.clone(),
                false,
            ));
        }
        if let Some(l) = admin_listener {
            tracing::info!(addr = %l.local_addr().expect("bound"), "admin API listening");
            tokio::spawn(serve_side(l, Arc::clone(&proxy), metrics_stopped, true));
        }
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(64 * 1024);
        builder.http2().max_header_list_size(64 * 1024);
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let connected = Connected::new(proxy.metrics());
            let proxy = Arc::clone(&proxy);
            let service = service_fn(move |req| {
                let proxy = Arc::clone(&proxy);
                async move { Ok::<_, std::convert::Infallible>(handler::handle(proxy, req).await) }
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let conn = graceful.watch(conn.into_owned());
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                drop(connected);
            });
        }
        drop(listener);
        notify_systemd("STOPPING=1\nSTATUS=draining in-flight requests");
        let _ = stop_metrics.send(true);
        tracing::info!("shutting down; waiting for in-flight requests");
        let started = tokio::time::Instant::now();
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("grace period over; closing remaining connections");
        }
        if !proxy
            .drain(SHUTDOWN_GRACE.saturating_sub(started.elapsed()))
            .await
        {
            tracing::warn!("grace period over; blob fills still running are abandoned");
        }
        if let Err(e) = proxy.flush() {
            tracing::error!(error = %e, "flushing the index failed");
        }
    }
}

/// Binds and serves `config` until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    Server::bind(config).await?.serve(shutdown).await;
    Ok(())
}

/// Tells systemd about the service's state (`Type=notify` units: `READY=1` once the listeners
/// are bound, `STOPPING=1` when draining starts). A no-op unless systemd set `NOTIFY_SOCKET`.
fn notify_systemd(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_notify(&socket, state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

#[cfg(target_os = "linux")]
fn send_notify(socket: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt as _;
    use std::os::unix::ffi::OsStrExt as _;
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    // `@name` is a socket in the abstract namespace.
    let addr = match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)?,
        None => std::os::unix::net::SocketAddr::from_pathname(socket)?,
    };
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn send_notify(_socket: &std::ffi::OsStr, _state: &str) -> std::io::Result<()> {
    Ok(())
}

/// Counts an open client connection in `regcache_client_connections` while alive.
struct Connected(Arc<Metrics>);

impl Connected {
    fn new(metrics: &Arc<Metrics>) -> Connected {
        metrics.client_connections.inc();
        Connected(Arc::clone(metrics))
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.client_connections.dec();
    }
}

/// A side listener: `/metrics`, `/healthz`, `/readyz`, and with `admin` the admin API; 404 for
/// anything else.
async fn serve_side(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
    admin: bool,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => return,
        };
        let proxy = Arc::clone(&proxy);
        let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let proxy = Arc::clone(&proxy);
            async move {
                let (method, path) = (req.method(), req.uri().path());
                let mut resp = handler::operator_endpoint(&proxy, method, path);
                if resp.is_none() && admin {
                    resp = handler::admin_endpoint(&proxy, method, path, req.uri().query()).await;
                }
                Ok::<_, std::convert::Infallible>(
                    resp.unwrap_or_else(|| crate::error::Error::NotFound.to_response(false)),
                )
            }
        });
        let mut stop = stopped.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            // A scraper's keep-alive connection must not outlive the server (it holds the
            // proxy, and with it the index).
            tokio::select! {
                _ = conn => {}
                _ = stop.changed() => {}
            }
        });
    }
}
