//! End to end: real clients (skopeo, the Docker daemon, containerd's `ctr`) pull through
//! regcache from a real upstream (Debian's `docker-registry`) behind a meter. Each test checks
//! that the client got exactly the digests that were pushed upstream, and that a second pull
//! costs upstream nothing.
//!
//! Nothing here talks to a public registry: Docker and containerd are pointed at regcache as a
//! mirror, and every client runs with a private HOME, config and daemon state in a temp dir, so
//! the machine's client configuration does not matter. (As root, skopeo still keeps its blob
//! info cache in /var/lib/containers/cache; there is no flag to move it.)

mod common;

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::image::{self, DOCKER_LIST, DOCKER_V2, OCI_INDEX, OCI_MANIFEST};
use common::{Image, Layer, Meter, Regcache, Registry};
use tokio::process::Command;

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Longest any single client command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

struct Setup {
    registry: Registry,
    meter: Meter,
    cache: Regcache,
}

async fn setup(tweak: impl FnOnce(&mut regcache::Config)) -> Setup {
    let registry = Registry::start().await;
    let meter = Meter::start(registry.addr).await;
    let cache = Regcache::start(&meter.url(), tweak).await;
    Setup {
        registry,
        meter,
        cache,
    }
}

/// A temp dir with a short path: unix socket paths are limited to 108 bytes.
fn short_tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap()
}

/// Runs a command to completion (bounded by [`COMMAND_TIMEOUT`]) and returns its stdout;
/// panics with its stderr when it fails.
async fn run(cmd: &mut Command, what: &str) -> Vec<u8> {
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

async fn try_run(cmd: &mut Command, what: &str) -> std::process::Output {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    match tokio::time::timeout(COMMAND_TIMEOUT, cmd.output()).await {
        Err(_) => panic!("{what} did not finish within {COMMAND_TIMEOUT:?}"),
        Ok(Err(e)) => panic!("{what}: cannot run: {e}"),
        Ok(Ok(out)) => out,
    }
}

fn text(b: Vec<u8>) -> String {
    String::from_utf8(b).unwrap().trim().to_owned()
}

/// Panics unless the test runs as root (the Docker daemon and containerd need it).
fn require_root(what: &str) {
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    assert_eq!(
        uid, 0,
        "{what} must run as root (it starts a private daemon); run the tests as root"
    );
}

/// Whether regcache asked upstream for `path` at all (GET or HEAD).
fn asked(meter: &Meter, path: &str) -> bool {
    meter.count("GET", path) + meter.count("HEAD", path) > 0
}

/// `sha256:<hex>` of a file.
fn file_digest(path: &Path) -> String {
    image::sha256(&std::fs::read(path).unwrap())
}

/// The last lines of a log file, for failure messages.
fn log_tail(path: &Path, lines: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------------------

/// skopeo with a private HOME, registries.conf, policy and temp dir: nothing from the host's
/// container configuration applies.
struct Skopeo {
    bin: PathBuf,
    dir: tempfile::TempDir,
}

impl Skopeo {
    fn new() -> Skopeo {
        let bin = common::require("skopeo", "skopeo");
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

    fn cmd(&self) -> Command {
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
    async fn copy(&self, src: &str, dest: &str, extra: &[&str]) {
        let mut c = self.cmd();
        c.arg("copy")
            .arg("--src-tls-verify=false")
            .args(extra)
            .arg(format!("docker://{src}"))
            .arg(dest);
        run(&mut c, &format!("skopeo copy {src} {dest}")).await;
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }
}

/// Checks an OCI layout written by skopeo: `index.json` names `digest` for `tag`, and every
/// blob below it is present with bytes matching its digest. Returns the manifest bytes.
fn check_oci_layout(layout: &Path, tag: &str, digest: &str) -> Vec<u8> {
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
fn check_oci_blob(layout: &Path, digest: &str) -> Vec<u8> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_an_oci_image_byte_exact_and_the_second_copy_is_free() {
    let s = setup(|_| {}).await;
    let layers = (0..3).map(|i| Layer::new(300 + i, 50_000)).collect();
    let img = Image::new(OCI_MANIFEST, "amd64", layers);
    s.registry.push("skopeo/app", "1.0", &img).await;
    let skopeo = Skopeo::new();
    let src = format!("{}/skopeo/app:1.0", s.cache.addr);

    let first = skopeo.path("first");
    skopeo
        .copy(
            &src,
            &format!("oci:{}:1.0", first.display()),
            &["--preserve-digests"],
        )
        .await;
    let manifest = check_oci_layout(&first, "1.0", &img.digest());
    assert_eq!(manifest, img.manifest, "manifest byte-exact");
    assert_eq!(s.meter.blob_gets(), 4, "config + 3 layers, once each");

    s.meter.reset();
    let second = skopeo.path("second");
    skopeo
        .copy(
            &src,
            &format!("oci:{}:1.0", second.display()),
            &["--preserve-digests"],
        )
        .await;
    assert_eq!(
        check_oci_layout(&second, "1.0", &img.digest()),
        img.manifest
    );
    assert_eq!(s.meter.blob_gets(), 0, "second copy: no upstream blob GET");
    assert_eq!(
        s.meter.total(),
        0,
        "second copy within the tag TTL: nothing upstream at all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_through_the_docker_io_path_prefix_gets_the_docker_manifest_byte_exact() {
    let s = setup(|_| {}).await;
    let img = Image::simple(310, 2);
    s.registry.push("library/skprefix", "2", &img).await;
    let skopeo = Skopeo::new();

    // `/v2/docker.io/skprefix/...`: the prefix picks the docker.io upstream, and the one
    // component name there becomes `library/skprefix`.
    let dir = skopeo.path("dir");
    skopeo
        .copy(
            &format!("{}/docker.io/skprefix:2", s.cache.addr),
            &format!("dir:{}", dir.display()),
            &["--preserve-digests"],
        )
        .await;
    assert_eq!(
        std::fs::read(dir.join("manifest.json")).unwrap(),
        img.manifest,
        "dir: transport keeps the Docker schema2 manifest byte-exact"
    );
    for blob in img.blobs() {
        let digest = image::sha256(&blob);
        assert_eq!(
            file_digest(&dir.join(&digest[7..])),
            digest,
            "blob {digest} copied intact"
        );
    }
    assert!(
        asked(&s.meter, "/v2/library/skprefix/manifests/2"),
        "the docker.io/ prefix reached library/skprefix upstream"
    );
    assert_eq!(s.meter.blob_gets(), 3, "config + 2 layers");

    // `inspect --raw` and `list-tags` through the prefix as well.
    let raw = run(
        skopeo.cmd().args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{}/docker.io/skprefix:2", s.cache.addr),
        ]),
        "skopeo inspect --raw",
    )
    .await;
    assert_eq!(raw, img.manifest, "inspect --raw: byte-exact");
    let tags = run(
        skopeo.cmd().args([
            "list-tags",
            "--tls-verify=false",
            &format!("docker://{}/docker.io/skprefix", s.cache.addr),
        ]),
        "skopeo list-tags",
    )
    .await;
    let tags: serde_json::Value = serde_json::from_slice(&tags).unwrap();
    assert_eq!(tags["Tags"], serde_json::json!(["2"]));
    assert_eq!(s.meter.count("GET", "/v2/library/skprefix/tags/list"), 1);

    // The same upstream image under its other spellings costs upstream nothing.
    for spelling in ["skprefix", "library/skprefix", "docker.io/library/skprefix"] {
        s.meter.reset();
        let out = skopeo.path(&format!("again-{}", spelling.replace('/', "-")));
        skopeo
            .copy(
                &format!("{}/{spelling}:2", s.cache.addr),
                &format!("dir:{}", out.display()),
                &["--preserve-digests"],
            )
            .await;
        assert_eq!(
            std::fs::read(out.join("manifest.json")).unwrap(),
            img.manifest
        );
        assert_eq!(
            s.meter.blob_gets(),
            0,
            "{spelling}: no upstream blob GET once cached"
        );
        assert_eq!(s.meter.total(), 0, "{spelling}: nothing upstream at all");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_every_platform_of_an_index() {
    let s = setup(|_| {}).await;
    let amd = Image::new(OCI_MANIFEST, "amd64", vec![Layer::new(320, 20_000)]);
    let arm = Image::new(OCI_MANIFEST, "arm64", vec![Layer::new(321, 20_000)]);
    let index = Image::index(OCI_INDEX, vec![amd.clone(), arm.clone()]);
    s.registry.push("skopeo/multi", "v1", &index).await;
    let skopeo = Skopeo::new();
    let src = format!("{}/skopeo/multi:v1", s.cache.addr);

    let first = skopeo.path("first");
    skopeo
        .copy(
            &src,
            &format!("oci:{}:v1", first.display()),
            &["--all", "--preserve-digests"],
        )
        .await;
    assert_eq!(
        check_oci_layout(&first, "v1", &index.digest()),
        index.manifest
    );
    for child in [&amd, &arm] {
        assert_eq!(
            check_oci_blob(&first, &child.digest()),
            child.manifest,
            "platform manifest byte-exact"
        );
        assert_eq!(s.meter.count("GET", &child.digest()), 1);
    }
    assert_eq!(s.meter.blob_gets(), 4, "2 configs + 2 layers");

    s.meter.reset();
    let second = skopeo.path("second");
    skopeo
        .copy(
            &src,
            &format!("oci:{}:v1", second.display()),
            &["--all", "--preserve-digests"],
        )
        .await;
    assert_eq!(
        check_oci_layout(&second, "v1", &index.digest()),
        index.manifest
    );
    assert_eq!(s.meter.blob_gets(), 0, "second copy: no upstream blob GET");
    assert_eq!(s.meter.total(), 0, "second copy: nothing upstream at all");
}

// ---------------------------------------------------------------------------------------
// The Docker daemon
// ---------------------------------------------------------------------------------------

/// A private `dockerd` (with the containerd it starts itself) on a socket in a temp dir, with
/// regcache as its only registry mirror. Stopped (SIGTERM, then SIGKILL) on drop.
struct Dockerd {
    child: Child,
    dir: tempfile::TempDir,
    client: PathBuf,
}

impl Dockerd {
    async fn start(mirror: &str) -> Dockerd {
        require_root("the Docker daemon test");
        let bin = common::require("dockerd", "docker.io");
        let client = common::require("docker", "docker.io");
        common::require("containerd", "containerd");
        common::require("runc", "runc");
        let dir = short_tempdir("rcd");
        let d = dir.path();
        std::fs::write(d.join("daemon.json"), "{}").unwrap();
        std::fs::create_dir_all(d.join("cli")).unwrap();
        std::fs::write(d.join("cli/config.json"), "{}").unwrap();
        let log = std::fs::File::create(d.join("dockerd.log")).unwrap();
        let child = std::process::Command::new(&bin)
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", d)
            .arg(format!("--host=unix://{}", d.join("d.sock").display()))
            .arg(format!("--data-root={}", d.join("root").display()))
            .arg(format!("--exec-root={}", d.join("exec").display()))
            .arg(format!("--pidfile={}", d.join("d.pid").display()))
            .arg(format!("--config-file={}", d.join("daemon.json").display()))
            .arg("--storage-driver=vfs")
            .arg("--bridge=none")
            .arg("--iptables=false")
            .arg("--ip6tables=false")
            .arg("--ip-masq=false")
            .arg(format!("--registry-mirror={mirror}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut daemon = Dockerd { child, dir, client };
        daemon.wait_ready().await;
        daemon
    }

    async fn wait_ready(&mut self) {
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
    fn docker(&self) -> Command {
        let d = self.dir.path();
        let mut c = Command::new(&self.client);
        c.env_clear()
            .env("PATH", PATH)
            .env("HOME", d)
            .env("DOCKER_CONFIG", d.join("cli"))
            .arg(format!("--host=unix://{}", d.join("d.sock").display()));
        c
    }

    async fn run(&self, args: &[&str]) -> String {
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

    async fn inspect(&self, image: &str) -> serde_json::Value {
        let out = self.run(&["image", "inspect", image]).await;
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0].clone()
    }
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
fn kill_pidfile(path: &Path) {
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
fn unmount_below(dir: &Path) {
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
async fn container_file(docker: &Dockerd, container: &str, path: &str) -> Vec<u8> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_pulls_through_the_registry_mirror_and_the_second_pull_is_free() {
    let s = setup(|_| {}).await;
    let img = Image::simple(400, 2);
    s.registry.push("library/rcdocker", "1", &img).await;
    let docker = Dockerd::start(&s.cache.url()).await;
    let config_digest = image::sha256(&img.config);

    let t = Instant::now();
    docker.run(&["pull", "rcdocker:1"]).await;
    eprintln!("first docker pull: {:?}", t.elapsed());
    let inspect = docker.inspect("rcdocker:1").await;
    assert_eq!(
        inspect["Id"],
        config_digest.as_str(),
        "image ID is the config digest"
    );
    let repo_digests: Vec<String> = serde_json::from_value(inspect["RepoDigests"].clone()).unwrap();
    assert!(
        repo_digests
            .iter()
            .any(|d| d.ends_with(&format!("@{}", img.digest()))),
        "RepoDigests {repo_digests:?} name the pushed manifest {}",
        img.digest()
    );
    let diff_ids: Vec<String> =
        serde_json::from_value(inspect["RootFS"]["Layers"].clone()).unwrap();
    let want: Vec<String> = img.layers.iter().map(|l| l.diff_id.clone()).collect();
    assert_eq!(diff_ids, want, "layers unpacked to the pushed diff_ids");
    assert!(
        asked(&s.meter, "/v2/library/rcdocker/manifests/1"),
        "the daemon's pull went through the mirror"
    );
    assert_eq!(s.meter.blob_gets(), 3, "config + 2 layers, once each");

    // The unpacked files are the pushed bytes.
    let container = docker
        .run(&["create", "--network=none", "rcdocker:1", "/nothing"])
        .await;
    for (i, layer) in img.layers.iter().enumerate() {
        let seed = 400 * 100 + i as u64;
        let got = container_file(&docker, &container, &format!("/layer-{seed}.bin")).await;
        assert_eq!(
            got,
            image::noise(seed, 4096 + i * 1000),
            "{}",
            layer.digest()
        );
    }
    docker.run(&["rm", &container]).await;

    // Remove the image from the daemon and pull again: regcache serves it all.
    docker.run(&["rmi", "rcdocker:1"]).await;
    s.meter.reset();
    let t = Instant::now();
    docker.run(&["pull", "rcdocker:1"]).await;
    eprintln!("second docker pull: {:?}", t.elapsed());
    assert_eq!(
        docker.inspect("rcdocker:1").await["Id"],
        config_digest.as_str()
    );
    assert_eq!(s.meter.blob_gets(), 0, "second pull: no upstream blob GET");
    assert_eq!(s.meter.total(), 0, "second pull: nothing upstream at all");

    // By digest too (Docker asks the mirror for the manifest by digest).
    docker.run(&["rmi", "rcdocker:1"]).await;
    let by_digest = format!("rcdocker@{}", img.digest());
    docker.run(&["pull", &by_digest]).await;
    assert_eq!(
        docker.inspect(&by_digest).await["Id"],
        config_digest.as_str()
    );
    assert_eq!(s.meter.total(), 0, "pull by digest: nothing upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_pulls_its_platform_from_a_manifest_list_through_the_mirror() {
    let s = setup(|_| {}).await;
    let amd = Image::new(DOCKER_V2, "amd64", vec![Layer::new(410, 30_000)]);
    let arm = Image::new(DOCKER_V2, "arm64", vec![Layer::new(411, 30_000)]);
    let list = Image::index(DOCKER_LIST, vec![amd.clone(), arm.clone()]);
    s.registry.push("team/rcmulti", "latest", &list).await;
    let docker = Dockerd::start(&s.cache.url()).await;

    docker.run(&["pull", "team/rcmulti"]).await;
    let inspect = docker.inspect("team/rcmulti:latest").await;
    assert_eq!(
        inspect["Id"],
        image::sha256(&amd.config).as_str(),
        "the amd64 image"
    );
    let repo_digests: Vec<String> = serde_json::from_value(inspect["RepoDigests"].clone()).unwrap();
    assert!(
        repo_digests
            .iter()
            .any(|d| d.ends_with(&format!("@{}", list.digest()))),
        "RepoDigests {repo_digests:?} name the pushed list {}",
        list.digest()
    );
    assert_eq!(s.meter.count("GET", &amd.digest()), 1);
    assert_eq!(
        s.meter.count("GET", &arm.digest()),
        0,
        "the arm64 manifest is never fetched"
    );
    assert_eq!(s.meter.count("GET", &arm.layers[0].digest()), 0);
    assert_eq!(s.meter.blob_gets(), 2, "amd64 config + layer");

    docker.run(&["rmi", "team/rcmulti:latest"]).await;
    s.meter.reset();
    docker.run(&["pull", "team/rcmulti:latest"]).await;
    assert_eq!(
        docker.inspect("team/rcmulti:latest").await["Id"],
        image::sha256(&amd.config).as_str()
    );
    assert_eq!(s.meter.total(), 0, "second pull: nothing upstream");
}

// ---------------------------------------------------------------------------------------
// containerd (`ctr`)
// ---------------------------------------------------------------------------------------

/// A private `containerd` (CRI disabled) on sockets in a temp dir, stopped on drop.
struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
    ctr: PathBuf,
}

impl Containerd {
    async fn start() -> Containerd {
        require_root("the containerd test");
        let bin = common::require("containerd", "containerd");
        let ctr = common::require("ctr", "containerd");
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

    fn cmd(&self) -> Command {
        let d = self.dir.path();
        let mut c = Command::new(&self.ctr);
        c.env_clear()
            .env("PATH", PATH)
            .env("HOME", d)
            .arg("--address")
            .arg(d.join("c.sock"));
        c
    }

    async fn run(&self, args: &[&str]) -> String {
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

    /// `certs.d/<registry>/hosts.toml` with regcache as the registry's only mirror; returns
    /// the hosts dir for `--hosts-dir`.
    fn mirror(&self, registry: &str, server: &str, regcache: &str) -> PathBuf {
        let hosts = self.dir.path().join("certs.d");
        std::fs::create_dir_all(hosts.join(registry)).unwrap();
        std::fs::write(
            hosts.join(registry).join("hosts.toml"),
            format!(
                "server = \"{server}\"\n\n[host.\"{regcache}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .unwrap();
        hosts
    }

    /// Pulls (and unpacks, which checks every layer against the config's diff_ids).
    async fn pull(&self, hosts: &Path, reference: &str, extra: &[&str]) {
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
    async fn image_digest(&self, reference: &str) -> String {
        let out = self.run(&["images", "ls"]).await;
        out.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cols| cols.first() == Some(&reference))
            .unwrap_or_else(|| panic!("{reference} not in `ctr images ls`:\n{out}"))[2]
            .to_owned()
    }

    /// Removes an image and garbage-collects its content, so the next pull fetches again.
    async fn remove(&self, reference: &str) {
        self.run(&["images", "rm", "--sync", reference]).await;
        let left = self.run(&["content", "ls", "-q"]).await;
        assert!(left.is_empty(), "content left after rm --sync: {left}");
    }

    async fn content(&self, digest: &str) -> Vec<u8> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_docker_hub_images_through_regcache_as_a_mirror() {
    let s = setup(|_| {}).await;
    let img = Image::simple(500, 2);
    s.registry.push("library/rcctr", "1", &img).await;
    let containerd = Containerd::start().await;
    let hosts = containerd.mirror("docker.io", "https://registry-1.docker.io", &s.cache.url());
    let reference = "docker.io/library/rcctr:1";

    let t = Instant::now();
    containerd.pull(&hosts, reference, &[]).await;
    eprintln!("first ctr pull: {:?}", t.elapsed());
    assert_eq!(containerd.image_digest(reference).await, img.digest());
    assert_eq!(containerd.content(&img.digest()).await, img.manifest);
    for blob in img.blobs() {
        let digest = image::sha256(&blob);
        assert_eq!(containerd.content(&digest).await, blob, "{digest}");
    }
    assert!(asked(&s.meter, "/v2/library/rcctr/manifests/1"));
    assert_eq!(s.meter.blob_gets(), 3, "config + 2 layers, once each");

    containerd.remove(reference).await;
    s.meter.reset();
    let t = Instant::now();
    containerd.pull(&hosts, reference, &[]).await;
    eprintln!("second ctr pull: {:?}", t.elapsed());
    assert_eq!(containerd.image_digest(reference).await, img.digest());
    assert_eq!(s.meter.blob_gets(), 0, "second pull: no upstream blob GET");
    assert_eq!(s.meter.total(), 0, "second pull: nothing upstream at all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_ns_parameter_routes_to_the_named_upstream() {
    // Only the `ns=ghcr.io` containerd adds can reach the registry: the default upstream
    // (where an `owner/app` name would otherwise go) is a closed port.
    let registry = Registry::start().await;
    let meter = Meter::start(registry.addr).await;
    let cache = Regcache::start("http://127.0.0.1:1", |c| {
        c.upstreams.insert(
            "ghcr.io".to_owned(),
            regcache::config::UpstreamConfig::with_url(&meter.url()),
        );
    })
    .await;
    let amd = Image::new(OCI_MANIFEST, "amd64", vec![Layer::new(510, 20_000)]);
    let arm = Image::new(OCI_MANIFEST, "arm64", vec![Layer::new(511, 20_000)]);
    let index = Image::index(OCI_INDEX, vec![amd.clone(), arm.clone()]);
    registry.push("owner/rcns", "v1", &index).await;
    let containerd = Containerd::start().await;
    let hosts = containerd.mirror("ghcr.io", "https://ghcr.io", &cache.url());
    let reference = "ghcr.io/owner/rcns:v1";

    containerd
        .pull(&hosts, reference, &["--all-platforms"])
        .await;
    assert_eq!(containerd.image_digest(reference).await, index.digest());
    for child in [&amd, &arm] {
        assert_eq!(containerd.content(&child.digest()).await, child.manifest);
        assert_eq!(meter.count("GET", &child.digest()), 1);
    }
    assert!(
        asked(&meter, "/v2/owner/rcns/manifests/v1"),
        "ns=ghcr.io reached the ghcr.io upstream"
    );
    assert_eq!(meter.blob_gets(), 4, "2 configs + 2 layers");

    containerd.remove(reference).await;
    meter.reset();
    containerd
        .pull(&hosts, reference, &["--all-platforms"])
        .await;
    assert_eq!(containerd.image_digest(reference).await, index.digest());
    assert_eq!(meter.total(), 0, "second pull: nothing upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_pulls_a_cached_image_again_while_the_upstream_is_down() {
    let mut s = setup(|c| c.cache.tag_ttl = Duration::from_millis(1)).await;
    let img = Image::simple(410, 2);
    s.registry.push("library/rcdown", "1", &img).await;
    let docker = Dockerd::start(&s.cache.url()).await;
    let config_digest = image::sha256(&img.config);
    docker.run(&["pull", "rcdown:1"]).await;
    docker.run(&["rmi", "rcdown:1"]).await;

    // Upstream gone; the tag's TTL long past: regcache answers from disk, stale.
    s.registry.stop();
    s.meter.reset();
    docker.run(&["pull", "rcdown:1"]).await;
    assert_eq!(
        docker.inspect("rcdown:1").await["Id"],
        config_digest.as_str()
    );
    assert_eq!(s.meter.blob_gets(), 0, "every blob from regcache's disk");
}
