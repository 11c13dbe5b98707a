//! The documented lifecycle over real HTTP against the local server.

mod common;

use common::Server;
use serde_json::json;

#[tokio::test]
async fn the_documented_flow_submits_polls_and_downloads_a_gif() {
    let s = Server::start().await;
    let before = s.credits().await;
    let task = s
        .submit(json!({"model": "veo3", "action": "generate", "prompt": "A cat walking on the beach", "duration": 5}))
        .await;
    let id = task["task_id"].as_str().unwrap();
    assert!(id.starts_with("task_"));
    assert_eq!(task["status"], "queued");
    assert_eq!(task["cost"]["credits"], 50);
    assert_eq!(s.credits().await, before - 50);
    let done = s.wait_terminal(id, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["progress"], 100);
    let out = &done["result"]["outputs"][0];
    assert_eq!(out["content_type"], "image/gif");
    let bytes = reqwest::get(out["url"].as_str().unwrap())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&bytes[..6], b"GIF89a");
    assert_eq!(bytes.len() as u64, out["size_bytes"].as_u64().unwrap());
    s.stop().await;
}

/// Counts the progress writes made.
#[derive(Default)]
struct ProgressWrites {
    writes: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl tasklane_testkit::intercept::Interceptor for ProgressWrites {
    async fn before(
        &self,
        _op: tasklane_testkit::intercept::Op,
    ) -> tasklane_core::ports::PortResult<()> {
        Ok(())
    }

    fn after_update(
        &self,
        t: &tasklane_core::task::Transition,
        r: &tasklane_core::ports::PortResult<tasklane_core::task::Task>,
    ) {
        if r.is_ok() && matches!(t, tasklane_core::task::Transition::Progress { .. }) {
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

#[tokio::test]
async fn a_running_task_writes_its_progress_at_most_once_a_second() {
    // Each progress write is a DynamoDB write unit: the demo veo3 reports every 2.5%, 40 times
    // over its run, and only one report a second is written (renewing the lease with it).
    let counter = std::sync::Arc::new(ProgressWrites::default());
    let s = Server::start_with(
        |c| c.demo_time_scale = 2.0,
        tasklane_testkit::intercept::hooks(counter.clone()),
    )
    .await;
    let task = s
        .submit(json!({"model": "veo3", "prompt": "A slow pan over the sea", "duration": 4}))
        .await;
    let done = s.wait_terminal(task["task_id"].as_str().unwrap(), 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    // The task's own times (the hook sees the last write only after the API may).
    let at = |field: &str| -> chrono::DateTime<chrono::Utc> {
        done[field].as_str().expect(field).parse().expect(field)
    };
    let ran = (at("completed_at") - at("started_at"))
        .to_std()
        .expect("completed after it started");
    let writes = counter.writes.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        writes >= 1,
        "a task running {ran:?} renewed its lease: {writes} progress writes"
    );
    assert!(
        writes as f64 <= ran.as_secs_f64().ceil(),
        "{writes} progress writes in {ran:?}"
    );
    s.stop().await;
}
