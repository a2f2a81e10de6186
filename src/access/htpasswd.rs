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
    /// A user's hash of the file's most common bcrypt cost, checked for names the file does
    /// not have, so that they take as long as the names it has.
    decoy: Option<String>,
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
            let decoy = decoy(&users);
            Ok(Htpasswd { users, decoy })
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
    /// against another user's hash of the file's usual cost, and fail whatever it says, so
    /// timing does not say which names exist.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        match (self.hash(user), &self.decoy) {
            (Some(h), _) => bcrypt::verify(password, h).unwrap_or(false),
            (None, Some(decoy)) => {
                let _ = bcrypt::verify(password, decoy);
                false
            }
            (None, None) => false,
        }
    }
}

/// The hash unknown names are checked against: one of the most common cost among `users`
/// (the same one every time).
fn decoy(users: &HashMap<String, String>) -> Option<String> {
    // `$2y$05$...`: the cost is the two digits after the prefix.
    let cost = |h: &String| h.get(4..6).unwrap_or_default().to_owned();
    let mut by_cost: HashMap<String, usize> = HashMap::new();
    for h in users.values() {
        *by_cost.entry(cost(h)).or_default() += 1;
    }
    let (usual, _) = by_cost
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))?;
    users
        .iter()
        .filter(|(_, h)| cost(h) == usual)
        .min_by_key(|(name, _)| name.as_str())
        .map(|(_, h)| h.clone())
}

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

    /// Unknown names cost what known ones do: they are checked against a hash of the
    /// file's most common cost (the old dummy was always cost 12, 2^7 times `htpasswd -B`'s
    /// default 5), and fail even with that user's password.
    #[test]
    fn unknown_names_are_checked_at_the_files_usual_cost() {
        let (a, b, c) = (
            bcrypt::hash("pa", 5).unwrap(),
            bcrypt::hash("pb", 5).unwrap(),
            bcrypt::hash("pc", 4).unwrap(),
        );
        let file = Htpasswd::parse(&format!("carol:{c}\nalice:{a}\nbob:{b}\n")).unwrap();
        assert_eq!(
            file.decoy.as_deref(),
            Some(a.as_str()),
            "cost 5, first by name"
        );
        assert!(!file.verify("mallory", "pa"));
        assert!(file.verify("alice", "pa"));
        assert_eq!(Htpasswd::parse("").unwrap().decoy, None);
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
