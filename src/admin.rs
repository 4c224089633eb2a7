//! The admin listener (loopback by default): `/metrics`, `/livez`, `/readyz`,
//! and the key API under `/admin/v1/` ([`crate::keys::admin_api`]).
//!
//! `/livez` answers 200 while the process serves requests. `/readyz` answers 200
//! when the gateway can take traffic: not shutting down and the usage sink
//! accepting records. Its JSON body also reports each component's state (the
//! ledger may be unreachable while the gateway stays ready: the journal holds the
//! records).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus::Registry;

use crate::error::error_body;
use crate::keys::admin_api::KeyAdminApi;

/// A component that reports its state on `/readyz`.
pub trait HealthCheck: Send + Sync + 'static {
    /// The component's name in the `/readyz` body.
    fn name(&self) -> &'static str;
    /// Whether the gateway can take traffic as far as this component goes, and
    /// details for operators.
    fn check(&self) -> (bool, serde_json::Value);
}

/// State served by the admin listener.
pub struct Admin {
    registry: Registry,
    checks: Vec<Arc<dyn HealthCheck>>,
    shutting_down: AtomicBool,
    keys: Option<KeyAdminApi>,
}

impl Admin {
    /// Creates the admin endpoints over `registry`.
    pub fn new(registry: Registry, checks: Vec<Arc<dyn HealthCheck>>) -> Admin {
        Admin {
            registry,
            checks,
            shutting_down: AtomicBool::new(false),
            keys: None,
        }
    }

    /// Serves the key API under `/admin/v1/` (without it, those paths are 404).
    pub fn with_key_api(mut self, api: KeyAdminApi) -> Admin {
        self.keys = Some(api);
        self
    }

    /// Makes `/readyz` fail so load balancers stop sending traffic.
    pub fn mark_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Handles one admin request.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Full<Bytes>> {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/metrics") => {
                let text = crate::metrics::render(&self.registry);
                respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    Bytes::from(text),
                )
            }
            (&Method::GET, "/livez") => {
                respond(StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n"))
            }
            (&Method::GET, "/readyz") => self.readyz(),
            (_, path) if path.starts_with("/admin/v1/") => match &self.keys {
                Some(keys) => keys.handle(request).await,
                None => respond(
                    StatusCode::NOT_FOUND,
                    "application/json",
                    error_body(
                        "not_found_error",
                        "the key API is not served by this process",
                        "",
                    ),
                ),
            },
            (method, path) => respond(
                StatusCode::NOT_FOUND,
                "application/json",
                error_body(
                    "not_found_error",
                    &format!("{method} {path} is not an admin route"),
                    "",
                ),
            ),
        }
    }

    fn readyz(&self) -> Response<Full<Bytes>> {
        let mut ready = !self.shutting_down.load(Ordering::SeqCst);
        let mut components = serde_json::Map::new();
        for check in &self.checks {
            let (ok, details) = check.check();
            ready &= ok;
            components.insert(check.name().to_owned(), details);
        }
        let body = serde_json::json!({
            "ready": ready,
            "shutting_down": self.shutting_down.load(Ordering::SeqCst),
            "components": components,
        });
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        respond(status, "application/json", Bytes::from(body.to_string()))
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
