//! The ingest rate over the last ten minutes, for the dashboard's chart:
//! the ledger's counters sampled once a second into a ring buffer by the
//! `http` thread between requests. No database query, no lock: the thread
//! that samples is the only one that reads it.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ledger::Ledger;
use crate::reading::unix_now;

/// How often the counters are sampled.
pub const EVERY: Duration = Duration::from_secs(1);
/// Samples kept: ten minutes' worth.
pub const SAMPLES: usize = 600;

/// The counters at one moment.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Unix seconds.
    at: f64,
    received: u64,
    accepted: u64,
    rejected: u64,
    persisted: u64,
}

/// The last `SAMPLES` samples, oldest first.
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
    /// When the newest sample was taken.
    last: Option<Instant>,
}

/// Per-second rates between consecutive samples, as the page charts them:
/// one array per counter, `t` the end of each interval (unix seconds).
#[derive(Debug, Default, PartialEq, Serialize)]
pub struct Rates {
    pub t: Vec<f64>,
    /// Datagrams per second.
    pub received: Vec<f64>,
    /// Readings per second.
    pub accepted: Vec<f64>,
    pub rejected: Vec<f64>,
    pub persisted: Vec<f64>,
}

impl History {
    /// Takes a sample if `EVERY` has passed since the last one.
    pub fn sample_if_due(&mut self, ledger: &Ledger) {
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < EVERY) {
            return;
        }
        self.last = Some(now);
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        self.push(Sample {
            at: unix_now(),
            received: get(&ledger.received),
            accepted: get(&ledger.accepted),
            rejected: get(&ledger.rejected),
            persisted: get(&ledger.persisted),
        });
    }

    /// Adds a sample, dropping the oldest when full.
    fn push(&mut self, sample: Sample) {
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// The rates between each pair of consecutive samples. An interval is
    /// its measured length, so a sample taken late (the thread was busy
    /// answering) does not make a spike.
    pub fn rates(&self) -> Rates {
        let mut rates = Rates::default();
        for (a, b) in self.samples.iter().zip(self.samples.iter().skip(1)) {
            let seconds = (b.at - a.at).max(1e-3);
            let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / seconds;
            rates.t.push(b.at);
            rates.received.push(rate(a.received, b.received));
            rates.accepted.push(rate(a.accepted, b.accepted));
            rates.rejected.push(rate(a.rejected, b.rejected));
            rates.persisted.push(rate(a.persisted, b.persisted));
        }
        rates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The buffer keeps the newest `SAMPLES` samples, and a rate is the
    /// counter's increase over the interval's length.
    #[test]
    fn keeps_the_newest_samples_and_rates_are_per_second() {
        let mut history = History::default();
        for i in 0..SAMPLES as u64 + 10 {
            history.push(Sample {
                at: i as f64 * 2.0,
                received: i * 10,
                accepted: i * 20,
                rejected: 0,
                persisted: i * 20,
            });
        }
        let rates = history.rates();
        assert_eq!(rates.t.len(), SAMPLES - 1);
        assert_eq!(rates.t[0], 22.0);
        assert!(rates.received.iter().all(|r| *r == 5.0));
        assert!(rates.accepted.iter().all(|r| *r == 10.0));
    }
}
