//! The command line (SPEC §5): running the service, `check-config`, and the spool commands
//! (`spool status`, `spool drain`, `spool requeue`), which work on a spool directory without
//! starting the service. Both spools of `spool.dir` are covered: the event spool and the inbound one
//! (`<spool.dir>/inbound/`).

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::deliver::{self, DeliveryOptions};
use crate::inbound::spool::{self as inbound_spool, InboundSpool, InboundStatus};
use crate::inbound::store::InboundSink;
use crate::publish::Publisher;
use crate::settings::Settings;
use crate::spool::{self, Spool, SpoolHandle};

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
    /// Inspect or empty the spool (`spool.dir`) without running the service.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum SpoolCommand {
    /// Print the spool's depth (messages, bytes, oldest record's age) and its quarantine.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Publish everything in the spool to the configured NATS (same ids, same order), wait
    /// for every acknowledgement, and exit 0 once the spool is empty.
    Drain,
    /// Put quarantined messages back at the end of the spool (names as `spool status` lists
    /// them), to be published by the next start or `spool drain`.
    Requeue {
        /// Quarantine entries to put back.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        names: Vec<String>,
        /// Put back every quarantined message.
        #[arg(long)]
        all: bool,
    },
}

/// Attempts in a row without progress after which `spool drain` gives up.
const DRAIN_ATTEMPTS: u32 = 6;

/// `spool status --json`: the event spool's fields at the top level, the inbound spool's
/// under `inbound`.
#[derive(Debug, Serialize)]
struct Status {
    #[serde(flatten)]
    events: spool::SpoolStatus,
    inbound: InboundStatus,
}

/// `cmc-forwarder spool status`: the text (or JSON) to print.
pub fn spool_status(settings: &Settings, json: bool) -> Result<String, String> {
    let cannot = |e: &dyn std::fmt::Display| {
        format!(
            "cannot read the spool in {}: {e}",
            settings.spool.dir.display()
        )
    };
    let status = spool::status(&settings.spool.dir).map_err(|e| cannot(&e))?;
    let inbound = inbound_spool::status(&settings.spool.dir).map_err(|e| cannot(&e))?;
    if json {
        let status = Status {
            events: status,
            inbound,
        };
        return serde_json::to_string_pretty(&status)
            .map(|mut s| {
                s.push('\n');
                s
            })
            .map_err(|e| e.to_string());
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "spool {} ({})",
        status.dir.display(),
        if status.in_use {
            "in use by a running process"
        } else {
            "not in use"
        }
    );
    let oldest = match status.oldest_age_seconds {
        Some(age) => format!(", oldest {age:.1} s old"),
        None if status.messages > 0 => ", oldest of unknown age".into(),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "waiting: {} messages, {} bytes{oldest}",
        status.messages, status.bytes
    );
    let _ = writeln!(out, "quarantined: {} messages", status.quarantined.len());
    for entry in &status.quarantined {
        let _ = writeln!(
            out,
            "  {}: {} (Nats-Msg-Id {}): {}",
            entry.name, entry.subject, entry.msg_id, entry.reason
        );
    }
    let oldest = match inbound.oldest_age_seconds {
        Some(age) => format!(", oldest {age:.1} s old"),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "inbound waiting: {} mails, {} bytes{oldest}",
        inbound.mails, inbound.bytes
    );
    let _ = writeln!(
        out,
        "inbound quarantined: {} mails",
        inbound.quarantined.len()
    );
    for entry in &inbound.quarantined {
        let _ = writeln!(
            out,
            "  {:?} (filter {}, inbound/quarantine/{}): {}",
            entry.subject, entry.filter, entry.id, entry.reason
        );
    }
    Ok(out)
}

/// `cmc-forwarder spool drain`: publishes the whole spool, or says why it cannot.
pub async fn spool_drain(settings: &Settings) -> Result<String, String> {
    let dir = &settings.spool.dir;
    let spool = Spool::open(dir, settings.spool.max_bytes).map_err(|e| match e {
        spool::SpoolError::Locked(_) => format!("refusing to drain: {e}"),
        e => format!("cannot open the spool in {}: {e}", dir.display()),
    })?;
    // Opened under the event spool's lock, so never while a service uses the directory.
    let inbound = InboundSpool::open(dir, settings.spool.max_bytes, spool.stats())
        .map(std::sync::Arc::new)
        .map_err(|e| format!("cannot open the inbound spool in {}: {e}", dir.display()))?;
    let waiting = spool.stats().messages();
    let mails = inbound.len();
    if waiting == 0 && mails == 0 {
        return Ok(format!("the spool in {} is empty\n", dir.display()));
    }
    let spool = SpoolHandle::start(spool).map_err(|e| e.to_string())?;
    let publisher = Publisher::connect(&settings.nats)
        .await
        .map_err(|e| e.to_string())?;
    if !publisher.is_connected() {
        return Err(format!(
            "cannot connect to NATS ({}) within nats.connect_timeout; {waiting} messages and {mails} inbound mails stay in the spool",
            settings.nats.servers.join(", ")
        ));
    }
    publisher.ensure_stream().await.map_err(|e| e.to_string())?;
    let options = DeliveryOptions {
        retry_max_interval: settings.spool.retry_max_interval,
        ..DeliveryOptions::default()
    };
    let publisher = std::sync::Arc::new(publisher);
    let spooled_mails = deliver::Mails {
        sink: std::sync::Arc::new(InboundSink::new(settings, (*publisher).clone())),
        spool_dir: dir.clone(),
    };
    let summary = deliver::drain_to_empty(
        &spool,
        &publisher,
        Some(&spooled_mails),
        options,
        DRAIN_ATTEMPTS,
    )
    .await
    .map_err(|e| {
        if mails > 0 {
            format!("{e}; the {mails} inbound mails were not tried")
        } else {
            e.to_string()
        }
    })?;
    publisher.flush().await;
    // Then the mails, with the service drainer's own step (objects, then the message).
    let sink = InboundSink::new(settings, (*publisher).clone());
    let sent = inbound_spool::drain_to_empty(
        &inbound,
        &sink,
        DRAIN_ATTEMPTS,
        settings.spool.retry_max_interval,
    )
    .await?;
    let mut out = format!(
        "published {} messages and {} inbound mails from {}; the spool is empty\n",
        summary.published,
        sent.published,
        dir.display()
    );
    if sent.quarantined > 0 {
        let _ = writeln!(
            out,
            "{} inbound mails refused by NATS were moved to the quarantine (see spool status)",
            sent.quarantined
        );
    }
    if summary.quarantined > 0 {
        let _ = writeln!(
            out,
            "{} messages refused by NATS were moved to the quarantine (see spool status)",
            summary.quarantined
        );
    }
    Ok(out)
}

/// `cmc-forwarder spool requeue`: puts quarantined messages (`names`, or all of them) back at
/// the end of the spool. Needs the spool's lock, so never runs beside the service.
pub fn spool_requeue(settings: &Settings, names: &[String]) -> Result<String, String> {
    let dir = &settings.spool.dir;
    let mut spool = Spool::open(dir, settings.spool.max_bytes).map_err(|e| match e {
        spool::SpoolError::Locked(_) => format!("refusing to requeue: {e}"),
        e => format!("cannot open the spool in {}: {e}", dir.display()),
    })?;
    let done = spool.requeue(names).map_err(|e| e.to_string())?;
    let mut out = format!(
        "requeued {} messages into {}; the next start (or spool drain) publishes them\n",
        done.requeued.len(),
        dir.display()
    );
    for name in &done.unreadable {
        let _ = writeln!(
            out,
            "{name} is not a readable message (unreadable bytes kept as evidence); left in the quarantine"
        );
    }
    Ok(out)
}
