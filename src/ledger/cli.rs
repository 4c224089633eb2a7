//! The ledger's subcommands: `tollgate migrate`, `tollgate usage` and
//! `tollgate reprice`. Each reads the configured `ledger.url`; output goes to
//! stdout, logs to stderr.

use std::io::Write as _;

use anyhow::Context as _;
use chrono::{DateTime, Utc};

use crate::config::Config;
use crate::prices::{CostQuery, PriceTable};

use super::report::{self, Format, GroupBy, ReportQuery};
use super::store::{CostUpdate, Store};

/// Rows read and updated per round trip by `reprice`.
const REPRICE_PAGE: i64 = 1000;

/// `tollgate usage`: usage totals from the ledger.
#[derive(Debug, Clone, clap::Args)]
pub struct UsageArgs {
    /// Start of the range (inclusive): a date (UTC midnight) like 2025-06-01,
    /// or an RFC 3339 time.
    #[arg(long, value_name = "DATE|TIME", value_parser = report::parse_since)]
    pub since: Option<DateTime<Utc>>,
    /// End of the range: a date includes that whole UTC day; an RFC 3339 time
    /// is exclusive.
    #[arg(long, value_name = "DATE|TIME", value_parser = report::parse_until)]
    pub until: Option<DateTime<Utc>>,
    /// Group by these, in order (repeat the flag or separate with commas).
    #[arg(
        long = "group-by",
        value_enum,
        value_delimiter = ',',
        default_value = "model"
    )]
    pub group_by: Vec<GroupBy>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

/// `tollgate reprice`: recompute stored costs with the current price table.
#[derive(Debug, Clone, clap::Args)]
pub struct RepriceArgs {
    /// Reprice requests started from this date (UTC midnight) or RFC 3339 time.
    #[arg(long, value_name = "DATE|TIME", value_parser = report::parse_since)]
    pub since: DateTime<Utc>,
    /// ...up to this one (a date includes that whole UTC day).
    #[arg(long, value_name = "DATE|TIME", value_parser = report::parse_until)]
    pub until: Option<DateTime<Utc>>,
    /// Report what would change without writing.
    #[arg(long)]
    pub dry_run: bool,
}

/// What `reprice` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepriceSummary {
    /// Rows in the range.
    pub examined: u64,
    /// Rows whose cost or price version changed.
    pub changed: u64,
    /// Rows left without a cost (their model is not in the table).
    pub unpriced: u64,
    /// Sum of the cost changes, in nano-dollars (new minus old; unpriced as 0).
    pub delta_nanousd: i64,
}

/// `tollgate migrate`: applies the ledger migrations to `ledger.url`.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let ledger = &config.raw.ledger;
    let store = Store::open_lazy(ledger.url.expose(), true)
        .with_context(|| format!("cannot use ledger.url {}", ledger.url))?;
    let result = store.migrate().await;
    store.close().await;
    result.map_err(|e| {
        anyhow::anyhow!(super::store::scrub(&e.to_string(), ledger.url.expose()))
            .context(format!("cannot migrate the ledger at {}", ledger.url))
    })?;
    println!("ledger at {} is up to date", ledger.url);
    Ok(())
}

/// Opens the configured ledger for reading (it must exist).
async fn open_existing(config: &Config) -> anyhow::Result<Store> {
    let ledger = &config.raw.ledger;
    Store::connect(ledger.url.expose(), false)
        .await
        .map_err(|e| {
            anyhow::anyhow!(super::store::scrub(&e.to_string(), ledger.url.expose()))
                .context(format!("cannot open the ledger at {}", ledger.url))
        })
}

/// `tollgate usage`: prints usage totals.
pub async fn usage(config: &Config, args: UsageArgs) -> anyhow::Result<()> {
    let store = open_existing(config).await?;
    let mut group_by = Vec::new();
    for g in args.group_by {
        if !group_by.contains(&g) {
            group_by.push(g);
        }
    }
    let query = ReportQuery {
        since: args.since,
        until: args.until,
        group_by,
    };
    let rows = store.usage_report(&query).await;
    store.close().await;
    let rows = rows.map_err(|e| {
        anyhow::anyhow!(super::store::scrub(
            &e.to_string(),
            config.raw.ledger.url.expose()
        ))
        .context("cannot read usage from the ledger (has `tollgate migrate` run?)")
    })?;
    let out = report::render(&query, &rows, args.format);
    std::io::stdout().lock().write_all(out.as_bytes())?;
    Ok(())
}

/// `tollgate reprice`: recomputes `cost_nanousd` and `price_version` from the
/// stored token columns with the configured price table, and prints a summary.
pub async fn reprice(config: &Config, args: RepriceArgs) -> anyhow::Result<()> {
    let pricer = crate::prices::load_configured(&config.raw.prices, &prometheus::Registry::new())
        .context("cannot load the price table")?;
    let store = open_existing(config).await?;
    let result = reprice_store(&store, pricer.table(), args.since, args.until, args.dry_run).await;
    store.close().await;
    let summary = result.map_err(|e| {
        anyhow::anyhow!(super::store::scrub(
            &e.to_string(),
            config.raw.ledger.url.expose()
        ))
        .context("cannot reprice the ledger")
    })?;
    println!(
        "{} {} of {} rows to price version {} (cost change {} USD); {} rows have no price",
        if args.dry_run {
            "would reprice"
        } else {
            "repriced"
        },
        summary.changed,
        summary.examined,
        pricer.table().version(),
        report::usd(summary.delta_nanousd),
        summary.unpriced,
    );
    Ok(())
}

/// Reprices the rows started in `[since, until)`, a page at a time. Rows whose
/// cost and version are already right are left alone, so a second run changes
/// nothing.
pub async fn reprice_store(
    store: &Store,
    table: &PriceTable,
    since: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
    dry_run: bool,
) -> Result<RepriceSummary, sqlx::Error> {
    let version = table.version().to_owned();
    let mut summary = RepriceSummary::default();
    let mut after = String::new();
    loop {
        let page = store
            .priced_rows(Some(since), until, &after, REPRICE_PAGE)
            .await?;
        let Some(last) = page.last() else { break };
        after = last.request_id.clone();
        let mut updates = Vec::new();
        for row in &page {
            summary.examined += 1;
            let cost = table.cost(&CostQuery {
                model: row.model.as_deref().unwrap_or(""),
                usage: &row.usage,
                long_context_beta: row.long_context_beta,
            });
            if cost.is_none() {
                summary.unpriced += 1;
            }
            if cost != row.cost_nanousd || row.price_version.as_deref() != Some(version.as_str()) {
                summary.changed += 1;
                summary.delta_nanousd += cost.unwrap_or(0) - row.cost_nanousd.unwrap_or(0);
                updates.push(CostUpdate {
                    request_id: row.request_id.clone(),
                    cost_nanousd: cost,
                    price_version: version.clone(),
                });
            }
        }
        if !dry_run {
            store.update_costs(&updates).await?;
        }
        if (page.len() as i64) < REPRICE_PAGE {
            break;
        }
    }
    Ok(summary)
}
