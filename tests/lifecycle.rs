//! Cache lifecycle: negative caching of missing tags, and offline mode over a data dir an
//! earlier (online) run filled.

mod common;

use std::time::Duration;

use common::fake::{FakeRegistry, Faults};
use common::{Image, Meter, Regcache, Registry, error_code, get_manifest, http, pull};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_tag_is_remembered_briefly() {
    let up = FakeRegistry::start(Faults::default()).await;
    let img = Image::simple(51, 1);
    up.add("library/app", "1", &img);
    let cache = Regcache::start(&up.url(), |c| {
        c.cache.negative_ttl = Duration::from_millis(400);
    })
    .await;

    for _ in 0..5 {
        let resp = get_manifest(&cache.url(), "app", "typo").await;
        assert_eq!(error_code(resp).await, (404, "MANIFEST_UNKNOWN".into()));
    }
    assert_eq!(
        up.count("GET", "/manifests/typo"),
        1,
        "one upstream ask per TTL"
    );
    // Other tags are unaffected, and after the TTL upstream is asked again.
    assert_eq!(pull(&cache.url(), "app", "1").await, img.digest());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resp = get_manifest(&cache.url(), "app", "typo").await;
    assert_eq!(resp.status(), 404);
    assert_eq!(up.count("GET", "/manifests/typo"), 2);

    // Turned off, every request asks.
    let off = Regcache::start(&up.url(), |c| c.cache.negative_ttl = Duration::ZERO).await;
    for _ in 0..3 {
        get_manifest(&off.url(), "app", "other-typo").await;
    }
    assert_eq!(up.count("GET", "/manifests/other-typo"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_mode_serves_what_an_online_run_cached_and_never_calls_upstream() {
    let mut registry = Registry::start().await;
    let meter = Meter::start(registry.addr).await;
    let (img, other) = (Image::simple(52, 2), Image::simple(53, 1));
    registry.push("library/app", "1", &img).await;
    registry.push("library/other", "1", &other).await;

    // Online: pull once (tags get a 1 ms TTL, so they are long expired below).
    let online =
        Regcache::start(&meter.url(), |c| c.cache.tag_ttl = Duration::from_millis(1)).await;
    assert_eq!(pull(&online.url(), "app", "1").await, img.digest());
    let data = online.shutdown().await;
    registry.stop();
    meter.reset();

    // Offline, on the same data dir, with max_stale long past: everything cached still pulls.
    let mut cfg = common::config(&meter.url(), data.path());
    cfg.cache.offline = true;
    cfg.cache.tag_ttl = Duration::from_millis(1);
    cfg.cache.max_stale = Duration::from_millis(1);
    let offline = Regcache::start_config(cfg, data).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(pull(&offline.url(), "app", "1").await, img.digest());
    assert_eq!(
        pull(&offline.url(), "app", &img.digest()).await,
        img.digest()
    );

    // What was never cached is a clear 404, not a hang or a 5xx.
    let resp = get_manifest(&offline.url(), "other", "1").await;
    let status = resp.status();
    let body = resp.text().await.unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("offline"), "{body}");
    let blob = other.layers[0].digest();
    let resp = http()
        .get(format!("{}/v2/other/blobs/{blob}", offline.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (404, "BLOB_UNKNOWN".into()));
    assert_eq!(meter.total(), 0, "offline never contacts upstream");
}

/// Offline, a blob another upstream cached is served by digest only when both upstreams are
/// public: one regcache fetched with credentials of its own (`corp`) stays with it, where a
/// public one's (`quay`) is shared, as online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_mode_shares_blobs_only_between_public_upstreams() {
    let (hub, corp, quay) = (
        Registry::start().await,
        Registry::start().await,
        Registry::start().await,
    );
    let (secret, open) = (Image::simple(54, 1), Image::simple(55, 1));
    corp.push("team/app", "1", &secret).await;
    quay.push("lib/tool", "1", &open).await;
    let (corp_url, quay_url) = (corp.url(), quay.url());
    let tweak = move |c: &mut regcache::Config| {
        let mut up = c.upstreams["docker.io"].clone();
        up.short_name_prefix = None;
        let mut private = up.clone();
        private.urls = vec![corp_url];
        private.hosts = vec!["corp.example".into()];
        private.username = Some("carol".into());
        private.password = Some("not-asked-for".into());
        c.upstreams.insert("corp".into(), private);
        up.urls = vec![quay_url];
        up.hosts = vec!["quay.io".into()];
        c.upstreams.insert("quay".into(), up);
    };
    let online = Regcache::start(&hub.url(), tweak.clone()).await;
    assert_eq!(
        pull(&online.url(), "corp.example/team/app", "1").await,
        secret.digest()
    );
    assert_eq!(
        pull(&online.url(), "quay.io/lib/tool", "1").await,
        open.digest()
    );
    let data = online.shutdown().await;

    let mut cfg = common::config(&hub.url(), data.path());
    tweak(&mut cfg);
    cfg.cache.offline = true;
    let offline = Regcache::start_config(cfg, data).await;
    let through_hub = |digest: String| {
        let url = format!("{}/v2/library/any/blobs/{digest}", offline.url());
        async move { http().get(url).send().await.unwrap() }
    };
    let resp = through_hub(secret.layers[0].digest()).await;
    assert_eq!(
        error_code(resp).await,
        (404, "BLOB_UNKNOWN".into()),
        "corp's blob through docker.io"
    );
    let resp = through_hub(open.layers[0].digest()).await;
    assert_eq!(resp.status(), 200, "quay's blob through docker.io");
    assert_eq!(
        common::image::sha256(&resp.bytes().await.unwrap()),
        open.layers[0].digest()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_the_cache_under_its_cap_in_lru_order_and_spares_pins() {
    let registry = Registry::start().await;
    let meter = Meter::start(registry.addr).await;
    let layer = |seed| common::image::Layer::new(seed, 1 << 20);
    let image = |seed| Image::new(common::image::DOCKER_V2, "amd64", vec![layer(seed)]);
    let pinned = image(60);
    registry.push("library/pinned", "1", &pinned).await;
    let images: Vec<Image> = (61..67).map(image).collect();
    for (i, img) in images.iter().enumerate() {
        registry.push(&format!("library/app{i}"), "1", img).await;
    }
    let cap: u64 = 3 * (1 << 20) + (1 << 19); // room for about 3 images
    let cache = Regcache::start(&meter.url(), |c| {
        c.cache.max_size = cap;
        c.cache.gc_interval = Duration::from_millis(100);
        c.cache.pin = vec!["pinned:1".into()];
    })
    .await;
    let size = |s: &common::Scrape| s.get("regcache_cache_size_bytes", &[]) as u64;

    let blob_path = |d: &str| {
        let hex = d.trim_start_matches("sha256:");
        cache
            .data
            .path()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
    };
    let cached = |img: &Image| blob_path(&img.layers[0].digest()).exists();
    let pull_app = |i: usize| {
        let (base, img) = (cache.url(), images[i].clone());
        async move {
            assert_eq!(pull(&base, &format!("app{i}"), "1").await, img.digest());
            // Once the fill committed, the loop brings the cache back under its cap.
            common::Scrape::until(&base, |s| {
                s.get("regcache_fetches_in_flight", &[]) == 0.0 && size(s) <= cap
            })
            .await
        }
    };

    assert_eq!(pull(&cache.url(), "pinned", "1").await, pinned.digest());
    pull_app(0).await;
    pull_app(1).await;
    // Use app0 again: app1 is now the least recently used.
    pull_app(0).await;
    pull_app(2).await;
    assert!(cached(&images[0]), "recently used app0 evicted");
    assert!(!cached(&images[1]), "least recently used app1 kept");
    assert!(cached(&images[2]));

    let mut peak = 0;
    for i in 3..6 {
        peak = peak.max(size(&pull_app(i).await));
    }
    let s = common::Scrape::of(&cache.url()).await;
    assert!(
        s.get("regcache_cache_evictions_total", &[]) >= 3.0,
        "{}",
        s.text
    );
    assert!(peak <= cap);
    // The pinned image survived everything; the newest image is there.
    assert!(cached(&pinned), "pinned layer evicted");
    assert!(cached(&images[5]), "newest evicted");

    // An evicted image pulls again, from upstream.
    meter.reset();
    assert_eq!(pull(&cache.url(), "app1", "1").await, images[1].digest());
    assert!(meter.blob_gets() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_on_a_stopped_cache_evicts_to_a_size_and_keeps_pins() {
    let up = FakeRegistry::start(Faults::default()).await;
    let image = |seed| {
        Image::new(
            common::image::DOCKER_V2,
            "amd64",
            vec![common::image::Layer::new(seed, 512 << 10)],
        )
    };
    let (keep, a, b) = (image(71), image(72), image(73));
    up.add("library/keep", "1", &keep);
    up.add("library/a", "1", &a);
    up.add("library/b", "1", &b);
    let cache = Regcache::start(&up.url(), |_| {}).await;
    for (name, img) in [("keep", &keep), ("a", &a), ("b", &b)] {
        assert_eq!(pull(&cache.url(), name, "1").await, img.digest());
    }
    let data = cache.shutdown().await;
    let dir = data.path().to_str().unwrap().to_owned();
    let config = data.path().join("gc.toml");
    std::fs::write(
        &config,
        format!(
            "[upstreams.\"docker.io\"]\nurls = [\"{}\"]\n[cache]\npin = [\"keep:1\"]\n",
            up.url()
        ),
    )
    .unwrap();
    let gc = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_regcache"))
            .args([
                "gc",
                "--config",
                config.to_str().unwrap(),
                "--data-dir",
                &dir,
            ])
            .args(extra)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let files = || common::count_files(&data.path().join("blobs"));
    let before = files();

    let (ok, out) = gc(&["--dry-run", "--max-size", "800KiB"]);
    assert!(ok, "{out}");
    assert!(out.contains("would remove"), "{out}");
    assert_eq!(files(), before, "a dry run removes nothing");

    let (ok, out) = gc(&["--max-size", "800KiB"]);
    assert!(ok, "{out}");
    assert!(out.contains("pinned objects kept"), "{out}");
    let layer = |img: &Image| {
        let d = img.layers[0].digest();
        let hex = d.trim_start_matches("sha256:").to_owned();
        data.path().join("blobs/sha256").join(&hex[..2]).join(&hex)
    };
    assert!(layer(&keep).exists(), "pinned image kept: {out}");
    assert!(!layer(&a).exists() || !layer(&b).exists(), "{out}");
    assert!(files() < before);

    // Without a bound configured or given, gc refuses to guess.
    let (ok, out) = gc(&[]);
    assert!(!ok);
    assert!(out.contains("nothing bounds the cache"), "{out}");
}

/// A small tmpfs for a data dir (needs root, as CI runs); unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        assert!(
            std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")),
            "this test mounts a tmpfs and must run as root (CI does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs failed");
        Tmpfs { dir }
    }

    fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_passes_blobs_through_uncached_and_recovers_when_space_returns() {
    let fs = Tmpfs::mount("24m");
    let up = FakeRegistry::start(Faults::default()).await;
    let img = Image::new(
        common::image::DOCKER_V2,
        "amd64",
        (0..4)
            .map(|i| common::image::Layer::new(90 + i, 4 << 20))
            .collect(),
    );
    up.add("library/big", "1", &img);
    let data = fs.dir.path().join("data");
    let mut cfg = common::config(&up.url(), &data);
    cfg.cache.negative_ttl = Duration::ZERO;
    let cache = Regcache::start_config(cfg, tempfile::tempdir().unwrap()).await;

    // Every pull works with the right bytes, full disk or not.
    for _ in 0..2 {
        assert_eq!(pull(&cache.url(), "big", "1").await, img.digest());
    }
    let s = common::Scrape::of(&cache.url()).await;
    assert!(
        s.get("regcache_passthrough_total", &[]) >= 1.0,
        "{}",
        s.text
    );
    let cached = |d: &str| {
        let hex = d.trim_start_matches("sha256:");
        data.join("blobs/sha256").join(&hex[..2]).join(hex).exists()
    };
    let passed: Vec<String> = img
        .layers
        .iter()
        .map(|l| l.digest())
        .filter(|d| !cached(d))
        .collect();
    assert!(!passed.is_empty(), "some layers did not fit");
    assert!(
        passed.len() < 4,
        "some layers were cached before the disk filled"
    );
    // A passed-through layer is fetched again each time; the client still gets it whole.
    assert_eq!(up.count("GET", &passed[0]), 2);

    // Space returns: the next pull caches what it could not before.
    fs.resize("96m");
    assert_eq!(pull(&cache.url(), "big", "1").await, img.digest());
    common::Scrape::until(&cache.url(), |s| {
        s.get("regcache_fetches_in_flight", &[]) == 0.0
    })
    .await;
    for d in &passed {
        assert!(cached(d), "{d} cached once space returned");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_never_breaks_a_download_in_progress() {
    let up = FakeRegistry::start(Faults::default()).await;
    // Far more than socket buffers hold, so the slow reader is still reading the file.
    let layer = |seed| common::image::Layer::new(seed, 24 << 20);
    let (a, b) = (layer(95), layer(96));
    let img = Image::new(
        common::image::DOCKER_V2,
        "amd64",
        vec![a.clone(), b.clone()],
    );
    up.add("library/app", "1", &img);
    let cache = Regcache::start(&up.url(), |c| {
        c.cache.max_size = 36 << 20;
        c.cache.gc_interval = Duration::from_millis(50);
    })
    .await;
    let url = |d: &str| format!("{}/v2/app/blobs/{d}", cache.url());
    let path = |d: &str| {
        let hex = d.trim_start_matches("sha256:");
        cache
            .data
            .path()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
    };
    // A cached, then a slow client starts reading it from disk.
    http()
        .get(url(&a.digest()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    common::Scrape::until(&cache.url(), |s| {
        s.get("regcache_fetches_in_flight", &[]) == 0.0
    })
    .await;
    let mut slow = http().get(url(&a.digest())).send().await.unwrap();
    assert_eq!(slow.headers()["cache-status"], "regcache; hit");
    let mut got = slow.chunk().await.unwrap().unwrap().to_vec();

    // B takes the cache over its cap: A, least recently used, is evicted mid-download.
    http()
        .get(url(&b.digest()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    for _ in 0..200 {
        if !path(&a.digest()).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!path(&a.digest()).exists(), "A was evicted");
    while let Some(c) = slow.chunk().await.unwrap() {
        got.extend_from_slice(&c);
    }
    assert_eq!(
        common::image::sha256(&got),
        a.digest(),
        "the download completed whole"
    );
}
