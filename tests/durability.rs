//! Durability: what an account stored survives graceful restarts, crashes and signals, and the
//! server reads its configuration from the environment, refusing bad values before it starts.
//!
//! The first tests restart the in-process server (`Server::restart`); the others run the real
//! `tasklane` binary as a child process so they can kill it with SIGKILL or stop it with SIGTERM.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{Answer, Server};
use serde_json::{Value, json};
use tasklane_local::Hooks;
use tokio::time::Instant;

fn id(task: &Value) -> String {
    task["task_id"].as_str().expect("a task id").to_string()
}

/// The task without what is signed afresh on every read (output URLs and their expiry).
fn without_signed_urls(task: &Value) -> Value {
    let mut t = task.clone();
    if let Some(outputs) = t["result"]["outputs"].as_array_mut() {
        for o in outputs {
            let o = o.as_object_mut().expect("an output object");
            o.remove("url");
            o.remove("expires_at");
        }
    }
    t
}

/// Downloads a result URL; asserts 200 and returns the bytes.
async fn download(url: &str) -> Vec<u8> {
    let resp = reqwest::get(url).await.expect("result URL answers");
    assert_eq!(resp.status(), 200, "downloading {url}");
    resp.bytes().await.unwrap().to_vec()
}

/// The first output's URL of a completed task.
fn output_url(task: &Value) -> &str {
    task["result"]["outputs"][0]["url"]
        .as_str()
        .expect("an output URL")
}

#[tokio::test]
async fn a_graceful_restart_keeps_every_task_the_credits_the_key_and_the_outputs() {
    let s = Server::start().await;
    let echo = s
        .submit(json!({"model": "echo", "prompt": "kept across restarts"}))
        .await;
    let video = s
        .submit(json!({"model": "veo3", "prompt": "A lighthouse at dusk", "duration": 1}))
        .await;
    let failed = s
        .submit(json!({"model": "echo", "params": {"fail": "on purpose"}}))
        .await;
    for t in [&echo, &video, &failed] {
        s.wait_terminal(&id(t), 60).await;
    }
    // Without workers new tasks stay queued: one to cancel, one to leave queued.
    let s = s.restart(|c| c.workers = 0).await;
    let cancelled = s
        .submit(json!({"model": "echo", "prompt": "cancel me"}))
        .await;
    let c = s
        .post(&format!("/tasks/{}/cancel", id(&cancelled)), &json!({}))
        .await;
    assert_eq!(c.status, 200, "{}", c.body);
    let queued = s
        .submit(json!({"model": "veo3", "prompt": "still waiting", "duration": 2}))
        .await;

    let ids: Vec<String> = [&echo, &video, &failed, &cancelled, &queued]
        .into_iter()
        .map(id)
        .collect();
    let mut before = Vec::new();
    for id in &ids {
        before.push(s.get(&format!("/tasks/{id}")).await.body);
    }
    let states: Vec<&str> = before
        .iter()
        .map(|t| t["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        ["completed", "completed", "failed", "cancelled", "queued"]
    );
    let account_before = s.get("/account").await.body;
    let list_before = s.get("/tasks?limit=100").await.body;
    assert_eq!(
        list_before["data"].as_array().unwrap().len(),
        5,
        "{list_before}"
    );
    let key = s.key.clone();

    let s = s.restart(|c| c.workers = 0).await;
    assert_eq!(s.key, key, "the development key changed across a restart");
    let account_after = s.get_as("/account", &key).await;
    assert_eq!(
        account_after.status, 200,
        "the old key no longer works: {}",
        account_after.body
    );
    assert_eq!(
        account_after.body, account_before,
        "account (id, credits, webhook secret) changed"
    );

    for (id, was) in ids.iter().zip(&before) {
        let now = s.get_as(&format!("/tasks/{id}"), &key).await;
        assert_eq!(now.status, 200, "{}", now.body);
        assert_eq!(
            without_signed_urls(&now.body),
            without_signed_urls(was),
            "task {id} changed"
        );
    }
    let list_after = s.get_as("/tasks?limit=100", &key).await.body;
    let strip = |l: &Value| -> Vec<Value> {
        l["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(without_signed_urls)
            .collect()
    };
    assert_eq!(
        strip(&list_after),
        strip(&list_before),
        "the task list changed"
    );
    assert_eq!(list_after["next_cursor"], list_before["next_cursor"]);

    // Outputs stored before the restart download through URLs the new server signs.
    let origin = s.base.trim_end_matches("/v1");
    let echo_now = s.get(&format!("/tasks/{}", ids[0])).await.body;
    let url = output_url(&echo_now);
    assert!(
        url.starts_with(origin),
        "{url} does not point at the running server {origin}"
    );
    assert_eq!(download(url).await, b"kept across restarts");
    let video_now = s.get(&format!("/tasks/{}", ids[1])).await.body;
    let url = output_url(&video_now);
    assert!(
        url.starts_with(origin),
        "{url} does not point at the running server {origin}"
    );
    let gif = download(url).await;
    assert_eq!(&gif[..6], b"GIF89a");
    assert_eq!(
        gif.len() as u64,
        video_now["result"]["outputs"][0]["size_bytes"]
            .as_u64()
            .unwrap()
    );
    s.stop().await;
}

#[tokio::test]
async fn tasks_queued_while_the_server_was_stopped_complete_after_a_restart_with_workers() {
    let s = Server::start_with(|c| c.workers = 0, Hooks::default()).await;
    let start = s.credits().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(id(&s
            .submit(json!({"model": "echo", "prompt": format!("waiting {i}")}))
            .await));
    }
    ids.push(id(&s
        .submit(json!({"model": "veo3", "prompt": "a queued video", "duration": 2}))
        .await));
    for id in &ids {
        assert_eq!(
            s.get(&format!("/tasks/{id}")).await.body["status"],
            "queued"
        );
    }

    let s = s.restart(|c| c.workers = 2).await;
    for (i, id) in ids.iter().enumerate() {
        let done = s.wait_terminal(id, 60).await;
        assert_eq!(done["status"], "completed", "{done}");
        let bytes = download(output_url(&done)).await;
        if i < 3 {
            assert_eq!(bytes, format!("waiting {i}").as_bytes());
        } else {
            assert_eq!(&bytes[..6], b"GIF89a");
        }
    }
    assert_eq!(
        s.credits().await,
        start - 3 - 20,
        "each task is charged once"
    );
    s.stop().await;
}

#[tokio::test]
async fn refunds_of_failed_and_cancelled_tasks_survive_a_restart_and_are_never_repeated() {
    let s = Server::start().await;
    let start = s.credits().await;
    let done = id(&s
        .submit(json!({"model": "echo", "prompt": "paid for"}))
        .await);
    let failing = id(&s
        .submit(json!({"model": "echo", "params": {"fail": "on purpose"}}))
        .await);
    assert_eq!(s.wait_terminal(&done, 60).await["status"], "completed");
    let f = s.wait_terminal(&failing, 60).await;
    assert_eq!(f["status"], "failed", "{f}");
    assert_eq!(f["cost"]["refunded"], true);
    let expected = start - 1;
    assert_eq!(s.credits().await, expected, "the failed task was refunded");

    let s = s.restart(|c| c.workers = 0).await;
    let cancelled = id(&s
        .submit(json!({"model": "veo3", "prompt": "never made", "duration": 4}))
        .await);
    assert_eq!(s.credits().await, expected - 40);
    let c = s
        .post(&format!("/tasks/{cancelled}/cancel"), &json!({}))
        .await;
    assert_eq!(c.status, 200, "{}", c.body);
    assert_eq!(
        s.credits().await,
        expected,
        "the cancelled task was refunded"
    );

    let s = s.restart(|c| c.workers = 2).await;
    assert_eq!(
        s.credits().await,
        expected,
        "credits changed across the restart"
    );
    let f = s.get(&format!("/tasks/{failing}")).await.body;
    assert_eq!(
        (&f["status"], &f["cost"]["refunded"]),
        (&json!("failed"), &json!(true)),
        "{f}"
    );
    let c = s.get(&format!("/tasks/{cancelled}")).await.body;
    assert_eq!(
        (&c["status"], &c["cost"]["refunded"]),
        (&json!("cancelled"), &json!(true)),
        "{c}"
    );
    // Cancelling again after the restart answers the cancelled task and refunds nothing.
    let again = s
        .post(&format!("/tasks/{cancelled}/cancel"), &json!({}))
        .await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.body["status"], "cancelled");
    // The workers have run (a new task completes) and still nothing was refunded twice.
    let after = id(&s
        .submit(json!({"model": "echo", "prompt": "after the restart"}))
        .await);
    assert_eq!(s.wait_terminal(&after, 60).await["status"], "completed");
    assert_eq!(
        s.credits().await,
        expected - 1,
        "credits after the restart are not exact"
    );
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The `tasklane` binary as a child process.

const DEV_KEY: &str = "sk_test_durability_fixed_key_0123456789";

/// A running `tasklane` binary. Killed (SIGKILL) when dropped, so no test leaves one behind.
struct Tasklane {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    listening: mpsc::Receiver<String>,
}

/// Copies a child's pipe into `buf` line by line, calling `on_line` for each line.
fn drain(
    pipe: impl Read + Send + 'static,
    buf: Arc<Mutex<String>>,
    on_line: impl Fn(&str) + Send + 'static,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            on_line(&line);
            let mut b = buf.lock().unwrap();
            b.push_str(&line);
            b.push('\n');
        }
    })
}

impl Tasklane {
    /// Starts the binary on `data_dir` (port 0) with the extra environment `env`. Any
    /// `TASKLANE_*` variable of the test's own environment is removed first.
    fn spawn(data_dir: &Path, env: &[(&str, &str)]) -> Tasklane {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tasklane"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TASKLANE_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("TASKLANE_ADDR", "127.0.0.1:0")
            .env("TASKLANE_DATA_DIR", data_dir)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("the tasklane binary starts");
        let (tx, listening) = mpsc::channel();
        let tx = Mutex::new(tx);
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            drain(child.stdout.take().unwrap(), stdout.clone(), move |line| {
                if let Some(url) = line.strip_prefix("tasklane is listening on ") {
                    let _ = tx.lock().unwrap().send(url.trim().to_string());
                }
            }),
            drain(child.stderr.take().unwrap(), stderr.clone(), |_| {}),
        ];
        Tasklane {
            child,
            stdout,
            stderr,
            readers,
            listening,
        }
    }

    /// What the process printed so far, for failure messages.
    fn output(&self) -> String {
        format!(
            "--- stdout ---\n{}--- stderr ---\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    /// Waits for the "listening" line; returns a client using `key`.
    async fn client(&mut self, key: &str) -> Api {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(base) = self.listening.try_recv() {
                return Api {
                    http: reqwest::Client::builder()
                        .timeout(Duration::from_secs(60))
                        .build()
                        .unwrap(),
                    base,
                    key: key.to_string(),
                };
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "tasklane exited ({status}) before listening\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tasklane is not listening after 60 s\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (at most `secs`) for the process to exit; returns its status once all its output is read.
    async fn exit_status(&mut self, secs: u64) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "tasklane still running after {secs} s\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9`: the process dies at once, whatever it was doing.
    fn kill_hard(&mut self) {
        self.child.kill().expect("SIGKILL sent");
        self.child.wait().expect("the killed process is reaped");
    }

    /// `kill -TERM`: asks for a graceful shutdown.
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
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A small HTTP client for a child process.
struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    async fn send(req: reqwest::RequestBuilder) -> Answer {
        common::answer(req).await
    }

    async fn get(&self, path: &str) -> Answer {
        Self::send(
            self.http
                .get(format!("{}{path}", self.base))
                .bearer_auth(&self.key),
        )
        .await
    }

    async fn submit(&self, body: Value) -> Value {
        let req = self
            .http
            .post(format!("{}/tasks", self.base))
            .bearer_auth(&self.key)
            .json(&body);
        let a = Self::send(req).await;
        assert_eq!(a.status, 202, "submit failed: {}", a.body);
        a.body
    }

    async fn credits(&self) -> u64 {
        let a = self.get("/account").await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body["credits"].as_u64().unwrap()
    }

    /// Polls the task until `done(task)` holds (at most `secs` seconds); returns it.
    async fn wait_for(
        &self,
        id: &str,
        secs: u64,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let t = self.get(&format!("/tasks/{id}")).await;
            assert_eq!(t.status, 200, "{}", t.body);
            if done(&t.body) {
                return t.body;
            }
            assert!(
                Instant::now() < deadline,
                "task {id} not {what} after {secs} s: {}",
                t.body
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_terminal(&self, id: &str, secs: u64) -> Value {
        self.wait_for(id, secs, "terminal", is_terminal).await
    }
}

fn is_terminal(task: &Value) -> bool {
    ["completed", "failed", "cancelled"].contains(&task["status"].as_str().unwrap_or(""))
}

#[tokio::test]
async fn a_task_interrupted_by_sigkill_completes_after_the_next_start_and_is_charged_once() {
    let dir = tempfile::tempdir().unwrap();
    // veo3 sleeps 0.25 s x scale per second of video: 20 s of video take about 10 s at scale 2.
    // The long lease shows the next start takes the task up without waiting for it to expire.
    let env = [
        ("TASKLANE_DEV_KEY", DEV_KEY),
        ("TASKLANE_WORKERS", "2"),
        ("TASKLANE_DEMO_TIME_SCALE", "2"),
        ("TASKLANE_LEASE", "600"),
    ];
    let mut first = Tasklane::spawn(dir.path(), &env);
    let api = first.client(DEV_KEY).await;
    let start = api.credits().await;
    let task = api
        .submit(json!({"model": "veo3", "prompt": "A storm over the harbour", "duration": 20}))
        .await;
    assert_eq!(task["cost"]["credits"], 200);
    let id = id(&task);
    let seen = api
        .wait_for(&id, 60, "processing with progress", |t| {
            assert!(!is_terminal(t), "the task ended before the kill: {t}");
            t["status"] == "processing" && t["progress"].as_u64().unwrap() > 0
        })
        .await;
    first.kill_hard();
    drop(first);

    let mut second = Tasklane::spawn(dir.path(), &env);
    let api = second.client(DEV_KEY).await;
    let done = api.wait_terminal(&id, 120).await;
    assert_eq!(done["status"], "completed", "{done}\n{}", second.output());
    assert_eq!(done["progress"], 100);
    assert_eq!(
        done["started_at"], seen["started_at"],
        "started_at is the first pickup"
    );
    assert_eq!(done["cost"], json!({"credits": 200, "refunded": false}));
    assert_eq!(api.credits().await, start - 200, "charged exactly once");
    let list = api.get("/tasks").await.body;
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
    let gif = download(output_url(&done)).await;
    assert_eq!(&gif[..6], b"GIF89a");
    assert_eq!(
        gif.len() as u64,
        done["result"]["outputs"][0]["size_bytes"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn sigterm_lets_in_flight_work_finish_and_exits_with_status_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Tasklane::spawn(
        dir.path(),
        &[("TASKLANE_DEV_KEY", DEV_KEY), ("TASKLANE_WORKERS", "2")],
    );
    let api = p.client(DEV_KEY).await;
    let task = api
        .submit(json!({"model": "echo", "prompt": "finished before exit", "params": {"sleep_ms": 1500}}))
        .await;
    let id = id(&task);
    api.wait_for(&id, 60, "picked up", |t| t["status"] != "queued")
        .await;
    p.terminate();
    let status = p.exit_status(90).await;
    assert!(status.success(), "exit status {status}\n{}", p.output());
    drop(p);

    // Reopen the data without workers: only the stopped process can have finished the task.
    let s = Server::start_with(
        |c| {
            c.data_dir = dir.path().to_path_buf();
            c.dev_key = Some(DEV_KEY.to_string());
            c.workers = 0;
        },
        Hooks::default(),
    )
    .await;
    let t = s.get(&format!("/tasks/{id}")).await.body;
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(download(output_url(&t)).await, b"finished before exit");
    s.stop().await;
}

#[tokio::test]
async fn the_dev_accounts_credits_come_from_tasklane_dev_credits() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("TASKLANE_DEV_KEY", DEV_KEY),
        ("TASKLANE_DEV_CREDITS", "123"),
        ("TASKLANE_WORKERS", "1"),
    ];
    let mut p = Tasklane::spawn(dir.path(), &env);
    let api = p.client(DEV_KEY).await;
    assert_eq!(api.credits().await, 123);
    p.terminate();
    let status = p.exit_status(90).await;
    assert!(status.success(), "exit status {status}\n{}", p.output());
}

/// Starts the binary with `name=value`; asserts it refuses to start, naming `name` on stderr.
async fn assert_refused_at_start(name: &str, value: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Tasklane::spawn(dir.path(), &[("TASKLANE_DEV_KEY", DEV_KEY), (name, value)]);
    let status = p.exit_status(60).await;
    assert!(
        !status.success(),
        "{name}={value} was accepted\n{}",
        p.output()
    );
    let stderr = p.stderr.lock().unwrap().clone();
    assert!(
        stderr.contains(name),
        "stderr does not name {name}\n{}",
        p.output()
    );
    let stdout = p.stdout.lock().unwrap().clone();
    assert!(
        !stdout.contains("listening"),
        "it started anyway\n{}",
        p.output()
    );
}

#[tokio::test]
async fn zero_workers_is_refused_at_start_with_a_message_naming_tasklane_workers() {
    assert_refused_at_start("TASKLANE_WORKERS", "0").await;
}

#[tokio::test]
async fn non_numeric_dev_credits_are_refused_at_start_with_a_message_naming_the_variable() {
    assert_refused_at_start("TASKLANE_DEV_CREDITS", "abc").await;
}

#[tokio::test]
async fn an_invalid_log_format_is_refused_at_start_with_a_message_naming_the_variable() {
    assert_refused_at_start("TASKLANE_LOG_FORMAT", "yaml").await;
}

/// The log lines among what the binary printed to stdout (not its start-up banner).
fn log_lines(stdout: &str) -> Vec<&str> {
    const BANNER: [&str; 4] = [
        "tasklane is listening on ",
        "development API key: ",
        "data directory: ",
        "try: ",
    ];
    stdout
        .lines()
        .filter(|l| !l.is_empty() && !BANNER.iter().any(|b| l.starts_with(b)))
        .collect()
}

#[tokio::test]
async fn logs_to_a_pipe_carry_no_colour_codes_and_the_json_format_is_one_object_a_line() {
    for format in ["", "json"] {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Tasklane::spawn(
            dir.path(),
            &[
                ("TASKLANE_DEV_KEY", DEV_KEY),
                ("TASKLANE_LOG_FORMAT", format),
            ],
        );
        let api = p.client(DEV_KEY).await;
        let task = api
            .submit(json!({"model": "echo", "prompt": "logged"}))
            .await;
        api.wait_terminal(&id(&task), 30).await;
        p.terminate();
        let status = p.exit_status(60).await;
        assert!(status.success(), "exit status {status}\n{}", p.output());
        let stdout = p.stdout.lock().unwrap().clone();
        assert!(
            !stdout.contains('\x1b') && !p.stderr.lock().unwrap().contains('\x1b'),
            "TASKLANE_LOG_FORMAT={format:?}: escape codes in a log written to a pipe\n{}",
            p.output()
        );
        let lines = log_lines(&stdout);
        assert!(
            lines.iter().any(|l| l.contains("task submitted")),
            "TASKLANE_LOG_FORMAT={format:?}: no log of the submit\n{}",
            p.output()
        );
        for line in lines {
            let parsed = serde_json::from_str::<Value>(line);
            if format == "json" {
                let object = parsed.unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(object["level"].is_string() && object["timestamp"].is_string());
            } else {
                assert!(parsed.is_err(), "a JSON line in the text format: {line}");
            }
        }
    }
}
