//! The one table from errors to OCI error codes and HTTP statuses, and the one function that
//! turns an error into a response. distribution's `errcode` table is the model.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::Body;
use crate::oci::route::RouteError;
use crate::upstream::UpstreamError;

/// Where an error came from, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Client,
    Upstream,
    Storage,
    Internal,
}

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NameInvalid(String),
    #[error("{0}")]
    DigestInvalid(String),
    #[error("{0}")]
    TagInvalid(String),
    #[error("{0}")]
    NameUnknown(String),
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    #[error("blob unknown: {0}")]
    BlobUnknown(String),
    #[error("no such registry API endpoint")]
    NotFound,
    #[error("{0} is not supported by a pull-through cache")]
    Unsupported(String),
    #[error("request target is {len} bytes; at most {max} are accepted")]
    UriTooLong { len: usize, max: usize },
    #[error("requested range not satisfiable (blob is {size} bytes)")]
    RangeNotSatisfiable { size: u64 },
    /// The client did not (or could not) prove who it is; answered with regcache's challenge.
    #[error("{message}")]
    Unauthorized {
        reason: &'static str,
        message: String,
        challenge: HeaderValue,
    },
    /// The client may not pull this; `message` names the rule.
    #[error("{message}")]
    Denied {
        reason: &'static str,
        message: String,
    },
    /// A `pass_client_auth` upstream wants the client's credentials: its challenge is relayed.
    #[error("upstream {upstream} requires authentication for {repo}")]
    UpstreamChallenge {
        upstream: String,
        repo: String,
        challenge: Option<HeaderValue>,
    },
    #[error("upstream {upstream} refused access to {repo} (status {status})")]
    UpstreamDenied {
        upstream: String,
        repo: String,
        status: StatusCode,
    },
    #[error("upstream {upstream} is rate limiting requests")]
    UpstreamRateLimited {
        upstream: String,
        retry_after: Option<HeaderValue>,
    },
    #[error("upstream {upstream} answered {status}")]
    UpstreamStatus {
        upstream: String,
        status: StatusCode,
    },
    /// Upstream answered 200 with a body that is not what the endpoint gives (an HTML page
    /// from a captive portal, a truncated document).
    #[error("upstream {upstream} sent {what}")]
    UpstreamInvalid { upstream: String, what: String },
    #[error("upstream {upstream}: {source}")]
    Upstream {
        upstream: String,
        #[source]
        source: UpstreamError,
    },
    #[error("upstream {upstream} sent content for {expected} that hashes to {actual}")]
    DigestMismatch {
        upstream: String,
        expected: String,
        actual: String,
    },
    #[error("storage: {0}")]
    Storage(#[from] std::io::Error),
    #[error("index: {0}")]
    Index(#[from] sled::Error),
    #[error("internal: {0}")]
    Internal(String),
    /// One error shared by every request that joined the same flight.
    #[error("{0}")]
    Shared(std::sync::Arc<Error>),
}

impl From<RouteError> for Error {
    fn from(e: RouteError) -> Self {
        use crate::oci::reference::NameError;
        match e {
            RouteError::NotFound => Error::NotFound,
            RouteError::Name(NameError::Digest(d)) => Error::DigestInvalid(d.to_string()),
            RouteError::Name(NameError::InvalidTag(t)) => {
                Error::TagInvalid(format!("tag {t:?} is not valid"))
            }
            RouteError::Name(n) => Error::NameInvalid(n.to_string()),
        }
    }
}

impl Error {
    /// OCI error code and HTTP status.
    /// The error itself, looking through [`Error::Shared`].
    pub fn root(&self) -> &Error {
        match self {
            Error::Shared(e) => e.root(),
            e => e,
        }
    }

    pub fn code_and_status(&self) -> (&'static str, StatusCode) {
        use Error::*;
        match self.root() {
            NameInvalid(_) => ("NAME_INVALID", StatusCode::BAD_REQUEST),
            DigestInvalid(_) => ("DIGEST_INVALID", StatusCode::BAD_REQUEST),
            TagInvalid(_) => ("TAG_INVALID", StatusCode::BAD_REQUEST),
            NameUnknown(_) => ("NAME_UNKNOWN", StatusCode::NOT_FOUND),
            ManifestUnknown(_) => ("MANIFEST_UNKNOWN", StatusCode::NOT_FOUND),
            BlobUnknown(_) => ("BLOB_UNKNOWN", StatusCode::NOT_FOUND),
            NotFound => ("UNSUPPORTED", StatusCode::NOT_FOUND),
            Unsupported(_) => ("UNSUPPORTED", StatusCode::METHOD_NOT_ALLOWED),
            UriTooLong { .. } => ("URI_TOO_LONG", StatusCode::URI_TOO_LONG),
            RangeNotSatisfiable { .. } => ("RANGE_INVALID", StatusCode::RANGE_NOT_SATISFIABLE),
            Unauthorized { .. } | UpstreamChallenge { .. } => {
                ("UNAUTHORIZED", StatusCode::UNAUTHORIZED)
            }
            Denied { .. } | UpstreamDenied { .. } => ("DENIED", StatusCode::FORBIDDEN),
            UpstreamRateLimited { .. } => ("TOOMANYREQUESTS", StatusCode::TOO_MANY_REQUESTS),
            UpstreamStatus { .. } | UpstreamInvalid { .. } | DigestMismatch { .. } => {
                ("UNAVAILABLE", StatusCode::BAD_GATEWAY)
            }
            Upstream { source, .. } if source.retry_in().is_some() => {
                ("UNAVAILABLE", StatusCode::SERVICE_UNAVAILABLE)
            }
            Upstream { source, .. } if source.is_timeout() => {
                ("UNAVAILABLE", StatusCode::GATEWAY_TIMEOUT)
            }
            Upstream { .. } => ("UNAVAILABLE", StatusCode::BAD_GATEWAY),
            Storage(_) | Index(_) | Internal(_) | Shared(_) => {
                ("UNKNOWN", StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    }

    /// The `reason` label of `regcache_access_denied_total`, for refusals of a client.
    pub fn denial_reason(&self) -> Option<&'static str> {
        match self.root() {
            Error::Unauthorized { reason, .. } | Error::Denied { reason, .. } => Some(reason),
            Error::UpstreamChallenge { .. } | Error::UpstreamDenied { .. } => Some("upstream"),
            _ => None,
        }
    }

    pub fn origin(&self) -> Origin {
        use Error::*;
        match self.root() {
            UpstreamDenied { .. }
            | UpstreamRateLimited { .. }
            | UpstreamStatus { .. }
            | UpstreamInvalid { .. }
            | Upstream { .. }
            | DigestMismatch { .. } => Origin::Upstream,
            Storage(_) | Index(_) => Origin::Storage,
            Internal(_) | Shared(_) => Origin::Internal,
            _ => Origin::Client,
        }
    }

    /// The OCI error response. Internal details stay in the log, not the body.
    pub fn to_response(&self, head_only: bool) -> Response<Body> {
        let (code, status) = self.code_and_status();
        let message = match (self.root(), self.origin()) {
            // A credential helper's or file's error can quote what it read: log only.
            (
                Error::Upstream {
                    upstream,
                    source: UpstreamError::Credentials(_),
                },
                _,
            ) => format!("upstream {upstream}: credentials unavailable; see the regcache log"),
            (_, Origin::Storage | Origin::Internal) => {
                "internal error; see the regcache log".to_owned()
            }
            _ => self.to_string(),
        };
        let body = serde_json::json!({
            "errors": [{ "code": code, "message": message, "detail": serde_json::Value::Null }]
        });
        let bytes = Bytes::from(body.to_string());
        let mut resp = Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, bytes.len())
            .body(if head_only {
                Body::empty()
            } else {
                Body::full(bytes)
            })
            .expect("valid response");
        let h = resp.headers_mut();
        match self.root() {
            Error::UpstreamRateLimited {
                retry_after: Some(v),
                ..
            } => {
                h.insert(header::RETRY_AFTER, v.clone());
            }
            Error::Upstream { source, .. } if source.retry_in().is_some() => {
                let secs = source.retry_in().unwrap_or_default().as_secs().max(1);
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            Error::RangeNotSatisfiable { size } => {
                h.insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
                );
            }
            Error::Unsupported(_) => {
                h.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            }
            Error::Unauthorized { challenge, .. }
            | Error::UpstreamChallenge {
                challenge: Some(challenge),
                ..
            } => {
                h.insert(header::WWW_AUTHENTICATE, challenge.clone());
            }
            _ => {}
        }
        resp
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
