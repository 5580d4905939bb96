//! Configuration sections shared by the master and the worker: plain data
//! with defaults that suit the local stack. Loading them is the binaries' job.

use serde::{Deserialize, Serialize};

/// `[database]`: where Postgres is and how many connections to hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Database {
    pub url: String,
    /// Schema holding Ward's tables.
    pub schema: String,
    pub pool_size_max: usize,
    /// Bound on connecting and on waiting for a pooled connection.
    pub wait_ms: u64,
    /// Role the pool assumes so row-level security applies (see
    /// ARCHITECTURE.md); created and granted by the migration runner.
    pub app_role: String,
}

impl Default for Database {
    fn default() -> Self {
        Database {
            url: "postgres://postgres@127.0.0.1:5432/ward".into(),
            schema: "public".into(),
            pool_size_max: 16,
            wait_ms: 5_000,
            app_role: "ward_app".into(),
        }
    }
}

/// `[amqp]`: where RabbitMQ is and how queues are named and bounded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Amqp {
    pub url: String,
    pub queue_prefix: String,
    /// Deliveries of one message before the broker dead-letters it.
    pub delivery_limit: u32,
    /// Bound on waiting for publisher confirms of one batch.
    pub publish_timeout_ms: u64,
}

impl Default for Amqp {
    fn default() -> Self {
        Amqp {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            queue_prefix: String::new(),
            delivery_limit: 20,
            publish_timeout_ms: 5_000,
        }
    }
}

/// `[etcd]`: leader election and cluster membership.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Etcd {
    pub endpoints: Vec<String>,
    /// Key prefix of the election and of the member registry (one per test;
    /// `/ward` in production).
    pub prefix: String,
    /// Lease time to live of the leader and of each member's registration: a
    /// standby takes over, and a lost member disappears, within about this.
    pub lease_ttl_s: i64,
    pub connect_timeout_ms: u64,
}

impl Default for Etcd {
    fn default() -> Self {
        Etcd {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/ward".into(),
            lease_ttl_s: 5,
            connect_timeout_ms: 2_000,
        }
    }
}

/// The default tiers, each with its own queue.
pub fn default_tiers() -> Vec<String> {
    vec!["gold".into(), "silver".into(), "bronze".into()]
}
