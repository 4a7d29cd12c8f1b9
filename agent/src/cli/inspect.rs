//! `meshlet status|workloads|certs|policies`: read a running agent's admin API and print
//! tables a person can read at a glance (like `istioctl ztunnel-config`), or the JSON with
//! `-o json`.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// A JSON value as a table cell.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The ENROLLED cell: `yes (cni)`, `pending: <what it waits for>`, `no (<decision>)`; a pod
/// of another node that its agent should capture is `yes`.
fn capture_cell(w: &Value) -> String {
    match w["capture"]["state"].as_str() {
        Some("enrolled") => format!("yes ({})", text(&w["capture"]["via"])),
        Some("pending") => format!("pending: {}", text(&w["capture"]["reason"])),
        _ if w["enrolled"] == true => "yes".into(),
        _ => format!("no ({})", text(&w["decision"])),
    }
}

/// What to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// The agent's state in a few lines.
    Status,
    /// Every workload the agent knows.
    Workloads,
    /// Workload certificates.
    Certs,
    /// Policies and what meshlet makes of them.
    Policies,
    /// The policies that bear on one workload (`namespace/name`), and why.
    Explain(String),
}

/// Output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A table (also `text`).
    #[default]
    #[value(alias = "text")]
    Table,
    /// JSON: the admin API's (inspection commands), the report (preflight).
    Json,
}

/// GETs `path` from the admin API at `addr`.
pub fn fetch(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let unreachable = || {
        format!("cannot reach the meshlet admin API at {addr}: is the agent running on this node?")
    };
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).with_context(unreachable)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(unreachable)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response from the agent")?;
    let status = head.split(' ').nth(1).unwrap_or_default();
    if status != "200" {
        bail!("the agent answered {path} with {status}: {}", body.trim());
    }
    serde_json::from_str(body).with_context(|| format!("the agent's {path} is not JSON"))
}

/// Runs `meshlet <view>`.
pub fn run(view: View, addr: SocketAddr, output: Output) -> anyhow::Result<()> {
    let path = match &view {
        View::Status => "/config_dump".to_owned(),
        View::Workloads => "/workloads".to_owned(),
        View::Certs => "/certs".to_owned(),
        View::Policies => "/policies".to_owned(),
        View::Explain(workload) => format!("/policies?workload={workload}"),
    };
    let value = fetch(addr, &path)?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = match view {
        View::Status => {
            let store = &value["store"];
            let count = |kind: &str| store[kind].as_array().map_or(0, Vec::len);
            println!("node:        {}", text(&value["node"]));
            println!("synced:      {}", text(&value["synced"]));
            println!("source:      {}", text(&value["config"]["source"]["type"]));
            println!(
                "trust domain {}",
                text(&value["config"]["identity"]["trust_domain"])
            );
            println!(
                "cgroup root: {}",
                text(&value["config"]["capture"]["cgroup_root"])
            );
            println!(
                "fail mode:   {}",
                text(&value["config"]["capture"]["fail_mode"])
            );
            println!(
                "store:       {} namespaces, {} pods, {} services, {} endpoint slices, {} policies",
                count("namespaces"),
                count("pods"),
                count("services"),
                count("endpointSlices"),
                count("policies")
            );
            let workloads = fetch(addr, "/workloads")?;
            let node = text(&value["node"]);
            let on_node = |state: &str| {
                workloads.as_array().map_or(0, |w| {
                    w.iter()
                        .filter(|w| w["capture"]["state"] == state && text(&w["node"]) == node)
                        .count()
                })
            };
            println!(
                "enrolled:    {} pods on this node ({} pending)",
                on_node("enrolled"),
                on_node("pending")
            );
            return Ok(());
        }
        View::Workloads => {
            let mut rows = vec![
                [
                    "NAMESPACE",
                    "POD",
                    "IP",
                    "NODE",
                    "ENROLLED",
                    "PROTOCOL",
                    "IDENTITY",
                ]
                .map(String::from)
                .to_vec(),
            ];
            for w in value.as_array().into_iter().flatten() {
                let ips: Vec<String> = w["ips"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(text)
                    .collect();
                rows.push(vec![
                    text(&w["namespace"]),
                    text(&w["name"]),
                    ips.join(","),
                    text(&w["node"]),
                    capture_cell(w),
                    text(&w["protocol"]),
                    text(&w["identity"]),
                ]);
            }
            rows
        }
        View::Certs => {
            let mut rows = vec![
                ["IDENTITY", "ROLE", "STATE", "NOT AFTER", "SERIAL"]
                    .map(String::from)
                    .to_vec(),
            ];
            for c in value.as_array().into_iter().flatten() {
                rows.push(vec![
                    text(&c["identity"]),
                    "leaf".into(),
                    text(&c["state"]),
                    text(&c["not_after"]),
                    text(&c["serial"]),
                ]);
            }
            rows
        }
        View::Policies => {
            let mut rows = vec![
                [
                    "POLICY",
                    "KIND",
                    "ACTION/MODE",
                    "RULES",
                    "SELECTS",
                    "UNSUPPORTED",
                ]
                .map(String::from)
                .to_vec(),
            ];
            for p in value.as_array().into_iter().flatten() {
                let key = format!(
                    "{}/{}",
                    text(&p["key"]["namespace"]),
                    text(&p["key"]["name"])
                );
                let action = action_or_mode(p);
                let unsupported: Vec<String> = p["unsupported"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|u| text(&u["path"]))
                    .collect();
                rows.push(vec![
                    key,
                    text(&p["kind"]),
                    action,
                    text(&p["rules"]),
                    text(&p["selects"]),
                    if unsupported.is_empty() {
                        "-".into()
                    } else {
                        unsupported.join(",")
                    },
                ]);
            }
            rows
        }
        View::Explain(workload) => {
            let labels: Vec<String> = value["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", text(v)))
                .collect();
            println!("workload:  {workload} ({})", labels.join(","));
            let ports: Vec<String> = value["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| format!("port {} {}", text(&p["port"]), text(&p["mode"])))
                .collect();
            let mut mtls = text(&value["mtls"]);
            if !ports.is_empty() {
                mtls = format!("{mtls} ({})", ports.join(", "));
            }
            println!("mTLS:      {mtls}\n");
            let mut rows = vec![
                ["POLICY", "KIND", "ACTION/MODE", "STATUS", "WHY"]
                    .map(String::from)
                    .to_vec(),
            ];
            for p in value["policies"].as_array().into_iter().flatten() {
                rows.push(vec![
                    format!(
                        "{}/{}",
                        text(&p["key"]["namespace"]),
                        text(&p["key"]["name"])
                    ),
                    text(&p["kind"]),
                    action_or_mode(p),
                    text(&p["status"]).replace('_', " "),
                    text(&p["why"]),
                ]);
            }
            rows
        }
    };
    print!("{}", table(&rows));
    Ok(())
}

/// An AuthorizationPolicy's action (marked when it is a dry run), or a PeerAuthentication's
/// mode.
fn action_or_mode(p: &Value) -> String {
    if p["action"].is_null() {
        text(&p["mode"])
    } else if p["dry_run"] == true {
        format!("{} (dry run)", text(&p["action"]))
    } else {
        text(&p["action"])
    }
}

/// Left-aligned columns, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, s)| format!("{s:<width$}", width = widths[c]))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let rows = vec![
            vec!["A".to_owned(), "BB".to_owned()],
            vec!["long".to_owned(), "x".to_owned()],
        ];
        assert_eq!(table(&rows), "A     BB\nlong  x\n");
    }

    #[test]
    fn an_unreachable_agent_is_said_in_one_line() {
        // Port 9 on loopback: nothing listens.
        let err = fetch("127.0.0.1:9".parse().unwrap(), "/workloads").unwrap_err();
        assert!(
            format!("{err}").contains("is the agent running on this node?"),
            "{err}"
        );
    }
}
