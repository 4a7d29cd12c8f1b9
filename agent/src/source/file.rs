//! `--source file:<path>`: multi-document Kubernetes YAML (Namespace, Pod, Service,
//! EndpointSlice, AuthorizationPolicy, PeerAuthentication), the same objects a cluster holds.
//!
//! The file is re-read when its content changes (checked every 200 ms: robust against editors
//! that replace the file, and cheap). A file that does not parse keeps the last good state, and
//! the log says which document and which field is wrong. Services with a selector and no
//! EndpointSlice get endpoints from the pods they select (there is no EndpointSlice controller).
//! Several agents can share one file: each serves the pods whose `spec.nodeName` is its node.

use std::{path::Path, sync::Arc, time::Duration};

use k8s_openapi::{api::discovery::v1 as discovery, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use serde::{Deserialize, de::DeserializeOwned};
use tracing::{info, warn};

use super::{SyncState, convert};
use crate::workload::{
    Store,
    model::{Kind, Object, PolicyKind},
    store::slices_from_selectors,
};

/// Why a file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A document is not valid YAML, or not an object this source understands.
    #[error("document {index}{what}: {message}")]
    Document {
        /// Position of the document in the file, from 1.
        index: usize,
        /// ` (Kind namespace/name)` when known.
        what: String,
        /// What is wrong, starting with the field's path when there is one.
        message: String,
    },
}

/// A custom resource as the file holds it: metadata and a free-form spec.
#[derive(Debug, Deserialize)]
struct CustomResource {
    metadata: ObjectMeta,
    spec: Option<serde_json::Value>,
}

/// Parses the text of a file into objects (plus the EndpointSlices selectors imply).
pub fn parse(text: &str) -> Result<Vec<Object>, FileError> {
    let mut objects = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let yaml = serde_yaml::Value::deserialize(document).map_err(|err| FileError::Document {
            index,
            what: String::new(),
            message: err.to_string(),
        })?;
        if yaml.is_null() {
            continue; // an empty document (`---` at the end)
        }
        let json = serde_json::to_value(&yaml).map_err(|err| FileError::Document {
            index,
            what: String::new(),
            message: err.to_string(),
        })?;
        objects.push(object(index, json)?);
    }
    objects.extend(slices_from_selectors(&objects));
    Ok(objects)
}

fn object(index: usize, json: serde_json::Value) -> Result<Object, FileError> {
    let text = |field: &str| {
        json.get(field)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let (kind, api_version) = (text("kind"), text("apiVersion"));
    let meta = json.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|v| v.as_str())
        .unwrap_or("?");
    let what = match meta
        .and_then(|m| m.get("namespace"))
        .and_then(|v| v.as_str())
    {
        Some(ns) => format!(" ({kind} {ns}/{name})"),
        None => format!(" ({kind} {name})"),
    };
    let fail = |message: String| FileError::Document {
        index,
        what: what.clone(),
        message,
    };
    let converted =
        |result: Result<Object, convert::ConvertError>| result.map_err(|e| fail(e.to_string()));
    let object = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => {
            converted(convert::namespace(&decode(&json).map_err(fail)?).map(Object::Namespace))?
        }
        ("v1", "Pod") => converted(convert::pod(&decode(&json).map_err(fail)?).map(Object::Pod))?,
        ("v1", "Service") => {
            converted(convert::service(&decode(&json).map_err(fail)?).map(Object::Service))?
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => converted(
            convert::endpoint_slice(&decode::<discovery::EndpointSlice>(&json).map_err(fail)?)
                .map(Object::EndpointSlice),
        )?,
        (
            "security.istio.io/v1" | "security.istio.io/v1beta1",
            "AuthorizationPolicy" | "PeerAuthentication",
        ) => {
            let resource = decode::<CustomResource>(&json).map_err(fail)?;
            let policy_kind = if kind == "AuthorizationPolicy" {
                PolicyKind::AuthorizationPolicy
            } else {
                PolicyKind::PeerAuthentication
            };
            converted(
                convert::policy(policy_kind, &resource.metadata, resource.spec.as_ref())
                    .map(Object::Policy),
            )?
        }
        ("", _) | (_, "") => return Err(fail("apiVersion and kind are required".into())),
        _ => {
            return Err(fail(format!(
                "{api_version} {kind} is not a kind meshlet reads"
            )));
        }
    };
    Ok(object)
}

/// Deserializes with the failing field's path in the message (`spec.nodeName: invalid type`).
fn decode<T: DeserializeOwned>(json: &serde_json::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(json).map_err(|err| {
        let path = err.path().to_string();
        if path == "." {
            err.inner().to_string()
        } else {
            format!("{path}: {}", err.inner())
        }
    })
}

/// Reads and parses the file at `path`.
pub fn load(path: &Path) -> Result<Vec<Object>, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text)
}

/// Puts `objects` in the store, replacing every kind.
pub fn apply(store: &Store, objects: Vec<Object>) {
    for kind in Kind::ALL {
        let of_kind = objects
            .iter()
            .filter(|o| o.kind() == kind)
            .cloned()
            .collect();
        store.replace(kind, of_kind);
    }
}

/// Loads the file into the store and keeps it in step with the file until the task is dropped.
pub async fn run(path: std::path::PathBuf, store: Arc<Store>, sync: Arc<SyncState>) {
    let mut last: Option<Vec<u8>> = None;
    let mut interval = tokio::time::interval(Duration::from_millis(200));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(err) => {
                if last.is_some() || !sync.synced() {
                    warn!(path = %path.display(), %err, "cannot read the workload file; keeping the last good state");
                }
                last = Some(Vec::new());
                continue;
            }
        };
        if last.as_deref() == Some(&bytes[..]) {
            continue;
        }
        last = Some(bytes.clone());
        match parse(&String::from_utf8_lossy(&bytes)) {
            Ok(objects) => {
                let count = objects.len();
                apply(&store, objects);
                sync.set_all(true);
                info!(path = %path.display(), objects = count, "workload file loaded");
            }
            Err(err) => {
                warn!(path = %path.display(), %err, "workload file rejected; keeping the last good state")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {meshlet.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: demo, uid: u-server, labels: {app: server}}
spec: {nodeName: node-1, serviceAccountName: server, containers: [{name: app, image: x}]}
status: {phase: Running, podIPs: [{ip: 10.244.1.11}], conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: demo}
spec: {clusterIP: 10.96.0.20, selector: {app: server}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: demo}
spec: {action: DENY, rules: [{}]}
---
"#;

    #[test]
    fn parses_every_kind_and_derives_endpoints() {
        let objects = parse(GOOD).unwrap();
        let kinds: Vec<Kind> = objects.iter().map(Object::kind).collect();
        assert_eq!(
            kinds,
            [
                Kind::Namespace,
                Kind::Pod,
                Kind::Service,
                Kind::AuthorizationPolicy,
                Kind::EndpointSlice
            ]
        );
        let store = Store::new();
        apply(&store, objects);
        let (_, endpoints) = store
            .service_by_vip("10.96.0.20:80".parse().unwrap())
            .unwrap();
        assert_eq!(&*endpoints, &["10.244.1.11:8080".parse().unwrap()]);
    }

    #[test]
    fn errors_name_the_document_and_the_field() {
        let bad = GOOD.replace("nodeName: node-1", "nodeName: [node-1]");
        let err = parse(&bad).unwrap_err().to_string();
        assert!(
            err.starts_with("document 2 (Pod demo/server): spec.nodeName: invalid type"),
            "{err}"
        );

        let bad = GOOD.replace(
            "podIPs: [{ip: 10.244.1.11}]",
            "podIPs: [{ip: 10.244.1.300}]",
        );
        let err = parse(&bad).unwrap_err().to_string();
        assert!(
            err.contains("document 2 (Pod demo/server): status.podIPs[0].ip"),
            "{err}"
        );

        let err = parse("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("v1 ConfigMap is not a kind meshlet reads"),
            "{err}"
        );

        let err = parse("kind: Pod\n  bad indent: [\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("document 1: "), "{err}");
    }
}
