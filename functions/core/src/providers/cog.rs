//! Cog: the HTTP prediction API of a Cog model server (coglet), how teams package their own
//! models (<https://github.com/replicate/cog/blob/main/docs/http.md>).
//!
//! - **Start**: `PUT /predictions/{task_id}` with `Prefer: respond-async`, the input, and
//!   tasklane's callback as `webhook` (events `start`, `logs`, `output`, `completed`). The task
//!   id names the prediction, so a start re-sent after a crash returns the running prediction
//!   instead of starting a second one.
//! - **Check**: Cog has no way to read a prediction (`GET` answers 405). Re-sending the same PUT
//!   answers the prediction's current state (with its `input`) while it runs; a changed body is
//!   ignored. Once a prediction has finished, Cog forgets it, and the same PUT starts it anew,
//!   answering only `{"id", "status": "starting"}`: such a check reports
//!   [`UpstreamState::Restarted`]. Its result existed only in the callback, which was lost, so
//!   tasklane lets the new run go on (the client still gets the output it paid for) once, and
//!   fails the task with a refund if that result is lost too ([`crate::upstream::MAX_RESTARTS`]).
//! - **Callbacks** carry the whole prediction (`id`, `status`, `logs`, `output`, `error`); they
//!   are authenticated by the per-task token in the URL (Cog signs nothing).
//! - **Capacity**: a server whose slots are all busy answers 409: the task waits, queued.
//! - **Outputs**: `data:` URIs (or URLs, with `--upload-url`), copied into the blob store.
//! - **Progress**: the last `NN%` in the logs (what tqdm and most predictors print).

use async_trait::async_trait;
use base64::Engine;
use serde_json::{Value, json};

use super::UpstreamSettings;
use crate::ports::{CallbackRequest, Job, Upstream, UpstreamError, UpstreamReport, UpstreamState};

/// A Cog model server.
#[derive(Debug, Clone)]
pub struct Cog {
    base: url::Url,
    client: reqwest::Client,
}

/// How many times a cancel is sent while Cog still knows the prediction, and how far apart.
const CANCEL_ROUNDS: u32 = 4;
const CANCEL_SPACING: std::time::Duration = std::time::Duration::from_millis(250);

/// The events tasklane asks Cog to report.
const EVENTS: [&str; 4] = ["start", "logs", "output", "completed"];

impl Cog {
    /// A Cog server at `settings.endpoint` (required); `Err` names the field.
    pub fn new(settings: &UpstreamSettings) -> Result<Cog, (String, String)> {
        let base = settings.endpoint.clone().ok_or_else(|| {
            (
                "endpoint".to_string(),
                "a cog model needs the model server's base URL, e.g. http://127.0.0.1:5000"
                    .to_string(),
            )
        })?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err((
                "endpoint".to_string(),
                "must be an http or https URL".to_string(),
            ));
        }
        let client =
            super::api_client(settings.request_timeout).map_err(|e| ("endpoint".to_string(), e))?;
        Ok(Cog { base, client })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base.as_str().trim_end_matches('/'))
    }

    /// The prediction request: the prompt, duration and params as Cog inputs.
    fn body(job: &Job<'_>, callback: &str) -> Value {
        let input = job.inputs();
        json!({
            "id": job.task_id,
            "input": input,
            "webhook": callback,
            "webhook_events_filter": EVENTS,
        })
    }

    /// Sends the prediction's PUT: the start, and every check.
    async fn put(&self, job: &Job<'_>, callback: &str) -> Result<(u16, Value), UpstreamError> {
        // Status codes seen on coglet 0.23.1: 202 for a start and for a known prediction,
        // 409 `{"error": "At capacity - all prediction slots busy"}` when every slot is busy
        // (a known id is still answered), 422 when the body's id differs from the path's.
        let resp = self
            .client
            .put(self.url(&format!("predictions/{}", job.task_id)))
            .header("prefer", "respond-async")
            .json(&Self::body(job, callback))
            .send()
            .await
            .map_err(unreachable)?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        match status {
            200..=299 => Ok((status, body)),
            409 => Err(UpstreamError::Busy { retry_after: None }),
            400..=499 => Err(UpstreamError::Refused(format!(
                "the model server refused the input: {}",
                error_text(&body)
            ))),
            _ => Err(UpstreamError::Unavailable(format!(
                "the model server answered {status}: {}",
                error_text(&body)
            ))),
        }
    }
}

fn unreachable(e: reqwest::Error) -> UpstreamError {
    super::unreachable("the model server", &e)
}

/// The message of an error body: Cog's `error`, or its 422 `detail` list.
fn error_text(body: &Value) -> String {
    if let Some(e) = body.get("error").and_then(Value::as_str) {
        return e.to_string();
    }
    if let Some(details) = body.get("detail").and_then(Value::as_array) {
        let parts: Vec<String> = details
            .iter()
            .map(|d| {
                let field = d
                    .get("loc")
                    .and_then(Value::as_array)
                    .and_then(|l| l.last())
                    .map(|f| f.to_string().trim_matches('"').to_string())
                    .unwrap_or_default();
                let msg = d.get("msg").and_then(Value::as_str).unwrap_or("invalid");
                format!("{field}: {msg}")
            })
            .collect();
        return parts.join("; ");
    }
    "no details".into()
}

/// The last percentage (`NN%`, at most 100) in `logs`, as progress (capped at 99).
pub fn progress_in(logs: &str) -> Option<u8> {
    let b = logs.as_bytes();
    let mut i = b.len();
    while let Some(pos) = logs[..i].rfind('%') {
        let digits = b[..pos]
            .iter()
            .rev()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if (1..=3).contains(&digits)
            && let Ok(n) = logs[pos - digits..pos].parse::<u32>()
            && n <= 100
        {
            return Some(n.min(99) as u8);
        }
        i = pos;
    }
    None
}

/// The outputs of a finished prediction: every `data:` URI or URL in it; other values (text,
/// numbers, objects) become one JSON or text output.
fn outputs_of(output: &Value) -> Vec<String> {
    let as_uri =
        |s: &str| s.starts_with("data:") || s.starts_with("http://") || s.starts_with("https://");
    let inline = |v: &Value| {
        let (mime, bytes) = match v {
            Value::String(s) => ("text/plain", s.clone().into_bytes()),
            other => ("application/json", other.to_string().into_bytes()),
        };
        format!(
            "data:{mime};base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    };
    match output {
        Value::Null => Vec::new(),
        Value::String(s) if as_uri(s) => vec![s.clone()],
        Value::Array(items) if items.iter().all(|i| i.as_str().is_some_and(as_uri)) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_string))
            .collect(),
        other => vec![inline(other)],
    }
}

/// What a prediction object (a PUT's answer or a webhook's body) says.
fn state_of(p: &Value) -> Result<UpstreamState, String> {
    let status = p
        .get("status")
        .and_then(Value::as_str)
        .ok_or("a prediction without a status")?;
    let logs = p.get("logs").and_then(Value::as_str).map(str::to_string);
    Ok(match status {
        "starting" | "processing" => UpstreamState::Running {
            progress: logs.as_deref().and_then(progress_in),
            logs,
        },
        "succeeded" => UpstreamState::Succeeded {
            outputs: outputs_of(p.get("output").unwrap_or(&Value::Null)),
            logs,
        },
        "failed" => UpstreamState::Failed {
            message: p
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("the prediction failed")
                .to_string(),
            logs,
        },
        "canceled" | "cancelled" => UpstreamState::Canceled,
        other => return Err(format!("unknown prediction status {other:?}")),
    })
}

#[async_trait]
impl Upstream for Cog {
    fn provider(&self) -> &'static str {
        "cog"
    }

    async fn start(&self, job: Job<'_>, callback: &str) -> Result<String, UpstreamError> {
        self.put(&job, callback).await?;
        Ok(job.task_id.to_string())
    }

    async fn check(
        &self,
        job: Job<'_>,
        _id: &str,
        callback: &str,
    ) -> Result<UpstreamState, UpstreamError> {
        let (_, body) = self.put(&job, callback).await?;
        // A PUT of a known prediction answers its state, input included; one that started a
        // prediction answers only `{"id", "status": "starting"}` (both with 202 on coglet
        // 0.23.1; older servers answered 200 for the first).
        if body.get("input").is_none() {
            return Ok(UpstreamState::Restarted);
        }
        state_of(&body).map_err(UpstreamError::Unavailable)
    }

    async fn cancel(&self, id: &str) -> Result<(), UpstreamError> {
        // coglet 0.23.1 answers 200 to a cancel that arrives before the predictor's code runs
        // and then forgets it: send it again until Cog no longer knows the prediction (404),
        // a few times.
        for round in 0..CANCEL_ROUNDS {
            if round > 0 {
                tokio::time::sleep(CANCEL_SPACING).await;
            }
            let resp = self
                .client
                .post(self.url(&format!("predictions/{id}/cancel")))
                .send()
                .await
                .map_err(unreachable)?;
            match resp.status().as_u16() {
                // Finished (or cancelled) and forgotten: nothing left to stop.
                404 => return Ok(()),
                200..=299 => {}
                s => return Err(UpstreamError::Unavailable(format!("cancel answered {s}"))),
            }
        }
        Ok(())
    }

    fn read_callback(&self, req: CallbackRequest<'_>) -> Result<UpstreamReport, String> {
        let p: Value =
            serde_json::from_slice(req.body).map_err(|_| "the body is not JSON".to_string())?;
        let id = p
            .get("id")
            .and_then(Value::as_str)
            .ok_or("a prediction without an id")?
            .to_string();
        Ok(UpstreamReport {
            id,
            state: state_of(&p)?,
        })
    }

    fn callback_is_authoritative(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_the_last_percentage_in_the_logs() {
        assert_eq!(progress_in("progress: 10%\nprogress: 40%\n"), Some(40));
        assert_eq!(progress_in(" 73%|███▎ | 73/100"), Some(73));
        assert_eq!(progress_in("done 100%"), Some(99));
        assert_eq!(progress_in("no numbers %"), None);
        assert_eq!(progress_in("1234% then 5%"), Some(5));
        assert_eq!(progress_in("5% then 1234%"), Some(5));
        assert_eq!(progress_in(""), None);
    }

    #[test]
    fn predictions_map_to_states() {
        let ok = json!({"id": "t", "status": "succeeded", "output": "data:image/gif;base64,R0lG", "logs": "50%"});
        assert_eq!(
            state_of(&ok).unwrap(),
            UpstreamState::Succeeded {
                outputs: vec!["data:image/gif;base64,R0lG".into()],
                logs: Some("50%".into())
            }
        );
        let failed = json!({"status": "failed", "error": "boom"});
        assert!(
            matches!(state_of(&failed).unwrap(), UpstreamState::Failed { message, .. } if message == "boom")
        );
        assert_eq!(
            state_of(&json!({"status": "canceled"})).unwrap(),
            UpstreamState::Canceled
        );
        assert!(state_of(&json!({"status": "weird"})).is_err());
        let running = json!({"status": "processing", "logs": "progress: 30%\n"});
        assert_eq!(
            state_of(&running).unwrap(),
            UpstreamState::Running {
                progress: Some(30),
                logs: Some("progress: 30%\n".into())
            }
        );
    }

    #[test]
    fn text_and_json_outputs_become_files() {
        let text = outputs_of(&json!("hello"));
        assert_eq!(text, vec!["data:text/plain;base64,aGVsbG8=".to_string()]);
        let list = outputs_of(&json!(["https://a/1.png", "data:,x"]));
        assert_eq!(list.len(), 2);
        let obj = outputs_of(&json!({"score": 1}));
        assert!(obj[0].starts_with("data:application/json;base64,"));
        assert!(outputs_of(&Value::Null).is_empty());
    }

    #[test]
    fn error_bodies_are_summarized() {
        assert_eq!(
            error_text(
                &json!({"error": "At capacity - all prediction slots busy", "status": "failed"})
            ),
            "At capacity - all prediction slots busy"
        );
        assert_eq!(
            error_text(
                &json!({"detail": [{"loc": ["body", "input", "duration"], "msg": "must be <= 8", "type": "value_error"}]})
            ),
            "duration: must be <= 8"
        );
    }
}
