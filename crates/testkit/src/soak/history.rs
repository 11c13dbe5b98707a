//! What a soak run records: one [`Answer`] per request, with what it showed of a task
//! ([`Seen`]), and the accounts as the check sees them ([`AccountState`]).

use std::time::Duration;

use serde_json::Value;
use tasklane_core::task::{Task, TaskStatus};
use tasklane_core::view::rfc3339;

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
    pub(crate) fn as_str(self) -> &'static str {
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
    pub(crate) fn status_label(&self) -> String {
        match self.http {
            Some(s) => s.to_string(),
            None => "transport".to_string(),
        }
    }

    pub(crate) fn describe(&self) -> String {
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
