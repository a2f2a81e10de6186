//! TLS on the main listener: rustls with the ring provider (the one the upstream client uses),
//! TLS 1.2 and 1.3 only, ALPN `h2` and `http/1.1`.
//!
//! The certificate lives in a [`Reloading`] resolver that every new handshake asks, so a new
//! certificate (on SIGHUP, or when the files change) applies to new connections while open ones
//! keep the session they have. A certificate that does not load is logged and the old one kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest as _;

/// ALPN protocols offered, most preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a certificate and key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Parse { path: PathBuf, why: String },
    #[error("{cert} and {key} do not belong together: {why}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        why: String,
    },
}

/// The crypto provider for both directions (upstream client and this server).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The files' bytes, read together so that a reload compares one state with the next.
#[derive(Clone, PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl Files {
    fn read(cert: &Path, key: &Path) -> Result<Files, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_owned(),
                source,
            })
        };
        Ok(Files {
            cert: read(cert)?,
            key: read(key)?,
        })
    }

    fn fingerprint(&self) -> [u8; 32] {
        let mut h = sha2::Sha256::new();
        h.update(&self.cert);
        h.update([0]);
        h.update(&self.key);
        h.finalize().into()
    }
}

/// Parses a PEM certificate chain and private key and checks that they match.
pub fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    parse(&Files::read(cert, key)?, cert, key)
}

fn parse(files: &Files, cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&files.cert)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Parse {
            path: cert_path.to_owned(),
            why: format!("not a PEM certificate chain: {e}"),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Parse {
            path: cert_path.to_owned(),
            why: "no CERTIFICATE block in the file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| TlsError::Parse {
        path: key_path.to_owned(),
        why: format!("no usable PEM private key: {e}"),
    })?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::Mismatch {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
        why: e.to_string(),
    })
}

/// The current certificate, swapped whole on reload.
#[derive(Debug)]
pub struct Reloading {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// Fingerprint of the files last tried (loaded or not), so a bad file is reported once.
    tried: Mutex<[u8; 32]>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read().expect("cert lock")))
    }
}

impl Reloading {
    /// Loads the certificate now; an error here stops startup.
    pub fn new(cert: &Path, key: &Path) -> Result<Reloading, TlsError> {
        let files = Files::read(cert, key)?;
        let loaded = parse(&files, cert, key)?;
        Ok(Reloading {
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
            current: RwLock::new(Arc::new(loaded)),
            tried: Mutex::new(files.fingerprint()),
        })
    }

    /// Reads the files again and, if they changed (or `force`), installs what they hold.
    /// Returns whether a new certificate is in use. Blocking file I/O: call it off the async
    /// threads.
    pub fn reload(&self, force: bool) -> bool {
        let files = match Files::read(&self.cert_path, &self.key_path) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, "TLS certificate not reloaded; keeping the old one");
                return false;
            }
        };
        let fingerprint = files.fingerprint();
        {
            let mut tried = self.tried.lock().expect("tried lock");
            if !force && *tried == fingerprint {
                return false;
            }
            *tried = fingerprint;
        }
        match parse(&files, &self.cert_path, &self.key_path) {
            Ok(loaded) => {
                *self.current.write().expect("cert lock") = Arc::new(loaded);
                tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS certificate not reloaded; keeping the old one");
                false
            }
        }
    }

    /// Reloads on SIGHUP and whenever the files change (looking every `every`; zero: never),
    /// until `stop` changes.
    pub async fn watch(
        self: Arc<Self>,
        every: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler; certificate reloads on file change only");
                None
            }
        };
        let mut tick = tokio::time::interval(if every.is_zero() {
            Duration::from_secs(3600)
        } else {
            every
        });
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let force = tokio::select! {
                _ = tick.tick(), if !every.is_zero() => false,
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    tracing::info!("SIGHUP: reloading the TLS certificate");
                    true
                }
                _ = stop.changed() => return,
            };
            let me = Arc::clone(&self);
            let _ = tokio::task::spawn_blocking(move || me.reload(force)).await;
        }
    }
}

/// The server side: rustls config around a [`Reloading`] certificate.
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub certificate: Arc<Reloading>,
}

impl Tls {
    pub fn new(cert: &Path, key: &Path) -> Result<Tls, TlsError> {
        let certificate = Arc::new(Reloading::new(cert, key)?);
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("the ring provider supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&certificate) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            certificate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh self-signed pair: (certificate PEM, key PEM, certificate DER).
    fn pair(name: &str) -> (String, String, Vec<u8>) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        (
            c.cert.pem(),
            c.key_pair.serialize_pem(),
            c.cert.der().to_vec(),
        )
    }

    fn leaf(r: &Reloading) -> Vec<u8> {
        r.current.read().unwrap().cert[0].to_vec()
    }

    #[test]
    fn loads_checks_and_reloads_only_good_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let (c1, k1, d1) = pair("one.example");
        std::fs::write(&cert, &c1).unwrap();
        std::fs::write(&key, &k1).unwrap();
        let r = Reloading::new(&cert, &key).unwrap();
        assert_eq!(leaf(&r), d1);
        assert!(!r.reload(false), "unchanged files are not reloaded");

        // A key that is not the certificate's: reported, old certificate kept.
        let (c2, k2, d2) = pair("two.example");
        std::fs::write(&cert, &c2).unwrap();
        assert!(!r.reload(false));
        assert_eq!(leaf(&r), d1);
        assert!(matches!(load(&cert, &key), Err(TlsError::Mismatch { .. })));
        // Garbage: the same.
        std::fs::write(&key, "not a key").unwrap();
        assert!(!r.reload(false));
        assert!(matches!(load(&cert, &key), Err(TlsError::Parse { path, .. }) if path == key));
        assert_eq!(leaf(&r), d1);
        // Both files new and matching: in use.
        std::fs::write(&key, &k2).unwrap();
        assert!(r.reload(false));
        assert_eq!(leaf(&r), d2);
        assert!(r.reload(true), "SIGHUP reloads even unchanged files");
        std::fs::remove_file(&cert).unwrap();
        assert!(!r.reload(true));
        assert_eq!(leaf(&r), d2, "a missing file keeps the old certificate");
        assert!(matches!(load(&cert, &key), Err(TlsError::Read { .. })));
    }
}
