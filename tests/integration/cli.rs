//! What a user sees when something is wrong on the command line or at
//! start: the exit code (2 for usage, 1 at run time), the exact wording,
//! and that nothing was created on disk.

use std::net::UdpSocket;
use std::thread;
use std::time::Duration;

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
    thread::sleep(Duration::from_millis(200));
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
