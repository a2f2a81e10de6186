//! Who a client is and what it may pull: client authentication (htpasswd bcrypt users, static
//! bearer tokens), groups, access rules, and the allow/deny policy on resolved routes.
//!
//! Invariants:
//! - Decisions are made on the resolved route (upstream + repository as upstream names it), so
//!   every spelling of one repository (mirror traffic, path prefix, `?ns=`, alias) gets the
//!   same answer, and before any cache lookup or upstream contact.
//! - Secrets never leave this module: verified credentials are remembered by a SHA-256 of the
//!   `Authorization` value only, and no error, log line or metric carries them.

pub mod htpasswd;
pub mod policy;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use base64::Engine as _;
use http::HeaderValue;
use sha2::{Digest as _, Sha256};

use crate::config::Config;
use crate::error::{Error, Result};
pub use htpasswd::Htpasswd;
use policy::{Entry, Pattern, Policy};

/// An authenticated client: an htpasswd user or a static token, and its groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub groups: Vec<String>,
}

/// Who a request comes from: `None` is anonymous.
pub type Client = Option<Arc<Identity>>;

/// A static token: its name and the SHA-256 of its value.
struct Token {
    name: String,
    hash: [u8; 32],
}

/// One grant from `[[auth.rules]]`.
struct Rule {
    users: Vec<String>,
    groups: Vec<String>,
    /// Upstream names; `None`: every upstream.
    upstreams: Option<HashSet<String>>,
    /// `None`: every repository.
    repos: Option<Vec<Pattern>>,
}

impl Rule {
    fn covers(&self, who: &Identity) -> bool {
        self.users.iter().any(|u| u == "*" || *u == who.name)
            || self.groups.iter().any(|g| who.groups.contains(g))
    }

    fn grants(&self, upstream: &str, repo: &str) -> bool {
        self.upstreams.as_ref().is_none_or(|u| u.contains(upstream))
            && self
                .repos
                .as_ref()
                .is_none_or(|r| r.iter().any(|p| p.matches(repo)))
    }
}

/// Bcrypt checks running at once; more wait (a flood of wrong passwords cannot take every
/// blocking thread).
const BCRYPT_SLOTS: usize = 4;

/// Client authentication and access control, built from `[auth]`, `[policy]` and each
/// upstream's `anonymous`, `allow` and `deny`.
pub struct Access {
    enabled: bool,
    challenge: HeaderValue,
    htpasswd: Arc<Htpasswd>,
    tokens: Vec<Token>,
    /// Identity name -> groups.
    member_of: HashMap<String, Vec<String>>,
    rules: Vec<Rule>,
    policy: Policy,
    /// Upstreams anyone may pull from without logging in.
    anonymous: HashSet<String>,
    /// SHA-256 of an `Authorization` value -> who it proved to be.
    verified: moka::future::Cache<[u8; 32], Arc<Identity>>,
    bcrypt_slots: Arc<tokio::sync::Semaphore>,
}

impl Access {
    /// Builds the access control of a configuration (reading the htpasswd file and tokens);
    /// every problem is reported, each with its key path.
    pub fn from_config(config: &Config) -> Result<Access, Vec<String>> {
        let mut p = Vec::new();
        let auth = &config.auth;
        let enabled = auth.is_enabled();
        let challenge = HeaderValue::from_str(&format!("Basic realm=\"{}\"", auth.realm))
            .ok()
            .filter(|_| !auth.realm.contains('"'))
            .unwrap_or_else(|| {
                p.push(format!(
                    "auth.realm: {:?} must be printable text without `\"`",
                    auth.realm
                ));
                HeaderValue::from_static("Basic realm=\"regcache\"")
            });
        let htpasswd = match &auth.htpasswd {
            None => Htpasswd::default(),
            Some(path) => match std::fs::read_to_string(path) {
                Err(e) => {
                    p.push(format!("auth.htpasswd: {}: {e}", path.display()));
                    Htpasswd::default()
                }
                Ok(text) => Htpasswd::parse(&text).unwrap_or_else(|problems| {
                    for problem in problems {
                        p.push(format!("auth.htpasswd: {}: {problem}", path.display()));
                    }
                    Htpasswd::default()
                }),
            },
        };
        let mut tokens = Vec::new();
        let mut member_of: HashMap<String, Vec<String>> = HashMap::new();
        for (i, t) in auth.tokens.iter().enumerate() {
            let key = format!("auth.tokens[{i}]");
            if t.name.is_empty() || t.name.contains(':') {
                p.push(format!("{key}.name: must be non-empty, without `:`"));
            }
            if htpasswd.hash(&t.name).is_some() {
                p.push(format!(
                    "{key}.name: {:?} is also a user in the htpasswd file",
                    t.name
                ));
            }
            if auth.tokens[..i].iter().any(|o| o.name == t.name) {
                p.push(format!("{key}.name: {:?} is used twice", t.name));
            }
            let value = match (&t.token_file, &t.token_env) {
                (Some(path), None) => match std::fs::read_to_string(path) {
                    Ok(s) => Some(s.lines().next().unwrap_or("").trim().to_owned()),
                    Err(e) => {
                        p.push(format!("{key}.token_file: {}: {e}", path.display()));
                        None
                    }
                },
                (None, Some(var)) => match std::env::var(var) {
                    Ok(s) => Some(s.trim().to_owned()),
                    Err(_) => {
                        p.push(format!(
                            "{key}.token_env: the environment variable {var} is not set"
                        ));
                        None
                    }
                },
                _ => {
                    p.push(format!("{key}: set one of token_file, token_env"));
                    None
                }
            };
            match value {
                Some(v) if v.len() < 16 => p.push(format!(
                    "{key}: the token is shorter than 16 characters (make it long and random)"
                )),
                Some(v) => tokens.push(Token {
                    name: t.name.clone(),
                    hash: sha256(v.as_bytes()),
                }),
                None => {}
            }
            for g in &t.groups {
                member_of.entry(t.name.clone()).or_default().push(g.clone());
            }
        }
        let known = |name: &str| {
            htpasswd.hash(name).is_some() || auth.tokens.iter().any(|t| t.name == name)
        };
        for (group, members) in &auth.groups {
            for (i, m) in members.iter().enumerate() {
                if !known(m) {
                    p.push(format!(
                        "auth.groups.{group}[{i}]: {m:?} is neither an htpasswd user nor a token name"
                    ));
                }
                let gs = member_of.entry(m.clone()).or_default();
                if !gs.contains(group) {
                    gs.push(group.clone());
                }
            }
        }
        let groups: HashSet<&String> = member_of.values().flatten().collect();
        let mut rules = Vec::new();
        for (i, r) in auth.rules.iter().enumerate() {
            let key = format!("auth.rules[{i}]");
            if r.users.is_empty() && r.groups.is_empty() {
                p.push(format!("{key}: name users or groups the rule is for"));
            }
            for (j, u) in r.users.iter().enumerate() {
                if u != "*" && !known(u) {
                    p.push(format!(
                        "{key}.users[{j}]: {u:?} is neither an htpasswd user nor a token name"
                    ));
                }
            }
            for (j, g) in r.groups.iter().enumerate() {
                if !groups.contains(g) {
                    p.push(format!(
                        "{key}.groups[{j}]: no identity is in group {g:?} (see auth.groups and auth.tokens[].groups)"
                    ));
                }
            }
            let upstreams = if r.upstreams.is_empty() {
                None
            } else {
                let mut set = HashSet::new();
                for (j, u) in r.upstreams.iter().enumerate() {
                    match upstream_named(config, u) {
                        Some(name) => {
                            set.insert(name);
                        }
                        None => p.push(format!(
                            "{key}.upstreams[{j}]: {u:?} is no configured upstream or registry host"
                        )),
                    }
                }
                Some(set)
            };
            let repos = if r.repos.is_empty() {
                None
            } else {
                let mut pats = Vec::new();
                for (j, pat) in r.repos.iter().enumerate() {
                    match Pattern::parse(pat) {
                        Ok(x) => pats.push(x),
                        Err(e) => p.push(format!("{key}.repos[{j}]: {e}")),
                    }
                }
                Some(pats)
            };
            rules.push(Rule {
                users: r.users.clone(),
                groups: r.groups.clone(),
                upstreams,
                repos,
            });
        }
        if !enabled && !auth.rules.is_empty() {
            p.push("auth.rules: rules need identities: set auth.htpasswd or auth.tokens".into());
        }
        let mut policy = Policy::new(!config.policy.allow.is_empty());
        let mut anonymous = HashSet::new();
        for (name, u) in &config.upstreams {
            let at = format!("upstreams.\"{name}\"");
            if u.anonymous {
                anonymous.insert(name.clone());
            }
            if enabled && u.pass_client_auth {
                p.push(format!(
                    "{at}.pass_client_auth: cannot be combined with [auth]: clients then send regcache their regcache credentials, not upstream's"
                ));
            }
            for (list, pats) in [("allow", &u.allow), ("deny", &u.deny)] {
                for (i, pat) in pats.iter().enumerate() {
                    let key = format!("{at}.{list}[{i}]");
                    match Pattern::parse(pat) {
                        Ok(pattern) => {
                            let e = Entry { key, pattern };
                            if list == "allow" {
                                policy.allow(name, e)
                            } else {
                                policy.deny(name, e)
                            }
                        }
                        Err(e) => p.push(format!("{key}: {e}")),
                    }
                }
            }
        }
        for (list, pats) in [
            ("allow", &config.policy.allow),
            ("deny", &config.policy.deny),
        ] {
            for (i, pat) in pats.iter().enumerate() {
                let key = format!("policy.{list}[{i}]");
                let Some((host, rest)) = pat.split_once('/') else {
                    p.push(format!(
                        "{key}: {pat:?} must be REGISTRY/PATTERN, e.g. \"docker.io/library/*\""
                    ));
                    continue;
                };
                let Some(up) = upstream_named(config, host) else {
                    p.push(format!(
                        "{key}: {host:?} is no configured upstream or registry host"
                    ));
                    continue;
                };
                match Pattern::parse(rest) {
                    Ok(pattern) => {
                        let e = Entry { key, pattern };
                        if list == "allow" {
                            policy.allow(&up, e)
                        } else {
                            policy.deny(&up, e)
                        }
                    }
                    Err(e) => p.push(format!("{key}: {e}")),
                }
            }
        }
        if !p.is_empty() {
            return Err(p);
        }
        let ttl = auth.cache_ttl;
        Ok(Access {
            enabled,
            challenge,
            htpasswd: Arc::new(htpasswd),
            tokens,
            member_of,
            rules,
            policy,
            anonymous,
            verified: moka::future::Cache::builder()
                .max_capacity(if ttl.is_zero() { 0 } else { 10_000 })
                .time_to_live(ttl.max(std::time::Duration::from_millis(1)))
                .build(),
            bcrypt_slots: Arc::new(tokio::sync::Semaphore::new(BCRYPT_SLOTS)),
        })
    }

    /// Whether clients authenticate at all.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The `WWW-Authenticate` challenge regcache answers 401 with.
    pub fn challenge(&self) -> &HeaderValue {
        &self.challenge
    }

    fn unauthorized(&self, reason: &'static str, message: String) -> Error {
        Error::Unauthorized {
            reason,
            message,
            challenge: self.challenge.clone(),
        }
    }

    fn identity(&self, name: &str) -> Arc<Identity> {
        Arc::new(Identity {
            name: name.to_owned(),
            groups: self.member_of.get(name).cloned().unwrap_or_default(),
        })
    }

    /// Who sent a request. No `Authorization` (or authentication off) is anonymous; wrong
    /// credentials are a 401 whatever the request.
    pub async fn authenticate(&self, authorization: Option<&HeaderValue>) -> Result<Client> {
        let Some(header) = authorization.filter(|_| self.enabled) else {
            return Ok(None);
        };
        let key = sha256(header.as_bytes());
        if let Some(who) = self.verified.get(&key).await {
            return Ok(Some(who));
        }
        let bad = || self.unauthorized("bad_credentials", "authentication failed".into());
        let value = header.to_str().map_err(|_| bad())?.trim();
        let (scheme, rest) = value.split_once(' ').ok_or_else(bad)?;
        let who = if scheme.eq_ignore_ascii_case("bearer") {
            self.token_named(None, rest.trim()).ok_or_else(bad)?
        } else if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(bad)?;
            let (user, password) = decoded.split_once(':').ok_or_else(bad)?;
            match self.token_named(Some(user), password) {
                Some(name) => name,
                None => {
                    let slot = Arc::clone(&self.bcrypt_slots)
                        .acquire_owned()
                        .await
                        .map_err(|e| Error::Internal(e.to_string()))?;
                    let file = Arc::clone(&self.htpasswd);
                    let (u, pw) = (user.to_owned(), password.to_owned());
                    // The slot goes with the check: a request dropped meanwhile (a client
                    // that reset its stream) leaves it held until bcrypt is done, so no more
                    // than the cap ever run.
                    let ok = tokio::task::spawn_blocking(move || {
                        let _slot = slot;
                        file.verify(&u, &pw)
                    })
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))?;
                    if !ok {
                        return Err(bad());
                    }
                    user.to_owned()
                }
            }
        } else {
            return Err(bad());
        };
        let who = self.identity(&who);
        self.verified.insert(key, Arc::clone(&who)).await;
        Ok(Some(who))
    }

    /// The name of the token `secret` is (and, given a user name, whose name is `user`).
    fn token_named(&self, user: Option<&str>, secret: &str) -> Option<String> {
        let h = sha256(secret.as_bytes());
        self.tokens
            .iter()
            .find(|t| user.is_none_or(|u| u == t.name) && constant_time_eq(&t.hash, &h))
            .map(|t| t.name.clone())
    }

    /// `GET /v2/`: with authentication on, an anonymous client gets the challenge (this is
    /// what `docker login` and Docker's pulls look for).
    pub fn check_base(&self, who: &Client) -> Result<()> {
        if self.enabled && who.is_none() {
            return Err(self.unauthorized("no_credentials", "authentication required".into()));
        }
        Ok(())
    }

    /// May `who` pull `repo` of `upstream`? Policy first (403 for everyone), then identity:
    /// anonymous on a non-anonymous upstream is 401, authenticated without a granting rule 403.
    pub fn authorize(&self, who: &Client, upstream: &str, repo: &str) -> Result<()> {
        if let Err(why) = self.policy.check(upstream, repo) {
            return Err(Error::Denied {
                reason: "policy",
                message: why,
            });
        }
        if !self.enabled || self.anonymous.contains(upstream) {
            return Ok(());
        }
        let Some(who) = who else {
            return Err(
                self.unauthorized("no_credentials", format!("log in to pull from {upstream}"))
            );
        };
        if self.rules.is_empty()
            || self
                .rules
                .iter()
                .any(|r| r.covers(who) && r.grants(upstream, repo))
        {
            return Ok(());
        }
        Err(Error::Denied {
            reason: "rule",
            message: format!(
                "{} may not pull {upstream}/{repo}: no auth.rules entry grants it",
                who.name
            ),
        })
    }
}

/// The upstream a name means: an upstream's name, or one of its registry hosts.
fn upstream_named(config: &Config, name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    if config.upstreams.contains_key(name) {
        return Some(name.to_owned());
    }
    config
        .upstreams
        .iter()
        .find(|(n, u)| config.route_names(n, u).contains(&lower))
        .map(|(n, _)| n.clone())
}

fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    struct Setup {
        _dir: tempfile::TempDir,
        access: Access,
    }

    fn setup(extra: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let ht = dir.path().join("htpasswd");
        std::fs::write(
            &ht,
            format!(
                "alice:{}\nbob:{}\n",
                bcrypt::hash("alice-pw", 4).unwrap(),
                bcrypt::hash("bob-pw", 4).unwrap()
            ),
        )
        .unwrap();
        let tok = dir.path().join("ci.token");
        std::fs::write(&tok, "ci-token-0123456789abcdef\n").unwrap();
        let text = format!(
            r#"
            data_dir = "{d}"
            [upstreams."docker.io"]
            urls = ["https://registry-1.docker.io"]
            anonymous = true
            deny = ["library/evil*"]
            [upstreams.corp]
            urls = ["https://registry.corp.example"]
            allow = ["team/**", "shared/*"]
            [auth]
            htpasswd = "{ht}"
            [[auth.tokens]]
            name = "ci"
            token_file = "{tok}"
            groups = ["builders"]
            [auth.groups]
            devs = ["alice"]
            {extra}
            "#,
            d = dir.path().display(),
            ht = ht.display(),
            tok = tok.display(),
        );
        let cfg = Config::parse(&text, Path::new("t")).unwrap_or_else(|e| panic!("{e}"));
        let access = Access::from_config(&cfg).unwrap();
        Setup { _dir: dir, access }
    }

    fn basic(u: &str, p: &str) -> HeaderValue {
        crate::upstream::auth::basic(u, p)
    }

    async fn who(a: &Access, h: Option<HeaderValue>) -> Result<Client> {
        a.authenticate(h.as_ref()).await
    }

    fn code(e: Error) -> (&'static str, u16) {
        let (c, s) = e.code_and_status();
        (c, s.as_u16())
    }

    #[tokio::test]
    async fn users_tokens_and_wrong_credentials() {
        let s = setup("");
        let a = &s.access;
        let alice = who(a, Some(basic("alice", "alice-pw")))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(alice.groups, ["devs"]);
        // Remembered: the same header again is answered without bcrypt.
        assert!(
            who(a, Some(basic("alice", "alice-pw")))
                .await
                .unwrap()
                .is_some()
        );
        let e = who(a, Some(basic("alice", "nope"))).await.unwrap_err();
        assert_eq!(code(e), ("UNAUTHORIZED", 401));
        assert!(who(a, Some(basic("mallory", "x"))).await.is_err());
        let ci = who(
            a,
            Some(HeaderValue::from_static("Bearer ci-token-0123456789abcdef")),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            (ci.name.as_str(), &ci.groups[..]),
            ("ci", &["builders".to_owned()][..])
        );
        // docker login -u ci -p TOKEN
        assert!(
            who(a, Some(basic("ci", "ci-token-0123456789abcdef")))
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            who(a, Some(basic("bob", "ci-token-0123456789abcdef")))
                .await
                .is_err()
        );
        assert!(
            who(a, Some(HeaderValue::from_static("Bearer wrong")))
                .await
                .is_err()
        );
        assert!(
            who(a, Some(HeaderValue::from_static("Negotiate x")))
                .await
                .is_err()
        );
        assert!(who(a, None).await.unwrap().is_none());
        assert!(a.check_base(&None).is_err());
        assert!(a.check_base(&Some(alice)).is_ok());
    }

    #[test]
    fn policy_then_identity_then_rules() {
        let s = setup(
            r#"
            [[auth.rules]]
            groups = ["devs"]
            upstreams = ["registry.corp.example"]
            repos = ["team/**"]
            [[auth.rules]]
            users = ["ci"]
            upstreams = ["corp"]
            repos = ["shared/*"]
            "#,
        );
        let a = &s.access;
        let alice: Client = Some(a.identity("alice"));
        let bob: Client = Some(a.identity("bob"));
        let ci: Client = Some(a.identity("ci"));
        // docker.io is anonymous, with a deny list that beats everything.
        assert!(a.authorize(&None, "docker.io", "library/alpine").is_ok());
        let e = a
            .authorize(&alice, "docker.io", "library/evilbox")
            .unwrap_err();
        assert!(
            e.to_string().contains("upstreams.\"docker.io\".deny[0]"),
            "{e}"
        );
        assert_eq!(code(e), ("DENIED", 403));
        // corp needs a login, then a rule.
        assert_eq!(
            code(a.authorize(&None, "corp", "team/app").unwrap_err()),
            ("UNAUTHORIZED", 401)
        );
        assert!(a.authorize(&alice, "corp", "team/app/web").is_ok());
        assert_eq!(
            code(a.authorize(&bob, "corp", "team/app").unwrap_err()),
            ("DENIED", 403)
        );
        assert!(a.authorize(&ci, "corp", "shared/base").is_ok());
        assert!(a.authorize(&ci, "corp", "team/app").is_err());
        // Not in corp's allow list: nobody.
        let e = a.authorize(&alice, "corp", "other/x").unwrap_err();
        assert!(e.to_string().contains("upstreams.\"corp\".allow"), "{e}");
    }

    #[test]
    fn config_problems_name_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let ht = dir.path().join("htpasswd");
        std::fs::write(&ht, "alice:$apr1$x$y\n").unwrap();
        let text = format!(
            r#"
            [upstreams."docker.io"]
            urls = ["https://registry-1.docker.io"]
            pass_client_auth = true
            allow = ["Bad/*"]
            [policy]
            deny = ["nowhere.example/x/*", "nohost"]
            [auth]
            htpasswd = "{}"
            [[auth.tokens]]
            name = "ci"
            token_env = "REGCACHE_TEST_SURELY_UNSET_TOKEN"
            [[auth.rules]]
            groups = ["cii"]
            upstreams = ["quay.io"]
            repos = ["a//b"]
            "#,
            ht.display()
        );
        let e = Config::parse(&text, Path::new("t"))
            .unwrap_err()
            .to_string();
        for needle in [
            "auth.htpasswd:",
            "an MD5 ($apr1$) hash, not bcrypt",
            "auth.tokens[0].token_env: the environment variable REGCACHE_TEST_SURELY_UNSET_TOKEN is not set",
            "auth.rules[0].groups[0]: no identity is in group \"cii\"",
            "auth.rules[0].upstreams[0]: \"quay.io\" is no configured upstream",
            "auth.rules[0].repos[0]:",
            "upstreams.\"docker.io\".pass_client_auth: cannot be combined with [auth]",
            "upstreams.\"docker.io\".allow[0]:",
            "policy.deny[0]: \"nowhere.example\" is no configured upstream",
            "policy.deny[1]: \"nohost\" must be REGISTRY/PATTERN",
        ] {
            assert!(e.contains(needle), "{needle:?} missing in:\n{e}");
        }
    }

    #[test]
    fn off_by_default() {
        let c = Config::embedded();
        let a = Access::from_config(&c).unwrap();
        assert!(!a.is_enabled());
        assert!(a.check_base(&None).is_ok());
        assert!(a.authorize(&None, "docker.io", "library/alpine").is_ok());
    }
}
