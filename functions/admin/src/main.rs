//! `tasklane-admin`: creates accounts, grants credits, shows balances and rotates API keys, on
//! the local server's SQLite database (`--local`) or on the DynamoDB table (`--dynamodb`).
//!
//! API keys are printed once, when created or rotated; the store keeps only their SHA-256.
//! Exit codes: 0 done, 2 usage error (nothing was touched), 1 backend error or unknown account.
//!
//! This file parses the command line ([`cli`]), picks the backend ([`backend`]), runs the
//! command ([`commands`]) and prints its [`report`] or [`failure`].

mod backend;
mod cli;
mod commands;
mod failure;
mod report;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use crate::backend::Backend;
use crate::cli::Cli;
use crate::failure::Failure;
use crate::report::Report;

fn main() -> ExitCode {
    // Known before parsing, so that even a usage error is reported as JSON.
    let as_json = std::env::args_os().skip(1).any(|a| a == "--json");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version: printed on stdout, exit status 0.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return Failure::Usage(e).report(as_json),
    };
    let backend = match Backend::choose(&cli.backend) {
        Ok(b) => b,
        Err(e) => return Failure::Usage(e).report(cli.json),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return Failure::Backend(format!("cannot start the async runtime: {e}"))
                .report(cli.json);
        }
    };
    let report = match runtime.block_on(run(&cli, &backend)) {
        Ok(r) => r,
        Err(f) => return f.report(cli.json),
    };
    let mut out = std::io::stdout().lock();
    if let Err(e) = out
        .write_all(report.render(cli.json).as_bytes())
        .and_then(|()| out.flush())
    {
        return Failure::Backend(format!(
            "the change was made, but writing the result failed: {e}"
        ))
        .report(cli.json);
    }
    if let (Some(note), false) = (report.note, cli.json) {
        let _ = writeln!(std::io::stderr(), "{note}");
    }
    ExitCode::SUCCESS
}

/// Opens the backend and runs the command on it.
async fn run(cli: &Cli, backend: &Backend) -> Result<Report, Failure> {
    let opened = backend::open(backend, cli.command.creates_account()).await?;
    commands::run(&cli.command, &opened).await
}
