//! The command line (SPEC §5): running the service, `check-config`, and the spool commands
//! (`spool status`, `spool drain`, `spool requeue`), which work on a spool directory without
//! starting the service. Both spools of `spool.dir` are covered: the event spool and the inbound one
//! (`<spool.dir>/inbound/`).

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::deliver::{self, DeliveryOptions};
use crate::inbound::store::InboundSink;
use crate::publish::Publisher;
use crate::settings::{Mode, Settings};
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

/// `cmc-forwarder spool status`: the text (or JSON) to print.
pub fn spool_status(settings: &Settings, json: bool) -> Result<String, String> {
    let cannot = |e: &dyn std::fmt::Display| {
        format!(
            "cannot read the spool in {}: {e}",
            settings.spool.dir.display()
        )
    };
    let full = spool::full_status(&settings.spool.dir).map_err(|e| cannot(&e))?;
    if json {
        return serde_json::to_string_pretty(&full)
            .map(|mut s| {
                s.push('\n');
                s
            })
            .map_err(|e| e.to_string());
    }
    let (status, inbound, retained) = (full.events, full.mails, full.retained);
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
            "  {:?} (filter {}, {}): {}",
            entry.subject, entry.filter, entry.id, entry.reason
        );
    }
    let _ = writeln!(
        out,
        "retained (published, kept for spool.retain): {} records, {} bytes",
        retained.records, retained.bytes
    );
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
    let mut spool = spool;
    // The retained log is left for the service's next start to replay, but its mails'
    // directories must be known as such.
    if settings.nats.mode == Mode::Jetstream && !settings.spool.retain.is_zero() {
        spool
            .retain(settings.spool.retain + settings.nats.publish_timeout)
            .map_err(|e| format!("cannot open the spool in {}: {e}", dir.display()))?;
    }
    // Mails an earlier version queued apart (`inbound/`) join the spool first.
    spool
        .adopt_mails()
        .map_err(|e| format!("cannot open the spool in {}: {e}", dir.display()))?;
    let status = spool::full_status(dir).map_err(|e| e.to_string())?;
    let (waiting, mails) = (status.events.messages, status.mails.mails);
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
    .map_err(|e| e.to_string())?;
    publisher.flush().await;
    let sent = (summary.mails, summary.mails_quarantined);
    let mut out = format!(
        "published {} messages and {} inbound mails from {}; the spool is empty\n",
        summary.published,
        sent.0,
        dir.display()
    );
    if sent.1 > 0 {
        let _ = writeln!(
            out,
            "{} inbound mails refused by NATS were moved to the quarantine (see spool status)",
            sent.1
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
