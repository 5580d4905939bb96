//! The multi-tenancy benchmark: memory at 10 versus 10,000 tenants under a
//! Zipf load, a noisy neighbour against 100 quiet tenants, Jain's fairness
//! index, tier priority under saturation, and resource use of one shared
//! deployment versus one deployment per tenant.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use serde_json::{Value, json};

use crate::cluster::{Cluster, Services, Shape};
use crate::load::{self, Zipf, jain, percentile, sorted};

const NOOP: &str =
    "name: work\nsteps:\n  - { id: w, kind: task, handler: noop, retry: { max_attempts: 1 } }\n";
const SLEEP: &str =
    "name: work\nsteps:\n  - { id: w, kind: task, handler: sleep, retry: { max_attempts: 1 } }\n";

/// Sizes of a run.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub many_tenants: usize,
    pub zipf_instances: usize,
    pub steady_seconds: u64,
    pub deployments: [usize; 2],
}

impl Sizes {
    pub fn full() -> Sizes {
        Sizes {
            many_tenants: 10_000,
            zipf_instances: 10_000,
            steady_seconds: 20,
            deployments: [10, 50],
        }
    }

    pub fn quick() -> Sizes {
        Sizes {
            many_tenants: 1_000,
            zipf_instances: 2_000,
            steady_seconds: 6,
            deployments: [3, 6],
        }
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

/// Memory of master and worker at 10 and at `many` tenants, same Zipf load.
pub async fn memory_at_scale(
    services: &Services,
    run: &str,
    sizes: Sizes,
    seed: u64,
) -> anyhow::Result<Value> {
    let mut rows = Vec::new();
    for tenants in [10, sizes.many_tenants] {
        let name = format!("{run}-mem{tenants}");
        let cluster = Cluster::start(services, &name, &Shape::default()).await?;
        let (keys, apply_s) = cluster.apply_tenants("home", tenants, "silver", 64).await?;
        cluster.publish_all(&keys, NOOP, 32).await?;
        let zipf = Zipf::new(tenants, 1.1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let chosen: Vec<&str> = (0..sizes.zipf_instances)
            .map(|_| keys[zipf.sample(&mut rng)].as_str())
            .collect();
        let distinct = chosen
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len();
        let started = Instant::now();
        let accepted = load::burst(&cluster, &chosen, "work", &json!({}), 32).await;
        cluster
            .wait_ended(accepted as i64, Duration::from_secs(600))
            .await?;
        let seconds = started.elapsed().as_secs_f64();
        let rss = cluster.rss_bytes();
        let master = rss
            .iter()
            .filter(|(role, _)| role.starts_with("master"))
            .map(|(_, b)| *b)
            .sum::<u64>();
        let worker = rss
            .iter()
            .filter(|(role, _)| role.starts_with("worker"))
            .map(|(_, b)| *b)
            .sum::<u64>();
        println!(
            "  {tenants:>6} tenants: applied in {apply_s:.1} s; {accepted} instances over {distinct} tenants in {seconds:.1} s \
             ({:.0}/s); master RSS {:.1} MB, worker RSS {:.1} MB",
            accepted as f64 / seconds,
            mb(master),
            mb(worker)
        );
        rows.push(json!({
            "tenants": tenants, "apply_seconds": apply_s, "instances": accepted, "tenants_with_load": distinct,
            "seconds": seconds, "instances_per_second": accepted as f64 / seconds,
            "master_rss_mb": mb(master), "worker_rss_mb": mb(worker),
        }));
        cluster.stop(&Shape::default().tiers).await;
    }
    let growth = (rows[1]["master_rss_mb"].as_f64().unwrap_or(0.0)
        + rows[1]["worker_rss_mb"].as_f64().unwrap_or(0.0))
        - (rows[0]["master_rss_mb"].as_f64().unwrap_or(0.0)
            + rows[0]["worker_rss_mb"].as_f64().unwrap_or(0.0));
    println!(
        "  memory growth from 10 to {} tenants: {growth:.1} MB (target < 50 MB)",
        sizes.many_tenants
    );
    Ok(json!({ "runs": rows, "growth_mb": growth }))
}

/// Quiet tenants' schedule-to-start with and without a flooding neighbour,
/// then Jain's index over equally weighted backlogged tenants.
pub async fn noisy_neighbour(
    services: &Services,
    run: &str,
    sizes: Sizes,
) -> anyhow::Result<Value> {
    // The window equals the worker's slots, so nothing waits in the queue
    // behind another tenant's tasks: waiting happens in Postgres, in fair order.
    let shape = Shape {
        worker_prefetch: 4,
        window_max: 4,
        tiers: vec!["gold".into()],
        ..Shape::default()
    };
    let input = json!({ "sleep_ms": 20 });
    // Three alternating pairs of runs; the figure is the median ratio.
    let mut pairs = Vec::new();
    for repetition in 0..3 {
        let mut results = HashMap::new();
        for with_noisy in [false, true] {
            let name = format!("{run}-noisy{repetition}{}", u8::from(with_noisy));
            results.insert(
                with_noisy,
                quiet_latency(services, &name, &shape, sizes, with_noisy, &input).await?,
            );
        }
        let (base_p50, base_p99, _) = results[&false];
        let (noisy_p50, noisy_p99, quiet_count) = results[&true];
        let ratio = noisy_p99 / base_p99.max(0.001);
        println!(
            "  run {}: quiet tenants' schedule-to-start without the noisy tenant p50 {base_p50:.1} ms p99 {base_p99:.1} ms; \
             with it p50 {noisy_p50:.1} ms p99 {noisy_p99:.1} ms ({quiet_count} tasks): p99 ratio {ratio:.2}",
            repetition + 1
        );
        pairs.push(json!({ "quiet_p50_ms_alone": base_p50, "quiet_p99_ms_alone": base_p99,
            "quiet_p50_ms_with_noisy": noisy_p50, "quiet_p99_ms_with_noisy": noisy_p99, "p99_ratio": ratio }));
    }
    let mut ratios: Vec<f64> = pairs
        .iter()
        .filter_map(|pair| pair["p99_ratio"].as_f64())
        .collect();
    ratios.sort_by(|a, b| a.total_cmp(b));
    let ratio = ratios[ratios.len() / 2];
    println!("  median p99 ratio over 3 runs: {ratio:.2} (target <= 2)");

    // Jain's index: 20 tenants, each a backlog of 150, dispatched while all are backlogged.
    let name = format!("{run}-jain");
    let cluster = Cluster::start(services, &name, &shape).await?;
    let (keys, _) = cluster.apply_tenants("equal", 20, "gold", 64).await?;
    cluster.publish_all(&keys, SLEEP, 20).await?;
    let mut all: Vec<&str> = Vec::new();
    for _ in 0..150 {
        all.extend(keys.iter().map(String::as_str));
    }
    load::burst(&cluster, &all, "work", &input, 32).await;
    cluster
        .wait_ended(all.len() as i64, Duration::from_secs(600))
        .await?;
    let sql = cluster.sql().await?;
    let rows = sql
        .query(
            "WITH last_created AS (SELECT max(created_at) AS at FROM task_runs), \
             window_runs AS (SELECT r.tenant_id FROM task_runs r, last_created WHERE r.dispatched_at > last_created.at \
               ORDER BY r.dispatched_at LIMIT 1000) \
             SELECT t.slug, count(w.tenant_id) FROM tenants t LEFT JOIN window_runs w ON w.tenant_id = t.id \
             GROUP BY t.slug",
            &[],
        )
        .await?;
    let shares: Vec<f64> = rows.iter().map(|row| row.get::<_, i64>(1) as f64).collect();
    let index = jain(&shares);
    println!(
        "  Jain's fairness index over 20 backlogged tenants (1000 dispatches while all were backlogged): {index:.3} (target >= 0.95)"
    );
    cluster.stop(&shape.tiers).await;
    Ok(
        json!({ "runs": pairs, "median_p99_ratio": ratio, "jain_index": index, "jain_shares": shares }),
    )
}

/// One run of 100 quiet tenants (1 instance/s each), with or without a
/// tenant sending 50 times that plus a burst of 500: the quiet tenants'
/// schedule-to-start p50, p99 and sample count.
async fn quiet_latency(
    services: &Services,
    name: &str,
    shape: &Shape,
    sizes: Sizes,
    with_noisy: bool,
    input: &Value,
) -> anyhow::Result<(f64, f64, usize)> {
    let cluster = Cluster::start(services, name, shape).await?;
    let (quiet_keys, _) = cluster.apply_tenants("quiet", 100, "gold", 64).await?;
    let (noisy_keys, _) = cluster.apply_tenants("noisy", 1, "gold", 64).await?;
    cluster.publish_all(&quiet_keys, SLEEP, 32).await?;
    cluster.publish_all(&noisy_keys, SLEEP, 1).await?;
    let mut sends = Vec::new();
    for second in 0..sizes.steady_seconds {
        for (index, key) in quiet_keys.iter().enumerate() {
            sends.push((
                Duration::from_millis(second * 1000 + index as u64 * 10),
                key.clone(),
            ));
        }
        if with_noisy {
            for n in 0..50u64 {
                sends.push((
                    Duration::from_millis(second * 1000 + n * 20),
                    noisy_keys[0].clone(),
                ));
            }
        }
    }
    if with_noisy {
        let burst: Vec<&str> = std::iter::repeat_n(noisy_keys[0].as_str(), 500).collect();
        load::burst(&cluster, &burst, "work", input, 16).await;
    }
    let accepted = load::paced(&cluster, sends, "work", input).await;
    cluster
        .wait_ended(
            accepted as i64 + if with_noisy { 500 } else { 0 },
            Duration::from_secs(600),
        )
        .await?;
    let latencies = load::schedule_to_start(&cluster).await?;
    let quiet = sorted(
        latencies
            .iter()
            .filter(|(slug, _, _)| slug.starts_with("quiet"))
            .map(|(_, _, ms)| *ms)
            .collect(),
    );
    cluster.stop(&shape.tiers).await;
    Ok((
        percentile(&quiet, 0.5),
        percentile(&quiet, 0.99),
        quiet.len(),
    ))
}

/// Gold, silver and bronze tenants, each backlogged, in one saturated cluster.
pub async fn tier_priority(services: &Services, run: &str) -> anyhow::Result<Value> {
    let shape = Shape {
        worker_prefetch: 32,
        window_max: 20,
        ..Shape::default()
    };
    let name = format!("{run}-tiers");
    let cluster = Cluster::start(services, &name, &shape).await?;
    let input = json!({ "sleep_ms": 20 });
    let mut keys_by_tier = Vec::new();
    for tier in ["gold", "silver", "bronze"] {
        let (keys, _) = cluster.apply_tenants(tier, 5, tier, 64).await?;
        cluster.publish_all(&keys, SLEEP, 5).await?;
        keys_by_tier.push(keys);
    }
    let mut all: Vec<&str> = Vec::new();
    for _ in 0..100 {
        for keys in &keys_by_tier {
            all.extend(keys.iter().map(String::as_str));
        }
    }
    load::burst(&cluster, &all, "work", &input, 32).await;
    cluster
        .wait_ended(all.len() as i64, Duration::from_secs(600))
        .await?;
    let latencies = load::schedule_to_start(&cluster).await?;
    let sql = cluster.sql().await?;
    // Shares while every tier still had ready work: dispatches before gold's last dispatch.
    let rows = sql
        .query(
            "WITH gold_done AS (SELECT max(dispatched_at) AS at FROM task_runs WHERE tier = 'gold'), \
             last_created AS (SELECT max(created_at) AS at FROM task_runs) \
             SELECT r.tier, count(*) FROM task_runs r, gold_done, last_created \
             WHERE r.dispatched_at > last_created.at AND r.dispatched_at <= gold_done.at GROUP BY r.tier",
            &[],
        )
        .await?;
    let counts: HashMap<String, i64> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    let total: i64 = counts.values().sum();
    let mut result = serde_json::Map::new();
    let mut line = String::from("  schedule-to-start p99 under saturation:");
    for tier in ["gold", "silver", "bronze"] {
        let values = sorted(
            latencies
                .iter()
                .filter(|(_, t, _)| t == tier)
                .map(|(_, _, ms)| *ms)
                .collect(),
        );
        let p99 = percentile(&values, 0.99);
        let share = counts.get(tier).copied().unwrap_or(0) as f64 / total.max(1) as f64;
        line.push_str(&format!(
            " {tier} {p99:.0} ms (share {:.0} %);",
            share * 100.0
        ));
        result.insert(tier.to_owned(), json!({ "p50_ms": percentile(&values, 0.5), "p99_ms": p99, "share_while_saturated": share }));
    }
    println!("{line} bronze's guaranteed minimum share: 10 %");
    cluster.stop(&shape.tiers).await;
    Ok(Value::Object(result))
}

/// Instances each tenant starts per second in the utilisation scenario: a
/// busy rate, and a rate nearer a care organisation's (still 17,280 a day).
const UTILISATION_RATES_PER_S: [f64; 2] = [2.0, 0.2];

/// `(offset, key)` sends: each key `rate_per_s` times a second for
/// `seconds`, spread evenly; ordered by period, then key.
fn steady_sends(keys: &[String], seconds: u64, rate_per_s: f64) -> Vec<(Duration, String)> {
    let period = 1.0 / rate_per_s;
    let periods = (seconds as f64 * rate_per_s).round() as u64;
    let mut sends = Vec::new();
    for k in 0..periods {
        for (index, key) in keys.iter().enumerate() {
            let offset = k as f64 * period + index as f64 * period / keys.len() as f64;
            sends.push((Duration::from_secs_f64(offset), key.clone()));
        }
    }
    sends
}

/// Memory and CPU per 1,000 tasks: one shared deployment for N tenants
/// versus N deployments of one master and one worker each.
pub async fn utilisation(services: &Services, run: &str, sizes: Sizes) -> anyhow::Result<Value> {
    // N deployments need N times the connections: run them on a Postgres of
    // our own that allows them (the machine's keeps its default 100).
    let postgres = crate::cluster::PrivatePostgres::start(55_432, 1_000).await?;
    let services = &Services {
        database_url: postgres.url.clone(),
        ..services.clone()
    };
    let result = utilisation_on(services, run, sizes).await;
    postgres.stop();
    result
}

async fn utilisation_on(services: &Services, run: &str, sizes: Sizes) -> anyhow::Result<Value> {
    let shape = Shape {
        tiers: vec!["gold".into()],
        pool_size_max: 4,
        ..Shape::default()
    };
    let mut rows = Vec::new();
    for (n, rate) in sizes
        .deployments
        .into_iter()
        .flat_map(|n| UTILISATION_RATES_PER_S.map(|rate| (n, rate)))
    {
        // Shared.
        let shared = Cluster::start(
            services,
            &format!("{run}-shared{n}r{}", (rate * 10.0) as u32),
            &shape,
        )
        .await?;
        let (keys, _) = shared.apply_tenants("org", n, "gold", 64).await?;
        shared.publish_all(&keys, NOOP, 16).await?;
        let cpu_before = shared.cpu_seconds();
        let started = Instant::now();
        // The same steady load both ways: every tenant starts one instance
        // every 1/UTILISATION_RATE_PER_S seconds for `steady_seconds`.
        let done = load::paced(
            &shared,
            steady_sends(&keys, sizes.steady_seconds, rate),
            "work",
            &json!({}),
        )
        .await;
        shared
            .wait_ended(done as i64, Duration::from_secs(600))
            .await?;
        let shared_seconds = started.elapsed().as_secs_f64();
        let shared_cpu = shared.cpu_seconds() - cpu_before;
        let shared_rss: u64 = shared.rss_bytes().iter().map(|(_, b)| b).sum();
        shared.stop(&shape.tiers).await;

        // One deployment per tenant, all loaded at once.
        let mut clusters = Vec::new();
        for index in 0..n {
            clusters.push(
                Cluster::start(
                    services,
                    &format!("{run}-solo{n}r{}x{index}", (rate * 10.0) as u32),
                    &shape,
                )
                .await?,
            );
        }
        let mut solo_keys = Vec::new();
        for cluster in &clusters {
            let (keys, _) = cluster.apply_tenants("org", 1, "gold", 64).await?;
            cluster.publish_all(&keys, NOOP, 1).await?;
            solo_keys.push(keys[0].clone());
        }
        let cpu_before: f64 = clusters.iter().map(Cluster::cpu_seconds).sum();
        let started = Instant::now();
        let loads = clusters
            .iter()
            .zip(&solo_keys)
            .enumerate()
            .map(|(index, (cluster, key))| {
                // Offsets as in the shared run, for this deployment's one tenant.
                let sends: Vec<(Duration, String)> =
                    steady_sends(&solo_keys, sizes.steady_seconds, rate)
                        .into_iter()
                        .enumerate()
                        .filter(|(position, _)| position % solo_keys.len() == index)
                        .map(|(_, send)| send)
                        .collect();
                debug_assert!(sends.iter().all(|(_, send_key)| send_key == key));
                async move {
                    let accepted = load::paced(cluster, sends, "work", &json!({})).await;
                    cluster
                        .wait_ended(accepted as i64, Duration::from_secs(600))
                        .await
                        .map(|()| accepted)
                }
            });
        let solo_done: usize = futures::future::try_join_all(loads)
            .await?
            .into_iter()
            .sum();
        let solo_seconds = started.elapsed().as_secs_f64();
        let solo_cpu = clusters.iter().map(Cluster::cpu_seconds).sum::<f64>() - cpu_before;
        let solo_rss: u64 = clusters
            .iter()
            .flat_map(|cluster| cluster.rss_bytes())
            .map(|(_, b)| b)
            .sum();
        for cluster in clusters {
            cluster.stop(&shape.tiers).await;
        }
        let per_k = |value: f64, tasks: usize| value * 1000.0 / tasks.max(1) as f64;
        let memory_ratio = mb(solo_rss) / mb(shared_rss).max(0.001);
        let cpu_ratio = per_k(solo_cpu, solo_done) / per_k(shared_cpu, done).max(0.000_001);
        println!(
            "  N = {n}, {rate} instances/s per tenant: shared: {:.1} MB, {:.2} CPU s per 1000 tasks ({done} tasks in {shared_seconds:.1} s); \
             {n} deployments: {:.1} MB, {:.2} CPU s per 1000 tasks ({solo_done} tasks in {solo_seconds:.1} s); \
             ratio memory {memory_ratio:.1}x, CPU {cpu_ratio:.1}x",
            mb(shared_rss),
            per_k(shared_cpu, done),
            mb(solo_rss),
            per_k(solo_cpu, solo_done),
        );
        rows.push(json!({
            "n": n,
            "rate_per_tenant_per_s": rate,
            "shared_rss_mb": mb(shared_rss), "shared_cpu_s_per_1000": per_k(shared_cpu, done), "shared_tasks": done,
            "separate_rss_mb": mb(solo_rss), "separate_cpu_s_per_1000": per_k(solo_cpu, solo_done), "separate_tasks": solo_done,
            "memory_ratio": memory_ratio, "cpu_ratio": cpu_ratio,
        }));
    }
    Ok(json!({ "runs": rows }))
}
