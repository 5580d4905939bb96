//! Cron schedules: one instance per tick, keyed by the tick, across a leader
//! failover; the schedule API refuses bad expressions and unknown definitions.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use ward_worker::Registry;

use crate::sandbox::Sandbox;

async fn ticks(sandbox: &Sandbox) -> Vec<String> {
    let sql = sandbox.sql().await;
    sql.query(
        "SELECT idempotency_key FROM instances WHERE idempotency_key LIKE 'schedule:%' ORDER BY id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| row.get(0))
    .collect()
}

async fn wait_ticks(sandbox: &Sandbox, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ticks(sandbox).await.len() < count {
        assert!(Instant::now() < deadline, "fewer than {count} ticks");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_schedule_starts_one_instance_per_tick_across_failover() {
    let mut sandbox = Sandbox::new().await;
    let first = sandbox.start_master().await;
    let second = sandbox.start_master().await;
    sandbox.start_worker(Registry::builtin()).await;
    let urls = [sandbox.url(first), sandbox.url(second)];
    let key = sandbox.tenant(&urls[0], "home-care", "bronze").await;
    sandbox
        .publish_yaml(
            &urls[0],
            &key,
            "name: medication-reminder\nsteps:\n  - { id: remind, kind: task, handler: echo }\n",
        )
        .await;

    let spec = json!({ "name": "beat", "definition": "medication-reminder", "cron": "* * * * * *", "input": { "dose": "5 mg" } });
    let (status, created) = sandbox
        .post(&format!("{}/v1/schedules", urls[0]), &key, &spec)
        .await;
    assert_eq!(status, 201, "{created}");
    assert!(created["next_fire_at"].is_string());
    wait_ticks(&sandbox, 2).await;

    // Stop the leader; the other master takes over the schedule.
    let leader = sandbox
        .masters
        .iter()
        .position(|master| master.is_leader())
        .expect("a leader");
    let stopped = sandbox.masters.remove(leader);
    stopped.shutdown().await.unwrap();
    let survivor = sandbox.url(0);
    let before = ticks(&sandbox).await.len();
    wait_ticks(&sandbox, before + 2).await;
    let (status, _) = sandbox
        .call(
            reqwest::Method::DELETE,
            &format!("{survivor}/v1/schedules/beat"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, 200);

    let ticks = ticks(&sandbox).await;
    let distinct: BTreeSet<&String> = ticks.iter().collect();
    assert_eq!(
        distinct.len(),
        ticks.len(),
        "no tick started twice: {ticks:?}"
    );
    for tick in &ticks {
        let at: chrono::DateTime<chrono::Utc> =
            tick.trim_start_matches("schedule:beat:").parse().unwrap();
        assert_eq!(
            at.timestamp_subsec_nanos(),
            0,
            "ticks fall on whole seconds: {tick}"
        );
    }
    let (status, list) = sandbox
        .call(
            reqwest::Method::GET,
            &format!("{survivor}/v1/schedules"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!((status, list), (200, json!({ "schedules": [] })));
    let sql = sandbox.sql().await;
    let started: Vec<Value> = sql
        .query(
            "SELECT input FROM instances WHERE idempotency_key LIKE 'schedule:%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        started
            .iter()
            .all(|input| *input == json!({ "dose": "5 mg" }))
    );
    sandbox.teardown().await;
}

#[tokio::test]
async fn schedule_api_refuses_bad_input() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "clinic-9", "silver").await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            "name: rounds\nsteps:\n  - { id: a, kind: task, handler: echo }\n",
        )
        .await;
    let cases = [
        (
            json!({ "name": "x", "definition": "rounds", "cron": "every day" }),
            422,
            "cron",
        ),
        (
            json!({ "name": "x", "definition": "missing", "cron": "0 * * * *" }),
            404,
            "definition",
        ),
        (
            json!({ "name": "bad name", "definition": "rounds", "cron": "0 * * * *" }),
            422,
            "name",
        ),
        (json!({ "name": "x", "definition": "rounds" }), 400, ""),
    ];
    for (body, status, field) in cases {
        let (got, answer) = sandbox
            .post(&format!("{url}/v1/schedules"), &key, &body)
            .await;
        assert_eq!(got, status, "{body}: {answer}");
        if !field.is_empty() {
            assert_eq!(answer["error"]["field"], field, "{answer}");
        }
    }
    let ok = json!({ "name": "hourly", "definition": "rounds", "cron": "0 * * * *" });
    assert_eq!(
        sandbox
            .post(&format!("{url}/v1/schedules"), &key, &ok)
            .await
            .0,
        201
    );
    assert_eq!(
        sandbox
            .post(&format!("{url}/v1/schedules"), &key, &ok)
            .await
            .0,
        200,
        "a second put replaces"
    );
    let (status, body) = sandbox
        .call(
            reqwest::Method::DELETE,
            &format!("{url}/v1/schedules/nope"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, json!("schedule_not_found"))
    );
    sandbox.teardown().await;
}
