//! `sensord stats`: totals and per-sensor aggregates of a database, as a
//! table for people or JSON for programs.

use std::io::{self, Write};

use serde::Serialize;

use crate::reading::SensorId;
use crate::store::{DeliverySummary, MinAvgMax, SensorSummary, Summary};

/// How much of a summary to show.
#[derive(Clone, Copy, Debug, Default)]
pub struct View {
    /// Show only this many sensors, the busiest (most readings) first;
    /// None shows every sensor, in id order.
    pub limit: Option<usize>,
    /// Now, unix seconds: `last_seen` is also shown as an age.
    pub now: f64,
}

impl View {
    /// The sensors to show, in the order to show them.
    fn sensors<'a>(&self, summary: &'a Summary) -> Vec<&'a SensorSummary> {
        let mut sensors: Vec<&SensorSummary> = summary.per_sensor.iter().collect();
        if let Some(limit) = self.limit {
            // Busiest first; ties in id order (the sort is stable).
            sensors.sort_by_key(|s| std::cmp::Reverse(s.readings));
            sensors.truncate(limit);
        }
        sensors
    }
}

/// The JSON document, totals first.
#[derive(Serialize)]
struct Document<'a> {
    readings: u64,
    sensors: usize,
    first_ingested_at: Option<f64>,
    last_ingested_at: Option<f64>,
    per_sensor: Vec<SensorDocument<'a>>,
}

#[derive(Serialize)]
struct SensorDocument<'a> {
    /// As the sensor sent it: a number or a name.
    sensor_id: &'a SensorId,
    readings: u64,
    last_seen: Option<f64>,
    temperature: &'a MinAvgMax,
    humidity: &'a MinAvgMax,
    measurements: &'a [String],
    /// Readings lost (gaps no retransmission filled), duplicates and their
    /// ratio; null for a sensor that sends no sequence numbers.
    lost: Option<u64>,
    duplicates: Option<u64>,
    loss_ratio: Option<f64>,
    /// Every delivery counter, summed over the sensor's boots.
    delivery: Option<DeliveryDocument>,
}

#[derive(Serialize)]
struct DeliveryDocument {
    expected: u64,
    received: u64,
    lost: u64,
    duplicates: u64,
    reordered: u64,
    late: u64,
    boots: u64,
    first_seen: f64,
    last_seen: f64,
}

impl From<&DeliverySummary> for DeliveryDocument {
    fn from(d: &DeliverySummary) -> Self {
        DeliveryDocument {
            expected: d.expected,
            received: d.received,
            lost: d.lost(),
            duplicates: d.duplicates,
            reordered: d.reordered,
            late: d.late,
            boots: d.boots,
            first_seen: d.first_seen,
            last_seen: d.last_seen,
        }
    }
}

/// Writes `summary` as one JSON object: the totals, then `per_sensor`.
pub fn write_json(summary: &Summary, view: &View, out: &mut impl Write) -> io::Result<()> {
    let document = Document {
        readings: summary.readings,
        sensors: summary.per_sensor.len(),
        first_ingested_at: summary.span.map(|s| s.0),
        last_ingested_at: summary.span.map(|s| s.1),
        per_sensor: view
            .sensors(summary)
            .into_iter()
            .map(|s| SensorDocument {
                sensor_id: &s.sensor_id,
                readings: s.readings,
                last_seen: Some(s.last_seen).filter(|t| !t.is_nan()),
                temperature: &s.temperature,
                humidity: &s.humidity,
                measurements: &s.measurements,
                lost: s.delivery.as_ref().map(DeliverySummary::lost),
                duplicates: s.delivery.as_ref().map(|d| d.duplicates),
                loss_ratio: s.delivery.as_ref().map(DeliverySummary::loss_ratio),
                delivery: s.delivery.as_ref().map(DeliveryDocument::from),
            })
            .collect(),
    };
    serde_json::to_writer_pretty(&mut *out, &document)?;
    writeln!(out)
}

/// Writes `summary` as a human-readable table.
pub fn write_table(summary: &Summary, view: &View, out: &mut impl Write) -> io::Result<()> {
    writeln!(out, "readings: {}", summary.readings)?;
    writeln!(out, "sensors:  {}", summary.per_sensor.len())?;
    match summary.span {
        Some((first, last)) => writeln!(
            out,
            "span:     {} .. {} ({})",
            timestamp(first),
            timestamp(last),
            duration(last - first)
        )?,
        None if summary.readings == 0 => writeln!(out, "span:     (no readings)")?,
        None => writeln!(out, "span:     (no ingested_at is a number)")?,
    }
    let sensors = view.sensors(summary);
    if sensors.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    if sensors.len() < summary.per_sensor.len() {
        writeln!(
            out,
            "the {} busiest of {} sensors:",
            sensors.len(),
            summary.per_sensor.len()
        )?;
    }
    // Names can be longer than numbers: the column fits the longest.
    let ids: Vec<String> = sensors.iter().map(|s| s.sensor_id.to_string()).collect();
    let width = ids
        .iter()
        .map(|id| id.chars().count())
        .max()
        .unwrap_or(0)
        .max(10);
    // Loss columns only where some sensor sends sequence numbers.
    let sequenced = sensors.iter().any(|s| s.delivery.is_some());
    let loss_header = if sequenced {
        format!(" {:>8} {:>7} {:>8}", "lost", "loss", "dups")
    } else {
        String::new()
    };
    writeln!(
        out,
        "{:>width$} {:>9} {:>10}{loss_header}  {:>8} {:>8} {:>8}  {:>8} {:>8} {:>8}  measures",
        "sensor", "readings", "last seen", "temp min", "avg", "max", "hum min", "avg", "max",
    )?;
    for (s, id) in sensors.into_iter().zip(&ids) {
        let (t, h) = (&s.temperature, &s.humidity);
        let loss = match (&s.delivery, sequenced) {
            (Some(d), _) => format!(
                " {:>8} {:>6.2}% {:>8}",
                d.lost(),
                d.loss_ratio() * 100.0,
                d.duplicates
            ),
            (None, true) => format!(" {:>8} {:>7} {:>8}", "-", "-", "-"),
            (None, false) => String::new(),
        };
        writeln!(
            out,
            "{:>width$} {:>9} {:>10}{loss}  {:>8} {:>8} {:>8}  {:>8} {:>8} {:>8}  {}",
            id,
            s.readings,
            age(view.now - s.last_seen),
            number(t.min),
            number(t.avg),
            number(t.max),
            number(h.min),
            number(h.avg),
            number(h.max),
            s.measurements.join(", ")
        )?;
    }
    Ok(())
}

/// How long ago, to the second, in the largest two units (`3m 12s ago`);
/// `-` when unknown, `future` for a reading stamped ahead of the clock.
fn age(seconds: f64) -> String {
    if seconds.is_nan() {
        return "-".into();
    }
    if seconds < 0.0 {
        return "future".into();
    }
    match std::time::Duration::try_from_secs_f64(seconds.round()) {
        Ok(d) => {
            let text = humantime::format_duration(d).to_string();
            let two: Vec<&str> = text.split(' ').take(2).collect();
            format!("{} ago", two.join(" "))
        }
        Err(_) => "long ago".into(),
    }
}

/// The latest time RFC 3339 (and humantime) can write: 9999-12-31T23:59:59.
const LAST_RFC3339_SECOND: f64 = 253_402_300_799.0;

/// Unix seconds as RFC 3339 UTC, or the raw number where out of range: any
/// value another program wrote must print.
fn timestamp(seconds: f64) -> String {
    if !(0.0..=LAST_RFC3339_SECOND).contains(&seconds) {
        return raw(seconds);
    }
    let time = std::time::Duration::try_from_secs_f64(seconds)
        .ok()
        .and_then(|d| std::time::UNIX_EPOCH.checked_add(d));
    match time {
        Some(t) => humantime::format_rfc3339_millis(t).to_string(),
        None => raw(seconds),
    }
}

/// A span of seconds in words, or the raw number of seconds where too long
/// for a `Duration` (times far out of range, or infinite).
fn duration(seconds: f64) -> String {
    match std::time::Duration::try_from_secs_f64(seconds.max(0.0).round()) {
        Ok(d) => humantime::format_duration(d).to_string(),
        Err(_) => format!("{} s", raw(seconds)),
    }
}

/// A number as written in code, in scientific notation where its digits
/// would not fit a line (1e300 rather than 301 digits).
fn raw(value: f64) -> String {
    if value.abs() < 1e16 {
        value.to_string()
    } else {
        format!("{value:e}")
    }
}

/// A measurement for the table: two decimals where that fits the column,
/// else scientific notation; "-" for NaN, which a store gives where it had
/// no number to aggregate.
fn number(value: f64) -> String {
    if value.is_nan() {
        "-".to_string()
    } else if value.is_infinite() || value.abs() < 1e6 {
        format!("{value:.2}")
    } else {
        format!("{value:.2e}")
    }
}
