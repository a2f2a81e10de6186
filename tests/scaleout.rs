//! Scale-out: regcache replicas sharing one bucket on a real Garage cluster (S3 API), in front
//! of a real upstream (Debian's `docker-registry`) behind a meter.
//!
//! What the fleet must do: fetch each blob from upstream once for all replicas, keep pulling
//! when a Garage node and a replica die, never serve bytes that do not match their digest
//! (even when the bucket's copy is damaged), and go to upstream when the bucket is away.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::clients::{Skopeo, check_oci_layout};
use common::garage::{Garage, blob_key};
use common::image::{Image, Layer, OCI_MANIFEST};
use common::{Meter, Registry, Scrape, http};
use object_store::ObjectStore as _;

/// A regcache replica: the real binary, its own data dir, on S3 storage.
struct Replica {
    child: Option<Child>,
    url: String,
    host: String,
    log: PathBuf,
}

impl Replica {
    async fn start(dir: &Path, name: &str, upstream: &str, storage: &str) -> Replica {
        let port = common::free_port();
        let data = dir.join(name);
        std::fs::create_dir_all(&data).unwrap();
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "{}\n{storage}",
                common::config_text(upstream, &data)
                    .replace("level = \"warn\"", "level = \"info\"")
            ),
        )
        .unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_regcache"))
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let host = format!("127.0.0.1:{port}");
        let url = format!("http://{host}");
        common::wait_http(&format!("{url}/v2/"), "regcache replica").await;
        Replica {
            child: Some(child),
            url,
            host,
            log,
        }
    }

    /// SIGTERM, as a rolling update stops a pod, and waits for the process to exit.
    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let status = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success());
            let exit = c.wait().unwrap();
            assert!(
                exit.success(),
                "a graceful stop exits 0: {exit:?}\n{}",
                self.log()
            );
        }
    }

    /// SIGKILL, as a node or pod dies.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn metrics(&self) -> Scrape {
        Scrape::of(&self.url).await
    }

    fn log(&self) -> String {
        common::clients::log_tail(&self.log, 40)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Pulls `repo:tag` through `replica` with skopeo and checks every byte against `image`.
async fn pull(skopeo: &Skopeo, replica: &Replica, repo: &str, image: &Image, into: &Path) {
    let dest = format!("oci:{}:t", into.display());
    skopeo
        .copy(
            &format!("{}/{repo}:1.0", replica.host),
            &dest,
            &["--preserve-digests"],
        )
        .await;
    check_oci_layout(into, "t", &image.digest());
    for blob in image.blobs() {
        common::clients::check_oci_blob(into, &common::image::sha256(&blob));
    }
}

/// Waits until the bucket (through node `i`) holds every blob of `image`: a replica's upload
/// completes shortly after its fill.
async fn uploaded(garage: &Garage, i: usize, image: &Image) {
    for blob in image.blobs() {
        in_bucket(garage, i, &common::image::sha256(&blob)).await;
    }
}

/// Waits until the bucket (through node `i`) holds the blob `digest`.
async fn in_bucket(garage: &Garage, i: usize, digest: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let store = garage.client(i);
    let key = blob_key("docker.io", digest);
    while store.head(&key).await.is_err() {
        assert!(Instant::now() < deadline, "{key} never reached the bucket");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The fleet scenario: 4 images sharing a 12 MiB base layer (a 3-part multipart upload),
/// pulled round-robin through 3 replicas on a 3-node Garage cluster (replication factor 3),
/// then by every replica, while a Garage node and a replica are killed mid-run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_fetch_each_blob_from_upstream_once_for_the_fleet() {
    let mut registry = Registry::start().await;
    let meter = Meter::start(registry.addr).await;
    let base = Layer::new(9000, 12 << 20);
    let images: Vec<Image> = (0..4u64)
        .map(|k| {
            Image::new(
                OCI_MANIFEST,
                "amd64",
                vec![
                    base.clone(),
                    Layer::new(9001 + k, (1 << 20) + k as usize * 300_000),
                ],
            )
        })
        .collect();
    let mut unique: std::collections::BTreeMap<String, u64> = Default::default();
    for (k, img) in images.iter().enumerate() {
        registry.push(&format!("team/app{k}"), "1.0", img).await;
        for b in img.blobs() {
            unique.insert(common::image::sha256(&b), b.len() as u64);
        }
    }
    let unique_bytes: u64 = unique.values().sum();

    let mut garage = Garage::start(3).await;
    let dir = common::clients::short_tempdir("scale");
    let storage: Vec<String> = (0..2)
        .map(|node| garage.storage_toml(node, "part_size = \"5MiB\"\ntimeout = \"3s\""))
        .collect();
    // Replicas a and c talk to Garage node 0, b to node 1; node 2 is the one that dies.
    let mut replicas = [
        Replica::start(dir.path(), "a", &meter.url(), &storage[0]).await,
        Replica::start(dir.path(), "b", &meter.url(), &storage[1]).await,
        Replica::start(dir.path(), "c", &meter.url(), &storage[0]).await,
    ];
    let skopeo = Skopeo::new();

    // Round 1: each image through one replica, round-robin, in waves: the next pull starts
    // once the last one's blobs are in the bucket (uploads finish after the pulls; replicas
    // missing the same blob at the same instant both fetch it, see the race test below).
    for (k, img) in images.iter().enumerate() {
        let r = &replicas[k % 3];
        pull(
            &skopeo,
            r,
            &format!("team/app{k}"),
            img,
            &dir.path().join(format!("r1-{k}")),
        )
        .await;
        uploaded(&garage, 1, img).await;
    }
    let objects = garage.objects(1).await;
    let in_bucket: std::collections::BTreeMap<String, u64> = objects
        .iter()
        .map(|(key, size)| {
            let hex = key.rsplit('/').next().unwrap();
            assert!(
                key.starts_with("blobs/docker.io/sha256/"),
                "object keys name upstream and digest: {key}"
            );
            (format!("sha256:{hex}"), *size)
        })
        .collect();
    assert_eq!(
        in_bucket, unique,
        "the bucket holds exactly the unique blobs"
    );
    let base_in_bucket = garage
        .client(1)
        .get(&blob_key("docker.io", &base.digest()))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        common::image::sha256(&base_in_bucket),
        base.digest(),
        "the multipart upload of the base layer is intact"
    );

    // Round 2: every replica pulls every image. Whatever a replica lacks comes from the
    // bucket: one upstream GET per unique blob for the whole fleet.
    for (k, img) in images.iter().enumerate() {
        for (i, r) in replicas.iter().enumerate() {
            let into = dir.path().join(format!("r2-{k}-{i}"));
            pull(&skopeo, r, &format!("team/app{k}"), img, &into).await;
        }
    }
    let upstream_bytes = meter.bytes.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        meter.blob_gets(),
        unique.len(),
        "one upstream GET per unique blob for the whole fleet; seen: {:?}\n{}\n{}",
        meter
            .requests()
            .iter()
            .map(|s| (&s.method, &s.path))
            .collect::<Vec<_>>(),
        replicas[0].log(),
        replicas[1].log()
    );
    // Manifests are per replica (each revalidates its tags upstream): small.
    assert!(
        upstream_bytes >= unique_bytes && upstream_bytes < unique_bytes + 64 * 1024,
        "upstream bytes {upstream_bytes} ~= unique blob bytes {unique_bytes}"
    );
    for r in &replicas {
        let m = r.metrics().await;
        let shared = m.get(
            "regcache_cache_lookups_total",
            &[("kind", "blob"), ("result", "shared")],
        );
        let read = m.get("regcache_bucket_bytes_total", &[("direction", "read")]);
        assert!(
            shared >= 1.0 && read >= 1.0,
            "replica {} took blobs from the bucket (shared {shared}, {read} bytes read)\n{}",
            r.url,
            r.log()
        );
    }

    // Failures: Garage node 2 dies, then replica c is killed in the middle of a fill (its
    // upload never completes). New images keep coming; a and b go on.
    garage.kill(2);
    let more: Vec<Image> = [(9010, 1 << 20), (9011, 12 << 20)]
        .iter()
        .map(|&(seed, size)| {
            Image::new(
                OCI_MANIFEST,
                "amd64",
                vec![base.clone(), Layer::new(seed, size)],
            )
        })
        .collect();
    for (k, img) in more.iter().enumerate() {
        registry.push(&format!("team/new{k}"), "1.0", img).await;
    }
    let big = common::image::sha256(&more[1].layers[1].blob);
    let mut dying = skopeo.cmd();
    dying
        .arg("copy")
        .arg("--src-tls-verify=false")
        .arg(format!("docker://{}/team/new1:1.0", replicas[2].host))
        .arg(format!("oci:{}:t", dir.path().join("dying").display()));
    let dying =
        tokio::spawn(async move { common::clients::try_run(&mut dying, "skopeo copy").await });
    let deadline = Instant::now() + Duration::from_secs(30);
    while meter.count("GET", &big) == 0 {
        assert!(
            Instant::now() < deadline,
            "replica c never started the big layer"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    replicas[2].kill();
    let _ = dying.await;
    for (k, img) in more.iter().enumerate() {
        for (i, r) in replicas[..2].iter().enumerate() {
            let into = dir.path().join(format!("r3-{k}-{i}"));
            pull(&skopeo, r, &format!("team/new{k}"), img, &into).await;
            uploaded(&garage, 0, img).await;
        }
    }
    // new0 was never touched by c: its blobs came from upstream once (one replica) and from
    // the bucket for the other. new1's may have been fetched by c before it died, plus once.
    for b in more[0].blobs().iter() {
        let d = common::image::sha256(b);
        if d == base.digest() {
            continue;
        }
        assert_eq!(
            meter.count("GET", &d),
            1,
            "{d}: once for the fleet\n{}",
            replicas[1].log()
        );
    }
    for b in more[1].blobs() {
        let d = common::image::sha256(&b);
        if d != base.digest() {
            assert!(
                meter.count("GET", &d) <= 2,
                "{d}: at most c's try and one more"
            );
        }
    }
    // Nothing in the bucket is partial or wrong: every object hashes to the name it is under.
    let all = garage.wait_objects(0, unique.len() + 4).await;
    for key in all.keys() {
        let bytes = garage
            .client(0)
            .get(&object_store::path::Path::from(key.as_str()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let hex = key.rsplit('/').next().unwrap();
        assert_eq!(
            common::image::sha256(&bytes),
            format!("sha256:{hex}"),
            "{key} is whole"
        );
    }

    // Upstream gone: a replica that never saw a blob serves it from the bucket, and answers
    // HEAD for it, by digest.
    registry.stop();
    let before = meter.blob_gets();
    let fresh = Replica::start(dir.path(), "d", &meter.url(), &storage[1]).await;
    let client = http();
    let url = format!("{}/v2/team/app3/blobs/{}", fresh.url, base.digest());
    let head = client.head(&url).send().await.unwrap();
    assert_eq!(head.status(), 200, "{}", fresh.log());
    assert_eq!(
        head.headers()["content-length"].to_str().unwrap(),
        base.blob.len().to_string()
    );
    let got = client.get(&url).send().await.unwrap();
    assert_eq!(got.status(), 200, "{}", fresh.log());
    assert_eq!(
        got.headers()["cache-status"].to_str().unwrap(),
        "regcache; hit; detail=shared-bucket"
    );
    assert_eq!(got.bytes().await.unwrap(), base.blob);
    assert_eq!(meter.blob_gets(), before, "nothing more went upstream");
}

/// A real upstream behind a meter, holding `repo:1.0`: one layer of `size` bytes.
async fn one_layer(repo: &str, seed: u64, size: usize) -> (Registry, Meter, Layer) {
    let registry = Registry::start().await;
    let meter = Meter::start(registry.addr).await;
    let layer = Layer::new(seed, size);
    let img = Image::new(OCI_MANIFEST, "amd64", vec![layer.clone()]);
    registry.push(repo, "1.0", &img).await;
    (registry, meter, layer)
}

/// A bucket copy with the wrong bytes (bit rot, a bad write by hand) is never served whole:
/// the client's body is cut, the copy is deleted, the next request goes upstream, and the
/// bucket ends up with the right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_bucket_copy_is_never_served() {
    let (_registry, meter, layer) = one_layer("team/rot", 9100, 3 << 20).await;
    let garage = Garage::start(1).await;
    let key = blob_key("docker.io", &layer.digest());
    let mut wrong = layer.blob.to_vec();
    wrong[1000] ^= 0xff;
    garage
        .client(0)
        .put(&key, Bytes::from(wrong).into())
        .await
        .unwrap();

    let dir = common::clients::short_tempdir("rot");
    let r = Replica::start(dir.path(), "a", &meter.url(), &garage.storage_toml(0, "")).await;
    let url = format!("{}/v2/team/rot/blobs/{}", r.url, layer.digest());
    let client = http();
    let first = client.get(&url).send().await.unwrap();
    let body = first.bytes().await;
    assert!(
        body.is_err(),
        "the damaged copy's body is cut, never delivered whole ({:?} bytes)",
        body.map(|b| b.len())
    );
    assert_eq!(
        meter.blob_gets(),
        0,
        "the first answer came from the bucket"
    );

    let second = client.get(&url).send().await.unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(second.bytes().await.unwrap(), layer.blob, "{}", r.log());
    assert_eq!(meter.blob_gets(), 1, "the retry went upstream");

    // The damaged copy was deleted, and the upload of the good bytes replaced it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = garage.client(0).get(&key).await;
        if let Ok(got) = got
            && got.bytes().await.unwrap() == layer.blob
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the bucket never got the good bytes\n{}",
            r.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = r.metrics().await;
    assert_eq!(
        m.get(
            "regcache_bucket_requests_total",
            &[("op", "delete"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "regcache_bucket_requests_total",
            &[("op", "put"), ("result", "ok")]
        ),
        1.0
    );
}

/// Two replicas missing the same blob in the same instant both fetch it (the bucket check is
/// best effort, not a lock); both serve the right bytes and the bucket holds one good copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_misses_on_two_replicas_are_both_correct() {
    let (_registry, meter, layer) = one_layer("team/race", 9200, 8 << 20).await;
    let garage = Garage::start(1).await;
    let dir = common::clients::short_tempdir("race");
    let storage = garage.storage_toml(0, "part_size = \"5MiB\"");
    let a = Replica::start(dir.path(), "a", &meter.url(), &storage).await;
    let b = Replica::start(dir.path(), "b", &meter.url(), &storage).await;
    let digest = layer.digest();
    let (x, y) = tokio::join!(
        common::get_blob(&a.url, "team/race", &digest),
        common::get_blob(&b.url, "team/race", &digest)
    );
    assert_eq!(x, layer.blob);
    assert_eq!(y, layer.blob);
    let gets = meter.blob_gets();
    assert!(
        (1..=2).contains(&gets),
        "at most one upstream GET per replica: {gets}"
    );
    let objects = garage.wait_objects(0, 1).await;
    assert_eq!(objects.len(), 1);
    let got = garage
        .client(0)
        .get(&object_store::path::Path::from(
            objects.keys().next().unwrap().as_str(),
        ))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got, layer.blob, "one good copy, whichever write won");
}

/// The bucket away (refusing connections, or accepting and never answering): every pull goes
/// upstream after at most `storage.s3.timeout`, the failures are counted, nothing is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_bucket_means_upstream_not_errors() {
    let registry = Registry::start().await;
    let meter = Meter::start(registry.addr).await;
    let layers: Vec<Layer> = (0..2).map(|i| Layer::new(9300 + i, 1 << 20)).collect();
    let img = Image::new(OCI_MANIFEST, "amd64", layers.clone());
    registry.push("team/nobucket", "1.0", &img).await;
    // One endpoint refuses connections; the other accepts them and never answers.
    let refused = format!("http://127.0.0.1:{}", common::free_port());
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let dir = common::clients::short_tempdir("nobucket");
    for (name, endpoint, result) in [("a", refused, "error"), ("b", silent_url, "timeout")] {
        let storage = format!(
            "[storage]\nkind = \"s3\"\n[storage.s3]\nendpoint = \"{endpoint}\"\nbucket = \"b\"\n\
             region = \"r\"\naccess_key_id = \"k\"\nsecret_access_key = \"s\"\ntimeout = \"1s\"\n"
        );
        let r = Replica::start(dir.path(), name, &meter.url(), &storage).await;
        let skopeo = Skopeo::new();
        let started = Instant::now();
        pull(
            &skopeo,
            &r,
            "team/nobucket",
            &img,
            &dir.path().join(format!("pull-{name}")),
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "a dead bucket must not hold pulls for long"
        );
        let m = Scrape::until(&r.url, |m| {
            m.get(
                "regcache_bucket_requests_total",
                &[("op", "put"), ("result", result)],
            ) >= 2.0
        })
        .await;
        assert!(
            m.get(
                "regcache_bucket_requests_total",
                &[("op", "get"), ("result", result)]
            ) >= 2.0,
            "{}",
            r.log()
        );
    }
    assert_eq!(
        meter.blob_gets(),
        2 * img.blobs().len(),
        "each replica fetched every blob itself"
    );
}

/// An upstream where regcache pulls with its own credentials: a blob in the bucket is served
/// for a repository only once upstream confirms that repository holds it, exactly as a copy on
/// disk would be. A replica never uses the bucket to hand out private content upstream would
/// refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_blob_in_the_bucket_is_served_only_where_upstream_has_it() {
    const CAROL: (&str, &str) = ("carol", "carol-secret");
    let up = common::token::BasicRegistry::start(&[CAROL]).await;
    let secret_layer = Layer::new(9400, 200_000);
    let secret = Image::new(OCI_MANIFEST, "amd64", vec![secret_layer.clone()]);
    up.push("private/secret", "1", &secret).await;
    let public = Image::simple(9401, 1);
    up.push("public/x", "1", &public).await;
    let meter = Meter::start(up.registry.addr).await;
    let garage = Garage::start(1).await;
    let dir = common::clients::short_tempdir("private");
    let settings = format!(
        "username = \"{}\"\npassword = \"{}\"\n{}",
        CAROL.0,
        CAROL.1,
        garage.storage_toml(0, "")
    );
    let a = Replica::start(dir.path(), "a", &meter.url(), &settings).await;
    let layer = secret_layer.digest();
    assert_eq!(
        common::get_blob(&a.url, "private/secret", &layer).await,
        secret_layer.blob
    );
    in_bucket(&garage, 0, &layer).await;

    let b = Replica::start(dir.path(), "b", &meter.url(), &settings).await;
    meter.reset();
    // Through a repository upstream does not hold it in: upstream's HEAD says 404, and so
    // does regcache, without reading the bucket.
    let probe = http()
        .get(format!("{}/v2/public/x/blobs/{layer}", b.url))
        .send()
        .await
        .unwrap();
    let (status, code) = common::error_code(probe).await;
    assert_eq!(
        (status, code.as_str()),
        (404, "BLOB_UNKNOWN"),
        "{}",
        b.log()
    );
    // (A HEAD may be sent twice: once unauthenticated for the challenge.)
    assert!(meter.count("HEAD", &format!("/v2/public/x/blobs/{layer}")) >= 1);
    assert_eq!(meter.blob_gets(), 0);
    let m = b.metrics().await;
    assert_eq!(
        m.get(
            "regcache_bucket_requests_total",
            &[("op", "get"), ("result", "ok")]
        ),
        0.0,
        "the bucket copy was not touched"
    );

    // Where upstream holds it: one HEAD confirms, the bytes come from the bucket.
    let got = http()
        .get(format!("{}/v2/private/secret/blobs/{layer}", b.url))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200, "{}", b.log());
    assert_eq!(
        got.headers()["cache-status"].to_str().unwrap(),
        "regcache; hit; detail=shared-bucket"
    );
    assert_eq!(got.bytes().await.unwrap(), secret_layer.blob);
    assert!(meter.count("HEAD", &format!("/v2/private/secret/blobs/{layer}")) >= 1);
    assert_eq!(
        meter.blob_gets(),
        0,
        "no upstream GET: the bytes came from the bucket"
    );

    // A blob the bucket lacks costs no upstream HEAD for the repository check: upstream's
    // GET answers for the repository.
    let other = public.layers[0].digest();
    assert_eq!(
        common::get_blob(&b.url, "public/x", &other).await,
        public.layers[0].blob
    );
    assert_eq!(meter.count("HEAD", &other), 0);
    assert_eq!(meter.count("GET", &other), 1);
}

/// A replica stopping gracefully (a rolling update) finishes its uploads before it exits:
/// the blob it just fetched is in the bucket for the rest of the fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_finishes_uploads_first() {
    let registry = Registry::start().await;
    let layer = Layer::new(9500, 32 << 20);
    registry
        .push(
            "team/stop",
            "1.0",
            &Image::new(OCI_MANIFEST, "amd64", vec![layer.clone()]),
        )
        .await;
    let garage = Garage::start(1).await;
    let dir = common::clients::short_tempdir("stop");
    let mut r = Replica::start(
        dir.path(),
        "a",
        &registry.url(),
        &garage.storage_toml(0, "part_size = \"5MiB\""),
    )
    .await;
    assert_eq!(
        common::get_blob(&r.url, "team/stop", &layer.digest()).await,
        layer.blob
    );
    // SIGTERM at once: the upload (7 parts) is still under way when the response has ended.
    r.terminate();
    let key = blob_key("docker.io", &layer.digest());
    let got = garage
        .client(0)
        .get(&key)
        .await
        .expect("uploaded before exit");
    assert_eq!(got.bytes().await.unwrap(), layer.blob);
}
