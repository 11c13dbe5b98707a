//! Submitting tasks over real HTTP: the async and sync endpoints, `Prefer: wait`,
//! idempotency keys, listing, failures, models, cancel and the demo outputs.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::DateTime;
use common::{Answer, Server};
use serde_json::{Value, json};
use tasklane_aws::dynamo::DynamoStore;
use tasklane_core::account::Account;
use tasklane_core::api::{LIST_READS_PER_TASK, list_read_budget};
use tasklane_core::ports::{ListQuery, PortResult, TaskStore};
use tasklane_core::task::{Task, TaskStatus};
use tasklane_local::Hooks;
use tasklane_testkit::TaskBuilder;
use tasklane_testkit::intercept::{Interceptor, Op};
use tokio::sync::watch;

const TERMINAL: [&str; 3] = ["completed", "failed", "cancelled"];

fn id_of(task: &Value) -> String {
    task["task_id"].as_str().expect("task_id").to_string()
}

/// The absolute URL of a path the API answered with (`Location`, `poll_url`: `/v1/...`).
fn absolute(s: &Server, path: &str) -> String {
    format!("{}{}", s.base.trim_end_matches("/v1"), path)
}

/// POST /v1/tasks with an `Idempotency-Key` and the given raw JSON body.
async fn submit_with_key(s: &Server, api_key: &str, idem: &str, raw_body: &str) -> Answer {
    s.send(
        s.client
            .post(s.url("/tasks"))
            .bearer_auth(api_key)
            .header("idempotency-key", idem)
            .header("content-type", "application/json")
            .body(raw_body.to_string()),
    )
    .await
}

async fn list_ids(s: &Server, query: &str) -> (Vec<String>, Value) {
    let a = s.get(&format!("/tasks{query}")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let ids = a.body["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(id_of)
        .collect();
    (ids, a.body["next_cursor"].clone())
}

async fn download(url: &str) -> (reqwest::StatusCode, Vec<u8>) {
    let resp = reqwest::get(url).await.expect("download");
    let status = resp.status();
    (status, resp.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn submit_answers_202_with_location_and_the_queued_task_that_get_returns_unchanged() {
    // No workers: the task stays queued, so the GET must return exactly what the POST did.
    let s = Server::start_with(|c| c.workers = 0, Hooks::default()).await;
    let a = s
        .post("/tasks", &json!({"model": "veo3", "prompt": "A cat walking on the beach", "metadata": {"order": "42", "user": "ada"}}))
        .await;
    assert_eq!(a.status, 202, "{}", a.body);
    let t = &a.body;
    let id = id_of(t);
    assert!(id.starts_with("task_"), "{id}");
    assert_eq!(
        a.header("location"),
        Some(format!("/v1/tasks/{id}").as_str())
    );
    let retry = a
        .header("retry-after")
        .expect("Retry-After on a queued task");
    assert!(
        retry.parse::<u64>().is_ok_and(|r| r >= 1),
        "Retry-After: {retry}"
    );

    assert_eq!(t["status"], "queued");
    assert_eq!(t["progress"], 0);
    assert_eq!(t["model"], "veo3");
    assert_eq!(t["action"], "generate", "action defaults to generate");
    assert_eq!(
        t["input"],
        json!({"prompt": "A cat walking on the beach", "duration": 5, "params": {}})
    );
    assert_eq!(
        t["cost"],
        json!({"credits": 50, "refunded": false}),
        "veo3 costs 10 credits per second of the default 5"
    );
    assert_eq!(t["metadata"], json!({"order": "42", "user": "ada"}));
    assert_eq!(t["result"], Value::Null);
    assert_eq!(t["error"], Value::Null);
    assert_eq!(t["callback"], Value::Null);
    assert_eq!(t["started_at"], Value::Null);
    assert_eq!(t["completed_at"], Value::Null);
    let created = t["created_at"].as_str().expect("created_at");
    assert!(
        DateTime::parse_from_rfc3339(created).is_ok(),
        "created_at {created} is not RFC 3339"
    );
    assert!(
        t.get("poll_url").is_none(),
        "an async submit has no poll_url: {t}"
    );

    let g = s
        .send(
            s.client
                .get(absolute(&s, a.header("location").unwrap()))
                .bearer_auth(&s.key),
        )
        .await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(&g.body, t, "GET at Location returns the submitted task");
    assert!(
        g.header("retry-after").is_some(),
        "Retry-After while the task is not terminal"
    );

    let c = s.post(&format!("/tasks/{id}/cancel"), &json!({})).await;
    assert_eq!(c.status, 200, "{}", c.body);
    let g = s.get(&format!("/tasks/{id}")).await;
    assert_eq!(g.body["status"], "cancelled");
    assert!(
        g.header("retry-after").is_none(),
        "no Retry-After on a terminal task"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_completed_task_is_answered_without_retry_after() {
    let s = Server::start().await;
    let t = s
        .submit(json!({"model": "echo", "prompt": "done soon"}))
        .await;
    let id = id_of(&t);
    let done = s.wait_terminal(&id, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    let g = s.get(&format!("/tasks/{id}")).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body["progress"], 100);
    assert!(
        g.header("retry-after").is_none(),
        "no Retry-After once completed"
    );
    s.stop().await;
}

#[tokio::test]
async fn sync_submit_of_a_fast_model_answers_200_with_the_result() {
    let s = Server::start().await;
    let a = s
        .post(
            "/tasks/sync",
            &json!({"model": "echo", "prompt": "hello, sync"}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["status"], "completed");
    assert_eq!(a.body["progress"], 100);
    assert!(
        a.body.get("poll_url").is_none(),
        "a finished sync answer has no poll_url: {}",
        a.body
    );
    assert!(a.header("location").is_none());
    assert!(a.header("retry-after").is_none());
    let outputs = a.body["result"]["outputs"]
        .as_array()
        .expect("result.outputs");
    assert_eq!(outputs.len(), 1);
    assert!(
        outputs[0]["content_type"]
            .as_str()
            .unwrap()
            .starts_with("text/plain"),
        "{}",
        outputs[0]
    );
    let (status, bytes) = download(outputs[0]["url"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(bytes, b"hello, sync");
    s.stop().await;
}

#[tokio::test]
async fn sync_submit_that_outlasts_its_timeout_answers_202_with_a_poll_url_and_completes_later() {
    let s = Server::start().await;
    let body = json!({"model": "veo3", "prompt": "a long walk", "duration": 20, "params": {"fps": 24}, "timeout": 0.2});
    let a = s.post("/tasks/sync", &body).await;
    assert_eq!(a.status, 202, "{}", a.body);
    let id = id_of(&a.body);
    let poll = format!("/v1/tasks/{id}");
    assert_eq!(a.body["poll_url"], poll.as_str());
    assert_eq!(a.header("location"), Some(poll.as_str()));
    assert!(a.header("retry-after").is_some());
    assert!(
        !TERMINAL.contains(&a.body["status"].as_str().unwrap()),
        "{}",
        a.body
    );
    assert_eq!(a.body["input"]["duration"], 20);
    assert_eq!(a.body["input"]["params"], json!({"fps": 24}));
    assert_eq!(a.body["cost"]["credits"], 200);

    let g = s
        .send(s.client.get(absolute(&s, &poll)).bearer_auth(&s.key))
        .await;
    assert_eq!(g.status, 200, "the poll_url answers the task: {}", g.body);
    let done = s.wait_terminal(&id, 120).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"]["outputs"][0]["content_type"], "image/gif");
    s.stop().await;
}

#[tokio::test]
async fn sync_timeout_above_the_cap_is_shortened_to_the_cap_not_refused() {
    let s = Server::start_with(
        |c| c.core.sync_wait_cap = Duration::from_secs(1),
        Hooks::default(),
    )
    .await;
    // Would the server wait the asked 100 s (or the 5 s the task takes), this client gives up
    // at 30 s, or the answer is 200; a capped wait answers 202 after about one second.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    // 1e30 s does not even fit a Duration: it must be shortened too, not crash the request.
    for timeout in [json!(100), json!(1e30)] {
        let body = json!({"model": "echo", "prompt": "slow", "params": {"sleep_ms": 5000}, "timeout": timeout});
        let resp = client
            .post(s.url("/tasks/sync"))
            .bearer_auth(&s.key)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "no answer within 30 s: a timeout of {timeout} s was not shortened to the 1 s cap ({e})"
                )
            });
        assert_eq!(resp.status(), 202, "answered before the 5 s task finished");
        let task: Value = resp.json().await.unwrap();
        let id = id_of(&task);
        assert_eq!(task["poll_url"], format!("/v1/tasks/{id}"));
        let done = s.wait_terminal(&id, 60).await;
        assert_eq!(done["status"], "completed", "{done}");
    }
    s.stop().await;
}

#[tokio::test]
async fn prefer_wait_on_submit_answers_200_with_the_finished_task_and_preference_applied() {
    let s = Server::start().await;
    let a = s
        .send(
            s.client
                .post(s.url("/tasks"))
                .bearer_auth(&s.key)
                .header("prefer", "wait=5")
                .json(&json!({"model": "echo", "prompt": "waited for"})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["status"], "completed");
    assert!(
        a.body["result"]["outputs"][0]["url"].is_string(),
        "{}",
        a.body
    );
    let applied = a
        .header("preference-applied")
        .expect("Preference-Applied header");
    assert!(applied.contains("wait=5"), "Preference-Applied: {applied}");
    s.stop().await;
}

#[tokio::test]
async fn the_same_idempotency_key_and_body_answer_the_original_task_and_debit_once() {
    let s = Server::start().await;
    let before = s.credits().await;
    let body = r#"{"model":"echo","prompt":"only once"}"#;
    let first = submit_with_key(&s, &s.key, "order-1", body).await;
    assert_eq!(first.status, 202, "{}", first.body);
    assert!(
        first.header("idempotent-replayed").is_none(),
        "the first answer is not a replay"
    );
    let second = submit_with_key(&s, &s.key, "order-1", body).await;
    assert_eq!(second.status, 202, "{}", second.body);
    assert_eq!(second.body["task_id"], first.body["task_id"]);
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    assert_eq!(s.credits().await, before - 1, "credits are debited once");
    let (ids, _) = list_ids(&s, "").await;
    assert_eq!(ids, vec![id_of(&first.body)], "one task exists");
    s.stop().await;
}

#[tokio::test]
async fn key_order_in_the_body_does_not_break_an_idempotent_replay() {
    let s = Server::start().await;
    let a = r#"{"model":"echo","prompt":"same","metadata":{"a":"1","b":"2"}}"#;
    let b = r#"{"metadata":{"b":"2","a":"1"},"prompt":"same","model":"echo"}"#;
    let first = submit_with_key(&s, &s.key, "k-order", a).await;
    assert_eq!(first.status, 202, "{}", first.body);
    let second = submit_with_key(&s, &s.key, "k-order", b).await;
    assert_eq!(
        second.status, 202,
        "the same body in another key order is the same request: {}",
        second.body
    );
    assert_eq!(second.body["task_id"], first.body["task_id"]);
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    s.stop().await;
}

#[tokio::test]
async fn the_same_idempotency_key_with_another_body_is_refused_with_422() {
    let s = Server::start().await;
    let before = s.credits().await;
    let first = submit_with_key(&s, &s.key, "k-reused", r#"{"model":"echo","prompt":"one"}"#).await;
    assert_eq!(first.status, 202, "{}", first.body);
    let other = submit_with_key(&s, &s.key, "k-reused", r#"{"model":"echo","prompt":"two"}"#).await;
    other.assert_error(422, "idempotency_key_reused");
    assert_eq!(
        s.credits().await,
        before - 1,
        "the refused request debited nothing"
    );
    let (ids, _) = list_ids(&s, "").await;
    assert_eq!(ids.len(), 1, "the refused request created nothing");
    s.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_used_by_another_account_is_independent() {
    let s = Server::start().await;
    let other = s.new_account(100).await;
    let body = r#"{"model":"echo","prompt":"shared key"}"#;
    let mine = submit_with_key(&s, &s.key, "k-shared", body).await;
    assert_eq!(mine.status, 202, "{}", mine.body);
    let theirs = submit_with_key(&s, &other, "k-shared", body).await;
    assert_eq!(theirs.status, 202, "{}", theirs.body);
    assert_ne!(
        theirs.body["task_id"], mine.body["task_id"],
        "another account gets its own task"
    );
    assert!(theirs.header("idempotent-replayed").is_none());
    let theirs_again = submit_with_key(&s, &other, "k-shared", body).await;
    assert_eq!(theirs_again.body["task_id"], theirs.body["task_id"]);
    assert_eq!(theirs_again.header("idempotent-replayed"), Some("true"));
    let a = s.get_as("/account", &other).await;
    assert_eq!(
        a.body["credits"], 99,
        "the other account paid for its own task once"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_key_whose_first_request_lacked_credits_is_released_for_a_retry() {
    let s = Server::start().await;
    let poor = s.new_account(0).await;
    let body = r#"{"model":"echo","prompt":"pay later"}"#;
    let refused = submit_with_key(&s, &poor, "k-402", body).await;
    refused.assert_error(402, "insufficient_quota");
    let account = s.get_as("/account", &poor).await;
    let account_id = account.body["account_id"].as_str().unwrap().to_string();
    s.app().store.grant_credits(&account_id, 10).await.unwrap();
    let retried = submit_with_key(&s, &poor, "k-402", body).await;
    assert_eq!(
        retried.status, 202,
        "the key was released after the 402: {}",
        retried.body
    );
    assert!(retried.header("idempotent-replayed").is_none());
    assert_eq!(s.get_as("/account", &poor).await.body["credits"], 9);
    s.stop().await;
}

/// Holds every `insert_task` until the test opens a gate, so a submit can be kept in flight
/// for as long as the test needs.
struct SlowInsert {
    entered: watch::Sender<u32>,
    gate: watch::Receiver<bool>,
}

#[async_trait]
impl Interceptor for SlowInsert {
    async fn before(&self, op: Op) -> PortResult<()> {
        if op == Op::InsertTask {
            self.entered.send_modify(|n| *n += 1);
            let mut gate = self.gate.clone();
            // Held until the test opens the gate (at most 30 s, so a broken test cannot hang).
            let _ =
                tokio::time::timeout(Duration::from_secs(30), gate.wait_for(|open| *open)).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_key_still_in_flight_answers_409_and_afterwards_the_original_task() {
    let (entered_tx, mut entered_rx) = watch::channel(0u32);
    let (gate_tx, gate_rx) = watch::channel(false);
    let hooks = tasklane_testkit::intercept::hooks(Arc::new(SlowInsert {
        entered: entered_tx,
        gate: gate_rx,
    }));
    let s = Server::start_with(|_| {}, hooks).await;
    let body = r#"{"model":"echo","prompt":"in flight"}"#;
    let req = s
        .client
        .post(s.url("/tasks"))
        .bearer_auth(&s.key)
        .header("idempotency-key", "k-flight")
        .header("content-type", "application/json")
        .body(body);
    let first = tokio::spawn(async move {
        let r = req.send().await.expect("first request sent");
        (r.status(), r.json::<Value>().await.unwrap())
    });
    tokio::time::timeout(Duration::from_secs(30), entered_rx.wait_for(|n| *n >= 1))
        .await
        .expect("the first request reaches the store")
        .unwrap();

    let second = submit_with_key(&s, &s.key, "k-flight", body).await;
    second.assert_error(409, "idempotency_in_progress");

    gate_tx.send(true).unwrap();
    let (status, original) = first.await.unwrap();
    assert_eq!(status, 202, "{original}");
    let third = submit_with_key(&s, &s.key, "k-flight", body).await;
    assert_eq!(third.status, 202, "{}", third.body);
    assert_eq!(third.body["task_id"], original["task_id"]);
    assert_eq!(third.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        *entered_rx.borrow(),
        1,
        "only the first request created a task"
    );
    s.stop().await;
}

#[tokio::test]
async fn lists_page_newest_first_filter_and_show_only_the_callers_tasks() {
    // No workers at first, so some tasks can be cancelled while queued; the rest complete
    // once workers come up.
    let s = Server::start_with(|c| c.workers = 0, Hooks::default()).await;
    let other = s.new_account(100).await;
    let mut theirs = Vec::new();
    for i in 0..2 {
        let a = s
            .post_as(
                "/tasks",
                &json!({"model": "echo", "prompt": format!("theirs {i}")}),
                &other,
            )
            .await;
        assert_eq!(a.status, 202, "{}", a.body);
        theirs.push(id_of(&a.body));
    }
    let mut submitted = Vec::new();
    let mut echo = Vec::new();
    let mut cancelled = Vec::new();
    for i in 0..25 {
        let model = if i % 5 == 4 { "demo-image" } else { "echo" };
        let t = s
            .submit(json!({"model": model, "prompt": format!("task {i}")}))
            .await;
        let id = id_of(&t);
        if model == "echo" {
            echo.push(id.clone());
        }
        if i % 5 == 0 {
            let c = s.post(&format!("/tasks/{id}/cancel"), &json!({})).await;
            assert_eq!(c.status, 200, "{}", c.body);
            cancelled.push(id.clone());
        }
        submitted.push(id);
    }
    let s = s.restart(|c| c.workers = 2).await;
    for id in &submitted {
        s.wait_terminal(id, 60).await;
    }
    let newest_first = |ids: &[String]| ids.iter().rev().cloned().collect::<Vec<_>>();

    // Pages of 10 cover every task exactly once, newest first.
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            None => "?limit=10".to_string(),
            Some(c) => format!("?limit=10&cursor={c}"),
        };
        let (ids, next) = list_ids(&s, &q).await;
        sizes.push(ids.len());
        seen.extend(ids);
        match next {
            Value::Null => break,
            Value::String(c) => cursor = Some(c),
            other => panic!("next_cursor is {other}"),
        }
        assert!(sizes.len() < 10, "pagination does not end");
    }
    assert_eq!(sizes, vec![10, 10, 5]);
    assert_eq!(seen, newest_first(&submitted));
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        25,
        "no task twice"
    );

    let (ids, next) = list_ids(&s, "?status=cancelled").await;
    assert_eq!(ids, newest_first(&cancelled));
    assert_eq!(next, Value::Null);
    let completed: Vec<String> = submitted
        .iter()
        .filter(|id| !cancelled.contains(id))
        .cloned()
        .collect();
    let (ids, _) = list_ids(&s, "?status=completed&limit=100").await;
    assert_eq!(ids, newest_first(&completed));
    let (ids, _) = list_ids(&s, "?model=echo&limit=100").await;
    assert_eq!(ids, newest_first(&echo));
    let a = s.get("/tasks?model=echo&status=cancelled").await;
    for t in a.body["data"].as_array().unwrap() {
        assert_eq!(
            (t["model"].as_str(), t["status"].as_str()),
            (Some("echo"), Some("cancelled"))
        );
    }

    let (ids, next) = list_ids(&s, "").await;
    assert_eq!(
        ids,
        newest_first(&submitted)[..20].to_vec(),
        "the default page is the newest 20"
    );
    assert!(next.is_string(), "more tasks follow the default page");

    let (all, _) = list_ids(&s, "?limit=100").await;
    assert!(
        theirs.iter().all(|id| !all.contains(id)),
        "another account's tasks never appear"
    );
    let a = s.get_as("/tasks", &other).await;
    let their_list: Vec<String> = a.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(
        their_list,
        newest_first(&theirs),
        "each account lists only its own tasks"
    );
    s.stop().await;
}

/// A history of `finished` completed `echo` tasks of `account`, stored directly (no runs, no
/// credits), after one queued task that is older than all of them. Returns the queued task.
async fn queued_task_behind_a_long_history(
    store: &dyn TaskStore,
    account: &str,
    finished: usize,
) -> Task {
    let queued = TaskBuilder::echo(account).credits(0).build();
    store.insert_task(&queued, None, u64::MAX).await.unwrap();
    for _ in 0..finished {
        let done = TaskBuilder::echo(account)
            .credits(0)
            .status(TaskStatus::Completed)
            .attempts(1)
            .completed_at(chrono::Utc::now())
            .waiting_since(None)
            .build();
        store.insert_task(&done, None, u64::MAX).await.unwrap();
    }
    queued
}

#[tokio::test]
async fn a_filtered_list_reads_a_bounded_slice_of_a_long_history_and_its_cursors_reach_the_match() {
    const FINISHED: usize = 120;
    let s = Server::start_with(|c| c.workers = 0, Hooks::default()).await;
    let account = s.running.as_ref().unwrap().dev_account_id.clone();
    let queued =
        queued_task_behind_a_long_history(s.app().store.as_ref(), &account, FINISHED).await;

    // A page of 5 reads at most 50 tasks: the first pages hold no task but a cursor, and
    // following the cursors reaches the queued task at the end of the history.
    let budget = list_read_budget(&ListQuery {
        status: Some(TaskStatus::Queued),
        limit: 5,
        ..ListQuery::default()
    });
    assert_eq!(budget, 5 * LIST_READS_PER_TASK);
    let mut pages = Vec::new();
    let mut cursor = String::new();
    loop {
        let (ids, next) = list_ids(&s, &format!("?status=queued&limit=5&cursor={cursor}")).await;
        pages.push(ids);
        match next {
            Value::String(c) => cursor = c,
            Value::Null => break,
            other => panic!("next_cursor is {other}"),
        }
        assert!(pages.len() <= FINISHED, "the cursors do not end: {pages:?}");
    }
    let expected_pages = (FINISHED + 1).div_ceil(budget);
    assert_eq!(
        pages.len(),
        expected_pages,
        "one page per {budget} tasks read: {pages:?}"
    );
    assert!(
        pages[..expected_pages - 1].iter().all(Vec::is_empty),
        "only finished tasks before the last page: {pages:?}"
    );
    assert_eq!(pages[expected_pages - 1], vec![queued.id.clone()]);
    // Unfiltered pages are full, as before.
    let (ids, next) = list_ids(&s, "?limit=5").await;
    assert_eq!(ids.len(), 5);
    assert!(next.is_string());
    s.stop().await;

    if common::on_aws() {
        dynamodb_reads_at_most_the_budget_per_list_request(FINISHED).await;
    }
}

/// On DynamoDB: the items each list request read (`ScannedCount` of its Query pages, counted
/// by an SDK interceptor) stay within [`list_read_budget`].
async fn dynamodb_reads_at_most_the_budget_per_list_request(finished: usize) {
    use aws_sdk_dynamodb::config::interceptors::AfterDeserializationInterceptorContextRef;
    use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
    use aws_sdk_dynamodb::operation::query::QueryOutput;

    #[derive(Debug, Clone, Default)]
    struct Scanned(Arc<std::sync::Mutex<Vec<i32>>>);
    impl Intercept for Scanned {
        fn name(&self) -> &'static str {
            "Scanned"
        }
        fn read_after_deserialization(
            &self,
            context: &AfterDeserializationInterceptorContextRef<'_>,
            _: &RuntimeComponents,
            _: &mut ConfigBag,
        ) -> Result<(), aws_sdk_dynamodb::error::BoxError> {
            if let Ok(out) = context.output_or_error()
                && let Some(q) = out.downcast_ref::<QueryOutput>()
            {
                self.0.lock().unwrap().push(q.scanned_count());
            }
            Ok(())
        }
    }
    impl Scanned {
        fn take(&self) -> Vec<i32> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let prefix = format!("tlist{}", std::process::id());
    let settings = tasklane_testkit::provision::provision(&config, &prefix)
        .await
        .expect("provisioning on the AWS emulator");
    let scanned = Scanned::default();
    let ddb = aws_sdk_dynamodb::config::Builder::from(&config)
        .interceptor(scanned.clone())
        .build();
    let store = DynamoStore::new(aws_sdk_dynamodb::Client::from_conf(ddb), &settings.table);
    let account = Account::create(0, None).account;
    store.create_account(&account).await.unwrap();
    let queued = queued_task_behind_a_long_history(&store, &account.id, finished).await;
    scanned.take();

    let query = ListQuery {
        status: Some(TaskStatus::Queued),
        limit: 5,
        ..ListQuery::default()
    };
    let budget = list_read_budget(&query);
    let mut found = Vec::new();
    let mut q = query.clone();
    let mut requests = 0;
    loop {
        let page = store.list_tasks(&account.id, &q).await.unwrap();
        requests += 1;
        let read: i32 = scanned.take().iter().sum();
        assert!(
            usize::try_from(read).unwrap() <= budget,
            "one list request read {read} items (at most {budget})"
        );
        found.extend(page.tasks.into_iter().map(|t| t.id));
        match page.next_before {
            Some(b) => q.before = Some(b),
            None => break,
        }
        assert!(requests <= finished, "the cursors do not end");
    }
    assert_eq!(found, vec![queued.id]);
    assert_eq!(requests, (finished + 1).div_ceil(budget));

    // Without a filter a page reads the page and one more item.
    store
        .list_tasks(
            &account.id,
            &ListQuery {
                limit: 5,
                ..ListQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(scanned.take().iter().sum::<i32>(), 6);
}

#[tokio::test]
async fn a_failed_generation_reports_its_error_and_refunds_the_credits() {
    let s = Server::start().await;
    let before = s.credits().await;
    let t = s
        .submit(json!({"model": "echo", "prompt": "x", "params": {"fail": "the model refused the prompt"}}))
        .await;
    assert_eq!(
        t["cost"],
        json!({"credits": 1, "refunded": false}),
        "debited at submit"
    );
    let done = s.wait_terminal(&id_of(&t), 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "generation_failed");
    assert_eq!(done["error"]["message"], "the model refused the prompt");
    assert_eq!(done["result"], Value::Null);
    assert_eq!(done["cost"], json!({"credits": 1, "refunded": true}));
    assert_eq!(s.credits().await, before, "the credits came back");
    s.stop().await;
}

#[tokio::test]
async fn models_lists_every_model_with_its_pricing() {
    let s = Server::start().await;
    let a = s.get("/models").await;
    assert_eq!(a.status, 200, "{}", a.body);
    let models = a.body["data"].as_array().expect("data");
    let find = |id: &str| {
        models
            .iter()
            .find(|m| m["id"] == id)
            .unwrap_or_else(|| panic!("model {id} missing from {}", a.body))
    };
    assert_eq!(find("veo3")["pricing"], json!({"credits_per_second": 10}));
    assert_eq!(
        find("demo-image")["pricing"],
        json!({"credits_per_task": 5})
    );
    assert_eq!(find("echo")["pricing"], json!({"credits_per_task": 1}));
    assert_eq!(
        find("veo3")["duration"],
        json!({"min": 1, "max": 20, "default": 5})
    );
    s.stop().await;
}

#[tokio::test]
async fn demo_image_renders_a_png_of_the_requested_size_that_downloads() {
    let s = Server::start().await;
    let t = s
        .submit(json!({"model": "demo-image", "prompt": "a red square", "params": {"width": 40, "height": 30}}))
        .await;
    assert_eq!(t["cost"]["credits"], 5);
    let done = s.wait_terminal(&id_of(&t), 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    let out = &done["result"]["outputs"][0];
    assert_eq!(out["content_type"], "image/png");
    let (status, png) = download(out["url"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(png.len() as u64, out["size_bytes"].as_u64().unwrap());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&png[12..16], b"IHDR");
    assert_eq!(
        u32::from_be_bytes(png[16..20].try_into().unwrap()),
        40,
        "width"
    );
    assert_eq!(
        u32::from_be_bytes(png[20..24].try_into().unwrap()),
        30,
        "height"
    );
    s.stop().await;
}

#[tokio::test]
async fn cancelling_a_queued_task_refunds_once_and_cancelling_again_changes_nothing() {
    let s = Server::start_with(|c| c.workers = 0, Hooks::default()).await;
    let before = s.credits().await;
    let t = s
        .submit(json!({"model": "veo3", "prompt": "never mind", "duration": 3}))
        .await;
    let id = id_of(&t);
    assert_eq!(s.credits().await, before - 30);

    let c = s.post(&format!("/tasks/{id}/cancel"), &json!({})).await;
    assert_eq!(c.status, 200, "{}", c.body);
    assert_eq!(c.body["status"], "cancelled");
    assert_eq!(c.body["cost"], json!({"credits": 30, "refunded": true}));
    assert_eq!(s.credits().await, before, "credits refunded");

    let again = s.post(&format!("/tasks/{id}/cancel"), &json!({})).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.body["status"], "cancelled");
    assert_eq!(again.body["cost"]["refunded"], true);
    assert_eq!(s.credits().await, before, "no second refund");
    assert_eq!(
        s.get(&format!("/tasks/{id}")).await.body["status"],
        "cancelled"
    );
    s.stop().await;
}

#[tokio::test]
async fn whole_numbers_written_with_a_fraction_are_integers_as_json_schema_says() {
    // openapi.yaml: `5`, `5.0` and `5e0` are the same integer (JSON Schema's `integer`).
    let s = Server::start_with(|c| c.workers = 0, Hooks::default()).await;
    let credits = s.credits().await;
    let video = s
        .submit(json!({"model": "veo3", "prompt": "a cat", "duration": 17.0, "params": {"fps": 2.0, "seed": 35_912_214.0}}))
        .await;
    // Stored and shown as integers, priced by the whole number.
    assert_eq!(video["input"]["duration"], json!(17), "{video}");
    assert!(video["input"]["duration"].is_u64(), "{video}");
    assert_eq!(
        video["input"]["params"],
        json!({"fps": 2, "seed": 35_912_214})
    );
    assert_eq!(video["cost"]["credits"], 170);
    let image = s
        .submit(json!({"model": "demo-image", "prompt": "a dog", "params": {"width": 260.0, "height": 1.6e1}}))
        .await;
    assert_eq!(
        image["input"]["params"],
        json!({"width": 260, "height": 16})
    );
    let echo = s
        .submit(json!({"model": "echo", "params": {"sleep_ms": 0.0}}))
        .await;
    assert_eq!(echo["input"]["params"], json!({"sleep_ms": 0}));
    assert_eq!(s.credits().await, credits - 170 - 5 - 1);
    // The same number written either way is the same body for an idempotent replay.
    let first = submit_with_key(
        &s,
        &s.key,
        "whole-numbers",
        r#"{"model":"veo3","prompt":"x","duration":5}"#,
    )
    .await;
    assert_eq!(first.status, 202, "{}", first.body);
    let again = submit_with_key(
        &s,
        &s.key,
        "whole-numbers",
        r#"{"model":"veo3","prompt":"x","duration":5.0}"#,
    )
    .await;
    assert_eq!(again.status, 202, "{}", again.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(id_of(&again.body), id_of(&first.body));
    s.stop().await;
}

#[tokio::test]
async fn an_empty_cursor_is_the_first_page_and_limit_may_have_a_zero_fraction() {
    let s = Server::start_with(|c| c.workers = 0, Hooks::default()).await;
    let mut submitted = Vec::new();
    for i in 0..3 {
        let t = s
            .submit(json!({"model": "echo", "prompt": format!("task {i}")}))
            .await;
        submitted.push(id_of(&t));
    }
    submitted.reverse();
    let (all, next) = list_ids(&s, "?cursor=").await;
    assert_eq!(all, submitted);
    assert_eq!(next, Value::Null);
    // `cursor=` with a page size: the first page, then the real cursor goes on.
    let (first, next) = list_ids(&s, "?limit=2.0&cursor=").await;
    assert_eq!(first, submitted[..2]);
    let Value::String(cursor) = next else {
        panic!("no next_cursor after a full page: {next}")
    };
    // The cursor the API hands out has the documented shape: 42 URL-safe base64 characters.
    assert_eq!(cursor.len(), 42, "{cursor}");
    assert!(
        cursor
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{cursor}"
    );
    let (rest, next) = list_ids(&s, &format!("?limit=2.00&cursor={cursor}")).await;
    assert_eq!(rest, submitted[2..]);
    assert_eq!(next, Value::Null);
    s.stop().await;
}

#[tokio::test]
async fn the_model_filter_is_1_to_64_characters_not_bytes() {
    // openapi.yaml's `maxLength: 64` counts characters: 64 two-byte characters are a filter
    // (matching nothing), 65 are 400.
    let s = Server::start_with(|c| c.workers = 0, Hooks::default()).await;
    s.submit(json!({"model": "echo"})).await;
    let (ids, next) = list_ids(&s, &format!("?model={}", "%C3%A9".repeat(64))).await;
    assert!(ids.is_empty(), "{ids:?}");
    assert_eq!(next, Value::Null);
    let a = s
        .get(&format!("/tasks?model={}", "%C3%A9".repeat(65)))
        .await;
    let e = a.assert_error(400, "invalid_request");
    assert_eq!(e["param"], "model", "{}", a.body);
    let (ids, _) = list_ids(&s, "?model=echo").await;
    assert_eq!(ids.len(), 1);
    s.stop().await;
}

/// A catalog of two demo-provider models whose names, prices, params and duration differ from
/// the built-in ones.
const CATALOG: &str = r#"
[models.clip-pro]
provider = "demo"
demo = "video"
description = "A short clip, from the catalog"
prompt = { required = true, max_length = 100 }
duration = { min = 2, max = 4, default = 3 }
price = { per_second = 3 }
timeout = 120

[models.clip-pro.params.fps]
type = "integer"
min = 1
max = 4
description = "frames per second"

[models.note]
provider = "demo"
demo = "echo"
description = "Writes the prompt down"
actions = ["generate", "summarize"]
price = { per_task = 7 }

[models.note.params.fail]
type = "string"
max_length = 50
description = "fail with this message"
"#;

#[tokio::test]
async fn a_catalog_file_replaces_the_models_and_submit_validates_charges_and_runs_by_it() {
    let catalog_dir = tempfile::tempdir().unwrap();
    let catalog = catalog_dir.path().join("models.toml");
    std::fs::write(&catalog, CATALOG).unwrap();
    let s = Server::start_with(|c| c.models = Some(catalog.clone()), Hooks::default()).await;

    // GET /v1/models lists exactly the catalog's models, with the catalog's values.
    let a = s.get("/models").await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.body["data"],
        json!([
            {
                "id": "clip-pro",
                "description": "A short clip, from the catalog",
                "actions": ["generate"],
                "prompt": {"required": true, "max_length": 100},
                "duration": {"min": 2, "max": 4, "default": 3},
                "params": {"fps": {"type": "integer", "minimum": 1, "maximum": 4, "description": "frames per second"}},
                "pricing": {"credits_per_second": 3},
                "provider": "demo",
                "timeout": 120,
            },
            {
                "id": "note",
                "description": "Writes the prompt down",
                "actions": ["generate", "summarize"],
                "prompt": {"required": false, "max_length": 2000},
                "duration": null,
                "params": {"fail": {"type": "string", "max_length": 50, "description": "fail with this message"}},
                "pricing": {"credits_per_task": 7},
                "provider": "demo",
                "timeout": 600,
            },
        ])
    );

    // Submit checks requests against the catalog, not the built-in models.
    let before = s.credits().await;
    for (body, param) in [
        (json!({"model": "veo3", "prompt": "a cat"}), "model"),
        (
            json!({"model": "clip-pro", "prompt": "a cat", "params": {"x": 1}}),
            "params.x",
        ),
        (
            json!({"model": "clip-pro", "prompt": "a cat", "params": {"fps": 8}}),
            "params.fps",
        ),
        (
            json!({"model": "clip-pro", "prompt": "a cat", "duration": 5}),
            "duration",
        ),
        (
            json!({"model": "clip-pro", "prompt": "a cat", "duration": 1}),
            "duration",
        ),
        (json!({"model": "clip-pro"}), "prompt"),
        (
            json!({"model": "clip-pro", "prompt": "x".repeat(101)}),
            "prompt",
        ),
        (
            json!({"model": "note", "prompt": "hi", "duration": 3}),
            "duration",
        ),
        (json!({"model": "note", "action": "extend"}), "action"),
    ] {
        let a = s.post("/tasks", &body).await;
        let e = a.assert_error(400, "invalid_request");
        assert_eq!(e["param"], param, "{body}: {}", a.body);
    }
    assert_eq!(s.credits().await, before, "refused submits cost nothing");

    // Accepted ones cost the catalog's price and run on the demo generator it names.
    let clip = s
        .submit(
            json!({"model": "clip-pro", "prompt": "a cat", "duration": 4, "params": {"fps": 2}}),
        )
        .await;
    assert_eq!(clip["cost"], json!({"credits": 12, "refunded": false}));
    let note = s
        .submit(json!({"model": "note", "action": "summarize", "prompt": "hello catalog"}))
        .await;
    assert_eq!(note["cost"], json!({"credits": 7, "refunded": false}));
    let defaulted = s
        .submit(json!({"model": "clip-pro", "prompt": "a dog"}))
        .await;
    assert_eq!(
        defaulted["input"]["duration"], 3,
        "the catalog's default duration"
    );
    assert_eq!(defaulted["cost"]["credits"], 9);
    assert_eq!(s.credits().await, before - 12 - 7 - 9);

    let done = s.wait_terminal(&id_of(&clip), 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    let (status, gif) = download(done["result"]["outputs"][0]["url"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    assert!(gif.starts_with(b"GIF89a"), "a GIF");
    let done = s.wait_terminal(&id_of(&note), 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["action"], "summarize");
    let (status, text) = download(done["result"]["outputs"][0]["url"].as_str().unwrap()).await;
    assert_eq!(
        (status.as_u16(), text.as_slice()),
        (200, &b"hello catalog"[..])
    );
    let done = s.wait_terminal(&id_of(&defaulted), 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(s.credits().await, before - 12 - 7 - 9, "nothing refunded");
    s.stop().await;
}

#[tokio::test]
async fn a_bad_catalog_stops_the_tasklane_binary_with_the_model_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("models.toml");
    let bad = CATALOG.replace(
        "price = { per_second = 3 }",
        "price = { per_second = 3, per_task = 5 }",
    );
    std::fs::write(&catalog, bad).unwrap();
    let data_dir = dir.path().join("data");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tasklane"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TASKLANE_") {
            cmd.env_remove(k);
        }
    }
    // With backtraces asked for, a startup error must still be one message, not a backtrace.
    cmd.env("TASKLANE_ADDR", "127.0.0.1:0")
        .env("TASKLANE_DATA_DIR", &data_dir)
        .env("TASKLANE_MODELS", &catalog)
        .env("RUST_BACKTRACE", "1")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("tasklane exits instead of serving")
        .expect("the tasklane binary runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let shown = format!(
        "status {}\n--- stdout\n{stdout}--- stderr\n{stderr}",
        out.status
    );
    assert!(!out.status.success(), "{shown}");
    assert!(
        stderr.contains(
            "model \"clip-pro\": field \"price\": give exactly one of per_second or per_task"
        ),
        "{shown}"
    );
    assert!(stderr.contains("TASKLANE_MODELS"), "{shown}");
    assert!(
        !stderr.contains("panicked") && !stderr.to_lowercase().contains("backtrace"),
        "{shown}"
    );
    assert!(!stdout.contains("listening"), "{shown}");
}
