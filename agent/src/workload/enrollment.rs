//! Which pods are captured: a local pod is enrolled when its namespace or itself carries
//! `meshlet.io/dataplane-mode=ambient`, unless the pod says `none` or is hostNetwork.

use serde::{Deserialize, Serialize};

use super::model::{DATAPLANE_MODE_LABEL, Namespace, Pod};

/// The decision for one pod, with the reason when it is not enrolled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Capture it.
    Enroll,
    /// It runs on another node (that node's agent decides).
    OtherNode,
    /// `spec.hostNetwork`: it shares the node's network namespace.
    HostNetwork,
    /// Finished, or no address yet.
    NotRunning,
    /// The pod carries `meshlet.io/dataplane-mode=none`.
    OptedOut,
    /// Neither the pod nor its namespace asks for `ambient`.
    NotLabelled,
}

/// The label value that enrolls.
pub const AMBIENT: &str = "ambient";
/// The pod label value that opts out.
pub const NONE: &str = "none";

/// Decides whether `pod` (in `namespace`, if the store has it) is captured on node `node`.
pub fn decide(pod: &Pod, namespace: Option<&Namespace>, node: &str) -> Decision {
    if pod.node_name.as_deref() != Some(node) {
        return Decision::OtherNode;
    }
    if pod.host_network {
        return Decision::HostNetwork;
    }
    if !pod.is_live() {
        return Decision::NotRunning;
    }
    match pod.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
        Some(NONE) => return Decision::OptedOut,
        Some(AMBIENT) => return Decision::Enroll,
        _ => {}
    }
    if namespace
        .and_then(|ns| ns.labels.get(DATAPLANE_MODE_LABEL))
        .is_some_and(|mode| mode == AMBIENT)
    {
        Decision::Enroll
    } else {
        Decision::NotLabelled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::model::{Labels, ObjectKey};

    fn pod(labels: &[(&str, &str)]) -> Pod {
        Pod {
            key: ObjectKey::new("demo", "app"),
            uid: "u".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: Labels::new(),
            service_account: "default".into(),
            node_name: Some("node-0".into()),
            ips: vec!["10.244.0.10".parse().unwrap()],
            host_network: false,
            phase: "Running".into(),
            ready: true,
        }
    }

    fn ns(labels: &[(&str, &str)]) -> Namespace {
        Namespace {
            name: "demo".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn decisions() {
        let ambient = ns(&[(DATAPLANE_MODE_LABEL, "ambient")]);
        let plain = ns(&[]);
        let cases: &[(&str, Pod, Option<&Namespace>, Decision)] = &[
            (
                "namespace label",
                pod(&[]),
                Some(&ambient),
                Decision::Enroll,
            ),
            (
                "pod label",
                pod(&[(DATAPLANE_MODE_LABEL, "ambient")]),
                Some(&plain),
                Decision::Enroll,
            ),
            (
                "pod label, namespace unknown",
                pod(&[(DATAPLANE_MODE_LABEL, "ambient")]),
                None,
                Decision::Enroll,
            ),
            (
                "opt-out wins",
                pod(&[(DATAPLANE_MODE_LABEL, "none")]),
                Some(&ambient),
                Decision::OptedOut,
            ),
            ("no label", pod(&[]), Some(&plain), Decision::NotLabelled),
            (
                "other value",
                pod(&[]),
                Some(&ns(&[(DATAPLANE_MODE_LABEL, "sidecar")])),
                Decision::NotLabelled,
            ),
            (
                "host network",
                Pod {
                    host_network: true,
                    ..pod(&[])
                },
                Some(&ambient),
                Decision::HostNetwork,
            ),
            (
                "other node",
                Pod {
                    node_name: Some("node-1".into()),
                    ..pod(&[])
                },
                Some(&ambient),
                Decision::OtherNode,
            ),
            (
                "unscheduled",
                Pod {
                    node_name: None,
                    ..pod(&[])
                },
                Some(&ambient),
                Decision::OtherNode,
            ),
            (
                "finished",
                Pod {
                    phase: "Succeeded".into(),
                    ..pod(&[])
                },
                Some(&ambient),
                Decision::NotRunning,
            ),
            (
                "no IP yet",
                Pod {
                    ips: vec![],
                    ..pod(&[])
                },
                Some(&ambient),
                Decision::NotRunning,
            ),
        ];
        for (name, pod, namespace, want) in cases {
            assert_eq!(decide(pod, *namespace, "node-0"), *want, "{name}");
        }
    }
}
