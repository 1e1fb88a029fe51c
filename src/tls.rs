//! TLS on the listeners: rustls with the ring provider, TLS 1.2 and 1.3 only, optional
//! client-certificate verification (mTLS), and certificates reloaded from their files.
//!
//! One [`Tls`] holds the current `ServerConfig` of each protocol (told apart by ALPN only),
//! swapped whole when the files are read again (on SIGHUP, or when their modification times
//! change). A connection keeps the
//! config it was accepted with, so a reload drops nothing; a reload that fails keeps the old
//! config and says why. Handshakes run on their own tasks (see `listen.rs`) with a deadline,
//! so a client that connects and sends nothing holds one task, not the accept loop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// `tls:` as written in the config file. Without `cert_file`, every listener is plaintext.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates: with it, clients must present a certificate they signed (mTLS).
    pub client_ca_file: Option<PathBuf>,
}

impl TlsFiles {
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    /// The keys that belong together: a certificate needs its key, and mTLS needs TLS.
    pub fn check(&self) -> Result<(), String> {
        match (&self.cert_file, &self.key_file, &self.client_ca_file) {
            (Some(_), None, _) => Err("tls.cert_file needs tls.key_file".into()),
            (None, Some(_), _) => Err("tls.key_file needs tls.cert_file".into()),
            (None, None, Some(_)) => Err("tls.client_ca_file needs tls.cert_file".into()),
            _ => Ok(()),
        }
    }

    fn stamps(&self) -> Vec<Option<SystemTime>> {
        [&self.cert_file, &self.key_file, &self.client_ca_file]
            .iter()
            .map(|p| {
                p.as_deref()
                    .and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            })
            .collect()
    }
}

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.{key}: cannot read {path}: {cause}")]
    Read {
        key: &'static str,
        path: PathBuf,
        cause: String,
    },
    #[error("tls.{key}: {path} holds no {what}")]
    Empty {
        key: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("tls.client_ca_file: {0}")]
    ClientCa(String),
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |cause: String| TlsError::Read {
        key,
        path: path.to_owned(),
        cause,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            key,
            path: path.to_owned(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

/// The `ServerConfig`s the files make, one per [`Alpn`] (read once, told apart by ALPN only).
fn build(files: &TlsFiles) -> Result<Configs, TlsError> {
    let (Some(cert_file), Some(key_file)) = (&files.cert_file, &files.key_file) else {
        return Err(TlsError::ClientCa("no certificate configured".into()));
    };
    let chain = certs("cert_file", cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| TlsError::Read {
        key: "key_file",
        path: key_file.clone(),
        cause: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match &files.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs("client_ca_file", ca)? {
                roots
                    .add(c)
                    .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key)?;
    let speaking = |alpn: &[u8]| {
        let mut c = config.clone();
        c.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(c)
    };
    // axum serves HTTP/1.1 here; gRPC is HTTP/2 only.
    Ok([speaking(b"http/1.1"), speaking(b"h2")])
}

/// What a listener speaks after the handshake, by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    Http1 = 0,
    H2,
}

type Configs = [Arc<ServerConfig>; 2];

/// The listeners' TLS: the configs in use, swapped whole when the files are read again.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Configs>,
}

/// How long a client has to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Tls {
    /// Reads the files now (a start with unusable files fails).
    pub fn load(files: &TlsFiles) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            current: RwLock::new(build(files)?),
            files: files.clone(),
        }))
    }

    /// Reads the files again; the configs in use stay if that fails.
    fn reload(&self) -> Result<(), TlsError> {
        let configs = build(&self.files)?;
        match self.current.write() {
            Ok(mut c) => *c = configs,
            Err(poisoned) => *poisoned.into_inner() = configs,
        }
        Ok(())
    }

    fn acceptor(&self, alpn: Alpn) -> TlsAcceptor {
        let config = match self.current.read() {
            Ok(c) => c[alpn as usize].clone(),
            Err(poisoned) => poisoned.into_inner()[alpn as usize].clone(),
        };
        TlsAcceptor::from(config)
    }

    /// The server side of a handshake, with the current config; `Err(true)` when the client
    /// did not finish within [`HANDSHAKE_TIMEOUT`], `Err(false)` when it failed.
    pub async fn handshake(
        &self,
        alpn: Alpn,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> Result<TlsStream<TcpStream>, bool> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor(alpn).accept(tcp)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                Err(false)
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                Err(true)
            }
        }
    }
}

/// Takes SIGHUP from now on: its default action would end the process, even while the state is
/// being restored. `None` where signals cannot be handled.
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: TLS reloads on file changes only");
            None
        }
    }
}

/// Reloads the TLS files on SIGHUP, and when they change (checked every `every`). A failed
/// read is tried again at every check (a file caught half written is read whole next time) and
/// reported once per distinct error. Without TLS it only says that a SIGHUP has nothing to
/// reload.
pub async fn watch(
    tls: Option<Arc<Tls>>,
    mut hup: Option<tokio::signal::unix::Signal>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Modification times as last read successfully, and the error being reported.
    let mut stamps = tls.as_ref().map(|t| t.files.stamps());
    let mut failing: Option<String> = None;
    loop {
        let force = tokio::select! {
            _ = tick.tick(), if tls.is_some() => false,
            Some(()) = async { match &mut hup { Some(h) => h.recv().await, None => None } } => true,
        };
        let Some(t) = &tls else {
            tracing::info!("SIGHUP: no TLS configured, nothing to reload");
            continue;
        };
        let now = t.files.stamps();
        if !force && stamps.as_ref() == Some(&now) {
            continue;
        }
        match t.reload() {
            Ok(()) => {
                tracing::info!("TLS certificates reloaded");
                stamps = Some(now);
                failing = None;
            }
            Err(e) => {
                let text = e.to_string();
                if failing.as_deref() != Some(&text) {
                    tracing::error!(error = %text, "TLS reload failed: the previous certificates stay");
                    failing = Some(text);
                }
            }
        }
    }
}
