//! Metrics an operator runs the cache on: exact counter movements for each cache outcome, the
//! health endpoints, the metrics-only listener, and a real Prometheus scraping regcache with the
//! shipped scrape config, alert rules and dashboard queries.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::fake::{FakeRegistry, Faults};
use common::image::{self, Image, Layer};
use common::{Regcache, Scrape, get_manifest, http, pull};

const LOOKUPS: &str = "regcache_cache_lookups_total";
const SERVED: &str = "regcache_served_bytes_total";

fn lookups(s: &Scrape, kind: &str, result: &str) -> f64 {
    s.get(
        LOOKUPS,
        &[
            ("kind", kind),
            ("upstream", "docker.io"),
            ("result", result),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_exactly_for_miss_hit_coalesced_and_stale() {
    let up = FakeRegistry::start(Faults {
        ratelimit: Some((100, 76)),
        ..Faults::default()
    })
    .await;
    let img = Image::new(
        image::DOCKER_V2,
        "amd64",
        vec![Layer::new(81, 300_000), Layer::new(82, 200_000)],
    );
    up.add("library/app", "1", &img);
    let cache = Regcache::start(&up.url(), |c| {
        c.cache.tag_ttl = Duration::from_millis(1);
    })
    .await;
    let base = cache.url();
    let (l1, l2) = (&img.layers[0], &img.layers[1]);
    let blob = |d: &str| format!("{base}/v2/app/blobs/{d}");

    let s0 = Scrape::of(&base).await;
    assert_eq!(s0.get(LOOKUPS, &[]), 0.0);
    assert_eq!(s0.get("regcache_build_info", &[]), 1.0);
    assert_eq!(
        s0.get(
            "regcache_upstream_breaker_state",
            &[("upstream", "docker.io")]
        ),
        0.0
    );

    // A miss: the blob comes from upstream, once.
    let n1 = l1.blob.len() as f64;
    assert_eq!(
        http()
            .get(blob(&l1.digest()))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .len() as f64,
        n1
    );
    let s1 = Scrape::until(&base, |s| {
        s.get("regcache_cache_objects", &[]) == 1.0
            && s.get("regcache_fetches_in_flight", &[]) == 0.0
    })
    .await;
    assert_eq!(lookups(&s1, "blob", "miss"), 1.0);
    assert_eq!(s1.get(SERVED, &[("source", "upstream")]), n1);
    assert_eq!(s1.get(SERVED, &[("source", "cache")]), 0.0);
    assert_eq!(
        s1.get(
            "regcache_upstream_fetched_bytes_total",
            &[("upstream", "docker.io")]
        ),
        n1
    );
    assert_eq!(
        s1.get(
            "regcache_upstream_requests_total",
            &[("method", "GET"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(s1.get("regcache_cache_objects", &[]), 1.0);
    assert_eq!(s1.get("regcache_cache_size_bytes", &[]), n1);
    assert_eq!(
        s1.get(
            "regcache_http_requests_total",
            &[("kind", "blob"), ("method", "GET"), ("status", "2xx")]
        ),
        1.0
    );
    // Docker Hub's rate-limit headers become gauges.
    assert_eq!(
        s1.get(
            "regcache_upstream_ratelimit_remaining",
            &[("upstream", "docker.io")]
        ),
        76.0
    );
    assert_eq!(s1.get("regcache_upstream_ratelimit_limit", &[]), 100.0);

    // A hit: bytes from disk, nothing upstream.
    http()
        .get(blob(&l1.digest()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let s2 = Scrape::of(&base).await;
    assert_eq!(lookups(&s2, "blob", "hit"), 1.0);
    assert_eq!(lookups(&s2, "blob", "miss"), 1.0);
    assert_eq!(s2.get(SERVED, &[("source", "cache")]), n1);
    assert_eq!(
        s2.get("regcache_upstream_requests_total", &[]),
        1.0,
        "{}",
        s2.text
    );

    // Coalesced: two clients at once for a drip-fed blob, one upstream fetch.
    up.set(|f| f.drip = Some((5, Duration::from_millis(60))));
    let (a, b) = tokio::join!(
        async {
            http()
                .get(blob(&l2.digest()))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        },
        async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            http()
                .get(blob(&l2.digest()))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        },
    );
    assert_eq!(image::sha256(&a), l2.digest());
    assert_eq!(image::sha256(&b), l2.digest());
    let s3 = Scrape::until(&base, |s| {
        s.get("regcache_cache_objects", &[]) == 2.0
            && s.get("regcache_fetches_in_flight", &[]) == 0.0
    })
    .await;
    assert_eq!(lookups(&s3, "blob", "miss"), 2.0);
    assert_eq!(lookups(&s3, "blob", "coalesced"), 1.0);
    assert_eq!(up.count("GET", &l2.digest()), 1);
    let n2 = l2.blob.len() as f64;
    assert_eq!(s3.get(SERVED, &[("source", "upstream")]), n1 + 2.0 * n2);
    assert_eq!(
        s3.get("regcache_upstream_fetched_bytes_total", &[]),
        n1 + n2
    );
    assert_eq!(s3.get("regcache_fetches_in_flight", &[]), 0.0);
    assert_eq!(s3.get("regcache_cache_size_bytes", &[]), n1 + n2);

    // Stale: a cached tag past its TTL while upstream answers 500.
    assert_eq!(
        get_manifest(&base, "app", "1").await.status(),
        200,
        "cache the tag"
    );
    let s4 = Scrape::of(&base).await;
    assert_eq!(lookups(&s4, "manifest", "miss"), 1.0);
    up.set(|f| f.status = Some(500));
    tokio::time::sleep(Duration::from_millis(5)).await;
    let resp = get_manifest(&base, "app", "1").await;
    assert_eq!(resp.status(), 200);
    let manifest_len = resp.bytes().await.unwrap().len() as f64;
    let s5 = Scrape::of(&base).await;
    assert_eq!(lookups(&s5, "manifest", "stale"), 1.0);
    assert_eq!(
        s5.get(
            "regcache_upstream_errors_total",
            &[("upstream", "docker.io"), ("reason", "http_5xx")]
        ),
        1.0
    );
    assert_eq!(
        s5.get(SERVED, &[("source", "cache")]) - s4.get(SERVED, &[("source", "cache")]),
        manifest_len
    );
    // Every lookup so far: 2 blob misses, 1 hit, 1 coalesced, 1 manifest miss, 1 stale.
    assert_eq!(s5.get(LOOKUPS, &[]), 6.0);
}

/// Methods a client makes up do not each become a series: any token is a method over HTTP,
/// and a series is kept for good, so they count under `method="other"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_share_one_series() {
    let up = FakeRegistry::start(Faults::default()).await;
    let cache = Regcache::start(&up.url(), |_| {}).await;
    for i in 0..5 {
        let method = reqwest::Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
        let resp = http()
            .request(method, format!("{}/v2/", cache.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405);
    }
    let s = Scrape::of(&cache.url()).await;
    assert!(!s.text.contains("MADEUP"), "a method became a label value");
    assert_eq!(
        s.get("regcache_http_requests_total", &[("method", "other")]),
        5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_the_metrics_listener() {
    let up = FakeRegistry::start(Faults::default()).await;
    let cache = Regcache::start(&up.url(), |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let get = |url: String| async move {
        let r = http().get(url).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(get(format!("{}/healthz", cache.url())).await.0, 200);
    assert_eq!(get(format!("{}/readyz", cache.url())).await.0, 200);

    let m = format!("http://{}", cache.metrics_addr.expect("metrics listener"));
    let (status, text) = get(format!("{m}/metrics")).await;
    assert_eq!(status, 200);
    assert!(text.contains("regcache_build_info"));
    assert_eq!(get(format!("{m}/readyz")).await.0, 200);
    // Only the operator endpoints live there.
    assert_eq!(get(format!("{m}/v2/")).await.0, 404);
    assert_eq!(
        http()
            .post(format!("{}/metrics", cache.url()))
            .send()
            .await
            .unwrap()
            .status(),
        405
    );

    // A data dir that takes no writes is not ready, and says why.
    std::fs::remove_dir_all(cache.data.path().join("tmp")).unwrap();
    let (status, why) = get(format!("{}/readyz", cache.url())).await;
    assert_eq!(status, 503);
    assert!(why.contains("data dir"), "{why}");
    assert_eq!(get(format!("{}/healthz", cache.url())).await.0, 200);
    assert!(up.requests().is_empty(), "health checks never go upstream");
}

/// Prometheus from Debian, started on a free port with the shipped rules.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    async fn start(target: std::net::SocketAddr) -> Prometheus {
        let bin = common::require("prometheus", "prometheus");
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("regcache-alerts.yml");
        std::fs::copy(deploy("prometheus/regcache-alerts.yml"), &rules).unwrap();
        // The shipped scrape config, with a fast interval and this test's target.
        let shipped = std::fs::read_to_string(deploy("prometheus/prometheus.yml")).unwrap();
        let config = shipped
            .replace("scrape_interval: 15s", "scrape_interval: 1s")
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s")
            .replace("127.0.0.1:5000", &target.to_string());
        assert_ne!(config, shipped, "the shipped config has the expected shape");
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = common::free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        // Ready means 200 from /-/ready, not just an answer.
        let mut ready = false;
        for _ in 0..200 {
            if let Ok(r) = http().get(format!("{url}/-/ready")).send().await
                && r.status() == 200
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ready, "prometheus did not become ready");
        Prometheus {
            child,
            url,
            _dir: dir,
        }
    }

    /// The result of an instant query (panics on a query error).
    async fn query(&self, q: &str) -> Vec<serde_json::Value> {
        let resp: serde_json::Value = http()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", q)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(resp["status"], "success", "query {q}: {resp}");
        resp["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Polls until `q` has a sample equal to `want`.
    async fn wait_for(&self, q: &str, want: f64) {
        let mut last = Vec::new();
        for _ in 0..60 {
            last = self.query(q).await;
            let got: Vec<f64> = last
                .iter()
                .filter_map(|r| r["value"][1].as_str()?.parse().ok())
                .collect();
            if got.contains(&want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("{q} never reached {want}; last result {last:?}");
    }
}

fn deploy(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(rel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_regcache_and_the_shipped_rules_and_dashboard_evaluate() {
    let up = FakeRegistry::start(Faults::default()).await;
    let img = Image::simple(91, 2);
    up.add("library/app", "1", &img);
    let cache = Regcache::start(&up.url(), |_| {}).await;
    // Two pulls: 1 manifest miss + 3 blob misses, then 1 + 3 hits.
    pull(&cache.url(), "app", "1").await;
    Scrape::until(&cache.url(), |s| {
        s.get("regcache_cache_objects", &[]) == 4.0
    })
    .await;
    pull(&cache.url(), "app", "1").await;

    // The exposition is valid by Prometheus's own linter.
    let promtool = common::require("promtool", "prometheus");
    let text = Scrape::of(&cache.url()).await.text;
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(deploy("prometheus/regcache-alerts.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let prom = Prometheus::start(cache.addr).await;
    prom.wait_for(
        r#"regcache_cache_lookups_total{kind="blob",result="hit",upstream="docker.io"}"#,
        3.0,
    )
    .await;
    prom.wait_for(
        r#"regcache_cache_lookups_total{kind="blob",result="miss",upstream="docker.io"}"#,
        3.0,
    )
    .await;
    prom.wait_for(
        r#"regcache_cache_lookups_total{kind="manifest",result="hit"}"#,
        1.0,
    )
    .await;
    let blob_bytes: usize = img.blobs().iter().map(|b| b.len()).sum();
    prom.wait_for(
        r#"regcache_served_bytes_total{source="cache"}"#,
        (blob_bytes + img.manifest.len()) as f64,
    )
    .await;
    prom.wait_for(r#"up{job="regcache"}"#, 1.0).await;

    // Every dashboard query is valid PromQL against real data.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/regcache-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let q = target["expr"]
                .as_str()
                .unwrap()
                .replace("$job", ".*")
                .replace("$__rate_interval", "1m")
                .replace("$__range", "5m");
            prom.query(&q).await;
            exprs += 1;
        }
    }
    assert!(exprs >= 13, "{exprs} dashboard queries");
    // The hit ratio panel gives the real ratio: 4 hits of 8 lookups.
    let ratio = prom
        .query(
            r#"sum(regcache_cache_lookups_total{result=~"hit|stale|revalidated|shared"}) / sum(regcache_cache_lookups_total)"#,
        )
        .await;
    assert_eq!(ratio[0]["value"][1], "0.5");

    // The shipped alert rules load and evaluate without errors.
    let mut healthy = 0;
    for _ in 0..20 {
        let rules: serde_json::Value = common::get_json(format!("{}/api/v1/rules", prom.url)).await;
        let all: Vec<serde_json::Value> = rules["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        assert_eq!(all.len(), 8, "{rules}");
        healthy = all.iter().filter(|r| r["health"] == "ok").count();
        if healthy == all.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(healthy, 8, "every rule evaluated without error");
}
