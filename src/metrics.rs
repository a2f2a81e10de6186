//! Prometheus metrics: one registry per running cache, exposed as text on `GET /metrics`.
//!
//! "Bytes saved" is `regcache_served_bytes_total{source="cache"}`; the hit ratio is
//! `regcache_cache_lookups_total{result="hit"}` over all lookups. Gauges that describe the disk
//! are kept current as content is committed, never recomputed by walking the disk per scrape.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::upstream::guard::BreakerState;

/// Latency buckets from 0.5 ms (a hot manifest) to 2 min (a cold multi-GB layer).
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

/// Every metric regcache exports.
pub struct Metrics {
    registry: Registry,
    /// Client requests by kind, method, status class, upstream.
    pub requests: IntCounterVec,
    /// Time to response headers, by kind.
    pub request_duration: HistogramVec,
    /// Cache lookups by kind, upstream, result.
    pub lookups: IntCounterVec,
    /// Body bytes sent to clients by source (cache | upstream).
    pub served_bytes: IntCounterVec,
    /// Body bytes sent to clients with `sendfile`, without a copy through regcache's memory
    /// (part of `served_bytes{source="cache"}`).
    pub sendfile_bytes: IntCounter,
    /// Body bytes fetched from each upstream.
    pub fetched_bytes: IntCounterVec,
    /// Upstream exchanges by upstream, method, status.
    pub upstream_requests: IntCounterVec,
    /// Upstream time to response headers, by upstream.
    pub upstream_duration: HistogramVec,
    /// Upstream failures by upstream and reason.
    pub upstream_errors: IntCounterVec,
    /// Token requests by upstream and result (ok | refused | error).
    pub token_fetches: IntCounterVec,
    /// 0 closed, 1 open, 2 half-open.
    pub breaker_state: IntGaugeVec,
    /// Upstream's `RateLimit-Limit` / `RateLimit-Remaining`, by upstream.
    pub ratelimit_limit: IntGaugeVec,
    pub ratelimit_remaining: IntGaugeVec,
    /// Blob fills running now.
    pub fills_in_flight: IntGauge,
    /// Client connections open now.
    pub client_connections: IntGauge,
    /// Committed content on disk.
    pub cache_bytes: IntGauge,
    pub cache_objects: IntGauge,
    /// The data dir's file system: free (for regcache's user) and total bytes.
    pub disk_free: IntGauge,
    pub disk_size: IntGauge,
    /// Content removed to stay within limits (by the lifecycle policy).
    pub evictions: IntCounter,
    /// Blobs streamed uncached because the disk took no writes.
    pub passthrough: IntCounter,
    /// Blob fill durations (upstream to verified commit).
    pub fill_duration: Histogram,
    /// Requests refused by access control, by reason.
    pub access_denied: IntCounterVec,
    /// Shared bucket requests by operation and result.
    pub bucket_requests: IntCounterVec,
    /// Shared bucket body bytes, by direction (read, written).
    pub bucket_bytes: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let single = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(BUCKETS.into()),
                labels,
            )
            .expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique");
            h
        };
        let m = Metrics {
            requests: counter(
                "regcache_http_requests_total",
                "Client requests by kind (manifest, blob, tags, referrers, other), method, status class and upstream.",
                &["kind", "method", "status", "upstream"],
            ),
            request_duration: histogram(
                "regcache_http_request_duration_seconds",
                "Time from request to response headers, by kind.",
                &["kind"],
            ),
            lookups: counter(
                "regcache_cache_lookups_total",
                "Cache lookups by kind, upstream and result (hit, miss, stale, coalesced, revalidated).",
                &["kind", "upstream", "result"],
            ),
            served_bytes: counter(
                "regcache_served_bytes_total",
                "Body bytes sent to clients, by source: cache (already on disk) or upstream (being fetched).",
                &["source"],
            ),
            sendfile_bytes: single(
                "regcache_sendfile_bytes_total",
                "Blob bytes sent from disk to clients with sendfile(2), without a copy through regcache's memory (plain-HTTP/1 connections, storage.sendfile; part of regcache_served_bytes_total).",
            ),
            fetched_bytes: counter(
                "regcache_upstream_fetched_bytes_total",
                "Body bytes fetched from upstream.",
                &["upstream"],
            ),
            upstream_requests: counter(
                "regcache_upstream_requests_total",
                "Requests sent upstream, by upstream, method and status code (or \"error\").",
                &["upstream", "method", "status"],
            ),
            upstream_duration: histogram(
                "regcache_upstream_request_duration_seconds",
                "Upstream time to response headers.",
                &["upstream"],
            ),
            upstream_errors: counter(
                "regcache_upstream_errors_total",
                "Upstream failures by reason: connect, timeout, reset, digest_mismatch, http_5xx, http_429.",
                &["upstream", "reason"],
            ),
            token_fetches: counter(
                "regcache_upstream_token_fetches_total",
                "Bearer token requests by result (ok, refused, error).",
                &["upstream", "result"],
            ),
            breaker_state: gauge_vec(
                "regcache_upstream_breaker_state",
                "Circuit breaker per upstream: 0 closed, 1 open, 2 half-open.",
                &["upstream"],
            ),
            ratelimit_limit: gauge_vec(
                "regcache_upstream_ratelimit_limit",
                "The upstream's last RateLimit-Limit header (requests per window).",
                &["upstream"],
            ),
            ratelimit_remaining: gauge_vec(
                "regcache_upstream_ratelimit_remaining",
                "The upstream's last RateLimit-Remaining header.",
                &["upstream"],
            ),
            fills_in_flight: gauge(
                "regcache_fetches_in_flight",
                "Blob fetches from upstream running now.",
            ),
            client_connections: gauge(
                "regcache_client_connections",
                "Client connections open now.",
            ),
            cache_bytes: gauge(
                "regcache_cache_size_bytes",
                "Bytes of committed content on disk.",
            ),
            cache_objects: gauge(
                "regcache_cache_objects",
                "Committed blobs and manifests on disk.",
            ),
            disk_free: gauge(
                "regcache_disk_free_bytes",
                "Bytes available to regcache on the data dir's file system.",
            ),
            disk_size: gauge(
                "regcache_disk_size_bytes",
                "Size of the data dir's file system.",
            ),
            evictions: single(
                "regcache_cache_evictions_total",
                "Content removed from disk by the lifecycle policy.",
            ),
            passthrough: single(
                "regcache_passthrough_total",
                "Blobs streamed from upstream uncached because the data dir took no writes.",
            ),
            fill_duration: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "regcache_fill_duration_seconds",
                        "Blob fetches from upstream, from request to verified commit.",
                    )
                    .buckets(BUCKETS.into()),
                )
                .expect("valid metric");
                registry.register(Box::new(h.clone())).expect("unique");
                h
            },
            access_denied: counter(
                "regcache_access_denied_total",
                "Client requests refused by access control, by reason: no_credentials, bad_credentials, policy (allow/deny lists), rule (no auth.rules grant), isolation (a cached digest not known in the asked repository), upstream (a pass_client_auth upstream refused the client).",
                &["reason"],
            ),
            bucket_requests: counter(
                "regcache_bucket_requests_total",
                "Requests to the shared bucket (storage.kind = \"s3\") by operation (head, get, put, delete) and result (ok, not_found, error, timeout, aborted: a failed fill's upload; skipped: an upload past the queue, put only).",
                &["op", "result"],
            ),
            bucket_bytes: counter(
                "regcache_bucket_bytes_total",
                "Blob bytes read from and written to the shared bucket.",
                &["direction"],
            ),
            registry: registry.clone(),
        };
        let build = gauge_vec(
            "regcache_build_info",
            "Always 1; labels say which build is running.",
            &["version", "commit"],
        );
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("REGCACHE_GIT_COMMIT")])
            .set(1);
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique");
        m
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> (String, Vec<u8>) {
        let encoder = TextEncoder::new();
        let mut out = Vec::new();
        encoder
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to memory");
        (encoder.format_type().to_owned(), out)
    }

    pub fn set_breaker(&self, upstream: &str, state: BreakerState) {
        let v = match state {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        self.breaker_state.with_label_values(&[upstream]).set(v);
    }

    /// Records Docker Hub style `RateLimit-Limit: 100;w=21600` headers.
    pub fn observe_ratelimit(&self, upstream: &str, headers: &http::HeaderMap) {
        let value = |name: &str| -> Option<i64> {
            let v = headers.get(name)?.to_str().ok()?;
            v.split(';').next()?.trim().parse().ok()
        };
        if let Some(l) = value("ratelimit-limit") {
            self.ratelimit_limit.with_label_values(&[upstream]).set(l);
        }
        if let Some(r) = value("ratelimit-remaining") {
            self.ratelimit_remaining
                .with_label_values(&[upstream])
                .set(r);
        }
    }

    /// The value of a counter or gauge sample, for tests: `name{l1="v1",...}`.
    pub fn sample(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter().map(move |m| (f.get_field_type(), m)))
            .filter(|(_, m)| {
                labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
            .map(|(t, m)| match t {
                prometheus::proto::MetricType::COUNTER => m.get_counter().get_value(),
                _ => m.get_gauge().get_value(),
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_conventional_names() {
        let m = Metrics::new();
        m.lookups
            .with_label_values(&["blob", "docker.io", "hit"])
            .inc();
        let (ct, body) = m.render();
        assert!(ct.starts_with("text/plain"));
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains(
            "regcache_cache_lookups_total{kind=\"blob\",result=\"hit\",upstream=\"docker.io\"} 1"
        ));
        assert!(text.contains("regcache_build_info{commit="));
        assert_eq!(
            m.sample("regcache_cache_lookups_total", &[("result", "hit")]),
            1.0
        );
    }

    #[test]
    fn ratelimit_headers() {
        let m = Metrics::new();
        let mut h = http::HeaderMap::new();
        h.insert("ratelimit-limit", "100;w=21600".parse().unwrap());
        h.insert("ratelimit-remaining", "76;w=21600".parse().unwrap());
        m.observe_ratelimit("docker.io", &h);
        assert_eq!(
            m.sample(
                "regcache_upstream_ratelimit_remaining",
                &[("upstream", "docker.io")]
            ),
            76.0
        );
        assert_eq!(m.sample("regcache_upstream_ratelimit_limit", &[]), 100.0);
    }
}
