//! What a real registry cannot do on demand, from the in-process fake upstream: token auth,
//! CDN redirects, corrupt bytes, resets, stalls, failover, error statuses, pagination.

mod common;

use std::path::Path;
use std::time::Duration;

use common::fake::{FAKE_TOKEN, FakeRegistry, Faults};
use common::image::{self, Image};
use common::{Regcache, error_code, get_manifest, http, pull, pull_as};

const CLIENT_AUTH: &str = "Bearer client-secret-from-dockerd";

/// A file under `dir` named for `digest`'s hex, if any.
fn stored(dir: &Path, digest: &str) -> bool {
    let hex = digest.split_once(':').unwrap().1;
    walk(dir).iter().any(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().contains(hex))
    })
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .flat_map(|e| {
            let p = e.path();
            if p.is_dir() { walk(&p) } else { vec![p] }
        })
        .collect()
}

fn upstream_saw(up: &FakeRegistry, needle: &str) -> bool {
    up.requests().iter().any(|r| {
        r.authorization
            .as_deref()
            .is_some_and(|a| a.contains(needle))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_with_configured_credentials_and_no_client_credentials_upstream() {
    let basic = "Basic dXNlcjpzM2NyZXQ="; // user:s3cret
    let up = FakeRegistry::start(Faults {
        token_auth: true,
        token_requires: Some(basic.to_owned()),
        ..Faults::default()
    })
    .await;
    let img = Image::simple(11, 3);
    up.add("team/private", "1.0", &img);

    // Without credentials the token endpoint refuses: a clear DENIED, nothing stored.
    let anon = Regcache::start(&up.url(), |_| {}).await;
    let (status, code) = error_code(get_manifest(&anon.url(), "team/private", "1.0").await).await;
    assert_eq!((status, code.as_str()), (403, "DENIED"));
    assert_eq!(anon.stored_files(), 0);

    let cache = Regcache::start(&up.url(), |c| {
        let u = c.upstreams.get_mut("docker.io").unwrap();
        u.username = Some("user".into());
        u.password = Some("s3cret".into());
    })
    .await;
    let got = pull_as(&cache.url(), "team/private", "1.0", Some(CLIENT_AUTH)).await;
    assert_eq!(got, img.digest());
    // The anonymous cache asked once without credentials; the configured one once with
    // them, and reused that token for the manifest and every blob.
    let token_requests: Vec<_> = up
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/token"))
        .collect();
    let with_basic = token_requests
        .iter()
        .filter(|r| r.authorization.as_deref() == Some(basic))
        .count();
    assert_eq!(
        (token_requests.len(), with_basic),
        (2, 1),
        "{token_requests:?}"
    );
    assert!(
        token_requests.iter().any(
            |r| r.path.contains("scope=repository%3Ateam%2Fprivate%3Apull")
                || r.path.contains("scope=repository:team/private:pull")
        ),
        "token asked for the repository's pull scope: {token_requests:?}"
    );
    assert_eq!(up.count("GET", "/blobs/"), 4);
    assert!(upstream_saw(&up, FAKE_TOKEN));
    assert!(
        !upstream_saw(&up, "client-secret"),
        "the client's Authorization never goes upstream"
    );
    assert!(
        up.requests()
            .iter()
            .filter(|r| !r.path.starts_with("/token"))
            .all(|r| r.authorization.as_deref() != Some(basic)),
        "the password goes to the token realm only, never to the registry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_token_is_fetched_once_and_reused() {
    let up = FakeRegistry::start(Faults {
        token_auth: true,
        ..Faults::default()
    })
    .await;
    let img = Image::simple(12, 4);
    up.add("library/busybox", "latest", &img);
    let cache = Regcache::start(&up.url(), |_| {}).await;
    assert_eq!(pull(&cache.url(), "busybox", "latest").await, img.digest());
    assert_eq!(up.count("GET", "/token"), 1);
    // 1 manifest + 5 blobs, each with the token (after at most one 401 to learn the realm).
    let with_token = up
        .requests()
        .iter()
        .filter(|r| r.authorization.as_deref() == Some(&format!("Bearer {FAKE_TOKEN}")))
        .count();
    assert_eq!(with_token, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_redirects_to_another_origin_carry_no_authorization() {
    let cdn = FakeRegistry::start(Faults::default()).await;
    let up = FakeRegistry::start(Faults {
        token_auth: true,
        redirect_blobs_to: Some(cdn.url()),
        ..Faults::default()
    })
    .await;
    let img = Image::simple(13, 2);
    up.add("library/redis", "7", &img);
    cdn.add("unused", "x", &img);
    let cache = Regcache::start(&up.url(), |_| {}).await;

    assert_eq!(
        pull_as(&cache.url(), "redis", "7", Some(CLIENT_AUTH)).await,
        img.digest()
    );
    assert_eq!(
        cdn.count("GET", "/cdn/"),
        3,
        "config + 2 layers via the CDN"
    );
    assert!(
        cdn.requests().iter().all(|r| r.authorization.is_none()),
        "no Authorization crosses to the CDN: {:?}",
        cdn.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_blob_is_never_served_whole_nor_cached() {
    let up = FakeRegistry::start(Faults {
        corrupt: true,
        ..Faults::default()
    })
    .await;
    let img = Image::simple(14, 1);
    up.add("library/app", "1", &img);
    let cache = Regcache::start(&up.url(), |_| {}).await;
    let layer = img.layers[0].digest();
    let url = format!("{}/v2/app/blobs/{layer}", cache.url());

    for _ in 0..2 {
        // Headers may already be out when the mismatch shows; the body must then break. If
        // the mismatch shows after the 200 was decided but before hyper wrote it, the
        // connection closes with no answer at all, which is as safe.
        match http().get(&url).send().await {
            Ok(resp) if resp.status() == 200 => assert!(
                resp.bytes().await.is_err(),
                "a complete-looking wrong blob reached the client"
            ),
            Ok(resp) => assert_eq!(error_code(resp).await, (502, "UNAVAILABLE".into())),
            Err(e) => assert!(e.is_request(), "{e}"),
        }
        assert!(!stored(cache.data.path(), &layer), "corrupt blob committed");
    }
    assert_eq!(
        up.count("GET", &layer),
        2,
        "a failed fill is not remembered"
    );

    // A corrupt manifest by digest is refused the same way.
    let (status, code) = error_code(get_manifest(&cache.url(), "app", &img.digest()).await).await;
    assert_eq!((status, code.as_str()), (502, "UNAVAILABLE"));
    assert!(!stored(cache.data.path(), &img.digest()));

    // Upstream heals: the next requests fetch afresh and get the right bytes.
    up.set(|f| f.corrupt = false);
    assert_eq!(pull(&cache.url(), "app", "1").await, img.digest());
    assert!(stored(cache.data.path(), &layer));
    assert_eq!(up.count("GET", &layer), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_mid_blob_aborts_the_client_and_commits_nothing() {
    let up = FakeRegistry::start(Faults {
        reset_blobs: true,
        ..Faults::default()
    })
    .await;
    let img = Image::simple(15, 1);
    up.add("library/app", "1", &img);
    let cache = Regcache::start(&up.url(), |_| {}).await;
    let layer = img.layers[0].digest();
    let url = format!("{}/v2/app/blobs/{layer}", cache.url());

    let resp = http().get(&url).send().await.unwrap();
    if resp.status() == 200 {
        assert!(
            resp.bytes().await.is_err(),
            "truncated blob looked complete"
        );
    } else {
        assert_eq!(error_code(resp).await.1, "UNAVAILABLE");
    }
    assert!(!stored(cache.data.path(), &layer));

    up.set(|f| f.reset_blobs = false);
    let resp = http().get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        image::sha256(&resp.bytes().await.unwrap()),
        layer,
        "refetched whole"
    );
    assert_eq!(up.count("GET", &layer), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_revalidation_serves_the_cached_tag_after_revalidate_timeout() {
    let up = FakeRegistry::start(Faults::default()).await;
    let img = Image::simple(16, 1);
    up.add("library/app", "1", &img);
    let cache = Regcache::start(&up.url(), |c| {
        c.cache.tag_ttl = Duration::from_millis(1);
        c.cache.revalidate_timeout = Duration::from_millis(300);
        // Longer than the test's own bound: only revalidate_timeout can answer in time.
        let u = c.upstreams.get_mut("docker.io").unwrap();
        u.response_timeout = Duration::from_secs(60);
    })
    .await;
    assert_eq!(pull(&cache.url(), "app", "1").await, img.digest());
    tokio::time::sleep(Duration::from_millis(20)).await;
    up.set(|f| f.stall_head = Some(Duration::from_secs(30)));

    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        get_manifest(&cache.url(), "app", "1"),
    )
    .await
    .expect("answered without waiting for the stalled upstream");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["cache-status"],
        "regcache; hit; detail=stale-upstream-unavailable"
    );
    assert_eq!(
        resp.headers()["docker-content-digest"],
        img.digest().as_str()
    );
    assert_eq!(
        up.count("HEAD", "/manifests/1"),
        1,
        "the revalidation was tried"
    );
}

/// A tag past its TTL whose cached manifest is gone (purged, as eviction would) has nothing
/// stale to serve: its slow revalidation is waited for past `revalidate_timeout`, and the
/// client gets the manifest, not a 404 that is then negatively cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_revalidation_of_a_tag_whose_manifest_is_gone_is_waited_for() {
    let up = FakeRegistry::start(Faults::default()).await;
    let img = Image::simple(22, 1);
    up.add("library/app", "1", &img);
    let cache = Regcache::start(&up.url(), |c| {
        c.cache.tag_ttl = Duration::from_millis(1);
        c.cache.revalidate_timeout = Duration::from_millis(200);
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let admin = format!("http://{}", cache.admin_addr.expect("admin listener"));
    let resp = get_manifest(&cache.url(), "app", "1").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["docker-content-digest"],
        img.digest().as_str()
    );

    // Purging the manifest by digest removes its file, index entry and in-memory copy, and
    // keeps the tag entry that names it.
    let resp = http()
        .delete(format!("{admin}/admin/purge?digest={}", img.digest()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let purged: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(purged["tags"], serde_json::json!([]));
    assert_eq!(purged["objects"], serde_json::json!([img.digest()]));
    assert!(!stored(cache.data.path(), &img.digest()));
    let ls: serde_json::Value =
        common::get_json(format!("{admin}/admin/ls?repo=library/app")).await;
    assert_eq!(ls[0]["tag"], "1", "the tag entry is kept: {ls}");
    assert_eq!(ls[0]["digest"], img.digest().as_str());

    // Past the TTL, with a revalidation five times slower than revalidate_timeout.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let stall = Duration::from_secs(1);
    up.set(|f| f.stall_head = Some(stall));
    let started = std::time::Instant::now();
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        get_manifest(&cache.url(), "app", "1"),
    )
    .await
    .expect("answered once the stalled HEAD did");
    assert_eq!(resp.status(), 200, "the tag, not a 404");
    assert!(
        started.elapsed() >= stall,
        "waited for the revalidation rather than give up at revalidate_timeout"
    );
    assert_eq!(
        resp.headers()["docker-content-digest"],
        img.digest().as_str()
    );
    assert_eq!(resp.bytes().await.unwrap(), img.manifest);
    assert_eq!(up.count("HEAD", "/manifests/1"), 1, "revalidated once");
    assert_eq!(up.count("GET", "/manifests/1"), 2, "then fetched again");

    // Nothing was negatively cached: the next request gets the tag too.
    up.set(|f| f.stall_head = None);
    let resp = get_manifest(&cache.url(), "app", "1").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["docker-content-digest"],
        img.digest().as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_with_several_urls_fails_over_to_the_next() {
    let up = FakeRegistry::start(Faults::default()).await;
    let img = Image::simple(17, 2);
    up.add("library/app", "1", &img);
    // A port nothing listens on.
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let cache = Regcache::start(&dead, |c| {
        c.upstreams
            .get_mut("docker.io")
            .unwrap()
            .urls
            .push(up.url());
    })
    .await;
    assert_eq!(pull(&cache.url(), "app", "1").await, img.digest());
    assert_eq!(up.count("GET", "/blobs/"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_error_statuses_become_oci_errors_and_nothing_is_stored() {
    let up = FakeRegistry::start(Faults::default()).await;
    let img = Image::simple(18, 1);
    up.add("library/app", "1", &img);
    let cache = Regcache::start(&up.url(), |_| {}).await;

    up.set(|f| f.status = Some(503));
    let resp = get_manifest(&cache.url(), "app", "1").await;
    assert_eq!(error_code(resp).await, (502, "UNAVAILABLE".into()));
    let layer = img.layers[0].digest();
    let resp = http()
        .get(format!("{}/v2/app/blobs/{layer}", cache.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (502, "UNAVAILABLE".into()));
    assert_eq!(cache.stored_files(), 0);

    // Recovery is immediate (below the breaker's threshold): failures are not cached.
    up.set(|f| f.status = None);
    assert_eq!(pull(&cache.url(), "app", "1").await, img.digest());

    // A 429 is passed on with upstream's Retry-After, and honoured: until it passes, no
    // request goes upstream and clients hear 429 at once.
    up.set(|f| f.status = Some(429));
    let resp = get_manifest(&cache.url(), "app", "2").await;
    assert_eq!(resp.headers()["retry-after"], "7", "Retry-After passed on");
    assert_eq!(error_code(resp).await, (429, "TOOMANYREQUESTS".into()));
    let before = up.requests().len();
    let resp = get_manifest(&cache.url(), "app", "3").await;
    let wait: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=7).contains(&wait), "remaining pause, got {wait}");
    assert_eq!(error_code(resp).await, (429, "TOOMANYREQUESTS".into()));
    assert_eq!(up.requests().len(), before, "nothing sent while paused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_list_pagination_links_point_back_at_the_cache() {
    let up = FakeRegistry::start(Faults::default()).await;
    let img = Image::simple(19, 1);
    for tag in ["a", "b", "c"] {
        up.add("library/app", tag, &img);
    }
    let cache = Regcache::start(&up.url(), |_| {}).await;

    // Short name: upstream's /v2/library/app link becomes the client's /v2/app.
    let resp = http()
        .get(format!("{}/v2/app/tags/list?n=2", cache.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["link"],
        "</v2/app/tags/list?n=2&last=b>; rel=\"next\""
    );
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["a", "b"]));

    // Following the link through the cache gives the rest and no further link.
    let resp = http()
        .get(format!("{}/v2/app/tags/list?n=2&last=b", cache.url()))
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("link").is_none());
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["c"]));

    // containerd's ns is ours: kept on the link, never sent upstream.
    let resp = http()
        .get(format!(
            "{}/v2/library/app/tags/list?n=1&ns=docker.io",
            cache.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["link"],
        "</v2/library/app/tags/list?n=1&last=a&ns=docker.io>; rel=\"next\""
    );
    assert!(up.requests().iter().all(|r| !r.path.contains("ns=")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_quirks_no_digest_header_generic_type_and_no_manifest_head() {
    let up = FakeRegistry::start(Faults {
        quirks: true,
        ..Faults::default()
    })
    .await;
    let v1 = Image::simple(20, 1);
    up.add("library/app", "1", &v1);
    let cache = Regcache::start(&up.url(), |c| {
        c.cache.tag_ttl = Duration::from_millis(1);
    })
    .await;

    // No Docker-Content-Digest upstream: regcache computes it; the generic Content-Type is
    // replaced by the manifest's own media type.
    let resp = get_manifest(&cache.url(), "app", "1").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["docker-content-digest"],
        v1.digest().as_str()
    );
    assert_eq!(resp.headers()["content-type"], image::DOCKER_V2);
    assert_eq!(pull(&cache.url(), "app", "1").await, v1.digest());

    // Past the TTL, revalidation's HEAD gets 405: regcache falls back to GET and sees the move.
    let v2 = Image::simple(21, 1);
    up.add("library/app", "1", &v2);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let resp = get_manifest(&cache.url(), "app", "1").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["docker-content-digest"],
        v2.digest().as_str()
    );
    assert!(up.count("HEAD", "/manifests/1") >= 1);
    assert_eq!(pull(&cache.url(), "app", "1").await, v2.digest());
}
