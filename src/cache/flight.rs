//! Single flight: one upstream fetch per key, however many requests want it.
//!
//! [`Group`] shares a small result (a manifest, a revalidation) among everyone who asked while it
//! was in flight. [`Fills`] does the same for blobs, which are streamed: one task writes the
//! upstream body to a temp file while hashing it, and every reader follows that file at its own
//! pace. The work runs in its own task, owned by the flight and not by any request, so a client
//! that goes away cancels nothing and a slow client slows nobody.
//!
//! Invariant: readers are never handed the last byte of a blob before its digest was verified,
//! so a client can never receive a complete-looking wrong blob.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::hash::Hash;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::FutureExt as _;
use http::Response;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::sync::watch;

use super::bucket::Bucket;

use super::blobs::{Committed, Store, blocking};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::oci::digest::{Digest, Verifier};
use crate::sendfile::Loans;
use crate::upstream::Upstream;

/// Deduplicates concurrent work by key; the result is cloned to every waiter.
pub struct Group<K, V> {
    map: Mutex<HashMap<K, watch::Receiver<Option<V>>>>,
}

impl<K, V> Default for Group<K, V> {
    fn default() -> Self {
        Group {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K, V> Group<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `work` unless the same key is in flight, then waits for the result. The second value
    /// is true when this call joined someone else's flight. The work runs detached: dropping
    /// this future does not cancel it.
    pub async fn run<F>(self: &Arc<Self>, key: K, work: impl FnOnce() -> F) -> (V, bool)
    where
        F: Future<Output = V> + Send + 'static,
    {
        let (mut rx, joined) = {
            let mut map = self.map.lock().expect("flight map");
            match map.get(&key) {
                Some(rx) => (rx.clone(), true),
                None => {
                    let (tx, rx) = watch::channel(None);
                    map.insert(key.clone(), rx.clone());
                    let fut = work();
                    let group = Arc::clone(self);
                    tokio::spawn(async move {
                        let v = fut.await;
                        let _ = tx.send(Some(v));
                        group.map.lock().expect("flight map").remove(&key);
                    });
                    (rx, false)
                }
            }
        };
        loop {
            if let Some(v) = rx.borrow_and_update().clone() {
                return (v, joined);
            }
            if rx.changed().await.is_err() {
                // The task panicked before sending; nothing else will come.
                panic!("single-flight task ended without a result");
            }
        }
    }
}

/// Where a blob fill is.
#[derive(Clone, Debug)]
pub enum Progress {
    /// Waiting for upstream's answer.
    Connecting,
    /// Bytes `..readable` may be served: from the fill's in-memory window, or from the temp
    /// file below `on_disk`. `size` is upstream's Content-Length.
    Streaming {
        readable: u64,
        on_disk: u64,
        size: Option<u64>,
    },
    /// Every byte is written and verified.
    Done {
        size: u64,
    },
    Failed(Arc<Error>),
}

/// A blob being fetched from upstream into a temp file.
pub struct Fill {
    file: Arc<File>,
    progress: watch::Receiver<Progress>,
    /// The latest received bytes, so readers that keep up take them from memory.
    window: Arc<Window>,
    /// Whether the bytes come from the shared bucket rather than upstream (known once
    /// started).
    from_bucket: Arc<std::sync::atomic::AtomicBool>,
}

/// How many of the most recently received bytes a fill keeps in memory for its readers: more
/// than the writer may lag behind, so bytes not yet on disk are always in memory.
const WINDOW_BYTES: usize = (PIPELINE_BATCHES + 2) * WRITE_BATCH;

/// The tail of a fill's received bytes: `(offset, chunk)` in order, about [`WINDOW_BYTES`].
#[derive(Default)]
struct Window {
    /// The chunks, and how many bytes they hold.
    chunks: Mutex<(std::collections::VecDeque<(u64, Bytes)>, usize)>,
}

impl Window {
    fn push(&self, offset: u64, chunk: Bytes) {
        let mut guard = self.chunks.lock().expect("window");
        let (c, held) = &mut *guard;
        *held += chunk.len();
        c.push_back((offset, chunk));
        while *held > WINDOW_BYTES && c.len() > 1 {
            if let Some((_, b)) = c.pop_front() {
                *held -= b.len();
            }
        }
    }

    /// Bytes `pos..limit` (or a prefix of them) if they are still in memory.
    fn get(&self, pos: u64, limit: u64) -> Option<Bytes> {
        let guard = self.chunks.lock().expect("window");
        let (off, chunk) = guard
            .0
            .iter()
            .find(|(off, b)| *off <= pos && pos < off + b.len() as u64)?;
        let start = (pos - off) as usize;
        let end = ((limit - off) as usize).min(chunk.len());
        Some(chunk.slice(start..end))
    }
}

impl Fill {
    /// Waits until upstream answered: the blob's size if known, or the fill's error.
    pub async fn started(&self) -> Result<Option<u64>, Arc<Error>> {
        self.until(|p| match p {
            Progress::Connecting => None,
            Progress::Streaming { size, .. } => Some(*size),
            Progress::Done { size } => Some(Some(*size)),
            Progress::Failed(_) => None,
        })
        .await
    }

    /// Waits until every byte is verified: the blob's size, or the fill's error.
    pub async fn verified(&self) -> Result<u64, Arc<Error>> {
        self.until(|p| match p {
            Progress::Done { size } => Some(*size),
            _ => None,
        })
        .await
    }

    /// Waits until `ready` gives an answer, or the fill fails.
    async fn until<T>(&self, ready: impl Fn(&Progress) -> Option<T>) -> Result<T, Arc<Error>> {
        let mut rx = self.progress.clone();
        loop {
            let answer = match &*rx.borrow_and_update() {
                Progress::Failed(e) => Some(Err(Arc::clone(e))),
                progress => ready(progress).map(Ok),
            };
            if let Some(answer) = answer {
                return answer;
            }
            if rx.changed().await.is_err() {
                return Err(Arc::new(Error::Internal("blob fill vanished".into())));
            }
        }
    }

    /// Waits until the fill's task has ended (its progress sender is dropped last, after the
    /// commit, `on_commit` and leaving the flight): on success the blob is then committed and
    /// indexed.
    pub async fn settled(&self) {
        let mut rx = self.progress.clone();
        while rx.changed().await.is_ok() {}
    }

    /// Whether the bytes come from the shared bucket, not upstream (once started).
    pub fn from_bucket(&self) -> bool {
        self.from_bucket.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether every byte is written and verified (the commit may still be under way).
    pub fn is_done(&self) -> bool {
        matches!(*self.progress.borrow(), Progress::Done { .. })
    }

    /// A reader of this fill's bytes `start..end`.
    pub fn reader(&self, start: u64, end: Option<u64>) -> Reader {
        Reader::following(&self.file, self.progress.clone(), &self.window, start, end)
    }
}

/// Bytes read from disk per chunk sent to a client.
pub const READ_CHUNK: u64 = 256 * 1024;
/// Bytes of a committed blob mapped per chunk sent to a client. Each chunk in flight is
/// resident (in RSS) until written: 512 KiB measured 4.67 GiB/s hot with a peak RSS of 48 MiB
/// for 64 concurrent downloads; 1 MiB 4.99 GiB/s but 80 MiB; 256 KiB 3.85 GiB/s and 32 MiB
/// (BENCHMARKS.md).
const MAP_CHUNK: u64 = 512 * 1024;
/// Bytes of a committed blob lent per chunk to a socket that sends them with `sendfile`. Lent
/// chunks are not faulted in, so their size costs no memory; larger ones cost fewer mappings.
const LENT_CHUNK: u64 = 4 * 1024 * 1024;
/// How much upstream data is gathered before one write + hash step.
const WRITE_BATCH: usize = 512 * 1024;

/// How long a fill holds a part batch for more bytes once upstream has gone quiet (see
/// [`WRITE_BATCH`]).
const BATCH_LINGER: std::time::Duration = std::time::Duration::from_millis(50);

/// Follows a blob file (complete, or being filled) from `pos` to `end`.
pub struct Reader {
    file: Arc<File>,
    /// `None` for a committed file, which is complete.
    progress: Option<watch::Receiver<Progress>>,
    /// A fill's in-memory tail, tried before the file.
    window: Option<Arc<Window>>,
    /// A committed blob mapped whole, served from that mapping unless lent.
    mapped: Option<Bytes>,
    pos: u64,
    end: Option<u64>,
    done: bool,
    /// The client's socket sends committed chunks with `sendfile`: lend them to it.
    loans: Option<Arc<Loans>>,
}

impl Reader {
    /// A reader of a fill's bytes `start..end`, as `progress` makes them readable.
    fn following(
        file: &Arc<File>,
        progress: watch::Receiver<Progress>,
        window: &Arc<Window>,
        start: u64,
        end: Option<u64>,
    ) -> Reader {
        Reader {
            file: Arc::clone(file),
            progress: Some(progress),
            window: Some(Arc::clone(window)),
            mapped: None,
            pos: start,
            end,
            done: false,
            loans: None,
        }
    }

    /// A reader of committed content `start..end`.
    pub fn complete(blob: &Committed, start: u64, end: u64) -> Reader {
        Reader {
            file: Arc::clone(&blob.file),
            progress: None,
            window: None,
            mapped: blob.mapped.clone(),
            pos: start,
            end: Some(end),
            done: false,
            loans: None,
        }
    }

    /// Lends the written chunks this reader yields to a socket that sends them with
    /// `sendfile` (see `crate::sendfile`): a committed blob's, and the part of a fill's temp
    /// file the writer has written, which never changes after. A fill's bytes not yet written
    /// still come from its in-memory window.
    /// A committed blob's chunks are lent only where the connection takes them
    /// ([`Loans::lends_committed`]); a fill's just-written ones always.
    pub fn lend_to(mut self, loans: Arc<Loans>) -> Reader {
        if self.progress.is_some() || loans.lends_committed() {
            self.loans = Some(loans);
        }
        self
    }

    /// The next chunk, `None` at the end. An error means the fill failed: the client's body
    /// must be aborted, not ended.
    pub async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        if self.done {
            return None;
        }
        loop {
            // `verified`: the digest is checked (a committed blob's was before it was).
            let (readable, on_disk, total, verified) = match &mut self.progress {
                None => (self.end.unwrap_or(0), self.end.unwrap_or(0), self.end, true),
                Some(rx) => match &*rx.borrow_and_update() {
                    Progress::Connecting => (0, 0, None, false),
                    Progress::Streaming {
                        readable,
                        on_disk,
                        size,
                    } => (*readable, *on_disk, *size, false),
                    Progress::Done { size } => (*size, *size, Some(*size), true),
                    Progress::Failed(e) => {
                        self.done = true;
                        return Some(Err(io::Error::other(e.to_string())));
                    }
                },
            };
            let end = match (self.end, total) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            // Until the digest is checked, this reader's last byte is held back (for a range
            // too, and an empty answer does not end): no response completes with bytes that
            // may turn out wrong.
            if end.is_some_and(|e| self.pos >= e) && verified {
                self.done = true;
                return None;
            }
            let readable = match end {
                Some(e) if !verified => readable.min(e.saturating_sub(1)),
                _ => readable,
            };
            // A lent reader takes written bytes from the file, which costs no copy; the
            // window holds what the writer has not reached yet.
            let from_window = self.loans.is_none() || self.pos >= on_disk;
            if self.pos < readable && from_window {
                let limit = end.map_or(readable, |e| e.min(readable));
                if let Some(chunk) = self.window.as_ref().and_then(|w| w.get(self.pos, limit)) {
                    self.pos += chunk.len() as u64;
                    return Some(Ok(chunk));
                }
            }
            // Behind the window, or lent: from the file, as far as it is written.
            let readable = readable.min(on_disk);
            if self.pos < readable {
                let limit = end.map_or(readable, |e| e.min(readable));
                let (file, pos) = (&self.file, self.pos);
                let chunk = if let Some(loans) = &self.loans {
                    // Written, so never changing: the socket sends it from the page cache.
                    let len = (limit - pos).min(LENT_CHUNK) as usize;
                    super::map_in_memory(file, pos, len)
                        .await
                        .map(|map| loans.lend(file, pos, map))
                } else if self.progress.is_none() {
                    // Committed, immutable content: mapped, not copied; a small blob's is a
                    // part of the one mapping kept open.
                    let len = (limit - pos).min(MAP_CHUNK);
                    match &self.mapped {
                        Some(whole) => {
                            super::in_memory(whole.slice(pos as usize..(pos + len) as usize)).await
                        }
                        None => super::map_in_memory(file, pos, len as usize)
                            .await
                            .map(Bytes::from_owner),
                    }
                } else {
                    let (file, len) = (Arc::clone(file), (limit - pos).min(READ_CHUNK) as usize);
                    blocking(move || read_at(&file, pos, len)).await
                };
                match &chunk {
                    Ok(b) => self.pos += b.len() as u64,
                    Err(_) => self.done = true,
                }
                return Some(chunk);
            }
            let Some(rx) = &mut self.progress else {
                self.done = true;
                return None;
            };
            if rx.changed().await.is_err() {
                self.done = true;
                return Some(Err(io::Error::other("blob fill ended unexpectedly")));
            }
        }
    }
}

/// Reads `len` bytes at `pos` into a fresh buffer. The bytes land in the buffer's
/// uninitialised capacity: no zero-fill pass over every byte a hot blob serves.
fn read_at(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = pos + buf.len() as u64;
        if rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    // The capacity may exceed `len`: keep exactly what was asked for.
    buf.truncate(len);
    Ok(Bytes::from(buf))
}

/// What a fill needs to know about its blob and where to put it.
pub struct FillSpec {
    pub upstream: Arc<Upstream>,
    pub digest: Digest,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    /// The shared tier: a blob fetched from upstream is also written there.
    pub bucket: Option<Arc<Bucket>>,
}

/// A fill's byte source's body.
pub type SourceBody =
    http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Where a fill's bytes come from: upstream's answer, or the shared bucket's copy.
pub struct Source {
    size: Option<u64>,
    body: SourceBody,
    from_bucket: bool,
    /// Held until the last byte: an upstream answer's parts carry its upstream slot (see
    /// `Upstream::send`).
    _hold: Option<http::response::Parts>,
}

impl Source {
    /// Upstream's 200 answer.
    pub fn upstream(resp: Response<Incoming>) -> Source {
        let size = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let (parts, body) = resp.into_parts();
        Source {
            size,
            body: body.map_err(Into::into).boxed_unsync(),
            from_bucket: false,
            _hold: Some(parts),
        }
    }

    /// The shared bucket's copy.
    pub fn bucket(size: Option<u64>, body: SourceBody) -> Source {
        Source {
            size,
            body,
            from_bucket: true,
            _hold: None,
        }
    }
}

type FillKey = (String, Digest);

/// The blob fills in flight, by (upstream, digest).
#[derive(Default)]
pub struct Fills {
    map: Mutex<HashMap<FillKey, Arc<Fill>>>,
}

impl Fills {
    /// How many fills are running.
    pub fn len(&self) -> usize {
        self.map.lock().expect("fill map").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The fill in flight for this blob, if any.
    pub fn get(&self, upstream: &str, digest: &Digest) -> Option<Arc<Fill>> {
        self.map
            .lock()
            .expect("fill map")
            .get(&(upstream.to_owned(), digest.clone()))
            .cloned()
    }

    /// Joins the fill for this blob or starts one fetching from `source`. `on_commit(size)`
    /// runs once the verified blob is durable under its digest. The bool is true when joined.
    pub fn join_or_start<S, C>(
        self: &Arc<Self>,
        spec: FillSpec,
        source: S,
        on_commit: C,
    ) -> io::Result<(Arc<Fill>, bool)>
    where
        S: Future<Output = Result<Source, Error>> + Send + 'static,
        C: FnOnce(u64) + Send + 'static,
    {
        let key = (spec.upstream.name.clone(), spec.digest.clone());
        let mut map = self.map.lock().expect("fill map");
        if let Some(f) = map.get(&key) {
            return Ok((Arc::clone(f), true));
        }
        let temp = spec.store.temp(&spec.digest)?;
        let (tx, rx) = watch::channel(Progress::Connecting);
        let tx = Arc::new(tx);
        let fill = Arc::new(Fill {
            file: Arc::clone(&temp.file),
            progress: rx,
            window: Arc::default(),
            from_bucket: Arc::default(),
        });
        map.insert(key.clone(), Arc::clone(&fill));
        let fills = Arc::clone(self);
        let window = Arc::clone(&fill.window);
        let from_bucket = Arc::clone(&fill.from_bucket);
        tokio::spawn(async move {
            spec.metrics.fills_in_flight.inc();
            let started = std::time::Instant::now();
            let result = run_fill(&spec, temp, source, &tx, &window, &from_bucket).await;
            match result {
                Ok(size) => {
                    spec.metrics
                        .fill_duration
                        .observe(started.elapsed().as_secs_f64());
                    on_commit(size)
                }
                Err(e) => {
                    let corrupt = matches!(e, Error::DigestMismatch { .. });
                    match &spec.bucket {
                        Some(b) if from_bucket.load(std::sync::atomic::Ordering::Relaxed) => {
                            b.failed(&spec.upstream.name, &spec.digest, corrupt)
                        }
                        _ if corrupt => spec.upstream.count_error("digest_mismatch"),
                        _ => {}
                    }
                    tracing::warn!(upstream = %spec.upstream.name, digest = %spec.digest, error = %e, "blob fill failed; nothing cached");
                    // A commit that fails after the digest check (a full disk) costs the cache,
                    // not the readers: the verified bytes stay readable in the open temp file.
                    let failed = Arc::new(e);
                    tx.send_if_modified(|p| {
                        let verified = matches!(p, Progress::Done { .. });
                        if !verified {
                            *p = Progress::Failed(Arc::clone(&failed));
                        }
                        !verified
                    });
                }
            }
            fills.map.lock().expect("fill map").remove(&key);
            // Only now is the blob committed, indexed and no longer joinable.
            spec.metrics.fills_in_flight.dec();
        });
        Ok((fill, false))
    }
}

/// Streams upstream's body into the temp file, hashing each byte once, then verifies and
/// commits. Readers see progress through `tx`; the last byte only after verification.
///
/// Two stages run side by side: this task reads the body (and keeps reading), while a blocking
/// writer hashes and writes what was read, at most [`PIPELINE_BATCHES`] batches behind.
async fn run_fill<S>(
    spec: &FillSpec,
    temp: super::blobs::TempFile,
    source: S,
    tx: &Arc<watch::Sender<Progress>>,
    window: &Arc<Window>,
    from_bucket: &std::sync::atomic::AtomicBool,
) -> Result<u64, Error>
where
    S: Future<Output = Result<Source, Error>>,
{
    let mut source = source.await?;
    let size = source.size;
    let bucket_bytes = source.from_bucket;
    from_bucket.store(bucket_bytes, std::sync::atomic::Ordering::Relaxed);
    let _ = tx.send(Progress::Streaming {
        readable: 0,
        on_disk: 0,
        size,
    });
    if let Some(bucket) = spec.bucket.as_ref().filter(|_| !bucket_bytes) {
        // The shared tier gets the blob too, following the temp file at its own pace.
        let reader = Reader::following(&temp.file, tx.subscribe(), window, 0, None);
        bucket.upload(&spec.upstream.name, &spec.digest, reader);
    }
    let body = &mut source.body;
    let upstream_err = |source: crate::upstream::UpstreamError| {
        if bucket_bytes {
            return Error::Storage(io::Error::other(format!("shared bucket: {source}")));
        }
        if let Some(reason) = source.reason() {
            spec.upstream.count_error(reason);
        }
        Error::Upstream {
            upstream: spec.upstream.name.clone(),
            source,
        }
    };
    let read_timeout = spec.upstream.read_timeout();

    let (batches, writer) = start_writer(
        Arc::clone(&temp.file),
        spec.digest.algorithm(),
        Arc::clone(tx),
    );
    let mut received: u64 = 0;
    // Received bytes not yet handed to the writer: it gets whole batches (fewer hand-offs
    // when upstream trickles in small frames), readers get every frame at once.
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batch_len = 0usize;
    let mut ended = false;
    // When upstream's last frame came: the read timeout counts from there.
    let mut last_frame = tokio::time::Instant::now();
    while !ended {
        // This wake-up's data frames, and their bytes.
        let (mut frames, mut got) = (Vec::new(), 0usize);
        let mut take = |frame: hyper::body::Frame<Bytes>, got: &mut usize| {
            if let Ok(data) = frame.into_data() {
                *got += data.len();
                frames.push(data);
            }
        };
        let deadline = last_frame + read_timeout;
        // A part batch waits for more bytes only while upstream keeps sending: once it goes
        // quiet for the linger, the batch goes to the writer as it is, so a pause upstream
        // leaves no received byte only in memory.
        let wait = match batch_len {
            0 => deadline,
            _ => deadline.min(tokio::time::Instant::now() + BATCH_LINGER),
        };
        let next = match tokio::time::timeout_at(wait, body.frame()).await {
            Ok(next) => {
                last_frame = tokio::time::Instant::now();
                Some(next)
            }
            Err(_) if batch_len > 0 => None,
            Err(_) => {
                return Err(upstream_err(crate::upstream::UpstreamError::Timeout(
                    read_timeout,
                )));
            }
        };
        let quiet = next.is_none();
        match next {
            None => {}
            Some(None) => ended = true,
            Some(Some(Err(e))) => {
                return Err(upstream_err(crate::upstream::UpstreamError::Io(
                    e.to_string(),
                )));
            }
            Some(Some(Ok(frame))) => take(frame, &mut got),
        }
        // Take whatever else is already buffered, so one wake-up of the readers covers it.
        while !ended && batch_len + got < WRITE_BATCH {
            match body.frame().now_or_never() {
                Some(Some(Ok(frame))) => take(frame, &mut got),
                Some(Some(Err(e))) => {
                    return Err(upstream_err(crate::upstream::UpstreamError::Io(
                        e.to_string(),
                    )));
                }
                Some(None) => ended = true,
                None => break,
            }
        }
        if got > 0 {
            received += got as u64;
            if size.is_some_and(|s| received > s) {
                return Err(upstream_err(crate::upstream::UpstreamError::Io(
                    "body longer than its Content-Length".into(),
                )));
            }
            if !bucket_bytes {
                spec.upstream.count_fetched(got as u64);
            }
            // Readers take the new bytes from memory at once, while the writer hashes and
            // writes them on the other core. The final byte waits for the digest check (size
            // unknown, no byte need wait: such a body ends for a client only once the fill is
            // done).
            let mut offset = received - got as u64;
            for chunk in frames {
                window.push(offset, chunk.clone());
                offset += chunk.len() as u64;
                batch_len += chunk.len();
                batch.push(chunk);
            }
            let readable = size.map_or(received, |s| received.min(s.saturating_sub(1)));
            publish(tx, |p| {
                if let Progress::Streaming { readable: r, .. } = p {
                    *r = readable;
                }
            });
        }
        if (batch_len >= WRITE_BATCH || ended || quiet) && batch_len > 0 {
            batch_len = 0;
            if batches.send(std::mem::take(&mut batch)).await.is_err() {
                // The writer stopped: its error is the one to report.
                break;
            }
        }
    }
    drop(batches);
    let (verifier, written) = writer
        .await
        .map_err(|e| Error::Storage(io::Error::other(e)))??;
    if size.is_some_and(|s| s != written) {
        return Err(upstream_err(crate::upstream::UpstreamError::Io(format!(
            "body ended after {written} of {} bytes",
            size.unwrap_or(0)
        ))));
    }
    let actual = verifier.finish();
    if actual != spec.digest {
        return Err(Error::DigestMismatch {
            upstream: if bucket_bytes {
                format!("{} (the shared bucket's copy)", spec.upstream.name)
            } else {
                spec.upstream.name.clone()
            },
            expected: spec.digest.to_string(),
            actual: actual.to_string(),
        });
    }
    let _ = tx.send(Progress::Done { size: written });
    let store = spec.store.clone();
    let digest = spec.digest.clone();
    blocking(move || store.commit(temp, &digest)).await?;
    Ok(written)
}

/// Batches the network side may run ahead of the writer (memory per fill: this many times
/// [`WRITE_BATCH`]).
const PIPELINE_BATCHES: usize = 4;

type Writer = tokio::task::JoinHandle<io::Result<(Verifier, u64)>>;

/// Updates a fill's progress, never over a failure already reported.
fn publish(tx: &watch::Sender<Progress>, change: impl FnOnce(&mut Progress)) {
    tx.send_if_modified(|p| {
        if matches!(p, Progress::Failed(_)) {
            return false;
        }
        change(p);
        true
    });
}

/// The blocking stage of a fill: hashes and writes each batch, then publishes how much of the
/// file is written.
fn start_writer(
    file: Arc<File>,
    algorithm: crate::oci::digest::Algorithm,
    tx: Arc<watch::Sender<Progress>>,
) -> (tokio::sync::mpsc::Sender<Vec<Bytes>>, Writer) {
    let (batches, mut rx) = tokio::sync::mpsc::channel::<Vec<Bytes>>(PIPELINE_BATCHES);
    let writer = tokio::task::spawn_blocking(move || {
        let mut verifier = Verifier::new(algorithm);
        let mut written: u64 = 0;
        while let Some(batch) = rx.blocking_recv() {
            for chunk in &batch {
                verifier.update(chunk);
                file.write_all_at(chunk, written)?;
                written += chunk.len() as u64;
            }
            publish(&tx, |p| {
                if let Progress::Streaming { on_disk, .. } = p {
                    *on_disk = written;
                }
            });
        }
        Ok((verifier, written))
    });
    (batches, writer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn group_runs_once_for_concurrent_callers() {
        let group: Arc<Group<&'static str, u32>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..10 {
            let (g, runs) = (Arc::clone(&group), Arc::clone(&runs));
            handles.push(tokio::spawn(async move {
                g.run("k", || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    7
                })
                .await
            }));
        }
        let mut joined = 0;
        for h in handles {
            let (v, j) = h.await.unwrap();
            assert_eq!(v, 7);
            joined += j as usize;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(joined, 9);
        // after completion a new call runs again
        let (v, j) = group.run("k", || async { 8 }).await;
        assert_eq!((v, j), (8, false));
    }

    /// Committed content reads back byte-exact over any range, in chunks of at most
    /// [`MAP_CHUNK`]: a small blob from its one whole mapping (also after the page cache
    /// dropped it), a large one mapped chunk by chunk.
    #[tokio::test]
    async fn committed_blobs_read_back_exact_mapped_whole_or_by_chunk() {
        // On disk (not tmpfs, whose pages cannot be dropped): under the crate's `target/`.
        let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        std::fs::create_dir_all(&target).unwrap();
        let dir = tempfile::tempdir_in(&target).unwrap();
        let store = Store::open(dir.path()).unwrap();
        let small: Bytes = (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let large: Bytes = (0..9_000_000u32).map(|i| (i * 17 % 253) as u8).collect();
        for (data, whole) in [(&small, true), (&large, false)] {
            let d = Digest::sha256_of(data);
            store.write_small(&d, data.clone()).await.unwrap();
            let blob = store.open_blob(&d).await.unwrap().unwrap();
            assert_eq!(
                blob.mapped.is_some(),
                whole,
                "{} bytes mapped whole",
                data.len()
            );
            rustix::fs::fadvise(&*blob.file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
            let n = data.len() as u64;
            for (start, end) in [
                (0, n),
                (1, 4097),
                (MAP_CHUNK - 3, 2 * MAP_CHUNK + 5),
                (n - 1, n),
            ] {
                let mut reader = Reader::complete(&blob, start, end);
                let mut got = Vec::new();
                while let Some(chunk) = reader.next_chunk().await {
                    let chunk = chunk.unwrap();
                    assert!(chunk.len() as u64 <= MAP_CHUNK, "chunks are bounded");
                    got.extend_from_slice(&chunk);
                }
                assert!(
                    got == data[start as usize..end as usize],
                    "{} bytes, {start}..{end}",
                    data.len()
                );
            }
        }
    }

    /// A fill of `data` from a source that hands it over in 64 KiB frames.
    fn start_fill(fills: &Arc<Fills>, store: &Store, data: &Bytes) -> Arc<Fill> {
        let cfg: crate::config::UpstreamConfig =
            toml::from_str(r#"urls = "http://127.0.0.1:9""#).unwrap();
        let metrics = Arc::new(Metrics::new());
        let upstream = Arc::new(Upstream::new("test", &cfg, Arc::clone(&metrics)).unwrap());
        let spec = FillSpec {
            upstream,
            digest: Digest::sha256_of(data),
            store: store.clone(),
            metrics,
            bucket: None,
        };
        let frames: Vec<Result<_, Box<dyn std::error::Error + Send + Sync>>> = data
            .chunks(64 * 1024)
            .map(|c| Ok(hyper::body::Frame::data(data.slice_ref(c))))
            .collect();
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let source = Source::bucket(Some(data.len() as u64), body.boxed_unsync());
        let (fill, joined) = fills
            .join_or_start(spec, async move { Ok(source) }, |_| {})
            .unwrap();
        assert!(!joined);
        fill
    }

    async fn read_all(mut reader: Reader) -> io::Result<Vec<u8>> {
        let mut got = Vec::new();
        while let Some(chunk) = reader.next_chunk().await {
            got.extend_from_slice(&chunk?);
        }
        Ok(got)
    }

    /// A commit that fails after the digest check (here the blob's directory cannot be made)
    /// costs the cache, not the readers: they get every verified byte and a clean end, and
    /// nothing is stored.
    #[tokio::test]
    async fn a_commit_failing_after_verification_still_serves_its_readers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data: Bytes = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let digest = Digest::sha256_of(&data);
        // A file where the blob's directory must go.
        let shard = store.path(&digest).parent().unwrap().to_owned();
        std::fs::create_dir_all(shard.parent().unwrap()).unwrap();
        std::fs::write(&shard, b"in the way").unwrap();

        let fills: Arc<Fills> = Arc::default();
        let fill = start_fill(&fills, &store, &data);
        let reader = fill.reader(0, None);
        fill.settled().await;
        assert!(
            fill.is_done(),
            "the failed commit did not override the verification"
        );
        assert!(
            read_all(reader).await.unwrap() == data,
            "every byte, cleanly ended"
        );
        assert!(!store.contains(&digest).await, "nothing committed");
        assert!(fills.is_empty(), "the fill left the flight");
    }
}
