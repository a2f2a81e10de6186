//! Private content isolation: cached content is served only to a request upstream would have
//! answered with it.
//!
//! The rule (documented in `config/regcache.toml`):
//! - Access control runs first, on the resolved route (`crate::access`), so a cached object is
//!   only ever served on a route the client may pull.
//! - On an upstream where regcache pulls with credentials of its own, a cached blob or
//!   manifest digest is served for repository R only if upstream served or confirmed that
//!   digest for R before (the index's `seen_in` records), else after an upstream `HEAD` in R
//!   (with regcache's credentials) answers 200. A 404 there is answered 404 (`BLOB_UNKNOWN` /
//!   `MANIFEST_UNKNOWN`), as upstream itself would. With `verify_access = true` even a known
//!   (digest, R) is confirmed again once per `cache.tag_ttl`.
//! - On a `pass_client_auth` upstream every manifest and blob request is first checked with an
//!   upstream `HEAD` carrying the client's own `Authorization`; upstream's 401 (with its
//!   `WWW-Authenticate`) or 403 goes back to the client before anything cached is served.
//! - Upstreams without credentials only ever hold public content: no extra checks.

use http::StatusCode;

use super::{ClientInfo, Proxy, Target, head, status_error};
use crate::error::{Error, Result};
use crate::oci::digest::Digest;
use crate::oci::media_type::UPSTREAM_ACCEPT;

/// What kind of object a check is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Blob,
    Manifest,
}

impl Kind {
    fn path(self, reference: &str) -> String {
        match self {
            Kind::Blob => format!("blobs/{reference}"),
            Kind::Manifest => format!("manifests/{reference}"),
        }
    }

    fn unknown(self, t: &Target, reference: &str) -> Error {
        match self {
            Kind::Blob => Error::BlobUnknown(format!("{reference} in {}", t.repo)),
            Kind::Manifest => Error::ManifestUnknown(format!("{}@{reference}", t.repo)),
        }
    }
}

impl Proxy {
    /// Before a cached (or in-flight) digest is served for `t` on an upstream regcache pulls
    /// from with its own credentials: is `t.repo` known to hold it? See the module docs.
    pub(crate) async fn may_serve(
        &self,
        t: &Target,
        kind: Kind,
        digest: &Digest,
        client: &ClientInfo,
    ) -> Result<()> {
        let up = &t.upstream;
        if !up.is_private() {
            return Ok(());
        }
        let key = (up.name.clone(), t.repo.clone(), digest.clone());
        if self.index.seen(&up.name, digest, &t.repo)?
            && (!up.verifies_access() || self.access_checked.contains_key(&key))
        {
            return Ok(());
        }
        let reference = digest.to_string();
        if self.config.cache.offline {
            self.count_isolation();
            return Err(kind.unknown(t, &reference));
        }
        if !self.upstream_has(t, kind, &reference, client).await? {
            self.count_isolation();
            tracing::info!(upstream = %up.name, repo = %t.repo, %digest, "cached digest not in this repository upstream; not served");
            return Err(kind.unknown(t, &reference));
        }
        self.note_seen(&up.name, digest, &t.repo)?;
        Ok(())
    }

    /// Upstream just served or confirmed `digest` for `repo`: known there (and, for
    /// `verify_access`, checked now).
    pub(crate) fn note_seen(
        &self,
        upstream: &str,
        digest: &Digest,
        repo: &crate::oci::reference::RepoName,
    ) -> Result<()> {
        self.index.put_seen(upstream, digest, repo)?;
        self.access_checked
            .insert((upstream.to_owned(), repo.clone(), digest.clone()), ());
        Ok(())
    }

    /// On a `pass_client_auth` upstream: asks upstream, with the client's credentials, whether
    /// it may have `reference` (a tag or digest) of `t.repo`. A 401/403 becomes the client's
    /// answer (with upstream's challenge).
    pub(crate) async fn client_check(
        &self,
        t: &Target,
        kind: Kind,
        reference: &str,
        client: &ClientInfo,
    ) -> Result<()> {
        if !t.upstream.passes_client_auth() {
            return Ok(());
        }
        if self.config.cache.offline {
            return Err(Error::Denied {
                reason: "upstream",
                message: format!(
                    "regcache is offline and cannot check access to {} upstream",
                    t.repo
                ),
            });
        }
        if self.upstream_has(t, kind, reference, client).await? {
            Ok(())
        } else {
            Err(kind.unknown(t, reference))
        }
    }

    /// An upstream `HEAD` of an object in `t.repo`: true for 2xx, false for 404, the matching
    /// error otherwise.
    async fn upstream_has(
        &self,
        t: &Target,
        kind: Kind,
        reference: &str,
        client: &ClientInfo,
    ) -> Result<bool> {
        let path = kind.path(reference);
        let resp = head(
            t,
            &path,
            (kind == Kind::Manifest).then_some(UPSTREAM_ACCEPT),
            client,
        )
        .await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(status_error(t, s, resp.headers(), || {
                kind.unknown(t, reference)
            })),
        }
    }

    fn count_isolation(&self) {
        self.metrics
            .access_denied
            .with_label_values(&["isolation"])
            .inc();
    }
}
