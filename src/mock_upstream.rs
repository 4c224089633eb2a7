//! `tollgate mock-upstream`: a fast fake Anthropic API for tests, demos and
//! benchmarks.
//!
//! It speaks HTTP/1.1 and h2 (cleartext or, with TLS, by ALPN), checks for an
//! API key like the real API, and answers:
//!
//! - `POST /v1/messages`: a synthesised message (default) or a recorded
//!   fixture, as SSE when the body has `"stream": true`, else as JSON.
//! - `POST /v1/messages/count_tokens`: `{"input_tokens": N}`.
//! - `GET /v1/models`: a short model list.
//! - `GET /mock/stats` (no key needed): the [`MockStats`] totals as JSON.
//! - anything else: 404 `not_found_error`.
//!
//! Every response has a `request-id: req_mock_…` header; errors have the
//! Anthropic shape `{"type":"error","error":{"type","message"},"request_id"}`.
//! Input tokens are derived from the request alone: `ceil(body bytes / 4)`.
//! A synthesised stream has one text delta (a four-byte word) per output token,
//! or `input_json_delta`s of a `tool_use` block (`stop_reason: tool_use`) when
//! the request has `tools`. Message responses carry `x-mock-usage:
//! input=…,output=…,cache_write=…,cache_read=…`, the final usage they report.
//!
//! Fixtures (`--fixtures DIR`, header `x-mock-fixture: NAME` for `NAME.sse`)
//! are replayed byte for byte, one event per frame. A non-streaming request
//! with a fixture gets the JSON message the stream spells out, with the
//! stream's final usage.
//!
//! Requests steer the response with the headers listed in [`HEADERS_HELP`]
//! (also shown by `--help`), including the fault grammar of `x-mock-fault`.
//! [`MockStats`] counts usage when it is emitted: a stream cut before its final
//! `message_delta` adds no tokens.
//!
//! Modules: `routes` handles requests; `controls` reads the headers;
//! `synth` renders synthesised events; `fixtures` loads recorded streams;
//! `faults` parses faults; `body` paces and breaks response bodies; `stats`
//! keeps totals; `tls` generates certificates.

mod body;
mod controls;
mod faults;
mod fixtures;
mod routes;
mod stats;
mod synth;
mod tls;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use stats::MockStats;

use crate::secret::Secret;
use controls::{Defaults, MAX_OUTPUT_TOKENS};
use routes::MockState;

/// The request headers that steer a response, and the `x-mock-fault` grammar.
pub const HEADERS_HELP: &str = "\
Request headers (all optional):
  x-mock-fixture: NAME          replay NAME.sse from --fixtures (byte-exact when streaming)
  x-mock-output-tokens: N       output tokens (one delta each), capped by max_tokens
                                (then stop_reason max_tokens)
  x-mock-cache: write=N,read=M[,write_1h=K]
                                cache counters; write is 5-minute writes, write_1h 1-hour
                                writes, cache_creation_input_tokens is their sum
  x-mock-input-growth: N        final message_delta reports input_tokens larger by N
  x-mock-web-searches: N        final usage reports server_tool_use.web_search_requests N
  x-mock-event-delay-ms: MS     delay between SSE events
  x-mock-stamp: 1               write ': ts=<unix epoch ns>' before each SSE event
  x-mock-gzip: 1                gzip a non-streaming body (content-encoding: gzip)
  x-mock-fault: FAULT[,FAULT]   inject faults (below)
  x-mock-fail-times: K          with x-mock-fault-key: S, apply the fault only to the first
                                K requests carrying key S, then answer normally

Faults (x-mock-fault):
  status=CODE[;retry-after=SECS]  answer CODE (4xx/5xx) with an Anthropic error body
                                  (429 rate_limit_error, 529 overloaded_error, 500 api_error,
                                  ...); retry-after sets retry-after (rounded up) and
                                  retry-after-ms
  slow-first-byte=MS              wait MS before sending the response headers
  reset-after=N                   send N events (JSON: N bytes), then abort the connection
                                  (h1) or stream (h2): the client sees a broken body
  error-after=N                   send N events, then an in-stream overloaded_error event,
                                  and end the stream (streams only)
  stall-after=N                   send N events (JSON: N bytes), then nothing more until the
                                  client goes away or --max-stall passes (then abort)
  At most one of reset-after, error-after, stall-after; N beyond the end of the body
  means no cut. Example: x-mock-fault: slow-first-byte=200,reset-after=3

Endpoints: POST /v1/messages, POST /v1/messages/count_tokens, GET /v1/models,
GET /mock/stats (totals as JSON, no key needed). Input tokens = ceil(body bytes / 4).
Message responses carry x-mock-usage: input=N,output=N,cache_write=N,cache_read=N, the
final usage they report. A non-streaming request with x-mock-fixture gets the JSON
message the recorded stream spells out.";

/// Command-line flags of `tollgate mock-upstream`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = HEADERS_HELP)]
pub struct MockArgs {
    /// Address to listen on; port 0 picks a free port (the line printed on start tells which).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Serve HTTPS (h2 and HTTP/1.1 by ALPN) with a freshly generated CA and a certificate
    /// for localhost and 127.0.0.1.
    #[arg(long)]
    pub tls: bool,
    /// Write the generated CA certificate (PEM) here, for `upstream.ca_file`; by default a
    /// temporary file, removed on exit.
    #[arg(long, value_name = "PATH", requires = "tls")]
    pub ca_out: Option<PathBuf>,
    /// Directory of recorded `.sse` streams, chosen per request by `x-mock-fixture: NAME`.
    #[arg(long, value_name = "DIR")]
    pub fixtures: Option<PathBuf>,
    /// Output tokens of a synthesised response when the request has no x-mock-output-tokens.
    #[arg(long, default_value_t = 16, value_name = "N",
          value_parser = clap::value_parser!(u64).range(0..=MAX_OUTPUT_TOKENS))]
    pub output_tokens: u64,
    /// Delay between SSE events when the request has no x-mock-event-delay-ms.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub event_delay_ms: u64,
    /// Write an SSE comment `: ts=<unix epoch ns>` before every event, so a client can
    /// measure relay delay (per request: x-mock-stamp: 1).
    #[arg(long)]
    pub stamp_events: bool,
    /// Accept only this API key (x-api-key or Authorization: Bearer); by default any
    /// non-empty key is accepted.
    #[arg(long, value_name = "KEY", env = "TOLLGATE_MOCK_API_KEY", hide_env_values = true,
          value_parser = parse_secret)]
    pub api_key: Option<Secret<String>>,
    /// Longest a `stall-after` fault holds a stream open before aborting it.
    #[arg(long, default_value = "10m", value_name = "DURATION",
          value_parser = humantime::parse_duration)]
    pub max_stall: Duration,
}

fn parse_secret(value: &str) -> Result<Secret<String>, Infallible> {
    Ok(Secret::new(value.to_owned()))
}

/// How to run a mock (the library form of [`MockArgs`]).
#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Address to bind; default `127.0.0.1:0`.
    pub listen: SocketAddr,
    /// Serve HTTPS with a generated CA; default off.
    pub tls: bool,
    /// Where to write the CA certificate; `None` writes a temporary file that
    /// is removed when the server is dropped.
    pub ca_out: Option<PathBuf>,
    /// Directory of `.sse` fixtures; default none.
    pub fixtures: Option<PathBuf>,
    /// Output tokens when a request does not say; default 16.
    pub output_tokens: u64,
    /// Delay between SSE events when a request does not say; default none.
    pub event_delay: Duration,
    /// Timestamp every SSE event; default off.
    pub stamp_events: bool,
    /// The only API key accepted; default any non-empty key.
    pub api_key: Option<Secret<String>>,
    /// Longest a `stall-after` fault holds a stream open; default 10 minutes.
    pub max_stall: Duration,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: false,
            ca_out: None,
            fixtures: None,
            output_tokens: 16,
            event_delay: Duration::ZERO,
            stamp_events: false,
            api_key: None,
            max_stall: Duration::from_secs(600),
        }
    }
}

impl From<MockArgs> for MockOptions {
    fn from(args: MockArgs) -> Self {
        MockOptions {
            listen: args.listen,
            tls: args.tls,
            ca_out: args.ca_out,
            fixtures: args.fixtures,
            output_tokens: args.output_tokens,
            event_delay: Duration::from_millis(args.event_delay_ms),
            stamp_events: args.stamp_events,
            api_key: args.api_key,
            max_stall: args.max_stall,
        }
    }
}

/// The CA certificate of a TLS mock and the file it was written to.
#[derive(Debug)]
struct CaFile {
    pem: String,
    path: PathBuf,
    /// A temporary file the server created, removed on drop.
    temporary: bool,
}

/// A running mock. Dropping it stops it (and removes a temporary CA file);
/// [`MockServer::shutdown`] also waits for the listener to close.
#[derive(Debug)]
pub struct MockServer {
    addr: SocketAddr,
    url: String,
    ca: Option<CaFile>,
    state: Arc<MockState>,
    shutdown: CancellationToken,
    accept_task: Option<JoinHandle<()>>,
}

impl MockServer {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL: `http://127.0.0.1:PORT`, or `https://localhost:PORT` with TLS.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The CA certificate (PEM) clients must trust, when TLS is on.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca.as_ref().map(|ca| ca.pem.as_str())
    }

    /// The file holding [`MockServer::ca_pem`], when TLS is on.
    pub fn ca_path(&self) -> Option<&Path> {
        self.ca.as_ref().map(|ca| ca.path.as_path())
    }

    /// Totals emitted so far.
    pub fn stats(&self) -> MockStats {
        self.state.stats.snapshot()
    }

    /// Stops accepting, aborts open connections and waits until they are gone.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.accept_task.take()
            && let Err(e) = task.await
        {
            tracing::warn!(error = %e, "mock-upstream accept loop ended abnormally");
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(ca) = &self.ca
            && ca.temporary
        {
            let _ = std::fs::remove_file(&ca.path);
        }
    }
}

/// Starts a mock on `opts.listen` and returns once it accepts connections.
pub async fn start(opts: MockOptions) -> anyhow::Result<MockServer> {
    anyhow::ensure!(
        opts.output_tokens <= MAX_OUTPUT_TOKENS,
        "output_tokens must be at most {MAX_OUTPUT_TOKENS}"
    );
    let fixtures = match &opts.fixtures {
        Some(dir) => fixtures::load_dir(dir)?,
        None => HashMap::new(),
    };
    let listener = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding {}", opts.listen))?;
    let addr = listener.local_addr()?;

    let (acceptor, ca, url) = if opts.tls {
        let generated = tls::generate()?;
        let (path, temporary) = match &opts.ca_out {
            Some(path) => (path.clone(), false),
            None => {
                let name = format!(
                    "tollgate-mock-ca-{}-{}.pem",
                    std::process::id(),
                    addr.port()
                );
                (std::env::temp_dir().join(name), true)
            }
        };
        std::fs::write(&path, &generated.ca_pem)
            .with_context(|| format!("writing the CA certificate to {}", path.display()))?;
        let ca = CaFile {
            pem: generated.ca_pem,
            path,
            temporary,
        };
        let url = format!("https://localhost:{}", addr.port());
        (
            Some(TlsAcceptor::from(generated.server_config)),
            Some(ca),
            url,
        )
    } else {
        (None, None, format!("http://{addr}"))
    };

    let defaults = Defaults {
        output_tokens: opts.output_tokens,
        event_delay: opts.event_delay,
        stamp: opts.stamp_events,
    };
    let state = Arc::new(MockState::new(
        defaults,
        opts.api_key,
        opts.max_stall,
        fixtures,
    ));
    let shutdown = CancellationToken::new();
    let accept_task = tokio::spawn(accept_loop(
        listener,
        acceptor,
        state.clone(),
        shutdown.clone(),
    ));
    tracing::info!(%url, "mock-upstream listening");
    Ok(MockServer {
        addr,
        url,
        ca,
        state,
        shutdown,
        accept_task: Some(accept_task),
    })
}

/// Runs `tollgate mock-upstream` until SIGINT or SIGTERM. Prints one line to
/// stdout for scripts: `addr=HOST:PORT url=URL` and, with TLS, ` ca=PATH`.
pub async fn run_cli(args: MockArgs) -> anyhow::Result<()> {
    // Listen for signals before announcing the address, so a script that
    // stops the mock as soon as it has read the line gets a clean exit.
    let stop = stop_signal()?;
    let server = start(MockOptions::from(args)).await?;
    let mut line = format!("addr={} url={}", server.addr(), server.url());
    if let Some(path) = server.ca_path() {
        line.push_str(&format!(" ca={}", path.display()));
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    drop(stdout);
    stop.await?;
    tracing::info!("mock-upstream stopping");
    server.shutdown().await;
    Ok(())
}

/// A future that resolves on SIGINT or SIGTERM, listening from the moment it
/// is created.
#[cfg(unix)]
fn stop_signal() -> anyhow::Result<impl Future<Output = std::io::Result<()>>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        Ok(())
    })
}

#[cfg(not(unix))]
fn stop_signal() -> anyhow::Result<impl Future<Output = std::io::Result<()>>> {
    Ok(tokio::signal::ctrl_c())
}

/// Accepts connections until `shutdown`, one task per connection in a set it
/// owns.
///
/// Shutdown order: 1. stop accepting; 2. abort every open connection (a mock
/// has nothing to drain, and a stalled stream would otherwise hold shutdown
/// for up to `max_stall`); 3. wait for the aborted tasks to finish.
async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    state: Arc<MockState>,
    shutdown: CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    // Events must leave as soon as they are written, not when
                    // Nagle's algorithm decides.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "could not set TCP_NODELAY");
                    }
                    connections.spawn(serve_connection(stream, acceptor.clone(), state.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "mock-upstream accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    connections.shutdown().await;
}

/// Serves one connection: TLS handshake if configured, then HTTP/1.1 or h2.
async fn serve_connection(stream: TcpStream, acceptor: Option<TlsAcceptor>, state: Arc<MockState>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let service = service_fn(move |request| routes::handle(state.clone(), request));
    let result = match acceptor {
        None => {
            builder
                .serve_connection(TokioIo::new(stream), service)
                .await
        }
        Some(acceptor) => {
            match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                Ok(Ok(tls)) => builder.serve_connection(TokioIo::new(tls), service).await,
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err("TLS handshake timed out".into()),
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "mock-upstream connection ended with an error");
    }
}
