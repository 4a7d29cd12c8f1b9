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

/// From the bystander, outside the mesh: plaintext.
fn plaintext_to_server(setup: &FileMesh) -> ConnectReport {
    setup
        .cluster
        .pod("bystander")
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
    // The client's bytes went ahead of the CONNECT's answer; none of them reached the server.
    let log = setup.agents[1].log();
    let denied = log
        .lines()
        .find(|line| line.contains("denied by demo/deny-client"))
        .expect("the denial's access log line");
    assert!(denied.contains("response_flags=DENY"), "{denied}");
    assert!(denied.contains("bytes_received=0"), "{denied}");
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
    let bystander = || plaintext_to_server(&setup);
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

/// A PeerAuthentication in `namespace`, created at `created` (RFC 3339) when it is given.
fn peer_authentication(namespace: &str, name: &str, created: Option<&str>, spec: Value) -> Value {
    let mut metadata = json!({"name": name, "namespace": namespace});
    if let Some(created) = created {
        metadata["creationTimestamp"] = json!(created);
    }
    json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
           "metadata": metadata, "spec": spec})
}

/// Runs `meshlet <args>` against node `node`'s agent: whether it succeeded, its standard
/// output and its standard error.
fn run_meshlet(setup: &FileMesh, node: usize, args: &[&str]) -> (bool, String, String) {
    let out = setup
        .cluster
        .node_command(node, meshlet_tests::process::meshlet_binary())
        .args(args)
        .output()
        .expect("run meshlet");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `meshlet <args>` against node `node`'s agent: its standard output, asserting it succeeded.
fn meshlet(setup: &FileMesh, node: usize, args: &[&str]) -> String {
    let (ok, stdout, stderr) = run_meshlet(setup, node, args);
    assert!(ok, "meshlet {args:?}: {stdout}{stderr}");
    stdout
}

/// `meshlet <args>` against node `node`'s agent, expected to fail: its standard error.
fn meshlet_fails(setup: &FileMesh, node: usize, args: &[&str]) -> String {
    let (ok, _, stderr) = run_meshlet(setup, node, args);
    assert!(!ok, "meshlet {args:?} succeeded");
    stderr
}

/// The row of `policy` in `meshlet policies` output.
fn row<'a>(output: &'a str, policy: &str) -> &'a str {
    output
        .lines()
        .find(|line| line.starts_with(policy))
        .unwrap_or_else(|| panic!("no row for {policy}:\n{output}"))
}

#[test]
fn peer_authentication_scope_and_precedence_are_istios() {
    let setup = start();
    let _echo = setup.cluster.pod("server").echo_server(8080);
    let plaintext = || plaintext_to_server(&setup);
    let explain = || meshlet(&setup, 1, &["policies", "--workload", "demo/server"]);
    let strict = |selector: Option<Value>| {
        let mut spec = json!({"mtls": {"mode": "STRICT"}});
        if let Some(selector) = selector {
            spec["selector"] = selector;
        }
        spec
    };
    plaintext().assert_echoed(1000);

    // 1. "Mesh-wide policy: A policy specified for the root namespace without or with an empty
    //    selector field": a mesh-wide STRICT written with `selector: {}` refuses plaintext in
    //    every namespace.
    setup.write(&[peer_authentication(
        "istio-system",
        "mesh-strict",
        None,
        strict(Some(json!({}))),
    )]);
    assert_refused(&plaintext());
    let out = explain();
    assert!(out.contains("mTLS:      STRICT"), "{out}");
    assert!(
        row(&out, "istio-system/mesh-strict").contains("applies"),
        "{out}"
    );

    // 2. "Istio applies the narrowest matching policy": a namespace STRICT written with
    //    `selector: {}` is namespace-wide, and the server's own PERMISSIVE beats it.
    setup.write(&[
        peer_authentication("demo", "namespace-strict", None, strict(Some(json!({})))),
        peer_authentication(
            "demo",
            "server-permissive",
            None,
            json!({"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "PERMISSIVE"}}),
        ),
    ]);
    plaintext().assert_echoed(1000);
    let out = explain();
    assert!(out.contains("mTLS:      PERMISSIVE"), "{out}");
    assert!(
        row(&out, "demo/server-permissive").contains("applies"),
        "{out}"
    );
    assert!(
        row(&out, "demo/namespace-strict").contains("overridden"),
        "{out}"
    );

    // 3. "When you configure multiple ... namespace-wide peer authentication policies ...,
    //    Istio ignores the newer policies": the oldest decides, whatever the names say.
    let two = |permissive_at: &str, strict_at: &str| {
        setup.write(&[
            peer_authentication(
                "demo",
                "a-permissive",
                Some(permissive_at),
                json!({"mtls": {"mode": "PERMISSIVE"}}),
            ),
            peer_authentication("demo", "z-strict", Some(strict_at), strict(None)),
        ]);
    };
    two("2026-12-01T10:00:00Z", "2026-11-30T10:00:00Z");
    assert_refused(&plaintext());
    let out = explain();
    assert!(row(&out, "demo/z-strict").contains("applies"), "{out}");
    assert!(row(&out, "demo/a-permissive").contains("shadowed"), "{out}");
    two("2026-11-29T10:00:00Z", "2026-11-30T10:00:00Z");
    plaintext().assert_echoed(1000);
    let out = explain();
    assert!(row(&out, "demo/z-strict").contains("shadowed"), "{out}");

    // Mesh clients are mTLS throughout; an unknown workload and a malformed one are clear
    // errors.
    client_to_server(&setup).assert_echoed(1000);
    let err = meshlet_fails(&setup, 1, &["policies", "--workload", "demo/nobody"]);
    assert!(
        err.contains("no pod demo/nobody is known to this agent"),
        "{err}"
    );
    let err = meshlet_fails(&setup, 1, &["policies", "--workload", "server"]);
    assert!(err.contains("write namespace/name"), "{err}");
}

#[test]
fn a_dry_run_deny_logs_and_counts_but_lets_the_connection_through() {
    let setup = start();
    let _echo = setup.cluster.pod("server").echo_server(8080);
    let deny_client = |annotations: Value| {
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
               "metadata": {"name": "try-deny", "namespace": "demo", "annotations": annotations},
               "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "DENY",
                        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}]}]}})
    };
    setup.write(&[deny_client(json!({"istio.io/dry-run": "true"}))]);

    // The client's connection goes through: the DENY is only tried, logged and counted.
    client_to_server(&setup).assert_echoed(1000);
    setup.agents[1].wait_for_log(
        "dry-run policy would deny policy=demo/try-deny workload=demo/server",
        1,
        Duration::from_secs(5),
    );
    let counted = |result: &str| {
        setup.cluster.wait_metric(
            1,
            "meshlet_policy_dry_run_total",
            &[("policy", "demo/try-deny"), ("result", result)],
            1.0,
        )
    };
    assert_eq!(counted("denied"), 1.0);
    // A plaintext client is not the principal it names: it would have been let in.
    plaintext_to_server(&setup).assert_echoed(1000);
    assert_eq!(counted("allowed"), 1.0);
    assert_eq!(counted("denied"), 1.0, "counted once per connection");

    // Shown as what it is.
    let all = meshlet(&setup, 1, &["policies"]);
    assert!(
        row(&all, "demo/try-deny").contains("DENY (dry run)"),
        "{all}"
    );
    let out = meshlet(&setup, 1, &["policies", "--workload", "demo/server"]);
    assert!(row(&out, "demo/try-deny").contains("dry run"), "{out}");

    // Without the annotation the same policy denies.
    setup.write(&[deny_client(json!({}))]);
    assert_refused(&client_to_server(&setup));
    setup.agents[1].wait_for_log("denied by demo/try-deny", 1, Duration::from_secs(5));
}
