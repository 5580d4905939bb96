//! `ward-bench chaos`: the fault harness. Starts its own Postgres, RabbitMQ
//! and etcd (own folders and ports, so restarting them disturbs nothing
//! else), 3 masters and 3 workers on loopback, runs a steady mixed workload
//! whose `ledger` steps record every execution, injects faults (kill -9 and
//! SIGSTOP of leaders, standbys and workers; restarts of RabbitMQ, Postgres
//! and etcd), then checks the history from the rows: nothing lost, no effect
//! committed twice, nothing stuck, no write from a stale epoch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::cluster::{PrivatePostgres, free_port, wait_ready};
use crate::load::percentile;

const ADMIN_TOKEN: &str = "chaos-admin-token";
const SCHEMA: &str = "chaos";
/// Leader lease of the masters under test.
const LEASE_TTL_S: u64 = 2;
/// Task-run lease (worker heartbeats extend it) and the leader's grace.
const HEARTBEAT_INTERVAL_MS: u64 = 500;
const HEARTBEAT_LEASE_MS: u64 = 2_000;
/// How long a service stays down when restarted.
const SERVICE_DOWN_MS: u64 = 2_000;
/// Bound on one API call of the load generator.
const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Bound on retrying one submission until the API acknowledges it.
const SUBMIT_DEADLINE_MS: u64 = 60_000;
/// Most submissions in flight at once.
const SUBMISSIONS_IN_FLIGHT_MAX: usize = 64;

/// The workload: a chain with a slow middle step, and a fan-out with a
/// durable delay before the join. Every task step is a `ledger` step.
const CHAIN: &str = "name: chaos-chain
steps:
  - { id: a, kind: task, handler: ledger, retry: { max_attempts: 30, initial_delay_ms: 100, max_delay_ms: 1000 } }
  - { id: b, kind: task, handler: ledger, needs: [a], input: { sleep_ms: 300 }, retry: { max_attempts: 30, initial_delay_ms: 100, max_delay_ms: 1000 } }
  - { id: c, kind: task, handler: ledger, needs: [b], retry: { max_attempts: 30, initial_delay_ms: 100, max_delay_ms: 1000 } }
";
const FAN: &str = "name: chaos-fan
steps:
  - { id: start, kind: task, handler: ledger, retry: { max_attempts: 30, initial_delay_ms: 100, max_delay_ms: 1000 } }
  - { id: left, kind: task, handler: ledger, needs: [start], input: { sleep_ms: 200 }, retry: { max_attempts: 30, initial_delay_ms: 100, max_delay_ms: 1000 } }
  - { id: right, kind: task, handler: ledger, needs: [start], retry: { max_attempts: 30, initial_delay_ms: 100, max_delay_ms: 1000 } }
  - { id: pause, kind: delay, duration_ms: 500, needs: [left, right] }
  - { id: join, kind: task, handler: ledger, needs: [pause], retry: { max_attempts: 30, initial_delay_ms: 100, max_delay_ms: 1000 } }
";

/// The kinds of fault, in the order a quick run injects them.
pub const FAULT_KINDS: [&str; 8] = [
    "kill_leader",
    "kill_standby",
    "kill_worker",
    "stop_leader",
    "stop_worker",
    "restart_rabbitmq",
    "restart_postgres",
    "restart_etcd",
];

/// How a run goes.
#[derive(Debug, Clone)]
pub struct Options {
    /// Each fault kind once (two leader kills), then drain: a few minutes.
    pub quick: bool,
    /// Soak: inject faults for this long.
    pub duration_s: u64,
    /// Soak: a fault every this many seconds (uniform in the range).
    pub fault_every_s: (u64, u64),
    /// Instances submitted per second.
    pub rate_per_s: f64,
    pub seed: u64,
    pub bin_dir: PathBuf,
    pub out: PathBuf,
}

/// A process of the cluster, restartable with the same settings.
struct Proc {
    name: String,
    binary: String,
    port: u16,
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    fn spawn(&mut self, bin_dir: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(bin_dir.join(&self.binary))
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {} from {}", self.binary, bin_dir.display()))?;
        self.child = Some(child);
        Ok(())
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    fn signal(&self, name: &str) -> anyhow::Result<()> {
        let pid = self.pid().context("process not running")?;
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{name} {pid}");
        Ok(())
    }
}

/// A RabbitMQ node of the harness's own.
struct PrivateRabbit {
    dir: PathBuf,
    port: u16,
    env: Vec<(String, String)>,
    child: Option<std::process::Child>,
}

impl PrivateRabbit {
    fn new(root: &Path) -> anyhow::Result<PrivateRabbit> {
        let dir = root.join("rabbitmq");
        std::fs::create_dir_all(dir.join("home"))?;
        let port = free_port()?;
        let dist_port = free_port()?;
        let cookie = dir.join("home/.erlang.cookie");
        std::fs::write(&cookie, format!("WARDCHAOS{port}"))?;
        std::process::Command::new("chmod")
            .arg("400")
            .arg(&cookie)
            .status()?;
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"),
        )?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        let path = |name: &str| dir.join(name).display().to_string();
        let env = vec![
            ("HOME".to_owned(), path("home")),
            (
                "RABBITMQ_NODENAME".to_owned(),
                format!("wardchaos{port}@localhost"),
            ),
            (
                "RABBITMQ_NODE_IP_ADDRESS".to_owned(),
                "127.0.0.1".to_owned(),
            ),
            ("RABBITMQ_NODE_PORT".to_owned(), port.to_string()),
            ("RABBITMQ_DIST_PORT".to_owned(), dist_port.to_string()),
            ("RABBITMQ_CONFIG_FILE".to_owned(), path("rabbitmq.conf")),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE".to_owned(),
                path("enabled_plugins"),
            ),
            ("RABBITMQ_MNESIA_BASE".to_owned(), path("mnesia")),
            ("RABBITMQ_LOG_BASE".to_owned(), path("log")),
            ("RABBITMQ_PID_FILE".to_owned(), path("pid")),
            ("RABBITMQ_CONF_ENV_FILE".to_owned(), "/dev/null".to_owned()),
            ("ERL_EPMD_ADDRESS".to_owned(), "127.0.0.1".to_owned()),
        ];
        Ok(PrivateRabbit {
            dir,
            port,
            env,
            child: None,
        })
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("out.log"))?;
        let child = std::process::Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server")
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start rabbitmq-server (apt-get install -y rabbitmq-server)")?;
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(60)).await
    }

    /// Stops the node (SIGTERM to the server: a clean broker stop).
    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // The Erlang VM may outlive the wrapper script for a moment.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let pid = pid.trim().to_owned();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for PrivateRabbit {
    /// Kills the node if the run ended early.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", pid.trim()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for PrivateEtcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An etcd of the harness's own.
struct PrivateEtcd {
    dir: PathBuf,
    port: u16,
    peer_port: u16,
    child: Option<std::process::Child>,
}

impl PrivateEtcd {
    fn new(root: &Path) -> anyhow::Result<PrivateEtcd> {
        let dir = root.join("etcd");
        std::fs::create_dir_all(&dir)?;
        Ok(PrivateEtcd {
            dir,
            port: free_port()?,
            peer_port: free_port()?,
            child: None,
        })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("out.log"))?;
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = std::process::Command::new("etcd")
            .arg("--name")
            .arg("chaos")
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--listen-client-urls")
            .arg(self.url())
            .arg("--advertise-client-urls")
            .arg(self.url())
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("chaos={peer}"))
            .env("ETCD_UNSUPPORTED_ARCH", "")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start etcd (apt-get install -y etcd-server)")?;
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(30)).await
    }

    /// Kills etcd (SIGKILL: a crash; it recovers from its WAL).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn wait_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "port {port} not open after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// One acknowledged submission.
#[derive(Debug, Clone)]
struct Acked {
    tenant: usize,
    id: String,
}

/// What the load generator saw.
#[derive(Debug, Default)]
struct Submissions {
    acked: Vec<Acked>,
    /// Gave up after `SUBMIT_DEADLINE_MS` without an acknowledgement (not
    /// counted as lost: the caller was told no).
    refused: u64,
    /// Answers that were not 2xx, and transport errors, retried.
    retries: u64,
}

/// The harness: services, processes, the load and the record of faults.
struct Harness {
    options: Options,
    http: reqwest::Client,
    postgres: PrivatePostgres,
    rabbit: PrivateRabbit,
    etcd: PrivateEtcd,
    masters: Vec<Proc>,
    workers: Vec<Proc>,
    keys: Vec<String>,
    ledger: PathBuf,
    faults: Vec<Value>,
    failovers_s: Vec<f64>,
    worker_recoveries_s: Vec<f64>,
    stale_writes_rejected: i64,
}

/// Runs the harness; Err (and a non-zero exit) when a check fails.
pub async fn run(options: Options) -> anyhow::Result<Value> {
    let root = std::env::temp_dir().join(format!("ward-chaos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    println!(
        "# ward-bench chaos ({})",
        if options.quick { "quick" } else { "soak" }
    );
    println!("run folder: {}", root.display());
    let started = Instant::now();

    let postgres = PrivatePostgres::start(free_port()?, 300).await?;
    let mut rabbit = PrivateRabbit::new(&root)?;
    rabbit.start().await?;
    let mut etcd = PrivateEtcd::new(&root)?;
    etcd.start().await?;
    println!(
        "services: postgres {}, rabbitmq {}, etcd {} (own instances) in {:.1} s",
        postgres.url,
        rabbit.url(),
        etcd.url(),
        started.elapsed().as_secs_f64()
    );

    let ledger = root.join("ledger");
    let mut harness = Harness {
        http: reqwest::Client::builder()
            .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
            .build()?,
        postgres,
        rabbit,
        etcd,
        masters: Vec::new(),
        workers: Vec::new(),
        keys: Vec::new(),
        ledger,
        faults: Vec::new(),
        failovers_s: Vec::new(),
        worker_recoveries_s: Vec::new(),
        stale_writes_rejected: 0,
        options,
    };
    let result = harness.experiment(&root).await;
    for process in harness.masters.iter_mut().chain(harness.workers.iter_mut()) {
        let _ = process.signal("CONT");
        process.kill().await;
    }
    harness.rabbit.stop().await;
    harness.etcd.kill();
    harness.postgres.stop();
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&root);
    } else {
        println!("logs kept in {}", root.display());
    }
    result
}

impl Harness {
    async fn experiment(&mut self, root: &Path) -> anyhow::Result<Value> {
        self.start_cluster(root).await?;
        self.setup_tenants().await?;
        let submissions = Arc::new(Mutex::new(Submissions::default()));
        let stop_load = tokio_util::sync::CancellationToken::new();
        let load = tokio::spawn(generate_load(
            self.http.clone(),
            self.masters.iter().map(Proc::url).collect(),
            self.keys.clone(),
            self.options.rate_per_s,
            self.options.seed,
            submissions.clone(),
            stop_load.clone(),
        ));
        // Warm up, then inject.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let plan = self.plan();
        let mut rng = StdRng::seed_from_u64(self.options.seed);
        let soak_started = Instant::now();
        for (index, kind) in plan.iter().enumerate() {
            if !self.options.quick
                && soak_started.elapsed() >= Duration::from_secs(self.options.duration_s)
            {
                break;
            }
            let fault_started = Instant::now();
            let detail = self
                .inject(kind)
                .await
                .with_context(|| format!("inject {kind}"))?;
            println!(
                "fault {:>3} {kind:<17} {}",
                index + 1,
                serde_json::to_string(&detail)?
            );
            self.faults.push(json!({ "kind": kind, "detail": detail }));
            let gap_s = if self.options.quick {
                3
            } else {
                rng.random_range(self.options.fault_every_s.0..=self.options.fault_every_s.1)
            };
            let next = fault_started + Duration::from_secs(gap_s);
            self.heal().await?;
            tokio::time::sleep_until(next.max(Instant::now() + Duration::from_secs(2)).into())
                .await;
        }
        // Let the last fault's effects pass with the load still on, then stop it.
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop_load.cancel();
        load.await.context("load generator")?;
        let submissions = std::mem::take(&mut *submissions.lock().unwrap());
        println!(
            "load stopped: {} acknowledged, {} refused, {} retried requests; draining",
            submissions.acked.len(),
            submissions.refused,
            submissions.retries
        );
        self.heal().await?;
        let drained_s = self.drain(&submissions).await?;
        self.check(&submissions, drained_s).await
    }

    async fn start_cluster(&mut self, root: &Path) -> anyhow::Result<()> {
        let common = vec![
            ("WARD_ADMIN_TOKEN".to_owned(), ADMIN_TOKEN.to_owned()),
            ("WARD_TIERS".to_owned(), "gold,silver".to_owned()),
            ("WARD_DATABASE__URL".to_owned(), self.postgres.url.clone()),
            ("WARD_DATABASE__SCHEMA".to_owned(), SCHEMA.to_owned()),
            ("WARD_DATABASE__POOL_SIZE_MAX".to_owned(), "8".to_owned()),
            ("WARD_DATABASE__WAIT_MS".to_owned(), "2000".to_owned()),
            ("WARD_AMQP__URL".to_owned(), self.rabbit.url()),
            ("WARD_AMQP__DELIVERY_LIMIT".to_owned(), "20".to_owned()),
            ("WARD_ETCD__ENDPOINTS".to_owned(), self.etcd.url()),
            ("WARD_ETCD__PREFIX".to_owned(), "/ward-chaos".to_owned()),
            ("WARD_ETCD__LEASE_TTL_S".to_owned(), LEASE_TTL_S.to_string()),
            (
                "WARD_ETCD__CONNECT_TIMEOUT_MS".to_owned(),
                "1000".to_owned(),
            ),
            ("WARD_SHUTDOWN_DEADLINE_MS".to_owned(), "3000".to_owned()),
            // Bounds how long a leader paused mid-publish can hold the epoch row.
            (
                "WARD_AMQP__PUBLISH_TIMEOUT_MS".to_owned(),
                "1000".to_owned(),
            ),
            (
                "WARD_LOG".to_owned(),
                std::env::var("WARD_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        ];
        for index in 0..3 {
            let port = free_port()?;
            let mut env = common.clone();
            env.extend([
                ("WARD_NODE_ID".to_owned(), format!("master-{index}")),
                ("WARD_HTTP_ADDR".to_owned(), format!("127.0.0.1:{port}")),
                ("WARD_DISPATCH__POLL_MS".to_owned(), "100".to_owned()),
                (
                    "WARD_DISPATCH__LEASE_DEFAULT_MS".to_owned(),
                    "3000".to_owned(),
                ),
                (
                    "WARD_DISPATCH__LEASE_GRACE_MS".to_owned(),
                    "1000".to_owned(),
                ),
            ]);
            let mut master = Proc {
                name: format!("master-{index}"),
                binary: "ward-master".into(),
                port,
                env,
                child: None,
                log: root.join(format!("master-{index}.log")),
            };
            master.spawn(&self.options.bin_dir)?;
            if index == 0 {
                // The first master migrates before the others start.
                wait_ready(
                    &self.http,
                    &format!("{}/readyz", master.url()),
                    Duration::from_secs(60),
                )
                .await?;
            }
            self.masters.push(master);
        }
        for index in 0..3 {
            let port = free_port()?;
            let mut env = common.clone();
            env.extend([
                ("WARD_NODE_ID".to_owned(), format!("worker-{index}")),
                ("WARD_HTTP_ADDR".to_owned(), format!("127.0.0.1:{port}")),
                ("WARD_PREFETCH".to_owned(), "8".to_owned()),
                ("WARD_FAULT_HANDLERS".to_owned(), "true".to_owned()),
                (
                    "WARD_LEDGER_PATH".to_owned(),
                    self.ledger.display().to_string(),
                ),
                (
                    "WARD_HEARTBEAT_INTERVAL_MS".to_owned(),
                    HEARTBEAT_INTERVAL_MS.to_string(),
                ),
                (
                    "WARD_HEARTBEAT_LEASE_MS".to_owned(),
                    HEARTBEAT_LEASE_MS.to_string(),
                ),
            ]);
            let mut worker = Proc {
                name: format!("worker-{index}"),
                binary: "ward-worker".into(),
                port,
                env,
                child: None,
                log: root.join(format!("worker-{index}.log")),
            };
            worker.spawn(&self.options.bin_dir)?;
            self.workers.push(worker);
        }
        for process in self.masters.iter().chain(self.workers.iter()) {
            wait_ready(
                &self.http,
                &format!("{}/readyz", process.url()),
                Duration::from_secs(60),
            )
            .await?;
        }
        self.wait_leader(Duration::from_secs(30)).await?;
        // The harness's own witness of every dispatch mark: which epoch wrote
        // it, in which transaction (its commit time is checked at the end).
        self.sql()
            .await?
            .batch_execute(
                "CREATE TABLE chaos_dispatch_log (task_run_id uuid, epoch bigint, xid xid8 NOT NULL);
                 CREATE FUNCTION chaos_log_dispatch() RETURNS trigger LANGUAGE plpgsql
                   SECURITY DEFINER SET search_path = chaos AS $$
                 BEGIN
                   INSERT INTO chaos_dispatch_log VALUES (NEW.id, NEW.dispatch_epoch, pg_current_xact_id());
                   RETURN NEW;
                 END $$;
                 CREATE TRIGGER chaos_log_dispatch AFTER UPDATE OF dispatch_epoch ON task_runs
                   FOR EACH ROW WHEN (NEW.dispatch_epoch IS NOT NULL) EXECUTE FUNCTION chaos_log_dispatch();",
            )
            .await
            .context("install the dispatch witness")?;
        println!("cluster: 3 masters, 3 workers ready");
        Ok(())
    }

    async fn setup_tenants(&mut self) -> anyhow::Result<()> {
        let url = self.masters[0].url();
        for (slug, tier) in [("chaos-gold", "gold"), ("chaos-silver", "silver")] {
            let response = self
                .http
                .post(format!("{url}/v1/admin/tenants"))
                .bearer_auth(ADMIN_TOKEN)
                .json(&json!({ "slug": slug, "tier": tier,
                    "quotas": { "inflight_max": 1000, "dispatch_rate_per_s": 10000, "running_instances_max": 100000 } }))
                .send()
                .await?;
            let status = response.status();
            let body: Value = response.json().await?;
            anyhow::ensure!(status.is_success(), "create tenant {slug}: {body}");
            let key = body["api_key"].as_str().context("api_key")?.to_owned();
            for definition in [CHAIN, FAN] {
                let response = self
                    .http
                    .post(format!("{url}/v1/definitions"))
                    .bearer_auth(&key)
                    .header("content-type", "application/yaml")
                    .body(definition)
                    .send()
                    .await?;
                let status = response.status();
                anyhow::ensure!(status.is_success(), "publish: {}", response.text().await?);
            }
            self.keys.push(key);
        }
        Ok(())
    }

    /// The fault sequence: every kind once in a quick run (the leader killed
    /// twice); in a soak, kinds in a shuffled cycle with a leader kill every
    /// other fault, so failover figures have many samples.
    fn plan(&self) -> Vec<&'static str> {
        if self.options.quick {
            let mut plan = FAULT_KINDS.to_vec();
            plan.push("kill_leader");
            return plan;
        }
        let mut rng = StdRng::seed_from_u64(self.options.seed ^ 0x5eed);
        let mut plan = Vec::new();
        while plan.len() < 10_000 {
            let mut cycle = FAULT_KINDS.to_vec();
            for index in (1..cycle.len()).rev() {
                cycle.swap(index, rng.random_range(0..=index));
            }
            for kind in cycle {
                plan.push("kill_leader");
                plan.push(kind);
            }
        }
        plan
    }

    async fn inject(&mut self, kind: &str) -> anyhow::Result<Value> {
        match kind {
            "kill_leader" => {
                let leader = self.wait_leader(Duration::from_secs(30)).await?;
                let killed_at = Instant::now();
                self.masters[leader].kill().await;
                let (next, failover_s) = self.failover(leader, killed_at).await?;
                self.failovers_s.push(failover_s);
                Ok(
                    json!({ "killed": self.masters[leader].name, "new_leader": self.masters[next].name, "failover_s": round3(failover_s) }),
                )
            }
            "kill_standby" => {
                let leader = self.wait_leader(Duration::from_secs(30)).await?;
                let standby = (leader + 1) % self.masters.len();
                self.masters[standby].kill().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                let still = self.leader_index().await;
                anyhow::ensure!(
                    still == Some(leader),
                    "killing a standby changed the leader"
                );
                Ok(
                    json!({ "killed": self.masters[standby].name, "leader_kept": self.masters[leader].name }),
                )
            }
            "stop_leader" => {
                let leader = self.wait_leader(Duration::from_secs(30)).await?;
                let stopped_at = Instant::now();
                self.masters[leader].signal("STOP")?;
                let (next, failover_s) = self.failover(leader, stopped_at).await?;
                self.failovers_s.push(failover_s);
                // Keep it paused well past its lease, then let it resume: it
                // must find itself deposed and write nothing.
                let hold = Duration::from_secs(LEASE_TTL_S + 3);
                tokio::time::sleep_until((stopped_at + hold).into()).await;
                let fenced_before = self.fenced(leader).await;
                self.masters[leader].signal("CONT")?;
                tokio::time::sleep(Duration::from_secs(LEASE_TTL_S + 1)).await;
                let leads = self.leads(leader).await;
                let mut leaders = 0;
                for index in 0..self.masters.len() {
                    if self.leads(index).await {
                        leaders += 1;
                    }
                }
                anyhow::ensure!(leaders <= 1, "{leaders} masters report leading at once");
                let fenced_after = self.fenced(leader).await;
                let rejected = fenced_after.saturating_sub(fenced_before);
                self.stale_writes_rejected += rejected;
                Ok(
                    json!({ "paused": self.masters[leader].name, "paused_s": hold.as_secs(), "new_leader": self.masters[next].name,
                    "failover_s": round3(failover_s), "resumed_as_leader": leads, "stale_writes_rejected": rejected }),
                )
            }
            "kill_worker" | "stop_worker" => {
                let worker = self.busiest_worker().await;
                let dispatched = self.dispatched_runs().await?;
                let hit_at = Instant::now();
                if kind == "kill_worker" {
                    self.workers[worker].kill().await;
                } else {
                    self.workers[worker].signal("STOP")?;
                }
                let recovery_s = self
                    .wait_settled(&dispatched, hit_at, Duration::from_secs(60))
                    .await?;
                self.worker_recoveries_s.push(recovery_s);
                if kind == "stop_worker" {
                    self.workers[worker].signal("CONT")?;
                }
                Ok(
                    json!({ "worker": self.workers[worker].name, "runs_dispatched_at_fault": dispatched.len(),
                    "recovery_s": round3(recovery_s) }),
                )
            }
            "restart_rabbitmq" => {
                let down_at = Instant::now();
                self.rabbit.stop().await;
                tokio::time::sleep(Duration::from_millis(SERVICE_DOWN_MS)).await;
                self.rabbit.start().await?;
                let dispatched = self.wait_dispatching(Duration::from_secs(90)).await?;
                Ok(
                    json!({ "down_s": round3(down_at.elapsed().as_secs_f64() - dispatched), "dispatch_resumed_after_s": round3(dispatched) }),
                )
            }
            "restart_postgres" => {
                self.postgres.halt()?;
                tokio::time::sleep(Duration::from_millis(SERVICE_DOWN_MS)).await;
                self.postgres.resume()?;
                let dispatched = self.wait_dispatching(Duration::from_secs(90)).await?;
                Ok(
                    json!({ "mode": "immediate (crash) stop", "dispatch_resumed_after_s": round3(dispatched) }),
                )
            }
            "restart_etcd" => {
                self.etcd.kill();
                tokio::time::sleep(Duration::from_millis(SERVICE_DOWN_MS)).await;
                self.etcd.start().await?;
                let leader = self.wait_leader(Duration::from_secs(60)).await?;
                let dispatched = self.wait_dispatching(Duration::from_secs(90)).await?;
                Ok(
                    json!({ "leader_after": self.masters[leader].name, "dispatch_resumed_after_s": round3(dispatched) }),
                )
            }
            other => bail!("unknown fault kind {other}"),
        }
    }

    /// Restarts every process that is not running and resumes stopped ones
    /// (what systemd or Kubernetes would do).
    async fn heal(&mut self) -> anyhow::Result<()> {
        let bin_dir = self.options.bin_dir.clone();
        for process in self.masters.iter_mut().chain(self.workers.iter_mut()) {
            let running = match process.child.as_mut() {
                Some(child) => child.try_wait()?.is_none(),
                None => false,
            };
            if running {
                let _ = process.signal("CONT");
            } else {
                process.spawn(&bin_dir)?;
            }
        }
        for process in self.masters.iter().chain(self.workers.iter()) {
            wait_ready(
                &self.http,
                &format!("{}/readyz", process.url()),
                Duration::from_secs(60),
            )
            .await?;
        }
        Ok(())
    }

    async fn readyz(&self, master: usize) -> Option<Value> {
        let response = self
            .http
            .get(format!("{}/readyz", self.masters[master].url()))
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }

    async fn leads(&self, master: usize) -> bool {
        self.readyz(master)
            .await
            .is_some_and(|body| body["leader"] == true)
    }

    async fn leader_index(&self) -> Option<usize> {
        for index in 0..self.masters.len() {
            if self.leads(index).await {
                return Some(index);
            }
        }
        None
    }

    async fn wait_leader(&self, timeout: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(index) = self.leader_index().await {
                return Ok(index);
            }
            anyhow::ensure!(Instant::now() < deadline, "no leader after {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for a master other than `old` to lead; the seconds since `since`.
    async fn failover(&self, old: usize, since: Instant) -> anyhow::Result<(usize, f64)> {
        let deadline = since + Duration::from_secs(30);
        loop {
            for index in (0..self.masters.len()).filter(|index| *index != old) {
                if self.leads(index).await {
                    return Ok((index, since.elapsed().as_secs_f64()));
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "no new leader after 30 s");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Fenced dispatch errors a master reports.
    async fn fenced(&self, master: usize) -> i64 {
        let Ok(response) = self
            .http
            .get(format!("{}/metrics", self.masters[master].url()))
            .send()
            .await
        else {
            return 0;
        };
        let text = response.text().await.unwrap_or_default();
        text.lines()
            .find(|line| line.starts_with("ward_dispatch_errors_total{kind=\"fenced\"}"))
            .and_then(|line| line.split_whitespace().last())
            .and_then(|value| value.parse::<f64>().ok())
            .map_or(0, |value| value as i64)
    }

    async fn busiest_worker(&self) -> usize {
        let mut best = (0, -1.0);
        for (index, worker) in self.workers.iter().enumerate() {
            let Ok(response) = self
                .http
                .get(format!("{}/metrics", worker.url()))
                .send()
                .await
            else {
                continue;
            };
            let text = response.text().await.unwrap_or_default();
            let running = text
                .lines()
                .find(|line| line.starts_with("ward_tasks_running "))
                .and_then(|line| line.split_whitespace().last())
                .and_then(|value| value.parse::<f64>().ok())
                .unwrap_or(0.0);
            if running > best.1 {
                best = (index, running);
            }
        }
        best.0
    }

    async fn sql(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, connection) =
            tokio_postgres::connect(&self.postgres.url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client
            .batch_execute(&format!("SET search_path TO {SCHEMA}"))
            .await?;
        Ok(client)
    }

    async fn dispatched_runs(&self) -> anyhow::Result<Vec<uuid::Uuid>> {
        let client = self.sql().await?;
        let rows = client
            .query("SELECT id FROM task_runs WHERE state = 'dispatched'", &[])
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Waits until none of `runs` is still dispatched; seconds since `since`.
    async fn wait_settled(
        &self,
        runs: &[uuid::Uuid],
        since: Instant,
        timeout: Duration,
    ) -> anyhow::Result<f64> {
        let client = self.sql().await?;
        loop {
            let row = client
                .query_one(
                    "SELECT count(*) FROM task_runs WHERE state = 'dispatched' AND id = ANY($1)",
                    &[&runs],
                )
                .await?;
            let left: i64 = row.get(0);
            if left == 0 {
                return Ok(since.elapsed().as_secs_f64());
            }
            anyhow::ensure!(
                since.elapsed() < timeout,
                "{left} runs still dispatched after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the cluster dispatches again (a run dispatched after now);
    /// the seconds it took.
    async fn wait_dispatching(&self, timeout: Duration) -> anyhow::Result<f64> {
        let since = Instant::now();
        let mut mark: Option<chrono::DateTime<chrono::Utc>> = None;
        loop {
            if let Ok(client) = self.sql().await {
                let now: Option<chrono::DateTime<chrono::Utc>> = match mark {
                    Some(mark) => client
                        .query_one(
                            "SELECT max(dispatched_at) FROM task_runs WHERE dispatched_at > $1",
                            &[&mark],
                        )
                        .await
                        .ok()
                        .and_then(|row| row.get(0)),
                    None => {
                        mark = client
                            .query_one("SELECT now()", &[])
                            .await
                            .ok()
                            .map(|row| row.get(0));
                        None
                    }
                };
                if now.is_some() {
                    return Ok(since.elapsed().as_secs_f64());
                }
            }
            anyhow::ensure!(
                since.elapsed() < timeout,
                "nothing dispatched for {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every acknowledged instance has ended (or the bound
    /// passes); the seconds it took.
    async fn drain(&self, submissions: &Submissions) -> anyhow::Result<f64> {
        let started = Instant::now();
        let ids: Vec<uuid::Uuid> = submissions
            .acked
            .iter()
            .filter_map(|acked| uuid::Uuid::parse_str(&acked.id).ok())
            .collect();
        let timeout = Duration::from_secs(180);
        loop {
            let client = self.sql().await?;
            let row = client
                .query_one(
                    "SELECT count(*) FROM instances WHERE id = ANY($1) AND status = 'running'",
                    &[&ids],
                )
                .await?;
            let running: i64 = row.get(0);
            if running == 0 || started.elapsed() >= timeout {
                return Ok(started.elapsed().as_secs_f64());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn check(&self, submissions: &Submissions, drained_s: f64) -> anyhow::Result<Value> {
        let client = self.sql().await?;
        let ids: Vec<uuid::Uuid> = submissions
            .acked
            .iter()
            .filter_map(|acked| uuid::Uuid::parse_str(&acked.id).ok())
            .collect();
        let by_tenant = submissions
            .acked
            .iter()
            .fold([0u64; 2], |mut counts, acked| {
                counts[acked.tenant] += 1;
                counts
            });
        let rows = client
            .query(
                "SELECT status, count(*) FROM instances WHERE id = ANY($1) GROUP BY status",
                &[&ids],
            )
            .await?;
        let statuses: HashMap<String, i64> =
            rows.iter().map(|row| (row.get(0), row.get(1))).collect();
        let found: i64 = statuses.values().sum();
        let lost = ids.len() as i64 - found;
        let completed = statuses.get("completed").copied().unwrap_or(0);
        let failed = statuses.get("failed").copied().unwrap_or(0);
        let stuck = statuses.get("running").copied().unwrap_or(0);

        // Effects committed: completed ledger runs per idempotency key.
        let rows = client
            .query(
                "SELECT idempotency_key, count(*) FROM task_runs WHERE handler = 'ledger' \
                 AND state = 'completed' GROUP BY idempotency_key",
                &[],
            )
            .await?;
        let committed: HashMap<String, i64> =
            rows.iter().map(|row| (row.get(0), row.get(1))).collect();
        let duplicated = committed.values().filter(|count| **count > 1).count();
        let committed_total: i64 = committed.values().sum();
        // Completed instances must have every ledger step committed.
        let missing: i64 = client
            .query_one(
                "SELECT count(*) FROM instances i \
                 WHERE i.id = ANY($1) AND i.status = 'completed' AND \
                 (SELECT count(DISTINCT step_id) FROM task_runs r WHERE r.instance_id = i.id \
                  AND r.handler = 'ledger' AND r.state = 'completed') \
                 <> CASE WHEN i.definition_name = 'chaos-chain' THEN 3 ELSE 4 END",
                &[&ids],
            )
            .await?
            .get(0);
        // Executions: the ledger's lines (a key may run more than once).
        let ledger = std::fs::read_to_string(&self.ledger).unwrap_or_default();
        let mut executions: HashMap<&str, i64> = HashMap::new();
        for line in ledger.lines() {
            if let Some(key) = line.split('\t').next() {
                *executions.entry(key).or_default() += 1;
            }
        }
        let executions_total: i64 = executions.values().sum();
        let committed_unexecuted = committed
            .keys()
            .filter(|key| !executions.contains_key(key.as_str()))
            .count();
        let executed_more_than_once = executions.values().filter(|count| **count > 1).count();
        // A write accepted from a stale epoch: a dispatch mark of epoch e
        // whose transaction COMMITTED after a later epoch was claimed (the
        // claim reads its clock once the epoch row is locked, so every
        // correctly fenced write of an older epoch committed before it).
        let stale: i64 = client
            .query_one(
                "SELECT count(*) FROM chaos_dispatch_log l JOIN leader_terms t ON t.epoch > l.epoch \
                 WHERE pg_xact_commit_timestamp((l.xid::text)::xid) >= t.claimed_at",
                &[],
            )
            .await?
            .get(0);
        let witnessed: i64 = client
            .query_one(
                "SELECT count(*) FROM chaos_dispatch_log WHERE pg_xact_commit_timestamp((xid::text)::xid) IS NOT NULL",
                &[],
            )
            .await?
            .get(0);
        // The stale-write check above is only as complete as the witness:
        // every mark that lasted (a run's `dispatch_epoch`) must have been
        // logged, with its epoch, by a transaction that committed.
        let unwitnessed: i64 = client
            .query_one(
                "SELECT count(*) FROM task_runs r WHERE r.dispatch_epoch IS NOT NULL AND NOT EXISTS \
                 (SELECT 1 FROM chaos_dispatch_log l WHERE l.task_run_id = r.id AND l.epoch = r.dispatch_epoch \
                  AND pg_xact_commit_timestamp((l.xid::text)::xid) IS NOT NULL)",
                &[],
            )
            .await?
            .get(0);
        // Effects of runs no dispatch mark ever lasted for: the leader (or
        // the broker, or Postgres) died between the confirms and the mark's
        // commit, and a worker settled the run while it was still ready.
        // Delivery is at least once, so this is allowed; counted, not failed.
        let effects_unmarked: i64 = client
            .query_one(
                "SELECT count(*) FROM task_runs WHERE handler = 'ledger' AND state = 'completed' \
                 AND dispatch_epoch IS NULL",
                &[],
            )
            .await?
            .get(0);
        let terms: i64 = client
            .query_one("SELECT count(*) FROM leader_terms", &[])
            .await?
            .get(0);

        let mut kinds: HashMap<String, u64> = HashMap::new();
        for fault in &self.faults {
            *kinds
                .entry(fault["kind"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
        let mut failovers = self.failovers_s.clone();
        failovers.sort_by(f64::total_cmp);
        let mut recoveries = self.worker_recoveries_s.clone();
        recoveries.sort_by(f64::total_cmp);
        let figures = json!({
            "faults_injected": self.faults.len(),
            "faults_by_kind": kinds,
            "submitted_acknowledged": ids.len(),
            "submitted_by_tenant": by_tenant,
            "submissions_refused": submissions.refused,
            "submission_retries": submissions.retries,
            "completed": completed,
            "failed": failed,
            "lost": lost,
            "stuck": stuck,
            "duplicated_effects": duplicated,
            "completed_missing_effects": missing,
            "executions": executions_total,
            "committed_effects": committed_total,
            "keys_executed_more_than_once": executed_more_than_once,
            "committed_without_execution": committed_unexecuted,
            "stale_epoch_writes_accepted": stale,
            "dispatch_marks_witnessed": witnessed,
            "dispatch_marks_unwitnessed": unwitnessed,
            "effects_of_runs_never_marked": effects_unmarked,
            "stale_epoch_writes_rejected": self.stale_writes_rejected,
            "leader_terms": terms,
            "leader_failover_s": {
                "samples": failovers.len(),
                "p50": round3(percentile(&failovers, 0.5)),
                "max": round3(failovers.last().copied().unwrap_or(0.0)),
            },
            "worker_loss_recovery_s": {
                "samples": recoveries.len(),
                "p50": round3(percentile(&recoveries, 0.5)),
                "max": round3(recoveries.last().copied().unwrap_or(0.0)),
            },
            "drain_s": round3(drained_s),
            "lease_ttl_s": LEASE_TTL_S,
            "task_lease_ms": HEARTBEAT_LEASE_MS,
        });
        let report = json!({
            "benchmark": "chaos", "quick": self.options.quick, "seed": self.options.seed,
            "rate_per_s": self.options.rate_per_s, "at": chrono::Utc::now(),
            "version": env!("CARGO_PKG_VERSION"),
            "machine": { "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0) },
            "figures": figures, "faults": self.faults,
        });
        let text = markdown(&figures);
        print!("{text}");
        std::fs::create_dir_all(&self.options.out)?;
        let stem = if self.options.quick {
            "chaos-quick"
        } else {
            "chaos"
        };
        std::fs::write(
            self.options.out.join(format!("{stem}.json")),
            serde_json::to_string_pretty(&report)?,
        )?;
        std::fs::write(self.options.out.join(format!("{stem}.md")), &text)?;
        println!(
            "results: {}",
            self.options.out.join(format!("{stem}.json")).display()
        );
        let mut problems = Vec::new();
        if lost > 0 {
            problems.push(format!("{lost} acknowledged instances lost"));
        }
        if stuck > 0 {
            problems.push(format!("{stuck} instances stuck"));
        }
        if duplicated > 0 {
            problems.push(format!("{duplicated} effects committed twice"));
        }
        if missing > 0 {
            problems.push(format!("{missing} completed instances miss an effect"));
        }
        if committed_unexecuted > 0 {
            problems.push(format!(
                "{committed_unexecuted} effects committed without an execution"
            ));
        }
        if stale > 0 {
            problems.push(format!("{stale} writes accepted from a stale epoch"));
        }
        if unwitnessed > 0 {
            problems.push(format!(
                "{unwitnessed} lasting dispatch marks the witness did not log"
            ));
        }
        if failed > 0 {
            problems.push(format!(
                "{failed} instances failed (the workload retries 30 times and should never fail)"
            ));
        }
        if ids.is_empty() {
            problems.push("no submission was acknowledged".to_owned());
        }
        if !problems.is_empty() {
            bail!("chaos checks failed: {}", problems.join("; "));
        }
        Ok(report)
    }
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

fn markdown(figures: &Value) -> String {
    let mut text = String::from("\n| figure | value |\n| --- | --- |\n");
    let rows = [
        ("faults injected", figures["faults_injected"].to_string()),
        ("faults by kind", figures["faults_by_kind"].to_string()),
        (
            "instances submitted (acknowledged)",
            figures["submitted_acknowledged"].to_string(),
        ),
        ("completed", figures["completed"].to_string()),
        ("failed", figures["failed"].to_string()),
        ("lost", figures["lost"].to_string()),
        (
            "duplicated effects",
            figures["duplicated_effects"].to_string(),
        ),
        ("stuck", figures["stuck"].to_string()),
        (
            "executions / committed effects",
            format!(
                "{} / {}",
                figures["executions"], figures["committed_effects"]
            ),
        ),
        (
            "lasting dispatch marks unwitnessed / effects of runs never marked",
            format!(
                "{} / {}",
                figures["dispatch_marks_unwitnessed"], figures["effects_of_runs_never_marked"]
            ),
        ),
        (
            "stale-epoch writes accepted / rejected",
            format!(
                "{} / {}",
                figures["stale_epoch_writes_accepted"], figures["stale_epoch_writes_rejected"]
            ),
        ),
        (
            "leader failover s (p50 / max, n)",
            format!(
                "{} / {} (n = {})",
                figures["leader_failover_s"]["p50"],
                figures["leader_failover_s"]["max"],
                figures["leader_failover_s"]["samples"]
            ),
        ),
        (
            "worker-loss recovery s (p50 / max, n)",
            format!(
                "{} / {} (n = {})",
                figures["worker_loss_recovery_s"]["p50"],
                figures["worker_loss_recovery_s"]["max"],
                figures["worker_loss_recovery_s"]["samples"]
            ),
        ),
        ("drain after faults s", figures["drain_s"].to_string()),
    ];
    for (name, value) in rows {
        text.push_str(&format!("| {name} | {value} |\n"));
    }
    text
}

/// Submits instances at `rate_per_s` (alternating tenants and
/// definitions) until `stop`, each with an Idempotency-Key it retries with
/// across masters until one acknowledges it.
async fn generate_load(
    http: reqwest::Client,
    masters: Vec<String>,
    keys: Vec<String>,
    rate_per_s: f64,
    seed: u64,
    submissions: Arc<Mutex<Submissions>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(SUBMISSIONS_IN_FLIGHT_MAX));
    let interval = Duration::from_secs_f64(1.0 / rate_per_s.max(0.1));
    let mut rng = StdRng::seed_from_u64(seed);
    let mut next = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut sequence: u64 = 0;
    while !stop.is_cancelled() {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(next.into()) => {}
        }
        next += interval;
        sequence += 1;
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let tenant = (sequence % 2) as usize;
        let definition = if rng.random_bool(0.5) {
            "chaos-chain"
        } else {
            "chaos-fan"
        };
        let first = rng.random_range(0..masters.len());
        let http = http.clone();
        let masters = masters.clone();
        let key = keys[tenant].clone();
        let submissions = submissions.clone();
        let idempotency_key = format!("chaos-{seed}-{sequence}");
        tasks.spawn(async move {
            let _permit = permit;
            let deadline = Instant::now() + Duration::from_millis(SUBMIT_DEADLINE_MS);
            let mut attempt = 0usize;
            loop {
                let url = &masters[(first + attempt) % masters.len()];
                attempt += 1;
                let answer = http
                    .post(format!("{url}/v1/instances"))
                    .bearer_auth(&key)
                    .header("Idempotency-Key", &idempotency_key)
                    .json(&json!({ "definition": definition, "input": { "n": sequence } }))
                    .send()
                    .await;
                if let Ok(response) = answer {
                    if response.status().is_success() {
                        if let Ok(body) = response.json::<Value>().await {
                            if let Some(id) = body["id"].as_str() {
                                submissions.lock().unwrap().acked.push(Acked {
                                    tenant,
                                    id: id.to_owned(),
                                });
                                return;
                            }
                        }
                    }
                }
                submissions.lock().unwrap().retries += 1;
                if Instant::now() >= deadline {
                    submissions.lock().unwrap().refused += 1;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}
