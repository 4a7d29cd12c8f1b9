//! The demo (`cargo xtask demo`) runs end to end, checks its own claims, and cleans up.

use std::process::Command;

use meshlet_tests::TEST_PREFIX;

#[test]
fn the_demo_walks_through_every_step_and_leaves_nothing_behind() {
    meshlet_tests::require_root();
    let out = Command::new(env!("CARGO_BIN_EXE_meshlet-demo"))
        .output()
        .expect("run meshlet-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in 1..=9 {
        assert!(
            stdout.contains(&format!("[{step}/9]")),
            "step {step} missing:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("application plaintext seen: false"),
        "{stdout}"
    );
    assert!(
        stdout.contains("is refused: no_pod_on_node"),
        "the CA step shows a node refused another node's identity:\n{stdout}"
    );
    assert!(
        stdout.contains("pod enrolled before its containers start pod=demo/newcomer"),
        "the CNI step shows the new pod held until captured:\n{stdout}"
    );
    let id = stdout
        .split(['(', ')'])
        .nth(1)
        .expect("cluster id in the banner");
    assert!(id.starts_with(TEST_PREFIX));
    let netns = std::fs::read_dir("/var/run/netns")
        .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
        .unwrap_or_default();
    assert!(
        !netns.iter().any(|n| n.to_string_lossy().starts_with(id)),
        "demo left namespaces: {netns:?}"
    );
}
