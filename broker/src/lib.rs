//! The only module that talks AMQP: tier queues on RabbitMQ.
//!
//! One durable quorum queue per tier, persistent messages, publisher confirms
//! (pipelined per batch), manual acks with a bounded prefetch, a delivery
//! limit, and a dead-letter queue for messages that exceed it.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use ward_shared::wire::TaskMessage;

/// Broker errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("broker refused {count} of {total} messages")]
    Nacked { count: usize, total: usize },
    #[error("the consumer was closed by the broker")]
    Closed,
    /// A coalesced ack failed; each delivery it covered gets its message.
    #[error("ack: {0}")]
    Ack(String),
    #[error("encode task message: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the broker did not answer {what} within {timeout_ms} ms")]
    Timeout { what: &'static str, timeout_ms: u64 },
}

/// True when the broker refused a declaration because the queue exists
/// with other arguments (AMQP 406 PRECONDITION_FAILED).
fn precondition_failed(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(amqp) if matches!(
            amqp.kind(),
            lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::PRECONDITIONFAILED)
        )
    )
}

/// Bound on connecting (TCP, AMQP handshake, channel, confirm mode) and on
/// declaring or consuming: a broker that accepts connections while it is
/// still starting (or is stalled) must not hang the caller.
pub const OPERATION_TIMEOUT_MS: u64 = 10_000;

async fn bounded<T>(
    what: &'static str,
    operation: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(
        std::time::Duration::from_millis(OPERATION_TIMEOUT_MS),
        operation,
    )
    .await
    .map_err(|_| Error::Timeout {
        what,
        timeout_ms: OPERATION_TIMEOUT_MS,
    })?
}

/// Where the broker is and how queues are named and bounded.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `amqp://user:password@host:port/vhost`
    pub url: String,
    /// Prepended to every queue name (one per test; empty in production).
    pub queue_prefix: String,
    /// Deliveries of one message before it is dead-lettered.
    pub delivery_limit: u32,
}

/// A connection with a publishing channel in confirm mode.
pub struct Broker {
    connection: Connection,
    channel: Channel,
    settings: Settings,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("queue_prefix", &self.settings.queue_prefix)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Broker {
    /// Connects and opens a publishing channel with confirms enabled.
    pub async fn connect(settings: &Settings) -> Result<Broker, Error> {
        bounded("the connection", async {
            let connection =
                Connection::connect(&settings.url, ConnectionProperties::default()).await?;
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok(Broker {
                connection,
                channel,
                settings: settings.clone(),
            })
        })
        .await
    }

    /// True while the connection and the publishing channel are open.
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    /// The queue that carries a tier's tasks.
    pub fn tier_queue(&self, tier: &str) -> String {
        tier_queue(&self.settings.queue_prefix, tier)
    }

    /// The queue that receives messages past the delivery limit.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}ward.dead", self.settings.queue_prefix)
    }

    /// Declares the dead-letter queue and one quorum queue per tier.
    pub async fn declare(&self, tiers: &[String]) -> Result<(), Error> {
        bounded("the queue declarations", self.declare_unbounded(tiers)).await
    }

    async fn declare_unbounded(&self, tiers: &[String]) -> Result<(), Error> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let mut dead_arguments = FieldTable::default();
        dead_arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        self.channel
            .queue_declare(
                self.dead_letter_queue().as_str().into(),
                durable,
                dead_arguments,
            )
            .await?;
        for tier in tiers {
            let mut arguments = FieldTable::default();
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
            arguments.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongInt(i32::try_from(self.settings.delivery_limit).unwrap_or(i32::MAX)),
            );
            arguments.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString("".into()),
            );
            arguments.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(self.dead_letter_queue().as_str().into()),
            );
            // On a channel of its own: a refused declaration closes its
            // channel, and the publishing one must outlive it.
            let queue = self.tier_queue(tier);
            let channel = self.connection.create_channel().await?;
            match channel
                .queue_declare(queue.as_str().into(), durable, arguments)
                .await
            {
                Ok(_) => {
                    let _ = channel.close(200, "declared".into()).await;
                }
                Err(error) if precondition_failed(&error) => {
                    // The queue exists with other arguments: a changed
                    // `amqp.delivery_limit` (RabbitMQ never changes a queue's
                    // arguments). Use it as it is rather than stop.
                    let channel = self.connection.create_channel().await?;
                    channel
                        .queue_declare(
                            queue.as_str().into(),
                            QueueDeclareOptions {
                                passive: true,
                                ..QueueDeclareOptions::default()
                            },
                            FieldTable::default(),
                        )
                        .await?;
                    let _ = channel.close(200, "declared".into()).await;
                    tracing::warn!(
                        %queue,
                        delivery_limit = self.settings.delivery_limit,
                        "the queue exists with other arguments (such as another amqp.delivery_limit); \
                         it keeps its own until it is deleted, empty, and declared again"
                    );
                }
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    /// Publishes every message persistently to its tier queue, then waits for
    /// all confirms together. Ok only when the broker confirmed every one.
    pub async fn publish(&self, messages: &[(&str, &TaskMessage)]) -> Result<(), Error> {
        let mut confirms = Vec::with_capacity(messages.len());
        for (tier, message) in messages {
            let body = serde_json::to_vec(message)?;
            let mut properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(message.task_run_id.to_string().as_str().into());
            if let Some(trace_parent) = &message.trace_parent {
                let mut headers = FieldTable::default();
                headers.insert(
                    "traceparent".into(),
                    AMQPValue::LongString(trace_parent.as_str().into()),
                );
                properties = properties.with_headers(headers);
            }
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    self.tier_queue(tier).as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await?;
            confirms.push(confirm);
        }
        let total = confirms.len();
        let mut count = 0;
        for confirmation in futures::future::join_all(confirms).await {
            if !confirmation?.is_ack() {
                count += 1;
            }
        }
        if count > 0 {
            return Err(Error::Nacked { count, total });
        }
        Ok(())
    }

    /// Starts consuming a tier queue on its own channel with at most
    /// `prefetch` unacked deliveries.
    pub async fn consume(
        &self,
        tier: &str,
        prefetch: u16,
        consumer_tag: &str,
    ) -> Result<Inbox, Error> {
        self.consume_queue(&self.tier_queue(tier), prefetch, consumer_tag)
            .await
    }

    /// Starts consuming the dead-letter queue (see `consume`).
    pub async fn consume_dead_letters(
        &self,
        prefetch: u16,
        consumer_tag: &str,
    ) -> Result<Inbox, Error> {
        self.consume_queue(&self.dead_letter_queue(), prefetch, consumer_tag)
            .await
    }

    async fn consume_queue(
        &self,
        queue: &str,
        prefetch: u16,
        consumer_tag: &str,
    ) -> Result<Inbox, Error> {
        bounded(
            "the consume request",
            self.consume_unbounded(queue, prefetch, consumer_tag),
        )
        .await
    }

    async fn consume_unbounded(
        &self,
        queue: &str,
        prefetch: u16,
        consumer_tag: &str,
    ) -> Result<Inbox, Error> {
        let channel = self.connection.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                consumer_tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Inbox {
            consumer,
            channel,
            consumer_tag: consumer_tag.to_owned(),
        })
    }

    /// Number of messages ready in a queue (a passive declare).
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, Error> {
        let channel = self.connection.create_channel().await?;
        let queue = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let depth = queue.message_count();
        let _ = bounded("the close", async {
            Ok(channel.close(200, "done".into()).await?)
        })
        .await;
        Ok(depth)
    }

    /// Deletes the tier queues and the dead-letter queue (test teardown).
    pub async fn delete(&self, tiers: &[String]) -> Result<(), Error> {
        for queue in tiers
            .iter()
            .map(|tier| self.tier_queue(tier))
            .chain([self.dead_letter_queue()])
        {
            self.channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        Ok(())
    }

    /// Publishes raw bytes to a tier queue with a confirm (tests use this to
    /// simulate redelivery and malformed messages).
    pub async fn publish_raw(&self, tier: &str, body: &[u8]) -> Result<(), Error> {
        let confirmation = self
            .channel
            .basic_publish(
                "".into(),
                self.tier_queue(tier).as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
        if !confirmation.is_ack() {
            return Err(Error::Nacked { count: 1, total: 1 });
        }
        Ok(())
    }

    /// Closes the connection.
    pub async fn close(&self) {
        let _ = bounded("the close", async {
            Ok(self.connection.close(200, "shutdown".into()).await?)
        })
        .await;
    }
}

/// The queue name of a tier under a prefix.
pub fn tier_queue(queue_prefix: &str, tier: &str) -> String {
    format!("{queue_prefix}ward.tier.{tier}")
}

/// Deliveries from one tier queue.
pub struct Inbox {
    consumer: lapin::Consumer,
    channel: Channel,
    consumer_tag: String,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("consumer_tag", &self.consumer_tag)
            .finish()
    }
}

impl Inbox {
    /// Settles this inbox's deliveries by tag (see `Settle`).
    pub fn settle(&self) -> Settle {
        Settle {
            channel: self.channel.clone(),
        }
    }

    /// Stops new deliveries; those already received can still be acked.
    pub async fn cancel(&self) -> Result<(), Error> {
        self.channel
            .basic_cancel(
                self.consumer_tag.as_str().into(),
                BasicCancelOptions::default(),
            )
            .await?;
        Ok(())
    }

    /// Closes the channel; unacked deliveries go back to the queue.
    pub async fn close(&self) {
        let _ = bounded("the close", async {
            Ok(self.channel.close(200, "shutdown".into()).await?)
        })
        .await;
    }
}

impl Stream for Inbox {
    type Item = Result<Delivery, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.consumer
            .poll_next_unpin(cx)
            .map(|item| item.map(|result| result.map(Delivery).map_err(Error::from)))
    }
}

/// Settles an inbox's deliveries by their tags, for a caller that
/// coalesces acks: one `basic.ack` with `multiple` set settles every
/// delivery of the channel up to its tag not settled yet. A caller that
/// settles through this must settle every delivery of the inbox through it
/// (never with `Delivery::ack` and the like as well), because frames keep
/// their order only on one path: each call here queues its frame before it
/// first yields, in call order.
#[derive(Clone, Debug)]
pub struct Settle {
    channel: Channel,
}

impl Settle {
    /// Acks `tag`, and with `through` every earlier unsettled tag too.
    pub async fn ack(&self, tag: u64, through: bool) -> Result<(), Error> {
        self.channel
            .basic_ack(tag, BasicAckOptions { multiple: through })
            .await?;
        Ok(())
    }

    /// Hands `tag`'s message back (`requeue`) or dead-letters it.
    pub async fn nack(&self, tag: u64, requeue: bool) -> Result<(), Error> {
        self.channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    requeue,
                    multiple: false,
                },
            )
            .await?;
        Ok(())
    }
}

/// One delivery; settle it exactly once with `ack`, `requeue` or `reject`.
pub struct Delivery(lapin::message::Delivery);

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("delivery_tag", &self.0.delivery_tag)
            .field("redelivered", &self.0.redelivered)
            .finish()
    }
}

impl Delivery {
    pub fn body(&self) -> &[u8] {
        &self.0.data
    }

    pub fn redelivered(&self) -> bool {
        self.0.redelivered
    }

    /// Why the broker dead-lettered this message (`x-first-death-reason`:
    /// `delivery_limit`, `rejected`, `expired`), if it did.
    pub fn death_reason(&self) -> Option<String> {
        match self.header("x-first-death-reason")? {
            AMQPValue::LongString(value) => Some(value.to_string()),
            AMQPValue::ShortString(value) => Some(value.as_str().to_owned()),
            _ => None,
        }
    }

    /// The W3C `traceparent` header of the message, if it has one.
    pub fn trace_parent(&self) -> Option<String> {
        match self.header("traceparent")? {
            AMQPValue::LongString(value) => Some(value.to_string()),
            AMQPValue::ShortString(value) => Some(value.as_str().to_owned()),
            _ => None,
        }
    }

    /// Deliveries the broker counted before this one (`x-delivery-count` of
    /// a quorum queue), if it said.
    pub fn delivery_count(&self) -> Option<i64> {
        match self.header("x-delivery-count")? {
            AMQPValue::LongLongInt(value) => Some(*value),
            AMQPValue::LongInt(value) => Some(i64::from(*value)),
            AMQPValue::LongUInt(value) => Some(i64::from(*value)),
            AMQPValue::ShortInt(value) => Some(i64::from(*value)),
            AMQPValue::ShortShortInt(value) => Some(i64::from(*value)),
            AMQPValue::Timestamp(value) => i64::try_from(*value).ok(),
            _ => None,
        }
    }

    /// A header of the message, when it has one.
    pub fn header(&self, name: &str) -> Option<&AMQPValue> {
        self.0.properties.headers().as_ref()?.inner().get(name)
    }

    /// The work is committed; the broker may forget the message.
    pub async fn ack(&self) -> Result<(), Error> {
        self.0.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    /// This delivery's tag on its channel (increasing in delivery order).
    pub fn tag(&self) -> u64 {
        self.0.delivery_tag
    }

    /// Hand the message back for another delivery.
    pub async fn requeue(&self) -> Result<(), Error> {
        self.0
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await?;
        Ok(())
    }

    /// The message can never be processed: dead-letter it.
    pub async fn reject(&self) -> Result<(), Error> {
        self.0
            .nack(BasicNackOptions {
                requeue: false,
                ..BasicNackOptions::default()
            })
            .await?;
        Ok(())
    }
}
