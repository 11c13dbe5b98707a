//! A fake of fal.ai's queue API on loopback, faithful to what tasklane's fal provider
//! (`tasklane_core::providers::fal`) relies on, with switches a test flips to make it
//! misbehave the way the real one can. One listener plays the queue (`queue.fal.run`), the
//! JWKS host (`rest.fal.ai`) and the CDN (`v3.fal.media`).
//!
//! Behaviour, each from the page cited:
//!
//! - **Auth** (<https://fal.ai/docs/api-reference/inference-api>): every queue route needs
//!   `Authorization: Key <key>` ([`FakeFal::key`], `id:secret` like a real one); anything else
//!   is `401 {"detail": "No user found for Key ID and Secret"}`.
//! - **Submit** (<https://docs.fal.ai/model-endpoints/queue>): `POST /{owner}/{app}[/{path}]`
//!   with the input as a JSON object (else `422` with `detail[]`), `?fal_webhook=<url>`
//!   optional. The answer is `200 {"request_id", "response_url", "status_url", "cancel_url",
//!   "queue_position"}` (plus `gateway_request_id` with a webhook), the URLs naming only
//!   `/{owner}/{app}/requests/{id}`: the subpath is dropped, as fal's docs warn; the header
//!   `x-fal-request-id` carries the id. The queue accepts any input: validation happens when
//!   the request runs.
//! - **Status**: `GET /{owner}/{app}/requests/{id}/status[?logs=1]`: `202 IN_QUEUE` with a
//!   falling `queue_position`, then `202 IN_PROGRESS`, then `200 COMPLETED` with
//!   `metrics.inference_time`; the `logs` key is always there, `null` unless `?logs=1` (or
//!   `logs=true`) asks for them (the SDK indexes it directly), else a list of `{message, level,
//!   source: "USER", timestamp}` growing by one `Generating: N%` line a step. Timing by
//!   [`Lifecycle`].
//! - **Outcome by prompt** (no `FAILED` status: a failure is `COMPLETED` with `error` and
//!   `error_type`, <https://docs.fal.ai/errors>):
//!   - success: the result `GET /{owner}/{app}/requests/{id}` is `200` with
//!     `{"images": [<file>], "seed", "has_nsfw_concepts", "prompt", "timings"}`, a file being
//!     `{"url", "content_type", "file_name", "file_size", "width", "height"}` on the fake's own
//!     `/files/{id}/{name}` (public: no auth, like fal's CDN). [`FakeFal::set_output`]
//!     replaces it;
//!   - a prompt containing `fail`: a model error, the result `422 {"detail": [{"loc": ["body",
//!     "prompt"], "msg", "type": "content_policy_violation", "url"}]}` with `X-Fal-Retryable:
//!     false`;
//!   - no `prompt` in the input: the validation error `422 {"detail": [{"loc": ["body",
//!     "prompt"], "msg": "Field required", "type": "missing"}]}`;
//!   - a prompt containing `crash`: a request error
//!     (<https://docs.fal.ai/documentation/model-apis/request-errors>), the result `503
//!     {"detail": "Runner disconnected", "error_type": "runner_disconnected"}` with
//!     `X-Fal-Error-Type`;
//!   - a prompt containing `hang`: `IN_PROGRESS` until cancelled.
//!
//!   The result of a request not yet completed is `400 {"detail": "Request is still in
//!   progress"}`; an unknown id (or another app's) is `404`.
//! - **Cancel** (<https://fal.ai/docs/inference-api/queue/cancel>): `PUT
//!   /{owner}/{app}/requests/{id}/cancel`: queued or running, `202 {"status":
//!   "CANCELLATION_REQUESTED"}` and the request ends `COMPLETED` with `error_type:
//!   client_cancelled` (the fake's app honours the signal; a queued one never produces a
//!   result); completed, `400 {"status": "ALREADY_COMPLETED"}`; unknown, `404 {"status":
//!   "NOT_FOUND"}`.
//! - **Webhooks** (<https://docs.fal.ai/model-apis/model-endpoints/webhooks>): one POST to
//!   `fal_webhook` when the request ends: `{request_id, gateway_request_id, status: "OK",
//!   payload}`, or `status: "ERROR"` with `error` and the error body as `payload`, or (switch
//!   [`FakeFal::payload_error`]) `OK` with `payload: null` and `payload_error`. Retried on a
//!   non-2xx answer or no answer, up to 10 times (the docs: over 2 hours; here after
//!   [`WEBHOOK_RETRIES`]); [`FakeFal::redeliver`] sends a request's webhook again. Signed with
//!   ED25519: `X-Fal-Webhook-Request-Id`, `-User-Id`, `-Timestamp`, `-Signature` (hex) over
//!   `request_id\nuser_id\ntimestamp\nhex(sha256(body))`, with a test key published at
//!   [`FakeFal::jwks_url`] (`/.well-known/jwks.json`, `{"keys": [{"kty": "OKP", "crv":
//!   "Ed25519", "x"}]}`); [`FakeFal::skew_webhooks`] shifts the timestamps,
//!   [`FakeFal::drop_webhooks`] loses them all, [`FakeFal::sign`] signs a body of the test's
//!   with the published key or an unpublished one. Webhooks go to loopback targets only (tests
//!   never leave it): any other is counted as dropped.
//! - **Gateway errors** (<https://docs.fal.ai/model-apis/model-endpoints/reliability>):
//!   [`FakeFal::throttle_next`] and [`FakeFal::unavailable_next`] answer the next queue
//!   requests nginx-style `429` / `503` (an HTML page, no `x-fal-request-id`), before the key
//!   is looked at; [`FakeFal::user_timeout_next`] answers the next submits `504 {"detail":
//!   "Request timed out", "error_type": "request_timeout"}` with `X-Fal-Request-Timeout-Type:
//!   user` and `X-Fal-Error-Type`, which the SDK never retries.
//!
//! Counters for what the tests check.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use ed25519_dalek::Signer;
use rand::Rng;
use serde_json::{Value, json};
use sha2::Digest;

/// How long requests submitted from now on take (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifecycle {
    /// Time `IN_QUEUE`.
    pub queued: Duration,
    /// Length of one `IN_PROGRESS` step (one `Generating: N%` log line each).
    pub step: Duration,
    /// Number of steps before `COMPLETED`.
    pub steps: u32,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            queued: Duration::from_millis(200),
            step: Duration::from_millis(200),
            steps: 4,
        }
    }
}

/// Delays before a webhook's retries (fal: 10 retries over 2 hours; shortened).
pub const WEBHOOK_RETRIES: [Duration; 10] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(8),
    Duration::from_secs(8),
    Duration::from_secs(8),
    Duration::from_secs(8),
];
/// The user id webhooks are signed for.
pub const USER_ID: &str = "f4ke-user-0001";
/// How often a request's webhook driver looks at it.
const TICK: Duration = Duration::from_millis(20);
/// The message of the fake's content policy error.
pub const POLICY_MESSAGE: &str = "The content could not be processed because it contained material flagged by a content checker.";

/// A running fake fal on `127.0.0.1`; stopped when dropped.
pub struct FakeFal {
    /// Base URL, `http://127.0.0.1:<port>` (no trailing slash): the catalog's `endpoint`.
    pub url: String,
    /// Where the webhook signing keys are published: the catalog's `jwks_url`.
    pub jwks_url: String,
    /// The one key it accepts (`id:secret`).
    pub key: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Succeed,
    Fail,
    Invalid,
    Crash,
    Hang,
}

struct Request {
    id: String,
    app: String,
    path: String,
    input: Value,
    prompt: String,
    kind: Kind,
    webhook: Option<String>,
    created: Instant,
    lifecycle: Lifecycle,
    output: Option<Value>,
    /// When a cancel arrived, from creation.
    canceled: Option<Duration>,
}

/// Where a request is.
enum Phase {
    Queued { position: u64 },
    Running { steps_done: u32 },
    Done,
    Canceled,
}

struct Shared {
    base: String,
    key: String,
    signing: ed25519_dalek::SigningKey,
    unpublished: ed25519_dalek::SigningKey,
    lifecycle: Mutex<Lifecycle>,
    requests: Mutex<HashMap<String, Request>>,
    output: Mutex<Option<Value>>,
    throttle_next: AtomicUsize,
    unavailable_next: AtomicUsize,
    user_timeout_next: AtomicUsize,
    drop_webhooks: AtomicBool,
    payload_error: AtomicBool,
    skew: AtomicI64,
    closed: AtomicBool,
    submits: AtomicUsize,
    accepted: AtomicUsize,
    throttled: AtomicUsize,
    unavailable: AtomicUsize,
    unauthorized: AtomicUsize,
    status_reads: AtomicUsize,
    result_reads: AtomicUsize,
    cancels: AtomicUsize,
    file_downloads: AtomicUsize,
    jwks_fetches: AtomicUsize,
    key_sent_elsewhere: AtomicUsize,
    webhooks_sent: AtomicUsize,
    webhooks_dropped: AtomicUsize,
    webhook_answers: Mutex<Vec<(String, u16)>>,
    client: reqwest::Client,
}

impl FakeFal {
    /// Starts a fake on a free loopback port with a fresh key and webhook signing keypair.
    pub async fn start() -> FakeFal {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port for the fake fal");
        let addr = listener.local_addr().expect("its address");
        let url = format!("http://{addr}");
        let key = format!(
            "{}:{}",
            uuid(),
            hex::encode(rand::rng().random::<[u8; 16]>())
        );
        let shared = Arc::new(Shared {
            base: url.clone(),
            key: key.clone(),
            signing: ed25519_dalek::SigningKey::from_bytes(&rand::rng().random()),
            unpublished: ed25519_dalek::SigningKey::from_bytes(&rand::rng().random()),
            lifecycle: Mutex::new(Lifecycle::default()),
            requests: Mutex::default(),
            output: Mutex::default(),
            throttle_next: AtomicUsize::new(0),
            unavailable_next: AtomicUsize::new(0),
            user_timeout_next: AtomicUsize::new(0),
            drop_webhooks: AtomicBool::new(false),
            payload_error: AtomicBool::new(false),
            skew: AtomicI64::new(0),
            closed: AtomicBool::new(false),
            submits: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            throttled: AtomicUsize::new(0),
            unavailable: AtomicUsize::new(0),
            unauthorized: AtomicUsize::new(0),
            status_reads: AtomicUsize::new(0),
            result_reads: AtomicUsize::new(0),
            cancels: AtomicUsize::new(0),
            file_downloads: AtomicUsize::new(0),
            jwks_fetches: AtomicUsize::new(0),
            key_sent_elsewhere: AtomicUsize::new(0),
            webhooks_sent: AtomicUsize::new(0),
            webhooks_dropped: AtomicUsize::new(0),
            webhook_answers: Mutex::default(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .timeout(Duration::from_secs(15))
                .user_agent("fake-fal-webhooks")
                .build()
                .expect("a webhook client"),
        });
        let app = axum::Router::new()
            .fallback(route)
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeFal {
            jwks_url: format!("{url}/.well-known/jwks.json"),
            url,
            key,
            shared,
            server,
        }
    }

    /// The lifecycle of requests submitted from now on.
    pub fn set_lifecycle(&self, lifecycle: Lifecycle) {
        *lock(&self.shared.lifecycle) = lifecycle;
    }

    /// Replaces the result of requests submitted from now on that succeed (`None`: the
    /// default, one image). In its strings, `{base}` becomes the fake's URL and `{request_id}`
    /// the request's id, so `{base}/files/{request_id}/clip.mp4` is a file the fake serves
    /// (its type by extension: `png`, `jpg`, `mp4`, `wav`, else octet-stream).
    pub fn set_output(&self, output: Option<Value>) {
        *lock(&self.shared.output) = output;
    }

    /// Drops every webhook from now on (counted, not sent): lost callbacks.
    pub fn drop_webhooks(&self, drop: bool) {
        self.shared.drop_webhooks.store(drop, Ordering::SeqCst);
    }

    /// Signs webhooks from now on with a timestamp `secs` off the clock.
    pub fn skew_webhooks(&self, secs: i64) {
        self.shared.skew.store(secs, Ordering::SeqCst);
    }

    /// Successful requests' webhooks carry `payload: null` and a `payload_error` while set.
    pub fn payload_error(&self, on: bool) {
        self.shared.payload_error.store(on, Ordering::SeqCst);
    }

    /// Answers the next `n` queue requests nginx-style `429` (`0` stops it).
    pub fn throttle_next(&self, n: usize) {
        self.shared.throttle_next.store(n, Ordering::SeqCst);
    }

    /// Answers the next `n` queue requests nginx-style `503` (`0` stops it).
    pub fn unavailable_next(&self, n: usize) {
        self.shared.unavailable_next.store(n, Ordering::SeqCst);
    }

    /// Answers the next `n` submits `504` with `X-Fal-Request-Timeout-Type: user`.
    pub fn user_timeout_next(&self, n: usize) {
        self.shared.user_timeout_next.store(n, Ordering::SeqCst);
    }

    /// Sends request `id`'s webhook again (a redelivery: same body, fresh timestamp and
    /// signature); returns the receiver's status code (0: none), or `None` when the request
    /// has no webhook or has not ended.
    pub async fn redeliver(&self, id: &str) -> Option<u16> {
        let (target, body) = self.shared.webhook_of(id)?;
        Some(self.shared.deliver(id, &target, &body).await)
    }

    /// The headers fal signs webhook `body` about `request_id` with, at Unix time `ts`, by the
    /// published key (`published`) or by a key the JWKS does not list.
    pub fn sign(
        &self,
        request_id: &str,
        body: &[u8],
        ts: i64,
        published: bool,
    ) -> Vec<(String, String)> {
        let key = if published {
            &self.shared.signing
        } else {
            &self.shared.unpublished
        };
        signature_headers(key, request_id, body, ts)
    }

    /// Submit requests received, whatever was answered.
    pub fn submits(&self) -> usize {
        self.shared.submits.load(Ordering::SeqCst)
    }

    /// Requests queued.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Queue requests answered `429`.
    pub fn throttled(&self) -> usize {
        self.shared.throttled.load(Ordering::SeqCst)
    }

    /// Queue requests answered `503`.
    pub fn unavailable(&self) -> usize {
        self.shared.unavailable.load(Ordering::SeqCst)
    }

    /// Queue requests answered `401`.
    pub fn unauthorized(&self) -> usize {
        self.shared.unauthorized.load(Ordering::SeqCst)
    }

    /// Status reads answered (with the key).
    pub fn status_reads(&self) -> usize {
        self.shared.status_reads.load(Ordering::SeqCst)
    }

    /// Result reads answered (with the key).
    pub fn result_reads(&self) -> usize {
        self.shared.result_reads.load(Ordering::SeqCst)
    }

    /// Cancel requests received (with the key).
    pub fn cancels(&self) -> usize {
        self.shared.cancels.load(Ordering::SeqCst)
    }

    /// Output files served.
    pub fn file_downloads(&self) -> usize {
        self.shared.file_downloads.load(Ordering::SeqCst)
    }

    /// Requests to the CDN or the JWKS that carried an `Authorization` header (the key must
    /// go to the queue only).
    pub fn key_sent_elsewhere(&self) -> usize {
        self.shared.key_sent_elsewhere.load(Ordering::SeqCst)
    }

    /// JWKS fetches.
    pub fn jwks_fetches(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Webhook requests sent (retries and redeliveries included).
    pub fn webhooks_sent(&self) -> usize {
        self.shared.webhooks_sent.load(Ordering::SeqCst)
    }

    /// Webhooks dropped ([`FakeFal::drop_webhooks`], or a non-loopback target).
    pub fn webhooks_dropped(&self) -> usize {
        self.shared.webhooks_dropped.load(Ordering::SeqCst)
    }

    /// Each webhook sent: its request id and the receiver's status code (0: no answer).
    pub fn webhook_answers(&self) -> Vec<(String, u16)> {
        lock(&self.shared.webhook_answers).clone()
    }

    /// Request `id`: `{request_id, app, path, input, webhook, status}` (`status`: `IN_QUEUE`,
    /// `IN_PROGRESS`, `COMPLETED` or `CANCELLED`).
    pub fn request(&self, id: &str) -> Option<Value> {
        lock(&self.shared.requests).get(id).map(summary)
    }

    /// Every request, as [`FakeFal::request`] shows it, oldest first.
    pub fn requests(&self) -> Vec<Value> {
        let map = lock(&self.shared.requests);
        let mut all: Vec<&Request> = map.values().collect();
        all.sort_by_key(|r| r.created);
        all.into_iter().map(summary).collect()
    }

    /// The bytes of file `name` of request `id` (a signature for its type, then the names:
    /// the fake renders nothing).
    pub fn file_bytes(id: &str, name: &str) -> Vec<u8> {
        let mut b = match content_type(name) {
            "image/png" => b"\x89PNG\r\n\x1a\n".to_vec(),
            "video/mp4" => b"\x00\x00\x00\x18ftypmp42".to_vec(),
            _ => Vec::new(),
        };
        b.extend_from_slice(format!("fake fal output {name} of {id}").as_bytes());
        b
    }
}

impl Drop for FakeFal {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.server.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A random UUID (version 4 layout), as fal's request ids are.
fn uuid() -> String {
    let b: [u8; 16] = rand::rng().random();
    let h = hex::encode(b);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next().unwrap_or_default() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "mp4" => "video/mp4",
        "wav" => "audio/wav",
        _ => "application/octet-stream",
    }
}

/// The webhook signature headers of `body` by `key`.
fn signature_headers(
    key: &ed25519_dalek::SigningKey,
    request_id: &str,
    body: &[u8],
    ts: i64,
) -> Vec<(String, String)> {
    let message = format!(
        "{request_id}\n{USER_ID}\n{ts}\n{}",
        hex::encode(sha2::Sha256::digest(body))
    );
    let signature = key.sign(message.as_bytes());
    vec![
        ("x-fal-webhook-request-id".into(), request_id.into()),
        ("x-fal-webhook-user-id".into(), USER_ID.into()),
        ("x-fal-webhook-timestamp".into(), ts.to_string()),
        (
            "x-fal-webhook-signature".into(),
            hex::encode(signature.to_bytes()),
        ),
    ]
}

fn json_response(status: u16, body: &Value) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn detail(status: u16, text: &str) -> Response {
    json_response(status, &json!({ "detail": text }))
}

/// An nginx error page (no JSON, no `x-fal-request-id`).
fn nginx(status: u16, reason: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "text/html")],
        format!(
            "<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n<center><h1>{status} \
             {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
        ),
    )
        .into_response()
}

fn take(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

fn summary(r: &Request) -> Value {
    let status = match phase(r) {
        Phase::Queued { .. } => "IN_QUEUE",
        Phase::Running { .. } => "IN_PROGRESS",
        Phase::Done => "COMPLETED",
        Phase::Canceled => "CANCELLED",
    };
    json!({
        "request_id": r.id,
        "app": r.app,
        "path": r.path,
        "input": r.input,
        "webhook": r.webhook,
        "status": status,
    })
}

fn phase(r: &Request) -> Phase {
    let lc = r.lifecycle;
    let e = r.created.elapsed();
    let end = lc.queued + lc.step * lc.steps;
    let natural_end = (r.kind != Kind::Hang).then_some(end);
    if let Some(c) = r.canceled
        && natural_end.is_none_or(|end| c < end)
        && c <= e
    {
        return Phase::Canceled;
    }
    if e < lc.queued {
        let left = (lc.queued - e).as_millis() as u64;
        return Phase::Queued {
            position: left / 100,
        };
    }
    if r.kind == Kind::Hang || e < end {
        let k = ((e - lc.queued).as_millis() / lc.step.as_millis().max(1)) as u32;
        let cap = if r.kind == Kind::Hang {
            lc.steps.saturating_sub(1)
        } else {
            lc.steps
        };
        return Phase::Running {
            steps_done: k.min(cap),
        };
    }
    Phase::Done
}

/// The log entries after `k` steps.
fn log_entries(r: &Request, k: u32, done: bool) -> Value {
    let now = chrono::Utc::now().to_rfc3339();
    let entry =
        |m: String| json!({"message": m, "level": "INFO", "source": "USER", "timestamp": now});
    let mut logs = vec![entry("Starting generation".into())];
    for i in 1..=k {
        logs.push(entry(format!(
            "Generating: {}%",
            i * 100 / r.lifecycle.steps.max(1)
        )));
    }
    if done {
        logs.push(entry("Done".into()));
    }
    Value::Array(logs)
}

/// Replaces `{base}` and `{request_id}` in every string of `v`.
fn fill(v: &Value, base: &str, id: &str) -> Value {
    match v {
        Value::String(s) => json!(s.replace("{base}", base).replace("{request_id}", id)),
        Value::Array(a) => Value::Array(a.iter().map(|x| fill(x, base, id)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| (k.clone(), fill(x, base, id)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// How a finished request failed: the result endpoint's status, headers and body, the status
/// answer's `error` and `error_type`.
struct Failure {
    code: u16,
    headers: Vec<(&'static str, String)>,
    body: Value,
    error: String,
    error_type: String,
}

impl Shared {
    fn urls(&self, r: &Request) -> Value {
        let response_url = format!("{}/{}/requests/{}", self.base, r.app, r.id);
        json!({
            "response_url": response_url,
            "status_url": format!("{response_url}/status"),
            "cancel_url": format!("{response_url}/cancel"),
        })
    }

    fn output_of(&self, r: &Request) -> Value {
        match &r.output {
            Some(t) => fill(t, &self.base, &r.id),
            None => {
                let name = "image-0.png";
                json!({
                    "images": [{
                        "url": format!("{}/files/{}/{name}", self.base, r.id),
                        "content_type": "image/png",
                        "file_name": name,
                        "file_size": FakeFal::file_bytes(&r.id, name).len(),
                        "width": 1024,
                        "height": 768,
                    }],
                    "seed": 196619188,
                    "has_nsfw_concepts": [false],
                    "prompt": r.prompt,
                    "timings": {"inference": 1.7},
                })
            }
        }
    }

    /// How request `r` failed, if it did.
    fn failure(&self, r: &Request, canceled: bool) -> Option<Failure> {
        if canceled {
            return Some(Failure {
                code: 499,
                headers: vec![("x-fal-error-type", "client_cancelled".into())],
                body: json!({"detail": "Request cancelled by the client", "error_type": "client_cancelled"}),
                error: "Request cancelled by the client".into(),
                error_type: "client_cancelled".into(),
            });
        }
        let model_error = |msg: &str, kind: &str, url: Option<&str>| {
            let mut d = json!({"loc": ["body", "prompt"], "msg": msg, "type": kind});
            if let Some(u) = url {
                d["url"] = json!(u);
            }
            Failure {
                code: 422,
                headers: vec![("x-fal-retryable", "false".into())],
                body: json!({ "detail": [d] }),
                error: "Unprocessable Entity".into(),
                error_type: kind.into(),
            }
        };
        match r.kind {
            Kind::Fail => Some(model_error(
                POLICY_MESSAGE,
                "content_policy_violation",
                Some("https://docs.fal.ai/errors#content_policy_violation"),
            )),
            Kind::Invalid => Some(model_error("Field required", "missing", None)),
            Kind::Crash => Some(Failure {
                code: 503,
                headers: vec![("x-fal-error-type", "runner_disconnected".into())],
                body: json!({"detail": "Runner disconnected", "error_type": "runner_disconnected"}),
                error: "Runner disconnected".into(),
                error_type: "runner_disconnected".into(),
            }),
            Kind::Succeed | Kind::Hang => None,
        }
    }

    /// The status answer of request `r`.
    fn status_of(&self, r: &Request, logs: bool) -> (u16, Value) {
        let mut v = self.urls(r);
        v["request_id"] = json!(r.id);
        v["metrics"] = json!({});
        v["logs"] = Value::Null;
        match phase(r) {
            Phase::Queued { position } => {
                v["status"] = json!("IN_QUEUE");
                v["queue_position"] = json!(position);
                (202, v)
            }
            Phase::Running { steps_done } => {
                v["status"] = json!("IN_PROGRESS");
                if logs {
                    v["logs"] = log_entries(r, steps_done, false);
                }
                (202, v)
            }
            p @ (Phase::Done | Phase::Canceled) => {
                let canceled = matches!(p, Phase::Canceled);
                v["status"] = json!("COMPLETED");
                if logs {
                    v["logs"] =
                        log_entries(r, if canceled { 0 } else { r.lifecycle.steps }, !canceled);
                }
                if let Some(f) = self.failure(r, canceled) {
                    v["error"] = json!(f.error);
                    v["error_type"] = json!(f.error_type);
                } else {
                    v["metrics"] = json!({"inference_time": 1.7});
                }
                (200, v)
            }
        }
    }

    /// The result endpoint's answer for request `r`.
    fn result_of(&self, r: &Request) -> Response {
        let canceled = match phase(r) {
            Phase::Queued { .. } | Phase::Running { .. } => {
                return detail(400, "Request is still in progress");
            }
            Phase::Done => false,
            Phase::Canceled => true,
        };
        match self.failure(r, canceled) {
            None => json_response(200, &self.output_of(r)),
            Some(f) => {
                let mut resp = json_response(f.code, &f.body);
                for (k, v) in f.headers {
                    if let Ok(v) = HeaderValue::from_str(&v) {
                        resp.headers_mut().insert(k, v);
                    }
                }
                resp
            }
        }
    }

    /// The webhook of request `id` once it ended: its target and body.
    fn webhook_of(&self, id: &str) -> Option<(String, Vec<u8>)> {
        let map = lock(&self.requests);
        let r = map.get(id)?;
        let target = r.webhook.clone()?;
        let canceled = match phase(r) {
            Phase::Done => false,
            Phase::Canceled => true,
            _ => return None,
        };
        let mut body = json!({"request_id": r.id, "gateway_request_id": r.id});
        match self.failure(r, canceled) {
            None if self.payload_error.load(Ordering::SeqCst) => {
                body["status"] = json!("OK");
                body["payload"] = Value::Null;
                body["payload_error"] = json!(
                    "Response payload is not JSON serializable. Either return a JSON \
                     serializable object or use the queue endpoint to retrieve the response."
                );
            }
            None => {
                body["status"] = json!("OK");
                body["payload"] = self.output_of(r);
            }
            Some(f) => {
                body["status"] = json!("ERROR");
                body["error"] = json!(format!("Invalid status code: {}", f.code));
                body["payload"] = f.body;
            }
        }
        Some((target, body.to_string().into_bytes()))
    }

    /// Sends one webhook delivery; returns the receiver's status (0: none).
    async fn deliver(&self, id: &str, target: &str, body: &[u8]) -> u16 {
        let loopback = reqwest::Url::parse(target).ok().is_some_and(|u| {
            let host = u.host_str().unwrap_or_default();
            host == "localhost"
                || host
                    .trim_matches(['[', ']'])
                    .parse::<IpAddr>()
                    .is_ok_and(|a| a.is_loopback())
        });
        if self.drop_webhooks.load(Ordering::SeqCst) || !loopback {
            self.webhooks_dropped.fetch_add(1, Ordering::SeqCst);
            return 0;
        }
        let ts = chrono::Utc::now().timestamp() + self.skew.load(Ordering::SeqCst);
        let mut req = self
            .client
            .post(target)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        for (k, v) in signature_headers(&self.signing, id, body, ts) {
            req = req.header(k, v);
        }
        self.webhooks_sent.fetch_add(1, Ordering::SeqCst);
        let status = match req.send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        };
        lock(&self.webhook_answers).push((id.to_string(), status));
        status
    }

    /// Sends request `id`'s webhook when it ends, retrying until one is acknowledged.
    async fn drive_webhook(self: Arc<Self>, id: String) {
        let (target, body) = loop {
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(TICK).await;
            if let Some(w) = self.webhook_of(&id) {
                break w;
            }
            if !lock(&self.requests).contains_key(&id) {
                return;
            }
        };
        for attempt in 0..=WEBHOOK_RETRIES.len() {
            if attempt > 0 {
                tokio::time::sleep(WEBHOOK_RETRIES[attempt - 1]).await;
            }
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            let status = self.deliver(&id, &target, &body).await;
            if (200..300).contains(&status) || self.drop_webhooks.load(Ordering::SeqCst) {
                return;
            }
        }
    }

    /// The checks every queue route makes first: the gateway switches, then the key.
    fn gate(&self, headers: &HeaderMap) -> Option<Response> {
        if take(&self.throttle_next) {
            self.throttled.fetch_add(1, Ordering::SeqCst);
            return Some(nginx(429, "Too Many Requests"));
        }
        if take(&self.unavailable_next) {
            self.unavailable.fetch_add(1, Ordering::SeqCst);
            return Some(nginx(503, "Service Temporarily Unavailable"));
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Key "));
        if presented != Some(self.key.as_str()) {
            self.unauthorized.fetch_add(1, Ordering::SeqCst);
            return Some(detail(401, "No user found for Key ID and Secret"));
        }
        None
    }

    /// A cancel of request `id` of `app`.
    fn cancel(&self, id: &str, app: &str) -> Response {
        self.cancels.fetch_add(1, Ordering::SeqCst);
        let mut map = lock(&self.requests);
        let Some(r) = map.get_mut(id).filter(|r| r.app == app) else {
            return json_response(404, &json!({"status": "NOT_FOUND"}));
        };
        match phase(r) {
            Phase::Queued { .. } | Phase::Running { .. } => {
                r.canceled = Some(r.created.elapsed());
                json_response(202, &json!({"status": "CANCELLATION_REQUESTED"}))
            }
            Phase::Done | Phase::Canceled => {
                json_response(400, &json!({"status": "ALREADY_COMPLETED"}))
            }
        }
    }

    async fn submit(
        self: Arc<Self>,
        segments: &[&str],
        query: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Response {
        self.submits.fetch_add(1, Ordering::SeqCst);
        if let Some(r) = self.gate(headers) {
            return r;
        }
        if take(&self.user_timeout_next) {
            let mut r = json_response(
                504,
                &json!({"detail": "Request timed out", "error_type": "request_timeout"}),
            );
            r.headers_mut().insert(
                "x-fal-request-timeout-type",
                HeaderValue::from_static("user"),
            );
            r.headers_mut().insert(
                "x-fal-error-type",
                HeaderValue::from_static("request_timeout"),
            );
            return r;
        }
        let Ok(Value::Object(input)) = serde_json::from_slice::<Value>(body) else {
            return json_response(
                422,
                &json!({"detail": [{"loc": ["body"], "msg": "Input should be a valid dictionary", "type": "dict_type"}]}),
            );
        };
        let webhook = reqwest::Url::parse(&format!("http://fake/?{query}"))
            .ok()
            .and_then(|u| {
                u.query_pairs()
                    .find(|(k, _)| k == "fal_webhook")
                    .map(|(_, v)| v.into_owned())
            });
        if let Some(w) = &webhook
            && !reqwest::Url::parse(w).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
        {
            return json_response(
                422,
                &json!({"detail": [{"loc": ["query", "fal_webhook"], "msg": "Input should be a valid URL", "type": "url_parsing"}]}),
            );
        }
        let prompt = input
            .get("prompt")
            .and_then(Value::as_str)
            .map(str::to_string);
        let kind = match &prompt {
            None => Kind::Invalid,
            Some(p) if p.contains("fail") => Kind::Fail,
            Some(p) if p.contains("crash") => Kind::Crash,
            Some(p) if p.contains("hang") => Kind::Hang,
            Some(_) => Kind::Succeed,
        };
        let id = uuid();
        let r = Request {
            id: id.clone(),
            app: segments[..2].join("/"),
            path: segments.join("/"),
            input: Value::Object(input),
            prompt: prompt.unwrap_or_default(),
            kind,
            webhook: webhook.clone(),
            created: Instant::now(),
            lifecycle: *lock(&self.lifecycle),
            output: lock(&self.output).clone(),
            canceled: None,
        };
        let mut answer = self.urls(&r);
        answer["request_id"] = json!(id);
        answer["queue_position"] = json!(0);
        if webhook.is_some() {
            answer["gateway_request_id"] = json!(id);
        }
        lock(&self.requests).insert(id.clone(), r);
        self.accepted.fetch_add(1, Ordering::SeqCst);
        if webhook.is_some() {
            tokio::spawn(self.clone().drive_webhook(id.clone()));
        }
        let mut resp = json_response(200, &answer);
        if let Ok(v) = HeaderValue::from_str(&id) {
            resp.headers_mut().insert("x-fal-request-id", v);
        }
        resp
    }
}

/// Every request: the queue routes, the JWKS and the files (see the module documentation).
async fn route(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').collect();
    let query = uri.query().unwrap_or_default();
    match (method.as_str(), segments.as_slice()) {
        ("GET", [".well-known", "jwks.json"]) => {
            s.jwks_fetches.fetch_add(1, Ordering::SeqCst);
            if headers.contains_key(header::AUTHORIZATION) {
                s.key_sent_elsewhere.fetch_add(1, Ordering::SeqCst);
            }
            let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(s.signing.verifying_key().to_bytes());
            json_response(
                200,
                &json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "fake-fal-1", "use": "sig", "alg": "EdDSA"}]}),
            )
        }
        ("GET", ["files", id, name]) => {
            if headers.contains_key(header::AUTHORIZATION) {
                s.key_sent_elsewhere.fetch_add(1, Ordering::SeqCst);
            }
            let served = lock(&s.requests)
                .get(*id)
                .is_some_and(|r| matches!(phase(r), Phase::Done) && s.failure(r, false).is_none());
            if !served {
                return (StatusCode::NOT_FOUND, "Not Found").into_response();
            }
            s.file_downloads.fetch_add(1, Ordering::SeqCst);
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, content_type(name))],
                FakeFal::file_bytes(id, name),
            )
                .into_response()
        }
        (m, [owner, app, "requests", id, rest @ ..]) if rest.len() <= 1 => {
            if let Some(r) = s.gate(&headers) {
                return r;
            }
            let app = format!("{owner}/{app}");
            if m == "PUT" && rest == ["cancel"] {
                return s.cancel(id, &app);
            }
            let map = lock(&s.requests);
            let Some(r) = map.get(*id).filter(|r| r.app == app) else {
                return detail(404, "Request not found");
            };
            match (m, rest) {
                ("GET", []) => {
                    s.result_reads.fetch_add(1, Ordering::SeqCst);
                    s.result_of(r)
                }
                ("GET", ["status"]) => {
                    s.status_reads.fetch_add(1, Ordering::SeqCst);
                    let logs = query.split('&').any(|p| p == "logs=1" || p == "logs=true");
                    let (code, v) = s.status_of(r, logs);
                    json_response(code, &v)
                }
                _ => detail(405, "Method Not Allowed"),
            }
        }
        ("POST", [_, _, ..])
            if segments.iter().all(|s| !s.is_empty()) && segments.get(2) != Some(&"requests") =>
        {
            s.submit(&segments, query, &headers, &body).await
        }
        _ => detail(404, "Not Found"),
    }
}
