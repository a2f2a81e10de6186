//! Stream-while-filling and single flight, deterministic against the in-process fake upstream
//! (which can drip-feed, reset and count what it is busy with), plus upstream politeness: the
//! concurrency cap and the circuit breaker.

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use bytes::Bytes;
use common::fake::{FakeRegistry, Faults};
use common::image::{self, Image, Layer};
use common::{Regcache, Scrape, error_code, get_manifest, http, pull};

/// An image with one layer of `size` bytes of noise, published as `library/app:1`.
async fn upstream_with_layer(faults: Faults, seed: u64, size: usize) -> (FakeRegistry, Image) {
    let up = FakeRegistry::start(faults).await;
    let img = Image::new(image::DOCKER_V2, "amd64", vec![Layer::new(seed, size)]);
    up.add("library/app", "1", &img);
    (up, img)
}

/// A cold layer behind a fake upstream with `faults`, and regcache in front with its default
/// config, where most tests here start: (upstream, image, regcache, the layer's digest, its URL
/// through regcache).
async fn cold_layer(
    faults: Faults,
    seed: u64,
    size: usize,
) -> (FakeRegistry, Image, Regcache, String, String) {
    let (up, img) = upstream_with_layer(faults, seed, size).await;
    let cache = Regcache::start(&up.url(), |_| {}).await;
    let layer = img.layers[0].digest();
    let url = blob_url(&cache, &layer);
    (up, img, cache, layer, url)
}

fn blob_url(cache: &Regcache, digest: &str) -> String {
    format!("{}/v2/app/blobs/{digest}", cache.url())
}

/// The size of the largest file in the cache's `tmp/` (a fill's temp file), 0 if none.
fn temp_file_len(cache: &Regcache) -> u64 {
    std::fs::read_dir(cache.data.path().join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

async fn get_all(url: &str) -> Result<Bytes, String> {
    let resp = http().get(url).send().await.map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()));
    }
    resp.bytes().await.map_err(|e| e.to_string())
}

/// `n` concurrent GETs of `url`, their outcomes in order.
async fn get_concurrently(url: &str, n: usize) -> Vec<Result<Bytes, String>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let url = url.to_owned();
            tokio::spawn(async move { get_all(&url).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_gets_share_one_upstream_fetch_that_streams() {
    let faults = Faults {
        drip: Some((10, Duration::from_millis(80))),
        ..Faults::default()
    };
    let (up, img, _cache, layer, url) = cold_layer(faults, 1, 2 << 20).await;

    // Stream-through: the first bytes arrive while upstream is still sending.
    let mut first = http().get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let chunk = first.chunk().await.unwrap().expect("a first chunk");
    assert!(!chunk.is_empty());
    assert_eq!(
        up.load.blobs_completed.load(SeqCst),
        0,
        "the client got bytes before upstream finished"
    );

    // Everyone else joins the same fetch, including Range requests.
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move { get_all(&url).await }));
    }
    let range = common::get_range(&http(), &url, "bytes=2000000-2000099").await;
    assert_eq!(range.status(), 206);
    let want = img.layers[0].blob.clone();
    assert_eq!(
        range.bytes().await.unwrap(),
        want.slice(2_000_000..2_000_100)
    );

    let mut rest = chunk.to_vec();
    while let Some(c) = first.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert_eq!(image::sha256(&rest), layer);
    for t in tasks {
        assert_eq!(image::sha256(&t.await.unwrap().unwrap()), layer);
    }
    assert_eq!(
        up.count("GET", &layer),
        1,
        "one upstream GET for 14 clients"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_nothing_for_the_others() {
    let faults = Faults {
        drip: Some((8, Duration::from_millis(60))),
        ..Faults::default()
    };
    let (up, _, cache, layer, url) = cold_layer(faults, 2, 1 << 20).await;

    let mut quitter = http().get(&url).send().await.unwrap();
    quitter.chunk().await.unwrap().expect("first chunk");
    let stayer = tokio::spawn({
        let url = url.clone();
        async move { get_all(&url).await }
    });
    drop(quitter);

    let got = stayer.await.unwrap().unwrap();
    assert_eq!(image::sha256(&got), layer);
    assert_eq!(up.count("GET", &layer), 1);
    // The fill finished and committed: the next request is a hit.
    Scrape::until(&cache.url(), |s| {
        s.get("regcache_cache_objects", &[]) == 1.0
            && s.get("regcache_fetches_in_flight", &[]) == 0.0
    })
    .await;
    let resp = http().get(&url).send().await.unwrap();
    assert_eq!(resp.headers()["cache-status"], "regcache; hit");
    assert_eq!(up.count("GET", &layer), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_the_only_client_abandons_still_completes() {
    let faults = Faults {
        drip: Some((6, Duration::from_millis(50))),
        ..Faults::default()
    };
    let (up, _, cache, layer, url) = cold_layer(faults, 3, 512 << 10).await;

    let mut only = http().get(&url).send().await.unwrap();
    only.chunk().await.unwrap().expect("first chunk");
    drop(only);
    // The fill goes on without any reader and commits.
    Scrape::until(&cache.url(), |s| {
        s.get("regcache_cache_objects", &[]) == 1.0
            && s.get("regcache_fetches_in_flight", &[]) == 0.0
    })
    .await;
    let resp = http().get(&url).send().await.unwrap();
    assert_eq!(resp.headers()["cache-status"], "regcache; hit");
    assert_eq!(image::sha256(&resp.bytes().await.unwrap()), layer);
    assert_eq!(up.count("GET", &layer), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_fails_every_joined_reader_commits_nothing_and_the_retry_succeeds() {
    let faults = Faults {
        reset_blobs: true,
        ..Faults::default()
    };
    let (up, _, cache, layer, url) = cold_layer(faults, 4, 1 << 20).await;

    for r in get_concurrently(&url, 4).await {
        assert!(r.is_err(), "a reader got a complete-looking body");
    }
    assert_eq!(cache.stored_files(), 0, "nothing committed");
    let failed_fetches = up.count("GET", &layer);
    assert!(
        (1..=4).contains(&failed_fetches),
        "readers that arrived during the fill joined it"
    );

    up.set(|f| f.reset_blobs = false);
    assert_eq!(image::sha256(&get_all(&url).await.unwrap()), layer);
    assert_eq!(up.count("GET", &layer), failed_fetches + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_does_not_slow_a_fast_one() {
    let (up, _, _cache, layer, url) = cold_layer(Faults::default(), 5, 24 << 20).await;

    // The slow client reads one chunk and then stops reading.
    let mut slow = http().get(&url).send().await.unwrap();
    let mut slow_got = slow.chunk().await.unwrap().unwrap().to_vec();
    // The fast client gets all 24 MiB while the slow one sits there (far more than socket
    // buffers hold, so a fill paced by the slowest reader would stall it).
    let fast = tokio::time::timeout(Duration::from_secs(30), get_all(&url))
        .await
        .expect("the fast reader finished while the slow one was stalled")
        .unwrap();
    assert_eq!(image::sha256(&fast), layer);
    // The slow one then finishes with the right bytes too.
    while let Some(c) = slow.chunk().await.unwrap() {
        slow_got.extend_from_slice(&c);
    }
    assert_eq!(image::sha256(&slow_got), layer);
    assert_eq!(up.count("GET", &layer), 1);
}

/// An upstream that sends a blob chunked (no Content-Length): clients get it streamed and
/// byte-exact and it is kept; sent corrupted, every client's body fails and nothing is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_without_content_length_is_streamed_verified_and_kept() {
    let faults = Faults {
        chunked: true,
        corrupt: true,
        drip: Some((6, Duration::from_millis(30))),
        ..Faults::default()
    };
    let (up, _, cache, layer, url) = cold_layer(faults, 7, 3 << 20).await;

    // A HEAD says the blob is there, without a size it does not know (not a 404, nor 0).
    let resp = http().head(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("content-length"), None);
    assert_eq!(up.count("HEAD", &layer), 1);

    for r in get_concurrently(&url, 3).await {
        assert!(r.is_err(), "a corrupted body looked complete");
    }
    assert_eq!(cache.stored_files(), 0, "nothing kept");

    up.set(|f| f.corrupt = false);
    for r in get_concurrently(&url, 3).await {
        assert_eq!(image::sha256(&r.unwrap()), layer);
    }
    Scrape::until(&cache.url(), |m| {
        m.get("regcache_cache_objects", &[]) >= 1.0
    })
    .await;
    assert_eq!(cache.stored_files(), 1);
    let fetches = up.count("GET", &layer);
    assert!((2..=4).contains(&fetches), "one fetch per fill: {fetches}");
    // Now a hit: upstream is not asked again.
    assert_eq!(image::sha256(&get_all(&url).await.unwrap()), layer);
    assert_eq!(up.count("GET", &layer), fetches);
}

/// A blob cached through one upstream is served through another once that one names it in a
/// HEAD, by its size or (sending no size) by its digest; a 200 naming neither (a login page's)
/// confirms nothing, and the blob is fetched through that upstream instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_naming_no_blob_confirms_none_cached_through_another_upstream() {
    let layers = vec![Layer::new(81, 40_000), Layer::new(82, 40_000)];
    let img = Image::new(image::DOCKER_V2, "amd64", layers);
    let (a, b) = (
        FakeRegistry::start(Faults::default()).await,
        FakeRegistry::start(Faults {
            chunked: true,
            ..Faults::default()
        })
        .await,
    );
    a.add("library/app", "1", &img);
    b.add("library/app", "1", &img);
    let b_url = b.url();
    let cache = Regcache::start(&a.url(), move |c| {
        let mut up = c.upstreams["docker.io"].clone();
        up.short_name_prefix = None;
        up.urls = vec![b_url];
        up.hosts = vec!["b.example".into()];
        c.upstreams.insert("b".into(), up);
    })
    .await;
    assert_eq!(pull(&cache.url(), "app", "1").await, img.digest());
    let through_b = |layer: &str| {
        let url = format!("{}/v2/b.example/library/app/blobs/{layer}", cache.url());
        async move { get_all(&url).await.unwrap() }
    };

    // No size, but the digest: confirmed, served from the cache.
    let named = img.layers[0].digest();
    assert_eq!(image::sha256(&through_b(&named).await), named);
    assert_eq!((b.count("HEAD", &named), b.count("GET", &named)), (1, 0));

    // Neither: fetched through b.
    b.set(|f| f.quirks = true);
    let unnamed = img.layers[1].digest();
    assert_eq!(image::sha256(&through_b(&unnamed).await), unnamed);
    assert_eq!(
        (b.count("HEAD", &unnamed), b.count("GET", &unnamed)),
        (1, 1)
    );
}

/// A client that joins a fill after the writer has put the first half on disk gets that half
/// from the temp file by sendfile (no copy through regcache), the rest as it arrives, and the
/// whole blob byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_gets_the_written_part_by_sendfile() {
    const MIB: usize = 1 << 20;
    let faults = Faults {
        drip: Some((2, Duration::from_millis(1500))),
        ..Faults::default()
    };
    let (up, img) = upstream_with_layer(faults, 6, 12 * MIB).await;
    // The default: a fill's written bytes go by sendfile to loopback clients too.
    let cache = Regcache::start(&up.url(), |c| {
        c.storage.sendfile = regcache::config::Sendfile::Remote;
    })
    .await;
    let layer = img.layers[0].digest();
    let url = blob_url(&cache, &layer);

    let early = tokio::spawn({
        let url = url.clone();
        async move { get_all(&url).await }
    });
    // Upstream has sent the first 6 MiB and pauses: wait until the temp file holds it.
    let waited = std::time::Instant::now();
    while temp_file_len(&cache) < 6 * MIB as u64 {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the fill wrote 6 MiB"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        up.load.blobs_completed.load(SeqCst),
        0,
        "upstream is mid-blob"
    );

    let late = get_all(&url).await.unwrap();
    assert_eq!(image::sha256(&late), layer);
    assert_eq!(image::sha256(&early.await.unwrap().unwrap()), layer);
    // The late joiner's written half went by sendfile; no bytes beyond the two bodies did. (The
    // fill's in-memory window holds at most 3 MiB, so most of the half was on disk only.)
    let sent = Scrape::of(&cache.url())
        .await
        .get("regcache_sendfile_bytes_total", &[]);
    assert!(
        (6.0 * MIB as f64..=24.0 * MIB as f64).contains(&sent),
        "bytes by sendfile: {sent}"
    );
    assert_eq!(up.count("GET", &layer), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_received_before_an_upstream_pause_reach_disk() {
    // Two pieces of about 300 KiB with 2 s before each: the first is less than one write batch
    // (512 KiB), so only the fill's linger (50 ms) writes it before the second arrives.
    let faults = Faults {
        drip: Some((2, Duration::from_secs(2))),
        ..Faults::default()
    };
    let (up, img, cache, layer, _) = cold_layer(faults, 7, 600 * 1024).await;
    let piece = img.layers[0].blob.len().div_ceil(2) as u64;
    assert!(piece < 512 * 1024, "the first piece is a part batch");
    let mut resp = http().get(blob_url(&cache, &layer)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = Vec::new();
    while (body.len() as u64) < piece {
        body.extend_from_slice(&resp.chunk().await.unwrap().expect("the first piece"));
    }
    // The client has the first piece; upstream pauses for 2 s before the second.
    let waited = std::time::Instant::now();
    while temp_file_len(&cache) < piece {
        assert!(
            waited.elapsed() < Duration::from_millis(1500),
            "the first piece is not on disk: {} bytes",
            temp_file_len(&cache)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(temp_file_len(&cache), piece);
    assert_eq!(
        up.load.blobs_completed.load(SeqCst),
        0,
        "upstream is mid-blob"
    );
    while let Some(chunk) = resp.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    assert_eq!(image::sha256(&body), layer);
    assert_eq!(up.count("GET", &layer), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_mid_blob_fails_at_the_read_timeout_and_nothing_is_kept() {
    // Half of a 600 KiB blob at once (a part batch, so the linger runs too), then 10 s of
    // silence: the fill gives up after read_timeout, counted from the last frame.
    let faults = Faults {
        stall_blobs: Some(Duration::from_secs(10)),
        ..Faults::default()
    };
    let (up, img) = upstream_with_layer(faults, 8, 600 * 1024).await;
    let cache = Regcache::start(&up.url(), |c| {
        let u = c.upstreams.get_mut("docker.io").unwrap();
        u.read_timeout = Duration::from_millis(500);
    })
    .await;
    let layer = img.layers[0].digest();
    let url = blob_url(&cache, &layer);

    let got = tokio::time::timeout(Duration::from_secs(5), get_all(&url))
        .await
        .expect("the stalled fill gave up long before upstream went on");
    assert!(got.is_err(), "a stalled body looked complete");
    let timeouts = |s: &Scrape| {
        s.get(
            "regcache_upstream_errors_total",
            &[("upstream", "docker.io"), ("reason", "timeout")],
        )
    };
    Scrape::until(&cache.url(), |s| {
        timeouts(s) == 1.0 && s.get("regcache_fetches_in_flight", &[]) == 0.0
    })
    .await;
    assert_eq!(cache.stored_files(), 0, "nothing kept");
    assert_eq!(temp_file_len(&cache), 0, "the temp file is gone");

    up.set(|f| f.stall_blobs = None);
    assert_eq!(image::sha256(&get_all(&url).await.unwrap()), layer);
    assert_eq!(up.count("GET", &layer), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_concurrency_is_capped_and_the_rest_wait_in_line() {
    let up = FakeRegistry::start(Faults {
        drip: Some((4, Duration::from_millis(40))),
        ..Faults::default()
    })
    .await;
    let img = Image::new(
        image::DOCKER_V2,
        "amd64",
        (0..6).map(|i| Layer::new(60 + i, 64 << 10)).collect(),
    );
    up.add("library/app", "1", &img);
    let cache = Regcache::start(&up.url(), |c| {
        c.upstreams.get_mut("docker.io").unwrap().max_concurrent = 2;
    })
    .await;
    let tasks: Vec<_> = img
        .layers
        .iter()
        .map(|l| {
            let (url, d) = (blob_url(&cache, &l.digest()), l.digest());
            tokio::spawn(async move { (d, get_all(&url).await) })
        })
        .collect();
    for t in tasks {
        let (d, got) = t.await.unwrap();
        assert_eq!(image::sha256(&got.expect("queued, not failed")), d);
    }
    // The slot is held through the body, so the drip-fed bodies never overlapped past 2.
    assert_eq!(up.load.peak.load(SeqCst), 2);
    assert_eq!(up.count("GET", "/blobs/"), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_upstream_trips_the_breaker_and_clients_get_fast_answers() {
    let up = FakeRegistry::start(Faults::default()).await;
    let (cached, other) = (Image::simple(71, 1), Image::simple(72, 1));
    up.add("library/app", "1", &cached);
    up.add("library/other", "1", &other);
    let cache = Regcache::start(&up.url(), |c| {
        c.cache.tag_ttl = Duration::from_millis(1);
        let u = c.upstreams.get_mut("docker.io").unwrap();
        u.breaker_failures = 2;
        u.breaker_open_for = Duration::from_millis(800);
    })
    .await;
    assert_eq!(pull(&cache.url(), "app", "1").await, cached.digest());

    up.set(|f| f.status = Some(500));
    for _ in 0..2 {
        let resp = get_manifest(&cache.url(), "other", "1").await;
        assert_eq!(error_code(resp).await, (502, "UNAVAILABLE".into()));
    }
    let sent = up.requests().len();
    // Open: no upstream contact. Uncached content gets 503 with Retry-After ...
    let resp = get_manifest(&cache.url(), "other", "1").await;
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(error_code(resp).await, (503, "UNAVAILABLE".into()));
    // ... and a cached tag past its TTL is served stale.
    let resp = get_manifest(&cache.url(), "app", "1").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["cache-status"],
        "regcache; hit; detail=stale-upstream-unavailable"
    );
    assert_eq!(up.requests().len(), sent, "nothing sent while open");

    // After open_for one probe goes; upstream has healed, so the breaker closes.
    up.set(|f| f.status = None);
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(pull(&cache.url(), "other", "1").await, other.digest());
    assert_eq!(pull(&cache.url(), "app", "1").await, cached.digest());
}

/// A range of a cold blob is held back by its last byte until the whole blob's digest is
/// checked: sent corrupted, the 206 body is cut short; sent intact, it arrives byte-exact, and
/// only once upstream has sent the last byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_of_a_cold_blob_completes_only_once_the_digest_is_verified() {
    // Four pieces: bytes 0-99 are in the first, the flipped middle byte in the third.
    let faults = Faults {
        corrupt: true,
        drip: Some((4, Duration::from_millis(150))),
        ..Faults::default()
    };
    let (up, img, cache, layer, url) = cold_layer(faults, 80, 256 << 10).await;

    let resp = common::get_range(&http(), &url, "bytes=0-99").await;
    assert_eq!(
        resp.status(),
        206,
        "headers go out before the body is checked"
    );
    // Aborted (an error reading the body, or a short body) is what a client must see.
    let got = resp.bytes().await.map_or(0, |b| b.len());
    assert!(
        got < 100,
        "a range of a corrupted blob completed: {got} bytes"
    );
    assert_eq!(cache.stored_files(), 0, "nothing kept");
    assert_eq!(up.count("GET", &layer), 1);

    up.set(|f| f.corrupt = false);
    let completed = up.load.blobs_completed.load(SeqCst);
    let resp = common::get_range(&http(), &url, "bytes=0-99").await;
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 0-99/{}", img.layers[0].blob.len())
    );
    let body = resp.bytes().await.expect("an intact range completes");
    assert_eq!(body, img.layers[0].blob.slice(0..100));
    assert_eq!(
        up.load.blobs_completed.load(SeqCst),
        completed + 1,
        "the range completed only after upstream sent the last byte"
    );
    assert_eq!(up.count("GET", &layer), 2);
}

/// Upstream answering `200` with no bytes for a non-empty digest gets the client an OCI error,
/// not an empty `200`, and nothing is cached: the next request asks upstream again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_answer_for_a_non_empty_blob_is_an_error_and_not_kept() {
    let faults = Faults {
        empty_blobs: true,
        ..Faults::default()
    };
    let (up, _, cache, layer, url) = cold_layer(faults, 81, 64 << 10).await;

    // Each attempt is a fill of its own: several, as the old failure (an empty 200) needed its
    // request to see upstream's headers before the fill's digest check failed.
    for attempt in 1..=4 {
        let resp = http().get(&url).send().await.unwrap();
        assert_ne!(resp.status(), 200, "an empty 200 for {layer}");
        assert_eq!(error_code(resp).await, (502, "UNAVAILABLE".into()));
        assert_eq!(
            up.count("GET", &layer),
            attempt,
            "each request asked upstream"
        );
    }
    assert_eq!(cache.stored_files(), 0, "nothing kept");

    up.set(|f| f.empty_blobs = false);
    assert_eq!(image::sha256(&get_all(&url).await.unwrap()), layer);
    assert_eq!(up.count("GET", &layer), 5);
}

/// A request that joined a fill started for another repository, which upstream answered 404
/// there, gets a fetch through its own repository instead of that 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_of_a_fill_that_failed_in_another_repository_fetches_its_own() {
    let faults = Faults {
        missing_blobs_in: Some(("library/nope".into(), Duration::from_millis(600))),
        ..Faults::default()
    };
    let (up, _, cache, layer, _) = cold_layer(faults, 82, 128 << 10).await;
    let nope = format!("/v2/library/nope/blobs/{layer}");
    let app = format!("/v2/library/app/blobs/{layer}");

    // A starts the fill through `nope`; B asks through `app` while upstream sits on A's GET.
    let a = tokio::spawn({
        let url = format!("{}/v2/nope/blobs/{layer}", cache.url());
        async move { http().get(&url).send().await.unwrap() }
    });
    let waited = std::time::Instant::now();
    while up.count("GET", &nope) == 0 {
        assert!(
            waited.elapsed() < Duration::from_secs(5),
            "A's GET reached upstream"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sent = std::time::Instant::now();
    let b = get_all(&blob_url(&cache, &layer)).await;
    assert!(
        sent.elapsed() > Duration::from_millis(300),
        "B joined A's fill and waited for it to fail, not a fill of its own"
    );
    assert_eq!(
        up.count("GET", &app),
        1,
        "B's fetch went through its own repository"
    );

    let a = a.await.unwrap();
    assert_eq!(error_code(a).await, (404, "BLOB_UNKNOWN".into()));
    assert_eq!(image::sha256(&b.expect("B gets the blob")), layer);
    assert_eq!(up.count("GET", &nope), 1, "A's fill was asked once");
    assert_eq!(up.count("GET", &layer), 2);
}

/// `HEAD` ignores `Range` (only GET has ranges): 200 with the whole blob's length and no
/// `Content-Range`, for a blob on disk and for one that is not, however far the range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_with_a_range_describes_the_whole_blob() {
    let up = FakeRegistry::start(Faults::default()).await;
    let img = Image::new(
        image::DOCKER_V2,
        "amd64",
        vec![Layer::new(83, 100 << 10), Layer::new(84, 50 << 10)],
    );
    up.add("library/app", "1", &img);
    let cache = Regcache::start(&up.url(), |_| {}).await;
    let (cached, cold) = (&img.layers[0], &img.layers[1]);

    let url = blob_url(&cache, &cached.digest());
    assert_eq!(
        image::sha256(&get_all(&url).await.unwrap()),
        cached.digest()
    );
    Scrape::until(&cache.url(), |s| {
        s.get("regcache_cache_objects", &[]) == 1.0
            && s.get("regcache_fetches_in_flight", &[]) == 0.0
    })
    .await;

    for (layer, cache_status) in [(cached, "regcache; hit"), (cold, "regcache; fwd=uri-miss")] {
        let url = blob_url(&cache, &layer.digest());
        for range in ["bytes=0-99", "bytes=99999999-"] {
            let resp = http()
                .head(&url)
                .header("range", range)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "HEAD {range}");
            let h = resp.headers();
            assert_eq!(h["content-length"], layer.blob.len().to_string());
            assert!(!h.contains_key("content-range"), "HEAD {range}");
            assert_eq!(h["docker-content-digest"], layer.digest().as_str());
            let status = h["cache-status"].to_str().unwrap();
            assert!(status.starts_with(cache_status), "{status}");
        }
    }
    assert_eq!(
        up.count("HEAD", &cached.digest()),
        0,
        "the cached one is a hit"
    );
    assert_eq!(up.count("HEAD", &cold.digest()), 2);
    assert_eq!(up.count("GET", &cold.digest()), 0, "a HEAD fetches nothing");
}
