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
            humantime::format_duration(std::time::Duration::from_secs_f64(
                (last - first).max(0.0).round()
            ))
        )?,
        None => writeln!(out, "span:     (no readings)")?,
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
            "{:>10} {:>9}  {:>8.2} {:>8.2} {:>8.2}  {:>8.2} {:>8.2} {:>8.2}",
            s.sensor_id, s.readings, t.min, t.avg, t.max, h.min, h.avg, h.max
        )?;
    }
    Ok(())
}

/// Unix seconds as RFC 3339 UTC, or the raw number where out of range.
fn timestamp(seconds: f64) -> String {
    let time =
        std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs_f64(seconds.max(0.0)));
    match time {
        Some(t) => humantime::format_rfc3339_millis(t).to_string(),
        None => seconds.to_string(),
    }
}
