//! The leader's backstop VACUUM of the two hot tables, for a server where
//! autovacuum will not vacuum them (off for the server, or for the table).
//!
//! Every task run is written three times and every instance at least twice,
//! and none of those updates can be HOT, so each leaves heap rows and index
//! entries that only VACUUM removes. Without it the hot tables and their
//! indexes grow without bound, and the leader's counts and the start's
//! running count walk ever more dead entries. Where autovacuum runs,
//! migration V13 makes it vacuum these tables sooner, and this does nothing.

use tokio_postgres::NoTls;

use crate::{Error, Store};

/// A hot table's dead rows, as the statistics collector last counted them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadRows {
    pub table: String,
    pub dead: i64,
    pub live: i64,
    /// Analyzed too: enough rows changed since its last ANALYZE.
    pub analyzed: bool,
}

/// What one look at the hot tables found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vacuumed {
    /// Autovacuum is off for the server or for one of the hot tables.
    pub unattended: bool,
    /// The tables vacuumed, with their dead rows before.
    pub tables: Vec<DeadRows>,
}

/// A vacuumed table is analyzed too once this many rows changed since its
/// last ANALYZE, plus `ANALYZE_SHARE` of its live rows (autovacuum's own
/// defaults). The statistics change little between VACUUMs that come
/// every few seconds under load, and each ANALYZE samples 30,000 rows.
const ANALYZE_ROWS_MIN: i64 = 50;
/// See `ANALYZE_ROWS_MIN`.
const ANALYZE_SHARE: f64 = 0.1;
/// ...and at most once in this many seconds per table: under load the
/// changed rows pass that mark between every two looks, and each ANALYZE
/// (30,000 sampled rows) stalls the tasks beside it for tens of ms.
const ANALYZE_EVERY_S_MIN: f64 = 60.0;

/// Bound on each statement of a look, a VACUUM included (a hot table of
/// tens of millions of rows takes minutes on a small machine).
const VACUUM_STATEMENT_MS_MAX: u64 = 600_000;

impl Store {
    /// Vacuums each hot table (`instances`, `task_runs`) that autovacuum
    /// will not vacuum, once its dead rows reach both `dead_rows_min` and
    /// `dead_share` of its live rows, and analyzes it too when enough of
    /// its rows changed since its last ANALYZE (`ANALYZE_ROWS_MIN`). Runs on a
    /// connection of its own as the login role, which owns the tables
    /// (pooled sessions run as the application role, which may not VACUUM).
    pub async fn vacuum_unattended(
        &self,
        dead_rows_min: i64,
        dead_share: f64,
    ) -> Result<Vacuumed, Error> {
        let (client, connection) = self.owner_config.connect(NoTls).await?;
        let connection = tokio::spawn(connection);
        let result = async {
            client
                .batch_execute(&format!(
                    "SET statement_timeout = {VACUUM_STATEMENT_MS_MAX}"
                ))
                .await?;
            let rows = client
                .query(
                    "SELECT s.relname::text, s.n_dead_tup, s.n_live_tup, \
                     s.n_dead_tup >= greatest($1::bigint, (s.n_live_tup * $2::float8)::bigint), \
                     s.n_mod_since_analyze >= $3::bigint + (s.n_live_tup * $4::float8)::bigint \
                     AND coalesce(greatest(s.last_analyze, s.last_autoanalyze), '-infinity') \
                         < now() - make_interval(secs => $5::float8) \
                     FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid \
                     WHERE s.relid IN ('instances'::regclass, 'task_runs'::regclass) \
                     AND (current_setting('autovacuum') = 'off' \
                          OR coalesce(c.reloptions, '{}') @> '{autovacuum_enabled=false}') \
                     ORDER BY s.relname",
                    &[
                        &dead_rows_min,
                        &dead_share,
                        &ANALYZE_ROWS_MIN,
                        &ANALYZE_SHARE,
                        &ANALYZE_EVERY_S_MIN,
                    ],
                )
                .await?;
            let mut vacuumed = Vacuumed {
                unattended: !rows.is_empty(),
                tables: Vec::new(),
            };
            for row in rows {
                if !row.get::<_, bool>(3) {
                    continue;
                }
                let table: String = row.get(0);
                let analyze: bool = row.get(4);
                // The name comes from the two literals above, never from input.
                client
                    .batch_execute(&if analyze {
                        format!("VACUUM (ANALYZE) {table}")
                    } else {
                        format!("VACUUM {table}")
                    })
                    .await?;
                vacuumed.tables.push(DeadRows {
                    table,
                    dead: row.get(1),
                    live: row.get(2),
                    analyzed: analyze,
                });
            }
            Ok::<_, Error>(vacuumed)
        }
        .await;
        drop(client);
        let _ = connection.await;
        result
    }
}
