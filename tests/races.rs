//! Races: concurrent requests and duplicate work never run a task twice, never refund twice,
//! never overspend credits and never create a task twice for one idempotency key.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::{Answer, Server, answer};
use serde_json::{Value, json};
use tasklane_core::ports::{PortResult, WorkMessage};
use tasklane_core::task::{Task, Transition};
use tasklane_local::Hooks;
use tasklane_testkit::intercept::{Interceptor, Op};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

fn id(task: &Value) -> String {
    task["task_id"].as_str().expect("a task id").to_string()
}

/// Sends `n` copies of the request built by `req` at once; returns every answer.
async fn all_at_once(n: usize, req: impl Fn() -> reqwest::RequestBuilder) -> Vec<Answer> {
    let mut set = JoinSet::new();
    for _ in 0..n {
        set.spawn(answer(req()));
    }
    set.join_all().await
}

/// How a round of the cancel/pickup race is refereed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// Nothing is held: chance decides who wins.
    Chance,
    /// The worker reads the task (queued) and its claim then waits until the cancel has been
    /// answered: the cancel must win, and the worker's claim, made on what it read, must lose.
    CancelFirst,
    /// Both sides read the task (queued); the cancel's write then waits until the worker has
    /// claimed the task: the worker must win, and the cancel, made on what it read, must lose.
    WorkerFirst,
}

/// A point where a transition waits until the test opens it.
struct Gate {
    reached: watch::Sender<bool>,
    open: watch::Sender<bool>,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            reached: watch::Sender::new(false),
            open: watch::Sender::new(false),
        }
    }

    /// Called by the held side: says it got here, then waits until the gate is open.
    async fn pass(&self) {
        self.reached.send_replace(true);
        let _ = self.open.subscribe().wait_for(|open| *open).await;
    }

    /// Waits (at most 30 s) until the held side got here.
    async fn wait_reached(&self, what: &str) {
        let mut reached = self.reached.subscribe();
        tokio::time::timeout(Duration::from_secs(30), reached.wait_for(|r| *r))
            .await
            .unwrap_or_else(|_| panic!("{what} never happened (30 s)"))
            .unwrap();
    }

    fn open(&self) {
        self.open.send_replace(true);
    }
}

/// One round: its plan, its gates, and the outcome of every claim the worker wrote.
struct Round {
    plan: Plan,
    /// The worker's claim (`Start`), held under both constructed plans.
    claim: Gate,
    /// The cancel's write, held under [`Plan::WorkerFirst`].
    cancel: Gate,
    /// One entry per claim written: whether the store took it.
    claims: watch::Sender<Vec<bool>>,
}

impl Round {
    /// Waits (at most 30 s) until the claims the worker wrote satisfy `done`; returns them.
    async fn wait_claims(&self, what: &str, done: impl Fn(&Vec<bool>) -> bool) -> Vec<bool> {
        let mut claims = self.claims.subscribe();
        tokio::time::timeout(Duration::from_secs(30), claims.wait_for(done))
            .await
            .unwrap_or_else(|_| panic!("{what} did not happen within 30 s"))
            .unwrap()
            .clone()
    }
}

/// Holds the worker's claim or the cancel's write as the current round's plan says.
#[derive(Default)]
struct Referee {
    round: Mutex<Option<Arc<Round>>>,
}

impl Referee {
    fn begin(&self, plan: Plan) -> Arc<Round> {
        let round = Arc::new(Round {
            plan,
            claim: Gate::new(),
            cancel: Gate::new(),
            claims: watch::Sender::new(Vec::new()),
        });
        *self.round.lock().unwrap() = Some(round.clone());
        round
    }

    fn current(&self) -> Option<Arc<Round>> {
        self.round.lock().unwrap().clone()
    }
}

#[async_trait]
impl Interceptor for Referee {
    async fn before(&self, _op: Op) -> PortResult<()> {
        Ok(())
    }

    async fn before_update(&self, t: &Transition) -> PortResult<()> {
        let Some(round) = self.current() else {
            return Ok(());
        };
        match (round.plan, t) {
            (Plan::CancelFirst | Plan::WorkerFirst, Transition::Start { .. }) => {
                round.claim.pass().await;
            }
            (Plan::WorkerFirst, Transition::Cancel) => round.cancel.pass().await,
            _ => {}
        }
        Ok(())
    }

    fn after_update(&self, t: &Transition, result: &PortResult<Task>) {
        if let (Transition::Start { .. }, Some(round)) = (t, self.current()) {
            round.claims.send_modify(|c| c.push(result.is_ok()));
        }
    }
}

/// Who won a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Winner {
    Cancel,
    Worker,
}

/// Reads `GET /tasks/{id}` over and over until `stop` turns true (and once more after);
/// returns every status seen, in order, repeats collapsed.
fn read_all_along(s: &Server, id: &str, stop: watch::Receiver<bool>) -> JoinHandle<Vec<String>> {
    let (client, url, key) = (
        s.client.clone(),
        s.url(&format!("/tasks/{id}")),
        s.key.clone(),
    );
    tokio::spawn(async move {
        let mut seen: Vec<String> = Vec::new();
        loop {
            let last = *stop.borrow();
            let t = answer(client.get(&url).bearer_auth(&key)).await;
            assert_eq!(t.status, 200, "{}", t.body);
            let status = t.body["status"].as_str().unwrap().to_string();
            if seen.last() != Some(&status) {
                seen.push(status);
            }
            if last {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

/// Submits a task and races a cancel against the worker's pickup as `plan` says; checks that
/// exactly one side won, all through and after; returns the winner.
async fn race_round(s: &Server, referee: &Referee, plan: Plan, n: usize) -> Winner {
    let round = referee.begin(plan);
    let task = s
        .submit(json!({"model": "echo", "prompt": format!("round {n}")}))
        .await;
    let id = id(&task);
    let path = format!("/tasks/{id}");
    let cancel_path = format!("{path}/cancel");
    // A reader all through the round must never see the loser's outcome.
    let (stop, stop_rx) = watch::channel(false);
    let reader = read_all_along(s, &id, stop_rx);
    let empty = json!({});
    let (cancel, seen) = match plan {
        Plan::Chance => {
            let (cancel, seen) = tokio::join!(s.post(&cancel_path, &empty), s.get(&path));
            (
                cancel,
                Some(seen.body["status"].as_str().unwrap().to_string()),
            )
        }
        Plan::CancelFirst => {
            // The worker read the task as queued and is about to write its claim.
            round.claim.wait_reached("the worker's claim").await;
            let cancel = s.post(&cancel_path, &empty).await;
            assert_eq!(
                cancel.status, 200,
                "a cancel of the queued task, answered while the worker's claim waits, must win: {}",
                cancel.body
            );
            round.claim.open();
            // The worker's claim, made on the queued task it read, is written and refused.
            let claims = round
                .wait_claims("the worker's claim", |c| !c.is_empty())
                .await;
            assert!(
                !claims.contains(&true),
                "the worker's claim, made on the task it read queued, was taken after the \
                 cancel won (taken: {claims:?})"
            );
            (cancel, None)
        }
        Plan::WorkerFirst => {
            round.claim.wait_reached("the worker's claim").await;
            let cancel = tokio::spawn(answer(
                s.client
                    .post(s.url(&cancel_path))
                    .bearer_auth(&s.key)
                    .json(&empty),
            ));
            // The cancel read the task while the claim waited: it saw it queued.
            round.cancel.wait_reached("the cancel's write").await;
            round.claim.open();
            round
                .wait_claims("the worker's claim being taken", |c| c.contains(&true))
                .await;
            round.cancel.open();
            let cancel = cancel.await.unwrap();
            assert_eq!(
                cancel.status, 409,
                "a cancel written after the worker claimed the task must lose: {}",
                cancel.body
            );
            (cancel, None)
        }
    };
    // Nothing more will happen to the task: terminal, and no work message left.
    let end = s.wait_quiescent(&id, 60).await;
    stop.send_replace(true);
    let read = reader.await.unwrap();
    let winner = if cancel.status == 200 {
        assert_eq!(cancel.body["status"], "cancelled", "{}", cancel.body);
        assert_eq!(cancel.body["cost"]["refunded"], true);
        assert_eq!(end["status"], "cancelled", "cancel answered 200 but: {end}");
        assert_eq!(end["cost"]["refunded"], true);
        assert!(
            end["result"].is_null(),
            "a cancelled task has outputs: {end}"
        );
        let stored = s.app().store.task(&id).await.unwrap().unwrap();
        assert_eq!(stored.attempts, 0, "the cancelled task was started: {end}");
        for st in seen.iter().chain(&read) {
            assert!(
                ["queued", "cancelled"].contains(&st.as_str()),
                "saw {st} on a task the cancel won (reads: {read:?})"
            );
        }
        Winner::Cancel
    } else {
        cancel.assert_error(409, "not_cancellable");
        assert_eq!(end["status"], "completed", "cancel answered 409 but: {end}");
        assert_eq!(end["cost"]["refunded"], false);
        for st in seen.iter().chain(&read) {
            assert_ne!(
                st, "cancelled",
                "saw cancelled on a task the worker won (reads: {read:?})"
            );
        }
        Winner::Worker
    };
    match (plan, winner) {
        (Plan::Chance, _)
        | (Plan::CancelFirst, Winner::Cancel)
        | (Plan::WorkerFirst, Winner::Worker) => {}
        _ => panic!("{plan:?}: the {winner:?} side won; task: {end}"),
    }
    winner
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_racing_the_workers_pickup_is_won_by_exactly_one_side() {
    let referee = Arc::new(Referee::default());
    let s = Server::start_with(|_| {}, tasklane_testkit::intercept::hooks(referee.clone())).await;
    let start = s.credits().await;
    // Chance rounds, then rounds where each side is made to win: both a claim and a cancel
    // made on a stale read (the task queued) meet the other side's write and lose.
    let plans = std::iter::repeat_n(Plan::Chance, 30).chain(
        [Plan::CancelFirst, Plan::WorkerFirst]
            .into_iter()
            .cycle()
            .take(6),
    );
    let mut wins = std::collections::BTreeMap::<(bool, Winner), u64>::new();
    for (n, plan) in plans.enumerate() {
        let winner = race_round(&s, &referee, plan, n).await;
        *wins.entry((plan == Plan::Chance, winner)).or_default() += 1;
        let completed: u64 = wins
            .iter()
            .filter(|((_, w), _)| *w == Winner::Worker)
            .map(|(_, n)| n)
            .sum();
        assert_eq!(
            s.credits().await,
            start - completed,
            "round {n} ({plan:?}): only completed tasks stay charged"
        );
    }
    let count = |chance, w| wins.get(&(chance, w)).copied().unwrap_or(0);
    println!(
        "by chance: cancel won {} of 30 rounds, the worker {}; constructed: cancel {}, worker {}",
        count(true, Winner::Cancel),
        count(true, Winner::Worker),
        count(false, Winner::Cancel),
        count(false, Winner::Worker),
    );
    for w in [Winner::Cancel, Winner::Worker] {
        assert!(
            count(true, w) + count(false, w) > 0,
            "the {w:?} side never won"
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_concurrent_cancels_of_a_queued_task_all_succeed_and_refund_once() {
    let s = Server::start_with(|c| c.workers = 0, Hooks::default()).await;
    let start = s.credits().await;
    let task = s
        .submit(json!({"model": "veo3", "prompt": "cancel me ten times", "duration": 3}))
        .await;
    assert_eq!(s.credits().await, start - 30);
    let url = s.url(&format!("/tasks/{}/cancel", id(&task)));
    let answers = all_at_once(10, || {
        s.client.post(&url).bearer_auth(&s.key).json(&json!({}))
    })
    .await;
    for a in &answers {
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["status"], "cancelled");
        assert_eq!(a.body["cost"], json!({"credits": 30, "refunded": true}));
    }
    assert_eq!(s.credits().await, start, "refunded exactly once");
    let t = s.get(&format!("/tasks/{}", id(&task))).await.body;
    assert_eq!(t["status"], "cancelled");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_submits_never_spend_more_credits_than_the_account_holds() {
    let s = Server::start().await;
    let key = s.new_account(25).await;
    let url = s.url("/tasks");
    let body = json!({"model": "echo", "prompt": "one credit each"});
    let answers = all_at_once(50, || s.client.post(&url).bearer_auth(&key).json(&body)).await;
    let mut accepted = Vec::new();
    let mut refused = 0;
    for a in &answers {
        match a.status.as_u16() {
            202 => accepted.push(id(&a.body)),
            402 => {
                a.assert_error(402, "insufficient_quota");
                refused += 1;
            }
            other => panic!("unexpected {other}: {}", a.body),
        }
    }
    assert_eq!((accepted.len(), refused), (25, 25));
    // The accepted tasks run to completion; none is refunded, so the account stays at 0.
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in &accepted {
        loop {
            let t = s.get_as(&format!("/tasks/{id}"), &key).await;
            assert_eq!(t.status, 200, "{}", t.body);
            let st = t.body["status"].as_str().unwrap_or_default();
            if st == "completed" {
                break;
            }
            assert!(["queued", "processing"].contains(&st), "{}", t.body);
            assert!(
                Instant::now() < deadline,
                "task {id} not completed after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let account = s.get_as("/account", &key).await.body;
    assert_eq!(account["credits"], 0, "{account}");
    let list = s.get_as("/tasks?limit=100", &key).await.body;
    assert_eq!(
        list["data"].as_array().unwrap().len(),
        25,
        "tasks created: {list}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_deliveries_of_a_tasks_work_run_it_once_and_charge_it_once() {
    // A short lease so a duplicate that meets the running task comes back within seconds.
    let s = Server::start_with(|c| c.core.lease = Duration::from_secs(5), Hooks::default()).await;
    let start = s.credits().await;
    let task = s
        .submit(json!({"model": "echo", "prompt": "only once", "params": {"sleep_ms": 300}}))
        .await;
    let id = id(&task);
    let run = WorkMessage::Run {
        task_id: id.clone(),
    };
    for _ in 0..3 {
        s.app().queue.enqueue(&run, Duration::ZERO).await.unwrap();
    }
    let first = s.wait_terminal(&id, 60).await;
    assert_eq!(first["status"], "completed", "{first}");
    for _ in 0..3 {
        s.app().queue.enqueue(&run, Duration::ZERO).await.unwrap();
    }
    // Every duplicate has been handled (acknowledged): none is left in the queue.
    let after = s.wait_quiescent(&id, 60).await;
    assert_eq!(after["status"], "completed", "{after}");
    assert_eq!(
        after["started_at"], first["started_at"],
        "the task was started again"
    );
    assert_eq!(
        after["completed_at"], first["completed_at"],
        "the task was completed again"
    );
    assert_eq!(after["cost"], json!({"credits": 1, "refunded": false}));
    assert_eq!(s.credits().await, start - 1, "charged once");
    let stored = s.app().store.task(&id).await.unwrap().unwrap();
    assert_eq!(stored.attempts, 1, "the generator ran more than once");
    let url = after["result"]["outputs"][0]["url"].as_str().unwrap();
    assert_eq!(
        reqwest::get(url).await.unwrap().bytes().await.unwrap(),
        "only once"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submits_with_one_idempotency_key_create_one_task_and_charge_once() {
    let s = Server::start().await;
    let start = s.credits().await;
    let url = s.url("/tasks");
    let body = json!({"model": "veo3", "prompt": "the same request twenty times", "duration": 2});
    let submit = || {
        s.client
            .post(&url)
            .bearer_auth(&s.key)
            .header("Idempotency-Key", "race-key-1")
            .json(&body)
    };
    let answers = all_at_once(20, submit).await;
    let mut ids = BTreeSet::new();
    let mut in_progress = 0;
    for a in &answers {
        match a.status.as_u16() {
            200 | 202 => {
                ids.insert(id(&a.body));
            }
            409 => {
                a.assert_error(409, "idempotency_in_progress");
                in_progress += 1;
            }
            other => panic!("unexpected {other}: {}", a.body),
        }
    }
    println!(
        "{} answered the task, {in_progress} were told to retry",
        20 - in_progress
    );
    assert_eq!(ids.len(), 1, "tasks created: {ids:?}");
    let list = s.get("/tasks?limit=100").await.body;
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(s.credits().await, start - 20, "debited once");
    // Once the dust settles, a retry answers the same task and charges nothing.
    let again = answer(submit()).await;
    assert!(
        [200, 202].contains(&again.status.as_u16()),
        "{}",
        again.body
    );
    assert_eq!(Some(&id(&again.body)), ids.first());
    assert_eq!(s.credits().await, start - 20);
    s.stop().await;
}
