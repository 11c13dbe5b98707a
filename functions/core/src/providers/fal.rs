//! fal.ai: the queue API (<https://docs.fal.ai/model-endpoints/queue>, reference
//! <https://fal.ai/docs/api-reference/inference-api>). A catalog entry with `provider = "fal"`
//! and `upstream_model = "fal-ai/flux/dev"` (`owner/app[/path]`).
//!
//! What this adapter relies on, from fal's docs and its official clients (`fal-ai/fal`:
//! `projects/fal_client/src/fal_client/{client,auth,_headers}.py`; `fal-ai/fal-js`:
//! `libs/client/src/{queue,types/common}.ts`), which the fake in `tasklane_testkit::fal`
//! reproduces:
//!
//! - **Endpoint and key**: `https://queue.fal.run` unless the catalog's `endpoint` says
//!   otherwise (the SDK's `FAL_QUEUE_RUN_HOST` does the same for its tests). Every queue call
//!   carries `Authorization: Key <key>` (the key as `FAL_KEY` holds it, `id:secret`); the key
//!   comes from the environment variable the catalog's `api_key_env` names, [`DEFAULT_API_KEY_ENV`]
//!   when it names none. It goes to the endpoint only: never to the JWKS URL, never with an
//!   output download (fal's CDN files, `https://v3.fal.media/files/…`, are public URLs, so
//!   [`Upstream::download_headers`] gives none).
//! - **Start** (<https://docs.fal.ai/model-endpoints/queue>): `POST {endpoint}/{owner}/{app}[/{path}]?fal_webhook=<tasklane's callback URL, url-encoded>`
//!   with the model input as the JSON body: `{"prompt": …, "duration": N, <each of the task's
//!   params by its name>}` (`prompt` and `duration` only when the task has them; a `params` key
//!   of the same name replaces them, so a model whose schema wants, say, `duration` as the
//!   string `"5"` declares a string param `duration` instead of the catalog's `duration`).
//!   The answer holds `request_id`, `response_url`, `status_url` and `cancel_url`; the URLs use
//!   only `owner/app` (the subpath dropped) and the docs say not to build them yourself
//!   (<https://fal.ai/docs/api-reference/inference-api>). **No idempotency** is documented,
//!   so the POST is sent once: a timeout or a 5xx is [`UpstreamError::Unavailable`] and the
//!   core decides (a retried attempt may run the model twice, as with Replicate). No
//!   `X-Fal-Request-Timeout` is sent: the model's `timeout` in the catalog already bounds the
//!   whole run, queue included, and tasklane enforces it itself with a cancel (which also
//!   removes a request still queued); fal's start deadline would be a second clock, whose
//!   expiry only shows as a failed request (a 504 "user" timeout), and the SDK rejects values
//!   of 1 s or less.
//! - **The run's id.** The port keeps one string per run, so the id is the path of
//!   `response_url` below the endpoint: `{owner}/{app}/requests/{request_id}` (e.g.
//!   `fal-ai/flux/requests/80e732af-…`). `status_url` and `cancel_url` must be it plus
//!   `/status` and `/cancel`, as fal's are, and all three must be on the endpoint's origin
//!   (the key goes with them); an answer that breaks this fails the task rather than send the
//!   key elsewhere. Without a `response_url` the documented pattern is used (fal-js builds it
//!   the same way). A webhook names only its `request_id`: [`Upstream::read_callback`] gives
//!   `{owner}/{app}/requests/{request_id}` with the catalog's owner and app, which is that id
//!   whenever fal's URLs follow its documented pattern (else the core ignores the callback and
//!   its checks end the run).
//! - **Check**: `GET {status_url}?logs=1` (the SDK sends `logs=1`/`0`). `IN_QUEUE` (with
//!   `queue_position`) is running with no progress; `IN_PROGRESS` carries `logs`, a list of
//!   `{message, level, source, timestamp}`: their messages joined by newlines are the log, its
//!   last `NN%` the progress; `COMPLETED` (HTTP 200, where the others are 202) without `error`
//!   has the output at `GET {response_url}`. There is no `FAILED` status: a failure is
//!   `COMPLETED` with `error` and `error_type`, and the result endpoint then answers a model
//!   error (`422 {"detail": [{"loc", "msg", "type", …}]}`, shown as `loc: msg; …` without the
//!   leading `body`) or a request error (`{"detail", "error_type"}` with `X-Fal-Error-Type`,
//!   <https://docs.fal.ai/documentation/model-apis/request-errors>); the task fails with that
//!   text, else with `error`. `error_type: client_cancelled` is a cancelled run. A `404` on a
//!   check means fal does not know the request.
//! - **Outputs** (model-specific JSON): every file object in the result, i.e. every JSON object
//!   with a `url` string (`{"url", "content_type", "file_name", "file_size", …}`, under
//!   `images`, `image`, `video`, `videos`, `audio`, … at any depth), in order: array items in
//!   order, an object's fields by name (serde_json keeps no other order). A result with no file
//!   in it (a text model's) becomes one JSON file.
//! - **Cancel**: `PUT {cancel_url}`; `CANCELLATION_REQUESTED` (a queued request is removed, a
//!   running one is signalled), `ALREADY_COMPLETED` (a 4xx) and `NOT_FOUND` all mean there is
//!   nothing more to do (<https://fal.ai/docs/inference-api/queue/cancel>).
//! - **Errors** (<https://docs.fal.ai/errors>): `401` refuses the task as "the provider refused
//!   the key"; `422` with `detail[]` refuses it listing `loc: msg`; `429` waits queued (fal
//!   documents no `Retry-After`, one is honoured if sent); nginx-style `502`/`503`/`504` (no
//!   JSON) and other 5xx are retried ([`UpstreamError::Unavailable`]), except a `504` with
//!   `X-Fal-Request-Timeout-Type: user`, which the SDK never retries (refused), and any
//!   answer with `X-Fal-Retryable: false` (refused). A `404` at submit refuses (no such app).
//!   Every text from fal is scrubbed of the key before it is shown.
//! - **Webhooks** (<https://docs.fal.ai/model-apis/model-endpoints/webhooks>): one POST when the
//!   request ends, `{request_id, gateway_request_id, status: "OK"|"ERROR", payload, error?,
//!   payload_error?}`, retried up to 10 times over 2 hours when not acknowledged. Signed with
//!   ED25519: headers `X-Fal-Webhook-Request-Id`, `X-Fal-Webhook-User-Id`,
//!   `X-Fal-Webhook-Timestamp` (Unix seconds) and `X-Fal-Webhook-Signature` (hex); the signed
//!   message is `request_id\nuser_id\ntimestamp\nhex(sha256(raw body))`, verified against any
//!   key of fal's JWKS (`{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": <base64url>}]}` at
//!   [`DEFAULT_JWKS_URL`], the catalog's `jwks_url` overriding it), cached at most
//!   [`JWKS_MAX_AGE`]; a timestamp more than [`WEBHOOK_TOLERANCE`] off is refused.
//!
//!   [`Upstream::read_callback`] is synchronous, so it cannot fetch the JWKS: it verifies
//!   against the keys cached by this process. [`Upstream::start`] and [`Upstream::check`]
//!   fetch them (when none are cached, or the cache is older than [`JWKS_MAX_AGE`]; a failed
//!   fetch is tried again after [`JWKS_RETRY`]), and a callback that finds no usable key, or a
//!   signature no cached key verifies, starts a fetch in the background and is refused. A
//!   refused callback costs only time: fal redelivers it, and since a callback is never the
//!   truth about the run here ([`Upstream::callback_is_authoritative`] is false: a valid one
//!   only makes tasklane check the request at once), the scheduled checks end the run
//!   anyway. (On AWS the upstream function fetches the keys on its first callback, which is
//!   refused, and verifies fal's redelivery.)
//!
//! The key is never logged, shown nor put in an error: Debug redacts it, and upstream text
//! that would echo it is scrubbed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use chrono::Utc;
use serde_json::Value;
use sha2::Digest;

use super::UpstreamSettings;
use super::cog::progress_in;
use crate::ports::{CallbackRequest, Job, Upstream, UpstreamError, UpstreamReport, UpstreamState};

/// fal's queue API, when the catalog names no `endpoint`.
pub const DEFAULT_ENDPOINT: &str = "https://queue.fal.run";
/// The environment variable holding the key when the catalog names no `api_key_env` (the
/// SDK's own).
pub const DEFAULT_API_KEY_ENV: &str = "FAL_KEY";
/// Where fal publishes its webhook signing keys, when the catalog names no `jwks_url`.
pub const DEFAULT_JWKS_URL: &str = "https://rest.fal.ai/.well-known/jwks.json";
/// How far a signed webhook's timestamp may be from now.
pub const WEBHOOK_TOLERANCE: Duration = Duration::from_secs(300);
/// How long fetched webhook keys are used (fal: cache them at most 24 hours).
pub const JWKS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// How long after a failed JWKS fetch the next one is tried.
pub const JWKS_RETRY: Duration = Duration::from_secs(60);
/// A signature no cached key verifies fetches the keys again when they are older than this
/// (fal may have rotated them).
const JWKS_REFRESH_ON_MISS: Duration = Duration::from_secs(600);
/// Largest JWKS document read, and most keys kept from it.
const MAX_JWKS_BYTES: usize = 64 * 1024;
const MAX_KEYS: usize = 16;
/// Longest JWKS fetch.
const JWKS_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `request_id` accepted (fal's are UUIDs).
const MAX_REQUEST_ID: usize = 128;

/// Webhook signing keys fetched from the JWKS URL, shared by a model's clones.
#[derive(Default)]
struct KeyCache {
    keys: Vec<ed25519_dalek::VerifyingKey>,
    /// When `keys` were fetched.
    fetched: Option<Instant>,
    /// When the last fetch started.
    tried: Option<Instant>,
    /// A fetch is under way.
    fetching: bool,
}

/// A model on fal's queue API.
#[derive(Clone)]
pub struct Fal {
    base: url::Url,
    /// `owner/app[/path]` segments; the first two name the app.
    model: Vec<String>,
    /// `Key <key>`, marked sensitive.
    auth: http::HeaderValue,
    /// The key, to scrub it out of upstream text.
    key: String,
    jwks_url: url::Url,
    keys: Arc<Mutex<KeyCache>>,
    client: reqwest::Client,
}

impl std::fmt::Debug for Fal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fal")
            .field("base", &self.base.as_str())
            .field("model", &self.model.join("/"))
            .field("key", &"<redacted>")
            .field("jwks_url", &self.jwks_url.as_str())
            .finish()
    }
}

/// Which call an answer came from (what a `404` means depends on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Submit,
    Status,
    Result,
    Cancel,
}

/// An HTTP answer from fal.
struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Value,
    text: String,
}

/// Whether `s` may be one segment of an app path or a request id.
fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
}

/// `request_id` and the app path of run id `id` (`{owner}/{app}/requests/{request_id}`).
fn parse_id(id: &str) -> Option<(&str, &str)> {
    let (app, request_id) = id.rsplit_once("/requests/")?;
    let segments: Vec<&str> = app.split('/').collect();
    (segments.len() >= 2
        && segments.iter().all(|s| is_segment(s))
        && is_segment(request_id)
        && request_id.len() <= MAX_REQUEST_ID)
        .then_some((app, request_id))
}

impl Fal {
    /// A fal model from catalog settings: `upstream_model` (required), `api_key` (required),
    /// `endpoint` and `jwks_url` (optional). `Err` names the field.
    pub fn new(settings: &UpstreamSettings) -> Result<Fal, (String, String)> {
        let field = |f: &str, m: &str| (f.to_string(), m.to_string());
        let model_text = settings.model.as_deref().ok_or_else(|| {
            field(
                "upstream_model",
                "a fal model needs the app to run, e.g. upstream_model = \"fal-ai/flux/dev\"",
            )
        })?;
        let model: Vec<String> = model_text
            .trim()
            .trim_matches('/')
            .split('/')
            .map(str::to_string)
            .collect();
        if model.len() < 2 || model.len() > 8 || !model.iter().all(|s| is_segment(s)) {
            return Err(field(
                "upstream_model",
                "give owner/app or owner/app/path (letters, digits, '.', '_', '-' in each \
                 part), e.g. \"fal-ai/flux/dev\"",
            ));
        }
        let url_of = |f: &str, given: Option<&url::Url>, default: &str| {
            let u = given
                .cloned()
                .unwrap_or_else(|| url::Url::parse(default).expect("a valid constant URL"));
            if matches!(u.scheme(), "http" | "https") && u.host().is_some() {
                Ok(u)
            } else {
                Err(field(f, "must be an http or https URL"))
            }
        };
        let base = url_of("endpoint", settings.endpoint.as_ref(), DEFAULT_ENDPOINT)?;
        let jwks_url = url_of("jwks_url", settings.jwks_url.as_ref(), DEFAULT_JWKS_URL)?;
        let key = settings
            .api_key
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                field(
                    "api_key_env",
                    "a fal model needs a key: name the environment variable holding it \
                     (default FAL_KEY)",
                )
            })?;
        // The message never repeats the value.
        let mut auth = http::HeaderValue::from_str(&format!("Key {key}")).map_err(|_| {
            field(
                "api_key_env",
                "the variable holds characters an HTTP header cannot carry",
            )
        })?;
        auth.set_sensitive(true);
        let client =
            super::api_client(settings.request_timeout).map_err(|e| field("endpoint", &e))?;
        Ok(Fal {
            base,
            model,
            auth,
            key: key.to_string(),
            jwks_url,
            keys: Arc::default(),
            client,
        })
    }

    /// `owner/app`, the part of the model the queue's URLs use.
    fn app(&self) -> String {
        self.model[..2].join("/")
    }

    /// `{endpoint}/{rel}`.
    fn url(&self, rel: &str) -> String {
        format!("{}/{rel}", self.base.as_str().trim_end_matches('/'))
    }

    /// The submit URL for a run reporting to `callback`.
    fn submit_url(&self, callback: &str) -> String {
        let webhook: String = url::form_urlencoded::byte_serialize(callback.as_bytes()).collect();
        format!("{}?fal_webhook={webhook}", self.url(&self.model.join("/")))
    }

    /// The model input for `job`: prompt, duration, then the params by name.
    fn input(job: &Job<'_>) -> Value {
        let input = job.inputs();
        Value::Object(input)
    }

    /// `text` with the key (and its secret half) cut out.
    fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        let secret = self.key.split_once(':').map(|(_, s)| s);
        for k in std::iter::once(self.key.as_str()).chain(secret) {
            if k.len() >= 4 && out.contains(k) {
                out = out.replace(k, "<redacted>");
            }
        }
        out
    }

    /// Sends `req` with the key; `Err` only when fal could not be reached.
    async fn call(&self, req: reqwest::RequestBuilder) -> Result<Answer, UpstreamError> {
        let resp = req
            .header(http::header::AUTHORIZATION, self.auth.clone())
            .send()
            .await
            .map_err(unreachable)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.map_err(unreachable)?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Answer {
            status,
            headers,
            body,
            text,
        })
    }

    /// What a non-2xx answer to `call` means.
    fn refusal(&self, a: &Answer, call: Call) -> UpstreamError {
        let header = |name: &str| {
            a.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim().to_ascii_lowercase())
        };
        let detail = self.scrub(&detail_text(&a.body, &a.headers, &a.text));
        let retryable = header("x-fal-retryable");
        if a.status == 401 {
            return UpstreamError::Refused("the provider refused the key".into());
        }
        if a.status == 504 && header("x-fal-request-timeout-type").as_deref() == Some("user") {
            return UpstreamError::Refused(format!(
                "fal gave up on the request: its start timeout ran out ({detail})"
            ));
        }
        if retryable.as_deref() == Some("false") {
            return UpstreamError::Refused(format!(
                "fal refused the request (HTTP {}, not retryable): {detail}",
                a.status
            ));
        }
        match a.status {
            429 => UpstreamError::Busy {
                retry_after: a
                    .headers
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs),
            },
            404 if call != Call::Submit => UpstreamError::Unknown,
            404 => UpstreamError::Refused(format!(
                "fal does not know the app {} (HTTP 404): {detail}",
                self.model.join("/")
            )),
            400..=499 if retryable.as_deref() == Some("true") => UpstreamError::Unavailable(
                format!("fal answered {} (retryable): {detail}", a.status),
            ),
            400..=499 => UpstreamError::Refused(format!(
                "fal refused the request (HTTP {}): {detail}",
                a.status
            )),
            _ => UpstreamError::Unavailable(format!("fal answered {}: {detail}", a.status)),
        }
    }

    /// The run id in a submit's answer (see the module doc).
    fn run_id(&self, body: &Value) -> Result<String, UpstreamError> {
        let request_id = body
            .get("request_id")
            .and_then(Value::as_str)
            .filter(|r| is_segment(r) && r.len() <= MAX_REQUEST_ID)
            .ok_or_else(|| {
                UpstreamError::Unavailable(
                    "fal answered a submit without a usable request_id".into(),
                )
            })?;
        let given = |k: &str| body.get(k).and_then(Value::as_str).map(str::trim);
        let Some(response_url) = given("response_url") else {
            return Ok(format!("{}/requests/{request_id}", self.app()));
        };
        let outside = || {
            UpstreamError::Refused(
                "fal answered with queue URLs that do not follow its documented pattern on the \
                 configured endpoint; tasklane does not send the key elsewhere"
                    .into(),
            )
        };
        let root = self.base.as_str().trim_end_matches('/');
        let rel = response_url
            .strip_prefix(root)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(outside)?;
        let (_, id_in_url) = parse_id(rel).ok_or_else(outside)?;
        if id_in_url != request_id {
            return Err(outside());
        }
        for (k, suffix) in [("status_url", "/status"), ("cancel_url", "/cancel")] {
            if given(k).is_some_and(|u| u != format!("{response_url}{suffix}")) {
                return Err(outside());
            }
        }
        Ok(rel.to_string())
    }

    /// What a `COMPLETED` status means: the result fetched and mapped, or the failure.
    async fn completed(&self, id: &str, status: &Value) -> Result<UpstreamState, UpstreamError> {
        let logs = self.logs_of(status);
        let error = status.get("error").filter(|e| !e.is_null());
        let error_type = status
            .get("error_type")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty());
        if error_type == Some("client_cancelled") {
            return Ok(UpstreamState::Canceled);
        }
        let result = self.call(self.client.get(self.url(id))).await;
        if error.is_some() || error_type.is_some() {
            let said = match error {
                Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
                Some(other) if !other.is_null() => other.to_string(),
                _ => "the request failed on fal".to_string(),
            };
            // The result endpoint tells more (a model error's detail[]); its absence changes
            // nothing.
            let detail = match &result {
                Ok(a) if !(200..300).contains(&a.status) => {
                    let d = detail_text(&a.body, &a.headers, "");
                    (d != "no details").then_some(d)
                }
                _ => None,
            };
            let mut message = detail.unwrap_or(said);
            if let Some(t) = error_type
                && !message.contains(t)
            {
                message = format!("{message} ({t})");
            }
            return Ok(UpstreamState::Failed {
                message: self.scrub(&message),
                logs,
            });
        }
        let a = result?;
        if (200..300).contains(&a.status) {
            return Ok(UpstreamState::Succeeded {
                outputs: outputs_of(&a.body),
                logs,
            });
        }
        match self.refusal(&a, Call::Result) {
            UpstreamError::Refused(message) => Ok(UpstreamState::Failed { message, logs }),
            e => Err(e),
        }
    }

    /// A status's `logs` list as one text, the messages one a line.
    fn logs_of(&self, status: &Value) -> Option<String> {
        let entries = status.get("logs")?.as_array()?;
        let lines: Vec<&str> = entries
            .iter()
            .filter_map(|e| e.get("message").and_then(Value::as_str))
            .collect();
        Some(self.scrub(&lines.join("\n")))
    }

    /// What a status answer says.
    async fn state_of(&self, id: &str, status: &Value) -> Result<UpstreamState, UpstreamError> {
        match status.get("status").and_then(Value::as_str) {
            Some("IN_QUEUE") => Ok(UpstreamState::Running {
                progress: None,
                logs: None,
            }),
            Some("IN_PROGRESS") => {
                let logs = self.logs_of(status);
                Ok(UpstreamState::Running {
                    progress: logs.as_deref().and_then(progress_in),
                    logs,
                })
            }
            Some("COMPLETED") => self.completed(id, status).await,
            Some(other) => Err(UpstreamError::Unavailable(format!(
                "fal answered an unknown status {:?}",
                self.scrub(other)
            ))),
            None => Err(UpstreamError::Unavailable(
                "fal answered a status without a status".into(),
            )),
        }
    }

    /// The keys to verify with now: none when none were fetched or they are too old.
    fn usable_keys(&self) -> Vec<ed25519_dalek::VerifyingKey> {
        let cache = lock(&self.keys);
        match cache.fetched {
            Some(at) if at.elapsed() < JWKS_MAX_AGE => cache.keys.clone(),
            _ => Vec::new(),
        }
    }

    /// Whether a fetch of the keys is due: none usable (or, with `older_than`, they are older
    /// than that), no fetch under way, and none tried within [`JWKS_RETRY`]. Marks the fetch
    /// as started when it is.
    fn claim_fetch(&self, older_than: Duration) -> bool {
        let mut cache = lock(&self.keys);
        let fresh = cache.fetched.is_some_and(|at| at.elapsed() < older_than);
        let tried_lately = cache.tried.is_some_and(|at| at.elapsed() < JWKS_RETRY);
        if fresh || tried_lately || cache.fetching {
            return false;
        }
        cache.fetching = true;
        cache.tried = Some(Instant::now());
        true
    }

    /// Fetches the keys when due (never with the key: the JWKS is public).
    async fn refresh_keys(&self, older_than: Duration) {
        if !self.claim_fetch(older_than) {
            return;
        }
        let fetched = fetch_jwks(&self.client, &self.jwks_url).await;
        let mut cache = lock(&self.keys);
        cache.fetching = false;
        match fetched {
            Ok(keys) => {
                cache.keys = keys;
                cache.fetched = Some(Instant::now());
            }
            Err(why) => {
                tracing::warn!(jwks_url = %self.jwks_url, error = %why, "fal's webhook keys could not be fetched; callbacks are refused until they are, checks go on");
            }
        }
    }

    /// Starts [`Fal::refresh_keys`] in the background, when a runtime is there to run it.
    fn refresh_keys_soon(&self, older_than: Duration) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let me = self.clone();
            rt.spawn(async move { me.refresh_keys(older_than).await });
        }
    }
}

/// Reads `url`'s JWKS: the Ed25519 keys in it.
async fn fetch_jwks(
    client: &reqwest::Client,
    url: &url::Url,
) -> Result<Vec<ed25519_dalek::VerifyingKey>, String> {
    let resp = client
        .get(url.clone())
        .timeout(JWKS_TIMEOUT)
        .send()
        .await
        .map_err(|e| {
            format!(
                "unreachable: {}",
                if e.is_timeout() {
                    "timed out"
                } else {
                    "connection failed"
                }
            )
        })?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status().as_u16()));
    }
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
    {
        return Err("the document is too large".into());
    }
    let body = resp.bytes().await.map_err(|_| "the answer broke off")?;
    if body.len() > MAX_JWKS_BYTES {
        return Err("the document is too large".into());
    }
    parse_jwks(&body)
}

/// The Ed25519 keys of a JWKS document (`{"keys": [{"kty": "OKP", "crv": "Ed25519", "x"}]}`);
/// other keys are skipped. `Err` when it holds none.
fn parse_jwks(body: &[u8]) -> Result<Vec<ed25519_dalek::VerifyingKey>, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|_| "not JSON".to_string())?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("no keys list")?;
    let found: Vec<_> = keys
        .iter()
        .filter(|k| k["kty"] == "OKP" && k["crv"] == "Ed25519")
        .filter_map(|k| {
            let x = k["x"].as_str()?.trim_end_matches('=');
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(x)
                .ok()?;
            let bytes: [u8; 32] = bytes.try_into().ok()?;
            ed25519_dalek::VerifyingKey::from_bytes(&bytes).ok()
        })
        .take(MAX_KEYS)
        .collect();
    if found.is_empty() {
        Err("no Ed25519 key in it".into())
    } else {
        Ok(found)
    }
}

/// Why a callback's signature is not accepted.
#[derive(Debug, PartialEq, Eq)]
enum SignatureError {
    /// Malformed, missing or stale headers.
    Headers(String),
    /// No key to check against.
    NoKeys,
    /// No key verifies it.
    Mismatch,
}

/// Checks a callback's fal signature against `keys` at time `now`; returns the signed
/// `request_id`.
fn verify(
    keys: &[ed25519_dalek::VerifyingKey],
    headers: &http::HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<String, SignatureError> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| SignatureError::Headers(format!("the {name} header is missing")))
    };
    let request_id = header("x-fal-webhook-request-id")?;
    let user_id = header("x-fal-webhook-user-id")?;
    let timestamp = header("x-fal-webhook-timestamp")?;
    let signature = header("x-fal-webhook-signature")?;
    let ts: i64 = timestamp.parse().map_err(|_| {
        SignatureError::Headers("the x-fal-webhook-timestamp header is not a number".into())
    })?;
    if now.abs_diff(ts) > WEBHOOK_TOLERANCE.as_secs() {
        return Err(SignatureError::Headers(
            "the webhook timestamp is more than 5 minutes off".into(),
        ));
    }
    let signature: [u8; 64] = hex::decode(signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            SignatureError::Headers(
                "the x-fal-webhook-signature header is not 64 bytes of hex".into(),
            )
        })?;
    if keys.is_empty() {
        return Err(SignatureError::NoKeys);
    }
    let signature = ed25519_dalek::Signature::from_bytes(&signature);
    let message = format!(
        "{request_id}\n{user_id}\n{timestamp}\n{}",
        hex::encode(sha2::Sha256::digest(body))
    );
    if keys
        .iter()
        .any(|k| k.verify_strict(message.as_bytes(), &signature).is_ok())
    {
        Ok(request_id.to_string())
    } else {
        Err(SignatureError::Mismatch)
    }
}

fn unreachable(e: reqwest::Error) -> UpstreamError {
    super::unreachable("fal", &e)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The text of a fal error body: a model error's `detail[]` as `loc: msg; …` (the leading
/// `body` of `loc` left out), a request error's `detail (error_type)` (the type from the body
/// or `X-Fal-Error-Type`), else the raw text cut short (none for an HTML page).
fn detail_text(body: &Value, headers: &http::HeaderMap, raw: &str) -> String {
    let error_type = body
        .get("error_type")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| {
            headers
                .get("x-fal-error-type")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .filter(|t| !t.trim().is_empty());
    let text = match body.get("detail") {
        Some(Value::Array(items)) => {
            let parts: Vec<String> = items
                .iter()
                .map(|d| {
                    let loc: Vec<String> = d
                        .get("loc")
                        .and_then(Value::as_array)
                        .map(|l| {
                            l.iter()
                                .map(|p| match p {
                                    Value::String(s) => s.clone(),
                                    other => other.to_string(),
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let loc = match loc.split_first() {
                        Some((first, rest)) if first == "body" && !rest.is_empty() => {
                            rest.join(".")
                        }
                        _ => loc.join("."),
                    };
                    let msg = d
                        .get("msg")
                        .and_then(Value::as_str)
                        .or_else(|| d.get("type").and_then(Value::as_str))
                        .unwrap_or("invalid");
                    if loc.is_empty() {
                        msg.to_string()
                    } else {
                        format!("{loc}: {msg}")
                    }
                })
                .collect();
            Some(parts.join("; "))
        }
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
        _ => body
            .get("error")
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().to_string()),
    };
    match (text, error_type) {
        (Some(t), Some(e)) if !t.contains(&e) => format!("{t} ({e})"),
        (Some(t), _) => t,
        (None, Some(e)) => e,
        (None, None) => {
            let raw = raw.trim();
            if raw.is_empty() || raw.starts_with('<') {
                "no details".into()
            } else {
                raw.chars().take(200).collect()
            }
        }
    }
}

/// The outputs of a result: every file object's `url`, in order (see the module doc); a
/// result with none becomes one JSON file.
fn outputs_of(result: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(u)) = m.get("url")
                    && (u.starts_with("https://")
                        || u.starts_with("http://")
                        || u.starts_with("data:"))
                {
                    out.push(u.clone());
                    return;
                }
                for x in m.values() {
                    walk(x, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(result, &mut out);
    if out.is_empty() && !result.is_null() {
        out.push(format!(
            "data:application/json;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(result.to_string())
        ));
    }
    out
}

/// What a webhook body says about its request.
fn state_of_webhook(body: &Value) -> Result<UpstreamState, String> {
    let status = body
        .get("status")
        .and_then(Value::as_str)
        .ok_or("a webhook without a status")?;
    let payload = body.get("payload").unwrap_or(&Value::Null);
    let text_of = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .map(str::to_string)
    };
    match status {
        "OK" => match text_of("payload_error") {
            Some(e) => Ok(UpstreamState::Failed {
                message: format!("fal could not serialise the result: {e}"),
                logs: None,
            }),
            None => Ok(UpstreamState::Succeeded {
                outputs: outputs_of(payload),
                logs: None,
            }),
        },
        "ERROR" => {
            let detail = detail_text(payload, &http::HeaderMap::new(), "");
            let message = match text_of("error") {
                Some(e) if detail != "no details" => format!("{e}: {detail}"),
                Some(e) => e,
                None => detail,
            };
            Ok(UpstreamState::Failed {
                message,
                logs: None,
            })
        }
        other => Err(format!("unknown webhook status {other:?}")),
    }
}

#[async_trait]
impl Upstream for Fal {
    fn provider(&self) -> &'static str {
        "fal"
    }

    async fn start(&self, job: Job<'_>, callback: &str) -> Result<String, UpstreamError> {
        // The keys its callbacks are signed with, before it can call back.
        self.refresh_keys(JWKS_MAX_AGE).await;
        // Sent once: fal documents no idempotency, so a blind re-send could run it twice.
        let a = self
            .call(
                self.client
                    .post(self.submit_url(callback))
                    .json(&Self::input(&job)),
            )
            .await?;
        if !(200..300).contains(&a.status) {
            return Err(self.refusal(&a, Call::Submit));
        }
        self.run_id(&a.body)
    }

    async fn check(
        &self,
        _job: Job<'_>,
        id: &str,
        _callback: &str,
    ) -> Result<UpstreamState, UpstreamError> {
        self.refresh_keys(JWKS_MAX_AGE).await;
        if parse_id(id).is_none() {
            return Err(UpstreamError::Unknown);
        }
        let url = format!("{}/status?logs=1", self.url(id));
        let a = self.call(self.client.get(url)).await?;
        if !(200..300).contains(&a.status) {
            return Err(self.refusal(&a, Call::Status));
        }
        self.state_of(id, &a.body).await
    }

    async fn cancel(&self, id: &str) -> Result<(), UpstreamError> {
        if parse_id(id).is_none() {
            return Ok(());
        }
        let url = format!("{}/cancel", self.url(id));
        let a = self.call(self.client.put(url)).await?;
        let said = a.body.get("status").and_then(Value::as_str);
        let done = matches!(said, Some("ALREADY_COMPLETED" | "NOT_FOUND"));
        if (200..300).contains(&a.status) || a.status == 404 || done {
            return Ok(());
        }
        Err(self.refusal(&a, Call::Cancel))
    }

    fn read_callback(&self, req: CallbackRequest<'_>) -> Result<UpstreamReport, String> {
        let keys = self.usable_keys();
        let signed_id = match verify(&keys, req.headers, req.body, Utc::now().timestamp()) {
            Ok(id) => id,
            Err(SignatureError::Headers(why)) => return Err(why),
            Err(SignatureError::NoKeys) => {
                self.refresh_keys_soon(JWKS_MAX_AGE);
                return Err(
                    "fal's webhook keys are not loaded yet (they are being fetched); \
                            fal redelivers, and the run is checked meanwhile"
                        .into(),
                );
            }
            Err(SignatureError::Mismatch) => {
                self.refresh_keys_soon(JWKS_REFRESH_ON_MISS);
                return Err("the webhook signature matches none of fal's keys".into());
            }
        };
        let body: Value =
            serde_json::from_slice(req.body).map_err(|_| "the body is not JSON".to_string())?;
        let request_id = body
            .get("request_id")
            .and_then(Value::as_str)
            .ok_or("a webhook without a request_id")?;
        if request_id != signed_id || !is_segment(request_id) || request_id.len() > MAX_REQUEST_ID {
            return Err("the webhook's request_id is not the one signed".into());
        }
        let state = match state_of_webhook(&body)? {
            UpstreamState::Failed { message, logs } => UpstreamState::Failed {
                message: self.scrub(&message),
                logs,
            },
            other => other,
        };
        Ok(UpstreamReport {
            id: format!("{}/requests/{request_id}", self.app()),
            state,
        })
    }

    fn callback_is_authoritative(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Signer;
    use serde_json::{Map, json};

    fn settings(model: &str) -> UpstreamSettings {
        UpstreamSettings {
            provider: "fal".into(),
            endpoint: Some(url::Url::parse("http://127.0.0.1:4020").unwrap()),
            model: Some(model.into()),
            api_key: Some("0a1b2c3d-key-id:sekrit0123456789".into()),
            webhook_secret: None,
            jwks_url: None,
            request_timeout: Duration::from_secs(5),
        }
    }

    fn fal(model: &str) -> Fal {
        Fal::new(&settings(model)).unwrap()
    }

    /// RFC 8032's first test key.
    fn signing_key() -> ed25519_dalek::SigningKey {
        let secret: [u8; 32] =
            hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
                .unwrap()
                .try_into()
                .unwrap();
        ed25519_dalek::SigningKey::from_bytes(&secret)
    }

    #[test]
    fn models_name_the_submit_path_and_the_app() {
        let f = fal("fal-ai/flux/dev");
        assert_eq!(f.app(), "fal-ai/flux");
        assert_eq!(
            f.submit_url("http://127.0.0.1:3000/v1/upstream/fal/task_1?token=ab"),
            "http://127.0.0.1:4020/fal-ai/flux/dev?fal_webhook=http%3A%2F%2F127.0.0.1%3A3000%2Fv1%2Fupstream%2Ffal%2Ftask_1%3Ftoken%3Dab"
        );
        assert_eq!(
            fal("fal-ai/kling-video/v2/master/text-to-video").app(),
            "fal-ai/kling-video"
        );
        for bad in ["flux", "", "a//b", "a/../b", "a/b c", "a/b?x=1", "../x"] {
            let e = Fal::new(&settings(bad)).unwrap_err();
            assert_eq!(e.0, "upstream_model", "{bad}: {e:?}");
        }
        let mut s = settings("a/b");
        s.endpoint = None;
        assert_eq!(
            Fal::new(&s).unwrap().base.as_str(),
            "https://queue.fal.run/"
        );
        assert_eq!(Fal::new(&s).unwrap().jwks_url.as_str(), DEFAULT_JWKS_URL);
    }

    #[test]
    fn the_catalog_reads_fal_key_unless_told_otherwise_and_takes_a_jwks_url() {
        let text = "[models.m]\nprovider = \"fal\"\nupstream_model = \"fal-ai/flux/dev\"\n\
                    price = { per_task = 1 }\n";
        let err = |text: &str, env: &dyn Fn(&str) -> Option<String>| {
            crate::catalog::parse(text, env, 0.0)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(text, &|_| None),
            "model \"m\": field \"api_key_env\": not given, and environment variable FAL_KEY \
             (the default for provider \"fal\") is not set"
        );
        let env = |k: &str| (k == "FAL_KEY").then(|| "id:secret".to_string());
        let r = crate::catalog::parse(text, &env, 0.0).unwrap();
        assert_eq!(r.get("m").unwrap().runner.provider(), "fal");
        let jwks = format!("{text}jwks_url = \"http://127.0.0.1:9/jwks.json\"\n");
        assert!(crate::catalog::parse(&jwks, &env, 0.0).is_ok());
        let bad = format!("{text}jwks_url = \"ftp://127.0.0.1/jwks.json\"\n");
        assert!(err(&bad, &env).starts_with("model \"m\": field \"jwks_url\": must be an http"));
        let other = "[models.m]\nprovider = \"cog\"\nendpoint = \"http://127.0.0.1:5055\"\n\
                     jwks_url = \"http://127.0.0.1:9/jwks.json\"\nprice = { per_task = 1 }\n";
        assert!(
            err(other, &env)
                .starts_with("model \"m\": field \"jwks_url\": only for provider = \"fal\""),
            "{}",
            err(other, &env)
        );
    }

    #[test]
    fn the_input_is_prompt_duration_and_params_by_name() {
        let mut params = Map::new();
        params.insert("image_size".into(), json!("landscape_4_3"));
        params.insert("seed".into(), json!(7));
        let job = Job {
            task_id: "t",
            action: "generate",
            prompt: Some("a cat"),
            duration: Some(5),
            params: &params,
        };
        assert_eq!(
            Fal::input(&job),
            json!({"prompt": "a cat", "duration": 5, "image_size": "landscape_4_3", "seed": 7})
        );
        let mut replaced = params.clone();
        replaced.insert("duration".into(), json!("10"));
        let job = Job {
            params: &replaced,
            ..job
        };
        assert_eq!(Fal::input(&job)["duration"], "10", "a param replaces it");
    }

    #[test]
    fn settings_need_a_key_and_debug_hides_it() {
        let mut s = settings("a/b");
        s.api_key = None;
        assert_eq!(Fal::new(&s).unwrap_err().0, "api_key_env");
        let mut s = settings("a/b");
        s.api_key = Some("bad\nkey".into());
        let e = Fal::new(&s).unwrap_err();
        assert_eq!(e.0, "api_key_env");
        assert!(!e.1.contains("bad"), "{e:?}");
        let shown = format!("{:?}", fal("a/b"));
        assert!(
            !shown.contains("sekrit") && !shown.contains("0a1b2c3d"),
            "{shown}"
        );
        let f = fal("a/b");
        assert_eq!(
            f.scrub("key 0a1b2c3d-key-id:sekrit0123456789 or sekrit0123456789"),
            "key <redacted> or <redacted>"
        );
        assert!(f.auth.is_sensitive());
    }

    #[test]
    fn the_run_id_is_the_response_url_below_the_endpoint() {
        let f = fal("fal-ai/flux/dev");
        let rid = "80e732af-660e-45cd-bd63-580e4f2a94cc";
        let base = "http://127.0.0.1:4020/fal-ai/flux/requests";
        let ok = json!({"request_id": rid, "response_url": format!("{base}/{rid}"),
            "status_url": format!("{base}/{rid}/status"), "cancel_url": format!("{base}/{rid}/cancel"),
            "queue_position": 0});
        assert_eq!(
            f.run_id(&ok).unwrap(),
            format!("fal-ai/flux/requests/{rid}")
        );
        assert_eq!(
            parse_id(&f.run_id(&ok).unwrap()),
            Some(("fal-ai/flux", rid))
        );
        // Without URLs: the documented pattern.
        assert_eq!(
            f.run_id(&json!({"request_id": rid})).unwrap(),
            format!("fal-ai/flux/requests/{rid}")
        );
        let elsewhere = |k: &str, v: String| {
            let mut b = ok.clone();
            b[k] = json!(v);
            f.run_id(&b)
        };
        for (k, v) in [
            (
                "response_url",
                format!("http://evil.example/fal-ai/flux/requests/{rid}"),
            ),
            (
                "response_url",
                format!("http://127.0.0.1:4021/fal-ai/flux/requests/{rid}"),
            ),
            ("response_url", format!("{base}/other-id")),
            (
                "status_url",
                format!("http://evil.example/fal-ai/flux/requests/{rid}/status"),
            ),
            ("cancel_url", format!("{base}/{rid}/stop")),
        ] {
            assert!(
                matches!(elsewhere(k, v.clone()), Err(UpstreamError::Refused(_))),
                "{k} = {v}"
            );
        }
        assert!(matches!(
            f.run_id(&json!({"request_id": "../x"})),
            Err(UpstreamError::Unavailable(_))
        ));
        assert!(parse_id("x/requests/abc").is_none());
        assert!(parse_id("a/b/requests/a b").is_none());
    }

    fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> Answer {
        let mut h = http::HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        Answer {
            status,
            headers: h,
            body: serde_json::from_str(body).unwrap_or(Value::Null),
            text: body.to_string(),
        }
    }

    #[test]
    fn errors_map_as_documented() {
        let f = fal("fal-ai/flux/dev");
        let refused = |a: Answer, call| match f.refusal(&a, call) {
            UpstreamError::Refused(m) => m,
            other => panic!("not refused: {other:?}"),
        };
        assert_eq!(
            refused(
                answer(
                    401,
                    &[],
                    r#"{"detail": "0a1b2c3d-key-id:sekrit0123456789 is bad"}"#
                ),
                Call::Submit
            ),
            "the provider refused the key"
        );
        assert_eq!(
            refused(
                answer(
                    422,
                    &[],
                    r#"{"detail": [{"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}, {"loc": ["body", "image_size", 0], "msg": "bad size"}]}"#
                ),
                Call::Submit
            ),
            "fal refused the request (HTTP 422): prompt: field required; image_size.0: bad size"
        );
        assert!(matches!(
            f.refusal(&answer(429, &[], "{}"), Call::Submit),
            UpstreamError::Busy { retry_after: None }
        ));
        assert!(matches!(
            f.refusal(&answer(429, &[("retry-after", "3")], ""), Call::Status),
            UpstreamError::Busy { retry_after: Some(d) } if d == Duration::from_secs(3)
        ));
        let nginx = "<html><head><title>503 Service Temporarily Unavailable</title></head></html>";
        for code in [502, 503, 504, 500] {
            assert!(
                matches!(f.refusal(&answer(code, &[], nginx), Call::Submit), UpstreamError::Unavailable(m) if m.ends_with("no details")),
                "{code}"
            );
        }
        let user = answer(
            504,
            &[
                ("x-fal-request-timeout-type", "user"),
                ("x-fal-error-type", "request_timeout"),
            ],
            r#"{"detail": "Request timed out", "error_type": "request_timeout"}"#,
        );
        assert_eq!(
            refused(user, Call::Submit),
            "fal gave up on the request: its start timeout ran out (Request timed out (request_timeout))"
        );
        assert!(
            refused(
                answer(503, &[("x-fal-retryable", "false")], "{}"),
                Call::Submit
            )
            .contains("not retryable")
        );
        assert!(matches!(
            f.refusal(
                &answer(422, &[("x-fal-retryable", "true")], "{}"),
                Call::Submit
            ),
            UpstreamError::Unavailable(_)
        ));
        assert_eq!(
            f.refusal(&answer(404, &[], "{}"), Call::Status),
            UpstreamError::Unknown
        );
        assert!(refused(answer(404, &[], "{}"), Call::Submit).contains("fal-ai/flux/dev"));
        let flat = answer(
            500,
            &[("x-fal-error-type", "runner_server_error")],
            r#"{"detail": "Internal error"}"#,
        );
        assert_eq!(
            detail_text(&flat.body, &flat.headers, &flat.text),
            "Internal error (runner_server_error)"
        );
    }

    #[test]
    fn files_are_collected_from_any_depth_in_order() {
        let out = json!({
            "images": [
                {"url": "https://v3.fal.media/files/a.png", "content_type": "image/png"},
                {"url": "https://v3.fal.media/files/b.png", "content_type": "image/png"},
            ],
            "seed": 42,
            "video": {"url": "https://v3.fal.media/files/c.mp4", "content_type": "video/mp4"},
            "extra": {"nested": [{"audio": {"url": "https://v3.fal.media/files/d.wav"}}]},
            "timings": {"inference": 1.2},
        });
        assert_eq!(
            outputs_of(&out),
            [
                "https://v3.fal.media/files/d.wav",
                "https://v3.fal.media/files/a.png",
                "https://v3.fal.media/files/b.png",
                "https://v3.fal.media/files/c.mp4",
            ]
        );
        let text = outputs_of(&json!({"output": "hello"}));
        assert_eq!(text.len(), 1);
        assert!(text[0].starts_with("data:application/json;base64,"));
        assert!(outputs_of(&Value::Null).is_empty());
        // A `url` that is not a URL is no file.
        assert_eq!(outputs_of(&json!({"url": "ftp://x"})).len(), 1);
    }

    #[test]
    fn webhook_bodies_map_to_states() {
        let ok = json!({"request_id": "r", "gateway_request_id": "r", "status": "OK",
            "payload": {"images": [{"url": "https://v3.fal.media/files/a.png"}]}});
        assert_eq!(
            state_of_webhook(&ok).unwrap(),
            UpstreamState::Succeeded {
                outputs: vec!["https://v3.fal.media/files/a.png".into()],
                logs: None
            }
        );
        let err = json!({"request_id": "r", "status": "ERROR", "error": "Invalid status code: 422",
            "payload": {"detail": [{"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}]}});
        assert_eq!(
            state_of_webhook(&err).unwrap(),
            UpstreamState::Failed {
                message: "Invalid status code: 422: prompt: field required".into(),
                logs: None
            }
        );
        let unserialisable = json!({"request_id": "r", "status": "OK", "payload": null,
            "payload_error": "Response payload is not JSON serializable."});
        assert!(matches!(
            state_of_webhook(&unserialisable).unwrap(),
            UpstreamState::Failed { message, .. } if message.contains("not JSON serializable")
        ));
        assert!(state_of_webhook(&json!({"status": "MAYBE"})).is_err());
    }

    fn signed_headers(
        key: &ed25519_dalek::SigningKey,
        request_id: &str,
        ts: i64,
        body: &[u8],
    ) -> http::HeaderMap {
        let message = format!(
            "{request_id}\nuser-1\n{ts}\n{}",
            hex::encode(sha2::Sha256::digest(body))
        );
        let sig = key.sign(message.as_bytes());
        let mut h = http::HeaderMap::new();
        h.insert("x-fal-webhook-request-id", request_id.parse().unwrap());
        h.insert("x-fal-webhook-user-id", "user-1".parse().unwrap());
        h.insert("x-fal-webhook-timestamp", ts.to_string().parse().unwrap());
        h.insert(
            "x-fal-webhook-signature",
            hex::encode(sig.to_bytes()).parse().unwrap(),
        );
        h
    }

    #[test]
    fn webhook_signatures_are_checked_against_the_jwks() {
        let key = signing_key();
        // The JWKS as fal publishes it: the public key as base64url, no padding.
        let x =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes());
        assert_eq!(
            x, "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
            "RFC 8032's public key"
        );
        let jwks = json!({"keys": [
            {"kty": "RSA", "n": "x", "e": "AQAB"},
            {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "k1", "alg": "EdDSA"},
        ]});
        let keys = parse_jwks(jwks.to_string().as_bytes()).unwrap();
        assert_eq!(keys.len(), 1);
        assert!(parse_jwks(br#"{"keys": []}"#).is_err());
        assert!(parse_jwks(b"nope").is_err());

        let body = br#"{"request_id": "r1", "status": "OK", "payload": {}}"#;
        let ts = 1_750_000_000;
        let h = signed_headers(&key, "r1", ts, body);
        assert_eq!(verify(&keys, &h, body, ts + 10), Ok("r1".to_string()));
        assert_eq!(
            verify(&keys, &h, b"{}", ts),
            Err(SignatureError::Mismatch),
            "body"
        );
        assert!(
            matches!(verify(&keys, &h, body, ts + 301), Err(SignatureError::Headers(m)) if m.contains("5 minutes"))
        );
        assert!(matches!(
            verify(&keys, &h, body, ts - 301),
            Err(SignatureError::Headers(_))
        ));
        assert_eq!(verify(&[], &h, body, ts), Err(SignatureError::NoKeys));
        let other = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let forged = signed_headers(&other, "r1", ts, body);
        assert_eq!(
            verify(&keys, &forged, body, ts),
            Err(SignatureError::Mismatch)
        );
        let mut bad = h.clone();
        bad.insert("x-fal-webhook-signature", "zz".parse().unwrap());
        assert!(matches!(
            verify(&keys, &bad, body, ts),
            Err(SignatureError::Headers(_))
        ));
        let mut missing = h.clone();
        missing.remove("x-fal-webhook-user-id");
        assert!(
            matches!(verify(&keys, &missing, body, ts), Err(SignatureError::Headers(m)) if m.contains("user-id"))
        );
    }

    #[tokio::test]
    async fn callbacks_are_refused_until_keys_are_cached_then_name_the_run() {
        let mut s = settings("fal-ai/flux/dev");
        // A closed loopback port: a fetch this test might start goes nowhere.
        s.jwks_url = Some(url::Url::parse("http://127.0.0.1:9/jwks.json").unwrap());
        let f = Fal::new(&s).unwrap();
        let key = signing_key();
        let body = json!({"request_id": "r1", "gateway_request_id": "r1", "status": "OK",
            "payload": {"image": {"url": "https://v3.fal.media/files/a.png"}}})
        .to_string()
        .into_bytes();
        let now = Utc::now().timestamp();
        let h = signed_headers(&key, "r1", now, &body);
        let req = CallbackRequest {
            headers: &h,
            body: &body,
        };
        // Nothing fetched yet (and a fetch marked as just tried, so none starts).
        lock(&f.keys).tried = Some(Instant::now());
        assert!(f.read_callback(req).unwrap_err().contains("not loaded yet"));
        {
            let mut c = lock(&f.keys);
            c.keys = vec![key.verifying_key()];
            c.fetched = Some(Instant::now());
        }
        let report = f.read_callback(req).unwrap();
        assert_eq!(report.id, "fal-ai/flux/requests/r1");
        assert!(matches!(report.state, UpstreamState::Succeeded { .. }));
        // The body's request id must be the signed one.
        let lie = json!({"request_id": "r2", "status": "OK", "payload": {}})
            .to_string()
            .into_bytes();
        let h2 = signed_headers(&key, "r1", now, &lie);
        assert!(
            f.read_callback(CallbackRequest {
                headers: &h2,
                body: &lie
            })
            .is_err()
        );
        // Keys older than a day are not used.
        lock(&f.keys).fetched = Instant::now().checked_sub(JWKS_MAX_AGE + Duration::from_secs(1));
        if lock(&f.keys).fetched.is_some() {
            assert!(f.read_callback(req).is_err());
        }
    }
}
