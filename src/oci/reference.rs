//! Repository names, tags and manifest references, valid by construction.
//!
//! The grammar is the distribution spec's: path components of `[a-z0-9]+` joined by `.`, `_`,
//! `__` or runs of `-`, separated by `/`, 255 characters at most. A valid name can never contain
//! `..`, `%`, a leading `/` or a NUL, so it is safe in file paths and upstream URLs.

use std::fmt;
use std::str::FromStr;

use super::digest::{Digest, DigestError};

/// Longest repository name the distribution spec allows.
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag the distribution spec allows.
pub const MAX_TAG_LEN: usize = 128;

/// A repository name such as `library/alpine`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

/// A tag such as `3.19`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

/// What follows `/manifests/`: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("repository name {0:?} is not valid")]
    Invalid(String),
    #[error("repository name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("tag {0:?} is not valid")]
    InvalidTag(String),
    #[error(transparent)]
    Digest(#[from] DigestError),
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// One path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
pub fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // a separator run: ".", "_", "__" or "-+"; must be followed by an alphanumeric
        let sep_len = match b[i] {
            b'.' => 1,
            b'_' if b.get(i + 1) == Some(&b'_') => 2,
            b'_' => 1,
            b'-' => b[i..].iter().take_while(|&&x| x == b'-').count(),
            _ => return false,
        };
        i += sep_len;
        if !b.get(i).is_some_and(|&x| is_alnum(x)) {
            return false;
        }
    }
    true
}

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path components.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// `prefix/self`, checked against the length limit.
    pub fn prefixed(&self, prefix: &str) -> Result<RepoName, NameError> {
        format!("{prefix}/{}", self.0).parse()
    }
}

impl FromStr for RepoName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        if s.split('/').all(valid_component) {
            Ok(RepoName(s.to_owned()))
        } else {
            Err(NameError::Invalid(s.to_owned()))
        }
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_TAG_LEN
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..]
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-');
        if ok {
            Ok(Tag(s.to_owned()))
        } else {
            Err(NameError::InvalidTag(s.to_owned()))
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Reference {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "alpine",
            "library/alpine",
            "a/b/c/d",
            "foo_bar",
            "foo__bar",
            "foo---bar",
            "f.o.o",
            "0",
            "team/sub.group/app-1",
        ] {
            assert!(ok.parse::<RepoName>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/alpine",
            "alpine/",
            "a//b",
            "..",
            "a/../b",
            "%2e%2e/x",
            "Alpine",
            "foo___bar",
            "foo.-bar",
            "-foo",
            "foo-",
            "a\0b",
            "a b",
        ] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad:?}");
        }
        let long = vec!["a"; 129].join("/");
        assert_eq!(long.parse::<RepoName>(), Err(NameError::TooLong));
    }

    #[test]
    fn tags_and_references() {
        assert!("latest".parse::<Tag>().is_ok());
        assert!("_x.Y-1".parse::<Tag>().is_ok());
        assert!(".x".parse::<Tag>().is_err());
        assert!("a".repeat(129).parse::<Tag>().is_err());
        assert!(matches!("3.19".parse::<Reference>(), Ok(Reference::Tag(_))));
        assert!(matches!(
            format!("sha256:{}", "0".repeat(64)).parse::<Reference>(),
            Ok(Reference::Digest(_))
        ));
        assert!("sha256:zz".parse::<Reference>().is_err());
    }
}
