//! The stand-in API server, through an ordinary `kube::Client` built from the kubeconfig it
//! writes: lists with selectors, watches that see every change in order, clients that recover
//! from dropped watches, compaction and restarts, merge patches, and bookmarks on the wire.

use std::{
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, ResourceExt,
    api::{
        ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
        WatchEvent, WatchParams,
    },
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, reflector, utils::Backoff, watcher, watcher::Event},
};
use meshlet_tests::kube_api::ApiServer;
use serde_json::{Value, json};
use tokio::{
    sync::mpsc::UnboundedReceiver,
    time::{Instant, timeout, timeout_at},
};

/// The longest any single step may take.
const WAIT: Duration = Duration::from_secs(5);

/// A client built the way the agent builds one: from a kubeconfig file.
async fn client(server: &ApiServer) -> Client {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "meshlet-kube-api-{}-{}.yaml",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    server.write_kubeconfig(&path);
    let kubeconfig = Kubeconfig::read_from(&path).expect("read the kubeconfig back");
    let _ = std::fs::remove_file(&path);
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("configure kube from the kubeconfig");
    Client::try_from(config).expect("build a kube client")
}

fn pod(namespace: &str, name: &str, labels: Value, node: &str) -> Value {
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}]},
    })
}

/// A pod in `default` on node-0 labelled `v=<version>`.
fn versioned_pod(name: &str, version: u32) -> Value {
    pod("default", name, json!({"v": version.to_string()}), "node-0")
}

/// Retries quickly and forever: tests need recovery in milliseconds, not the default seconds.
struct Every(Duration);

impl Iterator for Every {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.0)
    }
}

impl Backoff for Every {
    fn reset(&mut self) {}
}

type Events = std::pin::Pin<Box<dyn Stream<Item = Result<Event<Pod>, watcher::Error>> + Send>>;

fn pod_watcher(api: Api<Pod>, config: watcher::Config) -> Events {
    watcher(api, config)
        .backoff(Every(Duration::from_millis(100)))
        .boxed()
}

/// The next event, skipping the errors a watcher reports while it recovers.
async fn next_event(events: &mut Events) -> Event<Pod> {
    loop {
        match timeout(WAIT, events.next()).await {
            Err(_) => panic!("no watch event within {WAIT:?}"),
            Ok(None) => panic!("the watcher stream ended"),
            Ok(Some(Err(err))) => eprintln!("watcher error (it retries): {err}"),
            Ok(Some(Ok(event))) => return event,
        }
    }
}

/// The next `count` events, described by [`describe`].
async fn next_events(events: &mut Events, count: usize) -> Vec<String> {
    let mut described = Vec::new();
    for _ in 0..count {
        described.push(describe(&next_event(events).await));
    }
    described
}

/// `Init`, `InitApply a v=1`, `InitDone`, `Apply a v=2`, `Delete a`.
fn describe(event: &Event<Pod>) -> String {
    let pod = |pod: &Pod| {
        let version = pod.labels().get("v").map_or("-", String::as_str);
        format!("{} v={version}", pod.name_any())
    };
    match event {
        Event::Init => "Init".to_owned(),
        Event::InitApply(p) => format!("InitApply {}", pod(p)),
        Event::InitDone => "InitDone".to_owned(),
        Event::Apply(p) => format!("Apply {}", pod(p)),
        Event::Delete(p) => format!("Delete {}", p.name_any()),
    }
}

/// The next event the task polling a watcher forwarded, skipping its errors.
async fn next_described(received: &mut UnboundedReceiver<Result<String, String>>) -> String {
    loop {
        match timeout(WAIT, received.recv()).await {
            Ok(Some(Ok(event))) => return event,
            Ok(Some(Err(err))) => eprintln!("watcher error (it retries): {err}"),
            Ok(None) => panic!("the watcher task ended"),
            Err(_) => panic!("no watch event within {WAIT:?}"),
        }
    }
}

fn names<K: ResourceExt>(objects: impl IntoIterator<Item = K>) -> Vec<String> {
    objects
        .into_iter()
        .map(|o| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()))
        .collect()
}

fn api_error_code(result: Result<impl std::fmt::Debug, kube::Error>) -> u16 {
    match result {
        Err(kube::Error::Api(status)) => status.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn list_filters_pods_by_label_and_field_selectors() {
    let server = ApiServer::start();
    server.apply(pod(
        "default",
        "a",
        json!({"app": "web", "tier": "front"}),
        "node-0",
    ));
    server.apply(pod("default", "b", json!({"app": "web"}), "node-1"));
    server.apply(pod("default", "c", json!({"app": "db"}), "node-0"));
    server.apply(pod("other", "d", json!({"app": "web"}), "node-0"));
    let client = client(&server).await;
    let default = Api::<Pod>::namespaced(client.clone(), "default");
    let all = Api::<Pod>::all(client);

    let list = |api: &Api<Pod>, labels: &str, fields: &str| {
        let api = api.clone();
        let params = ListParams::default().labels(labels).fields(fields);
        async move { api.list(&params).await.expect("list pods") }
    };
    assert_eq!(
        names(list(&default, "", "").await),
        ["default/a", "default/b", "default/c"]
    );
    assert_eq!(
        names(list(&default, "app=web", "").await),
        ["default/a", "default/b"]
    );
    assert_eq!(
        names(list(&default, "app==web,tier!=front", "").await),
        ["default/b"]
    );
    assert_eq!(names(list(&default, "tier", "").await), ["default/a"]);
    assert_eq!(
        names(list(&default, "!tier", "").await),
        ["default/b", "default/c"]
    );
    assert_eq!(
        names(list(&default, "app in (db, cache)", "").await),
        ["default/c"]
    );
    assert_eq!(
        names(list(&all, "", "spec.nodeName=node-0").await),
        ["default/a", "default/c", "other/d"]
    );
    assert_eq!(
        names(
            list(
                &all,
                "app=web",
                "spec.nodeName=node-0,metadata.namespace!=default"
            )
            .await
        ),
        ["other/d"]
    );
    assert_eq!(
        names(list(&all, "", "metadata.name=b").await),
        ["default/b"]
    );

    let everything = list(&all, "", "").await;
    assert_eq!(
        everything.metadata.resource_version.as_deref(),
        Some(server.resource_version().as_str()),
        "a list carries the current resourceVersion"
    );
    assert!(
        everything
            .items
            .iter()
            .all(|pod| pod.uid().is_some() && pod.resource_version().is_some())
    );
    // A field the real server does not index for pods is a 400, not an empty list.
    let bogus = all
        .list(&ListParams::default().fields("spec.bogus=x"))
        .await;
    assert_eq!(api_error_code(bogus), 400);
}

#[tokio::test]
async fn watcher_sees_every_change_in_order() {
    let server = ApiServer::start();
    server.apply(versioned_pod("a", 1));
    let mut events = pod_watcher(
        Api::namespaced(client(&server).await, "default"),
        watcher::Config::default(),
    );
    assert_eq!(
        next_events(&mut events, 3).await,
        ["Init", "InitApply a v=1", "InitDone"]
    );

    // The watch starts from the list's version, so it replays b; once b has arrived the watch
    // is open, and the next changes stream live.
    server.apply(versioned_pod("b", 1));
    assert_eq!(next_events(&mut events, 1).await, ["Apply b v=1"]);
    server.apply(versioned_pod("a", 2));
    server.delete("Pod", "default", "b").expect("b exists");
    server.apply(versioned_pod("c", 1));
    assert_eq!(
        next_events(&mut events, 3).await,
        ["Apply a v=2", "Delete b", "Apply c v=1"]
    );
}

#[tokio::test]
async fn label_watcher_sees_objects_enter_and_leave_its_selection() {
    let server = ApiServer::start();
    server.apply(pod("default", "a", json!({"app": "web"}), "node-0"));
    let config = watcher::Config::default().labels("app=web");
    let mut events = pod_watcher(Api::all(client(&server).await), config);
    assert_eq!(
        next_events(&mut events, 3).await,
        ["Init", "InitApply a v=-", "InitDone"]
    );

    server.apply(pod("default", "b", json!({"app": "db"}), "node-0"));
    server.apply(pod("default", "a", json!({"app": "db"}), "node-0"));
    server.apply(pod("default", "a", json!({"app": "web"}), "node-0"));
    // b never matched; a left the selection (DELETED) and came back (ADDED).
    assert_eq!(
        next_events(&mut events, 2).await,
        ["Delete a", "Apply a v=-"]
    );
}

#[tokio::test]
async fn watch_from_a_compacted_version_gets_410_expired() {
    let server = ApiServer::start();
    server.apply(versioned_pod("a", 1));
    server.apply(versioned_pod("b", 1));
    server.compact();
    let pods = Api::<Pod>::namespaced(client(&server).await, "default");

    let mut stale = pods
        .watch(&WatchParams::default(), "1")
        .await
        .expect("the server answers 200 even when the version is too old")
        .boxed();
    match timeout(WAIT, stale.next()).await.expect("an event in time") {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
            assert_eq!(status.message, "too old resource version: 1 (2)");
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(
        timeout(WAIT, stale.next())
            .await
            .expect("the end in time")
            .is_none(),
        "the stream ends after the ERROR event"
    );

    let mut current = pods
        .watch(&WatchParams::default(), &server.resource_version())
        .await
        .expect("watch from the current version")
        .boxed();
    server.apply(versioned_pod("c", 1));
    match timeout(WAIT, current.next())
        .await
        .expect("an event in time")
    {
        Some(Ok(WatchEvent::Added(pod))) => assert_eq!(pod.name_any(), "c"),
        other => panic!("expected c ADDED, got {other:?}"),
    }
}

#[tokio::test]
async fn watcher_lists_again_after_a_dropped_watch_and_compaction() {
    let server = ApiServer::start();
    server.apply(versioned_pod("a", 1));
    server.apply(versioned_pod("b", 1));
    let (reader, writer) = reflector::store::<Pod>();
    let pods = watcher(
        Api::namespaced(client(&server).await, "default"),
        watcher::Config::default(),
    );
    let mut events: Events = reflector(writer, pods)
        .backoff(Every(Duration::from_millis(100)))
        .boxed();
    assert_eq!(
        next_events(&mut events, 4).await,
        ["Init", "InitApply a v=1", "InitApply b v=1", "InitDone"]
    );
    server.apply(versioned_pod("c", 1));
    assert_eq!(next_events(&mut events, 1).await, ["Apply c v=1"]);

    // The watcher is not polled from here on until the changes are made, so it cannot see
    // them live: its watch is cut, the changes go unseen, and the history it would resume from
    // is gone.
    server.drop_watches();
    server.delete("Pod", "default", "a").expect("a exists");
    server.apply(versioned_pod("b", 2));
    server.apply(versioned_pod("d", 1));
    server.compact();

    // Resuming gets 410 Expired, so the watcher lists again.
    assert_eq!(
        next_events(&mut events, 5).await,
        [
            "Init",
            "InitApply b v=2",
            "InitApply c v=1",
            "InitApply d v=1",
            "InitDone"
        ]
    );
    let mut cached: Vec<_> = reader
        .state()
        .iter()
        .map(|pod| (pod.name_any(), pod.resource_version()))
        .collect();
    cached.sort();
    let current: Vec<_> = server
        .list("Pod")
        .iter()
        .map(|pod| {
            let metadata = &pod["metadata"];
            (
                metadata["name"].as_str().unwrap_or_default().to_owned(),
                metadata["resourceVersion"].as_str().map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(
        cached, current,
        "the reflector holds exactly the current pods"
    );

    // And it watches again from the new list.
    server.apply(versioned_pod("e", 1));
    assert_eq!(next_events(&mut events, 1).await, ["Apply e v=1"]);
}

#[tokio::test]
async fn watcher_recovers_after_a_restart() {
    let server = ApiServer::start();
    server.apply(versioned_pod("a", 1));
    let mut events = pod_watcher(
        Api::namespaced(client(&server).await, "default"),
        watcher::Config::default(),
    );
    // Poll the watcher continuously, as an agent would, so it retries while the server is down.
    let (sender, mut received) = tokio::sync::mpsc::unbounded_channel();
    let watching = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let described = event.map(|e| describe(&e)).map_err(|e| e.to_string());
            if sender.send(described).is_err() {
                break;
            }
        }
    });
    for expected in ["Init", "InitApply a v=1", "InitDone"] {
        assert_eq!(next_described(&mut received).await, expected);
    }
    server.apply(versioned_pod("b", 1));
    assert_eq!(next_described(&mut received).await, "Apply b v=1");

    server.stop();
    assert!(
        tokio::net::TcpStream::connect(server.addr()).await.is_err(),
        "a stopped server refuses connections"
    );
    server.apply(versioned_pod("c", 1));
    server.delete("Pod", "default", "a").expect("a exists");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Its watch was cut and it has been trying to watch again, in vain.
    let mut during_outage = Vec::new();
    while let Ok(item) = received.try_recv() {
        during_outage.push(item);
    }
    assert!(
        !during_outage.is_empty() && during_outage.iter().all(Result::is_err),
        "only errors while the server is down: {during_outage:?}"
    );
    server.restart();

    // The history is intact, so the watcher resumes where it was: no new list.
    assert_eq!(next_described(&mut received).await, "Apply c v=1");
    assert_eq!(next_described(&mut received).await, "Delete a");
    watching.abort();
}

#[tokio::test]
async fn merge_patch_changes_the_object_is_recorded_and_reaches_watchers() {
    let server = ApiServer::start();
    let before = server.apply(pod(
        "default",
        "a",
        json!({"app": "web", "stale": "yes"}),
        "node-0",
    ));
    let client = client(&server).await;
    let pods = Api::<Pod>::namespaced(client.clone(), "default");
    let mut events = pod_watcher(pods.clone(), watcher::Config::default());
    assert_eq!(
        next_events(&mut events, 3).await,
        ["Init", "InitApply a v=-", "InitDone"]
    );

    let patch = json!({"metadata": {
        "annotations": {"meshlet.io/enrolled": "true"},
        "labels": {"stale": null},
    }});
    let patched = pods
        .patch("a", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("merge patch");
    assert_eq!(
        patched
            .annotations()
            .get("meshlet.io/enrolled")
            .map(String::as_str),
        Some("true")
    );
    let labels: Vec<_> = patched.labels().keys().collect();
    assert_eq!(labels, ["app"], "null removes a label, the others stay");
    assert_eq!(patched.uid().as_deref(), before["metadata"]["uid"].as_str());
    assert_eq!(
        patched.resource_version(),
        Some(server.resource_version()),
        "a patch is a change"
    );
    let stored = server.get("Pod", "default", "a").expect("a exists");
    assert_eq!(
        stored["metadata"]["annotations"]["meshlet.io/enrolled"],
        "true"
    );
    assert_eq!(
        server.patches(),
        [(
            "/api/v1/namespaces/default/pods/a".to_owned(),
            patch.clone()
        )]
    );
    match next_event(&mut events).await {
        Event::Apply(pod) => {
            assert_eq!(pod.name_any(), "a");
            assert!(pod.annotations().contains_key("meshlet.io/enrolled"));
        }
        other => panic!("expected the patched pod, got {}", describe(&other)),
    }

    // A missing object is a 404, server-side apply a 415; both are still recorded.
    let missing = pods
        .patch("missing", &PatchParams::default(), &Patch::Merge(&patch))
        .await;
    assert_eq!(api_error_code(missing), 404);
    let apply = pods
        .patch("a", &PatchParams::apply("test"), &Patch::Apply(&patch))
        .await;
    assert_eq!(api_error_code(apply), 415);
    assert_eq!(server.patches().len(), 3);
}

#[tokio::test]
async fn watch_with_bookmarks_gets_them_and_ends_at_its_timeout() {
    let server = ApiServer::start();
    server.apply(versioned_pod("a", 1));
    let start_version = server.resource_version();
    let stream = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1 handshake");
    tokio::spawn(connection);
    let request = Request::get(format!(
        "/api/v1/namespaces/default/pods?watch=1&resourceVersion={start_version}\
         &allowWatchBookmarks=true&timeoutSeconds=3"
    ))
    .header(header::HOST, server.addr().to_string())
    .body(Empty::<Bytes>::new())
    .expect("request");
    let started = Instant::now();
    let response = sender.send_request(request).await.expect("watch response");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();

    let mut events = Vec::new();
    let mut buffer = Vec::new();
    let mut b_version = None;
    // One deadline for the whole stream: bookmarks alone would keep a per-frame timeout happy.
    let deadline = started + WAIT;
    while let Some(frame) = timeout_at(deadline, body.frame())
        .await
        .expect("timeoutSeconds=3 ends the watch")
    {
        let frame = frame.expect("read the watch body");
        buffer.extend_from_slice(frame.data_ref().map_or(&[][..], |data| &data[..]));
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let event: Value = serde_json::from_slice(&line).expect("each line is a JSON event");
            // After the first bookmark, make a change: later bookmarks must carry its version.
            if event["type"] == "BOOKMARK" && b_version.is_none() {
                b_version = server.apply(versioned_pod("b", 1))["metadata"]["resourceVersion"]
                    .as_str()
                    .map(str::to_owned);
            }
            events.push(event);
        }
    }
    let elapsed = started.elapsed();
    assert!(
        (Duration::from_millis(2900)..WAIT).contains(&elapsed),
        "timeoutSeconds=3 ended the watch after {elapsed:?}"
    );

    let bookmarks: Vec<_> = events.iter().filter(|e| e["type"] == "BOOKMARK").collect();
    assert!(
        bookmarks.len() >= 2,
        "about one bookmark a second: {events:?}"
    );
    for bookmark in &bookmarks {
        assert_eq!(bookmark["object"]["kind"], "Pod");
        assert_eq!(bookmark["object"]["apiVersion"], "v1");
    }
    let version = |event: &Value| event["object"]["metadata"]["resourceVersion"].clone();
    assert_eq!(version(bookmarks[0]), json!(start_version));
    let b_version = json!(b_version.expect("b was applied"));
    assert_eq!(version(bookmarks[bookmarks.len() - 1]), b_version);
    let added: Vec<_> = events.iter().filter(|e| e["type"] == "ADDED").collect();
    assert_eq!(added.len(), 1, "{events:?}");
    assert_eq!(added[0]["object"]["metadata"]["name"], "b");
    assert_eq!(version(added[0]), b_version);
}

#[tokio::test]
async fn client_can_create_replace_delete_and_read_every_served_kind() {
    let server = ApiServer::start();
    let client = server.client().await;

    let namespaces = Api::<Namespace>::all(client.clone());
    let mesh: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "mesh"}})).expect("namespace");
    namespaces
        .create(&PostParams::default(), &mesh)
        .await
        .expect("create namespace");
    assert!(server.get("Namespace", "", "mesh").is_some());

    let services = Api::<Service>::namespaced(client.clone(), "mesh");
    let web: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]},
    }))
    .expect("service");
    let created = services
        .create(&PostParams::default(), &web)
        .await
        .expect("create service");
    assert!(created.uid().is_some());
    assert_eq!(created.namespace().as_deref(), Some("mesh"));
    let again = services.create(&PostParams::default(), &web).await;
    assert_eq!(api_error_code(again), 409, "it exists already");

    let mut stale = created.clone();
    server.apply(json!({"kind": "Service", "metadata": {"name": "web", "namespace": "mesh"}}));
    stale.spec.get_or_insert_default().cluster_ip = Some("10.96.0.10".to_owned());
    let conflict = services
        .replace("web", &PostParams::default(), &stale)
        .await;
    assert_eq!(
        api_error_code(conflict),
        409,
        "replacing from an old version"
    );
    let current = services.get("web").await.expect("get service");
    assert_eq!(current.uid(), created.uid(), "a replace keeps the uid");

    services
        .delete("web", &Default::default())
        .await
        .expect("delete service");
    assert!(server.get("Service", "mesh", "web").is_none());
    assert_eq!(api_error_code(services.get("web").await), 404);

    server.apply(json!({
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": "web-1", "namespace": "mesh"},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.0.10"]}],
    }));
    let slices = Api::<EndpointSlice>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list endpoint slices");
    assert_eq!(names(slices), ["mesh/web-1"]);

    let policy_kind = GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy");
    let policies_resource =
        ApiResource::from_gvk_with_plural(&policy_kind, "authorizationpolicies");
    server.apply(json!({
        "kind": "AuthorizationPolicy",
        "apiVersion": "security.istio.io/v1",
        "metadata": {"name": "deny-all", "namespace": "mesh"},
        "spec": {},
    }));
    let policies =
        Api::<DynamicObject>::namespaced_with(client.clone(), "mesh", &policies_resource)
            .list(&ListParams::default())
            .await
            .expect("list authorization policies");
    assert_eq!(names(policies.items.iter().cloned()), ["mesh/deny-all"]);
    assert_eq!(policies.items[0].data["spec"], json!({}));

    let widgets = Request::get("/apis/example.com/v1/widgets")
        .body(Vec::new())
        .expect("request");
    let unknown = client.request::<Value>(widgets).await;
    assert_eq!(
        api_error_code(unknown),
        404,
        "an unknown path is a 404 Status"
    );
}
