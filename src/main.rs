//! The `sensord` command: parses arguments, sets up logging and signals,
//! and hands over to the library. Errors become one line and exit code 1.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use log::{error, info};

use sensord::client::{self, SendConfig, SensorIds};
use sensord::persister::BatchConfig;
use sensord::receiver::{self, Cidr};
use sensord::server::{self, Config};
use sensord::{Error, Shutdown, spill, stats, store};

/// Collects JSON sensor readings over UDP and stores every one of them.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Send random readings, like a sensor would.
    Send(SendArgs),
    /// Print totals and per-sensor aggregates of a database.
    Stats(StatsArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to receive datagrams on.
    #[arg(long, default_value = "0.0.0.0:12345")]
    bind: String,
    /// SQLite file (created if missing), or a PostgreSQL URL
    /// (postgres://user@host:port/dbname).
    #[arg(long, default_value = "sensors.db")]
    db: String,
    /// PostgreSQL table to write (created if missing).
    #[arg(long, default_value = store::DEFAULT_TABLE, value_parser = store::table_name)]
    table: String,
    /// The most readings in one transaction.
    #[arg(long, default_value_t = 250_000, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// How long a batch gathers readings before it commits, from when the
    /// persister takes its first (at once when idle, after the commit in
    /// progress when busy; half a batch queued during a commit goes at once).
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    flush_interval: Duration,
    /// The most readings held in memory between receiver and persister.
    #[arg(long, default_value_t = 250_000, value_parser = clap::value_parser!(u64).range(1..))]
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
    /// PostgreSQL password file (first line), used when neither the URL nor
    /// PGPASSWORD gives a password.
    #[arg(long, value_name = "PATH")]
    db_password_file: Option<PathBuf>,
}

#[derive(clap::Args)]
struct SendArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:12345")]
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
    /// PostgreSQL password file (first line), used when neither the URL nor
    /// PGPASSWORD gives a password.
    #[arg(long, value_name = "PATH")]
    db_password_file: Option<PathBuf>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    // Test builds read injected failures from the FAILPOINTS variable.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let shutdown = match register_signals() {
        Ok(shutdown) => shutdown,
        Err(e) => {
            eprintln!("error: cannot register signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => serve(args, shutdown),
        Command::Send(args) => send(args, &shutdown),
        Command::Stats(args) => show_stats(&args),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    })
}

fn serve(args: ServeArgs, shutdown: Shutdown) -> Result<ExitCode, Error> {
    let spill_path = args.spill.unwrap_or_else(|| spill::default_path(&args.db));
    let mut store = store::open(
        &args.db,
        &store::Options {
            busy_timeout: args.busy_timeout,
            table: args.table,
            stop: Some(shutdown.clone()),
            password_file: args.db_password_file,
        },
    )?;
    spill::replay(&spill_path, store.as_mut(), args.skip_bad_spill_lines)?;
    let socket = receiver::bind(&args.bind, args.recv_buffer)?;
    let config = Config {
        batch: BatchConfig {
            batch_size: usize::try_from(args.batch_size).unwrap_or(usize::MAX),
            flush_interval: args.flush_interval,
        },
        queue_capacity: usize::try_from(args.queue_capacity).unwrap_or(usize::MAX),
        stats_interval: args.stats_interval,
        allow: args.allow,
        spill_path,
    };
    let outcome = server::run(socket, store, config, shutdown)?;
    info!("{}", outcome.shutdown_line());
    if outcome.flush.clean() {
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
    };
    client::run(&config, shutdown)?;
    Ok(ExitCode::SUCCESS)
}

fn show_stats(args: &StatsArgs) -> Result<ExitCode, Error> {
    let options = store::Options {
        busy_timeout: Duration::from_secs(5),
        table: args.table.clone(),
        stop: None,
        password_file: args.db_password_file.clone(),
    };
    let summary = store::open_existing(&args.db, &options)?.summary()?;
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        stats::write_json(&summary, &mut out)
    } else {
        stats::write_table(&summary, &mut out)
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

/// Counts SIGINT and SIGTERM into a `Shutdown`: the first asks for a clean
/// stop, a second to abandon the final flush. Registered before any thread
/// starts, so every thread inherits the handlers.
fn register_signals() -> std::io::Result<Shutdown> {
    let shutdown = Shutdown::new()?;
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // SAFETY: the action only does an atomic add and a write(2), both
        // async-signal-safe.
        unsafe {
            signal_hook::low_level::register(signal, shutdown.signal_action())?;
        }
    }
    Ok(shutdown)
}
