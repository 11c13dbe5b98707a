//! Models served by fal.ai's queue API, through the local server and a catalog naming them,
//! against the fake fal of `tasklane_testkit::fal` on loopback:
//!
//! - success: the request is submitted on the app's path (subpath included) with the task's
//!   input and tasklane's callback as `fal_webhook`, progress from fal's logs shows while it
//!   runs, the output file is downloaded (without the key: fal's CDN is public) into
//!   tasklane's blob store and served by tasklane's own URL; every file of a result is kept,
//!   in order;
//! - a failed request (a model error's `detail[]`, a validation error, a request error):
//!   `generation_failed` with fal's message, refunded;
//! - refusals (401 on a wrong key, a 504 user timeout): the task fails at once, the submit is
//!   not retried, and the key shows nowhere;
//! - rate limited (429) and unavailable (nginx 503) submits: tasks wait queued, then complete;
//! - every webhook lost: the checks still end the task;
//! - a signed webhook makes tasklane check at once: with checks 5 minutes apart, tasks end
//!   within seconds (a success whose webhook has `payload_error`, and a failure);
//! - forged webhooks (a body that is not the one signed, a key fal does not publish, a
//!   timestamp 10 minutes off, no token) are refused and change nothing; fal's own webhooks
//!   signed with a skewed clock are refused too, and the checks end the task;
//! - a request outliving the model's timeout: cancelled on fal, `timeout`, refunded.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Server, answer, task_id as id};
use serde_json::{Value, json};
use tasklane_local::{Hooks, LocalConfig};
use tasklane_testkit::fal::{FakeFal, Lifecycle, POLICY_MESSAGE};

/// A key the fake does not accept, for the `wrong-key` model.
const WRONG_KEY: &str = "00000000-0000-4000-a000-000000000000:wrongsecretforthetestsonly";

/// A fresh environment variable name holding `value`: catalogs name credentials by variable,
/// and tests in this process run at once, so every server gets its own.
fn env_var(what: &str, value: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "TASKLANE_TEST_FAL_{what}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    // SAFETY: the name is new to this process, so no other thread reads it while it is set.
    unsafe { std::env::set_var(&name, value) };
    name
}

/// A catalog of fal models on `fake`, timing out after `timeout` seconds: `flux` (an app with
/// a subpath), `no-prompt` (sends no prompt, which the fake's app requires), `clip` (a video
/// app taking a duration) and `wrong-key` (a key the fake refuses).
fn catalog(fake: &FakeFal, timeout: u64) -> String {
    let key = env_var("KEY", &fake.key);
    let wrong = env_var("WRONG", WRONG_KEY);
    let model = |name: &str, upstream: &str, key: &str, extra: &str| {
        format!(
            r#"
[models.{name}]
provider = "fal"
upstream_model = "{upstream}"
endpoint = "{url}"
jwks_url = "{jwks}"
api_key_env = "{key}"
timeout = {timeout}
trusted_hosts = ["127.0.0.1"]
{extra}
"#,
            url = fake.url,
            jwks = fake.jwks_url,
        )
    };
    [
        model(
            "flux",
            "fal-ai/flux/dev",
            &key,
            "prompt = { required = true }\nprice = { per_task = 5 }",
        ),
        model(
            "no-prompt",
            "fal-ai/flux/dev",
            &key,
            "prompt = { required = false }\nprice = { per_task = 5 }",
        ),
        model(
            "clip",
            "fal-ai/kling-video/v2/master/text-to-video",
            &key,
            "prompt = { required = true }\nduration = { min = 5, max = 10, default = 5 }\n\
             price = { per_second = 2 }",
        ),
        model(
            "wrong-key",
            "fal-ai/flux/dev",
            &wrong,
            "prompt = { required = true }\nprice = { per_task = 5 }",
        ),
    ]
    .concat()
}

/// A server serving [`catalog`], with fast checks (a lost webhook is noticed within a second)
/// unless `f` says otherwise.
async fn start(fake: &FakeFal, timeout: u64, f: impl FnOnce(&mut LocalConfig)) -> Server {
    Server::start_with_catalog(&catalog(fake, timeout), f, Hooks::default()).await
}

/// The run id tasklane recorded for `task_id` (`{owner}/{app}/requests/{request_id}`).
async fn run_id(s: &Server, task_id: &str) -> Option<String> {
    s.app()
        .store
        .task(task_id)
        .await
        .unwrap()
        .unwrap()
        .upstream
        .and_then(|u| u.id)
}

/// The fal request id of `task_id`'s run, once it is recorded.
async fn request_id(s: &Server, task_id: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(run) = run_id(s, task_id).await {
            return run.rsplit('/').next().unwrap().to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no run recorded for {task_id}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that neither the fake's key (nor its secret half) nor the wrong one shows in `text`.
fn assert_no_key(fake: &FakeFal, text: &str) {
    let secret = fake.key.split_once(':').unwrap().1;
    assert!(!text.contains(&fake.key), "the key leaked: {text}");
    assert!(!text.contains(secret), "the key's secret leaked: {text}");
    assert!(!text.contains(WRONG_KEY), "a key leaked: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fal_model_runs_and_its_output_file_is_downloaded_and_served_by_tasklane() {
    let fake = FakeFal::start().await;
    fake.set_lifecycle(Lifecycle {
        queued: Duration::from_millis(300),
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
        .wait_for(&id, 20, "progress from fal's logs", |t| {
            t["status"] == "processing" && t["progress"].as_u64().unwrap_or(0) > 0
        })
        .await;
    assert!(
        running["logs"]
            .as_str()
            .unwrap_or("")
            .contains("Generating:"),
        "{running}"
    );
    let done = s.wait_terminal(&id, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"]["outputs"].as_array().unwrap().len(), 1);
    let out = &done["result"]["outputs"][0];
    assert_eq!(out["content_type"], "image/png", "{done}");
    let url = out["url"].as_str().unwrap();
    assert!(!url.contains(&fake.url), "served by tasklane: {url}");
    let file = s.client.get(url).send().await.unwrap();
    assert_eq!(file.status(), 200);
    let rid = request_id(&s, &id).await;
    assert_eq!(
        file.bytes().await.unwrap().to_vec(),
        FakeFal::file_bytes(&rid, "image-0.png")
    );
    assert_eq!(fake.file_downloads(), 1);
    assert_eq!(
        fake.key_sent_elsewhere(),
        0,
        "the key went to the queue only"
    );
    let requests = fake.requests();
    assert_eq!(requests.len(), 1, "submitted once");
    let r = &requests[0];
    assert_eq!(r["path"], "fal-ai/flux/dev", "the subpath is submitted to");
    assert_eq!(r["input"], json!({"prompt": "a red fox"}));
    let webhook = r["webhook"].as_str().unwrap();
    assert!(
        webhook.contains(&format!("/v1/upstream/fal/{id}?token=")),
        "{webhook}"
    );
    // The id is the response_url's path: owner/app only.
    assert_eq!(
        run_id(&s, &id).await.unwrap(),
        format!("fal-ai/flux/requests/{rid}")
    );
    // The signed webhook reached tasklane and was accepted.
    let answers = fake.webhook_answers();
    assert!(!answers.is_empty(), "a webhook was sent");
    assert!(
        answers.iter().all(|(_, status)| *status == 200),
        "{answers:?}"
    );
    assert!(fake.jwks_fetches() >= 1);
    assert_eq!(fake.unauthorized(), 0);
    assert_eq!(s.credits().await, before - 5, "charged once, not refunded");
    assert_no_key(&fake, &done.to_string());
    assert_no_key(&fake, &s.get("/models").await.body.to_string());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_file_of_a_result_is_collected_in_order() {
    let fake = FakeFal::start().await;
    let file = |name: &str, t: &str| json!({"url": format!("{{base}}/files/{{request_id}}/{name}"), "content_type": t, "file_name": name});
    fake.set_output(Some(json!({
        "video": file("clip.mp4", "video/mp4"),
        "thumbnails": [file("first.png", "image/png"), file("last.png", "image/png")],
        "audio": {"file": file("sound.wav", "audio/wav")},
        "seed": 7,
    })));
    let s = start(&fake, 60, |_| {}).await;
    let task = s
        .submit(json!({"model": "clip", "prompt": "waves", "duration": 10}))
        .await;
    let id = id(&task);
    let done = s.wait_terminal(&id, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    let types: Vec<&str> = done["result"]["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["content_type"].as_str().unwrap())
        .collect();
    // Fields by name (audio, thumbnails, video), list items in order.
    assert_eq!(types, ["audio/wav", "image/png", "image/png", "video/mp4"]);
    let rid = request_id(&s, &id).await;
    let last = done["result"]["outputs"][2]["url"].as_str().unwrap();
    let bytes = s
        .client
        .get(last)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(bytes.to_vec(), FakeFal::file_bytes(&rid, "last.png"));
    let r = fake.request(&rid).unwrap();
    assert_eq!(r["path"], "fal-ai/kling-video/v2/master/text-to-video");
    assert_eq!(r["app"], "fal-ai/kling-video");
    assert_eq!(r["input"], json!({"prompt": "waves", "duration": 10}));
    assert_eq!(fake.file_downloads(), 4);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_requests_fail_the_task_with_fals_message_and_a_refund() {
    let fake = FakeFal::start().await;
    let s = start(&fake, 60, |_| {}).await;
    let before = s.credits().await;
    let cases = [
        (
            json!({"model": "flux", "prompt": "please fail"}),
            format!("prompt: {POLICY_MESSAGE} (content_policy_violation)"),
        ),
        (
            json!({"model": "no-prompt"}),
            "prompt: Field required (missing)".to_string(),
        ),
        (
            json!({"model": "flux", "prompt": "crash the runner"}),
            "Runner disconnected (runner_disconnected)".to_string(),
        ),
    ];
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for (body, _) in &cases {
            ids.push(id(&s.submit(body.clone()).await));
        }
        ids
    };
    for ((body, message), task_id) in cases.iter().zip(&ids) {
        let done = s.wait_terminal(task_id, 30).await;
        assert_eq!(done["status"], "failed", "{body}: {done}");
        assert_eq!(done["error"]["code"], "generation_failed", "{done}");
        assert_eq!(done["error"]["message"], *message, "{done}");
        assert_eq!(done["cost"]["refunded"], true, "{done}");
        assert_no_key(&fake, &done.to_string());
    }
    assert_eq!(fake.accepted(), 3, "each submitted once");
    assert_eq!(fake.file_downloads(), 0);
    assert_eq!(s.credits().await, before, "all refunded");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_fail_the_task_without_a_retry_and_never_show_the_key() {
    let fake = FakeFal::start().await;
    let s = start(&fake, 60, |_| {}).await;
    let before = s.credits().await;
    let refused = id(&s.submit(json!({"model": "wrong-key", "prompt": "x"})).await);
    let done = s.wait_terminal(&refused, 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "generation_failed", "{done}");
    assert_eq!(done["error"]["message"], "the provider refused the key");
    assert_eq!(fake.unauthorized(), 1, "the wrong key was sent once");
    // A 504 "user" timeout: the SDK never retries it, nor does tasklane.
    fake.user_timeout_next(1);
    let timed_out = id(&s.submit(json!({"model": "flux", "prompt": "y"})).await);
    let done = s.wait_terminal(&timed_out, 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "generation_failed", "{done}");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(message.contains("start timeout"), "{message}");
    assert_eq!(fake.submits(), 2, "neither was retried");
    assert_eq!(fake.accepted(), 0);
    assert_eq!(s.credits().await, before, "both refunded");
    let list = s.get("/tasks?limit=100").await;
    assert_no_key(&fake, &list.body.to_string());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_and_unavailable_submits_keep_tasks_queued_until_they_run() {
    let fake = FakeFal::start().await;
    fake.throttle_next(usize::MAX);
    let s = start(&fake, 60, |c| c.workers = 2).await;
    let ids = [
        id(&s.submit(json!({"model": "flux", "prompt": "first"})).await),
        id(&s.submit(json!({"model": "flux", "prompt": "second"})).await),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while fake.throttled() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "submits stopped coming: {} throttled",
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
    assert_eq!(fake.accepted(), 0);
    // The gateway lets requests through again, after one more nginx 503.
    fake.throttle_next(0);
    fake.unavailable_next(1);
    for t in &ids {
        let done = s.wait_terminal(t, 30).await;
        assert_eq!(done["status"], "completed", "{done}");
    }
    assert_eq!(fake.unavailable(), 1);
    assert_eq!(fake.accepted(), 2, "each task submitted one request");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_webhook_lost_the_checks_still_complete_the_task() {
    let fake = FakeFal::start().await;
    fake.drop_webhooks(true);
    let s = start(&fake, 60, |_| {}).await;
    let task = s
        .submit(json!({"model": "flux", "prompt": "nobody calls"}))
        .await;
    let done = s.wait_terminal(&id(&task), 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"]["outputs"][0]["content_type"], "image/png");
    assert_eq!(fake.webhooks_sent(), 0);
    assert!(fake.webhooks_dropped() >= 1, "the webhook was lost");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_webhook_makes_tasklane_check_at_once() {
    let fake = FakeFal::start().await;
    // The OK webhook says the payload could not be serialised: tasklane reads the result.
    fake.payload_error(true);
    // The first scheduled check comes after 5 minutes: only the webhooks can end these tasks
    // within the wait below.
    let s = start(&fake, 900, |c| {
        c.core.upstream_check_first = Duration::from_secs(300);
        c.core.upstream_check_max = Duration::from_secs(600);
    })
    .await;
    let ok = id(&s.submit(json!({"model": "flux", "prompt": "quick"})).await);
    let failing = id(&s
        .submit(json!({"model": "flux", "prompt": "please fail"}))
        .await);
    let done = s.wait_terminal(&ok, 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"]["outputs"][0]["content_type"], "image/png");
    let failed = s.wait_terminal(&failing, 60).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap()
            .contains(POLICY_MESSAGE),
        "{failed}"
    );
    let answers = fake.webhook_answers();
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert!(
        answers.iter().all(|(_, status)| *status == 200),
        "{answers:?}"
    );
    assert!(fake.status_reads() >= 2, "each webhook prompted a check");
    // A redelivery after the end is acknowledged and changes nothing.
    let rid = request_id(&s, &ok).await;
    assert_eq!(fake.redeliver(&rid).await, Some(200));
    let again = s.get(&format!("/tasks/{ok}")).await.body;
    assert_eq!(again["status"], "completed");
    assert_eq!(again["result"]["outputs"].as_array().unwrap().len(), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_webhooks_are_refused_and_change_nothing() {
    let fake = FakeFal::start().await;
    fake.set_lifecycle(Lifecycle {
        queued: Duration::from_millis(200),
        step: Duration::from_millis(500),
        steps: 10,
    });
    // fal's own webhooks, signed with a clock 10 minutes off, are refused too.
    fake.skew_webhooks(-600);
    let s = start(&fake, 60, |_| {}).await;
    let task = s
        .submit(json!({"model": "flux", "prompt": "the real one"}))
        .await;
    let task_id = id(&task);
    let rid = request_id(&s, &task_id).await;
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
    let forged = json!({"request_id": rid, "gateway_request_id": rid, "status": "OK",
        "payload": {"images": [{"url": "data:text/plain;base64,Zm9yZ2Vk", "content_type": "text/plain"}]}});
    let body = forged.to_string().into_bytes();
    let route = s.url(&format!("/upstream/fal/{task_id}"));
    let with_token = format!("{route}?token={token}");
    let now = chrono::Utc::now().timestamp();
    let send = |url: &str, headers: Vec<(String, String)>, body: Vec<u8>| {
        let mut req = s
            .client
            .post(url)
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        answer(req)
    };
    // Without the task's token, even signed correctly: 401.
    let a = send(&route, fake.sign(&rid, &body, now, true), body.clone()).await;
    assert_eq!(a.status, 401, "{}", a.body);
    // With it: another body than the one signed, a key fal does not publish, a timestamp 10
    // minutes off, or no signature: 400.
    let other_body = json!({"request_id": rid, "status": "OK", "payload": {}})
        .to_string()
        .into_bytes();
    for (what, headers) in [
        (
            "not the signed body",
            fake.sign(&rid, &other_body, now, true),
        ),
        ("an unpublished key", fake.sign(&rid, &body, now, false)),
        ("10 minutes old", fake.sign(&rid, &body, now - 600, true)),
        ("unsigned", Vec::new()),
    ] {
        let a = send(&with_token, headers, body.clone()).await;
        assert_eq!(a.status, 400, "{what}: {}", a.body);
        assert_eq!(a.body["error"]["code"], "invalid_request", "{what}");
        assert_no_key(&fake, &a.body.to_string());
    }
    let now_task = s.get(&format!("/tasks/{task_id}")).await.body;
    assert_eq!(now_task["status"], "processing", "{now_task}");
    assert_eq!(now_task["result"], Value::Null, "{now_task}");
    // Token and signature right, the body a lie: it only prompts a check of the real state.
    let a = send(&with_token, fake.sign(&rid, &body, now, true), body.clone()).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let done = s.wait_terminal(&task_id, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"]["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(
        done["result"]["outputs"][0]["content_type"], "image/png",
        "the real output, not the forged text: {done}"
    );
    // fal's skewed webhook was refused: the checks ended the task.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fake.webhook_answers().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no webhook was sent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        fake.webhook_answers()[0].1,
        400,
        "{:?}",
        fake.webhook_answers()
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_timeout_is_cancelled_on_fal_and_refunded() {
    let fake = FakeFal::start().await;
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
    assert!(fake.cancels() >= 1, "a cancel reached fal");
    let rid = request_id(&s, &task_id).await;
    assert_eq!(fake.request(&rid).unwrap()["status"], "CANCELLED");
    assert_no_key(&fake, &done.to_string());
    s.stop().await;
}
