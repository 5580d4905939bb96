//! Worker metrics: names are constants here; labels come from closed sets.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

pub const TASKS_EXECUTED_TOTAL: &str = "ward_tasks_executed_total";
pub const TASK_COMMITS_TOTAL: &str = "ward_task_commits_total";
pub const TASK_EXECUTION_SECONDS: &str = "ward_task_execution_seconds";
pub const DELIVERIES_REJECTED_TOTAL: &str = "ward_deliveries_rejected_total";
pub const TASKS_RUNNING: &str = "ward_tasks_running";
pub const SCHEDULE_TO_START_SECONDS: &str = "ward_schedule_to_start_seconds";
pub const TASK_RETRIES_TOTAL: &str = "ward_task_retries_total";
pub const INSTANCES_FINISHED_TOTAL: &str = "ward_instances_finished_total";
pub const DB_POOL_CONNECTIONS: &str = "ward_db_pool_connections";
pub const TASK_COMMIT_BATCH_SIZE: &str = "ward_task_commit_batch_size";
pub const ACK_FRAMES_TOTAL: &str = "ward_ack_frames_total";

/// The worker's metrics, in its own registry.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// By `outcome`: succeeded, failed.
    pub tasks_executed_total: IntCounterVec,
    /// By `result`: applied, duplicate, unknown, handed_back.
    pub task_commits_total: IntCounterVec,
    /// By `tier`.
    pub task_execution_seconds: HistogramVec,
    /// By `tier`: from the run becoming ready to its handler starting.
    pub schedule_to_start_seconds: HistogramVec,
    /// By `tier`: retryable failures committed (the step's policy decides
    /// whether another attempt follows).
    pub task_retries_total: IntCounterVec,
    /// By `status`: instances this worker's commits ended.
    pub instances_finished_total: IntCounterVec,
    /// By `state`: total, idle.
    pub db_pool_connections: IntGaugeVec,
    /// By `reason`: malformed.
    pub deliveries_rejected_total: IntCounterVec,
    pub tasks_in_flight: IntGauge,
    /// Results per group-commit transaction.
    pub commit_batch_len: Histogram,
    /// By `kind`: run (one frame acking consecutive deliveries), single.
    pub ack_frames_total: IntCounterVec,
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
    /// test that starts a worker runs this code.
    pub fn new() -> Metrics {
        let metrics = Metrics {
            registry: Registry::new(),
            tasks_executed_total: IntCounterVec::new(
                Opts::new(TASKS_EXECUTED_TOTAL, "Handler runs, by outcome."),
                &["outcome"],
            )
            .unwrap(),
            task_commits_total: IntCounterVec::new(
                Opts::new(
                    TASK_COMMITS_TOTAL,
                    "Task results offered to the store, by result.",
                ),
                &["result"],
            )
            .unwrap(),
            task_execution_seconds: HistogramVec::new(
                HistogramOpts::new(TASK_EXECUTION_SECONDS, "Handler run time, by tier.").buckets(
                    vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0],
                ),
                &["tier"],
            )
            .unwrap(),
            schedule_to_start_seconds: HistogramVec::new(
                HistogramOpts::new(
                    SCHEDULE_TO_START_SECONDS,
                    "Time from a task run becoming ready to its handler starting, by tier.",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ]),
                &["tier"],
            )
            .unwrap(),
            task_retries_total: IntCounterVec::new(
                Opts::new(
                    TASK_RETRIES_TOTAL,
                    "Retryable task failures committed, by tier.",
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
            db_pool_connections: IntGaugeVec::new(
                Opts::new(DB_POOL_CONNECTIONS, "Postgres pool connections, by state."),
                &["state"],
            )
            .unwrap(),
            deliveries_rejected_total: IntCounterVec::new(
                Opts::new(
                    DELIVERIES_REJECTED_TOTAL,
                    "Deliveries dead-lettered by the worker, by reason.",
                ),
                &["reason"],
            )
            .unwrap(),
            tasks_in_flight: IntGauge::new(TASKS_RUNNING, "Deliveries being handled now.").unwrap(),
            commit_batch_len: Histogram::with_opts(
                HistogramOpts::new(
                    TASK_COMMIT_BATCH_SIZE,
                    "Task results committed per transaction (group commit).",
                )
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
            )
            .unwrap(),
            ack_frames_total: IntCounterVec::new(
                Opts::new(
                    ACK_FRAMES_TOTAL,
                    "Ack frames sent to the broker, by kind: run (one frame for \
                     consecutive deliveries), single.",
                ),
                &["kind"],
            )
            .unwrap(),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.tasks_executed_total.clone()),
            Box::new(metrics.task_commits_total.clone()),
            Box::new(metrics.task_execution_seconds.clone()),
            Box::new(metrics.deliveries_rejected_total.clone()),
            Box::new(metrics.tasks_in_flight.clone()),
            Box::new(metrics.schedule_to_start_seconds.clone()),
            Box::new(metrics.task_retries_total.clone()),
            Box::new(metrics.instances_finished_total.clone()),
            Box::new(metrics.db_pool_connections.clone()),
            Box::new(metrics.commit_batch_len.clone()),
            Box::new(metrics.ack_frames_total.clone()),
        ];
        for outcome in ["succeeded", "failed"] {
            metrics.tasks_executed_total.with_label_values(&[outcome]);
        }
        for kind in ["run", "single"] {
            metrics.ack_frames_total.with_label_values(&[kind]);
        }
        for result in ["applied", "duplicate", "unknown", "handed_back"] {
            metrics.task_commits_total.with_label_values(&[result]);
        }
        metrics
            .deliveries_rejected_total
            .with_label_values(&["malformed"]);
        for state in ["total", "idle"] {
            metrics.db_pool_connections.with_label_values(&[state]);
        }
        for status in ["completed", "failed", "cancelled"] {
            metrics
                .instances_finished_total
                .with_label_values(&[status]);
        }
        for collector in collectors {
            metrics.registry.register(collector).unwrap();
        }
        metrics
    }

    /// Exposes every per-tier series from the start (at zero).
    pub fn init_tiers(&self, tiers: &[String]) {
        for tier in tiers {
            let tier = [tier.as_str()];
            self.task_execution_seconds.with_label_values(&tier);
            self.schedule_to_start_seconds.with_label_values(&tier);
            self.task_retries_total.with_label_values(&tier);
        }
    }

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
