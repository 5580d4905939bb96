//! Worker HA: a worker that stops responding (SIGSTOP) loses its task's
//! lease; the leader fails that attempt, another worker runs the next, and
//! when the stopped worker resumes its late result is a duplicate that
//! changes nothing.

use std::time::{Duration, Instant};

use serde_json::json;
use ward_worker::Registry;

use crate::sandbox::{Sandbox, wait_ready};

fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn a_hung_worker_loses_its_lease_and_its_late_result_changes_nothing() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox
        .start_master_with(|config| config.dispatch.lease_grace_ms = 300)
        .await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "hung-worker", "gold").await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            "name: slowish
steps:
  - { id: work, kind: task, handler: sleep, timeout_ms: 700, retry: { max_attempts: 6, initial_delay_ms: 50 }, input: { sleep_ms: 400 } }
",
        )
        .await;
    // One worker process that takes one task at a time.
    let (worker_url, pid) = sandbox.spawn("ward-worker", &[("WARD_PREFETCH", "1")]);
    wait_ready(
        &sandbox.http,
        &format!("{worker_url}/readyz"),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let id = sandbox
        .start_instance(&url, &key, &json!({ "definition": "slowish" }))
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let instance = sandbox.instance(&url, &key, &id).await;
        if instance["steps"][0]["dispatched_at"].is_string() {
            break;
        }
        assert!(Instant::now() < deadline, "{instance}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The handler sleeps 400 ms: stop the worker in the middle of it.
    tokio::time::sleep(Duration::from_millis(150)).await;
    signal(pid, "STOP");
    sandbox.start_worker(Registry::builtin()).await;

    let instance = sandbox
        .wait_finished(&url, &key, &id, Duration::from_secs(30))
        .await;
    assert_eq!(instance["status"], "completed", "{instance}");
    let steps = instance["steps"].as_array().unwrap();
    assert_eq!(steps[0]["state"], "failed");
    assert_eq!(
        steps[0]["error"],
        "lease expired: the worker was lost or stopped responding"
    );
    let completed: Vec<_> = steps
        .iter()
        .filter(|step| step["state"] == "completed")
        .collect();
    assert_eq!(completed.len(), 1, "one attempt committed: {instance}");

    // The stopped worker resumes and finishes attempt 1: a duplicate, nothing changes.
    signal(pid, "CONT");
    sandbox
        .wait_metric(
            &worker_url,
            "ward_task_commits_total{result=\"duplicate\"} 1",
            Duration::from_secs(20),
        )
        .await;
    let after = sandbox.instance(&url, &key, &id).await;
    assert_eq!(after, instance, "the late result changed nothing");
    let metrics = sandbox.metrics(&url).await;
    assert!(
        metrics.contains("ward_task_leases_expired_total"),
        "{metrics}"
    );
    sandbox.teardown().await;
}
