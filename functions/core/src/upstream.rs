//! Models served by an upstream ([`crate::ports::Upstream`]): a worker starts the run and lets
//! go; the upstream's callback, or a check scheduled on a backoff, ends the task.
//!
//! - **Start** (a `Run` message): the task is claimed like any other, a per-task callback token
//!   is recorded, the upstream is asked to start (the task id names the run where the provider
//!   allows it, so a start retried after a crash never runs twice), and its id is recorded.
//!   The worker is then free. An upstream at capacity puts the task back to `queued` without
//!   counting the attempt and tries again later; an unreachable one is retried like a crashed
//!   attempt and ends in `upstream_unavailable`.
//! - **Checks** (`Check` messages numbered by [`crate::task::UpstreamRun::checks`]): each asks
//!   the upstream what the run does, records progress and the log's tail, and schedules the
//!   next check (doubling from [`crate::Config::upstream_check_first`] up to
//!   [`crate::Config::upstream_check_max`]). A copy of a check finds its number taken and stops.
//!   Past the model's timeout the run is cancelled upstream and the task fails with `timeout`.
//! - **Callbacks** (`POST /v1/upstream/{provider}/{task_id}?token=…`): the token must match
//!   the task's. A provider that can be asked about a run ([`Upstream::callback_is_authoritative`]
//!   false) only prompts a check; Cog's callbacks carry the result and are recorded.
//! - **Outputs become ours**: each `data:` URI or URL is copied into the blob store under the
//!   model's size cap (a download streamed into the store, never held whole in memory); URLs
//!   must resolve to public addresses unless their host is one the catalog trusts. The task
//!   completes with tasklane's own expiring URLs.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use chrono::Utc;
use rand::RngCore;

use crate::error::ApiError;
use crate::ports::{
    CallbackRequest, ChunkSource, Job, PortError, PortResult, StreamRefused, Upstream,
    UpstreamError, UpstreamState, WorkMessage,
};
use crate::processor::{Disposition, Processor, chrono_dur, failure};
use crate::registry::ModelSpec;
use crate::task::{Output, Task, TaskFailure, TaskStatus, Transition};

/// Times an upstream may lose a run and start it again before the task fails.
pub const MAX_RESTARTS: u32 = 1;
/// Checks in a row that may find the upstream unreachable before the task fails with
/// `upstream_unavailable`.
pub const MAX_FAILED_CHECKS: u32 = 5;
/// How long a check that found its run forgotten (and so started it again) waits for the
/// callback of the run's end before it takes the callback for lost.
pub const RESTART_GRACE: Duration = Duration::from_secs(2);
/// How long collecting a run's outputs may take before another check may try again.
pub const OUTPUT_COLLECT_TIME: Duration = Duration::from_secs(900);
/// Largest upstream callback body: Cog sends a finished prediction's outputs inline, as
/// `data:` URIs. (On AWS, API Gateway caps request bodies lower, at 10 MB.)
pub const MAX_CALLBACK_BYTES: usize = 64 * 1024 * 1024;
/// Longest upstream message kept on a failed task.
pub const MAX_UPSTREAM_MESSAGE: usize = 500;
/// Redirects an output download follows (each hop checked like the first URL).
pub const MAX_OUTPUT_REDIRECTS: u32 = 3;

/// What a callback did, for the route's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackOutcome {
    /// Recorded (progress, or the end of the run).
    Recorded,
    /// Nothing to change: the task ended already, or the callback is about an older run.
    Ignored,
    /// The provider's callbacks are hints: a check was scheduled at once.
    CheckScheduled,
}

/// The pool of slots a model's runs share ([`ModelSpec::concurrency`]).
fn slot_pool(spec: &ModelSpec) -> String {
    format!("model:{}", spec.name)
}

/// The job a task asks of its model.
pub(crate) fn job_of(task: &Task) -> Job<'_> {
    Job {
        task_id: &task.id,
        action: &task.action,
        prompt: task.input.prompt.as_deref(),
        duration: task.input.duration,
        params: &task.input.params,
    }
}

fn new_token() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// `base` spread over `[base / 2, base * 3 / 2)`: tasks turned away together (a busy upstream,
/// a model's slots all taken) come back at different times instead of in one wave that
/// again finds a single free slot.
fn jittered(base: Duration) -> Duration {
    base.mul_f64(0.5 + rand::random::<f64>())
}

/// `message` cut to [`MAX_UPSTREAM_MESSAGE`] characters.
fn bounded(message: &str) -> String {
    let mut m: String = message.chars().take(MAX_UPSTREAM_MESSAGE).collect();
    if m.len() < message.len() {
        m.push('…');
    }
    m
}

/// Constant-time comparison of two tokens.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Processor {
    /// The URL the upstream reports to for `task`, or `None` when this deployment has no
    /// public URL.
    fn callback_url(&self, provider: &str, task: &Task) -> Option<String> {
        let base = self.app.config.public_url.as_deref()?;
        let token = &task.upstream.as_ref()?.token;
        Some(format!(
            "{}/v1/upstream/{provider}/{}?token={token}",
            base.trim_end_matches('/'),
            task.id
        ))
    }

    /// Delay before check number `n`.
    fn check_delay(&self, n: u32) -> Duration {
        let cfg = &self.app.config;
        cfg.upstream_check_first
            .saturating_mul(2u32.saturating_pow(n.min(16)))
            .min(cfg.upstream_check_max)
    }

    /// When check `n` of `task`'s run is due: after its delay, but not after the model's
    /// deadline (so a silent run is still cancelled on time). Returns the delay and the time by
    /// which the check must have run (after which the sweeper resumes checking).
    fn next_check(
        &self,
        task: &Task,
        spec: &ModelSpec,
        n: u32,
    ) -> (Duration, chrono::DateTime<Utc>) {
        let now = Utc::now();
        let mut delay = self.check_delay(n);
        if let Some(started) = task.upstream.as_ref().and_then(|u| u.started_at) {
            let deadline = started + chrono_dur(spec.timeout);
            let left = (deadline - now).to_std().unwrap_or_default();
            delay = delay.min(left + Duration::from_millis(100));
        }
        let delay = delay.min(self.app.config.max_queue_delay);
        (delay, now + chrono_dur(delay + self.app.config.lease))
    }

    /// Enqueues check `n` of task `task_id` after `delay`. Called only after the write that
    /// makes `n` the task's next check: of two copies of a check, only the one whose write
    /// won schedules the next, so copies die out instead of multiplying.
    async fn enqueue_check(&self, task_id: &str, n: u32, delay: Duration) -> PortResult<()> {
        let msg = WorkMessage::Check {
            task_id: task_id.to_string(),
            check: n,
        };
        self.app.queue.enqueue(&msg, delay).await
    }

    /// A `Run` of a task whose model is served by `up`: starts the run, or, when it runs
    /// already (the sweeper found its check lost), checks on it.
    pub(crate) async fn run_upstream(
        &self,
        task: Task,
        spec: &ModelSpec,
        up: &Arc<dyn Upstream>,
    ) -> PortResult<Disposition> {
        let started = task.upstream.as_ref().is_some_and(|u| u.id.is_some());
        if task.status == TaskStatus::Processing && started {
            if task.lease_until.is_some_and(|l| l > Utc::now()) {
                // A check is scheduled: this is a duplicate.
                return Ok(Disposition::Done);
            }
            let n = task.upstream.as_ref().map_or(0, |u| u.checks);
            return self.check(task, spec, up, n).await;
        }
        if let Some(done) = self.before_start(&task).await? {
            return Ok(done);
        }
        if !self.take_slot(&task, spec).await? {
            return self.wait_for_slot(&task).await;
        }
        let task = match self.claim(&task).await? {
            Ok(claimed) => claimed,
            Err(done) => {
                // Refused because the task ended (give the slot back), or because another
                // worker holds it (the slot, held under the task's id, is that worker's now).
                if done == Disposition::Done {
                    self.give_slot_back(&task, spec).await;
                }
                return Ok(done);
            }
        };
        self.start_upstream(task, spec, up).await
    }

    /// Takes one of the model's `concurrency` slots for `task` (always true for a model
    /// without a limit). Held until the task ends, or, should that never be recorded, until
    /// the run's timeout has surely passed.
    async fn take_slot(&self, task: &Task, spec: &ModelSpec) -> PortResult<bool> {
        let Some(limit) = spec.concurrency else {
            return Ok(true);
        };
        let cfg = &self.app.config;
        let until = Utc::now() + chrono_dur(spec.timeout + cfg.upstream_check_max + cfg.lease);
        self.app
            .store
            .acquire_slot(&slot_pool(spec), limit, &task.id, until)
            .await
    }

    /// Gives `task`'s slot back (best effort: a slot not given back frees itself in time).
    pub(crate) async fn give_slot_back(&self, task: &Task, spec: &ModelSpec) {
        if spec.concurrency.is_none() {
            return;
        }
        if let Err(e) = self
            .app
            .store
            .release_slot(&slot_pool(spec), &task.id)
            .await
        {
            tracing::warn!(task_id = %task.id, error = %e, "could not give the model's slot back");
        }
    }

    /// Every slot of the model is taken: the task stays queued and is tried again later. Its
    /// wait starts again, so the sweeper does not take it for lost work.
    async fn wait_for_slot(&self, task: &Task) -> PortResult<Disposition> {
        tracing::debug!(task_id = %task.id, "all of the model's slots are taken; the task waits");
        let cfg = &self.app.config;
        let base = (cfg.upstream_check_first * 2).min(cfg.upstream_check_max);
        if task.status == TaskStatus::Queued {
            // Refused when another message for this task renewed the wait within half a
            // retry: that message goes on, and this one ends, so a sweep that re-enqueued a
            // waiting task does not leave it two messages for good.
            let wait = Transition::StillWaiting {
                not_since: Utc::now() - chrono_dur(base / 2),
            };
            match self.app.store.update_task_from(task, &wait).await {
                Ok(_) => {}
                Err(PortError::Rejected(_)) => return Ok(Disposition::Done),
                Err(e) => return Err(e),
            }
        }
        let delay = jittered(base).min(cfg.upstream_check_max);
        let run = WorkMessage::Run {
            task_id: task.id.clone(),
        };
        self.app.queue.enqueue(&run, delay).await?;
        Ok(Disposition::Done)
    }

    /// Starts the claimed `task`'s run upstream and lets go of it.
    async fn start_upstream(
        &self,
        task: Task,
        spec: &ModelSpec,
        up: &Arc<dyn Upstream>,
    ) -> PortResult<Disposition> {
        let attempt = task.attempts;
        let task_id = task.id.clone();
        let prepare = Transition::UpstreamPrepared {
            attempt,
            token: new_token(),
        };
        let task = match self.app.store.update_task_from(&task, &prepare).await {
            Ok(t) => t,
            Err(PortError::Rejected(e)) => {
                tracing::info!(task_id, reason = %e, "upstream run not prepared");
                return Ok(Disposition::Done);
            }
            Err(e) => return Err(e),
        };
        let Some(callback) = self.callback_url(up.provider(), &task) else {
            let message = "this deployment has no public URL for upstream callbacks \
                           (TASKLANE_PUBLIC_URL); credits were refunded";
            let fail = failure(Some(attempt), "model_unavailable", message);
            return self.finish(&task, &fail).await;
        };
        let started = crate::metrics::upstream(
            up.provider(),
            "start",
            &task_id,
            up.start(job_of(&task), &callback),
        )
        .await;
        let id = match started {
            Ok(id) => id,
            Err(e) => return self.not_started(&task, spec, e).await,
        };
        tracing::info!(task_id, provider = up.provider(), upstream_id = %id, "upstream run started");
        // Recorded first, then check 0 enqueued: a check always finds its run's id.
        let (delay, check_by) = self.next_check(&task, spec, 0);
        let record = Transition::UpstreamStarted {
            attempt,
            id: id.clone(),
            check_by,
        };
        match self.app.store.update_task_from(&task, &record).await {
            Ok(_) => {}
            Err(PortError::Rejected(e)) => {
                // A callback ended it first (a fast run), or another worker took over.
                tracing::info!(task_id, reason = %e, "upstream start not recorded");
                return Ok(Disposition::Done);
            }
            // The message comes back and a later attempt sends the start again: Cog answers
            // with the prediction it runs; providers without an idempotent start may run the
            // model a second time (their modules say so).
            Err(e) => return Err(e),
        }
        // Lost here, the check is resumed by the sweeper once `check_by` has passed.
        self.enqueue_check(&task_id, 0, delay).await?;
        Ok(Disposition::Done)
    }

    /// The upstream did not start `task`'s run: at capacity, the task waits queued (its
    /// attempt not counted) and runs again later; unreachable, it is retried like a crashed
    /// attempt and fails with `upstream_unavailable` once attempts run out; refused, it fails.
    async fn not_started(
        &self,
        task: &Task,
        spec: &ModelSpec,
        e: UpstreamError,
    ) -> PortResult<Disposition> {
        let attempt = task.attempts;
        let task_id = task.id.as_str();
        let cfg = &self.app.config;
        let (count_attempt, delay) = match &e {
            UpstreamError::Busy { retry_after } => {
                let delay = retry_after
                    .unwrap_or_else(|| jittered(cfg.upstream_check_first * 2))
                    .clamp(Duration::from_millis(100), cfg.upstream_check_max);
                (false, delay)
            }
            UpstreamError::Unavailable(_) if attempt < cfg.max_attempts => {
                (true, self.check_delay(attempt))
            }
            UpstreamError::Unavailable(why) => {
                let message = format!(
                    "the model's upstream could not be reached after {attempt} attempts ({}); credits were refunded",
                    bounded(why)
                );
                let fail = failure(Some(attempt), "upstream_unavailable", message);
                return self.finish(task, &fail).await;
            }
            UpstreamError::Refused(why) => {
                let fail = failure(Some(attempt), "generation_failed", bounded(why));
                return self.finish(task, &fail).await;
            }
            UpstreamError::Unknown => {
                let message = "the model's upstream lost the run; credits were refunded";
                let fail = failure(Some(attempt), "upstream_unavailable", message);
                return self.finish(task, &fail).await;
            }
        };
        tracing::info!(task_id, attempt, error = %e, ?delay, "upstream did not start the run; the task waits");
        let back = Transition::Deferred {
            attempt,
            count_attempt,
        };
        match self.app.store.update_task_from(task, &back).await {
            Ok(_) => self.give_slot_back(task, spec).await,
            Err(PortError::Rejected(e)) => {
                tracing::info!(task_id, reason = %e, "not deferred");
                return Ok(Disposition::Done);
            }
            Err(e) => return Err(e),
        }
        // A fresh message rather than this one again: waiting for a slot must not count
        // towards the queue's receive limit.
        let run = WorkMessage::Run {
            task_id: task_id.to_string(),
        };
        self.app.queue.enqueue(&run, delay).await?;
        Ok(Disposition::Done)
    }

    /// Check number `n` on `task`'s upstream run.
    pub(crate) async fn check(
        &self,
        task: Task,
        spec: &ModelSpec,
        up: &Arc<dyn Upstream>,
        n: u32,
    ) -> PortResult<Disposition> {
        let task_id = task.id.as_str();
        let Some(run) = task.upstream.clone() else {
            return Ok(Disposition::Done);
        };
        let Some(id) = run.id.clone() else {
            return Ok(Disposition::Done);
        };
        if task.status != TaskStatus::Processing || run.checks != n {
            tracing::debug!(task_id, check = n, "stale check");
            return Ok(Disposition::Done);
        }
        let now = Utc::now();
        if run.collecting_until.is_some_and(|u| u > now) {
            tracing::debug!(
                task_id,
                check = n,
                "another check is collecting the outputs"
            );
            return Ok(Disposition::Done);
        }
        if run
            .started_at
            .is_some_and(|s| s + chrono_dur(spec.timeout) <= now)
        {
            return self.time_out(&task, spec, up, &id).await;
        }
        let Some(callback) = self.callback_url(up.provider(), &task) else {
            return Ok(Disposition::Done);
        };
        // An upstream whose callbacks carry the result, and which called back since the last
        // check, is not asked: for Cog, asking means re-sending the start, which would run a
        // prediction again that ended a moment ago while its callback is on its way.
        let heard_lately = up.callback_is_authoritative()
            && run
                .last_callback
                .is_some_and(|at| now - at < chrono_dur(self.check_delay(n)));
        let state = if heard_lately {
            Ok(UpstreamState::Running {
                progress: None,
                logs: None,
            })
        } else {
            crate::metrics::upstream(
                up.provider(),
                "check",
                task_id,
                up.check(job_of(&task), &id, &callback),
            )
            .await
        };
        let mut unreachable = false;
        let (progress, logs, restarted) = match state {
            Ok(s) if s.is_terminal() => {
                // Two copies of this check (a callback prompted one) may both find the end:
                // the one whose number is recorded first collects the outputs.
                // Held for as long as downloads may take: until then no check collects again
                // (a crash here is resumed by the sweeper once it has passed).
                let claim = Transition::UpstreamCollecting {
                    id: id.clone(),
                    check: n,
                    until: now + chrono_dur(OUTPUT_COLLECT_TIME + self.app.config.lease),
                };
                return match self.app.store.update_task_from(&task, &claim).await {
                    Ok(claimed) => self.settle(&claimed, spec, up, &id, s).await,
                    Err(PortError::Rejected(e)) => {
                        tracing::debug!(task_id, check = n, reason = %e, "another check ends the run");
                        Ok(Disposition::Done)
                    }
                    Err(e) => Err(e),
                };
            }
            Ok(UpstreamState::Running { progress, logs }) => (progress, logs, false),
            Ok(UpstreamState::Restarted) if self.ended_meanwhile(&task).await? => {
                // The run had finished and its callback was on its way: the new run this
                // check started is not wanted.
                tracing::info!(task_id, upstream_id = %id, "the run ended while it was checked; stopping the run the check started");
                if let Err(e) = up.cancel(&id).await {
                    tracing::warn!(task_id, error = %e, "upstream cancel failed");
                }
                return Ok(Disposition::Done);
            }
            Ok(_restarted) if run.restarts >= MAX_RESTARTS => {
                let message =
                    "the model's upstream lost the run's result twice; credits were refunded";
                let fail = failure(Some(task.attempts), "upstream_unavailable", message);
                return self.fail_and_cancel(&task, up, &id, &fail).await;
            }
            Ok(_restarted) => {
                tracing::warn!(task_id, upstream_id = %id, "the upstream lost the run and started it again");
                (None, None, true)
            }
            Err(UpstreamError::Busy { .. }) => (None, None, false),
            Err(UpstreamError::Unavailable(why)) => {
                if run.failed_checks + 1 >= MAX_FAILED_CHECKS {
                    let message = format!(
                        "the model's upstream could not be reached ({}); credits were refunded",
                        bounded(&why)
                    );
                    let fail = failure(Some(task.attempts), "upstream_unavailable", message);
                    return self.fail_and_cancel(&task, up, &id, &fail).await;
                }
                tracing::warn!(task_id, check = n, error = %why, "upstream check failed");
                unreachable = true;
                (None, None, false)
            }
            Err(UpstreamError::Unknown) => {
                let message = "the model's upstream no longer knows the run; credits were refunded";
                let fail = failure(Some(task.attempts), "upstream_unavailable", message);
                return self.finish(&task, &fail).await;
            }
            Err(UpstreamError::Refused(why)) => {
                let fail = failure(Some(task.attempts), "generation_failed", bounded(&why));
                return self.finish(&task, &fail).await;
            }
        };
        let (delay, check_by) = self.next_check(&task, spec, n + 1);
        let report = Transition::UpstreamReported {
            id,
            check: Some(n),
            progress,
            logs,
            restarted,
            unreachable,
            check_by: Some(check_by),
        };
        match self.app.store.update_task_from(&task, &report).await {
            Ok(_) => {
                self.enqueue_check(task_id, n + 1, delay).await?;
                Ok(Disposition::Done)
            }
            Err(PortError::Rejected(e)) => {
                // Another copy of this check recorded it and scheduled the next.
                tracing::debug!(task_id, check = n, reason = %e, "check not recorded");
                Ok(Disposition::Done)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether `task`, found forgotten by its upstream, ended meanwhile: a run that finished
    /// just before a check is forgotten while its callback is still on its way (Cog sends it
    /// as the prediction ends). Waits [`RESTART_GRACE`] for that callback before answering.
    async fn ended_meanwhile(&self, task: &Task) -> PortResult<bool> {
        tokio::time::sleep(RESTART_GRACE).await;
        let now = self.app.store.task(&task.id).await?;
        Ok(now.is_none_or(|t| t.status != TaskStatus::Processing))
    }

    /// Fails `task` with `fail` first, then asks the upstream to stop run `id` (best effort):
    /// in that order, the `canceled` callback the upstream sends finds the task ended.
    async fn fail_and_cancel(
        &self,
        task: &Task,
        up: &Arc<dyn Upstream>,
        id: &str,
        fail: &Transition,
    ) -> PortResult<Disposition> {
        let done = self.finish(task, fail).await?;
        if let Err(e) = up.cancel(id).await {
            tracing::warn!(task_id = %task.id, upstream_id = id, error = %e, "upstream cancel failed");
        }
        Ok(done)
    }

    /// The run outlived the model's timeout: cancel it upstream (best effort) and fail the
    /// task with `timeout`, refunded.
    async fn time_out(
        &self,
        task: &Task,
        spec: &ModelSpec,
        up: &Arc<dyn Upstream>,
        id: &str,
    ) -> PortResult<Disposition> {
        let message = format!(
            "the model ran longer than its timeout of {} s and was cancelled; credits were refunded",
            spec.timeout.as_secs()
        );
        let fail = failure(Some(task.attempts), "timeout", message);
        self.fail_and_cancel(task, up, id, &fail).await
    }

    /// Ends `task` with the terminal `state` of its run `id`: outputs copied into the blob
    /// store and the task completed, or the task failed with a refund.
    async fn settle(
        &self,
        task: &Task,
        spec: &ModelSpec,
        up: &Arc<dyn Upstream>,
        id: &str,
        state: UpstreamState,
    ) -> PortResult<Disposition> {
        let (outcome, logs) = match state {
            UpstreamState::Succeeded { outputs, logs } => {
                match self.collect(&task.id, spec, up, &outputs).await {
                    Ok(stored) => (Ok(stored), logs),
                    Err(Collect::Port(e)) => return Err(e),
                    Err(Collect::Refused(why)) => (
                        Err(TaskFailure {
                            code: "output_rejected".into(),
                            message: format!("{why}; credits were refunded"),
                        }),
                        logs,
                    ),
                }
            }
            UpstreamState::Failed { message, logs } => (
                Err(TaskFailure {
                    code: "generation_failed".into(),
                    message: bounded(&message),
                }),
                logs,
            ),
            UpstreamState::Canceled => (
                Err(TaskFailure {
                    code: "generation_failed".into(),
                    message: "the run was cancelled upstream; credits were refunded".into(),
                }),
                None,
            ),
            UpstreamState::Running { .. } | UpstreamState::Restarted => {
                return Ok(Disposition::Done);
            }
        };
        let end = Transition::UpstreamEnded {
            id: id.to_string(),
            outcome,
            logs,
        };
        self.finish(task, &end).await
    }

    /// Handles an upstream's callback about task `task_id` (the `POST /v1/upstream/{provider}/{task_id}`
    /// route): 404 when the task or its model's provider does not match, 401 when the token is
    /// not the task's, 400 when the provider refuses the body.
    pub async fn upstream_callback(
        &self,
        provider: &str,
        task_id: &str,
        token: Option<&str>,
        req: CallbackRequest<'_>,
    ) -> Result<CallbackOutcome, ApiError> {
        let store = &self.app.store;
        if !crate::is_task_id(task_id) {
            return Err(ApiError::NotFound("no such task"));
        }
        let Some(task) = store.task(task_id).await? else {
            return Err(ApiError::NotFound("no such task"));
        };
        let Some(spec) = self.app.registry.get(&task.model) else {
            return Err(ApiError::NotFound("no such task"));
        };
        let crate::registry::Runner::Upstream(up) = &spec.runner else {
            return Err(ApiError::NotFound("no such task"));
        };
        if up.provider() != provider {
            return Err(ApiError::NotFound("no such task"));
        }
        let Some(run) = task.upstream.clone() else {
            return Err(ApiError::InvalidCallbackToken);
        };
        if !token.is_some_and(|t| same_token(t, &run.token)) {
            return Err(ApiError::InvalidCallbackToken);
        }
        let report = up
            .read_callback(req)
            .map_err(|why| ApiError::invalid("body", format!("callback refused: {why}")))?;
        if task.status != TaskStatus::Processing {
            return Ok(CallbackOutcome::Ignored);
        }
        if run.id.as_ref().is_some_and(|known| *known != report.id) {
            return Ok(CallbackOutcome::Ignored);
        }
        if !up.callback_is_authoritative() {
            let msg = WorkMessage::Check {
                task_id: task.id.clone(),
                check: run.checks,
            };
            self.app.queue.enqueue(&msg, Duration::ZERO).await?;
            return Ok(CallbackOutcome::CheckScheduled);
        }
        match report.state {
            UpstreamState::Running { progress, logs } => {
                let t = Transition::UpstreamReported {
                    id: report.id,
                    check: None,
                    progress,
                    logs,
                    restarted: false,
                    unreachable: false,
                    check_by: None,
                };
                match store.update_task_from(&task, &t).await {
                    Ok(_) => Ok(CallbackOutcome::Recorded),
                    // Before the start was recorded, or after the end: nothing to keep.
                    Err(PortError::Rejected(_)) => Ok(CallbackOutcome::Ignored),
                    Err(e) => Err(e.into()),
                }
            }
            UpstreamState::Restarted => Ok(CallbackOutcome::Ignored),
            state => {
                self.settle(&task, spec, up, &report.id, state).await?;
                Ok(CallbackOutcome::Recorded)
            }
        }
    }

    /// Copies each output into the blob store as `tasks/{id}/output-{i}.{ext}`.
    async fn collect(
        &self,
        task_id: &str,
        spec: &ModelSpec,
        up: &Arc<dyn Upstream>,
        outputs: &[String],
    ) -> Result<Vec<Output>, Collect> {
        let mut stored = Vec::with_capacity(outputs.len());
        for (i, out) in outputs.iter().enumerate() {
            let key_of = |content_type: &str| {
                format!(
                    "tasks/{task_id}/output-{i}.{}",
                    crate::media::extension_for(content_type)
                )
            };
            let (key, content_type, size_bytes) = if out.starts_with("data:") {
                let (bytes, content_type) = decode_data_uri(out, spec.max_output_bytes)?;
                let key = key_of(&content_type);
                let size_bytes = bytes.len() as u64;
                self.app
                    .blobs
                    .put(&key, bytes, &content_type)
                    .await
                    .map_err(Collect::Port)?;
                (key, content_type, size_bytes)
            } else {
                self.download(out, spec, up, &key_of).await?
            };
            stored.push(Output {
                key,
                content_type,
                size_bytes,
            });
        }
        Ok(stored)
    }

    /// Downloads output `url` into the blob store under the model's size cap, following at most
    /// [`MAX_OUTPUT_REDIRECTS`] redirects (a provider's file URL may answer with a redirect to
    /// its storage, as the Gemini API's does). Every hop is judged afresh: its host must
    /// resolve to public addresses only, unless the catalog trusts it, and it carries the
    /// provider's download headers only when the provider approves that hop's URL
    /// ([`Upstream::download_headers`]), so a credential never follows a redirect elsewhere.
    ///
    /// The final hop's body is streamed into the blob store
    /// ([`crate::ports::BlobStore::put_stream`]) under the key `key_of` makes from its content
    /// type, never held whole in memory: a body over the cap, or one that breaks off, stores
    /// nothing and refuses the output. Returns the key, the content type and the size.
    async fn download(
        &self,
        url: &str,
        spec: &ModelSpec,
        up: &Arc<dyn Upstream>,
        key_of: &(dyn Fn(&str) -> String + Sync),
    ) -> Result<(String, String, u64), Collect> {
        let mut current = url::Url::parse(url).map_err(|_| {
            Collect::Refused("the upstream returned an output that is not a URL".into())
        })?;
        let mut redirects = 0;
        let (host, resp) = loop {
            // The same checks on the first URL and on every redirect's target.
            let what = if redirects == 0 {
                "the upstream returned an output URL"
            } else {
                "the output's download was redirected to a URL"
            };
            if !matches!(current.scheme(), "http" | "https") {
                return Err(Collect::Refused(format!(
                    "{what} with scheme {:?}",
                    current.scheme()
                )));
            }
            let host = current
                .host_str()
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .to_string();
            let trusted = spec
                .trusted_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(&host));
            if !trusted {
                let literal = match current.host() {
                    Some(url::Host::Ipv4(a)) => Some(std::net::IpAddr::V4(a)),
                    Some(url::Host::Ipv6(a)) => Some(std::net::IpAddr::V6(a)),
                    _ => None,
                };
                if literal.is_some_and(|ip| !crate::webhook::is_public(ip)) {
                    return Err(Collect::Refused(format!(
                        "{what} on a non-public address ({host})"
                    )));
                }
            }
            let client = if trusted {
                &self.downloads_trusted
            } else {
                &self.downloads
            };
            let mut req = client.get(current.clone());
            for (name, value) in up.download_headers(&current) {
                req = req.header(name, value);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    return Err(Collect::Refused(format!(
                        "the output could not be downloaded from {host} ({})",
                        if e.is_timeout() {
                            "timed out"
                        } else {
                            "connection failed or refused"
                        }
                    )));
                }
            };
            if !matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
                break (host, resp);
            }
            if redirects == MAX_OUTPUT_REDIRECTS {
                return Err(Collect::Refused(format!(
                    "the output's download was redirected more than {MAX_OUTPUT_REDIRECTS} times"
                )));
            }
            let next = resp
                .headers()
                .get(http::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|location| current.join(location).ok());
            current = next.ok_or_else(|| {
                Collect::Refused(format!(
                    "the output download from {host} was redirected without a usable Location"
                ))
            })?;
            redirects += 1;
        };
        if !resp.status().is_success() {
            return Err(Collect::Refused(format!(
                "the output could not be downloaded from {host} (HTTP {})",
                resp.status().as_u16()
            )));
        }
        let content_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_string();
        let cap = spec.max_output_bytes;
        if resp.content_length().is_some_and(|n| n > cap) {
            return Err(too_big(cap));
        }
        let key = key_of(&content_type);
        let stored = self
            .app
            .blobs
            .put_stream(&key, &content_type, &mut Download(resp), cap)
            .await
            .map_err(Collect::Port)?;
        match stored {
            Ok(size) => Ok((key, content_type, size)),
            Err(StreamRefused::TooBig { .. }) => Err(too_big(cap)),
            Err(StreamRefused::Broken(why)) => Err(Collect::Refused(format!(
                "the output download from {host} broke off ({why})"
            ))),
        }
    }
}

/// An output download's body, chunk by chunk, for [`crate::ports::BlobStore::put_stream`].
struct Download(reqwest::Response);

#[async_trait::async_trait]
impl ChunkSource for Download {
    async fn next_chunk(&mut self) -> Result<Option<bytes::Bytes>, String> {
        self.0.chunk().await.map_err(|e| {
            if e.is_timeout() {
                "timed out".to_string()
            } else {
                "connection lost".to_string()
            }
        })
    }
}

/// Why outputs could not be collected.
enum Collect {
    /// The blob store failed: retry later.
    Port(PortError),
    /// The output is refused or unreachable: the task fails with `output_rejected`.
    Refused(String),
}

impl From<PortError> for Collect {
    fn from(e: PortError) -> Self {
        Collect::Port(e)
    }
}

fn too_big(cap: u64) -> Collect {
    Collect::Refused(format!(
        "an output is larger than the model's limit of {cap} bytes"
    ))
}

/// Decodes a `data:[<type>][;base64],<data>` URI under `cap` bytes.
fn decode_data_uri(uri: &str, cap: u64) -> Result<(bytes::Bytes, String), Collect> {
    let rest = &uri["data:".len()..];
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| Collect::Refused("the upstream returned a malformed data: URI".into()))?;
    let (mime, base64) = match meta.strip_suffix(";base64") {
        Some(m) => (m, true),
        None => (meta, false),
    };
    let mime = if mime.is_empty() { "text/plain" } else { mime };
    // Base64 is 4 characters per 3 bytes: refuse before decoding what would be too big.
    if (data.len() as u64 / 4) * 3 > cap {
        return Err(too_big(cap));
    }
    let bytes = if base64 {
        base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|_| {
                Collect::Refused("the upstream returned a data: URI that is not base64".into())
            })?
    } else {
        data.as_bytes().to_vec()
    };
    if bytes.len() as u64 > cap {
        return Err(too_big(cap));
    }
    Ok((bytes.into(), mime.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_uris_decode_with_their_type_and_respect_the_cap() {
        let (b, t) = decode_data_uri("data:image/gif;base64,R0lGODlh", 100)
            .ok()
            .unwrap();
        assert_eq!(&b[..], b"GIF89a");
        assert_eq!(t, "image/gif");
        assert_eq!(crate::media::extension_for(&t), "gif");
        let (b, t) = decode_data_uri("data:,hello", 100).ok().unwrap();
        assert_eq!((&b[..], t.as_str()), (&b"hello"[..], "text/plain"));
        assert!(matches!(
            decode_data_uri("data:image/gif;base64,R0lGODlh", 5),
            Err(Collect::Refused(_))
        ));
        assert!(matches!(
            decode_data_uri("data:image/gif;base64,%%%", 100),
            Err(Collect::Refused(_))
        ));
        assert!(matches!(
            decode_data_uri("data:nocomma", 100),
            Err(Collect::Refused(_))
        ));
    }

    #[test]
    fn retries_are_spread_around_their_base() {
        let base = Duration::from_secs(4);
        let delays: Vec<Duration> = (0..200).map(|_| jittered(base)).collect();
        assert!(delays.iter().all(|d| *d >= base / 2 && *d < base * 3 / 2));
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 100, "spread, not one wave");
    }

    #[test]
    fn messages_are_bounded_and_tokens_compared_whole() {
        assert_eq!(
            bounded(&"x".repeat(600)).chars().count(),
            MAX_UPSTREAM_MESSAGE + 1
        );
        assert_eq!(bounded("short"), "short");
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("abc", "abcd"));
        assert_ne!(new_token(), new_token());
        assert_eq!(new_token().len(), 48);
    }
}
