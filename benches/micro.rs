//! Micro-benchmarks of the hot pure functions: request routing (`regcache::oci::route`) and
//! digest verification throughput (`Digest::of`, the streaming `Verifier` fed in the fill's
//! batch size) against coreutils' `sha256sum` on the same bytes.
//!
//! ```sh
//! cargo bench --bench micro            # or ./scripts/bench, which runs the load bench too
//! ```

use std::hint::black_box;
use std::io::Write as _;
use std::process::Command;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use regcache::oci::digest::{Algorithm, Digest, Verifier};
use regcache::oci::route::Request;

const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Bytes hashed per digest measurement: a mid-sized layer.
const LAYER: usize = 64 << 20;
/// What one fill step hashes at most (`WRITE_BATCH` in `cache::flight`).
const BATCH: usize = 512 << 10;

fn routes(c: &mut Criterion) {
    let blob = format!("/v2/library/alpine/blobs/{D}");
    let by_digest = format!("/v2/ghcr.io/owner/team/image/manifests/{D}");
    let cases: [(&str, &str, Option<&str>); 7] = [
        ("base", "/v2/", None),
        ("blob", &blob, None),
        ("manifest_tag", "/v2/library/alpine/manifests/3.20", None),
        ("manifest_digest_prefixed", &by_digest, None),
        (
            "manifest_ns_query",
            "/v2/library/alpine/manifests/3.20",
            Some("ns=docker.io"),
        ),
        ("upload", "/v2/library/alpine/blobs/uploads/", None),
        ("not_found", "/v2/library/alpine/nothing/here", None),
    ];
    let mut g = c.benchmark_group("route");
    for (name, path, query) in cases {
        g.bench_function(name, |b| {
            b.iter(|| Request::parse(black_box(path), black_box(query)))
        });
    }
    g.bench_function("digest_from_str", |b| {
        b.iter(|| black_box(D).parse::<Digest>())
    });
    g.finish();
}

fn digests(c: &mut Criterion) {
    let bytes = noise(7, LAYER);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("layer");
    std::fs::File::create(&file)
        .and_then(|mut f| f.write_all(&bytes))
        .expect("write the layer file");
    let want = Digest::of(Algorithm::Sha256, &bytes);
    assert_eq!(
        sha256sum(&file),
        want.hex(),
        "sha256sum agrees with Digest::of"
    );

    let mut g = c.benchmark_group("digest_64MiB");
    g.throughput(Throughput::Bytes(LAYER as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("Digest::of sha256", |b| {
        b.iter(|| Digest::of(Algorithm::Sha256, black_box(&bytes)))
    });
    g.bench_function("Verifier sha256, 512 KiB updates", |b| {
        b.iter(|| {
            let mut v = Verifier::new(Algorithm::Sha256);
            for chunk in black_box(&bytes).chunks(BATCH) {
                v.update(chunk);
            }
            v.finish()
        })
    });
    g.bench_function("Digest::of sha512", |b| {
        b.iter(|| Digest::of(Algorithm::Sha512, black_box(&bytes)))
    });
    // The same bytes from a file in the page cache, process start included (~1 ms of ~40+).
    g.bench_function("sha256sum (coreutils, file)", |b| {
        b.iter(|| sha256sum(black_box(&file)))
    });
    g.finish();
}

/// `sha256sum FILE`'s hex digest.
fn sha256sum(file: &std::path::Path) -> String {
    let out = Command::new("sha256sum")
        .arg(file)
        .output()
        .expect("run sha256sum (coreutils)");
    assert!(out.status.success(), "sha256sum failed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Deterministic incompressible bytes (xorshift), like a real layer.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = routes, digests
}
criterion_main!(benches);
