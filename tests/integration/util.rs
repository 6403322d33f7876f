//! Starting the real binary, signalling it, and reading what it logged.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long a test waits for a server to exit, or for what it waits on
/// before a stop.
pub const EXIT: Duration = Duration::from_secs(30);

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sensord")
}

/// Runs `sensord ARGS` to completion, with a deadline.
pub fn run(args: &[&str], cwd: &Path) -> Output {
    let child = Command::new(bin())
        .args(args)
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the test binary runs");
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    match done_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(output) => output.expect("waiting for the child works"),
        Err(_) => {
            signal(pid, libc::SIGKILL);
            panic!("sensord {args:?} did not finish within 60 s");
        }
    }
}

/// Sends signal `sig` to process `pid`.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

/// A running `sensord serve` whose stderr is collected line by line.
pub struct Server {
    pub child: Child,
    /// The address it reported in its `listening on` line.
    pub addr: SocketAddr,
    /// Every stderr line so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `sensord serve --bind 127.0.0.1:0 --stats-interval 0 ARGS` in
    /// `cwd` and waits (up to 30 s) for its `listening on` line.
    pub fn start(cwd: &Path, args: &[&str]) -> Server {
        Self::start_with_env(cwd, args, &[])
    }

    pub fn start_with_env(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_bound(cwd, "127.0.0.1:0", args, env)
    }

    /// `start_with_env` on the address `bind`.
    pub fn start_bound(cwd: &Path, bind: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut command = Command::new(bin());
        command
            .args(["serve", "--bind", bind])
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if !args.contains(&"--stats-interval") {
            command.args(["--stats-interval", "0"]);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("the server binary starts");
        let stderr = child.stderr.take().expect("stderr was piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut server = Server {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
        };
        let line = server.wait_for_line("listening on ", Duration::from_secs(30));
        let addr = line.rsplit("listening on ").next().unwrap().trim();
        server.addr = addr
            .parse()
            .unwrap_or_else(|_| panic!("bad address in {line:?}"));
        server
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a log line containing `needle`, failing the test (with the
    /// log so far) after `timeout` or if the server exits first.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "no line with {needle:?} within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                thread::sleep(Duration::from_millis(100));
                if let Some(line) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                    return line.clone();
                }
                panic!(
                    "server exited ({status}) before {needle:?}; log:\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends `sig` and waits (up to `timeout`) for the exit.
    pub fn stop_with(&mut self, sig: i32, timeout: Duration) -> ExitStatus {
        signal(self.pid(), sig);
        self.wait(timeout)
    }

    /// Waits for the process to exit, killing it and failing after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait works") {
                // Let the reader thread collect the last lines.
                thread::sleep(Duration::from_millis(100));
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "server did not exit within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the server with SIGTERM, fails the test (with the log) unless
    /// it exits 0 within `EXIT`, and returns its shutdown counters.
    pub fn stop_clean(&mut self) -> HashMap<String, u64> {
        let status = self.stop_with(libc::SIGTERM, EXIT);
        assert!(status.success(), "exit {status}; log:\n{}", self.log_text());
        self.shutdown_counts()
    }

    /// The counters of the `shutdown complete:` line.
    pub fn shutdown_counts(&mut self) -> HashMap<String, u64> {
        let line = self.wait_for_line("shutdown complete:", Duration::from_secs(5));
        counters(&line)
    }

    /// Waits until the periodic or shutdown counters show `accepted >= n`
    /// (needs `--stats-interval`).
    pub fn wait_for_accepted(&mut self, n: u64, timeout: Duration) {
        self.wait_for_count("accepted", n, timeout);
    }

    /// Waits until the periodic or shutdown counters show `name >= n`
    /// (needs `--stats-interval`).
    pub fn wait_for_count(&mut self, name: &str, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self
                .log
                .lock()
                .unwrap()
                .iter()
                .filter_map(|l| counters(l).get(name).copied())
                .max()
                .unwrap_or(0);
            if seen >= n {
                return;
            }
            if Instant::now() > deadline {
                panic!("{name} stayed at {seen} < {n}; log:\n{}", self.log_text());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A failed test must not leave a daemon behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses `name=value` pairs of a log line.
pub fn counters(line: &str) -> HashMap<String, u64> {
    line.split_whitespace()
        .filter_map(|word| word.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

/// Runs the real client, `sensord send --to TO ARGS`, to completion and
/// checks it succeeded.
pub fn send_readings(to: SocketAddr, args: &[&str], cwd: &Path) -> Output {
    let to = to.to_string();
    let out = run(&[&["send", "--to", &to][..], args].concat(), cwd);
    assert!(out.status.success(), "sensord send failed: {out:?}");
    out
}

/// Sends each datagram to `to` from a fresh loopback socket.
pub fn send_datagrams<I, D>(to: SocketAddr, datagrams: I)
where
    I: IntoIterator<Item = D>,
    D: AsRef<[u8]>,
{
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    for datagram in datagrams {
        socket.send_to(datagram.as_ref(), to).unwrap();
    }
}

/// One stored row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Row {
    pub sensor_id: i64,
    pub temperature: f64,
    pub humidity: f64,
    pub ingested_at: f64,
    pub received_at: f64,
}

/// Every row of the database, in insertion order.
pub fn rows(db: &Path) -> Vec<Row> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut statement = conn
        .prepare(
            "SELECT sensor_id, temperature, humidity, ingested_at, received_at
             FROM sensor_measurements ORDER BY rowid",
        )
        .unwrap();
    statement
        .query_map([], |r| {
            Ok(Row {
                sensor_id: r.get(0)?,
                temperature: r.get(1)?,
                humidity: r.get(2)?,
                ingested_at: r.get(3)?,
                received_at: r.get(4)?,
            })
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

pub fn row_count(db: &Path) -> u64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row("SELECT COUNT(*) FROM sensor_measurements", [], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap() as u64
}

/// `serve` flags under which nothing commits before the stop (a batch and a
/// flush interval beyond any test), so the final flush commits it all; the
/// counters are logged every 50 ms for `wait_for_count`.
pub const HOLD_UNTIL_STOP: [&str; 6] = [
    "--flush-interval",
    "1h",
    "--batch-size",
    "1000000",
    "--stats-interval",
    "50ms",
];

/// Starts a server on `db` with `HOLD_UNTIL_STOP`.
pub fn start_holding(cwd: &Path, db: &str) -> Server {
    Server::start(cwd, &[&["--db", db][..], &HOLD_UNTIL_STOP].concat())
}

/// The file's journal mode as a new connection sees it: "wal" or "delete".
pub fn journal_mode(db: &Path) -> String {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap()
}

/// A temporary folder with a database path in it.
pub struct Scratch {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("sensors.db");
        Scratch { dir, db }
    }

    pub fn db_arg(&self) -> &str {
        self.db.to_str().unwrap()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A reading's datagram text and the f64 values it denotes.
pub struct Sent {
    pub text: String,
    pub sensor_id: i64,
    pub temperature: f64,
    pub humidity: f64,
    pub ingested_at: f64,
}

/// `n` readings with many significant digits, all different, so stored
/// values can be compared bit for bit with what the decimal text denotes.
pub fn precise_readings(n: usize) -> Vec<Sent> {
    (0..n)
        .map(|i| {
            let temperature = format!("{}.{:015}", i % 40, (i as u64 * 7_919_993) % 1_000_000_000_000_000);
            let humidity = format!("0.{:017}", (i as u64 + 1) * 104_729);
            let ingested_at = format!("1764150000.{:06}", i);
            let sensor_id = (i % 97) as i64 - 10;
            let text = format!(
                r#"{{"sensor_id": {sensor_id}, "temperature": {temperature}, "humidity": {humidity}, "ingested_at": {ingested_at}}}"#
            );
            Sent {
                sensor_id,
                temperature: temperature.parse().unwrap(),
                humidity: humidity.parse().unwrap(),
                ingested_at: ingested_at.parse().unwrap(),
                text,
            }
        })
        .collect()
}

/// Readings in a spill file: its lines less the batch headers.
pub fn spill_readings(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .map(|t| {
            t.lines()
                .filter(|l| !l.starts_with("{\"batch_run\""))
                .count() as u64
        })
        .unwrap_or(0)
}

/// A datagram whose sensor id is unique, so duplicates are detectable.
pub fn unique(id: u64) -> String {
    format!(r#"{{"sensor_id": {id}, "temperature": 21.5, "humidity": 7.25}}"#)
}

/// A valid array of readings as close to 65,507 bytes as whole elements allow.
pub fn max_size_array() -> String {
    let element =
        r#"{"sensor_id":1,"temperature":21.5,"humidity":7.2,"ingested_at":1764150000.12},"#;
    let mut array = String::from("[");
    while array.len() + element.len() < 65_507 {
        array.push_str(element);
    }
    array.pop();
    array.push(']');
    array
}

/// A process's peak resident memory so far (VmHWM), in KiB; None once it
/// has exited.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Stops process `pid` (SIGSTOP) and waits, up to `EXIT`, until every one
/// of its threads is stopped: the signal takes effect asynchronously, and a
/// test that sends right after `kill` would race threads still running.
pub fn pause(pid: u32) {
    signal(pid, libc::SIGSTOP);
    let deadline = Instant::now() + EXIT;
    let all_stopped = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.flatten().all(|task| {
                    std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                        // The state follows the command name's closing parenthesis.
                        stat.rsplit_once(") ")
                            .is_some_and(|(_, rest)| rest.starts_with('T'))
                    })
                })
            })
            .unwrap_or(false)
    };
    while !all_stopped() {
        assert!(Instant::now() < deadline, "process {pid} did not stop");
        thread::sleep(Duration::from_millis(5));
    }
}

/// `METHOD path` over HTTP/1.0 on `addr`: the status, the Content-Type and
/// the body. Waits at most 30 s for the answer.
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(stream, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or("")
        .to_string();
    (status, content_type, body.to_string())
}

/// `GET path` on `addr`: the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http_request(addr, "GET", path);
    (status, body)
}

/// Starts `sensord serve --http 127.0.0.1:0 ARGS`; returns it and the
/// address of its `http on` line.
pub fn start_with_http(cwd: &Path, args: &[&str]) -> (Server, SocketAddr) {
    let mut server = Server::start(cwd, &[&["--http", "127.0.0.1:0"][..], args].concat());
    let line = server.wait_for_line("http on ", Duration::from_secs(10));
    let addr = line
        .rsplit("http on ")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (server, addr)
}

/// `sensord stats --db DB --json` (which must succeed), parsed.
pub fn stats_json(db: &Path) -> serde_json::Value {
    let out = run(
        &["stats", "--db", db.to_str().unwrap(), "--json"],
        db.parent().unwrap(),
    );
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}
