//! Pull-through behaviour against a real upstream (Debian's `docker-registry`) behind a meter
//! that counts what regcache asks for.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use regcache::config::Sendfile;

use common::fake::{Fake, respond};
use common::image::{self, DOCKER_LIST, DOCKER_V2, OCI_INDEX, OCI_MANIFEST};
use common::{
    ACCEPT_ALL, Image, Layer, Meter, Regcache, Registry, Scrape, get_blob, get_manifest, http, pull,
};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_pull_is_served_from_disk() {
    let s = setup(|_| {}).await;
    let img = Image::simple(1, 3);
    s.registry.push("library/alpine", "3.19", &img).await;

    let d1 = pull(&s.cache.url(), "alpine", "3.19").await;
    assert_eq!(d1, img.digest());
    assert_eq!(
        s.meter.blob_gets(),
        4,
        "config + 3 layers fetched once each"
    );

    s.meter.reset();
    let d2 = pull(&s.cache.url(), "library/alpine", "3.19").await;
    assert_eq!(d2, d1);
    assert_eq!(
        s.meter.blob_gets(),
        0,
        "no upstream blob GET on the second pull"
    );
    assert_eq!(
        s.meter.total(),
        0,
        "within the tag TTL nothing goes upstream at all"
    );

    let resp = get_manifest(&s.cache.url(), "alpine", "3.19").await;
    assert_eq!(resp.headers()["cache-status"], "regcache; hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_base_layer_is_fetched_once_across_repositories() {
    let s = setup(|_| {}).await;
    let base = Layer::new(42, 200_000);
    let a = Image::new(DOCKER_V2, "amd64", vec![base.clone(), Layer::new(43, 1000)]);
    let b = Image::new(
        OCI_MANIFEST,
        "amd64",
        vec![base.clone(), Layer::new(44, 1000)],
    );
    s.registry.push("team/a", "1", &a).await;
    s.registry.push("team/b", "1", &b).await;

    pull(&s.cache.url(), "team/a", "1").await;
    pull(&s.cache.url(), "team/b", "1").await;
    assert_eq!(
        s.meter.count("GET", &base.digest()),
        1,
        "base layer fetched once for both repos"
    );
    assert_eq!(s.meter.blob_gets(), 5, "2 configs + 3 distinct layers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_manifest_media_type_is_served_byte_exact() {
    let s = setup(|_| {}).await;
    let amd = Image::new(OCI_MANIFEST, "amd64", vec![Layer::new(5, 3000)]);
    let arm = Image::new(OCI_MANIFEST, "arm64", vec![Layer::new(6, 3000)]);
    let docker_amd = Image::new(DOCKER_V2, "amd64", vec![Layer::new(7, 3000)]);
    let docker_arm = Image::new(DOCKER_V2, "arm64", vec![Layer::new(8, 3000)]);
    let cases = [
        ("docker", docker_amd.clone()),
        ("oci", amd.clone()),
        ("ociindex", Image::index(OCI_INDEX, vec![amd, arm])),
        (
            "dockerlist",
            Image::index(DOCKER_LIST, vec![docker_amd, docker_arm]),
        ),
    ];
    for (repo, img) in &cases {
        s.registry.push(&format!("mt/{repo}"), "v1", img).await;
    }
    for (repo, img) in &cases {
        let resp = http()
            .get(format!("{}/v2/mt/{repo}/manifests/v1", s.cache.url()))
            .header("accept", img.media_type.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{repo}");
        assert_eq!(
            resp.headers()["content-type"],
            img.media_type.as_str(),
            "{repo}"
        );
        assert_eq!(
            resp.headers()["docker-content-digest"],
            img.digest().as_str(),
            "{repo}"
        );
        assert_eq!(
            resp.headers()["content-length"],
            img.manifest.len().to_string().as_str()
        );
        assert_eq!(
            resp.bytes().await.unwrap(),
            img.manifest,
            "{repo}: byte-exact"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_arch_index_fetches_only_the_platform_asked_for() {
    let s = setup(|_| {}).await;
    let amd = Image::new(OCI_MANIFEST, "amd64", vec![Layer::new(11, 5000)]);
    let arm = Image::new(OCI_MANIFEST, "arm64", vec![Layer::new(12, 5000)]);
    let index = Image::index(OCI_INDEX, vec![amd.clone(), arm.clone()]);
    s.registry.push("multi/app", "1", &index).await;

    let resp = get_manifest(&s.cache.url(), "multi/app", "1").await;
    assert_eq!(resp.bytes().await.unwrap(), index.manifest);
    pull(&s.cache.url(), "multi/app", &arm.digest()).await;
    assert_eq!(s.meter.count("GET", &arm.digest()), 1);
    assert_eq!(
        s.meter.count("GET", &amd.digest()),
        0,
        "the other platform's manifest is not fetched"
    );
    assert_eq!(
        s.meter.count("GET", &amd.layers[0].digest()),
        0,
        "nor its layers"
    );
    assert_eq!(s.meter.blob_gets(), 2, "arm64 config + layer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_and_range_requests() {
    let s = setup(|_| {}).await;
    let layer = Layer::new(21, 100_000);
    let img = Image::new(DOCKER_V2, "amd64", vec![layer.clone()]);
    s.registry.push("r/img", "1", &img).await;
    let base = s.cache.url();
    let client = http();
    let url = format!("{base}/v2/r/img/blobs/{}", layer.digest());
    let size = layer.blob.len();

    // HEAD of an uncached blob asks upstream with HEAD and downloads nothing.
    let resp = client.head(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], size.to_string().as_str());
    assert_eq!(
        resp.headers()["docker-content-digest"],
        layer.digest().as_str()
    );
    assert_eq!(s.meter.blob_gets(), 0);
    assert_eq!(s.meter.count("HEAD", &layer.digest()), 1);
    // Content named by its digest never changes: a year, as distribution says.
    assert_eq!(resp.headers()["cache-control"], "max-age=31536000");

    // A range of an uncached blob: 206 with exactly those bytes (the fill runs behind it).
    let resp = common::get_range(&client, &url, "bytes=100-199").await;
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 100-199/{size}").as_str()
    );
    assert_eq!(resp.headers()["cache-control"], "max-age=31536000");
    assert_eq!(resp.bytes().await.unwrap(), layer.blob.slice(100..200));

    // Cached: suffix and open ranges, HEAD from disk, 416 past the end.
    let full = get_blob(&base, "r/img", &layer.digest()).await;
    assert_eq!(full, layer.blob);
    let resp = common::get_range(&client, &url, "bytes=-10").await;
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await.unwrap(), layer.blob.slice(size - 10..));
    let resp = common::get_range(&client, &url, format!("bytes={}-", size - 5)).await;
    assert_eq!(resp.bytes().await.unwrap(), layer.blob.slice(size - 5..));
    let resp = common::get_range(&client, &url, format!("bytes={size}-")).await;
    assert_eq!(resp.status(), 416);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes */{size}").as_str()
    );
    s.meter.reset();
    let resp = client.head(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-status"], "regcache; hit");
    assert_eq!(s.meter.total(), 0);
    assert_eq!(resp.headers()["cache-control"], "max-age=31536000");

    // Manifest HEAD carries the digest and type but no body.
    let resp = client
        .head(format!("{base}/v2/r/img/manifests/1"))
        .header("accept", ACCEPT_ALL)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["docker-content-digest"],
        img.digest().as_str()
    );
    assert_eq!(
        resp.headers()["content-length"],
        img.manifest.len().to_string().as_str()
    );
    // A tag moves: no lifetime is promised for it.
    assert!(resp.headers().get("cache-control").is_none());
    assert!(resp.bytes().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_tag_is_seen_after_the_ttl_and_not_before() {
    let s = setup(|c| c.cache.tag_ttl = Duration::from_millis(1500)).await;
    let v1 = Image::simple(31, 1);
    let v2 = Image::simple(32, 1);
    s.registry.push("ttl/app", "latest", &v1).await;
    assert_eq!(pull(&s.cache.url(), "ttl/app", "latest").await, v1.digest());

    s.registry.push("ttl/app", "latest", &v2).await;
    s.meter.reset();
    let resp = get_manifest(&s.cache.url(), "ttl/app", "latest").await;
    assert_eq!(
        resp.headers()["docker-content-digest"],
        v1.digest().as_str(),
        "within TTL: cached"
    );
    assert_eq!(s.meter.total(), 0);

    tokio::time::sleep(Duration::from_millis(1600)).await;
    let resp = get_manifest(&s.cache.url(), "ttl/app", "latest").await;
    assert_eq!(
        resp.headers()["docker-content-digest"],
        v2.digest().as_str(),
        "after TTL: moved"
    );
    assert_eq!(
        s.meter.count("HEAD", "/manifests/latest"),
        1,
        "revalidated with HEAD"
    );
    assert_eq!(
        s.meter.count("GET", "/manifests/latest"),
        1,
        "refetched because it moved"
    );

    // Unchanged after the next TTL: one HEAD, no GET.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    s.meter.reset();
    let resp = get_manifest(&s.cache.url(), "ttl/app", "latest").await;
    assert_eq!(
        resp.headers()["docker-content-digest"],
        v2.digest().as_str()
    );
    assert_eq!(
        resp.headers()["cache-status"],
        "regcache; fwd=stale; fwd-status=200"
    );
    assert_eq!(
        (
            s.meter.count("HEAD", "/manifests/"),
            s.meter.count("GET", "/manifests/")
        ),
        (1, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_images_are_served_stale_when_upstream_is_down() {
    let mut s = setup(|c| c.cache.tag_ttl = Duration::from_millis(300)).await;
    let img = Image::simple(41, 2);
    s.registry.push("library/busybox", "1", &img).await;
    pull(&s.cache.url(), "busybox", "1").await;

    s.registry.stop();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let resp = get_manifest(&s.cache.url(), "busybox", "1").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["cache-status"],
        "regcache; hit; detail=stale-upstream-unavailable"
    );
    assert_eq!(pull(&s.cache.url(), "busybox", "1").await, img.digest());

    // Something never cached gets a clear upstream error, not a hang.
    let resp = get_manifest(&s.cache.url(), "busybox", "2").await;
    let (status, code) = common::error_code(resp).await;
    assert_eq!((status, code.as_str()), (502, "UNAVAILABLE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_serving_is_bounded_by_max_stale() {
    let mut s = setup(|c| {
        c.cache.tag_ttl = Duration::from_millis(200);
        c.cache.max_stale = Duration::from_millis(300);
    })
    .await;
    let img = Image::simple(45, 1);
    s.registry.push("library/old", "1", &img).await;
    pull(&s.cache.url(), "old", "1").await;
    s.registry.stop();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let resp = get_manifest(&s.cache.url(), "old", "1").await;
    assert_eq!(resp.status(), 502, "past max_stale the tag is not served");
    // Digests are immutable: by digest it is still served.
    let resp = get_manifest(&s.cache.url(), "old", &img.digest()).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_things_get_oci_errors() {
    let s = setup(|_| {}).await;
    let img = Image::simple(51, 1);
    s.registry.push("known/repo", "1", &img).await;
    let base = s.cache.url();
    let (st, code) = common::error_code(get_manifest(&base, "known/repo", "nope").await).await;
    assert_eq!((st, code.as_str()), (404, "MANIFEST_UNKNOWN"));
    let missing = image::sha256(b"missing");
    let resp = http()
        .get(format!("{base}/v2/known/repo/blobs/{missing}"))
        .send()
        .await
        .unwrap();
    let (st, code) = common::error_code(resp).await;
    assert_eq!((st, code.as_str()), (404, "BLOB_UNKNOWN"));
    assert_eq!(
        common::count_files(&s.cache.data.path().join("tmp")),
        0,
        "failed fill left no temp file"
    );
}

/// A client whose `Accept` leaves out the OCI index type gets upstream's 404 for an index tag,
/// and that 404 is not negatively cached: a client taking every type then gets the index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narrow_accept_404_does_not_hide_the_tag_from_other_clients() {
    let s = setup(|_| {}).await;
    let amd = Image::new(OCI_MANIFEST, "amd64", vec![Layer::new(91, 3000)]);
    let arm = Image::new(OCI_MANIFEST, "arm64", vec![Layer::new(92, 3000)]);
    let index = Image::index(OCI_INDEX, vec![amd, arm]);
    s.registry.push("narrow/app", "1", &index).await;
    let base = s.cache.url();

    // distribution 2.8 answers an OCI index asked for as a Docker v2 manifest alone with 404
    // MANIFEST_UNKNOWN ("OCI index found, but accept header does not support OCI indexes").
    let resp = http()
        .get(format!("{base}/v2/narrow/app/manifests/1"))
        .header("accept", DOCKER_V2)
        .send()
        .await
        .unwrap();
    let (status, code) = common::error_code(resp).await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
    assert_eq!(
        s.meter.count("GET", "/manifests/1"),
        1,
        "the narrow request was upstream's to answer"
    );

    let resp = get_manifest(&base, "narrow/app", "1").await;
    assert_eq!(
        resp.status(),
        200,
        "a client taking every type is not refused by the narrow client's 404"
    );
    assert_eq!(
        resp.headers()["docker-content-digest"],
        index.digest().as_str()
    );
    assert_eq!(resp.headers()["content-type"], OCI_INDEX);
    assert_eq!(resp.bytes().await.unwrap(), index.manifest);
    assert_eq!(
        s.meter.count("GET", "/manifests/1"),
        2,
        "asked upstream, not answered from a negative cache"
    );
}

/// A tag list over the 4 MiB manifest limit (the spec sets none for lists) comes through
/// whole, and is cached like a small one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_list_over_4_mib_comes_through() {
    let tags: Vec<String> = (0..300_000).map(|i| format!("nightly-{i:08}")).collect();
    let list =
        bytes::Bytes::from(serde_json::json!({ "name": "library/big", "tags": tags }).to_string());
    assert!(list.len() > 5 << 20, "{} bytes", list.len());
    let body = list.clone();
    let up = common::fake::Fake::start(move |parts| {
        let body = body.clone();
        async move {
            match parts.uri.path() {
                "/v2/library/big/tags/list" => {
                    common::fake::respond(200, &[("content-type", "application/json")], body)
                }
                "/v2/" => common::fake::respond(200, &[], "{}"),
                _ => common::fake::respond(404, &[], ""),
            }
        }
    })
    .await;
    let cache = Regcache::start(&up.url(), |_| {}).await;
    for _ in 0..2 {
        let resp = cache.get("/v2/big/tags/list").await;
        assert_eq!(resp.status(), 200);
        assert!(resp.bytes().await.unwrap() == list, "the list, whole");
    }
    assert_eq!(
        up.count("GET", "/tags/list"),
        1,
        "the second from the cache"
    );
}

/// A client that lists the index types with `q=0` refuses them (RFC 9110, 12.4.2): it is not
/// served the cached index, its request is upstream's to answer, and its answer is not cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_weighted_zero_is_refused_not_served_from_the_cache() {
    let s = setup(|_| {}).await;
    let amd = Image::new(OCI_MANIFEST, "amd64", vec![Layer::new(93, 3000)]);
    let index = Image::index(OCI_INDEX, vec![amd]);
    s.registry.push("refusing/app", "1", &index).await;
    let base = s.cache.url();

    let resp = get_manifest(&base, "refusing/app", "1").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], OCI_INDEX);
    assert_eq!(s.meter.count("GET", "/manifests/1"), 1);

    let no_index = format!("{OCI_INDEX};q=0, {DOCKER_LIST};q=0, {OCI_MANIFEST}, {DOCKER_V2}");
    let resp = http()
        .get(format!("{base}/v2/refusing/app/manifests/1"))
        .header("accept", no_index)
        .send()
        .await
        .unwrap();
    assert_ne!(
        resp.headers()["cache-status"],
        "regcache; hit",
        "the cached index went to a client that refused it"
    );
    assert_eq!(
        s.meter.count("GET", "/manifests/1"),
        2,
        "the refusing client's request was upstream's to answer"
    );

    // `*/*` with the index weighted zero refuses it too; `*/*` alone takes the cached index.
    let resp = http()
        .get(format!("{base}/v2/refusing/app/manifests/1"))
        .header("accept", format!("*/*, {OCI_INDEX};q=0"))
        .send()
        .await
        .unwrap();
    assert_ne!(resp.headers()["cache-status"], "regcache; hit");
    assert_eq!(s.meter.count("GET", "/manifests/1"), 3);
    let resp = http()
        .get(format!("{base}/v2/refusing/app/manifests/1"))
        .header("accept", "*/*")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["cache-status"], "regcache; hit");
    assert_eq!(resp.headers()["content-type"], OCI_INDEX);
    assert_eq!(s.meter.count("GET", "/manifests/1"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_list_is_passed_through_and_briefly_cached() {
    let s = setup(|_| {}).await;
    for t in ["a", "b", "c"] {
        s.registry
            .push("library/tagged", t, &Image::simple(61, 1))
            .await;
    }
    let base = s.cache.url();
    let resp = http()
        .get(format!("{base}/v2/tagged/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    let mut tags: Vec<String> = serde_json::from_value(v["tags"].clone()).unwrap();
    tags.sort();
    assert_eq!(tags, ["a", "b", "c"]);
    let before = s.meter.count("GET", "/tags/list");
    http()
        .get(format!("{base}/v2/tagged/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        s.meter.count("GET", "/tags/list"),
        before,
        "reused within tags_list_ttl"
    );
}

/// An upstream below a base path (as Artifactory serves one) links its next tags page below
/// that path, relative or absolute and among other links; each link to the list is sent back
/// to regcache's own `/v2/` path under the client's name, so every page comes through regcache.
/// A fake upstream, as distribution 2.8 does not paginate tags lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_list_pages_of_an_upstream_below_a_base_path_come_through_regcache() {
    const PREFIX: &str = "/artifactory/api/docker/remote";
    let origin = Arc::new(OnceLock::<String>::new());
    let up = {
        let origin = Arc::clone(&origin);
        Fake::start(move |parts| {
            let origin = origin.get().cloned().unwrap_or_default();
            async move {
                let path = parts.uri.path();
                if path == format!("{PREFIX}/v2/") {
                    return respond(200, &[], "{}");
                }
                if path != format!("{PREFIX}/v2/team/paged/tags/list") {
                    return respond(404, &[], r#"{"errors":[{"code":"NAME_UNKNOWN"}]}"#);
                }
                let last = url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
                    .find(|(k, _)| k == "last")
                    .map(|(_, v)| v.into_owned());
                let (tags, link) = match last.as_deref() {
                    None => (
                        ["a"],
                        Some(format!(
                            "<{PREFIX}/v2/team/paged/tags/list?n=1&last=a>; rel=\"next\""
                        )),
                    ),
                    Some("a") => (
                        ["b"],
                        Some(format!(
                            "<https://docs.example/tags>; rel=\"help\", \
                             <{origin}{PREFIX}/v2/team/paged/tags/list?n=1&last=b>; rel=\"next\""
                        )),
                    ),
                    _ => (["c"], None),
                };
                let body = serde_json::json!({"name": "team/paged", "tags": tags}).to_string();
                let mut headers = vec![("content-type", "application/json")];
                if let Some(link) = &link {
                    headers.push(("link", link));
                }
                respond(200, &headers, body)
            }
        })
        .await
    };
    origin.set(up.url()).unwrap();
    let cache = Regcache::start(&format!("{}{PREFIX}", up.url()), |_| {}).await;
    let base = cache.url();

    let (mut next, mut tags, mut links) = (
        Some("/v2/docker.io/team/paged/tags/list?n=1".to_owned()),
        Vec::<String>::new(),
        Vec::new(),
    );
    while let Some(path) = next.take() {
        assert!(tags.len() < 3, "more pages than tags: {links:?}");
        let resp = http().get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path} (links so far: {links:?})");
        if let Some(link) = resp.headers().get("link") {
            let link = link.to_str().unwrap().to_owned();
            let target = link
                .split(", ")
                .find(|l| l.ends_with("rel=\"next\""))
                .and_then(|l| l.strip_prefix('<')?.split_once('>'))
                .map(|(uri, _)| uri.to_owned())
                .unwrap_or_else(|| panic!("no next link: {link}"));
            assert!(
                target.starts_with("/v2/docker.io/team/paged/tags/list?"),
                "not regcache's path for the client's name: {link}"
            );
            links.push(link);
            next = Some(target);
        }
        let v: serde_json::Value = resp.json().await.unwrap();
        tags.extend(serde_json::from_value::<Vec<String>>(v["tags"].clone()).unwrap());
    }
    assert_eq!(tags, ["a", "b", "c"], "{links:?}");
    assert_eq!(
        links[1],
        "<https://docs.example/tags>; rel=\"help\", \
         </v2/docker.io/team/paged/tags/list?n=1&last=b>; rel=\"next\"",
        "other links pass through"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_pulls_fetch_each_blob_once() {
    let s = setup(|_| {}).await;
    let layer = Layer::new(71, 3_000_000);
    let img = Image::new(DOCKER_V2, "amd64", vec![layer.clone()]);
    s.registry.push("library/big", "1", &img).await;
    let base = s.cache.url();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (base, d) = (base.clone(), layer.digest());
        tasks.push(tokio::spawn(
            async move { get_blob(&base, "big", &d).await },
        ));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), layer.blob);
    }
    assert_eq!(
        s.meter.count("GET", &layer.digest()),
        1,
        "one upstream GET for ten clients"
    );
    let fetched = s.meter.bytes.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        fetched <= layer.blob.len() as u64 + 4096,
        "upstream bytes {fetched} ~ one blob"
    );
}

/// Hot blobs on a plain HTTP/1.1 connection go out by sendfile (counted by
/// `regcache_sendfile_bytes_total`), byte-exact, whole and by Range, one after another on a
/// keep-alive connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_blobs_go_out_by_sendfile_byte_exact() {
    hot_blobs(Sendfile::Always).await;
}

/// `storage.sendfile = "never"`: the same bytes, copied from the mapping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_blobs_without_sendfile_are_the_same_bytes() {
    hot_blobs(Sendfile::Never).await;
}

/// The default, `"remote"`: this test's client is on loopback, so it gets hot blobs copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_blobs_to_a_loopback_client_are_copied_by_default() {
    assert_eq!(
        regcache::Config::embedded().storage.sendfile,
        Sendfile::Remote
    );
    hot_blobs(Sendfile::Remote).await;
}

async fn hot_blobs(mode: Sendfile) {
    let s = setup(|c| c.storage.sendfile = mode).await;
    let by_sendfile = |n: usize| {
        if mode == Sendfile::Always {
            n as f64
        } else {
            0.0
        }
    };
    // Over two lent chunks (4 MiB each), ending off a page boundary.
    let big = Layer::new(77, 9 * 1024 * 1024);
    let img = Image::new(DOCKER_V2, "amd64", vec![big.clone()]);
    s.registry.push("library/rcsend", "1", &img).await;
    let url = s.cache.url();
    let size = big.blob.len();
    let sent = || async {
        Scrape::of(&url)
            .await
            .get("regcache_sendfile_bytes_total", &[])
    };

    let cold = get_blob(&url, "library/rcsend", &big.digest()).await;
    assert_eq!(image::sha256(&cold), big.digest());
    // A fill's reader sends what is already on disk by sendfile, loopback or not (how much
    // depends on how far the writer was ahead of it: `tests/flight.rs` pins that down).
    let cold_sent = sent().await;
    let cold_max = if mode == Sendfile::Never { 0 } else { size };
    assert!(
        cold_sent <= cold_max as f64,
        "cold bytes by sendfile: {cold_sent}"
    );
    // The fill commits just after the client's last byte.
    Scrape::until(&url, |m| {
        m.get("regcache_cache_objects", &[]) >= 1.0
            && m.get("regcache_fetches_in_flight", &[]) == 0.0
    })
    .await;

    let client = reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let blob_url = format!("{url}/v2/library/rcsend/blobs/{}", big.digest());
    for round in 0..3 {
        let resp = client.get(&blob_url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["cache-status"], "regcache; hit");
        let body = resp.bytes().await.unwrap();
        assert_eq!(image::sha256(&body), big.digest(), "hot GET {round}");
    }
    assert_eq!(
        sent().await,
        cold_sent + by_sendfile(3 * size),
        "hot bytes by sendfile"
    );

    // A range across a chunk boundary, from an odd offset.
    let (start, end) = (4 * 1024 * 1024 - 3, 8 * 1024 * 1024 + 5);
    let resp = common::get_range(&client, &blob_url, format!("bytes={start}-{end}")).await;
    assert_eq!(resp.status(), 206);
    let body = resp.bytes().await.unwrap();
    assert_eq!(&body[..], &big.blob[start..=end]);
    assert_eq!(
        sent().await,
        cold_sent + by_sendfile(3 * size + end - start + 1)
    );
    assert_eq!(s.meter.blob_gets(), 1, "one upstream GET in all");
}

/// The referrers API (OCI distribution spec 1.1), which signature checks at admission read
/// (notation, cosign, Ratify): upstream's answer comes through as an image index with the
/// filters it applied, concurrent misses share one upstream request, an answer is reused within
/// `referrers_ttl`, and while upstream is down or sends garbage the last good answer is served
/// stale. A fake upstream, as distribution 2.8 has no referrers API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_are_shared_reused_and_served_stale_while_upstream_is_down() {
    use std::sync::atomic::{AtomicU8, Ordering};
    const SIG: &str = "application/vnd.cncf.notary.signature";
    let subject = image::sha256(b"the signed image's manifest");
    let referrer = |n: u8, artifact: &str| {
        serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "digest": image::sha256(&[n]),
            "size": 700 + u64::from(n),
            "artifactType": artifact,
        })
    };
    let all = vec![referrer(1, SIG), referrer(2, "application/spdx+json")];
    // 0: answers; 1: 503; 2: a captive portal's 200 page; 3: no referrers API (404).
    let mode = Arc::new(AtomicU8::new(0));
    let up = {
        let (mode, path) = (
            Arc::clone(&mode),
            format!("/v2/library/signed/referrers/{subject}"),
        );
        Fake::start(move |parts| {
            let (mode, all, path) = (mode.load(Ordering::SeqCst), all.clone(), path.clone());
            async move {
                if parts.uri.path() == "/v2/" {
                    return respond(200, &[], "{}");
                }
                match mode {
                    1 => return respond(503, &[], ""),
                    2 => return respond(200, &[("content-type", "text/html")], "<html>log in"),
                    3 => {
                        return respond(
                            404,
                            &[("content-type", "text/plain")],
                            "404 page not found",
                        );
                    }
                    _ if parts.uri.path() != path => return respond(404, &[], ""),
                    _ => {}
                }
                // Slow enough that concurrent clients overlap.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let wanted =
                    url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
                        .find(|(k, _)| k == "artifactType")
                        .map(|(_, v)| v.into_owned());
                let manifests: Vec<_> = all
                    .iter()
                    .filter(|d| {
                        wanted
                            .as_ref()
                            .is_none_or(|w| d["artifactType"] == w.as_str())
                    })
                    .cloned()
                    .collect();
                let body = serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": OCI_INDEX,
                    "manifests": manifests,
                })
                .to_string();
                let mut headers = vec![("content-type", OCI_INDEX)];
                if wanted.is_some() {
                    headers.push(("oci-filters-applied", "artifactType"));
                }
                respond(200, &headers, body)
            }
        })
        .await
    };
    let referrers = format!("/v2/signed/referrers/{subject}");
    let listed = |resp: reqwest::Response| async move {
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], OCI_INDEX);
        let filters = resp.headers().get("oci-filters-applied").cloned();
        let status = resp.headers()["cache-status"].to_str().unwrap().to_owned();
        let v: serde_json::Value = resp.json().await.unwrap();
        let types: Vec<String> = v["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["artifactType"].as_str().unwrap().to_owned())
            .collect();
        (types, filters, status)
    };

    // Default TTL: 8 clients at once cost one upstream request, and the next is a hit.
    let cache = Regcache::start(&up.url(), |_| {}).await;
    let asks = (0..8).map(|_| cache.get(&referrers));
    for resp in futures_util::future::join_all(asks).await {
        let (types, filters, _) = listed(resp).await;
        assert_eq!(types, [SIG, "application/spdx+json"]);
        assert!(filters.is_none(), "upstream applied no filter");
    }
    assert_eq!(up.count("GET", "/referrers/"), 1, "{:?}", up.requests());
    let (_, _, status) = listed(cache.get(&referrers).await).await;
    assert_eq!(status, "regcache; hit");
    // A filter is upstream's to apply, and the header saying it did comes through.
    let filtered = format!("{referrers}?artifactType={}", SIG.replace('/', "%2F"));
    let (types, filters, _) = listed(cache.get(&filtered).await).await;
    assert_eq!(types, [SIG]);
    assert_eq!(filters.unwrap(), "artifactType");
    assert_eq!(up.count("GET", "/referrers/"), 2);
    let metrics = Scrape::of(&cache.url()).await;
    assert_eq!(
        metrics.get(
            "regcache_cache_lookups_total",
            &[("kind", "referrers"), ("result", "coalesced")]
        ),
        7.0
    );

    // No TTL: every request asks upstream, and the kept answer covers its failures.
    let fresh = Regcache::start(&up.url(), |c| c.cache.referrers_ttl = Duration::ZERO).await;
    let (_, _, status) = listed(fresh.get(&referrers).await).await;
    assert_eq!(status, "regcache; fwd=uri-miss; stored");
    for (m, why) in [(1, "503"), (2, "an HTML page")] {
        mode.store(m, Ordering::SeqCst);
        let before = up.count("GET", "/referrers/");
        let (types, _, status) = listed(fresh.get(&referrers).await).await;
        assert_eq!(types, [SIG, "application/spdx+json"], "{why}");
        assert_eq!(
            status, "regcache; hit; detail=stale-upstream-unavailable",
            "{why}"
        );
        assert_eq!(
            up.count("GET", "/referrers/"),
            before + 1,
            "upstream was asked"
        );
    }
    // Garbage with nothing kept is upstream's failure: 502, not a 200 the client cannot parse.
    let resp = fresh.get(&filtered).await;
    assert_eq!(
        common::error_code(resp).await,
        (502, "UNAVAILABLE".to_owned())
    );
    // A registry without the referrers API answers 404; the client must hear "unsupported",
    // not NAME_UNKNOWN, so that it falls back to the `sha256-<hex>` tag.
    // That answer is remembered for `negative_ttl`: not asked again at every check.
    mode.store(3, Ordering::SeqCst);
    let other = format!("/v2/signed/referrers/{}", image::sha256(b"unsigned"));
    for _ in 0..3 {
        let resp = fresh.get(&other).await;
        assert_eq!(
            common::error_code(resp).await,
            (404, "UNSUPPORTED".to_owned())
        );
    }
    assert_eq!(up.count("GET", &other[20..]), 1);
    // Offline, what is not kept gets the same 404 (the fallback tag may be cached), not
    // NAME_UNKNOWN, which clients read as a missing repository.
    let offline = Regcache::start(&up.url(), |c| c.cache.offline = true).await;
    let resp = offline.get(&referrers).await;
    assert_eq!(
        common::error_code(resp).await,
        (404, "UNSUPPORTED".to_owned())
    );
}

/// Against a real registry without the referrers API (distribution 2.8), a client's referrers
/// request gets a 404 that is not NAME_UNKNOWN, and the fallback tag schema (an index tagged
/// `sha256-<hex of the subject>`) comes through regcache like any tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_upstream_referrers_api_clients_fall_back_to_the_tag_schema() {
    let s = setup(|_| {}).await;
    let signed = Image::simple(71, 1);
    s.registry.push("library/signed", "1", &signed).await;
    let signature = Image::new(OCI_MANIFEST, "signature", vec![Layer::new(72, 512)]);
    let fallback = Image::index(OCI_INDEX, vec![signature]);
    let tag = signed.digest().replace(':', "-");
    s.registry.push("library/signed", &tag, &fallback).await;

    let resp = s
        .cache
        .get(&format!("/v2/signed/referrers/{}", signed.digest()))
        .await;
    assert_eq!(
        common::error_code(resp).await,
        (404, "UNSUPPORTED".to_owned())
    );
    assert_eq!(s.meter.count("GET", "/referrers/"), 1, "upstream was asked");
    assert_eq!(
        pull(&s.cache.url(), "signed", &tag).await,
        fallback.digest()
    );
}
