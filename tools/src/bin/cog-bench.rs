//! `tasklane-cog-bench`: what tasklane adds in front of a Cog model server (not a test).
//!
//! It starts the real Cog prediction server (coglet, from the test venv that `scripts/test.sh`
//! makes) with the `fast` predictor of `tests/cog/` (it writes the prompt to a text file and
//! returns at once), and an in-process local tasklane server (127.0.0.1:0, temporary data
//! directory) whose catalog serves that Cog server as two models: `fast` (no limit: a busy Cog
//! answers `409` and the task waits queued) and `fast_one_slot` (`concurrency = 1`: tasklane
//! never sends Cog a second prediction). Everything stays on loopback.
//!
//! ```text
//! cargo run --release -p tasklane-tools --bin tasklane-cog-bench -- [--tasks 200] [--burst 200]
//!     [--warmup 10] [--pause-ms 20] [--clients 16] [--workers N] [--check-first-ms 100]
//! ```
//!
//! Phases, each printed as it finishes and summarized in tables at the end:
//!
//! 1. **Cog directly**: `--tasks` predictions one at a time, each a `POST /predictions` without
//!    a `Prefer` header (Cog answers `200` with the finished prediction): per-request latency.
//!    coglet frees its one slot a few ms *after* it answers, so a request sent at once may be
//!    answered `409` (seen on a loaded machine): each request waits `--pause-ms` after the previous answer (not timed), and
//!    a `409` is counted and the prediction sent again after the pause (only the answered
//!    attempt is timed).
//! 2. **Through tasklane**: `--tasks` tasks one at a time, the same pause apart, each a
//!    `POST /v1/tasks/sync` on `fast`, timed until the answer says `completed` with its output
//!    copied into tasklane's blob store (a `409` from Cog here puts the task back in the queue
//!    for the retry delay, inside its timing). tasklane's added latency is reported as p50 of
//!    phase 2 minus p50 of phase 1, and p99 of phase 2 minus p99 of phase 1 (differences of
//!    percentiles, not percentiles of per-request differences: the two phases are separate
//!    runs).
//! 3. **Burst**: `--burst` tasks submitted with `POST /v1/tasks` by `--clients` concurrent
//!    clients as fast as the server answers `202`, then waited for until all are terminal:
//!    complete lifecycles per second (first submit to last `completed_at`), and each task's
//!    `created_at` → `completed_at`. Run twice: on `fast` (Cog's `409`, then the task is put
//!    back in the queue for `2 × --check-first-ms`, at least 0.1 s) and on `fast_one_slot`
//!    (the task waits for the model's slot inside tasklane, re-tried after the same delay).
//!    The waits are counted by a hook on the task store (each `Deferred` transition after a
//!    busy answer, each `StillWaiting` one for a taken slot). The retry delay has no jitter:
//!    tasks refused together are tried again together, so a burst drains in rounds one delay
//!    apart, and the delay (`--check-first-ms`; 100 by default, the least the server accepts,
//!    against the server's own default of 2000) sets the lifecycle rate more than tasklane's
//!    own cost does.
//!
//! Cog's `fast` predictor has a sync `run()`, and coglet refuses `COG_MAX_CONCURRENCY` above 1
//! for a sync predictor (its health check says `SETUP_FAILED`): Cog has one slot, the bottleneck
//! of phase 3, whose figure is tasklane's lifecycle rate in front of a one-slot upstream.
//!
//! Every unexpected answer and transport failure is counted as an error by kind, never a panic.
//! It prints figures; it asserts nothing. Build it with `--release`: a debug build measures
//! the debug build. `RUST_LOG` turns on the in-process server's logs. coglet leaves an empty
//! folder per prediction in `/tmp/coglet/predictions/`: the bench removes the ones of the
//! predictions it made.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tasklane_tools::{Latency, cells, latency};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use clap::Parser;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use tasklane_core::ports::{PortResult, TaskStore};
use tasklane_core::task::{Task, Transition};
use tasklane_local::{Hooks, LocalConfig, Running};
use tasklane_testkit::cog::CogServer;
use tasklane_testkit::intercept::{Intercepted, Interceptor, Op};
use tasklane_testkit::soak::transport_kind;

/// Credits of the in-process development account: plenty for any run (1 per task).
const BENCH_CREDITS: u64 = 10_000_000;
/// Per-request timeout (above the sync endpoint's 25 s default wait).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a burst's tasks to end.
const BURST_TIMEOUT: Duration = Duration::from_secs(600);
/// Pause between two status reads of the same unfinished task while a burst drains.
const POLL_NAP: Duration = Duration::from_millis(20);
/// Where coglet 0.23.1 makes a folder per prediction, whatever `TMPDIR` says.
const COGLET_PREDICTIONS: &str = "/tmp/coglet/predictions";
/// The catalog's model without a limit (Cog's `409` makes tasks wait).
const MODEL_FREE: &str = "fast";
/// The catalog's model with `concurrency = 1` (tasks wait for the slot inside tasklane).
const MODEL_ONE_SLOT: &str = "fast_one_slot";

/// What tasklane adds in front of a Cog model server (not a test).
///
/// Starts the real Cog server with the `fast` predictor and an in-process tasklane server
/// serving it, then measures: predictions straight to Cog, one at a time; tasks through
/// tasklane, one at a time (the difference is tasklane's added latency); and bursts of tasks
/// (lifecycles per second in front of Cog's one slot). Build with --release.
#[derive(Debug, Clone, Parser)]
#[command(name = "tasklane-cog-bench")]
struct Options {
    /// Timed predictions straight to Cog (phase 1), and timed tasks through tasklane (phase 2)
    #[arg(long, value_name = "N", default_value_t = 200, value_parser = at_least_one)]
    tasks: usize,
    /// Tasks in each burst (phase 3, run on both models)
    #[arg(long, value_name = "M", default_value_t = 200, value_parser = at_least_one)]
    burst: usize,
    /// Untimed requests before phases 1 and 2 (connections, Python and SQLite warm up)
    #[arg(long, value_name = "N", default_value_t = 10)]
    warmup: usize,
    /// Concurrent submitting clients in phase 3
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = at_least_one)]
    clients: usize,
    /// tasklane's in-process workers (default: the local server's, one per CPU)
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    workers: Option<usize>,
    /// Pause after each answer in phases 1 and 2 before the next request (not timed): coglet
    /// frees its slot a few ms after it answers
    #[arg(long, value_name = "MS", default_value_t = 20)]
    pause_ms: u64,
    /// The server's TASKLANE_UPSTREAM_CHECK_FIRST in milliseconds (its default: 2000); a task
    /// refused for capacity waits twice that (at least 100 ms) before it is tried again.
    /// The default, 100, is the least the server accepts: waits cost the least
    #[arg(long, value_name = "MS", default_value_t = 100, value_parser = check_first)]
    check_first_ms: u64,
}

fn at_least_one(value: &str) -> Result<usize, String> {
    value
        .parse()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| "must be a whole number, 1 or more".to_string())
}

fn check_first(value: &str) -> Result<u64, String> {
    value
        .parse()
        .ok()
        .filter(|ms| (100..=30_000).contains(ms))
        .ok_or_else(|| "must be a number of milliseconds from 100 to 30000".to_string())
}

/// Errors by kind (`HTTP 409`, `transport: timeout`, `task failed: generation_failed`, ...).
#[derive(Debug, Default, Clone)]
struct Errors(BTreeMap<String, u64>);

impl Errors {
    fn add(&mut self, kind: impl Into<String>) {
        *self.0.entry(kind.into()).or_default() += 1;
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

/// `HTTP 402 insufficient_quota` from an error answer (tasklane's code, or Cog's `error`).
fn http_error(status: StatusCode, body: &Value) -> String {
    let code = body["error"]["code"]
        .as_str()
        .or_else(|| body["error"].as_str());
    match code {
        Some(c) => format!("HTTP {} {c}", status.as_u16()),
        None => format!("HTTP {}", status.as_u16()),
    }
}

/// One request's answer (status and JSON body, `Null` when not JSON) or a transport error kind.
async fn send(req: reqwest::RequestBuilder) -> Result<(StatusCode, Value), String> {
    let resp = req.send().await.map_err(|e| transport_kind(&e))?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| transport_kind(&e))?;
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// Counts, from the task store's side, the waits of tasks whose upstream was busy.
#[derive(Default)]
struct WaitCounter {
    /// `Deferred` without counting the attempt: the upstream answered busy (Cog's `409`).
    busy: AtomicU64,
    /// `Deferred` counting the attempt: the upstream could not be reached.
    unreachable: AtomicU64,
    /// `StillWaiting`: every slot of the model was taken (the catalog's `concurrency`).
    slot: AtomicU64,
    /// Busy and slot waits by task id.
    by_task: Mutex<HashMap<String, u32>>,
}

/// The counter's totals at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Waits {
    busy: u64,
    unreachable: u64,
    slot: u64,
}

impl WaitCounter {
    fn snapshot(&self) -> Waits {
        Waits {
            busy: self.busy.load(Ordering::Relaxed),
            unreachable: self.unreachable.load(Ordering::Relaxed),
            slot: self.slot.load(Ordering::Relaxed),
        }
    }

    fn since(&self, before: Waits) -> Waits {
        let now = self.snapshot();
        Waits {
            busy: now.busy - before.busy,
            unreachable: now.unreachable - before.unreachable,
            slot: now.slot - before.slot,
        }
    }

    /// How many of `ids` waited at least once, and the most waits of one of them.
    fn tasks_that_waited(&self, ids: &[String]) -> (usize, u32) {
        let by_task = self.by_task.lock().unwrap_or_else(|e| e.into_inner());
        let waits = ids.iter().filter_map(|id| by_task.get(id).copied());
        waits.fold((0, 0), |(n, most), w| (n + 1, most.max(w)))
    }
}

#[async_trait]
impl Interceptor for WaitCounter {
    async fn before(&self, _op: Op) -> PortResult<()> {
        Ok(())
    }

    fn after_update(&self, transition: &Transition, result: &PortResult<Task>) {
        let Ok(task) = result else { return };
        let counter = match transition {
            Transition::Deferred {
                count_attempt: false,
                ..
            } => &self.busy,
            Transition::Deferred { .. } => {
                self.unreachable.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Transition::StillWaiting { .. } => &self.slot,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut by_task = self.by_task.lock().unwrap_or_else(|e| e.into_inner());
        *by_task.entry(task.id.clone()).or_default() += 1;
    }
}

/// The API of the in-process server.
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

/// A one-at-a-time phase's figures.
struct Sequential {
    name: &'static str,
    ok: u64,
    errors: Errors,
    latency: Option<Latency>,
    /// Phase 1: Cog's `409` answers (sent again); phase 2: tasks put back in the queue after
    /// Cog's `409`.
    waits: Waits,
}

impl Sequential {
    fn print(&self) {
        let [p50, p99, max, mean] = cells(self.latency);
        println!(
            "{}: {} ok; latency ms p50 {p50}, p99 {p99}, max {max}, mean {mean}; Cog 409s {}; \
             errors: {}",
            self.name,
            self.ok,
            self.waits.busy,
            self.errors.describe()
        );
    }
}

/// A unique prediction id for a request straight to Cog.
fn direct_id(i: usize) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("cogbench-{}-{nanos}-{i}", std::process::id())
}

/// How the one-at-a-time phases pace their requests.
#[derive(Debug, Clone, Copy)]
struct Pace {
    /// Timed requests.
    n: usize,
    /// Untimed requests before them.
    warmup: usize,
    /// Pause after each answer before the next request (not timed).
    pause: Duration,
}

/// Times Cog is asked again for one prediction while it answers `409` before giving up.
const MAX_BUSY_RETRIES: u32 = 100;

/// Phase 1: `warmup + n` predictions straight to Cog, one at a time; the last `n` are timed.
/// A `409` (coglet frees its slot a few ms after it answers) is counted, and the prediction
/// is sent again after the pause: only the attempt Cog answered is timed.
async fn direct(client: &Client, cog: &str, pace: Pace, ids: &mut Vec<String>) -> Sequential {
    let url = format!("{cog}/predictions");
    let mut errors = Errors::default();
    let mut samples = Vec::with_capacity(pace.n);
    let mut busy = 0;
    for i in 0..pace.warmup + pace.n {
        if i == pace.warmup {
            busy = 0;
        }
        let id = direct_id(i);
        let body = json!({"id": id, "input": {"prompt": format!("cog-bench {i}")}});
        ids.push(id);
        let mut tries = 0;
        let (outcome, took) = loop {
            tokio::time::sleep(pace.pause).await;
            let start = Instant::now();
            let outcome = send(client.post(&url).json(&body)).await;
            let took = start.elapsed();
            match outcome {
                Ok((StatusCode::CONFLICT, _)) if tries < MAX_BUSY_RETRIES => {
                    tries += 1;
                    busy += 1;
                }
                _ => break (outcome, took),
            }
        };
        if i < pace.warmup {
            continue;
        }
        match outcome {
            Ok((StatusCode::OK, v))
                if v["status"] == "succeeded"
                    && v["output"].as_str().is_some_and(|o| o.starts_with("data:")) =>
            {
                samples.push(took)
            }
            Ok((StatusCode::OK, v)) => errors.add(format!(
                "HTTP 200 with status {}",
                v["status"].as_str().unwrap_or("unreadable")
            )),
            Ok((status, v)) => errors.add(http_error(status, &v)),
            Err(kind) => errors.add(kind),
        }
    }
    Sequential {
        name: "1. Cog directly (POST /predictions, sync)",
        ok: samples.len() as u64,
        errors,
        latency: latency(&mut samples),
        waits: Waits {
            busy,
            ..Waits::default()
        },
    }
}

/// The task's `created_at` → `completed_at`, when both are there.
fn server_time(task: &Value) -> Option<Duration> {
    let at = |field: &str| {
        task[field]
            .as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc))
    };
    (at("completed_at")? - at("created_at")?).to_std().ok()
}

/// Whether a task object is `completed` with its output stored (a tasklane URL, not Cog's
/// data URI).
fn completed_with_output(task: &Value) -> bool {
    task["status"] == "completed"
        && task["result"]["outputs"][0]["url"]
            .as_str()
            .is_some_and(|u| u.starts_with("http"))
}

/// Why a terminal task is not a completed one with its output.
fn task_error(task: &Value) -> String {
    match task["status"].as_str() {
        Some("completed") => "completed without a stored output".into(),
        Some("failed") => format!(
            "task failed: {}",
            task["error"]["code"].as_str().unwrap_or("no code")
        ),
        Some(other) => format!("task {other}"),
        None => "unreadable task".into(),
    }
}

/// Phase 2: `warmup + n` tasks through tasklane's sync endpoint, one at a time; the last `n`
/// are timed. Returns the figures and the server-side times (`created_at` → `completed_at`).
async fn through_tasklane(
    t: &Target,
    pace: Pace,
    waits: &WaitCounter,
    ids: &mut Vec<String>,
) -> (Sequential, Option<Latency>) {
    let mut errors = Errors::default();
    let mut samples = Vec::with_capacity(pace.n);
    let mut server = Vec::with_capacity(pace.n);
    let mut before = waits.snapshot();
    for i in 0..pace.warmup + pace.n {
        if i == pace.warmup {
            before = waits.snapshot();
        }
        let body = json!({"model": MODEL_FREE, "prompt": format!("cog-bench {i}")});
        tokio::time::sleep(pace.pause).await;
        let start = Instant::now();
        let outcome = send(t.post("/tasks/sync", &body)).await;
        let took = start.elapsed();
        if let Ok((_, v)) = &outcome
            && let Some(id) = v["task_id"].as_str()
        {
            ids.push(id.to_string());
        }
        if i < pace.warmup {
            continue;
        }
        match outcome {
            Ok((StatusCode::OK, v)) if completed_with_output(&v) => {
                samples.push(took);
                server.extend(server_time(&v));
            }
            Ok((StatusCode::OK, v)) => errors.add(task_error(&v)),
            Ok((StatusCode::ACCEPTED, _)) => errors.add("HTTP 202 (sync wait timed out)"),
            Ok((status, v)) => errors.add(http_error(status, &v)),
            Err(kind) => errors.add(kind),
        }
    }
    let phase = Sequential {
        name: "2. through tasklane (POST /v1/tasks/sync → completed)",
        ok: samples.len() as u64,
        errors,
        latency: latency(&mut samples),
        waits: waits.since(before),
    };
    (phase, latency(&mut server))
}

/// A burst's figures.
struct Burst {
    model: &'static str,
    submitted: usize,
    completed: usize,
    errors: Errors,
    submit_elapsed: Duration,
    /// First submit sent → last task's `completed_at`.
    elapsed: Duration,
    /// `created_at` → `completed_at` of the completed tasks.
    latency: Option<Latency>,
    waits: Waits,
    tasks_that_waited: usize,
    most_waits: u32,
}

impl Burst {
    fn submit_rate(&self) -> f64 {
        self.submitted as f64 / self.submit_elapsed.as_secs_f64().max(1e-9)
    }

    fn lifecycle_rate(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn print(&self) {
        let [p50, p99, max, _] = cells(self.latency);
        println!(
            "3. burst on {}: {} submitted ({:.0}/s), {} completed in {:.2} s = {:.1} lifecycles/s; \
             created → completed ms p50 {p50}, p99 {p99}, max {max}; Cog 409 waits {}, slot \
             waits {}, unreachable retries {}; {} tasks waited (at most {} times); errors: {}",
            self.model,
            self.submitted,
            self.submit_rate(),
            self.completed,
            self.elapsed.as_secs_f64(),
            self.lifecycle_rate(),
            self.waits.busy,
            self.waits.slot,
            self.waits.unreachable,
            self.tasks_that_waited,
            self.most_waits,
            self.errors.describe()
        );
    }
}

/// Phase 3: `m` tasks on `model` submitted by `clients` concurrent clients, then waited for.
async fn burst(
    t: &Arc<Target>,
    model: &'static str,
    m: usize,
    clients: usize,
    waits: &WaitCounter,
    all_ids: &mut Vec<String>,
) -> Burst {
    let before = waits.snapshot();
    let remaining = Arc::new(AtomicUsize::new(m));
    let first_sent = Utc::now();
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..clients.min(m) {
        let (t, remaining) = (t.clone(), remaining.clone());
        set.spawn(async move {
            let (mut ids, mut errors) = (Vec::new(), Errors::default());
            // One submit at a time from the shared budget until it is spent.
            while remaining
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
            {
                let body = json!({"model": model, "prompt": "cog-bench burst"});
                match send(t.post("/tasks", &body)).await {
                    Ok((StatusCode::ACCEPTED, v)) => match v["task_id"].as_str() {
                        Some(id) => ids.push(id.to_string()),
                        None => errors.add("HTTP 202 without a task_id"),
                    },
                    Ok((status, v)) => errors.add(http_error(status, &v)),
                    Err(kind) => errors.add(kind),
                }
            }
            (ids, errors)
        });
    }
    let (mut ids, mut errors) = (Vec::new(), Errors::default());
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((i, e)) => {
                ids.extend(i);
                errors.merge(e);
            }
            Err(_) => errors.add("bench client task failed"),
        }
    }
    let submit_elapsed = started.elapsed();
    all_ids.extend(ids.iter().cloned());

    // Wait for each task in turn: one status read per finished task, a few per unfinished one.
    let deadline = Instant::now() + BURST_TIMEOUT;
    let (mut completed, mut samples, mut last_end) = (0, Vec::new(), first_sent);
    for id in &ids {
        loop {
            match send(t.get(&format!("/tasks/{id}"))).await {
                Ok((StatusCode::OK, v))
                    if v["status"] == "queued" || v["status"] == "processing" => {}
                Ok((StatusCode::OK, v)) if completed_with_output(&v) => {
                    completed += 1;
                    samples.extend(server_time(&v));
                    let end = v["completed_at"]
                        .as_str()
                        .and_then(|s| DateTime::parse_from_rfc3339(s).ok());
                    if let Some(end) = end {
                        last_end = last_end.max(end.with_timezone(&Utc));
                    }
                    break;
                }
                Ok((StatusCode::OK, v)) => {
                    errors.add(task_error(&v));
                    break;
                }
                Ok((status, v)) => errors.add(format!("status read: {}", http_error(status, &v))),
                Err(kind) => errors.add(format!("status read: {kind}")),
            }
            if Instant::now() > deadline {
                errors.add(format!("not finished after {} s", BURST_TIMEOUT.as_secs()));
                break;
            }
            tokio::time::sleep(POLL_NAP).await;
        }
    }
    let (tasks_that_waited, most_waits) = waits.tasks_that_waited(&ids);
    Burst {
        model,
        submitted: ids.len(),
        completed,
        errors,
        submit_elapsed,
        elapsed: (last_end - first_sent).to_std().unwrap_or_default(),
        latency: latency(&mut samples),
        waits: waits.since(before),
        tasks_that_waited,
        most_waits,
    }
}

/// The catalog: the Cog server at `url` as `fast` (no limit) and `fast_one_slot` (one slot).
/// The `fast` predictor takes only `prompt`: no duration, no params (Cog passes every input on
/// and the predictor refuses one it does not declare).
fn write_catalog(dir: &Path, url: &str) -> std::io::Result<PathBuf> {
    let path = dir.join("models.toml");
    let entry = |name: &str, extra: &str| {
        format!(
            r#"
[models.{name}]
provider = "cog"
description = "tests/cog/fast on a local Cog server (tasklane-cog-bench)"
endpoint = "{url}"
prompt = {{ required = true, max_length = 200 }}
price = {{ per_task = 1 }}
timeout = 60
{extra}
"#
        )
    };
    let text = entry(MODEL_FREE, "") + &entry(MODEL_ONE_SLOT, "concurrency = 1");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Removes coglet's folders of the predictions named by `ids` (all made by this run).
fn remove_coglet_folders(ids: &[String]) -> usize {
    let root = Path::new(COGLET_PREDICTIONS);
    ids.iter()
        .filter(|id| {
            !id.is_empty()
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .filter(|id| std::fs::remove_dir_all(root.join(id)).is_ok())
        .count()
}

fn summary(direct: &Sequential, through: &Sequential, server: Option<Latency>, bursts: &[Burst]) {
    println!();
    println!("| one at a time | ok | errors | Cog 409s | p50 ms | p99 ms | max ms | mean ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in [direct, through] {
        let [p50, p99, max, mean] = cells(r.latency);
        println!(
            "| {} | {} | {} | {} | {p50} | {p99} | {max} | {mean} |",
            r.name,
            r.ok,
            r.errors.total(),
            r.waits.busy
        );
    }
    let [p50, p99, max, mean] = cells(server);
    println!(
        "| 2 seen by the server (created_at → completed_at) | | | | {p50} | {p99} | {max} | {mean} |"
    );
    match (direct.latency, through.latency) {
        (Some(d), Some(t)) => println!(
            "| tasklane's added latency (p50 of 2 − p50 of 1, p99 of 2 − p99 of 1, max − max, \
             mean − mean) | | | | {:.2} | {:.2} | {:.2} | {:.2} |",
            t.p50 - d.p50,
            t.p99 - d.p99,
            t.max - d.max,
            t.mean - d.mean
        ),
        _ => println!("| tasklane's added latency | | | | - | - | - | - |"),
    }
    println!(
        "(added latency: differences of percentiles of two separate runs, not percentiles of \
         per-request differences. Cog 409s: in phase 1 the prediction was sent again after the \
         pause, only the answered attempt timed; in phase 2 the task waited queued for the \
         retry delay, inside its timing)"
    );
    println!();
    println!(
        "| burst on | tasks | completed | errors | submits /s | lifecycles /s | created → completed \
         p50 ms | p99 ms | Cog 409 waits | slot waits | tasks that waited |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for b in bursts {
        let [p50, p99, _, _] = cells(b.latency);
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.1} | {p50} | {p99} | {} | {} | {} |",
            b.model,
            b.submitted,
            b.completed,
            b.errors.total(),
            b.submit_rate(),
            b.lifecycle_rate(),
            b.waits.busy,
            b.waits.slot,
            b.tasks_that_waited
        );
    }
}

/// Starts the Cog server off the async threads (it blocks about a second); its panic (no venv,
/// no coglet, not ready) becomes an error after its message is printed.
async fn start_cog() -> Result<CogServer, String> {
    tokio::task::spawn_blocking(|| CogServer::start("fast"))
        .await
        .map_err(|_| {
            "the Cog server did not start (the message above says why; scripts/test.sh makes \
             the venv with coglet)"
                .to_string()
        })
}

async fn run(o: Options) -> Result<(), String> {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cog = start_cog().await?;
    let dir = tempfile::tempdir().map_err(|e| format!("a temporary data directory: {e}"))?;
    let catalog = write_catalog(dir.path(), &cog.url).map_err(|e| format!("the catalog: {e}"))?;

    let mut cfg = LocalConfig {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: dir.path().join("data"),
        dev_credits: BENCH_CREDITS,
        models: Some(catalog),
        ..LocalConfig::default()
    };
    if let Some(w) = o.workers {
        cfg.workers = w;
    }
    // One account drives the whole load: measure the server, not its rate limit or its cap
    // on unfinished tasks.
    cfg.core.rate_limit = None;
    cfg.core.max_open_tasks = u64::MAX;
    cfg.core.upstream_check_first = Duration::from_millis(o.check_first_ms);
    cfg.core.upstream_check_max = cfg
        .core
        .upstream_check_max
        .max(cfg.core.upstream_check_first);
    let retry = (cfg.core.upstream_check_first * 2)
        .clamp(Duration::from_millis(100), cfg.core.upstream_check_max);
    let workers = cfg.workers;

    let waits = Arc::new(WaitCounter::default());
    let hook: Arc<dyn Interceptor> = waits.clone();
    let hooks = Hooks {
        store: Some(Box::new(move |inner: Arc<dyn TaskStore>| {
            Arc::new(Intercepted::new(inner, hook)) as Arc<dyn TaskStore>
        })),
        queue: None,
    };
    let running: Running = tasklane_local::start_on(cfg, None, hooks)
        .await
        .map_err(|e| format!("starting the in-process server: {e:#}"))?;
    let client = Client::builder()
        .pool_max_idle_per_host(o.clients)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))?;
    let t = Arc::new(Target {
        client: client.clone(),
        base: running.base_url.clone(),
        key: running.dev_api_key.clone(),
    });

    println!("tasklane-cog-bench");
    println!("  cpus:        {cpus}");
    println!(
        "  cog:         coglet at {} (tests/cog/fast, one slot)",
        cog.url
    );
    println!(
        "  tasklane:    in-process local server at {} ({workers} workers)",
        running.base_url
    );
    println!(
        "  checks:      first after {} ms; a busy task is tried again after {} ms",
        o.check_first_ms,
        retry.as_millis()
    );
    println!(
        "  phases:      {} + {} warm-up one at a time, each way; bursts of {} over {} clients",
        o.tasks, o.warmup, o.burst, o.clients
    );
    println!(
        "  note:        the fast predictor's run() is sync; coglet refuses COG_MAX_CONCURRENCY > 1 \
         for it, so Cog has one slot"
    );
    if cfg!(debug_assertions) {
        println!("  warning:     a debug build; run with --release for figures worth comparing");
    }
    println!();

    let mut ids = Vec::new();
    let pace = Pace {
        n: o.tasks,
        warmup: o.warmup,
        pause: Duration::from_millis(o.pause_ms),
    };
    let d = direct(&client, &cog.url, pace, &mut ids).await;
    d.print();
    let (s, server) = through_tasklane(&t, pace, &waits, &mut ids).await;
    s.print();
    let mut bursts = Vec::new();
    for model in [MODEL_FREE, MODEL_ONE_SLOT] {
        let b = burst(&t, model, o.burst, o.clients, &waits, &mut ids).await;
        b.print();
        bursts.push(b);
    }
    summary(&d, &s, server, &bursts);

    running.shutdown().await;
    drop(cog);
    let removed = remove_coglet_folders(&ids);
    println!();
    println!("removed {removed} of coglet's prediction folders in {COGLET_PREDICTIONS}");
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
            eprintln!("tasklane-cog-bench: {msg}");
            ExitCode::FAILURE
        }
    }
}
