//! The ledger's stores: Postgres for deployments, SQLite as the embedded
//! default. Both have the same tables and column names (`DESIGN.md`), created
//! by the migrations under `migrations/postgres` and `migrations/sqlite`, which
//! are compiled into the binary so that it migrates from any directory.
//!
//! SQLite keeps timestamps as fixed-width UTC text
//! (`YYYY-MM-DDTHH:MM:SS.ffffffZ`, see [`sqlite_timestamp`]), so that text
//! order is time order; Postgres uses `TIMESTAMPTZ`.

mod postgres;
mod sqlite;

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::error::BoxDynError;
use sqlx::migrate::{MigrateError, Migration, MigrationSource, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions as _, Connection as _};

use crate::meter::Usage;
use crate::record::UsageRecord;

use super::report::{ReportQuery, ReportRow, Totals};

/// How long to wait for a pooled connection (and so for a store that is down)
/// before an operation fails and is retried.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// The migrations of each backend, in version order: (version, description, SQL).
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "ledger",
    include_str!("../../migrations/postgres/0001_ledger.sql"),
)];
const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "ledger",
    include_str!("../../migrations/sqlite/0001_ledger.sql"),
)];

/// Which database a store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    /// The backend a `ledger.url` names, if any.
    pub fn of_url(url: &str) -> Option<Backend> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else {
            None
        }
    }

    /// The compiled-in migrations of this backend.
    pub fn migrations(self) -> &'static [(i64, &'static str, &'static str)] {
        match self {
            Backend::Postgres => POSTGRES_MIGRATIONS,
            Backend::Sqlite => SQLITE_MIGRATIONS,
        }
    }
}

/// The compiled-in migrations, as a source for sqlx's [`Migrator`].
#[derive(Debug, Clone, Copy)]
struct EmbeddedMigrations(&'static [(i64, &'static str, &'static str)]);

impl MigrationSource<'static> for EmbeddedMigrations {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 'static>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|(version, description, sql)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(*description),
                        MigrationType::Simple,
                        Cow::Borrowed(*sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// A row of `usage_events` as `tollgate reprice` needs it: what prices it and
/// what it was priced at.
#[derive(Debug, Clone, PartialEq)]
pub struct PricedRow {
    pub request_id: String,
    pub model: Option<String>,
    pub usage: Usage,
    pub long_context_beta: bool,
    pub cost_nanousd: Option<i64>,
    pub price_version: Option<String>,
}

/// A new cost for one row.
#[derive(Debug, Clone, PartialEq)]
pub struct CostUpdate {
    pub request_id: String,
    pub cost_nanousd: Option<i64>,
    pub price_version: String,
}

/// A connection pool to the ledger database.
#[derive(Debug, Clone)]
pub enum Store {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl Store {
    /// A pool for `url` that connects on first use, so that the gateway starts
    /// while the database is down. With `create`, a missing SQLite file is
    /// created (for serving and migrating; reports want an existing ledger).
    pub fn open_lazy(url: &str, create: bool) -> Result<Store, sqlx::Error> {
        match Backend::of_url(url) {
            Some(Backend::Postgres) => {
                let options = PgConnectOptions::from_str(url)?.application_name("tollgate");
                let pool = PgPoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_lazy_with(options);
                Ok(Store::Postgres(pool))
            }
            Some(Backend::Sqlite) => {
                let memory = url.contains(":memory:") || url.contains("mode=memory");
                let options = SqliteConnectOptions::from_str(url)?
                    .create_if_missing(create)
                    .journal_mode(SqliteJournalMode::Wal)
                    // Full: a committed batch survives a power loss too, since
                    // the journal is checkpointed right after the commit.
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(5));
                let mut pool = SqlitePoolOptions::new()
                    .max_connections(if memory { 1 } else { 4 })
                    .acquire_timeout(ACQUIRE_TIMEOUT);
                if memory {
                    // Every connection of an in-memory database is a new,
                    // empty database: keep the one connection forever.
                    pool = pool.idle_timeout(None).max_lifetime(None);
                }
                Ok(Store::Sqlite(pool.connect_lazy_with(options)))
            }
            None => Err(sqlx::Error::Configuration(
                "ledger.url must start with sqlite:, postgres:// or postgresql://".into(),
            )),
        }
    }

    /// Opens the store and checks that it answers.
    pub async fn connect(url: &str, create: bool) -> Result<Store, sqlx::Error> {
        let store = Store::open_lazy(url, create)?;
        // The probe reports a refused connection as such (the pool would
        // only say that it timed out).
        store.probe().await?;
        store.ping().await?;
        Ok(store)
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        match self {
            Store::Postgres(_) => Backend::Postgres,
            Store::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Applies the migrations not yet applied. Idempotent; concurrent
    /// replicas are serialised by sqlx's migration lock.
    pub async fn migrate(&self) -> Result<(), MigrateError> {
        let migrator = Migrator::new(EmbeddedMigrations(self.backend().migrations())).await?;
        match self {
            Store::Postgres(pool) => migrator.run(pool).await,
            Store::Sqlite(pool) => migrator.run(pool).await,
        }
    }

    /// One direct connection attempt, without the pool's retries (a pool
    /// retries a refused connection until its acquire timeout).
    pub async fn probe(&self) -> Result<(), sqlx::Error> {
        match self {
            Store::Postgres(pool) => pool.connect_options().connect().await?.close().await,
            // A local file: nothing to reach.
            Store::Sqlite(_) => Ok(()),
        }
    }

    /// Checks that the store answers.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        match self {
            Store::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()),
            Store::Sqlite(pool) => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()),
        }
    }

    /// Inserts records, skipping any whose `request_id` is already stored, in
    /// one transaction. Returns how many rows were new.
    pub async fn insert(&self, records: &[UsageRecord]) -> Result<u64, sqlx::Error> {
        if records.is_empty() {
            return Ok(0);
        }
        match self {
            Store::Postgres(pool) => postgres::insert(pool, records).await,
            Store::Sqlite(pool) => sqlite::insert(pool, records).await,
        }
    }

    /// Usage totals for `tollgate usage`, grouped as asked, sorted by group.
    pub async fn usage_report(&self, query: &ReportQuery) -> Result<Vec<ReportRow>, sqlx::Error> {
        let mut rows = match self {
            Store::Postgres(pool) => postgres::usage_report(pool, query).await?,
            Store::Sqlite(pool) => sqlite::usage_report(pool, query).await?,
        };
        // Sorted here rather than in SQL, so that both backends order alike
        // (bytewise, missing values first) whatever the database's collation.
        rows.sort_by(|a, b| a.groups.cmp(&b.groups));
        Ok(rows)
    }

    /// Up to `limit` rows started in `[since, until)`, with `request_id` after
    /// `after`, in `request_id` order (pages for `tollgate reprice`).
    pub async fn priced_rows(
        &self,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        after: &str,
        limit: i64,
    ) -> Result<Vec<PricedRow>, sqlx::Error> {
        match self {
            Store::Postgres(pool) => postgres::priced_rows(pool, since, until, after, limit).await,
            Store::Sqlite(pool) => sqlite::priced_rows(pool, since, until, after, limit).await,
        }
    }

    /// Sets new costs, in one transaction.
    pub async fn update_costs(&self, updates: &[CostUpdate]) -> Result<(), sqlx::Error> {
        if updates.is_empty() {
            return Ok(());
        }
        match self {
            Store::Postgres(pool) => postgres::update_costs(pool, updates).await,
            Store::Sqlite(pool) => sqlite::update_costs(pool, updates).await,
        }
    }

    /// Closes the pool's connections.
    pub async fn close(&self) {
        match self {
            Store::Postgres(pool) => pool.close().await,
            Store::Sqlite(pool) => pool.close().await,
        }
    }
}

/// A counter as stored: the columns are signed 64-bit.
pub(crate) fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A stored counter back as a counter (negative values cannot be written).
pub(crate) fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// ` GROUP BY 1, 2, …` over the first `n` columns (nothing when `n` is 0).
fn group_by_positions(n: usize) -> String {
    if n == 0 {
        return String::new();
    }
    let positions: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
    format!(" GROUP BY {}", positions.join(", "))
}

/// Decodes the rows of a usage report, either backend: `n` group columns, then
/// the totals in the order both backends select them.
fn report_rows<R>(rows: Vec<R>, n: usize) -> Result<Vec<ReportRow>, sqlx::Error>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let mut group_values = Vec::with_capacity(n);
        for i in 0..n {
            group_values.push(row.try_get::<Option<String>, _>(i)?);
        }
        let totals = Totals {
            requests: row.try_get(n)?,
            input_tokens: row.try_get(n + 1)?,
            output_tokens: row.try_get(n + 2)?,
            cache_creation_input_tokens: row.try_get(n + 3)?,
            cache_read_input_tokens: row.try_get(n + 4)?,
            web_search_requests: row.try_get(n + 5)?,
            cost_nanousd: row.try_get(n + 6)?,
            unpriced_requests: row.try_get(n + 7)?,
        };
        // An empty range still yields one (all-zero) row without GROUP BY.
        if totals.requests > 0 {
            out.push(ReportRow {
                groups: group_values,
                totals,
            });
        }
    }
    Ok(out)
}

/// Decodes one row selected for `reprice`, either backend.
fn priced_row<R>(row: &R) -> Result<PricedRow, sqlx::Error>
where
    R: sqlx::Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(PricedRow {
        request_id: row.try_get("request_id")?,
        model: row.try_get("model")?,
        usage: Usage {
            input_tokens: to_u64(row.try_get("input_tokens")?),
            output_tokens: to_u64(row.try_get("output_tokens")?),
            cache_creation_input_tokens: to_u64(row.try_get("cache_creation_input_tokens")?),
            cache_creation_5m_tokens: row
                .try_get::<Option<i64>, _>("cache_creation_5m_tokens")?
                .map(to_u64),
            cache_creation_1h_tokens: row
                .try_get::<Option<i64>, _>("cache_creation_1h_tokens")?
                .map(to_u64),
            cache_read_input_tokens: to_u64(row.try_get("cache_read_input_tokens")?),
            web_search_requests: to_u64(row.try_get("web_search_requests")?),
            service_tier: row.try_get("service_tier")?,
            inference_geo: row.try_get("inference_geo")?,
        },
        long_context_beta: row.try_get("long_context_beta")?,
        cost_nanousd: row.try_get("cost_nanousd")?,
        price_version: row.try_get("price_version")?,
    })
}

/// The SQLite text form of a timestamp: fixed width, UTC, microseconds, so
/// that comparing the text compares the instants.
pub fn sqlite_timestamp(t: &DateTime<Utc>) -> String {
    crate::timestamp::micros(t)
}

/// Whether an error says the store could not be reached or is briefly unable
/// to work (as opposed to rejecting what was asked).
pub(crate) fn is_unreachable(backend: Backend, e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => match (backend, db.code()) {
            // Connection exception, insufficient resources, operator
            // intervention (shutdown, starting up), system error.
            (Backend::Postgres, Some(code)) => ["08", "53", "57", "58"]
                .iter()
                .any(|class| code.starts_with(class)),
            // Busy, locked, I/O error, disk full.
            (Backend::Sqlite, Some(code)) => code
                .parse::<i32>()
                .is_ok_and(|n| matches!(n & 0xff, 5 | 6 | 10 | 13)),
            _ => false,
        },
        _ => false,
    }
}

/// Whether the store rejected the data itself (a value out of range, a
/// constraint): retrying the same rows cannot succeed.
pub(crate) fn is_bad_data(backend: Backend, e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Encode(_) => true,
        sqlx::Error::Database(db) => match (backend, db.code()) {
            (Backend::Postgres, Some(code)) => code.starts_with("22") || code.starts_with("23"),
            // SQLite: too big, constraint, type mismatch, range.
            (Backend::Sqlite, Some(code)) => code
                .parse::<i32>()
                .is_ok_and(|n| matches!(n & 0xff, 18 | 19 | 20 | 25)),
            _ => false,
        },
        _ => false,
    }
}

/// Whether a migration failed only because the store could not be reached.
pub(crate) fn migrate_error_is_transient(backend: Backend, e: &MigrateError) -> bool {
    match e {
        MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => {
            is_unreachable(backend, e)
        }
        _ => false,
    }
}

/// An error message with the URL's password removed, in case a driver quotes it.
pub(crate) fn scrub(message: &str, url: &str) -> String {
    let Some(password) = url::Url::parse(url)
        .ok()
        .and_then(|u| u.password().map(str::to_owned))
    else {
        return message.to_owned();
    };
    let mut out = message.to_owned();
    for form in [percent_decode(&password), password] {
        if !form.is_empty() {
            out = out.replace(&form, "*****");
        }
    }
    out
}

/// Decodes `%XX` escapes (URL user-info), leaving anything malformed as is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_removes_plain_and_encoded_passwords() {
        let url = "postgres://app:p%40ss@db/tollgate";
        assert_eq!(scrub("auth failed for p@ss", url), "auth failed for *****");
        assert_eq!(scrub("url p%40ss", url), "url *****");
        assert_eq!(scrub("no secret here", "sqlite://x.db"), "no secret here");
    }

    #[test]
    fn sqlite_timestamps_sort_as_instants() {
        let a: DateTime<Utc> = "2025-03-01T10:00:05Z".parse().unwrap();
        let b: DateTime<Utc> = "2025-03-01T10:00:05.5Z".parse().unwrap();
        let c: DateTime<Utc> = "2025-03-01T10:00:06Z".parse().unwrap();
        let (ta, tb, tc) = (
            sqlite_timestamp(&a),
            sqlite_timestamp(&b),
            sqlite_timestamp(&c),
        );
        assert_eq!(ta, "2025-03-01T10:00:05.000000Z");
        assert!(ta < tb && tb < tc);
    }
}
