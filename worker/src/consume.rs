//! The consume loop: one connection, a consumer per tier queue, a task per
//! delivery; reconnects with backoff when the broker goes away.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use ward_broker::{Broker, Delivery};

use crate::acks::{AckHandle, Acks};
use ward_shared::trace::TraceParent;
use ward_shared::wire::TaskMessage;
use ward_store::{Completion, Settlement, Store, TaskResult};

use crate::commit::Committer;
use crate::config::Config;
use crate::handler::{Registry, Task};
use crate::metrics::Metrics;

const RECONNECT_DELAY_MS_MIN: u64 = 200;
const RECONNECT_DELAY_MS_MAX: u64 = 5_000;
const COMMIT_RETRY_DELAY_MS: u64 = 100;

/// What the consume loop and every delivery task share.
#[derive(Clone)]
pub struct Context {
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    pub store: Store,
    pub metrics: Metrics,
    pub broker_connected: Arc<AtomicBool>,
    /// Client for `http` steps.
    pub http: reqwest::Client,
    /// Stop taking deliveries.
    pub shutdown: CancellationToken,
    /// Hand back deliveries still running.
    pub hand_back: CancellationToken,
    /// Commits results, several per transaction.
    pub committer: Committer,
}

/// Consumes until shutdown, then waits for in-flight deliveries to settle.
pub async fn run(context: Context) {
    let in_flight = TaskTracker::new();
    let mut reconnect_delay_ms = RECONNECT_DELAY_MS_MIN;
    while !context.shutdown.is_cancelled() {
        match consume_connection(&context, &in_flight).await {
            Ok(()) => reconnect_delay_ms = RECONNECT_DELAY_MS_MIN,
            Err(error) => {
                tracing::warn!(%error, reconnect_delay_ms, "broker connection ended");
                reconnect_delay_ms = (reconnect_delay_ms * 2).min(RECONNECT_DELAY_MS_MAX);
            }
        }
        context.broker_connected.store(false, Ordering::Relaxed);
        tokio::select! {
            () = context.shutdown.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(reconnect_delay_ms)) => {}
        }
    }
    in_flight.close();
    in_flight.wait().await;
}

/// One broker connection's life. Returns Ok at shutdown once in-flight
/// deliveries are settled, Err when the connection fails.
async fn consume_connection(
    context: &Context,
    in_flight: &TaskTracker,
) -> Result<(), ward_broker::Error> {
    let settings = ward_broker::Settings {
        url: context.config.amqp.url.clone(),
        queue_prefix: context.config.amqp.queue_prefix.clone(),
        delivery_limit: context.config.amqp.delivery_limit,
    };
    let broker = Broker::connect(&settings).await?;
    broker.declare(&context.config.tiers).await?;
    let mut inboxes = Vec::with_capacity(context.config.tiers.len());
    for tier in &context.config.tiers {
        let consumer_tag = format!("{}-{tier}", context.config.node_id);
        inboxes.push(
            broker
                .consume(tier, context.config.prefetch, &consumer_tag)
                .await?,
        );
    }
    // Every delivery of an inbox is settled through its `Acks` (never
    // through `Delivery::ack` and the like), which keeps its frames in order.
    let acks: Vec<Acks> = inboxes
        .iter()
        .map(|inbox| Acks::new(inbox.settle(), context.metrics.clone()))
        .collect();
    context.broker_connected.store(true, Ordering::Relaxed);
    let outcome = {
        let mut deliveries = futures::stream::select_all(
            inboxes
                .iter_mut()
                .enumerate()
                .map(|(index, inbox)| inbox.map(move |delivery| (index, delivery))),
        );
        loop {
            tokio::select! {
                () = context.shutdown.cancelled() => break Ok(()),
                next = deliveries.next() => match next {
                    Some((index, Ok(delivery))) => {
                        let ack = acks[index].received(delivery.tag());
                        in_flight.spawn(process(context.clone(), delivery, ack));
                    }
                    Some((_, Err(error))) => break Err(error),
                    None => break Err(ward_broker::Error::Closed),
                },
            }
        }
    };
    if outcome.is_ok() {
        // Stop intake first, then let in-flight deliveries finish and ack.
        for inbox in &inboxes {
            let _ = inbox.cancel().await;
        }
        in_flight.close();
        in_flight.wait().await;
        in_flight.reopen();
    }
    for inbox in &inboxes {
        inbox.close().await;
    }
    drop(acks);
    broker.close().await;
    outcome
}

/// Runs one delivery to its end: handler, commit, ack (or hand-back).
async fn process(context: Context, delivery: Delivery, ack: AckHandle) {
    context.metrics.tasks_in_flight.inc();
    let message: TaskMessage = match serde_json::from_slice::<TaskMessage>(delivery.body()) {
        Ok(mut message) => {
            message.trace_parent = delivery.trace_parent();
            message
        }
        Err(error) => {
            tracing::warn!(%error, "malformed task message; dead-lettering it");
            context
                .metrics
                .deliveries_rejected_total
                .with_label_values(&["malformed"])
                .inc();
            let _ = ack.nack(false).await;
            context.metrics.tasks_in_flight.dec();
            return;
        }
    };
    let trace_id = message
        .trace_parent
        .as_deref()
        .and_then(TraceParent::parse)
        .map(|trace| trace.trace_id)
        .unwrap_or_default();
    let span = tracing::info_span!(
        "task",
        tenant_id = %message.tenant_id,
        instance_id = %message.instance_id,
        task_run_id = %message.task_run_id,
        step_id = %message.step_id,
        trace_id = %trace_id,
    );
    run_task(&context, &ack, &message).instrument(span).await;
    context.metrics.tasks_in_flight.dec();
}

async fn run_task(context: &Context, ack: &AckHandle, message: &TaskMessage) {
    let started_at = chrono::Utc::now();
    let tier = message.tier.as_deref().unwrap_or("unknown");
    if let Some(ready_at) = message.ready_at {
        let waited_s = (started_at - ready_at)
            .num_microseconds()
            .unwrap_or(0)
            .max(0) as f64
            / 1e6;
        context
            .metrics
            .schedule_to_start_seconds
            .with_label_values(&[tier])
            .observe(waited_s);
    }
    let timer = context
        .metrics
        .task_execution_seconds
        .with_label_values(&[tier])
        .start_timer();
    let heartbeats = heartbeat_loop(context, message);
    tokio::pin!(heartbeats);
    let outcome = tokio::select! {
        outcome = execute(context, message) => outcome,
        () = &mut heartbeats => unreachable!("the heartbeat loop never ends"),
        () = context.hand_back.cancelled() => {
            hand_back(context, ack, "shutdown deadline").await;
            return;
        }
    };
    timer.observe_duration();
    let outcome_label = match outcome {
        Settlement::Succeeded(_) => "succeeded",
        _ => "failed",
    };
    context
        .metrics
        .tasks_executed_total
        .with_label_values(&[outcome_label])
        .inc();
    let attempts_max = context.config.commit_attempts_max.max(1);
    for attempt in 1..=attempts_max {
        match context
            .committer
            .commit(TaskResult {
                tenant_id: message.tenant_id,
                instance_id: message.instance_id,
                task_run_id: message.task_run_id,
                settlement: outcome.clone(),
                started_at,
            })
            .await
        {
            Ok(completion) => {
                if let Completion::Applied {
                    instance_status,
                    ended,
                } = &completion
                {
                    if *ended {
                        context
                            .metrics
                            .instances_finished_total
                            .with_label_values(&[instance_status.as_str()])
                            .inc();
                    }
                    if matches!(
                        outcome,
                        Settlement::Failed {
                            retryable: true,
                            ..
                        } | Settlement::TimedOut(_)
                    ) {
                        context
                            .metrics
                            .task_retries_total
                            .with_label_values(&[tier])
                            .inc();
                    }
                }
                let result = match completion {
                    Completion::Applied { .. } => "applied",
                    Completion::Duplicate => "duplicate",
                    Completion::Unknown => "unknown",
                };
                context
                    .metrics
                    .task_commits_total
                    .with_label_values(&[result])
                    .inc();
                if let Err(error) = ack.ack().await {
                    tracing::warn!(%error, "ack failed after commit; the redelivery will be a duplicate");
                }
                return;
            }
            Err(error) if attempt < attempts_max && !context.hand_back.is_cancelled() => {
                tracing::debug!(%error, attempt, "commit failed; retrying");
                tokio::time::sleep(Duration::from_millis(COMMIT_RETRY_DELAY_MS << attempt)).await;
            }
            Err(error) => {
                tracing::warn!(%error, attempt, "commit failed; handing the task back");
                break;
            }
        }
    }
    hand_back(context, ack, "commit failed").await;
}

/// Extends the run's lease every `heartbeat_interval_ms` while its handler
/// runs (it is dropped when the handler ends). Never returns.
async fn heartbeat_loop(context: &Context, message: &TaskMessage) {
    let interval = Duration::from_millis(context.config.heartbeat_interval_ms.max(100));
    let lease_ms = i64::try_from(context.config.heartbeat_lease_ms).unwrap_or(i64::MAX);
    loop {
        tokio::time::sleep(interval).await;
        if let Err(error) = context
            .store
            .heartbeat(message.tenant_id, message.task_run_id, lease_ms)
            .await
        {
            tracing::debug!(%error, "heartbeat failed");
        }
    }
}

async fn hand_back(context: &Context, ack: &AckHandle, reason: &str) {
    context
        .metrics
        .task_commits_total
        .with_label_values(&["handed_back"])
        .inc();
    tracing::info!(reason, "handing the task back to the queue");
    if let Err(error) = ack.nack(true).await {
        tracing::warn!(%error, "requeue failed; the broker redelivers when the channel closes");
    }
}

/// Runs the step (a handler, or an HTTP call) with its timeout, turning
/// panics and timeouts into retryable failures.
async fn execute(context: &Context, message: &TaskMessage) -> Settlement {
    let timeout_ms = message
        .timeout_ms
        .unwrap_or(context.config.handler_timeout_ms);
    let run = match (&message.kind[..], &message.http) {
        ("http", Some(call)) => http_call(context, message, call).boxed(),
        _ => {
            let Some(handler) = context.registry.get(&message.handler) else {
                return Settlement::Failed {
                    error: format!(
                        "no handler `{}` is registered on this worker",
                        message.handler
                    ),
                    retryable: false,
                };
            };
            let task = Task {
                tenant_id: message.tenant_id,
                instance_id: message.instance_id,
                task_run_id: message.task_run_id,
                step_id: message.step_id.clone(),
                attempt: message.attempt,
                idempotency_key: message.idempotency_key.clone(),
                input: message.input.clone(),
                heartbeat: crate::handler::Heartbeat {
                    store: context.store.clone(),
                    tenant_id: message.tenant_id,
                    task_run_id: message.task_run_id,
                    lease_ms: i64::try_from(context.config.heartbeat_lease_ms).unwrap_or(i64::MAX),
                },
            };
            handler.run(task)
        }
    };
    match tokio::time::timeout(
        Duration::from_millis(timeout_ms),
        AssertUnwindSafe(run).catch_unwind(),
    )
    .await
    {
        Ok(Ok(Ok(output))) => Settlement::Succeeded(output),
        Ok(Ok(Err(failure))) => Settlement::Failed {
            error: failure.message,
            retryable: failure.retryable,
        },
        Ok(Err(panic)) => {
            let detail = panic
                .downcast_ref::<&str>()
                .map(|text| (*text).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            Settlement::Failed {
                error: format!("handler panicked: {detail}"),
                retryable: true,
            }
        }
        Err(_) => Settlement::Failed {
            error: format!("timed out after {timeout_ms} ms"),
            retryable: true,
        },
    }
}

/// Largest HTTP answer body a step keeps, in bytes.
const HTTP_BODY_BYTES_MAX: usize = 1024 * 1024;

/// Calls the URL of an `http` step with the step's input as JSON body and
/// its idempotency key. 2xx succeeds; 408, 425, 429, 5xx and transport
/// errors are retryable; other statuses fail the step.
async fn http_call(
    context: &Context,
    message: &TaskMessage,
    call: &ward_shared::wire::HttpCall,
) -> Result<serde_json::Value, crate::Failure> {
    let method = reqwest::Method::from_bytes(call.method.as_bytes())
        .map_err(|_| crate::Failure::terminal(format!("unknown method `{}`", call.method)))?;
    let mut request = context
        .http
        .request(method.clone(), &call.url)
        .header("idempotency-key", &message.idempotency_key)
        .header("x-ward-instance-id", message.instance_id.to_string())
        .header("x-ward-attempt", message.attempt.to_string());
    for (name, value) in &call.headers {
        request = request.header(name, value);
    }
    // The instance's trace continues into the called service.
    if let Some(trace) = message.trace_parent.as_deref().and_then(TraceParent::parse) {
        let span = ward_shared::trace::span_bytes(uuid::Uuid::new_v4().as_bytes());
        request = request.header("traceparent", trace.child(span).header());
    }
    if method != reqwest::Method::GET && method != reqwest::Method::DELETE {
        request = request.json(&message.input);
    }
    let response = request
        .send()
        .await
        .map_err(|error| crate::Failure::new(format!("{} {}: {error}", call.method, call.url)))?;
    let status = response.status();
    let bytes = response.bytes().await.map_err(|error| {
        crate::Failure::new(format!("reading the answer of {}: {error}", call.url))
    })?;
    let body_bytes = &bytes[..bytes.len().min(HTTP_BODY_BYTES_MAX)];
    let body = serde_json::from_slice(body_bytes).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(body_bytes).into_owned())
    });
    if status.is_success() {
        return Ok(serde_json::json!({ "status": status.as_u16(), "body": body }));
    }
    let message = format!(
        "{} {} answered {}: {}",
        call.method,
        call.url,
        status.as_u16(),
        body
    );
    let retryable = status.is_server_error() || [408, 425, 429].contains(&status.as_u16());
    Err(crate::Failure { message, retryable })
}
