//! The data plane's threads: each a single-threaded tokio runtime that carries the
//! connections of the listeners placed on it, from accept to close.
//!
//! A proxied connection is two tasks that hand bytes to each other all the time: the copy task
//! and the task driving its HBONE connection (on the other side, that connection's task and the
//! stream's). On a work-stealing runtime they run on whichever worker is free, so they meet on
//! h2's stream lock from two threads and wake each other across threads, once per buffer moved
//! (one stream across nodes: a `futex` call per 256 KiB and three times ztunnel's context
//! switches, see docs/performance.md). Here a listener's accept loop, every connection it
//! accepts and every task those start (an HBONE connection's driver, its streams) stay on one
//! thread: they hand over by waking a task in the same queue, and no lock is ever contended.
//! Envoy's workers own their connections the same way.
//!
//! Listeners are placed round robin, so a node's pods spread over the threads; what one
//! listener carries runs on one thread (one core). The control plane (the API watch,
//! certificates, the admin endpoint) keeps its own runtime.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    thread,
};

use tokio::runtime::{EnterGuard, Handle};

/// The data plane's threads.
#[derive(Debug)]
pub struct Shards {
    handles: Vec<Handle>,
    /// Dropped (so each thread's runtime ends, with its tasks) when the shards are.
    _stop: Vec<tokio::sync::oneshot::Sender<()>>,
    next: AtomicUsize,
}

impl Shards {
    /// `threads` data-plane threads (`meshlet-dp-0`, ...), each running a runtime of its own.
    pub fn start(threads: usize) -> std::io::Result<Self> {
        let mut handles = Vec::with_capacity(threads);
        let mut stops = Vec::with_capacity(threads);
        for index in 0..threads {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            handles.push(runtime.handle().clone());
            stops.push(stop);
            thread::Builder::new()
                .name(format!("meshlet-dp-{index}"))
                .spawn(move || {
                    // Either way (stop sent or its sender dropped) the shards are gone.
                    let _ = runtime.block_on(stopped);
                })?;
        }
        Ok(Self {
            handles,
            _stop: stops,
            next: AtomicUsize::new(0),
        })
    }

    /// No threads of its own: listeners are served on the runtime that places them (tests, and
    /// the tools that embed the proxy).
    pub fn inline() -> Self {
        Self {
            handles: Vec::new(),
            _stop: Vec::new(),
            next: AtomicUsize::new(0),
        }
    }

    /// Each thread's runtime.
    pub fn runtimes(&self) -> Vec<Handle> {
        self.handles.clone()
    }

    /// How many threads.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether the proxy runs on the runtime that places its listeners.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Enters the next thread's runtime, round robin: while the guard lives, a listener made
    /// (`TcpListener::from_std`) is that runtime's, and a task spawned (`tokio::spawn`) runs
    /// there, as does every task it spawns. `None` when there are no threads: the current
    /// runtime is used.
    pub fn enter_next(&self) -> Option<EnterGuard<'_>> {
        if self.handles.is_empty() {
            return None;
        }
        let next = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        Some(self.handles[next].enter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name of the thread that runs a task spawned under `shards.enter_next()`, and the
    /// name of the thread that runs a task that task spawns.
    async fn placed(shards: &Shards) -> (String, String) {
        let task = {
            let _shard = shards.enter_next();
            tokio::spawn(async {
                let here = thread::current().name().unwrap_or_default().to_owned();
                let child =
                    tokio::spawn(async { thread::current().name().unwrap_or_default().to_owned() });
                (here, child.await.unwrap())
            })
        };
        task.await.unwrap()
    }

    #[tokio::test]
    async fn tasks_run_on_their_listener_thread_round_robin_and_their_children_with_them() {
        let shards = Shards::start(2).unwrap();
        assert_eq!(shards.len(), 2);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (task, child) = placed(&shards).await;
            assert_eq!(task, child, "a task's children stay on its thread");
            seen.push(task);
        }
        assert_eq!(
            seen,
            [
                "meshlet-dp-0",
                "meshlet-dp-1",
                "meshlet-dp-0",
                "meshlet-dp-1"
            ]
        );
    }

    #[tokio::test]
    async fn without_threads_tasks_run_where_they_are_placed() {
        let shards = Shards::inline();
        assert!(shards.is_empty());
        let here = thread::current().name().unwrap_or_default().to_owned();
        let (task, child) = placed(&shards).await;
        assert_eq!(
            (task.as_str(), child.as_str()),
            (here.as_str(), here.as_str())
        );
    }

    #[test]
    fn dropped_shards_end_their_threads_runtimes_and_tasks() {
        let shards = Shards::start(1).unwrap();
        let (dropped_tx, dropped_rx) = std::sync::mpsc::channel::<()>();
        struct Tell(std::sync::mpsc::Sender<()>);
        impl Drop for Tell {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        {
            let _shard = shards.enter_next();
            let tell = Tell(dropped_tx);
            tokio::spawn(async move {
                let _tell = tell;
                std::future::pending::<()>().await;
            });
        }
        drop(shards);
        // The task never ends by itself: only its runtime's end drops it.
        dropped_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the shard's task was not dropped with its runtime");
    }
}
