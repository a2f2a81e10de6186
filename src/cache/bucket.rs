//! The shared tier: verified blobs in an S3-compatible bucket that every replica reads before
//! asking upstream (`storage.kind = "s3"`).
//!
//! Layout: `{prefix}blobs/{upstream}/{algorithm}/{hex}`. Content-addressed, so two replicas
//! writing the same blob write the same bytes and either write may win. The key names the
//! upstream for the same reason the local index does: a blob is served for an upstream only
//! if that upstream gave it (a digest known from one registry proves nothing about another).
//!
//! Invariant: an object under its final key holds exactly its digest's bytes. An upload
//! starts with its fill and follows the fill's temp file, but a fill's readers get the last
//! byte only after the digest checked out, and the object becomes visible only when the
//! upload completes (one PUT for a blob under `part_size`, else a multipart upload completed
//! after the last part). A failed fill aborts its upload. Bytes read back from the bucket go
//! through the same digest check as upstream's: a damaged object is never served; it is
//! deleted, and the next request goes upstream.
//!
//! The bucket only ever saves upstream traffic: when it fails or is slow, regcache logs,
//! counts (`regcache_bucket_requests_total`) and asks upstream.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt as _, TryStreamExt as _};
use object_store::ObjectStore;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::buffered::BufWriter;
use object_store::path::Path;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::Semaphore;

use super::flight::{Reader, Source, SourceBody};
use crate::config::S3Config;
use crate::metrics::Metrics;
use crate::oci::digest::Digest;

/// Requests in flight per multipart upload (memory per upload: `part_size` times this plus
/// one).
const PARTS_IN_FLIGHT: usize = 2;
/// How long a blob whose bucket copy failed is fetched from upstream instead.
const AVOID_FOR: Duration = Duration::from_secs(300);
/// Uploads that may wait for a slot, per slot (`max_uploads`); see [`Bucket::upload`].
const WAITING_PER_SLOT: usize = 4;

/// A bucket holding blobs for every replica.
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// Where the bucket is, for logs (never with credentials).
    name: String,
    timeout: Duration,
    part_size: usize,
    uploads: Arc<Semaphore>,
    /// The most uploads running or waiting at once; more are skipped.
    max_uploads_in_flight: usize,
    metrics: Arc<Metrics>,
    /// Blobs whose bucket copy just failed to read: fetched from upstream for a while.
    avoid: moka::sync::Cache<(String, Digest), ()>,
    /// Uploads started or waiting for a slot (shutdown waits for them).
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// Deletes of damaged objects under way, by key, each closed when done. An upload of the
    /// same key waits for it, so a late delete cannot remove the good copy that replaced the
    /// damaged one.
    deleting: std::sync::Mutex<std::collections::HashMap<Path, Arc<Semaphore>>>,
}

impl Bucket {
    /// The bucket `c` names; unset settings come from the `AWS_*` variables.
    pub fn new(c: &S3Config, metrics: Arc<Metrics>) -> Result<Bucket, String> {
        let (store, endpoint) = s3(c)?;
        let bucket = c.bucket.as_deref().unwrap_or_default();
        Ok(Bucket {
            store: Arc::new(store),
            prefix: Path::from(c.prefix.trim_matches('/')),
            name: format!(
                "{}/{bucket}",
                endpoint.as_deref().unwrap_or("s3").trim_end_matches('/')
            ),
            timeout: c.timeout,
            part_size: c.part_size as usize,
            uploads: Arc::new(Semaphore::new(c.max_uploads)),
            max_uploads_in_flight: c.max_uploads * (1 + WAITING_PER_SLOT),
            metrics,
            avoid: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(AVOID_FOR)
                .build(),
            in_flight: Arc::default(),
            deleting: std::sync::Mutex::default(),
        })
    }

    /// Where this bucket is (`endpoint/bucket`), for logs and `check-config`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The object key of a blob fetched from `upstream`.
    pub fn key(&self, upstream: &str, digest: &Digest) -> Path {
        self.prefix
            .child("blobs")
            .child(upstream)
            .child(digest.algorithm().as_str())
            .child(digest.hex())
    }

    fn count(&self, op: &str, result: &str) {
        self.metrics
            .bucket_requests
            .with_label_values(&[op, result])
            .inc();
    }

    /// Counts a request's outcome, logging failures; `Ok(None)` for a missing object.
    fn outcome<T>(&self, op: &str, key: &Path, r: Result<T, Failure>) -> Result<Option<T>, String> {
        let err = match r {
            Ok(v) => {
                self.count(op, "ok");
                return Ok(Some(v));
            }
            Err(Failure::Store(object_store::Error::NotFound { .. })) => {
                self.count(op, "not_found");
                return Ok(None);
            }
            Err(Failure::Store(e)) => {
                self.count(op, "error");
                e.to_string()
            }
            Err(Failure::Timeout) => {
                self.count(op, "timeout");
                format!("no answer within {:?}", self.timeout)
            }
        };
        tracing::warn!(bucket = %self.name, %key, op, error = %err, "bucket request failed; going on without it");
        Err(err)
    }

    /// A bucket request bounded by `timeout`.
    async fn bounded<T>(
        &self,
        request: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(r) => r.map_err(Failure::Store),
            Err(_) => Err(Failure::Timeout),
        }
    }

    /// Whether the bucket answers at all (a listing of at most one key), for start-up logs.
    pub async fn check(&self) -> Result<(), String> {
        let mut list = self.store.list(Some(&self.prefix));
        match tokio::time::timeout(self.timeout, list.next()).await {
            Ok(None | Some(Ok(_))) => Ok(()),
            Ok(Some(Err(e))) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }

    /// The blob's key, unless its copy failed lately (then the bucket is not asked).
    fn usable_key(&self, upstream: &str, digest: &Digest) -> Option<Path> {
        let avoided = self
            .avoid
            .contains_key(&(upstream.to_owned(), digest.clone()));
        (!avoided).then(|| self.key(upstream, digest))
    }

    /// The size of the blob's object, if the bucket has it (and answers in time).
    pub async fn head(&self, upstream: &str, digest: &Digest) -> Option<u64> {
        let key = self.usable_key(upstream, digest)?;
        let r = self.bounded(self.store.head(&key)).await;
        self.outcome("head", &key, r).ok().flatten().map(|m| m.size)
    }

    /// The blob's bytes from the bucket, if it has them: a fill source.
    pub async fn open(self: &Arc<Self>, upstream: &str, digest: &Digest) -> Option<Source> {
        let key = self.usable_key(upstream, digest)?;
        let r = self.bounded(self.store.get(&key)).await;
        let got = self.outcome("get", &key, r).ok().flatten()?;
        let size = got.meta.size;
        let this = Arc::clone(self);
        let chunks = got
            .into_stream()
            .inspect_ok(move |b| {
                this.metrics
                    .bucket_bytes
                    .with_label_values(&["read"])
                    .inc_by(b.len() as u64)
            })
            .map_ok(http_body::Frame::data)
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
        let body: SourceBody =
            http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(chunks));
        Some(Source::bucket(Some(size), body))
    }

    /// A fill from the bucket failed: the copy is skipped for a while, and deleted when its
    /// bytes were wrong.
    pub fn failed(self: &Arc<Self>, upstream: &str, digest: &Digest, corrupt: bool) {
        self.avoid.insert((upstream.to_owned(), digest.clone()), ());
        if !corrupt {
            return;
        }
        let (this, key) = (Arc::clone(self), self.key(upstream, digest));
        tracing::error!(bucket = %self.name, %key, "bucket object does not match its digest; deleting it");
        let done = Arc::new(Semaphore::new(0));
        let deleting = Arc::clone(&done);
        self.deleting
            .lock()
            .expect("deleting")
            .insert(key.clone(), deleting);
        tokio::spawn(async move {
            let r = this.bounded(this.store.delete(&key)).await;
            let _ = this.outcome("delete", &key, r);
            let mut deleting = this.deleting.lock().expect("deleting");
            if deleting.get(&key).is_some_and(|d| Arc::ptr_eq(d, &done)) {
                deleting.remove(&key);
            }
            done.close();
        });
    }

    /// Writes a blob being fetched from `upstream` to the bucket, following the fill through
    /// `reader` (which ends only after the digest checked out, and fails with the fill).
    /// Runs in its own task; at most `max_uploads` at once.
    ///
    /// The queue is bounded: at most [`WAITING_PER_SLOT`] uploads per slot wait, and the
    /// upload of a blob filled while that many wait is skipped (counted as `put` `skipped`),
    /// dropping `reader` at once. A waiting upload holds its reader, and with it the fill's
    /// file (an open descriptor, which keeps the blob's disk space allocated even once it is
    /// evicted) and the fill's in-memory window (a few MiB). A black-holed bucket makes each
    /// upload take its full `timeout`, so an unbounded queue held both for every blob of a
    /// cold pull, for many minutes. A skipped blob costs at most another replica's fetch from
    /// upstream: the bucket only ever saves upstream traffic.
    pub fn upload(self: &Arc<Self>, upstream: &str, digest: &Digest, reader: Reader) {
        let (this, key) = (Arc::clone(self), self.key(upstream, digest));
        let Some(counted) = InFlight::try_new(&self.in_flight, self.max_uploads_in_flight) else {
            tracing::debug!(bucket = %self.name, %key, "bucket uploads backed up; this blob is not uploaded");
            self.count("put", "skipped");
            return;
        };
        tokio::spawn(async move {
            let _counted = counted;
            let deleting = this.deleting.lock().expect("deleting").get(&key).cloned();
            if let Some(deleting) = deleting {
                // Closed when the delete is done: the wait ends with an error then.
                let _ = deleting.acquire().await;
            }
            let Ok(_permit) = Arc::clone(&this.uploads).acquire_owned().await else {
                return;
            };
            match this.write(&key, reader).await {
                Ok(()) => {
                    let _ = this.outcome("put", &key, Ok(()));
                }
                Err(Upload::Bucket(f)) => {
                    let _ = this.outcome::<()>("put", &key, Err(f));
                }
                Err(Upload::Fill(e)) => {
                    tracing::debug!(%key, error = %e, "fill failed; upload aborted");
                    this.count("put", "aborted");
                }
            }
        });
    }

    /// Uploads running or waiting: a replica stopping gracefully lets them finish.
    pub fn uploads_in_flight(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn write(&self, key: &Path, mut reader: Reader) -> Result<(), Upload> {
        let mut w = BufWriter::with_capacity(Arc::clone(&self.store), key.clone(), self.part_size)
            .with_max_concurrency(PARTS_IN_FLIGHT);
        // A slow bucket is given `timeout` per step; a stalled one loses the upload.
        let sent = async {
            while let Some(chunk) = reader.next_chunk().await {
                let chunk: Bytes = chunk.map_err(Upload::Fill)?;
                self.metrics
                    .bucket_bytes
                    .with_label_values(&["written"])
                    .inc_by(chunk.len() as u64);
                self.bounded(w.put(chunk)).await.map_err(Upload::Bucket)?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = sent {
            // Leaves nothing behind: a multipart upload's parts are discarded, and a single
            // PUT was never sent.
            let _ = tokio::time::timeout(self.timeout, w.abort()).await;
            return Err(e);
        }
        // Verified: the object becomes visible now.
        let done = async {
            w.shutdown()
                .await
                .map_err(|e| object_store::Error::Generic {
                    store: "S3",
                    source: Box::new(e),
                })
        };
        self.bounded(done).await.map_err(Upload::Bucket)
    }
}

/// The client for the bucket `c` names, and the S3 endpoint it uses as configured (`None`: AWS).
fn s3(c: &S3Config) -> Result<(AmazonS3, Option<String>), String> {
    let bucket = c.bucket.clone().unwrap_or_default();
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(&bucket)
        .with_virtual_hosted_style_request(!c.path_style)
        // No SHA-256 of every uploaded byte for the request signature (a second hash of
        // each blob, as much CPU as the fill's own digest check): objects are verified
        // against their digest when read back, which covers the path end to end.
        .with_unsigned_payload(true)
        .with_retry(object_store::RetryConfig {
            max_retries: 2,
            retry_timeout: c.timeout * 3,
            ..Default::default()
        })
        // Whole-request deadlines would cut long blob bodies; regcache bounds each answer
        // by `timeout` and each body by silence, as it does upstream's.
        .with_client_options(
            object_store::ClientOptions::new()
                .with_connect_timeout(c.timeout)
                .with_timeout_disabled(),
        );
    // `AWS_ENDPOINT` means what the `endpoint` key means: the S3 API's base URL.
    let endpoint = c
        .endpoint
        .clone()
        .or_else(|| b.get_config_value(&AmazonS3ConfigKey::Endpoint));
    if let Some(endpoint) = &endpoint {
        b = b
            .with_endpoint(bucket_endpoint(endpoint, &bucket, c.path_style)?)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    if let Some(region) = &c.region {
        b = b.with_region(region);
    }
    if let Some(id) = &c.access_key_id {
        b = b.with_access_key_id(id);
    }
    let secret = match (&c.secret_access_key, &c.secret_access_key_file) {
        (Some(s), _) => Some(s.to_string()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| format!("storage.s3.secret_access_key_file {}: {e}", f.display()))?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    if let Some(s) = secret {
        b = b.with_secret_access_key(s);
    }
    let store = b.build().map_err(|e| format!("storage.s3: {e}"))?;
    Ok((store, endpoint))
}

/// The endpoint object_store is given for the S3 API at `endpoint`. Path style: `endpoint`
/// itself (object_store adds `/{bucket}`). Virtual-hosted style: object_store takes an
/// endpoint as the bucket's own URL, so the bucket goes in front of the host here
/// (`https://s3.example:9000` -> `https://{bucket}.s3.example:9000`); given as it was, every
/// key's first segment (`blobs`, or the prefix) would be read as the bucket.
fn bucket_endpoint(endpoint: &str, bucket: &str, path_style: bool) -> Result<String, String> {
    if path_style {
        return Ok(endpoint.to_owned());
    }
    let mut url =
        url::Url::parse(endpoint).map_err(|e| format!("storage.s3.endpoint {endpoint:?}: {e}"))?;
    let Some(url::Host::Domain(host)) = url.host() else {
        return Err(format!(
            "storage.s3.endpoint {endpoint:?}: virtual-hosted style (path_style = false) puts \
             the bucket in the host name, which needs a domain name; set path_style = true"
        ));
    };
    let host = format!("{bucket}.{host}");
    url.set_host(Some(&host))
        .map_err(|e| format!("storage.s3.bucket {bucket:?}: not usable in a host name: {e}"))?;
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// Counts one upload from its start until it is dropped.
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    /// Counts one more upload, unless `max` are counted already.
    fn try_new(count: &Arc<std::sync::atomic::AtomicUsize>, max: usize) -> Option<InFlight> {
        use std::sync::atomic::Ordering::SeqCst;
        count
            .fetch_update(SeqCst, SeqCst, |n| (n < max).then_some(n + 1))
            .ok()?;
        Some(InFlight(Arc::clone(count)))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Why a bucket request failed.
enum Failure {
    Store(object_store::Error),
    Timeout,
}

/// Why an upload stopped.
enum Upload {
    Bucket(Failure),
    /// The fill it followed failed: nothing may be written.
    Fill(std::io::Error),
}

#[cfg(test)]
mod tests {
    use object_store::signer::Signer as _;

    use super::*;

    fn config(endpoint: Option<&str>, path_style: bool) -> S3Config {
        S3Config {
            endpoint: endpoint.map(str::to_owned),
            bucket: Some("regcache".into()),
            region: Some("eu-west-1".into()),
            prefix: "cache/".into(),
            path_style,
            access_key_id: Some("GKtest".into()),
            secret_access_key: Some("secret".into()),
            ..S3Config::default()
        }
    }

    /// The URL a blob's object is read from, without the signature.
    async fn object_url(c: &S3Config) -> Result<String, String> {
        let (store, _) = s3(c)?;
        let key = Path::from("cache/blobs/docker.io/sha256/abc");
        let mut url = store
            .signed_url(http::Method::GET, &key, Duration::from_secs(60))
            .await
            .map_err(|e| e.to_string())?;
        url.set_query(None);
        Ok(url.to_string())
    }

    /// A bucket that never answers (black-holed) holds at most `max_uploads` uploads running
    /// and a few waiting; every further fill's upload is skipped at once, releasing its file
    /// and window, and uploads are taken again once the queue has drained.
    #[tokio::test]
    async fn a_stalled_bucket_queues_a_bounded_number_of_uploads() {
        // Connections are taken (the kernel's backlog) and never answered.
        let stalled = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", stalled.local_addr().unwrap());
        let c = S3Config {
            max_uploads: 2,
            timeout: Duration::from_millis(200),
            ..config(Some(&endpoint), true)
        };
        let metrics = Arc::new(Metrics::new());
        let bucket = Arc::new(Bucket::new(&c, Arc::clone(&metrics)).unwrap());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("blob"), vec![7u8; 4096]).unwrap();
        let blob = crate::cache::blobs::Committed {
            file: Arc::new(std::fs::File::open(dir.path().join("blob")).unwrap()),
            size: 4096,
            mapped: None,
        };
        let digest: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let skipped = || {
            metrics
                .bucket_requests
                .with_label_values(&["put", "skipped"])
                .get()
        };

        // A cold pull of 50 blobs: no upload task has run yet (one thread, no await).
        for _ in 0..50 {
            bucket.upload("docker.io", &digest, Reader::complete(&blob, 0, 4096));
        }
        let held = c.max_uploads * (1 + WAITING_PER_SLOT);
        assert_eq!(bucket.uploads_in_flight(), held);
        assert_eq!(skipped(), (50 - held) as u64);
        assert_eq!(
            Arc::strong_count(&blob.file),
            1 + held,
            "a skipped upload keeps no reader (nor its file open)"
        );

        // Each upload gives up after `timeout`; the queue drains and lets go of every file.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while bucket.uploads_in_flight() > 0 {
            assert!(std::time::Instant::now() < deadline, "uploads never ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(Arc::strong_count(&blob.file), 1);
        let timeouts = metrics
            .bucket_requests
            .with_label_values(&["put", "timeout"])
            .get();
        assert_eq!(timeouts, held as u64);
        bucket.upload("docker.io", &digest, Reader::complete(&blob, 0, 4096));
        assert_eq!(bucket.uploads_in_flight(), 1, "taken again once drained");
        assert_eq!(skipped(), (50 - held) as u64);
    }

    #[tokio::test]
    async fn the_bucket_is_in_the_path_or_the_host_as_path_style_says() {
        let key = "cache/blobs/docker.io/sha256/abc";
        for (endpoint, path_style, url) in [
            (
                Some("http://127.0.0.1:3900"),
                true,
                format!("http://127.0.0.1:3900/regcache/{key}"),
            ),
            (
                Some("https://s3.example.com:9000/"),
                false,
                format!("https://regcache.s3.example.com:9000/{key}"),
            ),
            (
                Some("https://storage.example.com/s3"),
                false,
                format!("https://regcache.storage.example.com/s3/{key}"),
            ),
            (
                None,
                false,
                format!("https://regcache.s3.eu-west-1.amazonaws.com/{key}"),
            ),
            (
                None,
                true,
                format!("https://s3.eu-west-1.amazonaws.com/regcache/{key}"),
            ),
        ] {
            let c = config(endpoint, path_style);
            assert_eq!(
                object_url(&c).await.unwrap(),
                url,
                "endpoint {endpoint:?}, path_style = {path_style}"
            );
        }
        // No host name to put the bucket in: refused at start, not sent to the wrong place.
        let err = object_url(&config(Some("http://10.0.0.1:9000"), false))
            .await
            .unwrap_err();
        assert!(err.contains("set path_style = true"), "{err}");
    }
}
