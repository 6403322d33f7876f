//! The dashboard's JSON API:
//! - `GET /api/summary`: the counters, health and ingest rate, from the
//!   ledger and `History`; answered on the `http` thread, no database.
//! - `GET /api/sensors`: every sensor, its latest reading, its readings in
//!   the last hour and sparklines.
//! - `GET /api/sensors/{id}/readings?from=&to=&points=`: one sensor's
//!   measurements over a window, reduced to at most `points` buckets.
//!
//! The two that read the database are answered on a thread of their own
//! (`http-api`) with a store connection of its own, so a slow query never
//! holds up `/metrics` or `/health`, and never waits for the persister's
//! connection. Bad parameters get a 400 and an unknown sensor a 404, each
//! with a one-line JSON body `{"error": "..."}`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use log::warn;
use serde::Serialize;
use tiny_http::Request;

use super::downsample::{Downsampled, Downsampler};
use super::history::{History, Rates};
use super::{Reply, Sources, health};
use crate::error::Error;
use crate::reading::{MAX_INGESTED_AT, Rejection, SensorId, unix_now};
use crate::store::{Interrupter, Recent, SensorRow, Store, percent_decode};

/// Buckets per series when the request does not say.
const DEFAULT_POINTS: usize = 1000;
/// The most buckets a request may ask for.
const MAX_POINTS: usize = 5000;
/// `/api/sensors` counts readings and draws sparklines over this last
/// stretch, in `SPARK_SLOTS` slots.
const RECENT_SECONDS: f64 = 3600.0;
const SPARK_SLOTS: usize = 30;
/// Requests waiting for the `http-api` thread; one more is turned away
/// with a 503 rather than queued behind slow ones.
const QUEUE: usize = 8;
/// How often the idle `http-api` thread looks at its stop flag.
const POLL: Duration = Duration::from_millis(250);

/// `GET /api/summary`.
pub fn summary(sources: &Sources, history: &History) -> Reply {
    let counts = sources
        .ledger
        .snapshot(crate::receiver::kernel_drops(&sources.socket));
    let (status, text) = health::check(&sources.ledger, &sources.shutdown);
    let last_commit = sources.ledger.commits.last_ms.load(Ordering::Relaxed);
    let rejected_by_reason: serde_json::Map<String, serde_json::Value> = counts
        .rejected_by_reason
        .iter()
        .enumerate()
        .map(|(i, n)| (Rejection::kind_name(i).to_string(), (*n).into()))
        .collect();
    #[derive(Serialize)]
    struct Summary<'a> {
        now: f64,
        version: &'a str,
        health: Health,
        /// Unix seconds; null before the first commit.
        last_commit: Option<f64>,
        counters: serde_json::Value,
        rejected_by_reason: serde_json::Map<String, serde_json::Value>,
        rate: Rates,
    }
    #[derive(Serialize)]
    struct Health {
        ok: bool,
        text: String,
    }
    let c = &counts;
    Reply::json(
        200,
        &Summary {
            now: unix_now(),
            version: super::metrics::VERSION,
            health: Health {
                ok: status == 200,
                text,
            },
            last_commit: (last_commit > 0).then(|| last_commit as f64 / 1e3),
            counters: serde_json::json!({
                "received": c.received,
                "accepted": c.accepted,
                "rejected": c.rejected,
                "persisted": c.persisted,
                "queued": c.queued,
                "kernel_drops": c.kernel_drops,
                "denied": c.denied,
                "spilled": c.spilled,
                "dead_letter": c.dead_letter,
                "lost": c.lost,
                "expired": c.expired,
                "duplicates": c.duplicates,
                "late": c.late,
            }),
            rejected_by_reason,
            rate: history.rates(),
        },
    )
}

/// Where the `http` thread sends the requests that read the database.
pub struct Api {
    requests: Sender<Request>,
}

impl Api {
    /// Hands `request` to the `http-api` thread; answers it with a 503
    /// when that thread is busy or stopped.
    pub fn submit(&self, request: Request) {
        let (request, reply) = match self.requests.try_send(request) {
            Ok(()) => return,
            Err(TrySendError::Full(request)) => (
                request,
                Reply::error(503, "busy: too many dashboard requests waiting; try again"),
            ),
            Err(TrySendError::Disconnected(request)) => (request, stopping()),
        };
        super::send(request, reply);
    }
}

fn stopping() -> Reply {
    Reply::error(
        503,
        "stopping: the dashboard's database connection is closed",
    )
}

/// The running `http-api` thread. Dropping it interrupts the query in
/// progress, answers what is queued with a 503, closes the connection and
/// waits for the thread.
pub struct ApiGuard {
    closed: Arc<AtomicBool>,
    interrupt: Interrupter,
    thread: Option<JoinHandle<()>>,
}

impl Drop for ApiGuard {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        (self.interrupt)();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts the `http-api` thread answering from `store`.
pub fn start(store: Box<dyn Store>) -> Result<(Api, ApiGuard), Error> {
    let (requests, queue) = crossbeam_channel::bounded(QUEUE);
    let closed = Arc::new(AtomicBool::new(false));
    let interrupt = store.interrupter();
    let stop = Arc::clone(&closed);
    let thread = thread::Builder::new()
        .name("http-api".into())
        .spawn(move || run(store, &queue, &stop))
        .map_err(|source| Error::Thread {
            name: "http-api",
            source,
        })?;
    Ok((
        Api { requests },
        ApiGuard {
            closed,
            interrupt,
            thread: Some(thread),
        },
    ))
}

fn run(mut store: Box<dyn Store>, queue: &Receiver<Request>, closed: &AtomicBool) {
    loop {
        match queue.recv_timeout(POLL) {
            Ok(request) if !closed.load(Ordering::SeqCst) => {
                let reply = answer(store.as_mut(), request.url());
                super::send(request, reply);
            }
            Ok(request) => super::send(request, stopping()),
            Err(RecvTimeoutError::Timeout) if !closed.load(Ordering::SeqCst) => {}
            Err(_) => break,
        }
    }
    for request in queue.try_iter() {
        super::send(request, stopping());
    }
}

/// Answers `GET url` for a path under `/api/sensors`.
fn answer(store: &mut dyn Store, url: &str) -> Reply {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let result = if path == "/api/sensors" {
        no_parameters(query).and_then(|()| sensors(store))
    } else if let Some(id) = path
        .strip_prefix("/api/sensors/")
        .and_then(|rest| rest.strip_suffix("/readings"))
        .filter(|id| !id.contains('/'))
    {
        readings(store, id, query)
    } else {
        Err(not_found(path))
    };
    result.unwrap_or_else(|reply| reply)
}

/// The 404 for a path no page or API answers.
pub fn not_found(path: &str) -> Reply {
    Reply::error(
        404,
        &format!(
            "no such path {path}: try /api/summary, /api/sensors or \
             /api/sensors/ID/readings"
        ),
    )
}

/// A 400 unless `query` is empty.
pub fn no_parameters(query: &str) -> Result<(), Reply> {
    if query.is_empty() {
        Ok(())
    } else {
        Err(Reply::error(400, "this path takes no parameters"))
    }
}

/// A failed query: the log says why, and so does the 500.
fn database_error(e: Error) -> Reply {
    warn!("dashboard: {e}");
    Reply::error(500, &e.to_string())
}

/// `GET /api/sensors`.
fn sensors(store: &mut dyn Store) -> Result<Reply, Reply> {
    let now = unix_now();
    let recent = Recent {
        from: now - RECENT_SECONDS,
        step: RECENT_SECONDS / SPARK_SLOTS as f64,
        samples: SPARK_SLOTS,
    };
    let rows = store.sensor_list(&recent).map_err(database_error)?;
    #[derive(Serialize)]
    struct Sensors<'a> {
        now: f64,
        /// The sparklines' slots: `samples` of `step` seconds from `from`.
        recent: Spark,
        sensors: Vec<Sensor<'a>>,
    }
    #[derive(Serialize)]
    struct Spark {
        from: f64,
        step: f64,
        samples: usize,
    }
    #[derive(Serialize)]
    struct Sensor<'a> {
        id: &'a SensorId,
        readings_last_hour: u64,
        /// Unix seconds.
        last_seen: f64,
        loss_ratio: Option<f64>,
        temperature: Option<f64>,
        humidity: Option<f64>,
        spark: Sparklines<'a>,
    }
    #[derive(Serialize)]
    struct Sparklines<'a> {
        temperature: &'a [Option<f64>],
        humidity: &'a [Option<f64>],
    }
    fn sensor(row: &SensorRow) -> Sensor<'_> {
        Sensor {
            id: &row.id,
            readings_last_hour: row.recent,
            last_seen: row.last_seen,
            loss_ratio: row.loss_ratio,
            temperature: row.temperature,
            humidity: row.humidity,
            spark: Sparklines {
                temperature: &row.spark_temperature,
                humidity: &row.spark_humidity,
            },
        }
    }
    let sensors: Vec<Sensor<'_>> = rows.iter().map(sensor).collect();
    Ok(Reply::json(
        200,
        &Sensors {
            now,
            recent: Spark {
                from: recent.from,
                step: recent.step,
                samples: recent.samples,
            },
            sensors,
        },
    ))
}

/// The parameters of `/api/sensors/{id}/readings`.
#[derive(Debug, Default, PartialEq)]
struct Window {
    from: Option<f64>,
    to: Option<f64>,
    points: Option<usize>,
}

impl Window {
    fn parse(query: &str) -> Result<Window, String> {
        let mut window = Window::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value)
                .ok_or_else(|| format!("`{name}` is not valid percent-encoded UTF-8"))?;
            // 1970 to 9999, as stored: PostgreSQL refuses a time beyond.
            let time = || match value.parse::<f64>() {
                Ok(t) if (0.0..=MAX_INGESTED_AT).contains(&t) => Ok(Some(t)),
                _ => Err(format!(
                    "`{name}` must be a time in unix seconds from 0 to {MAX_INGESTED_AT}, \
                     like 1764150000.5: got `{value}`"
                )),
            };
            let twice = || format!("`{name}` is given twice");
            match name {
                "from" if window.from.is_some() => return Err(twice()),
                "to" if window.to.is_some() => return Err(twice()),
                "points" if window.points.is_some() => return Err(twice()),
                "from" => window.from = time()?,
                "to" => window.to = time()?,
                "points" => {
                    window.points = match value.parse::<usize>() {
                        Ok(n) if (1..=MAX_POINTS).contains(&n) => Some(n),
                        _ => {
                            return Err(format!(
                                "`points` must be an integer from 1 to {MAX_POINTS}: got `{value}`"
                            ));
                        }
                    }
                }
                other => {
                    return Err(format!(
                        "unknown parameter `{other}`: the parameters are from, to and points"
                    ));
                }
            }
        }
        Ok(window)
    }
}

/// `GET /api/sensors/{id}/readings`: `id` as in the path, percent-encoded.
fn readings(store: &mut dyn Store, id: &str, query: &str) -> Result<Reply, Reply> {
    let window = Window::parse(query).map_err(|e| Reply::error(400, &e))?;
    let text = percent_decode(id)
        .ok_or_else(|| Reply::error(400, "the sensor id is not valid percent-encoded UTF-8"))?;
    if text.is_empty() {
        return Err(Reply::error(400, "the sensor id is empty"));
    }
    let sensor = SensorId::from_text(&text);
    let unknown = || Reply::error(404, &format!("no sensor {sensor} has readings"));
    let key = store
        .sensor_key(&sensor)
        .map_err(database_error)?
        .ok_or_else(unknown)?;
    let (from, to) = match window {
        Window {
            from: Some(from),
            to: Some(to),
            ..
        } => (from, to),
        _ => {
            // Only a sensor with readings has a key.
            let (first, last) = store
                .sensor_span(key)
                .map_err(database_error)?
                .ok_or_else(unknown)?;
            (
                window.from.unwrap_or(first),
                window.to.unwrap_or(last.max(unix_now())),
            )
        }
    };
    if from > to {
        return Err(Reply::error(
            400,
            &format!("`from` ({from}) is after `to` ({to})"),
        ));
    }
    let mut downsampler = Downsampler::new(from, to, window.points.unwrap_or(DEFAULT_POINTS));
    store
        .sensor_readings(key, (from, to), &mut |r| downsampler.add(r))
        .map_err(database_error)?;
    #[derive(Serialize)]
    struct Readings<'a> {
        sensor: &'a SensorId,
        #[serde(flatten)]
        downsampled: Downsampled,
    }
    Ok(Reply::json(
        200,
        &Readings {
            sensor: &sensor,
            downsampled: downsampler.finish(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names with spaces, slashes and non-ASCII letters come through their
    /// escapes; a broken escape is refused.
    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("room%203%2Fa").as_deref(), Some("room 3/a"));
        assert_eq!(percent_decode("k%C3%BCche").as_deref(), Some("küche"));
        assert_eq!(percent_decode("a+b").as_deref(), Some("a+b"));
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }

    /// Each parameter is checked, and a mistake named.
    #[test]
    fn window_parameters() {
        assert_eq!(
            Window::parse("from=1.5&to=10&points=20"),
            Ok(Window {
                from: Some(1.5),
                to: Some(10.0),
                points: Some(20)
            })
        );
        assert_eq!(Window::parse(""), Ok(Window::default()));
        for (query, error) in [
            ("from=x", "`from` must be a time in unix seconds"),
            ("to=inf", "`to` must be a time in unix seconds"),
            ("points=0", "`points` must be an integer from 1 to 5000"),
            ("points=5001", "`points` must be an integer from 1 to 5000"),
            ("from=1&from=2", "`from` is given twice"),
            ("limit=3", "unknown parameter `limit`"),
        ] {
            let got = Window::parse(query).unwrap_err();
            assert!(got.starts_with(error), "{query}: {got}");
        }
    }
}
