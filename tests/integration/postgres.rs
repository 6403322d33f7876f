//! The PostgreSQL sink against a real PostgreSQL 15 that the tests start
//! themselves (or the server `SENSORD_TEST_PG_URL` names): what is sent is
//! stored, instances share a database, faults lose nothing.
//!
//! One cluster is shared by the tests, each in its own database; tests that
//! stop or hang the server start a cluster of their own. Without the server
//! binaries the tests are skipped, except in CI (`CI=true`), where they fail.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
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
    /// A throwaway cluster's TLS files; an external server has none.
    tls: Option<TlsFiles>,
    /// The port, for URLs the tests build themselves.
    port: u16,
}

/// The certificates of a throwaway cluster, which runs with `ssl=on` (and
/// still takes plain connections): a CA, and a server certificate for
/// `localhost` it signed.
#[derive(Clone)]
struct TlsFiles {
    /// The CA that signed the server's certificate.
    ca: PathBuf,
    /// A CA that signed nothing the server has.
    wrong_ca: PathBuf,
}

/// Writes the cluster's certificates into `dir` and returns where they are;
/// the server's key is owned by the user the server runs as, 0600, as
/// PostgreSQL demands.
fn make_certificates(dir: &Path) -> (TlsFiles, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let ca = |name: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    };
    let (right, wrong) = (ca("sensord test CA"), ca("another CA"));
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &right)
        .unwrap();
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        wrong_ca: dir.join("wrong-ca.pem"),
    };
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&files.ca, right.pem()).unwrap();
    std::fs::write(&files.wrong_ca, wrong.pem()).unwrap();
    std::fs::write(&cert, server.pem()).unwrap();
    std::fs::write(&key, server_key.serialize_pem()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // SAFETY: geteuid has no preconditions; getpwnam gets a NUL-terminated
    // name and its result is read before any other call could reuse it.
    unsafe {
        if libc::geteuid() == 0 {
            let user = libc::getpwnam(c"postgres".as_ptr());
            assert!(!user.is_null(), "there is a postgres user");
            let c_key = std::ffi::CString::new(key.to_str().unwrap()).unwrap();
            assert_eq!(
                libc::chown(c_key.as_ptr(), (*user).pw_uid, (*user).pw_gid),
                0
            );
        }
    }
    (files, cert, key)
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
        // TLS on, plain connections still taken; `postgres` logs in
        // without a password, every other role with one.
        let (tls, cert, key) = make_certificates(cluster.dir.path());
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        use std::io::Write;
        writeln!(
            conf,
            "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'",
            cert.display(),
            key.display()
        )
        .unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host all postgres ::1/128 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n\
             host all all ::1/128 scram-sha-256\n",
        )
        .unwrap();
        cluster.start();
        Some(Cluster {
            base: format!("postgres://postgres@127.0.0.1:{}", cluster.port),
            port: cluster.port,
            local: Some(cluster),
            tls: Some(tls),
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
            tls: None,
            port: 0,
        })
    }

    /// A URL for database `name`, created empty (dropped first if present).
    fn database(&self, name: &str) -> String {
        format!("{}/{}", self.base, self.database_name(name))
    }

    /// Creates database `name` empty (dropped first if present) and returns
    /// its full name.
    fn database_name(&self, name: &str) -> String {
        let name = format!("sensord_test_{name}_{}", std::process::id());
        let mut admin = connect(&format!("{}/postgres", self.base));
        // Each alone: neither may run in a transaction block.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        name
    }

    /// The URL of database `name` (a full name, from `database_name`).
    fn database_url(&self, name: &str) -> String {
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
        stderr.contains("cannot open database postgres://postgres@127.0.0.1:"),
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

/// Runs `sensord ARGS` to completion with extra environment variables, with
/// a deadline.
fn run_env(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the test binary runs");
    wait_child(&mut child, Duration::from_secs(60));
    child.wait_with_output().unwrap()
}

/// Waits for `child` to exit, killing it and failing after `timeout`;
/// returns how long it took.
fn wait_child(child: &mut Child, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return started.elapsed();
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            panic!("sensord did not exit within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// `sensord serve` on `db` with `--busy-timeout 2s`, expected to fail
/// start-up: returns its output and how long it took.
fn serve_failing(db: &str, cwd: &Path, extra: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let args = [
        &[
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--db",
            db,
            "--busy-timeout",
            "2s",
        ][..],
        extra,
    ]
    .concat();
    let out = run(&args, cwd);
    (out, started.elapsed())
}

/// The `error:` lines of an output's stderr.
fn error_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("error:"))
        .map(str::to_string)
        .collect()
}

/// Store settings for tests that drive the library directly.
fn store_options() -> sensord::store::Options {
    sensord::store::Options {
        busy_timeout: Duration::from_secs(5),
        table: sensord::store::DEFAULT_TABLE.to_string(),
        stop: None,
        password_file: None,
    }
}

/// Reading `i` of a test batch: distinct `ingested_at`, a sane temperature.
fn reading(i: usize, temperature: f64) -> sensord::Reading {
    sensord::Reading::from(sensord::reading::ReadingParts {
        sensor_id: sensord::reading::SensorId::Int((i % 7) as i64),
        temperature: Some(temperature),
        humidity: Some(0.5),
        ingested_at: 1_764_150_000.0 + i as f64 / 1000.0,
        received_at: 1_764_150_000.0,
        extra: None,
        seq: None,
        boot: None,
    })
}

fn row_count(url: &str) -> i64 {
    connect(url)
        .query_one("SELECT COUNT(*) FROM sensor_measurements", &[])
        .unwrap()
        .get(0)
}

/// Another session takes the measurements table with `ACCESS EXCLUSIVE`
/// and holds it until `COMMIT` is sent on the returned client.
fn lock_table(url: &str) -> Client {
    let mut locker = connect(url);
    locker
        .batch_execute("BEGIN; LOCK TABLE sensor_measurements IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    locker
}

/// The table locked by another session at start-up: `serve` fails within
/// the busy timeout with one clear line, and a SIGTERM during the wait
/// ends it within about a second.
#[test]
fn pg_locked_table_at_start_is_bounded_and_interruptible() {
    let Some(cluster) = shared() else { return };
    let url = cluster.database("lockedstart");
    let scratch = Scratch::new();
    drop(sensord::store::open(&url, &store_options()).unwrap());
    let mut locker = lock_table(&url);

    let (out, took) = serve_failing(&url, scratch.path(), &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(took < Duration::from_secs(6), "took {took:?}");
    // Which of lock_timeout and statement_timeout (both the busy timeout)
    // fires first is up to the server.
    let errors = error_lines(&out);
    let prefix = format!("error: cannot open database {url}: canceling statement due to ");
    assert!(
        errors.len() == 1
            && [
                &format!("{prefix}lock timeout"),
                &format!("{prefix}statement timeout")
            ]
            .contains(&&errors[0]),
        "{errors:?}"
    );

    let mut child = Command::new(bin())
        .args(["serve", "--bind", "127.0.0.1:0", "--db", &url])
        .args(["--busy-timeout", "30s"])
        .current_dir(scratch.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(700));
    signal(child.id(), libc::SIGTERM);
    let took = wait_child(&mut child, Duration::from_secs(10));
    let out = child.wait_with_output().unwrap();
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        error_lines(&out),
        [
            "error: stopped during start-up (opening the database); nothing was imported and \
          the spill file, if any, is kept"
        ]
    );
    locker.batch_execute("COMMIT").unwrap();
}

/// The table locked while sensord runs: a SIGTERM stops it within the busy
/// timeout and a few seconds (exit 1, readings spilled), and a restart
/// after the lock is gone stores every reading exactly once.
#[test]
fn pg_locked_table_at_stop_is_bounded_and_replayed() {
    let Some(cluster) = shared() else { return };
    let url = cluster.database("lockedstop");
    let scratch = Scratch::new();
    let args = [
        &["--db", &url, "--busy-timeout", "2s"][..],
        &HOLD_UNTIL_STOP,
    ]
    .concat();
    let mut server = Server::start(scratch.path(), &args);
    let sent = precise_readings(500);
    send_datagrams(server.addr, sent.iter().map(|s| s.text.as_bytes()));
    server.wait_for_accepted(500, Duration::from_secs(20));
    let mut locker = lock_table(&url);
    let started = Instant::now();
    let status = server.stop_with(libc::SIGTERM, EXIT);
    let took = started.elapsed();
    assert_eq!(status.code(), Some(1), "log:\n{}", server.log_text());
    assert!(
        took < Duration::from_secs(2 + 4),
        "took {took:?}; log:\n{}",
        server.log_text()
    );
    locker.batch_execute("COMMIT").unwrap();

    let mut server = Server::start(scratch.path(), &["--db", &url]);
    server.wait_for_line("replayed 500 readings", Duration::from_secs(10));
    server.stop_clean();
    assert_eq!(rows_and_distinct(&url), (500, 500));
}

/// A server that accepts TCP and never answers: start-up fails within the
/// busy timeout with one clear line, and a SIGTERM while waiting for it
/// ends start-up within about a second.
#[test]
fn pg_silent_server_fails_start_within_busy_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    // Holds what it accepts, answering nothing, for at most 30 s.
    let holder = thread::spawn(move || {
        let (mut held, deadline) = (Vec::new(), Instant::now() + Duration::from_secs(30));
        while Instant::now() < deadline && held.len() < 2 {
            match listener.accept() {
                Ok((stream, _)) => held.push(stream),
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
        held
    });
    let scratch = Scratch::new();
    let url = format!("postgres://nobody@127.0.0.1:{port}/x");
    let (out, took) = serve_failing(&url, scratch.path(), &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(took < Duration::from_secs(6), "took {took:?}");
    assert_eq!(
        error_lines(&out),
        [format!(
            "error: cannot open database {url}: no connection within 2s \
             (the server did not complete the handshake)"
        )]
    );

    let mut child = Command::new(bin())
        .args(["serve", "--bind", "127.0.0.1:0", "--db", &url])
        .args(["--busy-timeout", "30s"])
        .current_dir(scratch.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(700));
    signal(child.id(), libc::SIGTERM);
    let took = wait_child(&mut child, Duration::from_secs(10));
    let out = child.wait_with_output().unwrap();
    assert_eq!(holder.join().unwrap().len(), 2, "both runs connected");
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        error_lines(&out),
        [
            "error: stopped during start-up (opening the database); nothing was imported and \
          the spill file, if any, is kept"
        ]
    );
}

/// A password with `/`, `?` and `@`, percent-encoded in URLs.
const PASSWORD: &str = "s3/cr?et@pw";
const ENCODED: &str = "s3%2Fcr%3Fet%40pw";

/// Serve and stats with the right password (in the URL, in PGPASSWORD, in
/// --db-password-file), a wrong one, a stopped server and a missing
/// database: the right ones store and read the rows, the others fail with
/// their cause, and no line printed holds the password.
#[test]
fn pg_password_never_shown() {
    let Some(cluster) = shared() else { return };
    if cluster.tls.is_none() {
        eprintln!("skipping: needs the throwaway cluster's password rules");
        return;
    }
    let name = cluster.database_name("password");
    let role = format!("sensord_pw_{}", std::process::id());
    let mut admin = connect(&format!("{}/postgres", cluster.base));
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role};
             CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}';
             ALTER DATABASE {name} OWNER TO {role};"
        ))
        .unwrap();
    let port = cluster.port;
    let with = |password: &str, port: u16, db: &str| {
        format!("postgres://{role}{password}@127.0.0.1:{port}/{db}")
    };
    let right = with(&format!(":{ENCODED}"), port, &name);
    let bare = with("", port, &name);
    let scratch = Scratch::new();
    let password_file = scratch.path().join("password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let password_file = password_file.to_str().unwrap();
    let mut server = Server::start(scratch.path(), &["--db", &right]);
    send_datagrams(
        server.addr,
        precise_readings(100).iter().map(|s| s.text.as_bytes()),
    );
    assert_eq!(server.stop_clean()["persisted"], 100);
    let mut printed: Vec<String> = server.log.lock().unwrap().clone();
    let mut keep = |out: &Output| {
        printed.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(String::from),
        );
        printed.extend(
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .map(String::from),
        );
    };

    assert_eq!(row_count(&cluster.database_url(&name)), 100);

    for (args, env) in [
        (vec!["stats", "--db", &right], vec![]),
        (vec!["stats", "--db", &bare], vec![("PGPASSWORD", PASSWORD)]),
        (
            vec!["stats", "--db", &bare, "--db-password-file", password_file],
            vec![],
        ),
    ] {
        let out = run_env(&args, scratch.path(), &env);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("readings: 100\n"));
        keep(&out);
    }

    let wrong = with(":wrong%2Fpw", port, &name);
    let stopped = with(&format!(":{ENCODED}"), free_port(), &name);
    let missing = with(&format!(":{ENCODED}"), port, "sensord_no_such_db");
    let no_file = scratch.path().join("no-such-file");
    let no_file = no_file.to_str().unwrap();
    for (db, extra, cause) in [
        (&wrong, &[][..], "password authentication failed"),
        (&stopped, &[][..], "Connection refused"),
        (
            &missing,
            &[][..],
            "database \"sensord_no_such_db\" does not exist",
        ),
        (
            &bare,
            &["--db-password-file", no_file][..],
            "cannot read --db-password-file",
        ),
    ] {
        let (out, _) = serve_failing(db, scratch.path(), extra);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let errors = error_lines(&out);
        assert_eq!(errors.len(), 1, "{out:?}");
        assert!(errors[0].contains(cause), "{errors:?}");
        keep(&out);
        let out = run(
            &[&["stats", "--db", db][..], extra].concat(),
            scratch.path(),
        );
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(error_lines(&out)[0].contains(cause), "{out:?}");
        keep(&out);
    }
    for line in &printed {
        for secret in [PASSWORD, ENCODED, "wrong/pw", "wrong%2Fpw"] {
            assert!(!line.contains(secret), "printed {line:?}");
        }
    }
}

/// `sslmode=require`: sensord's connection is encrypted and the rows land.
#[test]
fn pg_tls_require_stores_rows() {
    let Some(cluster) = shared() else { return };
    if cluster.tls.is_none() {
        eprintln!("skipping: needs the throwaway cluster's certificates");
        return;
    }
    let url = cluster.database("tlsrequire");
    let scratch = Scratch::new();
    let tls_url = format!("{url}?sslmode=require");
    let args = ["--db", &tls_url, "--flush-interval", "20ms"];
    let mut server = Server::start(scratch.path(), &args);
    send_datagrams(
        server.addr,
        precise_readings(200).iter().map(|s| s.text.as_bytes()),
    );
    wait_for_rows(&url, 200, &server);
    let encrypted: Vec<bool> = connect(&url)
        .query(
            "SELECT ssl FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
             WHERE application_name = 'sensord' AND datname = current_database()",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(encrypted, [true]);
    assert_eq!(server.stop_clean()["persisted"], 200);
    assert_eq!(rows_and_distinct(&url), (200, 200));
}

/// `sslmode=verify-full` with the CA that signed the server's certificate
/// and `host=localhost` stores rows; with another CA, start-up fails with
/// one clear line.
#[test]
fn pg_tls_verify_full_checks_the_certificate() {
    let Some(cluster) = shared() else { return };
    let Some(tls) = cluster.tls.clone() else {
        eprintln!("skipping: needs the throwaway cluster's certificates");
        return;
    };
    let name = cluster.database_name("tlsverify");
    let verify = |ca: &Path| {
        format!(
            "postgres://postgres@localhost:{}/{name}?sslmode=verify-full&sslrootcert={}",
            cluster.port,
            ca.display()
        )
    };
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", &verify(&tls.ca)]);
    send_datagrams(
        server.addr,
        precise_readings(200).iter().map(|s| s.text.as_bytes()),
    );
    assert_eq!(server.stop_clean()["persisted"], 200);
    assert_eq!(rows_and_distinct(&cluster.database_url(&name)), (200, 200));

    let (out, _) = serve_failing(&verify(&tls.wrong_ca), scratch.path(), &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let errors = error_lines(&out);
    assert_eq!(errors.len(), 1, "{out:?}");
    assert!(
        errors[0].starts_with(&format!(
            "error: cannot open database postgres://postgres@localhost:{}/{name}: ",
            cluster.port
        )) && errors[0].contains("invalid peer certificate"),
        "{errors:?}"
    );
}

/// An existing table whose columns differ is refused at start, naming the
/// column; an extra column with a default is accepted.
#[test]
fn pg_mismatched_table_is_refused_at_start() {
    let Some(cluster) = shared() else { return };
    let url = cluster.database("mismatch");
    let scratch = Scratch::new();
    let columns = |temperature: &str, extra: &str| {
        format!(
            "DROP TABLE IF EXISTS sensor_measurements;
             CREATE TABLE sensor_measurements (
                 sensor_id bigint NOT NULL, temperature {temperature} NOT NULL,
                 humidity double precision NOT NULL, ingested_at timestamptz NOT NULL,
                 received_at timestamptz NOT NULL {extra})"
        )
    };
    connect(&url).batch_execute(&columns("text", "")).unwrap();
    let (out, _) = serve_failing(&url, scratch.path(), &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        error_lines(&out),
        [format!(
            "error: cannot open database {url}: table sensor_measurements: \
             column temperature is text, expected double precision"
        )]
    );

    let extra = ", site text NOT NULL DEFAULT 'here'";
    connect(&url)
        .batch_execute(&columns("double precision", extra))
        .unwrap();
    let mut server = Server::start(scratch.path(), &["--db", &url]);
    send_datagrams(
        server.addr,
        precise_readings(10).iter().map(|s| s.text.as_bytes()),
    );
    assert_eq!(server.stop_clean()["persisted"], 10);
    assert_eq!(rows_and_distinct(&url), (10, 10));
}

/// Two readings at f64::MAX overflow a float8 average; `stats` still
/// answers, with the exact average.
#[test]
fn pg_stats_survive_float8_overflow() {
    let Some(cluster) = shared() else { return };
    let url = cluster.database("overflow");
    let scratch = Scratch::new();
    let mut store = sensord::store::open(&url, &store_options()).unwrap();
    let readings = [reading(1, f64::MAX), reading(8, f64::MAX)];
    let id = sensord::store::BatchId { run: 1, seq: 1 };
    assert!(store.write_batch(id, &readings, &[]).unwrap().is_empty());
    let out = run(&["stats", "--db", &url, "--json"], scratch.path());
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["readings"], 2);
    assert_eq!(
        json["per_sensor"][0]["temperature"]["avg"].as_f64(),
        Some(f64::MAX)
    );
}

/// 1000 readings of which 3 break a CHECK constraint: 997 stored, 3
/// refused with the server's message; the same batch id again writes
/// nothing.
#[test]
fn pg_poisoned_readings_are_refused_and_the_rest_commit() {
    let Some(cluster) = shared() else { return };
    let url = cluster.database("poison");
    let mut store = sensord::store::open(&url, &store_options()).unwrap();
    connect(&url)
        .batch_execute(
            "ALTER TABLE sensor_measurements
             ADD CONSTRAINT sane_temperature CHECK (temperature < 1000)",
        )
        .unwrap();
    let poisoned = [0, 500, 999];
    let readings: Vec<_> = (0..1000)
        .map(|i| reading(i, if poisoned.contains(&i) { 5000.0 } else { 20.0 }))
        .collect();
    let id = sensord::store::BatchId { run: 7, seq: 1 };
    let refused = store.write_batch(id, &readings, &[]).unwrap();
    let refused_readings: Vec<_> = refused.iter().map(|r| r.reading.clone()).collect();
    let expected: Vec<_> = poisoned.iter().map(|&i| readings[i].clone()).collect();
    assert_eq!(refused_readings, expected);
    for refusal in &refused {
        assert_eq!(
            refusal.cause,
            "new row for relation \"sensor_measurements\" violates check constraint \
             \"sane_temperature\""
        );
    }
    assert_eq!(rows_and_distinct(&url), (997, 997));
    assert!(store.write_batch(id, &readings, &[]).unwrap().is_empty());
    assert_eq!(rows_and_distinct(&url), (997, 997));
}

/// A spill import of three batches: one whose id already committed
/// (skipped), one with 2 poisoned readings (refused, the rest stored), one
/// without an id (stored); importing the same key again writes nothing.
#[test]
fn pg_spill_import_skips_committed_batches_and_refuses_poison() {
    let Some(cluster) = shared() else { return };
    let url = cluster.database("spillpoison");
    let mut store = sensord::store::open(&url, &store_options()).unwrap();
    connect(&url)
        .batch_execute(
            "ALTER TABLE sensor_measurements
             ADD CONSTRAINT sane_temperature CHECK (temperature < 1000)",
        )
        .unwrap();
    let readings: Vec<_> = (0..250)
        .map(|i| reading(i, if i == 130 || i == 170 { 5000.0 } else { 20.0 }))
        .collect();
    let (committed, in_doubt) = (
        sensord::store::BatchId { run: 9, seq: 1 },
        sensord::store::BatchId { run: 9, seq: 2 },
    );
    assert!(
        store
            .write_batch(committed, &readings[..100], &[])
            .unwrap()
            .is_empty()
    );
    let batches = [
        sensord::store::SpillBatch {
            id: Some(committed),
            readings: readings[..100].to_vec(),
        },
        sensord::store::SpillBatch {
            id: Some(in_doubt),
            readings: readings[100..200].to_vec(),
        },
        sensord::store::SpillBatch {
            id: None,
            readings: readings[200..].to_vec(),
        },
    ];
    let imported = store.import_spill("key-1", &batches, &[]).unwrap().unwrap();
    assert_eq!((imported.stored, imported.skipped), (148, 100));
    let refused: Vec<_> = imported.refused.iter().map(|r| r.reading.clone()).collect();
    assert_eq!(refused, [readings[130].clone(), readings[170].clone()]);
    assert_eq!(rows_and_distinct(&url), (248, 248));
    assert_eq!(store.import_spill("key-1", &batches, &[]).unwrap(), None);
    assert_eq!(
        store.import_spill("key-2", &batches[..2], &[]).unwrap(),
        Some(sensord::store::Imported {
            stored: 0,
            skipped: 200,
            refused: Vec::new()
        })
    );
    assert_eq!(rows_and_distinct(&url), (248, 248));
}

/// Pruning old batch ids keeps each run's newest 17, the ids a late spill
/// replay of that run can name.
#[test]
fn pg_pruning_keeps_each_runs_newest_batch_ids() {
    let Some(cluster) = shared() else { return };
    let url = cluster.database("prune");
    drop(sensord::store::open(&url, &store_options()).unwrap());
    connect(&url)
        .batch_execute(
            "INSERT INTO sensord_batches (run, seq, committed_at)
             SELECT 3, seq, now() - interval '30 days' FROM generate_series(1, 40) seq",
        )
        .unwrap();
    drop(sensord::store::open(&url, &store_options()).unwrap());
    let kept: Vec<i64> = connect(&url)
        .query(
            "SELECT seq FROM sensord_batches WHERE run = 3 ORDER BY seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(kept, (24..=40).collect::<Vec<i64>>());
}

/// The final flush's COMMIT reaches PostgreSQL but its answer is lost: the
/// readings are spilled under their batch id, and the next start, finding
/// that id committed, does not store them again.
#[cfg(feature = "failpoints")]
#[test]
fn pg_in_doubt_final_commit_is_not_replayed_twice() {
    let Some(cluster) = shared() else { return };
    let url = cluster.database("indoubt");
    let scratch = Scratch::new();
    let args = [&["--db", &url][..], &HOLD_UNTIL_STOP].concat();
    let mut server = Server::start_with_env(
        scratch.path(),
        &args,
        &[("FAILPOINTS", "postgres::after_commit=return")],
    );
    let sent = precise_readings(2000);
    send_datagrams(server.addr, sent.iter().map(|s| s.text.as_bytes()));
    server.wait_for_accepted(2000, EXIT);
    let status = server.stop_with(libc::SIGTERM, EXIT);
    assert_eq!(status.code(), Some(1), "log:\n{}", server.log_text());
    assert_eq!(server.shutdown_counts()["spilled"], 2000);
    assert_eq!(rows_and_distinct(&url), (2000, 2000), "the COMMIT landed");
    let spill = only_spill_file(scratch.path());
    assert_eq!(spill_readings(&spill), 2000);

    let mut server = Server::start(scratch.path(), &["--db", &url]);
    server.wait_for_line("replayed 0 readings", EXIT);
    server.wait_for_line("2000 were committed before", EXIT);
    assert!(!spill.exists(), "the spill file is removed after replay");
    server.stop_clean();
    assert_eq!(rows_and_distinct(&url), (2000, 2000));
}

/// A CHECK constraint that three readings break: they go to the
/// dead-letter file with the server's message, the other readings commit
/// at once, and ingest goes on.
#[test]
fn pg_poison_readings_go_to_the_dead_letter_file() {
    let Some(cluster) = shared() else { return };
    let url = cluster.database("poison_e2e");
    let scratch = Scratch::new();
    let mut server = Server::start(
        scratch.path(),
        &[
            "--db",
            &url,
            "--flush-interval",
            "20ms",
            "--stats-interval",
            "50ms",
        ],
    );
    connect(&url)
        .batch_execute(
            "ALTER TABLE sensor_measurements ADD CONSTRAINT plausible CHECK (temperature < 1000)",
        )
        .unwrap();
    let datagram = |i: u64| {
        let temperature = if i < 1500 && i % 500 == 7 {
            5000.0
        } else {
            21.5
        };
        format!(r#"{{"sensor_id": {i}, "temperature": {temperature}, "humidity": 1.0}}"#)
    };
    send_datagrams(server.addr, (0..1500).map(datagram));
    server.wait_for_count("dead_letter", 3, EXIT);
    wait_for_rows(&url, 1497, &server);
    // Ingest goes on after the poison.
    send_datagrams(server.addr, (1500..1600).map(datagram));
    wait_for_rows(&url, 1597, &server);
    let counts = server.stop_clean();
    assert_eq!(
        (
            counts["accepted"],
            counts["persisted"],
            counts["dead_letter"]
        ),
        (1600, 1597, 3),
        "{counts:?}"
    );
    let dead = only_file_ending(scratch.path(), ".dead.jsonl");
    let lines = std::fs::read_to_string(&dead).unwrap();
    assert_eq!(lines.lines().count(), 3, "{lines}");
    assert!(lines.contains("plausible"), "{lines}");
    assert!(lines.contains(r#""temperature":5000.0"#), "{lines}");
}

/// The one file in `dir` whose name ends in `suffix`.
fn only_file_ending(dir: &Path, suffix: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{suffix} files in {}: {found:?}",
        dir.display()
    );
    found.into_iter().next().unwrap()
}

/// Every datagram of the real-sensor corpus, under its unit, gives exactly
/// its rows in PostgreSQL: values bit-exact, times exact to the
/// microsecond, names as sent, extras as jsonb; every reading not stored
/// is counted as rejected.
#[test]
fn pg_stores_what_real_sensors_send() {
    let Some(cluster) = shared() else { return };
    for run in crate::sensors::corpus() {
        let url = cluster.database(&format!("corpus_{}", run.unit));
        let scratch = Scratch::new();
        let mut server = Server::start(
            scratch.path(),
            &["--db", &url, "--timestamp-unit", run.unit],
        );
        send_datagrams(server.addr, &run.datagrams);
        let counts = server.stop_clean();
        assert_eq!(counts["accepted"], run.rows.len() as u64, "{}", run.unit);
        assert_eq!(counts["rejected"], run.rejected, "{}", run.unit);
        assert_eq!(counts["persisted"], run.rows.len() as u64, "{}", run.unit);
        let rows = connect(&url)
            .query(
                "SELECT COALESCE(n.name, m.sensor_id::text), m.temperature, m.humidity,
                        m.ingested_at, m.extra::text
                 FROM sensor_measurements m LEFT JOIN sensor_names n ON n.key = m.sensor_id
                 ORDER BY m.ingested_at",
                &[],
            )
            .unwrap();
        let mut want = run.rows.clone();
        want.sort_by(|a, b| a.ingested_at().total_cmp(&b.ingested_at()));
        for (row, want) in rows.iter().zip(&want) {
            assert_eq!(micros(row.get(3)), want.micros(), "{want:?}");
        }
        let got: Vec<crate::sensors::Got> = rows
            .iter()
            .map(|row| crate::sensors::Got {
                sensor: row.get(0),
                temperature: row.get(1),
                humidity: row.get(2),
                extra: row.get(4),
            })
            .collect();
        crate::sensors::check_rows(&got, &run.rows, run.unit);
    }
}

/// The README's psql queries: a named sensor's readings through the
/// index, an extra field with `->>`; `stats` shows names and measurements.
#[test]
fn pg_named_sensors_and_extras_are_queryable() {
    let Some(cluster) = shared() else { return };
    let url = cluster.database("named");
    let scratch = Scratch::new();
    let run = crate::sensors::corpus().remove(0);
    let mut server = Server::start(scratch.path(), &["--db", &url]);
    send_datagrams(server.addr, &run.datagrams);
    server.stop_clean();
    let mut client = connect(&url);
    let temperatures: Vec<f64> = client
        .query(
            "SELECT temperature FROM sensor_measurements
             WHERE sensor_id = (SELECT key FROM sensor_names WHERE name = 'esp32-kitchen')
             ORDER BY ingested_at",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(temperatures, [21.0, 21.5]);
    let pressures: Vec<f64> = client
        .query(
            "SELECT (extra ->> 'pressure')::float8 FROM sensor_measurements
             WHERE extra ? 'pressure' ORDER BY ingested_at",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(pressures, [1013.25, 990.5]);
    let out = run_env(&["stats", "--db", &url, "--json"], scratch.path(), &[]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bme = stats["per_sensor"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sensor_id"] == "bme280-attic")
        .unwrap_or_else(|| panic!("{stats}"));
    assert_eq!(
        bme["measurements"],
        serde_json::json!(["temperature", "humidity", "pressure"])
    );
}

/// A table of the previous release, with rows and while another column
/// of its owner's, is upgraded in place at start: rows intact, the
/// measurements nullable, `extra jsonb` added; then it takes a named
/// temperature-only sensor with an extra field.
#[test]
fn pg_old_table_is_upgraded_in_place() {
    let Some(cluster) = shared() else { return };
    let url = cluster.database("upgrade");
    let scratch = Scratch::new();
    connect(&url)
        .batch_execute(
            "CREATE TABLE sensor_measurements (
                 sensor_id   bigint           NOT NULL,
                 temperature double precision NOT NULL,
                 humidity    double precision NOT NULL,
                 ingested_at timestamptz      NOT NULL,
                 received_at timestamptz      NOT NULL,
                 site        text             DEFAULT 'barn'
             );
             CREATE INDEX sensor_measurements_sensor_time
                 ON sensor_measurements (sensor_id, ingested_at);
             INSERT INTO sensor_measurements VALUES
                 (1, 21.123456789012345, 0.1, to_timestamp(1764150000.5), to_timestamp(1764150000.75), 'attic'),
                 (2, -0.5, 5e-324, to_timestamp(1764150001.25), to_timestamp(1764150001.5), DEFAULT);",
        )
        .unwrap();
    let mut server = Server::start(scratch.path(), &["--db", &url]);
    send_datagrams(
        server.addr,
        [
            r#"{"sensor_id": "new-probe", "temperature": 3.5, "rssi": -70, "ingested_at": 1764150002}"#,
        ],
    );
    assert_eq!(server.stop_clean()["persisted"], 1);
    assert!(
        server
            .log_text()
            .contains("upgraded table sensor_measurements")
    );
    let mut client = connect(&url);
    let rows = client
        .query(
            "SELECT COALESCE(n.name, m.sensor_id::text), temperature, humidity, extra::text, site
             FROM sensor_measurements m LEFT JOIN sensor_names n ON n.key = m.sensor_id
             ORDER BY ingested_at",
            &[],
        )
        .unwrap();
    type Row = (
        String,
        Option<f64>,
        Option<f64>,
        Option<String>,
        Option<String>,
    );
    let got: Vec<Row> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        got,
        [
            (
                "1".into(),
                Some(21.123456789012345),
                Some(0.1),
                None,
                Some("attic".into())
            ),
            (
                "2".into(),
                Some(-0.5),
                Some(5e-324),
                None,
                Some("barn".into())
            ),
            (
                "new-probe".into(),
                Some(3.5),
                None,
                Some(r#"{"rssi": -70}"#.into()),
                Some("barn".into())
            ),
        ]
    );
    let nullable: i64 = client
        .query_one(
            "SELECT COUNT(*) FROM information_schema.columns
             WHERE table_name = 'sensor_measurements'
               AND column_name IN ('temperature', 'humidity') AND is_nullable = 'YES'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(nullable, 2);
    // A second start finds nothing to upgrade.
    let mut server = Server::start(scratch.path(), &["--db", &url]);
    server.stop_clean();
    assert!(!server.log_text().contains("upgraded table"));
}

/// --retain on PostgreSQL: readings that arrive a day old are stored, then
/// deleted and counted as expired; readings within the horizon stay.
#[test]
fn pg_retention_deletes_old_readings_and_counts_them() {
    let Some(cluster) = shared() else { return };
    let url = cluster.database("retain");
    let scratch = Scratch::new();
    let mut server = Server::start(
        scratch.path(),
        &["--db", &url, "--retain", "2s", "--stats-interval", "50ms"],
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let reading = |sensor: usize, at: f64| {
        format!(
            r#"{{"sensor_id": {sensor}, "temperature": 1.5, "humidity": 0.5, "ingested_at": {at}}}"#
        )
    };
    let old = (0..2000).map(|i| reading(i % 40, now - 86_400.0 + i as f64));
    // Ahead of the clock, so within the horizon however slow the test runs.
    let recent = (0..300).map(|i| reading(i % 70, now + 600.0));
    send_datagrams(server.addr, old.chain(recent));
    server.wait_for_count("persisted", 2300, EXIT);
    let mut client = connect(&url);
    let deadline = Instant::now() + EXIT;
    loop {
        let row = client
            .query_one(
                "SELECT COUNT(*), COUNT(*) FILTER (WHERE ingested_at < now()) \
                 FROM sensor_measurements",
                &[],
            )
            .unwrap();
        let (rows, past): (i64, i64) = (row.get(0), row.get(1));
        if rows == 300 {
            assert_eq!(past, 0);
            break;
        }
        assert!(Instant::now() < deadline, "{rows} rows");
        thread::sleep(Duration::from_millis(100));
    }
    let counts = server.stop_clean();
    assert_eq!(counts["persisted"], 2300);
    assert_eq!(counts["expired"], 2000);
}

/// Sequenced readings in PostgreSQL: a retransmission is stored once,
/// across a SIGKILL and a restart; two instances writing one database keep
/// exactly once for the sensors each receives, each stream's state in its
/// own row. (A retransmission that reaches the other instance is not
/// covered: README, "Delivery over a lossy network".)
#[test]
fn pg_sequenced_readings_are_stored_exactly_once() {
    use crate::delivery::reading;
    let Some(cluster) = shared() else { return };
    let url = cluster.database("sequenced");
    let scratch = Scratch::new();
    let args = |spill: &str| {
        vec![
            "--db".to_string(),
            url.clone(),
            "--spill".into(),
            spill.into(),
            "--stats-interval".into(),
            "50ms".into(),
        ]
    };
    let start = |spill: &str| {
        let args = args(spill);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start(scratch.path(), &args)
    };
    // Many streams at once too, integer and named: after the restart they
    // are loaded together (two queries, not one per stream).
    let many: Vec<String> =
        (100..300)
            .map(|sensor| reading(sensor, 2, 0))
            .chain((0..20).map(|i| {
                format!(r#"{{"sensor_id":"probe-{i}","boot":3,"seq":0,"temperature":1}}"#)
            }))
            .collect();
    let mut server = start("a.spill.jsonl");
    send_datagrams(server.addr, (0..500).map(|s| reading(1, 5, s)));
    send_datagrams(server.addr, (0..500).map(|s| reading(1, 5, s)));
    send_datagrams(server.addr, &many);
    server.wait_for_count("persisted", 720, EXIT);
    server.wait_for_count("duplicates", 500, EXIT);
    server.stop_with(libc::SIGKILL, EXIT);
    let mut server = start("a.spill.jsonl");
    send_datagrams(server.addr, (0..1000).map(|s| reading(1, 5, s)));
    send_datagrams(server.addr, &many);
    let counts = server.stop_clean();
    assert_eq!((counts["persisted"], counts["duplicates"]), (500, 720));

    let mut two = [start("b.spill.jsonl"), start("c.spill.jsonl")];
    for (server, sensor) in two.iter_mut().zip([2, 3]) {
        send_datagrams(server.addr, (0..300).map(|s| reading(sensor, 1, s)));
        send_datagrams(server.addr, (0..300).map(|s| reading(sensor, 1, s)));
    }
    for server in &mut two {
        let counts = server.stop_clean();
        assert_eq!((counts["persisted"], counts["duplicates"]), (300, 300));
    }
    let mut client = connect(&url);
    let twice = client
        .query_one(
            "SELECT COUNT(*) FROM (SELECT 1 FROM sensor_measurements
             GROUP BY sensor_id, boot, seq HAVING COUNT(*) > 1) d",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(twice, 0, "a reading is stored twice");
    let streams: Vec<(i64, i64, i64, i64, i64)> = client
        .query(
            "SELECT sensor_id, boot, highest, received, duplicates FROM sensord_sequences
             WHERE table_name = 'sensor_measurements' AND sensor_id IN (1, 2, 3)
             ORDER BY sensor_id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        streams,
        [
            (1, 5, 999, 1000, 1000),
            (2, 1, 299, 300, 300),
            (3, 1, 299, 300, 300)
        ]
    );
    let out = run(&["stats", "--db", &url, "--json"], scratch.path());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for sensor in doc["per_sensor"].as_array().unwrap() {
        assert_eq!(sensor["lost"], 0, "{sensor}");
    }
}

/// The dashboard's API on PostgreSQL: the sensors list and one sensor's
/// downsampled readings agree with the table (a reading at the window's
/// start, which microsecond rounding may put a hair before it, in the
/// first bucket), named sensors included, and an unknown sensor is a 404.
#[test]
fn pg_dashboard_api_agrees_with_the_table() {
    use crate::dashboard::{get_json, now, wait_persisted};
    let Some(cluster) = shared() else { return };
    let url = cluster.database("dashboard");
    let scratch = Scratch::new();
    let (mut server, http) = start_with_http(scratch.path(), &["--db", &url]);
    let start = now();
    let mut datagrams: Vec<String> = (0..600)
        .map(|i| {
            format!(
                r#"{{"sensor_id":{},"temperature":{},"humidity":{},"ingested_at":{}}}"#,
                7 + i % 2,
                (i % 37) as f64 / 2.0,
                (i % 41) as f64,
                start - 1800.0 + i as f64 * 2.5
            )
        })
        .collect();
    // "hall" numbers its readings; seq 1 never arrives: 1 of 3 lost.
    datagrams.push(format!(
        r#"{{"sensor_id":"hall","temperature":18.25,"rssi":-71,"ingested_at":{},"seq":0}}"#,
        start - 60.0
    ));
    datagrams.push(format!(
        r#"{{"sensor_id":"hall","temperature":18.5,"ingested_at":{},"seq":2}}"#,
        start - 50.0
    ));
    send_datagrams(server.addr, &datagrams);
    wait_persisted(http, datagrams.len() as u64, &server);
    let mut client = connect(&url);

    let (status, list) = get_json(http, "/api/sensors");
    assert_eq!(status, 200, "{list}");
    let from = list["recent"]["from"].as_f64().unwrap();
    let sensors = list["sensors"].as_array().unwrap();
    let ids: Vec<String> = sensors.iter().map(|s| s["id"].to_string()).collect();
    assert_eq!(ids, [r#""hall""#, "7", "8"]);
    let losses: Vec<&serde_json::Value> = sensors.iter().map(|s| &s["loss_ratio"]).collect();
    assert_eq!(
        losses,
        [
            &serde_json::Value::from(1.0 / 3.0),
            &serde_json::Value::Null,
            &serde_json::Value::Null
        ]
    );
    for sensor in sensors {
        let key: i64 = match &sensor["id"] {
            serde_json::Value::String(name) => client
                .query_one("SELECT key FROM sensor_names WHERE name = $1", &[name])
                .unwrap()
                .get(0),
            id => id.as_i64().unwrap(),
        };
        let row = client
            .query_one(
                "SELECT COUNT(*) FILTER (WHERE ingested_at >= to_timestamp($2)),
                        EXTRACT(EPOCH FROM MAX(ingested_at))::float8,
                        (array_agg(temperature ORDER BY ingested_at DESC))[1]
                 FROM sensor_measurements WHERE sensor_id = $1",
                &[&key, &from],
            )
            .unwrap();
        assert_eq!(
            sensor["readings_last_hour"],
            row.get::<_, i64>(0),
            "{sensor}"
        );
        assert_eq!(sensor["last_seen"], row.get::<_, f64>(1), "{sensor}");
        assert_eq!(sensor["temperature"], row.get::<_, f64>(2), "{sensor}");
        assert_eq!(sensor["spark"]["temperature"].as_array().unwrap().len(), 30);
    }

    let (lo, hi, points) = (start - 1700.0, start - 200.0, 9);
    let (status, got) = get_json(
        http,
        &format!("/api/sensors/7/readings?from={lo}&to={hi}&points={points}"),
    );
    assert_eq!(status, 200, "{got}");
    let width = (hi - lo) / points as f64;
    let expected = client
        .query(
            "SELECT GREATEST(0, LEAST(floor((EXTRACT(EPOCH FROM ingested_at)::float8
                              - $2::float8) / $4::float8)::int, $5::int - 1)) AS b,
                    COUNT(*), MIN(temperature), MAX(temperature), MIN(humidity), MAX(humidity)
             FROM sensor_measurements
             WHERE sensor_id = $1 AND ingested_at >= to_timestamp($2::float8)
               AND ingested_at <= to_timestamp($3::float8)
             GROUP BY b ORDER BY b",
            &[&7i64, &lo, &hi, &width, &points],
        )
        .unwrap();
    assert!(got["t"].as_array().unwrap().len() <= points as usize);
    assert_eq!(got["t"].as_array().unwrap().len(), expected.len(), "{got}");
    let series = got["series"].as_array().unwrap();
    for (i, row) in expected.iter().enumerate() {
        assert_eq!(got["count"][i], row.get::<_, i64>(1), "bucket {i}");
        assert_eq!(series[0]["min"][i], row.get::<_, f64>(2), "bucket {i}");
        assert_eq!(series[0]["max"][i], row.get::<_, f64>(3), "bucket {i}");
        assert_eq!(series[1]["min"][i], row.get::<_, f64>(4), "bucket {i}");
        assert_eq!(series[1]["max"][i], row.get::<_, f64>(5), "bucket {i}");
    }

    let (status, hall) = get_json(http, "/api/sensors/hall/readings");
    assert_eq!(status, 200);
    assert_eq!(hall["readings"], 2);
    let names: Vec<&str> = hall["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["temperature", "rssi"]);
    assert_eq!(hall["series"][1]["avg"][0], -71.0);
    let (status, missing) = get_json(http, "/api/sensors/nowhere/readings");
    assert_eq!(
        (status, missing["error"].as_str()),
        (404, Some("no sensor nowhere has readings"))
    );
    server.stop_clean();
}
