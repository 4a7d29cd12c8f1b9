//! Inbound HBONE: what a CONNECT on a pod's 15008 becomes.
//!
//! Admission, in order: the authority must be one of this pod's own addresses, on a port that
//! is not meshlet's own (nothing that comes through the proxy comes back into it); then
//! PeerAuthentication and AuthorizationPolicy decide, with the tunnel's TCP peer as the source
//! address (the `Forwarded` header is only logged); then the pod's connection budget; then the
//! upstream to the application is dialled from inside the pod.

use std::sync::Arc;

use http::StatusCode;
use tokio::net::TcpListener;

use super::{
    PodContext, Proxy,
    connections::ConnectionInfo,
    hbone,
    record::{Direction, Flags, Opening, Record},
};
use crate::identity::{self, Identity};

/// A rustls certificate resolver that always serves the current certificate of one identity
/// from the manager, so renewals reach new handshakes without touching live connections.
#[derive(Debug)]
pub struct CurrentCert {
    manager: Arc<identity::Manager>,
    identity: Identity,
}

impl rustls::server::ResolvesServerCert for CurrentCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.manager
            .current(&self.identity)
            .map(|certified| certified.certified_key())
    }
}

/// Serves a pod's 15008 listener until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    pod: Arc<PodContext>,
) -> Result<(), identity::Error> {
    let resolver = Arc::new(CurrentCert {
        manager: proxy.identities.clone(),
        identity: pod.identity.clone(),
    });
    let tls = identity::server_config(
        resolver,
        proxy.identities.roots(),
        proxy.identities.trust_domain(),
    )?;
    let admit = {
        let (proxy, pod) = (proxy.clone(), pod.clone());
        move |connect: hbone::Connect| {
            let (proxy, pod) = (proxy.clone(), pod.clone());
            async move { admit(&proxy, &pod, connect).await }
        }
    };
    let server = Arc::new(hbone::Server {
        acceptor: tokio_rustls::TlsAcceptor::from(tls),
        handshakes: Arc::new(tokio::sync::Semaphore::new(proxy.limits.max_tls_handshakes)),
        limits: proxy.limits.hbone,
        admit,
        metrics: proxy.metrics.clone(),
        drain: proxy.drain.clone(),
    });
    super::accept_loop(listener, proxy, pod, move |tcp, peer, permit| {
        let server = server.clone();
        async move {
            let _permit = permit;
            hbone::serve_connection(server, tcp, peer).await;
        }
    })
    .await;
    Ok(())
}

/// Admits a CONNECT to `pod`: from a peer's tunnel, or from this node's own pods by the
/// same-node path ([`super::local`]).
pub(super) async fn admit(
    proxy: &Proxy,
    pod: &PodContext,
    connect: hbone::Connect,
) -> hbone::Admission {
    let reject = |status, reason: String| hbone::Admission::Reject(status, reason);
    // Only this pod's own addresses are served here.
    if !pod
        .ips
        .iter()
        .any(|ip| ip.to_canonical() == connect.authority.ip().to_canonical())
    {
        return reject(
            StatusCode::BAD_REQUEST,
            format!(
                "{} is not an address of {}",
                connect.authority.ip(),
                pod.key
            ),
        );
    }
    if proxy.limits.is_reserved(connect.authority.port()) {
        proxy.metrics.limit_reached("reserved_port");
        return reject(
            StatusCode::BAD_REQUEST,
            format!("port {} is one of meshlet's own", connect.authority.port()),
        );
    }
    let Some(workload) = proxy.store.pod(&pod.key) else {
        return reject(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{} is no longer known", pod.key),
        );
    };
    // The source address policy sees is the tunnel's TCP peer: the client pod's own address.
    let source_ip = connect.peer.ip().to_canonical();
    let opening = Opening {
        direction: Direction::Inbound,
        protocol: "HBONE",
        source: connect.peer,
        destination: connect.authority,
        labels: proxy.inbound_labels(
            Some(&connect.peer_identity),
            source_ip,
            pod,
            connect.authority,
        ),
    };
    let policy = match proxy.check(
        &proxy.policies(),
        &workload,
        connect.authority,
        Some(&connect.peer_identity),
        source_ip,
    ) {
        Ok(policy) => policy,
        Err(refusal) => {
            let mut record =
                Record::refused(&proxy.metrics, opening, Flags::Deny, refusal.reason.clone());
            record.forwarded(connect.forwarded.as_deref());
            record.decided_by(refusal.policy);
            return reject(StatusCode::UNAUTHORIZED, refusal.reason);
        }
    };
    let permit = match pod.admit_connection(proxy).await {
        Ok(permit) => permit,
        Err(spent) => {
            let reason = spent.to_string();
            Record::refused(&proxy.metrics, opening, Flags::Overflow, reason.clone());
            return reject(StatusCode::SERVICE_UNAVAILABLE, reason);
        }
    };
    let mut record = Record::open(&proxy.metrics, opening);
    record.forwarded(connect.forwarded.as_deref());
    record.decided_by(policy);
    match proxy
        .connect_to_application(pod, connect.authority, connect.peer)
        .await
    {
        Ok(stream) => {
            let live = proxy.connections.register(ConnectionInfo {
                source_identity: Some(connect.peer_identity.clone()),
                source: connect.peer,
                destination_pod: pod.key.clone(),
                destination: connect.authority,
            });
            hbone::Admission::Upstream(Box::new(hbone::Upstream {
                stream,
                live,
                record,
                permit,
            }))
        }
        Err(err) => {
            let reason = format!("connect to the application: {err}");
            record.fail(Flags::Connect, reason.clone());
            reject(StatusCode::SERVICE_UNAVAILABLE, reason)
        }
    }
}
