//! Running `meshlet-cni` exactly as a container runtime does: the verb and the sandbox in
//! `CNI_*` environment variables, the pod in `CNI_ARGS`, the network conf with the primary
//! plugin's `prevResult` on stdin; the result (or the CNI error object) on stdout.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{Cluster, Pod, process};

/// The `meshlet-cni` plugin binary, built next to `meshlet`.
pub fn cni_binary() -> PathBuf {
    process::meshlet_binary().with_file_name("meshlet-cni")
}

/// What one plugin run printed.
#[derive(Debug, Clone)]
pub struct CniRun {
    /// Exit status 0.
    pub success: bool,
    /// stdout: the result, or the CNI error object.
    pub stdout: String,
    /// stderr.
    pub stderr: String,
    /// How long the run took (the time the plugin adds to the pod's start).
    pub took: Duration,
}

impl CniRun {
    /// The CNI error object of a failed run.
    pub fn error(&self) -> Value {
        assert!(!self.success, "the plugin succeeded: {self:?}");
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|err| panic!("stdout is not a CNI error object ({err}): {self:?}"))
    }

    /// Panics unless the run succeeded.
    pub fn assert_success(&self) -> &Self {
        assert!(self.success, "the plugin failed: {self:?}");
        self
    }
}

/// The result the primary plugin would have returned for `pod` (its two addresses on eth0),
/// as compact JSON text: what the runtime passes as `prevResult`, and what ADD must print.
pub fn prev_result(pod: &Pod) -> String {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            { "name": "eth0", "mac": "0a:58:0a:f4:00:0a", "sandbox": pod.netns.path() }
        ],
        "ips": [
            { "address": format!("{}/32", pod.ipv4), "interface": 0 },
            { "address": format!("{}/128", pod.ipv6), "interface": 0 }
        ],
        "routes": [{ "dst": "0.0.0.0/0" }, { "dst": "::/0" }],
        "dns": {}
    })
    .to_string()
}

/// One plugin invocation for a pod.
#[derive(Debug, Clone)]
pub struct CniCall {
    /// `CNI_COMMAND`.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: PathBuf,
    /// `CNI_ARGS`.
    pub args: String,
    /// The conf on stdin.
    pub conf: String,
}

impl CniCall {
    /// `command` for `pod` in `namespace`, with the agent at `socket` and the conf's
    /// `fail_mode` (`closed` or `open`).
    pub fn new(command: &str, pod: &Pod, namespace: &str, socket: &Path, fail_mode: &str) -> Self {
        // The conf is built as text so that `prevResult` is exactly the bytes given.
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"meshlet-test","type":"meshlet-cni","agent_socket":{},"fail_mode":"{fail_mode}","prevResult":{}}}"#,
            Value::from(socket.display().to_string()),
            prev_result(pod)
        );
        Self {
            command: command.to_owned(),
            container_id: format!("sandbox{}", pod.uid.replace('-', "")),
            netns: pod.netns.path(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID=x;K8S_POD_UID={}",
                pod.name, pod.uid
            ),
            conf,
        }
    }

    /// Runs the plugin and waits for it.
    pub fn run(&self) -> CniRun {
        let start = Instant::now();
        let mut child = Command::new(cni_binary())
            .env_clear()
            .env("CNI_COMMAND", &self.command)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_NETNS", &self.netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", &self.args)
            .env("CNI_PATH", "/opt/cni/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("run {}: {err}", cni_binary().display()));
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(self.conf.as_bytes())
            .expect("write the conf");
        let output = child.wait_with_output().expect("wait for meshlet-cni");
        CniRun {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            took: start.elapsed(),
        }
    }
}

impl Cluster {
    /// Runs `meshlet-cni <command>` for pod `name` of `namespace` against node `node`'s agent,
    /// fail-closed.
    pub fn cni(&self, node: usize, command: &str, name: &str, namespace: &str) -> CniRun {
        CniCall::new(
            command,
            self.pod(name),
            namespace,
            &self.cni_socket(node),
            "closed",
        )
        .run()
    }
}
