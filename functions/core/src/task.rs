//! The task: its stored form, its closed set of states, and the one function that changes it.
//!
//! Every adapter changes a task the same way: read it, call [`apply`] with a [`Transition`],
//! and write the result back conditioned on the version it read (refunding credits in the same
//! atomic write when [`Applied::refund`] says so). The rules live here once.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The closed set of task states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// Submitted, waiting for a worker.
    Queued,
    /// A worker holds a lease on it and runs the generator.
    Processing,
    /// Outputs are stored; terminal.
    Completed,
    /// Generation failed (credits refunded); terminal.
    Failed,
    /// Cancelled while queued (credits refunded); terminal.
    Cancelled,
}

impl TaskStatus {
    /// All states, in lifecycle order.
    pub const ALL: [TaskStatus; 5] = [
        TaskStatus::Queued,
        TaskStatus::Processing,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    /// Whether the task can never change state again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }

    /// The wire name (`queued`, `processing`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Processing => "processing",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<TaskStatus> {
        TaskStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the client asked the model to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInput {
    /// The prompt, when the model takes one.
    pub prompt: Option<String>,
    /// Duration in seconds, when the model takes one (defaulted from the registry).
    pub duration: Option<u32>,
    /// Model-specific parameters, validated against the registry.
    pub params: Map<String, Value>,
}

/// One stored output; the URL is signed afresh on every read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Output {
    /// Blob store key.
    pub key: String,
    /// MIME type.
    pub content_type: String,
    /// Size of the stored object.
    pub size_bytes: u64,
}

/// Why a task failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskFailure {
    /// Machine code, e.g. `generation_failed`.
    pub code: String,
    /// Human text safe to show the client.
    pub message: String,
}

/// What the task cost and whether that was given back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cost {
    /// Credits debited at submit.
    pub credits: u64,
    /// Whether they were refunded (cancel or failure). Never refunded twice.
    pub refunded: bool,
}

/// Delivery state of the webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallbackState {
    /// Not delivered yet (maybe retrying).
    Pending,
    /// A 2xx answer was received.
    Delivered,
    /// Retries exhausted or the receiver answered 410.
    Failed,
}

/// The webhook attached to a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Callback {
    /// Where to POST.
    pub url: String,
    /// Delivery state.
    pub state: CallbackState,
    /// Delivery attempts made so far.
    pub attempts: u32,
    /// HTTP status of the last attempt, if one answered.
    pub last_status_code: Option<u16>,
    /// The most recent delivery attempts, oldest first (at most [`MAX_DELIVERY_HISTORY`]).
    #[serde(default)]
    pub deliveries: Vec<DeliveryAttempt>,
    /// When the next attempt is due, while a retry is scheduled ([`AfterAttempt::Retry`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// How many delivery attempts a task keeps in its history.
pub const MAX_DELIVERY_HISTORY: usize = 10;

/// One webhook delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryAttempt {
    /// When it was made.
    pub at: DateTime<Utc>,
    /// The receiver's HTTP status, if it answered.
    pub status_code: Option<u16>,
    /// Why there was no answer (refused target, connection failure, timeout).
    pub error: Option<String>,
}

impl Callback {
    /// A webhook to `url` that nothing has been sent to yet.
    pub fn pending(url: impl Into<String>) -> Callback {
        Callback {
            url: url.into(),
            state: CallbackState::Pending,
            attempts: 0,
            last_status_code: None,
            deliveries: Vec::new(),
            next_attempt_at: None,
        }
    }

    /// Records an attempt (keeping the last [`MAX_DELIVERY_HISTORY`]); `last_status_code`
    /// stays the status of the last attempt that got an answer.
    pub fn record(&mut self, attempt: DeliveryAttempt) {
        self.attempts += 1;
        if attempt.status_code.is_some() {
            self.last_status_code = attempt.status_code;
        }
        self.deliveries.push(attempt);
        let excess = self.deliveries.len().saturating_sub(MAX_DELIVERY_HISTORY);
        self.deliveries.drain(..excess);
    }
}

/// A task as stored. The API view (with signed URLs) is built from it by [`crate::view`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// `task_` + ULID: unique, URL-safe, sortable by creation time.
    pub id: String,
    /// Owner.
    pub account_id: String,
    /// Model name from the registry.
    pub model: String,
    /// Action of the model.
    pub action: String,
    /// Current state.
    pub status: TaskStatus,
    /// 0..=100; 100 when completed.
    pub progress: u8,
    /// What was asked.
    pub input: TaskInput,
    /// Stored outputs (when completed).
    pub outputs: Vec<Output>,
    /// Failure (when failed).
    pub error: Option<TaskFailure>,
    /// Credits.
    pub cost: Cost,
    /// Webhook, when a `callback_url` was given.
    pub callback: Option<Callback>,
    /// Client metadata, echoed back.
    pub metadata: BTreeMap<String, String>,
    /// Submit time.
    pub created_at: DateTime<Utc>,
    /// First pickup time.
    pub started_at: Option<DateTime<Utc>>,
    /// Terminal time.
    pub completed_at: Option<DateTime<Utc>>,
    /// Processing attempts started so far.
    pub attempts: u32,
    /// While processing: the worker's lease. Once terminal: the claim of the worker sending a
    /// webhook attempt ([`Transition::DeliveryClaimed`]). Another worker may take over after it.
    pub lease_until: Option<DateTime<Utc>>,
    /// Optimistic-concurrency version, bumped on every write.
    pub version: u64,
    /// Since when the task has been waiting on work that may have been lost: its submit or
    /// last re-enqueue while queued, that wait or its lease end (the sooner) while processing
    /// (moved to the lease end by [`Transition::Reindex`]), its end while the first
    /// webhook attempt is outstanding; `None` when nothing is owed. The sweeper
    /// ([`crate::sweeper`]) re-enqueues work for tasks that have waited too long. Kept by
    /// [`apply`]; never shown to clients. Stored tasks written before it had this name carry it
    /// as `check_at`.
    #[serde(default, alias = "check_at", skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<DateTime<Utc>>,
    /// Times the sweeper re-enqueued the task's work since the task last moved
    /// ([`Transition::Requeue`]); each one doubles the wait before the next (up to
    /// [`MAX_REQUEUE_DOUBLINGS`]), so a task that is only waiting its turn in a long queue gets
    /// a few duplicate messages, not one per sweep. Any other change sets it back to 0. Never
    /// shown to clients.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub requeues: u32,
    /// When a message last found every slot of the task's model taken and renewed its wait
    /// ([`Transition::StillWaiting`]); another message for the task that finds this recent
    /// ends instead of waiting alongside. Never shown to clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_wait_at: Option<DateTime<Utc>>,
    /// The run on the model's upstream, for models served by one; `None` before it is
    /// prepared and for models run in the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamRun>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The most times the wait between two sweeps of a task doubles. The first re-enqueue since
/// the task last moved comes `sweep_after` after its wait began, the (k+1)-th
/// `sweep_after * 2^min(k - 1, MAX_REQUEUE_DOUBLINGS)` after the k-th: the k-th comes
/// `2^(k-1) * sweep_after` into the wait, so a wait of `w` gets at most
/// `1 + log2(w / sweep_after)` of them (with the default 120 s, at most one every 64 minutes
/// once the cap is reached).
pub const MAX_REQUEUE_DOUBLINGS: u32 = 5;

/// How many bytes of an upstream run's log a task keeps (the end of it).
pub const MAX_LOG_TAIL: usize = 4096;

/// A task's run on an upstream ([`crate::ports::Upstream`]). While it runs, the task is
/// `processing` with no worker holding it: [`Task::lease_until`] is the time by which a check
/// is due, and the sweeper resumes checking a task whose check was lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamRun {
    /// The secret in the callback URL given to the upstream; never shown to clients.
    pub token: String,
    /// The upstream's id of the run, once it accepted it.
    pub id: Option<String>,
    /// When the upstream accepted it; the model's timeout counts from here.
    pub started_at: Option<DateTime<Utc>>,
    /// Checks made: the number the next [`crate::ports::WorkMessage::Check`] carries.
    pub checks: u32,
    /// Times the upstream lost the run and started it anew.
    pub restarts: u32,
    /// Checks in a row that found the upstream unreachable.
    #[serde(default)]
    pub failed_checks: u32,
    /// When the upstream's last callback about the run was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_callback: Option<DateTime<Utc>>,
    /// While a check collects the ended run's outputs: until when no other check may.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collecting_until: Option<DateTime<Utc>>,
    /// The end of the run's log (at most [`MAX_LOG_TAIL`] bytes).
    pub logs: String,
}

impl UpstreamRun {
    /// A run about to be started, reporting to a callback URL with `token`.
    pub fn prepared(token: String) -> UpstreamRun {
        UpstreamRun {
            token,
            id: None,
            started_at: None,
            checks: 0,
            restarts: 0,
            failed_checks: 0,
            last_callback: None,
            collecting_until: None,
            logs: String::new(),
        }
    }
}

/// The last [`MAX_LOG_TAIL`] bytes of `logs`, cut at a character boundary.
pub fn log_tail(logs: &str) -> &str {
    let mut from = logs.len().saturating_sub(MAX_LOG_TAIL);
    while !logs.is_char_boundary(from) {
        from += 1;
    }
    &logs[from..]
}

impl Task {
    /// A new task as submit stores it: queued with action `generate`, `credits` debited, no
    /// callback or metadata, created at `now` and waiting on its run since then, version 1.
    pub fn queued(
        id: String,
        account_id: &str,
        model: &str,
        input: TaskInput,
        credits: u64,
        now: DateTime<Utc>,
    ) -> Task {
        Task {
            id,
            account_id: account_id.to_string(),
            model: model.to_string(),
            action: "generate".into(),
            status: TaskStatus::Queued,
            progress: 0,
            input,
            outputs: vec![],
            error: None,
            cost: Cost {
                credits,
                refunded: false,
            },
            callback: None,
            metadata: BTreeMap::new(),
            created_at: now,
            started_at: None,
            completed_at: None,
            attempts: 0,
            lease_until: None,
            version: 1,
            waiting_since: Some(now),
            requeues: 0,
            slot_wait_at: None,
            upstream: None,
        }
    }

    /// Whether the task is queued or processing (counts towards the account's open-task cap).
    pub fn is_open(&self) -> bool {
        !self.status.is_terminal()
    }

    /// Whether the first webhook attempt is still owed: the task is terminal and its callback
    /// pending with no attempt recorded. The one place this is decided: whoever ends a task
    /// enqueues [`crate::ports::WorkMessage::first_delivery`] when it says so, and the sweeper
    /// re-enqueues it for a task that waited too long.
    pub fn first_callback_owed(&self) -> bool {
        self.status.is_terminal()
            && self
                .callback
                .as_ref()
                .is_some_and(|c| c.state == CallbackState::Pending && c.attempts == 0)
    }

    /// The webhook attempt a finished task owes and since when: the first at the task's end,
    /// a retry at its scheduled time; `None` when none is owed.
    pub fn callback_owed(&self) -> Option<(u32, DateTime<Utc>)> {
        if !self.status.is_terminal() {
            return None;
        }
        let cb = self.callback.as_ref()?;
        if cb.state != CallbackState::Pending {
            return None;
        }
        match cb.attempts {
            0 => Some((0, self.completed_at.unwrap_or(self.created_at))),
            n => cb.next_attempt_at.map(|at| (n, at)),
        }
    }
}

/// What becomes of a webhook after a delivery attempt. [`AfterAttempt::decide`] is the one
/// place that decides it; [`Transition::DeliveryAttempted`] records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAttempt {
    /// Not delivered yet: attempt again after this delay.
    Retry(std::time::Duration),
    /// The receiver answered 2xx.
    Delivered,
    /// Given up: the receiver answered 410 (gone), or no retry is left.
    Failed,
}

impl AfterAttempt {
    /// What follows attempt number `attempt` (0 for the first) that got `status_code` (`None`
    /// when nothing answered): a 2xx delivers, a 410 fails, anything else is retried after
    /// `retry_schedule[attempt]` while the schedule has entries, and fails after that.
    pub fn decide(
        status_code: Option<u16>,
        attempt: u32,
        retry_schedule: &[std::time::Duration],
    ) -> AfterAttempt {
        match status_code {
            Some(200..=299) => AfterAttempt::Delivered,
            Some(410) => AfterAttempt::Failed,
            _ => usize::try_from(attempt)
                .ok()
                .and_then(|i| retry_schedule.get(i))
                .map_or(AfterAttempt::Failed, |delay| AfterAttempt::Retry(*delay)),
        }
    }

    /// The callback state it leaves.
    pub fn state(self) -> CallbackState {
        match self {
            AfterAttempt::Retry(_) => CallbackState::Pending,
            AfterAttempt::Delivered => CallbackState::Delivered,
            AfterAttempt::Failed => CallbackState::Failed,
        }
    }
}

/// A change requested of a task. See [`apply`] for the rules.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// `queued -> processing`, or re-take a `processing` task whose lease expired.
    Start {
        /// Lease end for the new attempt.
        lease_until: DateTime<Utc>,
    },
    /// Progress of the current attempt; renews the lease.
    Progress {
        /// The attempt reporting.
        attempt: u32,
        /// 0..=99.
        progress: u8,
        /// New lease end.
        lease_until: DateTime<Utc>,
    },
    /// `processing -> completed` for the current attempt.
    Complete {
        /// The attempt finishing.
        attempt: u32,
        /// Stored outputs.
        outputs: Vec<Output>,
    },
    /// `processing -> failed` (for `attempt`, when given) or `queued -> failed`; refunds.
    Fail {
        /// The attempt failing; `None` fails a task no worker holds: queued, or processing
        /// with its lease expired (a held lease refuses with [`TransitionError::LeaseHeld`]).
        attempt: Option<u32>,
        /// Why.
        error: TaskFailure,
    },
    /// `queued -> cancelled`; refunds. Cancelling a cancelled task changes nothing.
    Cancel,
    /// A worker claims webhook attempt `attempt` before sending it, holding it until
    /// `lease_until` (kept in [`Task::lease_until`], free once a task is terminal). Refused
    /// unless the task is terminal, its callback pending and `attempt` the number of attempts
    /// recorded ([`TransitionError::StaleAttempt`] otherwise), and with
    /// [`TransitionError::LeaseHeld`] while another worker's claim runs: of two workers holding
    /// the same message only one sends. A claim that ran out (its worker died) may be taken over.
    DeliveryClaimed {
        /// Attempts recorded before this one.
        attempt: u32,
        /// End of the claim.
        lease_until: DateTime<Utc>,
    },
    /// Records webhook attempt `attempt` and what follows it (see [`AfterAttempt::decide`]),
    /// and ends its claim. Refused like [`Transition::DeliveryClaimed`] (the claim aside): a
    /// stale or duplicate attempt never overwrites a newer record.
    DeliveryAttempted {
        /// Attempts recorded before this one.
        attempt: u32,
        /// When it was sent.
        at: DateTime<Utc>,
        /// The receiver's HTTP status, if it answered.
        status_code: Option<u16>,
        /// Why there was no answer.
        error: Option<String>,
        /// What follows.
        next: AfterAttempt,
    },
    /// Gives the webhook up (its message was dead-lettered): pending -> failed, nothing recorded.
    /// Refused like [`Transition::DeliveryClaimed`], including while an attempt's claim runs.
    DeliveryAbandoned {
        /// Attempts recorded, as the dead-lettered message knew them.
        attempt: u32,
    },
    /// Before starting the current attempt's upstream run: keeps the callback `token` (once:
    /// a run prepared by an earlier attempt keeps its token and id).
    UpstreamPrepared {
        /// The attempt starting it.
        attempt: u32,
        /// Secret of the callback URL.
        token: String,
    },
    /// The upstream accepted the run as `id`; no worker holds the task from here, a check is
    /// due by `check_by`.
    UpstreamStarted {
        /// The attempt that started it.
        attempt: u32,
        /// The upstream's id.
        id: String,
        /// When a check is due.
        check_by: DateTime<Utc>,
    },
    /// What the upstream said of run `id` while it runs, from a callback or from check number
    /// `check` (refused with [`TransitionError::StaleAttempt`] unless it is the next one, so of
    /// two copies of a check message only one goes on).
    UpstreamReported {
        /// The run it is about (refused with [`TransitionError::StaleAttempt`] otherwise).
        id: String,
        /// The check it comes from; `None` for a callback.
        check: Option<u32>,
        /// Progress, if known (never moves back).
        progress: Option<u8>,
        /// The run's log so far, if given (its tail is kept).
        logs: Option<String>,
        /// The upstream lost the run and started it anew.
        restarted: bool,
        /// The check found the upstream unreachable (counted in
        /// [`UpstreamRun::failed_checks`]; any other report resets the count).
        unreachable: bool,
        /// When the next check is due, if one was scheduled.
        check_by: Option<DateTime<Utc>>,
    },
    /// Run `id` ended upstream: `processing -> completed` with the stored outputs, or
    /// `processing -> failed` with a refund. Refused unless the task's run is `id` (or its start
    /// is not recorded yet: a fast run's callback may come first), whatever the attempt.
    UpstreamEnded {
        /// The run.
        id: String,
        /// Stored outputs, or why it failed.
        outcome: Result<Vec<Output>, TaskFailure>,
        /// The run's final log, if given (its tail is kept).
        logs: Option<String>,
    },
    /// Check `check` found run `id` ended and collects its outputs, holding the task until
    /// `until` (kept in [`UpstreamRun::collecting_until`] and [`Task::lease_until`]): of two
    /// copies of the check only one collects. Refused like a check's
    /// [`Transition::UpstreamReported`].
    UpstreamCollecting {
        /// The run.
        id: String,
        /// The check that found the end.
        check: u32,
        /// Until when the collection holds the task.
        until: DateTime<Utc>,
    },
    /// The upstream could not start the current attempt's run (at capacity, unavailable):
    /// `processing -> queued`, nothing started. A capacity refusal gives the attempt back
    /// (`count_attempt: false`), so waiting for a slot never exhausts a task's attempts.
    Deferred {
        /// The attempt that tried.
        attempt: u32,
        /// Whether the attempt counts towards the task's limit.
        count_attempt: bool,
    },
    /// A queued task waits for a slot of its model's upstream (and was re-enqueued to try
    /// again): its wait restarts now, so the sweeper does not take it for lost work. Refused
    /// unless the task is queued.
    StillWaiting {
        /// Refused with [`TransitionError::NotDue`] when another message for the task renewed
        /// the wait after this ([`Task::slot_wait_at`]). A wait the sweeper moved into the
        /// future (its backoff) is kept as it is.
        not_since: DateTime<Utc>,
    },
    /// The sweeper re-enqueued the work a task waits on: restarts its wait, at `now` the first
    /// time, and the next time later by as much again as the sweep allowed (`now - cutoff`,
    /// the sweep's `sweep_after`) for each requeue before ([`Task::requeues`], doubling up to
    /// [`MAX_REQUEUE_DOUBLINGS`]). Refused with [`TransitionError::NotDue`] unless the task has
    /// waited since `cutoff` or earlier.
    Requeue {
        /// Only a task waiting since this time or earlier is due.
        cutoff: DateTime<Utc>,
    },
    /// The sweeper found a processing task whose recorded wait began by `cutoff` but whose
    /// lease is still held past it (its worker renewed it since): the wait moves to the lease
    /// end, and nothing is owed. A processing task's [`Task::waiting_since`] is the wait it had
    /// in the queue (or its lease end, if sooner) and is moved by neither the claim nor renewals,
    /// so they do not move the store's index of waiting tasks; the sweeper moves it instead,
    /// at most once per `sweep_after` of a long run. Refused with [`TransitionError::NotDue`]
    /// unless the task is processing, has waited since `cutoff` or earlier and holds a lease
    /// past `cutoff`.
    Reindex {
        /// The sweep's cutoff, as for [`Transition::Requeue`].
        cutoff: DateTime<Utc>,
    },
}

/// Why a transition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// Cancel of a task that is not queued.
    #[error("task is {0} and can no longer be cancelled")]
    NotCancellable(TaskStatus),
    /// The task is not in a state this transition starts from.
    #[error("task is {0}")]
    WrongState(TaskStatus),
    /// Another worker holds an unexpired lease.
    #[error("task is leased by another worker")]
    LeaseHeld,
    /// The attempt is no longer the current one (another worker took over).
    #[error("attempt is stale")]
    StaleAttempt,
    /// The task has no callback to record.
    #[error("task has no callback")]
    NoCallback,
    /// The webhook was delivered or given up already.
    #[error("webhook is no longer pending")]
    CallbackSettled,
    /// The task is not waiting on lost work (it moved on since it was read).
    #[error("task is not due for a sweep")]
    NotDue,
    /// The task has no upstream run (prepared) to record this about.
    #[error("task has no upstream run")]
    NotStarted,
}

/// The effect of an applied transition, for the adapter to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Nothing changed; no write is needed.
    Unchanged,
    /// The task changed; write it and, in the same atomic write, add `refund` credits to its
    /// account and, when `closed`, take one off the account's open tasks.
    Changed {
        /// Credits to give back (0 for none).
        refund: u64,
        /// The task left the open states (queued, processing) for a terminal one.
        closed: bool,
    },
}

impl Applied {
    /// Credits to give back.
    pub fn refund(self) -> u64 {
        match self {
            Applied::Unchanged => 0,
            Applied::Changed { refund, .. } => refund,
        }
    }

    /// Whether the task left the open states with this change.
    pub fn closed(self) -> bool {
        matches!(self, Applied::Changed { closed: true, .. })
    }
}

fn refund(task: &mut Task) -> u64 {
    if task.cost.refunded {
        0
    } else {
        task.cost.refunded = true;
        task.cost.credits
    }
}

/// Applies `t` to `task` at time `now`. On `Ok(Changed)` the caller writes the task with
/// `version + 1` conditioned on the old version; on `Err` nothing was changed.
pub fn apply(
    task: &mut Task,
    t: &Transition,
    now: DateTime<Utc>,
) -> Result<Applied, TransitionError> {
    let before = task.clone();
    let result = apply_inner(task, t, now);
    match result {
        Ok(Inner::Changed { refund }) => {
            task.version += 1;
            if !matches!(t, Transition::Requeue { .. } | Transition::Reindex { .. }) {
                // A task that stays processing under the same attempt, or that a worker just
                // claimed from the queue, keeps the wait it had (unless the lease ends sooner):
                // neither a renewal nor a claim moves the store's index of waiting tasks. A
                // retake of a lapsed lease starts from the new lease.
                let retake = before.status == TaskStatus::Processing
                    && matches!(t, Transition::Start { .. });
                let keep = matches!(before.status, TaskStatus::Processing | TaskStatus::Queued)
                    && task.status == TaskStatus::Processing
                    && !retake;
                task.waiting_since = next_waiting_since(task, keep, now);
                task.requeues = 0;
            }
            Ok(Applied::Changed {
                refund,
                closed: before.is_open() && !task.is_open(),
            })
        }
        Ok(Inner::Unchanged) => {
            *task = before;
            Ok(Applied::Unchanged)
        }
        Err(e) => {
            *task = before;
            Err(e)
        }
    }
}

/// Whether `task` is processing under a lease that runs past `t`.
pub fn lease_held_past(task: &Task, t: DateTime<Utc>) -> bool {
    task.status == TaskStatus::Processing && task.lease_until.is_some_and(|l| l > t)
}

/// Since when `task`, just changed at `now`, waits on work that may have been lost. With
/// `keep` (a processing task renewed under the same attempt, or just claimed from the queue)
/// the earlier of the recorded wait and the lease end: a lease that starts or grows leaves the
/// wait where it was (the sweeper moves it if the task is still running then,
/// [`Transition::Reindex`]), one that ends sooner brings it forward.
fn next_waiting_since(task: &Task, keep: bool, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    match task.status {
        TaskStatus::Queued => task.waiting_since.or(Some(now)),
        TaskStatus::Processing => match (keep, task.waiting_since, task.lease_until) {
            (true, Some(w), Some(l)) => Some(w.min(l)),
            (_, _, lease) => lease,
        },
        // A webhook attempt owed: the first from the task's end, a retry from its due time
        // (the sweeper sends it if its message is lost, or if it was too far off to queue).
        _ => task.callback_owed().map(|(n, due)| {
            if n == 0 {
                task.completed_at.unwrap_or(now)
            } else {
                due
            }
        }),
    }
}

/// What [`apply_inner`] reports: the task changed (refunding this much) or not.
enum Inner {
    Unchanged,
    Changed { refund: u64 },
}

fn apply_inner(
    task: &mut Task,
    t: &Transition,
    now: DateTime<Utc>,
) -> Result<Inner, TransitionError> {
    use TaskStatus::*;
    match t {
        Transition::Start { lease_until } => {
            match task.status {
                Queued => {}
                Processing => {
                    if task.lease_until.is_some_and(|l| l > now) {
                        return Err(TransitionError::LeaseHeld);
                    }
                }
                s => return Err(TransitionError::WrongState(s)),
            }
            task.status = Processing;
            task.attempts += 1;
            task.lease_until = Some(*lease_until);
            task.started_at.get_or_insert(now);
            task.progress = 0;
            Ok(Inner::Changed { refund: 0 })
        }
        Transition::Progress {
            attempt,
            progress,
            lease_until,
        } => {
            current_attempt(task, *attempt)?;
            task.progress = (*progress).min(99).max(task.progress);
            task.lease_until = Some(*lease_until);
            Ok(Inner::Changed { refund: 0 })
        }
        Transition::Complete { attempt, outputs } => {
            current_attempt(task, *attempt)?;
            task.status = Completed;
            task.progress = 100;
            task.outputs = outputs.clone();
            task.lease_until = None;
            task.completed_at = Some(now);
            Ok(Inner::Changed { refund: 0 })
        }
        Transition::Fail { attempt, error } => {
            match (task.status, attempt) {
                (Processing, Some(a)) => current_attempt(task, *a)?,
                (Processing, None) if task.lease_until.is_some_and(|l| l > now) => {
                    return Err(TransitionError::LeaseHeld);
                }
                (Queued | Processing, None) => {}
                (s, _) => return Err(TransitionError::WrongState(s)),
            }
            task.status = Failed;
            task.error = Some(error.clone());
            task.lease_until = None;
            task.completed_at = Some(now);
            Ok(Inner::Changed {
                refund: refund(task),
            })
        }
        Transition::Cancel => match task.status {
            Queued => {
                task.status = Cancelled;
                task.completed_at = Some(now);
                Ok(Inner::Changed {
                    refund: refund(task),
                })
            }
            Cancelled => Ok(Inner::Unchanged),
            s => Err(TransitionError::NotCancellable(s)),
        },
        Transition::DeliveryClaimed {
            attempt,
            lease_until,
        } => {
            owed_attempt(task, *attempt)?;
            unclaimed(task, now)?;
            task.lease_until = Some(*lease_until);
            Ok(Inner::Changed { refund: 0 })
        }
        Transition::DeliveryAttempted {
            attempt,
            at,
            status_code,
            error,
            next,
        } => {
            let cb = owed_attempt(task, *attempt)?;
            cb.record(DeliveryAttempt {
                at: *at,
                status_code: *status_code,
                error: error.clone(),
            });
            cb.state = next.state();
            cb.next_attempt_at = match next {
                AfterAttempt::Retry(delay) => Some(
                    chrono::TimeDelta::from_std(*delay)
                        .ok()
                        .and_then(|d| at.checked_add_signed(d))
                        .unwrap_or(DateTime::<Utc>::MAX_UTC),
                ),
                _ => None,
            };
            task.lease_until = None;
            Ok(Inner::Changed { refund: 0 })
        }
        Transition::DeliveryAbandoned { attempt } => {
            owed_attempt(task, *attempt)?;
            unclaimed(task, now)?;
            if let Some(cb) = task.callback.as_mut() {
                cb.state = CallbackState::Failed;
                cb.next_attempt_at = None;
            }
            task.lease_until = None;
            Ok(Inner::Changed { refund: 0 })
        }
        Transition::UpstreamPrepared { attempt, token } => {
            current_attempt(task, *attempt)?;
            if task.upstream.is_some() {
                return Ok(Inner::Unchanged);
            }
            task.upstream = Some(UpstreamRun::prepared(token.clone()));
            Ok(Inner::Changed { refund: 0 })
        }
        Transition::UpstreamStarted {
            attempt,
            id,
            check_by,
        } => {
            current_attempt(task, *attempt)?;
            let run = task.upstream.as_mut().ok_or(TransitionError::NotStarted)?;
            if run.id.as_ref().is_some_and(|known| known != id) {
                return Err(TransitionError::StaleAttempt);
            }
            run.id = Some(id.clone());
            run.started_at.get_or_insert(now);
            task.lease_until = Some(*check_by);
            Ok(Inner::Changed { refund: 0 })
        }
        Transition::UpstreamReported {
            id,
            check,
            progress,
            logs,
            restarted,
            unreachable,
            check_by,
        } => {
            if task.status != Processing {
                return Err(TransitionError::WrongState(task.status));
            }
            let run = task.upstream.as_mut().ok_or(TransitionError::NotStarted)?;
            if run.id.as_deref() != Some(id.as_str()) {
                return Err(TransitionError::StaleAttempt);
            }
            match check {
                Some(n) if *n != run.checks => return Err(TransitionError::StaleAttempt),
                Some(_) => run.checks += 1,
                None => run.last_callback = Some(now),
            }
            run.failed_checks = if *unreachable {
                run.failed_checks + 1
            } else {
                0
            };
            if *restarted {
                run.restarts += 1;
                run.logs.clear();
                task.progress = 0;
            }
            if let Some(l) = logs {
                run.logs = log_tail(l).to_string();
            }
            if let Some(p) = progress {
                task.progress = (*p).min(99).max(task.progress);
            }
            if let Some(c) = check_by {
                task.lease_until = Some(*c);
            }
            Ok(Inner::Changed { refund: 0 })
        }
        Transition::UpstreamCollecting { id, check, until } => {
            if task.status != Processing {
                return Err(TransitionError::WrongState(task.status));
            }
            let run = task.upstream.as_mut().ok_or(TransitionError::NotStarted)?;
            if run.id.as_deref() != Some(id.as_str()) || run.checks != *check {
                return Err(TransitionError::StaleAttempt);
            }
            if run.collecting_until.is_some_and(|u| u > now) {
                return Err(TransitionError::LeaseHeld);
            }
            run.checks += 1;
            run.collecting_until = Some(*until);
            task.lease_until = Some(*until);
            Ok(Inner::Changed { refund: 0 })
        }
        Transition::UpstreamEnded { id, outcome, logs } => {
            if task.status != Processing {
                return Err(TransitionError::WrongState(task.status));
            }
            let run = task.upstream.as_mut().ok_or(TransitionError::NotStarted)?;
            if run.id.as_ref().is_some_and(|known| known != id) {
                return Err(TransitionError::StaleAttempt);
            }
            run.id = Some(id.clone());
            if let Some(l) = logs {
                run.logs = log_tail(l).to_string();
            }
            task.lease_until = None;
            task.completed_at = Some(now);
            match outcome {
                Ok(outputs) => {
                    task.status = Completed;
                    task.progress = 100;
                    task.outputs = outputs.clone();
                    Ok(Inner::Changed { refund: 0 })
                }
                Err(error) => {
                    task.status = Failed;
                    task.error = Some(error.clone());
                    Ok(Inner::Changed {
                        refund: refund(task),
                    })
                }
            }
        }
        Transition::Deferred {
            attempt,
            count_attempt,
        } => {
            current_attempt(task, *attempt)?;
            if task.upstream.as_ref().is_some_and(|u| u.id.is_some()) {
                return Err(TransitionError::WrongState(task.status));
            }
            task.status = Queued;
            if !count_attempt {
                task.attempts -= 1;
            }
            task.lease_until = None;
            task.progress = 0;
            // Nothing started, but the token stays: an upstream that did accept the start
            // (its answer lost) reports to the URL it was given.
            task.upstream = task.upstream.take().map(|u| UpstreamRun::prepared(u.token));
            // Waiting anew: `next_waiting_since` restarts the clock of a queued task.
            task.waiting_since = None;
            Ok(Inner::Changed { refund: 0 })
        }
        Transition::StillWaiting { not_since } => {
            if task.status != Queued {
                return Err(TransitionError::WrongState(task.status));
            }
            // Another message renewed the wait since `not_since`: it goes on, this one ends.
            if task.slot_wait_at.is_some_and(|w| w > *not_since) {
                return Err(TransitionError::NotDue);
            }
            task.slot_wait_at = Some(now);
            // A wait the sweeper moved into the future (its backoff) is kept; else it restarts.
            if task.waiting_since.is_none_or(|w| w <= now) {
                task.waiting_since = None;
            }
            Ok(Inner::Changed { refund: 0 })
        }
        Transition::Requeue { cutoff } => match task.waiting_since {
            // A lease held past the cutoff is a live worker: that is a Reindex, not a requeue.
            Some(since) if since <= *cutoff && !lease_held_past(task, *cutoff) => {
                let owes_work = task.is_open() || task.callback_owed().is_some();
                // The wait the sweep allowed (`sweep_after`), doubled per earlier requeue: the
                // next sweep finds the task `allowed * 2^requeues` from now. Kept in
                // `waiting_since` (a wait that begins in the future) so the store's index
                // answers `due_tasks` exactly, without reading tasks that are not due yet.
                let allowed = (now - *cutoff).max(chrono::TimeDelta::zero());
                let doublings = task.requeues.min(MAX_REQUEUE_DOUBLINGS);
                let next = allowed
                    .checked_mul((1i32 << doublings) - 1)
                    .and_then(|extra| now.checked_add_signed(extra))
                    .unwrap_or(DateTime::<Utc>::MAX_UTC);
                task.waiting_since = owes_work.then_some(next);
                task.requeues = task.requeues.saturating_add(1);
                Ok(Inner::Changed { refund: 0 })
            }
            _ => Err(TransitionError::NotDue),
        },
        Transition::Reindex { cutoff } => match (task.waiting_since, task.lease_until) {
            (Some(since), Some(lease)) if since <= *cutoff && lease_held_past(task, *cutoff) => {
                task.waiting_since = Some(lease);
                Ok(Inner::Changed { refund: 0 })
            }
            _ => Err(TransitionError::NotDue),
        },
    }
}

/// The callback of a terminal `task` whose webhook is pending with `attempt` attempts recorded.
fn owed_attempt(task: &mut Task, attempt: u32) -> Result<&mut Callback, TransitionError> {
    if !task.status.is_terminal() {
        return Err(TransitionError::WrongState(task.status));
    }
    let cb = task.callback.as_mut().ok_or(TransitionError::NoCallback)?;
    if cb.attempts != attempt {
        return Err(TransitionError::StaleAttempt);
    }
    if cb.state != CallbackState::Pending {
        return Err(TransitionError::CallbackSettled);
    }
    Ok(cb)
}

/// Refuses while a worker's claim on a webhook attempt of the terminal `task` runs.
fn unclaimed(task: &Task, now: DateTime<Utc>) -> Result<(), TransitionError> {
    if task.lease_until.is_some_and(|l| l > now) {
        return Err(TransitionError::LeaseHeld);
    }
    Ok(())
}

fn current_attempt(task: &Task, attempt: u32) -> Result<(), TransitionError> {
    if task.status != TaskStatus::Processing {
        return Err(TransitionError::WrongState(task.status));
    }
    if task.attempts != attempt {
        return Err(TransitionError::StaleAttempt);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::Duration;

    pub(crate) fn sample(status: TaskStatus) -> Task {
        Task {
            id: "task_01JABCDEFGHJKMNPQRSTVWXYZ0".into(),
            account_id: "acct_1".into(),
            model: "echo".into(),
            action: "generate".into(),
            status,
            progress: 0,
            input: TaskInput {
                prompt: Some("hi".into()),
                duration: None,
                params: Map::new(),
            },
            outputs: vec![],
            error: None,
            cost: Cost {
                credits: 7,
                refunded: false,
            },
            callback: None,
            metadata: BTreeMap::new(),
            created_at: Utc::now(),
            started_at: None,
            completed_at: None,
            attempts: 0,
            lease_until: None,
            version: 1,
            waiting_since: None,
            requeues: 0,
            slot_wait_at: None,
            upstream: None,
        }
    }

    fn fail() -> Transition {
        Transition::Fail {
            attempt: None,
            error: TaskFailure {
                code: "x".into(),
                message: "y".into(),
            },
        }
    }

    #[test]
    fn the_delivery_history_keeps_the_latest_attempts_and_counts_them_all() {
        let mut cb = Callback {
            url: "https://example.com".into(),
            state: CallbackState::Pending,
            attempts: 0,
            last_status_code: None,
            deliveries: vec![],
            next_attempt_at: None,
        };
        for i in 0..15u16 {
            cb.record(DeliveryAttempt {
                at: Utc::now(),
                status_code: Some(500 + i),
                error: None,
            });
        }
        assert_eq!(cb.attempts, 15);
        assert_eq!(cb.last_status_code, Some(514));
        assert_eq!(cb.deliveries.len(), MAX_DELIVERY_HISTORY);
        assert_eq!(cb.deliveries[0].status_code, Some(505));
    }

    #[test]
    fn terminal_states_never_change() {
        let now = Utc::now();
        for status in [
            TaskStatus::Completed,
            TaskStatus::Failed,
            TaskStatus::Cancelled,
        ] {
            for t in [
                Transition::Start {
                    lease_until: now + Duration::seconds(60),
                },
                Transition::Complete {
                    attempt: 0,
                    outputs: vec![],
                },
                fail(),
            ] {
                let mut task = sample(status);
                let before = task.clone();
                assert!(
                    apply(&mut task, &t, now).is_err(),
                    "{status} accepted {t:?}"
                );
                assert_eq!(task, before);
            }
        }
    }

    #[test]
    fn cancel_refunds_once_and_is_idempotent() {
        let now = Utc::now();
        let mut task = sample(TaskStatus::Queued);
        assert_eq!(
            apply(&mut task, &Transition::Cancel, now),
            Ok(Applied::Changed {
                refund: 7,
                closed: true
            })
        );
        assert_eq!(task.status, TaskStatus::Cancelled);
        assert!(task.cost.refunded);
        assert_eq!(task.version, 2);
        assert_eq!(
            apply(&mut task, &Transition::Cancel, now),
            Ok(Applied::Unchanged)
        );
        assert_eq!(task.version, 2);
    }

    #[test]
    fn cancel_of_processing_task_is_refused() {
        let now = Utc::now();
        let mut task = sample(TaskStatus::Processing);
        assert_eq!(
            apply(&mut task, &Transition::Cancel, now),
            Err(TransitionError::NotCancellable(TaskStatus::Processing))
        );
    }

    #[test]
    fn failure_refunds_and_a_second_failure_is_refused() {
        let now = Utc::now();
        let mut task = sample(TaskStatus::Queued);
        assert_eq!(apply(&mut task, &fail(), now).unwrap().refund(), 7);
        assert_eq!(
            apply(&mut task, &fail(), now),
            Err(TransitionError::WrongState(TaskStatus::Failed))
        );
    }

    #[test]
    fn a_held_lease_blocks_a_second_worker_until_it_expires() {
        let now = Utc::now();
        let mut task = sample(TaskStatus::Queued);
        let start = Transition::Start {
            lease_until: now + Duration::seconds(30),
        };
        apply(&mut task, &start, now).unwrap();
        assert_eq!(task.attempts, 1);
        assert_eq!(
            apply(&mut task, &start, now),
            Err(TransitionError::LeaseHeld)
        );
        let later = now + Duration::seconds(31);
        apply(&mut task, &start, later).unwrap();
        assert_eq!(task.attempts, 2);
        // The first worker's attempt is now stale: it can neither complete nor fail the task.
        let complete = Transition::Complete {
            attempt: 1,
            outputs: vec![],
        };
        assert_eq!(
            apply(&mut task, &complete, later),
            Err(TransitionError::StaleAttempt)
        );
        apply(
            &mut task,
            &Transition::Complete {
                attempt: 2,
                outputs: vec![],
            },
            later,
        )
        .unwrap();
        assert_eq!(task.progress, 100);
        assert_eq!(task.status, TaskStatus::Completed);
    }

    #[test]
    fn progress_never_goes_backwards_or_reaches_100_before_completion() {
        let now = Utc::now();
        let mut task = sample(TaskStatus::Queued);
        apply(&mut task, &Transition::Start { lease_until: now }, now).unwrap();
        let p = |progress| Transition::Progress {
            attempt: 1,
            progress,
            lease_until: now,
        };
        apply(&mut task, &p(40), now).unwrap();
        apply(&mut task, &p(20), now).unwrap();
        assert_eq!(task.progress, 40);
        apply(&mut task, &p(100), now).unwrap();
        assert_eq!(task.progress, 99);
    }

    fn with_callback(mut task: Task) -> Task {
        task.callback = Some(Callback {
            url: "https://example.com/hook".into(),
            state: CallbackState::Pending,
            attempts: 0,
            last_status_code: None,
            deliveries: vec![],
            next_attempt_at: None,
        });
        task
    }

    #[test]
    fn fail_without_an_attempt_refuses_a_held_lease_and_fails_an_expired_one() {
        let now = Utc::now();
        let mut task = sample(TaskStatus::Queued);
        let start = Transition::Start {
            lease_until: now + Duration::seconds(30),
        };
        apply(&mut task, &start, now).unwrap();
        let held = task.clone();
        // A dead letter or sweeper (no attempt) must not end a task a live worker holds.
        assert_eq!(
            apply(&mut task, &fail(), now),
            Err(TransitionError::LeaseHeld)
        );
        assert_eq!(task, held);
        assert_eq!(
            apply(&mut task, &fail(), now + Duration::seconds(29)),
            Err(TransitionError::LeaseHeld)
        );
        // The holder itself may fail its attempt while its lease runs.
        let mut own = held.clone();
        let own_fail = Transition::Fail {
            attempt: Some(1),
            error: TaskFailure {
                code: "x".into(),
                message: "y".into(),
            },
        };
        assert_eq!(apply(&mut own, &own_fail, now).unwrap().refund(), 7);
        // Once the lease has run out, nobody holds the task: it fails, refunded, closed.
        let later = now + Duration::seconds(30);
        assert_eq!(
            apply(&mut task, &fail(), later),
            Ok(Applied::Changed {
                refund: 7,
                closed: true
            })
        );
        assert_eq!(task.status, TaskStatus::Failed);
        assert_eq!(task.lease_until, None);
        assert_eq!(task.completed_at, Some(later));
        assert!(task.cost.refunded);
        // A queued task has no lease to respect.
        let mut queued = sample(TaskStatus::Queued);
        assert_eq!(apply(&mut queued, &fail(), now).unwrap().refund(), 7);
    }

    #[test]
    fn a_stored_task_written_with_check_at_reads_as_waiting_since() {
        let task = Task {
            waiting_since: Some(Utc::now()),
            ..sample(TaskStatus::Queued)
        };
        let mut doc = serde_json::to_value(&task).unwrap();
        let since = doc
            .as_object_mut()
            .unwrap()
            .remove("waiting_since")
            .unwrap();
        doc["check_at"] = since;
        let read: Task = serde_json::from_value(doc).unwrap();
        assert_eq!(read.waiting_since, task.waiting_since);
        assert!(read.waiting_since.is_some());
        let written = serde_json::to_value(&read).unwrap();
        assert!(written.get("check_at").is_none() && written.get("waiting_since").is_some());
    }

    #[test]
    fn waiting_since_follows_what_the_task_waits_on() {
        let t0 = Utc::now();
        let t1 = t0 + Duration::seconds(10);
        // Queued: a change keeps the time the wait began, or starts it. (No transition keeps a
        // task queued today; the rule is there for one that would.)
        let mut task = with_callback(sample(TaskStatus::Queued));
        task.waiting_since = Some(t0);
        assert_eq!(next_waiting_since(&task, false, t1), Some(t0));
        let fresh = with_callback(sample(TaskStatus::Queued));
        assert_eq!(next_waiting_since(&fresh, false, t1), Some(t1));

        // Processing: a claim keeps the wait the task had in the queue, and a renewal that
        // extends the lease leaves it too (no index write); a lease ending sooner than the
        // recorded wait brings it forward.
        let lease = t1 + Duration::seconds(60);
        apply(&mut task, &Transition::Start { lease_until: lease }, t1).unwrap();
        assert_eq!(task.waiting_since, Some(t0));
        assert_eq!(task.lease_until, Some(lease));
        let progress = |lease_until| Transition::Progress {
            attempt: 1,
            progress: 50,
            lease_until,
        };
        let renewed = lease + Duration::seconds(5);
        apply(&mut task, &progress(renewed), t1).unwrap();
        assert_eq!(task.waiting_since, Some(t0));
        assert_eq!(task.lease_until, Some(renewed));
        let sooner = t0 - Duration::seconds(1);
        apply(&mut task, &progress(sooner), t1).unwrap();
        assert_eq!(task.waiting_since, Some(sooner));
        apply(&mut task, &progress(renewed), t1).unwrap();
        assert_eq!(task.waiting_since, Some(sooner));
        // A claim with no recorded wait (a task written before waits were recorded) waits
        // from its lease end; so does a worker retaking a lapsed lease.
        let mut unrecorded = sample(TaskStatus::Queued);
        apply(
            &mut unrecorded,
            &Transition::Start { lease_until: lease },
            t1,
        )
        .unwrap();
        assert_eq!(unrecorded.waiting_since, Some(lease));
        let later = lease + Duration::seconds(120);
        let retaken = later + Duration::seconds(60);
        apply(
            &mut unrecorded,
            &Transition::Start {
                lease_until: retaken,
            },
            later,
        )
        .unwrap();
        assert_eq!(unrecorded.waiting_since, Some(retaken));

        // Finished with the first webhook owed: the end; once attempted: nothing.
        let end = t1 + Duration::seconds(2);
        let complete = Transition::Complete {
            attempt: 1,
            outputs: vec![],
        };
        let mut no_hook = task.clone();
        no_hook.callback = None;
        apply(&mut task, &complete, end).unwrap();
        assert_eq!(task.waiting_since, Some(end));
        // A claimed first attempt is still owed: if its worker dies, the sweeper sends it again.
        let claim = Transition::DeliveryClaimed {
            attempt: 0,
            lease_until: end + Duration::seconds(20),
        };
        apply(&mut task, &claim, end).unwrap();
        assert_eq!(task.waiting_since, Some(end));
        let tried_at = Utc::now();
        apply(
            &mut task,
            &attempted(0, Some(500), AfterAttempt::Retry(RETRY)),
            end,
        )
        .unwrap();
        // A retry is owed from its due time: the sweeper sends it if its message is lost (or
        // was never sent: a retry further off than a queue can delay).
        let due = task.callback.as_ref().unwrap().next_attempt_at.unwrap();
        assert!(due >= tried_at + Duration::milliseconds(200));
        assert_eq!(task.waiting_since, Some(due));
        assert_eq!(task.callback_owed(), Some((1, due)));

        // Finished without a webhook: nothing.
        apply(&mut no_hook, &complete, end).unwrap();
        assert_eq!(no_hook.waiting_since, None);

        // Failed or cancelled with a webhook owed: the end; a webhook given up on: nothing.
        let mut failed = with_callback(sample(TaskStatus::Queued));
        apply(&mut failed, &fail(), end).unwrap();
        assert_eq!(failed.waiting_since, Some(end));
        apply(
            &mut failed,
            &Transition::DeliveryAbandoned { attempt: 0 },
            end,
        )
        .unwrap();
        assert_eq!(failed.waiting_since, None);
        let mut cancelled = with_callback(sample(TaskStatus::Queued));
        apply(&mut cancelled, &Transition::Cancel, end).unwrap();
        assert_eq!(cancelled.waiting_since, Some(end));
        let mut cancelled = sample(TaskStatus::Queued);
        cancelled.waiting_since = Some(t0);
        apply(&mut cancelled, &Transition::Cancel, end).unwrap();
        assert_eq!(cancelled.waiting_since, None);
        // A refused change leaves it as it was.
        let before = cancelled.clone();
        assert!(apply(&mut cancelled, &fail(), end).is_err());
        assert_eq!(cancelled, before);
    }

    #[test]
    fn each_requeue_doubles_the_wait_before_the_next_up_to_the_cap_and_any_move_resets_it() {
        let after = Duration::seconds(120);
        let t0 = Utc::now();
        let mut task = sample(TaskStatus::Queued);
        task.waiting_since = Some(t0);
        // Swept as soon as it is due, each time: the k-th requeue comes 2^(k-1) sweep_after
        // after the task began waiting, until the gap reaches 2^MAX_REQUEUE_DOUBLINGS.
        let mut now = t0;
        let mut gaps = Vec::new();
        for _ in 0..9 {
            let due_at = task.waiting_since.unwrap() + after;
            gaps.push((due_at - now).num_seconds() / after.num_seconds());
            now = due_at;
            let early = Transition::Requeue {
                cutoff: now - after - Duration::milliseconds(1),
            };
            assert_eq!(
                apply(&mut task, &early, now - Duration::milliseconds(1)),
                Err(TransitionError::NotDue)
            );
            apply(
                &mut task,
                &Transition::Requeue {
                    cutoff: now - after,
                },
                now,
            )
            .unwrap();
        }
        assert_eq!(gaps, vec![1, 1, 2, 4, 8, 16, 32, 32, 32]);
        assert_eq!(task.requeues, 9);
        assert_eq!(task.status, TaskStatus::Queued);
        // Stored and read back, the count stays; a task never requeued writes none.
        let read: Task = serde_json::from_value(serde_json::to_value(&task).unwrap()).unwrap();
        assert_eq!(read.requeues, 9);
        let fresh = serde_json::to_value(sample(TaskStatus::Queued)).unwrap();
        assert!(fresh.get("requeues").is_none());
        // The task moves (a worker takes it): the count starts over.
        apply(
            &mut task,
            &Transition::Start {
                lease_until: now + after,
            },
            now,
        )
        .unwrap();
        assert_eq!(task.requeues, 0);
    }

    #[test]
    fn requeue_restarts_a_due_tasks_wait_and_is_not_due_once_the_task_moved_on() {
        let t0 = Utc::now();
        let sweep = t0 + Duration::seconds(120);
        let mut task = sample(TaskStatus::Queued);
        task.waiting_since = Some(t0);

        // Not waiting long enough yet: not due, nothing changes.
        let before = task.clone();
        let early = Transition::Requeue {
            cutoff: t0 - Duration::milliseconds(1),
        };
        assert_eq!(
            apply(&mut task, &early, sweep),
            Err(TransitionError::NotDue)
        );
        assert_eq!(task, before);

        // Due: the wait restarts now, nothing else changes.
        let due = Transition::Requeue { cutoff: t0 };
        assert_eq!(
            apply(&mut task, &due, sweep),
            Ok(Applied::Changed {
                refund: 0,
                closed: false
            })
        );
        assert_eq!(task.waiting_since, Some(sweep));
        assert_eq!(task.version, before.version + 1);
        assert_eq!(
            Task {
                waiting_since: before.waiting_since,
                version: before.version,
                requeues: 0,
                slot_wait_at: None,
                ..task.clone()
            },
            before
        );
        assert_eq!(task.requeues, 1);
        // A second sweeper that read the same version finds it not due any more.
        assert_eq!(apply(&mut task, &due, sweep), Err(TransitionError::NotDue));

        // Moved on: a worker took it meanwhile, its lease running past the sweep's horizon.
        let mut taken = before.clone();
        let lease = sweep + Duration::seconds(60);
        apply(&mut taken, &Transition::Start { lease_until: lease }, sweep).unwrap();
        let due_then = Transition::Requeue {
            cutoff: sweep - Duration::seconds(1),
        };
        assert_eq!(
            apply(&mut taken, &due_then, sweep),
            Err(TransitionError::NotDue)
        );
        // ... and once that lease is long over, the processing task is due again; its lease is
        // left to the worker that takes it over.
        let much_later = lease + Duration::seconds(120);
        let due_later = Transition::Requeue { cutoff: lease };
        apply(&mut taken, &due_later, much_later).unwrap();
        assert_eq!(taken.waiting_since, Some(much_later));
        assert_eq!(taken.lease_until, Some(lease));
        assert_eq!(taken.status, TaskStatus::Processing);

        // Moved on: it finished with nothing owed.
        let mut done = before.clone();
        apply(&mut done, &Transition::Cancel, sweep).unwrap();
        assert_eq!(apply(&mut done, &due, sweep), Err(TransitionError::NotDue));

        // A due task that owes nothing (written by an older version, say) leaves the sweep.
        let mut stale = done.clone();
        stale.waiting_since = Some(t0);
        apply(&mut stale, &due, sweep).unwrap();
        assert_eq!(stale.waiting_since, None);
        assert_eq!(apply(&mut stale, &due, sweep), Err(TransitionError::NotDue));
    }

    #[test]
    fn a_long_run_moves_the_index_only_when_the_sweeper_finds_its_lease_renewed() {
        let t0 = Utc::now();
        let lease = t0 + Duration::seconds(60);
        let mut task = sample(TaskStatus::Queued);
        apply(&mut task, &Transition::Start { lease_until: lease }, t0).unwrap();
        // Progress renews the lease ten times; the recorded wait stays at the first lease end.
        for i in 1..=10 {
            let renew = Transition::Progress {
                attempt: 1,
                progress: i * 9,
                lease_until: lease + Duration::seconds(i64::from(i) * 30),
            };
            apply(&mut task, &renew, t0 + Duration::seconds(i64::from(i) * 30)).unwrap();
        }
        assert_eq!(task.waiting_since, Some(lease));
        let renewed = task.lease_until.unwrap();
        // A sweep after the first lease end finds it: the worker is alive, so it is not
        // requeued, and the wait moves to the lease end.
        let cutoff = lease + Duration::seconds(1);
        let sweep = cutoff + Duration::seconds(60);
        let before = task.clone();
        assert_eq!(
            apply(&mut task, &Transition::Requeue { cutoff }, sweep),
            Err(TransitionError::NotDue)
        );
        assert_eq!(task, before);
        apply(&mut task, &Transition::Reindex { cutoff }, sweep).unwrap();
        assert_eq!(task.waiting_since, Some(renewed));
        assert_eq!((task.requeues, task.version), (0, before.version + 1));
        // Not again until the wait it moved to is due.
        assert_eq!(
            apply(&mut task, &Transition::Reindex { cutoff }, sweep),
            Err(TransitionError::NotDue)
        );
        // A lease that ran out is due for a requeue, not a reindex.
        let later = renewed + Duration::seconds(5);
        assert_eq!(
            apply(&mut task, &Transition::Reindex { cutoff: later }, later),
            Err(TransitionError::NotDue)
        );
        apply(&mut task, &Transition::Requeue { cutoff: later }, later).unwrap();
        // Queued tasks are never reindexed.
        let mut queued = sample(TaskStatus::Queued);
        queued.waiting_since = Some(t0);
        assert_eq!(
            apply(&mut queued, &Transition::Reindex { cutoff: lease }, lease),
            Err(TransitionError::NotDue)
        );
    }

    const RETRY: std::time::Duration = std::time::Duration::from_millis(200);

    fn attempted(attempt: u32, status_code: Option<u16>, next: AfterAttempt) -> Transition {
        Transition::DeliveryAttempted {
            attempt,
            at: Utc::now(),
            status_code,
            error: status_code.is_none().then(|| "timed out".to_string()),
            next,
        }
    }

    /// A finished task whose first webhook is owed.
    fn owing_a_webhook() -> Task {
        let now = Utc::now();
        let mut task = with_callback(sample(TaskStatus::Queued));
        apply(&mut task, &Transition::Cancel, now).unwrap();
        assert!(task.first_callback_owed());
        task
    }

    #[test]
    fn after_an_attempt_2xx_delivers_410_fails_and_anything_else_retries_while_the_schedule_lasts()
    {
        let schedule = [RETRY, RETRY * 2];
        for code in [200, 201, 204, 299] {
            assert_eq!(
                AfterAttempt::decide(Some(code), 0, &schedule),
                AfterAttempt::Delivered
            );
            assert_eq!(
                AfterAttempt::decide(Some(code), 2, &schedule),
                AfterAttempt::Delivered,
                "the last attempt delivers too"
            );
        }
        assert_eq!(
            AfterAttempt::decide(Some(410), 0, &schedule),
            AfterAttempt::Failed
        );
        for answer in [Some(500), Some(302), Some(404), Some(199), Some(300), None] {
            assert_eq!(
                AfterAttempt::decide(answer, 0, &schedule),
                AfterAttempt::Retry(RETRY),
                "{answer:?}"
            );
            assert_eq!(
                AfterAttempt::decide(answer, 1, &schedule),
                AfterAttempt::Retry(RETRY * 2)
            );
            assert_eq!(
                AfterAttempt::decide(answer, 2, &schedule),
                AfterAttempt::Failed
            );
            assert_eq!(
                AfterAttempt::decide(answer, 0, &[]),
                AfterAttempt::Failed,
                "no retries configured"
            );
        }
        assert_eq!(AfterAttempt::Retry(RETRY).state(), CallbackState::Pending);
        assert_eq!(AfterAttempt::Delivered.state(), CallbackState::Delivered);
        assert_eq!(AfterAttempt::Failed.state(), CallbackState::Failed);
    }

    #[test]
    fn delivery_attempts_are_recorded_in_order_and_a_stale_or_duplicate_one_is_refused() {
        let now = Utc::now();
        let mut task = owing_a_webhook();
        let v = task.version;
        assert_eq!(
            apply(
                &mut task,
                &attempted(0, Some(500), AfterAttempt::Retry(RETRY)),
                now
            ),
            Ok(Applied::Changed {
                refund: 0,
                closed: false
            })
        );
        assert_eq!(task.version, v + 1);
        let cb = task.callback.clone().unwrap();
        assert_eq!(
            (cb.state, cb.attempts, cb.last_status_code),
            (CallbackState::Pending, 1, Some(500))
        );
        assert_eq!(cb.deliveries.len(), 1);
        assert!(!task.first_callback_owed());

        // The same attempt again (a second worker holding a duplicate message) or an older one
        // cannot overwrite the record.
        let recorded = task.clone();
        for stale in [
            attempted(0, Some(200), AfterAttempt::Delivered),
            attempted(0, Some(500), AfterAttempt::Retry(RETRY)),
            attempted(2, Some(200), AfterAttempt::Delivered),
            Transition::DeliveryClaimed {
                attempt: 0,
                lease_until: now + Duration::seconds(20),
            },
            Transition::DeliveryAbandoned { attempt: 0 },
        ] {
            assert_eq!(
                apply(&mut task, &stale, now),
                Err(TransitionError::StaleAttempt),
                "{stale:?}"
            );
            assert_eq!(task, recorded);
        }

        // The next attempt: no answer, then retries exhausted.
        apply(&mut task, &attempted(1, None, AfterAttempt::Failed), now).unwrap();
        let cb = task.callback.clone().unwrap();
        assert_eq!(
            (cb.state, cb.attempts, cb.last_status_code),
            (CallbackState::Failed, 2, Some(500)),
            "last_status_code stays the last answer"
        );
        assert_eq!(cb.deliveries[1].error.as_deref(), Some("timed out"));
        // Settled: nothing more is recorded, claimed or given up.
        let settled = task.clone();
        for t in [
            attempted(2, Some(200), AfterAttempt::Delivered),
            Transition::DeliveryClaimed {
                attempt: 2,
                lease_until: now,
            },
            Transition::DeliveryAbandoned { attempt: 2 },
        ] {
            assert_eq!(
                apply(&mut task, &t, now),
                Err(TransitionError::CallbackSettled),
                "{t:?}"
            );
            assert_eq!(task, settled);
        }

        // Delivered on the first attempt.
        let mut task = owing_a_webhook();
        apply(
            &mut task,
            &attempted(0, Some(204), AfterAttempt::Delivered),
            now,
        )
        .unwrap();
        let cb = task.callback.unwrap();
        assert_eq!(
            (cb.state, cb.attempts, cb.last_status_code),
            (CallbackState::Delivered, 1, Some(204))
        );
    }

    #[test]
    fn webhook_transitions_need_a_terminal_task_with_a_callback() {
        let now = Utc::now();
        let claim = Transition::DeliveryClaimed {
            attempt: 0,
            lease_until: now + Duration::seconds(20),
        };
        let record = attempted(0, Some(200), AfterAttempt::Delivered);
        let abandon = Transition::DeliveryAbandoned { attempt: 0 };
        for t in [&claim, &record, &abandon] {
            for status in [TaskStatus::Queued, TaskStatus::Processing] {
                let mut open = with_callback(sample(status));
                let before = open.clone();
                assert_eq!(
                    apply(&mut open, t, now),
                    Err(TransitionError::WrongState(status)),
                    "{t:?}"
                );
                assert_eq!(open, before);
            }
            let mut no_hook = sample(TaskStatus::Queued);
            apply(&mut no_hook, &Transition::Cancel, now).unwrap();
            assert_eq!(
                apply(&mut no_hook, t, now),
                Err(TransitionError::NoCallback)
            );
        }
    }

    #[test]
    fn one_worker_claims_an_attempt_until_its_claim_runs_out() {
        let now = Utc::now();
        let lease_until = now + Duration::seconds(20);
        let claim = |lease_until| Transition::DeliveryClaimed {
            attempt: 0,
            lease_until,
        };
        let read = owing_a_webhook();

        // Two workers read the same version; the first claim is written...
        let mut first = read.clone();
        assert_eq!(
            apply(&mut first, &claim(lease_until), now),
            Ok(Applied::Changed {
                refund: 0,
                closed: false
            })
        );
        assert_eq!(first.lease_until, Some(lease_until));
        assert_eq!(first.version, read.version + 1);
        assert_eq!(first.callback, read.callback, "a claim records nothing");
        assert!(
            first.first_callback_owed(),
            "a claimed attempt is still owed"
        );
        // ... the second worker's conditional write fails, and on the task as it now is its
        // claim is refused: it does not send.
        let mut second = first.clone();
        assert_eq!(
            apply(
                &mut second,
                &claim(lease_until),
                now + Duration::seconds(19)
            ),
            Err(TransitionError::LeaseHeld)
        );
        assert_eq!(second, first);
        // A dead letter does not give up an attempt a worker is sending.
        assert_eq!(
            apply(
                &mut second,
                &Transition::DeliveryAbandoned { attempt: 0 },
                now
            ),
            Err(TransitionError::LeaseHeld)
        );

        // The holder records its attempt, which ends the claim; the duplicate is stale now.
        let mut done = first.clone();
        apply(
            &mut done,
            &attempted(0, Some(200), AfterAttempt::Delivered),
            now,
        )
        .unwrap();
        assert_eq!(done.lease_until, None);
        assert_eq!(
            apply(&mut done, &claim(lease_until), now),
            Err(TransitionError::StaleAttempt)
        );

        // A claim whose worker died runs out: another worker takes the attempt over, and the
        // attempt is recorded once.
        let later = lease_until;
        let mut taken = first.clone();
        let new_lease = later + Duration::seconds(20);
        apply(&mut taken, &claim(new_lease), later).unwrap();
        assert_eq!(taken.lease_until, Some(new_lease));
        apply(
            &mut taken,
            &attempted(0, Some(500), AfterAttempt::Retry(RETRY)),
            later,
        )
        .unwrap();
        let cb = taken.callback.as_ref().unwrap();
        assert_eq!((cb.attempts, cb.deliveries.len()), (1, 1));
        // The next attempt is claimed afresh.
        apply(
            &mut taken,
            &Transition::DeliveryClaimed {
                attempt: 1,
                lease_until: new_lease,
            },
            later,
        )
        .unwrap();

        // An expired claim does not stop a dead letter either.
        let mut abandoned = first.clone();
        apply(
            &mut abandoned,
            &Transition::DeliveryAbandoned { attempt: 0 },
            later,
        )
        .unwrap();
        let cb = abandoned.callback.as_ref().unwrap();
        assert_eq!((cb.state, cb.attempts), (CallbackState::Failed, 0));
        assert_eq!(abandoned.lease_until, None);
        assert_eq!(
            abandoned.waiting_since, None,
            "a webhook given up on is not owed"
        );
    }

    /// A processing task whose attempt 1 prepared an upstream run and started it as `up_1`.
    fn started_upstream(now: DateTime<Utc>) -> Task {
        let mut t = sample(TaskStatus::Queued);
        let lease = now + Duration::seconds(60);
        apply(&mut t, &Transition::Start { lease_until: lease }, now).unwrap();
        let token = "secret".to_string();
        apply(
            &mut t,
            &Transition::UpstreamPrepared { attempt: 1, token },
            now,
        )
        .unwrap();
        let again = Transition::UpstreamPrepared {
            attempt: 1,
            token: "other".into(),
        };
        assert_eq!(apply(&mut t, &again, now), Ok(Applied::Unchanged));
        let started = Transition::UpstreamStarted {
            attempt: 1,
            id: "up_1".into(),
            check_by: now + Duration::seconds(5),
        };
        apply(&mut t, &started, now).unwrap();
        t
    }

    fn report(check: Option<u32>, progress: Option<u8>, logs: Option<&str>) -> Transition {
        Transition::UpstreamReported {
            id: "up_1".into(),
            check,
            progress,
            logs: logs.map(str::to_string),
            restarted: false,
            unreachable: false,
            check_by: None,
        }
    }

    #[test]
    fn an_upstream_run_keeps_its_first_token_and_counts_each_check_once() {
        let now = Utc::now();
        let mut t = started_upstream(now);
        let run = t.upstream.clone().unwrap();
        assert_eq!(
            (run.token.as_str(), run.id.as_deref()),
            ("secret", Some("up_1"))
        );
        assert_eq!(
            t.lease_until,
            Some(now + Duration::seconds(5)),
            "a check is due"
        );
        apply(&mut t, &report(Some(0), Some(40), Some("40%")), now).unwrap();
        // A copy of check 0 finds its number taken.
        assert_eq!(
            apply(&mut t, &report(Some(0), Some(50), None), now),
            Err(TransitionError::StaleAttempt)
        );
        // A callback about another run, or progress going back, changes nothing it should not.
        let mut other = report(None, Some(90), None);
        if let Transition::UpstreamReported { id, .. } = &mut other {
            *id = "up_2".into();
        }
        assert_eq!(
            apply(&mut t, &other, now),
            Err(TransitionError::StaleAttempt)
        );
        apply(&mut t, &report(None, Some(10), None), now).unwrap();
        assert_eq!(t.progress, 40);
        let long = "x".repeat(MAX_LOG_TAIL + 100) + "é";
        apply(&mut t, &report(None, None, Some(&long)), now).unwrap();
        let logs = &t.upstream.as_ref().unwrap().logs;
        assert!(logs.len() <= MAX_LOG_TAIL && logs.ends_with('é'));
        assert_eq!(t.upstream.as_ref().unwrap().checks, 1);
    }

    #[test]
    fn one_check_collects_an_ended_runs_outputs_at_a_time() {
        let now = Utc::now();
        let mut t = started_upstream(now);
        let until = now + Duration::minutes(15);
        let collect = |check| Transition::UpstreamCollecting {
            id: "up_1".into(),
            check,
            until,
        };
        apply(&mut t, &collect(0), now).unwrap();
        assert_eq!(t.lease_until, Some(until), "the sweeper waits for it");
        // A copy of the same check, and the next check while the collection runs, are refused.
        assert_eq!(
            apply(&mut t, &collect(0), now),
            Err(TransitionError::StaleAttempt)
        );
        assert_eq!(
            apply(&mut t, &collect(1), now),
            Err(TransitionError::LeaseHeld)
        );
        // Once it has run out (its worker died), the next check may collect.
        apply(&mut t, &collect(1), until + Duration::seconds(1)).unwrap();
        assert_eq!(t.upstream.as_ref().unwrap().checks, 2);
    }

    #[test]
    fn an_upstream_run_ends_once_and_refunds_once() {
        let now = Utc::now();
        let mut t = started_upstream(now);
        let failed = Transition::UpstreamEnded {
            id: "up_1".into(),
            outcome: Err(TaskFailure {
                code: "generation_failed".into(),
                message: "boom".into(),
            }),
            logs: Some("last words".into()),
        };
        assert_eq!(
            apply(&mut t, &failed, now),
            Ok(Applied::Changed {
                refund: 7,
                closed: true
            })
        );
        assert_eq!(t.upstream.as_ref().unwrap().logs, "last words");
        // The duplicate, and a late success, are refused.
        assert!(apply(&mut t, &failed, now).is_err());
        let ok = Transition::UpstreamEnded {
            id: "up_1".into(),
            outcome: Ok(vec![]),
            logs: None,
        };
        assert_eq!(
            apply(&mut t, &ok, now),
            Err(TransitionError::WrongState(TaskStatus::Failed))
        );
        // A fast run's callback may end a task whose start is not recorded yet.
        let mut early = sample(TaskStatus::Queued);
        apply(&mut early, &Transition::Start { lease_until: now }, now).unwrap();
        let token = "t".to_string();
        apply(
            &mut early,
            &Transition::UpstreamPrepared { attempt: 1, token },
            now,
        )
        .unwrap();
        apply(&mut early, &ok, now).unwrap();
        assert_eq!(early.status, TaskStatus::Completed);
        assert_eq!(early.upstream.unwrap().id.as_deref(), Some("up_1"));
    }

    #[test]
    fn an_upstream_at_capacity_puts_the_task_back_without_using_an_attempt() {
        let now = Utc::now();
        let mut t = sample(TaskStatus::Queued);
        apply(&mut t, &Transition::Start { lease_until: now }, now).unwrap();
        let token = "t".to_string();
        apply(
            &mut t,
            &Transition::UpstreamPrepared { attempt: 1, token },
            now,
        )
        .unwrap();
        let later = now + Duration::seconds(3);
        let busy = Transition::Deferred {
            attempt: 1,
            count_attempt: false,
        };
        apply(&mut t, &busy, later).unwrap();
        assert_eq!(
            (t.status, t.attempts, t.lease_until),
            (TaskStatus::Queued, 0, None)
        );
        // Nothing started, but the callback token is kept for an upstream that did accept it.
        let kept = t.upstream.clone().unwrap();
        assert_eq!((kept.token.as_str(), kept.id, kept.checks), ("t", None, 0));
        assert_eq!(t.waiting_since, Some(later), "its wait starts again");
        // A slot wait renews the wait, unless another message just did (that copy ends).
        let renew = |not_since| Transition::StillWaiting { not_since };
        let much_later = later + Duration::seconds(10);
        apply(
            &mut t,
            &renew(much_later - Duration::seconds(2)),
            much_later,
        )
        .unwrap();
        assert_eq!(t.waiting_since, Some(much_later));
        assert_eq!(
            apply(
                &mut t,
                &renew(much_later - Duration::seconds(2)),
                much_later + Duration::seconds(1)
            ),
            Err(TransitionError::NotDue)
        );
        // A wait the sweeper moved into the future is kept.
        let mut backed_off = t.clone();
        let future = much_later + Duration::minutes(30);
        backed_off.waiting_since = Some(future);
        let after = much_later + Duration::seconds(5);
        apply(&mut backed_off, &renew(after - Duration::seconds(2)), after).unwrap();
        assert_eq!(backed_off.waiting_since, Some(future));
        // Still cancellable, as any queued task.
        apply(&mut t, &Transition::Cancel, later).unwrap();
        // A started run cannot be deferred.
        let mut started = started_upstream(now);
        assert!(apply(&mut started, &busy, now).is_err());
    }
}
