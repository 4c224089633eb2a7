//! `loadgen report`: turns the JSON lines of one harness run (and criterion's
//! estimates for the meter) into `bench/results/`: a Markdown table per
//! scenario with every figure absolute and as a ratio to `direct` and to
//! `nginx`, the targets marked met or not met, the machine's details,
//! and the same in JSON.
//!
//! A scenario repeated several times is summarised by the median of each
//! figure over its repetitions; the raw runs stay in the JSON.

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::{Map, Value, json};

/// Flags of `loadgen report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// JSON lines written by the measurements of one run.
    #[arg(long)]
    raw: PathBuf,
    /// criterion's output directory (target/criterion) holding the `meter` group.
    #[arg(long)]
    criterion_dir: Option<PathBuf>,
    /// Where the report goes (bench/results).
    #[arg(long)]
    out_dir: PathBuf,
    /// `quick` or `full`; quick reports are written as quick-latest.*.
    #[arg(long, default_value = "full")]
    mode: String,
    /// A note shown under the tables (repeatable).
    #[arg(long = "note")]
    notes: Vec<String>,
    /// A `key=value` run parameter shown with the machine details (repeatable).
    #[arg(long = "param")]
    params: Vec<String>,
    /// How scenario (b)'s rate was chosen: `given` (scripts/bench --rate), or
    /// `throughput` / `calibration`: half of the lowest maximum measured there.
    #[arg(long, value_parser = ["given", "throughput", "calibration"])]
    rate_source: Option<String>,
    /// The target whose maximum set the rate (the slowest one).
    #[arg(long)]
    rate_set_by: Option<String>,
    /// That target's maximum (median requests/s).
    #[arg(long)]
    rate_max_rps: Option<f64>,
}

/// How scenario (b)'s offered rate was chosen.
#[derive(Debug, Clone, PartialEq)]
struct RateBasis {
    /// `given`, `throughput` or `calibration`.
    source: String,
    /// The target whose maximum set the rate.
    target: Option<String>,
    /// Its maximum, requests/s.
    max_rps: Option<f64>,
}

impl RateBasis {
    fn from_args(args: &ReportArgs) -> Option<Self> {
        Some(Self {
            source: args.rate_source.clone()?,
            target: args.rate_set_by.clone(),
            max_rps: args.rate_max_rps,
        })
    }

    fn from_json(value: &Value) -> Option<Self> {
        Some(Self {
            source: value["source"].as_str()?.to_owned(),
            target: value["target"].as_str().map(str::to_owned),
            max_rps: value["max_rps"].as_f64(),
        })
    }

    fn to_json(&self) -> Value {
        json!({
            "source": self.source,
            "target": self.target,
            "max_rps": self.max_rps,
            "rule": self.rule(),
        })
    }

    /// The rule in words, naming the target whose maximum set the rate.
    fn rule(&self) -> String {
        let from = match self.source.as_str() {
            "given" => return "given with `scripts/bench --rate`".into(),
            "calibration" => "in a short calibration run (scenario (a) did not run)",
            _ => "in (a)",
        };
        let whose = match (&self.target, self.max_rps) {
            (Some(t), Some(max)) => format!(": `{t}`'s {} req/s {from}", format_number(max, 0)),
            (Some(t), None) => format!(": `{t}`'s, {from}"),
            _ => format!(", {from}"),
        };
        format!(
            "half of the lowest maximum throughput among the targets{whose}, so every target \
             runs at or below half of its own maximum"
        )
    }
}

/// Targets in the order of the tables; others follow in order of appearance.
const TARGET_ORDER: [&str; 5] = [
    "direct",
    "nginx",
    "tollgate-sqlite",
    "tollgate-postgres",
    "tollgate-virtual",
];
const TOLLGATES: [&str; 3] = ["tollgate-sqlite", "tollgate-postgres", "tollgate-virtual"];

/// How a row is shown.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The value, with ratios to direct and nginx.
    Ratios,
    /// The value alone (counts, settings).
    Plain,
    /// The value minus direct's: what the proxy adds.
    MinusDirect,
}

struct Metric {
    key: &'static str,
    label: &'static str,
    get: fn(&Value) -> Option<f64>,
    digits: usize,
    kind: Kind,
}

fn num(row: &Value, pointer: &str) -> Option<f64> {
    row.pointer(pointer).and_then(Value::as_f64)
}

fn mib(row: &Value, pointer: &str) -> Option<f64> {
    num(row, pointer).map(|kib| kib / 1024.0)
}

fn errors(row: &Value) -> Option<f64> {
    Some(num(row, "/errors/status")? + num(row, "/errors/io")?)
}

/// `before`, then the latency percentiles p50, p99 and p99.9, then `after`.
fn with_latency(before: Vec<Metric>, after: Vec<Metric>) -> Vec<Metric> {
    let latency = [
        (
            "p50_ms",
            "latency p50 (ms)",
            (|r| num(r, "/latency/p50_ms")) as fn(&Value) -> Option<f64>,
        ),
        ("p99_ms", "latency p99 (ms)", |r| num(r, "/latency/p99_ms")),
        ("p999_ms", "latency p99.9 (ms)", |r| {
            num(r, "/latency/p999_ms")
        }),
    ]
    .map(|(key, label, get)| Metric {
        key,
        label,
        get,
        digits: 3,
        kind: Kind::Ratios,
    });
    before.into_iter().chain(latency).chain(after).collect()
}

struct Scenario {
    key: &'static str,
    title: &'static str,
    metrics: Vec<Metric>,
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            key: "throughput",
            title: "(a) Small non-streaming messages, maximum throughput (closed loop)",
            metrics: with_latency(
                vec![Metric {
                    key: "rps",
                    label: "requests/s",
                    get: |r| num(r, "/rps"),
                    digits: 0,
                    kind: Kind::Ratios,
                }],
                vec![
                    Metric {
                        key: "proxy_cpu_us_per_request",
                        label: "proxy CPU per request (µs)",
                        get: |r| num(r, "/proxy/cpu_us_per_request"),
                        digits: 1,
                        kind: Kind::Ratios,
                    },
                    Metric {
                        key: "proxy_cpu_cores",
                        label: "proxy CPU (cores busy)",
                        get: |r| num(r, "/proxy/cpu_cores"),
                        digits: 2,
                        kind: Kind::Ratios,
                    },
                    Metric {
                        key: "proxy_peak_rss_mib",
                        label: "proxy peak RSS (MiB)",
                        get: |r| mib(r, "/proxy/peak_rss_kib"),
                        digits: 1,
                        kind: Kind::Ratios,
                    },
                    Metric {
                        key: "errors",
                        label: "errors",
                        get: errors,
                        digits: 0,
                        kind: Kind::Plain,
                    },
                ],
            ),
        },
        Scenario {
            key: "rate",
            title: "(b) The same at a fixed arrival rate (by default half of the slowest target's maximum), latency from the scheduled send time",
            metrics: with_latency(
                vec![
                    Metric {
                        key: "offered_rps",
                        label: "offered rate (req/s)",
                        get: |r| num(r, "/offered_rps"),
                        digits: 0,
                        kind: Kind::Plain,
                    },
                    Metric {
                        key: "rps",
                        label: "achieved (req/s)",
                        get: |r| num(r, "/rps"),
                        digits: 0,
                        kind: Kind::Plain,
                    },
                ],
                vec![
                    Metric {
                        key: "added_p99_ms",
                        label: "added p99 vs direct (ms)",
                        get: |r| num(r, "/latency/p99_ms"),
                        digits: 3,
                        kind: Kind::MinusDirect,
                    },
                    Metric {
                        key: "service_p99_ms",
                        label: "service time p99 (ms)",
                        get: |r| num(r, "/service_time/p99_ms"),
                        digits: 3,
                        kind: Kind::Ratios,
                    },
                    Metric {
                        key: "proxy_cpu_us_per_request",
                        label: "proxy CPU per request (µs)",
                        get: |r| num(r, "/proxy/cpu_us_per_request"),
                        digits: 1,
                        kind: Kind::Ratios,
                    },
                    Metric {
                        key: "not_sent",
                        label: "not sent (target fell behind)",
                        get: |r| num(r, "/not_sent"),
                        digits: 0,
                        kind: Kind::Plain,
                    },
                    Metric {
                        key: "errors",
                        label: "errors",
                        get: errors,
                        digits: 0,
                        kind: Kind::Plain,
                    },
                ],
            ),
        },
        Scenario {
            key: "streams",
            title: "(c) Concurrent streams, events 10 ms apart: time to first byte and per-event relay delay",
            metrics: vec![
                Metric {
                    key: "ttfb_p50_ms",
                    label: "TTFB p50 (ms)",
                    get: |r| num(r, "/ttfb/p50_ms"),
                    digits: 3,
                    kind: Kind::Ratios,
                },
                Metric {
                    key: "ttfb_p99_ms",
                    label: "TTFB p99 (ms)",
                    get: |r| num(r, "/ttfb/p99_ms"),
                    digits: 3,
                    kind: Kind::Ratios,
                },
                Metric {
                    key: "ttfb_added_p99_ms",
                    label: "TTFB p99 overhead vs direct (ms)",
                    get: |r| num(r, "/ttfb/p99_ms"),
                    digits: 3,
                    kind: Kind::MinusDirect,
                },
                Metric {
                    key: "relay_p50_ms",
                    label: "relay delay p50 (ms)",
                    get: |r| num(r, "/relay_delay/p50_ms"),
                    digits: 3,
                    kind: Kind::Ratios,
                },
                Metric {
                    key: "relay_p99_ms",
                    label: "relay delay p99 (ms)",
                    get: |r| num(r, "/relay_delay/p99_ms"),
                    digits: 3,
                    kind: Kind::Ratios,
                },
                Metric {
                    key: "relay_p999_ms",
                    label: "relay delay p99.9 (ms)",
                    get: |r| num(r, "/relay_delay/p999_ms"),
                    digits: 3,
                    kind: Kind::Ratios,
                },
                Metric {
                    key: "relay_added_p99_ms",
                    label: "relay p99 overhead vs direct (ms)",
                    get: |r| num(r, "/relay_delay/p99_ms"),
                    digits: 3,
                    kind: Kind::MinusDirect,
                },
                Metric {
                    key: "events_received",
                    label: "events received",
                    get: |r| num(r, "/events_received"),
                    digits: 0,
                    kind: Kind::Plain,
                },
                Metric {
                    key: "events_expected",
                    label: "events expected",
                    get: |r| num(r, "/events_expected"),
                    digits: 0,
                    kind: Kind::Plain,
                },
                Metric {
                    key: "proxy_cpu_seconds",
                    label: "proxy CPU (s)",
                    get: |r| num(r, "/proxy/cpu_seconds"),
                    digits: 2,
                    kind: Kind::Ratios,
                },
                Metric {
                    key: "proxy_peak_rss_mib",
                    label: "proxy peak RSS (MiB)",
                    get: |r| mib(r, "/proxy/peak_rss_kib"),
                    digits: 1,
                    kind: Kind::Ratios,
                },
            ],
        },
        Scenario {
            key: "hold",
            title: "(d) Slow streams held open at once: proxy memory per open stream",
            metrics: vec![
                Metric {
                    key: "streams_open",
                    label: "streams open",
                    get: |r| num(r, "/streams_open"),
                    digits: 0,
                    kind: Kind::Plain,
                },
                Metric {
                    key: "idle_rss_mib",
                    label: "proxy RSS idle (MiB)",
                    get: |r| mib(r, "/proxy_idle_rss_kib"),
                    digits: 1,
                    kind: Kind::Ratios,
                },
                Metric {
                    key: "held_rss_mib",
                    label: "proxy RSS, streams open (MiB)",
                    get: |r| mib(r, "/proxy_held_rss_kib"),
                    digits: 1,
                    kind: Kind::Ratios,
                },
                Metric {
                    key: "kib_per_stream",
                    label: "proxy KiB per open stream",
                    get: |r| num(r, "/proxy_kib_per_stream"),
                    digits: 1,
                    kind: Kind::Ratios,
                },
                Metric {
                    key: "closed_rss_mib",
                    label: "proxy RSS after close (MiB)",
                    get: |r| mib(r, "/proxy_closed_rss_kib"),
                    digits: 1,
                    kind: Kind::Ratios,
                },
                Metric {
                    key: "open_s",
                    label: "time to open all (s)",
                    get: |r| num(r, "/open_s"),
                    digits: 1,
                    kind: Kind::Plain,
                },
            ],
        },
        Scenario {
            key: "soak",
            title: "(e) Soak: proxy RSS at the end vs after the warm-up",
            metrics: vec![
                Metric {
                    key: "requests",
                    label: "requests (after warm-up)",
                    get: |r| num(r, "/completed"),
                    digits: 0,
                    kind: Kind::Plain,
                },
                Metric {
                    key: "rps",
                    label: "requests/s",
                    get: |r| num(r, "/rps"),
                    digits: 0,
                    kind: Kind::Ratios,
                },
                Metric {
                    key: "p99_ms",
                    label: "latency p99 (ms)",
                    get: |r| num(r, "/latency/p99_ms"),
                    digits: 3,
                    kind: Kind::Ratios,
                },
                Metric {
                    key: "rss_warm_mib",
                    label: "proxy RSS after warm-up (MiB)",
                    get: |r| mib(r, "/proxy/rss_start_kib"),
                    digits: 1,
                    kind: Kind::Ratios,
                },
                Metric {
                    key: "rss_end_mib",
                    label: "proxy RSS at end (MiB)",
                    get: |r| mib(r, "/proxy/rss_end_kib"),
                    digits: 1,
                    kind: Kind::Ratios,
                },
                Metric {
                    key: "rss_growth_pct",
                    label: "RSS growth (%)",
                    get: rss_growth_pct,
                    digits: 1,
                    kind: Kind::Plain,
                },
                Metric {
                    key: "proxy_peak_rss_mib",
                    label: "proxy peak RSS (MiB)",
                    get: |r| mib(r, "/proxy/peak_rss_kib"),
                    digits: 1,
                    kind: Kind::Ratios,
                },
                Metric {
                    key: "errors",
                    label: "errors",
                    get: errors,
                    digits: 0,
                    kind: Kind::Plain,
                },
            ],
        },
    ]
}

fn rss_growth_pct(row: &Value) -> Option<f64> {
    let start = num(row, "/proxy/rss_start_kib")?;
    let end = num(row, "/proxy/rss_end_kib")?;
    (start > 0.0).then(|| (end - start) / start * 100.0)
}

/// Reads a JSON-lines file, skipping blank lines.
pub fn read_raw(path: &Path) -> anyhow::Result<Vec<Value>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut rows = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        rows.push(
            serde_json::from_str(&line).with_context(|| format!("{}:{}", path.display(), n + 1))?,
        );
    }
    Ok(rows)
}

/// The median of the finite values, if any.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    })
}

/// Medians of every metric of one scenario, per target.
type Medians = BTreeMap<String, BTreeMap<&'static str, f64>>;

fn medians(scenario: &Scenario, rows: &[&Value]) -> Medians {
    let mut out = Medians::new();
    for target in targets_of(rows) {
        let mine: Vec<&Value> = rows
            .iter()
            .copied()
            .filter(|r| r["target"] == target.as_str())
            .collect();
        let mut values = BTreeMap::new();
        for metric in &scenario.metrics {
            let samples: Vec<f64> = mine.iter().filter_map(|r| (metric.get)(r)).collect();
            if let Some(m) = median(&samples) {
                values.insert(metric.key, m);
            }
        }
        out.insert(target, values);
    }
    out
}

fn targets_of(rows: &[&Value]) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for name in TARGET_ORDER {
        if rows.iter().any(|r| r["target"] == name) {
            seen.push(name.to_owned());
        }
    }
    for row in rows {
        if let Some(name) = row["target"].as_str()
            && !seen.iter().any(|s| s == name)
        {
            seen.push(name.to_owned());
        }
    }
    seen
}

fn format_number(value: f64, digits: usize) -> String {
    if digits == 0 {
        let rounded = value.round() as i64;
        let text = rounded.unsigned_abs().to_string();
        let mut grouped = String::new();
        for (i, c) in text.chars().enumerate() {
            if i > 0 && (text.len() - i).is_multiple_of(3) {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if rounded < 0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else {
        format!("{value:.digits$}")
    }
}

fn ratio(value: f64, base: Option<f64>) -> Option<f64> {
    base.filter(|b| *b != 0.0 && b.is_finite())
        .map(|b| value / b)
}

/// A figure with its ratios, for the JSON report.
fn figure(metric: &Metric, medians: &Medians, target: &str) -> Option<Value> {
    let value = *medians.get(target)?.get(metric.key)?;
    let of = |t: &str| medians.get(t).and_then(|m| m.get(metric.key)).copied();
    Some(match metric.kind {
        Kind::Ratios => json!({
            "value": value,
            "vs_direct": ratio(value, of("direct")),
            "vs_nginx": ratio(value, of("nginx")),
        }),
        Kind::Plain => json!({ "value": value }),
        Kind::MinusDirect => match of("direct") {
            Some(direct) => json!({ "value": value - direct }),
            None => return None,
        },
    })
}

fn cell(metric: &Metric, medians: &Medians, target: &str) -> String {
    let Some(value) = medians.get(target).and_then(|m| m.get(metric.key)).copied() else {
        return "–".into();
    };
    let of = |t: &str| medians.get(t).and_then(|m| m.get(metric.key)).copied();
    match metric.kind {
        Kind::Plain => format_number(value, metric.digits),
        Kind::MinusDirect => match of("direct") {
            Some(direct) if target != "direct" => format!("{:+.*}", metric.digits, value - direct),
            _ => "–".into(),
        },
        Kind::Ratios => with_ratios(
            format_number(value, metric.digits),
            target,
            ratio(value, of("direct")),
            ratio(value, of("nginx")),
        ),
    }
}

/// `text (0.50×d, 2.00×n)`, leaving out a target's ratio to itself.
fn with_ratios(
    mut text: String,
    target: &str,
    vs_direct: Option<f64>,
    vs_nginx: Option<f64>,
) -> String {
    let mut ratios = Vec::new();
    if target != "direct"
        && let Some(r) = vs_direct
    {
        ratios.push(format!("{r:.2}×d"));
    }
    if target != "nginx"
        && let Some(r) = vs_nginx
    {
        ratios.push(format!("{r:.2}×n"));
    }
    if !ratios.is_empty() {
        text.push_str(&format!(" ({})", ratios.join(", ")));
    }
    text
}

/// One check of an issue-5 target.
struct Check {
    goal: &'static str,
    target: String,
    measured: String,
    met: Option<bool>,
}

fn get(all: &BTreeMap<&str, Medians>, scenario: &str, target: &str, key: &str) -> Option<f64> {
    all.get(scenario)?.get(target)?.get(key).copied()
}

fn checks(all: &BTreeMap<&str, Medians>, meter: &[MeterResult]) -> Vec<Check> {
    let mut checks = Vec::new();
    for t in TOLLGATES {
        if !all.values().any(|m| m.contains_key(t)) {
            continue;
        }
        let target = t.to_owned();
        // (a) throughput >= 0.9 x nginx (the issue names the Postgres ledger).
        let (tp, ng) = (
            get(all, "throughput", t, "rps"),
            get(all, "throughput", "nginx", "rps"),
        );
        checks.push(Check {
            goal: "(a) throughput ≥ 0.9 × nginx",
            target: target.clone(),
            measured: match (tp, ng) {
                (Some(a), Some(b)) if b > 0.0 => format!(
                    "{:.2} × nginx ({} vs {} req/s)",
                    a / b,
                    format_number(a, 0),
                    format_number(b, 0)
                ),
                _ => "–".into(),
            },
            met: match (tp, ng) {
                (Some(a), Some(b)) if b > 0.0 => Some(a >= 0.9 * b),
                _ => None,
            },
        });
        // (b) added p99 <= 1 ms and no worse than nginx's.
        let (p, d, n) = (
            get(all, "rate", t, "p99_ms"),
            get(all, "rate", "direct", "p99_ms"),
            get(all, "rate", "nginx", "p99_ms"),
        );
        checks.push(Check {
            goal: "(b) added latency p99 ≤ 1 ms, and ≤ nginx's",
            target: target.clone(),
            measured: match (p, d, n) {
                (Some(p), Some(d), Some(n)) => format!("+{:.3} ms (nginx +{:.3} ms)", p - d, n - d),
                (Some(p), Some(d), None) => format!("+{:.3} ms", p - d),
                _ => "–".into(),
            },
            met: match (p, d, n) {
                (Some(p), Some(d), Some(n)) => Some(p - d <= 1.0 && p <= n),
                (Some(p), Some(d), None) => Some(p - d <= 1.0),
                _ => None,
            },
        });
        // (c) TTFB overhead p99 <= 1 ms; relay delay overhead p99 <= 0.5 ms.
        let (tt, td) = (
            get(all, "streams", t, "ttfb_p99_ms"),
            get(all, "streams", "direct", "ttfb_p99_ms"),
        );
        checks.push(Check {
            goal: "(c) TTFB overhead p99 ≤ 1 ms",
            target: target.clone(),
            measured: match (tt, td) {
                (Some(a), Some(b)) => format!("{:+.3} ms (p99 {a:.3} vs direct {b:.3})", a - b),
                _ => "–".into(),
            },
            met: tt.zip(td).map(|(a, b)| a - b <= 1.0),
        });
        let (rt, rd) = (
            get(all, "streams", t, "relay_p99_ms"),
            get(all, "streams", "direct", "relay_p99_ms"),
        );
        checks.push(Check {
            goal: "(c) event relay delay p99 ≤ 0.5 ms (added to direct's)",
            target: target.clone(),
            measured: match (rt, rd) {
                (Some(a), Some(b)) => format!("{:+.3} ms (p99 {a:.3} vs direct {b:.3})", a - b),
                _ => "–".into(),
            },
            met: rt.zip(rd).map(|(a, b)| a - b <= 0.5),
        });
        // (d) <= 64 KiB per open stream.
        let per = get(all, "hold", t, "kib_per_stream");
        checks.push(Check {
            goal: "(d) ≤ 64 KiB proxy RSS per open stream",
            target: target.clone(),
            measured: per.map_or("–".into(), |v| format!("{v:.1} KiB")),
            met: per.map(|v| v <= 64.0),
        });
        // (e) end RSS within 10 % of after warm-up.
        let growth = get(all, "soak", t, "rss_growth_pct");
        checks.push(Check {
            goal: "(e) soak: end RSS within 10 % of after warm-up",
            target: target.clone(),
            measured: growth.map_or("–".into(), |g| format!("{g:+.1} %")),
            met: growth.map(|g| g.abs() <= 10.0),
        });
    }
    // (f) the meter: >= 1 GiB/s and within 3x of the memchr scan.
    let memchr = meter.iter().find(|m| m.name.contains("memchr"));
    for m in meter.iter().filter(|m| !m.name.contains("memchr")) {
        checks.push(Check {
            goal: "(f) meter ≥ 1 GiB/s per core",
            target: m.name.clone(),
            measured: format!("{:.2} GiB/s", m.gib_per_s),
            met: Some(m.gib_per_s >= 1.0),
        });
        if let Some(reference) = memchr {
            checks.push(Check {
                goal: "(f) meter within 3× of the memchr scan",
                target: m.name.clone(),
                measured: format!(
                    "{:.1}× slower ({:.2} vs {:.2} GiB/s)",
                    reference.gib_per_s / m.gib_per_s,
                    m.gib_per_s,
                    reference.gib_per_s
                ),
                met: Some(reference.gib_per_s / m.gib_per_s <= 3.0),
            });
        }
    }
    checks
}

/// One criterion benchmark of the `meter` group.
#[derive(Debug, Clone, serde::Serialize)]
struct MeterResult {
    name: String,
    bytes_per_iter: u64,
    ns_per_iter: f64,
    gib_per_s: f64,
}

/// Reads `<dir>/meter/<bench>/new/{estimates,benchmark}.json` for every bench.
fn read_meter(dir: &Path) -> Vec<MeterResult> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir.join("meter")) else {
        return out;
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("new").is_dir())
        .collect();
    paths.sort();
    for path in paths {
        let read = |name: &str| -> Option<Value> {
            serde_json::from_str(&std::fs::read_to_string(path.join("new").join(name)).ok()?).ok()
        };
        let (Some(estimates), Some(benchmark)) = (read("estimates.json"), read("benchmark.json"))
        else {
            continue;
        };
        let (Some(ns), Some(bytes)) = (
            estimates
                .pointer("/mean/point_estimate")
                .and_then(Value::as_f64),
            benchmark
                .pointer("/throughput/Bytes")
                .and_then(Value::as_u64),
        ) else {
            continue;
        };
        let name = benchmark["function_id"].as_str().map_or_else(
            || {
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            },
            str::to_owned,
        );
        out.push(MeterResult {
            name,
            bytes_per_iter: bytes,
            ns_per_iter: ns,
            gib_per_s: bytes as f64 / (ns * 1e-9) / f64::from(1u32 << 30),
        });
    }
    out
}

/// What the machine is, for the report.
fn machine() -> Value {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let logical = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let memory_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / f64::from(1u32 << 20));
    let run = |program: &str, args: &[&str]| -> Option<String> {
        let out = std::process::Command::new(program)
            .args(args)
            .output()
            .ok()?;
        let text = if out.stdout.is_empty() {
            out.stderr
        } else {
            out.stdout
        };
        Some(String::from_utf8_lossy(&text).trim().to_owned())
    };
    json!({
        "cpu": cpu,
        "logical_cpus": logical,
        "memory_gib": memory_gib.map(|g| (g * 10.0).round() / 10.0),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "rustc": run("rustc", &["--version"]),
        "nginx": run("nginx", &["-v"]),
        "postgres": run("psql", &["-h", "127.0.0.1", "-U", "postgres", "-Atc", "show server_version"]),
        "commit": run("git", &["rev-parse", "--short", "HEAD"]),
        "worktree_dirty": run("git", &["status", "--porcelain"]).map(|s| !s.is_empty()),
        "load_average": read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}

/// Writes the report files and prints the Markdown.
pub fn write(args: &ReportArgs) -> anyhow::Result<()> {
    let rows = read_raw(&args.raw)?;
    let meter = args
        .criterion_dir
        .as_deref()
        .map(read_meter)
        .unwrap_or_default();
    let machine = machine();
    let generated = chrono::Utc::now();
    let params: Map<String, Value> = args
        .params
        .iter()
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), json!(v)))
        .collect();

    let rate_basis = RateBasis::from_args(args);

    let scenarios = scenarios();
    let mut all: BTreeMap<&str, Medians> = BTreeMap::new();
    let mut md = String::new();
    let mut json_scenarios = Map::new();
    md.push_str(&format!(
        "# tollgate benchmark ({} run, {})\n\n",
        args.mode,
        generated.format("%Y-%m-%d %H:%M UTC")
    ));
    md.push_str(
        "Each cell: the median over the repetitions, then its ratio to `direct` (×d) and to \
         `nginx` (×n). Targets were measured in one run, alternating round-robin per repetition. \
         The load generator, the mock upstream and the proxy share the machine's cores (nothing \
         is pinned); that is the same for every target.\n\n",
    );
    for scenario in &scenarios {
        let mine: Vec<&Value> = rows
            .iter()
            .filter(|r| r["scenario"] == scenario.key)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let medians = medians(scenario, &mine);
        let targets: Vec<String> = medians.keys().cloned().collect();
        let targets = order(targets);
        md.push_str(&format!("## {}\n\n", scenario.title));
        if let Some(first) = mine.first() {
            md.push_str(&describe(
                scenario.key,
                first,
                mine.len(),
                targets.len(),
                rate_basis.as_ref(),
            ));
        }
        md.push_str(&format!("| | {} |\n", targets.join(" | ")));
        md.push_str(&format!("|---|{}\n", "---:|".repeat(targets.len())));
        for metric in &scenario.metrics {
            if !targets
                .iter()
                .any(|t| medians.get(t).is_some_and(|m| m.contains_key(metric.key)))
            {
                continue;
            }
            let cells: Vec<String> = targets.iter().map(|t| cell(metric, &medians, t)).collect();
            md.push_str(&format!("| {} | {} |\n", metric.label, cells.join(" | ")));
        }
        md.push('\n');
        if scenario.key == "rate" {
            md.push_str(&saturation_note(&medians, all.get("throughput")));
        }

        let mut per_target = Map::new();
        for target in &targets {
            let figures: Map<String, Value> = scenario
                .metrics
                .iter()
                .filter_map(|m| figure(m, &medians, target).map(|f| (m.key.to_owned(), f)))
                .collect();
            let runs: Vec<Value> = mine
                .iter()
                .filter(|r| r["target"] == target.as_str())
                .map(|r| (*r).clone())
                .collect();
            per_target.insert(target.clone(), json!({ "median": figures, "runs": runs }));
        }
        json_scenarios.insert(scenario.key.to_owned(), Value::Object(per_target));
        all.insert(scenario.key, medians);
    }

    if !meter.is_empty() {
        md.push_str("## (f) The meter alone (criterion, one core)\n\n");
        md.push_str(
            "The SSE fixture corpus (`tests/fixtures/sse/*.sse`, concatenated) fed through \
             `Meter::for_response(true, \"text/event-stream\", \"\")` in the chunk sizes named, \
             next to a `memchr` newline scan of the same bytes.\n\n",
        );
        md.push_str("| benchmark | bytes/iter | time/iter | GiB/s | vs memchr |\n|---|---:|---:|---:|---:|\n");
        let memchr = meter
            .iter()
            .find(|m| m.name.contains("memchr"))
            .map(|m| m.gib_per_s);
        for m in &meter {
            md.push_str(&format!(
                "| {} | {} | {:.2} µs | {:.2} | {} |\n",
                m.name,
                format_number(m.bytes_per_iter as f64, 0),
                m.ns_per_iter / 1e3,
                m.gib_per_s,
                memchr.map_or("–".into(), |r| format!("{:.2}×", m.gib_per_s / r)),
            ));
        }
        md.push('\n');
    }

    let checks = checks(&all, &meter);
    if !checks.is_empty() {
        md.push_str("## Issue 5 targets\n\n| target | proxy | measured | |\n|---|---|---|---|\n");
        for c in &checks {
            let verdict = match c.met {
                Some(true) => "met",
                Some(false) => "**not met**",
                None => "not measured",
            };
            md.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                c.goal, c.target, c.measured, verdict
            ));
        }
        md.push_str(
            "\nThe issue states the throughput target for tollgate with the Postgres ledger \
             (`tollgate-postgres`); the other variants are shown for comparison. Overheads are \
             differences of percentiles measured in separate runs of the same workload.\n\n",
        );
    }

    md.push_str("## Machine\n\n| | |\n|---|---|\n");
    if let Value::Object(m) = &machine {
        for (k, v) in m {
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Null => "–".into(),
                other => other.to_string(),
            };
            md.push_str(&format!("| {k} | {} |\n", text.replace('\n', " ")));
        }
    }
    for (k, v) in &params {
        md.push_str(&format!("| {k} | {} |\n", v.as_str().unwrap_or_default()));
    }
    md.push('\n');
    if !args.notes.is_empty() {
        md.push_str("## Notes\n\n");
        for note in &args.notes {
            md.push_str(&format!("- {note}\n"));
        }
        md.push('\n');
    }

    let report = json!({
        "mode": args.mode,
        "generated_at": generated.to_rfc3339(),
        "machine": machine,
        "params": params,
        "rate_basis": rate_basis.as_ref().map(RateBasis::to_json),
        "notes": args.notes,
        "scenarios": json_scenarios,
        "meter": meter,
        "targets": checks.iter().map(|c| json!({
            "goal": c.goal, "proxy": c.target, "measured": c.measured, "met": c.met,
        })).collect::<Vec<_>>(),
    });

    std::fs::create_dir_all(&args.out_dir)?;
    let (latest, stamped) = if args.mode == "quick" {
        ("quick-latest".to_owned(), None)
    } else {
        (
            "latest".to_owned(),
            Some(generated.format("%Y%m%dT%H%M%SZ").to_string()),
        )
    };
    let json_text = serde_json::to_string_pretty(&report)? + "\n";
    for name in std::iter::once(latest).chain(stamped) {
        std::fs::write(args.out_dir.join(format!("{name}.md")), &md)?;
        std::fs::write(args.out_dir.join(format!("{name}.json")), &json_text)?;
    }
    print!("{md}");
    Ok(())
}

/// Flags of `loadgen summary`.
#[derive(Debug, clap::Args)]
pub struct SummaryArgs {
    /// A report written by `loadgen report` (bench/results/latest.json).
    #[arg(long)]
    json: PathBuf,
    /// Where the link to the full report points, relative to where the
    /// summary is shown (the README: bench/results/latest.md).
    #[arg(long, default_value = "bench/results/latest.md")]
    link: String,
    /// Write the summary to this file instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The rows of the headline table: scenario, metric, label (`{rate}`: the
/// offered rate of (b)).
const SUMMARY_ROWS: [(&str, &str, &str); 10] = [
    ("throughput", "rps", "(a) maximum throughput (req/s)"),
    (
        "throughput",
        "proxy_cpu_us_per_request",
        "(a) proxy CPU per request (µs)",
    ),
    ("rate", "p50_ms", "(b) latency p50 at {rate} req/s (ms)"),
    ("rate", "p99_ms", "(b) latency p99 at {rate} req/s (ms)"),
    ("rate", "added_p99_ms", "(b) added p99 vs direct (ms)"),
    ("streams", "ttfb_p99_ms", "(c) TTFB p99 (ms)"),
    (
        "streams",
        "ttfb_added_p99_ms",
        "(c) TTFB p99 overhead vs direct (ms)",
    ),
    (
        "streams",
        "relay_added_p99_ms",
        "(c) event relay p99 overhead vs direct (ms)",
    ),
    ("hold", "kib_per_stream", "(d) proxy KiB per open stream"),
    (
        "soak",
        "rss_growth_pct",
        "(e) soak: RSS growth after warm-up (%)",
    ),
];

/// `loadgen summary`: the headline table of a report (the README's block).
pub fn summary(args: &SummaryArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.json)
        .with_context(|| format!("reading {}", args.json.display()))?;
    let report: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", args.json.display()))?;
    let md = summary_markdown(&report, &args.link);
    match &args.out {
        Some(path) => {
            std::fs::write(path, &md).with_context(|| format!("writing {}", path.display()))?
        }
        None => print!("{md}"),
    }
    Ok(())
}

/// The median figure `{value, vs_direct, vs_nginx}` of one metric in a report.
fn report_figure<'a>(
    report: &'a Value,
    scenario: &str,
    target: &str,
    key: &str,
) -> Option<&'a Value> {
    report
        .get("scenarios")?
        .get(scenario)?
        .get(target)?
        .get("median")?
        .get(key)
        .filter(|f| f["value"].is_f64())
}

fn summary_markdown(report: &Value, link: &str) -> String {
    let scenarios = scenarios();
    let metric = |scenario: &str, key: &str| {
        scenarios
            .iter()
            .find(|s| s.key == scenario)
            .and_then(|s| s.metrics.iter().find(|m| m.key == key))
    };
    let mut targets = Vec::new();
    for (scenario, _, _) in SUMMARY_ROWS {
        if let Some(Value::Object(per_target)) = report.pointer(&format!("/scenarios/{scenario}")) {
            for t in per_target.keys() {
                if !targets.contains(t) {
                    targets.push(t.clone());
                }
            }
        }
    }
    let targets = order(targets);
    let offered = targets
        .iter()
        .find_map(|t| report_figure(report, "rate", t, "offered_rps"))
        .and_then(|f| f["value"].as_f64());
    let rate_text = offered.map_or("?".into(), |r| format_number(r, 0));

    let mut md = String::new();
    let machine = &report["machine"];
    let when = report["generated_at"]
        .as_str()
        .map(|g| {
            chrono::DateTime::parse_from_rfc3339(g).map_or(g.to_owned(), |d| {
                d.with_timezone(&chrono::Utc)
                    .format("%Y-%m-%d %H:%M UTC")
                    .to_string()
            })
        })
        .unwrap_or_else(|| "?".into());
    let mode = match report["mode"].as_str() {
        Some("quick") => "Quick",
        _ => "Full",
    };
    let mut about = vec![format!("{mode} run of {when}")];
    if let Some(commit) = machine["commit"].as_str() {
        let dirty = if machine["worktree_dirty"] == true {
            ", uncommitted changes"
        } else {
            ""
        };
        about.push(format!("commit `{commit}`{dirty}"));
    }
    if let Some(cpus) = machine["logical_cpus"].as_u64() {
        about.push(format!(
            "{cpus} logical CPUs shared by the load generator, the mock upstream and the proxy"
        ));
    }
    if let Some(load) = machine["load_average"].as_str().filter(|l| !l.is_empty()) {
        about.push(format!("load average {load} at the end"));
    }
    let reps = report
        .pointer("/params/repetitions")
        .and_then(Value::as_str)
        .unwrap_or("?");
    md.push_str(&format!(
        "{}. Each cell is a median over {reps} repetition(s) ((d) and (e): one run), with its \
         ratio to `direct` (×d) and to `nginx` (×n). Full report: [{link}]({link}).\n\n",
        about.join("; ")
    ));

    let mut rows = Vec::new();
    for (scenario, key, label) in SUMMARY_ROWS {
        let Some(metric) = metric(scenario, key) else {
            continue;
        };
        let figures: Vec<Option<&Value>> = targets
            .iter()
            .map(|t| report_figure(report, scenario, t, key))
            .collect();
        if figures.iter().all(Option::is_none) {
            continue;
        }
        let cells: Vec<String> = targets
            .iter()
            .zip(&figures)
            .map(|(target, figure)| {
                let Some(figure) = figure else {
                    return "–".into();
                };
                let value = figure["value"].as_f64().unwrap_or(f64::NAN);
                match metric.kind {
                    Kind::Plain => format_number(value, metric.digits),
                    Kind::MinusDirect if target == "direct" => "–".into(),
                    Kind::MinusDirect => format!("{value:+.*}", metric.digits),
                    Kind::Ratios => with_ratios(
                        format_number(value, metric.digits),
                        target,
                        figure["vs_direct"].as_f64(),
                        figure["vs_nginx"].as_f64(),
                    ),
                }
            })
            .collect();
        rows.push(format!(
            "| {} | {} |\n",
            label.replace("{rate}", &rate_text),
            cells.join(" | ")
        ));
    }
    if !rows.is_empty() {
        md.push_str(&format!("| | {} |\n", targets.join(" | ")));
        md.push_str(&format!("|---|{}\n", "---:|".repeat(targets.len())));
        md.extend(rows);
        md.push('\n');
    }

    if let Some(offered) = offered {
        md.push_str(&format!(
            "(b) offers {rate_text} req/s to every target: {}.",
            summary_rate_rule(report, offered)
        ));
        let saturated: Vec<String> = targets
            .iter()
            .filter_map(|t| {
                let max = report_figure(report, "throughput", t, "rps")?["value"].as_f64()?;
                (offered >= 0.9 * max)
                    .then(|| format!("`{t}` (max {} req/s)", format_number(max, 0)))
            })
            .collect();
        if !saturated.is_empty() {
            md.push_str(&format!(
                " That rate is 90 % or more of the maximum of {}: their (b) latency is mostly \
                 queueing, not overhead.",
                saturated.join(", ")
            ));
        }
        md.push_str("\n\n");
    }

    if let Some(meter) = report["meter"].as_array().filter(|m| !m.is_empty()) {
        let memchr = meter
            .iter()
            .find(|m| m["name"].as_str().is_some_and(|n| n.contains("memchr")))
            .and_then(|m| m["gib_per_s"].as_f64());
        md.push_str("| (f) meter, criterion, one core | GiB/s | vs memchr |\n|---|---:|---:|\n");
        for m in meter {
            let gib = m["gib_per_s"].as_f64().unwrap_or(f64::NAN);
            md.push_str(&format!(
                "| {} | {gib:.2} | {} |\n",
                m["name"].as_str().unwrap_or("?"),
                memchr.map_or("–".into(), |r| format!("{:.2}×", gib / r)),
            ));
        }
        md.push('\n');
    }

    if let Some(checks) = report["targets"].as_array().filter(|c| !c.is_empty()) {
        let count = |met: Value| checks.iter().filter(|c| c["met"] == met).count();
        let (met, not_met, unmeasured) =
            (count(json!(true)), count(json!(false)), count(Value::Null));
        let mut text = format!("Issue 5 targets: {met} met, {not_met} not met");
        if unmeasured > 0 {
            text.push_str(&format!(", {unmeasured} not measured"));
        }
        md.push_str(&format!(
            "{text} (each proxy and meter benchmark counted; the list is in the full report).\n\n"
        ));
    }
    while md.ends_with("\n\n") {
        md.pop();
    }
    md
}

/// How (b)'s rate was chosen, in words. Reports written before the basis
/// was recorded are matched against (a): the target whose maximum halves to
/// the offered rate.
fn summary_rate_rule(report: &Value, offered: f64) -> String {
    if let Some(basis) = RateBasis::from_json(&report["rate_basis"]) {
        return basis.rule();
    }
    let maxima: Vec<(String, f64)> = report
        .pointer("/scenarios/throughput")
        .and_then(Value::as_object)
        .map(|per_target| {
            per_target
                .keys()
                .filter_map(|t| {
                    let max = report_figure(report, "throughput", t, "rps")?["value"].as_f64()?;
                    Some((t.clone(), max))
                })
                .collect()
        })
        .unwrap_or_default();
    let lowest = maxima.iter().map(|(_, m)| *m).fold(f64::INFINITY, f64::min);
    match maxima
        .iter()
        .find(|(_, max)| (max / 2.0).floor() == offered)
    {
        Some((t, max)) if *max == lowest => RateBasis {
            source: "throughput".into(),
            target: Some(t.clone()),
            max_rps: Some(*max),
        }
        .rule(),
        Some((t, max)) => format!(
            "half of `{t}`'s maximum of {} req/s in (a), the harness's rule when this run was \
             made (now: half of the lowest maximum among the targets)",
            format_number(*max, 0)
        ),
        None => "the rule that set it is not recorded in this report".into(),
    }
}

/// Names the targets for which the open-loop rate was at or above their own
/// maximum throughput from scenario (a): their latency in (b) is mostly time
/// spent queueing, not the proxy's overhead at a sustainable load.
fn saturation_note(rate: &Medians, throughput: Option<&Medians>) -> String {
    let Some(throughput) = throughput else {
        return String::new();
    };
    let saturated: Vec<String> = rate
        .iter()
        .filter_map(|(target, m)| {
            let offered = *m.get("offered_rps")?;
            let max = *throughput.get(target)?.get("rps")?;
            (offered >= 0.9 * max)
                .then(|| format!("{target} (max {} req/s in (a))", format_number(max, 0)))
        })
        .collect();
    if saturated.is_empty() {
        return String::new();
    }
    format!(
        "At this rate these targets run at 90 % or more of their own maximum from (a), so \
         their latency is mostly queueing: {}.\n\n",
        saturated.join(", ")
    )
}

fn order(mut targets: Vec<String>) -> Vec<String> {
    targets.sort_by_key(|t| {
        TARGET_ORDER
            .iter()
            .position(|o| o == t)
            .unwrap_or(TARGET_ORDER.len())
    });
    targets
}

/// One line saying what the scenario ran, from the first row's parameters.
fn describe(
    scenario: &str,
    row: &Value,
    runs: usize,
    targets: usize,
    rate_basis: Option<&RateBasis>,
) -> String {
    let reps = runs.div_ceil(targets.max(1));
    let n = |p: &str| {
        row.pointer(p)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "?".into())
    };
    let text = match scenario {
        "throughput" => format!(
            "{} connections, {} s measured after a warm-up",
            n("/connections"),
            n("/window_s")
        ),
        "rate" => format!(
            "{} requests/s offered to every target{} over {} connections, {} s measured after a \
             warm-up",
            num(row, "/offered_rps").map_or("?".into(), |r| format_number(r, 0)),
            rate_basis.map_or(String::new(), |b| format!(" ({})", b.rule())),
            n("/connections"),
            n("/window_s")
        ),
        "streams" => format!(
            "{} streams of {} events, {} ms apart, starts spread over a short ramp",
            n("/streams"),
            n("/events_per_stream"),
            n("/event_delay_ms")
        ),
        "hold" => format!(
            "{} streams opened and held; RSS read after they all delivered their first event",
            n("/streams")
        ),
        "soak" => format!("{} connections, closed loop", n("/connections")),
        _ => String::new(),
    };
    format!("{text}; {reps} repetition(s) per target.\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_grouping() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(format_number(1234567.4, 0), "1,234,567");
        assert_eq!(format_number(-1234.0, 0), "-1,234");
        assert_eq!(format_number(0.12345, 3), "0.123");
    }

    #[test]
    fn cells_carry_ratios_to_direct_and_nginx() {
        let rows = [
            json!({"scenario": "throughput", "target": "direct", "rps": 1000.0}),
            json!({"scenario": "throughput", "target": "nginx", "rps": 500.0}),
            json!({"scenario": "throughput", "target": "tollgate-postgres", "rps": 460.0}),
            json!({"scenario": "throughput", "target": "tollgate-postgres", "rps": 440.0}),
            json!({"scenario": "throughput", "target": "tollgate-postgres", "rps": 480.0}),
        ];
        let refs: Vec<&Value> = rows.iter().collect();
        let scenario = &scenarios()[0];
        let medians = medians(scenario, &refs);
        let rps = &scenario.metrics[0];
        assert_eq!(cell(rps, &medians, "direct"), "1,000 (2.00×n)");
        assert_eq!(cell(rps, &medians, "nginx"), "500 (0.50×d)");
        assert_eq!(
            cell(rps, &medians, "tollgate-postgres"),
            "460 (0.46×d, 0.92×n)"
        );
        let mut all = BTreeMap::new();
        all.insert("throughput", medians);
        let checks = checks(&all, &[]);
        let a = checks.iter().find(|c| c.goal.starts_with("(a)")).unwrap();
        assert_eq!(a.met, Some(true));
    }

    #[test]
    fn rate_rule_names_the_target_that_set_it() {
        let basis = RateBasis {
            source: "throughput".into(),
            target: Some("tollgate-virtual".into()),
            max_rps: Some(17867.0),
        };
        assert!(
            basis
                .rule()
                .starts_with("half of the lowest maximum throughput among the targets: `tollgate-virtual`'s 17,867 req/s in (a)")
        );
        assert_eq!(RateBasis::from_json(&basis.to_json()), Some(basis));
        let given = RateBasis {
            source: "given".into(),
            target: None,
            max_rps: None,
        };
        assert!(given.rule().contains("--rate"));
    }

    /// A report as `write` stores it, reduced to what the summary reads.
    fn report_json(rate_basis: Value) -> Value {
        let fig = |value: f64, d: Option<f64>, n: Option<f64>| json!({ "value": value, "vs_direct": d, "vs_nginx": n });
        json!({
            "mode": "full",
            "generated_at": "2026-11-25T16:38:28.123+00:00",
            "machine": { "commit": "abc1234", "worktree_dirty": false, "logical_cpus": 2 },
            "params": { "repetitions": "3" },
            "rate_basis": rate_basis,
            "scenarios": {
                "throughput": {
                    "direct": { "median": { "rps": fig(1000.0, Some(1.0), Some(2.0)) } },
                    "nginx": { "median": { "rps": fig(500.0, Some(0.5), Some(1.0)) } },
                    "tollgate-postgres": { "median": { "rps": fig(200.0, Some(0.2), Some(0.4)) } },
                },
                "rate": {
                    "direct": { "median": {
                        "offered_rps": { "value": 100.0 },
                        "added_p99_ms": { "value": 0.0 },
                    } },
                    "tollgate-postgres": { "median": {
                        "offered_rps": { "value": 100.0 },
                        "added_p99_ms": { "value": 0.25 },
                    } },
                },
            },
            "meter": [
                { "name": "memchr_newlines", "gib_per_s": 10.0 },
                { "name": "sse_meter", "gib_per_s": 2.0 },
            ],
            "targets": [{ "met": true }, { "met": false }, { "met": false }],
        })
    }

    #[test]
    fn summary_has_the_headline_figures() {
        let basis = RateBasis {
            source: "throughput".into(),
            target: Some("tollgate-postgres".into()),
            max_rps: Some(200.0),
        };
        let md = summary_markdown(&report_json(basis.to_json()), "latest.md");
        assert!(md.starts_with("Full run of 2026-11-25 16:38 UTC; commit `abc1234`;"));
        assert!(md.contains("[latest.md](latest.md)"));
        assert!(md.contains("| | direct | nginx | tollgate-postgres |\n"));
        assert!(md.contains(
            "| (a) maximum throughput (req/s) | 1,000 (2.00×n) | 500 (0.50×d) | 200 (0.20×d, 0.40×n) |"
        ));
        assert!(md.contains("| (b) added p99 vs direct (ms) | – | – | +0.250 |"));
        assert!(md.contains("(b) offers 100 req/s to every target: half of the lowest"));
        assert!(md.contains("`tollgate-postgres`'s 200 req/s in (a)"));
        assert!(!md.contains("queueing"));
        assert!(md.contains("| sse_meter | 2.00 | 0.20× |"));
        assert!(md.contains("Issue 5 targets: 1 met, 2 not met"));
        assert!(md.ends_with(".\n") && !md.ends_with("\n\n"));
    }

    #[test]
    fn summary_infers_the_rate_rule_of_older_reports() {
        let mut report = report_json(Value::Null);
        for t in ["direct", "tollgate-postgres"] {
            report["scenarios"]["rate"][t]["median"]["offered_rps"]["value"] = json!(500.0);
        }
        let md = summary_markdown(&report, "latest.md");
        assert!(
            md.contains("half of `direct`'s maximum of 1,000 req/s in (a), the harness's rule")
        );
        assert!(md.contains("`tollgate-postgres` (max 200 req/s)"));
        assert!(md.contains("mostly queueing"));
    }
}
