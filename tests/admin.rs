//! The operator's tools: the admin API (ls, purge, warm) on a running cache, and the `warm`,
//! `ls` and `stats` commands on a data dir.

mod common;

use std::process::Command;

use common::fake::{FakeRegistry, Faults};
use common::{Image, Regcache, error_code, get_manifest, http, pull};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_warms_lists_and_purges() {
    let up = FakeRegistry::start(Faults::default()).await;
    let img = Image::simple(81, 2);
    up.add("library/app", "1", &img);
    let cache = Regcache::start(&up.url(), |c| {
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let admin = format!("http://{}", cache.admin_addr.expect("admin listener"));

    // A web page cannot drive it: browsers send `Origin` with a cross-site form POST.
    let resp = http()
        .post(format!("{admin}/admin/warm?image=app:1"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(common::error_code(resp).await, (403, "DENIED".into()));
    assert_eq!(up.requests().len(), 0, "nothing warmed");

    // Warm: everything fetched once, then a real pull costs upstream nothing.
    let resp = http()
        .post(format!("{admin}/admin/warm?image=app:1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let warmed: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(warmed[0]["digest"], img.digest().as_str());
    assert_eq!(warmed[0]["objects"], 4, "manifest, config, 2 layers");
    assert_eq!(up.count("GET", "/blobs/"), 3);
    let before = up.requests().len();
    assert_eq!(pull(&cache.url(), "app", "1").await, img.digest());
    assert_eq!(up.requests().len(), before, "warmed: no upstream contact");

    // ls names the tag with its digest and whole size.
    let ls: serde_json::Value =
        common::get_json(format!("{admin}/admin/ls?repo=library/app")).await;
    assert_eq!(ls[0]["tag"], "1");
    assert_eq!(ls[0]["upstream"], "docker.io");
    assert_eq!(ls[0]["digest"], img.digest().as_str());
    let size: usize = img.manifest.len() + img.blobs().iter().map(|b| b.len()).sum::<usize>();
    assert_eq!(ls[0]["size"], size);

    // Purge the tag: the next pull asks upstream again.
    let resp = http()
        .post(format!("{admin}/admin/purge?repo=library/app&tag=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let purged: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(purged["tags"][0], "docker.io/library/app:1");
    let manifest_gets = up.count("GET", "/manifests/1");
    assert_eq!(get_manifest(&cache.url(), "app", "1").await.status(), 200);
    assert_eq!(up.count("GET", "/manifests/1"), manifest_gets + 1);

    // Purge one layer by digest: it is fetched again.
    let layer = img.layers[0].digest();
    let resp = http()
        .delete(format!("{admin}/admin/purge?digest={layer}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(pull(&cache.url(), "app", "1").await, img.digest());
    assert_eq!(up.count("GET", &layer), 2);

    // Clear errors; and the admin API is not on the registry listener.
    let resp = http()
        .post(format!("{admin}/admin/purge?repo=nothing/here"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (404, "NAME_UNKNOWN".into()));
    let resp = http()
        .get(format!("{admin}/admin/purge"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    let resp = http()
        .get(format!("{}/admin/ls", cache.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    // `regcache warm --admin` drives the same API from the command line.
    let addr = cache.admin_addr.unwrap().to_string();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        regcache(&["warm", "--admin", &addr, "app:1", "missing:1"])
    })
    .await
    .unwrap();
    assert!(!ok, "one image is missing: {out}");
    assert!(out.contains(&format!("app:1: {}", img.digest())), "{out}");
    assert!(out.contains("missing:1: FAILED"), "{out}");
    assert!(out.contains("warmed 1 of 2 images"), "{out}");
}

fn regcache(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_ls_and_stats_commands_on_a_data_dir() {
    let up = FakeRegistry::start(Faults::default()).await;
    let (a, b) = (Image::simple(82, 1), Image::simple(83, 2));
    up.add("library/a", "1", &a);
    up.add("team/b", "2", &b);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("regcache.toml");
    let port = common::free_port();
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n[log]\nlevel = \"warn\"\n[upstreams.\"docker.io\"]\nurls = [\"{}\"]\n",
            dir.path().join("data").display(),
            up.url()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("data/blobs")).unwrap();
    let list = dir.path().join("images.txt");
    std::fs::write(&list, "# to pre-seed\nteam/b:2\n").unwrap();
    let cfg = config.to_str().unwrap();

    let (ok, out) = regcache(&[
        "warm",
        "--config",
        cfg,
        "--file",
        list.to_str().unwrap(),
        "a:1",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("warmed 2 of 2 images"), "{out}");
    assert!(
        out.contains(&a.digest()) && out.contains(&b.digest()),
        "{out}"
    );

    let (ok, out) = regcache(&["ls", "--config", cfg]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("docker.io\tlibrary/a\t1\t{}", a.digest())),
        "{out}"
    );
    assert!(
        out.contains(&format!("docker.io\tteam/b\t2\t{}", b.digest())),
        "{out}"
    );
    let (ok, out) = regcache(&["ls", "--config", cfg, "--repo", "team/b"]);
    assert!(ok && !out.contains("library/a"), "{out}");

    let (ok, out) = regcache(&["stats", "--config", cfg]);
    assert!(ok, "{out}");
    // a: manifest + config + 1 layer; b: manifest + config + 2 layers.
    assert!(out.contains("cached:   7 objects"), "{out}");
    assert!(out.contains("not reachable"), "{out}");

    // A missing image fails the command and says which.
    let (ok, out) = regcache(&["warm", "--config", cfg, "nope:1"]);
    assert!(!ok);
    assert!(out.contains("nope:1: FAILED"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_a_multi_platform_image_can_choose_platforms() {
    let up = FakeRegistry::start(Faults::default()).await;
    let amd = Image::new(
        common::image::OCI_MANIFEST,
        "amd64",
        vec![common::image::Layer::new(84, 5000)],
    );
    let arm = Image::new(
        common::image::OCI_MANIFEST,
        "arm64",
        vec![common::image::Layer::new(85, 5000)],
    );
    let index = Image::index(common::image::OCI_INDEX, vec![amd.clone(), arm.clone()]);
    up.add("library/multi", "1", &index);
    let cache = Regcache::start(&up.url(), |c| {
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let admin = format!("http://{}", cache.admin_addr.unwrap());
    let resp = http()
        .post(format!(
            "{admin}/admin/warm?image=multi:1&platform=linux/arm64"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.count("GET", &arm.layers[0].digest()), 1);
    assert_eq!(
        up.count("GET", &amd.layers[0].digest()),
        0,
        "amd64 not asked for"
    );
    assert_eq!(up.count("GET", &amd.digest()), 0);
}
