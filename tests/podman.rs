//! End to end with podman: a private podman (root, vfs, see [`Podman`]) whose only
//! registries.conf is `deploy/clients/registries.conf` pulls through regcache from real
//! upstreams (Debian's `docker-registry`) behind meters: a short name resolved through
//! `unqualified-search-registries` to docker.io, and a ghcr.io image (one platform of an
//! index) through the path-prefix mirror. Each test checks podman stored the pushed digests
//! and that a second pull by a fresh podman costs upstream nothing.

mod common;

use std::time::Instant;

use common::clients::{
    Podman, PrivateHub, RefusingProxy, TwoUpstreams, asked, run, setup, try_run, two_upstreams,
};
use common::image::{self, DOCKER_LIST, DOCKER_V2};
use common::{Image, Layer};

/// Checks what podman says about a pulled image against the pushed `img`; `digest` is the
/// manifest digest podman records (an index's when it pulled through one).
async fn check_pulled(podman: &Podman, reference: &str, img: &Image, digest: &str) {
    let inspect = podman.inspect(reference).await;
    let config = image::sha256(&img.config);
    assert_eq!(
        inspect["Id"],
        &config[7..],
        "{reference}: the image ID is the pushed config's digest"
    );
    assert_eq!(inspect["Digest"], digest, "{reference}: {inspect}");
    let diff_ids: Vec<String> =
        serde_json::from_value(inspect["RootFS"]["Layers"].clone()).unwrap();
    let want: Vec<String> = img.layers.iter().map(|l| l.diff_id.clone()).collect();
    assert_eq!(diff_ids, want, "{reference}: the pushed layers, unpacked");
    // The manifest podman keeps names the pushed layer blobs.
    assert_eq!(
        podman.stored_manifest(&config[7..], &img.digest()),
        img.manifest,
        "{reference}: the pushed manifest, byte-exact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_resolves_a_short_name_to_docker_io_through_the_mirror() {
    let s = setup(|_| {}).await;
    let img = Image::simple(600, 2);
    s.registry.push("library/rcpodman", "latest", &img).await;
    let addr = s.cache.addr.to_string();
    let podman = Podman::new(&addr);

    // `podman pull alpine`: no registry, no tag.
    let t = Instant::now();
    podman.pull("rcpodman", &[]).await;
    eprintln!("first podman pull: {:?}", t.elapsed());
    let inspect = podman.inspect("rcpodman").await;
    assert_eq!(
        inspect["RepoTags"],
        serde_json::json!(["docker.io/library/rcpodman:latest"]),
        "the short name resolved to docker.io/library"
    );
    check_pulled(&podman, "rcpodman", &img, &img.digest()).await;
    assert!(
        asked(&s.meter, "/v2/library/rcpodman/manifests/latest"),
        "the pull went through regcache"
    );
    for blob in img.blobs() {
        let digest = image::sha256(&blob);
        assert_eq!(s.meter.count("GET", &digest), 1, "{digest} once");
    }
    assert_eq!(s.meter.blob_gets(), 3, "config + 2 layers");

    // A fresh podman (new storage root): everything from regcache.
    s.meter.reset();
    let fresh = Podman::new(&addr);
    let t = Instant::now();
    fresh.pull("rcpodman", &[]).await;
    eprintln!("second podman pull: {:?}", t.elapsed());
    check_pulled(&fresh, "rcpodman", &img, &img.digest()).await;
    assert_eq!(s.meter.blob_gets(), 0, "fresh podman: no upstream blob GET");
    assert_eq!(s.meter.total(), 0, "fresh podman: nothing upstream at all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_one_platform_of_a_ghcr_io_image_through_the_path_prefix_mirror() {
    // One regcache for both registries, as registries.conf sets it up; Docker Hub's upstream
    // is a registry of its own whose meter must see nothing.
    let TwoUpstreams {
        hub: _hub,
        hub_meter,
        ghcr,
        ghcr_meter,
        cache,
    } = two_upstreams().await;
    let amd = Image::new(DOCKER_V2, "amd64", vec![Layer::new(610, 20_000)]);
    let arm = Image::new(
        DOCKER_V2,
        "arm64",
        vec![Layer::new(611, 20_000), Layer::new(612, 5_000)],
    );
    let list = Image::index(DOCKER_LIST, vec![amd.clone(), arm.clone()]);
    ghcr.push("owner/rcpod", "1.0", &list).await;
    let addr = cache.addr.to_string();
    let reference = "ghcr.io/owner/rcpod:1.0";

    let podman = Podman::new(&addr);
    podman.pull(reference, &["--arch", "arm64"]).await;
    check_pulled(&podman, reference, &arm, &list.digest()).await;
    assert!(asked(&ghcr_meter, "/v2/owner/rcpod/manifests/1.0"));
    assert_eq!(ghcr_meter.count("GET", &arm.digest()), 1);
    for blob in arm.blobs() {
        let digest = image::sha256(&blob);
        assert_eq!(ghcr_meter.count("GET", &digest), 1, "{digest} once");
    }
    assert!(
        !asked(&ghcr_meter, &amd.digest()),
        "the amd64 manifest is never asked of upstream"
    );
    for blob in amd.blobs() {
        let digest = image::sha256(&blob);
        assert!(
            !asked(&ghcr_meter, &digest),
            "amd64 blob {digest} never asked"
        );
    }
    assert_eq!(ghcr_meter.blob_gets(), 3, "arm64 config + 2 layers");
    assert_eq!(
        hub_meter.total(),
        0,
        "nothing of ghcr.io went to Docker Hub"
    );

    ghcr_meter.reset();
    let fresh = Podman::new(&addr);
    fresh.pull(reference, &["--arch", "arm64"]).await;
    check_pulled(&fresh, reference, &arm, &list.digest()).await;
    assert_eq!(
        ghcr_meter.blob_gets(),
        0,
        "fresh podman: no upstream blob GET"
    );
    assert_eq!(
        ghcr_meter.total(),
        0,
        "fresh podman: nothing upstream at all"
    );
}

/// A `pass_client_auth` Docker Hub upstream: podman (containers/image) sends credentials only
/// where its `/v2/` ping found a challenge, so regcache's `/v2/` relays upstream's. podman
/// logs in to regcache's address with its upstream login (checked upstream through regcache),
/// then gets a token with it, and the private image comes through regcache with that token
/// on every upstream GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_with_its_own_login_through_a_pass_client_auth_upstream() {
    let hub = PrivateHub::start().await;
    let img = Image::simple(620, 2);
    hub.push("private/rcown", "1", &img).await;
    let addr = hub.cache.addr.to_string();
    let proxy = RefusingProxy::start(|| 0).await;
    let podman = Podman::new(&addr).through(&proxy);
    // `podman login` to regcache's address: its check of the login is upstream's to answer.
    let (user, password) = PrivateHub::ALICE;
    let login = |password: &str| {
        let mut c = podman.cmd();
        c.args([
            "login",
            "--tls-verify=false",
            "-u",
            user,
            "-p",
            password,
            &addr,
        ]);
        c
    };
    let wrong = try_run(&mut login("not-her-password"), "podman login").await;
    assert!(!wrong.status.success(), "a wrong password logged in");
    run(&mut login(password), "podman login").await;

    podman.pull("docker.io/private/rcown:1", &[]).await;
    check_pulled(&podman, "docker.io/private/rcown:1", &img, &img.digest()).await;
    hub.check_pulled_with_alices_login("private/rcown", &proxy);
}
