//! Breaking things on purpose: every reading received ends up in the
//! database or the spill file, and every one not taken is counted.

use std::collections::HashMap;
use std::fs;
use std::net::UdpSocket;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;

fn spill_lines(path: &Path) -> usize {
    spill_readings(path) as usize
}

/// Number of distinct sensor ids: equals the row count when nothing is duplicated.
fn distinct_ids(db: &Path) -> u64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(
        "SELECT COUNT(DISTINCT sensor_id) FROM sensor_measurements",
        [],
        |r| r.get::<_, i64>(0),
    )
    .unwrap() as u64
}

/// Holds SQLite's write lock on `db` from another connection until dropped.
pub struct WriteLock {
    _conn: rusqlite::Connection,
}

impl WriteLock {
    pub fn take(db: &Path) -> WriteLock {
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        WriteLock { _conn: conn }
    }
}

/// The socket's drop counter as the kernel reports it in /proc/net/udp.
fn proc_drops(pid: u32) -> u64 {
    proc_udp_line(pid).last().unwrap().parse().unwrap()
}

/// Bytes waiting in the receive queue of the process's UDP socket.
fn proc_rx_queue(pid: u32) -> u64 {
    let queues = proc_udp_line(pid)[4].clone();
    let (_, rx) = queues.split_once(':').unwrap();
    u64::from_str_radix(rx, 16).unwrap()
}

/// The columns of the process's UDP socket's line in /proc/net/udp{,6}.
fn proc_udp_line(pid: u32) -> Vec<String> {
    let inodes: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().to_string();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        for line in fs::read_to_string(table).unwrap().lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if inodes.iter().any(|i| cols.get(9) == Some(&i.as_str())) {
                return cols.into_iter().map(String::from).collect();
            }
        }
    }
    panic!("no UDP socket of process {pid} in /proc/net/udp");
}

/// The identities the README promises, on one shutdown line.
fn assert_ledger(counts: &HashMap<String, u64>, readings_received: u64, datagrams_sent: u64) {
    assert_eq!(
        counts["accepted"] + counts["rejected"],
        readings_received,
        "{counts:?}"
    );
    assert_eq!(
        counts["accepted"],
        counts["persisted"] + counts["spilled"] + counts["dead_letter"] + counts["lost"],
        "{counts:?}"
    );
    assert_eq!(
        datagrams_sent,
        counts["received"] + counts["kernel_drops"] + counts["denied"] + counts["unread"],
        "{counts:?}"
    );
}

/// SIGTERM while the server is still behind a full-speed client: exit 0,
/// rows = accepted, and the shutdown line balances.
#[test]
fn sigterm_under_full_speed_load_balances_the_ledger() {
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    send_readings(
        server.addr,
        &["--interval", "0", "--count", "200000"],
        scratch.path(),
    );
    // Signal at once: the server is typically still working through a backlog.
    let counts = server.stop_clean();
    assert_eq!(row_count(&scratch.db), counts["accepted"]);
    assert_eq!(counts["spilled"], 0);
    assert_ledger(&counts, counts["received"], 200_000);
    assert!(counts["received"] > 0);
}

/// SIGKILL under load, 20 times on one file: the file stays intact, nothing
/// is stored twice, and the loss is bounded by what was held in memory,
/// plus what the kernel dropped.
#[test]
fn sigkill_loses_at_most_what_was_in_memory() {
    let scratch = Scratch::new();
    let (queue, batch) = (4096u64, 2000u64);
    let args = [
        "--db",
        scratch.db_arg(),
        "--queue-capacity",
        "4096",
        "--batch-size",
        "2000",
        "--flush-interval",
        "200ms",
        "--recv-buffer",
        "262144",
    ];
    let mut next_id = 0u64;
    let mut max_loss = 0u64;
    let mut before = 0u64;
    for round in 0..20 {
        let mut server = Server::start(scratch.path(), &args);
        let granted: u64 = server
            .wait_for_line("kernel granted", Duration::from_secs(5))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        // Paced below the server's rate, so the kernel drops nothing unless
        // other tests starve the server (once in CI, a whole round's).
        let n = 5000 + round * 500;
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..n {
            socket
                .send_to(unique(next_id + i).as_bytes(), server.addr)
                .unwrap();
            if i % 200 == 0 {
                thread::sleep(Duration::from_millis(2));
            }
        }
        next_id += n;
        // Final: loopback delivers (or drops) each datagram inside send_to.
        let dropped = proc_drops(server.pid());
        signal(server.pid(), libc::SIGKILL);
        server.wait(EXIT);

        let conn = rusqlite::Connection::open(&scratch.db).unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok", "round {round}");
        let now = row_count(&scratch.db);
        assert_eq!(
            distinct_ids(&scratch.db),
            now,
            "duplicates after round {round}"
        );
        let loss = n - (now - before);
        assert!(
            loss >= dropped,
            "round {round}: {dropped} dropped but only {loss} lost"
        );
        // In memory: the queue (whole chunks), one chunk in the receiver's
        // hands, the persister's batch, and the socket buffer (a datagram
        // costs the kernel at least 256 bytes of it).
        let bound = queue.div_ceil(1024) * 1024 + 1024 + batch + granted / 256;
        assert!(
            loss - dropped <= bound,
            "round {round}: lost {loss}, of which {dropped} dropped by the kernel; \
             {} > bound {bound}",
            loss - dropped
        );
        max_loss = max_loss.max(loss);
        before = now;
    }
    eprintln!("SIGKILL: largest loss in 20 rounds: {max_loss} readings");
}

/// Another writer holds the lock for 5 s mid-run: batches are retried, and
/// nothing is lost after it lets go. The running persister commits it all;
/// the final flush has nothing left to do.
#[test]
fn lock_held_mid_run_loses_nothing() {
    let scratch = Scratch::new();
    let mut server = Server::start(
        scratch.path(),
        &[
            "--db",
            scratch.db_arg(),
            "--busy-timeout",
            "200ms",
            "--stats-interval",
            "50ms",
        ],
    );
    send_datagrams(server.addr, (0..1000).map(unique));
    server.wait_for_count("persisted", 1000, EXIT);
    let lock = WriteLock::take(&scratch.db);
    let held = Instant::now();
    send_datagrams(server.addr, (1000..4000).map(unique));
    server.wait_for_line("attempt 1 to commit", EXIT);
    // Hold on for the full 5 s the scenario asks for.
    thread::sleep(Duration::from_secs(5).saturating_sub(held.elapsed()));
    drop(lock);
    send_datagrams(server.addr, (4000..5000).map(unique));
    server.wait_for_count("persisted", 5000, EXIT);
    assert_eq!(server.stop_clean()["flushed_at_shutdown"], 0);
    assert!(
        server.log_text().contains("database is locked"),
        "{}",
        server.log_text()
    );
    assert_eq!(row_count(&scratch.db), 5000);
    assert_eq!(distinct_ids(&scratch.db), 5000);
}

/// A persister that fell behind does not idle: half a batch or more queued
/// during a commit (here one stalled by another writer's lock) is committed
/// at once, not after gathering for --flush-interval (an hour here).
#[test]
fn backlog_queued_during_a_commit_is_committed_at_once() {
    let scratch = Scratch::new();
    let mut server = Server::start(
        scratch.path(),
        &[
            "--db",
            scratch.db_arg(),
            "--batch-size",
            "1000",
            "--flush-interval",
            "1h",
            "--busy-timeout",
            "200ms",
            "--stats-interval",
            "50ms",
        ],
    );
    let lock = WriteLock::take(&scratch.db);
    send_datagrams(server.addr, (0..1000).map(unique));
    server.wait_for_line("attempt 1 to commit 1000 readings", EXIT);
    send_datagrams(server.addr, (1000..1600).map(unique));
    server.wait_for_count("queued", 600, EXIT);
    drop(lock);
    server.wait_for_count("persisted", 1600, EXIT);
    assert_eq!(row_count(&scratch.db), 1600);
    assert_eq!(server.stop_clean()["flushed_at_shutdown"], 0);
    assert_eq!(distinct_ids(&scratch.db), 1600);
}

/// A reader with the file open at a stop keeps it in WAL mode (leaving WAL
/// needs the writer alone); the final flush commits everything all the same.
#[test]
fn reader_open_at_stop_keeps_wal_and_loses_nothing() {
    let scratch = Scratch::new();
    let mut server = start_holding(scratch.path(), scratch.db_arg());
    let reader = rusqlite::Connection::open(&scratch.db).unwrap();
    let seen: i64 = reader
        .query_row("SELECT COUNT(*) FROM sensor_measurements", [], |r| r.get(0))
        .unwrap();
    assert_eq!(seen, 0);
    send_datagrams(server.addr, (0..3000).map(unique));
    server.wait_for_accepted(3000, EXIT);
    assert_eq!(server.stop_clean()["flushed_at_shutdown"], 3000);
    assert_eq!(journal_mode(&scratch.db), "wal");
    assert_eq!(row_count(&scratch.db), 3000);
    assert_eq!(distinct_ids(&scratch.db), 3000);
    drop(reader);
}

/// The lock is held through shutdown: the final flush spills, exit 1; the
/// next start replays the spill file and removes it.
#[test]
fn lock_held_through_shutdown_spills_then_replays() {
    let scratch = Scratch::new();
    let spill = scratch.path().join("sensors.db.spill.jsonl");
    let args = ["--db", scratch.db_arg(), "--busy-timeout", "300ms"];
    let mut server = Server::start(scratch.path(), &args);
    let lock = WriteLock::take(&scratch.db);
    send_datagrams(server.addr, (0..3000).map(unique));
    server.wait_for_line("attempt 1 to commit", EXIT);
    let status = server.stop_with(libc::SIGTERM, EXIT);
    assert_eq!(status.code(), Some(1), "log:\n{}", server.log_text());
    let counts = server.shutdown_counts();
    assert_eq!(
        (counts["accepted"], counts["spilled"], counts["persisted"]),
        (3000, 3000, 0)
    );
    server.wait_for_line(
        &format!("spilled 3000 readings to {}", spill.display()),
        EXIT,
    );
    assert_eq!(spill_lines(&spill), 3000);
    drop(lock);
    assert_eq!(row_count(&scratch.db), 0);

    let mut server = Server::start(scratch.path(), &args);
    server.wait_for_line("replayed 3000 readings", EXIT);
    assert!(!spill.exists(), "the spill file is removed after replay");
    assert!(server.stop_with(libc::SIGTERM, EXIT).success());
    assert_eq!(row_count(&scratch.db), 3000);
    assert_eq!(distinct_ids(&scratch.db), 3000);
}

/// A second signal during a long final flush: out within 3 s, and database
/// rows plus spilled lines are everything accepted; replay restores it all.
#[test]
fn second_signal_abandons_a_long_final_flush() {
    let scratch = Scratch::new();
    let spill = scratch.path().join("sensors.db.spill.jsonl");
    let args = [
        "--db",
        scratch.db_arg(),
        "--flush-interval",
        "1h",
        "--batch-size",
        "1000000",
        "--stats-interval",
        "100ms",
    ];
    let mut server = Server::start(scratch.path(), &args);
    send_readings(
        server.addr,
        &["--interval", "0", "--count", "300000"],
        scratch.path(),
    );
    thread::sleep(Duration::from_millis(300));
    signal(server.pid(), libc::SIGTERM);
    server.wait_for_line("stopping:", EXIT);
    thread::sleep(Duration::from_millis(20));
    let second = Instant::now();
    signal(server.pid(), libc::SIGTERM);
    let status = server.wait(EXIT);
    let took = second.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "exit took {took:?}; log:\n{}",
        server.log_text()
    );
    let counts = server.shutdown_counts();
    let (rows, spilled) = (row_count(&scratch.db), spill_lines(&spill) as u64);
    assert_eq!(rows + spilled, counts["accepted"], "{counts:?}");
    assert!(spilled > 0, "the final flush was abandoned, not finished");
    assert_eq!(status.code(), Some(1));
    eprintln!("second signal: exit {took:?} after it; {rows} rows committed, {spilled} spilled");

    let mut server = Server::start(scratch.path(), &args[..2]);
    assert!(server.stop_with(libc::SIGTERM, EXIT).success());
    assert_eq!(row_count(&scratch.db), counts["accepted"]);
}

/// An injected write error is retried until the batch commits.
#[cfg(feature = "failpoints")]
#[test]
fn failed_writes_are_retried() {
    let scratch = Scratch::new();
    let mut server = Server::start_with_env(
        scratch.path(),
        &["--db", scratch.db_arg()],
        &[("FAILPOINTS", "store::write_batch=3*return(disk I/O error)")],
    );
    send_datagrams(server.addr, (0..2000).map(unique));
    server.wait_for_line("committed after 4 attempts", EXIT);
    assert!(server.stop_with(libc::SIGTERM, EXIT).success());
    assert_eq!(row_count(&scratch.db), 2000);
    assert_eq!(distinct_ids(&scratch.db), 2000);
}

/// The persister panics: the guard still flushes what was queued and held,
/// and the exit status says something went wrong.
#[cfg(feature = "failpoints")]
#[test]
fn persister_panic_is_flushed_by_the_guard() {
    let scratch = Scratch::new();
    let mut server = Server::start_with_env(
        scratch.path(),
        &["--db", scratch.db_arg()],
        &[("FAILPOINTS", "persister::commit=panic(injected)")],
    );
    send_datagrams(server.addr, (0..3000).map(unique));
    let status = server.wait(EXIT);
    assert_eq!(status.code(), Some(1), "log:\n{}", server.log_text());
    assert!(
        server.log_text().contains("thread persister panicked"),
        "{}",
        server.log_text()
    );
    let counts = server.shutdown_counts();
    assert_eq!(row_count(&scratch.db), counts["accepted"]);
    assert_eq!(counts["flushed_at_shutdown"], counts["accepted"]);
    assert!(counts["accepted"] > 0);
}

/// A corrupt spill file: start-up is refused naming file and line, and the
/// file is kept; with --skip-bad-spill-lines the good lines are imported.
#[test]
fn corrupt_spill_file_is_refused() {
    let scratch = Scratch::new();
    let spill = scratch.path().join("sensors.db.spill.jsonl");
    let good =
        r#"{"sensor_id":1,"temperature":1.5,"humidity":2.5,"ingested_at":10.0,"received_at":11.0}"#;
    fs::write(&spill, format!("{good}\n{{\"sensor_id\": oops\n{good}\n")).unwrap();
    let out = run(
        &["serve", "--bind", "127.0.0.1:0", "--db", scratch.db_arg()],
        scratch.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "error: spill file {} line 2 is not a valid reading",
            spill.display()
        )),
        "{stderr}"
    );
    assert!(spill.exists());

    let mut server = Server::start(
        scratch.path(),
        &["--db", scratch.db_arg(), "--skip-bad-spill-lines"],
    );
    server.wait_for_line("replayed 2 readings", EXIT);
    assert!(server.stop_with(libc::SIGTERM, EXIT).success());
    assert!(!spill.exists());
    assert_eq!(row_count(&scratch.db), 2);
}

/// A spill file imported before a crash (file not yet removed) is not
/// imported again.
#[test]
fn replay_is_idempotent() {
    let scratch = Scratch::new();
    let spill = scratch.path().join("sensors.db.spill.jsonl");
    let line =
        r#"{"sensor_id":5,"temperature":1.5,"humidity":2.5,"ingested_at":10.0,"received_at":11.0}"#;
    fs::write(&spill, format!("{line}\n")).unwrap();
    let copy = fs::read(&spill).unwrap();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    assert!(server.stop_with(libc::SIGTERM, EXIT).success());
    // As if the process died after the commit but before removing the file.
    fs::write(&spill, copy).unwrap();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    server.wait_for_line("already imported", EXIT);
    assert!(server.stop_with(libc::SIGTERM, EXIT).success());
    assert_eq!(row_count(&scratch.db), 1);
    assert!(!spill.exists());
}

/// Force kernel drops (a tiny buffer, the server stopped) and compare the
/// shutdown line with the socket's own counter; the datagram ledger balances.
#[test]
fn kernel_drops_match_the_socket_counter() {
    let scratch = Scratch::new();
    let mut server = Server::start(
        scratch.path(),
        &["--db", scratch.db_arg(), "--recv-buffer", "4096"],
    );
    pause(server.pid());
    send_datagrams(server.addr, (0..2000).map(unique));
    let dropped = proc_drops(server.pid());
    assert!(dropped > 0, "a 4 KiB buffer cannot hold 2000 datagrams");
    signal(server.pid(), libc::SIGCONT);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        proc_drops(server.pid()),
        dropped,
        "no drops after the burst"
    );
    let counts = server.stop_clean();
    assert_eq!(counts["kernel_drops"], dropped);
    eprintln!(
        "kernel drops: shutdown line {}, /proc/net/udp {dropped}",
        counts["kernel_drops"]
    );
    assert_ledger(&counts, counts["received"], 2000);
    assert_eq!(row_count(&scratch.db), 2000 - dropped);
}

/// A full-speed flood of maximum-size datagrams (valid arrays and garbage)
/// keeps memory bounded, and the server keeps serving afterwards.
#[test]
fn max_size_flood_keeps_memory_bounded() {
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    let array = max_size_array();
    let garbage = vec![b'x'; 65_507];
    let seconds: u64 = std::env::var("SENSORD_FLOOD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let sent = AtomicU64::new(0);
    let until = Instant::now() + Duration::from_secs(seconds);
    thread::scope(|scope| {
        for payload in [array.as_bytes(), &garbage[..]] {
            let (sent, addr) = (&sent, server.addr);
            scope.spawn(move || {
                let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
                while Instant::now() < until {
                    for _ in 0..100 {
                        socket.send_to(payload, addr).unwrap();
                    }
                    sent.fetch_add(100, Ordering::Relaxed);
                }
            });
        }
    });
    let peak = peak_rss(server.pid()).expect("the server is running");
    // Once the server has read what the flood left in its socket buffer, a
    // new reading has room.
    let deadline = Instant::now() + Duration::from_secs(60);
    while proc_rx_queue(server.pid()) > 0 {
        assert!(
            Instant::now() < deadline,
            "socket buffer still full after 60 s"
        );
        thread::sleep(Duration::from_millis(20));
    }
    send_datagrams(server.addr, [unique(u64::MAX / 4)]);
    let counts = server.stop_clean();
    eprintln!(
        "flood: {} datagrams in {seconds} s, peak RSS {} MiB, {counts:?}",
        sent.load(Ordering::Relaxed),
        peak / 1024
    );
    assert!(peak < 256 * 1024, "peak RSS {peak} KiB under the flood");
    let conn = rusqlite::Connection::open(&scratch.db).unwrap();
    let last: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sensor_measurements WHERE sensor_id = ?1",
            [(u64::MAX / 4) as i64],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(last, 1, "a valid reading after the flood is stored");
    assert_eq!(row_count(&scratch.db), counts["accepted"]);
}

/// With --allow 127.0.0.1/32 a datagram from 127.0.0.2 is denied and
/// counted; one from 127.0.0.1 is stored.
#[test]
fn allowlist_denies_other_sources() {
    let scratch = Scratch::new();
    let mut server = Server::start(
        scratch.path(),
        &["--db", scratch.db_arg(), "--allow", "127.0.0.1/32"],
    );
    let outsider = UdpSocket::bind("127.0.0.2:0").unwrap();
    outsider.send_to(unique(1).as_bytes(), server.addr).unwrap();
    send_datagrams(server.addr, [unique(2)]);
    let counts = server.stop_clean();
    assert_eq!(
        (counts["denied"], counts["received"], counts["accepted"]),
        (1, 1, 1)
    );
    assert!(
        server
            .log_text()
            .contains("denied datagram from 127.0.0.2:")
    );
    let stored = rows(&scratch.db);
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].sensor_id, 2);
}
