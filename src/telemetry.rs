//! Logging and request spans, set up once: text or JSON lines on stderr, filtered by
//! `log.level` unless `RUST_LOG` is set, and, with `telemetry.otlp_endpoint`, the spans
//! exported over OTLP/HTTP (protobuf) to `<endpoint>/v1/traces`. Request bodies and secrets
//! are never logged anywhere in the crate, nor put on a span.
//!
//! The level filter belongs to the log output alone (a per-layer filter), so export does not
//! depend on how verbose the log is; it can be replaced while the service runs
//! ([`set_log_level`], for a configuration reload). With neither the log nor an exporter
//! wanting a span, its callsite stays disabled and costs nothing.
//!
//! Also owns the trace context of a request ([`request_trace`]): the W3C `traceparent` every
//! message of its batch carries. With export on, it is the exported span's own id, so a
//! consumer's spans hang under the forwarder's span in the trace viewer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use thiserror::Error;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::settings::{LogFilter, LogFormat, LogSettings, TelemetrySettings};
use crate::trace_context::TraceParent;

/// Set once spans are exported: only then does a request's span id come from the exporter.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Replaces the log output's filter: set once the subscriber is installed, and only when
/// `log.level` chose the filter (`RUST_LOG`, when set, stays in force).
static LOG_FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Why span export could not be set up.
#[derive(Debug, Error)]
pub enum TelemetryError {
    #[error("telemetry.otlp_endpoint: cannot set up the OTLP exporter: {0}")]
    Exporter(String),
}

/// Keeps the span exporter alive; dropping it sends what is still buffered (bounded by the
/// exporter's timeout) and stops it.
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            EXPORTING.store(false, Ordering::Release);
            // The exporter's blocking HTTP client must not be driven from a runtime thread.
            let _ = std::thread::spawn(move || provider.shutdown()).join();
        }
    }
}

/// Installs the global subscriber, logging only. Safe to call more than once (later calls do
/// nothing), so tests that start several applications in one process stay quiet and do not
/// panic.
pub fn init(settings: &LogSettings) {
    let _ = install(settings, None);
}

/// Installs the global subscriber, with span export when `telemetry.otlp_endpoint` is set.
pub fn init_with_export(
    log: &LogSettings,
    telemetry: &TelemetrySettings,
) -> Result<TelemetryGuard, TelemetryError> {
    let endpoint = telemetry.otlp_endpoint.trim();
    if endpoint.is_empty() {
        init(log);
        return Ok(TelemetryGuard { provider: None });
    }
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    // Built on a thread of its own: the blocking HTTP client may not be created or dropped
    // on a thread that drives an async runtime.
    let provider = std::thread::spawn(move || build_provider(&url))
        .join()
        .map_err(|_| TelemetryError::Exporter("exporter set-up panicked".into()))??;
    if install(log, Some(&provider)) {
        EXPORTING.store(true, Ordering::Release);
        tracing::info!(endpoint, "exporting request spans over OTLP/HTTP");
    }
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}

fn build_provider(url: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    // Spans leave every second (the SDK's default is 5 s): a collector sees a request soon
    // after it is answered, and the buffer stays small.
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(Duration::from_secs(1))
                .build(),
        )
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(
            Resource::builder()
                .with_service_name(env!("CARGO_PKG_NAME"))
                .build(),
        )
        .build())
}

/// Installs the subscriber; false when one was already installed.
fn install(settings: &LogSettings, provider: Option<&SdkTracerProvider>) -> bool {
    let from_env = EnvFilter::try_from_default_env().ok();
    let from_settings = from_env.is_none();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(settings.level.as_str()));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match settings.format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // Each output filters for itself: the log by its level, the exporter by its own fixed
    // level (request spans are `info`), so neither silences the other.
    let otel = provider.map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(env!("CARGO_PKG_NAME")))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    let installed = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()
        .is_ok();
    if installed && from_settings {
        let _ = LOG_FILTER.set(handle);
    }
    installed
}

/// What [`set_log_level`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelChange {
    /// The log output now filters by the new level.
    Applied,
    /// `RUST_LOG` chose the filter at start-up; it stays in force.
    OverriddenByEnv,
    /// This process installed no subscriber of its own (an embedding test, say).
    NotInstalled,
}

/// Makes `level` the log output's filter from the next event on (a configuration reload).
pub fn set_log_level(level: &LogFilter) -> LevelChange {
    let Some(handle) = LOG_FILTER.get() else {
        return if EnvFilter::try_from_default_env().is_ok() {
            LevelChange::OverriddenByEnv
        } else {
            LevelChange::NotInstalled
        };
    };
    match handle.reload(EnvFilter::new(level.as_str())) {
        Ok(()) => LevelChange::Applied,
        Err(_) => LevelChange::NotInstalled,
    }
}

/// The trace context of a request whose `traceparent` headers are `headers`, for the request
/// span `span` (SPEC §2): the request's own trace continued as a child span when it brings one
/// valid header, else a new trace. With export on, the child is `span` itself, as exported.
pub fn request_trace<'h>(
    span: &tracing::Span,
    headers: impl IntoIterator<Item = &'h [u8]>,
) -> TraceParent {
    let parent = TraceParent::parent_of(headers);
    if EXPORTING.load(Ordering::Acquire) {
        if let Some(own) = exported_context(span, parent) {
            return own;
        }
    }
    let ids = random_ids();
    match parent {
        Some(parent) => parent.child(ids[16..].try_into().expect("8 bytes")),
        // Spans are not exported here (else the exporter's own ids were returned above): a new
        // trace says it is not sampled (SPEC §2).
        None => TraceParent::root(ids, false),
    }
}

/// The ids OpenTelemetry gave `span`, after making it a child of `parent`.
fn exported_context(span: &tracing::Span, parent: Option<TraceParent>) -> Option<TraceParent> {
    if let Some(p) = parent {
        let remote = SpanContext::new(
            TraceId::from_bytes(p.trace_id),
            SpanId::from_bytes(p.span_id),
            TraceFlags::new(p.flags),
            true,
            TraceState::default(),
        );
        span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote))
            .ok()?;
    }
    let context = span.context();
    let own = context.span().span_context().clone();
    own.is_valid().then(|| TraceParent {
        trace_id: own.trace_id().to_bytes(),
        span_id: own.span_id().to_bytes(),
        flags: own.trace_flags().to_u8(),
    })
}

/// 24 random bytes: a trace id and a span id.
fn random_ids() -> [u8; 24] {
    let mut ids = [0u8; 24];
    ids[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    ids[16..].copy_from_slice(&uuid::Uuid::new_v4().as_bytes()[..8]);
    ids
}
