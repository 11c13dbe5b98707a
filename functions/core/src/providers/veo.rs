//! Veo on Google's Gemini API: video generation as a long-running operation
//! (<https://ai.google.dev/gemini-api/docs/video>). The product's `veo3` is a catalog entry
//! with `provider = "veo"` and `upstream_model = "veo-3.1-generate-preview"`.
//!
//! What this adapter relies on, from the Gemini API docs and the official Python SDK
//! (`googleapis/python-genai`: `google/genai/models.py` `_GenerateVideosConfig_to_mldev` and
//! `_GenerateVideosOperation_from_mldev`, `operations.py`, `files.py`, `_api_client.py`,
//! `errors.py`), which the fake in `tasklane_testkit::veo` reproduces:
//!
//! - **Endpoint and key**: `https://generativelanguage.googleapis.com` unless the catalog's
//!   `endpoint` says otherwise; every request carries the key in the `x-goog-api-key` header
//!   (never in the URL, so it cannot leak through a logged URL). The key comes from the
//!   environment variable the catalog's `api_key_env` names, [`DEFAULT_API_KEY_ENV`] when it
//!   names none; a missing one stops the start, naming the model and `api_key_env`.
//! - **Start**: `POST /v1beta/models/{upstream_model}:predictLongRunning` with
//!   `{"instances": [{"prompt"}], "parameters": {...}}`. `parameters.durationSeconds` is the
//!   task's `duration`; each of the task's `params` is sent under its camelCase name, so a
//!   catalog may declare them in either spelling: `aspect_ratio`/`aspectRatio` (`"16:9"`,
//!   `"9:16"`), `resolution` (`"720p"`, `"1080p"`), `negative_prompt`/`negativePrompt`,
//!   `person_generation`/`personGeneration` (`"dont_allow"`, `"allow_adult"`),
//!   `sample_count`/`sampleCount` (integer), `enhance_prompt`/`enhancePrompt` (boolean). The
//!   Gemini API refuses the Vertex-only ones (`seed`, `fps`, `generateAudio`, ...): a catalog
//!   declaring them gets tasks failed with Google's message. The answer is an operation,
//!   `{"name": "models/veo-3.1-generate-preview/operations/abc"}`; its `name` is the run's id.
//!   The API has no idempotency key: a start retried after a crash may create a second
//!   operation (and Google may bill both).
//! - **Check**: `GET /v1beta/{name}`, the name verbatim. `done` absent or false: running (the
//!   operation's `metadata` carries no progress worth showing). `done: true` with
//!   `error{code, message, status}`: failed with its message. `done: true` with
//!   `response.generateVideoResponse.generatedSamples[].video.uri`: succeeded, those URLs (an
//!   inline `video.encodedVideo` becomes a `data:video/mp4;base64,` URI). Done with no sample
//!   and `raiMediaFilteredCount > 0`: the safety filters blocked it, failed with
//!   `raiMediaFilteredReasons`. An unknown operation (404) is a lost run.
//! - **No callbacks.** The Gemini API can notify a `webhookConfig` (newer SDKs), but nothing
//!   here relies on it: tasklane does not send one, [`Upstream::read_callback`] accepts nothing,
//!   and the core's checks on a backoff ([`crate::Config::upstream_check_first`] doubling to
//!   [`crate::Config::upstream_check_max`]; the docs' own sample polls every 10 s) see the end.
//! - **No cancel.** The SDK exposes no way to cancel a video operation (`operations.py` has
//!   only get), so [`Upstream::cancel`] does nothing: after a timeout the operation runs on at
//!   Google, and tasklane ignores it.
//! - **Download**: `video.uri` is
//!   `https://generativelanguage.googleapis.com/v1beta/files/{id}:download?alt=media`; it needs
//!   the key and answers with a redirect to storage (the SDK follows redirects). The core
//!   follows at most three, judging each hop; [`Upstream::download_headers`] gives the key
//!   only to the configured endpoint's origin and to Google's own API origin, never to the
//!   storage a redirect points at. Google keeps videos for 2 days; tasklane copies them into its
//!   own blob store at once.
//! - **Errors** (`{"error": {"code", "message", "status", "details"}}`): 429
//!   `RESOURCE_EXHAUSTED` is capacity (the task waits queued), with the delay of a
//!   `google.rpc.RetryInfo` detail (`"retryDelay": "41s"`) when there is one; an invalid key is
//!   400 `INVALID_ARGUMENT` with the `API_KEY_INVALID` reason (not 401), shown as "the provider
//!   refused the API key"; other 4xx refuse the task with Google's message (any copy of the key
//!   in it removed); 5xx and connection failures are retried.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value, json};

use super::UpstreamSettings;
use crate::ports::{CallbackRequest, Job, Upstream, UpstreamError, UpstreamReport, UpstreamState};

/// The Gemini API's base URL, when the catalog names no `endpoint`.
pub const DEFAULT_ENDPOINT: &str = "https://generativelanguage.googleapis.com";
/// The environment variable holding the Gemini API key when the catalog names no
/// `api_key_env` (the SDK's own default).
pub const DEFAULT_API_KEY_ENV: &str = "GEMINI_API_KEY";
/// The header the key travels in.
const KEY_HEADER: &str = "x-goog-api-key";
/// Longest operation name accepted from the provider.
const MAX_NAME: usize = 512;

/// Veo models on the Gemini API.
#[derive(Clone)]
pub struct Veo {
    base: url::Url,
    model: String,
    key: http::HeaderValue,
    client: reqwest::Client,
}

impl std::fmt::Debug for Veo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Veo")
            .field("base", &self.base.as_str())
            .field("model", &self.model)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Veo {
    /// Veo model `settings.model` (required) on the Gemini API at `settings.endpoint` (default
    /// [`DEFAULT_ENDPOINT`]) with key `settings.api_key` (required); `Err` names the field.
    pub fn new(settings: &UpstreamSettings) -> Result<Veo, (String, String)> {
        Self::build(
            settings.endpoint.as_ref(),
            settings.model.as_deref(),
            settings.api_key.as_deref(),
            settings.request_timeout,
        )
    }

    fn build(
        endpoint: Option<&url::Url>,
        model: Option<&str>,
        key: Option<&str>,
        request_timeout: Duration,
    ) -> Result<Veo, (String, String)> {
        let field = |f: &str, m: &str| (f.to_string(), m.to_string());
        let base = match endpoint {
            Some(e) => e.clone(),
            None => url::Url::parse(DEFAULT_ENDPOINT).expect("a valid constant URL"),
        };
        if !matches!(base.scheme(), "http" | "https") {
            return Err(field("endpoint", "must be an http or https URL"));
        }
        let model = model
            .map(|m| m.trim().trim_start_matches("models/"))
            .ok_or_else(|| {
                field(
                    "upstream_model",
                    "a veo model needs the Gemini API's model id, e.g. \
                     upstream_model = \"veo-3.1-generate-preview\"",
                )
            })?;
        let model_ok = !model.is_empty()
            && model.len() <= 128
            && model
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.');
        if !model_ok {
            return Err(field(
                "upstream_model",
                "a Gemini API model id is lowercase letters, digits, '-' and '.', \
                 e.g. veo-3.1-generate-preview",
            ));
        }
        let key = key.ok_or_else(|| {
            field(
                "api_key_env",
                "a veo model needs a Gemini API key: name the environment variable holding it \
                 (default GEMINI_API_KEY)",
            )
        })?;
        // The message never repeats the value.
        let mut key = http::HeaderValue::from_str(key.trim()).map_err(|_| {
            field(
                "api_key_env",
                "the variable holds characters an HTTP header cannot carry",
            )
        })?;
        key.set_sensitive(true);
        let client = super::api_client(request_timeout).map_err(|e| field("endpoint", &e))?;
        Ok(Veo {
            base,
            model: model.to_string(),
            key,
            client,
        })
    }

    /// `{base}/v1beta/{path}` (a base given with `/v1beta` at its end is taken as the root).
    fn url(&self, path: &str) -> String {
        let root = self.base.as_str().trim_end_matches('/');
        let root = root.strip_suffix("/v1beta").unwrap_or(root);
        format!("{root}/v1beta/{path}")
    }

    /// The `predictLongRunning` body of `job` (see the module doc for the parameter names).
    fn body(job: &Job<'_>) -> Value {
        let mut instance = Map::new();
        if let Some(p) = job.prompt {
            instance.insert("prompt".into(), json!(p));
        }
        let mut parameters = Map::new();
        for (k, v) in job.params {
            parameters.insert(camel_case(k), v.clone());
        }
        if let Some(d) = job.duration {
            parameters.insert("durationSeconds".into(), json!(d));
        }
        json!({"instances": [instance], "parameters": parameters})
    }

    /// `message` with any copy of the key taken out.
    fn scrub(&self, message: &str) -> String {
        match self.key.to_str() {
            Ok(k) if !k.is_empty() => message.replace(k, "<redacted>"),
            _ => message.to_string(),
        }
    }

    /// Sends `req` with the key and reads the answer: the JSON body of a 2xx, or the error it
    /// means. `check`: a 404 is the run being unknown (rather than a refused request).
    async fn call(
        &self,
        req: reqwest::RequestBuilder,
        check: bool,
    ) -> Result<Value, UpstreamError> {
        let resp = req
            .header(KEY_HEADER, self.key.clone())
            .send()
            .await
            .map_err(unreachable)?;
        let status = resp.status().as_u16();
        let header_delay = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = resp.bytes().await.map_err(unreachable)?;
        let body: Option<Value> = serde_json::from_slice(&bytes).ok();
        if (200..300).contains(&status) {
            return body.ok_or_else(|| {
                UpstreamError::Unavailable(
                    "the provider answered with a body that is not JSON".into(),
                )
            });
        }
        let body = body.unwrap_or(Value::Null);
        let error = &body["error"];
        let message = self.scrub(
            error["message"]
                .as_str()
                .or_else(|| error["status"].as_str())
                .unwrap_or("no details"),
        );
        Err(match status {
            429 => UpstreamError::Busy {
                retry_after: retry_delay(error).or(header_delay),
            },
            404 if check => UpstreamError::Unknown,
            400..=499 if key_refused(error) => {
                UpstreamError::Refused("the provider refused the API key".into())
            }
            400..=499 => {
                UpstreamError::Refused(format!("the provider refused the request: {message}"))
            }
            _ => UpstreamError::Unavailable(format!("the provider answered {status}: {message}")),
        })
    }
}

fn unreachable(e: reqwest::Error) -> UpstreamError {
    super::unreachable("the provider", &e)
}

/// `aspect_ratio` → `aspectRatio`; a name in camelCase already is kept.
fn camel_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = !out.is_empty();
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether a Google error says the API key is invalid (reason `API_KEY_INVALID` in an
/// `ErrorInfo` detail; some answers say so only in the message).
fn key_refused(error: &Value) -> bool {
    let by_reason = error["details"].as_array().is_some_and(|details| {
        details
            .iter()
            .any(|d| d["reason"].as_str() == Some("API_KEY_INVALID"))
    });
    by_reason
        || error["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("API key not valid"))
}

/// The delay of a `google.rpc.RetryInfo` detail (`"retryDelay": "41s"`, a protobuf Duration
/// in JSON: seconds with an `s`, fractions allowed), at most an hour.
fn retry_delay(error: &Value) -> Option<Duration> {
    error["details"].as_array()?.iter().find_map(|d| {
        let secs: f64 = d["retryDelay"]
            .as_str()?
            .trim()
            .strip_suffix('s')?
            .parse()
            .ok()?;
        (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
    })
}

/// Whether `name` is an operation name that can go into a URL path as it is: relative, of
/// plain segments (no `..`, no query), naming an operation.
fn valid_operation_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.contains("operations/")
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_./".contains(&c))
        && name
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
}

/// A MIME type of a video, for a `data:` URI; anything else is taken as MP4.
fn video_type(t: Option<&str>) -> &str {
    match t {
        Some(t)
            if t.starts_with("video/")
                && t.len() <= 64
                && t[6..]
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-+.".contains(&c)) =>
        {
            t
        }
        _ => "video/mp4",
    }
}

/// What an operation says about its run.
fn state_of(op: &Value) -> UpstreamState {
    if op["done"].as_bool() != Some(true) {
        return UpstreamState::Running {
            progress: None,
            logs: None,
        };
    }
    let failed = |message: String| UpstreamState::Failed {
        message,
        logs: None,
    };
    let error = &op["error"];
    if error.is_object() {
        let message = error["message"]
            .as_str()
            .filter(|m| !m.trim().is_empty())
            .or_else(|| error["status"].as_str())
            .unwrap_or("the provider's operation failed");
        return failed(message.to_string());
    }
    let response = &op["response"]["generateVideoResponse"];
    let mut outputs = Vec::new();
    for sample in response["generatedSamples"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let video = &sample["video"];
        if let Some(uri) = video["uri"].as_str() {
            outputs.push(uri.to_string());
        } else if let Some(data) = video["encodedVideo"].as_str() {
            let mime = video_type(video["encoding"].as_str().or(video["mimeType"].as_str()));
            outputs.push(format!("data:{mime};base64,{data}"));
        }
    }
    if !outputs.is_empty() {
        return UpstreamState::Succeeded {
            outputs,
            logs: None,
        };
    }
    if response["raiMediaFilteredCount"].as_u64().unwrap_or(0) > 0 {
        let reasons: Vec<&str> = response["raiMediaFilteredReasons"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let reasons = if reasons.is_empty() {
            "no reason given".to_string()
        } else {
            reasons.join("; ")
        };
        return failed(format!(
            "blocked by the provider's safety filters: {reasons}"
        ));
    }
    failed("the provider finished without a video".into())
}

#[async_trait]
impl Upstream for Veo {
    fn provider(&self) -> &'static str {
        "veo"
    }

    async fn start(&self, job: Job<'_>, _callback: &str) -> Result<String, UpstreamError> {
        let url = self.url(&format!("models/{}:predictLongRunning", self.model));
        let op = self
            .call(self.client.post(url).json(&Self::body(&job)), false)
            .await?;
        match op["name"].as_str() {
            Some(name) if valid_operation_name(name) => Ok(name.to_string()),
            _ => Err(UpstreamError::Refused(
                "the provider answered without a usable operation name".into(),
            )),
        }
    }

    async fn check(
        &self,
        _job: Job<'_>,
        id: &str,
        _callback: &str,
    ) -> Result<UpstreamState, UpstreamError> {
        if !valid_operation_name(id) {
            return Err(UpstreamError::Unknown);
        }
        let op = self.call(self.client.get(self.url(id)), true).await?;
        Ok(state_of(&op))
    }

    async fn cancel(&self, _id: &str) -> Result<(), UpstreamError> {
        // The Gemini API exposes no cancel for video operations (see the module doc).
        Ok(())
    }

    fn read_callback(&self, _req: CallbackRequest<'_>) -> Result<UpstreamReport, String> {
        Err("Veo operations on the Gemini API are checked, not reported by callback".into())
    }

    fn callback_is_authoritative(&self) -> bool {
        false
    }

    fn download_headers(&self, url: &url::Url) -> Vec<(http::HeaderName, http::HeaderValue)> {
        let google = url::Url::parse(DEFAULT_ENDPOINT).expect("a valid constant URL");
        if url.origin() == self.base.origin() || url.origin() == google.origin() {
            vec![(http::HeaderName::from_static(KEY_HEADER), self.key.clone())]
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(
        endpoint: Option<&str>,
        model: Option<&str>,
        key: Option<&str>,
    ) -> Result<Veo, (String, String)> {
        let endpoint = endpoint.map(|e| url::Url::parse(e).unwrap());
        Veo::build(endpoint.as_ref(), model, key, Duration::from_secs(5))
    }

    fn veo() -> Veo {
        build(
            Some("http://127.0.0.1:9/"),
            Some("veo-3.1-generate-preview"),
            Some("AIza-secret"),
        )
        .unwrap()
    }

    #[test]
    fn the_body_maps_duration_and_params_by_name() {
        let params = json!({
            "aspect_ratio": "9:16", "negativePrompt": "cartoon", "resolution": "1080p",
            "person_generation": "allow_adult", "sample_count": 2, "enhance_prompt": true,
        });
        let job = Job {
            task_id: "task_1",
            action: "generate",
            prompt: Some("a cat"),
            duration: Some(8),
            params: params.as_object().unwrap(),
        };
        assert_eq!(
            Veo::body(&job),
            json!({"instances": [{"prompt": "a cat"}], "parameters": {
                "durationSeconds": 8, "aspectRatio": "9:16", "negativePrompt": "cartoon",
                "resolution": "1080p", "personGeneration": "allow_adult", "sampleCount": 2,
                "enhancePrompt": true,
            }})
        );
        assert_eq!(
            veo().url("models/veo-3.1-generate-preview:predictLongRunning"),
            "http://127.0.0.1:9/v1beta/models/veo-3.1-generate-preview:predictLongRunning"
        );
    }

    #[test]
    fn operations_map_to_states() {
        let running = UpstreamState::Running {
            progress: None,
            logs: None,
        };
        assert_eq!(state_of(&json!({"name": "operations/a"})), running);
        assert_eq!(
            state_of(&json!({"name": "operations/a", "done": false})),
            running
        );
        let ok = json!({"done": true, "response": {
        "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningResponse",
        "generateVideoResponse": {"generatedSamples": [
            {"video": {"uri": "https://generativelanguage.googleapis.com/v1beta/files/abc:download?alt=media"}},
            {"video": {"encodedVideo": "AAAA", "encoding": "video/mp4"}},
        ]}}});
        assert_eq!(
            state_of(&ok),
            UpstreamState::Succeeded {
                outputs: vec![
                    "https://generativelanguage.googleapis.com/v1beta/files/abc:download?alt=media"
                        .into(),
                    "data:video/mp4;base64,AAAA".into()
                ],
                logs: None
            }
        );
        let error = json!({"done": true, "error": {"code": 13, "message": "internal failure", "status": "INTERNAL"}});
        assert!(
            matches!(state_of(&error), UpstreamState::Failed { message, .. } if message == "internal failure")
        );
        let rai = json!({"done": true, "response": {"generateVideoResponse": {
            "raiMediaFilteredCount": 1, "raiMediaFilteredReasons": ["violence"]}}});
        assert!(
            matches!(state_of(&rai), UpstreamState::Failed { message, .. }
            if message == "blocked by the provider's safety filters: violence")
        );
        let empty = json!({"done": true, "response": {}});
        assert!(matches!(state_of(&empty), UpstreamState::Failed { .. }));
        let odd_type = json!({"done": true, "response": {"generateVideoResponse": {"generatedSamples": [
            {"video": {"encodedVideo": "AAAA", "encoding": "text/html;x"}}]}}});
        assert!(
            matches!(state_of(&odd_type), UpstreamState::Succeeded { outputs, .. }
            if outputs == vec!["data:video/mp4;base64,AAAA".to_string()])
        );
    }

    #[test]
    fn errors_are_read_from_google_error_bodies() {
        let quota = json!({"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "41s"}]});
        assert_eq!(retry_delay(&quota), Some(Duration::from_secs(41)));
        assert_eq!(
            retry_delay(&json!({"details": [{"retryDelay": "1.5s"}]})),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_delay(&json!({"details": [{"retryDelay": "soon"}]})),
            None
        );
        assert_eq!(retry_delay(&json!({})), None);
        let bad_key = json!({"code": 400, "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT", "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]});
        assert!(key_refused(&bad_key));
        assert!(!key_refused(
            &json!({"message": "durationSeconds is out of range"})
        ));
        assert_eq!(camel_case("person_generation"), "personGeneration");
        assert_eq!(camel_case("aspectRatio"), "aspectRatio");
        assert_eq!(camel_case("_x"), "x");
    }

    #[test]
    fn operation_names_are_used_only_when_they_are_plain_paths() {
        assert!(valid_operation_name(
            "models/veo-3.1-generate-preview/operations/vz341u0pmdlc"
        ));
        assert!(valid_operation_name("operations/abc"));
        for bad in [
            "",
            "models/x",
            "operations/../../files/x",
            "/operations/a",
            "operations/a?key=1",
            "operations//a",
            "https://evil.example/operations/a",
        ] {
            assert!(!valid_operation_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_key_goes_only_to_the_provider_and_is_never_shown() {
        let v = veo();
        assert!(!format!("{v:?}").contains("AIza-secret"));
        let to = |u: &str| v.download_headers(&url::Url::parse(u).unwrap());
        assert_eq!(
            to("http://127.0.0.1:9/v1beta/files/a:download?alt=media").len(),
            1
        );
        assert_eq!(
            to("https://generativelanguage.googleapis.com/v1beta/files/a:download").len(),
            1
        );
        for elsewhere in [
            "http://127.0.0.1:10/videos/a.mp4",
            "https://127.0.0.1:9/v1beta/files/a",
            "http://generativelanguage.googleapis.com/v1beta/files/a",
            "https://storage.googleapis.com/a.mp4",
        ] {
            assert!(to(elsewhere).is_empty(), "{elsewhere}");
        }
        assert!(format!("{:?}", to("http://127.0.0.1:9/x")).contains("Sensitive"));
        assert_eq!(
            v.scrub("bad key AIza-secret here"),
            "bad key <redacted> here"
        );
        assert!(
            v.read_callback(CallbackRequest {
                headers: &http::HeaderMap::new(),
                body: b"{\"name\": \"operations/a\", \"done\": true}",
            })
            .is_err()
        );
        assert!(!v.callback_is_authoritative());
    }

    #[test]
    fn settings_are_checked_naming_the_field() {
        let field = |r: Result<Veo, (String, String)>| r.err().map(|(f, _)| f);
        assert_eq!(
            field(build(None, None, Some("k"))).as_deref(),
            Some("upstream_model")
        );
        assert_eq!(
            field(build(None, Some("Veo 3!"), Some("k"))).as_deref(),
            Some("upstream_model")
        );
        assert_eq!(
            field(build(None, Some("veo-3.1-generate-preview"), None)).as_deref(),
            Some("api_key_env")
        );
        assert_eq!(
            field(build(
                Some("ftp://127.0.0.1/"),
                Some("veo-3.1-generate-preview"),
                Some("k")
            ))
            .as_deref(),
            Some("endpoint")
        );
        let (f, m) = build(None, Some("veo-3.1-generate-preview"), Some("a\nb"))
            .err()
            .unwrap();
        assert_eq!(f, "api_key_env");
        assert!(!m.contains("a\nb"));
        let v = build(None, Some("models/veo-3.1-generate-preview"), Some("k")).unwrap();
        assert_eq!(v.model, "veo-3.1-generate-preview");
        assert_eq!(
            v.url("operations/x"),
            "https://generativelanguage.googleapis.com/v1beta/operations/x"
        );
    }

    #[test]
    fn the_catalog_reads_the_key_from_gemini_api_key_unless_told_otherwise() {
        let entry = |extra: &str| {
            format!(
                "[models.veo3]\nprovider = \"veo\"\nupstream_model = \"veo-3.1-generate-preview\"\n\
                 prompt = {{ required = true }}\nduration = {{ min = 4, max = 8, default = 8 }}\n\
                 price = {{ per_second = 10 }}\n{extra}"
            )
        };
        let none = |_: &str| None;
        let err = crate::catalog::parse(&entry(""), &none, 1.0).err().unwrap();
        assert_eq!(err.model.as_deref(), Some("veo3"));
        assert_eq!(err.field.as_deref(), Some("api_key_env"));
        assert!(err.message.contains("GEMINI_API_KEY"), "{err}");
        let default = |n: &str| (n == "GEMINI_API_KEY").then(|| "AIza-from-env".to_string());
        assert!(crate::catalog::parse(&entry(""), &default, 1.0).is_ok());
        let custom = |n: &str| (n == "MY_VEO_KEY").then(|| "AIza-custom".to_string());
        let named = entry("api_key_env = \"MY_VEO_KEY\"\n");
        assert!(crate::catalog::parse(&named, &custom, 1.0).is_ok());
        let err = crate::catalog::parse(&named, &default, 1.0).err().unwrap();
        assert!(
            err.message.contains("MY_VEO_KEY") && !err.to_string().contains("AIza"),
            "{err}"
        );
    }
}
