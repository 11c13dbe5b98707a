//! The ports: what the core needs from storage, queueing, blob hosting and the models.
//!
//! Adapters (embedded SQLite and files locally; DynamoDB, SQS and S3 on AWS) implement the
//! store, queue and blob traits; providers ([`crate::providers`]) implement [`Generator`].
//! The core never names a concrete backend or provider.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::account::Account;
use crate::task::{Task, TaskStatus, Transition, TransitionError};

/// A boxed error from a backend, kept as the cause (logged, never shown to clients).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors every port can return. Adapters map their backend's failures onto these.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The item does not exist.
    #[error("not found")]
    NotFound,
    /// The account has too few credits for the debit.
    #[error("insufficient credits: {available} available")]
    InsufficientCredits {
        /// Credits the account holds.
        available: u64,
    },
    /// The account already has as many open (queued or processing) tasks as allowed.
    #[error("too many open tasks (limit {limit})")]
    TooManyOpenTasks {
        /// The cap.
        limit: u64,
    },
    /// The idempotency reservation is no longer ours (expired and taken by another request).
    #[error("idempotency reservation lost")]
    ReservationLost,
    /// The state machine refused the transition.
    #[error(transparent)]
    Rejected(#[from] TransitionError),
    /// The backend is temporarily unable to serve (throttled, timed out, unreachable).
    #[error("backend unavailable")]
    Unavailable(#[source] BoxError),
    /// Anything else.
    #[error("backend failure")]
    Internal(#[source] BoxError),
    /// The caller must stop where it is and leave its work message unsettled: the message comes
    /// back after its visibility timeout, a task's lease lapses, as if the worker had died
    /// between two steps. No adapter returns it; a port wrapper may (fault injection in tests
    /// and soak runs, see `tasklane-testkit`). The worker loop ([`crate::processor::run_worker`])
    /// leaves the message as it is; the API answers 503.
    #[error("halted: the caller stops and leaves its message unsettled")]
    Halted,
}

impl PortError {
    /// Wraps any error as [`PortError::Internal`].
    pub fn internal(e: impl Into<BoxError>) -> Self {
        PortError::Internal(e.into())
    }
    /// Wraps any error as [`PortError::Unavailable`].
    pub fn unavailable(e: impl Into<BoxError>) -> Self {
        PortError::Unavailable(e.into())
    }
}

/// Result alias for port calls.
pub type PortResult<T> = Result<T, PortError>;

/// Outcome of reserving an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// The key is ours; finish with [`TaskStore::insert_task`] or give it back with
    /// [`TaskStore::release_idempotency`].
    Reserved {
        /// Proves ownership of the reservation.
        token: String,
    },
    /// Another request holds the key and has not finished.
    InProgress {
        /// Hash of that request's body.
        request_hash: String,
    },
    /// A request with this key created a task.
    Completed {
        /// Hash of that request's body.
        request_hash: String,
        /// The task it created.
        task_id: String,
    },
}

/// The idempotency record a submit finalizes atomically with the task it creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyClaim {
    /// The client's `Idempotency-Key`.
    pub key: String,
    /// The reservation token from [`TaskStore::reserve_idempotency`].
    pub token: String,
}

/// Filters and position for listing an account's tasks, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only tasks in this state.
    pub status: Option<TaskStatus>,
    /// Only tasks of this model.
    pub model: Option<String>,
    /// Page size, 1..=100.
    pub limit: usize,
    /// Only tasks with an id strictly below this one (the previous page's last id).
    pub before: Option<String>,
}

/// One page of tasks.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskPage {
    /// Tasks, newest first.
    pub tasks: Vec<Task>,
    /// Where the next page starts when more tasks may follow: the last id this page read,
    /// which on a filtered page may be a task that did not match (the page may even be empty).
    pub next_before: Option<String>,
}

/// Storage for accounts, tasks and idempotency records.
#[async_trait]
pub trait TaskStore: Send + Sync {
    /// Creates an account. Fails if the id or key hash exists.
    async fn create_account(&self, account: &Account) -> PortResult<()>;
    /// Looks an account up by the SHA-256 of its API key (one read).
    async fn account_by_key_hash(&self, key_hash: &str) -> PortResult<Option<Account>>;
    /// Reads an account.
    async fn account(&self, account_id: &str) -> PortResult<Option<Account>>;
    /// Adds credits to an account (and to its `granted` total).
    async fn grant_credits(&self, account_id: &str, credits: u64) -> PortResult<Account>;
    /// Replaces an account's key hash (key rotation).
    async fn set_key_hash(&self, account_id: &str, key_hash: &str) -> PortResult<()>;

    /// Reserves `key` for a request with body hash `request_hash`. A reservation not finished
    /// within `in_flight` may be taken over; a finished record lives for `retain`.
    async fn reserve_idempotency(
        &self,
        account_id: &str,
        key: &str,
        request_hash: &str,
        now: DateTime<Utc>,
        in_flight: Duration,
        retain: Duration,
    ) -> PortResult<Reservation>;
    /// Gives a reservation back (the request created nothing).
    async fn release_idempotency(&self, account_id: &str, key: &str, token: &str)
    -> PortResult<()>;

    /// Atomically: debits `task.cost.credits` from the account (refusing with
    /// [`PortError::InsufficientCredits`] rather than going negative), refuses with
    /// [`PortError::TooManyOpenTasks`] when the account already has `max_open` open tasks,
    /// stores the task, and marks the idempotency reservation completed with this task's id.
    async fn insert_task(
        &self,
        task: &Task,
        claim: Option<&IdempotencyClaim>,
        max_open: u64,
    ) -> PortResult<()>;
    /// Reads a task by id (any account; callers scope by `account_id`).
    async fn task(&self, task_id: &str) -> PortResult<Option<Task>>;
    /// Lists an account's tasks, newest first.
    async fn list_tasks(&self, account_id: &str, query: &ListQuery) -> PortResult<TaskPage>;
    /// Tasks of any account that have waited on possibly lost work since `cutoff` or
    /// earlier ([`Task::waiting_since`]), oldest first, at most `limit`.
    async fn due_tasks(&self, cutoff: DateTime<Utc>, limit: usize) -> PortResult<Vec<Task>>;
    /// Applies `transition` with [`crate::task::apply`] and writes the result conditioned on the
    /// version read, together with any refund (and, when the task closes, one less open task on
    /// its account), in one atomic write. Returns the task as stored.
    async fn update_task(&self, task_id: &str, transition: &Transition) -> PortResult<Task>;
    /// Takes one of the `slots` slots of `pool` for `holder` until `until`, and answers whether
    /// it got one: a holder that has a slot keeps it (until `until`); a slot whose holder's time
    /// ran out is free. Bounds how many runs of a model an upstream gets at once (the catalog's
    /// `concurrency`); a holder that dies without [`TaskStore::release_slot`] frees its slot
    /// when its time runs out.
    async fn acquire_slot(
        &self,
        pool: &str,
        slots: u32,
        holder: &str,
        until: DateTime<Utc>,
    ) -> PortResult<bool>;
    /// Gives `holder`'s slot of `pool` back; nothing when it holds none.
    async fn release_slot(&self, pool: &str, holder: &str) -> PortResult<()>;
    /// Like [`TaskStore::update_task`], starting from `current`, a version of the task the
    /// caller read: an adapter may apply the transition to it and write conditioned on its
    /// version without reading first, falling back to `update_task` when it is stale.
    async fn update_task_from(&self, current: &Task, transition: &Transition) -> PortResult<Task> {
        self.update_task(&current.id, transition).await
    }
}

/// A unit of background work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkMessage {
    /// Run a task's generator.
    Run {
        /// Task to run.
        task_id: String,
    },
    /// Deliver a task's webhook; `attempt` is the number of attempts already made.
    Deliver {
        /// Task whose callback to deliver.
        task_id: String,
        /// Attempts made before this one; a message whose count is stale is dropped.
        attempt: u32,
        /// Not before this time: delays longer than the queue allows are re-enqueued until then.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        not_before: Option<DateTime<Utc>>,
    },
    /// Check on a task's upstream run ([`crate::task::UpstreamRun`]): the upstream's state is
    /// recorded and the next check scheduled, until the run ends. `check` numbers the checks;
    /// a message whose number is not the task's next one is a stale copy and changes nothing.
    Check {
        /// Task whose upstream run to check.
        task_id: String,
        /// The check's number ([`crate::task::UpstreamRun::checks`] when it was scheduled).
        check: u32,
    },
}

impl WorkMessage {
    /// The message for a task's first webhook attempt, enqueued by whoever ends a task whose
    /// first webhook is owed ([`crate::task::Task::first_callback_owed`]).
    pub fn first_delivery(task_id: &str) -> WorkMessage {
        WorkMessage::Deliver {
            task_id: task_id.to_string(),
            attempt: 0,
            not_before: None,
        }
    }

    /// The task the message is about.
    pub fn task_id(&self) -> &str {
        match self {
            WorkMessage::Run { task_id }
            | WorkMessage::Deliver { task_id, .. }
            | WorkMessage::Check { task_id, .. } => task_id,
        }
    }
}

/// The work queue: at-least-once delivery, with optional delay.
#[async_trait]
pub trait WorkQueue: Send + Sync {
    /// Enqueues `message`, visible after `delay`.
    async fn enqueue(&self, message: &WorkMessage, delay: Duration) -> PortResult<()>;
}

/// The two lanes of work: generation (`Run`, `Check`) and webhook delivery (`Deliver`), each on
/// a queue and workers of its own, so that receivers that answer slowly or not at all hold
/// delivery workers only and never the workers that run tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// `Run` and `Check`.
    Work,
    /// `Deliver`.
    Deliveries,
}

impl WorkMessage {
    /// The lane the message travels in.
    pub fn lane(&self) -> Lane {
        match self {
            WorkMessage::Deliver { .. } => Lane::Deliveries,
            WorkMessage::Run { .. } | WorkMessage::Check { .. } => Lane::Work,
        }
    }
}

/// A [`WorkQueue`] that sends each message to the queue of its [`Lane`].
pub struct LaneQueue {
    work: Arc<dyn WorkQueue>,
    deliveries: Arc<dyn WorkQueue>,
}

impl LaneQueue {
    /// Generation work to `work`, webhook deliveries to `deliveries`.
    pub fn new(work: Arc<dyn WorkQueue>, deliveries: Arc<dyn WorkQueue>) -> Self {
        LaneQueue { work, deliveries }
    }
}

#[async_trait]
impl WorkQueue for LaneQueue {
    async fn enqueue(&self, message: &WorkMessage, delay: Duration) -> PortResult<()> {
        match message.lane() {
            Lane::Work => self.work.enqueue(message, delay).await,
            Lane::Deliveries => self.deliveries.enqueue(message, delay).await,
        }
    }
}

/// A message received from a [`MessageSource`], to settle with `ack` or `retry`.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message, or `None` when its body could not be parsed (a poison message).
    pub message: Option<WorkMessage>,
    /// How many times it has been received, this time included.
    pub receive_count: u32,
    /// The source's handle for settling it.
    pub handle: String,
}

/// The consuming side of the work queue, for workers that poll (the local runtime, or a
/// worker outside Lambda); on Lambda the event source mapping polls instead.
#[async_trait]
pub trait MessageSource: Send + Sync {
    /// Receives up to `max` visible messages, hiding them for `visibility`.
    async fn receive(&self, max: usize, visibility: Duration) -> PortResult<Vec<Delivery>>;
    /// Deletes a handled message.
    async fn ack(&self, delivery: &Delivery) -> PortResult<()>;
    /// Makes a received message visible again after `delay`.
    async fn retry(&self, delivery: &Delivery, delay: Duration) -> PortResult<()>;
    /// Waits (at most `max`) until work may be available; returns at once for long-polling sources.
    async fn wait_for_work(&self, max: Duration);
}

/// A URL that grants read access to one blob until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedUrl {
    /// The URL.
    pub url: String,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
}

/// A body read one chunk at a time, for [`BlobStore::put_stream`] (an output's download).
#[async_trait]
pub trait ChunkSource: Send {
    /// The next chunk, `Ok(None)` at the end of the body; `Err` with a reason when the body
    /// broke off before its end (a connection lost mid-body).
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, String>;
}

/// A [`ChunkSource`] over an iterator of chunks (bodies already at hand, and tests).
#[derive(Debug, Clone)]
pub struct ChunkIter<I>(pub I);

#[async_trait]
impl<I> ChunkSource for ChunkIter<I>
where
    I: Iterator<Item = Result<Bytes, String>> + Send,
{
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
        self.0.next().transpose()
    }
}

/// Why [`BlobStore::put_stream`] stored nothing although the blob store itself worked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamRefused {
    /// The body was longer than the `max_bytes` allowed.
    #[error("the body is larger than {limit} bytes")]
    TooBig {
        /// The cap that was passed.
        limit: u64,
    },
    /// The [`ChunkSource`] failed before the body's end.
    #[error("the body broke off: {0}")]
    Broken(String),
}

/// Storage for outputs, handed out as signed expiring URLs.
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Stores `bytes` under `key` (overwriting: writes are idempotent).
    async fn put(&self, key: &str, bytes: Bytes, content_type: &str) -> PortResult<()>;
    /// Stores the body `body` yields under `key` as it arrives, holding at most a bounded part
    /// of it in memory (outputs may be videos of hundreds of MB; a Lambda has 512 MB), and
    /// returns its length. The blob appears whole or not at all: a body longer than
    /// `max_bytes` ([`StreamRefused::TooBig`], noticed as soon as it goes over, without
    /// reading further) or one that breaks off ([`StreamRefused::Broken`]) stores nothing and
    /// leaves what `key` held before as it was, and so does a backend failure (`Err`), which
    /// is kept apart because it is worth retrying while the other two are about the body.
    async fn put_stream(
        &self,
        key: &str,
        content_type: &str,
        body: &mut dyn ChunkSource,
        max_bytes: u64,
    ) -> PortResult<Result<u64, StreamRefused>>;
    /// Signs a GET URL for `key`, valid for at most `ttl`.
    async fn presign_get(&self, key: &str, ttl: Duration) -> PortResult<SignedUrl>;
}

// ---------------------------------------------------------------------------------------------
// Generators: what runs a model
// ---------------------------------------------------------------------------------------------

/// What a generator is asked to do.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    /// Task id (for logs and deterministic seeds).
    pub task_id: &'a str,
    /// Action.
    pub action: &'a str,
    /// Prompt.
    pub prompt: Option<&'a str>,
    /// Duration in seconds.
    pub duration: Option<u32>,
    /// Validated params.
    pub params: &'a Map<String, Value>,
}

impl Job<'_> {
    /// The job as named inputs, as upstream models take them: `prompt` and `duration` when
    /// given, then every param under its own name.
    pub fn inputs(&self) -> Map<String, Value> {
        let mut input = Map::new();
        if let Some(p) = self.prompt {
            input.insert("prompt".into(), Value::from(p));
        }
        if let Some(d) = self.duration {
            input.insert("duration".into(), Value::from(d));
        }
        for (k, v) in self.params {
            input.insert(k.clone(), v.clone());
        }
        input
    }
}

/// One generated file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// File contents.
    pub bytes: Bytes,
    /// MIME type.
    pub content_type: &'static str,
    /// File extension without the dot.
    pub extension: &'static str,
}

/// A generation failure, shown to the client on the failed task.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct GenerateError {
    /// Machine code, e.g. `generation_failed`.
    pub code: String,
    /// Human text.
    pub message: String,
}

/// Returned by a progress sink when the generator should stop (the task was taken over).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abort;

/// Receives progress (0..=99) while a generator runs.
#[async_trait]
pub trait ProgressSink: Send {
    /// Reports progress; an `Err` means stop now.
    async fn report(&mut self, progress: u8) -> Result<(), Abort>;
}

/// The result of a generator run.
#[derive(Debug)]
pub enum GenerateOutcome {
    /// Outputs to store.
    Done(Vec<Generated>),
    /// The generator failed; the task fails with this error and is refunded.
    Failed(GenerateError),
    /// The progress sink asked to stop.
    Aborted,
}

/// Runs one model.
#[async_trait]
pub trait Generator: Send + Sync {
    /// Generates the outputs of `job`, reporting progress to `progress`.
    async fn generate(&self, job: Job<'_>, progress: &mut dyn ProgressSink) -> GenerateOutcome;
}

// ---------------------------------------------------------------------------------------------
// Upstreams: models that run elsewhere
// ---------------------------------------------------------------------------------------------

/// What an upstream says about one of its runs.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamState {
    /// Waiting or running. `progress` (0..=99) when the upstream gives one or its logs show
    /// one; `logs`: the run's whole log as the upstream has it so far, when it gives one.
    Running {
        /// Progress, if known.
        progress: Option<u8>,
        /// The log so far, if the upstream gives one.
        logs: Option<String>,
    },
    /// Finished with these outputs: `data:` URIs or URLs to download.
    Succeeded {
        /// The outputs, in order.
        outputs: Vec<String>,
        /// The final log, if any.
        logs: Option<String>,
    },
    /// The model failed; `message` is the upstream's (bounded before it is shown).
    Failed {
        /// What the upstream said.
        message: String,
        /// The final log, if any.
        logs: Option<String>,
    },
    /// The run was cancelled upstream (by tasklane after a timeout, or by someone else).
    Canceled,
    /// The upstream no longer knew the run and started it anew: its result, if it had one, is
    /// gone (Cog forgets a prediction once it has finished and has no way to read one).
    Restarted,
}

impl UpstreamState {
    /// Whether the run has ended (no further change will come).
    pub fn is_terminal(&self) -> bool {
        !matches!(
            self,
            UpstreamState::Running { .. } | UpstreamState::Restarted
        )
    }
}

/// Why an upstream call did not give an answer about a run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream is at capacity (all slots busy, rate limited): try again later; the task
    /// stays queued and is never failed for it.
    #[error("upstream at capacity")]
    Busy {
        /// When the upstream said to come back, if it did.
        retry_after: Option<Duration>,
    },
    /// Unreachable, timed out or a 5xx: retried with backoff.
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    /// The upstream refused the request (a 4xx other than capacity): the task fails.
    #[error("upstream refused the request: {0}")]
    Refused(String),
    /// The upstream does not know the run.
    #[error("upstream does not know the run")]
    Unknown,
}

/// A callback from an upstream, read by [`Upstream::read_callback`].
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamReport {
    /// The upstream's id of the run it is about.
    pub id: String,
    /// What it says.
    pub state: UpstreamState,
}

/// The parts of an HTTP request an upstream's callback is judged on.
#[derive(Debug, Clone, Copy)]
pub struct CallbackRequest<'a> {
    /// Request headers (a provider's signature lives there).
    pub headers: &'a http::HeaderMap,
    /// The raw body, as signed.
    pub body: &'a [u8],
}

/// A model served by an upstream: tasklane starts a run, lets its worker go, and learns the end
/// from the upstream's callback to `POST /v1/upstream/{provider}/{task_id}` or from checking
/// ([`Upstream::check`]) on a backoff. One implementation per protocol ([`crate::providers`]).
#[async_trait]
pub trait Upstream: Send + Sync {
    /// The provider's name in callback routes and logs (`cog`, `replicate`, ...).
    fn provider(&self) -> &'static str;

    /// Starts `job`, asking the upstream to report to `callback`; returns the upstream's id of
    /// the run. A provider that lets the caller name the run uses the task id, so a start
    /// retried after a crash never runs the job twice.
    async fn start(&self, job: Job<'_>, callback: &str) -> Result<String, UpstreamError>;

    /// What run `id` of `job` is doing now (`callback` as given to `start`, for providers whose
    /// only way to ask is to repeat the start).
    async fn check(
        &self,
        job: Job<'_>,
        id: &str,
        callback: &str,
    ) -> Result<UpstreamState, UpstreamError>;

    /// Asks the upstream to stop run `id`; best effort.
    async fn cancel(&self, id: &str) -> Result<(), UpstreamError>;

    /// Reads a callback, checking the provider's own signature where it has one. `Err` with
    /// a reason when it is malformed or not signed by the upstream.
    fn read_callback(&self, req: CallbackRequest<'_>) -> Result<UpstreamReport, String>;

    /// Whether a callback's content is the truth about the run. Providers with a way to read a
    /// run (Replicate, fal, Veo) answer false: a callback only prompts tasklane to
    /// [`Upstream::check`] at once, so a forged body can change nothing. Cog answers true: it
    /// has no way to read a prediction, so its callbacks (authenticated by the per-task token)
    /// carry the result.
    fn callback_is_authoritative(&self) -> bool;

    /// Headers to send when downloading output `url` (the provider's credentials, only for
    /// the provider's own file hosts).
    fn download_headers(&self, url: &url::Url) -> Vec<(http::HeaderName, http::HeaderValue)> {
        let _ = url;
        Vec::new()
    }
}
