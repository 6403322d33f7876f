//! The `sensord` command: parses arguments, sets up logging and signals,
//! and hands over to the library. Errors become one line and exit code 1.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use log::{error, info, warn};

use sensord::client::{self, SendConfig, SensorIds};
use sensord::persister::BatchConfig;
use sensord::reading::{ExtraFields, Format, SensorId, TimestampUnit};
use sensord::receiver::{self, Cidr};
use sensord::server::{self, Config, Ops};
use sensord::spill::{self, Spill};
use sensord::{Error, Shutdown, http, stats, store};

/// The version and the commit it was built from.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("SENSORD_BUILD"), ")");

/// Collects JSON sensor readings over UDP and stores every one of them.
#[derive(Parser)]
#[command(version = VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// A combination of flags clap cannot check alone.
    fn misuse(&self) -> Option<String> {
        let (db, table) = match &self.command {
            Command::Serve(args) => (&args.db, &args.table),
            Command::Stats(args) => (&args.db, &args.table),
            Command::Send(_) | Command::Completions { .. } | Command::Man => return None,
        };
        (!store::is_url(db) && table != store::DEFAULT_TABLE).then(|| {
            format!(
                "--table applies to PostgreSQL only; a SQLite file always uses {}",
                store::DEFAULT_TABLE
            )
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Send random readings, like a sensor would.
    Send(SendArgs),
    /// Print totals and per-sensor aggregates of a database.
    Stats(StatsArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `sensord man > sensord.1`.
    Man,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to receive datagrams on.
    #[arg(long, default_value = "0.0.0.0:12345", value_name = "IP:PORT", value_parser = socket_addr)]
    bind: SocketAddr,
    /// SQLite file (created if missing), or a PostgreSQL URL
    /// (postgres://user@host:port/dbname).
    #[arg(long, default_value = "sensors.db")]
    db: String,
    /// PostgreSQL table to write (created if missing).
    #[arg(long, default_value = store::DEFAULT_TABLE, value_parser = store::table_name)]
    table: String,
    /// The most readings in one transaction.
    #[arg(long, default_value_t = 250_000, value_parser = at_least_one)]
    batch_size: u64,
    /// How long a batch gathers readings before it commits, from when the
    /// persister takes its first (at once when idle, after the commit in
    /// progress when busy; half a batch queued during a commit goes at once).
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    flush_interval: Duration,
    /// The most readings held in memory between receiver and persister.
    #[arg(long, default_value_t = 250_000, value_parser = at_least_one)]
    queue_capacity: u64,
    /// Socket receive buffer (SO_RCVBUF) to ask for, in bytes. Large, so
    /// bursts wait in the kernel instead of being dropped; it costs memory
    /// only while datagrams wait.
    #[arg(long, default_value_t = 134_217_728)]
    recv_buffer: usize,
    /// How often to log counters; 0 turns it off.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    stats_interval: Duration,
    /// How long a write waits for another writer's lock.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    busy_timeout: Duration,
    /// Where to write readings the final flush cannot commit
    /// [default: <db>.spill.jsonl].
    #[arg(long)]
    spill: Option<PathBuf>,
    /// Import a spill file even if some lines are corrupt (they are skipped).
    #[arg(long)]
    skip_bad_spill_lines: bool,
    /// Accept datagrams only from this network (repeatable), e.g. 10.0.0.0/8.
    #[arg(long, value_name = "CIDR")]
    allow: Vec<Cidr>,
    /// The unit of numeric `ingested_at` values (RFC 3339 strings are
    /// always understood).
    #[arg(long, value_enum, default_value_t = TimestampUnit::S)]
    timestamp_unit: TimestampUnit,
    /// Store a reading's other fields in its `extra` column, or ignore them.
    #[arg(long, value_enum, default_value_t = ExtraFields::Keep)]
    extra_fields: ExtraFields,
    /// Acknowledge sequenced readings once committed (to the port they came
    /// from), so senders can retransmit what was lost.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    acks: Switch,
    /// PostgreSQL password file (first line), used when neither the URL nor
    /// PGPASSWORD gives a password.
    #[arg(long, value_name = "PATH")]
    db_password_file: Option<PathBuf>,
    /// Serve Prometheus metrics at /metrics and a health check at /health
    /// on this address, e.g. 127.0.0.1:9108 [default: off].
    #[arg(long, value_name = "IP:PORT", value_parser = socket_addr)]
    http: Option<SocketAddr>,
    /// Delete readings whose ingested_at is older than this, e.g. 30d
    /// [default: keep everything].
    #[arg(long, value_name = "DURATION", value_parser = parse_retention)]
    retain: Option<Duration>,
}

#[derive(clap::Args)]
struct SendArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:12345")]
    #[arg(value_name = "HOST:PORT", value_parser = socket_addr)]
    to: SocketAddr,
    /// Pause between readings; 0 sends as fast as possible.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    interval: Duration,
    /// Stop after this many readings [default: until interrupted].
    #[arg(long)]
    count: Option<u64>,
    /// Range of sensor ids to draw from.
    #[arg(long, default_value = "10-1000", value_name = "LO-HI")]
    sensor_ids: SensorIds,
    /// Seed for reproducible readings.
    #[arg(long)]
    seed: Option<u64>,
    /// Keep every reading until the server acknowledges it, retransmitting
    /// it with back-off (0.5 s doubling to 4 s, each times a random 1 to
    /// 1.5); exit 0 only if every reading was acknowledged.
    #[arg(long)]
    reliable: bool,
    /// With --reliable, the most readings unacknowledged at once; new
    /// readings wait while it is reached. At most 16384, the server's
    /// duplicate window.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=16_384))]
    max_unacked: u64,
    /// With --reliable, how long a reading may go unacknowledged before it
    /// is given up.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    give_up_after: Duration,
}

#[derive(clap::Args)]
struct StatsArgs {
    /// SQLite file or PostgreSQL URL to read.
    #[arg(long, default_value = "sensors.db")]
    db: String,
    /// PostgreSQL table to read.
    #[arg(long, default_value = store::DEFAULT_TABLE, value_parser = store::table_name)]
    table: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Show only the N busiest sensors (most readings).
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Only this sensor's readings: its integer id or its name.
    #[arg(long, value_name = "ID")]
    sensor: Option<String>,
    /// Only readings taken in this last stretch of time, e.g. 1h or 7d.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    since: Option<Duration>,
    /// PostgreSQL password file (first line), used when neither the URL nor
    /// PGPASSWORD gives a password.
    #[arg(long, value_name = "PATH")]
    db_password_file: Option<PathBuf>,
}

/// `HOST:PORT` or `IP:PORT`, resolved now (the first address a name
/// resolves to).
fn socket_addr(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let form = "an address like 127.0.0.1:12345, [::1]:12345 or localhost:12345";
    if !text.contains(':') {
        return Err(format!(
            "`{text}` is not an address with a port; expected {form}"
        ));
    }
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("`{text}` resolves to no address")),
        Err(e) => Err(format!("`{text}` is not {form} ({e})")),
    }
}

/// A count of one or more.
fn at_least_one(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{text}` is not a whole number")),
    }
}

/// The longest duration any flag takes: far beyond any use, and small
/// enough that adding it to a clock reading can never overflow.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration > MAX_DURATION {
        return Err("must be at most 100 years".into());
    }
    Ok(duration)
}

/// A retention period: a duration of at least one second.
fn parse_retention(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(duration)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    // Test builds read injected failures from the FAILPOINTS variable.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    if let Some(message) = cli.misuse() {
        Cli::command()
            .error(clap::error::ErrorKind::ArgumentConflict, message)
            .exit();
    }
    let result = match cli.command {
        Command::Serve(args) => register_signals().and_then(|shutdown| serve(args, shutdown)),
        Command::Send(args) => register_signals().and_then(|shutdown| send(args, &shutdown)),
        // Nothing to flush: the default action of SIGINT ends it at once.
        Command::Stats(args) => show_stats(&args),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "sensord",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::Io {
                    what: "write the man page",
                    source: e,
                }),
                _ => Ok(ExitCode::SUCCESS),
            }
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    })
}

fn serve(args: ServeArgs, shutdown: Shutdown) -> Result<ExitCode, Error> {
    let spill_path = args
        .spill
        .unwrap_or_else(|| spill::default_path(&args.db, &args.table));
    // Checked, claimed and bound before the database is touched: a missing
    // folder, a second instance or a port in use fails without creating
    // anything.
    store::check_folder(&args.db)?;
    let spill = Spill::claim(&spill_path)?;
    let socket = receiver::bind(args.bind, args.recv_buffer)?;
    let http = args.http.map(http::Listener::bind).transpose()?;
    let options = store::Options {
        busy_timeout: args.busy_timeout,
        table: args.table,
        stop: Some(shutdown.clone()),
        password_file: args.db_password_file,
    };
    let (store, replayed) = server::start_up(
        &args.db,
        &options,
        &spill,
        args.skip_bad_spill_lines,
        &shutdown,
    )?;
    // Its own connection, so deleting never waits for the persister's.
    let retention = match args.retain {
        Some(retain) => Some((retain, store::open(&args.db, &options)?)),
        None => None,
    };
    // The dashboard's reads, on a connection of their own (SQLite in WAL
    // mode reads beside the writer).
    let dashboard = match http {
        Some(_) => Some(store::open_existing(&args.db, &options)?),
        None => None,
    };
    let ops = Ops {
        http,
        dashboard,
        retention,
        spill_files_replayed: replayed.files,
    };
    let config = Config {
        batch: BatchConfig {
            batch_size: usize::try_from(args.batch_size).unwrap_or(usize::MAX),
            flush_interval: args.flush_interval,
        },
        queue_capacity: usize::try_from(args.queue_capacity).unwrap_or(usize::MAX),
        stats_interval: args.stats_interval,
        allow: args.allow,
        busy_timeout: args.busy_timeout,
        format: Format {
            timestamp_unit: args.timestamp_unit,
            extra_fields: args.extra_fields,
        },
        acks: args.acks == Switch::On,
    };
    let outcome = server::run(socket, store, spill, config, ops, shutdown)?;
    info!("{}", outcome.shutdown_line());
    if outcome.counts.dead_letter > 0 {
        warn!(
            "{} readings refused by the database are in {}",
            outcome.counts.dead_letter,
            spill::dead_letter_path(&spill_path).display()
        );
    }
    if outcome.clean() {
        Ok(ExitCode::SUCCESS)
    } else {
        error!("exiting with status 1: not everything received is in the database");
        Ok(ExitCode::FAILURE)
    }
}

fn send(args: SendArgs, shutdown: &Shutdown) -> Result<ExitCode, Error> {
    let config = SendConfig {
        to: args.to,
        interval: args.interval,
        count: args.count,
        sensor_ids: args.sensor_ids,
        seed: args.seed,
        reliable: args.reliable,
        // At most 16384: fits.
        max_unacked: args.max_unacked as usize,
        give_up: args.give_up_after,
    };
    let sent = client::run(&config, shutdown)?;
    if config.reliable && !sent.all_acked() {
        error!(
            "{} of {} readings were not acknowledged",
            sent.sent - sent.acked,
            sent.sent
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn show_stats(args: &StatsArgs) -> Result<ExitCode, Error> {
    let options = store::Options {
        busy_timeout: Duration::from_secs(5),
        table: args.table.clone(),
        stop: None,
        password_file: args.db_password_file.clone(),
    };
    let now = sensord::reading::unix_now();
    let filter = store::Filter {
        sensor_id: args.sensor.as_deref().map(SensorId::from_text),
        since: args.since.map(|d| now - d.as_secs_f64()),
    };
    let summary = store::open_existing(&args.db, &options)?.summary(&filter)?;
    let view = stats::View {
        limit: args.limit,
        now,
    };
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        stats::write_json(&summary, &view, &mut out)
    } else {
        stats::write_table(&summary, &view, &mut out)
    };
    // A closed pipe (`| head`) is not an error worth reporting.
    match written.and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::Io {
            what: "write to stdout",
            source: e,
        }),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// Logs to stderr as `TIMESTAMP | LEVEL | THREAD | message`, `info` unless
/// RUST_LOG says otherwise. Panics are logged the same way.
fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            let thread = std::thread::current();
            writeln!(
                buf,
                "{} | {:<5} | {} | {}",
                buf.timestamp_millis(),
                record.level(),
                thread.name().unwrap_or("-"),
                record.args()
            )
        })
        .init();
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        error!("thread {} panicked: {info}", thread.name().unwrap_or("-"));
    }));
}

/// Counts SIGINT, SIGTERM and SIGHUP (a closed terminal) into a
/// `Shutdown`: the first asks for a clean stop, a second to hurry.
/// Registered before any thread starts, so every thread inherits the
/// handlers.
fn register_signals() -> Result<Shutdown, Error> {
    let register = || -> std::io::Result<Shutdown> {
        let shutdown = Shutdown::new()?;
        for signal in [
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ] {
            // SAFETY: the action only does an atomic add and a write(2),
            // both async-signal-safe.
            unsafe {
                signal_hook::low_level::register(signal, shutdown.signal_action())?;
            }
        }
        Ok(shutdown)
    };
    register().map_err(|source| Error::Io {
        what: "register signal handlers",
        source,
    })
}

/// A setting that is on or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}
