//! `--source kube`: kube-runtime watchers, one per kind, feeding the store.
//!
//! Each watcher lists, then watches from the list's resourceVersion; on `410 Gone` (or any
//! watch it cannot resume) kube-runtime lists again, and the full list replaces that kind in
//! the store, so nothing stale survives a disconnect and nothing missed stays missing. Errors
//! back off exponentially. A kind counts as synced once its first list is in the store, and
//! stops counting while its watcher is failing.

use std::{fmt::Debug, sync::Arc};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use kube::{
    Api, Client, Resource,
    api::{DynamicObject, Patch, PatchParams},
    core::{ApiResource, GroupVersionKind},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tracing::{debug, warn};

use super::{SyncState, convert};
use crate::workload::{
    Store,
    model::{
        ISTIO_REDIRECTION_ANNOTATION, Kind, Object, ObjectKey, PolicyKind, REDIRECTION_ANNOTATION,
        REDIRECTION_ENABLED,
    },
};

/// Runs a watcher for every kind until the task is dropped.
pub async fn run(client: Client, store: Arc<Store>, sync: Arc<SyncState>) {
    let istio = |kind: &str, plural: &str| {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("security.istio.io", "v1", kind),
            plural,
        )
    };
    let authz = istio("AuthorizationPolicy", "authorizationpolicies");
    let peer_authn = istio("PeerAuthentication", "peerauthentications");
    tokio::join!(
        watch(
            Api::<core::Namespace>::all(client.clone()),
            Kind::Namespace,
            &store,
            &sync,
            |o| { convert::namespace(o).map(Object::Namespace) }
        ),
        watch(
            Api::<core::Pod>::all(client.clone()),
            Kind::Pod,
            &store,
            &sync,
            |o| convert::pod(o).map(Object::Pod)
        ),
        watch(
            Api::<core::Service>::all(client.clone()),
            Kind::Service,
            &store,
            &sync,
            |o| { convert::service(o).map(Object::Service) }
        ),
        watch(
            Api::<discovery::EndpointSlice>::all(client.clone()),
            Kind::EndpointSlice,
            &store,
            &sync,
            |o| { convert::endpoint_slice(o).map(Object::EndpointSlice) }
        ),
        watch(
            Api::<DynamicObject>::all_with(client.clone(), &authz),
            Kind::AuthorizationPolicy,
            &store,
            &sync,
            |o| {
                convert::policy(
                    PolicyKind::AuthorizationPolicy,
                    &o.metadata,
                    o.data.get("spec"),
                )
                .map(Object::Policy)
            }
        ),
        watch(
            Api::<DynamicObject>::all_with(client.clone(), &peer_authn),
            Kind::PeerAuthentication,
            &store,
            &sync,
            |o| {
                convert::policy(
                    PolicyKind::PeerAuthentication,
                    &o.metadata,
                    o.data.get("spec"),
                )
                .map(Object::Policy)
            }
        ),
    );
}

async fn watch<K>(
    api: Api<K>,
    kind: Kind,
    store: &Store,
    sync: &SyncState,
    convert: impl Fn(&K) -> Result<Object, convert::ConvertError>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let convert_logged = |object: &K| match convert(object) {
        Ok(converted) => Some(converted),
        Err(err) => {
            let meta = object.meta();
            warn!(?kind, namespace = ?meta.namespace, name = ?meta.name, %err, "ignoring an object meshlet cannot read");
            None
        }
    };
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut initial = Vec::new();
    loop {
        match stream.try_next().await {
            Ok(Some(watcher::Event::Init)) => initial.clear(),
            Ok(Some(watcher::Event::InitApply(object))) => initial.extend(convert_logged(&object)),
            Ok(Some(watcher::Event::InitDone)) => {
                debug!(?kind, objects = initial.len(), "listed");
                store.replace(kind, std::mem::take(&mut initial));
                sync.set(kind, true);
            }
            Ok(Some(watcher::Event::Apply(object))) => {
                if let Some(object) = convert_logged(&object) {
                    store.upsert(object);
                }
                sync.set(kind, true);
            }
            Ok(Some(watcher::Event::Delete(object))) => {
                let meta = object.meta();
                let key = ObjectKey::new(
                    meta.namespace.clone().unwrap_or_else(|| {
                        if kind == Kind::Namespace {
                            String::new()
                        } else {
                            "default".into()
                        }
                    }),
                    meta.name.clone().unwrap_or_default(),
                );
                store.delete(kind, &key);
                sync.set(kind, true);
            }
            Ok(None) => return,
            Err(err) => {
                warn!(?kind, %err, "watch failed; retrying with backoff");
                sync.set(kind, false);
            }
        }
    }
}

/// Records on the pod whether meshlet captures it (`meshlet.io/redirection: enabled`, and with
/// `istio` Istio's `ambient.istio.io/redirection: enabled` too, so that istiod tells ztunnel
/// nodes to reach the pod through HBONE), with a JSON merge patch of those annotations (never an
/// update of the whole object).
pub async fn annotate_redirection(
    client: &Client,
    pod: &ObjectKey,
    enabled: bool,
    istio: bool,
) -> Result<(), kube::Error> {
    let api = Api::<core::Pod>::namespaced(client.clone(), &pod.namespace);
    let value = if enabled {
        serde_json::json!(REDIRECTION_ENABLED)
    } else {
        serde_json::Value::Null
    };
    let mut annotations = serde_json::Map::new();
    annotations.insert(REDIRECTION_ANNOTATION.to_owned(), value.clone());
    if istio {
        annotations.insert(ISTIO_REDIRECTION_ANNOTATION.to_owned(), value);
    }
    let patch = serde_json::json!({ "metadata": { "annotations": annotations } });
    api.patch(&pod.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
}
