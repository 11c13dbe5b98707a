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
//! what the store holds, one function per property:
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
//!
//! Its parts: what is recorded ([`Answer`], [`Seen`], [`Op`], [`AccountState`]); the
//! properties and the checker ([`Check`], [`check`], [`Checked`]); what a run measured and found
//! ([`SoakReport`], printed by `tasklane-soak`); and the run itself ([`run`]: the server, the
//! clients, the drain).
//!
//! [`Backends`]: tasklane_local::Backends
//! [`Chaos`]: crate::chaos::Chaos

use std::time::Duration;

mod check;
mod history;
mod report;
mod run;

pub use check::{Check, CheckFigures, Checked, Violation, check};
pub use history::{AccountState, Answer, Op, Seen};
pub use report::SoakReport;
pub use run::{run, transport_kind};

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
