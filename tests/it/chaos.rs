//! The fault harness, short run: `ward-bench chaos --quick` starts its own
//! Postgres, RabbitMQ and etcd, 3 masters and 3 workers, injects every kind
//! of fault once under load and checks the history (it exits non-zero when
//! anything was lost, duplicated, stuck or written from a stale epoch).
//! `deploy/test` runs this module on its own, after the rest of the suite,
//! so its load does not slow the other tests.

use std::time::Duration;

use serde_json::Value;

use crate::sandbox::binary_path;

#[tokio::test]
async fn every_fault_kind_once_loses_and_duplicates_nothing() {
    let out = std::env::temp_dir().join(format!("ward-chaos-test-{}", std::process::id()));
    let bin_dir = binary_path("ward-master")
        .parent()
        .expect("binary folder")
        .to_path_buf();
    // Its own process group: on a timeout the whole group (the services and
    // the cluster it started) is killed, not only ward-bench.
    let child = tokio::process::Command::new(binary_path("ward-bench"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--out")
        .arg(&out)
        .args(["chaos", "--quick", "--rate-per-s", "8"])
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run ward-bench");
    let group = child.id().expect("ward-bench pid");
    let output =
        match tokio::time::timeout(Duration::from_secs(900), child.wait_with_output()).await {
            Ok(output) => output.expect("ward-bench output"),
            Err(_) => {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{group}")])
                    .status();
                panic!("the quick chaos run took over 15 minutes");
            }
        };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "chaos run failed:\n{stdout}\n{stderr}"
    );

    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("chaos-quick.json")).unwrap()).unwrap();
    let figures = &report["figures"];
    for kind in [
        "kill_leader",
        "kill_standby",
        "kill_worker",
        "stop_leader",
        "stop_worker",
        "restart_rabbitmq",
        "restart_postgres",
        "restart_etcd",
    ] {
        assert!(
            figures["faults_by_kind"][kind].as_u64().unwrap_or(0) >= 1,
            "{kind} not injected: {figures}"
        );
    }
    assert!(
        figures["submitted_acknowledged"].as_u64().unwrap() > 100,
        "{figures}"
    );
    for zero in [
        "lost",
        "stuck",
        "duplicated_effects",
        "completed_missing_effects",
        "committed_without_execution",
        "stale_epoch_writes_accepted",
    ] {
        assert_eq!(figures[zero], 0, "{zero}: {figures}");
    }
    assert_eq!(
        figures["completed"].as_u64().unwrap() + figures["failed"].as_u64().unwrap(),
        figures["submitted_acknowledged"].as_u64().unwrap(),
        "{figures}"
    );
    assert!(
        figures["executions"].as_i64().unwrap() >= figures["committed_effects"].as_i64().unwrap(),
        "{figures}"
    );
    // A standby took over within the lease TTL plus a few seconds (the
    // contract is TTL + 2 s; the slack absorbs a loaded CI machine).
    let ttl = figures["lease_ttl_s"].as_f64().unwrap();
    assert!(
        figures["leader_failover_s"]["max"].as_f64().unwrap() <= ttl + 3.0,
        "{figures}"
    );
    assert_eq!(figures["failed"], 0, "{figures}");
    let _ = std::fs::remove_dir_all(&out);
}
