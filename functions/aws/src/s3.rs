//! The blob store on S3: outputs under a per-task prefix (a streamed one sent in parts, so a
//! large output never sits whole in a Lambda's memory), presigned GET URLs made on every read,
//! never outliving the credentials that signed them.

use std::time::Duration;

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use chrono::Utc;
use tasklane_core::ports::{
    BlobStore, ChunkSource, PortError, PortResult, SignedUrl, StreamRefused,
};

use crate::dynamo::sdk_error;

/// Size of the parts of a streamed write ([`BlobStore::put_stream`]): the most of a body held
/// in memory at once (besides the chunk being read). A body that ends below it is one
/// `PutObject`; a longer one a multipart upload of parts this big (S3 wants parts of 5 MiB
/// to 5 GiB but the last, and at most 10,000 of them: bodies up to 80 GiB).
/// <https://docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html>
pub const PART_SIZE: usize = 8 * 1024 * 1024;

/// Most parts one multipart upload may have.
const MAX_PARTS: usize = 10_000;

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

/// An open multipart upload of one streamed write, its parts checked by S3 with the CRC32 the
/// SDK computes for each (the algorithm is named at creation, and each part's checksum is given
/// back at completion, as S3 requires of a multipart upload with checksums:
/// <https://docs.aws.amazon.com/AmazonS3/latest/userguide/checking-object-integrity.html>).
/// Any way it ends but [`Upload::complete`]
/// aborts it, so no parts are left behind to be billed: the failing paths call
/// [`Upload::abort`] and wait for it; one dropped midway (its write abandoned) is aborted in
/// the background, best effort (and the bucket's lifecycle rule aborts what still remains
/// after a day).
struct Upload<'a> {
    blobs: &'a S3Blobs,
    key: &'a str,
    id: String,
    parts: Vec<CompletedPart>,
    open: bool,
}

impl<'a> Upload<'a> {
    /// `CreateMultipartUpload`.
    async fn create(blobs: &'a S3Blobs, key: &'a str, content_type: &str) -> PortResult<Self> {
        let out = blobs
            .client
            .create_multipart_upload()
            .bucket(&blobs.bucket)
            .key(key)
            .content_type(content_type)
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .send()
            .await
            .map_err(sdk_error)?;
        let id = out
            .upload_id()
            .ok_or_else(|| PortError::internal("CreateMultipartUpload answered no upload id"))?
            .to_string();
        Ok(Upload {
            blobs,
            key,
            id,
            parts: Vec::new(),
            open: true,
        })
    }

    /// `UploadPart` of the next part.
    async fn send(&mut self, part: Bytes) -> PortResult<()> {
        if self.parts.len() == MAX_PARTS {
            return Err(PortError::internal(format!(
                "a streamed write is longer than {MAX_PARTS} parts of {PART_SIZE} bytes"
            )));
        }
        let number = self.parts.len() as i32 + 1;
        let out = self
            .blobs
            .client
            .upload_part()
            .bucket(&self.blobs.bucket)
            .key(self.key)
            .upload_id(&self.id)
            .part_number(number)
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .body(ByteStream::from(part))
            .send()
            .await
            .map_err(sdk_error)?;
        self.parts.push(
            CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag().map(str::to_string))
                .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
                .build(),
        );
        Ok(())
    }

    /// `CompleteMultipartUpload`: the object appears, whole.
    async fn complete(&mut self) -> PortResult<()> {
        let parts = std::mem::take(&mut self.parts);
        self.blobs
            .client
            .complete_multipart_upload()
            .bucket(&self.blobs.bucket)
            .key(self.key)
            .upload_id(&self.id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(sdk_error)?;
        self.open = false;
        Ok(())
    }

    /// `AbortMultipartUpload`, waited for; a failure is logged (the lifecycle rule remains).
    async fn abort(mut self) {
        self.open = false;
        let res = self
            .blobs
            .client
            .abort_multipart_upload()
            .bucket(&self.blobs.bucket)
            .key(self.key)
            .upload_id(&self.id)
            .send()
            .await;
        if let Err(e) = res {
            tracing::warn!(
                key = self.key,
                error = %sdk_error(e),
                "could not abort a multipart upload"
            );
        }
    }
}

impl Drop for Upload<'_> {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let abort = self
            .blobs
            .client
            .abort_multipart_upload()
            .bucket(&self.blobs.bucket)
            .key(self.key)
            .upload_id(&self.id);
        rt.spawn(async move {
            let _ = abort.send().await;
        });
    }
}

impl S3Blobs {
    /// Reads `body` into parts of [`PART_SIZE`], sending each full one (the multipart upload
    /// created in `upload` with the first), and returns what is left past the last full part.
    async fn fill<'a>(
        &'a self,
        key: &'a str,
        content_type: &str,
        body: &mut dyn ChunkSource,
        max_bytes: u64,
        upload: &mut Option<Upload<'a>>,
    ) -> PortResult<Result<Vec<u8>, StreamRefused>> {
        let mut buf: Vec<u8> = Vec::new();
        let mut size = 0u64;
        loop {
            let chunk = match body.next_chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return Ok(Ok(buf)),
                Err(why) => return Ok(Err(StreamRefused::Broken(why))),
            };
            size += chunk.len() as u64;
            if size > max_bytes {
                return Ok(Err(StreamRefused::TooBig { limit: max_bytes }));
            }
            let mut rest = &chunk[..];
            while !rest.is_empty() {
                let take = rest.len().min(PART_SIZE - buf.len());
                if buf.capacity() < buf.len() + take {
                    // Grow by doubling, never past one part (at once to a part once the body
                    // is known to need several).
                    let want = if upload.is_some() {
                        PART_SIZE
                    } else {
                        (buf.capacity() * 2).clamp(buf.len() + take, PART_SIZE)
                    };
                    buf.reserve_exact(want - buf.len());
                }
                buf.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if buf.len() == PART_SIZE {
                    let part = Bytes::from(std::mem::take(&mut buf));
                    let up = match upload {
                        Some(up) => up,
                        None => upload.insert(Upload::create(self, key, content_type).await?),
                    };
                    up.send(part).await?;
                }
            }
        }
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

    /// One `PutObject` for a body below [`PART_SIZE`]; otherwise a multipart upload of parts
    /// of [`PART_SIZE`], aborted on any error or an over-cap body, so that nothing is stored
    /// and no upload stays open.
    async fn put_stream(
        &self,
        key: &str,
        content_type: &str,
        body: &mut dyn ChunkSource,
        max_bytes: u64,
    ) -> PortResult<Result<u64, StreamRefused>> {
        let mut upload = None;
        let filled = self
            .fill(key, content_type, body, max_bytes, &mut upload)
            .await;
        let rest = match filled {
            Ok(Ok(rest)) => rest,
            Ok(Err(refused)) => {
                if let Some(up) = upload {
                    up.abort().await;
                }
                return Ok(Err(refused));
            }
            Err(e) => {
                if let Some(up) = upload {
                    up.abort().await;
                }
                return Err(e);
            }
        };
        let Some(mut up) = upload else {
            let size = rest.len() as u64;
            self.put(key, Bytes::from(rest), content_type).await?;
            return Ok(Ok(size));
        };
        let size = (up.parts.len() * PART_SIZE + rest.len()) as u64;
        if !rest.is_empty()
            && let Err(e) = up.send(Bytes::from(rest)).await
        {
            up.abort().await;
            return Err(e);
        }
        if let Err(e) = up.complete().await {
            up.abort().await;
            return Err(e);
        }
        Ok(Ok(size))
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
