//! Operations files against the real processes: every metric a Grafana
//! panel or a Prometheus rule queries (as listed by
//! `deploy/ops/metric_names`) is exposed on the `/metrics` of a master or a
//! worker, so no dashboard panel stays empty for want of a metric.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::sandbox::Sandbox;
use ward_worker::Registry;

fn families(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn every_metric_the_dashboards_and_alerts_query_is_exposed() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = std::process::Command::new("python3")
        .arg(root.join("deploy/ops/metric_names"))
        .current_dir(&root)
        .output()
        .expect("run deploy/ops/metric_names");
    assert!(output.status.success(), "{output:?}");
    let queried: Vec<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(queried.len() >= 20, "too few metrics queried: {queried:?}");

    let mut sandbox = Sandbox::new().await;
    let master = sandbox.start_master().await;
    let url = sandbox.url(master);
    sandbox.start_worker(Registry::builtin()).await;
    // One API error, so the per-code counter has a series.
    let key = sandbox.tenant(&url, "ops-metrics", "gold").await;
    let (status, _) = sandbox
        .call(
            reqwest::Method::GET,
            &format!("{url}/v1/instances/00000000-0000-0000-0000-000000000000"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, 404);
    sandbox
        .wait_metric(&url, "ward_leader 1", Duration::from_secs(20))
        .await;
    let worker_url = format!("http://{}", sandbox.workers[0].http_addr);
    let mut exposed = families(&sandbox.metrics(&url).await);
    exposed.extend(families(&sandbox.metrics(&worker_url).await));
    let missing: Vec<&String> = queried
        .iter()
        .filter(|name| !exposed.contains(name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "queried by dashboards or rules but not exposed: {missing:?}\nexposed: {exposed:?}"
    );
    // Tenant identity never becomes a label.
    for text in [
        sandbox.metrics(&url).await,
        sandbox.metrics(&worker_url).await,
    ] {
        assert!(!text.contains("tenant_id="), "tenant label exposed");
        assert!(!text.contains("instance_id="), "instance label exposed");
    }
    sandbox.teardown().await;
}
