//! What a user sees when something is wrong on the command line or at
//! start: the exit code (2 for usage, 1 at run time), the exact wording,
//! and that nothing was created on disk.

use std::net::UdpSocket;

use crate::util::*;

/// The one line after `error: ` (clap's and ours), and the exit code.
fn error_of(args: &[&str], scratch: &Scratch) -> (Option<i32>, String) {
    let out = run(args, scratch.path());
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line for {args:?}: {stderr}"))
        .to_string();
    (out.status.code(), line)
}

/// Nothing is left in the scratch folder.
fn assert_nothing_created(scratch: &Scratch) {
    let left: Vec<_> = std::fs::read_dir(scratch.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "created: {left:?}");
}

#[test]
fn malformed_bind_is_a_usage_error_naming_the_form() {
    let scratch = Scratch::new();
    for (bind, expected) in [
        (
            "12345",
            "error: invalid value '12345' for '--bind <IP:PORT>': `12345` is not an address \
             with a port; expected an address like 127.0.0.1:12345, [::1]:12345 or \
             localhost:12345",
        ),
        (
            "nonsense:x",
            "error: invalid value 'nonsense:x' for '--bind <IP:PORT>': `nonsense:x` is not an \
             address like 127.0.0.1:12345, [::1]:12345 or localhost:12345 (invalid port value)",
        ),
    ] {
        let (code, line) = error_of(&["serve", "--bind", bind], &scratch);
        assert_eq!((code, line.as_str()), (Some(2), expected));
    }
    assert_nothing_created(&scratch);
}

#[test]
fn zero_counts_read_like_a_person_wrote_them() {
    let scratch = Scratch::new();
    let (code, line) = error_of(&["serve", "--batch-size", "0"], &scratch);
    assert_eq!(code, Some(2));
    assert_eq!(
        line,
        "error: invalid value '0' for '--batch-size <BATCH_SIZE>': must be at least 1"
    );
}

#[test]
fn table_with_sqlite_is_a_usage_error() {
    let scratch = Scratch::new();
    let (code, line) = error_of(&["serve", "--table", "other"], &scratch);
    assert_eq!(code, Some(2));
    assert_eq!(
        line,
        "error: --table applies to PostgreSQL only; a SQLite file always uses sensor_measurements"
    );
    assert_nothing_created(&scratch);
}

#[test]
fn port_in_use_says_what_to_do_and_creates_nothing() {
    let scratch = Scratch::new();
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, line) = error_of(&["serve", "--bind", &addr], &scratch);
    assert_eq!(code, Some(1));
    assert_eq!(
        line,
        format!(
            "error: cannot bind {addr}: Address already in use; another process has this port \
             (`ss -ulpn` shows which), so stop it or choose another with --bind"
        )
    );
    // The spill lock is released and removed with the process; no database.
    assert!(!scratch.db.exists());
}

#[test]
fn stats_on_a_folder_says_so() {
    let scratch = Scratch::new();
    let folder = scratch.path().to_str().unwrap().to_string();
    let (code, line) = error_of(&["stats", "--db", &folder], &scratch);
    assert_eq!(code, Some(1));
    assert_eq!(
        line,
        format!("error: cannot open database {folder}: is a folder, not a database file")
    );
}

#[test]
fn postgres_connection_refused_keeps_its_cause() {
    let scratch = Scratch::new();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = format!("postgres://ann@127.0.0.1:{port}/fleet");
    let (code, line) = error_of(&["stats", "--db", &url], &scratch);
    assert_eq!(code, Some(1));
    assert!(line.contains("Connection refused"), "{line}");
    assert!(
        line.contains(&format!("postgres://ann@127.0.0.1:{port}/fleet")),
        "{line}"
    );
}

#[test]
fn send_accepts_host_names_and_tells_the_truth_when_nobody_listens() {
    let scratch = Scratch::new();
    // Nobody listens on a port just closed.
    let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let to = format!("localhost:{port}");
    let (code, line) = error_of(
        &["send", "--to", &to, "--count", "5", "--interval", "5ms"],
        &scratch,
    );
    assert_eq!(code, Some(1));
    assert!(
        line.starts_with("error: 127.0.0.1:")
            && line.ends_with(
                ": nothing is listening there (is `sensord serve` running, on that port?)"
            ),
        "{line}"
    );

    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    let to = format!("localhost:{}", server.addr.port());
    let out = run(
        &["send", "--to", &to, "--count", "1", "--interval", "1ms"],
        scratch.path(),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("sent 1 reading\n"));
    server.stop_clean();
    assert_eq!(row_count(&scratch.db), 1);
}

#[test]
fn version_names_the_commit() {
    let scratch = Scratch::new();
    let out = run(&["--version"], scratch.path());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.starts_with(&format!("sensord {} (", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
}

#[test]
fn completions_and_man_page_are_generated() {
    let scratch = Scratch::new();
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell], scratch.path());
        assert!(out.status.success(), "{shell}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("serve"),
            "{shell}"
        );
    }
    let out = run(&["man"], scratch.path());
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(".ie"));
}

/// Suppressed warning counts are reported within a couple of seconds, not
/// held until the next bad datagram.
#[test]
fn suppressed_warnings_are_reported_without_a_later_one() {
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    send_datagrams(server.addr, (0..9).map(|_| b"garbage".as_slice()));
    server.wait_for_line("rejected 8 more readings (not json", EXIT);
    let counts = server.stop_clean();
    assert_eq!(counts["rejected"], 9);
    let line = server.wait_for_line("shutdown complete:", EXIT);
    assert!(line.contains("rejected=9 (not_json=9)"), "{line}");
}

/// The demo, run as a user would with a short DEMO_SECONDS: it stores what
/// the sensor sent, prints the dashboard's URL, exits 0, and ends with the
/// compact summary.
#[test]
fn demo_ends_with_the_compact_summary() {
    let scratch = Scratch::new();
    let port = {
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port().to_string()
    };
    let http_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port().to_string()
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .env("SENSORD_BIN", bin())
        .env("DEMO_SECONDS", "2")
        .env("DEMO_PORT", &port)
        .env("DEMO_HTTP_PORT", &http_port)
        .current_dir(scratch.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("shutdown complete:"), "{stderr}");
    assert!(
        stdout.contains("demo: server exited with status 0"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "demo: open the dashboard: http://127.0.0.1:{http_port}/"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("busiest of"), "{stdout}");
    let table_rows = stdout
        .lines()
        .skip_while(|l| !l.contains("sensor  readings"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .count();
    assert_eq!(table_rows, 10, "{stdout}");
    assert!(row_count(&scratch.db) > 50, "two seconds at 100 readings/s");
}

/// The README's first commands hold: the two scripts it names exist, its
/// bash `/dev/udp` one-liner stores a reading, and its `sqlite3` query
/// runs (through rusqlite) and finds that reading.
#[test]
fn readme_commands_work() {
    let readme = include_str!("../../README.md");
    let root = env!("CARGO_MANIFEST_DIR");
    for script in ["scripts/demo.sh", "scripts/test.sh"] {
        assert!(readme.contains(script), "README names {script}");
        assert!(std::path::Path::new(root).join(script).exists(), "{script}");
    }

    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    let one_liner = readme
        .lines()
        .find(|l| l.contains("> /dev/udp/"))
        .expect("README has a /dev/udp one-liner");
    let command = one_liner.split("   #").next().unwrap().replace(
        "127.0.0.1/12345",
        &format!("127.0.0.1/{}", server.addr.port()),
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &command])
        .output()
        .unwrap();
    assert!(out.status.success(), "{command}: {out:?}");
    server.stop_clean();
    assert_eq!(row_count(&scratch.db), 1);

    // The query between the quotes of `sqlite3 sensors.db "..."`.
    let start = readme
        .find("sqlite3 sensors.db \"")
        .expect("README has a sqlite3 query")
        + "sqlite3 sensors.db \"".len();
    let query = &readme[start..start + readme[start..].find('"').unwrap()];
    let conn = rusqlite::Connection::open(&scratch.db).unwrap();
    let found: Vec<(String, f64, f64)> = conn
        .prepare(query)
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(found.len(), 1, "{query}");
    assert_eq!((found[0].1, found[0].2), (21.5, 40.2));
}
