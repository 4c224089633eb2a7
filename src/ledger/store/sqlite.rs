//! SQLite queries of the ledger. Timestamps are bound as
//! [`sqlite_timestamp`] text.

use chrono::{DateTime, Utc};
use sqlx::QueryBuilder;
use sqlx::sqlite::{Sqlite, SqlitePool};

use crate::record::UsageRecord;

use super::super::report::{GroupBy, ReportQuery, ReportRow};
use super::{CostUpdate, PricedRow, sqlite_timestamp, to_i64};

/// SQLite allows 32,766 bound values per statement; at 34 columns a row,
/// batches are split into statements of this many rows.
const ROWS_PER_STATEMENT: usize = 900;

const INSERT_PREFIX: &str = "INSERT INTO usage_events (
    request_id, upstream_request_id, message_id, key_id, team, model, endpoint, stream,
    status, outcome, error_type, stop_reason, input_tokens, output_tokens,
    cache_creation_input_tokens, cache_creation_5m_tokens, cache_creation_1h_tokens,
    cache_read_input_tokens, web_search_requests, service_tier, inference_geo, usage_exact,
    cost_nanousd, price_version, end_user, tags, attempts, queued_ms, ttfb_ms, duration_ms,
    started_at, finished_at, long_context_beta, meter_errors) ";

pub(super) async fn insert(pool: &SqlitePool, records: &[UsageRecord]) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut inserted = 0;
    for chunk in records.chunks(ROWS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<Sqlite>::new(INSERT_PREFIX);
        qb.push_values(chunk, |mut b, r| {
            let u = &r.usage;
            b.push_bind(r.request_id.as_str())
                .push_bind(r.upstream_request_id.as_deref())
                .push_bind(r.message_id.as_deref())
                .push_bind(r.key_id.as_str())
                .push_bind(r.team.as_deref())
                .push_bind(r.model.as_deref())
                .push_bind(r.endpoint.as_str())
                .push_bind(r.stream)
                .push_bind(i64::from(r.status))
                .push_bind(r.outcome.as_str())
                .push_bind(r.error_type.as_deref())
                .push_bind(r.stop_reason.as_deref())
                .push_bind(to_i64(u.input_tokens))
                .push_bind(to_i64(u.output_tokens))
                .push_bind(to_i64(u.cache_creation_input_tokens))
                .push_bind(u.cache_creation_5m_tokens.map(to_i64))
                .push_bind(u.cache_creation_1h_tokens.map(to_i64))
                .push_bind(to_i64(u.cache_read_input_tokens))
                .push_bind(to_i64(u.web_search_requests))
                .push_bind(u.service_tier.as_deref())
                .push_bind(u.inference_geo.as_deref())
                .push_bind(r.usage_exact)
                .push_bind(r.cost_nanousd)
                .push_bind(r.price_version.as_deref())
                .push_bind(r.end_user.as_deref())
                .push_bind(r.tags.as_deref())
                .push_bind(i64::from(r.attempts))
                .push_bind(to_i64(r.queued_ms))
                .push_bind(r.ttfb_ms.map(to_i64))
                .push_bind(to_i64(r.duration_ms))
                .push_bind(sqlite_timestamp(&r.started_at))
                .push_bind(sqlite_timestamp(&r.finished_at))
                .push_bind(r.long_context_beta)
                .push_bind(i64::from(r.meter_errors));
        });
        qb.push(" ON CONFLICT (request_id) DO NOTHING");
        inserted += qb.build().execute(&mut *tx).await?.rows_affected();
    }
    tx.commit().await?;
    Ok(inserted)
}

fn group_expr(g: GroupBy) -> &'static str {
    match g {
        GroupBy::Key => "key_id",
        GroupBy::Team => "team",
        GroupBy::Model => "model",
        GroupBy::Day => "substr(started_at, 1, 10)",
        GroupBy::EndUser => "end_user",
    }
}

pub(super) async fn usage_report(
    pool: &SqlitePool,
    query: &ReportQuery,
) -> Result<Vec<ReportRow>, sqlx::Error> {
    let groups: Vec<&str> = query.group_by.iter().map(|g| group_expr(*g)).collect();
    let mut sql = String::from("SELECT ");
    for g in &groups {
        sql.push_str(g);
        sql.push_str(", ");
    }
    sql.push_str(
        "count(*), coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0),
         coalesce(sum(cache_creation_input_tokens), 0), coalesce(sum(cache_read_input_tokens), 0),
         coalesce(sum(web_search_requests), 0), coalesce(sum(cost_nanousd), 0),
         coalesce(sum(CASE WHEN cost_nanousd IS NULL THEN 1 ELSE 0 END), 0)
         FROM usage_events
         WHERE (?1 IS NULL OR started_at >= ?1) AND (?2 IS NULL OR started_at < ?2)",
    );
    sql.push_str(&super::group_by_positions(groups.len()));
    let rows = sqlx::query(&sql)
        .bind(query.since.as_ref().map(sqlite_timestamp))
        .bind(query.until.as_ref().map(sqlite_timestamp))
        .fetch_all(pool)
        .await?;
    super::report_rows(rows, groups.len())
}

pub(super) async fn priced_rows(
    pool: &SqlitePool,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    after: &str,
    limit: i64,
) -> Result<Vec<PricedRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT request_id, model, input_tokens, output_tokens, cache_creation_input_tokens,
                cache_creation_5m_tokens, cache_creation_1h_tokens, cache_read_input_tokens,
                web_search_requests, service_tier, inference_geo, long_context_beta,
                cost_nanousd, price_version
         FROM usage_events
         WHERE (?1 IS NULL OR started_at >= ?1)
           AND (?2 IS NULL OR started_at < ?2)
           AND request_id > ?3
         ORDER BY request_id
         LIMIT ?4",
    )
    .bind(since.as_ref().map(sqlite_timestamp))
    .bind(until.as_ref().map(sqlite_timestamp))
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(super::priced_row).collect()
}

pub(super) async fn update_costs(
    pool: &SqlitePool,
    updates: &[CostUpdate],
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for u in updates {
        sqlx::query(
            "UPDATE usage_events SET cost_nanousd = ?1, price_version = ?2 WHERE request_id = ?3",
        )
        .bind(u.cost_nanousd)
        .bind(u.price_version.as_str())
        .bind(u.request_id.as_str())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}
