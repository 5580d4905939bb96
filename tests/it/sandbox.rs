//! The cluster sandbox: starts masters and workers (in-process or as child
//! processes) against the real services, isolated by a schema, a queue prefix
//! and an etcd prefix of their own, and tears them down.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use ward_master::Master;
use ward_worker::{Registry, Worker};

/// Lease TTL the sandbox's masters use: short, so failover tests are quick.
pub const LEASE_TTL_S: i64 = 2;
pub const ADMIN_TOKEN: &str = "sandbox-admin-token";

pub fn database_url() -> String {
    std::env::var("WARD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/ward_test".into())
}

pub fn amqp_url() -> String {
    std::env::var("WARD_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn etcd_endpoints() -> Vec<String> {
    std::env::var("WARD_TEST_ETCD_ENDPOINTS")
        .unwrap_or_else(|_| "http://127.0.0.1:2379".into())
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// One test's private slice of the real services.
pub struct Sandbox {
    pub id: String,
    pub masters: Vec<Master>,
    pub workers: Vec<Worker>,
    pub children: Vec<tokio::process::Child>,
    pub http: reqwest::Client,
}

impl Sandbox {
    pub async fn new() -> Sandbox {
        ensure_database().await;
        let id = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        Sandbox {
            id,
            masters: Vec::new(),
            workers: Vec::new(),
            children: Vec::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    pub fn tiers() -> Vec<String> {
        vec!["gold".into(), "silver".into(), "bronze".into()]
    }

    pub fn schema(&self) -> String {
        format!("ward_{}", self.id)
    }

    pub fn queue_prefix(&self) -> String {
        format!("{}.", self.id)
    }

    pub fn etcd_prefix(&self) -> String {
        format!("/ward-test/{}", self.id)
    }

    pub fn master_config(&self) -> ward_master::Config {
        let mut config = ward_master::Config {
            node_id: format!("{}-master-{}", self.id, self.masters.len()),
            http_addr: "127.0.0.1:0".into(),
            admin_token: ADMIN_TOKEN.into(),
            ..ward_master::Config::default()
        };
        config.database.url = database_url();
        config.database.schema = self.schema();
        config.database.pool_size_max = 4;
        config.amqp.url = amqp_url();
        config.amqp.queue_prefix = self.queue_prefix();
        config.etcd.endpoints = etcd_endpoints();
        config.etcd.prefix = self.etcd_prefix();
        config.etcd.lease_ttl_s = LEASE_TTL_S;
        config.dispatch.poll_ms = 100;
        config.shutdown_deadline_ms = 5_000;
        config
    }

    pub fn worker_config(&self) -> ward_worker::Config {
        let mut config = ward_worker::Config {
            node_id: format!("{}-worker-{}", self.id, self.workers.len()),
            http_addr: "127.0.0.1:0".into(),
            prefetch: 8,
            shutdown_deadline_ms: 5_000,
            ..ward_worker::Config::default()
        };
        config.database.url = database_url();
        config.database.schema = self.schema();
        config.database.pool_size_max = 4;
        config.amqp.url = amqp_url();
        config.amqp.queue_prefix = self.queue_prefix();
        config.etcd.endpoints = etcd_endpoints();
        config.etcd.prefix = self.etcd_prefix();
        config.etcd.lease_ttl_s = LEASE_TTL_S;
        config
    }

    /// Environment for a child `ward-master` or `ward-worker` process.
    pub fn process_env(&self, http_addr: &str) -> Vec<(String, String)> {
        vec![
            ("WARD_HTTP_ADDR".into(), http_addr.into()),
            ("WARD_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
            ("WARD_DATABASE__URL".into(), database_url()),
            ("WARD_DATABASE__SCHEMA".into(), self.schema()),
            ("WARD_DATABASE__POOL_SIZE_MAX".into(), "4".into()),
            ("WARD_AMQP__URL".into(), amqp_url()),
            ("WARD_AMQP__QUEUE_PREFIX".into(), self.queue_prefix()),
            ("WARD_ETCD__ENDPOINTS".into(), etcd_endpoints().join(",")),
            ("WARD_ETCD__PREFIX".into(), self.etcd_prefix()),
            ("WARD_ETCD__LEASE_TTL_S".into(), LEASE_TTL_S.to_string()),
            ("WARD_DISPATCH__POLL_MS".into(), "100".into()),
            ("WARD_LOG".into(), "info".into()),
        ]
    }

    /// Starts an in-process master; waits until its API answers.
    pub async fn start_master(&mut self) -> usize {
        let master = Master::start(self.master_config())
            .await
            .expect("start master");
        self.masters.push(master);
        self.masters.len() - 1
    }

    /// Starts an in-process master with an adjusted configuration.
    pub async fn start_master_with(
        &mut self,
        adjust: impl FnOnce(&mut ward_master::Config),
    ) -> usize {
        let mut config = self.master_config();
        adjust(&mut config);
        let master = Master::start(config).await.expect("start master");
        self.masters.push(master);
        self.masters.len() - 1
    }

    /// Starts an in-process worker with these handlers.
    pub async fn start_worker(&mut self, registry: Registry) -> usize {
        let worker = Worker::start(self.worker_config(), registry)
            .await
            .expect("start worker");
        self.workers.push(worker);
        self.workers.len() - 1
    }

    /// Spawns a `ward-master` or `ward-worker` child process on a free port
    /// with extra environment; returns its base URL.
    pub fn spawn(&mut self, binary: &str, extra_env: &[(&str, &str)]) -> (String, u32) {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let log_path = std::env::temp_dir().join(format!("{}-{binary}-{port}.log", self.id));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = tokio::process::Command::new(binary_path(binary));
        command
            .envs(self.process_env(&addr))
            .env("WARD_NODE_ID", format!("{}-{binary}-{port}", self.id))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true);
        for (key, value) in extra_env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("spawn {binary}: {error}"));
        let pid = child.id().unwrap();
        self.children.push(child);
        (format!("http://{addr}"), pid)
    }

    /// Waits until every process at `urls` (base URLs) answers `/readyz`.
    pub async fn wait_processes_ready(&self, urls: &[&str], timeout: Duration) {
        for url in urls {
            wait_ready(&self.http, &format!("{url}/readyz"), timeout)
                .await
                .unwrap();
        }
    }

    pub fn url(&self, master: usize) -> String {
        format!("http://{}", self.masters[master].http_addr)
    }

    /// Creates a tenant through the admin API; returns its API key.
    pub async fn tenant(&self, base_url: &str, slug: &str, tier: &str) -> String {
        let response = self
            .http
            .post(format!("{base_url}/v1/admin/tenants"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({ "slug": slug, "tier": tier }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "create tenant");
        let body: Value = response.json().await.unwrap();
        body["api_key"].as_str().unwrap().to_owned()
    }

    /// `GET /v1/admin/cluster` of a master (asserts 200).
    pub async fn cluster_status(&self, base_url: &str) -> Value {
        let (status, body) = self
            .call(
                reqwest::Method::GET,
                &format!("{base_url}/v1/admin/cluster"),
                Some(ADMIN_TOKEN),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Sends a request; returns the status and the JSON body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        url: &str,
        key: Option<&str>,
        body: Option<&[u8]>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, url);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_vec());
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
        (status, body)
    }

    pub async fn publish(&self, base_url: &str, key: &str, definition: &Value) -> Value {
        let body = serde_json::to_vec(definition).unwrap();
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                &format!("{base_url}/v1/definitions"),
                Some(key),
                Some(&body),
            )
            .await;
        assert!(status == 201 || status == 200, "publish: {status} {body}");
        body
    }

    /// Publishes a YAML definition (the text as a client sends it).
    pub async fn publish_yaml(&self, base_url: &str, key: &str, yaml: &str) -> Value {
        let response = self
            .http
            .post(format!("{base_url}/v1/definitions"))
            .bearer_auth(key)
            .header("content-type", "application/yaml")
            .body(yaml.to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        assert!(status == 201 || status == 200, "publish: {status} {body}");
        body
    }

    /// POSTs JSON with the tenant's key; returns the status and JSON body.
    pub async fn post(&self, url: &str, key: &str, body: &Value) -> (u16, Value) {
        let bytes = serde_json::to_vec(body).unwrap();
        self.call(reqwest::Method::POST, url, Some(key), Some(&bytes))
            .await
    }

    pub async fn start_instance(&self, base_url: &str, key: &str, request: &Value) -> String {
        let body = serde_json::to_vec(request).unwrap();
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                &format!("{base_url}/v1/instances"),
                Some(key),
                Some(&body),
            )
            .await;
        assert_eq!(status, 201, "start instance: {body}");
        body["id"].as_str().unwrap().to_owned()
    }

    pub async fn instance(&self, base_url: &str, key: &str, id: &str) -> Value {
        let (status, body) = self
            .call(
                reqwest::Method::GET,
                &format!("{base_url}/v1/instances/{id}"),
                Some(key),
                None,
            )
            .await;
        assert_eq!(status, 200, "get instance: {body}");
        body
    }

    /// Polls until the instance leaves `running`, or panics after `timeout`.
    pub async fn wait_finished(
        &self,
        base_url: &str,
        key: &str,
        id: &str,
        timeout: Duration,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let instance = self.instance(base_url, key, id).await;
            if instance["status"] != "running" {
                return instance;
            }
            assert!(
                Instant::now() < deadline,
                "instance {id} still running after {timeout:?}: {instance}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The Prometheus text of a master's or worker's `/metrics`.
    /// A store on this sandbox's schema (migrated), as the application
    /// role uses it: for tests that drive `ward_store` directly.
    pub async fn store(&self) -> ward_store::Store {
        let settings = ward_store::Settings {
            url: database_url(),
            schema: self.schema(),
            pool_size_max: 4,
            pool_wait_ms: 5_000,
            app_role: ward_store::APP_ROLE_DEFAULT.into(),
        };
        ward_store::migrate(&settings).await.unwrap();
        ward_store::Store::connect(&settings).unwrap()
    }

    pub async fn metrics(&self, base_url: &str) -> String {
        self.http
            .get(format!("{base_url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Polls `/metrics` of `base_url` until it contains `needle`.
    pub async fn wait_metric(&self, base_url: &str, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.metrics(base_url).await;
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{needle} not in {base_url}/metrics: {text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A direct connection to this sandbox's schema, for checking history.
    pub async fn sql(&self) -> tokio_postgres::Client {
        let url = database_url();
        let mut config: tokio_postgres::Config = url.parse().unwrap();
        config.options(format!("-c search_path={}", self.schema()));
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }

    /// Stops everything this sandbox started and removes its data.
    pub async fn teardown(mut self) {
        for worker in self.workers.drain(..) {
            let _ = worker.shutdown().await;
        }
        for master in self.masters.drain(..) {
            let _ = master.shutdown().await;
        }
        for mut child in self.children.drain(..) {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        if let Ok(broker) = ward_broker::Broker::connect(&ward_broker::Settings {
            url: amqp_url(),
            queue_prefix: self.queue_prefix(),
            delivery_limit: 20,
        })
        .await
        {
            let _ = broker.delete(&Sandbox::tiers()).await;
            broker.close().await;
        }
        let sql = admin_sql().await;
        let _ = sql
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema()))
            .await;
        if let Ok(mut etcd) = etcd_client::Client::connect(etcd_endpoints(), None).await {
            let _ = etcd
                .delete(
                    self.etcd_prefix(),
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                )
                .await;
        }
    }
}

/// A connection to the test database (no schema on the path).
pub async fn admin_sql() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(connection);
    client
}

/// Creates the test database if it is missing (the test script normally has).
async fn ensure_database() {
    let url = database_url();
    if tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .is_ok()
    {
        return;
    }
    let mut config: tokio_postgres::Config = url.parse().unwrap();
    let name = config.get_dbname().unwrap_or("ward_test").to_owned();
    config.dbname("postgres");
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect to postgres");
    tokio::spawn(connection);
    let _ = client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await;
}

/// A binary of this workspace, built next to the test binary.
pub fn binary_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (deploy/test does)",
        path.display()
    );
    path
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `url` until it answers 200 or `timeout` passes.
pub async fn wait_ready(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(response) = http.get(url).send().await {
            if response.status() == 200 {
                return response.json().await.context("readyz body");
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{url} not ready after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A sequential definition of `handlers`, steps named s1, s2, ..., each
/// needing the one before; no retries.
pub fn sequential(name: &str, handlers: &[&str]) -> Value {
    let steps: Vec<Value> = handlers
        .iter()
        .enumerate()
        .map(|(index, handler)| {
            let mut step = json!({
                "id": format!("s{}", index + 1),
                "kind": "task",
                "handler": handler,
                "retry": { "max_attempts": 1 },
            });
            if index > 0 {
                step["needs"] = json!([format!("s{index}")]);
            }
            step
        })
        .collect();
    json!({ "name": name, "steps": steps })
}
