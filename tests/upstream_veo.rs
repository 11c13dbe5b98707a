//! Models served by Veo on Google's Gemini API (the `veo` provider), through the local server
//! and a catalog mapping the public model `veo3` to `veo-3.1-generate-preview` on the fake
//! Gemini API of `tasklane_testkit::veo` (loopback only):
//!
//! - the product flow: the operation is polled to its end, the video is downloaded through
//!   the API's redirect to storage (the key sent to the API, not to the storage), and served
//!   by tasklane's own URL, still after the provider has dropped it;
//! - a safety block and an operation error fail the task (`generation_failed`), refunded;
//! - quota exhausted at create: tasks wait queued, then complete; 500s on checks: the task
//!   still completes; a provider that stays unreachable: `upstream_unavailable`, refunded;
//! - a redirect to a non-public address or to a name resolving to loopback that the catalog
//!   does not trust, or one redirect too many, fails the task with `output_rejected`, and
//!   nothing is sent to the refused target;
//! - past the model's timeout: `timeout`, refunded;
//! - the `tasklane` binary: the key appears in no task and no log line, even at debug level
//!   and for a key the provider refuses; a missing key stops the start, naming the model and
//!   the field.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Server, task_id as id};
use serde_json::{Value, json};
use tasklane_local::{Hooks, LocalConfig};
use tasklane_testkit::veo::{self, VeoCounts, VeoFake};

/// The Gemini API key of this suite: in-process servers read it from [`KEY_VAR`].
const KEY: &str = "AIzaSyTasklaneUpstreamVeoTestKey-7f3a9c01";
/// The environment variable the suite's catalogs name in `api_key_env`.
const KEY_VAR: &str = "UPSTREAM_VEO_TEST_GEMINI_KEY";
/// A key the fake does not accept.
const WRONG_KEY: &str = "AIzaSyTasklaneUpstreamVeoWrongKey-0b9d2e77";

/// Puts [`KEY`] in [`KEY_VAR`], once, before the first server of the suite reads its catalog.
fn key_in_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: the only write to this process's environment in the suite, made before any
        // server of it starts; every read of the variable goes through std::env.
        unsafe { std::env::set_var(KEY_VAR, KEY) }
    });
}

/// A catalog with `veo3` on the Gemini API at `endpoint`, timing out after `timeout` seconds.
fn catalog_text(endpoint: &str, timeout: u64, key_var: &str, name: &str) -> String {
    format!(
        r#"
[models.{name}]
provider = "veo"
description = "Veo 3.1 on the Gemini API"
endpoint = "{endpoint}"
upstream_model = "veo-3.1-generate-preview"
api_key_env = "{key_var}"
prompt = {{ required = true, max_length = 1024 }}
duration = {{ min = 4, max = 8, default = 8 }}
price = {{ per_second = 10 }}
timeout = {timeout}
trusted_hosts = ["127.0.0.1"]

[models.{name}.params.aspect_ratio]
type = "string"
max_length = 8
description = "16:9 or 9:16"

[models.{name}.params.negative_prompt]
type = "string"
description = "what not to show"
"#
    )
}

async fn start(endpoint: &str, timeout: u64, f: impl FnOnce(&mut LocalConfig)) -> Server {
    key_in_env();
    let text = catalog_text(endpoint, timeout, KEY_VAR, "veo3");
    Server::start_with_catalog(&text, f, Hooks::default()).await
}

/// Waits (at most `secs`) until the fake's counts satisfy `done`.
async fn until_counted(fake: &VeoFake, secs: u64, what: &str, done: impl Fn(&VeoCounts) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let c = fake.counts();
        if done(&c) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fake Gemini API never counted {what}: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts the task failed with `code`, refunded, and returns its message.
async fn assert_failed_refunded(s: &Server, task: &Value, code: &str, before: u64) -> String {
    let done = s.wait_terminal(&id(task), 40).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], code, "{done}");
    assert_eq!(done["cost"]["refunded"], true, "{done}");
    assert_eq!(s.credits().await, before, "refunded");
    assert!(!done.to_string().contains(KEY), "{done}");
    done["error"]["message"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn veo3_completes_with_a_video_downloaded_through_the_redirect_and_served_by_tasklane() {
    let fake = VeoFake::start(KEY).await;
    let s = start(&fake.url, 60, |_| {}).await;
    let before = s.credits().await;
    let task = s
        .submit(json!({
            "model": "veo3", "prompt": "A cat walking on the beach", "duration": 6,
            "params": {"aspect_ratio": "16:9", "negative_prompt": "cartoon"},
        }))
        .await;
    assert_eq!(task["cost"]["credits"], 60, "{task}");
    let done = s.wait_terminal(&id(&task), 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["progress"], 100);

    // What reached the Gemini API: the prompt, the duration and the params by their names.
    let created = fake.created();
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(
        created[0],
        json!({"instances": [{"prompt": "A cat walking on the beach"}], "parameters": {
            "durationSeconds": 6, "aspectRatio": "16:9", "negativePrompt": "cartoon"}})
    );

    // The video, served by tasklane: the bytes the storage served, behind the key-only
    // download that redirected there.
    let out = &done["result"]["outputs"][0];
    assert_eq!(out["content_type"], "video/mp4", "{done}");
    let url = out["url"].as_str().unwrap();
    assert!(
        !url.contains(&fake.url) && !url.contains(&fake.storage_url),
        "served by tasklane: {url}"
    );
    let video = s.client.get(url).send().await.unwrap();
    assert_eq!(video.status(), 200);
    let bytes = video.bytes().await.unwrap();
    let ids = fake.video_ids();
    assert_eq!(ids.len(), 1);
    assert_eq!(&bytes[4..8], b"ftyp");
    assert_eq!(bytes.to_vec(), veo::video_bytes(&ids[0]));
    assert_eq!(out["size_bytes"].as_u64().unwrap(), bytes.len() as u64);
    let c = fake.counts();
    assert_eq!(
        (c.operations, c.downloads, c.storage_requests),
        (1, 1, 1),
        "{c:?}"
    );
    assert_eq!(
        c.storage_requests_with_key, 0,
        "the key went to the storage: {c:?}"
    );
    assert_eq!(c.key_refused, 0, "{c:?}");
    assert_eq!(s.credits().await, before - 60, "charged once, not refunded");
    assert!(!done.to_string().contains(KEY), "{done}");

    // Two days later the provider has dropped the video; tasklane still serves its copy.
    fake.advance(veo::RETENTION);
    let gone = s
        .client
        .get(fake.file_url(&ids[0]))
        .header("x-goog-api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    let again = s.get(&format!("/tasks/{}", id(&task))).await.body;
    let copy = s
        .client
        .get(again["result"]["outputs"][0]["url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(copy.status(), 200);
    assert_eq!(copy.bytes().await.unwrap(), bytes);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_the_safety_filters_block_fails_with_their_reason_and_a_refund() {
    let fake = VeoFake::start(KEY).await;
    let s = start(&fake.url, 60, |_| {}).await;
    let before = s.credits().await;
    let task = s
        .submit(json!({"model": "veo3", "prompt": "an unsafe stunt on a rooftop", "duration": 4}))
        .await;
    let message = assert_failed_refunded(&s, &task, "generation_failed", before).await;
    assert!(
        message.contains("blocked by the provider's safety filters")
            && message.contains(veo::RAI_REASON),
        "{message}"
    );
    assert_eq!(fake.counts().downloads, 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_that_ends_in_error_fails_the_task_with_its_message_and_a_refund() {
    let fake = VeoFake::start(KEY).await;
    let s = start(&fake.url, 60, |_| {}).await;
    let before = s.credits().await;
    let task = s
        .submit(json!({"model": "veo3", "prompt": "this one will fail", "duration": 4}))
        .await;
    let message = assert_failed_refunded(&s, &task, "generation_failed", before).await;
    assert!(message.contains(veo::OPERATION_ERROR), "{message}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exhausted_at_create_keeps_tasks_queued_until_they_run_and_complete() {
    let fake = VeoFake::start(KEY).await;
    fake.throttle_creates(4, Some("1s"));
    let s = start(&fake.url, 60, |_| {}).await;
    let before = s.credits().await;
    let mut ids = Vec::new();
    for i in 0..2 {
        let t = s
            .submit(json!({"model": "veo3", "prompt": format!("waves {i}"), "duration": 4}))
            .await;
        ids.push(id(&t));
    }
    let mut queued_after_429 = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let throttled = fake.counts().throttled > 0;
        let mut statuses = Vec::new();
        for id in &ids {
            statuses.push(s.get(&format!("/tasks/{id}")).await.body["status"].clone());
        }
        if throttled && statuses.iter().any(|s| s == "queued") {
            queued_after_429 = true;
        }
        if statuses.iter().all(|s| s == "completed" || s == "failed") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{statuses:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in &ids {
        let t = s.get(&format!("/tasks/{id}")).await.body;
        assert_eq!(t["status"], "completed", "{t}");
    }
    assert!(queued_after_429, "a throttled task waited, queued");
    let c = fake.counts();
    assert_eq!((c.throttled, c.operations), (4, 2), "{c:?}");
    assert_eq!(s.credits().await, before - 80, "charged, never refunded");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_on_checks_for_a_while_do_not_fail_the_task() {
    let fake = VeoFake::start(KEY).await;
    fake.set_generation_time(Duration::from_secs(600));
    let s = start(&fake.url, 60, |_| {}).await;
    let task = s
        .submit(json!({"model": "veo3", "prompt": "a storm at sea", "duration": 4}))
        .await;
    until_counted(&fake, 20, "the create", |c| c.operations == 1).await;
    fake.fail_next(3);
    until_counted(&fake, 20, "three 500s", |c| c.server_errors == 3).await;
    let t = s.get(&format!("/tasks/{}", id(&task))).await.body;
    assert_eq!(t["status"], "processing", "{t}");
    // The operation ends (the fake's clock jumps past its generation time).
    fake.advance(Duration::from_secs(600));
    let done = s.wait_terminal(&id(&task), 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"]["outputs"][0]["content_type"], "video/mp4");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_gone_after_the_start_fails_the_task_with_upstream_unavailable_and_a_refund() {
    let fake = VeoFake::start(KEY).await;
    fake.set_generation_time(Duration::from_secs(600));
    let s = start(&fake.url, 120, |_| {}).await;
    let before = s.credits().await;
    let task = s
        .submit(json!({"model": "veo3", "prompt": "a quiet forest", "duration": 4}))
        .await;
    until_counted(&fake, 20, "the create", |c| c.operations == 1).await;
    fake.stop();
    let message = assert_failed_refunded(&s, &task, "upstream_unavailable", before).await;
    assert!(message.contains("could not be reached"), "{message}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_unreachable_at_the_start_fails_the_task_with_upstream_unavailable_and_a_refund()
{
    // A loopback port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let s = start(&endpoint, 120, |_| {}).await;
    let before = s.credits().await;
    let task = s
        .submit(json!({"model": "veo3", "prompt": "a quiet forest", "duration": 4}))
        .await;
    let message = assert_failed_refunded(&s, &task, "upstream_unavailable", before).await;
    assert!(message.contains("could not be reached"), "{message}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_redirected_to_a_non_public_address_is_refused_before_anything_is_sent() {
    let fake = VeoFake::start(KEY).await;
    // A literal address: refused before any connection, so nothing is sent anywhere.
    fake.redirect_downloads_to(Some(
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    ));
    let s = start(&fake.url, 60, |_| {}).await;
    let before = s.credits().await;
    let task = s
        .submit(json!({"model": "veo3", "prompt": "a lighthouse", "duration": 4}))
        .await;
    let message = assert_failed_refunded(&s, &task, "output_rejected", before).await;
    assert!(
        message.contains("redirected") && message.contains("non-public address (169.254.169.254)"),
        "{message}"
    );
    let c = fake.counts();
    assert_eq!((c.downloads, c.storage_requests), (1, 0), "{c:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_redirected_to_an_untrusted_name_of_a_loopback_address_is_refused() {
    let fake = VeoFake::start(KEY).await;
    // `localhost` is not among the trusted hosts (only 127.0.0.1 is), and resolves to loopback:
    // outside development (private targets not allowed) nothing may connect there.
    let port = fake.storage_url.rsplit(':').next().unwrap().to_string();
    fake.redirect_downloads_to(Some(&format!("http://localhost:{port}/videos/x.mp4")));
    let s = start(&fake.url, 60, |c| c.core.callback_allow_private = false).await;
    let before = s.credits().await;
    let task = s
        .submit(json!({"model": "veo3", "prompt": "a lighthouse", "duration": 4}))
        .await;
    let message = assert_failed_refunded(&s, &task, "output_rejected", before).await;
    assert!(message.contains("localhost"), "{message}");
    let c = fake.counts();
    assert_eq!(c.downloads, 1, "{c:?}");
    assert_eq!(
        c.storage_requests, 0,
        "a request reached the refused target: {c:?}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_redirected_more_than_three_times_is_refused() {
    let fake = VeoFake::start(KEY).await;
    fake.set_generation_time(Duration::from_secs(600));
    let s = start(&fake.url, 60, |_| {}).await;
    let before = s.credits().await;
    let task = s
        .submit(json!({"model": "veo3", "prompt": "a lighthouse", "duration": 4}))
        .await;
    until_counted(&fake, 20, "the create", |c| c.operations == 1).await;
    // The download redirects to itself, again and again.
    let ids = fake.video_ids();
    fake.redirect_downloads_to(Some(&fake.file_url(&ids[0])));
    fake.advance(Duration::from_secs(600));
    let message = assert_failed_refunded(&s, &task, "output_rejected", before).await;
    assert!(message.contains("more than 3 times"), "{message}");
    let c = fake.counts();
    // The first request and three redirects, each to the API's origin, so each with the key.
    assert_eq!((c.downloads, c.key_refused), (4, 0), "{c:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_past_the_timeout_fails_with_timeout_and_a_refund() {
    let fake = VeoFake::start(KEY).await;
    fake.set_generation_time(Duration::from_secs(3600));
    let s = start(&fake.url, 2, |_| {}).await;
    let before = s.credits().await;
    let task = s
        .submit(json!({"model": "veo3", "prompt": "a very long take", "duration": 8}))
        .await;
    let message = assert_failed_refunded(&s, &task, "timeout", before).await;
    assert!(message.contains("timeout of 2 s"), "{message}");
    assert!(fake.counts().polls >= 1);
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The `tasklane` binary as a child process, for what it logs and how it refuses to start.

const DEV_KEY: &str = "sk_test_upstream_veo_fixed_key_0123456789";

/// A running `tasklane` binary, its stdout and stderr collected. Killed when dropped.
struct Tasklane {
    child: Child,
    output: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Tasklane {
    /// Starts the binary on `data_dir` (port 0) with `env`; the test's own `TASKLANE_*` and
    /// `GEMINI_API_KEY` variables are not passed on.
    fn spawn(data_dir: &Path, env: &[(&str, &str)]) -> Tasklane {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tasklane"));
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().to_string();
            if k.starts_with("TASKLANE_") || k == "GEMINI_API_KEY" || k == KEY_VAR {
                cmd.env_remove(k);
            }
        }
        cmd.env("TASKLANE_ADDR", "127.0.0.1:0")
            .env("TASKLANE_DATA_DIR", data_dir)
            .env("TASKLANE_DEV_KEY", DEV_KEY)
            .env("TASKLANE_WORKERS", "2")
            .env("TASKLANE_RATE_LIMIT", "0")
            .env("TASKLANE_UPSTREAM_CHECK_FIRST", "0.2")
            .env("TASKLANE_UPSTREAM_CHECK_MAX", "0.8")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("the tasklane binary starts");
        let output = Arc::new(Mutex::new(String::new()));
        let drain = |pipe: Box<dyn Read + Send>, out: Arc<Mutex<String>>| {
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut o = out.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                }
            })
        };
        let readers = vec![
            drain(Box::new(child.stdout.take().unwrap()), output.clone()),
            drain(Box::new(child.stderr.take().unwrap()), output.clone()),
        ];
        Tasklane {
            child,
            output,
            readers,
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits for the "listening" line; returns the API's base URL.
    async fn base_url(&mut self) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.output();
            if let Some(url) = out
                .lines()
                .find_map(|l| l.strip_prefix("tasklane is listening on "))
            {
                return url.trim().to_string();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("tasklane exited ({status}) before listening\n{out}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "tasklane is not listening after 60 s\n{out}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (at most `secs`) for the process to exit; returns its status once all its output
    /// is read.
    async fn exit_status(&mut self, secs: u64) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "tasklane still running after {secs} s\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -TERM`: a graceful shutdown.
    fn terminate(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -TERM failed");
    }
}

impl Drop for Tasklane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls task `id` on `base` until it is terminal (at most 40 s).
async fn wait_terminal(client: &reqwest::Client, base: &str, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let t: Value = client
            .get(format!("{base}/tasks/{id}"))
            .bearer_auth(DEV_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if ["completed", "failed", "cancelled"].contains(&t["status"].as_str().unwrap_or("")) {
            return t;
        }
        assert!(tokio::time::Instant::now() < deadline, "not terminal: {t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_appears_in_no_task_and_no_log_line_even_when_the_provider_refuses_it() {
    let fake = VeoFake::start(KEY).await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("models.toml");
    let text = catalog_text(&fake.url, 60, "VEO_GOOD_KEY", "veo3")
        + &catalog_text(&fake.url, 60, "VEO_WRONG_KEY", "veo3-wrong-key");
    std::fs::write(&catalog, text).unwrap();
    let data = dir.path().join("data");
    let mut p = Tasklane::spawn(
        &data,
        &[
            ("TASKLANE_MODELS", catalog.to_str().unwrap()),
            ("VEO_GOOD_KEY", KEY),
            ("VEO_WRONG_KEY", WRONG_KEY),
            ("RUST_LOG", "debug"),
        ],
    );
    let base = p.base_url().await;
    let client = reqwest::Client::new();
    let submit = |body: Value| {
        let req = client
            .post(format!("{base}/tasks"))
            .bearer_auth(DEV_KEY)
            .json(&body);
        async move {
            let a: Value = req.send().await.unwrap().json().await.unwrap();
            a["task_id"].as_str().expect("a task").to_string()
        }
    };
    // A 429 and a 500 on the way: their messages are logged too.
    fake.throttle_creates(1, Some("0.3s"));
    fake.set_generation_time(Duration::from_secs(600));
    let ok = submit(json!({"model": "veo3", "prompt": "a sunrise", "duration": 4})).await;
    until_counted(&fake, 20, "the create", |c| c.operations == 1).await;
    fake.fail_next(1);
    until_counted(&fake, 20, "a 500", |c| c.server_errors == 1).await;
    fake.set_generation_time(Duration::from_millis(300));
    fake.advance(Duration::from_secs(600));
    let ok = wait_terminal(&client, &base, &ok).await;
    assert_eq!(ok["status"], "completed", "{ok}\n{}", p.output());
    let refused =
        submit(json!({"model": "veo3-wrong-key", "prompt": "a sunset", "duration": 4})).await;
    let refused = wait_terminal(&client, &base, &refused).await;
    assert_eq!(refused["status"], "failed", "{refused}");
    assert_eq!(refused["error"]["code"], "generation_failed");
    assert_eq!(
        refused["error"]["message"], "the provider refused the API key",
        "{refused}"
    );
    let c = fake.counts();
    assert!(
        c.throttled == 1 && c.server_errors == 1 && c.key_refused == 1,
        "{c:?}"
    );
    let list = client
        .get(format!("{base}/tasks?limit=100"))
        .bearer_auth(DEV_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    p.terminate();
    let status = p.exit_status(60).await;
    assert!(status.success(), "exit status {status}\n{}", p.output());
    let logs = p.output();
    // The logs did record the runs: a test that read no log would prove nothing.
    assert!(
        logs.contains("upstream run started")
            && logs.contains("models/veo-3.1-generate-preview/operations/"),
        "{logs}"
    );
    for key in [KEY, WRONG_KEY] {
        for (what, text) in [
            ("the task", ok.to_string()),
            ("the refused task", refused.to_string()),
            ("the task list", list.clone()),
            ("the logs", logs.clone()),
        ] {
            assert!(!text.contains(key), "the key is in {what}:\n{text}");
        }
    }
}

#[tokio::test]
async fn a_missing_key_stops_the_start_naming_the_model_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    // Named, but not set.
    let named = dir.path().join("named.toml");
    std::fs::write(
        &named,
        catalog_text("http://127.0.0.1:9", 60, "VEO_KEY_NOT_SET", "veo3"),
    )
    .unwrap();
    // Not named: GEMINI_API_KEY, which is not set either.
    let default = dir.path().join("default.toml");
    let text =
        catalog_text("http://127.0.0.1:9", 60, "X", "veo3").replace("api_key_env = \"X\"\n", "");
    std::fs::write(&default, text).unwrap();
    for (catalog, variable) in [(&named, "VEO_KEY_NOT_SET"), (&default, "GEMINI_API_KEY")] {
        let mut p = Tasklane::spawn(
            &dir.path().join("data"),
            &[("TASKLANE_MODELS", catalog.to_str().unwrap())],
        );
        let status = p.exit_status(60).await;
        let out = p.output();
        assert!(!status.success(), "it started\n{out}");
        assert!(
            out.contains("model \"veo3\": field \"api_key_env\"") && out.contains(variable),
            "{out}"
        );
        assert!(!out.contains("listening"), "{out}");
    }
}
