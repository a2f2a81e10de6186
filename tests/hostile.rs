//! Hostile clients: traversal, NUL bytes, huge names, bogus ranges, overlong headers and
//! request targets, thousands of idle connections, slowloris headers and a client that stops
//! reading mid-blob. Each gets the right status and OCI error code, nothing reaches the disk,
//! and the server keeps serving everyone else. Requests go out as raw TCP so that nothing
//! normalises them on the way.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use common::fake::{FakeRegistry, Faults};
use common::{Image, Layer, Regcache, count_files, image};

/// Sends a raw request head (`extra` is more header lines, each ending in CRLF); returns the
/// status (0 if the server closed without answering) and the OCI error code.
async fn raw(addr: SocketAddr, method: &str, target: &str, extra: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req =
        format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n");
    // The server may close before it has read all of an oversized request.
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    (
        status,
        v["errors"][0]["code"].as_str().unwrap_or("").to_owned(),
    )
}

/// Whether the server closed `s` (EOF or reset) within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_oci_errors_and_write_nothing() {
    let up = FakeRegistry::start(Faults::default()).await;
    let img = Image::simple(61, 1);
    up.add("library/alpine", "3", &img);
    let cache = Regcache::start(&up.url(), |_| {}).await;
    let layer = img.layers[0].digest();
    let hex = "a".repeat(64);
    let huge = "n".repeat(300);
    let long_target = format!("/v2/alpine/manifests/{}", "t".repeat(9000));
    let files_before = count_files(cache.data.path());

    #[rustfmt::skip]
    let cases: Vec<(String, String, u16, &str)> = vec![
        // traversal, plain and encoded
        ("/v2/../../etc/passwd/manifests/x".into(), String::new(), 400, "NAME_INVALID"),
        (format!("/v2/a/..%2f..%2fetc/blobs/sha256:{hex}"), String::new(), 400, "NAME_INVALID"),
        ("/v2/%2e%2e/%2e%2e/etc/manifests/x".into(), String::new(), 400, "NAME_INVALID"),
        (format!("/v2/library/%2E%2E/blobs/{layer}"), String::new(), 400, "NAME_INVALID"),
        ("/v2/alpine/manifests/..%2f..%2fetc%2fpasswd".into(), String::new(), 400, "TAG_INVALID"),
        (format!("/v2/alpine/blobs/sha256:..%2f{}", &hex[..58]), String::new(), 400, "DIGEST_INVALID"),
        // NUL bytes
        ("/v2/alp%00ine/manifests/3".into(), String::new(), 400, "NAME_INVALID"),
        ("/v2/alpine/manifests/3%00".into(), String::new(), 400, "TAG_INVALID"),
        (format!("/v2/alpine/blobs/sha256:{}%00", &hex[..63]), String::new(), 400, "DIGEST_INVALID"),
        ("/v2/alpine/tags/list?ns=docker.io%00evil".into(), String::new(), 404, "NAME_UNKNOWN"),
        // a name over 255 characters
        (format!("/v2/{huge}/manifests/1"), String::new(), 400, "NAME_INVALID"),
        (format!("/v2/a/{huge}/blobs/sha256:{hex}"), String::new(), 400, "NAME_INVALID"),
        // a request target over max_uri_length
        (long_target.clone(), String::new(), 414, "URI_TOO_LONG"),
    ];
    let mut wrong = Vec::new();
    for (target, extra, status, code) in &cases {
        let got = raw(cache.addr, "GET", target, extra).await;
        if got != (*status, code.to_string()) {
            wrong.push(format!(
                "GET {target:.80}: got {got:?}, want {status} {code}"
            ));
        }
    }
    // Headers over max_header_bytes (64KiB): 431, or the connection closed.
    let big = format!("X-Junk: {}\r\n", "j".repeat(100 * 1024));
    let got = raw(cache.addr, "GET", "/v2/", &big).await;
    if got.0 != 431 && got.0 != 0 {
        wrong.push(format!(
            "overlong headers: got {got:?}, want 431 or a closed connection"
        ));
    }
    let many: String = (0..5000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let got = raw(cache.addr, "GET", "/v2/", &many).await;
    if got.0 != 431 && got.0 != 0 {
        wrong.push(format!(
            "5000 headers: got {got:?}, want 431 or a closed connection"
        ));
    }
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));
    assert!(
        up.requests().is_empty(),
        "hostile input reached upstream: {:?}",
        up.requests()
    );
    assert_eq!(
        count_files(cache.data.path()),
        files_before,
        "nothing written to the data dir"
    );

    // Bogus ranges on a cached blob: ignored (whole blob) or 416, never anything else.
    let blob = common::get_blob(&cache.url(), "alpine", &layer).await;
    // The fill commits (renames tmp/ to blobs/) just after the client's last byte: count once
    // it has, or a walk of the data dir may see the file in both places.
    common::Scrape::until(&cache.url(), |m| {
        m.get("regcache_fetches_in_flight", &[]) == 0.0
    })
    .await;
    let files_cached = count_files(cache.data.path());
    let size = blob.len();
    for (range, status, code) in [
        ("bytes=5-1", 200, ""),
        ("bytes=-", 200, ""),
        ("bytes=999999999999-", 416, "RANGE_INVALID"),
        ("bytes=99999999999999999999999-", 200, ""),
        ("bytes=0-1,3-4", 200, ""),
        ("bytes=0-1, 0-1, 0-1, 0-1, 0-1, 0-1, 0-1, 0-1", 200, ""),
        ("bytes=--1", 200, ""),
        ("lines=1-2", 200, ""),
    ] {
        let resp = common::http()
            .get(format!("{}/v2/alpine/blobs/{layer}", cache.url()))
            .header("range", range)
            .send()
            .await
            .unwrap();
        let got = resp.status().as_u16();
        let content_range = resp
            .headers()
            .get("content-range")
            .map(|v| v.to_str().unwrap().to_owned());
        if status == 200 {
            assert_eq!(got, 200, "{range}");
            assert_eq!(resp.bytes().await.unwrap(), blob, "{range}: the whole blob");
        } else {
            let (s, c) = common::error_code(resp).await;
            assert_eq!((s, c.as_str()), (status, code), "{range}");
            assert_eq!(content_range.as_deref(), Some(&*format!("bytes */{size}")));
        }
    }
    // A NUL inside a header value is refused by the HTTP parser itself.
    let got = raw(
        cache.addr,
        "GET",
        &format!("/v2/alpine/blobs/{layer}"),
        "Range: bytes=0-1\0\r\n",
    )
    .await;
    assert_eq!(got.0, 400, "NUL in a header: {got:?}");
    assert_eq!(count_files(cache.data.path()), files_cached);
    assert_eq!(up.count("GET", "/blobs/"), 1, "ranges did not refetch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_idle_connections_do_not_stop_a_pull_and_are_closed() {
    const IDLE: usize = 3000;
    // Both ends of every connection are in this process.
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let soft: usize = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX);
    assert!(
        soft > 2 * IDLE + 200,
        "this test needs {} open files (ulimit -n is {soft})",
        2 * IDLE + 200
    );
    let up = FakeRegistry::start(Faults::default()).await;
    let img = Image::simple(62, 2);
    up.add("library/busy", "1", &img);
    let cache = Regcache::start(&up.url(), |c| {
        c.limits.header_read_timeout = Duration::from_secs(2);
        c.limits.idle_timeout = Duration::from_secs(2);
    })
    .await;
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(cache.addr).await.unwrap());
    }
    // Half of them have made one request and now sit on a keep-alive connection.
    for s in idle.iter_mut().step_by(2) {
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
    }
    let t = Instant::now();
    assert_eq!(
        common::pull(&cache.url(), "busy", "1").await,
        img.digest(),
        "a real pull while {IDLE} connections sit idle"
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Every idle connection is closed by the server after the timeouts.
    let mut open = 0;
    for s in &mut idle {
        if !closed_within(s, Duration::from_secs(6)).await {
            open += 1;
        }
    }
    assert_eq!(open, 0, "idle connections still open after the timeouts");
    let s = common::Scrape::until(&cache.url(), |s| {
        s.get("regcache_client_connections", &[]) <= 1.0
    })
    .await;
    assert!(s.get("regcache_client_connections", &[]) <= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_are_dropped() {
    let up = FakeRegistry::start(Faults::default()).await;
    let cache = Regcache::start(&up.url(), |c| {
        c.limits.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    let mut s = TcpStream::connect(cache.addr).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\n").await.unwrap();
    let t = Instant::now();
    let drip = b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let mut cut = false;
    'drip: for _ in 0..10 {
        for b in drip {
            if s.write_all(&[*b]).await.is_err() {
                cut = true;
                break 'drip;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            if t.elapsed() > Duration::from_secs(5) {
                break 'drip;
            }
        }
    }
    let closed = cut || closed_within(&mut s, Duration::from_secs(1)).await;
    assert!(closed, "a client dripping header bytes was not dropped");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "dropped after {:?}, header_read_timeout is 1s",
        t.elapsed()
    );
    // Meanwhile and afterwards, others are served.
    assert_eq!(cache.get("/v2/").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_does_not_block_others_on_the_same_blob() {
    // Big enough to fill both sockets' buffers; dripped, so both requests join one fill.
    let up = FakeRegistry::start(Faults {
        drip: Some((8, Duration::from_millis(100))),
        ..Faults::default()
    })
    .await;
    let img = Image::new(image::DOCKER_V2, "amd64", vec![Layer::new(63, 24 << 20)]);
    up.add("library/big", "1", &img);
    let cache = Regcache::start(&up.url(), |_| {}).await;
    let layer = img.layers[0].digest();

    // The stalled client: asks for the blob, reads the head and a little, then stops reading.
    let mut stalled = TcpStream::connect(cache.addr).await.unwrap();
    stalled
        .write_all(format!("GET /v2/big/blobs/{layer} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut first = [0u8; 4096];
    let n = stalled.read(&mut first).await.unwrap();
    assert!(
        String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first[..n])
    );

    // Another client pulls the same blob to the end, in time.
    let t = Instant::now();
    let got = tokio::time::timeout(
        Duration::from_secs(30),
        common::get_blob(&cache.url(), "big", &layer),
    )
    .await
    .expect("the second client was held up by the stalled one");
    assert_eq!(image::sha256(&got), layer);
    eprintln!("second client: {:?}", t.elapsed());
    assert_eq!(up.count("GET", "/blobs/"), 1, "one upstream fetch for both");
    // The fill committed the blob although the stalled client has not read it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache.stored_files() == 0 {
        assert!(Instant::now() < deadline, "blob never committed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And a third client gets it from the cache while the first still stalls.
    let again = common::get_blob(&cache.url(), "big", &layer).await;
    assert_eq!(image::sha256(&again), layer);
    assert_eq!(up.count("GET", "/blobs/"), 1);
    drop(stalled);
}

/// A client that takes none of its response's bytes for `idle_timeout` is cut off, so clients
/// that stop reading cannot hold connection slots (or a passed-through blob's upstream slot)
/// for good; a response waiting on upstream that long is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_but_a_slow_upstream_is_waited_for() {
    let up = FakeRegistry::start(Faults::default()).await;
    let (big, slow) = (
        Image::new(image::DOCKER_V2, "amd64", vec![Layer::new(64, 24 << 20)]),
        Image::new(image::DOCKER_V2, "amd64", vec![Layer::new(65, 1 << 20)]),
    );
    up.add("library/big", "1", &big);
    up.add("library/slow", "1", &slow);
    let cache = Regcache::start(&up.url(), |c| {
        c.limits.idle_timeout = Duration::from_millis(700);
    })
    .await;
    let layer = big.layers[0].digest();
    assert_eq!(
        image::sha256(&common::get_blob(&cache.url(), "big", &layer).await),
        layer
    );

    // Asks for the cached blob, reads its head, then reads nothing for 3 idle timeouts.
    let mut stalled = TcpStream::connect(cache.addr).await.unwrap();
    stalled
        .write_all(format!("GET /v2/big/blobs/{layer} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = vec![0u8; 4096];
    let n = stalled.read(&mut got).await.unwrap();
    assert!(String::from_utf8_lossy(&got[..n]).starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut total = n;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut got)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(k)) => total += k,
            Err(_) => panic!("the stalled connection is still open after {total} bytes"),
        }
    }
    assert!(total < 24 << 20, "the whole blob arrived: {total} bytes");

    // Upstream sends a blob in 3 pieces, 1 s apart: longer than idle_timeout each time, and
    // the response, waiting on upstream, completes.
    up.set(|f| f.drip = Some((3, Duration::from_secs(1))));
    let slow_layer = slow.layers[0].digest();
    let body = common::get_blob(&cache.url(), "slow", &slow_layer).await;
    assert_eq!(image::sha256(&body), slow_layer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed_after_idle_timeout() {
    let up = FakeRegistry::start(Faults::default()).await;
    // HTTP/2 has no header deadline between requests: only idle_timeout ends the connection.
    let cache = Regcache::start(&up.url(), |c| {
        c.limits.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let tcp = TcpStream::connect(cache.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(format!("http://{}/v2/", cache.addr))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 200);
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("an idle h2 connection stayed open")
        .unwrap()
        .ok();
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_new_clients_wait_for_a_free_slot() {
    let up = FakeRegistry::start(Faults::default()).await;
    let cache = Regcache::start(&up.url(), |c| {
        c.limits.max_connections = 2;
    })
    .await;
    let mut a = TcpStream::connect(cache.addr).await.unwrap();
    let _b = TcpStream::connect(cache.addr).await.unwrap();
    // Both slots are taken: the third connects (backlog) but is not served yet.
    let third = tokio::spawn({
        let url = cache.url();
        async move { common::http().get(format!("{url}/v2/")).send().await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "served past max_connections");
    // One leaves: the waiting client is served.
    a.shutdown().await.unwrap();
    drop(a);
    let resp = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the waiting client was never served")
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
}
