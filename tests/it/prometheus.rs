//! Prometheus for real: Debian's `prometheus` (installed by
//! `deploy/ops/check`, which `deploy/test` runs first) scrapes a master and
//! a worker with Ward's own rule file; the targets come up and queries of
//! raw and recorded series return live values.

use std::time::{Duration, Instant};

use serde_json::Value;
use ward_worker::Registry;

use crate::sandbox::{Sandbox, free_port};

/// Percent-encodes every byte but ASCII letters and digits.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() {
                (byte as char).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}

async fn query(http: &reqwest::Client, base: &str, promql: &str) -> Vec<Value> {
    let body: Value = http
        .get(format!("{base}/api/v1/query?query={}", encode(promql)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["status"], "success", "{promql}: {body}");
    body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn prometheus_scrapes_masters_and_workers_and_evaluates_the_rules() {
    let binary = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
        .into_iter()
        .find(|path| std::path::Path::new(path).exists())
        .expect("prometheus is not installed: run deploy/ops/check (deploy/test does)");
    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let url = sandbox.url(master);
    sandbox.start_worker(Registry::builtin()).await;
    let worker = sandbox.workers[0].http_addr;
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/prometheus/rules/ward.yml")
        .canonicalize()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("{}-prometheus", sandbox.id));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}
rule_files: [\"{}\"]
scrape_configs:
  - job_name: ward-master
    static_configs: [{{ targets: [\"{}\"], labels: {{ role: master }} }}]
  - job_name: ward-worker
    static_configs: [{{ targets: [\"{}\"], labels: {{ role: worker }} }}]
",
            rules.display(),
            url.trim_start_matches("http://"),
            worker
        ),
    )
    .unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut prometheus = tokio::process::Command::new(binary)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let targets: Option<Value> = match http.get(format!("{base}/api/v1/targets")).send().await {
            Ok(response) => response.json().await.ok(),
            Err(_) => None,
        };
        let up = targets.as_ref().is_some_and(|targets| {
            let active = targets["data"]["activeTargets"].as_array();
            active.is_some_and(|active| {
                active.len() == 2 && active.iter().all(|target| target["health"] == "up")
            })
        });
        if up {
            break;
        }
        assert!(Instant::now() < deadline, "targets not up: {targets:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Live values: the leader gauge, a worker series, and a recording rule
    // of deploy/prometheus/rules/ward.yml over them.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let leader = query(&http, &base, "ward_leader{job=\"ward-master\"}").await;
        let pool = query(
            &http,
            &base,
            "ward_db_pool_connections{role=\"worker\",state=\"total\"}",
        )
        .await;
        let leaders = query(&http, &base, "ward:leaders:sum").await;
        let ready = leader
            .first()
            .is_some_and(|sample| sample["value"][1] == "1")
            && !pool.is_empty()
            && leaders
                .first()
                .is_some_and(|sample| sample["value"][1] == "1");
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no live values: leader {leader:?} pool {pool:?} recorded {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = prometheus.kill().await;
    sandbox.teardown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
