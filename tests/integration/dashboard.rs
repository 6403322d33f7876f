//! The dashboard on `--http`: the page and its assets, the JSON API with
//! its values compared against the database, downsampling, every error
//! case, and the page as headless Chromium renders it.

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;

/// `GET path` as JSON: the status and the parsed body.
pub fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, content_type, body) = http_request(addr, "GET", path);
    assert_eq!(content_type, "application/json", "{path}: {body}");
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    (status, json)
}

/// Waits (up to 30 s) until `/api/summary` shows `n` readings persisted.
pub fn wait_persisted(http: SocketAddr, n: u64, server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, summary) = get_json(http, "/api/summary");
        if summary["counters"]["persisted"].as_u64() >= Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "persisted stayed below {n}: {summary}; log:\n{}",
            server.log_text()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The time now in unix seconds.
pub use sensord::reading::unix_now as now;

/// Approximately equal: averages summed in another order.
pub fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn db_conn(dir: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(dir.join("sensors.db")).unwrap()
}

/// `/` is the page, its assets come from the binary (uPlot with its
/// license), other paths are 404 and other methods 405.
#[test]
fn page_and_assets_are_served() {
    let scratch = Scratch::new();
    let (mut server, http) = start_with_http(scratch.path(), &["--db", scratch.db_arg()]);
    let (status, content_type, page) = http_request(http, "GET", "/");
    assert_eq!(status, 200);
    assert_eq!(content_type, "text/html; charset=utf-8");
    assert!(page.contains(r#"<table id="sensors">"#), "{page}");
    for asset in [
        "/assets/dashboard.js",
        "/assets/dashboard.css",
        "/assets/uPlot.iife.min.js",
        "/assets/uPlot.min.css",
    ] {
        assert!(page.contains(asset), "the page loads {asset}");
        let (status, _, body) = http_request(http, "GET", asset);
        assert_eq!(status, 200, "{asset}");
        assert!(body.len() > 1000, "{asset} has {} bytes", body.len());
    }
    let (status, _, license) = http_request(http, "GET", "/assets/uPlot.LICENSE");
    assert_eq!(status, 200);
    assert!(license.contains("The MIT License"), "{license}");
    assert_eq!(http_request(http, "GET", "/nope").0, 404);
    assert_eq!(http_request(http, "POST", "/").0, 405);
    assert_eq!(http_request(http, "POST", "/api/sensors").0, 405);
    server.stop_clean();
}

/// `/api/summary` shows the ledger's counters as the shutdown line later
/// does, rejections by reason, health, the last commit and the ingest rate
/// from the ring buffer.
#[test]
fn summary_shows_the_counters_and_the_rate() {
    let scratch = Scratch::new();
    let (mut server, http) = start_with_http(scratch.path(), &["--db", scratch.db_arg()]);
    send_readings(
        server.addr,
        &["--count", "300", "--interval", "1ms", "--seed", "7"],
        scratch.path(),
    );
    let sequenced = br#"{"sensor_id": 5000, "seq": 0, "temperature": 1}"#;
    send_datagrams(server.addr, [&b"not json"[..], sequenced, sequenced]);
    wait_persisted(http, 301, &server);
    // Two samples of the ring buffer at least (one a second): one rate.
    let deadline = Instant::now() + EXIT;
    let (status, summary) = loop {
        let (status, summary) = get_json(http, "/api/summary");
        if summary["rate"]["t"]
            .as_array()
            .is_some_and(|t| t.len() >= 2)
        {
            break (status, summary);
        }
        assert!(Instant::now() < deadline, "no rate yet: {summary}");
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 200);
    let counters = &summary["counters"];
    assert_eq!(counters["received"], 303);
    assert_eq!(counters["accepted"], 302);
    assert_eq!(counters["rejected"], 1);
    assert_eq!(counters["persisted"], 301);
    assert_eq!(counters["duplicates"], 1);
    assert_eq!(summary["rejected_by_reason"]["not_json"], 1);
    assert_eq!(summary["health"]["ok"], true);
    let last_commit = summary["last_commit"].as_f64().unwrap();
    assert!((now() - last_commit).abs() < 30.0, "{summary}");
    let rate = &summary["rate"];
    let t = rate["t"].as_array().unwrap();
    assert!(!t.is_empty(), "{summary}");
    for series in ["received", "accepted", "rejected", "persisted"] {
        assert_eq!(rate[series].as_array().unwrap().len(), t.len(), "{series}");
    }
    // The rates add up to what arrived since the first sample, at most all.
    let accepted: f64 = rate["accepted"]
        .as_array()
        .unwrap()
        .iter()
        .zip(t.iter().zip(t.iter().skip(1)))
        .map(|(r, (a, b))| r.as_f64().unwrap() * (b.as_f64().unwrap() - a.as_f64().unwrap()))
        .sum();
    assert!(accepted <= 302.5, "{summary}");

    let counts = server.stop_clean();
    assert_eq!((counts["accepted"], counts["duplicates"]), (302, 1));
}

/// `/api/sensors` lists every sensor, named ones by name, with values the
/// database holds: readings in the last hour, last seen, latest
/// temperature and humidity, and sparklines ending in the latest reading.
#[test]
fn sensors_agree_with_the_database() {
    let scratch = Scratch::new();
    let (mut server, http) = start_with_http(scratch.path(), &["--db", scratch.db_arg()]);
    let start = now();
    let mut datagrams = Vec::new();
    for i in 0..120 {
        // Sensors 1 to 3 over the last 20 minutes; one reading of 3 older.
        // Sensor 2 numbers its readings, and seq 5 never arrives: 1 of 41
        // lost.
        let at = start - 1200.0 + i as f64 * 10.0;
        let seq = match (i % 3, i / 3) {
            (1, n) => format!(r#","seq":{}"#, if n < 5 { n } else { n + 1 }),
            _ => String::new(),
        };
        datagrams.push(format!(
            r#"{{"sensor_id":{},"temperature":{},"humidity":{},"ingested_at":{at}{seq}}}"#,
            1 + i % 3,
            20.0 + i as f64 / 8.0,
            40.0 + i as f64 / 16.0,
        ));
    }
    datagrams.push(format!(
        r#"{{"sensor_id":3,"temperature":1.5,"ingested_at":{}}}"#,
        start - 7200.0
    ));
    datagrams.push(format!(
        r#"{{"sensor_id":"room 3/a","temperature":19.5,"pressure":1001.5,"ingested_at":{}}}"#,
        start - 5.0
    ));
    datagrams.push(format!(
        r#"{{"sensor_id":"old-cellar","humidity":80,"ingested_at":{}}}"#,
        start - 3.0 * 86400.0
    ));
    send_datagrams(server.addr, &datagrams);
    wait_persisted(http, datagrams.len() as u64, &server);

    let (status, list) = get_json(http, "/api/sensors");
    assert_eq!(status, 200);
    let from = list["recent"]["from"].as_f64().unwrap();
    assert_eq!(list["recent"]["samples"], 30);
    let sensors = list["sensors"].as_array().unwrap();
    // Named sensors first (their keys are the smallest), then by integer.
    let mut ids: Vec<String> = sensors.iter().map(|s| s["id"].to_string()).collect();
    ids[..2].sort();
    assert_eq!(ids, [r#""old-cellar""#, r#""room 3/a""#, "1", "2", "3"]);
    let conn = db_conn(scratch.path());
    for sensor in sensors {
        let key: i64 = match &sensor["id"] {
            Value::String(name) => conn
                .query_row(
                    "SELECT key FROM sensor_names WHERE name = ?1",
                    [name],
                    |r| r.get(0),
                )
                .unwrap(),
            id => id.as_i64().unwrap(),
        };
        let (recent, last_seen): (i64, f64) = conn
            .query_row(
                "SELECT COUNT(CASE WHEN ingested_at >= ?2 THEN 1 END), MAX(ingested_at)
                 FROM sensor_measurements WHERE sensor_id = ?1",
                rusqlite::params![key, from],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        let (temperature, humidity): (Option<f64>, Option<f64>) = conn
            .query_row(
                "SELECT temperature, humidity FROM sensor_measurements
                 WHERE sensor_id = ?1 ORDER BY ingested_at DESC LIMIT 1",
                [key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(sensor["readings_last_hour"], recent, "{sensor}");
        assert_eq!(sensor["last_seen"], last_seen, "{sensor}");
        assert_eq!(sensor["temperature"].as_f64(), temperature, "{sensor}");
        assert_eq!(sensor["humidity"].as_f64(), humidity, "{sensor}");
        let loss = if sensor["id"] == 2 {
            Value::from(1.0 / 41.0)
        } else {
            Value::Null
        };
        assert_eq!(sensor["loss_ratio"], loss, "{sensor}");
        let spark = sensor["spark"]["temperature"].as_array().unwrap();
        assert_eq!(spark.len(), 30);
        let drawn = spark.iter().filter(|v| !v.is_null()).count();
        if last_seen >= from {
            assert_eq!(
                spark.iter().rev().find(|v| !v.is_null()).unwrap().as_f64(),
                temperature
            );
        } else {
            assert_eq!(drawn, 0, "{sensor}");
        }
    }
    assert_eq!(sensors[2]["readings_last_hour"], 40);
    server.stop_clean();
}

/// One sensor's readings reduced to at most `points` buckets: each
/// bucket's count, min, max and mean agree with the database, extra fields
/// are series of their own, and without `from` and `to` the window is all
/// of the sensor's readings.
#[test]
fn readings_are_downsampled_as_the_database_says() {
    let scratch = Scratch::new();
    let (mut server, http) = start_with_http(scratch.path(), &["--db", scratch.db_arg()]);
    let base = 1_764_150_000.0;
    let n = 10_000;
    let datagrams: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"sensor_id":"lab/α 1","temperature":{},"humidity":{},"co2":{},"ingested_at":{}}}"#,
                (i % 97) as f64 / 4.0,
                (i % 89) as f64,
                400 + i % 13,
                base + i as f64 * 0.5
            )
        })
        .collect();
    send_datagrams(server.addr, &datagrams);
    wait_persisted(http, n as u64, &server);
    let conn = db_conn(scratch.path());
    let key: i64 = conn
        .query_row(
            "SELECT key FROM sensor_names WHERE name = 'lab/α 1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let path = "/api/sensors/lab%2F%CE%B1%201/readings";
    let (from, to, points) = (base + 100.0, base + 3100.0, 7);
    let (status, got) = get_json(http, &format!("{path}?from={from}&to={to}&points={points}"));
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["sensor"], "lab/α 1");
    assert_eq!(got["points"], points);
    let t = got["t"].as_array().unwrap();
    assert!(t.len() <= points, "{} buckets", t.len());
    let width = (to - from) / points as f64;
    let mut statement = conn
        .prepare(
            "SELECT MIN(CAST((ingested_at - ?2) / ?4 AS INTEGER), ?5 - 1) AS b, COUNT(*),
                    AVG(ingested_at), MIN(temperature), MAX(temperature), AVG(temperature),
                    MIN(humidity), MAX(humidity), MIN(extra ->> 'co2'), MAX(extra ->> 'co2')
             FROM sensor_measurements
             WHERE sensor_id = ?1 AND ingested_at >= ?2 AND ingested_at <= ?3
             GROUP BY b ORDER BY b",
        )
        .unwrap();
    let expected: Vec<[f64; 9]> = statement
        .query_map(
            rusqlite::params![key, from, to, width, points as i64],
            |r| {
                Ok([
                    r.get::<_, i64>(1)? as f64,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                ])
            },
        )
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(t.len(), expected.len());
    let total: f64 = expected.iter().map(|e| e[0]).sum();
    assert_eq!(got["readings"], total as u64);
    let series = |name: &str| {
        got["series"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no series {name}: {got}"))
            .clone()
    };
    let names: Vec<&str> = got["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["temperature", "humidity", "co2"]);
    let (temperature, humidity, co2) = (series("temperature"), series("humidity"), series("co2"));
    assert_eq!(temperature["unit"], "°C");
    assert_eq!(co2["unit"], Value::Null);
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(got["count"][i], e[0] as u64, "bucket {i}");
        assert!(close(t[i].as_f64().unwrap(), e[1]), "bucket {i}");
        assert_eq!(temperature["min"][i], e[2], "bucket {i}");
        assert_eq!(temperature["max"][i], e[3], "bucket {i}");
        assert!(
            close(temperature["avg"][i].as_f64().unwrap(), e[4]),
            "bucket {i}"
        );
        assert_eq!(humidity["min"][i], e[5], "bucket {i}");
        assert_eq!(humidity["max"][i], e[6], "bucket {i}");
        assert_eq!(co2["min"][i], e[7], "bucket {i}");
        assert_eq!(co2["max"][i], e[8], "bucket {i}");
    }

    // No window: all of its readings, in the default number of buckets.
    let (status, all) = get_json(http, path);
    assert_eq!(status, 200);
    assert_eq!(all["readings"], n);
    assert_eq!(all["from"], base);
    assert_eq!(all["points"], 1000);
    assert!(all["t"].as_array().unwrap().len() <= 1000);
    let counted: u64 = all["count"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(counted, n as u64);
    server.stop_clean();
}

/// Every bad parameter is a 400, an unknown sensor or path a 404, each
/// with a one-line JSON error naming what is wrong.
#[test]
fn api_errors_are_one_line_json() {
    let scratch = Scratch::new();
    let (mut server, http) = start_with_http(scratch.path(), &["--db", scratch.db_arg()]);
    send_datagrams(
        server.addr,
        [
            r#"{"sensor_id":5,"temperature":1}"#,
            r#"{"sensor_id":"a b","temperature":2}"#,
        ],
    );
    wait_persisted(http, 2, &server);
    let cases = [
        (
            "/api/sensors/5/readings?from=yesterday",
            400,
            "`from` must be a time in unix seconds",
        ),
        (
            "/api/sensors/5/readings?to=NaN",
            400,
            "`to` must be a time in unix seconds",
        ),
        (
            "/api/sensors/5/readings?from=1e300",
            400,
            "`from` must be a time in unix seconds",
        ),
        (
            "/api/sensors/5/readings?points=0",
            400,
            "`points` must be an integer from 1 to 5000",
        ),
        (
            "/api/sensors/5/readings?points=5001",
            400,
            "`points` must be an integer from 1 to 5000",
        ),
        (
            "/api/sensors/5/readings?points=2.5",
            400,
            "`points` must be an integer from 1 to 5000",
        ),
        (
            "/api/sensors/5/readings?from=10&to=5",
            400,
            "`from` (10) is after `to` (5)",
        ),
        (
            "/api/sensors/5/readings?from=1&from=2",
            400,
            "`from` is given twice",
        ),
        (
            "/api/sensors/5/readings?limit=3",
            400,
            "unknown parameter `limit`",
        ),
        (
            "/api/sensors/5/readings?from=%zz",
            400,
            "`from` is not valid percent-encoded UTF-8",
        ),
        (
            "/api/sensors/%ff/readings",
            400,
            "the sensor id is not valid percent-encoded UTF-8",
        ),
        ("/api/sensors//readings", 400, "the sensor id is empty"),
        ("/api/sensors?sort=id", 400, "this path takes no parameters"),
        ("/api/summary?x=1", 400, "this path takes no parameters"),
        ("/api/sensors/6/readings", 404, "no sensor 6 has readings"),
        (
            "/api/sensors/a%20c/readings",
            404,
            "no sensor a c has readings",
        ),
        ("/api/sensors/05/readings", 404, "no sensor 05 has readings"),
        ("/api/sensors/5", 404, "no such path /api/sensors/5"),
        ("/api/nope", 404, "no such path /api/nope"),
    ];
    for (path, status, error) in cases {
        let (got, _, body) = http_request(http, "GET", path);
        assert_eq!(got, status, "{path}: {body}");
        assert!(!body.trim_end().contains('\n'), "{path}: {body}");
        let json: Value = serde_json::from_str(&body).unwrap();
        let message = json["error"].as_str().unwrap();
        assert!(message.starts_with(error), "{path}: {message}");
    }
    // The same sensors answer when asked properly.
    assert_eq!(get_json(http, "/api/sensors/5/readings").0, 200);
    assert_eq!(get_json(http, "/api/sensors/a%20b/readings").0, 200);
    server.stop_clean();
}

/// The path of Debian's `chromium`; the test fails without it
/// (`scripts/test.sh` installs it).
fn chromium() -> String {
    for name in ["chromium", "chromium-browser"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return name.to_string();
        }
    }
    panic!("chromium is not installed: scripts/test.sh installs Debian's `chromium` package");
}

/// The DOM headless Chromium renders from `url`, after `budget_ms` of
/// virtual time (the page's fetches included), with a fresh profile in
/// `profile`.
pub fn rendered_dom(url: &str, budget_ms: u32, profile: &Path) -> String {
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            &format!("--user-data-dir={}", profile.display()),
            &format!("--virtual-time-budget={budget_ms}"),
            "--dump-dom",
            url,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    let mut stdout = child.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        let mut dom = String::new();
        let _ = stdout.read_to_string(&mut dom);
        dom
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish rendering {url} within 90 s");
        }
        thread::sleep(Duration::from_millis(50));
    }
    reader.join().unwrap()
}

/// The DOM of `url` once `ready` holds of it; rendering again (up to three
/// times) when a loaded machine left the page unfinished.
fn render_until(url: &str, profile: &Path, ready: impl Fn(&str) -> bool) -> String {
    let mut dom = String::new();
    for budget in [5_000, 10_000, 20_000] {
        dom = rendered_dom(url, budget, profile);
        if ready(&dom) {
            return dom;
        }
    }
    panic!("{url} never rendered as expected; the last DOM:\n{dom}")
}

/// The opening tag of the element whose tag starts with `start`.
fn tag<'a>(dom: &'a str, start: &str) -> Option<&'a str> {
    let at = dom.find(start)?;
    Some(&dom[at..at + dom[at..].find('>')?])
}

/// A real browser loads the page from a running sensord fed by `sensord
/// send`: the sensors sent are rows of the table, a sensor silent for
/// longer than the threshold is marked, and a sensor's chart is drawn with
/// points.
#[test]
fn browser_shows_sensors_charts_and_silent_ones() {
    let scratch = Scratch::new();
    let (mut server, http) = start_with_http(scratch.path(), &["--db", scratch.db_arg()]);
    send_readings(
        server.addr,
        &[
            "--count",
            "300",
            "--interval",
            "1ms",
            "--sensor-ids",
            "11-13",
        ],
        scratch.path(),
    );
    send_datagrams(
        server.addr,
        [format!(
            r#"{{"sensor_id":"old-cellar","temperature":8.5,"ingested_at":{}}}"#,
            now() - 600.0
        )],
    );
    wait_persisted(http, 301, &server);
    let profile = scratch.path().join("chromium");

    let page = format!("http://{http}/");
    let dom = render_until(&page, &profile, |dom| {
        dom.contains(r#"data-sensor="old-cellar""#)
    });
    for id in ["11", "12", "13"] {
        let row = tag(&dom, &format!(r#"<tr data-sensor="{id}""#)).unwrap();
        assert!(
            row.contains(r#"class="""#),
            "sensor {id} is not silent: {row}"
        );
    }
    let silent = tag(&dom, r#"<tr data-sensor="old-cellar""#).unwrap();
    assert!(silent.contains(r#"class="silent""#), "{silent}");
    assert!(dom.contains(r#"<span class="tag">silent</span>"#));
    let table = tag(&dom, r#"<table id="sensors""#).unwrap();
    assert!(table.contains(r#"data-rows="4""#), "{table}");
    assert!(
        dom.contains(r#"<dt>accepted</dt><dd>301</dd>"#),
        "the totals show what was sent"
    );

    let sensor = format!("http://{http}/#sensor=12");
    let dom = render_until(&sensor, &profile, |dom| dom.contains(r#"data-loaded="1""#));
    let chart = tag(&dom, r#"<div class="chart" data-series="temperature""#).unwrap();
    let points: u64 = chart
        .split(r#"data-points=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no point count in {chart}"));
    assert!(points > 0, "{chart}");
    assert!(dom.contains("<canvas"), "uPlot drew on a canvas");
    server.stop_clean();
}
