//! The Ward master: serves the HTTP API on every replica and, on the elected
//! leader only, runs the singleton loops (dispatch).

pub mod api;
pub mod autoscale;
pub mod config;
pub mod dead_letters;
pub mod dispatch;
pub mod election;
pub mod fairness;
pub mod metrics;
pub mod starts;
pub mod timers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

/// A running master.
#[derive(Debug)]
pub struct Master {
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// The epoch while this master leads, `None` otherwise.
    pub leader: watch::Receiver<Option<i64>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    shutdown_deadline: Duration,
}

impl Master {
    /// Migrates the store, binds the API and starts campaigning.
    pub async fn start(config: Config) -> anyhow::Result<Master> {
        let config = Arc::new(config);
        let db_settings = store_settings(&config);
        ward_store::migrate(&db_settings).await.context("migrate")?;
        let store = ward_store::Store::connect(&db_settings).context("connect store")?;
        let metrics = metrics::Metrics::new();
        metrics.init_tiers(&config.tiers);
        let (leader_tx, leader_rx) = watch::channel(None);
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();

        let listener = tokio::net::TcpListener::bind(&config.http_addr)
            .await
            .with_context(|| format!("bind {}", config.http_addr))?;
        let http_addr = listener.local_addr()?;
        let ready = Arc::new(tokio::sync::Notify::new());
        tracker.spawn(listen_ready(
            db_settings.clone(),
            ready.clone(),
            shutdown.clone(),
        ));
        let registry = Arc::new(ward_membership::Registry::new(config.etcd.clone()));
        let keys = api::KeyCache::new(config.key_cache_ttl_ms);
        tracker.spawn(listen_tenancy(
            db_settings.clone(),
            keys.clone(),
            shutdown.clone(),
        ));
        let app = api::router(api::AppState {
            store: store.clone(),
            config: config.clone(),
            metrics: metrics.clone(),
            leader: leader_rx.clone(),
            ready,
            registry: registry.clone(),
            starts: starts::StartCommitter::spawn(store.clone()),
            running: Default::default(),
            keys,
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
            ward_membership::this_process("master", &config.node_id, Vec::new(), http_addr),
            shutdown.clone(),
        ));
        tracker.spawn(count_workers(
            config.clone(),
            store.clone(),
            registry,
            metrics.clone(),
            leader_rx.clone(),
            shutdown.clone(),
        ));
        tracker.spawn(dead_letters::run(
            config.clone(),
            store.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        tracker.spawn(election::run(
            config.clone(),
            store,
            metrics,
            leader_tx,
            shutdown.clone(),
        ));
        tracker.close();
        tracing::info!(%http_addr, node_id = %config.node_id, "master started");
        Ok(Master {
            http_addr,
            leader: leader_rx,
            shutdown,
            tracker,
            shutdown_deadline: Duration::from_millis(config.shutdown_deadline_ms),
        })
    }

    /// Stops taking requests, steps down (resigning leadership), and waits
    /// for in-flight work up to the shutdown deadline.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(self.shutdown_deadline, self.tracker.wait())
            .await
            .context("shutdown deadline passed with work still running")
    }

    /// True while this master is the leader.
    pub fn is_leader(&self) -> bool {
        self.leader.borrow().is_some()
    }
}

/// While leading, refreshes `ward_workers_registered` per tier from the
/// member registry (a worker counts for every tier it consumes) and
/// `ward_workers_desired` per tier from the tier's load.
async fn count_workers(
    config: Arc<Config>,
    store: ward_store::Store,
    registry: Arc<ward_membership::Registry>,
    metrics: metrics::Metrics,
    leader: watch::Receiver<Option<i64>>,
    shutdown: CancellationToken,
) {
    const REFRESH_MS: u64 = 2_000;
    let mut dispatched_before: Option<(std::time::Instant, Vec<u64>)> = None;
    while !shutdown.is_cancelled() {
        if leader.borrow().is_some() {
            let now = std::time::Instant::now();
            let dispatched: Vec<u64> = config
                .tiers
                .iter()
                .map(|tier| {
                    metrics
                        .tasks_dispatched_total
                        .with_label_values(&[tier.as_str()])
                        .get()
                })
                .collect();
            let epoch = *leader.borrow();
            if let (Some(epoch), Ok(backlog), Ok(inflight)) =
                (epoch, store.ready_backlog().await, store.inflight().await)
            {
                let mut desired = ward_shared::wire::DesiredWorkers {
                    epoch,
                    computed_at: chrono::Utc::now(),
                    tiers: Default::default(),
                };
                for (index, tier) in config.tiers.iter().enumerate() {
                    let rate = match &dispatched_before {
                        Some((at, before)) => {
                            let seconds = now.duration_since(*at).as_secs_f64().max(0.001);
                            dispatched[index].saturating_sub(before[index]) as f64 / seconds
                        }
                        None => 0.0,
                    };
                    let load = autoscale::TierLoad {
                        ready: backlog
                            .iter()
                            .filter(|(name, _)| name == tier)
                            .map(|(_, count)| *count)
                            .sum(),
                        in_flight: inflight
                            .iter()
                            .filter(|((name, _), _)| name == tier)
                            .map(|(_, count)| *count)
                            .sum(),
                        dispatch_rate_per_s: rate,
                    };
                    let workers = autoscale::desired_workers(load, &config.autoscale);
                    metrics
                        .workers_desired
                        .with_label_values(&[tier.as_str()])
                        .set(workers);
                    desired.tiers.insert(tier.clone(), workers);
                }
                // The same signal for the API and the local autoscaler.
                if let Err(error) = registry
                    .put_signal(
                        autoscale::DESIRED_WORKERS_SIGNAL,
                        &serde_json::json!(desired),
                    )
                    .await
                {
                    tracing::debug!(error = format!("{error:#}"), "publish desired workers");
                }
            }
            dispatched_before = Some((now, dispatched));
            match registry.list().await {
                Ok(members) => {
                    for tier in &config.tiers {
                        let count = members
                            .iter()
                            .filter(|member| member.role == "worker" && member.tiers.contains(tier))
                            .count();
                        metrics
                            .workers_registered
                            .with_label_values(&[tier.as_str()])
                            .set(i64::try_from(count).unwrap_or(i64::MAX));
                    }
                }
                Err(error) => tracing::debug!(error = format!("{error:#}"), "count workers"),
            }
        } else {
            dispatched_before = None;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(REFRESH_MS)) => {}
        }
    }
}

/// Keeps a LISTEN session open for the API's long polls, reconnecting.
async fn listen_ready(
    settings: ward_store::Settings,
    ready: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    const RECONNECT_MS: u64 = 1_000;
    while !shutdown.is_cancelled() {
        match ward_store::Listener::start(&settings, ready.clone()).await {
            Ok(listener) => {
                while !listener.is_closed() {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(RECONNECT_MS)) => {}
                    }
                }
            }
            Err(error) => tracing::debug!(%error, "listen for ready tasks failed"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(RECONNECT_MS)) => {}
        }
    }
}

/// Forgets the resolved API keys whenever tenants or keys change, through
/// any master (`TENANCY_CHANNEL`), and each time it (re)connects: a change
/// made while it was not listening is not missed for longer than that.
async fn listen_tenancy(
    settings: ward_store::Settings,
    keys: api::KeyCache,
    shutdown: CancellationToken,
) {
    const RECONNECT_MS: u64 = 1_000;
    let changed = Arc::new(tokio::sync::Notify::new());
    while !shutdown.is_cancelled() {
        match ward_store::Listener::start_on(
            &settings,
            ward_store::TENANCY_CHANNEL,
            changed.clone(),
            None,
        )
        .await
        {
            Ok(listener) => {
                keys.forget_all();
                while !listener.is_closed() {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = changed.notified() => keys.forget_all(),
                    }
                }
            }
            Err(error) => tracing::debug!(%error, "listen for tenancy changes failed"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(RECONNECT_MS)) => {}
        }
    }
}

/// Store settings from the master configuration.
pub fn store_settings(config: &Config) -> ward_store::Settings {
    ward_store::Settings {
        url: config.database.url.clone(),
        schema: config.database.schema.clone(),
        pool_size_max: config.database.pool_size_max,
        pool_wait_ms: config.database.wait_ms,
        app_role: config.database.app_role.clone(),
    }
}

/// Broker settings from the master configuration.
pub fn broker_settings(config: &Config) -> ward_broker::Settings {
    ward_broker::Settings {
        url: config.amqp.url.clone(),
        queue_prefix: config.amqp.queue_prefix.clone(),
        delivery_limit: config.amqp.delivery_limit,
    }
}
