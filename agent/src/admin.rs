//! The agent's HTTP endpoints:
//!
//! - metrics (`--metrics-addr`, default `0.0.0.0:15020`): `GET /metrics`, Prometheus text;
//! - readiness (`--readiness-addr`, default `0.0.0.0:15021`): `GET /healthz/ready`, 200 once
//!   capture is attached and the source has synced, else 503 with the reason; and
//!   `GET /healthz/live`, 200 while the in-pod reconciler turns (the liveness probe: a wedged
//!   agent is restarted, one waiting for the API server or the CA is not);
//! - admin (`--admin-addr`, default `127.0.0.1:15000`, loopback only): JSON for
//!   `/config_dump`, `/workloads`, `/certs`, `/policies` — what `meshlet status`,
//!   `meshlet workloads`, `meshlet certs` and `meshlet policies` print.

use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::{
    capture::Pinned,
    identity,
    proxy::Proxy,
    source::SyncState,
    workload::{enrollment::Decision, model::ObjectKey},
};

/// What the endpoints read.
#[derive(Debug, Clone)]
pub struct State {
    /// The node's name.
    pub node: String,
    /// The proxy (store, identities, policies, metrics).
    pub proxy: Arc<Proxy>,
    /// Source sync state.
    pub sync: Arc<SyncState>,
    /// Where capture is pinned (its counters and enrollment are read from there).
    pub bpffs_dir: PathBuf,
    /// The resolved configuration, for `/config_dump`.
    pub config: serde_json::Value,
    /// The store generation the last completed enrollment pass reflected (0: none yet).
    pub enrollment_generation: Arc<std::sync::atomic::AtomicU64>,
    /// Where each pod to capture stands (enrolled and how, or what it waits for).
    pub captures: Arc<crate::inpod::CaptureStates>,
    /// With `--cni-install`: whether meshlet-cni is chained in the node's primary CNI conf
    /// (the node is not ready before: new pods would start uncaptured).
    pub cni_chained: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// When the in-pod reconciler last turned ([`crate::inpod::Heartbeat`]).
    pub heartbeat: Arc<crate::inpod::Heartbeat>,
}

/// One row of `/workloads`.
#[derive(Debug, Serialize)]
pub struct WorkloadRow {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Addresses.
    pub ips: Vec<String>,
    /// Node.
    pub node: String,
    /// Whether the mesh captures it.
    pub enrolled: bool,
    /// How other workloads reach it: `HBONE` or `TCP`.
    pub protocol: &'static str,
    /// Its SPIFFE identity.
    pub identity: String,
    /// Why it is not enrolled, if it is not.
    pub decision: Decision,
    /// For a pod this node captures: enrolled (and how its namespace was found) or pending
    /// (and what it waits for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture: Option<crate::inpod::CaptureState>,
}

/// Serves `router` on `listener` until the task is dropped.
pub async fn serve<S: Clone + Send + Sync + 'static>(
    listener: TcpListener,
    state: S,
    router: fn(&S, &Request<hyper::body::Incoming>) -> Response<Full<Bytes>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = router(&state, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%err, "admin connection ended");
            }
        });
    }
}

/// How an endpoint of the agent answers a request.
pub type Router = fn(&State, &Request<hyper::body::Incoming>) -> Response<Full<Bytes>>;

/// Binds `addr` and serves `router` there.
pub fn start<S: Clone + Send + Sync + 'static>(
    name: &'static str,
    addr: SocketAddr,
    state: S,
    router: fn(&S, &Request<hyper::body::Incoming>) -> Response<Full<Bytes>>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    start_on(name, bind(name, addr)?, state, router)
}

/// Listens on `addr` for the endpoint `name`, with `SO_REUSEPORT`: an agent that starts while
/// another still holds the port (a rollout's surge pod that could not take the listeners over)
/// binds beside it instead of failing.
pub fn bind(name: &'static str, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let bound = (|| {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        Ok(std::net::TcpListener::from(socket))
    })();
    bound.map_err(|err: std::io::Error| {
        let holder = (err.kind() == std::io::ErrorKind::AddrInUse)
            .then(|| crate::sys::socket::port_holder(addr.port()))
            .flatten()
            .map(|holder| format!(", held by {holder}"))
            .unwrap_or_default();
        std::io::Error::new(
            err.kind(),
            format!(
                "bind the {name} endpoint on {addr}: {err}{holder} (free the port or choose \
                 another with --{name}-addr)"
            ),
        )
    })
}

/// Serves the endpoint `name` on `listener` (bound here, or handed over by the agent this one
/// succeeds) in a task of its own.
pub fn start_on<S: Clone + Send + Sync + 'static>(
    name: &'static str,
    listener: std::net::TcpListener,
    state: S,
    router: fn(&S, &Request<hyper::body::Incoming>) -> Response<Full<Bytes>>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    let bound = listener.local_addr()?;
    info!(endpoint = name, addr = %bound, "serving");
    Ok(tokio::spawn(serve(listener, state, router)))
}

pub(crate) fn reply(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("a response from valid parts")
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => reply(StatusCode::OK, "application/json", body),
        Err(err) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            err.to_string(),
        ),
    }
}

/// `GET /metrics`.
pub fn metrics(state: &State, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics\n",
        );
    }
    let metrics = &state.proxy.metrics;
    if let Ok(pinned) = Pinned::open(&state.bpffs_dir) {
        if let Ok(redirects) = pinned.redirects() {
            metrics
                .redirected
                .with_label_values(&["outbound"])
                .set(redirects.outbound as i64);
            metrics
                .redirected
                .with_label_values(&["inbound"])
                .set(redirects.inbound as i64);
            // Kubelet's probes: passed to the application unsteered.
            metrics
                .redirected
                .with_label_values(&["kubelet_probe"])
                .set(redirects.probes as i64);
        }
        if let Ok(enrolled) = pinned.enrolled() {
            metrics.enrolled_workloads.set(enrolled.len() as i64);
        }
    }
    metrics.source_synced.set(i64::from(state.sync.synced()));
    let now = std::time::SystemTime::now();
    let certs = state.proxy.identities.list();
    for cert in &certs {
        let Some(not_after) = cert.not_after else {
            continue;
        };
        let left = not_after
            .duration_since(now)
            .map_or(0, |d| d.as_secs() as i64);
        metrics
            .certificate_expiry
            .with_label_values(&[&cert.identity.to_string()])
            .set(left);
    }
    let pending = certs
        .iter()
        .filter(|c| c.state == identity::CertState::Pending);
    metrics.certificates_pending.set(pending.count() as i64);
    metrics
        .ca_reachable
        .set(i64::from(state.proxy.identities.issuer_status().reachable));
    metrics
        .policy_unsupported_fields
        .set(state.proxy.policies().unsupported_fields() as i64);
    metrics.observe_process();
    reply(
        StatusCode::OK,
        "text/plain; version=0.0.4",
        metrics.render(),
    )
}

/// How long the in-pod reconciler may go without turning before the agent counts as wedged.
/// It turns at least every quarter second; a handoff freezes it for at most a few seconds.
pub const LIVENESS_STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// `GET /healthz/ready` and `GET /healthz/live`.
pub fn readiness(state: &State, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/healthz/ready" => {}
        "/healthz/live" => {
            return match state.heartbeat.since() {
                stalled if stalled > LIVENESS_STALL => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not live: the in-pod reconciler has not run for {stalled:?}\n"),
                ),
                _ => reply(StatusCode::OK, "text/plain", "live\n"),
            };
        }
        _ => {
            return reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /healthz/ready or /healthz/live\n",
            );
        }
    }
    if state
        .cni_chained
        .as_ref()
        .is_some_and(|chained| !chained.load(std::sync::atomic::Ordering::Acquire))
    {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: meshlet-cni is not chained in the node's CNI conf yet (no conf written \
             by the primary plugin, or one meshlet cannot edit: see the log)\n",
        );
    }
    if state.sync.synced()
        && state
            .enrollment_generation
            .load(std::sync::atomic::Ordering::Acquire)
            == 0
    {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: the pods' listeners are not open yet (first enrollment pass)\n",
        );
    }
    if state.sync.synced() {
        match state.proxy.identities.readiness() {
            Ok(None) => reply(StatusCode::OK, "text/plain", "ready\n"),
            Ok(Some(note)) => reply(StatusCode::OK, "text/plain", format!("ready\n{note}\n")),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        }
    } else {
        let kinds: Vec<String> = state
            .sync
            .unsynced()
            .iter()
            .map(|k| format!("{k:?}"))
            .collect();
        reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("not ready: source not synced for {}\n", kinds.join(", ")),
        )
    }
}

/// `/policies?workload=namespace/name`: the policies that bear on that pod, and why.
fn explain(state: &State, workload: &str) -> Response<Full<Bytes>> {
    let Some((namespace, name)) = workload.split_once('/') else {
        return reply(
            StatusCode::BAD_REQUEST,
            "text/plain",
            format!("{workload:?} is not a pod: write namespace/name\n"),
        );
    };
    let key = ObjectKey::new(namespace, name);
    let Some(pod) = state.proxy.store.pod(&key) else {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no pod {key} is known to this agent\n"),
        );
    };
    let explanation = state
        .proxy
        .policies()
        .explain(crate::policy::Workload::from(&*pod));
    json(&serde_json::json!({
        "workload": key,
        "labels": pod.labels,
        "mtls": explanation.mtls,
        "ports": explanation.ports,
        "policies": explanation.policies,
    }))
}

/// The admin API.
pub fn admin(state: &State, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let proxy = &state.proxy;
    match request.uri().path() {
        "/config_dump" => json(&serde_json::json!({
            "node": state.node,
            "config": state.config,
            "synced": state.sync.synced(),
            "store": proxy.store.dump(),
        })),
        "/generation" => json(&serde_json::json!({
            "store": *proxy.store.subscribe().borrow(),
            "policies": proxy.policy_cache.applied_generation(),
            "enrollment": state
                .enrollment_generation
                .load(std::sync::atomic::Ordering::Acquire),
        })),
        "/workloads" => json(&workloads(state)),
        "/certs" => json(&proxy.identities.list()),
        "/policies" => match request
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("workload="))
        {
            Some(workload) => explain(state, workload),
            None => json(&proxy.policies().report()),
        },
        "/logging" => {
            let level = request
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level=")));
            match (level, crate::telemetry::level_handle()) {
                (Some(level), Some(handle)) => match handle.set(level) {
                    Ok(()) => {
                        info!(level, "log level changed");
                        reply(
                            StatusCode::OK,
                            "text/plain",
                            format!("log level: {level}\n"),
                        )
                    }
                    Err(err) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{err}\n")),
                },
                (None, _) => reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "usage: /logging?level=debug\n",
                ),
                (_, None) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "logging is not reloadable here\n",
                ),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: /config_dump, /generation, /workloads, /certs, /policies\n",
        ),
    }
}

/// Every pod the agent knows, with what it decided.
pub fn workloads(state: &State) -> Vec<WorkloadRow> {
    let proxy = &state.proxy;
    proxy
        .store
        .pods()
        .iter()
        .map(|pod| {
            let namespace = proxy.store.namespace(&pod.key.namespace);
            let node = pod.node_name.clone().unwrap_or_default();
            let decision = proxy.enrollment.decide(pod, namespace.as_deref(), &node);
            let capture = (node == state.node)
                .then(|| state.captures.get(&pod.uid))
                .flatten();
            WorkloadRow {
                namespace: pod.key.namespace.clone(),
                name: pod.key.name.clone(),
                ips: pod.ips.iter().map(ToString::to_string).collect(),
                node,
                enrolled: decision == Decision::Enroll,
                protocol: if decision == Decision::Enroll {
                    "HBONE"
                } else {
                    "TCP"
                },
                identity: proxy
                    .identity_of(pod)
                    .map(|i| i.to_string())
                    .unwrap_or_default(),
                capture,
                decision,
            }
        })
        .collect()
}
