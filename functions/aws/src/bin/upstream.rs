//! `upstream` Lambda: POST /v1/upstream/{provider}/{task_id}, an upstream model's callback about
//! a task's run, through the core's request handler.

use lambda_http::{run, service_fn};
use tasklane_aws::lambda::{Function, handle_http};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    let f = Function::from_env().await;
    run(service_fn(|req| {
        let f = f.clone();
        async move { handle_http(&f.api, req).await }
    }))
    .await
}
