//! The promise under attack: each test reproduces one way an operator
//! broke it, and asserts on rows, files, exit codes and the exact ledger.

use std::fs;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::faults::WriteLock;
use crate::util::*;

/// A flood of maximum-size arrays that goes on through the stop: the stop
/// reads only what the socket held, so it ends promptly with memory
/// bounded, everything it accepted is stored, and the rest is counted.
#[test]
fn flood_during_stop_is_bounded() {
    let scratch = Scratch::new();
    let mut server = Server::start(
        scratch.path(),
        &["--db", scratch.db_arg(), "--stats-interval", "100ms"],
    );
    let array = max_size_array();
    let flooding = AtomicBool::new(true);
    let sent = AtomicU64::new(0);
    let (took, status, peak) = thread::scope(|scope| {
        for _ in 0..2 {
            let (flooding, sent, addr, array) = (&flooding, &sent, server.addr, &array);
            scope.spawn(move || {
                let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
                // Bounded in time whatever happens to the server.
                let until = Instant::now() + Duration::from_secs(40);
                while flooding.load(Ordering::Relaxed) && Instant::now() < until {
                    for _ in 0..50 {
                        let _ = socket.send_to(array.as_bytes(), addr);
                    }
                    sent.fetch_add(50, Ordering::Relaxed);
                }
            });
        }
        // The peak resident memory, sampled until the process is gone.
        let pid = server.pid();
        let sampler = scope.spawn(move || {
            let mut peak = 0;
            while let Some(kib) = peak_rss(pid) {
                peak = peak.max(kib);
                thread::sleep(Duration::from_millis(10));
            }
            peak
        });
        thread::sleep(Duration::from_secs(2));
        let stop = Instant::now();
        signal(server.pid(), libc::SIGTERM);
        let status = server.wait(EXIT);
        let took = stop.elapsed();
        flooding.store(false, Ordering::Relaxed);
        (took, status, sampler.join().unwrap())
    });
    let counts = server.shutdown_counts();
    eprintln!(
        "flood through the stop: {} datagrams sent, exit {took:?} after SIGTERM, peak RSS {} \
         MiB, {counts:?}",
        sent.load(Ordering::Relaxed),
        peak / 1024
    );
    // The README's bound: the queue and the drain's readings (250,000 each,
    // 40 bytes, doubled by vector growth), the receive buffers, SQLite's cache.
    assert!(peak < 256 * 1024, "peak RSS {peak} KiB");
    assert!(status.success(), "log:\n{}", server.log_text());
    // --busy-timeout (5 s) plus the stop's grace: the bound the README states.
    assert!(took < Duration::from_secs(8), "stop took {took:?}");
    assert!(counts["unread"] > 0, "datagrams kept coming: {counts:?}");
    assert_eq!(counts["accepted"], counts["persisted"]);
    assert_eq!(row_count(&scratch.db), counts["accepted"]);
}

/// Datagrams sent after the stop began, while the final flush waits for a
/// lock, are neither read nor lost from the books: the datagram ledger
/// balances exactly with `unread`.
#[test]
fn datagrams_during_the_final_flush_are_counted_unread() {
    let scratch = Scratch::new();
    let mut server = start_holding(scratch.path(), scratch.db_arg());
    send_datagrams(server.addr, (0..1000).map(unique));
    server.wait_for_accepted(1000, EXIT);
    let lock = WriteLock::take(&scratch.db);
    signal(server.pid(), libc::SIGTERM);
    server.wait_for_line("stopped receiving", EXIT);
    send_datagrams(server.addr, (1000..1500).map(unique));
    drop(lock);
    assert!(server.wait(EXIT).success(), "log:\n{}", server.log_text());
    let counts = server.shutdown_counts();
    assert_eq!(
        (counts["received"], counts["unread"], counts["kernel_drops"]),
        (1000, 500, 0),
        "{counts:?}"
    );
    assert_eq!(row_count(&scratch.db), 1000);
}

/// A closed terminal (SIGHUP) stops sensord like SIGTERM: flush, final
/// line, exit 0.
#[test]
fn sighup_stops_with_the_flush() {
    let scratch = Scratch::new();
    let mut server = start_holding(scratch.path(), scratch.db_arg());
    send_datagrams(server.addr, (0..2000).map(unique));
    server.wait_for_accepted(2000, EXIT);
    assert!(server.stop_with(libc::SIGHUP, EXIT).success());
    assert_eq!(server.shutdown_counts()["flushed_at_shutdown"], 2000);
    assert_eq!(row_count(&scratch.db), 2000);
}

/// A second instance whose spill path is the first's refuses to start,
/// naming the path; the first is unaffected.
#[test]
fn two_instances_cannot_share_a_spill_path() {
    let scratch = Scratch::new();
    let mut first = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    let out = run(
        &["serve", "--bind", "127.0.0.1:0", "--db", scratch.db_arg()],
        scratch.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("sensors.db.spill.jsonl is in use by another sensord"),
        "{stderr}"
    );
    send_datagrams(first.addr, (0..10).map(unique));
    first.stop_clean();
    assert_eq!(row_count(&scratch.db), 10);
}

/// A spill folder that does not exist fails at start, not at the stop.
#[test]
fn unusable_spill_folder_fails_at_start() {
    let scratch = Scratch::new();
    let out = run(
        &[
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--db",
            scratch.db_arg(),
            "--spill",
            "/nonexistent-dir/x.spill.jsonl",
        ],
        scratch.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("/nonexistent-dir/x.spill.jsonl.lock"),
        "{stderr}"
    );
    assert!(!scratch.db.exists(), "nothing is created before the check");
}

/// Killed in the middle of writing a spill (after the data, before the
/// rename): no torn spill file, so the next start runs; it names the
/// leftover temporary file.
#[test]
fn kill_during_a_spill_leaves_no_torn_file() {
    let scratch = Scratch::new();
    let spill = scratch.path().join("sensors.db.spill.jsonl");
    let (mut server, lock) = bound_to_spill(&scratch, "spill::before_rename=sleep(60000)");
    signal(server.pid(), libc::SIGTERM);
    server.wait_for_line("final flush failed", EXIT);
    // The temporary file is written and synced before the failpoint.
    let deadline = Instant::now() + EXIT;
    while temp_files(scratch.path()).is_empty() {
        assert!(Instant::now() < deadline, "no temporary spill file");
        thread::sleep(Duration::from_millis(20));
    }
    // Killed anywhere from here to the rename, the outcome is the same.
    signal(server.pid(), libc::SIGKILL);
    server.wait(EXIT);
    assert!(
        !spill.exists(),
        "the spill file appears whole or not at all"
    );
    drop(lock);

    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    server.wait_for_line("is left from a spill that was killed", EXIT);
    assert!(server.stop_with(libc::SIGTERM, EXIT).success());
}

/// A server holding 3,000 accepted readings (nothing commits before the
/// stop) with `failpoints` set, and another connection's write lock on its
/// file, so its final flush fails (after 200 ms) and spills.
fn bound_to_spill(scratch: &Scratch, failpoints: &str) -> (Server, WriteLock) {
    let args = [
        &["--db", scratch.db_arg(), "--busy-timeout", "200ms"][..],
        &HOLD_UNTIL_STOP,
    ]
    .concat();
    let mut server = Server::start_with_env(scratch.path(), &args, &[("FAILPOINTS", failpoints)]);
    send_datagrams(server.addr, (0..3000).map(unique));
    server.wait_for_accepted(3000, EXIT);
    let lock = WriteLock::take(&scratch.db);
    (server, lock)
}

fn temp_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".spill.jsonl.tmp."))
        .collect()
}

/// The spill's disk is full: the readings that could not be kept are
/// counted as `lost`, the ledger closes, and the exit is 1 with an ERROR
/// naming the cause.
#[test]
fn full_disk_at_spill_counts_lost() {
    let scratch = Scratch::new();
    let (mut server, lock) = bound_to_spill(&scratch, "spill::write=return");
    let status = server.stop_with(libc::SIGTERM, EXIT);
    drop(lock);
    assert_eq!(status.code(), Some(1));
    let counts = server.shutdown_counts();
    assert_eq!(
        (
            counts["accepted"],
            counts["persisted"],
            counts["spilled"],
            counts["lost"]
        ),
        (3000, 0, 0, 3000),
        "{counts:?}"
    );
    assert!(
        server.log_text().contains("No space left on device"),
        "{}",
        server.log_text()
    );
}

/// A stop during start-up, while a spill file is being imported: exit
/// non-zero with one line, the spill file kept, nothing imported; the next
/// start imports it all.
#[test]
fn stop_during_replay_leaves_everything_as_it_was() {
    let scratch = Scratch::new();
    let spill = scratch.path().join("sensors.db.spill.jsonl");
    let lines: String = (0..5000)
        .map(|i| {
            format!(
                "{{\"sensor_id\":{i},\"temperature\":1.5,\"humidity\":2.5,\
                 \"ingested_at\":1764150000.5,\"received_at\":1764150000.5}}\n"
            )
        })
        .collect();
    fs::write(&spill, &lines).unwrap();
    let mut child = std::process::Command::new(bin())
        .args(["serve", "--bind", "127.0.0.1:0", "--db", scratch.db_arg()])
        .env("FAILPOINTS", "spill::before_import=sleep(2000)")
        .current_dir(scratch.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Its stderr, line by line, so the stop can wait for the import to begin.
    let (log_tx, log) = std::sync::mpsc::channel();
    let reader = std::io::BufReader::new(child.stderr.take().unwrap());
    thread::spawn(move || {
        for line in std::io::BufRead::lines(reader).map_while(Result::ok) {
            let _ = log_tx.send(line);
        }
    });
    let mut stderr = String::new();
    let deadline = Instant::now() + EXIT;
    while !stderr.contains("importing 5000 readings") {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = log
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("the import never began: {stderr}"));
        stderr += &line;
        stderr.push('\n');
    }
    // The import is held at the failpoint, before its transaction.
    signal(child.id(), libc::SIGTERM);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        thread::sleep(Duration::from_millis(20));
    };
    while let Ok(line) = log.recv_timeout(Duration::from_secs(5)) {
        stderr += &line;
        stderr.push('\n');
    }
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("stopped during start-up"), "{stderr}");
    assert_eq!(
        fs::read_to_string(&spill).unwrap(),
        lines,
        "spill kept as it was"
    );
    assert_eq!(row_count(&scratch.db), 0);

    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    server.wait_for_line("replayed 5000 readings", EXIT);
    assert!(server.stop_with(libc::SIGTERM, EXIT).success());
    assert_eq!(row_count(&scratch.db), 5000);
}

/// Durations and sizes beyond any use are usage errors (exit 2), never a
/// panic.
#[test]
fn absurd_durations_are_usage_errors() {
    let scratch = Scratch::new();
    for flag in ["--busy-timeout", "--flush-interval", "--stats-interval"] {
        let out = run(&["serve", flag, "500000000000years"], scratch.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// `--allow` with an IPv4-mapped IPv6 network matches IPv4 sources, as it
/// would written as IPv4.
#[test]
fn allow_accepts_ipv4_mapped_networks() {
    let scratch = Scratch::new();
    let mut server = Server::start(
        scratch.path(),
        &["--db", scratch.db_arg(), "--allow", "::ffff:127.0.0.1/128"],
    );
    send_datagrams(server.addr, (0..5).map(unique));
    let counts = server.stop_clean();
    assert_eq!((counts["received"], counts["denied"]), (5, 0), "{counts:?}");
    assert_eq!(row_count(&scratch.db), 5);
}

/// `stats` against a server that accepts TCP and never answers stops on
/// the first Ctrl-C, at once.
#[test]
fn stats_stops_on_the_first_ctrl_c() {
    let scratch = Scratch::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "postgres://nobody@127.0.0.1:{}/x",
        listener.local_addr().unwrap().port()
    );
    // Accepts, and holds every connection open without a word.
    let holder = thread::spawn(move || {
        let mut held = Vec::new();
        listener.set_nonblocking(true).unwrap();
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until && held.len() < 10 {
            if let Ok((stream, _)) = listener.accept() {
                held.push(stream);
            }
            thread::sleep(Duration::from_millis(10));
        }
    });
    let mut child = std::process::Command::new(bin())
        .args(["stats", "--db", &url])
        .current_dir(scratch.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "stats is still connecting"
    );
    signal(child.id(), libc::SIGINT);
    let stopped = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(stopped.elapsed() < EXIT, "stats ignored SIGINT");
        thread::sleep(Duration::from_millis(10));
    };
    let took = stopped.elapsed();
    assert!(took < Duration::from_secs(2), "stats took {took:?} to stop");
    assert!(!status.success());
    drop(holder);
}

/// The stats and shutdown lines show how full the receive buffer got, so
/// an operator sees a burst coming before anything is dropped.
#[test]
fn buffer_peak_shows_a_burst() {
    let scratch = Scratch::new();
    let mut server = Server::start(
        scratch.path(),
        &["--db", scratch.db_arg(), "--recv-buffer", "262144"],
    );
    pause(server.pid());
    send_datagrams(server.addr, (0..300).map(unique));
    signal(server.pid(), libc::SIGCONT);
    server.stop_clean();
    let line = server.wait_for_line("shutdown complete:", EXIT);
    let peak: f64 = line
        .split("buffer_peak=")
        .nth(1)
        .and_then(|rest| rest.trim_end_matches('%').parse().ok())
        .unwrap_or_else(|| panic!("no buffer_peak in {line}"));
    assert!(peak > 20.0, "300 datagrams in a 256 KiB buffer: {line}");
    assert_eq!(
        row_count(&scratch.db),
        300 - server.shutdown_counts()["kernel_drops"]
    );
}

/// Without CAP_NET_ADMIN (here: as `nobody`), a receive buffer capped by
/// net.core.rmem_max is a WARN naming the sysctl that raises it.
#[test]
fn capped_receive_buffer_is_a_warning() {
    if unsafe { libc::geteuid() } != 0 {
        // Not root: sensord runs without CAP_NET_ADMIN as it is.
        let scratch = Scratch::new();
        let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
        server.wait_for_line("sysctl -w net.core.rmem_max=134217728", EXIT);
        server.stop_clean();
        return;
    }
    let scratch = Scratch::new();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(scratch.path(), fs::Permissions::from_mode(0o777)).unwrap();
    // A copy `nobody` can run wherever the build lives (CI's checkout may
    // sit in a folder only root can enter).
    let copy = scratch.path().join("sensord");
    fs::copy(bin(), &copy).unwrap();
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
    let mut child = std::process::Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(&copy)
        .args(["serve", "--bind", "127.0.0.1:0"])
        .args(["--db", scratch.db_arg(), "--stats-interval", "0"])
        .current_dir(scratch.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let deadline = Instant::now() + EXIT;
    let warning = loop {
        let line = lines.next().expect("sensord ended early").unwrap();
        if line.contains("receive buffer:") {
            break line;
        }
        assert!(Instant::now() < deadline, "no receive buffer line");
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        warning.contains("sysctl -w net.core.rmem_max=134217728"),
        "{warning}"
    );
}
