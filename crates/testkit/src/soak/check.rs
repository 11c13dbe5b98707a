//! The history check: one function per property ([`Check`]), each over the same index of the
//! recorded answers and the stored tasks, and [`check`], which runs them all.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use tasklane_core::task::{Task, TaskStatus};

use super::history::{AccountState, Answer, Op, Seen};

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

/// Whether `a` is a submit answered with its task (`202`, or `200`).
pub(crate) fn is_ack(a: &Answer) -> bool {
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

fn violation(check: Check, subject: &str, detail: String) -> Violation {
    Violation {
        check,
        subject: subject.to_string(),
        detail,
    }
}

/// The history and the store, indexed the way every check reads them.
struct Run<'a> {
    history: &'a [Answer],
    stored: &'a [Task],
    accounts: &'a [AccountState],
    stored_by_id: HashMap<&'a str, &'a Task>,
    /// The answers that carried a task, by task.
    by_task: BTreeMap<&'a str, Vec<&'a Answer>>,
    /// The tasks a client got a submit answer for.
    acknowledged: BTreeSet<&'a str>,
}

impl<'a> Run<'a> {
    fn new(history: &'a [Answer], stored: &'a [Task], accounts: &'a [AccountState]) -> Self {
        let stored_by_id = stored.iter().map(|t| (t.id.as_str(), t)).collect();
        let mut by_task: BTreeMap<&str, Vec<&Answer>> = BTreeMap::new();
        for a in history {
            if let (Some(id), Some(_)) = (&a.task_id, &a.seen) {
                by_task.entry(id.as_str()).or_default().push(a);
            }
        }
        let acknowledged = history
            .iter()
            .filter(|a| is_ack(a))
            .filter_map(|a| a.task_id.as_deref())
            .collect();
        Run {
            history,
            stored,
            accounts,
            stored_by_id,
            by_task,
            acknowledged,
        }
    }

    /// The answers about task `id`, in the order they were received.
    fn history_of(&self, id: &str) -> String {
        history_of(self.by_task.get(id).map_or(&[][..], Vec::as_slice))
    }
}

/// The answers among `obs` that showed the task terminal.
fn terminal<'b>(obs: &'b [&Answer]) -> Vec<&'b &'b Answer> {
    obs.iter()
        .filter(|a| a.seen.as_ref().is_some_and(|s| s.status.is_terminal()))
        .collect()
}

/// Judges a run: `history` (every answer), `stored` (every task of the run's accounts as the
/// store holds it after the drain) and `accounts`. Pure: no I/O.
pub fn check(history: &[Answer], stored: &[Task], accounts: &[AccountState]) -> Checked {
    let run = Run::new(history, stored, accounts);
    let mut f = CheckFigures {
        acknowledged: run.acknowledged.len(),
        stored: stored.len(),
        stored_unacknowledged: stored
            .iter()
            .filter(|t| !run.acknowledged.contains(t.id.as_str()))
            .count(),
        observations: run.by_task.values().map(Vec::len).sum(),
        observed_tasks: run.by_task.len(),
        ..CheckFigures::default()
    };
    let mut violations = no_task_lost(&run);
    violations.extend(one_terminal_state(&run, &mut f));
    violations.extend(terminal_unchanged(&run));
    violations.extend(cancels_held(&run, &mut f));
    violations.extend(refunds(&run, &mut f));
    violations.extend(credits(&run, &mut f));
    violations.extend(one_task_per_key(&run, &mut f));
    Checked {
        figures: f,
        violations,
    }
}

/// (a) Every acknowledged task is stored and terminal, no acknowledged task ever answered 404,
/// and every stored task is terminal.
fn no_task_lost(run: &Run<'_>) -> Vec<Violation> {
    let mut v = Vec::new();
    for id in &run.acknowledged {
        match run.stored_by_id.get(id) {
            None => v.push(violation(
                Check::NoTaskLost,
                id,
                format!(
                    "acknowledged but not in the store; history: {}",
                    run.history_of(id)
                ),
            )),
            Some(t) if !t.status.is_terminal() => v.push(violation(
                Check::NoTaskLost,
                id,
                format!(
                    "acknowledged, still {} after the drain (attempts {}); history: {}",
                    t.status,
                    t.attempts,
                    run.history_of(id)
                ),
            )),
            Some(_) => {}
        }
    }
    for t in run.stored {
        if !t.status.is_terminal() && !run.acknowledged.contains(t.id.as_str()) {
            v.push(violation(
                Check::NoTaskLost,
                &t.id,
                format!(
                    "stored (never acknowledged) and still {} after the drain",
                    t.status
                ),
            ));
        }
    }
    for a in run.history {
        if let Some(id) = a.task_id.as_deref()
            && a.http == Some(404)
            && run.acknowledged.contains(id)
        {
            v.push(violation(
                Check::NoTaskLost,
                id,
                format!("an acknowledged task answered 404: {}", a.describe()),
            ));
        }
    }
    v
}

/// (b) No task was seen in two different terminal states, the store's included.
fn one_terminal_state(run: &Run<'_>, f: &mut CheckFigures) -> Vec<Violation> {
    let mut v = Vec::new();
    for (id, obs) in &run.by_task {
        let stored = run.stored_by_id.get(id).copied();
        let terminal = terminal(obs);
        f.terminal_observations += terminal.len();
        let mut states: BTreeSet<&str> = terminal
            .iter()
            .filter_map(|a| a.seen.as_ref().map(|s| s.status.as_str()))
            .collect();
        if let Some(t) = stored.filter(|t| t.status.is_terminal()) {
            states.insert(t.status.as_str());
        }
        if states.len() > 1 {
            v.push(violation(
                Check::OneTerminalState,
                id,
                format!(
                    "seen {}; store: {}; history: {}",
                    states.into_iter().collect::<Vec<_>>().join(" and "),
                    stored.map_or("missing".to_string(), |t| t.status.to_string()),
                    history_of(obs)
                ),
            ));
        }
    }
    v
}

/// (c) Once a task was seen terminal, every terminal answer in that state shows the same
/// `completed_at`, no request sent after that answer was read shows it unfinished, and the
/// store holds the same state and `completed_at`.
fn terminal_unchanged(run: &Run<'_>) -> Vec<Violation> {
    let mut v = Vec::new();
    for (id, obs) in &run.by_task {
        let stored = run.stored_by_id.get(id).copied();
        let terminal = terminal(obs);
        let Some(first) = terminal.iter().min_by_key(|a| (a.received, a.sent)) else {
            continue;
        };
        let first_seen = first
            .seen
            .as_ref()
            .expect("terminal observations carry a task");
        for o in &terminal {
            let s = o.seen.as_ref().expect("terminal observations carry a task");
            if s.status == first_seen.status && s.completed_at != first_seen.completed_at {
                v.push(violation(
                    Check::TerminalUnchanged,
                    id,
                    format!(
                        "completed_at changed from {:?} to {:?}; history: {}",
                        first_seen.completed_at,
                        s.completed_at,
                        history_of(obs)
                    ),
                ));
            }
        }
        for o in obs.iter() {
            let s = o.seen.as_ref().expect("observations carry a task");
            if !s.status.is_terminal() && o.sent > first.received {
                v.push(violation(
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
                ));
            }
        }
        if let Some(t) = stored {
            let now = Seen::from_task(t);
            if now.status != first_seen.status || now.completed_at != first_seen.completed_at {
                v.push(violation(
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
                ));
            }
        }
    }
    v
}

/// (d) Every cancel answered `200` with the task cancelled ended cancelled in the store; no
/// cancel answered `409 not_cancellable` did.
fn cancels_held(run: &Run<'_>, f: &mut CheckFigures) -> Vec<Violation> {
    let mut acked_cancels = BTreeSet::new();
    let mut refused_cancels = BTreeSet::new();
    for a in run.history.iter().filter(|a| a.op == Op::Cancel) {
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
    let mut v = Vec::new();
    for id in &acked_cancels {
        let end = run.stored_by_id.get(id).map(|t| t.status);
        if end != Some(TaskStatus::Cancelled) {
            v.push(violation(
                Check::CancelsHeld,
                id,
                format!(
                    "cancel acknowledged, stored {}; history: {}",
                    end.map_or("missing".to_string(), |s| s.to_string()),
                    run.history_of(id)
                ),
            ));
        }
    }
    for id in &refused_cancels {
        if run.stored_by_id.get(id).map(|t| t.status) == Some(TaskStatus::Cancelled) {
            v.push(violation(
                Check::CancelsHeld,
                id,
                format!(
                    "cancel refused (409 not_cancellable), yet stored cancelled; history: {}",
                    run.history_of(id)
                ),
            ));
        }
    }
    v
}

/// (e) `cost.refunded` exactly on failed and cancelled tasks, in every answer and in the store.
fn refunds(run: &Run<'_>, f: &mut CheckFigures) -> Vec<Violation> {
    let mut v = Vec::new();
    for (id, obs) in &run.by_task {
        for o in obs.iter() {
            let s = o.seen.as_ref().expect("observations carry a task");
            if s.refunded != refund_expected(s.status) {
                v.push(violation(
                    Check::Refunds,
                    id,
                    format!(
                        "answer showed {} with refunded {}: {}",
                        s.status,
                        s.refunded,
                        o.describe()
                    ),
                ));
            }
        }
    }
    for t in run.stored {
        if t.cost.refunded {
            f.refunded += 1;
        }
        if t.cost.refunded != refund_expected(t.status) {
            v.push(violation(
                Check::Refunds,
                &t.id,
                format!("stored {} with refunded {}", t.status, t.cost.refunded),
            ));
        }
    }
    v
}

/// (f) Per account, `credits + charged_not_refunded == granted`, and the store's `granted` is
/// what the run granted.
fn credits(run: &Run<'_>, f: &mut CheckFigures) -> Vec<Violation> {
    let mut charged: HashMap<&str, u64> = HashMap::new();
    for t in run.stored.iter().filter(|t| !t.cost.refunded) {
        *charged.entry(t.account_id.as_str()).or_default() += t.cost.credits;
    }
    f.accounts = run.accounts.len();
    let mut v = Vec::new();
    for a in run.accounts {
        let c = charged.get(a.id.as_str()).copied().unwrap_or(0);
        f.granted += a.granted;
        f.credits += a.credits;
        f.charged_not_refunded += c;
        if a.credits + c != a.granted {
            v.push(violation(
                Check::Credits,
                &a.id,
                format!(
                    "credits {} + charged_not_refunded {c} = {} != granted {}",
                    a.credits,
                    a.credits + c,
                    a.granted
                ),
            ));
        }
        if a.stored_granted != a.granted {
            v.push(violation(
                Check::Credits,
                &a.id,
                format!(
                    "granted {} but the store says {}",
                    a.granted, a.stored_granted
                ),
            ));
        }
    }
    v
}

/// (g) The submit answers to one idempotency key all named the same task.
fn one_task_per_key(run: &Run<'_>, f: &mut CheckFigures) -> Vec<Violation> {
    let mut keys: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut acks = 0;
    for a in run.history.iter().filter(|a| is_ack(a)) {
        if let (Some(k), Some(id)) = (a.key.as_deref(), a.task_id.as_deref()) {
            keys.entry(k).or_default().insert(id);
            acks += 1;
        }
    }
    f.keys = keys.len();
    f.replayed_answers = acks - keys.len().min(acks);
    let mut v = Vec::new();
    for (k, ids) in &keys {
        if ids.len() > 1 {
            v.push(violation(
                Check::OneTaskPerKey,
                k,
                format!(
                    "answered {} tasks: {}",
                    ids.len(),
                    ids.iter().copied().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    v
}
