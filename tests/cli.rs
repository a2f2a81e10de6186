//! The command line, run as the real binary: `check-config`, `resolve`, `health`, `--version`,
//! and where `serve` takes its settings from (flag > environment > file > default).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

/// The binary with no `REGCACHE_*` variables from the test's own environment.
fn binary() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_regcache"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("REGCACHE_") {
            c.env_remove(k);
        }
    }
    c
}

fn regcache(args: &[&str]) -> (bool, String) {
    regcache_env(args, &[])
}

fn regcache_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = binary()
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

const CONFIG: &str = r#"
default_upstream = "docker.io"
[upstreams."docker.io"]
urls = ["https://registry-1.docker.io"]
[upstreams.ghcr]
urls = ["https://ghcr.io"]
[upstreams.corp]
urls = ["https://dockerhub.example.com:5100"]
[aliases]
myapp = "ghcr.io/team/myapp"
"#;

#[test]
fn resolve_explains_every_routing_way() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("regcache.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let cfg = cfg.to_str().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["alpine"],
            &[
                "upstream:   docker.io",
                "repository: library/alpine",
                "reference:  latest",
                "url:        https://registry-1.docker.io/v2/library/alpine/manifests/latest",
            ],
        ),
        (
            &["docker.io/library/nginx:1.27"],
            &[
                "upstream:   docker.io",
                "repository: library/nginx",
                "reference:  1.27",
            ],
        ),
        (
            &[
                "ghcr.io/org/app:1.0@sha256:1b1f8d7d2c8b5e8a3b8e5fb0a0b0e1b7b4a8e8f1c2d3e4f5a6b7c8d9e0f1a2b3",
            ],
            &[
                "upstream:   ghcr",
                "repository: org/app",
                "reference:  sha256:1b1f8d7d",
            ],
        ),
        (
            &["dockerhub.example.com:5100/com.example.namespace/centos7-elasticsearch:latest"],
            &[
                "upstream:   corp",
                "repository: com.example.namespace/centos7-elasticsearch",
                "url:        https://dockerhub.example.com:5100/v2/com.example.namespace/centos7-elasticsearch/manifests/latest",
            ],
        ),
        (
            &["myapp:2"],
            &[
                "upstream:   ghcr",
                "repository: team/myapp",
                "why:        alias",
            ],
        ),
        (
            &["--ns", "ghcr.io", "owner/img"],
            &[
                "upstream:   ghcr",
                "repository: owner/img",
                "containerd ns=ghcr.io",
            ],
        ),
    ];
    for (args, wants) in cases {
        let mut all = vec!["resolve", "--config", cfg];
        all.extend_from_slice(args);
        let (ok, out) = regcache(&all);
        assert!(ok, "{args:?}: {out}");
        for w in *wants {
            assert!(out.contains(w), "{args:?}: missing {w:?} in\n{out}");
        }
    }
    for (bad, why) in [
        (
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/api:2",
            "no upstream is configured",
        ),
        ("Upper/Case", "not an image reference"),
        ("a//b", "not an image reference"),
    ] {
        let (ok, out) = regcache(&["resolve", "--config", cfg, bad]);
        assert!(!ok, "{bad} should fail");
        assert!(out.contains(why), "{bad}: {out}");
    }
}

#[test]
fn check_config_reports_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, CONFIG).unwrap();
    let (ok, out) = regcache(&["check-config", good.to_str().unwrap()]);
    assert!(ok, "{out}");
    for w in [
        "good.toml: ok",
        "upstream:    docker.io (default) -> https://registry-1.docker.io",
        "upstream:    corp -> https://dockerhub.example.com:5100",
    ] {
        assert!(out.contains(w), "missing {w:?} in:\n{out}");
    }

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "default_upstream = \"nope\"\n[upstreams.a]\nurls = []\nmax_concurrent = 0\n",
    )
    .unwrap();
    let (ok, out) = regcache(&["check-config", bad.to_str().unwrap()]);
    assert!(!ok);
    for w in ["default_upstream", "upstreams.\"a\".urls", "max_concurrent"] {
        assert!(out.contains(w), "missing {w}: {out}");
    }
    // The embedded default is valid.
    let (ok, out) = regcache(&[
        "check-config",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/regcache.toml"),
    ]);
    assert!(ok, "{out}");
}

#[test]
fn check_config_explains_typos_bad_values_and_variables_with_key_path_and_hint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("typo.toml");
    std::fs::write(
        &cfg,
        "[cache]\ntag_tll = \"5m\"\nmax_size = \"lots\"\n[upstreams.\"docker.io\"]\nurls = [\"https://registry-1.docker.io\"]\nbreaker_open_for = \"15 fortnights\"\n",
    )
    .unwrap();
    let (ok, out) = regcache_env(
        &["check-config", cfg.to_str().unwrap()],
        &[("REGCACHE_CACHE__OFFLINE", "maybe")],
    );
    assert!(!ok, "{out}");
    for w in [
        "cache.tag_tll: unknown key; did you mean `tag_ttl`?",
        "cache.max_size: ",
        "hint: a number of bytes or a number with a unit: \"512MiB\"",
        "upstreams.\"docker.io\".breaker_open_for: ",
        "hint: a number with a unit: \"30s\", \"5m\"",
        "cache.offline: ",
        "(set by REGCACHE_CACHE__OFFLINE)",
        "hint: true or false",
    ] {
        assert!(out.contains(w), "missing {w:?} in:\n{out}");
    }

    // Without a file: the embedded default, with variables applied and named.
    let (ok, out) = regcache_env(
        &["check-config"],
        &[
            ("REGCACHE_LISTEN", "0.0.0.0:5123"),
            ("REGCACHE_UPSTREAMS__DOCKER_IO__URLS", "http://127.0.0.1:1"),
        ],
    );
    assert!(ok, "{out}");
    for w in [
        "<embedded>: ok",
        "environment: ",
        "REGCACHE_LISTEN",
        "listen:      0.0.0.0:5123",
        "upstream:    docker.io (default) -> http://127.0.0.1:1",
    ] {
        assert!(out.contains(w), "missing {w:?} in:\n{out}");
    }
}

#[test]
fn check_config_refuses_values_that_would_panic_or_hang_and_names_each() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("range.toml");
    std::fs::write(
        &cfg,
        "[cache]\ntag_ttl = \"2000years\"\ngc_interval = \"0s\"\n[auth]\ncache_ttl = \"2000years\"\n[upstreams.\"docker.io\"]\nurls = [\"https://registry-1.docker.io\"]\nconnect_timeout = \"0s\"\nbreaker_open_for = \"1000000years\"\n",
    )
    .unwrap();
    let (ok, out) = regcache(&["check-config", cfg.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(!out.contains("panicked"), "{out}");
    for w in [
        "cache.tag_ttl: \"2000years\" is too long; at most \"100years\"",
        "cache.gc_interval: must be more than zero",
        "auth.cache_ttl: \"2000years\" is too long; at most \"100years\"",
        "upstreams.\"docker.io\".connect_timeout: must be more than zero",
        "upstreams.\"docker.io\".breaker_open_for: \"1000000years\" is too long; at most \"1day\"",
    ] {
        assert!(out.contains(w), "missing {w:?} in:\n{out}");
    }

    // A variable wrong as TOML and as text is named with its key, once each.
    let (ok, out) = regcache_env(
        &["check-config"],
        &[
            ("REGCACHE_CACHE__OFFLINE", "1"),
            ("REGCACHE_LISTEN", "5000"),
        ],
    );
    assert!(!ok, "{out}");
    for w in [
        "cache.offline: invalid type: integer `1`, expected a boolean (set by REGCACHE_CACHE__OFFLINE)",
        "listen: invalid socket address syntax (set by REGCACHE_LISTEN)",
    ] {
        assert_eq!(out.matches(w).count(), 1, "want {w:?} once in:\n{out}");
    }
}

#[test]
fn version_names_the_git_commit_it_was_built_from() {
    let (ok, out) = regcache(&["--version"]);
    assert!(ok, "{out}");
    let git = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git (Debian package git) runs");
    assert!(git.status.success(), "the tests run in a git checkout");
    let commit = String::from_utf8_lossy(&git.stdout).trim().to_owned();
    assert_eq!(
        out.trim(),
        format!("regcache {} ({commit})", env!("CARGO_PKG_VERSION"))
    );
}

/// A `regcache serve` process, killed on drop.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(args: &[&str], env: &[(&str, &str)]) -> Served {
    Served(
        binary()
            .arg("serve")
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Waits until `regcache health --addr` succeeds against `port`.
fn healthy(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let (ok, _) = regcache(&["health", "--addr", &format!("127.0.0.1:{port}")]);
        if ok {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn serve_takes_flags_over_environment_over_file_over_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let [file_port, env_port, flag_port] = [0; 3].map(|_| common::free_port());
    let cfg = dir.path().join("regcache.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{file_port}\"\ndata_dir = \"{}\"\n[upstreams.\"docker.io\"]\nurls = [\"http://127.0.0.1:1\"]\n",
            dir.path().join("from-file").display()
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let env_data = dir.path().join("from-env");
    let env_data = env_data.to_str().unwrap();

    // File alone.
    let s = serve(&["--config", cfg], &[]);
    assert!(healthy(file_port), "listening on the file's port");
    drop(s);
    assert!(dir.path().join("from-file/blobs").is_dir());

    // The environment over the file (the config file named by a variable too).
    let s = serve(
        &[],
        &[
            ("REGCACHE_CONFIG", cfg),
            ("REGCACHE_LISTEN", &format!("127.0.0.1:{env_port}")),
            ("REGCACHE_DATA_DIR", env_data),
        ],
    );
    assert!(healthy(env_port), "listening on the variable's port");
    let (ok, out) = regcache_env(&["health", "--ready"], &[("REGCACHE_CONFIG", cfg)]);
    assert!(!ok, "the file's port is not served: {out}");
    drop(s);
    assert!(dir.path().join("from-env/blobs").is_dir());

    // A flag over the environment.
    let s = serve(
        &[
            "--config",
            cfg,
            "--listen",
            &format!("127.0.0.1:{flag_port}"),
        ],
        &[("REGCACHE_LISTEN", &format!("127.0.0.1:{env_port}"))],
    );
    assert!(healthy(flag_port), "listening on the flag's port");
    let (ok, out) = regcache(&[
        "health",
        "--ready",
        "--addr",
        &format!("127.0.0.1:{flag_port}"),
    ]);
    assert!(ok && out.contains("/readyz"), "{out}");
    drop(s);

    // A bad variable stops `serve` with the key and the variable named.
    let out = binary()
        .args(["serve", "--config", cfg])
        .env("REGCACHE_CACHE__TAG_TTL", "soon")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cache.tag_ttl") && err.contains("REGCACHE_CACHE__TAG_TTL"),
        "{err}"
    );
}

#[test]
fn serve_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let port = common::free_port();
    let s = serve(
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
        ],
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("a READY notification");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    // Ready means the listener is bound: the very next request is answered.
    let (ok, out) = regcache(&["health", "--addr", &format!("127.0.0.1:{port}")]);
    assert!(ok, "{out}");

    let pid = s.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let n = socket.recv(&mut buf).expect("a STOPPING notification");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg}");
}

#[test]
fn check_config_warns_when_a_file_with_secrets_is_world_readable() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("secret.toml");
    std::fs::write(
        &cfg,
        "[upstreams.\"docker.io\"]\nurls = [\"https://registry-1.docker.io\"]\nusername = \"bot\"\npassword = \"hunter2\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, out) = regcache(&["check-config", cfg.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(
        out.contains("readable by every user (mode 644)")
            && out.contains("upstreams.\"docker.io\".password"),
        "{out}"
    );
    assert!(
        !out.contains("hunter2"),
        "the secret itself is never shown: {out}"
    );
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (ok, out) = regcache(&["check-config", cfg.to_str().unwrap()]);
    assert!(ok && !out.contains("warning"), "{out}");
}
