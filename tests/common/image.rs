//! Generated images: real gzip'd tar layers (so the Docker daemon can unpack them), configs
//! with correct diff_ids, and manifests of every media type, plus multi-platform indexes.

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

pub const DOCKER_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

pub fn sha256(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

/// Deterministic pseudo-random bytes (xorshift), so layers of the same seed are identical.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A compressed layer and its uncompressed digest.
#[derive(Clone)]
pub struct Layer {
    pub blob: Bytes,
    pub diff_id: String,
}

impl Layer {
    /// A tar.gz with one file of `size` pseudo-random bytes named after the seed.
    pub fn new(seed: u64, size: usize) -> Layer {
        let mut tar = tar::Builder::new(Vec::new());
        let data = noise(seed, size);
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        tar.append_data(&mut header, format!("layer-{seed}.bin"), &data[..])
            .unwrap();
        let tar = tar.into_inner().unwrap();
        let diff_id = sha256(&tar);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        Layer {
            blob: Bytes::from(gz.finish().unwrap()),
            diff_id,
        }
    }

    pub fn digest(&self) -> String {
        sha256(&self.blob)
    }
}

/// An image (or an index of images) ready to push.
#[derive(Clone)]
pub struct Image {
    pub media_type: String,
    pub manifest: Bytes,
    pub config: Bytes,
    pub layers: Vec<Layer>,
    /// Platform images of an index.
    pub children: Vec<Image>,
}

impl Image {
    /// A single-platform image of the given manifest type.
    pub fn new(media_type: &str, arch: &str, layers: Vec<Layer>) -> Image {
        let config = serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
            "history": layers.iter().map(|_| serde_json::json!({"created_by": "regcache test"})).collect::<Vec<_>>(),
        });
        let config = Bytes::from(serde_json::to_vec(&config).unwrap());
        let (config_type, layer_type) = if media_type == DOCKER_V2 {
            (
                "application/vnd.docker.container.image.v1+json",
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            )
        } else {
            (
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        };
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": config_type, "size": config.len(), "digest": sha256(&config)},
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": layer_type, "size": l.blob.len(), "digest": l.digest(),
            })).collect::<Vec<_>>(),
        });
        Image {
            media_type: media_type.to_owned(),
            manifest: Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap()),
            config,
            layers,
            children: Vec::new(),
        }
    }

    /// A simple amd64 Docker image with `n` small layers from `seed`.
    pub fn simple(seed: u64, n: usize) -> Image {
        let layers = (0..n as u64)
            .map(|i| Layer::new(seed * 100 + i, 4096 + i as usize * 1000))
            .collect();
        Image::new(DOCKER_V2, "amd64", layers)
    }

    /// A multi-platform index over `children` (their architectures from their configs).
    pub fn index(media_type: &str, children: Vec<Image>) -> Image {
        let entries: Vec<_> = children
            .iter()
            .map(|c| {
                let cfg: serde_json::Value = serde_json::from_slice(&c.config).unwrap();
                serde_json::json!({
                    "mediaType": c.media_type, "size": c.manifest.len(), "digest": c.digest(),
                    "platform": {"architecture": cfg["architecture"], "os": "linux"},
                })
            })
            .collect();
        let manifest =
            serde_json::json!({"schemaVersion": 2, "mediaType": media_type, "manifests": entries});
        Image {
            media_type: media_type.to_owned(),
            manifest: Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap()),
            config: Bytes::new(),
            layers: Vec::new(),
            children,
        }
    }

    pub fn digest(&self) -> String {
        sha256(&self.manifest)
    }

    /// Every blob (configs and layers), children included.
    pub fn blobs(&self) -> Vec<Bytes> {
        let mut out = Vec::new();
        if !self.config.is_empty() {
            out.push(self.config.clone());
        }
        out.extend(self.layers.iter().map(|l| l.blob.clone()));
        for c in &self.children {
            out.extend(c.blobs());
        }
        out
    }

    /// (digest, media type, bytes) of each child manifest, to push by digest first.
    pub fn child_manifests(&self) -> Vec<(String, String, Bytes)> {
        self.children
            .iter()
            .map(|c| (c.digest(), c.media_type.clone(), c.manifest.clone()))
            .collect()
    }
}
