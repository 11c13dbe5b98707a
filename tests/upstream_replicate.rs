//! Models served by Replicate, through the local server and a catalog naming them, against
//! the fake Replicate of `tasklane_testkit::replicate` on loopback:
//!
//! - success: the output file is downloaded with the bearer token (the fake refuses it
//!   without) into tasklane's blob store and served by tasklane's own URL; progress from the
//!   logs shows while it runs; the official-model, version and deployment routes all work;
//! - a failed prediction: `generation_failed` with Replicate's message, refunded; an output
//!   Replicate already removed (`data_removed`) fails the same way, saying so;
//! - refusals (401 wrong token, 422 invalid version, 422 input validation): the task fails with
//!   Replicate's problem text, and the token shows nowhere;
//! - rate limited creates (429, with and without `Retry-After`): tasks wait queued, none fail;
//!   a 500 at create is retried and creates one prediction;
//! - every webhook lost: the checks still end the task;
//! - forged callbacks (no token, no or a wrong signature, a stale timestamp, a validly signed
//!   body that lies) change nothing;
//! - a hostile output URL on a link-local literal address: `output_rejected`, refunded;
//! - a 12 MiB output (more than one S3 part) is streamed into the blob store and served
//!   byte-identical; one over the model's cap (no Content-Length) or broken off mid-body fails
//!   with `output_rejected`, refunded, and stores nothing;
//! - a prediction outliving the model's timeout: cancelled on Replicate, `timeout`, refunded.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Server, answer, task_id as id};
use serde_json::{Value, json};
use tasklane_local::{Hooks, LocalConfig};
use tasklane_testkit::replicate::{FakeReplicate, Lifecycle};

/// A token the fake does not accept, for the `wrong-token` model.
const WRONG_TOKEN: &str = "r8_WrongTokenForTheTestsOnly0123456789";

/// A fresh environment variable name holding `value`: catalogs name credentials by variable,
/// and tests in this process run at once, so every server gets its own.
fn env_var(what: &str, value: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "TASKLANE_TEST_REPLICATE_{what}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    // SAFETY: the name is new to this process, so no other thread reads it while it is set.
    unsafe { std::env::set_var(&name, value) };
    name
}

/// A catalog of Replicate models on `fake`, timing out after `timeout` seconds:
/// `flux` (an official model), `hello` (a version), `deployed` (a deployment),
/// `no-prompt` (sends no prompt, which the fake's model requires), `old-version` (a version
/// the fake does not know) and `wrong-token` (a token the fake refuses).
fn catalog(fake: &FakeReplicate, timeout: u64) -> String {
    let token = env_var("TOKEN", &fake.token);
    let secret = env_var("SECRET", &fake.webhook_secret);
    let wrong = env_var("WRONG", WRONG_TOKEN);
    let version = FakeReplicate::VERSION;
    let zeros = "0".repeat(64);
    let model = |name: &str, upstream: &str, key: &str, prompt: bool| {
        format!(
            r#"
[models.{name}]
provider = "replicate"
upstream_model = "{upstream}"
endpoint = "{url}"
api_key_env = "{key}"
webhook_secret_env = "{secret}"
prompt = {{ required = {prompt} }}
price = {{ per_task = 5 }}
timeout = {timeout}
trusted_hosts = ["127.0.0.1"]
"#,
            url = fake.url
        )
    };
    [
        model("flux", "black-forest-labs/flux-schnell", &token, true),
        model(
            "hello",
            &format!("replicate/hello-world:{version}"),
            &token,
            true,
        ),
        model("deployed", "deployments/acme/house-style", &token, true),
        model("no-prompt", "black-forest-labs/flux-schnell", &token, false),
        model("old-version", &zeros, &token, true),
        model(
            "wrong-token",
            "black-forest-labs/flux-schnell",
            &wrong,
            true,
        ),
    ]
    .concat()
}

/// A server serving [`catalog`], with fast checks (a lost webhook is noticed within a second).
async fn start(fake: &FakeReplicate, timeout: u64, f: impl FnOnce(&mut LocalConfig)) -> Server {
    Server::start_with_catalog(&catalog(fake, timeout), f, Hooks::default()).await
}

/// The Replicate prediction id tasklane recorded for `task_id`.
async fn prediction_id(s: &Server, task_id: &str) -> Option<String> {
    s.app()
        .store
        .task(task_id)
        .await
        .unwrap()
        .unwrap()
        .upstream
        .and_then(|u| u.id)
}

/// Asserts that neither the fake's token nor the wrong one shows in `text`.
fn assert_no_token(fake: &FakeReplicate, text: &str) {
    assert!(!text.contains(&fake.token), "the token leaked: {text}");
    assert!(!text.contains(WRONG_TOKEN), "a token leaked: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicate_model_runs_and_its_output_is_fetched_with_the_token_and_served_by_tasklane() {
    let fake = FakeReplicate::start().await;
    fake.set_lifecycle(Lifecycle {
        starting: Duration::from_millis(200),
        step: Duration::from_millis(300),
        steps: 8,
    });
    let s = start(&fake, 60, |_| {}).await;
    let before = s.credits().await;
    let task = s
        .submit(json!({"model": "flux", "prompt": "a red fox", "params": {}}))
        .await;
    let id = id(&task);
    let running = s
        .wait_for(&id, 20, "progress from Replicate's logs", |t| {
            t["status"] == "processing" && t["progress"].as_u64().unwrap_or(0) > 0
        })
        .await;
    assert!(
        running["logs"].as_str().unwrap_or("").contains("progress:"),
        "{running}"
    );
    let done = s.wait_terminal(&id, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    let out = &done["result"]["outputs"][0];
    assert_eq!(out["content_type"], "image/png", "{done}");
    let url = out["url"].as_str().unwrap();
    assert!(!url.contains(&fake.url), "served by tasklane: {url}");
    let file = s.client.get(url).send().await.unwrap();
    assert_eq!(file.status(), 200);
    assert_eq!(
        file.bytes().await.unwrap().to_vec(),
        FakeReplicate::file_bytes("a red fox")
    );
    // The file needs the token: tasklane sent it (the fake counts only authorized downloads).
    assert_eq!(fake.file_downloads(), 1);
    assert_eq!(fake.unauthorized(), 0);
    let predictions = fake.predictions();
    assert_eq!(predictions.len(), 1, "created once");
    assert_eq!(predictions[0]["model"], "black-forest-labs/flux-schnell");
    assert_eq!(predictions[0]["input"], json!({"prompt": "a red fox"}));
    assert_eq!(
        prediction_id(&s, &id).await.as_deref(),
        predictions[0]["id"].as_str()
    );
    // The fake's signed webhooks reached tasklane and were accepted.
    let answers = fake.webhook_answers();
    assert!(!answers.is_empty(), "webhooks were sent");
    assert!(
        answers.iter().all(|(_, status)| *status == 200),
        "{answers:?}"
    );
    assert_eq!(s.credits().await, before - 5, "charged once, not refunded");
    assert_no_token(&fake, &done.to_string());
    assert_no_token(&fake, &s.get("/models").await.body.to_string());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_version_and_deployment_routes_run_their_models() {
    let fake = FakeReplicate::start().await;
    let s = start(&fake, 60, |_| {}).await;
    let a = id(&s.submit(json!({"model": "hello", "prompt": "v"})).await);
    let b = id(&s.submit(json!({"model": "deployed", "prompt": "d"})).await);
    for t in [&a, &b] {
        let done = s.wait_terminal(t, 30).await;
        assert_eq!(done["status"], "completed", "{done}");
    }
    let version = fake
        .prediction(&prediction_id(&s, &a).await.unwrap())
        .unwrap();
    assert_eq!(version["version"], FakeReplicate::VERSION, "{version}");
    assert_eq!(version["model"], FakeReplicate::VERSION_MODEL);
    let deployed = fake
        .prediction(&prediction_id(&s, &b).await.unwrap())
        .unwrap();
    assert_eq!(deployed["deployment"], "acme/house-style", "{deployed}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_prediction_fails_the_task_with_replicates_message_and_a_refund() {
    let fake = FakeReplicate::start().await;
    let s = start(&fake, 60, |_| {}).await;
    let before = s.credits().await;
    let task = s
        .submit(json!({"model": "flux", "prompt": "please fail"}))
        .await;
    let done = s.wait_terminal(&id(&task), 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "generation_failed");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("the model refused the prompt: \"please fail\""),
        "{message}"
    );
    assert_eq!(done["cost"]["refunded"], true);
    assert_eq!(s.credits().await, before);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_replicate_already_removed_fails_the_task_saying_so() {
    let fake = FakeReplicate::start().await;
    // Every prediction's hour of retention is over by the time it completes.
    fake.advance_clock(Duration::from_secs(2 * 3600));
    fake.drop_webhooks(true);
    let s = start(&fake, 60, |_| {}).await;
    let before = s.credits().await;
    let task = s
        .submit(json!({"model": "flux", "prompt": "too late"}))
        .await;
    let done = s.wait_terminal(&id(&task), 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "generation_failed");
    assert!(
        done["error"]["message"]
            .as_str()
            .unwrap()
            .contains("data_removed"),
        "{done}"
    );
    assert_eq!(s.credits().await, before);
    assert_eq!(fake.file_downloads(), 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_fail_the_task_with_replicates_problem_and_never_show_the_token() {
    let fake = FakeReplicate::start().await;
    let s = start(&fake, 60, |_| {}).await;
    let before = s.credits().await;
    let cases = [
        (
            json!({"model": "wrong-token", "prompt": "x"}),
            "Replicate refused the request (HTTP 401): Unauthenticated: You did not pass an authentication token",
        ),
        (
            json!({"model": "old-version", "prompt": "x"}),
            "Replicate refused the request (HTTP 422): Invalid version or not permitted: The specified version does not exist (or perhaps you don't have permission to use it?)",
        ),
        (
            json!({"model": "no-prompt"}),
            "Replicate refused the request (HTTP 422): Input validation failed: input: prompt is required",
        ),
    ];
    for (body, message) in cases {
        let task = s.submit(body.clone()).await;
        let done = s.wait_terminal(&id(&task), 30).await;
        assert_eq!(done["status"], "failed", "{body}: {done}");
        assert_eq!(done["error"]["code"], "generation_failed", "{done}");
        assert_eq!(done["error"]["message"], message, "{done}");
        assert_no_token(&fake, &done.to_string());
    }
    assert_eq!(fake.unauthorized(), 1, "the wrong token was sent once");
    assert_eq!(fake.created(), 0);
    assert_eq!(s.credits().await, before, "all refunded");
    let list = s.get("/tasks?limit=100").await;
    assert_no_token(&fake, &list.body.to_string());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_creates_keep_tasks_queued_until_they_run_and_none_fail() {
    let fake = FakeReplicate::start().await;
    let s = start(&fake, 60, |c| c.workers = 2).await;
    fake.throttle_creates(usize::MAX, Some("1"));
    let ids = [
        id(&s.submit(json!({"model": "flux", "prompt": "first"})).await),
        id(&s.submit(json!({"model": "flux", "prompt": "second"})).await),
    ];
    // Throttled with Retry-After, then with only the detail's "resets in ~30s": each task is
    // refused several times and waits queued.
    for retry_after in [Some("1"), None] {
        fake.throttle_creates(usize::MAX, retry_after);
        let seen = fake.throttled();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while fake.throttled() < seen + 4 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "creates stopped coming: {} throttled",
                fake.throttled()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for t in &ids {
            let queued = s
                .wait_for(t, 10, "queued", |t| t["status"] == "queued")
                .await;
            assert_eq!(queued["error"], Value::Null, "{queued}");
        }
    }
    assert_eq!(fake.created(), 0);
    fake.throttle_creates(0, None);
    for t in &ids {
        let done = s.wait_terminal(t, 30).await;
        assert_eq!(done["status"], "completed", "{done}");
    }
    assert_eq!(fake.created(), 2, "each task created one prediction");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_at_create_is_retried_and_creates_one_prediction() {
    let fake = FakeReplicate::start().await;
    let s = start(&fake, 60, |_| {}).await;
    fake.fail_next(1);
    let task = s.submit(json!({"model": "flux", "prompt": "again"})).await;
    let done = s.wait_terminal(&id(&task), 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(fake.creates(), 2, "the 500 and the retry");
    assert_eq!(fake.created(), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_webhook_lost_the_checks_still_complete_the_task() {
    let fake = FakeReplicate::start().await;
    fake.drop_webhooks(true);
    let s = start(&fake, 60, |_| {}).await;
    let task = s
        .submit(json!({"model": "flux", "prompt": "nobody calls"}))
        .await;
    let done = s.wait_terminal(&id(&task), 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"]["outputs"][0]["content_type"], "image/png");
    assert_eq!(fake.webhooks_sent(), 0);
    assert!(
        fake.webhooks_dropped() >= 1,
        "the completed webhook was lost"
    );
    s.stop().await;
}

/// Standard Webhooks headers for `body` signed with `secret` at `ts`.
fn signed(
    req: reqwest::RequestBuilder,
    secret: &str,
    ts: i64,
    body: &[u8],
) -> reqwest::RequestBuilder {
    let msg = "msg_forged";
    req.header("webhook-id", msg)
        .header("webhook-timestamp", ts.to_string())
        .header(
            "webhook-signature",
            tasklane_core::webhook::sign(secret, msg, ts, body),
        )
        .header("content-type", "application/json")
        .body(body.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_callbacks_change_nothing() {
    let fake = FakeReplicate::start().await;
    fake.set_lifecycle(Lifecycle {
        starting: Duration::from_millis(200),
        step: Duration::from_millis(300),
        steps: 6,
    });
    let s = start(&fake, 60, |_| {}).await;
    let task = s
        .submit(json!({"model": "flux", "prompt": "the real one"}))
        .await;
    let task_id = id(&task);
    s.wait_for(&task_id, 20, "started on Replicate", |t| {
        t["status"] == "processing"
    })
    .await;
    let pid = loop {
        if let Some(p) = prediction_id(&s, &task_id).await {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let token = s
        .app()
        .store
        .task(&task_id)
        .await
        .unwrap()
        .unwrap()
        .upstream
        .unwrap()
        .token;
    let forged = json!({"id": pid, "status": "succeeded", "output": "data:text/plain;base64,Zm9yZ2Vk", "logs": ""});
    let body = forged.to_string().into_bytes();
    let route = s.url(&format!("/upstream/replicate/{task_id}"));
    let with_token = format!("{route}?token={token}");
    let now = chrono::Utc::now().timestamp();
    // Without the task's token, even signed correctly: 401.
    let a = answer(signed(
        s.client.post(&route),
        &fake.webhook_secret,
        now,
        &body,
    ))
    .await;
    assert_eq!(a.status, 401, "{}", a.body);
    // With it, but unsigned, signed with another secret, or signed 10 minutes ago: 400.
    let unsigned = s
        .client
        .post(&with_token)
        .header("content-type", "application/json")
        .body(body.clone());
    let other_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    for (what, req) in [
        ("unsigned", unsigned),
        (
            "another secret",
            signed(s.client.post(&with_token), other_secret, now, &body),
        ),
        (
            "stale",
            signed(
                s.client.post(&with_token),
                &fake.webhook_secret,
                now - 600,
                &body,
            ),
        ),
    ] {
        let a = answer(req).await;
        assert_eq!(a.status, 400, "{what}: {}", a.body);
        assert_eq!(a.body["error"]["code"], "invalid_request", "{what}");
        assert_no_token(&fake, &a.body.to_string());
    }
    // Token and signature right, the body a lie: it only prompts a check of the real state.
    let a = answer(signed(
        s.client.post(&with_token),
        &fake.webhook_secret,
        now,
        &body,
    ))
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let now_task = s.get(&format!("/tasks/{task_id}")).await.body;
    assert_ne!(now_task["status"], "completed", "{now_task}");
    let done = s.wait_terminal(&task_id, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"]["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(
        done["result"]["outputs"][0]["content_type"], "image/png",
        "the real output, not the forged text: {done}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_output_url_is_refused_before_connecting_and_refunded() {
    let fake = FakeReplicate::start().await;
    fake.set_output(Some(json!("http://169.254.169.254/latest/meta-data/")));
    let s = start(&fake, 60, |_| {}).await;
    let before = s.credits().await;
    let task = s
        .submit(json!({"model": "flux", "prompt": "metadata please"}))
        .await;
    let done = s.wait_terminal(&id(&task), 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "output_rejected", "{done}");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("non-public address (169.254.169.254)"),
        "refused for its address, before any connection: {message}"
    );
    assert_eq!(s.credits().await, before, "refunded");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prediction_past_the_timeout_is_cancelled_on_replicate_and_refunded() {
    let fake = FakeReplicate::start().await;
    let s = start(&fake, 2, |_| {}).await;
    let before = s.credits().await;
    let task = s
        .submit(json!({"model": "flux", "prompt": "hang forever"}))
        .await;
    let task_id = id(&task);
    let done = s.wait_terminal(&task_id, 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "timeout", "{done}");
    assert_eq!(s.credits().await, before, "refunded");
    assert!(fake.cancels() >= 1, "a cancel reached Replicate");
    let pid = prediction_id(&s, &task_id).await.unwrap();
    assert_eq!(fake.prediction(&pid).unwrap()["status"], "canceled");
    s.stop().await;
}

/// A file host on loopback answering every GET with `body` as `video/mp4`, in pieces of
/// 64 KiB: with `length` it announces the body's Content-Length (without, the body ends when
/// the connection closes); only the first `send` bytes are sent before it closes.
async fn file_host(body: Vec<u8>, length: bool, send: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = std::sync::Arc::new(body);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let mut answer =
                    "HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nConnection: close\r\n"
                        .to_string();
                if length {
                    answer += &format!("Content-Length: {}\r\n", body.len());
                }
                answer += "\r\n";
                if conn.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                for piece in body[..send].chunks(64 * 1024) {
                    if conn.write_all(piece).await.is_err() {
                        return;
                    }
                }
                let _ = conn.shutdown().await;
            });
        }
    });
    format!("http://{addr}/video.mp4")
}

/// `len` bytes that differ from one position to the next (a misplaced piece shows).
fn video(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 4099) as u8).collect()
}

/// A server whose catalog has `big` (the default output cap) and `capped` (outputs of at most
/// 9 MiB), both Replicate models on `fake`.
async fn start_with_caps(fake: &FakeReplicate) -> Server {
    let token = env_var("TOKEN", &fake.token);
    let secret = env_var("SECRET", &fake.webhook_secret);
    let model = |name: &str, cap: &str| {
        format!(
            r#"
[models.{name}]
provider = "replicate"
upstream_model = "black-forest-labs/flux-schnell"
endpoint = "{url}"
api_key_env = "{token}"
webhook_secret_env = "{secret}"
price = {{ per_task = 5 }}
timeout = 60
trusted_hosts = ["127.0.0.1"]
{cap}
"#,
            url = fake.url
        )
    };
    let text = model("big", "") + &model("capped", "max_output_bytes = 9437184");
    Server::start_with_catalog(&text, |_| {}, Hooks::default()).await
}

/// Asserts that task `task_id` stored no first output, and (on the results folder) left no
/// temporary file behind.
async fn assert_no_output(s: &Server, task_id: &str) {
    let signed = s
        .app()
        .blobs
        .presign_get(
            &format!("tasks/{task_id}/output-0.mp4"),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let status = s.client.get(&signed.url).send().await.unwrap().status();
    // Locally a signed URL of an output that is not stored answers `410 expired`; on AWS,
    // signed outside any request (no public URL to sign under), it is S3's own URL: 404.
    let not_stored = if common::on_aws() { 404 } else { 410 };
    assert_eq!(status, not_stored, "nothing stored for {task_id}");
    let folder = s.dir.join("results/tasks").join(task_id);
    if let Ok(entries) = std::fs::read_dir(&folder) {
        let left: Vec<_> = entries.map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "left in {}: {left:?}", folder.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_12_mib_output_is_streamed_into_the_blob_store_and_served_byte_identical() {
    let fake = FakeReplicate::start().await;
    // More than one S3 part (8 MiB) on the AWS pass; the body's length is announced.
    let body = video(12 * 1024 * 1024 + 3);
    fake.set_output(Some(json!([
        file_host(body.clone(), true, body.len()).await
    ])));
    let s = start_with_caps(&fake).await;
    let task = s
        .submit(json!({"model": "big", "prompt": "a long shot"}))
        .await;
    let done = s.wait_terminal(&id(&task), 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    let out = &done["result"]["outputs"][0];
    assert_eq!(out["content_type"], "video/mp4", "{done}");
    assert_eq!(out["size_bytes"], body.len() as u64, "{done}");
    let file = s
        .client
        .get(out["url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(file.status(), 200);
    let served = file.bytes().await.unwrap();
    assert_eq!(served.len(), body.len());
    assert!(
        served[..] == body[..],
        "the served output differs from the upstream's"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_over_the_cap_or_broken_off_mid_body_fails_output_rejected_and_stores_nothing() {
    let fake = FakeReplicate::start().await;
    let s = start_with_caps(&fake).await;
    let before = s.credits().await;
    let body = video(12 * 1024 * 1024);

    // No Content-Length: the cap is only noticed while streaming, past one S3 part.
    fake.set_output(Some(json!([
        file_host(body.clone(), false, body.len()).await
    ])));
    let capped = id(&s
        .submit(json!({"model": "capped", "prompt": "too long"}))
        .await);
    let done = s.wait_terminal(&capped, 60).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "output_rejected", "{done}");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("larger than the model's limit of 9437184 bytes"),
        "{message}"
    );
    assert_no_output(&s, &capped).await;

    // The connection closes after 10 of the announced 12 MiB.
    fake.set_output(Some(json!([file_host(
        body.clone(),
        true,
        10 * 1024 * 1024
    )
    .await])));
    let broken = id(&s
        .submit(json!({"model": "big", "prompt": "cut short"}))
        .await);
    let done = s.wait_terminal(&broken, 60).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "output_rejected", "{done}");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(message.contains("broke off"), "{message}");
    assert_no_output(&s, &broken).await;

    assert_eq!(s.credits().await, before, "both refunded");
    s.stop().await;
}
