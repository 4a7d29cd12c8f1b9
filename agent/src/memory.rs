//! Memory back to the node after a burst of connections.
//!
//! Each connection costs a few KiB of heap (task, buffers, HTTP/2 stream state). When thousands
//! close at once, glibc keeps most of that memory: it only trims the top of each arena, and
//! long-lived allocations made during the burst pin the pages below it. Measured on the bench
//! (`cargo xtask bench`), an agent stayed at 3-5 times its idle RSS 30 s after an
//! 8,876-connection burst had closed.
//!
//! [`give_back_after_bursts`] watches the sockets the node's connections hold ([`NodeBudget`]:
//! one per accepted socket, upstream socket and HBONE connection) and the TCP connections that
//! carry them: the HBONE pool, whose spare connections a burst leaves behind close shortly after it
//! ([`hbone::SPARE_IDLE_TIMEOUT`]), and the accepted ones ([`Drain::live`]), among which the
//! peers' HBONE connections close when their pools let go of them. Once those sockets have
//! fallen by at least [`MIN_DROP`] since their peak, or the TCP ones by
//! [`MIN_TCP_DROP`] since the last look, it has the allocator release its free pages
//! ([`sys::release_free_memory`]). The check costs two atomic loads every [`CHECK_INTERVAL`];
//! the release runs on a blocking thread, a few milliseconds after a burst, never on the data
//! path.

use std::{sync::Arc, time::Duration};

use tracing::debug;

use crate::{
    drain::Drain,
    proxy::{NodeBudget, hbone},
    sys,
};

/// How often the connection count is compared with its peak.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Connections that must have ended since the peak before memory is given back: below it the
/// heap they freed is small and is reused by the next connections anyway.
pub const MIN_DROP: usize = 256;

/// TCP connections (pooled or accepted) that must have closed since the last look (an HBONE
/// one held TLS and HTTP/2 buffers) before memory is given back.
pub const MIN_TCP_DROP: usize = 8;

/// Whether a fall from `peak` to `live` proxied connections, or from `tcp_before` to `tcp` TCP
/// connections, is a burst that ended.
pub fn burst_ended(peak: usize, live: usize, tcp_before: usize, tcp: usize) -> bool {
    peak.saturating_sub(live) >= MIN_DROP || tcp_before.saturating_sub(tcp) >= MIN_TCP_DROP
}

/// Runs for the agent's life: after each burst, the free heap goes back to the kernel.
pub async fn give_back_after_bursts(
    connections: Arc<NodeBudget>,
    pool: Arc<hbone::Pool>,
    accepted: Drain,
) {
    let mut every = tokio::time::interval(CHECK_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tcp_before = 0;
    loop {
        every.tick().await;
        let peak = connections.take_peak();
        let live = connections.in_use();
        let tcp = pool.len() + accepted.live();
        let ended = burst_ended(peak, live, tcp_before, tcp);
        tcp_before = tcp;
        if ended {
            let released = tokio::task::spawn_blocking(sys::release_free_memory)
                .await
                .unwrap_or(false);
            debug!(
                peak,
                live, tcp, released, "connection burst ended: free heap given back"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_fall_of_min_drop_connections_or_tcp_ones_is_a_burst() {
        let connections = |peak, live| burst_ended(peak, live, 0, 0);
        assert!(!connections(0, 0));
        assert!(!connections(MIN_DROP - 1, 0));
        assert!(connections(MIN_DROP, 0));
        assert!(connections(10_000, 9_000));
        assert!(!connections(10_000, 10_000 - MIN_DROP + 1));
        // More live than the peak (connections opened since): no burst.
        assert!(!connections(10, 20));
        // The pool's spares (or the peers' HBONE connections) closing after a burst.
        let tcp = |before, now| burst_ended(0, 0, before, now);
        assert!(tcp(90, 1));
        assert!(tcp(MIN_TCP_DROP, 0));
        assert!(!tcp(MIN_TCP_DROP - 1, 0));
        assert!(!tcp(1, 90), "more than before");
    }
}
