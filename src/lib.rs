//! cmc-forwarder: Customers Mail Cloud (CMC) event webhooks in, one NATS message per event
//! out, on one subject per status.
//!
//! # Layout
//!
//! A request travels through the modules in this order:
//!
//! 1. [`routes::webhook`]: path, method, client IP and Basic credentials ([`auth`]), in-flight
//!    limit, body read under its size cap.
//! 2. [`webhook`] (pure, no I/O): media type, form or JSON decoding, `api_key` handed back to
//!    [`auth`], validation (all-or-nothing, or invalid entries kept for the dead-letter
//!    subject), then one [`webhook::Outgoing`] per entry with the subject rendered by
//!    [`subject`] and the batch's `traceparent`.
//! 3. [`deliver`]: one delivery actor receives every batch (with its share of the
//!    [`budget`] of bytes in flight) and decides where it goes: out through the [`publish`]
//!    seam in entry order, with a bounded window of PubAcks consumed as they arrive, within
//!    `nats.publish_timeout`; or, while the [`spool`] holds anything, behind it. What NATS
//!    cannot take in time goes to the spool's writer thread (group commit) and is published
//!    later by the drainer, which quarantines what NATS refuses for good.
//! 4. [`routes::error`] renders every refusal as SPEC §3's JSON error body.
//!
//! Received mail (CMC's Inbound webhook, SPEC §7) takes a parallel path to the same spool:
//! [`routes::inbound`] (same checks) → [`inbound`] (multipart streamed to disk, validation,
//! the message planned by pure code) → [`inbound::store`] (objects into the JetStream object
//! store through the [`publish`] seam, whose real side is [`objects`], then one message), or,
//! when NATS cannot take the mail in time, a mail record in the [`spool`], sent by the same
//! drainer as the events.
//!
//! Around them: [`wire`] (the message as it goes on the wire, and its size), [`nats`] (the connection, its health and the stream), [`server`] (the public accept loop: connection cap, timeouts, TLS),
//! [`settings`] (TOML + environment, checked types), [`startup`] (build, serve,
//! drain), [`reload`] (the configuration read again on SIGHUP, live settings swapped in),
//! [`shutdown`] (signals), [`telemetry`] (logging, optional OTLP span export, the
//! request's trace context), [`trace_context`] (pure W3C `traceparent` rules), [`metrics`] (names and the
//! Prometheus exposition), [`cli`] (command line), and the admin listener in
//! [`routes::admin`].
#![forbid(unsafe_code)]
// The layout above names the private modules a reader looks for; they are mechanism, not API.
#![allow(rustdoc::private_intra_doc_links)]

mod auth;
mod budget;
pub mod cli;
mod deliver;
pub mod inbound;
mod metrics;
mod nats;
pub mod objects;
mod publish;
pub mod reload;
mod routes;
mod server;
pub mod settings;
pub mod shutdown;
pub mod spool;
pub mod startup;
pub mod subject;
pub mod telemetry;
mod trace_context;
pub mod webhook;
pub mod wire;
