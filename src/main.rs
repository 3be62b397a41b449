//! Entry point: parse the command line, load settings (failing before anything binds), then
//! either print them (`check-config`) or run the service until SIGTERM/SIGINT.

use std::process::ExitCode;

/// glibc's allocator spent a third of the service's CPU under load (many small,
/// short-lived allocations per event, freed on other threads); mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use cmc_forwarder::cli::{Cli, Command};
use cmc_forwarder::settings::Settings;
use cmc_forwarder::startup::Application;
use cmc_forwarder::{shutdown, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref(), None) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("cmc-forwarder: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::CheckConfig) = cli.command {
        print!("{}", settings.to_redacted_toml());
        eprintln!("cmc-forwarder: configuration is valid");
        return ExitCode::SUCCESS;
    }

    telemetry::init(&settings.log);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "starting");
    match Application::build(&settings).await {
        Ok(app) => {
            app.run_until_stopped(shutdown::signal()).await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            ExitCode::FAILURE
        }
    }
}
