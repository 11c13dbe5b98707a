//! Creates the resources `template.yaml` declares — table (with `GSI1`, `GSI2` and TTL), work queue
//! with its dead-letter queue, results bucket — on an AWS emulator, for tests and local trials.
//! Real deployments use the SAM template.

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType, TimeToLiveSpecification,
};
use aws_sdk_sqs::types::QueueAttributeName;

use tasklane_aws::AwsSettings;
use tasklane_aws::dynamo::{GSI1, GSI2};

/// Receives before a work message moves to the dead-letter queue (as in template.yaml).
pub const MAX_RECEIVE_COUNT: u32 = 5;

/// Creates a table, queue pair and bucket named after `prefix` and returns settings naming
/// them (core settings at their defaults).
pub async fn provision(
    config: &aws_config::SdkConfig,
    prefix: &str,
) -> anyhow::Result<AwsSettings> {
    let ddb = aws_sdk_dynamodb::Client::new(config);
    let table = format!("{prefix}-tasks");
    let attr = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
    };
    let key = |name: &str, t: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(t)
            .build()
    };
    ddb.create_table()
        .table_name(&table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr("PK")?)
        .attribute_definitions(attr("SK")?)
        .attribute_definitions(attr("GSI1PK")?)
        .attribute_definitions(attr("GSI1SK")?)
        .attribute_definitions(attr("GSI2PK")?)
        .attribute_definitions(attr("GSI2SK")?)
        .key_schema(key("PK", KeyType::Hash)?)
        .key_schema(key("SK", KeyType::Range)?)
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name(GSI1)
                .key_schema(key("GSI1PK", KeyType::Hash)?)
                .key_schema(key("GSI1SK", KeyType::Range)?)
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::Include)
                        .non_key_attributes("status")
                        .non_key_attributes("model")
                        .build(),
                )
                .build()?,
        )
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name(GSI2)
                .key_schema(key("GSI2PK", KeyType::Hash)?)
                .key_schema(key("GSI2SK", KeyType::Range)?)
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::KeysOnly)
                        .build(),
                )
                .build()?,
        )
        .send()
        .await?;
    ddb.update_time_to_live()
        .table_name(&table)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .attribute_name("expires_at")
                .enabled(true)
                .build()?,
        )
        .send()
        .await?;

    let sqs = aws_sdk_sqs::Client::new(config);
    let dlq_url = sqs
        .create_queue()
        .queue_name(format!("{prefix}-work-dlq"))
        .send()
        .await?
        .queue_url
        .unwrap_or_default();
    let dlq_arn = sqs
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await?
        .attributes
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .unwrap_or_default();
    let redrive =
        serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": MAX_RECEIVE_COUNT})
            .to_string();
    let queue_url = sqs
        .create_queue()
        .queue_name(format!("{prefix}-work"))
        .attributes(QueueAttributeName::VisibilityTimeout, "720")
        .attributes(QueueAttributeName::RedrivePolicy, redrive.clone())
        .send()
        .await?
        .queue_url
        .unwrap_or_default();
    let delivery_queue_url = sqs
        .create_queue()
        .queue_name(format!("{prefix}-deliveries"))
        .attributes(QueueAttributeName::VisibilityTimeout, "180")
        .attributes(QueueAttributeName::RedrivePolicy, redrive)
        .send()
        .await?
        .queue_url
        .unwrap_or_default();

    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(config)
            .force_path_style(true)
            .build(),
    );
    let bucket = format!("{prefix}-results").to_lowercase();
    s3.create_bucket().bucket(&bucket).send().await?;

    Ok(AwsSettings {
        table,
        queue_url,
        delivery_queue_url: Some(delivery_queue_url),
        bucket,
        core: tasklane_core::Config::default(),
        models: None,
    })
}
