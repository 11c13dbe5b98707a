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
