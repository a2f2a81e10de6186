//! The load benchmark (issue 3): regcache in front of a real upstream (Debian's
//! `docker-registry`, CNCF distribution 2.8) and, in the same run on the same data, two
//! reference points: distribution in proxy mode (`proxy: remoteurl:`) and nginx serving the same
//! blob file with sendfile (the practical ceiling for serving bytes from disk). The `s3` section
//! puts a replica on S3 storage (a 1-node Garage cluster on loopback, `tests/common/garage.rs`)
//! beside one on local disk.
//!
//! ```sh
//! ./scripts/bench                 # installs wrk, nginx-light, docker-registry, garage when missing
//! cargo bench --bench load        # this file only
//! ```
//!
//! Knobs (environment): `BENCH_SECS` seconds per wrk run (default 10), `BENCH_ROUNDS`
//! interleaved rounds per wrk measurement (default 3), `BENCH_PULLS` cold-pull trials
//! (default 5), `BENCH_LINK_MBIT` the link rates for `link` (default `1000,2500`),
//! `BENCH_ONLY` a comma-separated subset of the sections `cold` (coalescing, cross-repo),
//! `pull` (cold single pull), `skopeo` (the same image pulled by skopeo), `docker` (the same
//! layer sizes pulled by the Docker daemon: needs root and docker.io), `containerd` (the same
//! fetched and pulled by containerd's `ctr`: needs root and containerd), `link` (the same
//! pull from an upstream behind a rate-limited link, in a network namespace: needs root), `rss` (peak RSS), `blob` (hot blobs), `manifest`
//! (hot tag manifests) and `s3` (S3 vs local storage: cold fill, cold from the bucket, upload
//! lag, hot blob, two replicas missing at once), `hot` meaning `rss`, `blob` and `manifest`;
//! `BENCH_WRAP` a command prefix for the regcache processes, for profiling, with `{port}`
//! replaced by each one's port: the cold sections start a fresh regcache per trial (e.g.
//! `BENCH_WRAP="perf record -g -o /tmp/rc.{port}.data --"`; the RSS and per-pull CPU figures
//! then are the wrapper's).
//! Everything listens on 127.0.0.1 or, for `link`, in a network namespace the bench creates;
//! nothing talks to a public registry.
//!
//! Every server is a separate process: regcache is the release binary
//! (`CARGO_BIN_EXE_regcache`), so `/proc/PID/status` gives its own peak RSS (`VmHWM`). Cold
//! tests put a metering reverse proxy (in this process) between a proxy and the upstream to count
//! upstream requests and body bytes. Hot measurements run wrk against regcache, distribution
//! and nginx in turn, round after round, and report the ratio of each round (the machine is
//! noisy) and its median.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use sha2::{Digest as _, Sha256};
use tokio::sync::oneshot;

// The tests' helpers: the Garage cluster of the scale-out tests, generated images with real
// tar.gz layers, and the private Docker daemon. The bench uses part of them.
#[path = "../tests/common/mod.rs"]
mod common;

use common::free_port;
use common::garage;
use common::image::{noise, sha256};

const MIB: usize = 1 << 20;
const BIG: usize = 100 * MIB;
const SMALL: usize = 5 * MIB;
const GIB: f64 = (1u64 << 30) as f64;

const DOCKER_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// The `Accept` a modern client sends for manifests.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo test --benches` and test listers run bench binaries without `--bench`: do nothing.
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        println!("load: skipped (a benchmark: run `cargo bench --bench load`)");
        return;
    }
    let knobs = Knobs {
        secs: env_num("BENCH_SECS", 10),
        rounds: env_num("BENCH_ROUNDS", 3) as usize,
        pulls: env_num("BENCH_PULLS", 5) as usize,
        link_mbit: std::env::var("BENCH_LINK_MBIT")
            .unwrap_or_else(|_| "1000,2500".into())
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect(),
        only: std::env::var("BENCH_ONLY")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(run(knobs));
}

struct Knobs {
    secs: u64,
    rounds: usize,
    pulls: usize,
    /// Link rates (Mbit/s) for the `link` section.
    link_mbit: Vec<u64>,
    /// Sections to run (`cold`, `pull`, `skopeo`, `docker`, `link`, `rss`, `blob`, `manifest`, `s3`; `hot`
    /// is `rss`, `blob` and `manifest`); empty for all.
    only: Vec<String>,
}

impl Knobs {
    fn want(&self, section: &str) -> bool {
        self.only.is_empty()
            || self.only.iter().any(|s| {
                s == section || (s == "hot" && ["rss", "blob", "manifest"].contains(&section))
            })
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn run(k: Knobs) {
    let started = Instant::now();
    let registry_bin = require("docker-registry", "docker-registry");
    let nginx_bin = require("nginx", "nginx-light");
    require("wrk", "wrk");
    let root = tempfile::Builder::new()
        .prefix("regcache-bench")
        .tempdir()
        .expect("temp dir");
    let root = root.path();
    let mut report = Report::default();

    // ---- data: generated images pushed to a real upstream --------------------------------
    step("generating images and pushing them to the upstream docker-registry");
    let big = Bytes::from(noise(1, BIG));
    let small = Bytes::from(noise(2, SMALL));
    let base = Bytes::from(noise(40, 32 * MIB));
    let big_img = Img::new(vec![big.clone()]);
    let small_img = Img::new(vec![small.clone()]);
    let pull_img = Img::new(vec![
        Bytes::from(noise(30, 64 * MIB)),
        Bytes::from(noise(31, 24 * MIB)),
        Bytes::from(noise(32, 8 * MIB)),
        Bytes::from(noise(33, 2 * MIB)),
    ]);
    let cross: Vec<Img> = (1..=4)
        .map(|i| Img::new(vec![base.clone(), Bytes::from(noise(40 + i, MIB))]))
        .collect();
    let big_d = sha256(&big);
    let small_d = sha256(&small);
    let base_d = sha256(&base);

    let mut upstream = start_registry(&registry_bin, &root.join("upstream"), None).await;
    let up = upstream.url.clone();
    let up_addr: SocketAddr = up.trim_start_matches("http://").parse().unwrap();
    let client = http();
    push(&client, &up, "bench/big", &big_img).await;
    push(&client, &up, "bench/small", &small_img).await;
    push(&client, &up, "bench/pull", &pull_img).await;
    for (i, img) in cross.iter().enumerate() {
        push(&client, &up, &format!("bench/base{}", i + 1), img).await;
    }
    // One read of everything straight from upstream, so every contender starts with the
    // upstream's files in the page cache.
    for repo in ["bench/big", "bench/small", "bench/pull"] {
        pull(&client, &up, repo, "latest").await.unwrap();
    }

    // nginx: the same blob files laid out at the registry's URL paths.
    let ng_dir = root.join("nginx");
    for (repo, d, bytes) in [
        ("bench/big", &big_d, &big),
        ("bench/small", &small_d, &small),
    ] {
        let p = ng_dir.join(format!("www/v2/{repo}/blobs"));
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join(d), bytes).unwrap();
    }
    let mp = ng_dir.join("www/v2/bench/small/manifests");
    std::fs::create_dir_all(&mp).unwrap();
    std::fs::write(mp.join("latest"), &small_img.manifest).unwrap();
    let mut nginx = start_nginx(&nginx_bin, &ng_dir).await;

    // ---- 1. cold coalescing: 20 concurrent cold GETs of a 100 MiB blob ---------------------
    let path = format!("/v2/bench/big/blobs/{big_d}");
    if k.want("cold") {
        step("cold coalescing: 20 concurrent cold GETs of a 100 MiB blob");
        let cold20 = {
            let meter = Meter::start(up_addr).await;
            let mut rc = start_regcache(&root.join("rc-cold20"), &meter.url()).await;
            let rc_run =
                concurrent_gets(&client, &format!("{}{path}", rc.url), &big_d, BIG, 20).await;
            let rc_up = meter.snapshot(&big_d);
            rc.stop();
            let meter = Meter::start(up_addr).await;
            let mut dp =
                start_registry(&registry_bin, &root.join("dp-cold20"), Some(&meter.url())).await;
            let dp_run =
                concurrent_gets(&client, &format!("{}{path}", dp.url), &big_d, BIG, 20).await;
            let dp_up = meter.snapshot(&big_d);
            dp.stop();
            (rc_run, rc_up, dp_run, dp_up)
        };
        {
            let (rc_run, rc_up, dp_run, dp_up) = &cold20;
            let ratio = rc_up.bytes as f64 / BIG as f64;
            report.row(Row {
            what:
                "Cold coalescing: 20 concurrent cold GETs, 100 MiB blob; upstream bytes / blob size"
                    .into(),
            regcache: format!(
                "{ratio:.3}x ({} upstream GET), {}/20 sha256 ok, {:.2} s",
                rc_up.gets, rc_run.ok, rc_run.secs
            ),
            reference: format!(
                "distribution: {:.2}x ({} upstream GETs), {}/20 sha256 ok, {:.2} s",
                dp_up.bytes as f64 / BIG as f64,
                dp_up.gets,
                dp_run.ok,
                dp_run.secs
            ),
            ratio: format!("{ratio:.3}x"),
            target: "<= 1.02x, 20/20 ok".into(),
            met: Some(ratio <= 1.02 && rc_run.ok == 20),
        });
        }

        // ---- 2. cross-repo: one base layer through 4 repositories ---------------------------
        step("cross-repo: a base layer pulled through 4 repositories of one upstream");
        let (rc_cross, dp_cross, rc_tag_ups, dp_tag_ups) = {
            let mut out = Vec::new();
            for kind in ["rc", "dp"] {
                let meter = Meter::start(up_addr).await;
                let mut srv = if kind == "rc" {
                    start_regcache(&root.join("rc-cross"), &meter.url()).await
                } else {
                    start_registry(&registry_bin, &root.join("dp-cross"), Some(&meter.url())).await
                };
                for i in 1..=4 {
                    pull(&client, &srv.url, &format!("bench/base{i}"), "latest")
                        .await
                        .unwrap_or_else(|e| panic!("{kind} pull bench/base{i}: {e}"));
                }
                let snap = meter.snapshot(&base_d);
                // While we are here: what 100 GETs of a hot tag cost upstream.
                meter.reset();
                for _ in 0..100 {
                    get_manifest(&client, &srv.url, "bench/base1", "latest")
                        .await
                        .unwrap();
                }
                let tag_ups = meter.total();
                srv.stop();
                out.push((snap, tag_ups));
            }
            let (dp, dp_t) = out.pop().unwrap();
            let (rc, rc_t) = out.pop().unwrap();
            (rc, dp, rc_t, dp_t)
        };
        report.row(Row {
            what: "Cross-repo: 32 MiB base layer pulled through 4 repositories; upstream fetches"
                .into(),
            regcache: format!(
                "{} GET (+{} HEAD), {:.2}x layer bytes",
                rc_cross.gets,
                rc_cross.heads,
                rc_cross.bytes as f64 / (32 * MIB) as f64
            ),
            reference: format!(
                "distribution: {} GETs, {:.2}x layer bytes",
                dp_cross.gets,
                dp_cross.bytes as f64 / (32 * MIB) as f64
            ),
            ratio: format!("{} fetch", rc_cross.gets),
            target: "1 upstream fetch".into(),
            met: Some(rc_cross.gets == 1),
        });

        report.row(Row {
            what: "Upstream requests for 100 GETs of a hot tag (within TTL)".into(),
            regcache: format!("{rc_tag_ups}"),
            reference: format!("distribution: {dp_tag_ups}"),
            ratio: String::new(),
            target: "(info)".into(),
            met: None,
        });
    }

    // ---- 3. cold single pull: regcache vs straight from upstream --------------------------
    let cold = Cold {
        k: &k,
        root,
        registry_bin: &registry_bin,
        up: &up,
        upstream_pid: upstream.p.child.id(),
    };
    if k.want("pull") {
        step(&format!(
            "cold single pull of a 98 MiB image (4 layers), {} trials",
            k.pulls
        ));
        let medians = cold_pulls(&cold, "", &mut report).await;
        floor_row(root, &pull_img, &medians, &mut report);
    }
    // ---- 3a. the same image pulled by a real client: skopeo ---------------------------------
    if k.want("skopeo") {
        step(&format!(
            "cold pull of the 98 MiB image by skopeo, {} trials",
            k.pulls
        ));
        skopeo_pulls(&cold, &mut report).await;
    }
    // ---- 3b. the same layer sizes pulled by the Docker daemon ----------------------------------
    if k.want("docker") || k.want("containerd") {
        push_engine_image(&up).await;
    }
    if k.want("docker") {
        step(&format!(
            "cold pull of 98 MiB of tar.gz layers by the Docker daemon, {} trials",
            k.pulls
        ));
        docker_pulls(&cold, &mut report).await;
    }
    // ---- 3c. and by containerd ------------------------------------------------------------
    if k.want("containerd") {
        step(&format!(
            "cold pull of 98 MiB of tar.gz layers by containerd, {} trials",
            k.pulls
        ));
        containerd_pulls(&cold, &mut report).await;
    }
    // ---- 3d. the same over a rate-limited link to the upstream ------------------------------
    if k.want("link") {
        for &mbit in &k.link_mbit {
            step(&format!(
                "cold single pull of a 98 MiB image over a {mbit} Mbit/s link, {} trials",
                k.pulls
            ));
            let link = Link::create(mbit);
            // A second upstream process on the same storage, inside the link's namespace.
            let mut far = start_registry_at(
                &registry_bin,
                &root.join(format!("upstream-{mbit}")),
                &root.join("upstream/data"),
                Some(&link),
            )
            .await;
            let over_link = Cold {
                up: &far.url,
                upstream_pid: far.p.child.id(),
                ..cold
            };
            let label = format!(" over a {mbit} Mbit/s link");
            cold_pulls(&over_link, &label, &mut report).await;
            far.stop();
        }
    }

    // ---- 4. peak RSS: 64 concurrent downloads of a 100 MiB blob, cold then hot ------------
    if k.want("rss") || k.want("blob") || k.want("manifest") {
        let rc_dir = root.join("rc-hot");
        let dp_dir = root.join("dp-hot");
        let (mut rc, mut dp) = if !k.want("rss") {
            (
                start_regcache(&rc_dir, &up).await,
                start_registry(&registry_bin, &dp_dir, Some(&up)).await,
            )
        } else {
            step("peak RSS: 64 concurrent downloads of a 100 MiB blob, cold");
            let meter = Meter::start(up_addr).await;
            let mut rc = start_regcache(&rc_dir, &meter.url()).await;
            let rc_idle = rc.p.status_kib("VmRSS");
            let rc_cold =
                concurrent_gets(&client, &format!("{}{path}", rc.url), &big_d, BIG, 64).await;
            let rc_cold_hwm = rc.p.status_kib("VmHWM");
            let rc_cold_up = meter.snapshot(&big_d);
            tokio::time::sleep(Duration::from_secs(1)).await; // let the commit finish
            rc.stop();
            let meter = Meter::start(up_addr).await;
            let mut dp = start_registry(&registry_bin, &dp_dir, Some(&meter.url())).await;
            let dp_idle = dp.p.status_kib("VmRSS");
            let dp_cold =
                concurrent_gets(&client, &format!("{}{path}", dp.url), &big_d, BIG, 64).await;
            let dp_cold_hwm = dp.p.status_kib("VmHWM");
            let dp_cold_up = meter.snapshot(&big_d);
            tokio::time::sleep(Duration::from_secs(1)).await;
            dp.stop();
            drop(meter);
            report.row(Row {
                what: "Peak RSS (VmHWM), 64 concurrent cold GETs of a 100 MiB blob".into(),
                regcache: format!(
                    "{:.1} MiB (idle {:.1}), {}/64 ok, upstream {:.2}x",
                    mib(rc_cold_hwm),
                    mib(rc_idle),
                    rc_cold.ok,
                    rc_cold_up.bytes as f64 / BIG as f64
                ),
                reference: format!(
                    "distribution: {:.1} MiB (idle {:.1}), {}/64 ok, upstream {:.2}x",
                    mib(dp_cold_hwm),
                    mib(dp_idle),
                    dp_cold.ok,
                    dp_cold_up.bytes as f64 / BIG as f64
                ),
                ratio: format!(
                    "{:.2}x distribution",
                    rc_cold_hwm as f64 / dp_cold_hwm as f64
                ),
                target: "<= 64 MiB".into(),
                met: Some(mib(rc_cold_hwm) <= 64.0 && rc_cold.ok == 64),
            });

            step("peak RSS: 64 concurrent downloads of a 100 MiB blob, hot (fresh processes)");
            // Fresh processes on the same data, straight at the upstream (no meter in the path).
            let rc = start_regcache(&rc_dir, &up).await;
            let dp = start_registry(&registry_bin, &dp_dir, Some(&up)).await;
            let status = blob_cache_status(&client, &format!("{}{path}", rc.url)).await;
            assert!(
                status.contains("hit"),
                "the 100 MiB blob should be cached after a restart; Cache-Status: {status}"
            );
            let rc_idle = rc.p.status_kib("VmRSS");
            let rc_hot =
                concurrent_gets(&client, &format!("{}{path}", rc.url), &big_d, BIG, 64).await;
            let rc_hot_hwm = rc.p.status_kib("VmHWM");
            let dp_idle = dp.p.status_kib("VmRSS");
            let dp_hot =
                concurrent_gets(&client, &format!("{}{path}", dp.url), &big_d, BIG, 64).await;
            let dp_hot_hwm = dp.p.status_kib("VmHWM");
            report.row(Row {
                what: "Peak RSS (VmHWM), 64 concurrent hot GETs of a 100 MiB blob".into(),
                regcache: format!(
                    "{:.1} MiB (idle {:.1}), {}/64 ok, {:.2} s",
                    mib(rc_hot_hwm),
                    mib(rc_idle),
                    rc_hot.ok,
                    rc_hot.secs
                ),
                reference: format!(
                    "distribution: {:.1} MiB (idle {:.1}), {}/64 ok, {:.2} s",
                    mib(dp_hot_hwm),
                    mib(dp_idle),
                    dp_hot.ok,
                    dp_hot.secs
                ),
                ratio: format!("{:.2}x distribution", rc_hot_hwm as f64 / dp_hot_hwm as f64),
                target: "<= 64 MiB".into(),
                met: Some(mib(rc_hot_hwm) <= 64.0 && rc_hot.ok == 64),
            });
            (rc, dp)
        };
        let servers = [
            ("regcache", rc.url.clone()),
            ("distribution", dp.url.clone()),
            ("nginx", nginx.url.clone()),
        ];

        // ---- 5. hot blobs: wrk, 16 connections, regcache vs distribution vs nginx -------------
        if k.want("blob") {
            let small_path = format!("/v2/bench/small/blobs/{small_d}");
            // regcache with `sendfile = "always"`: the zero-copy path remote clients get, where
            // the default gives these loopback clients the copy; an A/B in the same rounds.
            let lending = start_regcache_with(
                &root.join("rc-sendfile"),
                &up,
                "[storage]\nsendfile = \"always\"\n",
            )
            .await;
            for srv_url in [&rc.url, &dp.url, &nginx.url, &lending.url] {
                for p in [&path, &small_path] {
                    // Two full GETs: the first may fill the cache, the second reads it.
                    for _ in 0..2 {
                        let d = if p == &path { &big_d } else { &small_d };
                        let size = if p == &path { BIG } else { SMALL };
                        get_verify(&client, &format!("{srv_url}{p}"), d, size)
                            .await
                            .unwrap();
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            for (label, p) in [("100 MiB", &path), ("5 MiB", &small_path)] {
                step(&format!(
                    "hot blob {label}: wrk -t2 -c16 -d{}s, {} interleaved rounds",
                    k.secs, k.rounds
                ));
                let mut blob_servers = servers.to_vec();
                blob_servers.push(("regcache, sendfile always", lending.url.clone()));
                // CPU each regcache spends per GiB it serves, and wrk per GiB it receives: on
                // loopback both share the cores; with remote clients only regcache's remains.
                let cpu = |s: &Srv| cpu_secs(Some(s.p.child.id()));
                let (rc_cpu, sf_cpu) = (cpu(&rc), cpu(&lending));
                let runs = interleaved(&blob_servers, p, 16, &[], &k, &mut report).await;
                let served = |i: usize| {
                    runs[i]
                        .iter()
                        .map(|w| w.bytes_per_sec * k.secs as f64)
                        .sum::<f64>()
                        / GIB
                };
                let rc_ms = (cpu(&rc) - rc_cpu) * 1e3 / served(0);
                let sf_ms = (cpu(&lending) - sf_cpu) * 1e3 / served(3);
                let client_ms =
                    |i: usize| runs[i].iter().map(|w| w.cpu_secs).sum::<f64>() * 1e3 / served(i);
                let (rc_client_ms, sf_client_ms) = (client_ms(0), client_ms(3));
                let (rc_t, dp_t, ng_t) = (tput(&runs[0]), tput(&runs[1]), tput(&runs[2]));
                let sf_t = tput(&runs[3]);
                let ratios: Vec<f64> = (0..k.rounds)
                    .map(|r| rc_t[r] / dp_t[r].max(ng_t[r]))
                    .collect();
                let ratio = median(&ratios);
                let errors = wrk_errors(&runs);
                report.row(Row {
                    what: format!(
                        "Hot blob {label}, 16 connections; throughput (GiB/s, median of rounds)"
                    ),
                    regcache: format!("{:.2} GiB/s{}", median(&rc_t), errors[0]),
                    reference: format!(
                        "distribution: {:.2} GiB/s{}; nginx: {:.2} GiB/s{}",
                        median(&dp_t),
                        errors[1],
                        median(&ng_t),
                        errors[2]
                    ),
                    ratio: format!("{ratio:.2}x faster ref (rounds: {})", fmt_list(&ratios)),
                    target: ">= 1.0x faster of nginx, distribution".into(),
                    met: Some(ratio >= 1.0),
                });
                let gains: Vec<f64> = (0..k.rounds).map(|r| sf_t[r] / rc_t[r]).collect();
                report.row(Row {
                    what: format!(
                        "Hot blob {label}, 16 connections: sendfile (what remote clients get) vs the copy (the default for loopback clients; TLS, HTTP/2)"
                    ),
                    regcache: format!(
                        "sendfile: {:.2} GiB/s; CPU per GiB: regcache {sf_ms:.0} ms, wrk {sf_client_ms:.0} ms{}",
                        median(&sf_t),
                        errors[3]
                    ),
                    reference: format!(
                        "copy: {:.2} GiB/s; CPU per GiB: regcache {rc_ms:.0} ms, wrk {rc_client_ms:.0} ms",
                        median(&rc_t)
                    ),
                    ratio: format!(
                        "{:.2}x throughput (rounds: {}); {:.2}x regcache CPU per GiB, {:.2}x regcache + wrk",
                        median(&gains),
                        fmt_list(&gains),
                        sf_ms / rc_ms,
                        (sf_ms + sf_client_ms) / (rc_ms + rc_client_ms)
                    ),
                    target: "(info)".into(),
                    met: None,
                });
            }
        }

        // ---- 6. hot tag manifest within the TTL, 64 connections --------------------------------
        if k.want("manifest") {
            step(&format!(
                "hot tag manifest: wrk -t2 -c64 -d{}s, {} interleaved rounds",
                k.secs, k.rounds
            ));
            let mpath = "/v2/bench/small/manifests/latest".to_owned();
            for srv_url in [&rc.url, &dp.url] {
                for _ in 0..2 {
                    get_manifest(&client, srv_url, "bench/small", "latest")
                        .await
                        .unwrap();
                }
            }
            let accept = format!("Accept: {ACCEPT}");
            let runs = interleaved(&servers, &mpath, 64, &[&accept], &k, &mut report).await;
            let rps = |i: usize| runs[i].iter().map(|w| w.rps).collect::<Vec<f64>>();
            let p99 = |i: usize| runs[i].iter().map(|w| w.p99_ms).collect::<Vec<f64>>();
            let (rc_r, dp_r, ng_r) = (rps(0), rps(1), rps(2));
            let ratios: Vec<f64> = (0..k.rounds).map(|r| rc_r[r] / dp_r[r]).collect();
            let ratio = median(&ratios);
            let rc_p99 = median(&p99(0));
            let errors = wrk_errors(&runs);
            let dp_text = format!(
                "distribution: {:.0} req/s, p99 {:.2} ms{}",
                median(&dp_r),
                median(&p99(1)),
                errors[1]
            );
            let ng_text = format!(
                "nginx (static file): {:.0} req/s, p99 {:.2} ms{}",
                median(&ng_r),
                median(&p99(2)),
                errors[2]
            );
            report.row(Row {
                what: "Hot tag manifest within TTL, 64 connections; req/s (median of rounds), p99"
                    .into(),
                regcache: format!(
                    "{:.0} req/s, p99 {rc_p99:.2} ms{}",
                    median(&rc_r),
                    errors[0]
                ),
                reference: format!("{dp_text}; {ng_text}"),
                ratio: format!("{ratio:.1}x distribution (rounds: {})", fmt_list(&ratios)),
                target: ">= 30x distribution, p99 < 5 ms".into(),
                met: Some(ratio >= 30.0 && rc_p99 < 5.0),
            });
        }
        report.row(Row {
            what: "Peak RSS (VmHWM) of the hot processes after all hot wrk runs".into(),
            regcache: format!("{:.1} MiB", mib(rc.p.status_kib("VmHWM"))),
            reference: format!("distribution: {:.1} MiB", mib(dp.p.status_kib("VmHWM"))),
            ratio: String::new(),
            target: "(info)".into(),
            met: None,
        });

        rc.stop();
        dp.stop();
    }
    // ---- 7. S3 storage: a replica on the shared bucket vs one on local disk ----------------
    if k.want("s3") {
        s3(&k, root, up_addr, &big_d, &mut report).await;
    }
    nginx.stop();
    upstream.stop();

    report.print(&k, started.elapsed());
}

/// The `s3` section: a replica with `storage.kind = "s3"` (a 1-node Garage cluster on loopback)
/// against one on local disk, on the 100 MiB blob. Each replica has its own data dir and its
/// own meter in front of the upstream.
async fn s3(k: &Knobs, root: &Path, up_addr: SocketAddr, big_d: &str, report: &mut Report) {
    step("s3: starting a 1-node Garage cluster");
    let garage = garage::Garage::start(1).await;
    let storage = garage.storage_toml(0, "");
    let store = garage.client(0);
    let key = garage::blob_key("docker.io", big_d);
    let client = http();
    let path = format!("/v2/bench/big/blobs/{big_d}");
    let dir = root.join("s3");
    let toml = |s3: bool| if s3 { storage.as_str() } else { "" };
    // Garage shares the 2 cores with the replica: its CPU time tells where a slower fill went.
    let garage_pid = pid_with_arg(&garage.dir.path().join("node0").display().to_string());
    let name = |s3: bool| if s3 { "s3" } else { "local" };

    // a. cold fill from upstream, local vs s3, and c. the s3 replica's upload lag.
    step(&format!(
        "s3: cold fill of a 100 MiB blob from upstream, local vs s3 storage, {} rounds",
        k.rounds
    ));
    let mut fill: [Vec<f64>; 2] = Default::default(); // [local, s3] seconds
    // CPU seconds during each fill: [local replica, s3 replica, Garage while the s3 one fills].
    let mut fill_cpu: [Vec<f64>; 3] = Default::default();
    let mut lag = Vec::new();
    for round in 0..k.rounds {
        for j in 0..2 {
            let s3 = (round + j) % 2 == 1;
            if s3 {
                // The last round's upload (its replica is stopped: no write is in flight).
                delete_object(&*store, &key).await;
            }
            let d = dir.join(format!("fill{round}-{}", name(s3)));
            let meter = Meter::start(up_addr).await;
            let mut rc = start_regcache_with(&d, &meter.url(), toml(s3)).await;
            let pids = [Some(rc.p.child.id()), garage_pid];
            let before = pids.map(cpu_secs);
            let t = Instant::now();
            get_verify(&client, &format!("{}{path}", rc.url), big_d, BIG)
                .await
                .unwrap_or_else(|e| panic!("cold fill on {} storage: {e}", name(s3)));
            let done = Instant::now();
            let after = pids.map(cpu_secs);
            fill[s3 as usize].push((done - t).as_secs_f64());
            fill_cpu[s3 as usize].push(after[0] - before[0]);
            if s3 {
                fill_cpu[2].push(after[1] - before[1]);
            }
            if s3 {
                lag.push(visible(&*store, &key, done).await);
            }
            let up = meter.snapshot(big_d);
            assert_eq!(
                up.gets,
                1,
                "a cold fill on {} storage should GET the blob from upstream once",
                name(s3)
            );
            rc.stop();
            let _ = std::fs::remove_dir_all(&d);
        }
    }
    let (m_local, m_s3) = (median(&fill[0]), median(&fill[1]));
    let ratios: Vec<f64> = (0..k.rounds).map(|r| fill[1][r] / fill[0][r]).collect();
    let ratio = median(&ratios);
    report.row(Row {
        what: format!(
            "S3 storage, cold fill from upstream: 1 GET of a 100 MiB blob (the s3 replica also uploads it), median of {}; wall time",
            k.rounds
        ),
        regcache: format!("s3: {:.0} ms", m_s3 * 1e3),
        reference: format!("local disk: {:.0} ms", m_local * 1e3),
        ratio: format!("{ratio:.2}x local (rounds: {})", fmt_list(&ratios)),
        // Garage runs on the same 2 cores here and takes more CPU than the fill itself (see
        // the raw CPU line); with the bucket on other hosts the client pays only regcache's
        // own extra CPU for the upload.
        target: "(info: Garage shares the 2 cores)".into(),
        met: None,
    });

    // b. cold from the bucket: a fresh s3 replica, the blob in the bucket (from a's last round).
    step(&format!(
        "s3: a fresh replica GETs the 100 MiB blob from the bucket, {} rounds",
        k.rounds
    ));
    let mut from_bucket = Vec::new();
    let mut last_dir = PathBuf::new();
    for round in 0..k.rounds {
        let d = dir.join(format!("bucket{round}"));
        let meter = Meter::start(up_addr).await;
        let mut rc = start_regcache_with(&d, &meter.url(), &storage).await;
        let t = Instant::now();
        get_verify(&client, &format!("{}{path}", rc.url), big_d, BIG)
            .await
            .unwrap_or_else(|e| panic!("cold GET from the bucket: {e}"));
        from_bucket.push(t.elapsed().as_secs_f64());
        let up = meter.snapshot(big_d);
        assert_eq!(
            up.gets, 0,
            "a fresh s3 replica fetched a blob the bucket holds from upstream ({} GETs, {} bytes)",
            up.gets, up.bytes
        );
        rc.stop();
        if let Some(prev) = (round > 0).then(|| dir.join(format!("bucket{}", round - 1))) {
            let _ = std::fs::remove_dir_all(prev);
        }
        last_dir = d;
    }
    let m_bucket = median(&from_bucket);
    let mibs = |secs: f64| (BIG / MIB) as f64 / secs;
    report.row(Row {
        what: format!(
            "S3 storage, cold from the bucket: a fresh s3 replica GETs the 100 MiB blob another replica uploaded, median of {}; wall time",
            k.rounds
        ),
        regcache: format!(
            "{:.0} ms, {:.0} MiB/s, 0 upstream blob GETs",
            m_bucket * 1e3,
            mibs(m_bucket)
        ),
        reference: format!(
            "local disk, cold from upstream (row above): {:.0} ms, {:.0} MiB/s",
            m_local * 1e3,
            mibs(m_local)
        ),
        ratio: format!("{:.2}x local from upstream", m_bucket / m_local),
        target: "0 upstream blob GETs".into(),
        met: Some(true),
    });

    // c. upload lag, measured in a.
    report.row(Row {
        what: "S3 storage, upload lag: end of the cold fill's response to the object visible in the bucket (HEAD polled every 5 ms)".into(),
        regcache: format!("{:.0} ms", median(&lag) * 1e3),
        reference: format!("rounds (ms): {:?}", ms(&lag)),
        ratio: String::new(),
        target: "(info)".into(),
        met: None,
    });
    report.raw(format!(
        "s3 trials (ms): cold fill local {:?}; cold fill s3 {:?}; upload lag {:?}; cold from the bucket {:?}",
        ms(&fill[0]),
        ms(&fill[1]),
        ms(&lag),
        ms(&from_bucket)
    ));
    report.raw(format!(
        "s3 cold fill CPU time (median ms): local replica {:.0}; s3 replica {:.0}, Garage {:.0} (during the client's GET, on {} cores)",
        median(&fill_cpu[0]) * 1e3,
        median(&fill_cpu[1]) * 1e3,
        median(&fill_cpu[2]) * 1e3,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));

    // d. hot: both replicas serve the blob from their data dir.
    step(&format!(
        "s3: hot blob 100 MiB, s3 vs local storage: wrk -t2 -c16 -d{}s, {} interleaved rounds",
        k.secs, k.rounds
    ));
    {
        let up = format!("http://{up_addr}");
        // Fresh processes: the s3 one on b's last data dir, the local one filled here.
        let mut rc_s3 = start_regcache_with(&last_dir, &up, &storage).await;
        let mut rc_local = start_regcache(&dir.join("hot-local"), &up).await;
        for rc in [&rc_s3, &rc_local] {
            // Two full GETs: the first may fill the cache, the second reads it.
            for _ in 0..2 {
                get_verify(&client, &format!("{}{path}", rc.url), big_d, BIG)
                    .await
                    .unwrap();
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        for rc in [&rc_s3, &rc_local] {
            let status = blob_cache_status(&client, &format!("{}{path}", rc.url)).await;
            assert!(
                status.contains("hit"),
                "the 100 MiB blob should be cached; Cache-Status: {status}"
            );
        }
        let servers = [
            ("regcache s3", rc_s3.url.clone()),
            ("regcache local", rc_local.url.clone()),
        ];
        let runs = interleaved(&servers, &path, 16, &[], k, report).await;
        let (s3_t, local_t) = (tput(&runs[0]), tput(&runs[1]));
        let ratios: Vec<f64> = (0..k.rounds).map(|r| s3_t[r] / local_t[r]).collect();
        let ratio = median(&ratios);
        let errors = wrk_errors(&runs);
        report.row(Row {
            what: "S3 storage, hot blob 100 MiB, 16 connections (both from local disk); throughput (GiB/s, median of rounds)".into(),
            regcache: format!("s3: {:.2} GiB/s{}", median(&s3_t), errors[0]),
            reference: format!("local disk: {:.2} GiB/s{}", median(&local_t), errors[1]),
            ratio: format!("{ratio:.2}x local (rounds: {})", fmt_list(&ratios)),
            target: ">= 0.9x local".into(),
            met: Some(ratio >= 0.9),
        });
        rc_s3.stop();
        rc_local.stop();
    }

    // e. two fresh s3 replicas miss the same blob: at the same instant, then one after the
    // other's upload became visible.
    step(&format!(
        "s3: two fresh s3 replicas GET the same cold 100 MiB blob, together and in turn, {} rounds",
        k.rounds
    ));
    let mut together = Vec::new();
    let mut in_turn = Vec::new();
    let mut gets = (Vec::new(), Vec::new());
    for round in 0..k.rounds {
        for turn in [false, true] {
            // No replica is running: nothing can write the object after this.
            delete_object(&*store, &key).await;
            let meter = Meter::start(up_addr).await;
            let dirs = ["a", "b"].map(|r| dir.join(format!("pair{round}-{turn}-{r}")));
            let mut a = start_regcache_with(&dirs[0], &meter.url(), &storage).await;
            let mut b = start_regcache_with(&dirs[1], &meter.url(), &storage).await;
            let get = |url: &str| {
                let (client, url, digest) =
                    (client.clone(), format!("{url}{path}"), big_d.to_owned());
                tokio::spawn(async move { get_verify(&client, &url, &digest, BIG).await })
            };
            if turn {
                get(&a.url).await.unwrap().unwrap();
                visible(&*store, &key, Instant::now()).await;
                get(&b.url).await.unwrap().unwrap();
            } else {
                let (ga, gb) = (get(&a.url), get(&b.url));
                ga.await.unwrap().unwrap();
                gb.await.unwrap().unwrap();
            }
            let up = meter.snapshot(big_d);
            let x = up.bytes as f64 / BIG as f64;
            if turn {
                in_turn.push(x);
                gets.1.push(up.gets);
            } else {
                together.push(x);
                gets.0.push(up.gets);
            }
            a.stop();
            b.stop();
            for d in &dirs {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
    let m_together = median(&together);
    let m_turn = median(&in_turn);
    report.row(Row {
        what: "S3 storage, 2 fresh s3 replicas GET the same cold 100 MiB blob at the same instant; upstream bytes / blob size (median of rounds)".into(),
        regcache: format!("{m_together:.2}x (upstream GETs per round: {:?})", gets.0),
        reference: "cross-replica single flight is best effort".into(),
        ratio: format!("{m_together:.2}x (rounds: {})", fmt_list(&together)),
        target: "<= 2x".into(),
        met: Some(m_together <= 2.02),
    });
    report.row(Row {
        what: "S3 storage, 2 fresh s3 replicas, the second GETs after the first's upload is visible; upstream bytes / blob size (median of rounds)".into(),
        regcache: format!("{m_turn:.2}x (upstream GETs per round: {:?})", gets.1),
        reference: "the second reads the bucket".into(),
        ratio: format!("{m_turn:.2}x (rounds: {})", fmt_list(&in_turn)),
        target: "1.0x".into(),
        met: Some(m_turn <= 1.02),
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// The first process whose command line contains `needle`.
fn pid_with_arg(needle: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(needle)
                .then_some(pid)
        })
}

/// Deletes `key` from the bucket (a missing one is fine) and checks it is gone.
async fn delete_object(store: &dyn ObjectStore, key: &ObjectPath) {
    match store.delete(key).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => panic!("delete {key} from the bucket: {e}"),
    }
    match store.head(key).await {
        Err(object_store::Error::NotFound { .. }) => {}
        other => panic!("{key} is still in the bucket after a delete: {other:?}"),
    }
}

/// Seconds from `since` until `key` answers a HEAD in the bucket with the 100 MiB blob's size.
async fn visible(store: &dyn ObjectStore, key: &ObjectPath, since: Instant) -> f64 {
    let deadline = since + Duration::from_secs(60);
    loop {
        match store.head(key).await {
            Ok(m) => {
                assert_eq!(m.size, BIG as u64, "{key} in the bucket has the wrong size");
                return since.elapsed().as_secs_f64();
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => panic!("HEAD {key} in the bucket: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "{key} did not reach the bucket within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---- the report -----------------------------------------------------------------------------

struct Row {
    what: String,
    regcache: String,
    reference: String,
    ratio: String,
    target: String,
    met: Option<bool>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    raw: Vec<String>,
}

impl Report {
    fn row(&mut self, r: Row) {
        eprintln!(
            "  -> {}: regcache {} | {} | {}",
            r.what, r.regcache, r.reference, r.ratio
        );
        self.rows.push(r);
    }

    fn raw(&mut self, line: String) {
        eprintln!("  {line}");
        self.raw.push(line);
    }

    fn print(&self, k: &Knobs, took: Duration) {
        let mut out = String::new();
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|s| s.trim().to_owned())
            })
            .unwrap_or_default();
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let _ = writeln!(
            out,
            "\n## Load benchmark results\n\nmachine: {cores} cores, {cpu}; wrk {}s per run, {} rounds, {} cold pulls; bench took {:.0} s\n",
            k.secs,
            k.rounds,
            k.pulls,
            took.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "| # | Measurement | regcache | reference points | ratio | target | met |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        for (i, r) in self.rows.iter().enumerate() {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "**NO**",
                None => "",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {met} |",
                i + 1,
                r.what,
                r.regcache,
                r.reference,
                r.ratio,
                r.target
            );
        }
        let _ = writeln!(out, "\nRaw runs (each wrk run, in the order they ran):\n");
        for l in &self.raw {
            let _ = writeln!(out, "- {l}");
        }
        println!("{out}");
    }
}

/// What the cold-pull sections share: the knobs, the bench's temp dir, distribution's binary,
/// and the upstream (its URL and process).
#[derive(Clone, Copy)]
struct Cold<'a> {
    k: &'a Knobs,
    root: &'a Path,
    registry_bin: &'a Path,
    up: &'a str,
    upstream_pid: u32,
}

/// Per contender ([`CONTENDERS`]) and trial: what a pull returned, and the CPU seconds the
/// proxy and the upstream used meanwhile.
type Trials<T> = [Vec<(T, [f64; 2])>; 3];

/// Runs `pull(base, dir)` once per trial for each contender: straight from the upstream,
/// through a fresh regcache and through a fresh distribution proxy (each started empty in
/// `dir`), in rotating order.
async fn rotate_cold<T>(
    c: &Cold<'_>,
    prefix: &str,
    mut pull: impl AsyncFnMut(&str, &Path) -> T,
) -> Trials<T> {
    let Cold {
        k,
        root,
        registry_bin,
        up,
        upstream_pid,
    } = *c;
    let mut runs: Trials<T> = Default::default();
    for trial in 0..k.pulls {
        for j in 0..3 {
            let who = (trial + j) % 3;
            let dir = root.join(format!("{prefix}{trial}-{who}"));
            let mut srv = match who {
                0 => None,
                1 => Some(start_regcache(&dir, up).await),
                _ => Some(start_registry(registry_bin, &dir, Some(up)).await),
            };
            std::fs::create_dir_all(&dir).unwrap();
            let base = srv.as_ref().map_or(up.to_owned(), |s| s.url.clone());
            let pids = [srv.as_ref().map(|s| s.p.child.id()), Some(upstream_pid)];
            let before = pids.map(cpu_secs);
            let got = pull(&base, &dir).await;
            let after = pids.map(cpu_secs);
            runs[who].push((got, [after[0] - before[0], after[1] - before[1]]));
            if let Some(s) = &mut srv {
                s.stop();
            }
            // Drop the copy this trial made so the disk's write-back does not pile up.
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    runs
}

/// Cold single pulls of `bench/pull` from `up` straight, through regcache and through
/// distribution, in rotating order, each proxy started empty per trial; adds the wall-time row
/// (`label` names the conditions) and per-request and CPU lines to `report`. Returns the
/// medians of the direct pull and of the pull through regcache.
async fn cold_pulls(c: &Cold<'_>, label: &str, report: &mut Report) -> PullMedians {
    let client = http();
    let me = Some(std::process::id());
    let runs = rotate_cold(c, "pull", async |base: &str, _: &Path| {
        let before = cpu_secs(me);
        let t = pull(&client, base, "bench/pull", "latest").await.unwrap();
        (t, cpu_secs(me) - before)
    })
    .await;
    // Per contender (upstream direct, regcache, distribution): per trial, per request
    // (manifest, config, layers) the time to first byte and the total, in seconds.
    let times = runs
        .each_ref()
        .map(|r| r.iter().map(|((t, _), _)| t.clone()).collect::<Vec<_>>());
    // CPU seconds used during each pull by (the proxy, the upstream, this client).
    let cpu = runs.each_ref().map(|r| {
        r.iter()
            .map(|((_, client), [proxy, upstream])| [*proxy, *upstream, *client])
            .collect::<Vec<_>>()
    });
    let totals = times
        .each_ref()
        .map(|trials| trials.iter().map(|t| t.iter().map(|x| x.1).sum()).collect());
    report_pulls(
        report,
        format!(
            "Cold single pull (manifest + config + 4 layers, 98 MiB){label}, median of {}; wall time",
            c.k.pulls
        ),
        &format!("cold pull{label}"),
        "client",
        &totals,
        &cpu,
        Some(1.1),
    );
    for (who, name) in CONTENDERS.iter().enumerate() {
        let n_items = times[who].first().map_or(0, Vec::len);
        let items: Vec<String> = (0..n_items)
            .map(|i| {
                let ttfb: Vec<f64> = times[who].iter().map(|t| t[i].0).collect();
                let total: Vec<f64> = times[who].iter().map(|t| t[i].1).collect();
                let item = ["manifest", "config", "64MiB", "24MiB", "8MiB", "2MiB"]
                    .get(i)
                    .copied()
                    .unwrap_or("?");
                if i == 0 {
                    format!("{item} {:.1}", median(&total) * 1e3)
                } else {
                    format!(
                        "{item} {:.1}/{:.1}",
                        median(&ttfb) * 1e3,
                        median(&total) * 1e3
                    )
                }
            })
            .collect();
        report.raw(format!(
            "cold pull{label} per request, {name} (median ms, first byte/total): {}",
            items.join(", ")
        ));
    }
    PullMedians {
        direct_wall: median(&totals[0]),
        direct_cpu: median(&cpu[0].iter().map(|[_, u, c]| u + c).collect::<Vec<_>>()),
        regcache_wall: median(&totals[1]),
    }
}

/// The medians of a cold pull's trials, in seconds.
struct PullMedians {
    /// Wall time straight from the upstream.
    direct_wall: f64,
    /// CPU time of the upstream and the client, straight from the upstream.
    direct_cpu: f64,
    /// Wall time through regcache.
    regcache_wall: f64,
}

/// Adds the floor of a cold pull through any caching proxy that verifies digests, on this
/// machine's cores: the upstream and the client spend what they spend on the direct pull, and
/// the proxy at least hashes the image's bytes and writes them into the page cache (a lower
/// bound: its own networking is left out), or in practice also receives and sends them once
/// more over loopback. All of it shares the cores, so no pull through such a proxy can take
/// less than the sum over the cores.
fn floor_row(dir: &Path, img: &Img, pulled: &PullMedians, report: &mut Report) {
    let bytes = img.layers.concat();
    let [hash, write, transfer] = proxy_work(dir, &bytes);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let floor = (pulled.direct_cpu + hash + write) / cores;
    let with_net = floor + transfer / cores;
    let d = pulled.direct_wall;
    report.row(Row {
        what: format!(
            "Cold single pull: the floor on {cores} cores for a proxy that verifies and stores \
             the {} MiB (the direct pull's CPU + sha256 + page-cache write, over the cores)",
            bytes.len() / MIB
        ),
        regcache: format!("{:.0} ms", pulled.regcache_wall * 1e3),
        reference: format!(
            "floor {:.0} ms (direct pull's CPU {:.0} + sha256 {:.0} + write {:.0} ms); with one \
             more loopback transfer ({:.0} ms): {:.0} ms",
            floor * 1e3,
            pulled.direct_cpu * 1e3,
            hash * 1e3,
            write * 1e3,
            transfer * 1e3,
            with_net * 1e3
        ),
        ratio: format!(
            "floor {:.2}x upstream, with the transfer {:.2}x; regcache {:.2}x",
            floor / d,
            with_net / d,
            pulled.regcache_wall / d
        ),
        target: "(info: what the 1.1x target leaves a proxy)".into(),
        met: None,
    });
}

/// CPU seconds of the least work a caching proxy does on `bytes` beyond what the upstream and
/// the client do: sha256 of them, writing them into a file's page cache in 512 KiB writes, and
/// one loopback TCP transfer (sender and receiver); each the least of 3 runs.
fn proxy_work(dir: &Path, bytes: &[u8]) -> [f64; 3] {
    use std::io::{Read as _, Write as _};
    let least = |f: &mut dyn FnMut() -> f64| (0..3).map(|_| f()).fold(f64::INFINITY, f64::min);
    let hash = least(&mut || {
        let t = thread_cpu_secs();
        std::hint::black_box(Sha256::digest(bytes));
        thread_cpu_secs() - t
    });
    let write = least(&mut || {
        let path = dir.join("floor-write");
        let mut f = std::fs::File::create(&path).unwrap();
        let t = thread_cpu_secs();
        for chunk in bytes.chunks(512 * 1024) {
            f.write_all(chunk).unwrap();
        }
        let took = thread_cpu_secs() - t;
        drop(f);
        std::fs::remove_file(&path).unwrap();
        took
    });
    let transfer = least(&mut || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::scope(|s| {
            let sender = s.spawn(|| {
                let mut conn = std::net::TcpStream::connect(addr).unwrap();
                let t = thread_cpu_secs();
                conn.write_all(bytes).unwrap();
                thread_cpu_secs() - t
            });
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 512 * 1024];
            let t = thread_cpu_secs();
            while conn.read(&mut buf).unwrap() > 0 {}
            let received = thread_cpu_secs() - t;
            received + sender.join().unwrap()
        })
    });
    [hash, write, transfer]
}

/// CPU seconds the calling thread has used.
fn thread_cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0.0, |ns| ns as f64 / 1e9)
}

/// The contenders of a cold pull, in the order [`rotate_cold`] returns them.
const CONTENDERS: [&str; 3] = ["upstream direct", "regcache", "distribution"];

/// Adds a cold pull's wall-time row and its raw lines (trials, CPU time) to `report`. `wall`
/// and `cpu` are per contender ([`CONTENDERS`]) and trial: seconds, and the CPU seconds of
/// (the proxy, the upstream, the client). `limit` is the target ratio to upstream direct, if
/// the row has one.
fn report_pulls(
    report: &mut Report,
    what: String,
    tag: &str,
    client: &str,
    wall: &[Vec<f64>; 3],
    cpu: &[Vec<[f64; 3]>; 3],
    limit: Option<f64>,
) {
    let (m_up, m_rc, m_dp) = (median(&wall[0]), median(&wall[1]), median(&wall[2]));
    let ratio = m_rc / m_up;
    let paired: Vec<f64> = wall[1].iter().zip(&wall[0]).map(|(r, u)| r / u).collect();
    report.row(Row {
        what,
        regcache: format!("{:.0} ms", m_rc * 1e3),
        reference: format!(
            "upstream direct: {:.0} ms; distribution: {:.0} ms",
            m_up * 1e3,
            m_dp * 1e3
        ),
        ratio: format!(
            "{ratio:.2}x upstream (median of trial ratios {:.2}x)",
            median(&paired)
        ),
        target: limit.map_or("(info: a real client)".into(), |l| {
            format!("<= {l}x upstream")
        }),
        met: limit.map(|l| ratio <= l),
    });
    report.raw(format!(
        "{tag} trials (ms): upstream {:?}; regcache {:?}; distribution {:?}; regcache/upstream per trial {:?}",
        ms(&wall[0]),
        ms(&wall[1]),
        ms(&wall[2]),
        paired.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>()
    ));
    for (who, name) in CONTENDERS.iter().enumerate() {
        let c = |i: usize| median(&cpu[who].iter().map(|c| c[i]).collect::<Vec<_>>()) * 1e3;
        report.raw(format!(
            "{tag} CPU time, {name} (median ms): proxy {:.0}, upstream {:.0}, {client} {:.0}; sum {:.0} over a {:.0} ms pull on {} cores",
            c(0),
            c(1),
            c(2),
            c(0) + c(1) + c(2),
            median(&wall[who]) * 1e3,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ));
    }
}

/// The cold pull again, by a real client: `skopeo copy docker://... dir:...` fetches the
/// layers one after another (a `dir:` destination takes one blob at a time), sniffs each one's
/// compression, verifies it and writes it to a directory. Straight from the
/// upstream, through a fresh regcache and through a fresh distribution proxy, in rotating
/// order; the ratio of each trial (a pair run back to back) and of the medians.
async fn skopeo_pulls(c: &Cold<'_>, report: &mut Report) {
    let run = |base: &str, dest: &Path| -> f64 {
        let src = format!(
            "docker://{}/bench/pull:latest",
            base.trim_start_matches("http://")
        );
        let dst = format!("dir:{}", dest.display());
        let t = Instant::now();
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false", &src, &dst])
            .output()
            .unwrap_or_else(|e| {
                panic!("skopeo: {e}; the `skopeo` section needs it (apt-get install skopeo)")
            });
        assert!(
            out.status.success(),
            "skopeo copy {src}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        t.elapsed().as_secs_f64()
    };
    let runs = rotate_cold(c, "skopeo", async |base: &str, dir: &Path| {
        let kids = reaped_cpu_secs("self");
        let secs = tokio::task::block_in_place(|| run(base, &dir.join("out")));
        (secs, reaped_cpu_secs("self") - kids)
    })
    .await;
    report_client_pulls(
        report,
        format!(
            "Cold pull of the same image by skopeo (to a dir), median of {}; wall time",
            c.k.pulls
        ),
        "skopeo cold pull",
        "skopeo",
        &runs,
    );
}

/// The cold pull by the Docker daemon, the client a mirror serves most: `docker pull` of an
/// image with the same layer sizes as `bench/pull`, as real tar.gz layers the daemon can
/// unpack. It fetches up to 3 layers at once, then decompresses, verifies and unpacks each
/// (vfs storage). Each trial pulls by the full name (`127.0.0.1:PORT/bench/docker`; the daemon
/// takes loopback registries as insecure, so plain HTTP) from the upstream, a fresh regcache or
/// a fresh distribution proxy, in rotating order, then removes the image so the next trial
/// downloads and unpacks every layer again.
async fn docker_pulls(c: &Cold<'_>, report: &mut Report) {
    let docker = common::clients::Dockerd::start_config("{}", &[]).await;
    let daemon = docker.pid();
    let runs = rotate_cold(c, "docker", async |base: &str, _: &Path| {
        let name = format!("{}/bench/docker:latest", base.trim_start_matches("http://"));
        let cpu = || tree_cpu_secs(daemon) + reaped_cpu_secs("self");
        let before = cpu();
        let t = Instant::now();
        docker.run(&["pull", "--quiet", &name]).await;
        let secs = t.elapsed().as_secs_f64();
        let used = cpu() - before;
        docker.run(&["rmi", &name]).await;
        (secs, used)
    })
    .await;
    report_client_pulls(
        report,
        format!(
            "Cold pull of the same layer sizes by the Docker daemon (`docker pull`, tar.gz layers unpacked to vfs), median of {}; wall time",
            c.k.pulls
        ),
        "docker cold pull",
        "dockerd",
        &runs,
    );
}

/// Pushes `bench/docker:latest` to `up`: the layer sizes of `bench/pull` as real tar.gz layers,
/// which an engine unpacks (the `docker` and `containerd` sections pull it).
async fn push_engine_image(up: &str) {
    let layers = [(50, 64), (51, 24), (52, 8), (53, 2)]
        .map(|(seed, mib)| common::Layer::new(seed, mib * MIB))
        .to_vec();
    let img = common::Image::new(common::image::DOCKER_V2, "amd64", layers);
    common::push(up, "bench/docker", "latest", &img).await;
}

/// The same image pulled by containerd, the engine of Kubernetes nodes, twice over: fetched
/// only (`ctr content fetch`: the blobs into containerd's content store, three at a time, each
/// verified) and pulled (`ctr images pull`: the same, then the layers unpacked by the native
/// snapshotter). `images rm --sync` empties the store between trials.
async fn containerd_pulls(c: &Cold<'_>, report: &mut Report) {
    let containerd = common::clients::Containerd::start().await;
    let daemon = containerd.pid();
    // (ctr's command and its options, what the row calls it)
    let fetch: &[&str] = &["content", "fetch"];
    let pull: &[&str] = &["images", "pull", "--snapshotter", "native"];
    for (command, what) in [
        (
            fetch,
            "fetch (`ctr content fetch`: blobs into the content store)",
        ),
        (
            pull,
            "pull (`ctr images pull`: tar.gz layers unpacked by the native snapshotter)",
        ),
    ] {
        let runs = rotate_cold(c, "containerd", async |base: &str, _: &Path| {
            let name = format!("{}/bench/docker:latest", base.trim_start_matches("http://"));
            let cpu = || tree_cpu_secs(daemon) + reaped_cpu_secs("self");
            let before = cpu();
            let t = Instant::now();
            // `--debug` turns off ctr's progress display, which would round each pull up to
            // its next 100 ms tick.
            let mut args = vec!["--debug"];
            args.extend(command);
            args.extend(["--plain-http", &name]);
            containerd.run(&args).await;
            let secs = t.elapsed().as_secs_f64();
            let used = cpu() - before;
            containerd.remove(&name).await;
            (secs, used)
        })
        .await;
        report_client_pulls(
            report,
            format!(
                "Cold containerd {what}, the same layer sizes, median of {}; wall time",
                c.k.pulls
            ),
            &format!("containerd {}", command[..2].join(" ")),
            "containerd + ctr",
            &runs,
        );
    }
}

/// [`report_pulls`] for a real client: `runs` as [`rotate_cold`] returns them, each trial's
/// result the wall seconds and the client's CPU seconds.
fn report_client_pulls(
    report: &mut Report,
    what: String,
    tag: &str,
    client: &str,
    runs: &Trials<(f64, f64)>,
) {
    let wall = runs
        .each_ref()
        .map(|r| r.iter().map(|((secs, _), _)| *secs).collect::<Vec<_>>());
    let cpu = runs.each_ref().map(|r| {
        r.iter()
            .map(|((_, client), [proxy, upstream])| [*proxy, *upstream, *client])
            .collect::<Vec<_>>()
    });
    report_pulls(report, what, tag, client, &wall, &cpu, None);
}

/// A rate-limited link: a network namespace joined to this one by a veth pair, each end
/// shaped to `mbit` with a token bucket (`tc tbf`; this kernel has no netem, so no added
/// delay). Removed when dropped. Needs root, `ip` and `tc` (iproute2).
struct Link {
    netns: String,
    /// The host side of the veth pair.
    near_if: String,
    /// The namespace side's address.
    far: String,
}

impl Link {
    fn create(mbit: u64) -> Link {
        // Unique per link: a namespace's teardown finishes in the background.
        static LINKS: AtomicU64 = AtomicU64::new(0);
        let id = std::process::id() % 10_000;
        let n = LINKS.fetch_add(1, Ordering::Relaxed);
        let netns = format!("rcbench{id}-{n}");
        let (near_if, far_if) = (format!("rcb{id}-{n}a"), format!("rcb{id}-{n}b"));
        let net = format!("10.213.{}", (id as u64 + n * 37) % 250);
        let far = format!("{net}.2");
        // Enough for TSO-sized packets at this rate; `latency` bounds the queue.
        let tbf = format!("tbf rate {mbit}mbit burst 1mb latency 50ms");
        let steps = [
            format!("ip netns add {netns}"),
            format!("ip link add {near_if} type veth peer name {far_if} netns {netns}"),
            format!("ip addr add {net}.1/30 dev {near_if}"),
            format!("ip link set {near_if} up"),
            format!("ip -n {netns} addr add {far}/30 dev {far_if}"),
            format!("ip -n {netns} link set {far_if} up"),
            format!("ip -n {netns} link set lo up"),
            format!("tc qdisc add dev {near_if} root {tbf}"),
            format!("tc -n {netns} qdisc add dev {far_if} root {tbf}"),
        ];
        let link = Link {
            netns,
            near_if: near_if.clone(),
            far,
        };
        for cmd in steps {
            let argv: Vec<&str> = cmd.split_whitespace().collect();
            let out = Command::new(argv[0]).args(&argv[1..]).output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => panic!(
                    "`{cmd}` failed: {}\nThe `link` section needs root and iproute2 (apt-get \
                     install iproute2); leave it out with BENCH_ONLY.",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => panic!("`{cmd}`: {e} (apt-get install iproute2)"),
            }
        }
        link
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting one end of the pair deletes both, at once.
        let _ = Command::new("ip")
            .args(["link", "del", &self.near_if])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

fn step(what: &str) {
    eprintln!("load: {what}");
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn ms(v: &[f64]) -> Vec<u64> {
    v.iter().map(|s| (s * 1e3).round() as u64).collect()
}

fn fmt_list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---- wrk ------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct Wrk {
    requests: u64,
    rps: f64,
    /// Bytes read per second (wrk's Transfer/sec: partial responses at the end count too).
    bytes_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
    socket_errors: String,
    /// CPU seconds wrk itself used.
    cpu_secs: f64,
}

/// GiB/s of each run.
fn tput(runs: &[Wrk]) -> Vec<f64> {
    runs.iter().map(|w| w.bytes_per_sec / GIB).collect()
}

/// A note per server when any of its runs saw errors.
fn wrk_errors(runs: &[Vec<Wrk>]) -> Vec<String> {
    runs.iter()
        .map(|rs| {
            let non: u64 = rs.iter().map(|w| w.non_2xx).sum();
            let sock: Vec<&str> = rs
                .iter()
                .map(|w| w.socket_errors.as_str())
                .filter(|s| !s.is_empty())
                .collect();
            let mut s = String::new();
            if non > 0 {
                s += &format!(" ({non} non-2xx!)");
            }
            if !sock.is_empty() {
                s += &format!(" (socket errors: {})", sock.join("; "));
            }
            s
        })
        .collect()
}

/// `rounds` rounds of one wrk run per server, the order rotating each round.
async fn interleaved(
    servers: &[(&str, String)],
    path: &str,
    conns: u32,
    headers: &[&str],
    k: &Knobs,
    report: &mut Report,
) -> Vec<Vec<Wrk>> {
    let mut out: Vec<Vec<Wrk>> = vec![Vec::new(); servers.len()];
    for round in 0..k.rounds {
        for j in 0..servers.len() {
            let i = (round + j) % servers.len();
            let (name, base) = &servers[i];
            let w = wrk(&format!("{base}{path}"), conns, k.secs, headers).await;
            report.raw(format!(
                "round {} {name} c{conns} {path}: {} requests, {:.0} req/s, {:.3} GiB/s, p50 {:.2} ms, p99 {:.2} ms{}{}",
                round + 1,
                w.requests,
                w.rps,
                w.bytes_per_sec / GIB,
                w.p50_ms,
                w.p99_ms,
                if w.non_2xx > 0 {
                    format!(", {} non-2xx", w.non_2xx)
                } else {
                    String::new()
                },
                if w.socket_errors.is_empty() {
                    String::new()
                } else {
                    format!(", socket errors {}", w.socket_errors)
                }
            ));
            out[i].push(w);
        }
    }
    out
}

async fn wrk(url: &str, conns: u32, secs: u64, headers: &[&str]) -> Wrk {
    let mut cmd = tokio::process::Command::new("wrk");
    cmd.args(["-t2", &format!("-c{conns}"), &format!("-d{secs}s")])
        .args(["--timeout", "30s", "--latency"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(url);
    // wrk is the only child that ends (and is reaped) while it runs.
    let before = reaped_cpu_secs("self");
    let out = cmd.output().await.expect("run wrk");
    let cpu = reaped_cpu_secs("self") - before;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut w = parse_wrk(&text).unwrap_or_else(|| panic!("cannot read wrk's output:\n{text}"));
    w.cpu_secs = cpu;
    w
}

/// CPU seconds used by the ended and reaped children of process `pid` (a number or `self`):
/// `cutime` + `cstime` in `/proc/PID/stat`, in clock ticks.
fn reaped_cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses: state is field 3, cutime 16.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = after
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let ticks = fields.get(12).copied().unwrap_or(0) + fields.get(13).copied().unwrap_or(0);
    ticks as f64 / rustix::param::clock_ticks_per_second() as f64
}

/// CPU seconds of process `pid` and every process below it, live or reaped.
fn tree_cpu_secs(pid: u32) -> f64 {
    let kids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // After the command name, in parentheses: state, then the parent's pid.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                == Some(pid)
        })
        .collect();
    cpu_secs(Some(pid))
        + reaped_cpu_secs(&pid.to_string())
        + kids.into_iter().map(tree_cpu_secs).sum::<f64>()
}

fn parse_wrk(text: &str) -> Option<Wrk> {
    let mut w = Wrk::default();
    let mut seen = (false, false, false);
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            w.rps = rest.trim().parse().ok()?;
            seen.0 = true;
        } else if let Some(rest) = line.strip_prefix("Transfer/sec:") {
            w.bytes_per_sec = size_bytes(rest.trim())?;
            seen.1 = true;
        } else if let Some(rest) = line.strip_prefix("50%") {
            w.p50_ms = time_ms(rest.trim())?;
        } else if let Some(rest) = line.strip_prefix("99%") {
            w.p99_ms = time_ms(rest.trim())?;
            seen.2 = true;
        } else if line.contains(" requests in ") {
            w.requests = line.split_whitespace().next()?.parse().ok()?;
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            w.non_2xx = rest.trim().parse().ok()?;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            w.socket_errors = rest.trim().to_owned();
        }
    }
    (seen == (true, true, true)).then_some(w)
}

/// wrk's binary units: "2.95GB" is 2.95 GiB.
fn size_bytes(s: &str) -> Option<f64> {
    let i = s.find(|c: char| c.is_ascii_alphabetic())?;
    let n: f64 = s[..i].parse().ok()?;
    let mult = match &s[i..] {
        "B" => 1.0,
        "KB" => 1024.0,
        "MB" => 1024.0 * 1024.0,
        "GB" => GIB,
        "TB" => GIB * 1024.0,
        _ => return None,
    };
    Some(n * mult)
}

fn time_ms(s: &str) -> Option<f64> {
    let i = s.find(|c: char| c.is_ascii_alphabetic())?;
    let n: f64 = s[..i].parse().ok()?;
    let mult = match &s[i..] {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => return None,
    };
    Some(n * mult)
}

// ---- processes ------------------------------------------------------------------------------

fn require(program: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin", "/sbin"] {
        let p = Path::new(dir).join(program);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{program}` is not installed; the load benchmark needs it. Install it with \
         `apt-get install -y {package}` (or run ./scripts/bench, which does)"
    );
}

/// CPU seconds a process's live threads have run (from `/proc/PID/task/*/schedstat`).
fn cpu_secs(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let ns: u64 = tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

/// A child process in its own process group (a `BENCH_WRAP` wrapper and what it runs),
/// stopped (SIGTERM to the group, then SIGKILL) when dropped.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc { name, child, log }
    }

    /// A `/proc/PID/status` value in KiB (`VmHWM`, `VmRSS`).
    fn status_kib(&self, key: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let group = format!("-{}", self.child.id());
        let signal = |sig: &str| {
            let _ = Command::new("kill")
                .args([sig, "--", &group])
                .stderr(Stdio::null())
                .status();
        };
        signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever of the group is left (a wrapper's child, nginx workers).
        signal("-KILL");
        let _ = self.child.wait();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A server process and its base URL.
struct Srv {
    p: Proc,
    url: String,
}

impl Srv {
    fn stop(&mut self) {
        self.p.stop();
    }
}

async fn wait_up(p: &mut Proc, url: &str) {
    let client = http();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("{} exited ({status}):\n{}", p.name, p.log_text());
        }
        if client.get(url).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{} did not come up at {url}:\n{}", p.name, p.log_text());
}

/// Debian's `docker-registry`: a plain registry, or a pull-through proxy of `proxy`.
async fn start_registry(bin: &Path, dir: &Path, proxy: Option<&str>) -> Srv {
    start_registry_with(bin, dir, &dir.join("data"), proxy, None).await
}

/// A plain `docker-registry` serving the storage at `data` (another one's, read only), inside
/// `link`'s namespace when given.
async fn start_registry_at(bin: &Path, dir: &Path, data: &Path, link: Option<&Link>) -> Srv {
    start_registry_with(bin, dir, data, None, link).await
}

async fn start_registry_with(
    bin: &Path,
    dir: &Path,
    data: &Path,
    proxy: Option<&str>,
    link: Option<&Link>,
) -> Srv {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    let host = link.map_or("127.0.0.1", |l| &l.far);
    let proxy_yaml = proxy.map_or(String::new(), |u| format!("proxy:\n  remoteurl: {u}\n"));
    let config = format!(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  cache:\n    blobdescriptor: inmemory\nhttp:\n  addr: {host}:{port}\n{proxy_yaml}",
        data.display()
    );
    let cfg = dir.join("config.yml");
    std::fs::write(&cfg, config).unwrap();
    let name = if proxy.is_some() {
        "docker-registry (proxy)"
    } else {
        "docker-registry"
    };
    let mut cmd = match link {
        Some(l) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &l.netns]).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let mut p = Proc::spawn(name, cmd.arg("serve").arg(&cfg), dir.join("registry.log"));
    let url = format!("http://{host}:{port}");
    wait_up(&mut p, &format!("{url}/v2/")).await;
    Srv { p, url }
}

/// regcache's release binary with Docker Hub replaced by `upstream` and default cache policy.
async fn start_regcache(dir: &Path, upstream: &str) -> Srv {
    start_regcache_with(dir, upstream, "").await
}

/// [`start_regcache`] with `extra` appended to its config (top-level tables, such as a
/// `[storage]` table).
async fn start_regcache_with(dir: &Path, upstream: &str, extra: &str) -> Srv {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    let cfg = dir.join("regcache.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n[log]\nlevel = \"warn\"\n[upstreams.\"docker.io\"]\nurls = [\"{upstream}\"]\n{extra}",
            dir.join("data").display()
        ),
    )
    .unwrap();
    // `{port}` tells apart the outputs of the processes a run starts (a fresh one per trial).
    let wrap: Vec<String> = std::env::var("BENCH_WRAP")
        .unwrap_or_default()
        .split_whitespace()
        .map(|w| w.replace("{port}", &port.to_string()))
        .collect();
    let mut cmd = match wrap.split_first() {
        Some((prog, args)) => {
            let mut c = Command::new(prog);
            c.args(args).arg(env!("CARGO_BIN_EXE_regcache"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_regcache")),
    };
    let mut p = Proc::spawn(
        "regcache",
        cmd.arg("serve")
            .arg("--config")
            .arg(&cfg)
            .env_remove("RUST_LOG"),
        dir.join("regcache.log"),
    );
    let url = format!("http://127.0.0.1:{port}");
    wait_up(&mut p, &format!("{url}/v2/")).await;
    Srv { p, url }
}

/// nginx serving `dir/www` with sendfile, as the ceiling for bytes from disk.
async fn start_nginx(bin: &Path, dir: &Path) -> Srv {
    let port = free_port();
    for t in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(dir.join("tmp").join(t)).unwrap();
    }
    let root_user = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    let d = dir.display();
    let conf = format!(
        "{user}worker_processes auto;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  default_type application/octet-stream;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  server {{
    listen 127.0.0.1:{port};
    root {d}/www;
    location / {{ }}
  }}
}}
",
        user = if root_user { "user root;\n" } else { "" }
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let mut p = Proc::spawn(
        "nginx",
        Command::new(bin)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off;"]),
        dir.join("stdout.log"),
    );
    let url = format!("http://127.0.0.1:{port}");
    wait_up(&mut p, &format!("{url}/")).await;
    Srv { p, url }
}

// ---- the metering proxy ---------------------------------------------------------------------

/// A counting reverse proxy in front of the upstream: requests (method, path) and body bytes.
struct Meter {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(String, String)>>>,
    bytes: Arc<AtomicU64>,
    _stop: oneshot::Sender<()>,
}

/// What went upstream for one blob.
struct Upstream {
    gets: usize,
    heads: usize,
    /// Body bytes of every upstream answer.
    bytes: u64,
}

impl Meter {
    async fn start(target: SocketAddr) -> Meter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let bytes: Arc<AtomicU64> = Arc::default();
        let client: Client<HttpConnector, Incoming> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let (stop, mut stopped) = oneshot::channel();
        let (seen2, bytes2) = (Arc::clone(&seen), Arc::clone(&bytes));
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => a.unwrap(),
                    _ = &mut stopped => return,
                };
                let (client, seen, bytes) =
                    (client.clone(), Arc::clone(&seen2), Arc::clone(&bytes2));
                tokio::spawn(async move {
                    let svc = service_fn(move |mut req: hyper::Request<Incoming>| {
                        let (client, seen, bytes) =
                            (client.clone(), Arc::clone(&seen), Arc::clone(&bytes));
                        async move {
                            let pq = req
                                .uri()
                                .path_and_query()
                                .map_or("/".to_owned(), |p| p.as_str().to_owned());
                            seen.lock()
                                .unwrap()
                                .push((req.method().to_string(), pq.clone()));
                            *req.uri_mut() = format!("http://{target}{pq}").parse().unwrap();
                            let resp = client.request(req).await.unwrap();
                            let (parts, body) = resp.into_parts();
                            let body = body.map_frame(move |f| {
                                if let Some(d) = f.data_ref() {
                                    bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                                }
                                f
                            });
                            Ok::<_, hyper::Error>(hyper::Response::from_parts(parts, body))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Meter {
            addr,
            seen,
            bytes,
            _stop: stop,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn total(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn reset(&self) {
        self.seen.lock().unwrap().clear();
        self.bytes.store(0, Ordering::SeqCst);
    }

    /// Upstream requests for one blob digest, and all body bytes so far.
    fn snapshot(&self, digest: &str) -> Upstream {
        let seen = self.seen.lock().unwrap();
        let count = |m: &str| {
            seen.iter()
                .filter(|(method, p)| method == m && p.contains(&format!("/blobs/{digest}")))
                .count()
        };
        Upstream {
            gets: count("GET"),
            heads: count("HEAD"),
            bytes: self.bytes.load(Ordering::SeqCst),
        }
    }
}

// ---- images and clients ---------------------------------------------------------------------

/// A single-platform Docker schema2 image. Layers are opaque bytes: registries do not look
/// inside them.
struct Img {
    manifest: Bytes,
    config: Bytes,
    layers: Vec<Bytes>,
}

impl Img {
    fn new(layers: Vec<Bytes>) -> Img {
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| sha256(l)).collect::<Vec<_>>()},
        });
        let config = Bytes::from(serde_json::to_vec(&config).unwrap());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_V2,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": config.len(), "digest": sha256(&config)},
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": l.len(), "digest": sha256(l),
            })).collect::<Vec<_>>(),
        });
        Img {
            manifest: Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap()),
            config,
            layers,
        }
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap()
}

/// Pushes an image through the registry API (monolithic blob uploads, then the manifest).
async fn push(client: &reqwest::Client, base: &str, repo: &str, img: &Img) {
    for blob in std::iter::once(&img.config).chain(&img.layers) {
        let resp = client
            .post(format!("{base}/v2/{repo}/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202, "start upload: {:?}", resp.text().await);
        let loc = resp.headers()["location"].to_str().unwrap().to_owned();
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("{base}{loc}")
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let resp = client
            .put(format!("{loc}{sep}digest={}", sha256(blob)))
            .header("content-type", "application/octet-stream")
            .body(blob.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "finish upload: {:?}", resp.text().await);
    }
    let resp = client
        .put(format!("{base}/v2/{repo}/manifests/latest"))
        .header("content-type", DOCKER_V2)
        .body(img.manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "put manifest: {:?}", resp.text().await);
}

/// GETs a manifest with every modern `Accept`; checks its bytes against its digest header.
async fn get_manifest(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
) -> Result<Bytes, String> {
    let resp = client
        .get(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("accept", ACCEPT)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("manifest {repo}:{reference}: {}", resp.status()));
    }
    let digest = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.bytes().await.map_err(|e| e.to_string())?;
    if let Some(d) = digest
        && d != sha256(&body)
    {
        return Err(format!(
            "manifest {repo}:{reference}: bytes do not match {d}"
        ));
    }
    Ok(body)
}

/// Pulls an image as a client does (manifest, config, layers in turn), verifying every
/// digest. Returns (time to first byte, total) in seconds of each request.
async fn pull(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    tag: &str,
) -> Result<Vec<(f64, f64)>, String> {
    let t = Instant::now();
    let body = get_manifest(client, base, repo, tag).await?;
    let mut times = vec![(f64::NAN, t.elapsed().as_secs_f64())];
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let blobs = std::iter::once(&v["config"]).chain(v["layers"].as_array().into_iter().flatten());
    for b in blobs {
        let d = b["digest"].as_str().ok_or("blob without digest")?;
        let size = b["size"].as_u64().ok_or("blob without size")? as usize;
        let t = Instant::now();
        let ttfb = get_verify(client, &format!("{base}/v2/{repo}/blobs/{d}"), d, size).await?;
        times.push((ttfb, t.elapsed().as_secs_f64()));
    }
    Ok(times)
}

/// GETs a blob, streaming it through sha256; an error unless the bytes match. Returns the
/// seconds to the first body byte.
async fn get_verify(
    client: &reqwest::Client,
    url: &str,
    digest: &str,
    size: usize,
) -> Result<f64, String> {
    let t = Instant::now();
    let mut resp = client.get(url).send().await.map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("GET {url}: {}", resp.status()));
    }
    let mut h = Sha256::new();
    let mut n = 0usize;
    let mut ttfb = None;
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        ttfb.get_or_insert_with(|| t.elapsed().as_secs_f64());
        n += chunk.len();
        h.update(&chunk);
    }
    let got = format!("sha256:{:x}", h.finalize());
    if n != size || got != digest {
        return Err(format!(
            "GET {url}: {n} bytes of {got}, want {size} of {digest}"
        ));
    }
    Ok(ttfb.unwrap_or(0.0))
}

/// The `Cache-Status` a HEAD gets.
async fn blob_cache_status(client: &reqwest::Client, url: &str) -> String {
    let resp = client.head(url).send().await.unwrap();
    resp.headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

struct Concurrent {
    ok: usize,
    secs: f64,
}

/// `n` concurrent GETs of one blob, each verified; how many got the right bytes.
async fn concurrent_gets(
    client: &reqwest::Client,
    url: &str,
    digest: &str,
    size: usize,
    n: usize,
) -> Concurrent {
    let t = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (client, url, digest) = (client.clone(), url.to_owned(), digest.to_owned());
            tokio::spawn(async move { get_verify(&client, &url, &digest, size).await })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => eprintln!("  client failed: {e}"),
        }
    }
    Concurrent {
        ok,
        secs: t.elapsed().as_secs_f64(),
    }
}
