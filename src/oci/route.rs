//! Request path + query -> [`Route`], parsed once at the edge.
//!
//! Everything a route carries is already valid by type, so nothing downstream re-checks a name or
//! digest before using it in a file path or an upstream URL.

use super::digest::{Digest, DigestError};
use super::image_ref::Name;
use super::reference::{NameError, Reference};

/// A parsed registry API request path (method-independent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: the API version check.
    Base,
    /// `/v2/_catalog`.
    Catalog,
    /// `/v2/<name>/manifests/<reference>`.
    Manifest { name: Name, reference: Reference },
    /// `/v2/<name>/blobs/<digest>`.
    Blob { name: Name, digest: Digest },
    /// `/v2/<name>/blobs/uploads/...`: a push, which a mirror never accepts.
    Upload { name: Name },
    /// `/v2/<name>/tags/list`.
    TagsList { name: Name },
    /// `/v2/<name>/referrers/<digest>`.
    Referrers { name: Name, digest: Digest },
}

/// The parsed request: its route and containerd's `ns` parameter, if given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub route: Route,
    pub ns: Option<String>,
}

/// Why a path is not a registry request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("{0}")]
    Name(#[from] NameError),
    #[error("no such registry API endpoint")]
    NotFound,
}

impl From<DigestError> for RouteError {
    fn from(e: DigestError) -> Self {
        RouteError::Name(NameError::Digest(e))
    }
}

impl Request {
    /// Parses a request target's path and (raw) query string.
    pub fn parse(path: &str, query: Option<&str>) -> Result<Request, RouteError> {
        let route = parse_path(path)?;
        let ns = query.and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "ns")
                .map(|(_, v)| v.into_owned())
        });
        Ok(Request { route, ns })
    }
}

fn parse_path(path: &str) -> Result<Route, RouteError> {
    let rest = match path {
        "/v2" | "/v2/" => return Ok(Route::Base),
        _ => path.strip_prefix("/v2/").ok_or(RouteError::NotFound)?,
    };
    if rest == "_catalog" {
        return Ok(Route::Catalog);
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    let name_of = |end: usize| -> Result<Name, RouteError> {
        if end == 0 {
            return Err(RouteError::NotFound);
        }
        Ok(segs[..end].join("/").parse()?)
    };
    // Uploads first: `blobs/uploads/`, `blobs/uploads/<id>` (the name may not end in "blobs").
    for k in [2, 3] {
        if n > k && segs[n - k] == "blobs" && segs[n - k + 1] == "uploads" {
            return Ok(Route::Upload {
                name: name_of(n - k)?,
            });
        }
    }
    if n < 3 {
        return Err(RouteError::NotFound);
    }
    let (kind, last) = (segs[n - 2], segs[n - 1]);
    match kind {
        "manifests" => Ok(Route::Manifest {
            name: name_of(n - 2)?,
            reference: last.parse()?,
        }),
        "blobs" => Ok(Route::Blob {
            name: name_of(n - 2)?,
            digest: last.parse()?,
        }),
        "tags" if last == "list" => Ok(Route::TagsList {
            name: name_of(n - 2)?,
        }),
        "referrers" => Ok(Route::Referrers {
            name: name_of(n - 2)?,
            digest: last.parse()?,
        }),
        _ => Err(RouteError::NotFound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn route(p: &str) -> Result<Route, RouteError> {
        Request::parse(p, None).map(|r| r.route)
    }

    #[test]
    fn parses_endpoints() {
        assert_eq!(route("/v2/").unwrap(), Route::Base);
        assert_eq!(route("/v2").unwrap(), Route::Base);
        assert_eq!(route("/v2/_catalog").unwrap(), Route::Catalog);
        match route("/v2/library/alpine/manifests/3.19").unwrap() {
            Route::Manifest { name, reference } => {
                assert_eq!(name.as_str(), "library/alpine");
                assert_eq!(reference.to_string(), "3.19");
            }
            r => panic!("{r:?}"),
        }
        match route(&format!("/v2/a/manifests/manifests/{D}")).unwrap() {
            Route::Manifest { name, reference } => {
                assert_eq!(name.as_str(), "a/manifests");
                assert!(matches!(reference, Reference::Digest(_)));
            }
            r => panic!("{r:?}"),
        }
        assert!(matches!(
            route(&format!("/v2/x/y/blobs/{D}")),
            Ok(Route::Blob { .. })
        ));
        assert!(matches!(
            route("/v2/x/tags/list"),
            Ok(Route::TagsList { .. })
        ));
        assert!(matches!(
            route("/v2/x/blobs/uploads/"),
            Ok(Route::Upload { .. })
        ));
        assert!(matches!(
            route("/v2/x/blobs/uploads/abc-123"),
            Ok(Route::Upload { .. })
        ));
        assert!(matches!(
            route(&format!("/v2/x/referrers/{D}")),
            Ok(Route::Referrers { .. })
        ));
    }

    #[test]
    fn rejects_bad_paths() {
        assert_eq!(route("/v1/x"), Err(RouteError::NotFound));
        assert_eq!(route("/v2/x/unknown/y"), Err(RouteError::NotFound));
        assert_eq!(route("/v2/manifests/latest"), Err(RouteError::NotFound));
        assert!(matches!(
            route("/v2/../etc/manifests/latest"),
            Err(RouteError::Name(_))
        ));
        assert!(matches!(
            route("/v2/%2e%2e/x/manifests/latest"),
            Err(RouteError::Name(_))
        ));
        assert!(matches!(
            route("/v2//etc/manifests/latest"),
            Err(RouteError::Name(_))
        ));
        assert!(matches!(
            route("/v2/x/blobs/sha256:123"),
            Err(RouteError::Name(_))
        ));
        assert!(matches!(
            route("/v2/x/manifests/bad!tag"),
            Err(RouteError::Name(_))
        ));
    }

    #[test]
    fn reads_ns_parameter() {
        let r = Request::parse("/v2/org/app/manifests/1", Some("ns=ghcr.io&x=1")).unwrap();
        assert_eq!(r.ns.as_deref(), Some("ghcr.io"));
        let r = Request::parse("/v2/org/app/manifests/1", Some("x=1")).unwrap();
        assert_eq!(r.ns, None);
    }
}
