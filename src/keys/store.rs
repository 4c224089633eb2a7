//! The SQL of `api_keys`, for both ledger backends.
//!
//! Reads never select `secret_hash` except to match it, so a [`KeyRecord`]
//! cannot carry it anywhere. SQLite keeps timestamps as the ledger's
//! fixed-width UTC text ([`sqlite_timestamp`]); Postgres as `TIMESTAMPTZ`.
//! Updates read the row and write it back in one transaction (`FOR UPDATE` on
//! Postgres, `BEGIN IMMEDIATE` on SQLite), so that the merged record is
//! validated as a whole and two concurrent updates cannot interleave.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Row as _;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;

use super::manage::KeyPatch;
use super::{KeyError, KeyKind, KeyLimitsOverride, KeyRecord};
use crate::budget::{Budget, BudgetPeriod};
use crate::config::LedgerConfig;
use crate::ledger::store::{self as ledger_store, Backend, Store, sqlite_timestamp};
use crate::secret::MaskedUrl;

/// Every column of a key but its secret hash, in [`read_pg`]/[`read_sqlite`] order.
const COLUMNS: &str = "id, name, team, kind, key_prefix, rpm, input_tpm, output_tpm, \
    max_concurrent, budget_nanousd, budget_period, shadow, created_at, expires_at, revoked_at";

/// Longest one key query may take before it counts as the store being down:
/// a lookup on the request path must not hang on a dead database.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// A new virtual key, as inserted.
#[derive(Debug, Clone)]
pub struct NewKeyRow {
    pub record: KeyRecord,
    /// Hex SHA-256 of the secret.
    pub secret_hash: String,
}

/// The keys of the ledger database.
#[derive(Debug, Clone)]
pub struct KeyStore {
    store: Store,
    url: MaskedUrl,
}

impl KeyStore {
    /// A store over the configured ledger; connects on first use.
    pub fn open(ledger: &LedgerConfig) -> Result<KeyStore, KeyError> {
        let store = Store::open_lazy(ledger.url.expose(), true).map_err(|e| {
            KeyError::Store(format!(
                "cannot use ledger.url {}: {}",
                ledger.url,
                ledger_store::scrub(&e.to_string(), ledger.url.expose())
            ))
        })?;
        Ok(KeyStore {
            store,
            url: ledger.url.clone(),
        })
    }

    /// A store over an existing ledger pool (`url` is only used to scrub
    /// passwords out of error messages).
    pub fn from_store(store: Store, url: MaskedUrl) -> KeyStore {
        KeyStore { store, url }
    }

    /// The ledger pool underneath.
    pub fn ledger(&self) -> &Store {
        &self.store
    }

    /// Applies the ledger migrations (which create `api_keys`).
    pub async fn migrate(&self) -> Result<(), KeyError> {
        self.store.migrate().await.map_err(|e| {
            KeyError::Store(format!(
                "cannot migrate the ledger at {}: {}",
                self.url,
                ledger_store::scrub(&e.to_string(), self.url.expose())
            ))
        })
    }

    /// Inserts a new virtual key.
    pub async fn insert(&self, new: &NewKeyRow) -> Result<(), KeyError> {
        let r = &new.record;
        let limits = LimitColumns::of(&r.limits);
        let (budget, period) = budget_columns(r.budget);
        let sql_pg = "INSERT INTO api_keys (id, name, team, kind, secret_hash, key_prefix, rpm, \
            input_tpm, output_tpm, max_concurrent, budget_nanousd, budget_period, shadow, \
            created_at, expires_at, revoked_at) \
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)";
        let sql_lite = "INSERT INTO api_keys (id, name, team, kind, secret_hash, key_prefix, rpm, \
            input_tpm, output_tpm, max_concurrent, budget_nanousd, budget_period, shadow, \
            created_at, expires_at, revoked_at) \
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
        let run = async {
            match &self.store {
                Store::Postgres(pool) => sqlx::query(sql_pg)
                    .bind(&r.id)
                    .bind(&r.name)
                    .bind(&r.team)
                    .bind(r.kind.as_str())
                    .bind(&new.secret_hash)
                    .bind(&r.key_prefix)
                    .bind(limits.rpm)
                    .bind(limits.input_tpm)
                    .bind(limits.output_tpm)
                    .bind(limits.max_concurrent)
                    .bind(budget)
                    .bind(period)
                    .bind(r.shadow)
                    .bind(r.created_at)
                    .bind(r.expires_at)
                    .bind(r.revoked_at)
                    .execute(pool)
                    .await
                    .map(|_| ()),
                Store::Sqlite(pool) => sqlx::query(sql_lite)
                    .bind(&r.id)
                    .bind(&r.name)
                    .bind(&r.team)
                    .bind(r.kind.as_str())
                    .bind(&new.secret_hash)
                    .bind(&r.key_prefix)
                    .bind(limits.rpm)
                    .bind(limits.input_tpm)
                    .bind(limits.output_tpm)
                    .bind(limits.max_concurrent)
                    .bind(budget)
                    .bind(period)
                    .bind(r.shadow)
                    .bind(sqlite_timestamp(&r.created_at))
                    .bind(r.expires_at.as_ref().map(sqlite_timestamp))
                    .bind(r.revoked_at.as_ref().map(sqlite_timestamp))
                    .execute(pool)
                    .await
                    .map(|_| ()),
            }
        };
        self.timed(run).await
    }

    /// Inserts the row of a passthrough key unless it exists. Returns whether
    /// it was new.
    pub async fn register_passthrough(
        &self,
        fingerprint: &str,
        secret_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, KeyError> {
        let run = async {
            match &self.store {
                Store::Postgres(pool) => sqlx::query(
                    "INSERT INTO api_keys (id, name, kind, secret_hash, key_prefix, created_at) \
                     VALUES ($1, $1, 'passthrough', $2, $1, $3) ON CONFLICT DO NOTHING",
                )
                .bind(fingerprint)
                .bind(secret_hash)
                .bind(now)
                .execute(pool)
                .await
                .map(|r| r.rows_affected() > 0),
                Store::Sqlite(pool) => sqlx::query(
                    "INSERT INTO api_keys (id, name, kind, secret_hash, key_prefix, created_at) \
                     VALUES (?1, ?1, 'passthrough', ?2, ?1, ?3) ON CONFLICT DO NOTHING",
                )
                .bind(fingerprint)
                .bind(secret_hash)
                .bind(sqlite_timestamp(&now))
                .execute(pool)
                .await
                .map(|r| r.rows_affected() > 0),
            }
        };
        self.timed(run).await
    }

    /// The key with this id.
    pub async fn get(&self, id: &str) -> Result<Option<KeyRecord>, KeyError> {
        self.get_where("id", id).await
    }

    /// The key whose secret has this hex SHA-256.
    pub async fn get_by_hash(&self, secret_hash: &str) -> Result<Option<KeyRecord>, KeyError> {
        self.get_where("secret_hash", secret_hash).await
    }

    async fn get_where(&self, column: &str, value: &str) -> Result<Option<KeyRecord>, KeyError> {
        let run = async {
            match &self.store {
                Store::Postgres(pool) => {
                    let sql = format!("SELECT {COLUMNS} FROM api_keys WHERE {column} = $1");
                    let row = sqlx::query(&sql).bind(value).fetch_optional(pool).await?;
                    row.as_ref().map(read_pg).transpose()
                }
                Store::Sqlite(pool) => {
                    let sql = format!("SELECT {COLUMNS} FROM api_keys WHERE {column} = ?");
                    let row = sqlx::query(&sql).bind(value).fetch_optional(pool).await?;
                    row.as_ref().map(read_sqlite).transpose()
                }
            }
        };
        self.timed_read(run).await
    }

    /// Every key, oldest first.
    pub async fn list(&self) -> Result<Vec<KeyRecord>, KeyError> {
        let sql = format!("SELECT {COLUMNS} FROM api_keys ORDER BY created_at, id");
        let run = async {
            match &self.store {
                Store::Postgres(pool) => {
                    let rows = sqlx::query(&sql).fetch_all(pool).await?;
                    rows.iter().map(read_pg).collect()
                }
                Store::Sqlite(pool) => {
                    let rows = sqlx::query(&sql).fetch_all(pool).await?;
                    rows.iter().map(read_sqlite).collect()
                }
            }
        };
        self.timed_read(run).await
    }

    /// Applies `patch` to a key in one transaction; `None` if there is no such
    /// key. The merged record must pass [`KeyPatch::apply`]'s checks, else
    /// [`UpdateError::Invalid`] and nothing changes.
    pub async fn update(
        &self,
        id: &str,
        patch: &KeyPatch,
    ) -> Result<Option<KeyRecord>, UpdateError> {
        let select_pg = format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1 FOR UPDATE");
        let select_lite = format!("SELECT {COLUMNS} FROM api_keys WHERE id = ?");
        let run = async {
            match &self.store {
                Store::Postgres(pool) => {
                    let mut tx = pool.begin().await?;
                    let Some(row) = sqlx::query(&select_pg)
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?
                    else {
                        return Ok(Ok(None));
                    };
                    let updated = match patched(read_pg(&row), patch)? {
                        Ok(r) => r,
                        Err(e) => return Ok(Err(e)),
                    };
                    let l = LimitColumns::of(&updated.limits);
                    let (budget, period) = budget_columns(updated.budget);
                    sqlx::query(
                        "UPDATE api_keys SET name = $2, team = $3, rpm = $4, input_tpm = $5, \
                         output_tpm = $6, max_concurrent = $7, budget_nanousd = $8, \
                         budget_period = $9, shadow = $10, expires_at = $11 WHERE id = $1",
                    )
                    .bind(id)
                    .bind(&updated.name)
                    .bind(&updated.team)
                    .bind(l.rpm)
                    .bind(l.input_tpm)
                    .bind(l.output_tpm)
                    .bind(l.max_concurrent)
                    .bind(budget)
                    .bind(period)
                    .bind(updated.shadow)
                    .bind(updated.expires_at)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    Ok(Ok(Some(updated)))
                }
                Store::Sqlite(pool) => {
                    // IMMEDIATE takes the write lock before reading, so the
                    // read-modify-write cannot fail half-way on a lock upgrade.
                    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                    let Some(row) = sqlx::query(&select_lite)
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?
                    else {
                        return Ok(Ok(None));
                    };
                    let updated = match patched(read_sqlite(&row), patch)? {
                        Ok(r) => r,
                        Err(e) => return Ok(Err(e)),
                    };
                    let l = LimitColumns::of(&updated.limits);
                    let (budget, period) = budget_columns(updated.budget);
                    sqlx::query(
                        "UPDATE api_keys SET name = ?, team = ?, rpm = ?, input_tpm = ?, \
                         output_tpm = ?, max_concurrent = ?, budget_nanousd = ?, \
                         budget_period = ?, shadow = ?, expires_at = ? WHERE id = ?",
                    )
                    .bind(&updated.name)
                    .bind(&updated.team)
                    .bind(l.rpm)
                    .bind(l.input_tpm)
                    .bind(l.output_tpm)
                    .bind(l.max_concurrent)
                    .bind(budget)
                    .bind(period)
                    .bind(updated.shadow)
                    .bind(updated.expires_at.as_ref().map(sqlite_timestamp))
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    Ok(Ok(Some(updated)))
                }
            }
        };
        match tokio::time::timeout(QUERY_TIMEOUT, run).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(UpdateError::Key(self.error(&e))),
            Err(_) => Err(UpdateError::Key(self.timeout())),
        }
    }

    /// Revokes a key at `now` (a key already revoked keeps its first
    /// revocation time). `None` if there is no such key.
    pub async fn revoke(
        &self,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<KeyRecord>, KeyError> {
        let run = async {
            match &self.store {
                Store::Postgres(pool) => {
                    let sql = format!(
                        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) \
                         WHERE id = $1 RETURNING {COLUMNS}"
                    );
                    let row = sqlx::query(&sql)
                        .bind(id)
                        .bind(now)
                        .fetch_optional(pool)
                        .await?;
                    row.as_ref().map(read_pg).transpose()
                }
                Store::Sqlite(pool) => {
                    let sql = format!(
                        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) \
                         WHERE id = ? RETURNING {COLUMNS}"
                    );
                    let row = sqlx::query(&sql)
                        .bind(sqlite_timestamp(&now))
                        .bind(id)
                        .fetch_optional(pool)
                        .await?;
                    row.as_ref().map(read_sqlite).transpose()
                }
            }
        };
        self.timed_read(run).await
    }

    /// Runs a statement under [`QUERY_TIMEOUT`], mapping its error.
    async fn timed<T>(
        &self,
        run: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, KeyError> {
        match tokio::time::timeout(QUERY_TIMEOUT, run).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(&e)),
            Err(_) => Err(self.timeout()),
        }
    }

    /// Runs a query whose rows are decoded inside it (decoding errors are
    /// already [`KeyError`]s).
    async fn timed_read<T>(
        &self,
        run: impl Future<Output = Result<T, ReadError>>,
    ) -> Result<T, KeyError> {
        match tokio::time::timeout(QUERY_TIMEOUT, run).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(ReadError::Sql(e))) => Err(self.error(&e)),
            Ok(Err(ReadError::Key(e))) => Err(e),
            Err(_) => Err(self.timeout()),
        }
    }

    fn error(&self, e: &sqlx::Error) -> KeyError {
        let message = ledger_store::scrub(&e.to_string(), self.url.expose());
        if ledger_store::is_unreachable(self.store.backend(), e) {
            KeyError::Unavailable(message)
        } else {
            KeyError::Store(message)
        }
    }

    fn timeout(&self) -> KeyError {
        KeyError::Unavailable(format!(
            "{} did not answer within {QUERY_TIMEOUT:?}",
            self.url
        ))
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.store.backend()
    }
}

/// Why an update did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The merged record is invalid; every problem is listed.
    #[error("invalid key: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

/// A query failure inside a read: the driver's, or a row tollgate cannot read.
/// The stored key as `patch` would leave it: the outer error is the store's
/// (retryable), the inner one the key's (unreadable, or the patch is invalid).
fn patched(
    current: Result<KeyRecord, ReadError>,
    patch: &KeyPatch,
) -> Result<Result<KeyRecord, UpdateError>, sqlx::Error> {
    Ok(match current {
        Ok(current) => patch.apply(current).map_err(UpdateError::Invalid),
        Err(ReadError::Sql(e)) => return Err(e),
        Err(ReadError::Key(e)) => Err(UpdateError::Key(e)),
    })
}

enum ReadError {
    Sql(sqlx::Error),
    Key(KeyError),
}

impl From<sqlx::Error> for ReadError {
    fn from(e: sqlx::Error) -> Self {
        ReadError::Sql(e)
    }
}

impl From<KeyError> for ReadError {
    fn from(e: KeyError) -> Self {
        ReadError::Key(e)
    }
}

/// The limit columns as stored (signed 64-bit).
struct LimitColumns {
    rpm: Option<i64>,
    input_tpm: Option<i64>,
    output_tpm: Option<i64>,
    max_concurrent: Option<i64>,
}

impl LimitColumns {
    fn of(l: &KeyLimitsOverride) -> LimitColumns {
        let big = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        LimitColumns {
            rpm: l.rpm.map(i64::from),
            input_tpm: l.input_tpm.map(big),
            output_tpm: l.output_tpm.map(big),
            max_concurrent: l.max_concurrent.map(i64::from),
        }
    }
}

fn budget_columns(budget: Option<Budget>) -> (Option<i64>, Option<&'static str>) {
    match budget {
        Some(b) => (Some(b.nanousd), Some(b.period.as_str())),
        None => (None, None),
    }
}

/// A row's values before they are checked.
struct StoredKey {
    id: String,
    name: String,
    team: Option<String>,
    kind: String,
    key_prefix: String,
    rpm: Option<i64>,
    input_tpm: Option<i64>,
    output_tpm: Option<i64>,
    max_concurrent: Option<i64>,
    budget_nanousd: Option<i64>,
    budget_period: Option<String>,
    shadow: bool,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

fn read_pg(row: &PgRow) -> Result<KeyRecord, ReadError> {
    let stored = StoredKey {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        team: row.try_get("team")?,
        kind: row.try_get("kind")?,
        key_prefix: row.try_get("key_prefix")?,
        rpm: row.try_get("rpm")?,
        input_tpm: row.try_get("input_tpm")?,
        output_tpm: row.try_get("output_tpm")?,
        max_concurrent: row.try_get("max_concurrent")?,
        budget_nanousd: row.try_get("budget_nanousd")?,
        budget_period: row.try_get("budget_period")?,
        shadow: row.try_get("shadow")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
    };
    Ok(stored.check()?)
}

fn read_sqlite(row: &SqliteRow) -> Result<KeyRecord, ReadError> {
    let id: String = row.try_get("id")?;
    let time = |column: &str| -> Result<Option<DateTime<Utc>>, ReadError> {
        let text: Option<String> = row.try_get(column)?;
        text.map(|t| {
            DateTime::parse_from_rfc3339(&t)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| {
                    ReadError::Key(KeyError::Corrupt {
                        id: id.clone(),
                        what: format!("{column} {t:?}: {e}"),
                    })
                })
        })
        .transpose()
    };
    let created_at = time("created_at")?.ok_or_else(|| KeyError::Corrupt {
        id: id.clone(),
        what: "created_at is NULL".into(),
    })?;
    let stored = StoredKey {
        id: id.clone(),
        name: row.try_get("name")?,
        team: row.try_get("team")?,
        kind: row.try_get("kind")?,
        key_prefix: row.try_get("key_prefix")?,
        rpm: row.try_get("rpm")?,
        input_tpm: row.try_get("input_tpm")?,
        output_tpm: row.try_get("output_tpm")?,
        max_concurrent: row.try_get("max_concurrent")?,
        budget_nanousd: row.try_get("budget_nanousd")?,
        budget_period: row.try_get("budget_period")?,
        shadow: row.try_get("shadow")?,
        created_at,
        expires_at: time("expires_at")?,
        revoked_at: time("revoked_at")?,
    };
    Ok(stored.check()?)
}

impl StoredKey {
    /// Checks the stored values and builds the record.
    fn check(self) -> Result<KeyRecord, KeyError> {
        let id = self.id;
        let corrupt = |what: String| KeyError::Corrupt {
            id: id.clone(),
            what,
        };
        let kind =
            KeyKind::parse(&self.kind).ok_or_else(|| corrupt(format!("kind {:?}", self.kind)))?;
        let small = |name: &str, v: Option<i64>| -> Result<Option<u32>, KeyError> {
            v.map(|v| u32::try_from(v).map_err(|_| corrupt(format!("{name} {v}"))))
                .transpose()
        };
        let big = |name: &str, v: Option<i64>| -> Result<Option<u64>, KeyError> {
            v.map(|v| u64::try_from(v).map_err(|_| corrupt(format!("{name} {v}"))))
                .transpose()
        };
        let limits = KeyLimitsOverride {
            rpm: small("rpm", self.rpm)?,
            input_tpm: big("input_tpm", self.input_tpm)?,
            output_tpm: big("output_tpm", self.output_tpm)?,
            max_concurrent: small("max_concurrent", self.max_concurrent)?,
        };
        let budget = match (self.budget_nanousd, self.budget_period.as_deref()) {
            (None, None) => None,
            (Some(nanousd), Some(period)) if nanousd >= 0 => Some(Budget {
                nanousd,
                period: BudgetPeriod::parse(period)
                    .ok_or_else(|| corrupt(format!("budget_period {period:?}")))?,
            }),
            // A budget without a period is read as monthly, the default period.
            (Some(nanousd), None) if nanousd >= 0 => Some(Budget {
                nanousd,
                period: BudgetPeriod::Month,
            }),
            // A period without an amount caps nothing.
            (None, Some(_)) => None,
            (Some(nanousd), _) => return Err(corrupt(format!("budget_nanousd {nanousd}"))),
        };
        Ok(KeyRecord {
            id,
            name: self.name,
            team: self.team,
            kind,
            key_prefix: self.key_prefix,
            limits,
            budget,
            shadow: self.shadow,
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
        })
    }
}
