//! Inbound HBONE: what a CONNECT on a pod's 15008 becomes.

use std::sync::Arc;

use http::StatusCode;
use tokio::net::TcpListener;
use tracing::info;

use super::{PodContext, Proxy, connections::ConnectionInfo, hbone, passthrough};
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
            .certified(&self.identity)
            .ok()
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
        proxy.identities.ca().roots(),
        proxy.identities.trust_domain(),
    )?;
    let admit = move |connect: hbone::Connect| {
        let pod = pod.clone();
        let proxy = proxy.clone();
        async move {
            // Only this pod's own addresses are served here.
            if !pod
                .ips
                .iter()
                .any(|ip| ip.to_canonical() == connect.authority.ip().to_canonical())
            {
                return hbone::Admission::Reject(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "{} is not an address of {}",
                        connect.authority.ip(),
                        pod.key
                    ),
                );
            }
            let source_ip = connect.forwarded_for.map_or(connect.peer.ip(), |f| f.ip());
            let Some(workload) = proxy.store.pod_by_ip(connect.authority.ip()) else {
                return hbone::Admission::Reject(
                    StatusCode::BAD_REQUEST,
                    format!("no workload owns {}", connect.authority.ip()),
                );
            };
            if let Err(reason) = proxy.check(
                &proxy.policies(),
                &workload,
                connect.authority,
                Some(&connect.peer_identity),
                source_ip,
            ) {
                info!(
                    target: "meshlet::access",
                    direction = "inbound",
                    dst_workload = %pod.key,
                    src_identity = %connect.peer_identity,
                    src = %source_ip,
                    dst = %connect.authority,
                    protocol = "HBONE",
                    response_flags = "DENY",
                    %reason,
                    "connection denied"
                );
                let mut labels =
                    proxy.inbound_labels(Some(&connect.peer_identity), source_ip, &pod);
                labels.response_flags = "DENY";
                proxy.metrics.open(&labels);
                proxy.metrics.close(&labels);
                return hbone::Admission::Reject(StatusCode::UNAUTHORIZED, reason);
            }
            match passthrough::connect_in(&pod.netns, connect.authority).await {
                Ok(upstream) => {
                    info!(
                        target: "meshlet::access",
                        direction = "inbound",
                        dst_workload = %pod.key,
                        dst_identity = %pod.identity,
                        src_identity = %connect.peer_identity,
                        src = ?connect.forwarded_for,
                        dst = %connect.authority,
                        protocol = "HBONE",
                        "connection admitted"
                    );
                    let live = proxy.connections.register(ConnectionInfo {
                        source_identity: Some(connect.peer_identity.clone()),
                        source: connect.forwarded_for.unwrap_or(connect.peer),
                        destination_pod: pod.key.clone(),
                        destination: connect.authority,
                    });
                    let labels =
                        proxy.inbound_labels(Some(&connect.peer_identity), source_ip, &pod);
                    hbone::Admission::Upstream(Box::new(hbone::Upstream {
                        stream: upstream,
                        live,
                        metrics: (proxy.metrics.clone(), labels),
                    }))
                }
                Err(err) => {
                    hbone::Admission::Reject(StatusCode::SERVICE_UNAVAILABLE, err.to_string())
                }
            }
        }
    };
    hbone::serve(listener, tls, admit).await;
    Ok(())
}
