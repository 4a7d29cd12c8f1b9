//! In-pod enrollment: keeps the set of captured pods equal to what the store asks for.
//!
//! For every local pod that [`enrollment::decide`] enrolls, the reconciler finds the pod's
//! network namespace (a process of the pod's cgroup; with the file source, the
//! `meshlet.io/netns` annotation may name it), opens it and checks that what it holds is the
//! pod's own ([`discovery::verify`]: not the agent's, not the host's, no process of another
//! cgroup in it; each refusal logged and counted), opens the in-pod listeners there (15001
//! outbound on loopback, 15006 and 15008 inbound), enrolls the namespace in the capture maps, registers the 15006 listeners for inbound steering and marks
//! the pod ready. It undoes all of it when the pod is unlabelled, deleted, or its namespace
//! disappears. It runs on every store change and every 250 ms (pods whose namespace has not
//! appeared yet are retried), and only after the source has synced, so a restarted agent never
//! unenrolls pods it simply has not heard of yet.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use meshlet_common::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    capture::Capture,
    proxy::{PodContext, Proxy, inbound, outbound, passthrough},
    source::SyncState,
    sys::{Netns, socket},
    workload::{
        Store, discovery,
        enrollment::{self, Decision},
        model::{NETNS_ANNOTATION, ObjectKey, Pod},
    },
};

/// How often pending pods are retried and enrolled ones checked.
const TICK: Duration = Duration::from_millis(250);

/// Where a pod's network namespace was found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NetnsSource {
    /// The `meshlet.io/netns` annotation.
    Annotation(PathBuf),
    /// A process of the pod: `/proc/<pid>/ns/net`.
    Process(PathBuf),
}

impl NetnsSource {
    fn path(&self) -> &Path {
        match self {
            Self::Annotation(path) | Self::Process(path) => path,
        }
    }
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
    listeners: Vec<JoinHandle<()>>,
}

impl Drop for Enrolled {
    fn drop(&mut self) {
        for task in &self.listeners {
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
        }
    }

    /// Reconciles until `shutdown` turns true; then closes the listeners (capture stays
    /// pinned, so a restarted agent takes over; in fail-open mode pods are marked not ready
    /// and their traffic goes direct meanwhile).
    ///
    /// After each pass, `reconciled` holds the store generation that pass saw (for the admin
    /// API's `/generation`: tests wait for "applied" instead of sleeping).
    pub async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        reconciled: Arc<std::sync::atomic::AtomicU64>,
    ) {
        let mut synced = self.sync.subscribe();
        tokio::select! {
            _ = synced.wait_for(|s| *s) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        info!(node = %self.node, "source synced; reconciling enrollment");
        self.forget_unknown_enrollments();
        let mut changes = self.store.subscribe();
        let mut certificates = self.proxy.identities.subscribe();
        let mut tick = tokio::time::interval(TICK);
        let mut first = true;
        loop {
            let generation = *changes.borrow_and_update();
            self.reconcile();
            reconciled.store(generation.max(1), std::sync::atomic::Ordering::Release);
            if std::mem::take(&mut first) {
                info!(pods = self.enrolled.len(), "initial enrollment pass done");
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = certificates.changed() => {}
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        for enrolled in self.enrolled.values() {
            let _ = self.capture.set_ready(enrolled.cookie, false);
        }
        info!(
            pods = self.enrolled.len(),
            "in-pod listeners closed; capture stays pinned"
        );
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
        enrollment::decide(pod, namespace.as_deref(), &self.node)
    }

    /// One pass: unenroll what should not be captured any more, enroll what should.
    pub fn reconcile(&mut self) {
        let pods = self.store.pods();
        let desired: HashMap<&str, &Arc<Pod>> = pods
            .iter()
            .filter(|pod| self.decide(pod) == Decision::Enroll)
            .map(|pod| (pod.uid.as_str(), pod))
            .collect();

        let proc_root = self.proc_root.clone();
        let stale: Vec<String> = self
            .enrolled
            .iter_mut()
            .filter_map(|(uid, enrolled)| {
                let keep = desired
                    .get(uid.as_str())
                    .is_some_and(|pod| pod.ips == enrolled.ips)
                    && netns_alive(&proc_root, uid, enrolled);
                (!keep).then(|| uid.clone())
            })
            .collect();
        for uid in stale {
            if let Some(enrolled) = self.enrolled.remove(&uid) {
                self.unenroll(enrolled);
            }
        }

        self.failures
            .retain(|uid, _| pods.iter().any(|pod| &pod.uid == uid));
        self.ignored_annotations
            .retain(|uid| pods.iter().any(|pod| &pod.uid == uid));
        let host_network: Vec<String> = pods
            .iter()
            .filter(|pod| pod.host_network && pod.node_name.as_deref() == Some(self.node.as_str()))
            .map(|pod| pod.uid.clone())
            .collect();
        for (uid, pod) in desired {
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
                continue;
            };
            // Open first, then check what the handle holds: a path that changes meaning in
            // between (a process exiting and its PID reused) cannot slip past the check.
            let opened = Netns::open(source.path()).and_then(|netns| {
                let inode = netns.inode()?;
                Ok((netns, inode))
            });
            let (netns, inode) = match opened {
                Ok(opened) => opened,
                // Gone meanwhile: looked for again on the next pass.
                Err(err) => {
                    tracing::debug!(pod = %pod.key, %err, "pod namespace vanished");
                    continue;
                }
            };
            if let Err(refusal) = discovery::verify(&self.proc_root, inode, uid, &host_network) {
                self.refuse(pod, &refusal);
                continue;
            }
            match self.enroll(pod, source, netns, inode) {
                Ok(enrolled) => {
                    self.failures.remove(uid);
                    info!(pod = %pod.key, cookie = enrolled.cookie, netns = %enrolled.source.path().display(), "pod enrolled");
                    if let Some(annotate) = &self.annotator {
                        annotate(pod.key.clone(), true);
                    }
                    self.enrolled.insert(uid.to_owned(), enrolled);
                }
                Err(err) if err.is::<CertificatePending>() => {
                    tracing::debug!(pod = %pod.key, "{err}");
                }
                Err(err) => {
                    let message = format!("{err:#}");
                    if self.failures.get(uid) != Some(&message) {
                        warn!(pod = %pod.key, err = %message, "cannot enroll pod; will retry");
                        self.failures.insert(uid.to_owned(), message);
                    }
                }
            }
        }
    }

    /// Where `pod`'s namespace is (`None` while it has no process yet). Without the file
    /// source, `meshlet.io/netns` is not honoured: the second value says the annotation was
    /// there and ignored, and the namespace comes from the pod's processes.
    fn find_netns(&self, pod: &Pod) -> (Option<NetnsSource>, bool) {
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
        let context = Arc::new(PodContext::new(
            pod,
            netns.clone(),
            identity,
            self.proxy.budgets.per_pod,
        ));

        // Listeners first: in fail-closed mode, capture before them would refuse connections.
        #[derive(Clone, Copy, PartialEq, Eq)]
        enum Role {
            Outbound,
            InboundPlaintext,
            InboundHbone,
        }
        let mut listeners = Vec::new();
        let mut inbound = Vec::new();
        let wanted = [
            (
                SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)),
                Role::Outbound,
            ),
            (
                SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT)),
                Role::Outbound,
            ),
            (
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT)),
                Role::InboundPlaintext,
            ),
            (
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT)),
                Role::InboundPlaintext,
            ),
            (
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, INBOUND_HBONE_PORT)),
                Role::InboundHbone,
            ),
            (
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, INBOUND_HBONE_PORT)),
                Role::InboundHbone,
            ),
        ];
        for (addr, role) in wanted {
            let listener = match socket::listen_in(&netns, addr) {
                Ok(listener) => listener,
                // A pod without IPv6 (disabled in its namespace) has no [::1] or [::].
                Err(err) if addr.is_ipv6() && !pod.ips.iter().any(IpAddr::is_ipv6) => {
                    tracing::debug!(pod = %pod.key, %addr, %err, "no IPv6 listener");
                    continue;
                }
                Err(err) => {
                    return Err(err).with_context(|| {
                        format!("listen on {addr} in {}", source.path().display())
                    });
                }
            };
            if role == Role::InboundPlaintext {
                inbound.push((addr, listener.try_clone()?));
            }
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let (proxy, context) = (self.proxy.clone(), context.clone());
            listeners.push(match role {
                Role::Outbound => tokio::spawn(outbound::serve(listener, proxy, context)),
                Role::InboundPlaintext => {
                    tokio::spawn(passthrough::serve_inbound(listener, proxy, context))
                }
                Role::InboundHbone => tokio::spawn(async move {
                    if let Err(err) = inbound::serve(listener, proxy, context).await {
                        warn!(%err, "cannot serve HBONE");
                    }
                }),
            });
        }

        let cookie = self.capture.enroll(&netns, &pod.ips)?;
        for ip in &pod.ips {
            if let Some((_, listener)) = inbound
                .iter()
                .find(|(addr, _)| addr.is_ipv6() == ip.is_ipv6())
            {
                self.capture.set_inbound_listener(*ip, listener)?;
            }
        }
        self.capture.set_ready(cookie, true)?;
        Ok(Enrolled {
            key: pod.key.clone(),
            uid: pod.uid.clone(),
            cookie,
            ips: pod.ips.clone(),
            source,
            inode,
            listeners,
        })
    }

    fn unenroll(&mut self, enrolled: Enrolled) {
        if let Err(err) = self.capture.unenroll(enrolled.cookie) {
            warn!(pod = %enrolled.key, %err, "unenroll failed");
        }
        self.proxy.pool.remove_source(&enrolled.uid);
        info!(pod = %enrolled.key, cookie = enrolled.cookie, "pod unenrolled");
        if let Some(annotate) = &self.annotator {
            annotate(enrolled.key.clone(), false);
        }
        drop(enrolled); // closes its listeners; established connections carry on
    }
}

/// Whether the pod's namespace is still there. A pod found through a process that has exited
/// is looked up again: another process of the pod in the same namespace keeps it enrolled.
/// A pod waits for its workload certificate before it is enrolled.
#[derive(Debug)]
struct CertificatePending(crate::identity::Identity);

impl std::fmt::Display for CertificatePending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "waiting for the workload certificate of {}", self.0)
    }
}

impl std::error::Error for CertificatePending {}

fn netns_alive(proc_root: &Path, uid: &str, enrolled: &mut Enrolled) -> bool {
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
