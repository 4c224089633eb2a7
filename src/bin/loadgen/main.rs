//! `loadgen`: the load generator of the benchmark harness (`scripts/bench`,
//! issue 5). It drives one target (the mock upstream directly, nginx, or
//! tollgate) with the Messages API workload and prints one JSON object per
//! measurement on stdout.
//!
//! Modes, one per scenario of the harness:
//! - `closed`: N keep-alive connections send back to back (maximum
//!   throughput, and the million-request soak);
//! - `open`: a fixed arrival rate, latency measured from each request's
//!   scheduled send time so a slow target cannot hide its queueing
//!   (no coordinated omission);
//! - `streams`: many concurrent SSE streams; time to first byte and the relay
//!   delay of every event, read from the mock's `: ts=<ns>` comment lines;
//! - `hold`: many slow streams held open at once; proxy memory per stream.
//!
//! Around each measurement it reads the proxy's CPU time and memory from
//! `/proc` (`--pid`, the process and its children, so nginx's workers count).
//! `report` turns the collected JSON lines into `bench/results/`; `summary`
//! turns a report's JSON into the headline table the README shows.
//!
//! The client is hyper's own HTTP/1.1 connection (`hyper::client::conn`), one
//! request at a time per connection, with keep-alive, on tokio's multi-threaded
//! runtime: no pool, so the connection count is exactly what was asked for.

mod client;
mod closed_loop;
mod latency;
mod open_loop;
mod proc_stats;
mod report;
mod streams;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use client::{Target, Workload};
use proc_stats::Watched;

/// Load generator of tollgate's benchmark harness (see scripts/bench).
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// N connections sending back to back: maximum throughput, or a soak of a
    /// fixed number of requests.
    Closed(ClosedArgs),
    /// A fixed arrival rate; latency from each request's scheduled send time.
    Open(OpenArgs),
    /// Concurrent SSE streams: time to first byte and per-event relay delay.
    Streams(StreamsArgs),
    /// Slow SSE streams held open at once: proxy memory per open stream.
    Hold(HoldArgs),
    /// Waits until a target answers `POST /v1/messages` with 200.
    Wait(WaitArgs),
    /// Prints free TCP ports on 127.0.0.1, one a line.
    FreePorts {
        /// How many ports.
        #[arg(default_value_t = 1)]
        count: usize,
    },
    /// Prints the median of one numeric field over the raw results of a
    /// scenario and target (used to derive the open-loop rate).
    Median {
        /// The JSON-lines file of raw results.
        #[arg(long)]
        raw: PathBuf,
        #[arg(long)]
        scenario: String,
        #[arg(long)]
        target: String,
        /// Top-level numeric field, e.g. `rps`.
        #[arg(long)]
        field: String,
    },
    /// Writes the Markdown and JSON report from the raw results.
    Report(report::ReportArgs),
    /// Prints the headline table of a report's JSON (the README's block).
    Summary(report::SummaryArgs),
}

/// Options every measurement shares.
#[derive(Debug, Args)]
struct Common {
    /// Base URL of the target, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: String,
    /// API key sent as x-api-key (passthrough: anything; virtual: a tollgate key).
    #[arg(
        long,
        default_value = "sk-ant-bench",
        env = "LOADGEN_API_KEY",
        hide_env_values = true
    )]
    api_key: String,
    /// Process whose CPU time and memory are measured, with its children (the proxy).
    #[arg(long)]
    pid: Option<u32>,
    /// The mock upstream's process, measured the same way.
    #[arg(long)]
    upstream_pid: Option<u32>,
    /// Clock ticks per second of /proc/<pid>/stat (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// Scenario name, copied into the output.
    #[arg(long, default_value = "")]
    scenario: String,
    /// Target name, copied into the output.
    #[arg(long, default_value = "")]
    target: String,
    /// Repetition number, copied into the output.
    #[arg(long, default_value_t = 1)]
    rep: u32,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

#[derive(Debug, Args)]
struct ClosedArgs {
    #[command(flatten)]
    common: Common,
    /// Concurrent connections, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measure for this long (after the warm-up); excludes --requests.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "requests")]
    duration: Option<Duration>,
    /// Warm-up before a timed measurement.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    warmup: Duration,
    /// Send exactly this many requests (a soak); excludes --duration.
    #[arg(long)]
    requests: Option<u64>,
    /// Requests of a soak that count as warm-up: RSS "after warm-up" is read
    /// when they have been sent.
    #[arg(long, default_value_t = 0)]
    warmup_requests: u64,
    /// Output tokens of each (non-streaming) response.
    #[arg(long, default_value_t = 16)]
    output_tokens: u64,
}

#[derive(Debug, Args)]
struct OpenArgs {
    #[command(flatten)]
    common: Common,
    /// Requests per second, scheduled at even intervals.
    #[arg(long)]
    rate: f64,
    /// Measure for this long (after the warm-up).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Warm-up at the same rate, not recorded.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    warmup: Duration,
    /// Connections available to the schedule (a request waits for a free one,
    /// and that wait counts in its latency).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// How long requests still queued at the end may take before they are
    /// counted as not sent.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    drain: Duration,
    /// Output tokens of each (non-streaming) response.
    #[arg(long, default_value_t = 16)]
    output_tokens: u64,
}

#[derive(Debug, Args)]
struct StreamsArgs {
    #[command(flatten)]
    common: Common,
    /// Concurrent streams, one connection each.
    #[arg(long, default_value_t = 500)]
    streams: usize,
    /// SSE events per stream (the mock adds six around the text deltas).
    #[arg(long, default_value_t = 200)]
    events: u64,
    /// Spacing of the events.
    #[arg(long, default_value_t = 10)]
    event_delay_ms: u64,
    /// Stream starts are spread evenly over this period, so that the events of
    /// all streams are not sent in lockstep.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "100ms")]
    ramp: Duration,
    /// Longest time the whole measurement may take.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
    timeout: Duration,
}

#[derive(Debug, Args)]
struct HoldArgs {
    #[command(flatten)]
    common: Common,
    /// Streams to hold open at once, one connection each.
    #[arg(long, default_value_t = 10_000)]
    streams: usize,
    /// Events per stream: with --event-delay-ms, how long a stream can stay open.
    #[arg(long, default_value_t = 600)]
    events: u64,
    /// Spacing of the events: slow, so the streams stay open.
    #[arg(long, default_value_t = 1000)]
    event_delay_ms: u64,
    /// Streams being opened at once.
    #[arg(long, default_value_t = 256)]
    open_concurrency: usize,
    /// Wait after the last stream opened before reading memory.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    settle: Duration,
    /// Longest time opening all streams may take.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
    timeout: Duration,
}

#[derive(Debug, Args)]
struct WaitArgs {
    /// Base URL of the target.
    #[arg(long)]
    url: String,
    /// API key sent as x-api-key.
    #[arg(
        long,
        default_value = "sk-ant-bench",
        env = "LOADGEN_API_KEY",
        hide_env_values = true
    )]
    api_key: String,
    /// Give up after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    timeout: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Closed(args) => measure(&args.common, |target, watched| async move {
            let workload = Workload::messages(false, args.output_tokens, 0);
            let plan = closed_loop::Plan {
                connections: args.connections,
                stop: match (args.duration, args.requests) {
                    (_, Some(n)) => closed_loop::Stop::Requests {
                        total: n,
                        warmup: args.warmup_requests,
                    },
                    (Some(d), None) => closed_loop::Stop::Time {
                        warmup: args.warmup,
                        measure: d,
                    },
                    (None, None) => anyhow::bail!("give --duration or --requests"),
                },
            };
            closed_loop::run(&target, &workload, &plan, &watched).await
        }),
        Command::Open(args) => measure(&args.common, |target, watched| async move {
            let workload = Workload::messages(false, args.output_tokens, 0);
            let plan = open_loop::Plan {
                rate: args.rate,
                warmup: args.warmup,
                measure: args.duration,
                connections: args.connections,
                drain: args.drain,
            };
            open_loop::run(&target, &workload, &plan, &watched).await
        }),
        Command::Streams(args) => measure(&args.common, |target, watched| async move {
            let plan = streams::ConcurrentPlan {
                streams: args.streams,
                events: args.events,
                event_delay_ms: args.event_delay_ms,
                ramp: args.ramp,
                timeout: args.timeout,
            };
            streams::run_concurrent(&target, &plan, &watched).await
        }),
        Command::Hold(args) => measure(&args.common, |target, watched| async move {
            let plan = streams::HoldPlan {
                streams: args.streams,
                events: args.events,
                event_delay_ms: args.event_delay_ms,
                open_concurrency: args.open_concurrency,
                settle: args.settle,
                timeout: args.timeout,
            };
            streams::run_hold(&target, &plan, &watched).await
        }),
        Command::Wait(args) => {
            let target = Target::parse(&args.url, &args.api_key)?;
            runtime(1)?.block_on(client::wait_ready(&target, args.timeout))
        }
        Command::FreePorts { count } => {
            // Hold every listener until all are chosen, so the ports differ.
            let listeners = (0..count)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
                .collect::<Result<Vec<_>, _>>()?;
            for listener in &listeners {
                println!("{}", listener.local_addr()?.port());
            }
            Ok(())
        }
        Command::Median {
            raw,
            scenario,
            target,
            field,
        } => {
            let rows = report::read_raw(&raw)?;
            let values: Vec<f64> = rows
                .iter()
                .filter(|r| r["scenario"] == scenario.as_str() && r["target"] == target.as_str())
                .filter_map(|r| r[field.as_str()].as_f64())
                .collect();
            let median = report::median(&values).ok_or_else(|| {
                anyhow::anyhow!("no `{field}` for {scenario}/{target} in {}", raw.display())
            })?;
            println!("{median}");
            Ok(())
        }
        Command::Report(args) => report::write(&args),
        Command::Summary(args) => report::summary(&args),
    }
}

/// Runs one measurement on a fresh runtime and prints its JSON line, with
/// the scenario, target and repetition it was asked to carry.
fn measure<F, Fut>(common: &Common, body: F) -> anyhow::Result<()>
where
    F: FnOnce(Target, Watched) -> Fut,
    Fut: Future<Output = anyhow::Result<Value>>,
{
    let target = Target::parse(&common.url, &common.api_key)?;
    let watched = Watched::new(common.pid, common.upstream_pid, common.clk_tck)?;
    let mut result = runtime(common.threads)?.block_on(body(target, watched))?;
    if let Value::Object(map) = &mut result {
        map.insert("scenario".into(), json!(common.scenario));
        map.insert("target".into(), json!(common.target));
        map.insert("rep".into(), json!(common.rep));
    }
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?)
}
