//! Group commit of the API's single starts: `POST /v1/instances` requests
//! that arrive together are written in one transaction
//! (`Store::start_instances_of`) by a bounded number of committers, so a
//! busy master pays one commit for many starts. A request waits only while
//! every committer is busy (no added delay when idle), and is answered after
//! its transaction commits: nothing is acknowledged before it is durable.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{mpsc, oneshot};
use ward_store::{StartItem, Started, Store};

/// Concurrent start transactions.
pub const START_COMMITTERS: usize = 4;
/// Most starts in one transaction.
pub const START_BATCH_LEN_MAX: usize = 64;
/// Starts queued per committer before a request waits to queue.
const START_QUEUE_LEN_MAX: usize = 256;

struct Pending {
    item: StartItem,
    answer: oneshot::Sender<Result<Started, ward_store::Error>>,
}

/// Hands starts to the committers; cheap to clone.
#[derive(Clone)]
pub struct StartCommitter {
    queues: Arc<Vec<mpsc::Sender<Pending>>>,
    next: Arc<AtomicUsize>,
}

impl StartCommitter {
    /// Starts the commit loops; they end when every clone is dropped.
    pub fn spawn(store: Store) -> StartCommitter {
        let mut queues = Vec::with_capacity(START_COMMITTERS);
        for _ in 0..START_COMMITTERS {
            let (queue, receiver) = mpsc::channel(START_QUEUE_LEN_MAX);
            queues.push(queue);
            tokio::spawn(commit_loop(store.clone(), receiver));
        }
        StartCommitter {
            queues: Arc::new(queues),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Starts one instance, with others when some are waiting; answers
    /// once its transaction committed.
    pub async fn submit(&self, item: StartItem) -> Result<Started, ward_store::Error> {
        let (answer, answered) = oneshot::channel();
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len();
        let stopping = || {
            ward_store::Error::Unavailable(
                "the master is shutting down; retry on another master".into(),
            )
        };
        if self.queues[index]
            .send(Pending { item, answer })
            .await
            .is_err()
        {
            return Err(stopping());
        }
        answered.await.unwrap_or_else(|_| Err(stopping()))
    }
}

async fn commit_loop(store: Store, mut receiver: mpsc::Receiver<Pending>) {
    let mut batch = Vec::with_capacity(START_BATCH_LEN_MAX);
    while receiver.recv_many(&mut batch, START_BATCH_LEN_MAX).await > 0 {
        let (items, answers): (Vec<StartItem>, Vec<_>) = batch
            .drain(..)
            .map(|pending| (pending.item, pending.answer))
            .unzip();
        if items.len() == 1 {
            start_alone(&store, &items, answers).await;
            continue;
        }
        match store.start_instances_of(&items).await {
            Ok(started) => {
                for (answer, started) in answers.into_iter().zip(started) {
                    let _ = answer.send(started);
                }
            }
            Err(error) => {
                tracing::debug!(%error, len = items.len(), "group start failed; starting one by one");
                start_alone(&store, &items, answers).await;
            }
        }
    }
}

/// Starts each item in its own transaction (one waiting start, or a group
/// whose transaction failed: the item at fault then fails alone).
async fn start_alone(
    store: &Store,
    items: &[StartItem],
    answers: Vec<oneshot::Sender<Result<Started, ward_store::Error>>>,
) {
    for (item, answer) in items.iter().zip(answers) {
        let started = store
            .start_instance(&item.tenant, &item.request, item.idempotency_key.as_deref())
            .await;
        let _ = answer.send(started);
    }
}
