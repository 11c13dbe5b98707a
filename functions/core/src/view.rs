//! The task object of `openapi.yaml` (`Task`), built from a stored task with freshly signed
//! result URLs.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::ports::{BlobStore, PortResult};
use crate::task::{Callback, CallbackState, Cost, Task, TaskFailure, TaskStatus};

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn rfc3339_opt<S: serde::Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339(*t)),
        None => s.serialize_none(),
    }
}

fn rfc3339_req<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

/// The task as clients see it.
#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    /// Id.
    pub task_id: String,
    /// Model.
    pub model: String,
    /// Action.
    pub action: String,
    /// State.
    pub status: TaskStatus,
    /// 0..=100.
    pub progress: u8,
    /// What was asked.
    pub input: InputView,
    /// Outputs with signed URLs, when completed.
    pub result: Option<ResultView>,
    /// Failure, when failed.
    pub error: Option<TaskFailure>,
    /// Credits.
    pub cost: Cost,
    /// Webhook delivery state.
    pub callback: Option<CallbackView>,
    /// Client metadata.
    pub metadata: BTreeMap<String, String>,
    /// Submit time.
    #[serde(serialize_with = "rfc3339_req")]
    pub created_at: DateTime<Utc>,
    /// First pickup.
    #[serde(serialize_with = "rfc3339_opt")]
    pub started_at: Option<DateTime<Utc>>,
    /// Terminal time.
    #[serde(serialize_with = "rfc3339_opt")]
    pub completed_at: Option<DateTime<Utc>>,
    /// The end of the model's log (at most 4 KiB), for models served by an upstream that
    /// gives one; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs: Option<String>,
    /// On a sync answer that timed out: where to keep polling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_url: Option<String>,
}

/// `input` of the task object.
#[derive(Debug, Clone, Serialize)]
pub struct InputView {
    /// Prompt.
    pub prompt: Option<String>,
    /// Duration.
    pub duration: Option<u32>,
    /// Params.
    pub params: Map<String, Value>,
}

/// `result` of the task object.
#[derive(Debug, Clone, Serialize)]
pub struct ResultView {
    /// Outputs.
    pub outputs: Vec<OutputView>,
}

/// One output with a signed URL.
#[derive(Debug, Clone, Serialize)]
pub struct OutputView {
    /// Signed, expiring URL.
    pub url: String,
    /// MIME type.
    pub content_type: String,
    /// Size.
    pub size_bytes: u64,
    /// When `url` stops working.
    #[serde(serialize_with = "rfc3339_req")]
    pub expires_at: DateTime<Utc>,
}

/// `callback` of the task object.
#[derive(Debug, Clone, Serialize)]
pub struct CallbackView {
    /// Target.
    pub url: String,
    /// Delivery state.
    pub state: CallbackState,
    /// Attempts so far.
    pub attempts: u32,
    /// Status of the last answer.
    pub last_status_code: Option<u16>,
    /// The most recent attempts, oldest first.
    pub deliveries: Vec<DeliveryView>,
}

/// One delivery attempt in the task object.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryView {
    /// When.
    #[serde(serialize_with = "rfc3339_req")]
    pub at: DateTime<Utc>,
    /// The receiver's status, if it answered.
    pub status_code: Option<u16>,
    /// Why there was no answer.
    pub error: Option<String>,
}

impl From<&Callback> for CallbackView {
    fn from(c: &Callback) -> Self {
        CallbackView {
            url: c.url.clone(),
            state: c.state,
            attempts: c.attempts,
            last_status_code: c.last_status_code,
            deliveries: c
                .deliveries
                .iter()
                .map(|d| DeliveryView {
                    at: d.at,
                    status_code: d.status_code,
                    error: d.error.clone(),
                })
                .collect(),
        }
    }
}

/// Builds the client view of `task`, signing each output URL for `ttl`.
pub async fn task_view(task: &Task, blobs: &dyn BlobStore, ttl: Duration) -> PortResult<TaskView> {
    let result = if task.status == TaskStatus::Completed {
        let mut outputs = Vec::with_capacity(task.outputs.len());
        for o in &task.outputs {
            let signed = blobs.presign_get(&o.key, ttl).await?;
            outputs.push(OutputView {
                url: signed.url,
                content_type: o.content_type.clone(),
                size_bytes: o.size_bytes,
                expires_at: signed.expires_at,
            });
        }
        Some(ResultView { outputs })
    } else {
        None
    };
    Ok(TaskView {
        task_id: task.id.clone(),
        model: task.model.clone(),
        action: task.action.clone(),
        status: task.status,
        progress: task.progress,
        input: InputView {
            prompt: task.input.prompt.clone(),
            duration: task.input.duration,
            params: task.input.params.clone(),
        },
        result,
        error: task.error.clone(),
        cost: task.cost,
        callback: task.callback.as_ref().map(CallbackView::from),
        metadata: task.metadata.clone(),
        created_at: task.created_at,
        started_at: task.started_at,
        completed_at: task.completed_at,
        poll_url: None,
        logs: task
            .upstream
            .as_ref()
            .map(|u| u.logs.clone())
            .filter(|l| !l.is_empty()),
    })
}
