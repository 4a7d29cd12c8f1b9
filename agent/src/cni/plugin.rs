//! `meshlet-cni`: the chained CNI plugin (spec 1.0.0; 0.3.x, 0.4.0 and 1.1.0 confs are
//! accepted too).
//!
//! The container runtime runs it after the primary plugin with the verb in `CNI_COMMAND`, the
//! sandbox in `CNI_CONTAINERID`/`CNI_NETNS`, the pod in `CNI_ARGS`, and the network conf (with
//! the primary plugin's result as `prevResult`) on stdin.
//!
//! - `ADD` hands the pod's namespace (as a descriptor) to the agent and prints `prevResult`
//!   unchanged once the agent says the pod is enrolled, or not for the mesh. So no container
//!   of a captured pod runs before its capture.
//! - When the agent cannot answer, the decisions the agent last wrote beside its socket say
//!   whether the pod must be captured: such a pod's `ADD` fails with "try again later" (code
//!   11; the runtime retries), with `fail_mode: open` it starts uncaptured; any other pod
//!   starts at once.
//! - `DEL` releases the pod and never fails; `CHECK` asks the agent; `VERSION` answers
//!   itself; `STATUS` and `GC` (1.1.0) succeed, so the plugin never holds the node's network
//!   back.
//!
//! The plugin never talks to the API server, and keeps no state of its own.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::IpAddr,
    os::fd::AsFd as _,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{
    decisions::{self, Decisions},
    protocol::{self, Command, PodRef, Reply, Request},
};
use crate::capture::FailMode;

/// The versions of the CNI spec the plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The conf's `type`, and the binary's name in the CNI bin directory.
pub const PLUGIN_TYPE: &str = "meshlet-cni";
/// Where the agent listens when the conf does not say.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/lib/meshlet/cni.sock";
/// How long the plugin waits for the agent's answer (the agent answers within its own
/// `--cni-timeout`, 10 s by default).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest conf read from stdin.
const MAX_CONF: u64 = 1024 * 1024;

/// CNI error codes (spec, "Error").
mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// Plugin-specific: CHECK found a pod that must be captured and is not.
    pub const NOT_CAPTURED: u32 = 100;
}

/// The plugin's network conf (the entry of the conflist, with `prevResult` added).
#[derive(Debug, Deserialize)]
struct Conf {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    #[serde(default = "default_agent_socket")]
    agent_socket: PathBuf,
    #[serde(default)]
    fail_mode: FailMode,
    #[serde(rename = "prevResult")]
    prev_result: Option<Box<RawValue>>,
}

fn default_agent_socket() -> PathBuf {
    PathBuf::from(DEFAULT_AGENT_SOCKET)
}

/// The part of a CNI result the plugin reads: the pod's addresses.
#[derive(Debug, Deserialize)]
struct PrevResult {
    #[serde(default)]
    interfaces: Vec<ResultInterface>,
    #[serde(default)]
    ips: Vec<ResultIp>,
}

#[derive(Debug, Deserialize)]
struct ResultInterface {
    /// Set for interfaces inside the sandbox (the pod's), empty for host-side ones.
    #[serde(default)]
    sandbox: String,
}

#[derive(Debug, Deserialize)]
struct ResultIp {
    address: ipnet::IpNet,
    /// Index into `interfaces`; absent in results that do not say.
    interface: Option<usize>,
}

impl PrevResult {
    /// The addresses on the pod's own interfaces (not the host side of a veth or bridge).
    fn pod_ips(&self) -> Vec<IpAddr> {
        self.ips
            .iter()
            .filter(|ip| {
                ip.interface.is_none_or(|i| {
                    self.interfaces
                        .get(i)
                        .is_some_and(|interface| !interface.sandbox.is_empty())
                })
            })
            .map(|ip| ip.address.addr())
            .collect()
    }
}

/// A CNI error, printed on stdout as the spec's error object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    /// The spec's code.
    pub code: u32,
    /// One line.
    pub msg: String,
    /// More.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

/// The runtime's environment for one call.
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// `CNI_COMMAND`.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// `CNI_ARGS`.
    pub args: String,
}

impl Env {
    /// Reads the process environment.
    pub fn from_process() -> Self {
        let var = |name| std::env::var(name).unwrap_or_default();
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            args: var("CNI_ARGS"),
        }
    }
}

/// What one run prints, and whether it succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Printed on stdout.
    pub stdout: String,
    /// Printed on stderr (what the runtime logs).
    pub stderr: String,
    /// Exit status 0.
    pub success: bool,
}

/// The binary's entry point.
pub fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(MAX_CONF + 1).read_to_end(&mut stdin);
    let outcome = match read {
        Ok(_) => run(&Env::from_process(), &stdin),
        Err(err) => failure(error(
            "1.0.0",
            code::IO_FAILURE,
            "cannot read the network conf on stdin",
            err,
        )),
    };
    let _ = std::io::stdout().write_all(outcome.stdout.as_bytes());
    let _ = std::io::stderr().write_all(outcome.stderr.as_bytes());
    if outcome.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs one CNI call: `env` and the conf on `stdin`.
pub fn run(env: &Env, stdin: &[u8]) -> Outcome {
    match run_inner(env, stdin) {
        Ok((stdout, stderr)) => Outcome {
            stdout,
            stderr,
            success: true,
        },
        Err(err) => failure(err),
    }
}

fn failure(err: CniError) -> Outcome {
    Outcome {
        stdout: serde_json::to_string(&err).unwrap_or_default() + "\n",
        stderr: format!("meshlet-cni: {}: {}\n", err.msg, err.details),
        success: false,
    }
}

fn error(version: &str, code: u32, msg: &str, details: impl std::fmt::Display) -> CniError {
    CniError {
        cni_version: version.to_owned(),
        code,
        msg: msg.to_owned(),
        details: details.to_string(),
    }
}

fn run_inner(env: &Env, stdin: &[u8]) -> Result<(String, String), CniError> {
    if stdin.len() as u64 > MAX_CONF {
        return Err(error(
            "1.0.0",
            code::DECODE_FAILURE,
            "network conf too large",
            format!("more than {MAX_CONF} bytes on stdin"),
        ));
    }
    if env.command == "VERSION" {
        // Answered in the version asked for, when it is one the plugin speaks.
        let asked = serde_json::from_slice::<serde_json::Value>(stdin)
            .ok()
            .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
            .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
            .unwrap_or_else(|| "1.0.0".to_owned());
        let versions = serde_json::json!({
            "cniVersion": asked,
            "supportedVersions": SUPPORTED_VERSIONS,
        });
        return Ok((versions.to_string() + "\n", String::new()));
    }
    let conf = parse_conf(stdin);
    if env.command == "DEL"
        && let Err(err) = &conf
    {
        // DEL cleans up; a conf it cannot read must not keep a sandbox from going away (the
        // agent releases pods that leave its store anyway).
        return Ok((
            String::new(),
            format!("meshlet-cni: DEL: {}: {}\n", err.msg, err.details),
        ));
    }
    let conf = conf?;
    let version = conf.cni_version.as_str();
    let command = match env.command.as_str() {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" if at_least(version, "0.4.0") => Command::Check,
        // 1.1.0: the plugin holds no per-attachment state to collect, and is always ready.
        "GC" | "STATUS" if at_least(version, "1.1.0") => {
            return Ok((String::new(), String::new()));
        }
        verb @ ("CHECK" | "GC" | "STATUS") => {
            return Err(error(
                version,
                code::INCOMPATIBLE_VERSION,
                "the conf's CNI version has no such command",
                format!("{verb} with cniVersion {version}"),
            ));
        }
        other => {
            return Err(error(
                version,
                code::INVALID_ENVIRONMENT,
                "unknown CNI_COMMAND",
                format!("{other:?}"),
            ));
        }
    };
    let passthrough = || match &conf.prev_result {
        Some(result) => Ok(result.get().to_owned() + "\n"),
        None => Err(error(
            version,
            code::INVALID_CONFIG,
            "meshlet-cni is a chained plugin: list it after the primary plugin",
            "the network conf has no prevResult",
        )),
    };
    // What a successful call prints: the result for ADD, nothing for DEL and CHECK.
    let stdout = || match command {
        Command::Add => passthrough(),
        Command::Del | Command::Check => Ok(String::new()),
    };
    let Some(pod) = pod_from_args(&env.args) else {
        // Not a Kubernetes pod: nothing for the mesh.
        return Ok((stdout()?, String::new()));
    };
    if command == Command::Add {
        // Checked before the agent is asked, so a broken chain fails the same way always.
        passthrough()?;
    }
    if env.container_id.is_empty() {
        return Err(error(
            version,
            code::INVALID_ENVIRONMENT,
            "CNI_CONTAINERID is empty",
            "",
        ));
    }

    let netns = match (command, env.netns.as_str()) {
        // DEL may come after the namespace is gone.
        (Command::Del, _) => std::fs::File::open(&env.netns).ok(),
        (_, "") => {
            return Err(error(
                version,
                code::INVALID_ENVIRONMENT,
                "CNI_NETNS is empty",
                "",
            ));
        }
        (_, path) => Some(std::fs::File::open(path).map_err(|err| {
            error(
                version,
                code::INVALID_ENVIRONMENT,
                "cannot open CNI_NETNS",
                format!("{path}: {err}"),
            )
        })?),
    };
    let ips = match (&conf.prev_result, command) {
        (Some(result), Command::Add | Command::Check) => {
            serde_json::from_str::<PrevResult>(result.get())
                .map_err(|err| {
                    error(
                        version,
                        code::DECODE_FAILURE,
                        "cannot read the pod's addresses from prevResult",
                        err,
                    )
                })?
                .pod_ips()
        }
        _ => Vec::new(),
    };
    let request = Request {
        command,
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        pod: pod.clone(),
        ips,
    };
    let reply = protocol::call(
        &conf.agent_socket,
        &request,
        netns.as_ref().map(|f| f.as_fd()),
        CALL_TIMEOUT,
    );
    match reply {
        Ok(
            Reply::Enrolled { .. } | Reply::NotCaptured { .. } | Reply::Released | Reply::Checked,
        ) => Ok((stdout()?, String::new())),
        Ok(Reply::Refused { message }) => match (command, conf.fail_mode) {
            (Command::Del, _) => Ok((String::new(), String::new())),
            (_, FailMode::Open) => Ok((
                stdout()?,
                format!("meshlet-cni: pod {pod} starts uncaptured (fail_mode open): {message}\n"),
            )),
            (Command::Check, FailMode::Closed) => Err(error(
                version,
                code::NOT_CAPTURED,
                "the pod must be captured by meshlet and is not",
                message,
            )),
            (_, FailMode::Closed) => Err(error(
                version,
                code::TRY_AGAIN_LATER,
                "meshlet could not capture the pod yet",
                message,
            )),
        },
        Ok(Reply::Unavailable { message }) => {
            without_agent(command, &conf, &pod, version, message, stdout)
        }
        Err(err) => without_agent(command, &conf, &pod, version, err.to_string(), stdout),
    }
}

/// The conf on stdin, in a version the plugin speaks.
fn parse_conf(stdin: &[u8]) -> Result<Conf, CniError> {
    let conf: Conf = serde_json::from_slice(stdin).map_err(|err| {
        error(
            "1.0.0",
            code::DECODE_FAILURE,
            "cannot decode the network conf",
            err,
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(error(
            &conf.cni_version,
            code::INCOMPATIBLE_VERSION,
            "unsupported CNI version",
            format!(
                "{:?}; supported: {}",
                conf.cni_version,
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    Ok(conf)
}

/// Whether `version` is `min` or later (both of [`SUPPORTED_VERSIONS`], which is in order).
fn at_least(version: &str, min: &str) -> bool {
    let position = |v: &str| SUPPORTED_VERSIONS.iter().position(|s| *s == v);
    position(version) >= position(min)
}

/// Decides without the agent, from the decisions it last wrote: a pod that must be captured
/// does not start (fail-closed), any other does.
fn without_agent(
    command: Command,
    conf: &Conf,
    pod: &PodRef,
    version: &str,
    why: String,
    stdout: impl Fn() -> Result<String, CniError>,
) -> Result<(String, String), CniError> {
    if command == Command::Del {
        // The agent releases pods it no longer sees anyway; DEL must not fail.
        return Ok((String::new(), String::new()));
    }
    let path = decisions::path_beside(&conf.agent_socket);
    let (must, basis) = match Decisions::read(&path) {
        Ok(Some(decisions)) => (
            decisions.must_capture(&pod.namespace, &pod.name),
            format!(
                "the decisions in {} say pod {pod} is captured",
                path.display()
            ),
        ),
        Ok(None) => (
            false,
            format!("no {} (the agent never ran on this node)", path.display()),
        ),
        // The agent writes it atomically and durably: unreadable means something is wrong,
        // and nothing says the pod may start uncaptured.
        Err(err) => (
            true,
            format!(
                "{} is unreadable ({err}), so every pod is held",
                path.display()
            ),
        ),
    };
    match (must, conf.fail_mode) {
        (false, _) => Ok((stdout()?, String::new())),
        (true, FailMode::Open) => Ok((
            stdout()?,
            format!("meshlet-cni: pod {pod} starts uncaptured (fail_mode open): {why}\n"),
        )),
        (true, FailMode::Closed) => Err(error(
            version,
            code::TRY_AGAIN_LATER,
            "the meshlet agent is not ready; the pod must be captured and waits for it",
            format!("{why}; {basis}"),
        )),
    }
}

/// The pod named in `CNI_ARGS` (`K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;K8S_POD_UID=..`);
/// `None` when it names no Kubernetes pod.
pub fn pod_from_args(args: &str) -> Option<PodRef> {
    let pairs: HashMap<&str, &str> = args
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .collect();
    let namespace = pairs.get("K8S_POD_NAMESPACE").filter(|v| !v.is_empty())?;
    let name = pairs.get("K8S_POD_NAME").filter(|v| !v.is_empty())?;
    Some(PodRef {
        namespace: (*namespace).to_owned(),
        name: (*name).to_owned(),
        uid: pairs
            .get("K8S_POD_UID")
            .filter(|v| !v.is_empty())
            .map(|v| (*v).to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/x"}],"ips":[{"address":"10.244.0.10/24","gateway":"10.244.0.1","interface":0}],"dns":{}}"#;

    fn conf(dir: &Path, extra: &str) -> Vec<u8> {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"k8s","type":"meshlet-cni","agent_socket":"{}/cni.sock"{extra},"prevResult":{PREV}}}"#,
            dir.display()
        )
        .into_bytes()
    }

    fn env(command: &str) -> Env {
        Env {
            command: command.into(),
            container_id: "abc123".into(),
            netns: "/proc/self/ns/net".into(),
            args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=client;K8S_POD_UID=6e2a1c3b-0000-4d5e-8f90-000000000000".into(),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("meshlet-plugin-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn error_of(outcome: &Outcome) -> serde_json::Value {
        assert!(!outcome.success, "{outcome:?}");
        serde_json::from_str(&outcome.stdout).unwrap()
    }

    #[test]
    fn version_lists_what_it_speaks_in_the_version_asked() {
        let outcome = run(&env("VERSION"), br#"{"cniVersion":"0.4.0"}"#);
        let out: serde_json::Value = serde_json::from_str(&outcome.stdout).unwrap();
        assert_eq!(out["cniVersion"], "0.4.0");
        assert_eq!(out["supportedVersions"][3], "1.0.0");
        assert!(outcome.success);
        let out: serde_json::Value =
            serde_json::from_str(&run(&env("VERSION"), b"").stdout).unwrap();
        assert_eq!(out["cniVersion"], "1.0.0");
    }

    #[test]
    fn commands_follow_the_confs_version_and_del_never_fails() {
        let dir = scratch("versions");
        let old = String::from_utf8(conf(&dir, "")).unwrap().replacen(
            "\"cniVersion\":\"1.0.0\"",
            "\"cniVersion\":\"0.3.1\"",
            1,
        );
        let check = run(&env("CHECK"), old.as_bytes());
        assert_eq!(error_of(&check)["code"], 1, "CHECK needs 0.4.0: {check:?}");
        let status = run(&env("STATUS"), &conf(&dir, ""));
        assert_eq!(
            error_of(&status)["code"],
            1,
            "STATUS needs 1.1.0: {status:?}"
        );
        let del = run(&env("DEL"), b"{broken");
        assert!(del.success && del.stdout.is_empty(), "{del:?}");
        assert!(del.stderr.contains("cannot decode"), "{del:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_the_pods_own_interfaces_give_its_addresses() {
        let result: PrevResult = serde_json::from_str(
            r#"{"cniVersion":"1.0.0",
                "interfaces":[{"name":"cni0"},{"name":"eth0","sandbox":"/var/run/netns/x"}],
                "ips":[{"address":"10.244.0.1/24","interface":0},
                       {"address":"10.244.0.10/24","interface":1},
                       {"address":"fd00::a/64"}]}"#,
        )
        .unwrap();
        assert_eq!(
            result.pod_ips(),
            [
                "10.244.0.10".parse::<IpAddr>().unwrap(),
                "fd00::a".parse().unwrap()
            ]
        );
    }

    #[test]
    fn bad_input_gets_the_spec_error_codes() {
        let dir = scratch("bad");
        let cases: &[(Env, Vec<u8>, u32, &str)] = &[
            (env("ADD"), b"{not json".to_vec(), 6, "cannot decode"),
            (
                env("ADD"),
                br#"{"cniVersion":"9.9.9","name":"x","type":"meshlet-cni"}"#.to_vec(),
                1,
                "unsupported CNI version",
            ),
            (
                env("ADD"),
                br#"{"cniVersion":"1.0.0","name":"x","type":"meshlet-cni"}"#.to_vec(),
                7,
                "chained plugin",
            ),
            (env("FROB"), conf(&dir, ""), 4, "unknown CNI_COMMAND"),
            (
                env("ADD"),
                conf(&dir, r#","fail_mode":"sometimes""#),
                6,
                "cannot decode",
            ),
            (
                Env {
                    netns: String::new(),
                    ..env("ADD")
                },
                conf(&dir, ""),
                4,
                "CNI_NETNS is empty",
            ),
            (
                Env {
                    netns: "/nonexistent/netns".into(),
                    ..env("ADD")
                },
                conf(&dir, ""),
                4,
                "cannot open CNI_NETNS",
            ),
            (
                env("ADD"),
                String::from_utf8(conf(&dir, ""))
                    .unwrap()
                    .replace("10.244.0.10/24", "not-an-ip")
                    .into_bytes(),
                6,
                "addresses from prevResult",
            ),
        ];
        for (env, stdin, code, msg) in cases {
            let outcome = run(env, stdin);
            let err = error_of(&outcome);
            assert_eq!(err["code"], *code, "{outcome:?}");
            assert!(err["msg"].as_str().unwrap().contains(msg), "{outcome:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_the_agent_the_decisions_file_decides() {
        let dir = scratch("decisions");
        // No file: the agent never ran here; nothing is held back.
        let add = run(&env("ADD"), &conf(&dir, ""));
        assert!(add.success, "{add:?}");
        assert_eq!(
            add.stdout.trim_end(),
            PREV,
            "prevResult passes through byte for byte"
        );

        let mut decisions = Decisions {
            node: "node-0".into(),
            ..Decisions::default()
        };
        decisions.captured_namespaces.insert("demo".into());
        decisions.write(&dir.join(decisions::FILE_NAME)).unwrap();
        let add = run(&env("ADD"), &conf(&dir, ""));
        let err = error_of(&add);
        assert_eq!(err["code"], 11, "try again later: {add:?}");
        assert!(
            err["details"]
                .as_str()
                .unwrap()
                .contains("cannot reach the meshlet agent"),
            "{add:?}"
        );
        let open = run(&env("ADD"), &conf(&dir, r#","fail_mode":"open""#));
        assert!(
            open.success && open.stderr.contains("uncaptured"),
            "{open:?}"
        );
        let legacy = Env {
            args: "K8S_POD_NAMESPACE=legacy;K8S_POD_NAME=web".into(),
            ..env("ADD")
        };
        assert!(
            run(&legacy, &conf(&dir, "")).success,
            "another namespace starts"
        );
        let del = run(&env("DEL"), &conf(&dir, ""));
        assert!(
            del.success && del.stdout.is_empty(),
            "DEL never fails: {del:?}"
        );
        // An unreadable decisions file says nothing may start uncaptured.
        std::fs::write(dir.join(decisions::FILE_NAME), "{trunc").unwrap();
        let held = run(&legacy, &conf(&dir, ""));
        assert_eq!(error_of(&held)["code"], 11, "{held:?}");
        assert!(held.stdout.contains("unreadable"), "{held:?}");
        decisions.write(&dir.join(decisions::FILE_NAME)).unwrap();
        let check = run(&env("CHECK"), &conf(&dir, ""));
        assert_eq!(error_of(&check)["code"], 11);
        let not_k8s = Env {
            args: String::new(),
            ..env("ADD")
        };
        assert!(run(&not_k8s, &conf(&dir, "")).success, "not a pod");
        let v11 = String::from_utf8(conf(&dir, "")).unwrap().replacen(
            "\"cniVersion\":\"1.0.0\"",
            "\"cniVersion\":\"1.1.0\"",
            1,
        );
        for verb in ["STATUS", "GC"] {
            assert!(run(&env(verb), v11.as_bytes()).success, "{verb}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cni_args_name_the_pod() {
        assert_eq!(
            pod_from_args(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc"
            ),
            Some(PodRef {
                namespace: "demo".into(),
                name: "web-0".into(),
                uid: None
            })
        );
        assert_eq!(pod_from_args("K8S_POD_NAMESPACE=demo"), None);
        assert_eq!(pod_from_args("K8S_POD_NAMESPACE=;K8S_POD_NAME=x"), None);
        assert_eq!(pod_from_args(""), None);
    }
}
