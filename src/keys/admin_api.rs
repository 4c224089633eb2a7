//! The key API on the admin listener, under `/admin/v1/keys`:
//!
//! | method and path | does | answers |
//! |---|---|---|
//! | `POST /admin/v1/keys` | creates a virtual key | 201, the key and its `secret` (the only time it is shown) |
//! | `GET /admin/v1/keys` | lists every key | 200, `{"data": [key, …]}` |
//! | `GET /admin/v1/keys/{id}` | shows a key | 200, the key |
//! | `PATCH /admin/v1/keys/{id}` | changes a key (absent: kept, `null`: removed) | 200, the key |
//! | `DELETE /admin/v1/keys/{id}` | revokes a key (sets `revoked_at`) | 200, the key |
//!
//! Bodies and fields are those of [`super::manage`]; a key is shown as a
//! [`KeyView`]. Every request needs `Authorization: Bearer <admin.token>`,
//! compared in constant time (SHA-256 of both, then a constant-time equality
//! of the digests, so neither the token's length nor its content leaks through
//! timing). Without a configured token the API is disabled (403); `/metrics`,
//! `/livez` and `/readyz` stay open. Errors have Anthropic's shape: 400
//! `invalid_request_error` listing every problem, 401 `authentication_error`,
//! 403 `permission_error`, 404 `not_found_error`, 413 `request_too_large`,
//! 503 `api_error` while the ledger store is unreachable.

use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq as _;

use super::manage::{self, CreateError, KeyView};
use super::store::UpdateError;
use super::{KeyCache, KeyError, KeyStore};
use crate::error::{REQUEST_ID_HEADER, error_body};
use crate::secret::Secret;

/// The path every key route starts with.
pub const KEYS_PATH: &str = "/admin/v1/keys";
/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// The key API: the store, the admin token's digest, and optionally the
/// request path's cache (to drop entries this replica changes).
pub struct KeyAdminApi {
    store: KeyStore,
    token_digest: Option<[u8; 32]>,
    cache: Option<Arc<KeyCache>>,
}

impl std::fmt::Debug for KeyAdminApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAdminApi")
            .field("enabled", &self.token_digest.is_some())
            .finish_non_exhaustive()
    }
}

/// An error answer: status, Anthropic error type, message.
struct Failure(StatusCode, &'static str, String);

impl KeyAdminApi {
    /// The API over `store`, enabled if `token` is set and not empty.
    pub fn new(store: KeyStore, token: Option<&Secret<String>>) -> KeyAdminApi {
        let token_digest = token
            .map(|t| t.expose())
            .filter(|t| !t.is_empty())
            .map(|t| Sha256::digest(t.as_bytes()).into());
        KeyAdminApi {
            store,
            token_digest,
            cache: None,
        }
    }

    /// Also invalidates `cache` entries of the keys this API changes.
    pub fn with_cache(mut self, cache: Arc<KeyCache>) -> KeyAdminApi {
        self.cache = Some(cache);
        self
    }

    /// Handles a request whose path starts with `/admin/v1/`.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<Full<Bytes>>
    where
        B: http_body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let request_id = format!("adm_{}", uuid::Uuid::now_v7().simple());
        let (status, body) = match self.route(request).await {
            Ok((status, body)) => (status, Bytes::from(body.to_string())),
            Err(Failure(status, error_type, message)) => {
                (status, error_body(error_type, &message, &request_id))
            }
        };
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            headers.insert(REQUEST_ID_HEADER, v);
        }
        response
    }

    async fn route<B>(
        &self,
        request: Request<B>,
    ) -> Result<(StatusCode, serde_json::Value), Failure>
    where
        B: http_body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.authorize(request.headers())?;
        let (parts, body) = request.into_parts();
        let path = parts.uri.path().trim_end_matches('/');
        let Some(rest) = path.strip_prefix(KEYS_PATH) else {
            return Err(Failure(
                StatusCode::NOT_FOUND,
                "not_found_error",
                format!("{} {path} is not an admin route", parts.method),
            ));
        };
        let now = Utc::now();
        match (rest.strip_prefix('/'), &parts.method) {
            (None, _) if !rest.is_empty() => Err(Failure(
                StatusCode::NOT_FOUND,
                "not_found_error",
                format!("{} {path} is not an admin route", parts.method),
            )),
            (None, &Method::GET) => {
                let keys = self.store.list().await.map_err(store_failure)?;
                let data: Vec<KeyView> = keys.iter().map(|k| KeyView::of(k, now)).collect();
                Ok((StatusCode::OK, serde_json::json!({ "data": data })))
            }
            (None, &Method::POST) => {
                let body = read_json(body).await?;
                let spec = manage::spec_from_json(&body, now).map_err(invalid)?;
                let created =
                    manage::create_key(&self.store, spec, now)
                        .await
                        .map_err(|e| match e {
                            CreateError::Invalid(problems) => invalid(problems),
                            CreateError::Store(e) => store_failure(e),
                        })?;
                tracing::info!(key_id = %created.key.id, name = %created.key.name,
                    team = ?created.key.team, "key created through the admin API");
                let mut view = serde_json::to_value(KeyView::of(&created.key, now))
                    .map_err(|e| internal(&e))?;
                if let Some(map) = view.as_object_mut() {
                    map.insert(
                        "secret".to_owned(),
                        serde_json::Value::String(created.secret.into_exposed()),
                    );
                }
                Ok((StatusCode::CREATED, view))
            }
            (None, _) => Err(not_allowed(&parts.method, path, "GET, POST")),
            (Some(id), method) if !id.is_empty() && !id.contains('/') => {
                let key = match *method {
                    Method::GET => self.store.get(id).await.map_err(store_failure)?,
                    Method::PATCH => {
                        let body = read_json(body).await?;
                        let patch = manage::patch_from_json(&body, now).map_err(invalid)?;
                        if patch.is_empty() {
                            return Err(invalid(vec!["the body changes nothing".to_owned()]));
                        }
                        let key = self.store.update(id, &patch).await.map_err(|e| match e {
                            UpdateError::Invalid(problems) => invalid(problems),
                            UpdateError::Key(e) => store_failure(e),
                        })?;
                        if key.is_some() {
                            self.invalidate(id);
                            tracing::info!(key_id = id, "key updated through the admin API");
                        }
                        key
                    }
                    Method::DELETE => {
                        let key = self.store.revoke(id, now).await.map_err(store_failure)?;
                        if key.is_some() {
                            self.invalidate(id);
                            tracing::info!(key_id = id, "key revoked through the admin API");
                        }
                        key
                    }
                    _ => return Err(not_allowed(method, path, "GET, PATCH, DELETE")),
                };
                let key = key.ok_or_else(|| {
                    Failure(
                        StatusCode::NOT_FOUND,
                        "not_found_error",
                        format!("no key with id {id:?}"),
                    )
                })?;
                let view =
                    serde_json::to_value(KeyView::of(&key, now)).map_err(|e| internal(&e))?;
                Ok((StatusCode::OK, view))
            }
            (Some(_), method) => Err(Failure(
                StatusCode::NOT_FOUND,
                "not_found_error",
                format!("{method} {path} is not an admin route"),
            )),
        }
    }

    /// Checks the bearer token in constant time.
    fn authorize(&self, headers: &http::HeaderMap) -> Result<(), Failure> {
        let Some(expected) = &self.token_digest else {
            return Err(Failure(
                StatusCode::FORBIDDEN,
                "permission_error",
                "the key API is disabled: set admin.token (TOLLGATE__ADMIN__TOKEN) to enable it"
                    .to_owned(),
            ));
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let Some(presented) = presented else {
            return Err(Failure(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing admin token: send Authorization: Bearer <admin.token>".to_owned(),
            ));
        };
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        if bool::from(digest.ct_eq(expected)) {
            Ok(())
        } else {
            Err(Failure(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid admin token".to_owned(),
            ))
        }
    }

    fn invalidate(&self, id: &str) {
        if let Some(cache) = &self.cache {
            cache.invalidate(id);
        }
    }
}

/// Reads a JSON body of at most [`MAX_BODY_BYTES`].
async fn read_json<B>(body: B) -> Result<serde_json::Value, Failure>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let bytes = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Failure(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!("the body exceeds {MAX_BODY_BYTES} bytes"),
            ));
        }
        Err(e) => {
            return Err(Failure(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("could not read the body: {e}"),
            ));
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        Failure(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("the body is not valid JSON: {e}"),
        )
    })
}

fn invalid(problems: Vec<String>) -> Failure {
    Failure(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        problems.join("; "),
    )
}

fn not_allowed(method: &Method, path: &str, allowed: &str) -> Failure {
    Failure(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{method} is not allowed on {path} (allowed: {allowed})"),
    )
}

fn store_failure(e: KeyError) -> Failure {
    tracing::error!(error = %e, "key API: the ledger store failed");
    match e {
        KeyError::Unavailable(_) => Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "the ledger store is unavailable; try again".to_owned(),
        ),
        KeyError::Store(_) | KeyError::Corrupt { .. } => Failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            format!("the ledger store failed: {e}"),
        ),
    }
}

fn internal(e: &dyn std::fmt::Display) -> Failure {
    Failure(
        StatusCode::INTERNAL_SERVER_ERROR,
        "api_error",
        format!("internal error: {e}"),
    )
}
