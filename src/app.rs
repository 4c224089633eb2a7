//! Builds the gateway from a [`Config`] and runs it until shutdown.
//!
//! [`App::start`] binds both listeners (port 0 works, for tests) and starts the
//! named tasks; [`RunningApp::shutdown`] stops them in order. [`serve`] is what
//! `tollgate serve` runs: start, wait for SIGTERM/SIGINT, shut down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use prometheus::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{Admin, HealthCheck};
use crate::budget::{Budgets, RedisBudgetHandle, SystemClock};
use crate::config::AuthMode;
use crate::config::Config;
use crate::keys::admin_api::KeyAdminApi;
use crate::keys::passthrough::PassthroughHandle;
use crate::keys::{KeyStore, Keys};
use crate::ledger::LedgerHandle;
use crate::limits::{KeyLimits, Limiter};
use crate::meter::body::{Recorder, RecorderSettings};
use crate::metrics::Metrics;
use crate::proxy::admission::Admission;
use crate::proxy::{Proxy, ProxyParts};
use crate::record::SharedSink;
use crate::server::{self, Listener};
use crate::upstream::{RetryPolicy, Upstream};

/// Longest wait at shutdown for the store to take the last records; whatever
/// it has not taken stays in the journal and is replayed at the next start.
const LEDGER_FLUSH_WAIT: Duration = Duration::from_secs(10);

/// Longest wait at start for the journal's replay before budgets are rebuilt
/// from the ledger.
const BUDGET_SEED_WAIT: Duration = Duration::from_secs(5);

/// Optional parts a test (or embedder) can supply instead of the defaults.
#[derive(Default)]
pub struct AppOptions {
    /// Register metrics here instead of on a fresh registry.
    pub registry: Option<Registry>,
    /// Send records here instead of the configured sink.
    pub sink: Option<SharedSink>,
}

/// Entry point of the library: see [`App::start`].
pub struct App;

/// A started gateway.
pub struct RunningApp {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    registry: Registry,
    shutdown: CancellationToken,
    admin: Arc<Admin>,
    proxy_task: JoinHandle<()>,
    admin_task: JoinHandle<()>,
    admin_shutdown: CancellationToken,
    drain_tasks: TaskTracker,
    drain_timeout: Duration,
    ledger: Option<LedgerHandle>,
    passthrough: PassthroughHandle,
    budget_sync: RedisBudgetHandle,
}

impl App {
    /// Builds every component and binds the listeners.
    pub async fn start(config: Config, options: AppOptions) -> anyhow::Result<RunningApp> {
        let registry = match options.registry {
            Some(r) => r,
            None => Registry::new(),
        };
        let metrics = Metrics::new(&registry).context("registering metrics")?;
        let (sink, ledger): (SharedSink, Option<LedgerHandle>) = match options.sink {
            Some(sink) => (sink, None),
            None => {
                let (sink, handle) = crate::ledger::start(&config.raw.ledger, &registry).await?;
                (sink, Some(handle))
            }
        };
        // Once the journal's replay has reached the store, budgets can be
        // rebuilt from the ledger's costs.
        if let Some(ledger) = &ledger
            && !ledger.flushed(BUDGET_SEED_WAIT).await
        {
            tracing::warn!("the ledger is not caught up; budgets start from what it holds");
        }
        let key_store = KeyStore::open(&config.raw.ledger)?;
        let (keys, passthrough) = Keys::start(key_store.clone(), &config.raw.auth, &registry)
            .context("registering key metrics")?;
        let budget_store = crate::ledger::Store::open_lazy(config.raw.ledger.url.expose(), true)
            .with_context(|| format!("cannot use ledger.url {}", config.raw.ledger.url))?;
        if ledger.is_none() && config.raw.ledger.migrate {
            // No ledger writer migrated the store (a sink was supplied): the
            // key tables must exist all the same.
            budget_store
                .migrate()
                .await
                .context("migrating the ledger")?;
        }
        let (budgets, budget_sync) =
            Budgets::start(&config, budget_store, &registry, Arc::new(SystemClock))
                .await
                .context("starting budgets")?;

        let limits = &config.raw.limits;
        let limiter =
            Arc::new(Limiter::new(limits, &registry).context("building the rate limiter")?);
        let admission = Admission::new(
            limiter.clone(),
            budgets.clone(),
            KeyLimits::global(limits).is_some(),
            limits.max_wait,
        );
        let prices = crate::prices::load_configured(&config.raw.prices, &registry)?;
        let upstream = Upstream::new(&config).context("building the upstream client")?;
        let drain_tasks = TaskTracker::new();
        let meter = &config.raw.meter;
        let recorder = Arc::new(Recorder::new(
            sink,
            metrics,
            RecorderSettings {
                prices,
                limiter,
                budgets,
                policy: meter.on_client_disconnect,
                idle_timeout: config.raw.upstream.idle_timeout,
                drain_timeout: meter.drain_timeout,
                max_drains: meter.max_drains,
            },
            drain_tasks.clone(),
        ));
        let key_cache = keys.cache();
        let proxy = Arc::new(Proxy::new(ProxyParts {
            upstream,
            retry: RetryPolicy::new(
                config.raw.upstream.max_retries,
                config.raw.upstream.retry_budget,
            ),
            keys,
            upstream_key: match config.raw.auth.mode {
                AuthMode::Virtual => config.raw.upstream.api_key.clone(),
                AuthMode::Passthrough => None,
            },
            admission,
            default_limits: KeyLimits::defaults(limits),
            recorder: recorder.clone(),
            max_body_bytes: config.raw.server.max_body_bytes,
        }));

        let tls = match (&config.raw.server.tls_cert, &config.raw.server.tls_key) {
            (Some(cert), Some(key)) => Some(
                server::tls_acceptor(cert, key)
                    .context("loading the listener's TLS certificate")?,
            ),
            _ => None,
        };
        let proxy_listener = Listener::bind(config.listen, tls)
            .await
            .with_context(|| format!("binding server.listen {}", config.listen))?;
        let admin_listener = Listener::bind(config.admin_listen, None)
            .await
            .with_context(|| format!("binding admin.listen {}", config.admin_listen))?;
        let proxy_addr = proxy_listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;

        let mut checks: Vec<Arc<dyn HealthCheck>> = Vec::new();
        if let Some(ledger) = &ledger {
            checks.push(Arc::new(ledger.status()));
        }
        // The key API under /admin/v1/, sharing this replica's key cache so
        // its own changes apply at once.
        let key_api =
            KeyAdminApi::new(key_store, config.raw.admin.token.as_ref()).with_cache(key_cache);
        let admin = Arc::new(Admin::new(registry.clone(), checks).with_key_api(key_api));
        let shutdown = CancellationToken::new();
        let admin_shutdown = CancellationToken::new();
        let grace = config.raw.server.shutdown_grace;

        let proxy_task = tokio::spawn({
            let shutdown = shutdown.clone();
            let recorder = recorder.clone();
            let handler = move |req| proxy.clone().handle(req);
            server::serve(
                "proxy",
                proxy_listener,
                handler,
                shutdown,
                grace,
                move || recorder.start_interrupting(),
            )
        });
        let admin_task = tokio::spawn({
            let admin = admin.clone();
            let handler = move |req| admin.clone().handle(req);
            server::serve(
                "admin",
                admin_listener,
                handler,
                admin_shutdown.clone(),
                Duration::from_secs(1),
                || {},
            )
        });
        tracing::info!(%proxy_addr, %admin_addr, upstream = %config.upstream_url, auth = ?config.raw.auth.mode, "tollgate listening");
        Ok(RunningApp {
            proxy_addr,
            admin_addr,
            registry,
            shutdown,
            admin,
            proxy_task,
            admin_task,
            admin_shutdown,
            drain_tasks,
            drain_timeout: meter.drain_timeout,
            ledger,
            passthrough,
            budget_sync,
        })
    }
}

impl RunningApp {
    /// The proxy listener's address.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The metrics registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// A token that starts shutdown when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until the shutdown token is cancelled or a listener task dies, then
    /// shuts down in order:
    /// 1. `/readyz` turns 503 and the proxy listener stops accepting;
    /// 2. in-flight streams finish within `server.shutdown_grace` (past it they
    ///    are cut and recorded as `interrupted`);
    /// 3. streams being drained after a client disconnect finish (bounded by
    ///    `meter.drain_timeout`);
    /// 4. the usage sink has received every record; the admin listener stops last.
    pub async fn run_until_shutdown(mut self) -> anyhow::Result<()> {
        let mut failure = None;
        let mut proxy_done = false;
        let mut admin_done = false;
        tokio::select! {
            () = self.shutdown.cancelled() => {}
            // A listener task ends by itself only after shutdown began (it
            // may win this race) or when it failed.
            result = &mut self.proxy_task => {
                proxy_done = true;
                if !self.shutdown.is_cancelled() || result.is_err() {
                    failure = Some(format!("proxy listener task ended: {result:?}"));
                }
            }
            result = &mut self.admin_task => {
                admin_done = true;
                failure = Some(format!("admin listener task ended: {result:?}"));
            }
        }
        self.admin.mark_shutting_down();
        self.shutdown.cancel();
        if !proxy_done && let Err(e) = (&mut self.proxy_task).await {
            failure.get_or_insert(format!("proxy listener task failed: {e}"));
        }
        self.drain_tasks.close();
        if tokio::time::timeout(self.drain_timeout, self.drain_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("drains did not finish in time");
        }
        self.passthrough.shutdown().await;
        self.budget_sync.shutdown().await;
        if let Some(ledger) = self.ledger.take() {
            ledger.shutdown(LEDGER_FLUSH_WAIT).await;
        }
        self.admin_shutdown.cancel();
        if !admin_done {
            let _ = (&mut self.admin_task).await;
        }
        match failure {
            Some(f) => Err(anyhow::anyhow!(f)),
            None => Ok(()),
        }
    }

    /// Starts shutdown and waits for it to complete.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.run_until_shutdown().await
    }
}

/// `tollgate serve`: runs the gateway until SIGTERM or SIGINT.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Listen for signals before binding: a SIGTERM that arrives as soon as the
    // listener is up must start a graceful shutdown, not kill the process.
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let app = App::start(config, AppOptions::default()).await?;
    let token = app.shutdown_token();
    let signals = tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutdown signal received");
        token.cancel();
    });
    let result = app.run_until_shutdown().await;
    signals.abort();
    tracing::info!("tollgate stopped");
    result
}
