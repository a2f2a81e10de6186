//! The command line: `check-config` and `resolve`, run as the real binary.

use std::process::Command;

fn regcache(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(args)
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
    assert!(out.contains("ok (3 upstreams, default docker.io)"), "{out}");

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
