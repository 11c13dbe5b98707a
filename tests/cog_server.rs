//! The Cog harness (`tasklane_testkit::cog`) runs the real coglet server, and coglet does what
//! the Cog provider adapter relies on: async PUT, idempotent re-PUT while running, webhooks
//! ending in `succeeded` with a data URI, `failed` with the error, `canceled` after a cancel,
//! `409` when busy, and no process left behind.
//!
//! Needs the test venv with cog installed (`scripts/test.sh` makes it); panics without it.

use std::time::Duration;

use serde_json::{Value, json};
use tasklane_testkit::cog::CogServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// A loopback webhook receiver: every POSTed JSON body, in arrival order. Answers 200.
struct Hooks {
    url: String,
    bodies: mpsc::UnboundedReceiver<Value>,
    seen: Vec<Value>,
}

impl Hooks {
    async fn bind() -> Hooks {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let (tx, bodies) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Some(body) = read_request_body(&mut stream).await {
                        let _ = tx.send(serde_json::from_slice(&body).unwrap());
                    }
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                });
            }
        });
        Hooks {
            url,
            bodies,
            seen: Vec::new(),
        }
    }

    /// The next webhook body, within `secs` seconds.
    async fn next(&mut self, secs: u64) -> Value {
        let body = tokio::time::timeout(Duration::from_secs(secs), self.bodies.recv())
            .await
            .unwrap_or_else(|_| panic!("no webhook in {secs} s; before: {:?}", self.seen))
            .expect("the receiver runs");
        self.seen.push(body.clone());
        body
    }

    /// Webhooks until one with a terminal status (returned last), within `secs` seconds.
    async fn until_terminal(&mut self, secs: u64) -> Vec<Value> {
        let mut all = Vec::new();
        loop {
            let body = self.next(secs).await;
            let done = matches!(
                body["status"].as_str(),
                Some("succeeded" | "failed" | "canceled")
            );
            all.push(body);
            if done {
                return all;
            }
        }
    }
}

/// The body of one HTTP/1.1 request (headers up to a blank line, then `content-length` bytes).
async fn read_request_body(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(buf[head_end..head_end + length].to_vec())
}

/// `PUT /predictions/{id}` with `Prefer: respond-async`: status and JSON body.
async fn put(cog: &CogServer, id: &str, body: &Value) -> (u16, Value) {
    let answer = reqwest::Client::new()
        .put(format!("{}/predictions/{id}", cog.url))
        .header("Prefer", "respond-async")
        .json(body)
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap())
}

/// Standard base64 (with padding), enough for a data URI's payload.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {:?}", c as char),
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        acc = (acc << 6) | u32::from(value(c));
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

const ALL_EVENTS: [&str; 4] = ["start", "logs", "output", "completed"];

#[tokio::test(flavor = "multi_thread")]
async fn render_runs_async_with_webhooks_and_a_re_put_while_running_is_idempotent() {
    let cog = CogServer::start("render");
    let mut hooks = Hooks::bind().await;
    let mut other_hooks = Hooks::bind().await;
    // Unique ids: coglet keeps a folder /tmp/coglet/predictions/<id> whatever TMPDIR says.
    let id = &format!("cogtest-render-{}", std::process::id());
    let request = json!({
        "input": {"prompt": "a red fox", "duration": 2},
        "webhook": hooks.url,
        "webhook_events_filter": ALL_EVENTS,
    });

    let (status, body) = put(&cog, id, &request).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body, json!({"id": id, "status": "starting"}));

    // The start webhook says `processing`, with no logs yet.
    let start = hooks.next(10).await;
    assert_eq!(start["status"], "processing", "{start}");
    assert_eq!(start["logs"], "");

    // Re-PUT while running, the same body: 202 with the current state, not a second run.
    let (status, again) = put(&cog, id, &request).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["id"], id.as_str());
    assert_eq!(again["status"], "processing", "{again}");
    assert_eq!(again["input"], request["input"]);
    // ... and with another input and webhook: the original prediction still, both ignored.
    let other = json!({
        "input": {"prompt": "something else", "duration": 1},
        "webhook": other_hooks.url,
        "webhook_events_filter": ALL_EVENTS,
    });
    let (status, changed) = put(&cog, id, &other).await;
    assert_eq!(status, 202, "{changed}");
    assert_eq!(changed["status"], "processing");
    assert_eq!(changed["input"], request["input"], "{changed}");

    // Another id while the only slot is busy: 409.
    let (status, busy) = put(&cog, &format!("{id}-other"), &request).await;
    assert_eq!(status, 409, "{busy}");
    assert_eq!(
        busy,
        json!({"error": "At capacity - all prediction slots busy", "status": "failed"})
    );

    let webhooks = hooks.until_terminal(30).await;
    let completed = webhooks.last().unwrap();
    assert_eq!(completed["status"], "succeeded", "{completed}");
    assert_eq!(completed["id"], id.as_str());
    assert!(completed["metrics"]["predict_time"].as_f64().unwrap() > 0.5);
    let logs = completed["logs"].as_str().unwrap();
    assert!(logs.contains("progress: 100%\n"), "{logs}");
    // Logs webhooks carry all lines so far.
    for hook in &webhooks {
        let so_far = hook["logs"].as_str().unwrap();
        assert!(
            logs.starts_with(so_far),
            "{so_far:?} is not a prefix of {logs:?}"
        );
    }
    let uri = completed["output"]
        .as_str()
        .expect("the output as a string");
    let payload = uri
        .strip_prefix("data:image/gif;base64,")
        .unwrap_or_else(|| panic!("not a GIF data URI: {:.60}", uri));
    assert!(base64_decode(payload).starts_with(b"GIF8"));

    // The re-PUT with another webhook sent it nothing.
    assert!(other_hooks.bodies.try_recv().is_err());

    // A re-PUT after it finished starts a new run under the same id: coglet forgets finished
    // predictions. For a few ms after the completed webhook the slot is not yet free: the
    // re-PUT may still answer the finished state or 409.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let (status, rerun) = put(&cog, id, &request).await;
        if (status, &rerun) == (202, &json!({"id": id, "status": "starting"})) {
            break;
        }
        assert!(
            (status == 202 && rerun["status"] == "succeeded") || status == 409,
            "{status} {rerun}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new run: {status} {rerun}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // (The first run's output webhook may come late, after its completed one: skip it.)
    let mut restarted = hooks.next(10).await;
    while restarted.get("output").is_some() {
        restarted = hooks.next(10).await;
    }
    assert_eq!(restarted["status"], "processing", "{restarted}");
    assert_eq!(restarted["id"], id.as_str());
    // An unknown id cannot be cancelled.
    let cancel = reqwest::Client::new()
        .post(format!("{}/predictions/cogtest-unknown/cancel", cog.url))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status().as_u16(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_reports_the_error_and_a_cancel_ends_canceled_leaving_no_process() {
    let fail_id = &format!("cogtest-fail-{}", std::process::id());
    let hang_id = &format!("cogtest-hang-{}", std::process::id());
    let fail = CogServer::start("fail");
    let hang = CogServer::start("hang");
    let mut hooks = Hooks::bind().await;

    let (status, _) = put(
        &fail,
        fail_id,
        &json!({"input": {"prompt": "nope"}, "webhook": hooks.url, "webhook_events_filter": ALL_EVENTS}),
    )
    .await;
    assert_eq!(status, 202);
    let failed = hooks.until_terminal(30).await.pop().unwrap();
    assert_eq!(failed["status"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.ends_with("ValueError: the prompt was refused: nope"),
        "{error}"
    );
    assert!(failed.get("output").is_none(), "{failed}");

    let mut hang_hooks = Hooks::bind().await;
    let (status, _) = put(
        &hang,
        hang_id,
        &json!({"input": {"prompt": "x"}, "webhook": hang_hooks.url, "webhook_events_filter": ALL_EVENTS}),
    )
    .await;
    assert_eq!(status, 202);
    // A cancel that reaches the worker before the predictor's code runs is answered 200 and
    // lost: wait until the predictor has logged (the re-PUT shows its state).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, state) = put(&hang, hang_id, &json!({"input": {"prompt": "x"}})).await;
        if state["logs"]
            .as_str()
            .is_some_and(|l| l.contains("hanging on"))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the predictor never ran: {state}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cancel_url = format!("{}/predictions/{hang_id}/cancel", hang.url);
    let client = reqwest::Client::new();
    let cancel = client.post(&cancel_url).send().await.unwrap();
    assert_eq!(cancel.status().as_u16(), 200);
    assert_eq!(cancel.json::<Value>().await.unwrap(), json!({}));
    let canceled = hang_hooks.until_terminal(10).await.pop().unwrap();
    assert_eq!(canceled["status"], "canceled", "{canceled}");
    assert_eq!(canceled["id"], hang_id.as_str());
    // Once over (and its slot released, a few ms later), the id is unknown: 404.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while client.post(&cancel_url).send().await.unwrap().status() != 404 {
        assert!(tokio::time::Instant::now() < deadline, "cancel never 404");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Dropping the harness kills the server and its Python worker: nothing of the group stays.
    let group = hang.pid();
    assert!(in_group(group) >= 2, "the server and its worker run");
    drop(hang);
    for _ in 0..50 {
        if in_group(group) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("processes of group {group} remain after drop");
}

/// How many live (not zombie) processes are in process group `group`.
fn in_group(group: u32) -> usize {
    let out = std::process::Command::new("ps")
        .args(["-e", "-o", "pgid=,stat="])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            let mut f = l.split_whitespace();
            f.next() == Some(&group.to_string()) && !f.next().unwrap_or("").starts_with('Z')
        })
        .count()
}
