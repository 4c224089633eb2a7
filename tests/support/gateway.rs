//! Starting the real gateway in-process on port 0, with records captured.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use tollgate::app::{App, AppOptions, RunningApp};

use super::client::{Collected, http_client, request, send};
use tollgate::config::Config;
use tollgate::record::{UsageRecord, UsageSink};

/// A sink that keeps every record, for assertions.
#[derive(Default)]
pub struct CaptureSink {
    records: Mutex<Vec<UsageRecord>>,
}

impl UsageSink for CaptureSink {
    fn record(&self, record: UsageRecord) -> tollgate::record::RecordAck {
        self.records.lock().unwrap().push(record);
        None
    }
}

impl CaptureSink {
    /// Every record so far.
    pub fn all(&self) -> Vec<UsageRecord> {
        self.records.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) until `n` records arrived, then returns them.
    pub async fn wait_for(&self, n: usize) -> Vec<UsageRecord> {
        for _ in 0..1000 {
            let all = self.all();
            if all.len() >= n {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("expected {n} records, got {:?}", self.all());
    }

    /// Waits for the record of a given tollgate request id.
    pub async fn wait_for_request(&self, request_id: &str) -> UsageRecord {
        for _ in 0..1000 {
            if let Some(r) = self.all().into_iter().find(|r| r.request_id == request_id) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no record for {request_id}; have {:?}", self.all());
    }
}

/// A gateway under test.
pub struct TestGateway {
    pub app: RunningApp,
    pub sink: Arc<CaptureSink>,
    /// Holds the key store (and journal) of this gateway.
    pub dir: tempfile::TempDir,
}

impl TestGateway {
    /// `http://127.0.0.1:PORT` of the proxy listener.
    pub fn url(&self) -> String {
        format!("http://{}", self.app.proxy_addr())
    }

    /// `http://127.0.0.1:PORT` of the admin listener.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.app.admin_addr())
    }

    /// POSTs `body` to `/v1/messages` with a test key and `headers`.
    pub async fn post_messages(&self, body: String, headers: &[(&str, &str)]) -> Collected {
        let url = format!("{}/v1/messages", self.url());
        send(&http_client(), request(Method::POST, &url, body, headers)).await
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let url = format!("{}/metrics", self.admin_url());
        send(&http_client(), request(Method::GET, &url, "", &[]))
            .await
            .text()
    }
}

/// Starts a gateway in front of `upstream_url`, trusting `ca_file` if given,
/// with extra `TOLLGATE__…` settings.
pub async fn start_gateway(
    upstream_url: &str,
    ca_file: Option<&Path>,
    extra: &[(&str, &str)],
) -> TestGateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = vec![
        (
            "TOLLGATE__LEDGER__URL".to_owned(),
            format!("sqlite://{}", dir.path().join("ledger.db").display()),
        ),
        (
            "TOLLGATE__LEDGER__JOURNAL_DIR".to_owned(),
            dir.path().join("journal").display().to_string(),
        ),
        (
            "TOLLGATE__SERVER__LISTEN".to_owned(),
            "127.0.0.1:0".to_owned(),
        ),
        (
            "TOLLGATE__ADMIN__LISTEN".to_owned(),
            "127.0.0.1:0".to_owned(),
        ),
        (
            "TOLLGATE__UPSTREAM__URL".to_owned(),
            upstream_url.to_owned(),
        ),
    ];
    if let Some(ca) = ca_file {
        env.push((
            "TOLLGATE__UPSTREAM__CA_FILE".to_owned(),
            ca.display().to_string(),
        ));
    }
    for (k, v) in extra {
        env.push(((*k).to_owned(), (*v).to_owned()));
    }
    let config = Config::load_from(None, env).expect("test config is valid");
    let sink = Arc::new(CaptureSink::default());
    let app = App::start(
        config,
        AppOptions {
            registry: None,
            sink: Some(sink.clone()),
        },
    )
    .await
    .expect("gateway starts");
    TestGateway { app, sink, dir }
}
