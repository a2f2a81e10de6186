//! Shared test helpers: a real upstream (Debian's `docker-registry`), a metering proxy that
//! counts what regcache asks upstream for, generated images pushed through the registry API,
//! regcache itself in-process on port 0, and a small fake upstream for what a real registry
//! cannot do on demand (token auth, wrong bytes, stalls, redirects).
#![allow(dead_code, unused_imports)]

pub mod certs;
pub mod clients;
pub mod fake;
pub mod garage;
pub mod image;
pub mod token;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::oneshot;

pub use image::{Image, Layer};

/// Path of a required program, or a panic telling what to install. Tests never skip.
pub fn require(program: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin", "/sbin"] {
        let p = Path::new(dir).join(program);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{program}` is not installed; this test needs it. Install it with \
         `apt-get install -y {package}` (or run ./scripts/test, which installs every test dependency)"
    );
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap()
}

/// Waits until `GET url` answers at all.
pub async fn wait_http(url: &str, what: &str) {
    let client = http();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if client.get(url).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not come up at {url}");
}

/// Debian's `docker-registry` (CNCF distribution 2.8) on a free loopback port.
pub struct Registry {
    child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Registry {
    pub async fn start() -> Registry {
        Self::start_with("").await
    }

    /// Starts with extra YAML appended to the config (e.g. an `auth:` section).
    pub async fn start_with(extra_yaml: &str) -> Registry {
        let bin = require("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{extra_yaml}",
            dir.path().join("data").display()
        );
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&cfg)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_http(&format!("http://{addr}/v2/"), "docker-registry").await;
        Registry { child, addr, dir }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the registry (the upstream "goes down").
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Pushes every blob and manifest of an image under `repo:tag`.
    pub async fn push(&self, repo: &str, tag: &str, image: &Image) {
        push(&self.url(), repo, tag, image).await
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Pushes an image through the registry API (monolithic blob uploads, then the manifest(s)).
pub async fn push(base: &str, repo: &str, tag: &str, image: &Image) {
    let client = http();
    for blob in image.blobs() {
        push_blob(&client, base, repo, &blob).await;
    }
    for (digest, media_type, bytes) in image.child_manifests() {
        put_manifest(&client, base, repo, &digest, &media_type, bytes).await;
    }
    put_manifest(
        &client,
        base,
        repo,
        tag,
        &image.media_type,
        image.manifest.clone(),
    )
    .await;
}

pub async fn push_blob(client: &reqwest::Client, base: &str, repo: &str, blob: &Bytes) {
    let digest = image::sha256(blob);
    let resp = client
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202, "start upload: {:?}", resp.text().await);
    let loc = resp.headers()["location"].to_str().unwrap().to_owned();
    let loc = if loc.starts_with("http") {
        loc
    } else {
        format!("{base}{loc}")
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let resp = client
        .put(format!("{loc}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "finish upload: {:?}", resp.text().await);
}

pub async fn put_manifest(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: Bytes,
) {
    let resp = client
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("content-type", media_type)
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "put manifest: {:?}", resp.text().await);
}

/// One request regcache made upstream.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
}

/// A counting reverse proxy in front of a real upstream: what regcache asked and how many
/// body bytes came back.
pub struct Meter {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub bytes: Arc<std::sync::atomic::AtomicU64>,
    _stop: oneshot::Sender<()>,
}

impl Meter {
    pub async fn start(target: SocketAddr) -> Meter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let bytes: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let client: Client<HttpConnector, Incoming> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let (stop, mut stopped) = oneshot::channel();
        let (seen2, bytes2) = (Arc::clone(&seen), Arc::clone(&bytes));
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => a.unwrap(),
                    _ = &mut stopped => return,
                };
                let (client, seen, bytes) =
                    (client.clone(), Arc::clone(&seen2), Arc::clone(&bytes2));
                tokio::spawn(async move {
                    let svc = service_fn(move |mut req: hyper::Request<Incoming>| {
                        let (client, seen, bytes) =
                            (client.clone(), Arc::clone(&seen), Arc::clone(&bytes));
                        async move {
                            seen.lock().unwrap().push(Seen {
                                method: req.method().to_string(),
                                path: req.uri().to_string(),
                                authorization: req
                                    .headers()
                                    .get("authorization")
                                    .map(|v| v.to_str().unwrap().to_owned()),
                            });
                            let uri = format!(
                                "http://{target}{}",
                                req.uri()
                                    .path_and_query()
                                    .map(|p| p.as_str())
                                    .unwrap_or("/")
                            );
                            *req.uri_mut() = uri.parse().unwrap();
                            let resp = client.request(req).await.unwrap();
                            let (parts, body) = resp.into_parts();
                            let body = body.map_frame(move |f| {
                                if let Some(d) = f.data_ref() {
                                    bytes.fetch_add(
                                        d.len() as u64,
                                        std::sync::atomic::Ordering::SeqCst,
                                    );
                                }
                                f
                            });
                            Ok::<_, hyper::Error>(hyper::Response::from_parts(parts, body))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Meter {
            addr,
            seen,
            bytes,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests so far with this method whose path contains `fragment`.
    pub fn count(&self, method: &str, fragment: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.method == method && s.path.contains(fragment))
            .count()
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn blob_gets(&self) -> usize {
        self.count("GET", "/blobs/")
    }

    pub fn total(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn reset(&self) {
        self.seen.lock().unwrap().clear();
        self.bytes.store(0, std::sync::atomic::Ordering::SeqCst);
    }
}

/// regcache running in-process on a free loopback port.
pub struct Regcache {
    pub addr: SocketAddr,
    /// The metrics-only listener, when the config sets `metrics_listen`.
    pub metrics_addr: Option<SocketAddr>,
    /// The admin API, when the config sets `admin_listen`.
    pub admin_addr: Option<SocketAddr>,
    pub data: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A config for tests: Docker Hub's upstream replaced by `docker_io`, short timeouts, and
/// sendfile for loopback clients too (the tests' clients are on loopback; production's remote
/// clients get sendfile, so that is the path the real clients here should take).
pub fn config(docker_io: &str, data_dir: &Path) -> regcache::Config {
    let mut cfg =
        regcache::Config::parse(&config_text(docker_io, data_dir), Path::new("<test>")).unwrap();
    cfg.storage.sendfile = regcache::config::Sendfile::Always;
    cfg
}

/// The TOML of [`config`], for tests that add tables to it.
pub fn config_text(docker_io: &str, data_dir: &Path) -> String {
    format!(
        r#"
        listen = "127.0.0.1:0"
        data_dir = "{}"
        [log]
        level = "warn"
        [cache]
        revalidate_timeout = "2s"
        [upstreams."docker.io"]
        urls = ["{docker_io}"]
        connect_timeout = "2s"
        response_timeout = "5s"
        read_timeout = "5s"
        "#,
        data_dir.display()
    )
}

impl Regcache {
    /// Starts regcache with Docker Hub replaced by `docker_io`; `tweak` adjusts the config.
    pub async fn start(docker_io: &str, tweak: impl FnOnce(&mut regcache::Config)) -> Regcache {
        let data = tempfile::tempdir().unwrap();
        let mut cfg = config(docker_io, data.path());
        tweak(&mut cfg);
        cfg.validate().unwrap();
        Self::start_config(cfg, data).await
    }

    pub async fn start_config(cfg: regcache::Config, data: tempfile::TempDir) -> Regcache {
        init_tracing();
        let server = regcache::Server::bind(cfg).await.unwrap();
        let addr = server.local_addr();
        let metrics_addr = server.metrics_addr();
        let admin_addr = server.admin_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = stopped.await;
        }));
        Regcache {
            addr,
            metrics_addr,
            admin_addr,
            data,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server and waits for it to finish.
    pub async fn shutdown(mut self) -> tempfile::TempDir {
        self.stop.take().map(|s| s.send(()));
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
        std::mem::replace(&mut self.data, tempfile::tempdir().unwrap())
    }

    /// Committed blob files under the data dir.
    pub fn stored_files(&self) -> usize {
        count_files(&self.data.path().join("blobs"))
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        http()
            .get(format!("{}{path}", self.url()))
            .send()
            .await
            .unwrap()
    }
}

impl Drop for Regcache {
    fn drop(&mut self) {
        self.stop.take().map(|s| s.send(()));
    }
}

pub fn count_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(Result::ok)
        .map(|e| {
            let p = e.path();
            if p.is_dir() { count_files(&p) } else { 1 }
        })
        .sum()
}

/// Test logs go to the test's captured output (RUST_LOG=regcache=debug to see more).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "regcache=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// All accept types a modern client sends.
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// GETs `url` and reads its body as JSON (panics if it is not).
pub async fn get_json(url: impl reqwest::IntoUrl) -> serde_json::Value {
    http().get(url).send().await.unwrap().json().await.unwrap()
}

/// GETs a manifest through regcache with every modern `Accept`.
pub async fn get_manifest(base: &str, repo: &str, reference: &str) -> reqwest::Response {
    get_manifest_as(base, repo, reference, None).await
}

/// [`get_manifest`] with the client's own `Authorization`.
pub async fn get_manifest_as(
    base: &str,
    repo: &str,
    reference: &str,
    authorization: Option<&str>,
) -> reqwest::Response {
    let mut req = http()
        .get(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("accept", ACCEPT_ALL);
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    req.send().await.unwrap()
}

/// Pulls an image the way a client does (manifest, config, layers; every child of an index)
/// and checks every digest. Returns the manifest digest.
pub async fn pull(base: &str, repo: &str, reference: &str) -> String {
    pull_as(base, repo, reference, None).await
}

/// [`pull`] sending the client's own `Authorization` on every request, as dockerd does.
pub async fn pull_as(
    base: &str,
    repo: &str,
    reference: &str,
    authorization: Option<&str>,
) -> String {
    let resp = get_manifest_as(base, repo, reference, authorization).await;
    assert_eq!(
        resp.status(),
        200,
        "manifest {repo}:{reference}: {:?}",
        resp.text().await
    );
    let digest = resp.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = resp.bytes().await.unwrap();
    assert_eq!(
        image::sha256(&body),
        digest,
        "manifest bytes match their digest"
    );
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    if let Some(children) = v["manifests"].as_array() {
        for c in children {
            Box::pin(pull_as(
                base,
                repo,
                c["digest"].as_str().unwrap(),
                authorization,
            ))
            .await;
        }
        return digest;
    }
    let mut blobs: Vec<String> = vec![v["config"]["digest"].as_str().unwrap().to_owned()];
    blobs.extend(
        v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_owned()),
    );
    for b in blobs {
        let got = get_blob_as(base, repo, &b, authorization).await;
        assert_eq!(image::sha256(&got), b, "blob bytes match their digest");
    }
    digest
}

/// `GET url` with `Range: range` (e.g. `bytes=0-99`).
pub async fn get_range(
    client: &reqwest::Client,
    url: &str,
    range: impl AsRef<str>,
) -> reqwest::Response {
    client
        .get(url)
        .header("range", range.as_ref())
        .send()
        .await
        .unwrap()
}

pub async fn get_blob(base: &str, repo: &str, digest: &str) -> Bytes {
    get_blob_as(base, repo, digest, None).await
}

pub async fn get_blob_as(
    base: &str,
    repo: &str,
    digest: &str,
    authorization: Option<&str>,
) -> Bytes {
    let mut req = http().get(format!("{base}/v2/{repo}/blobs/{digest}"));
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200, "blob {digest}");
    resp.bytes().await.unwrap()
}

/// Body of a request as text, for assertions on OCI error bodies.
pub async fn error_code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    (
        status,
        v["errors"][0]["code"].as_str().unwrap_or("").to_owned(),
    )
}

pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

pub fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// One scrape of regcache's `/metrics`, parsed: `series(name, labels)` sums the samples whose
/// labels include every pair given.
pub struct Scrape {
    pub text: String,
    samples: Vec<(String, std::collections::BTreeMap<String, String>, f64)>,
}

impl Scrape {
    pub async fn of(base: &str) -> Scrape {
        let resp = http().get(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(ct.starts_with("text/plain"), "{ct}");
        Scrape::parse(&resp.text().await.unwrap())
    }

    /// Scrapes until `ready` holds (commits finish just after the client's last byte).
    pub async fn until(base: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
        for _ in 0..100 {
            let s = Scrape::of(base).await;
            if ready(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("metrics never reached the expected state");
    }

    pub fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value.parse().unwrap();
            let (name, labels) = match series.split_once('{') {
                None => (series.to_owned(), Default::default()),
                Some((name, rest)) => {
                    let mut map = std::collections::BTreeMap::new();
                    for pair in rest.trim_end_matches('}').split("\",") {
                        if let Some((k, v)) = pair.split_once("=\"") {
                            map.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                        }
                    }
                    (name.to_owned(), map)
                }
            };
            samples.push((name, labels, value));
        }
        Scrape {
            text: text.to_owned(),
            samples,
        }
    }

    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }
}
