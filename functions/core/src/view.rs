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
    /// Signed, expiring URL; `None` once the output is no longer stored (`expired`).
    pub url: Option<String>,
    /// The deployment's result retention has passed: the output is (or may any moment be)
    /// deleted, so no URL is handed out ([`crate::result_urls::retention`]).
    pub expired: bool,
    /// MIME type.
    pub content_type: String,
    /// Size.
    pub size_bytes: u64,
    /// When `url` stops working (never after the output's retention ends); when `expired`,
    /// when the retention ended.
    #[serde(serialize_with = "rfc3339_req")]
    pub expires_at: DateTime<Utc>,
}

/// The first moment `task`'s outputs may be deleted under a retention of `retention`: S3's
/// lifecycle rule expires an object `retention` after its creation (rounded up to the next
/// midnight UTC, <https://docs.aws.amazon.com/AmazonS3/latest/userguide/lifecycle-expire-general-considerations.html>),
/// and outputs are created after the task started (its creation when it never started).
pub fn outputs_kept_until(task: &Task, retention: Duration) -> Option<DateTime<Utc>> {
    let from = task.started_at.unwrap_or(task.created_at);
    Some(from + chrono::Duration::from_std(retention).ok()?)
}

/// The view of output `o` of `task` at `now`: a URL for at most `ttl`, ending no later than
/// the retention ([`outputs_kept_until`]); none, `expired`, once that has passed.
async fn output_view(
    task: &Task,
    o: &crate::task::Output,
    blobs: &dyn BlobStore,
    ttl: Duration,
    retention: Option<Duration>,
    now: DateTime<Utc>,
) -> PortResult<OutputView> {
    let kept_until = retention.and_then(|r| outputs_kept_until(task, r));
    let ttl = match kept_until {
        Some(end) if end <= now => {
            return Ok(OutputView {
                url: None,
                expired: true,
                content_type: o.content_type.clone(),
                size_bytes: o.size_bytes,
                expires_at: end,
            });
        }
        Some(end) => ttl.min((end - now).to_std().unwrap_or_default()),
        None => ttl,
    };
    let signed = blobs.presign_get(&o.key, ttl).await?;
    Ok(OutputView {
        url: Some(signed.url),
        expired: false,
        content_type: o.content_type.clone(),
        size_bytes: o.size_bytes,
        expires_at: signed.expires_at,
    })
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
    /// When the next attempt is due, while a retry is scheduled.
    #[serde(serialize_with = "rfc3339_opt")]
    pub next_attempt_at: Option<DateTime<Utc>>,
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
            next_attempt_at: c.next_attempt_at,
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

/// Builds the client view of `task`, signing each output URL for `ttl` (at most until the
/// deployment's result retention ends, after which an output is `expired`, without URL).
pub async fn task_view(task: &Task, blobs: &dyn BlobStore, ttl: Duration) -> PortResult<TaskView> {
    let result = if task.status == TaskStatus::Completed {
        let mut outputs = Vec::with_capacity(task.outputs.len());
        let (retention, now) = (crate::result_urls::retention(), Utc::now());
        for o in &task.outputs {
            outputs.push(output_view(task, o, blobs, ttl, retention, now).await?);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::{ChunkSource, SignedUrl, StreamRefused};
    use crate::task::Output;
    use bytes::Bytes;

    /// Signs `https://files/{key}` for exactly the TTL asked.
    struct Urls;

    #[async_trait::async_trait]
    impl BlobStore for Urls {
        async fn put(&self, _: &str, _: Bytes, _: &str) -> PortResult<()> {
            Ok(())
        }
        async fn put_stream(
            &self,
            _: &str,
            _: &str,
            _: &mut dyn ChunkSource,
            _: u64,
        ) -> PortResult<Result<u64, StreamRefused>> {
            Ok(Ok(0))
        }
        async fn presign_get(&self, key: &str, ttl: Duration) -> PortResult<SignedUrl> {
            Ok(SignedUrl {
                url: format!("https://files/{key}"),
                expires_at: Utc::now() + chrono::Duration::from_std(ttl).unwrap(),
            })
        }
    }

    #[tokio::test]
    async fn an_output_past_its_retention_is_expired_without_url_and_urls_end_with_it() {
        let mut task = crate::task::tests::sample(TaskStatus::Completed);
        let now = Utc::now();
        task.started_at = Some(now - chrono::Duration::days(7) + chrono::Duration::minutes(10));
        let o = Output {
            key: "tasks/t/output-0.gif".into(),
            content_type: "image/gif".into(),
            size_bytes: 3,
        };
        let retention = Duration::from_secs(7 * 86_400);
        let week = Some(retention);
        let hour = Duration::from_secs(3600);
        // Ten minutes of retention left: the URL ends with it, not an hour from now.
        let v = output_view(&task, &o, &Urls, hour, week, now)
            .await
            .unwrap();
        assert!(!v.expired);
        assert_eq!(v.url.as_deref(), Some("https://files/tasks/t/output-0.gif"));
        assert!(v.expires_at <= now + chrono::Duration::minutes(11), "{v:?}");
        assert!(v.expires_at >= now + chrono::Duration::minutes(9), "{v:?}");
        // Past it: expired, no URL, and when it ended.
        let later = now + chrono::Duration::minutes(10);
        let v = output_view(&task, &o, &Urls, hour, week, later)
            .await
            .unwrap();
        assert!(v.expired);
        assert_eq!(v.url, None);
        assert_eq!(v.expires_at, outputs_kept_until(&task, retention).unwrap());
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["url"], serde_json::Value::Null);
        assert_eq!(json["expired"], true);
        // No retention configured: URLs for the whole TTL, never expired.
        let v = output_view(&task, &o, &Urls, hour, None, later)
            .await
            .unwrap();
        assert!(!v.expired && v.url.is_some());
        assert!(v.expires_at >= Utc::now() + chrono::Duration::minutes(59));
    }
}
