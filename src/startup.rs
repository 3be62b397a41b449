//! The application: [`Application::build`] connects NATS, prepares the stream and binds the
//! listeners (port 0 allowed); [`Application::run_until_stopped`] serves until the shutdown
//! future resolves, then drains in-flight requests and flushes NATS;
//! [`Application::reloader`] hands out what a configuration reload replaces.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use warp::Filter;

use crate::budget::Budget;
use crate::deliver::{self, Delivery, DeliveryOptions};
use crate::metrics;
use crate::publish::{Publisher, SetupError};
use crate::reload::Reloader;
use crate::routes::{self, admin, inbound};
use crate::server::{self, RequestTimeout, ServeOptions};
use crate::settings::{Mode, Settings};
use crate::spool::{Spool, SpoolError, SpoolHandle};

/// Why the service could not start.
#[derive(Debug, Error)]
pub enum StartupError {
    #[error(transparent)]
    Nats(#[from] SetupError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid TLS configuration: {0}")]
    Tls(String),
    #[error(transparent)]
    Inbound(#[from] crate::inbound::SetupError),
    #[error("cannot open the spool in {dir}: {source}")]
    Spool {
        dir: std::path::PathBuf,
        source: SpoolError,
    },
}

/// A built, not yet running, service.
pub struct Application {
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    publisher: Publisher,
    spool: Option<SpoolHandle>,
    delivery_options: DeliveryOptions,
    webhook: Arc<routes::webhook::WebhookState>,
    /// The inbound endpoint and its spool, when `inbound.path` is set.
    inbound: Option<Arc<inbound::InboundState>>,
    serve_options: ServeOptions,
    /// Turns readiness off as soon as shutdown begins.
    shutting_down: Arc<AtomicBool>,
    /// Time in-flight requests get after the stop signal.
    grace: Duration,
    /// The settings it was built with, the base of a configuration reload.
    settings: Settings,
    /// The routes' auth and request limits, which a reload replaces.
    gate: routes::Gate,
}

impl Application {
    /// Builds the service from settings the loader has already checked.
    pub async fn build(settings: &Settings) -> Result<Application, StartupError> {
        metrics::install();
        let tls = match (
            &settings.server.tls_cert_file,
            &settings.server.tls_key_file,
        ) {
            (Some(cert), Some(key)) => {
                Some(server::tls_acceptor(cert, key).map_err(StartupError::Tls)?)
            }
            _ => None,
        };

        let dead_letter = settings.dead_letter_template();
        let publisher = Publisher::connect(&settings.nats)
            .await?
            .with_dead_letter(dead_letter.clone());
        if publisher.is_connected() {
            match publisher.ensure_stream().await {
                Ok(()) => {}
                Err(e @ SetupError::StreamUnanswered { .. }) => {
                    tracing::warn!(
                        error = %e,
                        "JetStream not answering yet; serving anyway and setting the stream up in the background"
                    );
                    tokio::spawn(publisher.clone().ensure_stream_in_background());
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            tracing::warn!(
                servers = ?settings.nats.servers,
                "NATS not reachable yet; serving anyway and connecting in the background"
            );
            tokio::spawn(publisher.clone().ensure_stream_in_background());
        }
        let spool = if settings.spool.enabled {
            let dir = &settings.spool.dir;
            let spool_error = |source| StartupError::Spool {
                dir: dir.clone(),
                source,
            };
            let mut spool = Spool::open(dir, settings.spool.max_bytes).map_err(spool_error)?;
            let retains = settings.nats.mode == Mode::Jetstream && !settings.spool.retain.is_zero();
            if retains {
                spool
                    .retain(settings.spool.retain + settings.nats.publish_timeout)
                    .map_err(spool_error)?;
            }
            // Mails an earlier version queued apart (`inbound/`) join the one spool.
            let adopted = spool.adopt_mails().map_err(spool_error)?;
            if adopted > 0 {
                tracing::info!(
                    mails = adopted,
                    "inbound mails of an earlier run joined the spool"
                );
            }
            if retains {
                let window = settings.nats.stream.duplicate_window;
                if window < settings.spool.retain + settings.nats.publish_timeout {
                    // The replay after a NATS restart is de-duplicated only within the window:
                    // an event NATS kept and acknowledged longer ago is stored again.
                    tracing::info!(
                        duplicate_window = ?window,
                        retain = ?settings.spool.retain,
                        "nats.stream.duplicate_window is shorter than spool.retain: after a NATS restart, retained events NATS kept that are older than the window are stored twice; a window of spool.retain plus the NATS downtime you expect avoids it"
                    );
                }
            }
            let stats = spool.stats();
            if !stats.is_empty() {
                tracing::info!(
                    messages = stats.messages(),
                    bytes = stats.bytes(),
                    "spool holds messages from an earlier run; they are published first"
                );
            }
            if stats.quarantined() > 0 {
                tracing::warn!(
                    messages = stats.quarantined(),
                    "the spool's quarantine holds messages NATS refused (cmc-forwarder spool status)"
                );
            }
            let handle = SpoolHandle::start(spool).map_err(|e| StartupError::Spool {
                dir: dir.clone(),
                source: e.into(),
            })?;
            Some(handle)
        } else {
            None
        };

        let inbound = crate::inbound::setup(settings, &publisher).await?;

        let listener = bind(settings.server.listen, "server.listen").await?;
        let admin_listener = match settings.admin.listen {
            Some(addr) => Some(bind(addr, "admin.listen").await?),
            None => None,
        };
        let publish_timeout = settings.nats.publish_timeout;
        let gate = routes::Gate::new(settings, publish_timeout.max(Duration::from_secs(1)));
        // One budget for both routes: `server.max_in_flight_bytes` bounds the service's memory.
        let budget = Budget::new(settings.server.max_in_flight_bytes);
        let delivery_options = DeliveryOptions {
            retry_max_interval: settings.spool.retry_max_interval,
            ..DeliveryOptions::default()
        };
        // One delivery actor for both webhooks: it alone decides what goes behind the spool.
        let delivery =
            Delivery::start(Arc::new(publisher.clone()), spool.clone(), delivery_options);
        let inbound = inbound.map(|parts| {
            Arc::new(inbound::InboundState {
                path: settings.inbound.path.to_string(),
                gate: gate.clone(),
                sink: parts.sink,
                spool: spool.clone(),
                spool_dir: settings.spool.dir.clone(),
                spool_max_bytes: settings.spool.max_bytes,
                work_root: parts.work_root,
                budget: budget.clone(),
                delivery: delivery.clone(),
            })
        });
        let webhook = Arc::new(routes::webhook::WebhookState {
            path: settings.server.path.clone(),
            template: settings.nats.subject.clone(),
            dead_letter,
            timezone: settings.cmc.timezone.as_ref().map(|z| z.zone().clone()),
            header_shape: settings.nats.headers,
            gate: gate.clone(),
            delivery,
            budget,
        });
        Ok(Application {
            listener,
            admin_listener,
            publisher,
            spool,
            delivery_options,
            webhook,
            inbound,
            serve_options: ServeOptions {
                request_timeout: RequestTimeout::new(settings.server.request_timeout),
                max_connections: settings.server.max_connections,
                tls,
            },
            shutting_down: Arc::new(AtomicBool::new(false)),
            grace: settings.server.shutdown_grace,
            settings: settings.clone(),
            gate,
        })
    }

    /// What reloads this application's configuration from `file` (and the environment):
    /// its routes' auth and limits, its request timeout, the log level.
    pub fn reloader(&self, file: Option<std::path::PathBuf>) -> Reloader {
        Reloader::new(
            file,
            self.settings.clone(),
            self.gate.clone(),
            self.serve_options.request_timeout.clone(),
        )
    }

    /// The webhook listener's port.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The admin listener's port, when enabled.
    pub fn admin_port(&self) -> Option<u16> {
        self.admin_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port())
    }

    /// Serves until `shutdown` resolves; then stops accepting, gives in-flight requests the
    /// grace period, flushes NATS and returns.
    pub async fn run_until_stopped<F>(self, shutdown: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        metrics::spawn_upkeep();
        let (stop_tx, stop_rx) = watch::channel(false);
        let shutting_down = self.shutting_down.clone();
        tokio::spawn(async move {
            shutdown.await;
            shutting_down.store(true, Ordering::Release);
            let _ = stop_tx.send(true);
        });

        let keeper = self.spool.clone().filter(|s| s.retains()).map(|spool| {
            tokio::spawn(deliver::keep_retained(
                spool,
                Arc::new(self.publisher.clone()),
                stop_rx.clone(),
            ))
        });
        let drainer = self.spool.clone().map(|spool| {
            let mails = self.inbound.as_ref().map(|state| deliver::Mails {
                sink: state.sink.clone(),
                spool_dir: self.settings.spool.dir.clone(),
            });
            tokio::spawn(deliver::drain(
                spool,
                Arc::new(self.publisher.clone()),
                mails,
                stop_rx.clone(),
                self.delivery_options,
            ))
        });

        let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
        let admin = self.admin_listener.map(|listener| {
            let routes = admin::routes(admin::AdminState {
                publisher: self.publisher.clone(),
                spool: self.spool.clone(),
                shutting_down: self.shutting_down.clone(),
                metrics: metrics::install(),
            });
            // The same accept loop, timeouts and connection cap as the public listener.
            let options = ServeOptions {
                tls: None,
                ..self.serve_options.clone()
            };
            tokio::spawn(server::serve(
                listener,
                routes,
                options,
                stopped(admin_stop_rx),
            ))
        });

        tracing::info!(
            addr = ?self.listener.local_addr().ok(),
            path = %self.webhook.path,
            tls = self.serve_options.tls.is_some(),
            "webhook listener ready"
        );
        let routes = match &self.inbound {
            Some(state) => {
                tracing::info!(path = %state.path, bucket = %state.sink.bucket(), "inbound endpoint ready");
                inbound::routes(state.clone())
                    .or(routes::webhook::routes(self.webhook.clone()))
                    .unify()
                    .boxed()
            }
            None => routes::webhook::routes(self.webhook.clone()).boxed(),
        };
        let server = server::serve(
            self.listener,
            routes,
            self.serve_options,
            stopped(stop_rx.clone()),
        );
        let mut server = std::pin::pin!(server);
        tokio::select! {
            () = &mut server => {}
            () = stopped(stop_rx) => {
                if tokio::time::timeout(self.grace, &mut server).await.is_err() {
                    tracing::warn!(grace = ?self.grace, "grace period over; closing the remaining connections");
                }
            }
        }
        if let Some(keeper) = keeper {
            let _ = keeper.await;
        }
        if let Some(drainer) = drainer {
            let _ = drainer.await;
        }
        self.publisher.flush().await;
        if let Some(spool) = &self.spool {
            if !spool.stats().is_empty() {
                tracing::info!(
                    messages = spool.stats().messages(),
                    "spool kept for the next start"
                );
            }
        }
        let _ = admin_stop_tx.send(true);
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        tracing::info!("stopped");
    }
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, StartupError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind { what, addr, source })
}

/// Resolves once the watched flag turns true.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
