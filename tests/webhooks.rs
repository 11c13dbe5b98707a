//! Webhooks over real HTTP: a receiver in the test records every request the server sends
//! and answers from a programmable list, and signatures are checked with the independent
//! `standardwebhooks` crate.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use common::Server;
use serde_json::{Value, json};
use tasklane_core::ports::WorkMessage;
use tasklane_local::Hooks;

/// How the receiver answers one request.
#[derive(Debug, Clone, Copy)]
enum Reply {
    /// Answer with this status.
    Status(u16),
    /// Answer 200 only after this long.
    Hang(Duration),
    /// Answer `302 Found` to this path.
    Redirect(&'static str),
}

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

struct ReceiverState {
    replies: Vec<Reply>,
    received: Mutex<Vec<Received>>,
}

/// A webhook receiver on 127.0.0.1:0. The n-th request to `/hook` gets `replies[n]` (the
/// last reply repeats); any other path answers 200. Every request is recorded.
struct Receiver {
    base: String,
    state: Arc<ReceiverState>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(replies: Vec<Reply>) -> Receiver {
        assert!(!replies.is_empty());
        let state = Arc::new(ReceiverState {
            replies,
            received: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let router = Router::new().fallback(receive).with_state(state.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Receiver {
            base,
            state,
            server,
        }
    }

    /// The URL to give as `callback_url`.
    fn hook_url(&self) -> String {
        format!("{}/hook", self.base)
    }

    fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests arrived (generous deadline); returns all of them.
    async fn wait_for(&self, n: usize) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "receiver got {} of {n} requests",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn receive(State(st): State<Arc<ReceiverState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let path = parts.uri.path().to_string();
    let nth = {
        let mut got = st.received.lock().unwrap();
        got.push(Received {
            method: parts.method.to_string(),
            path: path.clone(),
            headers: parts.headers.clone(),
            body,
        });
        got.iter().filter(|r| r.path == "/hook").count()
    };
    if path != "/hook" {
        return StatusCode::OK.into_response();
    }
    match st.replies[(nth - 1).min(st.replies.len() - 1)] {
        Reply::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Reply::Hang(d) => {
            tokio::time::sleep(d).await;
            StatusCode::OK.into_response()
        }
        Reply::Redirect(to) => (StatusCode::FOUND, [(header::LOCATION, to)]).into_response(),
    }
}

fn id_of(task: &Value) -> String {
    task["task_id"].as_str().expect("task_id").to_string()
}

async fn webhook_secret(s: &Server) -> String {
    let a = s.get("/account").await;
    let secret = a.body["webhook_secret"]
        .as_str()
        .expect("webhook_secret")
        .to_string();
    assert!(secret.starts_with("whsec_"), "{secret}");
    secret
}

fn verify(secret: &str, r: &Received) -> Result<(), standardwebhooks::WebhookError> {
    standardwebhooks::Webhook::new(secret)?.verify(&r.body, &r.headers)
}

fn event_of(r: &Received) -> Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("webhook body is not JSON ({e}): {:?}", r.body))
}

fn webhook_id(r: &Received) -> &str {
    r.headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .expect("webhook-id header")
}

/// Waits until the task's webhook is `delivered` or `failed` and nothing more can be sent: the
/// server's work queue holds no message (none visible, in flight or delayed, so no attempt is
/// under way or scheduled). Counting the receiver's requests after this counts them all.
async fn wait_callback_settled(s: &Server, id: &str) -> Value {
    let settled = s.wait_quiescent(id, 60).await;
    assert!(
        settled["callback"]["state"].is_string(),
        "task {id} has no callback: {settled}"
    );
    settled
}

/// The callback object without its `deliveries`, after checking that the history agrees with
/// it: one entry per attempt, the last one carrying `last_status_code`.
fn without_history(cb: &Value) -> Value {
    let history = cb["deliveries"].as_array().expect("deliveries");
    assert_eq!(Some(history.len() as u64), cb["attempts"].as_u64(), "{cb}");
    if let Some(last) = history.last() {
        assert_eq!(last["status_code"], cb["last_status_code"], "{cb}");
    }
    let mut cb = cb.clone();
    cb.as_object_mut().unwrap().remove("deliveries");
    cb
}

#[tokio::test]
async fn a_completed_task_posts_one_signed_task_completed_event_and_records_delivery() {
    let r = Receiver::start(vec![Reply::Status(200)]).await;
    let s = Server::start().await;
    let secret = webhook_secret(&s).await;
    let url = r.hook_url();
    let t = s
        .submit(json!({"model": "echo", "prompt": "call me back", "callback_url": url}))
        .await;
    assert_eq!(
        t["callback"],
        json!({"url": url, "state": "pending", "attempts": 0, "last_status_code": null, "deliveries": [], "next_attempt_at": null})
    );
    let id = id_of(&t);
    assert_eq!(s.wait_terminal(&id, 30).await["status"], "completed");

    let settled = wait_callback_settled(&s, &id).await;
    assert_eq!(
        without_history(&settled["callback"]),
        json!({"url": url, "state": "delivered", "attempts": 1, "last_status_code": 200, "next_attempt_at": null})
    );
    let got = r.received();
    assert_eq!(got.len(), 1, "exactly one request: {got:?}");
    let req = &got[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/hook");
    assert_eq!(req.headers["content-type"], "application/json");
    assert!(req.headers.contains_key("webhook-timestamp"));
    assert!(!webhook_id(req).is_empty());

    let event = event_of(req);
    let keys: Vec<&str> = event
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["data", "timestamp", "type"], "{event}");
    assert_eq!(event["type"], "task.completed");
    let ts = event["timestamp"].as_str().expect("timestamp");
    assert!(
        chrono::DateTime::parse_from_rfc3339(ts).is_ok(),
        "timestamp {ts} is not RFC 3339"
    );
    let data = &event["data"];
    assert_eq!(data["task_id"], id.as_str());
    assert_eq!(data["status"], "completed");
    let result_url = data["result"]["outputs"][0]["url"]
        .as_str()
        .expect("result URL in the event");
    let text = reqwest::get(result_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        text, "call me back",
        "the event's result URL downloads the output"
    );

    verify(&secret, req).expect("the signature verifies with the account's secret");
    let mut tampered = req.clone();
    tampered.body = Bytes::from(
        String::from_utf8(req.body.to_vec())
            .unwrap()
            .replace("call me back", "call me later"),
    );
    assert_ne!(tampered.body, req.body);
    assert!(
        verify(&secret, &tampered).is_err(),
        "a tampered body fails verification"
    );
    let mut other_id = req.clone();
    other_id
        .headers
        .insert("webhook-id", "msg_forged".parse().unwrap());
    assert!(
        verify(&secret, &other_id).is_err(),
        "a changed webhook-id fails verification"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_failed_task_posts_a_task_failed_event() {
    let r = Receiver::start(vec![Reply::Status(204)]).await;
    let s = Server::start().await;
    let secret = webhook_secret(&s).await;
    let t = s
        .submit(
            json!({"model": "echo", "params": {"fail": "no luck"}, "callback_url": r.hook_url()}),
        )
        .await;
    let id = id_of(&t);
    let got = r.wait_for(1).await;
    let event = event_of(&got[0]);
    assert_eq!(event["type"], "task.failed");
    assert_eq!(event["data"]["task_id"], id.as_str());
    assert_eq!(event["data"]["status"], "failed");
    assert_eq!(
        event["data"]["error"],
        json!({"code": "generation_failed", "message": "no luck"})
    );
    assert_eq!(event["data"]["cost"]["refunded"], true);
    verify(&secret, &got[0]).expect("signature verifies");
    let settled = wait_callback_settled(&s, &id).await;
    assert_eq!(settled["callback"]["state"], "delivered");
    assert_eq!(settled["callback"]["last_status_code"], 204);
    let got = r.received();
    assert_eq!(got.len(), 1, "exactly one request: {got:?}");
    s.stop().await;
}

#[tokio::test]
async fn a_cancelled_task_posts_a_task_cancelled_event() {
    let r = Receiver::start(vec![Reply::Status(200)]).await;
    // No workers: the task stays queued and can be cancelled.
    let s = Server::start_with(|c| c.workers = 0, Hooks::default()).await;
    let secret = webhook_secret(&s).await;
    let t = s
        .submit(json!({"model": "echo", "prompt": "changed my mind", "callback_url": r.hook_url()}))
        .await;
    let id = id_of(&t);
    let c = s.post(&format!("/tasks/{id}/cancel"), &json!({})).await;
    assert_eq!(c.status, 200, "{}", c.body);
    assert_eq!(c.body["status"], "cancelled");
    // Webhooks are sent by workers: bring them up on the same data.
    let s = s.restart(|c| c.workers = 2).await;
    let got = r.wait_for(1).await;
    let event = event_of(&got[0]);
    assert_eq!(event["type"], "task.cancelled");
    assert_eq!(event["data"]["task_id"], id.as_str());
    assert_eq!(event["data"]["status"], "cancelled");
    assert_eq!(event["data"]["cost"]["refunded"], true);
    verify(&secret, &got[0]).expect("signature verifies");
    let settled = wait_callback_settled(&s, &id).await;
    assert_eq!(settled["callback"]["state"], "delivered");
    // The cancel enqueued the webhook and the task's leftover `Run` message came to a cancelled
    // task: one request, recorded once.
    assert_eq!(
        without_history(&settled["callback"])["attempts"],
        1,
        "{settled}"
    );
    let got = r.received();
    assert_eq!(got.len(), 1, "exactly one request: {got:?}");
    s.stop().await;
}

#[tokio::test]
async fn duplicate_messages_for_the_first_attempt_send_the_webhook_once() {
    // The first request is answered after a while: the duplicates are handled meanwhile.
    let r = Receiver::start(vec![
        Reply::Hang(Duration::from_secs(1)),
        Reply::Status(200),
    ])
    .await;
    let s = Server::start_with(|c| c.workers = 0, Hooks::default()).await;
    let t = s
        .submit(json!({"model": "echo", "prompt": "only once", "callback_url": r.hook_url()}))
        .await;
    let id = id_of(&t);
    let c = s.post(&format!("/tasks/{id}/cancel"), &json!({})).await;
    assert_eq!(c.status, 200, "{}", c.body);
    // Besides the cancel's message, three more for the same first attempt (a sweep, a redelivery).
    for _ in 0..3 {
        s.app()
            .queue
            .enqueue(&WorkMessage::first_delivery(&id), Duration::ZERO)
            .await
            .unwrap();
    }
    let s = s.restart(|c| c.workers = 4).await;
    let settled = wait_callback_settled(&s, &id).await;
    assert_eq!(
        without_history(&settled["callback"]),
        json!({"url": r.hook_url(), "state": "delivered", "attempts": 1, "last_status_code": 200, "next_attempt_at": null})
    );
    let got = r.received();
    assert_eq!(got.len(), 1, "exactly one request: {got:?}");
    s.stop().await;
}

#[tokio::test]
async fn a_500_is_retried_with_the_same_webhook_id_until_delivered() {
    let r = Receiver::start(vec![Reply::Status(500), Reply::Status(200)]).await;
    let s = Server::start().await;
    let secret = webhook_secret(&s).await;
    let t = s
        .submit(json!({"model": "echo", "prompt": "try again", "callback_url": r.hook_url()}))
        .await;
    let id = id_of(&t);
    let settled = wait_callback_settled(&s, &id).await;
    assert_eq!(settled["callback"]["state"], "delivered", "{settled}");
    assert_eq!(settled["callback"]["attempts"], 2);
    assert_eq!(settled["callback"]["last_status_code"], 200);
    // The delivery history on the task: both attempts, oldest first, with their answers.
    let history = settled["callback"]["deliveries"]
        .as_array()
        .expect("deliveries");
    let codes: Vec<_> = history.iter().map(|d| d["status_code"].clone()).collect();
    assert_eq!(codes, vec![json!(500), json!(200)], "{settled}");
    assert!(
        history
            .iter()
            .all(|d| d["at"].is_string() && d["error"].is_null())
    );
    let got = r.received();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        webhook_id(&got[0]),
        webhook_id(&got[1]),
        "webhook-id stays the same across retries"
    );
    for req in &got {
        verify(&secret, req).expect("every attempt is signed");
        assert_eq!(event_of(req)["type"], "task.completed");
    }
    s.stop().await;
}

#[tokio::test]
async fn a_410_stops_delivery_after_one_attempt() {
    let r = Receiver::start(vec![Reply::Status(410)]).await;
    let s = Server::start().await;
    let t = s
        .submit(json!({"model": "echo", "prompt": "gone", "callback_url": r.hook_url()}))
        .await;
    let id = id_of(&t);
    let settled = wait_callback_settled(&s, &id).await;
    assert_eq!(settled["callback"]["state"], "failed", "{settled}");
    assert_eq!(settled["callback"]["attempts"], 1);
    assert_eq!(settled["callback"]["last_status_code"], 410);
    assert_eq!(r.received().len(), 1, "no request after the 410");
    let later = s.get(&format!("/tasks/{id}")).await;
    assert_eq!(later.body["callback"], settled["callback"]);
    s.stop().await;
}

#[tokio::test]
async fn a_receiver_that_always_fails_gets_three_attempts_then_the_callback_fails() {
    let r = Receiver::start(vec![Reply::Status(500)]).await;
    let s = Server::start().await;
    let t = s
        .submit(json!({"model": "echo", "prompt": "never", "callback_url": r.hook_url()}))
        .await;
    let id = id_of(&t);
    let settled = wait_callback_settled(&s, &id).await;
    assert_eq!(
        without_history(&settled["callback"]),
        json!({"url": r.hook_url(), "state": "failed", "attempts": 3, "last_status_code": 500, "next_attempt_at": null})
    );
    let got = r.received();
    assert_eq!(
        got.len(),
        3,
        "the first attempt and the two scheduled retries: {got:?}"
    );
    assert!(got.iter().all(|g| webhook_id(g) == webhook_id(&got[0])));
    assert_eq!(
        settled["status"], "completed",
        "webhook failures do not change the task"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_receiver_that_hangs_past_the_timeout_is_retried_and_does_not_stall_the_worker() {
    // The first two attempts hang far longer than the 2 s timeout; the third is answered.
    let hang = Duration::from_secs(120);
    let r = Receiver::start(vec![
        Reply::Hang(hang),
        Reply::Hang(hang),
        Reply::Status(200),
    ])
    .await;
    // One worker: if a hanging receiver held it, nothing else would run.
    let s = Server::start_with(|c| c.workers = 1, Hooks::default()).await;
    let t = s
        .submit(json!({"model": "echo", "prompt": "slow receiver", "callback_url": r.hook_url()}))
        .await;
    let id = id_of(&t);
    r.wait_for(1).await;
    let other = s
        .submit(json!({"model": "echo", "prompt": "meanwhile"}))
        .await;
    let other_done = s.wait_terminal(&id_of(&other), 60).await;
    assert_eq!(
        other_done["status"], "completed",
        "a task submitted while the receiver hangs completes"
    );

    let settled = wait_callback_settled(&s, &id).await;
    assert_eq!(settled["callback"]["state"], "delivered", "{settled}");
    assert_eq!(
        settled["callback"]["attempts"], 3,
        "both timed-out attempts count"
    );
    assert_eq!(settled["callback"]["last_status_code"], 200);
    let got = r.received();
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.iter().all(|g| webhook_id(g) == webhook_id(&got[0])));
    s.stop().await;
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let r = Receiver::start(vec![Reply::Redirect("/elsewhere")]).await;
    let s = Server::start().await;
    let t = s
        .submit(json!({"model": "echo", "prompt": "moved", "callback_url": r.hook_url()}))
        .await;
    let id = id_of(&t);
    let settled = wait_callback_settled(&s, &id).await;
    assert_eq!(settled["callback"]["state"], "failed", "{settled}");
    assert_eq!(settled["callback"]["last_status_code"], 302);
    assert_eq!(
        settled["callback"]["attempts"], 3,
        "a redirect is a failed attempt, retried"
    );
    let got = r.received();
    assert!(
        got.iter().all(|g| g.path == "/hook"),
        "the redirect target was requested: {got:?}"
    );
    assert_eq!(got.len(), 3);
    s.stop().await;
}

#[tokio::test]
async fn loopback_callback_urls_are_refused_when_private_targets_are_not_allowed() {
    let r = Receiver::start(vec![Reply::Status(200)]).await;
    let s = Server::start_with(|c| c.core.callback_allow_private = false, Hooks::default()).await;
    let before = s.credits().await;
    for url in [r.hook_url(), r.hook_url().replace("http://", "https://")] {
        let a = s
            .post(
                "/tasks",
                &json!({"model": "echo", "prompt": "x", "callback_url": url}),
            )
            .await;
        let e = a.assert_error(400, "invalid_request");
        assert_eq!(e["param"], "callback_url", "{url}: {}", a.body);
    }
    assert_eq!(s.credits().await, before, "nothing was debited");
    let list = s.get("/tasks").await;
    assert_eq!(list.body["data"], json!([]), "nothing was created");
    assert!(r.received().is_empty());
    s.stop().await;
}

/// A work queue that records what is enqueued, with its delay.
struct Recording {
    inner: Arc<dyn tasklane_core::ports::WorkQueue>,
    sent: Arc<Mutex<Vec<(WorkMessage, Duration)>>>,
}

#[async_trait::async_trait]
impl tasklane_core::ports::WorkQueue for Recording {
    async fn enqueue(
        &self,
        message: &WorkMessage,
        delay: Duration,
    ) -> tasklane_core::ports::PortResult<()> {
        self.sent.lock().unwrap().push((message.clone(), delay));
        self.inner.enqueue(message, delay).await
    }
}

#[tokio::test]
async fn a_retry_further_off_than_the_queue_can_delay_is_sent_by_the_sweeper_not_by_queue_hops() {
    let r = Receiver::start(vec![Reply::Status(500), Reply::Status(200)]).await;
    let sent = Arc::new(Mutex::new(Vec::new()));
    let log = sent.clone();
    let hooks = Hooks {
        store: None,
        queue: Some(Box::new(move |inner| {
            Arc::new(Recording { inner, sent: log })
        })),
    };
    // The queue delays at most 1 s; the retry is due 3 s after the first attempt.
    let s = Server::start_with(
        |c| {
            c.core.max_queue_delay = Duration::from_secs(1);
            c.core.callback_retry_schedule = vec![Duration::from_secs(3)];
            c.core.sweep_after = Duration::from_secs(1);
            c.core.sweep_interval = Duration::from_millis(200);
        },
        hooks,
    )
    .await;
    let t = s
        .submit(json!({"model": "echo", "prompt": "later", "callback_url": r.hook_url()}))
        .await;
    let id = id_of(&t);
    r.wait_for(1).await;
    // The failed attempt is recorded with the time the retry is due.
    let pending = loop {
        let v = s.get(&format!("/tasks/{id}")).await.body;
        if v["callback"]["attempts"] == 1 {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(pending["callback"]["state"], "pending", "{pending}");
    let tried: chrono::DateTime<chrono::Utc> = pending["callback"]["deliveries"][0]["at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let due: chrono::DateTime<chrono::Utc> = pending["callback"]["next_attempt_at"]
        .as_str()
        .expect("next_attempt_at")
        .parse()
        .unwrap();
    assert_eq!(due - tried, chrono::TimeDelta::seconds(3));

    let settled = wait_callback_settled(&s, &id).await;
    assert_eq!(settled["callback"]["state"], "delivered", "{settled}");
    assert_eq!(settled["callback"]["next_attempt_at"], Value::Null);
    let second: chrono::DateTime<chrono::Utc> = settled["callback"]["deliveries"][1]["at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        second >= due,
        "the retry came before it was due: {second} < {due}"
    );
    // No Deliver message was delayed or parked in the queue for the retry: the retry's message
    // came from the sweeper when it was due. (On a slow machine the sweeper may also have sent
    // a duplicate of the first attempt's; duplicates send nothing twice.)
    let delivers: Vec<(WorkMessage, Duration)> = sent
        .lock()
        .unwrap()
        .iter()
        .filter(|(m, _)| matches!(m, WorkMessage::Deliver { .. }))
        .cloned()
        .collect();
    assert!(delivers.iter().all(|(_, d)| d.is_zero()), "{delivers:?}");
    let retries: Vec<_> = delivers
        .iter()
        .filter(|(m, _)| matches!(m, WorkMessage::Deliver { attempt: 1, .. }))
        .collect();
    assert!(!retries.is_empty(), "{delivers:?}");
    assert!(
        retries.iter().all(|(m, _)| matches!(
            m,
            WorkMessage::Deliver {
                not_before: None,
                ..
            }
        )),
        "{delivers:?}"
    );
    assert_eq!(r.received().len(), 2, "two attempts were sent");
    s.stop().await;
}

#[tokio::test]
async fn receivers_that_hang_hold_delivery_workers_only_and_tasks_keep_running() {
    // Every attempt hangs far past the test; the webhook timeout is longer still.
    let r = Receiver::start(vec![Reply::Hang(Duration::from_secs(300))]).await;
    let s = Server::start_with(
        |c| {
            c.workers = 1;
            c.delivery_workers = 2;
            c.core.callback_timeout = Duration::from_secs(120);
        },
        Hooks::default(),
    )
    .await;
    let mut hooked = Vec::new();
    for i in 0..10 {
        let t = s
            .submit(json!({"model": "echo", "prompt": format!("hooked {i}"), "callback_url": r.hook_url()}))
            .await;
        hooked.push(id_of(&t));
    }
    for id in &hooked {
        assert_eq!(s.wait_terminal(id, 60).await["status"], "completed");
    }
    // Both delivery workers now wait on the receiver.
    r.wait_for(2).await;
    // Generation goes on: the one task worker is free.
    for i in 0..5 {
        let t = s
            .submit(json!({"model": "echo", "prompt": format!("meanwhile {i}")}))
            .await;
        assert_eq!(s.wait_terminal(&id_of(&t), 60).await["status"], "completed");
    }
    assert_eq!(
        r.received().len(),
        2,
        "only the two delivery workers ever reached the receiver"
    );
    let first = s.get(&format!("/tasks/{}", hooked[0])).await.body;
    assert_eq!(first["callback"]["state"], "pending", "{first}");
    s.stop().await;
}
