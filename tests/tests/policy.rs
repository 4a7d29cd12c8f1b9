//! Istio-compatible L4 policy, enforced by the destination's agent: AuthorizationPolicy on
//! HBONE and plaintext connections, PeerAuthentication STRICT against plaintext, and a policy
//! change cutting a live connection it now denies.

use std::time::Duration;

use meshlet_tests::{ConnectReport, mesh::FileMesh, process::Outcome};
use serde_json::{Value, json};

/// client (node-0) and server (node-1) in the mesh, bystander (node-0) outside it.
fn start() -> FileMesh {
    FileMesh::client_server(&[], vec![])
}

fn client_to_server(setup: &FileMesh) -> ConnectReport {
    setup
        .cluster
        .pod("client")
        .connect(setup.cluster.pod("server").addr(false, 8080), 1000)
}

fn authorization(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": name, "namespace": "demo"}, "spec": spec})
}

/// A refused connection: the application sees it reset (the destination answered the
/// CONNECT with 401 and the client's agent reset the application's connection, or the
/// destination's agent reset a plaintext one).
fn assert_refused(report: &ConnectReport) {
    report.assert_failed(Outcome::Reset);
}

#[test]
fn deny_and_allow_policies_decide_at_the_destination() {
    let setup = start();
    let _echo = setup.cluster.pod("server").echo_server(8080);
    client_to_server(&setup).assert_echoed(1000);

    let deny_client = authorization(
        "deny-client",
        json!({"selector": {"matchLabels": {"app": "server"}}, "action": "DENY",
               "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}]}]}),
    );
    setup.write(&[deny_client]);
    assert_refused(&client_to_server(&setup));
    setup.agents[1].wait_for_log("denied by demo/deny-client", 1, Duration::from_secs(5));
    assert!(setup.agents[1].log().contains("response_flags=\"DENY\""));
    setup.agents[0].wait_for_log("401 Unauthorized", 1, Duration::from_secs(5));

    // ALLOW for someone else: denied; ALLOW for the client: allowed.
    let allow = |name: &str, principal: &str| {
        authorization(
            name,
            json!({"selector": {"matchLabels": {"app": "server"}},
            "rules": [{"from": [{"source": {"principals": [principal]}}], "to": [{"operation": {"ports": ["8080"]}}]}]}),
        )
    };
    setup.write(&[allow(
        "allow-other",
        "cluster.local/ns/demo/sa/someone-else",
    )]);
    // An ALLOW for another principal: the client is denied.
    assert_refused(&client_to_server(&setup));
    setup.write(&[allow("allow-client", "cluster.local/ns/demo/sa/client")]);
    client_to_server(&setup).assert_echoed(1000);
    // HTTP-only fields make an ALLOW rule match nothing (fail safe), and are reported.
    let http_only = authorization(
        "allow-get",
        json!({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
    );
    setup.write(&[http_only]);
    assert_refused(&client_to_server(&setup));
    setup.agents[1].wait_for_log(
        "rules[0].to[0].operation.methods",
        1,
        Duration::from_secs(5),
    );
    setup.write(&[]);
    client_to_server(&setup).assert_echoed(1000);
}

#[test]
fn strict_peer_authentication_refuses_plaintext_and_permissive_lets_it_in() {
    let setup = start();
    let _echo = setup.cluster.pod("server").echo_server(8080);
    let bystander = || {
        setup
            .cluster
            .pod("bystander")
            .connect(setup.cluster.pod("server").addr(false, 8080), 1000)
    };
    bystander().assert_echoed(1000);
    let peer_authentication = |mode: &str| {
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
               "metadata": {"name": "default", "namespace": "demo"}, "spec": {"mtls": {"mode": mode}}})
    };
    setup.write(&[peer_authentication("STRICT")]);
    assert_refused(&bystander());
    setup.agents[1].wait_for_log("PeerAuthentication STRICT", 1, Duration::from_secs(5));
    // Mesh clients are mTLS: unaffected.
    client_to_server(&setup).assert_echoed(1000);
    setup.write(&[peer_authentication("PERMISSIVE")]);
    bystander().assert_echoed(1000);
}

#[test]
fn a_policy_change_cuts_a_live_connection_it_now_denies() {
    let setup = start();
    let _echo = setup.cluster.pod("server").echo_server(8080);
    let to = setup.cluster.pod("server").addr(false, 8080);
    std::thread::scope(|scope| {
        // Connect now, send in 3 s: the connection is established and admitted before the
        // policy arrives.
        let open = scope.spawn(|| {
            setup
                .cluster
                .pod("client")
                .connect_with(to, 1000, &["--delay-ms", "3000"])
        });
        // Admitted: the destination counted it opened.
        setup.cluster.wait_metric(
            1,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination"), ("response_flags", "-")],
            1.0,
        );
        setup.write(&[authorization(
            "deny-all",
            json!({"action": "DENY", "rules": [{}]}),
        )]);
        setup.agents[1].wait_for_log(
            "closed live connections it now denies",
            1,
            Duration::from_secs(5),
        );
        // The live connection is cut: the destination drops both its sockets, and the
        // application, mid-exchange, sees its connection end before the echo came back.
        let report = open.join().unwrap();
        assert!(
            matches!(report.outcome, Some(Outcome::Closed | Outcome::Reset)) && report.echoed == 0,
            "the live connection survived a policy that denies it: {report:?}"
        );
    });
}
