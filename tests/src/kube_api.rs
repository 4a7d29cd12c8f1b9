//! A stand-in Kubernetes API server for tests, speaking the real wire protocol over plain HTTP
//! on 127.0.0.1, so that Kubernetes code runs through an ordinary [`kube::Client`].
//!
//! It serves namespaces, pods, services, secrets and config maps (`v1`), daemon sets
//! (`apps/v1`), endpoint slices (`discovery.k8s.io/v1`) and Istio's authorization policies and peer authentications
//! (`security.istio.io/v1`), cluster-wide and per namespace: LIST with label and field selectors, WATCH from a resourceVersion with
//! bookmarks and `410 Expired` once history is compacted, GET, POST, PUT, DELETE, and JSON merge
//! PATCH. Objects are JSON values; every change takes the next number of one global
//! resourceVersion counter and is kept in a history that watches replay from.
//!
//! Tests drive it from the outside ([`ApiServer::apply`], [`ApiServer::delete`]) and break it on
//! purpose ([`ApiServer::drop_watches`], [`ApiServer::compact`], [`ApiServer::stop`]) to check
//! that clients recover. It runs on a thread and runtime of its own, so every method is a plain
//! function, callable from synchronous tests and from `#[tokio::test]`s alike; dropping the
//! [`ApiServer`] closes every connection and ends that thread.
//!
//! Not implemented: discovery (`/api`, `/apis`), pagination (`limit` and `continue` are ignored:
//! lists are complete), server-side apply and JSON patch (415), subresources, `generateName`,
//! namespace existence checks and cascading deletion, authentication of its own clients. It does
//! answer `TokenReview`s (authentication.k8s.io/v1) for tokens tests mint
//! ([`ApiServer::mint_token`]).

mod resource;
mod selector;
mod service;
mod store;
mod tokens;
mod watch;

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::Path,
    sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc},
    thread,
};

use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::Value;
use socket2::{Domain, Socket, Type};
use tokio::{runtime, sync::oneshot};

pub use tokens::TokenSpec;
pub use watch::BOOKMARK_INTERVAL;

use resource::Resource;
use store::Store;

/// The store, shared by the test-facing handle and the connections.
type Shared = Arc<Mutex<Store>>;

/// Locks the store. A panic elsewhere while it was held leaves it usable: every change is
/// made in one step.
fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running stand-in API server. See the [module documentation](self).
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    store: Shared,
    runtime: runtime::Handle,
    serving: Mutex<Option<Serving>>,
    /// Dropping it ends the server thread.
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

/// The accept loop currently running.
#[derive(Debug)]
struct Serving {
    stop: oneshot::Sender<()>,
    /// Disconnected once the accept loop and all its connections are gone.
    stopped: mpsc::Receiver<()>,
}

impl ApiServer {
    /// Starts a server on `127.0.0.1` on a port the OS picks, with no objects.
    ///
    /// # Panics
    ///
    /// If it cannot bind or start its thread.
    pub fn start() -> Self {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
    }

    /// Starts a server on `addr`, in the network namespace of the calling thread (port 0: one
    /// the OS picks), with no objects.
    ///
    /// # Panics
    ///
    /// If it cannot bind or start its thread.
    pub fn start_on(addr: SocketAddr) -> Self {
        let listener = bind(addr)
            .unwrap_or_else(|err| panic!("bind the stand-in API server on {addr}: {err}"));
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let runtime = runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build the stand-in API server's runtime");
        let handle = runtime.handle().clone();
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name(format!("kube-api-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async {
                    let _ = shutdown_rx.await;
                });
                // Dropping the runtime here drops whatever tasks are left.
            })
            .expect("spawn the stand-in API server's thread");
        let server = Self {
            addr,
            store: Shared::default(),
            runtime: handle,
            serving: Mutex::new(None),
            shutdown: Some(shutdown),
            thread: Some(thread),
        };
        server.serve(listener);
        server
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL, `http://ADDR:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig (YAML) whose current context points at this server, without credentials.
    pub fn kubeconfig(&self) -> String {
        format!(
            r#"apiVersion: v1
kind: Config
clusters:
- name: stand-in
  cluster:
    server: {url}
users:
- name: stand-in
  user: {{}}
contexts:
- name: stand-in
  context:
    cluster: stand-in
    user: stand-in
current-context: stand-in
"#,
            url = self.url()
        )
    }

    /// Writes [`ApiServer::kubeconfig`] to `path`.
    ///
    /// # Panics
    ///
    /// If the file cannot be written.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) {
        let path = path.as_ref();
        std::fs::write(path, self.kubeconfig())
            .unwrap_or_else(|err| panic!("write kubeconfig {}: {err}", path.display()));
    }

    /// A client for this server, configured from [`ApiServer::kubeconfig`] the way
    /// `kube::Client::try_default` would configure one from a file. Call it inside a Tokio
    /// runtime: the client spawns a task on it.
    ///
    /// # Panics
    ///
    /// If kube rejects the kubeconfig.
    pub async fn client(&self) -> kube::Client {
        let kubeconfig =
            Kubeconfig::from_yaml(&self.kubeconfig()).expect("kube parses our kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("kube accepts our kubeconfig");
        kube::Client::try_from(config).expect("build a kube client for the stand-in API server")
    }

    /// Creates the object, or replaces the object of the same kind, namespace and name, as a
    /// controller would; watchers see ADDED or MODIFIED. `kind` and `metadata.name` are
    /// required, `metadata.namespace` defaults to `default` for namespaced kinds. Returns the
    /// object as stored, with `apiVersion`, `metadata.uid` and `metadata.resourceVersion`.
    ///
    /// # Panics
    ///
    /// If the kind is not served, the `apiVersion` does not match it, or there is no name.
    pub fn apply(&self, object: Value) -> Value {
        let kind = object["kind"].as_str().unwrap_or_default();
        let resource = resource(kind);
        if let Some(api_version) = object["apiVersion"].as_str() {
            assert_eq!(
                api_version, resource.api_version,
                "apply: {kind} is served as {}",
                resource.api_version
            );
        }
        assert!(
            object["metadata"]["name"].is_string(),
            "apply: the {kind} has no metadata.name: {object}"
        );
        lock(&self.store).put(resource, object)
    }

    /// Deletes an object (`namespace` is ignored for cluster-scoped kinds); watchers see
    /// DELETED. Returns its last state, or `None` if it did not exist.
    ///
    /// # Panics
    ///
    /// If the kind is not served.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        lock(&self.store).remove(resource(kind), namespace, name)
    }

    /// The object, if it exists (`namespace` is ignored for cluster-scoped kinds).
    ///
    /// # Panics
    ///
    /// If the kind is not served.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        lock(&self.store)
            .get(resource(kind), namespace, name)
            .cloned()
    }

    /// Every object of `kind`, in all namespaces, ordered by namespace and name.
    ///
    /// # Panics
    ///
    /// If the kind is not served.
    pub fn list(&self, kind: &str) -> Vec<Value> {
        let filter = selector::Filter::new(resource(kind), None, None, None)
            .expect("no selectors to reject");
        lock(&self.store).select(&filter).cloned().collect()
    }

    /// Mints a service-account token for `spec`, as the kubelet's projected volume would get
    /// one; a `TokenReview` of it answers as [`TokenSpec`] says (see [`tokens`]).
    pub fn mint_token(&self, spec: TokenSpec) -> String {
        lock(&self.store).tokens.mint(spec)
    }

    /// How many token reviews were answered.
    pub fn token_reviews(&self) -> u64 {
        lock(&self.store).tokens.reviews()
    }

    /// The current resourceVersion: that of the last change to any object.
    pub fn resource_version(&self) -> String {
        lock(&self.store).revision().to_string()
    }

    /// Every PATCH request received whose body was JSON, in order, as (URL path, body), whether
    /// it applied or not.
    pub fn patches(&self) -> Vec<(String, Value)> {
        lock(&self.store).patches()
    }

    /// Cuts every open watch mid-stream, as an API server restart or a load balancer would:
    /// the connection closes without the end of the chunked body. Clients must watch again.
    pub fn drop_watches(&self) {
        lock(&self.store).drop_watches();
    }

    /// Forgets the history of changes, as etcd compaction does: a watch from any earlier
    /// resourceVersion gets a `410 Expired` ERROR event, and its client must list again.
    pub fn compact(&self) {
        lock(&self.store).compact();
    }

    /// Stops serving: closes the listener (connections are refused) and every connection,
    /// watches included. Objects and history stay. Returns once all are closed.
    pub fn stop(&self) {
        let serving = self
            .serving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(serving) = serving {
            let _ = serving.stop.send(());
            // Returns (with an error) when the accept loop drops its end: it has finished.
            let _ = serving.stopped.recv();
        }
    }

    /// Serves again on the same port with the same objects and history (stopping first if
    /// needed), as an API server restart would look to clients.
    ///
    /// # Panics
    ///
    /// If the port cannot be bound again (another process took it meanwhile).
    pub fn restart(&self) {
        self.stop();
        let listener = bind(self.addr)
            .unwrap_or_else(|err| panic!("rebind the stand-in API server on {}: {err}", self.addr));
        self.serve(listener);
    }

    /// Runs the accept loop for `listener` on the server thread.
    fn serve(&self, listener: TcpListener) {
        let (stop, stop_rx) = oneshot::channel();
        let (stopped_tx, stopped) = mpsc::channel::<()>();
        let store = self.store.clone();
        self.runtime.spawn(async move {
            let _stopped = stopped_tx;
            let listener = tokio::net::TcpListener::from_std(listener)
                .expect("register the listener with the server's runtime");
            service::serve(listener, store, stop_rx).await;
        });
        *self.serving.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(Serving { stop, stopped });
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
        drop(self.shutdown.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The resource for a `kind` the tests name.
fn resource(kind: &str) -> &'static Resource {
    Resource::by_kind(kind).unwrap_or_else(|| {
        panic!(
            "the stand-in API server does not serve kind {kind:?}; it serves {}",
            Resource::known_kinds()
        )
    })
}

/// A non-blocking listener on `addr` with `SO_REUSEADDR`, so that a restart can bind the same
/// port while connections from before linger in TIME_WAIT.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
