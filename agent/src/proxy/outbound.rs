//! Outbound: what a connection captured on a pod's 15001 becomes.

use std::{
    net::SocketAddr,
    os::fd::AsFd as _,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::{PodContext, Proxy, hbone, passthrough};
use crate::{
    identity,
    sys::socket,
    workload::model::{Pod, Service},
};

/// Where a captured connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Through HBONE to the mesh pod at `target`, which must present `identity`.
    Hbone {
        /// The pod's address and the application port (the CONNECT authority).
        target: SocketAddr,
        /// The identity the destination must prove.
        identity: identity::Identity,
    },
    /// Directly, in plaintext (not a mesh workload).
    Passthrough {
        /// Where to.
        target: SocketAddr,
    },
}

/// A route and what was looked up to decide it (the Service addressed, the destination pod),
/// so the connection's labels need no second lookup.
#[derive(Debug, Clone)]
pub struct Routed {
    /// Where the connection goes.
    pub route: Route,
    /// The Service whose cluster IP was addressed, if one was.
    pub service: Option<Arc<Service>>,
    /// The pod that owns the target address, if one does.
    pub pod: Option<Arc<Pod>>,
}

/// Why a destination could not be routed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// A Service with no ready endpoint.
    #[error("service {service} has no ready endpoint for {vip}")]
    NoEndpoint {
        /// The service.
        service: String,
        /// The VIP:port asked for.
        vip: SocketAddr,
    },
    /// The destination's identity cannot be formed.
    #[error(transparent)]
    Identity(#[from] identity::Error),
}

impl Proxy {
    /// Decides the route to `destination` (the original destination of a captured connection).
    /// Service VIPs are resolved to a ready endpoint round robin.
    pub fn route(&self, destination: SocketAddr) -> Result<Routed, RouteError> {
        let (target, service) = match self.store.service_by_vip(destination) {
            Some((service, endpoints)) => {
                if endpoints.is_empty() {
                    return Err(RouteError::NoEndpoint {
                        service: service.key.to_string(),
                        vip: destination,
                    });
                }
                (
                    endpoints[self.round_robin.fetch_add(1, Ordering::Relaxed) % endpoints.len()],
                    Some(service),
                )
            }
            None => (destination, None),
        };
        let pod = self.store.pod_by_ip(target.ip());
        let route = match &pod {
            Some(pod) if self.is_mesh(pod) => Route::Hbone {
                target,
                identity: self.identity_of(pod)?,
            },
            _ => Route::Passthrough { target },
        };
        Ok(Routed {
            route,
            service,
            pod,
        })
    }
}

/// Accepts on a pod's 15001 listener until the task is dropped.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, pod: Arc<PodContext>) {
    super::accept_loop(listener, pod.clone(), move |stream, peer| {
        let (proxy, pod) = (proxy.clone(), pod.clone());
        async move {
            if let Err(err) = carry(stream, peer, &proxy, &pod).await {
                warn!(pod = %pod.key, %peer, err = %err, "outbound connection failed");
            }
        }
    })
    .await;
}

async fn carry(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: &Proxy,
    pod: &PodContext,
) -> anyhow::Result<()> {
    let destination = socket::original_dst_fd(stream.as_fd(), stream.local_addr()?.is_ipv6())?;
    let Routed {
        route,
        service,
        pod: destination_pod,
    } = proxy.route(destination)?;
    let principal = match &route {
        Route::Hbone { identity, .. } => Some(identity),
        Route::Passthrough { .. } => None,
    };
    let mut labels = proxy.labels(
        "source",
        Some(pod),
        destination_pod.as_ref().map(|p| &p.key),
        principal,
        service.as_deref(),
    );
    let counters = proxy.metrics.open(&labels);
    let mut stream = crate::metrics::Counted::new(stream, counters);
    let result = carry_routed(&mut stream, peer, proxy, pod, destination, &route).await;
    if result.is_err() {
        labels.response_flags = "CONNECT";
    }
    proxy.metrics.close(&labels);
    result.map(|_| ())
}

async fn carry_routed(
    stream: &mut crate::metrics::Counted<TcpStream>,
    peer: SocketAddr,
    proxy: &Proxy,
    pod: &PodContext,
    destination: SocketAddr,
    route: &Route,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let (sent, received, protocol, peer_identity) = match route {
        Route::Passthrough { target } => {
            let mut upstream = passthrough::connect_in(&pod.netns, *target).await?;
            let (sent, received) = super::copy(stream, &mut upstream).await?;
            (sent, received, "TCP", String::new())
        }
        Route::Hbone { target, identity } => {
            let key = hbone::PoolKey {
                source: pod.identity.clone(),
                destination: identity.clone(),
                destination_ip: target.ip(),
            };
            let forwarded_for =
                SocketAddr::new(pod.ip_like(target.ip()).unwrap_or(peer.ip()), peer.port());
            let netns = pod.netns.clone();
            let source = pod.identity.clone();
            let expected = identity.clone();
            let tunnel = proxy
                .pool
                .connect(&key, *target, forwarded_for, |hbone_peer| async move {
                    let tcp = hbone::dial_in(&netns, hbone_peer).await?;
                    let certified = proxy.identities.certified(&source)?;
                    let tls = identity::client_config(
                        &certified,
                        expected,
                        proxy.identities.ca().roots(),
                    )?;
                    Ok((tcp, tls))
                })
                .await;
            let mut tunnel = match tunnel {
                Ok(tunnel) => tunnel,
                Err(err) => {
                    debug!(pod = %pod.key, %destination, %err, "HBONE failed");
                    return Err(err.into());
                }
            };
            let (sent, received) = super::copy(stream, &mut tunnel.io).await?;
            (sent, received, "HBONE", identity.to_string())
        }
    };
    info!(
        target: "meshlet::access",
        direction = "outbound",
        src_workload = %pod.key,
        src_identity = %pod.identity,
        dst = %destination,
        dst_identity = %peer_identity,
        protocol,
        bytes_sent = sent,
        bytes_received = received,
        duration_ms = start.elapsed().as_millis() as u64,
        "connection closed"
    );
    Ok(())
}
