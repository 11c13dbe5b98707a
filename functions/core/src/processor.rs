//! The processor: runs queued work idempotently, whatever delivers it.
//!
//! A `Run` message moves the task `queued -> processing` with a conditional write (a lease),
//! runs the model's generator with progress updates, stores the outputs, and marks the task
//! `completed` or `failed` (refunded). A `Deliver` message claims the webhook attempt it names,
//! sends it, schedules the next retry and records the answer, each change through
//! [`crate::task::apply`]. Duplicate and stale messages change nothing.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::time::Instant;
use tracing::Instrument;

use crate::App;
use crate::ports::{
    Abort, Delivery, GenerateOutcome, Job, MessageSource, PortError, PortResult, ProgressSink,
    TaskStore, WorkMessage,
};
use crate::registry::Runner;
use crate::task::{
    AfterAttempt, Output, Task, TaskFailure, TaskStatus, Transition, TransitionError,
};
use crate::view::{rfc3339, task_view};
use crate::webhook::{DeliveryResult, WebhookSender};

/// What to do with a message after handling it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Handled (or nothing left to do): delete it.
    Done,
    /// Leave it to come back after this delay (another worker holds the task's lease).
    RetryAfter(Duration),
}

/// Runs work messages against the shared [`App`].
#[derive(Clone)]
pub struct Processor {
    pub(crate) app: Arc<App>,
    webhooks: WebhookSender,
    /// Downloads upstream outputs from public addresses only.
    pub(crate) downloads: reqwest::Client,
    /// Downloads upstream outputs from hosts the catalog trusts (private addresses allowed).
    pub(crate) downloads_trusted: reqwest::Client,
}

/// A task failure (with a refund) of attempt `attempt` (`None`: whatever attempt holds it).
pub(crate) fn failure(
    attempt: Option<u32>,
    code: impl Into<String>,
    message: impl Into<String>,
) -> Transition {
    Transition::Fail {
        attempt,
        error: TaskFailure {
            code: code.into(),
            message: message.into(),
        },
    }
}

pub(crate) fn chrono_dur(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl Processor {
    /// A processor over `app`, sending webhooks as its config allows.
    pub fn new(app: Arc<App>) -> Self {
        let webhooks = WebhookSender::new(
            app.config.callback_timeout,
            app.config.callback_allow_private,
        );
        let downloads = |allow_private| {
            crate::webhook::guarded_client(
                OUTPUT_DOWNLOAD_TIMEOUT,
                allow_private,
                Arc::new(crate::webhook::SystemNetwork),
                concat!("tasklane/", env!("CARGO_PKG_VERSION")),
            )
        };
        Processor {
            webhooks,
            downloads: downloads(app.config.callback_allow_private),
            downloads_trusted: downloads(true),
            app,
        }
    }

    /// Handles one message. `Err` means a backend failed: let the message come back.
    pub async fn handle(&self, msg: &WorkMessage) -> PortResult<Disposition> {
        match msg {
            WorkMessage::Run { task_id } => self.run(task_id).await,
            WorkMessage::Check { task_id, check } => self.check_message(task_id, *check).await,
            WorkMessage::Deliver {
                task_id,
                attempt,
                not_before,
            } => {
                if let Some(nb) = not_before {
                    let now = Utc::now();
                    if *nb > now {
                        let remaining = (*nb - now).to_std().unwrap_or_default();
                        self.app
                            .queue
                            .enqueue(msg, remaining.min(self.app.config.max_queue_delay))
                            .await?;
                        return Ok(Disposition::Done);
                    }
                }
                self.deliver(task_id, *attempt).await
            }
        }
    }

    /// Ends what a message that could not be processed (it reached the dead-letter queue, or
    /// a polling worker received it more than [`crate::Config::max_receives`] times) was
    /// about, the way the processor ends exhausted work: a `Run` fails its task with a refund
    /// unless a worker holds the task's lease (that worker is still completing it; if it dies
    /// the sweeper re-enqueues the task); a `Deliver` gives the webhook up (marks it failed)
    /// unless its attempt is stale or a worker is sending it.
    pub async fn dead_letter(&self, msg: &WorkMessage) -> PortResult<()> {
        let store = &self.app.store;
        let Some(task) = store.task(msg.task_id()).await? else {
            return Ok(());
        };
        match msg {
            WorkMessage::Run { task_id } | WorkMessage::Check { task_id, .. } => {
                if !task.is_open() {
                    return self.after_leftover_run(&task).await;
                }
                let fail = failure(
                    None,
                    "attempts_exhausted",
                    "the task could not be processed; credits were refunded",
                );
                tracing::warn!(task_id, status = %task.status, "dead-lettered work: failing the task");
                self.finish(&task, &fail).await.map(|_| ())
            }
            WorkMessage::Deliver {
                task_id, attempt, ..
            } => {
                let abandon = Transition::DeliveryAbandoned { attempt: *attempt };
                match store.update_task_from(&task, &abandon).await {
                    Ok(_) => {
                        tracing::warn!(task_id, attempt, "dead-lettered webhook: marked failed");
                        Ok(())
                    }
                    // Stale, settled already, or an attempt a live worker is sending.
                    Err(PortError::Rejected(e)) => {
                        tracing::info!(task_id, attempt, reason = %e, "dead-lettered webhook: nothing to give up");
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Runs a task's work: checks it may start, claims it with a lease, runs its model with
    /// progress updates, stores the outputs and ends the task.
    async fn run(&self, task_id: &str) -> PortResult<Disposition> {
        let Some(task) = self.app.store.task(task_id).await? else {
            tracing::warn!(task_id, "work for an unknown task dropped");
            return Ok(Disposition::Done);
        };
        let app = self.app.clone();
        if let Some(spec) = app.registry.get(&task.model)
            && let Runner::Upstream(up) = &spec.runner
        {
            return self.run_upstream(task, spec, up).await;
        }
        if let Some(done) = self.before_start(&task).await? {
            return Ok(done);
        }
        let task = match self.claim(&task).await? {
            Ok(claimed) => claimed,
            Err(done) => return Ok(done),
        };
        let attempt = task.attempts;
        tracing::info!(task_id, attempt, model = %task.model, "processing");
        let Some(spec) = self.app.registry.get(&task.model) else {
            let message = format!(
                "model {} is no longer available; credits were refunded",
                task.model
            );
            return self
                .finish(&task, &failure(Some(attempt), "model_unavailable", message))
                .await;
        };
        let generator = match &spec.runner {
            // The catalog changed under a task started upstream: its run cannot be reached.
            Runner::Local(_) if task.upstream.as_ref().is_some_and(|u| u.id.is_some()) => {
                return self.upstream_gone(&task).await;
            }
            Runner::Local(g) => g.clone(),
            // The catalog changed under the task: its model is now served upstream.
            Runner::Upstream(up) => return self.run_upstream(task, spec, up).await,
        };
        let (outcome, current) = self.generate(&task, generator.as_ref()).await?;
        let transition = match outcome {
            GenerateOutcome::Aborted => {
                tracing::warn!(task_id, attempt, "attempt aborted: the task was taken over");
                return Ok(Disposition::Done);
            }
            GenerateOutcome::Failed(e) => failure(Some(attempt), e.code, e.message),
            GenerateOutcome::Done(files) => Transition::Complete {
                attempt,
                outputs: self.store_outputs(task_id, files).await?,
            },
        };
        self.finish(&current, &transition).await
    }

    /// A `Check` message: check number `check` on the task's upstream run.
    async fn check_message(&self, task_id: &str, check: u32) -> PortResult<Disposition> {
        let Some(task) = self.app.store.task(task_id).await? else {
            return Ok(Disposition::Done);
        };
        let app = self.app.clone();
        match app.registry.get(&task.model).map(|s| (s, &s.runner)) {
            Some((spec, Runner::Upstream(up))) => self.check(task, spec, up, check).await,
            _ if task.is_open() => self.upstream_gone(&task).await,
            _ => Ok(Disposition::Done),
        }
    }

    /// A task whose run was started on an upstream that the catalog no longer serves its model
    /// from: the run cannot be checked or cancelled from here, and the task fails, refunded.
    async fn upstream_gone(&self, task: &Task) -> PortResult<Disposition> {
        let message = format!(
            "model {} is no longer served by the upstream that ran this task; credits were refunded",
            task.model
        );
        let fail = failure(Some(task.attempts), "model_unavailable", message);
        self.finish(task, &fail).await
    }

    /// What to do instead of starting `task`, if anything: an ended task's leftover work, a
    /// live lease held by another worker (come back after it), or attempts exhausted (the
    /// task fails with a refund). A lapsed lease is taken over.
    pub(crate) async fn before_start(&self, task: &Task) -> PortResult<Option<Disposition>> {
        let task_id = task.id.as_str();
        let now = Utc::now();
        if task.status.is_terminal() {
            self.after_leftover_run(task).await?;
            return Ok(Some(Disposition::Done));
        }
        if task.status != TaskStatus::Processing {
            return Ok(None);
        }
        match task.lease_until {
            Some(l) if l > now => Ok(Some(Disposition::RetryAfter(
                (l - now).to_std().unwrap_or_default() + Duration::from_secs(1),
            ))),
            _ if task.attempts >= self.app.config.max_attempts => {
                tracing::warn!(
                    task_id,
                    attempts = task.attempts,
                    "processing attempts exhausted"
                );
                let message = format!(
                    "processing was interrupted {} times; credits were refunded",
                    task.attempts
                );
                let fail = failure(Some(task.attempts), "attempts_exhausted", message);
                self.finish(task, &fail).await.map(Some)
            }
            _ => {
                tracing::warn!(
                    task_id,
                    attempt = task.attempts,
                    "lease expired; taking the task over"
                );
                Ok(None)
            }
        }
    }

    /// Moves `task` to processing under a fresh lease (a new attempt); `Err` with what to do
    /// when the write is refused (another worker holds it, or it can no longer start).
    pub(crate) async fn claim(&self, task: &Task) -> PortResult<Result<Task, Disposition>> {
        let cfg = &self.app.config;
        let start = Transition::Start {
            lease_until: Utc::now() + chrono_dur(cfg.lease),
        };
        match self.app.store.update_task_from(task, &start).await {
            Ok(t) => {
                crate::metrics::started(task, &t);
                Ok(Ok(t))
            }
            Err(PortError::Rejected(TransitionError::LeaseHeld)) => {
                Ok(Err(Disposition::RetryAfter(cfg.lease)))
            }
            Err(PortError::Rejected(e)) => {
                tracing::info!(task_id = %task.id, reason = %e, "not started");
                Ok(Err(Disposition::Done))
            }
            Err(e) => Err(e),
        }
    }

    /// Runs `generator` on the claimed `task`, writing progress (which renews the lease);
    /// returns its outcome and the task as last written. A halt met while writing progress
    /// stops the attempt here, its message unsettled.
    async fn generate(
        &self,
        task: &Task,
        generator: &dyn crate::ports::Generator,
    ) -> PortResult<(GenerateOutcome, Task)> {
        let job = Job {
            task_id: &task.id,
            action: &task.action,
            prompt: task.input.prompt.as_deref(),
            duration: task.input.duration,
            params: &task.input.params,
        };
        let mut sink = StoreProgress {
            store: self.app.store.as_ref(),
            current: task.clone(),
            attempt: task.attempts,
            lease: self.app.config.lease,
            last_write: Instant::now(),
            crashed: None,
        };
        let outcome = generator.generate(job, &mut sink).await;
        if let Some(halt) = sink.crashed.take() {
            return Err(halt);
        }
        Ok((outcome, sink.current))
    }

    /// Puts each generated file in the blob store as `tasks/{id}/output-{i}.{ext}`.
    async fn store_outputs(
        &self,
        task_id: &str,
        files: Vec<crate::ports::Generated>,
    ) -> PortResult<Vec<Output>> {
        let mut outputs = Vec::with_capacity(files.len());
        for (i, f) in files.into_iter().enumerate() {
            let key = format!("tasks/{task_id}/output-{i}.{}", f.extension);
            let size_bytes = f.bytes.len() as u64;
            self.app.blobs.put(&key, f.bytes, f.content_type).await?;
            outputs.push(Output {
                key,
                content_type: f.content_type.to_string(),
                size_bytes,
            });
        }
        Ok(outputs)
    }

    /// Applies a terminal transition to `current`, wakes waiters and schedules the webhook.
    pub(crate) async fn finish(&self, current: &Task, t: &Transition) -> PortResult<Disposition> {
        let task_id = current.id.as_str();
        match self.app.store.update_task_from(current, t).await {
            Ok(task) => {
                tracing::info!(task_id, status = %task.status, refunded = task.cost.refunded, "task finished");
                crate::metrics::finished(&task);
                if task.upstream.is_some()
                    && let Some(spec) = self.app.registry.get(&task.model)
                {
                    self.give_slot_back(&task, spec).await;
                }
                self.app.events.notify(task_id);
                self.schedule_callback(&task).await?;
                Ok(Disposition::Done)
            }
            Err(PortError::Rejected(e)) => {
                tracing::info!(task_id, reason = %e, "result discarded");
                Ok(Disposition::Done)
            }
            Err(e) => Err(e),
        }
    }

    /// Enqueues the first webhook attempt if it is owed.
    async fn schedule_callback(&self, task: &Task) -> PortResult<()> {
        if task.first_callback_owed() {
            let msg = WorkMessage::first_delivery(&task.id);
            self.app.queue.enqueue(&msg, Duration::ZERO).await?;
        }
        Ok(())
    }

    /// A `Run` for a task that has ended (a duplicate, or the work of a cancelled task) changes
    /// nothing. A task a worker ended may have lost its first webhook message (the worker
    /// stopped between writing the end and enqueuing it): enqueue it again while it is owed.
    /// A cancelled task's first webhook is the cancel's to enqueue (the sweeper enqueues it if
    /// that failed), so its leftover `Run` does not send a second one. A duplicate `Deliver`
    /// is harmless either way: an attempt is claimed before it is sent.
    async fn after_leftover_run(&self, task: &Task) -> PortResult<()> {
        if task.status == TaskStatus::Cancelled {
            return Ok(());
        }
        self.schedule_callback(task).await
    }

    /// How long a worker holds a webhook attempt it claimed: the request's timeout and time to
    /// prepare it and record its answer. Another worker takes the attempt over only after it.
    fn delivery_claim(&self) -> Duration {
        self.app.config.callback_timeout + DELIVERY_CLAIM_MARGIN
    }

    /// Sends webhook attempt `attempt` (the number recorded before it) once: the attempt is
    /// claimed first, so two workers holding the same message do not both send it, and its
    /// answer is recorded with [`Transition::DeliveryAttempted`], refused if stale.
    async fn deliver(&self, task_id: &str, attempt: u32) -> PortResult<Disposition> {
        let store = &self.app.store;
        let Some(task) = store.task(task_id).await? else {
            return Ok(Disposition::Done);
        };
        let task = match self.claim_delivery(&task, attempt).await? {
            Ok(claimed) => claimed,
            Err(done) => return Ok(done),
        };
        let Some(cb) = task.callback.as_ref() else {
            return Ok(Disposition::Done);
        };
        let Some(account) = store.account(&task.account_id).await? else {
            return Ok(Disposition::Done);
        };
        let body = self.webhook_body(&task).await?;
        let msg_id = format!("msg_{}", task.id.trim_start_matches("task_"));
        let sent_at = Utc::now();
        let result = self
            .webhooks
            .send(&cb.url, &account.webhook_secret, &msg_id, body)
            .await;
        self.record_delivery(&task, attempt, sent_at, result).await
    }

    /// Claims webhook attempt `attempt` of `task` for this worker; `Err` with what to do when
    /// another worker holds it (come back when its claim has run out) or it is not owed.
    async fn claim_delivery(
        &self,
        task: &Task,
        attempt: u32,
    ) -> PortResult<Result<Task, Disposition>> {
        let now = Utc::now();
        let claim = Transition::DeliveryClaimed {
            attempt,
            lease_until: now + chrono_dur(self.delivery_claim()),
        };
        match self.app.store.update_task_from(task, &claim).await {
            Ok(claimed) => Ok(Ok(claimed)),
            Err(PortError::Rejected(TransitionError::LeaseHeld)) => {
                // Another worker is sending this attempt: come back when its claim has run out
                // (by then it is recorded and this message stale, or its worker died).
                let held = task
                    .lease_until
                    .filter(|l| *l > now)
                    .and_then(|l| (l - now).to_std().ok())
                    .unwrap_or_else(|| self.delivery_claim());
                tracing::info!(task_id = %task.id, attempt, "webhook attempt claimed by another worker");
                Ok(Err(Disposition::RetryAfter(held + Duration::from_secs(1))))
            }
            Err(PortError::Rejected(e)) => {
                tracing::debug!(task_id = %task.id, attempt, reason = %e, "webhook attempt not owed");
                Ok(Err(Disposition::Done))
            }
            Err(e) => Err(e),
        }
    }

    /// The webhook's body: `{"type": "task.<status>", "timestamp", "data": <task>}`, with
    /// result URLs signed afresh.
    async fn webhook_body(&self, task: &Task) -> PortResult<Vec<u8>> {
        let view = task_view(
            task,
            self.app.blobs.as_ref(),
            self.app.config.result_url_ttl,
        )
        .await?;
        let body = json!({
            "type": format!("task.{}", task.status),
            "timestamp": rfc3339(Utc::now()),
            "data": view,
        });
        serde_json::to_vec(&body).map_err(PortError::internal)
    }

    /// Records the answer to attempt `attempt`, sent at `now`, and what follows it
    /// ([`AfterAttempt::decide`]): delivered, failed, or a retry, enqueued first.
    async fn record_delivery(
        &self,
        task: &Task,
        attempt: u32,
        now: DateTime<Utc>,
        result: DeliveryResult,
    ) -> PortResult<Disposition> {
        let task_id = task.id.as_str();
        let (status_code, error) = match &result {
            DeliveryResult::Status(s) => (Some(*s), None),
            DeliveryResult::NoAnswer(why) => (None, Some(why.clone())),
        };
        let next = AfterAttempt::decide(
            status_code,
            attempt,
            &self.app.config.callback_retry_schedule,
        );
        if let AfterAttempt::Retry(delay) = next
            && delay <= self.app.config.max_queue_delay
        {
            // Enqueued before the attempt is recorded: a worker that stops in between leaves a
            // stale retry and this message, which comes back and sends the attempt again. A
            // retry further off than the queue can delay gets no message: the attempt records
            // when it is due, and the sweeper sends it then (no chain of queue hops).
            let msg = WorkMessage::Deliver {
                task_id: task_id.to_string(),
                attempt: attempt + 1,
                not_before: Some(now + chrono_dur(delay)),
            };
            self.app.queue.enqueue(&msg, delay).await?;
        }
        tracing::info!(task_id, attempt, result = ?result, next = ?next, "webhook attempt");
        crate::metrics::webhook(task_id, attempt, status_code, &next);
        let record = Transition::DeliveryAttempted {
            attempt,
            at: now,
            status_code,
            error,
            next,
        };
        match self.app.store.update_task_from(task, &record).await {
            Ok(_) => Ok(Disposition::Done),
            Err(PortError::Rejected(e)) => {
                // Only after this worker's claim ran out and another recorded the attempt.
                tracing::warn!(task_id, attempt, reason = %e, "webhook attempt sent but not recorded");
                Ok(Disposition::Done)
            }
            Err(e) => Err(e),
        }
    }
}

/// Longest time one output download may take.
const OUTPUT_DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// What a worker's claim on a webhook attempt allows beyond the request's timeout.
const DELIVERY_CLAIM_MARGIN: Duration = Duration::from_secs(10);

tokio::task_local! {
    /// Set while a worker handles a message ([`worker_scope`]).
    static IN_WORKER: ();
}

/// Runs `fut` as a worker handling a message: [`in_worker`] answers true inside it.
/// [`run_worker`] handles every message this way.
pub async fn worker_scope<F: std::future::Future>(fut: F) -> F::Output {
    IN_WORKER.scope((), fut).await
}

/// Whether the caller runs inside [`worker_scope`] (a worker handling a message), so that a port
/// wrapper can tell a worker's calls from the API's and the sweeper's.
pub fn in_worker() -> bool {
    IN_WORKER.try_with(|_| ()).is_ok()
}

/// A worker: receives messages from `source`, handles them with `processor` and settles them,
/// until `stop` turns true (it finishes the message in hand first). A message received more
/// than [`crate::Config::max_receives`] times is dead-lettered ([`Processor::dead_letter`]).
pub async fn run_worker(
    n: usize,
    source: Arc<dyn MessageSource>,
    processor: Processor,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let visibility = processor.app.config.visibility;
    loop {
        if *stop.borrow() {
            return;
        }
        let batch = match source.receive(1, visibility).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(worker = n, error = %e, "queue receive failed");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = source.wait_for_work(Duration::from_secs(1)) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        for d in batch {
            handle_received(n, source.as_ref(), &processor, &d).await;
        }
    }
}

/// Handles one received message (dead-lettering it after too many receives) and settles it:
/// deleted when done, made visible again after a delay when it should come back, left alone
/// when its worker halted.
async fn handle_received(
    n: usize,
    source: &dyn MessageSource,
    processor: &Processor,
    d: &Delivery,
) {
    let Some(msg) = d.message.clone() else {
        tracing::error!(worker = n, "unparseable message dropped");
        let _ = source.ack(d).await;
        return;
    };
    let task_id = msg.task_id();
    tracing::debug!(
        worker = n,
        task_id,
        receive_count = d.receive_count,
        "received"
    );
    let span = tracing::info_span!("work", worker = n, task_id = %task_id);
    let handled = if d.receive_count > processor.app.config.max_receives {
        tracing::warn!(
            worker = n,
            task_id,
            receive_count = d.receive_count,
            "message dead-lettered"
        );
        async {
            processor
                .dead_letter(&msg)
                .await
                .map(|()| Disposition::Done)
        }
        .instrument(span)
        .await
    } else {
        worker_scope(processor.handle(&msg).instrument(span)).await
    };
    let settled = match handled {
        Ok(Disposition::Done) => source.ack(d).await,
        Ok(Disposition::RetryAfter(delay)) => source.retry(d, delay).await,
        Err(PortError::Halted) => {
            tracing::warn!(worker = n, task_id, "halted: message left unsettled");
            return;
        }
        Err(e) => {
            let backoff = Duration::from_millis(200 * 2u64.pow(d.receive_count.min(8)));
            tracing::warn!(worker = n, task_id, error = %e, ?backoff, "work failed; retrying");
            source.retry(d, backoff).await
        }
    };
    if let Err(e) = settled {
        tracing::error!(worker = n, error = %e, "could not settle a message; it comes back after its visibility timeout");
    }
}

/// How often at most a running task's progress is written (and its lease renewed).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Writes progress to the store at most once per [`PROGRESS_EVERY`], renewing the lease.
struct StoreProgress<'a> {
    store: &'a dyn TaskStore,
    /// The task as last written by this attempt.
    current: Task,
    attempt: u32,
    lease: Duration,
    last_write: Instant,
    /// [`PortError::Halted`] met while reporting: the attempt stops and its message stays
    /// unsettled.
    crashed: Option<PortError>,
}

#[async_trait]
impl ProgressSink for StoreProgress<'_> {
    async fn report(&mut self, progress: u8) -> Result<(), Abort> {
        // Each write costs a write unit on DynamoDB: at most one a second (a third of the
        // lease, when that is shorter, so that the lease is renewed in time).
        let every = PROGRESS_EVERY.min(self.lease / 3);
        if self.last_write.elapsed() < every {
            return Ok(());
        }
        let t = Transition::Progress {
            attempt: self.attempt,
            progress,
            lease_until: Utc::now() + chrono_dur(self.lease),
        };
        match self.store.update_task_from(&self.current, &t).await {
            Ok(task) => {
                self.current = task;
                self.last_write = Instant::now();
                Ok(())
            }
            Err(PortError::Rejected(_)) => Err(Abort),
            Err(e @ PortError::Halted) => {
                self.crashed = Some(e);
                Err(Abort)
            }
            Err(e) => {
                tracing::warn!(task_id = %self.current.id, error = %e, "progress not recorded");
                Ok(())
            }
        }
    }
}
