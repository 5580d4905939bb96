//! Multi-tenancy: the admin API (tenants, quotas, status, keys, tiers,
//! apply), suspension without losing backlog, 404 for other tenants' ids on
//! every endpoint, fair dispatch across tenants and in-flight quotas.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use ward_worker::Registry;

use crate::sandbox::{ADMIN_TOKEN, Sandbox, binary_path, sequential};

const WAIT: Duration = Duration::from_secs(30);

async fn admin(sandbox: &Sandbox, method: Method, url: &str, body: Option<Value>) -> (u16, Value) {
    let bytes = body.map(|body| serde_json::to_vec(&body).unwrap());
    sandbox
        .call(method, url, Some(ADMIN_TOKEN), bytes.as_deref())
        .await
}

#[tokio::test]
async fn tenants_keys_and_suspension_through_the_admin_api() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    sandbox.start_worker(Registry::builtin()).await;
    let url = sandbox.url(master);
    let (status, created) = admin(
        &sandbox,
        Method::POST,
        &format!("{url}/v1/admin/tenants"),
        Some(json!({ "slug": "rivers-care", "tier": "silver", "quotas": { "inflight_max": 8, "dispatch_rate_per_s": 100, "running_instances_max": 3, "payload_bytes_max": 4096 } })),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let key = created["api_key"].as_str().unwrap().to_owned();
    let (_, shown) = admin(
        &sandbox,
        Method::GET,
        &format!("{url}/v1/admin/tenants/rivers-care"),
        None,
    )
    .await;
    assert_eq!(shown["quotas"]["inflight_max"], 8);
    assert_eq!(shown["status"], "active");

    // Quotas: payload bytes and running instances.
    sandbox
        .publish_yaml(
            &url,
            &key,
            "name: hold\nsteps:\n  - { id: w, kind: wait_signal, signal: go }\n",
        )
        .await;
    let big = json!({ "definition": "hold", "input": "x".repeat(5000) });
    let (status, body) = sandbox
        .post(&format!("{url}/v1/instances"), &key, &big)
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (413, json!("payload_too_large"))
    );
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            sandbox
                .start_instance(&url, &key, &json!({ "definition": "hold" }))
                .await,
        );
    }
    let (status, body) = sandbox
        .post(
            &format!("{url}/v1/instances"),
            &key,
            &json!({ "definition": "hold" }),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (429, json!("quota_exceeded")),
        "{body}"
    );
    let (status, usage) = sandbox
        .call(Method::GET, &format!("{url}/v1/usage"), Some(&key), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(usage["usage"]["running_instances"], 3);
    assert_eq!(usage["throttled"], "running_instances");
    for id in &held {
        sandbox
            .post(
                &format!("{url}/v1/instances/{id}/cancel"),
                &key,
                &Value::Null,
            )
            .await;
    }

    // Suspension stops dispatch and starts, keeps the backlog; resuming continues it.
    sandbox.publish_yaml(&url, &key, "name: quick\nsteps:\n  - { id: a, kind: delay, duration_ms: 300 }\n  - { id: b, kind: task, handler: echo, needs: [a] }\n").await;
    let id = sandbox
        .start_instance(&url, &key, &json!({ "definition": "quick" }))
        .await;
    let (status, _) = admin(
        &sandbox,
        Method::PATCH,
        &format!("{url}/v1/admin/tenants/rivers-care"),
        Some(json!({ "status": "suspended" })),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = sandbox
        .post(
            &format!("{url}/v1/instances"),
            &key,
            &json!({ "definition": "quick" }),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (403, json!("tenant_suspended"))
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let instance = sandbox.instance(&url, &key, &id).await;
    let step_b = instance["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step_id"] == "b")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(
        step_b["state"], "ready",
        "the backlog waits while suspended: {instance}"
    );
    admin(
        &sandbox,
        Method::PATCH,
        &format!("{url}/v1/admin/tenants/rivers-care"),
        Some(json!({ "status": "active" })),
    )
    .await;
    assert_eq!(
        sandbox.wait_finished(&url, &key, &id, WAIT).await["status"],
        "completed"
    );

    // Keys: a second key, listing by prefix, revocation.
    let (status, second) = admin(
        &sandbox,
        Method::POST,
        &format!("{url}/v1/admin/tenants/rivers-care/keys"),
        None,
    )
    .await;
    assert_eq!(status, 201);
    let second_key = second["api_key"].as_str().unwrap().to_owned();
    assert!(second_key.starts_with(&format!("ward_{}_", second["prefix"].as_str().unwrap())));
    let (_, keys) = admin(
        &sandbox,
        Method::GET,
        &format!("{url}/v1/admin/tenants/rivers-care/keys"),
        None,
    )
    .await;
    assert_eq!(keys["keys"].as_array().unwrap().len(), 2);
    assert!(
        !keys.to_string().contains(&second_key),
        "secrets are never listed"
    );
    let key_id = second["id"].as_str().unwrap();
    let (status, _) = admin(
        &sandbox,
        Method::DELETE,
        &format!("{url}/v1/admin/tenants/rivers-care/keys/{key_id}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = sandbox
        .call(
            Method::GET,
            &format!("{url}/v1/usage"),
            Some(&second_key),
            None,
        )
        .await;
    assert_eq!(status, 401, "a revoked key no longer works");
    let (status, _) = sandbox
        .call(Method::GET, &format!("{url}/v1/usage"), Some(&key), None)
        .await;
    assert_eq!(status, 200, "the other key still does");

    // Bad admin input, and deletion.
    for (method, path, body, status, field) in [
        (
            Method::PATCH,
            "/v1/admin/tenants/rivers-care",
            json!({ "tier": "platinum" }),
            422,
            "tier",
        ),
        (
            Method::PATCH,
            "/v1/admin/tenants/rivers-care",
            json!({ "status": "asleep" }),
            422,
            "status",
        ),
        (
            Method::PATCH,
            "/v1/admin/tenants/rivers-care",
            json!({ "quotas": { "inflight_max": 0 } }),
            422,
            "quotas.inflight_max",
        ),
        (
            Method::PATCH,
            "/v1/admin/tenants/nobody",
            json!({ "status": "active" }),
            404,
            "slug",
        ),
    ] {
        let (got, answer) = admin(&sandbox, method, &format!("{url}{path}"), Some(body)).await;
        assert_eq!(
            (got, answer["error"]["field"].clone()),
            (status, json!(field)),
            "{path}: {answer}"
        );
    }
    admin(
        &sandbox,
        Method::PATCH,
        &format!("{url}/v1/admin/tenants/rivers-care"),
        Some(json!({ "status": "deleted" })),
    )
    .await;
    let (status, _) = sandbox
        .call(Method::GET, &format!("{url}/v1/usage"), Some(&key), None)
        .await;
    assert_eq!(status, 401, "a deleted tenant's keys stop working");
    sandbox.teardown().await;
}

#[tokio::test]
async fn every_endpoint_answers_404_for_foreign_and_random_ids() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let url = sandbox.url(master);
    let key_a = sandbox.tenant(&url, "owner", "gold").await;
    let key_b = sandbox.tenant(&url, "stranger", "gold").await;
    sandbox
        .publish_yaml(&url, &key_a, "name: private\nsteps:\n  - { id: t, kind: task, handler: care.plan, external: true }\n")
        .await;
    let instance = sandbox
        .start_instance(&url, &key_a, &json!({ "definition": "private" }))
        .await;
    let locked = sandbox
        .post(
            &format!("{url}/v1/external-tasks/fetch-and-lock"),
            &key_a,
            &json!({ "worker_id": "a", "handlers": ["care.plan"], "lock_ms": 60000 }),
        )
        .await
        .1;
    let task = locked["tasks"][0]["task_run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let random = uuid::Uuid::new_v4().to_string();
    let endpoints: Vec<(Method, String, Value)> = vec![
        (Method::GET, "/v1/instances/{instance}".into(), Value::Null),
        (
            Method::GET,
            "/v1/instances/{instance}/history".into(),
            Value::Null,
        ),
        (
            Method::POST,
            "/v1/instances/{instance}/cancel".into(),
            Value::Null,
        ),
        (
            Method::POST,
            "/v1/instances/{instance}/signals/go".into(),
            json!({}),
        ),
        (
            Method::POST,
            "/v1/external-tasks/{task}/complete".into(),
            json!({ "worker_id": "a" }),
        ),
        (
            Method::POST,
            "/v1/external-tasks/{task}/fail".into(),
            json!({ "worker_id": "a", "error": "x" }),
        ),
        (
            Method::POST,
            "/v1/external-tasks/{task}/extend-lock".into(),
            json!({ "worker_id": "a", "lock_ms": 1000 }),
        ),
    ];
    for (method, template, body) in &endpoints {
        for (who, key, instance_id, task_id) in [
            ("foreign", &key_b, &instance, &task),
            ("random", &key_a, &random, &random),
        ] {
            let path = template
                .replace("{instance}", instance_id)
                .replace("{task}", task_id);
            let bytes = (!body.is_null()).then(|| serde_json::to_vec(body).unwrap());
            let (status, answer) = sandbox
                .call(
                    method.clone(),
                    &format!("{url}{path}"),
                    Some(key),
                    bytes.as_deref(),
                )
                .await;
            assert_eq!(status, 404, "{who} {method} {path}: {answer}");
        }
        // The owner is not refused with 404.
        let path = template
            .replace("{instance}", &instance)
            .replace("{task}", &task);
        if !path.ends_with("/cancel") && !path.ends_with("/complete") && !path.ends_with("/fail") {
            let bytes = (!body.is_null()).then(|| serde_json::to_vec(body).unwrap());
            let (status, answer) = sandbox
                .call(
                    method.clone(),
                    &format!("{url}{path}"),
                    Some(&key_a),
                    bytes.as_deref(),
                )
                .await;
            assert!(status < 300, "owner {method} {path}: {status} {answer}");
        }
    }
    let (_, listed) = sandbox
        .call(
            Method::GET,
            &format!("{url}/v1/instances"),
            Some(&key_b),
            None,
        )
        .await;
    assert_eq!(
        listed["instances"],
        json!([]),
        "lists never show another tenant's instances"
    );
    let (status, _) = sandbox
        .post(
            &format!("{url}/v1/instances"),
            &key_b,
            &json!({ "definition": "private" }),
        )
        .await;
    assert_eq!(
        status, 404,
        "another tenant's definition does not exist for you"
    );
    let (status, _) = sandbox
        .call(
            Method::DELETE,
            &format!("{url}/v1/schedules/x"),
            Some(&key_b),
            None,
        )
        .await;
    assert_eq!(status, 404);
    sandbox.teardown().await;
}

#[tokio::test]
async fn a_flooding_tenant_cannot_starve_the_others_and_quotas_bound_in_flight() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox
        .start_master_with(|config| config.dispatch.window_max = 8)
        .await;
    let url = sandbox.url(master);
    let noisy = sandbox.tenant(&url, "noisy", "gold").await;
    let mut quiet = Vec::new();
    for n in 0..4 {
        quiet.push(sandbox.tenant(&url, &format!("quiet-{n}"), "gold").await);
    }
    admin(
        &sandbox,
        Method::PATCH,
        &format!("{url}/v1/admin/tenants/noisy"),
        Some(json!({ "quotas": { "inflight_max": 3 } })),
    )
    .await;
    let definition =
        "name: work\nsteps:\n  - { id: w, kind: task, handler: sleep, input: { sleep_ms: 40 } }\n";
    for key in quiet.iter().chain([&noisy]) {
        sandbox.publish_yaml(&url, key, definition).await;
    }
    // The flood arrives first, while no worker runs.
    for _ in 0..120 {
        sandbox
            .start_instance(&url, &noisy, &json!({ "definition": "work" }))
            .await;
    }
    let mut quiet_ids = Vec::new();
    for key in &quiet {
        for _ in 0..5 {
            quiet_ids.push((
                key.clone(),
                sandbox
                    .start_instance(&url, key, &json!({ "definition": "work" }))
                    .await,
            ));
        }
    }
    sandbox.start_worker(Registry::builtin()).await;
    for (key, id) in &quiet_ids {
        assert_eq!(
            sandbox.wait_finished(&url, key, id, WAIT).await["status"],
            "completed"
        );
    }
    let sql = sandbox.sql().await;
    let rows = sql
        .query(
            "SELECT t.slug, r.dispatched_at, r.finished_at FROM task_runs r JOIN tenants t ON t.id = r.tenant_id \
             WHERE r.dispatched_at IS NOT NULL ORDER BY r.dispatched_at",
            &[],
        )
        .await
        .unwrap();
    let order: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    let last_quiet = order
        .iter()
        .rposition(|slug| slug.starts_with("quiet"))
        .unwrap();
    assert!(
        last_quiet < 60,
        "20 quiet tasks queued behind 120 noisy ones were all dispatched among the first {} dispatches: {order:?}",
        last_quiet + 1
    );
    // The noisy tenant never had more than its 3 in flight.
    let deadline = Instant::now() + WAIT;
    loop {
        let done: i64 = sql
            .query_one(
                "SELECT count(*) FROM task_runs WHERE state = 'completed'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if done == 140 {
            break;
        }
        assert!(Instant::now() < deadline, "{done} of 140 done");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let noisy_runs = sql
        .query(
            "SELECT r.dispatched_at, r.finished_at FROM task_runs r JOIN tenants t ON t.id = r.tenant_id WHERE t.slug = 'noisy'",
            &[],
        )
        .await
        .unwrap();
    let intervals: Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> = noisy_runs
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let most_at_once = intervals
        .iter()
        .map(|(start, _)| {
            intervals
                .iter()
                .filter(|(s, f)| s <= start && start < f)
                .count()
        })
        .max()
        .unwrap();
    assert!(
        most_at_once <= 3,
        "noisy had {most_at_once} tasks in flight at once"
    );
    let metrics = sandbox.metrics(&url).await;
    assert!(
        metrics.contains("ward_tenant_throttled_total{reason=\"inflight\"}"),
        "throttling is visible"
    );
    sandbox.teardown().await;
}

/// The leader's dispatch loop does not wait for the rebuild of its active
/// tenants: with that read blocked (its `tiers` table locked), a tenant's
/// new work is still dispatched and run, and the rebuild lands once the
/// lock goes.
#[tokio::test]
async fn dispatch_goes_on_while_the_rebuild_of_active_tenants_is_blocked() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    sandbox.start_worker(Registry::builtin()).await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "west-wing", "gold").await;
    sandbox
        .publish(&url, &key, &sequential("round", &["echo"]))
        .await;
    let run_one = || async {
        let id = sandbox
            .start_instance(&url, &key, &json!({ "definition": "round", "input": {} }))
            .await;
        sandbox
            .wait_finished(&url, &key, &id, Duration::from_secs(5))
            .await
    };
    assert_eq!(run_one().await["status"], "completed");

    let locker = sandbox.sql().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE tiers IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    // A rebuild (each second) is soon waiting for the lock.
    let rebuild_waiting = || async {
        sandbox
            .sql()
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND query LIKE '%FROM tiers ORDER BY name%'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            > 0
    };
    let deadline = Instant::now() + WAIT;
    while !rebuild_waiting().await {
        assert!(
            Instant::now() < deadline,
            "no rebuild came to wait for the lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Meanwhile every new instance is dispatched and runs.
    for _ in 0..3 {
        assert_eq!(run_one().await["status"], "completed");
    }
    assert!(rebuild_waiting().await, "the rebuild was blocked all along");
    locker.batch_execute("ROLLBACK").await.unwrap();
    let deadline = Instant::now() + WAIT;
    while rebuild_waiting().await {
        assert!(Instant::now() < deadline, "the rebuild still waits");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(run_one().await["status"], "completed");
    sandbox.teardown().await;
}

#[tokio::test]
async fn wardctl_apply_is_idempotent_with_a_dry_run_diff() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let url = sandbox.url(master);
    let file = std::env::temp_dir().join(format!("{}-tenants.yaml", sandbox.id));
    let keys = std::env::temp_dir().join(format!("{}-keys.csv", sandbox.id));
    let write = |bronze_weight: u32, extra_quota: u32| {
        let mut text = format!(
            "tiers:\n  - {{ name: gold, weight: 6 }}\n  - {{ name: bronze, weight: {bronze_weight}, min_share_percent: 20 }}\n  - {{ name: platinum, weight: 9 }}\ntenants:\n"
        );
        for n in 0..25 {
            text.push_str(&format!(
                "  - {{ slug: home-{n}, tier: {} }}\n",
                if n % 2 == 0 { "gold" } else { "bronze" }
            ));
        }
        text.push_str(&format!(
            "  - {{ slug: clinic, tier: platinum, quotas: {{ inflight_max: {extra_quota} }} }}\n"
        ));
        std::fs::write(&file, text).unwrap();
    };
    let wardctl = |args: Vec<String>| {
        let url = url.clone();
        async move {
            let output = tokio::process::Command::new(binary_path("wardctl"))
                .env_clear()
                .env("WARD_URL", &url)
                .env("WARD_ADMIN_TOKEN", ADMIN_TOKEN)
                .args(args)
                .output()
                .await
                .unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            (
                serde_json::from_slice::<Value>(&output.stdout).unwrap(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        }
    };
    let file_arg = file.to_str().unwrap().to_owned();
    write(1, 16);
    let (dry, diff) = wardctl(vec![
        "apply".into(),
        "-f".into(),
        file_arg.clone(),
        "--dry-run".into(),
        "--batch-len".into(),
        "10".into(),
    ])
    .await;
    assert_eq!(
        (dry["tenants_created"].clone(), dry["tiers_created"].clone()),
        (json!(26), json!(1)),
        "{dry}"
    );
    assert!(
        diff.contains("+ tenant home-7")
            && diff.contains("+ tier platinum")
            && diff.contains("~ tier bronze"),
        "{diff}"
    );
    let (_, listed) = admin(
        &sandbox,
        Method::GET,
        &format!("{url}/v1/admin/tenants"),
        None,
    )
    .await;
    assert_eq!(listed["tenants"], json!([]), "a dry run changes nothing");

    let (applied, _) = wardctl(vec![
        "apply".into(),
        "-f".into(),
        file_arg.clone(),
        "--keys-file".into(),
        keys.to_str().unwrap().into(),
        "--batch-len".into(),
        "10".into(),
    ])
    .await;
    assert_eq!(applied["tenants_created"], 26);
    let keys_text = std::fs::read_to_string(&keys).unwrap();
    assert_eq!(keys_text.lines().count(), 26);
    let clinic_key = keys_text
        .lines()
        .find(|line| line.starts_with("clinic,"))
        .unwrap()
        .split(',')
        .nth(1)
        .unwrap()
        .to_owned();
    let (status, usage) = sandbox
        .call(
            Method::GET,
            &format!("{url}/v1/usage"),
            Some(&clinic_key),
            None,
        )
        .await;
    assert_eq!(
        (
            status,
            usage["tier"].clone(),
            usage["quotas"]["inflight_max"].clone()
        ),
        (200, json!("platinum"), json!(16))
    );

    let (again, _) = wardctl(vec!["apply".into(), "-f".into(), file_arg.clone()]).await;
    assert_eq!(
        (
            again["tenants_created"].clone(),
            again["tenants_unchanged"].clone()
        ),
        (json!(0), json!(26))
    );
    write(2, 32);
    let (changed, _) = wardctl(vec!["apply".into(), "-f".into(), file_arg.clone()]).await;
    assert_eq!(
        (
            changed["tenants_updated"].clone(),
            changed["tiers_updated"].clone()
        ),
        (json!(1), json!(1)),
        "{changed}"
    );
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&keys);
    sandbox.teardown().await;
}

/// Calls `url` until it answers `expected` (for at most 5 s); the last body.
async fn until_answered(
    sandbox: &Sandbox,
    method: Method,
    url: &str,
    api_key: &str,
    body: Option<&Value>,
    expected: u16,
) -> Value {
    let bytes = body.map(|body| serde_json::to_vec(body).unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, answer) = sandbox
            .call(method.clone(), url, Some(api_key), bytes.as_deref())
            .await;
        if status == expected {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "{method} {url} still answers {status} {answer}, not {expected}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_admin_change_through_one_master_applies_at_once_on_the_others() {
    // Each master keeps the API keys it resolved for `key_cache_ttl_ms`
    // (an hour here); a revoked key or a suspension made through another
    // master still applies on it at once, through `TENANCY_CHANNEL`.
    let mut sandbox = Sandbox::new().await;
    let long_ttl = |config: &mut ward_master::Config| config.key_cache_ttl_ms = 3_600_000;
    let first = sandbox.start_master_with(long_ttl).await;
    let second = sandbox.start_master_with(long_ttl).await;
    let (first_url, second_url) = (sandbox.url(first), sandbox.url(second));
    let key = sandbox.tenant(&first_url, "brook-house", "gold").await;
    let (status, created) = admin(
        &sandbox,
        Method::POST,
        &format!("{first_url}/v1/admin/tenants/brook-house/keys"),
        None,
    )
    .await;
    assert_eq!(status, 201);
    let second_key = created["api_key"].as_str().unwrap().to_owned();
    // The second master resolves (and keeps) both keys.
    let usage = format!("{second_url}/v1/usage");
    for api_key in [&key, &second_key] {
        until_answered(&sandbox, Method::GET, &usage, api_key, None, 200).await;
    }

    // A key revoked through the first master fails on the second.
    let key_id = created["id"].as_str().unwrap();
    let (status, _) = admin(
        &sandbox,
        Method::DELETE,
        &format!("{first_url}/v1/admin/tenants/brook-house/keys/{key_id}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    until_answered(&sandbox, Method::GET, &usage, &second_key, None, 401).await;

    // A tenant suspended through the first master is refused on the second.
    let (status, _) = admin(
        &sandbox,
        Method::PATCH,
        &format!("{first_url}/v1/admin/tenants/brook-house"),
        Some(json!({ "status": "suspended" })),
    )
    .await;
    assert_eq!(status, 200);
    let refused = until_answered(
        &sandbox,
        Method::POST,
        &format!("{second_url}/v1/instances"),
        &key,
        Some(&json!({ "definition": "none" })),
        403,
    )
    .await;
    assert_eq!(refused["error"]["code"], "tenant_suspended", "{refused}");
    sandbox.teardown().await;
}
