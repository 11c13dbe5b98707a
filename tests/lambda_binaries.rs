//! The compiled Lambda binaries (`submit`, `status`, `cancel`, `sync-wait`, `account`,
//! `processor`, `dead-letter`, `sweeper`, `upstream`, `files`), each run as a real process behind a minimal Lambda Runtime API emulator
//! (`tasklane_testkit::runtime_api`), and fed the events in `events/` as Lambda would: the function asks
//! `GET /2018-06-01/runtime/invocation/next`, gets the event with the invocation headers, and
//! posts its answer to `.../invocation/{id}/response` (or `.../error`). The functions talk to
//! DynamoDB, SQS and S3 in the AWS emulator that `scripts/test.sh` starts (`AWS_ENDPOINT_URL`);
//! each test provisions its own table, queues and bucket and creates the account whose key is the
//! example key every event carries.
//!
//! Where `tests/lambda_events.rs` calls the handlers in-process, this suite checks what only the
//! binaries show: `main.rs` wiring, configuration read from the environment at start, the runtime
//! loop, the wire format Lambda receives, JSON logs, and cold-start time (printed, never asserted).
//!
//! A model served by an upstream runs here through the binaries too: `veo3` on a real Cog
//! server (`tasklane_testkit::cog`), started by the `processor` binary, whose callbacks reach
//! the `upstream` binary through a loopback stand-in for API Gateway ([`Gateway`]). That test
//! prints how long the processor was busy for the generation (never asserted).

mod aws_fixtures;

use std::ops::Deref;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_fixtures::{
    ACCOUNT, CANCEL, CREDITS, DEAD_LETTER, DELIVER_TASK, EXAMPLE_TASK, LIST, PROCESSOR, STATUS,
    SUBMIT, SWEEPER, SYNC_WAIT, World, download, queued_veo3, sqs_records, ulid_task_id,
};
use aws_sdk_sqs::types::MessageSystemAttributeName;
use chrono::Utc;
use serde_json::{Map, Value, json};
use tasklane_core::ports::{MessageSource, WorkMessage};
use tasklane_core::task::{Callback, CallbackState, Task, TaskStatus, UpstreamRun};
use tasklane_testkit::cog::CogServer;
use tasklane_testkit::runtime_api::{Invoked, Reply, RuntimeApi};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

/// Every Lambda function binary, with its function in template.yaml and its memory size there.
const FUNCTIONS: [(&str, &str, u32); 11] = [
    ("submit", "SubmitFunction", 256),
    ("status", "StatusFunction", 256),
    ("cancel", "CancelFunction", 256),
    ("sync-wait", "SyncWaitFunction", 256),
    ("account", "AccountFunction", 256),
    ("processor", "ProcessorFunction", 256),
    ("deliver", "DeliverFunction", 256),
    ("dead-letter", "DeadLetterFunction", 256),
    ("sweeper", "SweeperFunction", 256),
    ("upstream", "UpstreamFunction", 512),
    ("files", "FilesFunction", 256),
];

/// The result-URL signing key of the tests (template.yaml's `ResultUrlSigningKey`).
const RESULT_URL_KEY: &str = "result-url-key-of-the-lambda-binary-tests-0123456789";

/// The API's URL as template.yaml gives it to the processor (`TASKLANE_PUBLIC_URL`, from
/// `Api.ApiEndpoint`), with the fake API id of the events. Nothing calls it: the built-in
/// models run in the processor.
const EXAMPLE_API_URL: &str = "https://a1b2c3d4e5.execute-api.us-east-1.amazonaws.com";

// Generous deadlines: debug binaries on a loaded two-core machine. Nothing asserts a duration.
/// From spawn to the first `next` request.
const START_DEADLINE: Duration = Duration::from_secs(180);
/// From queuing an event to the function's answer.
const INVOKE_DEADLINE: Duration = Duration::from_secs(180);
/// From spawn to the exit of a function that cannot start.
const EXIT_DEADLINE: Duration = Duration::from_secs(120);
/// For a log line to reach the test after the function wrote it.
const LOG_DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// A function process.
// ---------------------------------------------------------------------------------------------

/// The compiled binary of a function.
fn binary(name: &str) -> &'static str {
    match name {
        "submit" => env!("CARGO_BIN_EXE_submit"),
        "status" => env!("CARGO_BIN_EXE_status"),
        "cancel" => env!("CARGO_BIN_EXE_cancel"),
        "sync-wait" => env!("CARGO_BIN_EXE_sync-wait"),
        "account" => env!("CARGO_BIN_EXE_account"),
        "processor" => env!("CARGO_BIN_EXE_processor"),
        "deliver" => env!("CARGO_BIN_EXE_deliver"),
        "dead-letter" => env!("CARGO_BIN_EXE_dead-letter"),
        "sweeper" => env!("CARGO_BIN_EXE_sweeper"),
        "upstream" => env!("CARGO_BIN_EXE_upstream"),
        "files" => env!("CARGO_BIN_EXE_files"),
        other => panic!("no function binary named {other}"),
    }
}

/// A function binary running behind its own Runtime API. Dropping it kills the process, so
/// a failed assertion never leaves one behind.
struct Function {
    binary: &'static str,
    runtime: RuntimeApi,
    child: Child,
    spawned_at: Instant,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// The tasks copying stdout and stderr; they end when the process closes them.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Function {
    fn drop(&mut self) {
        // SIGKILL now; `kill_on_drop` and tokio's reaper collect the process.
        let _ = self.child.start_kill();
    }
}

/// Keeps every line `from` writes, until it closes.
fn capture(
    from: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> (Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let into = lines.clone();
    let reader = tokio::spawn(async move {
        let mut reader = BufReader::new(from).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            into.lock().unwrap().push(line);
        }
    });
    (lines, reader)
}

impl Function {
    /// Starts `binary` as Lambda would: the Lambda variables of its function in template.yaml,
    /// `AWS_LAMBDA_RUNTIME_API` pointing at a fresh emulator, and `vars` (the function's own
    /// configuration). Nothing else from the test's environment but the AWS emulator's
    /// endpoint, region and dummy credentials.
    async fn start(binary: &'static str, vars: &[(&str, String)]) -> Function {
        let (_, function, memory) = FUNCTIONS
            .iter()
            .find(|(b, _, _)| *b == binary)
            .copied()
            .expect("a function of template.yaml");
        let function_name = format!("tasklane-{function}-EXAMPLE1234");
        let runtime = RuntimeApi::start(&function_name).await;
        let mut cmd = runtime.command(crate::binary(binary), memory);
        for name in [
            "AWS_ENDPOINT_URL",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
        ] {
            if let Some(v) = std::env::var_os(name) {
                cmd.env(name, v);
            }
        }
        for (k, v) in vars {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let spawned_at = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", crate::binary(binary)));
        let (stdout, out_reader) = capture(child.stdout.take().expect("piped stdout"));
        let (stderr, err_reader) = capture(child.stderr.take().expect("piped stderr"));
        Function {
            binary,
            runtime,
            child,
            spawned_at,
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
        }
    }

    /// What the function wrote, for failure messages.
    fn output(&self) -> String {
        let tail = |lines: &Arc<Mutex<Vec<String>>>| {
            let lines = lines.lock().unwrap();
            let from = lines.len().saturating_sub(40);
            lines[from..].join("\n")
        };
        format!(
            "--- `{}` stdout (last 40 lines) ---\n{}\n--- stderr ---\n{}\n--- init errors: {:?}; unexpected requests: {:?}",
            self.binary,
            tail(&self.stdout),
            tail(&self.stderr),
            self.runtime.init_errors(),
            self.runtime.unexpected(),
        )
    }

    /// Panics with the function's output if it has exited.
    fn assert_running(&mut self, during: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "`{}` exited ({status}) {during}\n{}",
                self.binary,
                self.output()
            );
        }
    }

    /// Waits for the function to ask for its first invocation; returns the cold start (from
    /// spawn to that request).
    async fn cold_start(&mut self) -> Duration {
        let deadline = Instant::now() + START_DEADLINE;
        while self.runtime.next_requests() == 0 {
            self.assert_running("before asking for an invocation");
            assert!(
                Instant::now() < deadline,
                "`{}` did not ask for an invocation within {START_DEADLINE:?}\n{}",
                self.binary,
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let first = self
            .runtime
            .first_next_at()
            .expect("recorded with the count");
        first.duration_since(self.spawned_at)
    }

    /// Starts `binary` and waits for it to ask for work, printing its cold start.
    async fn ready(binary: &'static str, vars: &[(&str, String)]) -> Function {
        let mut f = Function::start(binary, vars).await;
        let cold = f.cold_start().await;
        println!(
            "cold start of `{binary}`: {} ms (spawn to first `next`)",
            cold.as_millis()
        );
        f
    }

    /// Hands `event` to the function and waits for its answer.
    async fn invoke(&mut self, event: &str) -> Invoked {
        let (request_id, trace_id, mut rx) = self.runtime.enqueue(event);
        let started = Instant::now();
        let deadline = started + INVOKE_DEADLINE;
        loop {
            tokio::select! {
                reply = &mut rx => {
                    println!(
                        "`{}` answered an invocation in {} ms",
                        self.binary,
                        started.elapsed().as_millis()
                    );
                    return Invoked {
                        request_id,
                        trace_id,
                        reply: reply.expect("the emulator keeps every invocation's sender"),
                    };
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    self.assert_running("while an invocation was pending");
                    assert!(
                        Instant::now() < deadline,
                        "`{}` did not answer invocation {request_id} within {INVOKE_DEADLINE:?}\n{}",
                        self.binary,
                        self.output()
                    );
                }
            }
        }
    }

    /// Waits for the process to end (it must, by itself) and for its last output lines.
    async fn exit_status(&mut self) -> ExitStatus {
        let status = match tokio::time::timeout(EXIT_DEADLINE, self.child.wait()).await {
            Ok(status) => status.expect("waiting for the process"),
            Err(_) => panic!(
                "`{}` was expected to exit but still runs after {EXIT_DEADLINE:?}\n{}",
                self.binary,
                self.output()
            ),
        };
        for reader in std::mem::take(&mut self.readers) {
            tokio::time::timeout(LOG_DEADLINE, reader)
                .await
                .expect("the output closes with the process")
                .expect("the output reader");
        }
        status
    }

    /// Every stdout line as JSON; panics on a line that is not a JSON object with a `level`
    /// (what Lambda's JSON log format and its application log level filter read).
    fn json_logs(&self) -> Vec<Value> {
        self.stdout
            .lock()
            .unwrap()
            .iter()
            .map(|line| {
                let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                    panic!("`{}` wrote a non-JSON log line ({e}): {line}", self.binary)
                });
                assert!(
                    v["level"].is_string(),
                    "`{}` wrote a log line without a level: {line}",
                    self.binary
                );
                v
            })
            .collect()
    }

    /// Waits for a JSON log line whose message is `message`, inside invocation `request_id`.
    async fn log_of(&self, message: &str, request_id: &str) -> Value {
        let deadline = Instant::now() + LOG_DEADLINE;
        loop {
            let found = self.json_logs().into_iter().find(|v| {
                v["fields"]["message"] == message
                    && v["spans"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|s| s["requestId"] == request_id))
            });
            if let Some(v) = found {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no JSON log line {message:?} for invocation {request_id}\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the CloudWatch embedded-metric-format line (functions/core/src/metrics.rs)
    /// that carries metric `metric` for task `task_id` on stdout, and checks its directive
    /// names that metric in the `tasklane` namespace.
    async fn metric_line(&self, metric: &str, task_id: &str) -> Value {
        let deadline = Instant::now() + LOG_DEADLINE;
        loop {
            let found = self
                .json_logs()
                .into_iter()
                .find(|v| v["_aws"].is_object() && v["task_id"] == task_id && !v[metric].is_null());
            if let Some(v) = found {
                let directive = &v["_aws"]["CloudWatchMetrics"][0];
                assert_eq!(directive["Namespace"], "tasklane", "{v}");
                assert!(
                    directive["Metrics"]
                        .as_array()
                        .is_some_and(|m| m.iter().any(|m| m["Name"] == metric)),
                    "{v}"
                );
                assert!(v["_aws"]["Timestamp"].is_i64(), "{v}");
                let dims = directive["Dimensions"].to_string();
                assert!(
                    !dims.contains("task_id"),
                    "a task id is never a dimension: {v}"
                );
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no {metric} metric line for {task_id} on stdout\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Panics if the function made requests the Runtime API does not have, or reported an
    /// init error.
    fn assert_clean_runtime_use(&self) {
        assert_eq!(
            self.runtime.unexpected(),
            Vec::<String>::new(),
            "{}",
            self.output()
        );
        assert!(self.runtime.init_errors().is_empty(), "{}", self.output());
    }
}

// ---------------------------------------------------------------------------------------------
// The resources on the AWS emulator.
// ---------------------------------------------------------------------------------------------

/// One provisioned stack: the world on the emulator the functions are configured for.
struct Stack {
    world: World,
}

impl Deref for Stack {
    type Target = World;

    fn deref(&self) -> &World {
        &self.world
    }
}

impl Stack {
    async fn new(tag: &str) -> Stack {
        let world = World::new(
            "lb",
            tag,
            "these tests run the Lambda binaries against an AWS emulator, never AWS itself: \
             run scripts/test.sh (it starts moto and sets AWS_ENDPOINT_URL), or start \
             moto_server and set AWS_ENDPOINT_URL, AWS_REGION and dummy credentials",
        )
        .await;
        Stack { world }
    }

    /// The configuration template.yaml gives every function (Globals, with its default
    /// parameters: no model catalog, no provider credentials).
    fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("TASKLANE_TABLE", self.settings.table.clone()),
            ("TASKLANE_QUEUE_URL", self.settings.queue_url.clone()),
            (
                "TASKLANE_DELIVERY_QUEUE_URL",
                self.settings.delivery_queue_url.clone().unwrap_or_default(),
            ),
            ("TASKLANE_BUCKET", self.settings.bucket.clone()),
            ("TASKLANE_RESULT_URL_TTL", "3600".into()),
            ("TASKLANE_SYNC_WAIT_CAP", "25".into()),
            ("TASKLANE_CALLBACK_ALLOW_PRIVATE", "false".into()),
            ("TASKLANE_SWEEP_AFTER", "120".into()),
            ("TASKLANE_MAX_OPEN_TASKS", "1000".into()),
            ("TASKLANE_MODELS", String::new()),
            ("REPLICATE_API_TOKEN", String::new()),
            ("REPLICATE_WEBHOOK_SECRET", String::new()),
            ("FAL_KEY", String::new()),
            ("GEMINI_API_KEY", String::new()),
            ("RUST_LOG", "info".into()),
        ]
    }

    /// The configuration template.yaml gives the function of `binary`: [`Stack::vars`], and
    /// for the processor the API's URL upstreams call back on; for the files function the
    /// key result URLs are signed with ([`RESULT_URL_KEY`]).
    fn vars_for(&self, binary: &str) -> Vec<(&'static str, String)> {
        let mut vars = self.vars();
        if binary == "processor" {
            vars.push(("TASKLANE_PUBLIC_URL", EXAMPLE_API_URL.into()));
        }
        if binary == "files" {
            vars.push(("TASKLANE_RESULT_URL_SIGNING_KEY", RESULT_URL_KEY.into()));
        }
        vars
    }

    /// An object of the results bucket.
    async fn object(&self, key: &str) -> Vec<u8> {
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&self.config)
                .force_path_style(true)
                .build(),
        );
        let got = s3
            .get_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("s3://{}/{key}: {e:?}", self.settings.bucket));
        got.body
            .collect()
            .await
            .expect("the object's bytes")
            .into_bytes()
            .to_vec()
    }
}

/// One SQS event the event source mapping handed to the processor.
#[derive(Debug)]
struct Batch {
    /// The messages' bodies.
    bodies: Vec<String>,
    /// The function's answer.
    reply: Value,
    /// From queuing the event to the function's answer.
    took: Duration,
}

impl Batch {
    /// The batch's work messages, parsed.
    fn messages(&self) -> Vec<WorkMessage> {
        self.bodies
            .iter()
            .filter_map(|b| serde_json::from_str(b).ok())
            .collect()
    }
}

/// What SQS's event source mapping does for the processor function: receives from the work
/// queue, invokes the function with the messages as an SQS event, and deletes those not
/// reported in `batchItemFailures`. Runs until dropped; records each batch, the reply and how
/// long the invocation took.
async fn event_source_mapping(stack: &Stack, processor: &mut Function, fed: &Mutex<Vec<Batch>>) {
    let sqs = aws_sdk_sqs::Client::new(&stack.config);
    let url = &stack.settings.queue_url;
    loop {
        let got = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .expect("receiving from the work queue");
        let messages = got.messages();
        if messages.is_empty() {
            continue;
        }
        let records = sqs_records(
            messages,
            "arn:aws:sqs:us-east-1:123456789012:tasklane-WorkQueue-EXAMPLE1234",
        );
        let event = json!({ "Records": records }).to_string();
        let queued = Instant::now();
        let reply = processor.invoke(&event).await.response().clone();
        let took = queued.elapsed();
        let failed: Vec<&str> = reply["batchItemFailures"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|f| f["itemIdentifier"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        for m in messages {
            if !failed.contains(&m.message_id().unwrap_or_default())
                && let Some(handle) = m.receipt_handle()
            {
                sqs.delete_message()
                    .queue_url(url)
                    .receipt_handle(handle)
                    .send()
                    .await
                    .expect("deleting a handled message");
            }
        }
        let bodies = messages
            .iter()
            .map(|m| m.body().unwrap_or_default().to_string())
            .collect();
        fed.lock().unwrap().push(Batch {
            bodies,
            reply,
            took,
        });
    }
}

// ---------------------------------------------------------------------------------------------
// An upstream model: a Cog server, and API Gateway's part in its callbacks.
// ---------------------------------------------------------------------------------------------

/// API Gateway's limit on a request body (HTTP APIs: 10 MB); it answers 413 above it.
const GATEWAY_MAX_BODY: usize = 10 * 1024 * 1024;

/// A model catalog (TOML, as `TASKLANE_MODELS` reads it) with one model, `veo3`, served by the
/// Cog server at `endpoint`, written into `dir`. Cog passes every input to the predictor, which
/// refuses one it does not declare: the predictors in `tests/cog/` take `prompt`, `duration`
/// and `fps`.
fn cog_catalog(dir: &std::path::Path, endpoint: &str) -> std::path::PathBuf {
    let path = dir.join("models.toml");
    let text = format!(
        r#"
[models.veo3]
provider = "cog"
description = "Video from a prompt, on our Cog server"
endpoint = "{endpoint}"
prompt = {{ required = true, max_length = 500 }}
duration = {{ min = 1, max = 8, default = 2 }}
price = {{ per_second = 10 }}
timeout = 120
trusted_hosts = ["127.0.0.1"]

[models.veo3.params.fps]
type = "integer"
min = 1
max = 30
description = "frames per second"
"#
    );
    std::fs::write(&path, text).expect("writing the model catalog");
    path
}

/// An API Gateway (HTTP API, payload format 2.0, `$default` stage) event for a request to the
/// template's route `POST /v1/upstream/{provider}/{task_id}` (the upstream function's), as
/// API Gateway builds it: `rawPath`, `rawQueryString`, lowercase headers (repeated ones joined
/// with commas), the path and query parameters, and a text body. `target` is the path and query.
fn upstream_event(target: &str, headers: &[(String, String)], body: &str) -> String {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut hs = serde_json::Map::new();
    for (k, v) in headers {
        let k = k.to_ascii_lowercase();
        match hs.get_mut(&k) {
            Some(Value::String(prev)) => {
                prev.push(',');
                prev.push_str(v);
            }
            _ => {
                hs.insert(k, json!(v));
            }
        }
    }
    let parsed = reqwest::Url::parse(&format!(
        "https://a1b2c3d4e5.execute-api.us-east-1.amazonaws.com{target}"
    ))
    .expect("a request target");
    let mut query_params = serde_json::Map::new();
    for (k, v) in parsed.query_pairs() {
        query_params.insert(k.into_owned(), json!(v.into_owned()));
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let now = Utc::now();
    let route = "POST /v1/upstream/{provider}/{task_id}";
    let user_agent = hs.get("user-agent").cloned().unwrap_or(json!(""));
    json!({
        "version": "2.0",
        "routeKey": route,
        "rawPath": path,
        "rawQueryString": query,
        "headers": hs,
        "queryStringParameters": query_params,
        "pathParameters": {
            "provider": segments.get(2).copied().unwrap_or_default(),
            "task_id": segments.get(3).copied().unwrap_or_default(),
        },
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "a1b2c3d4e5",
            "domainName": "a1b2c3d4e5.execute-api.us-east-1.amazonaws.com",
            "domainPrefix": "a1b2c3d4e5",
            "http": {
                "method": "POST",
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "127.0.0.1",
                "userAgent": user_agent,
            },
            "requestId": format!("{}", ulid::Ulid::new()),
            "routeKey": route,
            "stage": "$default",
            "time": now.format("%d/%b/%Y:%H:%M:%S +0000").to_string(),
            "timeEpoch": now.timestamp_millis(),
        },
        "body": body,
        "isBase64Encoded": false,
    })
    .to_string()
}

/// One request the [`Gateway`] passed to the upstream function.
#[derive(Debug, Clone)]
struct Forwarded {
    /// The prediction's `status` in Cog's webhook body.
    status: String,
    /// Cog's `metrics.predict_time` (seconds), on the completed webhook.
    predict_time: Option<f64>,
    /// The function's answer.
    answer: u64,
    /// From queuing the event to the function's answer.
    took: Duration,
}

/// A loopback stand-in for API Gateway in front of the upstream function: each HTTP request to
/// `POST /v1/upstream/{provider}/{task_id}` becomes an HTTP API event, is invoked through the
/// function's Runtime API, and is answered with the function's response (status, headers,
/// body). Bodies over 10 MB get API Gateway's 413, other routes its 404; both are recorded as
/// unexpected, as Cog only calls the callback route. Serves until dropped.
struct Gateway {
    /// Its base URL: the deployment's public URL (`TASKLANE_PUBLIC_URL`).
    url: String,
    forwarded: Arc<Mutex<Vec<Forwarded>>>,
    unexpected: Arc<Mutex<Vec<String>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Gateway {
    async fn start(function: Arc<tokio::sync::Mutex<Function>>) -> Gateway {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the gateway");
        let url = format!("http://{}", listener.local_addr().expect("its address"));
        let forwarded = Arc::new(Mutex::new(Vec::new()));
        let unexpected = Arc::new(Mutex::new(Vec::new()));
        let (f, u) = (forwarded.clone(), unexpected.clone());
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(gateway_connection(
                    stream,
                    function.clone(),
                    f.clone(),
                    u.clone(),
                ));
            }
        });
        Gateway {
            url,
            forwarded,
            unexpected,
            server,
        }
    }

    fn forwarded(&self) -> Vec<Forwarded> {
        self.forwarded.lock().unwrap().clone()
    }
}

/// Reads one HTTP/1.1 request: method, target, headers, body (`Content-Length` or chunked).
async fn read_http_request(
    r: &mut BufReader<tokio::net::TcpStream>,
) -> std::io::Result<(String, String, Vec<(String, String)>, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or_default().to_string();
    let target = words.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).await?;
            let size = size.trim().split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size, 16).map_err(std::io::Error::other)?;
            if size == 0 {
                let mut trailer = String::new();
                while r.read_line(&mut trailer).await? > 2 {
                    trailer.clear();
                }
                break;
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).await?;
            chunk.truncate(size);
            body.extend_from_slice(&chunk);
        }
    } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body = vec![0; len];
        r.read_exact(&mut body).await?;
    }
    // API Gateway passes on what the function reads; the body's framing is its own.
    headers.retain(|(k, _)| k != "transfer-encoding" && k != "connection");
    Ok((method, target, headers, body))
}

/// Serves one connection of the [`Gateway`]: one request, then it closes.
async fn gateway_connection(
    stream: tokio::net::TcpStream,
    function: Arc<tokio::sync::Mutex<Function>>,
    forwarded: Arc<Mutex<Vec<Forwarded>>>,
    unexpected: Arc<Mutex<Vec<String>>>,
) {
    use tokio::io::AsyncWriteExt;
    let mut stream = BufReader::new(stream);
    let Ok((method, target, headers, body)) = read_http_request(&mut stream).await else {
        return;
    };
    let path = target.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let on_route = method == "POST"
        && segments.len() == 4
        && segments[..2] == ["v1", "upstream"]
        && segments[2..].iter().all(|s| !s.is_empty());
    let text = String::from_utf8(body.clone());
    let (status, headers_out, body_out) = if !on_route {
        unexpected
            .lock()
            .unwrap()
            .push(format!("{method} {path} (no such route)"));
        (404, Map::new(), r#"{"message":"Not Found"}"#.to_string())
    } else if body.len() > GATEWAY_MAX_BODY {
        unexpected
            .lock()
            .unwrap()
            .push(format!("{method} {path} with {} bytes", body.len()));
        (
            413,
            Map::new(),
            r#"{"message":"Request Entity Too Large"}"#.to_string(),
        )
    } else if let Ok(text) = text {
        let event = upstream_event(&target, &headers, &text);
        let queued = Instant::now();
        let invoked = function.lock().await.invoke(&event).await;
        let took = queued.elapsed();
        let Reply::Response(wire) = &invoked.reply else {
            panic!(
                "the upstream function failed an invocation: {:?}",
                invoked.reply
            );
        };
        let answer = wire["statusCode"].as_u64().unwrap_or_default();
        let cog: Value = serde_json::from_str(&text).unwrap_or_default();
        forwarded.lock().unwrap().push(Forwarded {
            status: cog["status"].as_str().unwrap_or_default().to_string(),
            predict_time: cog["metrics"]["predict_time"].as_f64(),
            answer,
            took,
        });
        (
            answer,
            wire["headers"].as_object().cloned().unwrap_or_default(),
            wire["body"].as_str().unwrap_or_default().to_string(),
        )
    } else {
        // API Gateway would base64 it; Cog sends JSON only.
        unexpected
            .lock()
            .unwrap()
            .push(format!("{method} {path} with a body that is not UTF-8"));
        (400, Map::new(), r#"{"message":"Bad Request"}"#.to_string())
    };
    let reason = http::StatusCode::from_u16(status as u16)
        .ok()
        .and_then(|c| c.canonical_reason())
        .unwrap_or("Unknown");
    let mut out = format!("HTTP/1.1 {status} {reason}\r\n");
    for (k, v) in &headers_out {
        if let Some(v) = v.as_str()
            && k != "content-length"
        {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    if !headers_out.contains_key("content-type") {
        out.push_str("content-type: application/json\r\n");
    }
    out.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n{body_out}",
        body_out.len()
    ));
    let stream = stream.get_mut();
    let _ = stream.write_all(out.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// How many times the render predictor started rendering `prompt`.
fn renders(cog: &CogServer, prompt: &str) -> usize {
    cog.log().matches(&format!("frames for '{prompt}'")).count()
}

// ---------------------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_function_binary_starts_and_asks_the_runtime_api_for_an_invocation() {
    let stack = Stack::new("start").await;
    let mut table = Vec::new();
    // One at a time, so that the figures do not include each other's start.
    for (binary, _, _) in FUNCTIONS {
        let mut f = Function::start(binary, &stack.vars_for(binary)).await;
        let cold = f.cold_start().await;
        f.assert_running("after asking for an invocation");
        f.assert_clean_runtime_use();
        f.json_logs();
        table.push((binary, cold));
    }
    println!("cold starts (debug build; spawn to the first GET .../invocation/next):");
    for (binary, cold) in table {
        println!("  {binary:<10} {:>6} ms", cold.as_millis());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_binary_answers_submit_json_with_202_and_the_queued_veo3_task_costing_fifty_credits()
{
    let stack = Stack::new("submit").await;
    let mut submit = Function::ready("submit", &stack.vars()).await;

    let invoked = submit.invoke(SUBMIT).await;
    let a = invoked.gateway();
    assert_eq!(a.status, 202, "body: {}", a.body);
    assert_eq!(a.header("content-type"), Some("application/json"));
    let id = a.body["task_id"].as_str().expect("a task id").to_string();
    assert!(tasklane_core::is_task_id(&id), "{id}");
    assert_eq!(
        a.header("location"),
        Some(format!("/v1/tasks/{id}").as_str())
    );
    assert!(
        a.header("retry-after")
            .is_some_and(|s| s.parse::<u64>().is_ok()),
        "{:?}",
        a.headers
    );
    assert_eq!(a.body["model"], "veo3");
    assert_eq!(a.body["action"], "generate");
    assert_eq!(a.body["status"], "queued");
    assert_eq!(a.body["progress"], 0);
    assert_eq!(a.body["cost"], json!({"credits": 50, "refunded": false}));
    assert_eq!(
        a.body["input"],
        json!({"prompt": "A cat walking on the beach", "duration": 5, "params": {}})
    );

    assert_eq!(stack.task(&id).await.status, TaskStatus::Queued);
    assert_eq!(stack.credits().await, CREDITS - 50);
    let work = stack
        .backends
        .queue
        .receive(10, Duration::from_secs(60))
        .await
        .expect("receiving from the work queue");
    let messages: Vec<_> = work.iter().map(|d| d.message.clone()).collect();
    assert_eq!(
        messages,
        [Some(WorkMessage::Run {
            task_id: id.clone()
        })]
    );

    // Logs are JSON lines, inside the invocation's span (its request id and trace id).
    let log = submit.log_of("task submitted", &invoked.request_id).await;
    println!("a JSON log line of `submit`: {log}");
    assert_eq!(log["level"], "INFO");
    assert_eq!(log["fields"]["task_id"], id.as_str());
    assert_eq!(log["fields"]["credits"], 50);
    let span = log["spans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["requestId"] == invoked.request_id.as_str())
        .unwrap();
    assert_eq!(span["name"], "Lambda runtime invoke");
    assert_eq!(span["xrayTraceId"], invoked.trace_id.as_str());
    // The request's span carries the task id once the submit has made it.
    assert!(
        log["spans"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "request" && s["task_id"] == id.as_str()),
        "{log}"
    );

    // The metric: one EMF line on stdout, by model, the task id a property.
    let metric = submit.metric_line("Submitted", &id).await;
    println!("the EMF line of the submit: {metric}");
    assert_eq!(metric["Submitted"], json!(1.0));
    assert_eq!(metric["Model"], "veo3");
    assert_eq!(
        metric["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
        json!([["Model"], []])
    );
    submit.assert_clean_runtime_use();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_binary_answers_status_json_then_list_json_in_the_same_process() {
    let stack = Stack::new("status").await;
    stack
        .insert(&queued_veo3(EXAMPLE_TASK, &stack.account.id))
        .await;
    let completed = ulid_task_id();
    stack.insert(&stack.completed_echo(&completed).await).await;
    let mut status = Function::ready("status", &stack.vars()).await;

    let first = status.invoke(STATUS).await;
    let a = first.gateway();
    assert_eq!(a.status, 200, "body: {}", a.body);
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(a.header("retry-after"), Some("1"), "not terminal yet");
    assert_eq!(a.body["task_id"], EXAMPLE_TASK);
    assert_eq!(a.body["status"], "queued");
    assert_eq!(a.body["model"], "veo3");
    assert_eq!(a.body["cost"], json!({"credits": 50, "refunded": false}));

    // The runtime loop: the same process takes a second invocation.
    let second = status.invoke(LIST).await;
    assert_ne!(first.request_id, second.request_id);
    let a = second.gateway();
    assert_eq!(a.status, 200, "body: {}", a.body);
    assert_eq!(a.header("content-type"), Some("application/json"));
    let data = a.body["data"].as_array().expect("a data array");
    let ids: Vec<&str> = data.iter().filter_map(|t| t["task_id"].as_str()).collect();
    assert_eq!(ids, [completed.as_str()], "only the completed task");
    assert_eq!(data[0]["status"], "completed");
    let out = &data[0]["result"]["outputs"][0];
    assert_eq!(out["content_type"], "text/plain; charset=utf-8");
    assert_eq!(
        download(out["url"].as_str().expect("a URL")).await,
        b"hello"
    );
    assert_eq!(a.body["next_cursor"], Value::Null);

    // …and, having answered, asks for a third.
    let deadline = Instant::now() + INVOKE_DEADLINE;
    while status.runtime.next_requests() < 3 {
        status.assert_running("after two invocations");
        assert!(
            Instant::now() < deadline,
            "no third `next` request\n{}",
            status.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    status.json_logs();
    status.assert_clean_runtime_use();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_binary_cancels_the_example_task_and_refunds_its_fifty_credits_once() {
    let stack = Stack::new("cancel").await;
    stack
        .insert(&queued_veo3(EXAMPLE_TASK, &stack.account.id))
        .await;
    assert_eq!(stack.credits().await, CREDITS - 50);
    let mut cancel = Function::ready("cancel", &stack.vars()).await;

    let invoked = cancel.invoke(CANCEL).await;
    let a = invoked.gateway();
    assert_eq!(a.status, 200, "body: {}", a.body);
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(a.header("retry-after"), None, "cancelled is terminal");
    assert_eq!(a.body["task_id"], EXAMPLE_TASK);
    assert_eq!(a.body["status"], "cancelled");
    assert_eq!(a.body["cost"], json!({"credits": 50, "refunded": true}));
    assert!(a.body["completed_at"].is_string());
    assert_eq!(stack.task(EXAMPLE_TASK).await.status, TaskStatus::Cancelled);
    assert_eq!(stack.credits().await, CREDITS);
    let log = cancel.log_of("task cancelled", &invoked.request_id).await;
    assert_eq!(log["fields"]["task_id"], EXAMPLE_TASK);

    let again = cancel.invoke(CANCEL).await.gateway();
    assert_eq!(again.status, 200, "body: {}", again.body);
    assert_eq!(again.body["status"], "cancelled");
    assert_eq!(stack.credits().await, CREDITS, "no second refund");
    cancel.assert_clean_runtime_use();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_binary_fails_the_dead_lettered_example_task_and_refunds_its_fifty_credits() {
    let stack = Stack::new("dlq").await;
    stack
        .insert(&queued_veo3(EXAMPLE_TASK, &stack.account.id))
        .await;
    assert_eq!(stack.credits().await, CREDITS - 50);
    let mut dlq = Function::ready("dead-letter", &stack.vars()).await;

    let invoked = dlq.invoke(DEAD_LETTER).await;
    assert_eq!(invoked.response(), &json!({"batchItemFailures": []}));
    let task = stack.task(EXAMPLE_TASK).await;
    assert_eq!(task.status, TaskStatus::Failed);
    assert_eq!(task.error.unwrap().code, "attempts_exhausted");
    assert!(task.cost.refunded);
    assert_eq!(stack.credits().await, CREDITS);

    // The same dead letter again (SQS delivers at least once): no second refund.
    let again = dlq.invoke(DEAD_LETTER).await;
    assert_eq!(again.response(), &json!({"batchItemFailures": []}));
    assert_eq!(stack.credits().await, CREDITS, "refunded once");
    dlq.assert_clean_runtime_use();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeper_binary_re_enqueues_the_run_of_a_task_stored_without_one() {
    let stack = Stack::new("sweep").await;
    // Stored ten minutes ago, its Run message lost (the template sweeps after 120 s).
    let lost = Task {
        waiting_since: Some(Utc::now() - chrono::Duration::minutes(10)),
        ..queued_veo3(EXAMPLE_TASK, &stack.account.id)
    };
    stack.insert(&lost).await;
    let mut sweeper = Function::ready("sweeper", &stack.vars()).await;

    let invoked = sweeper.invoke(SWEEPER).await;
    let report = invoked.response();
    assert_eq!(report["runs"], 1, "{report}");
    let work = stack
        .backends
        .queue
        .receive(10, Duration::from_secs(60))
        .await
        .expect("receiving from the work queue");
    let messages: Vec<_> = work.iter().map(|d| d.message.clone()).collect();
    assert_eq!(
        messages,
        [Some(WorkMessage::Run {
            task_id: EXAMPLE_TASK.into()
        })]
    );
    // Re-armed: the next sweep does not send it again before SweepAfterSeconds.
    let next = sweeper.invoke(SWEEPER).await;
    assert_eq!(next.response()["runs"], 0, "{}", next.response());
    sweeper.assert_clean_runtime_use();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_binary_answers_account_json_with_the_credits_and_the_webhook_secret() {
    let stack = Stack::new("account").await;
    let mut account = Function::ready("account", &stack.vars()).await;

    let a = account.invoke(ACCOUNT).await.gateway();
    assert_eq!(a.status, 200, "body: {}", a.body);
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(
        a.body,
        json!({
            "account_id": stack.account.id,
            "credits": CREDITS,
            "open_tasks": 0,
            "max_open_tasks": 1000,
            "webhook_secret": stack.account.webhook_secret,
        })
    );
    account.json_logs();
    account.assert_clean_runtime_use();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_wait_binary_answers_completed_while_the_processor_binary_runs_the_work_it_queued() {
    let stack = Stack::new("sync").await;
    let mut processor = Function::ready("processor", &stack.vars_for("processor")).await;
    let mut sync = Function::ready("sync-wait", &stack.vars()).await;

    let fed = Mutex::new(Vec::new());
    let invoked = {
        let mapping = event_source_mapping(&stack, &mut processor, &fed);
        tokio::pin!(mapping);
        tokio::select! {
            invoked = sync.invoke(SYNC_WAIT) => invoked,
            () = &mut mapping => unreachable!("the event source mapping runs until dropped"),
        }
    };

    let a = invoked.gateway();
    assert_eq!(a.status, 200, "body: {}", a.body);
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(a.header("location"), None);
    assert_eq!(a.header("retry-after"), None);
    let b = &a.body;
    assert_eq!(b["status"], "completed");
    assert_eq!(b["progress"], 100);
    assert_eq!(b["model"], "echo");
    assert_eq!(b["input"]["prompt"], "hello");
    assert_eq!(b["cost"], json!({"credits": 1, "refunded": false}));
    assert!(b.get("poll_url").is_none());
    let out = &b["result"]["outputs"][0];
    assert_eq!(out["content_type"], "text/plain; charset=utf-8");
    assert_eq!(out["size_bytes"], 5);
    assert_eq!(download(out["url"].as_str().unwrap()).await, b"hello");
    assert_eq!(stack.credits().await, CREDITS - 1);

    let id = b["task_id"].as_str().expect("a task id");
    let run = json!({"type": "run", "task_id": id});
    let fed = fed.into_inner().unwrap();
    assert!(
        fed.iter().any(|batch| batch
            .bodies
            .iter()
            .any(|m| serde_json::from_str::<Value>(m).ok() == Some(run.clone()))),
        "the processor binary ran the task's run message: {fed:?}"
    );
    for batch in &fed {
        assert_eq!(
            batch.reply,
            json!({"batchItemFailures": []}),
            "batch {:?}",
            batch.bodies
        );
    }
    sync.assert_clean_runtime_use();
    processor.assert_clean_runtime_use();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_binary_runs_processor_json_and_stores_the_task_output_in_s3() {
    let stack = Stack::new("proc").await;
    stack
        .insert(&queued_veo3(EXAMPLE_TASK, &stack.account.id))
        .await;
    // The deliver message is a duplicate: the webhook was delivered on attempt 0 already.
    let delivered = Task {
        callback: Some(Callback {
            url: "https://hooks.example.com/tasklane".into(),
            state: CallbackState::Delivered,
            attempts: 1,
            last_status_code: Some(200),
            deliveries: vec![tasklane_core::task::DeliveryAttempt {
                at: Utc::now(),
                status_code: Some(200),
                error: None,
            }],
            next_attempt_at: None,
        }),
        ..stack.completed_echo(DELIVER_TASK).await
    };
    stack.insert(&delivered).await;
    let mut processor = Function::ready("processor", &stack.vars_for("processor")).await;

    let invoked = processor.invoke(PROCESSOR).await;
    assert_eq!(
        invoked.response(),
        &json!({"batchItemFailures": []}),
        "the partial batch response Lambda expects"
    );

    let task = stack.task(EXAMPLE_TASK).await;
    assert_eq!(task.status, TaskStatus::Completed);
    assert_eq!(task.progress, 100);
    assert_eq!(task.outputs.len(), 1);
    let output = &task.outputs[0];
    assert_eq!(output.content_type, "image/gif");
    let gif = stack.object(&output.key).await;
    assert!(gif.starts_with(b"GIF8"), "a GIF in the results bucket");
    assert_eq!(output.size_bytes, gif.len() as u64);
    assert_eq!(
        stack.task(DELIVER_TASK).await,
        delivered,
        "a stale deliver changes nothing"
    );
    assert_eq!(stack.credits().await, CREDITS - 50 - 1, "no refund");

    let log = processor.log_of("task finished", &invoked.request_id).await;
    assert_eq!(log["level"], "INFO");
    assert_eq!(log["fields"]["task_id"], EXAMPLE_TASK);
    assert_eq!(log["fields"]["status"], "completed");

    // Its metrics on stdout: the wait before the start, then the completion.
    let queued = processor.metric_line("QueueAge", EXAMPLE_TASK).await;
    assert_eq!(queued["Model"], "veo3");
    assert!(
        queued["QueueAge"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{queued}"
    );
    let completed = processor.metric_line("Completed", EXAMPLE_TASK).await;
    println!("the EMF line of the completion: {completed}");
    assert_eq!(completed["Completed"], json!(1.0));
    assert_eq!(completed["Model"], "veo3");
    assert!(completed["RunDuration"].is_f64(), "{completed}");
    assert!(
        processor.json_logs().iter().all(|v| v["Failed"].is_null()),
        "no failure counted"
    );
    processor.assert_clean_runtime_use();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_a_function_cannot_read_goes_to_the_error_endpoint_and_the_next_one_is_served() {
    let stack = Stack::new("invalid").await;
    let not_an_event = json!("not an event this function takes").to_string();
    let cases = [
        ("account", ACCOUNT.to_string()),
        ("processor", json!({"Records": []}).to_string()),
    ];
    for (binary, good) in cases {
        let mut f = Function::ready(binary, &stack.vars_for(binary)).await;
        let bad = f.invoke(&not_an_event).await;
        let Reply::Error {
            error_type,
            diagnostic,
        } = &bad.reply
        else {
            panic!("`{binary}` answered an unreadable event: {:?}", bad.reply);
        };
        assert_eq!(error_type.as_deref(), Some("unhandled"), "`{binary}`");
        assert!(
            diagnostic["errorType"].is_string(),
            "`{binary}`: {diagnostic}"
        );
        assert!(
            diagnostic["errorMessage"]
                .as_str()
                .is_some_and(|m| m.contains("failed to deserialize")),
            "`{binary}`: {diagnostic}"
        );

        let ok = f.invoke(&good).await;
        match binary {
            "account" => assert_eq!(ok.gateway().status, 200),
            _ => assert_eq!(ok.response(), &json!({"batchItemFailures": []})),
        }
        f.json_logs();
        f.assert_clean_runtime_use();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_function_binary_started_without_tasklane_queue_url_fails_naming_the_variable() {
    let stack = Stack::new("noqueue").await;
    for (binary, _, _) in FUNCTIONS {
        // The files function uses no queue: it needs its signing key instead.
        let missing = match binary {
            "files" => "TASKLANE_RESULT_URL_SIGNING_KEY",
            _ => "TASKLANE_QUEUE_URL",
        };
        let vars: Vec<_> = stack
            .vars_for(binary)
            .into_iter()
            .filter(|(k, _)| *k != missing)
            .collect();
        let mut f = Function::start(binary, &vars).await;
        let status = f.exit_status().await;
        let init_errors = f.runtime.init_errors();
        println!(
            "`{binary}` without {missing}: {status}; init errors reported: {}; stderr: {:?}",
            init_errors.len(),
            f.stderr.lock().unwrap().join(" | ")
        );
        assert!(
            !status.success() || !init_errors.is_empty(),
            "`{binary}` neither failed nor reported an init error\n{}",
            f.output()
        );
        assert_eq!(
            f.runtime.next_requests(),
            0,
            "`{binary}` asked for work without its configuration\n{}",
            f.output()
        );
        let init_reports: Vec<String> = init_errors
            .iter()
            .map(|e| format!("{:?}: {}", e.error_type, e.diagnostic))
            .collect();
        let reported = format!(
            "{}\n{}\n{}",
            init_reports.join("\n"),
            f.stdout.lock().unwrap().join("\n"),
            f.stderr.lock().unwrap().join("\n")
        );
        assert!(
            reported.contains(missing),
            "`{binary}`: no message names {missing}\n{}",
            f.output()
        );
        // The JSON log line says it too, at ERROR, for Lambda's log filter.
        let logs = f.json_logs();
        let error = logs
            .iter()
            .find(|v| v["level"] == "ERROR")
            .unwrap_or_else(|| panic!("`{binary}`: no ERROR log line\n{}", f.output()));
        assert!(error.to_string().contains(missing), "`{binary}`: {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn veo3_on_a_real_cog_server_completes_through_the_submit_processor_and_upstream_binaries() {
    let stack = Stack::new("cog").await;
    let cog = CogServer::start("render");
    let models = tempfile::tempdir().expect("a folder for the catalog");
    let catalog = cog_catalog(models.path(), &cog.url);
    let with_catalog = |binary: &str| {
        let mut vars = stack.vars_for(binary);
        vars.push(("TASKLANE_MODELS", catalog.display().to_string()));
        vars
    };
    let upstream = Arc::new(tokio::sync::Mutex::new(
        Function::ready("upstream", &with_catalog("upstream")).await,
    ));
    let gateway = Gateway::start(upstream.clone()).await;
    // The processor gives Cog the API's URL for its callbacks: here, the gateway's.
    let mut processor_vars = with_catalog("processor");
    processor_vars.push(("TASKLANE_PUBLIC_URL", gateway.url.clone()));
    let mut processor = Function::ready("processor", &processor_vars).await;
    let mut submit = Function::ready("submit", &with_catalog("submit")).await;

    // 6 s of video at 4 fps: 24 frames, about 3 s of rendering on Cog. Checks come 2 s after
    // the start and 4 s after that (the defaults): one while it renders, one after the end.
    let prompt = "a lighthouse at dusk";
    let mut event: Value = serde_json::from_str(SUBMIT).expect("submit.json");
    let body =
        json!({"model": "veo3", "prompt": prompt, "duration": 6, "params": {"fps": 4}}).to_string();
    event["headers"]["content-length"] = json!(body.len().to_string());
    event["body"] = json!(body);
    let submitted_at = Instant::now();
    let a = submit.invoke(&event.to_string()).await.gateway();
    assert_eq!(a.status, 202, "body: {}", a.body);
    assert_eq!(a.body["cost"], json!({"credits": 60, "refunded": false}));
    let id = a.body["task_id"].as_str().expect("a task id").to_string();

    // The event source mapping feeds the processor until the task has ended and the last
    // check scheduled for it has run too (so every processor invocation is counted).
    let fed = Mutex::new(Vec::new());
    let (task, ended_after) = {
        let mapping = event_source_mapping(&stack, &mut processor, &fed);
        tokio::pin!(mapping);
        let settled = async {
            let deadline = Instant::now() + INVOKE_DEADLINE;
            let mut ended_after = None;
            loop {
                let task = stack.task(&id).await;
                if task.status.is_terminal() {
                    let ended = *ended_after.get_or_insert_with(|| submitted_at.elapsed());
                    let last = task.upstream.as_ref().map_or(0, |u| u.checks);
                    let checked = fed.lock().unwrap().iter().any(|b: &Batch| {
                        b.messages().iter().any(|m| {
                            matches!(m, WorkMessage::Check { task_id, check } if *task_id == id && *check >= last)
                        })
                    });
                    if checked {
                        return (task, ended);
                    }
                }
                if Instant::now() > deadline {
                    let batches = format!("{:?}", fed.lock().unwrap());
                    let upstream_output = upstream.lock().await.output();
                    panic!(
                        "task {id} not settled within {INVOKE_DEADLINE:?}: {task:?}\nbatches: {batches}\ncallbacks: {:?}\nCog's log:\n{}\n{upstream_output}",
                        gateway.forwarded(),
                        cog.log(),
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            settled = settled => settled,
            () = &mut mapping => unreachable!("the event source mapping runs until dropped"),
        }
    };

    // Completed, with Cog's GIF copied into the results bucket, charged once.
    assert_eq!(task.status, TaskStatus::Completed, "{task:?}");
    assert_eq!(task.progress, 100);
    assert_eq!(task.outputs.len(), 1, "{task:?}");
    let output = &task.outputs[0];
    assert_eq!(output.content_type, "image/gif");
    let gif = stack.object(&output.key).await;
    assert!(gif.starts_with(b"GIF8"), "a GIF in the results bucket");
    assert_eq!(output.size_bytes, gif.len() as u64);
    assert!(!task.cost.refunded);
    assert_eq!(stack.credits().await, CREDITS - 60, "charged once");
    assert_eq!(renders(&cog, prompt), 1, "rendered once\n{}", cog.log());

    // The processor started the run and let go; Cog's callbacks reached the upstream function
    // through the gateway, and it ended the task.
    let fed = fed.into_inner().unwrap();
    for batch in &fed {
        assert_eq!(
            batch.reply,
            json!({"batchItemFailures": []}),
            "batch {:?}",
            batch.bodies
        );
    }
    let runs = fed
        .iter()
        .filter(|b| {
            b.messages().contains(&WorkMessage::Run {
                task_id: id.clone(),
            })
        })
        .count();
    assert_eq!(runs, 1, "one start: {fed:?}");
    let forwarded = gateway.forwarded();
    assert!(
        gateway.unexpected.lock().unwrap().is_empty(),
        "{:?}",
        gateway.unexpected.lock().unwrap()
    );
    assert!(
        forwarded.iter().all(|f| f.answer == 200),
        "every callback answered 200: {forwarded:?}"
    );
    let completed = forwarded
        .iter()
        .find(|f| f.status == "succeeded")
        .unwrap_or_else(|| panic!("no succeeded callback: {forwarded:?}"));
    drop(gateway);
    let mut upstream = upstream.lock().await;
    let finished = upstream
        .json_logs()
        .into_iter()
        .find(|v| {
            v["fields"]["message"] == "task finished" && v["fields"]["task_id"] == id.as_str()
        })
        .unwrap_or_else(|| {
            panic!(
                "the upstream function did not end the task\n{}",
                upstream.output()
            )
        });
    assert_eq!(finished["fields"]["status"], "completed");
    upstream.assert_running("after the callbacks");
    upstream.assert_clean_runtime_use();
    processor.assert_clean_runtime_use();

    // The figure: how long the processor was busy for this generation (never asserted).
    let generation = completed
        .predict_time
        .map(Duration::from_secs_f64)
        .unwrap_or_else(|| panic!("no metrics.predict_time in Cog's completed callback"));
    let busy: Duration = fed.iter().map(|b| b.took).sum();
    let each: Vec<String> = fed
        .iter()
        .map(|b| {
            let what = match b.messages().first() {
                Some(WorkMessage::Run { .. }) => "start".to_string(),
                Some(WorkMessage::Check { check, .. }) => format!("check {check}"),
                Some(other) => format!("{other:?}"),
                None => "?".to_string(),
            };
            format!("{what} {} ms", b.took.as_millis())
        })
        .collect();
    let callbacks: Duration = forwarded.iter().map(|f| f.took).sum();
    println!(
        "processor busy {} ms over {} invocations for a {:.1} s generation ({}); \
         upstream function busy {} ms over {} callbacks; submit to completed {} ms \
         (debug binaries, moto)",
        busy.as_millis(),
        fed.len(),
        generation.as_secs_f64(),
        each.join(", "),
        callbacks.as_millis(),
        forwarded.len(),
        ended_after.as_millis(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_binary_answers_a_forged_callback_401_in_the_api_error_shape_and_changes_nothing()
{
    let stack = Stack::new("forged").await;
    // The Cog server is never called: a refused callback stops before anything is sent, and a
    // genuine "failed" one needs nothing from Cog. (Port 9, discard, on loopback.)
    let models = tempfile::tempdir().expect("a folder for the catalog");
    let catalog = cog_catalog(models.path(), "http://127.0.0.1:9");
    let mut vars = stack.vars_for("upstream");
    vars.push(("TASKLANE_MODELS", catalog.display().to_string()));
    let mut upstream = Function::ready("upstream", &vars).await;

    // A veo3 task running on Cog, its callback token known only to Cog.
    let token = "7f".repeat(24);
    let now = Utc::now();
    let running = Task {
        status: TaskStatus::Processing,
        attempts: 1,
        started_at: Some(now),
        waiting_since: None,
        lease_until: Some(now + chrono::Duration::minutes(5)),
        upstream: Some(UpstreamRun {
            id: Some(EXAMPLE_TASK.into()),
            started_at: Some(now),
            ..UpstreamRun::prepared(token.clone())
        }),
        ..queued_veo3(EXAMPLE_TASK, &stack.account.id)
    };
    stack.insert(&running).await;
    let before = stack.task(EXAMPLE_TASK).await;
    assert_eq!(stack.credits().await, CREDITS - 50);

    let headers = vec![
        ("content-type".to_string(), "application/json".to_string()),
        ("user-agent".to_string(), "coglet/0.23.1".to_string()),
    ];
    let forged = json!({
        "id": EXAMPLE_TASK,
        "status": "succeeded",
        "output": "data:text/plain;base64,Zm9yZ2Vk",
        "logs": "",
        "metrics": {"predict_time": 1.0},
    })
    .to_string();
    let route = format!("/v1/upstream/cog/{EXAMPLE_TASK}");
    let wrong = "00".repeat(24);
    for target in [
        route.clone(),
        format!("{route}?token="),
        format!("{route}?token={wrong}"),
        format!("{route}?token={}", &token[..46]),
    ] {
        let a = upstream
            .invoke(&upstream_event(&target, &headers, &forged))
            .await
            .gateway();
        assert_eq!(a.status, 401, "{target}: {}", a.body);
        assert_eq!(a.header("content-type"), Some("application/json"));
        assert_eq!(a.body["error"]["code"], "unauthorized", "{}", a.body);
        assert!(
            a.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{}",
            a.body
        );
        assert!(!a.body.to_string().contains(&token), "{}", a.body);
    }
    // The right token on another provider's route: no such task there.
    let a = upstream
        .invoke(&upstream_event(
            &format!("/v1/upstream/replicate/{EXAMPLE_TASK}?token={token}"),
            &headers,
            &forged,
        ))
        .await
        .gateway();
    assert_eq!(a.status, 404, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "not_found", "{}", a.body);
    assert_eq!(stack.task(EXAMPLE_TASK).await, before, "nothing changed");
    assert_eq!(stack.credits().await, CREDITS - 50);

    // Cog's own callback, with the token: the run failed, the task fails, refunded.
    let failed = json!({
        "id": EXAMPLE_TASK,
        "status": "failed",
        "error": "Prediction failed: ValueError: out of frames",
        "logs": "rendering\n",
        "metrics": {"predict_time": 0.5},
    })
    .to_string();
    let a = upstream
        .invoke(&upstream_event(
            &format!("{route}?token={token}"),
            &headers,
            &failed,
        ))
        .await
        .gateway();
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body, json!({"received": true}));
    let task = stack.task(EXAMPLE_TASK).await;
    assert_eq!(task.status, TaskStatus::Failed, "{task:?}");
    let error = task.error.expect("a failed task says why");
    assert_eq!(error.code, "generation_failed");
    assert!(error.message.contains("out of frames"), "{}", error.message);
    assert!(task.cost.refunded);
    assert_eq!(stack.credits().await, CREDITS, "refunded");
    // No log line carries the token.
    let logs = upstream.stdout.lock().unwrap().join("\n");
    assert!(!logs.contains(&token), "{logs}");
    upstream.json_logs();
    upstream.assert_clean_runtime_use();
}

/// The HTTP API event of `GET {target}` on the files route (`GET /v1/files/{key+}`), as API
/// Gateway builds it from the status event's shape.
fn files_event(target: &str) -> String {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut event: Value = serde_json::from_str(STATUS).expect("the status event");
    let route = "GET /v1/files/{key+}";
    event["routeKey"] = json!(route);
    event["rawPath"] = json!(path);
    event["rawQueryString"] = json!(query);
    event["headers"]
        .as_object_mut()
        .unwrap()
        .remove("authorization");
    let mut params = Map::new();
    let parsed = reqwest::Url::parse(&format!("https://example/?{query}")).unwrap();
    for (k, v) in parsed.query_pairs() {
        params.insert(k.into_owned(), json!(v.into_owned()));
    }
    event["queryStringParameters"] = Value::Object(params);
    event["pathParameters"] = json!({"key": path.trim_start_matches("/v1/files/")});
    event["requestContext"]["routeKey"] = json!(route);
    event["requestContext"]["http"]["path"] = json!(path);
    event.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_url_from_the_status_binary_outlives_its_session_through_the_files_binary() {
    let stack = Stack::new("files").await;
    stack
        .insert(&stack.completed_echo(EXAMPLE_TASK).await)
        .await;
    // The status function as template.yaml configures it: result URLs signed with the key.
    let mut vars = stack.vars();
    vars.push(("TASKLANE_RESULT_URL_SIGNING_KEY", RESULT_URL_KEY.into()));
    vars.retain(|(k, _)| *k != "TASKLANE_RESULT_URL_TTL");
    vars.push(("TASKLANE_RESULT_URL_TTL", "604800".into()));
    let mut status = Function::ready("status", &vars).await;
    let a = status.invoke(STATUS).await.gateway();
    assert_eq!(a.status, 200, "{}", a.body);
    let out = &a.body["result"]["outputs"][0];
    let url = out["url"].as_str().expect("a URL").to_string();
    // On the address the request came in on, for the whole week configured.
    let prefix = format!("{EXAMPLE_API_URL}/v1/files/tasks/{EXAMPLE_TASK}/output-0.txt?");
    assert!(url.starts_with(&prefix), "{url}");
    let expires: i64 = url
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("expires="))
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("no expires in {url}"));
    let told: chrono::DateTime<Utc> = out["expires_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(expires, told.timestamp(), "{out}");
    assert!(told > Utc::now() + chrono::Duration::days(6), "{out}");

    let mut files = Function::ready("files", &stack.vars_for("files")).await;
    let target = url.strip_prefix(EXAMPLE_API_URL).unwrap();
    let wire = files.invoke(&files_event(target)).await.response().clone();
    assert_eq!(wire["statusCode"], 302, "{wire}");
    assert_eq!(
        wire["headers"]["cache-control"], "private, no-store",
        "{wire}"
    );
    let location = wire["headers"]["location"]
        .as_str()
        .expect("a Location")
        .to_string();
    let q: std::collections::HashMap<String, String> = reqwest::Url::parse(&location)
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    assert_eq!(
        q["X-Amz-Expires"], "300",
        "a presigned GET of minutes: {location}"
    );
    assert_eq!(download(&location).await, b"hello");

    // Tampered (another expiry): 403 forbidden in the API's shape.
    let tampered = target.replace("expires=", "expires=1");
    let a = files.invoke(&files_event(&tampered)).await.gateway();
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "forbidden");

    // After the bucket's lifecycle rule removed the object: 410 expired.
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&stack.config)
            .force_path_style(true)
            .build(),
    );
    s3.delete_object()
        .bucket(&stack.settings.bucket)
        .key(format!("tasks/{EXAMPLE_TASK}/output-0.txt"))
        .send()
        .await
        .expect("deleting the output");
    let a = files.invoke(&files_event(target)).await.gateway();
    assert_eq!(a.status, 410, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "expired");
    files.assert_clean_runtime_use();
}

/// Receives every message now in the queue at `url` (up to 10), deleting nothing.
async fn queued_in(stack: &Stack, url: &str) -> Vec<aws_sdk_sqs::types::Message> {
    let sqs = aws_sdk_sqs::Client::new(&stack.config);
    sqs.receive_message()
        .queue_url(url)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .message_system_attribute_names(MessageSystemAttributeName::All)
        .send()
        .await
        .expect("receiving")
        .messages()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_processor_queues_webhooks_for_the_deliver_binary_which_posts_them() {
    let stack = Stack::new("deliver").await;
    // A receiver on loopback that answers 200 and records what it got.
    let got: Arc<Mutex<Vec<axum::http::HeaderMap>>> = Arc::default();
    let seen = got.clone();
    let receiver = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(headers);
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, receiver).await.unwrap() });
    let task_id = ulid_task_id();
    let task = tasklane_testkit::TaskBuilder::echo(&stack.account.id)
        .id(&task_id)
        .callback(&hook)
        .build();
    stack.insert(&task).await;
    // Loopback receivers are allowed here only (the template never allows them).
    let vars = |binary| {
        let mut v = stack.vars_for(binary);
        v.push(("TASKLANE_CALLBACK_ALLOW_PRIVATE", "true".into()));
        v
    };

    let mut processor = Function::ready("processor", &vars("processor")).await;
    let run = json!({"Records": [{
        "messageId": "run-1",
        "receiptHandle": "run-1",
        "body": json!({"type": "run", "task_id": task_id}).to_string(),
        "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": {},
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:tasklane-WorkQueue-EXAMPLE1234",
        "awsRegion": "us-east-1"
    }]})
    .to_string();
    let ran = processor.invoke(&run).await;
    assert_eq!(ran.response(), &json!({"batchItemFailures": []}));
    assert_eq!(stack.task(&task_id).await.status, TaskStatus::Completed);

    // The first webhook waits on the delivery queue, not on the work queue.
    let delivery_url = stack
        .settings
        .delivery_queue_url
        .clone()
        .expect("a delivery queue");
    let deliveries = queued_in(&stack, &delivery_url).await;
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    let msg: WorkMessage = serde_json::from_str(deliveries[0].body().unwrap()).unwrap();
    assert_eq!(msg, WorkMessage::first_delivery(&task_id));
    assert!(
        queued_in(&stack, &stack.settings.queue_url)
            .await
            .is_empty()
    );

    let mut deliver = Function::ready("deliver", &vars("deliver")).await;
    let event = json!({"Records": sqs_records(
        &deliveries,
        "arn:aws:sqs:us-east-1:123456789012:tasklane-DeliveryQueue-EXAMPLE1234",
    )})
    .to_string();
    let delivered = deliver.invoke(&event).await;
    assert_eq!(delivered.response(), &json!({"batchItemFailures": []}));
    let headers = got.lock().unwrap().clone();
    assert_eq!(headers.len(), 1, "one POST");
    assert!(headers[0].contains_key("webhook-signature"));
    let cb = stack.task(&task_id).await.callback.expect("callback");
    assert_eq!((cb.state, cb.attempts), (CallbackState::Delivered, 1));
    server.abort();
    processor.assert_clean_runtime_use();
    deliver.assert_clean_runtime_use();
}
