//! End to end with the Docker daemon: a private `dockerd` configured with
//! `deploy/clients/daemon.json` (regcache as its registry mirror) pulls Docker Hub names
//! (`alpine:3.19`, `team/app:1.0`, by digest, one platform of a list) through regcache from a
//! real upstream (Debian's `docker-registry`) behind a meter. Each test checks the daemon got
//! the pushed digests and that a second pull costs upstream nothing.
//!
//! When the mirror fails, Docker falls back to Docker Hub. The fallback tests give the daemon
//! a [`RefusingProxy`] as `HTTPS_PROXY`, so that fallback is seen (a `CONNECT
//! registry-1.docker.io:443`) and refused: nothing reaches a real network.

mod common;

use std::time::{Duration, Instant};

use common::clients::{Dockerd, PrivateHub, RefusingProxy, asked, container_file, setup, try_run};
use common::image::{self, DOCKER_LIST, DOCKER_V2, OCI_MANIFEST};
use common::{Image, Layer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_pulls_through_the_registry_mirror_and_the_second_pull_is_free() {
    let s = setup(|_| {}).await;
    let img = Image::simple(400, 2);
    s.registry.push("library/rcdocker", "1", &img).await;
    let docker = Dockerd::start(&s.cache.addr.to_string()).await;
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
    let docker = Dockerd::start(&s.cache.addr.to_string()).await;

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

    // Asked for arm64, the daemon fetches the arm64 manifest and layer, and only them.
    s.meter.reset();
    docker
        .run(&["pull", "--platform", "linux/arm64", "team/rcmulti:latest"])
        .await;
    let inspect = docker.inspect("team/rcmulti:latest").await;
    assert_eq!(inspect["Id"], image::sha256(&arm.config).as_str());
    assert_eq!(inspect["Architecture"], "arm64");
    assert_eq!(s.meter.count("GET", &arm.digest()), 1);
    assert_eq!(s.meter.count("GET", &arm.layers[0].digest()), 1);
    assert!(!asked(&s.meter, &amd.digest()), "amd64 is in the cache");
    assert_eq!(s.meter.blob_gets(), 2, "arm64 config + layer");

    // A fresh daemon pulling arm64: nothing upstream.
    drop(docker);
    s.meter.reset();
    let fresh = Dockerd::start(&s.cache.addr.to_string()).await;
    fresh
        .run(&["pull", "--platform", "linux/arm64", "team/rcmulti:latest"])
        .await;
    assert_eq!(
        fresh.inspect("team/rcmulti:latest").await["Id"],
        image::sha256(&arm.config).as_str()
    );
    assert_eq!(s.meter.blob_gets(), 0, "fresh daemon: no upstream blob GET");
    assert_eq!(s.meter.total(), 0, "fresh daemon: nothing upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_pulls_a_cached_image_again_while_the_upstream_is_down() {
    let mut s = setup(|c| c.cache.tag_ttl = Duration::from_millis(1)).await;
    let img = Image::simple(410, 2);
    s.registry.push("library/rcdown", "1", &img).await;
    let docker = Dockerd::start(&s.cache.addr.to_string()).await;
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

/// Checks what `docker image inspect` says about a pulled image against the pushed one.
async fn check_pulled(docker: &Dockerd, reference: &str, img: &Image) {
    let inspect = docker.inspect(reference).await;
    assert_eq!(
        inspect["Id"],
        image::sha256(&img.config).as_str(),
        "{reference}: the image ID is the pushed config's digest"
    );
    let repo_digests: Vec<String> = serde_json::from_value(inspect["RepoDigests"].clone()).unwrap();
    assert!(
        repo_digests
            .iter()
            .any(|d| d.ends_with(&format!("@{}", img.digest()))),
        "{reference}: RepoDigests {repo_digests:?} name the pushed manifest {}",
        img.digest()
    );
    let diff_ids: Vec<String> =
        serde_json::from_value(inspect["RootFS"]["Layers"].clone()).unwrap();
    let want: Vec<String> = img.layers.iter().map(|l| l.diff_id.clone()).collect();
    assert_eq!(diff_ids, want, "{reference}: the pushed layers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_pulls_official_and_user_images_through_the_daemon_json_mirror() {
    let s = setup(|_| {}).await;
    let official = Image::simple(420, 2);
    let user = Image::new(
        OCI_MANIFEST,
        "amd64",
        vec![Layer::new(421, 30_000), Layer::new(422, 5_000)],
    );
    s.registry.push("library/rcalpine", "3.19", &official).await;
    s.registry.push("team/rcapp", "1.0", &user).await;
    let addr = s.cache.addr.to_string();
    let docker = Dockerd::start(&addr).await;

    // `docker pull alpine:3.19` and `docker pull team/app:1.0`, as users type them.
    docker.run(&["pull", "rcalpine:3.19"]).await;
    docker.run(&["pull", "team/rcapp:1.0"]).await;
    check_pulled(&docker, "rcalpine:3.19", &official).await;
    check_pulled(&docker, "team/rcapp:1.0", &user).await;
    assert!(
        asked(&s.meter, "/v2/library/rcalpine/manifests/3.19"),
        "an official image's one-part name became library/ upstream"
    );
    assert!(asked(&s.meter, "/v2/team/rcapp/manifests/1.0"));
    for blob in official.blobs().iter().chain(&user.blobs()) {
        let digest = image::sha256(blob);
        assert_eq!(s.meter.count("GET", &digest), 1, "{digest} once");
    }
    assert_eq!(s.meter.blob_gets(), 6, "2 configs + 4 layers");

    // A fresh daemon: everything from regcache.
    drop(docker);
    s.meter.reset();
    let fresh = Dockerd::start(&addr).await;
    fresh.run(&["pull", "rcalpine:3.19"]).await;
    fresh.run(&["pull", "team/rcapp:1.0"]).await;
    check_pulled(&fresh, "rcalpine:3.19", &official).await;
    check_pulled(&fresh, "team/rcapp:1.0", &user).await;
    assert_eq!(s.meter.blob_gets(), 0, "fresh daemon: no upstream blob GET");
    assert_eq!(s.meter.total(), 0, "fresh daemon: nothing upstream at all");
}

/// Checks that every connection the daemon tried past loopback was the fallback to Docker
/// Hub (refused by the proxy), and that there was one.
fn check_fell_back_to_docker_hub(proxy: &RefusingProxy) -> Vec<(String, usize)> {
    let seen = proxy.seen();
    assert!(
        !seen.is_empty(),
        "the daemon never fell back to Docker Hub (the proxy saw nothing)"
    );
    for (line, _) in &seen {
        assert!(
            line.starts_with("CONNECT registry-1.docker.io:443 "),
            "the daemon went somewhere else than Docker Hub: {line:?} (all: {seen:?})"
        );
    }
    seen
}

/// Position of `needle` in the daemon's log, or a panic showing the log.
fn log_position(docker: &Dockerd, needle: &str) -> usize {
    let log = docker.log();
    log.find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in the dockerd log:\n{log}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_falls_back_to_docker_hub_when_regcache_has_no_such_image() {
    let s = setup(|_| {}).await;
    let img = Image::simple(430, 1);
    s.registry.push("library/rcthere", "1", &img).await;
    let meter_seen = std::sync::Arc::clone(&s.meter.seen);
    let proxy = RefusingProxy::start(move || meter_seen.lock().unwrap().len()).await;
    let env = proxy.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let docker = Dockerd::start_with(&s.cache.addr.to_string(), &env).await;

    // What the mirror has never goes past loopback.
    docker.run(&["pull", "rcthere:1"]).await;
    check_pulled(&docker, "rcthere:1", &img).await;
    assert_eq!(proxy.seen(), vec![], "a mirror hit never leaves loopback");

    // Missing upstream: regcache answers 404 MANIFEST_UNKNOWN; the daemon then tries Docker
    // Hub itself, which the proxy refuses, and the pull fails.
    s.meter.reset();
    let t = Instant::now();
    let out = try_run(
        docker.docker().args(["pull", "rcmissing:1"]),
        "docker pull rcmissing:1",
    )
    .await;
    eprintln!(
        "failed pull: {:?}: {}",
        t.elapsed(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    assert!(!out.status.success(), "the pull of a missing image fails");
    let (status, code) =
        common::error_code(common::get_manifest(&s.cache.url(), "library/rcmissing", "1").await)
            .await;
    assert_eq!(
        (status, code.as_str()),
        (404, "MANIFEST_UNKNOWN"),
        "what regcache answered the daemon"
    );
    assert!(
        asked(&s.meter, "/v2/library/rcmissing/manifests/1"),
        "regcache was asked (and asked upstream) first"
    );
    let seen = check_fell_back_to_docker_hub(&proxy);
    assert!(
        seen.iter().all(|(_, meter_had)| *meter_had > 0),
        "the fallback came after regcache asked upstream: {seen:?}"
    );
    assert!(
        log_position(&docker, &format!("rcmissing from http://{}", s.cache.addr))
            < log_position(&docker, "rcmissing from https://registry-1.docker.io"),
        "the daemon tried the mirror, then Docker Hub"
    );
    assert_eq!(s.meter.blob_gets(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_falls_back_to_docker_hub_when_regcache_is_down() {
    let s = setup(|_| {}).await;
    let img = Image::simple(440, 1);
    s.registry.push("library/rcgone", "1", &img).await;
    let addr = s.cache.addr;
    s.cache.shutdown().await;
    let proxy = RefusingProxy::start(|| 0).await;
    let env = proxy.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let docker = Dockerd::start_with(&addr.to_string(), &env).await;

    let t = Instant::now();
    let out = try_run(
        docker.docker().args(["pull", "rcgone:1"]),
        "docker pull rcgone:1",
    )
    .await;
    eprintln!(
        "failed pull: {:?}: {}",
        t.elapsed(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    assert!(
        !out.status.success(),
        "the pull fails: Docker Hub is refused"
    );
    check_fell_back_to_docker_hub(&proxy);
    assert!(
        log_position(&docker, &format!("rcgone from http://{addr}"))
            < log_position(&docker, "rcgone from https://registry-1.docker.io"),
        "the daemon tried the mirror, then Docker Hub"
    );
    assert_eq!(
        s.meter.total(),
        0,
        "regcache is down: upstream sees nothing"
    );
}

/// A `pass_client_auth` Docker Hub upstream: dockerd asks `/v2/` for a challenge before it
/// sends any credentials, so regcache's `/v2/` relays upstream's. Then the daemon gets a token
/// with its own Docker Hub login, regcache forwards it, and the private image comes through
/// the mirror, never by the fallback to Docker Hub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_pulls_with_its_own_login_through_a_pass_client_auth_upstream() {
    let hub = PrivateHub::start().await;
    let img = Image::simple(450, 2);
    hub.push("private/rcown", "1", &img).await;
    let proxy = RefusingProxy::start(|| 0).await;
    let env = proxy.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let docker = Dockerd::start_with(&hub.cache.addr.to_string(), &env).await;
    docker.set_credentials("https://index.docker.io/v1/", PrivateHub::ALICE);

    docker.run(&["pull", "private/rcown:1"]).await;
    check_pulled(&docker, "private/rcown:1", &img).await;
    hub.check_pulled_with_alices_login("private/rcown", &proxy);
}
