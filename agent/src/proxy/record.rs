//! One record per proxied connection: the Istio metrics and the access log line, kept in one
//! place so every listener reports the same way.
//!
//! [`Record::open`] counts the connection opened; the copy path counts bytes as they pass
//! through [`Record::counters`]; when the record is dropped (however the connection's task
//! ends) it counts the connection closed and writes one access log line (`connection closed`,
//! or `connection denied` for a policy refusal) with both ends, their identities, the bytes
//! each way, the duration, the response flags and the reason.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::info;

use crate::{
    metrics::{ByteCounters, ConnectionLabels, Metrics},
    workload::model::ObjectKey,
};

/// Which end of the connection this node's pod is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The pod is the client (15001).
    Outbound,
    /// The pod is the server (15006, 15008).
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// How a connection ended, as Istio's `response_flags` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flags {
    /// Carried (`-`).
    Ok,
    /// Refused by policy (`DENY`).
    Deny,
    /// The upstream could not be reached (`CONNECT`).
    Connect,
    /// The original destination is one of meshlet's own ports: nothing to route to (`NR`,
    /// Envoy's "no route").
    NoRoute,
    /// The pod's or the node's connection budget is spent (`UO`, Envoy's "upstream overflow").
    Overflow,
}

impl Flags {
    /// The flags of a client-side connection its destination's admission refused with
    /// `status`: 401 is a policy's refusal, anything else a failure to connect.
    pub fn refused_with(status: http::StatusCode) -> Self {
        if status == http::StatusCode::UNAUTHORIZED {
            Self::Deny
        } else {
            Self::Connect
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "-",
            Self::Deny => "DENY",
            Self::Connect => "CONNECT",
            Self::NoRoute => "NR",
            Self::Overflow => "UO",
        }
    }
}

/// One connection's metrics and access log line.
#[derive(Debug)]
pub struct Record {
    metrics: Arc<Metrics>,
    labels: ConnectionLabels,
    direction: Direction,
    protocol: &'static str,
    source: SocketAddr,
    destination: SocketAddr,
    /// A client-supplied `Forwarded` header, for the log only: never trusted.
    forwarded: Option<String>,
    start: Instant,
    counters: ByteCounters,
    flags: Flags,
    reason: Option<String>,
    /// The policy that admitted or refused the connection, if one did.
    policy: Option<Arc<ObjectKey>>,
}

/// What a connection record is opened with.
#[derive(Debug)]
pub struct Opening {
    /// Which end this node's pod is.
    pub direction: Direction,
    /// `TCP` (plaintext) or `HBONE`.
    pub protocol: &'static str,
    /// The client's address as this node sees it.
    pub source: SocketAddr,
    /// The original destination.
    pub destination: SocketAddr,
    /// Istio's labels (`source_principal` is the verified peer identity for HBONE).
    pub labels: ConnectionLabels,
}

impl Record {
    /// Counts the connection opened.
    pub fn open(metrics: &Arc<Metrics>, opening: Opening) -> Self {
        let counters = metrics.open(&opening.labels);
        Self {
            metrics: metrics.clone(),
            labels: opening.labels,
            direction: opening.direction,
            protocol: opening.protocol,
            source: opening.source,
            destination: opening.destination,
            forwarded: None,
            start: Instant::now(),
            counters,
            flags: Flags::Ok,
            reason: None,
            policy: None,
        }
    }

    /// A connection refused before anything was carried (policy, a limit, a guard): counted as
    /// opened and closed with `flags`, logged with `reason` when dropped (at once, usually).
    pub fn refused(
        metrics: &Arc<Metrics>,
        mut opening: Opening,
        flags: Flags,
        reason: impl Into<String>,
    ) -> Self {
        opening.labels.response_flags = flags.as_str();
        let mut record = Self::open(metrics, opening);
        record.fail(flags, reason);
        record
    }

    /// The connection's byte counters, for [`crate::metrics::Counted`].
    pub fn counters(&self) -> ByteCounters {
        self.counters.clone()
    }

    /// Notes the policy that admitted or refused the connection.
    pub fn decided_by(&mut self, policy: Option<Arc<ObjectKey>>) {
        self.policy = policy;
    }

    /// Notes the client's `Forwarded` header (logged, never trusted).
    pub fn forwarded(&mut self, value: Option<&str>) {
        self.forwarded = value.map(|v| v.chars().take(128).collect());
    }

    /// Marks the connection refused or failed, with the reason (the close line carries it).
    pub fn fail(&mut self, flags: Flags, reason: impl Into<String>) {
        self.flags = flags;
        self.reason = Some(reason.into());
    }

    /// Notes why a connection that was carried ended early (a policy change, a timeout).
    pub fn ended(&mut self, reason: impl Into<String>) {
        self.reason = Some(reason.into());
    }

    /// Notes that copying failed with `err`; keepalive timeouts (a peer that vanished) are
    /// counted as such.
    pub fn copy_failed(&mut self, err: &std::io::Error) {
        if err.kind() == std::io::ErrorKind::TimedOut {
            self.metrics.limit_reached("tcp_keepalive");
        }
        self.reason = Some(err.to_string());
    }

    fn bytes(&self) -> (u64, u64) {
        self.counters.tally()
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        // A connection that failed after it was opened (`CONNECT`) is closed with its flags.
        let flags = self.flags.as_str();
        self.labels.response_flags = flags;
        self.metrics.close(&self.labels);
        let (sent, received) = self.bytes();
        let duration_ms = duration_ms(self.start.elapsed());
        let message = if self.flags == Flags::Deny {
            "connection denied"
        } else {
            "connection closed"
        };
        let (l, source, destination) =
            (&self.labels, &self.labels.source, &self.labels.destination);
        info!(
            target: "meshlet::access",
            direction = %self.direction.as_str(),
            src = %self.source,
            dst = %self.destination,
            src_workload = %source.pod_key(),
            src_identity = %source.principal(),
            dst_workload = %destination.pod_key(),
            dst_identity = %destination.principal(),
            dst_service = %l.service.host,
            // The client wrote it: quoted and escaped, so it cannot pose as other fields.
            forwarded = self.forwarded.as_deref().map(tracing::field::debug),
            protocol = %self.protocol,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms,
            response_flags = %flags,
            policy = self.policy.as_deref().map(tracing::field::display),
            reason = self.reason.as_deref().map(tracing::field::display),
            "{message}"
        );
    }
}

fn duration_ms(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opening() -> Opening {
        Opening {
            direction: Direction::Inbound,
            protocol: "TCP",
            source: "10.244.0.10:40000".parse().unwrap(),
            destination: "10.244.1.11:8080".parse().unwrap(),
            labels: ConnectionLabels {
                reporter: "destination",
                ..Default::default()
            },
        }
    }

    fn count(metrics: &Metrics, family: &str, flags: &str) -> u64 {
        metrics
            .render()
            .lines()
            .filter(|l| l.starts_with(family) && l.contains(&format!("response_flags=\"{flags}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    #[test]
    fn each_connection_is_opened_and_closed_once_with_its_final_flags() {
        let metrics = Arc::new(Metrics::new());
        drop(Record::refused(&metrics, opening(), Flags::Deny, "denied"));
        let mut failed = Record::open(&metrics, opening());
        failed.fail(Flags::Connect, "connection refused");
        drop(failed);
        drop(Record::open(&metrics, opening()));
        let opened = "istio_tcp_connections_opened_total";
        let closed = "istio_tcp_connections_closed_total";
        assert_eq!(count(&metrics, opened, "DENY"), 1);
        assert_eq!(count(&metrics, closed, "DENY"), 1);
        // A connection that failed after it was opened: opened as `-`, closed as CONNECT.
        assert_eq!(count(&metrics, opened, "-"), 2);
        assert_eq!(count(&metrics, closed, "-"), 1);
        assert_eq!(count(&metrics, closed, "CONNECT"), 1);
    }
}
