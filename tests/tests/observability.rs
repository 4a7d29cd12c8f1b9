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
    assert!(sample(&node0, "meshlet_process", &[("measure", "tokio_workers")]).unwrap() >= 1.0);
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
