//! `--http`: a small HTTP server on a thread of its own (`http`), serving
//! `GET /metrics` (the Prometheus text format) and `GET /health`.
//!
//! It reads counters (atomics in the `Ledger`), the shutdown trigger and
//! the socket's drop counter, and never writes: a scrape takes no lock
//! that the receiver or the persister holds, so it cannot stall ingest.
//! It keeps answering through the final flush (`/health` says "stopping")
//! and ends when its `HttpGuard` is dropped.

pub mod health;
pub mod metrics;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, info, warn};
use tiny_http::{Header, Method, Request, Response};

use crate::error::Error;
use crate::ledger::Ledger;
use crate::shutdown::Shutdown;

/// How often the serving thread looks at its stop flag when idle.
const POLL: Duration = Duration::from_millis(250);

/// A bound HTTP socket, not yet served: bound at start, before the
/// database is touched, so a port in use fails without creating anything.
pub struct Listener {
    server: tiny_http::Server,
    addr: SocketAddr,
}

impl Listener {
    pub fn bind(addr: SocketAddr) -> Result<Self, Error> {
        let server = tiny_http::Server::http(addr).map_err(|e| Error::Http {
            addr: addr.to_string(),
            cause: e.to_string(),
        })?;
        // Bound to an IP address above, so it has one.
        let addr = server
            .server_addr()
            .to_ip()
            .expect("bound to an IP address");
        Ok(Listener { server, addr })
    }

    /// The address bound, with the real port when asked for port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// What the pages read.
pub struct Sources {
    pub ledger: Arc<Ledger>,
    /// A clone of the UDP socket, for its kernel drop counter.
    pub socket: UdpSocket,
    pub shutdown: Shutdown,
}

/// The running server. Dropping it stops the thread and waits for it (at
/// most one response being written).
pub struct HttpGuard {
    server: Arc<tiny_http::Server>,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for HttpGuard {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves `listener` on thread `http` until the guard is dropped.
pub fn start(listener: Listener, sources: Sources) -> Result<HttpGuard, Error> {
    info!("http on {}", listener.addr);
    let server = Arc::new(listener.server);
    let done = Arc::new(AtomicBool::new(false));
    let (serving, stop) = (Arc::clone(&server), Arc::clone(&done));
    let thread = thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match serving.recv_timeout(POLL) {
                    Ok(Some(request)) => respond(request, &sources),
                    Ok(None) => {}
                    Err(e) => {
                        warn!("http: cannot accept a request: {e}");
                        thread::sleep(POLL);
                    }
                }
            }
        })
        .map_err(|source| Error::Thread {
            name: "http",
            source,
        })?;
    Ok(HttpGuard {
        server,
        done,
        thread: Some(thread),
    })
}

/// Answers one request: the page for its path, 404 or 405.
fn respond(request: Request, sources: &Sources) {
    let path = request.url().split('?').next().unwrap_or("");
    let get = matches!(request.method(), Method::Get | Method::Head);
    let (status, content_type, body) = match path {
        "/metrics" | "/health" if !get => (405, "text/plain", "only GET\n".to_string()),
        "/metrics" => (200, metrics::CONTENT_TYPE, metrics::render(sources)),
        "/health" => {
            let (status, text) = health::check(&sources.ledger, &sources.shutdown);
            (status, "text/plain", text + "\n")
        }
        _ => (
            404,
            "text/plain",
            "not found: try /metrics or /health\n".into(),
        ),
    };
    // Both are valid header bytes.
    let header = Header::from_bytes("Content-Type", content_type).expect("a valid header");
    let response = Response::from_string(body)
        .with_status_code(status)
        .with_header(header);
    if let Err(e) = request.respond(response) {
        debug!("http: the client went away: {e}");
    }
}
