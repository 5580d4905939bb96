//! Graceful shutdown of a worker process on SIGTERM: it stops taking work,
//! finishes in-flight tasks within its deadline, hands back the rest, exits.

use std::time::{Duration, Instant};

use serde_json::json;
use ward_worker::Registry;

use crate::sandbox::{Sandbox, sequential, wait_ready};

async fn started(sandbox: &Sandbox, url: &str, key: &str, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let instance = sandbox.instance(url, key, id).await;
        if instance["steps"][0]["dispatched_at"].is_string() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "task never dispatched: {instance}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sigterm_lets_the_in_flight_task_finish() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let url = sandbox.url(master);
    let (worker_url, pid) = sandbox.spawn("ward-worker", &[("WARD_SHUTDOWN_DEADLINE_MS", "10000")]);
    wait_ready(
        &sandbox.http,
        &format!("{worker_url}/readyz"),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let key = sandbox.tenant(&url, "night-shift", "gold").await;
    sandbox
        .publish(&url, &key, &sequential("slow", &["sleep"]))
        .await;
    let id = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "slow", "input": { "sleep_ms": 1500 } }),
        )
        .await;
    started(&sandbox, &url, &key, &id).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopped_at = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let child = sandbox
        .children
        .iter_mut()
        .find(|child| child.id() == Some(pid))
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(12), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let instance = sandbox.instance(&url, &key, &id).await;
    assert_eq!(
        instance["status"], "completed",
        "the worker finished its task before exiting: {instance}"
    );
    println!(
        "worker drained and exited in {:.2} s",
        stopped_at.elapsed().as_secs_f64()
    );
    sandbox.teardown().await;
}

#[tokio::test]
async fn sigterm_past_the_deadline_hands_the_task_back() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let url = sandbox.url(master);
    let (worker_url, pid) = sandbox.spawn("ward-worker", &[("WARD_SHUTDOWN_DEADLINE_MS", "300")]);
    wait_ready(
        &sandbox.http,
        &format!("{worker_url}/readyz"),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let key = sandbox.tenant(&url, "long-task", "bronze").await;
    sandbox
        .publish(&url, &key, &sequential("slower", &["sleep"]))
        .await;
    let id = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "slower", "input": { "sleep_ms": 4000 } }),
        )
        .await;
    started(&sandbox, &url, &key, &id).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopped_at = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let child = sandbox
        .children
        .iter_mut()
        .find(|child| child.id() == Some(pid))
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        stopped_at.elapsed() < Duration::from_secs(3),
        "exited within the deadline plus hand-back grace"
    );
    let instance = sandbox.instance(&url, &key, &id).await;
    assert_eq!(
        instance["status"], "running",
        "the stopped worker committed nothing"
    );

    // Another worker receives the handed-back task and completes it.
    sandbox.start_worker(Registry::builtin()).await;
    let instance = sandbox
        .wait_finished(&url, &key, &id, Duration::from_secs(30))
        .await;
    assert_eq!(instance["status"], "completed");
    assert_eq!(instance["steps"].as_array().unwrap().len(), 1);
    sandbox.teardown().await;
}
