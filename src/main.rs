//! The `tollgate` binary: parses the command line, loads the configuration,
//! starts logging and calls the library. The only place that exits the process.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tollgate::config::Config;

/// A usage-metering gateway for the Anthropic Messages API.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about)]
struct Cli {
    /// Configuration file (default: config/tollgate.toml if it exists).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Print the effective configuration with secrets masked, or every error.
    CheckConfig,
    /// Apply the ledger's database migrations to `ledger.url`.
    Migrate,
    /// Create, list, show, update and revoke keys in the ledger.
    Keys(tollgate::keys::cli::KeysArgs),
    /// Report usage from the ledger, grouped and over a time range.
    Usage(tollgate::ledger::cli::UsageArgs),
    /// Recompute stored costs with the current price table.
    Reprice(tollgate::ledger::cli::RepriceArgs),
    /// Run a fake Anthropic API for tests, demos and benchmarks.
    MockUpstream(tollgate::mock_upstream::MockArgs),
}

/// Exit code for invalid configuration (EX_CONFIG is 78; the contract says 64, EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::MockUpstream(args) = command {
        tollgate::telemetry::init(&Default::default());
        return report(
            runtime().and_then(|rt| rt.block_on(tollgate::mock_upstream::run_cli(args))),
        );
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The price table is part of the configuration: a bad one is a config
    // error too, reported before any port is bound.
    if let Err(e) = tollgate::prices::load_configured(&config.raw.prices, &Default::default()) {
        eprintln!("invalid configuration:\n  - prices.file: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    if let Command::CheckConfig = command {
        print!("{}", config.to_masked_toml());
        return ExitCode::SUCCESS;
    }
    tollgate::telemetry::init(&config.raw.log);
    report(runtime().and_then(|rt| rt.block_on(run(command, config))))
}

/// Runs a command that needs the configuration and a runtime.
async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => tollgate::app::serve(config).await,
        Command::Migrate => tollgate::ledger::cli::migrate(&config).await,
        Command::Keys(args) => tollgate::keys::cli::run(&config, args).await,
        Command::Usage(args) => tollgate::ledger::cli::usage(&config, args).await,
        Command::Reprice(args) => tollgate::ledger::cli::reprice(&config, args).await,
        // Both are handled by `main` before it gets here.
        Command::CheckConfig | Command::MockUpstream(_) => Ok(()),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
