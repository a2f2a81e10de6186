//! A real Garage cluster on loopback: the S3-compatible store that regcache replicas share in
//! the scale-out tests and benchmarks. Each node has its own ports and data dirs; the bucket
//! and its key are made with Garage's own CLI. Self-contained, so `benches/load.rs` includes
//! it too (`#[path]`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStore;

pub const BUCKET: &str = "regcache";
pub const REGION: &str = "garage";
pub const KEY_ID: &str = "GK0123456789abcdef01234567";
pub const SECRET: &str = "5ec2e7a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8";

/// The `garage` binary: on PATH or where `cargo install` puts it; a panic says how to get it.
pub fn binary() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(Path::new(&home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("garage"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`garage` is not installed; the scale-out tests need it. Run ./scripts/test, \
                 which builds it once, or: cargo install garage --version 2.5.0 --locked \
                 --no-default-features --features bundled-libs,lmdb"
            )
        })
}

/// The bucket key regcache (default `prefix`) writes a blob fetched from `upstream` under.
pub fn blob_key(upstream: &str, digest: &str) -> object_store::path::Path {
    let (algorithm, hex) = digest.split_once(':').expect("algorithm:hex");
    object_store::path::Path::from(format!("blobs/{upstream}/{algorithm}/{hex}"))
}

pub struct Node {
    child: Option<Child>,
    config: PathBuf,
    pub s3: SocketAddr,
}

impl Node {
    pub fn s3_url(&self) -> String {
        format!("http://{}", self.s3)
    }
}

/// A Garage cluster of `n` nodes, each in its own zone, replication factor `n`.
pub struct Garage {
    pub nodes: Vec<Node>,
    pub dir: tempfile::TempDir,
}

impl Garage {
    pub async fn start(n: usize) -> Garage {
        let bin = binary();
        let dir = tempfile::tempdir().unwrap();
        let rpc_secret: String = {
            use sha2::Digest as _;
            let seed = format!("{:?}{}", Instant::now(), std::process::id());
            sha2::Sha256::digest(seed.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        let mut nodes = Vec::new();
        for i in 0..n {
            let home = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&home).unwrap();
            let (s3, rpc, admin) = (free_port(), free_port(), free_port());
            let config = home.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    r#"metadata_dir = "{home}/meta"
data_dir = "{home}/data"
db_engine = "lmdb"
replication_factor = {n}
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{rpc_secret}"
[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"
[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "test-admin-token"
"#,
                    home = home.display()
                ),
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
            let log = std::fs::File::create(home.join("garage.log")).unwrap();
            let child = Command::new(&bin)
                .arg("-c")
                .arg(&config)
                .arg("server")
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start garage");
            nodes.push(Node {
                child: Some(child),
                config,
                s3: format!("127.0.0.1:{s3}").parse().unwrap(),
            });
        }
        let g = Garage { nodes, dir };
        for node in &g.nodes {
            let deadline = Instant::now() + Duration::from_secs(20);
            while tokio::net::TcpStream::connect(node.s3).await.is_err() {
                assert!(
                    Instant::now() < deadline,
                    "garage did not come up at {}",
                    node.s3
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let ids: Vec<String> = (0..n)
            .map(|i| g.cli(i, &["node", "id", "-q"]).trim().to_owned())
            .collect();
        for id in &ids[1..] {
            g.cli(0, &["node", "connect", id]);
        }
        for (i, id) in ids.iter().enumerate() {
            let short = &id[..16];
            g.cli(
                0,
                &[
                    "layout",
                    "assign",
                    "-z",
                    &format!("dc{i}"),
                    "-c",
                    "1G",
                    short,
                ],
            );
        }
        g.cli(0, &["layout", "apply", "--version", "1"]);
        g.cli(0, &["bucket", "create", BUCKET]);
        g.cli(
            0,
            &["key", "import", "--yes", "-n", "regcache", KEY_ID, SECRET],
        );
        g.cli(
            0,
            &[
                "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "regcache",
            ],
        );
        // Every node answers for the bucket before anyone uses it.
        for i in 0..n {
            let store = g.client(i);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match store.list_with_delimiter(None).await {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => {
                        panic!("garage node {i} never served the bucket: {e}")
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
        g
    }

    /// Runs a `garage` CLI command against node `i`, retrying while the cluster settles.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new(binary())
                .arg("-c")
                .arg(&self.nodes[i].config)
                .args(args)
                .output()
                .unwrap();
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            if Instant::now() > deadline {
                panic!(
                    "garage {args:?} failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Kills node `i` at once (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A `[storage]` table for a regcache replica talking to node `i`, the secret in a file.
    pub fn storage_toml(&self, i: usize, extra: &str) -> String {
        let secret = self.dir.path().join("secret");
        std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
        format!(
            r#"
[storage]
kind = "s3"
[storage.s3]
endpoint = "{}"
bucket = "{BUCKET}"
region = "{REGION}"
access_key_id = "{KEY_ID}"
secret_access_key_file = "{}"
{extra}
"#,
            self.nodes[i].s3_url(),
            secret.display()
        )
    }

    /// An S3 client of the bucket through node `i`, to look at and tamper with objects.
    pub fn client(&self, i: usize) -> Arc<dyn ObjectStore> {
        Arc::new(
            object_store::aws::AmazonS3Builder::new()
                .with_endpoint(self.nodes[i].s3_url())
                .with_allow_http(true)
                .with_bucket_name(BUCKET)
                .with_region(REGION)
                .with_access_key_id(KEY_ID)
                .with_secret_access_key(SECRET)
                .build()
                .unwrap(),
        )
    }

    /// Every object in the bucket, key -> size, through node `i`.
    pub async fn objects(&self, i: usize) -> std::collections::BTreeMap<String, u64> {
        use futures_util::TryStreamExt as _;
        self.client(i)
            .list(None)
            .map_ok(|m| (m.location.to_string(), m.size))
            .try_collect()
            .await
            .unwrap()
    }

    /// Waits until the bucket holds at least `n` objects.
    pub async fn wait_objects(
        &self,
        i: usize,
        n: usize,
    ) -> std::collections::BTreeMap<String, u64> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let objects = self.objects(i).await;
            if objects.len() >= n {
                return objects;
            }
            if Instant::now() > deadline {
                panic!(
                    "bucket has {} objects, expected {n}: {objects:?}",
                    objects.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
