//! Races: concurrent requests and duplicate work never run a task twice, never refund twice,
//! never overspend credits and never create a task twice for one idempotency key.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Answer, Server, answer};
use serde_json::{Value, json};
use tasklane_core::ports::WorkMessage;
use tasklane_local::Hooks;
use tokio::task::JoinSet;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_racing_the_workers_pickup_is_won_by_exactly_one_side() {
    let s = Server::start().await;
    let start = s.credits().await;
    let (mut cancelled, mut completed) = (0u64, 0u64);
    for round in 0..30 {
        let task = s
            .submit(json!({"model": "echo", "prompt": format!("round {round}")}))
            .await;
        let path = format!("/tasks/{}", id(&task));
        // The cancel races the worker; a concurrent reader must never see the loser's outcome.
        let (cancel_path, empty) = (format!("{path}/cancel"), json!({}));
        let (cancel, seen) = tokio::join!(s.post(&cancel_path, &empty), s.get(&path));
        let seen = seen.body["status"].as_str().unwrap().to_string();
        let end = s.wait_terminal(&id(&task), 60).await;
        if cancel.status == 200 {
            assert_eq!(cancel.body["status"], "cancelled", "{}", cancel.body);
            assert_eq!(cancel.body["cost"]["refunded"], true);
            assert_eq!(end["status"], "cancelled", "cancel answered 200 but: {end}");
            assert_eq!(end["cost"]["refunded"], true);
            assert!(
                end["result"].is_null(),
                "a cancelled task has outputs: {end}"
            );
            assert!(
                ["queued", "cancelled"].contains(&seen.as_str()),
                "saw {seen} on a task the cancel won"
            );
            cancelled += 1;
        } else {
            cancel.assert_error(409, "not_cancellable");
            assert_eq!(end["status"], "completed", "cancel answered 409 but: {end}");
            assert_eq!(end["cost"]["refunded"], false);
            assert_ne!(seen, "cancelled", "saw cancelled on a task the worker won");
            completed += 1;
        }
    }
    println!("cancel won {cancelled} rounds, the worker won {completed} rounds");
    assert_eq!(
        s.credits().await,
        start - completed,
        "only completed tasks stay charged"
    );
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

/// Waits until every message of the server's work queue has been handled (acknowledged).
async fn wait_queue_drained(s: &Server, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !s.queue_is_empty().await {
        assert!(
            Instant::now() < deadline,
            "work queue not drained after {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    wait_queue_drained(&s, 60).await;

    let after = s.get(&format!("/tasks/{id}")).await.body;
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
