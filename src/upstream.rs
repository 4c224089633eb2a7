//! The pooled client that carries requests to the Anthropic API.
//!
//! One hyper client over rustls (webpki roots plus an optional `upstream.ca_file`),
//! HTTP/1.1 or h2 by ALPN, with keep-alive pooling. Three timeouts apply:
//! connecting (TCP and TLS), the first byte (until the response headers arrive),
//! and idle gaps between body chunks (enforced by the metered body, which sees
//! every chunk).

use std::io::BufReader;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::Config;
use crate::error::GatewayError;

/// The upstream client and its timeouts.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: http::Uri,
    first_byte_timeout: Duration,
}

/// Why the upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error("cannot read upstream.ca_file {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("upstream.ca_file {0} holds no usable certificate")]
    NoCertificates(String),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

impl Upstream {
    /// Builds the pooled client from the configuration.
    pub fn new(config: &Config) -> Result<Upstream, UpstreamSetupError> {
        let cfg = &config.raw.upstream;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &cfg.ca_file {
            let display = path.display().to_string();
            let file = std::fs::File::open(path).map_err(|source| UpstreamSetupError::CaFile {
                path: display.clone(),
                source,
            })?;
            let mut added = 0;
            for cert in rustls_pemfile::certs(&mut BufReader::new(file)) {
                let cert = cert.map_err(|source| UpstreamSetupError::CaFile {
                    path: display.clone(),
                    source,
                })?;
                roots.add(cert)?;
                added += 1;
            }
            if added == 0 {
                return Err(UpstreamSetupError::NoCertificates(display));
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(
            rustls::crypto::ring::default_provider().into(),
        )
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .build(https);
        Ok(Upstream {
            client,
            base: config.upstream_url.clone(),
            first_byte_timeout: cfg.first_byte_timeout,
        })
    }

    /// The upstream URI for a request path and query.
    pub fn uri_for(&self, path_and_query: &str) -> Result<http::Uri, GatewayError> {
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = Some(
            path_and_query
                .parse()
                .map_err(|_| GatewayError::BadRequest("invalid request path".into()))?,
        );
        http::Uri::from_parts(parts).map_err(|e| GatewayError::Internal(e.to_string()))
    }

    /// The `Host` header value for the upstream.
    pub fn authority(&self) -> Option<&http::uri::Authority> {
        self.base.authority()
    }

    /// Sends one request and waits for the response headers, at most
    /// `upstream.first_byte_timeout`.
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, GatewayError> {
        match tokio::time::timeout(self.first_byte_timeout, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) if e.is_connect() => Err(GatewayError::UpstreamConnect(error_chain(&e))),
            Ok(Err(e)) => Err(GatewayError::UpstreamProtocol(error_chain(&e))),
            Err(_) => Err(GatewayError::UpstreamTimeout(self.first_byte_timeout)),
        }
    }
}

/// An error and its causes on one line (hyper's top-level messages are terse).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
