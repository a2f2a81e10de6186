//! htpasswd files as `htpasswd -B` writes them: `user:$2y$...` lines, bcrypt only.
//!
//! Other hash kinds (`$apr1$` MD5, `{SHA}`, crypt, plain text) are refused when the file is
//! loaded, so a weak hash never guards the cache. Verification is slow on purpose (bcrypt):
//! callers run it off the async threads.

use std::collections::HashMap;

/// The users of an htpasswd file: name -> bcrypt hash.
#[derive(Clone, Default)]
pub struct Htpasswd {
    users: HashMap<String, String>,
}

/// Never prints a hash.
impl std::fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Htpasswd")
            .field("users", &self.users.len())
            .finish()
    }
}

impl Htpasswd {
    /// Parses the file's text; every bad line is one problem (`line N: ...`).
    pub fn parse(text: &str) -> Result<Htpasswd, Vec<String>> {
        let mut users = HashMap::new();
        let mut problems = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                problems.push(format!("line {n}: not `user:hash`"));
                continue;
            };
            if user.is_empty() {
                problems.push(format!("line {n}: empty user name"));
                continue;
            }
            if let Some(kind) = not_bcrypt(hash) {
                problems.push(format!(
                    "line {n} (user {user:?}): {kind}, not bcrypt; write it with `htpasswd -B`"
                ));
                continue;
            }
            if users.insert(user.to_owned(), hash.to_owned()).is_some() {
                problems.push(format!("line {n}: user {user:?} appears twice"));
            }
        }
        if problems.is_empty() {
            Ok(Htpasswd { users })
        } else {
            Err(problems)
        }
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The bcrypt hash of a user, if the file has one.
    pub fn hash(&self, user: &str) -> Option<&str> {
        self.users.get(user).map(String::as_str)
    }

    /// Checks a password against the user's hash (slow: bcrypt). Unknown users are checked
    /// against a dummy hash, so timing does not say which names exist.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        match self.hash(user) {
            Some(h) => bcrypt::verify(password, h).unwrap_or(false),
            None => {
                let dummy = DUMMY.get_or_init(|| {
                    bcrypt::hash("regcache-no-such-user", bcrypt::DEFAULT_COST).unwrap_or_default()
                });
                let _ = bcrypt::verify(password, dummy);
                false
            }
        }
    }
}

/// A bcrypt hash of nothing anyone types, checked for unknown users.
static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// What kind of hash this is when it is not bcrypt; `None` for bcrypt.
fn not_bcrypt(hash: &str) -> Option<&'static str> {
    for p in ["$2a$", "$2b$", "$2y$", "$2x$"] {
        if let Some(rest) = hash.strip_prefix(p) {
            // cost (2 digits) '$' 53 characters of salt and hash
            let ok = rest.len() == 56
                && rest.as_bytes()[..2].iter().all(u8::is_ascii_digit)
                && rest.as_bytes()[2] == b'$';
            return if ok {
                None
            } else {
                Some("a malformed bcrypt hash")
            };
        }
    }
    Some(if hash.starts_with("$apr1$") {
        "an MD5 ($apr1$) hash"
    } else if hash.starts_with("{SHA}") {
        "a SHA-1 ({SHA}) hash"
    } else if hash.starts_with("$1$") || hash.starts_with("$5$") || hash.starts_with("$6$") {
        "a crypt(3) hash"
    } else {
        "plain text or an unknown hash"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcrypt_entries_load_and_verify() {
        let h = bcrypt::hash("s3cret", 4).unwrap();
        let file = Htpasswd::parse(&format!("# users\nalice:{h}\n\n")).unwrap();
        assert_eq!(file.len(), 1);
        assert!(file.verify("alice", "s3cret"));
        assert!(!file.verify("alice", "wrong"));
        assert!(!file.verify("mallory", "s3cret"));
        assert!(!format!("{file:?}").contains(&h));
    }

    #[test]
    fn other_hash_kinds_are_refused_by_line() {
        let h = bcrypt::hash("x", 4).unwrap();
        let text = format!(
            "a:$apr1$abc$def\nb:{{SHA}}qUqP5cyxm6YcTAhz05Hph5gvu9M=\nc:plain\nd:$6$salt$x\nok:{h}\nnocolon\ne:$2y$10$short\n"
        );
        let p = Htpasswd::parse(&text).unwrap_err().join("\n");
        for needle in [
            "line 1 (user \"a\"): an MD5 ($apr1$) hash",
            "line 2 (user \"b\"): a SHA-1",
            "line 3 (user \"c\"): plain text",
            "line 4 (user \"d\"): a crypt(3)",
            "line 6: not `user:hash`",
            "line 7 (user \"e\"): a malformed bcrypt",
            "htpasswd -B",
        ] {
            assert!(p.contains(needle), "{needle:?} not in:\n{p}");
        }
        assert!(!p.contains("line 5"), "{p}");
    }
}
