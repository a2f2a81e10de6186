//! Manifest media types and `Accept` negotiation.

use std::borrow::Cow;

pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST_V1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const DOCKER_MANIFEST_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// What regcache asks upstream for when it fills the cache: every modern manifest type, so the
/// cached form is the richest one (an index rather than one platform's manifest).
pub const UPSTREAM_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Whether a client whose `Accept` header values are `accept` takes `media_type`, by RFC 9110
/// (12.5.1): the most specific media range that matches decides (`type/subtype`, then `type/*`,
/// then `*/*`), and a weight of `q=0` there means "not acceptable" (12.4.2).
///
/// Leniencies, all on the side of taking a type: a client that sends no `Accept` (or only
/// empty elements) takes whatever the cache holds; parameters other than `q` do not narrow a
/// range (manifest types carry none, and a client that adds `charset` still means the type);
/// of ranges as specific as each other, one with a weight above zero is enough; a weight that
/// is not a well-formed qvalue counts as 1; a bare `*` (Java's default `Accept`) is `*/*`.
///
/// Runs on every manifest request, without allocating. Most clients send a plain list of types
/// (Docker, containerd, podman): no weight, wildcard, parameter or quoted value. A match alone
/// answers that, as cheaply as a string compare per type (the full parse below cost 4.5% of
/// the hot manifest's CPU).
pub fn accepts<'a, I>(accept: I, media_type: &str) -> bool
where
    I: IntoIterator<Item = &'a str> + Clone,
{
    if let Some(listed) = plain_list(accept.clone()) {
        let mut listed = listed.peekable();
        return listed.peek().is_none() || listed.any(|t| t.eq_ignore_ascii_case(media_type));
    }
    let main_type = media_type.split_once('/').map_or(media_type, |(t, _)| t);
    let mut any = false;
    // (specificity, acceptable) of the most specific matching range so far.
    let mut best: Option<(u8, bool)> = None;
    for value in accept {
        for element in split_unquoted(value, b',') {
            let mut parts = split_unquoted(element, b';');
            let range = parts.next().unwrap_or("").trim();
            if range.is_empty() {
                continue;
            }
            any = true;
            let specificity = match range.split_once('/') {
                None if range == "*" => 1,
                Some(("*", "*")) => 1,
                Some((t, "*")) if t.eq_ignore_ascii_case(main_type) => 2,
                Some(_) if range.eq_ignore_ascii_case(media_type) => 3,
                _ => continue,
            };
            // The first `q` is the weight; parameters after it are extensions (12.5.1).
            let weight = parts.find_map(|p| {
                let (name, value) = p.split_once('=')?;
                name.trim().eq_ignore_ascii_case("q").then(|| value.trim())
            });
            let acceptable = !weight.is_some_and(is_zero_qvalue);
            best = match best {
                Some((s, ok)) if s > specificity => Some((s, ok)),
                Some((s, ok)) if s == specificity => Some((s, ok || acceptable)),
                _ => Some((specificity, acceptable)),
            };
        }
    }
    match best {
        Some((_, acceptable)) => acceptable,
        None => !any,
    }
}

/// Whether a client whose `Accept` header values are `accept` takes every one of `types` (at
/// most 64), as [`accepts`] says, in one pass over a plain list.
pub fn accepts_all<'a, I>(accept: I, types: &[&str]) -> bool
where
    I: IntoIterator<Item = &'a str> + Clone,
{
    debug_assert!(types.len() <= 64);
    let Some(listed) = plain_list(accept.clone()) else {
        return types.iter().all(|t| accepts(accept.clone(), t));
    };
    let (mut any, mut taken) = (false, 0u64);
    for t in listed {
        any = true;
        if let Some(i) = types.iter().position(|m| t.eq_ignore_ascii_case(m)) {
            taken |= 1 << i;
        }
    }
    !any || taken.count_ones() as usize == types.len()
}

/// The types of an `Accept` that is a plain list (no weight, wildcard, parameter or quoted
/// value), else `None`.
fn plain_list<'a, I>(accept: I) -> Option<impl Iterator<Item = &'a str>>
where
    I: IntoIterator<Item = &'a str> + Clone,
{
    let plain = |v: &str| !v.bytes().any(|b| matches!(b, b'*' | b';' | b'"'));
    accept.clone().into_iter().all(plain).then(|| {
        (accept.into_iter().flat_map(|v| v.split(',')))
            .map(str::trim)
            .filter(|t| !t.is_empty())
    })
}

/// Whether a weight is a well-formed zero: `0` [ `.` 0*3`0` ] (RFC 9110, 12.4.2).
fn is_zero_qvalue(q: &str) -> bool {
    match q.strip_prefix('0') {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix('.')
            .is_some_and(|frac| frac.len() <= 3 && frac.bytes().all(|b| b == b'0')),
        None => false,
    }
}

/// `s` split at each `sep` outside a quoted string (quoted parameter values may hold `,` and
/// `;`). `sep` must be ASCII.
fn split_unquoted(s: &str, sep: u8) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let s = rest?;
        let (mut quoted, mut escaped) = (false, false);
        for (i, b) in s.bytes().enumerate() {
            if escaped {
                escaped = false;
            } else if quoted && b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                quoted = !quoted;
            } else if !quoted && b == sep {
                rest = Some(&s[i + 1..]);
                return Some(&s[..i]);
            }
        }
        rest = None;
        Some(s)
    })
}

/// The media type of a manifest body whose response carried no useful `Content-Type`
/// (some registries send `application/json` or nothing): the `mediaType` field when it is a
/// well-formed, specific media type (a known one in its canonical spelling, any other as the
/// body spells it: an artifact manifest, say), else the shape.
pub fn sniff(body: &[u8]) -> Option<Cow<'static, str>> {
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
        DOCKER_MANIFEST_V1,
    ];
    if let Some(mt) = s
        .media_type
        .filter(|mt| is_media_type(mt) && !is_generic(Some(mt)))
    {
        return Some(
            match known.into_iter().find(|k| k.eq_ignore_ascii_case(&mt)) {
                Some(k) => Cow::Borrowed(k),
                None => Cow::Owned(mt),
            },
        );
    }
    let shape = match (s.schema_version, s.manifests, s.layers, s.signatures) {
        (Some(1), _, _, Some(_)) => DOCKER_MANIFEST_V1_SIGNED,
        (Some(1), _, _, None) => DOCKER_MANIFEST_V1,
        (Some(2), Some(_), _, _) => OCI_INDEX,
        (Some(2), None, Some(_), _) => OCI_MANIFEST,
        _ => return None,
    };
    Some(Cow::Borrowed(shape))
}

/// Whether `s` is a bare media type, `type/subtype`, by RFC 6838's restricted-name rule (the
/// OCI spec's grammar for `mediaType`): each name starts with a letter or digit and has at
/// most 127 characters from `A-Za-z0-9!#$&^_.+-`. No parameters, spaces or control
/// characters, so it is safe to send back as a `Content-Type`.
fn is_media_type(s: &str) -> bool {
    let name = |n: &str| {
        let b = n.as_bytes();
        (1..=127).contains(&b.len())
            && b[0].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(c))
    };
    s.split_once('/')
        .is_some_and(|(t, sub)| name(t) && name(sub))
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

    /// RFC 9110, 12.4.2 and 12.5.1: `q=0` means "not acceptable", and the most specific range
    /// that matches a type decides its weight.
    #[test]
    fn q_zero_refuses_and_the_most_specific_range_decides() {
        let takes_every_type = |accept: &str| {
            let types = [
                OCI_INDEX,
                DOCKER_MANIFEST_LIST,
                OCI_MANIFEST,
                DOCKER_MANIFEST_V2,
            ];
            let each = types.iter().all(|mt| accepts([accept], mt));
            assert_eq!(accepts_all([accept], &types), each, "{accept}");
            each
        };
        // A client that refuses both index types in so many words.
        let no_index = format!(
            "{OCI_INDEX};q=0, {DOCKER_MANIFEST_LIST}; q=0, {OCI_MANIFEST}, {DOCKER_MANIFEST_V2}"
        );
        assert!(!accepts([no_index.as_str()], OCI_INDEX));
        assert!(!accepts([no_index.as_str()], DOCKER_MANIFEST_LIST));
        assert!(accepts([no_index.as_str()], OCI_MANIFEST));
        assert!(!takes_every_type(&no_index));
        assert!(takes_every_type(UPSTREAM_ACCEPT));
        // The plain lists real clients send take the quick path, with the same answers.
        assert!(takes_every_type(&UPSTREAM_ACCEPT.to_uppercase()));
        assert!(!takes_every_type(&format!(
            "{OCI_INDEX}, {OCI_MANIFEST},, {DOCKER_MANIFEST_V2}"
        )));
        assert!(takes_every_type(" , "), "only empty elements: no Accept");
        assert!(takes_every_type("*/*"));
        // The same refusal split over two header lines, with other spellings of zero.
        assert!(!accepts(
            [OCI_MANIFEST, &format!("{OCI_INDEX} ;Q=0.000")],
            OCI_INDEX
        ));
        assert!(!accepts([format!("{OCI_INDEX};q=0.").as_str()], OCI_INDEX));

        // Wildcards: `*/*` and `application/*` take every type unless weighted zero...
        assert!(accepts(["application/*"], OCI_INDEX));
        assert!(accepts(["application/*;q=0.1"], OCI_INDEX));
        assert!(accepts(["*/*;q=0.1"], OCI_INDEX));
        assert!(!accepts(["*/*;q=0"], OCI_INDEX));
        assert!(!accepts(["application/*;q=0"], OCI_INDEX));
        assert!(!accepts(["text/*"], OCI_INDEX));
        assert!(!accepts(["*/json"], OCI_INDEX), "not a media range");
        // ...and the most specific match decides, whatever the order.
        let refused = format!("*/*, {OCI_INDEX};q=0");
        assert!(!accepts([refused.as_str()], OCI_INDEX));
        assert!(accepts([refused.as_str()], OCI_MANIFEST));
        let refused = format!("{OCI_INDEX};q=0, application/*");
        assert!(!accepts([refused.as_str()], OCI_INDEX));
        assert!(accepts([refused.as_str()], DOCKER_MANIFEST_LIST));
        let only = format!("{OCI_INDEX}, application/*;q=0, */*");
        assert!(accepts([only.as_str()], OCI_INDEX));
        assert!(
            !accepts([only.as_str()], OCI_MANIFEST),
            "application/* beats */*"
        );
        assert!(accepts(["application/*;q=0", "*/*"], "text/plain"));
        // Two ranges as specific as each other: either one taking the type is enough.
        assert!(accepts(
            [format!("{OCI_INDEX};q=0, {OCI_INDEX};q=0.5").as_str()],
            OCI_INDEX
        ));

        // Media types and `q` are case-insensitive; other parameters do not narrow a range.
        assert!(accepts(
            ["APPLICATION/VND.OCI.IMAGE.INDEX.V1+JSON; charset=utf-8"],
            OCI_INDEX
        ));
        assert!(!accepts(
            [format!("{OCI_INDEX}; charset=utf-8; Q=0").as_str()],
            OCI_INDEX
        ));
        // Only the first `q` is the weight; what follows it is an extension.
        assert!(!accepts(
            [format!("{OCI_INDEX};q=0;ext=1;q=1").as_str()],
            OCI_INDEX
        ));
        // A malformed weight counts as 1: only a well-formed zero refuses.
        for q in [
            "", "x", "0x", "-1", "2", "1.5", "\"0\"", ".5", ".0", "00", "0.0000",
        ] {
            assert!(
                accepts([format!("{OCI_INDEX};q={q}").as_str()], OCI_INDEX),
                "q={q}"
            );
        }
        // Commas and semicolons inside quoted parameter values split nothing.
        let quoted = format!("{OCI_MANIFEST};x=\"a, {OCI_INDEX}\", {DOCKER_MANIFEST_V2}");
        assert!(!accepts([quoted.as_str()], OCI_INDEX));
        let quoted = format!("{OCI_INDEX};x=\"a\\\";q=0\"");
        assert!(accepts([quoted.as_str()], OCI_INDEX), "{quoted}");
        // A header of nothing but empty elements is no header; one of nonsense takes nothing.
        assert!(accepts([" , ,"], OCI_INDEX));
        assert!(!accepts(["nonsense"], OCI_INDEX));
        // Java's default Accept: a bare `*` is `*/*`.
        assert!(accepts(["text/html, image/gif, *; q=.2"], OCI_INDEX));
    }

    #[test]
    fn sniffing() {
        assert_eq!(
            sniff(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some(OCI_INDEX)
        );
        assert_eq!(
            sniff(br#"{"schemaVersion":2,"config":{},"layers":[]}"#).as_deref(),
            Some(OCI_MANIFEST)
        );
        assert_eq!(
            sniff(
                format!(r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST_LIST}"}}"#).as_bytes()
            )
            .as_deref(),
            Some(DOCKER_MANIFEST_LIST)
        );
        // A type outside the known ones is the body's own word for it, when it is well formed.
        for mt in [
            "application/vnd.oci.artifact.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v1+json",
            "application/vnd.example.thing.v1+json",
        ] {
            let body = format!(r#"{{"schemaVersion":2,"mediaType":"{mt}","blobs":[]}}"#);
            assert_eq!(sniff(body.as_bytes()).as_deref(), Some(mt));
        }
        // A known type comes back in its canonical spelling.
        assert_eq!(
            sniff(br#"{"mediaType":"application/vnd.OCI.image.index.v1+json"}"#).as_deref(),
            Some(OCI_INDEX)
        );
        // A malformed one is no type at all: the shape decides.
        let long = format!("application/{}", "x".repeat(200));
        for bad in [
            "",
            "json",
            "application/",
            "/json",
            "application/vnd.oci.image.index.v1+json; charset=utf-8",
            "application/json\r\nX-Evil: 1",
            "application /json",
            "application/json/x",
            "-application/json",
            "application/json",
            "text/plain",
            long.as_str(),
        ] {
            let body = serde_json::json!({"schemaVersion": 2, "mediaType": bad, "manifests": []});
            assert_eq!(
                sniff(body.to_string().as_bytes()).as_deref(),
                Some(OCI_INDEX),
                "{bad:?}"
            );
        }
        // Schema 1 without signatures.
        assert_eq!(
            sniff(br#"{"schemaVersion":1,"name":"a","tag":"1","fsLayers":[]}"#).as_deref(),
            Some(DOCKER_MANIFEST_V1)
        );
        assert_eq!(sniff(b"not json"), None);
        assert!(is_generic(Some("application/json; charset=utf-8")));
        assert!(!is_generic(Some(OCI_INDEX)));
    }
}
