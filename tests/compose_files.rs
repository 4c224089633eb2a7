//! `docker-compose.yml`, `deploy/prometheus.yml` and the `Dockerfile` hold
//! together (no Docker engine runs here, so they are checked as files): the
//! services exist, tollgate is built by the multi-stage Dockerfile and
//! configured for Postgres with a valid configuration, and Prometheus scrapes
//! the compose service and port where tollgate serves `/metrics`.

// Helpers outside `#[test]` functions panic on purpose: a failed helper is a
// failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tollgate::config::Config;
use yaml_rust2::{Yaml, YamlLoader};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn load_yaml(path: &str) -> Yaml {
    let text = std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut docs = YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"));
    assert_eq!(docs.len(), 1, "{path}: one document");
    docs.remove(0)
}

fn str_of<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what} should be a string, is {y:?}"))
}

/// Expands `${NAME}`, `${NAME:-default}` and `${NAME:?message}` as compose
/// does, taking values from `vars`.
fn interpolate(value: &str, vars: &BTreeMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("unclosed ${") + start;
        let expr = &rest[start + 2..end];
        let (name, fallback) = match expr.find([':', '-', '?']) {
            Some(i) => (&expr[..i], Some(&expr[i..])),
            None => (expr, None),
        };
        match (vars.get(name), fallback) {
            (Some(v), _) => out.push_str(v),
            (None, Some(f)) if f.starts_with(":-") => out.push_str(&f[2..]),
            (None, Some(f)) if f.starts_with(":?") => {
                panic!("compose requires {name}: {}", &f[2..])
            }
            (None, _) => {}
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// A service's `environment`, as a map (either compose form).
fn environment(service: &Yaml) -> BTreeMap<String, String> {
    match &service["environment"] {
        Yaml::Hash(h) => h
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Yaml::Integer(n) => n.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => str_of(other, "environment value").to_owned(),
                };
                (str_of(k, "environment key").to_owned(), value)
            })
            .collect(),
        Yaml::Array(a) => a
            .iter()
            .map(|item| {
                let (k, v) = str_of(item, "environment item")
                    .split_once('=')
                    .expect("KEY=value");
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        other => panic!("environment should be a map or list, is {other:?}"),
    }
}

/// The container ports a service publishes (`HOST:CONTAINER` or `IP:HOST:CONTAINER`).
fn published_container_ports(service: &Yaml) -> Vec<u16> {
    service["ports"]
        .as_vec()
        .expect("ports list")
        .iter()
        .map(|p| {
            let spec = str_of(p, "port");
            spec.rsplit(':')
                .next()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

#[test]
fn compose_runs_postgres_tollgate_and_prometheus() {
    let compose = load_yaml("docker-compose.yml");
    let services = &compose["services"];
    for name in ["postgres", "tollgate", "prometheus"] {
        assert!(!services[name].is_badvalue(), "service {name} missing");
    }

    // Postgres, with a health check tollgate waits for.
    let postgres = &services["postgres"];
    assert!(str_of(&postgres["image"], "postgres image").starts_with("postgres:"));
    assert!(
        !postgres["healthcheck"]["test"].is_badvalue(),
        "postgres needs a healthcheck"
    );
    let pg_env = environment(postgres);
    let tollgate = &services["tollgate"];
    assert_eq!(
        str_of(
            &tollgate["depends_on"]["postgres"]["condition"],
            "depends_on condition"
        ),
        "service_healthy"
    );

    // tollgate: built here, from the multi-stage Dockerfile.
    assert_eq!(str_of(&tollgate["build"]["context"], "build context"), ".");
    let dockerfile = str_of(&tollgate["build"]["dockerfile"], "dockerfile");
    let dockerfile = std::fs::read_to_string(repo(dockerfile)).expect("Dockerfile exists");
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert!(stages.len() >= 2, "multi-stage build: {stages:?}");
    assert!(stages[0].contains(" AS build"), "{stages:?}");
    assert!(
        dockerfile.contains("cargo build --release --locked"),
        "builds the release binary"
    );
    assert!(
        dockerfile.contains("COPY --from=build"),
        "runs from the build stage's binary"
    );
    assert!(dockerfile.contains("ENTRYPOINT [\"tollgate\"]"));

    // Its environment is a valid tollgate configuration using this Postgres.
    let vars: BTreeMap<&str, &str> = [("TOLLGATE_ADMIN_TOKEN", "compose-test-token")].into();
    let env: Vec<(String, String)> = environment(tollgate)
        .into_iter()
        .map(|(k, v)| (k, interpolate(&v, &vars)))
        .collect();
    let config = Config::load_from(None, env.clone())
        .unwrap_or_else(|e| panic!("compose environment is not a valid config: {e}"));
    let ledger = url::Url::parse(config.raw.ledger.url.expose()).expect("ledger url");
    assert_eq!(ledger.scheme(), "postgres");
    assert_eq!(
        ledger.host_str(),
        Some("postgres"),
        "ledger points at the postgres service"
    );
    assert_eq!(ledger.port(), Some(5432));
    assert_eq!(ledger.username(), pg_env["POSTGRES_USER"]);
    assert_eq!(ledger.path(), format!("/{}", pg_env["POSTGRES_DB"]));
    assert_eq!(
        ledger.password().map(str::to_owned),
        Some(interpolate(&pg_env["POSTGRES_PASSWORD"], &vars)),
        "same password on both sides"
    );
    assert!(
        config.listen.ip().is_unspecified(),
        "proxy listens on 0.0.0.0"
    );
    assert!(
        config.admin_listen.ip().is_unspecified(),
        "admin listens on 0.0.0.0"
    );
    assert_eq!(
        config.raw.admin.token.as_ref().map(|t| t.expose().as_str()),
        Some("compose-test-token"),
        "the admin token comes from the environment"
    );
    let ports = published_container_ports(tollgate);
    assert!(
        ports.contains(&config.listen.port()),
        "proxy port published: {ports:?}"
    );
    assert!(
        ports.contains(&config.admin_listen.port()),
        "admin port published: {ports:?}"
    );
    // The journal lives on a volume.
    let journal = config.raw.ledger.journal_dir.display().to_string();
    let volumes = tollgate["volumes"].as_vec().expect("tollgate volumes");
    assert!(
        volumes.iter().any(|v| {
            let target = str_of(v, "volume").split(':').nth(1).unwrap_or("");
            !target.is_empty() && journal.starts_with(target)
        }),
        "journal dir {journal} must be on a volume: {volumes:?}"
    );

    // Prometheus: mounts deploy/prometheus.yml, which scrapes tollgate's admin port.
    let prometheus = &services["prometheus"];
    assert!(str_of(&prometheus["image"], "prometheus image").starts_with("prom/prometheus:"));
    let mounts: Vec<&str> = prometheus["volumes"]
        .as_vec()
        .expect("prometheus volumes")
        .iter()
        .map(|v| str_of(v, "volume"))
        .collect();
    let config_mount = mounts
        .iter()
        .find(|m| m.starts_with("./deploy/prometheus.yml:"))
        .unwrap_or_else(|| panic!("deploy/prometheus.yml not mounted: {mounts:?}"));
    let inside = config_mount.split(':').nth(1).unwrap();
    let args: Vec<&str> = prometheus["command"]
        .as_vec()
        .expect("command list")
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    assert!(
        args.contains(&format!("--config.file={inside}").as_str()),
        "{args:?}"
    );

    let scrape = load_yaml("deploy/prometheus.yml");
    let jobs = scrape["scrape_configs"].as_vec().expect("scrape_configs");
    let job = jobs
        .iter()
        .find(|j| j["job_name"].as_str() == Some("tollgate"))
        .expect("a tollgate scrape job");
    let path = job["metrics_path"].as_str().unwrap_or("/metrics");
    assert_eq!(path, "/metrics");
    let targets: Vec<&str> = job["static_configs"][0]["targets"]
        .as_vec()
        .expect("targets")
        .iter()
        .map(|t| str_of(t, "target"))
        .collect();
    assert_eq!(
        targets,
        [format!("tollgate:{}", config.admin_listen.port())]
    );
    let (host, _) = targets[0].split_once(':').unwrap();
    assert!(
        !services[host].is_badvalue(),
        "scrape target {host} is a compose service"
    );
}

#[test]
fn the_docker_build_context_keeps_out_build_output() {
    let ignore = std::fs::read_to_string(repo(".dockerignore")).expect(".dockerignore exists");
    let lines: Vec<&str> = ignore.lines().map(str::trim).collect();
    for entry in ["target", ".git"] {
        assert!(lines.contains(&entry), "{entry} not ignored");
    }
    // Everything the build needs is in the context.
    for needed in ["Cargo.toml", "Cargo.lock", "src", "migrations", "config"] {
        assert!(
            !lines.contains(&needed),
            "{needed} must be in the build context"
        );
        assert!(repo(needed).exists(), "{needed}");
    }
}
