//! Handing the agent's sockets to its successor, so a restart or an upgrade refuses no
//! connection.
//!
//! The running agent listens on `<state-dir>/handoff.sock` (a `SOCK_SEQPACKET` unix socket,
//! mode 0600, root or the agent's own user only, checked with `SO_PEERCRED` on both ends). A
//! new agent that finds it there prepares first (capture installed, source synced, the
//! certificates of the node's pods issued) while the old one keeps serving, then asks:
//!
//! ```text
//! successor                         predecessor
//!   take {version, pid}      ->
//!                            <-     node {endpoint}          + the listener
//!                            <-     pod {uid, cookie, ...}   + netns, its listeners
//!                            <-     sandbox {uid, ...}       + netns      (meshlet-cni's)
//!                            <-     done {pid, released}
//!   (accepts on all of them)
//!   accepting                ->
//!                            <-     released
//!                                   (stops accepting, drains what it owns: `drain`)
//! ```
//!
//! Both processes accept on the same listening sockets for a moment, so every connect finds
//! a listener. The predecessor's in-pod reconciler is frozen from the moment it exports its
//! state until the successor says `accepting` (or goes away, and the predecessor carries on
//! as if nothing happened). Everything received is checked before it is used: each descriptor
//! must be what its message says (a network namespace of the stated inode; a listening TCP
//! socket bound where stated, inside that namespace; a listening unix socket for the CNI
//! endpoint).

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use nix::sys::socket::{
    self, AddressFamily, SockFlag, SockType, SockaddrLike as _, SockaddrStorage, UnixAddr, sockopt,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::{
    inpod::Via,
    proxy::Role,
    sys::{Netns, fdpass, netns::socket_netns_cookie},
};

/// The socket's name in the state directory.
pub const SOCKET_NAME: &str = "handoff.sock";
/// The protocol version this agent speaks.
pub const VERSION: u32 = 1;
/// The longest message.
const MAX_MESSAGE: usize = 64 * 1024;
/// How long either side waits for the other's next message.
const TIMEOUT: Duration = Duration::from_secs(30);
/// How long a successor that announced itself may take to prepare (sync its source, get its
/// certificates) before it asks.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(300);
/// The most messages a handoff may take (pods and sandboxes of a very full node, and then
/// some).
const MAX_MESSAGES: usize = 20_000;

/// A node endpoint handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `--metrics-addr`.
    Metrics,
    /// `--readiness-addr`.
    Readiness,
    /// `--admin-addr`.
    Admin,
    /// The CNI plugin's socket.
    Cni,
}

/// An enrolled pod, as the predecessor saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodState {
    /// The pod's UID.
    pub uid: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its network namespace's cookie (the `ENROLLED` key).
    pub cookie: u64,
    /// Its network namespace's inode.
    pub inode: u64,
    /// How the namespace was found.
    pub via: Via,
    /// Where (for logs and for looking it up again).
    pub path: PathBuf,
    /// The addresses it was enrolled with.
    pub ips: Vec<IpAddr>,
    /// Its listeners, in the order of their descriptors.
    pub listeners: Vec<(SocketAddr, Role)>,
}

/// A sandbox `meshlet-cni` announced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxState {
    /// The pod's UID.
    pub uid: String,
    /// The runtime's container id.
    pub container_id: String,
    /// The namespace's inode.
    pub inode: u64,
    /// The primary plugin's addresses.
    pub ips: Vec<IpAddr>,
    /// The runtime's path of the namespace (for logs).
    pub path: PathBuf,
}

/// An enrolled pod with its descriptors.
#[derive(Debug)]
pub struct InheritedPod {
    /// What it is.
    pub state: PodState,
    /// Its network namespace.
    pub netns: Netns,
    /// Its listeners, as `state.listeners` says.
    pub listeners: Vec<std::net::TcpListener>,
}

/// What one agent hands the next.
#[derive(Debug, Default)]
pub struct Sockets {
    /// Node endpoints' listeners.
    pub node: Vec<(Endpoint, OwnedFd)>,
    /// Enrolled pods.
    pub pods: Vec<InheritedPod>,
    /// Sandboxes announced by `meshlet-cni`, with their namespaces.
    pub sandboxes: Vec<(SandboxState, Netns)>,
    /// Namespaces released by a CNI DEL: pod UID -> namespace inode.
    pub released: Vec<(String, u64)>,
}

impl Sockets {
    /// The node endpoint's listener, taken out.
    pub fn take_node(&mut self, endpoint: Endpoint) -> Option<OwnedFd> {
        let at = self.node.iter().position(|(e, _)| *e == endpoint)?;
        Some(self.node.swap_remove(at).1)
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Message {
    Take {
        version: u32,
        pid: u32,
        node: String,
    },
    Node {
        endpoint: Endpoint,
    },
    Pod(PodState),
    Sandbox(SandboxState),
    Done {
        pid: u32,
        released: Vec<(String, u64)>,
    },
    Accepting,
    Released,
    Refused {
        message: String,
    },
}

fn send(fd: BorrowedFd<'_>, message: &Message, fds: &[BorrowedFd<'_>]) -> anyhow::Result<()> {
    let body = serde_json::to_vec(message)?;
    ensure!(body.len() <= MAX_MESSAGE, "a handoff message is too long");
    fdpass::send_message(fd, &body, fds).context("send to the other agent")
}

fn recv(fd: BorrowedFd<'_>) -> anyhow::Result<(Message, Vec<OwnedFd>)> {
    let mut buf = vec![0; MAX_MESSAGE];
    let (n, fds) = fdpass::recv_message(fd, &mut buf).context("read from the other agent")?;
    ensure!(n > 0, "the other agent closed the handoff socket");
    let message = serde_json::from_slice(&buf[..n]).context("a malformed handoff message")?;
    Ok((message, fds))
}

/// Sets [`TIMEOUT`] on reads and writes of the (blocking) socket `fd`, and checks that the process at
/// the other end is root or this agent's own user.
fn prepare(fd: &OwnedFd) -> anyhow::Result<u32> {
    let credentials = socket::getsockopt(fd, sockopt::PeerCredentials)?;
    let own = nix::unistd::Uid::effective().as_raw();
    ensure!(
        credentials.uid() == 0 || credentials.uid() == own,
        "the process at the other end runs as uid {}, not root or {own}",
        credentials.uid()
    );
    let timeout = nix::sys::time::TimeVal::new(TIMEOUT.as_secs() as _, 0);
    socket::setsockopt(fd, sockopt::ReceiveTimeout, &timeout)?;
    socket::setsockopt(fd, sockopt::SendTimeout, &timeout)?;
    Ok(u32::try_from(credentials.pid()).unwrap_or_default())
}

/// A unix `SOCK_SEQPACKET` socket (message boundaries kept, descriptors with each message).
fn seqpacket() -> nix::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// The handoff socket's default path: in `state_dir`.
pub fn default_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

// --- the successor's side ---

/// A running agent found at start, not asked yet.
#[derive(Debug)]
pub struct Predecessor {
    socket: OwnedFd,
    pid: u32,
}

/// A handoff received, waiting for this agent to say it accepts.
#[derive(Debug)]
pub struct Taken {
    socket: OwnedFd,
}

/// Connects to the agent serving the handoff socket `path`, if one does (`None`: no socket, or
/// a stale one nobody listens on, left by an agent that died).
pub fn find(path: &Path) -> anyhow::Result<Option<Predecessor>> {
    let socket = seqpacket()?;
    let address = UnixAddr::new(path)?;
    match socket::connect(socket.as_raw_fd(), &address) {
        Ok(()) => {}
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ECONNREFUSED) => return Ok(None),
        Err(err) => {
            return Err(err).with_context(|| format!("connect to {}", path.display()));
        }
    }
    let pid = prepare(&socket).with_context(|| format!("the agent at {}", path.display()))?;
    Ok(Some(Predecessor { socket, pid }))
}

impl Predecessor {
    /// The running agent's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Asks for everything the running agent of node `node` has: it freezes its enrollment and
    /// sends its sockets, each checked here. It keeps accepting until [`Taken::accepting`].
    pub async fn take(self, node: String) -> anyhow::Result<(Sockets, Taken)> {
        tokio::task::spawn_blocking(move || {
            let own_cookie = Netns::current()?.cookie()?;
            let fd = self.socket.as_fd();
            send(
                fd,
                &Message::Take {
                    version: VERSION,
                    pid: std::process::id(),
                    node,
                },
                &[],
            )?;
            let sockets = receive(fd, own_cookie)?;
            Ok((
                sockets,
                Taken {
                    socket: self.socket,
                },
            ))
        })
        .await?
    }
}

fn receive(fd: BorrowedFd<'_>, own_cookie: u64) -> anyhow::Result<Sockets> {
    let mut sockets = Sockets::default();
    let mut endpoints = HashSet::new();
    let mut uids = HashSet::new();
    for _ in 0..MAX_MESSAGES {
        let (message, fds) = recv(fd)?;
        match message {
            Message::Node { endpoint } => {
                ensure!(endpoints.insert(endpoint), "{endpoint:?} handed over twice");
                let [listener] = <[OwnedFd; 1]>::try_from(fds)
                    .map_err(|_| anyhow::anyhow!("{endpoint:?} without exactly one socket"))?;
                let family = match endpoint {
                    Endpoint::Cni => AddressFamily::Unix,
                    _ => {
                        let cookie = socket_netns_cookie(listener.as_fd())?;
                        ensure!(
                            cookie == own_cookie,
                            "the {endpoint:?} listener is not in this agent's network namespace"
                        );
                        local_address(&listener)?
                            .family()
                            .unwrap_or(AddressFamily::Inet)
                    }
                };
                check_listener(&listener, family)
                    .with_context(|| format!("the {endpoint:?} socket"))?;
                sockets.node.push((endpoint, listener));
            }
            Message::Pod(state) => {
                ensure!(uids.insert(state.uid.clone()), "pod {} twice", state.uid);
                let pod = inherit_pod(state, fds)?;
                sockets.pods.push(pod);
            }
            Message::Sandbox(state) => {
                let [netns] = <[OwnedFd; 1]>::try_from(fds)
                    .map_err(|_| anyhow::anyhow!("sandbox without exactly one namespace"))?;
                let netns = Netns::from_fd(netns, state.path.clone())?;
                ensure!(
                    netns.inode()? == state.inode,
                    "sandbox {} is not the namespace it names",
                    state.container_id
                );
                sockets.sandboxes.push((state, netns));
            }
            Message::Done { pid, released } => {
                ensure!(fds.is_empty(), "descriptors with the last message");
                sockets.released = released;
                info!(
                    predecessor = pid,
                    pods = sockets.pods.len(),
                    sandboxes = sockets.sandboxes.len(),
                    endpoints = sockets.node.len(),
                    "handoff received"
                );
                return Ok(sockets);
            }
            Message::Refused { message } => bail!("the running agent refused: {message}"),
            other => bail!("unexpected message {other:?}"),
        }
    }
    bail!("the handoff did not end after {MAX_MESSAGES} messages")
}

fn inherit_pod(state: PodState, fds: Vec<OwnedFd>) -> anyhow::Result<InheritedPod> {
    let key = format!("{}/{}", state.namespace, state.name);
    ensure!(
        fds.len() == state.listeners.len() + 1,
        "pod {key}: {} descriptors for {} listeners",
        fds.len(),
        state.listeners.len()
    );
    // Only meshlet's own listeners, each once, serving what belongs there (a 0.0.0.0:15006
    // said to be the outbound listener would open the pod's egress to anyone).
    let known = Role::listeners();
    let mut seen = HashSet::new();
    for listener in &state.listeners {
        ensure!(
            known.contains(listener) && seen.insert(listener.0),
            "pod {key}: {listener:?} is not one of meshlet's listeners"
        );
    }
    let mut fds = fds.into_iter();
    let netns = Netns::from_fd(fds.next().expect("counted"), state.path.clone())?;
    ensure!(
        netns.inode()? == state.inode && netns.cookie()? == state.cookie,
        "pod {key}: the namespace is not the one named"
    );
    let mut listeners = Vec::new();
    for (fd, (addr, _)) in fds.zip(&state.listeners) {
        let family = if addr.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        check_listener(&fd, family).with_context(|| format!("pod {key}: {addr}"))?;
        ensure!(
            socket_netns_cookie(fd.as_fd())? == state.cookie,
            "pod {key}: the {addr} listener is not in the pod's namespace"
        );
        let listener = std::net::TcpListener::from(fd);
        ensure!(
            listener.local_addr()? == *addr,
            "pod {key}: the listener said to be {addr} is bound to {}",
            listener.local_addr()?
        );
        listeners.push(listener);
    }
    Ok(InheritedPod {
        state,
        netns,
        listeners,
    })
}

fn local_address(fd: &OwnedFd) -> anyhow::Result<SockaddrStorage> {
    Ok(socket::getsockname::<SockaddrStorage>(fd.as_raw_fd())?)
}

/// Whether `listener` is bound to `addr` (any port, if `addr`'s is 0): a node endpoint handed
/// over is kept only where this agent is configured to listen.
pub fn is_bound_as(listener: &std::net::TcpListener, addr: SocketAddr) -> bool {
    listener.local_addr().is_ok_and(|bound| {
        bound.ip() == addr.ip() && (addr.port() == 0 || bound.port() == addr.port())
    })
}

/// Whether `fd` is a unix socket listening at `path` (the CNI socket handed over is kept only
/// where this agent is configured to serve it).
pub fn is_unix_listener_at(fd: &OwnedFd, path: &Path) -> bool {
    socket::getsockname::<UnixAddr>(fd.as_raw_fd())
        .ok()
        .and_then(|addr| addr.path().map(|bound| bound == path))
        .unwrap_or(false)
}

/// Checks that `fd` is a listening stream socket of `family`.
fn check_listener(fd: &OwnedFd, family: AddressFamily) -> anyhow::Result<()> {
    ensure!(
        socket::getsockopt(fd, sockopt::SockType)? == SockType::Stream,
        "not a stream socket"
    );
    ensure!(
        socket::getsockopt(fd, sockopt::AcceptConn)?,
        "not a listening socket"
    );
    let found = local_address(fd)?.family();
    ensure!(found == Some(family), "a {found:?} socket, not {family:?}");
    Ok(())
}

impl Taken {
    /// Tells the predecessor this agent accepts on everything it received, and waits for it to
    /// let go (it stops accepting and drains). An error leaves the predecessor serving: this
    /// agent must not carry on beside it.
    pub async fn accepting(self) -> anyhow::Result<()> {
        tokio::task::spawn_blocking(move || {
            send(self.socket.as_fd(), &Message::Accepting, &[])?;
            match recv(self.socket.as_fd())? {
                (Message::Released, _) => Ok(()),
                (other, _) => bail!("expected released, got {other:?}"),
            }
        })
        .await?
    }
}

// --- the running agent's side ---

/// The handoff socket of a running agent.
#[derive(Debug)]
pub struct Listener {
    socket: OwnedFd,
    path: PathBuf,
}

/// Listens on the handoff socket `path`, replacing an old one. Call it once this agent serves
/// (a successor must find a serving agent there, or nothing).
pub fn bind(path: &Path) -> anyhow::Result<Listener> {
    let path = path.to_owned();
    ensure!(
        path.as_os_str().len() < 108,
        "handoff socket path {} is too long for a unix socket (at most 107 bytes)",
        path.display()
    );
    let dir = path.parent().unwrap_or(Path::new("/"));
    if !dir.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    }
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(&path)
                .with_context(|| format!("remove the old socket {}", path.display()))?;
        }
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("inspect {}", path.display())),
    }
    let socket = seqpacket()?;
    socket::bind(socket.as_raw_fd(), &UnixAddr::new(&path)?)
        .with_context(|| format!("bind {}", path.display()))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    socket::listen(&socket, socket::Backlog::new(4)?)?;
    Ok(Listener { socket, path })
}

/// What the in-pod reconciler is asked for: its state goes to `export`; then it waits for
/// `outcome` (true: the successor accepts, stop; false: carry on).
#[derive(Debug)]
pub struct Request {
    /// Where the reconciler sends its pods, sandboxes and released namespaces.
    pub export: oneshot::Sender<Sockets>,
    /// Whether the successor took them.
    pub outcome: oneshot::Receiver<bool>,
}

/// Waits for a successor for node `own_node` and hands everything over: the node endpoints'
/// listeners `node`
/// (duplicates; this agent keeps serving on its own until it stops) and what the in-pod
/// reconciler exports when asked through `reconciler`. Returns the successor's pid once it
/// accepts. A successor that fails or goes away mid-way leaves this agent as it was.
pub async fn serve(
    own_node: String,
    listener: Listener,
    node: Vec<(Endpoint, OwnedFd)>,
    reconciler: tokio::sync::mpsc::Sender<Request>,
) -> u32 {
    // A thread blocks in accept(2) (successors are rare); it ends with the process.
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::channel(1);
    let Listener { socket, path } = listener;
    std::thread::Builder::new()
        .name("handoff-accept".into())
        .spawn(move || {
            loop {
                match fdpass::accept(socket.as_fd()) {
                    Ok(fd) => {
                        if accepted_tx.blocking_send(fd).is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        warn!(socket = %path.display(), %err, "handoff accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .expect("spawn the handoff thread");
    loop {
        let Some(socket) = accepted.recv().await else {
            return std::future::pending().await;
        };
        match hand_over(&own_node, socket, &node, &reconciler).await {
            Ok(successor) => {
                info!(
                    successor,
                    "handed over to the successor; no longer accepting"
                );
                return successor;
            }
            Err(err) => {
                warn!(err = %format!("{err:#}"), "handoff failed; still serving");
            }
        }
    }
}

async fn hand_over(
    own_node: &str,
    socket: OwnedFd,
    node: &[(Endpoint, OwnedFd)],
    reconciler: &tokio::sync::mpsc::Sender<Request>,
) -> anyhow::Result<u32> {
    let (socket, take) = tokio::task::spawn_blocking(move || {
        prepare(&socket)?;
        // The successor asks once it is ready to serve: give it time to prepare.
        let patience = nix::sys::time::TimeVal::new(PREPARE_TIMEOUT.as_secs() as _, 0);
        socket::setsockopt(&socket, sockopt::ReceiveTimeout, &patience)?;
        let take = recv(socket.as_fd());
        socket::setsockopt(
            &socket,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(TIMEOUT.as_secs() as _, 0),
        )?;
        anyhow::Ok((socket, take))
    })
    .await??;
    let successor = match take? {
        (Message::Take { version, pid, node }, fds)
            if fds.is_empty() && version == VERSION && node == own_node =>
        {
            pid
        }
        (Message::Take { version, node, .. }, _) => {
            let message = if node == own_node {
                format!("this agent speaks handoff version {VERSION}, not {version}")
            } else {
                format!("this agent serves node {own_node}, not {node}")
            };
            let _ = send(
                socket.as_fd(),
                &Message::Refused {
                    message: message.clone(),
                },
                &[],
            );
            bail!(message);
        }
        (other, _) => bail!("expected take, got {other:?}"),
    };
    info!(successor, "a successor asks for the listeners");
    let node = node
        .iter()
        .map(|(endpoint, fd)| Ok((*endpoint, fd.try_clone()?)))
        .collect::<std::io::Result<Vec<_>>>()?;
    let (export, exported) = oneshot::channel();
    let (outcome, outcome_rx) = oneshot::channel();
    reconciler
        .send(Request {
            export,
            outcome: outcome_rx,
        })
        .await
        .context("the in-pod reconciler has stopped")?;
    let mut sockets = exported
        .await
        .context("the in-pod reconciler has stopped")?;
    sockets.node = node;
    let sent = tokio::task::spawn_blocking(move || {
        send_all(socket.as_fd(), &sockets)?;
        match recv(socket.as_fd())? {
            (Message::Accepting, _) => send(socket.as_fd(), &Message::Released, &[]),
            (other, _) => bail!("expected accepting, got {other:?}"),
        }
    })
    .await
    .map_err(anyhow::Error::from)
    .and_then(|sent| sent);
    let _ = outcome.send(sent.is_ok());
    sent.map(|()| successor)
}

fn send_all(fd: BorrowedFd<'_>, sockets: &Sockets) -> anyhow::Result<()> {
    for (endpoint, listener) in &sockets.node {
        send(
            fd,
            &Message::Node {
                endpoint: *endpoint,
            },
            &[listener.as_fd()],
        )?;
    }
    for pod in &sockets.pods {
        let mut fds = vec![pod.netns.as_fd()];
        fds.extend(pod.listeners.iter().map(AsFd::as_fd));
        send(fd, &Message::Pod(pod.state.clone()), &fds)?;
    }
    for (state, netns) in &sockets.sandboxes {
        send(fd, &Message::Sandbox(state.clone()), &[netns.as_fd()])?;
    }
    send(
        fd,
        &Message::Done {
            pid: std::process::id(),
            released: sockets.released.clone(),
        },
        &[],
    )
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    fn own_netns() -> (Netns, u64, u64) {
        let netns = Netns::current().unwrap();
        let (cookie, inode) = (netns.cookie().unwrap(), netns.inode().unwrap());
        (netns, cookie, inode)
    }

    fn pod_state(cookie: u64, inode: u64, listeners: Vec<(SocketAddr, Role)>) -> PodState {
        PodState {
            uid: "3f0c".into(),
            namespace: "demo".into(),
            name: "server".into(),
            cookie,
            inode,
            via: Via::Cni,
            path: "/var/run/netns/cni-3f0c".into(),
            ips: vec!["10.244.1.11".parse().unwrap()],
            listeners,
        }
    }

    #[test]
    fn a_handoff_arrives_whole_and_checked() {
        let (a, b) = pair();
        let (netns, cookie, inode) = own_netns();
        let metrics = TcpListener::bind("127.0.0.1:0").unwrap();
        // The pod's outbound listener where it belongs (loopback of this test's namespace).
        let outbound = TcpListener::bind("127.0.0.1:15001").expect("127.0.0.1:15001 is free");
        let state = pod_state(
            cookie,
            inode,
            vec![(outbound.local_addr().unwrap(), Role::Outbound)],
        );
        let sent = Sockets {
            node: vec![(
                Endpoint::Metrics,
                OwnedFd::from(metrics.try_clone().unwrap()),
            )],
            pods: vec![InheritedPod {
                state: state.clone(),
                netns,
                listeners: vec![outbound.try_clone().unwrap()],
            }],
            sandboxes: vec![],
            released: vec![("9a1e".into(), 4026532000)],
        };
        send_all(a.as_fd(), &sent).unwrap();
        let mut received = receive(b.as_fd(), cookie).unwrap();
        assert_eq!(received.pods.len(), 1);
        assert_eq!(received.pods[0].state, state);
        assert_eq!(
            received.pods[0].listeners[0].local_addr().unwrap(),
            outbound.local_addr().unwrap(),
            "the very socket"
        );
        let metrics_fd = received.take_node(Endpoint::Metrics).unwrap();
        assert_eq!(
            TcpListener::from(metrics_fd).local_addr().unwrap(),
            metrics.local_addr().unwrap()
        );
        assert_eq!(received.released, vec![("9a1e".to_owned(), 4026532000)]);
    }

    /// A message with its descriptors.
    type Sent = (Message, Vec<OwnedFd>);

    /// Sends `messages` and returns why `receive` refused them.
    fn refusal(messages: Vec<Sent>) -> String {
        let (a, b) = pair();
        let (_, cookie, _) = own_netns();
        for (message, fds) in &messages {
            let fds: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
            send(a.as_fd(), message, &fds).unwrap();
        }
        send(
            a.as_fd(),
            &Message::Done {
                pid: 1,
                released: vec![],
            },
            &[],
        )
        .unwrap();
        match receive(b.as_fd(), cookie) {
            Ok(sockets) => panic!("accepted {sockets:?}"),
            Err(err) => format!("{err:#}"),
        }
    }

    #[test]
    fn descriptors_that_are_not_what_their_message_says_are_refused() {
        let (_, cookie, inode) = own_netns();
        let netns_fd = || OwnedFd::from(std::fs::File::open("/proc/self/ns/net").unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let listening = || OwnedFd::from(listener.try_clone().unwrap());
        let not_listening = || {
            OwnedFd::from(
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap(),
            )
        };
        let pod = |listeners| Message::Pod(pod_state(cookie, inode, listeners));
        let cases: Vec<(&str, Vec<Sent>)> = vec![
            (
                "not a network namespace",
                vec![(
                    pod(vec![]),
                    vec![OwnedFd::from(
                        std::fs::File::open("/proc/self/status").unwrap(),
                    )],
                )],
            ),
            (
                "not the one named",
                vec![(
                    Message::Pod(pod_state(cookie, inode + 1, vec![])),
                    vec![netns_fd()],
                )],
            ),
            (
                "not a listening socket",
                vec![(
                    pod(vec![("0.0.0.0:15008".parse().unwrap(), Role::InboundHbone)]),
                    vec![netns_fd(), not_listening()],
                )],
            ),
            (
                "is bound to",
                vec![(
                    pod(vec![("127.0.0.1:15001".parse().unwrap(), Role::Outbound)]),
                    vec![netns_fd(), listening()],
                )],
            ),
            (
                "is not one of meshlet's listeners",
                vec![(
                    pod(vec![("0.0.0.0:15006".parse().unwrap(), Role::Outbound)]),
                    vec![netns_fd(), listening()],
                )],
            ),
            (
                "is not one of meshlet's listeners",
                vec![(
                    pod(vec![(addr, Role::Outbound)]),
                    vec![netns_fd(), listening()],
                )],
            ),
            (
                "is not one of meshlet's listeners",
                vec![(
                    pod(vec![
                        ("127.0.0.1:15001".parse().unwrap(), Role::Outbound),
                        ("127.0.0.1:15001".parse().unwrap(), Role::Outbound),
                    ]),
                    vec![netns_fd(), listening(), listening()],
                )],
            ),
            (
                "2 descriptors for 0 listeners",
                vec![(pod(vec![]), vec![netns_fd(), listening()])],
            ),
            (
                "not Unix",
                vec![(
                    Message::Node {
                        endpoint: Endpoint::Cni,
                    },
                    vec![listening()],
                )],
            ),
            (
                "handed over twice",
                vec![
                    (
                        Message::Node {
                            endpoint: Endpoint::Admin,
                        },
                        vec![listening()],
                    ),
                    (
                        Message::Node {
                            endpoint: Endpoint::Admin,
                        },
                        vec![listening()],
                    ),
                ],
            ),
            (
                "pod 3f0c twice",
                vec![
                    (pod(vec![]), vec![netns_fd()]),
                    (pod(vec![]), vec![netns_fd()]),
                ],
            ),
            ("unexpected message", vec![(Message::Accepting, vec![])]),
        ];
        for (want, messages) in cases {
            let got = refusal(messages);
            assert!(got.contains(want), "want {want:?}, got {got:?}");
        }
    }

    #[test]
    fn the_socket_path_must_be_usable() {
        let dir = std::env::temp_dir().join(format!("meshlet-handoff-{}", std::process::id()));
        let long = dir.join("x".repeat(120));
        let err = format!("{:#}", bind(&long).unwrap_err());
        assert!(err.contains("too long for a unix socket"), "{err}");
        let file = dir.join("not-a-socket");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&file, b"").unwrap();
        let err = format!("{:#}", bind(&file).unwrap_err());
        assert!(err.contains("exists and is not a socket"), "{err}");
        // A missing directory is created; a stale socket is replaced; nobody there is `None`.
        let path = dir.join("more/handoff.sock");
        drop(bind(&path).unwrap());
        assert!(
            find(&path).unwrap().is_none(),
            "a stale socket is no predecessor"
        );
        let listener = bind(&path).unwrap();
        assert!(find(&path).unwrap().is_some(), "a listening agent is found");
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let (a, b) = pair();
        fdpass::send_message(a.as_fd(), b"{\"kind\":\"pod\",\"uid\":", &[]).unwrap();
        let err = format!("{:#}", receive(b.as_fd(), 0).unwrap_err());
        assert!(err.contains("malformed handoff message"), "{err}");
        drop(a);
        let err = format!("{:#}", receive(b.as_fd(), 0).unwrap_err());
        assert!(err.contains("closed the handoff socket"), "{err}");
    }
}
