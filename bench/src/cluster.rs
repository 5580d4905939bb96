//! A benchmark cluster: `ward-master` and `ward-worker` processes (release
//! binaries) against the real services, isolated by a schema, a queue
//! prefix and an etcd prefix; their memory and CPU read from /proc.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// Where the services are.
#[derive(Debug, Clone)]
pub struct Services {
    pub database_url: String,
    pub amqp_url: String,
    pub etcd_endpoints: String,
    pub bin_dir: PathBuf,
}

/// Settings of one cluster.
#[derive(Debug, Clone)]
pub struct Shape {
    pub masters: usize,
    pub workers: usize,
    pub worker_prefetch: u16,
    pub window_max: i64,
    /// Tiers the workers consume (and the masters declare).
    pub tiers: Vec<String>,
    pub pool_size_max: usize,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            masters: 1,
            workers: 1,
            worker_prefetch: 32,
            window_max: 512,
            tiers: vec!["gold".into(), "silver".into(), "bronze".into()],
            pool_size_max: 8,
        }
    }
}

pub const ADMIN_TOKEN: &str = "bench-admin-token";

/// A Ward cluster already running, to attach to instead of starting one
/// (`ward-bench perf --cluster-url`).
#[derive(Debug, Clone)]
pub struct Attach {
    /// Base URL of its API (a master, or a load balancer before them).
    pub url: String,
    pub admin_token: String,
    /// Its database schema (`database.schema`), in `Services::database_url`.
    pub schema: String,
    /// Base URLs of its masters' and workers' `/metrics`.
    pub process_urls: Vec<String>,
}

/// A running cluster.
pub struct Cluster {
    pub name: String,
    pub url: String,
    pub http: reqwest::Client,
    services: Services,
    children: Vec<(String, Child)>,
    /// Base URL of every process (masters and workers).
    process_urls: Vec<String>,
    admin_token: String,
    /// Set when attached to a running cluster: nothing is started, and
    /// nothing is removed at the end.
    attached: Option<Attach>,
}

impl Cluster {
    /// Starts the processes and waits until every one is ready.
    pub async fn start(services: &Services, name: &str, shape: &Shape) -> anyhow::Result<Cluster> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build()?;
        let mut cluster = Cluster {
            name: name.to_owned(),
            url: String::new(),
            http,
            services: services.clone(),
            children: Vec::new(),
            process_urls: Vec::new(),
            admin_token: ADMIN_TOKEN.to_owned(),
            attached: None,
        };
        let mut ready_urls = Vec::new();
        for index in 0..shape.masters {
            let port = free_port()?;
            let url = cluster.spawn("ward-master", &format!("master-{index}"), port, shape)?;
            if index == 0 {
                cluster.url = url.clone();
                // The first master migrates the schema before the others start.
                cluster.wait_started(&url, Duration::from_secs(60)).await?;
            }
            ready_urls.push(url);
        }
        for index in 0..shape.workers {
            let port = free_port()?;
            ready_urls.push(cluster.spawn(
                "ward-worker",
                &format!("worker-{index}"),
                port,
                shape,
            )?);
        }
        cluster.process_urls = ready_urls.clone();
        for url in &ready_urls {
            cluster.wait_started(url, Duration::from_secs(60)).await?;
        }
        Ok(cluster)
    }

    /// Attaches to a running cluster: checks that every process answers
    /// ready and that the schema is reachable; starts nothing.
    pub async fn attach(
        services: &Services,
        name: &str,
        attach: Attach,
    ) -> anyhow::Result<Cluster> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build()?;
        let mut process_urls = attach.process_urls.clone();
        if process_urls.is_empty() {
            process_urls.push(attach.url.clone());
        }
        let mut cluster = Cluster {
            name: name.to_owned(),
            url: attach.url.trim_end_matches('/').to_owned(),
            http,
            services: services.clone(),
            children: Vec::new(),
            process_urls: process_urls
                .iter()
                .map(|url| url.trim_end_matches('/').to_owned())
                .collect(),
            admin_token: attach.admin_token.clone(),
            attached: Some(attach),
        };
        let urls = cluster.process_urls.clone();
        for url in urls.iter().chain(std::iter::once(&cluster.url.clone())) {
            cluster
                .wait_started(url, Duration::from_secs(10))
                .await
                .with_context(|| format!("attach to {url}"))?;
        }
        cluster
            .sql()
            .await?
            .query_one("SELECT count(*) FROM instances", &[])
            .await
            .with_context(|| format!("read instances in schema {}", cluster.schema()))?;
        Ok(cluster)
    }

    /// Waits until the process at `url` answers ready. Fails at once, with
    /// the head of its log, when one of the cluster's processes exited
    /// meanwhile (a missing database, a broker refusing the login), rather
    /// than after the whole timeout.
    async fn wait_started(&mut self, url: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(response) = self.http.get(format!("{url}/readyz")).send().await {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            for (role, child) in &mut self.children {
                if let Ok(Some(status)) = child.try_wait() {
                    let log_path =
                        std::env::temp_dir().join(format!("ward-bench-{}-{role}.log", self.name));
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    let head: Vec<&str> = log
                        .lines()
                        .take_while(|line| !line.starts_with("Stack backtrace"))
                        .filter(|line| !line.trim().is_empty())
                        .take(LOG_HEAD_LINES)
                        .collect();
                    anyhow::bail!(
                        "{role} exited ({status}) before it was ready; {}:\n{}",
                        log_path.display(),
                        head.join("\n")
                    );
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{url}/readyz not ready after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The sum of every series of the counter or gauge `name` over every
    /// process's `/metrics` (a process that does not answer counts 0).
    pub async fn metric_sum(&self, name: &str) -> f64 {
        let mut sum = 0.0;
        for (_, text) in self.metrics_texts().await {
            for line in text.lines() {
                let Some(rest) = line.strip_prefix(name) else {
                    continue;
                };
                if !(rest.starts_with(' ') || rest.starts_with('{')) {
                    continue;
                }
                if let Some(value) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                    sum += value;
                }
            }
        }
        sum
    }

    /// The cumulative buckets of a histogram series, by process (its URL;
    /// a process that does not answer is left out): `series` is the bucket
    /// series up to its `le` label, such as
    /// `ward_http_request_seconds_bucket{class="2xx",method="GET",route="/v1/instances/{id}"`.
    /// Each is (upper bound in seconds, count), by bound (+Inf last).
    pub async fn buckets(&self, series: &str) -> HashMap<String, Vec<(f64, f64)>> {
        let prefix = format!("{series},le=\"");
        let mut by_process = HashMap::new();
        for (url, text) in self.metrics_texts().await {
            let mut buckets: Vec<(f64, f64)> = Vec::new();
            for line in text.lines() {
                let Some((bound, count)) = line
                    .strip_prefix(&prefix)
                    .and_then(|rest| rest.split_once("\"} "))
                else {
                    continue;
                };
                let (Ok(bound), Ok(count)) = (bound.parse::<f64>(), count.parse::<f64>()) else {
                    continue;
                };
                buckets.push((bound, count));
            }
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            by_process.insert(url, buckets);
        }
        by_process
    }

    /// Every process's URL and `/metrics` text (a process that does not
    /// answer is left out).
    async fn metrics_texts(&self) -> Vec<(String, String)> {
        let mut texts = Vec::with_capacity(self.process_urls.len());
        for url in &self.process_urls {
            let Ok(response) = self.http.get(format!("{url}/metrics")).send().await else {
                continue;
            };
            if let Ok(text) = response.text().await {
                texts.push((url.clone(), text));
            }
        }
        texts
    }

    fn schema(&self) -> String {
        match &self.attached {
            Some(attach) => attach.schema.clone(),
            None => format!("bench_{}", self.name.replace('-', "_")),
        }
    }

    /// The processes whose memory and CPU are read from /proc, by role:
    /// the children, or when attached, this machine's `ward-master` and
    /// `ward-worker` processes (none if the cluster runs elsewhere).
    fn pids(&self) -> Vec<(String, u32)> {
        if self.attached.is_none() {
            return self
                .children
                .iter()
                .filter_map(|(role, child)| child.id().map(|pid| (role.clone(), pid)))
                .collect();
        }
        let mut pids = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return pids;
        };
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let role = match comm.trim() {
                "ward-master" => "master",
                "ward-worker" => "worker",
                _ => continue,
            };
            pids.push((format!("{role}-{pid}"), pid));
        }
        pids.sort();
        pids
    }

    fn spawn(
        &mut self,
        binary: &str,
        role: &str,
        port: u16,
        shape: &Shape,
    ) -> anyhow::Result<String> {
        let log_path = std::env::temp_dir().join(format!("ward-bench-{}-{role}.log", self.name));
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(self.services.bin_dir.join(binary))
            .env("WARD_NODE_ID", format!("{}-{role}", self.name))
            .env("WARD_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("WARD_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("WARD_TIERS", shape.tiers.join(","))
            .env("WARD_DATABASE__URL", &self.services.database_url)
            .env("WARD_DATABASE__SCHEMA", self.schema())
            .env(
                "WARD_DATABASE__POOL_SIZE_MAX",
                shape.pool_size_max.to_string(),
            )
            .env("WARD_AMQP__URL", &self.services.amqp_url)
            .env("WARD_AMQP__QUEUE_PREFIX", format!("{}.", self.name))
            .env("WARD_ETCD__ENDPOINTS", &self.services.etcd_endpoints)
            .env("WARD_ETCD__PREFIX", format!("/ward-bench/{}", self.name))
            .env("WARD_ETCD__LEASE_TTL_S", "3")
            .env("WARD_DISPATCH__WINDOW_MAX", shape.window_max.to_string())
            .env("WARD_DISPATCH__POLL_MS", "100")
            .env("WARD_PREFETCH", shape.worker_prefetch.to_string())
            .env(
                "WARD_LOG",
                std::env::var("WARD_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!("spawn {binary} (build with `cargo build --release --workspace --bins`)")
            })?;
        self.children.push((role.to_owned(), child));
        Ok(format!("http://127.0.0.1:{port}"))
    }

    /// Resident memory (VmRSS) of every process, in bytes, by role.
    pub fn rss_bytes(&self) -> Vec<(String, u64)> {
        self.pids()
            .into_iter()
            .map(|(role, pid)| (role, proc_status_kb(pid, "VmRSS:") * 1024))
            .collect()
    }

    /// CPU seconds (user + system) used so far by every process.
    pub fn cpu_seconds(&self) -> f64 {
        self.pids()
            .into_iter()
            .map(|(_, pid)| proc_cpu_seconds(pid))
            .sum()
    }

    /// CPU seconds used so far by the processes whose role starts with `prefix`
    /// (`master` or `worker`).
    pub fn cpu_seconds_of(&self, prefix: &str) -> f64 {
        self.pids()
            .into_iter()
            .filter(|(role, _)| role.starts_with(prefix))
            .map(|(_, pid)| proc_cpu_seconds(pid))
            .sum()
    }

    /// A connection to this cluster's schema, as the database owner.
    pub async fn sql(&self) -> anyhow::Result<tokio_postgres::Client> {
        let mut config: tokio_postgres::Config = self.services.database_url.parse()?;
        config.options(format!("-c search_path={}", self.schema()));
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// POSTs with the admin token or a tenant key; fails on a non-2xx answer.
    pub async fn post(&self, key: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(key)
            .json(body)
            .send()
            .await?;
        let status = response.status();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("POST {path}: {status} {answer}");
        }
        Ok(answer)
    }

    /// Applies `count` tenants (slug `<prefix>-<n>`) of a tier in batches;
    /// returns their API keys in order and the seconds it took.
    pub async fn apply_tenants(
        &self,
        prefix: &str,
        count: usize,
        tier: &str,
        inflight_max: i32,
    ) -> anyhow::Result<(Vec<String>, f64)> {
        let started = Instant::now();
        let mut keys = Vec::with_capacity(count);
        let slugs: Vec<String> = (0..count).map(|n| format!("{prefix}-{n}")).collect();
        for batch in slugs.chunks(1_000) {
            let tenants: Vec<Value> = batch
                .iter()
                .map(|slug| json!({ "slug": slug, "tier": tier, "quotas": { "inflight_max": inflight_max, "dispatch_rate_per_s": 100000 } }))
                .collect();
            let report = self
                .post(
                    &self.admin_token,
                    "/v1/admin/apply",
                    &json!({ "tenants": tenants }),
                )
                .await?;
            let by_slug: std::collections::HashMap<&str, &str> = report["keys"]
                .as_array()
                .context("keys")?
                .iter()
                .filter_map(|pair| Some((pair[0].as_str()?, pair[1].as_str()?)))
                .collect();
            for slug in batch {
                keys.push(
                    by_slug
                        .get(slug.as_str())
                        .context("a created tenant's key")?
                        .to_string(),
                );
            }
        }
        Ok((keys, started.elapsed().as_secs_f64()))
    }

    /// Publishes `yaml` for every key, `concurrency` at a time.
    pub async fn publish_all(
        &self,
        keys: &[String],
        yaml: &str,
        concurrency: usize,
    ) -> anyhow::Result<()> {
        use futures::StreamExt;
        let results: Vec<anyhow::Result<()>> = futures::stream::iter(keys)
            .map(|key| async move {
                let response = self
                    .http
                    .post(format!("{}/v1/definitions", self.url))
                    .bearer_auth(key)
                    .header("content-type", "application/yaml")
                    .body(yaml.to_owned())
                    .send()
                    .await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "publish: {}",
                    response.status()
                );
                Ok(())
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Waits until `expected` instances have ended; returns when they did.
    pub async fn wait_ended(&self, expected: i64, timeout: Duration) -> anyhow::Result<()> {
        let sql = self.sql().await?;
        let deadline = Instant::now() + timeout;
        loop {
            let ended: i64 = sql
                .query_one(
                    "SELECT count(*) FROM instances WHERE status <> 'running'",
                    &[],
                )
                .await?
                .get(0);
            if ended >= expected {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{}: {ended} of {expected} instances ended after {timeout:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until no instance of `definition` is running (other
    /// instances of an attached cluster are not waited for).
    pub async fn wait_definition_ended(
        &self,
        definition: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        self.wait_none_running(Some(definition), None, timeout)
            .await
    }

    /// Waits until none of `ids` is running.
    pub async fn wait_ids_ended(
        &self,
        ids: &[uuid::Uuid],
        timeout: Duration,
    ) -> anyhow::Result<()> {
        self.wait_none_running(None, Some(ids), timeout).await
    }

    /// Waits until no running instance matches both filters (a filter
    /// left out matches every instance).
    async fn wait_none_running(
        &self,
        definition: Option<&str>,
        ids: Option<&[uuid::Uuid]>,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let sql = self.sql().await?;
        let deadline = Instant::now() + timeout;
        loop {
            let running: i64 = sql
                .query_one(
                    "SELECT count(*) FROM instances WHERE status = 'running' \
                     AND ($1::text IS NULL OR definition_name = $1) \
                     AND ($2::uuid[] IS NULL OR id = ANY($2))",
                    &[&definition, &ids],
                )
                .await?
                .get(0);
            if running == 0 {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{}: {running} instances still running after {timeout:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the processes and removes the schema, queues and nothing else.
    /// An attached cluster is left as it is (with the benchmark's tenants
    /// and instances).
    pub async fn stop(mut self, tiers: &[String]) {
        if self.attached.is_some() {
            return;
        }
        for (_, child) in &mut self.children {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
        for (_, child) in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(15), child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
            }
        }
        if let Ok((client, connection)) =
            tokio_postgres::connect(&self.services.database_url, tokio_postgres::NoTls).await
        {
            tokio::spawn(connection);
            if std::env::var_os("WARD_BENCH_KEEP_SCHEMA").is_none() {
                let _ = client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema()))
                    .await;
            }
        }
        let settings = ward_broker::Settings {
            url: self.services.amqp_url.clone(),
            queue_prefix: format!("{}.", self.name),
            delivery_limit: 20,
        };
        if let Ok(broker) = ward_broker::Broker::connect(&settings).await {
            // The masters declare every tier in the database, not only the consumed ones.
            let mut all: Vec<String> = ["gold", "silver", "bronze"]
                .iter()
                .map(|tier| (*tier).to_owned())
                .collect();
            all.extend(tiers.iter().cloned());
            all.sort();
            all.dedup();
            let _ = broker.delete(&all).await;
            broker.close().await;
        }
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Lines of an exited process's log shown when it never became ready.
const LOG_HEAD_LINES: usize = 12;

/// Waits until `url` answers with a success status, up to `timeout`.
pub async fn wait_ready(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(response) = http.get(url).send().await {
            if response.status().is_success() {
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{url} not ready after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with(field))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kb| kb.parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime of a process, in seconds (clock ticks of 100 Hz).
fn proc_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command (which may hold spaces) start after the last ')'.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of /proc/pid/stat; here 11 and 12.
    (ticks(11) + ticks(12)) / 100.0
}

impl Drop for PrivatePostgres {
    /// Stops the server if the run ended early (an error, a panic).
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Postgres cluster of the benchmark's own (own folder and port), for
/// scenarios that need more connections than the machine's server allows.
pub struct PrivatePostgres {
    dir: PathBuf,
    bin: PathBuf,
    options: String,
    pub url: String,
}

impl PrivatePostgres {
    /// initdb (as the `postgres` user) and start on `port` with `max_connections`.
    pub async fn start(port: u16, max_connections: u32) -> anyhow::Result<PrivatePostgres> {
        let versions = std::fs::read_dir("/usr/lib/postgresql")
            .context("no Postgres server binaries in /usr/lib/postgresql")?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .collect::<Vec<_>>();
        let bin = versions
            .into_iter()
            .max()
            .context("no Postgres version")?
            .join("bin");
        let dir = std::env::temp_dir().join(format!("ward-bench-pg-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let run_as_postgres = |args: &[&str]| {
            std::process::Command::new("runuser")
                .arg("-u")
                .arg("postgres")
                .arg("--")
                .args(args)
                .stdout(Stdio::null())
                .status()
        };
        let status = std::process::Command::new("chown")
            .args(["postgres:postgres", dir.to_str().unwrap_or_default()])
            .status()?;
        anyhow::ensure!(status.success(), "chown {}", dir.display());
        let data = dir.join("data");
        let initdb = bin.join("initdb");
        let status = run_as_postgres(&[
            initdb.to_str().unwrap_or_default(),
            "-D",
            data.to_str().unwrap_or_default(),
            "-A",
            "trust",
            "-U",
            "postgres",
        ])?;
        anyhow::ensure!(status.success(), "initdb failed");
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c max_connections={max_connections} -c shared_buffers=256MB -c fsync=on -c track_commit_timestamp=on",
            dir.display()
        );
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let postgres = PrivatePostgres {
            dir,
            bin,
            options,
            url,
        };
        postgres.resume()?;
        Ok(postgres)
    }

    /// Starts the server on its existing data folder (after `halt`).
    pub fn resume(&self) -> anyhow::Result<()> {
        let pg_ctl = self.bin.join("pg_ctl");
        let data = self.dir.join("data");
        let log = self.dir.join("log");
        let status = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(&pg_ctl)
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(&self.options)
            .args(["-w", "start"])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(
            status.success(),
            "pg_ctl start failed; see {}",
            log.display()
        );
        Ok(())
    }

    /// Stops the server at once, like a crash (`-m immediate`: no
    /// checkpoint; the next start replays the WAL). Keeps the data.
    pub fn halt(&self) -> anyhow::Result<()> {
        let pg_ctl = self.bin.join("pg_ctl");
        let data = self.dir.join("data");
        let status = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(&pg_ctl)
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "pg_ctl stop failed");
        Ok(())
    }

    pub fn stop(&self) {
        if !self.dir.exists() {
            return;
        }
        let pg_ctl = self.bin.join("pg_ctl");
        let data = self.dir.join("data");
        let _ = std::process::Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                pg_ctl.to_str().unwrap_or_default(),
                "-D",
                data.to_str().unwrap_or_default(),
                "-m",
                "fast",
                "stop",
            ])
            .stdout(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
