//! Models served by a real Cog server (coglet 0.23.1 from the test venv, predictors in
//! `tests/cog/`), through the local server and a catalog naming them:
//!
//! - success: the output travels from Cog's callback into tasklane's own blob store and is
//!   served by tasklane's URL; progress and the log's tail show on the task while it runs;
//! - a predictor that fails: `generation_failed` with Cog's message, refunded;
//! - a predictor that hangs: cancelled on Cog at the model's timeout, `timeout`, refunded;
//! - a lost callback: the check (a re-sent PUT) finds the prediction forgotten and started
//!   again; the second run's callback ends the task (and a second loss fails it, refunded);
//! - forged and duplicated callbacks change nothing;
//! - a server with its one slot busy: tasks wait queued and all complete;
//! - tasklane stopping between the start and its record: the prediction is not run twice.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::{Server, answer, task_id};
use serde_json::{Value, json};
use tasklane_core::ports::{PortError, PortResult};
use tasklane_core::task::Transition;
use tasklane_local::{Hooks, LocalConfig};
use tasklane_testkit::cog::CogServer;
use tasklane_testkit::intercept::{Interceptor, Op};

/// A catalog with one Cog model, `veo3`, served by `cog`, timing out after `timeout` seconds.
/// Cog passes every input to the predictor, which refuses one it does not declare: the
/// predictors in `tests/cog/` all take `prompt`, `duration` and `fps`.
fn catalog(url: &str, timeout: u64, extra: &str) -> String {
    let mut text = format!(
        r#"
[models.veo3]
provider = "cog"
description = "Video from a prompt, on our Cog server"
endpoint = "{url}"
prompt = {{ required = true, max_length = 500 }}
price = {{ per_second = 10 }}
timeout = {timeout}
trusted_hosts = ["127.0.0.1"]
{extra}
"#
    );
    text.push_str(
        r#"duration = { min = 1, max = 8, default = 2 }

[models.veo3.params.fps]
type = "integer"
min = 1
max = 30
description = "frames per second"
"#,
    );
    text
}

async fn start(cog: &CogServer, timeout: u64, f: impl FnOnce(&mut LocalConfig)) -> Server {
    start_hooked(cog, timeout, f, Hooks::default()).await
}

async fn start_hooked(
    cog: &CogServer,
    timeout: u64,
    f: impl FnOnce(&mut LocalConfig),
    hooks: Hooks,
) -> Server {
    Server::start_with_catalog(&catalog(&cog.url, timeout, ""), f, hooks).await
}

/// How many times the render predictor started rendering `prompt`.
fn renders(cog: &CogServer, prompt: &str) -> usize {
    cog.log().matches(&format!("frames for '{prompt}'")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cog_model_runs_and_its_output_is_served_by_tasklane() {
    let cog = CogServer::start("render");
    let s = start(&cog, 60, |_| {}).await;
    let before = s.credits().await;
    let task = s
        .submit(
            json!({"model": "veo3", "prompt": "a red fox", "duration": 4, "params": {"fps": 4}}),
        )
        .await;
    let id = task_id(&task);
    assert_eq!(task["cost"]["credits"], 40, "{task}");
    // While it renders (about 2 s), progress and the log's tail show on the task.
    let running = s
        .wait_for(&id, 20, "progress from Cog's logs", |t| {
            t["status"] == "processing" && t["progress"].as_u64().unwrap_or(0) > 0
        })
        .await;
    assert!(
        running["logs"].as_str().unwrap_or("").contains("progress:"),
        "{running}"
    );
    let done = s.wait_terminal(&id, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["progress"], 100);
    assert!(done["logs"].as_str().unwrap().contains("done"), "{done}");
    let out = &done["result"]["outputs"][0];
    assert_eq!(out["content_type"], "image/gif", "{done}");
    let url = out["url"].as_str().unwrap();
    assert!(
        !url.contains(&cog.url) && !url.starts_with("data:"),
        "served by tasklane: {url}"
    );
    let gif = s.client.get(url).send().await.unwrap();
    assert_eq!(gif.status(), 200);
    let bytes = gif.bytes().await.unwrap();
    assert_eq!(&bytes[..4], b"GIF8");
    assert_eq!(out["size_bytes"].as_u64().unwrap(), bytes.len() as u64);
    assert_eq!(s.credits().await, before - 40, "charged once, not refunded");
    assert_eq!(renders(&cog, "a red fox"), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_predictor_fails_the_task_with_its_message_and_a_refund() {
    let cog = CogServer::start("fail");
    let s = start(&cog, 60, |_| {}).await;
    let before = s.credits().await;
    let task = s
        .submit(json!({"model": "veo3", "prompt": "forbidden words"}))
        .await;
    let done = s.wait_terminal(&task_id(&task), 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "generation_failed");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("the prompt was refused: forbidden words"),
        "{message}"
    );
    assert_eq!(done["cost"]["refunded"], true);
    assert_eq!(s.credits().await, before);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_prediction_is_cancelled_on_cog_at_the_timeout_and_refunded() {
    let cog = CogServer::start("hang");
    let s = start(&cog, 2, |_| {}).await;
    let before = s.credits().await;
    let task = s
        .submit(json!({"model": "veo3", "prompt": "forever"}))
        .await;
    let done = s.wait_terminal(&task_id(&task), 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "timeout", "{done}");
    assert_eq!(s.credits().await, before, "refunded");
    // Cog's slot is free again: the prediction was cancelled there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let health: Value = reqwest::get(format!("{}/health-check", cog.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if health["status"] == "READY" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Cog still busy: {health}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cog.log().to_lowercase().contains("cancel"), "{}", cog.log());
    s.stop().await;
}

/// A loopback proxy standing in front of tasklane's callback route that drops (answers 400 to,
/// which Cog does not retry) the first `drop` terminal callbacks and forwards everything else.
struct LossyProxy {
    url: String,
    dropped: Arc<AtomicUsize>,
}

async fn lossy_proxy(target: String, drop: usize) -> LossyProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let dropped = Arc::new(AtomicUsize::new(0));
    let counter = dropped.clone();
    let client = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let target = target.clone();
        let client = client.clone();
        let counter = counter.clone();
        async move {
            let uri = req.uri().clone();
            let body = axum::body::to_bytes(req.into_body(), usize::MAX)
                .await
                .unwrap();
            let state: Value = serde_json::from_slice(&body).unwrap_or_default();
            let terminal = ["succeeded", "failed", "canceled"]
                .contains(&state["status"].as_str().unwrap_or(""));
            if terminal && counter.load(Ordering::SeqCst) < drop {
                counter.fetch_add(1, Ordering::SeqCst);
                return axum::http::StatusCode::BAD_REQUEST;
            }
            let resp = client
                .post(format!("{target}{}", uri))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            axum::http::StatusCode::from_u16(resp.status().as_u16()).unwrap()
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    LossyProxy { url, dropped }
}

/// A server whose upstream callbacks reach it through a [`LossyProxy`] dropping `drop`.
async fn behind_lossy_proxy(cog: &CogServer, drop: usize) -> (Server, LossyProxy) {
    // The proxy needs the server's address before the server starts: pick a free port.
    let server_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = lossy_proxy(format!("http://{server_addr}"), drop).await;
    let public = proxy.url.clone();
    let s = start(cog, 60, move |c| {
        c.addr = server_addr;
        c.core.public_url = Some(public);
    })
    .await;
    (s, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_callback_is_found_by_a_check_and_the_prediction_runs_again_once() {
    let cog = CogServer::start("render");
    // Callbacks go through the proxy, which loses the first terminal one.
    let (s, proxy) = behind_lossy_proxy(&cog, 1).await;
    let before = s.credits().await;
    let task = s
        .submit(json!({"model": "veo3", "prompt": "lost once", "duration": 1}))
        .await;
    let done = s.wait_terminal(&task_id(&task), 40).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(proxy.dropped.load(Ordering::SeqCst), 1);
    assert_eq!(
        renders(&cog, "lost once"),
        2,
        "the forgotten prediction ran again"
    );
    assert_eq!(s.credits().await, before - 10, "charged once");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_lost_twice_fails_the_task_with_a_refund() {
    let cog = CogServer::start("render");
    let (s, _proxy) = behind_lossy_proxy(&cog, usize::MAX).await;
    let before = s.credits().await;
    let task = s
        .submit(json!({"model": "veo3", "prompt": "always lost", "duration": 1}))
        .await;
    let done = s.wait_terminal(&task_id(&task), 40).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "upstream_unavailable", "{done}");
    assert_eq!(s.credits().await, before, "refunded");
    let runs = renders(&cog, "always lost");
    assert!(
        (2..=3).contains(&runs),
        "one re-run (a third cancelled at once): {runs}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_duplicated_callbacks_change_nothing() {
    let cog = CogServer::start("render");
    let s = start(&cog, 60, |_| {}).await;
    let task = s
        .submit(json!({"model": "veo3", "prompt": "the real one", "duration": 1}))
        .await;
    let task_id = task_id(&task);
    let running = s
        .wait_for(&task_id, 20, "started on Cog", |t| {
            t["status"] == "processing"
        })
        .await;
    let forged = json!({"id": task_id, "status": "succeeded", "output": "data:text/plain;base64,Zm9yZ2Vk", "logs": ""});
    let route = s.url(&format!("/upstream/cog/{task_id}"));
    // No token, a wrong token, the right provider with another task's route.
    for url in [
        route.clone(),
        format!("{route}?token=0000"),
        format!("{route}?token="),
    ] {
        let a = answer(s.client.post(&url).json(&forged)).await;
        assert_eq!(a.status, 401, "{url}: {}", a.body);
    }
    let a = answer(
        s.client
            .post(s.url(&format!("/upstream/replicate/{task_id}?token=x")))
            .json(&forged),
    )
    .await;
    assert_eq!(a.status, 404, "{}", a.body);
    let a = answer(
        s.client
            .post(s.url("/upstream/cog/task_01JABCDEFGHJKMNPQRSTVWXYZ0?token=x"))
            .json(&forged),
    )
    .await;
    assert_eq!(a.status, 404, "{}", a.body);
    assert_eq!(running["status"], "processing");
    let done = s.wait_terminal(&task_id, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"]["outputs"][0]["content_type"], "image/gif");
    // The genuine callback replayed, with the task's own token, after the end: nothing moves.
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
    let a = answer(
        s.client
            .post(format!("{route}?token={token}"))
            .json(&forged),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let again = s.get(&format!("/tasks/{task_id}")).await.body;
    assert_eq!(
        again["result"]["outputs"][0]["content_type"], "image/gif",
        "{again}"
    );
    assert_eq!(again["completed_at"], done["completed_at"]);
    // A body Cog would never send is refused with the API's error shape.
    let a = answer(
        s.client
            .post(format!("{route}?token={token}"))
            .body("not json"),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);
    s.stop().await;
}

/// A loopback proxy in front of a Cog server that counts the `409` (all slots busy) answers.
struct BusyCounter {
    url: String,
    busy: Arc<AtomicUsize>,
}

async fn busy_counter(cog: &CogServer) -> BusyCounter {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let busy = Arc::new(AtomicUsize::new(0));
    let (target, counter, client) = (cog.url.clone(), busy.clone(), reqwest::Client::new());
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let (target, counter, client) = (target.clone(), counter.clone(), client.clone());
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let mut out = client.request(parts.method, format!("{target}{}", parts.uri));
            for name in ["prefer", "content-type"] {
                if let Some(v) = parts.headers.get(name) {
                    out = out.header(name, v.as_bytes());
                }
            }
            let resp = out.body(body).send().await.unwrap();
            let status = resp.status().as_u16();
            if status == 409 {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            let bytes = resp.bytes().await.unwrap();
            (
                axum::http::StatusCode::from_u16(status).unwrap(),
                [("content-type", "application/json")],
                bytes,
            )
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    BusyCounter { url, busy }
}

/// Submits three one-second renders and waits until all end; asserts none failed, and
/// returns whether some task was seen queued while another processed.
async fn three_tasks_all_complete(s: &Server) -> bool {
    let mut ids = Vec::new();
    for i in 0..3 {
        let t = s
            .submit(json!({"model": "veo3", "prompt": format!("slot {i}"), "duration": 1}))
            .await;
        ids.push(task_id(&t));
    }
    let mut saw_waiting = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut statuses = Vec::new();
        for id in &ids {
            statuses.push(s.get(&format!("/tasks/{id}")).await.body["status"].clone());
        }
        if statuses.iter().any(|s| s == "processing") && statuses.iter().any(|s| s == "queued") {
            saw_waiting = true;
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
    saw_waiting
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_cog_server_makes_tasks_wait_queued_and_none_fail() {
    let cog = CogServer::start("render");
    let proxy = busy_counter(&cog).await;
    let s = Server::start_with_catalog(
        &catalog(&proxy.url, 60, ""),
        |c| c.workers = 3,
        Hooks::default(),
    )
    .await;
    // With no limit in the catalog, tasklane learns the slot is busy from Cog's 409.
    let saw_waiting = three_tasks_all_complete(&s).await;
    assert!(saw_waiting, "one slot: tasks waited their turn");
    assert!(proxy.busy.load(Ordering::SeqCst) > 0, "Cog answered 409");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalogs_concurrency_keeps_tasks_queued_before_the_upstream_refuses_any() {
    let cog = CogServer::start("render");
    let proxy = busy_counter(&cog).await;
    let s = Server::start_with_catalog(
        &catalog(&proxy.url, 60, "concurrency = 1"),
        |c| c.workers = 3,
        Hooks::default(),
    )
    .await;
    let saw_waiting = three_tasks_all_complete(&s).await;
    assert!(saw_waiting, "tasks waited for the model's one slot");
    assert_eq!(
        proxy.busy.load(Ordering::SeqCst),
        0,
        "tasklane never sent Cog more than its one slot"
    );
    s.stop().await;
}

/// Halts the worker when it records the start of an upstream run: tasklane "crashes" between
/// starting the prediction and recording it.
struct CrashAfterStart {
    armed: AtomicBool,
}

#[async_trait]
impl Interceptor for CrashAfterStart {
    async fn before(&self, _op: Op) -> PortResult<()> {
        Ok(())
    }

    async fn before_update(&self, transition: &Transition) -> PortResult<()> {
        if matches!(transition, Transition::UpstreamStarted { .. })
            && self.armed.swap(false, Ordering::SeqCst)
        {
            return Err(PortError::Halted);
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_was_not_recorded_is_not_run_twice() {
    let cog = CogServer::start("render");
    let crash = Arc::new(CrashAfterStart { armed: true.into() });
    let s = start_hooked(
        &cog,
        60,
        |c| {
            // The halted attempt's lease runs out quickly and its message comes back.
            c.core.lease = Duration::from_secs(1);
            c.core.visibility = Duration::from_secs(2);
        },
        tasklane_testkit::intercept::hooks(crash.clone()),
    )
    .await;
    let task = s
        .submit(json!({"model": "veo3", "prompt": "only once", "duration": 8}))
        .await;
    let done = s.wait_terminal(&task_id(&task), 40).await;
    // The prediction (4 s) outlived the halted attempt: a second attempt sent the start again.
    let stored = s.app().store.task(&task_id(&task)).await.unwrap().unwrap();
    assert_eq!(stored.attempts, 2, "{stored:?}");
    assert_eq!(done["status"], "completed", "{done}");
    assert!(!crash.armed.load(Ordering::SeqCst), "the crash happened");
    assert_eq!(renders(&cog, "only once"), 1, "{}", cog.log());
    s.stop().await;
}
