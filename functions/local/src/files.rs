//! The results folder: a blob store on local files, handed out as URLs signed by this server
//! (HMAC-SHA256 over key and expiry) and served by it under `/v1/files/`.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tasklane_core::ApiError;
use tasklane_core::ports::{BlobStore, PortError, PortResult, SignedUrl};

/// Path prefix under which signed files are served.
pub const FILES_PREFIX: &str = "/v1/files/";

/// A blob store on the local file system with locally signed URLs.
#[derive(Clone)]
pub struct FileBlobs {
    root: PathBuf,
    base_url: String,
    key: Vec<u8>,
}

impl FileBlobs {
    /// Blobs under `root`, served at `base_url` (e.g. `http://127.0.0.1:3000`), signed with `key`.
    pub fn new(root: PathBuf, base_url: String, key: Vec<u8>) -> Self {
        FileBlobs {
            root,
            base_url: base_url.trim_end_matches('/').to_string(),
            key,
        }
    }

    fn path_of(&self, key: &str) -> Option<PathBuf> {
        let rel = Path::new(key);
        let safe = !key.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
        safe.then(|| self.root.join(rel))
    }

    fn signature(&self, key: &str, expires: i64) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(key.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Checks a signed URL's key, `expires` and `signature` query values, returning the file.
    /// Expired, tampered and unsigned URLs are [`ApiError::Forbidden`].
    pub fn verify(&self, key: &str, query: &str) -> Result<PathBuf, ApiError> {
        let mut expires = None;
        let mut sig = None;
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "expires" => expires = v.parse::<i64>().ok(),
                "signature" => sig = Some(v.into_owned()),
                _ => {}
            }
        }
        let (Some(expires), Some(sig)) = (expires, sig) else {
            return Err(ApiError::Forbidden);
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(key.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        let given = hex::decode(&sig).map_err(|_| ApiError::Forbidden)?;
        // Constant-time comparison.
        mac.verify_slice(&given).map_err(|_| ApiError::Forbidden)?;
        if Utc::now().timestamp() >= expires {
            return Err(ApiError::Forbidden);
        }
        self.path_of(key).ok_or(ApiError::NotFound("no such file"))
    }
}

/// The MIME type of a stored output, from its extension.
pub fn content_type_of(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("gif") => "image/gif",
        Some("png") => "image/png",
        Some("txt") => "text/plain; charset=utf-8",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

#[async_trait]
impl BlobStore for FileBlobs {
    async fn put(&self, key: &str, bytes: Bytes, _content_type: &str) -> PortResult<()> {
        let path = self
            .path_of(key)
            .ok_or_else(|| PortError::internal(format!("unsafe blob key {key:?}")))?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.root.clone());
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(PortError::internal)?;
        // Write then rename: a reader never sees half a file, a crash leaves no partial output.
        let tmp = dir.join(format!(".{}.tmp", ulid::Ulid::new()));
        tokio::fs::write(&tmp, &bytes)
            .await
            .map_err(PortError::internal)?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(PortError::internal)?;
        Ok(())
    }

    async fn presign_get(&self, key: &str, ttl: Duration) -> PortResult<SignedUrl> {
        let expires_at: DateTime<Utc> =
            Utc::now() + chrono::Duration::from_std(ttl).map_err(PortError::internal)?;
        let expires = expires_at.timestamp();
        let url = format!(
            "{}{FILES_PREFIX}{key}?expires={expires}&signature={}",
            self.base_url,
            self.signature(key, expires)
        );
        Ok(SignedUrl {
            url,
            expires_at: DateTime::from_timestamp(expires, 0).unwrap_or(expires_at),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs() -> FileBlobs {
        FileBlobs::new(PathBuf::from("/tmp/x"), "http://h".into(), b"k".to_vec())
    }

    #[tokio::test]
    async fn signed_urls_verify_and_tampering_is_refused() {
        let b = blobs();
        let url = b
            .presign_get("tasks/t/output-0.gif", Duration::from_secs(60))
            .await
            .unwrap()
            .url;
        let query = url.split_once('?').unwrap().1;
        assert!(b.verify("tasks/t/output-0.gif", query).is_ok());
        assert!(matches!(
            b.verify("tasks/u/output-0.gif", query),
            Err(ApiError::Forbidden)
        ));
        let later = query.replace("expires=", "expires=9");
        assert!(matches!(
            b.verify("tasks/t/output-0.gif", &later),
            Err(ApiError::Forbidden)
        ));
        assert!(matches!(
            b.verify("tasks/t/output-0.gif", ""),
            Err(ApiError::Forbidden)
        ));
    }

    #[test]
    fn expired_urls_are_refused() {
        let b = blobs();
        let past = Utc::now().timestamp() - 1;
        let q = format!("expires={past}&signature={}", b.signature("k", past));
        assert!(matches!(b.verify("k", &q), Err(ApiError::Forbidden)));
    }

    #[test]
    fn keys_cannot_escape_the_results_folder() {
        let b = blobs();
        assert!(b.path_of("../etc/passwd").is_none());
        assert!(b.path_of("/etc/passwd").is_none());
        assert!(b.path_of("a/./b").is_some());
    }
}
