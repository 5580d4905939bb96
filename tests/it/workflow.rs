//! The workflow model end to end: DAG fan-out and join, conditions and
//! mappings, retries with durable backoff, step timeouts, on_failure, delays,
//! signals with escalation, HTTP steps, sub-workflows, cancellation,
//! idempotent starts, lists and history.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use ward_worker::{Failure, Registry, Task};

use crate::sandbox::Sandbox;

const WAIT: Duration = Duration::from_secs(30);

/// (step id, attempt, state) of every run, in creation order.
fn runs(instance: &Value) -> Vec<(String, i64, String)> {
    instance["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|step| {
            (
                step["step_id"].as_str().unwrap().to_owned(),
                step["attempt"].as_i64().unwrap(),
                step["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn run<'a>(instance: &'a Value, step_id: &str, attempt: i64) -> &'a Value {
    instance["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|step| step["step_id"] == step_id && step["attempt"] == attempt)
        .unwrap_or_else(|| panic!("no run {step_id}#{attempt} in {instance}"))
}

fn at(step: &Value, field: &str) -> DateTime<Utc> {
    step[field].as_str().unwrap().parse().unwrap()
}

fn state_of(instance: &Value, step_id: &str) -> String {
    let runs = runs(instance);
    let last = runs
        .iter()
        .filter(|(id, _, _)| id == step_id)
        .max_by_key(|(_, attempt, _)| *attempt);
    last.map(|(_, _, state)| state.clone())
        .unwrap_or_else(|| "none".into())
}

async fn cluster() -> (Sandbox, String, String) {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    sandbox.start_worker(test_registry()).await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "st-marys", "gold").await;
    (sandbox, url, key)
}

/// Built-ins plus `flaky` (fails until `input.succeed_on`), `always-fail`
/// (retryable) and `bad-input` (terminal).
fn test_registry() -> Registry {
    Registry::builtin()
        .with("flaky", |task: Task| async move {
            let succeed_on = task.input["succeed_on"].as_i64().unwrap_or(1);
            if i64::from(task.attempt) < succeed_on {
                Err(Failure::new(format!("attempt {} failed", task.attempt)))
            } else {
                Ok(json!({ "succeeded_on": task.attempt, "key": task.idempotency_key }))
            }
        })
        .with("always-fail", |_task: Task| async move {
            Err(Failure::new("the lab system is down"))
        })
        .with("bad-input", |_task: Task| async move {
            Err(Failure::terminal("patient id is malformed"))
        })
}

#[tokio::test]
async fn dag_fans_out_joins_and_skips_by_condition() {
    let (sandbox, url, key) = cluster().await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            r#"
name: triage
steps:
  - { id: intake, kind: task, handler: echo }
  - { id: labs, kind: task, handler: sleep, needs: [intake], input: { sleep_ms: 300, which: "'labs'" } }
  - { id: imaging, kind: task, handler: sleep, needs: [intake], input: { sleep_ms: 300, which: "'imaging'" } }
  - { id: icu, kind: task, handler: echo, needs: [intake], when: 'input.severity > 7' }
  - { id: icu_bed, kind: task, handler: echo, needs: [icu] }
  - { id: decide, kind: task, handler: noop, needs: [labs, imaging, icu] }
output:
  decision: steps.decide.output
  icu: steps.icu.state
  bed: steps.icu_bed.state
"#,
        )
        .await;
    let id = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "triage", "input": { "severity": 3 } }),
        )
        .await;
    let instance = sandbox.wait_finished(&url, &key, &id, WAIT).await;
    assert_eq!(instance["status"], "completed", "{instance}");
    assert_eq!(state_of(&instance, "icu"), "skipped");
    assert_eq!(
        state_of(&instance, "icu_bed"),
        "skipped",
        "a step whose only need was skipped is skipped"
    );
    assert_eq!(
        state_of(&instance, "decide"),
        "completed",
        "a join runs when its needs completed or were skipped"
    );
    let decide = run(&instance, "decide", 1);
    assert_eq!(decide["input"]["labs"]["which"], "labs");
    assert_eq!(decide["input"]["imaging"]["which"], "imaging");
    assert_eq!(decide["input"]["icu"], Value::Null);
    assert_eq!(instance["output"]["icu"], "skipped");
    assert_eq!(instance["output"]["decision"], decide["input"]);
    // The two branches ran at the same time.
    let (labs, imaging) = (run(&instance, "labs", 1), run(&instance, "imaging", 1));
    assert!(
        at(labs, "started_at") < at(imaging, "finished_at")
            && at(imaging, "started_at") < at(labs, "finished_at")
    );
    // The join started after both branches finished.
    assert!(at(decide, "created_at") >= at(labs, "finished_at").max(at(imaging, "finished_at")));

    let urgent = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "triage", "input": { "severity": 9 } }),
        )
        .await;
    let urgent = sandbox.wait_finished(&url, &key, &urgent, WAIT).await;
    assert_eq!(
        (state_of(&urgent, "icu"), state_of(&urgent, "icu_bed")),
        ("completed".into(), "completed".into())
    );
    sandbox.teardown().await;
}

#[tokio::test]
async fn retries_back_off_on_durable_timers_then_succeed_or_fail() {
    let (sandbox, url, key) = cluster().await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            "name: retrying
steps:
  - { id: fetch, kind: task, handler: flaky, retry: { max_attempts: 4, initial_delay_ms: 200, multiplier: 2 } }
",
        )
        .await;
    let id = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "retrying", "input": { "succeed_on": 3 } }),
        )
        .await;
    let instance = sandbox.wait_finished(&url, &key, &id, WAIT).await;
    assert_eq!(instance["status"], "completed", "{instance}");
    assert_eq!(
        runs(&instance),
        [
            ("fetch".into(), 1, "failed".into()),
            ("fetch".into(), 2, "failed".into()),
            ("fetch".into(), 3, "completed".into())
        ]
    );
    assert_eq!(instance["output"]["succeeded_on"], 3);
    assert_eq!(
        instance["output"]["key"],
        format!("{id}:fetch"),
        "the idempotency key is stable across retries"
    );
    // Backoff: about 200 ms then 400 ms (±20 %) between a failure and the next attempt's start.
    for (attempt, backoff_ms) in [(1, 200), (2, 400)] {
        let failed = run(&instance, "fetch", attempt);
        let next = run(&instance, "fetch", attempt + 1);
        let waited_ms = (at(next, "dispatched_at") - at(failed, "finished_at")).num_milliseconds();
        assert!(
            waited_ms >= backoff_ms * 8 / 10,
            "attempt {attempt}: waited {waited_ms} ms"
        );
        assert!(
            next["available_at"].is_string(),
            "the backoff is a durable timer"
        );
    }
    let history = sandbox
        .call(
            reqwest::Method::GET,
            &format!("{url}/v1/instances/{id}/history"),
            Some(&key),
            None,
        )
        .await
        .1;
    let events: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events.iter().filter(|e| **e == "retry_scheduled").count(),
        2,
        "{events:?}"
    );
    assert_eq!(
        events.iter().filter(|e| **e == "timer_fired").count(),
        2,
        "{events:?}"
    );
    assert_eq!(events.first(), Some(&"instance_created"));
    assert_eq!(events.last(), Some(&"instance_completed"));

    // Retries run out: the instance fails with the step's last error.
    let id = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "retrying", "input": { "succeed_on": 9 } }),
        )
        .await;
    let instance = sandbox.wait_finished(&url, &key, &id, WAIT).await;
    assert_eq!(instance["status"], "failed");
    assert_eq!(instance["error"], "step `fetch` failed: attempt 4 failed");
    assert_eq!(runs(&instance).len(), 4);
    sandbox.teardown().await;
}

#[tokio::test]
async fn terminal_failures_timeouts_and_on_failure_handlers() {
    let (sandbox, url, key) = cluster().await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            "name: strict
steps:
  - { id: validate, kind: task, handler: bad-input, retry: { max_attempts: 5 } }
",
        )
        .await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            "name: slow
steps:
  - { id: wait, kind: task, handler: sleep, timeout_ms: 200, retry: { max_attempts: 2, initial_delay_ms: 50 }, input: { sleep_ms: 5000 } }
",
        )
        .await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            "name: fallback
steps:
  - { id: primary, kind: task, handler: always-fail, retry: { max_attempts: 2, initial_delay_ms: 50 }, on_failure: manual }
  - { id: manual, kind: task, handler: echo }
  - { id: after, kind: task, handler: noop, needs: [primary] }
",
        )
        .await;
    let strict = sandbox
        .start_instance(&url, &key, &json!({ "definition": "strict" }))
        .await;
    let slow = sandbox
        .start_instance(&url, &key, &json!({ "definition": "slow" }))
        .await;
    let fallback = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "fallback", "input": { "lab": "A" } }),
        )
        .await;

    let strict = sandbox.wait_finished(&url, &key, &strict, WAIT).await;
    assert_eq!(strict["status"], "failed");
    assert_eq!(runs(&strict).len(), 1, "a terminal failure is not retried");
    assert_eq!(
        strict["error"],
        "step `validate` failed: patient id is malformed"
    );

    let slow = sandbox.wait_finished(&url, &key, &slow, WAIT).await;
    assert_eq!(slow["status"], "failed");
    assert_eq!(runs(&slow).len(), 2, "a timed-out attempt is retried");
    assert_eq!(run(&slow, "wait", 2)["error"], "timed out after 200 ms");

    let fallback = sandbox.wait_finished(&url, &key, &fallback, WAIT).await;
    assert_eq!(fallback["status"], "completed", "{fallback}");
    let manual = run(&fallback, "manual", 1);
    assert_eq!(manual["input"]["step"], "primary");
    assert_eq!(manual["input"]["error"], "the lab system is down");
    assert_eq!(manual["input"]["input"], json!({ "lab": "A" }));
    let after = run(&fallback, "after", 1);
    assert_eq!(
        after["input"], manual["output"],
        "the handler's output stands for the failed step's"
    );
    sandbox.teardown().await;
}

#[tokio::test]
async fn delay_is_a_durable_timer_that_survives_a_master_restart() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    sandbox.start_worker(Registry::builtin()).await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "night-ward", "silver").await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            "name: reminder
steps:
  - { id: wait, kind: delay, duration_ms: 1500 }
  - { id: remind, kind: task, handler: echo, needs: [wait] }
",
        )
        .await;
    let id = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "reminder", "input": { "dose": "10 mg" } }),
        )
        .await;
    // Stop the only master before the timer is due, then start another.
    let master = sandbox.masters.remove(0);
    master.shutdown().await.unwrap();
    let master = sandbox.start_master().await;
    let url = sandbox.url(master);
    let instance = sandbox.wait_finished(&url, &key, &id, WAIT).await;
    assert_eq!(instance["status"], "completed");
    let wait = run(&instance, "wait", 1);
    assert_eq!(
        wait["output"],
        json!({ "dose": "10 mg" }),
        "a delay passes its input on"
    );
    let waited_ms = (at(wait, "finished_at") - at(wait, "created_at")).num_milliseconds();
    assert!(waited_ms >= 1_500, "fired after {waited_ms} ms");
    sandbox.teardown().await;
}

#[tokio::test]
async fn signals_complete_waits_and_timeouts_escalate() {
    let (sandbox, url, key) = cluster().await;
    let yaml = include_str!("../../examples/vitals-monitoring.yaml")
        .replace("timeout_ms: 300000", "timeout_ms: 1500");
    sandbox.publish_yaml(&url, &key, &yaml).await;
    let at_risk =
        json!({ "patient": "p-7", "heart_rate": 118, "respiratory_rate": 22, "spo2": 94 });

    // The nurse acknowledges: the wait completes with her payload.
    let acked = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "vitals-monitoring", "input": at_risk }),
        )
        .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let instance = sandbox.instance(&url, &key, &acked).await;
        if state_of(&instance, "nurse_ack") == "waiting" {
            break;
        }
        assert!(Instant::now() < deadline, "{instance}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = sandbox
        .post(
            &format!("{url}/v1/instances/{acked}/signals/nurse_ack"),
            &key,
            &json!({ "nurse": "n-42" }),
        )
        .await;
    assert_eq!((status, body), (202, json!({ "delivered": true })));
    let instance = sandbox.wait_finished(&url, &key, &acked, WAIT).await;
    assert_eq!(instance["status"], "completed", "{instance}");
    assert_eq!(instance["output"]["escalated"], false);
    assert_eq!(
        instance["output"]["record"]["response"],
        json!({ "nurse": "n-42" })
    );

    // No acknowledgement: after the timeout the physician is paged instead.
    let silent = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "vitals-monitoring", "input": at_risk }),
        )
        .await;
    let instance = sandbox.wait_finished(&url, &key, &silent, WAIT).await;
    assert_eq!(instance["status"], "completed", "{instance}");
    assert_eq!(state_of(&instance, "nurse_ack"), "timed_out");
    assert_eq!(instance["output"]["escalated"], true);
    assert_eq!(
        instance["output"]["record"]["response"]["notified"],
        "on-call-physician"
    );

    // A signal sent before the step waits is kept for it.
    let early = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "vitals-monitoring", "input": at_risk }),
        )
        .await;
    let (status, body) = sandbox
        .post(
            &format!("{url}/v1/instances/{early}/signals/nurse_ack"),
            &key,
            &json!({ "nurse": "n-7" }),
        )
        .await;
    assert_eq!(status, 202);
    assert!(body["delivered"].is_boolean());
    let instance = sandbox.wait_finished(&url, &key, &early, WAIT).await;
    assert_eq!(
        instance["output"]["record"]["response"],
        json!({ "nurse": "n-7" })
    );

    // Low risk: nobody is paged; the wait is skipped with its only need.
    let calm = json!({ "patient": "p-8", "heart_rate": 70, "respiratory_rate": 14, "spo2": 98 });
    let calm = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "vitals-monitoring", "input": calm }),
        )
        .await;
    let instance = sandbox.wait_finished(&url, &key, &calm, WAIT).await;
    assert_eq!(
        (
            state_of(&instance, "page_nurse"),
            state_of(&instance, "nurse_ack")
        ),
        ("skipped".into(), "skipped".into())
    );
    assert_eq!(instance["output"]["paged"], false);

    // Signalling an ended instance is refused.
    let (status, body) = sandbox
        .post(
            &format!("{url}/v1/instances/{calm}/signals/nurse_ack"),
            &key,
            &json!({}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (409, json!("instance_finished"))
    );
    sandbox.teardown().await;
}

/// A stub of a hospital system: records each request and answers by path.
async fn stub_server() -> (String, Arc<Mutex<Vec<(String, String, Value)>>>) {
    let seen: Arc<Mutex<Vec<(String, String, Value)>>> = Arc::default();
    let flaky_calls = Arc::new(AtomicUsize::new(0));
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let record = record.clone();
        let flaky_calls = flaky_calls.clone();
        async move {
            let path = request.uri().path().to_owned();
            let key = request
                .headers()
                .get("idempotency-key")
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let bytes = axum::body::to_bytes(request.into_body(), 1 << 20)
                .await
                .unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            record
                .lock()
                .unwrap()
                .push((path.clone(), key, body.clone()));
            let status = match path.as_str() {
                "/flaky" if flaky_calls.fetch_add(1, Ordering::SeqCst) == 0 => 503,
                "/refuse" => 400,
                _ => 200,
            };
            let status = axum::http::StatusCode::from_u16(status).unwrap();
            (status, axum::Json(json!({ "path": path, "echo": body })))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn http_steps_pass_the_idempotency_key_and_map_statuses() {
    let (sandbox, url, key) = cluster().await;
    let (stub, seen) = stub_server().await;
    for (name, path) in [
        ("http-ok", "ok"),
        ("http-flaky", "flaky"),
        ("http-refused", "refuse"),
    ] {
        let yaml = format!(
            "name: {name}
steps:
  - id: call
    kind: http
    url: {stub}/{path}
    headers: {{ x-ward-test: yes }}
    retry: {{ max_attempts: 3, initial_delay_ms: 100 }}
    input: {{ patient: input.patient }}
"
        );
        sandbox.publish_yaml(&url, &key, &yaml).await;
    }
    let ok = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "http-ok", "input": { "patient": "p-1" } }),
        )
        .await;
    let flaky = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "http-flaky", "input": { "patient": "p-2" } }),
        )
        .await;
    let refused = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "http-refused", "input": { "patient": "p-3" } }),
        )
        .await;

    let ok = sandbox.wait_finished(&url, &key, &ok, WAIT).await;
    assert_eq!(ok["status"], "completed", "{ok}");
    assert_eq!(
        ok["output"],
        json!({ "status": 200, "body": { "path": "/ok", "echo": { "patient": "p-1" } } })
    );

    let flaky_id = flaky.clone();
    let flaky = sandbox.wait_finished(&url, &key, &flaky, WAIT).await;
    assert_eq!(flaky["status"], "completed", "{flaky}");
    assert_eq!(runs(&flaky).len(), 2, "a 503 is retried");
    let keys: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(path, _, _)| path == "/flaky")
        .map(|(_, key, _)| key.clone())
        .collect();
    assert_eq!(
        keys,
        [format!("{flaky_id}:call"), format!("{flaky_id}:call")],
        "the same key on every attempt"
    );

    let refused = sandbox.wait_finished(&url, &key, &refused, WAIT).await;
    assert_eq!(refused["status"], "failed");
    assert_eq!(runs(&refused).len(), 1, "a 400 is not retried");
    assert!(
        refused["error"].as_str().unwrap().contains("answered 400"),
        "{refused}"
    );
    sandbox.teardown().await;
}

#[tokio::test]
async fn sub_workflows_run_children_and_cancel_propagates() {
    let (sandbox, url, key) = cluster().await;
    sandbox
        .publish_yaml(&url, &key, include_str!("../../examples/lab-archive.yaml"))
        .await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            "name: parent
steps:
  - { id: before, kind: task, handler: echo }
  - { id: child, kind: sub_workflow, definition: lab-archive, needs: [before] }
  - { id: after, kind: task, handler: noop, needs: [child] }
",
        )
        .await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            "name: waits\nsteps:\n  - { id: hold, kind: wait_signal, signal: never }\n",
        )
        .await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            "name: holder\nsteps:\n  - { id: inner, kind: sub_workflow, definition: waits }\n",
        )
        .await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            "name: orphan\nsteps:\n  - { id: inner, kind: sub_workflow, definition: missing }\n",
        )
        .await;

    let id = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "parent", "input": { "sample": "s-1" } }),
        )
        .await;
    let parent = sandbox.wait_finished(&url, &key, &id, WAIT).await;
    assert_eq!(parent["status"], "completed", "{parent}");
    let child_run = run(&parent, "child", 1);
    let child_id = child_run["child_instance_id"].as_str().unwrap();
    let child = sandbox.instance(&url, &key, child_id).await;
    assert_eq!(child["parent_instance_id"], json!(id));
    assert_eq!(child["status"], "completed");
    assert_eq!(
        child_run["output"], child["output"],
        "the step takes the child's output"
    );
    assert_eq!(child["output"]["archived"], true);

    let missing = sandbox
        .start_instance(&url, &key, &json!({ "definition": "orphan" }))
        .await;
    let missing = sandbox.wait_finished(&url, &key, &missing, WAIT).await;
    assert_eq!(missing["status"], "failed");
    assert_eq!(
        missing["error"],
        "step `inner` failed: definition `missing` not found"
    );

    // Cancelling the parent cancels the waiting child.
    let holder = sandbox
        .start_instance(&url, &key, &json!({ "definition": "holder" }))
        .await;
    let holding = sandbox.instance(&url, &key, &holder).await;
    let child_id = run(&holding, "inner", 1)["child_instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = sandbox
        .post(
            &format!("{url}/v1/instances/{holder}/cancel"),
            &key,
            &Value::Null,
        )
        .await;
    assert_eq!((status, body["status"].clone()), (200, json!("cancelled")));
    let child = sandbox.instance(&url, &key, &child_id).await;
    assert_eq!(child["status"], "cancelled");
    assert_eq!(state_of(&child, "hold"), "cancelled");
    let holding = sandbox.instance(&url, &key, &holder).await;
    assert_eq!(state_of(&holding, "inner"), "cancelled");
    sandbox.teardown().await;
}

#[tokio::test]
async fn cancel_stops_pending_steps_and_is_refused_once_ended() {
    let (sandbox, url, key) = cluster().await;
    sandbox
        .publish_yaml(&url, &key, "name: long\nsteps:\n  - { id: wait, kind: delay, duration_ms: 60000 }\n  - { id: then, kind: task, handler: echo, needs: [wait] }\n")
        .await;
    let id = sandbox
        .start_instance(&url, &key, &json!({ "definition": "long" }))
        .await;
    let (status, _) = sandbox
        .post(
            &format!("{url}/v1/instances/{id}/cancel"),
            &key,
            &Value::Null,
        )
        .await;
    assert_eq!(status, 200);
    let instance = sandbox.instance(&url, &key, &id).await;
    assert_eq!(instance["status"], "cancelled");
    assert_eq!(runs(&instance), [("wait".into(), 1, "cancelled".into())]);
    let (status, body) = sandbox
        .post(
            &format!("{url}/v1/instances/{id}/cancel"),
            &key,
            &Value::Null,
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (409, json!("instance_finished"))
    );
    let (status, _) = sandbox
        .post(
            &format!("{url}/v1/instances/{}/cancel", uuid::Uuid::new_v4()),
            &key,
            &Value::Null,
        )
        .await;
    assert_eq!(status, 404);
    sandbox.teardown().await;
}

#[tokio::test]
async fn idempotent_starts_return_the_existing_instance() {
    let (sandbox, url, key) = cluster().await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            "name: admit\nsteps:\n  - { id: a, kind: task, handler: echo }\n",
        )
        .await;
    let start = |idempotency_key: &'static str| {
        let http = sandbox.http.clone();
        let url = url.clone();
        let key = key.clone();
        async move {
            let response = http
                .post(format!("{url}/v1/instances"))
                .bearer_auth(&key)
                .header("idempotency-key", idempotency_key)
                .json(&json!({ "definition": "admit", "input": { "n": 1 } }))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let (first_status, first) = start("his-msg-0001").await;
    let (again_status, again) = start("his-msg-0001").await;
    assert_eq!((first_status, again_status), (201, 200));
    assert_eq!(first["id"], again["id"]);
    assert_eq!(
        (first["created"].clone(), again["created"].clone()),
        (json!(true), json!(false))
    );
    let (other_status, other) = start("his-msg-0002").await;
    assert_eq!(other_status, 201);
    assert_ne!(other["id"], first["id"]);

    let by_business_key = json!({ "definition": "admit", "business_key": "mrn-555" });
    let (status_a, a) = sandbox
        .post(&format!("{url}/v1/instances"), &key, &by_business_key)
        .await;
    let (status_b, b) = sandbox
        .post(&format!("{url}/v1/instances"), &key, &by_business_key)
        .await;
    assert_eq!((status_a, status_b), (201, 200));
    assert_eq!(a["id"], b["id"]);
    let sql = sandbox.sql().await;
    let count: i64 = sql
        .query_one("SELECT count(*) FROM instances", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 3);
    sandbox.teardown().await;
}

#[tokio::test]
async fn lists_filter_and_paginate_with_a_cursor() {
    let (sandbox, url, key) = cluster().await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            "name: rounds\nsteps:\n  - { id: a, kind: task, handler: echo }\n",
        )
        .await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            "name: meds\nsteps:\n  - { id: a, kind: task, handler: bad-input }\n",
        )
        .await;
    let mut ids = Vec::new();
    for number in 0..5 {
        ids.push(
            sandbox
                .start_instance(
                    &url,
                    &key,
                    &json!({ "definition": "rounds", "business_key": format!("bed-{number}") }),
                )
                .await,
        );
    }
    let failed = sandbox
        .start_instance(&url, &key, &json!({ "definition": "meds" }))
        .await;
    for id in ids.iter().chain([&failed]) {
        sandbox.wait_finished(&url, &key, id, WAIT).await;
    }
    let get = |query: String| {
        let sandbox = &sandbox;
        let url = url.clone();
        let key = key.clone();
        async move {
            sandbox
                .call(
                    reqwest::Method::GET,
                    &format!("{url}/v1/instances{query}"),
                    Some(&key),
                    None,
                )
                .await
        }
    };
    let ids_of = |page: &Value| -> Vec<String> {
        page["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let (status, page) = get(format!("?definition=rounds&limit=2{cursor}")).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(ids_of(&page));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(
        seen, newest_first,
        "pages walk every instance once, newest first"
    );
    let (_, failed_page) = get("?status=failed".into()).await;
    assert_eq!(ids_of(&failed_page), std::slice::from_ref(&failed));
    let (_, by_key) = get("?business_key=bed-3".into()).await;
    assert_eq!(ids_of(&by_key), [ids[3].clone()]);
    for (query, field) in [
        ("?status=sleeping", "status"),
        ("?limit=0", "limit"),
        ("?limit=1000", "limit"),
        ("?cursor=x", "cursor"),
        ("?colour=red", "colour"),
    ] {
        let (status, body) = get(query.into()).await;
        assert!(status == 400 || status == 422, "{query}: {status}");
        assert_eq!(body["error"]["field"], field, "{query}: {body}");
    }
    sandbox.teardown().await;
}

#[tokio::test]
async fn invalid_definitions_are_refused_one_class_at_a_time() {
    let (sandbox, url, key) = cluster().await;
    let cases: Vec<(&str, &str, &str)> = vec![
        (
            "name: x\nsteps: [{ id: a, kind: robot }]",
            "steps[0].kind",
            "unknown variant `robot`",
        ),
        (
            "name: x\nsteps: [{ id: a, kind: task, handler: h, colour: red }]",
            "steps[0].colour",
            "unknown field `colour`",
        ),
        (
            "name: x\nsteps: [{ id: a, kind: task, handler: h }, { id: a, kind: task, handler: h }]",
            "steps[1].id",
            "duplicate step id `a`",
        ),
        (
            "name: x\nsteps: [{ id: a, kind: task, handler: h, needs: [b] }]",
            "steps[0].needs[0]",
            "needs unknown step `b`",
        ),
        (
            "name: x\nsteps: [{ id: r, kind: delay, duration_ms: 1 }, { id: a, kind: delay, duration_ms: 1, needs: [b] }, { id: b, kind: delay, duration_ms: 1, needs: [a] }]",
            "steps[1].needs",
            "dependency cycle: a -> b -> a",
        ),
        (
            "name: x\nsteps: [{ id: a, kind: task, handler: h, when: 'input.x >' }]",
            "steps[0].when",
            "invalid CEL expression",
        ),
        (
            "name: x\nsteps: [{ id: a, kind: task, handler: h, input: { y: 'input..z' } }]",
            "steps[0].input.y",
            "invalid CEL expression",
        ),
        (
            "name: x\nsteps: [{ id: a, kind: wait_signal }]",
            "steps[0].signal",
            "a wait_signal step needs `signal`",
        ),
        (
            "name: x\nsteps: [{ id: a, kind: http, url: 'ftp://x' }]",
            "steps[0].url",
            "http:// or https://",
        ),
        (
            "name: x\nsteps: [{ id: a, kind: task, handler: h, retry: { max_attempts: 1000 } }]",
            "steps[0].retry.max_attempts",
            "between 1 and 100",
        ),
        (
            "name: x\nsteps: [{ id: a, kind: task, handler: h, on_failure: ghost }]",
            "steps[0].on_failure",
            "unknown step `ghost`",
        ),
        (
            "name: x\nsteps: [{ id: a, kind: sub_workflow, definition: x }]",
            "steps[0].definition",
            "cannot start itself",
        ),
        ("name: x\nsteps: []", "steps", "at least one step"),
        ("name: [", "", "invalid YAML"),
    ];
    for (yaml, field, message) in cases {
        let response = sandbox
            .http
            .post(format!("{url}/v1/definitions"))
            .bearer_auth(&key)
            .header("content-type", "application/yaml")
            .body(yaml)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{yaml}");
        let body: Value = response.json().await.unwrap();
        let problems = body["error"]["problems"].as_array().unwrap();
        let found = problems
            .iter()
            .any(|p| p["field"] == field && p["message"].as_str().unwrap().contains(message));
        assert!(found, "{yaml}: expected `{field}`: {message}; got {body}");
    }
    let sql = sandbox.sql().await;
    let stored: i64 = sql
        .query_one("SELECT count(*) FROM definitions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "no invalid definition was stored");
    sandbox.teardown().await;
}

#[tokio::test]
async fn history_lists_every_transition_in_order() {
    let (sandbox, url, key) = cluster().await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            "name: story
steps:
  - { id: first, kind: task, handler: echo }
  - { id: pause, kind: delay, duration_ms: 100, needs: [first] }
  - { id: ack, kind: wait_signal, signal: go, needs: [pause] }
",
        )
        .await;
    let id = sandbox
        .start_instance(&url, &key, &json!({ "definition": "story" }))
        .await;
    let deadline = Instant::now() + WAIT;
    while state_of(&sandbox.instance(&url, &key, &id).await, "ack") != "waiting" {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sandbox
        .post(
            &format!("{url}/v1/instances/{id}/signals/go"),
            &key,
            &json!({ "by": "n-1" }),
        )
        .await;
    sandbox.wait_finished(&url, &key, &id, WAIT).await;
    let (status, history) = sandbox
        .call(
            reqwest::Method::GET,
            &format!("{url}/v1/instances/{id}/history"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let events: Vec<String> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| match e["step_id"].as_str() {
            Some(step) => format!("{}:{step}", e["event"].as_str().unwrap()),
            None => e["event"].as_str().unwrap().to_owned(),
        })
        .collect();
    let expected = [
        "instance_created",
        "step_ready:first",
        "step_dispatched:first",
        "step_started:first",
        "step_completed:first",
        "step_waiting:pause",
        "timer_fired:pause",
        "step_completed:pause",
        "step_waiting:ack",
        "signal_received",
        "step_completed:ack",
        "instance_completed",
    ];
    assert_eq!(events, expected, "{history}");
    let times: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["at"].as_str().unwrap())
        .collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted);
    sandbox.teardown().await;
}
