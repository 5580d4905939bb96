//! Coalesced acks: a channel's committed deliveries are acked by one task,
//! a run of consecutive delivery tags in one `basic.ack` with `multiple`.
//!
//! Each ack of a quorum queue's delivery is a Raft command the broker
//! writes; acked one by one, they cost RabbitMQ about a third of its CPU
//! per task (`bench/results`). A delivery is still acked only after its
//! own result committed: the run acked "through" a tag holds only tags
//! whose results committed or that were already handed back or rejected,
//! and a tag still running stops it. A committed tag behind a running one
//! (a long handler, a straggler's commit) is acked alone at once, so it
//! never waits on another delivery and never holds a prefetch slot longer.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, oneshot};
use ward_broker::Settle;

use crate::metrics::Metrics;

/// A tag's state: running (no sender yet) or committed and waiting for its
/// ack (the sender answers the waiting delivery task).
type Waiter = Option<oneshot::Sender<Result<(), ward_broker::Error>>>;

struct Shared {
    settle: Settle,
    /// Unsettled tags of the channel, in delivery order.
    open: Mutex<BTreeMap<u64, Waiter>>,
    wake: Notify,
}

/// The acks of one inbox (one channel); its flushing task ends when this
/// is dropped.
pub struct Acks {
    shared: Arc<Shared>,
    flusher: tokio::task::JoinHandle<()>,
}

impl Drop for Acks {
    fn drop(&mut self) {
        self.flusher.abort();
        // Deliveries waiting for their acks, and any that ask later, get an
        // error at once (their senders go with the map, and a tag not in it
        // is answered with one): their channel is gone, so the broker hands
        // their messages back anyway.
        std::mem::take(&mut *lock(&self.shared.open));
    }
}

impl Acks {
    /// Starts the flushing task of `settle`'s channel.
    pub fn new(settle: Settle, metrics: Metrics) -> Acks {
        let shared = Arc::new(Shared {
            settle,
            open: Mutex::new(BTreeMap::new()),
            wake: Notify::new(),
        });
        let flusher = tokio::spawn(flush(shared.clone(), metrics));
        Acks { shared, flusher }
    }

    /// Registers a delivery as it arrives (before anything can settle it),
    /// so no run of acks passes over it while it runs.
    pub fn received(&self, tag: u64) -> AckHandle {
        lock(&self.shared.open).insert(tag, None);
        AckHandle {
            shared: self.shared.clone(),
            tag,
        }
    }
}

/// One delivery's way to settle; settle exactly once. A handle dropped
/// unsettled keeps its tag open for good: no run of acks passes over it (its
/// message comes back when the channel closes), and the committed tags
/// behind it are acked alone.
pub struct AckHandle {
    shared: Arc<Shared>,
    tag: u64,
}

impl AckHandle {
    /// Its result committed: waits until its ack (alone or in a run) went
    /// out.
    pub async fn ack(&self) -> Result<(), ward_broker::Error> {
        let (sender, receiver) = oneshot::channel();
        match lock(&self.shared.open).get_mut(&self.tag) {
            Some(waiter @ None) => *waiter = Some(sender),
            // No longer open (settled, or its channel gone): nothing is sent.
            _ => return Err(ward_broker::Error::Closed),
        }
        self.shared.wake.notify_one();
        receiver.await.unwrap_or(Err(ward_broker::Error::Closed))
    }

    /// Hands the message back (`requeue`) or dead-letters it. The tag stays
    /// open until the nack went out (for good if it failed), so no ack run
    /// can cover it first. A tag no longer running (settled, or its channel
    /// gone) sends nothing: a second settlement of a tag would close the
    /// channel.
    pub async fn nack(&self, requeue: bool) -> Result<(), ward_broker::Error> {
        if !matches!(lock(&self.shared.open).get(&self.tag), Some(None)) {
            return Err(ward_broker::Error::Closed);
        }
        self.shared.settle.nack(self.tag, requeue).await?;
        lock(&self.shared.open).remove(&self.tag);
        // Committed tags behind it may now form a run.
        self.shared.wake.notify_one();
        Ok(())
    }
}

fn lock(open: &Mutex<BTreeMap<u64, Waiter>>) -> std::sync::MutexGuard<'_, BTreeMap<u64, Waiter>> {
    // A panic while holding it leaves the map consistent (every change is
    // one insert, remove or assignment), so a poisoned lock is still good.
    open.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Sends the acks: on each wake-up, the run of committed tags at the front
/// as one frame, then any committed tag behind a running one alone.
async fn flush(shared: Arc<Shared>, metrics: Metrics) {
    loop {
        shared.wake.notified().await;
        // Let the other deliveries of the same group commit, woken with the
        // one that woke us, register their acks first.
        tokio::task::yield_now().await;
        // One pass in tag order (`retain` visits keys ascending): committed
        // tags before the first running one form the run, those after it go
        // alone; running tags stay.
        let mut run = Vec::new();
        let mut alone = Vec::new();
        let mut behind_running = false;
        lock(&shared.open).retain(|&tag, waiter| match waiter.take() {
            Some(sender) => {
                if behind_running {
                    alone.push((tag, sender));
                } else {
                    run.push((tag, sender));
                }
                false
            }
            None => {
                behind_running = true;
                true
            }
        });
        if let Some(&(through, _)) = run.last() {
            let multiple = run.len() > 1;
            let sent = shared.settle.ack(through, multiple).await;
            metrics
                .ack_frames_total
                .with_label_values(&[if multiple { "run" } else { "single" }])
                .inc();
            for (_, sender) in run {
                let _ = sender.send(clone_result(&sent));
            }
        }
        for (tag, sender) in alone {
            let sent = shared.settle.ack(tag, false).await;
            metrics
                .ack_frames_total
                .with_label_values(&["single"])
                .inc();
            let _ = sender.send(sent);
        }
    }
}

/// The broker's error is not `Clone`; every waiter of a failed frame gets
/// its message.
fn clone_result(sent: &Result<(), ward_broker::Error>) -> Result<(), ward_broker::Error> {
    match sent {
        Ok(()) => Ok(()),
        Err(error) => Err(ward_broker::Error::Ack(error.to_string())),
    }
}
