//! The blob store on S3: outputs under a per-task prefix, presigned GET URLs made on every
//! read, never outliving the credentials that signed them.

use std::time::Duration;

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use chrono::Utc;
use tasklane_core::ports::{BlobStore, PortError, PortResult, SignedUrl};

use crate::dynamo::sdk_error;

/// One S3 bucket.
#[derive(Clone, Debug)]
pub struct S3Blobs {
    client: Client,
    bucket: String,
    credentials: Option<aws_credential_types::provider::SharedCredentialsProvider>,
}

/// Signed URLs end this long before the signing credentials do.
const CREDENTIAL_MARGIN: Duration = Duration::from_secs(60);

impl S3Blobs {
    /// The bucket `bucket`, signing with the credentials of `config`.
    pub fn new(config: &SdkConfig, client: Client, bucket: impl Into<String>) -> Self {
        S3Blobs {
            client,
            bucket: bucket.into(),
            credentials: config.credentials_provider(),
        }
    }

    /// Seconds left on the signing credentials, when they expire at all.
    async fn credentials_left(&self) -> PortResult<Option<Duration>> {
        use aws_credential_types::provider::ProvideCredentials;
        let Some(p) = &self.credentials else {
            return Ok(None);
        };
        let creds = p
            .provide_credentials()
            .await
            .map_err(PortError::unavailable)?;
        Ok(creds.expiry().map(|exp| {
            exp.duration_since(std::time::SystemTime::now())
                .unwrap_or_default()
                .saturating_sub(CREDENTIAL_MARGIN)
        }))
    }
}

#[async_trait]
impl BlobStore for S3Blobs {
    async fn put(&self, key: &str, bytes: Bytes, content_type: &str) -> PortResult<()> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }

    async fn presign_get(&self, key: &str, ttl: Duration) -> PortResult<SignedUrl> {
        let ttl = match self.credentials_left().await? {
            Some(left) => ttl.min(left),
            None => ttl,
        }
        .max(Duration::from_secs(1));
        // Whole seconds: X-Amz-Date and X-Amz-Expires carry no fractions, so neither may the
        // expiry the client is told.
        let ttl = Duration::from_secs(ttl.as_secs());
        let now = chrono::DateTime::<Utc>::from_timestamp(Utc::now().timestamp(), 0)
            .ok_or_else(|| PortError::internal("clock out of range"))?;
        let cfg = PresigningConfig::builder()
            .start_time(now.into())
            .expires_in(ttl)
            .build()
            .map_err(PortError::internal)?;
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(cfg)
            .await
            .map_err(sdk_error)?;
        Ok(SignedUrl {
            url: req.uri().to_string(),
            expires_at: now + chrono::Duration::from_std(ttl).map_err(PortError::internal)?,
        })
    }
}
