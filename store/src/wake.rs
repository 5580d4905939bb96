//! Wake-ups sent after a group commit: the tenants whose runs a commit made
//! ready are notified on `READY_CHANNEL` once it committed, from one
//! background statement per store at a time, instead of by a NOTIFY inside
//! the commit.
//!
//! Why: a transaction that NOTIFYs takes a lock that Postgres holds from
//! before its commit record until after it is flushed, so every notifying
//! commit waited for the one before it to reach the disk. Under load the
//! group commits of starts and results queued on that lock (`Lock:object`
//! in `pg_stat_activity`) instead of sharing a flush. The wake-up's own
//! transaction writes no data and commits without waiting for the flush
//! (`synchronous_commit` off, for that transaction only): a wake-up lost
//! in a crash costs only latency, since the dispatcher also finds ready
//! work by polling and by rebuilding its active tenants.
//!
//! On the leader, whose dispatcher runs in the same process, the wake-up
//! skips Postgres: the dispatcher registers itself (`Store::wake_locally`)
//! and gets the tenants directly, as soon as the commit returned. Only
//! commits on other processes (workers, other masters) go through NOTIFY.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Notify, mpsc};

use crate::{Cached, READY_CHANNEL, Store};

/// Most tenants named by one wake-up; past it, one wake-up without a tenant
/// (the dispatcher then rebuilds its active tenants).
const WAKE_TENANTS_MAX: usize = 4_096;

/// Tenants waiting to be notified, and whether a sender is running.
#[derive(Default)]
pub(crate) struct Wakes {
    state: Mutex<WakeState>,
    /// The dispatcher of this process, while it runs (see `wake_locally`).
    local: Mutex<Option<LocalWake>>,
}

/// A dispatcher in this process: where its notifications' payloads go, and
/// what wakes it (the same two a `Listener` feeds).
#[derive(Clone)]
pub struct LocalWake {
    pub payloads: mpsc::Sender<String>,
    pub notify: Arc<Notify>,
}

#[derive(Default)]
struct WakeState {
    pending: Vec<String>,
    sending: bool,
}

impl Store {
    /// Notifies `tenants` (whose runs a committed transaction made ready) on
    /// `READY_CHANNEL`, soon and in the background. Call only after the
    /// commit: a listener woken earlier would not see the runs.
    pub(crate) fn wake_after_commit(&self, tenants: Vec<String>) {
        if tenants.is_empty() {
            return;
        }
        let local = self
            .wakes
            .local
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let tenants = match local {
            Some(local) => {
                // Those that do not fit the dispatcher's buffer go the long way.
                let rest: Vec<String> = tenants
                    .into_iter()
                    .filter_map(|tenant| local.payloads.try_send(tenant).err())
                    .map(|error| error.into_inner())
                    .collect();
                local.notify.notify_one();
                if rest.is_empty() {
                    return;
                }
                rest
            }
            None => tenants,
        };
        let start = {
            let mut state = self
                .wakes
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            state.pending.extend(tenants);
            !std::mem::replace(&mut state.sending, true)
        };
        if start {
            tokio::spawn(send_wakes(self.clone()));
        }
    }

    /// Registers (Some) or removes (None) this process's dispatcher: while
    /// registered, wake-ups after this store's commits go to it directly
    /// instead of through NOTIFY. The dispatcher removes itself when its
    /// term ends; a wake-up that reaches it while its term ends is lost as
    /// a NOTIFY can be, and the next leader finds the runs when it builds
    /// its active tenants.
    pub fn wake_locally(&self, local: Option<LocalWake>) {
        *self
            .wakes
            .local
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = local;
    }
}

/// Sends the pending wake-ups, one statement at a time, until none is left.
async fn send_wakes(store: Store) {
    loop {
        let mut tenants = {
            let mut state = store
                .wakes
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if state.pending.is_empty() {
                state.sending = false;
                return;
            }
            std::mem::take(&mut state.pending)
        };
        tenants.sort_unstable();
        tenants.dedup();
        if tenants.len() > WAKE_TENANTS_MAX {
            tenants = vec![String::new()];
        }
        if let Err(error) = send(&store, &tenants).await {
            // Not retried: the dispatcher polls and rebuilds its active
            // tenants, so the runs are found without it.
            tracing::debug!(%error, tenants = tenants.len(), "wake-up not sent");
        }
    }
}

async fn send(store: &Store, tenants: &[String]) -> Result<(), crate::Error> {
    let client = store.pool.get().await?;
    // One statement, its own transaction; `set_config(..., true)` lasts
    // until that transaction's commit.
    client
        .query_c(
            "SELECT count(pg_notify($1, tenant)) FROM set_config('synchronous_commit', 'off', true), \
             unnest($2::text[]) AS tenant",
            &[&READY_CHANNEL, &tenants],
        )
        .await?;
    Ok(())
}

/// Shared by every clone of a store.
pub(crate) type SharedWakes = Arc<Wakes>;
