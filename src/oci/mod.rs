//! The registry protocol, pure: names, digests, routes, media types. No I/O here.

pub mod digest;
pub mod image_ref;
pub mod media_type;
pub mod range;
pub mod reference;
pub mod route;

/// Header naming a manifest's or blob's digest.
pub const DIGEST_HEADER: &str = "docker-content-digest";
/// `Cache-Control` of a blob answer: content named by its digest never changes. One year, as
/// distribution sends; without `public`, a shared cache in front stores no answer to a request
/// that carried credentials (RFC 9111, 3.5).
pub const BLOB_CACHE_CONTROL: &str = "max-age=31536000";
/// Header every registry API response carries.
pub const API_VERSION_HEADER: &str = "docker-distribution-api-version";
