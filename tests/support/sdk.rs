//! Running the official Anthropic SDKs (Python and TypeScript) as clients of a
//! test gateway, and a byte tap that shows which headers reached the upstream.
//!
//! The SDKs are installed by `scripts/setup-sdks`: Python into `<repo>/.venv`,
//! TypeScript into `tests/sdk/ts/node_modules`. Each scenario script prints one
//! JSON line describing what the SDK saw (see `tests/sdk/python/scenarios.py`).
//! When an SDK is missing the test fails with a message to run the setup
//! script; only outside CI, and only with `TOLLGATE_SKIP_SDK_TESTS=1`, is it
//! skipped instead, and it says so loudly on stderr.

// Test helpers are not `#[test]` functions, so clippy's test exemption does
// not reach them; a failed unwrap here is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

use tollgate::record::UsageRecord;

/// The API key every scenario uses; the mock is started to accept only it, so
/// a request that reaches the mock proves the key went through unchanged.
pub const TEST_API_KEY: &str = "sk-ant-api03-tollgate-sdk-test-key";

/// Longest one scenario script may run before the test fails (a hang in the
/// gateway must fail the test, not block CI).
pub const SCENARIO_TIMEOUT: Duration = Duration::from_secs(40);

/// Which official SDK runs a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sdk {
    /// `anthropic` on PyPI, `tests/sdk/python/scenarios.py`.
    Python,
    /// `@anthropic-ai/sdk` on npm, `tests/sdk/ts/scenarios.mjs`.
    TypeScript,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `<repo>/.venv/bin/python`.
fn venv_python() -> PathBuf {
    repo_root().join(".venv/bin/python")
}

fn ts_dir() -> PathBuf {
    repo_root().join("tests/sdk/ts")
}

/// The first `node` on `PATH`.
fn node_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("node"))
        .find(|p| p.is_file())
}

impl Sdk {
    /// Why this SDK cannot run here, if it cannot.
    fn missing(self) -> Option<String> {
        match self {
            Sdk::Python => {
                let python = venv_python();
                if !python.is_file() {
                    return Some(format!("{} does not exist", python.display()));
                }
                // Looking for the package is enough (importing it takes a
                // second); a broken install fails the scenario with its error.
                let lib = repo_root().join(".venv/lib");
                let installed =
                    std::fs::read_dir(&lib)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .any(|dir| {
                            dir.path()
                                .join("site-packages/anthropic/__init__.py")
                                .is_file()
                        });
                if !installed {
                    return Some(format!("no anthropic package under {}", lib.display()));
                }
                None
            }
            Sdk::TypeScript => {
                if node_binary().is_none() {
                    return Some("no `node` on PATH".into());
                }
                let sdk = ts_dir().join("node_modules/@anthropic-ai/sdk/package.json");
                if !sdk.is_file() {
                    return Some(format!("{} does not exist", sdk.display()));
                }
                None
            }
        }
    }

    /// Whether the test should go on. Panics when the SDK is missing, unless
    /// skipping is allowed (not in CI, `TOLLGATE_SKIP_SDK_TESTS=1`): then it
    /// prints a loud notice and returns false.
    pub fn available(self, test: &str) -> bool {
        let Some(reason) = self.missing() else {
            return true;
        };
        let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
        let skip_allowed = std::env::var("TOLLGATE_SKIP_SDK_TESTS").is_ok_and(|v| v == "1");
        if skip_allowed && !in_ci {
            // Written to the stderr handle, not with `eprintln!`, so that the
            // test harness's output capture cannot hide the skip.
            let notice = format!(
                "\n!!!! SKIPPED {test}: the {self:?} SDK is not installed ({reason}).\n\
                 !!!! TOLLGATE_SKIP_SDK_TESTS=1 is set; run scripts/setup-sdks to test with it.\n"
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr(), notice.as_bytes());
            return false;
        }
        panic!(
            "{test}: the {self:?} SDK is not installed ({reason}). Run scripts/setup-sdks first \
             (or, outside CI, set TOLLGATE_SKIP_SDK_TESTS=1 to skip the SDK tests)."
        );
    }
}

/// What one scenario script reported, plus its stderr for failure messages.
#[derive(Debug)]
pub struct ScenarioRun {
    /// The JSON line the script printed.
    pub report: Value,
    pub stderr: String,
}

impl ScenarioRun {
    /// `report[result]`, failing the test (with the SDK's error) if the
    /// scenario raised instead.
    pub fn result(&self) -> &Value {
        assert_eq!(self.report["outcome"], "ok", "the SDK raised: {self}");
        &self.report["result"]
    }

    /// `report[error]`, failing the test if the scenario did not raise.
    pub fn error(&self) -> &Value {
        assert_eq!(
            self.report["outcome"], "error",
            "the SDK did not raise: {self}"
        );
        &self.report["error"]
    }

    /// The `tollgate-request-id` the SDK saw on the response (or on the error's
    /// response).
    pub fn tollgate_request_id(&self) -> String {
        let headers = match self.report["outcome"].as_str() {
            Some("ok") => &self.report["result"]["headers"],
            _ => &self.report["error"]["headers"],
        };
        headers["tollgate-request-id"]
            .as_str()
            .unwrap_or_else(|| panic!("no tollgate-request-id header reached the SDK: {self}"))
            .to_owned()
    }
}

impl std::fmt::Display for ScenarioRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.report)?;
        if !self.stderr.trim().is_empty() {
            write!(f, "\n--- stderr ---\n{}", self.stderr.trim_end())?;
        }
        Ok(())
    }
}

/// Runs `scenario` with `sdk` against `base_url`, with the SDK's ordinary
/// environment (`ANTHROPIC_BASE_URL`, `ANTHROPIC_API_KEY`) and nothing else
/// from ours that could steer it (proxies, other `ANTHROPIC_*` variables).
pub async fn run_scenario(sdk: Sdk, scenario: &str, base_url: &str) -> ScenarioRun {
    run_scenario_as(sdk, scenario, base_url, TEST_API_KEY, &[]).await
}

/// [`run_scenario`] with the given API key and extra environment variables.
pub async fn run_scenario_as(
    sdk: Sdk,
    scenario: &str,
    base_url: &str,
    api_key: &str,
    env: &[(&str, &str)],
) -> ScenarioRun {
    let mut command = match sdk {
        Sdk::Python => {
            let mut c = Command::new(venv_python());
            c.arg(repo_root().join("tests/sdk/python/scenarios.py"));
            c.env("PYTHONDONTWRITEBYTECODE", "1");
            c
        }
        Sdk::TypeScript => {
            let node = node_binary().unwrap_or_else(|| PathBuf::from("node"));
            let mut c = Command::new(node);
            c.arg(ts_dir().join("scenarios.mjs"));
            c
        }
    };
    command
        .arg(scenario)
        .current_dir(repo_root())
        .env_clear()
        .env("ANTHROPIC_BASE_URL", base_url)
        .env("ANTHROPIC_API_KEY", api_key)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for name in ["PATH", "HOME", "LANG", "TMPDIR"] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the {sdk:?} scenario {scenario}: {e}"));
    let output = match tokio::time::timeout(SCENARIO_TIMEOUT, child.wait_with_output()).await {
        Ok(result) => result.unwrap_or_else(|e| panic!("{sdk:?} {scenario}: {e}")),
        Err(_) => {
            panic!("{sdk:?} scenario {scenario} hung for more than {SCENARIO_TIMEOUT:?} (killed)")
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "{sdk:?} scenario {scenario} failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| {
            panic!("{sdk:?} scenario {scenario} printed nothing; stderr:\n{stderr}")
        });
    let report: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{sdk:?} {scenario}: bad JSON line ({e}): {line}"));
    ScenarioRun { report, stderr }
}

/// The SDK's view of a usage counter; absent or null counts as zero.
fn counter(usage: &Value, name: &str) -> u64 {
    usage[name].as_u64().unwrap_or(0)
}

/// Asserts that the usage an SDK reported equals the record's, counter by
/// counter, including the 5-minute/1-hour cache-write split and the service
/// tier when the SDK saw them.
pub fn assert_usage_matches(sdk_usage: &Value, record: &UsageRecord) {
    let u = &record.usage;
    let pairs = [
        ("input_tokens", u.input_tokens),
        ("output_tokens", u.output_tokens),
        ("cache_creation_input_tokens", u.cache_creation_input_tokens),
        ("cache_read_input_tokens", u.cache_read_input_tokens),
    ];
    for (name, recorded) in pairs {
        assert_eq!(
            counter(sdk_usage, name),
            recorded,
            "{name}: SDK saw {sdk_usage}, tollgate recorded {record:?}"
        );
    }
    if let Some(split) = sdk_usage["cache_creation"].as_object() {
        let five = split
            .get("ephemeral_5m_input_tokens")
            .and_then(Value::as_u64);
        let hour = split
            .get("ephemeral_1h_input_tokens")
            .and_then(Value::as_u64);
        assert_eq!(
            five, u.cache_creation_5m_tokens,
            "5m cache writes; record {record:?}"
        );
        assert_eq!(
            hour, u.cache_creation_1h_tokens,
            "1h cache writes; record {record:?}"
        );
    }
    if let Some(tier) = sdk_usage["service_tier"].as_str() {
        assert_eq!(
            Some(tier),
            u.service_tier.as_deref(),
            "service tier; record {record:?}"
        );
    }
}

/// A TCP relay between the gateway and a cleartext mock that keeps a copy of
/// every byte sent upstream, so a test can read the request headers exactly as
/// the upstream received them.
pub struct UpstreamTap {
    url: String,
    captured: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl UpstreamTap {
    /// Starts a relay on `127.0.0.1:0` in front of `upstream` (`host:port`).
    pub async fn start(upstream: std::net::SocketAddr) -> UpstreamTap {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the tap");
        let url = format!("http://{}", listener.local_addr().expect("tap address"));
        let captured = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let captured = captured.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(relay(client, upstream, captured.clone()));
                }
            }
        });
        UpstreamTap {
            url,
            captured,
            task,
        }
    }

    /// The base URL to give the gateway as `upstream.url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Takes the request headers captured so far (one map per request, names
    /// lowercased) and forgets them.
    pub fn take_requests(&self) -> Vec<Vec<(String, String)>> {
        let bytes = std::mem::take(&mut *self.captured.lock().unwrap());
        parse_request_heads(&bytes)
    }
}

impl Drop for UpstreamTap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    mut client: TcpStream,
    upstream: std::net::SocketAddr,
    captured: Arc<Mutex<Vec<u8>>>,
) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let upward = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            captured.lock().unwrap().extend_from_slice(&buf[..n]);
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let downward = async {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upward, downward);
}

/// Splits captured HTTP/1.1 request bytes into the header lists of each
/// request. Bodies are skipped by their `content-length`.
fn parse_request_heads(mut bytes: &[u8]) -> Vec<Vec<(String, String)>> {
    let mut requests = Vec::new();
    while let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        let headers: Vec<(String, String)> = head
            .split("\r\n")
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        let body_len = headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        requests.push(headers);
        let next = (end + 4 + body_len).min(bytes.len());
        bytes = &bytes[next..];
    }
    requests
}

/// The value of `name` in a header list.
pub fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}
