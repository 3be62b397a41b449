//! The command line (SPEC §5).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Customers Mail Cloud event webhooks in, one NATS message per event out.
#[derive(Debug, Parser)]
#[command(name = "cmc-forwarder", version, about)]
pub struct Cli {
    /// TOML configuration file; without one, every key has its default.
    #[arg(long, global = true, env = "CMC_FORWARDER_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration and print the effective values (secrets redacted).
    CheckConfig,
}
