//! The spill file: where readings go when the database cannot take them at
//! shutdown, and where the next start takes them back from.
//!
//! JSON Lines, one `Reading` per line including `received_at`, nothing else.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use log::{info, warn};

use crate::error::Error;
use crate::reading::Reading;
use crate::store::{self, Store};

/// The spill path used when `--spill` is not given.
pub fn default_path(db: &str) -> PathBuf {
    if crate::store::is_url(db) {
        PathBuf::from("sensord.spill.jsonl")
    } else {
        PathBuf::from(format!("{db}.spill.jsonl"))
    }
}

/// Appends `readings` to the spill file and makes them durable (the file and
/// its directory entry are fsynced) before returning.
pub fn write(path: &Path, readings: &[Reading]) -> Result<(), Error> {
    let spill_error = |source| Error::Spill {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(spill_error)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    for reading in readings {
        serde_json::to_writer(&mut out, reading).map_err(|e| spill_error(e.into()))?;
        out.write_all(b"\n").map_err(spill_error)?;
    }
    let file = out.into_inner().map_err(|e| spill_error(e.into_error()))?;
    file.sync_all().map_err(spill_error)?;
    sync_parent(path).map_err(spill_error)
}

/// Makes a newly created file's directory entry durable.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// Imports the spill file at `path`, if there is one, in one transaction,
/// then removes it. Returns how many readings it imported.
///
/// The import is recorded under a hash of the file's bytes in the same
/// transaction, so a crash between commit and removal cannot import it twice.
/// A line that is not a valid reading stops start-up (the file is kept)
/// unless `skip_bad_lines`, which logs and skips it.
pub fn replay(path: &Path, store: &mut dyn Store, skip_bad_lines: bool) -> Result<usize, Error> {
    let spill_error = |source| Error::Spill {
        path: path.to_path_buf(),
        source,
    };
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(spill_error(e)),
    };
    let mut readings = parse(path, &bytes, skip_bad_lines)?;
    // The key is of the file's bytes, so sorting does not change it.
    store::sort_for_index(&mut readings);
    let key = format!("{:016x}-{}", fnv1a(&bytes), bytes.len());
    let batches = [store::SpillBatch { id: None, readings }];
    let imported = store.import_spill(&key, &batches)?.is_some();
    let [store::SpillBatch { readings, .. }] = batches;
    fs::remove_file(path).map_err(spill_error)?;
    if imported {
        info!(
            "replayed {} readings from spill file {}",
            readings.len(),
            path.display()
        );
        Ok(readings.len())
    } else {
        info!(
            "spill file {} was already imported; removed it without importing again",
            path.display()
        );
        Ok(0)
    }
}

fn parse(path: &Path, bytes: &[u8], skip_bad_lines: bool) -> Result<Vec<Reading>, Error> {
    let mut readings = Vec::new();
    let mut skipped = 0usize;
    // Every line ends with a newline; an empty file has no lines at all.
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let lines = body.split(|b| *b == b'\n').filter(|_| !bytes.is_empty());
    for (index, line) in lines.enumerate() {
        let parsed = serde_json::from_slice::<Reading>(line)
            .map_err(|e| e.to_string())
            .and_then(|r| r.check().map(|()| r).map_err(|e| e.to_string()));
        match parsed {
            Ok(reading) => readings.push(reading),
            Err(reason) if skip_bad_lines => {
                warn!(
                    "skipping spill file {} line {}: {reason}",
                    path.display(),
                    index + 1
                );
                skipped += 1;
            }
            Err(reason) => {
                return Err(Error::BadSpillLine {
                    path: path.to_path_buf(),
                    line: index + 1,
                    reason,
                });
            }
        }
    }
    if skipped > 0 {
        warn!(
            "skipped {skipped} bad lines of spill file {}",
            path.display()
        );
    }
    Ok(readings)
}

/// 64-bit FNV-1a: a stable content hash (std's hasher may change between
/// Rust releases, and the key must match across upgrades).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(sensor_id: i64) -> Reading {
        Reading {
            sensor_id,
            temperature: 21.123456789012345,
            humidity: 0.1,
            ingested_at: 1764150000.123456,
            received_at: 1764150000.5,
        }
    }

    /// What `write` appends, `parse` reads back bit-exactly.
    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.spill.jsonl");
        write(&path, &[reading(1), reading(2)]).unwrap();
        write(&path, &[reading(3)]).unwrap();
        let bytes = fs::read(&path).unwrap();
        let back = parse(&path, &bytes, false).unwrap();
        assert_eq!(back, vec![reading(1), reading(2), reading(3)]);
    }

    /// A corrupt line is named by number, or skipped when asked.
    #[test]
    fn corrupt_line() {
        let path = Path::new("s.jsonl");
        let line = serde_json::to_string(&reading(1)).unwrap();
        let text = format!("{line}\n{{\"sensor_id\": 1\n{line}\n");
        match parse(path, text.as_bytes(), false) {
            Err(Error::BadSpillLine { line: 2, .. }) => {}
            other => panic!("expected line 2 to be bad, got {other:?}"),
        }
        assert_eq!(parse(path, text.as_bytes(), true).unwrap().len(), 2);
        assert!(matches!(
            parse(path, b"\n", false),
            Err(Error::BadSpillLine { line: 1, .. })
        ));
    }
}
