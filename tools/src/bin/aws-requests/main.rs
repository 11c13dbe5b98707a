//! `aws-requests`: prints how many AWS requests each API operation makes, counted on the wire
//! by an SDK interceptor while each operation runs once against the emulator (or account)
//! that the environment points at (`AWS_ENDPOINT_URL`, region, credentials). It provisions its
//! own table, queues and bucket there (`tasklane_testkit::provision`):
//!
//! ```text
//! AWS_ENDPOINT_URL=http://127.0.0.1:5000 cargo run -p tasklane-tools --bin aws-requests
//! ```
//!
//! With `--cost` it runs an `echo` and a `veo3` 5 s lifecycle instead and prices them in
//! dollars per million tasks (`cost.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use aws_smithy_runtime_api::client::interceptors::SharedInterceptor;
use bytes::Bytes;
use clap::Parser;
use http::{Method, Request};
use serde_json::{Value, json};
use tasklane_aws::AwsBackends;
use tasklane_core::account::Account;
use tasklane_core::api::Api;
use tasklane_core::ports::{MessageSource, TaskStore};
use tasklane_core::processor::Processor;
use tasklane_testkit::provision;

use crate::metrics::RequestCounter;

mod cost;
mod metrics;

/// Prints how many AWS requests each API operation makes.
///
/// Each operation runs once against the emulator (or account) the environment points at
/// (`AWS_ENDPOINT_URL`, region, credentials), and its requests are counted on the wire. It
/// provisions its own table, queues and bucket there.
#[derive(Debug, Parser)]
#[command(name = "aws-requests")]
struct Args {
    /// Instead of the per-operation table, run an `echo` and a `veo3` 5 s lifecycle and print
    /// their cost in dollars per million tasks at AWS list prices (us-east-1).
    #[arg(long)]
    cost: bool,
}

struct Bench {
    api: Api,
    processor: Processor,
    counter: RequestCounter,
    /// An uncounted view of the queue: on Lambda the event source mapping receives and deletes.
    source: tasklane_aws::sqs::SqsQueue,
    key: String,
    rows: Vec<(String, BTreeMap<String, u64>)>,
    /// Milliseconds spent in `Processor::handle` by [`Bench::drain`] (the processor's Lambda
    /// duration, without the uncounted receives).
    processor_ms: f64,
}

impl Bench {
    async fn call(
        &mut self,
        what: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Value {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {}", self.key));
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        self.counter.take();
        let resp = self.api.handle(req.body(body).expect("request")).await;
        self.rows.push((
            format!("{what} → {}", resp.status().as_u16()),
            self.counter.take(),
        ));
        serde_json::from_slice(resp.body()).unwrap_or(Value::Null)
    }

    /// Runs every queued message through the processor, counting each kind separately.
    async fn drain(&mut self, what: &str) {
        let mut total = BTreeMap::new();
        let mut handled = 0;
        for _ in 0..20 {
            let batch = self
                .source
                .receive(10, Duration::from_secs(300))
                .await
                .expect("receive");
            if batch.is_empty() {
                break;
            }
            for d in batch {
                let msg = d.message.clone().expect("a work message");
                self.counter.take();
                let start = std::time::Instant::now();
                self.processor.handle(&msg).await.expect("processed");
                self.processor_ms += start.elapsed().as_secs_f64() * 1000.0;
                for (k, v) in self.counter.take() {
                    *total.entry(k).or_insert(0) += v;
                }
                handled += 1;
                self.source.ack(&d).await.expect("ack");
            }
        }
        self.rows
            .push((format!("{what} ({handled} message(s))"), total));
    }
}

async fn receiver() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = vec![0u8; 65536];
            let _ = sock.read(&mut buf).await;
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        }
    });
    format!("http://{addr}/hook")
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let prefix = format!("req{}", std::process::id());
    let mut settings = provision::provision(&config, &prefix)
        .await
        .expect("provisioning");
    settings.core.callback_allow_private = true;
    settings.core.rate_limit = None;
    let counter = RequestCounter::default();
    let backends =
        AwsBackends::connect_intercepted(&settings, Some(SharedInterceptor::new(counter.clone())))
            .await;
    let plain = AwsBackends::connect(&settings).await;
    let app = backends.app(settings.core.clone());
    let new = Account::create(1_000_000, None);
    plain
        .store
        .create_account(&new.account)
        .await
        .expect("account");
    let mut b = Bench {
        api: Api::new(app.clone()),
        processor: Processor::new(app),
        counter,
        source: plain.queue.clone(),
        key: new.api_key,
        rows: Vec::new(),
        processor_ms: 0.0,
    };
    if args.cost {
        cost::run(&mut b).await;
        return;
    }

    b.call("GET /v1/account", Method::GET, "/v1/account", None, &[])
        .await;
    let t = b
        .call(
            "POST /v1/tasks (echo)",
            Method::POST,
            "/v1/tasks",
            Some(json!({"model": "echo", "prompt": "hi"})),
            &[],
        )
        .await;
    let id = t["task_id"].as_str().unwrap_or_default().to_string();
    b.call(
        "GET /v1/tasks/{id} (queued)",
        Method::GET,
        &format!("/v1/tasks/{id}"),
        None,
        &[],
    )
    .await;
    b.drain("processor: run echo").await;
    b.call(
        "GET /v1/tasks/{id} (completed, 1 output)",
        Method::GET,
        &format!("/v1/tasks/{id}"),
        None,
        &[],
    )
    .await;
    let body = json!({"model": "echo", "prompt": "idem"});
    b.call(
        "POST /v1/tasks with Idempotency-Key (new)",
        Method::POST,
        "/v1/tasks",
        Some(body.clone()),
        &[("idempotency-key", "k1")],
    )
    .await;
    b.call(
        "POST /v1/tasks with Idempotency-Key (replay)",
        Method::POST,
        "/v1/tasks",
        Some(body),
        &[("idempotency-key", "k1")],
    )
    .await;
    let q = b
        .call(
            "POST /v1/tasks (veo3, 5 s)",
            Method::POST,
            "/v1/tasks",
            Some(json!({"model": "veo3", "prompt": "a cat", "duration": 5})),
            &[],
        )
        .await;
    let qid = q["task_id"].as_str().unwrap_or_default().to_string();
    b.call(
        "POST /v1/tasks/{id}/cancel (queued)",
        Method::POST,
        &format!("/v1/tasks/{qid}/cancel"),
        None,
        &[],
    )
    .await;
    b.call(
        "POST /v1/tasks/{id}/cancel (again)",
        Method::POST,
        &format!("/v1/tasks/{qid}/cancel"),
        None,
        &[],
    )
    .await;
    b.drain("processor: run of a cancelled task + leftovers")
        .await;
    b.call(
        "POST /v1/tasks (veo3, 5 s)",
        Method::POST,
        "/v1/tasks",
        Some(json!({"model": "veo3", "prompt": "a dog", "duration": 5})),
        &[],
    )
    .await;
    b.drain("processor: run veo3 5 s (progress updates)").await;
    for i in 0..20 {
        b.call(
            "(filler)",
            Method::POST,
            "/v1/tasks",
            Some(json!({"model": "echo", "prompt": format!("{i}")})),
            &[],
        )
        .await;
    }
    b.rows.retain(|(w, _)| !w.starts_with("(filler)"));
    b.call(
        "GET /v1/tasks?limit=20 (25 tasks exist)",
        Method::GET,
        "/v1/tasks?limit=20",
        None,
        &[],
    )
    .await;
    b.call(
        "GET /v1/tasks?status=completed&limit=5",
        Method::GET,
        "/v1/tasks?status=completed&limit=5",
        None,
        &[],
    )
    .await;
    b.drain("processor: run 20 echo tasks").await;
    let hook = receiver().await;
    b.call(
        "POST /v1/tasks with callback_url",
        Method::POST,
        "/v1/tasks",
        Some(json!({"model": "echo", "prompt": "cb", "callback_url": hook})),
        &[],
    )
    .await;
    b.drain("processor: run echo + deliver its webhook").await;
    b.call(
        "POST /v1/tasks/sync (timeout 0: answers 202 at once)",
        Method::POST,
        "/v1/tasks/sync",
        Some(json!({"model": "echo", "prompt": "s", "timeout": 0})),
        &[],
    )
    .await;
    b.drain("processor: run echo").await;
    b.call(
        "GET /v1/tasks/nope (404)",
        Method::GET,
        "/v1/tasks/nope",
        None,
        &[],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;

    println!("| operation | AWS requests | by API call |");
    println!("|---|---:|---|");
    for (what, counts) in &b.rows {
        let total: u64 = counts.values().sum();
        let detail: Vec<String> = counts.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
        println!("| {what} | {total} | {} |", detail.join(", "));
    }
}
