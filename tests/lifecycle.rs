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

/// Counts the progress writes of the tasks it sees and when each task started and ended.
#[derive(Default)]
struct ProgressWrites {
    writes: std::sync::atomic::AtomicUsize,
    started: std::sync::Mutex<Option<std::time::Instant>>,
    ended: std::sync::Mutex<Option<std::time::Instant>>,
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
        use tasklane_core::task::Transition;
        if r.is_err() {
            return;
        }
        match t {
            Transition::Start { .. } => {
                *self.started.lock().unwrap() = Some(std::time::Instant::now());
            }
            Transition::Progress { .. } => {
                self.writes
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Transition::Complete { .. } => {
                *self.ended.lock().unwrap() = Some(std::time::Instant::now());
            }
            _ => {}
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
    let ran = {
        let started = counter.started.lock().unwrap().expect("started");
        let ended = counter.ended.lock().unwrap().expect("ended");
        ended - started
    };
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
