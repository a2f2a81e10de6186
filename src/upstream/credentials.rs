//! Where an upstream's credentials come from: fixed in the config, a password file, a Docker
//! credential helper (`docker-credential-<name> get`), or a Docker `config.json`; per upstream
//! and per repository prefix inside it.
//!
//! Credentials that can change (helper, file, Docker config) are reused for `credential_ttl` and
//! fetched again at once when upstream refuses them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use http::HeaderValue;
use serde::Deserialize;
use tokio::io::AsyncWriteExt as _;

use super::auth::basic;
use crate::config::{RepoCredentials, UpstreamConfig};
use crate::oci::reference::RepoName;

/// A credential helper that takes longer than this is treated as failing.
const HELPER_TIMEOUT: Duration = Duration::from_secs(20);

/// One way of getting a username and secret.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Source {
    Static { username: String, password: String },
    PasswordFile { username: String, path: PathBuf },
    Helper(String),
    DockerConfig(PathBuf),
}

/// Never prints a password.
impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Static { username, .. } => write!(f, "Static({username}, <redacted>)"),
            Source::PasswordFile { username, path } => {
                write!(f, "PasswordFile({username}, {})", path.display())
            }
            Source::Helper(h) => write!(f, "Helper({h})"),
            Source::DockerConfig(p) => write!(f, "DockerConfig({})", p.display()),
        }
    }
}

impl Source {
    fn from_parts(
        username: Option<&str>,
        password: Option<&str>,
        password_file: Option<&Path>,
        helper: Option<&str>,
        docker_config: Option<&Path>,
    ) -> Option<Source> {
        if let Some(h) = helper {
            return Some(Source::Helper(h.to_owned()));
        }
        if let Some(p) = docker_config {
            return Some(Source::DockerConfig(p.to_owned()));
        }
        let username = username?.to_owned();
        Some(match password_file {
            Some(path) => Source::PasswordFile {
                username,
                path: path.to_owned(),
            },
            None => Source::Static {
                username,
                password: password.unwrap_or_default().to_owned(),
            },
        })
    }

    /// Whether the credentials can change while regcache runs.
    pub fn is_dynamic(&self) -> bool {
        !matches!(self, Source::Static { .. })
    }
}

/// Why no credentials could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialError {
    #[error("credential helper docker-credential-{helper}: {reason}")]
    Helper { helper: String, reason: String },
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
}

/// An upstream's credential sources.
pub struct Credentials {
    /// What helpers and Docker configs are asked for (`host:port`, or Docker Hub's index URL).
    server: String,
    default: Option<Source>,
    /// Longest prefix first.
    by_prefix: Vec<(String, Source)>,
    /// Resolved `Authorization: Basic` values of dynamic sources.
    cache: moka::future::Cache<Source, Option<HeaderValue>>,
}

impl Credentials {
    pub fn new(server: &str, cfg: &UpstreamConfig) -> Credentials {
        let default = Source::from_parts(
            cfg.username.as_deref(),
            cfg.password.as_deref(),
            cfg.password_file.as_deref(),
            cfg.credential_helper.as_deref(),
            cfg.docker_config.as_deref(),
        );
        let mut by_prefix: Vec<(String, Source)> = cfg
            .credentials
            .iter()
            .filter_map(|c: &RepoCredentials| {
                let source = Source::from_parts(
                    c.username.as_deref(),
                    c.password.as_deref(),
                    c.password_file.as_deref(),
                    c.credential_helper.as_deref(),
                    c.docker_config.as_deref(),
                )?;
                Some((c.repo_prefix.trim_end_matches('/').to_owned(), source))
            })
            .collect();
        by_prefix.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Credentials {
            server: server.to_owned(),
            default,
            by_prefix,
            cache: moka::future::Cache::builder()
                .max_capacity(1_000)
                .time_to_live(cfg.credential_ttl)
                .build(),
        }
    }

    /// The source for a repository: the longest matching prefix, else the upstream's own.
    pub fn source(&self, repo: &RepoName) -> Option<&Source> {
        let r = repo.as_str();
        self.by_prefix
            .iter()
            .find(|(p, _)| {
                r == p || (r.starts_with(p.as_str()) && r.as_bytes().get(p.len()) == Some(&b'/'))
            })
            .map(|(_, s)| s)
            .or(self.default.as_ref())
    }

    /// `Authorization: Basic` for a repository's credentials; `None` means anonymous.
    pub async fn header(&self, repo: &RepoName) -> Result<Option<HeaderValue>, CredentialError> {
        let Some(source) = self.source(repo) else {
            return Ok(None);
        };
        if let Source::Static { username, password } = source {
            return Ok(Some(basic(username, password)));
        }
        if let Some(h) = self.cache.get(source).await {
            return Ok(h);
        }
        let h = self.resolve(source).await?;
        self.cache.insert(source.clone(), h.clone()).await;
        Ok(h)
    }

    /// Drops what a dynamic source gave for this repository, so the next use asks again.
    /// Returns whether there was anything that could change.
    pub async fn refresh(&self, repo: &RepoName) -> bool {
        match self.source(repo) {
            Some(s) if s.is_dynamic() => {
                self.cache.invalidate(s).await;
                true
            }
            _ => false,
        }
    }

    async fn resolve(&self, source: &Source) -> Result<Option<HeaderValue>, CredentialError> {
        match source {
            Source::Static { username, password } => Ok(Some(basic(username, password))),
            Source::PasswordFile { username, path } => {
                let password =
                    tokio::fs::read_to_string(path)
                        .await
                        .map_err(|e| CredentialError::File {
                            path: path.display().to_string(),
                            reason: e.to_string(),
                        })?;
                Ok(Some(basic(
                    username,
                    password.trim_end_matches(['\n', '\r']),
                )))
            }
            Source::Helper(helper) => run_helper(helper, &self.server).await,
            Source::DockerConfig(path) => {
                let text =
                    tokio::fs::read_to_string(path)
                        .await
                        .map_err(|e| CredentialError::File {
                            path: path.display().to_string(),
                            reason: e.to_string(),
                        })?;
                let config: DockerConfig =
                    serde_json::from_str(&text).map_err(|e| CredentialError::File {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })?;
                match config.lookup(&self.server) {
                    Some(ConfigEntry::Basic(h)) => Ok(Some(h)),
                    Some(ConfigEntry::Helper(helper)) => run_helper(&helper, &self.server).await,
                    None => Ok(None),
                }
            }
        }
    }
}

/// The name helpers and Docker configs know an upstream by: Docker Hub's index URL for Docker
/// Hub, else `host[:port]` of its first URL.
pub fn server_name(url: &url::Url) -> String {
    let host = url.host_str().unwrap_or_default();
    if crate::config::DOCKER_HUB_HOSTS.contains(&host) {
        return DOCKER_HUB_INDEX.to_owned();
    }
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    }
}

/// How Docker names Docker Hub in `config.json` and to credential helpers.
pub const DOCKER_HUB_INDEX: &str = "https://index.docker.io/v1/";

/// `docker-credential-<helper> get`, with the server on stdin.
async fn run_helper(helper: &str, server: &str) -> Result<Option<HeaderValue>, CredentialError> {
    let program = format!("docker-credential-{helper}");
    let err = |reason: String| CredentialError::Helper {
        helper: helper.to_owned(),
        reason,
    };
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| err(format!("cannot run {program}: {e}")))?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin
        .write_all(server.as_bytes())
        .await
        .map_err(|e| err(e.to_string()))?;
    drop(stdin);
    let out = tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| err(format!("no answer within {HELPER_TIMEOUT:?}")))?
        .map_err(|e| err(e.to_string()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // The protocol's way of saying "none stored for this server".
        if stdout.contains("credentials not found") {
            return Ok(None);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(err(format!(
            "exited with {}: {}",
            out.status,
            format!("{stdout} {stderr}").trim()
        )));
    }
    #[derive(Deserialize)]
    struct Answer {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let a: Answer =
        serde_json::from_str(&stdout).map_err(|e| err(format!("unreadable answer: {e}")))?;
    Ok(Some(basic(&a.username, &a.secret)))
}

/// The parts of Docker's `config.json` that hold registry credentials.
#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

enum ConfigEntry {
    Basic(HeaderValue),
    Helper(String),
}

impl DockerConfig {
    /// Docker's order: a per-registry helper, then `auths`, then the default store.
    fn lookup(&self, server: &str) -> Option<ConfigEntry> {
        let bare = server
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let mut keys = vec![server.to_owned(), bare.to_owned()];
        if server == DOCKER_HUB_INDEX {
            keys.extend(["index.docker.io", "docker.io", "registry-1.docker.io"].map(String::from));
        }
        let matches = |k: &str| {
            keys.iter().any(|key| {
                let k = k
                    .trim_start_matches("https://")
                    .trim_start_matches("http://")
                    .trim_end_matches('/');
                k == key || k == key.trim_end_matches("/v1")
            })
        };
        if let Some((_, h)) = self.cred_helpers.iter().find(|(k, _)| matches(k)) {
            return Some(ConfigEntry::Helper(h.clone()));
        }
        if let Some((_, e)) = self.auths.iter().find(|(k, _)| matches(k)) {
            if let Some(auth) = &e.auth
                && let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(auth.trim())
                && let Ok(pair) = String::from_utf8(raw)
                && let Some((u, p)) = pair.split_once(':')
            {
                return Some(ConfigEntry::Basic(basic(u, p)));
            }
            if let Some(u) = &e.username {
                return Some(ConfigEntry::Basic(basic(
                    u,
                    e.password.as_deref().unwrap_or(""),
                )));
            }
        }
        self.creds_store.clone().map(ConfigEntry::Helper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(toml_text: &str) -> UpstreamConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[tokio::test]
    async fn longest_prefix_wins_and_static_credentials_need_no_io() {
        let c = Credentials::new(
            "registry.example.com",
            &cfg(r#"
                urls = ["https://registry.example.com"]
                username = "default"
                password = "d"
                [[credentials]]
                repo_prefix = "team"
                username = "team"
                password = "t"
                [[credentials]]
                repo_prefix = "team/special/"
                username = "special"
                password = "s"
            "#),
        );
        let who = |repo: &str| match c.source(&repo.parse().unwrap()) {
            Some(Source::Static { username, .. }) => username.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(who("team"), "team");
        assert_eq!(who("team/app"), "team");
        assert_eq!(who("team/special/app"), "special");
        assert_eq!(who("teamwork/app"), "default");
        assert_eq!(who("other"), "default");
        let h = c
            .header(&"team/app".parse().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(h, basic("team", "t"));
        assert!(!c.refresh(&"team/app".parse().unwrap()).await);
    }

    #[tokio::test]
    async fn password_files_are_read_again_after_a_refresh() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "one\n").unwrap();
        let c = Credentials::new(
            "r.example",
            &cfg(&format!(
                "urls = [\"https://r.example\"]\nusername = \"u\"\npassword_file = \"{}\"",
                file.display()
            )),
        );
        let repo: RepoName = "a/b".parse().unwrap();
        assert_eq!(c.header(&repo).await.unwrap(), Some(basic("u", "one")));
        std::fs::write(&file, "two\n").unwrap();
        assert_eq!(
            c.header(&repo).await.unwrap(),
            Some(basic("u", "one")),
            "reused within the TTL"
        );
        assert!(c.refresh(&repo).await);
        assert_eq!(c.header(&repo).await.unwrap(), Some(basic("u", "two")));
    }

    #[tokio::test]
    async fn docker_config_auths_and_hub_names() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("hubuser:hubpass");
        std::fs::write(
            &file,
            format!(
                r#"{{"auths": {{
                    "https://index.docker.io/v1/": {{"auth": "{auth}"}},
                    "registry.corp:5443": {{"username": "corp", "password": "c"}}
                }}}}"#
            ),
        )
        .unwrap();
        let text = format!(
            "urls = [\"https://x\"]\ndocker_config = \"{}\"",
            file.display()
        );
        let repo: RepoName = "a".parse().unwrap();
        let hub = Credentials::new(DOCKER_HUB_INDEX, &cfg(&text));
        assert_eq!(
            hub.header(&repo).await.unwrap(),
            Some(basic("hubuser", "hubpass"))
        );
        let corp = Credentials::new("registry.corp:5443", &cfg(&text));
        assert_eq!(corp.header(&repo).await.unwrap(), Some(basic("corp", "c")));
        let none = Credentials::new("elsewhere.example", &cfg(&text));
        assert_eq!(none.header(&repo).await.unwrap(), None);
        assert_eq!(
            server_name(&"https://registry-1.docker.io".parse().unwrap()),
            DOCKER_HUB_INDEX
        );
        assert_eq!(
            server_name(&"http://127.0.0.1:5001".parse().unwrap()),
            "127.0.0.1:5001"
        );
    }

    #[tokio::test]
    async fn a_missing_helper_is_a_clear_error() {
        let c = Credentials::new(
            "r.example",
            &cfg("urls = [\"https://r.example\"]\ncredential_helper = \"regcache-test-none\""),
        );
        let e = c.header(&"a".parse().unwrap()).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot run docker-credential-regcache-test-none"),
            "{e}"
        );
    }
}
