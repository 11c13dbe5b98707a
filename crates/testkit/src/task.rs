//! [`TaskBuilder`]: a [`Task`] for a test, as submit would store it unless told otherwise, so a
//! test names only what it is about instead of writing out every field.

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use tasklane_core::task::{Callback, Task, TaskInput, TaskStatus};

/// Builds a [`Task`]:
///
/// ```
/// use tasklane_core::task::TaskStatus;
/// use tasklane_testkit::TaskBuilder;
///
/// let task = TaskBuilder::echo("acct_1")
///     .status(TaskStatus::Queued)
///     .callback("http://127.0.0.1:9/hook")
///     .build();
/// assert_eq!(task.model, "echo");
/// assert_eq!(task.cost.credits, 1);
/// assert_eq!(task.waiting_since, Some(task.created_at));
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct TaskBuilder {
    task: Task,
}

/// Ids made in one process sort in the order they were made, like the API's.
static IDS: Mutex<ulid::Generator> = Mutex::new(ulid::Generator::new());

/// A fresh task id (`task_` + a ULID, monotonic within the process).
pub fn new_task_id() -> String {
    let id = IDS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .generate()
        .unwrap_or_else(|_| ulid::Ulid::new());
    format!("task_{id}")
}

impl TaskBuilder {
    /// A queued `echo` task of `account_id` as submit stores it: a fresh id ([`new_task_id`]),
    /// action `generate`, prompt `a test task`, 1 credit debited, no callback, no metadata,
    /// created now, version 1, no attempt yet, waiting on its run since its creation
    /// (`waiting_since`).
    pub fn echo(account_id: &str) -> Self {
        let input = TaskInput {
            prompt: Some("a test task".into()),
            duration: None,
            params: serde_json::Map::new(),
        };
        TaskBuilder {
            task: Task::queued(new_task_id(), account_id, "echo", input, 1, Utc::now()),
        }
    }

    /// Its id.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.task.id = id.into();
        self
    }

    /// Its model (the price stays as set: see [`TaskBuilder::credits`]).
    pub fn model(mut self, model: &str) -> Self {
        self.task.model = model.to_string();
        self
    }

    /// Its state (nothing else changes with it).
    pub fn status(mut self, status: TaskStatus) -> Self {
        self.task.status = status;
        self
    }

    /// Its prompt.
    pub fn prompt(mut self, prompt: &str) -> Self {
        self.task.input.prompt = Some(prompt.to_string());
        self
    }

    /// Its duration in seconds.
    pub fn duration(mut self, seconds: u32) -> Self {
        self.task.input.duration = Some(seconds);
        self
    }

    /// The credits it was charged.
    pub fn credits(mut self, credits: u64) -> Self {
        self.task.cost.credits = credits;
        self
    }

    /// Whether its credits were refunded.
    pub fn refunded(mut self, refunded: bool) -> Self {
        self.task.cost.refunded = refunded;
        self
    }

    /// A webhook to `url`, pending, nothing attempted yet.
    pub fn callback(mut self, url: &str) -> Self {
        self.task.callback = Some(Callback::pending(url));
        self
    }

    /// When it was submitted (`waiting_since` stays as set: see [`TaskBuilder::waiting_since`]).
    pub fn created_at(mut self, at: DateTime<Utc>) -> Self {
        self.task.created_at = at;
        self
    }

    /// When it ended.
    pub fn completed_at(mut self, at: DateTime<Utc>) -> Self {
        self.task.completed_at = Some(at);
        self
    }

    /// Processing attempts started.
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.task.attempts = attempts;
        self
    }

    /// Its version.
    pub fn version(mut self, version: u64) -> Self {
        self.task.version = version;
        self
    }

    /// Since when it waits on work that may have been lost (`None`: nothing owed).
    pub fn waiting_since(mut self, at: Option<DateTime<Utc>>) -> Self {
        self.task.waiting_since = at;
        self
    }

    /// The task.
    pub fn build(self) -> Task {
        self.task
    }
}
