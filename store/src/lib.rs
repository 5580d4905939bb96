//! The only module that talks SQL: Ward's Postgres store.
//!
//! Postgres is the source of truth. Every function here runs its statements in
//! one transaction and filters every tenant-owned row by `tenant_id`.

mod dead_letters;
mod dispatch;
mod grouped;
mod listen;
mod progress;
mod runs;
mod schedules;
mod tenancy;
mod tenants;
mod tx;
mod vacuum;
mod wake;
mod workflow;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

pub use dead_letters::{
    DEAD_LETTER_BODY_BYTES_MAX, DEAD_LETTER_PAGE_MAX, DeadLetter, DeadLetterOutcome,
};
pub use dispatch::{Fired, Lease, Pick, ReadyTask};
pub use listen::Listener;
pub use progress::{Completion, DEPTH_MAX, Settlement};
pub use runs::{ExternalOutcome, FETCH_TASKS_MAX, LOCK_MS_MAX, TaskResult};
pub use schedules::SCHEDULES_PER_TENANT_MAX;
pub use tenancy::{
    APPLY_TENANTS_MAX, ActiveTenant, ApplyReport, KeyRecord, Quotas, TENANT_PAGE_MAX, TenantRecord,
    TenantSpec, TierSpec, Usage,
};
pub use tenants::{Tenant, TenantWithKey, key_hash};
pub(crate) use tx::Tx;
pub use vacuum::{DeadRows, Vacuumed};
pub use wake::LocalWake;
pub use workflow::{
    CancelOutcome, LIST_LIMIT_MAX, ListFilter, Published, START_BATCH_LEN_MAX, SignalOutcome,
    StartItem, Started,
};

/// The channel a transaction notifies when it makes a task ready.
pub const READY_CHANNEL: &str = "ward_ready";

/// The NOTIFY channel of admin changes to tenants and API keys (a tenant's
/// status, tier or quotas, a revoked key, an apply), committed with them:
/// each master forgets the API keys it resolved (`master/src/api.rs`).
pub const TENANCY_CHANNEL: &str = "ward_tenancy";

mod embedded {
    refinery::embed_migrations!("../migrations");
}

/// Store errors a caller branches on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("definition `{name}` not found")]
    DefinitionNotFound { name: String, version: Option<i32> },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("tenant `{0}` already exists")]
    TenantExists(String),
    #[error("fenced: epoch {epoch} is not the current epoch {epoch_current}")]
    Fenced { epoch: i64, epoch_current: i64 },
    #[error("stored definition is unreadable: {0}")]
    Corrupt(String),
    #[error("publish: {0}")]
    Publish(Box<dyn std::error::Error + Send + Sync>),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("migration: {0}")]
    Migration(#[from] refinery::Error),
    /// The process is stopping: its group commits take no more work.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl Error {
    /// True when the database could not be reached or answered with a
    /// server-side fault: the request may be retried.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Pool(_) | Error::Db(_) | Error::Unavailable(_))
    }
}

/// Where the store lives and how many connections it may hold.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `postgres://user@host:port/database`
    pub url: String,
    /// Schema holding Ward's tables (one per test, `public` in production).
    pub schema: String,
    pub pool_size_max: usize,
    /// Bound on waiting for a pooled connection.
    pub pool_wait_ms: u64,
    /// Role every pooled connection assumes (`SET ROLE`): not the tables'
    /// owner, not a superuser, without BYPASSRLS, so row-level security
    /// binds it. Empty: stay the connecting user (not for production).
    pub app_role: String,
}

/// Longest any pooled transaction may sit idle between statements
/// (publisher confirms of a dispatch batch included) before Postgres ends
/// its session and releases its locks. It bounds how long a paused process
/// (SIGSTOP, VM freeze) holding a transaction can block others: a paused
/// leader holding the epoch row would delay its successor's claim, a paused
/// worker holding an instance row would stall the leader's lease reaper.
/// The dispatch transaction, which waits for publisher confirms, raises its
/// own bound to the publish timeout (`Lease::publish_ms`).
pub const TX_IDLE_MS_MAX: u64 = 1_500;

/// The application role the migration runner creates and grants.
pub const APP_ROLE_DEFAULT: &str = "ward_app";

/// Whose rows a transaction may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope<'a> {
    /// One tenant's rows (every request of a tenant).
    Tenant(uuid::Uuid),
    /// The rows of these tenants (a worker's group commit of the results of
    /// several deliveries: the tenants of those messages).
    Tenants(&'a [uuid::Uuid]),
    /// Every tenant's rows (the leader's loops, admin, key lookup).
    System,
}

/// Begins a transaction and sets its scope with `set_config(..., true)`, so
/// the setting ends with the transaction and never leaks through the pool;
/// BEGIN and the scope go out together (`Tx::begin`).
pub(crate) async fn scoped(
    client: deadpool_postgres::Object,
    scope: Scope<'_>,
) -> Result<Tx, Error> {
    Tx::begin(client, scope).await
}

impl Scope<'_> {
    /// The values of `SCOPE_SQL`'s parameters: tenant, tenants, system.
    pub(crate) fn settings(self) -> (String, String, &'static str) {
        match self {
            Scope::Tenant(tenant_id) => (tenant_id.to_string(), String::new(), ""),
            Scope::Tenants(tenant_ids) => (
                String::new(),
                tenant_ids
                    .iter()
                    .map(uuid::Uuid::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                "",
            ),
            Scope::System => (String::new(), String::new(), "on"),
        }
    }
}

/// Sets a transaction's scope: tenant, tenants, system (each local to it).
/// Its parameters come from `Scope::settings`.
pub(crate) const SCOPE_SQL: &str = "SELECT set_config('ward.tenant_id', $1, true), \
     set_config('ward.tenant_ids', $2, true), set_config('ward.system', $3, true)";

/// Runs one tenant's reads in a read-only transaction scoped to it, in ONE
/// round trip: BEGIN, the scope, the reads and COMMIT (all four prepared
/// statements) are pipelined on the connection, and the server runs them
/// in that order. `reads` must send
/// every request on its first poll: queries of statements prepared
/// beforehand (`prepare_cached`), joined; never `query_c` and the like,
/// whose statement, on a cache miss, would be prepared first and run after
/// the COMMIT, outside the scope (so see nothing). All four go out even when one
/// fails, so the transaction always ends (an aborted one's COMMIT rolls
/// back).
pub(crate) async fn read_scoped<T, Reads>(
    client: &deadpool_postgres::ClientWrapper,
    tenant_id: uuid::Uuid,
    reads: Reads,
) -> Result<T, Error>
where
    Reads: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    // BEGIN and COMMIT prepared too: Postgres then parses neither on
    // every read.
    let (begin, scope, commit) = futures::future::try_join3(
        client.prepare_cached("BEGIN READ ONLY"),
        client.prepare_cached(SCOPE_SQL),
        client.prepare_cached("COMMIT"),
    )
    .await?;
    let (tenant, tenants, system) = Scope::Tenant(tenant_id).settings();
    let scope_params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
        [&tenant, &tenants, &system];
    let (begun, scoped, read, committed) = futures::join!(
        client.execute(&begin, &[]),
        client.execute(&scope, &scope_params),
        reads,
        client.execute(&commit, &[]),
    );
    begun?;
    scoped?;
    let read = read?;
    committed?;
    Ok(read)
}

/// A handle on the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// Wake-ups waiting to be sent after their commits (`wake`).
    wakes: wake::SharedWakes,
    /// The login role's connection settings, for statements the
    /// application role may not run (`vacuum`).
    owner_config: std::sync::Arc<tokio_postgres::Config>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("status", &self.pool.status())
            .finish()
    }
}

impl Store {
    /// Builds the pool; connections are opened lazily.
    pub fn connect(settings: &Settings) -> Result<Store, Error> {
        let pg_config = pg_config(settings)?;
        let owner_config = pg_config.clone();
        let manager = Manager::from_config(
            pg_config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let timeout = Some(std::time::Duration::from_millis(settings.pool_wait_ms));
        // Every session: the idle-transaction bound, then the application role.
        // Generic plans: every cached statement is planned once per
        // connection, not on each execution. (Custom plans re-planned the
        // hot statements every time, inlining the row-security functions
        // again: most of Postgres's CPU under load. The filtered list,
        // whose best index depends on the filters given, has one statement
        // per set of filters.) No JIT: its compile time (hundreds of
        // ms) dwarfs any statement of this workload; with a large backlog
        // the dispatch claim's estimated cost crossed `jit_above_cost` and
        // every claim paid ~200 ms of compilation for 3 ms of work.
        // No sequential scan where an index can serve: a generic plan is
        // made once, with the statistics of that moment, and kept until an
        // ANALYZE. Made while the tables were nearly empty (a new schema,
        // the first minute under load, before autovacuum's first ANALYZE),
        // the group commit's plans scanned `instances` and `task_runs`
        // whole (38 ms per statement at 100,000 rows instead of < 1 ms).
        // Every statement here is keyed by an index; a table no index
        // serves is still scanned.
        let mut session = format!(
            "SET idle_in_transaction_session_timeout = {TX_IDLE_MS_MAX}; SET plan_cache_mode = force_generic_plan; \
             SET jit = off; SET enable_seqscan = off;"
        );
        if !settings.app_role.is_empty() {
            session.push_str(&format!(" SET ROLE {};", quote_ident(&settings.app_role)));
        }
        let pool = Pool::builder(manager)
            .post_create(deadpool_postgres::Hook::async_fn(move |client, _| {
                let session = session.clone();
                Box::pin(async move {
                    client
                        .batch_execute(&session)
                        .await
                        .map_err(deadpool_postgres::HookError::Backend)?;
                    Ok(())
                })
            }))
            .max_size(settings.pool_size_max)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .build()
            .map_err(|error| Error::Corrupt(format!("pool configuration: {error}")))?;
        Ok(Store {
            pool,
            wakes: Default::default(),
            owner_config: std::sync::Arc::new(owner_config),
        })
    }

    /// Number of pooled connections, and how many are idle.
    pub fn pool_status(&self) -> (usize, usize) {
        let status = self.pool.status();
        (status.size, status.available)
    }

    /// Answers when the database answers a trivial query.
    pub async fn ping(&self) -> Result<(), Error> {
        let client = self.pool.get().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }
}

/// Creates the schema if needed and applies pending migrations, under an
/// advisory lock so concurrent starters apply them once.
pub async fn migrate(settings: &Settings) -> Result<(), Error> {
    let mut admin_config: tokio_postgres::Config = settings
        .url
        .parse()
        .map_err(|error| Error::Corrupt(format!("database url: {error}")))?;
    admin_config.connect_timeout(std::time::Duration::from_millis(settings.pool_wait_ms));
    let (client, connection) = admin_config.connect(NoTls).await?;
    let connection_task = tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}",
            schema = quote_ident(&settings.schema)
        ))
        .await
        .or_else(ignore_duplicate)?;
    drop(client);
    connection_task.abort();

    let (mut client, connection) = pg_config(settings)?.connect(NoTls).await?;
    let connection_task = tokio::spawn(connection);
    client
        .batch_execute("SELECT pg_advisory_lock(hashtext(current_schema()))")
        .await?;
    let result = embedded::migrations::runner().run_async(&mut client).await;
    let granted = if result.is_ok() && !settings.app_role.is_empty() {
        grant_app_role(&client, &settings.schema, &settings.app_role).await
    } else {
        Ok(())
    };
    client
        .batch_execute("SELECT pg_advisory_unlock(hashtext(current_schema()))")
        .await?;
    drop(client);
    connection_task.abort();
    result?;
    granted?;
    Ok(())
}

/// Creates the application role if missing (no login, no BYPASSRLS) and
/// grants it the schema's tables and functions. Serialized across schemas:
/// concurrent GRANTs on one role can collide in the catalog.
async fn grant_app_role(
    client: &tokio_postgres::Client,
    schema: &str,
    role: &str,
) -> Result<(), Error> {
    let role_ident = quote_ident(role);
    let role_literal = role.replace('\'', "''");
    let schema = quote_ident(schema);
    client
        .batch_execute(&format!(
            "SELECT pg_advisory_lock(7274839);
             DO $$ BEGIN
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role_literal}') THEN
                 CREATE ROLE {role_ident} NOLOGIN NOSUPERUSER NOBYPASSRLS;
               END IF;
               IF NOT pg_has_role(current_user, '{role_literal}', 'MEMBER') THEN
                 EXECUTE format('GRANT %I TO %I', '{role_literal}', current_user);
               END IF;
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
             END $$;
             GRANT USAGE ON SCHEMA {schema} TO {role_ident};
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role_ident};
             GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {role_ident};
             SELECT pg_advisory_unlock(7274839);"
        ))
        .await?;
    Ok(())
}

/// Connection settings shared by the pool and single connections: the schema
/// on the search path, custom plans (generic plans built on empty tables fall
/// back to sequential scans), and a connect timeout.
pub(crate) fn pg_config(settings: &Settings) -> Result<tokio_postgres::Config, Error> {
    let mut config: tokio_postgres::Config = settings
        .url
        .parse()
        .map_err(|error| Error::Corrupt(format!("database url: {error}")))?;
    let options = format!(
        "{} -c search_path={} -c plan_cache_mode=force_custom_plan",
        config.get_options().unwrap_or_default(),
        settings.schema
    );
    config.options(options.trim());
    config.connect_timeout(std::time::Duration::from_millis(settings.pool_wait_ms));
    if config.get_application_name().is_none() {
        config.application_name("ward");
    }
    Ok(config)
}

fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Two sessions racing on `CREATE SCHEMA IF NOT EXISTS` can still collide.
fn ignore_duplicate(error: tokio_postgres::Error) -> Result<(), tokio_postgres::Error> {
    match error.code() {
        Some(code) if *code == tokio_postgres::error::SqlState::UNIQUE_VIOLATION => Ok(()),
        Some(code) if *code == tokio_postgres::error::SqlState::DUPLICATE_SCHEMA => Ok(()),
        _ => Err(error),
    }
}

/// Statements through the pooled connection's prepared-statement cache:
/// each distinct SQL text is parsed and planned once per connection, and
/// runs in one round trip instead of two.
pub(crate) trait Cached {
    async fn query_c(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>;
    async fn query_one_c(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<tokio_postgres::Row, tokio_postgres::Error>;
    async fn query_opt_c(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<tokio_postgres::Row>, tokio_postgres::Error>;
    async fn execute_c(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error>;
}

impl Cached for deadpool_postgres::ClientWrapper {
    async fn query_c(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let statement = self.prepare_cached(sql).await?;
        self.query(&statement, params).await
    }
    async fn query_one_c(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<tokio_postgres::Row, tokio_postgres::Error> {
        let statement = self.prepare_cached(sql).await?;
        self.query_one(&statement, params).await
    }
    async fn query_opt_c(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<tokio_postgres::Row>, tokio_postgres::Error> {
        let statement = self.prepare_cached(sql).await?;
        self.query_opt(&statement, params).await
    }
    async fn execute_c(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        let statement = self.prepare_cached(sql).await?;
        self.execute(&statement, params).await
    }
}
