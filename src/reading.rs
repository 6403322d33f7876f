//! The `Reading` type and datagram parsing and validation. No I/O.
//!
//! A datagram is UTF-8 JSON: one object, an array of objects, or several
//! of either separated by newlines (NDJSON). Each object is validated on
//! its own, so the good readings of a datagram are kept and each bad one
//! becomes one counted `Rejection`.
//!
//! The original datagram (an integer id, `temperature`, `humidity`,
//! numeric `ingested_at`) is parsed without a heap allocation: names and
//! extra fields live behind one `Box` that stays `None` for it.

use std::fmt;
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// The largest `ingested_at` accepted: 9999-12-31T23:59:59Z, which every
/// store can hold.
pub const MAX_INGESTED_AT: f64 = 253_402_300_799.0;

/// The integer keys the stores give sensor names, from the bottom of i64
/// up: an integer `sensor_id` in this range is rejected, so a name's key
/// never meets a sensor that sends an integer. The range is the 2^32
/// smallest i64s, -9223372036854775808 to -9223372032559808513.
pub const NAME_KEYS: std::ops::Range<i64> = i64::MIN..i64::MIN + (1 << 32);

/// The longest sensor name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// The most extra fields one reading keeps.
pub const MAX_EXTRA_FIELDS: usize = 32;
/// The longest extra field name, in bytes.
pub const MAX_EXTRA_KEY_BYTES: usize = 64;
/// The longest extra string value, in bytes.
pub const MAX_EXTRA_STRING_BYTES: usize = 256;
/// The most bytes of a reading's `extra` object, as stored (JSON text).
/// With the other limits it bounds what one queued reading holds.
pub const MAX_EXTRA_BYTES: usize = 1024;

/// The largest `seq` and `boot`: they are stored as signed 64-bit integers.
pub const MAX_SEQ: u64 = i64::MAX as u64;

/// `Labels::sequence`'s `seq` when a `boot` came without one (a spill line
/// `check` must refuse).
const NO_SEQ: u64 = u64::MAX;

/// Where a reading stands in its sensor's stream: the run of the sensor's
/// firmware (`boot`) and the reading's number in it (`seq`). With the
/// sensor, the identity that makes delivery exactly once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sequence {
    pub boot: u64,
    pub seq: u64,
}

/// Now as unix seconds, the unit of every timestamp in a reading.
pub fn unix_now() -> f64 {
    // Before 1970 only on a broken clock; 0 then keeps a reading valid.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One validated sensor reading, as queued, sorted and stored: 48 bytes,
/// packed because the channel, the batches, the sort and the final flush
/// move every reading several times. Unpacked (80 bytes: `Option`s and two
/// boxes) the final flush of a million took 0.513 s against main's 0.480;
/// packed, 0.490 against 0.488, and peak RSS 36.4 MiB instead of 40
/// (`scripts/bench.sh`; docs/decisions/real-sensors.md). The original
/// datagram's reading holds no heap memory. A sequenced reading keeps its
/// `seq` and `boot` in the box too: in the reading itself they made every
/// reading 64 bytes and the final flush of a million unsequenced ones
/// 0.05 s slower (docs/decisions/sequence-numbers.md).
///
/// Build one from `ReadingParts`; read the sensor and the measurements
/// through the accessors, which say what the packing means.
#[derive(Clone)]
pub struct Reading {
    /// The integer sensor id; 0 when `labels` holds a name.
    sensor_id: i64,
    /// Conventionally °C; NaN when the sensor did not send it (a valid
    /// reading's measurements are finite, so NaN is free to mean "absent").
    temperature: f64,
    /// Conventionally %RH; NaN when absent, as `temperature`.
    humidity: f64,
    /// Unix seconds when the sensor took the reading (or `received_at`).
    pub ingested_at: f64,
    /// Unix seconds when the datagram reached sensord.
    pub received_at: f64,
    /// The sensor's name, extra fields and sequence number; None (no
    /// allocation) when it has none, as for the original datagram.
    labels: Option<Box<Labels>>,
}

/// What a reading holds besides measurements and times, boxed together so
/// that a reading without any costs one pointer.
#[derive(Clone)]
struct Labels {
    name: Option<Box<str>>,
    extra: Option<Extra>,
    sequence: Option<Sequence>,
}

/// A reading's fields unpacked: how one is built, and its spill line form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename = "Reading", deny_unknown_fields)]
pub struct ReadingParts {
    pub sensor_id: SensorId,
    /// None when the sensor did not send it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// None when the sensor did not send it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub humidity: Option<f64>,
    pub ingested_at: f64,
    pub received_at: f64,
    /// The sensor's other fields, if it sent any (and they are kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Extra>,
    /// The reading's number in its sensor's boot, if the sensor numbers
    /// its readings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The sensor's boot; only with `seq` (absent is 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<u64>,
}

impl From<ReadingParts> for Reading {
    /// A measurement of `Some(NaN)` becomes absent; none that is valid is NaN.
    fn from(parts: ReadingParts) -> Reading {
        let (sensor_id, name) = match parts.sensor_id {
            SensorId::Int(id) => (id, None),
            SensorId::Name(name) => (0, Some(name)),
        };
        // A `boot` without `seq` is kept apart, so `check` can refuse it.
        let sequence = match (parts.seq, parts.boot) {
            (Some(seq), boot) => Some(Sequence {
                seq,
                boot: boot.unwrap_or(0),
            }),
            (None, Some(boot)) => Some(Sequence { seq: NO_SEQ, boot }),
            (None, None) => None,
        };
        let labels = (name.is_some() || parts.extra.is_some() || sequence.is_some()).then(|| {
            Box::new(Labels {
                name,
                extra: parts.extra,
                sequence,
            })
        });
        Reading {
            sensor_id,
            temperature: parts.temperature.unwrap_or(f64::NAN),
            humidity: parts.humidity.unwrap_or(f64::NAN),
            ingested_at: parts.ingested_at,
            received_at: parts.received_at,
            labels,
        }
    }
}

impl Reading {
    /// The sensor that sent it.
    pub fn sensor(&self) -> Sensor<'_> {
        match self.labels.as_deref() {
            Some(Labels {
                name: Some(name), ..
            }) => Sensor::Name(name),
            _ => Sensor::Int(self.sensor_id),
        }
    }

    /// None when the sensor did not send it.
    pub fn temperature(&self) -> Option<f64> {
        measurement(self.temperature)
    }

    /// None when the sensor did not send it.
    pub fn humidity(&self) -> Option<f64> {
        measurement(self.humidity)
    }

    /// The reading's boot and number, if the sensor numbers its readings.
    pub fn sequence(&self) -> Option<Sequence> {
        self.labels.as_deref()?.sequence.filter(|s| s.seq != NO_SEQ)
    }

    /// The sensor's other fields, if it sent any (and they are kept).
    pub fn extra(&self) -> Option<&Extra> {
        self.labels
            .as_deref()
            .and_then(|labels| labels.extra.as_ref())
    }

    /// Checks the rules a stored reading must meet; used for spill lines,
    /// which bypass datagram parsing.
    pub fn check(&self) -> Result<(), Rejection> {
        match self.sensor() {
            Sensor::Int(id) if NAME_KEYS.contains(&id) => {
                return Err(Rejection::OutOfRange(Field::SensorId));
            }
            Sensor::Int(_) => {}
            Sensor::Name(name) => check_name(name)?,
        }
        for (field, value) in [
            (Field::Temperature, self.temperature()),
            (Field::Humidity, self.humidity()),
        ] {
            if value.is_some_and(|v| !v.is_finite()) {
                return Err(Rejection::OutOfRange(field));
            }
        }
        for (field, value) in [
            (Field::IngestedAt, self.ingested_at),
            (Field::ReceivedAt, self.received_at),
        ] {
            if !(0.0..=MAX_INGESTED_AT).contains(&value) {
                return Err(Rejection::OutOfRange(field));
            }
        }
        let numeric_extra = match self.extra() {
            Some(extra) => extra.check()?,
            None => false,
        };
        if self.temperature().is_none() && self.humidity().is_none() && !numeric_extra {
            return Err(Rejection::NoMeasurement);
        }
        if let Some(s) = self.labels.as_deref().and_then(|l| l.sequence) {
            if s.seq == NO_SEQ {
                return Err(Rejection::Missing(Field::Seq));
            }
            if s.seq > MAX_SEQ {
                return Err(Rejection::OutOfRange(Field::Seq));
            }
            if s.boot > MAX_SEQ {
                return Err(Rejection::OutOfRange(Field::Boot));
            }
        }
        Ok(())
    }
}

/// A packed measurement as an `Option`: NaN is absent.
fn measurement(value: f64) -> Option<f64> {
    (!value.is_nan()).then_some(value)
}

impl PartialEq for Reading {
    /// Field by field as `ReadingParts` compares: two absent measurements
    /// are equal (the NaNs that stand for them are not).
    fn eq(&self, other: &Reading) -> bool {
        self.sensor() == other.sensor()
            && self.temperature() == other.temperature()
            && self.humidity() == other.humidity()
            && self.ingested_at == other.ingested_at
            && self.received_at == other.received_at
            && self.extra() == other.extra()
            && self.sequence() == other.sequence()
    }
}

impl fmt::Debug for Reading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reading")
            .field("sensor", &self.sensor())
            .field("temperature", &self.temperature())
            .field("humidity", &self.humidity())
            .field("ingested_at", &self.ingested_at)
            .field("received_at", &self.received_at)
            .field("extra", &self.extra())
            .field("sequence", &self.sequence())
            .finish()
    }
}

impl Serialize for Reading {
    /// As a spill line: the fields of `ReadingParts`, in its order.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        #[serde(rename = "Reading")]
        struct Line<'a> {
            sensor_id: Sensor<'a>,
            #[serde(skip_serializing_if = "Option::is_none")]
            temperature: Option<f64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            humidity: Option<f64>,
            ingested_at: f64,
            received_at: f64,
            #[serde(skip_serializing_if = "Option::is_none")]
            extra: Option<&'a Extra>,
            #[serde(skip_serializing_if = "Option::is_none")]
            seq: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            boot: Option<u64>,
        }
        let sequence = self.sequence();
        Line {
            sensor_id: self.sensor(),
            temperature: self.temperature(),
            humidity: self.humidity(),
            ingested_at: self.ingested_at,
            received_at: self.received_at,
            extra: self.extra(),
            seq: sequence.map(|s| s.seq),
            boot: sequence.map(|s| s.boot),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Reading {
    /// From a spill line, old (both measurements, no extras) or new.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        ReadingParts::deserialize(deserializer).map(Reading::from)
    }
}

/// A reading's sensor, borrowed from it: a `SensorId` without owning the
/// name. Ordered as `SensorId` is: integers first, then names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sensor<'a> {
    Int(i64),
    Name(&'a str),
}

impl fmt::Display for Sensor<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sensor::Int(id) => write!(f, "{id}"),
            Sensor::Name(name) => f.write_str(name),
        }
    }
}

impl Serialize for Sensor<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Sensor::Int(id) => serializer.serialize_i64(*id),
            Sensor::Name(name) => serializer.serialize_str(name),
        }
    }
}

/// A sensor as it names itself: an integer, or a name. A string that is
/// exactly the canonical decimal form of an i64 (`"42"`, not `"042"` or
/// `"+42"`) is that integer, so `"42"` and `42` are one sensor.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SensorId {
    Int(i64),
    Name(Box<str>),
}

impl SensorId {
    /// Borrowed as a reading's sensor.
    pub fn as_sensor(&self) -> Sensor<'_> {
        match self {
            SensorId::Int(id) => Sensor::Int(*id),
            SensorId::Name(name) => Sensor::Name(name),
        }
    }

    /// The id a string denotes: the integer it spells canonically, else a
    /// name.
    pub fn from_text(text: &str) -> SensorId {
        match text.parse::<i64>() {
            Ok(id) if id.to_string() == text => SensorId::Int(id),
            _ => SensorId::Name(text.into()),
        }
    }
}

impl fmt::Display for SensorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SensorId::Int(id) => write!(f, "{id}"),
            SensorId::Name(name) => f.write_str(name),
        }
    }
}

impl Serialize for SensorId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            SensorId::Int(id) => serializer.serialize_i64(*id),
            SensorId::Name(name) => serializer.serialize_str(name),
        }
    }
}

impl<'de> Deserialize<'de> for SensorId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Scalar::deserialize(deserializer)? {
            Scalar::Int(id) => Ok(SensorId::Int(id)),
            Scalar::UInt(id) if i64::try_from(id).is_ok() => Ok(SensorId::Int(id as i64)),
            Scalar::Text(name) => Ok(SensorId::from_text(&name)),
            _ => Err(de::Error::custom(
                "sensor_id must be an integer in i64 or a name",
            )),
        }
    }
}

/// Checks a sensor name: 1 to `MAX_NAME_BYTES` bytes, no control characters.
fn check_name(name: &str) -> Result<(), Rejection> {
    if (1..=MAX_NAME_BYTES).contains(&name.len()) && !name.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(Rejection::BadName)
    }
}

/// A reading's extra fields: the text of a JSON object whose values are
/// numbers, booleans, strings or null, keys in sorted order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extra(Box<str>);

impl Extra {
    /// The JSON object text, as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Checks the limits on extra fields; returns whether one is a number.
    fn check(&self) -> Result<bool, Rejection> {
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&self.0).map_err(|_| Rejection::WrongType(Field::Extra))?;
        let mut numeric = false;
        if map.len() > MAX_EXTRA_FIELDS {
            return Err(Rejection::BadExtra(ExtraProblem::TooMany));
        }
        if self.0.len() > MAX_EXTRA_BYTES {
            return Err(Rejection::BadExtra(ExtraProblem::TooLarge));
        }
        for (key, value) in &map {
            if key.len() > MAX_EXTRA_KEY_BYTES {
                return Err(Rejection::BadExtra(ExtraProblem::LongKey));
            }
            match value {
                serde_json::Value::Number(_) => numeric = true,
                serde_json::Value::String(s) if s.len() > MAX_EXTRA_STRING_BYTES => {
                    return Err(Rejection::BadExtra(ExtraProblem::LongString));
                }
                serde_json::Value::Array(_) | serde_json::Value::Object(_) => {
                    return Err(Rejection::BadExtra(ExtraProblem::Nested));
                }
                _ => {}
            }
        }
        Ok(numeric)
    }

    /// Builds the object from fields as parsed; a repeated key keeps its
    /// last value.
    fn from_fields(fields: Vec<(String, ExtraValue)>) -> Extra {
        let map: serde_json::Map<String, serde_json::Value> = fields
            .into_iter()
            .map(|(key, value)| {
                let value = match value {
                    ExtraValue::Null => serde_json::Value::Null,
                    ExtraValue::Bool(v) => v.into(),
                    ExtraValue::Int(v) => v.into(),
                    ExtraValue::UInt(v) => v.into(),
                    // Finite: JSON text has no other numbers.
                    ExtraValue::Float(v) => v.into(),
                    ExtraValue::Str(v) => v.into(),
                };
                (key, value)
            })
            .collect();
        // Writing a map of strings and scalars cannot fail.
        Extra(serde_json::to_string(&map).expect("a JSON map").into())
    }
}

impl Serialize for Extra {
    /// As the JSON object itself, not a string holding it.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw = serde_json::value::RawValue::from_string(self.0.to_string())
            .map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Extra {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
        // Re-serialized so the stored text is the canonical form.
        Ok(Extra(
            serde_json::to_string(&map)
                .map_err(de::Error::custom)?
                .into(),
        ))
    }
}

/// The fields of a reading object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    SensorId,
    Temperature,
    Humidity,
    IngestedAt,
    /// Only in spill files: datagrams get it from the clock.
    ReceivedAt,
    /// Only in spill files: the extra fields as one object.
    Extra,
    /// The reading's sequence number.
    Seq,
    /// The sensor's boot.
    Boot,
}

impl Field {
    pub fn name(self) -> &'static str {
        match self {
            Field::SensorId => "sensor_id",
            Field::Temperature => "temperature",
            Field::Humidity => "humidity",
            Field::IngestedAt => "ingested_at",
            Field::ReceivedAt => "received_at",
            Field::Extra => "extra",
            Field::Seq => "seq",
            Field::Boot => "boot",
        }
    }
}

/// What is wrong with a reading's extra fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtraProblem {
    /// A value is an object or an array.
    Nested,
    /// A string value is over `MAX_EXTRA_STRING_BYTES`.
    LongString,
    /// A field name is over `MAX_EXTRA_KEY_BYTES`.
    LongKey,
    /// More than `MAX_EXTRA_FIELDS` extra fields.
    TooMany,
    /// The `extra` object is over `MAX_EXTRA_BYTES`.
    TooLarge,
}

/// Why a datagram or one of its readings was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    NotUtf8,
    NotJson,
    NotObject,
    Missing(Field),
    WrongType(Field),
    OutOfRange(Field),
    /// Neither `temperature`, `humidity` nor a numeric extra field.
    NoMeasurement,
    /// A `sensor_id` string that is empty, too long or has control characters.
    BadName,
    /// An extra field sensord does not store (see `ExtraProblem`).
    BadExtra(ExtraProblem),
}

impl Rejection {
    /// How many distinct reasons `index` distinguishes.
    pub const KINDS: usize = 9;

    /// A dense index per reason kind, for counters and rate limiting.
    pub fn index(self) -> usize {
        match self {
            Rejection::NotUtf8 => 0,
            Rejection::NotJson => 1,
            Rejection::NotObject => 2,
            Rejection::Missing(_) => 3,
            Rejection::WrongType(_) => 4,
            Rejection::OutOfRange(_) => 5,
            Rejection::NoMeasurement => 6,
            Rejection::BadName => 7,
            Rejection::BadExtra(_) => 8,
        }
    }

    /// The reason kind's name, as used in counters.
    pub fn kind_name(index: usize) -> &'static str {
        [
            "not_utf8",
            "not_json",
            "not_object",
            "missing_field",
            "wrong_type",
            "out_of_range",
            "no_measurement",
            "bad_sensor_name",
            "bad_extra_field",
        ][index]
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::NotUtf8 => f.write_str("not UTF-8"),
            Rejection::NotJson => f.write_str("not JSON"),
            Rejection::NotObject => f.write_str("not a JSON object"),
            Rejection::Missing(Field::Seq) => f.write_str("`boot` without `seq`"),
            Rejection::Missing(field) => write!(f, "missing field `{}`", field.name()),
            Rejection::WrongType(Field::SensorId) => {
                f.write_str("wrong type for `sensor_id` (expected an integer or a name)")
            }
            Rejection::WrongType(Field::IngestedAt) => {
                f.write_str("wrong type for `ingested_at` (expected a number or an RFC 3339 time)")
            }
            Rejection::WrongType(Field::Extra) => {
                f.write_str("wrong type for `extra` (expected a JSON object)")
            }
            Rejection::WrongType(field @ (Field::Seq | Field::Boot)) => write!(
                f,
                "wrong type for `{}` (expected an integer 0 to {MAX_SEQ})",
                field.name()
            ),
            Rejection::WrongType(field) => {
                write!(f, "wrong type for `{}` (expected a number)", field.name())
            }
            Rejection::OutOfRange(Field::SensorId) => f.write_str(
                "`sensor_id` out of range (must fit in i64 and not be below \
                 -9223372032559808512, which sensord keeps for names)",
            ),
            Rejection::OutOfRange(field @ (Field::IngestedAt | Field::ReceivedAt)) => write!(
                f,
                "`{}` out of range (must be 1970 to 9999: 0 to {MAX_INGESTED_AT} unix seconds)",
                field.name()
            ),
            Rejection::OutOfRange(field @ (Field::Seq | Field::Boot)) => write!(
                f,
                "`{}` out of range (must be an integer 0 to {MAX_SEQ})",
                field.name()
            ),
            Rejection::OutOfRange(field) => {
                write!(f, "`{}` out of range (must be finite)", field.name())
            }
            Rejection::NoMeasurement => f.write_str(
                "no measurement (needs `temperature`, `humidity` or another numeric field)",
            ),
            Rejection::BadName => write!(
                f,
                "bad `sensor_id` name (must be 1 to {MAX_NAME_BYTES} bytes without control \
                 characters)"
            ),
            Rejection::BadExtra(ExtraProblem::Nested) => {
                f.write_str("an extra field holds an object or an array")
            }
            Rejection::BadExtra(ExtraProblem::LongString) => write!(
                f,
                "an extra field's string is over {MAX_EXTRA_STRING_BYTES} bytes"
            ),
            Rejection::BadExtra(ExtraProblem::LongKey) => write!(
                f,
                "an extra field's name is over {MAX_EXTRA_KEY_BYTES} bytes"
            ),
            Rejection::BadExtra(ExtraProblem::TooMany) => {
                write!(f, "more than {MAX_EXTRA_FIELDS} extra fields")
            }
            Rejection::BadExtra(ExtraProblem::TooLarge) => {
                write!(f, "extra fields over {MAX_EXTRA_BYTES} bytes of JSON")
            }
        }
    }
}

/// How numeric `ingested_at` values are read (`--timestamp-unit`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TimestampUnit {
    /// Seconds.
    #[default]
    S,
    /// Milliseconds.
    Ms,
    /// Microseconds.
    Us,
    /// Nanoseconds.
    Ns,
}

impl TimestampUnit {
    /// Units of this kind in a second, and the digits of a fraction.
    fn per_second(self) -> (u64, usize) {
        match self {
            TimestampUnit::S => (1, 0),
            TimestampUnit::Ms => (1_000, 3),
            TimestampUnit::Us => (1_000_000, 6),
            TimestampUnit::Ns => (1_000_000_000, 9),
        }
    }

    /// A number in this unit as unix seconds: the f64 nearest the exact
    /// value for integers, as parsing its decimal text would give.
    fn seconds(self, value: &Scalar) -> Option<f64> {
        let (per_second, digits) = self.per_second();
        if per_second == 1 {
            return value.number();
        }
        // Below 2^53 an integer and the divisor are exact, and one division
        // rounds once, to the nearest f64.
        const EXACT: u64 = 1 << 53;
        let whole = match *value {
            Scalar::Int(v) if v.unsigned_abs() <= EXACT => {
                return Some(v as f64 / per_second as f64);
            }
            Scalar::UInt(v) if v <= EXACT => return Some(v as f64 / per_second as f64),
            // Negative: before 1970 in any unit.
            Scalar::Int(v) if v < 0 => return Some(-1.0),
            Scalar::Int(v) => v as u64,
            Scalar::UInt(v) => v,
            Scalar::Float(v) => return Some(v / per_second as f64),
            Scalar::Null | Scalar::Text(_) | Scalar::Other => return None,
        };
        let mut buffer = [0u8; 48];
        decimal(&mut buffer, whole / per_second, whole % per_second, digits)
    }
}

/// The f64 nearest `whole.fraction` (`fraction` with `digits` digits),
/// through its decimal text, which Rust parses correctly rounded.
fn decimal(buffer: &mut [u8], whole: u64, fraction: u64, digits: usize) -> Option<f64> {
    let mut cursor = std::io::Cursor::new(buffer);
    write!(cursor, "{whole}.{fraction:0digits$}").ok()?;
    let end = cursor.position() as usize;
    std::str::from_utf8(&cursor.into_inner()[..end])
        .ok()?
        .parse()
        .ok()
}

/// Whether a reading's fields beyond the known ones are stored
/// (`--extra-fields`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ExtraFields {
    /// Stored in the reading's `extra` object.
    #[default]
    Keep,
    /// Ignored, as before sensord kept them.
    Drop,
}

/// How datagrams are read: the settings from the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Format {
    pub timestamp_unit: TimestampUnit,
    pub extra_fields: ExtraFields,
}

/// Parses an RFC 3339 time (`2026-11-30T04:00:00.123+01:00`; `T` or a
/// space, `Z` or an offset, any number of fraction digits up to 18) as
/// unix seconds, the f64 nearest its exact value. A leap second (`:60`)
/// counts as the next second's start. Times before 1970 give a negative
/// number, for the range check to refuse.
pub fn parse_rfc3339(text: &str) -> Option<f64> {
    let b = text.as_bytes();
    let digits = |from: usize, n: usize| -> Option<i64> {
        let part = b.get(from..from + n)?;
        part.iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    if !(at(4, b'-') && at(7, b'-') && at(13, b':') && at(16, b':')) {
        return None;
    }
    if !matches!(b.get(10), Some(b'T' | b't' | b' ')) {
        return None;
    }
    let (year, month, day) = (digits(0, 4)?, digits(5, 2)?, digits(8, 2)?);
    let (hour, minute, second) = (digits(11, 2)?, digits(14, 2)?, digits(17, 2)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&month)
        || day < 1
        || day > month_days[month as usize - 1]
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut fraction = 0u64;
    let mut fraction_digits = 0;
    if at(i, b'.') {
        i += 1;
        while let Some(c) = b.get(i).filter(|c| c.is_ascii_digit()) {
            fraction_digits += 1;
            if fraction_digits > 18 {
                return None;
            }
            fraction = fraction * 10 + u64::from(c - b'0');
            i += 1;
        }
        if fraction_digits == 0 {
            return None;
        }
    }
    let offset = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && at(i + 3, b':') => {
            let (h, m) = (digits(i + 1, 2)?, digits(i + 4, 2)?);
            if h > 23 || m > 59 {
                return None;
            }
            let minutes = h * 60 + m;
            if *sign == b'-' { -minutes } else { minutes }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second - offset * 60;
    if seconds < 0 {
        return Some(-1.0);
    }
    let mut buffer = [0u8; 48];
    decimal(&mut buffer, seconds as u64, fraction, fraction_digits)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses one datagram received at `received_at` (unix seconds), appending
/// its valid readings to `out` and the reason for each invalid one to
/// `rejections`. If the datagram is not UTF-8 JSON at all, nothing is
/// appended to `out` and it counts as one rejection.
pub fn parse_datagram(
    bytes: &[u8],
    received_at: f64,
    format: &Format,
    out: &mut Vec<Reading>,
    rejections: &mut Vec<Rejection>,
) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        rejections.push(Rejection::NotUtf8);
        return;
    };
    let (out_len, rejections_len) = (out.len(), rejections.len());
    let mut de = serde_json::Deserializer::from_str(text);
    // One value, then more for NDJSON: serde_json skips the whitespace
    // (newlines included) between them.
    let mut parse = || -> serde_json::Result<()> {
        loop {
            let seed = DatagramSeed {
                received_at,
                format,
                out: &mut *out,
                rejections: &mut *rejections,
            };
            seed.deserialize(&mut de)?;
            if de.end().is_ok() {
                return Ok(());
            }
        }
    };
    if parse().is_err() {
        // A syntax error late in a datagram must not keep the readings before it.
        out.truncate(out_len);
        rejections.truncate(rejections_len);
        rejections.push(Rejection::NotJson);
    }
}

/// Visits one top-level value, pushing results as it goes.
struct DatagramSeed<'a> {
    received_at: f64,
    format: &'a Format,
    out: &'a mut Vec<Reading>,
    rejections: &'a mut Vec<Rejection>,
}

impl DatagramSeed<'_> {
    fn push(&mut self, result: Result<Reading, Rejection>) {
        match result {
            Ok(reading) => self.out.push(reading),
            Err(rejection) => self.rejections.push(rejection),
        }
    }

    fn not_object<E>(mut self) -> Result<(), E> {
        self.push(Err(Rejection::NotObject));
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for DatagramSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DatagramSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a reading object or an array of them")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, map: A) -> Result<(), A::Error> {
        let raw = RawReading::from_map(map, self.format.extra_fields)?;
        let (received_at, unit) = (self.received_at, self.format.timestamp_unit);
        self.push(raw.validate(received_at, unit));
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let (received_at, unit) = (self.received_at, self.format.timestamp_unit);
        let seed = ElementSeed(self.format.extra_fields);
        while let Some(element) = seq.next_element_seed(seed)? {
            self.push(element.and_then(|raw| raw.validate(received_at, unit)));
        }
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        self.not_object()
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        self.not_object()
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        self.not_object()
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        self.not_object()
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        self.not_object()
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        self.not_object()
    }
}

/// Reads one array element: an object still to validate, or not an object.
#[derive(Clone, Copy)]
struct ElementSeed(ExtraFields);

impl<'de> DeserializeSeed<'de> for ElementSeed {
    type Value = Result<RawReading, Rejection>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ElementSeed {
    type Value = Result<RawReading, Rejection>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a reading object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        RawReading::from_map(map, self.0).map(Ok)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Err(Rejection::NotObject))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Err(Rejection::NotObject))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Err(Rejection::NotObject))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Err(Rejection::NotObject))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Err(Rejection::NotObject))
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Err(Rejection::NotObject))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Err(Rejection::NotObject))
    }
}

/// Skips a field's value, whatever it is.
fn skip<'de, A: MapAccess<'de>>(map: &mut A) -> Result<(), A::Error> {
    map.next_value::<IgnoredAny>().map(|_| ())
}

/// A JSON value reduced to what validation needs; only a string
/// allocates.
enum Scalar {
    Int(i64),
    UInt(u64),
    Float(f64),
    Null,
    /// A string: a sensor name, or an RFC 3339 time.
    Text(Box<str>),
    Other,
}

impl Scalar {
    fn number(&self) -> Option<f64> {
        match *self {
            Scalar::Int(v) => Some(v as f64),
            Scalar::UInt(v) => Some(v as f64),
            Scalar::Float(v) => Some(v),
            Scalar::Null | Scalar::Text(_) | Scalar::Other => None,
        }
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::UInt(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Text(v.into()))
            }
            fn visit_unit<E>(self) -> Result<Scalar, E> {
                Ok(Scalar::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// An extra field's value as parsed.
enum ExtraValue {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
}

/// An extra field's value, or what keeps it from being stored.
struct ExtraSlot(Result<ExtraValue, ExtraProblem>);

impl<'de> Deserialize<'de> for ExtraSlot {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ExtraVisitor;
        impl<'de> Visitor<'de> for ExtraVisitor {
            type Value = ExtraSlot;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number, boolean, string or null")
            }
            fn visit_i64<E>(self, v: i64) -> Result<ExtraSlot, E> {
                Ok(ExtraSlot(Ok(ExtraValue::Int(v))))
            }
            fn visit_u64<E>(self, v: u64) -> Result<ExtraSlot, E> {
                Ok(ExtraSlot(Ok(ExtraValue::UInt(v))))
            }
            fn visit_f64<E>(self, v: f64) -> Result<ExtraSlot, E> {
                Ok(ExtraSlot(Ok(ExtraValue::Float(v))))
            }
            fn visit_bool<E>(self, v: bool) -> Result<ExtraSlot, E> {
                Ok(ExtraSlot(Ok(ExtraValue::Bool(v))))
            }
            fn visit_str<E>(self, v: &str) -> Result<ExtraSlot, E> {
                Ok(ExtraSlot(if v.len() > MAX_EXTRA_STRING_BYTES {
                    Err(ExtraProblem::LongString)
                } else {
                    Ok(ExtraValue::Str(v.to_string()))
                }))
            }
            fn visit_unit<E>(self) -> Result<ExtraSlot, E> {
                Ok(ExtraSlot(Ok(ExtraValue::Null)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ExtraSlot, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(ExtraSlot(Err(ExtraProblem::Nested)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ExtraSlot, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(ExtraSlot(Err(ExtraProblem::Nested)))
            }
        }
        deserializer.deserialize_any(ExtraVisitor)
    }
}

/// An object key: one of ours, or another field's name. Only other names
/// allocate, so the original datagram's keys do not.
enum Key {
    Known(Field),
    Other(String),
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "sensor_id" => Key::Known(Field::SensorId),
                    "temperature" => Key::Known(Field::Temperature),
                    "humidity" => Key::Known(Field::Humidity),
                    "ingested_at" => Key::Known(Field::IngestedAt),
                    "received_at" => Key::Known(Field::ReceivedAt),
                    "seq" => Key::Known(Field::Seq),
                    "boot" => Key::Known(Field::Boot),
                    other => Key::Other(other.to_string()),
                })
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// The fields of one object before validation. A repeated key keeps its
/// last value, as JavaScript's `JSON.parse` does.
#[derive(Default)]
struct RawReading {
    sensor_id: Option<Scalar>,
    temperature: Option<Scalar>,
    humidity: Option<Scalar>,
    ingested_at: Option<Scalar>,
    seq: Option<Scalar>,
    boot: Option<Scalar>,
    /// Other fields, when kept; empty (no allocation) for most readings.
    extra: Vec<(String, ExtraValue)>,
    /// The first reason an extra field cannot be stored.
    extra_problem: Option<ExtraProblem>,
}

impl RawReading {
    fn from_map<'de, A: MapAccess<'de>>(
        mut map: A,
        extra_fields: ExtraFields,
    ) -> Result<Self, A::Error> {
        let mut raw = RawReading::default();
        while let Some(key) = map.next_key::<Key>()? {
            let slot = match key {
                Key::Known(Field::SensorId) => &mut raw.sensor_id,
                Key::Known(Field::Temperature) => &mut raw.temperature,
                Key::Known(Field::Humidity) => &mut raw.humidity,
                Key::Known(Field::IngestedAt) => &mut raw.ingested_at,
                Key::Known(Field::Seq) => &mut raw.seq,
                Key::Known(Field::Boot) => &mut raw.boot,
                Key::Other(name) if extra_fields == ExtraFields::Keep => {
                    raw.add_extra(name, &mut map)?;
                    continue;
                }
                // A datagram's `received_at` is the clock's, never its own.
                Key::Known(Field::ReceivedAt | Field::Extra) | Key::Other(_) => {
                    skip(&mut map)?;
                    continue;
                }
            };
            *slot = Some(map.next_value()?);
        }
        Ok(raw)
    }

    /// Reads the value of extra field `name`.
    fn add_extra<'de, A: MapAccess<'de>>(
        &mut self,
        name: String,
        map: &mut A,
    ) -> Result<(), A::Error> {
        let ExtraSlot(value) = map.next_value()?;
        let problem = if name.len() > MAX_EXTRA_KEY_BYTES {
            Err(ExtraProblem::LongKey)
        } else if self.extra.len() == MAX_EXTRA_FIELDS {
            Err(ExtraProblem::TooMany)
        } else {
            value.map(|value| self.extra.push((name, value)))
        };
        if let Err(problem) = problem {
            self.extra_problem.get_or_insert(problem);
        }
        Ok(())
    }

    fn validate(self, received_at: f64, unit: TimestampUnit) -> Result<Reading, Rejection> {
        let sensor_id = match self.sensor_id.ok_or(Rejection::Missing(Field::SensorId))? {
            Scalar::Int(id) if NAME_KEYS.contains(&id) => {
                return Err(Rejection::OutOfRange(Field::SensorId));
            }
            Scalar::Int(id) => SensorId::Int(id),
            // serde_json gives a u64 for every non-negative integer.
            Scalar::UInt(id) => SensorId::Int(
                i64::try_from(id).map_err(|_| Rejection::OutOfRange(Field::SensorId))?,
            ),
            Scalar::Float(_) | Scalar::Null | Scalar::Other => {
                return Err(Rejection::WrongType(Field::SensorId));
            }
            Scalar::Text(name) => {
                check_name(&name)?;
                match SensorId::from_text(&name) {
                    SensorId::Int(id) if NAME_KEYS.contains(&id) => {
                        return Err(Rejection::OutOfRange(Field::SensorId));
                    }
                    SensorId::Int(id) => SensorId::Int(id),
                    // Already boxed: no second allocation.
                    SensorId::Name(_) => SensorId::Name(name),
                }
            }
        };
        // Absent and null are both "not measured".
        let measurement = |value: Option<Scalar>, field| match value {
            None | Some(Scalar::Null) => Ok(None),
            Some(value) => {
                let number = value.number().ok_or(Rejection::WrongType(field))?;
                if number.is_finite() {
                    Ok(Some(number))
                } else {
                    Err(Rejection::OutOfRange(field))
                }
            }
        };
        let temperature = measurement(self.temperature, Field::Temperature)?;
        let humidity = measurement(self.humidity, Field::Humidity)?;
        let ingested_at = match &self.ingested_at {
            None => Some(received_at),
            Some(Scalar::Text(text)) => parse_rfc3339(text),
            Some(value) => unit.seconds(value),
        }
        .ok_or(Rejection::WrongType(Field::IngestedAt))?;
        if !(0.0..=MAX_INGESTED_AT).contains(&ingested_at) {
            return Err(Rejection::OutOfRange(Field::IngestedAt));
        }
        let (extra, numeric_extra) = if self.extra.is_empty() && self.extra_problem.is_none() {
            (None, false)
        } else {
            extra(self.extra, self.extra_problem)?
        };
        if temperature.is_none() && humidity.is_none() && !numeric_extra {
            return Err(Rejection::NoMeasurement);
        }
        let seq = sequence_number(self.seq, Field::Seq)?;
        let boot = sequence_number(self.boot, Field::Boot)?;
        if seq.is_none() && boot.is_some() {
            return Err(Rejection::Missing(Field::Seq));
        }
        Ok(Reading::from(ReadingParts {
            sensor_id,
            temperature,
            humidity,
            ingested_at,
            received_at,
            extra,
            seq,
            boot,
        }))
    }
}

/// A `seq` or `boot` value: absent or null is None, else an integer from
/// 0 to `MAX_SEQ`.
fn sequence_number(value: Option<Scalar>, field: Field) -> Result<Option<u64>, Rejection> {
    match value {
        None | Some(Scalar::Null) => Ok(None),
        Some(Scalar::UInt(v)) if v <= MAX_SEQ => Ok(Some(v)),
        // serde_json gives an i64 only for a negative integer.
        Some(Scalar::UInt(_) | Scalar::Int(_)) => Err(Rejection::OutOfRange(field)),
        Some(_) => Err(Rejection::WrongType(field)),
    }
}

/// A reading's extra fields as stored (None if there are none), and
/// whether one is a number (a measurement).
fn extra(
    fields: Vec<(String, ExtraValue)>,
    problem: Option<ExtraProblem>,
) -> Result<(Option<Extra>, bool), Rejection> {
    if let Some(problem) = problem {
        return Err(Rejection::BadExtra(problem));
    }
    let numeric = fields.iter().any(|(_, value)| {
        matches!(
            value,
            ExtraValue::Int(_) | ExtraValue::UInt(_) | ExtraValue::Float(_)
        )
    });
    if fields.is_empty() {
        return Ok((None, false));
    }
    let extra = Extra::from_fields(fields);
    if extra.0.len() > MAX_EXTRA_BYTES {
        return Err(Rejection::BadExtra(ExtraProblem::TooLarge));
    }
    Ok((Some(extra), numeric))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: f64 = 1_764_150_000.5;

    fn parse_as(text: &str, format: Format) -> (Vec<Reading>, Vec<Rejection>) {
        let (mut out, mut rejections) = (Vec::new(), Vec::new());
        parse_datagram(text.as_bytes(), NOW, &format, &mut out, &mut rejections);
        (out, rejections)
    }

    fn parse(text: &str) -> (Vec<Reading>, Vec<Rejection>) {
        parse_as(text, Format::default())
    }

    fn one(text: &str) -> Reading {
        let (mut out, rejections) = parse(text);
        assert!(rejections.is_empty(), "{text}: {rejections:?}");
        assert_eq!(out.len(), 1, "{text}");
        out.remove(0)
    }

    fn reject(text: &str) -> Rejection {
        let (out, rejections) = parse(text);
        assert!(out.is_empty(), "{text} gave {out:?}");
        assert_eq!(rejections.len(), 1, "{text}");
        rejections[0]
    }

    fn extra(r: &Reading) -> serde_json::Value {
        serde_json::from_str(r.extra().expect("extra fields").as_str()).unwrap()
    }

    /// The seed's example datagram parses to exactly its values.
    #[test]
    fn parses_one_object() {
        let (out, rejections) = parse(
            r#" {"sensor_id": 42, "temperature": 21.5, "humidity": 7.2, "ingested_at": 1764150000.12}
            "#,
        );
        assert!(rejections.is_empty());
        assert_eq!(
            out,
            vec![Reading::from(ReadingParts {
                sensor_id: SensorId::Int(42),
                temperature: Some(21.5),
                humidity: Some(7.2),
                ingested_at: 1764150000.12,
                received_at: NOW,
                extra: None,
                seq: None,
                boot: None,
            })]
        );
    }

    /// `seq` and `boot`: integers 0 to 2^63-1, `boot` only with `seq`
    /// (default 0); null is absent; anything else is rejected with a reason.
    #[test]
    fn sequence_numbers() {
        let r = one(r#"{"sensor_id": 1, "seq": 9223372036854775807, "boot": 7, "humidity": 1}"#);
        assert_eq!(
            r.sequence(),
            Some(Sequence {
                boot: 7,
                seq: MAX_SEQ
            })
        );
        let r = one(r#"{"sensor_id": 1, "seq": 0, "humidity": 1}"#);
        assert_eq!(r.sequence(), Some(Sequence { boot: 0, seq: 0 }));
        assert_eq!(
            one(r#"{"sensor_id": 1, "seq": null, "humidity": 1}"#).sequence(),
            None
        );
        for (text, rejection) in [
            (
                r#"{"sensor_id": 1, "boot": 3, "humidity": 1}"#,
                Rejection::Missing(Field::Seq),
            ),
            (
                r#"{"sensor_id": 1, "seq": -1, "humidity": 1}"#,
                Rejection::OutOfRange(Field::Seq),
            ),
            (
                r#"{"sensor_id": 1, "seq": 9223372036854775808, "humidity": 1}"#,
                Rejection::OutOfRange(Field::Seq),
            ),
            (
                r#"{"sensor_id": 1, "seq": 1.5, "humidity": 1}"#,
                Rejection::WrongType(Field::Seq),
            ),
            (
                r#"{"sensor_id": 1, "seq": "1", "humidity": 1}"#,
                Rejection::WrongType(Field::Seq),
            ),
            (
                r#"{"sensor_id": 1, "seq": 1, "boot": -2, "humidity": 1}"#,
                Rejection::OutOfRange(Field::Boot),
            ),
        ] {
            assert_eq!(reject(text), rejection, "{text}");
        }
        let spilled = serde_json::to_string(&one(
            r#"{"sensor_id": 1, "seq": 5, "boot": 2, "humidity": 1}"#,
        ))
        .unwrap();
        assert!(spilled.ends_with(r#","seq":5,"boot":2}"#), "{spilled}");
    }

    /// A reading stays packed in 48 bytes, and the original datagram's
    /// holds no heap memory.
    #[test]
    fn reading_is_packed() {
        assert_eq!(std::mem::size_of::<Reading>(), 48);
        let r = one(r#"{"sensor_id": 42, "temperature": 21.5, "humidity": 7.2}"#);
        assert!(r.labels.is_none());
    }

    /// An absent measurement reads as None, and compares and spills as it
    /// did before packing; a name or extras alone are kept.
    #[test]
    fn absent_measurements_and_labels_unpack() {
        let r = one(r#"{"sensor_id": "attic", "humidity": 40}"#);
        assert_eq!(r.sensor(), Sensor::Name("attic"));
        assert_eq!((r.temperature(), r.humidity()), (None, Some(40.0)));
        assert_eq!(r.extra(), None);
        assert_eq!(r, r.clone());
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            format!(
                r#"{{"sensor_id":"attic","humidity":40.0,"ingested_at":{NOW:?},"received_at":{NOW:?}}}"#
            )
        );
        let r = one(r#"{"sensor_id": 3, "co2": 415}"#);
        assert_eq!(r.sensor(), Sensor::Int(3));
        assert_eq!((r.temperature(), r.humidity()), (None, None));
        assert_eq!(r.extra().unwrap().as_str(), r#"{"co2":415}"#);
        let null = r#"{"sensor_id":3,"temperature":null,"ingested_at":1.0,"received_at":2.0,"extra":{"co2":415}}"#;
        let from_null: Reading = serde_json::from_str(null).unwrap();
        assert_eq!(from_null.temperature(), None);
        assert!(from_null.check().is_ok());
    }

    /// Integers are fine for numbers, other fields are kept as extras,
    /// and a missing `ingested_at` takes the receive time.
    #[test]
    fn integers_extra_fields_and_default_time() {
        let r = one(r#"{"humidity": 7, "rssi": -71, "temperature": -3, "sensor_id": 1}"#);
        assert_eq!(r.temperature(), Some(-3.0));
        assert_eq!(r.humidity(), Some(7.0));
        assert_eq!(r.ingested_at, NOW);
        assert_eq!(extra(&r), serde_json::json!({"rssi": -71}));
    }

    /// `--extra-fields drop` ignores other fields, as before.
    #[test]
    fn extra_fields_can_be_dropped() {
        let format = Format {
            extra_fields: ExtraFields::Drop,
            ..Format::default()
        };
        let (out, _) = parse_as(
            r#"{"sensor_id": 1, "temperature": 2, "rssi": -71, "x": {"a": [1]}}"#,
            format,
        );
        assert_eq!(out[0].extra(), None);
        let (out, rejections) = parse_as(r#"{"sensor_id": 1, "pressure": 1013.2}"#, format);
        assert!(out.is_empty());
        assert_eq!(rejections, [Rejection::NoMeasurement]);
    }

    /// Either measurement alone is a reading; a numeric extra is too; none
    /// is its own rejection. Null is the same as absent.
    #[test]
    fn measurements_are_optional() {
        let r = one(r#"{"sensor_id": 2, "temperature": 21.5}"#);
        assert_eq!((r.temperature(), r.humidity()), (Some(21.5), None));
        let r = one(r#"{"sensor_id": 2, "humidity": 40, "temperature": null}"#);
        assert_eq!((r.temperature(), r.humidity()), (None, Some(40.0)));
        let r = one(r#"{"sensor_id": 2, "co2": 415}"#);
        assert_eq!(extra(&r), serde_json::json!({"co2": 415}));
        assert_eq!(reject(r#"{"sensor_id": 2}"#), Rejection::NoMeasurement);
        assert_eq!(
            reject(r#"{"sensor_id": 2, "firmware": "1.2", "ok": true}"#),
            Rejection::NoMeasurement
        );
    }

    /// Names are sensor ids; a canonical integer string is that integer.
    #[test]
    fn named_sensors() {
        for name in [
            "esp32-kitchen",
            "a4:cf:12:9b:00:01",
            "capteur-salle-à-manger",
            "042",
            "+42",
            "4.2",
        ] {
            let r = one(&format!(r#"{{"sensor_id": "{name}", "temperature": 1}}"#));
            assert_eq!(r.sensor(), Sensor::Name(name), "{name}");
        }
        let r = one(r#"{"sensor_id": "42", "temperature": 1}"#);
        assert_eq!(r.sensor(), Sensor::Int(42));
        let r = one(r#"{"sensor_id": "-7", "temperature": 1}"#);
        assert_eq!(r.sensor(), Sensor::Int(-7));
        assert_eq!(
            reject(r#"{"sensor_id": "", "temperature": 1}"#),
            Rejection::BadName
        );
        assert_eq!(
            reject(r#"{"sensor_id": "a\nb", "temperature": 1}"#),
            Rejection::BadName
        );
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(
            reject(&format!(r#"{{"sensor_id": "{long}", "temperature": 1}}"#)),
            Rejection::BadName
        );
        let longest = "é".repeat(MAX_NAME_BYTES / 2);
        one(&format!(
            r#"{{"sensor_id": "{longest}", "temperature": 1}}"#
        ));
    }

    /// Integer ids in the range kept for name keys are refused, as
    /// integers and as strings; the one above it is fine.
    #[test]
    fn reserved_ids_are_refused() {
        for id in [NAME_KEYS.start, NAME_KEYS.end - 1] {
            assert_eq!(
                reject(&format!(r#"{{"sensor_id": {id}, "temperature": 1}}"#)),
                Rejection::OutOfRange(Field::SensorId)
            );
            assert_eq!(
                reject(&format!(r#"{{"sensor_id": "{id}", "temperature": 1}}"#)),
                Rejection::OutOfRange(Field::SensorId)
            );
        }
        let id = NAME_KEYS.end;
        assert_eq!(
            one(&format!(r#"{{"sensor_id": {id}, "temperature": 1}}"#)).sensor(),
            Sensor::Int(id)
        );
    }

    /// Extras keep numbers, booleans, strings and null; nesting, long
    /// strings or names and too many fields are counted rejections.
    #[test]
    fn extra_field_rules() {
        let r = one(
            r#"{"sensor_id": 1, "pressure": 1013.25, "ok": true, "fw": "1.2.3", "n": null, "big": 18446744073709551615}"#,
        );
        assert_eq!(
            extra(&r),
            serde_json::json!({"pressure": 1013.25, "ok": true, "fw": "1.2.3", "n": null, "big": u64::MAX})
        );
        assert_eq!(
            reject(r#"{"sensor_id": 1, "temperature": 1, "gps": {"lat": 1}}"#),
            Rejection::BadExtra(ExtraProblem::Nested)
        );
        assert_eq!(
            reject(r#"{"sensor_id": 1, "temperature": 1, "v": [1, 2]}"#),
            Rejection::BadExtra(ExtraProblem::Nested)
        );
        let long = "x".repeat(MAX_EXTRA_STRING_BYTES + 1);
        assert_eq!(
            reject(&format!(
                r#"{{"sensor_id": 1, "temperature": 1, "s": "{long}"}}"#
            )),
            Rejection::BadExtra(ExtraProblem::LongString)
        );
        let ok = "x".repeat(MAX_EXTRA_STRING_BYTES);
        one(&format!(
            r#"{{"sensor_id": 1, "temperature": 1, "s": "{ok}"}}"#
        ));
        let key = "k".repeat(MAX_EXTRA_KEY_BYTES + 1);
        assert_eq!(
            reject(&format!(
                r#"{{"sensor_id": 1, "temperature": 1, "{key}": 1}}"#
            )),
            Rejection::BadExtra(ExtraProblem::LongKey)
        );
        let fields = |n: usize| {
            (0..n)
                .map(|i| format!(r#""f{i}": {i}"#))
                .collect::<Vec<_>>()
                .join(",")
        };
        one(&format!(
            r#"{{"sensor_id": 1, {}}}"#,
            fields(MAX_EXTRA_FIELDS)
        ));
        let big = (0..5)
            .map(|i| format!(r#""s{i}": "{}""#, "x".repeat(200)))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            reject(&format!(r#"{{"sensor_id": 1, "temperature": 1, {big}}}"#)),
            Rejection::BadExtra(ExtraProblem::TooLarge)
        );
        assert_eq!(
            reject(&format!(
                r#"{{"sensor_id": 1, {}}}"#,
                fields(MAX_EXTRA_FIELDS + 1)
            )),
            Rejection::BadExtra(ExtraProblem::TooMany)
        );
    }

    /// Numeric timestamps in each unit give the f64 nearest the exact time,
    /// and the 1970..9999 range holds in every unit.
    #[test]
    fn timestamp_units() {
        let cases = [
            (TimestampUnit::Ms, "1764150000123", "1764150000.123"),
            (TimestampUnit::Us, "1764150000123456", "1764150000.123456"),
            (
                TimestampUnit::Ns,
                "1764150000123456789",
                "1764150000.123456789",
            ),
            (TimestampUnit::Ns, "253402300799999999999", "253402300800"),
            (TimestampUnit::Us, "253402300799000000", "253402300799"),
            (TimestampUnit::Ms, "1764150000123.5", "1764150000.1235"),
        ];
        for (unit, sent, seconds) in cases {
            let format = Format {
                timestamp_unit: unit,
                ..Format::default()
            };
            let (out, rejections) = parse_as(
                &format!(r#"{{"sensor_id": 1, "temperature": 1, "ingested_at": {sent}}}"#),
                format,
            );
            let want: f64 = seconds.parse().unwrap();
            if want > MAX_INGESTED_AT {
                assert_eq!(
                    rejections,
                    [Rejection::OutOfRange(Field::IngestedAt)],
                    "{sent}"
                );
            } else {
                assert_eq!(
                    out[0].ingested_at.to_bits(),
                    want.to_bits(),
                    "{sent} {unit:?}"
                );
            }
        }
        let format = Format {
            timestamp_unit: TimestampUnit::Ms,
            ..Format::default()
        };
        let (_, rejections) = parse_as(
            r#"{"sensor_id": 1, "temperature": 1, "ingested_at": -1}"#,
            format,
        );
        assert_eq!(rejections, [Rejection::OutOfRange(Field::IngestedAt)]);
    }

    /// RFC 3339 times with any offset give the exact instant.
    #[test]
    fn rfc3339_times() {
        for (text, seconds) in [
            ("2026-11-30T04:00:00.123Z", "1796011200.123"),
            ("2026-11-30T05:00:00.123+01:00", "1796011200.123"),
            ("2026-11-29T22:30:00.123456-05:30", "1796011200.123456"),
            ("2026-11-30 04:00:00z", "1796011200"),
            ("1970-01-01T00:00:00Z", "0"),
            ("2024-02-29T00:00:00Z", "1709164800"),
            ("9999-12-31T23:59:59Z", "253402300799"),
        ] {
            let want: f64 = seconds.parse().unwrap();
            assert_eq!(
                parse_rfc3339(text).map(f64::to_bits),
                Some(want.to_bits()),
                "{text}"
            );
        }
        for bad in [
            "2026-11-30T04:00:00",
            "2026-13-30T04:00:00Z",
            "2025-02-29T04:00:00Z",
            "2026-11-30T24:00:00Z",
            "2026-11-30T04:00:00.Z",
            "2026-11-30T04:00:00+0100",
            "2026-11-30T04:00:00Zjunk",
            "yesterday",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        let r = one(
            r#"{"sensor_id": 1, "temperature": 1, "ingested_at": "2026-11-30T05:00:00.5+01:00"}"#,
        );
        assert_eq!(r.ingested_at, 1796011200.5);
        assert_eq!(
            reject(r#"{"sensor_id": 1, "temperature": 1, "ingested_at": "1969-12-31T23:59:59Z"}"#),
            Rejection::OutOfRange(Field::IngestedAt)
        );
        assert_eq!(
            reject(r#"{"sensor_id": 1, "temperature": 1, "ingested_at": "soon"}"#),
            Rejection::WrongType(Field::IngestedAt)
        );
    }

    /// NDJSON: objects (or arrays) on lines of their own, blank lines and
    /// a trailing newline allowed, each validated on its own.
    #[test]
    fn ndjson() {
        for text in [
            "{\"sensor_id\": 1, \"temperature\": 1}\n{\"sensor_id\": 2, \"humidity\": 2}",
            "{\"sensor_id\": 1, \"temperature\": 1}\n\n{\"sensor_id\": 2, \"humidity\": 2}\n",
            "{\"sensor_id\": 1, \"temperature\": 1}\r\n[{\"sensor_id\": 2, \"humidity\": 2}]\r\n",
        ] {
            let (out, rejections) = parse(text);
            assert!(rejections.is_empty(), "{text:?}");
            assert_eq!(
                out.iter().map(|r| r.sensor()).collect::<Vec<_>>(),
                [Sensor::Int(1), Sensor::Int(2)]
            );
        }
        let (out, rejections) =
            parse("{\"sensor_id\": 1, \"temperature\": 1}\n{\"sensor_id\": 2}\n7\n");
        assert_eq!(out.len(), 1);
        assert_eq!(rejections, [Rejection::NoMeasurement, Rejection::NotObject]);
        assert_eq!(
            reject("{\"sensor_id\": 1, \"temperature\": 1}\n{\"sensor_id\": "),
            Rejection::NotJson
        );
        assert_eq!(reject("\n\n"), Rejection::NotJson);
    }

    /// The good elements of an array are kept, each bad one is rejected.
    #[test]
    fn array_keeps_good_elements() {
        let (out, rejections) = parse(
            r#"[{"sensor_id": 1, "temperature": 1, "humidity": 2},
                 7,
                 {"sensor_id": 2, "temperature": "hot", "humidity": 2},
                 {"sensor_id": 3, "temperature": 1, "humidity": 2, "ingested_at": 5}]"#,
        );
        assert_eq!(
            out.iter().map(|r| r.sensor()).collect::<Vec<_>>(),
            [Sensor::Int(1), Sensor::Int(3)]
        );
        assert_eq!(
            rejections,
            [
                Rejection::NotObject,
                Rejection::WrongType(Field::Temperature)
            ]
        );
    }

    /// A syntax error anywhere rejects the whole datagram once.
    #[test]
    fn syntax_error_rejects_whole_array() {
        assert_eq!(
            reject(r#"[{"sensor_id": 1, "temperature": 1, "humidity": 2}, {"#),
            Rejection::NotJson
        );
        assert_eq!(reject(r#"{"sensor_id": 1} trailing"#), Rejection::NotJson);
        assert_eq!(reject(""), Rejection::NotJson);
        assert_eq!(reject("NaN"), Rejection::NotJson);
    }

    /// Each rule gives its own reason.
    #[test]
    fn each_reason() {
        assert_eq!(reject("\"reading\""), Rejection::NotObject);
        assert_eq!(
            reject(r#"{"temperature": 1, "humidity": 2}"#),
            Rejection::Missing(Field::SensorId)
        );
        assert_eq!(
            reject(r#"{"sensor_id": 1.5, "temperature": 1, "humidity": 2}"#),
            Rejection::WrongType(Field::SensorId)
        );
        assert_eq!(
            reject(r#"{"sensor_id": 9223372036854775808, "temperature": 1, "humidity": 2}"#),
            Rejection::OutOfRange(Field::SensorId)
        );
        assert_eq!(
            reject(r#"{"sensor_id": 1, "temperature": true, "humidity": 2}"#),
            Rejection::WrongType(Field::Temperature)
        );
        assert_eq!(
            reject(r#"{"sensor_id": 1, "temperature": 1, "humidity": 2, "ingested_at": -1}"#),
            Rejection::OutOfRange(Field::IngestedAt)
        );
        assert_eq!(
            reject(
                r#"{"sensor_id": 1, "temperature": 1, "humidity": 2, "ingested_at": 253402300800}"#
            ),
            Rejection::OutOfRange(Field::IngestedAt)
        );
        let mut rejections = Vec::new();
        parse_datagram(
            b"{\"a\xff\": 1}",
            NOW,
            &Format::default(),
            &mut Vec::new(),
            &mut rejections,
        );
        assert_eq!(rejections, [Rejection::NotUtf8]);
    }

    /// Every reason has a distinct index below KINDS and a name.
    #[test]
    fn kinds_are_dense() {
        let all = [
            Rejection::NotUtf8,
            Rejection::NotJson,
            Rejection::NotObject,
            Rejection::Missing(Field::SensorId),
            Rejection::WrongType(Field::SensorId),
            Rejection::OutOfRange(Field::SensorId),
            Rejection::NoMeasurement,
            Rejection::BadName,
            Rejection::BadExtra(ExtraProblem::Nested),
        ];
        let mut indexes: Vec<usize> = all.iter().map(|r| r.index()).collect();
        indexes.dedup();
        assert_eq!(indexes, (0..Rejection::KINDS).collect::<Vec<_>>());
        for i in indexes {
            assert!(!Rejection::kind_name(i).is_empty());
        }
    }

    /// Extreme but valid values are accepted exactly.
    #[test]
    fn boundaries() {
        let r = one(
            r#"{"sensor_id": 9223372036854775807, "temperature": 1.7976931348623157e308,
                "humidity": 5e-324, "ingested_at": 253402300799}"#,
        );
        assert_eq!(r.sensor(), Sensor::Int(i64::MAX));
        assert_eq!(r.temperature(), Some(f64::MAX));
        assert_eq!(r.humidity(), Some(5e-324));
    }

    /// Deep nesting is a rejection, not a stack overflow.
    #[test]
    fn deep_nesting_is_rejected() {
        let text = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(reject(&text), Rejection::NotObject);
        let text = format!("{}{}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
        assert_eq!(reject(&text), Rejection::NotJson);
        let text = format!(
            r#"{{"sensor_id": 1, "temperature": 1, "humidity": {}1{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(reject(&text), Rejection::WrongType(Field::Humidity));
    }

    /// Decimal text becomes the f64 it denotes, to the bit.
    #[test]
    fn floats_are_bit_exact() {
        for text in [
            "21.123456789012345",
            "0.1",
            "1764150000.123456",
            "2.2250738585072011e-308",
        ] {
            let r = one(&format!(
                r#"{{"sensor_id": 1, "temperature": {text}, "humidity": 1, "ingested_at": 1, "x": {text}}}"#
            ));
            let want = text.parse::<f64>().unwrap().to_bits();
            assert_eq!(r.temperature().unwrap().to_bits(), want);
            assert_eq!(extra(&r)["x"].as_f64().unwrap().to_bits(), want);
        }
    }

    /// Spill lines: a reading round-trips through its serde form, extras
    /// as an object; an old line (both measurements, no extras) still reads.
    #[test]
    fn spill_form_round_trips() {
        let r =
            one(r#"{"sensor_id": "kitchen", "humidity": 0.1, "pressure": 1013.25, "fw": "a\"b"}"#);
        let line = serde_json::to_string(&r).unwrap();
        assert!(
            line.contains(r#""extra":{"fw":"a\"b","pressure":1013.25}"#),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<Reading>(&line).unwrap(), r);
        let old = r#"{"sensor_id":7,"temperature":1.5,"humidity":2.5,"ingested_at":3.0,"received_at":4.0}"#;
        let r: Reading = serde_json::from_str(old).unwrap();
        assert_eq!(r.sensor(), Sensor::Int(7));
        assert_eq!((r.temperature(), r.humidity()), (Some(1.5), Some(2.5)));
        assert_eq!(serde_json::to_string(&r).unwrap(), old);
        assert!(r.check().is_ok());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn finite() -> impl Strategy<Value = f64> {
            prop::num::f64::NORMAL
                | prop::num::f64::SUBNORMAL
                | prop::num::f64::ZERO
                | prop::num::f64::NEGATIVE
        }

        fn reading() -> impl Strategy<Value = Reading> {
            (
                any::<i64>().prop_filter("not a name key", |id| !NAME_KEYS.contains(id)),
                finite(),
                finite(),
                0.0..=MAX_INGESTED_AT,
                proptest::option::of((0..=MAX_SEQ, 0..=MAX_SEQ)),
            )
                .prop_map(
                    |(sensor_id, temperature, humidity, ingested_at, sequence)| {
                        Reading::from(ReadingParts {
                            sensor_id: SensorId::Int(sensor_id),
                            temperature: Some(temperature),
                            humidity: Some(humidity),
                            ingested_at,
                            received_at: NOW,
                            extra: None,
                            seq: sequence.map(|(seq, _)| seq),
                            boot: sequence.map(|(_, boot)| boot),
                        })
                    },
                )
        }

        fn text(r: &Reading) -> String {
            // Debug formatting is the shortest text that round-trips, with
            // the sign of zero and an exponent where needed.
            let sequence = r
                .sequence()
                .map(|s| format!(r#","seq":{},"boot":{}"#, s.seq, s.boot))
                .unwrap_or_default();
            format!(
                r#"{{"sensor_id":{},"temperature":{:?},"humidity":{:?},"ingested_at":{:?}{sequence}}}"#,
                r.sensor(),
                r.temperature().unwrap(),
                r.humidity().unwrap(),
                r.ingested_at
            )
        }

        /// Any JSON value a field might hold, nested a little.
        fn value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<u64>().prop_map(serde_json::Value::from),
                finite().prop_map(serde_json::Value::from),
                ".{0,300}".prop_map(serde_json::Value::from),
                "[0-9]{1,3}".prop_map(serde_json::Value::from),
                "2026-0[1-9]-1[0-9]T0[0-9]:00:00(\\.[0-9]{1,9})?(Z|[+-]0[0-9]:[0-5][0-9])"
                    .prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(2, 8, 3, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..3).prop_map(serde_json::Value::from),
                    prop::collection::btree_map("[a-z]{1,3}", inner, 0..3)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Objects of fields: the known ones and others, any values.
        fn object() -> impl Strategy<Value = serde_json::Map<String, serde_json::Value>> {
            let key = prop_oneof![
                Just("sensor_id".to_string()),
                Just("temperature".to_string()),
                Just("humidity".to_string()),
                Just("ingested_at".to_string()),
                "[a-z_]{1,8}",
                ".{60,70}",
            ];
            prop::collection::btree_map(key, value(), 0..40).prop_map(|m| m.into_iter().collect())
        }

        proptest! {
            /// Any bytes give valid readings or counted rejections, never a
            /// panic; only an empty array gives neither.
            #[test]
            fn any_bytes_are_readings_or_rejections(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
                let (mut out, mut rejections) = (Vec::new(), Vec::new());
                parse_datagram(&bytes, NOW, &Format::default(), &mut out, &mut rejections);
                for r in &out {
                    prop_assert!(r.check().is_ok());
                }
                if out.is_empty() && rejections.is_empty() {
                    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                    prop_assert_eq!(value, serde_json::json!([]));
                }
            }

            /// Mutated valid datagrams are still readings or rejections.
            #[test]
            fn mutated_datagrams_do_not_panic(r in reading(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
                let mut bytes = text(&r).into_bytes();
                let i = at.index(bytes.len());
                bytes[i] = byte;
                let (mut out, mut rejections) = (Vec::new(), Vec::new());
                parse_datagram(&bytes, NOW, &Format::default(), &mut out, &mut rejections);
                // A digit turned into a newline splits one object into two
                // values at most once more.
                prop_assert!((1..=2).contains(&(out.len() + rejections.len())));
            }

            /// Valid readings round-trip bit for bit, alone and in arrays.
            #[test]
            fn valid_readings_round_trip(readings in prop::collection::vec(reading(), 1..20)) {
                let texts: Vec<String> = readings.iter().map(text).collect();
                for datagram in [format!("[{}]", texts.join(",")), texts.join("\n")] {
                    let (mut out, mut rejections) = (Vec::new(), Vec::new());
                    parse_datagram(datagram.as_bytes(), NOW, &Format::default(), &mut out, &mut rejections);
                    prop_assert!(rejections.is_empty());
                    prop_assert_eq!(out.len(), readings.len());
                    for (got, want) in out.iter().zip(&readings) {
                        prop_assert_eq!(&got.sensor(), &want.sensor());
                        prop_assert_eq!(got.temperature().map(f64::to_bits), want.temperature().map(f64::to_bits));
                        prop_assert_eq!(got.humidity().map(f64::to_bits), want.humidity().map(f64::to_bits));
                        prop_assert_eq!(got.ingested_at.to_bits(), want.ingested_at.to_bits());
                    }
                }
            }

            /// Any object of fields either comes back exactly (every field,
            /// as sent, the extras in `extra`; through the spill form too)
            /// or is rejected with one reason.
            #[test]
            fn any_object_round_trips_or_is_rejected(object in object()) {
                let text = serde_json::to_string(&object).unwrap();
                let (out, rejections) = parse(&text);
                prop_assert_eq!(out.len() + rejections.len(), 1);
                let Some(r) = out.first() else { return Ok(()); };
                prop_assert!(r.check().is_ok());
                let spilled: Reading = serde_json::from_str(&serde_json::to_string(r).unwrap()).unwrap();
                prop_assert_eq!(&spilled, r);
                let mut back = serde_json::Map::new();
                let id = match r.sensor() {
                    Sensor::Int(id) => serde_json::Value::from(id),
                    Sensor::Name(name) => serde_json::Value::from(name),
                };
                back.insert("sensor_id".into(), id);
                for (key, value) in [("temperature", r.temperature()), ("humidity", r.humidity())] {
                    if let Some(v) = value {
                        back.insert(key.into(), v.into());
                    }
                }
                if let Some(extra) = &r.extra() {
                    let extra: serde_json::Map<String, serde_json::Value> =
                        serde_json::from_str(extra.as_str()).unwrap();
                    back.extend(extra);
                }
                let mut sent = object.clone();
                // As documented: null measurements are absent, a canonical
                // integer name is that integer, a time is kept as seconds.
                for key in ["temperature", "humidity"] {
                    if sent.get(key) == Some(&serde_json::Value::Null) {
                        sent.remove(key);
                    }
                }
                if let Some(serde_json::Value::String(s)) = sent.get("sensor_id")
                    && let SensorId::Int(id) = SensorId::from_text(s)
                {
                    sent.insert("sensor_id".into(), id.into());
                }
                match sent.remove("ingested_at") {
                    None => prop_assert_eq!(r.ingested_at, NOW),
                    Some(serde_json::Value::String(s)) => {
                        prop_assert_eq!(Some(r.ingested_at), parse_rfc3339(&s));
                    }
                    Some(v) => prop_assert_eq!(v.as_f64(), Some(r.ingested_at)),
                }
                let as_f64 = |m: &serde_json::Map<String, serde_json::Value>| -> Vec<(String, String)> {
                    // Numbers compared as the f64 (or integer) they denote.
                    m.iter().map(|(k, v)| (k.clone(), match v {
                        serde_json::Value::Number(n) if n.is_f64() => format!("{:?}", n.as_f64().unwrap().to_bits()),
                        other => other.to_string(),
                    })).collect()
                };
                prop_assert_eq!(as_f64(&back), as_f64(&sent));
            }
        }
    }
}
