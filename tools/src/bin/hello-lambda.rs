//! `tasklane-hello-lambda`: the smallest Lambda function on `lambda_runtime` (it echoes its
//! event), the baseline `tasklane-cold-start` compares tasklane's functions with. Built with
//! the same profile, it shows what the runtime crate and a Rust binary cost at start-up by
//! themselves.

use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    run(service_fn(|event: LambdaEvent<Value>| async move {
        Ok::<Value, Error>(event.payload)
    }))
    .await
}
