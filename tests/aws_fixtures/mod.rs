//! Fixtures shared by `tests/lambda_events.rs` and `tests/lambda_binaries.rs`: the events in
//! `events/`, the example account and tasks they name, and the world both suites run in —
//! resources provisioned on the AWS emulator (`AWS_ENDPOINT_URL`) with the example account.
#![allow(dead_code)]

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_sqs::types::Message;
use chrono::Utc;
use serde_json::{Map, Value, json};
use tasklane_aws::{AwsBackends, AwsSettings};
use tasklane_core::account::Account;
use tasklane_core::ports::{BlobStore, TaskStore};
use tasklane_core::task::{Cost, Output, Task, TaskInput, TaskStatus};
use tasklane_testkit::TaskBuilder;
use tasklane_testkit::provision::provision;

pub const SUBMIT: &str = include_str!("../../events/submit.json");
pub const SYNC_WAIT: &str = include_str!("../../events/sync-wait.json");
pub const STATUS: &str = include_str!("../../events/status.json");
pub const LIST: &str = include_str!("../../events/list.json");
pub const CANCEL: &str = include_str!("../../events/cancel.json");
pub const ACCOUNT: &str = include_str!("../../events/account.json");
pub const PROCESSOR: &str = include_str!("../../events/processor.json");
pub const DEAD_LETTER: &str = include_str!("../../events/dead-letter.json");
pub const SWEEPER: &str = include_str!("../../events/sweeper.json");

/// The obviously fake API key of every event (events/README.md).
pub const EXAMPLE_KEY: &str = "tl_example_key_for_events_only_000000000000000";
/// The task that status.json, cancel.json and the run message of processor.json name.
pub const EXAMPLE_TASK: &str = "task_01JZ2XQDG0EXAMP1E000000001";
/// The task that the deliver message of processor.json names.
pub const DELIVER_TASK: &str = "task_01JZ2XQDG0EXAMP1E000000002";
/// Credits the example account starts with.
pub const CREDITS: u64 = 1000;

/// One provisioned world: resources on the emulator, adapters and the example account.
pub struct World {
    pub config: SdkConfig,
    pub prefix: String,
    pub settings: AwsSettings,
    pub backends: AwsBackends,
    pub account: Account,
}

impl World {
    /// Provisions resources named `{suite}-{tag}-{ulid}` on the AWS emulator and creates the
    /// example account. Panics with `no_emulator` when `AWS_ENDPOINT_URL` is not set, so that
    /// nothing is ever provisioned on AWS itself.
    pub async fn new(suite: &str, tag: &str, no_emulator: &str) -> World {
        assert!(
            std::env::var_os("AWS_ENDPOINT_URL").is_some(),
            "{no_emulator}"
        );
        let config = aws_config::load_defaults(BehaviorVersion::latest()).await;
        let prefix = format!(
            "{suite}-{tag}-{}",
            ulid::Ulid::new().to_string().to_lowercase()
        );
        let settings = provision(&config, &prefix)
            .await
            .expect("provisioning on the AWS emulator");
        let backends = AwsBackends::connect(&settings).await;
        let new = Account::create(CREDITS, Some(EXAMPLE_KEY.to_string()));
        assert_eq!(new.api_key, EXAMPLE_KEY);
        backends
            .store
            .create_account(&new.account)
            .await
            .expect("creating the example account");
        World {
            config,
            prefix,
            settings,
            backends,
            account: new.account,
        }
    }

    pub async fn insert(&self, task: &Task) {
        self.backends
            .store
            .insert_task(task, None, u64::MAX)
            .await
            .expect("inserting a task");
    }

    pub async fn task(&self, id: &str) -> Task {
        self.backends
            .store
            .task(id)
            .await
            .expect("reading a task")
            .expect("the task exists")
    }

    pub async fn credits(&self) -> u64 {
        self.backends
            .store
            .account(&self.account.id)
            .await
            .expect("reading the account")
            .expect("the account exists")
            .credits
    }

    /// A completed `echo` task whose output (`hello`) is stored in the bucket.
    pub async fn completed_echo(&self, id: &str) -> Task {
        let key = format!("tasks/{id}/output-0.txt");
        self.backends
            .blobs
            .put(&key, "hello".into(), "text/plain; charset=utf-8")
            .await
            .expect("storing an output");
        let now = Utc::now();
        Task {
            model: "echo".into(),
            status: TaskStatus::Completed,
            progress: 100,
            input: TaskInput {
                prompt: Some("hello".into()),
                duration: None,
                params: Map::new(),
            },
            outputs: vec![Output {
                key,
                content_type: "text/plain; charset=utf-8".into(),
                size_bytes: 5,
            }],
            cost: Cost {
                credits: 1,
                refunded: false,
            },
            started_at: Some(now),
            completed_at: Some(now),
            attempts: 1,
            waiting_since: None,
            ..queued_veo3(id, &self.account.id)
        }
    }
}

/// The task submit.json creates, queued, with the given id.
pub fn queued_veo3(id: &str, account_id: &str) -> Task {
    TaskBuilder::echo(account_id)
        .id(id)
        .model("veo3")
        .prompt("A cat walking on the beach")
        .duration(5)
        .credits(50)
        .build()
}

/// A fresh, well-formed task id.
pub fn ulid_task_id() -> String {
    format!("task_{}", ulid::Ulid::new())
}

/// The records of an SQS event as Lambda's event source mapping builds them from received
/// messages, from the queue `arn`.
pub fn sqs_records(messages: &[Message], arn: &str) -> Vec<Value> {
    messages
        .iter()
        .map(|m| {
            let attributes: Map<String, Value> = m
                .attributes()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.as_str().to_string(), json!(v)))
                .collect();
            json!({
                "messageId": m.message_id(),
                "receiptHandle": m.receipt_handle(),
                "body": m.body(),
                "attributes": attributes,
                "messageAttributes": {},
                "md5OfBody": m.md5_of_body(),
                "eventSource": "aws:sqs",
                "eventSourceARN": arn,
                "awsRegion": "us-east-1"
            })
        })
        .collect()
}

/// GETs a presigned URL, expecting 200, and returns the body.
pub async fn download(url: &str) -> Vec<u8> {
    let resp = reqwest::get(url).await.expect("the presigned URL answers");
    assert_eq!(resp.status(), 200, "GET {url}");
    resp.bytes().await.expect("the object's bytes").to_vec()
}
