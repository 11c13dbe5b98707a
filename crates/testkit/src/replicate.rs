//! A fake of Replicate's predictions API on loopback, faithful to what tasklane's Replicate
//! provider (`tasklane_core::providers::replicate`) relies on, with switches a test flips to
//! make it misbehave the way the real one can.
//!
//! Behaviour, each from the documentation page cited (the same pages as the provider's):
//!
//! - **Auth** (<https://replicate.com/docs/reference/http#authentication>): every route needs
//!   `Authorization: Bearer <token>` ([`FakeReplicate::token`]); without it, or with another
//!   token: `401` problem+json `{"title":"Unauthenticated","detail":"You did not pass an
//!   authentication token","status":401}` (the body Replicate's maintainers quote in
//!   <https://github.com/replicate/replicate-python/issues/47>).
//! - **Create** (<https://replicate.com/docs/topics/predictions/create-a-prediction>):
//!   `POST /v1/models/{owner}/{name}/predictions`, `POST /v1/deployments/{owner}/{name}/predictions`
//!   and `POST /v1/predictions` with `version` (`owner/name`, `owner/name:<64 hex>` or
//!   `<64 hex>`; a version other than [`FakeReplicate::VERSION`] gets the documented `422`
//!   `{"title":"Invalid version or not permitted",...}`). The body takes only `version`,
//!   `input`, `webhook`, `webhook_events_filter`, `stream` and `webhook_completed` (the
//!   OpenAPI schema has `additionalProperties: false`); the fake model requires
//!   `input.prompt` and answers its absence with the validation `422` carrying
//!   `invalid_fields`. Headers (OpenAPI `parameters`): `Prefer` must match
//!   `^wait(=([1-9]|[1-9][0-9]|60))?$` (`wait` alone is 60 s) and holds the answer until the
//!   prediction ends or the time runs out; `Cancel-After` (`30s`, `5m`, `1h30m`, a bare number
//!   of seconds; at least 5 s) sets `deadline`. Replicate does not document the status of a
//!   malformed header: the fake answers `400` problem+json. The answer is `201` with the
//!   prediction, or `202` when a `Prefer: wait` ran out before it ended ("created but does not
//!   yet have all outputs"), with `Location` and `urls.get` naming `GET /v1/predictions/{id}`.
//! - **Lifecycle** (<https://replicate.com/docs/topics/predictions/lifecycle>), driven by time
//!   ([`Lifecycle`]): `starting`, then `processing` with `logs` growing by one
//!   `progress: N%` line a step, then (the sync-mode quirk the SDK works around) one step of
//!   `processing` with the output already present, then `succeeded`. A prompt containing
//!   `fail` ends `failed` with an `error`; one containing `hang` stays `processing` until
//!   cancelled. A cancel (`POST /v1/predictions/{id}/cancel`, `200` with the prediction) ends a
//!   running prediction `canceled`; a `Cancel-After` deadline that passes before the start
//!   ends it `aborted`, after it `canceled` (<https://replicate.com/changelog/2025-10-16-prediction-deadlines>).
//!   Unknown ids: `404` problem+json.
//! - **Outputs** (<https://replicate.com/docs/topics/predictions/output-files>): a list with
//!   one file URL on the fake's own host (standing in for `replicate.delivery`), served only
//!   with the bearer token (`401` without); [`FakeReplicate::set_output`] replaces the output
//!   of predictions created afterwards. **Retention**
//!   (<https://replicate.com/docs/topics/predictions/data-retention>): one hour after a
//!   prediction completed, by a clock the test moves ([`FakeReplicate::advance_clock`]),
//!   `output` is `null`, `data_removed` `true` and the file `404`.
//! - **Webhooks** (<https://replicate.com/docs/topics/webhooks/receive-webhook>): the body is
//!   the prediction as `GET` shows it; events `start` (at creation, status `starting`),
//!   `logs` and `output` (each at most every 500 ms, sent once, never retried) and
//!   `completed`; without `webhook_events_filter` only `output` and `completed`. Only the
//!   terminal webhook is retried on a non-2xx answer or a failed connection, with the same
//!   `webhook-id`, after 0.25, 0.5, 1, 2, 4, 8, 16 and 30 s (the last about a minute after the
//!   end, as documented). Signed per <https://replicate.com/docs/topics/webhooks/verify-webhook>
//!   (Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>`)
//!   with [`FakeReplicate::webhook_secret`], which `GET /v1/webhooks/default/secret` also gives
//!   (`{"key":"whsec_…"}`). Webhooks go to loopback targets only (tests never leave it): any
//!   other is counted as dropped.
//! - **Rate limits** (<https://replicate.com/docs/topics/predictions/rate-limits>):
//!   [`FakeReplicate::throttle_creates`] answers the next creates `429`
//!   `{"detail":"Request was throttled. Your rate limit resets in ~30s."}`, with or without a
//!   `Retry-After` header (undocumented, but the SDK honours it).
//!
//! Switches: [`FakeReplicate::drop_webhooks`] (lost callbacks), [`FakeReplicate::throttle_creates`],
//! [`FakeReplicate::fail_next`] (`500` for the next requests, whatever the route, before
//! anything is done), [`FakeReplicate::refuse_credit`] (`402` on create); counters for what
//! the tests check.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use chrono::{DateTime, Utc};
use rand::Rng;
use serde_json::{Value, json};

/// How long predictions created from now on take (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifecycle {
    /// Time in `starting`.
    pub starting: Duration,
    /// Length of one `processing` step (one `progress: N%` log line each).
    pub step: Duration,
    /// Number of progress steps before the output appears.
    pub steps: u32,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            starting: Duration::from_millis(200),
            step: Duration::from_millis(200),
            steps: 4,
        }
    }
}

/// How long outputs are kept after a prediction completed (API predictions: one hour).
pub const RETENTION: Duration = Duration::from_secs(3600);
/// Delays before the terminal webhook's retries.
pub const TERMINAL_RETRIES: [Duration; 8] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
    Duration::from_secs(30),
];
/// Smallest interval between two `logs`/`output` webhooks of one prediction.
const INTERMEDIATE_THROTTLE: Duration = Duration::from_millis(500);
/// How often a prediction's webhook driver looks at it.
const TICK: Duration = Duration::from_millis(20);

/// A running fake Replicate on `127.0.0.1`; stopped when dropped.
pub struct FakeReplicate {
    /// Base URL, `http://127.0.0.1:<port>` (no trailing slash): the catalog's `endpoint`.
    pub url: String,
    /// The one API token it accepts (`r8_…`).
    pub token: String,
    /// The account's webhook signing secret (`whsec_…`).
    pub webhook_secret: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Succeed,
    Fail,
    Hang,
}

struct Prediction {
    id: String,
    model: String,
    version: String,
    deployment: Option<String>,
    input: Value,
    prompt: String,
    kind: Kind,
    webhook: Option<String>,
    filter: Vec<String>,
    created: Instant,
    created_at: DateTime<Utc>,
    lifecycle: Lifecycle,
    output: Option<Value>,
    /// `Cancel-After`, from creation.
    deadline: Option<Duration>,
    /// When a cancel arrived, from creation.
    canceled: Option<Duration>,
}

#[derive(Default)]
struct Throttle {
    remaining: usize,
    retry_after: Option<String>,
}

struct Shared {
    base: String,
    token: String,
    secret: String,
    lifecycle: Mutex<Lifecycle>,
    predictions: Mutex<HashMap<String, Prediction>>,
    output: Mutex<Option<Value>>,
    throttle: Mutex<Throttle>,
    clock: Mutex<Duration>,
    fail_next: AtomicUsize,
    drop_webhooks: AtomicBool,
    refuse_credit: AtomicBool,
    closed: AtomicBool,
    creates: AtomicUsize,
    created: AtomicUsize,
    throttled: AtomicUsize,
    cancels: AtomicUsize,
    unauthorized: AtomicUsize,
    file_downloads: AtomicUsize,
    webhooks_sent: AtomicUsize,
    webhooks_dropped: AtomicUsize,
    webhook_answers: Mutex<Vec<(String, u16)>>,
    client: reqwest::Client,
}

impl FakeReplicate {
    /// The one model version the fake knows (`POST /v1/predictions` with another gets `422`):
    /// `replicate/hello-world`'s, from the API reference's example.
    pub const VERSION: &'static str =
        "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa";
    /// The model [`FakeReplicate::VERSION`] is a version of.
    pub const VERSION_MODEL: &'static str = "replicate/hello-world";

    /// Starts a fake on a free loopback port with a fresh token and webhook secret.
    pub async fn start() -> FakeReplicate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port for the fake Replicate");
        let addr = listener.local_addr().expect("its address");
        let url = format!("http://{addr}");
        let token = format!("r8_{}", random_id(37));
        let mut key = [0u8; 24];
        rand::rng().fill(&mut key);
        let webhook_secret = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(key)
        );
        let shared = Arc::new(Shared {
            base: url.clone(),
            token: token.clone(),
            secret: webhook_secret.clone(),
            lifecycle: Mutex::new(Lifecycle::default()),
            predictions: Mutex::default(),
            output: Mutex::default(),
            throttle: Mutex::default(),
            clock: Mutex::default(),
            fail_next: AtomicUsize::new(0),
            drop_webhooks: AtomicBool::new(false),
            refuse_credit: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            creates: AtomicUsize::new(0),
            created: AtomicUsize::new(0),
            throttled: AtomicUsize::new(0),
            cancels: AtomicUsize::new(0),
            unauthorized: AtomicUsize::new(0),
            file_downloads: AtomicUsize::new(0),
            webhooks_sent: AtomicUsize::new(0),
            webhooks_dropped: AtomicUsize::new(0),
            webhook_answers: Mutex::default(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .timeout(Duration::from_secs(5))
                .user_agent("fake-replicate-webhooks")
                .build()
                .expect("a webhook client"),
        });
        let app = axum::Router::new()
            .route("/v1/predictions", post(create_version))
            .route("/v1/models/{owner}/{name}/predictions", post(create_model))
            .route(
                "/v1/deployments/{owner}/{name}/predictions",
                post(create_deployment),
            )
            .route("/v1/predictions/{id}", get(read))
            .route("/v1/predictions/{id}/cancel", post(cancel))
            .route("/v1/webhooks/default/secret", get(secret))
            .route("/files/{id}/{name}", get(file))
            .fallback(|| async {
                problem(
                    404,
                    "Not found",
                    "The requested resource could not be found.",
                )
            })
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeReplicate {
            url,
            token,
            webhook_secret,
            shared,
            server,
        }
    }

    /// The lifecycle of predictions created from now on.
    pub fn set_lifecycle(&self, lifecycle: Lifecycle) {
        *lock(&self.shared.lifecycle) = lifecycle;
    }

    /// Replaces the `output` of predictions created from now on that succeed (`None`: the
    /// default, a list with one file on the fake's host).
    pub fn set_output(&self, output: Option<Value>) {
        *lock(&self.shared.output) = output;
    }

    /// Drops every webhook from now on (they are counted, not sent): lost callbacks.
    pub fn drop_webhooks(&self, drop: bool) {
        self.shared.drop_webhooks.store(drop, Ordering::SeqCst);
    }

    /// Answers the next `n` creates `429`, with `Retry-After: <retry_after>` when given (e.g.
    /// `"1"` or an HTTP date), else only the throttle `detail`. `n = 0` stops throttling.
    pub fn throttle_creates(&self, n: usize, retry_after: Option<&str>) {
        *lock(&self.shared.throttle) = Throttle {
            remaining: n,
            retry_after: retry_after.map(str::to_string),
        };
    }

    /// Answers the next `n` requests (any route) `500`.
    pub fn fail_next(&self, n: usize) {
        self.shared.fail_next.store(n, Ordering::SeqCst);
    }

    /// Answers creates `402` "Insufficient credit" while set.
    pub fn refuse_credit(&self, refuse: bool) {
        self.shared.refuse_credit.store(refuse, Ordering::SeqCst);
    }

    /// Moves the retention clock forward by `by` (outputs older than [`RETENTION`] are removed).
    pub fn advance_clock(&self, by: Duration) {
        *lock(&self.shared.clock) += by;
    }

    /// Create requests received, whatever was answered.
    pub fn creates(&self) -> usize {
        self.shared.creates.load(Ordering::SeqCst)
    }

    /// Predictions created.
    pub fn created(&self) -> usize {
        self.shared.created.load(Ordering::SeqCst)
    }

    /// Creates answered `429`.
    pub fn throttled(&self) -> usize {
        self.shared.throttled.load(Ordering::SeqCst)
    }

    /// Cancel requests received (with a valid token).
    pub fn cancels(&self) -> usize {
        self.shared.cancels.load(Ordering::SeqCst)
    }

    /// Requests answered `401` (no valid token).
    pub fn unauthorized(&self) -> usize {
        self.shared.unauthorized.load(Ordering::SeqCst)
    }

    /// Output files served (with the token).
    pub fn file_downloads(&self) -> usize {
        self.shared.file_downloads.load(Ordering::SeqCst)
    }

    /// Webhook requests sent (retries included).
    pub fn webhooks_sent(&self) -> usize {
        self.shared.webhooks_sent.load(Ordering::SeqCst)
    }

    /// Webhooks dropped ([`FakeReplicate::drop_webhooks`], or a non-loopback target).
    pub fn webhooks_dropped(&self) -> usize {
        self.shared.webhooks_dropped.load(Ordering::SeqCst)
    }

    /// Each webhook sent: its `webhook-id` and the receiver's status code (0: no answer).
    pub fn webhook_answers(&self) -> Vec<(String, u16)> {
        lock(&self.shared.webhook_answers).clone()
    }

    /// Prediction `id` as `GET /v1/predictions/{id}` shows it now.
    pub fn prediction(&self, id: &str) -> Option<Value> {
        let map = lock(&self.shared.predictions);
        map.get(id).map(|p| self.shared.view(p))
    }

    /// Every prediction, as [`FakeReplicate::prediction`] shows it, oldest first.
    pub fn predictions(&self) -> Vec<Value> {
        let map = lock(&self.shared.predictions);
        let mut all: Vec<&Prediction> = map.values().collect();
        all.sort_by_key(|p| p.created);
        all.into_iter().map(|p| self.shared.view(p)).collect()
    }

    /// The bytes of a successful prediction's output file for `prompt` (a PNG signature and
    /// the prompt: the fake renders nothing).
    pub fn file_bytes(prompt: &str) -> Vec<u8> {
        let mut b = b"\x89PNG\r\n\x1a\nfake replicate output for ".to_vec();
        b.extend_from_slice(prompt.as_bytes());
        b
    }
}

impl Drop for FakeReplicate {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.server.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `n` characters of Replicate's id alphabet (lowercase base32).
fn random_id(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A problem+json answer (<https://replicate.com/docs/reference/http>, RFC 7807).
fn problem(status: u16, title: &str, detail: &str) -> Response {
    problem_body(
        status,
        json!({"title": title, "detail": detail, "status": status}),
    )
}

fn problem_body(status: u16, body: Value) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `Cancel-After`: `30s`, `5m`, `1h30m`, `250ms`, or a bare number of seconds.
fn parse_cancel_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = v;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else {
            match rest.as_bytes().first()? {
                b'h' => (Duration::from_secs(3600), 1),
                b'm' => (Duration::from_secs(60), 1),
                b's' => (Duration::from_secs(1), 1),
                _ => return None,
            }
        };
        total += unit * n as u32;
        rest = &rest[len..];
    }
    Some(total)
}

/// `Prefer`: `wait` (60 s) or `wait=N`, N from 1 to 60 without a leading zero.
fn parse_prefer(v: &str) -> Option<Duration> {
    if v == "wait" {
        return Some(Duration::from_secs(60));
    }
    let n = v.strip_prefix("wait=")?;
    if n.starts_with('0') || n.is_empty() || n.len() > 2 || !n.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let n: u64 = n.parse().ok()?;
    (1..=60).contains(&n).then(|| Duration::from_secs(n))
}

fn is_version(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| c.is_ascii_hexdigit())
}

/// Which route created a prediction.
enum Route {
    Version,
    Model(String),
    Deployment(String),
}

impl Shared {
    /// The checks every route makes first: a `500` switched on, then the token.
    fn gate(&self, headers: &HeaderMap) -> Option<Response> {
        let failing = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Some(problem(
                500,
                "Internal Server Error",
                "An unexpected error occurred.",
            ));
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if presented != Some(self.token.as_str()) {
            self.unauthorized.fetch_add(1, Ordering::SeqCst);
            return Some(problem(
                401,
                "Unauthenticated",
                "You did not pass an authentication token",
            ));
        }
        None
    }

    fn now_wall(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::from_std(*lock(&self.clock)).unwrap_or_default()
    }

    /// The prediction as `GET` shows it now.
    fn view(&self, p: &Prediction) -> Value {
        let lc = p.lifecycle;
        let e = p.created.elapsed();
        let started = lc.starting;
        let run_end = started + lc.step * lc.steps;
        let done = run_end + lc.step;
        // The time the run was stopped (a cancel, or the deadline), if it was before its end.
        let natural_end = (p.kind != Kind::Hang).then_some(done);
        let stop = [p.canceled, p.deadline]
            .into_iter()
            .flatten()
            .min()
            .filter(|s| natural_end.is_none_or(|end| *s < end));
        let at = |d: Duration| p.created_at + chrono::Duration::from_std(d).unwrap_or_default();
        let logs_at = |t: Duration| {
            let mut logs = String::new();
            if t >= started {
                logs.push_str("Running prediction...\n");
                let k = ((t - started).as_millis() / lc.step.as_millis().max(1)) as u32;
                let k = if p.kind == Kind::Hang {
                    k.min(lc.steps.saturating_sub(1))
                } else {
                    k.min(lc.steps)
                };
                for i in 1..=k {
                    logs.push_str(&format!("progress: {}%\n", i * 100 / lc.steps.max(1)));
                }
            }
            logs
        };
        let mut started_at = (e >= started).then(|| at(started));
        let (status, output, error, logs, completed) = match stop {
            Some(s) if s <= e => {
                let aborted = s < started && p.deadline == Some(s) && p.canceled != Some(s);
                if s < started {
                    started_at = None;
                }
                let status = if aborted { "aborted" } else { "canceled" };
                (status, Value::Null, Value::Null, logs_at(s), Some(at(s)))
            }
            _ if e < started => ("starting", Value::Null, Value::Null, String::new(), None),
            _ if e < run_end || p.kind == Kind::Hang => {
                ("processing", Value::Null, Value::Null, logs_at(e), None)
            }
            _ if e < done => {
                // The output shows while the status still says processing.
                let output = match p.kind {
                    Kind::Succeed => self.output_of(p),
                    _ => Value::Null,
                };
                ("processing", output, Value::Null, logs_at(e), None)
            }
            _ => match p.kind {
                Kind::Fail => (
                    "failed",
                    Value::Null,
                    json!(format!("the model refused the prompt: {:?}", p.prompt)),
                    logs_at(done),
                    Some(at(done)),
                ),
                _ => (
                    "succeeded",
                    self.output_of(p),
                    Value::Null,
                    format!("{}done\n", logs_at(done)),
                    Some(at(done)),
                ),
            },
        };
        let removed = completed.is_some_and(|c| {
            self.now_wall() >= c + chrono::Duration::from_std(RETENTION).unwrap_or_default()
        });
        let get = format!("{}/v1/predictions/{}", self.base, p.id);
        let mut v = json!({
            "id": p.id,
            "model": p.model,
            "version": p.version,
            "input": if removed { json!({}) } else { p.input.clone() },
            "logs": if removed { Value::Null } else { json!(logs) },
            "output": if removed { Value::Null } else { output },
            "error": error,
            "status": status,
            "created_at": p.created_at.to_rfc3339(),
            "started_at": started_at.map(|t| t.to_rfc3339()),
            "completed_at": completed.map(|t| t.to_rfc3339()),
            "data_removed": removed,
            "source": "api",
            "metrics": if completed.is_some() && status == "succeeded" {
                json!({"predict_time": (done - started).as_secs_f64(), "total_time": done.as_secs_f64()})
            } else {
                json!({})
            },
            "urls": {
                "get": get,
                "cancel": format!("{get}/cancel"),
                "web": format!("https://replicate.com/p/{}", p.id),
            },
        });
        if let Some(d) = p.deadline {
            v["deadline"] = json!(at(d).to_rfc3339());
        }
        if let Some(dep) = &p.deployment {
            v["deployment"] = json!(dep);
        }
        v
    }

    fn output_of(&self, p: &Prediction) -> Value {
        p.output
            .clone()
            .unwrap_or_else(|| json!([format!("{}/files/{}/out-0.png", self.base, p.id)]))
    }

    /// Handles a create on any of the three routes.
    async fn create(self: Arc<Self>, route: Route, headers: HeaderMap, body: Bytes) -> Response {
        self.creates.fetch_add(1, Ordering::SeqCst);
        if let Some(r) = self.gate(&headers) {
            return r;
        }
        {
            let mut t = lock(&self.throttle);
            if t.remaining > 0 {
                t.remaining -= 1;
                self.throttled.fetch_add(1, Ordering::SeqCst);
                let mut r = json_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    &json!({"detail": "Request was throttled. Your rate limit resets in ~30s."}),
                );
                if let Some(ra) = t
                    .retry_after
                    .as_deref()
                    .and_then(|v| HeaderValue::from_str(v).ok())
                {
                    r.headers_mut().insert(header::RETRY_AFTER, ra);
                }
                return r;
            }
        }
        if self.refuse_credit.load(Ordering::SeqCst) {
            return problem(
                402,
                "Insufficient credit",
                "You have insufficient credit to run this model. Go to \
                 https://replicate.com/account/billing#billing to purchase credit. Once you \
                 purchase credit, please wait a few minutes before trying again.",
            );
        }
        let wait = match headers.get("prefer").map(|v| v.to_str().unwrap_or("")) {
            None => None,
            Some(v) => match parse_prefer(v.trim()) {
                Some(d) => Some(d),
                None => {
                    return problem(
                        400,
                        "Invalid Prefer header",
                        "Prefer must be wait or wait=N with N from 1 to 60",
                    );
                }
            },
        };
        let deadline = match headers
            .get("cancel-after")
            .map(|v| v.to_str().unwrap_or(""))
        {
            None => None,
            Some(v) => match parse_cancel_after(v) {
                Some(d) if d >= Duration::from_secs(5) => Some(d),
                _ => {
                    return problem(
                        400,
                        "Invalid Cancel-After header",
                        "Cancel-After must be a duration of at least 5s, e.g. 30s, 5m or 1h30m",
                    );
                }
            },
        };
        let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&body) else {
            return problem(
                400,
                "Invalid request",
                "The request body is not a JSON object.",
            );
        };
        let mut allowed = vec![
            "input",
            "webhook",
            "webhook_events_filter",
            "stream",
            "webhook_completed",
        ];
        if matches!(route, Route::Version) {
            allowed.push("version");
        }
        if let Some(extra) = body.keys().find(|k| !allowed.contains(&k.as_str())) {
            return problem_body(
                422,
                json!({
                    "title": "Input validation failed",
                    "detail": format!("- {extra}: Additional property {extra} is not allowed\n"),
                    "status": 422,
                    "invalid_fields": [{"type": "additional_property_not_allowed", "field": extra,
                        "description": format!("Additional property {extra} is not allowed")}],
                }),
            );
        }
        let (model, version, deployment) = match &route {
            Route::Model(m) => (m.clone(), "hidden".to_string(), None),
            Route::Deployment(d) => (d.clone(), "hidden".to_string(), Some(d.clone())),
            Route::Version => {
                let v = body.get("version").and_then(Value::as_str).unwrap_or("");
                let (model, version) = match v.split_once(':') {
                    Some((m, ver)) => (m.to_string(), ver),
                    None if is_version(v) => (FakeReplicate::VERSION_MODEL.to_string(), v),
                    None if v.contains('/') => (v.to_string(), FakeReplicate::VERSION),
                    None => (String::new(), v),
                };
                if !version.eq_ignore_ascii_case(FakeReplicate::VERSION) {
                    return problem(
                        422,
                        "Invalid version or not permitted",
                        "The specified version does not exist (or perhaps you don't have \
                         permission to use it?)",
                    );
                }
                (model, version.to_ascii_lowercase(), None)
            }
        };
        let input = body.get("input").cloned().unwrap_or(Value::Null);
        let Some(prompt) = input
            .get("prompt")
            .and_then(Value::as_str)
            .map(str::to_string)
        else {
            return problem_body(
                422,
                json!({
                    "detail": "- input: prompt is required\n",
                    "status": 422,
                    "title": "Input validation failed",
                    "invalid_fields": [{"type": "required", "field": "input",
                        "description": "prompt is required"}],
                }),
            );
        };
        let filter = match body.get("webhook_events_filter") {
            None | Some(Value::Null) => vec!["output".to_string(), "completed".to_string()],
            Some(Value::Array(events)) => {
                let mut out = Vec::new();
                for e in events {
                    match e.as_str() {
                        Some(s @ ("start" | "output" | "logs" | "completed")) => {
                            out.push(s.to_string())
                        }
                        _ => {
                            return problem(
                                422,
                                "Invalid webhook_events_filter",
                                "Events must be among start, output, logs and completed.",
                            );
                        }
                    }
                }
                out
            }
            Some(_) => {
                return problem(
                    422,
                    "Invalid webhook_events_filter",
                    "webhook_events_filter must be a list.",
                );
            }
        };
        let webhook = match body.get("webhook") {
            None | Some(Value::Null) => None,
            Some(Value::String(u))
                if reqwest::Url::parse(u).is_ok_and(|u| matches!(u.scheme(), "http" | "https")) =>
            {
                Some(u.clone())
            }
            Some(_) => {
                return problem(
                    422,
                    "Invalid webhook",
                    "The webhook must be an HTTP(S) URL.",
                );
            }
        };
        let kind = if prompt.contains("fail") {
            Kind::Fail
        } else if prompt.contains("hang") {
            Kind::Hang
        } else {
            Kind::Succeed
        };
        let id = random_id(26);
        let prediction = Prediction {
            id: id.clone(),
            model,
            version,
            deployment,
            input,
            prompt,
            kind,
            webhook: webhook.clone(),
            filter,
            created: Instant::now(),
            created_at: Utc::now(),
            lifecycle: *lock(&self.lifecycle),
            output: lock(&self.output).clone(),
            deadline,
            canceled: None,
        };
        lock(&self.predictions).insert(id.clone(), prediction);
        self.created.fetch_add(1, Ordering::SeqCst);
        if webhook.is_some() {
            tokio::spawn(self.clone().drive_webhooks(id.clone()));
        }
        let mut view = self.view_of(&id).unwrap_or_default();
        if let Some(wait) = wait {
            let until = Instant::now() + wait;
            while !is_terminal(&view) && Instant::now() < until {
                tokio::time::sleep(TICK).await;
                view = self.view_of(&id).unwrap_or_default();
            }
        }
        let status = if wait.is_some() && !is_terminal(&view) {
            StatusCode::ACCEPTED
        } else {
            StatusCode::CREATED
        };
        let mut r = json_response(status, &view);
        if let Ok(loc) = HeaderValue::from_str(view["urls"]["get"].as_str().unwrap_or("")) {
            r.headers_mut().insert(header::LOCATION, loc);
        }
        r
    }

    fn view_of(&self, id: &str) -> Option<Value> {
        lock(&self.predictions).get(id).map(|p| self.view(p))
    }

    /// Sends prediction `id`'s webhooks as its state changes, until it ends.
    async fn drive_webhooks(self: Arc<Self>, id: String) {
        let Some((target, filter)) = lock(&self.predictions)
            .get(&id)
            .and_then(|p| Some((p.webhook.clone()?, p.filter.clone())))
        else {
            return;
        };
        let wants = |e: &str| filter.iter().any(|f| f == e);
        if wants("start")
            && let Some(v) = self.view_of(&id)
        {
            self.send_webhook(&target, &v, false).await;
        }
        let mut last_logs = String::new();
        let mut output_sent = false;
        let mut last_intermediate: Option<Instant> = None;
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(TICK).await;
            let Some(v) = self.view_of(&id) else { return };
            if is_terminal(&v) {
                if wants("completed") {
                    self.send_webhook(&target, &v, true).await;
                }
                return;
            }
            if last_intermediate.is_some_and(|t| t.elapsed() < INTERMEDIATE_THROTTLE) {
                continue;
            }
            let logs = v["logs"].as_str().unwrap_or("").to_string();
            let has_output = !v["output"].is_null();
            let event = if has_output && !output_sent && wants("output") {
                output_sent = true;
                true
            } else {
                logs != last_logs && wants("logs")
            };
            if event {
                last_logs = logs;
                last_intermediate = Some(Instant::now());
                self.send_webhook(&target, &v, false).await;
            }
        }
    }

    /// Sends one webhook event (retried with the same `webhook-id` when `terminal`).
    async fn send_webhook(&self, target: &str, body: &Value, terminal: bool) {
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
            return;
        }
        let msg_id = format!("msg_{}", random_id(27));
        let body = body.to_string().into_bytes();
        let attempts = if terminal {
            TERMINAL_RETRIES.len() + 1
        } else {
            1
        };
        for attempt in 0..attempts {
            if attempt > 0 {
                tokio::time::sleep(TERMINAL_RETRIES[attempt - 1]).await;
            }
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            let ts = Utc::now().timestamp();
            let signature = tasklane_core::webhook::sign(&self.secret, &msg_id, ts, &body);
            self.webhooks_sent.fetch_add(1, Ordering::SeqCst);
            let status = match self
                .client
                .post(target)
                .header(header::CONTENT_TYPE, "application/json")
                .header("webhook-id", &msg_id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", signature)
                .body(body.clone())
                .send()
                .await
            {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            };
            lock(&self.webhook_answers).push((msg_id.clone(), status));
            if (200..300).contains(&status) {
                return;
            }
        }
    }
}

fn is_terminal(v: &Value) -> bool {
    matches!(
        v["status"].as_str(),
        Some("succeeded" | "failed" | "canceled" | "aborted")
    )
}

async fn create_version(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    s.create(Route::Version, headers, body).await
}

async fn create_model(
    State(s): State<Arc<Shared>>,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    s.create(Route::Model(format!("{owner}/{name}")), headers, body)
        .await
}

async fn create_deployment(
    State(s): State<Arc<Shared>>,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    s.create(Route::Deployment(format!("{owner}/{name}")), headers, body)
        .await
}

fn not_found() -> Response {
    problem(
        404,
        "Not found",
        "The requested resource could not be found.",
    )
}

async fn read(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = s.gate(&headers) {
        return r;
    }
    match s.view_of(&id) {
        Some(v) => json_response(StatusCode::OK, &v),
        None => not_found(),
    }
}

async fn cancel(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = s.gate(&headers) {
        return r;
    }
    s.cancels.fetch_add(1, Ordering::SeqCst);
    let view = {
        let mut map = lock(&s.predictions);
        let Some(p) = map.get_mut(&id) else {
            return not_found();
        };
        if p.canceled.is_none() {
            p.canceled = Some(p.created.elapsed());
        }
        s.view(p)
    };
    json_response(StatusCode::OK, &view)
}

async fn secret(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(r) = s.gate(&headers) {
        return r;
    }
    json_response(StatusCode::OK, &json!({"key": s.secret}))
}

async fn file(
    State(s): State<Arc<Shared>>,
    Path((id, _name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = s.gate(&headers) {
        return r;
    }
    let prompt = {
        let map = lock(&s.predictions);
        let Some(p) = map.get(&id) else {
            return not_found();
        };
        let v = s.view(p);
        if v["output"].is_null() {
            return not_found();
        }
        p.prompt.clone()
    };
    s.file_downloads.fetch_add(1, Ordering::SeqCst);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "image/png")],
        FakeReplicate::file_bytes(&prompt),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_as_documented() {
        assert_eq!(parse_prefer("wait"), Some(Duration::from_secs(60)));
        assert_eq!(parse_prefer("wait=5"), Some(Duration::from_secs(5)));
        assert_eq!(parse_prefer("wait=60"), Some(Duration::from_secs(60)));
        for bad in [
            "wait=0",
            "wait=61",
            "wait=05",
            "wait=",
            "respond-async",
            "wait=1.5",
        ] {
            assert_eq!(parse_prefer(bad), None, "{bad}");
        }
        assert_eq!(parse_cancel_after("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_cancel_after("45"), Some(Duration::from_secs(45)));
        assert_eq!(parse_cancel_after("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_cancel_after("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_cancel_after("1x"), None);
        assert_eq!(parse_cancel_after("s"), None);
    }
}
