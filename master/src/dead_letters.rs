//! The dead-letter consumer: records every message the broker dead-lettered
//! (a poison task past the delivery limit, an unreadable message) in the
//! dead-letter table with the reason, and fails the run it carried so its
//! instance ends instead of waiting. Runs on every master; recording is
//! idempotent, so a redelivered dead letter changes nothing.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use ward_shared::wire::TaskMessage;
use ward_store::{DeadLetter, DeadLetterOutcome, Store};

use crate::config::Config;
use crate::metrics::Metrics;

/// Most unacked dead letters held at once.
const PREFETCH: u16 = 16;
/// Backoff bounds between reconnects and after a failed record.
const RETRY_DELAY_MS_MIN: u64 = 250;
const RETRY_DELAY_MS_MAX: u64 = 5_000;

/// Consumes the dead-letter queue until `shutdown`, reconnecting with backoff.
pub async fn run(config: Arc<Config>, store: Store, metrics: Metrics, shutdown: CancellationToken) {
    let settings = crate::broker_settings(&config);
    let tiers = config.tiers.clone();
    let mut retry_delay_ms = RETRY_DELAY_MS_MIN;
    while !shutdown.is_cancelled() {
        if let Some(broker) = crate::dispatch::connect_broker(&settings, &tiers).await {
            let tag = format!("{}-dead-letters", config.node_id);
            match broker.consume_dead_letters(PREFETCH, &tag).await {
                Ok(mut inbox) => {
                    retry_delay_ms = RETRY_DELAY_MS_MIN;
                    loop {
                        let delivery = tokio::select! {
                            () = shutdown.cancelled() => break,
                            delivery = inbox.next() => delivery,
                        };
                        let Some(Ok(delivery)) = delivery else {
                            tracing::warn!("dead-letter consumer lost the broker; reconnecting");
                            break;
                        };
                        if !handle(&store, &metrics, &delivery).await {
                            let _ = delivery.requeue().await;
                            tokio::select! {
                                () = shutdown.cancelled() => break,
                                () = tokio::time::sleep(Duration::from_millis(retry_delay_ms)) => {}
                            }
                            retry_delay_ms = (retry_delay_ms * 2).min(RETRY_DELAY_MS_MAX);
                        } else {
                            retry_delay_ms = RETRY_DELAY_MS_MIN;
                        }
                    }
                    inbox.close().await;
                }
                Err(error) => tracing::warn!(%error, "consume the dead-letter queue"),
            }
            broker.close().await;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(retry_delay_ms)) => {}
        }
        retry_delay_ms = (retry_delay_ms * 2).min(RETRY_DELAY_MS_MAX);
    }
}

/// Records one dead letter and acks it. False when it must be retried (the
/// store was unavailable).
async fn handle(store: &Store, metrics: &Metrics, delivery: &ward_broker::Delivery) -> bool {
    let reason = delivery
        .death_reason()
        .unwrap_or_else(|| "unknown".to_owned());
    let letter = DeadLetter {
        message: serde_json::from_slice::<TaskMessage>(delivery.body()).ok(),
        deliveries: delivery.delivery_count(),
        reason: reason.clone(),
        body: delivery.body().to_vec(),
    };
    let timer = metrics
        .store_transaction_seconds
        .with_label_values(&["dead_letter"])
        .start_timer();
    let recorded = store.record_dead_letter(&letter).await;
    timer.observe_duration();
    match recorded {
        Ok(outcome) => {
            if let DeadLetterOutcome::RunFailed { instance_status } = &outcome {
                if crate::metrics::INSTANCE_END_STATES.contains(&instance_status.as_str()) {
                    metrics
                        .instances_finished_total
                        .with_label_values(&[instance_status.as_str()])
                        .inc();
                }
            }
            if outcome != DeadLetterOutcome::Duplicate {
                metrics
                    .tasks_dead_lettered_total
                    .with_label_values(&[reason_label(&reason)])
                    .inc();
                tracing::warn!(
                    reason,
                    task_run_id = ?letter.message.as_ref().map(|message| message.task_run_id),
                    tenant_id = ?letter.message.as_ref().map(|message| message.tenant_id),
                    ?outcome,
                    "task dead-lettered"
                );
            }
            if let Err(error) = delivery.ack().await {
                tracing::debug!(%error, "ack of a dead letter failed; it will be seen again");
            }
            true
        }
        Err(error) => {
            tracing::warn!(%error, "record a dead letter failed; retrying");
            false
        }
    }
}

/// The metric label of a dead-letter reason: a closed set.
pub fn reason_label(reason: &str) -> &'static str {
    match reason {
        "delivery_limit" => "delivery_limit",
        "rejected" => "rejected",
        "expired" => "expired",
        _ => "other",
    }
}
