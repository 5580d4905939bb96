//! The HTTP API end to end: a multi-step instance runs to completion, and
//! every kind of bad input gets a 4xx JSON error naming the problem while
//! nothing is written.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use ward_worker::Registry;

use crate::sandbox::{ADMIN_TOKEN, Sandbox, sequential};

#[tokio::test]
async fn three_step_instance_runs_to_completion() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    sandbox.start_worker(Registry::builtin()).await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "care-home-1", "gold").await;
    let published = sandbox
        .publish(
            &url,
            &key,
            &sequential("vitals", &["vitals.score", "echo", "noop"]),
        )
        .await;
    assert_eq!(published["version"], 1);
    let input = json!({ "heart_rate": 118, "respiratory_rate": 22, "spo2": 94 });
    let id = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "vitals", "input": input, "business_key": "bed-12" }),
        )
        .await;

    let instance = sandbox
        .wait_finished(&url, &key, &id, Duration::from_secs(30))
        .await;

    assert_eq!(instance["status"], "completed", "{instance}");
    assert_eq!(instance["business_key"], "bed-12");
    assert_eq!(instance["input"], input);
    assert_eq!(instance["output"]["echo"]["risk"], "medium");
    assert_eq!(instance["output"]["step"], "s2");
    let steps = instance["steps"].as_array().unwrap();
    let step_ids: Vec<&str> = steps
        .iter()
        .map(|step| step["step_id"].as_str().unwrap())
        .collect();
    assert_eq!(step_ids, ["s1", "s2", "s3"]);
    for step in steps {
        assert_eq!(step["state"], "completed", "{step}");
        assert_eq!(step["attempt"], 1);
        assert_eq!(
            step["idempotency_key"],
            format!("{id}:{}", step["step_id"].as_str().unwrap())
        );
        let created = step["created_at"].as_str().unwrap();
        let dispatched = step["dispatched_at"].as_str().unwrap();
        let finished = step["finished_at"].as_str().unwrap();
        assert!(created <= dispatched && dispatched <= finished, "{step}");
    }
    assert_eq!(steps[0]["output"]["score"], 5);
    assert_eq!(
        steps[1]["input"], steps[0]["output"],
        "each step's output is the next step's input"
    );
    assert!(instance["completed_at"].is_string());

    // A path no route matches is answered, and not timed under its own label.
    let unknown = sandbox
        .http
        .get(format!("{url}/v1/unrouted/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let metrics = sandbox.metrics(&url).await;
    assert!(
        metrics.contains("ward_instances_started_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ward_tasks_dispatched_total{tier=\"gold\"} 3"),
        "{metrics}"
    );
    // Each request of a route is timed under its template, method and class.
    let count = |series: &str| -> u64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in {metrics}"))
    };
    assert_eq!(
        count(
            "ward_http_request_seconds_count{class=\"2xx\",method=\"POST\",route=\"/v1/instances\"}"
        ),
        1
    );
    assert!(
        count(
            "ward_http_request_seconds_count{class=\"2xx\",method=\"GET\",route=\"/v1/instances/{id}\"}"
        ) >= 1,
        "wait_finished read the instance"
    );
    assert!(!metrics.contains("/v1/unrouted"), "{metrics}");
    assert!(!metrics.contains(&id), "no instance ids in metrics");
    sandbox.teardown().await;
}

/// One bad request and the error it must get.
struct Case {
    name: &'static str,
    method: Method,
    path: String,
    key: Option<String>,
    body: Option<Vec<u8>>,
    status: u16,
    code: &'static str,
    field: Option<&'static str>,
}

#[tokio::test]
async fn bad_input_gets_a_json_error_naming_the_problem_and_writes_nothing() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "clinic", "silver").await;
    sandbox
        .publish(&url, &key, &sequential("admission", &["echo"]))
        .await;
    let case =
        |name, method, path: &str, key: Option<&str>, body: Option<&str>, status, code, field| {
            Case {
                name,
                method,
                path: path.to_owned(),
                key: key.map(str::to_owned),
                body: body.map(|body| body.as_bytes().to_vec()),
                status,
                code,
                field,
            }
        };
    let oversized = format!(
        r#"{{"definition":"admission","input":"{}"}}"#,
        "x".repeat(300 * 1024)
    );
    let cases = vec![
        case(
            "no key",
            Method::POST,
            "/v1/instances",
            None,
            Some("{}"),
            401,
            "unauthorized",
            Some("authorization"),
        ),
        case(
            "wrong key",
            Method::POST,
            "/v1/instances",
            Some("ward_0000_bad"),
            Some("{}"),
            401,
            "unauthorized",
            Some("authorization"),
        ),
        case(
            "malformed json",
            Method::POST,
            "/v1/instances",
            Some(&key),
            Some(r#"{"definition": "#),
            400,
            "invalid_json",
            None,
        ),
        case(
            "missing definition",
            Method::POST,
            "/v1/instances",
            Some(&key),
            Some(r#"{"input": {}}"#),
            400,
            "invalid_field",
            None,
        ),
        case(
            "wrong type",
            Method::POST,
            "/v1/instances",
            Some(&key),
            Some(r#"{"definition": 5}"#),
            400,
            "invalid_field",
            Some("definition"),
        ),
        case(
            "unknown field",
            Method::POST,
            "/v1/instances",
            Some(&key),
            Some(r#"{"definition": "admission", "inptu": {}}"#),
            400,
            "invalid_field",
            Some("inptu"),
        ),
        case(
            "empty definition name",
            Method::POST,
            "/v1/instances",
            Some(&key),
            Some(r#"{"definition": ""}"#),
            422,
            "invalid_field",
            Some("definition"),
        ),
        case(
            "unknown definition",
            Method::POST,
            "/v1/instances",
            Some(&key),
            Some(r#"{"definition": "discharge"}"#),
            404,
            "definition_not_found",
            Some("definition"),
        ),
        case(
            "unknown version",
            Method::POST,
            "/v1/instances",
            Some(&key),
            Some(r#"{"definition": "admission", "version": 9}"#),
            404,
            "definition_not_found",
            Some("definition"),
        ),
        case(
            "oversized body",
            Method::POST,
            "/v1/instances",
            Some(&key),
            Some(&oversized),
            413,
            "payload_too_large",
            None,
        ),
        case(
            "bad instance id",
            Method::GET,
            "/v1/instances/not-a-uuid",
            Some(&key),
            None,
            400,
            "invalid_field",
            Some("id"),
        ),
        case(
            "unknown instance",
            Method::GET,
            &format!("/v1/instances/{}", uuid::Uuid::new_v4()),
            Some(&key),
            None,
            404,
            "instance_not_found",
            Some("id"),
        ),
        case(
            "invalid definition",
            Method::POST,
            "/v1/definitions",
            Some(&key),
            Some(r#"{"name": "x", "steps": [{"id": "a", "kind": "task"}]}"#),
            422,
            "invalid_definition",
            Some("steps[0].handler"),
        ),
        case(
            "unknown step kind",
            Method::POST,
            "/v1/definitions",
            Some(&key),
            Some(r#"{"name": "x", "steps": [{"id": "a", "kind": "teleport"}]}"#),
            422,
            "invalid_definition",
            Some("steps[0].kind"),
        ),
        case(
            "unknown tier",
            Method::POST,
            "/v1/admin/tenants",
            Some(ADMIN_TOKEN),
            Some(r#"{"slug": "ward-7", "tier": "platinum"}"#),
            422,
            "invalid_field",
            Some("tier"),
        ),
        case(
            "bad slug",
            Method::POST,
            "/v1/admin/tenants",
            Some(ADMIN_TOKEN),
            Some(r#"{"slug": "Ward 7", "tier": "gold"}"#),
            422,
            "invalid_field",
            Some("slug"),
        ),
        case(
            "duplicate tenant",
            Method::POST,
            "/v1/admin/tenants",
            Some(ADMIN_TOKEN),
            Some(r#"{"slug": "clinic", "tier": "gold"}"#),
            409,
            "tenant_exists",
            Some("slug"),
        ),
        case(
            "tenant key is not admin",
            Method::POST,
            "/v1/admin/tenants",
            Some(&key),
            Some(r#"{"slug": "x", "tier": "gold"}"#),
            401,
            "unauthorized",
            Some("authorization"),
        ),
        case(
            "unknown route",
            Method::GET,
            "/v1/nothing",
            Some(&key),
            None,
            404,
            "route_not_found",
            None,
        ),
        case(
            "wrong method",
            Method::DELETE,
            "/v1/instances",
            Some(&key),
            None,
            405,
            "method_not_allowed",
            None,
        ),
    ];
    for case in cases {
        let (status, body) = sandbox
            .call(
                case.method,
                &format!("{url}{}", case.path),
                case.key.as_deref(),
                case.body.as_deref(),
            )
            .await;
        assert_eq!(status, case.status, "{}: {body}", case.name);
        assert_eq!(body["error"]["code"], case.code, "{}: {body}", case.name);
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{}: {body}",
            case.name
        );
        if let Some(field) = case.field {
            assert_eq!(body["error"]["field"], field, "{}: {body}", case.name);
        }
    }

    let sql = sandbox.sql().await;
    let instances: i64 = sql
        .query_one("SELECT count(*) FROM instances", &[])
        .await
        .unwrap()
        .get(0);
    let task_runs: i64 = sql
        .query_one("SELECT count(*) FROM task_runs", &[])
        .await
        .unwrap()
        .get(0);
    let tenants: i64 = sql
        .query_one("SELECT count(*) FROM tenants", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        (instances, task_runs, tenants),
        (0, 0, 1),
        "bad requests wrote nothing"
    );
    sandbox.teardown().await;
}

#[tokio::test]
async fn invalid_definition_lists_every_problem_with_its_step() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "lab", "bronze").await;
    let definition = json!({ "name": "lab-results", "steps": [
        { "id": "fetch", "kind": "task" },
        { "id": "fetch", "kind": "task", "handler": "echo" },
        { "id": "bad id!", "kind": "task", "handler": "echo" },
    ]});
    let body = serde_json::to_vec(&definition).unwrap();
    let (status, body) = sandbox
        .call(
            Method::POST,
            &format!("{url}/v1/definitions"),
            Some(&key),
            Some(&body),
        )
        .await;
    assert_eq!(status, 422);
    let problems: Vec<(String, String)> = body["error"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|problem| {
            (
                problem["field"].as_str().unwrap().to_owned(),
                problem["step"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        problems,
        [
            ("steps[1].id".to_owned(), "fetch".to_owned()),
            ("steps[2].id".to_owned(), "bad id!".to_owned()),
            ("steps[0].handler".to_owned(), "fetch".to_owned()),
        ],
        "{body}"
    );
    sandbox.teardown().await;
}

#[tokio::test]
async fn definitions_are_versioned_and_instances_keep_their_version() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "hospital", "gold").await;
    let first = sandbox
        .publish(&url, &key, &sequential("triage", &["echo"]))
        .await;
    let again = sandbox
        .publish(&url, &key, &sequential("triage", &["echo"]))
        .await;
    assert_eq!(
        (first["version"].clone(), first["created"].clone()),
        (json!(1), json!(true))
    );
    assert_eq!(
        (again["version"].clone(), again["created"].clone()),
        (json!(1), json!(false))
    );
    // No worker runs yet, so the instance stays on version 1 while version 2 is published.
    let old = sandbox
        .start_instance(&url, &key, &json!({ "definition": "triage" }))
        .await;
    let second = sandbox
        .publish(&url, &key, &sequential("triage", &["echo", "noop"]))
        .await;
    assert_eq!(second["version"], 2);
    let new = sandbox
        .start_instance(&url, &key, &json!({ "definition": "triage" }))
        .await;
    let pinned = sandbox
        .start_instance(&url, &key, &json!({ "definition": "triage", "version": 1 }))
        .await;
    sandbox.start_worker(Registry::builtin()).await;
    let old = sandbox
        .wait_finished(&url, &key, &old, Duration::from_secs(30))
        .await;
    let new = sandbox
        .wait_finished(&url, &key, &new, Duration::from_secs(30))
        .await;
    let pinned = sandbox
        .wait_finished(&url, &key, &pinned, Duration::from_secs(30))
        .await;
    let step_count = |instance: &Value| instance["steps"].as_array().unwrap().len();
    assert_eq!((old["version"].clone(), step_count(&old)), (json!(1), 1));
    assert_eq!((new["version"].clone(), step_count(&new)), (json!(2), 2));
    assert_eq!(
        (pinned["version"].clone(), step_count(&pinned)),
        (json!(1), 1)
    );
    sandbox.teardown().await;
}

/// Batch starts take a definition the master resolved before from its
/// memory (no read before the writes); a newer version stored since is
/// still found (the guard in the same round trip fails the transaction and
/// the master reads the definitions again), a pinned version stays pinned,
/// and the rejected attempt leaves nothing behind.
#[tokio::test]
async fn batch_starts_take_a_version_stored_after_the_master_resolved_one() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "hospital", "gold").await;
    sandbox
        .publish(&url, &key, &sequential("admit", &["echo"]))
        .await;
    let batch = async |items: Value| -> Vec<i64> {
        let (status, body) = sandbox
            .post(
                &format!("{url}/v1/instances/batch"),
                &key,
                &json!({ "instances": items }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|started| started["version"].as_i64().unwrap())
            .collect()
    };
    let latest = json!([{ "definition": "admit" }, { "definition": "admit" }]);
    let pinned = json!([{ "definition": "admit", "version": 1 }]);
    // Resolved once, then from memory.
    assert_eq!(batch(latest.clone()).await, [1, 1]);
    assert_eq!(batch(latest.clone()).await, [1, 1]);
    assert_eq!(batch(pinned.clone()).await, [1]);
    assert_eq!(batch(pinned.clone()).await, [1]);
    sandbox
        .publish(&url, &key, &sequential("admit", &["echo", "noop"]))
        .await;
    assert_eq!(batch(latest.clone()).await, [2, 2]);
    assert_eq!(batch(latest).await, [2, 2]);
    assert_eq!(batch(pinned).await, [1]);
    // A single start (`POST /v1/instances`, a group of one) the same way.
    let single = async || -> i64 {
        let (status, body) = sandbox
            .post(
                &format!("{url}/v1/instances"),
                &key,
                &json!({ "definition": "admit" }),
            )
            .await;
        assert!(status == 200 || status == 201, "{status} {body}");
        body["version"].as_i64().unwrap()
    };
    assert_eq!(single().await, 2);
    sandbox
        .publish(&url, &key, &sequential("admit", &["noop"]))
        .await;
    assert_eq!(single().await, 3);
    // The same when the first step is not a plain one (a sub-workflow:
    // its writes are not one statement with the COMMIT, so the guard goes
    // alone before them).
    let parent = |child: &str| {
        format!(
            "name: ward\nsteps:\n  - {{ id: inner, kind: sub_workflow, definition: {child} }}\n"
        )
    };
    sandbox.publish_yaml(&url, &key, &parent("admit")).await;
    let wards = json!([{ "definition": "ward" }]);
    assert_eq!(batch(wards.clone()).await, [1]);
    assert_eq!(batch(wards.clone()).await, [1]);
    sandbox.publish_yaml(&url, &key, &parent("discharge")).await;
    assert_eq!(batch(wards).await, [2]);
    // Every answered start is one instance with its first run, on the
    // version it was answered with: 4 unpinned and 3 pinned on version 1,
    // 4 batched and 1 single on version 2, 1 on version 3.
    let rows = sandbox
        .sql()
        .await
        .query(
            "SELECT d.version, count(DISTINCT i.id), count(r.id) FROM instances i \
             JOIN definitions d ON d.id = i.definition_id \
             LEFT JOIN task_runs r ON r.instance_id = i.id WHERE d.name = 'admit' \
             AND i.parent_instance_id IS NULL GROUP BY d.version ORDER BY d.version",
            &[],
        )
        .await
        .unwrap();
    let counts: Vec<(i32, i64, i64)> = rows
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(counts, [(1, 7, 7), (2, 5, 5), (3, 1, 1)]);
    // The two `ward` instances of version 1 started `admit` children; the
    // one of version 2 names a definition that does not exist.
    let children: i64 = sandbox
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM instances WHERE parent_instance_id IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(children, 2);
    sandbox.teardown().await;
}

#[tokio::test]
async fn another_tenants_instance_is_not_found() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let url = sandbox.url(master);
    let key_a = sandbox.tenant(&url, "tenant-a", "gold").await;
    let key_b = sandbox.tenant(&url, "tenant-b", "gold").await;
    sandbox
        .publish(&url, &key_a, &sequential("private", &["echo"]))
        .await;
    let id = sandbox
        .start_instance(&url, &key_a, &json!({ "definition": "private" }))
        .await;
    let (status, body) = sandbox
        .call(
            Method::GET,
            &format!("{url}/v1/instances/{id}"),
            Some(&key_b),
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, json!("instance_not_found"))
    );
    let (status, body) = sandbox
        .call(
            Method::POST,
            &format!("{url}/v1/instances"),
            Some(&key_b),
            Some(br#"{"definition": "private"}"#),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, json!("definition_not_found"))
    );
    sandbox.teardown().await;
}
