//! `tasklane-cold-start`: how long each Lambda function of tasklane takes to start (its init:
//! from the process's start until it asks the Runtime API for its first event), and how much
//! memory it holds then, beside `tasklane-hello-lambda`, the smallest `lambda_runtime` function
//! built with the same profile. Not a test: it prints figures.
//!
//! ```text
//! cargo build --release -p tasklane-aws -p tasklane-tools --bins
//! cargo run --release -p tasklane-tools --bin tasklane-cold-start -- [--runs 30] [--dir target/release]
//! ```
//!
//! Each binary is started `--runs` times (after one start that is not counted, which warms the
//! page cache as Lambda's own cache of a function's code would be) under a Runtime API emulator
//! on loopback (`tasklane_testkit::runtime_api`), with the variables template.yaml gives it and
//! AWS pointed at `127.0.0.1:9` (init makes no AWS call; nothing is sent there). Lambda's own
//! part of a cold start (placing the code, starting the sandbox) is not in these figures: it is
//! the same for the baseline.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Parser;
use tasklane_testkit::runtime_api::RuntimeApi;
use tasklane_tools::{cells, latency};

/// Cold start of each Lambda function against a baseline.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Starts counted per binary.
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Where the release binaries are (default: next to this one).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// The baseline and the functions, as template.yaml names their binaries, with their memory.
const BINARIES: [(&str, u32); 12] = [
    ("tasklane-hello-lambda", 256),
    ("submit", 256),
    ("status", 256),
    ("cancel", 256),
    ("sync-wait", 256),
    ("account", 256),
    ("processor", 256),
    ("deliver", 256),
    ("dead-letter", 256),
    ("sweeper", 256),
    ("upstream", 512),
    ("files", 256),
];

/// Where AWS is said to be: loopback's discard port (nothing is sent at init).
const NOWHERE: &str = "http://127.0.0.1:9";

/// One start: time to the first `next` request and the peak resident memory then.
struct Start {
    init: Duration,
    peak_kb: u64,
}

fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn start_once(path: &Path, name: &str, memory: u32) -> Result<Start, String> {
    let function_name = format!("tasklane-{name}-COLDSTART");
    let runtime = RuntimeApi::start(&function_name).await;
    let mut cmd = runtime.command(path, memory);
    cmd.env("AWS_ENDPOINT_URL", NOWHERE)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "cold-start")
        .env("AWS_SECRET_ACCESS_KEY", "cold-start")
        .env("TASKLANE_TABLE", "tasklane-cold-start")
        .env(
            "TASKLANE_QUEUE_URL",
            format!("{NOWHERE}/000000000000/tasklane-cold-start"),
        )
        .env("TASKLANE_BUCKET", "tasklane-cold-start")
        .env("TASKLANE_PUBLIC_URL", NOWHERE)
        .env(
            "TASKLANE_RESULT_URL_SIGNING_KEY",
            "cold-start-signing-key-0123456789abcdef",
        )
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let spawned = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let pid = child.id().unwrap_or(0);
    let deadline = spawned + Duration::from_secs(10);
    let at = loop {
        if let Some(at) = runtime.first_next_at() {
            break at;
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{name} exited during init: {status}"));
        }
        if Instant::now() > deadline {
            return Err(format!("{name} did not ask for an event within 10 s"));
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    };
    let peak_kb = peak_rss_kb(pid);
    let _ = child.start_kill();
    let _ = child.wait().await;
    Ok(Start {
        init: at.saturating_duration_since(spawned),
        peak_kb,
    })
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let dir = match args.dir {
        Some(d) => d,
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .parent()
            .map(Path::to_path_buf)
            .ok_or("no directory for this binary")?,
    };
    println!(
        "# Cold start: process start to the first Runtime API `next` ({} starts each)",
        args.runs
    );
    println!();
    println!("| binary | size | init p50 ms | p99 ms | max ms | mean ms | peak RSS at init |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, memory) in BINARIES {
        let path = dir.join(name);
        let size = std::fs::metadata(&path)
            .map_err(|e| format!("{}: {e} (build with --release first)", path.display()))?
            .len();
        start_once(&path, name, memory).await?;
        let mut inits = Vec::with_capacity(args.runs);
        let mut peaks = Vec::with_capacity(args.runs);
        for _ in 0..args.runs {
            let s = start_once(&path, name, memory).await?;
            inits.push(s.init);
            peaks.push(s.peak_kb);
        }
        peaks.sort_unstable();
        let peak = peaks.get(peaks.len() / 2).copied().unwrap_or(0);
        let [p50, p99, max, mean] = cells(latency(&mut inits));
        println!(
            "| {name} | {:.1} MB | {p50} | {p99} | {max} | {mean} | {:.1} MB |",
            size as f64 / 1e6,
            peak as f64 / 1024.0
        );
    }
    Ok(())
}
