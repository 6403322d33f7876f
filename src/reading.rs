//! The `Reading` type and datagram parsing and validation. No I/O.
//!
//! A datagram is UTF-8 JSON holding one object or an array of objects. Each
//! object is validated on its own, so the good elements of an array are kept
//! and each bad one becomes one counted `Rejection`.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The largest `ingested_at` accepted: 9999-12-31T23:59:59Z, which every
/// store can hold.
pub const MAX_INGESTED_AT: f64 = 253_402_300_799.0;

/// Now as unix seconds, the unit of every timestamp in a reading.
pub fn unix_now() -> f64 {
    // Before 1970 only on a broken clock; 0 then keeps a reading valid.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One validated sensor reading, as stored and as written to the spill file.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reading {
    pub sensor_id: i64,
    pub temperature: f64,
    pub humidity: f64,
    /// Unix seconds when the sensor took the reading (or `received_at`).
    pub ingested_at: f64,
    /// Unix seconds when the datagram reached sensord.
    pub received_at: f64,
}

impl Reading {
    /// Checks the rules a stored reading must meet; used for spill lines,
    /// which bypass datagram parsing.
    pub fn check(&self) -> Result<(), Rejection> {
        for (field, value) in [
            (Field::Temperature, self.temperature),
            (Field::Humidity, self.humidity),
            (Field::IngestedAt, self.ingested_at),
            (Field::ReceivedAt, self.received_at),
        ] {
            if !value.is_finite() {
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
        Ok(())
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
}

impl Field {
    pub fn name(self) -> &'static str {
        match self {
            Field::SensorId => "sensor_id",
            Field::Temperature => "temperature",
            Field::Humidity => "humidity",
            Field::IngestedAt => "ingested_at",
            Field::ReceivedAt => "received_at",
        }
    }
}

/// Why a datagram or one array element was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    NotUtf8,
    NotJson,
    NotObject,
    Missing(Field),
    WrongType(Field),
    OutOfRange(Field),
}

impl Rejection {
    /// How many distinct reasons `index` distinguishes.
    pub const KINDS: usize = 6;

    /// A dense index per reason kind, for counters and rate limiting.
    pub fn index(self) -> usize {
        match self {
            Rejection::NotUtf8 => 0,
            Rejection::NotJson => 1,
            Rejection::NotObject => 2,
            Rejection::Missing(_) => 3,
            Rejection::WrongType(_) => 4,
            Rejection::OutOfRange(_) => 5,
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
        ][index]
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::NotUtf8 => f.write_str("not UTF-8"),
            Rejection::NotJson => f.write_str("not JSON"),
            Rejection::NotObject => f.write_str("not a JSON object"),
            Rejection::Missing(field) => write!(f, "missing field `{}`", field.name()),
            Rejection::WrongType(Field::SensorId) => {
                f.write_str("wrong type for `sensor_id` (expected an integer)")
            }
            Rejection::WrongType(field) => {
                write!(f, "wrong type for `{}` (expected a number)", field.name())
            }
            Rejection::OutOfRange(Field::SensorId) => {
                f.write_str("`sensor_id` out of range (must fit in i64)")
            }
            Rejection::OutOfRange(field @ (Field::IngestedAt | Field::ReceivedAt)) => write!(
                f,
                "`{}` out of range (must be 0 to {MAX_INGESTED_AT} unix seconds)",
                field.name()
            ),
            Rejection::OutOfRange(field) => {
                write!(f, "`{}` out of range (must be finite)", field.name())
            }
        }
    }
}

/// Parses one datagram received at `received_at` (unix seconds), appending
/// its valid readings to `out` and the reason for each invalid one to
/// `rejections`. If the datagram is not UTF-8 JSON at all, nothing is
/// appended to `out` and it counts as one rejection.
pub fn parse_datagram(
    bytes: &[u8],
    received_at: f64,
    out: &mut Vec<Reading>,
    rejections: &mut Vec<Rejection>,
) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        rejections.push(Rejection::NotUtf8);
        return;
    };
    let (out_len, rejections_len) = (out.len(), rejections.len());
    let mut de = serde_json::Deserializer::from_str(text);
    let seed = DatagramSeed {
        received_at,
        out: &mut *out,
        rejections: &mut *rejections,
    };
    if seed.deserialize(&mut de).and_then(|()| de.end()).is_err() {
        // A syntax error late in an array must not keep the elements before it.
        out.truncate(out_len);
        rejections.truncate(rejections_len);
        rejections.push(Rejection::NotJson);
    }
}

/// Visits the top-level value, pushing results as it goes.
struct DatagramSeed<'a> {
    received_at: f64,
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
        let raw = RawReading::from_map(map)?;
        let received_at = self.received_at;
        self.push(raw.validate(received_at));
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        while let Some(element) = seq.next_element::<Element>()? {
            let received_at = self.received_at;
            self.push(element.0.and_then(|raw| raw.validate(received_at)));
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

/// One array element: an object still to validate, or not an object.
struct Element(Result<RawReading, Rejection>);

impl<'de> Deserialize<'de> for Element {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ElementVisitor;
        impl<'de> Visitor<'de> for ElementVisitor {
            type Value = Element;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a reading object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Element, A::Error> {
                RawReading::from_map(map).map(|raw| Element(Ok(raw)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Element, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Element(Err(Rejection::NotObject)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Element, E> {
                Ok(Element(Err(Rejection::NotObject)))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Element, E> {
                Ok(Element(Err(Rejection::NotObject)))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Element, E> {
                Ok(Element(Err(Rejection::NotObject)))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Element, E> {
                Ok(Element(Err(Rejection::NotObject)))
            }
            fn visit_str<E>(self, _: &str) -> Result<Element, E> {
                Ok(Element(Err(Rejection::NotObject)))
            }
            fn visit_unit<E>(self) -> Result<Element, E> {
                Ok(Element(Err(Rejection::NotObject)))
            }
        }
        deserializer.deserialize_any(ElementVisitor)
    }
}

/// A JSON value reduced to what validation needs, without allocating.
#[derive(Clone, Copy)]
enum Scalar {
    Int(i64),
    UInt(u64),
    Float(f64),
    Other,
}

impl Scalar {
    fn number(self) -> Option<f64> {
        match self {
            Scalar::Int(v) => Some(v as f64),
            Scalar::UInt(v) => Some(v as f64),
            Scalar::Float(v) => Some(v),
            Scalar::Other => None,
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
            fn visit_str<E>(self, _: &str) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }
            fn visit_unit<E>(self) -> Result<Scalar, E> {
                Ok(Scalar::Other)
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

/// An object key: one of ours, or one to ignore.
enum Key {
    Known(Field),
    Unknown,
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
                    _ => Key::Unknown,
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
}

impl RawReading {
    fn from_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut raw = RawReading::default();
        while let Some(key) = map.next_key::<Key>()? {
            let slot = match key {
                Key::Known(Field::SensorId) => &mut raw.sensor_id,
                Key::Known(Field::Temperature) => &mut raw.temperature,
                Key::Known(Field::Humidity) => &mut raw.humidity,
                Key::Known(Field::IngestedAt) => &mut raw.ingested_at,
                // A datagram's `received_at` is the clock's, never its own.
                Key::Known(Field::ReceivedAt) | Key::Unknown => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value()?);
        }
        Ok(raw)
    }

    fn validate(self, received_at: f64) -> Result<Reading, Rejection> {
        let sensor_id = match self.sensor_id.ok_or(Rejection::Missing(Field::SensorId))? {
            Scalar::Int(v) => v,
            Scalar::UInt(v) => {
                i64::try_from(v).map_err(|_| Rejection::OutOfRange(Field::SensorId))?
            }
            Scalar::Float(_) | Scalar::Other => return Err(Rejection::WrongType(Field::SensorId)),
        };
        let number = |value: Option<Scalar>, field| {
            let value = value.ok_or(Rejection::Missing(field))?;
            let number = value.number().ok_or(Rejection::WrongType(field))?;
            if number.is_finite() {
                Ok(number)
            } else {
                Err(Rejection::OutOfRange(field))
            }
        };
        let temperature = number(self.temperature, Field::Temperature)?;
        let humidity = number(self.humidity, Field::Humidity)?;
        let ingested_at = match self.ingested_at {
            None => received_at,
            Some(_) => number(self.ingested_at, Field::IngestedAt)?,
        };
        if !(0.0..=MAX_INGESTED_AT).contains(&ingested_at) {
            return Err(Rejection::OutOfRange(Field::IngestedAt));
        }
        Ok(Reading {
            sensor_id,
            temperature,
            humidity,
            ingested_at,
            received_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: f64 = 1_764_150_000.5;

    fn parse(text: &str) -> (Vec<Reading>, Vec<Rejection>) {
        let (mut out, mut rejections) = (Vec::new(), Vec::new());
        parse_datagram(text.as_bytes(), NOW, &mut out, &mut rejections);
        (out, rejections)
    }

    fn reject(text: &str) -> Rejection {
        let (out, rejections) = parse(text);
        assert!(out.is_empty(), "{text} gave {out:?}");
        assert_eq!(rejections.len(), 1, "{text}");
        rejections[0]
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
            vec![Reading {
                sensor_id: 42,
                temperature: 21.5,
                humidity: 7.2,
                ingested_at: 1764150000.12,
                received_at: NOW
            }]
        );
    }

    /// Integers are fine for numbers, unknown fields are ignored, and a
    /// missing `ingested_at` takes the receive time.
    #[test]
    fn integers_unknown_fields_and_default_time() {
        let (out, _) =
            parse(r#"{"humidity": 7, "extra": {"a": [1, 2]}, "temperature": -3, "sensor_id": 1}"#);
        assert_eq!(out[0].temperature, -3.0);
        assert_eq!(out[0].humidity, 7.0);
        assert_eq!(out[0].ingested_at, NOW);
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
        assert_eq!(out.iter().map(|r| r.sensor_id).collect::<Vec<_>>(), [1, 3]);
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
            reject(r#"{"sensor_id": 1, "temperature": null, "humidity": 2}"#),
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
        parse_datagram(b"{\"a\xff\": 1}", NOW, &mut Vec::new(), &mut rejections);
        assert_eq!(rejections, [Rejection::NotUtf8]);
    }

    /// Extreme but valid values are accepted exactly.
    #[test]
    fn boundaries() {
        let (out, _) = parse(
            r#"{"sensor_id": -9223372036854775808, "temperature": 1.7976931348623157e308,
                "humidity": 5e-324, "ingested_at": 253402300799}"#,
        );
        assert_eq!(out[0].sensor_id, i64::MIN);
        assert_eq!(out[0].temperature, f64::MAX);
        assert_eq!(out[0].humidity, 5e-324);
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
            let (out, _) = parse(&format!(
                r#"{{"sensor_id": 1, "temperature": {text}, "humidity": 1, "ingested_at": 1}}"#
            ));
            assert_eq!(
                out[0].temperature.to_bits(),
                text.parse::<f64>().unwrap().to_bits()
            );
        }
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
            (any::<i64>(), finite(), finite(), 0.0..=MAX_INGESTED_AT).prop_map(
                |(sensor_id, temperature, humidity, ingested_at)| Reading {
                    sensor_id,
                    temperature,
                    humidity,
                    ingested_at,
                    received_at: NOW,
                },
            )
        }

        fn text(r: &Reading) -> String {
            // Debug formatting is the shortest text that round-trips, with
            // the sign of zero and an exponent where needed.
            format!(
                r#"{{"sensor_id":{},"temperature":{:?},"humidity":{:?},"ingested_at":{:?}}}"#,
                r.sensor_id, r.temperature, r.humidity, r.ingested_at
            )
        }

        proptest! {
            /// Any bytes give valid readings or counted rejections, never a
            /// panic; only an empty array gives neither.
            #[test]
            fn any_bytes_are_readings_or_rejections(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
                let (mut out, mut rejections) = (Vec::new(), Vec::new());
                parse_datagram(&bytes, NOW, &mut out, &mut rejections);
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
                parse_datagram(&bytes, NOW, &mut out, &mut rejections);
                prop_assert_eq!(out.len() + rejections.len(), 1);
            }

            /// Valid readings round-trip bit for bit, alone and in arrays.
            #[test]
            fn valid_readings_round_trip(readings in prop::collection::vec(reading(), 1..20)) {
                let texts: Vec<String> = readings.iter().map(text).collect();
                let datagram = format!("[{}]", texts.join(","));
                let (mut out, mut rejections) = (Vec::new(), Vec::new());
                parse_datagram(datagram.as_bytes(), NOW, &mut out, &mut rejections);
                prop_assert!(rejections.is_empty());
                prop_assert_eq!(out.len(), readings.len());
                for (got, want) in out.iter().zip(&readings) {
                    prop_assert_eq!(got.sensor_id, want.sensor_id);
                    prop_assert_eq!(got.temperature.to_bits(), want.temperature.to_bits());
                    prop_assert_eq!(got.humidity.to_bits(), want.humidity.to_bits());
                    prop_assert_eq!(got.ingested_at.to_bits(), want.ingested_at.to_bits());
                }
            }
        }
    }
}
