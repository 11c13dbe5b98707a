//! The blob store on S3: outputs under a per-task prefix (a streamed one sent in parts, so a
//! large output never sits whole in a Lambda's memory), handed out as result URLs signed by
//! tasklane ([`tasklane_core::result_urls`]) once a signing key is configured
//! ([`S3Blobs::with_signed_urls`]): `{public URL}/v1/files/{key}?expires=…&signature=…`, which
//! the `files` function ([`S3Blobs::answer`]) checks and redirects to an S3 presigned GET of
//! [`REDIRECT_TTL`]. So a URL lives exactly until the `expires_at` the API reports, whatever
//! the credentials that sign S3 requests: an S3 presigned URL stops working when the
//! temporary credentials that signed it expire
//! (<https://docs.aws.amazon.com/AmazonS3/latest/userguide/using-presigned-url.html>, "If you
//! created a presigned URL by using a temporary token, then the URL expires when the token
//! expires, even if you created the URL with a later expiration time"), and a Lambda
//! function's credentials are a role session of hours
//! (<https://docs.aws.amazon.com/lambda/latest/dg/lambda-intro-execution-role.html>).
//! Without a signing key (local tools, older deployments) the URL is an S3 presigned GET made
//! on every read, never outliving the credentials that sign it.

use std::time::Duration;

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use chrono::Utc;
use tasklane_core::ApiError;
use tasklane_core::ports::{
    BlobStore, ChunkSource, PortError, PortResult, SignedUrl, StreamRefused,
};
pub use tasklane_core::result_urls::REDIRECT_TTL;
use tasklane_core::result_urls::{self, SignedFiles, UrlSigner};

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
    signed: Option<SignedUrls>,
}

/// How [`S3Blobs`] signs result URLs itself.
#[derive(Clone, Debug)]
struct SignedUrls {
    signer: UrlSigner,
    /// The public URL when no request sets one ([`result_urls::base_url`]): the processor's
    /// `TASKLANE_PUBLIC_URL`.
    base_url: Option<String>,
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
            signed: None,
        }
    }

    /// Hands out result URLs signed by `signer` under the public URL of the request being
    /// answered ([`result_urls::with_base_url`]), else `base_url`; where neither is known, an
    /// S3 presigned URL as without a signer.
    pub fn with_signed_urls(mut self, signer: UrlSigner, base_url: Option<String>) -> Self {
        self.signed = Some(SignedUrls {
            signer,
            base_url: base_url.map(|u| u.trim_end_matches('/').to_string()),
        });
        self
    }

    /// An S3 presigned GET of `key` for at most `ttl`, never outliving the signing credentials
    /// when they say when they expire.
    pub async fn presign_s3(&self, key: &str, ttl: Duration) -> PortResult<SignedUrl> {
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

    /// Whether `key` is stored (`HeadObject`; a 404 is `false`).
    async fn exists(&self, key: &str) -> PortResult<bool> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|se| se.is_not_found()) => Ok(false),
            Err(e) => Err(sdk_error(e)),
        }
    }

    /// The answer to a signed result URL: `403 forbidden` when it is expired, tampered or
    /// unsigned (or no signing key is configured), `410 expired` when its object is gone (the
    /// bucket's retention rule removed it), else a `302` to an S3 presigned GET of
    /// [`REDIRECT_TTL`] with `Cache-Control: private, no-store`.
    async fn redirect(&self, key: &str, query: &str) -> Result<http::Response<Bytes>, ApiError> {
        let Some(signed) = &self.signed else {
            return Err(ApiError::Forbidden);
        };
        signed.signer.verify(key, query)?;
        if !self.exists(key).await? {
            return Ok(result_urls::expired_response());
        }
        let target = self.presign_s3(key, REDIRECT_TTL).await?;
        result_urls::redirect_response(&target.url)
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
        let Some(signed) = &self.signed else {
            return self.presign_s3(key, ttl).await;
        };
        let Some(base) = result_urls::base_url().or_else(|| signed.base_url.clone()) else {
            tracing::warn!("no public URL to sign a result URL under; handing out S3's");
            return self.presign_s3(key, ttl).await;
        };
        let now = Utc::now().timestamp();
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2).max(1);
        let expires_at = chrono::DateTime::<Utc>::from_timestamp(now.saturating_add(ttl), 0)
            .ok_or_else(|| PortError::internal("result URL lifetime out of range"))?;
        Ok(SignedUrl {
            url: signed.signer.url(&base, key, expires_at),
            expires_at,
        })
    }
}

#[async_trait]
impl SignedFiles for S3Blobs {
    async fn answer(&self, key: &str, query: &str) -> http::Response<Bytes> {
        match self.redirect(key, query).await {
            Ok(resp) => resp,
            Err(e) => e.into_response(),
        }
    }
}
