//! The library's error type: one variant per cause, each message naming the
//! thing involved and why it failed.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Everything that can fail in sensord outside the per-datagram path (bad
/// datagrams are counted rejections, not errors).
#[derive(Debug)]
pub enum Error {
    /// The UDP socket could not be bound.
    Bind { addr: String, source: io::Error },
    /// An I/O operation other than bind failed: socket options, sending,
    /// writing output. `what` completes "cannot ...".
    Io {
        what: &'static str,
        source: io::Error,
    },
    /// The database could not be opened or prepared for use.
    Open { db: String, cause: String },
    /// A read or write on an open database failed.
    Database { what: String, cause: String },
    /// The spill file could not be read, written or removed.
    Spill { path: PathBuf, source: io::Error },
    /// The spill file holds a line that is not a valid reading.
    BadSpillLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// A command-line value is well-formed for clap but unusable.
    Config(String),
    /// The `--http` address could not be bound.
    Http { addr: String, cause: String },
    /// A thread could not be started.
    Thread {
        name: &'static str,
        source: io::Error,
    },
}

impl Error {
    /// Wraps a database failure, naming what was being done.
    pub fn database(what: impl Into<String>, cause: impl fmt::Display) -> Self {
        Error::Database {
            what: what.into(),
            cause: cause.to_string(),
        }
    }
}

/// `io::Error`'s Display ends in " (os error N)"; users want the cause only.
pub fn io_cause(err: &io::Error) -> String {
    let text = err.to_string();
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Bind { addr, source } if source.kind() == io::ErrorKind::AddrInUse => write!(
                f,
                "cannot bind {addr}: {}; another process has this port (`ss -ulpn` shows \
                 which), so stop it or choose another with --bind",
                io_cause(source)
            ),
            Error::Bind { addr, source } => write!(f, "cannot bind {addr}: {}", io_cause(source)),
            Error::Io { what, source } => write!(f, "cannot {what}: {}", io_cause(source)),
            Error::Open { db, cause } => write!(f, "cannot open database {db}: {cause}"),
            Error::Database { what, cause } => write!(f, "{what}: {cause}"),
            Error::Spill { path, source } => {
                write!(f, "spill file {}: {}", path.display(), io_cause(source))
            }
            Error::BadSpillLine { path, line, reason } => write!(
                f,
                "spill file {} line {line} is not a valid reading ({reason}); fix or remove the \
                 line, or start with --skip-bad-spill-lines",
                path.display()
            ),
            Error::Http { addr, cause } => {
                // tiny_http hands back io::Error's text, " (os error N)" and all.
                let cause = cause
                    .rfind(" (os error ")
                    .map_or(&cause[..], |at| &cause[..at]);
                write!(f, "cannot serve HTTP on {addr} (--http): {cause}")
            }
            Error::Config(message) => f.write_str(message),
            Error::Thread { name, source } => {
                write!(f, "cannot start thread {name}: {}", io_cause(source))
            }
        }
    }
}

impl std::error::Error for Error {}
