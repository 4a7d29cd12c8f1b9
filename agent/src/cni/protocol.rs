//! What `meshlet-cni` and the agent say to each other on the agent's CNI socket.
//!
//! One request per connection: the plugin writes a JSON [`Request`] with the pod's network
//! namespace attached as a descriptor (`SCM_RIGHTS`; ADD and CHECK), closes its write side, and
//! reads one JSON [`Reply`]. Both sides bound what they read. The agent trusts nothing in a
//! request it can check itself: the descriptor must be a network namespace, the names must be
//! Kubernetes names, and the decision comes from the agent's own store, never the request.

use std::{
    io::{self, Read as _},
    net::IpAddr,
    os::{fd::BorrowedFd, unix::net::UnixStream},
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::workload::{enrollment::Decision, model::ObjectKey};

/// The largest request the agent reads.
pub const MAX_REQUEST: usize = 16 * 1024;
/// The largest reply the plugin reads.
pub const MAX_REPLY: usize = 16 * 1024;
/// The most pod addresses a request may carry.
const MAX_IPS: usize = 16;

/// The CNI verb the runtime called the plugin with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    /// A pod sandbox was created: capture it before its containers start.
    Add,
    /// The sandbox is being torn down: release it.
    Del,
    /// Is the sandbox still as ADD left it?
    Check,
}

impl Command {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
        }
    }
}

/// The pod a request is about, from `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodRef {
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `K8S_POD_UID`, when the runtime passes it (containerd and CRI-O do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl PodRef {
    /// The pod's store key.
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A request from the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The verb.
    pub command: Command,
    /// `CNI_CONTAINERID`: the sandbox.
    pub container_id: String,
    /// `CNI_NETNS` as the runtime named it (for logs: the attached descriptor is what counts).
    #[serde(default)]
    pub netns: String,
    /// The pod.
    pub pod: PodRef,
    /// The pod's addresses, from the primary plugin's result (`prevResult.ips`).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

impl Request {
    /// Checks every field against what Kubernetes and CNI allow, before anything is looked up.
    pub fn validate(&self) -> Result<(), String> {
        check_name("pod namespace", &self.pod.namespace, 63)?;
        check_name("pod name", &self.pod.name, 253)?;
        if let Some(uid) = &self.pod.uid
            && (uid.is_empty()
                || uid.len() > 64
                || !uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
        {
            return Err(format!("pod UID {uid:?} is not a UID"));
        }
        // CNI: "alphanumeric, hyphen, underscore, period" (and never empty).
        if self.container_id.is_empty()
            || self.container_id.len() > 256
            || !self
                .container_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(format!(
                "container ID {:?} is not a CNI container ID",
                self.container_id
            ));
        }
        if self.netns.len() > 4096 {
            return Err("netns path longer than PATH_MAX".into());
        }
        if self.ips.len() > MAX_IPS {
            return Err(format!("{} addresses (at most {MAX_IPS})", self.ips.len()));
        }
        if let Some(ip) = self.ips.iter().find(|ip| {
            ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip_is_broadcast(ip)
        }) {
            return Err(format!("{ip} cannot be a pod address"));
        }
        Ok(())
    }
}

fn ip_is_broadcast(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

/// A DNS-1123 name (label or subdomain) of at most `max` bytes.
fn check_name(what: &str, name: &str, max: usize) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!("{what} {name:?} is not a Kubernetes name"))
    }
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    /// The pod is captured: listeners up, namespace enrolled, inbound steering attached.
    Enrolled {
        /// The namespace's cookie (its key in the capture maps).
        cookie: u64,
    },
    /// The pod is not for the mesh; it starts as it is.
    NotCaptured {
        /// Why.
        reason: Decision,
    },
    /// DEL done (also when there was nothing to release).
    Released,
    /// CHECK: the pod is captured as ADD left it.
    Checked,
    /// The agent cannot decide yet (its source has not synced): the plugin decides from the
    /// namespace decisions file, as if the agent were down.
    Unavailable {
        /// Why.
        message: String,
    },
    /// The pod must be captured and is not: ADD or CHECK fails.
    Refused {
        /// Why, for the pod's events.
        message: String,
    },
}

impl Reply {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Enrolled { .. } => "enrolled",
            Self::NotCaptured { .. } => "not_captured",
            Self::Released => "released",
            Self::Checked => "checked",
            Self::Unavailable { .. } => "unavailable",
            Self::Refused { .. } => "refused",
        }
    }
}

/// How a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nothing listens on the socket: the agent is down.
    #[error("cannot reach the meshlet agent at {path}: {source}")]
    Unreachable {
        /// The socket.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The agent took the request but the exchange failed.
    #[error("meshlet agent at {path}: {message}")]
    Failed {
        /// The socket.
        path: String,
        /// What went wrong.
        message: String,
    },
}

/// Sends `request` (with `netns` attached) to the agent listening on `socket` and waits up to
/// `timeout` for its reply.
pub fn call(
    socket: &Path,
    request: &Request,
    netns: Option<BorrowedFd<'_>>,
    timeout: Duration,
) -> Result<Reply, CallError> {
    let path = socket.display().to_string();
    let failed = |message: String| CallError::Failed {
        path: path.clone(),
        message,
    };
    let stream = UnixStream::connect(socket).map_err(|source| CallError::Unreachable {
        path: path.clone(),
        source,
    })?;
    stream
        .set_write_timeout(Some(timeout))
        .and_then(|()| stream.set_read_timeout(Some(timeout)))
        .map_err(|err| failed(err.to_string()))?;
    let body = serde_json::to_vec(request).map_err(|err| failed(err.to_string()))?;
    crate::sys::fdpass::send(&stream, &body, netns.as_slice())
        .map_err(|err| failed(format!("send the request: {err}")))?;
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(|err| failed(err.to_string()))?;
    let mut reply = Vec::new();
    (&stream)
        .take(MAX_REPLY as u64 + 1)
        .read_to_end(&mut reply)
        .map_err(|err| failed(format!("read the reply: {err}")))?;
    if reply.len() > MAX_REPLY {
        return Err(failed(format!("reply longer than {MAX_REPLY} bytes")));
    }
    serde_json::from_slice(&reply).map_err(|err| {
        failed(format!(
            "unreadable reply ({err}): {:?}",
            String::from_utf8_lossy(&reply[..reply.len().min(200)])
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            command: Command::Add,
            container_id: "0123abcd".into(),
            netns: "/var/run/netns/cni-1".into(),
            pod: PodRef {
                namespace: "demo".into(),
                name: "client-7f9c".into(),
                uid: Some("6e2a1c3b-0000-4d5e-8f90-000000000000".into()),
            },
            ips: vec!["10.244.0.10".parse().unwrap()],
        }
    }

    #[test]
    fn requests_round_trip_and_bad_fields_are_named() {
        let good = request();
        assert_eq!(good.validate(), Ok(()));
        let text = serde_json::to_string(&good).unwrap();
        assert!(text.contains(r#""command":"ADD""#), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), good);

        type Spoil = fn(&mut Request);
        let bad: &[(&str, Spoil)] = &[
            ("pod namespace", |r| r.pod.namespace = "Demo".into()),
            ("pod namespace", |r| r.pod.namespace = String::new()),
            ("pod namespace", |r| r.pod.namespace = "a".repeat(64)),
            ("pod name", |r| r.pod.name = "../etc".into()),
            ("pod name", |r| r.pod.name = "x-".into()),
            ("pod UID", |r| r.pod.uid = Some("not a uid".into())),
            ("container ID", |r| r.container_id = String::new()),
            ("container ID", |r| r.container_id = "a/b".into()),
            ("cannot be a pod address", |r| {
                r.ips = vec!["127.0.0.1".parse().unwrap()]
            }),
            ("cannot be a pod address", |r| {
                r.ips = vec!["0.0.0.0".parse().unwrap()]
            }),
            ("at most", |r| r.ips = vec!["10.0.0.1".parse().unwrap(); 17]),
        ];
        for (want, spoil) in bad {
            let mut request = request();
            spoil(&mut request);
            let err = request.validate().unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
        // Unknown fields are refused, not ignored.
        let err = serde_json::from_str::<Request>(&text.replace("\"ips\"", "\"extra\":1,\"ips\""))
            .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn replies_are_tagged() {
        let reply = Reply::NotCaptured {
            reason: Decision::NotLabelled,
        };
        assert_eq!(
            serde_json::to_string(&reply).unwrap(),
            r#"{"result":"not_captured","reason":"not_labelled"}"#
        );
        assert_eq!(
            serde_json::from_str::<Reply>(r#"{"result":"enrolled","cookie":7}"#).unwrap(),
            Reply::Enrolled { cookie: 7 }
        );
    }

    #[test]
    fn an_absent_agent_is_unreachable_not_failed() {
        let err = call(
            Path::new("/nonexistent/meshlet/cni.sock"),
            &request(),
            None,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(err, CallError::Unreachable { .. }), "{err}");
    }
}
