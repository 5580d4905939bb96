//! Master configuration: defaults, then an optional TOML file, then `WARD_`
//! environment variables (`__` separates sections: `WARD_DATABASE__URL`).

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use ward_shared::settings::{Amqp, Database, Etcd, default_tiers};

/// Everything a master needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Unique per process; the value a leader announces in etcd.
    pub node_id: String,
    /// Address the HTTP API and `/metrics` listen on.
    pub http_addr: String,
    /// Bearer token for `/v1/admin/*`; the admin API is off when empty.
    pub admin_token: String,
    pub tiers: Vec<String>,
    pub database: Database,
    pub amqp: Amqp,
    pub etcd: Etcd,
    pub dispatch: Dispatch,
    pub autoscale: crate::autoscale::Autoscale,
    /// Largest request body accepted, in bytes.
    pub payload_bytes_max: usize,
    /// How long this master answers requests from an API key it resolved
    /// (its tenant, status and quotas) before asking the store again; 0
    /// asks every time. Admin changes, through any master, clear every
    /// master's keys when they commit (`TENANCY_CHANNEL`); this bounds how
    /// long a change is missed while a master's LISTEN connection is down.
    pub key_cache_ttl_ms: u64,
    /// Bound on draining in-flight work at shutdown.
    pub shutdown_deadline_ms: u64,
    /// Logs as JSON lines instead of text.
    pub log_json: bool,
}

/// Most dispatch rounds a leader may have in flight.
pub const ROUNDS_IN_FLIGHT_MAX: usize = 8;

/// `[dispatch]`: how the leader moves ready tasks to the queues.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Dispatch {
    /// Most ready tasks claimed and published per transaction.
    pub batch_len_max: i64,
    /// Poll interval when no notification arrives.
    pub poll_ms: u64,
    /// How often the leader looks for due timers, schedules and expired locks.
    pub timer_poll_ms: u64,
    /// Most tasks dispatched and not yet settled, over all tiers: about the
    /// workers' capacity, so the backlog stays in Postgres where fairness acts.
    pub window_max: i64,
    /// Poll interval while ready work waits for a free slot in the window.
    pub saturated_poll_ms: u64,
    /// Dispatch rounds (claim, publish, confirms, mark) in flight at once:
    /// a new round claims while earlier ones wait for their confirms.
    pub rounds_in_flight_max: usize,
    /// Lease of a dispatched run whose step sets no `timeout_ms`.
    pub lease_default_ms: u64,
    /// Added to every lease: time for delivery, commit and clock drift.
    pub lease_grace_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: format!("master-{}", std::process::id()),
            http_addr: "127.0.0.1:8080".into(),
            admin_token: String::new(),
            tiers: default_tiers(),
            database: Database::default(),
            amqp: Amqp::default(),
            etcd: Etcd::default(),
            dispatch: Dispatch::default(),
            autoscale: crate::autoscale::Autoscale::default(),
            payload_bytes_max: 256 * 1024,
            key_cache_ttl_ms: 60_000,
            shutdown_deadline_ms: 10_000,
            log_json: false,
        }
    }
}

impl Default for Dispatch {
    fn default() -> Self {
        Dispatch {
            batch_len_max: 256,
            poll_ms: 250,
            timer_poll_ms: 100,
            window_max: 512,
            saturated_poll_ms: 5,
            rounds_in_flight_max: 2,
            lease_default_ms: 60_000,
            lease_grace_ms: 15_000,
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
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.tiers.is_empty(), "tiers: at least one tier is needed");
        anyhow::ensure!(
            self.etcd.lease_ttl_s >= 1,
            "etcd.lease_ttl_s: must be at least 1"
        );
        anyhow::ensure!(
            self.dispatch.batch_len_max >= 1,
            "dispatch.batch_len_max: must be at least 1"
        );
        anyhow::ensure!(
            (1..=ROUNDS_IN_FLIGHT_MAX).contains(&self.dispatch.rounds_in_flight_max),
            "dispatch.rounds_in_flight_max: must be 1 to {ROUNDS_IN_FLIGHT_MAX}"
        );
        anyhow::ensure!(
            self.dispatch.rounds_in_flight_max < self.database.pool_size_max,
            "dispatch.rounds_in_flight_max: must be below database.pool_size_max (each round holds a connection)"
        );
        Ok(())
    }
}
