//! tollgate: a usage-metering gateway for the Anthropic Messages API.
//!
//! A request flows one way: the [`server`] accepts it (HTTP/1.1 or h2, optional
//! TLS) and hands it to the [`proxy`], which checks the route and body size,
//! identifies the key and forwards the request through the pooled [`upstream`]
//! client. The response comes back unchanged and unbuffered through a
//! [`meter::body::MeteredBody`], which shows each frame to the [`meter`] in place
//! and, at the end of the body (or when the client goes away), finalises exactly
//! one [`record::UsageRecord`] into a [`record::UsageSink`]. [`metrics`] observe
//! every stage and the [`admin`] listener serves them. [`app`] wires the pieces
//! together and owns shutdown.
//!
//! Modules, in the order a request meets them:
//! - [`config`]: defaults, TOML file and environment, validated in two stages.
//! - [`server`]: listeners, TLS, connection tasks, graceful shutdown.
//! - [`proxy`]: routing, request reading, identity, forwarding, response wrapping.
//! - [`keys`]: virtual and passthrough keys, their cache, and key management.
//! - [`budget`]: spend caps per key per UTC day or month (local or Redis).
//! - [`limits`]: rate limits per key and global (local or Redis), reserved and settled.
//! - `redis_link`: the Redis connection, call timeout and circuit breaker both share.
//! - [`upstream`]: the pooled HTTPS client to the Anthropic API, with timeouts.
//! - [`meter`]: the body wrapper, the SSE and JSON usage readers.
//! - [`record`]: the usage record and the sinks that receive it.
//! - [`ledger`]: the durable journal, the batch writer and the Postgres/SQLite stores.
//! - [`prices`]: the price table and the exact cost of a record, in nano-dollars.
//! - [`metrics`] and [`admin`]: Prometheus metrics, `/metrics`, `/livez`, `/readyz`.
//! - [`error`]: the error taxonomy and its Anthropic-shaped responses.
//! - [`secret`]: values that never print.
//! - [`task`]: named, owned background tasks.
//! - [`mock_upstream`]: a fake Anthropic API for tests, demos and benchmarks.
//! - [`app`]: builds everything from a config and runs it until shutdown.

pub mod admin;
pub mod app;
pub mod budget;
pub mod config;
pub mod error;
pub mod keys;
pub mod ledger;
pub mod limits;
pub mod meter;
pub mod metrics;
pub mod mock_upstream;
pub mod prices;
pub mod proxy;
pub mod record;
mod redis_link;
pub mod secret;
pub mod server;
pub mod task;
pub mod telemetry;
pub mod timestamp;
pub mod upstream;
