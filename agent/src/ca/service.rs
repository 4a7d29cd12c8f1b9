//! `CreateCertificate`: authenticate the caller, check the request, check a pod of the
//! identity is bound to the caller's node, sign. Every decision is logged with the caller,
//! node and identity, counted in `meshlet_ca_requests_total{result}` and timed in
//! `meshlet_ca_request_duration_seconds`.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime},
};

use kube::Client;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::{
    authn::{self, Caller},
    authz::{self, Account},
    pods::{self, Binding, PodIndex},
    refusal::{Reason, Refusal},
    root::Root,
};
use crate::{
    identity::{Identity, csr::Csr},
    proto::{
        IstioCertificateRequest, IstioCertificateResponse,
        istio_certificate_service_server::IstioCertificateService,
    },
};

/// The TCP peer of a request, which the server puts in each request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// What the CA signs, for whom.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The mesh's trust domain: the only one signed.
    pub trust_domain: String,
    /// The audience callers' tokens must be for.
    pub audience: String,
    /// The service accounts that may ask for identities other than their own.
    pub node_agents: Vec<Account>,
    /// The longest validity signed.
    pub max_validity: std::time::Duration,
}

/// The CA's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Everything, for `/metrics`.
    pub registry: Registry,
    requests: IntCounterVec,
    duration: Histogram,
}

impl Metrics {
    /// Registers the CA's metrics, with a zero series for every result.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "meshlet_ca_requests_total",
                "Certificate requests, by result: signed, or the reason for the refusal",
            ),
            &["result"],
        )
        .expect("valid metric");
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "meshlet_ca_request_duration_seconds",
                "Time to answer a certificate request (token review, checks and signing)",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(requests.clone()))
            .expect("registered once");
        registry
            .register(Box::new(duration.clone()))
            .expect("registered once");
        requests.with_label_values(&["signed"]);
        for reason in Reason::ALL {
            requests.with_label_values(&[reason.label()]);
        }
        Self {
            registry,
            requests,
            duration,
        }
    }

    fn record(&self, result: &str, started: Instant) {
        self.requests.with_label_values(&[result]).inc();
        self.duration.observe(started.elapsed().as_secs_f64());
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The `IstioCertificateService` implementation.
#[derive(Clone)]
pub struct Signer {
    /// The CA.
    pub root: Arc<Root>,
    /// For token reviews and live pod lookups.
    pub client: Client,
    /// Pod placement.
    pub pods: Arc<PodIndex>,
    /// What is signed for whom.
    pub policy: Arc<Policy>,
    /// Counters.
    pub metrics: Metrics,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("ca", &self.root.ca.subject())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// What is known of a request so far, for the decision's log line.
#[derive(Debug, Default)]
struct Facts {
    caller: Option<String>,
    node: Option<String>,
    identity: Option<String>,
}

#[tonic::async_trait]
impl IstioCertificateService for Signer {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let started = Instant::now();
        let peer = request.extensions().get::<Peer>().map(|peer| peer.0);
        let mut facts = Facts::default();
        let result = self.decide(&request, &mut facts).await;
        let (caller, node, identity) = (
            facts.caller.as_deref().unwrap_or("-"),
            facts.node.as_deref().unwrap_or("-"),
            facts.identity.as_deref().unwrap_or("-"),
        );
        match result {
            Ok((response, serial)) => {
                self.metrics.record("signed", started);
                info!(
                    ?peer,
                    caller,
                    node,
                    identity,
                    serial,
                    micros = started.elapsed().as_micros() as u64,
                    "signed a workload certificate"
                );
                Ok(Response::new(response))
            }
            Err(refusal) => {
                self.metrics.record(refusal.reason.label(), started);
                warn!(
                    ?peer,
                    caller,
                    node,
                    identity,
                    reason = refusal.reason.label(),
                    detail = %refusal.detail,
                    "refused a certificate request"
                );
                Err(refusal.into())
            }
        }
    }
}

impl Signer {
    async fn decide(
        &self,
        request: &Request<IstioCertificateRequest>,
        facts: &mut Facts,
    ) -> Result<(IstioCertificateResponse, String), Refusal> {
        let policy = &self.policy;
        let token = authn::bearer_token(request.metadata())?;
        let caller = authn::review(&self.client, token, &policy.audience).await?;
        facts.caller = Some(caller.account());

        let message = request.get_ref();
        let csr = Csr::parse_pem(&message.csr)
            .map_err(|err| Refusal::new(Reason::BadCsr, err.to_string()))?;
        let identity = authz::requested_identity(message, &csr, &policy.trust_domain)?;
        facts.identity = Some(identity.to_string());
        authz::may_request(&caller, &identity, &policy.node_agents)?;
        let lifetime = authz::validity(message.validity_duration, policy.max_validity)?;

        let node = self.caller_node(&caller).await?;
        facts.node = Some(node.clone());
        self.check_bound(&node, &identity).await?;

        let signed = self
            .root
            .ca
            .sign(&identity, csr.public_key(), SystemTime::now(), lifetime)
            .map_err(|err| Refusal::new(Reason::Internal, err.to_string()))?;
        let response = IstioCertificateResponse {
            cert_chain: self.root.ca.chain_pem(&signed),
        };
        Ok((response, signed.serial))
    }

    /// The caller's node: the token's node extra, else the node of the pod the token is bound
    /// to.
    async fn caller_node(&self, caller: &Caller) -> Result<String, Refusal> {
        if let Some(node) = &caller.node {
            return Ok(node.clone());
        }
        let unknown = |detail: String| Refusal::new(Reason::UnknownNode, detail);
        let Some((name, uid)) = &caller.pod else {
            return Err(unknown(format!(
                "the token of {} is not bound to a pod, so its node is unknown; use a projected \
                 service-account token",
                caller.account()
            )));
        };
        let pod = match self.pods.pod_named(&caller.namespace, name) {
            Some(pod) => Some(pod),
            None => pods::get(&self.client, &caller.namespace, name)
                .await
                .map_err(|err| unknown(format!("cannot read the caller's pod {name}: {err}")))?,
        };
        let pod = pod.ok_or_else(|| {
            unknown(format!(
                "the caller's pod {}/{name} does not exist",
                caller.namespace
            ))
        })?;
        if uid.as_ref().is_some_and(|uid| *uid != pod.uid) {
            return Err(unknown(format!(
                "the caller's pod {}/{name} has another UID than its token names",
                caller.namespace
            )));
        }
        if pod.node.is_empty() {
            return Err(unknown(format!(
                "the caller's pod {}/{name} is not scheduled",
                caller.namespace
            )));
        }
        Ok(pod.node)
    }

    /// A pod of `identity` that has not finished must be bound to `node`. The watch answers
    /// first; a miss is confirmed with the API server, since the watch may lag.
    async fn check_bound(&self, node: &str, identity: &Identity) -> Result<(), Refusal> {
        let (namespace, account) = (identity.namespace(), identity.service_account());
        let mut found = self.pods.binding(node, namespace, account);
        if found != Binding::Running {
            match pods::list_on_node(&self.client, node, namespace).await {
                Ok(live) => found = pods::binding(&live, node, namespace, account),
                Err(err) => {
                    warn!(%err, node, namespace, "cannot confirm pod placement with the API server; using the watch")
                }
            }
        }
        match found {
            Binding::Running => Ok(()),
            Binding::OnlyFinished => Err(Refusal::new(
                Reason::PodFinished,
                format!("the only pods of {namespace}/{account} on node {node} have finished"),
            )),
            Binding::None => Err(Refusal::new(
                Reason::NoPodOnNode,
                format!("no pod of {namespace}/{account} is bound to node {node}"),
            )),
        }
    }
}
