//! Faults: work that was lost, messages that keep failing, workers that die mid-task, and
//! accounts that open too many tasks, over real HTTP on a real server.
//!
//! - The sweeper re-enqueues the work of a task stored without a message, of a processing task
//!   whose lease ran out with no message left, and of a finished task whose first webhook was
//!   never sent, once it has waited `sweep_after`. Each test runs a second server with sweeping
//!   effectively off (one sweep an hour) as the control: there the same task stays stuck.
//! - Dead letters end their task (failed `attempts_exhausted`, refunded) unless a worker holds
//!   its lease, and fail a webhook; local workers dead-letter after `max_receives`.
//! - A worker that crashes mid-task leaves its message; the task is taken again once its lease
//!   expires, and fails with a refund after `max_attempts`.
//! - The open-task cap answers 429 `rate_limited` with `Retry-After`, debits nothing, and frees
//!   a slot whenever a task completes, fails or is cancelled.
//!
//! Every test runs on the embedded backends and, with `TASKLANE_TEST_BACKEND=aws`, on
//! DynamoDB, SQS and S3 in the emulator.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use common::{Answer, Server, answer};
use serde_json::{Value, json};
use tasklane_core::ports::{PortError, PortResult, WorkMessage, WorkQueue};
use tasklane_core::processor::Processor;
use tasklane_core::task::{Task, TaskStatus, Transition};
use tasklane_local::{Hooks, LocalConfig};
use tasklane_testkit::TaskBuilder;
use tasklane_testkit::chaos::{Chaos, ChaosConfig};
use tasklane_testkit::intercept::{Interceptor, Op};
use tokio::task::JoinSet;
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// Short lease, sweep and visibility settings so that lost work is found within seconds.
fn fast(c: &mut LocalConfig) {
    c.workers = 1;
    c.core.lease = Duration::from_secs(1);
    c.core.sweep_after = Duration::from_secs(1);
    c.core.sweep_interval = Duration::from_millis(200);
    c.core.visibility = Duration::from_secs(2);
}

/// [`fast`] with sweeping effectively off: the first sweep would run after an hour.
fn not_sweeping(c: &mut LocalConfig) {
    fast(c);
    c.core.sweep_interval = Duration::from_secs(3600);
}

/// Two servers started at once: one sweeping, one (the control) not.
async fn sweeping_and_control(hooks: (Hooks, Hooks)) -> (Server, Server) {
    tokio::join!(
        Server::start_with(fast, hooks.0),
        Server::start_with(not_sweeping, hooks.1)
    )
}

fn id(task: &Value) -> String {
    task["task_id"].as_str().expect("a task id").to_string()
}

fn dev_account(s: &Server) -> String {
    s.running.as_ref().unwrap().dev_account_id.clone()
}

fn chrono_dur(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap()
}

/// Stored times are compared at millisecond precision (SQLite's `waiting_since` column and
/// DynamoDB's index keys keep milliseconds).
fn slack() -> TimeDelta {
    TimeDelta::milliseconds(5)
}

/// An `echo` task (1 credit) of the server's development account, as `POST /tasks` builds it.
fn new_task(s: &Server, prompt: &str, callback_url: Option<&str>) -> Task {
    let mut task = TaskBuilder::echo(&dev_account(s))
        .id(s.app().new_task_id())
        .prompt(prompt);
    if let Some(url) = callback_url {
        task = task.callback(url);
    }
    task.build()
}

/// Stores (and pays for) a task the way submit does, but sends no work message: as if the
/// process died between the two, or the message was lost.
async fn store_without_message(s: &Server, prompt: &str, callback_url: Option<&str>) -> Task {
    let task = new_task(s, prompt, callback_url);
    s.app()
        .store
        .insert_task(&task, None, u64::MAX)
        .await
        .expect("storing a task");
    task
}

/// The task as stored.
async fn stored(s: &Server, id: &str) -> Task {
    s.app()
        .store
        .task(id)
        .await
        .expect("reading a task")
        .expect("the task exists")
}

async fn update(s: &Server, id: &str, t: &Transition) -> Task {
    s.app()
        .store
        .update_task(id, t)
        .await
        .unwrap_or_else(|e| panic!("{t:?} on {id}: {e}"))
}

/// Polls `check` until it returns `true` (at most `secs`).
async fn eventually(secs: u64, what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen in {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts the store reports task `id` as due for a sweep: on a control server, only the sweep
/// itself is missing.
async fn assert_due(s: &Server, id: &str) {
    let since = Utc::now() - chrono_dur(s.app().config.sweep_after);
    let due = s.app().store.due_tasks(since, 100).await.unwrap();
    assert!(
        due.iter().any(|t| t.id == id),
        "task {id} is not due: {due:?}"
    );
}

async fn view(s: &Server, id: &str) -> Value {
    let t = s.get(&format!("/tasks/{id}")).await;
    assert_eq!(t.status, 200, "{}", t.body);
    t.body
}

/// A webhook receiver on 127.0.0.1:0 that answers 200 and records every JSON body.
struct Hook {
    url: String,
    got: Arc<Mutex<Vec<Value>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Hook {
    async fn start() -> Hook {
        let got = Arc::new(Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let g = got.clone();
        let router = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: bytes::Bytes| {
                let g = g.clone();
                async move {
                    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    g.lock().unwrap().push(v);
                    axum::http::StatusCode::OK
                }
            }),
        );
        let server = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Hook { url, got, server }
    }

    fn received(&self) -> Vec<Value> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.server.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// The sweeper
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_stored_but_never_enqueued_is_run_once_it_waited_sweep_after_and_not_without_sweeps()
{
    let (on, off) = sweeping_and_control((Hooks::default(), Hooks::default())).await;
    let (on_credits, off_credits) = (on.credits().await, off.credits().await);
    // The control's task is stored first, so it has waited at least as long as the other.
    let lost_off = store_without_message(&off, "lost on the control", None).await;
    let lost = store_without_message(&on, "found by the sweeper", None).await;

    let done = on.wait_terminal(&lost.id, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    let url = done["result"]["outputs"][0]["url"].as_str().unwrap();
    let bytes = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    assert_eq!(bytes, "found by the sweeper");
    let t = stored(&on, &lost.id).await;
    assert_eq!(t.attempts, 1, "run more than once: {t:?}");
    assert!(
        t.started_at.unwrap()
            >= lost.created_at + chrono_dur(on.app().config.sweep_after) - slack(),
        "swept before it had waited sweep_after: created {}, started {:?}",
        lost.created_at,
        t.started_at
    );
    assert_eq!(
        t.waiting_since, None,
        "a finished task without webhook owes nothing"
    );
    assert_eq!(on.credits().await, on_credits - 1, "charged once");

    // The control: nothing ever re-enqueues the task.
    let waited = Utc::now() - lost_off.created_at;
    assert!(waited > t.started_at.unwrap() - lost.created_at);
    let c = view(&off, &lost_off.id).await;
    assert_eq!(c["status"], "queued", "{c}");
    assert_eq!(stored(&off, &lost_off.id).await.attempts, 0);
    assert_due(&off, &lost_off.id).await;
    assert_eq!(off.credits().await, off_credits - 1);
    tokio::join!(on.stop(), off.stop());
}

/// Fails the next `enqueue` enqueues, then lets calls through.
#[derive(Default)]
struct FailNext {
    enqueue: AtomicU32,
}

fn take(n: &AtomicU32) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

#[async_trait]
impl Interceptor for FailNext {
    async fn before(&self, op: Op) -> PortResult<()> {
        match op {
            Op::Enqueue if take(&self.enqueue) => Err(PortError::unavailable("queue down")),
            _ => Ok(()),
        }
    }
}

/// Submits with `Idempotency-Key: key`.
async fn submit_with_key(s: &Server, key: &str, body: &Value) -> Answer {
    s.send(
        s.client
            .post(s.url("/tasks"))
            .bearer_auth(&s.key)
            .header("Idempotency-Key", key)
            .json(body),
    )
    .await
}

fn orphan_body() -> Value {
    json!({"model": "echo", "prompt": "orphan"})
}

/// Submits (with `Idempotency-Key: orphan`) while the queue fails: 202, the task stored (and
/// paid for) with no message behind it. Returns its id.
async fn submit_losing_the_message(s: &Server, faults: &FailNext) -> String {
    faults.enqueue.store(1, Ordering::SeqCst);
    let a = submit_with_key(s, "orphan", &orphan_body()).await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body["status"], "queued", "{}", a.body);
    assert_eq!(
        faults.enqueue.load(Ordering::SeqCst),
        0,
        "the enqueue was not attempted"
    );
    id(&a.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_submit_whose_enqueue_failed_is_accepted_and_run_by_the_sweeper() {
    let (f_on, f_off) = (Arc::new(FailNext::default()), Arc::new(FailNext::default()));
    let (on, off) = sweeping_and_control((
        tasklane_testkit::intercept::hooks(f_on.clone()),
        tasklane_testkit::intercept::hooks(f_off.clone()),
    ))
    .await;
    let (on_credits, off_credits) = (on.credits().await, off.credits().await);
    let orphan_off = submit_losing_the_message(&off, &f_off).await;
    let orphan = submit_losing_the_message(&on, &f_on).await;
    assert_eq!(
        on.credits().await,
        on_credits - 1,
        "the stored task is paid for"
    );
    // A client retry with the same key gets the stored task, not a second one.
    let retry = submit_with_key(&on, "orphan", &orphan_body()).await;
    assert_eq!(retry.status, 202, "{}", retry.body);
    assert_eq!(id(&retry.body), orphan);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));

    let done = on.wait_terminal(&orphan, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["cost"], json!({"credits": 1, "refunded": false}));
    assert_eq!(on.credits().await, on_credits - 1, "charged once");
    let list = on.get("/tasks").await.body;
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");

    let c = view(&off, &orphan_off).await;
    assert_eq!(c["status"], "queued", "{c}");
    assert_due(&off, &orphan_off).await;
    assert_eq!(off.credits().await, off_credits - 1);
    tokio::join!(on.stop(), off.stop());
}

/// A stored task taken by a worker that then vanished with its message: processing under a
/// lease of `lease` that nobody renews.
async fn abandoned_processing(s: &Server, prompt: &str, lease: TimeDelta) -> Task {
    let task = store_without_message(s, prompt, None).await;
    let started = update(
        s,
        &task.id,
        &Transition::Start {
            lease_until: Utc::now() + lease,
        },
    )
    .await;
    assert_eq!(started.status, TaskStatus::Processing);
    assert_eq!(
        started.waiting_since,
        task.waiting_since.min(started.lease_until),
        "a claim keeps the wait the task had in the queue, or the lease end when sooner (the \
         sweeper moves it to the lease end if it finds the lease held)"
    );
    started
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_processing_task_whose_lease_expired_with_no_message_is_taken_over_after_sweep_after() {
    let (on, off) = sweeping_and_control((Hooks::default(), Hooks::default())).await;
    let on_credits = on.credits().await;
    let lease = TimeDelta::seconds(1);
    let abandoned_off = abandoned_processing(&off, "abandoned on the control", lease).await;
    let abandoned = abandoned_processing(&on, "taken over", lease).await;

    let done = on.wait_terminal(&abandoned.id, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    let t = stored(&on, &abandoned.id).await;
    assert_eq!(t.attempts, 2, "the second attempt finished it: {t:?}");
    assert_eq!(
        t.started_at, abandoned.started_at,
        "started_at is the first pickup"
    );
    let lease_end = abandoned.lease_until.unwrap();
    assert!(
        t.completed_at.unwrap() >= lease_end + chrono_dur(on.app().config.sweep_after) - slack(),
        "re-enqueued before the lease end plus sweep_after: lease end {lease_end}, completed {:?}",
        t.completed_at
    );
    assert_eq!(on.credits().await, on_credits - 1, "charged once");

    let c = stored(&off, &abandoned_off.id).await;
    assert_eq!(c.status, TaskStatus::Processing, "{c:?}");
    assert_eq!(c.attempts, 1);
    assert!(
        c.lease_until.unwrap() + chrono_dur(off.app().config.sweep_after) < Utc::now(),
        "the control's lease is long over: {c:?}"
    );
    assert_due(&off, &abandoned_off.id).await;
    tokio::join!(on.stop(), off.stop());
}

/// A stored task run to completion by direct writes, whose first webhook was never enqueued.
async fn completed_without_webhook(s: &Server, hook: &Hook) -> Task {
    let task = store_without_message(s, "webhook owed", Some(&hook.url)).await;
    update(
        s,
        &task.id,
        &Transition::Start {
            lease_until: Utc::now() + TimeDelta::seconds(60),
        },
    )
    .await;
    let done = update(
        s,
        &task.id,
        &Transition::Complete {
            attempt: 1,
            outputs: vec![],
        },
    )
    .await;
    assert_eq!(done.status, TaskStatus::Completed);
    assert_eq!(
        done.waiting_since, done.completed_at,
        "a finished task owing its first webhook waits from its end"
    );
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_tasks_first_webhook_that_was_never_enqueued_is_delivered_by_the_sweeper() {
    let (hook_on, hook_off) = tokio::join!(Hook::start(), Hook::start());
    let (on, off) = sweeping_and_control((Hooks::default(), Hooks::default())).await;
    let done_off = completed_without_webhook(&off, &hook_off).await;
    let done = completed_without_webhook(&on, &hook_on).await;

    let t = on
        .wait_for(&done.id, 30, "delivered", |t| {
            t["callback"]["state"] == "delivered"
        })
        .await;
    assert_eq!(t["callback"]["attempts"], 1, "{t}");
    let got = hook_on.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["type"], "task.completed");
    assert_eq!(got[0]["data"]["task_id"], done.id.as_str());
    let s = stored(&on, &done.id).await;
    let at = s.callback.as_ref().unwrap().deliveries[0].at;
    assert!(
        at >= done.completed_at.unwrap() + chrono_dur(on.app().config.sweep_after) - slack(),
        "sent before the task had waited sweep_after: completed {:?}, sent {at}",
        done.completed_at
    );
    assert_eq!(
        s.waiting_since, None,
        "nothing is owed once the first attempt was made"
    );

    let c = view(&off, &done_off.id).await;
    assert_eq!(c["callback"]["state"], "pending", "{c}");
    assert_eq!(c["callback"]["attempts"], 0, "{c}");
    assert!(hook_off.received().is_empty());
    assert_due(&off, &done_off.id).await;
    tokio::join!(on.stop(), off.stop());
}

/// Counts the `Run` messages enqueued per task, passing every message on.
struct CountRuns {
    inner: Arc<dyn WorkQueue>,
    runs: Arc<Mutex<HashMap<String, u32>>>,
}

#[async_trait]
impl WorkQueue for CountRuns {
    async fn enqueue(&self, message: &WorkMessage, delay: Duration) -> PortResult<()> {
        if let WorkMessage::Run { task_id } = message {
            *self
                .runs
                .lock()
                .unwrap()
                .entry(task_id.clone())
                .or_default() += 1;
        }
        self.inner.enqueue(message, delay).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_waiting_many_sweeps_gets_logarithmically_few_duplicate_runs_and_a_lost_run_is_still_found()
 {
    let runs = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let counted = runs.clone();
    let hooks = Hooks {
        store: None,
        queue: Some(Box::new(move |inner| {
            Arc::new(CountRuns {
                inner,
                runs: counted,
            })
        })),
    };
    // No workers: every Run stays in the queue, a backlog that never drains.
    let s = Server::start_with(
        |c| {
            fast(c);
            c.workers = 0;
            c.core.sweep_after = Duration::from_millis(100);
            c.core.sweep_interval = Duration::from_millis(50);
        },
        hooks,
    )
    .await;
    let after = s.app().config.sweep_after;
    let began = Instant::now();
    let mut backlog = Vec::new();
    for i in 0..4 {
        let t = s
            .submit(json!({"model": "echo", "prompt": format!("backlog {i}")}))
            .await;
        backlog.push(id(&t));
    }
    // One whose Run was lost: only the sweeper can send it.
    let lost = store_without_message(&s, "lost in the backlog", None).await;
    tokio::time::sleep(after * 30).await;
    let counts = runs.lock().unwrap().clone();
    let waited = began.elapsed();

    // The k-th re-enqueue of a task comes no earlier than 2^(k-1) sweep_after after its
    // wait began: in `waited`, at most 1 + log2(waited / sweep_after) of them. Re-enqueuing
    // once per sweep_after (about 30 here) would be far more.
    let sweeps = waited.as_secs_f64() / after.as_secs_f64();
    let max_requeues = 1 + sweeps.log2().floor() as u32;
    for t in &backlog {
        let n = counts.get(t).copied().unwrap_or(0);
        assert!(
            n >= 2,
            "task {t}, queued {sweeps:.0} sweep_after ago, was never re-enqueued: {counts:?}"
        );
        assert!(
            n <= 1 + max_requeues,
            "task {t} waiting in the backlog got {n} Run messages in {waited:?} \
             (at most 1 + {max_requeues} expected): {counts:?}"
        );
    }
    let n = counts.get(&lost.id).copied().unwrap_or(0);
    assert!(n >= 1, "the lost Run was never sent again: {counts:?}");
    assert!(
        n <= max_requeues,
        "the lost task got {n} Run messages (at most {max_requeues} expected): {counts:?}"
    );
    assert_eq!(view(&s, &lost.id).await["status"], "queued");
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Dead letters
// ---------------------------------------------------------------------------------------------

fn run_msg(id: &str) -> WorkMessage {
    WorkMessage::Run {
        task_id: id.to_string(),
    }
}

fn assert_exhausted(t: &Value) {
    assert_eq!(t["status"], "failed", "{t}");
    assert_eq!(t["error"]["code"], "attempts_exhausted", "{t}");
    assert_eq!(t["cost"]["refunded"], true, "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_lettered_run_fails_its_task_with_a_refund_unless_a_worker_holds_the_lease() {
    // No workers and no sweeps: only the dead letters change anything.
    let s = Server::start_with(
        |c| {
            not_sweeping(c);
            c.workers = 0;
        },
        Hooks::default(),
    )
    .await;
    let start = s.credits().await;
    let queued = store_without_message(&s, "queued", None).await;
    let held = store_without_message(&s, "held", None).await;
    let held = update(
        &s,
        &held.id,
        &Transition::Start {
            lease_until: Utc::now() + TimeDelta::seconds(60),
        },
    )
    .await;
    let expired = abandoned_processing(&s, "expired", TimeDelta::seconds(-1)).await;
    let completed = store_without_message(&s, "completed", None).await;
    update(
        &s,
        &completed.id,
        &Transition::Start {
            lease_until: Utc::now() + TimeDelta::seconds(60),
        },
    )
    .await;
    let completed = update(
        &s,
        &completed.id,
        &Transition::Complete {
            attempt: 1,
            outputs: vec![],
        },
    )
    .await;
    assert_eq!(s.credits().await, start - 4);

    let processor = Processor::new(s.app().clone());
    for t in [&queued, &held, &expired, &completed] {
        processor
            .dead_letter(&run_msg(&t.id))
            .await
            .unwrap_or_else(|e| panic!("dead letter of {}: {e}", t.id));
    }

    assert_exhausted(&view(&s, &queued.id).await);
    assert_exhausted(&view(&s, &expired.id).await);
    assert_eq!(
        stored(&s, &held.id).await,
        held,
        "the dead letter touched a task whose lease a live worker holds"
    );
    assert_eq!(stored(&s, &completed.id).await, completed);
    assert_eq!(
        s.credits().await,
        start - 2,
        "the queued and the expired task are refunded, nothing else"
    );

    // Dead letters are at-least-once too: the same ones again change nothing.
    for t in [&queued, &held, &expired, &completed] {
        processor.dead_letter(&run_msg(&t.id)).await.unwrap();
    }
    assert_eq!(s.credits().await, start - 2, "refunded twice");
    assert_eq!(stored(&s, &held.id).await, held);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_lettered_webhook_is_marked_failed_unless_its_attempt_is_stale() {
    let hook = Hook::start().await;
    let s = Server::start_with(
        |c| {
            not_sweeping(c);
            c.workers = 0;
        },
        Hooks::default(),
    )
    .await;
    let done = completed_without_webhook(&s, &hook).await;
    let processor = Processor::new(s.app().clone());
    let deliver = |attempt| WorkMessage::Deliver {
        task_id: done.id.clone(),
        attempt,
        not_before: None,
    };

    // A message for another attempt than the one owed is stale: nothing changes.
    processor.dead_letter(&deliver(3)).await.unwrap();
    assert_eq!(stored(&s, &done.id).await, done);

    processor.dead_letter(&deliver(0)).await.unwrap();
    let t = view(&s, &done.id).await;
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(t["callback"]["state"], "failed", "{t}");
    assert_eq!(t["callback"]["attempts"], 0, "{t}");
    assert_eq!(t["cost"]["refunded"], false, "{t}");
    assert_eq!(
        stored(&s, &done.id).await.waiting_since,
        None,
        "a failed webhook is no longer owed"
    );
    assert!(hook.received().is_empty(), "{:?}", hook.received());
    s.stop().await;
}

/// [`fast`] with `max_receives` receives before local workers dead-letter, a 1 s visibility,
/// no sweeps (every receive is of the one message submit sent) and workers that crash on their
/// first store call.
async fn crashing_server(max_receives: u32) -> (Server, Arc<Chaos>) {
    let chaos = Chaos::new(ChaosConfig {
        crash: 1.0,
        ..ChaosConfig::none(7)
    });
    let s = Server::start_with(
        |c| {
            not_sweeping(c);
            c.core.visibility = Duration::from_secs(1);
            c.core.max_receives = max_receives;
        },
        tasklane_testkit::chaos::hooks(chaos.clone()),
    )
    .await;
    (s, chaos)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_received_more_than_max_receives_times_is_dead_lettered_by_the_worker() {
    let ((s, chaos), (control, control_chaos)) =
        tokio::join!(crashing_server(2), crashing_server(1000));
    let (start, control_start) = (s.credits().await, control.credits().await);
    let body = json!({"model": "echo", "prompt": "never runs"});
    let c = id(&control.submit(body.clone()).await);
    let t = id(&s.submit(body).await);

    let done = s.wait_terminal(&t, 30).await;
    assert_exhausted(&done);
    assert_eq!(
        chaos.counts().crashed,
        2,
        "dead-lettered after other than max_receives (2) receives"
    );
    assert_eq!(stored(&s, &t).await.attempts, 0, "the task never started");
    assert_eq!(s.credits().await, start, "refunded");

    // The control's message keeps coming back past two receives and is never dead-lettered.
    eventually(30, "the control's third receive", || {
        control_chaos.counts().crashed >= 3
    })
    .await;
    let v = view(&control, &c).await;
    assert_eq!(v["status"], "queued", "{v}");
    assert_eq!(control.credits().await, control_start - 1);
    tokio::join!(s.stop(), control.stop());
}

// ---------------------------------------------------------------------------------------------
// Workers that crash mid-task
// ---------------------------------------------------------------------------------------------

/// What [`CrashMidTask`] saw: each successful `Start` (when, and the task it wrote), and the
/// crashes it caused.
#[derive(Default)]
struct CrashLog {
    starts: Mutex<Vec<(DateTime<Utc>, Task)>>,
    crashes: AtomicUsize,
}

/// A store hook whose caller "dies" ([`PortError::Halted`]) whenever it reports progress or
/// completes an attempt: every attempt takes the lease, then its worker vanishes.
struct CrashMidTask {
    log: Arc<CrashLog>,
}

#[async_trait]
impl Interceptor for CrashMidTask {
    async fn before(&self, _op: Op) -> PortResult<()> {
        Ok(())
    }

    async fn before_update(&self, t: &Transition) -> PortResult<()> {
        if matches!(t, Transition::Progress { .. } | Transition::Complete { .. }) {
            self.log.crashes.fetch_add(1, Ordering::SeqCst);
            return Err(PortError::Halted);
        }
        Ok(())
    }

    fn after_update(&self, t: &Transition, r: &PortResult<Task>) {
        if let (Transition::Start { .. }, Ok(task)) = (t, r) {
            self.log
                .starts
                .lock()
                .unwrap()
                .push((Utc::now(), task.clone()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_whose_worker_dies_mid_task_is_retried_after_its_lease_and_fails_after_three_attempts()
 {
    let log = Arc::new(CrashLog::default());
    let hooks = tasklane_testkit::intercept::hooks(Arc::new(CrashMidTask { log: log.clone() }));
    // No sweeps: only the crashed worker's message, back after its visibility, drives the
    // later attempts. Lease 1 s, visibility 2 s: it comes back after the lease ran out.
    let s = Server::start_with(not_sweeping, hooks).await;
    let start = s.credits().await;
    let task = s
        .submit(json!({"model": "echo", "prompt": "the worker dies"}))
        .await;
    let id = id(&task);

    let done = s.wait_terminal(&id, 40).await;
    assert_exhausted(&done);
    assert_eq!(s.credits().await, start, "refunded");
    let t = stored(&s, &id).await;
    assert_eq!(t.attempts, s.app().config.max_attempts);
    assert_eq!(t.attempts, 3);

    let starts = log.starts.lock().unwrap().clone();
    let attempts: Vec<u32> = starts.iter().map(|(_, t)| t.attempts).collect();
    assert_eq!(attempts, [1, 2, 3], "attempts started");
    assert_eq!(
        log.crashes.load(Ordering::SeqCst),
        3,
        "one crash per attempt"
    );
    for pair in starts.windows(2) {
        let (earlier, later) = (&pair[0].1, &pair[1].1);
        assert!(
            later.started_at == earlier.started_at,
            "started_at is the first pickup"
        );
        assert!(
            pair[1].0 >= earlier.lease_until.unwrap(),
            "attempt {} began at {} before attempt {}'s lease ended at {:?}",
            later.attempts,
            pair[1].0,
            earlier.attempts,
            earlier.lease_until
        );
    }
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The open-task cap
// ---------------------------------------------------------------------------------------------

/// Asserts a 429 `rate_limited` naming `cap`, with a `Retry-After` of at least one second.
fn assert_capped(a: &Answer, cap: u64) {
    let e = a.assert_error(429, "rate_limited");
    assert!(
        e["message"].as_str().unwrap().contains(&cap.to_string()),
        "the message does not name the cap: {e}"
    );
    let retry: u64 = a
        .header("retry-after")
        .expect("Retry-After on a 429")
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry >= 1, "Retry-After {retry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submits_over_the_open_task_cap_get_429_until_a_task_finishes_fails_or_is_cancelled() {
    let cap = |c: &mut LocalConfig| {
        fast(c);
        c.core.max_open_tasks = 2;
        // The slow task reports no progress: a lease longer than it runs keeps it one attempt.
        c.core.lease = Duration::from_secs(30);
    };
    let s = Server::start_with(cap, Hooks::default()).await;
    let start = s.credits().await;
    let echo = |p: &str| json!({"model": "echo", "prompt": p});

    // One worker: a slow task holds it (processing), the next waits behind it (queued).
    let slow = id(&s
        .submit(json!({"model": "echo", "prompt": "slow", "params": {"sleep_ms": 4000}}))
        .await);
    s.wait_for(&slow, 30, "processing", |t| t["status"] == "processing")
        .await;
    let waiting = id(&s.submit(echo("waiting")).await);
    let before = s.credits().await;
    assert_capped(&s.post("/tasks", &echo("over the cap")).await, 2);
    let keyed = echo("after the cancel");
    assert_capped(&submit_with_key(&s, "k-cap", &keyed).await, 2);
    assert_eq!(
        s.credits().await,
        before,
        "a refused submit debited credits"
    );
    let list = s.get("/tasks").await.body;
    assert_eq!(list["data"].as_array().unwrap().len(), 2, "{list}");
    assert_eq!(s.get("/account").await.body["open_tasks"], 2);

    // A cancel frees a slot; the refused Idempotency-Key was not used up.
    let c = s
        .post(&format!("/tasks/{waiting}/cancel"), &json!({}))
        .await;
    assert_eq!(c.status, 200, "{}", c.body);
    let a = submit_with_key(&s, "k-cap", &keyed).await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.header("idempotent-replayed"), None);
    let third = id(&a.body);
    assert_capped(&s.post("/tasks", &echo("over the cap again")).await, 2);
    assert_eq!(
        view(&s, &slow).await["status"],
        "processing",
        "the slow task ended before the cap was checked"
    );

    // A completion frees a slot.
    assert_eq!(s.wait_terminal(&slow, 30).await["status"], "completed");
    let fourth = id(&s.submit(echo("after the completion")).await);
    for t in [&third, &fourth] {
        assert_eq!(s.wait_terminal(t, 30).await["status"], "completed");
    }
    // A failure frees its slot too.
    let failing = id(&s
        .submit(json!({"model": "echo", "params": {"fail": "on purpose"}}))
        .await);
    assert_eq!(s.wait_terminal(&failing, 30).await["status"], "failed");
    // slow, third and fourth stay charged; waiting and failing were refunded.
    assert_eq!(s.credits().await, start - 3);
    let account = s.get("/account").await.body;
    assert_eq!(account["open_tasks"], 0, "{account}");
    assert_eq!(account["max_open_tasks"], 2, "{account}");

    // Every slot came back (the count is exactly zero, on DynamoDB too): with no workers, two
    // submits fit and the third is refused.
    let s = s
        .restart(|c| {
            cap(c);
            c.workers = 0;
        })
        .await;
    let a = id(&s.submit(echo("first of two")).await);
    s.submit(echo("second of two")).await;
    assert_capped(&s.post("/tasks", &echo("third")).await, 2);
    let c = s.post(&format!("/tasks/{a}/cancel"), &json!({})).await;
    assert_eq!(c.status, 200, "{}", c.body);
    s.submit(echo("fits again")).await;
    assert_capped(&s.post("/tasks", &echo("third again")).await, 2);
    assert_eq!(s.credits().await, start - 5);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submits_never_open_more_tasks_than_the_cap() {
    let s = Server::start_with(
        |c| {
            c.workers = 0;
            c.core.max_open_tasks = 3;
        },
        Hooks::default(),
    )
    .await;
    let start = s.credits().await;
    let url = s.url("/tasks");
    let body = json!({"model": "echo", "prompt": "one of many"});
    let mut set = JoinSet::new();
    for _ in 0..12 {
        set.spawn(answer(s.client.post(&url).bearer_auth(&s.key).json(&body)));
    }
    let answers = set.join_all().await;
    let mut accepted = 0;
    for a in &answers {
        match a.status.as_u16() {
            202 => accepted += 1,
            _ => assert_capped(a, 3),
        }
    }
    assert_eq!(accepted, 3, "accepted over a cap of 3");
    assert_eq!(
        s.credits().await,
        start - 3,
        "refused submits debited credits"
    );
    let list = s.get("/tasks?limit=100").await.body;
    assert_eq!(list["data"].as_array().unwrap().len(), 3, "{list}");
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// A client that hangs up mid-submit
// ---------------------------------------------------------------------------------------------

/// Holds the first call of one port operation until released, telling the test when the call
/// was reached and whether the future that waits in it was dropped (its caller cancelled).
struct HoldOnce {
    op: Op,
    armed: std::sync::atomic::AtomicBool,
    reached: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
    dropped: tokio::sync::Notify,
}

/// Notifies `dropped` unless disarmed: the waiting future was dropped before its release.
struct DropAlarm<'a>(Option<&'a tokio::sync::Notify>);

impl Drop for DropAlarm<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.0 {
            n.notify_one();
        }
    }
}

#[async_trait]
impl Interceptor for HoldOnce {
    async fn before(&self, op: Op) -> PortResult<()> {
        if op == self.op && self.armed.swap(false, Ordering::SeqCst) {
            let mut alarm = DropAlarm(Some(&self.dropped));
            self.reached.notify_one();
            drop(self.release.acquire().await);
            alarm.0 = None;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_at_any_step_of_a_submit_leaves_no_task_waiting_on_the_sweeper() {
    // Every call a submit with an Idempotency-Key awaits, in order.
    let steps = [
        Op::AccountByKeyHash,
        Op::ReserveIdempotency,
        Op::InsertTask,
        Op::Enqueue,
    ];
    let mut cut_before_writing = 0;
    for step in steps {
        let hold = Arc::new(HoldOnce {
            op: step,
            armed: true.into(),
            reached: Default::default(),
            release: tokio::sync::Semaphore::new(0),
            dropped: Default::default(),
        });
        // Sweeping is off: a task left without its work message would wait here for an hour.
        let s = Server::start_with(
            not_sweeping,
            tasklane_testkit::intercept::hooks(hold.clone()),
        )
        .await;
        let key = format!("hangup-{step:?}");
        let req = s
            .client
            .post(s.url("/tasks"))
            .bearer_auth(&s.key)
            .header("idempotency-key", &key)
            .json(&json!({"model": "echo", "prompt": format!("cut at {step:?}")}));
        let client = tokio::spawn(answer(req));
        tokio::time::timeout(Duration::from_secs(10), hold.reached.notified())
            .await
            .unwrap_or_else(|_| panic!("the submit never reached {step:?}"));
        // The client hangs up while the server is inside that call.
        client.abort();
        let _ = client.await;
        // The server notices the closed connection and drops the request's future: a call
        // still inside it is cancelled (the alarm rings). A call the submit made on a task of
        // its own goes on. Give the server a moment to notice, then let the call proceed.
        let cancelled = tokio::time::timeout(Duration::from_secs(1), hold.dropped.notified())
            .await
            .is_ok();
        hold.release.add_permits(1);

        // A cancelled call writes nothing more; one that goes on creates its task, perhaps
        // only after this line: wait for it rather than read the list too early.
        let list = || async {
            s.get("/tasks?limit=10").await.body["data"]
                .as_array()
                .unwrap()
                .clone()
        };
        let mut tasks = list().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cancelled && tasks.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tasks = list().await;
        }
        if cancelled {
            // Cut before the first write: nothing was created, nothing was charged.
            assert!(tasks.is_empty(), "{step:?}: cancelled, yet {tasks:?}");
            assert_eq!(s.credits().await, common::test_config(&s.dir).dev_credits);
            cut_before_writing += 1;
        } else {
            assert_eq!(
                tasks.len(),
                1,
                "{step:?}: not cancelled, so its task: {tasks:?}"
            );
            let end = s.wait_terminal(&id(&tasks[0]), 20).await;
            assert_eq!(end["status"], "completed", "{step:?}: {end}");
        }
        // The idempotency record finished too: the retry gets the same task (or, if nothing
        // was written, creates it), never 409 `idempotency_in_progress`.
        let retry = s
            .send(
                s.client
                    .post(s.url("/tasks"))
                    .bearer_auth(&s.key)
                    .header("idempotency-key", &key)
                    .json(&json!({"model": "echo", "prompt": format!("cut at {step:?}")})),
            )
            .await;
        assert_eq!(retry.status, 202, "{step:?}: {}", retry.body);
        if let Some(first) = tasks.first() {
            assert_eq!(retry.body["task_id"], first["task_id"], "{step:?}");
        }
        s.stop().await;
    }
    println!(
        "hang-ups at {} steps: {cut_before_writing} cut before the first write, the rest completed without the sweeper",
        steps.len()
    );
    assert!(
        cut_before_writing >= 1,
        "the first step is before any write"
    );
}
