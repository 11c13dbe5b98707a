//! What a soak run measured and found ([`SoakReport`]), and how `tasklane-soak` prints it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::SoakOptions;
use super::check::{Check, Checked, Violation};
use super::history::Op;
use crate::chaos::ChaosCounts;

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
