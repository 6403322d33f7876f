//! `--http`: a small HTTP server on a thread of its own (`http`), serving
//! `GET /metrics` (the Prometheus text format), `GET /health`, and the
//! dashboard: the page at `/` with its assets, and its JSON API under
//! `/api/`.
//!
//! It reads counters (atomics in the `Ledger`), the shutdown trigger and
//! the socket's drop counter, and never writes: a scrape takes no lock
//! that the receiver or the persister holds, so it cannot stall ingest.
//! Between requests it samples the counters into `History`, the ingest
//! rate the page charts. The API's database reads run on a thread and a
//! store connection of their own (`api`). It keeps answering through the
//! final flush (`/health` says "stopping"; the API's connection closes
//! when the stop begins) and ends when its `HttpGuard` is dropped.

pub mod api;
pub mod assets;
pub mod downsample;
pub mod health;
pub mod history;
pub mod metrics;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, info, warn};
use tiny_http::{Header, Method, Request, Response};

use self::history::History;

use crate::error::Error;
use crate::ledger::Ledger;
use crate::shutdown::Shutdown;
use crate::store::Store;

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

/// The running server. Dropping it closes the API's database connection,
/// stops the thread and waits for it (at most one response being written).
pub struct HttpGuard {
    server: Arc<tiny_http::Server>,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    api: Option<api::ApiGuard>,
}

impl HttpGuard {
    /// Closes the API's database connection; from then on its requests get
    /// a 503. Called when a stop begins, so that the persister's connection
    /// is the last one open on the database when it closes.
    pub fn close_database(&mut self) {
        self.api.take();
    }
}

impl Drop for HttpGuard {
    fn drop(&mut self) {
        self.close_database();
        self.done.store(true, Ordering::SeqCst);
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves `listener` on thread `http` until the guard is dropped; the
/// API reads `store` (None: the API answers 503).
pub fn start(
    listener: Listener,
    sources: Sources,
    store: Option<Box<dyn Store>>,
) -> Result<HttpGuard, Error> {
    info!("dashboard at http://{}/", listener.addr);
    info!("http on {}", listener.addr);
    let (api, api_guard) = match store {
        Some(store) => {
            let (api, guard) = api::start(store)?;
            (Some(api), Some(guard))
        }
        None => (None, None),
    };
    let server = Arc::new(listener.server);
    let done = Arc::new(AtomicBool::new(false));
    let (serving, stop) = (Arc::clone(&server), Arc::clone(&done));
    let thread = thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            let mut history = History::default();
            while !stop.load(Ordering::SeqCst) {
                history.sample_if_due(&sources.ledger);
                match serving.recv_timeout(POLL.min(history::EVERY)) {
                    Ok(Some(request)) => respond(request, &sources, &history, api.as_ref()),
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
        api: api_guard,
    })
}

/// A response: status, content type and body.
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Reply {
    fn text(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Reply {
            status,
            content_type,
            body: body.into(),
        }
    }

    /// `value` as JSON.
    pub fn json(status: u16, value: &impl serde::Serialize) -> Self {
        // The API's types serialize without fail (no maps with non-string
        // keys); NaN becomes null.
        let body = serde_json::to_vec(value).expect("serializable");
        Reply::text(status, "application/json", body)
    }

    /// `{"error": "..."}` on one line.
    pub fn error(status: u16, message: &str) -> Self {
        Reply::json(status, &serde_json::json!({ "error": message }))
    }
}

/// Answers one request: the page for its path, 404 or 405. The API's
/// database requests go to its own thread, which answers them.
fn respond(request: Request, sources: &Sources, history: &History, api: Option<&api::Api>) {
    let url = request.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    if !matches!(request.method(), Method::Get | Method::Head) {
        return send(request, Reply::text(405, "text/plain", "only GET\n"));
    }
    let reply = match path {
        "/metrics" => Reply::text(200, metrics::CONTENT_TYPE, metrics::render(sources)),
        "/health" => {
            let (status, text) = health::check(&sources.ledger, &sources.shutdown);
            Reply::text(status, "text/plain", text + "\n")
        }
        "/api/summary" => match api::no_parameters(query) {
            Ok(()) => api::summary(sources, history),
            Err(reply) => reply,
        },
        _ if path == "/api/sensors" || path.starts_with("/api/sensors/") => match api {
            Some(api) => return api.submit(request),
            None => Reply::error(503, "the dashboard has no database connection"),
        },
        _ if path.starts_with("/api/") => api::not_found(path),
        _ => match assets::find(path) {
            Some((content_type, body)) => Reply::text(200, content_type, body),
            None => Reply::text(404, "text/plain", "not found: try /, /metrics or /health\n"),
        },
    };
    send(request, reply);
}

/// Writes `reply` to `request`'s client.
fn send(request: Request, reply: Reply) {
    // Both are valid header bytes.
    let header = Header::from_bytes("Content-Type", reply.content_type).expect("a valid header");
    let no_store = Header::from_bytes("Cache-Control", "no-store").expect("a valid header");
    let response = Response::from_data(reply.body)
        .with_status_code(reply.status)
        .with_header(header)
        .with_header(no_store);
    if let Err(e) = request.respond(response) {
        debug!("http: the client went away: {e}");
    }
}
