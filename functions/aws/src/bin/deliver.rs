//! `deliver` Lambda: SQS webhook delivery messages through the core's processor, reporting
//! partial batch failures; apart from the processor, so that slow receivers never hold it.

use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{LambdaEvent, run, service_fn};
use tasklane_aws::lambda::{Function, handle_sqs};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let f = Function::from_env().await;
    run(service_fn(|event: LambdaEvent<SqsEvent>| {
        let f = f.clone();
        async move {
            Ok::<_, lambda_runtime::Error>(
                handle_sqs(&f.processor, &f.deliveries, event.payload).await,
            )
        }
    }))
    .await
}
