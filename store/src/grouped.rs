//! Set-based progress for group commits: plans many locked instances at
//! once and writes what follows with one statement per kind of write (new
//! runs, ends), so a batch of results or starts costs a few statements, not
//! a few per item. Anything unusual (sub-workflows, signals, a parent to
//! settle) takes the one-instance path in `progress`.

use std::collections::HashMap;

use crate::Tx;
use serde_json::Value;
use uuid::Uuid;
use ward_shared::engine::{self, End, Run};
use ward_shared::wire::status;

use crate::Cached;
use crate::Error;
use crate::progress::{self, Locked, RunRows};

/// Advances each `(instance, its runs)` (running, locked by this
/// transaction, no two the same) and returns each one's status, in order.
/// Plain plans (new tasks, HTTP calls, delays) and ends of instances
/// without a parent are written together; any other instance is advanced
/// on its own afterwards, from a fresh read. The tenants whose runs the
/// plain plans made ready are added to `wake_after_commit`, for the caller
/// to wake once it committed; the others wake from inside the transaction.
pub(crate) async fn advance_many(
    transaction: &Tx,
    instances: &[(&Locked, Vec<Run>)],
    wake_after_commit: &mut Vec<String>,
) -> Result<Vec<String>, Error> {
    plan_many(instances)?
        .write(transaction, instances, wake_after_commit)
        .await
}

/// What `advance_many` writes for `instances`, each planned once (no I/O).
pub(crate) fn plan_many(instances: &[(&Locked, Vec<Run>)]) -> Result<Writes, Error> {
    let mut writes = Writes {
        statuses: vec![status::RUNNING.to_owned(); instances.len()],
        rows: RunRows::default(),
        ends: Ends::default(),
        alone: Vec::new(),
    };
    for (index, (instance, runs)) in instances.iter().enumerate() {
        let plan = engine::plan(
            &instance.definition,
            &instance.input,
            runs,
            rand::random::<f64>(),
        );
        match plan.end {
            Some(end) if instance.parent.is_none() => {
                writes.statuses[index] = writes.ends.push(instance, end).to_owned();
            }
            None if progress::plain(instance, &plan.starts) => {
                for start in &plan.starts {
                    writes.rows.push_start(instance, start)?;
                }
            }
            _ => writes.alone.push(index),
        }
    }
    Ok(writes)
}

/// The planned writes of `advance_many`: new runs, parentless ends, and the
/// instances advanced alone.
pub(crate) struct Writes {
    statuses: Vec<String>,
    rows: RunRows,
    ends: Ends,
    alone: Vec<usize>,
}

impl Writes {
    /// The new runs, taken out, when they are all there is to write (no
    /// instance ends, none is advanced alone: only plain steps start):
    /// their writes are then ONE statement known before any of it is sent,
    /// which the caller may pipeline with its COMMIT.
    pub(crate) fn take_only_runs(&mut self) -> Option<RunRows> {
        (self.ends.id.is_empty() && self.alone.is_empty() && !self.rows.is_empty())
            .then(|| std::mem::take(&mut self.rows))
    }

    /// Writes them for `instances` (those they were planned for); returns
    /// each instance's status, in order.
    pub(crate) async fn write(
        mut self,
        transaction: &Tx,
        instances: &[(&Locked, Vec<Run>)],
        wake_after_commit: &mut Vec<String>,
    ) -> Result<Vec<String>, Error> {
        // New runs before ends: an ending parent cancels its children's
        // pending runs, including those written here.
        self.rows
            .write_waking(transaction, Some(wake_after_commit))
            .await?;
        self.ends.write(transaction).await?;
        // Re-read: the writes above may have ended one of these (a parent
        // cancels its children) or settled it (a child ends).
        for index in self.alone {
            let (instance, _) = &instances[index];
            self.statuses[index] = progress::advance_again(transaction, instance).await?;
        }
        Ok(self.statuses)
    }
}

/// Ends of instances without a parent, written with one statement.
#[derive(Default)]
struct Ends {
    tenant_id: Vec<Uuid>,
    id: Vec<Uuid>,
    status: Vec<&'static str>,
    output: Vec<Option<Value>>,
    error: Vec<Option<String>>,
    /// Those whose definition has sub-workflow steps (only they can have
    /// children).
    parents: Vec<Uuid>,
}

impl Ends {
    /// Adds an end; returns the instance's new status.
    fn push(&mut self, instance: &Locked, end: End) -> &'static str {
        let (new_status, output, error) = match end {
            End::Completed { output } => (status::COMPLETED, Some(output), None),
            End::Failed { error } => (status::FAILED, None, Some(error)),
        };
        self.tenant_id.push(instance.tenant_id);
        self.id.push(instance.id);
        self.status.push(new_status);
        self.output.push(output);
        self.error.push(error);
        if progress::may_have_children(instance) {
            self.parents.push(instance.id);
        }
        new_status
    }

    /// Ends the instances, cancels their pending runs, then cancels their
    /// running children (one by one: that is rare).
    async fn write(self, transaction: &Tx) -> Result<(), Error> {
        if self.id.is_empty() {
            return Ok(());
        }
        let children = transaction
            .query_c(
                // `= ANY` on the keys lets each part use its index
                // whatever the planner guesses of the arrays' lengths. No
                // `tenant_id = ANY` on instances: a plan made before the
                // table had statistics read the tenants' every instance
                // through a list index for it (the join keeps the tenant).
                "WITH ended AS (UPDATE instances i SET status = v.status, output = v.output, error = v.error, \
                 updated_at = now(), completed_at = now() \
                 FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[], $5::text[]) \
                 AS v (tenant_id, id, status, output, error) \
                 WHERE i.id = ANY($2) AND i.id = v.id AND i.tenant_id = v.tenant_id \
                 RETURNING 1), \
                 cancelled AS (UPDATE task_runs SET state = 'cancelled', finished_at = now() \
                 WHERE instance_id = ANY($2) AND tenant_id = ANY($1) \
                 AND state IN ('ready', 'waiting', 'locked') RETURNING 1) \
                 SELECT tenant_id, id, status FROM instances WHERE parent_instance_id = ANY($6)",
                &[
                    &self.tenant_id,
                    &self.id,
                    &self.status,
                    &self.output,
                    &self.error,
                    &self.parents,
                ],
            )
            .await?;
        // Filtered here, not in SQL: only the parent index must serve it.
        let mut children: Vec<(Uuid, Uuid)> = children
            .iter()
            .filter(|row| row.get::<_, &str>(2) == status::RUNNING)
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        children.sort_unstable_by_key(|(_, id)| *id);
        for (tenant_id, child_id) in children {
            progress::cancel_orphan(transaction, tenant_id, child_id).await?;
        }
        Ok(())
    }
}

/// Groups runs rows (instance id first, then the columns of
/// [`progress::run_from_row`]) by instance.
pub(crate) fn runs_by_instance(
    rows: &[tokio_postgres::Row],
) -> Result<HashMap<Uuid, Vec<Run>>, Error> {
    let mut runs: HashMap<Uuid, Vec<Run>> = HashMap::new();
    for row in rows {
        runs.entry(row.get(0))
            .or_default()
            .push(progress::run_from_row(row, 1)?);
    }
    Ok(runs)
}
