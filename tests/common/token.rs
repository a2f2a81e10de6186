//! Upstream authentication for real registries: a Docker token server (the distribution token
//! auth spec: Basic credentials in, ES256 JWTs with an `x5c` chain out) that a real
//! `docker-registry` trusts through `rootcertbundle`, htpasswd files with bcrypt hashes, pushes
//! that authenticate, and regcache as a real subprocess (for credential helpers on `PATH`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

use super::fake::{Fake, Parts, respond};
use super::{BoxBody, Image, Registry, http, push_blob, put_manifest};

/// The registry's `auth.token.service`, the tokens' `aud`.
pub const SERVICE: &str = "regcache-test";
/// The registry's `auth.token.issuer`, the tokens' `iss`.
pub const ISSUER: &str = "regcache-test-issuer";
/// The user the tests push as: pull and push everywhere.
pub const ADMIN: (&str, &str) = ("admin", "admin-secret");

/// `Authorization: Basic` for a username and password.
pub fn basic(username: &str, password: &str) -> String {
    format!(
        "Basic {}",
        STANDARD.encode(format!("{username}:{password}"))
    )
}

/// One request the token server answered.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// The authenticated user; `None` for anonymous requests (and refused ones).
    pub user: Option<String>,
    /// The `Authorization` sent, as sent.
    pub authorization: Option<String>,
    /// Every `scope` parameter, as asked.
    pub scopes: Vec<String>,
    /// What the token grants, `repository:NAME:ACTIONS` per resource with any action.
    pub granted: Vec<String>,
    /// 200, or 401 for a wrong password.
    pub status: u16,
}

/// Who a rule is for.
#[derive(Debug, Clone)]
enum Who {
    Anyone,
    User(String),
}

#[derive(Debug, Clone)]
struct Rule {
    who: Who,
    /// `team` covers `team` and `team/...`; empty covers every repository.
    repo_prefix: String,
    actions: Vec<String>,
}

struct State {
    /// user -> password
    users: HashMap<String, String>,
    rules: Vec<Rule>,
    expires_in: u64,
    log: Vec<TokenRequest>,
}

/// The signing key and the self-signed certificate the registry trusts.
struct Signer {
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    rng: SystemRandom,
    jti: AtomicU64,
}

/// A token server in the style of Docker Hub's `auth.docker.io`: anonymous requests get what
/// anyone may do, Basic credentials what that user may do, a wrong password 401. What a user
/// may not do is left out of the token (never an error), as Docker Hub does.
pub struct TokenServer {
    pub fake: Fake,
    /// Holds `root.pem`.
    pub dir: tempfile::TempDir,
    state: Arc<Mutex<State>>,
}

impl TokenServer {
    /// A token server that knows only [`ADMIN`]; add users and rules with [`user`] and [`allow`].
    ///
    /// [`user`]: TokenServer::user
    /// [`allow`]: TokenServer::allow
    pub async fn start() -> TokenServer {
        let key = rcgen::KeyPair::generate().expect("generate a P-256 key");
        let mut params = rcgen::CertificateParams::new(vec!["regcache-test-token".to_owned()])
            .expect("certificate params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "regcache test token signer");
        let cert = params.self_signed(&key).expect("self-signed certificate");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("root.pem"), cert.pem()).unwrap();
        let rng = SystemRandom::new();
        let signer = Arc::new(Signer {
            key: EcdsaKeyPair::from_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &key.serialize_der(),
                &rng,
            )
            .expect("rcgen's PKCS#8 key loads in ring"),
            cert_der: cert.der().to_vec(),
            rng,
            jti: AtomicU64::new(1),
        });
        let mut users = HashMap::new();
        users.insert(ADMIN.0.to_owned(), ADMIN.1.to_owned());
        let state = Arc::new(Mutex::new(State {
            users,
            rules: vec![Rule {
                who: Who::User(ADMIN.0.to_owned()),
                repo_prefix: String::new(),
                actions: vec!["pull".into(), "push".into()],
            }],
            expires_in: 300,
            log: Vec::new(),
        }));
        let st = Arc::clone(&state);
        let fake = Fake::start(move |parts| {
            let (st, signer) = (Arc::clone(&st), Arc::clone(&signer));
            async move { answer(&parts, &st, &signer) }
        })
        .await;
        TokenServer { fake, dir, state }
    }

    /// Adds a user or changes its password.
    pub fn user(&self, name: &str, password: &str) {
        self.state
            .lock()
            .unwrap()
            .users
            .insert(name.to_owned(), password.to_owned());
    }

    /// Lets `who` (`None`: anyone, anonymous too) do `actions` on repositories under `prefix`.
    pub fn allow(&self, who: Option<&str>, repo_prefix: &str, actions: &[&str]) {
        self.state.lock().unwrap().rules.push(Rule {
            who: who.map_or(Who::Anyone, |u| Who::User(u.to_owned())),
            repo_prefix: repo_prefix.trim_end_matches('/').to_owned(),
            actions: actions.iter().map(|a| (*a).to_owned()).collect(),
        });
    }

    /// The lifetime of tokens issued from now on (`expires_in` and `exp`).
    pub fn set_expires_in(&self, seconds: u64) {
        self.state.lock().unwrap().expires_in = seconds;
    }

    pub fn realm(&self) -> String {
        format!("{}/token", self.fake.url())
    }

    pub fn root_pem(&self) -> PathBuf {
        self.dir.path().join("root.pem")
    }

    /// The `auth:` section that makes a `docker-registry` trust this server.
    pub fn registry_yaml(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.realm(),
            self.root_pem().display()
        )
    }

    /// Every token request so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.lock().unwrap().log.clone()
    }

    /// Token requests so far by `user` (`None`: anonymous).
    pub fn requests_by(&self, user: Option<&str>) -> Vec<TokenRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.user.as_deref() == user)
            .collect()
    }

    /// Forgets the requests seen so far.
    pub fn reset(&self) {
        self.state.lock().unwrap().log.clear();
    }

    /// Gets a token the way a client does; panics unless the server answers 200.
    pub async fn token(&self, credentials: Option<(&str, &str)>, scope: &str) -> String {
        let mut req = http()
            .get(self.realm())
            .query(&[("service", SERVICE), ("scope", scope)]);
        if let Some((u, p)) = credentials {
            req = req.header("authorization", basic(u, p));
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200, "token for {scope}");
        let v: serde_json::Value = resp.json().await.unwrap();
        v["token"].as_str().unwrap().to_owned()
    }

    /// Pushes `image` as `repo:tag` to a registry that trusts this server, as [`ADMIN`].
    pub async fn push(&self, registry: &Registry, repo: &str, tag: &str, image: &Image) {
        let token = self
            .token(Some(ADMIN), &format!("repository:{repo}:pull,push"))
            .await;
        push_as(
            &registry.url(),
            repo,
            tag,
            image,
            &format!("Bearer {token}"),
        )
        .await;
    }
}

/// Answers one token request.
fn answer(parts: &Parts, state: &Mutex<State>, signer: &Signer) -> http::Response<BoxBody> {
    if parts.uri.path() != "/token" {
        return respond(404, &[], "");
    }
    let query: Vec<(String, String)> =
        url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let scopes: Vec<String> = query
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();
    let service = query.iter().find(|(k, _)| k == "service").map(|(_, v)| v);
    let authorization = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut st = state.lock().unwrap();
    let mut entry = TokenRequest {
        user: None,
        authorization: authorization.clone(),
        scopes: scopes.clone(),
        granted: Vec::new(),
        status: 401,
    };
    if service.map(String::as_str) != Some(SERVICE) {
        st.log.push(entry);
        return respond(
            400,
            &[("content-type", "application/json")],
            r#"{"details":"unknown service"}"#,
        );
    }
    if let Some(a) = &authorization {
        let decoded = a
            .strip_prefix("Basic ")
            .and_then(|b| STANDARD.decode(b.trim()).ok())
            .and_then(|b| String::from_utf8(b).ok());
        let user = decoded.as_deref().and_then(|pair| {
            let (u, p) = pair.split_once(':')?;
            (st.users.get(u).map(String::as_str) == Some(p)).then(|| u.to_owned())
        });
        match user {
            Some(u) => entry.user = Some(u),
            None => {
                st.log.push(entry);
                return respond(
                    401,
                    &[
                        ("content-type", "application/json"),
                        ("www-authenticate", "Basic realm=\"regcache-test-token\""),
                    ],
                    r#"{"details":"incorrect username or password"}"#,
                );
            }
        }
    }
    let mut access = Vec::new();
    for scope in &scopes {
        // repository:NAME:ACTIONS (NAME has no colon in these tests)
        let mut it = scope.splitn(3, ':');
        let (Some(kind), Some(name), Some(actions)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if kind != "repository" {
            continue;
        }
        let allowed: Vec<String> = actions
            .split(',')
            .filter(|a| {
                st.rules.iter().any(|r| {
                    let who = match &r.who {
                        Who::Anyone => true,
                        Who::User(u) => entry.user.as_deref() == Some(u.as_str()),
                    };
                    let covers = r.repo_prefix.is_empty()
                        || name == r.repo_prefix
                        || name.starts_with(&format!("{}/", r.repo_prefix));
                    who && covers && r.actions.iter().any(|x| x == a)
                })
            })
            .map(str::to_owned)
            .collect();
        if !allowed.is_empty() {
            entry
                .granted
                .push(format!("repository:{name}:{}", allowed.join(",")));
            access
                .push(serde_json::json!({"type": "repository", "name": name, "actions": allowed}));
        }
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expires_in = st.expires_in;
    let jti = signer.jti.fetch_add(1, Ordering::SeqCst);
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": entry.user.clone().unwrap_or_default(),
        "aud": SERVICE,
        "exp": now + expires_in,
        "nbf": now - 1,
        "iat": now,
        "jti": format!("regcache-test-{jti}"),
        "access": access,
    });
    let header = serde_json::json!({
        "typ": "JWT",
        "alg": "ES256",
        "x5c": [STANDARD.encode(&signer.cert_der)],
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = signer
        .key
        .sign(&signer.rng, signing_input.as_bytes())
        .expect("sign");
    let jwt = format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    );
    entry.status = 200;
    st.log.push(entry);
    let body = serde_json::json!({
        "token": jwt,
        "access_token": jwt,
        "expires_in": expires_in,
    });
    respond(
        200,
        &[("content-type", "application/json")],
        body.to_string(),
    )
}

/// Pushes an image sending `authorization` on every request (a token or Basic credentials).
pub async fn push_as(base: &str, repo: &str, tag: &str, image: &Image, authorization: &str) {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", authorization.parse().unwrap());
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .default_headers(headers)
        .build()
        .unwrap();
    for blob in image.blobs() {
        push_blob(&client, base, repo, &blob).await;
    }
    for (digest, media_type, bytes) in image.child_manifests() {
        put_manifest(&client, base, repo, &digest, &media_type, bytes).await;
    }
    put_manifest(
        &client,
        base,
        repo,
        tag,
        &image.media_type,
        image.manifest.clone(),
    )
    .await;
}

/// An htpasswd file's text: one `user:bcrypt` line per entry (cost 4, the fastest Go accepts).
pub fn htpasswd(entries: &[(&str, &str)]) -> String {
    entries
        .iter()
        .map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, 4).expect("bcrypt")))
        .collect()
}

/// A `docker-registry` behind htpasswd Basic auth; its file is `dir/htpasswd`.
pub struct BasicRegistry {
    pub registry: Registry,
    pub htpasswd: PathBuf,
    _dir: tempfile::TempDir,
}

impl BasicRegistry {
    /// Users `entries` and [`ADMIN`], who the tests push as.
    pub async fn start(entries: &[(&str, &str)]) -> BasicRegistry {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("htpasswd");
        let mut all = entries.to_vec();
        all.push(ADMIN);
        std::fs::write(&file, htpasswd(&all)).unwrap();
        let registry = Registry::start_with(&format!(
            "auth:\n  htpasswd:\n    realm: basic-realm\n    path: {}\n",
            file.display()
        ))
        .await;
        BasicRegistry {
            registry,
            htpasswd: file,
            _dir: dir,
        }
    }

    /// Replaces the users (keeping [`ADMIN`]).
    pub fn set_users(&self, entries: &[(&str, &str)]) {
        let mut all = entries.to_vec();
        all.push(ADMIN);
        // Write then rename, so the registry never reads half a file.
        let tmp = self.htpasswd.with_extension("new");
        std::fs::write(&tmp, htpasswd(&all)).unwrap();
        std::fs::rename(&tmp, &self.htpasswd).unwrap();
    }

    pub async fn push(&self, repo: &str, tag: &str, image: &Image) {
        push_as(
            &self.registry.url(),
            repo,
            tag,
            image,
            &basic(ADMIN.0, ADMIN.1),
        )
        .await;
    }
}

/// The `regcache` binary as a subprocess (so its environment, `PATH` above all, is its own).
pub struct RegcacheProcess {
    child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl RegcacheProcess {
    /// Runs `regcache serve --config` with `config` (TOML, without `listen` and `data_dir`,
    /// which are added) and `path_first` put in front of `PATH`. Waits until `/v2/` answers.
    pub async fn start(config: &str, path_first: &Path) -> RegcacheProcess {
        let dir = tempfile::tempdir().unwrap();
        let port = super::free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let text = format!(
            "listen = \"{addr}\"\ndata_dir = \"{}\"\n{config}",
            dir.path().join("data").display()
        );
        let file = dir.path().join("regcache.toml");
        std::fs::write(&file, text).unwrap();
        let path = match std::env::var_os("PATH") {
            Some(p) => {
                let mut dirs = vec![path_first.to_owned()];
                dirs.extend(std::env::split_paths(&p));
                std::env::join_paths(dirs).unwrap()
            }
            None => path_first.as_os_str().to_owned(),
        };
        let log = std::fs::File::create(dir.path().join("regcache.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_regcache"))
            .arg("serve")
            .arg("--config")
            .arg(&file)
            .env("PATH", path)
            .env("RUST_LOG", "regcache=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start regcache");
        let mut p = RegcacheProcess { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("regcache exited with {status}:\n{}", p.log());
            }
            if http().get(format!("{}/v2/", p.url())).send().await.is_ok() {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "regcache did not come up at {addr}:\n{}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What regcache logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("regcache.log")).unwrap_or_default()
    }
}

impl Drop for RegcacheProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `docker-credential-NAME` script in `dir` that answers `get` with the username and secret
/// in `dir/NAME.user` and `dir/NAME.secret` (read at every run, so tests can rotate them) and
/// appends the server it was asked about to `dir/NAME.log`, one line per run.
pub struct Helper {
    pub name: String,
    pub dir: PathBuf,
}

impl Helper {
    pub fn install(dir: &Path, name: &str, username: &str, secret: &str) -> Helper {
        use std::os::unix::fs::PermissionsExt as _;
        let h = Helper {
            name: name.to_owned(),
            dir: dir.to_owned(),
        };
        h.set(username, secret);
        let script = format!(
            r#"#!/bin/sh
# A Docker credential helper for tests: `get` reads the server from stdin.
dir='{dir}'
[ "$1" = get ] || {{ echo "unsupported: $1" >&2; exit 1; }}
read -r server || true
echo "$server" >> "$dir/{name}.log"
user=$(cat "$dir/{name}.user")
secret=$(cat "$dir/{name}.secret")
printf '{{"ServerURL":"%s","Username":"%s","Secret":"%s"}}\n' "$server" "$user" "$secret"
"#,
            dir = dir.display()
        );
        let path = dir.join(format!("docker-credential-{name}"));
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        h
    }

    /// The credentials the next run answers with.
    pub fn set(&self, username: &str, secret: &str) {
        std::fs::write(self.dir.join(format!("{}.user", self.name)), username).unwrap();
        std::fs::write(self.dir.join(format!("{}.secret", self.name)), secret).unwrap();
    }

    /// The servers asked about, one per run.
    pub fn runs(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join(format!("{}.log", self.name)))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}
