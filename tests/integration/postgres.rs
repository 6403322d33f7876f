//! The PostgreSQL sink against a real PostgreSQL 15 that the tests start
//! themselves (or the server `SENSORD_TEST_PG_URL` names): what is sent is
//! stored, instances share a database, faults lose nothing.
//!
//! One cluster is shared by the tests, each in its own database; tests that
//! stop or hang the server start a cluster of their own. Without the server
//! binaries the tests are skipped, except in CI (`CI=true`), where they fail.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::postgres::{Client, NoTls};

use crate::util::*;

/// A PostgreSQL server for the tests: a throwaway cluster, or an external one.
struct Cluster {
    /// The URL without a database name, e.g. `postgres://postgres@127.0.0.1:5432`.
    base: String,
    /// Set for a throwaway cluster; an external server is never stopped.
    local: Option<LocalCluster>,
}

/// A cluster in a temporary folder, run by the `postgres` user when the
/// tests run as root (initdb and postgres refuse to run as root).
struct LocalCluster {
    /// Holds the data folder, the unix socket and the server log.
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl LocalCluster {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs `pg_ctl ARGS` on this cluster and checks it succeeded.
    fn pg_ctl(&self, args: &[&str]) {
        let data = self.data();
        let log = self.dir.path().join("server.log");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let mut full = vec!["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap()];
        full.extend(["-w", "-t", "60", "-o", &options]);
        full.extend(args);
        run_as_postgres(&self.bin.join("pg_ctl"), &full, self.dir.path());
    }

    fn start(&self) {
        self.pg_ctl(&["start"]);
    }

    fn stop(&self) {
        self.pg_ctl(&["-m", "fast", "stop"]);
    }

    /// The postmaster's process id, from its pid file.
    fn postmaster_pid(&self) -> i32 {
        let text = std::fs::read_to_string(self.data().join("postmaster.pid")).unwrap();
        text.lines().next().unwrap().trim().parse().unwrap()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = self.pg_ctl_quiet(&["-m", "immediate", "stop"]);
        }
    }
}

impl LocalCluster {
    /// `pg_ctl` whose failure is not a test failure (cleanup).
    fn pg_ctl_quiet(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        let data = self.data();
        let mut full = vec!["-D", data.to_str().unwrap(), "-w", "-t", "30"];
        full.extend(args);
        as_postgres(&self.bin.join("pg_ctl"), &full, self.dir.path()).output()
    }
}

/// A command that runs `program ARGS` as the `postgres` user if we are root.
fn as_postgres(program: &Path, args: &[&str], cwd: &Path) -> Command {
    // SAFETY: geteuid has no preconditions.
    let mut command = if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    command.args(args).current_dir(cwd);
    command
}

fn run_as_postgres(program: &Path, args: &[&str], cwd: &Path) {
    let out = as_postgres(program, args, cwd)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The folder holding `initdb`, `pg_ctl` and `postgres`: PATH first, then
/// Debian's versioned folders.
fn server_bin_dir() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut candidates: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev());
    }
    candidates.into_iter().find(|dir| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| dir.join(b).is_file())
    })
}

/// A free loopback TCP port (free when asked; nothing else races us here).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    /// A fresh throwaway cluster, started. Missing server binaries fail
    /// the test: a test that skips did not run (scripts/test.sh installs
    /// them).
    fn start_local() -> Option<Cluster> {
        let Some(bin) = server_bin_dir() else {
            panic!(
                "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; run the \
                 tests with scripts/test.sh, which installs them"
            );
        };
        // /tmp keeps the socket path short (unix socket paths are limited
        // to 107 bytes); 0777 lets the postgres user write there.
        let dir = tempfile::Builder::new()
            .prefix("sensord-pg-")
            .tempdir_in("/tmp")
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let cluster = LocalCluster {
            dir,
            bin,
            port: free_port(),
        };
        let data = cluster.data();
        run_as_postgres(
            &cluster.bin.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            cluster.dir.path(),
        );
        cluster.start();
        Some(Cluster {
            base: format!("postgres://postgres@127.0.0.1:{}", cluster.port),
            local: Some(cluster),
        })
    }

    /// The external server, if `SENSORD_TEST_PG_URL` names one.
    fn external() -> Option<Cluster> {
        let url = std::env::var("SENSORD_TEST_PG_URL").ok()?;
        // Keep scheme and authority; each test picks its own database.
        let after_scheme = url.find("://").map_or(0, |i| i + 3);
        let end = url[after_scheme..]
            .find(['/', '?'])
            .map_or(url.len(), |i| after_scheme + i);
        Some(Cluster {
            base: url[..end].to_string(),
            local: None,
        })
    }

    /// A URL for database `name`, created empty (dropped first if present).
    fn database(&self, name: &str) -> String {
        let name = format!("sensord_test_{name}_{}", std::process::id());
        let mut admin = connect(&format!("{}/postgres", self.base));
        // Each alone: neither may run in a transaction block.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        format!("{}/{name}", self.base)
    }

    fn local(&self) -> &LocalCluster {
        self.local.as_ref().expect("a throwaway cluster")
    }
}

/// The shared cluster, started on first use and stopped at process exit
/// (statics are never dropped, hence `atexit`).
fn shared() -> Option<&'static Cluster> {
    static SHARED: OnceLock<Option<Cluster>> = OnceLock::new();
    static STOP: Mutex<Option<LocalCluster>> = Mutex::new(None);
    extern "C" fn stop_shared() {
        // Dropping the cluster stops the server and removes its folder.
        if let Ok(mut slot) = STOP.lock() {
            slot.take();
        }
    }
    SHARED
        .get_or_init(|| {
            if let Some(external) = Cluster::external() {
                return Some(external);
            }
            let mut cluster = Cluster::start_local()?;
            let base = cluster.base.clone();
            *STOP.lock().unwrap() = cluster.local.take();
            // SAFETY: registers a plain function with no arguments.
            unsafe { libc::atexit(stop_shared) };
            cluster.base = base;
            Some(cluster)
        })
        .as_ref()
}

/// A cluster of the test's own, for tests that stop or hang the server;
/// None (skip) with an external server or without the binaries.
fn own_cluster() -> Option<Cluster> {
    if std::env::var_os("SENSORD_TEST_PG_URL").is_some() {
        eprintln!(
            "skipping PostgreSQL test: it stops the server, so it needs a cluster of its own"
        );
        return None;
    }
    Cluster::start_local()
}

fn connect(url: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Client::connect(url, NoTls) {
            Ok(client) => return client,
            Err(e) if Instant::now() > deadline => panic!("cannot connect to {url}: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Waits (up to 30 s) until the table holds `n` rows.
fn wait_for_rows(url: &str, n: u64, server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = connect(url);
    loop {
        let count = client
            .query_one("SELECT COUNT(*) FROM sensor_measurements", &[])
            .map(|row| row.get::<_, i64>(0) as u64);
        if count.as_ref().is_ok_and(|c| *c >= n) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "rows stayed at {count:?} < {n}; log:\n{}",
                server.log_text()
            );
        }
        if count.is_err() {
            client = connect(url);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Rows and distinct `ingested_at` values: equal when nothing was written twice
/// (every test reading has its own `ingested_at`).
fn rows_and_distinct(url: &str) -> (u64, u64) {
    let row = connect(url)
        .query_one(
            "SELECT COUNT(*), COUNT(DISTINCT ingested_at) FROM sensor_measurements",
            &[],
        )
        .unwrap();
    (row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64)
}

fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_micros() as i64
}

/// `precise_readings` uses `ingested_at = 1764150000.{i:06}`: its exact
/// microseconds.
fn sent_micros(i: usize) -> i64 {
    1_764_150_000_000_000 + i as i64
}

/// N readings sent, SIGTERM: N rows with values bit-exact and timestamps
/// exact to the microsecond.
#[test]
fn pg_sigterm_stores_every_reading_exactly() {
    let Some(cluster) = shared() else { return };
    let url = cluster.database("exact");
    let scratch = Scratch::new();
    let before = SystemTime::now();
    let mut server = Server::start(scratch.path(), &["--db", &url]);
    let sent = precise_readings(2000);
    send_datagrams(server.addr, sent.iter().map(|s| s.text.as_bytes()));
    let status = server.stop_with(libc::SIGTERM, EXIT);
    let after = SystemTime::now();
    assert!(
        status.success(),
        "exit {status}; log:\n{}",
        server.log_text()
    );
    assert_eq!(server.shutdown_counts()["persisted"], 2000);

    let rows = connect(&url)
        .query(
            "SELECT sensor_id, temperature, humidity, ingested_at, received_at
             FROM sensor_measurements ORDER BY ingested_at",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), sent.len());
    for (i, (row, want)) in rows.iter().zip(&sent).enumerate() {
        assert_eq!(row.get::<_, i64>(0), want.sensor_id, "{}", want.text);
        assert_eq!(
            row.get::<_, f64>(1).to_bits(),
            want.temperature.to_bits(),
            "{}",
            want.text
        );
        assert_eq!(
            row.get::<_, f64>(2).to_bits(),
            want.humidity.to_bits(),
            "{}",
            want.text
        );
        assert_eq!(micros(row.get(3)), sent_micros(i), "{}", want.text);
        let received: SystemTime = row.get(4);
        assert!(
            micros(before) - 1 <= micros(received) && micros(received) <= micros(after) + 1,
            "received_at is the receive time"
        );
    }
}

/// Two servers started together on one new database: the schema is
/// created once, and the row count is the sum of what each stored.
#[test]
fn pg_two_servers_share_one_database() {
    let Some(cluster) = shared() else { return };
    let url = cluster.database("shared");
    let scratch = Scratch::new();
    // One folder, one table: each instance needs a spill path of its own.
    let starts: Vec<_> = (0..2)
        .map(|i| {
            let (dir, url) = (scratch.path().to_path_buf(), url.clone());
            let spill = format!("instance{i}.spill.jsonl");
            thread::spawn(move || Server::start(&dir, &["--db", &url, "--spill", &spill]))
        })
        .collect();
    let mut servers: Vec<Server> = starts.into_iter().map(|h| h.join().unwrap()).collect();
    let creators = servers
        .iter()
        .filter(|s| s.log_text().contains("created table sensor_measurements"))
        .count();
    assert_eq!(creators, 1, "exactly one instance creates the schema");

    let sent = precise_readings(3000);
    send_datagrams(
        servers[0].addr,
        sent[..1000].iter().map(|s| s.text.as_bytes()),
    );
    send_datagrams(
        servers[1].addr,
        sent[1000..].iter().map(|s| s.text.as_bytes()),
    );
    let mut persisted = 0;
    for server in &mut servers {
        persisted += server.stop_clean()["persisted"];
    }
    assert_eq!(persisted, 3000);
    assert_eq!(rows_and_distinct(&url), (3000, 3000));
    let indexes = connect(&url)
        .query_one(
            "SELECT COUNT(*) FROM pg_indexes WHERE tablename = 'sensor_measurements'",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(indexes, 1);
}

/// Terminating sensord's backend mid-run loses nothing and duplicates nothing.
#[test]
fn pg_terminated_backend_loses_nothing() {
    let Some(cluster) = shared() else { return };
    let url = cluster.database("terminate");
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", &url, "--flush-interval", "20ms"]);
    let sent = precise_readings(2000);
    send_datagrams(server.addr, sent[..1000].iter().map(|s| s.text.as_bytes()));
    wait_for_rows(&url, 1000, &server);
    let terminated = connect(&url)
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'sensord' AND datname = current_database()",
            &[],
        )
        .unwrap()
        .len();
    assert_eq!(terminated, 1, "sensord holds one connection");
    send_datagrams(server.addr, sent[1000..].iter().map(|s| s.text.as_bytes()));
    wait_for_rows(&url, 2000, &server);
    assert_eq!(server.stop_clean()["persisted"], 2000);
    assert_eq!(rows_and_distinct(&url), (2000, 2000));
}

/// The server restarting mid-run, with readings arriving while it is down,
/// loses nothing and duplicates nothing.
#[test]
fn pg_server_restart_loses_nothing() {
    let Some(cluster) = own_cluster() else { return };
    let url = cluster.database("restart");
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", &url, "--flush-interval", "20ms"]);
    let sent = precise_readings(3000);
    send_datagrams(server.addr, sent[..1000].iter().map(|s| s.text.as_bytes()));
    wait_for_rows(&url, 1000, &server);
    cluster.local().pg_ctl(&["-m", "fast", "restart"]);
    send_datagrams(
        server.addr,
        sent[1000..2000].iter().map(|s| s.text.as_bytes()),
    );
    wait_for_rows(&url, 2000, &server);
    cluster.local().stop();
    send_datagrams(server.addr, sent[2000..].iter().map(|s| s.text.as_bytes()));
    server.wait_for_line("retrying in", Duration::from_secs(10));
    cluster.local().start();
    wait_for_rows(&url, 3000, &server);
    assert_eq!(server.stop_clean()["persisted"], 3000);
    assert_eq!(rows_and_distinct(&url), (3000, 3000));
}

/// PostgreSQL stopped through shutdown: the readings go to
/// `sensord.spill.jsonl` in the working folder and the exit is 1; the next
/// start, with the server back, replays them.
#[test]
fn pg_down_at_shutdown_spills_then_replays() {
    let Some(cluster) = own_cluster() else { return };
    let url = cluster.database("spill");
    let scratch = Scratch::new();
    let mut server = start_holding(scratch.path(), &url);
    let sent = precise_readings(500);
    send_datagrams(server.addr, sent.iter().map(|s| s.text.as_bytes()));
    server.wait_for_accepted(500, Duration::from_secs(20));
    cluster.local().stop();
    let status = server.stop_with(libc::SIGTERM, EXIT);
    assert_eq!(status.code(), Some(1), "log:\n{}", server.log_text());
    assert_eq!(server.shutdown_counts()["spilled"], 500);
    let spill = only_spill_file(scratch.path());
    assert_eq!(spill_readings(&spill), 500);

    cluster.local().start();
    let mut server = Server::start(scratch.path(), &["--db", &url]);
    server.wait_for_line("replayed 500 readings", Duration::from_secs(5));
    assert!(!spill.exists(), "the spill file is removed after replay");
    server.stop_clean();
    assert_eq!(rows_and_distinct(&url), (500, 500));
}

/// With the server hung (it accepts connections but never answers), a
/// second signal gets sensord out within 3 s: the final flush gives up
/// connecting, and the readings are spilled.
#[test]
fn pg_hung_server_second_signal_exits_quickly() {
    let Some(cluster) = own_cluster() else { return };
    let url = cluster.database("hung");
    let scratch = Scratch::new();
    let mut server = start_holding(scratch.path(), &url);
    send_datagrams(
        server.addr,
        precise_readings(300).iter().map(|s| s.text.as_bytes()),
    );
    server.wait_for_accepted(300, Duration::from_secs(20));
    // Its connection gone and the postmaster frozen, sensord's final flush
    // must reconnect, and the connect hangs.
    connect(&url)
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'sensord' AND datname = current_database()",
            &[],
        )
        .unwrap();
    let postmaster = cluster.local().postmaster_pid();
    signal(postmaster as u32, libc::SIGSTOP);
    signal(server.pid(), libc::SIGTERM);
    server.wait_for_line("stopping:", Duration::from_secs(5));
    thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let status = server.stop_with(libc::SIGTERM, Duration::from_secs(10));
    let took = started.elapsed();
    signal(postmaster as u32, libc::SIGCONT);
    assert!(
        took < Duration::from_secs(3),
        "took {took:?}; log:\n{}",
        server.log_text()
    );
    assert_eq!(status.code(), Some(1), "log:\n{}", server.log_text());
    assert_eq!(server.shutdown_counts()["spilled"], 300);
    assert!(
        server.log_text().contains("interrupted while connecting"),
        "the store gave up its connect; log:\n{}",
        server.log_text()
    );
}

/// `stats --db URL`, human and JSON, agrees with the table, and the
/// password in the URL appears in no output.
#[test]
fn pg_stats_agree_with_the_table() {
    let Some(cluster) = shared() else { return };
    let url = cluster.database("stats");
    let scratch = Scratch::new();
    // Authentication is `trust`, so any password works; it must never show.
    let secret_url = url.replacen("postgres@", "postgres:hunter2@", 1);
    let mut server = Server::start(scratch.path(), &["--db", &secret_url]);
    let sent = precise_readings(1000);
    send_datagrams(server.addr, sent.iter().map(|s| s.text.as_bytes()));
    assert!(server.stop_with(libc::SIGTERM, EXIT).success());
    assert!(
        !server.log_text().contains("hunter2"),
        "log:\n{}",
        server.log_text()
    );

    let out = run(&["stats", "--db", &secret_url, "--json"], scratch.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut client = connect(&url);
    let totals = client
        .query_one(
            "SELECT COUNT(*), COUNT(DISTINCT sensor_id),
                    EXTRACT(EPOCH FROM MIN(ingested_at))::float8,
                    EXTRACT(EPOCH FROM MAX(ingested_at))::float8
             FROM sensor_measurements",
            &[],
        )
        .unwrap();
    assert_eq!(json["readings"], totals.get::<_, i64>(0));
    assert_eq!(json["sensors"], totals.get::<_, i64>(1));
    assert_eq!(json["first_ingested_at"], totals.get::<_, f64>(2));
    assert_eq!(json["last_ingested_at"], totals.get::<_, f64>(3));
    let per_sensor = client
        .query(
            "SELECT sensor_id, COUNT(*), MIN(temperature), MAX(temperature),
                    MIN(humidity), MAX(humidity), AVG(temperature)
             FROM sensor_measurements GROUP BY sensor_id ORDER BY sensor_id",
            &[],
        )
        .unwrap();
    let listed = json["per_sensor"].as_array().unwrap();
    assert_eq!(listed.len(), per_sensor.len());
    for (entry, row) in listed.iter().zip(&per_sensor) {
        assert_eq!(entry["sensor_id"], row.get::<_, i64>(0));
        assert_eq!(entry["readings"], row.get::<_, i64>(1));
        assert_eq!(entry["temperature"]["min"], row.get::<_, f64>(2));
        assert_eq!(entry["temperature"]["max"], row.get::<_, f64>(3));
        assert_eq!(entry["humidity"]["min"], row.get::<_, f64>(4));
        assert_eq!(entry["humidity"]["max"], row.get::<_, f64>(5));
        let avg = entry["temperature"]["avg"].as_f64().unwrap();
        assert!((avg - row.get::<_, f64>(6)).abs() < 1e-9);
    }

    let out = run(&["stats", "--db", &secret_url], scratch.path());
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("readings: 1000\n"), "{text}");
    assert!(
        text.contains(&format!("sensors:  {}\n", per_sensor.len())),
        "{text}"
    );

    let missing = secret_url.replace("sensord_test_stats", "sensord_test_nosuchdb");
    let out = run(&["stats", "--db", &missing], scratch.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("cannot open database postgres://postgres:***@"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// A COMMIT whose answer is lost is not written twice: the retry finds its
/// batch id and stops.
#[cfg(feature = "failpoints")]
#[test]
fn pg_commit_with_lost_answer_is_not_written_twice() {
    let Some(cluster) = shared() else { return };
    let url = cluster.database("lostcommit");
    let scratch = Scratch::new();
    let mut server = Server::start_with_env(
        scratch.path(),
        &["--db", &url, "--flush-interval", "20ms"],
        &[("FAILPOINTS", "postgres::after_commit=1*return")],
    );
    let sent = precise_readings(500);
    send_datagrams(server.addr, sent.iter().map(|s| s.text.as_bytes()));
    server.wait_for_line("committed by an earlier attempt", Duration::from_secs(20));
    assert_eq!(server.stop_clean()["persisted"], 500);
    assert_eq!(rows_and_distinct(&url), (500, 500));
}

/// The one spill file (`*.spill.jsonl`) in `dir`.
fn only_spill_file(dir: &Path) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".spill.jsonl"))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "spill files in {}: {found:?}",
        dir.display()
    );
    found.into_iter().next().unwrap()
}
