//! The results folder: a blob store on local files, handed out as URLs signed by this server
//! (HMAC-SHA256 over key and expiry, [`tasklane_core::result_urls`], the scheme the AWS
//! runtime shares) and served by it under `/v1/files/`.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tasklane_core::ApiError;
use tasklane_core::ports::{
    BlobStore, ChunkSource, PortError, PortResult, SignedUrl, StreamRefused,
};
pub use tasklane_core::result_urls::FILES_PREFIX;
use tasklane_core::result_urls::UrlSigner;

/// A streamed body is written to its file in batches of this many bytes (the most of it held
/// in memory at once, besides the chunk being read).
const WRITE_BATCH: usize = 1024 * 1024;

/// A temporary file next to a blob's final path, removed when dropped unless it was renamed
/// into place: an error, an over-cap body or an abandoned write leaves nothing behind.
struct TempFile {
    path: PathBuf,
    kept: bool,
}

impl TempFile {
    /// A fresh name in `dir` (hidden, so a listing of the folder never shows it as an output).
    fn new(dir: &Path) -> Self {
        TempFile {
            path: dir.join(format!(".{}.tmp", ulid::Ulid::new())),
            kept: false,
        }
    }

    /// Renames the file to `path`: a reader never sees half a file.
    async fn persist(mut self, path: &Path) -> PortResult<()> {
        tokio::fs::rename(&self.path, path)
            .await
            .map_err(PortError::internal)?;
        self.kept = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Appends `batch` to `file` on the blocking pool, handing both back (the batch emptied).
async fn write_batch(
    mut file: std::fs::File,
    mut batch: Vec<u8>,
) -> PortResult<(std::fs::File, Vec<u8>)> {
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        file.write_all(&batch)?;
        batch.clear();
        Ok::<_, std::io::Error>((file, batch))
    })
    .await
    .map_err(PortError::internal)?
    .map_err(PortError::internal)
}

/// A blob store on the local file system with locally signed URLs.
#[derive(Clone)]
pub struct FileBlobs {
    root: PathBuf,
    base_url: String,
    signer: UrlSigner,
}

impl FileBlobs {
    /// Blobs under `root`, served at `base_url` (e.g. `http://127.0.0.1:3000`), signed with `key`.
    pub fn new(root: PathBuf, base_url: String, key: Vec<u8>) -> Self {
        FileBlobs {
            root,
            base_url: base_url.trim_end_matches('/').to_string(),
            signer: UrlSigner::new(key),
        }
    }

    fn path_of(&self, key: &str) -> Option<PathBuf> {
        let rel = Path::new(key);
        let safe = !key.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
        safe.then(|| self.root.join(rel))
    }

    /// The folder and path of `key`'s file, the folder created.
    async fn place(&self, key: &str) -> PortResult<(PathBuf, PathBuf)> {
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
        Ok((dir, path))
    }

    /// Checks a signed URL's key, `expires` and `signature` query values
    /// ([`UrlSigner::verify`]), returning the file. Expired, tampered and unsigned URLs are
    /// [`ApiError::Forbidden`].
    pub fn verify(&self, key: &str, query: &str) -> Result<PathBuf, ApiError> {
        self.signer.verify(key, query)?;
        self.path_of(key).ok_or(ApiError::NotFound("no such file"))
    }
}

/// The MIME type of a stored output, from its extension ([`tasklane_core::media`]).
pub fn content_type_of(path: &Path) -> &'static str {
    tasklane_core::media::content_type_for(path.extension().and_then(|e| e.to_str()).unwrap_or(""))
}

#[async_trait]
impl BlobStore for FileBlobs {
    async fn put(&self, key: &str, bytes: Bytes, _content_type: &str) -> PortResult<()> {
        let (dir, path) = self.place(key).await?;
        // Write then rename: a reader never sees half a file, a crash leaves no partial output.
        let tmp = TempFile::new(&dir);
        tokio::fs::write(&tmp.path, &bytes)
            .await
            .map_err(PortError::internal)?;
        tmp.persist(&path).await
    }

    async fn put_stream(
        &self,
        key: &str,
        _content_type: &str,
        body: &mut dyn ChunkSource,
        max_bytes: u64,
    ) -> PortResult<Result<u64, StreamRefused>> {
        let (dir, path) = self.place(key).await?;
        // Chunks go to a temporary file in the same folder, renamed into place at the end.
        let tmp = TempFile::new(&dir);
        let mut file = tokio::fs::File::create(&tmp.path)
            .await
            .map_err(PortError::internal)?
            .into_std()
            .await;
        let mut batch = Vec::new();
        let mut size = 0u64;
        loop {
            let chunk = match body.next_chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(why) => return Ok(Err(StreamRefused::Broken(why))),
            };
            size += chunk.len() as u64;
            if size > max_bytes {
                return Ok(Err(StreamRefused::TooBig { limit: max_bytes }));
            }
            batch.extend_from_slice(&chunk);
            if batch.len() >= WRITE_BATCH {
                (file, batch) = write_batch(file, batch).await?;
            }
        }
        if !batch.is_empty() {
            (file, _) = write_batch(file, batch).await?;
        }
        drop(file);
        tmp.persist(&path).await?;
        Ok(Ok(size))
    }

    async fn presign_get(&self, key: &str, ttl: Duration) -> PortResult<SignedUrl> {
        let expires_at: DateTime<Utc> =
            Utc::now() + chrono::Duration::from_std(ttl).map_err(PortError::internal)?;
        let url = self.signer.url(&self.base_url, key, expires_at);
        Ok(SignedUrl {
            url,
            expires_at: DateTime::from_timestamp(expires_at.timestamp(), 0).unwrap_or(expires_at),
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
        let q = format!("expires={past}&signature={}", b.signer.signature("k", past));
        assert!(matches!(b.verify("k", &q), Err(ApiError::Forbidden)));
    }

    /// `len` bytes that differ from one position to the next (a misplaced chunk shows).
    fn body(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + i / 4099) as u8).collect()
    }

    /// `data` in chunks of `size` bytes.
    fn chunks(data: &[u8], size: usize) -> impl ChunkSource + '_ {
        tasklane_core::ports::ChunkIter(data.chunks(size).map(|c| Ok(Bytes::copy_from_slice(c))))
    }

    /// Every file under `dir`, relative to it, sorted.
    fn files_under(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    todo.push(p);
                } else {
                    out.push(p.strip_prefix(dir).unwrap().display().to_string());
                }
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn a_streamed_body_arrives_byte_identical_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBlobs::new(dir.path().to_path_buf(), "http://h".into(), b"k".to_vec());
        let big = body(20 * 1024 * 1024 + 5);
        let size = b
            .put_stream(
                "tasks/t/output-0.mp4",
                "video/mp4",
                &mut chunks(&big, 7919),
                1 << 30,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(size, big.len() as u64);
        let small = body(10);
        let size = b
            .put_stream(
                "tasks/t/output-1.bin",
                "application/octet-stream",
                &mut chunks(&small, 3),
                10,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(size, 10, "a body exactly at the cap is stored");
        assert!(std::fs::read(dir.path().join("tasks/t/output-0.mp4")).unwrap() == big);
        assert_eq!(
            std::fs::read(dir.path().join("tasks/t/output-1.bin")).unwrap(),
            small
        );
        assert_eq!(
            files_under(dir.path()),
            ["tasks/t/output-0.mp4", "tasks/t/output-1.bin"]
        );
    }

    #[tokio::test]
    async fn an_over_cap_or_broken_body_stores_nothing_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBlobs::new(dir.path().to_path_buf(), "http://h".into(), b"k".to_vec());
        let data = body(3 * WRITE_BATCH);
        let cap = data.len() as u64 - 1;
        let res = b
            .put_stream(
                "tasks/t/output-0.mp4",
                "video/mp4",
                &mut chunks(&data, 65536),
                cap,
            )
            .await
            .unwrap();
        assert_eq!(res, Err(StreamRefused::TooBig { limit: cap }));
        assert!(
            files_under(dir.path()).is_empty(),
            "{:?}",
            files_under(dir.path())
        );

        // A body that breaks off leaves what the key held before as it was.
        b.put(
            "tasks/t/output-0.mp4",
            Bytes::from_static(b"before"),
            "video/mp4",
        )
        .await
        .unwrap();
        let mut broken = tasklane_core::ports::ChunkIter(
            data.chunks(65536)
                .take(20)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .chain([Err("connection lost".to_string())]),
        );
        let res = b
            .put_stream("tasks/t/output-0.mp4", "video/mp4", &mut broken, 1 << 30)
            .await
            .unwrap();
        assert_eq!(res, Err(StreamRefused::Broken("connection lost".into())));
        assert_eq!(files_under(dir.path()), ["tasks/t/output-0.mp4"]);
        assert_eq!(
            std::fs::read(dir.path().join("tasks/t/output-0.mp4")).unwrap(),
            b"before"
        );
    }

    #[test]
    fn keys_cannot_escape_the_results_folder() {
        let b = blobs();
        assert!(b.path_of("../etc/passwd").is_none());
        assert!(b.path_of("/etc/passwd").is_none());
        assert!(b.path_of("a/./b").is_some());
    }
}
