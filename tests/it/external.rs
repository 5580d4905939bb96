//! External workers over HTTP: fetch-and-lock with long polling, complete,
//! fail with retry, extend-lock, and lock expiry returning the task.

use std::time::Duration;

use serde_json::{Value, json};
use ward_worker::Registry;

use crate::sandbox::Sandbox;

const WAIT: Duration = Duration::from_secs(30);

async fn fetch(
    sandbox: &Sandbox,
    url: &str,
    key: &str,
    worker_id: &str,
    lock_ms: u64,
    wait_ms: u64,
) -> Vec<Value> {
    let body = json!({ "worker_id": worker_id, "handlers": ["care-plan.open"], "max_tasks": 5, "lock_ms": lock_ms, "wait_ms": wait_ms });
    let (status, answer) = sandbox
        .post(
            &format!("{url}/v1/external-tasks/fetch-and-lock"),
            key,
            &body,
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    answer["tasks"].as_array().unwrap().clone()
}

#[tokio::test]
async fn external_workers_fetch_complete_fail_and_lose_expired_locks() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    sandbox.start_worker(Registry::builtin()).await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "community-nursing", "gold").await;
    let other_key = sandbox.tenant(&url, "other-home", "gold").await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            "name: care
steps:
  - { id: plan, kind: task, handler: care-plan.open, external: true, retry: { max_attempts: 2, initial_delay_ms: 100 } }
  - { id: confirm, kind: task, handler: echo, needs: [plan] }
",
        )
        .await;

    // A long poll that starts before the task exists receives it.
    let poll = {
        let sandbox_http = sandbox.http.clone();
        let url = url.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let body = json!({ "worker_id": "w1", "handlers": ["care-plan.open"], "lock_ms": 10000, "wait_ms": 10000 });
            let response = sandbox_http
                .post(format!("{url}/v1/external-tasks/fetch-and-lock"))
                .bearer_auth(&key)
                .json(&body)
                .send()
                .await
                .unwrap();
            response.json::<Value>().await.unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "care", "input": { "patient": "p-1" } }),
        )
        .await;
    let polled = poll.await.unwrap();
    let task = &polled["tasks"][0];
    assert_eq!(task["instance_id"], json!(first));
    assert_eq!(task["input"], json!({ "patient": "p-1" }));
    assert_eq!(task["idempotency_key"], format!("{first}:plan"));
    assert!(
        fetch(&sandbox, &url, &other_key, "intruder", 1000, 0)
            .await
            .is_empty(),
        "another tenant sees nothing"
    );
    let task_id = task["task_run_id"].as_str().unwrap();
    let (status, _) = sandbox
        .post(
            &format!("{url}/v1/external-tasks/{task_id}/complete"),
            &key,
            &json!({ "worker_id": "w1", "output": { "plan": "A" } }),
        )
        .await;
    assert_eq!(status, 200);
    let instance = sandbox.wait_finished(&url, &key, &first, WAIT).await;
    assert_eq!(instance["status"], "completed");
    assert_eq!(instance["output"]["echo"], json!({ "plan": "A" }));

    // A lock that expires returns the task; the late worker is refused.
    let second = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "care", "input": { "patient": "p-2" } }),
        )
        .await;
    let locked = fetch(&sandbox, &url, &key, "slow", 300, 5000).await;
    let task_id = locked[0]["task_run_id"].as_str().unwrap().to_owned();
    let relocked = fetch(&sandbox, &url, &key, "fast", 10000, 10000).await;
    assert_eq!(
        relocked[0]["task_run_id"],
        json!(task_id),
        "the expired lock returned the same task"
    );
    let (status, body) = sandbox
        .post(
            &format!("{url}/v1/external-tasks/{task_id}/complete"),
            &key,
            &json!({ "worker_id": "slow", "output": {} }),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (409, json!("task_not_locked"))
    );
    let (status, _) = sandbox
        .post(
            &format!("{url}/v1/external-tasks/{task_id}/extend-lock"),
            &key,
            &json!({ "worker_id": "fast", "lock_ms": 20000 }),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = sandbox
        .post(
            &format!("{url}/v1/external-tasks/{task_id}/complete"),
            &key,
            &json!({ "worker_id": "fast", "output": { "plan": "B" } }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        sandbox.wait_finished(&url, &key, &second, WAIT).await["status"],
        "completed"
    );

    // A retryable failure is retried as attempt 2; a failure of the last attempt fails the instance.
    let third = sandbox
        .start_instance(&url, &key, &json!({ "definition": "care" }))
        .await;
    for attempt in 1..=2 {
        let tasks = fetch(&sandbox, &url, &key, "w3", 10000, 10000).await;
        assert_eq!(tasks[0]["attempt"], attempt);
        let task_id = tasks[0]["task_run_id"].as_str().unwrap();
        let (status, _) = sandbox
            .post(
                &format!("{url}/v1/external-tasks/{task_id}/fail"),
                &key,
                &json!({ "worker_id": "w3", "error": "EHR offline" }),
            )
            .await;
        assert_eq!(status, 200);
    }
    let instance = sandbox.wait_finished(&url, &key, &third, WAIT).await;
    assert_eq!(instance["status"], "failed");
    assert_eq!(instance["error"], "step `plan` failed: EHR offline");

    // Bad requests.
    let bad = [
        (
            json!({ "worker_id": "w", "handlers": [], "lock_ms": 1000 }),
            422,
            "handlers",
        ),
        (
            json!({ "worker_id": "w", "handlers": ["h"], "lock_ms": 0 }),
            422,
            "lock_ms",
        ),
        (
            json!({ "worker_id": "w", "handlers": ["h"], "lock_ms": 1000, "wait_ms": 600000 }),
            422,
            "wait_ms",
        ),
        (json!({ "worker_id": "w", "handlers": ["h"] }), 400, ""),
    ];
    for (body, status, field) in bad {
        let (got, answer) = sandbox
            .post(
                &format!("{url}/v1/external-tasks/fetch-and-lock"),
                &key,
                &body,
            )
            .await;
        assert_eq!(got, status, "{body}: {answer}");
        if !field.is_empty() {
            assert_eq!(answer["error"]["field"], field);
        }
    }
    let unknown = uuid::Uuid::new_v4();
    let (status, _) = sandbox
        .post(
            &format!("{url}/v1/external-tasks/{unknown}/complete"),
            &key,
            &json!({ "worker_id": "w" }),
        )
        .await;
    assert_eq!(status, 404);
    sandbox.teardown().await;
}
