//! `Tx`: a transaction on a pooled connection whose BEGIN goes out with its
//! first statements (one round trip fewer than `Client::transaction`, which
//! waits for BEGIN's answer before anything else is sent).

use std::ops::Deref;

use deadpool_postgres::{ClientWrapper, Object};
use futures::FutureExt;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement};

use crate::{Error, SCOPE_SQL, Scope};

/// An open transaction. Dropping it without `commit` rolls it back: the
/// ROLLBACK is sent at once without waiting for its answer (as
/// `tokio_postgres::Transaction` does), and a connection's requests run in
/// the order they were sent, so whoever takes the connection from the
/// pool next starts after it.
///
/// Its statements go through `Deref` to the pooled client. BEGIN is sent
/// by `begin` (with the scope) or by the caller, first in its own pipelined
/// round trip (`begin_statement`).
pub(crate) struct Tx {
    client: Object,
    /// Committed: nothing to roll back.
    done: bool,
}

impl Tx {
    /// Takes `client` for a transaction the caller begins itself, with
    /// `begin_statement` first in its first pipelined round trip. From
    /// here on, dropping the `Tx` rolls back.
    pub(crate) fn open(client: Object) -> Tx {
        Tx {
            client,
            done: false,
        }
    }

    /// Begins a transaction scoped to `scope` (`set_config(..., true)`:
    /// the setting ends with the transaction and never leaks through the
    /// pool), BEGIN and the scope in one round trip.
    pub(crate) async fn begin(client: Object, scope: Scope<'_>) -> Result<Tx, Error> {
        let transaction = Tx::open(client);
        transaction.open_scoped(scope).await?;
        Ok(transaction)
    }

    /// Sends BEGIN and the scope of a transaction opened with `open`.
    pub(crate) async fn open_scoped(&self, scope: Scope<'_>) -> Result<(), Error> {
        let (begin, scope_statement) = self.opening_statements().await?;
        self.send_opening(&begin, &scope_statement, scope).await
    }

    /// BEGIN's and the scope's statements, prepared (once per connection),
    /// for `send_opening`.
    pub(crate) async fn opening_statements(
        &self,
    ) -> Result<(Statement, Statement), tokio_postgres::Error> {
        futures::future::try_join(self.begin_statement(), self.prepare_cached(SCOPE_SQL)).await
    }

    /// Sends BEGIN and the scope (statements of `opening_statements`); both
    /// go out on this future's first poll, so a caller that joins it first
    /// with its own statements pipelines them behind it.
    pub(crate) async fn send_opening(
        &self,
        begin: &Statement,
        scope_statement: &Statement,
        scope: Scope<'_>,
    ) -> Result<(), Error> {
        let (tenant, tenants, system) = scope.settings();
        let scope_params: [&(dyn ToSql + Sync); 3] = [&tenant, &tenants, &system];
        // `join`, not `try_join`: both go out on the first poll.
        let (begun, scoped) = futures::join!(
            self.execute(begin, &[]),
            self.execute(scope_statement, &scope_params),
        );
        begun?;
        scoped?;
        Ok(())
    }

    /// `begin`, with `sql`'s query in the same round trip; returns its rows.
    pub(crate) async fn begin_query(
        client: Object,
        scope: Scope<'_>,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(Tx, Vec<Row>), Error> {
        let transaction = Tx::open(client);
        let (begin, scope_statement, query) = futures::future::try_join3(
            transaction.begin_statement(),
            transaction.prepare_cached(SCOPE_SQL),
            transaction.prepare_cached(sql),
        )
        .await?;
        let (tenant, tenants, system) = scope.settings();
        let scope_params: [&(dyn ToSql + Sync); 3] = [&tenant, &tenants, &system];
        let (begun, scoped, rows) = futures::join!(
            transaction.execute(&begin, &[]),
            transaction.execute(&scope_statement, &scope_params),
            transaction.query(&query, params),
        );
        begun?;
        scoped?;
        let rows = rows?;
        Ok((transaction, rows))
    }

    /// The prepared BEGIN (cached per connection), for a caller that sends
    /// it first in its own pipelined round trip.
    pub(crate) async fn begin_statement(&self) -> Result<Statement, tokio_postgres::Error> {
        self.prepare_cached("BEGIN").await
    }

    /// Commits; the connection goes back to the pool.
    pub(crate) async fn commit(mut self) -> Result<(), Error> {
        let commit = self.prepare_cached("COMMIT").await?;
        self.execute(&commit, &[]).await?;
        self.done = true;
        Ok(())
    }

    /// Runs `sql` and COMMIT in one round trip; returns the rows `sql`
    /// changed. If `sql` fails, the server answers the COMMIT by rolling
    /// back (the transaction is aborted), so nothing is written and its
    /// error is returned.
    pub(crate) async fn execute_and_commit(
        mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error> {
        let (statement, commit) =
            futures::future::try_join(self.prepare_cached(sql), self.prepare_cached("COMMIT"))
                .await?;
        let (executed, committed) =
            futures::join!(self.execute(&statement, params), self.execute(&commit, &[]),);
        // Answered: the transaction ended, committed or rolled back.
        self.done = committed.is_ok();
        let executed = executed?;
        committed?;
        Ok(executed)
    }

    /// The transaction ended in a COMMIT the caller pipelined itself
    /// (answered: committed, or rolled back if a statement before it
    /// failed); the connection goes back to the pool without a ROLLBACK.
    pub(crate) fn ended(mut self) {
        self.done = true;
    }

    /// Rolls back and waits for it; the connection goes back to the pool.
    pub(crate) async fn rollback(mut self) -> Result<(), Error> {
        self.batch_execute("ROLLBACK").await?;
        self.done = true;
        Ok(())
    }
}

impl Deref for Tx {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        &self.client
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if !self.done {
            // One poll sends the request; its answer is not awaited.
            let _ = self.client.batch_execute("ROLLBACK").now_or_never();
        }
    }
}
