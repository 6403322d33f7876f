//! The spill file: where readings go when the database cannot take them at
//! shutdown, and where the next start takes them back from; and beside it,
//! the dead-letter file of readings the database refused for good.
//!
//! One instance owns a spill path for its whole life, through an exclusive
//! lock on `<spill>.lock`, so two instances can never interleave or delete
//! each other's spills. A spill is written whole to a new temporary file in
//! the same folder, fsynced, then renamed into place, and the folder is
//! fsynced: a reader (the next start) never sees half a spill. Files are
//! created 0600 and never through a symlink, and a symlink is never read.
//!
//! The format is JSON Lines: a header line per batch, `{"batch_run": R,
//! "batch_seq": S, "readings": N}`, naming the id the batch was last
//! attempted under, then its N readings, one per line with `received_at`.
//! Readings before any header (files from before batch ids) form a batch
//! without an id.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::delivery::{Delivery, StreamUpdate};
use crate::error::Error;
use crate::reading::Reading;
use crate::store::{self, BatchId, Refusal, SpillBatch, Store};

/// Owner-only: readings may be private.
const MODE: u32 = 0o600;

/// The spill path used when `--spill` is not given: beside a SQLite file,
/// or for PostgreSQL a name in the working directory made of the server,
/// database and table, so instances writing different tables never share
/// one.
pub fn default_path(db: &str, table: &str) -> PathBuf {
    if !store::is_url(db) {
        return PathBuf::from(format!("{db}.spill.jsonl"));
    }
    let config = store::postgres::parsed(db);
    let host = config
        .as_ref()
        .and_then(|c| c.get_hosts().first().cloned())
        .map(|h| match h {
            postgres::config::Host::Tcp(name) => name,
            postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config
        .as_ref()
        .and_then(|c| c.get_ports().first().copied())
        .unwrap_or(5432);
    let dbname = config
        .as_ref()
        .and_then(|c| c.get_dbname().or(c.get_user()).map(str::to_string))
        .unwrap_or_default();
    let name = format!("sensord-{host}-{port}-{dbname}-{table}");
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    PathBuf::from(format!("{safe}.spill.jsonl"))
}

/// A batch header line.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    batch_run: u64,
    batch_seq: u64,
    readings: usize,
}

/// A dead-letter line: the reading and why the database refused it.
#[derive(Serialize)]
struct DeadLetter<'a> {
    reading: &'a Reading,
    error: &'a str,
}

/// What a replay did at start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Readings committed from the spill file.
    pub imported: u64,
    /// Readings the database refused, now in the dead-letter file.
    pub dead_letter: u64,
    /// Spill files imported: 1 if there was one to import, else 0.
    pub files: u64,
}

/// This instance's claim on a spill path: the lock is held until dropped.
#[derive(Debug)]
pub struct Spill {
    path: PathBuf,
    dead_letter_path: PathBuf,
    /// Holds the exclusive lock on `<spill>.lock` while this lives.
    _lock: File,
}

impl Spill {
    /// Claims `path` for this instance: creates `<path>.lock` (which also
    /// proves the folder writable, so a bad `--spill` fails at start, not at
    /// stop) and takes an exclusive lock on it, or fails if another
    /// instance holds it.
    pub fn claim(path: &Path) -> Result<Spill, Error> {
        let lock_path = with_suffix(path, ".lock");
        let lock = new_file_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|source| Error::Spill {
                path: lock_path.clone(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::Config(format!(
                    "spill file {} is in use by another sensord (it holds {}); give each \
                     instance its own --spill path",
                    path.display(),
                    lock_path.display()
                )));
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(Error::Spill {
                    path: lock_path,
                    source,
                });
            }
        }
        warn_about_leftovers(path);
        Ok(Spill {
            path: path.to_path_buf(),
            dead_letter_path: dead_letter_path(path),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn dead_letter_path(&self) -> &Path {
        &self.dead_letter_path
    }

    /// Writes `batches` to the spill file, after anything it already
    /// holds, all or nothing: to a temporary file, fsynced, renamed into
    /// place, the folder fsynced. On error nothing changed on disk.
    pub fn write(&self, batches: &[SpillBatch]) -> Result<(), Error> {
        let spill_error = |source| Error::Spill {
            path: self.path.clone(),
            source,
        };
        let temp = with_suffix(&self.path, &format!(".tmp.{}", std::process::id()));
        let result = (|| -> io::Result<()> {
            // Tests fill the disk here.
            #[cfg(feature = "failpoints")]
            fail::fail_point!("spill::write", |_| Err(io::Error::from_raw_os_error(
                libc::ENOSPC
            )));
            let _ = fs::remove_file(&temp);
            let file = new_file_options()
                .write(true)
                .create_new(true)
                .open(&temp)?;
            let mut out = BufWriter::with_capacity(1 << 20, file);
            // A spill left by an earlier stop of this same claim is kept.
            if let Some(mut old) = open_existing(&self.path)? {
                io::copy(&mut old, &mut out)?;
            }
            write_batches(&mut out, batches)?;
            let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
            file.sync_all()?;
            // Tests kill the process here.
            #[cfg(feature = "failpoints")]
            fail::fail_point!("spill::before_rename");
            fs::rename(&temp, &self.path)?;
            sync_parent(&self.path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result.map_err(spill_error)
    }

    /// Appends `refusals` to the dead-letter file and makes them durable.
    pub fn dead_letters(&self, refusals: &[Refusal]) -> Result<(), Error> {
        if refusals.is_empty() {
            return Ok(());
        }
        let dead_error = |source| Error::Spill {
            path: self.dead_letter_path.clone(),
            source,
        };
        let file = new_file_options()
            .append(true)
            .create(true)
            .open(&self.dead_letter_path)
            .map_err(dead_error)?;
        let mut out = BufWriter::new(file);
        for refusal in refusals {
            let line = DeadLetter {
                reading: &refusal.reading,
                error: &refusal.cause,
            };
            serde_json::to_writer(&mut out, &line).map_err(|e| dead_error(e.into()))?;
            out.write_all(b"\n").map_err(dead_error)?;
        }
        let file = out.into_inner().map_err(|e| dead_error(e.into_error()))?;
        file.sync_all().map_err(dead_error)?;
        sync_parent(&self.dead_letter_path).map_err(dead_error)
    }

    /// Imports the spill file, if there is one, in one transaction, then
    /// removes it; readings the database refuses go to the dead-letter
    /// file first. The import is recorded under a hash of the file's bytes
    /// in the same transaction, so a crash between commit and removal
    /// cannot import it twice; a batch with an id that already committed
    /// is skipped. A line that is not a valid reading stops start-up (the
    /// file is kept) unless `skip_bad_lines`, which logs and skips it.
    pub fn replay(&self, store: &mut dyn Store, skip_bad_lines: bool) -> Result<Replayed, Error> {
        let spill_error = |source| Error::Spill {
            path: self.path.clone(),
            source,
        };
        let Some(mut file) = open_existing(&self.path).map_err(spill_error)? else {
            return Ok(Replayed::default());
        };
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut file, &mut bytes).map_err(spill_error)?;
        let mut batches = parse(&self.path, &bytes, skip_bad_lines)?;
        // Sequenced readings are admitted against what the database holds,
        // in the order they were received, as the persister would have.
        let mut delivery = Delivery::new();
        let mut streams: Vec<StreamUpdate> = Vec::new();
        let (mut duplicates, mut late) = (0, 0);
        for batch in &mut batches {
            for (key, record) in store.load_streams(&delivery.unknown(&batch.readings))? {
                delivery.insert(key, record);
            }
            let admitted = delivery.admit(std::mem::take(&mut batch.readings));
            batch.readings = admitted.readings;
            (duplicates, late) = (duplicates + admitted.duplicates, late + admitted.late);
            for update in admitted.streams {
                // A later batch's state of a stream includes the earlier's.
                streams.retain(|s| s.key != update.key);
                streams.push(update);
            }
        }
        // The key is of the file's bytes, so sorting does not change it.
        for batch in &mut batches {
            store::sort_for_index(&mut batch.readings);
        }
        let key = format!("{:016x}-{}", fnv1a(&bytes), bytes.len());
        let total: usize = batches.iter().map(|b| b.readings.len()).sum();
        info!(
            "importing {total} readings from spill file {}",
            self.path.display()
        );
        // Tests stop the process here.
        #[cfg(feature = "failpoints")]
        fail::fail_point!("spill::before_import");
        let outcome = store.import_spill(&key, &batches, &streams)?;
        let replayed = match outcome {
            Some(imported) => {
                // Durable before the file goes: a failure here keeps it.
                self.dead_letters(&imported.refused)?;
                let dead_letter = imported.refused.len() as u64;
                let mut notes = String::new();
                if imported.skipped > 0 {
                    notes += &format!(
                        "; {} were committed before (an unanswered COMMIT) and not stored again",
                        imported.skipped
                    );
                }
                if duplicates + late > 0 {
                    notes += &format!(
                        "; {duplicates} duplicates and {late} late sequenced readings not stored"
                    );
                }
                if dead_letter > 0 {
                    notes += &format!(
                        "; {dead_letter} refused by the database are in {}",
                        self.dead_letter_path.display()
                    );
                }
                info!(
                    "replayed {} readings from spill file {}{notes}",
                    imported.stored,
                    self.path.display()
                );
                Replayed {
                    imported: imported.stored,
                    dead_letter,
                    files: 1,
                }
            }
            None => {
                info!(
                    "spill file {} was already imported; removing it without importing again",
                    self.path.display()
                );
                Replayed::default()
            }
        };
        fs::remove_file(&self.path).map_err(spill_error)?;
        sync_parent(&self.path).map_err(spill_error)?;
        Ok(replayed)
    }
}

/// Options for every file this module creates: 0600, and never through a
/// symlink planted at the path.
fn new_file_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(MODE).custom_flags(libc::O_NOFOLLOW);
    options
}

/// Opens `path` for reading if it exists; a symlink there is refused.
fn open_existing(path: &Path) -> io::Result<Option<File>> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(io::Error::other(
            "is a symbolic link; sensord does not follow links for its spill files",
        )),
        Err(e) => Err(e),
    }
}

/// The dead-letter file beside a spill file.
pub fn dead_letter_path(spill: &Path) -> PathBuf {
    let text = spill.as_os_str().to_string_lossy();
    match text.strip_suffix(".spill.jsonl") {
        Some(stem) => PathBuf::from(format!("{stem}.dead.jsonl")),
        None => with_suffix(spill, ".dead.jsonl"),
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Temporary files left by a spill that was killed before its rename hold
/// no complete spill that anyone lost track of: the readings they were
/// writing were in memory only. They are named so an operator can look.
fn warn_about_leftovers(path: &Path) {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let prefix = format!("{}.tmp.", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            warn!(
                "{} is left from a spill that was killed before it completed; it was \
                 never part of the spill file and is not imported",
                entry.path().display()
            );
        }
    }
}

fn write_batches(out: &mut impl Write, batches: &[SpillBatch]) -> io::Result<()> {
    for batch in batches {
        if let Some(id) = batch.id {
            let header = Header {
                batch_run: id.run,
                batch_seq: id.seq,
                readings: batch.readings.len(),
            };
            serde_json::to_writer(&mut *out, &header)?;
            out.write_all(b"\n")?;
        }
        for reading in &batch.readings {
            serde_json::to_writer(&mut *out, reading)?;
            out.write_all(b"\n")?;
        }
    }
    Ok(())
}

/// Makes a directory entry (a new, renamed or removed file) durable.
fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

fn parse(path: &Path, bytes: &[u8], skip_bad_lines: bool) -> Result<Vec<SpillBatch>, Error> {
    let mut batches: Vec<SpillBatch> = Vec::new();
    // Readings the last header announced that have not come yet: once
    // they all came, later readings without a header form a batch of
    // their own, without an id.
    let mut announced = 0usize;
    let mut skipped = 0usize;
    // Every line ends with a newline; an empty file has no lines at all.
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let lines = body.split(|b| *b == b'\n').filter(|_| !bytes.is_empty());
    for (index, line) in lines.enumerate() {
        if let Ok(header) = serde_json::from_slice::<Header>(line) {
            announced = header.readings;
            batches.push(SpillBatch {
                id: Some(BatchId {
                    run: header.batch_run,
                    seq: header.batch_seq,
                }),
                readings: Vec::with_capacity(header.readings.min(1 << 20)),
            });
            continue;
        }
        let parsed = serde_json::from_slice::<Reading>(line)
            .map_err(|e| e.to_string())
            .and_then(|r| r.check().map(|()| r).map_err(|e| e.to_string()));
        match parsed {
            Ok(reading) => match batches.last_mut() {
                Some(batch) if announced > 0 || batch.id.is_none() => {
                    announced = announced.saturating_sub(1);
                    batch.readings.push(reading);
                }
                _ => batches.push(SpillBatch {
                    id: None,
                    readings: vec![reading],
                }),
            },
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
    Ok(batches)
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
        Reading::from(crate::reading::ReadingParts {
            sensor_id: crate::reading::SensorId::Int(sensor_id),
            temperature: Some(21.123456789012345),
            humidity: Some(0.1),
            ingested_at: 1764150000.123456,
            received_at: 1764150000.5,
            extra: None,
            seq: None,
            boot: None,
        })
    }

    fn readings(batches: &[SpillBatch]) -> Vec<Reading> {
        batches.iter().flat_map(|b| b.readings.clone()).collect()
    }

    /// What `write` writes, `parse` reads back bit-exactly, with batch ids;
    /// a second write keeps the first.
    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.spill.jsonl");
        let spill = Spill::claim(&path).unwrap();
        let id = BatchId {
            run: u64::MAX,
            seq: 7,
        };
        let first = SpillBatch {
            id: Some(id),
            readings: vec![reading(1), reading(2)],
        };
        spill.write(std::slice::from_ref(&first)).unwrap();
        let second = SpillBatch {
            id: None,
            readings: vec![reading(3)],
        };
        spill.write(std::slice::from_ref(&second)).unwrap();
        let bytes = fs::read(&path).unwrap();
        let back = parse(&path, &bytes, false).unwrap();
        assert_eq!(back[0], first);
        assert_eq!(readings(&back), vec![reading(1), reading(2), reading(3)]);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// Named sensors, a missing measurement and extra fields survive the
    /// spill file exactly, and a line of an earlier version still imports.
    #[test]
    fn named_readings_and_old_lines_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.spill.jsonl");
        let spill = Spill::claim(&path).unwrap();
        let (mut named, mut rejections) = (Vec::new(), Vec::new());
        crate::reading::parse_datagram(
            r#"{"sensor_id": "capteur-séjour", "humidity": 0.1, "pressure": 1013.25, "fw": "1.2"}
               {"sensor_id": "42", "temperature": 5e-324, "ok": false}"#
                .as_bytes(),
            1764150000.5,
            &crate::reading::Format::default(),
            &mut named,
            &mut rejections,
        );
        assert_eq!((named.len(), rejections.len()), (2, 0));
        let batch = SpillBatch {
            id: None,
            readings: named.clone(),
        };
        spill.write(std::slice::from_ref(&batch)).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(readings(&parse(&path, &bytes, false).unwrap()), named);
        let old = br#"{"sensor_id":7,"temperature":21.123456789012345,"humidity":0.1,"ingested_at":1764150000.123456,"received_at":1764150000.5}"#;
        assert_eq!(
            readings(&parse(&path, old, false).unwrap()),
            vec![reading(7)]
        );
    }

    /// A second claim on the same path is refused while the first lives.
    #[test]
    fn one_owner_per_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.spill.jsonl");
        let first = Spill::claim(&path).unwrap();
        let err = Spill::claim(&path).unwrap_err().to_string();
        assert!(err.contains("in use by another sensord"), "{err}");
        drop(first);
        Spill::claim(&path).unwrap();
    }

    /// A symlink at the spill path is neither written through nor read.
    #[test]
    fn symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, b"").unwrap();
        let path = dir.path().join("x.spill.jsonl");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let err = open_existing(&path).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        let lock = dir.path().join("y.spill.jsonl.lock");
        std::os::unix::fs::symlink(&target, &lock).unwrap();
        assert!(Spill::claim(&dir.path().join("y.spill.jsonl")).is_err());
        assert_eq!(fs::read(&target).unwrap(), b"");
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
        assert_eq!(
            readings(&parse(path, text.as_bytes(), true).unwrap()).len(),
            2
        );
        assert!(matches!(
            parse(path, b"\n", false),
            Err(Error::BadSpillLine { line: 1, .. })
        ));
    }

    /// A `received_at` out of range is a bad line.
    #[test]
    fn received_at_is_range_checked() {
        let mut bad = reading(1);
        bad.received_at = 1e300;
        let line = serde_json::to_string(&bad).unwrap();
        assert!(matches!(
            parse(Path::new("s"), format!("{line}\n").as_bytes(), false),
            Err(Error::BadSpillLine { line: 1, .. })
        ));
    }

    #[test]
    fn default_paths() {
        assert_eq!(
            default_path("sensors.db", "sensor_measurements"),
            PathBuf::from("sensors.db.spill.jsonl")
        );
        assert_eq!(
            default_path("postgres://ann:pw@db.example:6543/fleet", "t1"),
            PathBuf::from("sensord-db.example-6543-fleet-t1.spill.jsonl")
        );
        assert_eq!(
            default_path("postgres://ann@db/fleet?sslmode=verify-full", "t1"),
            PathBuf::from("sensord-db-5432-fleet-t1.spill.jsonl")
        );
    }
}
