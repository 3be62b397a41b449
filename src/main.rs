//! Entry point: parse the command line, load settings (failing before anything binds), then
//! either print them (`check-config`) or run the service until SIGTERM/SIGINT.

use std::process::ExitCode;

/// glibc's allocator spent a third of the service's CPU under load (many small,
/// short-lived allocations per event, freed on other threads); mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc commits its arenas eagerly by default, which put the service at 30-40 MB resident
/// under load; committing on demand keeps it near 20 MB at no throughput cost measurable on
/// this load (`docs/performance.md`). A default only: `MIMALLOC_ARENA_EAGER_COMMIT` still wins.
///
/// It has to run before mimalloc initialises itself (its constructor, priority 101, reads the
/// options and reserves the first arena, before `main`), hence a constructor of priority 100
/// (an ELF `.init_array` entry: Linux only; elsewhere mimalloc keeps its defaults).
#[cfg(target_os = "linux")]
extern "C" fn tune_allocator() {
    // The option's number in mimalloc 3's `mi_option_e` (libmimalloc-sys does not name it).
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    // SAFETY: a plain setter of mimalloc's option table, run before any thread exists.
    unsafe { libmimalloc_sys::mi_option_set_default(ARENA_EAGER_COMMIT, 0) }
}

#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array.00100")]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

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

    let _telemetry = match telemetry::init_with_export(&settings.log, &settings.telemetry) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("cmc-forwarder: {e}");
            return ExitCode::from(2);
        }
    };
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
