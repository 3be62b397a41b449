//! The public listener's accept loop: HTTP/1.1 (optionally over TLS) with the limits a server
//! facing the internet needs, which warp's built-in server does not set.
//!
//! - at most `server.max_connections` open connections (more wait in the kernel's backlog);
//! - the TLS handshake and the request head must arrive within `server.request_timeout`,
//!   counted from the connection's start or its previous response (hyper's header timeout,
//!   which also closes idle keep-alive connections);
//! - the body must arrive by the same deadline: each request carries a [`RequestInfo`] whose
//!   `deadline` the webhook route enforces while reading (answering 408);
//! - on shutdown, no new connections are accepted and open ones are closed gracefully once
//!   their current request is answered;
//! - `server.request_timeout` can change while serving (a configuration reload): each
//!   connection keeps the value in force when it was accepted;
//! - a connection whose last answer said `Connection: close` (a route refusing a request
//!   before reading its body) is closed lingering, as nginx's `lingering_close` does: the
//!   service ends its side, then reads and drops what the client still sends, until the client
//!   closes, [`LINGER_BYTES`] or [`LINGER_TIME`]. Closed at once, the socket would still hold
//!   unread data and the kernel would answer it with a reset, which a client that writes its
//!   whole body before reading (Python's http.client, many HTTP libraries) sees as a broken
//!   pipe instead of the status.
//!
//! Owns sockets and TLS; knows nothing of webhooks (the warp filter is passed in).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tower_service::Service;
use warp::Filter;

/// The most a lingering close reads and drops: a client still sending after that is cut off.
/// Room for a refused body of four times the default `server.max_body_bytes` beyond what
/// the kernel's buffers held, while a client cannot make the service read without end.
pub const LINGER_BYTES: u64 = 16 * 1024 * 1024;

/// The longest a lingering close waits for the client to finish sending and close.
pub const LINGER_TIME: Duration = Duration::from_secs(5);

/// Facts about the connection a request arrived on, available to routes as a request
/// extension (`warp::ext::get::<RequestInfo>()`).
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo {
    pub peer: SocketAddr,
    /// When the whole request (head and body) must have been received.
    pub deadline: Instant,
}

/// `server.request_timeout`, shared between the listeners and the configuration reload.
#[derive(Debug, Clone)]
pub struct RequestTimeout(Arc<AtomicU64>);

impl RequestTimeout {
    pub fn new(timeout: Duration) -> RequestTimeout {
        RequestTimeout(Arc::new(AtomicU64::new(nanos(timeout))))
    }

    /// The timeout connections accepted from now on get.
    pub fn get(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }

    pub fn set(&self, timeout: Duration) {
        self.0.store(nanos(timeout), Ordering::Relaxed);
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Limits of the public listener.
#[derive(Clone)]
pub struct ServeOptions {
    pub request_timeout: RequestTimeout,
    pub max_connections: usize,
    pub tls: Option<TlsAcceptor>,
}

/// Builds the TLS acceptor from PEM files: TLS 1.2 and 1.3 (CMC's client speaks 1.1/1.2, so
/// 1.2 must stay on; 1.1 is not offered by rustls at all).
pub fn tls_acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("server.tls_cert_file {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "server.tls_cert_file {}: no certificate found",
            cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("server.tls_key_file {}: {e}", key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("server.tls_key_file: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `filter` on `listener` until `shutdown` resolves, then waits for open connections
/// to finish their current request (bounded by the caller).
pub async fn serve<F, R>(
    listener: TcpListener,
    filter: F,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) where
    F: Filter<Extract = (R,), Error = warp::Rejection> + Clone + Send + Sync + 'static,
    R: warp::Reply,
{
    let permits = Arc::new(Semaphore::new(options.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = warp::service(filter.clone());
        let options = options.clone();
        let stop = stop_rx.clone();
        connections.spawn(async move {
            let started = Instant::now();
            let timeout = options.request_timeout.get();
            match &options.tls {
                None => serve_connection(stream, peer, started, service, timeout, stop).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout_at(
                        (started + timeout).into(),
                        acceptor.accept(stream),
                    )
                    .await;
                    match handshake {
                        Ok(Ok(tls)) => {
                            serve_connection(tls, peer, started, service, timeout, stop).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
}

async fn serve_connection<IO, S>(
    io: IO,
    peer: SocketAddr,
    started: Instant,
    service: S,
    timeout: Duration,
    mut stop: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<warp::http::Request<Incoming>, Response = warp::reply::Response, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    // When the previous response was finished: the start of the next request's allowance.
    let idle_since = Arc::new(Mutex::new(started));
    // Set when a response says `Connection: close`: close lingering.
    let linger = Arc::new(AtomicBool::new(false));
    let answered_closing = linger.clone();
    // Behind an `Arc` (and each call's future in a `Box`), the service is `Unpin`, as serving
    // without hyper's shutdown needs.
    let service = Arc::new(service);
    let hyper_service =
        hyper::service::service_fn(move |mut request: warp::http::Request<Incoming>| {
            let since = *idle_since.lock().unwrap_or_else(|e| e.into_inner());
            request.extensions_mut().insert(RequestInfo {
                peer,
                deadline: since + timeout,
            });
            let mut service = S::clone(&service);
            let idle_since = idle_since.clone();
            let answered_closing = answered_closing.clone();
            Box::pin(async move {
                let response = service.call(request).await;
                *idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                if let Ok(response) = &response {
                    let closing = response
                        .headers()
                        .get(warp::http::header::CONNECTION)
                        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                    if closing {
                        answered_closing.store(true, Ordering::Relaxed);
                    }
                }
                response
            })
        });
    let mut connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), hyper_service);
    // Served without hyper's own shutdown of the socket, so that it can linger.
    let served = tokio::select! {
        result = std::future::poll_fn(|cx| connection.poll_without_shutdown(cx)) => Some(result),
        _ = stop.wait_for(|s| *s) => None,
    };
    let result = match served {
        Some(result) => result,
        None => {
            Pin::new(&mut connection).graceful_shutdown();
            std::future::poll_fn(|cx| connection.poll_without_shutdown(cx)).await
        }
    };
    match result {
        Ok(()) => {
            let io = connection.into_parts().io.into_inner();
            if linger.load(Ordering::Relaxed) {
                lingering_close(io).await;
            } else {
                let mut io = io;
                let _ = io.shutdown().await;
            }
        }
        Err(e) => tracing::debug!(%peer, error = %e, "connection ended with an error"),
    }
}

/// Ends the service's side of `io` (its answers are all out), then reads and drops what the
/// client still sends until it closes, [`LINGER_BYTES`] or [`LINGER_TIME`], whichever comes
/// first; dropping `io` then closes the socket with nothing unread in the common case.
async fn lingering_close<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO) {
    if io.shutdown().await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = LINGER_BYTES;
    let drain = async {
        while left > 0 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n as u64),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}
