//! One configured upstream registry: its URLs (failover), HTTP client and authentication.

pub mod auth;
pub mod client;
pub mod connect;
pub mod credentials;
pub mod guard;

pub use client::{Upstream, UpstreamError, UpstreamRequest};
