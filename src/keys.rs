//! Keys: who is calling, with which limits and budget.
//!
//! Every request is made with a key, a row of `api_keys`:
//! - in `auth.mode = "virtual"`, a tollgate key (`tg-…`, see [`secret`]) that
//!   tollgate issued; the client's credential never goes upstream;
//! - in `auth.mode = "passthrough"`, the client's own Anthropic key, known by its
//!   fingerprint (`pt_…`). Its row is created on first successful use
//!   ([`passthrough`]) so that an operator can later give it a name, a team,
//!   limits and a budget.
//!
//! Both are stored only as the SHA-256 of the secret. The request path asks
//! [`Keys::authenticate`], which goes through the [`cache`] (a short TTL, so a
//! revoke reaches every replica within `auth.key_cache_ttl`), and never touches
//! the store on a cache hit. Key management ([`manage`]) is shared by the
//! `tollgate keys` command ([`cli`]) and the admin listener's `/admin/v1/keys`
//! ([`admin_api`]); [`store`] holds the SQL of both backends.

pub mod admin_api;
pub mod cache;
pub mod cli;
pub mod manage;
pub mod passthrough;
pub mod secret;
pub mod store;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use prometheus::{IntCounterVec, Opts, Registry};

use crate::budget::Budget;
use crate::config::{AuthConfig, AuthMode};
use crate::limits::KeyLimits;

pub use cache::KeyCache;
pub use passthrough::{PassthroughHandle, PassthroughRegistrar};
pub use store::KeyStore;

/// How a key came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// Issued by tollgate (`tg-…`), presented in `auth.mode = "virtual"`.
    Virtual,
    /// A client's own Anthropic key, registered by fingerprint.
    Passthrough,
}

impl KeyKind {
    /// The stored name (`api_keys.kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Virtual => "virtual",
            KeyKind::Passthrough => "passthrough",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<KeyKind> {
        match s {
            "virtual" => Some(KeyKind::Virtual),
            "passthrough" => Some(KeyKind::Passthrough),
            _ => None,
        }
    }
}

/// A key's own rate limits. `None` in a dimension means "the default of
/// `[limits]`", not "unlimited".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLimitsOverride {
    pub rpm: Option<u32>,
    pub input_tpm: Option<u64>,
    pub output_tpm: Option<u64>,
    pub max_concurrent: Option<u32>,
}

impl KeyLimitsOverride {
    /// The limits that apply to the key: its own where set, else `defaults`.
    pub fn over(&self, defaults: KeyLimits) -> KeyLimits {
        KeyLimits {
            rpm: self.rpm.or(defaults.rpm),
            input_tpm: self.input_tpm.or(defaults.input_tpm),
            output_tpm: self.output_tpm.or(defaults.output_tpm),
            max_concurrent: self.max_concurrent.or(defaults.max_concurrent),
        }
    }
}

/// Whether a key may be used now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    Active,
    Revoked,
    Expired,
}

impl KeyStatus {
    /// The name shown in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Revoked => "revoked",
            KeyStatus::Expired => "expired",
        }
    }
}

/// One row of `api_keys`, without its secret hash.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    /// `key_…` for virtual keys, the fingerprint `pt_…` for passthrough keys.
    /// This is the `key_id` of the key's usage rows.
    pub id: String,
    pub name: String,
    pub team: Option<String>,
    pub kind: KeyKind,
    /// `tg-` and 8 characters of a virtual key; the fingerprint of a passthrough key.
    pub key_prefix: String,
    pub limits: KeyLimitsOverride,
    pub budget: Option<Budget>,
    /// Limits and budget are evaluated, logged and counted, but not enforced.
    pub shadow: bool,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl KeyRecord {
    /// Whether the key may be used at `now`. Revocation wins over expiry.
    pub fn status(&self, now: DateTime<Utc>) -> KeyStatus {
        if self.revoked_at.is_some_and(|t| t <= now) {
            KeyStatus::Revoked
        } else if self.expires_at.is_some_and(|t| t <= now) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }

    /// The rate limits of this key over the `[limits]` defaults.
    pub fn limits(&self, defaults: KeyLimits) -> KeyLimits {
        self.limits.over(defaults)
    }

    /// The record of a passthrough key that is not (yet) in the store: named by
    /// its fingerprint, with the default limits and no budget.
    pub fn unregistered_passthrough(fingerprint: &str, now: DateTime<Utc>) -> KeyRecord {
        KeyRecord {
            id: fingerprint.to_owned(),
            name: fingerprint.to_owned(),
            team: None,
            kind: KeyKind::Passthrough,
            key_prefix: fingerprint.to_owned(),
            limits: KeyLimitsOverride::default(),
            budget: None,
            shadow: false,
            created_at: now,
            expires_at: None,
            revoked_at: None,
        }
    }
}

/// A failure of the key store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    /// The store could not be reached (or did not answer in time). The message
    /// has any password removed.
    #[error("the key store is unavailable: {0}")]
    Unavailable(String),
    /// The store answered with an error (e.g. the ledger was never migrated).
    #[error("the key store failed: {0}")]
    Store(String),
    /// A stored row holds a value tollgate cannot read.
    #[error("key {id} has an invalid stored value: {what}")]
    Corrupt { id: String, what: String },
}

/// Why a request's credential was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// Unknown, revoked, expired, or the wrong kind of key for this mode:
    /// answer 401 `authentication_error` with this message.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The key could not be looked up (store down, nothing cached): answer 503.
    #[error(transparent)]
    Unavailable(#[from] KeyError),
}

/// Who is calling: the key, and the hash of the secret presented (for
/// [`Keys::register_passthrough`]).
#[derive(Debug, Clone)]
pub struct Identity {
    pub key: Arc<KeyRecord>,
    /// Hex SHA-256 of the presented secret. Not secret, but not logged either.
    pub secret_hash: String,
}

/// The request path's view of keys: authentication through the cache, and the
/// registration of passthrough keys.
pub struct Keys {
    mode: AuthMode,
    cache: Arc<KeyCache>,
    registrar: Option<PassthroughRegistrar>,
    failures: IntCounterVec,
}

impl Keys {
    /// Builds the cache over `store` and, in passthrough mode, starts the
    /// registration task, owned by the returned handle (shut it down after the
    /// last request). Registers the key metrics on `registry`.
    pub fn start(
        store: KeyStore,
        config: &AuthConfig,
        registry: &Registry,
    ) -> Result<(Keys, PassthroughHandle), prometheus::Error> {
        let cache = Arc::new(KeyCache::new(
            store.clone(),
            config.key_cache_ttl,
            registry,
        )?);
        let failures = IntCounterVec::new(
            Opts::new(
                "tollgate_auth_failures_total",
                "Requests refused with 401, by reason (missing, malformed, unknown, revoked, expired, wrong_mode).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(failures.clone()))?;
        let (registrar, handle) = match config.mode {
            AuthMode::Passthrough => {
                let (registrar, handle) =
                    PassthroughRegistrar::start(store, cache.clone(), registry)?;
                (Some(registrar), handle)
            }
            AuthMode::Virtual => (None, PassthroughHandle::idle("passthrough-registrar")),
        };
        Ok((
            Keys {
                mode: config.mode,
                cache,
                registrar,
                failures,
            },
            handle,
        ))
    }

    /// The cache, to share with the admin API (which invalidates entries it
    /// changes, so this replica sees its own changes at once).
    pub fn cache(&self) -> Arc<KeyCache> {
        self.cache.clone()
    }

    /// Counts a request that presented no credential at all (the proxy answers
    /// it before calling [`Keys::authenticate`]).
    pub fn count_missing(&self) {
        self.failures.with_label_values(&["missing"]).inc();
    }

    /// Identifies the key of a presented secret.
    ///
    /// - Virtual mode: the secret must be an active virtual key; anything else
    ///   is `Unauthenticated`. If the store is down and the key is not cached,
    ///   `Unavailable`.
    /// - Passthrough mode: a registered passthrough key must be active (a
    ///   revoked or expired one is `Unauthenticated`); an unregistered one gets
    ///   [`KeyRecord::unregistered_passthrough`] (default limits, no budget);
    ///   if the store is down, so does a key not in the cache — the gateway
    ///   keeps serving as it did before keys existed. A tollgate key is refused:
    ///   it would only be rejected upstream.
    pub async fn authenticate(&self, secret: &str) -> Result<Identity, AuthError> {
        let now = Utc::now();
        let secret_hash = secret::hash_secret(secret);
        let key = match self.mode {
            AuthMode::Virtual => {
                if !secret::looks_like_key(secret) {
                    return Err(self.fail("malformed", "invalid API key: expected a tollgate key"));
                }
                match self.cache.lookup_hash(&secret_hash).await? {
                    Some(key) if key.kind == KeyKind::Virtual => key,
                    _ => return Err(self.fail("unknown", "invalid API key")),
                }
            }
            AuthMode::Passthrough => {
                if secret::looks_like_key(secret) {
                    return Err(self.fail(
                        "wrong_mode",
                        "this is a tollgate key, but this gateway forwards the client's own Anthropic key (auth.mode = passthrough)",
                    ));
                }
                let fingerprint = secret::fingerprint_of_hash(&secret_hash);
                match self.cache.lookup_hash(&secret_hash).await {
                    Ok(Some(key)) if key.kind == KeyKind::Passthrough => {
                        if let Some(registrar) = &self.registrar {
                            registrar.mark_registered(&key.id);
                        }
                        key
                    }
                    Ok(Some(_)) => return Err(self.fail("unknown", "invalid API key")),
                    Ok(None) => Arc::new(KeyRecord::unregistered_passthrough(&fingerprint, now)),
                    Err(error) => {
                        tracing::debug!(%error, key_id = %fingerprint,
                            "key store unavailable: passthrough key served with default limits");
                        Arc::new(KeyRecord::unregistered_passthrough(&fingerprint, now))
                    }
                }
            }
        };
        match key.status(now) {
            KeyStatus::Active => Ok(Identity { key, secret_hash }),
            KeyStatus::Revoked => Err(self.fail("revoked", "this API key has been revoked")),
            KeyStatus::Expired => Err(self.fail("expired", "this API key has expired")),
        }
    }

    /// Makes sure a passthrough key has its `api_keys` row. Call it once the
    /// upstream has accepted the key (a status other than 401/403), so that
    /// invalid keys are never registered. Never blocks and never touches the
    /// store on the request path: known fingerprints are remembered in memory,
    /// new ones are queued for a background insert (`ON CONFLICT DO NOTHING`).
    /// Does nothing in virtual mode or for a virtual key.
    pub fn register_passthrough(&self, identity: &Identity) {
        if identity.key.kind != KeyKind::Passthrough {
            return;
        }
        if let Some(registrar) = &self.registrar {
            registrar.register(&identity.key.id, &identity.secret_hash);
        }
    }

    fn fail(&self, reason: &'static str, message: &'static str) -> AuthError {
        self.failures.with_label_values(&[reason]).inc();
        AuthError::Unauthenticated(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> KeyRecord {
        KeyRecord::unregistered_passthrough("pt_0123456789abcdef", Utc::now())
    }

    #[test]
    fn revocation_wins_over_expiry() {
        let now = Utc::now();
        let past = now - chrono::Duration::seconds(1);
        let mut k = record();
        assert_eq!(k.status(now), KeyStatus::Active);
        k.expires_at = Some(past);
        assert_eq!(k.status(now), KeyStatus::Expired);
        k.revoked_at = Some(past);
        assert_eq!(k.status(now), KeyStatus::Revoked);
        k.revoked_at = None;
        k.expires_at = Some(now + chrono::Duration::seconds(60));
        assert_eq!(k.status(now), KeyStatus::Active);
    }

    #[test]
    fn own_limits_override_defaults_per_dimension() {
        let defaults = KeyLimits {
            rpm: Some(60),
            input_tpm: Some(1000),
            output_tpm: None,
            max_concurrent: Some(4),
        };
        let own = KeyLimitsOverride {
            rpm: Some(5),
            output_tpm: Some(300),
            ..Default::default()
        };
        let limits = own.over(defaults);
        assert_eq!(limits.rpm, Some(5));
        assert_eq!(limits.input_tpm, Some(1000));
        assert_eq!(limits.output_tpm, Some(300));
        assert_eq!(limits.max_concurrent, Some(4));
    }
}
