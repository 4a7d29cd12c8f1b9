//! What an operator sees: Istio-named metrics from both nodes (parsed with a Prometheus text
//! parser, byte totals equal to what was sent), DENY on the destination, eBPF redirect counts,
//! readiness, and `meshlet workloads|certs|policies|status` against the running agents.

use std::{net::SocketAddr, time::Duration};

use meshlet_tests::{Cluster, http_get, mesh::FileMesh};
use serde_json::json;

fn scrape(cluster: &Cluster, node: usize) -> prometheus_parse::Scrape {
    cluster.scrape(node)
}

fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    meshlet_tests::sample(scrape, name, labels)
}

#[test]
fn metrics_logs_readiness_and_inspection_commands_tell_what_happened() {
    let setup = FileMesh::client_server(&[], vec![]);
    let cluster = &setup.cluster;
    let readiness: SocketAddr = "127.0.0.1:15021".parse().unwrap();
    assert_eq!(
        http_get(&cluster.node(0).netns, readiness, "/healthz/ready").0,
        200
    );
    // Liveness: the reconciler turns.
    assert_eq!(
        http_get(&cluster.node(0).netns, readiness, "/healthz/live"),
        (200, "live\n".to_owned())
    );
    let (status, body) = http_get(&cluster.node(0).netns, readiness, "/healthz/nope");
    assert_eq!(status, 404, "{body}");

    let _echo = cluster.pod("server").echo_server(8080);
    let server = cluster.pod("server").addr(false, 8080);
    for size in [1000, 3000] {
        cluster
            .pod("client")
            .connect(server, size)
            .assert_echoed(size);
    }
    // Plaintext from outside the mesh, then denied by a policy on the server.
    cluster
        .pod("bystander")
        .connect(server, 10)
        .assert_echoed(10);
    let deny_plaintext = json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-plaintext", "namespace": "demo"},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]},
                 {"to": [{"operation": {"methods": ["POST"]}}], "from": [{"source": {"principals": ["nobody"]}}]}]}
    });
    setup.write(&[deny_plaintext]);
    let denied = cluster.pod("bystander").connect(server, 10);
    assert!(denied.error.is_some() || denied.echoed == 0, "{denied:?}");
    setup.agents[0].wait_for_log("connection closed", 2, Duration::from_secs(5));
    setup.agents[1].wait_for_log("connection denied", 1, Duration::from_secs(5));
    // Each agent writes a connection's log line after counting it: the counters are final.
    setup.agents[1].wait_for_log("connection closed", 2, Duration::from_secs(5));

    let mesh = [
        ("source_workload", "client"),
        ("source_workload_namespace", "demo"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/demo/sa/client",
        ),
        ("destination_workload", "server"),
        ("destination_workload_namespace", "demo"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/demo/sa/server",
        ),
        ("connection_security_policy", "mutual_tls"),
        ("response_flags", "-"),
    ];
    for (node, reporter) in [(0, "source"), (1, "destination")] {
        let scrape = scrape(cluster, node);
        let labels: Vec<(&str, &str)> = mesh
            .iter()
            .copied()
            .chain([("reporter", reporter)])
            .collect();
        assert_eq!(
            sample(&scrape, "istio_tcp_connections_opened_total", &labels),
            Some(2.0),
            "node-{node}"
        );
        assert_eq!(
            sample(&scrape, "istio_tcp_connections_closed_total", &labels),
            Some(2.0),
            "node-{node}"
        );
        assert_eq!(
            sample(&scrape, "istio_tcp_received_bytes_total", &labels),
            Some(4000.0),
            "node-{node}"
        );
        assert_eq!(
            sample(&scrape, "istio_tcp_sent_bytes_total", &labels),
            Some(4000.0),
            "node-{node}"
        );
        assert_eq!(sample(&scrape, "meshlet_source_synced", &[]), Some(1.0));
        assert_eq!(
            sample(&scrape, "meshlet_enrolled_workloads", &[]),
            Some(1.0)
        );
        // No label from ports, addresses or connection ids.
        for s in &scrape.samples {
            for key in s.labels.keys() {
                assert!(
                    !["port", "source_ip", "connection_id"].contains(&key.as_str()),
                    "{key}"
                );
            }
        }
    }
    let node0 = scrape(cluster, 0);
    assert_eq!(
        sample(
            &node0,
            "meshlet_redirected_connections_total",
            &[("direction", "outbound")]
        ),
        Some(2.0)
    );
    let node1 = scrape(cluster, 1);
    let deny = [
        ("reporter", "destination"),
        ("source_workload", "bystander"),
        ("response_flags", "DENY"),
        ("connection_security_policy", "unknown"),
    ];
    assert_eq!(
        sample(&node1, "istio_tcp_connections_opened_total", &deny),
        Some(1.0)
    );
    assert_eq!(
        sample(&node1, "meshlet_policy_unsupported_fields", &[]),
        Some(1.0)
    );
    assert!(
        sample(
            &node1,
            "meshlet_certificate_expiry_seconds",
            &[("identity", "spiffe://cluster.local/ns/demo/sa/server")]
        )
        .unwrap()
            > 80_000.0
    );

    // The inspection commands, run on the nodes like `kubectl exec` into the agent.
    let meshlet = |node: usize, args: &[&str]| {
        let mut command = cluster.node_command(node, meshlet_tests::process::meshlet_binary());
        command.args(args);
        let out = command.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, workloads, _) = meshlet(0, &["workloads"]);
    assert!(ok);
    let client_row = workloads
        .lines()
        .find(|l| l.contains("client"))
        .expect("client row");
    for cell in [
        "demo",
        "10.244.0.10",
        "node-0",
        "yes",
        "HBONE",
        "spiffe://cluster.local/ns/demo/sa/client",
    ] {
        assert!(
            client_row.contains(cell),
            "{cell} missing from {client_row:?}\n{workloads}"
        );
    }
    assert!(
        workloads.lines().any(|l| l.contains("bystander")
            && l.contains("no (not_labelled)")
            && l.contains("TCP")),
        "{workloads}"
    );
    let (ok, certs, _) = meshlet(1, &["certs"]);
    assert!(
        ok && certs.contains("spiffe://cluster.local/ns/demo/sa/server") && certs.contains("valid"),
        "{certs}"
    );
    let (ok, policies, _) = meshlet(1, &["policies"]);
    assert!(
        ok && policies.contains("demo/deny-plaintext")
            && policies.contains("rules[1].to[0].operation.methods"),
        "{policies}"
    );
    let (ok, json, _) = meshlet(0, &["workloads", "-o", "json"]);
    assert!(
        ok && serde_json::from_str::<serde_json::Value>(&json)
            .unwrap()
            .as_array()
            .unwrap()
            .len()
            == 3
    );
    let (ok, status, _) = meshlet(0, &["status"]);
    assert!(
        ok && status.contains("synced:      true") && status.contains("enrolled:    1 pods"),
        "{status}"
    );
    let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
    assert_eq!(
        http_get(&cluster.node(0).netns, admin, "/logging?level=debug").0,
        200
    );
    setup.agents[0].wait_for_log("log level changed", 1, Duration::from_secs(5));
    assert_eq!(
        http_get(&cluster.node(0).netns, admin, "/logging?level=bogus=[").0,
        400
    );
    let node0 = scrape(cluster, 0);
    assert!(
        sample(
            &node0,
            "meshlet_process",
            &[("measure", "resident_memory_bytes")]
        )
        .unwrap()
            > 1e6
    );
    // The agent's runtime and its data-plane threads, one worker each.
    assert_eq!(
        sample(&node0, "meshlet_process", &[("measure", "tokio_workers")]),
        Some((meshlet::cli::RUNTIME_WORKERS + meshlet::cli::DATA_PLANE_THREADS) as f64)
    );
    let (ok, out, err) = meshlet(0, &["workloads", "--admin-addr", "127.0.0.1:1"]);
    assert!(
        !ok && out.is_empty() && err.lines().count() == 1 && err.contains("is the agent running"),
        "{err}"
    );
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_the_agent_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../deploy/grafana/meshlet-dashboard.json"))
            .expect("dashboard JSON");
    let exported = meshlet::metrics::Metrics::new();
    exported.observe_process();
    let labels = meshlet::metrics::ConnectionLabels {
        reporter: "source",
        ..Default::default()
    };
    exported.open(&labels);
    exported.close(&labels);
    exported.redirected.with_label_values(&["outbound"]).set(0);
    exported.certificate_expiry.with_label_values(&["x"]).set(0);
    let text = exported.render();
    let names: std::collections::HashSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let used: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("istio_") || w.starts_with("meshlet_"))
                .collect();
            assert!(!used.is_empty(), "{expr}");
            for metric in used {
                assert!(
                    names.contains(metric),
                    "panel {:?} queries {metric}, which the agent does not export",
                    panel["title"]
                );
            }
        }
    }
}

/// Istio's Workload, Service and Ztunnel dashboards, pointed at meshlet's agents: every label
/// their TCP queries name is exported, every query shows the traffic carried, and the
/// dropdowns list the workloads, namespaces, Services and clusters involved. Also the access
/// log: a line at the end of each connection on both nodes, in JSON on node-1.
#[test]
fn istios_dashboards_show_the_traffic_and_the_access_log_tells_each_connection() {
    use meshlet_tests::promql;
    const SERVICE: &str = "server.demo.svc.cluster.local";
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "server", "namespace": "demo"},
        "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "server"},
                 "ports": [{"name": "tcp", "port": 80, "targetPort": 8080}]}
    });
    // The client and addresses in the pod network are allowed, by one policy: the access log
    // names it.
    let allow = json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-known", "namespace": "demo"},
        "spec": {"action": "ALLOW", "rules": [
            {"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}]},
            {"from": [{"source": {"ipBlocks": ["10.244.0.0/16"]}}]}]}
    });
    let setup = FileMesh::layout(
        &[("client", 0), ("server", 1)],
        &[("bystander", 0)],
        vec![service, allow],
        |_, node| {
            if node == 1 {
                vec!["--log-format".into(), "json".into()]
            } else {
                vec![]
            }
        },
    );
    let cluster = &setup.cluster;
    let _server = cluster.pod("server").echo_server(8080);
    let _bystander = cluster.pod("bystander").echo_server(8080);
    let client = cluster.pod("client");
    client
        .connect("10.96.0.10:80".parse().unwrap(), 100)
        .assert_echoed(100);
    client
        .connect(cluster.pod("server").addr(false, 8080), 200)
        .assert_echoed(200);
    client
        .connect(cluster.pod("bystander").addr(false, 8080), 300)
        .assert_echoed(300);
    cluster
        .pod("bystander")
        .connect(cluster.pod("server").addr(false, 8080), 400)
        .assert_echoed(400);
    // Each agent writes a connection's line after counting it: the counters are final.
    setup.agents[0].wait_for_log("connection closed", 3, Duration::from_secs(5));
    setup.agents[1].wait_for_log("connection closed", 3, Duration::from_secs(5));
    let (node0_log, node1_log) = (setup.agents[0].log(), setup.agents[1].log());

    // The access log: node-0 in text, node-1 in JSON; addresses and names displayed, not
    // debug-printed; the policy that admitted each inbound connection.
    let text: Vec<&str> = node0_log
        .lines()
        .filter(|l| l.contains("meshlet::access"))
        .collect();
    assert_eq!(text.len(), 3, "{node0_log}");
    for line in &text {
        assert!(!line.contains("Some(") && !line.contains('"'), "{line}");
        for field in [
            "src=10.244.0.10:",
            "bytes_sent=",
            "duration_ms=",
            "direction=outbound",
        ] {
            assert!(line.contains(field), "{field} missing from {line}");
        }
    }
    assert!(
        text.iter()
            .any(|l| l.contains(&format!("dst_service={SERVICE}"))
                && l.contains("bytes_sent=100 bytes_received=100")),
        "{text:#?}"
    );
    let json_lines: Vec<serde_json::Value> = node1_log
        .lines()
        .filter(|l| l.contains("meshlet::access"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|err| panic!("{err}: {l}")))
        .collect();
    assert_eq!(json_lines.len(), 3, "{node1_log}");
    let hbone: Vec<&serde_json::Value> = json_lines
        .iter()
        .filter(|l| l["protocol"] == "HBONE")
        .collect();
    assert_eq!(
        hbone.len(),
        2,
        "both tunnelled connections: {json_lines:#?}"
    );
    for line in &hbone {
        assert_eq!(line["message"], "connection closed", "{line}");
        assert_eq!(line["direction"], "inbound", "{line}");
        assert_eq!(line["src_workload"], "demo/client", "{line}");
        assert_eq!(line["dst_workload"], "demo/server", "{line}");
        assert_eq!(
            line["src_identity"], "spiffe://cluster.local/ns/demo/sa/client",
            "{line}"
        );
        assert_eq!(line["policy"], "demo/allow-known", "{line}");
        assert!(line["duration_ms"].is_u64(), "{line}");
        assert!(
            line["src"].as_str().unwrap().starts_with("10.244.0.10:"),
            "{line}"
        );
    }
    let plaintext = json_lines
        .iter()
        .find(|l| l["protocol"] == "TCP")
        .expect("the bystander's connection");
    assert_eq!(plaintext["bytes_received"], 400, "{plaintext}");
    assert_eq!(plaintext["src_workload"], "legacy/bystander", "{plaintext}");
    assert_eq!(plaintext["policy"], "demo/allow-known", "{plaintext}");

    // The dashboards, on a Prometheus that scrapes both agents (their pods named meshlet-*).
    let mut series = promql::series(&cluster.scrape(0), &[("pod", "meshlet-x8k2p")]);
    series.extend(promql::series(
        &cluster.scrape(1),
        &[("pod", "meshlet-q4z7n")],
    ));
    let tcp: Vec<&promql::Series> = series
        .iter()
        .filter(|s| s.name.starts_with("istio_tcp_"))
        .collect();
    let queries: Vec<(&str, &str)> = include_str!("../fixtures/istio-dashboards.tsv")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split_once('\t').expect("dashboard<TAB>query"))
        .collect();
    assert_eq!(queries.len(), 35);
    for (dashboard, query) in &queries {
        for label in promql::label_names(query) {
            // `pod` is the scrape target's label, added by Prometheus.
            if label == "pod" {
                continue;
            }
            for s in &tcp {
                assert!(
                    s.labels.contains_key(&label),
                    "the {dashboard} dashboard reads {label}, missing from {s:?}"
                );
            }
        }
    }
    let all = ".*";
    let run = |query: &str, workload: &str| {
        let query = promql::substitute(
            query,
            &[
                ("qrep", "destination|source"),
                ("namespace", "demo"),
                ("workload", workload),
                ("srcns", all),
                ("srcwl", all),
                ("dstsvc", all),
                ("service", SERVICE),
                ("dstns", all),
                ("dstwl", all),
                ("dstcluster", all),
                ("__rate_interval", "1m"),
            ],
        )
        // The Ztunnel dashboard selects ztunnel's pods: pointed at meshlet's.
        .replace("ztunnel-.*", "meshlet-.*");
        promql::groups(&query, &series)
    };
    for (dashboard, query) in &queries {
        // The outbound panels of the Workload dashboard are about the client, the others about
        // the server.
        let workload = if query.contains("source_workload=~\"$workload\"") {
            "client"
        } else {
            "server"
        };
        let groups = run(query, workload);
        assert!(
            !groups.is_empty(),
            "the {dashboard} dashboard shows nothing for {workload}: {query}"
        );
        for group in &groups {
            for (label, value) in group {
                assert!(
                    !value.is_empty(),
                    "{label} is empty in {group:?} of {query}"
                );
            }
        }
    }
    // The dropdowns: each variable's query is found by what it groups by and a piece of it.
    let variable = |dashboard: &str, label: &str, piece: &str, workload: &str| {
        let (_, query) = queries
            .iter()
            .filter(|(d, q)| *d == dashboard && q.starts_with("query_result("))
            .find(|(_, q)| q.contains(&format!("by ({label})")) && q.contains(piece))
            .unwrap_or_else(|| panic!("no {label} variable in the {dashboard} dashboard"));
        promql::values(&run(query, workload), label)
    };
    let set = |values: &[&str]| values.iter().map(|v| v.to_string()).collect();
    assert_eq!(
        variable("workload", "destination_workload_namespace", "", ""),
        set(&["demo", "legacy"]),
        "the client's passthrough to the bystander is counted too"
    );
    assert_eq!(
        variable("workload", "destination_workload", "$namespace", ""),
        set(&["server"])
    );
    assert_eq!(
        variable("workload", "source_workload", "$srcns", "server"),
        set(&["bystander", "client"])
    );
    assert_eq!(
        variable("workload", "destination_service", "", "client"),
        set(&[SERVICE, "unknown"]),
        "addressed through the Service, then directly"
    );
    assert_eq!(
        variable("service", "source_cluster", "", ""),
        set(&["Kubernetes"])
    );
    assert_eq!(
        variable("service", "source_workload", "$srcns", ""),
        set(&["bystander", "client"]),
        "the destination names the Service of each connection to its endpoint"
    );
    assert_eq!(
        variable("service", "destination_cluster", "", ""),
        set(&["Kubernetes"])
    );
    assert_eq!(
        variable("service", "destination_workload", "$dstns", ""),
        set(&["server"])
    );
    let by_pod = run(queries.iter().find(|(d, _)| *d == "ztunnel").unwrap().1, "");
    assert_eq!(
        promql::values(&by_pod, "pod"),
        set(&["meshlet-q4z7n", "meshlet-x8k2p"])
    );
}
