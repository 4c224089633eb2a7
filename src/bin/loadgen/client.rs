//! The client side: one hyper HTTP/1.1 connection per worker, the Messages
//! API request of the benchmark workload, and reading a response to its end.

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Where requests go and how they authenticate.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port`, for the `Host` header.
    pub authority: String,
    pub api_key: String,
}

impl Target {
    /// Parses a base URL such as `http://127.0.0.1:8080` (plain HTTP only:
    /// the benchmark measures the proxies, not TLS).
    pub fn parse(url: &str, api_key: &str) -> anyhow::Result<Target> {
        let parsed = url::Url::parse(url).with_context(|| format!("--url {url}"))?;
        anyhow::ensure!(parsed.scheme() == "http", "--url must be http://");
        let host = parsed.host_str().context("--url has no host")?;
        let port = parsed
            .port_or_known_default()
            .context("--url has no port")?;
        let addr = (host, port)
            .to_socket_addrs()?
            .next()
            .with_context(|| format!("{host} does not resolve"))?;
        Ok(Target {
            addr,
            authority: format!("{host}:{port}"),
            api_key: api_key.to_owned(),
        })
    }
}

/// One keep-alive connection with at most one request in flight.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    /// Drives the connection's I/O; aborted when the connection is dropped.
    driver: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Conn {
    /// Opens a connection (TCP_NODELAY, as every proxy under test sets it).
    pub async fn open(target: &Target) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(target.addr)
            .await
            .with_context(|| format!("connecting to {}", target.addr))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(async move {
            // A connection error surfaces on the next send; nothing to add here.
            let _ = connection.await;
        });
        Ok(Conn { sender, driver })
    }

    /// Sends a request and returns the response head once it arrives.
    pub async fn send(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> anyhow::Result<http::Response<Incoming>> {
        self.sender.ready().await?;
        Ok(self.sender.send_request(request).await?)
    }

    /// Sends a request and reads the body to its end without keeping it.
    pub async fn round_trip(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> anyhow::Result<StatusCode> {
        let response = self.send(request).await?;
        let status = response.status();
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            frame?;
        }
        Ok(status)
    }
}

/// The request every worker sends: a small Messages API call, streaming or
/// not, with the mock's steering headers.
#[derive(Debug, Clone)]
pub struct Workload {
    body: Bytes,
    output_tokens: u64,
    event_delay_ms: u64,
}

/// Events of a synthesised mock stream besides its text deltas:
/// `message_start`, `content_block_start`, `ping`, `content_block_stop`,
/// `message_delta`, `message_stop`.
pub const STREAM_FRAMING_EVENTS: u64 = 6;

impl Workload {
    /// A Messages request for `output_tokens` tokens; streams space their
    /// events `event_delay_ms` apart.
    pub fn messages(stream: bool, output_tokens: u64, event_delay_ms: u64) -> Workload {
        let body = serde_json::json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": output_tokens.max(1),
            "stream": stream,
            "messages": [{"role": "user", "content": "Hello from the tollgate benchmark."}],
        });
        Workload {
            body: Bytes::from(body.to_string()),
            output_tokens,
            event_delay_ms,
        }
    }

    /// A stream of `events` SSE events in all.
    pub fn stream_of(events: u64, event_delay_ms: u64) -> Workload {
        Workload::messages(
            true,
            events.saturating_sub(STREAM_FRAMING_EVENTS),
            event_delay_ms,
        )
    }

    /// The request, ready to send on any connection to `target`.
    pub fn request(&self, target: &Target) -> anyhow::Result<Request<Full<Bytes>>> {
        Ok(Request::post("/v1/messages")
            .header(header::HOST, &target.authority)
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-api-key", &target.api_key)
            .header("anthropic-version", "2023-06-01")
            .header("x-mock-output-tokens", self.output_tokens)
            .header("x-mock-event-delay-ms", self.event_delay_ms)
            .header("x-mock-stamp", "1")
            .body(Full::new(self.body.clone()))?)
    }
}

/// Polls the target with one small request until it answers 200.
pub async fn wait_ready(target: &Target, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let workload = Workload::messages(false, 1, 0);
    let mut last_error = String::from("no attempt");
    while tokio::time::Instant::now() < deadline {
        let attempt = async {
            let mut conn = Conn::open(target).await?;
            conn.round_trip(workload.request(target)?).await
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(status)) if status == StatusCode::OK => return Ok(()),
            Ok(Ok(status)) => last_error = format!("status {status}"),
            Ok(Err(e)) => last_error = format!("{e:#}"),
            Err(_) => last_error = "no answer within 2 s".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("{} not ready after {timeout:?}: {last_error}", target.addr)
}

/// Counts why requests failed, for the JSON output.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Errors {
    /// Responses with a status other than 200.
    pub status: u64,
    /// Connection or protocol errors (the connection is then reopened).
    pub io: u64,
}

impl Errors {
    /// Adds another worker's counts.
    pub fn add(&mut self, other: Errors) {
        self.status += other.status;
        self.io += other.io;
    }
}
