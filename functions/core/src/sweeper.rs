//! The sweeper: closes the gap between the store and the queue.
//!
//! A task is written before its work message is sent, so a crash, a failed send or a lost
//! message can leave a task with no work behind it: queued with no `Run`, processing under a
//! lease nobody renews, or finished with its first webhook never sent. Every task records since
//! when it has been waiting ([`Task::waiting_since`], kept by [`crate::task::apply`]); the sweeper
//! finds the tasks that have waited longer than [`crate::Config::sweep_after`], restarts their
//! wait with a conditional write, and enqueues their work again. Duplicate messages are no-ops
//! for the processor, so sweeping a task whose message was only slow is harmless.
//!
//! It must not multiply a healthy backlog, though: a task queued behind thousands of others
//! waits longer than `sweep_after` with its message still in the queue, and re-enqueuing it on
//! every sweep would add one message per task per `sweep_after`, lengthening the very queue it
//! waits in. So each requeue doubles the wait before the next one ([`Transition::Requeue`],
//! [`Task::requeues`], up to [`crate::task::MAX_REQUEUE_DOUBLINGS`]): the k-th comes
//! `2^(k-1) * sweep_after` into the wait, a few duplicates per task (logarithmic in its wait)
//! instead of one per sweep, while a task whose message was really lost is still sent one
//! `sweep_after` after its wait began. Any other change to the task starts the count over.
//!
//! A processing task keeps the wait it had in the queue (or its lease end, if sooner): neither
//! the claim nor renewals (progress) move it, so they do not rewrite the store's index of
//! waiting tasks. A sweep that finds such a task with its lease still held moves the wait to
//! the lease end instead ([`Transition::Reindex`]) and enqueues nothing: one write per
//! `sweep_after` of a long run, none for a task that ends sooner.
//!
//! Locally the server runs [`sweep`] every [`crate::Config::sweep_interval`]; on AWS an
//! EventBridge schedule invokes the `sweeper` function.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::App;
use crate::ports::{PortError, PortResult, WorkMessage};
use crate::task::{Task, Transition, lease_held_past};

/// Tasks read per page.
const PAGE: usize = 100;
/// Pages per sweep; what is left waits for the next sweep.
const MAX_PAGES: usize = 50;

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Due tasks found.
    pub due: usize,
    /// `Run` messages enqueued again (queued or processing tasks).
    pub runs: usize,
    /// Webhook attempts enqueued: first attempts whose message was lost, and retries that
    /// are due (a retry further off than the queue can delay has no message until then).
    pub callbacks: usize,
    /// Tasks that moved on between the read and the write (nothing to do).
    pub moved_on: usize,
    /// Processing tasks whose worker renewed its lease since their wait was recorded: the
    /// wait moved to the lease end ([`Transition::Reindex`]), nothing enqueued.
    pub reindexed: usize,
}

/// The message a due task waits on, if any.
fn owed(task: &Task) -> Option<WorkMessage> {
    if task.is_open() {
        Some(WorkMessage::Run {
            task_id: task.id.clone(),
        })
    } else if let Some((attempt, _)) = task.callback_owed() {
        Some(WorkMessage::Deliver {
            task_id: task.id.clone(),
            attempt,
            not_before: None,
        })
    } else {
        None
    }
}

/// Re-enqueues the work of every task that has waited since `now - sweep_after` or earlier.
/// A backend error stops the sweep (the rest is found by the next one).
pub async fn sweep(app: &App, now: DateTime<Utc>) -> PortResult<SweepReport> {
    let after = chrono::Duration::from_std(app.config.sweep_after).unwrap_or(chrono::Duration::MAX);
    let since = now - after;
    let mut report = SweepReport::default();
    for _ in 0..MAX_PAGES {
        let due = app.store.due_tasks(since, PAGE).await?;
        report.due += due.len();
        for task in &due {
            let held = lease_held_past(task, since);
            let change = if held {
                Transition::Reindex { cutoff: since }
            } else {
                Transition::Requeue { cutoff: since }
            };
            let task = match app.store.update_task_from(task, &change).await {
                Ok(t) => t,
                Err(PortError::Rejected(_) | PortError::NotFound) => {
                    report.moved_on += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if held {
                report.reindexed += 1;
                continue;
            }
            let Some(msg) = owed(&task) else {
                continue;
            };
            tracing::warn!(task_id = %task.id, status = %task.status, message = ?msg, "sweeper: work re-enqueued");
            app.queue.enqueue(&msg, Duration::ZERO).await?;
            match msg {
                WorkMessage::Run { .. } | WorkMessage::Check { .. } => report.runs += 1,
                WorkMessage::Deliver { .. } => report.callbacks += 1,
            }
        }
        if due.len() < PAGE {
            break;
        }
    }
    Ok(report)
}
