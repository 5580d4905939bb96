//! Autoscaling without Kubernetes: `wardctl autoscale` follows the leader's
//! per-tier desired worker count. A burst scales a tier's workers up; after
//! it they scale back down to the minimum, draining before they exit, and
//! every instance of the burst completes.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::sandbox::{ADMIN_TOKEN, Sandbox, binary_path};

async fn gold(sandbox: &Sandbox, url: &str) -> Value {
    sandbox.cluster_status(url).await["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|tier| tier["tier"] == "gold")
        .cloned()
        .unwrap()
}

#[tokio::test]
async fn a_burst_scales_workers_up_then_down_without_losing_a_task() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox
        .start_master_with(|config| {
            config.autoscale.worker_slots = 2;
            config.autoscale.target_schedule_to_start_ms = 500;
            config.autoscale.workers_min = 1;
            config.autoscale.workers_max = 3;
        })
        .await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "burst", "gold").await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            "name: ward-round
steps:
  - { id: measure, kind: task, handler: sleep, input: { sleep_ms: 300 } }
",
        )
        .await;

    let log_dir = std::env::temp_dir().join(format!("{}-autoscale", sandbox.id));
    let targets = log_dir.join("autoscaler.json");
    std::fs::create_dir_all(&log_dir).unwrap();
    let mut env = sandbox.process_env("127.0.0.1:0");
    env.retain(|(name, _)| name != "WARD_HTTP_ADDR");
    env.push(("WARD_PREFETCH".into(), "2".into()));
    let mut autoscaler = tokio::process::Command::new(binary_path("wardctl"))
        .envs(env)
        .args(["--url", &url, "--admin-token", ADMIN_TOKEN, "autoscale"])
        .args(["--tier", "gold", "--min", "1", "--max", "3"])
        .args(["--interval-ms", "500", "--scale-down-delay-s", "3"])
        .args(["--port-base", "0"])
        .arg("--worker-bin")
        .arg(binary_path("ward-worker"))
        .arg("--node-prefix")
        .arg(format!("{}-auto", sandbox.id))
        .arg("--targets-file")
        .arg(&targets)
        .arg("--log-dir")
        .arg(&log_dir)
        .arg("--run-for-s")
        .arg("600")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // The minimum first: one registered worker.
    let deadline = Instant::now() + Duration::from_secs(30);
    while gold(&sandbox, &url).await["workers"] != 1 {
        assert!(
            Instant::now() < deadline,
            "the minimum worker never registered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A burst: 60 tasks of 300 ms on 2 slots per worker.
    let mut ids = Vec::new();
    for n in 0..60 {
        ids.push(
            sandbox
                .start_instance(
                    &url,
                    &key,
                    &json!({ "definition": "ward-round", "input": { "n": n } }),
                )
                .await,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut desired_max = 0;
    loop {
        let tier = gold(&sandbox, &url).await;
        desired_max = desired_max.max(tier["workers_desired"].as_i64().unwrap_or(0));
        if tier["workers"] == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "never scaled up: {tier}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(desired_max, 3, "the leader asked for the maximum");
    let listed: Value = serde_json::from_slice(&std::fs::read(&targets).unwrap()).unwrap();
    assert_eq!(
        listed[0]["targets"].as_array().unwrap().len(),
        3,
        "{listed}"
    );

    for id in &ids {
        let instance = sandbox
            .wait_finished(&url, &key, id, Duration::from_secs(60))
            .await;
        assert_eq!(instance["status"], "completed", "{instance}");
    }
    // After the burst: back to the minimum (the others drained and left).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tier = gold(&sandbox, &url).await;
        if tier["workers"] == 1 && tier["workers_desired"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never scaled down: {tier}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let listed: Value = serde_json::from_slice(&std::fs::read(&targets).unwrap()).unwrap();
    assert_eq!(
        listed[0]["targets"].as_array().unwrap().len(),
        1,
        "{listed}"
    );
    // No task was handed back or lost by the workers that stopped.
    let sql = sandbox.sql().await;
    let open: i64 = sql
        .query_one(
            "SELECT count(*) FROM task_runs WHERE state NOT IN ('completed')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 0);

    // SIGTERM: the autoscaler stops its last worker and exits cleanly.
    let pid = autoscaler.id().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(30), autoscaler.wait())
        .await
        .expect("autoscaler exit")
        .unwrap();
    assert!(output.success(), "{output:?}");
    let _ = autoscaler.stdout.take();
    sandbox.teardown().await;
    let _ = std::fs::remove_dir_all(&log_dir);
}

/// Publishes a desired-workers signal for `gold` as if from the leader of
/// `epoch`, straight into etcd.
async fn put_desired(sandbox: &Sandbox, epoch: i64, workers: i64) {
    let mut etcd = etcd_client::Client::connect(crate::sandbox::etcd_endpoints(), None)
        .await
        .unwrap();
    let value = json!({
        "epoch": epoch,
        "computed_at": chrono::Utc::now(),
        "tiers": { "gold": workers },
    });
    etcd.put(
        format!("{}/signals/workers-desired", sandbox.etcd_prefix()),
        serde_json::to_vec(&value).unwrap(),
        None,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_deposed_leaders_desired_workers_signal_is_not_obeyed() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let url = sandbox.url(master);
    sandbox.tenant(&url, "fenced", "gold").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let epoch = loop {
        if let Some(epoch) = sandbox.cluster_status(&url).await["leader"]["epoch"].as_i64() {
            break epoch;
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The current epoch's signal is what the status shows (the leader
    // rewrites its own every 2 s, so some reads may see that instead).
    let mut obeyed = 0;
    for _ in 0..5 {
        put_desired(&sandbox, epoch, 7).await;
        if gold(&sandbox, &url).await["workers_desired"] == 7 {
            obeyed += 1;
        }
    }
    assert!(obeyed > 0, "the current leader's signal was never shown");
    // A signal of an older epoch (a leader that lost its term but still
    // publishes) is never shown.
    for _ in 0..10 {
        put_desired(&sandbox, epoch - 1, 9).await;
        let tier = gold(&sandbox, &url).await;
        assert_ne!(
            tier["workers_desired"], 9,
            "a stale epoch's signal was obeyed: {tier}"
        );
    }
    sandbox.teardown().await;
}
