//! Group commit: the results of deliveries that finish close together are
//! committed in one transaction (`Store::complete_tasks`), by a bounded
//! number of committers, so a busy worker pays one commit for many tasks and
//! the branches of a fan-out stop queueing on their instance's row lock.
//!
//! Nothing is held between messages: a result waits here only until its
//! transaction commits, then its delivery is acked by the task that ran it.
//! A batch commits as soon as a committer is free (no added wait): batches
//! grow only while the committers are busy.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use ward_store::{Completion, Store, TaskResult};

use crate::metrics::Metrics;

/// Why a result was not committed; the caller retries or hands back.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Store(#[from] ward_store::Error),
    #[error("the committers have stopped")]
    Stopped,
}

/// Group commits a result may sit out (its instance locked by another
/// transaction) before it is committed waiting for the lock (with the
/// other stragglers of its batch, or alone).
const DEFERRALS_MAX: u32 = 2;

/// One result waiting for its commit.
struct Pending {
    result: TaskResult,
    answer: oneshot::Sender<Result<Completion, CommitError>>,
    deferrals: u32,
}

/// Hands results to the committers; cheap to clone.
#[derive(Clone)]
pub struct Committer {
    queues: Arc<Vec<mpsc::Sender<Pending>>>,
}

impl Committer {
    /// Starts `committers` commit loops taking up to `batch_len_max` results
    /// per transaction. The results of one instance always go to the same
    /// loop, so a fan-out's branches meet in one transaction instead of
    /// queueing on their instance's row lock. The loops end when every
    /// `Committer` clone is dropped, after committing what was queued.
    pub fn start(
        store: Store,
        metrics: Metrics,
        committers: usize,
        batch_len_max: usize,
        queue_len_max: usize,
    ) -> Committer {
        let committers = committers.max(1);
        let mut queues = Vec::with_capacity(committers);
        for _ in 0..committers {
            let (queue, receiver) = mpsc::channel((queue_len_max / committers).max(1));
            queues.push(queue);
            tokio::spawn(commit_loop(
                store.clone(),
                metrics.clone(),
                receiver,
                batch_len_max.max(1),
            ));
        }
        Committer {
            queues: Arc::new(queues),
        }
    }

    /// Commits `result` (with others, when some are waiting) and answers
    /// what the commit did.
    pub async fn commit(&self, result: TaskResult) -> Result<Completion, CommitError> {
        let (answer, answered) = oneshot::channel();
        let index = (result.instance_id.as_u128() % self.queues.len() as u128) as usize;
        let pending = Pending {
            result,
            answer,
            deferrals: 0,
        };
        if self.queues[index].send(pending).await.is_err() {
            return Err(CommitError::Stopped);
        }
        answered.await.unwrap_or(Err(CommitError::Stopped))
    }
}

async fn commit_loop(
    store: Store,
    metrics: Metrics,
    mut receiver: mpsc::Receiver<Pending>,
    batch_len_max: usize,
) {
    let mut carried: Vec<Pending> = Vec::new();
    loop {
        let mut batch = std::mem::take(&mut carried);
        if batch.is_empty() {
            if receiver.recv_many(&mut batch, batch_len_max).await == 0 {
                return;
            }
        } else {
            while batch.len() < batch_len_max {
                match receiver.try_recv() {
                    Ok(pending) => batch.push(pending),
                    Err(_) => break,
                }
            }
        }
        metrics.commit_batch_len.observe(batch.len() as f64);
        let (results, waiters): (Vec<TaskResult>, Vec<_>) = batch
            .into_iter()
            .map(|pending| (pending.result, (pending.answer, pending.deferrals)))
            .unzip();
        if results.len() == 1 {
            commit_alone(&store, results, waiters).await;
            continue;
        }
        match store.complete_tasks(&results).await {
            Ok(completions) => {
                let mut alone = (Vec::new(), Vec::new());
                for ((result, (answer, deferrals)), completion) in
                    results.into_iter().zip(waiters).zip(completions)
                {
                    match completion {
                        Some(completion) => {
                            let _ = answer.send(Ok(completion));
                        }
                        None if deferrals + 1 < DEFERRALS_MAX => carried.push(Pending {
                            result,
                            answer,
                            deferrals: deferrals + 1,
                        }),
                        None => {
                            alone.0.push(result);
                            alone.1.push((answer, deferrals));
                        }
                    }
                }
                commit_waiting(&store, alone.0, alone.1).await;
            }
            Err(error) => {
                // Nothing of the batch was written: commit each on its own,
                // so one result at fault fails alone.
                tracing::debug!(%error, len = results.len(), "group commit failed; committing one by one");
                commit_alone(&store, results, waiters).await;
            }
        }
    }
}

/// Commits results whose instances were busy in one transaction that waits
/// for their locks; each result it cannot answer (or all, if it fails) is
/// committed alone.
async fn commit_waiting(
    store: &Store,
    results: Vec<TaskResult>,
    waiters: Vec<(oneshot::Sender<Result<Completion, CommitError>>, u32)>,
) {
    if results.len() < 2 {
        return commit_alone(store, results, waiters).await;
    }
    match store.complete_tasks_waiting(&results).await {
        Ok(completions) => {
            let mut alone = (Vec::new(), Vec::new());
            for ((result, waiter), completion) in results.into_iter().zip(waiters).zip(completions)
            {
                match completion {
                    Some(completion) => {
                        let _ = waiter.0.send(Ok(completion));
                    }
                    None => {
                        alone.0.push(result);
                        alone.1.push(waiter);
                    }
                }
            }
            commit_alone(store, alone.0, alone.1).await;
        }
        Err(error) => {
            tracing::debug!(%error, len = results.len(), "waiting group commit failed; committing one by one");
            commit_alone(store, results, waiters).await;
        }
    }
}

/// Commits each result in its own transaction, waiting for its instance's
/// lock (one waiting result, a result skipped too often, or a group whose
/// transaction failed).
async fn commit_alone(
    store: &Store,
    results: Vec<TaskResult>,
    waiters: Vec<(oneshot::Sender<Result<Completion, CommitError>>, u32)>,
) {
    for (result, (answer, _)) in results.iter().zip(waiters) {
        let completion = store.complete_task(result).await;
        let _ = answer.send(completion.map_err(CommitError::from));
    }
}
