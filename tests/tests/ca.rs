//! `meshlet ca` end to end: the real CA process, authenticating callers through a stand-in API
//! server's `TokenReview`, refusing what it must (each refusal's reason asserted), sharing one
//! root between replicas, and serving agents that keep their certificates through its outage.

use std::{
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use meshlet::proto::IstioCertificateRequest;
use meshlet_tests::{
    Cluster,
    kube_api::{ApiServer, TokenSpec},
    mesh_ca::{self, AUDIENCE, MeshCa, SYSTEM},
    namespace_manifest, wait_enrolled,
};
use rcgen::{CertificateParams, KeyPair, SanType, string::Ia5String};
use serde_json::json;
use tonic::Code;

const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("meshlet-ca-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pod(name: &str, node: &str, sa: &str, phase: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo", "uid": format!("uid-{name}")},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": phase},
    })
}

fn csr(uris: &[&str], dns: &[&str]) -> String {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params =
        CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>()).unwrap();
    for uri in uris {
        params
            .subject_alt_names
            .push(SanType::URI(Ia5String::try_from(*uri).unwrap()));
    }
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn request(csr: String, validity: i64, impersonate: Option<&str>) -> IstioCertificateRequest {
    IstioCertificateRequest {
        csr,
        validity_duration: validity,
        metadata: impersonate.map(IstioCertificateRequest::impersonating),
    }
}

/// The last certificate of a chain: the root.
fn root_of(chain: &[String]) -> String {
    chain.last().expect("a chain").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_signs_only_identities_bound_to_the_callers_node_and_says_why_it_refuses() {
    let scratch = Scratch::new("refusals");
    let api = ApiServer::start();
    let kubeconfig = scratch.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    api.apply(namespace_manifest("demo", &[]));
    api.apply(pod("web-1", "node-1", "web", "Running"));
    api.apply(pod("batch-1", "node-1", "batch", "Succeeded"));
    api.apply(pod("db-2", "node-2", "db", "Running"));

    let ca = MeshCa::start(&kubeconfig, mesh_ca::free_port(), &[]);
    let bundle = scratch.0.join("root-cert.pem");
    mesh_ca::write_trust_bundle(&api, &bundle);
    let client = mesh_ca::client(&ca, &bundle);
    let agent = mesh_ca::agent_token(&api, "node-1");

    // Signed: the node agent of node-1 asks for an identity with a running pod there.
    let chain = client
        .call(request(csr(&[WEB], &[]), 3600, Some(WEB)), Some(&agent))
        .await
        .expect("signed");
    assert!(chain.cert_chain.len() >= 2, "leaf and root: {chain:?}");
    let leaf = pem::parse(&chain.cert_chain[0]).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.contents()).unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let left = cert.validity().not_after.timestamp() - now;
    assert!(
        (3500..=3600).contains(&left),
        "valid {left} s more, asked 3600"
    );
    assert_eq!(ca.requests("signed"), 1.0);

    let expired = api.mint_token(TokenSpec {
        namespace: SYSTEM.to_owned(),
        service_account: "meshlet".to_owned(),
        audiences: vec![AUDIENCE.to_owned()],
        pod: None,
        node: Some("node-1".to_owned()),
        expires: SystemTime::now() - Duration::from_secs(1),
    });
    let wrong_audience = api.mint_token(TokenSpec {
        namespace: SYSTEM.to_owned(),
        service_account: "meshlet".to_owned(),
        audiences: vec!["kubernetes".to_owned()],
        pod: None,
        node: Some("node-1".to_owned()),
        expires: SystemTime::now() + Duration::from_secs(600),
    });
    // A workload's own token, bound to its pod on node-1: not a node agent.
    let workload = api.mint_token(TokenSpec {
        namespace: "demo".to_owned(),
        service_account: "web".to_owned(),
        audiences: vec![AUDIENCE.to_owned()],
        pod: Some(("web-1".to_owned(), "uid-web-1".to_owned())),
        node: None,
        expires: SystemTime::now() + Duration::from_secs(600),
    });
    let forged = format!("{agent}x");

    let db = "spiffe://cluster.local/ns/demo/sa/db";
    let batch = "spiffe://cluster.local/ns/demo/sa/batch";
    let cases: Vec<(&str, IstioCertificateRequest, Option<&str>, Code, &str)> = vec![
        (
            "no token",
            request(csr(&[WEB], &[]), 0, None),
            None,
            Code::Unauthenticated,
            "no_token",
        ),
        (
            "expired token",
            request(csr(&[WEB], &[]), 0, None),
            Some(&expired),
            Code::Unauthenticated,
            "token_invalid",
        ),
        (
            "forged token",
            request(csr(&[WEB], &[]), 0, None),
            Some(&forged),
            Code::Unauthenticated,
            "token_invalid",
        ),
        (
            "token for another audience",
            request(csr(&[WEB], &[]), 0, None),
            Some(&wrong_audience),
            Code::Unauthenticated,
            "token_invalid",
        ),
        (
            "not a node agent",
            request(csr(&[db], &[]), 0, Some(db)),
            Some(&workload),
            Code::PermissionDenied,
            "not_node_agent",
        ),
        (
            "no pod on the caller's node",
            request(csr(&[db], &[]), 0, Some(db)),
            Some(&agent),
            Code::PermissionDenied,
            "no_pod_on_node",
        ),
        (
            "only a finished pod",
            request(csr(&[batch], &[]), 0, Some(batch)),
            Some(&agent),
            Code::PermissionDenied,
            "pod_finished",
        ),
        (
            "two SANs",
            request(csr(&[WEB, db], &[]), 0, Some(WEB)),
            Some(&agent),
            Code::InvalidArgument,
            "bad_sans",
        ),
        (
            "a DNS SAN",
            request(csr(&[WEB], &["web.demo.svc"]), 0, Some(WEB)),
            Some(&agent),
            Code::InvalidArgument,
            "bad_sans",
        ),
        (
            "another trust domain",
            request(csr(&["spiffe://evil.local/ns/demo/sa/web"], &[]), 0, None),
            Some(&agent),
            Code::InvalidArgument,
            "foreign_trust_domain",
        ),
        (
            "metadata naming another identity",
            request(csr(&[WEB], &[]), 0, Some(db)),
            Some(&agent),
            Code::InvalidArgument,
            "identity_mismatch",
        ),
        (
            "validity above the cap",
            request(csr(&[WEB], &[]), 86401, Some(WEB)),
            Some(&agent),
            Code::InvalidArgument,
            "validity",
        ),
        (
            "a garbage CSR",
            request(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                    .to_owned(),
                0,
                None,
            ),
            Some(&agent),
            Code::InvalidArgument,
            "bad_csr",
        ),
    ];
    for (what, message, token, code, reason) in cases {
        let before = ca.requests(reason);
        let status = client
            .call(message, token)
            .await
            .expect_err(&format!("{what}: signed"));
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            status.message().starts_with(&format!("{reason}: ")),
            "{what}: {:?}",
            status.message()
        );
        assert_eq!(
            ca.requests(reason),
            before + 1.0,
            "{what}: counted under {reason}"
        );
    }
    // The workload may ask for its own identity (its pod is on node-1).
    let own = client
        .call(request(csr(&[WEB], &[]), 0, None), Some(&workload))
        .await;
    assert!(own.is_ok(), "{own:?}");

    // A pod scheduled a moment ago is found even if the watch has not delivered it yet: the
    // CA confirms a miss with the API server.
    api.apply(pod("db-1", "node-1", "db", "Running"));
    let fresh = client
        .call(request(csr(&[db], &[]), 0, Some(db)), Some(&agent))
        .await;
    assert!(fresh.is_ok(), "{fresh:?}");
    // Every decision is logged with caller, node and identity.
    let log = ca.process.log();
    assert!(
        log.contains("refused a certificate request")
            && log.contains("caller=\"meshlet-system/meshlet\"")
            && log.contains("node=\"node-1\""),
        "{log}"
    );
    assert!(api.token_reviews() >= 14, "each request is reviewed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_root_they_create_once() {
    let scratch = Scratch::new("replicas");
    let api = ApiServer::start();
    let kubeconfig = scratch.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    api.apply(namespace_manifest("demo", &[]));
    api.apply(pod("web-1", "node-1", "web", "Running"));
    let agent = mesh_ca::agent_token(&api, "node-1");

    let first = MeshCa::start(&kubeconfig, mesh_ca::free_port(), &[]);
    let secret = api
        .get("Secret", SYSTEM, "meshlet-ca")
        .expect("root Secret created");
    let second = MeshCa::start(&kubeconfig, mesh_ca::free_port(), &[]);
    assert_eq!(
        api.get("Secret", SYSTEM, "meshlet-ca").unwrap()["metadata"]["resourceVersion"],
        secret["metadata"]["resourceVersion"],
        "the second replica reuses the root, it does not replace it"
    );
    let bundle = scratch.0.join("root-cert.pem");
    mesh_ca::write_trust_bundle(&api, &bundle);
    let mut roots = Vec::new();
    for ca in [&first, &second] {
        let chain = mesh_ca::client(ca, &bundle)
            .call(request(csr(&[WEB], &[]), 0, Some(WEB)), Some(&agent))
            .await
            .expect("signed");
        roots.push(root_of(&chain.cert_chain));
    }
    assert_eq!(roots[0], roots[1], "both replicas sign under one root");
    // And a restart keeps it too.
    drop(first);
    let third = MeshCa::start(&kubeconfig, mesh_ca::free_port(), &[]);
    let chain = mesh_ca::client(&third, &bundle)
        .call(request(csr(&[WEB], &[]), 0, Some(WEB)), Some(&agent))
        .await
        .expect("signed");
    assert_eq!(root_of(&chain.cert_chain), roots[0]);
}

/// Waits until `condition` holds, polling; panics with `what` after `timeout`.
fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < timeout, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn agents_get_certificates_from_the_ca_and_keep_serving_through_its_restart() {
    let mut cluster = Cluster::new(2);
    cluster.add_pod("client", 0);
    cluster.add_pod("server", 1);
    let scratch = Scratch::new(cluster.id());
    let api = ApiServer::start();
    let kubeconfig = scratch.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let ambient = [("meshlet.io/dataplane-mode", "ambient")];
    api.apply(namespace_manifest("demo", &ambient));
    api.apply(cluster.pod("client").manifest("demo", &[("app", "client")]));
    api.apply(cluster.pod("server").manifest("demo", &[("app", "server")]));

    let port = mesh_ca::free_port();
    let mut ca = MeshCa::start(&kubeconfig, port, &[]);
    let bundle = scratch.0.join("root-cert.pem");
    mesh_ca::write_trust_bundle(&api, &bundle);

    let kube = kubeconfig.to_str().unwrap();
    let agents: Vec<_> = (0..2)
        .map(|i| {
            let node = format!("node-{i}");
            let token = mesh_ca::token_file(&scratch.0, &node, &mesh_ca::agent_token(&api, &node));
            let url = ca.url();
            cluster.start_agent_with_env(
                i,
                &[
                    "--source",
                    "kube",
                    "--ca-address",
                    &url,
                    "--ca-root",
                    bundle.to_str().unwrap(),
                    "--ca-token-path",
                    token.to_str().unwrap(),
                    // Short-lived, so renewal happens within the test: due after ~9 s.
                    "--cert-lifetime",
                    "20s",
                ],
                &[("KUBECONFIG", kube)],
            )
        })
        .collect();
    for (i, pod) in ["client", "server"].iter().enumerate() {
        wait_enrolled(
            &cluster.bpffs_dir(i),
            vec![cluster.pod(pod).netns_cookie()],
            Duration::from_secs(20),
        );
        agents[i].wait_for_log(
            "obtained a workload certificate",
            1,
            Duration::from_secs(10),
        );
    }
    let _echo = cluster.pod("server").echo_server(8080);
    let to = cluster.pod("server").addr(false, 8080);
    cluster.pod("client").connect(to, 4096).assert_echoed(4096);
    assert!(ca.requests("signed") >= 2.0);
    let metrics = |agent: &meshlet_tests::process::Agent| {
        let (_, text) = mesh_ca::get(agent.endpoint("metrics"), "/metrics");
        text
    };
    assert!(
        metrics(&agents[1]).contains("connection_security_policy=\"mutual_tls\""),
        "the connection went over HBONE"
    );
    for agent in &agents {
        assert_eq!(
            mesh_ca::sample(&metrics(agent), "meshlet_ca_reachable"),
            Some(1.0)
        );
    }

    // The CA goes away. The first renewal (~9 s in) fails; the certificates keep serving.
    ca.process.stop();
    for agent in &agents {
        wait_for(
            "the agent notices the CA is down",
            Duration::from_secs(30),
            || mesh_ca::sample(&metrics(agent), "meshlet_ca_reachable") == Some(0.0),
        );
    }
    let (status, body) = mesh_ca::get(agents[0].endpoint("readiness"), "/healthz/ready");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("unreachable") && body.contains("still valid"),
        "{body}"
    );
    // Traffic flows on the existing certificates.
    cluster.pod("client").connect(to, 4096).assert_echoed(4096);

    // It comes back on the same address with the same root: the agents renew.
    ca = MeshCa::start(&kubeconfig, port, &[]);
    for agent in &agents {
        agent.wait_for_log("renewed a workload certificate", 1, Duration::from_secs(30));
        wait_for(
            "the agent sees the CA again",
            Duration::from_secs(10),
            || mesh_ca::sample(&metrics(agent), "meshlet_ca_reachable") == Some(1.0),
        );
    }
    // And on the renewed ones.
    cluster.pod("client").connect(to, 4096).assert_echoed(4096);
    assert!(
        ca.requests("signed") >= 2.0,
        "the restarted CA signed the renewals"
    );
}
