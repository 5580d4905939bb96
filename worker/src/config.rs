//! Worker configuration: defaults, then an optional TOML file, then `WARD_`
//! environment variables (`__` separates sections: `WARD_AMQP__URL`).

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use ward_shared::settings::{Amqp, Database, Etcd, default_tiers};

/// Everything a worker needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub node_id: String,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    pub http_addr: String,
    /// Tiers whose queues this worker consumes.
    pub tiers: Vec<String>,
    pub database: Database,
    pub amqp: Amqp,
    /// Where the worker registers itself (`wardctl cluster status`).
    pub etcd: Etcd,
    /// Most unacked deliveries per tier queue (and so concurrent tasks).
    pub prefetch: u16,
    /// Bound on one handler run.
    pub handler_timeout_ms: u64,
    /// Attempts at committing one result while the store is unavailable.
    pub commit_attempts_max: u32,
    /// Group commit: concurrent commit transactions (each holds a pooled
    /// connection; at most `database.pool_size_max - 1` are used). One by
    /// default: results then share transactions from a lower load on, and
    /// commits do not queue on each other's row locks (`ward-bench perf`,
    /// scenario 3 at 25 %: schedule-to-start p50 7–10 ms with one, 30–41 ms
    /// with four).
    pub committers: usize,
    /// Group commit: most task results in one transaction.
    pub commit_batch_len_max: usize,
    /// How often the worker extends the lease of a running task.
    pub heartbeat_interval_ms: u64,
    /// How far each heartbeat extends the lease.
    pub heartbeat_lease_ms: u64,
    /// Bound on draining in-flight tasks at shutdown; tasks still running
    /// then are handed back to the queue.
    pub shutdown_deadline_ms: u64,
    pub log_json: bool,
    /// Adds the fault-injection handlers `crash` (aborts the process) and
    /// `ledger` (appends each execution to `ledger_path`). For fault
    /// experiments only: never on a production worker.
    pub fault_handlers: bool,
    /// The ledger file of the `ledger` handler.
    pub ledger_path: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: format!("worker-{}", std::process::id()),
            http_addr: "127.0.0.1:9090".into(),
            tiers: default_tiers(),
            database: Database::default(),
            amqp: Amqp::default(),
            etcd: Etcd::default(),
            prefetch: 32,
            handler_timeout_ms: 30_000,
            commit_attempts_max: 5,
            committers: 1,
            commit_batch_len_max: 64,
            heartbeat_interval_ms: 10_000,
            heartbeat_lease_ms: 30_000,
            shutdown_deadline_ms: 10_000,
            log_json: false,
            fault_handlers: false,
            ledger_path: None,
        }
    }
}

impl Config {
    /// Loads defaults, then `path` if given, then `WARD_*` variables.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let mut builder = config::Config::builder()
            .add_source(config::Config::try_from(&Config::default()).context("defaults")?);
        if let Some(path) = path {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let config: Config = builder
            .add_source(
                config::Environment::with_prefix("WARD")
                    .prefix_separator("_")
                    .separator("__")
                    .list_separator(",")
                    .with_list_parse_key("tiers")
                    .with_list_parse_key("etcd.endpoints")
                    .try_parsing(true),
            )
            .build()
            .context("read configuration")?
            .try_deserialize()
            .context("parse configuration")?;
        anyhow::ensure!(
            !config.tiers.is_empty(),
            "tiers: at least one tier is needed"
        );
        anyhow::ensure!(config.prefetch >= 1, "prefetch: must be at least 1");
        anyhow::ensure!(
            (1..=1_024).contains(&config.commit_batch_len_max),
            "commit_batch_len_max: must be 1 to 1024"
        );
        anyhow::ensure!(config.committers >= 1, "committers: must be at least 1");
        Ok(config)
    }
}
