//! The local cache: content-addressed files, the sled index, and single-flight fills.

pub mod blobs;
pub mod flight;
pub mod index;
