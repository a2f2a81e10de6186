//! Real clients for the end-to-end tests: skopeo, podman, the Docker daemon and containerd's
//! `ctr`, each with a private HOME, config and state in a temp dir (so the machine's client
//! configuration does not matter), plus the client configuration snippets users copy from
//! `deploy/clients/` and a refusing HTTP proxy that stands in for the public internet.
//!
//! Invariant: nothing here reaches a public registry. Clients are pointed at regcache (on
//! loopback) through the shipped snippets; where a client would fall back to Docker Hub, its
//! proxy is [`RefusingProxy`], which records the target and answers 403.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Command;

use super::image;
use super::{Meter, Regcache, Registry, require as common_require};

pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Longest any single client command may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// The usual test stack: a real upstream behind a meter, and regcache in front of it as the
/// Docker Hub (`docker.io`) upstream.
pub struct Setup {
    pub registry: Registry,
    pub meter: Meter,
    pub cache: Regcache,
}

pub async fn setup(tweak: impl FnOnce(&mut regcache::Config)) -> Setup {
    let registry = Registry::start().await;
    let meter = Meter::start(registry.addr).await;
    let cache = Regcache::start(&meter.url(), tweak).await;
    Setup {
        registry,
        meter,
        cache,
    }
}

/// One regcache in front of two upstreams, Docker Hub's and ghcr.io's, each a real registry
/// of its own behind its own meter (the same names pushed to both would hide a wrong route,
/// so each holds only its own images).
pub struct TwoUpstreams {
    pub hub: Registry,
    pub hub_meter: Meter,
    pub ghcr: Registry,
    pub ghcr_meter: Meter,
    pub cache: Regcache,
}

pub async fn two_upstreams() -> TwoUpstreams {
    let hub = Registry::start().await;
    let hub_meter = Meter::start(hub.addr).await;
    let ghcr = Registry::start().await;
    let ghcr_meter = Meter::start(ghcr.addr).await;
    let ghcr_url = ghcr_meter.url();
    let cache = Regcache::start(&hub_meter.url(), |c| {
        c.upstreams.insert(
            "ghcr.io".to_owned(),
            regcache::config::UpstreamConfig::with_url(&ghcr_url),
        );
    })
    .await;
    TwoUpstreams {
        hub,
        hub_meter,
        ghcr,
        ghcr_meter,
        cache,
    }
}

/// A private Docker Hub: a real registry that trusts a token server, behind a meter, and
/// regcache in front of it as the `docker.io` upstream with `pass_client_auth`, so each
/// client pulls with its own Docker Hub login. Only [`PrivateHub::ALICE`] may pull
/// `private/*`.
pub struct PrivateHub {
    pub tokens: super::token::TokenServer,
    pub registry: Registry,
    pub meter: Meter,
    pub cache: Regcache,
}

impl PrivateHub {
    pub const ALICE: (&str, &str) = ("alice", "alice-secret");

    pub async fn start() -> PrivateHub {
        let tokens = super::token::TokenServer::start().await;
        tokens.user(Self::ALICE.0, Self::ALICE.1);
        tokens.allow(Some(Self::ALICE.0), "private", &["pull"]);
        let registry = Registry::start_with(&tokens.registry_yaml()).await;
        let meter = Meter::start(registry.addr).await;
        let cache = Regcache::start(&meter.url(), |c| {
            let hub = c
                .upstreams
                .get_mut("docker.io")
                .expect("docker.io upstream");
            hub.pass_client_auth = true;
        })
        .await;
        PrivateHub {
            tokens,
            registry,
            meter,
            cache,
        }
    }

    /// Pushes `image` as `repo:tag` (as the token server's admin); the meter starts afresh.
    pub async fn push(&self, repo: &str, tag: &str, image: &super::Image) {
        self.tokens.push(&self.registry, repo, tag, image).await;
        self.meter.reset();
    }

    /// Checks how a client with alice's login pulled `repo`: through the mirror (`proxy`, its
    /// way past loopback, saw nothing), with a token it got with alice's login, and that token
    /// (the client's own: regcache has no credentials here) on every upstream GET for `repo`.
    pub fn check_pulled_with_alices_login(&self, repo: &str, proxy: &RefusingProxy) {
        assert_eq!(proxy.seen(), vec![], "pulled around the mirror");
        assert!(
            !self.tokens.requests_by(Some(Self::ALICE.0)).is_empty(),
            "the client got no token with alice's login"
        );
        let seen = self.meter.requests();
        let ours: Vec<_> = seen
            .iter()
            .filter(|s| s.path.starts_with(&format!("/v2/{repo}/")))
            .collect();
        assert!(
            ours.iter().any(|s| s.method == "GET"),
            "nothing of {repo} was fetched upstream"
        );
        // A client may first ask without credentials (containerd does, and answers the 401);
        // what is fetched is fetched with its token.
        for s in ours {
            let a = s.authorization.as_deref().unwrap_or("");
            assert!(
                a.starts_with("Bearer ") || (a.is_empty() && s.method == "HEAD"),
                "{} {} went upstream with {a:?}",
                s.method,
                s.path
            );
        }
    }
}

/// A temp dir with a short path: unix socket paths are limited to 108 bytes.
pub fn short_tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap()
}

/// Runs a command to completion (bounded by [`COMMAND_TIMEOUT`]) and returns its stdout;
/// panics with its stderr when it fails.
pub async fn run(cmd: &mut Command, what: &str) -> Vec<u8> {
    let out = try_run(cmd, what).await;
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub async fn try_run(cmd: &mut Command, what: &str) -> std::process::Output {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    match tokio::time::timeout(COMMAND_TIMEOUT, cmd.output()).await {
        Err(_) => panic!("{what} did not finish within {COMMAND_TIMEOUT:?}"),
        Ok(Err(e)) => panic!("{what}: cannot run: {e}"),
        Ok(Ok(out)) => out,
    }
}

pub fn text(b: Vec<u8>) -> String {
    String::from_utf8(b).unwrap().trim().to_owned()
}

/// Panics unless the test runs as root (the Docker daemon and containerd need it).
pub fn require_root(what: &str) {
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    assert_eq!(
        uid, 0,
        "{what} must run as root (it starts a private daemon); run the tests as root"
    );
}

/// Whether regcache asked upstream for `path` at all (GET or HEAD).
pub fn asked(meter: &Meter, path: &str) -> bool {
    meter.count("GET", path) + meter.count("HEAD", path) > 0
}

/// `sha256:<hex>` of a file.
pub fn file_digest(path: &Path) -> String {
    image::sha256(&std::fs::read(path).unwrap())
}

/// The last lines of a log file, for failure messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------------------

/// skopeo with a private HOME, registries.conf, policy and temp dir: nothing from the host's
/// container configuration applies.
pub struct Skopeo {
    bin: PathBuf,
    dir: tempfile::TempDir,
}

impl Skopeo {
    pub fn new() -> Skopeo {
        let bin = common_require("skopeo", "skopeo");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["home", "run", "tmp", "registries.d"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::fs::write(
            d.join("policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .unwrap();
        std::fs::write(d.join("registries.conf"), "").unwrap();
        Skopeo { bin, dir }
    }

    pub fn cmd(&self) -> Command {
        let d = self.dir.path();
        let mut c = Command::new(&self.bin);
        c.env_clear()
            .env("PATH", PATH)
            .env("HOME", d.join("home"))
            .env("XDG_RUNTIME_DIR", d.join("run"))
            .env("XDG_CONFIG_HOME", d.join("home/.config"))
            .env("REGISTRY_AUTH_FILE", d.join("auth.json"))
            // skopeo 1.9 has no CONTAINERS_REGISTRIES_CONF; this (hidden) flag replaces
            // /etc/containers/registries.conf. (Drop-ins in registries.conf.d still load, but
            // they only hold short-name aliases, and every reference here is fully qualified.)
            .arg("--registries-conf")
            .arg(d.join("registries.conf"))
            .arg("--policy")
            .arg(d.join("policy.json"))
            .arg("--registries.d")
            .arg(d.join("registries.d"))
            .arg("--tmpdir")
            .arg(d.join("tmp"));
        c
    }

    /// `skopeo copy [extra] docker://<src> <dest>`, source over plain HTTP.
    pub async fn copy(&self, src: &str, dest: &str, extra: &[&str]) {
        let mut c = self.cmd();
        c.arg("copy")
            .arg("--src-tls-verify=false")
            .args(extra)
            .arg(format!("docker://{src}"))
            .arg(dest);
        run(&mut c, &format!("skopeo copy {src} {dest}")).await;
    }

    /// `skopeo [global] inspect docker://<reference>` over plain HTTP, parsed.
    pub async fn inspect(&self, reference: &str, global: &[&str]) -> serde_json::Value {
        let mut c = self.cmd();
        c.args(global)
            .arg("inspect")
            .arg("--tls-verify=false")
            .arg(format!("docker://{reference}"));
        let out = run(&mut c, &format!("skopeo inspect {reference}")).await;
        serde_json::from_slice(&out).unwrap()
    }

    pub fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }
}

/// Checks an OCI layout written by skopeo: `index.json` names `digest` for `tag`, and every
/// blob below it is present with bytes matching its digest. Returns the manifest bytes.
pub fn check_oci_layout(layout: &Path, tag: &str, digest: &str) -> Vec<u8> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no {tag:?} in index.json: {index}"));
    assert_eq!(
        entry["digest"], digest,
        "index.json names the pushed digest"
    );
    check_oci_blob(layout, digest)
}

/// A blob of an OCI layout (and, for manifests and indexes, everything they reference).
pub fn check_oci_blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap();
    let path = layout.join("blobs/sha256").join(hex);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        image::sha256(&bytes),
        digest,
        "{} is intact",
        path.display()
    );
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
        if let Some(children) = v["manifests"].as_array() {
            for c in children {
                check_oci_blob(layout, c["digest"].as_str().unwrap());
            }
        }
        // A manifest (an image config has a `config` object too, but no digest in it).
        if let Some(config) = v["config"]["digest"].as_str() {
            check_oci_blob(layout, config);
            for l in v["layers"].as_array().unwrap() {
                check_oci_blob(layout, l["digest"].as_str().unwrap());
            }
        }
    }
    bytes
}

// ---------------------------------------------------------------------------------------
// The Docker daemon
// ---------------------------------------------------------------------------------------

/// A private `dockerd` (with the containerd it starts itself) on a socket in a temp dir, with
/// regcache as its only registry mirror. Stopped (SIGTERM, then SIGKILL) on drop.
pub struct Dockerd {
    child: Child,
    dir: tempfile::TempDir,
    client: PathBuf,
}

impl Dockerd {
    /// Starts with `deploy/clients/daemon.json`, regcache's address (`host:port`) put in.
    pub async fn start(regcache: &str) -> Dockerd {
        Self::start_with(regcache, &[]).await
    }

    /// [`Dockerd::start`] with extra environment for the daemon (e.g. `HTTPS_PROXY`). The
    /// daemon logs at debug level, so its log shows each endpoint it tries.
    pub async fn start_with(regcache: &str, env: &[(&str, &str)]) -> Dockerd {
        Self::start_config(&snippet("daemon.json", regcache), env).await
    }

    /// A daemon with this `daemon.json` text (e.g. regcache as an insecure registry rather
    /// than a mirror).
    pub async fn start_config(daemon_json: &str, env: &[(&str, &str)]) -> Dockerd {
        require_root("the Docker daemon test");
        let bin = common_require("dockerd", "docker.io");
        let client = common_require("docker", "docker.io");
        common_require("containerd", "containerd");
        common_require("runc", "runc");
        let dir = short_tempdir("rcd");
        let d = dir.path();
        std::fs::write(d.join("daemon.json"), daemon_json).unwrap();
        std::fs::create_dir_all(d.join("cli")).unwrap();
        std::fs::write(d.join("cli/config.json"), "{}").unwrap();
        let log = std::fs::File::create(d.join("dockerd.log")).unwrap();
        let child = std::process::Command::new(&bin)
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", d)
            .envs(env.iter().copied())
            .arg(format!("--host=unix://{}", d.join("d.sock").display()))
            .arg(format!("--data-root={}", d.join("root").display()))
            .arg(format!("--exec-root={}", d.join("exec").display()))
            .arg(format!("--pidfile={}", d.join("d.pid").display()))
            .arg(format!("--config-file={}", d.join("daemon.json").display()))
            .arg("--debug")
            .arg("--storage-driver=vfs")
            .arg("--bridge=none")
            .arg("--iptables=false")
            .arg("--ip6tables=false")
            .arg("--ip-masq=false")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut daemon = Dockerd { child, dir, client };
        daemon.wait_ready().await;
        daemon
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "dockerd exited ({status}) before it was ready; its log:\n{}",
                    log_tail(&self.dir.path().join("dockerd.log"), 40)
                );
            }
            let out = try_run(
                self.docker()
                    .args(["version", "--format", "{{.Server.Version}}"]),
                "docker version",
            )
            .await;
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not come up within 60s; its log:\n{}",
                log_tail(&self.dir.path().join("dockerd.log"), 40)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The Docker CLI talking to this daemon, with a private config dir.
    pub fn docker(&self) -> Command {
        let d = self.dir.path();
        let mut c = Command::new(&self.client);
        c.env_clear()
            .env("PATH", PATH)
            .env("HOME", d)
            .env("DOCKER_CONFIG", d.join("cli"))
            .arg(format!("--host=unix://{}", d.join("d.sock").display()));
        c
    }

    pub async fn run(&self, args: &[&str]) -> String {
        let what = format!("docker {}", args.join(" "));
        let out = try_run(self.docker().args(args), &what).await;
        assert!(
            out.status.success(),
            "{what} failed ({}):\nstdout: {}\nstderr: {}\ndockerd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            log_tail(&self.dir.path().join("dockerd.log"), 30)
        );
        text(out.stdout)
    }

    pub async fn inspect(&self, image: &str) -> serde_json::Value {
        let out = self.run(&["image", "inspect", image]).await;
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0].clone()
    }

    /// The CLI's stored login for `registry` (Docker Hub's key is
    /// `https://index.docker.io/v1/`), as `docker login` leaves it; the CLI sends it to the
    /// daemon with every pull of that registry's images.
    pub fn set_credentials(&self, registry: &str, (user, password): (&str, &str)) {
        std::fs::write(
            self.dir.path().join("cli/config.json"),
            auths(registry, user, password),
        )
        .unwrap();
    }
}

/// A Docker `config.json` holding one login.
fn auths(registry: &str, user: &str, password: &str) -> String {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    serde_json::json!({ "auths": { registry: { "auth": auth } } }).to_string()
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let d = self.dir.path().to_owned();
        // dockerd stops its own containerd on SIGTERM.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // If dockerd had to be killed, its containerd is still running.
        kill_pidfile(&d.join("exec/containerd/containerd.pid"));
        unmount_below(&d);
    }
}

/// SIGKILLs the process a pid file names, if it is still there.
pub fn kill_pidfile(path: &Path) {
    if let Ok(pid) = std::fs::read_to_string(path) {
        let pid = pid.trim();
        if !pid.is_empty() && Path::new("/proc").join(pid).exists() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", pid])
                .status();
        }
    }
}

/// Lazily unmounts anything a daemon left mounted below `dir` (deepest first), so the temp
/// dir can be removed.
pub fn unmount_below(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = std::process::Command::new("umount")
            .args(["-l", p])
            .status();
    }
}

/// The bytes of one file in a container, via `docker cp` (which streams a tar).
pub async fn container_file(docker: &Dockerd, container: &str, path: &str) -> Vec<u8> {
    let tar = run(
        docker
            .docker()
            .args(["cp", &format!("{container}:{path}"), "-"]),
        "docker cp",
    )
    .await;
    let mut archive = tar::Archive::new(&tar[..]);
    let mut entry = archive.entries().unwrap().next().unwrap().unwrap();
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut entry, &mut out).unwrap();
    out
}

// ---------------------------------------------------------------------------------------
// containerd (`ctr`)
// ---------------------------------------------------------------------------------------

/// A private `containerd` (CRI disabled) on sockets in a temp dir, stopped on drop.
pub struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
    ctr: PathBuf,
}

impl Containerd {
    pub async fn start() -> Containerd {
        require_root("the containerd test");
        let bin = common_require("containerd", "containerd");
        let ctr = common_require("ctr", "containerd");
        let dir = short_tempdir("rcc");
        let d = dir.path();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/c.sock"
[ttrpc]
  address = "{d}/t.sock"
[debug]
  address = ""
"#,
            d = d.display()
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let child = std::process::Command::new(&bin)
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", d)
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut daemon = Containerd { child, dir, ctr };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                panic!(
                    "containerd exited ({status}) before it was ready; its log:\n{}",
                    log_tail(&daemon.dir.path().join("containerd.log"), 40)
                );
            }
            if try_run(daemon.cmd().arg("version"), "ctr version")
                .await
                .status
                .success()
            {
                return daemon;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not come up within 30s; its log:\n{}",
                log_tail(&daemon.dir.path().join("containerd.log"), 40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn cmd(&self) -> Command {
        let d = self.dir.path();
        let mut c = Command::new(&self.ctr);
        c.env_clear()
            .env("PATH", PATH)
            .env("HOME", d)
            .arg("--address")
            .arg(d.join("c.sock"));
        c
    }

    pub async fn run(&self, args: &[&str]) -> String {
        let what = format!("ctr {}", args.join(" "));
        let out = try_run(self.cmd().args(args), &what).await;
        assert!(
            out.status.success(),
            "{what} failed ({}):\nstdout: {}\nstderr: {}\ncontainerd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            log_tail(&self.dir.path().join("containerd.log"), 30)
        );
        text(out.stdout)
    }

    /// `certs.d/docker.io/hosts.toml` and `certs.d/ghcr.io/hosts.toml` from
    /// `deploy/clients/containerd/`, regcache's address (`host:port`) put in; returns the
    /// hosts dir for `--hosts-dir`.
    pub fn hosts(&self, regcache: &str) -> PathBuf {
        let hosts = self.dir.path().join("certs.d");
        for registry in ["docker.io", "ghcr.io"] {
            std::fs::create_dir_all(hosts.join(registry)).unwrap();
            std::fs::write(
                hosts.join(registry).join("hosts.toml"),
                snippet(&format!("containerd/{registry}/hosts.toml"), regcache),
            )
            .unwrap();
        }
        hosts
    }

    /// Pulls (and unpacks, which checks every layer against the config's diff_ids).
    pub async fn pull(&self, hosts: &Path, reference: &str, extra: &[&str]) {
        let hosts = hosts.to_string_lossy();
        let mut args = vec![
            "images",
            "pull",
            "--hosts-dir",
            &hosts,
            "--snapshotter",
            "native",
        ];
        args.extend_from_slice(extra);
        args.push(reference);
        self.run(&args).await;
    }

    /// The digest `ctr images ls` shows for a reference.
    pub async fn image_digest(&self, reference: &str) -> String {
        let out = self.run(&["images", "ls"]).await;
        out.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cols| cols.first() == Some(&reference))
            .unwrap_or_else(|| panic!("{reference} not in `ctr images ls`:\n{out}"))[2]
            .to_owned()
    }

    /// Removes an image and garbage-collects its content, so the next pull fetches again.
    pub async fn remove(&self, reference: &str) {
        self.run(&["images", "rm", "--sync", reference]).await;
        let left = self.run(&["content", "ls", "-q"]).await;
        assert!(left.is_empty(), "content left after rm --sync: {left}");
    }

    pub async fn content(&self, digest: &str) -> Vec<u8> {
        run(
            self.cmd().args(["content", "get", digest]),
            "ctr content get",
        )
        .await
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        unmount_below(self.dir.path());
    }
}

// ---------------------------------------------------------------------------------------
// Client configuration snippets
// ---------------------------------------------------------------------------------------

/// The address the snippets in `deploy/clients/` use for regcache.
pub const PLACEHOLDER: &str = "regcache.example.com:5000";

/// A snippet from `deploy/clients/` (the literal file users copy) with regcache's address
/// (`host:port`) in place of [`PLACEHOLDER`].
pub fn snippet(name: &str, regcache: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/clients")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("snippet {}: {e}", path.display()));
    assert!(
        text.contains(PLACEHOLDER),
        "{} does not name regcache as {PLACEHOLDER}",
        path.display()
    );
    text.replace(PLACEHOLDER, regcache)
}

// ---------------------------------------------------------------------------------------
// A proxy that stands in for the internet
// ---------------------------------------------------------------------------------------

/// An HTTP proxy on loopback that records each request line (`CONNECT host:443 HTTP/1.1`,
/// or `GET http://... HTTP/1.1`) and refuses it with 403: a client given it as
/// `HTTPS_PROXY`/`HTTP_PROXY` shows where it would have gone, and gets nowhere.
pub struct RefusingProxy {
    pub addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<(String, usize)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RefusingProxy {
    /// `probe` is called as each request arrives; its value is kept with the request (e.g.
    /// how many requests the meter had seen by then, to order the two).
    pub async fn start(probe: impl Fn() -> usize + Send + Sync + 'static) -> RefusingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
        let probe = Arc::new(probe);
        let seen2 = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let (seen, probe) = (Arc::clone(&seen2), Arc::clone(&probe));
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    let read = async {
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
                    let line = String::from_utf8_lossy(&head)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_owned();
                    seen.lock().unwrap().push((line, probe()));
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        )
                        .await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        RefusingProxy { addr, seen, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Environment sending every connection but loopback's through this proxy.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let url = self.url();
        vec![
            ("HTTPS_PROXY", url.clone()),
            ("HTTP_PROXY", url.clone()),
            ("https_proxy", url.clone()),
            ("http_proxy", url),
            ("NO_PROXY", "127.0.0.1,localhost".to_owned()),
            ("no_proxy", "127.0.0.1,localhost".to_owned()),
        ]
    }

    /// Request lines so far, each with the probe's value when it arrived.
    pub fn seen(&self) -> Vec<(String, usize)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for RefusingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------
// podman
// ---------------------------------------------------------------------------------------

/// podman as root with private everything: storage root and run root (vfs), libpod tmp dir,
/// containers.conf, storage.conf, HOME and XDG dirs, auth file, signature policy, and
/// `deploy/clients/registries.conf` (regcache's address put in) as its only registries.conf.
pub struct Podman {
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// Sends connections past loopback to a [`RefusingProxy`], if set.
    proxy_env: Vec<(&'static str, String)>,
}

impl Podman {
    pub fn new(regcache: &str) -> Podman {
        require_root("the podman test");
        let bin = common_require("podman", "podman");
        let dir = short_tempdir("rcp");
        let d = dir.path();
        for sub in [
            "home/.config",
            "home/.local/share",
            "home/.cache",
            "xdg-run",
            "root",
            "runroot",
            "tmp",
            "volumes",
            "networks",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::fs::write(
            d.join("registries.conf"),
            snippet("registries.conf", regcache),
        )
        .unwrap();
        std::fs::write(
            d.join("policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .unwrap();
        // podman stats REGISTRY_AUTH_FILE, so it must exist.
        std::fs::write(d.join("auth.json"), "{}").unwrap();
        std::fs::write(
            d.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                d.join("root").display(),
                d.join("runroot").display()
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("containers.conf"),
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .unwrap();
        Podman {
            bin,
            dir,
            proxy_env: Vec::new(),
        }
    }

    /// Sends every connection but loopback's through `proxy`, so a fallback from the mirror to
    /// Docker Hub is refused and recorded there rather than tried.
    pub fn through(mut self, proxy: &RefusingProxy) -> Podman {
        self.proxy_env = proxy.env();
        self
    }

    pub fn cmd(&self) -> Command {
        let d = self.dir.path();
        let mut c = Command::new(&self.bin);
        c.env_clear()
            .env("PATH", PATH)
            .env("HOME", d.join("home"))
            .env("XDG_RUNTIME_DIR", d.join("xdg-run"))
            .env("XDG_CONFIG_HOME", d.join("home/.config"))
            .env("XDG_DATA_HOME", d.join("home/.local/share"))
            .env("XDG_CACHE_HOME", d.join("home/.cache"))
            .env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"))
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("REGISTRY_AUTH_FILE", d.join("auth.json"))
            .envs(self.proxy_env.iter().map(|(k, v)| (k, v)))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .arg("--volumepath")
            .arg(d.join("volumes"))
            .arg("--network-config-dir")
            .arg(d.join("networks"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ]);
        c
    }

    pub async fn run(&self, args: &[&str]) -> String {
        let what = format!("podman {}", args.join(" "));
        text(run(self.cmd().args(args), &what).await)
    }

    /// `podman pull [extra] <reference>` under the private signature policy.
    pub async fn pull(&self, reference: &str, extra: &[&str]) -> String {
        let policy = self.dir.path().join("policy.json");
        let policy = policy.to_string_lossy();
        let mut args = vec!["pull", "--signature-policy", &policy];
        args.extend_from_slice(extra);
        args.push(reference);
        self.run(&args).await
    }

    pub async fn inspect(&self, image: &str) -> serde_json::Value {
        let out = self.run(&["image", "inspect", image]).await;
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0].clone()
    }

    /// The manifest podman stored for an image (by image ID), found by its digest among the
    /// image's big-data files.
    pub fn stored_manifest(&self, id: &str, digest: &str) -> Vec<u8> {
        let dir = self.dir.path().join("root/vfs-images").join(id);
        std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(Result::ok)
            .filter_map(|e| std::fs::read(e.path()).ok())
            .find(|b| image::sha256(b) == digest)
            .unwrap_or_else(|| panic!("no manifest {digest} stored under {}", dir.display()))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        unmount_below(self.dir.path());
    }
}
