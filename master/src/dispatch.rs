//! The leader's dispatcher: moves ready tasks from Postgres to the tier
//! queues in bounded batches, woken by LISTEN/NOTIFY or a poll interval.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use ward_broker::Broker;
use ward_store::{Listener, Store};

use crate::config::Config;
use crate::metrics::Metrics;

/// How often the leader refreshes the backlog gauge.
const BACKLOG_REFRESH_MS: u64 = 5_000;
/// Backoff after a broker or store failure.
const FAILURE_DELAY_MS: u64 = 500;

/// Dispatches until `term_over` is cancelled; cancels it itself when the
/// store reports this epoch fenced.
pub async fn run(
    config: Arc<Config>,
    store: Store,
    metrics: Metrics,
    epoch: i64,
    term_over: CancellationToken,
) {
    let db_settings = crate::store_settings(&config);
    let broker_settings = crate::broker_settings(&config);
    let wake = Arc::new(Notify::new());
    let mut listener: Option<Listener> = None;
    let mut broker: Option<Broker> = None;
    let mut backlog_refreshed_at: Option<Instant> = None;
    let publish_timeout = Duration::from_millis(config.amqp.publish_timeout_ms);
    while !term_over.is_cancelled() {
        if listener.as_ref().is_none_or(Listener::is_closed) {
            listener = Listener::start(&db_settings, wake.clone())
                .await
                .inspect_err(|error| tracing::debug!(%error, "listen failed; polling"))
                .ok();
        }
        if broker.as_ref().is_none_or(|broker| !broker.is_connected()) {
            broker = connect_broker(&broker_settings, &config.tiers).await;
        }
        let mut failed = broker.is_none();
        if let Some(connected) = &broker {
            loop {
                let started_at = Instant::now();
                let dispatched_total = &metrics.tasks_dispatched_total;
                let result = store
                    .dispatch_ready(epoch, config.dispatch.batch_len_max, |tasks| async move {
                        let messages: Vec<(&str, &ward_shared::wire::TaskMessage)> = tasks
                            .iter()
                            .map(|task| (task.tier.as_str(), &task.message))
                            .collect();
                        match tokio::time::timeout(publish_timeout, connected.publish(&messages))
                            .await
                        {
                            Ok(Ok(())) => {
                                for task in &tasks {
                                    dispatched_total
                                        .with_label_values(&[task.tier.as_str()])
                                        .inc();
                                }
                                Ok(())
                            }
                            Ok(Err(error)) => Err(error.to_string()),
                            Err(_) => Err("publisher confirms timed out".to_owned()),
                        }
                    })
                    .await;
                match result {
                    Ok(count) => {
                        if count > 0 {
                            metrics
                                .dispatch_batch_seconds
                                .observe(started_at.elapsed().as_secs_f64());
                        }
                        if i64::try_from(count).unwrap_or(i64::MAX) < config.dispatch.batch_len_max
                        {
                            break;
                        }
                    }
                    Err(ward_store::Error::Fenced {
                        epoch,
                        epoch_current,
                    }) => {
                        metrics
                            .dispatch_errors_total
                            .with_label_values(&["fenced"])
                            .inc();
                        tracing::error!(
                            epoch,
                            epoch_current,
                            "fenced: a newer leader exists; stopping dispatch"
                        );
                        term_over.cancel();
                        return;
                    }
                    Err(ward_store::Error::Publish(error)) => {
                        metrics
                            .dispatch_errors_total
                            .with_label_values(&["broker"])
                            .inc();
                        tracing::warn!(%error, "publish failed; reconnecting to the broker");
                        failed = true;
                        break;
                    }
                    Err(error) => {
                        metrics
                            .dispatch_errors_total
                            .with_label_values(&["store"])
                            .inc();
                        tracing::warn!(%error, "dispatch failed");
                        failed = true;
                        break;
                    }
                }
                if term_over.is_cancelled() {
                    break;
                }
            }
        }
        if failed {
            if let Some(broken) = broker.take_if(|broker| !broker.is_connected()) {
                broken.close().await;
            }
        }
        if backlog_refreshed_at
            .is_none_or(|at| at.elapsed() >= Duration::from_millis(BACKLOG_REFRESH_MS))
        {
            refresh_backlog(&store, &metrics, &config.tiers).await;
            backlog_refreshed_at = Some(Instant::now());
        }
        let pause = if failed {
            FAILURE_DELAY_MS
        } else {
            config.dispatch.poll_ms
        };
        tokio::select! {
            () = term_over.cancelled() => break,
            () = wake.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(pause)) => {}
        }
    }
    if let Some(broker) = broker {
        broker.close().await;
    }
}

async fn connect_broker(settings: &ward_broker::Settings, tiers: &[String]) -> Option<Broker> {
    let broker = match Broker::connect(settings).await {
        Ok(broker) => broker,
        Err(error) => {
            tracing::warn!(%error, "broker unreachable");
            return None;
        }
    };
    match broker.declare(tiers).await {
        Ok(()) => Some(broker),
        Err(error) => {
            tracing::warn!(%error, "declare queues failed");
            broker.close().await;
            None
        }
    }
}

async fn refresh_backlog(store: &Store, metrics: &Metrics, tiers: &[String]) {
    match store.ready_backlog().await {
        Ok(backlog) => {
            for tier in tiers {
                let count = backlog
                    .iter()
                    .find(|(name, _)| name == tier)
                    .map(|(_, count)| *count)
                    .unwrap_or(0);
                metrics
                    .ready_backlog
                    .with_label_values(&[tier.as_str()])
                    .set(count);
            }
        }
        Err(error) => tracing::debug!(%error, "backlog refresh failed"),
    }
}
