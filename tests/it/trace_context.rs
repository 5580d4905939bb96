//! W3C Trace Context across processes: the `traceparent` an HIS sends with
//! `POST /v1/instances` is kept with the instance, travels to the worker in
//! the RabbitMQ message's headers (the body does not carry it), and reaches
//! the service an `http` step calls, with the same trace id and a new span.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use ward_worker::Registry;

use crate::sandbox::Sandbox;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test]
async fn the_callers_trace_reaches_the_service_an_http_step_calls() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let record = record.clone();
        async move {
            let header = request
                .headers()
                .get("traceparent")
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            record.lock().unwrap().push(header);
            axum::Json(json!({ "ok": true }))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stub = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    sandbox.start_worker(Registry::builtin()).await;
    let url = sandbox.url(master);
    let key = sandbox.tenant(&url, "traced", "gold").await;
    sandbox
        .publish_yaml(
            &url,
            &key,
            &format!(
                "name: traced
steps:
  - {{ id: lab, kind: http, url: {stub}/lab }}
"
            ),
        )
        .await;

    let started = |traceparent: Option<&'static str>| {
        let mut request = sandbox
            .http
            .post(format!("{url}/v1/instances"))
            .bearer_auth(&key)
            .json(&json!({ "definition": "traced" }));
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        request.send()
    };
    let response = started(Some(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ))
    .await
    .unwrap();
    assert_eq!(response.status(), 201);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let instance = sandbox
        .wait_finished(&url, &key, &id, Duration::from_secs(30))
        .await;
    assert_eq!(instance["status"], "completed", "{instance}");
    assert_eq!(instance["trace_id"], TRACE_ID, "{instance}");
    let headers = seen.lock().unwrap().clone();
    assert_eq!(headers.len(), 1, "{headers:?}");
    let parts: Vec<&str> = headers[0].split('-').collect();
    assert_eq!(parts.len(), 4, "{headers:?}");
    assert_eq!(parts[1], TRACE_ID, "same trace");
    assert_ne!(parts[2], "00f067aa0ba902b7", "a new span for the hop");

    // No (or an invalid) traceparent: a new trace, still propagated.
    let response = started(Some("not-a-trace")).await.unwrap();
    assert_eq!(response.status(), 201);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let instance = sandbox
        .wait_finished(&url, &key, &id, Duration::from_secs(30))
        .await;
    let trace_id = instance["trace_id"].as_str().unwrap().to_owned();
    assert_eq!(trace_id.len(), 32, "{instance}");
    assert_ne!(trace_id, TRACE_ID);
    let headers = seen.lock().unwrap().clone();
    assert!(headers[1].contains(&trace_id), "{headers:?}");
    sandbox.teardown().await;
}
