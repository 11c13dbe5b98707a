//! `tasklane-soak`: the soak run with a history check (see `tasklane_testkit::soak`).
//!
//! Starts an in-process local server on embedded backends with seeded fault injection (5% of
//! store and queue calls fail, 10% of enqueued messages are delivered twice, 2% of worker calls
//! crash the worker), drives it with concurrent clients that submit, cancel and poll, records
//! every answer, drains, and checks the history against the store. Prints the figures and each
//! check as PASS or FAIL; exits with 1 when a check failed.
//!
//! ```text
//! cargo run --release -p tasklane-tools --bin tasklane-soak -- [--tasks 10000] [--clients 50]
//!     [--accounts 10] [--seed 1] [--workers 8] [--data-dir DIR]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tasklane_testkit::soak::{SoakOptions, run};

/// The soak run: a local server under seeded faults, concurrent clients, a history check.
///
/// Prints the figures and each check as PASS or FAIL; exits with 1 when a check failed.
#[derive(Debug, Parser)]
#[command(
    name = "tasklane-soak",
    after_help = "RUST_LOG turns on the server's logs (e.g. RUST_LOG=warn)."
)]
struct Args {
    /// Submits to get acknowledged
    #[arg(long, value_name = "N", default_value_t = SoakOptions::default().tasks, value_parser = count)]
    tasks: usize,
    /// Concurrent clients
    #[arg(long, value_name = "N", default_value_t = SoakOptions::default().clients, value_parser = count)]
    clients: usize,
    /// Accounts the clients spread over
    #[arg(long, value_name = "N", default_value_t = SoakOptions::default().accounts, value_parser = count)]
    accounts: usize,
    /// Seed of the fault injector and the clients' choices
    #[arg(long, value_name = "N", default_value_t = SoakOptions::default().seed, value_parser = seed)]
    seed: u64,
    /// In-process workers
    #[arg(long, value_name = "N", default_value_t = SoakOptions::default().workers, value_parser = count)]
    workers: usize,
    /// Where the server keeps its data (default: a fresh temporary directory, removed at the
    /// end; a given one is kept)
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

impl Args {
    fn options(&self) -> SoakOptions {
        SoakOptions {
            tasks: self.tasks,
            clients: self.clients,
            accounts: self.accounts,
            seed: self.seed,
            workers: self.workers,
            ..SoakOptions::default()
        }
    }
}

fn count(value: &str) -> Result<usize, String> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| "must be a whole number, 1 or more".to_string())
}

fn seed(value: &str) -> Result<u64, String> {
    value
        .parse()
        .map_err(|_| "must be a whole number".to_string())
}

/// A temporary data directory, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("could not remove {}: {e}", self.0.display());
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let opts = args.options();
    if std::env::var_os("RUST_LOG").is_some() {
        tasklane_local::init_tracing();
    }
    let (dir, _guard) = match args.data_dir {
        Some(d) => (d, None),
        None => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let d =
                std::env::temp_dir().join(format!("tasklane-soak-{}-{nanos}", std::process::id()));
            (d.clone(), Some(TempDir(d)))
        }
    };
    let o = &opts;
    println!(
        "tasklane-soak: {} tasks, {} clients, {} accounts, seed {}; data in {}",
        o.tasks,
        o.clients,
        o.accounts,
        o.seed,
        dir.display()
    );
    match run(opts, None, &dir).await {
        Ok(report) => {
            println!("{report}");
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("tasklane-soak: {e:#}");
            ExitCode::FAILURE
        }
    }
}
