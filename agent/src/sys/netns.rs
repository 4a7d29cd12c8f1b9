//! Network namespaces: entering one on a dedicated thread, and naming one by its cookie.
//!
//! Two kinds of thread enter a namespace: a scoped one per call ([`Netns::run`], for rare
//! work such as opening listeners), and one long-lived thread per namespace that stays inside
//! it ([`Netns::run_async`], for the proxy's upstream sockets: one per connection, where
//! creating a thread each time cost more than the connect itself). That thread also makes
//! upstream sockets ahead of need, a few at a time ([`Netns::make_ahead`]), so a connection
//! usually finds its socket ready and waits for no other thread, and the thread is woken once
//! per [`AHEAD`] connections, not once per connection.
//!
//! This is the one userspace module that talks to the kernel through raw syscalls (`setns(2)`,
//! `getsockopt(SO_NETNS_COOKIE)`), so it is the one place `unsafe` is allowed. Entering a
//! namespace only ever happens on a thread created for the purpose: the thread's namespace
//! changes, never the caller's.
#![allow(
    unsafe_code,
    reason = "setns(2) and getsockopt(2) have no safe wrapper in std"
)]

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

/// An open handle on a network namespace (`/proc/PID/ns/net`, `/var/run/netns/NAME`, ...).
///
/// Holding the handle keeps the namespace alive even if every process in it exits.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    path: PathBuf,
    /// The long-lived thread inside the namespace, started on first use of
    /// [`Netns::run_async`]; it ends when this handle is dropped.
    worker: std::sync::OnceLock<std::sync::mpsc::Sender<Job>>,
    /// Descriptors the long-lived thread made ahead of need ([`Netns::make_ahead`]), per
    /// slot.
    ahead: Arc<[Mutex<Ahead>; AHEAD_SLOTS]>,
}

/// Slots of descriptors made ahead: one per address family of the proxy's upstream sockets.
pub const AHEAD_SLOTS: usize = 2;

/// Descriptors a slot is filled up to. Each refill wakes the namespace's thread once (a futex
/// wake and two context switches, as much as the rest of an inbound connection's scheduling),
/// so a batch spares that on all but one connection of [`AHEAD`]; a pod's namespace holds at
/// most this many unconnected sockets per family.
pub const AHEAD: usize = 4;

/// One slot's descriptors made ahead.
#[derive(Debug, Default)]
struct Ahead {
    ready: Vec<OwnedFd>,
    /// A refill is queued or running.
    refilling: bool,
}

/// Work for a namespace's long-lived thread.
type Job = Box<dyn FnOnce() + Send>;

/// Stack of a namespace's long-lived thread: its jobs create sockets, nothing deep.
const WORKER_STACK: usize = 64 * 1024;

impl Netns {
    /// Opens the network namespace at `path`.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("open network namespace {}: {err}", path.display()),
            )
        })?;
        Ok(Self {
            fd: file.into(),
            path: path.to_owned(),
            worker: Default::default(),
            ahead: Default::default(),
        })
    }

    /// A namespace handed over as a descriptor (by `meshlet-cni`, over `SCM_RIGHTS`); `path` is
    /// what the sender called it, for logs. Anything but a network namespace is refused.
    pub fn from_fd(fd: OwnedFd, path: PathBuf) -> io::Result<Self> {
        /// `_IO(0xb7, 0x3)` from linux/nsfs.h: the `CLONE_NEW*` type of a namespace descriptor.
        const NS_GET_NSTYPE: libc::Ioctl = 0xb703;
        // SAFETY: NS_GET_NSTYPE takes no argument and writes no memory; on a descriptor that is
        // not a namespace it fails with ENOTTY.
        let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE) };
        if kind != libc::CLONE_NEWNET {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a network namespace", path.display()),
            ));
        }
        Ok(Self {
            fd,
            path,
            worker: Default::default(),
            ahead: Default::default(),
        })
    }

    /// A second handle on the same namespace.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
            path: self.path.clone(),
            worker: Default::default(),
            ahead: Default::default(),
        })
    }

    /// The network namespace of the calling thread.
    pub fn current() -> io::Result<Self> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// The namespace's inode (nsfs), read from the open handle: what `/proc/<pid>/ns/net`
    /// links of processes in it compare equal to.
    pub fn inode(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt as _;
        File::from(self.fd.try_clone()?).metadata().map(|m| m.ino())
    }

    /// Where this namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its result.
    ///
    /// Sockets created by `f` belong to this namespace for their whole life, wherever they are
    /// used afterwards; that is how the proxy opens in-pod listeners from the node.
    pub fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        let fd = self.fd.as_fd();
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("netns".into())
                .spawn_scoped(scope, move || {
                    enter(fd)?;
                    Ok(f())
                })?
                .join()
                .map_err(|_| io::Error::other("thread running in a network namespace panicked"))?
        })
    }

    /// Runs `f` on this namespace's long-lived thread (started on first use, inside the
    /// namespace for good) and awaits its result without blocking the caller's thread. Jobs run
    /// one after the other; keep them short.
    pub async fn run_async<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (reply, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = reply.send(f());
        });
        self.worker()?
            .send(job)
            .map_err(|_| io::Error::other("the namespace's thread could not enter it"))?;
        result
            .await
            .map_err(|_| io::Error::other("the namespace's thread could not enter it"))
    }

    /// Takes a descriptor [`Netns::make_ahead`] left in `slot`, if one is there yet: the
    /// caller gets it without waiting for the namespace's thread.
    pub fn take_ahead(&self, slot: usize) -> Option<OwnedFd> {
        self.slot(slot).ready.pop()
    }

    /// Unless `slot` still holds more than one descriptor or is being refilled, queues on the
    /// namespace's long-lived thread a job that fills it up to [`AHEAD`] with what `make` makes,
    /// for the next [`Netns::take_ahead`]s. A failure ends the refill: the taker falls back to
    /// [`Netns::run_async`], which reports it.
    pub fn make_ahead<F>(&self, slot: usize, make: F)
    where
        F: Fn() -> io::Result<OwnedFd> + Send + 'static,
    {
        {
            let mut ahead = self.slot(slot);
            if ahead.refilling || ahead.ready.len() > 1 {
                return;
            }
            ahead.refilling = true;
        }
        let slots = Arc::clone(&self.ahead);
        let job: Job = Box::new(move || {
            let missing = AHEAD.saturating_sub(lock(&slots[slot]).ready.len());
            let made: Vec<OwnedFd> = (0..missing).map_while(|_| make().ok()).collect();
            let mut ahead = lock(&slots[slot]);
            ahead.ready.extend(made);
            ahead.refilling = false;
        });
        let queued = self.worker().and_then(|worker| {
            worker
                .send(job)
                .map_err(|_| io::Error::other("the namespace's thread is gone"))
        });
        if queued.is_err() {
            self.slot(slot).refilling = false;
        }
    }

    fn slot(&self, slot: usize) -> std::sync::MutexGuard<'_, Ahead> {
        lock(&self.ahead[slot])
    }

    /// The long-lived thread's queue, starting the thread on first use.
    fn worker(&self) -> io::Result<&std::sync::mpsc::Sender<Job>> {
        if let Some(worker) = self.worker.get() {
            return Ok(worker);
        }
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let fd = self.fd.try_clone()?;
        let path = self.path.clone();
        std::thread::Builder::new()
            .name("netns-worker".into())
            .stack_size(WORKER_STACK)
            .spawn(move || {
                if let Err(err) = enter(fd.as_fd()) {
                    // Dropping the queue fails every job sent, with the reason logged here.
                    tracing::warn!(netns = %path.display(), %err, "cannot enter the network namespace");
                    return;
                }
                drop(fd);
                for job in queue {
                    job();
                }
            })?;
        // Two first uses at once: one thread wins, the other's ends with its queue.
        Ok(self.worker.get_or_init(|| jobs))
    }

    /// The namespace's cookie: the 64-bit id the kernel (and so the eBPF programs, through
    /// `bpf_get_netns_cookie`) uses for it. Needs kernel >= 5.14 (`SO_NETNS_COOKIE`).
    pub fn cookie(&self) -> io::Result<u64> {
        self.run(|| {
            let socket = std::net::UdpSocket::bind(("127.0.0.1", 0))?;
            socket_netns_cookie(socket.as_fd())
        })?
    }
}

/// A slot of descriptors made ahead; a panic while it was held left nothing half-done.
fn lock(slot: &Mutex<Ahead>) -> std::sync::MutexGuard<'_, Ahead> {
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Moves the calling thread into the network namespace `fd`.
fn enter(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns(2) with a valid namespace fd and CLONE_NEWNET only changes the calling
    // thread's network namespace; it touches no memory of ours.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        let err = io::Error::last_os_error();
        Err(io::Error::new(
            err.kind(),
            format!("setns(CLONE_NEWNET): {err} (needs CAP_SYS_ADMIN)"),
        ))
    }
}

/// The cookie of the network namespace that the socket `fd` lives in.
pub fn socket_netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given, and outlive the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        let err = io::Error::last_os_error();
        Err(io::Error::new(
            err.kind(),
            format!("getsockopt(SO_NETNS_COOKIE): {err} (needs kernel >= 5.14)"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_long_lived_thread_runs_jobs_inside_the_namespace_and_says_when_it_cannot() {
        let netns = Netns::current().unwrap();
        let cookie = netns.cookie().unwrap();
        let thread = |()| std::thread::current().id();
        let first = netns
            .run_async(|| std::thread::current().id())
            .await
            .unwrap();
        for _ in 0..3 {
            // The same thread each time, inside the namespace.
            assert_eq!(
                netns
                    .run_async(|| std::thread::current().id())
                    .await
                    .unwrap(),
                first
            );
            let inside = netns
                .run_async(|| {
                    let socket = std::net::UdpSocket::bind(("127.0.0.1", 0))?;
                    socket_netns_cookie(socket.as_fd())
                })
                .await
                .unwrap()
                .unwrap();
            assert_eq!(inside, cookie);
        }
        assert_ne!(first, thread(()), "not the caller's thread");
        // Not a namespace: the thread cannot enter it, and every job says so.
        let bogus = Netns::open("/dev/null").unwrap();
        let err = bogus.run_async(|| ()).await.unwrap_err();
        assert!(err.to_string().contains("could not enter"), "{err}");
    }

    #[tokio::test]
    async fn a_descriptor_made_ahead_is_made_by_the_namespace_thread_and_taken_once() {
        let netns = Netns::current().unwrap();
        assert!(netns.take_ahead(0).is_none(), "nothing made yet");
        let worker = netns
            .run_async(|| std::thread::current().id())
            .await
            .unwrap();
        let (made_by, made_on) = std::sync::mpsc::channel();
        let make = move || {
            made_by.send(std::thread::current().id()).unwrap();
            Ok(std::net::UdpSocket::bind(("127.0.0.1", 0))?.into())
        };
        netns.make_ahead(1, make.clone());
        // Jobs run in order: once a later one has run, the slot is filled.
        netns.run_async(|| ()).await.unwrap();
        let makers: Vec<_> = made_on.try_iter().collect();
        assert_eq!(
            makers,
            vec![worker; AHEAD],
            "one batch, by the namespace's thread"
        );
        assert!(netns.take_ahead(0).is_none(), "another slot");
        let cookie = netns.cookie().unwrap();
        // The slot is refilled once it is down to one descriptor, not on every take.
        for left in (1..AHEAD).rev() {
            let fd = netns.take_ahead(1).expect("made ahead");
            assert_eq!(socket_netns_cookie(fd.as_fd()).unwrap(), cookie);
            netns.make_ahead(1, make.clone());
            netns.run_async(|| ()).await.unwrap();
            let refilled = made_on.try_iter().count();
            assert_eq!(
                refilled,
                if left <= 1 { AHEAD - 1 } else { 0 },
                "{left} left"
            );
        }
        for _ in 0..AHEAD {
            netns.take_ahead(1).expect("refilled");
        }
        assert!(netns.take_ahead(1).is_none(), "each taken once");
        // A failure leaves the slot empty, and the next take may ask again.
        netns.make_ahead(1, || Err(io::Error::other("no")));
        netns.run_async(|| ()).await.unwrap();
        assert!(netns.take_ahead(1).is_none());
        netns.make_ahead(1, make);
        netns.run_async(|| ()).await.unwrap();
        assert_eq!(made_on.try_iter().count(), AHEAD);
    }

    #[test]
    fn cookie_of_current_namespace_is_stable_and_nonzero() {
        let netns = Netns::current().unwrap();
        let first = netns.cookie().unwrap();
        assert_ne!(first, 0);
        assert_eq!(first, netns.cookie().unwrap());
        let socket = std::net::UdpSocket::bind(("127.0.0.1", 0)).unwrap();
        assert_eq!(first, socket_netns_cookie(socket.as_fd()).unwrap());
    }
}
