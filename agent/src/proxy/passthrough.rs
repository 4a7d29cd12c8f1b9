//! Inbound plaintext: connections steered to a pod's 15006 by `sk_lookup` are checked
//! (meshlet's own ports refused, PeerAuthentication, AuthorizationPolicy) and carried to the
//! application, with half-close kept (a client that shuts down its write side still gets the
//! reply). Refusals are resets.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};

use super::{
    PodContext, Proxy, Refusal,
    connections::ConnectionInfo,
    record::{Direction, Flags, Opening, Record},
};

/// Accepts on a pod's 15006 listener until the task is dropped.
pub async fn serve_inbound(listener: TcpListener, proxy: Arc<Proxy>, pod: Arc<PodContext>) {
    let carried = (proxy.clone(), pod.clone());
    super::accept_loop(listener, proxy, pod, move |stream, peer, permit| {
        let (proxy, pod) = carried.clone();
        async move {
            let _permit = permit;
            carry_inbound(stream, peer, &proxy, &pod).await;
        }
    })
    .await;
}

async fn carry_inbound(stream: TcpStream, peer: SocketAddr, proxy: &Proxy, pod: &PodContext) {
    // sk_lookup hands the connection over without rewriting it: the local address is the
    // original destination.
    let Ok(destination) = stream.local_addr() else {
        return;
    };
    let opening = Opening {
        direction: Direction::Inbound,
        protocol: "TCP",
        source: peer,
        destination,
        labels: proxy.inbound_labels(None, peer.ip().to_canonical(), pod, destination),
    };
    let admitted = if proxy.limits.is_reserved(destination.port()) {
        proxy.metrics.limit_reached("reserved_port");
        let reason = format!("port {} is one of meshlet's own", destination.port());
        Err((
            Flags::NoRoute,
            Refusal {
                reason,
                policy: None,
            },
        ))
    } else {
        match proxy.store.pod(&pod.key) {
            None => {
                let reason = format!("{} is no longer known", pod.key);
                Err((
                    Flags::Connect,
                    Refusal {
                        reason,
                        policy: None,
                    },
                ))
            }
            Some(workload) => proxy
                .check(
                    &proxy.policies(),
                    &workload,
                    destination,
                    None,
                    peer.ip().to_canonical(),
                )
                .map_err(|refusal| (Flags::Deny, refusal)),
        }
    };
    let policy = match admitted {
        Ok(policy) => policy,
        Err((flags, refusal)) => {
            let mut record = Record::refused(&proxy.metrics, opening, flags, refusal.reason);
            record.decided_by(refusal.policy);
            drop(record);
            return super::reset(stream);
        }
    };
    // The upstream is a socket of its own: a second slot of the node's budget.
    let Some(_upstream_slot) = pod.socket_slot(proxy).await else {
        let mut record = Record::refused(
            &proxy.metrics,
            opening,
            Flags::Overflow,
            super::Spent::Node.to_string(),
        );
        record.decided_by(policy);
        drop(record);
        return super::reset(stream);
    };
    let mut record = Record::open(&proxy.metrics, opening);
    record.decided_by(policy);
    let mut live = proxy.connections.register(ConnectionInfo {
        source_identity: None,
        source: peer,
        destination_pod: pod.key.clone(),
        destination,
    });
    // Boxed, as admission on the HBONE side: the dial must not size this long-lived task.
    let mut upstream = match Box::pin(proxy.connect_to_application(pod, destination, peer)).await {
        Ok(upstream) => upstream,
        Err(err) => {
            record.fail(Flags::Connect, format!("connect to the application: {err}"));
            return super::reset(stream);
        }
    };
    let mut stream = crate::metrics::Counted::new(stream, record.counters());
    tokio::select! {
        copied = super::copy(&mut stream, &mut upstream) => {
            if let Err(err) = copied {
                record.copy_failed(&err);
            }
        }
        reason = live.closed() => record.ended(format!("closed by a policy change: {reason}")),
    }
}
