//! The node agent: wires source -> store -> in-pod enrollment -> capture and proxy, and runs
//! until SIGTERM/SIGINT.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use tokio::time::Instant;

use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    admin,
    capture::{self, Capture},
    drain::{self, Ending, Signals},
    handoff::{self, Endpoint},
    identity::{self, Ca, Issuer, SystemClock},
    inpod::{Annotator, InPod},
    proxy::Proxy,
    source::{self, SourceConfig, SyncState},
    workload::Store,
};

/// Where workload certificates come from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IdentityConfig {
    /// The SPIFFE trust domain.
    pub trust_domain: String,
    /// The cluster CA (`meshlet ca` or istiod): the production path, no key on the node.
    pub remote: Option<identity::RemoteConfig>,
    /// Development only: a CA certificate chain (PEM: the signing CA first, the root last) and
    /// its key, signing on the node. With neither this nor `remote`, a development root is
    /// generated in (or reloaded from) `state_dir`.
    pub ca: Option<(PathBuf, PathBuf)>,
    /// Where the agent keeps state (the development root).
    pub state_dir: PathBuf,
    /// How long workload certificates are asked for.
    pub cert_lifetime: std::time::Duration,
}

/// Where the agent's HTTP endpoints listen.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Endpoints {
    /// `GET /metrics`.
    pub metrics: SocketAddr,
    /// `GET /healthz/ready`.
    pub readiness: SocketAddr,
    /// The admin API (keep it on loopback).
    pub admin: SocketAddr,
}

/// The CNI plugin's side of the agent.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CniConfig {
    /// The socket `meshlet-cni` calls (`<state-dir>/cni.sock` by default).
    pub socket: PathBuf,
    /// How long an ADD may wait for its pod's enrollment.
    pub timeout: std::time::Duration,
    /// Install the plugin on the node and keep it chained (the DaemonSet does).
    pub install: Option<crate::cni::install::InstallConfig>,
}

/// Everything `meshlet agent` is configured with.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    /// HTTP endpoints.
    pub endpoints: Endpoints,
    /// Identity: trust domain and CA.
    pub identity: IdentityConfig,
    /// This node's name: the agent serves the pods whose `spec.nodeName` it is.
    pub node_name: String,
    /// Where workloads come from.
    pub source: SourceConfig,
    /// Capture.
    pub capture: capture::Config,
    /// Resource bounds and guards of the proxy.
    pub limits: crate::proxy::Limits,
    /// The proxy's data-plane threads ([`crate::proxy::shards`]).
    pub data_plane_threads: usize,
    /// The CNI plugin's socket and installation.
    pub cni: CniConfig,
    /// How long the agent serves its connections after SIGTERM (the pod's grace period minus
    /// a margin): then they are cut ([`crate::drain`]).
    pub drain_deadline: std::time::Duration,
    /// Where this agent hands its sockets to a successor, and finds its predecessor
    /// ([`crate::handoff`]).
    pub handoff_socket: PathBuf,
    /// How connections are named in metrics and logs.
    pub telemetry: crate::metrics::Telemetry,
    /// Which labels enroll pods.
    pub enrollment: crate::workload::enrollment::Rules,
    /// The agent's own pod (namespace, name): with the kube source its DaemonSet is watched,
    /// and deleting it releases capture on SIGTERM ([`crate::removal`]).
    pub pod: Option<(String, String)>,
}

/// Runs the agent until a termination signal, or until a successor has taken its listeners
/// over and a signal comes; then drains ([`crate::drain`]).
pub async fn run(config: Config) -> anyhow::Result<()> {
    info!(config = %serde_json::to_string(&config)?, version = env!("CARGO_PKG_VERSION"), "starting meshlet agent");
    let started = Instant::now();
    let mut signals = Signals::install()?;
    let open_files = match crate::sys::raise_open_files_limit() {
        Ok(limit) => limit,
        Err(err) => {
            warn!(%err, "cannot raise the open files limit; the node will carry fewer connections");
            1024
        }
    };
    let budgets =
        crate::proxy::Budgets::for_descriptors(open_files, config.limits.max_connections_per_pod);
    info!(
        open_files,
        per_pod = budgets.per_pod,
        per_node = budgets.per_node,
        "connection budgets"
    );
    let state_dir = &config.identity.state_dir;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("create the state directory {}", state_dir.display()))?;
    let predecessor = handoff::find(&config.handoff_socket)?;
    let ledger = drain::Ledger::new(config.handoff_socket.with_file_name("connections.json"));
    let crashed = predecessor.is_none().then(|| ledger.crashed()).flatten();
    if let Some(crashed) = crashed {
        warn!(
            predecessor = crashed.pid,
            lost_connections = crashed.lost,
            "the previous agent ended without handing over (crashed or killed): the connections \
             it carried died with it; re-creating the listeners from the pinned capture"
        );
    }
    // The CNI socket before anything slow: a plugin that finds it answered is held, not
    // refused, while the agent starts. A running predecessor answers on it until it hands it
    // over.
    let cni_listener = match &predecessor {
        Some(predecessor) => {
            info!(
                predecessor = predecessor.pid(),
                "an agent runs with this state directory: preparing to take its listeners over"
            );
            None
        }
        None => Some(crate::cni::server::bind(&config.cni.socket)?),
    };
    // The node endpoints before capture: a port another process holds stops the agent before it
    // touches the kernel (the error names the holder). A successor gets them handed over.
    let node_endpoints = [
        (
            Endpoint::Metrics,
            "metrics",
            config.endpoints.metrics,
            admin::metrics as admin::Router,
        ),
        (
            Endpoint::Readiness,
            "readiness",
            config.endpoints.readiness,
            admin::readiness,
        ),
        (
            Endpoint::Admin,
            "admin",
            config.endpoints.admin,
            admin::admin,
        ),
    ];
    let early: Vec<Option<std::net::TcpListener>> = match &predecessor {
        None => node_endpoints
            .iter()
            .map(|(_, name, addr, _)| admin::bind(name, *addr).map(Some))
            .collect::<std::io::Result<_>>()?,
        Some(_) => node_endpoints.iter().map(|_| None).collect(),
    };
    // A successor installs capture (replacing programs, migrating maps) only once it has
    // taken over, while the predecessor's enrollment is frozen: nothing it does meanwhile can
    // go stale.
    let mut capture = match &predecessor {
        None => Some(Capture::install(config.capture.clone())?),
        Some(_) => None,
    };

    let issuer = match (&config.identity.remote, &config.identity.ca) {
        (Some(remote), _) => Issuer::Remote(Arc::new(identity::RemoteCa::new(remote.clone())?)),
        (None, Some((cert, key))) => {
            let read = |path: &PathBuf| {
                std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
            };
            warn!(
                "signing workload certificates on this node with --ca-cert/--ca-key: for \
                 development and the file source only; clusters use --ca-address"
            );
            Issuer::Local(Arc::new(Ca::from_pem(&read(cert)?, &read(key)?)?))
        }
        (None, None) => Issuer::Local(Arc::new(Ca::load_or_generate(
            state_dir,
            &config.identity.trust_domain,
        )?)),
    };
    let identities = Arc::new(
        identity::Manager::new(issuer, &config.identity.trust_domain, Arc::new(SystemClock))?
            .with_lifetime(config.identity.cert_lifetime),
    );
    let renewals = tokio::spawn(identities.clone().run());

    let store = Arc::new(Store::new());
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let policy_cache = Arc::new(crate::policy::Cache::new());
    let mut proxy = Proxy::new(
        store.clone(),
        identities,
        metrics.clone(),
        policy_cache.clone(),
        config.limits.clone(),
        budgets,
    );
    proxy.telemetry = config.telemetry.clone();
    proxy.enrollment = config.enrollment;
    proxy.shards = crate::proxy::shards::Shards::start(config.data_plane_threads)?;
    metrics.observe_data_plane(proxy.shards.runtimes());
    let proxy = Arc::new(proxy);
    let series = tokio::spawn(crate::metrics::sweep_gone_workloads(
        metrics.clone(),
        store.clone(),
        config.telemetry.series_grace,
    ));
    let reaper = tokio::spawn(proxy.pool.clone().run_reaper());
    let give_back = tokio::spawn(crate::memory::give_back_after_bursts(
        proxy.node_budget.clone(),
        proxy.pool.clone(),
        proxy.drain.clone(),
    ));
    let policies = tokio::spawn(follow_policies(proxy.clone(), policy_cache));
    let sync = Arc::new(SyncState::default());
    let mut annotator: Option<Annotator> = None;
    let (removal_tx, removal) = watch::channel(None);
    let mut removal_task = None;
    let mut removal_api = None;
    let source_task = match &config.source {
        SourceConfig::File(path) => {
            tokio::spawn(source::file::run(path.clone(), store.clone(), sync.clone()))
        }
        SourceConfig::Kube => {
            let client = kube::Client::try_default()
                .await
                .context("connect to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
            let patcher = client.clone();
            let istio = config.enrollment.istio_labels;
            annotator = Some(Arc::new(move |pod, enabled| {
                let client = patcher.clone();
                tokio::spawn(async move {
                    if let Err(err) =
                        source::kube::annotate_redirection(&client, &pod, enabled, istio).await
                    {
                        warn!(%pod, %err, "cannot record the redirection annotation on the pod");
                    }
                });
            }));
            if let Some((namespace, pod)) = config.pod.clone() {
                removal_task = Some(tokio::spawn(crate::removal::follow(
                    client.clone(),
                    namespace.clone(),
                    pod.clone(),
                    removal_tx,
                )));
                removal_api = Some((client.clone(), namespace, pod));
            }
            tokio::spawn(source::kube::run(client, store.clone(), sync.clone()))
        }
    };

    // A successor is ready to serve before it asks: synced, its pods' certificates issued.
    let (mut inherited, taken) = match predecessor {
        Some(predecessor) => {
            prepare_to_succeed(&proxy, &sync, &config.node_name).await;
            // A successor that cannot take over exits (the kubelet starts it again) rather
            // than run beside the predecessor on the same node: the predecessor serves on.
            let (sockets, taken) = predecessor.take(config.node_name.clone()).await.context(
                "cannot take the listeners over from the running agent, which serves on",
            )?;
            (sockets, Some(taken))
        }
        None => (handoff::Sockets::default(), None),
    };
    let capture = match capture.take() {
        Some(capture) => capture,
        None => Capture::install(config.capture.clone())?,
    };
    let ebpf_log = tokio::spawn(capture::events::EbpfLog::run(capture.log()));
    let cni_listener = match (inherited.take_node(Endpoint::Cni), cni_listener) {
        (Some(fd), _) if handoff::is_unix_listener_at(&fd, &config.cni.socket) => {
            let listener = std::os::unix::net::UnixListener::from(fd);
            listener.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(listener)?
        }
        (_, Some(listener)) => listener,
        (inherited, None) => {
            if inherited.is_some() {
                info!(socket = %config.cni.socket.display(), "the CNI socket moved: listening anew");
            }
            crate::cni::server::bind(&config.cni.socket)?
        }
    };

    let cni_fd = std::os::fd::AsFd::as_fd(&cni_listener).try_clone_to_owned()?;
    let (cni_events, events) = tokio::sync::mpsc::channel(1024);
    let cni_chained = config
        .cni
        .install
        .is_some()
        .then(|| Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let cni_keeper = tokio::spawn(match (config.cni.install.clone(), cni_chained.clone()) {
        (Some(install), Some(chained)) => {
            futures::future::Either::Left(crate::cni::install::keep_installed(
                install,
                std::time::Duration::from_secs(5),
                chained,
            ))
        }
        _ => futures::future::Either::Right(std::future::ready(())),
    });
    let cni_tasks = [
        tokio::spawn(crate::cni::server::serve(
            cni_listener,
            config.cni.socket.clone(),
            cni_events,
            config.cni.timeout + std::time::Duration::from_secs(2),
            metrics.clone(),
        )),
        tokio::spawn(crate::cni::decisions::follow(
            store.clone(),
            sync.clone(),
            config.node_name.clone(),
            config.enrollment,
            crate::cni::decisions::path_beside(&config.cni.socket),
        )),
    ];
    let captures = Arc::new(crate::inpod::CaptureStates::default());
    let state = admin::State {
        node: config.node_name.clone(),
        proxy: proxy.clone(),
        sync: sync.clone(),
        bpffs_dir: config.capture.bpffs_dir.clone(),
        config: serde_json::to_value(&config)?,
        enrollment_generation: Default::default(),
        captures: captures.clone(),
        cni_chained,
        heartbeat: Arc::default(),
    };
    let enrollment_generation = state.enrollment_generation.clone();
    let mut node_listeners = vec![(Endpoint::Cni, cni_fd)];
    let mut servers = Vec::new();
    for ((endpoint, name, addr, router), early) in node_endpoints.into_iter().zip(early) {
        let listener = match (
            early,
            inherited
                .take_node(endpoint)
                .map(std::net::TcpListener::from),
        ) {
            (Some(listener), _) => listener,
            (None, Some(listener)) if handoff::is_bound_as(&listener, addr) => listener,
            (None, inherited) => {
                if inherited.is_some() {
                    info!(endpoint = name, %addr, "the endpoint moved: listening anew");
                }
                admin::bind(name, addr)?
            }
        };
        node_listeners.push((endpoint, listener.try_clone()?.into()));
        servers.push(admin::start_on(name, listener, state.clone(), router)?);
    }

    let (shutdown_tx, shutdown) = watch::channel(false);
    let (releases_tx, releases) = tokio::sync::mpsc::channel(1);
    let netns_annotation = matches!(config.source, SourceConfig::File(_));
    let (handoffs_tx, handoffs) = tokio::sync::mpsc::channel(1);
    let inpod = tokio::spawn(
        InPod::new(
            config.node_name.clone(),
            proxy.clone(),
            sync,
            capture,
            annotator,
            netns_annotation,
        )
        .with_states(captures)
        .with_cni_timeout(config.cni.timeout)
        .with_start(started.into_std(), crashed)
        .with_releases(releases)
        .with_heartbeat(state.heartbeat.clone())
        .inherit(inherited)
        .run(shutdown, enrollment_generation, events, handoffs),
    );
    if let Some(taken) = taken {
        taken
            .accepting()
            .await
            .context("the running agent did not let go of its listeners; it serves on")?;
    }
    let ledger_task = tokio::spawn(ledger.clone().keep(proxy.drain.clone()));
    let successor = tokio::spawn(handoff::serve(
        config.node_name.clone(),
        handoff::bind(&config.handoff_socket)?,
        node_listeners,
        handoffs_tx,
    ));
    info!(took = ?started.elapsed(), "agent serving");

    // A removal confirmed once SIGTERM has come releases capture at once; the listeners serve
    // on meanwhile, for peers whose agents still capture.
    let releaser = crate::removal::Releaser {
        api: removal_api,
        suspicion: removal,
        inpod: releases_tx,
        cni: config.cni.install.clone(),
        cni_keeper: tokio::sync::Mutex::new(Some(cni_keeper)),
        bpffs_dir: config.capture.bpffs_dir.clone(),
        released: Default::default(),
        releasing: Default::default(),
    };
    let (ending, deadline) = drain::until_stopped(
        &mut signals,
        async {
            match successor.await {
                Ok(pid) => pid,
                // The handoff server failed: no successor will come through it.
                Err(err) => {
                    warn!(%err, "the handoff server stopped; no successor can take over");
                    std::future::pending().await
                }
            }
        },
        releaser.release_when_removed(),
        config.drain_deadline,
    )
    .await;
    if ending == Ending::Signalled {
        releaser.release_if_removed().await;
    }
    if let Some(keeper) = releaser.cni_keeper.lock().await.take() {
        keeper.abort();
    }
    let _ = shutdown_tx.send(true);
    ledger_task.abort();
    source_task.abort();
    renewals.abort();
    reaper.abort();
    give_back.abort();
    series.abort();
    ebpf_log.abort();
    policies.abort();
    for task in servers.into_iter().chain(cni_tasks) {
        task.abort();
    }
    let stopped = inpod.await.context("in-pod reconciler")?;
    proxy.drain.stop();
    let deadline = match (ending, deadline) {
        (_, Some(deadline)) => deadline,
        (Ending::HandedOver(successor), None) => {
            info!(
                successor,
                connections = proxy.drain.live(),
                "handed over; serving the connections this agent owns until a signal says stop"
            );
            signals.next().await;
            Instant::now() + config.drain_deadline
        }
        (Ending::Signalled, None) => Instant::now(),
    };
    let drained = proxy.drain.run_out(deadline).await;
    // A removal the API told of only during the drain still releases capture: the reconciler
    // has stopped, so nothing else touches it.
    if ending == Ending::Signalled && stopped == crate::inpod::Stopped::Shutdown {
        releaser.release_if_removed().await;
    }
    if let Some(task) = removal_task {
        task.abort();
    }
    if ending == Ending::Signalled {
        ledger.close();
    }
    let capture = if releaser.released() {
        "released"
    } else {
        "stays attached through its pins (`meshlet uninstall` removes it)"
    };
    info!(
        connections = drained.live_at_start,
        cut = drained.cut,
        took = ?drained.took,
        handed_over = stopped == crate::inpod::Stopped::HandedOver,
        "stopped; capture {capture}"
    );
    Ok(())
}

/// Before a successor asks for the listeners: waits for the source's first sync, then (at
/// most a minute) for the certificates of the pods it will serve, so its first connections
/// find everything ready.
async fn prepare_to_succeed(proxy: &Arc<Proxy>, sync: &SyncState, node: &str) {
    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);
    // Without the store, no pod handed over could be served: wait as long as it takes (the
    // predecessor serves meanwhile; if it goes away, the take fails and this agent restarts).
    let mut synced = sync.subscribe();
    while tokio::time::timeout(PATIENCE, synced.wait_for(|s| *s))
        .await
        .is_err()
    {
        warn!("the source has not synced yet; the running agent keeps serving until it has");
    }
    let deadline = Instant::now() + PATIENCE;
    let mut certificates = proxy.identities.subscribe();
    loop {
        let mut missing = 0;
        for pod in proxy.store.pods() {
            let namespace = proxy.store.namespace(&pod.key.namespace);
            if proxy.enrollment.decide(&pod, namespace.as_deref(), node)
                != crate::workload::enrollment::Decision::Enroll
            {
                continue;
            }
            match proxy
                .identity_of(&pod)
                .map(|id| proxy.identities.ensure(&id))
            {
                Ok(Ok(true)) => {}
                _ => missing += 1,
            }
        }
        if missing == 0 {
            return;
        }
        if tokio::time::timeout_at(deadline, certificates.changed())
            .await
            .is_err()
        {
            warn!(missing, "certificates still missing; taking over anyway");
            return;
        }
    }
}

/// Follows the store: recompiles policies when they change (saying what each cannot enforce
/// as written), and closes live connections the current policies deny.
async fn follow_policies(proxy: Arc<Proxy>, cache: Arc<crate::policy::Cache>) {
    let mut changes = proxy.store.subscribe();
    loop {
        let generation = *changes.borrow_and_update();
        let recompiled = cache.refresh(proxy.store.policies(), generation);
        let closed = proxy.recheck_connections();
        if closed > 0 {
            info!(
                connections = closed,
                "policy change closed live connections it now denies"
            );
        }
        if recompiled {
            for report in cache.current().report() {
                if !report.unsupported.is_empty() || !report.errors.is_empty() {
                    warn!(policy = %report.key, unsupported = ?report.unsupported, errors = ?report.errors, effect = %report.effect, "policy has fields meshlet does not enforce as written");
                }
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
        // Let a burst of changes (a resync) settle.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
