//! Registration of passthrough keys: the first time a client's own Anthropic
//! key is used successfully, its row is added to `api_keys` (kind
//! `passthrough`, id and name = its fingerprint, `secret_hash` = the SHA-256 of
//! the key), so that an operator can name it, give it a team, limits and a
//! budget with `tollgate keys update pt_…`.
//!
//! The request path never waits for this: [`PassthroughRegistrar::register`]
//! checks an in-memory set of fingerprints known to be registered and, for a
//! new one, queues it on a bounded channel for the `passthrough-registrar`
//! task, which inserts it with `ON CONFLICT DO NOTHING` (idempotent across
//! replicas and restarts). If the queue is full the registration is skipped
//! and happens on a later request; if the insert fails (store down) the
//! fingerprint is forgotten so that a later request tries again.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus::{IntCounterVec, Opts, Registry};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{KeyCache, KeyStore};
use crate::task::NamedTask;

/// Registrations waiting for the task.
const QUEUE_CAPACITY: usize = 1024;
/// Fingerprints remembered; past this the set starts over (re-registering is
/// harmless, only a wasted insert).
const MAX_KNOWN: usize = 100_000;
/// Longest the task keeps inserting what is queued at shutdown.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// A fingerprint to register.
struct Registration {
    fingerprint: String,
    secret_hash: String,
}

/// The request path's side of registration. Cheap to call on every request.
pub struct PassthroughRegistrar {
    tx: mpsc::Sender<Registration>,
    known: Arc<Mutex<HashSet<String>>>,
    results: IntCounterVec,
}

/// Owns the `passthrough-registrar` task: shut it down after the last request,
/// once it has inserted what is queued (for at most 5 s).
pub type PassthroughHandle = NamedTask;

impl PassthroughRegistrar {
    /// Starts the task that inserts queued registrations into `store`, and
    /// registers `tollgate_passthrough_registrations_total{result}`.
    pub fn start(
        store: KeyStore,
        cache: Arc<KeyCache>,
        registry: &Registry,
    ) -> Result<(PassthroughRegistrar, PassthroughHandle), prometheus::Error> {
        let results = IntCounterVec::new(
            Opts::new(
                "tollgate_passthrough_registrations_total",
                "Registrations of passthrough keys, by result (new, existing, error, skipped: queue full).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(results.clone()))?;
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let known = Arc::new(Mutex::new(HashSet::new()));
        let task = NamedTask::spawn("passthrough-registrar", {
            let (known, results) = (known.clone(), results.clone());
            move |cancel| run(store, cache, rx, known, results, cancel)
        });
        Ok((PassthroughRegistrar { tx, known, results }, task))
    }

    /// Queues the registration of a fingerprint unless it is known. Never
    /// blocks.
    pub fn register(&self, fingerprint: &str, secret_hash: &str) {
        {
            let mut known = lock(&self.known);
            if known.contains(fingerprint) {
                return;
            }
            if known.len() >= MAX_KNOWN {
                known.clear();
            }
            known.insert(fingerprint.to_owned());
        }
        let queued = self.tx.try_send(Registration {
            fingerprint: fingerprint.to_owned(),
            secret_hash: secret_hash.to_owned(),
        });
        if queued.is_err() {
            lock(&self.known).remove(fingerprint);
            self.results.with_label_values(&["skipped"]).inc();
        }
    }

    /// Remembers a fingerprint found in the store, so it is never queued.
    pub fn mark_registered(&self, fingerprint: &str) {
        let mut known = lock(&self.known);
        if !known.contains(fingerprint) {
            if known.len() >= MAX_KNOWN {
                known.clear();
            }
            known.insert(fingerprint.to_owned());
        }
    }
}

/// The `passthrough-registrar` task: inserts queued fingerprints until
/// cancelled, then what is still queued (bounded by [`SHUTDOWN_TIMEOUT`]).
async fn run(
    store: KeyStore,
    cache: Arc<KeyCache>,
    mut rx: mpsc::Receiver<Registration>,
    known: Arc<Mutex<HashSet<String>>>,
    results: IntCounterVec,
    cancel: CancellationToken,
) {
    let insert = |r: Registration| {
        let (store, cache, known, results) = (&store, &cache, &known, &results);
        async move {
            match store
                .register_passthrough(&r.fingerprint, &r.secret_hash, chrono::Utc::now())
                .await
            {
                Ok(true) => {
                    results.with_label_values(&["new"]).inc();
                    // The cache may hold "not found" for this key: drop it so
                    // that limits set on the new row apply without waiting.
                    cache.forget_hash(&r.secret_hash);
                    tracing::info!(key_id = %r.fingerprint, "registered a passthrough key");
                }
                Ok(false) => {
                    results.with_label_values(&["existing"]).inc();
                }
                Err(error) => {
                    results.with_label_values(&["error"]).inc();
                    lock(known).remove(&r.fingerprint);
                    tracing::warn!(key_id = %r.fingerprint, %error,
                        "cannot register a passthrough key; a later request will try again");
                }
            }
        }
    };
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            next = rx.recv() => match next {
                Some(r) => insert(r).await,
                None => return,
            },
        }
    }
    rx.close();
    let drain = async {
        while let Some(r) = rx.recv().await {
            insert(r).await;
        }
    };
    if tokio::time::timeout(SHUTDOWN_TIMEOUT, drain).await.is_err() {
        tracing::warn!(
            "passthrough keys still queued at shutdown were not registered; they will be on their next use"
        );
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
