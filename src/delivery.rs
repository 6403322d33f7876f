//! Exactly-once delivery of sequenced readings: a sliding window per
//! sensor and boot that tells a new reading from a duplicate in O(1), and
//! the loss counters RTCP receiver reports keep (RFC 3550 §6.4.1, A.3).
//! Pure logic, no I/O: the persister loads a stream's state through the
//! store the first time it meets it, and the store commits each stream's
//! `StreamRecord` in the transaction of the readings it describes.
//!
//! A stream's window is the `WINDOW` sequence numbers up to the highest
//! received, one bit each, as the IPsec and DTLS anti-replay windows keep
//! them (RFC 4303 §3.4.3, RFC 6347 §4.1.2.6). A reading older than the
//! window cannot be told from a duplicate, so it is not stored: it is
//! counted as `late`. A client that keeps at most `WINDOW` readings in
//! flight (`sensord send --reliable` keeps at most 10,000 by default)
//! never retransmits one that old.

use std::collections::HashMap;

use crate::reading::{Reading, Sensor, SensorId, Sequence};

/// How far behind the highest sequence number a reading may arrive and
/// still be told apart from a duplicate: 16,384 readings, 2 KiB per stream.
pub const WINDOW: u64 = 16_384;
const WORDS: usize = (WINDOW / 64) as usize;

/// The most streams kept in memory (64 MiB of windows at most; a stream
/// without gaps holds none). Beyond it
/// the ones heard from longest ago are dropped; their state is in the
/// database and is loaded again if they speak.
const MAX_STREAMS: usize = 32_768;

/// One boot of one sensor.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamKey {
    pub sensor: SensorId,
    pub boot: u64,
}

impl StreamKey {
    pub fn of(sensor: Sensor<'_>, boot: u64) -> StreamKey {
        let sensor = match sensor {
            Sensor::Int(id) => SensorId::Int(id),
            Sensor::Name(name) => SensorId::Name(name.into()),
        };
        StreamKey { sensor, boot }
    }
}

/// A stream's state as the database keeps it (table `sensord_sequences`).
#[derive(Clone, Debug, PartialEq)]
pub struct StreamRecord {
    /// The lowest sequence number received.
    pub base: u64,
    /// The highest sequence number received.
    pub highest: u64,
    /// Distinct readings received (stored, or in the dead-letter file).
    pub received: u64,
    /// Readings received again and not stored.
    pub duplicates: u64,
    /// Readings that arrived below the highest then received (a
    /// retransmission that fills a gap is one).
    pub reordered: u64,
    /// Readings older than the window, not stored.
    pub late: u64,
    /// When the first and the latest reading reached sensord, unix seconds.
    pub first_seen: f64,
    pub last_seen: f64,
    /// The sequence numbers in the window not received, as closed ranges
    /// in ascending order.
    pub missing: Vec<(u64, u64)>,
}

impl StreamRecord {
    /// Readings expected from the sequence numbers: base to highest.
    pub fn expected(&self) -> u64 {
        self.highest - self.base + 1
    }

    /// Readings expected and never received: the gaps not filled.
    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
    }

    /// `missing` as stored: `[[a,b],...]`.
    pub fn missing_text(&self) -> String {
        // Integers only: writing them cannot fail.
        serde_json::to_string(&self.missing).expect("ranges as JSON")
    }

    /// Reads `missing_text`'s form back; None if it is not that.
    pub fn parse_missing(text: &str) -> Option<Vec<(u64, u64)>> {
        serde_json::from_str(text).ok()
    }
}

/// What became of one sequenced reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not seen before: store it.
    New,
    /// Already stored or queued: count it, store nothing.
    Duplicate,
    /// Older than the window: cannot be told from a duplicate.
    Late,
}

/// One stream's window and counters.
#[derive(Clone, Debug)]
struct Stream {
    record: StreamRecord,
    /// Bit `seq % WINDOW` is set if `seq`, within the window, was received.
    /// None while every sequence number from `window_start` to `highest`
    /// was received, as for a stream without gaps: the 2 KiB are only
    /// allocated when a reading is missing or arrives out of order, so a
    /// flood of one-reading streams costs a record each, not a window.
    bits: Option<Box<[u64; WORDS]>>,
    /// Changed since its state was last handed to the store.
    dirty: bool,
}

impl Stream {
    fn first(seq: u64, at: f64) -> Stream {
        Stream {
            record: StreamRecord {
                base: seq,
                highest: seq,
                received: 1,
                duplicates: 0,
                reordered: 0,
                late: 0,
                first_seen: at,
                last_seen: at,
                missing: Vec::new(),
            },
            bits: None,
            dirty: true,
        }
    }

    fn from_record(record: StreamRecord) -> Stream {
        let mut stream = Stream {
            bits: None,
            record,
            dirty: false,
        };
        if stream.record.missing.is_empty() {
            return stream;
        }
        let mut bits = Box::new([0; WORDS]);
        let mut missing = stream.record.missing.iter().copied().peekable();
        for seq in stream.window_start()..=stream.record.highest {
            while missing.next_if(|&(_, hi)| hi < seq).is_some() {}
            let gap = missing.peek().is_some_and(|&(lo, _)| lo <= seq);
            if !gap {
                set_bit(&mut bits, seq);
            }
        }
        stream.bits = Some(bits);
        stream
    }

    /// The lowest sequence number the window covers that could have been
    /// received.
    fn window_start(&self) -> u64 {
        self.record
            .base
            .max(self.record.highest.saturating_sub(WINDOW - 1))
    }

    /// The bitmap, made from the dense state if there is none yet.
    fn bits(&mut self) -> &mut [u64; WORDS] {
        let (start, highest) = (self.window_start(), self.record.highest);
        self.bits.get_or_insert_with(|| {
            let mut bits = Box::new([0; WORDS]);
            for seq in start..=highest {
                set_bit(&mut bits, seq);
            }
            bits
        })
    }

    /// Whether `seq`, within the window, was received.
    fn get(&self, seq: u64) -> bool {
        match &self.bits {
            Some(bits) => {
                let bit = seq % WINDOW;
                bits[(bit / 64) as usize] & (1 << (bit % 64)) != 0
            }
            None => seq >= self.window_start() && seq <= self.record.highest,
        }
    }

    fn observe(&mut self, seq: u64, at: f64) -> Verdict {
        self.dirty = true;
        self.record.last_seen = self.record.last_seen.max(at);
        let highest = self.record.highest;
        if seq > highest {
            if self.bits.is_some() || seq > highest + 1 {
                let bits = self.bits();
                if seq - highest >= WINDOW {
                    bits.fill(0);
                } else {
                    for s in highest + 1..seq {
                        clear_bit(bits, s);
                    }
                }
                set_bit(bits, seq);
            }
            self.record.highest = seq;
            self.record.received += 1;
            Verdict::New
        } else if highest - seq >= WINDOW {
            self.record.late += 1;
            Verdict::Late
        } else if self.get(seq) {
            self.record.duplicates += 1;
            Verdict::Duplicate
        } else {
            set_bit(self.bits(), seq);
            let r = &mut self.record;
            r.received += 1;
            r.reordered += 1;
            r.base = r.base.min(seq);
            Verdict::New
        }
    }

    /// True if `seq` was received and is still within the window.
    fn holds(&self, seq: u64) -> bool {
        seq <= self.record.highest
            && self.record.highest - seq < WINDOW
            && seq >= self.record.base
            && self.get(seq)
    }

    /// The record with `missing` brought up to date.
    fn snapshot(&self) -> StreamRecord {
        let mut record = self.record.clone();
        record.missing.clear();
        let Some(bits) = &self.bits else {
            return record;
        };
        let mut open: Option<u64> = None;
        let (start, highest) = (self.window_start(), self.record.highest);
        let mut seq = start;
        while seq <= highest {
            // A whole word received: skip it.
            if seq % 64 == 0 && highest - seq >= 63 && bits[((seq % WINDOW) / 64) as usize] == !0 {
                if let Some(lo) = open.take() {
                    record.missing.push((lo, seq - 1));
                }
                seq += 64;
                continue;
            }
            match (self.get(seq), open) {
                (false, None) => open = Some(seq),
                (true, Some(lo)) => {
                    record.missing.push((lo, seq - 1));
                    open = None;
                }
                _ => {}
            }
            seq += 1;
        }
        if let Some(lo) = open {
            record.missing.push((lo, highest));
        }
        record
    }
}

fn set_bit(bits: &mut [u64; WORDS], seq: u64) {
    let bit = seq % WINDOW;
    bits[(bit / 64) as usize] |= 1 << (bit % 64);
}

fn clear_bit(bits: &mut [u64; WORDS], seq: u64) {
    let bit = seq % WINDOW;
    bits[(bit / 64) as usize] &= !(1 << (bit % 64));
}

/// A stream whose state changed, as it now is.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamUpdate {
    pub key: StreamKey,
    pub record: StreamRecord,
}

/// What `Delivery::admit` made of a batch.
#[derive(Debug, Default)]
pub struct Admitted {
    /// The readings to store: every unsequenced one, and the new sequenced.
    pub readings: Vec<Reading>,
    /// The state of every stream the batch touched, to commit with it.
    pub streams: Vec<StreamUpdate>,
    /// Sequenced readings already stored or queued, not kept.
    pub duplicates: u64,
    /// Sequenced readings older than their stream's window, not kept.
    pub late: u64,
}

/// Every stream in memory. The caller loads each stream the store knows
/// before its first reading is admitted (`unknown`, then `insert`): a
/// stream `admit` does not find starts afresh.
#[derive(Debug, Default)]
pub struct Delivery {
    streams: HashMap<StreamKey, Stream>,
}

impl Delivery {
    pub fn new() -> Self {
        Self::default()
    }

    /// The streams among `readings` that are not in memory, each once.
    pub fn unknown(&self, readings: &[Reading]) -> Vec<StreamKey> {
        let mut keys: Vec<StreamKey> = Vec::new();
        for r in readings {
            let Some(Sequence { boot, .. }) = r.sequence() else {
                continue;
            };
            let key = StreamKey::of(r.sensor(), boot);
            if !self.streams.contains_key(&key) && !keys.contains(&key) {
                keys.push(key);
            }
        }
        keys
    }

    /// Puts a stream's state as the store has it in memory.
    pub fn insert(&mut self, key: StreamKey, record: StreamRecord) {
        self.streams.insert(key, Stream::from_record(record));
    }

    /// Drops the streams heard from longest ago, an eighth of them, once
    /// there are more than `MAX_STREAMS`. Only between batches: a dropped
    /// stream's state must be committed.
    pub fn make_room(&mut self) {
        if self.streams.len() <= MAX_STREAMS {
            return;
        }
        let mut seen: Vec<f64> = self.streams.values().map(|s| s.record.last_seen).collect();
        let cut = seen.len() / 8;
        seen.select_nth_unstable_by(cut, f64::total_cmp);
        let before = seen[cut];
        self.streams.retain(|_, s| s.record.last_seen >= before);
    }

    /// Decides each sequenced reading of `readings`, in order: keeps the new
    /// ones and every unsequenced one, counts the rest, and returns the
    /// state of each stream touched.
    pub fn admit(&mut self, readings: Vec<Reading>) -> Admitted {
        // Most batches hold no sequenced reading: they pass unmoved.
        if readings.iter().all(|r| r.sequence().is_none()) {
            return Admitted {
                readings,
                ..Admitted::default()
            };
        }
        let mut admitted = Admitted {
            readings: Vec::with_capacity(readings.len()),
            ..Admitted::default()
        };
        let mut touched: Vec<StreamKey> = Vec::new();
        // The last stream looked up: a sensor's readings come in runs.
        let mut last: Option<StreamKey> = None;
        for r in readings {
            let Some(Sequence { boot, seq }) = r.sequence() else {
                admitted.readings.push(r);
                continue;
            };
            let same = last
                .as_ref()
                .is_some_and(|k| k.boot == boot && sensor_is(&k.sensor, r.sensor()));
            if !same {
                last = Some(StreamKey::of(r.sensor(), boot));
            }
            // Set just above.
            let key = last.as_ref().expect("a key");
            let verdict = match self.streams.get_mut(key) {
                Some(stream) => {
                    if !stream.dirty {
                        touched.push(key.clone());
                    }
                    stream.observe(seq, r.received_at)
                }
                None => {
                    touched.push(key.clone());
                    self.streams
                        .insert(key.clone(), Stream::first(seq, r.received_at));
                    Verdict::New
                }
            };
            match verdict {
                Verdict::New => admitted.readings.push(r),
                Verdict::Duplicate => admitted.duplicates += 1,
                Verdict::Late => admitted.late += 1,
            }
        }
        for key in touched {
            // Every touched key is in the map: found or inserted above.
            let stream = self.streams.get_mut(&key).expect("a touched stream");
            stream.dirty = false;
            admitted.streams.push(StreamUpdate {
                record: stream.snapshot(),
                key,
            });
        }
        admitted
    }

    /// True if the reading `seq` of `key` was received (stored, queued or
    /// refused into the dead-letter file) and is within its window: what
    /// an acknowledgement may confirm.
    pub fn holds(&self, key: &StreamKey, seq: u64) -> bool {
        self.streams.get(key).is_some_and(|s| s.holds(seq))
    }
}

/// Whether `sensor` is `id`, without building a `SensorId`.
fn sensor_is(id: &SensorId, sensor: Sensor<'_>) -> bool {
    match (id, sensor) {
        (SensorId::Int(a), Sensor::Int(b)) => *a == b,
        (SensorId::Name(a), Sensor::Name(b)) => **a == *b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::ReadingParts;

    fn reading(sensor: i64, boot: u64, seq: u64) -> Reading {
        Reading::from(ReadingParts {
            sensor_id: SensorId::Int(sensor),
            temperature: Some(seq as f64),
            humidity: None,
            ingested_at: 1.0,
            received_at: 2.0,
            extra: None,
            seq: Some(seq),
            boot: Some(boot),
        })
    }

    fn seqs(readings: &[Reading]) -> Vec<u64> {
        readings.iter().map(|r| r.sequence().unwrap().seq).collect()
    }

    /// Duplicates are dropped and counted, gaps are lost until filled.
    #[test]
    fn duplicates_gaps_and_reordering() {
        let mut d = Delivery::new();
        let a = d.admit([0, 1, 1, 3, 5].map(|s| reading(1, 7, s)).to_vec());
        assert_eq!(seqs(&a.readings), [0, 1, 3, 5]);
        assert_eq!(a.duplicates, 1);
        let r = &a.streams[0].record;
        assert_eq!((r.expected(), r.received, r.lost()), (6, 4, 2));
        assert_eq!(r.missing, [(2, 2), (4, 4)]);
        let b = d.admit([4, 2, 3].map(|s| reading(1, 7, s)).to_vec());
        assert_eq!(seqs(&b.readings), [4, 2]);
        let r = &b.streams[0].record;
        assert_eq!((r.lost(), r.duplicates, r.reordered), (0, 2, 2));
        assert!(r.missing.is_empty());
    }

    /// A stream survives a round trip through its record; a reading older
    /// than the window is late, not stored.
    #[test]
    fn record_round_trip_and_late() {
        let mut d = Delivery::new();
        let first: Vec<Reading> = (0..20_000)
            .filter(|s| s % 7 != 0)
            .map(|s| reading(2, 0, s))
            .collect();
        let a = d.admit(first);
        let record = a.streams[0].record.clone();
        let mut again = Delivery::new();
        again.insert(StreamKey::of(Sensor::Int(2), 0), record);
        let b = again.admit(
            [19_998, 19_997, 19_600, 19_601, 0, 3]
                .map(|s| reading(2, 0, s))
                .to_vec(),
        );
        assert_eq!(seqs(&b.readings), [19_600]);
        assert_eq!((b.duplicates, b.late), (3, 2));
        let expected: Vec<(u64, u64)> = a.streams[0]
            .record
            .missing
            .iter()
            .filter(|r| r.0 != 19_600)
            .copied()
            .collect();
        assert_eq!(b.streams[0].record.missing, expected);
    }

    /// Streams without gaps hold no bitmap: a flood of one-reading streams
    /// costs a record each. A gap, or a reading out of order, makes one.
    #[test]
    fn only_streams_with_gaps_hold_a_window() {
        let mut d = Delivery::new();
        d.admit((0..10_000).map(|sensor| reading(sensor, 1, 7)).collect());
        d.admit((0..100).map(|s| reading(10_001, 1, s)).collect());
        assert!(d.streams.values().all(|s| s.bits.is_none()));
        d.admit(vec![reading(1, 1, 9)]);
        d.admit(vec![reading(2, 1, 3)]);
        let windows = d.streams.values().filter(|s| s.bits.is_some()).count();
        assert_eq!(windows, 2);
    }

    /// The window as the simplest thing that could work: every sequence
    /// number ever received, in a set.
    #[derive(Default)]
    struct Model {
        seen: std::collections::BTreeSet<u64>,
        highest: Option<u64>,
        duplicates: u64,
        reordered: u64,
        late: u64,
    }

    impl Model {
        fn observe(&mut self, seq: u64) -> Verdict {
            match self.highest {
                Some(h) if seq < h && h - seq >= WINDOW => {
                    self.late += 1;
                    return Verdict::Late;
                }
                _ => {}
            }
            if !self.seen.insert(seq) {
                self.duplicates += 1;
                return Verdict::Duplicate;
            }
            if self.highest.is_some_and(|h| seq < h) {
                self.reordered += 1;
            }
            self.highest = self.highest.max(Some(seq));
            Verdict::New
        }

        fn missing(&self) -> Vec<(u64, u64)> {
            let h = self.highest.unwrap();
            let base = *self.seen.first().unwrap();
            let start = base.max(h.saturating_sub(WINDOW - 1));
            let mut out: Vec<(u64, u64)> = Vec::new();
            for s in (start..=h).filter(|s| !self.seen.contains(s)) {
                match out.last_mut() {
                    Some(last) if last.1 + 1 == s => last.1 = s,
                    _ => out.push((s, s)),
                }
            }
            out
        }
    }

    proptest::proptest! {
        /// Any order of arrivals, duplicates included, stores the same
        /// readings and counts the same as the model, also when the stream
        /// is saved and loaded again partway.
        #[test]
        fn window_matches_the_model(
            arrivals in proptest::collection::vec(
                proptest::prop_oneof![0u64..200, 0u64..40_000, 16_000u64..17_000],
                1..600,
            ),
            split in 0usize..600,
        ) {
            let mut model = Model::default();
            let expected: Vec<u64> = arrivals
                .iter()
                .copied()
                .filter(|&s| model.observe(s) == Verdict::New)
                .collect();
            let split = split.min(arrivals.len());
            let mut d = Delivery::new();
            let first = d.admit(arrivals[..split].iter().map(|&s| reading(9, 1, s)).collect());
            let mut stored = seqs(&first.readings);
            let mut d = match first.streams.first() {
                Some(update) => {
                    let mut loaded = Delivery::new();
                    loaded.insert(update.key.clone(), update.record.clone());
                    loaded
                }
                None => d,
            };
            let second = d.admit(arrivals[split..].iter().map(|&s| reading(9, 1, s)).collect());
            stored.extend(seqs(&second.readings));
            proptest::prop_assert_eq!(&stored, &expected);
            proptest::prop_assert_eq!(first.duplicates + second.duplicates, model.duplicates);
            proptest::prop_assert_eq!(first.late + second.late, model.late);
            let record = &second.streams.last().or(first.streams.last()).unwrap().record;
            proptest::prop_assert_eq!(record.received, model.seen.len() as u64);
            proptest::prop_assert_eq!(record.highest, model.highest.unwrap());
            proptest::prop_assert_eq!(record.base, *model.seen.first().unwrap());
            proptest::prop_assert_eq!(record.reordered, model.reordered);
            proptest::prop_assert_eq!(&record.missing, &model.missing());
        }
    }

    /// Boots are separate streams: a late reading of the old boot after
    /// the new one began is still recognised.
    #[test]
    fn boots_are_separate() {
        let mut d = Delivery::new();
        d.admit((0..10).map(|s| reading(3, 1, s)).collect());
        let a = d.admit(vec![reading(3, 2, 0), reading(3, 1, 9), reading(3, 1, 10)]);
        assert_eq!(a.readings.len(), 2);
        assert_eq!(a.duplicates, 1);
        assert_eq!(a.streams.len(), 2);
    }
}
