//! In-pod enrollment: keeps the set of captured pods equal to what the store asks for.
//!
//! For every local pod that [`enrollment::decide`] enrolls, the reconciler finds the pod's
//! network namespace, checks that what it holds is the pod's own ([`discovery::verify`]: not
//! the agent's, not the host's, no process of another cgroup in it; each refusal logged and
//! counted), opens the in-pod listeners there (15001 outbound on loopback, 15006 and 15008
//! inbound), enrolls the namespace in the capture maps, registers the 15006 listeners for
//! inbound steering and marks the pod ready. It undoes all of it when the pod is unlabelled,
//! deleted, released by the CNI plugin, or its namespace disappears.
//!
//! The namespace comes, in this order, from:
//! 1. `meshlet-cni` (a sandbox the runtime is creating, handed over as a descriptor before any
//!    container runs; the plugin waits for the answer, see [`crate::cni`]). Until the API has
//!    the pod's addresses, the primary plugin's are used;
//! 2. a process of the pod's cgroup (pods that predate the plugin);
//! 3. with the file source only, the `meshlet.io/netns` annotation.
//!
//! It runs on every store change, certificate change, CNI request and every 250 ms (pods whose
//! namespace has not appeared yet are retried), and only after the source has synced, so a
//! restarted agent never unenrolls pods it simply has not heard of yet. The state of each pod
//! (enrolled, and how; or what it waits for) is published for `meshlet workloads`.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::{
    capture::Capture,
    cni::{
        protocol::{Command, Reply, Request},
        server::Event,
    },
    handoff,
    proxy::{PodContext, Proxy, Role},
    source::SyncState,
    sys::{Netns, socket, transparent},
    workload::{
        Store, discovery,
        enrollment::Decision,
        model::{NETNS_ANNOTATION, ObjectKey, Pod},
    },
};

/// When the reconciler last turned: the agent's liveness ([`crate::admin::LIVENESS_STALL`]).
#[derive(Debug)]
pub struct Heartbeat {
    start: Instant,
    /// Milliseconds from `start` to the last turn.
    last: std::sync::atomic::AtomicU64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            last: Default::default(),
        }
    }
}

impl Heartbeat {
    /// Records a turn now.
    pub fn beat(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last.store(now, std::sync::atomic::Ordering::Release);
    }

    /// How long since the last turn (since creation, before the first).
    pub fn since(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(std::sync::atomic::Ordering::Acquire));
        self.start.elapsed().saturating_sub(last)
    }
}

/// How often pending pods are retried and enrolled ones checked.
const TICK: Duration = Duration::from_millis(250);
/// How long a CNI request waits for the source's first sync before the plugin is told to
/// decide without the agent.
const SYNC_WAIT: Duration = Duration::from_secs(3);

/// Where a pod's network namespace was found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NetnsSource {
    /// `meshlet-cni` handed it over (the path is the runtime's name for it, for logs).
    Cni(PathBuf),
    /// The `meshlet.io/netns` annotation.
    Annotation(PathBuf),
    /// A process of the pod: `/proc/<pid>/ns/net`.
    Process(PathBuf),
}

impl NetnsSource {
    fn path(&self) -> &Path {
        match self {
            Self::Cni(path) | Self::Annotation(path) | Self::Process(path) => path,
        }
    }

    fn via(&self) -> Via {
        match self {
            Self::Cni(_) => Via::Cni,
            Self::Annotation(_) => Via::Annotation,
            Self::Process(_) => Via::Process,
        }
    }

    fn new(via: Via, path: PathBuf) -> Self {
        match via {
            Via::Cni => Self::Cni(path),
            Via::Annotation => Self::Annotation(path),
            Via::Process => Self::Process(path),
        }
    }
}

/// How an enrolled pod's namespace was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// `meshlet-cni`, before the pod's containers started.
    Cni,
    /// A process of the pod (the pod predates the plugin, or the agent restarted).
    Process,
    /// The file source's `meshlet.io/netns` annotation.
    Annotation,
}

/// Where a pod the agent should capture stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CaptureState {
    /// Captured.
    Enrolled {
        /// How its namespace was found.
        via: Via,
        /// Its namespace's cookie.
        cookie: u64,
    },
    /// Not captured yet.
    Pending {
        /// What it waits for.
        reason: String,
    },
}

/// The capture state of every pod the agent should capture, by pod UID (for the admin API).
#[derive(Debug, Default)]
pub struct CaptureStates(Mutex<BTreeMap<String, CaptureState>>);

impl CaptureStates {
    /// The state of the pod `uid`, if the agent should capture it.
    pub fn get(&self, uid: &str) -> Option<CaptureState> {
        self.lock().get(uid).cloned()
    }

    fn replace(&self, states: BTreeMap<String, CaptureState>) {
        *self.lock() = states;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, CaptureState>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// How the reconciler stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Told to: its pods' listeners are closed (capture stays pinned).
    Shutdown,
    /// A successor took its pods' listeners and accepts on them.
    HandedOver,
}

/// A pod sandbox `meshlet-cni` announced.
#[derive(Debug)]
struct Sandbox {
    container_id: String,
    netns: Netns,
    inode: u64,
    /// The primary plugin's addresses for the pod.
    ips: Vec<IpAddr>,
}

/// A CNI ADD the plugin is waiting on.
#[derive(Debug)]
struct PendingAdd {
    request: Request,
    /// Until the pod is found in the store; then it moves to [`InPod::sandboxes`].
    sandbox: Option<Sandbox>,
    /// The pod's UID once found.
    uid: Option<String>,
    inode: u64,
    received: Instant,
    reply: oneshot::Sender<Reply>,
}

/// A pod this agent captures.
#[derive(Debug)]
struct Enrolled {
    key: ObjectKey,
    uid: String,
    cookie: u64,
    ips: Vec<IpAddr>,
    source: NetnsSource,
    inode: u64,
    netns: Arc<Netns>,
    /// Its namespace was prepared for transparent connections (undone on unenroll).
    transparent: Option<transparent::Ticket>,
    /// What its listeners serve (its connection budget tells when its last connection ends).
    context: Arc<PodContext>,
    /// The tasks accepting on its listeners (held: dropping them stops accepting).
    _accepting: Accepting,
    /// The listening sockets themselves (for a successor).
    sockets: Vec<(SocketAddr, Role, OwnedFd)>,
}

/// The tasks accepting on a pod's listeners, aborted when dropped (however the pod's enrollment
/// ends, or fails half-way).
#[derive(Debug, Default)]
struct Accepting(
    Vec<JoinHandle<()>>,
    /// The pod's entry among the local pods (the same-node path reaches it while it accepts).
    Option<crate::proxy::local::Registration>,
);

impl Drop for Accepting {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Something that records a pod's capture state on the pod itself (the kube source's
/// `meshlet.io/redirection` annotation).
pub type Annotator = Arc<dyn Fn(ObjectKey, bool) + Send + Sync>;

/// The reconciler.
pub struct InPod {
    node: String,
    proxy: Arc<Proxy>,
    store: Arc<Store>,
    sync: Arc<SyncState>,
    capture: Capture,
    annotator: Option<Annotator>,
    /// Whether `meshlet.io/netns` is honoured (the file source only).
    netns_annotation: bool,
    proc_root: PathBuf,
    enrolled: HashMap<String, Enrolled>,
    /// Last failure per pod UID, so a pod that keeps failing is logged once per reason.
    failures: HashMap<String, String>,
    /// Pods whose `meshlet.io/netns` annotation was refused (said once each).
    ignored_annotations: std::collections::HashSet<String>,
    /// Sandboxes `meshlet-cni` announced, by pod UID, until DEL or the pod is gone.
    sandboxes: HashMap<String, Sandbox>,
    /// ADDs waiting for the pod to be known, for the source to sync, or for the enrollment.
    pending: Vec<PendingAdd>,
    /// Namespaces released by a CNI DEL, by pod UID: polling does not capture them again.
    released: HashMap<String, u64>,
    /// What each pod to capture waits for, from the last pass.
    waiting: HashMap<String, String>,
    /// Pods whose CNI sandbox failed the namespace checks in the last pass (their ADD is
    /// refused at once: waiting would not change it).
    sandbox_refusals: HashMap<String, String>,
    /// Published per-pod state.
    states: Arc<CaptureStates>,
    /// How long a CNI ADD may wait for its pod's enrollment.
    cni_timeout: Duration,
    /// When the agent started, and its predecessor's crash (for the first pass's log line).
    started: Option<(Instant, Option<crate::drain::Crashed>)>,
    /// Requests to release capture for good ([`crate::removal`]).
    releases: Option<mpsc::Receiver<crate::removal::ReleaseRequest>>,
    /// Capture was released for good: no pass may enroll anything again; the listeners serve
    /// on until shutdown, and CNI ADDs are answered unavailable.
    capture_released: bool,
    /// The pod namespaces prepared for transparent connections.
    transparent: transparent::Prepared,
    heartbeat: Arc<Heartbeat>,
}

impl std::fmt::Debug for InPod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InPod")
            .field("node", &self.node)
            .field("enrolled", &self.enrolled.len())
            .finish_non_exhaustive()
    }
}

impl InPod {
    /// A reconciler for node `node`. `netns_annotation` honours `meshlet.io/netns` (only the
    /// file source, whose author is the node's operator, may say where a pod's namespace is).
    pub fn new(
        node: String,
        proxy: Arc<Proxy>,
        sync: Arc<SyncState>,
        capture: Capture,
        annotator: Option<Annotator>,
        netns_annotation: bool,
    ) -> Self {
        let store = proxy.store.clone();
        Self {
            node,
            proxy,
            store,
            sync,
            capture,
            annotator,
            netns_annotation,
            proc_root: PathBuf::from("/proc"),
            enrolled: HashMap::new(),
            failures: HashMap::new(),
            ignored_annotations: Default::default(),
            sandboxes: HashMap::new(),
            pending: Vec::new(),
            released: HashMap::new(),
            waiting: HashMap::new(),
            sandbox_refusals: HashMap::new(),
            states: Arc::default(),
            cni_timeout: Duration::from_secs(10),
            started: None,
            releases: None,
            capture_released: false,
            transparent: transparent::Prepared::default(),
            heartbeat: Arc::default(),
        }
    }

    /// Publishes per-pod capture state to `states`.
    pub fn with_states(mut self, states: Arc<CaptureStates>) -> Self {
        self.states = states;
        self
    }

    /// How long a CNI ADD may wait for its pod's enrollment before the plugin is refused.
    pub fn with_cni_timeout(mut self, timeout: Duration) -> Self {
        self.cni_timeout = timeout;
        self
    }

    /// When the agent started, and what its predecessor's crash cost: said once the first
    /// pass has opened every pod's listeners (the restart's time to ready).
    pub fn with_start(mut self, started: Instant, crashed: Option<crate::drain::Crashed>) -> Self {
        self.started = Some((started, crashed));
        self
    }

    /// The heartbeat each turn of the loop records.
    pub fn with_heartbeat(mut self, heartbeat: Arc<Heartbeat>) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// Where requests to release capture for good come from.
    pub fn with_releases(
        mut self,
        releases: mpsc::Receiver<crate::removal::ReleaseRequest>,
    ) -> Self {
        self.releases = Some(releases);
        self
    }

    /// Reconciles until `shutdown` turns true, answering the CNI plugin's requests from
    /// `events`; then closes the listeners (capture stays pinned, so a restarted agent takes
    /// over; in fail-open mode pods are marked not ready and their traffic goes direct
    /// meanwhile).
    ///
    /// After each pass, `reconciled` holds the store generation that pass saw (for the admin
    /// API's `/generation`: tests wait for "applied" instead of sleeping).
    pub async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        reconciled: Arc<std::sync::atomic::AtomicU64>,
        mut events: mpsc::Receiver<Event>,
        mut handoffs: mpsc::Receiver<handoff::Request>,
    ) -> Stopped {
        let mut synced = self.sync.subscribe();
        let mut changes = self.store.subscribe();
        let mut certificates = self.proxy.identities.subscribe();
        let mut tick = tokio::time::interval(TICK);
        let mut ready = false;
        let mut first = true;
        let mut stopped = Stopped::Shutdown;
        let mut successor = None;
        let mut releases = self.releases.take();
        let mut release = None;
        loop {
            self.heartbeat.beat();
            let released = self.capture_released;
            if !ready && !released && *synced.borrow_and_update() {
                ready = true;
                info!(node = %self.node, "source synced; reconciling enrollment");
                self.forget_unknown_enrollments();
            }
            if ready && released {
                // Enrolling now would attach programs again after the release.
                ready = false;
                info!("capture released: enrollment stopped; the listeners serve until shutdown");
            }
            if ready {
                let generation = *changes.borrow_and_update();
                self.adopt_sandboxes();
                self.reconcile();
                reconciled.store(generation.max(1), std::sync::atomic::Ordering::Release);
                if std::mem::take(&mut first) {
                    let (took, crashed) = match self.started {
                        Some((started, crashed)) => (Some(started.elapsed()), crashed),
                        None => (None, None),
                    };
                    info!(
                        pods = self.enrolled.len(),
                        ready_in = ?took,
                        predecessor_crashed = crashed.is_some(),
                        lost_connections = crashed.map_or(0, |c| c.lost),
                        "initial enrollment pass done"
                    );
                }
            }
            self.answer_adds(ready);
            tokio::select! {
                _ = synced.changed(), if !ready => {}
                _ = changes.changed() => {}
                _ = certificates.changed() => {}
                Some(event) = events.recv() => {
                    self.on_event(event, ready);
                    // A burst (a node starting many pods) is taken in one pass.
                    while let Ok(event) = events.try_recv() {
                        self.on_event(event, ready);
                    }
                }
                _ = tick.tick() => {}
                Some(request) = handoffs.recv() => successor = Some(request),
                Some(request) = async {
                    match releases.as_mut() {
                        Some(releases) => releases.recv().await,
                        None => std::future::pending().await,
                    }
                } => release = Some(request),
                _ = shutdown.wait_for(|s| *s) => break,
            }
            if let Some(request) = release.take() {
                // Between two passes: nothing attaches while the pins go, nor after.
                self.capture_released = true;
                for enrolled in self.enrolled.values() {
                    self.undo_transparent(enrolled);
                }
                let removed = crate::capture::uninstall(&self.capture.config().bpffs_dir);
                let _ = request.reply.send(removed);
                continue;
            }
            if let Some(request) = successor.take()
                && self.hand_over(request).await
            {
                stopped = Stopped::HandedOver;
                break;
            }
        }
        for add in self.pending.drain(..) {
            let _ = add.reply.send(Reply::Unavailable {
                message: "the agent is shutting down".into(),
            });
        }
        match stopped {
            Stopped::HandedOver => info!(
                pods = self.enrolled.len(),
                "in-pod listeners handed over; the successor accepts on them"
            ),
            Stopped::Shutdown => {
                for enrolled in self.enrolled.values() {
                    let _ = self.capture.set_ready(enrolled.cookie, false);
                }
                info!(
                    pods = self.enrolled.len(),
                    "in-pod listeners closed; capture stays pinned"
                );
            }
        }
        stopped
    }

    /// Exports what this reconciler owns for a successor and waits, frozen, for the outcome:
    /// true when the successor accepts on it all (this reconciler stops), false when it failed
    /// (this one carries on).
    async fn hand_over(&mut self, request: handoff::Request) -> bool {
        let exported = match self.export() {
            Ok(exported) => exported,
            Err(err) => {
                warn!(%err, "cannot export the in-pod listeners for the successor");
                return false;
            }
        };
        if request.export.send(exported).is_err() {
            return false;
        }
        request.outcome.await.unwrap_or(false)
    }

    /// Takes one request of the CNI plugin: ADDs wait for a pass, DEL and CHECK are answered
    /// now.
    fn on_event(&mut self, event: Event, ready: bool) {
        let Event {
            request,
            netns,
            reply,
        } = event;
        let command = request.command;
        let answer = match command {
            Command::Add => {
                let Some(netns) = netns else {
                    return; // the server refuses an ADD without a namespace
                };
                let inode = match netns.inode() {
                    Ok(inode) => inode,
                    Err(err) => {
                        self.answer(
                            reply,
                            Reply::Refused {
                                message: format!(
                                    "cannot inspect the pod's network namespace: {err}"
                                ),
                            },
                            None,
                        );
                        return;
                    }
                };
                tracing::debug!(pod = %request.pod, container = %request.container_id, netns = %request.netns, "CNI ADD");
                let sandbox = Sandbox {
                    container_id: request.container_id.clone(),
                    netns,
                    inode,
                    ips: request.ips.clone(),
                };
                self.pending.push(PendingAdd {
                    request,
                    sandbox: Some(sandbox),
                    uid: None,
                    inode,
                    received: Instant::now(),
                    reply,
                });
                return;
            }
            Command::Del => self.release(&request, netns.as_ref()),
            Command::Check => self.check(&request, netns.as_ref(), ready),
        };
        self.answer(reply, answer, None);
    }

    /// Sends `answer` to the plugin (the server logs and counts it); an enrolling ADD's wait
    /// is recorded.
    fn answer(&self, reply: oneshot::Sender<Reply>, answer: Reply, held: Option<Duration>) {
        if let (Reply::Enrolled { .. }, Some(held)) = (&answer, held) {
            self.proxy.metrics.cni_add_held(held);
        }
        let _ = reply.send(answer);
    }

    /// Moves the sandboxes of pending ADDs whose pod the store now has to
    /// [`InPod::sandboxes`], where the pass finds them.
    fn adopt_sandboxes(&mut self) {
        for add in &mut self.pending {
            if add.sandbox.is_none() {
                continue;
            }
            let Some(pod) = self.store.pod(&add.request.pod.key()) else {
                continue;
            };
            // The runtime's UID is the truth: a pod of the same name with another UID is an
            // earlier pod the store still holds (a StatefulSet pod recreated).
            if add
                .request
                .pod
                .uid
                .as_ref()
                .is_some_and(|uid| *uid != pod.uid)
            {
                continue;
            }
            let Some(sandbox) = add.sandbox.take() else {
                continue;
            };
            self.released.remove(&pod.uid);
            self.sandboxes.insert(pod.uid.clone(), sandbox);
            add.uid = Some(pod.uid.clone());
        }
    }

    /// Answers the pending ADDs that can be answered, and those that waited too long.
    fn answer_adds(&mut self, ready: bool) {
        let pending = std::mem::take(&mut self.pending);
        for add in pending {
            if add.reply.is_closed() {
                continue; // the plugin is gone (its own timeout)
            }
            let waited = add.received.elapsed();
            let decided = match self.capture_released {
                true => Ok(Reply::Unavailable {
                    message: "meshlet is being removed from this node".into(),
                }),
                false => self.decide_add(&add, ready),
            };
            let answer = match decided {
                Ok(answer) => answer,
                Err(_) if !ready && waited >= SYNC_WAIT => Reply::Unavailable {
                    message: "the agent's workload source has not synced yet".into(),
                },
                Err(reason) if waited >= self.cni_timeout => Reply::Refused {
                    message: format!(
                        "pod {} not enrolled within {}s: {reason}",
                        add.request.pod,
                        self.cni_timeout.as_secs_f32()
                    ),
                },
                Err(_) => {
                    self.pending.push(add);
                    continue;
                }
            };
            tracing::debug!(pod = %add.request.pod, held_us = waited.as_micros() as u64, result = answer.label(), "CNI ADD answered");
            match &answer {
                Reply::Enrolled { cookie } => {
                    info!(pod = %add.request.pod, cookie, held_ms = waited.as_millis() as u64, "CNI ADD answered: pod enrolled before its containers start");
                }
                // The runtime tears a failed sandbox down and retries with a new one; this
                // one must not stand in for the pod's namespace meanwhile.
                Reply::Refused { .. } => {
                    if let Some(uid) = &add.uid
                        && self
                            .sandboxes
                            .get(uid)
                            .is_some_and(|s| s.inode == add.inode)
                    {
                        self.sandboxes.remove(uid);
                    }
                }
                _ => {}
            }
            self.answer(add.reply, answer, Some(waited));
        }
        self.proxy
            .metrics
            .cni_adds_waiting
            .set(self.pending.len() as i64);
    }

    /// The answer to a pending ADD, or what it still waits for.
    fn decide_add(&self, add: &PendingAdd, ready: bool) -> Result<Reply, String> {
        if !ready {
            return Err("the agent's workload source has not synced yet".into());
        }
        let Some(uid) = &add.uid else {
            return Err(format!(
                "the agent has not seen pod {} (UID {}) in its source yet",
                add.request.pod,
                add.request.pod.uid.as_deref().unwrap_or("unknown")
            ));
        };
        let Some(pod) = self
            .store
            .pod(&add.request.pod.key())
            .filter(|p| &p.uid == uid)
        else {
            return Ok(Reply::Refused {
                message: format!("pod {} was deleted", add.request.pod),
            });
        };
        let decision = self.decide(&self.effective(&pod));
        if decision != Decision::Enroll {
            return Ok(Reply::NotCaptured { reason: decision });
        }
        if let Some(message) = self.sandbox_refusals.get(uid) {
            return Ok(Reply::Refused {
                message: message.clone(),
            });
        }
        match self.enrolled.get(uid) {
            Some(enrolled) if enrolled.inode == add.inode => Ok(Reply::Enrolled {
                cookie: enrolled.cookie,
            }),
            _ => Err(self
                .waiting
                .get(uid)
                .cloned()
                .unwrap_or_else(|| "enrollment in progress".into())),
        }
    }

    /// CNI DEL: releases the sandbox, and the pod's capture if it came from that sandbox.
    ///
    /// A DEL is tied to a capture only by what identifies the sandbox: its container ID (an
    /// announced sandbox) or its namespace (when it still exists). A DEL that names neither
    /// (an earlier sandbox of the pod, gone already; the spec allows repeated DELs) releases
    /// nothing: the pod's current capture is not that sandbox's.
    fn release(&mut self, request: &Request, netns: Option<&Netns>) -> Reply {
        let pod_uid = self
            .store
            .pod(&request.pod.key())
            .map(|pod| pod.uid.clone())
            .filter(|uid| request.pod.uid.as_ref().is_none_or(|u| u == uid));
        // (pod UID, namespace inode) of everything this DEL tears down.
        let mut released: Vec<(Option<String>, u64)> = Vec::new();
        if let Some(inode) = netns.and_then(|n| n.inode().ok()) {
            released.push((pod_uid.clone(), inode));
        }
        let (deleted, kept): (Vec<PendingAdd>, Vec<PendingAdd>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|add| add.request.container_id == request.container_id);
        self.pending = kept;
        for add in deleted {
            released.push((add.uid.clone().or_else(|| pod_uid.clone()), add.inode));
            let message = format!("pod {} sandbox deleted before it was enrolled", request.pod);
            self.answer(add.reply, Reply::Refused { message }, None);
        }
        let sandbox_uids: Vec<String> = self
            .sandboxes
            .iter()
            .filter(|(_, sandbox)| sandbox.container_id == request.container_id)
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in sandbox_uids {
            if let Some(sandbox) = self.sandboxes.remove(&uid) {
                released.push((Some(uid), sandbox.inode));
            }
        }
        for (uid, inode) in released {
            let Some(uid) = uid else {
                continue;
            };
            if self.enrolled.get(&uid).is_some_and(|e| e.inode == inode)
                && let Some(enrolled) = self.enrolled.remove(&uid)
            {
                info!(pod = %request.pod, container = %request.container_id, "CNI DEL: releasing the pod");
                self.unenroll(enrolled);
            }
            // Polling must not capture the released namespace again while its last
            // processes exit.
            self.released.insert(uid, inode);
        }
        Reply::Released
    }

    /// CNI CHECK: a pod that must be captured is captured in that namespace.
    fn check(&self, request: &Request, netns: Option<&Netns>, ready: bool) -> Reply {
        if !ready {
            return Reply::Unavailable {
                message: "the agent's workload source has not synced yet".into(),
            };
        }
        let Some(pod) = self
            .store
            .pod(&request.pod.key())
            .filter(|pod| request.pod.uid.as_ref().is_none_or(|uid| *uid == pod.uid))
        else {
            return Reply::Refused {
                message: format!("the agent does not know pod {}", request.pod),
            };
        };
        let decision = self.decide(&self.effective(&pod));
        if decision != Decision::Enroll {
            return Reply::NotCaptured { reason: decision };
        }
        let inode = netns.and_then(|n| n.inode().ok());
        match self.enrolled.get(&pod.uid) {
            Some(enrolled) if Some(enrolled.inode) == inode => Reply::Checked,
            Some(_) => Reply::Refused {
                message: format!(
                    "pod {} is captured in another network namespace",
                    request.pod
                ),
            },
            None => Reply::Refused {
                message: format!(
                    "pod {} must be captured and is not: {}",
                    request.pod,
                    self.waiting
                        .get(&pod.uid)
                        .map_or("not enrolled", String::as_str)
                ),
            },
        }
    }

    /// The pod as the agent acts on it: a pod whose sandbox the runtime announced has the
    /// addresses the primary CNI plugin gave that sandbox. The API may not have them yet (a
    /// new pod), or still hold an earlier sandbox's (a recreated one), which may belong to
    /// another pod by now: only the sandbox's own are steered to it.
    fn effective(&self, pod: &Arc<Pod>) -> Arc<Pod> {
        match self.sandboxes.get(&pod.uid) {
            Some(sandbox) if !sandbox.ips.is_empty() && !same_addresses(&pod.ips, &sandbox.ips) => {
                Arc::new(Pod {
                    ips: sandbox.ips.clone(),
                    ..Pod::clone(pod)
                })
            }
            _ => pod.clone(),
        }
    }

    /// Unenrolls namespaces an earlier agent enrolled for pods this one will not claim.
    fn forget_unknown_enrollments(&mut self) {
        let Ok(existing) = self.capture.enrolled() else {
            return;
        };
        let wanted: Vec<u64> = self
            .store
            .pods()
            .iter()
            .filter(|pod| self.decide(pod) == Decision::Enroll)
            .filter_map(|pod| {
                self.find_netns(pod)
                    .0
                    .and_then(|s| Netns::open(s.path()).ok()?.cookie().ok())
            })
            .chain(self.enrolled.values().map(|enrolled| enrolled.cookie))
            .collect();
        for (cookie, _) in existing {
            if !wanted.contains(&cookie) {
                info!(cookie, "unenrolling a namespace left by an earlier agent");
                let _ = self.capture.unenroll(cookie);
            }
        }
    }

    fn decide(&self, pod: &Pod) -> Decision {
        let namespace = self.store.namespace(&pod.key.namespace);
        self.proxy
            .enrollment
            .decide(pod, namespace.as_deref(), &self.node)
    }

    /// One pass: unenroll what should not be captured any more, enroll what should.
    pub fn reconcile(&mut self) {
        let pods: Vec<Arc<Pod>> = self
            .store
            .pods()
            .iter()
            .map(|pod| self.effective(pod))
            .collect();
        let desired: HashMap<&str, &Arc<Pod>> = pods
            .iter()
            .filter(|pod| self.decide(pod) == Decision::Enroll)
            .map(|pod| (pod.uid.as_str(), pod))
            .collect();

        let proc_root = self.proc_root.clone();
        let sandboxes = &self.sandboxes;
        let stale: Vec<String> = self
            .enrolled
            .iter_mut()
            .filter_map(|(uid, enrolled)| {
                let keep = desired
                    .get(uid.as_str())
                    .is_some_and(|pod| same_addresses(&pod.ips, &enrolled.ips))
                    && netns_alive(&proc_root, uid, enrolled, sandboxes.get(uid));
                (!keep).then(|| uid.clone())
            })
            .collect();
        for uid in stale {
            if let Some(enrolled) = self.enrolled.remove(&uid) {
                self.unenroll(enrolled);
            }
        }

        let uids: std::collections::HashSet<&str> = pods.iter().map(|p| p.uid.as_str()).collect();
        let known = |uid: &String| uids.contains(uid.as_str());
        self.failures.retain(|uid, _| known(uid));
        self.ignored_annotations.retain(known);
        self.sandboxes.retain(|uid, _| known(uid));
        self.released.retain(|uid, _| known(uid));
        self.waiting.clear();
        self.sandbox_refusals.clear();
        let host_network = self.host_network_uids(&pods);
        for (uid, pod) in &desired {
            let uid = *uid;
            if self.enrolled.contains_key(uid) {
                continue;
            }
            let (source, annotation_ignored) = self.find_netns(pod);
            if annotation_ignored && self.ignored_annotations.insert(pod.uid.clone()) {
                let refusal = discovery::Refusal::Annotation;
                warn!(pod = %pod.key, reason = refusal.reason(), "{refusal}");
                self.proxy.metrics.enrollment_refused(refusal.reason());
            }
            let Some(source) = source else {
                self.wait(
                    uid,
                    "waiting for the pod's network namespace: no CNI ADD, no process yet",
                );
                continue;
            };
            // Open first, then check what the handle holds: a path that changes meaning in
            // between (a process exiting and its PID reused) cannot slip past the check.
            let opened = match &source {
                NetnsSource::Cni(_) => self
                    .sandboxes
                    .get(uid)
                    .map(|sandbox| sandbox.netns.try_clone())
                    .unwrap_or_else(|| Err(std::io::ErrorKind::NotFound.into())),
                _ => Netns::open(source.path()),
            }
            .and_then(|netns| {
                let inode = netns.inode()?;
                Ok((netns, inode))
            });
            let (netns, inode) = match opened {
                Ok(opened) => opened,
                // Gone meanwhile: looked for again on the next pass.
                Err(err) => {
                    tracing::debug!(pod = %pod.key, %err, "pod namespace vanished");
                    self.wait(uid, "waiting for the pod's network namespace: it vanished");
                    continue;
                }
            };
            if self.released.get(uid) == Some(&inode) {
                self.wait(uid, "released by CNI DEL");
                continue;
            }
            if let Err(refusal) = discovery::verify(&self.proc_root, inode, uid, &host_network) {
                self.wait(uid, &format!("refused: {refusal}"));
                if let NetnsSource::Cni(_) = source {
                    self.sandbox_refusals.insert(
                        uid.to_owned(),
                        format!("refusing to capture the pod's network namespace: {refusal}"),
                    );
                }
                self.refuse(pod, &refusal);
                continue;
            }
            match self.enroll(pod, source, netns, inode) {
                Ok(enrolled) => {
                    self.failures.remove(uid);
                    info!(pod = %pod.key, cookie = enrolled.cookie, via = ?enrolled.source.via(), netns = %enrolled.source.path().display(), "pod enrolled");
                    if let Some(annotate) = &self.annotator {
                        annotate(pod.key.clone(), true);
                    }
                    self.enrolled.insert(uid.to_owned(), enrolled);
                }
                Err(err) if err.is::<CertificatePending>() => {
                    tracing::debug!(pod = %pod.key, "{err}");
                    self.wait(uid, &err.to_string());
                }
                Err(err) => {
                    let message = format!("{err:#}");
                    self.wait(uid, &message);
                    if self.failures.get(uid) != Some(&message) {
                        warn!(pod = %pod.key, err = %message, "cannot enroll pod; will retry");
                        self.failures.insert(uid.to_owned(), message);
                    }
                }
            }
        }
        let states = desired
            .keys()
            .map(|&uid| {
                let state = match self.enrolled.get(uid) {
                    Some(enrolled) => CaptureState::Enrolled {
                        via: enrolled.source.via(),
                        cookie: enrolled.cookie,
                    },
                    None => CaptureState::Pending {
                        reason: self.waiting.get(uid).cloned().unwrap_or_default(),
                    },
                };
                (uid.to_owned(), state)
            })
            .collect();
        self.states.replace(states);
    }

    /// The UIDs of this node's hostNetwork pods among `pods`.
    fn host_network_uids(&self, pods: &[Arc<Pod>]) -> Vec<String> {
        pods.iter()
            .filter(|pod| pod.host_network && pod.node_name.as_deref() == Some(self.node.as_str()))
            .map(|pod| pod.uid.clone())
            .collect()
    }

    /// Records what the pod `uid` waits for (for CNI answers and `meshlet workloads`).
    fn wait(&mut self, uid: &str, reason: &str) {
        self.waiting.insert(uid.to_owned(), reason.to_owned());
    }

    /// Where `pod`'s namespace is (`None` while there is neither a CNI sandbox nor a process
    /// of the pod). Without the file source, `meshlet.io/netns` is not honoured: the second
    /// value says the annotation was there and ignored, and the namespace comes from the pod's
    /// processes.
    fn find_netns(&self, pod: &Pod) -> (Option<NetnsSource>, bool) {
        if let Some(sandbox) = self.sandboxes.get(&pod.uid) {
            return (
                Some(NetnsSource::Cni(sandbox.netns.path().to_owned())),
                false,
            );
        }
        if let Some(path) = pod.annotations.get(NETNS_ANNOTATION) {
            if self.netns_annotation {
                let path = PathBuf::from(path);
                return (
                    path.exists().then_some(NetnsSource::Annotation(path)),
                    false,
                );
            }
            let found = discovery::find_pod_netns(&self.proc_root, &pod.uid);
            return (found.map(NetnsSource::Process), true);
        }
        let found = discovery::find_pod_netns(&self.proc_root, &pod.uid);
        (found.map(NetnsSource::Process), false)
    }

    /// Logs and counts a refused namespace, once per pod and reason.
    fn refuse(&mut self, pod: &Pod, refusal: &discovery::Refusal) {
        let message = refusal.to_string();
        if self.failures.get(&pod.uid) != Some(&message) {
            warn!(pod = %pod.key, reason = refusal.reason(), "refusing to capture the pod's network namespace: {message}");
            self.proxy.metrics.enrollment_refused(refusal.reason());
            self.failures.insert(pod.uid.clone(), message);
        }
    }

    fn enroll(
        &mut self,
        pod: &Pod,
        source: NetnsSource,
        netns: Netns,
        inode: u64,
    ) -> anyhow::Result<Enrolled> {
        use anyhow::Context as _;
        let netns = Arc::new(netns);
        let identity = self.proxy.identity_of(pod)?;
        // The pod's certificate first: a pod is captured once the mesh can serve it, and a CA
        // problem shows here, not on its first connection. A remote CA answers in the
        // background; the next pass (woken by its answer) enrolls the pod.
        if !self.proxy.identities.ensure(&identity)? {
            return Err(anyhow::Error::new(CertificatePending(identity)));
        }
        let transparent = self.prepare_transparent(&pod.key, &netns, inode);
        // Undone if the enrollment fails half-way.
        let prepared = PreparedNetns(
            transparent.map(|ticket| (self.transparent.clone(), netns.clone(), ticket)),
        );
        let context = Arc::new(
            PodContext::new(&self.proxy, pod, netns.clone(), identity)
                .preserving_source(transparent.is_some()),
        );

        // Listeners first: in fail-closed mode, capture before them would refuse connections.
        let mut opened = Vec::new();
        for (addr, role) in Role::listeners() {
            match socket::listen_in(&netns, addr) {
                Ok(listener) => opened.push((addr, role, listener)),
                // A pod without IPv6 (disabled in its namespace) has no [::1] or [::].
                Err(err) if addr.is_ipv6() && !pod.ips.iter().any(IpAddr::is_ipv6) => {
                    tracing::debug!(pod = %pod.key, %addr, %err, "no IPv6 listener");
                }
                Err(err) => {
                    return Err(err).with_context(|| {
                        format!("listen on {addr} in {}", source.path().display())
                    });
                }
            }
        }
        let (listeners, sockets) = self.serve(&context, opened)?;

        let cookie = self.capture.enroll(&netns, &pod.ips)?;
        self.register_inbound(&pod.ips, &sockets)?;
        self.capture.set_ready(cookie, true)?;
        prepared.keep();
        Ok(Enrolled {
            key: pod.key.clone(),
            uid: pod.uid.clone(),
            cookie,
            ips: pod.ips.clone(),
            source,
            inode,
            netns,
            transparent,
            context,
            _accepting: listeners,
            sockets,
        })
    }

    /// Registers the pod's 15006 listener of each family for its addresses `ips`: `sk_lookup`
    /// steers inbound connections to it.
    fn register_inbound(
        &mut self,
        ips: &[IpAddr],
        sockets: &[(SocketAddr, Role, OwnedFd)],
    ) -> Result<(), crate::capture::Error> {
        for ip in ips {
            if let Some((_, _, listener)) = sockets.iter().find(|(addr, role, _)| {
                *role == Role::InboundPlaintext && addr.is_ipv6() == ip.is_ipv6()
            }) {
                self.capture.set_inbound_listener(*ip, listener)?;
            }
        }
        Ok(())
    }

    /// Accepts on a pod's listening sockets, each in a task of its own; returns the tasks and
    /// the sockets (kept for a successor).
    #[allow(clippy::type_complexity)]
    fn serve(
        &self,
        context: &Arc<PodContext>,
        opened: Vec<(SocketAddr, Role, std::net::TcpListener)>,
    ) -> std::io::Result<(Accepting, Vec<(SocketAddr, Role, OwnedFd)>)> {
        let mut tasks = Accepting::default();
        let mut sockets = Vec::new();
        let placement = self.proxy.shards.place_pod();
        for (addr, role, listener) in opened {
            sockets.push((addr, role, OwnedFd::from(listener.try_clone()?)));
            listener.set_nonblocking(true)?;
            // On its data-plane thread, which carries every connection it accepts.
            let _shard = placement.enter(role);
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tasks
                .0
                .push(role.serve(listener, self.proxy.clone(), context.clone()));
        }
        tasks.1 = Some(self.proxy.local.register(context));
        Ok((tasks, sockets))
    }

    /// What this reconciler owns, for a successor: every enrolled pod with its namespace and
    /// listening sockets, the CNI sandboxes, the released namespaces (descriptors duplicated:
    /// this agent keeps accepting until the successor does).
    fn export(&self) -> std::io::Result<handoff::Sockets> {
        let mut exported = handoff::Sockets::default();
        for enrolled in self.enrolled.values() {
            let mut listeners = Vec::new();
            let mut addresses = Vec::new();
            for (addr, role, fd) in &enrolled.sockets {
                listeners.push(std::net::TcpListener::from(fd.try_clone()?));
                addresses.push((*addr, *role));
            }
            exported.pods.push(handoff::InheritedPod {
                state: handoff::PodState {
                    uid: enrolled.uid.clone(),
                    namespace: enrolled.key.namespace.clone(),
                    name: enrolled.key.name.clone(),
                    cookie: enrolled.cookie,
                    inode: enrolled.inode,
                    via: enrolled.source.via(),
                    path: enrolled.source.path().to_owned(),
                    ips: enrolled.ips.clone(),
                    listeners: addresses,
                },
                netns: enrolled.netns.try_clone()?,
                listeners,
            });
        }
        for (uid, sandbox) in &self.sandboxes {
            exported.sandboxes.push((
                handoff::SandboxState {
                    uid: uid.clone(),
                    container_id: sandbox.container_id.clone(),
                    inode: sandbox.inode,
                    ips: sandbox.ips.clone(),
                    path: sandbox.netns.path().to_owned(),
                },
                sandbox.netns.try_clone()?,
            ));
        }
        exported.released = self.released.iter().map(|(k, v)| (k.clone(), *v)).collect();
        Ok(exported)
    }

    /// Takes over what a predecessor handed over: its pods are served on their listeners at
    /// once (capture already points at those very sockets), its CNI sandboxes and released
    /// namespaces are remembered. Pods this agent's store does not know (any more) are
    /// dropped; the first pass reconciles the rest as usual.
    pub fn inherit(mut self, sockets: handoff::Sockets) -> Self {
        for (state, netns) in sockets.sandboxes {
            self.sandboxes.insert(
                state.uid,
                Sandbox {
                    container_id: state.container_id,
                    netns,
                    inode: state.inode,
                    ips: state.ips,
                },
            );
        }
        let known: std::collections::HashSet<String> = self
            .store
            .pods()
            .iter()
            .map(|pod| pod.uid.clone())
            .collect();
        self.released.extend(
            sockets
                .released
                .into_iter()
                .filter(|(uid, _)| known.contains(uid)),
        );
        let host_network = self.host_network_uids(&self.store.pods());
        for inherited in sockets.pods {
            let state = &inherited.state;
            let key = ObjectKey::new(&state.namespace, &state.name);
            match self.adopt(inherited, &host_network) {
                Ok(enrolled) => {
                    info!(pod = %enrolled.key, cookie = enrolled.cookie, "pod taken over from the predecessor");
                    if let Some(annotate) = &self.annotator {
                        annotate(enrolled.key.clone(), true);
                    }
                    self.enrolled.insert(enrolled.uid.clone(), enrolled);
                }
                Err(err) => {
                    warn!(pod = %key, err = %format!("{err:#}"), "not taking over the predecessor's pod");
                }
            }
        }
        self
    }

    /// Serves one pod handed over (`host_network`: this node's hostNetwork pods, for the
    /// namespace check).
    fn adopt(
        &mut self,
        inherited: handoff::InheritedPod,
        host_network: &[String],
    ) -> anyhow::Result<Enrolled> {
        let handoff::InheritedPod {
            state,
            netns,
            listeners,
        } = inherited;
        let key = ObjectKey::new(&state.namespace, &state.name);
        let pod = self
            .store
            .pod(&key)
            .filter(|pod| pod.uid == state.uid)
            .ok_or_else(|| anyhow::anyhow!("the pod is not known to this agent"))?;
        // The addresses are this agent's own view of the pod (never the predecessor's word).
        let pod = self.effective(&pod);
        // The predecessor checked this namespace; so does this agent, as for one it found.
        discovery::verify(&self.proc_root, state.inode, &state.uid, host_network)
            .map_err(|refusal| anyhow::anyhow!("refusing its namespace: {refusal}"))?;
        let netns = Arc::new(netns);
        let identity = self.proxy.identity_of(&pod)?;
        // Usually issued already (the successor asks for the certificates of its pods before
        // it takes over); if not, handshakes wait for it.
        self.proxy.identities.ensure(&identity)?;
        let transparent = self.prepare_transparent(&pod.key, &netns, state.inode);
        let context = Arc::new(
            PodContext::new(&self.proxy, &pod, netns.clone(), identity)
                .preserving_source(transparent.is_some()),
        );
        let opened = state
            .listeners
            .iter()
            .zip(listeners)
            .map(|(&(addr, role), listener)| (addr, role, listener))
            .collect();
        let (listeners, sockets) = self.serve(&context, opened)?;
        // The capture maps hold this namespace and these very sockets already, unless this
        // agent's maps are new (a map layout change, and the pod enrolled after the entries
        // were carried over): enroll and register them again either way (idempotent).
        let cookie = self.capture.enroll(&netns, &pod.ips)?;
        anyhow::ensure!(cookie == state.cookie, "the namespace's cookie changed");
        self.register_inbound(&pod.ips, &sockets)?;
        self.capture.set_ready(cookie, true)?;
        Ok(Enrolled {
            key,
            uid: state.uid,
            cookie: state.cookie,
            ips: pod.ips.clone(),
            source: NetnsSource::new(state.via, state.path),
            inode: state.inode,
            netns,
            transparent,
            context,
            _accepting: listeners,
            sockets,
        })
    }

    /// Prepares a pod's namespace for transparent connections when the agent preserves
    /// clients' addresses; returns whether it is. A namespace that cannot be prepared still
    /// enrolls: its application sees the pod's own address, as with the feature off.
    fn prepare_transparent(
        &self,
        pod: &ObjectKey,
        netns: &Netns,
        inode: u64,
    ) -> Option<transparent::Ticket> {
        if !self.capture.config().preserve_source {
            return None;
        }
        match self.transparent.prepare(netns, inode) {
            Ok(ticket) => Some(ticket),
            Err(err) => {
                warn!(
                    %pod, %err,
                    "cannot prepare the pod's namespace for transparent connections: its \
                     application sees the pod's own address as its clients'"
                );
                None
            }
        }
    }

    /// Removes the routing of transparent connections from a pod's namespace once the last
    /// connection of the pod has ended: they carry on after it is unenrolled, and their
    /// replies need it. A namespace enrolled again meanwhile keeps it.
    fn undo_transparent(&self, enrolled: &Enrolled) {
        let Some(ticket) = enrolled.transparent else {
            return;
        };
        let (prepared, pod, netns, budget) = (
            self.transparent.clone(),
            enrolled.key.clone(),
            enrolled.netns.clone(),
            enrolled.context.budget.clone(),
        );
        let slots = u32::try_from(self.proxy.budgets.per_pod).unwrap_or(u32::MAX);
        tokio::spawn(async move {
            // Every slot of the pod's budget free: no connection of the pod is left.
            let Ok(_idle) = budget.acquire_many_owned(slots).await else {
                return;
            };
            let removed =
                tokio::task::spawn_blocking(move || prepared.remove(&netns, ticket)).await;
            match removed {
                Ok(Ok(true)) => info!(%pod, "transparent connections' routing removed"),
                Ok(Ok(false)) => info!(
                    %pod,
                    "transparent connections' routing kept: the namespace is enrolled again"
                ),
                Ok(Err(err)) => {
                    warn!(%pod, %err, "cannot remove the transparent connections' routing")
                }
                Err(err) => warn!(%pod, %err, "removing the transparent routing panicked"),
            }
        });
    }

    fn unenroll(&mut self, enrolled: Enrolled) {
        if let Err(err) = self.capture.unenroll(enrolled.cookie) {
            warn!(pod = %enrolled.key, %err, "unenroll failed");
        }
        self.undo_transparent(&enrolled);
        self.proxy.pool.remove_source(&enrolled.uid);
        info!(pod = %enrolled.key, cookie = enrolled.cookie, "pod unenrolled");
        if let Some(annotate) = &self.annotator {
            annotate(enrolled.key.clone(), false);
        }
        drop(enrolled); // closes its listeners; established connections carry on
    }
}

/// A namespace prepared for transparent connections by an enrollment still under way: the
/// preparation is undone on drop unless the enrollment went through ([`PreparedNetns::keep`]).
struct PreparedNetns(Option<(transparent::Prepared, Arc<Netns>, transparent::Ticket)>);

impl PreparedNetns {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for PreparedNetns {
    fn drop(&mut self) {
        if let Some((prepared, netns, ticket)) = self.0.take()
            && let Err(err) = prepared.remove(&netns, ticket)
        {
            warn!(%err, "cannot undo the transparent routing of a failed enrollment");
        }
    }
}

/// A pod waits for its workload certificate before it is enrolled.
#[derive(Debug)]
struct CertificatePending(crate::identity::Identity);

impl std::fmt::Display for CertificatePending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "waiting for the workload certificate of {}", self.0)
    }
}

impl std::error::Error for CertificatePending {}

/// Whether two address lists hold the same addresses (the primary plugin and the API may
/// order a dual-stack pod's differently).
fn same_addresses(a: &[IpAddr], b: &[IpAddr]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    b.sort();
    a == b
}

/// Whether the pod's namespace is still there. A pod found through a process that has exited
/// is looked up again: another process of the pod in the same namespace keeps it enrolled.
fn netns_alive(
    proc_root: &Path,
    uid: &str,
    enrolled: &mut Enrolled,
    sandbox: Option<&Sandbox>,
) -> bool {
    // The runtime's sandbox is the pod's namespace until DEL; a new sandbox replaces it.
    if let Some(sandbox) = sandbox {
        return sandbox.inode == enrolled.inode;
    }
    if let NetnsSource::Cni(_) = enrolled.source {
        return false; // released
    }
    let inode = |path: &Path| {
        std::fs::metadata(path)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .ok()
    };
    if inode(enrolled.source.path()) == Some(enrolled.inode) {
        return true;
    }
    if let NetnsSource::Process(_) = enrolled.source
        && let Some(path) = discovery::find_pod_netns(proc_root, uid)
        && inode(&path) == Some(enrolled.inode)
    {
        enrolled.source = NetnsSource::Process(path);
        return true;
    }
    false
}
