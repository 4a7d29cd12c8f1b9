//! Which pods are captured: a local pod is enrolled when its namespace or itself carries
//! `meshlet.io/dataplane-mode=ambient`, unless the pod says `none` or is hostNetwork.
//!
//! For a migration from Istio ambient, Istio's own label `istio.io/dataplane-mode` is read the
//! same way (`--istio-labels`, on by default): a namespace labelled for ztunnel is captured by
//! meshlet on the nodes that run meshlet, and a pod that opted out of Istio's capture opts out
//! of meshlet's. meshlet's label wins where an object carries both. A pod that Istio injected a
//! sidecar into (`sidecar.istio.io/status`) has its own proxy and is never captured, as Istio's
//! CNI plugin leaves it alone.

use serde::{Deserialize, Serialize};

use super::model::{DATAPLANE_MODE_LABEL, Labels, Namespace, Pod};

/// Istio's label with the meaning of [`DATAPLANE_MODE_LABEL`], read with `--istio-labels`.
pub const ISTIO_DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The annotation Istio's injector writes on a pod that has a sidecar.
pub const ISTIO_SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

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
    /// The pod carries `meshlet.io/dataplane-mode=none` (or Istio's label says `none`).
    OptedOut,
    /// The pod has an Istio sidecar, which proxies its traffic itself.
    IstioSidecar,
    /// Neither the pod nor its namespace asks for `ambient`.
    NotLabelled,
}

/// The label value that enrolls.
pub const AMBIENT: &str = "ambient";
/// The pod label value that opts out.
pub const NONE: &str = "none";

/// The enrollment rules of an agent: which labels say `ambient`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rules {
    /// Whether Istio's `istio.io/dataplane-mode` is read too.
    pub istio_labels: bool,
}

impl Default for Rules {
    fn default() -> Self {
        Self { istio_labels: true }
    }
}

impl Rules {
    /// Decides whether `pod` (in `namespace`, if the store has it) is captured on node `node`.
    pub fn decide(&self, pod: &Pod, namespace: Option<&Namespace>, node: &str) -> Decision {
        if pod.node_name.as_deref() != Some(node) {
            return Decision::OtherNode;
        }
        if pod.host_network {
            return Decision::HostNetwork;
        }
        if !pod.is_live() {
            return Decision::NotRunning;
        }
        if self.has_sidecar(pod) {
            return Decision::IstioSidecar;
        }
        match self.mode(&pod.labels) {
            Some(NONE) => return Decision::OptedOut,
            Some(AMBIENT) => return Decision::Enroll,
            _ => {}
        }
        if namespace.and_then(|ns| self.mode(&ns.labels)) == Some(AMBIENT) {
            Decision::Enroll
        } else {
            Decision::NotLabelled
        }
    }

    /// Whether `pod` has an Istio sidecar that these rules leave it to.
    pub fn has_sidecar(&self, pod: &Pod) -> bool {
        self.istio_labels
            && pod
                .annotations
                .contains_key(ISTIO_SIDECAR_STATUS_ANNOTATION)
    }

    /// The data-plane mode `labels` ask for: meshlet's label, else Istio's.
    pub fn mode<'a>(&self, labels: &'a Labels) -> Option<&'a str> {
        labels
            .get(DATAPLANE_MODE_LABEL)
            .or_else(|| {
                self.istio_labels
                    .then(|| labels.get(ISTIO_DATAPLANE_MODE_LABEL))
                    .flatten()
            })
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(labels: &[(&str, &str)]) -> Pod {
        Pod::fixture("demo", "app", labels)
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
            assert_eq!(
                Rules::default().decide(pod, *namespace, "node-0"),
                *want,
                "{name}"
            );
        }
    }

    #[test]
    fn istios_labels_enroll_and_opt_out_unless_turned_off() {
        const ISTIO: &str = ISTIO_DATAPLANE_MODE_LABEL;
        let istio_ambient = ns(&[(ISTIO, "ambient")]);
        let meshlet_ambient = ns(&[(DATAPLANE_MODE_LABEL, "ambient")]);
        let plain = ns(&[]);
        let sidecar = Pod {
            annotations: [(ISTIO_SIDECAR_STATUS_ANNOTATION.to_owned(), "{}".to_owned())].into(),
            ..pod(&[])
        };
        let cases: &[(&str, Pod, &Namespace, Decision, Decision)] = &[
            // (case, pod, namespace, with Istio's labels, without)
            (
                "Istio's namespace label",
                pod(&[]),
                &istio_ambient,
                Decision::Enroll,
                Decision::NotLabelled,
            ),
            (
                "Istio's pod label",
                pod(&[(ISTIO, "ambient")]),
                &plain,
                Decision::Enroll,
                Decision::NotLabelled,
            ),
            (
                "Istio's opt-out in a meshlet namespace",
                pod(&[(ISTIO, "none")]),
                &meshlet_ambient,
                Decision::OptedOut,
                Decision::Enroll,
            ),
            (
                "meshlet's opt-out in an Istio namespace",
                pod(&[(DATAPLANE_MODE_LABEL, "none")]),
                &istio_ambient,
                Decision::OptedOut,
                Decision::OptedOut,
            ),
            (
                "meshlet's label wins on the same pod",
                pod(&[(DATAPLANE_MODE_LABEL, "ambient"), (ISTIO, "none")]),
                &plain,
                Decision::Enroll,
                Decision::Enroll,
            ),
            (
                "meshlet's label wins on the same namespace",
                pod(&[]),
                &ns(&[(DATAPLANE_MODE_LABEL, "none"), (ISTIO, "ambient")]),
                Decision::NotLabelled,
                Decision::NotLabelled,
            ),
            (
                "a pod with an Istio sidecar",
                sidecar.clone(),
                &istio_ambient,
                Decision::IstioSidecar,
                Decision::NotLabelled,
            ),
        ];
        for (name, pod, namespace, with, without) in cases {
            let istio = Rules { istio_labels: true };
            let meshlet_only = Rules {
                istio_labels: false,
            };
            assert_eq!(
                istio.decide(pod, Some(namespace), "node-0"),
                *with,
                "{name}"
            );
            assert_eq!(
                meshlet_only.decide(pod, Some(namespace), "node-0"),
                *without,
                "{name}, without Istio's labels"
            );
        }
    }
}
