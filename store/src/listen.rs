//! LISTEN on the ready channel: wakes the dispatcher when a transaction makes
//! a task ready, so it need not poll tightly (and, on another channel, tells
//! masters that tenants or keys changed).

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::{Error, READY_CHANNEL, Settings};

/// A live LISTEN session. Dropping it stops listening.
#[derive(Debug)]
pub struct Listener {
    _client: tokio_postgres::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    /// Opens a dedicated connection, LISTENs, and on every notification wakes
    /// `notify` (one stored permit for a loop, and every current waiter).
    /// When the connection ends, `notify` is woken once
    /// more and [`Listener::is_closed`] turns true.
    pub async fn start(settings: &Settings, notify: Arc<Notify>) -> Result<Listener, Error> {
        Listener::start_with_payloads(settings, notify, None).await
    }

    /// As [`Listener::start`], and also forwards each notification's payload
    /// (the tenant whose task became ready) to `payloads`, dropping payloads
    /// when the channel is full.
    pub async fn start_with_payloads(
        settings: &Settings,
        notify: Arc<Notify>,
        payloads: Option<tokio::sync::mpsc::Sender<String>>,
    ) -> Result<Listener, Error> {
        Listener::start_on(settings, READY_CHANNEL, notify, payloads).await
    }

    /// As [`Listener::start_with_payloads`], on `channel`: one of this
    /// crate's channel constants (it goes into `LISTEN` as an identifier).
    pub async fn start_on(
        settings: &Settings,
        channel: &str,
        notify: Arc<Notify>,
        payloads: Option<tokio::sync::mpsc::Sender<String>>,
    ) -> Result<Listener, Error> {
        let (client, mut connection) = crate::pg_config(settings)?.connect(NoTls).await?;
        let wake = notify.clone();
        let task = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(notification)) => {
                        if let Some(payloads) = &payloads {
                            let _ = payloads.try_send(notification.payload().to_owned());
                        }
                        wake.notify_one();
                        wake.notify_waiters();
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            wake.notify_one();
        });
        client.batch_execute(&format!("LISTEN {channel}")).await?;
        Ok(Listener {
            _client: client,
            task,
        })
    }

    /// True once the connection has ended; the caller should start a new one.
    pub fn is_closed(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}
