//! Client authentication and access control against real parts: Debian's `docker-registry`
//! upstream (plain, and behind htpasswd for the private-content isolation tests) behind a
//! meter, clients over HTTP, skopeo `--creds`, and the Docker daemon's `docker login` flow
//! with regcache as a registry (not a mirror).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::clients::{Dockerd, Skopeo, check_oci_layout, try_run};
use common::image::{self, DOCKER_V2, Image, Layer, OCI_MANIFEST};
use common::token::{BasicRegistry, basic, htpasswd};
use common::{Meter, Regcache, Registry, Scrape, error_code, get_manifest_as, http, pull_as};

const ALICE: (&str, &str) = ("alice", "alice-pw-7f3a");
const BOB: (&str, &str) = ("bob", "bob-pw-91c2");
const CI_TOKEN: &str = "ci-token-4b1e0c9d2a7f6e85";
const BOT_TOKEN: &str = "bot-token-0a9b8c7d6e5f4a3b";
const BOT_ENV: &str = "REGCACHE_TEST_ACCESS_BOT_TOKEN";

/// Files the config names: an htpasswd of alice and bob, the ci token.
struct Secrets {
    dir: tempfile::TempDir,
}

impl Secrets {
    fn new() -> Secrets {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("htpasswd"), htpasswd(&[ALICE, BOB])).unwrap();
        std::fs::write(dir.path().join("ci.token"), format!("{CI_TOKEN}\n")).unwrap();
        Secrets { dir }
    }

    fn htpasswd(&self) -> PathBuf {
        self.dir.path().join("htpasswd")
    }

    fn ci_token(&self) -> PathBuf {
        self.dir.path().join("ci.token")
    }
}

/// regcache in-process with this TOML (listen, data_dir and log level added).
async fn regcache(toml: &str) -> Regcache {
    let data = tempfile::tempdir().unwrap();
    let text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[log]\nlevel = \"warn\"\n{toml}",
        data.path().display()
    );
    let cfg = regcache::Config::parse(&text, Path::new("<test>"))
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    Regcache::start_config(cfg, data).await
}

fn upstream_toml(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[upstreams.\"{name}\"]\nurls = [\"{url}\"]\nconnect_timeout = \"2s\"\nresponse_timeout = \"5s\"\nread_timeout = \"5s\"\n{extra}\n"
    )
}

/// `[auth]` with alice (group devs) and bob from the htpasswd file, the ci token (file) and
/// the bot token (environment), then `rules`.
fn auth_toml(s: &Secrets, rules: &str) -> String {
    format!(
        "[auth]\nhtpasswd = \"{}\"\nrealm = \"regcache-test\"\n[auth.groups]\ndevs = [\"alice\"]\n\
         [[auth.tokens]]\nname = \"ci\"\ntoken_file = \"{}\"\n\
         [[auth.tokens]]\nname = \"bot\"\ntoken_env = \"{BOT_ENV}\"\n{rules}",
        s.htpasswd().display(),
        s.ci_token().display()
    )
}

fn set_bot_env() {
    // SAFETY: nextest runs each test in its own process; nothing else reads the environment
    // concurrently at this point (before regcache starts).
    unsafe { std::env::set_var(BOT_ENV, BOT_TOKEN) };
}

/// The status, OCI code, message and `WWW-Authenticate` of an error answer.
/// A real upstream holding each `(repo, image)` as `repo:1`, behind a meter; the secrets'
/// files; and the bot token's variable set.
async fn upstream_with(images: &[(&str, &Image)]) -> (Registry, Meter, Secrets) {
    set_bot_env();
    let registry = Registry::start().await;
    for (repo, img) in images {
        registry.push(repo, "1", img).await;
    }
    let meter = Meter::start(registry.addr).await;
    (registry, meter, Secrets::new())
}

async fn refusal(resp: reqwest::Response) -> (u16, String, String, Option<String>) {
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let status = resp.status().as_u16();
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    (
        status,
        v["errors"][0]["code"].as_str().unwrap_or("").to_owned(),
        v["errors"][0]["message"].as_str().unwrap_or("").to_owned(),
        challenge,
    )
}

async fn get(url: String, authorization: Option<&str>) -> reqwest::Response {
    let mut req = http().get(url).header("accept", common::ACCEPT_ALL);
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    req.send().await.unwrap()
}

/// The login flow, wrong and missing credentials, rules by user, group and token, the
/// policy's deny list on every spelling, and the denial counter; none of it reaches upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_rules_and_denials_over_http() {
    let (app, alpine, secret) = (
        Image::simple(801, 2),
        Image::simple(802, 1),
        Image::simple(803, 1),
    );
    let (_registry, meter, s) = upstream_with(&[
        ("team/app", &app),
        ("library/alpine", &alpine),
        ("secret/x", &secret),
    ])
    .await;
    let cache = regcache(&format!(
        "{}{}",
        upstream_toml("docker.io", &meter.url(), "deny = [\"secret/**\"]"),
        auth_toml(
            &s,
            "[[auth.rules]]\ngroups = [\"devs\"]\nrepos = [\"team/**\"]\n\
             [[auth.rules]]\nusers = [\"ci\"]\nupstreams = [\"docker.io\"]\nrepos = [\"library/*\"]\n"
        )
    ))
    .await;
    let base = cache.url();
    let alice = basic(ALICE.0, ALICE.1);
    let bob = basic(BOB.0, BOB.1);
    let ci = format!("Bearer {CI_TOKEN}");

    // `GET /v2/`: what `docker login` and every client ask first.
    let (status, code, _, challenge) = refusal(get(format!("{base}/v2/"), None).await).await;
    assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"));
    assert_eq!(challenge.as_deref(), Some("Basic realm=\"regcache-test\""));
    assert_eq!(get(format!("{base}/v2/"), Some(&alice)).await.status(), 200);
    let wrong = basic(ALICE.0, "not-the-password");
    let (status, code, message, challenge) =
        refusal(get(format!("{base}/v2/"), Some(&wrong)).await).await;
    assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"));
    assert!(challenge.is_some_and(|c| c.starts_with("Basic realm=")));
    assert!(!message.contains("not-the-password"), "{message}");
    // Wrong credentials are refused on any request, not taken for anonymous.
    let (status, code, ..) =
        refusal(get_manifest_as(&base, "team/app", "1", Some(&wrong)).await).await;
    assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"));

    // Missing credentials on a repository: 401 with the challenge, nothing upstream.
    let (status, code, _, challenge) =
        refusal(get_manifest_as(&base, "team/app", "1", None).await).await;
    assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"));
    assert_eq!(challenge.as_deref(), Some("Basic realm=\"regcache-test\""));
    assert_eq!(meter.total(), 0);

    // alice's group grants team/**: the right digests.
    assert_eq!(
        pull_as(&base, "team/app", "1", Some(&alice)).await,
        app.digest()
    );
    // bob is authenticated but no rule grants him anything.
    let (status, code, message, _) =
        refusal(get_manifest_as(&base, "team/app", "1", Some(&bob)).await).await;
    assert_eq!((status, code.as_str()), (403, "DENIED"));
    assert!(
        message.contains("bob may not pull docker.io/team/app"),
        "{message}"
    );
    // alice's group does not cover library/*; the ci token does, as Bearer and as a
    // `docker login -u ci` password.
    let (status, code, ..) =
        refusal(get_manifest_as(&base, "library/alpine", "1", Some(&alice)).await).await;
    assert_eq!((status, code.as_str()), (403, "DENIED"));
    assert_eq!(
        pull_as(&base, "alpine", "1", Some(&ci)).await,
        alpine.digest()
    );
    assert_eq!(
        pull_as(&base, "library/alpine", "1", Some(&basic("ci", CI_TOKEN))).await,
        alpine.digest()
    );
    let (status, code, ..) =
        refusal(get_manifest_as(&base, "team/app", "1", Some(&ci)).await).await;
    assert_eq!(
        (status, code.as_str()),
        (403, "DENIED"),
        "ci's rule is library/* only"
    );
    // The bot token (from the environment) authenticates, and no rule is for it.
    let bot = format!("Bearer {BOT_TOKEN}");
    assert_eq!(get(format!("{base}/v2/"), Some(&bot)).await.status(), 200);
    let (status, ..) = refusal(get_manifest_as(&base, "alpine", "1", Some(&bot)).await).await;
    assert_eq!(status, 403);
    let (status, code, ..) =
        refusal(get_manifest_as(&base, "alpine", "1", Some("Bearer not-a-token-we-know")).await)
            .await;
    assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"));

    // The deny list, on every spelling of the same repository, before anything upstream.
    let before = meter.total();
    for url in [
        format!("{base}/v2/secret/x/manifests/1"),
        format!("{base}/v2/docker.io/secret/x/manifests/1"),
        format!("{base}/v2/secret/x/manifests/1?ns=docker.io"),
        format!("{base}/v2/secret/x/blobs/{}", image::sha256(&secret.config)),
    ] {
        let (status, code, message, _) = refusal(get(url.clone(), Some(&alice)).await).await;
        assert_eq!((status, code.as_str()), (403, "DENIED"), "{url}");
        assert!(
            message.contains(
                "docker.io/secret/x is denied by upstreams.\"docker.io\".deny[0] = \"secret/**\""
            ),
            "{url}: {message}"
        );
    }
    // Anonymous too: the policy answers before identity.
    let (status, ..) = refusal(get_manifest_as(&base, "secret/x", "1", None).await).await;
    assert_eq!(status, 403);
    assert_eq!(
        meter.total(),
        before,
        "denied requests never reach upstream"
    );
    assert_eq!(meter.count("GET", "secret"), 0);
    assert!(
        meter.requests().iter().all(|s| s.authorization.is_none()),
        "clients' credentials for regcache never go upstream"
    );

    let m = Scrape::of(&base).await;
    let denied = |reason: &str| m.get("regcache_access_denied_total", &[("reason", reason)]);
    assert_eq!(denied("no_credentials"), 2.0, "{}", m.text);
    assert_eq!(denied("bad_credentials"), 3.0);
    assert_eq!(denied("rule"), 4.0);
    assert_eq!(denied("policy"), 5.0);
    for secret in [ALICE.1, BOB.1, CI_TOKEN, BOT_TOKEN, "not-the-password"] {
        assert!(!m.text.contains(secret));
    }
}

/// `anonymous = true` opens one upstream (Docker Hub style) while another needs a login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_upstream_beside_one_that_needs_a_login() {
    let img = Image::simple(811, 1);
    let (registry, meter, s) = upstream_with(&[("library/alpine", &img), ("team/app", &img)]).await;
    let cache = regcache(&format!(
        "{}{}{}",
        upstream_toml("docker.io", &meter.url(), "anonymous = true"),
        upstream_toml("corp", &registry.url(), ""),
        auth_toml(&s, "")
    ))
    .await;
    let base = cache.url();
    assert_eq!(pull_as(&base, "alpine", "1", None).await, img.digest());
    let (status, _, _, challenge) =
        refusal(get_manifest_as(&base, "corp/team/app", "1", None).await).await;
    assert_eq!(status, 401);
    assert!(challenge.is_some());
    // With no rules, any authenticated identity pulls what the policy allows.
    assert_eq!(
        pull_as(&base, "corp/team/app", "1", Some(&basic(BOB.0, BOB.1))).await,
        img.digest()
    );
}

/// skopeo with `--creds` (and without: refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_with_creds() {
    let img = Image::new(
        OCI_MANIFEST,
        "amd64",
        vec![Layer::new(82_100, 5000), Layer::new(82_101, 6000)],
    );
    let (_registry, meter, s) = upstream_with(&[("team/app", &img)]).await;
    let cache = regcache(&format!(
        "{}{}",
        upstream_toml("docker.io", &meter.url(), ""),
        auth_toml(
            &s,
            "[[auth.rules]]\nusers = [\"alice\"]\nrepos = [\"team/**\"]\n"
        )
    ))
    .await;
    let skopeo = Skopeo::new();
    let src = format!("docker://{}/team/app:1", cache.addr);

    let mut c = skopeo.cmd();
    c.args(["copy", "--src-tls-verify=false", &src])
        .arg(format!("oci:{}:app", skopeo.path("anon").display()));
    let out = try_run(&mut c, "skopeo copy without creds").await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unauthorized")
            || err.contains("401")
            || err.contains("authentication required"),
        "{err}"
    );
    assert_eq!(meter.total(), 0);

    let layout = skopeo.path("layout");
    let creds = format!("{}:{}", ALICE.0, ALICE.1);
    let mut c = skopeo.cmd();
    c.args([
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        &creds,
        &src,
    ])
    .arg(format!("oci:{}:app", layout.display()));
    common::clients::run(&mut c, "skopeo copy --src-creds").await;
    check_oci_layout(&layout, "app", &img.digest());

    let mut c = skopeo.cmd();
    c.args([
        "inspect",
        "--tls-verify=false",
        "--creds",
        &format!("{}:wrong", ALICE.0),
        &src,
    ]);
    let out = try_run(&mut c, "skopeo inspect with a wrong password").await;
    assert!(!out.status.success());
}

/// `docker login` to regcache as a registry (not a mirror), then pulls through the daemon:
/// dockerd sends the stored credentials to the registry it logged in to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_login_then_pull_from_regcache_as_a_registry() {
    let img = Image::simple(831, 2);
    let (_registry, meter, s) = upstream_with(&[("team/app", &img)]).await;
    let cache = regcache(&format!(
        "{}{}",
        upstream_toml("docker.io", &meter.url(), ""),
        auth_toml(
            &s,
            "[[auth.rules]]\ngroups = [\"devs\"]\nrepos = [\"team/**\"]\n"
        )
    ))
    .await;
    let host = cache.addr.to_string();
    let docker = Dockerd::start_config(
        &serde_json::json!({ "insecure-registries": [host.clone()] }).to_string(),
        &[],
    )
    .await;
    let reference = format!("{host}/team/app:1");

    // Not logged in: the pull is refused, and nothing went upstream.
    let out = try_run(docker.docker().args(["pull", &reference]), "docker pull").await;
    assert!(!out.status.success());
    assert_eq!(meter.total(), 0);

    let out = try_run(
        docker
            .docker()
            .args(["login", "-u", ALICE.0, "-p", "wrong-password", &host]),
        "docker login (wrong password)",
    )
    .await;
    assert!(!out.status.success(), "a wrong password is refused");
    let login = docker
        .run(&["login", "-u", ALICE.0, "-p", ALICE.1, &host])
        .await;
    assert!(login.contains("Login Succeeded"), "{login}");

    docker.run(&["pull", &reference]).await;
    let inspect = docker.inspect(&reference).await;
    assert_eq!(inspect["Id"], image::sha256(&img.config).as_str());
    let diff_ids: Vec<String> =
        serde_json::from_value(inspect["RootFS"]["Layers"].clone()).unwrap();
    let want: Vec<String> = img.layers.iter().map(|l| l.diff_id.clone()).collect();
    assert_eq!(diff_ids, want);
    assert_eq!(meter.blob_gets(), 3, "config + 2 layers");

    // bob logs in fine but may not pull team/app.
    docker.run(&["logout", &host]).await;
    docker
        .run(&["login", "-u", BOB.0, "-p", BOB.1, &host])
        .await;
    docker.run(&["rmi", &reference]).await;
    let out = try_run(
        docker.docker().args(["pull", &reference]),
        "docker pull as bob",
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        err.contains("denied") || err.contains("may not pull"),
        "{err}"
    );
}

/// Private content on an htpasswd-protected real registry: regcache pulls with its own
/// account (carol). alice may pull private/** and public/**, bob only public/**.
///
/// - bob (or anyone anonymous) asking for private/secret: 403 (rule) / 401, nothing upstream.
/// - bob asking for private/secret's digests through public/x, where upstream does not have
///   them: 404 `MANIFEST_UNKNOWN` / `BLOB_UNKNOWN`, after one upstream `HEAD` each (no GET),
///   so nothing cached through private/secret leaks.
/// - a layer public/shared really holds (upstream's HEAD says so) is served from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_private_content_is_served_only_where_upstream_would_serve_it() {
    set_bot_env();
    const CAROL: (&str, &str) = ("carol", "carol-secret");
    let up = BasicRegistry::start(&[CAROL]).await;
    let shared_layer = Layer::new(84_000, 20_000);
    let secret = Image::new(
        DOCKER_V2,
        "amd64",
        vec![shared_layer.clone(), Layer::new(84_001, 10_000)],
    );
    let public = Image::simple(842, 1);
    let shared = Image::new(DOCKER_V2, "amd64", vec![shared_layer.clone()]);
    up.push("private/secret", "1", &secret).await;
    up.push("public/x", "1", &public).await;
    up.push("public/shared", "1", &shared).await;
    let meter = Meter::start(up.registry.addr).await;
    let s = Secrets::new();
    let cache = regcache(&format!(
        "{}{}",
        upstream_toml(
            "docker.io",
            &meter.url(),
            &format!("username = \"{}\"\npassword = \"{}\"", CAROL.0, CAROL.1)
        ),
        auth_toml(
            &s,
            "[[auth.rules]]\ngroups = [\"devs\"]\nrepos = [\"private/**\", \"public/**\"]\n\
             [[auth.rules]]\nusers = [\"bob\"]\nrepos = [\"public/**\"]\n"
        )
    ))
    .await;
    let base = cache.url();
    let (alice, bob) = (basic(ALICE.0, ALICE.1), basic(BOB.0, BOB.1));
    assert_eq!(
        pull_as(&base, "private/secret", "1", Some(&alice)).await,
        secret.digest()
    );
    meter.reset();

    let digests = [
        ("manifests", secret.digest(), "MANIFEST_UNKNOWN"),
        ("blobs", image::sha256(&secret.config), "BLOB_UNKNOWN"),
        ("blobs", secret.layers[1].digest(), "BLOB_UNKNOWN"),
    ];
    for (kind, d, _) in &digests {
        let url = format!("{base}/v2/private/secret/{kind}/{d}");
        let (status, code, ..) = refusal(get(url.clone(), Some(&bob)).await).await;
        assert_eq!((status, code.as_str()), (403, "DENIED"), "bob: {url}");
        let (status, code, ..) = refusal(get(url.clone(), None).await).await;
        assert_eq!(
            (status, code.as_str()),
            (401, "UNAUTHORIZED"),
            "anonymous: {url}"
        );
    }
    assert_eq!(meter.total(), 0, "refused before any upstream contact");

    for (kind, d, want) in &digests {
        let url = format!("{base}/v2/public/x/{kind}/{d}");
        let (status, code, ..) = refusal(get(url.clone(), Some(&bob)).await).await;
        assert_eq!(
            (status, code.as_str()),
            (404, *want),
            "bob via public/x: {url}"
        );
    }
    let seen: Vec<String> = meter
        .requests()
        .iter()
        .map(|s| format!("{} {}", s.method, s.path))
        .collect();
    assert_eq!(
        meter.count("HEAD", "/v2/public/x/"),
        3,
        "one upstream HEAD per digest asked for through public/x: {seen:?}"
    );
    assert_eq!(
        meter.count("GET", "/v2/"),
        0,
        "no content fetched: {seen:?}"
    );

    // A layer public/shared really holds: upstream confirms with a HEAD, the cache serves it.
    meter.reset();
    assert_eq!(
        pull_as(&base, "public/shared", "1", Some(&bob)).await,
        shared.digest()
    );
    let layer = shared_layer.digest();
    assert_eq!(
        meter.count("HEAD", &format!("/v2/public/shared/blobs/{layer}")),
        1
    );
    assert_eq!(meter.count("GET", &layer), 0, "served from the cache");
    // Now known: no more upstream contact for it.
    meter.reset();
    common::get_blob_as(&base, "public/shared", &layer, Some(&bob)).await;
    assert_eq!(meter.total(), 0);

    let m = Scrape::of(&base).await;
    assert_eq!(
        m.get("regcache_access_denied_total", &[("reason", "isolation")]),
        3.0
    );
}

/// `verify_access = true`: a digest removed from the repository upstream stops being served
/// from the cache once `tag_ttl` has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_access_notices_a_digest_removed_upstream() {
    set_bot_env();
    const CAROL: (&str, &str) = ("carol", "carol-secret");
    let up = BasicRegistry::start(&[CAROL]).await;
    let img = Image::simple(851, 1);
    up.push("private/app", "1", &img).await;
    let meter = Meter::start(up.registry.addr).await;
    let cache = regcache(&format!(
        "[cache]\ntag_ttl = \"1s\"\n{}",
        upstream_toml(
            "docker.io",
            &meter.url(),
            &format!(
                "username = \"{}\"\npassword = \"{}\"\nverify_access = true",
                CAROL.0, CAROL.1
            )
        ),
    ))
    .await;
    let base = cache.url();
    assert_eq!(pull_as(&base, "private/app", "1", None).await, img.digest());
    let layer = img.layers[0].digest();
    // Within tag_ttl: served, no upstream contact.
    meter.reset();
    common::get_blob_as(&base, "private/app", &layer, None).await;
    assert_eq!(meter.total(), 0, "{:?}", meter.requests());
    // Removed upstream (as the admin).
    let resp = http()
        .delete(format!(
            "{}/v2/private/app/blobs/{layer}",
            up.registry.url()
        ))
        .header(
            "authorization",
            basic(common::token::ADMIN.0, common::token::ADMIN.1),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202, "{:?}", resp.text().await);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (status, code) = error_code(
        http()
            .get(format!("{base}/v2/private/app/blobs/{layer}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, code.as_str()), (404, "BLOB_UNKNOWN"));
    assert_eq!(meter.count("HEAD", &layer), 1);
    assert_eq!(meter.count("GET", &layer), 0);
}
