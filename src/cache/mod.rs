//! The local cache: content-addressed files, the sled index, and single-flight fills.

pub mod blobs;
pub mod bucket;
pub mod flight;
pub mod index;
pub mod lifecycle;
mod mapped;
pub mod verify;

pub use mapped::{Mapping, in_memory, map_in_memory};

use std::path::Path;

/// Opens a data dir's store and index for an offline command. Fails clearly while a running
/// regcache holds the index.
pub fn open_offline(data_dir: &Path) -> anyhow::Result<(blobs::Store, index::Index)> {
    // The index first: its lock says whether a server is running, and opening the store
    // removes temp files, which must not happen under a running server's fills.
    let index = index::Index::open(&data_dir.join("index")).map_err(|e| {
        if e.to_string().contains("could not acquire lock") {
            anyhow::anyhow!(
                "{} is in use by a running regcache; stop it first",
                data_dir.display()
            )
        } else {
            anyhow::anyhow!("index in {}: {e}", data_dir.display())
        }
    })?;
    let store = blobs::Store::open(data_dir)?;
    Ok((store, index))
}
