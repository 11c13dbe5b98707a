//! Every error of `openapi.yaml` over real HTTP: the right status and code, the error shape
//! `{"error": {"code", "message", "param"?}}` with `Content-Type: application/json`, and a 4xx
//! (never a 5xx or a hang) for every kind of bad input.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{Answer, Server};
use reqwest::Method;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value, json};
use tasklane_core::ports::{PortError, PortResult};
use tasklane_local::Hooks;
use tasklane_testkit::intercept::{Interceptor, Op};
use tokio::sync::{Notify, Semaphore};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A server whose workers never run, so submitted tasks stay `queued`.
async fn start_without_workers() -> Server {
    Server::start_with(|cfg| cfg.workers = 0, Hooks::default()).await
}

/// `http://127.0.0.1:PORT`, for paths outside `/v1`.
fn root(s: &Server) -> String {
    s.base.trim_end_matches("/v1").to_string()
}

/// Sends `method path` (relative to `/v1`) with the development key and no body.
async fn call(s: &Server, method: Method, path: &str) -> Answer {
    s.send(s.client.request(method, s.url(path)).bearer_auth(&s.key))
        .await
}

/// POSTs raw `body` with the development key and the given `Content-Type` (none when `None`).
async fn post_raw(
    s: &Server,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> Answer {
    let mut req = s.client.post(s.url(path)).bearer_auth(&s.key).body(body);
    if let Some(ct) = content_type {
        req = req.header(CONTENT_TYPE, ct);
    }
    s.send(req).await
}

/// POSTs JSON `body` with the development key and one extra header.
async fn post_with_header(s: &Server, path: &str, body: &Value, name: &str, value: &str) -> Answer {
    let req = s
        .client
        .post(s.url(path))
        .bearer_auth(&s.key)
        .header(name, value)
        .json(body);
    s.send(req).await
}

/// Asserts a `400 invalid_request` naming `param`.
fn assert_invalid(a: &Answer, param: &str) {
    let e = a.assert_error(400, "invalid_request");
    assert_eq!(e["param"], param, "wrong param; body: {}", a.body);
}

/// Asserts a `400 invalid_request` about the body as a whole (no single field at fault).
fn assert_invalid_body(a: &Answer) {
    let e = a.assert_error(400, "invalid_request");
    assert!(
        e.get("param").is_none_or(Value::is_null),
        "unexpected param: {}",
        a.body
    );
}

/// The machine code `openapi.yaml` gives each status this file expects.
fn code_for(status: u16) -> &'static str {
    match status {
        400 => "invalid_request",
        401 => "unauthorized",
        402 => "insufficient_quota",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        422 => "idempotency_key_reused",
        _ => panic!("no code expected for {status}"),
    }
}

async fn credits_of(s: &Server, key: &str) -> u64 {
    let a = s.get_as("/account", key).await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.body["credits"].as_u64().unwrap()
}

/// The tasks the account with `key` can list.
async fn tasks_of(s: &Server, key: &str) -> Vec<Value> {
    let a = s.get_as("/tasks?limit=100", key).await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.body["data"].as_array().unwrap().clone()
}

/// Asserts the development account still has `credits` and no task at all.
async fn assert_nothing_created(s: &Server, credits: u64) {
    assert_eq!(s.credits().await, credits, "credits changed");
    let tasks = tasks_of(s, &s.key).await;
    assert!(tasks.is_empty(), "tasks were created: {tasks:?}");
}

fn id_of(task: &Value) -> String {
    task["task_id"].as_str().expect("task_id").to_string()
}

/// A well-formed task id nobody has: `id` with its last characters changed.
fn unknown_id_like(id: &str) -> String {
    let tail = if id.ends_with("ZZZZ") { "0000" } else { "ZZZZ" };
    format!("{}{tail}", &id[..id.len() - 4])
}

/// The signed URL of a completed task's first output.
fn output_url(task: &Value) -> String {
    task["result"]["outputs"][0]["url"]
        .as_str()
        .unwrap_or_else(|| panic!("no output url: {task}"))
        .to_string()
}

/// GETs `url` without credentials; returns the answer and the raw body.
async fn fetch(s: &Server, url: &str) -> (Answer, Vec<u8>) {
    let resp = s.client.get(url).send().await.expect("request sent");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap().to_vec();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (
        Answer {
            status,
            headers,
            body,
        },
        bytes,
    )
}

/// Polls `check` every 250 ms until it returns `Some`, for at most `secs` seconds.
async fn poll<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One fault injected before the real adapters' calls.
enum Fault {
    /// Every enqueue fails: the work queue is down.
    QueueDown,
    /// Every API-key lookup fails with an internal error that names a secret path.
    KeyLookupFails,
    /// `insert_task` signals `entered`, then waits until `open` has a permit.
    InsertWaits {
        entered: Arc<Notify>,
        open: Arc<Semaphore>,
    },
}

#[async_trait]
impl Interceptor for Fault {
    async fn before(&self, op: Op) -> PortResult<()> {
        match (self, op) {
            (Fault::QueueDown, Op::Enqueue) => Err(PortError::unavailable("down")),
            (Fault::KeyLookupFails, Op::AccountByKeyHash) => {
                Err(PortError::internal("secret path /var/db is locked"))
            }
            (Fault::InsertWaits { entered, open }, Op::InsertTask) => {
                entered.notify_one();
                drop(open.acquire().await);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

fn store_fault(fault: Fault) -> Hooks {
    tasklane_testkit::intercept::hooks(Arc::new(fault))
}

// ---------------------------------------------------------------------------------------------
// 401 unauthorized
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_missing_or_bad_key_is_401_on_every_endpoint() {
    let s = start_without_workers().await;
    let task = s.submit(json!({"model": "echo", "prompt": "mine"})).await;
    let id = id_of(&task);
    let credits = s.credits().await;
    let body = json!({"model": "echo", "prompt": "x"});
    let endpoints = [
        (Method::GET, "/tasks".to_string(), false),
        (Method::POST, "/tasks".to_string(), true),
        (Method::POST, "/tasks/sync".to_string(), true),
        (Method::GET, format!("/tasks/{id}"), false),
        (Method::POST, format!("/tasks/{id}/cancel"), false),
        (Method::GET, "/account".to_string(), false),
        (Method::GET, "/models".to_string(), false),
    ];
    let bad_auth = [
        None,
        Some("Basic dXNlcjpwYXNzd29yZA==".to_string()),
        Some(format!("Basic {}", s.key)),
        Some(s.key.clone()),
        Some("Bearer ".to_string()),
        Some("Bearer".to_string()),
        Some("Bearer tl_this_key_does_not_exist_0123456789abcdefghijk".to_string()),
    ];
    for (method, path, with_body) in &endpoints {
        for auth in &bad_auth {
            let mut req = s.client.request(method.clone(), s.url(path));
            if let Some(auth) = auth {
                req = req.header(AUTHORIZATION, auth);
            }
            if *with_body {
                req = req.json(&body);
            }
            let a = s.send(req).await;
            assert_eq!(a.status, 401, "{method} {path} with {auth:?}: {}", a.body);
            a.assert_error(401, "unauthorized");
        }
    }
    // Nothing was created, read or cancelled on the caller's behalf.
    assert_eq!(s.credits().await, credits);
    assert_eq!(tasks_of(&s, &s.key).await.len(), 1);
    let t = s.get(&format!("/tasks/{id}")).await;
    assert_eq!(t.body["status"], "queued", "{}", t.body);
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 400 invalid_request
// ---------------------------------------------------------------------------------------------

/// Submit bodies that are each wrong in one field, with the `param` the answer must name.
fn invalid_submissions() -> Vec<(&'static str, Value, String)> {
    let veo = |extra: Value| {
        let mut body = json!({"model": "veo3", "prompt": "a cat on the beach"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let seventeen: Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    let mut cases: Vec<(&str, Value, String)> = [
        ("model missing", json!({"prompt": "a cat"}), "model"),
        (
            "model unknown",
            json!({"model": "nope", "prompt": "a cat"}),
            "model",
        ),
        (
            "model not a string",
            json!({"model": 5, "prompt": "a cat"}),
            "model",
        ),
        (
            "action unsupported",
            veo(json!({"action": "edit"})),
            "action",
        ),
        (
            "prompt missing for veo3",
            json!({"model": "veo3"}),
            "prompt",
        ),
        (
            "prompt too long",
            veo(json!({"prompt": "x".repeat(2001)})),
            "prompt",
        ),
        ("prompt not a string", veo(json!({"prompt": 42})), "prompt"),
        ("duration 0", veo(json!({"duration": 0})), "duration"),
        ("duration 21", veo(json!({"duration": 21})), "duration"),
        ("duration 2.5", veo(json!({"duration": 2.5})), "duration"),
        (
            "duration as a string",
            veo(json!({"duration": "5"})),
            "duration",
        ),
        (
            "duration given to echo",
            json!({"model": "echo", "duration": 5}),
            "duration",
        ),
        (
            "params not an object",
            veo(json!({"params": [1, 2]})),
            "params",
        ),
        (
            "unknown param",
            veo(json!({"params": {"bogus": 1}})),
            "params.bogus",
        ),
        (
            "param out of range",
            veo(json!({"params": {"fps": 99}})),
            "params.fps",
        ),
        (
            "param of the wrong type",
            veo(json!({"params": {"fps": "8"}})),
            "params.fps",
        ),
        (
            "callback_url not a URL",
            veo(json!({"callback_url": "not a url"})),
            "callback_url",
        ),
        (
            "callback_url with ftp scheme",
            veo(json!({"callback_url": "ftp://example.com/hook"})),
            "callback_url",
        ),
        (
            "callback_url with credentials",
            veo(json!({"callback_url": "https://user:pass@example.com/hook"})),
            "callback_url",
        ),
        (
            "metadata not an object",
            veo(json!({"metadata": "x"})),
            "metadata",
        ),
        (
            "metadata with 17 entries",
            veo(json!({"metadata": seventeen})),
            "metadata",
        ),
        (
            "metadata non-string value",
            veo(json!({"metadata": {"a": 1}})),
            "metadata.a",
        ),
        (
            "metadata value over 512 chars",
            veo(json!({"metadata": {"k": "v".repeat(513)}})),
            "metadata.k",
        ),
        (
            "unknown top-level field",
            veo(json!({"colour": "red"})),
            "colour",
        ),
    ]
    .into_iter()
    .map(|(what, body, param)| (what, body, param.to_string()))
    .collect();
    // The param names the key, cut to 64 characters.
    let long_key = "k".repeat(65);
    cases.push((
        "metadata key over 64 chars",
        veo(json!({"metadata": {long_key.clone(): "v"}})),
        format!("metadata.{}", &long_key[..64]),
    ));
    cases
}

#[tokio::test]
async fn each_invalid_submit_field_is_400_naming_the_param_on_both_submit_endpoints() {
    let s = Server::start().await;
    let credits = s.credits().await;
    for path in ["/tasks", "/tasks/sync"] {
        for (what, body, param) in invalid_submissions() {
            let a = s.post(path, &body).await;
            assert_eq!(a.status, 400, "{path} {what}: {}", a.body);
            assert_invalid(&a, &param);
        }
    }
    assert_nothing_created(&s, credits).await;
    s.stop().await;
}

#[tokio::test]
async fn a_body_that_is_not_a_json_object_is_400() {
    let s = Server::start().await;
    let credits = s.credits().await;
    for body in [
        "model=echo",
        "{\"model\": \"echo\"",
        "[{\"model\": \"echo\"}]",
        "[]",
        "null",
    ] {
        let a = post_raw(&s, "/tasks", Some("application/json"), body).await;
        assert_eq!(a.status, 400, "{body}: {}", a.body);
        assert_invalid_body(&a);
    }
    assert_nothing_created(&s, credits).await;
    s.stop().await;
}

#[tokio::test]
async fn timeout_is_refused_on_the_async_endpoint_and_accepted_on_sync() {
    let s = Server::start().await;
    let credits = s.credits().await;
    let body = json!({"model": "echo", "prompt": "x", "timeout": 20});
    assert_invalid(&s.post("/tasks", &body).await, "timeout");
    assert_nothing_created(&s, credits).await;
    // Accepted on sync: finished in time (200) or still running (202), never refused.
    let sync = s.post("/tasks/sync", &body).await;
    assert!(matches!(sync.status.as_u16(), 200 | 202), "{}", sync.body);
    assert_eq!(s.credits().await, credits - 1);
    s.stop().await;
}

#[tokio::test]
async fn a_bad_idempotency_key_or_prefer_header_is_400_naming_the_header() {
    let s = Server::start().await;
    let credits = s.credits().await;
    let body = json!({"model": "echo", "prompt": "x"});
    let long_key = "k".repeat(256);
    let a = post_with_header(&s, "/tasks", &body, "Idempotency-Key", &long_key).await;
    assert_invalid(&a, "Idempotency-Key");
    let a = post_with_header(&s, "/tasks", &body, "Prefer", "wait=abc").await;
    assert_invalid(&a, "Prefer");
    assert_nothing_created(&s, credits).await;
    // 255 characters is the longest key accepted.
    let ok = post_with_header(&s, "/tasks", &body, "Idempotency-Key", &long_key[..255]).await;
    assert_eq!(ok.status, 202, "{}", ok.body);
    s.stop().await;
}

#[tokio::test]
async fn bad_list_queries_are_400_naming_the_query_parameter() {
    let s = Server::start().await;
    let cases = [
        ("status=bogus", "status"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=abc", "limit"),
        ("cursor=garbage", "cursor"),
        ("colour=red", "colour"),
    ];
    for (query, param) in cases {
        let a = s.get(&format!("/tasks?{query}")).await;
        assert_eq!(a.status, 400, "{query}: {}", a.body);
        assert_invalid(&a, param);
    }
    for fine in ["limit=1", "limit=100", "status=queued"] {
        let a = s.get(&format!("/tasks?{fine}")).await;
        assert_eq!(a.status, 200, "{fine}: {}", a.body);
    }
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 402 insufficient_quota
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn too_few_credits_is_402_and_creates_nothing() {
    let s = Server::start().await;
    let poor = s.new_account(10).await;
    let body = json!({"model": "veo3", "prompt": "a cat", "duration": 5});
    let a = s.post_as("/tasks", &body, &poor).await;
    a.assert_error(402, "insufficient_quota");
    let a = s.post_as("/tasks/sync", &body, &poor).await;
    a.assert_error(402, "insufficient_quota");
    assert_eq!(credits_of(&s, &poor).await, 10);
    assert!(tasks_of(&s, &poor).await.is_empty());
    // The account itself works: a task it can afford is accepted.
    let cheap = s
        .post_as("/tasks", &json!({"model": "echo", "prompt": "x"}), &poor)
        .await;
    assert_eq!(cheap.status, 202, "{}", cheap.body);
    assert_eq!(credits_of(&s, &poor).await, 9);
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 404 not_found
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unknown_routes_are_404() {
    let s = Server::start().await;
    let root = root(&s);
    for path in [
        "/v1/nope",
        "/v2/tasks",
        "/",
        "/v1",
        "/v1/",
        "/v1/tasks/",
        "/v1/account/x",
    ] {
        for method in [Method::GET, Method::POST] {
            let req = s
                .client
                .request(method.clone(), format!("{root}{path}"))
                .bearer_auth(&s.key);
            let a = s.send(req).await;
            assert_eq!(a.status, 404, "{method} {path}: {}", a.body);
            a.assert_error(404, "not_found");
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn unknown_and_malformed_task_ids_are_404() {
    let s = Server::start().await;
    let real = id_of(&s.submit(json!({"model": "echo", "prompt": "x"})).await);
    let ids = [
        unknown_id_like(&real),
        "nope".to_string(),
        "task_123".to_string(),
        format!("task_{}", "U".repeat(26)),
        format!("{real}0"),
        real.trim_start_matches("task_").to_string(),
        format!("task_8{}", "Z".repeat(25)),
    ];
    for id in &ids {
        let a = s.get(&format!("/tasks/{id}")).await;
        assert_eq!(a.status, 404, "GET {id}: {}", a.body);
        a.assert_error(404, "not_found");
        let a = call(&s, Method::POST, &format!("/tasks/{id}/cancel")).await;
        assert_eq!(a.status, 404, "cancel {id}: {}", a.body);
        a.assert_error(404, "not_found");
    }
    s.stop().await;
}

#[tokio::test]
async fn another_accounts_task_is_404_and_the_cancel_does_not_cancel_it() {
    let s = start_without_workers().await;
    let task = s
        .submit(json!({"model": "echo", "prompt": "private"}))
        .await;
    let id = id_of(&task);
    let owner_credits = s.credits().await;
    let other = s.new_account(100).await;

    let read = s.get_as(&format!("/tasks/{id}"), &other).await;
    read.assert_error(404, "not_found");
    let cancel = s
        .post_as(&format!("/tasks/{id}/cancel"), &json!({}), &other)
        .await;
    cancel.assert_error(404, "not_found");
    // The answer is the same as for an id that does not exist: nothing to tell them apart.
    let missing = s
        .get_as(&format!("/tasks/{}", unknown_id_like(&id)), &other)
        .await;
    assert_eq!(read.body, missing.body);
    assert!(!read.body.to_string().contains("private"));
    assert!(tasks_of(&s, &other).await.is_empty());
    assert_eq!(credits_of(&s, &other).await, 100);

    // The task is untouched: still queued, not refunded; its owner can still cancel it.
    let t = s.get(&format!("/tasks/{id}")).await;
    assert_eq!(t.body["status"], "queued", "{}", t.body);
    assert_eq!(t.body["cost"]["refunded"], false);
    assert_eq!(s.credits().await, owner_credits);
    let own = s.post(&format!("/tasks/{id}/cancel"), &json!({})).await;
    assert_eq!(own.status, 200, "{}", own.body);
    assert_eq!(own.body["status"], "cancelled");
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 405 method_not_allowed
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_wrong_method_is_405_with_an_allow_header() {
    let s = Server::start().await;
    let id = id_of(&s.submit(json!({"model": "echo", "prompt": "x"})).await);
    let cases = [
        (Method::DELETE, "/tasks".to_string(), vec!["GET", "POST"]),
        (Method::GET, "/tasks/sync".to_string(), vec!["POST"]),
        (Method::PUT, format!("/tasks/{id}"), vec!["GET"]),
        (Method::DELETE, format!("/tasks/{id}"), vec!["GET"]),
        (Method::GET, format!("/tasks/{id}/cancel"), vec!["POST"]),
        (Method::POST, "/account".to_string(), vec!["GET"]),
        (Method::PATCH, "/models".to_string(), vec!["GET"]),
    ];
    for (method, path, allowed) in cases {
        let a = call(&s, method.clone(), &path).await;
        assert_eq!(a.status, 405, "{method} {path}: {}", a.body);
        a.assert_error(405, "method_not_allowed");
        let allow = a
            .header("allow")
            .unwrap_or_else(|| panic!("{method} {path}: no Allow"));
        let mut got: Vec<&str> = allow.split(',').map(str::trim).collect();
        got.sort_unstable();
        assert_eq!(got, allowed, "{method} {path}: Allow: {allow}");
    }
    // The task was not changed by any of it.
    let t = s.wait_terminal(&id, 60).await;
    assert_eq!(t["status"], "completed");
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 409 not_cancellable, idempotency_in_progress; 422 idempotency_key_reused
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn cancelling_a_completed_failed_or_running_task_is_409_and_refunds_nothing() {
    let s = Server::start().await;
    let start = s.credits().await;

    let done = id_of(&s.submit(json!({"model": "echo", "prompt": "done"})).await);
    assert_eq!(s.wait_terminal(&done, 60).await["status"], "completed");
    let a = s.post(&format!("/tasks/{done}/cancel"), &json!({})).await;
    a.assert_error(409, "not_cancellable");
    assert_eq!(
        s.credits().await,
        start - 1,
        "a completed task was refunded"
    );
    assert_eq!(
        s.get(&format!("/tasks/{done}")).await.body["status"],
        "completed"
    );

    let failing = json!({"model": "echo", "prompt": "x", "params": {"fail": "boom"}});
    let failed = id_of(&s.submit(failing).await);
    let t = s.wait_terminal(&failed, 60).await;
    assert_eq!(t["status"], "failed", "{t}");
    assert_eq!(t["error"]["code"], "generation_failed");
    assert_eq!(t["cost"]["refunded"], true);
    assert_eq!(s.credits().await, start - 1);
    let a = s.post(&format!("/tasks/{failed}/cancel"), &json!({})).await;
    a.assert_error(409, "not_cancellable");
    assert_eq!(
        s.credits().await,
        start - 1,
        "a failed task was refunded twice"
    );
    assert_eq!(
        s.get(&format!("/tasks/{failed}")).await.body["status"],
        "failed"
    );

    // A task a worker has started cannot be cancelled either.
    let slow = json!({"model": "echo", "prompt": "slow", "params": {"sleep_ms": 3000}});
    let running = id_of(&s.submit(slow).await);
    let path = format!("/tasks/{running}");
    let (srv, p) = (&s, path.as_str());
    poll(60, "the task starting", move || async move {
        let st = srv.get(p).await.body["status"].clone();
        (st != "queued").then_some(())
    })
    .await;
    let a = s.post(&format!("{path}/cancel"), &json!({})).await;
    a.assert_error(409, "not_cancellable");
    assert_eq!(s.wait_terminal(&running, 60).await["status"], "completed");
    assert_eq!(s.credits().await, start - 2);
    s.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_in_flight_is_409_and_reused_with_another_body_is_422() {
    let entered = Arc::new(Notify::new());
    let open = Arc::new(Semaphore::new(0));
    let hooks = store_fault(Fault::InsertWaits {
        entered: entered.clone(),
        open: open.clone(),
    });
    let s = Server::start_with(|_| {}, hooks).await;
    let start = s.credits().await;
    let body_a = json!({"model": "echo", "prompt": "a"});
    let body_b = json!({"model": "echo", "prompt": "b"});

    let first = {
        let req = s
            .client
            .post(s.url("/tasks"))
            .bearer_auth(&s.key)
            .header("Idempotency-Key", "order-1")
            .json(&body_a);
        tokio::spawn(async move {
            let resp = req.send().await.expect("first request sent");
            (resp.status(), resp.json::<Value>().await.unwrap())
        })
    };
    tokio::time::timeout(Duration::from_secs(60), entered.notified())
        .await
        .expect("the first request reached the store");

    let a = post_with_header(&s, "/tasks", &body_a, "Idempotency-Key", "order-1").await;
    a.assert_error(409, "idempotency_in_progress");
    let a = post_with_header(&s, "/tasks", &body_b, "Idempotency-Key", "order-1").await;
    a.assert_error(422, "idempotency_key_reused");

    open.add_permits(1_000);
    let (status, task) = first.await.unwrap();
    assert_eq!(status, 202, "{task}");
    let again = post_with_header(&s, "/tasks", &body_a, "Idempotency-Key", "order-1").await;
    assert_eq!(again.status, 202, "{}", again.body);
    assert_eq!(again.body["task_id"], task["task_id"]);
    let a = post_with_header(&s, "/tasks", &body_b, "Idempotency-Key", "order-1").await;
    a.assert_error(422, "idempotency_key_reused");
    assert_eq!(s.credits().await, start - 1, "charged more than once");
    assert_eq!(tasks_of(&s, &s.key).await.len(), 1);
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 413 payload_too_large, 415 unsupported_media_type
// ---------------------------------------------------------------------------------------------

/// A valid echo submit padded with trailing whitespace to exactly `len` bytes.
fn padded_body(len: usize) -> Vec<u8> {
    let mut body = br#"{"model":"echo","prompt":"padded"}"#.to_vec();
    body.resize(len, b' ');
    body
}

#[tokio::test]
async fn a_body_over_64_kib_is_413_and_64_kib_exactly_is_accepted() {
    let s = Server::start().await;
    let credits = s.credits().await;
    let huge = json!({"model": "echo", "prompt": "x".repeat(70_000)}).to_string();
    for path in ["/tasks", "/tasks/sync"] {
        let a = post_raw(&s, path, Some("application/json"), huge.clone()).await;
        a.assert_error(413, "payload_too_large");
        let a = post_raw(
            &s,
            path,
            Some("application/json"),
            padded_body(64 * 1024 + 1),
        )
        .await;
        a.assert_error(413, "payload_too_large");
    }
    assert_nothing_created(&s, credits).await;
    let a = post_raw(
        &s,
        "/tasks",
        Some("application/json"),
        padded_body(64 * 1024),
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.body);
    s.stop().await;
}

#[tokio::test]
async fn a_body_not_declared_as_json_is_415() {
    let s = Server::start().await;
    let credits = s.credits().await;
    let body = r#"{"model":"echo","prompt":"x"}"#;
    for path in ["/tasks", "/tasks/sync"] {
        for ct in [
            Some("text/plain"),
            None,
            Some("application/x-www-form-urlencoded"),
        ] {
            let a = post_raw(&s, path, ct, body).await;
            assert_eq!(a.status, 415, "{path} {ct:?}: {}", a.body);
            a.assert_error(415, "unsupported_media_type");
        }
    }
    assert_nothing_created(&s, credits).await;
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 503 unavailable, 500 internal
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_queue_outage_at_submit_still_answers_202_with_the_task_queued_and_paid_for() {
    // The stored task is the commit point: the sweeper queues it once the queue is back
    // (tests/faults.rs shows that part). The client keeps a task, not an error.
    let s = Server::start_with(|_| {}, store_fault(Fault::QueueDown)).await;
    let start = s.credits().await;
    let body = json!({"model": "veo3", "prompt": "a cat", "duration": 5});
    let a = s.post("/tasks", &body).await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body["status"], "queued", "{}", a.body);
    let sync = s
        .post(
            "/tasks/sync",
            &json!({"model": "veo3", "prompt": "a cat", "duration": 5, "timeout": 1}),
        )
        .await;
    assert_eq!(sync.status, 202, "{}", sync.body);
    assert!(sync.body["poll_url"].is_string(), "{}", sync.body);
    let tasks = tasks_of(&s, &s.key).await;
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    for t in &tasks {
        assert_eq!(t["status"], "queued", "{t}");
        assert_eq!(t["cost"]["refunded"], false, "{t}");
    }
    assert_eq!(s.credits().await, start - 100);
    s.stop().await;
}

#[tokio::test]
async fn a_store_failure_is_500_internal_without_internal_details() {
    let s = Server::start_with(|_| {}, store_fault(Fault::KeyLookupFails)).await;
    let submit = json!({"model": "echo", "prompt": "x"});
    let answers = [
        s.get("/account").await,
        s.get("/tasks").await,
        s.post("/tasks", &submit).await,
        s.post("/tasks/sync", &submit).await,
    ];
    for a in &answers {
        a.assert_error(500, "internal");
        let text = a.body.to_string();
        for secret in ["secret", "/var/db", "locked", "PortError", "backend"] {
            assert!(!text.contains(secret), "{secret:?} leaked: {text}");
        }
    }
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 403 forbidden (signed result URLs)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn tampered_or_unsigned_result_urls_are_403() {
    // The local server signs and serves result files itself and refuses bad ones with 403. On
    // the AWS backend they are S3 presigned URLs, which S3 refuses the same way but the AWS
    // emulator does not check: there each URL is checked as S3 would, by its SigV4 signature.
    let s = Server::start().await;
    let id = id_of(&s.submit(json!({"model": "echo", "prompt": "hello"})).await);
    let other = id_of(&s.submit(json!({"model": "echo", "prompt": "other"})).await);
    let task = s.wait_terminal(&id, 60).await;
    let url = output_url(&task);
    let other_url = output_url(&s.wait_terminal(&other, 60).await);
    let (ok, bytes) = fetch(&s, &url).await;
    assert_eq!(ok.status, 200);
    assert_eq!(bytes, b"hello");

    // Both runtimes hand out URLs signed by tasklane, under the server's own address, that
    // expire exactly when the task says.
    let told: chrono::DateTime<chrono::Utc> = task["result"]["outputs"][0]["expires_at"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no expires_at: {task}"));
    let root = s.base.trim_end_matches("/v1");
    assert!(
        url.starts_with(&format!("{root}/v1/files/")),
        "not a tasklane result URL under {root}: {url}"
    );
    let expires_param: i64 = url
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("expires="))
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("no expires in {url}"));
    assert_eq!(
        expires_param,
        told.timestamp(),
        "the URL expires at {expires_param}, the task says {told}"
    );

    if common::on_aws() {
        // The URL redirects, uncached, to an S3 presigned GET that S3 accepts (checked as S3
        // would: the emulator does not) and that lives minutes, not the URL's whole life.
        let direct = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let resp = direct.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 302, "{url}");
        assert_eq!(resp.headers()["cache-control"], "private, no-store");
        let location = resp.headers()["location"].to_str().unwrap().to_string();
        let signed = common::verify_s3_presigned_get(&location)
            .unwrap_or_else(|e| panic!("the redirect does not verify: {e}: {location}"));
        let now = chrono::Utc::now();
        assert!(
            signed.signed_at <= now && now - signed.signed_at < chrono::Duration::seconds(60),
            "signed at {} (now {now}): {location}",
            signed.signed_at
        );
        assert_eq!(
            signed.expires_in,
            tasklane_aws::s3::REDIRECT_TTL.as_secs(),
            "{location}"
        );
        assert!(
            signed.expires_at() <= told,
            "the redirect outlives the URL: {location}"
        );
    }

    let (unsigned, query) = url.split_once('?').unwrap();
    let sig = query
        .split('&')
        .find_map(|p| p.strip_prefix("signature="))
        .unwrap();
    let expires: i64 = query
        .split('&')
        .find_map(|p| p.strip_prefix("expires="))
        .unwrap()
        .parse()
        .unwrap();
    let flipped = format!(
        "{}{}",
        &sig[..sig.len() - 1],
        if sig.ends_with('0') { '1' } else { '0' }
    );
    let bad = [
        ("tampered signature", url.replace(sig, &flipped)),
        ("signature missing", format!("{unsigned}?expires={expires}")),
        ("no query at all", unsigned.to_string()),
        ("signature not hex", url.replace(sig, "not-hex")),
        (
            "expiry pushed out",
            url.replace(
                &format!("expires={expires}"),
                &format!("expires={}", expires + 86_400),
            ),
        ),
        ("another task's file", url.replace(&id, &other)),
        ("another task's signature", {
            let theirs = other_url
                .split('&')
                .find_map(|p| p.strip_prefix("signature="))
                .unwrap();
            url.replace(sig, theirs)
        }),
    ];
    for (what, u) in bad {
        let (a, _) = fetch(&s, &u).await;
        assert_eq!(a.status, 403, "{what}: {u}: {}", a.body);
        a.assert_error(403, "forbidden");
        assert!(!a.body.to_string().contains("hello"));
    }
    s.stop().await;
}

#[tokio::test]
async fn an_expired_result_url_is_403_and_reading_the_task_again_gives_one_that_works() {
    let s = Server::start_with(
        |cfg| cfg.core.result_url_ttl = Duration::from_secs(1),
        Hooks::default(),
    )
    .await;
    let id = id_of(&s.submit(json!({"model": "echo", "prompt": "hello"})).await);
    let task = s.wait_terminal(&id, 60).await;
    let url = output_url(&task);
    let path = format!("/tasks/{id}");

    let (srv, url) = (&s, url.as_str());
    let expired = poll(30, "the URL expiring", move || async move {
        let (a, _) = fetch(srv, url).await;
        (a.status == 403).then_some(a)
    })
    .await;
    expired.assert_error(403, "forbidden");

    // Every read signs afresh; with a 1 s lifetime a fresh URL may lapse before it is used,
    // so read again until one is fetched in time.
    let path = path.as_str();
    let bytes = poll(60, "a fresh URL working", move || async move {
        let t = srv.get(path).await;
        assert_eq!(t.status, 200, "{}", t.body);
        let fresh = output_url(&t.body);
        let (a, bytes) = fetch(srv, &fresh).await;
        match a.status.as_u16() {
            200 => Some(bytes),
            403 => None,
            other => panic!("fresh URL answered {other}: {}", a.body),
        }
    })
    .await;
    assert_eq!(bytes, b"hello");
    s.stop().await;
}

#[tokio::test]
async fn a_result_no_longer_stored_answers_410_expired_not_a_storage_error() {
    // After the retention (the results bucket's lifecycle rule on AWS) removed an output, its
    // still-valid URL answers the API's error shape with code `expired`, not S3's 403.
    let s = Server::start().await;
    let id = id_of(&s.submit(json!({"model": "echo", "prompt": "hello"})).await);
    let url = output_url(&s.wait_terminal(&id, 60).await);
    let key = url
        .split_once("/v1/files/")
        .and_then(|(_, rest)| rest.split_once('?'))
        .map(|(key, _)| key.to_string())
        .unwrap_or_else(|| panic!("no key in {url}"));
    let (ok, bytes) = fetch(&s, &url).await;
    assert_eq!(ok.status, 200);
    assert_eq!(bytes, b"hello");
    s.delete_result(&key).await;
    let (gone, bytes) = fetch(&s, &url).await;
    gone.assert_error(410, "expired");
    assert!(!String::from_utf8_lossy(&bytes).contains("hello"));
    // A tampered URL of the deleted object is still refused first.
    let (a, _) = fetch(&s, &url.replace("expires=", "expires=1")).await;
    a.assert_error(403, "forbidden");
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Robustness: hostile bodies, headers, queries and paths are all 4xx with the error shape
// ---------------------------------------------------------------------------------------------

/// One hostile request and the status it must get.
struct Probe {
    what: String,
    method: Method,
    /// Path and query from the server root.
    path: String,
    /// Headers replacing the defaults (`None` removes one).
    headers: Vec<(&'static str, Option<Vec<u8>>)>,
    body: Option<Vec<u8>>,
    expect: u16,
}

/// A JSON body POSTed to `/v1/tasks`.
fn body(what: &str, bytes: impl Into<Vec<u8>>, expect: u16) -> Probe {
    Probe {
        what: what.to_string(),
        method: Method::POST,
        path: "/v1/tasks".into(),
        headers: vec![],
        body: Some(bytes.into()),
        expect,
    }
}

/// A JSON body POSTed to `/v1/tasks/sync`.
fn sync_body(what: &str, bytes: impl Into<Vec<u8>>, expect: u16) -> Probe {
    Probe {
        path: "/v1/tasks/sync".into(),
        ..body(what, bytes, expect)
    }
}

/// A valid submit to `/v1/tasks` with one header set to `value` (`None`: left out).
fn header(what: &str, name: &'static str, value: Option<&[u8]>, expect: u16) -> Probe {
    Probe {
        headers: vec![(name, value.map(<[u8]>::to_vec))],
        ..body(what, r#"{"model":"echo","prompt":"x"}"#, expect)
    }
}

/// A request without body.
fn bare(what: &str, method: Method, path: &str, expect: u16) -> Probe {
    Probe {
        what: what.to_string(),
        method,
        path: path.to_string(),
        headers: vec![],
        body: None,
        expect,
    }
}

/// `{"model":"veo3","prompt":"a cat", <fields>}`.
fn veo(fields: &str) -> String {
    format!(r#"{{"model":"veo3","prompt":"a cat",{fields}}}"#)
}

// One probe a line reads best as a table.
#[rustfmt::skip]
fn hostile_probes() -> Vec<Probe> {
    let files_status = 403;
    let deep_open = "[".repeat(10_000);
    let deep_balanced = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_objects = r#"{"a":"#.repeat(10_000);
    let deep_param = format!(
        r#"{{"model":"echo","params":{{"sleep_ms":{}{}}}}}"#,
        "[".repeat(5_000),
        "]".repeat(5_000)
    );
    let many_meta: Vec<String> = (0..3000).map(|i| format!(r#""k{i}":"v""#)).collect();
    let utf16: Vec<u8> = r#"{"model":"echo"}"#.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let big = "x".repeat(32 * 1024);
    let long_bearer = format!("Bearer {big}");
    let long_prefer = format!("wait={}", "9".repeat(32 * 1024));
    let long_ct = format!("application/{big}");
    let long_query = format!("/v1/tasks?{big}=1");
    let long_id = format!("/v1/tasks/{}", "A".repeat(5000));
    let crabs = "🦀".repeat(2001);
    let long_url = format!("https://example.com/{}", "a".repeat(3000));

    let mut p = vec![
        // Not JSON, or not an object.
        body("empty body", "", 400),
        body("whitespace body", " \n\t\r ", 400),
        body("lone open brace", "{", 400),
        body("lone close brace", "}", 400),
        body("null", "null", 400),
        body("true", "true", 400),
        body("a number", "42", 400),
        body("a string", r#""model""#, 400),
        body("an empty array", "[]", 400),
        body("an array of a valid body", r#"[{"model":"echo"}]"#, 400),
        body("10,000 open brackets", deep_open, 400),
        body("10,000 nested arrays", deep_balanced, 400),
        body("10,000 open objects", deep_objects, 400),
        body("a param nested 5,000 deep", deep_param, 400),
        body("trailing garbage", r#"{"model":"echo"} x"#, 400),
        body("two documents", r#"{"model":"echo"}{"model":"echo"}"#, 400),
        body("single quotes", "{'model':'echo'}", 400),
        body("unquoted key", r#"{model:"echo"}"#, 400),
        body("trailing comma", r#"{"model":"echo",}"#, 400),
        body("a comment", r#"{"model":"echo" /* hi */}"#, 400),
        body("UTF-16 encoded", utf16, 400),
        // Numbers.
        body("duration NaN", veo(r#""duration":NaN"#), 400),
        body("duration Infinity", veo(r#""duration":Infinity"#), 400),
        body("duration hex", veo(r#""duration":0x5"#), 400),
        body("duration with a leading zero", veo(r#""duration":05"#), 400),
        body("duration 1e400", veo(r#""duration":1e400"#), 400),
        body("duration 1e308", veo(r#""duration":1e308"#), 400),
        body("duration -5", veo(r#""duration":-5"#), 400),
        body("duration -0", veo(r#""duration":-0"#), 400),
        body("duration 5e-324", veo(r#""duration":5e-324"#), 400),
        body("duration beyond u64", veo(r#""duration":99999999999999999999999"#), 400),
        body("duration u64::MAX", veo(r#""duration":18446744073709551615"#), 400),
        body("duration 2^32 + 5", veo(r#""duration":4294967301"#), 400),
        body("duration true", veo(r#""duration":true"#), 400),
        body("duration an array", veo(r#""duration":[5]"#), 400),
        body("duration an object", veo(r#""duration":{"s":5}"#), 400),
        body("fps 1e400", veo(r#""params":{"fps":1e400}"#), 400),
        body("seed -1", veo(r#""params":{"seed":-1}"#), 400),
        body("seed beyond i64", veo(r#""params":{"seed":9223372036854775808}"#), 400),
        body("fps nested arrays", veo(r#""params":{"fps":[[[[[[8]]]]]]}"#), 400),
        body("sleep_ms over its maximum", r#"{"model":"echo","params":{"sleep_ms":600001}}"#, 400),
        // Strings: unicode, NUL, bad UTF-8.
        body("escaped NUL in model", r#"{"model":"veo3\u0000"}"#, 400),
        body("raw NUL in a string", b"{\"model\":\"ec\0ho\"}".to_vec(), 400),
        body("raw newline in a string", "{\"model\":\"ec\nho\"}", 400),
        body("homoglyph model", r#"{"model":"vео3","prompt":"a"}"#, 400),
        body("emoji model", r#"{"model":"🦀"}"#, 400),
        body("upper-case model", r#"{"model":"VEO3","prompt":"a"}"#, 400),
        body("model with a leading space", r#"{"model":" veo3","prompt":"a"}"#, 400),
        body("empty model", r#"{"model":""}"#, 400),
        body("10,000-char model", format!(r#"{{"model":"{}"}}"#, "m".repeat(10_000)), 400),
        body("model an array", r#"{"model":["veo3"]}"#, 400),
        body("model an object", r#"{"model":{"name":"veo3"}}"#, 400),
        body("lone surrogate", r#"{"model":"\ud800"}"#, 400),
        body("invalid UTF-8 in a string", b"{\"model\":\"\xff\xfe\"}".to_vec(), 400),
        body("invalid UTF-8 outside strings", b"\xff{\"model\":\"echo\"}".to_vec(), 400),
        body("overlong UTF-8", b"{\"model\":\"\xc0\xafecho\"}".to_vec(), 400),
        body("truncated UTF-8", b"{\"model\":\"echo\",\"prompt\":\"\xe2\x82\"}".to_vec(), 400),
        body("unicode unknown field", r#"{"model":"echo","mödel":"echo"}"#, 400),
        body("NUL unknown field", r#"{"model":"echo","\u0000":1}"#, 400),
        body("10,000-char unknown field", format!(r#"{{"model":"echo","{}":1}}"#, "f".repeat(10_000)), 400),
        body("__proto__ field", r#"{"model":"echo","__proto__":{"admin":true}}"#, 400),
        body("__proto__ param", r#"{"model":"echo","params":{"__proto__":{}}}"#, 400),
        body("duplicate key, last invalid", r#"{"model":"echo","model":5}"#, 400),
        body("duplicate prompt, last invalid", r#"{"model":"echo","prompt":"a","prompt":{}}"#, 400),
        body("blank prompt for veo3", r#"{"model":"veo3","prompt":"   \n\t"}"#, 400),
        body("2001 emoji prompt", format!(r#"{{"model":"veo3","prompt":"{crabs}"}}"#), 400),
        body("empty action", r#"{"model":"echo","action":""}"#, 400),
        body("action with NUL", r#"{"model":"echo","action":"generate\u0000"}"#, 400),
        body("action an array", r#"{"model":"echo","action":["generate"]}"#, 400),
        body("empty metadata key", r#"{"model":"echo","metadata":{"":"v"}}"#, 400),
        body("3000 metadata entries", format!(r#"{{"model":"echo","metadata":{{{}}}}}"#, many_meta.join(",")), 400),
        body("metadata value an object", r#"{"model":"echo","metadata":{"a":{"b":"c"}}}"#, 400),
        body("metadata value null", r#"{"model":"echo","metadata":{"a":null}}"#, 400),
        body("metadata an array", r#"{"model":"echo","metadata":["a"]}"#, 400),
        body("javascript callback", r#"{"model":"echo","callback_url":"javascript:alert(1)"}"#, 400),
        body("file callback", r#"{"model":"echo","callback_url":"file:///etc/passwd"}"#, 400),
        body("callback without host", r#"{"model":"echo","callback_url":"https://"}"#, 400),
        body("callback broken IPv6", r#"{"model":"echo","callback_url":"http://[::1"}"#, 400),
        body("callback a number", r#"{"model":"echo","callback_url":5}"#, 400),
        body("callback with a user", r#"{"model":"echo","callback_url":"https://u@example.com/"}"#, 400),
        body("3000-char callback", format!(r#"{{"model":"echo","callback_url":"{long_url}"}}"#), 400),
        sync_body("timeout -1", r#"{"model":"echo","timeout":-1}"#, 400),
        sync_body("timeout a string", r#"{"model":"echo","timeout":"abc"}"#, 400),
        sync_body("timeout 1e400", r#"{"model":"echo","timeout":1e400}"#, 400),
        sync_body("timeout an array", r#"{"model":"echo","timeout":[1]}"#, 400),
        sync_body("sync body an array", "[]", 400),
        // Headers.
        header("Content-Type text/plain", "content-type", Some(b"text/plain"), 415),
        header("no Content-Type", "content-type", None, 415),
        header("empty Content-Type", "content-type", Some(b""), 415),
        header("Content-Type application/jsonx", "content-type", Some(b"application/jsonx"), 415),
        header("Content-Type text/json", "content-type", Some(b"text/json"), 415),
        header("Content-Type multipart", "content-type", Some(b"multipart/form-data; boundary=x"), 415),
        header("32 KiB Content-Type", "content-type", Some(long_ct.as_bytes()), 415),
        header("non-ASCII Content-Type", "content-type", Some(b"application/json\xff"), 415),
        header("no Authorization", "authorization", None, 401),
        header("32 KiB bearer key", "authorization", Some(long_bearer.as_bytes()), 401),
        header("non-ASCII bearer key", "authorization", Some(b"Bearer \xff\xfe"), 401),
        header("bearer with a tab", "authorization", Some(b"Bearer\tnope"), 401),
        header("bearer with spaces in the key", "authorization", Some(b"Bearer a b c"), 401),
        header("Digest scheme", "authorization", Some(b"Digest username=\"a\""), 401),
        header("256-char Idempotency-Key", "idempotency-key", Some("k".repeat(256).as_bytes()), 400),
        header("32 KiB Idempotency-Key", "idempotency-key", Some(big.as_bytes()), 400),
        header("empty Idempotency-Key", "idempotency-key", Some(b""), 400),
        header("Idempotency-Key with a space", "idempotency-key", Some(b"a b"), 400),
        header("non-ASCII Idempotency-Key", "idempotency-key", Some(b"cl\xe9"), 400),
        header("Prefer wait=abc", "prefer", Some(b"wait=abc"), 400),
        header("Prefer wait=-1", "prefer", Some(b"wait=-1"), 400),
        header("Prefer wait=1.5", "prefer", Some(b"wait=1.5"), 400),
        header("Prefer wait= empty", "prefer", Some(b"wait="), 400),
        header("Prefer wait beyond u64", "prefer", Some(b"wait=99999999999999999999999"), 400),
        header("32 KiB Prefer", "prefer", Some(long_prefer.as_bytes()), 400),
        header("non-ASCII Prefer", "prefer", Some(b"wait=\xb5"), 400),
        // Queries.
        bare("status=QUEUED", Method::GET, "/v1/tasks?status=QUEUED", 400),
        bare("empty status", Method::GET, "/v1/tasks?status=", 400),
        bare("limit=-1", Method::GET, "/v1/tasks?limit=-1", 400),
        bare("limit=1e2", Method::GET, "/v1/tasks?limit=1e2", 400),
        bare("limit=NUL", Method::GET, "/v1/tasks?limit=%00", 400),
        bare("limit beyond u64", Method::GET, "/v1/tasks?limit=18446744073709551616", 400),
        bare("a bad second limit", Method::GET, "/v1/tasks?limit=1&limit=abc", 400),
        // An empty cursor is the first page (openapi.yaml): see
        // fractions_and_made_up_cursors_are_still_400_with_the_error_shape.
        bare("cursor of base64 junk", Method::GET, "/v1/tasks?cursor=aGVsbG8", 400),
        bare("cursor with bad characters", Method::GET, "/v1/tasks?cursor=%ff%fe!!", 400),
        bare("empty model filter", Method::GET, "/v1/tasks?model=", 400),
        bare("65-char model filter", Method::GET, &format!("/v1/tasks?model={}", "m".repeat(65)), 400),
        bare("non-UTF-8 query name", Method::GET, "/v1/tasks?%ff=1", 400),
        bare("32 KiB query name", Method::GET, &long_query, 400),
        // Paths.
        bare("NUL task id", Method::GET, "/v1/tasks/%00", 404),
        bare("task_ and NUL", Method::GET, "/v1/tasks/task_%00", 404),
        bare("5000-char task id", Method::GET, &long_id, 404),
        bare("empty id to cancel", Method::POST, "/v1/tasks//cancel", 404),
        bare("double slash", Method::GET, "/v1//tasks", 404),
        bare("upper-case route", Method::GET, "/v1/TASKS", 404),
        bare("cancel with a suffix", Method::POST, "/v1/tasks/task_00000000000000000000000000/cancel/x", 404),
        bare("unknown well-formed id", Method::GET, "/v1/tasks/task_00000000000000000000000000", 404),
        // Signed result URLs are checked on both runtimes (AWS: then redirected to S3).
        bare("file path escape", Method::GET, "/v1/files/..%2f..%2fetc%2fpasswd?expires=9999999999&signature=00", files_status),
        bare("empty file key", Method::GET, "/v1/files/", files_status),
    ];
    // A hostile header on a route other than submit.
    p.push(Probe {
        headers: vec![("authorization", Some(long_bearer.into_bytes()))],
        ..bare("32 KiB bearer key on GET", Method::GET, "/v1/account", 401)
    });
    p
}

/// Sends one probe; `Err` says what was wrong with the answer.
async fn run_probe(s: &Server, p: &Probe) -> Result<(), String> {
    let mut headers = HeaderMap::new();
    let bearer = format!("Bearer {}", s.key);
    headers.insert(AUTHORIZATION, HeaderValue::from_str(&bearer).unwrap());
    if p.body.is_some() {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    for (name, value) in &p.headers {
        let name = HeaderName::from_static(name);
        match value {
            Some(v) => {
                headers.insert(name, HeaderValue::from_bytes(v).map_err(|e| e.to_string())?);
            }
            None => {
                headers.remove(name);
            }
        }
    }
    let mut req = s
        .client
        .request(p.method.clone(), format!("{}{}", root(s), p.path))
        .headers(headers);
    if let Some(b) = &p.body {
        req = req.body(b.clone());
    }
    let resp = req.send().await.map_err(|e| format!("no answer: {e}"))?;
    let status = resp.status().as_u16();
    let ct = resp.headers().get(CONTENT_TYPE).cloned();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| format!("body not read: {e}"))?;
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if status != p.expect {
        return Err(format!("status {status}, expected {}: {body}", p.expect));
    }
    if ct.as_ref().is_none_or(|c| c != "application/json") {
        return Err(format!("Content-Type {ct:?}"));
    }
    let e = &body["error"];
    if e["code"] != code_for(p.expect) || e["message"].as_str().is_none_or(str::is_empty) {
        return Err(format!(
            "not the error shape with code {}: {body}",
            code_for(p.expect)
        ));
    }
    Ok(())
}

#[tokio::test]
async fn hostile_bodies_headers_queries_and_paths_are_4xx_with_the_error_shape() {
    let s = Server::start().await;
    let credits = s.credits().await;
    let probes = hostile_probes();
    assert!(probes.len() >= 60);
    let mut failures = Vec::new();
    for p in &probes {
        assert!((400..500).contains(&p.expect));
        if let Err(why) = run_probe(&s, p).await {
            failures.push(format!(
                "{} {} [{}]: {why}",
                p.method,
                p.path.chars().take(80).collect::<String>(),
                p.what
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} probes failed:\n{}",
        failures.len(),
        probes.len(),
        failures.join("\n")
    );
    // The server is still healthy, and none of it created a task or moved a credit.
    assert_nothing_created(&s, credits).await;
    s.stop().await;
}

#[tokio::test]
async fn a_body_with_a_duplicate_key_is_refused_rather_than_silently_resolved() {
    let s = Server::start().await;
    let credits = s.credits().await;
    let bodies = [
        r#"{"model":"nope","model":"echo","prompt":"x"}"#,
        r#"{"model":"echo","prompt":"shown to the validator","prompt":"run"}"#,
    ];
    for body in bodies {
        let a = post_raw(&s, "/tasks", Some("application/json"), body).await;
        assert_eq!(a.status, 400, "{body}: {}", a.body);
        a.assert_error(400, "invalid_request");
    }
    assert_nothing_created(&s, credits).await;
    s.stop().await;
}

#[tokio::test]
async fn over_the_rate_limit_is_429_with_retry_after_and_other_accounts_are_unaffected() {
    let s = Server::start_with(
        |c| {
            c.core.rate_limit = Some(tasklane_core::limits::RateLimit {
                per_second: 1.0,
                burst: 3,
            })
        },
        Hooks::default(),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(s.get("/account").await.status, 200);
    }
    let limited = s.get("/account").await;
    limited.assert_error(429, "rate_limited");
    let wait: u64 = limited
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in whole seconds");
    assert!((1..=2).contains(&wait), "Retry-After {wait}");
    // Submits count too, and a limited submit creates nothing.
    let a = s.post("/tasks", &json!({"model": "echo"})).await;
    a.assert_error(429, "rate_limited");
    let other = s.new_account(5).await;
    assert_eq!(s.get_as("/account", &other).await.status, 200);
    // After the advertised wait, requests are served again.
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let after = s.get("/tasks").await;
    assert_eq!(after.status, 200, "{}", after.body);
    assert_eq!(after.body["data"].as_array().unwrap().len(), 0);
    s.stop().await;
}

#[tokio::test]
async fn fractions_and_made_up_cursors_are_still_400_with_the_error_shape() {
    // Whole numbers written as `17.0` and an empty `cursor=` are accepted (tests/submit.rs);
    // what stays refused keeps the `{"error": {"code", "message", "param"}}` shape.
    let s = Server::start().await;
    let credits = s.credits().await;
    let refused = [
        (
            json!({"model": "veo3", "prompt": "x", "duration": 17.5}),
            "duration",
        ),
        (
            json!({"model": "veo3", "prompt": "x", "duration": 21.0}),
            "duration",
        ),
        (
            json!({"model": "veo3", "prompt": "x", "params": {"fps": 2.5}}),
            "params.fps",
        ),
        (
            json!({"model": "veo3", "prompt": "x", "params": {"seed": 9.3e18}}),
            "params.seed",
        ),
        (
            json!({"model": "demo-image", "prompt": "x", "params": {"width": 15.0}}),
            "params.width",
        ),
        (json!({"model": "echo", "duration": 5.0}), "duration"),
    ];
    for path in ["/tasks", "/tasks/sync"] {
        for (body, param) in &refused {
            let a = s.post(path, body).await;
            assert_eq!(a.status, 400, "{path} {body}: {}", a.body);
            assert_invalid(&a, param);
        }
    }
    assert_nothing_created(&s, credits).await;
    for (query, param) in [
        ("limit=17.5", "limit"),
        ("limit=0.0", "limit"),
        ("limit=100.5", "limit"),
        ("limit=101.0", "limit"),
        ("limit=NaN", "limit"),
        // Decimal digits only: no exponent, no sign, no bare point.
        ("limit=1e1", "limit"),
        ("limit=+5", "limit"),
        ("limit=5.", "limit"),
        ("limit=", "limit"),
        ("cursor=n", "cursor"),
        // The documented shape (42 URL-safe characters) but not a cursor the API returned.
        (
            "cursor=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "cursor",
        ),
        ("status=", "status"),
        ("model=", "model"),
    ] {
        let a = s.get(&format!("/tasks?{query}")).await;
        assert_eq!(a.status, 400, "{query}: {}", a.body);
        assert_invalid(&a, param);
    }
    for fine in ["cursor=", "limit=17.0", "limit=100.00", "limit=5&cursor="] {
        let a = s.get(&format!("/tasks?{fine}")).await;
        assert_eq!(a.status, 200, "{fine}: {}", a.body);
    }
    s.stop().await;
}
