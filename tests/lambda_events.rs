//! The Lambda functions, fed the events in `events/` exactly as API Gateway (HTTP API, payload
//! 2.0) and SQS deliver them, over DynamoDB, SQS and S3 in the AWS emulator that
//! `scripts/test.sh` starts (`AWS_ENDPOINT_URL`). Each test provisions its own table, queues and
//! bucket, and creates the account whose key is the example key every event carries.

mod aws_fixtures;

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_fixtures::{
    ACCOUNT, CANCEL, CREDITS, DEAD_LETTER, DELIVER_TASK, EXAMPLE_KEY, EXAMPLE_TASK, LIST,
    PROCESSOR, STATUS, SUBMIT, SWEEPER, SYNC_WAIT, World, download, queued_veo3, sqs_records,
};
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use chrono::Utc;
use lambda_http::request::LambdaRequest;
use lambda_http::tower::ServiceExt;
use lambda_http::{Adapter, Context, LambdaEvent, Request, RequestExt, service_fn};
use serde_json::{Map, Value, json};
use tasklane_aws::lambda::{handle_dead_letters, handle_http, handle_sqs, handle_sweep};
use tasklane_core::App;
use tasklane_core::account::Account;
use tasklane_core::api::Api;
use tasklane_core::ports::{MessageSource, TaskStore, WorkMessage};
use tasklane_core::processor::{Processor, run_worker};
use tasklane_core::task::{Callback, CallbackState, Task, TaskStatus};
use tasklane_testkit::provision::MAX_RECEIVE_COUNT;

/// Every HTTP event, with the method and raw path it carries.
const HTTP_EVENTS: [(&str, &str, &str, &str); 6] = [
    ("submit.json", SUBMIT, "POST", "/v1/tasks"),
    ("sync-wait.json", SYNC_WAIT, "POST", "/v1/tasks/sync"),
    (
        "status.json",
        STATUS,
        "GET",
        "/v1/tasks/task_01JZ2XQDG0EXAMP1E000000001",
    ),
    ("list.json", LIST, "GET", "/v1/tasks"),
    (
        "cancel.json",
        CANCEL,
        "POST",
        "/v1/tasks/task_01JZ2XQDG0EXAMP1E000000001/cancel",
    ),
    ("account.json", ACCOUNT, "GET", "/v1/account"),
];

/// One provisioned stack: the world on the emulator, the API and the app behind it.
struct Stack {
    world: World,
    app: Arc<App>,
    api: Api,
}

impl Deref for Stack {
    type Target = World;

    fn deref(&self) -> &World {
        &self.world
    }
}

/// An HTTP answer of a function, its body parsed as JSON.
struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the API error shape with `code` and returns the error object.
    fn assert_error(&self, status: u16, code: &str) -> &Map<String, Value> {
        assert_eq!(self.status, status, "body: {}", self.body);
        assert_eq!(self.header("content-type"), Some("application/json"));
        let top = self.body.as_object().expect("an object body");
        assert_eq!(top.len(), 1, "only `error` at the top: {}", self.body);
        let error = top["error"].as_object().expect("an `error` object");
        assert_eq!(error["code"], code);
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "a human message: {}",
            self.body
        );
        error
    }
}

impl Stack {
    async fn new(tag: &str) -> Stack {
        let world = World::new(
            "le",
            tag,
            "these tests provision resources on an AWS emulator and never on AWS itself: \
             run scripts/test.sh, or start moto_server and set AWS_ENDPOINT_URL",
        )
        .await;
        let app = world.backends.app(world.settings.core.clone());
        Stack {
            world,
            api: Api::new(app.clone()),
            app,
        }
    }

    /// Sends an API Gateway event through the HTTP handler every HTTP function runs.
    async fn http(&self, event: &str) -> Answer {
        let req = lambda_http::request::from_str(event).expect("an API Gateway event");
        let resp = handle_http(&self.api, req)
            .await
            .expect("the handler answers");
        let (parts, body) = resp.into_parts();
        let body = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).expect("a JSON body")
        };
        Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }

    fn processor(&self) -> Processor {
        Processor::new(self.app.clone())
    }
}

/// `event` with `edit` applied.
fn edited(event: &str, edit: impl FnOnce(&mut Value)) -> String {
    let mut v: Value = serde_json::from_str(event).expect("a JSON event");
    edit(&mut v);
    v.to_string()
}

/// An HTTP API event of `event` sent by the catch-all route to another method and path.
fn rerouted(event: &str, method: &str, path: &str) -> String {
    edited(event, |v| {
        v["routeKey"] = json!("$default");
        v["rawPath"] = json!(path);
        v["requestContext"]["routeKey"] = json!("$default");
        v["requestContext"]["http"]["method"] = json!(method);
        v["requestContext"]["http"]["path"] = json!(path);
    })
}

fn processor_event() -> SqsEvent {
    serde_json::from_str(PROCESSOR).expect("an SQS event")
}

fn message_ids(resp: &SqsBatchResponse) -> Vec<String> {
    resp.batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect()
}

/// Standard base64 with padding, as API Gateway encodes bodies.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn every_http_event_is_an_http_api_payload_on_the_default_stage_with_the_example_key() {
    assert_eq!(EXAMPLE_KEY.len(), 46);
    assert!(EXAMPLE_KEY.starts_with("tl_"));
    assert!(
        EXAMPLE_KEY[3..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    );
    for id in [EXAMPLE_TASK, DELIVER_TASK] {
        assert!(tasklane_core::is_task_id(id), "{id}");
    }
    for (name, event, method, path) in HTTP_EVENTS {
        let raw: Value = serde_json::from_str(event).expect(name);
        assert_eq!(raw["version"], "2.0", "{name}");
        assert_eq!(raw["rawPath"], path, "{name}");
        let ctx = &raw["requestContext"];
        assert_eq!(ctx["stage"], "$default", "{name}");
        assert_eq!(ctx["routeKey"], raw["routeKey"], "{name}");
        assert_eq!(ctx["http"]["method"], method, "{name}");
        assert_eq!(ctx["http"]["path"], path, "{name}");
        assert_eq!(ctx["accountId"], "123456789012", "{name}");
        assert_eq!(raw["isBase64Encoded"], false, "{name}");
        if let Some(body) = raw["body"].as_str() {
            serde_json::from_str::<Value>(body).expect(name);
            assert_eq!(
                raw["headers"]["content-length"],
                body.len().to_string(),
                "{name}"
            );
            assert_eq!(raw["headers"]["content-type"], "application/json", "{name}");
        }

        let req = lambda_http::request::from_str(event).expect(name);
        assert_eq!(req.method().as_str(), method, "{name}");
        assert_eq!(
            req.uri().path(),
            path,
            "{name}: no stage prefix on $default"
        );
        assert_eq!(req.raw_http_path(), path, "{name}");
        assert_eq!(
            req.headers()["authorization"],
            format!("Bearer {EXAMPLE_KEY}").as_str(),
            "{name}"
        );
    }
    for event in [STATUS, CANCEL] {
        let req = lambda_http::request::from_str(event).unwrap();
        assert_eq!(req.path_parameters().first("task_id"), Some(EXAMPLE_TASK));
    }
    let list = lambda_http::request::from_str(LIST).unwrap();
    assert_eq!(list.uri().query(), Some("status=completed&limit=10"));
    assert_eq!(
        list.query_string_parameters().first("status"),
        Some("completed")
    );
    assert_eq!(list.query_string_parameters().first("limit"), Some("10"));
}

#[test]
fn the_processor_event_carries_one_run_and_one_deliver_message_as_sqs_sends_them() {
    let event = processor_event();
    assert_eq!(event.records.len(), 2);
    let messages: Vec<WorkMessage> = event
        .records
        .iter()
        .map(|r| serde_json::from_str(r.body.as_deref().unwrap()).expect("a work message"))
        .collect();
    assert_eq!(
        messages,
        [
            WorkMessage::Run {
                task_id: EXAMPLE_TASK.into()
            },
            WorkMessage::Deliver {
                task_id: DELIVER_TASK.into(),
                attempt: 0,
                not_before: None
            },
        ]
    );
    for r in &event.records {
        assert!(r.message_id.is_some() && r.receipt_handle.is_some());
        assert_eq!(r.event_source.as_deref(), Some("aws:sqs"));
        assert!(
            r.event_source_arn
                .as_deref()
                .is_some_and(|a| a.starts_with("arn:aws:sqs:us-east-1:123456789012:"))
        );
        assert!(
            r.attributes["ApproximateReceiveCount"]
                .parse::<u32>()
                .is_ok()
        );
        assert_eq!(r.md5_of_body.as_deref().map(str::len), Some(32));
    }
}

#[tokio::test]
async fn submit_event_queues_the_veo3_task_and_charges_fifty_credits() {
    let stack = Stack::new("submit").await;
    let a = stack.http(SUBMIT).await;
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
            .is_some_and(|s| s.parse::<u64>().is_ok())
    );
    let b = &a.body;
    assert_eq!(b["model"], "veo3");
    assert_eq!(b["action"], "generate");
    assert_eq!(b["status"], "queued");
    assert_eq!(b["progress"], 0);
    assert_eq!(
        b["input"],
        json!({"prompt": "A cat walking on the beach", "duration": 5, "params": {}})
    );
    assert_eq!(b["result"], Value::Null);
    assert_eq!(b["error"], Value::Null);
    assert_eq!(b["cost"], json!({"credits": 50, "refunded": false}));
    assert_eq!(b["callback"], Value::Null);
    assert_eq!(b["metadata"], json!({}));
    assert!(
        b["created_at"]
            .as_str()
            .is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok())
    );
    assert_eq!(b["started_at"], Value::Null);
    assert_eq!(b["completed_at"], Value::Null);
    assert!(b.get("poll_url").is_none());

    assert_eq!(stack.credits().await, CREDITS - 50);
    let work = stack
        .backends
        .queue
        .receive(10, Duration::from_secs(60))
        .await
        .expect("receiving from the work queue");
    let messages: Vec<_> = work.iter().map(|d| d.message.clone()).collect();
    assert_eq!(messages, [Some(WorkMessage::Run { task_id: id })]);
}

#[tokio::test]
async fn submit_event_makes_the_full_wire_round_trip_to_an_api_gateway_response() {
    let stack = Stack::new("wire").await;
    let payload: LambdaRequest = serde_json::from_str(SUBMIT).expect("a Lambda HTTP request");
    let api = &stack.api;
    let adapter = Adapter::from(service_fn(move |req: Request| handle_http(api, req)));
    let resp = adapter
        .oneshot(LambdaEvent::new(payload, Context::default()))
        .await
        .expect("the function answers");
    let wire = serde_json::to_value(&resp).expect("a serializable response");

    assert_eq!(wire["statusCode"], 202, "{wire}");
    assert_eq!(wire["isBase64Encoded"], false);
    let headers = &wire["headers"];
    assert_eq!(headers["content-type"], "application/json");
    let body: Value =
        serde_json::from_str(wire["body"].as_str().expect("a text body")).expect("a JSON body");
    let id = body["task_id"].as_str().expect("a task id");
    assert_eq!(headers["location"], format!("/v1/tasks/{id}"));
    assert!(headers["retry-after"].is_string());
    assert_eq!(body["status"], "queued");
    assert_eq!(body["cost"], json!({"credits": 50, "refunded": false}));
    assert_eq!(stack.task(id).await.status, TaskStatus::Queued);
}

#[tokio::test]
async fn submit_event_with_a_base64_encoded_body_is_decoded_like_a_plain_one() {
    let stack = Stack::new("base64").await;
    let event = edited(SUBMIT, |v| {
        let body = v["body"].as_str().unwrap().as_bytes().to_vec();
        v["body"] = json!(base64_encode(&body));
        v["isBase64Encoded"] = json!(true);
    });
    let a = stack.http(&event).await;
    assert_eq!(a.status, 202, "body: {}", a.body);
    assert_eq!(a.body["status"], "queued");
    assert_eq!(a.body["input"]["prompt"], "A cat walking on the beach");
}

#[tokio::test]
async fn status_event_answers_the_task_it_names() {
    let stack = Stack::new("status").await;
    stack
        .insert(&queued_veo3(EXAMPLE_TASK, &stack.account.id))
        .await;
    let a = stack.http(STATUS).await;
    assert_eq!(a.status, 200, "body: {}", a.body);
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(a.header("retry-after"), Some("1"), "not terminal yet");
    assert_eq!(a.body["task_id"], EXAMPLE_TASK);
    assert_eq!(a.body["status"], "queued");
    assert_eq!(a.body["model"], "veo3");
    assert_eq!(a.body["cost"], json!({"credits": 50, "refunded": false}));
}

#[tokio::test]
async fn status_event_answers_404_for_a_task_of_another_account() {
    let stack = Stack::new("status404").await;
    let other = Account::create(CREDITS, None).account;
    stack.backends.store.create_account(&other).await.unwrap();
    stack.insert(&queued_veo3(EXAMPLE_TASK, &other.id)).await;
    stack.http(STATUS).await.assert_error(404, "not_found");
}

#[tokio::test]
async fn list_event_pages_through_the_completed_tasks_newest_first() {
    let stack = Stack::new("list").await;
    // The example task is the oldest (its id dates from 2025); ten newer completed tasks and
    // one queued task among them.
    stack
        .insert(&stack.completed_echo(EXAMPLE_TASK).await)
        .await;
    let mut newer = Vec::new();
    for i in 0..10 {
        let id = stack.app.new_task_id();
        if i == 5 {
            let queued = stack.app.new_task_id();
            stack.insert(&queued_veo3(&queued, &stack.account.id)).await;
        }
        stack.insert(&stack.completed_echo(&id).await).await;
        newer.push(id);
    }
    newer.reverse();

    let a = stack.http(LIST).await;
    assert_eq!(a.status, 200, "body: {}", a.body);
    assert_eq!(a.header("content-type"), Some("application/json"));
    let ids: Vec<&str> = a.body["data"]
        .as_array()
        .expect("a data array")
        .iter()
        .map(|t| t["task_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, newer);
    for t in a.body["data"].as_array().unwrap() {
        assert_eq!(t["status"], "completed");
        let out = &t["result"]["outputs"][0];
        assert!(out["url"].as_str().is_some_and(|u| !u.is_empty()));
        assert_eq!(out["content_type"], "text/plain; charset=utf-8");
    }
    let cursor = a.body["next_cursor"]
        .as_str()
        .expect("a cursor: one more completed task follows");

    let next = edited(LIST, |v| {
        let q = format!("status=completed&limit=10&cursor={cursor}");
        v["rawQueryString"] = json!(q);
        v["queryStringParameters"]["cursor"] = json!(cursor);
    });
    let a = stack.http(&next).await;
    assert_eq!(a.status, 200, "body: {}", a.body);
    assert_eq!(a.body["data"].as_array().unwrap().len(), 1);
    assert_eq!(a.body["data"][0]["task_id"], EXAMPLE_TASK);
    assert_eq!(a.body["next_cursor"], Value::Null);
}

#[tokio::test]
async fn cancel_event_cancels_the_queued_task_and_refunds_its_credits_once() {
    let stack = Stack::new("cancel").await;
    stack
        .insert(&queued_veo3(EXAMPLE_TASK, &stack.account.id))
        .await;
    assert_eq!(stack.credits().await, CREDITS - 50);

    let a = stack.http(CANCEL).await;
    assert_eq!(a.status, 200, "body: {}", a.body);
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(a.header("retry-after"), None, "cancelled is terminal");
    assert_eq!(a.body["task_id"], EXAMPLE_TASK);
    assert_eq!(a.body["status"], "cancelled");
    assert_eq!(a.body["cost"], json!({"credits": 50, "refunded": true}));
    assert!(a.body["completed_at"].is_string());
    assert_eq!(stack.credits().await, CREDITS);

    let again = stack.http(CANCEL).await;
    assert_eq!(again.status, 200, "body: {}", again.body);
    assert_eq!(again.body["status"], "cancelled");
    assert_eq!(stack.credits().await, CREDITS, "no second refund");
    let account = stack.http(ACCOUNT).await;
    assert_eq!(account.body["credits"], CREDITS);
}

#[tokio::test]
async fn cancel_event_on_a_completed_task_answers_409_not_cancellable() {
    let stack = Stack::new("cancel409").await;
    stack
        .insert(&stack.completed_echo(EXAMPLE_TASK).await)
        .await;
    stack
        .http(CANCEL)
        .await
        .assert_error(409, "not_cancellable");
    assert_eq!(stack.task(EXAMPLE_TASK).await.status, TaskStatus::Completed);
    assert_eq!(stack.credits().await, CREDITS - 1);
}

#[tokio::test]
async fn account_event_answers_the_credits_and_the_webhook_secret() {
    let stack = Stack::new("account").await;
    stack
        .insert(&queued_veo3(EXAMPLE_TASK, &stack.account.id))
        .await;
    let a = stack.http(ACCOUNT).await;
    assert_eq!(a.status, 200, "body: {}", a.body);
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(
        a.body,
        json!({
            "account_id": stack.account.id,
            "credits": CREDITS - 50,
            "open_tasks": 1,
            "max_open_tasks": 1000,
            "webhook_secret": stack.account.webhook_secret,
        })
    );
    assert!(stack.account.webhook_secret.starts_with("whsec_"));
}

#[tokio::test]
async fn an_event_without_the_example_key_answers_401() {
    let stack = Stack::new("unauth").await;
    let other_key = edited(ACCOUNT, |v| {
        v["headers"]["authorization"] = json!(format!("Bearer tl_{}", "x".repeat(43)));
    });
    stack
        .http(&other_key)
        .await
        .assert_error(401, "unauthorized");
    let no_key = edited(ACCOUNT, |v| {
        v["headers"]
            .as_object_mut()
            .unwrap()
            .remove("authorization");
    });
    stack.http(&no_key).await.assert_error(401, "unauthorized");
}

#[tokio::test]
async fn an_unknown_route_through_the_account_function_answers_404_in_the_error_shape() {
    let stack = Stack::new("route404").await;
    let event = rerouted(ACCOUNT, "GET", "/v1/nope");
    stack.http(&event).await.assert_error(404, "not_found");
    let event = rerouted(ACCOUNT, "GET", "/");
    stack.http(&event).await.assert_error(404, "not_found");
}

#[tokio::test]
async fn a_wrong_method_through_the_account_function_answers_405_with_allow() {
    let stack = Stack::new("route405").await;
    let event = rerouted(ACCOUNT, "DELETE", "/v1/account");
    let a = stack.http(&event).await;
    a.assert_error(405, "method_not_allowed");
    assert_eq!(a.header("allow"), Some("GET"));
}

#[tokio::test]
async fn a_rest_api_event_with_a_stage_prefix_is_routed_by_its_raw_path() {
    let stack = Stack::new("rest").await;
    let v2: Value = serde_json::from_str(ACCOUNT).unwrap();
    let host = v2["requestContext"]["domainName"].clone();
    let rest = json!({
        "resource": "/{proxy+}",
        "path": "/v1/account",
        "httpMethod": "GET",
        "headers": {
            "accept": "*/*",
            "authorization": format!("Bearer {EXAMPLE_KEY}"),
            "host": host,
            "user-agent": "curl/8.5.0",
            "x-forwarded-proto": "https"
        },
        "multiValueHeaders": {
            "accept": ["*/*"],
            "authorization": [format!("Bearer {EXAMPLE_KEY}")],
            "host": [host],
            "user-agent": ["curl/8.5.0"],
            "x-forwarded-proto": ["https"]
        },
        "queryStringParameters": null,
        "multiValueQueryStringParameters": null,
        "pathParameters": {"proxy": "v1/account"},
        "stageVariables": null,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "a1b2c3d4e5",
            "domainName": host,
            "httpMethod": "GET",
            "identity": {"sourceIp": "203.0.113.10", "userAgent": "curl/8.5.0"},
            "path": "/prod/v1/account",
            "protocol": "HTTP/1.1",
            "requestId": "c6af9ac6-7b61-11e6-9a41-93e8deadbeef",
            "requestTimeEpoch": 1751371225000_u64,
            "resourceId": "abc123",
            "resourcePath": "/{proxy+}",
            "stage": "prod"
        },
        "body": null,
        "isBase64Encoded": false
    })
    .to_string();

    let req = lambda_http::request::from_str(&rest).expect("a REST API event");
    assert_eq!(
        req.uri().path(),
        "/prod/v1/account",
        "the stage is in the URI"
    );
    assert_eq!(req.raw_http_path(), "/v1/account");

    let a = stack.http(&rest).await;
    assert_eq!(a.status, 200, "body: {}", a.body);
    assert_eq!(a.body["account_id"], stack.account.id);

    let payload: LambdaRequest = serde_json::from_str(&rest).unwrap();
    let api = &stack.api;
    let adapter = Adapter::from(service_fn(move |req: Request| handle_http(api, req)));
    let resp = adapter
        .oneshot(LambdaEvent::new(payload, Context::default()))
        .await
        .expect("the function answers");
    let wire = serde_json::to_value(&resp).unwrap();
    assert_eq!(wire["statusCode"], 200, "{wire}");
    // REST responses carry their headers in `multiValueHeaders`.
    assert_eq!(
        wire["multiValueHeaders"]["content-type"],
        json!(["application/json"])
    );
    let body: Value = serde_json::from_str(wire["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["credits"], CREDITS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_wait_event_answers_the_completed_task_once_a_worker_has_run_it() {
    let stack = Stack::new("sync").await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let source: Arc<dyn MessageSource> = Arc::new(stack.backends.queue.clone());
    // A processor in another process, as the processor function is: it shares nothing in
    // memory with the API, so the waiter learns of completion from the store.
    let processor = Processor::new(stack.backends.app(stack.settings.core.clone()));
    let worker = tokio::spawn(run_worker(0, source, processor, stopped));

    let a = stack.http(SYNC_WAIT).await;
    stop.send(true).unwrap();
    worker.await.unwrap();

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
}

#[tokio::test]
async fn processor_event_runs_the_task_and_its_output_downloads_through_the_status_answer() {
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

    let resp = handle_sqs(&stack.processor(), &stack.backends.queue, processor_event()).await;
    assert_eq!(message_ids(&resp), Vec::<String>::new());
    assert_eq!(
        serde_json::to_value(&resp).unwrap(),
        json!({"batchItemFailures": []}),
        "the partial batch response Lambda expects"
    );

    let task = stack.task(EXAMPLE_TASK).await;
    assert_eq!(task.status, TaskStatus::Completed);
    assert_eq!(task.outputs.len(), 1);
    assert_eq!(
        stack.task(DELIVER_TASK).await,
        delivered,
        "a stale deliver changes nothing"
    );
    assert_eq!(stack.credits().await, CREDITS - 50 - 1, "no refund");

    let a = stack.http(STATUS).await;
    assert_eq!(a.status, 200, "body: {}", a.body);
    assert_eq!(a.header("retry-after"), None, "completed is terminal");
    assert_eq!(a.body["status"], "completed");
    assert_eq!(a.body["progress"], 100);
    assert!(a.body["started_at"].is_string() && a.body["completed_at"].is_string());
    let outputs = a.body["result"]["outputs"].as_array().expect("outputs");
    assert_eq!(outputs.len(), 1);
    let out = &outputs[0];
    assert_eq!(out["content_type"], "image/gif");
    assert!(
        out["expires_at"]
            .as_str()
            .is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok())
    );
    let gif = download(out["url"].as_str().expect("a URL")).await;
    assert!(gif.starts_with(b"GIF8"), "a GIF");
    assert_eq!(out["size_bytes"], gif.len());
}

#[tokio::test]
async fn processor_reports_an_unparseable_record_as_a_batch_item_failure() {
    let stack = Stack::new("poison").await;
    stack
        .insert(&queued_veo3(EXAMPLE_TASK, &stack.account.id))
        .await;
    let mut event = processor_event();
    event.records[1].body = Some("{\"type\":\"explode\",\"task_id\":".into());
    let poison = event.records[1].message_id.clone().unwrap();

    let resp = handle_sqs(&stack.processor(), &stack.backends.queue, event).await;
    assert_eq!(message_ids(&resp), [poison], "only the poison message");
    assert_eq!(
        stack.task(EXAMPLE_TASK).await.status,
        TaskStatus::Completed,
        "the rest of the batch is handled"
    );
}

#[tokio::test]
async fn a_poison_message_ends_in_the_dead_letter_queue_not_lost() {
    let stack = Stack::new("dlq").await;
    let config = aws_config::load_defaults(BehaviorVersion::latest()).await;
    let sqs = aws_sdk_sqs::Client::new(&config);
    let url = &stack.settings.queue_url;
    let arn = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .expect("the queue ARN");
    let poison = "not a work message";
    sqs.send_message()
        .queue_url(url)
        .message_body(poison)
        .send()
        .await
        .unwrap();

    // What the event source mapping does: receive, invoke, delete what succeeded. The failed
    // record stays; a zero visibility timeout stands in for waiting out the queue's.
    let processor = stack.processor();
    let mut receives = 0;
    for _ in 0..=2 * MAX_RECEIVE_COUNT {
        let got = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .visibility_timeout(0)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .unwrap();
        let messages = got.messages();
        if messages.is_empty() {
            break;
        }
        receives += 1;
        let records = sqs_records(messages, &arn);
        let event: SqsEvent = serde_json::from_value(json!({ "Records": records })).unwrap();
        let all: Vec<String> = event
            .records
            .iter()
            .map(|r| r.message_id.clone().unwrap())
            .collect();
        let resp = handle_sqs(&processor, &stack.backends.queue, event).await;
        assert_eq!(
            message_ids(&resp),
            all,
            "receive {receives}: reported failed"
        );
    }
    assert_eq!(
        receives, MAX_RECEIVE_COUNT,
        "received maxReceiveCount times"
    );

    let dlq = sqs
        .get_queue_url()
        .queue_name(format!("{}-work-dlq", stack.prefix))
        .send()
        .await
        .unwrap()
        .queue_url
        .expect("the dead-letter queue");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let body = loop {
        let got = sqs
            .receive_message()
            .queue_url(&dlq)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        if let Some(m) = got.messages().first() {
            break m.body().unwrap_or_default().to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the poison message never reached the dead-letter queue"
        );
    };
    assert_eq!(body, poison);
}

#[tokio::test]
async fn processor_reports_a_run_for_a_task_another_worker_holds_a_fresh_lease_on_as_a_failure() {
    let stack = Stack::new("lease").await;
    let now = Utc::now();
    let held = Task {
        status: TaskStatus::Processing,
        progress: 40,
        started_at: Some(now),
        attempts: 1,
        lease_until: Some(now + chrono::Duration::seconds(60)),
        ..queued_veo3(EXAMPLE_TASK, &stack.account.id)
    };
    stack.insert(&held).await;
    let mut event = processor_event();
    event.records.truncate(1);
    let run = event.records[0].message_id.clone().unwrap();

    let resp = handle_sqs(&stack.processor(), &stack.backends.queue, event).await;
    assert_eq!(message_ids(&resp), [run], "retry later");
    assert_eq!(
        stack.task(EXAMPLE_TASK).await,
        held,
        "the task is untouched"
    );
}

#[tokio::test]
async fn dead_letter_event_fails_the_queued_example_task_with_a_refund_once() {
    let stack = Stack::new("dlq").await;
    stack
        .insert(&queued_veo3(EXAMPLE_TASK, &stack.account.id))
        .await;
    let event: SqsEvent = serde_json::from_str(DEAD_LETTER).expect("an SQS event");

    let resp = handle_dead_letters(&stack.processor(), event.clone()).await;
    assert!(message_ids(&resp).is_empty());
    let task = stack.task(EXAMPLE_TASK).await;
    assert_eq!(task.status, TaskStatus::Failed);
    assert_eq!(task.error.as_ref().unwrap().code, "attempts_exhausted");
    assert!(task.cost.refunded);
    assert_eq!(stack.credits().await, CREDITS);

    let resp = handle_dead_letters(&stack.processor(), event).await;
    assert!(message_ids(&resp).is_empty());
    assert_eq!(
        stack.task(EXAMPLE_TASK).await,
        task,
        "a second copy changes nothing"
    );
    assert_eq!(stack.credits().await, CREDITS, "refunded once");
}

#[tokio::test]
async fn dead_letter_event_leaves_a_task_another_worker_holds_a_fresh_lease_on() {
    let stack = Stack::new("dlqlease").await;
    let now = Utc::now();
    let held = Task {
        status: TaskStatus::Processing,
        progress: 40,
        started_at: Some(now),
        attempts: 1,
        lease_until: Some(now + chrono::Duration::seconds(60)),
        ..queued_veo3(EXAMPLE_TASK, &stack.account.id)
    };
    stack.insert(&held).await;
    let event: SqsEvent = serde_json::from_str(DEAD_LETTER).expect("an SQS event");

    let resp = handle_dead_letters(&stack.processor(), event).await;
    assert!(message_ids(&resp).is_empty(), "nothing to retry");
    assert_eq!(
        stack.task(EXAMPLE_TASK).await,
        held,
        "the worker completing it is not overruled"
    );
    assert_eq!(stack.credits().await, CREDITS - 50);
}

#[tokio::test]
async fn sweeper_event_re_enqueues_only_the_task_that_waited_too_long() {
    let stack = Stack::new("sweep").await;
    let _: Value = serde_json::from_str(SWEEPER).expect("the scheduled event is JSON");
    let lost = Task {
        waiting_since: Some(Utc::now() - chrono::Duration::minutes(10)),
        ..queued_veo3(EXAMPLE_TASK, &stack.account.id)
    };
    stack.insert(&lost).await;
    // Submitted just now: its message is presumably on its way.
    stack
        .insert(&queued_veo3(DELIVER_TASK, &stack.account.id))
        .await;

    let report = handle_sweep(&stack.app).await.expect("a sweep");
    assert_eq!(report["runs"], 1, "{report}");
    let work = stack
        .backends
        .queue
        .receive(10, Duration::from_secs(60))
        .await
        .unwrap();
    let messages: Vec<_> = work.iter().map(|d| d.message.clone()).collect();
    assert_eq!(
        messages,
        [Some(WorkMessage::Run {
            task_id: EXAMPLE_TASK.into()
        })]
    );
    let again = handle_sweep(&stack.app).await.expect("a sweep");
    assert_eq!(again["runs"], 0, "re-armed: {again}");
}
