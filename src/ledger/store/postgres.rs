//! Postgres queries of the ledger.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use sqlx::postgres::PgPool;

use crate::record::UsageRecord;

use super::super::report::{GroupBy, ReportQuery, ReportRow};
use super::{CostUpdate, PricedRow, to_i64};

/// One statement inserts the whole batch: each column is bound as one array
/// and `UNNEST` turns the arrays back into rows, so the statement has 34
/// parameters whatever the batch size.
const INSERT: &str = "INSERT INTO usage_events (
    request_id, upstream_request_id, message_id, key_id, team, model, endpoint, stream,
    status, outcome, error_type, stop_reason, input_tokens, output_tokens,
    cache_creation_input_tokens, cache_creation_5m_tokens, cache_creation_1h_tokens,
    cache_read_input_tokens, web_search_requests, service_tier, inference_geo, usage_exact,
    cost_nanousd, price_version, end_user, tags, attempts, queued_ms, ttfb_ms, duration_ms,
    started_at, finished_at, long_context_beta, meter_errors)
SELECT * FROM UNNEST(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bool[],
    $9::int4[], $10::text[], $11::text[], $12::text[], $13::int8[], $14::int8[],
    $15::int8[], $16::int8[], $17::int8[],
    $18::int8[], $19::int8[], $20::text[], $21::text[], $22::bool[],
    $23::int8[], $24::text[], $25::text[], $26::text[], $27::int4[], $28::int8[], $29::int8[], $30::int8[],
    $31::timestamptz[], $32::timestamptz[], $33::bool[], $34::int4[])
ON CONFLICT (request_id) DO NOTHING";

/// Postgres text cannot hold NUL characters; one in client-supplied text
/// (`metadata.user_id`, tags) would make the row impossible to insert.
fn text(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_owned()
    }
}

fn opt_text(s: &Option<String>) -> Option<String> {
    s.as_deref().map(text)
}

fn to_i32(n: u64) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The batch, column by column.
#[derive(Default)]
struct Columns {
    request_id: Vec<String>,
    upstream_request_id: Vec<Option<String>>,
    message_id: Vec<Option<String>>,
    key_id: Vec<String>,
    team: Vec<Option<String>>,
    model: Vec<Option<String>>,
    endpoint: Vec<String>,
    stream: Vec<bool>,
    status: Vec<i32>,
    outcome: Vec<String>,
    error_type: Vec<Option<String>>,
    stop_reason: Vec<Option<String>>,
    input_tokens: Vec<i64>,
    output_tokens: Vec<i64>,
    cache_creation_input_tokens: Vec<i64>,
    cache_creation_5m_tokens: Vec<Option<i64>>,
    cache_creation_1h_tokens: Vec<Option<i64>>,
    cache_read_input_tokens: Vec<i64>,
    web_search_requests: Vec<i64>,
    service_tier: Vec<Option<String>>,
    inference_geo: Vec<Option<String>>,
    usage_exact: Vec<bool>,
    cost_nanousd: Vec<Option<i64>>,
    price_version: Vec<Option<String>>,
    end_user: Vec<Option<String>>,
    tags: Vec<Option<String>>,
    attempts: Vec<i32>,
    queued_ms: Vec<i64>,
    ttfb_ms: Vec<Option<i64>>,
    duration_ms: Vec<i64>,
    started_at: Vec<DateTime<Utc>>,
    finished_at: Vec<DateTime<Utc>>,
    long_context_beta: Vec<bool>,
    meter_errors: Vec<i32>,
}

impl Columns {
    fn push(&mut self, r: &UsageRecord) {
        let u = &r.usage;
        self.request_id.push(text(&r.request_id));
        self.upstream_request_id
            .push(opt_text(&r.upstream_request_id));
        self.message_id.push(opt_text(&r.message_id));
        self.key_id.push(text(&r.key_id));
        self.team.push(opt_text(&r.team));
        self.model.push(opt_text(&r.model));
        self.endpoint.push(text(&r.endpoint));
        self.stream.push(r.stream);
        self.status.push(i32::from(r.status));
        self.outcome.push(r.outcome.as_str().to_owned());
        self.error_type.push(opt_text(&r.error_type));
        self.stop_reason.push(opt_text(&r.stop_reason));
        self.input_tokens.push(to_i64(u.input_tokens));
        self.output_tokens.push(to_i64(u.output_tokens));
        self.cache_creation_input_tokens
            .push(to_i64(u.cache_creation_input_tokens));
        self.cache_creation_5m_tokens
            .push(u.cache_creation_5m_tokens.map(to_i64));
        self.cache_creation_1h_tokens
            .push(u.cache_creation_1h_tokens.map(to_i64));
        self.cache_read_input_tokens
            .push(to_i64(u.cache_read_input_tokens));
        self.web_search_requests.push(to_i64(u.web_search_requests));
        self.service_tier.push(opt_text(&u.service_tier));
        self.inference_geo.push(opt_text(&u.inference_geo));
        self.usage_exact.push(r.usage_exact);
        self.cost_nanousd.push(r.cost_nanousd);
        self.price_version.push(opt_text(&r.price_version));
        self.end_user.push(opt_text(&r.end_user));
        self.tags.push(opt_text(&r.tags));
        self.attempts.push(to_i32(u64::from(r.attempts)));
        self.queued_ms.push(to_i64(r.queued_ms));
        self.ttfb_ms.push(r.ttfb_ms.map(to_i64));
        self.duration_ms.push(to_i64(r.duration_ms));
        self.started_at.push(r.started_at);
        self.finished_at.push(r.finished_at);
        self.long_context_beta.push(r.long_context_beta);
        self.meter_errors.push(to_i32(u64::from(r.meter_errors)));
    }
}

pub(super) async fn insert(pool: &PgPool, records: &[UsageRecord]) -> Result<u64, sqlx::Error> {
    let mut c = Columns::default();
    for r in records {
        c.push(r);
    }
    let result = sqlx::query(INSERT)
        .bind(c.request_id)
        .bind(c.upstream_request_id)
        .bind(c.message_id)
        .bind(c.key_id)
        .bind(c.team)
        .bind(c.model)
        .bind(c.endpoint)
        .bind(c.stream)
        .bind(c.status)
        .bind(c.outcome)
        .bind(c.error_type)
        .bind(c.stop_reason)
        .bind(c.input_tokens)
        .bind(c.output_tokens)
        .bind(c.cache_creation_input_tokens)
        .bind(c.cache_creation_5m_tokens)
        .bind(c.cache_creation_1h_tokens)
        .bind(c.cache_read_input_tokens)
        .bind(c.web_search_requests)
        .bind(c.service_tier)
        .bind(c.inference_geo)
        .bind(c.usage_exact)
        .bind(c.cost_nanousd)
        .bind(c.price_version)
        .bind(c.end_user)
        .bind(c.tags)
        .bind(c.attempts)
        .bind(c.queued_ms)
        .bind(c.ttfb_ms)
        .bind(c.duration_ms)
        .bind(c.started_at)
        .bind(c.finished_at)
        .bind(c.long_context_beta)
        .bind(c.meter_errors)
        .execute(pool)
        .await?;
    Ok(result.rows_affected())
}

fn group_expr(g: GroupBy) -> &'static str {
    match g {
        GroupBy::Key => "key_id",
        GroupBy::Team => "team",
        GroupBy::Model => "model",
        GroupBy::Day => "to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        GroupBy::EndUser => "end_user",
    }
}

pub(super) async fn usage_report(
    pool: &PgPool,
    query: &ReportQuery,
) -> Result<Vec<ReportRow>, sqlx::Error> {
    let groups: Vec<&str> = query.group_by.iter().map(|g| group_expr(*g)).collect();
    let mut sql = String::from("SELECT ");
    for g in &groups {
        sql.push_str(g);
        sql.push_str(", ");
    }
    sql.push_str(
        "count(*)::int8, coalesce(sum(input_tokens), 0)::int8, coalesce(sum(output_tokens), 0)::int8,
         coalesce(sum(cache_creation_input_tokens), 0)::int8, coalesce(sum(cache_read_input_tokens), 0)::int8,
         coalesce(sum(web_search_requests), 0)::int8, coalesce(sum(cost_nanousd), 0)::int8,
         count(*) FILTER (WHERE cost_nanousd IS NULL)::int8
         FROM usage_events
         WHERE ($1::timestamptz IS NULL OR started_at >= $1) AND ($2::timestamptz IS NULL OR started_at < $2)",
    );
    sql.push_str(&super::group_by_positions(groups.len()));
    let rows = sqlx::query(&sql)
        .bind(query.since)
        .bind(query.until)
        .fetch_all(pool)
        .await?;
    super::report_rows(rows, groups.len())
}

pub(super) async fn priced_rows(
    pool: &PgPool,
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
         WHERE ($1::timestamptz IS NULL OR started_at >= $1)
           AND ($2::timestamptz IS NULL OR started_at < $2)
           AND request_id > $3
         ORDER BY request_id
         LIMIT $4",
    )
    .bind(since)
    .bind(until)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(super::priced_row).collect()
}

pub(super) async fn update_costs(pool: &PgPool, updates: &[CostUpdate]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    update_all(&mut tx, updates).await?;
    tx.commit().await
}

async fn update_all(conn: &mut PgConnection, updates: &[CostUpdate]) -> Result<(), sqlx::Error> {
    let ids: Vec<&str> = updates.iter().map(|u| u.request_id.as_str()).collect();
    let costs: Vec<Option<i64>> = updates.iter().map(|u| u.cost_nanousd).collect();
    let versions: Vec<&str> = updates.iter().map(|u| u.price_version.as_str()).collect();
    sqlx::query(
        "UPDATE usage_events AS e SET cost_nanousd = u.cost, price_version = u.version
         FROM UNNEST($1::text[], $2::int8[], $3::text[]) AS u(id, cost, version)
         WHERE e.request_id = u.id",
    )
    .bind(ids)
    .bind(costs)
    .bind(versions)
    .execute(conn)
    .await?;
    Ok(())
}
