//! The deployment files in `deploy/` and the `Dockerfile` agree with each other and with the
//! binary: ports, probe paths, the Service address the node files name, the systemd unit
//! (`systemd-analyze verify` and `security`), and the Kubernetes config passing `check-config`
//! and answering the probe paths on the ports the manifests use.
//!
//! YAML is checked by reading the few keys that matter line by line (no YAML parser among the
//! dependencies); TOML and JSON are parsed.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn toml_file(rel: &str) -> toml::Table {
    read(rel)
        .parse()
        .unwrap_or_else(|e| panic!("{rel} is not TOML: {e}"))
}

fn port_of(addr: &str) -> u16 {
    addr.parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("{addr:?}: {e}"))
        .port()
}

/// The lines of the first mapping entry `key:` (at any indent) and everything nested under it.
fn block<'a>(yaml: &'a str, key: &str) -> Vec<&'a str> {
    let mut lines = yaml.lines();
    let start = lines
        .by_ref()
        .find(|l| l.trim_start().trim_start_matches("- ") == format!("{key}:"))
        .unwrap_or_else(|| panic!("no `{key}:` in\n{yaml}"));
    let indent = start.len() - start.trim_start().len();
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
        .collect()
}

/// Values of `key: value` lines (list items too), comments and quotes stripped.
fn values(lines: &[&str], key: &str) -> Vec<String> {
    let prefix = format!("{key}:");
    lines
        .iter()
        .map(|l| l.trim_start().trim_start_matches("- "))
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|v| {
            v.split(" #")
                .next()
                .unwrap()
                .trim()
                .trim_matches('"')
                .to_owned()
        })
        .collect()
}

fn value(lines: &[&str], key: &str) -> String {
    let v = values(lines, key);
    assert_eq!(v.len(), 1, "expected one `{key}:` in\n{}", lines.join("\n"));
    v.into_iter().next().unwrap()
}

/// containerPort by port name in the StatefulSet.
fn container_ports(sts: &str) -> Vec<(String, u16)> {
    let ports = block(sts, "ports");
    let names = values(&ports, "name");
    let numbers = values(&ports, "containerPort");
    assert_eq!(names.len(), numbers.len(), "{}", ports.join("\n"));
    names
        .into_iter()
        .zip(numbers.iter().map(|n| n.parse().unwrap()))
        .collect()
}

#[test]
fn kubernetes_manifests_agree_with_their_config() {
    let config = toml_file("deploy/kubernetes/regcache.toml");
    let listen = port_of(config["listen"].as_str().unwrap());
    let metrics = port_of(config["metrics_listen"].as_str().unwrap());
    let sts = read("deploy/kubernetes/statefulset.yaml");

    let ports = container_ports(&sts);
    assert_eq!(
        ports,
        [("registry".into(), listen), ("metrics".into(), metrics)]
    );
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let b = block(&sts, probe);
        assert_eq!(value(&b, "path"), path, "{probe}");
        assert_eq!(value(&b, "port"), "registry", "{probe}");
    }
    let mounts = block(&sts, "volumeMounts");
    let paths = values(&mounts, "mountPath");
    assert!(
        paths.contains(&config["data_dir"].as_str().unwrap().to_owned()),
        "data_dir is not a mounted volume: {paths:?}"
    );
    assert!(sts.contains("\"/etc/regcache/regcache.toml\""));

    let svc = read("deploy/kubernetes/service.yaml");
    let svc_ports = block(&svc, "ports");
    assert_eq!(
        values(&svc_ports, "port"),
        [listen.to_string(), metrics.to_string()]
    );
    assert_eq!(values(&svc_ports, "targetPort"), ["registry", "metrics"]);

    let sm = read("deploy/kubernetes/servicemonitor.yaml");
    let ep = block(&sm, "endpoints");
    assert_eq!(value(&ep, "port"), "metrics");
    assert_eq!(value(&ep, "path"), "/metrics");

    // The cache bound leaves room on the volume.
    let max = regcache::config::parse_size(config["cache"]["max_size"].as_str().unwrap()).unwrap();
    let storage = value(&block(&sts, "volumeClaimTemplates"), "storage");
    let gib: u64 = storage.strip_suffix("Gi").unwrap().parse().unwrap();
    assert!(max < gib << 30, "cache.max_size {max} >= volume {storage}");
}

#[test]
fn node_files_name_the_service_address_and_configured_upstreams() {
    let config = toml_file("deploy/kubernetes/regcache.toml");
    let upstreams = config["upstreams"].as_table().unwrap();
    let svc = read("deploy/kubernetes/service.yaml");
    let ip = value(&svc.lines().collect::<Vec<_>>(), "clusterIP");
    let mirror = format!(
        "http://{ip}:{}",
        port_of(config["listen"].as_str().unwrap())
    );

    let dir = root().join("deploy/kubernetes/node/certs.d");
    let mut registries = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let registry = entry.unwrap().file_name().into_string().unwrap();
        let rel = format!("deploy/kubernetes/node/certs.d/{registry}/hosts.toml");
        let hosts = toml_file(&rel);
        assert!(
            upstreams.contains_key(&registry),
            "{rel}: {registry} is not an upstream in deploy/kubernetes/regcache.toml"
        );
        let urls = upstreams[&registry]["urls"].as_array().unwrap();
        assert_eq!(hosts["server"].as_str(), urls[0].as_str(), "{rel}: server");
        let host = hosts["host"].as_table().unwrap();
        assert_eq!(host.keys().collect::<Vec<_>>(), [&mirror], "{rel}");
        registries.push(registry);
    }
    registries.sort();
    let mut configured: Vec<_> = upstreams.keys().cloned().collect();
    configured.sort();
    assert_eq!(registries, configured, "one certs.d directory per upstream");

    // k3s: the same registries, on the address its docs tell to use instead.
    let k3s = read("deploy/kubernetes/node/k3s-registries.yaml");
    let mirrors = block(&k3s, "mirrors").join("\n");
    for registry in &registries {
        let b = block(&mirrors, registry);
        assert_eq!(
            value(&b, "endpoint"),
            format!("[\"{}\"]", mirror.replace(&ip, "10.43.0.50")),
            "k3s {registry}"
        );
    }

    let kind = read("deploy/kubernetes/node/kind-cluster.yaml");
    assert!(kind.contains("config_path = \"/etc/containerd/certs.d\""));
    for p in values(&kind.lines().collect::<Vec<_>>(), "hostPath") {
        assert!(p.ends_with("/deploy/kubernetes/node/certs.d"), "{p}");
    }
    assert!(
        ip.starts_with("10.96."),
        "kind's service range is 10.96.0.0/12: {ip}"
    );
}

#[test]
fn kustomization_names_files_that_exist() {
    let k = read("deploy/kubernetes/kustomization.yaml");
    let lines: Vec<_> = k.lines().collect();
    for rel in block(&k, "resources")
        .iter()
        .chain(block(&k, "files").iter())
        .map(|l| l.trim())
        .filter_map(|l| l.strip_prefix("- "))
    {
        assert!(
            root().join("deploy/kubernetes").join(rel).is_file(),
            "kustomization.yaml names a missing {rel}"
        );
    }
    assert_eq!(
        value(&block(&k, "configMapGenerator"), "name"),
        "regcache-config"
    );
    assert!(read("deploy/kubernetes/statefulset.yaml").contains("name: regcache-config"));
    assert!(values(&lines, "namespace").contains(&"regcache".to_owned()));
}

#[test]
fn dockerfile_agrees_with_the_kubernetes_config() {
    let config = toml_file("deploy/kubernetes/regcache.toml");
    let listen = port_of(config["listen"].as_str().unwrap());
    let metrics = port_of(config["metrics_listen"].as_str().unwrap());
    let df = read("Dockerfile");
    assert!(df.contains(&format!("EXPOSE {listen} {metrics}")));
    assert!(df.contains(&format!("REGCACHE_LISTEN=0.0.0.0:{listen}")));
    assert!(df.contains(&format!("REGCACHE_METRICS_LISTEN=0.0.0.0:{metrics}")));
    assert!(df.contains(r#"CMD ["/usr/local/bin/regcache", "health"]"#));
    let data_dir = config["data_dir"].as_str().unwrap();
    assert!(df.contains(&format!("REGCACHE_DATA_DIR={data_dir}")));
    assert!(df.contains(&format!("VOLUME {data_dir}")));
    assert!(df.contains("USER 65532:65532"));
    assert!(read("deploy/kubernetes/statefulset.yaml").contains("runAsUser: 65532"));
    // Everything cargo needs to build is in the build context.
    let ignore = read(".dockerignore");
    for needed in ["Cargo.toml", "Cargo.lock", "src/", "benches/", "config/"] {
        assert!(
            ignore.contains(&format!("!{needed}")),
            ".dockerignore drops {needed}"
        );
    }
    if root().join("build.rs").exists() {
        assert!(ignore.contains("!build.rs"));
    }
}

#[test]
fn grafana_dashboard_is_json() {
    let text = read("deploy/grafana/regcache-dashboard.json");
    let _: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
}

fn http_get(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    answer.split(' ').nth(1)?.parse().ok()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The binary with no `REGCACHE_*` variables from this environment: they are config overrides,
/// and `cargo test` passes the build script's `REGCACHE_GIT_COMMIT` on to tests.
fn regcache() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regcache"));
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("REGCACHE_") {
            cmd.env_remove(var);
        }
    }
    cmd
}

/// The binary accepts the Kubernetes config and answers the probe and scrape paths on the two
/// ports, as the manifests expect.
#[test]
fn kubernetes_config_serves_the_probe_paths() {
    let rel = "deploy/kubernetes/regcache.toml";
    let out = regcache()
        .args(["check-config"])
        .arg(root().join(rel))
        .output()
        .unwrap();
    assert!(out.status.success(), "check-config {rel}: {out:?}");

    // The same file on loopback ports and a temp data dir.
    let dir = tempfile::tempdir().unwrap();
    let (api, metrics) = (free_port(), free_port());
    let text = read(rel)
        .replace("0.0.0.0:5000", &format!("127.0.0.1:{api}"))
        .replace("0.0.0.0:9090", &format!("127.0.0.1:{metrics}"))
        .replace(
            "/var/lib/regcache",
            &dir.path().join("data").display().to_string(),
        );
    let config = dir.path().join("regcache.toml");
    std::fs::write(&config, text).unwrap();
    let mut child = regcache()
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let api: SocketAddr = ([127, 0, 0, 1], api).into();
    let metrics: SocketAddr = ([127, 0, 0, 1], metrics).into();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(api, "/readyz") != Some(200) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let answers: Vec<_> = [(api, "/healthz"), (api, "/readyz"), (metrics, "/healthz")]
        .into_iter()
        .chain([(metrics, "/readyz"), (metrics, "/metrics")])
        .map(|(a, p)| (a.port(), p, http_get(a, p)))
        .collect();
    child.kill().unwrap();
    child.wait().unwrap();
    for (port, path, status) in answers {
        assert_eq!(status, Some(200), "GET :{port}{path}");
    }
}

fn systemd_analyze() -> &'static str {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "systemd-analyze not found: install the Debian package `systemd` to check deploy/systemd"
    );
    "systemd-analyze"
}

/// The unit with its binary paths pointing at the built binary.
fn unit_copy(dir: &Path) -> PathBuf {
    let unit = read("deploy/systemd/regcache.service")
        .replace("/usr/local/bin/regcache", env!("CARGO_BIN_EXE_regcache"));
    let path = dir.join("regcache.service");
    std::fs::write(&path, unit).unwrap();
    path
}

#[test]
fn systemd_unit_verifies() {
    let tool = systemd_analyze();
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let out = Command::new(tool)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<_> = stderr
        .lines()
        .filter(|l| l.contains("regcache.service"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}

#[test]
fn systemd_unit_is_sandboxed() {
    let tool = systemd_analyze();
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let out = Command::new(tool)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("--offline"),
        "systemd-analyze security --offline needs systemd 252 or newer: {stderr}"
    );
    let level: f64 = stdout
        .lines()
        .find_map(|l| l.split("exposure level for regcache.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in\n{stdout}\n{stderr}"));
    assert!(level <= 2.0, "exposure {level} (was 1.4):\n{stdout}");
}

#[test]
fn scale_out_overlay_is_the_base_plus_a_shared_bucket() {
    let base = toml_file("deploy/kubernetes/regcache.toml");
    let mut scale = toml_file("deploy/kubernetes/scale-out/regcache.toml");
    let storage = scale.remove("storage").expect("a [storage] table");
    assert_eq!(
        scale, base,
        "apart from [storage], the overlay's config is the base's"
    );
    assert_eq!(storage["kind"].as_str(), Some("s3"));

    // The secret file the config names is the one the patch mounts.
    let patch = read("deploy/kubernetes/scale-out/statefulset-patch.yaml");
    let secret_file = storage["s3"]["secret_access_key_file"].as_str().unwrap();
    let mount = value(&block(&patch, "volumeMounts"), "mountPath");
    let item = value(&block(&patch, "items"), "path");
    assert_eq!(secret_file, format!("{mount}/{item}"));
    assert!(patch.contains("name: REGCACHE_STORAGE__S3__ACCESS_KEY_ID"));

    // check-config accepts it once the mounted secret exists.
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret_access_key");
    std::fs::write(&secret, "s3cr3t\n").unwrap();
    let text = read("deploy/kubernetes/scale-out/regcache.toml")
        .replace(secret_file, secret.to_str().unwrap());
    let config = regcache::Config::parse(&text, Path::new("scale-out/regcache.toml")).unwrap();
    config.validate().unwrap();

    let k = read("deploy/kubernetes/scale-out/kustomization.yaml");
    for rel in ["regcache.toml", "statefulset-patch.yaml"] {
        assert!(k.contains(rel), "kustomization.yaml uses {rel}");
    }
    assert!(k.contains("- ../"), "the overlay builds on the base");
}
