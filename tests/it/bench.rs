//! `ward-bench perf --cluster-url`: the benchmark measures a cluster that is
//! already running (here a sandbox's master and worker processes) instead
//! of starting its own, and leaves it running with its data.

use std::time::Duration;

use serde_json::Value;

use crate::sandbox::{ADMIN_TOKEN, Sandbox, amqp_url, binary_path, database_url};

#[tokio::test]
async fn perf_measures_a_running_cluster_by_its_url_and_leaves_it_running() {
    let mut sandbox = Sandbox::new().await;
    let (master, _) = sandbox.spawn("ward-master", &[]);
    let (worker, _) = sandbox.spawn("ward-worker", &[]);
    sandbox
        .wait_processes_ready(&[&master, &worker], Duration::from_secs(30))
        .await;
    let out = std::env::temp_dir().join(format!("ward-bench-attach-{}", sandbox.id));
    let run = tokio::process::Command::new(binary_path("ward-bench"))
        .arg("--database-url")
        .arg(database_url())
        .arg("--amqp-url")
        .arg(amqp_url())
        .arg("--out")
        .arg(&out)
        .args([
            "perf",
            "--quick",
            "--only",
            "throughput",
            "--measure-s",
            "2",
        ])
        .args(["--cluster-url", &master, "--admin-token", ADMIN_TOKEN])
        .args(["--schema", &sandbox.schema()])
        .arg("--process-urls")
        .arg(format!("{master},{worker}"))
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("ward-bench perf took over 5 minutes")
        .expect("run ward-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "ward-bench perf failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("perf-quick-only.json")).unwrap()).unwrap();
    assert_eq!(
        report["settings"]["attached_to"],
        master.as_str(),
        "{report}"
    );
    let throughput = &report["figures"]["throughput"];
    assert!(
        throughput["completed_in_window"].as_i64().unwrap_or(0) > 0
            && throughput["instances_per_s"].as_f64().unwrap_or(0.0) > 0.0,
        "{throughput}"
    );
    assert!(
        stdout.contains("| 1. throughput, single-step no-op tasks/s |"),
        "{stdout}"
    );

    // The cluster still runs, and its schema keeps what the benchmark did.
    sandbox
        .wait_processes_ready(&[&master, &worker], Duration::from_secs(5))
        .await;
    let completed: i64 = sandbox
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM instances WHERE definition_name = 'perf-noop' AND status = 'completed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        completed >= throughput["completed_in_window"].as_i64().unwrap(),
        "{completed} completed instances left in the schema"
    );
    let _ = std::fs::remove_dir_all(&out);
    sandbox.teardown().await;
}
