//! `tasklane-soak`: the soak run with a history check (see `tasklane_local::soak`).
//!
//! Starts an in-process local server on embedded backends with seeded fault injection (5% of
//! store and queue calls fail, 10% of enqueued messages are delivered twice, 2% of worker calls
//! crash the worker), drives it with concurrent clients that submit, cancel and poll, records
//! every answer, drains, and checks the history against the store. Prints the figures and each
//! check as PASS or FAIL; exits with 1 when a check failed.
//!
//! ```text
//! cargo run --release -p tasklane-local --bin tasklane-soak -- [--tasks 10000] [--clients 50]
//!     [--accounts 10] [--seed 1] [--data-dir DIR]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use tasklane_local::soak::{SoakOptions, run};

const USAGE: &str = "\
usage: tasklane-soak [options]

  --tasks N        submits to get acknowledged (default 10000)
  --clients N      concurrent clients (default 50)
  --accounts N     accounts the clients spread over (default 10)
  --seed N         seed of the fault injector and the clients' choices (default 1)
  --workers N      in-process workers (default 8)
  --data-dir DIR   where the server keeps its data (default: a fresh temporary directory,
                   removed at the end; a given one is kept)
  -h, --help       this text

RUST_LOG turns on the server's logs (e.g. RUST_LOG=warn).";

struct Args {
    opts: SoakOptions,
    data_dir: Option<PathBuf>,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        opts: SoakOptions::default(),
        data_dir: None,
    };
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let value = match inline {
            Some(v) => v,
            None => args.next().ok_or_else(|| format!("{flag} needs a value"))?,
        };
        let count = || {
            value
                .parse::<usize>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("{flag} {value:?}: must be a whole number, 1 or more"))
        };
        match flag.as_str() {
            "--tasks" => a.opts.tasks = count()?,
            "--clients" => a.opts.clients = count()?,
            "--accounts" => a.opts.accounts = count()?,
            "--workers" => a.opts.workers = count()?,
            "--seed" => {
                a.opts.seed = value
                    .parse()
                    .map_err(|_| format!("{flag} {value:?}: must be a whole number"))?
            }
            "--data-dir" => a.data_dir = Some(PathBuf::from(value)),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(a)
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
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(msg) if msg.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("{msg}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
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
    let o = &args.opts;
    println!(
        "tasklane-soak: {} tasks, {} clients, {} accounts, seed {}; data in {}",
        o.tasks,
        o.clients,
        o.accounts,
        o.seed,
        dir.display()
    );
    match run(args.opts, None, &dir).await {
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
