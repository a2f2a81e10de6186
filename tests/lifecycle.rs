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
