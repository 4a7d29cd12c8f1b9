//! The CA's gRPC endpoint: TLS (1.2 or 1.3, ALPN `h2`, no client certificates: callers
//! authenticate with their token) and HTTP/2 over hyper, serving the generated tonic service.
//!
//! The serving certificate is signed by the CA itself for `--server-name`s, as istiod's is, and
//! re-signed at half life on the next handshake.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use rustls::{ServerConfig, server::ResolvesServerCert, sign::CertifiedKey};
use tokio::{net::TcpListener, sync::Semaphore};
use tower::ServiceExt as _;
use tracing::{debug, warn};

use super::service::{Peer, Signer};
use crate::{
    identity::{self, Ca},
    proto::istio_certificate_service_server::IstioCertificateServiceServer,
};

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 4096;
/// Concurrent streams per HTTP/2 connection.
const MAX_STREAMS: u32 = 128;
/// The largest request accepted (a CSR is a few KiB).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How long the serving certificate is valid.
const SERVING_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// The serving certificate, re-signed at half life.
#[derive(Debug)]
pub struct ServingCert {
    ca: Arc<Ca>,
    names: Vec<String>,
    current: Mutex<(Arc<CertifiedKey>, SystemTime)>,
}

impl ServingCert {
    /// Signs the first serving certificate for `names`.
    pub fn new(ca: Arc<Ca>, names: Vec<String>) -> Result<Self, identity::Error> {
        let current = sign(&ca, &names)?;
        Ok(Self {
            ca,
            names,
            current: Mutex::new(current),
        })
    }
}

fn sign(ca: &Ca, names: &[String]) -> Result<(Arc<CertifiedKey>, SystemTime), identity::Error> {
    let now = SystemTime::now();
    let (chain, key) = ca.issue_server(names, now, SERVING_LIFETIME)?;
    let key = identity::provider()
        .key_provider
        .load_private_key(key)
        .map_err(identity::Error::Tls)?;
    Ok((
        Arc::new(CertifiedKey::new(chain, key)),
        now + SERVING_LIFETIME / 2,
    ))
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if SystemTime::now() >= current.1 {
            match sign(&self.ca, &self.names) {
                Ok(fresh) => *current = fresh,
                Err(err) => {
                    warn!(%err, "re-signing the serving certificate failed; keeping the old one")
                }
            }
        }
        Some(current.0.clone())
    }
}

/// The TLS configuration of the endpoint.
pub fn tls_config(serving: Arc<ServingCert>) -> Result<Arc<ServerConfig>, identity::Error> {
    let mut config = ServerConfig::builder_with_provider(identity::provider())
        .with_safe_default_protocol_versions()
        .map_err(identity::Error::Tls)?
        .with_no_client_auth()
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![identity::ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Serves `signer` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, tls: Arc<ServerConfig>, signer: Signer) {
    let service = IstioCertificateServiceServer::new(signer)
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_REQUEST_BYTES);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(%err, "accepting a CA connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, service) = (acceptor.clone(), service.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(err)) => {
                        debug!(%peer, %err, "CA TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "CA TLS handshake timed out");
                        return;
                    }
                };
            let service = service.map_request(move |mut request: http::Request<_>| {
                request.extensions_mut().insert(Peer(peer));
                request
            });
            let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .max_header_list_size(16 * 1024)
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                .await;
            if let Err(err) = served {
                debug!(%peer, %err, "CA connection ended");
            }
        });
    }
}
