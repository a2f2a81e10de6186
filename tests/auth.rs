//! Upstream authentication against a REAL registry: Debian's `docker-registry` (distribution
//! 2.8) with token auth (trusting the in-process token server of `common::token` through its
//! `rootcertbundle`) or htpasswd Basic auth. Credentials come from the config, a password file,
//! a Docker credential helper on `PATH` (regcache then runs as a real subprocess), a Docker
//! `config.json`, and per repository prefix. In-process fakes cover what a real registry cannot
//! do on demand: a challenge from where a redirect led, a token endpoint that stalls.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use common::fake::{Fake, FakeRegistry, Faults, respond};
use common::image::Image;
use common::token::{ADMIN, BasicRegistry, Helper, RegcacheProcess, TokenServer, basic};
use common::{Meter, Regcache, Registry, error_code, get_manifest, pull, pull_as};
use regcache::config::UpstreamConfig;

/// The `[upstreams."docker.io"]` table of a test config pointing at `url`, with `extra` keys
/// (and `[[upstreams."docker.io".credentials]]` tables) appended, parsed as regcache parses it.
fn upstream(url: &str, extra: &str) -> UpstreamConfig {
    let text = format!("{}{extra}", upstream_toml(url));
    let cfg = regcache::Config::parse(&text, Path::new("<test>"))
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    cfg.upstreams["docker.io"].clone()
}

fn upstream_toml(url: &str) -> String {
    format!(
        "[upstreams.\"docker.io\"]\nurls = [\"{url}\"]\nconnect_timeout = \"2s\"\nresponse_timeout = \"5s\"\nread_timeout = \"5s\"\n"
    )
}

/// regcache in-process with its Docker Hub upstream replaced by `up`.
async fn regcache_with(up: UpstreamConfig) -> Regcache {
    let url = up.urls[0].clone();
    Regcache::start(&url, move |c| {
        c.upstreams.insert("docker.io".to_owned(), up);
    })
    .await
}

/// `host:port` of a base URL: what helpers and Docker configs are asked about.
fn host_port(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

const ALICE: (&str, &str) = ("alice", "alice-secret");
const BOB: (&str, &str) = ("bob", "bob-secret");

/// A token server where alice may pull `private/*`, bob `other/*`, anyone `public/*`, and a
/// real registry trusting it.
async fn token_registry() -> (TokenServer, Registry) {
    let tokens = TokenServer::start().await;
    tokens.user(ALICE.0, ALICE.1);
    tokens.user(BOB.0, BOB.1);
    tokens.allow(Some(ALICE.0), "private", &["pull"]);
    tokens.allow(Some(BOB.0), "other", &["pull"]);
    tokens.allow(None, "public", &["pull"]);
    let registry = Registry::start_with(&tokens.registry_yaml()).await;
    (tokens, registry)
}

/// What the meter saw, with only the scheme and user of each `Authorization` (tokens are long).
fn brief(seen: &[common::Seen]) -> Vec<String> {
    seen.iter()
        .map(|s| {
            let who = match s.authorization.as_deref() {
                None => "-".to_owned(),
                Some(a) if a.starts_with("Basic ") => {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(&a[6..])
                        .unwrap_or_default();
                    let pair = String::from_utf8_lossy(&raw).into_owned();
                    format!("Basic {}", pair.split(':').next().unwrap_or(""))
                }
                Some(a) => a.split(' ').next().unwrap_or("").to_owned(),
            };
            format!("{} {} [{who}]", s.method, s.path)
        })
        .collect()
}

fn scopes_of(reqs: &[common::token::TokenRequest]) -> Vec<String> {
    reqs.iter().flat_map(|r| r.scopes.clone()).collect()
}

/// The registry itself: no token, a challenge naming our realm; a token from the server works;
/// a token without the scope does not. (Checks the token server, so other failures are
/// regcache's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_registry_trusts_the_test_token_server() {
    let (tokens, registry) = token_registry().await;
    let img = Image::simple(1, 2);
    tokens.push(&registry, "private/app", "1", &img).await;

    let resp = get_manifest(&registry.url(), "private/app", "1").await;
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        challenge.contains(&format!("realm=\"{}\"", tokens.realm()))
            && challenge.contains("service=\"regcache-test\"")
            && challenge.contains("scope=\"repository:private/app:pull\""),
        "{challenge}"
    );

    let alice = tokens
        .token(Some(ALICE), "repository:private/app:pull")
        .await;
    let got = pull_as(
        &registry.url(),
        "private/app",
        "1",
        Some(&format!("Bearer {alice}")),
    )
    .await;
    assert_eq!(got, img.digest());

    let anon = tokens.token(None, "repository:private/app:pull").await;
    let resp = common::get_manifest_as(
        &registry.url(),
        "private/app",
        "1",
        Some(&format!("Bearer {anon}")),
    )
    .await;
    assert_eq!(resp.status(), 401, "a token without the scope is refused");
    let last = tokens.requests().pop().unwrap();
    assert_eq!(last.user, None);
    assert!(last.granted.is_empty(), "{last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_with_configured_credentials_pulls_a_private_repository() {
    let (tokens, registry) = token_registry().await;
    let private = Image::simple(2, 3);
    let public = Image::simple(3, 2);
    tokens.push(&registry, "private/app", "1", &private).await;
    tokens.push(&registry, "public/app", "1", &public).await;
    tokens.reset();
    let meter = Meter::start(registry.addr).await;
    let cache = regcache_with(upstream(
        &meter.url(),
        "username = \"alice\"\npassword = \"alice-secret\"\n",
    ))
    .await;

    assert_eq!(
        pull(&cache.url(), "private/app", "1").await,
        private.digest()
    );
    let reqs = tokens.requests();
    assert!(
        reqs.iter().all(|r| r.user.as_deref() == Some("alice")),
        "every token request authenticates as alice: {reqs:?}"
    );
    assert_eq!(
        scopes_of(&reqs),
        ["repository:private/app:pull"],
        "one token for the repository, reused for the manifest and every blob"
    );
    assert_eq!(reqs[0].granted, ["repository:private/app:pull"]);
    // The manifest and all 4 blobs went upstream carrying the token alice got.
    let with_bearer = meter
        .requests()
        .iter()
        .filter(|s| {
            s.path.contains("/private/app/")
                && s.authorization
                    .as_deref()
                    .is_some_and(|a| a.starts_with("Bearer "))
        })
        .count();
    assert_eq!(with_bearer, 5);

    // alice's token server account also covers what anyone may pull.
    assert_eq!(pull(&cache.url(), "public/app", "1").await, public.digest());
    assert_eq!(tokens.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_credentials_a_private_repository_is_denied_and_a_public_one_pulls() {
    let (tokens, registry) = token_registry().await;
    let private = Image::simple(4, 2);
    let public = Image::simple(5, 2);
    tokens.push(&registry, "private/app", "1", &private).await;
    tokens.push(&registry, "public/app", "1", &public).await;
    tokens.reset();
    let cache = regcache_with(upstream(&registry.url(), "")).await;

    let (status, code) = error_code(get_manifest(&cache.url(), "private/app", "1").await).await;
    assert_eq!((status, code.as_str()), (403, "DENIED"));
    let (status, code) = error_code(
        common::http()
            .get(format!(
                "{}/v2/private/app/blobs/{}",
                cache.url(),
                common::image::sha256(&private.config)
            ))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, code.as_str()), (403, "DENIED"), "blobs too");
    assert_eq!(cache.stored_files(), 0);

    assert_eq!(pull(&cache.url(), "public/app", "1").await, public.digest());
    let reqs = tokens.requests();
    assert!(
        reqs.iter()
            .all(|r| r.user.is_none() && r.authorization.is_none()),
        "anonymous token requests only: {reqs:?}"
    );
    assert!(
        reqs.iter()
            .any(|r| r.granted == ["repository:public/app:pull"]),
        "{reqs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_at_the_token_server_is_denied() {
    let (tokens, registry) = token_registry().await;
    let private = Image::simple(6, 1);
    tokens.push(&registry, "private/app", "1", &private).await;
    tokens.reset();
    let cache = regcache_with(upstream(
        &registry.url(),
        "username = \"alice\"\npassword = \"not-alice-secret\"\n",
    ))
    .await;
    let (status, code) = error_code(get_manifest(&cache.url(), "private/app", "1").await).await;
    assert_eq!((status, code.as_str()), (403, "DENIED"));
    assert_eq!(cache.stored_files(), 0);
    let reqs = tokens.requests();
    assert!(
        !reqs.is_empty() && reqs.iter().all(|r| r.status == 401),
        "{reqs:?}"
    );
    assert!(
        reqs.len() <= 3,
        "a refused password is not retried in a loop: {reqs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_fetched_once_per_repository_not_per_blob_or_tag() {
    let (tokens, registry) = token_registry().await;
    let (a1, a2, lib) = (
        Image::simple(7, 4),
        Image::simple(8, 3),
        Image::simple(9, 2),
    );
    tokens.push(&registry, "private/app", "1", &a1).await;
    tokens.push(&registry, "private/app", "2", &a2).await;
    tokens.push(&registry, "private/lib", "1", &lib).await;
    tokens.reset();
    let meter = Meter::start(registry.addr).await;
    let cache = regcache_with(upstream(
        &meter.url(),
        "username = \"alice\"\npassword = \"alice-secret\"\n",
    ))
    .await;

    assert_eq!(pull(&cache.url(), "private/app", "1").await, a1.digest());
    assert_eq!(tokens.requests().len(), 1);
    assert_eq!(meter.blob_gets(), 5);
    // Another tag of the same repository: same scope, same token.
    assert_eq!(pull(&cache.url(), "private/app", "2").await, a2.digest());
    assert_eq!(tokens.requests().len(), 1);
    assert_eq!(meter.blob_gets(), 9);
    // Another repository: one more token, fetched up front (the realm is known by now).
    meter.reset();
    assert_eq!(pull(&cache.url(), "private/lib", "1").await, lib.digest());
    let reqs = tokens.requests();
    assert_eq!(
        scopes_of(&reqs),
        ["repository:private/app:pull", "repository:private/lib:pull"]
    );
    let seen = meter.requests();
    assert!(
        seen.iter().all(|s| s
            .authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer "))),
        "no 401 round trip for a new repository once the realm is known: {:?}",
        brief(&seen)
    );
    assert_eq!(
        seen.len(),
        4,
        "manifest + config + 2 layers: {:?}",
        brief(&seen)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_fetched_again_shortly_before_it_expires() {
    let (tokens, registry) = token_registry().await;
    let (a1, a2) = (Image::simple(10, 1), Image::simple(11, 1));
    tokens.push(&registry, "private/app", "1", &a1).await;
    tokens.push(&registry, "private/app", "2", &a2).await;
    tokens.reset();
    // 6 s tokens: regcache uses a short-lived one for half its life, so each is reused for 3 s
    // (a longer one until 10 s before it expires). distribution accepts a token for 60 s past
    // its `exp`, so the old one would still work: only the count shows the refresh.
    tokens.set_expires_in(6);
    let cache = regcache_with(upstream(
        &registry.url(),
        "username = \"alice\"\npassword = \"alice-secret\"\n",
    ))
    .await;
    assert_eq!(pull(&cache.url(), "private/app", "1").await, a1.digest());
    assert_eq!(tokens.requests().len(), 1);
    tokio::time::sleep(Duration::from_millis(4000)).await;
    assert_eq!(pull(&cache.url(), "private/app", "2").await, a2.digest());
    assert_eq!(
        scopes_of(&tokens.requests()),
        ["repository:private/app:pull"; 2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_client_auth_forwards_the_clients_token_relays_challenges_and_checks_cached_content() {
    let (tokens, mut registry) = token_registry().await;
    let (a1, a2) = (Image::simple(12, 2), Image::simple(13, 2));
    tokens.push(&registry, "private/app", "1", &a1).await;
    tokens.push(&registry, "private/app", "2", &a2).await;
    let client_token = format!(
        "Bearer {}",
        tokens
            .token(Some(ALICE), "repository:private/app:pull")
            .await
    );
    tokens.reset();
    let meter = Meter::start(registry.addr).await;
    // regcache's own account could pull anything; with pass_client_auth it must not be used.
    let cache = regcache_with(upstream(
        &meter.url(),
        &format!(
            "pass_client_auth = true\nusername = \"{}\"\npassword = \"{}\"\n",
            ADMIN.0, ADMIN.1
        ),
    ))
    .await;

    let got = pull_as(&cache.url(), "private/app", "1", Some(&client_token)).await;
    assert_eq!(got, a1.digest());
    let seen = meter.requests();
    assert_eq!(
        seen.len(),
        8,
        "manifest, config, 2 layers: each an access HEAD with the client's credentials, then the GET: {:?}",
        brief(&seen)
    );
    assert!(
        seen.iter()
            .all(|s| s.authorization.as_deref() == Some(client_token.as_str())),
        "every upstream request carries exactly the client's Authorization: {:?}",
        brief(&seen)
    );
    assert!(
        tokens.requests().is_empty(),
        "regcache fetched no token of its own: {:?}",
        tokens.requests()
    );

    // A client without credentials: upstream's 401 goes back with upstream's challenge (so
    // the client can get a token from upstream's realm), and regcache's account stays unused.
    let resp = get_manifest(&cache.url(), "private/app", "2").await;
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let (status, code) = error_code(resp).await;
    assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"));
    assert!(
        challenge.starts_with("Bearer ") && challenge.contains(&tokens.realm()),
        "{challenge}"
    );
    assert!(tokens.requests().is_empty(), "{:?}", tokens.requests());

    // Content already cached is not served to a client upstream would refuse: anonymous and
    // bob (whose token does not cover private/app) get upstream's 401, after a HEAD each.
    let bob_token = format!(
        "Bearer {}",
        tokens.token(Some(BOB), "repository:private/app:pull").await
    );
    tokens.reset();
    meter.reset();
    let config = common::image::sha256(&a1.config);
    for who in [None, Some(bob_token.as_str())] {
        let (status, code) =
            error_code(common::get_manifest_as(&cache.url(), "private/app", "1", who).await).await;
        assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"), "{who:?}");
        let mut req = common::http().get(format!("{}/v2/private/app/blobs/{config}", cache.url()));
        if let Some(a) = who {
            req = req.header("authorization", a);
        }
        let (status, code) = error_code(req.send().await.unwrap()).await;
        assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"), "{who:?}");
    }
    let seen = meter.requests();
    assert!(
        seen.len() == 4 && seen.iter().all(|s| s.method == "HEAD"),
        "{:?}",
        brief(&seen)
    );
    // alice's token still gets the cached blob: one HEAD, no GET.
    meter.reset();
    common::get_blob_as(&cache.url(), "private/app", &config, Some(&client_token)).await;
    assert_eq!(meter.count("HEAD", &config), 1);
    assert_eq!(meter.count("GET", &config), 0);
    assert!(
        meter
            .requests()
            .iter()
            .all(|s| s.authorization.as_deref() != Some(basic(ADMIN.0, ADMIN.1).as_str())),
        "regcache's own account never went upstream"
    );

    // `/v2/` is upstream's to answer: dockerd and podman ping it first and send credentials
    // only where it challenged them (tests/docker.rs and tests/podman.rs pull this way).
    meter.reset();
    let ping = |auth: Option<String>| {
        let mut req = common::http().get(format!("{}/v2/", cache.url()));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        req.send()
    };
    let resp = ping(None).await.unwrap();
    let challenge = resp.headers().get("www-authenticate").cloned();
    assert_eq!(resp.status(), 401);
    assert!(
        challenge.is_some_and(|c| c.to_str().unwrap().contains(&tokens.realm())),
        "upstream's challenge, relayed"
    );
    let resp = ping(Some(client_token.clone())).await.unwrap();
    assert_eq!(resp.status(), 200, "alice's token is good upstream");
    assert_eq!(meter.count("GET", "/v2/"), 2, "each ping asked upstream");
    assert_eq!(
        meter.requests()[1].authorization.as_deref(),
        Some(client_token.as_str())
    );
    // With a second upstream that passes client credentials, `/v2/` cannot tell which one a
    // client means (a challenge from the wrong one would send its password to that realm):
    // 200, upstream not asked.
    let (hub, other) = (
        upstream(&meter.url(), "pass_client_auth = true\n"),
        // Another name for the same place (never asked here).
        upstream(
            &meter.url().replace("127.0.0.1", "localhost"),
            "pass_client_auth = true\n",
        ),
    );
    let two = Regcache::start(&meter.url(), move |c| {
        c.upstreams.insert("docker.io".to_owned(), hub);
        c.upstreams.insert("harbor".to_owned(), other);
    })
    .await;
    assert_eq!(unasked_ping(&two, &meter).await, 200);
    // Offline, upstream is not asked.
    let up = upstream(&meter.url(), "pass_client_auth = true\n");
    let offline = Regcache::start(&meter.url(), move |c| {
        c.upstreams.insert("docker.io".to_owned(), up);
        c.cache.offline = true;
    })
    .await;
    assert_eq!(unasked_ping(&offline, &meter).await, 200);
    // An upstream that cannot answer does not fail the ping; the requests after it get errors.
    registry.stop();
    assert_eq!(ping(None).await.unwrap().status(), 200);
}

/// The status of `/v2/` at `cache`, checking that upstream (behind `meter`) was not asked.
async fn unasked_ping(cache: &Regcache, meter: &Meter) -> u16 {
    meter.reset();
    let resp = common::http()
        .get(format!("{}/v2/", cache.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(meter.total(), 0, "upstream was asked");
    resp.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_repository_prefix_credentials_pick_the_account_per_scope() {
    let (tokens, registry) = token_registry().await;
    let (p, o, pub_) = (
        Image::simple(14, 2),
        Image::simple(15, 2),
        Image::simple(16, 1),
    );
    tokens.push(&registry, "private/app", "1", &p).await;
    tokens.push(&registry, "other/app", "1", &o).await;
    tokens.push(&registry, "public/app", "1", &pub_).await;
    tokens.reset();
    let dir = tempfile::tempdir().unwrap();
    let bob_pw = dir.path().join("bob.pw");
    std::fs::write(&bob_pw, format!("{}\n", BOB.1)).unwrap();
    // No upstream-wide credentials: what no prefix covers goes anonymously.
    let cache = regcache_with(upstream(
        &registry.url(),
        &format!(
            "[[upstreams.\"docker.io\".credentials]]\nrepo_prefix = \"private\"\nusername = \"alice\"\npassword = \"alice-secret\"\n\
             [[upstreams.\"docker.io\".credentials]]\nrepo_prefix = \"other/\"\nusername = \"bob\"\npassword_file = \"{}\"\n",
            bob_pw.display()
        ),
    ))
    .await;

    assert_eq!(pull(&cache.url(), "private/app", "1").await, p.digest());
    assert_eq!(pull(&cache.url(), "other/app", "1").await, o.digest());
    assert_eq!(pull(&cache.url(), "public/app", "1").await, pub_.digest());
    let by = |u: Option<&str>| scopes_of(&tokens.requests_by(u));
    assert_eq!(by(Some("alice")), ["repository:private/app:pull"]);
    assert_eq!(by(Some("bob")), ["repository:other/app:pull"]);
    assert_eq!(by(None), ["repository:public/app:pull"]);
    assert!(
        tokens.requests().iter().all(|r| r.status == 200),
        "{:?}",
        tokens.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_repository_prefix_longest_prefix_wins_over_the_upstream_default() {
    let (tokens, registry) = token_registry().await;
    tokens.allow(Some(BOB.0), "private/bobs", &["pull"]);
    let (a, b) = (Image::simple(17, 1), Image::simple(18, 1));
    tokens.push(&registry, "private/app", "1", &a).await;
    tokens.push(&registry, "private/bobs/app", "1", &b).await;
    tokens.reset();
    let cache = regcache_with(upstream(
        &registry.url(),
        "username = \"alice\"\npassword = \"alice-secret\"\n\
         [[upstreams.\"docker.io\".credentials]]\nrepo_prefix = \"private/bobs\"\nusername = \"bob\"\npassword = \"bob-secret\"\n",
    ))
    .await;
    assert_eq!(pull(&cache.url(), "private/app", "1").await, a.digest());
    assert_eq!(
        pull(&cache.url(), "private/bobs/app", "1").await,
        b.digest()
    );
    let by = |u: Option<&str>| scopes_of(&tokens.requests_by(u));
    assert_eq!(by(Some("alice")), ["repository:private/app:pull"]);
    assert_eq!(by(Some("bob")), ["repository:private/bobs/app:pull"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_config_auths_for_the_registry_host_are_used() {
    let (tokens, registry) = token_registry().await;
    let p = Image::simple(19, 2);
    tokens.push(&registry, "private/app", "1", &p).await;
    tokens.reset();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", ALICE.0, ALICE.1));
    std::fs::write(
        &config,
        serde_json::json!({
            "auths": {
                "registry.elsewhere.example": {"auth": base64::engine::general_purpose::STANDARD.encode("mallory:x")},
                host_port(&registry.url()): {"auth": auth},
            }
        })
        .to_string(),
    )
    .unwrap();
    let cache = regcache_with(upstream(
        &registry.url(),
        &format!("docker_config = \"{}\"\n", config.display()),
    ))
    .await;
    assert_eq!(pull(&cache.url(), "private/app", "1").await, p.digest());
    let reqs = tokens.requests();
    assert!(
        !reqs.is_empty() && reqs.iter().all(|r| r.user.as_deref() == Some("alice")),
        "{reqs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_config_with_username_and_password_fields_and_an_http_key() {
    let (tokens, registry) = token_registry().await;
    let p = Image::simple(20, 1);
    tokens.push(&registry, "other/app", "1", &p).await;
    tokens.reset();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "auths": { registry.url(): {"username": BOB.0, "password": BOB.1} }
        })
        .to_string(),
    )
    .unwrap();
    let cache = regcache_with(upstream(
        &registry.url(),
        &format!("docker_config = \"{}\"\n", config.display()),
    ))
    .await;
    assert_eq!(pull(&cache.url(), "other/app", "1").await, p.digest());
    assert!(
        tokens
            .requests()
            .iter()
            .all(|r| r.user.as_deref() == Some("bob"))
    );
}

// ---- what a real registry cannot do on demand (in-process fakes) ----

/// The `Host` a fake was asked by: its own `host:port`, for challenges naming itself.
fn host_of(parts: &common::fake::Parts) -> String {
    parts
        .headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_owned()
}

/// A 401 from the origin a blob redirect led to (a CDN) is not the upstream's challenge: the
/// realm it names gets none of the upstream's configured credentials, and the client gets an
/// error at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_from_a_redirect_target_gets_none_of_the_upstreams_credentials() {
    // The CDN challenges everything with a realm of its own, and would hand out a token to
    // anyone asking (so nothing but regcache's judgement keeps credentials from it).
    let cdn = Fake::start(|parts| async move {
        if parts.uri.path() == "/token" {
            return respond(
                200,
                &[("content-type", "application/json")],
                r#"{"token":"cdn-token","expires_in":300}"#,
            );
        }
        let challenge = format!(
            "Bearer realm=\"http://{}/token\",service=\"cdn\"",
            host_of(&parts)
        );
        respond(401, &[("www-authenticate", &challenge)], "")
    })
    .await;
    let carol = basic(CAROL.0, CAROL.1);
    let up = FakeRegistry::start(Faults {
        token_auth: true,
        token_requires: Some(carol.clone()),
        redirect_blobs_to: Some(cdn.url()),
        ..Faults::default()
    })
    .await;
    let img = Image::simple(33, 1);
    up.add("team/app", "1", &img);
    let cache = regcache_with(upstream(
        &up.url(),
        "username = \"carol\"\npassword = \"carol-secret\"\n",
    ))
    .await;

    // The manifest leaves a token for the repository cached, so the blob GET goes out with it
    // up front and the CDN's 401 is the first one that request sees.
    let resp = get_manifest(&cache.url(), "team/app", "1").await;
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    assert!(
        up.requests()
            .iter()
            .any(|s| s.path.starts_with("/token") && s.authorization.as_deref() == Some(&carol)),
        "the credentials are configured and went to the upstream's own realm: {:?}",
        brief(&up.requests())
    );

    let config = common::image::sha256(&img.config);
    let stored = cache.stored_files();
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        common::http()
            .get(format!("{}/v2/team/app/blobs/{config}", cache.url()))
            .send(),
    )
    .await
    .expect("the blob GET is answered, not left hanging")
    .unwrap();
    let status = resp.status();
    assert!(
        status.is_client_error() || status.is_server_error(),
        "{status}: {:?}",
        resp.text().await
    );
    assert_eq!(cache.stored_files(), stored, "the blob was not stored");

    let seen = cdn.requests();
    assert!(
        cdn.count("GET", &format!("/cdn/{config}")) >= 1,
        "the redirect was followed to the CDN: {:?}",
        brief(&seen)
    );
    assert_eq!(
        cdn.count("GET", "/token"),
        0,
        "no token was asked of the CDN's realm: {:?}",
        brief(&seen)
    );
    assert!(
        seen.iter().all(|s| s.authorization.is_none()),
        "nothing regcache sent the CDN carried an Authorization: {:?}",
        brief(&seen)
    );
}

/// A token endpoint that sends its headers and then never finishes its body fails the request
/// after the upstream's `read_timeout`, and frees the upstream's only slot for the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_body_that_stalls_times_out_and_frees_the_upstreams_slot() {
    const TOKEN: &str = "slow-then-fine";
    let img = Image::simple(34, 1);
    let (media_type, manifest, digest) =
        (img.media_type.clone(), img.manifest.clone(), img.digest());
    let token_requests = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&token_requests);
    let up = Fake::start(move |parts| {
        let (media_type, manifest, digest) = (media_type.clone(), manifest.clone(), digest.clone());
        let token_request =
            (parts.uri.path() == "/token").then(|| counter.fetch_add(1, Ordering::SeqCst));
        async move {
            match token_request {
                // The first token answer: headers promising 100 bytes, then nothing, ever.
                Some(0) => {
                    use http_body_util::BodyExt as _;
                    let never = futures_util::stream::pending::<
                        Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>,
                    >();
                    return http::Response::builder()
                        .status(200)
                        .header("content-type", "application/json")
                        .header("content-length", "100")
                        .body(http_body_util::StreamBody::new(never).boxed())
                        .unwrap();
                }
                Some(_) => {
                    let body = format!(r#"{{"token":"{TOKEN}","expires_in":300}}"#);
                    return respond(200, &[("content-type", "application/json")], body);
                }
                None => {}
            }
            let authorized = parts
                .headers
                .get("authorization")
                .is_some_and(|a| a.as_bytes() == format!("Bearer {TOKEN}").as_bytes());
            if !authorized {
                let challenge = format!(
                    "Bearer realm=\"http://{}/token\",service=\"fake\"",
                    host_of(&parts)
                );
                return respond(401, &[("www-authenticate", &challenge)], "");
            }
            if parts.uri.path().ends_with("/manifests/1") {
                return respond(
                    200,
                    &[
                        ("content-type", &media_type),
                        ("docker-content-digest", &digest),
                    ],
                    manifest,
                );
            }
            respond(404, &[], "")
        }
    })
    .await;
    let cache = Regcache::start(&up.url(), |c| {
        let u = c.upstreams.get_mut("docker.io").unwrap();
        u.read_timeout = Duration::from_secs(1);
        u.max_concurrent = 1;
    })
    .await;

    let started = std::time::Instant::now();
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        get_manifest(&cache.url(), "stall/app", "1"),
    )
    .await
    .expect("answered within 10 s, not held forever by a token body that never ends");
    let (status, code) = error_code(resp).await;
    assert_eq!((status, code.as_str()), (504, "UNAVAILABLE"));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "failed by read_timeout (1 s), not before: {:?}",
        started.elapsed()
    );
    assert_eq!(token_requests.load(Ordering::SeqCst), 1);

    // Another repository: its own flight, but the same single upstream slot.
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        get_manifest(&cache.url(), "stall/other", "1"),
    )
    .await
    .expect("the next request got the upstream's one slot");
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    assert_eq!(token_requests.load(Ordering::SeqCst), 2);
}

// ---- htpasswd Basic auth ----

const CAROL: (&str, &str) = ("carol", "carol-secret");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_pulls_with_username_and_password() {
    let up = BasicRegistry::start(&[CAROL]).await;
    let img = Image::simple(21, 3);
    up.push("team/app", "1", &img).await;
    let meter = Meter::start(up.registry.addr).await;
    let cache = regcache_with(upstream(
        &meter.url(),
        "username = \"carol\"\npassword = \"carol-secret\"\n",
    ))
    .await;
    assert_eq!(pull(&cache.url(), "team/app", "1").await, img.digest());
    let carol = basic(CAROL.0, CAROL.1);
    let seen = meter.requests();
    let ok = seen
        .iter()
        .filter(|s| s.authorization.as_deref() == Some(carol.as_str()))
        .count();
    assert_eq!(
        ok,
        5,
        "manifest and 4 blobs with carol's Basic: {:?}",
        brief(&seen)
    );
    assert!(
        seen.iter()
            .all(|s| s.authorization.is_none() || s.authorization.as_deref() == Some(&carol)),
        "{:?}",
        brief(&seen)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_with_a_wrong_password_or_none_is_denied() {
    let up = BasicRegistry::start(&[CAROL]).await;
    let img = Image::simple(22, 1);
    up.push("team/app", "1", &img).await;
    let wrong = regcache_with(upstream(
        &up.registry.url(),
        "username = \"carol\"\npassword = \"wrong\"\n",
    ))
    .await;
    let (status, code) = error_code(get_manifest(&wrong.url(), "team/app", "1").await).await;
    assert_eq!((status, code.as_str()), (403, "DENIED"));
    assert_eq!(wrong.stored_files(), 0);
    let none = regcache_with(upstream(&up.registry.url(), "")).await;
    let (status, code) = error_code(get_manifest(&none.url(), "team/app", "1").await).await;
    assert_eq!((status, code.as_str()), (403, "DENIED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_with_a_password_file() {
    let up = BasicRegistry::start(&[CAROL]).await;
    let img = Image::simple(23, 2);
    up.push("team/app", "1", &img).await;
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("carol.pw");
    std::fs::write(&pw, format!("{}\n", CAROL.1)).unwrap();
    let meter = Meter::start(up.registry.addr).await;
    let cache = regcache_with(upstream(
        &meter.url(),
        &format!(
            "username = \"carol\"\npassword_file = \"{}\"\n",
            pw.display()
        ),
    ))
    .await;
    assert_eq!(pull(&cache.url(), "team/app", "1").await, img.digest());
    let carol = basic(CAROL.0, CAROL.1);
    assert!(
        meter
            .requests()
            .iter()
            .any(|s| s.authorization.as_deref() == Some(carol.as_str())),
        "the password is the file's first line without its newline"
    );
}

// ---- credential helpers (regcache as a subprocess, the helper on its PATH) ----

/// distribution re-reads its htpasswd file when it changes (checked here so a failure of the
/// rotation tests below is not blamed on regcache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_registry_rereads_a_changed_htpasswd() {
    let up = BasicRegistry::start(&[CAROL]).await;
    let v2 = format!("{}/v2/", up.registry.url());
    let get = |auth: String| {
        let v2 = v2.clone();
        async move {
            common::http()
                .get(v2)
                .header("authorization", auth)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(get(basic(CAROL.0, CAROL.1)).await, 200);
    up.set_users(&[(CAROL.0, "rotated")]);
    assert_eq!(get(basic(CAROL.0, CAROL.1)).await, 401);
    assert_eq!(get(basic(CAROL.0, "rotated")).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_helper_is_asked_again_when_upstream_refuses_rotated_credentials() {
    let up = BasicRegistry::start(&[CAROL]).await;
    let (a, b) = (Image::simple(24, 2), Image::simple(25, 2));
    up.push("team/app", "1", &a).await;
    up.push("team/app", "2", &b).await;
    let bin = tempfile::tempdir().unwrap();
    let helper = Helper::install(bin.path(), "testhelper", CAROL.0, CAROL.1);
    let url = up.registry.url();
    let cache = RegcacheProcess::start(
        &format!(
            "{}credential_helper = \"testhelper\"\n",
            upstream_toml(&url)
        ),
        bin.path(),
    )
    .await;

    assert_eq!(
        pull(&cache.url(), "team/app", "1").await,
        a.digest(),
        "{}",
        cache.log()
    );
    assert_eq!(
        helper.runs(),
        [host_port(&url)],
        "asked once, about the registry's host:port"
    );

    // Rotate: the registry now wants a new password, and the helper hands it out.
    up.set_users(&[(CAROL.0, "carol-rotated")]);
    helper.set(CAROL.0, "carol-rotated");
    let got = pull(&cache.url(), "team/app", "2").await;
    assert_eq!(got, b.digest(), "{}", cache.log());
    assert_eq!(
        helper.runs().len(),
        2,
        "a 401 made regcache run the helper again at once (credential_ttl is 5 min)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_from_a_helper_are_reused_for_credential_ttl() {
    let (tokens, registry) = token_registry().await;
    let imgs: Vec<Image> = (0..3).map(|i| Image::simple(26 + i, 1)).collect();
    for (i, img) in imgs.iter().enumerate() {
        // Separate repositories, so each pull needs a token, hence credentials.
        tokens
            .push(&registry, &format!("private/app{i}"), "1", img)
            .await;
    }
    tokens.reset();
    let bin = tempfile::tempdir().unwrap();
    let helper = Helper::install(bin.path(), "ttlhelper", ALICE.0, ALICE.1);
    let cache = RegcacheProcess::start(
        &format!(
            "{}credential_helper = \"ttlhelper\"\ncredential_ttl = \"3s\"\n",
            upstream_toml(&registry.url())
        ),
        bin.path(),
    )
    .await;
    assert_eq!(
        pull(&cache.url(), "private/app0", "1").await,
        imgs[0].digest(),
        "{}",
        cache.log()
    );
    assert_eq!(
        pull(&cache.url(), "private/app1", "1").await,
        imgs[1].digest()
    );
    assert_eq!(helper.runs().len(), 1, "reused within credential_ttl");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        pull(&cache.url(), "private/app2", "1").await,
        imgs[2].digest()
    );
    assert_eq!(helper.runs().len(), 2, "asked again after credential_ttl");
    assert_eq!(
        tokens.requests_by(Some("alice")).len(),
        3,
        "{:?}",
        tokens.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_helper_password_is_picked_up_at_the_token_server() {
    let (tokens, registry) = token_registry().await;
    let (a, b) = (Image::simple(29, 1), Image::simple(30, 1));
    tokens.push(&registry, "private/one", "1", &a).await;
    tokens.push(&registry, "private/two", "1", &b).await;
    tokens.reset();
    let bin = tempfile::tempdir().unwrap();
    let helper = Helper::install(bin.path(), "tokhelper", ALICE.0, ALICE.1);
    let cache = RegcacheProcess::start(
        &format!(
            "{}credential_helper = \"tokhelper\"\n",
            upstream_toml(&registry.url())
        ),
        bin.path(),
    )
    .await;
    assert_eq!(
        pull(&cache.url(), "private/one", "1").await,
        a.digest(),
        "{}",
        cache.log()
    );
    tokens.user(ALICE.0, "alice-rotated");
    helper.set(ALICE.0, "alice-rotated");
    assert_eq!(
        pull(&cache.url(), "private/two", "1").await,
        b.digest(),
        "{}",
        cache.log()
    );
    assert_eq!(helper.runs().len(), 2);
    let reqs = tokens.requests();
    assert_eq!(
        reqs.last().map(|r| (r.user.as_deref(), r.status)),
        Some((Some("alice"), 200)),
        "{reqs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_config_cred_helpers_and_creds_store_run_the_named_helper() {
    let (tokens, registry) = token_registry().await;
    let (p, o) = (Image::simple(31, 1), Image::simple(32, 1));
    tokens.push(&registry, "private/app", "1", &p).await;
    tokens.push(&registry, "other/app", "1", &o).await;
    tokens.reset();
    let bin = tempfile::tempdir().unwrap();
    let per_host = Helper::install(bin.path(), "perhost", ALICE.0, ALICE.1);
    let store = Helper::install(bin.path(), "store", BOB.0, BOB.1);
    let host = host_port(&registry.url());
    let with_helpers = bin.path().join("helpers.json");
    std::fs::write(
        &with_helpers,
        serde_json::json!({"credHelpers": {host.clone(): "perhost"}, "credsStore": "store"})
            .to_string(),
    )
    .unwrap();
    let store_only = bin.path().join("store.json");
    std::fs::write(
        &store_only,
        serde_json::json!({"credsStore": "store"}).to_string(),
    )
    .unwrap();
    let cache = RegcacheProcess::start(
        &format!(
            "{}docker_config = \"{}\"\n[[upstreams.\"docker.io\".credentials]]\nrepo_prefix = \"other\"\ndocker_config = \"{}\"\n",
            upstream_toml(&registry.url()),
            with_helpers.display(),
            store_only.display()
        ),
        bin.path(),
    )
    .await;
    assert_eq!(
        pull(&cache.url(), "private/app", "1").await,
        p.digest(),
        "{}",
        cache.log()
    );
    assert_eq!(
        pull(&cache.url(), "other/app", "1").await,
        o.digest(),
        "{}",
        cache.log()
    );
    assert_eq!(
        per_host.runs(),
        [host.as_str()],
        "credHelpers wins over credsStore"
    );
    assert_eq!(
        store.runs(),
        [host.as_str()],
        "credsStore for a config without credHelpers"
    );
    let by = |u: Option<&str>| scopes_of(&tokens.requests_by(u));
    assert_eq!(by(Some("alice")), ["repository:private/app:pull"]);
    assert_eq!(by(Some("bob")), ["repository:other/app:pull"]);
}
