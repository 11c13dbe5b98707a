//! The soak run: many clients against a local server with injected faults, every answer
//! recorded, and a history check at the end.
//!
//! [`run`] starts a local server (embedded backends, or the [`Backends`] given) whose store and
//! queue are wrapped by a seeded [`Chaos`]: store and queue calls fail, are delayed, enqueued
//! messages are duplicated, and workers "crash" between two steps. `clients` concurrent clients
//! submit tasks (each with its own `Idempotency-Key`, retried with the same key until a
//! definitive answer), cancel some right after submitting, replay some submits, and poll their
//! own tasks in between. Then injection stops, the run drains until every task is terminal, reads
//! every task once more through the API, and [`check`] judges the recorded history together with
//! what the store holds:
//!
//! - (a) no task lost: every acknowledged task is stored and terminal, and so is every stored task;
//! - (b) no task was seen in two different terminal states;
//! - (c) no terminal state ever changed (later reads, `completed_at` and the store agree);
//! - (d) every acknowledged cancel held (and no refused cancel ended cancelled);
//! - (e) `cost.refunded` is set exactly on failed and cancelled tasks;
//! - (f) per account, `credits + charged_not_refunded == granted`;
//! - (g) one idempotency key never answered two tasks.
//!
//! [`check`] is a pure function over the history, the stored tasks and the accounts, so a
//! fabricated history can show that it catches violations.
//!
//! The seed fixes every client's choices (models, cancels, replays, polls) and the sequence of
//! fault decisions; which call meets which decision still depends on how the concurrent calls
//! interleave, so two runs with one seed inject the same kinds and rates of faults, not the
//! same faults at the same places.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Client;
use serde_json::{Value, json};
use tasklane_core::App;
use tasklane_core::account::Account;
use tasklane_core::chaos::{Chaos, ChaosConfig, ChaosCounts};
use tasklane_core::ports::ListQuery;
use tasklane_core::task::{Task, TaskStatus};
use tasklane_core::view::rfc3339;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::{Backends, Hooks, LocalConfig};

/// What a soak run does: load, fault rates, request mix and timings.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// Submits to get acknowledged (`202`).
    pub tasks: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// Accounts the clients spread over (client `i` uses account `i % accounts`).
    pub accounts: usize,
    /// Seed of the fault injector and of every client's choices.
    pub seed: u64,
    /// In-process workers of the server.
    pub workers: usize,
    /// Probability that a store or queue call fails (`503` to the API, a retry to a worker).
    pub fail: f64,
    /// Probability that an enqueued message is delivered twice.
    pub duplicate: f64,
    /// Probability that a store or queue call made by a worker crashes it.
    pub crash: f64,
    /// Probability that a store or queue call is delayed (up to `max_delay`).
    pub delay: f64,
    /// Longest injected delay.
    pub max_delay: Duration,
    /// Share of acknowledged tasks cancelled right after the submit answer.
    pub cancel_ratio: f64,
    /// Share of tasks that ask the `echo` model to fail.
    pub fail_ratio: f64,
    /// Share of slow tasks (`echo` sleeping up to `max_sleep_ms`).
    pub slow_ratio: f64,
    /// Longest sleep of a slow task, in milliseconds.
    pub max_sleep_ms: u64,
    /// Share of `demo-image` tasks (16×16, 5 credits).
    pub image_ratio: f64,
    /// Share of `veo3` tasks (1 s at 4 fps, 10 credits, with progress updates).
    pub video_ratio: f64,
    /// Share of acknowledged submits sent once more with the same key and body (a replay).
    pub replay_ratio: f64,
    /// Probability of polling one of the client's own tasks after each submit.
    pub poll_ratio: f64,
    /// After its submits, how long each client keeps polling its own tasks (faults still on)
    /// until it has seen every one terminal. Then injection stops and the drain begins.
    pub settle_timeout: Duration,
    /// How long a worker's claim on a task lasts.
    pub lease: Duration,
    /// How long a received message stays hidden.
    pub visibility: Duration,
    /// How long a task may wait on possibly lost work before the sweeper re-enqueues it.
    pub sweep_after: Duration,
    /// How often the sweeper runs.
    pub sweep_interval: Duration,
    /// How long an unfinished idempotency reservation blocks a retry.
    pub idempotency_in_flight: Duration,
    /// Longest drain after the load (injection off) before the check runs anyway.
    pub drain_timeout: Duration,
    /// Attempts of one submit or cancel before the client gives up on it.
    pub max_request_attempts: u32,
    /// Timeout of one HTTP request.
    pub request_timeout: Duration,
}

impl Default for SoakOptions {
    /// The run: 10,000 tasks, 50 clients, 10 accounts, 5% failures, 10% duplicates,
    /// 2% worker crashes.
    fn default() -> Self {
        SoakOptions {
            tasks: 10_000,
            clients: 50,
            accounts: 10,
            seed: 1,
            workers: 8,
            fail: 0.05,
            duplicate: 0.10,
            crash: 0.02,
            delay: 0.05,
            max_delay: Duration::from_millis(20),
            cancel_ratio: 0.10,
            fail_ratio: 0.10,
            slow_ratio: 0.05,
            max_sleep_ms: 300,
            image_ratio: 0.03,
            video_ratio: 0.02,
            replay_ratio: 0.05,
            poll_ratio: 1.0,
            settle_timeout: Duration::from_secs(120),
            lease: Duration::from_secs(2),
            visibility: Duration::from_secs(3),
            sweep_after: Duration::from_secs(3),
            sweep_interval: Duration::from_millis(500),
            idempotency_in_flight: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(180),
            max_request_attempts: 200,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Which request an [`Answer`] answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// `POST /v1/tasks` (a first send, a retry or a replay with the same key).
    Submit,
    /// `GET /v1/tasks/{id}` while the load runs.
    Poll,
    /// `POST /v1/tasks/{id}/cancel`.
    Cancel,
    /// `GET /v1/tasks/{id}` while draining.
    Drain,
    /// One task of a `GET /v1/tasks` page after the drain.
    List,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Submit => "submit",
            Op::Poll => "poll",
            Op::Cancel => "cancel",
            Op::Drain => "drain",
            Op::List => "list",
        }
    }
}

/// What an answer showed of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Its state.
    pub status: TaskStatus,
    /// `completed_at` as the API wrote it (RFC 3339, milliseconds).
    pub completed_at: Option<String>,
    /// `cost.refunded`.
    pub refunded: bool,
    /// `cost.credits`.
    pub credits: u64,
}

impl Seen {
    /// Reads a task object of the API; `None` when `v` is not one.
    pub fn from_view(v: &Value) -> Option<Seen> {
        Some(Seen {
            status: TaskStatus::parse(v["status"].as_str()?)?,
            completed_at: v["completed_at"].as_str().map(str::to_string),
            refunded: v["cost"]["refunded"].as_bool()?,
            credits: v["cost"]["credits"].as_u64()?,
        })
    }

    /// What the API shows of a stored task.
    pub fn from_task(t: &Task) -> Seen {
        Seen {
            status: t.status,
            completed_at: t.completed_at.map(rfc3339),
            refunded: t.cost.refunded,
            credits: t.cost.credits,
        }
    }
}

/// One recorded answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The client that asked (`None`: the drain or the final read).
    pub client: Option<usize>,
    /// The request.
    pub op: Op,
    /// The `Idempotency-Key` of a submit.
    pub key: Option<String>,
    /// The task asked about, or the one the answer named.
    pub task_id: Option<String>,
    /// When the request was sent, since the run started.
    pub sent: Duration,
    /// When the answer was read, since the run started.
    pub received: Duration,
    /// HTTP status; `None` when no answer came (transport failure).
    pub http: Option<u16>,
    /// The API error code, or `transport: <kind>` when no answer came.
    pub error: Option<String>,
    /// The task the answer carried.
    pub seen: Option<Seen>,
}

impl Answer {
    fn status_label(&self) -> String {
        match self.http {
            Some(s) => s.to_string(),
            None => "transport".to_string(),
        }
    }

    fn describe(&self) -> String {
        let what = match &self.seen {
            Some(s) => format!(
                "{} (completed_at {}, refunded {})",
                s.status,
                s.completed_at.as_deref().unwrap_or("none"),
                s.refunded
            ),
            None => self.error.clone().unwrap_or_default(),
        };
        format!(
            "{} {} at {:.3}-{:.3}s: {}",
            self.op.as_str(),
            self.status_label(),
            self.sent.as_secs_f64(),
            self.received.as_secs_f64(),
            what
        )
    }
}

/// An account as the check sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountState {
    /// Account id.
    pub id: String,
    /// Credits the run granted it.
    pub granted: u64,
    /// Its `granted` total as stored.
    pub stored_granted: u64,
    /// Its credits as stored after the drain.
    pub credits: u64,
}

/// The properties [`check`] verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Check {
    /// (a) Every acknowledged task is stored and terminal; every stored task is terminal.
    NoTaskLost,
    /// (b) No task was seen in two different terminal states.
    OneTerminalState,
    /// (c) Once terminal, every later read and the store show the same state and `completed_at`.
    TerminalUnchanged,
    /// (d) Every acknowledged cancel ended `cancelled`; no refused cancel did.
    CancelsHeld,
    /// (e) `cost.refunded` exactly on failed and cancelled tasks.
    Refunds,
    /// (f) `credits + charged_not_refunded == granted` for every account.
    Credits,
    /// (g) One idempotency key never answered two different tasks.
    OneTaskPerKey,
}

impl Check {
    /// Every check, in report order.
    pub const ALL: [Check; 7] = [
        Check::NoTaskLost,
        Check::OneTerminalState,
        Check::TerminalUnchanged,
        Check::CancelsHeld,
        Check::Refunds,
        Check::Credits,
        Check::OneTaskPerKey,
    ];

    /// Its label in the report.
    pub fn label(self) -> &'static str {
        match self {
            Check::NoTaskLost => "(a) no task lost",
            Check::OneTerminalState => "(b) no task in two terminal states",
            Check::TerminalUnchanged => "(c) no terminal state changed",
            Check::CancelsHeld => "(d) every acknowledged cancel held",
            Check::Refunds => "(e) refunded exactly the failed and cancelled tasks",
            Check::Credits => "(f) credits + charged_not_refunded == granted",
            Check::OneTaskPerKey => "(g) one task per idempotency key",
        }
    }
}

/// One broken property, with what shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The property.
    pub check: Check,
    /// The task (or account id for [`Check::Credits`]) concerned.
    pub subject: String,
    /// What was seen.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.check.label(),
            self.subject,
            self.detail
        )
    }
}

/// The figures behind each check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckFigures {
    /// Tasks a client got a `202` for.
    pub acknowledged: usize,
    /// Tasks in the store (the run's accounts).
    pub stored: usize,
    /// Stored tasks no client got a `202` for (e.g. created, then the answer was lost).
    pub stored_unacknowledged: usize,
    /// Answers that carried a task.
    pub observations: usize,
    /// Tasks those answers were about.
    pub observed_tasks: usize,
    /// Answers that showed a terminal task.
    pub terminal_observations: usize,
    /// Cancels answered `200` with the task `cancelled`.
    pub cancels_acknowledged: usize,
    /// Cancels answered `409 not_cancellable`.
    pub cancels_refused: usize,
    /// Stored tasks refunded.
    pub refunded: usize,
    /// Accounts checked.
    pub accounts: usize,
    /// Sum of the accounts' granted credits.
    pub granted: u64,
    /// Sum of their credits after the drain.
    pub credits: u64,
    /// Sum of the credits of their tasks not refunded.
    pub charged_not_refunded: u64,
    /// Idempotency keys with a `202`.
    pub keys: usize,
    /// `202` answers to a key that had already been answered (replays and retries).
    pub replayed_answers: usize,
}

/// What [`check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checked {
    /// The figures behind each check.
    pub figures: CheckFigures,
    /// Every violation found (empty when all checks pass).
    pub violations: Vec<Violation>,
}

impl Checked {
    /// Violations of `check`.
    pub fn of(&self, check: Check) -> impl Iterator<Item = &Violation> {
        self.violations.iter().filter(move |v| v.check == check)
    }

    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

fn is_ack(a: &Answer) -> bool {
    a.op == Op::Submit && matches!(a.http, Some(200 | 202)) && a.seen.is_some()
}

fn refund_expected(s: TaskStatus) -> bool {
    matches!(s, TaskStatus::Failed | TaskStatus::Cancelled)
}

fn history_of(obs: &[&Answer]) -> String {
    let mut sorted: Vec<&&Answer> = obs.iter().collect();
    sorted.sort_by_key(|a| (a.received, a.sent));
    let lines: Vec<String> = sorted.iter().map(|a| a.describe()).collect();
    lines.join("; ")
}

/// Judges a run: `history` (every answer), `stored` (every task of the run's accounts as the
/// store holds it after the drain) and `accounts`. Pure: no I/O.
pub fn check(history: &[Answer], stored: &[Task], accounts: &[AccountState]) -> Checked {
    let mut v: Vec<Violation> = Vec::new();
    let mut push = |check: Check, subject: &str, detail: String| {
        v.push(Violation {
            check,
            subject: subject.to_string(),
            detail,
        })
    };
    let mut f = CheckFigures::default();
    let stored_by_id: HashMap<&str, &Task> = stored.iter().map(|t| (t.id.as_str(), t)).collect();
    let mut by_task: BTreeMap<&str, Vec<&Answer>> = BTreeMap::new();
    for a in history {
        if let (Some(id), Some(_)) = (&a.task_id, &a.seen) {
            by_task.entry(id.as_str()).or_default().push(a);
        }
    }
    let acknowledged: BTreeSet<&str> = history
        .iter()
        .filter(|a| is_ack(a))
        .filter_map(|a| a.task_id.as_deref())
        .collect();
    f.acknowledged = acknowledged.len();
    f.stored = stored.len();
    f.stored_unacknowledged = stored
        .iter()
        .filter(|t| !acknowledged.contains(t.id.as_str()))
        .count();
    f.observations = by_task.values().map(Vec::len).sum();
    f.observed_tasks = by_task.len();

    // (a) no task lost.
    for id in &acknowledged {
        match stored_by_id.get(id) {
            None => push(
                Check::NoTaskLost,
                id,
                format!(
                    "acknowledged but not in the store; history: {}",
                    history_of(by_task.get(id).map_or(&[][..], Vec::as_slice))
                ),
            ),
            Some(t) if !t.status.is_terminal() => push(
                Check::NoTaskLost,
                id,
                format!(
                    "acknowledged, still {} after the drain (attempts {}); history: {}",
                    t.status,
                    t.attempts,
                    history_of(by_task.get(id).map_or(&[][..], Vec::as_slice))
                ),
            ),
            Some(_) => {}
        }
    }
    for t in stored {
        if !t.status.is_terminal() && !acknowledged.contains(t.id.as_str()) {
            push(
                Check::NoTaskLost,
                &t.id,
                format!(
                    "stored (never acknowledged) and still {} after the drain",
                    t.status
                ),
            );
        }
    }
    for a in history {
        if let Some(id) = a.task_id.as_deref()
            && a.http == Some(404)
            && acknowledged.contains(id)
        {
            push(
                Check::NoTaskLost,
                id,
                format!("an acknowledged task answered 404: {}", a.describe()),
            );
        }
    }

    // (b), (c) and (e) over what answers showed.
    for (id, obs) in &by_task {
        let stored = stored_by_id.get(id).copied();
        let terminal: Vec<&&Answer> = obs
            .iter()
            .filter(|a| a.seen.as_ref().is_some_and(|s| s.status.is_terminal()))
            .collect();
        f.terminal_observations += terminal.len();
        let mut states: BTreeSet<&str> = terminal
            .iter()
            .filter_map(|a| a.seen.as_ref().map(|s| s.status.as_str()))
            .collect();
        if let Some(t) = stored.filter(|t| t.status.is_terminal()) {
            states.insert(t.status.as_str());
        }
        if states.len() > 1 {
            push(
                Check::OneTerminalState,
                id,
                format!(
                    "seen {}; store: {}; history: {}",
                    states.into_iter().collect::<Vec<_>>().join(" and "),
                    stored.map_or("missing".to_string(), |t| t.status.to_string()),
                    history_of(obs)
                ),
            );
        }
        if let Some(first) = terminal.iter().min_by_key(|a| (a.received, a.sent)) {
            let first_seen = first
                .seen
                .as_ref()
                .expect("terminal observations carry a task");
            for o in &terminal {
                let s = o.seen.as_ref().expect("terminal observations carry a task");
                if s.status == first_seen.status && s.completed_at != first_seen.completed_at {
                    push(
                        Check::TerminalUnchanged,
                        id,
                        format!(
                            "completed_at changed from {:?} to {:?}; history: {}",
                            first_seen.completed_at,
                            s.completed_at,
                            history_of(obs)
                        ),
                    );
                }
            }
            for o in obs.iter() {
                let s = o.seen.as_ref().expect("observations carry a task");
                if !s.status.is_terminal() && o.sent > first.received {
                    push(
                        Check::TerminalUnchanged,
                        id,
                        format!(
                            "{} at {:.3}s, then {} to a request sent at {:.3}s; history: {}",
                            first_seen.status,
                            first.received.as_secs_f64(),
                            s.status,
                            o.sent.as_secs_f64(),
                            history_of(obs)
                        ),
                    );
                }
            }
            if let Some(t) = stored {
                let now = Seen::from_task(t);
                if now.status != first_seen.status || now.completed_at != first_seen.completed_at {
                    push(
                        Check::TerminalUnchanged,
                        id,
                        format!(
                            "seen {} (completed_at {:?}), stored {} (completed_at {:?}); history: {}",
                            first_seen.status,
                            first_seen.completed_at,
                            now.status,
                            now.completed_at,
                            history_of(obs)
                        ),
                    );
                }
            }
        }
        for o in obs.iter() {
            let s = o.seen.as_ref().expect("observations carry a task");
            if s.refunded != refund_expected(s.status) {
                push(
                    Check::Refunds,
                    id,
                    format!(
                        "answer showed {} with refunded {}: {}",
                        s.status,
                        s.refunded,
                        o.describe()
                    ),
                );
            }
        }
    }

    // (e) over the store.
    for t in stored {
        if t.cost.refunded {
            f.refunded += 1;
        }
        if t.cost.refunded != refund_expected(t.status) {
            push(
                Check::Refunds,
                &t.id,
                format!("stored {} with refunded {}", t.status, t.cost.refunded),
            );
        }
    }

    // (d) cancels.
    let mut acked_cancels = BTreeSet::new();
    let mut refused_cancels = BTreeSet::new();
    for a in history.iter().filter(|a| a.op == Op::Cancel) {
        let Some(id) = a.task_id.as_deref() else {
            continue;
        };
        let acked = a.http == Some(200)
            && a.seen
                .as_ref()
                .is_some_and(|s| s.status == TaskStatus::Cancelled);
        let refused = a.http == Some(409) && a.error.as_deref() == Some("not_cancellable");
        if acked {
            acked_cancels.insert(id);
        } else if refused {
            refused_cancels.insert(id);
        }
    }
    f.cancels_acknowledged = acked_cancels.len();
    f.cancels_refused = refused_cancels.len();
    for id in &acked_cancels {
        let end = stored_by_id.get(id).map(|t| t.status);
        if end != Some(TaskStatus::Cancelled) {
            push(
                Check::CancelsHeld,
                id,
                format!(
                    "cancel acknowledged, stored {}; history: {}",
                    end.map_or("missing".to_string(), |s| s.to_string()),
                    history_of(by_task.get(id).map_or(&[][..], Vec::as_slice))
                ),
            );
        }
    }
    for id in &refused_cancels {
        if stored_by_id.get(id).map(|t| t.status) == Some(TaskStatus::Cancelled) {
            push(
                Check::CancelsHeld,
                id,
                format!(
                    "cancel refused (409 not_cancellable), yet stored cancelled; history: {}",
                    history_of(by_task.get(id).map_or(&[][..], Vec::as_slice))
                ),
            );
        }
    }

    // (f) credits.
    let mut charged: HashMap<&str, u64> = HashMap::new();
    for t in stored.iter().filter(|t| !t.cost.refunded) {
        *charged.entry(t.account_id.as_str()).or_default() += t.cost.credits;
    }
    f.accounts = accounts.len();
    for a in accounts {
        let c = charged.get(a.id.as_str()).copied().unwrap_or(0);
        f.granted += a.granted;
        f.credits += a.credits;
        f.charged_not_refunded += c;
        if a.credits + c != a.granted {
            push(
                Check::Credits,
                &a.id,
                format!(
                    "credits {} + charged_not_refunded {c} = {} != granted {}",
                    a.credits,
                    a.credits + c,
                    a.granted
                ),
            );
        }
        if a.stored_granted != a.granted {
            push(
                Check::Credits,
                &a.id,
                format!(
                    "granted {} but the store says {}",
                    a.granted, a.stored_granted
                ),
            );
        }
    }

    // (g) one task per idempotency key.
    let mut keys: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut acks = 0;
    for a in history.iter().filter(|a| is_ack(a)) {
        if let (Some(k), Some(id)) = (a.key.as_deref(), a.task_id.as_deref()) {
            keys.entry(k).or_default().insert(id);
            acks += 1;
        }
    }
    f.keys = keys.len();
    f.replayed_answers = acks - keys.len().min(acks);
    for (k, ids) in &keys {
        if ids.len() > 1 {
            push(
                Check::OneTaskPerKey,
                k,
                format!(
                    "answered {} tasks: {}",
                    ids.len(),
                    ids.iter().copied().collect::<Vec<_>>().join(", ")
                ),
            );
        }
    }

    Checked {
        figures: f,
        violations: v,
    }
}

/// Everything a soak run measured and found.
#[derive(Debug, Clone)]
pub struct SoakReport {
    /// The options it ran with.
    pub options: SoakOptions,
    /// Which backends it ran on.
    pub backend: String,
    /// Submit operations started (one idempotency key each).
    pub submits: usize,
    /// Submits answered `202`.
    pub acknowledged: usize,
    /// Submits answered definitively with something else than `202`.
    pub refused: usize,
    /// Submits given up after `max_request_attempts` retryable answers.
    pub abandoned: usize,
    /// Replays sent (a second submit with the same key and body).
    pub replays: usize,
    /// Requests sent again after a retryable answer (`503`, `429`, `409 idempotency_in_progress`,
    /// `5xx`, transport failure).
    pub retries: u64,
    /// Cancels sent (the first try of each).
    pub cancels_sent: usize,
    /// Answers recorded, by HTTP status (`transport` for none).
    pub answers: BTreeMap<String, u64>,
    /// Answers recorded, by request and HTTP status.
    pub answers_by_op: BTreeMap<(Op, String), u64>,
    /// Stored tasks by terminal (or not) status.
    pub outcomes: BTreeMap<String, u64>,
    /// Failed tasks by `error.code`.
    pub failure_codes: BTreeMap<String, u64>,
    /// Tasks that needed more than one processing attempt.
    pub retaken: usize,
    /// What the fault injector did.
    pub chaos: ChaosCounts,
    /// From the first submit to the last client's last submit.
    pub submit_phase: Duration,
    /// Length of the load phase: submits, then each client polling its own tasks (faults
    /// still on) until it has seen them all terminal.
    pub load: Duration,
    /// Whether every client saw all its tasks terminal while faults were still injected.
    pub settled_under_faults: bool,
    /// Length of the drain.
    pub drain: Duration,
    /// Whether the drain ended with every task terminal (rather than at its deadline).
    pub drained: bool,
    /// Length of the whole run, server start to check.
    pub elapsed: Duration,
    /// The check.
    pub checked: Checked,
}

impl SoakReport {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.checked.passed()
    }

    fn figures_of(&self, c: Check) -> String {
        let f = &self.checked.figures;
        match c {
            Check::NoTaskLost => format!(
                "{} acknowledged tasks stored and terminal; {} stored tasks ({} never acknowledged to a client) all terminal",
                f.acknowledged, f.stored, f.stored_unacknowledged
            ),
            Check::OneTerminalState => format!(
                "{} answers about {} tasks, {} showing a terminal state",
                f.observations, f.observed_tasks, f.terminal_observations
            ),
            Check::TerminalUnchanged => format!(
                "{} terminal observations agree with each other, later reads and the store (state and completed_at)",
                f.terminal_observations
            ),
            Check::CancelsHeld => format!(
                "{} acknowledged cancels ended cancelled; {} refused cancels (409) did not",
                f.cancels_acknowledged, f.cancels_refused
            ),
            Check::Refunds => format!(
                "{} refunded tasks, exactly the failed and cancelled ones",
                f.refunded
            ),
            Check::Credits => format!(
                "{} accounts: credits {} + charged_not_refunded {} = {} == granted {}",
                f.accounts,
                f.credits,
                f.charged_not_refunded,
                f.credits + f.charged_not_refunded,
                f.granted
            ),
            Check::OneTaskPerKey => format!(
                "{} keys acknowledged, {} further 202 answers to an answered key named the same task",
                f.keys, f.replayed_answers
            ),
        }
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn join_counts(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        let c = &self.chaos;
        writeln!(
            f,
            "tasklane soak: {} tasks, {} clients, {} accounts, seed {}, {} workers, {}",
            o.tasks, o.clients, o.accounts, o.seed, o.workers, self.backend
        )?;
        writeln!(
            f,
            "  faults asked:   fail {} of store/queue calls, duplicate {} of enqueues, crash {} of worker calls, delay {} (up to {} ms)",
            pct(o.fail),
            pct(o.duplicate),
            pct(o.crash),
            pct(o.delay),
            o.max_delay.as_millis()
        )?;
        writeln!(
            f,
            "  mix asked:      cancel {}, fail {}, slow {} (up to {} ms), demo-image {}, veo3 {}, replay {}, poll {} per submit",
            pct(o.cancel_ratio),
            pct(o.fail_ratio),
            pct(o.slow_ratio),
            o.max_sleep_ms,
            pct(o.image_ratio),
            pct(o.video_ratio),
            pct(o.replay_ratio),
            o.poll_ratio
        )?;
        let calls = c.calls.max(1) as f64;
        writeln!(
            f,
            "  injected:       {} store/queue calls: {} failed ({}), {} duplicate deliveries, {} worker crashes, {} delayed",
            c.calls,
            c.failed,
            pct(c.failed as f64 / calls),
            c.duplicated,
            c.crashed,
            c.delayed
        )?;
        let submitting = self.submit_phase.as_secs_f64().max(1e-9);
        writeln!(
            f,
            "  submits:        {} sent, {} acknowledged, {} refused, {} abandoned, in {:.1} s ({:.1} acknowledged submits/s)",
            self.submits,
            self.acknowledged,
            self.refused,
            self.abandoned,
            submitting,
            self.acknowledged as f64 / submitting
        )?;
        writeln!(
            f,
            "  load:           {:.1} s until {} (faults on)",
            self.load.as_secs_f64(),
            if self.settled_under_faults {
                "every client had seen all its tasks terminal"
            } else {
                "the settle timeout, some tasks not yet seen terminal"
            }
        )?;
        writeln!(
            f,
            "  requests:       {} answers recorded ({}); {} retries with the same key or cancel; {} replays",
            self.answers.values().sum::<u64>(),
            join_counts(&self.answers),
            self.retries,
            self.replays
        )?;
        for op in [Op::Submit, Op::Poll, Op::Cancel, Op::Drain, Op::List] {
            let m: BTreeMap<String, u64> = self
                .answers_by_op
                .iter()
                .filter(|((o, _), _)| *o == op)
                .map(|((_, s), n)| (s.clone(), *n))
                .collect();
            if !m.is_empty() {
                writeln!(f, "    {:<7} {}", op.as_str(), join_counts(&m))?;
            }
        }
        writeln!(
            f,
            "  cancels:        {} sent, {} acknowledged, {} refused (409 not_cancellable)",
            self.cancels_sent,
            self.checked.figures.cancels_acknowledged,
            self.checked.figures.cancels_refused
        )?;
        writeln!(
            f,
            "  drain:          {:.1} s with faults off, {}",
            self.drain.as_secs_f64(),
            if self.drained {
                "every task terminal"
            } else {
                "DEADLINE REACHED with tasks still open"
            }
        )?;
        writeln!(f, "  outcomes:       {}", join_counts(&self.outcomes))?;
        writeln!(f, "  failures:       {}", join_counts(&self.failure_codes))?;
        writeln!(
            f,
            "  retaken:        {} tasks needed more than one processing attempt",
            self.retaken
        )?;
        let total = self.elapsed.as_secs_f64().max(1e-9);
        writeln!(
            f,
            "  elapsed:        {:.1} s in all ({:.1} tasks/s to a terminal state, load and drain)",
            total,
            self.checked.figures.stored as f64 / total
        )?;
        writeln!(f, "checks:")?;
        for check in Check::ALL {
            let found: Vec<&Violation> = self.checked.of(check).collect();
            if found.is_empty() {
                writeln!(f, "  PASS {}: {}", check.label(), self.figures_of(check))?;
            } else {
                writeln!(
                    f,
                    "  FAIL {}: {} violations ({})",
                    check.label(),
                    found.len(),
                    self.figures_of(check)
                )?;
                for v in found.iter().take(20) {
                    writeln!(f, "    - {}: {}", v.subject, v.detail)?;
                }
                if found.len() > 20 {
                    writeln!(f, "    - ... and {} more", found.len() - 20)?;
                }
            }
        }
        write!(
            f,
            "result: {}",
            if self.passed() {
                "PASS".to_string()
            } else {
                format!("FAIL ({} violations)", self.checked.violations.len())
            }
        )
    }
}

/// The server side the clients share.
struct Shared {
    http: Client,
    base: String,
    keys: Vec<String>,
    start: Instant,
    opts: SoakOptions,
    remaining: AtomicUsize,
}

type Sent = Result<(u16, Value), String>;

/// A client-side failure as a short label (`transport: timeout`, `connect`, `body`, `request`),
/// shared with `tasklane-bench`.
pub fn transport_kind(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    };
    format!("transport: {kind}")
}

fn retryable(res: &Sent) -> bool {
    match res {
        Err(_) => true,
        Ok((s, body)) => {
            matches!(s, 429 | 500 | 502 | 503 | 504)
                || (*s == 409 && body["error"]["code"] == "idempotency_in_progress")
        }
    }
}

fn backoff(attempt: u32, rng: &mut StdRng) -> Duration {
    let base = (10u64 << attempt.min(6)).min(500);
    Duration::from_millis(base / 2 + rng.random_range(0..=base / 2))
}

impl Shared {
    async fn send(&self, req: reqwest::RequestBuilder) -> (Duration, Duration, Sent) {
        let sent = self.start.elapsed();
        let res = match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                match resp.bytes().await {
                    Ok(b) => Ok((status, serde_json::from_slice(&b).unwrap_or(Value::Null))),
                    Err(e) => Err(transport_kind(&e)),
                }
            }
            Err(e) => Err(transport_kind(&e)),
        };
        (sent, self.start.elapsed(), res)
    }

    fn record(
        client: Option<usize>,
        op: Op,
        key: Option<&str>,
        task_id: Option<&str>,
        (sent, received, res): &(Duration, Duration, Sent),
    ) -> Answer {
        let (http, error, seen, named) = match res {
            Ok((s, body)) => (
                Some(*s),
                body["error"]["code"].as_str().map(str::to_string),
                Seen::from_view(body),
                body["task_id"].as_str().map(str::to_string),
            ),
            Err(kind) => (None, Some(kind.clone()), None, None),
        };
        Answer {
            client,
            op,
            key: key.map(str::to_string),
            task_id: task_id.map(str::to_string).or(named),
            sent: *sent,
            received: *received,
            http,
            error,
            seen,
        }
    }

    fn get(&self, acct: usize, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.keys[acct])
    }

    fn post(&self, acct: usize, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.keys[acct])
            .json(body)
    }
}

/// What one client did.
#[derive(Default)]
struct ClientRun {
    answers: Vec<Answer>,
    submits: usize,
    acknowledged: usize,
    refused: usize,
    abandoned: usize,
    replays: usize,
    retries: u64,
    cancels_sent: usize,
    /// When its submits were done, since the run started.
    submitted: Duration,
    /// When it had seen each of its tasks terminal (`None`: not within `settle_timeout`).
    settled: Option<Duration>,
}

impl ClientRun {
    /// Sends `make()` until a definitive answer (or the attempt cap); returns the last answer.
    async fn until_definitive(
        &mut self,
        shared: &Shared,
        rng: &mut StdRng,
        who: (usize, Op),
        key: Option<&str>,
        task_id: Option<&str>,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> Option<Answer> {
        for attempt in 0..shared.opts.max_request_attempts {
            if attempt > 0 {
                self.retries += 1;
                tokio::time::sleep(backoff(attempt, rng)).await;
            }
            let sent = shared.send(make()).await;
            let answer = Shared::record(Some(who.0), who.1, key, task_id, &sent);
            self.answers.push(answer.clone());
            if !retryable(&sent.2) {
                return Some(answer);
            }
        }
        None
    }
}

/// A submit body drawn from the mix.
fn pick_body(rng: &mut StdRng, o: &SoakOptions, client: usize, n: usize) -> Value {
    let prompt = format!("soak {client}-{n}");
    let r: f64 = rng.random();
    let mut edge = o.fail_ratio;
    if r < edge {
        return json!({"model": "echo", "prompt": prompt, "params": {"fail": "asked to fail by the soak run"}});
    }
    edge += o.slow_ratio;
    if r < edge {
        let ms = rng.random_range(1..=o.max_sleep_ms.max(1));
        return json!({"model": "echo", "prompt": prompt, "params": {"sleep_ms": ms}});
    }
    edge += o.image_ratio;
    if r < edge {
        return json!({"model": "demo-image", "prompt": prompt, "params": {"width": 16, "height": 16}});
    }
    edge += o.video_ratio;
    if r < edge {
        return json!({"model": "veo3", "prompt": prompt, "duration": 1, "params": {"fps": 4}});
    }
    json!({"model": "echo", "prompt": prompt})
}

async fn client_loop(shared: Arc<Shared>, c: usize) -> ClientRun {
    let o = shared.opts.clone();
    let acct = c % shared.keys.len();
    let mut rng =
        StdRng::seed_from_u64(o.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (c as u64 + 1));
    let mut run = ClientRun::default();
    let mut mine: Vec<String> = Vec::new();
    let mut n = 0usize;
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let note = |finished: &mut BTreeSet<String>, a: &Answer| {
        if let (Some(id), Some(s)) = (&a.task_id, &a.seen)
            && s.status.is_terminal()
        {
            finished.insert(id.clone());
        }
    };
    while shared
        .remaining
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
            left.checked_sub(1)
        })
        .is_ok()
    {
        n += 1;
        run.submits += 1;
        let body = pick_body(&mut rng, &o, c, n);
        let key = format!("soak-{}-{c}-{n}", o.seed);
        let submit = || {
            shared
                .post(acct, "/tasks", &body)
                .header("Idempotency-Key", &key)
        };
        let answer = run
            .until_definitive(
                &shared,
                &mut rng,
                (c, Op::Submit),
                Some(&key),
                None,
                &submit,
            )
            .await;
        let id = match &answer {
            Some(a) if is_ack(a) => a.task_id.clone(),
            Some(_) => {
                run.refused += 1;
                None
            }
            None => {
                run.abandoned += 1;
                // Give the slot back: the run is about acknowledged submits.
                shared.remaining.fetch_add(1, Ordering::AcqRel);
                None
            }
        };
        if let Some(id) = id {
            run.acknowledged += 1;
            mine.push(id.clone());
            if rng.random_bool(o.cancel_ratio.clamp(0.0, 1.0)) {
                run.cancels_sent += 1;
                let path = format!("/tasks/{id}/cancel");
                let empty = json!({});
                let cancel = || shared.post(acct, &path, &empty);
                run.until_definitive(&shared, &mut rng, (c, Op::Cancel), None, Some(&id), cancel)
                    .await;
            }
            if rng.random_bool(o.replay_ratio.clamp(0.0, 1.0)) {
                run.replays += 1;
                run.until_definitive(
                    &shared,
                    &mut rng,
                    (c, Op::Submit),
                    Some(&key),
                    None,
                    &submit,
                )
                .await;
            }
        }
        if !mine.is_empty() && rng.random_bool(o.poll_ratio.clamp(0.0, 1.0)) {
            let id = mine[rng.random_range(0..mine.len())].clone();
            let sent = shared.send(shared.get(acct, &format!("/tasks/{id}"))).await;
            run.answers
                .push(Shared::record(Some(c), Op::Poll, None, Some(&id), &sent));
        }
    }
    run.submitted = shared.start.elapsed();

    // Settle, faults still on: poll every own task until each has been seen terminal.
    for a in &run.answers {
        note(&mut finished, a);
    }
    let deadline = Instant::now() + o.settle_timeout;
    loop {
        let open: Vec<&String> = mine.iter().filter(|id| !finished.contains(*id)).collect();
        if open.is_empty() {
            run.settled = Some(shared.start.elapsed());
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        let open: Vec<String> = open.into_iter().cloned().collect();
        for id in open {
            let sent = shared.send(shared.get(acct, &format!("/tasks/{id}"))).await;
            let a = Shared::record(Some(c), Op::Poll, None, Some(&id), &sent);
            note(&mut finished, &a);
            run.answers.push(a);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    run
}

/// Reads every task of `accounts` from the store, newest first per account.
async fn stored_tasks(app: &App, accounts: &[String]) -> anyhow::Result<Vec<Task>> {
    let mut all = Vec::new();
    for acct in accounts {
        let mut before = None;
        loop {
            let q = ListQuery {
                limit: 100,
                before: before.clone(),
                ..ListQuery::default()
            };
            let page = app
                .store
                .list_tasks(acct, &q)
                .await
                .with_context(|| format!("listing the tasks of {acct}"))?;
            all.extend(page.tasks);
            match page.next_before {
                Some(b) => before = Some(b),
                None => break,
            }
        }
    }
    Ok(all)
}

/// GETs every task in `ids` (`clients` at a time) and records the answers as `op`.
async fn read_all(shared: &Arc<Shared>, ids: Vec<(usize, String)>, op: Op) -> Vec<Answer> {
    let queue = Arc::new(Mutex::new(ids));
    let mut set = JoinSet::new();
    for _ in 0..shared.opts.clients.max(1) {
        let (shared, queue) = (shared.clone(), queue.clone());
        set.spawn(async move {
            let mut out = Vec::new();
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop());
                let Some((acct, id)) = next else {
                    break;
                };
                let sent = shared.send(shared.get(acct, &format!("/tasks/{id}"))).await;
                out.push(Shared::record(None, op, None, Some(&id), &sent));
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(out) = r {
            all.extend(out);
        }
    }
    all
}

/// Lists every task of account `acct` through the API (`GET /v1/tasks`), one answer per task.
async fn list_all(shared: &Shared, acct: usize) -> anyhow::Result<Vec<Answer>> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/tasks?limit=100&cursor={c}"),
            None => "/tasks?limit=100".to_string(),
        };
        let mut page = None;
        for attempt in 0..shared.opts.max_request_attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let (sent, received, res) = shared.send(shared.get(acct, &path)).await;
            match res {
                Ok((200, body)) => {
                    page = Some((sent, received, body));
                    break;
                }
                other if retryable(&other) => continue,
                other => anyhow::bail!("GET /v1{path} answered {other:?}"),
            }
        }
        let (sent, received, body) = page.with_context(|| format!("GET /v1{path} kept failing"))?;
        for item in body["data"].as_array().map_or(&[][..], Vec::as_slice) {
            let id = item["task_id"].as_str();
            let one = (sent, received, Ok((200, item.clone())));
            out.push(Shared::record(None, Op::List, None, id, &one));
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    Ok(out)
}

/// Runs a soak: starts a server on `backends` (the embedded ones when `None`) with its data in
/// `data_dir`, drives it as [`SoakOptions`] say, drains, checks and shuts it down.
pub async fn run(
    opts: SoakOptions,
    backends: Option<Backends>,
    data_dir: &Path,
) -> anyhow::Result<SoakReport> {
    anyhow::ensure!(opts.tasks >= 1, "tasks must be at least 1");
    anyhow::ensure!(opts.clients >= 1, "clients must be at least 1");
    anyhow::ensure!(opts.accounts >= 1, "accounts must be at least 1");
    let backend = if backends.is_some() {
        "backends supplied by the caller".to_string()
    } else {
        format!("embedded backends (SQLite in {})", data_dir.display())
    };
    let run_start = Instant::now();
    let chaos = Chaos::new(ChaosConfig {
        seed: opts.seed,
        fail: opts.fail,
        duplicate: opts.duplicate,
        delay: opts.delay,
        max_delay: opts.max_delay,
        crash: opts.crash,
    });
    // Off while the accounts are created; on for the load.
    chaos.set_enabled(false);
    let mut cfg = LocalConfig {
        addr: "127.0.0.1:0".parse()?,
        data_dir: data_dir.to_path_buf(),
        workers: opts.workers.max(1),
        demo_time_scale: 0.2,
        shutdown_grace: Duration::from_secs(10),
        ..LocalConfig::default()
    };
    cfg.core.rate_limit = None;
    cfg.core.max_open_tasks = (opts.tasks as u64).saturating_mul(2).max(1000);
    cfg.core.lease = opts.lease;
    cfg.core.visibility = opts.visibility;
    cfg.core.sweep_after = opts.sweep_after;
    cfg.core.sweep_interval = opts.sweep_interval;
    cfg.core.idempotency_in_flight = opts.idempotency_in_flight;
    cfg.core.callback_allow_private = true;
    let running = crate::start_on(cfg, backends, Hooks::chaos(chaos.clone()))
        .await
        .context("starting the server")?;
    let app = running.app.clone();

    // Accounts with enough credits for every task they may be given (veo3 costs 10).
    let per_account = opts.tasks.div_ceil(opts.accounts) as u64;
    let granted = per_account * 20 + 100;
    let mut keys = Vec::new();
    let mut account_ids = Vec::new();
    for _ in 0..opts.accounts {
        let new = Account::create(granted, None);
        app.store
            .create_account(&new.account)
            .await
            .context("creating an account")?;
        keys.push(new.api_key);
        account_ids.push(new.account.id);
    }

    let http = Client::builder()
        .pool_max_idle_per_host(opts.clients)
        .timeout(opts.request_timeout)
        .build()
        .context("building the HTTP client")?;
    let shared = Arc::new(Shared {
        http,
        base: running.base_url.clone(),
        keys,
        start: Instant::now(),
        opts: opts.clone(),
        remaining: AtomicUsize::new(opts.tasks),
    });

    // Load.
    chaos.set_enabled(true);
    let mut set = JoinSet::new();
    for c in 0..opts.clients {
        set.spawn(client_loop(shared.clone(), c));
    }
    let mut history = Vec::new();
    let mut totals = ClientRun::default();
    let mut all_settled = true;
    while let Some(r) = set.join_next().await {
        let r = r.context("a client task panicked")?;
        history.extend(r.answers);
        totals.submits += r.submits;
        totals.acknowledged += r.acknowledged;
        totals.refused += r.refused;
        totals.abandoned += r.abandoned;
        totals.replays += r.replays;
        totals.retries += r.retries;
        totals.cancels_sent += r.cancels_sent;
        totals.submitted = totals.submitted.max(r.submitted);
        all_settled &= r.settled.is_some();
    }
    let load = shared.start.elapsed();

    // Drain: no more faults; wait until every task is terminal.
    chaos.set_enabled(false);
    let drain_start = Instant::now();
    let mut owner: BTreeMap<String, usize> = BTreeMap::new();
    for a in history.iter().filter(|a| is_ack(a)) {
        if let (Some(id), Some(c)) = (&a.task_id, a.client) {
            owner.insert(id.clone(), c % opts.accounts);
        }
    }
    let terminal_seen = |h: &[Answer]| -> BTreeSet<String> {
        h.iter()
            .filter(|a| a.seen.as_ref().is_some_and(|s| s.status.is_terminal()))
            .filter_map(|a| a.task_id.clone())
            .collect()
    };
    let mut done = terminal_seen(&history);
    let drained = loop {
        let pending: Vec<(usize, String)> = owner
            .iter()
            .filter(|(id, _)| !done.contains(*id))
            .map(|(id, acct)| (*acct, id.clone()))
            .collect();
        let answers = read_all(&shared, pending, Op::Drain).await;
        done.extend(terminal_seen(&answers));
        history.extend(answers);
        let open_in_store = stored_tasks(&app, &account_ids)
            .await?
            .iter()
            .filter(|t| !t.status.is_terminal())
            .count();
        if open_in_store == 0 && owner.keys().all(|id| done.contains(id)) {
            break true;
        }
        if drain_start.elapsed() > opts.drain_timeout {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let drain = drain_start.elapsed();

    // One more read of everything through the API, then the store's own view.
    for acct in 0..opts.accounts {
        history.extend(list_all(&shared, acct).await?);
    }
    let stored = stored_tasks(&app, &account_ids).await?;
    let mut accounts = Vec::new();
    for id in &account_ids {
        let a = app
            .store
            .account(id)
            .await?
            .with_context(|| format!("account {id} disappeared"))?;
        accounts.push(AccountState {
            id: id.clone(),
            granted,
            stored_granted: a.granted,
            credits: a.credits,
        });
    }
    let chaos_counts = chaos.counts();
    running.shutdown().await;

    let checked = check(&history, &stored, &accounts);
    let mut answers = BTreeMap::new();
    let mut answers_by_op = BTreeMap::new();
    for a in &history {
        *answers.entry(a.status_label()).or_insert(0) += 1;
        *answers_by_op.entry((a.op, a.status_label())).or_insert(0) += 1;
    }
    let mut outcomes = BTreeMap::new();
    let mut failure_codes = BTreeMap::new();
    for t in &stored {
        *outcomes.entry(t.status.to_string()).or_insert(0) += 1;
        if let Some(e) = &t.error {
            *failure_codes.entry(e.code.clone()).or_insert(0) += 1;
        }
    }
    Ok(SoakReport {
        options: opts,
        backend,
        submits: totals.submits,
        acknowledged: totals.acknowledged,
        refused: totals.refused,
        abandoned: totals.abandoned,
        replays: totals.replays,
        retries: totals.retries,
        cancels_sent: totals.cancels_sent,
        answers,
        answers_by_op,
        outcomes,
        failure_codes,
        retaken: stored.iter().filter(|t| t.attempts > 1).count(),
        chaos: chaos_counts,
        submit_phase: totals.submitted,
        load,
        settled_under_faults: all_settled,
        drain,
        drained,
        elapsed: run_start.elapsed(),
        checked,
    })
}
