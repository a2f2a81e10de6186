//! Manifest media types and `Accept` negotiation.

pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST_V1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// What regcache asks upstream for when it fills the cache: every modern manifest type, so the
/// cached form is the richest one (an index rather than one platform's manifest).
pub const UPSTREAM_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Whether a client whose `Accept` header values are `accept` takes `media_type`.
///
/// A client that sends no `Accept` (or `*/*`) takes whatever the cache holds.
pub fn accepts<'a>(accept: impl IntoIterator<Item = &'a str>, media_type: &str) -> bool {
    let mut any = false;
    for value in accept {
        for item in value.split(',') {
            let mt = item.split(';').next().unwrap_or("").trim();
            if mt.is_empty() {
                continue;
            }
            any = true;
            if mt == "*/*" || mt.eq_ignore_ascii_case(media_type) {
                return true;
            }
        }
    }
    !any
}

/// The media type of a manifest body whose response carried no useful `Content-Type`
/// (some registries send `application/json` or nothing): the `mediaType` field, else the shape.
pub fn sniff(body: &[u8]) -> Option<&'static str> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Shape {
        schema_version: Option<u32>,
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        layers: Option<serde_json::Value>,
        signatures: Option<serde_json::Value>,
    }
    let s: Shape = serde_json::from_slice(body).ok()?;
    let known = [
        DOCKER_MANIFEST_V2,
        DOCKER_MANIFEST_LIST,
        OCI_MANIFEST,
        OCI_INDEX,
        DOCKER_MANIFEST_V1_SIGNED,
    ];
    if let Some(mt) = s.media_type {
        return known.into_iter().find(|k| *k == mt);
    }
    match (s.schema_version, s.manifests, s.layers, s.signatures) {
        (Some(1), _, _, Some(_)) => Some(DOCKER_MANIFEST_V1_SIGNED),
        (Some(2), Some(_), _, _) => Some(OCI_INDEX),
        (Some(2), None, Some(_), _) => Some(OCI_MANIFEST),
        _ => None,
    }
}

/// Whether a `Content-Type` needs [`sniff`]ing rather than being passed on as it is.
pub fn is_generic(content_type: Option<&str>) -> bool {
    match content_type {
        None => true,
        Some(ct) => {
            let mt = ct.split(';').next().unwrap_or("").trim();
            mt.is_empty() || mt == "application/json" || mt == "text/plain"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        assert!(accepts([], OCI_INDEX));
        assert!(accepts(["*/*"], OCI_INDEX));
        assert!(accepts([UPSTREAM_ACCEPT], DOCKER_MANIFEST_LIST));
        assert!(accepts(
            [DOCKER_MANIFEST_V2, "application/json; q=0.5"],
            DOCKER_MANIFEST_V2
        ));
        assert!(!accepts([DOCKER_MANIFEST_V2], OCI_INDEX));
        assert!(accepts(
            [
                DOCKER_MANIFEST_V2,
                "application/vnd.oci.image.index.v1+json;q=0.9"
            ],
            OCI_INDEX
        ));
    }

    #[test]
    fn sniffing() {
        assert_eq!(
            sniff(br#"{"schemaVersion":2,"manifests":[]}"#),
            Some(OCI_INDEX)
        );
        assert_eq!(
            sniff(br#"{"schemaVersion":2,"config":{},"layers":[]}"#),
            Some(OCI_MANIFEST)
        );
        assert_eq!(
            sniff(
                format!(r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST_LIST}"}}"#).as_bytes()
            ),
            Some(DOCKER_MANIFEST_LIST)
        );
        assert_eq!(sniff(b"not json"), None);
        assert!(is_generic(Some("application/json; charset=utf-8")));
        assert!(!is_generic(Some(OCI_INDEX)));
    }
}
