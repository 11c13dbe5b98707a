//! The compiled Lambda binaries (`submit`, `status`, `cancel`, `sync-wait`, `account`,
//! `processor`), each run as a real process behind a minimal Lambda Runtime API emulator
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
use serde_json::{Value, json};
use tasklane_core::ports::{MessageSource, WorkMessage};
use tasklane_core::task::{Callback, CallbackState, Task, TaskStatus};
use tasklane_testkit::runtime_api::{Invoked, Reply, RuntimeApi};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Every Lambda function binary, with its function in template.yaml and its memory size there.
const FUNCTIONS: [(&str, &str, u32); 8] = [
    ("submit", "SubmitFunction", 256),
    ("status", "StatusFunction", 256),
    ("cancel", "CancelFunction", 256),
    ("sync-wait", "SyncWaitFunction", 256),
    ("account", "AccountFunction", 256),
    ("processor", "ProcessorFunction", 512),
    ("dead-letter", "DeadLetterFunction", 256),
    ("sweeper", "SweeperFunction", 256),
];

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
        "dead-letter" => env!("CARGO_BIN_EXE_dead-letter"),
        "sweeper" => env!("CARGO_BIN_EXE_sweeper"),
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
        let mut cmd = Command::new(crate::binary(binary));
        cmd.env_clear()
            .env("AWS_LAMBDA_RUNTIME_API", runtime.addr().to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", &function_name)
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", memory.to_string())
            .env(
                "AWS_LAMBDA_LOG_GROUP_NAME",
                format!("/aws/lambda/{function_name}"),
            )
            .env(
                "AWS_LAMBDA_LOG_STREAM_NAME",
                "2025/07/01/[$LATEST]0123456789abcdef0123456789abcdef",
            )
            .env("AWS_LAMBDA_LOG_FORMAT", "JSON")
            .env("AWS_LAMBDA_LOG_LEVEL", "INFO")
            .env("AWS_EC2_METADATA_DISABLED", "true");
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

    /// The function configuration template.yaml sets (with its default parameters).
    fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("TASKLANE_TABLE", self.settings.table.clone()),
            ("TASKLANE_QUEUE_URL", self.settings.queue_url.clone()),
            ("TASKLANE_BUCKET", self.settings.bucket.clone()),
            ("TASKLANE_RESULT_URL_TTL", "3600".into()),
            ("TASKLANE_SYNC_WAIT_CAP", "25".into()),
            ("TASKLANE_CALLBACK_ALLOW_PRIVATE", "false".into()),
            ("TASKLANE_SWEEP_AFTER", "120".into()),
            ("TASKLANE_MAX_OPEN_TASKS", "1000".into()),
            ("RUST_LOG", "info".into()),
        ]
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

/// What SQS's event source mapping does for the processor function: receives from the work
/// queue, invokes the function with the messages as an SQS event, and deletes those not
/// reported in `batchItemFailures`. Runs until dropped; records each batch and the reply.
async fn event_source_mapping(
    stack: &Stack,
    processor: &mut Function,
    fed: &Mutex<Vec<(Vec<String>, Value)>>,
) {
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
        let reply = processor.invoke(&event).await.response().clone();
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
        fed.lock().unwrap().push((bodies, reply));
    }
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
        let mut f = Function::start(binary, &stack.vars()).await;
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
    let mut processor = Function::ready("processor", &stack.vars()).await;
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
        fed.iter().any(|(bodies, _)| bodies
            .iter()
            .any(|m| serde_json::from_str::<Value>(m).ok() == Some(run.clone()))),
        "the processor binary ran the task's run message: {fed:?}"
    );
    for (bodies, reply) in &fed {
        assert_eq!(reply, &json!({"batchItemFailures": []}), "batch {bodies:?}");
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
        }),
        ..stack.completed_echo(DELIVER_TASK).await
    };
    stack.insert(&delivered).await;
    let mut processor = Function::ready("processor", &stack.vars()).await;

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
        let mut f = Function::ready(binary, &stack.vars()).await;
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
    let vars: Vec<_> = stack
        .vars()
        .into_iter()
        .filter(|(k, _)| *k != "TASKLANE_QUEUE_URL")
        .collect();
    for (binary, _, _) in FUNCTIONS {
        let mut f = Function::start(binary, &vars).await;
        let status = f.exit_status().await;
        let init_errors = f.runtime.init_errors();
        println!(
            "`{binary}` without TASKLANE_QUEUE_URL: {status}; init errors reported: {}; stderr: {:?}",
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
            reported.contains("TASKLANE_QUEUE_URL"),
            "`{binary}`: no message names TASKLANE_QUEUE_URL\n{}",
            f.output()
        );
        // The JSON log line says it too, at ERROR, for Lambda's log filter.
        let logs = f.json_logs();
        let error = logs
            .iter()
            .find(|v| v["level"] == "ERROR")
            .unwrap_or_else(|| panic!("`{binary}`: no ERROR log line\n{}", f.output()));
        assert!(
            error.to_string().contains("TASKLANE_QUEUE_URL"),
            "`{binary}`: {error}"
        );
    }
}
