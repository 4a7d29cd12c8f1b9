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
//! thread: they hand over by waking a task in the same queue, and the lock they share is never
//! contended. Envoy's workers own their connections the same way.
//!
//! Pods are placed round robin, so a node's pods spread over the threads: a pod's outbound
//! listeners on one, its inbound ones on the next (a pod that both serves and calls can use two
//! cores). What one listener carries runs on one thread (one core). The control plane (the API
//! watch, certificates, the admin endpoint) keeps its own runtime.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    thread,
};

use tokio::runtime::{EnterGuard, Handle};

use super::Role;

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

    /// Where the next pod's listeners run (pods round robin).
    pub fn place_pod(&self) -> Placement<'_> {
        Placement {
            shards: self,
            first: self.next.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// Where one pod's listeners run.
#[derive(Debug)]
pub struct Placement<'a> {
    shards: &'a Shards,
    first: usize,
}

impl Placement<'_> {
    /// Enters the runtime of the pod's `role` listeners (both families on the same one): while
    /// the guard lives, a listener made (`TcpListener::from_std`) is that runtime's, and a task
    /// spawned (`tokio::spawn`) runs there, as does every task it spawns. `None` when there are
    /// no threads: the current runtime is used.
    pub fn enter(&self, role: Role) -> Option<EnterGuard<'_>> {
        let handles = &self.shards.handles;
        if handles.is_empty() {
            return None;
        }
        let offset = match role {
            Role::Outbound => 0,
            Role::InboundHbone | Role::InboundPlaintext => 1,
        };
        Some(handles[(self.first + offset) % handles.len()].enter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name of the thread that runs a task spawned as `role`'s of `pod`, and the name of
    /// the thread that runs a task that task spawns.
    async fn placed(pod: &Placement<'_>, role: Role) -> (String, String) {
        let task = {
            let _shard = pod.enter(role);
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
    async fn pods_alternate_and_a_pods_inbound_runs_on_the_thread_after_its_outbounds_children_included()
     {
        let shards = Shards::start(2).unwrap();
        assert_eq!(shards.runtimes().len(), 2);
        let mut seen = Vec::new();
        for _ in 0..3 {
            let pod = shards.place_pod();
            let mut threads = Vec::new();
            for role in [Role::Outbound, Role::InboundPlaintext, Role::InboundHbone] {
                let (task, child) = placed(&pod, role).await;
                assert_eq!(task, child, "a task's children stay on its thread");
                threads.push(task);
            }
            seen.push(threads);
        }
        let (a, b) = ("meshlet-dp-0", "meshlet-dp-1");
        assert_eq!(seen, [[a, b, b], [b, a, a], [a, b, b]]);
    }

    #[tokio::test]
    async fn without_threads_tasks_run_where_they_are_placed() {
        let shards = Shards::inline();
        assert!(shards.runtimes().is_empty());
        let here = thread::current().name().unwrap_or_default().to_owned();
        let (task, child) = placed(&shards.place_pod(), Role::InboundHbone).await;
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
            let pod = shards.place_pod();
            let _shard = pod.enter(Role::Outbound);
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
