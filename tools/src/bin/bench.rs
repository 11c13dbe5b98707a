//! `tasklane-bench`: throughput and latency figures for the tasklane HTTP API (not a test).
//!
//! By default it starts an in-process local server (127.0.0.1:0, fresh temporary data
//! directory, removed at the end); with `--url` and `--key` it drives a running server.
//!
//! ```text
//! cargo run --release -p tasklane-tools --bin tasklane-bench -- [--url http://HOST/v1 --key KEY]
//!     [--concurrency 16] [--seconds 10] [--requests 2000]
//! ```
//!
//! Three phases, each printed as it finishes and summarized in a table at the end:
//!
//! 1. complete `echo` lifecycles per second: N clients loop `POST /v1/tasks/sync` and count the
//!    `200` answers whose task is `completed`;
//! 2. status reads per second: N clients loop `GET /v1/tasks/{id}` over tasks of phase 1;
//! 3. submit latency: `--requests` `POST /v1/tasks` spread over N clients (p50, p99, max, mean)
//!    and the submits per second that achieved.
//!
//! Every other answer (and every transport failure) is counted as an error by kind, never a panic.
//! It prints figures; it asserts nothing. `RUST_LOG` turns on the in-process server's logs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tasklane_tools::{Latency, latency};

use clap::Parser;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use tasklane_local::{LocalConfig, Running};
use tasklane_testkit::soak::transport_kind;

/// Credits the in-process development account starts with: plenty for any run.
const BENCH_CREDITS: u64 = 10_000_000;
/// Task ids kept from phase 1 for the status-read phase.
const MAX_READ_IDS: usize = 10_000;
/// Per-request timeout (above the sync endpoint's 25 s default wait).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Throughput and latency figures for the tasklane HTTP API (not a test).
///
/// Three phases: complete `echo` lifecycles per second, status reads per second, and submit
/// latency percentiles. `RUST_LOG` turns on the in-process server's logs.
#[derive(Debug, Clone, Parser)]
#[command(name = "tasklane-bench")]
struct Options {
    /// Drive a running server, e.g. http://127.0.0.1:3000/v1 (needs --key); default: start an
    /// in-process local server on 127.0.0.1:0 with a temp data dir
    #[arg(long, value_name = "URL", requires = "key", value_parser = url)]
    url: Option<String>,
    /// API key for --url
    #[arg(long, value_name = "KEY", requires = "url")]
    key: Option<String>,
    /// Concurrent clients
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = at_least_one)]
    concurrency: usize,
    /// Length of each timed phase in seconds
    #[arg(long, value_name = "S", default_value_t = 10.0, value_parser = seconds)]
    seconds: f64,
    /// Submits in the latency phase
    #[arg(long, value_name = "N", default_value_t = 2000, value_parser = at_least_one)]
    requests: usize,
}

fn url(value: &str) -> Result<String, String> {
    Ok(value.trim_end_matches('/').to_string())
}

fn at_least_one(value: &str) -> Result<usize, String> {
    value
        .parse()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| "must be a whole number, 1 or more".to_string())
}

fn seconds(value: &str) -> Result<f64, String> {
    value
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
        .ok_or_else(|| "must be a number of seconds above 0".to_string())
}

/// Errors by kind (`HTTP 402 insufficient_quota`, `transport: timeout`, ...).
#[derive(Debug, Default, Clone)]
struct Errors(BTreeMap<String, u64>);

impl Errors {
    fn add(&mut self, kind: String) {
        *self.0.entry(kind).or_default() += 1;
    }
    fn merge(&mut self, other: Errors) {
        for (k, n) in other.0 {
            *self.0.entry(k).or_default() += n;
        }
    }
    fn total(&self) -> u64 {
        self.0.values().sum()
    }
    fn describe(&self) -> String {
        if self.0.is_empty() {
            return "none".into();
        }
        let parts: Vec<String> = self.0.iter().map(|(k, n)| format!("{n} × {k}")).collect();
        parts.join(", ")
    }
}

/// `HTTP 409 not_cancellable` from an error answer (the code when the body has one).
fn http_error(status: StatusCode, body: &[u8]) -> String {
    let code = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string));
    match code {
        Some(c) => format!("HTTP {} {c}", status.as_u16()),
        None => format!("HTTP {}", status.as_u16()),
    }
}

/// One request's outcome: the answer (status and body) or a transport error kind.
async fn send(req: reqwest::RequestBuilder) -> Result<(StatusCode, bytes::Bytes), String> {
    let resp = req.send().await.map_err(|e| transport_kind(&e))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| transport_kind(&e))?;
    Ok((status, body))
}

/// What one phase measured.
#[derive(Debug, Clone)]
struct PhaseResult {
    name: &'static str,
    ok: u64,
    elapsed: Duration,
    errors: Errors,
    latency: Option<Latency>,
}

impl PhaseResult {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn print(&self) {
        print!(
            "{}: {:.0}/s ({} ok in {:.2} s; errors: {})",
            self.name,
            self.rate(),
            self.ok,
            self.elapsed.as_secs_f64(),
            self.errors.describe()
        );
        match self.latency {
            Some(l) => println!(
                "; latency ms p50 {:.2}, p99 {:.2}, max {:.2}, mean {:.2}",
                l.p50, l.p99, l.max, l.mean
            ),
            None => println!(),
        }
    }
}

/// What one client of a phase brings back.
#[derive(Default)]
struct ClientResult {
    ok: u64,
    errors: Errors,
    latencies: Vec<Duration>,
    ids: Vec<String>,
}

impl ClientResult {
    /// Sends `req`: counted ok, with its latency, when it answers `expected`; otherwise
    /// counted as the error it is.
    async fn expect(&mut self, expected: StatusCode, req: reqwest::RequestBuilder) {
        let start = Instant::now();
        match send(req).await {
            Ok((status, _)) if status == expected => {
                self.ok += 1;
                self.latencies.push(start.elapsed());
            }
            Ok((status, bytes)) => self.errors.add(http_error(status, &bytes)),
            Err(kind) => self.errors.add(kind),
        }
    }
}

struct Target {
    client: Client,
    base: String,
    key: String,
}

impl Target {
    fn post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .json(body)
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }
}

fn echo_body() -> Value {
    json!({"model": "echo", "prompt": "tasklane-bench"})
}

/// Runs `n` clients of `one` concurrently and gathers their results.
async fn run_clients<F, Fut>(n: usize, one: F) -> (ClientResult, Duration)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ClientResult> + Send + 'static,
{
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        set.spawn(one(i));
    }
    let mut all = ClientResult::default();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(r) => {
                all.ok += r.ok;
                all.errors.merge(r.errors);
                all.latencies.extend(r.latencies);
                all.ids.extend(r.ids);
            }
            Err(_) => all.errors.add("bench client task failed".into()),
        }
    }
    (all, started.elapsed())
}

/// Phase 1: submit → completed via the sync endpoint, for `seconds`.
async fn lifecycles(t: &Arc<Target>, n: usize, seconds: Duration) -> (PhaseResult, Vec<String>) {
    let deadline = Instant::now() + seconds;
    let keep = MAX_READ_IDS / n + 1;
    let (mut all, elapsed) = run_clients(n, |_| {
        let t = t.clone();
        async move {
            let mut r = ClientResult::default();
            let body = echo_body();
            while Instant::now() < deadline {
                let start = Instant::now();
                match send(t.post("/tasks/sync", &body)).await {
                    Ok((StatusCode::OK, bytes)) => {
                        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                        if v["status"] == "completed" {
                            r.ok += 1;
                            r.latencies.push(start.elapsed());
                            if r.ids.len() < keep
                                && let Some(id) = v["task_id"].as_str()
                            {
                                r.ids.push(id.to_string());
                            }
                        } else {
                            let s = v["status"].as_str().unwrap_or("unreadable");
                            r.errors.add(format!("HTTP 200 but task {s}"));
                        }
                    }
                    Ok((StatusCode::ACCEPTED, _)) => {
                        r.errors.add("HTTP 202 (sync wait timed out)".into())
                    }
                    Ok((status, bytes)) => r.errors.add(http_error(status, &bytes)),
                    Err(kind) => r.errors.add(kind),
                }
            }
            r
        }
    })
    .await;
    let result = PhaseResult {
        name: "echo lifecycles (POST /tasks/sync → completed)",
        ok: all.ok,
        elapsed,
        errors: all.errors.clone(),
        latency: latency(&mut all.latencies),
    };
    (result, all.ids)
}

/// Submits a few echo tasks when phase 1 left none to read.
async fn seed_ids(t: &Target, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        if let Ok((StatusCode::ACCEPTED, bytes)) = send(t.post("/tasks", &echo_body())).await
            && let Some(id) = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["task_id"].as_str().map(str::to_string))
        {
            ids.push(id);
        }
    }
    ids
}

/// Phase 2: `GET /tasks/{id}` over existing tasks, for `seconds`.
async fn status_reads(
    t: &Arc<Target>,
    n: usize,
    seconds: Duration,
    ids: Arc<Vec<String>>,
) -> PhaseResult {
    let name = "status reads (GET /tasks/{id})";
    if ids.is_empty() {
        let mut errors = Errors::default();
        errors.add("no task to read (every submit failed)".into());
        return PhaseResult {
            name,
            ok: 0,
            elapsed: Duration::ZERO,
            errors,
            latency: None,
        };
    }
    let deadline = Instant::now() + seconds;
    let (mut all, elapsed) = run_clients(n, |i| {
        let (t, ids) = (t.clone(), ids.clone());
        async move {
            let mut r = ClientResult::default();
            let mut next = i;
            while Instant::now() < deadline {
                let path = format!("/tasks/{}", ids[next % ids.len()]);
                next += n;
                r.expect(StatusCode::OK, t.get(&path)).await;
            }
            r
        }
    })
    .await;
    PhaseResult {
        name,
        ok: all.ok,
        elapsed,
        errors: all.errors.clone(),
        latency: latency(&mut all.latencies),
    }
}

/// Phase 3: `requests` × `POST /tasks` (echo) over `n` clients; latency of the `202` answers.
async fn submits(t: &Arc<Target>, n: usize, requests: usize) -> PhaseResult {
    let remaining = Arc::new(AtomicUsize::new(requests));
    let (mut all, elapsed) = run_clients(n, |_| {
        let (t, remaining) = (t.clone(), remaining.clone());
        async move {
            let mut r = ClientResult::default();
            let body = echo_body();
            // Take one request at a time from the shared budget until it is spent.
            while remaining
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                    left.checked_sub(1)
                })
                .is_ok()
            {
                r.expect(StatusCode::ACCEPTED, t.post("/tasks", &body))
                    .await;
            }
            r
        }
    })
    .await;
    PhaseResult {
        name: "submits (POST /tasks, echo → 202)",
        ok: all.ok,
        elapsed,
        errors: all.errors.clone(),
        latency: latency(&mut all.latencies),
    }
}

/// The in-process server and its temporary data directory (removed on drop).
struct Local {
    running: Option<Running>,
    dir: PathBuf,
}

impl Drop for Local {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("could not remove {}: {e}", self.dir.display());
        }
    }
}

fn fresh_data_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::env::temp_dir().join(format!("tasklane-bench-{}-{nanos}", std::process::id()))
}

fn summary(results: &[PhaseResult]) {
    println!();
    println!("| phase | ok | rate /s | errors | p50 ms | p99 ms | max ms | mean ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let (p50, p99, max, mean) = match r.latency {
            Some(l) => (
                format!("{:.2}", l.p50),
                format!("{:.2}", l.p99),
                format!("{:.2}", l.max),
                format!("{:.2}", l.mean),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {} | {} | {:.0} | {} | {p50} | {p99} | {max} | {mean} |",
            r.name,
            r.ok,
            r.rate(),
            r.errors.total()
        );
    }
}

async fn run(o: Options) -> Result<(), String> {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let client = Client::builder()
        .pool_max_idle_per_host(o.concurrency)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))?;

    let mut local = None;
    let (base, key, target_desc) = match (&o.url, &o.key) {
        (Some(url), Some(key)) => (url.clone(), key.clone(), format!("running server at {url}")),
        _ => {
            let dir = fresh_data_dir();
            let mut cfg = LocalConfig {
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                data_dir: dir.clone(),
                dev_credits: BENCH_CREDITS,
                ..LocalConfig::default()
            };
            // One account drives the whole load: measure the server, not its rate limit or its
            // cap on unfinished tasks (the submit phase queues thousands).
            cfg.core.rate_limit = None;
            cfg.core.max_open_tasks = u64::MAX;
            let desc = format!("{} workers, data in {}", cfg.workers, dir.display());
            let mut guard = Local { running: None, dir };
            let running = tasklane_local::start(cfg)
                .await
                .map_err(|e| format!("starting the in-process server: {e:#}"))?;
            let (base, key) = (running.base_url.clone(), running.dev_api_key.clone());
            guard.running = Some(running);
            local = Some(guard);
            let desc = format!("in-process local server at {base} ({desc})");
            (base, key, desc)
        }
    };
    let t = Arc::new(Target { client, base, key });

    println!("tasklane-bench");
    println!("  cpus:        {cpus}");
    println!("  target:      {target_desc}");
    println!("  concurrency: {}", o.concurrency);
    println!("  seconds:     {} per timed phase", o.seconds);
    println!("  requests:    {} in the submit phase", o.requests);
    match send(t.get("/account")).await {
        Ok((StatusCode::OK, bytes)) => {
            let credits = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["credits"].as_u64());
            match credits {
                Some(c) => println!("  credits:     {c} (echo costs 1 per task)"),
                None => println!("  credits:     unreadable"),
            }
        }
        Ok((status, bytes)) => {
            return Err(format!(
                "GET /account answered {}",
                http_error(status, &bytes)
            ));
        }
        Err(kind) => return Err(format!("GET /account failed: {kind}")),
    }
    println!();

    let seconds = Duration::from_secs_f64(o.seconds);
    let mut results = Vec::new();

    let (r, ids) = lifecycles(&t, o.concurrency, seconds).await;
    r.print();
    results.push(r);

    let ids = if ids.is_empty() {
        seed_ids(&t, 10).await
    } else {
        ids
    };
    let r = status_reads(&t, o.concurrency, seconds, Arc::new(ids)).await;
    r.print();
    results.push(r);

    let r = submits(&t, o.concurrency, o.requests).await;
    r.print();
    results.push(r);

    summary(&results);

    if let Some(mut l) = local.take()
        && let Some(running) = l.running.take()
    {
        running.shutdown().await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let o = Options::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        tasklane_local::init_tracing();
    }
    match run(o).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("tasklane-bench: {msg}");
            ExitCode::FAILURE
        }
    }
}
