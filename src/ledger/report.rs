//! `tollgate usage`: usage totals from the ledger over a time range, grouped by
//! key, team, model, UTC day and/or end user, as a table, CSV or JSON.
//!
//! Costs are summed as integer nano-dollars and printed as exact decimal
//! dollars; requests whose model had no price are counted in
//! `unpriced_requests` and add nothing to `cost_usd`.

use std::fmt::Write as _;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;

/// A dimension to group usage by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    /// The key id (`key_id`).
    Key,
    Team,
    Model,
    /// The UTC day the request started.
    Day,
    /// The request's `metadata.user_id`.
    #[value(name = "end_user", alias = "end-user")]
    EndUser,
}

impl GroupBy {
    /// The column name in the output.
    pub fn column(self) -> &'static str {
        match self {
            GroupBy::Key => "key_id",
            GroupBy::Team => "team",
            GroupBy::Model => "model",
            GroupBy::Day => "day",
            GroupBy::EndUser => "end_user",
        }
    }
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns with a total line, for people.
    #[default]
    Table,
    /// RFC 4180 CSV with a header line.
    Csv,
    /// A JSON array of objects (cost also as exact `cost_nanousd`).
    Json,
}

/// What to report: requests started in `[since, until)`, grouped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportQuery {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Empty: one line of grand totals.
    pub group_by: Vec<GroupBy>,
}

/// Sums over a group of `usage_events` rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_creation_input_tokens: i64,
    pub cache_read_input_tokens: i64,
    pub web_search_requests: i64,
    /// Sum of the known costs.
    pub cost_nanousd: i64,
    /// Requests without a cost (unknown model).
    pub unpriced_requests: i64,
}

impl Totals {
    fn add(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_creation_input_tokens += other.cache_creation_input_tokens;
        self.cache_read_input_tokens += other.cache_read_input_tokens;
        self.web_search_requests += other.web_search_requests;
        self.cost_nanousd += other.cost_nanousd;
        self.unpriced_requests += other.unpriced_requests;
    }

    /// The printed values, in [`TOTAL_COLUMNS`] order.
    fn cells(&self) -> [String; 8] {
        [
            self.requests.to_string(),
            self.input_tokens.to_string(),
            self.output_tokens.to_string(),
            self.cache_creation_input_tokens.to_string(),
            self.cache_read_input_tokens.to_string(),
            self.web_search_requests.to_string(),
            usd(self.cost_nanousd),
            self.unpriced_requests.to_string(),
        ]
    }
}

/// The columns after the group columns, in every format.
const TOTAL_COLUMNS: [&str; 8] = [
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "web_search_requests",
    "cost_usd",
    "unpriced_requests",
];

/// One output line: the group's values (in `group_by` order; `None` where the
/// column was NULL) and its totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRow {
    pub groups: Vec<Option<String>>,
    pub totals: Totals,
}

/// Nano-dollars as exact dollars: at least two decimals, at most nine, no
/// trailing zeros beyond two (`1.50`, `0.0125`, `0.000000001`).
pub fn usd(nanos: i64) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let abs = nanos.unsigned_abs();
    let mut frac = format!("{:09}", abs % 1_000_000_000);
    while frac.len() > 2 && frac.ends_with('0') {
        frac.pop();
    }
    format!("{sign}{}.{frac}", abs / 1_000_000_000)
}

/// Parses a `--since` value: a date (its UTC midnight) or an RFC 3339 time.
pub fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    parse_instant(s, false)
}

/// Parses an `--until` value: a date means the end of that UTC day (so it is
/// included); an RFC 3339 time is the exclusive end.
pub fn parse_until(s: &str) -> Result<DateTime<Utc>, String> {
    parse_instant(s, true)
}

fn parse_instant(s: &str, end_of_day: bool) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let date = NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|_| format!("expected a date like 2025-06-01 or an RFC 3339 time, got {s:?}"))?;
    let date = if end_of_day {
        date.succ_opt().ok_or("date out of range")?
    } else {
        date
    };
    Ok(date.and_hms_opt(0, 0, 0).ok_or("invalid date")?.and_utc())
}

/// Renders a report in `format`.
pub fn render(query: &ReportQuery, rows: &[ReportRow], format: Format) -> String {
    match format {
        Format::Table => render_table(query, rows),
        Format::Csv => render_csv(query, rows),
        Format::Json => render_json(query, rows),
    }
}

fn header(query: &ReportQuery) -> Vec<&'static str> {
    query
        .group_by
        .iter()
        .map(|g| g.column())
        .chain(TOTAL_COLUMNS)
        .collect()
}

fn render_table(query: &ReportQuery, rows: &[ReportRow]) -> String {
    let header = header(query);
    let groups = query.group_by.len();
    let mut lines: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            row.groups
                .iter()
                .map(|g| g.clone().unwrap_or_else(|| "-".to_owned()))
                .chain(row.totals.cells())
                .collect()
        })
        .collect();
    if groups > 0 && rows.len() > 1 {
        let mut total = Totals::default();
        for row in rows {
            total.add(&row.totals);
        }
        let mut line = vec![String::new(); groups];
        line[0] = "TOTAL".to_owned();
        line.extend(total.cells());
        lines.push(line);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let mut push_line = |cells: &[String]| {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            // Group columns read left to right; numbers line up on the right.
            if i < groups {
                let _ = write!(line, "{cell:<w$}", w = widths[i]);
            } else {
                let _ = write!(line, "{cell:>w$}", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };
    push_line(&header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>());
    push_line(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>());
    for line in &lines {
        push_line(line);
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) || s.starts_with(' ') || s.ends_with(' ') {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn render_csv(query: &ReportQuery, rows: &[ReportRow]) -> String {
    let mut out = header(query).join(",");
    out.push('\n');
    for row in rows {
        let cells: Vec<String> = row
            .groups
            .iter()
            .map(|g| csv_field(g.as_deref().unwrap_or("")))
            .chain(row.totals.cells())
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

fn render_json(query: &ReportQuery, rows: &[ReportRow]) -> String {
    let objects: Vec<serde_json::Value> = rows
        .iter()
        .map(|row| {
            let mut object = serde_json::Map::new();
            for (group, value) in query.group_by.iter().zip(&row.groups) {
                object.insert(
                    group.column().to_owned(),
                    value.clone().map_or(serde_json::Value::Null, Into::into),
                );
            }
            let t = &row.totals;
            for (name, value) in [
                ("requests", t.requests),
                ("input_tokens", t.input_tokens),
                ("output_tokens", t.output_tokens),
                ("cache_creation_input_tokens", t.cache_creation_input_tokens),
                ("cache_read_input_tokens", t.cache_read_input_tokens),
                ("web_search_requests", t.web_search_requests),
            ] {
                object.insert(name.to_owned(), value.into());
            }
            // The exact decimal as a JSON number, and the exact integer beside it.
            let cost: serde_json::Value =
                serde_json::from_str(&usd(t.cost_nanousd)).unwrap_or(serde_json::Value::Null);
            object.insert("cost_usd".to_owned(), cost);
            object.insert("cost_nanousd".to_owned(), t.cost_nanousd.into());
            object.insert("unpriced_requests".to_owned(), t.unpriced_requests.into());
            serde_json::Value::Object(object)
        })
        .collect();
    let mut out = serde_json::to_string_pretty(&objects).unwrap_or_else(|_| "[]".to_owned());
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_is_exact() {
        assert_eq!(usd(0), "0.00");
        assert_eq!(usd(1_500_000_000), "1.50");
        assert_eq!(usd(12_500_000), "0.0125");
        assert_eq!(usd(1), "0.000000001");
        assert_eq!(usd(123_456_789_012), "123.456789012");
        assert_eq!(usd(-2_000_000_000), "-2.00");
    }

    #[test]
    fn dates_and_times_parse() {
        assert_eq!(
            parse_since("2025-06-01").unwrap().to_rfc3339(),
            "2025-06-01T00:00:00+00:00"
        );
        assert_eq!(
            parse_until("2025-06-01").unwrap().to_rfc3339(),
            "2025-06-02T00:00:00+00:00"
        );
        assert_eq!(
            parse_until("2025-06-01T12:30:00+02:00")
                .unwrap()
                .to_rfc3339(),
            "2025-06-01T10:30:00+00:00"
        );
        assert!(parse_since("yesterday").is_err());
    }

    #[test]
    fn csv_quotes_what_needs_it() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
