//! Configuration of the AWS runtime, read once from the environment, and the adapters built
//! from it (SDK clients made once, outside any handler).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aws_config::SdkConfig;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_smithy_runtime_api::client::interceptors::SharedInterceptor;
use tasklane_core::catalog;
use tasklane_core::config::{ConfigError, env_required, env_secs};
use tasklane_core::providers::builtin_registry;
use tasklane_core::registry::Registry;
use tasklane_core::result_urls;
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
    /// SQS queue of webhook deliveries (`TASKLANE_DELIVERY_QUEUE_URL`), consumed by the
    /// `deliver` function; `None`: deliveries travel on the work queue.
    pub delivery_queue_url: Option<String>,
    /// S3 results bucket (`TASKLANE_BUCKET`).
    pub bucket: String,
    /// Core settings: defaults, then the shared `TASKLANE_*` variables.
    pub core: Config,
    /// Where the model catalog is (`TASKLANE_MODELS`); `None`: the built-in demo models.
    pub models: Option<ModelsSource>,
}

/// Where a function reads the model catalog ([`tasklane_core::catalog`]) from, once, at
/// cold start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelsSource {
    /// A file bundled with the function (in its package or a layer under `/opt`).
    File(PathBuf),
    /// An S3 object, `s3://bucket/key`, read with the function's S3 client.
    S3 {
        /// Bucket.
        bucket: String,
        /// Object key.
        key: String,
    },
}

impl ModelsSource {
    /// `s3://bucket/key`, or a file path; the error names `TASKLANE_MODELS`.
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        let Some(rest) = value.strip_prefix("s3://") else {
            return Ok(ModelsSource::File(PathBuf::from(value)));
        };
        match rest.split_once('/') {
            Some((bucket, key)) if !bucket.is_empty() && !key.is_empty() => Ok(ModelsSource::S3 {
                bucket: bucket.to_string(),
                key: key.to_string(),
            }),
            _ => Err(ConfigError(format!(
                "TASKLANE_MODELS={value:?} is not valid: an S3 catalog is s3://bucket/key"
            ))),
        }
    }
}

impl std::fmt::Display for ModelsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelsSource::File(p) => write!(f, "{}", p.display()),
            ModelsSource::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
        }
    }
}

impl AwsSettings {
    /// Reads the settings; a missing or invalid variable is an error that names it.
    pub fn from_env() -> Result<Self, ConfigError> {
        let mut core = Config::default();
        core.apply_env()?;
        Ok(AwsSettings {
            table: env_required("TASKLANE_TABLE")?,
            queue_url: env_required("TASKLANE_QUEUE_URL")?,
            delivery_queue_url: std::env::var("TASKLANE_DELIVERY_QUEUE_URL")
                .ok()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty()),
            bucket: env_required("TASKLANE_BUCKET")?,
            core,
            models: match std::env::var("TASKLANE_MODELS") {
                Ok(v) if !v.trim().is_empty() => Some(ModelsSource::parse(v.trim())?),
                _ => None,
            },
        })
    }
}

/// The key result URLs are signed with (`TASKLANE_RESULT_URL_SIGNING_KEY`, at least
/// [`result_urls::MIN_KEY_LEN`] bytes: template.yaml's `NoEcho` parameter
/// `ResultUrlSigningKey`), or `None` when unset (result URLs are then S3 presigned URLs). The
/// error names the variable, never the value.
pub fn result_url_signer_from_env() -> Result<Option<result_urls::UrlSigner>, ConfigError> {
    match std::env::var("TASKLANE_RESULT_URL_SIGNING_KEY") {
        Ok(k) if k.trim().is_empty() => Ok(None),
        Ok(k) if k.len() < result_urls::MIN_KEY_LEN => Err(ConfigError(format!(
            "TASKLANE_RESULT_URL_SIGNING_KEY must be at least {} characters",
            result_urls::MIN_KEY_LEN
        ))),
        Ok(k) => Ok(Some(result_urls::UrlSigner::new(k.into_bytes()))),
        Err(_) => Ok(None),
    }
}

/// The results bucket of the `files` function (`TASKLANE_BUCKET`), answering the result URLs
/// signed with `TASKLANE_RESULT_URL_SIGNING_KEY` (required here), its S3 calls bounded by
/// `TASKLANE_AWS_TIMEOUT`. The error names the variable at fault.
pub async fn files_from_env() -> Result<S3Blobs, ConfigError> {
    let bucket = env_required("TASKLANE_BUCKET")?;
    let signer = result_url_signer_from_env()?.ok_or_else(|| {
        ConfigError("TASKLANE_RESULT_URL_SIGNING_KEY is required by the files function".into())
    })?;
    let timeouts = SdkTimeouts::from_env()?;
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let custom_endpoint =
        config.endpoint_url().is_some() || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some();
    let s3 = aws_sdk_s3::config::Builder::from(&config)
        .force_path_style(custom_endpoint)
        .timeout_config(timeouts.bulk())
        .retry_config(timeouts.retry())
        .build();
    let client = aws_sdk_s3::Client::from_conf(s3);
    Ok(S3Blobs::new(&config, client, bucket).with_signed_urls(signer, None))
}

/// How long the SDK clients may spend on one AWS call, so a connection that hangs ends in the
/// port's `Unavailable` (a 503, or a retried message) well before Lambda kills the function.
///
/// Without these the SDK waits for an answer as long as the function lives: the default
/// configuration bounds only the TCP connect (3.1 s). The values:
///
/// - `connect`: 3 s for a TCP connection (with TLS) to the regional endpoint, which takes
///   milliseconds from Lambda.
/// - `attempt`: one DynamoDB or SQS request, 3 s. Both answer in milliseconds (DynamoDB's
///   documented single-digit-millisecond latency); an attempt that takes seconds is a lost
///   connection, better retried on a fresh one. S3 attempts get the whole `operation`: one
///   of them may upload a part of 8 MiB ([`crate::s3::PART_SIZE`]).
/// - `operation`: one call with all its retries (`TASKLANE_AWS_TIMEOUT`, seconds). template.yaml
///   sets it per function below the function's timeout (README, "Limits the template sets");
///   10 s when unset (local tools and tests).
/// - retries: the SDK's standard mode with 3 attempts (exponential backoff with full jitter
///   from 1 s, at most 20 s, cut short by `operation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SdkTimeouts {
    /// Longest TCP (and TLS) connect.
    pub connect: Duration,
    /// Longest single DynamoDB or SQS attempt.
    pub attempt: Duration,
    /// Longest call, all attempts included (and longest single S3 attempt).
    pub operation: Duration,
    /// Attempts per call, the first included.
    pub max_attempts: u32,
}

impl Default for SdkTimeouts {
    fn default() -> Self {
        SdkTimeouts::with_operation(SdkTimeouts::DEFAULT_OPERATION)
    }
}

impl SdkTimeouts {
    /// Longest connect.
    pub const CONNECT: Duration = Duration::from_secs(3);
    /// Longest DynamoDB or SQS attempt.
    pub const ATTEMPT: Duration = Duration::from_secs(3);
    /// Longest call when `TASKLANE_AWS_TIMEOUT` is not set.
    pub const DEFAULT_OPERATION: Duration = Duration::from_secs(10);
    /// Attempts per call.
    pub const MAX_ATTEMPTS: u32 = 3;
    /// Longest `TASKLANE_AWS_TIMEOUT`: Lambda's longest function timeout.
    pub const MAX_OPERATION: Duration = Duration::from_secs(900);

    /// Calls of at most `operation`; connects and DynamoDB/SQS attempts no longer than it.
    pub fn with_operation(operation: Duration) -> Self {
        SdkTimeouts {
            connect: Self::CONNECT.min(operation),
            attempt: Self::ATTEMPT.min(operation),
            operation,
            max_attempts: Self::MAX_ATTEMPTS,
        }
    }

    /// `TASKLANE_AWS_TIMEOUT` (seconds, more than 0 and at most 900), else the default; the
    /// error names the variable.
    pub fn from_env() -> Result<Self, ConfigError> {
        match env_secs("TASKLANE_AWS_TIMEOUT")? {
            None => Ok(Self::default()),
            Some(t) if !t.is_zero() && t <= Self::MAX_OPERATION => Ok(Self::with_operation(t)),
            Some(_) => Err(ConfigError(
                "TASKLANE_AWS_TIMEOUT must be more than 0 and at most 900 seconds".into(),
            )),
        }
    }

    /// The timeouts of a DynamoDB or SQS client.
    fn fast(&self) -> TimeoutConfig {
        TimeoutConfig::builder()
            .connect_timeout(self.connect)
            .operation_attempt_timeout(self.attempt)
            .operation_timeout(self.operation)
            .build()
    }

    /// The timeouts of the S3 client: an attempt may carry a whole part.
    fn bulk(&self) -> TimeoutConfig {
        TimeoutConfig::builder()
            .connect_timeout(self.connect)
            .operation_attempt_timeout(self.operation)
            .operation_timeout(self.operation)
            .build()
    }

    fn retry(&self) -> RetryConfig {
        RetryConfig::standard().with_max_attempts(self.max_attempts)
    }
}

/// The three adapters, sharing one loaded AWS configuration.
#[derive(Clone, Debug)]
pub struct AwsBackends {
    /// Task store.
    pub store: DynamoStore,
    /// Work queue.
    pub queue: SqsQueue,
    /// The queue of webhook deliveries, when it is not the work queue.
    pub deliveries: Option<SqsQueue>,
    /// Results bucket.
    pub blobs: S3Blobs,
    /// The S3 client, for the model catalog.
    s3: aws_sdk_s3::Client,
}

impl AwsBackends {
    /// Loads the AWS configuration (region, credentials, `AWS_ENDPOINT_URL`…) and builds the
    /// clients. With a custom endpoint (an emulator), S3 uses path-style addressing.
    pub async fn connect(settings: &AwsSettings) -> Self {
        Self::connect_intercepted(settings, None).await
    }

    /// Like [`AwsBackends::connect`], with `interceptor` on every client: an SDK interceptor
    /// sees each request and answer (to count, log or trace them). The calls' timeouts come
    /// from `TASKLANE_AWS_TIMEOUT` ([`SdkTimeouts::from_env`]; an invalid value is logged and
    /// the default used: the Lambda functions refuse it at cold start instead).
    pub async fn connect_intercepted(
        settings: &AwsSettings,
        interceptor: Option<SharedInterceptor>,
    ) -> Self {
        let timeouts = SdkTimeouts::from_env().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "using the default AWS call timeouts");
            SdkTimeouts::default()
        });
        Self::connect_with(settings, timeouts, interceptor).await
    }

    /// Loads the AWS configuration and builds the clients with `timeouts` (and `interceptor`).
    pub async fn connect_with(
        settings: &AwsSettings,
        timeouts: SdkTimeouts,
        interceptor: Option<SharedInterceptor>,
    ) -> Self {
        let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        Self::from_config(settings, &config, timeouts, interceptor)
    }

    /// Builds the clients from a loaded AWS configuration, each with `timeouts` and the
    /// standard retry mode ([`SdkTimeouts`]). With a custom endpoint (an emulator), S3 uses
    /// path-style addressing.
    pub fn from_config(
        settings: &AwsSettings,
        config: &SdkConfig,
        timeouts: SdkTimeouts,
        interceptor: Option<SharedInterceptor>,
    ) -> Self {
        let custom_endpoint =
            config.endpoint_url().is_some() || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some();
        let mut ddb = aws_sdk_dynamodb::config::Builder::from(config)
            .timeout_config(timeouts.fast())
            .retry_config(timeouts.retry());
        let mut sqs = aws_sdk_sqs::config::Builder::from(config)
            .timeout_config(timeouts.fast())
            .retry_config(timeouts.retry());
        let mut s3 = aws_sdk_s3::config::Builder::from(config)
            .force_path_style(custom_endpoint)
            .timeout_config(timeouts.bulk())
            .retry_config(timeouts.retry());
        if let Some(i) = interceptor {
            ddb = ddb.interceptor(i.clone());
            sqs = sqs.interceptor(i.clone());
            s3 = s3.interceptor(i);
        }
        let s3 = aws_sdk_s3::Client::from_conf(s3.build());
        let sqs = aws_sdk_sqs::Client::from_conf(sqs.build());
        AwsBackends {
            store: DynamoStore::new(
                aws_sdk_dynamodb::Client::from_conf(ddb.build()),
                &settings.table,
            ),
            queue: SqsQueue::new(sqs.clone(), &settings.queue_url),
            deliveries: settings
                .delivery_queue_url
                .as_ref()
                .map(|url| SqsQueue::new(sqs.clone(), url)),
            blobs: S3Blobs::new(config, s3.clone(), &settings.bucket),
            s3,
        }
    }

    /// Where the core enqueues: webhook deliveries to their own queue when there is one,
    /// everything else to the work queue.
    pub fn work_queue(&self) -> Arc<dyn tasklane_core::ports::WorkQueue> {
        match &self.deliveries {
            Some(d) => Arc::new(tasklane_core::ports::LaneQueue::new(
                Arc::new(self.queue.clone()),
                Arc::new(d.clone()),
            )),
            None => Arc::new(self.queue.clone()),
        }
    }

    /// The queue webhook deliveries are received from: their own, or the work queue.
    pub fn delivery_queue(&self) -> &SqsQueue {
        self.deliveries.as_ref().unwrap_or(&self.queue)
    }

    /// The core's shared dependencies over these adapters, with the built-in models.
    pub fn app(&self, core: Config) -> Arc<App> {
        self.app_with(core, builtin_registry(1.0))
    }

    /// The core's shared dependencies over these adapters, serving `registry`.
    pub fn app_with(&self, core: Config, registry: Registry) -> Arc<App> {
        App::new(
            Arc::new(self.store.clone()),
            self.work_queue(),
            Arc::new(self.blobs.clone()),
            registry,
            core,
        )
    }

    /// The models to serve: the catalog [`AwsSettings::models`] points at (a file, or an S3
    /// object read with this S3 client), else the built-in demo models. Credentials the
    /// catalog names in `api_key_env` come from the function's environment. The error names
    /// `TASKLANE_MODELS`, the catalog, and the model and field at fault.
    pub async fn registry(&self, settings: &AwsSettings) -> Result<Registry, ConfigError> {
        let invalid = |e: catalog::CatalogError| ConfigError(format!("TASKLANE_MODELS: {e}"));
        match &settings.models {
            None => Ok(builtin_registry(1.0)),
            Some(ModelsSource::File(path)) => catalog::load_file(path, 1.0).map_err(invalid),
            Some(source @ ModelsSource::S3 { bucket, key }) => {
                let unreadable = |e: String| {
                    ConfigError(format!(
                        "TASKLANE_MODELS: cannot read the model catalog {source}: {e}"
                    ))
                };
                let object = self
                    .s3
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|e| {
                        use aws_sdk_s3::error::ProvideErrorMetadata;
                        unreadable(match (e.code(), e.message()) {
                            (Some(code), Some(m)) => format!("{code}: {m}"),
                            (Some(code), None) => code.to_string(),
                            _ => aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
                        })
                    })?;
                let bytes = object
                    .body
                    .collect()
                    .await
                    .map_err(|e| unreadable(e.to_string()))?
                    .into_bytes();
                let text = String::from_utf8(bytes.to_vec())
                    .map_err(|_| unreadable("not UTF-8 text".to_string()))?;
                catalog::parse(&text, &|name| std::env::var(name).ok(), 1.0).map_err(|mut e| {
                    e.path = Some(PathBuf::from(source.to_string()));
                    invalid(e)
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_models_source_is_an_s3_object_or_a_file() {
        assert_eq!(
            ModelsSource::parse("s3://my-bucket/catalogs/models.toml").unwrap(),
            ModelsSource::S3 {
                bucket: "my-bucket".into(),
                key: "catalogs/models.toml".into()
            }
        );
        assert_eq!(
            ModelsSource::parse("/opt/models.toml").unwrap(),
            ModelsSource::File("/opt/models.toml".into())
        );
        for bad in ["s3://", "s3://bucket", "s3://bucket/", "s3:///key"] {
            let e = ModelsSource::parse(bad).unwrap_err().0;
            assert!(e.starts_with("TASKLANE_MODELS="), "{bad}: {e}");
        }
        let shown = ModelsSource::parse("s3://b/k.toml").unwrap().to_string();
        assert_eq!(shown, "s3://b/k.toml");
    }

    #[test]
    fn aws_calls_are_bounded_below_the_operation_timeout() {
        let t = SdkTimeouts::with_operation(Duration::from_secs(5));
        assert_eq!(t.connect, Duration::from_secs(3));
        assert_eq!(t.attempt, Duration::from_secs(3));
        assert_eq!(t.operation, Duration::from_secs(5));
        assert_eq!(t.bulk().operation_attempt_timeout(), Some(t.operation));
        assert_eq!(t.fast().operation_attempt_timeout(), Some(t.attempt));
        let short = SdkTimeouts::with_operation(Duration::from_secs(2));
        assert!(short.connect <= short.operation && short.attempt <= short.operation);
        assert_eq!(SdkTimeouts::default().operation, Duration::from_secs(10));
    }
}
