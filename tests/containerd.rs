//! End to end with containerd: a private `containerd` and `ctr images pull --hosts-dir`, the
//! hosts dir holding `deploy/clients/containerd/{docker.io,ghcr.io}/hosts.toml` with one
//! regcache as the mirror for both. regcache pulls from real upstreams (Debian's
//! `docker-registry`) behind meters. Each test checks that containerd stored exactly the
//! pushed bytes and that a second pull costs upstream nothing.

mod common;

use std::time::Instant;

use common::clients::{
    Containerd, PrivateHub, RefusingProxy, TwoUpstreams, asked, run, setup, two_upstreams,
};
use common::image::{self, DOCKER_LIST, DOCKER_V2, OCI_INDEX, OCI_MANIFEST};
use common::{Image, Layer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_docker_hub_images_through_regcache_as_a_mirror() {
    let s = setup(|_| {}).await;
    let img = Image::simple(500, 2);
    s.registry.push("library/rcctr", "1", &img).await;
    let containerd = Containerd::start().await;
    let hosts = containerd.hosts(&s.cache.addr.to_string());
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
async fn one_regcache_serves_docker_io_and_ghcr_io_by_containerds_ns_parameter() {
    // Two upstreams, each its own registry behind its own meter; the same names pushed to
    // both would hide a wrong route, so each holds only its own image.
    let TwoUpstreams {
        hub,
        hub_meter,
        ghcr,
        ghcr_meter,
        cache,
    } = two_upstreams().await;
    let amd = Image::new(OCI_MANIFEST, "amd64", vec![Layer::new(510, 20_000)]);
    let arm = Image::new(OCI_MANIFEST, "arm64", vec![Layer::new(511, 20_000)]);
    let index = Image::index(OCI_INDEX, vec![amd.clone(), arm.clone()]);
    ghcr.push("owner/rcns", "v1", &index).await;
    let hub_img = Image::simple(512, 1);
    hub.push("library/rcnshub", "1", &hub_img).await;
    let containerd = Containerd::start().await;
    let hosts = containerd.hosts(&cache.addr.to_string());

    let reference = "ghcr.io/owner/rcns:v1";
    containerd
        .pull(&hosts, reference, &["--all-platforms"])
        .await;
    assert_eq!(containerd.image_digest(reference).await, index.digest());
    for child in [&amd, &arm] {
        assert_eq!(containerd.content(&child.digest()).await, child.manifest);
        assert_eq!(ghcr_meter.count("GET", &child.digest()), 1);
    }
    for blob in index.blobs() {
        let digest = image::sha256(&blob);
        assert_eq!(containerd.content(&digest).await, blob, "{digest}");
    }
    assert!(
        asked(&ghcr_meter, "/v2/owner/rcns/manifests/v1"),
        "ns=ghcr.io reached the ghcr.io upstream"
    );
    assert_eq!(ghcr_meter.blob_gets(), 4, "2 configs + 2 layers");
    assert_eq!(
        hub_meter.total(),
        0,
        "nothing of ghcr.io went to Docker Hub"
    );

    let hub_ref = "docker.io/library/rcnshub:1";
    containerd.pull(&hosts, hub_ref, &[]).await;
    assert_eq!(containerd.image_digest(hub_ref).await, hub_img.digest());
    assert!(asked(&hub_meter, "/v2/library/rcnshub/manifests/1"));
    assert_eq!(hub_meter.blob_gets(), 2, "config + layer");
    assert!(
        !asked(&ghcr_meter, "rcnshub"),
        "nothing of docker.io went to ghcr.io"
    );

    // A fresh containerd: both from regcache's disk.
    drop(containerd);
    hub_meter.reset();
    ghcr_meter.reset();
    let fresh = Containerd::start().await;
    let hosts = fresh.hosts(&cache.addr.to_string());
    fresh.pull(&hosts, reference, &["--all-platforms"]).await;
    fresh.pull(&hosts, hub_ref, &[]).await;
    assert_eq!(fresh.image_digest(reference).await, index.digest());
    assert_eq!(fresh.image_digest(hub_ref).await, hub_img.digest());
    assert_eq!(ghcr_meter.total(), 0, "second pull: nothing upstream");
    assert_eq!(hub_meter.total(), 0, "second pull: nothing upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_only_the_platform_it_is_asked_for() {
    let s = setup(|_| {}).await;
    let amd = Image::new(DOCKER_V2, "amd64", vec![Layer::new(520, 20_000)]);
    let arm = Image::new(
        DOCKER_V2,
        "arm64",
        vec![Layer::new(521, 20_000), Layer::new(522, 5_000)],
    );
    let list = Image::index(DOCKER_LIST, vec![amd.clone(), arm.clone()]);
    s.registry.push("team/rcplat", "v1", &list).await;
    let reference = "docker.io/team/rcplat:v1";
    let containerd = Containerd::start().await;
    let hosts = containerd.hosts(&s.cache.addr.to_string());

    containerd
        .pull(&hosts, reference, &["--platform", "linux/arm64"])
        .await;
    assert_eq!(containerd.image_digest(reference).await, list.digest());
    assert_eq!(containerd.content(&arm.digest()).await, arm.manifest);
    for blob in arm.blobs() {
        let digest = image::sha256(&blob);
        assert_eq!(containerd.content(&digest).await, blob, "{digest}");
        assert_eq!(s.meter.count("GET", &digest), 1, "{digest} once");
    }
    assert_eq!(
        s.meter.count("GET", &arm.digest()),
        1,
        "arm64 manifest once"
    );
    assert!(
        !asked(&s.meter, &amd.digest()),
        "the amd64 manifest is never asked of upstream"
    );
    for blob in amd.blobs() {
        let digest = image::sha256(&blob);
        assert!(!asked(&s.meter, &digest), "amd64 blob {digest} never asked");
    }
    assert_eq!(s.meter.blob_gets(), 3, "arm64 config + 2 layers");

    // A fresh containerd: arm64 again costs upstream nothing.
    drop(containerd);
    s.meter.reset();
    let fresh = Containerd::start().await;
    let hosts = fresh.hosts(&s.cache.addr.to_string());
    fresh
        .pull(&hosts, reference, &["--platform", "linux/arm64"])
        .await;
    assert_eq!(fresh.content(&arm.digest()).await, arm.manifest);
    assert_eq!(s.meter.blob_gets(), 0, "second pull: no upstream blob GET");
    assert_eq!(s.meter.total(), 0, "second pull: nothing upstream at all");
}

/// A `pass_client_auth` Docker Hub upstream: `ctr --user` answers upstream's challenge, relayed
/// by regcache on the manifest request (containerd pings nothing first), with a token it gets
/// with its own login, and the private image comes through the mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_with_its_own_login_through_a_pass_client_auth_upstream() {
    let hub = PrivateHub::start().await;
    let img = Image::simple(530, 2);
    hub.push("private/rcown", "1", &img).await;
    let containerd = Containerd::start().await;
    let hosts = containerd.hosts(&hub.cache.addr.to_string());
    let proxy = RefusingProxy::start(|| 0).await;
    let reference = "docker.io/private/rcown:1";
    let user = format!("{}:{}", PrivateHub::ALICE.0, PrivateHub::ALICE.1);
    let mut pull = containerd.cmd();
    pull.envs(proxy.env())
        .args(["images", "pull", "--snapshotter", "native", "--hosts-dir"])
        .arg(&hosts)
        .args(["--user", &user, reference]);
    run(&mut pull, "ctr images pull --user").await;

    assert_eq!(containerd.image_digest(reference).await, img.digest());
    for blob in img.blobs() {
        let digest = image::sha256(&blob);
        assert_eq!(containerd.content(&digest).await, blob, "{digest}");
    }
    hub.check_pulled_with_alices_login("private/rcown", &proxy);
}
