//! Running it for months: `/metrics` checked by a real Prometheus,
//! `/health`, `--retain`, and the shipped unit file.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;

/// A scrape's samples: `name{labels}` to value.
fn samples(page: &str) -> HashMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (name.to_string(), value.parse().unwrap())
        })
        .collect()
}

/// Scrapes until `done` holds of the samples, failing after `timeout`.
fn scrape_until(
    http: SocketAddr,
    timeout: Duration,
    done: impl Fn(&HashMap<String, f64>) -> bool,
) -> (String, HashMap<String, f64>) {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, page) = http_get(http, "/metrics");
        assert_eq!(status, 200);
        let samples = samples(&page);
        if done(&samples) {
            return (page, samples);
        }
        assert!(
            Instant::now() < deadline,
            "not reached; last scrape:\n{page}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// `promtool check metrics` on `page`: the exposition is valid and follows
/// the naming conventions (it prints any lint problem and exits 1).
fn promtool_check(page: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (scripts/test.sh installs Debian's prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {out:?}\n{page}"
    );
}

/// Every metric that mirrors a counter of the shutdown line, and that
/// counter's name.
const MIRRORED: [(&str, &str); 15] = [
    ("sensord_datagrams_received_total", "received"),
    ("sensord_datagrams_denied_total", "denied"),
    ("sensord_datagrams_kernel_dropped_total", "kernel_drops"),
    ("sensord_datagrams_unread_total", "unread"),
    ("sensord_readings_accepted_total", "accepted"),
    ("sensord_readings_persisted_total", "persisted"),
    (
        "sensord_readings_flushed_at_shutdown_total",
        "flushed_at_shutdown",
    ),
    ("sensord_readings_spilled_total", "spilled"),
    ("sensord_readings_duplicate_total", "duplicates"),
    ("sensord_readings_late_total", "late"),
    ("sensord_readings_dead_lettered_total", "dead_letter"),
    ("sensord_readings_lost_total", "lost"),
    ("sensord_readings_expired_total", "expired"),
    (
        "sensord_readings_rejected_total{reason=\"not_json\"}",
        "not_json",
    ),
    (
        "sensord_readings_rejected_total{reason=\"missing_field\"}",
        "missing_field",
    ),
];

/// Once everything received is committed, a scrape passes `promtool check
/// metrics` and every value equals the shutdown line's.
#[test]
fn metrics_pass_promtool_and_equal_the_shutdown_line() {
    let scratch = Scratch::new();
    let (mut server, http) = start_with_http(scratch.path(), &["--db", scratch.db_arg()]);
    send_readings(
        server.addr,
        &["--interval", "0", "--count", "5000"],
        scratch.path(),
    );
    let sequenced = r#"{"sensor_id": 1, "seq": 0, "temperature": 1}"#;
    send_datagrams(
        server.addr,
        ["not json", r#"{"sensor_id": 1}"#, sequenced, sequenced],
    );
    let (page, metrics) = scrape_until(http, EXIT, |m| {
        m["sensord_readings_persisted_total"] == 5001.0
            && m["sensord_readings_duplicate_total"] == 1.0
            && m["sensord_datagrams_received_total"] == 5004.0
    });
    promtool_check(&page);
    assert_eq!(metrics["sensord_readings_queued"], 0.0);
    assert!(metrics["sensord_batch_commits_total"] >= 1.0);
    assert_eq!(
        metrics["sensord_batch_commit_duration_seconds_count"],
        metrics["sensord_batch_commits_total"]
    );
    assert!(metrics["process_resident_memory_bytes"] > 1e6);
    assert!(page.contains("sensord_build_info{version=\"0.1.0"));
    assert_eq!(server.stop_with(libc::SIGTERM, EXIT).code(), Some(0));
    let line = server.wait_for_line("shutdown complete:", EXIT);
    // The reasons are in parentheses: `rejected=2 (not_json=1 ...)`.
    let counts = counters(&line.replace(['(', ')'], " "));
    for (metric, counter) in MIRRORED {
        let counted = counts.get(counter).copied().unwrap_or(0);
        assert_eq!(metrics[metric], counted as f64, "{metric}\n{line}\n{page}");
    }
    let peak = line
        .rsplit("buffer_peak=")
        .next()
        .unwrap()
        .split('%')
        .next()
        .unwrap();
    let peak: f64 = peak.parse().unwrap();
    assert_eq!(metrics["sensord_receive_buffer_peak_ratio"] * 100.0, peak);
}

/// Kills a child process when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Prometheus server started here scrapes sensord, and a query through
/// its HTTP API returns the persisted count that the database holds.
#[test]
fn prometheus_scrapes_the_persisted_count() {
    let scratch = Scratch::new();
    let (mut server, http) = start_with_http(scratch.path(), &["--db", scratch.db_arg()]);
    send_readings(
        server.addr,
        &["--interval", "0", "--count", "3000"],
        scratch.path(),
    );
    let web = {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let config = scratch.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: sensord\n    \
             static_configs:\n      - targets: ['{http}']\n"
        ),
    )
    .unwrap();
    let _prometheus = KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                scratch.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus runs (scripts/test.sh installs Debian's prometheus package)"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let stored = loop {
        let answer = TcpStream::connect(web)
            .ok()
            .map(|_| http_get(web, "/api/v1/query?query=sensord_readings_persisted_total"));
        let value = answer.and_then(|(status, body)| {
            let json: serde_json::Value = serde_json::from_str(&body).ok()?;
            (status == 200).then_some(())?;
            json["data"]["result"][0]["value"][1]
                .as_str()?
                .parse::<u64>()
                .ok()
        });
        let rows = row_count(&scratch.db);
        if value == Some(rows) && rows == 3000 {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus answered {value:?}, the database holds {rows}"
        );
        thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(server.stop_clean()["persisted"], stored);
}

/// `/health` turns 503, saying why, while another connection holds the
/// SQLite write lock past --busy-timeout, and back to 200 once it lets go;
/// every reading is stored.
#[test]
fn health_is_503_while_commits_fail_and_200_after() {
    let scratch = Scratch::new();
    let (mut server, http) = start_with_http(
        scratch.path(),
        &["--db", scratch.db_arg(), "--busy-timeout", "300ms"],
    );
    assert_eq!(http_get(http, "/health").0, 200);
    let blocker = rusqlite::Connection::open(&scratch.db).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    send_readings(
        server.addr,
        &["--interval", "0", "--count", "100"],
        scratch.path(),
    );
    let deadline = Instant::now() + EXIT;
    let body = loop {
        let (status, body) = http_get(http, "/health");
        if status == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "still {status}: {body}");
        thread::sleep(Duration::from_millis(100));
    };
    assert!(body.contains("failing to commit"), "{body}");
    blocker.execute_batch("COMMIT").unwrap();
    let deadline = Instant::now() + EXIT;
    loop {
        let (status, body) = http_get(http, "/health");
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still {status}: {body}");
        thread::sleep(Duration::from_millis(100));
    }
    let counts = server.stop_clean();
    assert_eq!(counts["persisted"], 100);
    assert_eq!(row_count(&scratch.db), 100);
}

/// A reading `{"sensor_id": ID, ...}` whose `ingested_at` is `at`.
fn reading_at(sensor_id: u64, at: f64) -> String {
    format!(
        r#"{{"sensor_id": {sensor_id}, "temperature": 20.5, "humidity": 0.5, "ingested_at": {at}}}"#
    )
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// With --retain 2s, readings that arrive an hour old are stored, then
/// deleted and counted as expired; readings within the horizon stay.
#[test]
fn retention_deletes_old_readings_and_counts_them() {
    let scratch = Scratch::new();
    let mut server = Server::start(
        scratch.path(),
        &[
            "--db",
            scratch.db_arg(),
            "--retain",
            "2s",
            "--stats-interval",
            "50ms",
        ],
    );
    let hour_ago = now() - 3600.0;
    // Ahead of the clock (a sensor's clock may be), so within the horizon
    // however slow the test runs.
    let ahead = now() + 600.0;
    let old: Vec<String> = (0..3000)
        .map(|i| reading_at(i % 50, hour_ago + i as f64))
        .collect();
    let recent: Vec<String> = (0..500).map(|i| reading_at(i % 70, ahead)).collect();
    send_datagrams(server.addr, old.iter().chain(&recent));
    server.wait_for_count("persisted", 3500, EXIT);
    let deadline = Instant::now() + EXIT;
    while rows(&scratch.db).len() != 500 {
        assert!(
            Instant::now() < deadline,
            "{} rows",
            rows(&scratch.db).len()
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(rows(&scratch.db).iter().all(|r| r.ingested_at == ahead));
    let counts = server.stop_clean();
    assert_eq!(counts["persisted"], 3500);
    assert_eq!(counts["expired"], 3000);
}

/// The database's size in pages, as a reader sees it (the WAL included).
fn pages(db: &Path) -> u64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0))
        .unwrap() as u64
}

/// With --retain 2s, a file receiving 2000 readings a second stops growing:
/// over the last 4 s of 12 it grows by less than a tenth of what 4 s of
/// readings take, as SQLite reuses the pages retention frees.
#[test]
fn retention_keeps_a_steadily_fed_file_from_growing() {
    let scratch = Scratch::new();
    let mut server = Server::start(
        scratch.path(),
        &["--db", scratch.db_arg(), "--retain", "2s"],
    );
    let sender = Command::new(bin())
        .args([
            "send",
            "--to",
            &server.addr.to_string(),
            "--interval",
            "500us",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sender = KillOnDrop(sender);
    let started = Instant::now();
    let at = |seconds: u64| {
        thread::sleep(
            (started + Duration::from_secs(seconds)).saturating_duration_since(Instant::now()),
        );
        (pages(&scratch.db), row_count(&scratch.db))
    };
    let (_, rows_at_4) = at(4);
    let (pages_at_8, rows_at_8) = at(8);
    let (pages_at_12, rows_at_12) = at(12);
    drop(sender);
    let counts = server.stop_clean();
    eprintln!(
        "rows at 4, 8, 12 s: {rows_at_4} {rows_at_8} {rows_at_12}; \
         pages at 8, 12 s: {pages_at_8} {pages_at_12}; {counts:?}"
    );
    // Rows stay near 2 s worth; had they been kept, 4 s would take this many pages.
    let four_seconds = counts["persisted"] * 4 / 12 * 64 / 4096;
    assert!(
        pages_at_12 <= pages_at_8 + four_seconds / 10,
        "pages {pages_at_8} -> {pages_at_12}; 4 s of readings take about {four_seconds} pages; \
         rows {rows_at_4}, {rows_at_8}, {rows_at_12}; {counts:?}"
    );
    assert!(counts["expired"] > counts["persisted"] / 2, "{counts:?}");
}

/// Scraping /metrics ten times a second during a full-speed send of 200,000
/// readings leaves the ledger balanced and every accepted reading stored.
#[test]
fn scrapes_during_a_full_speed_send_change_nothing() {
    let scratch = Scratch::new();
    let (mut server, http) = start_with_http(scratch.path(), &["--db", scratch.db_arg()]);
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(AtomicU64::new(0));
    let scraper = {
        let (stop, scrapes) = (Arc::clone(&stop), Arc::clone(&scrapes));
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(http_get(http, "/metrics").0, 200);
                scrapes.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(100));
            }
        })
    };
    send_readings(
        server.addr,
        &["--interval", "0", "--count", "200000"],
        scratch.path(),
    );
    scrape_until(http, EXIT, |m| m["sensord_readings_queued"] == 0.0);
    stop.store(true, Ordering::Relaxed);
    scraper.join().unwrap();
    assert!(scrapes.load(Ordering::Relaxed) >= 2);
    let counts = server.stop_clean();
    assert_eq!(counts["accepted"], counts["received"], "{counts:?}");
    assert_eq!(counts["persisted"], counts["accepted"], "{counts:?}");
    assert_eq!(
        counts["received"] + counts["kernel_drops"],
        200_000,
        "{counts:?}"
    );
    assert_eq!(row_count(&scratch.db), counts["persisted"]);
}

/// A port in use for --http fails at start, naming the flag, before the
/// database is created.
#[test]
fn http_port_in_use_fails_before_the_database_is_touched() {
    let scratch = Scratch::new();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(
        &[
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--db",
            scratch.db_arg(),
            "--http",
            &addr,
        ],
        scratch.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("error: cannot serve HTTP on {addr} (--http): ")),
        "{stderr}"
    );
    assert!(!scratch.db.exists());
}

/// `systemd-analyze verify` accepts dist/sensord.service without a warning
/// (a copy whose ExecStart names the binary under test, as the shipped one
/// names where the README installs it).
#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/dist/sensord.service"))
            .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/sensord "));
    let scratch = Scratch::new();
    let copy = scratch.path().join("sensord.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/sensord", bin())).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze runs (scripts/test.sh installs Debian's systemd package)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
