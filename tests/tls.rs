//! HTTPS on the main listener: real clients (skopeo, the Docker daemon) pull through regcache
//! with a test CA trusted, the certificate is replaced under a running `regcache serve` (on
//! SIGHUP and on file change) without breaking open connections, TLS below 1.2 is refused and
//! HTTP/2 is negotiated by ALPN. The CA and certificates are generated here with rcgen.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use common::certs::Ca;
use common::clients::{Dockerd, Skopeo, file_digest, run, setup, snippet, try_run};
use common::{Image, image};

/// A rustls client trusting only `ca`, offering `alpn`, limited to `versions`.
fn client_config(
    ca: &Ca,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// The leaf certificate the server presented.
fn leaf_of(s: &Tls) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// One HTTP/1.1 keep-alive request on an open stream; returns the status.
async fn get_keepalive(s: &mut Tls, path: &str) -> u16 {
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "connection closed");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    head.split(' ').nth(1).unwrap().parse().unwrap()
}

fn tls_files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("server.crt"), dir.join("server.key"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_over_https_with_the_ca_trusted() {
    let ca = Ca::new();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = tls_files(certs.path());
    ca.leaf("regcache", 1).install(&cert, &key);
    let s = setup(|c| {
        c.tls.cert = Some(cert.clone());
        c.tls.key = Some(key.clone());
    })
    .await;
    let img = Image::simple(510, 2);
    s.registry.push("library/rctls", "1", &img).await;
    let skopeo = Skopeo::new();
    // skopeo's cert dir: `*.crt` files are CAs.
    let ca_dir = skopeo.path("ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    std::fs::write(ca_dir.join("ca.crt"), ca.pem()).unwrap();
    let src = format!("docker://127.0.0.1:{}/library/rctls:1", s.cache.addr.port());

    // Without the CA, verification fails: the server is really checked.
    let dir = skopeo.path("dir");
    let mut c = skopeo.cmd();
    c.args(["copy", "--src-tls-verify=true"])
        .arg(&src)
        .arg(format!("dir:{}", dir.display()));
    let out = try_run(&mut c, "skopeo copy without the CA").await;
    assert!(
        !out.status.success(),
        "an untrusted certificate was accepted"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("certificate") || err.contains("x509"),
        "fails on the certificate: {err}"
    );

    let mut c = skopeo.cmd();
    c.args([
        "copy",
        "--src-tls-verify=true",
        "--preserve-digests",
        "--src-cert-dir",
    ])
    .arg(&ca_dir)
    .arg(&src)
    .arg(format!("dir:{}", dir.display()));
    run(&mut c, "skopeo copy over HTTPS").await;
    assert_eq!(
        std::fs::read(dir.join("manifest.json")).unwrap(),
        img.manifest,
        "manifest byte-exact"
    );
    assert_eq!(image::sha256(&img.manifest), img.digest());
    for blob in img.blobs() {
        let digest = image::sha256(&blob);
        assert_eq!(
            file_digest(&dir.join(&digest[7..])),
            digest,
            "blob {digest} copied intact"
        );
        assert_eq!(
            s.meter.count("GET", &format!("/blobs/{digest}")),
            1,
            "blob fetched through regcache once"
        );
    }
}

/// `/etc/docker/certs.d/<host:port>/ca.crt` for one test, removed on drop.
struct DockerCerts(PathBuf);

impl DockerCerts {
    fn install(host_port: &str, ca_pem: &str) -> DockerCerts {
        let dir = Path::new("/etc/docker/certs.d").join(host_port);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.crt"), ca_pem).unwrap();
        DockerCerts(dir)
    }
}

impl Drop for DockerCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_pulls_through_an_https_registry_mirror() {
    let ca = Ca::new();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = tls_files(certs.path());
    ca.leaf("regcache", 1).install(&cert, &key);
    let s = setup(|c| {
        c.tls.cert = Some(cert.clone());
        c.tls.key = Some(key.clone());
    })
    .await;
    let img = Image::simple(520, 2);
    s.registry.push("library/rctlsdocker", "1", &img).await;
    let host_port = s.cache.addr.to_string();
    common::clients::require_root("the Docker daemon test");
    let _trust = DockerCerts::install(&host_port, &ca.pem());
    // The shipped snippet, with the mirror's scheme switched to https.
    let daemon_json = snippet("daemon.json", &host_port).replace("http://", "https://");
    assert!(daemon_json.contains(&format!("https://{host_port}")));
    let docker = Dockerd::start_config(&daemon_json, &[]).await;
    docker.run(&["pull", "rctlsdocker:1"]).await;
    let inspect = docker.inspect("rctlsdocker:1").await;
    assert_eq!(inspect["Id"], image::sha256(&img.config).as_str());
    let repo_digests: Vec<String> = serde_json::from_value(inspect["RepoDigests"].clone()).unwrap();
    assert!(
        repo_digests
            .iter()
            .any(|d| d.ends_with(&format!("@{}", img.digest()))),
        "{repo_digests:?}"
    );
    assert!(
        common::clients::asked(&s.meter, "/v2/library/rctlsdocker/manifests/1"),
        "the pull went through the HTTPS mirror"
    );
    assert_eq!(s.meter.blob_gets(), 3, "config + 2 layers, once each");
}

/// The binary with no `REGCACHE_*` variables from the test's own environment.
fn binary() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_regcache"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("REGCACHE_") {
            c.env_remove(k);
        }
    }
    c
}

/// A `regcache serve` process with TLS, its stderr in a file; killed on drop.
struct Served {
    child: Child,
    addr: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Served {
    fn start(cert: &Path, key: &Path, reload_interval: &str) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let (port, metrics_port) = (common::free_port(), common::free_port());
        let config = dir.path().join("regcache.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n\
                 data_dir = \"{}\"\n[log]\nlevel = \"info\"\n\
                 [tls]\ncert = \"{}\"\nkey = \"{}\"\nreload_interval = \"{reload_interval}\"\n\
                 [upstreams.\"docker.io\"]\nurls = [\"http://127.0.0.1:1\"]\n",
                dir.path().join("data").display(),
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        let log = dir.path().join("regcache.log");
        let child = binary()
            .env_remove("RUST_LOG")
            .args(["--log-format", "text", "serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Served {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            config,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    /// Connects until the server answers a handshake.
    async fn connect(&self, config: &Arc<rustls::ClientConfig>) -> Tls {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match connect(self.addr, Arc::clone(config)).await {
                Ok(s) => return s,
                Err(e) if Instant::now() > deadline => {
                    panic!("no TLS handshake with regcache: {e}\n{}", self.log())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// New connections until one presents `der`.
    async fn wait_for_leaf(&self, config: &Arc<rustls::ClientConfig>, der: &[u8], why: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.connect(config).await;
            if leaf_of(&s) == der {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{why}: new connections still get the old certificate\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replaces the certificate under a running server: new connections get the new one, a
/// connection opened before keeps working, a broken replacement is refused and the old
/// certificate kept.
async fn replace_certificate(by_sighup: bool) {
    let ca = Ca::new();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = tls_files(certs.path());
    let first = ca.leaf("regcache-one", 1);
    first.install(&cert, &key);
    // SIGHUP only, or file polling only (SIGHUP is never sent then).
    let served = Served::start(&cert, &key, if by_sighup { "0s" } else { "200ms" });
    let config = client_config(&ca, &[b"http/1.1"], rustls::DEFAULT_VERSIONS);
    let mut open = served.connect(&config).await;
    assert_eq!(leaf_of(&open), first.der);
    assert_eq!(get_keepalive(&mut open, "/v2/").await, 200);
    // With TLS on `listen`, `regcache health` (the container health check) asks the plain
    // metrics listener.
    let health = binary()
        .args(["health", "--ready", "--config"])
        .arg(&served.config)
        .output()
        .unwrap();
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );

    let second = ca.leaf("regcache-two", 2);
    second.install(&cert, &key);
    if by_sighup {
        // Files alone change nothing without polling...
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(leaf_of(&served.connect(&config).await), first.der);
        served.signal("-HUP");
    }
    served
        .wait_for_leaf(&config, &second.der, "after the replacement")
        .await;
    assert_eq!(
        leaf_of(&open),
        first.der,
        "the open connection keeps its session"
    );
    assert_eq!(
        get_keepalive(&mut open, "/v2/").await,
        200,
        "the connection opened before the reload still works"
    );

    // A broken replacement (certificate without its key) is logged; the old one stays.
    let third = ca.leaf("regcache-three", 3);
    std::fs::write(&cert, &third.cert_pem).unwrap();
    if by_sighup {
        served.signal("-HUP");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !served.log().contains("keeping the old one") {
        assert!(
            Instant::now() < deadline,
            "a bad certificate was not reported:\n{}",
            served.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut fresh = served.connect(&config).await;
    assert_eq!(leaf_of(&fresh), second.der, "the good certificate is kept");
    assert_eq!(get_keepalive(&mut fresh, "/v2/").await, 200);
    assert!(served.log().contains("TLS certificate reloaded"));
    if by_sighup {
        assert!(served.log().contains("SIGHUP"), "{}", served.log());
    }
    // The server is still the same process.
    served.signal("-0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_without_dropping_connections() {
    replace_certificate(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_files_reload_the_certificate_without_dropping_connections() {
    replace_certificate(false).await;
}

/// A ClientHello for `version` (3.2 is TLS 1.1) with no `supported_versions`, byte by byte: no
/// TLS library here will send a TLS 1.1 one.
fn client_hello(version: [u8; 2]) -> Vec<u8> {
    let mut body = version.to_vec(); // client_version
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // session id
    // ECDHE-ECDSA/RSA-AES128-GCM-SHA256 (which rustls has), AES128-SHA (which TLS 1.1 had)
    let suites: [u8; 6] = [0xc0, 0x2b, 0xc0, 0x2f, 0x00, 0x2f];
    body.extend_from_slice(&(suites.len() as u16).to_be_bytes());
    body.extend_from_slice(&suites);
    body.extend_from_slice(&[1, 0]); // compression: null
    // extensions: supported_groups (x25519, P-256), ec_point_formats, signature_algorithms:
    // everything but the version would do for TLS 1.2
    let ext: [u8; 28] = [
        0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17, // groups
        0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // point formats
        0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01, // sig algs
    ];
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_tls_is_refused_and_h2_is_negotiated() {
    let ca = Ca::new();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = tls_files(certs.path());
    let leaf = ca.leaf("regcache", 1);
    leaf.install(&cert, &key);
    let up = common::fake::FakeRegistry::start(Default::default()).await;
    let cache = common::Regcache::start(&up.url(), |c| {
        c.tls.cert = Some(cert.clone());
        c.tls.key = Some(key.clone());
    })
    .await;

    // TLS 1.1: the server answers with an alert (protocol_version), never a ServerHello.
    let hello = |version: [u8; 2]| async move {
        let mut s = TcpStream::connect(cache.addr).await.unwrap();
        s.write_all(&client_hello(version)).await.unwrap();
        let mut answer = vec![0u8; 7];
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut answer)).await;
        answer
    };
    let answer = hello([0x03, 0x02]).await;
    assert!(
        answer.len() >= 7 && answer[0] == 0x15,
        "want a TLS alert record, got {answer:02x?}"
    );
    assert_eq!(answer[6], 70, "alert protocol_version, got {answer:02x?}");
    // The same hello saying TLS 1.2 gets a ServerHello (handshake record): only the version
    // was refused.
    let answer = hello([0x03, 0x03]).await;
    assert_eq!(answer[0], 0x16, "a handshake record, got {answer:02x?}");
    assert_eq!(answer[5], 0x02, "ServerHello, got {answer:02x?}");

    // TLS 1.2 and 1.3 are accepted.
    for v in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut s = connect(cache.addr, client_config(&ca, &[b"http/1.1"], &[v]))
            .await
            .unwrap_or_else(|e| panic!("{v:?}: {e}"));
        assert_eq!(s.get_ref().1.protocol_version(), Some(v.version));
        assert_eq!(get_keepalive(&mut s, "/v2/").await, 200);
    }

    // Plain HTTP on the TLS port gets nothing useful.
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{}/v2/", cache.addr))
        .send()
        .await;
    assert!(resp.is_err(), "plain HTTP answered on the TLS listener");

    // ALPN: h2 when offered first, and a request over it.
    let tls = connect(
        cache.addr,
        client_config(&ca, &[b"h2", b"http/1.1"], rustls::DEFAULT_VERSIONS),
    )
    .await
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(leaf_of(&tls), leaf.der);
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(format!("https://127.0.0.1:{}/v2/", cache.addr.port()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    // http/1.1 alone is still served.
    let s = connect(
        cache.addr,
        client_config(&ca, &[b"http/1.1"], rustls::DEFAULT_VERSIONS),
    )
    .await
    .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
}

#[test]
fn check_config_names_bad_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (cert, key) = tls_files(dir.path());
    ca.leaf("regcache", 1).install(&cert, &key);
    std::fs::write(&key, "garbage").unwrap();
    let cfg = dir.path().join("c.toml");
    let write = |tls: &str| {
        std::fs::write(
            &cfg,
            format!("{tls}\n[upstreams.\"docker.io\"]\nurls = [\"https://r.example\"]\n"),
        )
        .unwrap();
    };
    let check = || {
        let out = binary().arg("check-config").arg(&cfg).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout),
        )
    };
    write(&format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"",
        cert.display(),
        key.display()
    ));
    let (ok, out) = check();
    assert!(
        !ok && out.contains("tls.key: ") && out.contains("server.key"),
        "{out}"
    );
    write(&format!("[tls]\ncert = \"{}\"", cert.display()));
    let (ok, out) = check();
    assert!(!ok && out.contains("tls.key: tls.cert is set"), "{out}");
    write(&format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"",
        dir.path().join("missing.crt").display(),
        key.display()
    ));
    let (ok, out) = check();
    assert!(
        !ok && out.contains("tls.cert: ") && out.contains("missing.crt"),
        "{out}"
    );
}
