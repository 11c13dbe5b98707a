//! Result URLs signed by tasklane itself, shared by both runtimes:
//! `{public URL}/v1/files/{key}?expires={unix seconds}&signature={hex HMAC-SHA256}`, the
//! HMAC taken over `key`, a newline and `expires` with the deployment's signing key.
//!
//! Locally the server serves the file itself; on AWS the `files` function answers a `302` to
//! an S3 presigned GET of a few minutes ([`REDIRECT_TTL`]). Either way the URL's life is
//! tasklane's own: it works until its `expires`, whatever credentials sign the storage
//! request behind it (an S3 presigned URL dies with the role session that signed it:
//! <https://docs.aws.amazon.com/AmazonS3/latest/userguide/using-presigned-url.html>).

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use http::{HeaderValue, Response, StatusCode, header};
use sha2::Sha256;

use crate::ApiError;

/// Path prefix under which signed files are served.
pub const FILES_PREFIX: &str = "/v1/files/";

/// How long the storage URL a signed URL redirects to lives: a few minutes, well inside any
/// session token's life (an STS role session lasts at least 15 minutes).
pub const REDIRECT_TTL: Duration = Duration::from_secs(300);

/// Shortest signing key accepted from configuration, in bytes.
pub const MIN_KEY_LEN: usize = 32;

/// The error code of a signed URL whose object is gone (the results bucket's retention
/// removed it): `410` with this code.
pub const EXPIRED_CODE: &str = "expired";

/// How long the deployment keeps outputs (`TASKLANE_RESULT_RETENTION_DAYS`, whole days:
/// template.yaml's `ResultRetentionDays`, the results bucket's lifecycle rule), read once;
/// `None` when unset or not a positive number of days (outputs kept for good, as locally).
pub fn retention() -> Option<Duration> {
    static RETENTION: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *RETENTION.get_or_init(|| {
        let days = std::env::var("TASKLANE_RESULT_RETENTION_DAYS").ok()?;
        match days.trim().parse::<u64>() {
            Ok(d) if d > 0 => Some(Duration::from_secs(d.saturating_mul(86_400))),
            _ => {
                tracing::warn!(value = %days, "TASKLANE_RESULT_RETENTION_DAYS is not a positive number of days; ignored");
                None
            }
        }
    })
}

/// Signs and checks result URLs with one key.
#[derive(Clone)]
pub struct UrlSigner {
    key: Vec<u8>,
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key never appears in a log line.
        f.write_str("UrlSigner { key: <redacted> }")
    }
}

impl UrlSigner {
    /// A signer with `key` (any length; configuration asks for [`MIN_KEY_LEN`] bytes).
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        UrlSigner { key: key.into() }
    }

    fn mac(&self, key: &str, expires: i64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(key.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    /// The hex signature of `key` until `expires` (unix seconds).
    pub fn signature(&self, key: &str, expires: i64) -> String {
        hex::encode(self.mac(key, expires).finalize().into_bytes())
    }

    /// The URL of `key` under `base_url` (no trailing slash), valid until `expires_at`
    /// (whole seconds; the fraction dropped).
    pub fn url(&self, base_url: &str, key: &str, expires_at: DateTime<Utc>) -> String {
        let expires = expires_at.timestamp();
        format!(
            "{}{FILES_PREFIX}{key}?expires={expires}&signature={}",
            base_url.trim_end_matches('/'),
            self.signature(key, expires)
        )
    }

    /// Checks a signed URL's `key` and its `expires` and `signature` query values.
    /// Expired, tampered and unsigned URLs are [`ApiError::Forbidden`].
    pub fn verify(&self, key: &str, query: &str) -> Result<(), ApiError> {
        self.verify_at(key, query, Utc::now())
    }

    /// [`UrlSigner::verify`] at the time `now`.
    pub fn verify_at(&self, key: &str, query: &str, now: DateTime<Utc>) -> Result<(), ApiError> {
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
        let given = hex::decode(&sig).map_err(|_| ApiError::Forbidden)?;
        // Constant-time comparison.
        self.mac(key, expires)
            .verify_slice(&given)
            .map_err(|_| ApiError::Forbidden)?;
        if now.timestamp() >= expires {
            return Err(ApiError::Forbidden);
        }
        Ok(())
    }
}

/// The `410 expired` answer of a signed URL whose object is gone, in the API's error shape.
pub fn expired_response() -> Response<Bytes> {
    let body = serde_json::json!({"error": {
        "code": EXPIRED_CODE,
        "message": "this result is no longer stored (the deployment's result retention has passed)",
    }});
    let mut resp = Response::new(Bytes::from(body.to_string()));
    *resp.status_mut() = StatusCode::GONE;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The `302` to `location` a signed URL answers on AWS; not cached anywhere (the location
/// lives minutes).
pub fn redirect_response(location: &str) -> Result<Response<Bytes>, ApiError> {
    let location = HeaderValue::from_str(location)
        .map_err(|_| ApiError::Internal("a storage URL is not a valid header value".into()))?;
    let mut resp = Response::new(Bytes::new());
    *resp.status_mut() = StatusCode::FOUND;
    let h = resp.headers_mut();
    h.insert(header::LOCATION, location);
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    Ok(resp)
}

/// What answers signed result URLs (`GET /v1/files/{key}`) for a blob store that does not
/// serve the bytes itself (S3: a redirect).
#[async_trait::async_trait]
pub trait SignedFiles: Send + Sync {
    /// The answer to `GET {FILES_PREFIX}{key}?{query}`: an error in the API's shape
    /// (`403 forbidden`, `410 expired`) or where to read the file.
    async fn answer(&self, key: &str, query: &str) -> Response<Bytes>;
}

/// The answer to `method` on the signed result URL of `key`: only `GET` is served.
pub async fn answer(
    files: &dyn SignedFiles,
    method: &http::Method,
    key: &str,
    query: &str,
) -> Response<Bytes> {
    if method != http::Method::GET {
        return ApiError::MethodNotAllowed { allow: "GET" }.into_response();
    }
    files.answer(key, query).await
}

tokio::task_local! {
    static BASE_URL: String;
}

/// Runs `fut` with `base_url` as the public URL result URLs are built on (an HTTP handler's
/// own address, read from its request: see [`base_url`]).
pub async fn with_base_url<F: Future>(base_url: String, fut: F) -> F::Output {
    BASE_URL.scope(base_url, fut).await
}

/// The public URL set by [`with_base_url`] around the running request, if any.
pub fn base_url() -> Option<String> {
    BASE_URL.try_with(Clone::clone).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_urls_verify_and_tampering_or_expiry_is_refused() {
        let s = UrlSigner::new(b"k".to_vec());
        let at = Utc::now() + chrono::Duration::seconds(60);
        let url = s.url("http://h/", "tasks/t/output-0.gif", at);
        assert!(url.starts_with("http://h/v1/files/tasks/t/output-0.gif?expires="));
        let query = url.split_once('?').unwrap().1;
        assert!(s.verify("tasks/t/output-0.gif", query).is_ok());
        for (key, q) in [
            ("tasks/u/output-0.gif", query.to_string()),
            (
                "tasks/t/output-0.gif",
                query.replace("expires=", "expires=9"),
            ),
            ("tasks/t/output-0.gif", String::new()),
        ] {
            assert!(
                matches!(s.verify(key, &q), Err(ApiError::Forbidden)),
                "{key} {q}"
            );
        }
        let other = UrlSigner::new(b"other".to_vec());
        assert!(other.verify("tasks/t/output-0.gif", query).is_err());
        let later = at + chrono::Duration::seconds(1);
        assert!(matches!(
            s.verify_at("tasks/t/output-0.gif", query, later),
            Err(ApiError::Forbidden)
        ));
        assert_eq!(format!("{s:?}"), "UrlSigner { key: <redacted> }");
    }

    #[tokio::test]
    async fn the_base_url_is_the_scoped_one() {
        assert_eq!(base_url(), None);
        let inside = with_base_url("https://x".into(), async { base_url() }).await;
        assert_eq!(inside.as_deref(), Some("https://x"));
    }

    #[test]
    fn the_answers_have_the_documented_shapes() {
        let r = expired_response();
        assert_eq!(r.status(), 410);
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["error"]["code"], "expired");
        let r = redirect_response("https://s3/x?a=b").unwrap();
        assert_eq!(r.status(), 302);
        assert_eq!(r.headers()[header::CACHE_CONTROL], "private, no-store");
    }
}
