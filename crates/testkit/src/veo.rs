//! A fake of Google's Gemini API for Veo video generation on loopback, for the suites of the
//! `veo` provider (`tasklane_core::providers::veo`). It does what the API is documented and the
//! official SDK is written to expect (<https://ai.google.dev/gemini-api/docs/video>;
//! `googleapis/python-genai`: `google/genai/models.py`, `operations.py`, `files.py`,
//! `_api_client.py`, `errors.py`):
//!
//! - `POST /v1beta/models/{model}:predictLongRunning` with `{"instances": [{"prompt"}],
//!   "parameters"}` answers an operation `{"name": "models/{model}/operations/{id}"}` (the SDK's
//!   tests show the `models/…` prefix). Only the Veo model ids of the SDK's tests are known;
//!   another answers 404 `NOT_FOUND`.
//! - `GET /v1beta/{name}` answers the operation: no `done` (with a `metadata` object) until the
//!   test-controlled generation time has passed ([`VeoFake::set_generation_time`]), then
//!   `done: true` and, by the prompt:
//!   - success: `response.generateVideoResponse.generatedSamples[].video.uri` (one per
//!     `parameters.sampleCount`, default 1), each
//!     `{url}/v1beta/files/{id}:download?alt=media` with a lowercase alphanumeric id, as the
//!     SDK's `t_file_name` regex `[a-z0-9]+` requires;
//!   - a prompt containing [`UNSAFE_WORD`]: no sample, `raiMediaFilteredCount: 1` and
//!     `raiMediaFilteredReasons` ([`RAI_REASON`]): the safety filters blocked it;
//!   - a prompt containing [`FAIL_WORD`]: `error{code, message, status}` (a google.rpc.Status).
//!
//!   Bodies carry `@type` keys, which clients must ignore. An unknown operation is 404
//!   `NOT_FOUND`.
//! - `GET /v1beta/files/{id}:download?alt=media` needs the key, as the SDK's `files.download`
//!   sends it, and answers 302 to the video on a second loopback listener standing in for
//!   Google's storage ([`VeoFake::storage_url`]), which serves `video/mp4` bytes starting with
//!   an `ftyp` box ([`video_bytes`]) and counts whether the key reached it. Videos are kept 2
//!   days (the Veo docs' limitation), on the fake's clock ([`VeoFake::advance`]); after that
//!   both paths answer 404.
//! - Every API request needs the key in `x-goog-api-key` (or `?key=`): none is 403
//!   `PERMISSION_DENIED`; a wrong one is 400 `INVALID_ARGUMENT` with an `ErrorInfo` detail of
//!   reason `API_KEY_INVALID` (not 401, as API users repeatedly report observing it).
//! - Test-controlled failures: 429 `RESOURCE_EXHAUSTED` with `QuotaFailure`, `Help` and
//!   `RetryInfo{retryDelay}` details for the next N creates ([`VeoFake::throttle_creates`];
//!   the body shape of <https://github.com/google-gemini/gemini-cli/issues/8437>), 500
//!   `INTERNAL` for the next N API requests ([`VeoFake::fail_next`]), a download redirect to
//!   any URL ([`VeoFake::redirect_downloads_to`]), and the whole API going away
//!   ([`VeoFake::stop`]).
//!
//! Every answer closes its connection, so a stopped fake is unreachable at once. Errors have
//! Google's shape, `{"error": {"code", "message", "status", "details"?}}`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A prompt containing this word is blocked by the fake's safety filters.
pub const UNSAFE_WORD: &str = "unsafe";
/// A prompt containing this word ends in an operation error.
pub const FAIL_WORD: &str = "fail";
/// The reason the safety filters give (wording illustrative: the real reasons are prose).
pub const RAI_REASON: &str = "The prompt could not be submitted. This prompt contains words \
                              that violate the usage guidelines.";
/// The message of an operation that ends in error.
pub const OPERATION_ERROR: &str = "Video generation failed. Please try again later.";
/// How long videos are kept (the Veo docs' "2 days").
pub const RETENTION: Duration = Duration::from_secs(2 * 24 * 3600);
/// The model ids the fake knows (those of the SDK's tests).
pub const MODELS: [&str; 4] = [
    "veo-3.1-generate-preview",
    "veo-3.1-fast-generate-preview",
    "veo-3.0-generate-001",
    "veo-2.0-generate-001",
];
/// Largest request body the fake reads.
const MAX_BODY: usize = 1024 * 1024;

/// What the fake has seen and answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VeoCounts {
    /// `predictLongRunning` requests (all, whatever the answer).
    pub create_requests: u32,
    /// Operations created.
    pub operations: u32,
    /// Creates answered 429.
    pub throttled: u32,
    /// API requests answered 500.
    pub server_errors: u32,
    /// API requests refused for a missing or wrong key.
    pub key_refused: u32,
    /// Operation reads (`GET /v1beta/{name}`) of a known operation.
    pub polls: u32,
    /// API requests answered 404.
    pub not_found: u32,
    /// Downloads answered with a redirect.
    pub downloads: u32,
    /// Requests to the storage listener.
    pub storage_requests: u32,
    /// Requests to the storage listener that carried `x-goog-api-key` (should be none).
    pub storage_requests_with_key: u32,
}

/// How an operation ends.
#[derive(Debug, Clone)]
enum Outcome {
    Videos(Vec<String>),
    Filtered,
    Error,
}

struct Operation {
    ready_at: Instant,
    outcome: Outcome,
}

struct State {
    key: String,
    api_url: String,
    storage_url: String,
    /// How far the fake's clock is ahead of the real one.
    offset: Duration,
    generation_time: Duration,
    /// By full name, `models/{m}/operations/{id}`.
    operations: HashMap<String, Operation>,
    /// File id → when its operation is done.
    files: HashMap<String, Instant>,
    throttle: u32,
    retry_delay: Option<String>,
    fail: u32,
    redirect: Option<String>,
    counts: VeoCounts,
    created: Vec<Value>,
    /// Ids of the videos of successful operations, in order of creation.
    video_ids: Vec<String>,
}

impl State {
    fn now(&self) -> Instant {
        Instant::now() + self.offset
    }

    /// Whether file `id` can be served now: known, done, and not yet expired.
    fn file_available(&self, id: &str) -> bool {
        let now = self.now();
        self.files
            .get(id)
            .is_some_and(|ready| *ready <= now && now < *ready + RETENTION)
    }
}

/// A fake Gemini API (and its storage) on loopback. Its servers stop when it is dropped.
pub struct VeoFake {
    /// Base URL of the API, `http://127.0.0.1:{port}`: the catalog's `endpoint`.
    pub url: String,
    /// Base URL of the storage its downloads redirect to (another port of 127.0.0.1).
    pub storage_url: String,
    state: Arc<Mutex<State>>,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for VeoFake {
    fn drop(&mut self) {
        for s in &self.servers {
            s.abort();
        }
    }
}

impl VeoFake {
    /// Starts the fake accepting `key`; operations take 300 ms of generation time.
    pub async fn start(key: &str) -> VeoFake {
        let api = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake Gemini API");
        let storage = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake storage");
        let url = format!("http://{}", api.local_addr().expect("its address"));
        let storage_url = format!("http://{}", storage.local_addr().expect("its address"));
        let state = Arc::new(Mutex::new(State {
            key: key.to_string(),
            api_url: url.clone(),
            storage_url: storage_url.clone(),
            offset: Duration::ZERO,
            generation_time: Duration::from_millis(300),
            operations: HashMap::new(),
            files: HashMap::new(),
            throttle: 0,
            retry_delay: None,
            fail: 0,
            redirect: None,
            counts: VeoCounts::default(),
            created: Vec::new(),
            video_ids: Vec::new(),
        }));
        let servers = vec![
            tokio::spawn(serve(api, state.clone(), false)),
            tokio::spawn(serve(storage, state.clone(), true)),
        ];
        VeoFake {
            url,
            storage_url,
            state,
            servers,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Operations created from now on are done after `d` (on the fake's clock).
    pub fn set_generation_time(&self, d: Duration) {
        self.state().generation_time = d;
    }

    /// Moves the fake's clock forward by `d` (e.g. [`RETENTION`] to expire every video).
    pub fn advance(&self, d: Duration) {
        self.state().offset += d;
    }

    /// The next `n` creates answer 429 `RESOURCE_EXHAUSTED`, with a `RetryInfo` detail of
    /// `retry_delay` (e.g. `"41s"`) when given.
    pub fn throttle_creates(&self, n: u32, retry_delay: Option<&str>) {
        let mut s = self.state();
        s.throttle = n;
        s.retry_delay = retry_delay.map(str::to_string);
    }

    /// The next `n` API requests (not the storage's) answer 500 `INTERNAL`.
    pub fn fail_next(&self, n: u32) {
        self.state().fail = n;
    }

    /// Downloads redirect to `location` instead of the fake's storage (`None`: the storage).
    pub fn redirect_downloads_to(&self, location: Option<&str>) {
        self.state().redirect = location.map(str::to_string);
    }

    /// Stops both listeners: from now on connections are refused.
    pub fn stop(&self) {
        for s in &self.servers {
            s.abort();
        }
    }

    /// What the fake has counted so far.
    pub fn counts(&self) -> VeoCounts {
        self.state().counts
    }

    /// The bodies of the creates that made an operation, in order.
    pub fn created(&self) -> Vec<Value> {
        self.state().created.clone()
    }

    /// The ids of the videos successful operations made (and will make), in order of creation.
    pub fn video_ids(&self) -> Vec<String> {
        self.state().video_ids.clone()
    }

    /// The download URL of file `id`, as operations give it.
    pub fn file_url(&self, id: &str) -> String {
        format!("{}/v1beta/files/{id}:download?alt=media", self.url)
    }
}

/// The bytes of video `id`: an ISO BMFF `ftyp` box (brand `isom`) and an `mdat` box naming it.
/// Not a playable MP4, but one by its signature.
pub fn video_bytes(id: &str) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&24u32.to_be_bytes());
    v.extend_from_slice(b"ftypisom");
    v.extend_from_slice(&0x200u32.to_be_bytes());
    v.extend_from_slice(b"isomiso2");
    let payload = format!("tasklane veo fake video {id}");
    v.extend_from_slice(&(8 + payload.len() as u32).to_be_bytes());
    v.extend_from_slice(b"mdat");
    v.extend_from_slice(payload.as_bytes());
    v
}

async fn serve(listener: TcpListener, state: Arc<Mutex<State>>, storage: bool) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(connection(stream, state.clone(), storage));
    }
}

/// A request as read off the wire.
struct Request {
    method: String,
    path: String,
    query: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// An answer to write.
struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn json(status: u16, body: &Value) -> Answer {
        Answer {
            status,
            headers: vec![("content-type", "application/json; charset=UTF-8".into())],
            body: body.to_string().into_bytes(),
        }
    }
}

/// Answers one request and closes the connection.
async fn connection(stream: TcpStream, state: Arc<Mutex<State>>, storage: bool) {
    let mut stream = BufReader::new(stream);
    let answer = match read_request(&mut stream).await {
        Ok(Some(req)) => {
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            if storage {
                storage_answer(&mut s, &req)
            } else {
                api_answer(&mut s, &req)
            }
        }
        Ok(None) => return,
        Err(_) => google_error(400, "INVALID_ARGUMENT", "Malformed request.", None),
    };
    let reason = match answer.status {
        200 => "OK",
        302 => "Found",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        _ => "Internal Server Error",
    };
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-length: {}\r\nconnection: close\r\n",
        answer.status,
        answer.body.len()
    );
    for (k, v) in &answer.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let stream = stream.get_mut();
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&answer.body).await;
    let _ = stream.shutdown().await;
}

/// Reads one HTTP/1.1 request with a `Content-Length` body; `None` at end of stream.
async fn read_request(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or_default().to_string();
    let target = words.next().unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (path, query) = (path.to_string(), query.to_string());
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if len > MAX_BODY {
        return Err(std::io::Error::other("body too large"));
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).await?;
    Ok(Some(Request {
        method,
        path,
        query,
        headers,
        body,
    }))
}

/// `{"error": {"code", "message", "status", "details"?}}`, Google's error shape.
fn google_error(code: u16, status: &str, message: &str, details: Option<Value>) -> Answer {
    let mut error = json!({"code": code, "message": message, "status": status});
    if let Some(d) = details {
        error["details"] = d;
    }
    Answer::json(code, &json!({ "error": error }))
}

fn not_found(s: &mut State, message: &str) -> Answer {
    s.counts.not_found += 1;
    google_error(404, "NOT_FOUND", message, None)
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The Gemini API's answer to `req`.
fn api_answer(s: &mut State, req: &Request) -> Answer {
    if s.fail > 0 {
        s.fail -= 1;
        s.counts.server_errors += 1;
        return google_error(
            500,
            "INTERNAL",
            "An internal error has occurred. Please retry or report in \
             https://developers.generativeai.google/guide/troubleshooting",
            None,
        );
    }
    let is_create = req.method == "POST" && req.path.ends_with(":predictLongRunning");
    if is_create {
        s.counts.create_requests += 1;
    }
    let key = req
        .headers
        .get("x-goog-api-key")
        .map(String::as_str)
        .or_else(|| query_param(&req.query, "key"));
    match key {
        None => {
            s.counts.key_refused += 1;
            return google_error(
                403,
                "PERMISSION_DENIED",
                "Method doesn't allow unregistered callers (callers without established \
                 identity). Please use API Key or other form of API consumer identity to call \
                 this API.",
                None,
            );
        }
        Some(k) if k != s.key => {
            s.counts.key_refused += 1;
            return google_error(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                Some(json!([{
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                }])),
            );
        }
        Some(_) => {}
    }
    let Some(rest) = req.path.strip_prefix("/v1beta/") else {
        return not_found(s, "The requested URL was not found on this server.");
    };
    if is_create {
        let model = rest
            .strip_prefix("models/")
            .and_then(|m| m.strip_suffix(":predictLongRunning"))
            .unwrap_or_default();
        return create(s, model, &req.body);
    }
    if req.method == "GET"
        && let Some(file) = rest.strip_prefix("files/")
        && let Some(id) = file.strip_suffix(":download")
    {
        return download(s, id, &req.query);
    }
    if req.method == "GET" && rest.contains("/operations/") {
        return poll(s, rest);
    }
    not_found(s, "The requested URL was not found on this server.")
}

/// `POST /v1beta/models/{model}:predictLongRunning`.
fn create(s: &mut State, model: &str, body: &[u8]) -> Answer {
    if !MODELS.contains(&model) {
        return not_found(
            s,
            &format!(
                "models/{model} is not found for API version v1beta, or is not supported for \
                 predictLongRunning. Call ListModels to see the list of available models and \
                 their supported methods."
            ),
        );
    }
    if s.throttle > 0 {
        s.throttle -= 1;
        s.counts.throttled += 1;
        let mut details = vec![
            json!({"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                "quotaMetric": "generativelanguage.googleapis.com/predict_long_running_requests",
                "quotaId": "PredictLongRunningRequestsPerMinutePerProjectPerModel",
                "quotaDimensions": {"location": "global", "model": model},
                "quotaValue": "10",
            }]}),
            json!({"@type": "type.googleapis.com/google.rpc.Help", "links": [{
                "description": "Learn more about Gemini API quotas",
                "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
            }]}),
        ];
        if let Some(d) = &s.retry_delay {
            details.push(
                json!({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": d}),
            );
        }
        return google_error(
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota, please check your plan and billing details. For \
             more information on this error, head to: \
             https://ai.google.dev/gemini-api/docs/rate-limits.",
            Some(Value::Array(details)),
        );
    }
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let Some(prompt) = request["instances"][0]["prompt"]
        .as_str()
        .filter(|p| !p.trim().is_empty())
    else {
        return google_error(
            400,
            "INVALID_ARGUMENT",
            "Invalid JSON payload: instances[0].prompt is required.",
            None,
        );
    };
    let samples = request["parameters"]["sampleCount"].as_u64().unwrap_or(1);
    if !(1..=4).contains(&samples) {
        return google_error(
            400,
            "INVALID_ARGUMENT",
            "sampleCount must be between 1 and 4.",
            None,
        );
    }
    let ready_at = s.now() + s.generation_time;
    let outcome = if prompt.contains(UNSAFE_WORD) {
        Outcome::Filtered
    } else if prompt.contains(FAIL_WORD) {
        Outcome::Error
    } else {
        let ids: Vec<String> = (0..samples).map(|_| new_id()).collect();
        for id in &ids {
            s.files.insert(id.clone(), ready_at);
            s.video_ids.push(id.clone());
        }
        Outcome::Videos(ids)
    };
    let name = format!("models/{model}/operations/{}", new_id());
    s.operations
        .insert(name.clone(), Operation { ready_at, outcome });
    s.counts.operations += 1;
    s.created.push(request);
    Answer::json(200, &json!({ "name": name }))
}

/// `GET /v1beta/{name}`.
fn poll(s: &mut State, name: &str) -> Answer {
    let now = s.now();
    let Some(op) = s.operations.get(name) else {
        return not_found(s, &format!("Operation not found: {name}"));
    };
    let (ready_at, outcome) = (op.ready_at, op.outcome.clone());
    s.counts.polls += 1;
    if now < ready_at {
        return Answer::json(
            200,
            &json!({"name": name, "metadata": {
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningMetadata",
            }}),
        );
    }
    let mut op = json!({"name": name, "done": true});
    let response_type =
        "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningResponse";
    match outcome {
        Outcome::Videos(ids) => {
            let samples: Vec<Value> = ids
                .iter()
                .map(|id| {
                    json!({"video": {
                        "uri": format!("{}/v1beta/files/{id}:download?alt=media", s.api_url),
                    }})
                })
                .collect();
            op["response"] = json!({"@type": response_type,
                "generateVideoResponse": {"generatedSamples": samples}});
        }
        Outcome::Filtered => {
            op["response"] = json!({"@type": response_type, "generateVideoResponse": {
                "raiMediaFilteredCount": 1,
                "raiMediaFilteredReasons": [RAI_REASON],
            }});
        }
        Outcome::Error => {
            op["error"] = json!({"code": 13, "message": OPERATION_ERROR, "status": "INTERNAL"});
        }
    }
    Answer::json(200, &op)
}

/// `GET /v1beta/files/{id}:download?alt=media`: a redirect to the storage.
fn download(s: &mut State, id: &str, query: &str) -> Answer {
    let lowercase_id = !id.is_empty()
        && id
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !lowercase_id || !s.file_available(id) {
        return not_found(s, &format!("File files/{id} not found."));
    }
    if query_param(query, "alt") != Some("media") {
        return google_error(
            400,
            "INVALID_ARGUMENT",
            "Only alt=media downloads are supported by this fake.",
            None,
        );
    }
    s.counts.downloads += 1;
    let location = s
        .redirect
        .clone()
        .unwrap_or_else(|| format!("{}/videos/{id}.mp4?signature={}", s.storage_url, new_id()));
    Answer {
        status: 302,
        headers: vec![("location", location)],
        body: Vec::new(),
    }
}

/// The storage listener: `GET /videos/{id}.mp4`.
fn storage_answer(s: &mut State, req: &Request) -> Answer {
    s.counts.storage_requests += 1;
    if req.headers.contains_key("x-goog-api-key") {
        s.counts.storage_requests_with_key += 1;
    }
    let id = req
        .path
        .strip_prefix("/videos/")
        .and_then(|p| p.strip_suffix(".mp4"))
        .unwrap_or_default();
    if req.method != "GET" || !s.file_available(id) {
        return Answer {
            status: 404,
            headers: vec![("content-type", "text/plain".into())],
            body: b"No such object.".to_vec(),
        };
    }
    Answer {
        status: 200,
        headers: vec![("content-type", "video/mp4".into())],
        body: video_bytes(id),
    }
}
