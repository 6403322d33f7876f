//! Acknowledgements of sequenced readings (see README, "Delivery over a
//! lossy network"). The receiver notes, per datagram that carried a valid
//! sequenced reading, where it came from and which readings it held (an
//! `AckRequest`, riding in the `Chunk` with the readings); once every
//! reading taken before and with it is committed, the persister answers
//! it: one datagram per source and commit, listing the acknowledged
//! sequence numbers per sensor and boot as closed ranges, as TCP SACK and
//! QUIC ACK frames do.
//!
//! An ack never takes a source more bytes than it has sent since its last
//! ack: each source has a credit of the bytes of its datagrams, and acks
//! spend it, so sensord cannot be used to amplify traffic toward a forged
//! address. What does not fit waits for the sensor's next datagram (a
//! retransmission brings the credit).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};

use log::debug;

use crate::delivery::{Delivery, StreamKey};
use crate::reading::{Reading, SensorId};

/// The largest ack datagram: fits the IPv6 minimum MTU (1280) with room
/// for the headers, so it is never fragmented.
pub const MAX_ACK_BYTES: usize = 1200;
/// The most credit one source keeps: what a second of datagrams at line
/// rate could not exceed by much, and a bound on a forged source's worth.
const MAX_CREDIT: u64 = 1 << 20;
/// The most sources with credit remembered; past it the map starts over
/// (a sensor then waits for its next retransmission).
const MAX_SOURCES: usize = 65_536;

/// What the receiver hands the persister: readings, and the acks owed for
/// the datagrams they came in.
#[derive(Debug, Default)]
pub struct Chunk {
    pub readings: Vec<Reading>,
    /// One per datagram with a sequenced reading; empty (no allocation)
    /// for unsequenced datagrams and with `--acks off`.
    pub acks: Vec<AckRequest>,
}

impl Chunk {
    pub fn with_capacity(readings: usize) -> Self {
        Chunk {
            readings: Vec::with_capacity(readings),
            acks: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.readings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.readings.is_empty()
    }
}

/// A datagram's claim to an acknowledgement.
#[derive(Debug)]
pub struct AckRequest {
    /// Its source address and port, where the ack goes.
    pub to: SocketAddr,
    /// Its size: the credit it gives its source.
    pub bytes: u64,
    /// Its valid sequenced readings: stream and number.
    pub ids: Vec<(StreamKey, u64)>,
}

impl AckRequest {
    /// The request for the readings `readings` parsed from a datagram of
    /// `bytes` from `to`, if any is sequenced.
    pub fn of(to: SocketAddr, bytes: usize, readings: &[Reading]) -> Option<AckRequest> {
        let ids: Vec<(StreamKey, u64)> = readings
            .iter()
            .filter_map(|r| {
                let s = r.sequence()?;
                Some((StreamKey::of(r.sensor(), s.boot), s.seq))
            })
            .collect();
        (!ids.is_empty()).then_some(AckRequest {
            to,
            bytes: bytes as u64,
            ids,
        })
    }
}

/// Requests waiting for their readings' commit, and where acks go.
#[derive(Debug)]
pub struct Acks {
    /// A clone of the receiving socket; None with `--acks off`.
    socket: Option<UdpSocket>,
    /// Requests in arrival order, each with the count of readings taken
    /// from the channel up to and including its datagram's.
    pending: VecDeque<(u64, AckRequest)>,
    /// Readings taken from the channel so far.
    taken: u64,
    /// Of those, readings whose batch committed (or that admission found
    /// to be duplicates): batches are taken oldest first, so a request is
    /// due once `committed` reaches its count.
    committed: u64,
    /// Bytes each source has sent and not yet spent on acks.
    credit: HashMap<SocketAddr, u64>,
}

impl Acks {
    pub fn new(socket: Option<UdpSocket>) -> Self {
        Acks {
            socket,
            pending: VecDeque::new(),
            taken: 0,
            committed: 0,
            credit: HashMap::new(),
        }
    }

    /// Records a chunk's readings as taken, and its requests.
    pub fn taken(&mut self, readings: usize, requests: Vec<AckRequest>) {
        self.taken += readings as u64;
        if self.socket.is_some() {
            let at = self.taken;
            self.pending.extend(requests.into_iter().map(|r| (at, r)));
        }
    }

    /// Records that the oldest `n` taken readings are committed, and
    /// answers the requests that are then due. `delivery` says which
    /// sequence numbers are held (a late reading is not).
    pub fn committed(&mut self, n: usize, delivery: &Delivery) {
        self.committed += n as u64;
        let mut due = Vec::new();
        while self
            .pending
            .front()
            .is_some_and(|(at, _)| *at <= self.committed)
        {
            // Checked just above.
            due.push(self.pending.pop_front().expect("a due request").1);
        }
        self.answer(due, delivery);
    }

    /// Answers every request: the final flush committed everything.
    pub fn all_committed(&mut self, delivery: &Delivery) {
        self.committed = self.taken;
        let due: Vec<AckRequest> = self.pending.drain(..).map(|(_, r)| r).collect();
        self.answer(due, delivery);
    }

    fn answer(&mut self, due: Vec<AckRequest>, delivery: &Delivery) {
        if due.is_empty() {
            return;
        }
        let Some(socket) = &self.socket else {
            return;
        };
        // Per source, per stream, the sequence numbers to acknowledge.
        let mut by_source: BTreeMap<SocketAddr, BTreeMap<StreamKey, Vec<u64>>> = BTreeMap::new();
        for request in due {
            if self.credit.len() >= MAX_SOURCES && !self.credit.contains_key(&request.to) {
                self.credit.clear();
            }
            let credit = self.credit.entry(request.to).or_default();
            *credit = (*credit + request.bytes).min(MAX_CREDIT);
            let streams = by_source.entry(request.to).or_default();
            for (key, seq) in request.ids {
                if delivery.holds(&key, seq) {
                    streams.entry(key).or_default().push(seq);
                }
            }
        }
        for (to, streams) in by_source {
            let credit = self.credit.entry(to).or_default();
            for datagram in encode(streams, credit) {
                // A full send buffer or an unreachable sensor: it
                // retransmits and is acknowledged then.
                if let Err(e) = socket.send_to(datagram.as_bytes(), to) {
                    debug!("cannot send an ack to {to}: {e}");
                }
            }
        }
    }
}

/// The ack datagrams for `streams`, each at most `MAX_ACK_BYTES`, while
/// `credit` lasts; spends it.
fn encode(streams: BTreeMap<StreamKey, Vec<u64>>, credit: &mut u64) -> Vec<String> {
    const OPEN: &str = "{\"ack\":[";
    const CLOSE: &str = "]}";
    let mut datagrams = Vec::new();
    let mut current = String::from(OPEN);
    let budget = |credit: u64| (credit as usize).min(MAX_ACK_BYTES);
    for (key, mut seqs) in streams {
        seqs.sort_unstable();
        seqs.dedup();
        let mut ranges = ranges(&seqs).into_iter().peekable();
        while ranges.peek().is_some() {
            let head = entry_head(&key);
            let mut entry = head.clone();
            let mut added = 0;
            while let Some(&(lo, hi)) = ranges.peek() {
                let range = format!("{}[{lo},{hi}]", if added > 0 { "," } else { "" });
                let separator = usize::from(current.len() > OPEN.len());
                let size = current.len() + separator + entry.len() + range.len() + 2 + CLOSE.len();
                if size > budget(*credit) {
                    break;
                }
                entry += &range;
                added += 1;
                ranges.next();
            }
            if added > 0 {
                if current.len() > OPEN.len() {
                    current.push(',');
                }
                current += &entry;
                current += "]}";
            }
            let full = ranges.peek().is_some();
            if full {
                // The next range does not fit: close this datagram.
                if current.len() == OPEN.len() {
                    // Not even one range fits the credit left: stop.
                    return datagrams;
                }
                current += CLOSE;
                *credit -= current.len() as u64;
                datagrams.push(std::mem::replace(&mut current, String::from(OPEN)));
            }
        }
    }
    if current.len() > OPEN.len() {
        current += CLOSE;
        *credit -= current.len() as u64;
        datagrams.push(current);
    }
    datagrams
}

/// `{"sensor_id":42,"boot":7,"seq":[` for `key`.
fn entry_head(key: &StreamKey) -> String {
    let mut head = String::from("{\"sensor_id\":");
    match &key.sensor {
        SensorId::Int(id) => write!(head, "{id}").expect("writing to a String"),
        // A name is a string: serializing it cannot fail.
        SensorId::Name(name) => head += &serde_json::to_string(&**name).expect("a JSON string"),
    }
    write!(head, ",\"boot\":{},\"seq\":[", key.boot).expect("writing to a String");
    head
}

/// Sorted, distinct numbers as closed ranges.
fn ranges(seqs: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &s in seqs {
        match out.last_mut() {
            Some(last) if last.1 + 1 == s => last.1 = s,
            _ => out.push((s, s)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: i64, boot: u64) -> StreamKey {
        StreamKey {
            sensor: SensorId::Int(id),
            boot,
        }
    }

    /// Ranges are closed and merged; the ack is the documented JSON.
    #[test]
    fn ack_format() {
        let mut streams = BTreeMap::new();
        streams.insert(key(42, 7), (100..=163).chain([165]).collect::<Vec<u64>>());
        streams.insert(
            StreamKey {
                sensor: SensorId::Name("attic".into()),
                boot: 0,
            },
            vec![3, 1, 2, 2],
        );
        let mut credit = 10_000;
        let acks = encode(streams, &mut credit);
        assert_eq!(
            acks,
            [
                r#"{"ack":[{"sensor_id":42,"boot":7,"seq":[[100,163],[165,165]]},{"sensor_id":"attic","boot":0,"seq":[[1,3]]}]}"#
            ]
        );
        assert_eq!(credit, 10_000 - acks[0].len() as u64);
    }

    /// Acks never exceed the credit, and split at MAX_ACK_BYTES.
    #[test]
    fn credit_and_size_bound_acks() {
        let every_other: Vec<u64> = (0..2000).map(|i| i * 2).collect();
        let mut streams = BTreeMap::new();
        streams.insert(key(1, 1), every_other.clone());
        let mut credit = 5_000;
        let acks = encode(streams.clone(), &mut credit);
        let total: usize = acks.iter().map(String::len).sum();
        assert!(total <= 5_000 && acks.len() >= 4, "{total} {}", acks.len());
        assert!(acks.iter().all(|a| a.len() <= MAX_ACK_BYTES));
        for ack in &acks {
            let value: serde_json::Value = serde_json::from_str(ack).unwrap();
            assert!(value["ack"][0]["seq"].as_array().unwrap().len() > 1);
        }
        let mut none = 20;
        assert!(encode(streams, &mut none).is_empty());
        assert_eq!(none, 20);
    }
}
