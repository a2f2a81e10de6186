//! The way out: upstreams reached through a real HTTP CONNECT proxy (Debian's `tinyproxy`,
//! with Basic auth) named per upstream or by `HTTPS_PROXY` / `NO_PROXY`, and TLS upstreams
//! trusted through an extra CA (`ca_file`) or, by explicit opt-in only, not checked at all
//! (`insecure = true`).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::image::{self, Image};
use common::{Meter, Regcache, Registry};

/// `tinyproxy` in the foreground on a free loopback port, requiring Basic auth.
struct Tinyproxy {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

const PROXY_USER: &str = "gateway";
const PROXY_PASSWORD: &str = "pr0xy-s3cret";

impl Tinyproxy {
    async fn start() -> Tinyproxy {
        let bin = common::require("tinyproxy", "tinyproxy");
        let dir = tempfile::tempdir().unwrap();
        let port = common::free_port();
        let conf = dir.path().join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{}\"\nLogLevel Info\n\
                 MaxClients 64\nAllow 127.0.0.1\nBasicAuth {PROXY_USER} {PROXY_PASSWORD}\n",
                dir.path().join("log").display()
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tinyproxy");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tinyproxy did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Tinyproxy { child, port, dir }
    }

    fn url(&self, password: &str) -> String {
        format!("http://{PROXY_USER}:{password}@127.0.0.1:{}", self.port)
    }

    /// How many `CONNECT` requests for `target` (host:port) the proxy has seen.
    fn connects(&self, target: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains(&format!("CONNECT {target} HTTP/1.1")))
            .count()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_proxy_with_basic_auth_carries_every_upstream_request() {
    let registry = Registry::start().await;
    let meter = Meter::start(registry.addr).await;
    let proxy = Tinyproxy::start().await;
    let img = Image::simple(800, 2);
    registry.push("library/viaproxy", "1", &img).await;
    let target = meter.url().trim_start_matches("http://").to_owned();

    let cache = Regcache::start(&meter.url(), |c| {
        let u = c.upstreams.get_mut("docker.io").unwrap();
        u.proxy = Some(proxy.url(PROXY_PASSWORD).as_str().into());
    })
    .await;
    assert_eq!(
        common::pull(&cache.url(), "viaproxy", "1").await,
        img.digest()
    );
    assert_eq!(meter.blob_gets(), 3, "config + 2 layers reached upstream");
    assert!(
        proxy.connects(&target) >= 1,
        "the upstream was reached through the proxy's CONNECT"
    );
    let before = proxy.connects(&target);
    drop(cache);

    // A wrong proxy password: the pull fails with a clear upstream error that does not show
    // the password, and nothing is cached.
    meter.reset();
    let wrong = Regcache::start(&meter.url(), |c| {
        let u = c.upstreams.get_mut("docker.io").unwrap();
        u.proxy = Some(proxy.url("wrong-password").as_str().into());
    })
    .await;
    let resp = common::get_manifest(&wrong.url(), "viaproxy", "1").await;
    let (status, code) = common::error_code(resp).await;
    assert_eq!((status, code.as_str()), (502, "UNAVAILABLE"));
    let resp = common::get_manifest(&wrong.url(), "viaproxy", "1").await;
    let body = resp.text().await.unwrap();
    assert!(body.contains("proxy"), "the error names the proxy: {body}");
    assert!(!body.contains("wrong-password"), "no password in: {body}");
    assert_eq!(meter.total(), 0, "the proxy let nothing through");
    assert!(proxy.connects(&target) > before, "the proxy was asked");
    assert_eq!(wrong.stored_files(), 0);
}

/// `regcache serve` as a process with this environment (besides a clean one), on a free port.
struct Served {
    child: Child,
    port: u16,
    _data: tempfile::TempDir,
}

impl Served {
    async fn start(upstream: &str, env: &[(&str, &str)]) -> Served {
        let data = tempfile::tempdir().unwrap();
        let port = common::free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_regcache"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("REGCACHE_LISTEN", format!("127.0.0.1:{port}"))
            .env("REGCACHE_DATA_DIR", data.path())
            .env("REGCACHE_UPSTREAMS__DOCKER_IO__URLS", upstream)
            .env("REGCACHE_LOG__LEVEL", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        common::wait_http(&format!("http://127.0.0.1:{port}/v2/"), "regcache").await;
        Served {
            child,
            port,
            _data: data,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_proxy_is_used_unless_no_proxy_names_the_host() {
    let registry = Registry::start().await;
    let meter = Meter::start(registry.addr).await;
    let proxy = Tinyproxy::start().await;
    let (one, two) = (Image::simple(810, 1), Image::simple(811, 1));
    registry.push("library/envproxy", "1", &one).await;
    registry.push("library/envproxy", "2", &two).await;
    let target = meter.url().trim_start_matches("http://").to_owned();
    let proxy_url = proxy.url(PROXY_PASSWORD);

    let via = Served::start(
        &meter.url(),
        &[("HTTPS_PROXY", &proxy_url), ("http_proxy", &proxy_url)],
    )
    .await;
    assert_eq!(
        common::pull(&via.url(), "envproxy", "1").await,
        one.digest()
    );
    let through = proxy.connects(&target);
    assert!(through >= 1, "http_proxy from the environment was used");
    drop(via);

    let direct = Served::start(
        &meter.url(),
        &[
            ("http_proxy", &proxy_url),
            ("NO_PROXY", "localhost,127.0.0.1"),
        ],
    )
    .await;
    assert_eq!(
        common::pull(&direct.url(), "envproxy", "2").await,
        two.digest()
    );
    assert_eq!(
        proxy.connects(&target),
        through,
        "NO_PROXY names the upstream: straight there"
    );
    assert!(meter.count("GET", "/v2/library/envproxy/manifests/2") >= 1);
}

/// A second `docker-registry` serving `plain`'s storage over TLS with `cert`/`key`.
struct TlsRegistry {
    child: Child,
    port: u16,
}

impl TlsRegistry {
    async fn start(plain: &Registry, cert: &Path, key: &Path) -> TlsRegistry {
        let bin = common::require("docker-registry", "docker-registry");
        let port = common::free_port();
        let cfg = plain.dir.path().join("tls.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {}\n    key: {}\n",
                plain.dir.path().join("data").display(),
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "TLS docker-registry did not listen"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        TlsRegistry { child, port }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_upstream_is_trusted_through_its_ca_or_by_explicit_insecure_opt_in_only() {
    let certs = tempfile::tempdir().unwrap();
    let authority = common::certs::Ca::new();
    let (ca, cert, key) = (
        certs.path().join("ca.crt"),
        certs.path().join("server.crt"),
        certs.path().join("server.key"),
    );
    std::fs::write(&ca, authority.pem()).unwrap();
    authority.leaf("127.0.0.1", 1).install(&cert, &key);
    let plain = Registry::start().await;
    let img = Image::simple(820, 2);
    plain.push("library/tlsup", "1", &img).await;
    let tls = TlsRegistry::start(&plain, &cert, &key).await;
    let proxy = Tinyproxy::start().await;

    // Not trusted: a clear upstream error, nothing cached.
    let untrusted = Regcache::start(&tls.url(), |_| {}).await;
    let resp = common::get_manifest(&untrusted.url(), "tlsup", "1").await;
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap();
    assert_eq!(status, 502, "{body}");
    assert!(
        body.to_ascii_lowercase().contains("certificate"),
        "the error says why: {body}"
    );
    assert_eq!(untrusted.stored_files(), 0);
    drop(untrusted);

    // The gateway's CA in `ca_file`, through the CONNECT proxy: TLS end to end, right bytes.
    let trusted = Regcache::start(&tls.url(), |c| {
        let u = c.upstreams.get_mut("docker.io").unwrap();
        u.ca_file = Some(ca.clone());
        u.proxy = Some(proxy.url(PROXY_PASSWORD).as_str().into());
    })
    .await;
    assert_eq!(
        common::pull(&trusted.url(), "tlsup", "1").await,
        img.digest()
    );
    assert!(proxy.connects(&format!("127.0.0.1:{}", tls.port)) >= 1);
    for blob in img.blobs() {
        let digest = image::sha256(&blob);
        assert_eq!(
            common::get_blob(&trusted.url(), "tlsup", &digest).await,
            blob
        );
    }
    drop(trusted);

    // `insecure = true`: no CA given, certificate not checked (only when asked for).
    let insecure = Regcache::start(&tls.url(), |c| {
        c.upstreams.get_mut("docker.io").unwrap().insecure = true;
    })
    .await;
    assert_eq!(
        common::pull(&insecure.url(), "tlsup", "1").await,
        img.digest()
    );
}

#[test]
fn a_proxy_must_be_an_http_url_or_none() {
    for (value, ok) in [
        ("http://user:pw@proxy.corp:3128", true),
        ("none", true),
        ("socks5://proxy.corp:1080", false),
        ("proxy.corp:3128", false),
    ] {
        let text = format!(
            "[upstreams.\"docker.io\"]\nurls = [\"https://registry-1.docker.io\"]\nproxy = \"{value}\"\n"
        );
        let result = regcache::Config::parse(&text, Path::new("t.toml"));
        assert_eq!(result.is_ok(), ok, "{value}: {result:?}");
        if let Err(e) = result {
            let e = e.to_string();
            assert!(e.contains("upstreams.\"docker.io\".proxy"), "{e}");
        }
    }
}
