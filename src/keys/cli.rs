//! `tollgate keys create|list|show|update|revoke`: key management against the
//! configured `ledger.url` (SQLite or Postgres). Output goes to stdout, logs to
//! stderr. `create` prints the new key's secret exactly once; nothing else ever
//! prints it (tollgate only has its hash). With `ledger.migrate` (the default)
//! the ledger's migrations are applied first, so keys can be created before
//! the gateway first ran.

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::Context as _;
use chrono::{DateTime, Utc};

use super::manage::{self, CreateError, KeyPatch, KeySpec, KeyView};
use super::store::UpdateError;
use super::{KeyLimitsOverride, KeyRecord, KeyStore};
use crate::budget::{BudgetPeriod, parse_usd};
use crate::config::Config;

/// `tollgate keys`.
#[derive(Debug, Clone, clap::Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub command: KeysCommand,
}

/// The key subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeysCommand {
    /// Create a virtual key; prints its secret once (store it now).
    Create(CreateArgs),
    /// List every key (never their secrets).
    List(ListArgs),
    /// Show one key.
    Show(ShowArgs),
    /// Change a key's name, team, limits, budget, expiry or shadow mode.
    Update(UpdateArgs),
    /// Revoke a key: it is refused within `auth.key_cache_ttl` on every replica.
    Revoke(ShowArgs),
}

/// How results are printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns (list) or one field per line, for people.
    #[default]
    Table,
    /// JSON, as the admin API returns it.
    Json,
}

/// Values a key can be created or updated with.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KeyValues {
    /// The key's team (recorded on its usage rows).
    #[arg(long)]
    pub team: Option<String>,
    /// Requests per minute (default: limits.rpm).
    #[arg(long)]
    pub rpm: Option<u32>,
    /// Input tokens per minute, cache reads not counted (default: limits.input_tpm).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=i64::MAX as u64))]
    pub input_tpm: Option<u64>,
    /// Output tokens per minute (default: limits.output_tpm).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=i64::MAX as u64))]
    pub output_tpm: Option<u64>,
    /// Requests in flight at once (default: limits.max_concurrent).
    #[arg(long)]
    pub max_concurrent: Option<u32>,
    /// Spend cap in US dollars per budget period, e.g. 12.50 (exact to the nano-dollar).
    #[arg(long, value_name = "USD", value_parser = parse_usd)]
    pub budget_usd: Option<i64>,
    /// The budget's period, in UTC (default: month).
    #[arg(long, value_name = "day|month", value_parser = parse_period)]
    pub budget_period: Option<BudgetPeriod>,
    /// When the key stops working: a date (2027-01-01, UTC midnight), an RFC 3339
    /// time, or a duration from now (30d).
    #[arg(long, value_name = "DATE|TIME|DURATION")]
    pub expires: Option<String>,
}

/// `tollgate keys create`.
#[derive(Debug, Clone, clap::Args)]
pub struct CreateArgs {
    /// A name for people (e.g. the application).
    #[arg(long)]
    pub name: String,
    #[command(flatten)]
    pub values: KeyValues,
    /// Evaluate and count limits and budget, but do not enforce them.
    #[arg(long)]
    pub shadow: bool,
    #[arg(long, value_enum, default_value = "table")]
    pub format: OutputFormat,
}

/// `tollgate keys list`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    #[arg(long, value_enum, default_value = "table")]
    pub format: OutputFormat,
}

/// `tollgate keys show ID` and `tollgate keys revoke ID`.
#[derive(Debug, Clone, clap::Args)]
pub struct ShowArgs {
    /// The key id (`key_…`, or a passthrough fingerprint `pt_…`).
    pub id: String,
    #[arg(long, value_enum, default_value = "table")]
    pub format: OutputFormat,
}

/// `tollgate keys update ID`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpdateArgs {
    /// The key id.
    pub id: String,
    /// A new name.
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub values: KeyValues,
    /// Put the key in shadow mode.
    #[arg(long, conflicts_with = "no_shadow")]
    pub shadow: bool,
    /// Enforce the key's limits and budget again.
    #[arg(long)]
    pub no_shadow: bool,
    /// Remove the team.
    #[arg(long, conflicts_with = "team")]
    pub clear_team: bool,
    /// Use limits.rpm again.
    #[arg(long, conflicts_with = "rpm")]
    pub clear_rpm: bool,
    /// Use limits.input_tpm again.
    #[arg(long, conflicts_with = "input_tpm")]
    pub clear_input_tpm: bool,
    /// Use limits.output_tpm again.
    #[arg(long, conflicts_with = "output_tpm")]
    pub clear_output_tpm: bool,
    /// Use limits.max_concurrent again.
    #[arg(long, conflicts_with = "max_concurrent")]
    pub clear_max_concurrent: bool,
    /// Remove the budget.
    #[arg(long, conflicts_with_all = ["budget_usd", "budget_period"])]
    pub clear_budget: bool,
    /// Make the key never expire.
    #[arg(long, conflicts_with = "expires")]
    pub clear_expires: bool,
    #[arg(long, value_enum, default_value = "table")]
    pub format: OutputFormat,
}

fn parse_period(s: &str) -> Result<BudgetPeriod, String> {
    BudgetPeriod::parse(s).ok_or_else(|| format!("{s:?} is not a budget period: day or month"))
}

/// Clears a value when its `--clear-…` flag is given, sets it when given.
fn change<T: Clone>(clear: bool, value: &Option<T>) -> Option<Option<T>> {
    if clear {
        Some(None)
    } else {
        value.clone().map(Some)
    }
}

impl UpdateArgs {
    /// The change these flags ask for.
    fn patch(&self, now: DateTime<Utc>) -> anyhow::Result<KeyPatch> {
        let v = &self.values;
        let expires_at = match (&v.expires, self.clear_expires) {
            (_, true) => Some(None),
            (Some(text), false) => Some(Some(
                manage::parse_expiry(text, now).map_err(anyhow::Error::msg)?,
            )),
            (None, false) => None,
        };
        Ok(KeyPatch {
            name: self.name.clone(),
            team: change(self.clear_team, &v.team),
            rpm: change(self.clear_rpm, &v.rpm),
            input_tpm: change(self.clear_input_tpm, &v.input_tpm),
            output_tpm: change(self.clear_output_tpm, &v.output_tpm),
            max_concurrent: change(self.clear_max_concurrent, &v.max_concurrent),
            budget_nanousd: change(self.clear_budget, &v.budget_usd),
            budget_period: v.budget_period,
            shadow: match (self.shadow, self.no_shadow) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            expires_at,
        })
    }
}

/// Runs a `tollgate keys` subcommand.
pub async fn run(config: &Config, args: KeysArgs) -> anyhow::Result<()> {
    let store = KeyStore::open(&config.raw.ledger)?;
    if config.raw.ledger.migrate {
        store.migrate().await?;
    }
    let result = execute(&store, args.command, Utc::now()).await;
    store.ledger().close().await;
    let out = result?;
    std::io::stdout().lock().write_all(out.as_bytes())?;
    Ok(())
}

/// Runs a subcommand and returns what to print.
async fn execute(
    store: &KeyStore,
    command: KeysCommand,
    now: DateTime<Utc>,
) -> anyhow::Result<String> {
    match command {
        KeysCommand::Create(args) => {
            let v = &args.values;
            let spec = KeySpec {
                name: args.name.clone(),
                team: v.team.clone(),
                limits: KeyLimitsOverride {
                    rpm: v.rpm,
                    input_tpm: v.input_tpm,
                    output_tpm: v.output_tpm,
                    max_concurrent: v.max_concurrent,
                },
                budget_nanousd: v.budget_usd,
                budget_period: v.budget_period,
                shadow: args.shadow,
                expires_at: v
                    .expires
                    .as_deref()
                    .map(|text| manage::parse_expiry(text, now))
                    .transpose()
                    .map_err(anyhow::Error::msg)?,
            };
            let created = manage::create_key(store, spec, now)
                .await
                .map_err(|e| match e {
                    CreateError::Invalid(problems) => {
                        anyhow::anyhow!("invalid key:\n  - {}", problems.join("\n  - "))
                    }
                    CreateError::Store(e) => anyhow::Error::new(e).context("cannot create the key"),
                })?;
            tracing::info!(key_id = %created.key.id, "key created");
            let view = KeyView::of(&created.key, now);
            let secret = created.secret.into_exposed();
            Ok(match args.format {
                OutputFormat::Json => {
                    let mut value = serde_json::to_value(&view)?;
                    if let Some(map) = value.as_object_mut() {
                        map.insert("secret".into(), serde_json::Value::String(secret));
                    }
                    format!("{value:#}\n")
                }
                OutputFormat::Table => format!(
                    "{}\nsecret:         {secret}\n\nThis is the only time the secret is shown: tollgate stores only its SHA-256.\n",
                    render_key(&view)
                ),
            })
        }
        KeysCommand::List(args) => {
            let keys = store.list().await.context("cannot list keys")?;
            let views: Vec<KeyView> = keys.iter().map(|k| KeyView::of(k, now)).collect();
            Ok(match args.format {
                OutputFormat::Json => format!("{:#}\n", serde_json::to_value(&views)?),
                OutputFormat::Table => render_list(&views),
            })
        }
        KeysCommand::Show(args) => {
            let key = store.get(&args.id).await.context("cannot read the key")?;
            show(key, &args.id, args.format, now)
        }
        KeysCommand::Update(args) => {
            let patch = args.patch(now)?;
            if patch.is_empty() {
                anyhow::bail!(
                    "nothing to change: give at least one flag (see `tollgate keys update --help`)"
                );
            }
            let key = store.update(&args.id, &patch).await.map_err(|e| match e {
                UpdateError::Invalid(problems) => {
                    anyhow::anyhow!("invalid change:\n  - {}", problems.join("\n  - "))
                }
                UpdateError::Key(e) => anyhow::Error::new(e).context("cannot update the key"),
            })?;
            if key.is_some() {
                tracing::info!(key_id = %args.id, "key updated");
            }
            show(key, &args.id, args.format, now)
        }
        KeysCommand::Revoke(args) => {
            let key = store
                .revoke(&args.id, now)
                .await
                .context("cannot revoke the key")?;
            if key.is_some() {
                tracing::info!(key_id = %args.id, "key revoked");
            }
            show(key, &args.id, args.format, now)
        }
    }
}

fn show(
    key: Option<KeyRecord>,
    id: &str,
    format: OutputFormat,
    now: DateTime<Utc>,
) -> anyhow::Result<String> {
    let key = key.ok_or_else(|| anyhow::anyhow!("no key with id {id:?}"))?;
    let view = KeyView::of(&key, now);
    Ok(match format {
        OutputFormat::Json => format!("{:#}\n", serde_json::to_value(&view)?),
        OutputFormat::Table => render_key(&view),
    })
}

fn or_dash<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_owned(), T::to_string)
}

/// One key, one field per line.
fn render_key(v: &KeyView) -> String {
    let budget = match (&v.budget_usd, v.budget_period) {
        (Some(usd), Some(period)) => format!("${usd} per {period}"),
        _ => "-".to_owned(),
    };
    let fields = [
        ("id", v.id.clone()),
        ("name", v.name.clone()),
        ("team", or_dash(&v.team)),
        ("kind", v.kind.as_str().to_owned()),
        ("prefix", v.key_prefix.clone()),
        ("status", v.status.to_owned()),
        ("rpm", or_dash(&v.rpm)),
        ("input_tpm", or_dash(&v.input_tpm)),
        ("output_tpm", or_dash(&v.output_tpm)),
        ("max_concurrent", or_dash(&v.max_concurrent)),
        ("budget", budget),
        ("shadow", v.shadow.to_string()),
        ("created_at", v.created_at.clone()),
        ("expires_at", or_dash(&v.expires_at)),
        ("revoked_at", or_dash(&v.revoked_at)),
    ];
    let mut out = String::new();
    for (name, value) in fields {
        let _ = writeln!(out, "{:<15} {value}", format!("{name}:"));
    }
    out
}

/// Every key as aligned columns.
fn render_list(views: &[KeyView]) -> String {
    let header = [
        "ID",
        "NAME",
        "TEAM",
        "KIND",
        "PREFIX",
        "STATUS",
        "RPM",
        "INPUT_TPM",
        "OUTPUT_TPM",
        "CONCURRENT",
        "BUDGET_USD",
        "PERIOD",
        "SHADOW",
        "EXPIRES_AT",
    ];
    let rows: Vec<[String; 14]> = views
        .iter()
        .map(|v| {
            [
                v.id.clone(),
                v.name.clone(),
                or_dash(&v.team),
                v.kind.as_str().to_owned(),
                v.key_prefix.clone(),
                v.status.to_owned(),
                or_dash(&v.rpm),
                or_dash(&v.input_tpm),
                or_dash(&v.output_tpm),
                or_dash(&v.max_concurrent),
                or_dash(&v.budget_usd),
                or_dash(&v.budget_period),
                v.shadow.to_string(),
                or_dash(&v.expires_at),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let text: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    if rows.is_empty() {
        out.push_str("(no keys)\n");
    }
    out
}
