//! The configuration tree: one serde structure, defaults as named constants, human units.
//!
//! `config/regcache.toml` is both the documented example and the embedded default, so the file a
//! user reads is exactly what `regcache serve` runs with when given no `--config`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::oci::reference::RepoName;

mod sources;
pub use sources::{ENV_NESTING, ENV_PREFIX, env_name};

/// The embedded default configuration (also the commented reference for every key).
pub const DEFAULT_TOML: &str = include_str!("../../config/regcache.toml");

pub const DEFAULT_LISTEN: &str = "127.0.0.1:5000";
pub const DEFAULT_DATA_DIR: &str = "regcache-data";
pub const DEFAULT_UPSTREAM: &str = "docker.io";
pub const DEFAULT_TAG_TTL: Duration = Duration::from_secs(5 * 60);
pub const DEFAULT_MAX_STALE: Duration = Duration::from_secs(7 * 24 * 3600);
pub const DEFAULT_REVALIDATE_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_TAGS_LIST_TTL: Duration = Duration::from_secs(30);
pub const DEFAULT_REFERRERS_TTL: Duration = Duration::from_secs(30);
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(30);
pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(60);
pub const DEFAULT_MANIFEST_MEMORY: u64 = 64 * 1024 * 1024;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_CONCURRENT: usize = 32;
pub const DEFAULT_CREDENTIAL_TTL: Duration = Duration::from_secs(5 * 60);
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;
pub const DEFAULT_BREAKER_OPEN_FOR: Duration = Duration::from_secs(15);
/// How often the TLS certificate and key files are checked for changes.
pub const DEFAULT_TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// Client connections served at once; more wait in the listen backlog.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Deadline for a client's TLS handshake and each request's headers (slowloris).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection with no request in progress for this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Request line plus headers, in bytes (HTTP/1.1 read buffer, HTTP/2 header list).
pub const DEFAULT_MAX_HEADER_BYTES: u64 = 64 * 1024;
/// The smallest `max_header_bytes` hyper accepts.
pub const MIN_MAX_HEADER_BYTES: u64 = 8 * 1024;
/// Longest request target (path and query) answered; longer gets 414.
pub const DEFAULT_MAX_URI_LENGTH: usize = 8 * 1024;
/// Longest a TTL or age may be (`tag_ttl`, `max_stale`, `max_age`, `auth.cache_ttl` ...):
/// "100years", past any use and well inside what the in-memory caches take (moka refuses over
/// 1000 years, at start-up) and what clock arithmetic holds (`tag_ttl + max_stale`).
pub const MAX_TTL: Duration = Duration::from_secs(100 * 31_557_600);
/// Longest a timeout, interval or breaker pause may be: "1day". Each is added to the clock
/// (`now + breaker_open_for`), and waiting longer on an upstream, a client or the bucket
/// only hides a mistake.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);
/// Most client connections served at once (each needs a file descriptor and buffers).
pub const MAX_MAX_CONNECTIONS: usize = 1_000_000;
/// Most requests in flight to one upstream.
pub const MAX_MAX_CONCURRENT: usize = 10_000;
/// Most blobs written to the bucket at once (each holds up to three parts in memory).
pub const MAX_MAX_UPLOADS: usize = 1_000;
/// The namespace Docker Hub gives one-component names (`alpine` -> `library/alpine`).
pub const DOCKER_HUB_LIBRARY: &str = "library";
pub const DOCKER_HUB_HOSTS: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// A second address serving only `/metrics`, `/healthz` and `/readyz` (they are on
    /// `listen` too).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// The admin API (`/admin/ls`, `/admin/purge`, `/admin/warm`, plus the metrics and health
    /// endpoints). Off unless set; it has no authentication, so keep it on loopback.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Upstream for names that no prefix, `ns` or alias routes elsewhere (registry-mirror traffic).
    #[serde(default = "default_upstream")]
    pub default_upstream: String,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Short name -> full reference without tag (`myapp = "registry.corp.example/team/myapp"`).
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    /// Client authentication and access rules (off unless `htpasswd` or `tokens` is set).
    #[serde(default)]
    pub auth: AuthConfig,
    /// Allow and deny lists over every upstream, patterns led by the registry
    /// (`docker.io/library/*`).
    #[serde(default)]
    pub policy: PolicyConfig,
    /// HTTPS on `listen` (off unless both files are given).
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Where blobs live besides the data dir: nothing more (`local`), or a bucket shared by
    /// every replica (`s3`).
    #[serde(default)]
    pub storage: StorageConfig,
}

pub const DEFAULT_AUTH_REALM: &str = "regcache";
pub const DEFAULT_AUTH_CACHE_TTL: Duration = Duration::from_secs(60);

/// Who may use regcache. Off (everyone anonymous, as without this table) unless `htpasswd` or
/// `tokens` gives an identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// An htpasswd file with bcrypt entries (`htpasswd -B`); other hash kinds are refused.
    pub htpasswd: Option<PathBuf>,
    /// Static bearer tokens, each an identity of its own.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// Group name -> members (htpasswd users or token names).
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    /// What authenticated identities may pull; with none, any authenticated identity may pull
    /// everything the policy allows.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// The realm of regcache's `WWW-Authenticate: Basic` challenge.
    #[serde(default = "d_auth_realm")]
    pub realm: String,
    /// How long a verified password is remembered (in memory, by a hash of the credentials),
    /// sparing the bcrypt check.
    #[serde(default = "d_auth_cache_ttl", with = "humantime_serde")]
    pub cache_ttl: Duration,
}

/// A static bearer token (also usable as the password of `docker login -u NAME`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The identity the token authenticates as (for rules, groups and logs).
    pub name: String,
    /// A file holding the token (its first line).
    pub token_file: Option<PathBuf>,
    /// An environment variable holding the token.
    pub token_env: Option<String>,
    /// Groups this token is in (beside `auth.groups` naming it).
    #[serde(default)]
    pub groups: Vec<String>,
}

/// One grant: who (users and/or groups) may pull which repositories of which upstreams.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// User or token names; `"*"` is any authenticated identity.
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    /// Upstream names or registry hosts; empty: every upstream.
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// Repository patterns as the upstream names them (`library/*`, `team/**`); empty: all.
    #[serde(default)]
    pub repos: Vec<String>,
}

/// Allow and deny lists for every upstream; each pattern starts with an upstream name or one
/// of its hosts: `docker.io/library/*`, `ghcr.io/myorg/**`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            htpasswd: None,
            tokens: Vec::new(),
            groups: BTreeMap::new(),
            rules: Vec::new(),
            realm: DEFAULT_AUTH_REALM.to_owned(),
            cache_ttl: DEFAULT_AUTH_CACHE_TTL,
        }
    }
}

/// The main listener's certificate and key (PEM), reloaded on SIGHUP and when they change.
/// The metrics and admin listeners stay plain HTTP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// How often the files are checked for changes; "0s": only on SIGHUP.
    #[serde(default = "d_tls_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: None,
            key: None,
            reload_interval: DEFAULT_TLS_RELOAD_INTERVAL,
        }
    }
}

impl AuthConfig {
    /// Whether clients must (or may) authenticate.
    pub fn is_enabled(&self) -> bool {
        self.htpasswd.is_some() || !self.tokens.is_empty()
    }
}

fn d_auth_realm() -> String {
    DEFAULT_AUTH_REALM.to_owned()
}
fn d_auth_cache_ttl() -> Duration {
    DEFAULT_AUTH_CACHE_TTL
}

fn d_tls_reload_interval() -> Duration {
    DEFAULT_TLS_RELOAD_INTERVAL
}

impl TlsConfig {
    /// Certificate and key paths, when TLS is on.
    pub fn files(&self) -> Option<(&Path, &Path)> {
        Some((self.cert.as_deref()?, self.key.as_deref()?))
    }
}

/// The blob tiers. `local`: the data dir only. `s3`: the data dir stays the hot tier (bounded
/// by `cache.max_size`), and verified blobs are also written to an S3-compatible bucket that
/// every replica reads before asking upstream.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default)]
    pub kind: StorageKind,
    /// Which plain-HTTP/1 clients get blob bytes on disk by `sendfile(2)`.
    #[serde(default)]
    pub sendfile: Sendfile,
    #[serde(default)]
    pub s3: S3Config,
}

/// Which plain-HTTP/1 clients get committed blobs by `sendfile(2)`: from the page cache to the
/// socket with no copy through regcache (nginx's `sendfile on`). The others, and every TLS and
/// HTTP/2 client, get them copied from a memory mapping. A fill's bytes already on disk go by
/// sendfile to every plain-HTTP/1 client unless `never`: they were just written, so even a
/// client on this host reads them from warm caches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sendfile {
    /// Clients on other hosts. A client on this host would read what sendfile queued straight
    /// from page-cache pages no CPU cache holds, which costs it more than regcache saves: on
    /// loopback, regcache plus client spent 1.15-1.34x the CPU per GiB of the copy
    /// (BENCHMARKS.md), while a remote client's CPU is not this host's.
    #[default]
    Remote,
    /// Every plain-HTTP/1 client, loopback too.
    Always,
    /// None: always the copy (for a file system whose sendfile misbehaves).
    Never,
}

impl Sendfile {
    /// Whether a client at `peer` gets committed blobs by sendfile.
    pub fn for_peer(self, peer: std::net::IpAddr) -> bool {
        match self {
            Sendfile::Always => true,
            Sendfile::Never => false,
            Sendfile::Remote => !peer.to_canonical().is_loopback(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    #[default]
    Local,
    S3,
}

/// An S3-compatible bucket (AWS S3, MinIO, Ceph RGW, Garage). Unset credentials and region
/// come from the usual `AWS_*` variables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// The S3 API's base URL; unset: AWS for `region`.
    pub endpoint: Option<String>,
    pub bucket: Option<String>,
    pub region: Option<String>,
    /// Key prefix under which regcache keeps its objects ("" or "cache/").
    #[serde(default)]
    pub prefix: String,
    /// Path-style requests (`endpoint/bucket/key`), as MinIO, Ceph and Garage need; false:
    /// virtual-hosted style (`bucket.endpoint/key`).
    #[serde(default = "d_true")]
    pub path_style: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    /// A file holding the secret access key (a mounted Kubernetes secret).
    pub secret_access_key_file: Option<PathBuf>,
    /// Deadline for a bucket request's answer (a body is then bound by silence, as upstream
    /// bodies are).
    #[serde(default = "d_s3_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Blobs written to the bucket at once; more wait (they read from local disk).
    #[serde(default = "d_s3_max_uploads")]
    pub max_uploads: usize,
    /// Part size of multipart uploads; a smaller blob is one PUT. S3's minimum is 5MiB.
    #[serde(default = "d_s3_part_size", deserialize_with = "de_size")]
    pub part_size: u64,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: None,
            bucket: None,
            region: None,
            prefix: String::new(),
            path_style: true,
            access_key_id: None,
            secret_access_key: None,
            secret_access_key_file: None,
            timeout: d_s3_timeout(),
            max_uploads: d_s3_max_uploads(),
            part_size: d_s3_part_size(),
        }
    }
}

fn d_true() -> bool {
    true
}
fn d_s3_timeout() -> Duration {
    Duration::from_secs(10)
}
fn d_s3_max_uploads() -> usize {
    4
}
fn d_s3_part_size() -> u64 {
    8 << 20
}

impl S3Config {
    fn check(&self, p: &mut Vec<String>) {
        if self.bucket.as_deref().is_none_or(str::is_empty) {
            p.push("storage.s3.bucket: storage.kind is \"s3\"; name the bucket".to_owned());
        }
        if let Some(raw) = &self.endpoint {
            match url::Url::parse(raw) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
                _ => p.push(format!(
                    "storage.s3.endpoint: {raw:?} must be an http(s) URL with a host"
                )),
            }
        }
        if self.secret_access_key.is_some() && self.secret_access_key_file.is_some() {
            p.push(
                "storage.s3: set secret_access_key or secret_access_key_file, not both".to_owned(),
            );
        }
        if let Some(f) = &self.secret_access_key_file
            && !f.is_file()
        {
            p.push(format!(
                "storage.s3.secret_access_key_file: {} is not a readable file",
                f.display()
            ));
        }
        if self
            .prefix
            .split('/')
            .any(|part| part == "." || part == "..")
        {
            p.push(format!(
                "storage.s3.prefix: {:?} may not contain . or ..",
                self.prefix
            ));
        }
        check_count(
            p,
            "storage.s3.max_uploads",
            self.max_uploads,
            MAX_MAX_UPLOADS,
        );
        check_duration(p, "storage.s3.timeout", self.timeout, Span::Wait);
        if !(5 << 20..=5 << 30).contains(&self.part_size) {
            p.push("storage.s3.part_size: must be between 5MiB and 5GiB (S3's limits)".to_owned());
        }
    }
}

/// What one client may take of the server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Client connections served at once; further ones are not accepted until one closes
    /// (they wait in the kernel's listen backlog).
    #[serde(default = "d_max_connections")]
    pub max_connections: usize,
    /// Deadline for the TLS handshake and for each request's headers.
    #[serde(default = "d_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no request in progress for this long is closed.
    #[serde(default = "d_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Request line plus headers; larger gets 431 (HTTP/1.1) or a stream reset (HTTP/2).
    #[serde(default = "d_max_header_bytes", deserialize_with = "de_size")]
    pub max_header_bytes: u64,
    /// Longest request target (path and query); longer gets 414.
    #[serde(default = "d_max_uri_length")]
    pub max_uri_length: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_uri_length: DEFAULT_MAX_URI_LENGTH,
        }
    }
}

fn d_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn d_header_read_timeout() -> Duration {
    DEFAULT_HEADER_READ_TIMEOUT
}
fn d_idle_timeout() -> Duration {
    DEFAULT_IDLE_TIMEOUT
}
fn d_max_header_bytes() -> u64 {
    DEFAULT_MAX_HEADER_BYTES
}
fn d_max_uri_length() -> usize {
    DEFAULT_MAX_URI_LENGTH
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter (`info`, `regcache=debug`); `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// How long a tag is answered from the cache with no upstream contact.
    #[serde(default = "d_tag_ttl", with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// How long past its TTL a tag may still be served when upstream fails.
    #[serde(default = "d_max_stale", with = "humantime_serde")]
    pub max_stale: Duration,
    /// Deadline for revalidating a cached tag before the cached answer is served.
    #[serde(default = "d_revalidate_timeout", with = "humantime_serde")]
    pub revalidate_timeout: Duration,
    /// How long a `tags/list` answer is reused.
    #[serde(default = "d_tags_list_ttl", with = "humantime_serde")]
    pub tags_list_ttl: Duration,
    /// How long a `referrers` answer (the signatures, SBOMs and attestations of a manifest) is
    /// reused.
    #[serde(default = "d_referrers_ttl", with = "humantime_serde")]
    pub referrers_ttl: Duration,
    /// How long an upstream's "no such tag" (404) is remembered; "0s" turns it off.
    #[serde(default = "d_negative_ttl", with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// Answer from the cache only, never contacting any upstream (tags at any age).
    #[serde(default)]
    pub offline: bool,
    /// Memory for hot manifests, in bytes or with a unit ("64MiB").
    #[serde(default = "d_manifest_memory", deserialize_with = "de_size")]
    pub manifest_memory: u64,
    /// Cap on cached content ("200GiB"); 0 means no cap. Least recently used blobs go first.
    #[serde(default, deserialize_with = "de_size")]
    pub max_size: u64,
    /// Evict until this much of the data dir's file system is free ("10GiB"); 0: no floor.
    #[serde(default, deserialize_with = "de_size")]
    pub min_free_disk: u64,
    /// Content not used for this long is removed whatever the size (unset: kept).
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// Images never evicted: manifest, config, layers, every platform of an index.
    #[serde(default, deserialize_with = "de_one_or_many")]
    pub pin: Vec<String>,
    /// How often the size cap and ages are checked.
    #[serde(default = "d_gc_interval", with = "humantime_serde")]
    pub gc_interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URLs, tried in order (failover).
    #[serde(deserialize_with = "de_one_or_many")]
    pub urls: Vec<String>,
    /// More registry host names that route here (for path prefixes and containerd's `ns`).
    #[serde(default, deserialize_with = "de_one_or_many")]
    pub hosts: Vec<String>,
    /// Namespace for one-component names; defaults to `library` for Docker Hub, none elsewhere.
    pub short_name_prefix: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// A file holding the password (read again whenever credentials are refreshed).
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password (read at start).
    pub password_env: Option<String>,
    /// Get credentials from `docker-credential-<NAME> get` (ecr-login, gcloud, acr-env ...).
    pub credential_helper: Option<String>,
    /// Take credentials from a Docker `config.json` (`auths`, `credHelpers`, `credsStore`).
    pub docker_config: Option<PathBuf>,
    /// How long credentials from a helper or `docker_config` are reused; a 401 refreshes them
    /// at once.
    #[serde(default = "d_credential_ttl", with = "humantime_serde")]
    pub credential_ttl: Duration,
    /// Other credentials for repositories under a prefix; the longest matching prefix wins.
    #[serde(default)]
    pub credentials: Vec<RepoCredentials>,
    /// Remove this upstream's content not used for this long (overrides `cache.max_age`).
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// Forward a client's own `Authorization` upstream instead of regcache's credentials.
    /// Every request is then checked upstream with the client's credentials before cached
    /// content is served, and upstream's 401 challenge is passed to the client.
    #[serde(default)]
    pub pass_client_auth: bool,
    /// With `[auth]` on: clients may pull from this upstream without logging in.
    #[serde(default)]
    pub anonymous: bool,
    /// Repository patterns (as this upstream names them) that may be pulled; empty: all.
    #[serde(default, deserialize_with = "de_one_or_many")]
    pub allow: Vec<String>,
    /// Repository patterns that may never be pulled (beats `allow`).
    #[serde(default, deserialize_with = "de_one_or_many")]
    pub deny: Vec<String>,
    /// Re-check with an upstream `HEAD` that a repository still holds a cached digest (at most
    /// once per `cache.tag_ttl` per repository and digest) before serving it.
    #[serde(default)]
    pub verify_access: bool,
    /// Extra PEM CA certificates trusted for this upstream (beside the web PKI roots), e.g.
    /// a TLS-inspecting gateway's.
    pub ca_file: Option<PathBuf>,
    /// Do not check this upstream's TLS certificate at all. Only by explicit opt-in.
    #[serde(default)]
    pub insecure: bool,
    /// An HTTP proxy for this upstream (`http://[user:password@]host:port`, used with
    /// CONNECT), or "none"; unset: `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY` from the
    /// environment.
    pub proxy: Option<Secret>,
    #[serde(default = "d_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Deadline for an upstream's response headers.
    #[serde(default = "d_response_timeout", with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Longest silence allowed inside a response body.
    #[serde(default = "d_read_timeout", with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Concurrent requests to this upstream (a blob download holds its slot to the last
    /// byte); more wait in line.
    #[serde(default = "d_max_concurrent")]
    pub max_concurrent: usize,
    /// Consecutive failures (connect errors, timeouts, 5xx) that open the circuit breaker.
    #[serde(default = "d_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker answers at once without asking upstream, before one probe.
    #[serde(default = "d_breaker_open_for", with = "humantime_serde")]
    pub breaker_open_for: Duration,
}

/// A password from the config: never shown by `Debug`, so a logged config leaks nothing.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::ops::Deref for Secret {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_owned())
    }
}

/// Credentials for the repositories of one upstream under `repo_prefix`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoCredentials {
    /// `team` matches `team` and `team/...`.
    pub repo_prefix: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    pub credential_helper: Option<String>,
    pub docker_config: Option<PathBuf>,
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN.parse().expect("valid default")
}
fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}
fn default_upstream() -> String {
    DEFAULT_UPSTREAM.to_owned()
}
fn default_log_level() -> String {
    "info".to_owned()
}
fn d_tag_ttl() -> Duration {
    DEFAULT_TAG_TTL
}
fn d_max_stale() -> Duration {
    DEFAULT_MAX_STALE
}
fn d_revalidate_timeout() -> Duration {
    DEFAULT_REVALIDATE_TIMEOUT
}
fn d_gc_interval() -> Duration {
    DEFAULT_GC_INTERVAL
}
fn d_negative_ttl() -> Duration {
    DEFAULT_NEGATIVE_TTL
}
fn d_tags_list_ttl() -> Duration {
    DEFAULT_TAGS_LIST_TTL
}
fn d_referrers_ttl() -> Duration {
    DEFAULT_REFERRERS_TTL
}
fn d_manifest_memory() -> u64 {
    DEFAULT_MANIFEST_MEMORY
}
fn d_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}
fn d_response_timeout() -> Duration {
    DEFAULT_RESPONSE_TIMEOUT
}
fn d_max_concurrent() -> usize {
    DEFAULT_MAX_CONCURRENT
}
fn d_breaker_failures() -> u32 {
    DEFAULT_BREAKER_FAILURES
}
fn d_breaker_open_for() -> Duration {
    DEFAULT_BREAKER_OPEN_FOR
}
fn d_credential_ttl() -> Duration {
    DEFAULT_CREDENTIAL_TTL
}
fn d_read_timeout() -> Duration {
    DEFAULT_READ_TIMEOUT
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            format: LogFormat::Text,
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            tag_ttl: DEFAULT_TAG_TTL,
            max_stale: DEFAULT_MAX_STALE,
            revalidate_timeout: DEFAULT_REVALIDATE_TIMEOUT,
            tags_list_ttl: DEFAULT_TAGS_LIST_TTL,
            referrers_ttl: DEFAULT_REFERRERS_TTL,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            offline: false,
            max_size: 0,
            min_free_disk: 0,
            max_age: None,
            pin: Vec::new(),
            gc_interval: DEFAULT_GC_INTERVAL,
            manifest_memory: DEFAULT_MANIFEST_MEMORY,
        }
    }
}

impl UpstreamConfig {
    /// Whether regcache fetches with credentials of its own here (so cached content may be
    /// private to some repositories).
    pub fn has_credentials(&self) -> bool {
        self.username.is_some()
            || self.credential_helper.is_some()
            || self.docker_config.is_some()
            || !self.credentials.is_empty()
    }

    /// An upstream with one URL and every other key at its default.
    pub fn with_url(url: &str) -> Self {
        UpstreamConfig {
            urls: vec![url.to_owned()],
            hosts: Vec::new(),
            short_name_prefix: None,
            username: None,
            password: None,
            password_file: None,
            password_env: None,
            credential_helper: None,
            docker_config: None,
            credential_ttl: DEFAULT_CREDENTIAL_TTL,
            credentials: Vec::new(),
            max_age: None,
            pass_client_auth: false,
            anonymous: false,
            allow: Vec::new(),
            deny: Vec::new(),
            verify_access: false,
            ca_file: None,
            insecure: false,
            proxy: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            breaker_failures: DEFAULT_BREAKER_FAILURES,
            breaker_open_for: DEFAULT_BREAKER_OPEN_FOR,
        }
    }
}

/// Sizes as a number of bytes or a string with a unit ("64MiB", "2 GB").
fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(b) => Ok(b),
        Size::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

/// Parses "512", "64KiB", "1.5 GB", "200GiB" into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?} is not a size: {e}"))
}

/// A list, or one item alone (`urls = "https://a.example"`, as an environment variable
/// most easily gives it).
fn de_one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct OneOrMany;
    impl<'de> serde::de::Visitor<'de> for OneOrMany {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string or a list of strings")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Vec<String>, E> {
            Ok(vec![s.to_owned()])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut v = Vec::new();
            while let Some(s) = seq.next_element()? {
                v.push(s);
            }
            Ok(v)
        }
    }
    d.deserialize_any(OneOrMany)
}

/// The range a duration key takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Span {
    /// A TTL or age: more than zero, at most [`MAX_TTL`].
    Ttl,
    /// A TTL where "0s" is a setting of its own (nothing reused, never stale): at most
    /// [`MAX_TTL`].
    TtlOrZero,
    /// A timeout or interval: more than zero (zero fails every request, or spins), at most
    /// [`MAX_WAIT`].
    Wait,
    /// An interval or pause where "0s" is a setting of its own (reload on SIGHUP only, probe
    /// at once): at most [`MAX_WAIT`].
    WaitOrZero,
}

/// Reports a duration its key cannot take: zero where zero means nothing, or past its bound.
fn check_duration(p: &mut Vec<String>, key: &str, d: Duration, span: Span) {
    let (zero_means, max) = match span {
        Span::Ttl => (false, MAX_TTL),
        Span::TtlOrZero => (true, MAX_TTL),
        Span::Wait => (false, MAX_WAIT),
        Span::WaitOrZero => (true, MAX_WAIT),
    };
    if d.is_zero() && !zero_means {
        p.push(format!("{key}: must be more than zero"));
    } else if d > max {
        p.push(format!(
            "{key}: {:?} is too long; at most {:?}",
            humantime::format_duration(d).to_string(),
            humantime::format_duration(max).to_string()
        ));
    }
}

/// Reports a count of slots (connections, requests, uploads) outside 1..=`max`: zero would
/// let nothing through, and past `max` the semaphore holding them panics or the host runs
/// out first.
fn check_count(p: &mut Vec<String>, key: &str, n: usize, max: usize) {
    if !(1..=max).contains(&n) {
        p.push(format!("{key}: must be between 1 and {max}"));
    }
}

/// Every problem found in a configuration, each with its key path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Problems(pub Vec<String>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{path}: {problems}")]
    Invalid { path: PathBuf, problems: Problems },
}

impl Config {
    /// The embedded default configuration, as it is (no environment).
    pub fn embedded() -> Config {
        Config::parse(DEFAULT_TOML, Path::new("<embedded>")).expect("embedded config is valid")
    }

    /// The configuration a command runs with: the file (or, without one, the embedded
    /// default) with this process's `REGCACHE_*` environment variables laid over it.
    pub fn load(path: Option<&Path>) -> Result<Config, LoadError> {
        let env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                sources::load(&text, path, env)
            }
            None => sources::load(DEFAULT_TOML, Path::new("<embedded>"), env),
        }
    }

    /// A warning when the config file at `path` holds secrets and every user can read it.
    pub fn exposure_warning(path: &Path) -> Option<String> {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        if mode & 0o004 == 0 {
            return None;
        }
        let secrets = sources::secrets_in(&std::fs::read_to_string(path).ok()?);
        (!secrets.is_empty()).then(|| {
            format!(
                "{} is readable by every user (mode {:o}) and holds secrets ({}): chmod o-r it, \
                 or move them to password_file / password_env / REGCACHE_* variables",
                path.display(),
                mode & 0o777,
                secrets.join(", ")
            )
        })
    }

    /// Parses and validates TOML text alone; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, LoadError> {
        sources::load(text, origin, std::iter::empty())
    }

    /// Checks everything serde cannot, reporting every problem at once.
    pub fn validate(&self) -> Result<(), Problems> {
        let mut p = Vec::new();
        if self.upstreams.is_empty() {
            p.push("upstreams: at least one upstream is needed".to_owned());
        }
        if !self.upstreams.contains_key(&self.default_upstream) {
            p.push(format!(
                "default_upstream: {:?} is not one of [upstreams] ({})",
                self.default_upstream,
                self.upstreams
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            p.push(format!("log.level: {e}"));
        }
        let c = &self.cache;
        for (i, pin) in c.pin.iter().enumerate() {
            if let Err(e) = pin.parse::<crate::oci::image_ref::ImageRef>() {
                p.push(format!("cache.pin[{i}]: {pin:?}: {e}"));
            }
        }
        let durations = [
            ("cache.tag_ttl", c.tag_ttl, Span::Ttl),
            ("cache.max_stale", c.max_stale, Span::TtlOrZero),
            ("cache.revalidate_timeout", c.revalidate_timeout, Span::Wait),
            ("cache.tags_list_ttl", c.tags_list_ttl, Span::TtlOrZero),
            ("cache.referrers_ttl", c.referrers_ttl, Span::TtlOrZero),
            ("cache.negative_ttl", c.negative_ttl, Span::TtlOrZero),
            // Zero would spin the lifecycle loop.
            ("cache.gc_interval", c.gc_interval, Span::Wait),
            ("auth.cache_ttl", self.auth.cache_ttl, Span::TtlOrZero),
            (
                "tls.reload_interval",
                self.tls.reload_interval,
                Span::WaitOrZero,
            ),
        ];
        // A zero max_age would remove all content not in use at each pass; unset keeps it.
        let max_age = c.max_age.map(|d| ("cache.max_age", d, Span::Ttl));
        for (key, d, span) in durations.into_iter().chain(max_age) {
            check_duration(&mut p, key, d, span);
        }
        let mut seen_hosts: BTreeMap<String, &str> = BTreeMap::new();
        for (name, u) in &self.upstreams {
            let key = format!("upstreams.\"{name}\"");
            if name.is_empty() || name.contains('/') {
                p.push(format!(
                    "{key}: an upstream name must be non-empty and contain no '/'"
                ));
            }
            if u.urls.is_empty() {
                p.push(format!("{key}.urls: at least one URL is needed"));
            }
            for (i, raw) in u.urls.iter().enumerate() {
                match url::Url::parse(raw) {
                    Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
                    }
                    Ok(_) => p.push(format!(
                        "{key}.urls[{i}]: {raw:?} must be an http(s) URL with a host"
                    )),
                    Err(e) => p.push(format!("{key}.urls[{i}]: {raw:?}: {e}")),
                }
            }
            if let Some(prefix) = &u.short_name_prefix
                && !prefix.is_empty()
                && prefix.parse::<RepoName>().is_err()
            {
                p.push(format!(
                    "{key}.short_name_prefix: {prefix:?} is not a valid repository path"
                ));
            }
            check_count(
                &mut p,
                &format!("{key}.max_concurrent"),
                u.max_concurrent,
                MAX_MAX_CONCURRENT,
            );
            if u.breaker_failures == 0 {
                p.push(format!("{key}.breaker_failures: must be at least 1"));
            }
            let durations = [
                // Zero: fetched again for every request.
                ("credential_ttl", u.credential_ttl, Span::TtlOrZero),
                // Zero would time out every request.
                ("connect_timeout", u.connect_timeout, Span::Wait),
                ("response_timeout", u.response_timeout, Span::Wait),
                ("read_timeout", u.read_timeout, Span::Wait),
                // Zero: the probe goes at once after the breaker opens.
                ("breaker_open_for", u.breaker_open_for, Span::WaitOrZero),
            ];
            let max_age = u.max_age.map(|d| ("max_age", d, Span::Ttl));
            for (what, d, span) in durations.into_iter().chain(max_age) {
                check_duration(&mut p, &format!("{key}.{what}"), d, span);
            }
            let sources = std::iter::once((
                key.clone(),
                u.username.as_deref(),
                u.password.is_some(),
                u.password_file.as_deref(),
                u.credential_helper.as_deref(),
                u.docker_config.as_deref(),
            ))
            .chain(u.credentials.iter().enumerate().map(|(i, c)| {
                (
                    format!("{key}.credentials[{i}]"),
                    c.username.as_deref(),
                    c.password.is_some(),
                    c.password_file.as_deref(),
                    c.credential_helper.as_deref(),
                    c.docker_config.as_deref(),
                )
            }));
            for (at, user, password, password_file, helper, docker_config) in sources {
                if (password || password_file.is_some()) && user.is_none() {
                    p.push(format!("{at}.password: a password needs a username"));
                }
                if password && password_file.is_some() {
                    p.push(format!("{at}: set password or password_file, not both"));
                }
                let kinds = [user.is_some(), helper.is_some(), docker_config.is_some()]
                    .iter()
                    .filter(|x| **x)
                    .count();
                if kinds > 1 {
                    p.push(format!(
                        "{at}: use one of username/password, credential_helper, docker_config"
                    ));
                }
                if let Some(h) = helper
                    && (h.is_empty() || h.contains(['/', ' ']))
                {
                    p.push(format!(
                        "{at}.credential_helper: {h:?} must be a helper name (docker-credential-NAME)"
                    ));
                }
                for (what, path) in [
                    ("password_file", password_file),
                    ("docker_config", docker_config),
                ] {
                    if let Some(path) = path
                        && !path.is_file()
                    {
                        p.push(format!(
                            "{at}.{what}: {} is not a readable file",
                            path.display()
                        ));
                    }
                }
            }
            for (i, c) in u.credentials.iter().enumerate() {
                let prefix = c.repo_prefix.trim_end_matches('/');
                if prefix.parse::<RepoName>().is_err() {
                    p.push(format!(
                        "{key}.credentials[{i}].repo_prefix: {:?} is not a repository path",
                        c.repo_prefix
                    ));
                }
                if c.username.is_none()
                    && c.credential_helper.is_none()
                    && c.docker_config.is_none()
                {
                    p.push(format!("{key}.credentials[{i}]: no credentials given"));
                }
            }
            if let Some(proxy) = u.proxy.as_deref()
                && proxy != crate::upstream::connect::NO_PROXY
            {
                match url::Url::parse(proxy) {
                    Ok(url) if url.scheme() == "http" && url.host().is_some() => {}
                    _ => p.push(format!(
                        "{key}.proxy: must be \"none\" or an http://[user:password@]host:port URL"
                    )),
                }
            }
            if let Some(ca) = &u.ca_file
                && !ca.is_file()
            {
                p.push(format!(
                    "{key}.ca_file: {} is not a readable file",
                    ca.display()
                ));
            }
            for host in self.route_names(name, u) {
                if let Some(other) = seen_hosts.insert(host.clone(), name)
                    && other != name
                {
                    p.push(format!(
                        "{key}: routing name {host:?} also belongs to upstream {other:?}"
                    ));
                }
            }
        }
        match (&self.tls.cert, &self.tls.key) {
            (Some(cert), Some(key)) => {
                if let Err(e) = crate::tls::load(cert, key) {
                    let at = match &e {
                        crate::tls::TlsError::Read { path, .. }
                        | crate::tls::TlsError::Parse { path, .. }
                            if path == key =>
                        {
                            "tls.key"
                        }
                        _ => "tls.cert",
                    };
                    p.push(format!("{at}: {e}"));
                }
            }
            (Some(_), None) => p.push("tls.key: tls.cert is set; give its key too".to_owned()),
            (None, Some(_)) => {
                p.push("tls.cert: tls.key is set; give its certificate too".to_owned())
            }
            (None, None) => {}
        }
        let l = &self.limits;
        check_count(
            &mut p,
            "limits.max_connections",
            l.max_connections,
            MAX_MAX_CONNECTIONS,
        );
        for (key, d) in [
            ("header_read_timeout", l.header_read_timeout),
            ("idle_timeout", l.idle_timeout),
        ] {
            check_duration(&mut p, &format!("limits.{key}"), d, Span::Wait);
        }
        if l.max_header_bytes < MIN_MAX_HEADER_BYTES || l.max_header_bytes > u32::MAX as u64 {
            p.push(format!(
                "limits.max_header_bytes: must be between {MIN_MAX_HEADER_BYTES} bytes and 4GiB"
            ));
        }
        if l.max_uri_length < 256 {
            p.push("limits.max_uri_length: must be at least 256".to_owned());
        }
        if self.storage.kind == StorageKind::S3 {
            self.storage.s3.check(&mut p);
        }
        for (alias, target) in &self.aliases {
            let key = format!("aliases.\"{alias}\"");
            if alias.parse::<RepoName>().is_err() {
                p.push(format!("{key}: not a valid repository name"));
            }
            if let Err(e) = self.resolve_alias_target(target) {
                p.push(format!("{key}: {e}"));
            }
        }
        // Access builds its password cache with `auth.cache_ttl`, and the cache panics on
        // one it refuses: that one is reported above, so the rest is checked with the default.
        let access = if self.auth.cache_ttl <= MAX_TTL {
            crate::access::Access::from_config(self)
        } else {
            let mut c = self.clone();
            c.auth.cache_ttl = DEFAULT_AUTH_CACHE_TTL;
            crate::access::Access::from_config(&c)
        };
        if let Err(problems) = access {
            p.extend(problems);
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(Problems(p))
        }
    }

    /// The names a path prefix or `ns` may use for an upstream: its own name, the hosts of its
    /// URLs and its extra `hosts`, lowercased.
    pub fn route_names(&self, name: &str, u: &UpstreamConfig) -> Vec<String> {
        let mut names = vec![name.to_ascii_lowercase()];
        for raw in &u.urls {
            if let Ok(url) = url::Url::parse(raw)
                && let Some(host) = url.host_str()
            {
                names.push(match url.port() {
                    Some(port) => format!("{host}:{port}"),
                    None => host.to_ascii_lowercase(),
                });
            }
        }
        names.extend(u.hosts.iter().map(|h| h.to_ascii_lowercase()));
        if names.iter().any(|n| DOCKER_HUB_HOSTS.contains(&n.as_str())) {
            names.extend(DOCKER_HUB_HOSTS.iter().map(|h| h.to_string()));
        }
        names.sort();
        names.dedup();
        names
    }

    /// Splits an alias target `host/path` into (upstream name, repository).
    pub fn resolve_alias_target(&self, target: &str) -> Result<(String, RepoName), String> {
        let (host, path) = target
            .split_once('/')
            .ok_or_else(|| format!("{target:?} must be host/repository"))?;
        let host = host.to_ascii_lowercase();
        let upstream = self
            .upstreams
            .iter()
            .find(|(n, u)| self.route_names(n, u).contains(&host))
            .map(|(n, _)| n.clone())
            .ok_or_else(|| format!("{target:?}: no upstream serves registry {host:?}"))?;
        let repo = path
            .parse::<RepoName>()
            .map_err(|e| format!("{target:?}: {e}"))?;
        Ok((upstream, repo))
    }

    /// Replaces (or adds) an upstream's URLs, as `--upstream NAME=URL` does.
    pub fn set_upstream_url(&mut self, name: &str, url: &str) {
        match self.upstreams.get_mut(name) {
            Some(u) => u.urls = vec![url.to_owned()],
            None => {
                self.upstreams
                    .insert(name.to_owned(), UpstreamConfig::with_url(url));
            }
        }
    }

    /// The namespace for one-component names on upstream `name`.
    pub fn short_name_prefix(&self, name: &str) -> Option<&str> {
        let u = self.upstreams.get(name)?;
        match u.short_name_prefix.as_deref() {
            Some("") => None,
            Some(p) => Some(p),
            None if self.route_names(name, u).iter().any(|n| n == "docker.io") => {
                Some(DOCKER_HUB_LIBRARY)
            }
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sendfile_by_default_only_for_remote_peers() {
        let peers = [
            "127.0.0.1",
            "127.8.9.10",
            "::1",
            "::ffff:127.0.0.1",
            "10.1.2.3",
            "fd00::7",
        ];
        let remote = [false, false, false, false, true, true];
        for (peer, remote) in peers.iter().zip(remote) {
            let ip = peer.parse().unwrap();
            assert_eq!(Sendfile::Remote.for_peer(ip), remote, "{peer}");
            assert!(Sendfile::Always.for_peer(ip), "{peer}");
            assert!(!Sendfile::Never.for_peer(ip), "{peer}");
        }
    }

    #[test]
    fn embedded_default_is_valid_and_mirrors_docker_hub() {
        let c = Config::embedded();
        assert_eq!(c.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(c.default_upstream, "docker.io");
        assert_eq!(
            c.upstreams["docker.io"].urls,
            ["https://registry-1.docker.io"]
        );
        assert_eq!(c.short_name_prefix("docker.io"), Some("library"));
        assert_eq!(c.cache.tag_ttl, DEFAULT_TAG_TTL);
        assert_eq!(c.cache.max_stale, DEFAULT_MAX_STALE);
    }

    #[test]
    fn reports_every_problem_with_its_key() {
        let text = r#"
            default_upstream = "nope"
            [cache]
            tag_ttl = "0s"
            [upstreams.a]
            urls = ["ftp://x"]
            password = "p"
            [upstreams.b]
            urls = []
            credential_helper = "bad/path"
            [[upstreams.b.credentials]]
            repo_prefix = "Team"
            username = "u"
            docker_config = "/nonexistent/config.json"
            [aliases]
            "Bad" = "nowhere.example/x"
        "#;
        let err = Config::parse(text, Path::new("t.toml")).unwrap_err();
        let LoadError::Invalid { problems, .. } = err else {
            panic!("{err}")
        };
        let all = problems.to_string();
        for needle in [
            "default_upstream",
            "cache.tag_ttl",
            "upstreams.\"a\".urls[0]",
            "upstreams.\"a\".password",
            "upstreams.\"b\".urls",
            "upstreams.\"b\".credential_helper",
            "upstreams.\"b\".credentials[0].repo_prefix",
            "upstreams.\"b\".credentials[0]: use one of",
            "upstreams.\"b\".credentials[0].docker_config",
            "aliases.\"Bad\": not a valid",
            "no upstream serves registry \"nowhere.example\"",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    /// The problems `text` has, as one string (panics if it loads).
    fn problems(text: &str) -> String {
        match Config::parse(text, Path::new("t.toml")) {
            Ok(_) => panic!("loaded:\n{text}"),
            Err(LoadError::Invalid { problems, .. }) => problems.to_string(),
            Err(e) => panic!("{e}"),
        }
    }

    const HUB: &str = "[upstreams.\"docker.io\"]\nurls = [\"https://registry-1.docker.io\"]\n";

    /// Every duration key, each set to `ttl` or `wait` as its kind is.
    fn every_duration(ttl: &str, wait: &str) -> String {
        format!(
            r#"
            [cache]
            tag_ttl = "{ttl}"
            max_stale = "{ttl}"
            revalidate_timeout = "{wait}"
            tags_list_ttl = "{ttl}"
            referrers_ttl = "{ttl}"
            negative_ttl = "{ttl}"
            max_age = "{ttl}"
            gc_interval = "{wait}"
            [auth]
            cache_ttl = "{ttl}"
            [tls]
            reload_interval = "{wait}"
            [limits]
            header_read_timeout = "{wait}"
            idle_timeout = "{wait}"
            [storage]
            kind = "s3"
            [storage.s3]
            bucket = "b"
            timeout = "{wait}"
            [upstreams."docker.io"]
            urls = ["https://registry-1.docker.io"]
            credential_ttl = "{ttl}"
            max_age = "{ttl}"
            connect_timeout = "{wait}"
            response_timeout = "{wait}"
            read_timeout = "{wait}"
            breaker_open_for = "{wait}"
            "#
        )
    }

    #[test]
    fn every_duration_has_a_bound_reported_with_its_key_not_a_panic() {
        // Past 1000 years moka panics (in `validate` itself for auth.cache_ttl, at start-up
        // for the rest); past a day a wait is a mistake, and the clock must hold `now + it`.
        let all = problems(&every_duration("2000years", "2days"));
        let ttl = "is too long; at most \"100years\"";
        let wait = "is too long; at most \"1day\"";
        for (key, bound) in [
            ("cache.tag_ttl", ttl),
            ("cache.max_stale", ttl),
            ("cache.revalidate_timeout", wait),
            ("cache.tags_list_ttl", ttl),
            ("cache.referrers_ttl", ttl),
            ("cache.negative_ttl", ttl),
            ("cache.max_age", ttl),
            ("cache.gc_interval", wait),
            ("auth.cache_ttl", ttl),
            ("tls.reload_interval", wait),
            ("limits.header_read_timeout", wait),
            ("limits.idle_timeout", wait),
            ("storage.s3.timeout", wait),
            ("upstreams.\"docker.io\".credential_ttl", ttl),
            ("upstreams.\"docker.io\".max_age", ttl),
            ("upstreams.\"docker.io\".connect_timeout", wait),
            ("upstreams.\"docker.io\".response_timeout", wait),
            ("upstreams.\"docker.io\".read_timeout", wait),
            ("upstreams.\"docker.io\".breaker_open_for", wait),
        ] {
            let line = format!("{key}: \"");
            assert!(
                all.lines()
                    .any(|l| l.starts_with(&line) && l.ends_with(bound)),
                "missing {key} ... {bound} in:\n{all}"
            );
        }
        assert!(
            all.contains("cache.tag_ttl: \"2000years\" is too long"),
            "{all}"
        );
        // The bounds themselves are fine.
        Config::parse(&every_duration("100years", "1day"), Path::new("t.toml")).unwrap();
    }

    #[test]
    fn the_bounds_fit_the_caches_and_the_clock() {
        moka::sync::Cache::<u8, u8>::builder()
            .time_to_live(MAX_TTL)
            .build();
        let now = std::time::Instant::now();
        assert!(now.checked_add(MAX_WAIT).is_some());
        assert!(
            now.checked_add(MAX_TTL + MAX_TTL).is_some(),
            "tag_ttl + max_stale"
        );
        for n in [MAX_MAX_CONNECTIONS, MAX_MAX_CONCURRENT, MAX_MAX_UPLOADS] {
            tokio::sync::Semaphore::new(n);
        }
    }

    #[test]
    fn zero_is_refused_where_it_would_hang_or_fail_everything() {
        let text = r#"
            [cache]
            gc_interval = "0s"
            max_age = "0s"
            revalidate_timeout = "0s"
            [limits]
            max_connections = 0
            header_read_timeout = "0s"
            idle_timeout = "0s"
            [storage]
            kind = "s3"
            [storage.s3]
            bucket = "b"
            timeout = "0s"
            max_uploads = 0
            [upstreams."docker.io"]
            urls = ["https://registry-1.docker.io"]
            max_age = "0s"
            connect_timeout = "0s"
            response_timeout = "0s"
            read_timeout = "0s"
            max_concurrent = 0
            breaker_failures = 0
        "#;
        let all = problems(text);
        for needle in [
            "cache.gc_interval: must be more than zero",
            "cache.max_age: must be more than zero",
            "cache.revalidate_timeout: must be more than zero",
            "limits.max_connections: must be between 1 and 1000000",
            "limits.header_read_timeout: must be more than zero",
            "limits.idle_timeout: must be more than zero",
            "storage.s3.timeout: must be more than zero",
            "storage.s3.max_uploads: must be between 1 and 1000",
            "upstreams.\"docker.io\".max_age: must be more than zero",
            "upstreams.\"docker.io\".connect_timeout: must be more than zero",
            "upstreams.\"docker.io\".response_timeout: must be more than zero",
            "upstreams.\"docker.io\".read_timeout: must be more than zero",
            "upstreams.\"docker.io\".max_concurrent: must be between 1 and 10000",
            "upstreams.\"docker.io\".breaker_failures: must be at least 1",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn zero_stays_allowed_where_it_means_something() {
        let text = format!(
            r#"
            [cache]
            max_stale = "0s"
            tags_list_ttl = "0s"
            referrers_ttl = "0s"
            negative_ttl = "0s"
            manifest_memory = 0
            max_size = 0
            min_free_disk = 0
            [auth]
            cache_ttl = "0s"
            [tls]
            reload_interval = "0s"
            {HUB}
            credential_ttl = "0s"
            breaker_open_for = "0s"
            "#
        );
        Config::parse(&text, Path::new("t.toml")).unwrap();
    }

    #[test]
    fn slot_counts_past_what_a_semaphore_holds_are_refused() {
        // 2^62 permits panic in tokio's Semaphore::new (at start-up, not here).
        let text = format!(
            "[limits]\nmax_connections = {n}\n[storage]\nkind = \"s3\"\n[storage.s3]\nbucket = \"b\"\nmax_uploads = {n}\n{HUB}max_concurrent = {n}\n",
            n = 1u64 << 62
        );
        let all = problems(&text);
        for needle in [
            "limits.max_connections: must be between 1 and 1000000",
            "storage.s3.max_uploads: must be between 1 and 1000",
            "upstreams.\"docker.io\".max_concurrent: must be between 1 and 10000",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn passwords_never_show_in_debug_output() {
        let c = Config::parse(
            "default_upstream = \"a\"\n[upstreams.a]\nurls = [\"https://a.example\"]\nusername = \"u\"\npassword = \"hunter2\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.upstreams["a"].password.as_deref(), Some("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = Config::parse("listen_addr = \"x\"", Path::new("t.toml")).unwrap_err();
        assert!(
            err.to_string()
                .contains("listen_addr: unknown key; did you mean `listen`?"),
            "{err}"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1.5 GB").unwrap(), 1_500_000_000);
        assert!(parse_size("12 parsecs").is_err());
    }
}
