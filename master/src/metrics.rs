//! Master metrics: names are constants here; labels come from closed sets
//! (tier, outcome), never tenant or instance ids.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

pub const INSTANCES_STARTED_TOTAL: &str = "ward_instances_started_total";
pub const DEFINITIONS_PUBLISHED_TOTAL: &str = "ward_definitions_published_total";
pub const API_ERRORS_TOTAL: &str = "ward_api_errors_total";
pub const TASKS_DISPATCHED_TOTAL: &str = "ward_tasks_dispatched_total";
pub const DISPATCH_BATCH_SECONDS: &str = "ward_dispatch_batch_seconds";
pub const DISPATCH_ERRORS_TOTAL: &str = "ward_dispatch_errors_total";
pub const READY_BACKLOG: &str = "ward_ready_backlog";
pub const LEADER: &str = "ward_leader";
pub const LEADER_EPOCH: &str = "ward_leader_epoch";
pub const LEADER_CHANGES_TOTAL: &str = "ward_leader_changes_total";
pub const DB_POOL_CONNECTIONS: &str = "ward_db_pool_connections";
pub const INSTANCES_CANCELLED_TOTAL: &str = "ward_instances_cancelled_total";
pub const SIGNALS_TOTAL: &str = "ward_signals_total";
pub const TIMERS_FIRED_TOTAL: &str = "ward_timers_fired_total";
pub const SCHEDULE_STARTS_TOTAL: &str = "ward_schedule_starts_total";
pub const LOCKS_EXPIRED_TOTAL: &str = "ward_external_locks_expired_total";
pub const TASKS_IN_FLIGHT: &str = "ward_tasks_in_flight";
pub const LEASES_EXPIRED_TOTAL: &str = "ward_task_leases_expired_total";
pub const TENANT_THROTTLED_TOTAL: &str = "ward_tenant_throttled_total";
pub const TASKS_DEAD_LETTERED_TOTAL: &str = "ward_tasks_dead_lettered_total";
pub const WORKERS_REGISTERED: &str = "ward_workers_registered";
pub const WORKERS_DESIRED: &str = "ward_workers_desired";
pub const INSTANCES_FINISHED_TOTAL: &str = "ward_instances_finished_total";
pub const STORE_TRANSACTION_SECONDS: &str = "ward_store_transaction_seconds";
pub const PUBLISH_CONFIRM_SECONDS: &str = "ward_publish_confirm_seconds";
pub const HTTP_REQUEST_SECONDS: &str = "ward_http_request_seconds";

/// Dead-letter reasons (the `reason` label of `ward_tasks_dead_lettered_total`).
pub const DEAD_LETTER_REASONS: [&str; 4] = ["delivery_limit", "rejected", "expired", "other"];
/// Store operations timed by `ward_store_transaction_seconds`.
pub const STORE_OPS: [&str; 5] = [
    "start_instance",
    "start_instances",
    "dispatch",
    "timers",
    "dead_letter",
];
/// Instance end states (the `status` label of `ward_instances_finished_total`).
pub const INSTANCE_END_STATES: [&str; 3] = ["completed", "failed", "cancelled"];

/// The master's metrics, registered in its own registry (so several masters
/// can run in one test process).
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub instances_started_total: IntCounter,
    pub definitions_published_total: IntCounter,
    /// By `code` (the API error code, a closed set).
    pub api_errors_total: IntCounterVec,
    /// By `tier`.
    pub tasks_dispatched_total: IntCounterVec,
    pub dispatch_batch_seconds: Histogram,
    /// By `kind`: fenced, store, broker.
    pub dispatch_errors_total: IntCounterVec,
    /// By `tier`; refreshed by the leader.
    pub ready_backlog: IntGaugeVec,
    pub leader: IntGauge,
    pub leader_epoch: IntGauge,
    pub leader_changes_total: IntCounter,
    /// By `state`: total, idle.
    pub db_pool_connections: IntGaugeVec,
    pub instances_cancelled_total: IntCounter,
    pub signals_total: IntCounter,
    pub timers_fired_total: IntCounter,
    pub schedule_starts_total: IntCounter,
    pub locks_expired_total: IntCounter,
    /// By `tier`: dispatched, not yet settled; refreshed by the leader.
    pub tasks_in_flight: IntGaugeVec,
    /// By `reason` (inflight, rate): rounds in which a tenant with ready
    /// work was held back by its quota.
    pub tenant_throttled_total: IntCounterVec,
    pub leases_expired_total: IntCounter,
    /// By `reason`: delivery_limit, rejected, expired, other.
    pub tasks_dead_lettered_total: IntCounterVec,
    /// By `tier`: workers registered in etcd that consume the tier; refreshed by the leader.
    pub workers_registered: IntGaugeVec,
    /// By `tier`: workers needed to keep schedule-to-start under target; set by the leader.
    pub workers_desired: IntGaugeVec,
    /// By `status`: instances this master ended (cancelled, dead-lettered).
    pub instances_finished_total: IntCounterVec,
    /// By `op`: store transactions of this master.
    pub store_transaction_seconds: HistogramVec,
    /// Time from publishing a batch to the broker confirming all of it.
    pub publish_confirm_seconds: Histogram,
    /// By `route` (the route's template, such as `/v1/instances/{id}`),
    /// `method` and `class` (`2xx` ... `5xx`): time to answer an API request.
    pub http_request_seconds: HistogramVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Builds every metric in a fresh registry.
    ///
    /// The `unwrap`s are invariants, not operating errors: constructors fail
    /// only on an invalid name or label (the names are constants of this file)
    /// and `register` only on a duplicate in this new, private registry. Every
    /// test that starts a master runs this code.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let metrics = Metrics {
            instances_started_total: IntCounter::new(INSTANCES_STARTED_TOTAL, "Instances started.")
                .unwrap(),
            definitions_published_total: IntCounter::new(
                DEFINITIONS_PUBLISHED_TOTAL,
                "Definition versions published.",
            )
            .unwrap(),
            api_errors_total: IntCounterVec::new(
                Opts::new(
                    API_ERRORS_TOTAL,
                    "API requests answered with an error, by code.",
                ),
                &["code"],
            )
            .unwrap(),
            tasks_dispatched_total: IntCounterVec::new(
                Opts::new(
                    TASKS_DISPATCHED_TOTAL,
                    "Task runs published to a tier queue.",
                ),
                &["tier"],
            )
            .unwrap(),
            dispatch_batch_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    DISPATCH_BATCH_SECONDS,
                    "Time to claim, publish and mark one batch.",
                )
                .buckets(vec![
                    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
            )
            .unwrap(),
            dispatch_errors_total: IntCounterVec::new(
                Opts::new(
                    DISPATCH_ERRORS_TOTAL,
                    "Dispatch batches that failed, by kind.",
                ),
                &["kind"],
            )
            .unwrap(),
            ready_backlog: IntGaugeVec::new(
                Opts::new(
                    READY_BACKLOG,
                    "Ready task runs waiting in Postgres, by tier.",
                ),
                &["tier"],
            )
            .unwrap(),
            leader: IntGauge::new(LEADER, "1 while this master is the leader.").unwrap(),
            leader_epoch: IntGauge::new(
                LEADER_EPOCH,
                "Epoch of this master's leadership term, 0 when not leader.",
            )
            .unwrap(),
            leader_changes_total: IntCounter::new(
                LEADER_CHANGES_TOTAL,
                "Times this master became or stopped being the leader.",
            )
            .unwrap(),
            db_pool_connections: IntGaugeVec::new(
                Opts::new(DB_POOL_CONNECTIONS, "Postgres pool connections, by state."),
                &["state"],
            )
            .unwrap(),
            instances_cancelled_total: IntCounter::new(
                INSTANCES_CANCELLED_TOTAL,
                "Instances cancelled through the API.",
            )
            .unwrap(),
            signals_total: IntCounter::new(SIGNALS_TOTAL, "Signals accepted.").unwrap(),
            timers_fired_total: IntCounter::new(
                TIMERS_FIRED_TOTAL,
                "Durable timers fired by the leader (retry backoffs, delays, signal timeouts).",
            )
            .unwrap(),
            schedule_starts_total: IntCounter::new(
                SCHEDULE_STARTS_TOTAL,
                "Instances started by cron schedules.",
            )
            .unwrap(),
            locks_expired_total: IntCounter::new(
                LOCKS_EXPIRED_TOTAL,
                "External-task locks that expired and returned their task to ready.",
            )
            .unwrap(),
            tasks_in_flight: IntGaugeVec::new(
                Opts::new(
                    TASKS_IN_FLIGHT,
                    "Task runs dispatched and not yet settled, by tier.",
                ),
                &["tier"],
            )
            .unwrap(),
            tenant_throttled_total: IntCounterVec::new(
                Opts::new(
                    TENANT_THROTTLED_TOTAL,
                    "Dispatch rounds in which a tenant was held back by a quota, by reason.",
                ),
                &["reason"],
            )
            .unwrap(),
            leases_expired_total: IntCounter::new(
                LEASES_EXPIRED_TOTAL,
                "Dispatched task runs failed by the leader because their lease expired (lost or hung worker).",
            )
            .unwrap(),
            tasks_dead_lettered_total: IntCounterVec::new(
                Opts::new(
                    TASKS_DEAD_LETTERED_TOTAL,
                    "Task messages recorded in the dead-letter table, by reason.",
                ),
                &["reason"],
            )
            .unwrap(),
            workers_registered: IntGaugeVec::new(
                Opts::new(
                    WORKERS_REGISTERED,
                    "Workers registered in etcd that consume a tier, by tier (leader only).",
                ),
                &["tier"],
            )
            .unwrap(),
            workers_desired: IntGaugeVec::new(
                Opts::new(
                    WORKERS_DESIRED,
                    "Workers needed to keep schedule-to-start under target, by tier (leader only).",
                ),
                &["tier"],
            )
            .unwrap(),
            instances_finished_total: IntCounterVec::new(
                Opts::new(
                    INSTANCES_FINISHED_TOTAL,
                    "Instances that reached an end state in this process, by status.",
                ),
                &["status"],
            )
            .unwrap(),
            store_transaction_seconds: HistogramVec::new(
                HistogramOpts::new(
                    STORE_TRANSACTION_SECONDS,
                    "Duration of store transactions, by operation.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
                &["op"],
            )
            .unwrap(),
            publish_confirm_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    PUBLISH_CONFIRM_SECONDS,
                    "Time from publishing a dispatch batch to the broker confirming all of it.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
            )
            .unwrap(),
            http_request_seconds: HistogramVec::new(
                HistogramOpts::new(
                    HTTP_REQUEST_SECONDS,
                    "Time to answer an API request, by route template, method and status class.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ]),
                &["route", "method", "class"],
            )
            .unwrap(),
            registry,
        };
        for kind in ["fenced", "store", "broker"] {
            metrics.dispatch_errors_total.with_label_values(&[kind]);
        }
        for reason in ["inflight", "rate", "running_instances"] {
            metrics.tenant_throttled_total.with_label_values(&[reason]);
        }
        for state in ["total", "idle"] {
            metrics.db_pool_connections.with_label_values(&[state]);
        }
        for reason in DEAD_LETTER_REASONS {
            metrics
                .tasks_dead_lettered_total
                .with_label_values(&[reason]);
        }
        for op in STORE_OPS {
            metrics.store_transaction_seconds.with_label_values(&[op]);
        }
        for status in INSTANCE_END_STATES {
            metrics
                .instances_finished_total
                .with_label_values(&[status]);
        }
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.instances_started_total.clone()),
            Box::new(metrics.definitions_published_total.clone()),
            Box::new(metrics.api_errors_total.clone()),
            Box::new(metrics.tasks_dispatched_total.clone()),
            Box::new(metrics.dispatch_batch_seconds.clone()),
            Box::new(metrics.dispatch_errors_total.clone()),
            Box::new(metrics.ready_backlog.clone()),
            Box::new(metrics.leader.clone()),
            Box::new(metrics.leader_epoch.clone()),
            Box::new(metrics.leader_changes_total.clone()),
            Box::new(metrics.db_pool_connections.clone()),
            Box::new(metrics.instances_cancelled_total.clone()),
            Box::new(metrics.signals_total.clone()),
            Box::new(metrics.timers_fired_total.clone()),
            Box::new(metrics.schedule_starts_total.clone()),
            Box::new(metrics.locks_expired_total.clone()),
            Box::new(metrics.tasks_in_flight.clone()),
            Box::new(metrics.tenant_throttled_total.clone()),
            Box::new(metrics.leases_expired_total.clone()),
            Box::new(metrics.tasks_dead_lettered_total.clone()),
            Box::new(metrics.workers_registered.clone()),
            Box::new(metrics.workers_desired.clone()),
            Box::new(metrics.instances_finished_total.clone()),
            Box::new(metrics.store_transaction_seconds.clone()),
            Box::new(metrics.publish_confirm_seconds.clone()),
            Box::new(metrics.http_request_seconds.clone()),
        ];
        for collector in collectors {
            metrics.registry.register(collector).unwrap();
        }
        metrics
    }

    /// Exposes every per-tier series from the start (at zero), so
    /// dashboards and alerts see them before the first event.
    pub fn init_tiers(&self, tiers: &[String]) {
        for tier in tiers {
            let tier = [tier.as_str()];
            self.tasks_dispatched_total.with_label_values(&tier);
            self.ready_backlog.with_label_values(&tier);
            self.tasks_in_flight.with_label_values(&tier);
            self.workers_registered.with_label_values(&tier);
            self.workers_desired.with_label_values(&tier);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
