//! TLS on the listeners: rustls with the ring provider, TLS 1.2 and 1.3 only, optional
//! client-certificate verification (mTLS), and certificates reloaded from their files.
//!
//! Each listener holds a [`Tls`]: the current `ServerConfig`, swapped whole when the files are
//! read again (on SIGHUP, or when their modification times change). A connection keeps the
//! config it was accepted with, so a reload drops nothing; a reload that fails keeps the old
//! config and says why. Handshakes run on their own tasks (see `listen.rs`) with a deadline,
//! so a client that connects and sends nothing holds one task, not the accept loop.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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

/// A `ServerConfig` from the files, for a listener speaking `alpn`.
fn build(files: &TlsFiles, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
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
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// One listener's TLS: the config in use, and how to read it again.
pub struct Tls {
    files: TlsFiles,
    alpn: Vec<&'static [u8]>,
    current: RwLock<Arc<ServerConfig>>,
    /// Modification times of the files as last read.
    stamps: Mutex<Vec<Option<SystemTime>>>,
    /// The last reload's error, until a reload succeeds.
    error: Mutex<Option<String>>,
}

impl Tls {
    /// Reads the files now (a start with unusable files fails).
    pub fn load(files: &TlsFiles, alpn: &[&'static [u8]]) -> Result<Arc<Self>, TlsError> {
        let config = build(files, alpn)?;
        Ok(Arc::new(Self {
            files: files.clone(),
            alpn: alpn.to_vec(),
            current: RwLock::new(Arc::new(config)),
            stamps: Mutex::new(files.stamps()),
            error: Mutex::new(None),
        }))
    }

    fn acceptor(&self) -> TlsAcceptor {
        let config = match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        TlsAcceptor::from(config)
    }

    /// Reads the files again if `force` or they changed; the old config stays on failure.
    /// A failed read is tried again at every check (a file caught half written is read whole
    /// next time), and reported once per distinct error (see [`failed`](Self::failed)).
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let now = self.files.stamps();
        let mut stamps = match self.stamps.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if !force && *stamps == now && self.last_error().is_none() {
            return Ok(false);
        }
        let config = build(&self.files, &self.alpn)?;
        *stamps = now;
        if let Ok(mut current) = self.current.write() {
            *current = Arc::new(config);
        }
        if let Ok(mut e) = self.error.lock() {
            *e = None;
        }
        Ok(true)
    }

    fn last_error(&self) -> Option<String> {
        self.error.lock().ok().and_then(|e| e.clone())
    }

    /// Logs a failed reload, once for each distinct error.
    fn failed(&self, e: &TlsError) {
        let text = e.to_string();
        if let Ok(mut last) = self.error.lock() {
            if last.as_deref() != Some(&text) {
                tracing::error!(error = %text, "TLS reload failed: the previous certificates stay");
                *last = Some(text);
            }
        }
    }
}

/// How long a client has to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Tls {
    /// The server side of a handshake, with the current config; `Err(true)` when the client
    /// did not finish within [`HANDSHAKE_TIMEOUT`], `Err(false)` when it failed.
    pub async fn handshake(&self, tcp: TcpStream, peer: SocketAddr) -> Result<TlsIo, bool> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor().accept(tcp)).await {
            Ok(Ok(stream)) => Ok(TlsIo(stream)),
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

/// A server-side TLS connection, as the HTTP and gRPC servers take it.
pub struct TlsIo(TlsStream<TcpStream>);

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsIo {
    type ConnectInfo = Option<SocketAddr>;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.peer_addr().ok()
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

/// Reloads every listener's TLS on SIGHUP, and when the files change (checked every `every`).
/// Without TLS it only says that a SIGHUP has nothing to reload.
pub async fn watch(
    tls: Vec<Arc<Tls>>,
    mut hup: Option<tokio::signal::unix::Signal>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let force = tokio::select! {
            _ = tick.tick(), if !tls.is_empty() => false,
            Some(()) = async { match &mut hup { Some(h) => h.recv().await, None => None } } => true,
        };
        if force && tls.is_empty() {
            tracing::info!("SIGHUP: no TLS configured, nothing to reload");
        }
        for t in &tls {
            match t.reload(force) {
                Ok(true) => tracing::info!("TLS certificates reloaded"),
                Ok(false) => {}
                Err(e) => t.failed(&e),
            }
        }
    }
}
