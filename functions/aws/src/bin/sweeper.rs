//! `sweeper` Lambda, on an EventBridge schedule: re-enqueues the work of tasks whose message
//! was lost (stored but never enqueued, lease expired unrenewed, first webhook never sent).

use lambda_runtime::{LambdaEvent, run, service_fn};
use tasklane_aws::lambda::{Function, handle_sweep};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let f = Function::from_env().await;
    run(service_fn(|_event: LambdaEvent<serde_json::Value>| {
        let f = f.clone();
        async move { handle_sweep(&f.app).await }
    }))
    .await
}
