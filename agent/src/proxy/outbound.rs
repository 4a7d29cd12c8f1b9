//! Outbound: what a connection captured on a pod's 15001 becomes.

use std::{
    io,
    net::SocketAddr,
    os::fd::AsFd as _,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::{PodContext, Proxy, hbone, passthrough};
use crate::{identity, sys::socket};

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
    pub fn route(&self, destination: SocketAddr) -> Result<Route, RouteError> {
        let target = match self.store.service_by_vip(destination) {
            Some((service, endpoints)) => {
                if endpoints.is_empty() {
                    return Err(RouteError::NoEndpoint {
                        service: service.key.to_string(),
                        vip: destination,
                    });
                }
                endpoints[self.round_robin.fetch_add(1, Ordering::Relaxed) % endpoints.len()]
            }
            None => destination,
        };
        match self.store.pod_by_ip(target.ip()) {
            Some(pod) if self.is_mesh(&pod) => Ok(Route::Hbone {
                target,
                identity: self.identity_of(&pod)?,
            }),
            _ => Ok(Route::Passthrough { target }),
        }
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
    let route = proxy.route(destination)?;
    let target = match &route {
        Route::Passthrough { target } | Route::Hbone { target, .. } => *target,
    };
    let mut labels = proxy.labels("source", Some(pod), destination, target);
    if let Route::Passthrough { .. } = route {
        labels.connection_security_policy = "unknown";
    }
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
            let (sent, received) = tokio::io::copy_bidirectional_with_sizes(
                stream,
                &mut upstream,
                super::COPY_BUFFER,
                super::COPY_BUFFER,
            )
            .await?;
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
            let (sent, received) = copy(stream, &mut tunnel.io).await?;
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

/// Copies both ways until both directions are done; half-close is passed on.
async fn copy<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, super::COPY_BUFFER, super::COPY_BUFFER).await
}
