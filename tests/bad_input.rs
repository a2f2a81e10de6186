//! Bad input gets a clear OCI error and touches neither disk nor upstream. Requests go out
//! as raw HTTP so that paths like `..` reach regcache exactly as an attacker would send them.

mod common;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use common::fake::{FakeRegistry, Faults};
use common::{Image, Regcache};

/// Sends `method target` verbatim; returns status, the OCI error code and the `Allow` header.
async fn raw(addr: std::net::SocketAddr, method: &str, target: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
            .unwrap_or_default()
    };
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let code = v["errors"][0]["code"].as_str().unwrap_or("").to_owned();
    assert!(
        method == "HEAD"
            || status < 400
            || v["errors"][0]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
        "{method} {target}: error without a message: {body}"
    );
    (status, code, header("allow"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_oci_errors_and_touch_nothing() {
    let up = FakeRegistry::start(Faults::default()).await;
    let img = Image::simple(41, 1);
    up.add("library/alpine", "3", &img);
    let cache = Regcache::start(&up.url(), |_| {}).await;
    let layer = img.layers[0].digest();
    let long_name = format!("{}/x", "a".repeat(255));
    let long_tag = "t".repeat(129);
    let hex63 = "a".repeat(63);
    let sha512_short = format!("sha512:{}", "b".repeat(64));

    #[rustfmt::skip]
    let cases: Vec<(String, u16, &str)> = vec![
        // names outside the grammar
        ("/v2/library/../etc/manifests/3".into(), 400, "NAME_INVALID"),
        ("/v2/library/%2e%2e/etc/manifests/3".into(), 400, "NAME_INVALID"),
        (format!("/v2/library/%2E%2E/etc/blobs/{layer}"), 400, "NAME_INVALID"),
        ("/v2/..%2f..%2fetc/manifests/3".into(), 400, "NAME_INVALID"),
        ("/v2//etc/passwd/manifests/3".into(), 400, "NAME_INVALID"),
        ("/v2/library//alpine/manifests/3".into(), 400, "NAME_INVALID"),
        ("/v2/Library/Alpine/manifests/3".into(), 400, "NAME_INVALID"),
        ("/v2/alp%00ine/manifests/3".into(), 400, "NAME_INVALID"),
        ("/v2/-alpine/manifests/3".into(), 400, "NAME_INVALID"),
        (format!("/v2/{long_name}/manifests/3"), 400, "NAME_INVALID"),
        ("/v2/bad_host:5000/x/manifests/1".into(), 400, "NAME_INVALID"),
        ("/v2/host:99999999/x/manifests/1".into(), 400, "NAME_INVALID"),
        // malformed or unsupported digests and tags
        ("/v2/alpine/blobs/sha256:abc".into(), 400, "DIGEST_INVALID"),
        (format!("/v2/alpine/blobs/sha256:{hex63}"), 400, "DIGEST_INVALID"),
        (format!("/v2/alpine/blobs/sha256:{}", "G".repeat(64)), 400, "DIGEST_INVALID"),
        (format!("/v2/alpine/blobs/md5:{}", "a".repeat(32)), 400, "DIGEST_INVALID"),
        (format!("/v2/alpine/blobs/{sha512_short}"), 400, "DIGEST_INVALID"),
        ("/v2/alpine/blobs/latest".into(), 400, "DIGEST_INVALID"),
        ("/v2/alpine/manifests/sha256:zz".into(), 400, "DIGEST_INVALID"),
        ("/v2/alpine/manifests/bad!tag".into(), 400, "TAG_INVALID"),
        (format!("/v2/alpine/manifests/{long_tag}"), 400, "TAG_INVALID"),
        ("/v2/alpine/manifests/.hidden".into(), 400, "TAG_INVALID"),
        // registries nobody configured
        ("/v2/quay.example.com/x/y/manifests/1".into(), 404, "NAME_UNKNOWN"),
        ("/v2/localhost/x/manifests/1".into(), 404, "NAME_UNKNOWN"),
        ("/v2/localhost:5000/x/manifests/1".into(), 404, "NAME_UNKNOWN"),
        ("/v2/registry.corp.example:5443/a/b/manifests/1".into(), 404, "NAME_UNKNOWN"),
        ("/v2/x/y/manifests/1?ns=registry.example.org".into(), 404, "NAME_UNKNOWN"),
    ];
    let mut wrong = Vec::new();
    for (target, status, code) in &cases {
        let got = raw(cache.addr, "GET", target).await;
        if (got.0, got.1.as_str()) != (*status, *code) {
            wrong.push(format!(
                "GET {target}: got {} {}, want {status} {code}",
                got.0, got.1
            ));
        }
        let head = raw(cache.addr, "HEAD", target).await;
        if head.0 != *status {
            wrong.push(format!("HEAD {target}: got {}, want {status}", head.0));
        }
    }

    // Every write method is refused, whatever the path.
    let write_targets = [
        "/v2/alpine/manifests/3".to_owned(),
        format!("/v2/alpine/blobs/{layer}"),
        "/v2/alpine/blobs/uploads/".to_owned(),
        "/v2/alpine/blobs/uploads/some-session".to_owned(),
    ];
    for target in &write_targets {
        for method in ["PUT", "POST", "DELETE", "PATCH"] {
            let (status, code, allow) = raw(cache.addr, method, target).await;
            if (status, code.as_str(), allow.as_str()) != (405, "UNSUPPORTED", "GET, HEAD") {
                wrong.push(format!(
                    "{method} {target}: got {status} {code} allow={allow:?}"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));
    assert!(
        up.requests().is_empty(),
        "bad input reached upstream: {:?}",
        up.requests()
    );
    assert_eq!(
        common::count_files(cache.data.path().join("blobs").as_path()),
        0
    );

    // The same cache still works for good input afterwards.
    assert_eq!(
        common::pull(&cache.url(), "alpine", "3").await,
        img.digest()
    );
}
