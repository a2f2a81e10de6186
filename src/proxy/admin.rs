//! Operator actions on a running cache: list, purge, warm. Served on `admin_listen` (loopback
//! by default) and used by `regcache warm`.

use std::sync::Arc;

use super::blobs::BlobBody;
use super::{ClientInfo, Proxy};
use crate::error::{Error, Result};
use crate::oci::digest::Digest;
use crate::oci::image_ref::ImageRef;
use crate::oci::media_type::UPSTREAM_ACCEPT;
use crate::oci::reference::{Reference, Tag};

/// What warming one image did.
#[derive(Debug, serde::Serialize)]
pub struct Warmed {
    pub image: String,
    pub digest: String,
    /// Manifests and blobs now cached, and their bytes.
    pub objects: usize,
    pub bytes: u64,
}

/// What a purge removed.
#[derive(Debug, Default, serde::Serialize)]
pub struct Purged {
    pub tags: Vec<String>,
    pub objects: Vec<String>,
}

impl Proxy {
    /// Pulls an image into the cache, as a client would: every platform of an index, or only
    /// those in `platforms` (`os/arch[/variant]`, e.g. `linux/amd64`).
    pub async fn warm(self: &Arc<Self>, image: &str, platforms: &[String]) -> Result<Warmed> {
        let r: ImageRef = image
            .parse()
            .map_err(|e: crate::oci::reference::NameError| Error::NameInvalid(e.to_string()))?;
        let name = r.request_name();
        let t = self.resolve(&name, None)?;
        let client = ClientInfo {
            accept: UPSTREAM_ACCEPT.to_owned(),
            authorization: None,
        };
        let reference: Reference = r
            .reference()
            .parse()
            .map_err(|e: crate::oci::reference::NameError| Error::TagInvalid(e.to_string()))?;
        let (root, _) = self.manifest(&t, &reference, &client).await?;
        let mut out = Warmed {
            image: image.to_owned(),
            digest: root.digest.to_string(),
            objects: 1,
            bytes: root.bytes.len() as u64,
        };
        let mut manifests = vec![root];
        while let Some(m) = manifests.pop() {
            let v: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap_or_default();
            let digest_at =
                |x: &serde_json::Value| x["digest"].as_str().and_then(|s| s.parse::<Digest>().ok());
            for child in v["manifests"].as_array().into_iter().flatten() {
                let p = &child["platform"];
                let platform = [&p["os"], &p["architecture"], &p["variant"]]
                    .iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join("/");
                let wanted = platforms.is_empty()
                    || platforms
                        .iter()
                        .any(|w| platform == *w || platform.starts_with(&format!("{w}/")));
                if !wanted {
                    continue;
                }
                if let Some(d) = digest_at(child) {
                    let (c, _) = self.manifest(&t, &Reference::Digest(d), &client).await?;
                    out.objects += 1;
                    out.bytes += c.bytes.len() as u64;
                    manifests.push(c);
                }
            }
            let blobs = std::iter::once(&v["config"])
                .chain(v["layers"].as_array().into_iter().flatten())
                .filter_map(digest_at);
            for d in blobs {
                let answer = self.blob(&t, &d, false, &client).await?;
                // Read it through: the fill completes (and commits) as for any client.
                if let Some(mut reader) = answer.reader(0, answer.size) {
                    while let Some(chunk) = reader.next_chunk().await {
                        out.bytes +=
                            chunk.map_err(|e| Error::Internal(e.to_string()))?.len() as u64;
                    }
                } else if let Some(n) = answer.size {
                    out.bytes += n;
                }
                // A warm is done only when its blobs are in the cache, which is just after
                // their last byte.
                if let BlobBody::Fill(fill) = &answer.body {
                    fill.settled().await;
                }
                out.objects += 1;
            }
        }
        Ok(out)
    }

    /// Forgets a tag (and removes the manifest it named), or removes one object by digest,
    /// so the next pull fetches it again from upstream.
    pub async fn purge(
        &self,
        repo: Option<&str>,
        tag: Option<&str>,
        digest: Option<&str>,
    ) -> Result<Purged> {
        let mut out = Purged::default();
        let mut digests: Vec<Digest> = Vec::new();
        if let Some(d) = digest {
            digests.push(d.parse().map_err(|e: crate::oci::digest::DigestError| {
                Error::DigestInvalid(e.to_string())
            })?);
        }
        if let Some(repo) = repo {
            let tag_ok = |t: &str| tag.is_none_or(|x| x == t);
            for (up, r, t, d) in self.index.tags()? {
                if r != repo || !tag_ok(&t) {
                    continue;
                }
                let (Ok(rn), Ok(tn)) = (r.parse(), t.parse::<Tag>()) else {
                    continue;
                };
                self.index.remove_tag(&up, &rn, &tn)?;
                out.tags.push(format!("{up}/{r}:{t}"));
                digests.extend(d.parse().ok());
            }
        }
        for d in digests {
            self.hot_manifests.invalidate(&d);
            self.store.remove(&d).await?;
            self.index.forget(&d)?;
            out.objects.push(d.to_string());
        }
        if out.tags.is_empty() && out.objects.is_empty() {
            return Err(Error::NameUnknown(
                "nothing cached matches; give repo (and tag) or digest".into(),
            ));
        }
        tracing::info!(tags = ?out.tags, objects = ?out.objects, "purged");
        Ok(out)
    }
}
