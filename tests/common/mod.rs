//! Test harness: a real local server on 127.0.0.1:0 with its own data directory, and an HTTP
//! client speaking to it. Every test gets its own server, port and data.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::Value;
use tasklane_local::{Hooks, LocalConfig, Running};

/// An answer: status, headers, JSON body (Null when the body is not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    /// Asserts the API error shape with `code` and the given status; returns the error object.
    pub fn assert_error(&self, status: u16, code: &str) -> &Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected status; body: {}",
            self.body
        );
        assert_eq!(self.headers["content-type"], "application/json");
        let e = &self.body["error"];
        assert_eq!(e["code"], code, "body: {}", self.body);
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "message missing: {}",
            self.body
        );
        e
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends a request (borrowing no server, so it can run on its own tokio task) and reads the answer.
/// The id of a task object.
pub fn task_id(task: &Value) -> String {
    task["task_id"].as_str().unwrap().to_string()
}

pub async fn answer(req: reqwest::RequestBuilder) -> Answer {
    let resp = req.send().await.expect("request sent");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}

/// Configuration tests start from: port 0, fast demo models, short webhook retries.
pub fn test_config(dir: &std::path::Path) -> LocalConfig {
    let mut c = LocalConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        workers: 2,
        demo_time_scale: 0.2,
        shutdown_grace: Duration::from_secs(10),
        ..LocalConfig::default()
    };
    c.core.callback_retry_schedule = vec![Duration::from_millis(200), Duration::from_millis(400)];
    c.core.callback_timeout = Duration::from_secs(2);
    // Suites fire bursts of requests from one account; the 429 test turns the limit back on.
    c.core.rate_limit = None;
    c
}

/// Which backends the suites run on: the embedded ones, or with `TASKLANE_TEST_BACKEND=aws`
/// DynamoDB, SQS and S3 on the emulator `AWS_ENDPOINT_URL` points at (scripts/test.sh starts it).
pub fn on_aws() -> bool {
    std::env::var("TASKLANE_TEST_BACKEND").is_ok_and(|b| b == "aws")
}

/// What an S3 presigned GET URL says about itself, once its signature checks out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresignedGet {
    /// `X-Amz-Date`: when it was signed.
    pub signed_at: chrono::DateTime<chrono::Utc>,
    /// `X-Amz-Expires`: seconds it is valid for from then.
    pub expires_in: u64,
}

impl PresignedGet {
    /// When S3 starts refusing it.
    pub fn expires_at(&self) -> chrono::DateTime<chrono::Utc> {
        self.signed_at + chrono::Duration::seconds(self.expires_in as i64)
    }
}

/// Checks an S3 presigned GET URL as S3 would, but for the clock: recomputes its SigV4 query
/// signature (AWS4-HMAC-SHA256, only `host` signed, unsigned payload) with the secret key in
/// `AWS_SECRET_ACCESS_KEY` for the region in `AWS_REGION` (the emulator's dummy credentials;
/// scripts/test.sh sets both) and compares it with `X-Amz-Signature`. The AWS emulator checks
/// neither the signature nor the expiry of the URLs it serves, so the suites check them here.
pub fn verify_s3_presigned_get(url: &str) -> Result<PresignedGet, String> {
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY")
        .map_err(|_| "AWS_SECRET_ACCESS_KEY is not set (run scripts/test.sh)".to_string())?;
    let region = std::env::var("AWS_REGION")
        .map_err(|_| "AWS_REGION is not set (run scripts/test.sh)".to_string())?;
    verify_sigv4_get(url, &secret, &region, "s3")
}

fn verify_sigv4_get(
    url: &str,
    secret: &str,
    region: &str,
    service: &str,
) -> Result<PresignedGet, String> {
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};
    fn mac(key: &[u8], data: &str) -> Vec<u8> {
        let mut m = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
        m.update(data.as_bytes());
        m.finalize().into_bytes().to_vec()
    }

    let parsed = url::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    let host = parsed.host_str().ok_or("no host")?;
    let host = match parsed.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    let query = parsed.query().ok_or("no query string: not signed")?;
    let mut params = Vec::new();
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        params.push((percent_decode(k)?, percent_decode(v)?));
    }
    let param = |name: &str| -> Result<&str, String> {
        let mut found = params.iter().filter(|(k, _)| k == name);
        match (found.next(), found.next()) {
            (Some((_, v)), None) => Ok(v.as_str()),
            (None, _) => Err(format!("no {name}")),
            (Some(_), Some(_)) => Err(format!("{name} given more than once")),
        }
    };
    let algorithm = param("X-Amz-Algorithm")?;
    if algorithm != "AWS4-HMAC-SHA256" {
        return Err(format!("X-Amz-Algorithm is {algorithm}"));
    }
    let amz_date = param("X-Amz-Date")?;
    let signed_at = chrono::NaiveDateTime::parse_from_str(amz_date, "%Y%m%dT%H%M%SZ")
        .map_err(|e| format!("X-Amz-Date {amz_date}: {e}"))?
        .and_utc();
    let credential: Vec<&str> = param("X-Amz-Credential")?.split('/').collect();
    let scope = match credential.as_slice() {
        [_key_id, date, r, s, "aws4_request"]
            if *date == &amz_date[..8] && *r == region && *s == service =>
        {
            format!("{date}/{region}/{service}/aws4_request")
        }
        _ => {
            return Err(format!(
                "credential scope {credential:?} is not {region}/{service} on the day of X-Amz-Date"
            ));
        }
    };
    let expires_in: u64 = param("X-Amz-Expires")?
        .parse()
        .map_err(|e| format!("X-Amz-Expires: {e}"))?;
    if !(1..=604_800).contains(&expires_in) {
        return Err(format!("X-Amz-Expires {expires_in} is out of S3's range"));
    }
    let signed_headers = param("X-Amz-SignedHeaders")?;
    if signed_headers != "host" {
        return Err(format!(
            "signs the headers {signed_headers}, which a plain GET does not send"
        ));
    }
    let signature = param("X-Amz-Signature")?;

    let mut canonical_query: Vec<String> = params
        .iter()
        .filter(|(k, _)| k != "X-Amz-Signature")
        .map(|(k, v)| format!("{}={}", uri_encode(k, true), uri_encode(v, true)))
        .collect();
    canonical_query.sort();
    let path = uri_encode(&percent_decode(parsed.path())?, false);
    let canonical_request = format!(
        "GET\n{path}\n{}\nhost:{host}\n\nhost\nUNSIGNED-PAYLOAD",
        canonical_query.join("&")
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let mut key = format!("AWS4{secret}").into_bytes();
    for part in [&amz_date[..8], region, service, "aws4_request"] {
        key = mac(&key, part);
    }
    let expected = hex::encode(mac(&key, &string_to_sign));
    if signature != expected {
        return Err(format!(
            "X-Amz-Signature {signature} is not the signature of this URL ({expected})"
        ));
    }
    Ok(PresignedGet {
        signed_at,
        expires_in,
    })
}

/// SigV4's URI encoding: every byte but the unreserved characters as `%XX` (`/` kept in paths).
fn uri_encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if !encode_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in {s}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s} is not UTF-8"))
}

/// The key result URLs are signed with on the AWS backend in the suites.
pub const TEST_RESULT_URL_KEY: &str = "test-result-url-signing-key-0123456789abcdef";

/// Creates a fresh table, queue and bucket on the emulator and connects adapters to them.
pub async fn aws_backends(
    settings: Option<tasklane_aws::AwsSettings>,
) -> (tasklane_local::Backends, tasklane_aws::AwsSettings) {
    let settings = match settings {
        Some(s) => s,
        None => {
            let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            let prefix = format!("t{}", ulid_like());
            tasklane_testkit::provision::provision(&config, &prefix)
                .await
                .expect("provisioning on the AWS emulator (is AWS_ENDPOINT_URL set? run scripts/test.sh)")
        }
    };
    // DynamoDB requests reach moto through tasklane-dynamo-proxy (AWS_ENDPOINT_URL, started
    // by scripts/test.sh), which makes its transactions atomic and answers conflicts as
    // DynamoDB does.
    let b = tasklane_aws::AwsBackends::connect(&settings).await;
    // Result URLs signed by tasklane and redirected to short S3 presigned GETs, as the
    // template deploys them (ResultUrlSigningKey), built on the server's own address.
    let blobs = b.blobs.clone().with_signed_urls(
        tasklane_core::result_urls::UrlSigner::new(TEST_RESULT_URL_KEY.as_bytes().to_vec()),
        None,
    );
    let backends = tasklane_local::Backends {
        store: std::sync::Arc::new(b.store.clone()),
        queue: b.work_queue(),
        source: std::sync::Arc::new(b.queue.clone()),
        delivery_source: b.deliveries.clone().map(|d| {
            std::sync::Arc::new(d) as std::sync::Arc<dyn tasklane_core::ports::MessageSource>
        }),
        blobs: std::sync::Arc::new(blobs.clone()),
        files: Some(std::sync::Arc::new(blobs)),
    };
    (backends, settings)
}

fn ulid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{nanos:x}{}{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub struct Server {
    pub running: Option<Running>,
    aws: Option<tasklane_aws::AwsSettings>,
    pub base: String,
    pub key: String,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub client: reqwest::Client,
}

impl Server {
    /// A server with the test configuration.
    pub async fn start() -> Server {
        Self::start_with(|_| {}, Hooks::default()).await
    }

    /// A server with the test configuration changed by `f` and adapters wrapped by `hooks`.
    pub async fn start_with(f: impl FnOnce(&mut LocalConfig), hooks: Hooks) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = test_config(tmp.path());
        f(&mut cfg);
        let dir = cfg.data_dir.clone();
        let mut s = Self::boot(cfg, hooks, None).await;
        s.dir = dir;
        s._tmp = Some(tmp);
        s
    }

    async fn boot(
        cfg: LocalConfig,
        hooks: Hooks,
        aws: Option<tasklane_aws::AwsSettings>,
    ) -> Server {
        let dir = cfg.data_dir.clone();
        let (backends, aws) = if on_aws() {
            let (b, s) = aws_backends(aws).await;
            (Some(b), Some(s))
        } else {
            (None, None)
        };
        let running = tasklane_local::start_on(cfg, backends, hooks)
            .await
            .expect("server starts");
        Server {
            aws,
            base: running.base_url.clone(),
            key: running.dev_api_key.clone(),
            running: Some(running),
            dir,
            _tmp: None,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        }
    }

    /// Shuts down gracefully and starts again on the same data directory (and a new port).
    pub async fn restart(mut self, f: impl FnOnce(&mut LocalConfig)) -> Server {
        self.running.take().unwrap().shutdown().await;
        let mut cfg = test_config(&self.dir);
        f(&mut cfg);
        let tmp = self._tmp.take();
        let mut s = Self::boot(cfg, Hooks::default(), self.aws.take()).await;
        s._tmp = tmp;
        s
    }

    /// A server serving the model catalog `text` (a TOML file in its data directory), with
    /// upstream checks fast enough that a lost callback is noticed within a second; `f` may
    /// change more.
    pub async fn start_with_catalog(
        text: &str,
        f: impl FnOnce(&mut LocalConfig),
        hooks: Hooks,
    ) -> Server {
        let text = text.to_string();
        Self::start_with(
            move |c| {
                let path = c.data_dir.join("models.toml");
                std::fs::write(&path, text).unwrap();
                c.models = Some(path);
                c.core.upstream_check_first = Duration::from_millis(200);
                c.core.upstream_check_max = Duration::from_millis(800);
                f(c);
            },
            hooks,
        )
        .await
    }

    /// The upstream's id of `task_id`'s run, once tasklane recorded one.
    pub async fn upstream_run_id(&self, task_id: &str) -> Option<String> {
        self.app()
            .store
            .task(task_id)
            .await
            .unwrap()
            .unwrap()
            .upstream
            .and_then(|u| u.id)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Answer {
        answer(req).await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.get_as(path, &self.key).await
    }

    pub async fn get_as(&self, path: &str, key: &str) -> Answer {
        self.send(self.client.get(self.url(path)).bearer_auth(key))
            .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Answer {
        self.post_as(path, body, &self.key).await
    }

    pub async fn post_as(&self, path: &str, body: &Value, key: &str) -> Answer {
        self.send(self.client.post(self.url(path)).bearer_auth(key).json(body))
            .await
    }

    /// Submits and asserts 202; returns the task.
    pub async fn submit(&self, body: Value) -> Value {
        let a = self.post("/tasks", &body).await;
        assert_eq!(a.status, 202, "submit failed: {}", a.body);
        a.body
    }

    pub async fn credits(&self) -> u64 {
        self.get("/account").await.body["credits"].as_u64().unwrap()
    }

    /// Polls `GET /tasks/{id}` until `done` holds (at most `secs` seconds); returns the task.
    pub async fn wait_for(
        &self,
        id: &str,
        secs: u64,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let t = self.get(&format!("/tasks/{id}")).await;
            assert_eq!(t.status, 200, "{}", t.body);
            if done(&t.body) {
                return t.body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "task {id} not {what} after {secs} s: {}",
                t.body
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls until the task is terminal (at most `secs` seconds); returns it.
    pub async fn wait_terminal(&self, id: &str, secs: u64) -> Value {
        self.wait_for(id, secs, "terminal", |t| {
            ["completed", "failed", "cancelled"].contains(&t["status"].as_str().unwrap_or(""))
        })
        .await
    }

    /// Waits until nothing more will happen to the task (at most `secs` seconds): it is terminal,
    /// its webhook, if it has one, is `delivered` or `failed`, and the server's work queue holds
    /// no message (none visible, in flight or delayed). Returns the task as then read.
    ///
    /// The task is read before the queue: once it is final no new work about it is queued, and
    /// a message being handled stays in the queue until it is acknowledged.
    pub async fn wait_quiescent(&self, id: &str, secs: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let t = self.get(&format!("/tasks/{id}")).await;
            assert_eq!(t.status, 200, "{}", t.body);
            let status = t.body["status"].as_str().unwrap_or_default();
            let terminal = ["completed", "failed", "cancelled"].contains(&status);
            let callback = &t.body["callback"];
            let callback_final = callback.is_null()
                || ["delivered", "failed"].contains(&callback["state"].as_str().unwrap_or(""));
            let final_state = terminal && callback_final;
            let queue = if !final_state {
                "not checked"
            } else if self.queue_is_empty().await {
                return t.body;
            } else {
                "not empty"
            };
            assert!(
                tokio::time::Instant::now() < deadline,
                "task {id} not quiescent after {secs} s (terminal with its webhook delivered or \
                 failed: {final_state}; work queue: {queue}): {}",
                t.body
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates a second account with `credits` directly in the store; returns its API key.
    pub async fn new_account(&self, credits: u64) -> String {
        let new = tasklane_core::account::Account::create(credits, None);
        self.app().store.create_account(&new.account).await.unwrap();
        new.api_key
    }

    /// Whether the work queue holds no message (visible, in flight or delayed).
    pub async fn queue_is_empty(&self) -> bool {
        match &self.aws {
            Some(settings) => {
                use aws_sdk_sqs::types::QueueAttributeName as A;
                let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
                let attrs = aws_sdk_sqs::Client::new(&config)
                    .get_queue_attributes()
                    .queue_url(&settings.queue_url)
                    .attribute_names(A::ApproximateNumberOfMessages)
                    .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
                    .attribute_names(A::ApproximateNumberOfMessagesDelayed)
                    .send()
                    .await
                    .unwrap()
                    .attributes
                    .unwrap_or_default();
                attrs.values().all(|v| v == "0")
            }
            None => {
                let db = tasklane_local::sqlite::Db::open(&self.dir.join("tasklane.db")).unwrap();
                let queue = tasklane_local::sqlite::SqliteQueue::new(db);
                queue.next_visible_at().await.unwrap().is_none()
            }
        }
    }

    /// Deletes the stored result `key` (as the results bucket's retention rule does on AWS;
    /// from the results folder on the embedded backends).
    pub async fn delete_result(&self, key: &str) {
        match &self.aws {
            Some(aws) => {
                let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
                let s3 = aws_sdk_s3::Client::from_conf(
                    aws_sdk_s3::config::Builder::from(&config)
                        .force_path_style(true)
                        .build(),
                );
                s3.delete_object()
                    .bucket(&aws.bucket)
                    .key(key)
                    .send()
                    .await
                    .expect("deleting a result on the AWS emulator");
            }
            None => std::fs::remove_file(self.dir.join("results").join(key))
                .expect("deleting a result from the results folder"),
        }
    }

    pub fn app(&self) -> &std::sync::Arc<tasklane_core::App> {
        &self.running.as_ref().unwrap().app
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}
