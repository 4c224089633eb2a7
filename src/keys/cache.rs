//! The key cache: lookups by secret hash (the request path) and by id, each
//! answer — found or not found — trusted for `auth.key_cache_ttl`.
//!
//! - **Revocation reaches every replica within the TTL**: an entry older than
//!   the TTL is read again from the store. The admin API of this replica also
//!   drops the entries it changes at once.
//! - **A flood of bad keys costs one store query per key per TTL**: unknown
//!   keys are cached as "not found" too, and concurrent lookups of the same
//!   key share one query.
//! - **The store going down does not lock everyone out**: if a refresh fails,
//!   the last answer keeps being used (and is trusted for another TTL, so a
//!   dead store is not asked on every request). Only a key never seen before
//!   gets an error, and that error is remembered for up to a second, so that
//!   requests do not each wait for the store's timeout.
//! - **Memory is bounded**: past 100,000 entries per map, expired entries are
//!   dropped, then "not found" entries, then everything. (Expired entries are
//!   otherwise kept: they are the fallback while the store is down.)

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus::{IntCounterVec, Opts, Registry};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::{KeyError, KeyRecord, KeyStore};

/// Entries per map before the cache makes room.
const MAX_ENTRIES: usize = 100_000;
/// Longest a failed lookup is remembered before the store is asked again.
const ERROR_TTL: Duration = Duration::from_secs(1);

type Answer = Result<Option<Arc<KeyRecord>>, KeyError>;

/// Cached answers of the key store.
pub struct KeyCache {
    store: KeyStore,
    ttl: Duration,
    by_hash: Map,
    by_id: Map,
    lookups: IntCounterVec,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl KeyCache {
    /// A cache over `store` whose answers live `ttl`. Registers
    /// `tollgate_key_cache_lookups_total{result}` on `registry`.
    pub fn new(
        store: KeyStore,
        ttl: Duration,
        registry: &Registry,
    ) -> Result<KeyCache, prometheus::Error> {
        let lookups = IntCounterVec::new(
            Opts::new(
                "tollgate_key_cache_lookups_total",
                "Key lookups, by result (hit; miss: read from the store; shared: waited for another lookup's read; stale: the store failed and the last answer was used; error: the store failed, or failed less than a second ago, with no answer to fall back on).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(lookups.clone()))?;
        Ok(KeyCache {
            store,
            ttl,
            by_hash: Map::default(),
            by_id: Map::default(),
            lookups,
        })
    }

    /// The store behind the cache.
    pub fn store(&self) -> &KeyStore {
        &self.store
    }

    /// The key whose secret hashes to `secret_hash` (hex SHA-256), whatever
    /// its status; `None` if there is none.
    pub async fn lookup_hash(&self, secret_hash: &str) -> Answer {
        self.lookup(&self.by_hash, secret_hash, || async {
            Ok(self.store.get_by_hash(secret_hash).await?.map(Arc::new))
        })
        .await
    }

    /// The key whose secret is `secret`.
    pub async fn lookup_secret(&self, secret: &str) -> Answer {
        self.lookup_hash(&super::secret::hash_secret(secret)).await
    }

    /// The key with this id.
    pub async fn lookup_id(&self, id: &str) -> Answer {
        self.lookup(&self.by_id, id, || async {
            Ok(self.store.get(id).await?.map(Arc::new))
        })
        .await
    }

    /// Forgets everything cached about a key, so the next lookup reads the
    /// store (after this replica changed it).
    pub fn invalidate(&self, id: &str) {
        lock(&self.by_id.entries).remove(id);
        lock(&self.by_hash.entries).retain(|_, e| e.key_id() != Some(id));
    }

    /// Forgets a "not found" answer for a secret hash (after its key was
    /// registered).
    pub fn forget_hash(&self, secret_hash: &str) {
        lock(&self.by_hash.entries).remove(secret_hash);
    }

    async fn lookup<F, Fut>(&self, map: &Map, key: &str, fetch: F) -> Answer
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Answer>,
    {
        let now = Instant::now();
        let stale = {
            let entries = lock(&map.entries);
            match entries.get(key) {
                Some(e) if e.is_fresh(now, self.ttl) => {
                    let result = if e.answer.is_ok() { "hit" } else { "error" };
                    self.lookups.with_label_values(&[result]).inc();
                    return e.answer.clone();
                }
                Some(e) => e.answer.clone().ok(),
                None => None,
            }
        };
        // One query per key at a time: later callers wait for the first.
        let cell = lock(&map.inflight)
            .entry(key.to_owned())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let mut queried = false;
        let answer = cell
            .get_or_init(|| {
                queried = true;
                fetch()
            })
            .await
            .clone();
        let result = match answer {
            Ok(record) => {
                self.lookups
                    .with_label_values(&[if queried { "miss" } else { "shared" }])
                    .inc();
                if queried {
                    map.insert(key, Ok(record.clone()), self.ttl);
                }
                Ok(record)
            }
            Err(error) => match stale {
                Some(record) => {
                    self.lookups.with_label_values(&["stale"]).inc();
                    if queried {
                        tracing::warn!(%error, "key store unavailable: using the last known answer for this key");
                        // Trusted for another TTL, so a dead store is not asked
                        // on every request.
                        map.insert(key, Ok(record.clone()), self.ttl);
                    }
                    Ok(record)
                }
                None => {
                    self.lookups.with_label_values(&["error"]).inc();
                    if queried {
                        map.insert(key, Err(error.clone()), self.ttl);
                    }
                    Err(error)
                }
            },
        };
        // Only now, with the answer cached, may a new query for the key start.
        let mut inflight = lock(&map.inflight);
        if inflight.get(key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            inflight.remove(key);
        }
        result
    }
}

/// One cached answer.
struct Entry {
    answer: Answer,
    fetched: Instant,
}

impl Entry {
    /// Whether the entry may be used without asking the store.
    fn is_fresh(&self, now: Instant, ttl: Duration) -> bool {
        let lifetime = match self.answer {
            Ok(_) => ttl,
            Err(_) => ttl.min(ERROR_TTL),
        };
        now.duration_since(self.fetched) < lifetime
    }

    /// The id of the key found, if one was.
    fn key_id(&self) -> Option<&str> {
        match &self.answer {
            Ok(Some(record)) => Some(&record.id),
            _ => None,
        }
    }
}

/// The entries of one kind of lookup, and its queries in flight.
#[derive(Default)]
struct Map {
    entries: Mutex<HashMap<String, Entry>>,
    inflight: Mutex<HashMap<String, Arc<OnceCell<Answer>>>>,
}

impl Map {
    fn insert(&self, key: &str, answer: Answer, ttl: Duration) {
        let now = Instant::now();
        let mut entries = lock(&self.entries);
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(key) {
            make_room(&mut entries, ttl);
        }
        entries.insert(
            key.to_owned(),
            Entry {
                answer,
                fetched: now,
            },
        );
    }
}

/// Drops expired entries, then "not found" entries, then everything, until
/// there is room.
fn make_room(entries: &mut HashMap<String, Entry>, ttl: Duration) {
    let now = Instant::now();
    entries.retain(|_, e| e.is_fresh(now, ttl));
    if entries.len() >= MAX_ENTRIES {
        entries.retain(|_, e| e.key_id().is_some());
    }
    if entries.len() >= MAX_ENTRIES {
        entries.clear();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
