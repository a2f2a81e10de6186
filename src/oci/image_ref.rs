//! Docker image references (`[host[:port]/]path[:tag][@digest]`) and the names clients put in
//! request paths, with Docker's normalisation rules.
//!
//! The first component of a name is a registry host when it contains `.` or `:`, is
//! `localhost`, or has upper-case letters (Docker's rule), and is a valid host; everything after
//! it must be a repository path. In a request path, a first component that only looks like a
//! host (`my_group.v2/app`) is read as part of a repository path. `docker.io` and `index.docker.io` are Docker Hub, where a one-component
//! path gets `library/`.

use std::fmt;
use std::str::FromStr;

use super::digest::Digest;
use super::reference::{MAX_NAME_LEN, NameError, RepoName, Tag};

/// Docker Hub's canonical registry name.
pub const DOCKER_HUB: &str = "docker.io";

/// Whether a name's first component names a registry (Docker's rule).
pub fn is_registry_component(c: &str) -> bool {
    c == "localhost" || c.contains(['.', ':']) || c.bytes().any(|b| b.is_ascii_uppercase())
}

/// A registry host, `host[:port]`, by the reference grammar's domain rule: dot-separated labels
/// of letters, digits and inner hyphens, an optional numeric port, or a bracketed IPv6 address.
pub fn valid_registry(s: &str) -> bool {
    let valid_port =
        |p: &str| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = s.strip_prefix('[') {
        let Some((v6, tail)) = rest.split_once(']') else {
            return false;
        };
        return v6.parse::<std::net::Ipv6Addr>().is_ok()
            && (tail.is_empty() || tail.strip_prefix(':').is_some_and(valid_port));
    }
    let host = match s.rsplit_once(':') {
        Some((h, p)) if valid_port(p) => h,
        Some(_) => return false,
        None => s,
    };
    !host.is_empty()
        && host.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        })
}

/// Maps Docker Hub's aliases to `docker.io`; lower-cases every host.
pub fn canonical_registry(host: &str) -> String {
    let h = host.to_ascii_lowercase();
    match h.as_str() {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_owned(),
        _ => h,
    }
}

/// The repository name a client put in a request path: either a path on the upstream the
/// request is routed to, or `host/path` naming the registry itself. Which one it is depends on
/// the request (containerd's `?ns=` says the whole name is the path), so both readings are kept.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Name {
    raw: String,
    /// The whole name as a repository path, when it is one.
    whole: Option<RepoName>,
    /// `(registry, path)` when the first component names a registry.
    split: Option<(String, RepoName)>,
}

impl Name {
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The whole name as a repository path (how containerd's `?ns=` requests mean it).
    pub fn whole(&self) -> Option<&RepoName> {
        self.whole.as_ref()
    }

    /// The registry named by the first component, and the path after it.
    pub fn registry(&self) -> Option<(&str, &RepoName)> {
        self.split.as_ref().map(|(h, p)| (h.as_str(), p))
    }
}

impl FromStr for Name {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        let whole = s.parse::<RepoName>();
        // A first component that looks like a host but is not a valid one (`my_group.v2`) names
        // no registry: the whole-name reading alone decides.
        let split = match s.split_once('/') {
            Some((first, rest)) if is_registry_component(first) && valid_registry(first) => {
                match rest.parse::<RepoName>() {
                    Ok(path) => Some((canonical_registry(first), path)),
                    Err(e) if whole.is_err() => return Err(e),
                    Err(_) => None,
                }
            }
            _ => None,
        };
        let whole = whole.ok();
        if split.is_none() && whole.is_none() {
            return Err(NameError::Invalid(s.to_owned()));
        }
        Ok(Name {
            raw: s.to_owned(),
            whole,
            split,
        })
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// A full image reference as a user types it, normalised the way Docker does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `docker.io` when the user named no registry.
    pub registry: String,
    /// Whether the user named the registry.
    pub explicit_registry: bool,
    pub repo: RepoName,
    pub tag: Option<Tag>,
    pub digest: Option<Digest>,
}

impl ImageRef {
    /// The name a client sends regcache for this image: Docker Hub images as a registry
    /// mirror sends them (no registry in the path), any other with its registry as the
    /// path prefix (`ghcr.io/org/app`).
    pub fn request_name(&self) -> Name {
        let path = if !self.explicit_registry && self.registry == DOCKER_HUB {
            self.repo.to_string()
        } else {
            format!("{}/{}", self.registry, self.repo)
        };
        path.parse()
            .expect("a normalised reference is a valid request name")
    }

    /// What to ask the registry for: the digest wins over the tag; no tag means `latest`.
    pub fn reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.to_string(),
            (None, None) => "latest".to_owned(),
        }
    }
}

impl FromStr for ImageRef {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || NameError::Invalid(s.to_owned());
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d.parse::<Digest>()?)),
            None => (s, None),
        };
        // A tag is a ':' after the last '/', so `host:5000/img` has none.
        let (name, tag) = match rest.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t.parse::<Tag>()?)),
            _ => (rest, None),
        };
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(if name.is_empty() {
                invalid()
            } else {
                NameError::TooLong
            });
        }
        let (registry, explicit_registry, path) = match name.split_once('/') {
            Some((first, path)) if is_registry_component(first) => {
                if !valid_registry(first) {
                    return Err(invalid());
                }
                (canonical_registry(first), true, path)
            }
            _ => (DOCKER_HUB.to_owned(), false, name),
        };
        let mut repo: RepoName = path.parse()?;
        if registry == DOCKER_HUB && repo.components().count() == 1 {
            repo = repo.prefixed("library")?;
        }
        Ok(ImageRef {
            registry,
            explicit_registry,
            repo,
            tag,
            digest,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repo)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:1b1f8d7d2c8b5e8a3b8e5fb0a0b0e1b7b4a8e8f1c2d3e4f5a6b7c8d9e0f1a2b3";

    #[test]
    fn references_a_docker_user_types() {
        // (input, registry, repo, reference)
        let cases = [
            ("alpine", "docker.io", "library/alpine", "latest"),
            ("alpine:3.20", "docker.io", "library/alpine", "3.20"),
            (
                "docker.io/library/nginx:1.27",
                "docker.io",
                "library/nginx",
                "1.27",
            ),
            (
                "index.docker.io/library/nginx",
                "docker.io",
                "library/nginx",
                "latest",
            ),
            ("docker.io/nginx", "docker.io", "library/nginx", "latest"),
            ("bitnami/redis:7.2", "docker.io", "bitnami/redis", "7.2"),
            (&format!("ghcr.io/org/app@{D}"), "ghcr.io", "org/app", D),
            (&format!("ghcr.io/org/app:1.0@{D}"), "ghcr.io", "org/app", D),
            (
                "123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/api:2",
                "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
                "team/api",
                "2",
            ),
            (
                "registry.acme.com/engineering/web-app:1.0",
                "registry.acme.com",
                "engineering/web-app",
                "1.0",
            ),
            (
                "dockerhub.example.com:5100/com.example.namespace/centos7-elasticsearch:latest",
                "dockerhub.example.com:5100",
                "com.example.namespace/centos7-elasticsearch",
                "latest",
            ),
            ("localhost/x", "localhost", "x", "latest"),
            (
                "localhost:5000/a/b/c/d:v1",
                "localhost:5000",
                "a/b/c/d",
                "v1",
            ),
            (
                "registry.gitlab.com/group/sub/project/img:x",
                "registry.gitlab.com",
                "group/sub/project/img",
                "x",
            ),
            (
                "Docker.IO/library/ubuntu",
                "docker.io",
                "library/ubuntu",
                "latest",
            ),
            ("[::1]:5000/img:tag", "[::1]:5000", "img", "tag"),
            ("127.0.0.1:5000/img", "127.0.0.1:5000", "img", "latest"),
            ("foo_bar.com:8080/x", "foo_bar.com:8080", "x", "latest"),
        ];
        for (input, registry, repo, reference) in cases {
            if registry == "foo_bar.com:8080" {
                assert!(
                    input.parse::<ImageRef>().is_err(),
                    "underscore in host: {input}"
                );
                continue;
            }
            let r: ImageRef = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(
                (r.registry.as_str(), r.repo.as_str(), r.reference().as_str()),
                (registry, repo, reference),
                "{input}"
            );
        }
    }

    #[test]
    fn invalid_references() {
        for bad in [
            "",
            ":justtag",
            "@sha256:ffff",
            "Uppercase:tag",
            "docker.io/Library/alpine",
            "a/../b",
            "a//b",
            "repo:tag:more",
            "repo@sha256:short",
            "repo@md5:abcd",
            "host:port/x",
            "host:/x",
            "[::1/x",
            "-host.com/x",
            "validname@invaliddigest:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "aa/asdf$$^/aa",
        ] {
            assert!(
                bad.parse::<ImageRef>().is_err(),
                "{bad:?} should be invalid"
            );
        }
        let long = format!("docker.io/{}", "a".repeat(250));
        assert_eq!(long.parse::<ImageRef>(), Err(NameError::TooLong));
        let tag = format!("x:{}", "t".repeat(129));
        assert!(tag.parse::<ImageRef>().is_err());
    }

    #[test]
    fn request_names_keep_both_readings() {
        let n: Name = "quay.io/some.org/app".parse().unwrap();
        assert_eq!(n.whole().unwrap().as_str(), "quay.io/some.org/app");
        let (host, path) = n.registry().unwrap();
        assert_eq!((host, path.as_str()), ("quay.io", "some.org/app"));

        let n: Name = "registry.corp:5443/team/app".parse().unwrap();
        assert!(n.whole().is_none(), "a port is no path component");
        assert_eq!(n.registry().unwrap().0, "registry.corp:5443");

        let n: Name = "library/alpine".parse().unwrap();
        assert!(n.registry().is_none());
        assert_eq!(n.whole().unwrap().as_str(), "library/alpine");

        let n: Name = "INDEX.docker.io/x".parse().unwrap();
        assert_eq!(n.registry().unwrap().0, "docker.io");

        // A first component that looks like a host but is none (`_` is no host character)
        // gives no registry reading; the whole name is still a repository path, which is what
        // containerd's `?ns=` means by it.
        for name in ["my_group.v2/app", "foo_bar.com/x/y", "a__b.c/d"] {
            let n: Name = name.parse().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(n.registry().is_none(), "{name}");
            assert_eq!(n.whole().unwrap().as_str(), name);
        }

        for bad in [
            "..",
            "a/../b",
            "bad host:1/x",
            "host:99999999/x",
            "Upper/Case",
            "x/",
            "bad_host:5000/x",
            "my_group.v2/App",
            "Foo_Bar/app",
        ] {
            assert!(bad.parse::<Name>().is_err(), "{bad:?}");
        }
    }
}
