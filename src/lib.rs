//! sensord collects JSON sensor readings sent over UDP and stores every one
//! of them, in SQLite by default. Stopping it (SIGINT, SIGTERM) flushes
//! everything still in flight first.
//!
//! # Layout
//! - `reading`: the `Reading` type and datagram parsing. No I/O.
//! - `receiver`: the UDP receive loop (thread `receiver`). Sockets and the
//!   channel, never the database. `datagrams` reads many datagrams per
//!   system call for it.
//! - `persister`: the batching thread (thread `persister`); readings the
//!   database refuses for good go to the dead-letter file. The channel and
//!   a `Store`, never sockets.
//! - `shutdown`: the whole stop path: the trigger every thread watches,
//!   and in `shutdown::guard` the `ShutdownGuard`, whose `Drop` is the
//!   final flush, with each phase bounded.
//! - `delivery`: exactly-once for sequenced readings: a duplicate window
//!   and loss counters per sensor and boot. Pure logic; the persister
//!   loads and commits its state through the store.
//! - `acks`: the `Chunk` the receiver hands the persister, with the acks
//!   its datagrams are owed; acks are sent after their readings' commit,
//!   within what each source has sent (no amplification).
//! - `store`: the `Store` trait and its SQLite and PostgreSQL
//!   implementations. SQL only.
//! - `spill`: the spill file written when the final flush cannot commit
//!   (atomic, locked to one instance), its replay at start, and the
//!   dead-letter file.
//! - `server`: `sensord serve`: start-up (open the store, replay a spill),
//!   then wiring the above to a socket and a store.
//! - `http`: `--http`, the `/metrics` and `/health` pages and the
//!   dashboard (thread `http`): the page and its assets (`http::assets`,
//!   uPlot vendored), its JSON API (`http::api`, reading the database on a
//!   thread and store connection of its own, `http-api`), the counters'
//!   ring buffer behind the ingest-rate chart (`http::history`) and the
//!   reduction of long windows to buckets (`http::downsample`). It reads
//!   counters and a store, and never writes.
//! - `retention`: `--retain`, deleting old readings through a store
//!   connection of its own (thread `retention`).
//! - `client`, `stats`: `sensord send` and `sensord stats`.
//! - `ledger`, `error`: counters, the error type.
//!
//! Dependencies flow one way: main → server/client/stats →
//! http/receiver/persister/retention/shutdown → acks/store/spill/delivery/
//! reading/ledger → error.

pub mod acks;
pub mod client;
pub mod datagrams;
pub mod delivery;
pub mod error;
pub mod http;
pub mod ledger;
pub mod persister;
pub mod reading;
pub mod receiver;
pub mod retention;
pub mod server;
pub mod shutdown;
pub mod spill;
pub mod stats;
pub mod store;

pub use error::Error;
pub use reading::Reading;
pub use shutdown::Shutdown;
