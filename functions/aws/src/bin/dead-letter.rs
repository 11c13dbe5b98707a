//! `dead-letter` Lambda: messages the work queue gave up on (its DLQ) end their task the way
//! exhausted work ends: failed with a refund, unless a worker still holds the task's lease.

use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{LambdaEvent, run, service_fn};
use tasklane_aws::lambda::{Function, handle_dead_letters};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let f = Function::from_env().await;
    run(service_fn(|event: LambdaEvent<SqsEvent>| {
        let f = f.clone();
        async move {
            Ok::<_, lambda_runtime::Error>(handle_dead_letters(&f.processor, event.payload).await)
        }
    }))
    .await
}
