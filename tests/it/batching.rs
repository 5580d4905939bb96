//! Batching on the hot path: the batch start API (all or none, a bad item
//! named, per-item idempotency keys) and the worker's group commit (several
//! results per transaction, busy instances skipped, every answer per result).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use uuid::Uuid;
use ward_shared::wire::StartInstance;
use ward_store::{Completion, Settlement, TaskResult};
use ward_worker::{Registry, Worker};

use crate::sandbox::{Sandbox, free_port, sequential};

/// Waits until `count` instances of `definition` have completed.
async fn wait_completed(sandbox: &Sandbox, definition: &str, count: i64, timeout: Duration) {
    let sql = sandbox.sql().await;
    let deadline = Instant::now() + timeout;
    loop {
        let done: i64 = sql
            .query_one(
                "SELECT count(*) FROM instances WHERE definition_name = $1 AND status = 'completed'",
                &[&definition],
            )
            .await
            .unwrap()
            .get(0);
        if done >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {count} `{definition}` instances completed after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn instance_count(sandbox: &Sandbox) -> i64 {
    sandbox
        .sql()
        .await
        .query_one("SELECT count(*) FROM instances", &[])
        .await
        .unwrap()
        .get(0)
}

/// A store on the sandbox's schema, with one tenant of the gold tier.
async fn store_with_tenant(
    sandbox: &Sandbox,
    slug: &str,
) -> (ward_store::Store, ward_store::Tenant) {
    let store = sandbox.store().await;
    let tenant = store
        .create_tenant(slug, "gold", ward_store::Quotas::default())
        .await
        .unwrap()
        .tenant;
    (store, tenant)
}

#[tokio::test]
async fn a_batch_start_runs_every_instance_and_a_bad_item_starts_none() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    sandbox.start_worker(Registry::builtin()).await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "ward-7", "gold").await;
    sandbox
        .publish(&url, &key, &sequential("admit", &["echo", "noop"]))
        .await;
    let batch_url = format!("{url}/v1/instances/batch");

    let items: Vec<Value> = (0..50)
        .map(|n| json!({ "definition": "admit", "input": { "bed": n }, "idempotency_key": format!("admit-{n}") }))
        .collect();
    let (status, body) = sandbox
        .post(&batch_url, &key, &json!({ "instances": items }))
        .await;
    assert_eq!(status, 200, "{body}");
    let started = body["instances"].as_array().unwrap();
    assert_eq!(started.len(), 50);
    assert!(started.iter().all(|item| item["created"] == true));
    let ids: Vec<&str> = started
        .iter()
        .map(|item| item["id"].as_str().unwrap())
        .collect();

    // The same batch again starts nothing new and answers the same ids.
    let (status, again) = sandbox
        .post(&batch_url, &key, &json!({ "instances": items }))
        .await;
    assert_eq!(status, 200, "{again}");
    let again_ids: Vec<&str> = again["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_str().unwrap())
        .collect();
    assert_eq!(again_ids, ids);
    assert!(
        again["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|item| item["created"] == false)
    );
    wait_completed(&sandbox, "admit", 50, Duration::from_secs(60)).await;
    let instance = sandbox.instance(&url, &key, ids[7]).await;
    assert_eq!(instance["input"]["bed"], 7, "{instance}");
    assert_eq!(instance["output"]["echo"]["bed"], 7, "{instance}");

    // Bad items: the answer names the item and the field; nothing starts.
    let before = instance_count(&sandbox).await;
    let unknown = json!({ "instances": [
        { "definition": "admit" }, { "definition": "admit" }, { "definition": "discharge" },
    ] });
    let (status, body) = sandbox.post(&batch_url, &key, &unknown).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["field"], "instances[2].definition", "{body}");
    let long_key = json!({ "instances": [
        { "definition": "admit" }, { "definition": "admit", "idempotency_key": "k".repeat(201) },
    ] });
    let (status, body) = sandbox.post(&batch_url, &key, &long_key).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["error"]["field"], "instances[1].idempotency_key",
        "{body}"
    );
    let (status, body) = sandbox
        .post(&batch_url, &key, &json!({ "instances": [] }))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "instances", "{body}");
    let too_many: Vec<Value> = (0..1_001)
        .map(|_| json!({ "definition": "admit" }))
        .collect();
    let (status, body) = sandbox
        .post(&batch_url, &key, &json!({ "instances": too_many }))
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = sandbox
        .post(
            &batch_url,
            &key,
            &json!({ "instances": [{ "definition": "admit", "colour": 1 }] }),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["field"]
            .as_str()
            .unwrap_or_default()
            .starts_with("instances[0]"),
        "{body}"
    );
    assert_eq!(instance_count(&sandbox).await, before);
    sandbox.teardown().await;
}

#[tokio::test]
async fn group_commit_answers_each_result_and_skips_busy_instances() {
    let sandbox = Sandbox::new().await;
    let store = sandbox.store().await;
    let definition = ward_shared::Definition::from_json(
        serde_json::to_string(&sequential("round", &["echo"]))
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    let mut tenants = Vec::new();
    for slug in ["north-wing", "south-wing"] {
        let tenant = store
            .create_tenant(slug, "gold", ward_store::Quotas::default())
            .await
            .unwrap()
            .tenant;
        store
            .publish_definition(&tenant, &definition)
            .await
            .unwrap();
        tenants.push(tenant);
    }
    let start = StartInstance {
        definition: "round".into(),
        version: None,
        input: json!({}),
        business_key: None,
        trace_parent: None,
    };
    // Three instances of one tenant, two of the other, started as batches.
    let mut instances = Vec::new();
    for (tenant, count) in tenants.iter().zip([3, 2]) {
        let requests: Vec<(StartInstance, Option<String>)> =
            (0..count).map(|_| (start.clone(), None)).collect();
        for started in store.start_instances(tenant, &requests).await.unwrap() {
            instances.push((tenant.id, started.id));
        }
    }
    let sql = sandbox.sql().await;
    let mut results = Vec::new();
    for (tenant_id, instance_id) in &instances {
        let run: Uuid = sql
            .query_one(
                "SELECT id FROM task_runs WHERE instance_id = $1 AND state = 'ready'",
                &[instance_id],
            )
            .await
            .unwrap()
            .get(0);
        results.push(TaskResult {
            tenant_id: *tenant_id,
            instance_id: *instance_id,
            task_run_id: run,
            settlement: Settlement::Succeeded(json!({ "checked": true })),
            started_at: chrono::Utc::now(),
        });
    }

    // Another transaction holds the last instance: its result is skipped
    // (None), the others commit together.
    let admin = sandbox.sql().await;
    admin.batch_execute("BEGIN").await.unwrap();
    admin
        .execute(
            "SELECT 1 FROM instances WHERE id = $1 FOR UPDATE",
            &[&instances[4].1],
        )
        .await
        .unwrap();
    let answers = store.complete_tasks(&results).await.unwrap();
    assert_eq!(answers.len(), 5);
    for answer in &answers[..4] {
        assert_eq!(
            answer,
            &Some(Completion::Applied {
                instance_status: "completed".into(),
                ended: true
            })
        );
    }
    assert_eq!(answers[4], None, "a busy instance is not waited for");

    // The stragglers' commit waits for the lock instead, then applies.
    let waiting = tokio::spawn({
        let store = store.clone();
        let straggler = results[4].clone();
        async move { store.complete_tasks_waiting(&[straggler]).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "it waits for the instance's lock");
    admin.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        waiting.await.unwrap().unwrap(),
        vec![Some(Completion::Applied {
            instance_status: "completed".into(),
            ended: true
        })]
    );

    // Redelivered results answer Duplicate.
    let answers = store.complete_tasks(&results).await.unwrap();
    assert!(
        answers
            .iter()
            .all(|answer| answer == &Some(Completion::Duplicate)),
        "{answers:?}"
    );
    let completed: i64 = sql
        .query_one(
            "SELECT count(*) FROM instances WHERE status = 'completed' AND output = '{\"checked\": true}'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(completed, 5);

    // A result naming another tenant's instance changes nothing.
    let forged = TaskResult {
        tenant_id: tenants[1].id,
        ..results[0].clone()
    };
    assert_eq!(
        store.complete_task(&forged).await.unwrap(),
        Completion::Unknown
    );

    // In one group commit: a result naming another tenant is Unknown, a
    // second copy of a result is a Duplicate, a run that does not exist is
    // Unknown; only the genuine result changes anything.
    let fresh = store
        .start_instances(&tenants[0], &[(start.clone(), None), (start.clone(), None)])
        .await
        .unwrap();
    let mut fresh_results = Vec::new();
    for started in &fresh {
        let run: Uuid = sql
            .query_one(
                "SELECT id FROM task_runs WHERE instance_id = $1 AND state = 'ready'",
                &[&started.id],
            )
            .await
            .unwrap()
            .get(0);
        fresh_results.push(TaskResult {
            tenant_id: tenants[0].id,
            instance_id: started.id,
            task_run_id: run,
            settlement: Settlement::Succeeded(json!({ "checked": true })),
            started_at: chrono::Utc::now(),
        });
    }
    let genuine = fresh_results[0].clone();
    let forged = TaskResult {
        tenant_id: tenants[1].id,
        ..fresh_results[1].clone()
    };
    let missing = TaskResult {
        task_run_id: Uuid::now_v7(),
        ..genuine.clone()
    };
    let answers = store
        .complete_tasks(&[genuine.clone(), forged, genuine, missing])
        .await
        .unwrap();
    assert_eq!(
        answers,
        vec![
            Some(Completion::Applied {
                instance_status: "completed".into(),
                ended: true
            }),
            Some(Completion::Unknown),
            Some(Completion::Duplicate),
            Some(Completion::Unknown),
        ]
    );
    let states: Vec<String> = sql
        .query(
            "SELECT status FROM instances WHERE id = ANY($1) ORDER BY id",
            &[&vec![fresh[0].id, fresh[1].id]],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(states, ["completed", "running"]);
    sandbox.teardown().await;
}

#[tokio::test]
async fn a_worker_commits_fan_out_branches_in_shared_transactions() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let url = sandbox.url(master);
    let worker_addr = format!("127.0.0.1:{}", free_port());
    let mut config = sandbox.worker_config();
    config.http_addr = worker_addr.clone();
    config.prefetch = 32;
    config.committers = 1;
    let worker = Worker::start(config, Registry::builtin()).await.unwrap();
    sandbox.workers.push(worker);
    let key = sandbox.tenant(&url, "day-care", "gold").await;
    let branches: Vec<String> = (0..10).map(|n| format!("b{n}")).collect();
    let mut yaml =
        String::from("name: spread\nsteps:\n  - { id: start, kind: task, handler: noop }\n");
    for branch in &branches {
        yaml.push_str(&format!(
            "  - {{ id: {branch}, kind: task, handler: noop, needs: [start] }}\n"
        ));
    }
    // No join: the instance ends when its last branches finish, often
    // several in one group commit, and must still be counted once.
    sandbox.publish_yaml(&url, &key, &yaml).await;
    let items: Vec<Value> = (0..20).map(|_| json!({ "definition": "spread" })).collect();
    let (status, body) = sandbox
        .post(
            &format!("{url}/v1/instances/batch"),
            &key,
            &json!({ "instances": items }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_completed(&sandbox, "spread", 20, Duration::from_secs(90)).await;
    let runs: i64 = sandbox
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM task_runs WHERE state = 'completed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(runs, 20 * 11, "every step ran once");

    let metrics = sandbox.metrics(&format!("http://{worker_addr}")).await;
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find(|line| line.starts_with(series))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no `{series}` in:\n{metrics}"))
    };
    let results = value("ward_task_commit_batch_size_sum");
    let transactions = value("ward_task_commit_batch_size_count");
    assert_eq!(results, 220.0, "every result went through a group commit");
    assert!(
        transactions < results,
        "{results} results in {transactions} transactions: none shared"
    );
    assert_eq!(
        value("ward_instances_finished_total{status=\"completed\"}"),
        20.0,
        "each instance counted once"
    );
    sandbox.teardown().await;
}

#[tokio::test]
async fn concurrent_single_starts_share_transactions_and_each_gets_its_answer() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    sandbox.start_worker(Registry::builtin()).await;
    let url = sandbox.url(master);
    let mut keys = Vec::new();
    for slug in ["east-ward", "west-ward"] {
        let key = sandbox.tenant(&url, slug, "gold").await;
        sandbox
            .publish(&url, &key, &sequential("triage", &["noop"]))
            .await;
        keys.push(key);
    }
    // 60 starts at once over two tenants; every fifth names a definition
    // that does not exist, every seventh repeats an idempotency key.
    let answers = futures::future::join_all((0..60).map(|n| {
        let sandbox = &sandbox;
        let key = &keys[n % 2];
        let url = &url;
        async move {
            let definition = if n % 5 == 0 { "no-such" } else { "triage" };
            let body = serde_json::to_vec(&json!({ "definition": definition })).unwrap();
            let idempotency = format!("start-{}", if n % 7 == 0 { 7 } else { n });
            let response = sandbox
                .http
                .post(format!("{url}/v1/instances"))
                .bearer_auth(key)
                .header("idempotency-key", idempotency)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (n, status, response.json::<Value>().await.unwrap())
        }
    }))
    .await;
    let mut created = 0;
    for (n, status, body) in &answers {
        if n % 5 == 0 {
            assert_eq!(*status, 404, "{n}: {body}");
            assert_eq!(body["error"]["field"], "definition", "{body}");
        } else {
            assert!([200, 201].contains(status), "{n}: {status} {body}");
            if *status == 201 {
                created += 1;
            }
        }
    }
    // Per tenant, the starts keyed `start-7` (n = 7, 21, 49 on one tenant,
    // n = 14, 28, 42, 56 on the other) made one instance each.
    let stored = instance_count(&sandbox).await;
    assert_eq!(stored, created);
    let expected = (0..60).filter(|n| n % 5 != 0 && n % 7 != 0).count() as i64 + 2;
    assert_eq!(stored, expected);
    wait_completed(&sandbox, "triage", expected, Duration::from_secs(60)).await;
    sandbox.teardown().await;
}

#[tokio::test]
async fn a_parent_that_fails_in_a_group_commit_cancels_the_child_settled_beside_it() {
    let sandbox = Sandbox::new().await;
    let (store, tenant) = store_with_tenant(&sandbox, "east-wing").await;
    for spec in [
        json!({ "name": "kid", "steps": [
            { "id": "k", "kind": "task", "handler": "echo", "retry": { "max_attempts": 1 } }
        ] }),
        json!({ "name": "parent", "steps": [
            { "id": "boom", "kind": "task", "handler": "echo", "retry": { "max_attempts": 1 } },
            { "id": "inner", "kind": "sub_workflow", "definition": "kid" }
        ] }),
    ] {
        let definition = ward_shared::Definition::from_json(spec.to_string().as_bytes()).unwrap();
        store
            .publish_definition(&tenant, &definition)
            .await
            .unwrap();
    }
    let start = StartInstance {
        definition: "parent".into(),
        version: None,
        input: json!({}),
        business_key: None,
        trace_parent: None,
    };
    let parent = store
        .start_instances(&tenant, &[(start, None)])
        .await
        .unwrap()
        .remove(0);
    assert_eq!(parent.status, "running");
    let sql = sandbox.sql().await;
    let ready = sql
        .query(
            "SELECT r.id, r.instance_id, r.step_id FROM task_runs r JOIN instances i ON i.id = r.instance_id \
             WHERE (i.id = $1 OR i.parent_instance_id = $1) AND r.state = 'ready' ORDER BY r.step_id",
            &[&parent.id],
        )
        .await
        .unwrap();
    let steps: Vec<String> = ready.iter().map(|row| row.get(2)).collect();
    assert_eq!(steps, ["boom", "k"]);
    let child: Uuid = ready[1].get(1);
    let result = |row: &tokio_postgres::Row, settlement| TaskResult {
        tenant_id: tenant.id,
        instance_id: row.get(1),
        task_run_id: row.get(0),
        settlement,
        started_at: chrono::Utc::now(),
    };
    // The child's task succeeds and the parent's fails, in one commit: the
    // parent fails and cancels the child, whose own end is then not written.
    let answers = store
        .complete_tasks(&[
            result(&ready[1], Settlement::Succeeded(json!({}))),
            result(
                &ready[0],
                Settlement::Failed {
                    error: "no bed free".into(),
                    retryable: false,
                },
            ),
        ])
        .await
        .unwrap();
    assert_eq!(
        answers,
        vec![
            // The child ended in this commit too: counted once, on its result.
            Some(Completion::Applied {
                instance_status: "cancelled".into(),
                ended: true
            }),
            Some(Completion::Applied {
                instance_status: "failed".into(),
                ended: true
            }),
        ]
    );
    let statuses: Vec<(Uuid, String)> = sql
        .query(
            "SELECT id, status FROM instances WHERE id = ANY($1) ORDER BY id",
            &[&vec![parent.id, child]],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        statuses,
        [
            (parent.id, "failed".to_owned()),
            (child, "cancelled".to_owned())
        ]
    );
    let pending: i64 = sql
        .query_one(
            "SELECT count(*) FROM task_runs WHERE instance_id = ANY($1) \
             AND state IN ('ready', 'waiting', 'dispatched', 'locked')",
            &[&vec![parent.id, child]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, 0, "nothing is left to run");
    sandbox.teardown().await;
}

/// Whether `table` of this sandbox's schema was analyzed by a plain ANALYZE
/// (autovacuum's own sets `last_autoanalyze` instead).
async fn analyzed(sql: &tokio_postgres::Client, table: &str) -> bool {
    sql.query_one(
        "SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables \
         WHERE relid = to_regclass($1)",
        &[&table],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn a_new_schemas_hot_tables_are_analyzed_once_they_fill() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "ward-8", "gold").await;
    sandbox
        .publish(&url, &key, &sequential("admit", &["noop"]))
        .await;
    let sql = sandbox.sql().await;
    // A few rows: below the bound, so not analyzed (plans made now would
    // be replaced later by autovacuum's).
    let items: Vec<Value> = (0..10)
        .map(|n| json!({ "definition": "admit", "input": { "bed": n } }))
        .collect();
    let batch_url = format!("{url}/v1/instances/batch");
    let (status, body) = sandbox
        .post(&batch_url, &key, &json!({ "instances": items }))
        .await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!analyzed(&sql, "instances").await, "analyzed with 10 rows");

    // Past the bound: the leader has both hot tables analyzed, without
    // waiting for autovacuum.
    let items: Vec<Value> = (0..1_000)
        .map(|n| json!({ "definition": "admit", "input": { "bed": n } }))
        .collect();
    for _ in 0..2 {
        let (status, body) = sandbox
            .post(&batch_url, &key, &json!({ "instances": items }))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let deadline = Instant::now() + Duration::from_secs(40);
    while !(analyzed(&sql, "instances").await && analyzed(&sql, "task_runs").await) {
        assert!(
            Instant::now() < deadline,
            "instances and task_runs were not both analyzed within 40 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sandbox.teardown().await;
}

#[tokio::test]
async fn the_leader_vacuums_a_hot_table_autovacuum_leaves_alone() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let url = sandbox.url(master);
    sandbox.start_worker(Registry::builtin()).await;
    let key = sandbox.tenant(&url, "ward-10", "gold").await;
    sandbox
        .publish(&url, &key, &sequential("sweep", &["noop"]))
        .await;
    // Autovacuum off for this table (whatever the server's setting): only
    // the leader's backstop can vacuum it.
    let sql = sandbox.sql().await;
    sql.batch_execute("ALTER TABLE task_runs SET (autovacuum_enabled = false)")
        .await
        .unwrap();
    let vacuumed = async |sql: &tokio_postgres::Client| -> bool {
        sql.query_one(
            "SELECT last_vacuum IS NOT NULL FROM pg_stat_user_tables WHERE relid = to_regclass('task_runs')",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    };
    assert!(!vacuumed(&sql).await, "vacuumed before any run");

    // Each run leaves two dead versions (ready, then dispatched, then
    // settled): 10,000 runs pass the bound of 10,000 dead rows.
    let items: Vec<Value> = (0..1_000)
        .map(|n| json!({ "definition": "sweep", "input": { "bed": n } }))
        .collect();
    let batch_url = format!("{url}/v1/instances/batch");
    // 5,000 instances per half, each half below the tenant's
    // running-instances quota; waits until `halves` have completed.
    let run_halves = async |halves: std::ops::RangeInclusive<i64>| {
        for half in halves {
            for _ in 0..5 {
                let (status, body) = sandbox
                    .post(&batch_url, &key, &json!({ "instances": items }))
                    .await;
                assert_eq!(status, 200, "{body}");
            }
            wait_completed(&sandbox, "sweep", half * 5_000, Duration::from_secs(120)).await;
        }
    };
    run_halves(1..=2).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !vacuumed(&sql).await {
        assert!(
            Instant::now() < deadline,
            "task_runs was not vacuumed within 60 s of its runs settling"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let dead: i64 = sql
        .query_one(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = to_regclass('task_runs')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(dead < 10_000, "{dead} dead rows left after the VACUUM");

    // Another 10,000 runs: vacuumed again, but not analyzed again within
    // a minute of the last ANALYZE (each samples 30,000 rows and stalls the
    // tasks beside it).
    let stamps = async |sql: &tokio_postgres::Client| -> (String, String) {
        let row = sql
            .query_one(
                "SELECT coalesce(last_vacuum::text, ''), \
                 coalesce(greatest(last_analyze, last_autoanalyze)::text, '') \
                 FROM pg_stat_user_tables WHERE relid = to_regclass('task_runs')",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    let (vacuumed_at, analyzed_at) = stamps(&sql).await;
    assert!(!analyzed_at.is_empty(), "task_runs was never analyzed");
    run_halves(3..=4).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (vacuumed_again_at, analyzed_again_at) = stamps(&sql).await;
        if vacuumed_again_at != vacuumed_at {
            // On a machine slow enough that the minute had passed, a new
            // ANALYZE is right.
            let gap_s: f64 = sql
                .query_one(
                    "SELECT extract(epoch FROM $1::text::timestamptz - $2::text::timestamptz)::float8",
                    &[&vacuumed_again_at, &analyzed_at],
                )
                .await
                .unwrap()
                .get(0);
            if gap_s < 55.0 {
                assert_eq!(
                    analyzed_again_at, analyzed_at,
                    "analyzed again by the VACUUM {gap_s} s after the last ANALYZE"
                );
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "task_runs was not vacuumed again within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    sandbox.teardown().await;
}

/// Notifications on the ready channel naming `tenant`, received so far.
fn wakes_of(received: &std::sync::Mutex<Vec<String>>, tenant: &str) -> usize {
    received
        .lock()
        .unwrap()
        .iter()
        .filter(|payload| payload.as_str() == tenant)
        .count()
}

#[tokio::test]
async fn group_commits_wake_the_dispatcher_once_they_committed() {
    // The group commits (a start, a worker's results) wake the dispatcher
    // after their commits, not inside them. On the leader, a start wakes
    // its own dispatcher directly, without NOTIFY; starts on another
    // master and a worker's results notify the ready channel, and a
    // listener hears each tenant whose runs became ready. (The channel is
    // shared by every test on this database: only this tenant's payloads
    // are counted.)
    let mut sandbox = Sandbox::new().await;
    let leader = sandbox.start_master().await;
    let leader_url = sandbox.url(leader);
    sandbox
        .wait_metric(&leader_url, "ward_leader 1", Duration::from_secs(30))
        .await;
    let follower = sandbox.start_master().await;
    let follower_url = sandbox.url(follower);
    let key = sandbox.tenant(&leader_url, "ward-9", "gold").await;
    sandbox
        .publish(&leader_url, &key, &sequential("wake-one", &["noop"]))
        .await;
    sandbox
        .publish(&leader_url, &key, &sequential("wake", &["noop", "noop"]))
        .await;
    let tenant: Uuid = sandbox
        .sql()
        .await
        .query_one("SELECT id FROM tenants WHERE slug = 'ward-9'", &[])
        .await
        .unwrap()
        .get(0);
    let tenant = tenant.to_string();
    let (listener, mut connection) =
        tokio_postgres::connect(&crate::sandbox::database_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = received.clone();
    let listening = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = futures::StreamExt::next(&mut messages).await {
            if let tokio_postgres::AsyncMessage::Notification(notification) = message {
                sink.lock().unwrap().push(notification.payload().to_owned());
            }
        }
    });
    listener
        .batch_execute(&format!("LISTEN {}", ward_store::READY_CHANNEL))
        .await
        .unwrap();
    sandbox.start_worker(Registry::builtin()).await;

    // A start on the leader wakes its dispatcher in the process: the
    // one-step instance runs, and nothing of this tenant was notified.
    let id = sandbox
        .start_instance(&leader_url, &key, &json!({ "definition": "wake-one" }))
        .await;
    let finished = sandbox
        .wait_finished(&leader_url, &key, &id, Duration::from_secs(30))
        .await;
    assert_eq!(finished["status"], "completed", "{finished}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        wakes_of(&received, &tenant),
        0,
        "the leader's start was notified through Postgres"
    );

    // A start on the other master notifies (step 1 ready), and so does the
    // worker's group commit of step 1 (step 2 ready): two wake-ups.
    let id = sandbox
        .start_instance(&follower_url, &key, &json!({ "definition": "wake" }))
        .await;
    let finished = sandbox
        .wait_finished(&leader_url, &key, &id, Duration::from_secs(30))
        .await;
    assert_eq!(finished["status"], "completed", "{finished}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while wakes_of(&received, &tenant) < 2 {
        assert!(
            Instant::now() < deadline,
            "the other master's start and the worker's commit woke the listener {} times, not 2",
            wakes_of(&received, &tenant)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    listening.abort();
    sandbox.teardown().await;
}

/// A batch start of plain steps sends its COMMIT with its two INSERTs.
/// When the runs' INSERT fails after the instances' went through, the
/// server rolls the whole transaction back: the error is returned, nothing
/// of the batch is left, and the pooled connections serve the next starts.
#[tokio::test]
async fn a_start_whose_runs_fail_to_insert_leaves_nothing_though_its_commit_went_with_them() {
    let sandbox = Sandbox::new().await;
    let (store, tenant) = store_with_tenant(&sandbox, "east-wing").await;
    for (name, handler) in [("admit", "echo"), ("refused", "refused-handler")] {
        let definition = ward_shared::Definition::from_json(
            serde_json::to_string(&sequential(name, &[handler]))
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        store
            .publish_definition(&tenant, &definition)
            .await
            .unwrap();
    }
    let sql = sandbox.sql().await;
    sql.batch_execute(
        "ALTER TABLE task_runs ADD CONSTRAINT test_refused CHECK (handler <> 'refused-handler')",
    )
    .await
    .unwrap();
    let start = |definition: &str| {
        (
            StartInstance {
                definition: definition.into(),
                version: None,
                input: json!({ "ward": 7 }),
                business_key: None,
                trace_parent: None,
            },
            None,
        )
    };
    let counts = || async {
        let row = sql
            .query_one(
                "SELECT (SELECT count(*) FROM instances), (SELECT count(*) FROM task_runs WHERE state = 'ready')",
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, i64>(0), row.get::<_, i64>(1))
    };
    let admitted = store
        .start_instances(&tenant, &[start("admit"), start("admit")])
        .await
        .unwrap();
    assert_eq!(admitted.len(), 2);
    assert_eq!(counts().await, (2, 2));

    for _ in 0..3 {
        let error = store
            .start_instances(&tenant, &[start("refused"), start("admit")])
            .await
            .expect_err("the runs' INSERT breaks the check");
        assert!(format!("{error:?}").contains("test_refused"), "{error:?}");
        assert_eq!(
            counts().await,
            (2, 2),
            "nothing of the failed batch is left"
        );
    }

    // Every pooled connection is out of its transaction: the next starts
    // commit, seen from another connection.
    for round in 1..=6 {
        let started = store
            .start_instances(&tenant, &[start("admit"), start("admit"), start("admit")])
            .await
            .unwrap();
        assert!(
            started
                .iter()
                .all(|started| started.created && started.status == "running")
        );
        assert_eq!(counts().await, (2 + 3 * round, 2 + 3 * round));
    }
    sandbox.teardown().await;
}
