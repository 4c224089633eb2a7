//! Reading spend from the ledger: the sum of `usage_events.cost_nanousd` of a
//! key since the start of the current UTC day and month (rows without a cost,
//! unknown models, count as 0). Both sums come from one query over the
//! `(key_id, started_at)` index.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Row as _;

use super::BudgetPeriod;
use super::totals::Sums;
use crate::ledger::store::{self as ledger_store, Store, sqlite_timestamp};
use crate::secret::MaskedUrl;

/// Longest a seeding query may take; past it the key is decided locally and
/// seeded again later.
const SEED_TIMEOUT: Duration = Duration::from_secs(5);

/// The ledger pool, and its URL to scrub passwords out of error messages.
#[derive(Debug, Clone)]
pub(crate) struct Ledger {
    store: Store,
    url: MaskedUrl,
}

impl Ledger {
    pub(crate) fn new(store: Store, url: MaskedUrl) -> Ledger {
        Ledger { store, url }
    }

    fn error(&self, e: &sqlx::Error) -> String {
        ledger_store::scrub(&e.to_string(), self.url.expose())
    }
}

/// The periods a seed at `now` covers.
fn starts(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    (BudgetPeriod::Day.start(now), BudgetPeriod::Month.start(now))
}

/// One key's spend in the day and month containing `now`.
pub(super) async fn key_sums(
    ledger: &Ledger,
    key_id: &str,
    now: DateTime<Utc>,
) -> Result<Sums, String> {
    let (day_start, month_start) = starts(now);
    let run = async {
        let (day, month): (i64, i64) = match &ledger.store {
            Store::Postgres(pool) => {
                let row = sqlx::query(
                    "SELECT COALESCE(SUM(CASE WHEN started_at >= $2 THEN cost_nanousd ELSE 0 END), 0)::bigint AS day, \
                            COALESCE(SUM(cost_nanousd), 0)::bigint AS month \
                     FROM usage_events WHERE key_id = $1 AND started_at >= $3",
                )
                .bind(key_id)
                .bind(day_start)
                .bind(month_start)
                .fetch_one(pool)
                .await?;
                (row.try_get("day")?, row.try_get("month")?)
            }
            Store::Sqlite(pool) => {
                let row = sqlx::query(
                    "SELECT COALESCE(SUM(CASE WHEN started_at >= ?2 THEN cost_nanousd ELSE 0 END), 0) AS day, \
                            COALESCE(SUM(cost_nanousd), 0) AS month \
                     FROM usage_events WHERE key_id = ?1 AND started_at >= ?3",
                )
                .bind(key_id)
                .bind(sqlite_timestamp(&day_start))
                .bind(sqlite_timestamp(&month_start))
                .fetch_one(pool)
                .await?;
                (row.try_get("day")?, row.try_get("month")?)
            }
        };
        Ok::<_, sqlx::Error>(Sums {
            day_start,
            day,
            month_start,
            month,
        })
    };
    match tokio::time::timeout(SEED_TIMEOUT, run).await {
        Ok(Ok(sums)) => Ok(sums),
        Ok(Err(e)) => Err(ledger.error(&e)),
        Err(_) => Err(format!("the ledger did not answer within {SEED_TIMEOUT:?}")),
    }
}

/// The spend in the day and month containing `now` of every unrevoked key
/// with a budget (0 for those without usage).
pub(super) async fn budgeted_sums(
    ledger: &Ledger,
    now: DateTime<Utc>,
) -> Result<Vec<(String, Sums)>, String> {
    let (day_start, month_start) = starts(now);
    let run = async {
        let rows: Vec<(String, i64, i64)> = match &ledger.store {
            Store::Postgres(pool) => {
                let rows = sqlx::query(
                    "SELECT k.id AS id, \
                            COALESCE(SUM(CASE WHEN e.started_at >= $1 THEN e.cost_nanousd ELSE 0 END), 0)::bigint AS day, \
                            COALESCE(SUM(e.cost_nanousd), 0)::bigint AS month \
                     FROM api_keys k \
                     LEFT JOIN usage_events e ON e.key_id = k.id AND e.started_at >= $2 \
                     WHERE k.budget_nanousd IS NOT NULL AND k.revoked_at IS NULL \
                     GROUP BY k.id",
                )
                .bind(day_start)
                .bind(month_start)
                .fetch_all(pool)
                .await?;
                rows.iter()
                    .map(|r| Ok((r.try_get("id")?, r.try_get("day")?, r.try_get("month")?)))
                    .collect::<Result<_, sqlx::Error>>()?
            }
            Store::Sqlite(pool) => {
                let rows = sqlx::query(
                    "SELECT k.id AS id, \
                            COALESCE(SUM(CASE WHEN e.started_at >= ?1 THEN e.cost_nanousd ELSE 0 END), 0) AS day, \
                            COALESCE(SUM(e.cost_nanousd), 0) AS month \
                     FROM api_keys k \
                     LEFT JOIN usage_events e ON e.key_id = k.id AND e.started_at >= ?2 \
                     WHERE k.budget_nanousd IS NOT NULL AND k.revoked_at IS NULL \
                     GROUP BY k.id",
                )
                .bind(sqlite_timestamp(&day_start))
                .bind(sqlite_timestamp(&month_start))
                .fetch_all(pool)
                .await?;
                rows.iter()
                    .map(|r| Ok((r.try_get("id")?, r.try_get("day")?, r.try_get("month")?)))
                    .collect::<Result<_, sqlx::Error>>()?
            }
        };
        Ok::<_, sqlx::Error>(
            rows.into_iter()
                .map(|(id, day, month)| {
                    (
                        id,
                        Sums {
                            day_start,
                            day,
                            month_start,
                            month,
                        },
                    )
                })
                .collect(),
        )
    };
    match tokio::time::timeout(SEED_TIMEOUT, run).await {
        Ok(Ok(all)) => Ok(all),
        Ok(Err(e)) => Err(ledger.error(&e)),
        Err(_) => Err(format!("the ledger did not answer within {SEED_TIMEOUT:?}")),
    }
}
