//! # tasklane-aws
//!
//! tasklane on AWS: the core's API and processor over DynamoDB, SQS and S3.
//!
//! - [`dynamo`]: the task store, single-table design (accounts, tasks, idempotency records, one GSI).
//! - [`sqs`]: the work queue (and a poller for workers outside Lambda).
//! - [`s3`]: the blob store, its result URLs signed by tasklane and redirected to short S3
//!   presigned GETs (the `files` function).
//! - [`settings`]: typed configuration from the environment, SDK clients built once.
//! - [`lambda`]: what every Lambda `main.rs` calls: tracing, the HTTP handler, the SQS handler.

pub mod dynamo;
pub mod lambda;
pub mod s3;
pub mod settings;
pub mod sqs;

pub use settings::{AwsBackends, AwsSettings};
