//! Plaintext passthrough: a captured connection is carried to where it was going, from inside
//! the pod's network namespace, bytes copied both ways with half-close kept (a client that shuts
//! down its write side still gets the reply).

use std::{io, net::SocketAddr, os::fd::AsFd as _, sync::Arc, time::Instant};

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, info, warn};

use crate::{
    sys::{Netns, socket},
    workload::model::ObjectKey,
};

/// The pod a listener serves.
#[derive(Debug)]
pub struct PodContext {
    /// The pod.
    pub key: ObjectKey,
    /// Its network namespace, where the proxy's outgoing sockets are made.
    pub netns: Arc<Netns>,
}

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// 15001: the pod is the client.
    Outbound,
    /// 15006: the pod is the server.
    Inbound,
}

/// Accepts on `listener` until the task is dropped, carrying each connection in its own task
/// (which outlives the listener: dropping the listener stops new connections only).
pub async fn serve(listener: TcpListener, direction: Direction, pod: Arc<PodContext>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let pod = pod.clone();
                tokio::spawn(async move {
                    if let Err(err) = carry(stream, peer, direction, &pod).await {
                        debug!(pod = %pod.key, ?direction, %peer, %err, "connection failed");
                    }
                });
            }
            Err(err) => {
                // Out of descriptors and the like: back off rather than spin.
                warn!(pod = %pod.key, ?direction, %err, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn carry(
    mut stream: TcpStream,
    peer: SocketAddr,
    direction: Direction,
    pod: &PodContext,
) -> io::Result<()> {
    let start = Instant::now();
    let destination = match direction {
        Direction::Outbound => {
            socket::original_dst_fd(stream.as_fd(), stream.local_addr()?.is_ipv6())?
        }
        // sk_lookup hands the connection over without rewriting it: the local address is the
        // original destination.
        Direction::Inbound => stream.local_addr()?,
    };
    let mut upstream = connect_in(&pod.netns, destination).await?;
    let (sent, received) = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await?;
    info!(
        target: "meshlet::access",
        pod = %pod.key,
        direction = ?direction,
        src = %peer,
        dst = %destination,
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
