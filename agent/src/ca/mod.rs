//! `meshlet ca`: the mesh's certificate authority, so that no node holds a CA key.
//!
//! It runs as a Deployment (two replicas behind the `meshlet-ca` Service) and serves Istio's
//! certificate API, `istio.v1.auth.IstioCertificateService/CreateCertificate`, on port 15012
//! (gRPC over TLS): meshlet agents, istio's ztunnel and anything else that speaks Istio's CA
//! protocol get workload certificates from it.
//!
//! - **Key** ([`root`]): Istio's `cacerts` when mounted, else a self-signed root that the first
//!   replica creates once in a Secret and every replica reuses. The roots to trust are
//!   published in a ConfigMap the agents mount.
//! - **Authentication** ([`authn`]): a projected service-account token as bearer token,
//!   checked with a `TokenReview` for the CA's audience (`istio-ca`, as Istio's).
//! - **Authorization** ([`authz`], [`pods`]): the CSR names exactly one SPIFFE ID of the trust
//!   domain; only node agents may ask for identities other than their own; a pod of that
//!   identity that has not finished must be bound to the caller's node (the token's
//!   `authentication.kubernetes.io/node-name`, else its pod's `spec.nodeName`); the validity
//!   is capped. A compromised node can so obtain the identities of the pods scheduled on it,
//!   and nothing else.
//! - **Observability**: one log line per decision (caller, node, identity, result),
//!   `meshlet_ca_requests_total{result}` and `meshlet_ca_request_duration_seconds` on
//!   `--metrics-addr` (`/metrics`, and `/ready` once the pod watch has synced).

pub mod authn;
pub mod authz;
pub mod pods;
pub mod refusal;
pub mod root;
pub mod server;
pub mod service;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::net::TcpListener;
use tracing::info;

pub use authz::Account;

/// Everything `meshlet ca` is configured with.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    /// Where the gRPC API listens.
    pub listen: SocketAddr,
    /// Where `/metrics` and `/ready` listen.
    pub metrics_addr: SocketAddr,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// The namespace of the root Secret and trust bundle ConfigMap.
    pub namespace: String,
    /// The Secret the self-signed root is kept in.
    pub root_secret: String,
    /// The ConfigMap the trust bundle is published in.
    pub root_configmap: String,
    /// Where Istio's `cacerts` Secret is mounted, if it is.
    pub cacerts_dir: PathBuf,
    /// The audience callers' tokens must be for.
    pub audience: String,
    /// The service accounts that may ask for others' identities.
    pub node_agents: Vec<Account>,
    /// The longest validity signed.
    pub max_validity: Duration,
    /// DNS names and IP addresses of the serving certificate.
    pub server_names: Vec<String>,
}

/// What `/metrics` and `/ready` read.
#[derive(Debug, Clone)]
struct State {
    metrics: service::Metrics,
    pods: Arc<pods::PodIndex>,
}

/// Runs the CA until a termination signal.
pub async fn run(config: Config) -> anyhow::Result<()> {
    info!(config = %serde_json::to_string(&config)?, version = env!("CARGO_PKG_VERSION"), "starting meshlet ca");
    let client = kube::Client::try_default()
        .await
        .context("connect to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let root = root::load(
        &client,
        &config.cacerts_dir,
        &config.namespace,
        &config.root_secret,
        &config.trust_domain,
    )
    .await?;
    info!(source = %root.source, subject = root.ca.subject(), "loaded the CA");
    root::publish(
        &client,
        &config.namespace,
        &config.root_configmap,
        &root.bundle,
    )
    .await?;
    let root = Arc::new(root);

    let pods = Arc::new(pods::PodIndex::default());
    let follow = tokio::spawn(pods::follow(client.clone(), pods.clone()));
    let metrics = service::Metrics::new();
    let state = State {
        metrics: metrics.clone(),
        pods: pods.clone(),
    };
    let endpoint = crate::admin::start("metrics", config.metrics_addr, state, endpoints)?;

    let serving = Arc::new(server::ServingCert::new(
        root.ca.clone(),
        config.server_names.clone(),
    )?);
    let tls = server::tls_config(serving)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind the CA endpoint on {}", config.listen))?;
    info!(endpoint = "grpc", addr = %listener.local_addr()?, "serving Istio's certificate API");
    let signer = service::Signer {
        root,
        client,
        pods,
        policy: Arc::new(service::Policy {
            trust_domain: config.trust_domain.clone(),
            audience: config.audience.clone(),
            node_agents: config.node_agents.clone(),
            max_validity: config.max_validity,
        }),
        metrics,
    };
    let grpc = tokio::spawn(server::serve(listener, tls, signer));
    crate::drain::Signals::install()?.next().await;
    grpc.abort();
    follow.abort();
    endpoint.abort();
    info!("stopped");
    Ok(())
}

fn endpoints(state: &State, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/metrics" => {
            let mut text = String::new();
            let families = state.metrics.registry.gather();
            match prometheus::TextEncoder::new().encode_utf8(&families, &mut text) {
                Ok(()) => crate::admin::reply(StatusCode::OK, prometheus::TEXT_FORMAT, text),
                Err(err) => crate::admin::reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    err.to_string(),
                ),
            }
        }
        "/ready" if state.pods.synced() => {
            crate::admin::reply(StatusCode::OK, "text/plain", "ready\n")
        }
        "/ready" => crate::admin::reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: the pod watch has not synced\n",
        ),
        _ => crate::admin::reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics or /ready\n",
        ),
    }
}
