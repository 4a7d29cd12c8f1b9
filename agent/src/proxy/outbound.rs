//! Outbound: what a connection captured on a pod's 15001 becomes.

use std::{
    net::SocketAddr,
    os::fd::AsFd as _,
    sync::{Arc, atomic::Ordering},
};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::{
    Leg, PodContext, Proxy, Spent, hbone,
    record::{Direction, Flags, Opening, Record},
};
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
    let carried = (proxy.clone(), pod.clone());
    super::accept_loop(listener, proxy, pod, move |stream, peer, permit| {
        let (proxy, pod) = carried.clone();
        async move {
            let _permit = permit;
            if let Err(err) = carry(stream, peer, &proxy, &pod).await {
                warn!(pod = %pod.key, %peer, err = %format!("{err:#}"), "outbound connection failed");
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
    // The socket's family is its peer's (an IPv6 listener's peers are IPv6, mapped or not): no
    // `getsockname` needed.
    let destination = socket::original_dst_fd(stream.as_fd(), peer.is_ipv6())?;
    let Routed {
        route,
        service,
        pod: destination_pod,
    } = proxy.route(destination)?;
    let (principal, protocol) = match &route {
        Route::Hbone { identity, .. } => (Some(identity), "HBONE"),
        Route::Passthrough { .. } => (None, "TCP"),
    };
    let labels = proxy.labels(
        "source",
        Some(pod),
        destination_pod.as_deref(),
        principal,
        service.as_deref(),
    );
    let mut record = Record::open(
        &proxy.metrics,
        Opening {
            direction: Direction::Outbound,
            protocol,
            source: pod.client_address(peer, destination.ip()),
            destination,
            labels,
        },
    );
    let mut stream = crate::metrics::Counted::new(stream, record.counters());
    if let Route::Hbone { target, .. } = &route
        && let Some(local) = proxy.local.get(target.ip())
    {
        // Boxed, as `open_tunnel` below: its admission and dial would size every cross-node
        // connection's task.
        return Box::pin(same_node(stream, peer, proxy, pod, &local, *target, record)).await;
    }
    let copied = match &route {
        Route::Passthrough { target } => {
            // The upstream is a socket of its own: a second slot of the node's budget.
            let Some(_upstream_slot) = pod.socket_slot(proxy).await else {
                // Counted and logged now and then by `socket_slot`, not once per connection.
                record.fail(Flags::Overflow, Spent::Node.to_string());
                super::reset(stream.into_inner());
                return Ok(());
            };
            match Box::pin(proxy.connect_in(&pod.netns, *target, None, Leg::Network)).await {
                Ok(mut upstream) => super::copy(&mut stream, &mut upstream).await,
                Err(err) => {
                    // The application sees its connection reset, as if the destination had
                    // refused it.
                    record.fail(Flags::Connect, err.to_string());
                    super::reset(stream.into_inner());
                    return Err(err.into());
                }
            }
        }
        Route::Hbone { target, identity } => {
            // Boxed, so that this task, which lives as long as the connection, is sized for
            // copying rather than for opening (see `hbone::Pool::connect`).
            let tunnel = Box::pin(open_tunnel(
                proxy,
                pod,
                peer,
                *target,
                identity,
                &mut stream,
            ))
            .await;
            match tunnel {
                Ok(mut tunnel) => super::copy(&mut stream, &mut tunnel.io).await,
                // The client went away while the answer was awaited: its own doing, recorded
                // as a copy that failed, not as the destination's failure.
                Err(hbone::Error::Client { source, .. }) => Err(source),
                // Counted and logged now and then by `socket_slot`, not once per connection.
                Err(err @ hbone::Error::Budget { .. }) => {
                    record.fail(Flags::Overflow, err.to_string());
                    super::reset(stream.into_inner());
                    return Ok(());
                }
                Err(err) => {
                    debug!(pod = %pod.key, %destination, %err, "HBONE failed");
                    let flags = match err {
                        hbone::Error::Refused { status, .. } => Flags::refused_with(status),
                        _ => Flags::Connect,
                    };
                    record.fail(flags, err.to_string());
                    super::reset(stream.into_inner());
                    return Err(err.into());
                }
            }
        }
    };
    if let Err(err) = copied {
        record.copy_failed(&err);
    }
    Ok(())
}

/// Carries a connection to a pod of this node without a tunnel ([`super::local`]): the
/// destination's own admission (policy with the client's identity, budget, upstream dialled in
/// its namespace), then one copy between the client and the application, with both records.
async fn same_node(
    mut stream: crate::metrics::Counted<TcpStream>,
    peer: SocketAddr,
    proxy: &Proxy,
    pod: &PodContext,
    destination: &PodContext,
    target: SocketAddr,
    mut record: Record,
) -> anyhow::Result<()> {
    let connect = hbone::Connect {
        peer_identity: pod.identity.clone(),
        // What the destination would see as the tunnel's TCP peer: the client pod's address.
        peer: pod.client_address(peer, target.ip()),
        authority: target,
        forwarded: None,
    };
    match Box::pin(super::inbound::admit(proxy, destination, connect)).await {
        hbone::Admission::Upstream(admitted) => {
            let hbone::Upstream {
                stream: mut upstream,
                mut live,
                record: mut inbound,
                permit: _permit,
            } = *admitted;
            // The destination's record counts what the client side sends and receives, as it
            // counts a tunnel's.
            let mut client = crate::metrics::Counted::new(&mut stream, inbound.counters());
            tokio::select! {
                copied = super::copy(&mut client, &mut upstream) => {
                    if let Err(err) = copied {
                        inbound.copy_failed(&err);
                        record.copy_failed(&err);
                    }
                }
                reason = live.closed() => inbound.ended(format!("closed by a policy change: {reason}")),
            }
            Ok(())
        }
        hbone::Admission::Reject(status, reason) => {
            record.fail(Flags::refused_with(status), reason.clone());
            super::reset(stream.into_inner());
            Err(anyhow::anyhow!(
                "{destination}: {status} {reason}",
                destination = destination.key
            ))
        }
    }
}

/// Opens an HBONE stream to `target` for `pod`, over a connection of the pod's own pool
/// (dialled from its namespace, so the server sees its address). What the client sends
/// meanwhile goes ahead of the answer ([`hbone::Pool::connect`]).
async fn open_tunnel(
    proxy: &Proxy,
    pod: &PodContext,
    peer: SocketAddr,
    target: SocketAddr,
    identity: &identity::Identity,
    client: &mut crate::metrics::Counted<TcpStream>,
) -> Result<hbone::Tunnel, hbone::Error> {
    let key = hbone::PoolKey {
        source_pod: pod.uid.clone(),
        source: pod.identity.clone(),
        destination: identity.clone(),
        destination_ip: target.ip(),
    };
    let forwarded_for = pod.client_address(peer, target.ip());
    let netns = pod.netns.clone();
    let source = pod.identity.clone();
    let expected = identity.clone();
    proxy
        .pool
        .connect(&key, target, forwarded_for, client, |hbone_peer| {
            // A new HBONE connection is a socket of its own, held for as long as the pool
            // keeps it: a slot of the node's budget, which the connection holds.
            async move {
                let slot = pod
                    .socket_slot(proxy)
                    .await
                    .ok_or(hbone::Error::Budget { peer: hbone_peer })?;
                let tcp = proxy
                    .connect_in(&netns, hbone_peer, None, Leg::Tunnel)
                    .await
                    .map_err(|source| hbone::Error::Connect {
                        peer: hbone_peer,
                        source,
                    })?;
                let certified = proxy.identities.certified(&source).await?;
                let roots = proxy.identities.roots().current();
                let tls = identity::client_config(&certified, expected, roots)?;
                Ok(hbone::Dialled { tcp, tls, slot })
            }
        })
        .await
}
