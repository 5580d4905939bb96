//! The Ward worker library: consume tier queues, run handlers, commit each
//! result with its transition in one transaction, then ack.
//!
//! A custom worker is a binary that builds a [`Registry`] with its own
//! handlers and calls [`Worker::start`]. Workers keep no state between
//! messages: everything they know comes with the message or from Postgres.

pub mod acks;
mod commit;
mod config;
mod consume;
mod handler;
mod http;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use handler::{Failure, Handler, Heartbeat, Registry, Task};

/// After the shutdown deadline, how long handed-back tasks get to settle.
const HAND_BACK_GRACE_MS: u64 = 2_000;

/// A running worker.
#[derive(Debug)]
pub struct Worker {
    /// Where `/healthz`, `/readyz` and `/metrics` listen.
    pub http_addr: SocketAddr,
    shutdown: CancellationToken,
    hand_back: CancellationToken,
    tracker: TaskTracker,
    shutdown_deadline: Duration,
}

impl Worker {
    /// Connects and starts consuming every configured tier.
    pub async fn start(config: Config, registry: Registry) -> anyhow::Result<Worker> {
        let config = Arc::new(config);
        let store = ward_store::Store::connect(&ward_store::Settings {
            url: config.database.url.clone(),
            schema: config.database.schema.clone(),
            pool_size_max: config.database.pool_size_max,
            pool_wait_ms: config.database.wait_ms,
            app_role: config.database.app_role.clone(),
        })
        .context("connect store")?;
        let metrics = metrics::Metrics::new();
        metrics.init_tiers(&config.tiers);
        let broker_connected = Arc::new(AtomicBool::new(false));
        let shutdown = CancellationToken::new();
        let hand_back = CancellationToken::new();
        let tracker = TaskTracker::new();

        let listener = tokio::net::TcpListener::bind(&config.http_addr)
            .await
            .with_context(|| format!("bind {}", config.http_addr))?;
        let http_addr = listener.local_addr()?;
        let app = http::router(http::State {
            store: store.clone(),
            metrics: metrics.clone(),
            broker_connected: broker_connected.clone(),
        });
        let http_shutdown = shutdown.clone();
        tracker.spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "http server failed");
            }
        });
        tracker.spawn(ward_membership::register(
            config.etcd.clone(),
            ward_membership::this_process(
                "worker",
                &config.node_id,
                config.tiers.clone(),
                http_addr,
            ),
            shutdown.clone(),
        ));
        let committer = commit::Committer::start(
            store.clone(),
            metrics.clone(),
            config
                .committers
                .min(config.database.pool_size_max.saturating_sub(1))
                .max(1),
            config.commit_batch_len_max,
            usize::from(config.prefetch) * config.tiers.len(),
        );
        tracker.spawn(consume::run(consume::Context {
            config: config.clone(),
            registry: Arc::new(registry),
            store,
            metrics,
            broker_connected,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()
                .context("build the HTTP client")?,
            shutdown: shutdown.clone(),
            hand_back: hand_back.clone(),
            committer,
        }));
        tracker.close();
        tracing::info!(%http_addr, node_id = %config.node_id, tiers = ?config.tiers, "worker started");
        Ok(Worker {
            http_addr,
            shutdown,
            hand_back,
            tracker,
            shutdown_deadline: Duration::from_millis(config.shutdown_deadline_ms),
        })
    }

    /// Stops consuming, lets in-flight tasks finish until the deadline, hands
    /// back those still running, and closes.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if tokio::time::timeout(self.shutdown_deadline, self.tracker.wait())
            .await
            .is_ok()
        {
            return Ok(());
        }
        tracing::warn!("shutdown deadline passed; handing back in-flight tasks");
        self.hand_back.cancel();
        tokio::time::timeout(
            Duration::from_millis(HAND_BACK_GRACE_MS),
            self.tracker.wait(),
        )
        .await
        .context("in-flight tasks did not settle after hand-back")
    }
}
