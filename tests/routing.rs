//! Every routing way at once, against two real upstream registries: Docker registry-mirror
//! style with `library/` for short names, path prefixes (upstream name or host), containerd's
//! `?ns=`, and aliases. The same repository name on both upstreams must never mix.

mod common;

use common::{Image, Meter, Regcache, Registry, get_manifest, http, pull};

struct Two {
    hub: Registry,
    hub_meter: Meter,
    ghcr: Registry,
    ghcr_meter: Meter,
    cache: Regcache,
}

async fn two_upstreams() -> Two {
    let (hub, ghcr) = (Registry::start().await, Registry::start().await);
    let (hub_meter, ghcr_meter) = (Meter::start(hub.addr).await, Meter::start(ghcr.addr).await);
    let ghcr_url = ghcr_meter.url();
    let cache = Regcache::start(&hub_meter.url(), move |c| {
        let mut up = c.upstreams["docker.io"].clone();
        up.urls = vec![ghcr_url];
        up.hosts = vec!["ghcr.io".into()];
        up.short_name_prefix = None;
        c.upstreams.insert("ghcr".into(), up);
        c.aliases
            .insert("myapp".into(), "ghcr.io/team/myapp".into());
    })
    .await;
    Two {
        hub,
        hub_meter,
        ghcr,
        ghcr_meter,
        cache,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_routing_way_reaches_the_right_upstream() {
    let t = two_upstreams().await;
    let base = t.cache.url();
    let (alpine, tool, img, myapp, grouped) = (
        Image::simple(31, 2),
        Image::simple(32, 1),
        Image::simple(33, 2),
        Image::simple(34, 1),
        Image::simple(37, 1),
    );
    t.hub.push("library/alpine", "3", &alpine).await;
    t.hub.push("team/tool", "1", &tool).await;
    t.ghcr.push("owner/img", "1", &img).await;
    t.ghcr.push("team/myapp", "1", &myapp).await;
    // A first component that looks like a host but is none (`_`): a repository path all the same.
    t.ghcr.push("my_group.v2/app", "1", &grouped).await;

    // (a) registry-mirror style: short names get library/ on Docker Hub.
    assert_eq!(pull(&base, "alpine", "3").await, alpine.digest());
    assert_eq!(pull(&base, "library/alpine", "3").await, alpine.digest());
    assert_eq!(pull(&base, "team/tool", "1").await, tool.digest());
    // (b) path prefix, by upstream name, by its host, and Docker Hub's own name.
    assert_eq!(pull(&base, "ghcr/owner/img", "1").await, img.digest());
    assert_eq!(pull(&base, "ghcr.io/owner/img", "1").await, img.digest());
    assert_eq!(pull(&base, "docker.io/alpine", "3").await, alpine.digest());
    // (c) containerd's ns parameter.
    for (repo, tag, ns, want) in [
        ("owner/img", "1", "ghcr.io", img.digest()),
        ("library/alpine", "3", "docker.io", alpine.digest()),
        ("my_group.v2/app", "1", "ghcr.io", grouped.digest()),
    ] {
        let resp = http()
            .get(format!("{base}/v2/{repo}/manifests/{tag}?ns={ns}"))
            .header("accept", common::ACCEPT_ALL)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{repo} ns={ns}");
        assert_eq!(resp.headers()["docker-content-digest"], want.as_str());
    }
    // (d) an alias names a repository on another upstream.
    assert_eq!(pull(&base, "myapp", "1").await, myapp.digest());

    // Each upstream saw only its own repositories, and none saw our ns parameter.
    let hub_paths: Vec<String> = t
        .hub_meter
        .requests()
        .iter()
        .map(|s| s.path.clone())
        .collect();
    let ghcr_paths: Vec<String> = t
        .ghcr_meter
        .requests()
        .iter()
        .map(|s| s.path.clone())
        .collect();
    assert!(
        hub_paths.iter().all(|p| p == "/v2/"
            || p.starts_with("/v2/library/alpine/")
            || p.starts_with("/v2/team/tool/")),
        "{hub_paths:?}"
    );
    assert!(
        ghcr_paths.iter().all(|p| p == "/v2/"
            || p.starts_with("/v2/owner/img/")
            || p.starts_with("/v2/team/myapp/")
            || p.starts_with("/v2/my_group.v2/app/")),
        "{ghcr_paths:?}"
    );
    assert!(
        hub_paths
            .iter()
            .chain(&ghcr_paths)
            .all(|p| !p.contains("ns="))
    );
    // And each blob was fetched once, however many ways it was asked for.
    assert_eq!(t.hub_meter.blob_gets(), 3 + 2);
    assert_eq!(t.ghcr_meter.blob_gets(), 3 + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_name_on_two_upstreams_never_mixes() {
    let t = two_upstreams().await;
    let base = t.cache.url();
    let (on_hub, on_ghcr) = (Image::simple(35, 1), Image::simple(36, 1));
    t.hub.push("team/app", "1", &on_hub).await;
    t.ghcr.push("team/app", "1", &on_ghcr).await;

    assert_eq!(pull(&base, "team/app", "1").await, on_hub.digest());
    assert_eq!(pull(&base, "ghcr.io/team/app", "1").await, on_ghcr.digest());
    // Cached now: asked again, each name still gives its own upstream's image.
    for _ in 0..2 {
        let hub = get_manifest(&base, "team/app", "1").await;
        assert_eq!(
            hub.headers()["docker-content-digest"],
            on_hub.digest().as_str()
        );
        let gh = get_manifest(&base, "ghcr/team/app", "1").await;
        assert_eq!(
            gh.headers()["docker-content-digest"],
            on_ghcr.digest().as_str()
        );
    }
    // A digest from one upstream is not served under the other's name unless it has it.
    let resp = get_manifest(&base, "ghcr/team/app", &on_hub.digest()).await;
    assert_eq!(
        common::error_code(resp).await,
        (404, "MANIFEST_UNKNOWN".into())
    );
}
