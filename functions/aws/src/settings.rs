//! Configuration of the AWS runtime, read once from the environment, and the adapters built
//! from it (SDK clients made once, outside any handler).

use std::sync::Arc;

use aws_smithy_runtime_api::client::interceptors::SharedInterceptor;
use tasklane_core::config::{ConfigError, env_required};
use tasklane_core::providers::builtin_registry;
use tasklane_core::{App, Config};

use crate::dynamo::DynamoStore;
use crate::s3::S3Blobs;
use crate::sqs::SqsQueue;

/// Settings of the AWS runtime.
#[derive(Debug, Clone)]
pub struct AwsSettings {
    /// DynamoDB table (`TASKLANE_TABLE`).
    pub table: String,
    /// SQS work queue URL (`TASKLANE_QUEUE_URL`).
    pub queue_url: String,
    /// S3 results bucket (`TASKLANE_BUCKET`).
    pub bucket: String,
    /// Core settings: defaults, then the shared `TASKLANE_*` variables.
    pub core: Config,
}

impl AwsSettings {
    /// Reads the settings; a missing or invalid variable is an error that names it.
    pub fn from_env() -> Result<Self, ConfigError> {
        let mut core = Config::default();
        core.apply_env()?;
        Ok(AwsSettings {
            table: env_required("TASKLANE_TABLE")?,
            queue_url: env_required("TASKLANE_QUEUE_URL")?,
            bucket: env_required("TASKLANE_BUCKET")?,
            core,
        })
    }
}

/// The three adapters, sharing one loaded AWS configuration.
#[derive(Clone, Debug)]
pub struct AwsBackends {
    /// Task store.
    pub store: DynamoStore,
    /// Work queue.
    pub queue: SqsQueue,
    /// Results bucket.
    pub blobs: S3Blobs,
}

impl AwsBackends {
    /// Loads the AWS configuration (region, credentials, `AWS_ENDPOINT_URL`…) and builds the
    /// clients. With a custom endpoint (an emulator), S3 uses path-style addressing.
    pub async fn connect(settings: &AwsSettings) -> Self {
        Self::connect_intercepted(settings, None).await
    }

    /// Like [`AwsBackends::connect`], with `interceptor` on every client: an SDK interceptor
    /// sees each request and answer (to count, log or trace them).
    pub async fn connect_intercepted(
        settings: &AwsSettings,
        interceptor: Option<SharedInterceptor>,
    ) -> Self {
        let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        let custom_endpoint = std::env::var_os("AWS_ENDPOINT_URL").is_some()
            || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some();
        let mut ddb = aws_sdk_dynamodb::config::Builder::from(&config);
        let mut sqs = aws_sdk_sqs::config::Builder::from(&config);
        let mut s3 = aws_sdk_s3::config::Builder::from(&config).force_path_style(custom_endpoint);
        if let Some(i) = interceptor {
            ddb = ddb.interceptor(i.clone());
            sqs = sqs.interceptor(i.clone());
            s3 = s3.interceptor(i);
        }
        AwsBackends {
            store: DynamoStore::new(
                aws_sdk_dynamodb::Client::from_conf(ddb.build()),
                &settings.table,
            ),
            queue: SqsQueue::new(
                aws_sdk_sqs::Client::from_conf(sqs.build()),
                &settings.queue_url,
            ),
            blobs: S3Blobs::new(
                &config,
                aws_sdk_s3::Client::from_conf(s3.build()),
                &settings.bucket,
            ),
        }
    }

    /// The core's shared dependencies over these adapters, with the built-in models.
    pub fn app(&self, core: Config) -> Arc<App> {
        App::new(
            Arc::new(self.store.clone()),
            Arc::new(self.queue.clone()),
            Arc::new(self.blobs.clone()),
            builtin_registry(1.0),
            core,
        )
    }
}
