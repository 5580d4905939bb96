//! Task execution on workers: failures are recorded, redeliveries change
//! nothing, poison messages are dead-lettered without blocking the queue, and
//! many instances complete across several masters and workers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use ward_shared::wire::TaskMessage;
use ward_worker::{Failure, Registry, Task};

use crate::sandbox::{Sandbox, amqp_url, sequential};

/// Declares the sandbox's queues and publishes, retrying while a new quorum
/// queue is still electing its leader (the broker nacks until then).
async fn publish_confirmed(broker: &ward_broker::Broker, tier: &str, body: &[u8]) {
    broker.declare(&Sandbox::tiers()).await.unwrap();
    for _ in 0..50 {
        if broker.publish_raw(tier, body).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the broker never confirmed the message");
}

#[tokio::test]
async fn handler_failure_is_recorded_with_its_error() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let registry = Registry::builtin().with("explode", |_task: Task| async move {
        if true {
            panic!("kaboom");
        }
        Ok(json!(null))
    });
    sandbox.start_worker(registry).await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "ward-a", "silver").await;
    sandbox
        .publish(&url, &key, &sequential("refer", &["echo", "fail", "noop"]))
        .await;
    sandbox
        .publish(&url, &key, &sequential("crash", &["explode"]))
        .await;
    sandbox
        .publish(&url, &key, &sequential("missing", &["no.such.handler"]))
        .await;

    let failed = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "refer", "input": { "message": "lab system refused" } }),
        )
        .await;
    let panicked = sandbox
        .start_instance(&url, &key, &json!({ "definition": "crash" }))
        .await;
    let missing = sandbox
        .start_instance(&url, &key, &json!({ "definition": "missing" }))
        .await;

    let failed = sandbox
        .wait_finished(&url, &key, &failed, Duration::from_secs(30))
        .await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"], "step `s2` failed: requested failure");
    let steps = failed["steps"].as_array().unwrap();
    assert_eq!(
        steps.len(),
        2,
        "the step after the failure never became ready"
    );
    assert_eq!(steps[1]["state"], "failed");
    assert_eq!(steps[1]["error"], "requested failure");

    let panicked = sandbox
        .wait_finished(&url, &key, &panicked, Duration::from_secs(30))
        .await;
    assert_eq!(panicked["status"], "failed");
    assert_eq!(panicked["steps"][0]["error"], "handler panicked: kaboom");

    let missing = sandbox
        .wait_finished(&url, &key, &missing, Duration::from_secs(30))
        .await;
    assert_eq!(missing["status"], "failed");
    assert_eq!(
        missing["steps"][0]["error"],
        "no handler `no.such.handler` is registered on this worker"
    );
    sandbox.teardown().await;
}

#[tokio::test]
async fn redelivered_messages_execute_again_but_commit_nothing() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let executions = Arc::new(AtomicUsize::new(0));
    let counter = executions.clone();
    let registry = Registry::builtin().with("count", move |task: Task| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(json!({ "seen": task.input }))
        }
    });
    sandbox.start_worker(registry).await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "ward-b", "bronze").await;
    sandbox
        .publish(&url, &key, &sequential("count-twice", &["count", "count"]))
        .await;
    let id = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "count-twice", "input": 1 }),
        )
        .await;
    let before = sandbox
        .wait_finished(&url, &key, &id, Duration::from_secs(30))
        .await;
    assert_eq!(before["status"], "completed");
    assert_eq!(executions.load(Ordering::SeqCst), 2);

    // Redeliver the first step's message twice, as the broker would after a lost ack.
    let sql = sandbox.sql().await;
    let row = sql
        .query_one(
            "SELECT id, tenant_id, instance_id, step_id, handler, attempt, idempotency_key, input \
             FROM task_runs WHERE instance_id = $1 AND step_id = 's1'",
            &[&uuid::Uuid::parse_str(&id).unwrap()],
        )
        .await
        .unwrap();
    let message = TaskMessage {
        task_run_id: row.get(0),
        tenant_id: row.get(1),
        instance_id: row.get(2),
        step_id: row.get(3),
        handler: row.get(4),
        attempt: row.get(5),
        idempotency_key: row.get(6),
        input: row.get(7),
        epoch: 1,
        kind: "task".into(),
        timeout_ms: None,
        http: None,
        tier: None,
        ready_at: None,
        trace_parent: None,
    };
    let broker = ward_broker::Broker::connect(&ward_broker::Settings {
        url: amqp_url(),
        queue_prefix: sandbox.queue_prefix(),
        delivery_limit: 20,
    })
    .await
    .unwrap();
    let body = serde_json::to_vec(&message).unwrap();
    publish_confirmed(&broker, "bronze", &body).await;
    publish_confirmed(&broker, "bronze", &body).await;
    broker.close().await;

    let deadline = Instant::now() + Duration::from_secs(20);
    while executions.load(Ordering::SeqCst) < 4 {
        assert!(Instant::now() < deadline, "redeliveries were not executed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let worker_url = format!("http://{}", sandbox.workers[0].http_addr);
    sandbox
        .wait_metric(
            &worker_url,
            "ward_task_commits_total{result=\"duplicate\"} 2",
            Duration::from_secs(10),
        )
        .await;
    let after = sandbox.instance(&url, &key, &id).await;
    assert_eq!(after, before, "two redeliveries changed nothing");
    let task_runs: i64 = sql
        .query_one("SELECT count(*) FROM task_runs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(task_runs, 2);
    sandbox.teardown().await;
}

#[tokio::test]
async fn malformed_message_is_dead_lettered_and_the_queue_keeps_flowing() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    sandbox.start_worker(Registry::builtin()).await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "ward-c", "gold").await;
    sandbox
        .publish(&url, &key, &sequential("after-poison", &["echo"]))
        .await;
    let broker = ward_broker::Broker::connect(&ward_broker::Settings {
        url: amqp_url(),
        queue_prefix: sandbox.queue_prefix(),
        delivery_limit: 20,
    })
    .await
    .unwrap();
    publish_confirmed(&broker, "gold", b"{not a task").await;
    let id = sandbox
        .start_instance(&url, &key, &json!({ "definition": "after-poison" }))
        .await;
    let instance = sandbox
        .wait_finished(&url, &key, &id, Duration::from_secs(30))
        .await;
    assert_eq!(instance["status"], "completed");
    // The master records the unreadable message in the dead-letter table
    // (no tenant: it could not be read) and empties the dead-letter queue.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, page) = sandbox
            .call(
                reqwest::Method::GET,
                &format!("{url}/v1/admin/dead-letters"),
                Some(crate::sandbox::ADMIN_TOKEN),
                None,
            )
            .await;
        assert_eq!(status, 200, "{page}");
        let letters = page["dead_letters"].as_array().unwrap();
        if letters.len() == 1 {
            assert_eq!(letters[0]["reason"], "rejected", "{page}");
            assert!(letters[0]["tenant_id"].is_null(), "{page}");
            break;
        }
        assert!(Instant::now() < deadline, "no dead letter recorded: {page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let depth = broker
            .queue_depth(&broker.dead_letter_queue())
            .await
            .unwrap();
        if depth == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "dead-letter queue holds {depth}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.close().await;
    sandbox.teardown().await;
}

#[tokio::test]
async fn many_instances_complete_across_two_masters_and_two_workers() {
    let mut sandbox = Sandbox::new().await;
    let first = sandbox.start_master().await;
    let second = sandbox.start_master().await;
    let registry = Registry::builtin().with("maybe-fail", |task: Task| async move {
        match task.input.as_i64() {
            Some(number) if number % 10 == 0 => {
                Err(Failure::new(format!("{number} is a multiple of ten")))
            }
            _ => Ok(task.input),
        }
    });
    sandbox.start_worker(registry.clone()).await;
    sandbox.start_worker(registry).await;
    let urls = [sandbox.url(first), sandbox.url(second)];
    let key = sandbox.tenant(&urls[0], "district", "silver").await;
    sandbox
        .publish(
            &urls[1],
            &key,
            &sequential("pathway", &["noop", "maybe-fail", "echo"]),
        )
        .await;
    let mut ids = Vec::new();
    for number in 0..60 {
        let url = &urls[number % 2];
        ids.push(
            sandbox
                .start_instance(
                    url,
                    &key,
                    &json!({ "definition": "pathway", "input": number }),
                )
                .await,
        );
    }
    let mut completed = 0;
    let mut failed = 0;
    for id in &ids {
        let instance = sandbox
            .wait_finished(&urls[0], &key, id, Duration::from_secs(60))
            .await;
        match instance["status"].as_str().unwrap() {
            "completed" => completed += 1,
            "failed" => failed += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((completed, failed), (54, 6));
    let sql = sandbox.sql().await;
    let (task_runs, leaders): (i64, i64) = {
        let row = sql
            .query_one(
                "SELECT count(*), count(DISTINCT dispatch_epoch) FROM task_runs WHERE state IN ('completed', 'failed')",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(
        task_runs,
        54 * 3 + 6 * 2,
        "every step ran to one committed result"
    );
    assert_eq!(leaders, 1, "one leader dispatched everything");
    let leading = sandbox
        .masters
        .iter()
        .filter(|master| master.is_leader())
        .count();
    assert_eq!(leading, 1, "exactly one of two masters leads");
    sandbox.teardown().await;
}

#[tokio::test]
async fn a_changed_delivery_limit_keeps_the_existing_queues_working() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    sandbox.start_worker(Registry::builtin()).await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "ward-limit", "gold").await;
    sandbox
        .publish(&url, &key, &sequential("limit-changed", &["echo"]))
        .await;
    let first = sandbox
        .start_instance(&url, &key, &json!({ "definition": "limit-changed" }))
        .await;
    let instance = sandbox
        .wait_finished(&url, &key, &first, Duration::from_secs(30))
        .await;
    assert_eq!(instance["status"], "completed", "{instance}");

    // The queues now exist with a delivery limit of 20. A broker client set
    // to 5 declares them (RabbitMQ refuses the new arguments), then still
    // publishes on its own channel and consumes.
    let changed = ward_broker::Broker::connect(&ward_broker::Settings {
        url: amqp_url(),
        queue_prefix: sandbox.queue_prefix(),
        delivery_limit: 5,
    })
    .await
    .unwrap();
    changed.declare(&Sandbox::tiers()).await.unwrap();
    assert!(changed.is_connected(), "the publishing channel was closed");
    changed.close().await;

    // A worker started with the new limit takes over the tier and runs it.
    let mut config = sandbox.worker_config();
    config.node_id = format!("{}-limit5", config.node_id);
    config.amqp.delivery_limit = 5;
    let worker = ward_worker::Worker::start(config, Registry::builtin())
        .await
        .expect("a worker with another delivery limit starts");
    let old = sandbox.workers.remove(0);
    old.shutdown().await.unwrap();
    sandbox.workers.push(worker);
    let second = sandbox
        .start_instance(&url, &key, &json!({ "definition": "limit-changed" }))
        .await;
    let instance = sandbox
        .wait_finished(&url, &key, &second, Duration::from_secs(30))
        .await;
    assert_eq!(instance["status"], "completed", "{instance}");
    sandbox.teardown().await;
}
