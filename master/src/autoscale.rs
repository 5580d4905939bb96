//! The worker-count signal: how many workers each tier needs to keep
//! schedule-to-start under target. A plain function of what the leader
//! measures (backlog, in-flight runs, dispatch rate); the leader exports it
//! as `ward_workers_desired{tier}` for KEDA, an HPA or the local autoscaler.

use serde::{Deserialize, Serialize};

/// Name of the etcd signal holding the leader's `DesiredWorkers`.
pub const DESIRED_WORKERS_SIGNAL: &str = "workers-desired";
/// A published signal older than this is ignored (no leader refreshes it).
pub const DESIRED_WORKERS_STALE_S: i64 = 30;

/// `[autoscale]`: the target and bounds of the signal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Autoscale {
    /// Ready work should start within this.
    pub target_schedule_to_start_ms: u64,
    /// Concurrent tasks one worker runs (its `prefetch`).
    pub worker_slots: u32,
    /// Bounds of the signal, per tier.
    pub workers_min: u32,
    pub workers_max: u32,
}

impl Default for Autoscale {
    fn default() -> Self {
        Autoscale {
            target_schedule_to_start_ms: 1_000,
            worker_slots: 32,
            workers_min: 1,
            workers_max: 20,
        }
    }
}

/// What the leader measured for one tier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TierLoad {
    /// Ready runs waiting in the store.
    pub ready: i64,
    /// Runs dispatched and not yet settled.
    pub in_flight: i64,
    /// Runs dispatched per second over the last interval.
    pub dispatch_rate_per_s: f64,
}

/// Workers needed: the slots busy now (in-flight, by Little's law the
/// arrival rate times the task time) plus the slots that drain the backlog
/// within the target (`ready × task time / target`), divided by the slots of
/// one worker, within `[workers_min, workers_max]`. With no rate measured
/// yet, a task is assumed to take the target itself.
pub fn desired_workers(load: TierLoad, settings: &Autoscale) -> i64 {
    let target_s = (settings.target_schedule_to_start_ms.max(1) as f64) / 1000.0;
    let task_s = if load.dispatch_rate_per_s > 0.0 && load.in_flight > 0 {
        load.in_flight as f64 / load.dispatch_rate_per_s
    } else {
        target_s
    };
    let slots = load.in_flight.max(0) as f64 + load.ready.max(0) as f64 * task_s / target_s;
    let workers = (slots / f64::from(settings.worker_slots.max(1))).ceil() as i64;
    workers.clamp(
        i64::from(settings.workers_min),
        i64::from(settings.workers_max.max(settings.workers_min)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Autoscale {
        Autoscale {
            target_schedule_to_start_ms: 1_000,
            worker_slots: 10,
            workers_min: 1,
            workers_max: 8,
        }
    }

    #[test]
    fn idle_tier_keeps_the_minimum() {
        let load = TierLoad {
            ready: 0,
            in_flight: 0,
            dispatch_rate_per_s: 0.0,
        };
        assert_eq!(desired_workers(load, &settings()), 1);
    }

    #[test]
    fn busy_slots_and_backlog_drained_within_target() {
        // 20 in flight at 40/s: tasks take 0.5 s. 60 ready drained within
        // 1 s need 30 more slots: 50 slots, 5 workers of 10.
        let load = TierLoad {
            ready: 60,
            in_flight: 20,
            dispatch_rate_per_s: 40.0,
        };
        assert_eq!(desired_workers(load, &settings()), 5);
    }

    #[test]
    fn burst_is_capped_at_the_maximum() {
        let load = TierLoad {
            ready: 100_000,
            in_flight: 10,
            dispatch_rate_per_s: 1.0,
        };
        assert_eq!(desired_workers(load, &settings()), 8);
    }

    #[test]
    fn backlog_without_a_measured_rate_assumes_tasks_take_the_target() {
        let load = TierLoad {
            ready: 25,
            in_flight: 0,
            dispatch_rate_per_s: 0.0,
        };
        assert_eq!(desired_workers(load, &settings()), 3);
    }
}
