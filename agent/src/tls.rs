//! The HTTPS listener (`--tls`, `--tls-host`, `--tls-port`, `--tls-certificate`, `--tls-key`):
//! rustls with the ring provider, serving the same router as the plain listener.
//!
//! TCP connections are accepted by one task and each handshake runs in its own task with a
//! time limit, so a client that connects and says nothing cannot hold up anyone else. Every
//! connection, its handshake included, takes its place under the API's connection limits
//! first (`listen.rs`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::debug;

use crate::listen::{ConnGate, Guarded};

/// A TLS handshake must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads a PEM certificate chain and private key into a server configuration.
pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("--tls-certificate: read {}", cert.display()))?
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--tls-certificate: {} is not PEM", cert.display()))?;
    if certs.is_empty() {
        return Err(anyhow!(
            "--tls-certificate: {} holds no certificate",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("--tls-key: no PEM private key in {}", key.display()))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("--tls-certificate/--tls-key do not make a usable pair")
}

/// A listener yielding established TLS streams.
pub struct TlsListener {
    rx: mpsc::Receiver<(Guarded<TlsStream<TcpStream>>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub async fn bind(
        addr: SocketAddr,
        config: rustls::ServerConfig,
        gate: Arc<ConnGate>,
    ) -> Result<TlsListener> {
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen on {addr} (--tls-host/--tls-port)"))?;
        let local = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (sock, peer) = match tcp.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        debug!(error = %e, "TLS accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Refused: dropped here, so the client sees its connection closed at once.
                let Some(admission) = gate.admit(peer.ip()) else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send((Guarded::new(s, admission), peer)).await;
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = Guarded<TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            // The accept task never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
