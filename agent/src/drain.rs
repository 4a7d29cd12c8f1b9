//! The one way the agent stops: draining the connections it carries.
//!
//! Every connection the proxy accepts runs inside [`Drain::track`], which counts it while it
//! lives. When the agent stops (a successor took its listeners over, or a signal came without
//! one), its listeners close first; then [`Drain::run_out`] tells every HBONE connection to go
//! away (HTTP/2 GOAWAY: its peer opens new streams on the successor, the open ones carry on)
//! and waits for the connections it still owns to end on their own, until the drain deadline
//! (`--drain-deadline`, the pod's grace period minus 5 s). At the deadline plus [`CUT_GRACE`]
//! the rest are cut: their sockets closed (a FIN for plaintext, after the GOAWAY for HBONE).
//!
//! Without a clean stop (a crash, SIGKILL) there is nothing to drain: what the process carried
//! dies with it. The [`Ledger`] lets the next agent say how much that was.

use std::{
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tracing::info;

/// How long a connection told to go away at the deadline (HTTP/2 GOAWAY) has to finish before
/// it is dropped.
pub const CUT_GRACE: Duration = Duration::from_secs(1);

/// The live connections of one agent, and the deadline that cuts them.
#[derive(Debug, Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Connections being carried.
    live: AtomicUsize,
    /// Bumped when a connection ends (waiters re-read `live`).
    ended: watch::Sender<u64>,
    /// Turns true when the agent stops accepting.
    stopping: watch::Sender<bool>,
    /// Turns true at the deadline.
    deadline: watch::Sender<bool>,
    /// Connections cut at the deadline.
    cut: AtomicUsize,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

/// What draining did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Connections live when draining started.
    pub live_at_start: usize,
    /// Connections still live at the deadline, cut.
    pub cut: usize,
    /// How long draining took.
    pub took: Duration,
}

impl Drain {
    /// No connections, no deadline.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                live: AtomicUsize::new(0),
                ended: watch::Sender::new(0),
                stopping: watch::Sender::new(false),
                deadline: watch::Sender::new(false),
                cut: AtomicUsize::new(0),
            }),
        }
    }

    /// Carries `connection` while counting it live. At the deadline plus [`CUT_GRACE`] it is
    /// dropped (closing its sockets); a connection that should say goodbye first (HTTP/2
    /// GOAWAY) waits on [`Drain::stopping`] itself.
    ///
    /// The returned future polls `connection` in place ([`Tracked`]): an `async` block that
    /// took it and raced it against the deadline would hold it twice, and the task of every
    /// idle connection would be twice the size of its state.
    pub fn track<F>(&self, connection: F) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let guard = Live::new(self.inner.clone());
        let mut deadline = guard.inner.deadline.subscribe();
        Tracked {
            connection,
            cut: async move {
                let _ = deadline.wait_for(|reached| *reached).await;
                tokio::time::sleep(CUT_GRACE).await;
            },
            guard,
        }
    }

    /// Resolves when the agent stops accepting (at once if it has): an HTTP/2 server then
    /// sends GOAWAY, so its peer opens new streams elsewhere (on the successor) while the ones
    /// it has carry on.
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stopping = self.inner.stopping.subscribe();
        async move {
            let _ = stopping.wait_for(|stopped| *stopped).await;
        }
    }

    /// Connections live now.
    pub fn live(&self) -> usize {
        self.inner.live.load(Ordering::Acquire)
    }

    /// Resolves once no connection is live (`ended` wakes it as each one ends).
    async fn idle(&self, ended: &mut watch::Receiver<u64>) {
        while self.live() > 0 {
            if ended.changed().await.is_err() {
                return;
            }
        }
    }

    /// Stops: HBONE connections are told to go away (GOAWAY: no new streams here; the open
    /// ones carry on). Call it once the listeners are closed (or handed over).
    pub fn stop(&self) {
        self.inner.stopping.send_replace(true);
    }

    /// Stops (if not yet), then waits for the live connections until `deadline`; the rest are
    /// cut (closed) and waited for, at most [`CUT_GRACE`] longer.
    pub async fn run_out(&self, deadline: Instant) -> Drained {
        self.stop();
        let start = Instant::now();
        let live_at_start = self.live();
        info!(
            connections = live_at_start,
            deadline_in = ?deadline.saturating_duration_since(start),
            "draining: listeners closed, serving the connections this agent owns until they end"
        );
        let mut ended = self.inner.ended.subscribe();
        if tokio::time::timeout_at(deadline, self.idle(&mut ended))
            .await
            .is_err()
        {
            self.inner.deadline.send_replace(true);
            // Past the grace every tracked connection has been dropped; a little more lets
            // their tasks run.
            let _ = tokio::time::timeout(CUT_GRACE * 2, self.idle(&mut ended)).await;
        }
        Drained {
            live_at_start,
            cut: self.inner.cut.load(Ordering::Relaxed),
            took: start.elapsed(),
        }
    }
}

/// Why the agent stops accepting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// A successor took the listeners over (its pid).
    HandedOver(u32),
    /// A signal, and no successor came before the deadline (or SIGINT, which does not wait).
    Signalled,
}

/// The termination signals, installed once so none is missed.
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

/// Which signal came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: what Kubernetes sends a pod it deletes.
    Term,
    /// SIGINT: Ctrl-C.
    Int,
}

impl Signals {
    /// Installs the handlers.
    pub fn install() -> anyhow::Result<Self> {
        use anyhow::Context as _;
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("install the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("install the SIGINT handler")?,
        })
    }

    /// The next signal.
    pub async fn next(&mut self) -> Signal {
        let signal = tokio::select! {
            _ = self.term.recv() => Signal::Term,
            _ = self.int.recv() => Signal::Int,
        };
        info!(?signal, "signal received");
        signal
    }
}

/// Waits until the agent must stop accepting, and says why and by when its connections must
/// be gone:
/// - a successor took the listeners over (`successor` resolved): stop accepting now; the
///   deadline is counted from the signal that comes later (`None` until then);
/// - SIGTERM: keep serving (a successor may be on its way: the DaemonSet replaces a deleted
///   agent at once) until one takes over or half of `drain_for` has passed; the deadline is
///   `drain_for` after the signal, so what is left has the other half to end on its own;
/// - SIGINT: stop accepting now, deadline `drain_for` from now.
///
/// `serving_on` runs while SIGTERM waits (work that cannot wait for the stop: releasing
/// capture as the DaemonSet is removed).
pub async fn until_stopped(
    signals: &mut Signals,
    successor: impl Future<Output = u32>,
    serving_on: impl Future<Output = std::convert::Infallible>,
    drain_for: Duration,
) -> (Ending, Option<Instant>) {
    let mut successor = std::pin::pin!(successor);
    let signal = tokio::select! {
        pid = &mut successor => return (Ending::HandedOver(pid), None),
        signal = signals.next() => signal,
    };
    let deadline = Instant::now() + drain_for;
    if signal == Signal::Int {
        return (Ending::Signalled, Some(deadline));
    }
    info!(
        wait = ?(drain_for / 2),
        "serving on until a successor takes the listeners over, or half the drain deadline"
    );
    tokio::select! {
        pid = successor => (Ending::HandedOver(pid), Some(deadline)),
        () = tokio::time::sleep(drain_for / 2) => (Ending::Signalled, Some(deadline)),
        _ = signals.next() => (Ending::Signalled, Some(deadline)),
        never = serving_on => match never {},
    }
}

/// The count of live connections, kept in a file while this agent serves (written every
/// [`LEDGER_PERIOD`]), so that the next agent can say what a crash cost: an agent that ends
/// without handing over and without stopping cleanly leaves its last count there.
#[derive(Debug, Clone)]
pub struct Ledger {
    path: PathBuf,
}

/// How often the ledger is written.
pub const LEDGER_PERIOD: Duration = Duration::from_secs(1);

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct LedgerEntry {
    pid: u32,
    live: usize,
    clean: bool,
}

/// An agent that ended without handing over or stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crashed {
    /// Its process id.
    pub pid: u32,
    /// The connections it carried (as of at most [`LEDGER_PERIOD`] before it ended): they died
    /// with it.
    pub lost: usize,
}

impl Ledger {
    /// The ledger at `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// What the last agent left: `Some` if it crashed (its entry is not marked clean, and its
    /// process is gone). Read it before [`Ledger::keep`].
    pub fn crashed(&self) -> Option<Crashed> {
        let entry: LedgerEntry = serde_json::from_slice(&std::fs::read(&self.path).ok()?).ok()?;
        let alive = PathBuf::from(format!("/proc/{}", entry.pid)).exists();
        (!entry.clean && !alive && entry.pid != std::process::id()).then_some(Crashed {
            pid: entry.pid,
            lost: entry.live,
        })
    }

    /// Writes the live count of `drain` every [`LEDGER_PERIOD`], until the task is dropped.
    pub async fn keep(self, drain: Drain) {
        let mut tick = tokio::time::interval(LEDGER_PERIOD);
        loop {
            tick.tick().await;
            self.write(drain.live(), false);
        }
    }

    /// Marks the ledger clean: this agent stopped on purpose, with nothing left.
    pub fn close(&self) {
        self.write(0, true);
    }

    fn write(&self, live: usize, clean: bool) {
        let entry = LedgerEntry {
            pid: std::process::id(),
            live,
            clean,
        };
        // The file of this process only: a predecessor and its successor write at once.
        let temporary = self
            .path
            .with_extension(format!("{}.tmp", std::process::id()));
        let written = serde_json::to_vec(&entry)
            .map_err(std::io::Error::other)
            .and_then(|body| std::fs::write(&temporary, body))
            .and_then(|()| std::fs::rename(&temporary, &self.path));
        if let Err(err) = written {
            tracing::debug!(path = %self.path.display(), %err, "cannot write the connection ledger");
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection under [`Drain::track`]: it ends when `connection` does, or is cut (dropped)
    /// when `cut` resolves first; `guard` counts it live until then.
    struct Tracked<F, C> {
        #[pin]
        connection: F,
        #[pin]
        cut: C,
        guard: Live,
    }
}

impl<F, C> Future for Tracked<F, C>
where
    F: Future<Output = ()>,
    C: Future<Output = ()>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.connection.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if this.cut.poll(cx).is_ready() {
            this.guard.inner.cut.fetch_add(1, Ordering::Relaxed);
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// One live connection's count, released on drop however its task ends.
struct Live {
    inner: Arc<Inner>,
}

impl Live {
    fn new(inner: Arc<Inner>) -> Self {
        inner.live.fetch_add(1, Ordering::AcqRel);
        Self { inner }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.inner.live.fetch_sub(1, Ordering::AcqRel);
        self.inner.ended.send_modify(|n| *n = n.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tracked_connection_is_not_held_twice() {
        // A connection's state the size of a real one (an outbound connection's is ~3 KiB).
        let state = [7u8; 3000];
        let connection = async move {
            tokio::task::yield_now().await;
            assert_eq!(state.iter().map(|&b| usize::from(b)).sum::<usize>(), 21_000);
        };
        let alone = size_of_val(&connection);
        let drain = Drain::new();
        let tracked = drain.track(connection);
        let size = size_of_val(&tracked);
        assert!(
            size < alone + 512,
            "{size} bytes tracked for a {alone}-byte connection: held twice?"
        );
        tracked.await;
        assert_eq!(drain.live(), 0);
    }

    #[tokio::test]
    async fn connections_that_end_before_the_deadline_are_not_cut() {
        let drain = Drain::new();
        let (finish, finished) = tokio::sync::oneshot::channel::<()>();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        tokio::spawn(drain.track(async move {
            let _ = started_tx.send(());
            let _ = finished.await;
        }));
        started.await.unwrap();
        assert_eq!(drain.live(), 1);
        let running = tokio::spawn({
            let drain = drain.clone();
            async move {
                drain
                    .run_out(Instant::now() + Duration::from_secs(600))
                    .await
            }
        });
        finish.send(()).unwrap();
        let drained = running.await.unwrap();
        assert_eq!(drained.live_at_start, 1);
        assert_eq!(drained.cut, 0);
        assert_eq!(drain.live(), 0);
    }

    #[tokio::test]
    async fn the_deadline_tells_connections_then_cuts_those_that_stay() {
        let drain = Drain::new();
        // One says goodbye when told (as an HBONE server sends GOAWAY); one ignores it.
        let (told_tx, told) = tokio::sync::oneshot::channel();
        let polite = drain.stopping();
        tokio::spawn(drain.track(async move {
            polite.await;
            let _ = told_tx.send(Instant::now());
        }));
        let (kept, dropped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(drain.track(async move {
            let _kept = kept;
            std::future::pending::<()>().await;
        }));
        assert_eq!(drain.live(), 2);
        let start = Instant::now();
        let deadline = start + Duration::from_millis(50);
        let drained = drain.run_out(deadline).await;
        assert!(told.await.unwrap() >= start, "told when draining started");
        assert!(
            drained.took >= CUT_GRACE,
            "cut only after the deadline's grace"
        );
        // The stubborn one's task was dropped, with what it held.
        assert!(dropped.await.is_err());
        assert_eq!(drained.live_at_start, 2);
        assert_eq!(drained.cut, 1);
        assert_eq!(drain.live(), 0);
    }

    #[test]
    fn the_ledger_tells_a_crash_from_a_clean_stop_and_ignores_garbage() {
        let dir = std::env::temp_dir().join(format!("meshlet-ledger-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ledger = Ledger::new(dir.join("connections.json"));
        assert_eq!(ledger.crashed(), None, "no ledger yet");
        for garbage in [&b"{not json"[..], b"", b"{\"pid\":\"x\"}"] {
            std::fs::write(dir.join("connections.json"), garbage).unwrap();
            assert_eq!(ledger.crashed(), None, "{garbage:?}");
        }
        // A process that is gone (pid_max is below 2^22) left 3 live connections.
        let gone = 4_194_304;
        std::fs::write(
            dir.join("connections.json"),
            format!("{{\"pid\":{gone},\"live\":3,\"clean\":false}}"),
        )
        .unwrap();
        assert_eq!(ledger.crashed(), Some(Crashed { pid: gone, lost: 3 }));
        // This process's own entry, live or closed, is no crash.
        ledger.write(5, false);
        assert_eq!(ledger.crashed(), None);
        ledger.close();
        assert_eq!(ledger.crashed(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
