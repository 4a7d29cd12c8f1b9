//! Kubernetes objects (k8s-openapi types, or JSON for the Istio kinds) into the workload
//! model. Both sources use these functions: the same object gives the same model whether it
//! came from the API server or from a file.

use std::net::IpAddr;

use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use crate::workload::model::{
    DRY_RUN_ANNOTATION, Endpoint, EndpointPort, EndpointSlice, Labels, Namespace, ObjectKey, Owner,
    Pod, Policy, PolicyKind, Service, ServicePort, TargetPort,
};

/// Label linking an EndpointSlice to its service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// An object that cannot be turned into the model, and which field is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConvertError {
    /// The field's path (`status.podIPs[0].ip`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

fn error(field: impl Into<String>, message: impl Into<String>) -> ConvertError {
    ConvertError {
        field: field.into(),
        message: message.into(),
    }
}

fn name(meta: &ObjectMeta) -> Result<String, ConvertError> {
    meta.name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| error("metadata.name", "missing"))
}

fn key(meta: &ObjectMeta) -> Result<ObjectKey, ConvertError> {
    Ok(ObjectKey::new(
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name(meta)?,
    ))
}

fn labels(map: &Option<std::collections::BTreeMap<String, String>>) -> Labels {
    map.clone().unwrap_or_default()
}

fn ip(text: &str, field: &str) -> Result<IpAddr, ConvertError> {
    text.parse()
        .map_err(|_| error(field, format!("{text:?} is not an IP address")))
}

fn port(value: i32, field: &str) -> Result<u16, ConvertError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| error(field, format!("{value} is not a port")))
}

/// A Namespace.
pub fn namespace(ns: &core::Namespace) -> Result<Namespace, ConvertError> {
    Ok(Namespace {
        name: name(&ns.metadata)?,
        labels: labels(&ns.metadata.labels),
    })
}

/// A Pod.
pub fn pod(pod: &core::Pod) -> Result<Pod, ConvertError> {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let mut ips = Vec::new();
    if let Some(pod_ips) = status.and_then(|s| s.pod_ips.as_ref()) {
        for (i, pod_ip) in pod_ips.iter().enumerate() {
            ips.push(ip(&pod_ip.ip, &format!("status.podIPs[{i}].ip"))?);
        }
    }
    if ips.is_empty()
        && let Some(pod_ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .filter(|s| !s.is_empty())
    {
        ips.push(ip(pod_ip, "status.podIP")?);
    }
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
    Ok(Pod {
        key: key(&pod.metadata)?,
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        labels: labels(&pod.metadata.labels),
        annotations: labels(&pod.metadata.annotations),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|sa| !sa.is_empty())
            .unwrap_or_else(|| "default".into()),
        node_name: spec
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty()),
        ips,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        phase: status
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Pending".into()),
        ready,
        owner: pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|owner| owner.controller == Some(true))
            .map(|owner| Owner {
                kind: owner.kind.clone(),
                name: owner.name.clone(),
            }),
        names: Default::default(),
    })
}

/// A Service.
pub fn service(svc: &core::Service) -> Result<Service, ConvertError> {
    let spec = svc.spec.clone().unwrap_or_default();
    let mut cluster_ips = Vec::new();
    let listed = spec.cluster_ips.clone().unwrap_or_default();
    let single = spec
        .cluster_ip
        .clone()
        .into_iter()
        .filter(|_| listed.is_empty());
    for (i, text) in listed.iter().cloned().chain(single).enumerate() {
        if text != "None" && !text.is_empty() {
            cluster_ips.push(ip(&text, &format!("spec.clusterIPs[{i}]"))?);
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.unwrap_or_default().iter().enumerate() {
        let number = port(p.port, &format!("spec.ports[{i}].port"))?;
        let target_port = match &p.target_port {
            None => TargetPort::Number(number),
            Some(IntOrString::Int(n)) => {
                TargetPort::Number(port(*n, &format!("spec.ports[{i}].targetPort"))?)
            }
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => TargetPort::Number(port(n, &format!("spec.ports[{i}].targetPort"))?),
                Err(_) => TargetPort::Name(s.clone()),
            },
        };
        ports.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            port: number,
            target_port,
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
        });
    }
    Ok(Service {
        key: key(&svc.metadata)?,
        cluster_ips,
        ports,
        selector: spec.selector,
        names: Default::default(),
    })
}

/// An EndpointSlice.
pub fn endpoint_slice(slice: &discovery::EndpointSlice) -> Result<EndpointSlice, ConvertError> {
    let key = key(&slice.metadata)?;
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL).cloned())
        .ok_or_else(|| error(format!("metadata.labels[{SERVICE_NAME_LABEL}]"), "missing"))?;
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        if let Some(n) = p.port {
            ports.push(EndpointPort {
                name: p.name.clone().unwrap_or_default(),
                port: port(n, &format!("ports[{i}].port"))?,
            });
        }
    }
    let mut endpoints = Vec::new();
    for (i, e) in slice.endpoints.iter().flatten().enumerate() {
        let mut addresses = Vec::new();
        for (j, a) in e.addresses.iter().enumerate() {
            addresses.push(ip(a, &format!("endpoints[{i}].addresses[{j}]"))?);
        }
        let target_pod = e
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| {
                Some(ObjectKey::new(
                    r.namespace.clone().unwrap_or_else(|| key.namespace.clone()),
                    r.name.clone()?,
                ))
            });
        endpoints.push(Endpoint {
            addresses,
            ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
            target_pod,
        });
    }
    Ok(EndpointSlice {
        key,
        service,
        ports,
        endpoints,
    })
}

/// An AuthorizationPolicy or PeerAuthentication, given its metadata and `spec`.
pub fn policy(
    kind: PolicyKind,
    meta: &ObjectMeta,
    spec: Option<&serde_json::Value>,
) -> Result<Policy, ConvertError> {
    let spec = spec
        .cloned()
        .unwrap_or(serde_json::Value::Object(Default::default()));
    if !spec.is_object() {
        return Err(error("spec", "must be an object"));
    }
    let dry_run = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(DRY_RUN_ANNOTATION))
        .cloned();
    Ok(Policy {
        kind,
        key: key(meta)?,
        created: meta.creation_timestamp.as_ref().map(|time| time.0),
        dry_run,
        spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn pod_fields() {
        let pod = pod(&from_json(serde_json::json!({
            "metadata": {"name": "client", "namespace": "demo", "uid": "u-1", "labels": {"app": "client"}},
            "spec": {"nodeName": "node-0", "serviceAccountName": "sleep", "containers": []},
            "status": {"phase": "Running", "podIP": "10.244.0.10",
                       "podIPs": [{"ip": "10.244.0.10"}, {"ip": "fd00:10:244::a"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        })))
        .unwrap();
        assert_eq!(pod.key, ObjectKey::new("demo", "client"));
        assert_eq!(pod.service_account, "sleep");
        assert_eq!(pod.ips.len(), 2);
        assert!(pod.ready && pod.is_live());
        assert_eq!(pod.owner, None);
    }

    #[test]
    fn the_owner_is_the_controller_among_the_owner_references() {
        let owned = |references: serde_json::Value| {
            pod(&from_json(serde_json::json!({
                "metadata": {"name": "cart-7d4b9c8f6-x2kq9", "namespace": "shop",
                             "ownerReferences": references},
                "spec": {"containers": []}
            })))
            .unwrap()
            .owner
        };
        let reference = |kind: &str, name: &str, controller: Option<bool>| {
            serde_json::json!({"apiVersion": "apps/v1", "kind": kind, "name": name,
                               "uid": "u", "controller": controller})
        };
        assert_eq!(
            owned(serde_json::json!([
                reference("ConfigMap", "settings", None),
                reference("ReplicaSet", "cart-7d4b9c8f6", Some(true)),
            ])),
            Some(Owner {
                kind: "ReplicaSet".into(),
                name: "cart-7d4b9c8f6".into()
            })
        );
        assert_eq!(
            owned(serde_json::json!([reference(
                "ReplicaSet",
                "cart",
                Some(false)
            )])),
            None,
            "an owner that is not the controller does not name the workload"
        );
    }

    #[test]
    fn policies_keep_their_age_and_dry_run_annotation() {
        let meta: ObjectMeta = from_json(serde_json::json!({
            "name": "try-deny", "namespace": "demo",
            "creationTimestamp": "2026-12-01T10:00:00Z",
            "annotations": {"istio.io/dry-run": "True"}
        }));
        let authz = policy(PolicyKind::AuthorizationPolicy, &meta, None).unwrap();
        assert_eq!(
            authz.created.map(|t| t.to_string()).as_deref(),
            Some("2026-12-01T10:00:00Z")
        );
        assert_eq!(authz.dry_run.as_deref(), Some("True"));
        let meta: ObjectMeta = from_json(serde_json::json!({"name": "p", "namespace": "demo"}));
        let authz = policy(PolicyKind::AuthorizationPolicy, &meta, None).unwrap();
        assert_eq!((authz.created, authz.dry_run), (None, None));
    }

    #[test]
    fn bad_pod_ip_names_the_field() {
        let err = pod(&from_json(serde_json::json!({
            "metadata": {"name": "client"},
            "status": {"podIPs": [{"ip": "10.244.0.300"}]}
        })))
        .unwrap_err();
        assert_eq!(err.field, "status.podIPs[0].ip");
        assert!(err.message.contains("not an IP address"));
    }

    #[test]
    fn service_defaults_and_named_target_ports() {
        let svc = service(&from_json(serde_json::json!({
            "metadata": {"name": "web", "namespace": "demo"},
            "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"},
                     "ports": [{"port": 80}, {"name": "grpc", "port": 9090, "targetPort": "grpc-port"}]}
        })))
        .unwrap();
        assert_eq!(
            svc.cluster_ips,
            vec!["10.96.0.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(svc.ports[0].target_port, TargetPort::Number(80));
        assert_eq!(svc.ports[0].protocol, "TCP");
        assert_eq!(
            svc.ports[1].target_port,
            TargetPort::Name("grpc-port".into())
        );
    }

    #[test]
    fn endpoint_slice_needs_its_service_label() {
        let slice: discovery::EndpointSlice = from_json(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "demo"}, "addressType": "IPv4", "endpoints": []
        }));
        assert!(
            endpoint_slice(&slice)
                .unwrap_err()
                .field
                .contains(SERVICE_NAME_LABEL)
        );
    }
}
