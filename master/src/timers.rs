//! The leader's timer loop: fires due durable timers (retry backoffs,
//! delays, signal timeouts), starts due cron schedules, and returns expired
//! external-task locks to ready. Every write is fenced by the epoch. On a
//! new schema it also asks for the hot tables' first ANALYZE (no data write).

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use ward_store::Store;

use crate::config::Dispatch;
use crate::metrics::Metrics;

/// Backoff after a store failure.
const FAILURE_DELAY_MS: u64 = 500;
/// Rows a hot table holds before its first ANALYZE is asked for: from
/// then on, plans made without statistics cost more than the ANALYZE.
const FIRST_ANALYZE_ROWS_MIN: i64 = 1_000;
/// How often the leader asks, until both hot tables were analyzed once.
const FIRST_ANALYZE_EVERY_MS: u64 = 1_000;
/// The lease check waits at least this many times its last duration: it
/// walks the index entries of runs settled since the last VACUUM, tens of
/// ms under load, and ran every tick.
const LEASE_CHECK_COST_FACTOR: u32 = 10;
/// Longest wait between lease checks (an expired lease is found within it).
const LEASE_CHECK_MS_MAX: u64 = 1_000;

/// How often the leader looks whether a hot table needs the VACUUM that
/// autovacuum will not run (`Store::vacuum_unattended`).
const VACUUM_LOOK_EVERY_MS: u64 = 10_000;
/// A hot table is vacuumed by the leader once this many rows are dead...
const VACUUM_DEAD_ROWS_MIN: i64 = 10_000;
/// ...and this share of its live rows.
const VACUUM_DEAD_SHARE: f64 = 0.02;
/// After a VACUUM the next look waits at least this many times its
/// duration: vacuuming a table of millions of rows takes seconds of a core.
const VACUUM_COST_FACTOR: u32 = 4;
/// After a failed look (say, the login role does not own the tables), the
/// next waits this many times `VACUUM_LOOK_EVERY_MS`.
const VACUUM_FAILED_FACTOR: u32 = 10;

/// The leader's backstop VACUUM, run beside the timers (it takes seconds).
struct Vacuum {
    running: Option<
        tokio::task::JoinHandle<(Duration, Result<ward_store::Vacuumed, ward_store::Error>)>,
    >,
    next_at: Instant,
    /// Whether this term has said that autovacuum is off.
    warned: bool,
}

impl Vacuum {
    /// Collects a finished VACUUM and starts the next when due; never waits.
    fn poll(&mut self, store: &Store) {
        if let Some(handle) = self.running.take_if(|handle| handle.is_finished()) {
            let every = Duration::from_millis(VACUUM_LOOK_EVERY_MS);
            self.next_at = Instant::now() + every;
            match futures::FutureExt::now_or_never(handle) {
                Some(Ok((took, Ok(vacuumed)))) => {
                    if vacuumed.unattended && !self.warned {
                        self.warned = true;
                        tracing::warn!(
                            "autovacuum is off for instances or task_runs: the leader vacuums them itself; turn it on (see docs/operations.md)"
                        );
                    }
                    for table in &vacuumed.tables {
                        tracing::info!(
                            table = %table.table,
                            dead_rows = table.dead,
                            live_rows = table.live,
                            analyzed = table.analyzed,
                            "vacuumed a hot table autovacuum leaves alone"
                        );
                    }
                    if !vacuumed.tables.is_empty() {
                        self.next_at = Instant::now() + every.max(took * VACUUM_COST_FACTOR);
                    }
                }
                Some(Ok((_, Err(error)))) => {
                    tracing::warn!(%error, "backstop VACUUM of the hot tables failed");
                    self.next_at = Instant::now() + every * VACUUM_FAILED_FACTOR;
                }
                Some(Err(_)) | None => {}
            }
        }
        if self.running.is_none() && self.next_at <= Instant::now() {
            let store = store.clone();
            self.running = Some(tokio::spawn(async move {
                let began = Instant::now();
                let result = store
                    .vacuum_unattended(VACUUM_DEAD_ROWS_MIN, VACUUM_DEAD_SHARE)
                    .await;
                (began.elapsed(), result)
            }));
        }
    }
}

/// Runs until `term_over`; cancels it when the store reports this epoch fenced.
pub async fn run(
    store: Store,
    metrics: Metrics,
    settings: Dispatch,
    epoch: i64,
    term_over: CancellationToken,
) {
    let batch_len_max = settings.batch_len_max;
    // When to ask next for the hot tables' first ANALYZE (None: done).
    let mut first_analyze_at = Some(Instant::now());
    // When the next lease check is due.
    let mut lease_check_at = Instant::now();
    let mut vacuum = Vacuum {
        running: None,
        next_at: Instant::now(),
        warned: false,
    };
    while !term_over.is_cancelled() {
        vacuum.poll(&store);
        if first_analyze_at.is_some_and(|at| at <= Instant::now()) {
            first_analyze_at = match store.first_analyze(FIRST_ANALYZE_ROWS_MIN).await {
                Ok(0) => None,
                Ok(_) => Some(Instant::now() + Duration::from_millis(FIRST_ANALYZE_EVERY_MS)),
                Err(error) => {
                    tracing::debug!(%error, "first ANALYZE of the hot tables failed");
                    Some(Instant::now() + Duration::from_millis(FIRST_ANALYZE_EVERY_MS))
                }
            };
        }
        let timer = metrics
            .store_transaction_seconds
            .with_label_values(&["timers"])
            .start_timer();
        let result = async {
            let fired = store.fire_due_timers(epoch, batch_len_max).await?;
            let started = store.fire_due_schedules(epoch, batch_len_max).await?;
            let reaped = store.reap_expired_locks(epoch, batch_len_max).await?;
            let mut expired = ward_store::Fired::default();
            if lease_check_at <= Instant::now() {
                let checked = Instant::now();
                expired = store.expire_leases(epoch, batch_len_max).await?;
                // Not `clamp`: a `timer_poll_ms` over the cap must not panic.
                let spacing = (checked.elapsed() * LEASE_CHECK_COST_FACTOR)
                    .min(Duration::from_millis(LEASE_CHECK_MS_MAX))
                    .max(Duration::from_millis(settings.timer_poll_ms));
                // A full batch: more may have expired; check again at once.
                let full = i64::try_from(expired.count).unwrap_or(i64::MAX) >= batch_len_max;
                lease_check_at = if full {
                    Instant::now()
                } else {
                    checked + spacing
                };
            }
            Ok::<_, ward_store::Error>((fired, started, reaped, expired))
        }
        .await;
        timer.observe_duration();
        let pause_ms = match result {
            Ok((fired, started, reaped, expired)) => {
                metrics.leases_expired_total.inc_by(expired.count as u64);
                metrics.timers_fired_total.inc_by(fired.count as u64);
                metrics.schedule_starts_total.inc_by(started as u64);
                metrics.locks_expired_total.inc_by(reaped);
                for status in fired.ended.iter().chain(&expired.ended) {
                    if crate::metrics::INSTANCE_END_STATES.contains(&status.as_str()) {
                        metrics
                            .instances_finished_total
                            .with_label_values(&[status.as_str()])
                            .inc();
                    }
                }
                let busy =
                    i64::try_from(fired.count.max(started)).unwrap_or(i64::MAX) >= batch_len_max;
                if busy { 0 } else { settings.timer_poll_ms }
            }
            Err(ward_store::Error::Fenced {
                epoch,
                epoch_current,
            }) => {
                tracing::error!(
                    epoch,
                    epoch_current,
                    "fenced: a newer leader exists; stopping timers"
                );
                term_over.cancel();
                break;
            }
            Err(error) => {
                tracing::warn!(%error, "timer loop failed");
                FAILURE_DELAY_MS
            }
        };
        tokio::select! {
            () = term_over.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(pause_ms)) => {}
        }
    }
    // Dropping a VACUUM's connection does not stop it on the server, which
    // finishes it (it blocks no reader or writer); the next leader looks
    // again.
    if let Some(running) = vacuum.running.take() {
        running.abort();
    }
}
