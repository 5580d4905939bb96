//! Worker metrics: names are constants here; labels come from closed sets.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

pub const TASKS_EXECUTED_TOTAL: &str = "ward_tasks_executed_total";
pub const TASK_COMMITS_TOTAL: &str = "ward_task_commits_total";
pub const TASK_EXECUTION_SECONDS: &str = "ward_task_execution_seconds";
pub const DELIVERIES_REJECTED_TOTAL: &str = "ward_deliveries_rejected_total";
pub const TASKS_IN_FLIGHT: &str = "ward_tasks_in_flight";

/// The worker's metrics, in its own registry.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// By `outcome`: succeeded, failed.
    pub tasks_executed_total: IntCounterVec,
    /// By `result`: applied, duplicate, unknown, handed_back.
    pub task_commits_total: IntCounterVec,
    pub task_execution_seconds: Histogram,
    /// By `reason`: malformed.
    pub deliveries_rejected_total: IntCounterVec,
    pub tasks_in_flight: IntGauge,
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
            task_execution_seconds: Histogram::with_opts(
                HistogramOpts::new(TASK_EXECUTION_SECONDS, "Handler run time.").buckets(vec![
                    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0,
                ]),
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
            tasks_in_flight: IntGauge::new(TASKS_IN_FLIGHT, "Deliveries being handled now.")
                .unwrap(),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.tasks_executed_total.clone()),
            Box::new(metrics.task_commits_total.clone()),
            Box::new(metrics.task_execution_seconds.clone()),
            Box::new(metrics.deliveries_rejected_total.clone()),
            Box::new(metrics.tasks_in_flight.clone()),
        ];
        for collector in collectors {
            metrics.registry.register(collector).unwrap();
        }
        metrics
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
