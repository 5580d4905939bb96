//! `ward-bench perf`: the performance scenarios. Throughput of single-step
//! no-op tasks, workflow steps (a 3-step chain, a 1 -> 10 -> 1 fan-out),
//! latency at fixed offered load measured from the intended send time,
//! queries under concurrency over a large store, the raw substrate (RabbitMQ
//! confirm + ack on a quorum queue, single-row Postgres commits), and memory
//! and CPU per 1,000 tasks. Writes JSON and Markdown; `bench/plot.py` draws
//! the PNGs.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::cluster::{Cluster, Services, Shape};
use crate::load::percentile;

/// How a run goes.
#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    pub seed: u64,
    /// Measured window of each throughput and latency scenario.
    pub measure_s: u64,
    pub warmup_s: u64,
    /// Instances stored for the query scenario, and tenants they spread over.
    pub query_instances: i64,
    pub query_tenants: usize,
    pub query_clients: usize,
    /// Ready tasks bulk-loaded for the backlog scenario.
    pub backlog_tasks: i64,
    pub out: std::path::PathBuf,
    /// Scenarios to run (empty: all): throughput, steps, latency, queries,
    /// substrate, backlog. Latency, queries, substrate (for its latency
    /// floor at scenario 3's loads) and backlog need throughput's figure
    /// and run it.
    pub only: Vec<String>,
    /// Scenario 3's offered loads, as shares of scenario 1's maximum.
    pub latency_shares: Vec<f64>,
    /// Scenario 1's maximum given instead of measured (scenario 1 skipped).
    pub max_per_s: Option<f64>,
    /// A running cluster to measure instead of starting one.
    pub attach: Option<crate::cluster::Attach>,
}

impl Options {
    fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|only| only == scenario)
    }
}

impl Options {
    pub fn new(quick: bool, seed: u64, out: std::path::PathBuf) -> Options {
        Options {
            quick,
            seed,
            measure_s: if quick { 8 } else { 30 },
            warmup_s: if quick { 3 } else { 5 },
            query_instances: if quick { 100_000 } else { 1_000_000 },
            query_tenants: if quick { 1_000 } else { 10_000 },
            query_clients: if quick { 50 } else { 200 },
            backlog_tasks: if quick { 100_000 } else { 1_000_000 },
            out,
            only: Vec::new(),
            latency_shares: vec![0.25, 0.5, 0.8],
            max_per_s: None,
            attach: None,
        }
    }
}

const NOOP: &str = "name: perf-noop
steps:
  - { id: only, kind: task, handler: noop }
";
const STORED: &str = "name: perf-stored
steps:
  - { id: only, kind: task, handler: noop }
";
const CHAIN: &str = "name: perf-chain
steps:
  - { id: a, kind: task, handler: noop }
  - { id: b, kind: task, handler: noop, needs: [a] }
  - { id: c, kind: task, handler: noop, needs: [b] }
";

fn fan_out() -> String {
    let mut yaml =
        String::from("name: perf-fan\nsteps:\n  - { id: start, kind: task, handler: noop }\n");
    for branch in 0..10 {
        yaml.push_str(&format!(
            "  - {{ id: b{branch}, kind: task, handler: noop, needs: [start] }}\n"
        ));
    }
    let needs: Vec<String> = (0..10).map(|branch| format!("b{branch}")).collect();
    yaml.push_str(&format!(
        "  - {{ id: join, kind: task, handler: noop, needs: [{}] }}\n",
        needs.join(", ")
    ));
    yaml
}

/// Most instances of a scenario left running before the submitters pause:
/// the engine is measured at its own pace, with a bounded backlog.
const BACKLOG_MAX: i64 = 2_000;

/// Instances per batch-start request in scenarios 1 and 2.
const SUBMIT_BATCH_LEN: usize = 100;
/// Closed-loop submitting clients in scenarios 1 and 2.
const SUBMIT_CLIENTS: usize = 8;

/// Submits closed-loop from `concurrency` clients until `stop`, each
/// request a batch start of `SUBMIT_BATCH_LEN` instances, pausing while
/// `paused` (the backlog is full); counts accepted instances.
async fn submit_closed(
    cluster: &Cluster,
    keys: &[String],
    definition: &str,
    concurrency: usize,
    stop: &AtomicBool,
    paused: &AtomicBool,
    accepted: &AtomicU64,
) {
    let item = json!({ "definition": definition, "input": {} });
    let body = json!({ "instances": vec![item; SUBMIT_BATCH_LEN] });
    futures::stream::iter(0..concurrency)
        .for_each_concurrent(concurrency, |client| {
            let body = &body;
            async move {
                let mut n = client;
                while !stop.load(Ordering::Relaxed) {
                    if paused.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    let key = &keys[n % keys.len()];
                    n += concurrency;
                    if cluster.post(key, "/v1/instances/batch", body).await.is_ok() {
                        accepted.fetch_add(SUBMIT_BATCH_LEN as u64, Ordering::Relaxed);
                    }
                }
            }
        })
        .await;
}

/// The processes' count of completed instances, for the per-second series:
/// reading it puts no load on the database under test (the window's total
/// is still counted from the rows, durably committed).
const COMPLETED_SERIES: &str = "ward_instances_finished_total{status=\"completed\"}";

/// Completions per second over `seconds` seconds, from the processes'
/// counters.
async fn completed_series(cluster: &Cluster, seconds: u64) -> Vec<i64> {
    let mut series = Vec::new();
    let mut before = cluster.metric_sum(COMPLETED_SERIES).await;
    let mut next = tokio::time::Instant::now();
    for _ in 0..seconds {
        next += Duration::from_secs(1);
        tokio::time::sleep_until(next).await;
        let now = cluster.metric_sum(COMPLETED_SERIES).await;
        series.push((now - before).max(0.0) as i64);
        before = now;
    }
    series
}

/// Instances completed between two instants (by their `completed_at`).
async fn completed_between(
    sql: &tokio_postgres::Client,
    definition: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> anyhow::Result<i64> {
    Ok(sql
        .query_one(
            "SELECT count(*) FROM instances WHERE definition_name = $1 AND status = 'completed' \
             AND completed_at >= $2 AND completed_at < $3",
            &[&definition, &from, &to],
        )
        .await?
        .get(0))
}

/// Scenario 1 and 2: the sustained completion rate of `definition` under
/// closed-loop load, with a per-second series.
async fn sustained(
    cluster: &Cluster,
    keys: &[String],
    definition: &str,
    options: &Options,
) -> anyhow::Result<Value> {
    let sql = cluster.sql().await?;
    let stop = AtomicBool::new(false);
    let paused = AtomicBool::new(false);
    let accepted = AtomicU64::new(0);
    // The backlog from the processes' own counters (started minus ended),
    // so watching it puts no load on the database under test.
    let watch_backlog = async {
        while !stop.load(Ordering::Relaxed) {
            let started = cluster.metric_sum("ward_instances_started_total").await;
            let ended = cluster.metric_sum("ward_instances_finished_total").await;
            paused.store(started - ended >= BACKLOG_MAX as f64, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(())
    };
    let cpu_master_before = cluster.cpu_seconds_of("master");
    let cpu_worker_before = cluster.cpu_seconds_of("worker");
    let measure = async {
        tokio::time::sleep(Duration::from_secs(options.warmup_s)).await;
        let start: DateTime<Utc> = sql.query_one("SELECT now()", &[]).await?.get(0);
        let cpu_master = cluster.cpu_seconds_of("master");
        let cpu_worker = cluster.cpu_seconds_of("worker");
        let usage = Usage::read(&sql).await?;
        let series = completed_series(cluster, options.measure_s).await;
        let usage = usage.since(&sql).await?;
        let at = start + chrono::Duration::seconds(options.measure_s as i64);
        // Let the last second's commits land before counting the window.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let total = completed_between(&sql, definition, start, at).await?;
        let cpu = (
            cluster.cpu_seconds_of("master") - cpu_master,
            cluster.cpu_seconds_of("worker") - cpu_worker,
        );
        stop.store(true, Ordering::Relaxed);
        anyhow::Ok((total, series, cpu, usage))
    };
    let (result, (), watched) = tokio::join!(
        measure,
        submit_closed(
            cluster,
            keys,
            definition,
            SUBMIT_CLIENTS,
            &stop,
            &paused,
            &accepted
        ),
        watch_backlog
    );
    watched?;
    let (total, series, (cpu_master, cpu_worker), usage) = result?;
    // Drain what is left so the next scenario starts from an empty queue.
    cluster
        .wait_definition_ended(definition, Duration::from_secs(300))
        .await?;
    let _ = (cpu_master_before, cpu_worker_before);
    let per_s = total as f64 / options.measure_s as f64;
    Ok(json!({
        "definition": definition,
        "instances_per_s": round1(per_s),
        "completed_in_window": total,
        "window_s": options.measure_s,
        "per_second": series,
        "cpu_s_master": round3(cpu_master),
        "cpu_s_worker": round3(cpu_worker),
        "accepted_total": accepted.load(Ordering::Relaxed),
        "machine_cpu_busy_share": round3(usage.busy_share),
        "postgres_commits_per_task": round3(usage.commits / (total as f64).max(1.0)),
    }))
}

/// What a window cost the machine: the share of all cores busy (from
/// `/proc/stat`) and the transactions the database committed.
struct Usage {
    busy_share: f64,
    commits: f64,
    cpu: (u64, u64),
}

impl Usage {
    /// The counters now (`busy_share` and `commits` are totals so far).
    async fn read(sql: &tokio_postgres::Client) -> anyhow::Result<Usage> {
        let commits: i64 = sql
            .query_one(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
                &[],
            )
            .await?
            .get(0);
        // busy and idle jiffies: user nice system [idle iowait] irq softirq steal
        let cpu = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| {
                let fields: Vec<u64> = text
                    .lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|field| field.parse().ok())
                    .collect();
                let idle = fields.get(3)? + fields.get(4)?;
                let busy = fields.iter().take(8).sum::<u64>() - idle;
                Some((busy, idle))
            })
            .unwrap_or_default();
        Ok(Usage {
            busy_share: 0.0,
            commits: commits as f64,
            cpu,
        })
    }

    /// The usage between `self` and now. Postgres publishes its counters
    /// with up to a second's delay: over a window of tens of seconds that
    /// is a few per cent.
    async fn since(&self, sql: &tokio_postgres::Client) -> anyhow::Result<Usage> {
        let now = Usage::read(sql).await?;
        let busy = now.cpu.0.saturating_sub(self.cpu.0) as f64;
        let idle = now.cpu.1.saturating_sub(self.cpu.1) as f64;
        Ok(Usage {
            busy_share: busy / (busy + idle).max(1.0),
            commits: now.commits - self.commits,
            cpu: now.cpu,
        })
    }
}

/// Scenario 3's batching tick: instances intended within one tick are
/// submitted together at its end.
const LATENCY_TICK_MS: u64 = 10;

/// Stages of scenario 3's path whose mean duration it prints, from the
/// processes' histograms: (name, sum series, count series).
const STAGES: [(&str, &str, &str); 3] = [
    (
        "batch_start_tx",
        "ward_store_transaction_seconds_sum{op=\"start_instances\"}",
        "ward_store_transaction_seconds_count{op=\"start_instances\"}",
    ),
    (
        "dispatch_round",
        "ward_dispatch_batch_seconds_sum",
        "ward_dispatch_batch_seconds_count",
    ),
    (
        "publish_confirm",
        "ward_publish_confirm_seconds_sum",
        "ward_publish_confirm_seconds_count",
    ),
];

/// The (sum, count) of each of `STAGES` over every process.
async fn stage_totals(cluster: &Cluster) -> Vec<(f64, f64)> {
    let mut totals = Vec::with_capacity(STAGES.len());
    for (_, sum, count) in STAGES {
        totals.push((
            cluster.metric_sum(sum).await,
            cluster.metric_sum(count).await,
        ));
    }
    totals
}

/// Scenario 3: open-loop sends at `rate_per_s` for the window; latency from
/// each send's intended time (no coordinated omission).
async fn latency_at(
    cluster: &Cluster,
    keys: &[String],
    rate_per_s: f64,
    window_s: u64,
) -> anyhow::Result<Value> {
    let stages_before = stage_totals(cluster).await;
    let usage = Usage::read(&cluster.sql().await?).await?;
    let started = Instant::now();
    let started_wall = Utc::now();
    let count = (rate_per_s * window_s as f64).round() as usize;
    let interval = 1.0 / rate_per_s.max(0.1);
    // Open loop, as scenario 1 submits: the instances whose intended send
    // time falls in one tick go out together as one batch start at the
    // tick's end (one tenant per tick, in turn). The wait for the tick is
    // part of every latency measured, which counts from the intended time.
    let tick = Duration::from_millis(LATENCY_TICK_MS);
    let mut per_tick: Vec<Vec<DateTime<Utc>>> = Vec::new();
    for n in 0..count {
        let offset = Duration::from_secs_f64(n as f64 * interval);
        let k = (offset.as_millis() / u128::from(LATENCY_TICK_MS)) as usize;
        if per_tick.len() <= k {
            per_tick.resize(k + 1, Vec::new());
        }
        per_tick[k].push(started_wall + chrono::Duration::from_std(offset).unwrap_or_default());
    }
    let limit = Arc::new(tokio::sync::Semaphore::new(2_048));
    let mut handles = Vec::with_capacity(per_tick.len());
    for (k, intended) in per_tick.into_iter().enumerate() {
        if intended.is_empty() {
            continue;
        }
        let http = cluster.http.clone();
        let url = format!("{}/v1/instances/batch", cluster.url);
        let key = keys[k % keys.len()].clone();
        let limit = limit.clone();
        let send_at = started + tick * (k as u32 + 1);
        handles.push(tokio::spawn(async move {
            tokio::time::sleep_until(send_at.into()).await;
            let _permit = limit.acquire().await.ok()?;
            let items = vec![json!({ "definition": "perf-noop", "input": {} }); intended.len()];
            let response = http
                .post(url)
                .bearer_auth(key)
                .json(&json!({ "instances": items }))
                .send()
                .await
                .ok()?;
            let body: Value = response.json().await.ok()?;
            let started: Vec<uuid::Uuid> = body["instances"]
                .as_array()?
                .iter()
                .filter_map(|item| uuid::Uuid::parse_str(item["id"].as_str()?).ok())
                .collect();
            Some(started.into_iter().zip(intended).collect::<Vec<_>>())
        }));
    }
    let mut sent: Vec<(uuid::Uuid, DateTime<Utc>)> = Vec::with_capacity(count);
    for handle in handles {
        if let Ok(Some(pairs)) = handle.await {
            sent.extend(pairs);
        }
    }
    // The sends are over: the window's usage (the last ones still run).
    let usage = usage.since(&cluster.sql().await?).await?;
    let ids: Vec<uuid::Uuid> = sent.iter().map(|(id, _)| *id).collect();
    cluster
        .wait_ids_ended(&ids, Duration::from_secs(120))
        .await?;
    // Mean duration of each stage over the window (and its drain).
    let mut stage_means = serde_json::Map::new();
    for ((name, _, _), ((sum_before, count_before), (sum_after, count_after))) in STAGES
        .iter()
        .zip(stages_before.into_iter().zip(stage_totals(cluster).await))
    {
        let count = count_after - count_before;
        let mean_ms = (count > 0.0).then(|| round3((sum_after - sum_before) / count * 1000.0));
        stage_means.insert((*name).to_owned(), json!(mean_ms));
    }
    let sql = cluster.sql().await?;
    let rows = sql
        .query(
            "SELECT i.id, i.completed_at, r.created_at, r.started_at, r.dispatched_at FROM instances i \
             JOIN task_runs r ON r.instance_id = i.id WHERE i.id = ANY($1)",
            &[&ids],
        )
        .await?;
    let intended: std::collections::HashMap<uuid::Uuid, DateTime<Utc>> = sent.into_iter().collect();
    let mut start_ms = Vec::new();
    let mut end_ms = Vec::new();
    // The two hops of schedule-to-start: until the dispatch round's
    // transaction began, and from there until a worker took the message.
    let (mut to_dispatch_ms, mut to_worker_ms) = (Vec::new(), Vec::new());
    // Schedule-to-start per second of `created_at` (Unix seconds), so its
    // tail can be lined up with what else happened on the machine then.
    let mut start_ms_by_s: std::collections::BTreeMap<i64, Vec<f64>> = Default::default();
    let ms = |from: DateTime<Utc>, to: DateTime<Utc>| {
        (to - from).num_microseconds().unwrap_or(0) as f64 / 1000.0
    };
    for row in rows {
        let id: uuid::Uuid = row.get(0);
        let completed: Option<DateTime<Utc>> = row.get(1);
        let created: DateTime<Utc> = row.get(2);
        let begun: Option<DateTime<Utc>> = row.get(3);
        let dispatched: Option<DateTime<Utc>> = row.get(4);
        if let Some(begun) = begun {
            start_ms.push(ms(created, begun));
            start_ms_by_s
                .entry(created.timestamp())
                .or_default()
                .push(ms(created, begun));
            if let Some(dispatched) = dispatched {
                to_dispatch_ms.push(ms(created, dispatched));
                to_worker_ms.push(ms(dispatched, begun));
            }
        }
        if let (Some(completed), Some(sent)) = (completed, intended.get(&id)) {
            end_ms.push((completed - *sent).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        }
    }
    for values in [
        &mut start_ms,
        &mut end_ms,
        &mut to_dispatch_ms,
        &mut to_worker_ms,
    ] {
        values.sort_by(f64::total_cmp);
    }
    Ok(json!({
        "offered_per_s": round1(rate_per_s),
        "sent": count,
        "acknowledged": ids.len(),
        "elapsed_s": round3(started.elapsed().as_secs_f64()),
        "schedule_to_start_ms": latency_summary(&start_ms),
        "created_to_dispatched_ms": latency_summary(&to_dispatch_ms),
        "dispatched_to_started_ms": latency_summary(&to_worker_ms),
        "stage_mean_ms": stage_means,
        "machine_cpu_busy_share": round3(usage.busy_share),
        "postgres_commits_per_task": round3(usage.commits / (count as f64).max(1.0)),
        "end_to_end_ms": latency_summary(&end_ms),
        "schedule_to_start_per_second": per_second_summary(start_ms_by_s),
    }))
}

/// Count, p50 and p99 of each second's latencies, keyed by Unix second.
fn per_second_summary(by_s: std::collections::BTreeMap<i64, Vec<f64>>) -> Value {
    by_s.into_iter()
        .map(|(second, mut values)| {
            values.sort_by(f64::total_cmp);
            json!({
                "unix_s": second,
                "count": values.len(),
                "p50_ms": round3(percentile(&values, 0.50)),
                "p99_ms": round3(percentile(&values, 0.99)),
            })
        })
        .collect()
}

/// Queries each client of scenario 4 sends per second (a HIS polling an
/// instance's status every 200 ms).
const QUERY_RATE_PER_CLIENT_PER_S: f64 = 5.0;

/// Scenario 4's stored instances: bulk-loaded over many tenants, then
/// vacuumed and checkpointed before the window (`settle`), as a
/// deployment's history is; what is measured is the queries, not the
/// aftermath of a bulk insert.
struct Stored {
    count: i64,
    load_s: f64,
    settle_s: f64,
    /// (instance id, index of its tenant's key)
    samples: Vec<(String, usize)>,
}

/// Vacuums (which also sets the hint bits and the visibility map of rows
/// just bulk-loaded) and analyzes `tables`, then checkpoints: a bulk load's
/// aftermath (autovacuum's pass over new rows, the first reads writing hint
/// bits, a checkpoint of the load's WAL) then stays out of the window.
async fn settle(sql: &tokio_postgres::Client, tables: &[&str]) -> anyhow::Result<f64> {
    let began = Instant::now();
    for table in tables {
        sql.batch_execute(&format!("VACUUM (ANALYZE) {table}"))
            .await?;
    }
    sql.batch_execute("CHECKPOINT").await?;
    Ok(began.elapsed().as_secs_f64())
}

/// SQL for a version-7 UUID (as the engine's `Uuid::now_v7()`) whose time
/// is `ms_sql` (ms since the epoch) and whose other bits come from md5 of
/// `salt` and `n_sql`: bulk loads get ids in the order the engine would
/// have given them, so a backlog is claimed (by instance id) in the order
/// it was written, as a real one is, instead of in random order. Unique
/// within a load while `ms_sql` is; two loads differ by their `salt` (their
/// times may meet).
fn uuid_v7_sql(salt: &str, ms_sql: &str, n_sql: &str) -> String {
    let hash = format!("decode(md5('{salt}:' || ({n_sql})::text), 'hex')");
    format!(
        "encode(set_byte(set_byte(substring(int8send(({ms_sql})::bigint) from 3 for 6) || substring({hash} from 1 for 10), \
         6, (get_byte({hash}, 0) & 15) | 112), 8, (get_byte({hash}, 2) & 63) | 128), 'hex')::uuid"
    )
}

/// Now, in ms since the epoch (SQL).
const NOW_MS_SQL: &str = "(extract(epoch from now()) * 1000)::bigint";

/// Bulk-stores scenario 4's instances over `keys`' tenants, settles them and
/// samples ids for the status queries.
async fn store_instances(
    cluster: &Cluster,
    options: &Options,
    keys: &[String],
    tenant_prefix: &str,
) -> anyhow::Result<Stored> {
    let sql = cluster.sql().await?;
    let loaded = Instant::now();
    // One definition row serves every stored instance (a foreign key only).
    sql.batch_execute(&format!(
        "INSERT INTO instances (id, tenant_id, definition_id, definition_name, status, input, created_at, updated_at, completed_at) \
         SELECT {id}, t.id, d.id, 'perf-stored', CASE WHEN n % 10 = 0 THEN 'failed' ELSE 'completed' END, \
                '{{}}'::jsonb, now() - n * interval '1 millisecond', now(), now() \
         FROM generate_series(1, {count}) AS n \
         JOIN (SELECT id, row_number() OVER (ORDER BY slug) - 1 AS k FROM tenants WHERE slug LIKE '{tenant_prefix}-%') t \
           ON t.k = n % {tenants} \
         JOIN definitions d ON d.tenant_id = t.id AND d.name = 'perf-stored' AND d.version = 1",
        count = options.query_instances,
        tenants = keys.len(),
        // Created n ms ago, as `created_at` says.
        id = uuid_v7_sql("stored", &format!("{NOW_MS_SQL} - n"), "n"),
    ))
    .await?;
    let load_s = loaded.elapsed().as_secs_f64();
    let settle_s = settle(&sql, &["instances"]).await?;
    let stored: i64 = sql
        .query_one("SELECT count(*) FROM instances", &[])
        .await?
        .get(0);
    // Sample ids per tenant for the status queries.
    let rows = sql
        .query(
            &format!(
                "SELECT i.id::text, t.slug FROM instances i TABLESAMPLE SYSTEM (1) \
                 JOIN tenants t ON t.id = i.tenant_id WHERE t.slug LIKE '{tenant_prefix}-%' LIMIT 20000"
            ),
            &[],
        )
        .await?;
    let samples: Vec<(String, usize)> = rows
        .iter()
        .filter_map(|row| {
            let slug: String = row.get(1);
            let index = slug.rsplit('-').next()?.parse().ok()?;
            Some((row.get(0), index))
        })
        .collect();
    anyhow::ensure!(!samples.is_empty(), "no stored instance sampled");
    Ok(Stored {
        count: stored,
        load_s,
        settle_s,
        samples,
    })
}

/// The `q` quantile, in ms, of what was observed between two readings of a
/// histogram's cumulative buckets (`Cluster::buckets`), interpolated within
/// its bucket as Prometheus's `histogram_quantile` does; `None` without
/// observations.
fn bucket_quantile_ms(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let counted = |bound: f64| {
        let at = |buckets: &[(f64, f64)]| {
            buckets
                .iter()
                .find(|(le, _)| *le == bound)
                .map_or(0.0, |(_, count)| *count)
        };
        at(after) - at(before)
    };
    let total = after.last().map(|(le, _)| counted(*le))?;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (upper, _) in after {
        let cumulative = counted(*upper);
        if cumulative >= rank {
            if upper.is_infinite() {
                return Some(lower * 1000.0);
            }
            let share = (rank - below) / (cumulative - below).max(f64::MIN_POSITIVE);
            return Some((lower + (upper - lower) * share) * 1000.0);
        }
        (lower, below) = (*upper, cumulative);
    }
    Some(lower * 1000.0)
}

/// A histogram's cumulative buckets: (upper bound in seconds, count).
type Buckets = Vec<(f64, f64)>;

/// The buckets of the processes read both `before` and `after` a window,
/// summed, as (before, after): a process missing from either reading (it
/// did not answer) is left out rather than skew the window.
fn summed_over_both(
    before: &HashMap<String, Buckets>,
    after: &HashMap<String, Buckets>,
) -> (Buckets, Buckets) {
    let (mut sum_before, mut sum_after): (Buckets, Buckets) = (Vec::new(), Vec::new());
    for (process, after) in after {
        let Some(before) = before.get(process) else {
            continue;
        };
        for (sums, buckets) in [(&mut sum_before, before), (&mut sum_after, after)] {
            for (bound, count) in buckets {
                match sums.iter_mut().find(|(le, _)| le == bound) {
                    Some((_, sum)) => *sum += count,
                    None => sums.push((*bound, *count)),
                }
            }
            sums.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
    }
    (sum_before, sum_after)
}

/// The masters' `ward_http_request_seconds` bucket series of answered
/// (2xx) GETs of `route`.
fn answered_gets(route: &str) -> String {
    format!("ward_http_request_seconds_bucket{{class=\"2xx\",method=\"GET\",route=\"{route}\"")
}

/// Scenario 4's window: `options.query_clients` clients issue status and
/// filtered-list queries over `stored`, each at `QUERY_RATE_PER_CLIENT_PER_S`
/// (open loop, from the intended send time).
async fn queries(
    cluster: &Cluster,
    options: &Options,
    keys: &[String],
    stored: &Stored,
) -> anyhow::Result<Value> {
    let began_at = Instant::now();
    let deadline = began_at + Duration::from_secs(options.measure_s);
    let interval = Duration::from_secs_f64(1.0 / QUERY_RATE_PER_CLIENT_PER_S);
    let status_ms = Arc::new(std::sync::Mutex::new(Vec::new()));
    let list_ms = Arc::new(std::sync::Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicU64::new(0));
    // The same requests as the master timed them, from their arrival to
    // their answer (what the client waited beyond that was the machine's).
    let (status_series, list_series) = (
        answered_gets("/v1/instances/{id}"),
        answered_gets("/v1/instances"),
    );
    let status_before = cluster.buckets(&status_series).await;
    let list_before = cluster.buckets(&list_series).await;
    let mut handles = Vec::new();
    for client in 0..options.query_clients {
        let http = cluster.http.clone();
        let base = cluster.url.clone();
        let keys = keys.to_vec();
        let samples = stored.samples.clone();
        let (status_ms, list_ms, errors) = (status_ms.clone(), list_ms.clone(), errors.clone());
        let seed = options.seed + client as u64;
        handles.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            // Open loop: each client sends on its own schedule, spread over
            // the first interval; latency counts from the intended send.
            let mut intended = began_at + interval.mul_f64(rng.random_range(0.0..1.0));
            while intended < deadline {
                tokio::time::sleep_until(intended.into()).await;
                let (id, tenant) = &samples[rng.random_range(0..samples.len())];
                let status = rng.random_bool(0.5);
                let url = if status {
                    format!("{base}/v1/instances/{id}")
                } else {
                    format!("{base}/v1/instances?definition=perf-stored&status=failed&limit=20")
                };
                let began = intended;
                intended += interval;
                // Timed to the body's last byte, as a client waits for it
                // (the time to the headers alone left the body's transfer
                // and parsing out).
                let ok = match http.get(url).bearer_auth(&keys[*tenant]).send().await {
                    Ok(response) => {
                        let success = response.status().is_success();
                        response.bytes().await.is_ok() && success
                    }
                    Err(_) => false,
                };
                let ms = began.elapsed().as_secs_f64() * 1000.0;
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                } else if status {
                    status_ms.lock().unwrap().push(ms);
                } else {
                    list_ms.lock().unwrap().push(ms);
                }
            }
        }));
    }
    for handle in handles {
        let _ = handle.await;
    }
    let status_after = cluster.buckets(&status_series).await;
    let list_after = cluster.buckets(&list_series).await;
    let server = |before: &HashMap<String, Buckets>, after: &HashMap<String, Buckets>| {
        let (before, after) = summed_over_both(before, after);
        json!({
            "p50_ms": bucket_quantile_ms(&before, &after, 0.5).map(round3),
            "p99_ms": bucket_quantile_ms(&before, &after, 0.99).map(round3),
        })
    };
    let mut status_ms = std::mem::take(&mut *status_ms.lock().unwrap());
    let mut list_ms = std::mem::take(&mut *list_ms.lock().unwrap());
    status_ms.sort_by(f64::total_cmp);
    list_ms.sort_by(f64::total_cmp);
    Ok(json!({
        "stored_instances": stored.count,
        "tenants": keys.len(),
        "load_s": round1(stored.load_s),
        "settle_s": round1(stored.settle_s),
        "clients": options.query_clients,
        "status": { "count": status_ms.len(), "p50_ms": round3(percentile(&status_ms, 0.5)), "p99_ms": round3(percentile(&status_ms, 0.99)),
            "server_side": server(&status_before, &status_after) },
        "filtered_list": { "count": list_ms.len(), "p50_ms": round3(percentile(&list_ms, 0.5)), "p99_ms": round3(percentile(&list_ms, 0.99)),
            "server_side": server(&list_before, &list_after) },
        "errors": errors.load(Ordering::Relaxed),
    }))
}

/// Ready task runs waiting for dispatch.
async fn ready_count(sql: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(sql
        .query_one(
            "SELECT count(*) FROM task_runs WHERE state = 'ready' AND NOT external",
            &[],
        )
        .await?
        .get(0))
}

/// Scenario 7: a backlog of `count` ready single-step tasks, bulk-loaded
/// into Postgres over the throughput tenants, then the completion rate over
/// the window while the backlog drains, as a share of `empty_per_s` (the
/// rate of scenario 1, whose backlog was bounded).
async fn backlog(
    cluster: &Cluster,
    options: &Options,
    tenant_prefix: &str,
    tenants: usize,
    empty_per_s: f64,
) -> anyhow::Result<Value> {
    let sql = cluster.sql().await?;
    let loaded = Instant::now();
    sql.batch_execute(&format!(
        "BEGIN;
         INSERT INTO instances (id, tenant_id, definition_id, definition_name, status, input, created_at, updated_at)          SELECT {instance_id}, t.id, d.id, 'perf-noop', 'running', jsonb_build_object('backlog', true), now(), now()          FROM generate_series(1, {count}) AS n          JOIN (SELECT id, row_number() OVER (ORDER BY slug) - 1 AS k FROM tenants WHERE slug LIKE '{tenant_prefix}-%') t            ON t.k = n % {tenants}          JOIN definitions d ON d.tenant_id = t.id AND d.name = 'perf-noop' AND d.version = 1;
         INSERT INTO task_runs (id, tenant_id, instance_id, step_id, kind, handler, attempt, tier, state,            idempotency_key, input, external, config)          SELECT {run_id}, i.tenant_id, i.id, 'only', 'task', 'noop', 1, 'gold', 'ready',            i.id::text || ':only', '{{}}'::jsonb, false,            jsonb_build_object('timeout_ms', NULL, 'url', NULL, 'method', 'POST', 'headers', '{{}}'::jsonb)          FROM instances i WHERE i.status = 'running' AND i.input = jsonb_build_object('backlog', true) ORDER BY i.id;
         COMMIT",
        count = options.backlog_tasks,
        // Written over the last `count` ms, oldest first, as a backlog that
        // built up is; each run's id follows its instance's.
        instance_id = uuid_v7_sql("backlog", &format!("{NOW_MS_SQL} - {} + n", options.backlog_tasks), "n"),
        run_id = uuid_v7_sql(
            "backlog-run",
            "('x' || lpad(substring(i.id::text from 1 for 8) || substring(i.id::text from 10 for 4), 16, '0'))::bit(64)::bigint",
            "i.id",
        ),
    ))
    .await?;
    let load_s = loaded.elapsed().as_secs_f64();
    let settle_s = settle(&sql, &["instances", "task_runs"]).await?;
    tokio::time::sleep(Duration::from_secs(options.warmup_s)).await;
    let ready_at_start = ready_count(&sql).await?;
    let start: DateTime<Utc> = sql.query_one("SELECT now()", &[]).await?.get(0);
    let series = completed_series(cluster, options.measure_s).await;
    let at = start + chrono::Duration::seconds(options.measure_s as i64);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = completed_between(&sql, "perf-noop", start, at).await?;
    let ready_at_end = ready_count(&sql).await?;
    let per_s = total as f64 / options.measure_s as f64;
    Ok(json!({
        "loaded_tasks": options.backlog_tasks,
        "load_s": round1(load_s),
        "settle_s": round1(settle_s),
        "ready_at_start": ready_at_start,
        "ready_at_end": ready_at_end,
        "drain_per_s": round1(per_s),
        "empty_queue_per_s": round1(empty_per_s),
        "share_of_empty_queue_rate": round3(per_s / empty_per_s.max(1.0)),
        "per_second": series,
    }))
}

/// p50/p90/p99/max of sorted latencies.
fn latency_summary(values: &[f64]) -> Value {
    json!({
        "p50": round3(percentile(values, 0.50)),
        "p90": round3(percentile(values, 0.90)),
        "p99": round3(percentile(values, 0.99)),
        "max": round3(values.last().copied().unwrap_or(f64::NAN)),
    })
}

/// A task message of scenario 5 (no tenant, instance or run behind it).
fn substrate_message(step_id: &str, input: Value) -> ward_shared::wire::TaskMessage {
    ward_shared::wire::TaskMessage {
        tenant_id: uuid::Uuid::nil(),
        instance_id: uuid::Uuid::nil(),
        task_run_id: uuid::Uuid::nil(),
        step_id: step_id.into(),
        handler: "noop".into(),
        attempt: 1,
        idempotency_key: step_id.into(),
        input,
        epoch: 0,
        kind: "task".into(),
        timeout_ms: None,
        http: None,
        tier: None,
        ready_at: None,
        trace_parent: None,
    }
}

/// Scenario 5: the broker and the database alone on this machine.
async fn substrate(services: &Services, name: &str, window_s: u64) -> anyhow::Result<Value> {
    // RabbitMQ: publish with confirms (batches of 256, pipelined) while a
    // consumer acks, persistent messages on a quorum queue.
    let settings = ward_broker::Settings {
        url: services.amqp_url.clone(),
        queue_prefix: format!("{name}.raw."),
        delivery_limit: 20,
    };
    let tiers = vec!["raw".to_owned()];
    let publisher = ward_broker::Broker::connect(&settings).await?;
    publisher.declare(&tiers).await?;
    let consumer = ward_broker::Broker::connect(&settings).await?;
    let mut inbox = consumer.consume("raw", 1_000, "raw-consumer").await?;
    let consumed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let counter = consumed.clone();
    let stop_consumer = stop.clone();
    let consume = tokio::spawn(async move {
        while !stop_consumer.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(200), inbox.next()).await {
                Ok(Some(Ok(delivery))) => {
                    if delivery.ack().await.is_ok() {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(_) => break,
                Err(_) => {}
            }
        }
        inbox.close().await;
    });
    let message = substrate_message("raw", json!({}));
    let batch: Vec<(&str, &ward_shared::wire::TaskMessage)> = vec![("raw", &message); 256];
    let started = Instant::now();
    let mut published = 0u64;
    while started.elapsed() < Duration::from_secs(window_s) {
        publisher.publish(&batch).await?;
        published += batch.len() as u64;
    }
    let publish_s = started.elapsed().as_secs_f64();
    let drain_deadline = Instant::now() + Duration::from_secs(60);
    while consumed.load(Ordering::Relaxed) < published && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let round_trip_s = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = consume.await;
    let _ = publisher.delete(&tiers).await;
    publisher.close().await;
    consumer.close().await;

    // Postgres: single-row keyed INSERT commits from 32 connections.
    let (admin, connection) =
        tokio_postgres::connect(&services.database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let table = format!("{}_raw", name.replace('-', "_"));
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (k bigint PRIMARY KEY, v text)"
        ))
        .await?;
    let commits = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(window_s);
    let mut handles = Vec::new();
    for client in 0..32u64 {
        let url = services.database_url.clone();
        let table = table.clone();
        let commits = commits.clone();
        handles.push(tokio::spawn(async move {
            let (sql, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            let insert = sql
                .prepare(&format!("INSERT INTO {table} (k, v) VALUES ($1, 'x')"))
                .await?;
            let mut k = client as i64;
            while Instant::now() < deadline {
                sql.execute(&insert, &[&k]).await?;
                commits.fetch_add(1, Ordering::Relaxed);
                k += 32;
            }
            anyhow::Ok(())
        }));
    }
    for handle in handles {
        handle.await??;
    }
    admin
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await?;
    Ok(json!({
        "rabbitmq_confirmed_publish_per_s": round1(published as f64 / publish_s),
        "rabbitmq_publish_and_consume_per_s": round1(published as f64 / round_trip_s),
        "postgres_single_row_commits_per_s": round1(commits.load(Ordering::Relaxed) as f64 / window_s as f64),
    }))
}

/// Postgres connections of the substrate's latency floor; each takes
/// the ticks' INSERTs pipelined, one implicit transaction per statement.
const FLOOR_CONNECTIONS: usize = 4;
/// Ticks of the latency floor in flight at once (commit, publish, confirm).
const FLOOR_TICKS_IN_FLIGHT_MAX: usize = 64;

/// Scenario 5's latency floor: the least that schedule-to-start can be on
/// this substrate, at `rate_per_s`, with nothing of Ward in the path. As in
/// scenario 3, the sends of each 10 ms tick go out together: one Postgres
/// commit of one row per send (the ready task, `synchronous_commit` on),
/// then one persistent message per row published to a quorum queue with
/// confirms; a consumer takes and acks them. Measured from the moment the
/// commit's statement is sent (as a run's `created_at` is its start
/// transaction's) to the delivery: p50/p90/p99/max, and the commit alone.
async fn substrate_floor(
    services: &Services,
    name: &str,
    rate_per_s: f64,
    window_s: u64,
) -> anyhow::Result<Value> {
    let settings = ward_broker::Settings {
        url: services.amqp_url.clone(),
        queue_prefix: format!("{name}.floor."),
        delivery_limit: 20,
    };
    let tiers = vec!["floor".to_owned()];
    let publisher = Arc::new(ward_broker::Broker::connect(&settings).await?);
    publisher.declare(&tiers).await?;
    let consumer = ward_broker::Broker::connect(&settings).await?;
    let mut inbox = consumer.consume("floor", 1_000, "floor-consumer").await?;
    let count = (rate_per_s * window_s as f64).round() as usize;
    let delivered_ms = Arc::new(std::sync::Mutex::new(Vec::<f64>::with_capacity(count)));
    let stop = Arc::new(AtomicBool::new(false));
    let (into, stop_consumer) = (delivered_ms.clone(), stop.clone());
    let consume = tokio::spawn(async move {
        while !stop_consumer.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(200), inbox.next()).await {
                Ok(Some(Ok(delivery))) => {
                    let at = Utc::now();
                    let origin =
                        serde_json::from_slice::<ward_shared::wire::TaskMessage>(delivery.body())
                            .ok()
                            .and_then(|message| message.input["origin_us"].as_i64())
                            .and_then(DateTime::<Utc>::from_timestamp_micros);
                    if let Some(origin) = origin
                        && let Ok(mut delivered) = into.lock()
                    {
                        delivered
                            .push((at - origin).num_microseconds().unwrap_or(0) as f64 / 1000.0);
                    }
                    let _ = delivery.ack().await;
                }
                Ok(_) => break,
                Err(_) => {}
            }
        }
        inbox.close().await;
    });

    let table = format!("{}_floor", name.replace('-', "_"));
    let mut clients = Vec::with_capacity(FLOOR_CONNECTIONS);
    for _ in 0..FLOOR_CONNECTIONS {
        let (client, connection) =
            tokio_postgres::connect(&services.database_url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        clients.push(Arc::new(client));
    }
    clients[0]
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (k bigint PRIMARY KEY, v text)"
        ))
        .await?;
    let insert = format!("INSERT INTO {table} (k, v) SELECT k, 'x' FROM unnest($1::bigint[]) AS k");
    let interval = 1.0 / rate_per_s.max(0.1);
    let tick = Duration::from_millis(LATENCY_TICK_MS);
    let mut per_tick: Vec<Vec<i64>> = Vec::new();
    for n in 0..count {
        let k = (n as f64 * interval * 1000.0 / LATENCY_TICK_MS as f64) as usize;
        if per_tick.len() <= k {
            per_tick.resize(k + 1, Vec::new());
        }
        per_tick[k].push(n as i64);
    }
    let limit = Arc::new(tokio::sync::Semaphore::new(FLOOR_TICKS_IN_FLIGHT_MAX));
    let started = Instant::now();
    let mut handles = Vec::with_capacity(per_tick.len());
    for (k, keys) in per_tick.into_iter().enumerate() {
        if keys.is_empty() {
            continue;
        }
        let (client, publisher, limit) = (
            clients[k % FLOOR_CONNECTIONS].clone(),
            publisher.clone(),
            limit.clone(),
        );
        let insert = insert.clone();
        let send_at = started + tick * (k as u32 + 1);
        handles.push(tokio::spawn(async move {
            tokio::time::sleep_until(send_at.into()).await;
            let _permit = limit.acquire().await?;
            let origin = Utc::now();
            client.execute(insert.as_str(), &[&keys]).await?;
            let committed_ms =
                (Utc::now() - origin).num_microseconds().unwrap_or(0) as f64 / 1000.0;
            let message =
                substrate_message("floor", json!({ "origin_us": origin.timestamp_micros() }));
            let batch = vec![("floor", &message); keys.len()];
            publisher.publish(&batch).await?;
            anyhow::Ok(committed_ms)
        }));
    }
    let mut commit_ms = Vec::with_capacity(handles.len());
    for handle in handles {
        commit_ms.push(handle.await??);
    }
    let drain_deadline = Instant::now() + Duration::from_secs(60);
    while delivered_ms
        .lock()
        .map(|delivered| delivered.len())
        .unwrap_or(count)
        < count
        && Instant::now() < drain_deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = consume.await;
    let _ = publisher.delete(&tiers).await;
    publisher.close().await;
    consumer.close().await;
    clients[0]
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await?;
    let mut delivered = std::mem::take(
        &mut *delivered_ms
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?,
    );
    delivered.sort_by(f64::total_cmp);
    commit_ms.sort_by(f64::total_cmp);
    Ok(json!({
        "offered_per_s": round1(rate_per_s),
        "sent": count,
        "delivered": delivered.len(),
        "commit_then_deliver_ms": latency_summary(&delivered),
        "commit_ms": latency_summary(&commit_ms),
    }))
}

/// Runs every scenario; writes `perf[-quick].json` and `.md` under `out`.
pub async fn run(services: &Services, run: &str, options: Options) -> anyhow::Result<Value> {
    let bar = indicatif::ProgressBar::new(7);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let shape = Shape {
        masters: 1,
        workers: 2,
        worker_prefetch: 128,
        window_max: 2_048,
        tiers: vec!["gold".into()],
        pool_size_max: 16,
    };
    let name = format!("{run}-perf");
    let cluster = match &options.attach {
        Some(attach) => {
            bar.set_message("attaching to the cluster");
            Cluster::attach(services, &name, attach.clone()).await?
        }
        None => {
            bar.set_message("starting the cluster");
            Cluster::start(services, &name, &shape).await?
        }
    };
    let result = async {
        let (keys, _) = cluster.apply_tenants(&format!("{name}-t"), 8, "gold", 100_000).await?;
        for yaml in [NOOP.to_owned(), CHAIN.to_owned(), fan_out()] {
            cluster.publish_all(&keys, &yaml, 8).await?;
        }
        let rss_before = cluster.rss_bytes();

        let mut throughput = Value::Null;
        if let Some(max_per_s) = options.max_per_s {
            throughput = json!({ "instances_per_s": max_per_s, "given": true });
        } else if ["throughput", "latency", "queries", "substrate", "backlog"]
            .iter()
            .any(|scenario| options.wants(scenario))
        {
            bar.set_message("1. throughput (single-step no-op)");
            throughput = sustained(&cluster, &keys, "perf-noop", &options).await?;
        }
        bar.inc(1);
        let rss_after = cluster.rss_bytes();
        let (mut chain, mut fan) = (Value::Null, Value::Null);
        if options.wants("steps") {
            bar.set_message("2. workflow steps (chain, fan-out)");
            chain = sustained(&cluster, &keys, "perf-chain", &options).await?;
            fan = sustained(&cluster, &keys, "perf-fan", &options).await?;
        }
        bar.inc(1);

        let max_per_s = throughput["instances_per_s"].as_f64().unwrap_or(1.0).max(1.0);
        let mut latency = Vec::new();
        if options.wants("latency") {
            bar.set_message("3. latency at fixed offered loads");
            for share in options.latency_shares.clone() {
                let mut figures = latency_at(&cluster, &keys, max_per_s * share, options.measure_s).await?;
                figures["load_share"] = json!(share);
                latency.push(figures);
            }
        }
        bar.inc(1);

        let mut query = Value::Null;
        if options.wants("queries") {
        bar.set_message("4. queries under concurrency");
        let (query_keys, _) = cluster
            .apply_tenants(&format!("{name}-q"), options.query_tenants, "gold", 64)
            .await?;
        cluster.publish_all(&query_keys, STORED, 16).await?;
        let stored = store_instances(&cluster, &options, &query_keys, &format!("{name}-q")).await?;
        let load = latency_at(&cluster, &keys, max_per_s * 0.5, options.measure_s);
        let asked = queries(&cluster, &options, &query_keys, &stored);
        let (load, answered) = tokio::join!(load, asked);
        query = answered?;
        query["concurrent_load"] = load?;
        }
        bar.inc(1);

        let mut raw = Value::Null;
        if options.wants("substrate") {
            bar.set_message("5. raw substrate");
            raw = substrate(services, &name, options.measure_s).await?;
            if !throughput.is_null() {
                let mut floors = Vec::new();
                for share in options.latency_shares.clone() {
                    let mut floor = substrate_floor(services, &name, max_per_s * share, options.measure_s).await?;
                    floor["load_share"] = json!(share);
                    floors.push(floor);
                }
                raw["latency_floor"] = json!(floors);
            }
        }
        bar.inc(1);

        // Last: the backlog is still draining when the cluster stops.
        let mut drained = Value::Null;
        if options.wants("backlog") {
            bar.set_message("7. a backlog of ready tasks draining");
            drained = backlog(&cluster, &options, &format!("{name}-t"), keys.len(), max_per_s).await?;
        }
        bar.inc(1);

        let tasks_1k = throughput["completed_in_window"].as_f64().unwrap_or(0.0) / 1000.0;
        let per_1k = |key: &str| round3(throughput[key].as_f64().unwrap_or(0.0) / tasks_1k.max(0.001));
        let resources = json!({
            "rss_mb_before": rss_before.iter().map(|(role, bytes)| json!({ "role": role, "mb": round1(*bytes as f64 / 1_048_576.0) })).collect::<Vec<_>>(),
            "rss_mb_after_throughput": rss_after.iter().map(|(role, bytes)| json!({ "role": role, "mb": round1(*bytes as f64 / 1_048_576.0) })).collect::<Vec<_>>(),
            "cpu_s_per_1000_tasks_master": per_1k("cpu_s_master"),
            "cpu_s_per_1000_tasks_worker": per_1k("cpu_s_worker"),
        });
        bar.inc(1);
        let ward_per_s = throughput["instances_per_s"].as_f64().unwrap_or(0.0);
        let broker_per_s = raw["rabbitmq_publish_and_consume_per_s"].as_f64();
        anyhow::Ok(json!({
            "throughput": throughput,
            "workflow_steps": {
                "chain": { "instances_per_s": chain["instances_per_s"], "steps_per_s": round1(chain["instances_per_s"].as_f64().unwrap_or(0.0) * 3.0), "per_second": chain["per_second"] },
                "fan_out": { "instances_per_s": fan["instances_per_s"], "steps_per_s": round1(fan["instances_per_s"].as_f64().unwrap_or(0.0) * 12.0), "per_second": fan["per_second"] },
            },
            "latency": latency,
            "queries": query,
            "substrate": raw,
            "ward_share_of_broker": broker_per_s.map(|broker_per_s| round3(ward_per_s / broker_per_s.max(1.0))),
            "backlog": drained,
            "resources": resources,
        }))
    }
    .await;
    bar.finish_and_clear();
    cluster.stop(&shape.tiers).await;
    let figures = result?;
    let report = json!({
        "benchmark": "perf", "quick": options.quick, "seed": options.seed, "at": Utc::now(),
        "version": env!("CARGO_PKG_VERSION"),
        "machine": machine(services).await,
        "settings": { "attached_to": options.attach.as_ref().map(|attach| attach.url.clone()),
            "masters": options.attach.as_ref().map_or(json!(shape.masters), |_| Value::Null),
            "workers": options.attach.as_ref().map_or(json!(shape.workers), |_| Value::Null),
            "worker_prefetch": options.attach.as_ref().map_or(json!(shape.worker_prefetch), |_| Value::Null),
            "window_max": options.attach.as_ref().map_or(json!(shape.window_max), |_| Value::Null), "measure_s": options.measure_s, "warmup_s": options.warmup_s,
            "synchronous_commit": "on", "closed_loop_clients": SUBMIT_CLIENTS,
            "submit_batch_len": SUBMIT_BATCH_LEN, "query_clients": options.query_clients,
            "query_rate_per_client_per_s": QUERY_RATE_PER_CLIENT_PER_S, "scenarios": options.only },
        "figures": figures,
    });
    let text = markdown(&report);
    print!("{text}");
    std::fs::create_dir_all(&options.out)?;
    let stem = match (options.quick, options.only.is_empty()) {
        (true, true) => "perf-quick",
        (false, true) => "perf",
        (true, false) => "perf-quick-only",
        (false, false) => "perf-only",
    };
    std::fs::write(
        options.out.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(options.out.join(format!("{stem}.md")), &text)?;
    println!(
        "results: {}",
        options.out.join(format!("{stem}.json")).display()
    );
    Ok(report)
}

/// Postgres settings that move the figures: printed with them.
const POSTGRES_SETTINGS: [&str; 5] = [
    "autovacuum",
    "max_wal_size",
    "shared_buffers",
    "synchronous_commit",
    "wal_compression",
];

/// The machine and the versions of what runs on it.
async fn machine(services: &Services) -> Value {
    let (postgres, settings) =
        match tokio_postgres::connect(&services.database_url, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                let version = client
                    .query_one("SHOW server_version", &[])
                    .await
                    .map(|row| row.get::<_, String>(0))
                    .unwrap_or_default();
                let settings: serde_json::Map<String, Value> = client
                    .query(
                        "SELECT name, current_setting(name) FROM unnest($1::text[]) AS name",
                        &[&POSTGRES_SETTINGS.as_slice()],
                    )
                    .await
                    .map(|rows| {
                        rows.iter()
                            .map(|row| (row.get::<_, String>(0), json!(row.get::<_, String>(1))))
                            .collect()
                    })
                    .unwrap_or_default();
                (version, settings)
            }
            Err(_) => (String::new(), serde_json::Map::new()),
        };
    let rabbitmq = std::process::Command::new("rabbitmqctl")
        .arg("version")
        .output()
        .ok()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_owned())
        })
        .unwrap_or_default();
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "postgres": postgres,
        "postgres_settings": settings,
        "rabbitmq": rabbitmq,
    })
}

fn markdown(report: &Value) -> String {
    let f = &report["figures"];
    let mut text = format!(
        "\n## ward-bench perf ({}), {} cores, Postgres {} ({}), RabbitMQ {}\n\n| scenario | figure |\n| --- | --- |\n",
        if report["quick"] == true {
            "quick"
        } else {
            "full"
        },
        report["machine"]["cores"],
        report["machine"]["postgres"].as_str().unwrap_or("?"),
        report["machine"]["postgres_settings"]
            .as_object()
            .map(|settings| {
                settings
                    .iter()
                    .map(|(name, value)| format!("{name} {}", value.as_str().unwrap_or("?")))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default(),
        report["machine"]["rabbitmq"].as_str().unwrap_or("?"),
    );
    let mut row = |name: &str, value: String| text.push_str(&format!("| {name} | {value} |\n"));
    row(
        "1. throughput, single-step no-op tasks/s",
        f["throughput"]["instances_per_s"].to_string(),
    );
    row(
        "1. machine CPU busy / Postgres commits per task",
        format!(
            "{} / {}",
            f["throughput"]["machine_cpu_busy_share"], f["throughput"]["postgres_commits_per_task"]
        ),
    );
    row(
        "2. 3-step chain: instances/s (steps/s)",
        format!(
            "{} ({})",
            f["workflow_steps"]["chain"]["instances_per_s"],
            f["workflow_steps"]["chain"]["steps_per_s"]
        ),
    );
    row(
        "2. fan-out 1-10-1: instances/s (steps/s)",
        format!(
            "{} ({})",
            f["workflow_steps"]["fan_out"]["instances_per_s"],
            f["workflow_steps"]["fan_out"]["steps_per_s"]
        ),
    );
    for latency in f["latency"].as_array().into_iter().flatten() {
        row(
            &format!(
                "3. at {} % ({} /s): schedule-to-start p50/p90/p99/max ms",
                (latency["load_share"].as_f64().unwrap_or(0.0) * 100.0).round(),
                latency["offered_per_s"]
            ),
            format!(
                "{} / {} / {} / {}",
                latency["schedule_to_start_ms"]["p50"],
                latency["schedule_to_start_ms"]["p90"],
                latency["schedule_to_start_ms"]["p99"],
                latency["schedule_to_start_ms"]["max"]
            ),
        );
        row(
            &format!(
                "3. at {} %: end-to-end p50/p90/p99/max ms",
                (latency["load_share"].as_f64().unwrap_or(0.0) * 100.0).round()
            ),
            format!(
                "{} / {} / {} / {}",
                latency["end_to_end_ms"]["p50"],
                latency["end_to_end_ms"]["p90"],
                latency["end_to_end_ms"]["p99"],
                latency["end_to_end_ms"]["max"]
            ),
        );
        row(
            &format!(
                "3. at {} %: created-to-dispatched / dispatched-to-started p50, p99 ms",
                (latency["load_share"].as_f64().unwrap_or(0.0) * 100.0).round()
            ),
            format!(
                "{}, {} / {}, {}",
                latency["created_to_dispatched_ms"]["p50"],
                latency["created_to_dispatched_ms"]["p99"],
                latency["dispatched_to_started_ms"]["p50"],
                latency["dispatched_to_started_ms"]["p99"]
            ),
        );
        row(
            &format!(
                "3. at {} %: mean batch-start transaction / dispatch round / publisher confirm ms",
                (latency["load_share"].as_f64().unwrap_or(0.0) * 100.0).round()
            ),
            format!(
                "{} / {} / {}",
                latency["stage_mean_ms"]["batch_start_tx"],
                latency["stage_mean_ms"]["dispatch_round"],
                latency["stage_mean_ms"]["publish_confirm"]
            ),
        );
        row(
            &format!(
                "3. at {} %: machine CPU busy / Postgres commits per task",
                (latency["load_share"].as_f64().unwrap_or(0.0) * 100.0).round()
            ),
            format!(
                "{} / {}",
                latency["machine_cpu_busy_share"], latency["postgres_commits_per_task"]
            ),
        );
    }
    row(
        "4. queries over stored instances: status p50/p99 ms",
        format!(
            "{} / {} (as the master timed them: {} / {}; {} instances, {} tenants, {} clients)",
            f["queries"]["status"]["p50_ms"],
            f["queries"]["status"]["p99_ms"],
            f["queries"]["status"]["server_side"]["p50_ms"],
            f["queries"]["status"]["server_side"]["p99_ms"],
            f["queries"]["stored_instances"],
            f["queries"]["tenants"],
            f["queries"]["clients"]
        ),
    );
    row(
        "4. filtered list p50/p99 ms",
        format!(
            "{} / {} (as the master timed them: {} / {})",
            f["queries"]["filtered_list"]["p50_ms"],
            f["queries"]["filtered_list"]["p99_ms"],
            f["queries"]["filtered_list"]["server_side"]["p50_ms"],
            f["queries"]["filtered_list"]["server_side"]["p99_ms"]
        ),
    );
    row(
        "5. RabbitMQ confirmed publish + consume-ack msgs/s",
        f["substrate"]["rabbitmq_publish_and_consume_per_s"].to_string(),
    );
    row(
        "5. Postgres single-row commits/s (32 connections)",
        f["substrate"]["postgres_single_row_commits_per_s"].to_string(),
    );
    for floor in f["substrate"]["latency_floor"]
        .as_array()
        .into_iter()
        .flatten()
    {
        row(
            &format!(
                "5. floor at {} % ({} /s): Postgres commit then quorum-queue delivery p50/p90/p99/max ms (commit alone p50/p99)",
                (floor["load_share"].as_f64().unwrap_or(0.0) * 100.0).round(),
                floor["offered_per_s"]
            ),
            format!(
                "{} / {} / {} / {} ({} / {})",
                floor["commit_then_deliver_ms"]["p50"],
                floor["commit_then_deliver_ms"]["p90"],
                floor["commit_then_deliver_ms"]["p99"],
                floor["commit_then_deliver_ms"]["max"],
                floor["commit_ms"]["p50"],
                floor["commit_ms"]["p99"]
            ),
        );
    }
    row(
        "Ward throughput as a share of the broker alone",
        f["ward_share_of_broker"].to_string(),
    );
    row(
        "6. CPU s per 1,000 tasks: master / workers",
        format!(
            "{} / {}",
            f["resources"]["cpu_s_per_1000_tasks_master"],
            f["resources"]["cpu_s_per_1000_tasks_worker"]
        ),
    );
    row(
        "6. resident memory after scenario 1 (MB)",
        f["resources"]["rss_mb_after_throughput"].to_string(),
    );
    row(
        "7. backlog of ready tasks: drain tasks/s (share of the empty-queue rate)",
        format!(
            "{} ({}; {} ready at the window's start, {} at its end)",
            f["backlog"]["drain_per_s"],
            f["backlog"]["share_of_empty_queue_rate"],
            f["backlog"]["ready_at_start"],
            f["backlog"]["ready_at_end"]
        ),
    );
    text
}

fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quantile_is_interpolated_within_the_bucket_of_the_window_only() {
        // Before the window: 10 observations under 1 ms, none since above.
        let before = [
            (0.001, 10.0),
            (0.005, 10.0),
            (0.01, 10.0),
            (f64::INFINITY, 10.0),
        ];
        // In the window: 50 under 1 ms, 40 in (1, 5] ms, 10 in (5, 10] ms.
        let after = [
            (0.001, 60.0),
            (0.005, 100.0),
            (0.01, 110.0),
            (f64::INFINITY, 110.0),
        ];
        let p50 = bucket_quantile_ms(&before, &after, 0.5).unwrap();
        assert!((p50 - 1.0).abs() < 1e-9, "{p50}");
        let p90 = bucket_quantile_ms(&before, &after, 0.9).unwrap();
        assert!((p90 - 5.0).abs() < 1e-9, "{p90}");
        let p99 = bucket_quantile_ms(&before, &after, 0.99).unwrap();
        assert!((p99 - 9.5).abs() < 1e-9, "{p99}");
        // Beyond the last finite bound: that bound, as Prometheus answers.
        let slow = [
            (0.001, 10.0),
            (0.005, 10.0),
            (0.01, 10.0),
            (f64::INFINITY, 20.0),
        ];
        assert_eq!(bucket_quantile_ms(&before, &slow, 0.99), Some(10.0));
        assert_eq!(
            bucket_quantile_ms(&before, &before, 0.5),
            None,
            "nothing observed"
        );
        assert_eq!(bucket_quantile_ms(&[], &[], 0.5), None);
    }

    #[test]
    fn only_processes_read_before_and_after_count_and_their_buckets_add_up() {
        let reading = |pairs: &[(&str, Buckets)]| -> HashMap<String, Buckets> {
            pairs
                .iter()
                .map(|(url, b)| ((*url).to_owned(), b.clone()))
                .collect()
        };
        let before = reading(&[
            ("m0", vec![(0.001, 1.0), (f64::INFINITY, 2.0)]),
            ("m1", vec![(0.001, 5.0), (f64::INFINITY, 5.0)]),
        ]);
        // m1 did not answer after; m2 only answered after (all its history).
        let after = reading(&[
            ("m0", vec![(0.001, 4.0), (f64::INFINITY, 6.0)]),
            ("m2", vec![(0.001, 100.0), (f64::INFINITY, 100.0)]),
        ]);
        let (b, a) = summed_over_both(&before, &after);
        assert_eq!(b, vec![(0.001, 1.0), (f64::INFINITY, 2.0)]);
        assert_eq!(a, vec![(0.001, 4.0), (f64::INFINITY, 6.0)]);
        // Of m0's 4 in the window, 3 under 1 ms: the median is within it.
        assert!(bucket_quantile_ms(&b, &a, 0.5).unwrap() <= 1.0);
    }
}
