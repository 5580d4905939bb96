//! Worker HA, operator's view: masters and workers register in etcd with a
//! lease (`GET /v1/admin/cluster`, `wardctl cluster status`), and a poison
//! task that kills every worker it reaches stops at the delivery limit and
//! lands in the dead-letter table without blocking other tenants.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use ward_worker::Registry;

use crate::sandbox::{ADMIN_TOKEN, Sandbox, binary_path, wait_ready};

async fn wait_cluster(
    sandbox: &Sandbox,
    url: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = sandbox.cluster_status(url).await;
        if done(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "{what}: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn masters_and_workers_register_and_leave_the_cluster_status() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let url = sandbox.url(master);
    sandbox.start_worker(Registry::builtin()).await;
    let mut second = sandbox.worker_config();
    second.node_id = format!("{}-bronze-only", sandbox.id);
    second.tiers = vec!["bronze".into()];
    let worker = ward_worker::Worker::start(second, Registry::builtin())
        .await
        .unwrap();

    let status = wait_cluster(&sandbox, &url, "two workers registered", |status| {
        status["workers"].as_array().map(Vec::len) == Some(2) && !status["leader"].is_null()
    })
    .await;
    assert_eq!(status["masters"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(
        status["masters"][0]["node_id"], status["leader"]["node_id"],
        "{status}"
    );
    let tier = |status: &Value, name: &str| {
        status["tiers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|tier| tier["tier"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no tier {name}: {status}"))
    };
    assert_eq!(tier(&status, "gold")["workers"], 1, "{status}");
    assert_eq!(tier(&status, "bronze")["workers"], 2, "{status}");
    sandbox
        .wait_metric(
            &url,
            "ward_workers_registered{tier=\"bronze\"} 2",
            Duration::from_secs(10),
        )
        .await;

    // wardctl prints the same as tables.
    let output = tokio::process::Command::new(binary_path("wardctl"))
        .args([
            "--url",
            &url,
            "--admin-token",
            ADMIN_TOKEN,
            "cluster",
            "status",
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains(&format!("{}-bronze-only", sandbox.id)),
        "{text}"
    );
    assert!(text.starts_with("leader: "), "{text}");
    assert!(text.contains("TIER"), "{text}");

    // A worker that leaves (graceful) disappears at once: it revokes its lease.
    worker.shutdown().await.unwrap();
    wait_cluster(&sandbox, &url, "one worker left", |status| {
        status["workers"].as_array().map(Vec::len) == Some(1)
    })
    .await;

    // Without the admin token: 401 with a JSON body.
    let (code, body) = sandbox
        .call(
            reqwest::Method::GET,
            &format!("{url}/v1/admin/cluster"),
            Some("wrong"),
            None,
        )
        .await;
    assert_eq!(code, 401, "{body}");
    sandbox.teardown().await;
}

#[tokio::test]
async fn a_poison_task_is_dead_lettered_without_blocking_other_tenants() {
    const DELIVERY_LIMIT: &str = "2";
    let mut sandbox = Sandbox::new().await;
    let master = sandbox
        .start_master_with(|config| config.amqp.delivery_limit = 2)
        .await;
    let url = sandbox.url(master);
    let poisoned = sandbox.tenant(&url, "poisoned", "gold").await;
    let healthy = sandbox.tenant(&url, "healthy", "gold").await;
    sandbox
        .publish_yaml(
            &url,
            &poisoned,
            "name: poison
steps:
  - { id: crash, kind: task, handler: crash, retry: { max_attempts: 5 } }
",
        )
        .await;
    sandbox
        .publish_yaml(
            &url,
            &healthy,
            "name: fine
steps:
  - { id: work, kind: task, handler: noop }
",
        )
        .await;
    let worker_env = [
        ("WARD_FAULT_HANDLERS", "true"),
        ("WARD_PREFETCH", "1"),
        ("WARD_AMQP__DELIVERY_LIMIT", DELIVERY_LIMIT),
    ];
    let mut workers = Vec::new();
    for _ in 0..2 {
        workers.push(sandbox.spawn("ward-worker", &worker_env));
    }
    for (worker_url, _) in &workers {
        wait_ready(
            &sandbox.http,
            &format!("{worker_url}/readyz"),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    }
    let poison = sandbox
        .start_instance(&url, &poisoned, &json!({ "definition": "poison" }))
        .await;
    let mut fine = Vec::new();
    for _ in 0..10 {
        fine.push(
            sandbox
                .start_instance(&url, &healthy, &json!({ "definition": "fine" }))
                .await,
        );
    }

    // A supervisor restarts workers the poison kills, as systemd would.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut crashes = 0;
    let instance = loop {
        let instance = sandbox.instance(&url, &poisoned, &poison).await;
        if instance["status"] != "running" {
            break instance;
        }
        assert!(
            Instant::now() < deadline,
            "poison still running: {instance}"
        );
        let mut exited = 0;
        for child in sandbox.children.iter_mut() {
            if child.try_wait().unwrap().is_some() {
                exited += 1;
            }
        }
        sandbox
            .children
            .retain_mut(|child| child.try_wait().unwrap().is_none());
        for _ in 0..exited {
            crashes += 1;
            sandbox.spawn("ward-worker", &worker_env);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(instance["status"], "failed", "{instance}");
    let error = instance["steps"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("dead-lettered"), "{instance}");
    assert!(crashes >= 1, "the poison never crashed a worker");

    // Its dead letter, with the reason, visible to its tenant only.
    let (code, page) = sandbox
        .call(
            reqwest::Method::GET,
            &format!("{url}/v1/dead-letters"),
            Some(&poisoned),
            None,
        )
        .await;
    assert_eq!(code, 200, "{page}");
    let letters = page["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{page}");
    assert_eq!(letters[0]["reason"], "delivery_limit", "{page}");
    assert_eq!(letters[0]["step_id"], "crash", "{page}");
    assert_eq!(letters[0]["tier"], "gold", "{page}");
    let (_, page) = sandbox
        .call(
            reqwest::Method::GET,
            &format!("{url}/v1/dead-letters"),
            Some(&healthy),
            None,
        )
        .await;
    assert_eq!(page["dead_letters"].as_array().unwrap().len(), 0, "{page}");
    let (code, body) = sandbox
        .call(
            reqwest::Method::GET,
            &format!("{url}/v1/admin/dead-letters?tenant=poisoned&limit=0"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["error"]["field"], "limit", "{body}");

    // The other tenant's work went through meanwhile.
    for id in &fine {
        let instance = sandbox
            .wait_finished(&url, &healthy, id, Duration::from_secs(60))
            .await;
        assert_eq!(instance["status"], "completed", "{instance}");
    }
    sandbox
        .wait_metric(
            &url,
            "ward_tasks_dead_lettered_total{reason=\"delivery_limit\"} 1",
            Duration::from_secs(5),
        )
        .await;
    sandbox.teardown().await;
}
