//! Upstream secrets stay secret: a password given through `password_env` (or inline) never
//! shows in regcache's logs (at trace level), its metrics, or the error bodies clients get,
//! neither in clear nor as the Basic credentials it is sent as; what a failing credential
//! helper prints stays out of error bodies too. The upstream is a real `docker-registry`
//! behind htpasswd.

mod common;

use std::process::{Child, Command, Stdio};

use common::Image;
use common::token::{BasicRegistry, basic};

const USER: &str = "robot";
const PASSWORD: &str = "Tr0ub4dor-and-3-horses";

/// `regcache serve` as a process logging everything of its own at trace level to a file.
struct Traced {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Traced {
    async fn start(config: &str, env: &[(&str, &str)]) -> Traced {
        let dir = tempfile::tempdir().unwrap();
        let port = common::free_port();
        let file = dir.path().join("regcache.toml");
        std::fs::write(
            &file,
            format!(
                "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n{config}",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_regcache"))
            .args(["serve", "--config"])
            .arg(&file)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "trace")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        common::wait_http(&format!("http://127.0.0.1:{port}/v2/"), "regcache").await;
        Traced { child, port, dir }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap()
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Panics if `text` (named `what`) holds the password in any form it travels in.
fn assert_clean(what: &str, text: &str) {
    let basic = basic(USER, PASSWORD);
    let encoded = basic.trim_start_matches("Basic ");
    for secret in [PASSWORD, encoded] {
        assert!(
            !text.contains(secret),
            "{what} shows the secret {secret:?}:\n{}",
            text.lines()
                .filter(|l| l.contains(secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_password_never_shows_in_logs_metrics_or_error_bodies() {
    let up = BasicRegistry::start(&[(USER, PASSWORD)]).await;
    let img = Image::simple(830, 2);
    up.push("corp/app", "1", &img).await;
    let upstream = format!(
        "[upstreams.\"docker.io\"]\nurls = [\"{}\"]\nusername = \"{USER}\"\n",
        up.registry.url()
    );

    // The password from the variable `password_env` names: the pull works.
    let good = Traced::start(
        &format!("{upstream}password_env = \"HUB_PASSWORD\"\n"),
        &[("HUB_PASSWORD", PASSWORD)],
    )
    .await;
    assert_eq!(
        common::pull(&good.url(), "corp/app", "1").await,
        img.digest()
    );
    let metrics = common::http()
        .get(format!("{}/metrics", good.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("regcache_upstream_requests_total"));
    assert_clean("/metrics", &metrics);
    let log = good.log();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "the log is verbose"
    );
    assert_clean("the trace log of a good pull", &log);
    drop(good);

    // Upstream refuses the credentials (the user's password changed): clients get a clear
    // error, and neither it nor the log shows what was tried.
    up.set_users(&[(USER, "a-new-password")]);
    let refused = Traced::start(&format!("{upstream}password = \"{PASSWORD}\"\n"), &[]).await;
    let resp = common::get_manifest(&refused.url(), "corp/app", "1").await;
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("DENIED"), "{body}");
    assert_clean("the error body", &body);
    let blob = common::http()
        .get(format!(
            "{}/v2/corp/app/blobs/{}",
            refused.url(),
            common::image::sha256(&img.config)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(blob.status(), 403);
    assert_clean("a blob error body", &blob.text().await.unwrap());
    assert_clean("the trace log of a refused pull", &refused.log());
}

/// What a credential helper prints when it fails can be a secret (helpers echo tokens, config
/// and keychain dumps): clients get a plain "credentials unavailable", never the helper's
/// output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_credential_helpers_output_never_reaches_clients() {
    use std::os::unix::fs::PermissionsExt as _;
    const LEAK: &str = "s3cr3t-from-helper";
    let up = BasicRegistry::start(&[(USER, PASSWORD)]).await;
    let img = Image::simple(831, 1);
    up.push("corp/app", "1", &img).await;
    let bin = tempfile::tempdir().unwrap();
    let runs = bin.path().join("runs");
    let helper = bin.path().join("docker-credential-leaky");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\necho run >> '{}'\necho '{LEAK} on stdout'\necho '{LEAK} on stderr' >&2\nexit 1\n",
            runs.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = std::env::join_paths(std::iter::once(bin.path().to_owned()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .unwrap();
    let cache = Traced::start(
        &format!(
            "[upstreams.\"docker.io\"]\nurls = [\"{}\"]\ncredential_helper = \"leaky\"\n",
            up.registry.url()
        ),
        &[("PATH", path.to_str().unwrap())],
    )
    .await;

    let manifest = common::get_manifest(&cache.url(), "corp/app", "1").await;
    let blob = common::http()
        .get(format!(
            "{}/v2/corp/app/blobs/{}",
            cache.url(),
            common::image::sha256(&img.config)
        ))
        .send()
        .await
        .unwrap();
    for (what, resp) in [("manifest", manifest), ("blob", blob)] {
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap();
        assert!(
            !body.contains(LEAK),
            "the {what} error body shows the helper's output: {body}"
        );
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{what}: not an OCI error body ({e}): {body}"));
        assert_eq!(
            (status, v["errors"][0]["code"].as_str()),
            (502, Some("UNAVAILABLE")),
            "{what}: {body}"
        );
        assert!(
            v["errors"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("credentials")),
            "{what}: the message says what is wrong: {body}"
        );
    }
    assert!(
        std::fs::read_to_string(&runs).is_ok_and(|r| r.lines().count() >= 2),
        "the helper ran for each request (so its failure is what was answered):\n{}",
        cache.log()
    );
}
