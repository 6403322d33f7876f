//! `GET /metrics`: the ledger, the commit log and the process's own
//! memory and CPU in the Prometheus text format, encoded by
//! `prometheus-client` from a snapshot taken per scrape. Names follow
//! Prometheus conventions: a `sensord_` prefix, base units, `_total` on
//! counters (the encoder appends it), and the client libraries' standard
//! `process_*` names for the process's own figures.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::Sources;
use crate::ledger::{COMMIT_BUCKETS, Counts};
use crate::reading::Rejection;
use crate::receiver;

/// The Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The version and the commit it was built from.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("SENSORD_BUILD"), ")");

/// The page's text.
pub fn render(sources: &Sources) -> String {
    let snapshot = Snapshot::take(sources);
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut body = String::new();
    // Writing to a String cannot fail.
    prometheus_client::encoding::prometheus_text::encode(&mut body, &registry)
        .expect("encoding into a String");
    body
}

/// Everything one scrape shows, read at once.
#[derive(Debug)]
struct Snapshot {
    counts: Counts,
    commits: u64,
    commit_failures: u64,
    /// Commits per bucket (not cumulative: the encoder adds them up), the
    /// last one unbounded.
    commit_buckets: Vec<(f64, u64)>,
    commit_seconds: f64,
    last_commit_seconds: f64,
    spill_files_replayed: u64,
    process: Option<Process>,
}

impl Snapshot {
    fn take(sources: &Sources) -> Self {
        let ledger = &sources.ledger;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let log = &ledger.commits;
        let commit_buckets: Vec<(f64, u64)> = COMMIT_BUCKETS
            .iter()
            .chain([&f64::INFINITY])
            .zip(&log.buckets)
            .map(|(bound, n)| (*bound, get(n)))
            .collect();
        Snapshot {
            counts: ledger.snapshot(receiver::kernel_drops(&sources.socket)),
            // The buckets' sum, read once, so the count agrees with them.
            commits: commit_buckets.iter().map(|(_, n)| n).sum(),
            commit_failures: get(&log.failed),
            commit_buckets,
            commit_seconds: get(&log.micros) as f64 / 1e6,
            last_commit_seconds: get(&log.last_ms) as f64 / 1e3,
            spill_files_replayed: get(&ledger.spill_files_replayed),
            process: Process::read(),
        }
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.counts;
        let counters: [(&str, &str, u64); 15] = [
            (
                "sensord_datagrams_received",
                "Datagrams read from the socket from allowed sources.",
                c.received,
            ),
            (
                "sensord_datagrams_denied",
                "Datagrams dropped because their source is not in --allow.",
                c.denied,
            ),
            (
                "sensord_datagrams_kernel_dropped",
                "Datagrams the kernel dropped on the socket (receive buffer full) before a stop.",
                c.kernel_drops,
            ),
            (
                "sensord_datagrams_unread",
                "Datagrams that arrived after a stop began and were not read.",
                c.unread,
            ),
            (
                "sensord_readings_accepted",
                "Valid readings handed to the persister.",
                c.accepted,
            ),
            (
                "sensord_readings_persisted",
                "Readings committed to the database, final flush included.",
                c.persisted,
            ),
            (
                "sensord_readings_flushed_at_shutdown",
                "Readings committed by the final flush at a stop.",
                c.flushed_at_shutdown,
            ),
            (
                "sensord_readings_spilled",
                "Readings written to the spill file at a stop.",
                c.spilled,
            ),
            (
                "sensord_readings_duplicate",
                "Sequenced readings already stored or queued, not stored again.",
                c.duplicates,
            ),
            (
                "sensord_readings_late",
                "Sequenced readings older than their sensor's duplicate window, not stored.",
                c.late,
            ),
            (
                "sensord_readings_dead_lettered",
                "Readings the database refused for good, in the dead-letter file.",
                c.dead_letter,
            ),
            (
                "sensord_readings_lost",
                "Readings that could be neither committed nor written to a file.",
                c.lost,
            ),
            (
                "sensord_readings_expired",
                "Readings deleted by --retain.",
                c.expired,
            ),
            (
                "sensord_batch_commit_failures",
                "Failed attempts to commit a batch (each retry counts).",
                self.commit_failures,
            ),
            (
                "sensord_spill_files_replayed",
                "Spill files imported at start.",
                self.spill_files_replayed,
            ),
        ];
        for (name, help, value) in counters {
            encoder
                .encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
        }
        {
            let mut rejected = encoder.encode_descriptor(
                "sensord_readings_rejected",
                "Invalid readings, by reason; an unparseable datagram counts as one.",
                None,
                MetricType::Counter,
            )?;
            for (i, n) in c.rejected_by_reason.iter().enumerate() {
                rejected
                    .encode_family(&[("reason", Rejection::kind_name(i))])?
                    .encode_counter::<NoLabelSet, _, u64>(n, None)?;
            }
        }
        encoder
            .encode_descriptor(
                "sensord_batch_commits",
                "Batches the persister committed.",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&self.commits, None)?;
        encoder
            .encode_descriptor(
                "sensord_batch_commit_duration_seconds",
                "Time to commit a batch (the successful attempt).",
                None,
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(
                self.commit_seconds,
                self.commits,
                &self.commit_buckets,
                None,
            )?;
        let gauges: [(&str, &str, f64); 3] = [
            (
                "sensord_readings_queued",
                "Accepted readings in memory, not yet stored or set aside.",
                c.queued as f64,
            ),
            (
                "sensord_receive_buffer_peak_ratio",
                "The fullest the socket's receive buffer was seen this run (0 to 1).",
                c.buffer_peak as f64 / 1000.0,
            ),
            (
                "sensord_last_commit_timestamp_seconds",
                "When the last batch commit ended, unix time; 0 before the first.",
                self.last_commit_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&value)?;
        }
        encoder
            .encode_descriptor(
                "sensord_build_info",
                "The running version; always 1.",
                None,
                MetricType::Gauge,
            )?
            .encode_family(&[("version", VERSION)])?
            .encode_gauge(&1i64)?;
        if let Some(process) = &self.process {
            encoder
                .encode_descriptor(
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes.",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&process.resident_bytes)?;
            encoder
                .encode_descriptor(
                    "process_cpu_seconds",
                    "Total user and system CPU time spent in seconds.",
                    None,
                    MetricType::Counter,
                )?
                .encode_counter::<NoLabelSet, _, u64>(&process.cpu_seconds, None)?;
        }
        Ok(())
    }
}

/// The process's own figures, from /proc/self (Linux only).
#[derive(Debug)]
struct Process {
    resident_bytes: u64,
    cpu_seconds: f64,
}

impl Process {
    fn read() -> Option<Self> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let (page, ticks) = unsafe {
            (
                libc::sysconf(libc::_SC_PAGESIZE),
                libc::sysconf(libc::_SC_CLK_TCK),
            )
        };
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        // The command name, in parentheses, may hold spaces: fields are
        // counted from after its closing one (utime and stime are the 14th
        // and 15th fields, so the 12th and 13th after it).
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let mut after = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
        let utime: u64 = after.next()?.parse().ok()?;
        let stime: u64 = after.next()?.parse().ok()?;
        Some(Process {
            resident_bytes: resident_pages * u64::try_from(page).ok()?,
            cpu_seconds: (utime + stime) as f64 / ticks.max(1) as f64,
        })
    }
}
