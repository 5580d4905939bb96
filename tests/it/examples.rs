//! The example definitions in `examples/`, each started and completed on the
//! real stack: admission (with the Python external worker and a stub
//! pharmacy system) and lab-result routing (with review and archive).
//! Vitals monitoring runs in `workflow::signals_complete_waits_and_timeouts_escalate`.

use std::time::{Duration, Instant};

use serde_json::json;
use ward_worker::Registry;

use crate::sandbox::Sandbox;

const WAIT: Duration = Duration::from_secs(30);

async fn pharmacy_stub() -> String {
    let app = axum::Router::new().route(
        "/pharmacy/check",
        axum::routing::post(
            |axum::Json(body): axum::Json<serde_json::Value>| async move {
                axum::Json(json!({ "interactions": [], "checked": body["medications"] }))
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn admission_runs_with_an_http_step_and_a_python_external_worker() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    sandbox.start_worker(Registry::builtin()).await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "general-hospital", "gold").await;
    let pharmacy = pharmacy_stub().await;
    let yaml =
        include_str!("../../examples/admission.yaml").replace("http://127.0.0.1:18080", &pharmacy);
    sandbox.publish_yaml(&url, &key, &yaml).await;
    let id = sandbox
        .start_instance(
            &url,
            &key,
            &json!({ "definition": "admission", "input": { "patient": "p-100", "ward": "3B", "medications": ["metformin"] } }),
        )
        .await;

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/external_worker.py"
    );
    let output = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new("python3")
            .arg(script)
            .args([
                "--url",
                &url,
                "--api-key",
                &key,
                "--handler",
                "care-plan.open",
                "--once",
            ])
            .output(),
    )
    .await
    .expect("the external worker finishes")
    .expect("python3 runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("completed care-plan.open"));

    let instance = sandbox.wait_finished(&url, &key, &id, WAIT).await;
    assert_eq!(instance["status"], "completed", "{instance}");
    assert_eq!(instance["output"]["medication_ok"], true);
    assert_eq!(instance["output"]["care_plan"]["care_plan"], "plan-p-100");
    assert_eq!(
        instance["output"]["bed"],
        json!({ "patient": "p-100", "ward": "3B" })
    );
    sandbox.teardown().await;
}

#[tokio::test]
async fn lab_results_route_critical_values_to_review_and_archive_all() {
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    sandbox.start_worker(Registry::builtin()).await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "central-lab", "silver").await;
    sandbox
        .publish_yaml(&url, &key, include_str!("../../examples/lab-archive.yaml"))
        .await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            include_str!("../../examples/lab-result-routing.yaml"),
        )
        .await;
    let result = |value: f64| {
        json!({ "definition": "lab-result-routing", "input": {
            "patient": "p-5", "test": "potassium", "value": value,
            "critical_low": 2.8, "critical_high": 6.2, "ordering_physician": "dr-okafor" } })
    };

    let critical = sandbox.start_instance(&url, &key, &result(7.1)).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let instance = sandbox.instance(&url, &key, &critical).await;
        let waiting = instance["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["step_id"] == "await_review" && s["state"] == "waiting");
        if waiting {
            break;
        }
        assert!(Instant::now() < deadline, "{instance}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = sandbox
        .post(
            &format!("{url}/v1/instances/{critical}/signals/physician_review"),
            &key,
            &json!({ "by": "dr-okafor", "action": "repeat test" }),
        )
        .await;
    assert_eq!(status, 202);
    let instance = sandbox.wait_finished(&url, &key, &critical, WAIT).await;
    assert_eq!(instance["status"], "completed", "{instance}");
    assert_eq!(instance["output"]["filed"]["critical"], true);
    assert_eq!(instance["output"]["filed"]["review"]["by"], "dr-okafor");
    assert_eq!(instance["output"]["archive"]["archived"], true);

    let normal = sandbox.start_instance(&url, &key, &result(4.1)).await;
    let instance = sandbox.wait_finished(&url, &key, &normal, WAIT).await;
    assert_eq!(instance["status"], "completed", "{instance}");
    assert_eq!(instance["output"]["filed"]["critical"], false);
    assert_eq!(
        instance["output"]["filed"]["review"],
        serde_json::Value::Null
    );
    assert_eq!(instance["output"]["archive"]["record"]["value"], 4.1);
    sandbox.teardown().await;
}
