//! The accept loop: HTTP/1.1 and HTTP/2 on one listener (over TLS when `[tls]` is set, else
//! h2c), the `[limits]` every connection lives within, and graceful shutdown that lets
//! in-flight requests finish within a grace period.
//!
//! Limits: at most `max_connections` connections are served at once (the accept loop waits for
//! a free slot, so further clients wait in the listen backlog); the TLS handshake and each
//! request's headers must arrive within `header_read_timeout`; a connection with no request in
//! progress for `idle_timeout`, or whose client has taken none of the bytes ready for it for
//! that long, is closed. No lock or fill is owned by a connection: a client that stops reading
//! stalls only its own response, and not for good.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::body::Body;
use crate::config::{Config, LimitsConfig, Sendfile};
use crate::handler;
use crate::metrics::Metrics;
use crate::proxy::{Proxy, StartError};
use crate::sendfile::{Loans, Socket};
use crate::tls::{Tls, TlsError};

/// How long shutdown waits for in-flight requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A bound, not yet serving, regcache.
pub struct Server {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    admin_listener: Option<TcpListener>,
    proxy: Arc<Proxy>,
    tls: Option<Tls>,
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
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

impl Server {
    /// Opens the cache and binds the listener (port 0 picks a free port).
    pub async fn bind(config: Config) -> Result<Server, ServeError> {
        let addr = config.listen;
        let tls = match config.tls.files() {
            Some((cert, key)) => Some(Tls::new(cert, key)?),
            None => None,
        };
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
            tls,
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
            tls,
        } = self;
        tracing::info!(addr = %listener.local_addr().expect("bound"), tls = tls.is_some(), data_dir = %proxy.config().data_dir.display(), "regcache listening");
        notify_systemd("READY=1\nSTATUS=serving");
        if let Some(bucket) = proxy.bucket().cloned() {
            tokio::spawn(async move {
                match bucket.check().await {
                    Ok(()) => tracing::info!(bucket = %bucket.name(), "shared bucket reachable"),
                    Err(e) => {
                        tracing::warn!(bucket = %bucket.name(), error = %e, "shared bucket not reachable; blobs come from upstream until it is")
                    }
                }
            });
        }
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
            tokio::spawn(serve_side(
                l,
                Arc::clone(&proxy),
                metrics_stopped.clone(),
                true,
            ));
        }
        let limits = proxy.config().limits.clone();
        let sendfile = proxy.config().storage.sendfile;
        let acceptor = tls.map(|t| {
            let every = proxy.config().tls.reload_interval;
            tokio::spawn(Arc::clone(&t.certificate).watch(every, metrics_stopped.clone()));
            t.acceptor
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes as usize);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(limits.max_header_bytes as u32);
        let graceful = GracefulShutdown::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
        tokio::pin!(shutdown);
        loop {
            // A free slot first: past `max_connections`, new clients wait in the backlog.
            let slot = tokio::select! {
                slot = Arc::clone(&slots).acquire_owned() => slot.expect("never closed"),
                () = &mut shutdown => break,
            };
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
            let conn = Connection {
                proxy: Arc::clone(&proxy),
                builder: builder.clone(),
                watcher: graceful.watcher(),
                limits: limits.clone(),
                peer,
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    // Plain TCP: blob bytes on disk can go out by sendfile.
                    None if sendfile != Sendfile::Never => {
                        let loans = Loans::new(
                            conn.proxy.metrics().sendfile_bytes.clone(),
                            sendfile.for_peer(peer.ip()),
                        );
                        let socket = Socket::new(stream, Arc::clone(&loans));
                        conn.serve(socket, Some(loans)).await
                    }
                    None => conn.serve(stream, None).await,
                    Some(acceptor) => {
                        let handshake = tokio::time::timeout(
                            limits.header_read_timeout,
                            acceptor.accept(stream),
                        );
                        match handshake.await {
                            Ok(Ok(tls)) => conn.serve(tls, None).await,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    }
                }
                drop(connected);
                drop(slot);
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
            tracing::warn!(
                "grace period over; blob fills and bucket uploads still running are abandoned"
            );
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

/// One accepted client connection, before its protocol is known.
struct Connection {
    proxy: Arc<Proxy>,
    builder: auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    limits: LimitsConfig,
    peer: SocketAddr,
}

impl Connection {
    /// Serves HTTP/1.1 or HTTP/2 on `io` until the client leaves, the connection has been idle
    /// or stalled for `idle_timeout` (see [`Activity`]), or graceful shutdown finishes it.
    /// `loans` is the socket's, when it sends lent ranges with `sendfile`.
    async fn serve<I>(self, io: I, loans: Option<Arc<Loans>>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            proxy,
            builder,
            watcher,
            limits,
            peer,
        } = self;
        let activity = Arc::new(Activity::new());
        let active = Arc::clone(&activity);
        let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            let proxy = Arc::clone(&proxy);
            let busy = Busy::start(&active);
            // HTTP/1 only, where a body goes to the socket as hyper got it. HTTP/2 cuts it
            // into flow-controlled frames (16 KiB by default), so there is little to gain and
            // nothing measured; its clients get the mapped copy path.
            if let Some(loans) = &loans
                && req.version() < http::Version::HTTP_2
            {
                req.extensions_mut().insert(Arc::clone(loans));
            }
            async move {
                let answering = Waiting::start(&busy.0);
                let resp = handler::handle(proxy, req).await;
                drop(answering);
                Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked {
                    body,
                    waiting: None,
                    busy,
                }))
            }
        });
        let io = Watched {
            io,
            activity: Arc::clone(&activity),
        };
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        let conn = watcher.watch(conn.into_owned());
        tokio::select! {
            ended = conn => if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            },
            why = activity.idle_for(limits.idle_timeout) => {
                tracing::debug!(%peer, "{why} connection closed");
            }
        }
    }
}

/// What a connection is doing, to close it when it does nothing: no request in progress, or
/// requests in progress that wait only on the client (it takes none of the bytes ready for it),
/// for `idle_timeout`. A request waiting on regcache (its handler running, or its body waiting
/// for bytes, say for an upstream slot) is never a reason to close.
struct Activity {
    /// Requests in progress: from their headers until their response body is done or dropped.
    active: AtomicUsize,
    /// Of those, the ones waiting on regcache rather than on the client.
    waiting: AtomicUsize,
    idle_since: Mutex<Instant>,
    /// Counts moves: bytes on the socket, a body's next bytes, an answer. A count, not a
    /// time, as it moves on every write: the check compares it over a whole `idle_timeout`.
    moves: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            active: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            moves: AtomicU64::new(0),
        }
    }

    fn moved(&self) {
        self.moves.fetch_add(1, Ordering::Relaxed);
    }

    /// Completes once the connection has been idle for `limit`, or stalled on its client for
    /// a whole `limit` (found within two).
    async fn idle_for(&self, limit: Duration) -> &'static str {
        loop {
            if self.active.load(Ordering::SeqCst) == 0 {
                let since = *self.idle_since.lock().expect("idle lock");
                if since.elapsed() >= limit {
                    return "idle";
                }
                tokio::time::sleep_until(since + limit).await;
                continue;
            }
            // A wait on regcache that ended moved something, so an unchanged count with no
            // wait now means the client took nothing all along.
            let before = self.moves.load(Ordering::Relaxed);
            tokio::time::sleep(limit).await;
            if self.active.load(Ordering::SeqCst) > 0
                && self.waiting.load(Ordering::SeqCst) == 0
                && self.moves.load(Ordering::Relaxed) == before
            {
                return "stalled";
            }
        }
    }
}

/// One request in progress: from its headers until its response body is done or dropped.
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: &Arc<Activity>) -> Busy {
        activity.active.fetch_add(1, Ordering::SeqCst);
        Busy(Arc::clone(activity))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.idle_since.lock().expect("idle lock") = Instant::now();
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request waiting on regcache, while alive; something moved when it ends.
struct Waiting(Arc<Activity>);

impl Waiting {
    fn start(activity: &Arc<Activity>) -> Waiting {
        activity.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(Arc::clone(activity))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.moved();
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted as in progress until it is dropped, and as
/// waiting on regcache while it has no bytes ready.
struct Tracked {
    body: Body,
    waiting: Option<Waiting>,
    busy: Busy,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match (&polled, &this.waiting) {
            (Poll::Pending, None) => this.waiting = Some(Waiting::start(&this.busy.0)),
            (Poll::Ready(_), Some(_)) => this.waiting = None,
            (Poll::Ready(_), None) => this.busy.0.moved(),
            (Poll::Pending, Some(_)) => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A connection's socket, noting when bytes move on it (see [`Activity`]).
struct Watched<I> {
    io: I,
    activity: Arc<Activity>,
}

impl<I> Watched<I> {
    fn note<T>(
        &self,
        polled: Poll<std::io::Result<T>>,
        moved: impl Fn(&T) -> bool,
    ) -> Poll<std::io::Result<T>> {
        if let Poll::Ready(Ok(v)) = &polled
            && moved(v)
        {
            self.activity.moved();
        }
        polled
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let read = buf.filled().len() > before;
        this.note(polled, |_| read)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.note(polled, |n| *n > 0)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.note(polled, |n| *n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
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
    let header_read_timeout = proxy.config().limits.header_read_timeout;
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
                // A browser marks every cross-origin request it sends with `Origin` (and a
                // rebound host name's too): a web page may not drive the admin API, which the
                // `regcache` CLI and curl, sending none, do.
                if resp.is_none() && admin && req.headers().contains_key(http::header::ORIGIN) {
                    let denied = crate::error::Error::Denied {
                        reason: "admin_from_browser",
                        message: "the admin API takes no requests from web pages".into(),
                    };
                    resp = Some(denied.to_response(false));
                } else if resp.is_none() && admin {
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
                .header_read_timeout(header_read_timeout)
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
