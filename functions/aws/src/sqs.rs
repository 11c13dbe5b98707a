//! The work queue on SQS: at-least-once messages, delays up to 15 minutes (longer waits are
//! chained by the processor), and a poller for running workers outside Lambda.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::MessageSystemAttributeName;
use tasklane_core::ports::{Delivery, MessageSource, PortResult, WorkMessage, WorkQueue};

use crate::dynamo::sdk_error;

/// The longest delay SQS accepts on one message.
pub const MAX_DELAY: Duration = Duration::from_secs(900);

/// One SQS queue.
#[derive(Clone, Debug)]
pub struct SqsQueue {
    client: Client,
    url: String,
}

impl SqsQueue {
    /// The queue at `url`.
    pub fn new(client: Client, url: impl Into<String>) -> Self {
        SqsQueue {
            client,
            url: url.into(),
        }
    }

    /// The queue URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Hides a received message for `delay` more (the Lambda processor's "retry later").
    pub async fn change_visibility(&self, receipt_handle: &str, delay: Duration) -> PortResult<()> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt_handle)
            .visibility_timeout(secs(delay.min(Duration::from_secs(12 * 3600))))
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs() + u64::from(d.subsec_nanos() > 0)).unwrap_or(i32::MAX)
}

#[async_trait]
impl WorkQueue for SqsQueue {
    async fn enqueue(&self, message: &WorkMessage, delay: Duration) -> PortResult<()> {
        let body =
            serde_json::to_string(message).map_err(tasklane_core::ports::PortError::internal)?;
        self.client
            .send_message()
            .queue_url(&self.url)
            .message_body(body)
            .delay_seconds(secs(delay.min(MAX_DELAY)))
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }
}

#[async_trait]
impl MessageSource for SqsQueue {
    async fn receive(&self, max: usize, visibility: Duration) -> PortResult<Vec<Delivery>> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(i32::try_from(max.clamp(1, 10)).unwrap_or(10))
            .visibility_timeout(secs(visibility))
            .wait_time_seconds(1)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(out
            .messages()
            .iter()
            .filter_map(|m| {
                Some(Delivery {
                    message: m.body().and_then(|b| serde_json::from_str(b).ok()),
                    receive_count: m
                        .attributes()
                        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(1),
                    handle: m.receipt_handle()?.to_string(),
                })
            })
            .collect())
    }

    async fn ack(&self, d: &Delivery) -> PortResult<()> {
        self.client
            .delete_message()
            .queue_url(&self.url)
            .receipt_handle(&d.handle)
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }

    async fn retry(&self, d: &Delivery, delay: Duration) -> PortResult<()> {
        self.change_visibility(&d.handle, delay).await
    }

    async fn wait_for_work(&self, _max: Duration) {
        // `receive` long-polls already.
    }
}
