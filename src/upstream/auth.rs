//! Upstream authentication: `WWW-Authenticate` parsing, the Bearer token flow, Basic credentials.
//!
//! Tokens are cached per scope until shortly before they expire. The last Bearer challenge seen
//! from an upstream is remembered so a request for a new repository fetches its token up front
//! instead of paying a 401 round trip first.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::HeaderValue;

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses one challenge (`Bearer realm="...",service="...",scope="..."` or `Basic realm=...`).
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header
        .split_once(char::is_whitespace)
        .unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    Some(Challenge::Bearer {
        realm: get("realm")?,
        service: get("service"),
        scope: get("scope"),
    })
}

/// `key=value` or `key="quoted, value"` pairs separated by commas.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim()
            .to_owned();
        if key.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars
                .by_ref()
                .take_while(|c| *c != ',')
                .collect::<String>()
                .trim()
                .to_owned();
        }
        out.push((key, value));
    }
}

/// The `Authorization: Basic` value for a username and password.
pub fn basic(username: &str, password: &str) -> HeaderValue {
    let enc = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    let mut v = HeaderValue::from_str(&format!("Basic {enc}")).expect("base64 is a valid header");
    v.set_sensitive(true);
    v
}

/// A bearer token and when to stop using it.
#[derive(Clone)]
pub struct Token {
    pub header: HeaderValue,
    pub expires_at: Instant,
}

/// Tokens are dropped this long before they expire (half their lifetime early when that is
/// shorter), so a request never goes out with one about to lapse.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// The token lifetime registries imply when they do not say (the distribution token spec's 60 s).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// The longest a token is kept, whatever the token server says: its `expires_in` is a remote
/// number, and one near `u64::MAX` would overflow the clock.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// The token endpoint's answer.
#[derive(serde::Deserialize)]
pub struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    /// Any JSON, so that an odd value (negative, fractional, a string) costs the token its
    /// stated lifetime, not the whole answer.
    expires_in: Option<serde_json::Value>,
}

impl TokenResponse {
    /// The token as a header and the instant it should be refreshed; `None` without a token.
    pub fn into_token(self, now: Instant) -> Option<Token> {
        let raw = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        let mut header = HeaderValue::from_str(&format!("Bearer {raw}")).ok()?;
        header.set_sensitive(true);
        Some(Token {
            header,
            expires_at: now + refresh_after(lifetime(self.expires_in.as_ref())),
        })
    }
}

/// The lifetime an `expires_in` states, at most [`MAX_TOKEN_LIFETIME`]. Missing, zero, negative
/// or not a number: [`DEFAULT_TOKEN_LIFETIME`], as the spec says for a missing one (a token
/// that no longer lives when it arrives cannot have been meant).
fn lifetime(expires_in: Option<&serde_json::Value>) -> Duration {
    let stated = match expires_in {
        Some(serde_json::Value::Number(n)) => match n.as_u64() {
            Some(secs) => Some(Duration::from_secs(secs)),
            None => n
                .as_f64()
                .filter(|secs| *secs > 0.0)
                .map(|secs| Duration::from_secs_f64(secs.min(MAX_TOKEN_LIFETIME.as_secs_f64()))),
        },
        _ => None,
    };
    stated
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_TOKEN_LIFETIME)
        .min(MAX_TOKEN_LIFETIME)
}

/// How long a token of `lifetime` is used: [`EXPIRY_MARGIN`] less, or half of it when short.
fn refresh_after(lifetime: Duration) -> Duration {
    if lifetime > 2 * EXPIRY_MARGIN {
        lifetime - EXPIRY_MARGIN
    } else {
        lifetime / 2
    }
}

struct TokenExpiry;

impl moka::Expiry<String, Token> for TokenExpiry {
    fn expire_after_create(&self, _k: &String, t: &Token, now: Instant) -> Option<Duration> {
        Some(t.expires_at.saturating_duration_since(now))
    }
}

/// Per-upstream authentication state.
pub struct Auth {
    tokens: moka::future::Cache<String, Token>,
    bearer: RwLock<Option<(String, Option<String>)>>,
    /// The upstream challenged with Basic: credentials may go up front.
    basic_seen: std::sync::atomic::AtomicBool,
}

impl Auth {
    pub fn new() -> Arc<Auth> {
        Arc::new(Auth {
            tokens: moka::future::Cache::builder()
                .max_capacity(10_000)
                .expire_after(TokenExpiry)
                .build(),
            bearer: RwLock::new(None),
            basic_seen: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A cached token for `scope`, if still fresh.
    pub async fn token(&self, scope: &str) -> Option<HeaderValue> {
        self.tokens.get(scope).await.map(|t| t.header)
    }

    pub async fn store_token(&self, scope: String, token: Token) {
        self.tokens.insert(scope, token).await;
    }

    pub async fn forget_token(&self, scope: &str) {
        self.tokens.invalidate(scope).await;
    }

    /// Remembers the Bearer realm and service an upstream asked for.
    pub fn remember_bearer(&self, realm: &str, service: Option<&str>) {
        *self.bearer.write().expect("lock") = Some((realm.to_owned(), service.map(str::to_owned)));
    }

    /// Remembers that the upstream asked for Basic credentials.
    pub fn remember_basic(&self) {
        self.basic_seen
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the upstream has asked for Basic credentials before.
    pub fn wants_basic(&self) -> bool {
        self.basic_seen.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The last Bearer realm and service seen, to fetch a token before the first request.
    pub fn known_bearer(&self) -> Option<(String, Option<String>)> {
        self.bearer.read().expect("lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull,push".into()),
            }
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None);
        let c = parse_challenge("bearer realm=http://a/t, service=s").unwrap();
        assert!(
            matches!(c, Challenge::Bearer { realm, service: Some(s), .. } if realm == "http://a/t" && s == "s")
        );
    }

    #[test]
    fn token_lifetimes() {
        let now = Instant::now();
        let t: TokenResponse =
            serde_json::from_str(r#"{"access_token":"abc","expires_in":300}"#).unwrap();
        let t = t.into_token(now).unwrap();
        assert_eq!(t.header, "Bearer abc");
        assert_eq!(t.expires_at, now + Duration::from_secs(290));
        let t: TokenResponse = serde_json::from_str(r#"{"token":"x"}"#).unwrap();
        assert_eq!(
            t.into_token(now).unwrap().expires_at,
            now + Duration::from_secs(50)
        );
        let t: TokenResponse = serde_json::from_str(r#"{"token":""}"#).unwrap();
        assert!(t.into_token(now).is_none());
    }

    #[test]
    fn remote_lifetimes_are_bounded() {
        let now = Instant::now();
        let expiry = |json: &str| {
            let t: TokenResponse = serde_json::from_str(json).unwrap();
            t.into_token(now).unwrap().expires_at - now
        };
        // A token server's number must not overflow the clock (that panicked).
        assert_eq!(
            expiry(r#"{"token":"x","expires_in":18446744073709551615}"#),
            MAX_TOKEN_LIFETIME - EXPIRY_MARGIN
        );
        assert_eq!(
            expiry(r#"{"token":"x","expires_in":1e300}"#),
            MAX_TOKEN_LIFETIME - EXPIRY_MARGIN
        );
        // Zero, negative, null or not a number: as if missing (the spec's 60 s).
        for missing in ["0", "-5", "-1e300", "null", "\"300\"", "true", "{}"] {
            assert_eq!(
                expiry(&format!(r#"{{"token":"x","expires_in":{missing}}}"#)),
                Duration::from_secs(50),
                "expires_in {missing}"
            );
        }
        // Short lifetimes are kept short: refreshed before they run out.
        assert_eq!(
            expiry(r#"{"token":"x","expires_in":12}"#),
            Duration::from_secs(6)
        );
        assert_eq!(
            expiry(r#"{"token":"x","expires_in":1}"#),
            Duration::from_millis(500)
        );
        assert_eq!(
            expiry(r#"{"token":"x","expires_in":300.5}"#),
            Duration::from_millis(290_500)
        );
    }

    #[test]
    fn basic_header() {
        assert_eq!(basic("user", "pass"), "Basic dXNlcjpwYXNz");
    }
}
