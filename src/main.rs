//! Entry point: parse the command line, load settings (failing before anything binds), then
//! either print them (`check-config`) or run the service until SIGTERM/SIGINT, reloading its
//! configuration on SIGHUP.

#![forbid(unsafe_code)]

use std::process::ExitCode;

/// glibc's allocator spent a third of the service's CPU under load (many small,
/// short-lived allocations per event, freed on other threads); mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc commits its arenas eagerly by default, which put the service at 30-40 MB resident
/// under load; committing on demand keeps it near 20 MB at no throughput cost measurable on
/// this load (`docs/performance.md`). mimalloc reads its options from the environment when it
/// initialises, before `main`, so the setting is its documented variable
/// `MIMALLOC_ARENA_EAGER_COMMIT=0`: set by the image, the systemd unit and Compose, and, when
/// the process was started without it, set here and the binary executed again (same process,
/// same arguments) so the allocator starts with it. An explicit value always wins.
const ALLOCATOR_OPTION: &str = "MIMALLOC_ARENA_EAGER_COMMIT";

/// Executes this binary again with `MIMALLOC_ARENA_EAGER_COMMIT=0` when the variable is not
/// set; returns only when it is set already or the re-execution is impossible (then mimalloc
/// keeps its defaults, which is merely more memory).
#[cfg(unix)]
fn tune_allocator() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os(ALLOCATOR_OPTION).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        command.arg0(arg0);
    }
    let error = command.args(args).env(ALLOCATOR_OPTION, "0").exec();
    eprintln!("cmc-forwarder: cannot re-execute with {ALLOCATOR_OPTION}=0 ({error}); continuing with mimalloc's defaults");
}

#[cfg(not(unix))]
fn tune_allocator() {}

use clap::Parser;
use cmc_forwarder::cli::{self, Cli, Command, SpoolCommand};
use cmc_forwarder::settings::Settings;
use cmc_forwarder::startup::Application;
use cmc_forwarder::{reload, shutdown, telemetry};

fn main() -> ExitCode {
    // Before anything else (the runtime's threads included): this may replace the process.
    tune_allocator();
    run()
}

#[tokio::main]
async fn run() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref(), None) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("cmc-forwarder: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::CheckConfig) => {
            print!("{}", settings.to_redacted_toml());
            eprintln!(
                "cmc-forwarder: configuration is valid ({})",
                settings.auth.summary()
            );
            return ExitCode::SUCCESS;
        }
        Some(Command::Spool { command }) => {
            let result = match command {
                SpoolCommand::Status { json } => cli::spool_status(&settings, json),
                SpoolCommand::Drain => {
                    telemetry::init(&settings.log);
                    cli::spool_drain(&settings).await
                }
                SpoolCommand::Requeue { names, all: _ } => cli::spool_requeue(&settings, &names),
            };
            return match result {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cmc-forwarder: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        None => {}
    }

    let _telemetry = match telemetry::init_with_export(&settings.log, &settings.telemetry) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("cmc-forwarder: {e}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "starting");
    let hangups = shutdown::Hangups::listen();
    // Caught before start-up, which can wait for NATS for seconds: a SIGTERM then ends the
    // process with status 0, as it does once serving, not by the signal's default action.
    let mut stop = Box::pin(shutdown::listen());
    let built = tokio::select! {
        built = Application::build(&settings) => built,
        () = &mut stop => {
            tracing::info!("stopped during start-up");
            return ExitCode::SUCCESS;
        }
    };
    match built {
        Ok(app) => {
            tokio::spawn(reload::on_hangup(hangups, app.reloader(cli.config.clone())));
            app.run_until_stopped(stop).await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            ExitCode::FAILURE
        }
    }
}
