//! regcache: a caching pull-through proxy for OCI / Docker registries.
//!
//! The binary (`main.rs`) parses the command line and calls [`run`]; everything else is here.
#![deny(unsafe_code)]

pub mod access;
pub mod body;
pub mod cache;
pub mod config;
pub mod error;
pub mod handler;
pub mod metrics;
pub mod oci;
pub mod proxy;
pub mod sendfile;
pub mod server;
pub mod tls;
pub mod upstream;

pub use config::Config;
pub use server::{ServeError, Server, run};
