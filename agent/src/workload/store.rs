//! The workload store: every object the sources deliver, indexed for the questions the data
//! path asks on every connection: who owns IP x? which endpoints serve VIP:port?
//!
//! Reads take a shared lock and clone an `Arc`: no allocation per lookup. Writes (source
//! events) take the exclusive lock, update the object and the indexes it touches, and bump a
//! generation that subscribers ([`Store::subscribe`]) wait on.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use serde::Serialize;
use tokio::sync::watch;

use super::model::{
    EndpointSlice, Kind, Namespace, Object, ObjectKey, Pod, Policy, Service, TargetPort, selects,
};

/// The ready endpoints of one service port.
pub type Endpoints = Arc<[SocketAddr]>;

#[derive(Debug, Default)]
struct State {
    namespaces: HashMap<String, Arc<Namespace>>,
    pods: HashMap<ObjectKey, Arc<Pod>>,
    pods_by_ip: HashMap<IpAddr, Arc<Pod>>,
    services: HashMap<ObjectKey, Arc<Service>>,
    slices: HashMap<ObjectKey, Arc<EndpointSlice>>,
    /// (namespace, service name) -> its slices' keys.
    slices_by_service: HashMap<ObjectKey, Vec<ObjectKey>>,
    /// (cluster IP, service port) -> service and ready endpoints.
    vips: HashMap<SocketAddr, (Arc<Service>, Endpoints)>,
    /// Ready endpoint (pod IP, target port) -> the services it serves.
    services_by_endpoint: HashMap<SocketAddr, Vec<Arc<Service>>>,
    /// Service -> the endpoints it is indexed under in `services_by_endpoint`.
    endpoints_by_service: HashMap<ObjectKey, Vec<SocketAddr>>,
    policies: BTreeMap<(Kind, ObjectKey), Arc<Policy>>,
}

/// The shared, indexed view of the cluster.
#[derive(Debug)]
pub struct Store {
    state: RwLock<State>,
    generation: watch::Sender<u64>,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            state: RwLock::default(),
            generation: watch::Sender::new(0),
        }
    }
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A receiver that changes whenever the store does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn changed(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Adds or replaces one object.
    pub fn upsert(&self, object: Object) {
        {
            let mut state = self.write();
            state.insert(object);
        }
        self.changed();
    }

    /// Removes one object; removing what is not there is not an error.
    pub fn delete(&self, kind: Kind, key: &ObjectKey) {
        {
            let mut state = self.write();
            state.remove(kind, key);
        }
        self.changed();
    }

    /// Replaces every object of `kind` with `objects` (a source's full list after a
    /// (re)connect, or a reloaded file): objects not in the list are removed.
    pub fn replace(&self, kind: Kind, objects: Vec<Object>) {
        {
            let mut state = self.write();
            let wanted: std::collections::HashSet<ObjectKey> =
                objects.iter().map(Object::key).collect();
            for key in state.keys(kind) {
                if !wanted.contains(&key) {
                    state.remove(kind, &key);
                }
            }
            for object in objects {
                debug_assert_eq!(object.kind(), kind);
                state.insert(object);
            }
        }
        self.changed();
    }

    /// The pod that owns `ip`.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<Arc<Pod>> {
        self.read().pods_by_ip.get(&ip.to_canonical()).cloned()
    }

    /// The service behind `vip:port` and its ready endpoints (target port applied).
    pub fn service_by_vip(&self, vip: SocketAddr) -> Option<(Arc<Service>, Endpoints)> {
        let vip = SocketAddr::new(vip.ip().to_canonical(), vip.port());
        self.read().vips.get(&vip).cloned()
    }

    /// The Service of `namespace` that the ready endpoint `pod IP:port` serves (the first by
    /// name, when several do): how the destination names the Service of a connection whose
    /// client addressed its pod through a tunnel. Only the pod's own namespace counts: a
    /// Service elsewhere can list any address in a hand-written EndpointSlice.
    pub fn service_by_endpoint(
        &self,
        endpoint: SocketAddr,
        namespace: &str,
    ) -> Option<Arc<Service>> {
        let endpoint = SocketAddr::new(endpoint.ip().to_canonical(), endpoint.port());
        self.read()
            .services_by_endpoint
            .get(&endpoint)?
            .iter()
            .filter(|s| s.key.namespace == namespace)
            .min_by(|a, b| a.key.cmp(&b.key))
            .cloned()
    }

    /// A namespace by name.
    pub fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.read().namespaces.get(name).cloned()
    }

    /// Every namespace (sorted by name).
    pub fn namespaces(&self) -> Vec<Arc<Namespace>> {
        let mut namespaces: Vec<_> = self.read().namespaces.values().cloned().collect();
        namespaces.sort_by(|a, b| a.name.cmp(&b.name));
        namespaces
    }

    /// A pod by namespace and name.
    pub fn pod(&self, key: &ObjectKey) -> Option<Arc<Pod>> {
        self.read().pods.get(key).cloned()
    }

    /// Every pod (sorted by key).
    pub fn pods(&self) -> Vec<Arc<Pod>> {
        let mut pods: Vec<_> = self.read().pods.values().cloned().collect();
        pods.sort_by(|a, b| a.key.cmp(&b.key));
        pods
    }

    /// Every policy object, in (kind, namespace, name) order.
    pub fn policies(&self) -> Vec<Arc<Policy>> {
        self.read().policies.values().cloned().collect()
    }

    /// Counts of each kind held.
    pub fn counts(&self) -> BTreeMap<Kind, usize> {
        let state = self.read();
        Kind::ALL
            .iter()
            .map(|&kind| (kind, state.keys(kind).len()))
            .collect()
    }

    /// Everything, as sorted JSON: for `config_dump` and for comparing stores in tests.
    pub fn dump(&self) -> serde_json::Value {
        fn sorted<'a, T: Serialize + 'a>(
            items: impl Iterator<Item = &'a Arc<T>>,
        ) -> serde_json::Value {
            let mut values: Vec<serde_json::Value> = items
                .map(|item| serde_json::to_value(item.as_ref()).unwrap_or_default())
                .collect();
            values.sort_by_key(ToString::to_string);
            serde_json::Value::Array(values)
        }
        let state = self.read();
        serde_json::json!({
            "namespaces": sorted(state.namespaces.values()),
            "pods": sorted(state.pods.values()),
            "services": sorted(state.services.values()),
            "endpointSlices": sorted(state.slices.values()),
            "policies": sorted(state.policies.values()),
        })
    }
}

impl State {
    fn keys(&self, kind: Kind) -> Vec<ObjectKey> {
        match kind {
            Kind::Namespace => self
                .namespaces
                .keys()
                .map(|n| ObjectKey::new("", n.clone()))
                .collect(),
            Kind::Pod => self.pods.keys().cloned().collect(),
            Kind::Service => self.services.keys().cloned().collect(),
            Kind::EndpointSlice => self.slices.keys().cloned().collect(),
            Kind::AuthorizationPolicy | Kind::PeerAuthentication => self
                .policies
                .keys()
                .filter(|(k, _)| *k == kind)
                .map(|(_, key)| key.clone())
                .collect(),
        }
    }

    fn insert(&mut self, object: Object) {
        let kind = object.kind();
        let key = object.key();
        self.remove(kind, &key);
        match object {
            Object::Namespace(namespace) => {
                self.namespaces
                    .insert(namespace.name.clone(), Arc::new(namespace));
            }
            Object::Pod(pod) => {
                let pod = Arc::new(pod);
                if !pod.host_network && pod.is_live() {
                    for ip in &pod.ips {
                        self.pods_by_ip.insert(ip.to_canonical(), pod.clone());
                    }
                }
                self.pods.insert(key, pod);
            }
            Object::Service(service) => {
                self.services.insert(key.clone(), Arc::new(service));
                self.reindex_service(&key);
            }
            Object::EndpointSlice(slice) => {
                let service = ObjectKey::new(slice.key.namespace.clone(), slice.service.clone());
                self.slices_by_service
                    .entry(service.clone())
                    .or_default()
                    .push(key.clone());
                self.slices.insert(key, Arc::new(slice));
                self.reindex_service(&service);
            }
            Object::Policy(policy) => {
                self.policies.insert((kind, key), Arc::new(policy));
            }
        }
    }

    fn remove(&mut self, kind: Kind, key: &ObjectKey) {
        match kind {
            Kind::Namespace => {
                self.namespaces.remove(&key.name);
            }
            Kind::Pod => {
                if let Some(pod) = self.pods.remove(key) {
                    for ip in &pod.ips {
                        // Only if the index still points at this pod (IPs are reused).
                        if self
                            .pods_by_ip
                            .get(&ip.to_canonical())
                            .is_some_and(|p| Arc::ptr_eq(p, &pod))
                        {
                            self.pods_by_ip.remove(&ip.to_canonical());
                        }
                    }
                }
            }
            Kind::Service => {
                if let Some(service) = self.services.remove(key) {
                    self.unindex_service(&service);
                }
            }
            Kind::EndpointSlice => {
                if let Some(slice) = self.slices.remove(key) {
                    let service = ObjectKey::new(key.namespace.clone(), slice.service.clone());
                    if let Some(keys) = self.slices_by_service.get_mut(&service) {
                        keys.retain(|k| k != key);
                        if keys.is_empty() {
                            self.slices_by_service.remove(&service);
                        }
                    }
                    self.reindex_service(&service);
                }
            }
            Kind::AuthorizationPolicy | Kind::PeerAuthentication => {
                self.policies.remove(&(kind, key.clone()));
            }
        }
    }

    /// Removes `service` from the VIP and endpoint indexes.
    fn unindex_service(&mut self, service: &Arc<Service>) {
        self.vips.retain(|_, (s, _)| !Arc::ptr_eq(s, service));
        for endpoint in self
            .endpoints_by_service
            .remove(&service.key)
            .unwrap_or_default()
        {
            if let Some(services) = self.services_by_endpoint.get_mut(&endpoint) {
                services.retain(|s| !Arc::ptr_eq(s, service));
                if services.is_empty() {
                    self.services_by_endpoint.remove(&endpoint);
                }
            }
        }
    }

    /// Recomputes the VIP index entries of one service from its slices.
    fn reindex_service(&mut self, key: &ObjectKey) {
        let Some(service) = self.services.get(key).cloned() else {
            return;
        };
        self.unindex_service(&service);
        let slices: Vec<Arc<EndpointSlice>> = self
            .slices_by_service
            .get(key)
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| self.slices.get(k).cloned())
                    .collect()
            })
            .unwrap_or_default();
        for port in service.ports.iter().filter(|p| p.protocol == "TCP") {
            let mut endpoints = Vec::new();
            for slice in &slices {
                let Some(slice_port) = slice.ports.iter().find(|p| p.name == port.name) else {
                    continue;
                };
                for endpoint in slice.endpoints.iter().filter(|e| e.ready) {
                    for ip in &endpoint.addresses {
                        endpoints.push(SocketAddr::new(ip.to_canonical(), slice_port.port));
                    }
                }
            }
            endpoints.sort();
            endpoints.dedup();
            for endpoint in &endpoints {
                let services = self.services_by_endpoint.entry(*endpoint).or_default();
                if !services.iter().any(|s| Arc::ptr_eq(s, &service)) {
                    services.push(service.clone());
                    self.endpoints_by_service
                        .entry(service.key.clone())
                        .or_default()
                        .push(*endpoint);
                }
            }
            let endpoints: Endpoints = endpoints.into();
            for vip in &service.cluster_ips {
                self.vips.insert(
                    SocketAddr::new(vip.to_canonical(), port.port),
                    (service.clone(), endpoints.clone()),
                );
            }
        }
    }
}

/// EndpointSlices for services that have a selector but no slice of their own, computed from
/// the pods they select (what the EndpointSlice controller would write). The file source uses
/// this; a cluster has the controller.
pub fn slices_from_selectors(objects: &[Object]) -> Vec<Object> {
    let has_slice: std::collections::HashSet<ObjectKey> = objects
        .iter()
        .filter_map(|o| match o {
            Object::EndpointSlice(s) => {
                Some(ObjectKey::new(s.key.namespace.clone(), s.service.clone()))
            }
            _ => None,
        })
        .collect();
    let pods: Vec<&Pod> = objects
        .iter()
        .filter_map(|o| {
            if let Object::Pod(p) = o {
                Some(p)
            } else {
                None
            }
        })
        .collect();
    objects
        .iter()
        .filter_map(|o| match o {
            Object::Service(s) if !has_slice.contains(&s.key) => {
                s.selector.as_ref().map(|sel| (s, sel))
            }
            _ => None,
        })
        .map(|(service, selector)| {
            let selected: Vec<&&Pod> = pods
                .iter()
                .filter(|p| {
                    p.key.namespace == service.key.namespace && selects(selector, &p.labels)
                })
                .collect();
            let ports = service
                .ports
                .iter()
                .map(|p| super::model::EndpointPort {
                    name: p.name.clone(),
                    // Named target ports need the pod's container ports, which the model does
                    // not keep: fall back to the service port.
                    port: match p.target_port {
                        TargetPort::Number(n) => n,
                        TargetPort::Name(_) => p.port,
                    },
                })
                .collect();
            let endpoints = selected
                .iter()
                .filter(|p| p.is_live() && !p.host_network)
                .map(|p| super::model::Endpoint {
                    addresses: p.ips.clone(),
                    ready: p.ready,
                    target_pod: Some(p.key.clone()),
                })
                .collect();
            Object::EndpointSlice(EndpointSlice {
                key: ObjectKey::new(
                    service.key.namespace.clone(),
                    format!("{}-meshlet-file", service.key.name),
                ),
                service: service.key.name.clone(),
                ports,
                endpoints,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::model::{Endpoint, EndpointPort, ServicePort};

    fn pod(ns: &str, name: &str, ip: &str) -> Pod {
        Pod {
            key: ObjectKey::new(ns, name),
            uid: format!("uid-{name}"),
            labels: [("app".to_owned(), name.to_owned())].into(),
            annotations: Labels::new(),
            service_account: "default".into(),
            node_name: Some("node-0".into()),
            ips: vec![ip.parse().unwrap()],
            host_network: false,
            phase: "Running".into(),
            ready: true,
            owner: None,
            names: Default::default(),
        }
    }

    fn service(ns: &str, name: &str, vip: &str, port: u16, target: u16) -> Service {
        Service {
            key: ObjectKey::new(ns, name),
            cluster_ips: vec![vip.parse().unwrap()],
            ports: vec![ServicePort {
                name: "http".into(),
                port,
                target_port: TargetPort::Number(target),
                protocol: "TCP".into(),
            }],
            selector: Some([("app".to_owned(), "server".to_owned())].into()),
            names: Default::default(),
        }
    }

    use crate::workload::model::Labels;

    fn store_slice(store: &Store, ns: &str, name: &str) -> EndpointSlice {
        let state = store.read();
        (*state.slices[&ObjectKey::new(ns, name)]).clone()
    }

    #[test]
    fn ip_lookup_follows_pod_changes_and_ip_reuse() {
        let store = Store::new();
        store.upsert(Object::Pod(pod("a", "one", "10.0.0.1")));
        assert_eq!(
            store
                .pod_by_ip("10.0.0.1".parse().unwrap())
                .unwrap()
                .key
                .name,
            "one"
        );
        assert_eq!(
            store
                .pod_by_ip("::ffff:10.0.0.1".parse().unwrap())
                .unwrap()
                .key
                .name,
            "one",
            "v4-mapped"
        );
        // The IP moves to a new pod before the old one's deletion arrives.
        store.upsert(Object::Pod(pod("a", "two", "10.0.0.1")));
        store.delete(Kind::Pod, &ObjectKey::new("a", "one"));
        assert_eq!(
            store
                .pod_by_ip("10.0.0.1".parse().unwrap())
                .unwrap()
                .key
                .name,
            "two"
        );
        store.delete(Kind::Pod, &ObjectKey::new("a", "two"));
        assert!(store.pod_by_ip("10.0.0.1".parse().unwrap()).is_none());
    }

    #[test]
    fn host_network_and_finished_pods_own_no_ip() {
        let store = Store::new();
        let mut host = pod("a", "host", "172.18.0.2");
        host.host_network = true;
        let mut done = pod("a", "done", "10.0.0.9");
        done.phase = "Succeeded".into();
        store.upsert(Object::Pod(host));
        store.upsert(Object::Pod(done));
        assert!(store.pod_by_ip("172.18.0.2".parse().unwrap()).is_none());
        assert!(store.pod_by_ip("10.0.0.9".parse().unwrap()).is_none());
        assert_eq!(store.pods().len(), 2);
    }

    #[test]
    fn vip_lookup_gives_ready_endpoints_on_the_target_port() {
        let store = Store::new();
        store.upsert(Object::Service(service("a", "web", "10.96.0.10", 80, 8080)));
        let slice = EndpointSlice {
            key: ObjectKey::new("a", "web-abc"),
            service: "web".into(),
            ports: vec![EndpointPort {
                name: "http".into(),
                port: 8080,
            }],
            endpoints: vec![
                Endpoint {
                    addresses: vec!["10.0.0.1".parse().unwrap()],
                    ready: true,
                    target_pod: None,
                },
                Endpoint {
                    addresses: vec!["10.0.0.2".parse().unwrap()],
                    ready: false,
                    target_pod: None,
                },
            ],
        };
        store.upsert(Object::EndpointSlice(slice));
        let (svc, endpoints) = store
            .service_by_vip("10.96.0.10:80".parse().unwrap())
            .unwrap();
        assert_eq!(svc.key.name, "web");
        assert_eq!(
            &*endpoints,
            &["10.0.0.1:8080".parse::<SocketAddr>().unwrap()]
        );
        assert!(
            store
                .service_by_vip("10.96.0.10:81".parse().unwrap())
                .is_none()
        );
        // The destination's view: which Service a ready endpoint serves.
        let served_by = |endpoint: &str| {
            store
                .service_by_endpoint(endpoint.parse().unwrap(), "a")
                .map(|s| s.key.name.clone())
        };
        assert_eq!(served_by("10.0.0.1:8080").as_deref(), Some("web"));
        assert_eq!(served_by("[::ffff:10.0.0.1]:8080").as_deref(), Some("web"));
        assert_eq!(served_by("10.0.0.1:9090"), None, "another port");
        assert_eq!(served_by("10.0.0.2:8080"), None, "not ready");
        // A second Service of the same endpoint: the first by name answers, until it goes.
        store.upsert(Object::Service(service("a", "api", "10.96.0.11", 80, 8080)));
        store.upsert(Object::EndpointSlice(EndpointSlice {
            key: ObjectKey::new("a", "api-abc"),
            service: "api".into(),
            ..store_slice(&store, "a", "web-abc")
        }));
        assert_eq!(served_by("10.0.0.1:8080").as_deref(), Some("api"));
        // A Service of another namespace listing the same address in a hand-written slice
        // does not name the pod's connections.
        store.upsert(Object::Service(service(
            "aaa",
            "decoy",
            "10.96.0.12",
            80,
            8080,
        )));
        store.upsert(Object::EndpointSlice(EndpointSlice {
            key: ObjectKey::new("aaa", "decoy-abc"),
            service: "decoy".into(),
            ..store_slice(&store, "a", "web-abc")
        }));
        assert_eq!(served_by("10.0.0.1:8080").as_deref(), Some("api"));
        store.delete(Kind::Service, &ObjectKey::new("a", "api"));
        assert_eq!(served_by("10.0.0.1:8080").as_deref(), Some("web"));
        store.delete(Kind::EndpointSlice, &ObjectKey::new("a", "web-abc"));
        assert_eq!(served_by("10.0.0.1:8080"), None);
        assert!(
            store
                .service_by_vip("10.96.0.10:80".parse().unwrap())
                .unwrap()
                .1
                .is_empty()
        );
        store.delete(Kind::Service, &ObjectKey::new("a", "web"));
        assert!(
            store
                .service_by_vip("10.96.0.10:80".parse().unwrap())
                .is_none()
        );
    }

    #[test]
    fn replace_removes_what_the_new_list_lacks_and_notifies() {
        let store = Store::new();
        let mut changes = store.subscribe();
        store.upsert(Object::Pod(pod("a", "one", "10.0.0.1")));
        store.upsert(Object::Pod(pod("a", "two", "10.0.0.2")));
        store.replace(
            Kind::Pod,
            vec![
                Object::Pod(pod("a", "two", "10.0.0.2")),
                Object::Pod(pod("a", "three", "10.0.0.3")),
            ],
        );
        let names: Vec<_> = store.pods().iter().map(|p| p.key.name.clone()).collect();
        assert_eq!(names, ["three", "two"]);
        assert!(store.pod_by_ip("10.0.0.1".parse().unwrap()).is_none());
        assert!(changes.has_changed().unwrap());
        assert_eq!(*changes.borrow_and_update(), 3);
    }

    #[test]
    fn services_without_slices_get_endpoints_from_their_selector() {
        let objects = vec![
            Object::Service(service("a", "web", "10.96.0.10", 80, 8080)),
            Object::Pod(pod("a", "server", "10.0.0.5")),
            Object::Pod(pod("a", "client", "10.0.0.6")),
            Object::Pod(pod("b", "server", "10.0.1.5")),
        ];
        let slices = slices_from_selectors(&objects);
        assert_eq!(slices.len(), 1);
        let store = Store::new();
        for object in objects.into_iter().chain(slices) {
            store.upsert(object);
        }
        let (_, endpoints) = store
            .service_by_vip("10.96.0.10:80".parse().unwrap())
            .unwrap();
        assert_eq!(
            &*endpoints,
            &["10.0.0.5:8080".parse::<SocketAddr>().unwrap()]
        );
    }
}
