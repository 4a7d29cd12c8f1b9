//! Plaintext: inbound connections steered to a pod's 15006 are carried to the application, and
//! [`connect_in`] makes the proxy's outgoing connections from inside a pod's network namespace.
//! Bytes are copied both ways with half-close kept (a client that shuts down its write side
//! still gets the reply).

use std::{io, net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, info};

use super::{PodContext, Proxy, connections::ConnectionInfo};
use crate::sys::{Netns, socket};

/// Accepts on a pod's 15006 listener (inbound plaintext, steered by sk_lookup) until the task
/// is dropped, carrying each connection to the application in its own task (which outlives
/// the listener: dropping the listener stops new connections only).
pub async fn serve_inbound(listener: TcpListener, proxy: Arc<Proxy>, pod: Arc<PodContext>) {
    super::accept_loop(listener, pod.clone(), move |stream, peer| {
        let (proxy, pod) = (proxy.clone(), pod.clone());
        async move {
            if let Err(err) = carry_inbound(stream, peer, &proxy, &pod).await {
                debug!(pod = %pod.key, %peer, %err, "inbound connection failed");
            }
        }
    })
    .await;
}

async fn carry_inbound(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: &Proxy,
    pod: &PodContext,
) -> io::Result<()> {
    let start = Instant::now();
    // sk_lookup hands the connection over without rewriting it: the local address is the
    // original destination.
    let destination = stream.local_addr()?;
    let Some(workload) = proxy.store.pod(&pod.key) else {
        return Ok(());
    };
    let mut labels = proxy.inbound_labels(None, peer.ip(), pod);
    if let Err(reason) = proxy.check(&proxy.policies(), &workload, destination, None, peer.ip()) {
        labels.response_flags = "DENY";
        proxy.metrics.open(&labels);
        proxy.metrics.close(&labels);
        info!(
            target: "meshlet::access",
            direction = "inbound",
            dst_workload = %pod.key,
            src = %peer,
            dst = %destination,
            protocol = "TCP",
            response_flags = "DENY",
            %reason,
            "connection denied"
        );
        return Ok(()); // dropping the stream closes it
    }
    let mut live = proxy.connections.register(ConnectionInfo {
        source_identity: None,
        source: peer,
        destination_pod: pod.key.clone(),
        destination,
    });
    let counters = proxy.metrics.open(&labels);
    let mut stream = crate::metrics::Counted::new(stream, counters);
    let upstream = connect_in(&pod.netns, destination).await;
    let mut upstream = match upstream {
        Ok(upstream) => upstream,
        Err(err) => {
            labels.response_flags = "CONNECT";
            proxy.metrics.close(&labels);
            return Err(err);
        }
    };
    let copied = tokio::select! {
        copied = super::copy(&mut stream, &mut upstream) => copied?,
        reason = live.closed() => {
            info!(target: "meshlet::access", dst_workload = %pod.key, src = %peer, dst = %destination, %reason, "live connection closed by a policy change");
            proxy.metrics.close(&labels);
            return Ok(());
        }
    };
    proxy.metrics.close(&labels);
    let (received, sent) = copied;
    info!(
        target: "meshlet::access",
        direction = "inbound",
        dst_workload = %pod.key,
        dst_identity = %pod.identity,
        src = %peer,
        dst = %destination,
        protocol = "TCP",
        bytes_sent = sent,
        bytes_received = received,
        duration_ms = start.elapsed().as_millis() as u64,
        "connection closed"
    );
    Ok(())
}

/// Connects to `destination` from a marked socket made inside `netns`.
pub async fn connect_in(netns: &Arc<Netns>, destination: SocketAddr) -> io::Result<TcpStream> {
    let netns = netns.clone();
    let socket = tokio::task::spawn_blocking(move || {
        socket::marked_socket_in(&netns, destination.is_ipv6())
    })
    .await
    .map_err(io::Error::other)??;
    socket.set_nonblocking(true)?;
    TcpSocket::from_std_stream(socket.into())
        .connect(destination)
        .await
}
