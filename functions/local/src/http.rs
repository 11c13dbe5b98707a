//! HTTP serving: every request goes to the core's [`Api`], except signed result URLs under
//! `/v1/files/`, which are checked ([`tasklane_core::result_urls`]) and served from the
//! results folder (`403 forbidden` when expired or tampered, `410 expired` when the file is
//! gone).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use tasklane_core::ApiError;
use tasklane_core::api::Api;
use tasklane_core::result_urls::{self, SignedFiles, expired_response};

use crate::files::{FILES_PREFIX, FileBlobs, content_type_of};

/// Files are read and sent in chunks of this size, never whole.
const FILE_CHUNK: usize = 64 * 1024;

/// What answers signed result URLs under `/v1/files/`.
pub(crate) enum Files {
    /// The results folder, served from disk.
    Local(FileBlobs),
    /// Another blob store's answer (S3: a redirect to a short presigned GET).
    Signed(Arc<dyn SignedFiles>),
}

/// What the HTTP handler serves.
pub(crate) struct Served {
    pub(crate) api: Api,
    pub(crate) files: Option<Files>,
    /// The public URL result URLs are built on ([`tasklane_core::result_urls::with_base_url`]).
    pub(crate) public_url: String,
}

pub(crate) async fn serve(State(s): State<Arc<Served>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if let (Some(files), Some(key)) = (&s.files, parts.uri.path().strip_prefix(FILES_PREFIX)) {
        let query = parts.uri.query().unwrap_or("");
        return match files {
            Files::Local(files) => serve_file(files, key, query, &parts.method).await,
            Files::Signed(files) => {
                to_axum(result_urls::answer(files.as_ref(), &parts.method, key, query).await)
            }
        };
    }
    let limit = s.api.body_limit(parts.uri.path());
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return to_axum(ApiError::PayloadTooLarge { limit }.into_response());
        }
        Err(_) => {
            return to_axum(
                ApiError::invalid_body("the request body could not be read").into_response(),
            );
        }
    };
    let handled = s.api.handle(http::Request::from_parts(parts, bytes));
    to_axum(result_urls::with_base_url(s.public_url.clone(), handled).await)
}

async fn serve_file(files: &FileBlobs, key: &str, query: &str, method: &http::Method) -> Response {
    if method != http::Method::GET {
        return to_axum(ApiError::MethodNotAllowed { allow: "GET" }.into_response());
    }
    let path = match files.verify(key, query) {
        Ok(p) => p,
        Err(e) => return to_axum(e.into_response()),
    };
    // A validly signed URL whose file is gone (removed from the results folder): `410
    // expired`, as on AWS once the bucket's retention removed the object.
    let (file, len) = match tokio::fs::File::open(&path).await {
        Ok(f) => match f.metadata().await {
            Ok(m) => (f, m.len()),
            Err(_) => return to_axum(expired_response()),
        },
        Err(_) => return to_axum(expired_response()),
    };
    // Streamed from disk: a video of hundreds of MB is never held in memory.
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        file, FILE_CHUNK,
    ));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type_of(&path)),
    );
    h.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("private, max-age=60"),
    );
    resp
}

fn to_axum(resp: http::Response<Bytes>) -> Response {
    resp.map(Body::from)
}
