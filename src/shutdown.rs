//! The process's signals: the first SIGTERM or SIGINT (Ctrl-C) ends the wait ([`signal`]);
//! each SIGHUP asks for a configuration reload ([`Hangups`]).

/// SIGHUP, caught from the moment [`Hangups::listen`] is called: by default it would end the
/// process, so it is caught before anything slow (connecting NATS) begins.
pub struct Hangups {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    /// Starts catching SIGHUP (on a platform without it, none ever arrives).
    pub fn listen() -> Hangups {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let signal = signal(SignalKind::hangup())
                .map_err(|e| tracing::error!(error = %e, "cannot listen for SIGHUP"))
                .ok();
            Hangups { signal }
        }
        #[cfg(not(unix))]
        Hangups {}
    }

    /// Waits for the next SIGHUP; false when none can come.
    pub async fn next(&mut self) -> bool {
        #[cfg(unix)]
        if let Some(signal) = &mut self.signal {
            return signal.recv().await.is_some();
        }
        false
    }
}

/// [`signal`], with SIGTERM and SIGINT caught from the moment this is called (by default
/// they end the process): start-up, which can wait seconds for NATS, then stops cleanly too.
pub fn listen() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal as catch, SignalKind};
        let terminate = catch(SignalKind::terminate());
        let interrupt = catch(SignalKind::interrupt());
        async move {
            match (terminate, interrupt) {
                (Ok(mut terminate), Ok(mut interrupt)) => tokio::select! {
                    _ = terminate.recv() => tracing::info!("SIGTERM received, stopping"),
                    _ = interrupt.recv() => tracing::info!("SIGINT received, stopping"),
                },
                _ => signal().await,
            }
        }
    }
    #[cfg(not(unix))]
    signal()
}

/// Resolves when the process is asked to stop.
pub async fn signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received, stopping"),
        () = terminate => tracing::info!("SIGTERM received, stopping"),
    }
}
