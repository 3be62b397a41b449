//! A TCP proxy between one forwarder and the NATS cluster, which the nemesis can black-hole.
//!
//! Each accepted connection goes to the first node that accepts it, starting from a rotating
//! index (the nodes run with `--no_advertise`, so the client never learns a way around the
//! proxy). Black-holing dooms every open connection and every one accepted until it is lifted:
//! a doomed connection is left open and its bytes, both ways, are swallowed for good, as a
//! network that drops packets does. Bytes are never dropped from a connection that is then
//! resumed: TCP would retransmit them, so such a stream cannot exist.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

struct Shared {
    upstreams: Vec<u16>,
    next: AtomicUsize,
    blackholed: AtomicBool,
    open: Mutex<Vec<Weak<AtomicBool>>>,
}

pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
}

impl Proxy {
    pub async fn start(upstreams: Vec<u16>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            upstreams,
            next: AtomicUsize::new(0),
            blackholed: AtomicBool::new(false),
            open: Mutex::new(Vec::new()),
        });
        let accepting = shared.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(client, accepting.clone()));
            }
        });
        Proxy { port, shared }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn set_blackholed(&self, on: bool) {
        self.shared.blackholed.store(on, Ordering::SeqCst);
        if on {
            let mut open = self.shared.open.lock().unwrap();
            open.retain(|doomed| match doomed.upgrade() {
                Some(doomed) => {
                    doomed.store(true, Ordering::SeqCst);
                    true
                }
                None => false,
            });
        }
    }
}

async fn serve(client: TcpStream, shared: Arc<Shared>) {
    let doomed = Arc::new(AtomicBool::new(shared.blackholed.load(Ordering::SeqCst)));
    let (client_read, client_write) = client.into_split();
    if doomed.load(Ordering::SeqCst) {
        swallow(client_read).await;
        drop(client_write);
        return;
    }
    shared.open.lock().unwrap().push(Arc::downgrade(&doomed));
    let first = shared.next.fetch_add(1, Ordering::Relaxed);
    let mut upstream = None;
    for i in 0..shared.upstreams.len() {
        let port = shared.upstreams[(first + i) % shared.upstreams.len()];
        let connect = TcpStream::connect(("127.0.0.1", port));
        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(1), connect).await {
            upstream = Some(stream);
            break;
        }
    }
    let Some(upstream) = upstream else {
        // No node answers: the client sees its connection closed, as with a refused one.
        return;
    };
    let (up_read, up_write) = upstream.into_split();
    let to_server = pump(client_read, up_write, doomed.clone());
    let to_client = pump(up_read, client_write, doomed.clone());
    tokio::pin!(to_server, to_client);
    // Either side closing ends the connection, unless it is doomed: then the client's side is
    // kept open (and swallowed) until the client gives up on it.
    tokio::select! {
        () = &mut to_server => {}
        () = &mut to_client => {
            if doomed.load(Ordering::SeqCst) {
                to_server.await;
            }
        }
    }
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, doomed: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if doomed.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn swallow(mut from: OwnedReadHalf) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}
