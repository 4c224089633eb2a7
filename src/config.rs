//! Configuration: built-in defaults, then a TOML file, then `TOLLGATE__SECTION__KEY`
//! environment variables. This is the only module that reads config files and the
//! environment.
//!
//! Loading happens in two stages. First each section is deserialized into a raw
//! struct (`deny_unknown_fields`, every key defaulted), then [`RawConfig::validate`]
//! turns the raw values into the typed [`Config`] the rest of the program uses.
//! Both stages collect every problem they find, so an operator sees all mistakes
//! at once; the binary then exits with code 64 before any port is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::secret::{MaskedUrl, Secret};

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_PATH: &str = "config/tollgate.toml";

/// Every problem found while loading the configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

/// The effective configuration, as loaded (secrets wrapped, durations parsed).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub upstream: UpstreamConfig,
    pub auth: AuthConfig,
    pub meter: MeterConfig,
    pub ledger: LedgerConfig,
    pub limits: LimitsConfig,
    pub prices: PricesConfig,
    pub log: LogConfig,
}

/// `[server]`: the proxy listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the proxy listener.
    pub listen: String,
    /// PEM certificate chain; with `tls_key`, the listener speaks TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Request bodies larger than this get 413 `request_too_large`.
    pub max_body_bytes: u64,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            tls_cert: None,
            tls_key: None,
            max_body_bytes: 32 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// `[admin]`: the metrics, health and key-management listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener; loopback by default.
    pub listen: String,
    /// Bearer token for `/admin/v1/`; required when `listen` is not loopback.
    pub token: Option<Secret<String>>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9464".into(),
            token: None,
        }
    }
}

/// `[upstream]`: where requests go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of the Anthropic API (scheme, host, optional port).
    pub url: String,
    /// Extra PEM CA certificates to trust, for private CAs and tests.
    pub ca_file: Option<PathBuf>,
    /// The upstream API key sent in `auth.mode = "virtual"`.
    pub api_key: Option<Secret<String>>,
    /// Retries before any response byte reached the client.
    pub max_retries: u32,
    /// Total time one request may spend waiting between upstream attempts.
    #[serde(with = "humantime_serde")]
    pub retry_budget: Duration,
    /// TCP + TLS connect timeout.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed until the upstream's response headers arrive.
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Longest silence allowed between two chunks of a response body.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Idle pooled connections kept per upstream host.
    pub pool_max_idle_per_host: usize,
    /// How long an idle pooled connection is kept.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: "https://api.anthropic.com".into(),
            ca_file: None,
            api_key: None,
            max_retries: 2,
            retry_budget: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(300),
            pool_max_idle_per_host: 256,
            pool_idle_timeout: Duration::from_secs(90),
        }
    }
}

/// How clients are identified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// The client's own Anthropic key goes upstream unchanged.
    #[default]
    Passthrough,
    /// Clients present tollgate keys; tollgate sends `upstream.api_key`.
    Virtual,
}

/// `[auth]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// How long a key looked up in the store (found or not) is trusted before it
    /// is read again: a revoke or an update reaches every replica within this.
    #[serde(with = "humantime_serde")]
    pub key_cache_ttl: Duration,
    /// Adds per-key metric series labelled with the key id
    /// (`tollgate_budget_spent_usd{key,period}`): one series per key with a budget.
    pub metrics_key_label: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Passthrough,
            key_cache_ttl: Duration::from_secs(5),
            metrics_key_label: false,
        }
    }
}

/// What happens to the upstream stream when the client goes away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DisconnectPolicy {
    /// Close the upstream connection, as a direct client would.
    #[default]
    Cancel,
    /// Keep reading the upstream to its final usage (bounded by `max_drains`).
    Drain,
}

/// `[meter]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeterConfig {
    pub on_client_disconnect: DisconnectPolicy,
    /// Most streams drained at once under the `drain` policy; beyond it, cancel.
    pub max_drains: usize,
    /// Longest time one drain may take.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for MeterConfig {
    fn default() -> Self {
        MeterConfig {
            on_client_disconnect: DisconnectPolicy::Cancel,
            max_drains: 64,
            drain_timeout: Duration::from_secs(120),
        }
    }
}

/// `[ledger]`: where usage records are stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LedgerConfig {
    /// `sqlite://PATH` or `postgres://...`.
    pub url: MaskedUrl,
    /// Apply migrations at start.
    pub migrate: bool,
    /// Directory of the write-ahead journal of finalised records.
    pub journal_dir: PathBuf,
    /// The journal is fsynced at most this long after a record is appended.
    #[serde(with = "humantime_serde")]
    pub fsync_interval: Duration,
    /// Rows per insert batch.
    pub batch_size: usize,
    /// Longest time a record waits for its batch.
    #[serde(with = "humantime_serde")]
    pub batch_interval: Duration,
    /// Journal size past which new records are refused (see the README).
    pub journal_max_bytes: u64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            url: MaskedUrl::new("sqlite://tollgate.db"),
            migrate: true,
            journal_dir: PathBuf::from("tollgate-journal"),
            fsync_interval: Duration::from_millis(20),
            batch_size: 500,
            batch_interval: Duration::from_millis(100),
            journal_max_bytes: 1024 * 1024 * 1024,
        }
    }
}

/// Where rate-limit state lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitsBackend {
    #[default]
    Local,
    Redis,
}

/// What the Redis backend does while Redis is unreachable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisFailure {
    /// Keep serving under this replica's own (local) limits.
    #[default]
    Open,
    /// Refuse requests (503) until Redis answers again.
    Closed,
}

/// `[limits]`: rate limits per key (defaults; keys may override them), an
/// optional global limit over all keys, and where their state lives.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Where the limit state lives: this process, or Redis shared by replicas.
    pub backend: LimitsBackend,
    /// The Redis of `backend = "redis"`.
    pub redis_url: Option<MaskedUrl>,
    /// Longest a request waits for its limit before it gets a 429.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Default requests per minute of a key; `None` is unlimited.
    pub rpm: Option<u32>,
    /// Default input tokens per minute of a key (cache reads not counted).
    pub input_tpm: Option<u64>,
    /// Default output tokens per minute of a key.
    pub output_tpm: Option<u64>,
    /// Default most requests of a key in flight at once.
    pub max_concurrent: Option<u32>,
    /// Requests per minute over all keys together.
    pub global_rpm: Option<u32>,
    /// Input tokens per minute over all keys together.
    pub global_input_tpm: Option<u64>,
    /// Output tokens per minute over all keys together.
    pub global_output_tpm: Option<u64>,
    /// Requests in flight over all keys together.
    pub global_max_concurrent: Option<u32>,
    /// `open`: fall back to local limits while Redis is unreachable; `closed`: refuse.
    pub redis_failure: RedisFailure,
    /// Longest one Redis decision may take (connecting included) before it counts
    /// as a failure.
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// After a Redis failure, how long decisions skip Redis before trying it again.
    #[serde(with = "humantime_serde")]
    pub redis_retry_interval: Duration,
    /// How long a concurrency slot held in Redis lives without being released, so
    /// a crashed replica's slots come back.
    #[serde(with = "humantime_serde")]
    pub redis_slot_lease: Duration,
    /// Prefix of every Redis key the limiter writes.
    pub redis_key_prefix: String,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            backend: LimitsBackend::Local,
            redis_url: None,
            max_wait: Duration::from_secs(10),
            rpm: None,
            input_tpm: None,
            output_tpm: None,
            max_concurrent: None,
            global_rpm: None,
            global_input_tpm: None,
            global_output_tpm: None,
            global_max_concurrent: None,
            redis_failure: RedisFailure::Open,
            redis_timeout: Duration::from_millis(250),
            redis_retry_interval: Duration::from_secs(1),
            redis_slot_lease: Duration::from_secs(15 * 60),
            redis_key_prefix: "tollgate:limits".into(),
        }
    }
}

impl LimitsConfig {
    /// Checks the `[limits]` section, adding every problem to `errors`.
    fn validate(&self, errors: &mut Vec<String>) {
        if self.backend == LimitsBackend::Redis && self.redis_url.is_none() {
            errors.push("limits.backend = \"redis\" needs limits.redis_url".to_owned());
        }
        if let Some(url) = &self.redis_url {
            let u = url.expose();
            if !(u.starts_with("redis://")
                || u.starts_with("redis+unix://")
                || u.starts_with("unix://"))
            {
                errors.push(format!(
                    "limits.redis_url must start with redis://, redis+unix:// or unix:// (got {url})"
                ));
            }
        }
        let zero = |v: Option<u64>| v == Some(0);
        for (name, value) in [
            ("rpm", self.rpm.map(u64::from)),
            ("input_tpm", self.input_tpm),
            ("output_tpm", self.output_tpm),
            ("max_concurrent", self.max_concurrent.map(u64::from)),
            ("global_rpm", self.global_rpm.map(u64::from)),
            ("global_input_tpm", self.global_input_tpm),
            ("global_output_tpm", self.global_output_tpm),
            (
                "global_max_concurrent",
                self.global_max_concurrent.map(u64::from),
            ),
        ] {
            if zero(value) {
                errors.push(format!(
                    "limits.{name} must be greater than 0 (leave it out for no limit)"
                ));
            }
        }
        for (name, d) in [
            ("limits.redis_timeout", self.redis_timeout),
            ("limits.redis_retry_interval", self.redis_retry_interval),
        ] {
            if d.is_zero() {
                errors.push(format!("{name} must be greater than 0"));
            }
        }
        if self.redis_slot_lease < Duration::from_secs(1) {
            errors.push("limits.redis_slot_lease must be at least 1s".to_owned());
        }
        if self.redis_key_prefix.is_empty() {
            errors.push("limits.redis_key_prefix must not be empty".to_owned());
        }
    }
}

/// `[prices]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PricesConfig {
    /// The price table used to compute `cost_nanousd`.
    pub file: PathBuf,
}

impl Default for PricesConfig {
    fn default() -> Self {
        PricesConfig {
            file: PathBuf::from("config/prices.toml"),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter, e.g. `info` or `tollgate=debug`. `RUST_LOG` wins if set.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// The validated configuration the program runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Everything as loaded; sections without derived values are read from here.
    pub raw: RawConfig,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub upstream_url: http::Uri,
}

impl Config {
    /// Loads the configuration: defaults, then `path` (or the default path if it
    /// exists), then the environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(path, vars)
    }

    /// [`Config::load`] with the environment given explicitly, for tests.
    pub fn load_from(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        RawConfig::load_from(path, env)?.validate()
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn to_masked_toml(&self) -> String {
        toml::to_string_pretty(&self.raw)
            .unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

impl RawConfig {
    /// Reads and merges the sources, collecting every deserialization error.
    pub fn load_from(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<RawConfig, ConfigErrors> {
        let mut builder = config::Config::builder();
        match path {
            Some(p) => {
                if !p.exists() {
                    return Err(ConfigErrors(vec![format!(
                        "config file {} does not exist",
                        p.display()
                    )]));
                }
                builder =
                    builder.add_source(config::File::from(p).format(config::FileFormat::Toml));
            }
            None => {
                let default = Path::new(DEFAULT_CONFIG_PATH);
                if default.exists() {
                    builder = builder
                        .add_source(config::File::from(default).format(config::FileFormat::Toml));
                }
            }
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("TOLLGATE__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("TOLLGATE")
                .prefix_separator("__")
                .separator("__")
                .source(Some(env)),
        );
        let merged = builder
            .build()
            .map_err(|e| ConfigErrors(vec![e.to_string()]))?;

        // Deserialize section by section so that one bad section does not hide
        // the mistakes in the others.
        let mut errors = Vec::new();
        let mut raw = RawConfig::default();
        let table = merged
            .clone()
            .try_deserialize::<config::Map<String, config::Value>>()
            .map_err(|e| ConfigErrors(vec![e.to_string()]))?;
        for key in table.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                errors.push(format!("unknown section `{key}`"));
            }
        }
        section(&merged, "server", &mut raw.server, &mut errors);
        section(&merged, "admin", &mut raw.admin, &mut errors);
        section(&merged, "upstream", &mut raw.upstream, &mut errors);
        section(&merged, "auth", &mut raw.auth, &mut errors);
        section(&merged, "meter", &mut raw.meter, &mut errors);
        section(&merged, "ledger", &mut raw.ledger, &mut errors);
        section(&merged, "limits", &mut raw.limits, &mut errors);
        section(&merged, "prices", &mut raw.prices, &mut errors);
        section(&merged, "log", &mut raw.log, &mut errors);
        if errors.is_empty() {
            Ok(raw)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Checks every value and derives the typed fields.
    pub fn validate(self) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let listen = parse_addr("server.listen", &self.server.listen, &mut errors);
        let admin_listen = parse_addr("admin.listen", &self.admin.listen, &mut errors);

        match (&self.server.tls_cert, &self.server.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                errors.push("server.tls_cert and server.tls_key must be set together".to_owned())
            }
            (Some(cert), Some(key)) => {
                for (name, p) in [("server.tls_cert", cert), ("server.tls_key", key)] {
                    if !p.is_file() {
                        errors.push(format!("{name}: file {} does not exist", p.display()));
                    }
                }
            }
            (None, None) => {}
        }
        if self.server.max_body_bytes == 0 {
            errors.push("server.max_body_bytes must be greater than 0".to_owned());
        }

        if let Some(addr) = admin_listen {
            let token_missing = self
                .admin
                .token
                .as_ref()
                .is_none_or(|t| t.expose().is_empty());
            if !addr.ip().is_loopback() && token_missing {
                errors.push(format!(
                    "admin.listen is {addr}, which is not loopback: set admin.token"
                ));
            }
        }

        let upstream_url = match self.upstream.url.parse::<http::Uri>() {
            Ok(uri) => match (uri.scheme_str(), uri.authority()) {
                (Some("http" | "https"), Some(_)) if uri.path() == "/" || uri.path().is_empty() => {
                    Some(uri)
                }
                (Some("http" | "https"), Some(_)) => {
                    errors.push(format!(
                        "upstream.url must not have a path (got {}): paths are forwarded as sent",
                        self.upstream.url
                    ));
                    None
                }
                _ => {
                    errors.push(format!(
                        "upstream.url must be an http:// or https:// URL with a host (got {})",
                        self.upstream.url
                    ));
                    None
                }
            },
            Err(e) => {
                errors.push(format!("upstream.url: {e} (got {})", self.upstream.url));
                None
            }
        };
        if let Some(ca) = &self.upstream.ca_file
            && !ca.is_file()
        {
            errors.push(format!(
                "upstream.ca_file: file {} does not exist",
                ca.display()
            ));
        }
        for (name, d) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            (
                "upstream.first_byte_timeout",
                self.upstream.first_byte_timeout,
            ),
            ("upstream.idle_timeout", self.upstream.idle_timeout),
            ("meter.drain_timeout", self.meter.drain_timeout),
            ("ledger.batch_interval", self.ledger.batch_interval),
            ("ledger.fsync_interval", self.ledger.fsync_interval),
        ] {
            if d.is_zero() {
                errors.push(format!("{name} must be greater than 0"));
            }
        }
        if self.auth.mode == AuthMode::Virtual
            && self
                .upstream
                .api_key
                .as_ref()
                .is_none_or(|k| k.expose().is_empty())
        {
            errors.push("auth.mode = \"virtual\" needs upstream.api_key".to_owned());
        }

        let ledger_url = self.ledger.url.expose();
        if !(ledger_url.starts_with("sqlite:")
            || ledger_url.starts_with("postgres://")
            || ledger_url.starts_with("postgresql://"))
        {
            errors.push(format!(
                "ledger.url must start with sqlite:, postgres:// or postgresql:// (got {})",
                self.ledger.url
            ));
        }
        if self.ledger.batch_size == 0 {
            errors.push("ledger.batch_size must be greater than 0".to_owned());
        }
        self.limits.validate(&mut errors);
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            errors.push(format!("log.level: {e}"));
        }

        match (listen, admin_listen, upstream_url) {
            (Some(listen), Some(admin_listen), Some(upstream_url)) if errors.is_empty() => {
                Ok(Config {
                    raw: self,
                    listen,
                    admin_listen,
                    upstream_url,
                })
            }
            _ => Err(ConfigErrors(errors)),
        }
    }
}

const SECTIONS: &[&str] = &[
    "server", "admin", "upstream", "auth", "meter", "ledger", "limits", "prices", "log",
];

fn section<T: for<'de> Deserialize<'de>>(
    merged: &config::Config,
    name: &str,
    slot: &mut T,
    errors: &mut Vec<String>,
) {
    match merged.get::<T>(name) {
        Ok(value) => *slot = value,
        Err(config::ConfigError::NotFound(_)) => {}
        Err(e) => errors.push(format!("[{name}] {e}")),
    }
}

fn parse_addr(name: &str, value: &str, errors: &mut Vec<String>) -> Option<SocketAddr> {
    match value.parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            errors.push(format!(
                "{name} must be an IP address and port like 127.0.0.1:8080 (got {value:?})"
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::load_from(None, env(&[])).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9464");
        assert_eq!(c.upstream_url.to_string(), "https://api.anthropic.com/");
        assert_eq!(c.raw.ledger.url.expose(), "sqlite://tollgate.db");
        assert_eq!(c.raw.auth.mode, AuthMode::Passthrough);
        assert_eq!(c.raw.server.max_body_bytes, 32 * 1024 * 1024);
        assert_eq!(c.raw.upstream.first_byte_timeout, Duration::from_secs(600));
    }

    #[test]
    fn environment_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.toml");
        std::fs::write(
            &file,
            "[server]\nlisten = \"127.0.0.1:1000\"\nmax_body_bytes = 10\n",
        )
        .unwrap();
        let c = Config::load_from(
            Some(&file),
            env(&[
                ("TOLLGATE__SERVER__LISTEN", "127.0.0.1:2000"),
                ("TOLLGATE__UPSTREAM__IDLE_TIMEOUT", "5s"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen.port(), 2000);
        assert_eq!(c.raw.server.max_body_bytes, 10);
        assert_eq!(c.raw.upstream.idle_timeout, Duration::from_secs(5));
    }

    #[test]
    fn every_error_is_listed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(
            &file,
            "[server]\nlisten = \"nope\"\n[upstream]\nurl = \"ftp://x\"\n[admin]\nlisten = \"0.0.0.0:9464\"\n[bogus]\nx = 1\n",
        )
        .unwrap();
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        let all = err.0.join("\n");
        assert!(all.contains("unknown section `bogus`"), "{all}");
        let err = RawConfig::load_from(Some(&file), env(&[]));
        assert!(err.is_err());

        std::fs::write(
            &file,
            "[server]\nlisten = \"nope\"\n[upstream]\nurl = \"ftp://x\"\n[admin]\nlisten = \"0.0.0.0:9464\"\n",
        )
        .unwrap();
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        let all = err.0.join("\n");
        assert!(all.contains("server.listen"), "{all}");
        assert!(all.contains("upstream.url"), "{all}");
        assert!(all.contains("admin.token"), "{all}");
        assert_eq!(err.0.len(), 3, "{all}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::load_from(None, env(&[("TOLLGATE__SERVER__LISTN", "x")])).unwrap_err();
        assert!(err.0.join("\n").contains("listn"), "{:?}", err.0);
    }

    /// The example file documents every key with its default: loading it gives
    /// the defaults, and every key of the defaults appears in it.
    #[test]
    fn example_file_documents_every_default() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tollgate.example.toml");
        let from_example = Config::load_from(Some(&example), env(&[])).unwrap();
        let defaults = Config::load_from(None, env(&[])).unwrap();
        assert_eq!(from_example.to_masked_toml(), defaults.to_masked_toml());
        let text = std::fs::read_to_string(&example).unwrap();
        let value: toml::Value = toml::from_str(&defaults.to_masked_toml()).unwrap();
        for (section, table) in value.as_table().unwrap() {
            assert!(
                text.contains(&format!("[{section}]")),
                "section {section} undocumented"
            );
            for key in table.as_table().unwrap().keys() {
                let documented = text.lines().any(|l| {
                    let l = l.trim_start_matches(['#', ' ']);
                    l.starts_with(&format!("{key} ="))
                });
                assert!(documented, "{section}.{key} is not in the example file");
            }
        }
        for optional in [
            "tls_cert",
            "tls_key",
            "token",
            "ca_file",
            "api_key",
            "redis_url",
        ] {
            assert!(
                text.contains(&format!("# {optional} =")),
                "{optional} undocumented"
            );
        }
    }

    #[test]
    fn masked_output_hides_secrets() {
        let c = Config::load_from(
            None,
            env(&[
                ("TOLLGATE__UPSTREAM__API_KEY", "sk-ant-topsecret"),
                ("TOLLGATE__ADMIN__TOKEN", "admintoken123"),
                ("TOLLGATE__LEDGER__URL", "postgres://u:dbpass@localhost/db"),
            ]),
        )
        .unwrap();
        let out = c.to_masked_toml();
        for secret in ["sk-ant-topsecret", "admintoken123", "dbpass"] {
            assert!(!out.contains(secret), "{secret} leaked:\n{out}");
            assert!(!format!("{c:?}").contains(secret));
        }
        assert!(out.contains("postgres://u:*****@localhost/db"), "{out}");
    }
}
