//! End to end with skopeo: `copy` (OCI layout, `dir:`, every platform of an index, one
//! platform chosen with `--override-arch`), `inspect`, `list-tags`, by tag and by digest,
//! through regcache from a real upstream (Debian's `docker-registry`) behind a meter. Each test
//! checks that skopeo got exactly the digests that were pushed and that a second copy by a
//! fresh skopeo costs upstream nothing.
//!
//! skopeo runs with a private HOME, registries.conf and policy (see [`Skopeo`]). (As root it
//! still keeps its blob info cache in /var/lib/containers/cache; there is no flag to move it.)

mod common;

use common::clients::{Skopeo, asked, check_oci_blob, check_oci_layout, file_digest, run, setup};
use common::image::{self, DOCKER_LIST, DOCKER_V2, OCI_INDEX, OCI_MANIFEST};
use common::{Image, Layer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_an_oci_image_byte_exact_and_the_second_copy_is_free() {
    let s = setup(|_| {}).await;
    let layers = (0..3).map(|i| Layer::new(300 + i, 50_000)).collect();
    let img = Image::new(OCI_MANIFEST, "amd64", layers);
    s.registry.push("skopeo/app", "1.0", &img).await;
    let skopeo = Skopeo::new();
    let src = format!("{}/skopeo/app:1.0", s.cache.addr);

    let first = skopeo.path("first");
    skopeo
        .copy(
            &src,
            &format!("oci:{}:1.0", first.display()),
            &["--preserve-digests"],
        )
        .await;
    let manifest = check_oci_layout(&first, "1.0", &img.digest());
    assert_eq!(manifest, img.manifest, "manifest byte-exact");
    assert_eq!(s.meter.blob_gets(), 4, "config + 3 layers, once each");

    s.meter.reset();
    let second = skopeo.path("second");
    skopeo
        .copy(
            &src,
            &format!("oci:{}:1.0", second.display()),
            &["--preserve-digests"],
        )
        .await;
    assert_eq!(
        check_oci_layout(&second, "1.0", &img.digest()),
        img.manifest
    );
    assert_eq!(s.meter.blob_gets(), 0, "second copy: no upstream blob GET");
    assert_eq!(
        s.meter.total(),
        0,
        "second copy within the tag TTL: nothing upstream at all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_through_the_docker_io_path_prefix_gets_the_docker_manifest_byte_exact() {
    let s = setup(|_| {}).await;
    let img = Image::simple(310, 2);
    s.registry.push("library/skprefix", "2", &img).await;
    let skopeo = Skopeo::new();

    // `/v2/docker.io/skprefix/...`: the prefix picks the docker.io upstream, and the one
    // component name there becomes `library/skprefix`.
    let dir = skopeo.path("dir");
    skopeo
        .copy(
            &format!("{}/docker.io/skprefix:2", s.cache.addr),
            &format!("dir:{}", dir.display()),
            &["--preserve-digests"],
        )
        .await;
    assert_eq!(
        std::fs::read(dir.join("manifest.json")).unwrap(),
        img.manifest,
        "dir: transport keeps the Docker schema2 manifest byte-exact"
    );
    for blob in img.blobs() {
        let digest = image::sha256(&blob);
        assert_eq!(
            file_digest(&dir.join(&digest[7..])),
            digest,
            "blob {digest} copied intact"
        );
    }
    assert!(
        asked(&s.meter, "/v2/library/skprefix/manifests/2"),
        "the docker.io/ prefix reached library/skprefix upstream"
    );
    assert_eq!(s.meter.blob_gets(), 3, "config + 2 layers");

    // `inspect --raw` and `list-tags` through the prefix as well.
    let raw = run(
        skopeo.cmd().args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{}/docker.io/skprefix:2", s.cache.addr),
        ]),
        "skopeo inspect --raw",
    )
    .await;
    assert_eq!(raw, img.manifest, "inspect --raw: byte-exact");
    let tags = run(
        skopeo.cmd().args([
            "list-tags",
            "--tls-verify=false",
            &format!("docker://{}/docker.io/skprefix", s.cache.addr),
        ]),
        "skopeo list-tags",
    )
    .await;
    let tags: serde_json::Value = serde_json::from_slice(&tags).unwrap();
    assert_eq!(tags["Tags"], serde_json::json!(["2"]));
    assert_eq!(s.meter.count("GET", "/v2/library/skprefix/tags/list"), 1);

    // The same upstream image under its other spellings costs upstream nothing.
    for spelling in ["skprefix", "library/skprefix", "docker.io/library/skprefix"] {
        s.meter.reset();
        let out = skopeo.path(&format!("again-{}", spelling.replace('/', "-")));
        skopeo
            .copy(
                &format!("{}/{spelling}:2", s.cache.addr),
                &format!("dir:{}", out.display()),
                &["--preserve-digests"],
            )
            .await;
        assert_eq!(
            std::fs::read(out.join("manifest.json")).unwrap(),
            img.manifest
        );
        assert_eq!(
            s.meter.blob_gets(),
            0,
            "{spelling}: no upstream blob GET once cached"
        );
        assert_eq!(s.meter.total(), 0, "{spelling}: nothing upstream at all");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_every_platform_of_an_index() {
    let s = setup(|_| {}).await;
    let amd = Image::new(OCI_MANIFEST, "amd64", vec![Layer::new(320, 20_000)]);
    let arm = Image::new(OCI_MANIFEST, "arm64", vec![Layer::new(321, 20_000)]);
    let index = Image::index(OCI_INDEX, vec![amd.clone(), arm.clone()]);
    s.registry.push("skopeo/multi", "v1", &index).await;
    let skopeo = Skopeo::new();
    let src = format!("{}/skopeo/multi:v1", s.cache.addr);

    let first = skopeo.path("first");
    skopeo
        .copy(
            &src,
            &format!("oci:{}:v1", first.display()),
            &["--all", "--preserve-digests"],
        )
        .await;
    assert_eq!(
        check_oci_layout(&first, "v1", &index.digest()),
        index.manifest
    );
    for child in [&amd, &arm] {
        assert_eq!(
            check_oci_blob(&first, &child.digest()),
            child.manifest,
            "platform manifest byte-exact"
        );
        assert_eq!(s.meter.count("GET", &child.digest()), 1);
    }
    assert_eq!(s.meter.blob_gets(), 4, "2 configs + 2 layers");

    s.meter.reset();
    let second = skopeo.path("second");
    skopeo
        .copy(
            &src,
            &format!("oci:{}:v1", second.display()),
            &["--all", "--preserve-digests"],
        )
        .await;
    assert_eq!(
        check_oci_layout(&second, "v1", &index.digest()),
        index.manifest
    );
    assert_eq!(s.meter.blob_gets(), 0, "second copy: no upstream blob GET");
    assert_eq!(s.meter.total(), 0, "second copy: nothing upstream at all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_inspects_and_copies_by_tag_and_by_digest() {
    let s = setup(|_| {}).await;
    let img = Image::simple(330, 2);
    s.registry.push("skopeo/rcinspect", "2.0", &img).await;
    let layers: Vec<String> = img.layers.iter().map(|l| l.digest()).collect();
    let skopeo = Skopeo::new();
    let by_tag = format!("{}/skopeo/rcinspect:2.0", s.cache.addr);
    let by_digest = format!("{}/skopeo/rcinspect@{}", s.cache.addr, img.digest());

    // `inspect` parses the manifest and reads the config.
    let inspect = skopeo.inspect(&by_tag, &[]).await;
    assert_eq!(inspect["Digest"], img.digest().as_str(), "{inspect}");
    assert_eq!(inspect["Layers"], serde_json::json!(layers), "{inspect}");
    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(s.meter.blob_gets(), 1, "inspect reads the config only");

    let dir = skopeo.path("by-tag");
    skopeo
        .copy(&by_tag, &format!("dir:{}", dir.display()), &[])
        .await;
    assert_eq!(
        std::fs::read(dir.join("manifest.json")).unwrap(),
        img.manifest,
        "copy by tag: the pushed manifest"
    );
    for blob in img.blobs() {
        let digest = image::sha256(&blob);
        assert_eq!(file_digest(&dir.join(&digest[7..])), digest, "{digest}");
        assert_eq!(s.meter.count("GET", &digest), 1, "{digest} fetched once");
    }
    assert_eq!(s.meter.blob_gets(), 3, "config + 2 layers, once each");

    // A fresh skopeo, by digest: everything from regcache's disk.
    s.meter.reset();
    let fresh = Skopeo::new();
    let inspect = fresh.inspect(&by_digest, &[]).await;
    assert_eq!(inspect["Digest"], img.digest().as_str());
    assert_eq!(inspect["Layers"], serde_json::json!(layers));
    let layout = fresh.path("by-digest");
    fresh
        .copy(
            &by_digest,
            &format!("oci:{}:pinned", layout.display()),
            &["--preserve-digests"],
        )
        .await;
    assert_eq!(
        check_oci_layout(&layout, "pinned", &img.digest()),
        img.manifest
    );
    assert_eq!(s.meter.blob_gets(), 0, "by digest: no upstream blob GET");
    assert_eq!(s.meter.total(), 0, "by digest: nothing upstream at all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_only_the_platform_it_is_told_to() {
    let s = setup(|_| {}).await;
    let amd = Image::new(
        DOCKER_V2,
        "amd64",
        vec![Layer::new(340, 20_000), Layer::new(341, 10_000)],
    );
    let arm = Image::new(
        DOCKER_V2,
        "arm64",
        vec![Layer::new(342, 20_000), Layer::new(343, 10_000)],
    );
    let list = Image::index(DOCKER_LIST, vec![amd.clone(), arm.clone()]);
    s.registry.push("skopeo/rcplatform", "v1", &list).await;
    let src = format!("{}/skopeo/rcplatform:v1", s.cache.addr);
    let arm64 = ["--override-arch", "arm64", "--override-os", "linux"];

    let skopeo = Skopeo::new();
    let inspect = skopeo.inspect(&src, &arm64).await;
    assert_eq!(
        inspect["Digest"],
        list.digest().as_str(),
        "inspect names the list"
    );
    assert_eq!(inspect["Architecture"], "arm64");
    let arm_layers: Vec<String> = arm.layers.iter().map(|l| l.digest()).collect();
    assert_eq!(
        inspect["Layers"],
        serde_json::json!(arm_layers),
        "{inspect}"
    );

    let mut c = skopeo.cmd();
    c.args(arm64)
        .args(["copy", "--src-tls-verify=false", "--preserve-digests"])
        .arg(format!("docker://{src}"))
        .arg(format!("oci:{}:v1", skopeo.path("arm").display()));
    run(&mut c, "skopeo --override-arch arm64 copy").await;
    assert_eq!(
        check_oci_layout(&skopeo.path("arm"), "v1", &arm.digest()),
        arm.manifest,
        "the arm64 manifest, byte-exact"
    );
    assert_eq!(
        s.meter.count("GET", &arm.digest()),
        1,
        "arm64 manifest once"
    );
    for blob in arm.blobs() {
        assert_eq!(s.meter.count("GET", &image::sha256(&blob)), 1);
    }
    assert!(
        !asked(&s.meter, &amd.digest()),
        "the amd64 manifest is never asked of upstream"
    );
    for blob in amd.blobs() {
        let digest = image::sha256(&blob);
        assert!(!asked(&s.meter, &digest), "amd64 blob {digest} never asked");
    }
    assert_eq!(s.meter.blob_gets(), 3, "arm64 config + 2 layers");

    // A fresh skopeo copying arm64 again: free. Then amd64: just the amd64 part.
    s.meter.reset();
    let fresh = Skopeo::new();
    let mut c = fresh.cmd();
    c.args(arm64)
        .args(["copy", "--src-tls-verify=false", "--preserve-digests"])
        .arg(format!("docker://{src}"))
        .arg(format!("oci:{}:v1", fresh.path("arm").display()));
    run(&mut c, "skopeo --override-arch arm64 copy (again)").await;
    assert_eq!(
        check_oci_layout(&fresh.path("arm"), "v1", &arm.digest()),
        arm.manifest
    );
    assert_eq!(s.meter.blob_gets(), 0, "second copy: no upstream blob GET");
    assert_eq!(s.meter.total(), 0, "second copy: nothing upstream at all");

    let mut c = fresh.cmd();
    c.args(["--override-arch", "amd64", "--override-os", "linux"])
        .args(["copy", "--src-tls-verify=false", "--preserve-digests"])
        .arg(format!("docker://{src}"))
        .arg(format!("oci:{}:v1", fresh.path("amd").display()));
    run(&mut c, "skopeo --override-arch amd64 copy").await;
    assert_eq!(
        check_oci_layout(&fresh.path("amd"), "v1", &amd.digest()),
        amd.manifest
    );
    assert_eq!(s.meter.count("GET", &amd.digest()), 1);
    assert_eq!(
        s.meter.blob_gets(),
        3,
        "amd64 config + 2 layers, nothing else"
    );
}
