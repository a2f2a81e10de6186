//! The registry protocol, pure: names, digests, routes, media types. No I/O here.

pub mod digest;
pub mod image_ref;
pub mod media_type;
pub mod range;
pub mod reference;
pub mod route;

/// Header naming a manifest's or blob's digest.
pub const DIGEST_HEADER: &str = "docker-content-digest";
/// Header every registry API response carries.
pub const API_VERSION_HEADER: &str = "docker-distribution-api-version";
