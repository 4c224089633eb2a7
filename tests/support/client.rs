//! A plain hyper client for the tests: sends one request and collects the
//! response body chunk by chunk, with the arrival time of each chunk.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A response read to its end (or to its error).
#[derive(Debug)]
pub struct Collected {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// Each body chunk and when it arrived.
    pub chunks: Vec<(Instant, Bytes)>,
    /// The body error that ended the response, if any.
    pub error: Option<String>,
}

impl Collected {
    /// The whole body.
    pub fn body(&self) -> Vec<u8> {
        self.chunks
            .iter()
            .flat_map(|(_, c)| c.iter().copied())
            .collect()
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body()).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// tollgate's request id header.
    pub fn request_id(&self) -> String {
        self.headers
            .get("tollgate-request-id")
            .expect("tollgate-request-id header")
            .to_str()
            .unwrap()
            .to_owned()
    }
}

/// An HTTP/1.1 client.
pub fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// An HTTPS client trusting `ca_pem` (and nothing else).
pub fn https_client(
    ca_pem: &str,
    http2: bool,
) -> Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(
        rustls::crypto::ring::default_provider().into(),
    )
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = if http2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build(connector)
}

/// A Messages request body.
pub fn messages_body(stream: bool, max_tokens: u64) -> String {
    serde_json::json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": "Hello, tollgate"}],
    })
    .to_string()
}

/// Builds a request with an API key and the given extra headers.
pub fn request(
    method: Method,
    url: &str,
    body: impl Into<Bytes>,
    headers: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(url)
        .header("x-api-key", "sk-ant-test-key")
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(Full::new(body.into())).unwrap()
}

/// Sends a request and reads the whole response (at most 30 s).
pub async fn send<C>(client: &Client<C, Full<Bytes>>, req: Request<Full<Bytes>>) -> Collected
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    tokio::time::timeout(Duration::from_secs(30), async {
        let response = client.request(req).await.expect("response headers");
        let (parts, mut body) = response.into_parts();
        let mut chunks = Vec::new();
        let mut error = None;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        chunks.push((Instant::now(), data));
                    }
                }
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        Collected {
            status: parts.status,
            headers: parts.headers,
            chunks,
            error,
        }
    })
    .await
    .expect("response within 30 s")
}

/// Splits an SSE body into events (text between blank lines).
pub fn sse_events(text: &str) -> Vec<String> {
    text.replace("\r\n", "\n")
        .split("\n\n")
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect()
}
