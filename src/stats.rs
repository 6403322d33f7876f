//! `sensord stats`: totals and per-sensor aggregates of a database, as a
//! table for people or JSON for programs.

use std::io::{self, Write};

use serde_json::json;

use crate::store::{MinAvgMax, Summary};

/// Writes `summary` as one JSON object.
pub fn write_json(summary: &Summary, out: &mut impl Write) -> io::Result<()> {
    let quantity = |m: &MinAvgMax| json!({"min": m.min, "avg": m.avg, "max": m.max});
    let per_sensor: Vec<_> = summary
        .per_sensor
        .iter()
        .map(|s| {
            json!({
                "sensor_id": s.sensor_id,
                "readings": s.readings,
                "temperature": quantity(&s.temperature),
                "humidity": quantity(&s.humidity),
            })
        })
        .collect();
    let value = json!({
        "readings": summary.readings,
        "sensors": summary.per_sensor.len(),
        "first_ingested_at": summary.span.map(|s| s.0),
        "last_ingested_at": summary.span.map(|s| s.1),
        "per_sensor": per_sensor,
    });
    serde_json::to_writer_pretty(&mut *out, &value)?;
    writeln!(out)
}

/// Writes `summary` as a human-readable table.
pub fn write_table(summary: &Summary, out: &mut impl Write) -> io::Result<()> {
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
    if summary.per_sensor.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:>10} {:>9}  {:>8} {:>8} {:>8}  {:>8} {:>8} {:>8}",
        "sensor", "readings", "temp min", "avg", "max", "hum min", "avg", "max"
    )?;
    for s in &summary.per_sensor {
        let (t, h) = (&s.temperature, &s.humidity);
        writeln!(
            out,
            "{:>10} {:>9}  {:>8} {:>8} {:>8}  {:>8} {:>8} {:>8}",
            s.sensor_id,
            s.readings,
            number(t.min),
            number(t.avg),
            number(t.max),
            number(h.min),
            number(h.avg),
            number(h.max)
        )?;
    }
    Ok(())
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
