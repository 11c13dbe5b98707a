//! Replicate: the hosted predictions API (<https://replicate.com/docs/reference/http>).
//!
//! What this adapter relies on, with the pages it comes from (read in the official docs, the
//! OpenAPI spec and `replicate/replicate-python`):
//!
//! - **Auth**: `Authorization: Bearer <token>` on every call; base URL
//!   `https://api.replicate.com` (the catalog's `endpoint` overrides it, e.g. for a fake).
//! - **Create** (<https://replicate.com/docs/topics/predictions/create-a-prediction>), by the
//!   catalog's `upstream_model`:
//!   - `owner/name`: an official model, `POST /v1/models/{owner}/{name}/predictions`;
//!   - `owner/name:<64 hex>` or a bare `<64 hex>` version: `POST /v1/predictions` with
//!     `"version": "<64 hex>"`;
//!   - `deployments/owner/name`: `POST /v1/deployments/{owner}/{name}/predictions`.
//!
//!   The body is `{"input", "webhook", "webhook_events_filter"}` (the schema allows no other
//!   field), the input being the task's `prompt`, `duration` and `params`. No `Prefer: wait`:
//!   the answer (`201`, or `202` "created but does not yet have all outputs") comes at once with
//!   the prediction's `id`. **Replicate has no idempotency key**, so a create is never retried
//!   blindly here: a timeout or a 5xx is [`UpstreamError::Unavailable`] and the core decides
//!   (a retried attempt may run the model twice; the official SDK never retries a create
//!   either).
//! - **Check**: `GET /v1/predictions/{id}` → the prediction. Statuses
//!   (<https://replicate.com/docs/topics/predictions/lifecycle>): `starting` and `processing`
//!   run (progress is the last `NN%` in `logs`, as the SDK reads it); `succeeded` (`output` a
//!   URL, a list of URLs, or other JSON kept as a file); `failed` (`error`); `canceled` (a
//!   cancel, or the deadline passed while running) and `aborted` (the deadline passed before
//!   it started; terminal, though older SDKs do not know it). After the retention time
//!   (<https://replicate.com/docs/topics/predictions/data-retention>: one hour for API
//!   predictions) `output` is `null` and `data_removed` is `true`: such a prediction fails the
//!   task with a message saying so. A `404` means Replicate does not know the id.
//! - **Cancel**: `POST /v1/predictions/{id}/cancel`.
//! - **Errors** are RFC 7807 problem+json (`title`, `detail`, `status`; `invalid_fields` on
//!   input validation failures): `401`, `402`, `403`, `404` and `422` refuse the request (shown
//!   as `title: detail`). **Rate limits** (<https://replicate.com/docs/topics/predictions/rate-limits>):
//!   `429` with `{"detail": "Request was throttled. Your rate limit resets in ~30s."}`; no
//!   `Retry-After` is documented but the SDK honours one (seconds or an HTTP date), so this
//!   adapter reads it first and the `~Ns` of the detail second. 5xx and unreachable are
//!   [`UpstreamError::Unavailable`].
//! - **Webhooks** (<https://replicate.com/docs/topics/webhooks/receive-webhook>): the body is
//!   the prediction as `GET` answers it. Only the terminal one is retried; intermediate ones may
//!   be lost. They are signed per Standard Webhooks
//!   (<https://replicate.com/docs/topics/webhooks/verify-webhook>): `webhook-id`,
//!   `webhook-timestamp` (Unix seconds) and `webhook-signature` (space-separated `v1,<base64>`
//!   entries), HMAC-SHA256 over `"{id}.{timestamp}.{body}"` keyed with the base64 decoding of
//!   what follows `whsec_` in the account's secret (`GET /v1/webhooks/default/secret`). With
//!   the catalog's `webhook_secret_env` set, a callback must carry a valid signature no more
//!   than 5 minutes off; either way a callback only prompts a check
//!   ([`Upstream::callback_is_authoritative`] is false), so its body can change nothing.
//! - **Output files** (<https://replicate.com/docs/topics/predictions/output-files>) live on
//!   `replicate.delivery` and `*.replicate.delivery` and need the bearer token: it is sent to
//!   those hosts (over https) and to the configured endpoint's own origin, never elsewhere.
//!
//! The token is never logged, shown nor put in an error: Debug redacts it, and upstream text
//! that would echo it is scrubbed.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::UpstreamSettings;
use super::cog::progress_in;
use crate::ports::{CallbackRequest, Job, Upstream, UpstreamError, UpstreamReport, UpstreamState};

/// Replicate's public API, when the catalog names no `endpoint`.
pub const DEFAULT_ENDPOINT: &str = "https://api.replicate.com";
/// The environment variable holding the API token when the catalog names none.
pub const DEFAULT_API_KEY_ENV: &str = "REPLICATE_API_TOKEN";
/// How far a signed webhook's timestamp may be from now.
pub const WEBHOOK_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// The events tasklane asks Replicate to report (each prompts a check).
const EVENTS: [&str; 4] = ["start", "output", "logs", "completed"];

/// Which create route a catalog's `upstream_model` names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// `owner/name`: an official model.
    Model { owner: String, name: String },
    /// A version id (64 hex), from `owner/name:<version>` or a bare version.
    Version(String),
    /// `deployments/owner/name`.
    Deployment { owner: String, name: String },
}

impl Target {
    fn parse(text: &str) -> Result<Target, String> {
        let example = "give owner/name (an official model), owner/name:<64-hex version>, a \
                       version, or deployments/owner/name";
        let segment = |s: &str| {
            !s.is_empty()
                && s.len() <= 100
                && s.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
        };
        let is_version = |s: &str| s.len() == 64 && s.bytes().all(|c| c.is_ascii_hexdigit());
        if let Some(rest) = text.strip_prefix("deployments/") {
            return match rest.split_once('/') {
                Some((o, n)) if segment(o) && segment(n) => Ok(Target::Deployment {
                    owner: o.into(),
                    name: n.into(),
                }),
                _ => Err(format!("{text:?} is not deployments/owner/name; {example}")),
            };
        }
        if is_version(text) {
            return Ok(Target::Version(text.to_ascii_lowercase()));
        }
        let (model, version) = match text.split_once(':') {
            Some((m, v)) => (m, Some(v)),
            None => (text, None),
        };
        let Some((owner, name)) = model
            .split_once('/')
            .filter(|(o, n)| segment(o) && segment(n))
        else {
            return Err(format!("{text:?} is not a Replicate model; {example}"));
        };
        match version {
            None => Ok(Target::Model {
                owner: owner.into(),
                name: name.into(),
            }),
            Some(v) if is_version(v) => Ok(Target::Version(v.to_ascii_lowercase())),
            Some(v) => Err(format!(
                "version {v:?} is not 64 hexadecimal digits; {example}"
            )),
        }
    }
}

/// A model on Replicate.
#[derive(Clone)]
pub struct Replicate {
    base: url::Url,
    target: Target,
    token: String,
    webhook_secret: Option<String>,
    client: reqwest::Client,
}

impl std::fmt::Debug for Replicate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicate")
            .field("base", &self.base.as_str())
            .field("target", &self.target)
            .field("token", &"<redacted>")
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Replicate {
    /// A Replicate model from catalog settings: `upstream_model` (required), `api_key`
    /// (required), `endpoint` and `webhook_secret` (optional). `Err` names the field.
    pub fn new(settings: &UpstreamSettings) -> Result<Replicate, (String, String)> {
        let field = |f: &str, m: String| (f.to_string(), m);
        let target = Target::parse(settings.model.as_deref().ok_or_else(|| {
            field(
                "upstream_model",
                "a replicate model needs the model to run, e.g. \"black-forest-labs/flux-schnell\""
                    .into(),
            )
        })?)
        .map_err(|m| field("upstream_model", m))?;
        let base = match &settings.endpoint {
            Some(e) => e.clone(),
            None => url::Url::parse(DEFAULT_ENDPOINT).expect("a valid constant URL"),
        };
        if !matches!(base.scheme(), "http" | "https") {
            return Err(field("endpoint", "must be an http or https URL".into()));
        }
        let token = settings.api_key.clone().ok_or_else(|| {
            field(
                "api_key_env",
                format!(
                    "a replicate model needs an API token: name the environment variable that \
                     holds it (default {DEFAULT_API_KEY_ENV})"
                ),
            )
        })?;
        if http::HeaderValue::from_str(&format!("Bearer {token}")).is_err() {
            return Err(field(
                "api_key_env",
                "the API token holds characters an HTTP header cannot carry".into(),
            ));
        }
        if let Some(secret) = &settings.webhook_secret {
            let key = secret.strip_prefix("whsec_").unwrap_or(secret);
            let decoded = base64::engine::general_purpose::STANDARD.decode(key.trim());
            if !secret.starts_with("whsec_") || decoded.map_or(true, |k| k.is_empty()) {
                return Err(field(
                    "webhook_secret_env",
                    "the webhook secret must look like whsec_<base64>, as \
                     GET /v1/webhooks/default/secret gives it"
                        .into(),
                ));
            }
        }
        let client =
            super::api_client(settings.request_timeout).map_err(|e| field("endpoint", e))?;
        Ok(Replicate {
            base,
            target,
            token,
            webhook_secret: settings.webhook_secret.clone(),
            client,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base.as_str().trim_end_matches('/'))
    }

    /// The create route and body for `job`.
    fn create_request(&self, job: &Job<'_>, callback: &str) -> (String, Value) {
        let input = job.inputs();
        let mut body = json!({
            "input": input,
            "webhook": callback,
            "webhook_events_filter": EVENTS,
        });
        let path = match &self.target {
            Target::Model { owner, name } => format!("v1/models/{owner}/{name}/predictions"),
            Target::Deployment { owner, name } => {
                format!("v1/deployments/{owner}/{name}/predictions")
            }
            Target::Version(v) => {
                body["version"] = json!(v);
                "v1/predictions".to_string()
            }
        };
        (self.url(&path), body)
    }

    /// `text` with the token cut out, should an upstream echo it.
    fn scrub(&self, text: &str) -> String {
        if self.token.len() >= 4 && text.contains(&self.token) {
            text.replace(&self.token, "<redacted>")
        } else {
            text.to_string()
        }
    }

    /// Sends `req` with the token and reads the answer: `Ok((status, body))` for a 2xx, the
    /// error it means otherwise (`on_404` for a 404).
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        on_404: fn(String) -> UpstreamError,
    ) -> Result<Value, UpstreamError> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(unreachable)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        match status {
            200..=299 => Ok(body),
            429 => Err(UpstreamError::Busy {
                retry_after: retry_after(&headers, &body, Utc::now()),
            }),
            404 => Err(on_404(self.refusal(status, &body, &text))),
            400..=499 => Err(UpstreamError::Refused(self.refusal(status, &body, &text))),
            _ => Err(UpstreamError::Unavailable(format!(
                "Replicate answered {status}: {}",
                self.scrub(&problem_text(&body, &text))
            ))),
        }
    }

    fn refusal(&self, status: u16, body: &Value, text: &str) -> String {
        format!(
            "Replicate refused the request (HTTP {status}): {}",
            self.scrub(&problem_text(body, text))
        )
    }

    /// What a prediction (a `GET`'s answer or a webhook's body) says.
    fn state_of(&self, p: &Value) -> Result<UpstreamState, String> {
        let status = p
            .get("status")
            .and_then(Value::as_str)
            .ok_or("a prediction without a status")?;
        let logs = p.get("logs").and_then(Value::as_str).map(|l| self.scrub(l));
        Ok(match status {
            "starting" | "processing" => UpstreamState::Running {
                progress: logs.as_deref().and_then(progress_in),
                logs,
            },
            "succeeded" => {
                let output = p.get("output").unwrap_or(&Value::Null);
                let removed = p.get("data_removed").and_then(Value::as_bool) == Some(true);
                if removed && output.is_null() {
                    UpstreamState::Failed {
                        message: "the prediction succeeded, but Replicate had already removed \
                                  its output (data_removed: API outputs are kept one hour) \
                                  before it could be collected; credits were refunded"
                            .into(),
                        logs,
                    }
                } else {
                    UpstreamState::Succeeded {
                        outputs: outputs_of(output),
                        logs,
                    }
                }
            }
            "failed" => UpstreamState::Failed {
                message: match p.get("error") {
                    Some(Value::String(e)) if !e.trim().is_empty() => self.scrub(e),
                    Some(Value::Null) | None => "the prediction failed on Replicate".into(),
                    Some(other) => self.scrub(&other.to_string()),
                },
                logs,
            },
            "canceled" | "cancelled" | "aborted" => UpstreamState::Canceled,
            other => return Err(format!("unknown prediction status {other:?}")),
        })
    }

    /// Checks a callback's Standard Webhooks signature against `secret` at time `now`.
    fn verify(
        secret: &str,
        headers: &http::HeaderMap,
        body: &[u8],
        now: i64,
    ) -> Result<(), String> {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("the {name} header is missing"))
        };
        let id = header("webhook-id")?;
        let timestamp: i64 = header("webhook-timestamp")?
            .parse()
            .map_err(|_| "the webhook-timestamp header is not a number".to_string())?;
        let signatures = header("webhook-signature")?;
        if now.abs_diff(timestamp) > WEBHOOK_TOLERANCE.as_secs() {
            return Err("the webhook timestamp is more than 5 minutes off".into());
        }
        let expected = crate::webhook::sign(secret, id, timestamp, body);
        // Compare every entry, without stopping at the first match.
        let matched = signatures
            .split(' ')
            .filter(|s| !s.is_empty())
            .fold(false, |found, s| {
                found | constant_time_eq(s.as_bytes(), expected.as_bytes())
            });
        if matched {
            Ok(())
        } else {
            Err("the webhook signature does not match".into())
        }
    }

    /// Whether output `url` may receive the token: Replicate's file hosts over https, or
    /// the configured endpoint's own origin.
    fn trusts_with_token(&self, url: &url::Url) -> bool {
        let Some(host) = url.host_str().map(str::to_ascii_lowercase) else {
            return false;
        };
        let delivery = url.scheme() == "https"
            && (host == "replicate.delivery" || host.ends_with(".replicate.delivery"));
        let own = url.scheme() == self.base.scheme()
            && Some(host.as_str()) == self.base.host_str().map(str::to_ascii_lowercase).as_deref()
            && url.port_or_known_default() == self.base.port_or_known_default();
        delivery || own
    }
}

fn unreachable(e: reqwest::Error) -> UpstreamError {
    super::unreachable("Replicate", &e)
}

/// Constant-time equality of two byte strings (the length is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The text of a problem+json body: `title: detail`, or `title: field: description; ...`
/// when it lists `invalid_fields`; the raw text (cut short) when it is not one.
fn problem_text(body: &Value, raw: &str) -> String {
    let title = body.get("title").and_then(Value::as_str).map(str::trim);
    let detail = body.get("detail").and_then(Value::as_str).map(str::trim);
    let fields: Vec<String> = body
        .get("invalid_fields")
        .and_then(Value::as_array)
        .map(|fs| {
            fs.iter()
                .map(|f| {
                    let name = f.get("field").and_then(Value::as_str).unwrap_or("input");
                    let what = f
                        .get("description")
                        .and_then(Value::as_str)
                        .or_else(|| f.get("type").and_then(Value::as_str))
                        .unwrap_or("invalid");
                    format!("{name}: {what}")
                })
                .collect()
        })
        .unwrap_or_default();
    let detail = if fields.is_empty() {
        detail.map(str::to_string)
    } else {
        Some(fields.join("; "))
    };
    match (title, detail) {
        (Some(t), Some(d)) if !d.is_empty() => format!("{t}: {d}"),
        (Some(t), _) => t.to_string(),
        (None, Some(d)) => d,
        (None, None) => {
            let raw = raw.trim();
            if raw.is_empty() {
                "no details".into()
            } else {
                raw.chars().take(200).collect()
            }
        }
    }
}

/// When a 429 says to come back: its `Retry-After` (seconds or an HTTP date), else the
/// `~Ns` of Replicate's throttle detail ("Your rate limit resets in ~30s."), else unknown.
fn retry_after(headers: &http::HeaderMap, body: &Value, now: DateTime<Utc>) -> Option<Duration> {
    if let Some(v) = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
    {
        if let Ok(secs) = v.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        if let Ok(at) = DateTime::parse_from_rfc2822(v) {
            return Some((at.with_timezone(&Utc) - now).to_std().unwrap_or_default());
        }
    }
    let detail = body.get("detail").and_then(Value::as_str)?;
    let rest = &detail[detail.find("resets in")? + "resets in".len()..];
    let rest = rest.trim_start().trim_start_matches('~');
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let unit = rest[digits.len()..].chars().next();
    let n: u64 = digits.parse().ok()?;
    match unit {
        Some('s') => Some(Duration::from_secs(n)),
        Some('m') => Some(Duration::from_secs(n * 60)),
        _ => None,
    }
}

/// The outputs of a succeeded prediction: a URL (or `data:` URI), or a list of them; a list of
/// plain strings (a language model's tokens) becomes one text file; anything else one JSON
/// file.
fn outputs_of(output: &Value) -> Vec<String> {
    let is_uri =
        |s: &str| s.starts_with("data:") || s.starts_with("http://") || s.starts_with("https://");
    let inline = |mime: &str, bytes: Vec<u8>| {
        format!(
            "data:{mime};base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    };
    match output {
        Value::Null => Vec::new(),
        Value::String(s) if is_uri(s) => vec![s.clone()],
        Value::String(s) => vec![inline("text/plain", s.clone().into_bytes())],
        Value::Array(items) if items.iter().all(|i| i.as_str().is_some_and(is_uri)) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_string))
            .collect(),
        Value::Array(items) if items.iter().all(Value::is_string) => {
            let text: String = items.iter().filter_map(Value::as_str).collect();
            vec![inline("text/plain", text.into_bytes())]
        }
        other => vec![inline("application/json", other.to_string().into_bytes())],
    }
}

#[async_trait]
impl Upstream for Replicate {
    fn provider(&self) -> &'static str {
        "replicate"
    }

    async fn start(&self, job: Job<'_>, callback: &str) -> Result<String, UpstreamError> {
        let (url, body) = self.create_request(&job, callback);
        // Sent once: Replicate has no idempotency key, so a blind re-send could run the
        // model twice.
        let created = self
            .send(self.client.post(url).json(&body), UpstreamError::Refused)
            .await?;
        created
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty() && id.len() <= 128)
            .map(str::to_string)
            .ok_or_else(|| {
                UpstreamError::Unavailable("Replicate answered a create without an id".into())
            })
    }

    async fn check(
        &self,
        _job: Job<'_>,
        id: &str,
        _callback: &str,
    ) -> Result<UpstreamState, UpstreamError> {
        let url = self.url(&format!("v1/predictions/{}", path_segment(id)));
        let p = self
            .send(self.client.get(url), |_| UpstreamError::Unknown)
            .await?;
        self.state_of(&p).map_err(UpstreamError::Unavailable)
    }

    async fn cancel(&self, id: &str) -> Result<(), UpstreamError> {
        let url = self.url(&format!("v1/predictions/{}/cancel", path_segment(id)));
        match self
            .send(self.client.post(url), |_| UpstreamError::Unknown)
            .await
        {
            // Unknown: nothing left to stop.
            Ok(_) | Err(UpstreamError::Unknown) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn read_callback(&self, req: CallbackRequest<'_>) -> Result<UpstreamReport, String> {
        if let Some(secret) = &self.webhook_secret {
            Self::verify(secret, req.headers, req.body, Utc::now().timestamp())?;
        }
        let p: Value =
            serde_json::from_slice(req.body).map_err(|_| "the body is not JSON".to_string())?;
        let id = p
            .get("id")
            .and_then(Value::as_str)
            .ok_or("a prediction without an id")?
            .to_string();
        Ok(UpstreamReport {
            id,
            state: self.state_of(&p)?,
        })
    }

    fn callback_is_authoritative(&self) -> bool {
        false
    }

    fn download_headers(&self, url: &url::Url) -> Vec<(http::HeaderName, http::HeaderValue)> {
        if !self.trusts_with_token(url) {
            return Vec::new();
        }
        match http::HeaderValue::from_str(&format!("Bearer {}", self.token)) {
            Ok(mut v) => {
                v.set_sensitive(true);
                vec![(http::header::AUTHORIZATION, v)]
            }
            Err(_) => Vec::new(),
        }
    }
}

/// A prediction id as one URL path segment (Replicate's are lowercase base32; anything else
/// is percent-encoded rather than trusted).
fn path_segment(id: &str) -> String {
    url::form_urlencoded::byte_serialize(id.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn settings(model: &str) -> UpstreamSettings {
        UpstreamSettings {
            provider: "replicate".into(),
            endpoint: Some(url::Url::parse("http://127.0.0.1:4010").unwrap()),
            model: Some(model.into()),
            api_key: Some("r8_sekrit_token".into()),
            webhook_secret: Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
            jwks_url: None,
            request_timeout: Duration::from_secs(5),
        }
    }

    fn replicate(model: &str) -> Replicate {
        Replicate::new(&settings(model)).unwrap()
    }

    const V: &str = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa";

    #[test]
    fn upstream_models_choose_the_create_route() {
        let params = Map::new();
        let job = Job {
            task_id: "t",
            action: "generate",
            prompt: Some("a cat"),
            duration: Some(3),
            params: &params,
        };
        let (url, body) = replicate("black-forest-labs/flux-schnell").create_request(&job, "cb");
        assert_eq!(
            url,
            "http://127.0.0.1:4010/v1/models/black-forest-labs/flux-schnell/predictions"
        );
        assert_eq!(body["input"], json!({"prompt": "a cat", "duration": 3}));
        assert_eq!(body["webhook"], "cb");
        assert_eq!(
            body["webhook_events_filter"],
            json!(["start", "output", "logs", "completed"])
        );
        assert!(body.get("version").is_none());
        let (url, body) = replicate(&format!("replicate/hello-world:{V}")).create_request(&job, "");
        assert_eq!(url, "http://127.0.0.1:4010/v1/predictions");
        assert_eq!(body["version"], V);
        let (_, body) = replicate(&V.to_uppercase()).create_request(&job, "");
        assert_eq!(body["version"], V);
        let (url, _) = replicate("deployments/acme/my-sdxl").create_request(&job, "");
        assert_eq!(
            url,
            "http://127.0.0.1:4010/v1/deployments/acme/my-sdxl/predictions"
        );
        for bad in [
            "flux",
            "a/b/c",
            "a/b:123",
            "deployments/x",
            "../x/y",
            "a/b c",
            "",
        ] {
            let e = Replicate::new(&settings(bad)).unwrap_err();
            assert_eq!(e.0, "upstream_model", "{bad}: {e:?}");
        }
    }

    #[test]
    fn settings_need_a_token_and_a_well_formed_secret_and_debug_hides_them() {
        let mut s = settings("a/b");
        s.api_key = None;
        assert_eq!(Replicate::new(&s).unwrap_err().0, "api_key_env");
        let mut s = settings("a/b");
        s.webhook_secret = Some("not-a-secret".into());
        assert_eq!(Replicate::new(&s).unwrap_err().0, "webhook_secret_env");
        let mut s = settings("a/b");
        s.endpoint = None;
        assert_eq!(
            Replicate::new(&s).unwrap().base.as_str(),
            "https://api.replicate.com/"
        );
        let shown = format!("{:?}", replicate("a/b"));
        assert!(
            !shown.contains("sekrit") && !shown.contains("MfKQ"),
            "{shown}"
        );
    }

    #[test]
    fn predictions_map_to_states() {
        let r = replicate("a/b");
        let run =
            json!({"id": "p", "status": "processing", "logs": "progress: 10%\nprogress: 40%\n"});
        assert!(matches!(
            r.state_of(&run).unwrap(),
            UpstreamState::Running {
                progress: Some(40),
                ..
            }
        ));
        let start = json!({"id": "p", "status": "starting", "logs": null});
        assert_eq!(
            r.state_of(&start).unwrap(),
            UpstreamState::Running {
                progress: None,
                logs: None
            }
        );
        let ok =
            json!({"status": "succeeded", "output": ["https://replicate.delivery/x/out-0.png"]});
        assert_eq!(
            r.state_of(&ok).unwrap(),
            UpstreamState::Succeeded {
                outputs: vec!["https://replicate.delivery/x/out-0.png".into()],
                logs: None
            }
        );
        let removed = json!({"status": "succeeded", "output": null, "data_removed": true});
        assert!(
            matches!(r.state_of(&removed).unwrap(), UpstreamState::Failed { message, .. } if message.contains("data_removed"))
        );
        let failed = json!({"status": "failed", "error": "CUDA out of memory (r8_sekrit_token)"});
        assert!(
            matches!(r.state_of(&failed).unwrap(), UpstreamState::Failed { message, .. } if message == "CUDA out of memory (<redacted>)")
        );
        for s in ["canceled", "aborted"] {
            assert_eq!(
                r.state_of(&json!({ "status": s })).unwrap(),
                UpstreamState::Canceled
            );
        }
        assert!(r.state_of(&json!({"status": "queued"})).is_err());
        assert!(r.state_of(&json!({})).is_err());
    }

    #[test]
    fn outputs_are_urls_or_become_files() {
        assert_eq!(
            outputs_of(&json!("https://replicate.delivery/a.png")),
            ["https://replicate.delivery/a.png"]
        );
        assert_eq!(
            outputs_of(&json!(["Hello", ", ", "world"])),
            ["data:text/plain;base64,SGVsbG8sIHdvcmxk"]
        );
        assert!(outputs_of(&json!({"score": 1}))[0].starts_with("data:application/json;base64,"));
        assert!(outputs_of(&json!(["https://a/1", 2]))[0].starts_with("data:application/json"));
        assert!(outputs_of(&Value::Null).is_empty());
    }

    #[test]
    fn problems_are_summarized_with_their_fields() {
        let v = json!({"title": "Invalid version or not permitted", "detail": "The specified version does not exist (or perhaps you don't have permission to use it?)", "status": 422});
        assert_eq!(
            problem_text(&v, ""),
            "Invalid version or not permitted: The specified version does not exist (or perhaps you don't have permission to use it?)"
        );
        let fields = json!({"detail": "- input: prompt is required\n", "status": 422, "title": "Input validation failed", "invalid_fields": [{"type": "required", "field": "input", "description": "prompt is required"}]});
        assert_eq!(
            problem_text(&fields, ""),
            "Input validation failed: input: prompt is required"
        );
        assert_eq!(problem_text(&Value::Null, "  "), "no details");
        assert_eq!(problem_text(&Value::Null, "<html>"), "<html>");
    }

    #[test]
    fn rate_limits_say_when_to_come_back() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let throttled = json!({"detail": "Request was throttled. Your rate limit resets in ~30s."});
        let mut h = http::HeaderMap::new();
        assert_eq!(
            retry_after(&h, &throttled, now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(retry_after(&h, &json!({"detail": "slow down"}), now), None);
        assert_eq!(retry_after(&h, &Value::Null, now), None);
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(
            retry_after(&h, &throttled, now),
            Some(Duration::from_secs(7))
        );
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:12 GMT".parse().unwrap(),
        );
        assert_eq!(
            retry_after(&h, &Value::Null, now),
            Some(Duration::from_secs(12))
        );
    }

    #[test]
    fn webhook_signatures_are_checked() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let ts = 1614265330;
        let mut h = http::HeaderMap::new();
        h.insert(
            "webhook-id",
            "msg_p5jXN8AQM9LWM0D4loKWxJek".parse().unwrap(),
        );
        h.insert("webhook-timestamp", ts.to_string().parse().unwrap());
        // The Standard Webhooks test vector, after an older key's entry.
        h.insert(
            "webhook-signature",
            "v1,Zm9yZ2Vk v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
                .parse()
                .unwrap(),
        );
        assert_eq!(Replicate::verify(secret, &h, body, ts + 10), Ok(()));
        assert!(Replicate::verify(secret, &h, b"{}", ts).is_err(), "body");
        assert!(
            Replicate::verify(secret, &h, body, ts + 301)
                .unwrap_err()
                .contains("5 minutes")
        );
        assert!(Replicate::verify(secret, &h, body, ts - 301).is_err());
        assert!(Replicate::verify("whsec_b3RoZXI=", &h, body, ts).is_err());
        h.insert("webhook-signature", "v1,Zm9yZ2Vk".parse().unwrap());
        assert!(Replicate::verify(secret, &h, body, ts).is_err());
        h.remove("webhook-id");
        assert!(
            Replicate::verify(secret, &h, body, ts)
                .unwrap_err()
                .contains("webhook-id")
        );
    }

    #[test]
    fn the_token_goes_only_to_replicate_file_hosts_and_the_endpoint() {
        let r = replicate("a/b");
        let has = |u: &str| !r.download_headers(&url::Url::parse(u).unwrap()).is_empty();
        assert!(has("https://replicate.delivery/x/out.png"));
        assert!(has("https://pbxt.replicate.delivery/x/out.png"));
        assert!(has("http://127.0.0.1:4010/files/x"));
        assert!(!has("http://replicate.delivery/x"), "not over http");
        assert!(!has("https://evilreplicate.delivery/x"));
        assert!(!has("https://replicate.delivery.evil.com/x"));
        assert!(!has("http://127.0.0.1:4011/files/x"), "another port");
        assert!(!has("https://example.com/out.png"));
        let h = r.download_headers(&url::Url::parse("https://replicate.delivery/a").unwrap());
        assert_eq!(h[0].1.to_str().unwrap(), "Bearer r8_sekrit_token");
        assert!(h[0].1.is_sensitive());
    }
}
