//! The one error enum of the API and its mapping to the error shape of `openapi.yaml`
//! (`Error`, `ErrorCode`).
//!
//! Every non-2xx answer of every runtime is built by [`ApiError::into_response`]; internal
//! causes are logged there and never shown to clients.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::json;

use crate::ports::{BoxError, PortError};
use crate::task::TransitionError;

/// Every failure the API can answer with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or outside what the model accepts.
    #[error("{message}")]
    InvalidRequest {
        /// Human text.
        message: String,
        /// The field at fault.
        param: Option<String>,
    },
    /// 401: missing, malformed or unknown API key.
    #[error("missing or invalid API key")]
    Unauthorized,
    /// 401: an upstream callback without the task's callback token.
    #[error("missing or invalid callback token")]
    InvalidCallbackToken,
    /// 402: too few credits.
    #[error("{}", quota_message(*.needed, *.available))]
    InsufficientQuota {
        /// Cost of the task, when the caller knows it.
        needed: Option<u64>,
        /// Credits held.
        available: u64,
    },
    /// 403: a signed URL that expired or was tampered with.
    #[error("this URL has expired or its signature is invalid")]
    Forbidden,
    /// 404: no such route, or no such task for this account.
    #[error("{0}")]
    NotFound(&'static str),
    /// 405: the route exists with other methods.
    #[error("method not allowed; allowed: {allow}")]
    MethodNotAllowed {
        /// Value of the `Allow` header.
        allow: &'static str,
    },
    /// 409: cancel of a task that is not queued.
    #[error("only queued tasks can be cancelled; this task is {status}")]
    NotCancellable {
        /// The task's state.
        status: &'static str,
    },
    /// 409: a request with this `Idempotency-Key` is still in flight.
    #[error("a request with this Idempotency-Key is still in progress; retry shortly")]
    IdempotencyInProgress,
    /// 413: body over the limit.
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// 415: body is not JSON.
    #[error("request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    /// 422: `Idempotency-Key` reused with another body.
    #[error("this Idempotency-Key was used with a different request body")]
    IdempotencyKeyReused,
    /// 429: too many requests.
    #[error("too many requests; retry after {retry_after} seconds")]
    RateLimited {
        /// Seconds until a retry may succeed.
        retry_after: u64,
    },
    /// 429: the account has as many open (queued or processing) tasks as it may.
    #[error(
        "this account has {limit} unfinished tasks, the most it may have; retry when some have finished"
    )]
    TooManyOpenTasks {
        /// The cap.
        limit: u64,
        /// Seconds until a retry may succeed.
        retry_after: u64,
    },
    /// 500: a bug or unexpected backend failure.
    #[error("internal error")]
    Internal(#[source] BoxError),
    /// 503: a backend is temporarily unavailable.
    #[error("the service is temporarily unavailable; retry after {retry_after} seconds")]
    Unavailable {
        /// Seconds to wait.
        retry_after: u64,
        /// The cause (logged only).
        #[source]
        source: BoxError,
    },
}

impl ApiError {
    /// A 400 naming `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// A 400 about the request as a whole.
    pub fn invalid_body(message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: None,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized | ApiError::InvalidCallbackToken => StatusCode::UNAUTHORIZED,
            ApiError::InsufficientQuota { .. } => StatusCode::PAYMENT_REQUIRED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NotCancellable { .. } | ApiError::IdempotencyInProgress => {
                StatusCode::CONFLICT
            }
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited { .. } | ApiError::TooManyOpenTasks { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The machine code (`openapi.yaml`, `ErrorCode`).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. } => "invalid_request",
            ApiError::Unauthorized | ApiError::InvalidCallbackToken => "unauthorized",
            ApiError::InsufficientQuota { .. } => "insufficient_quota",
            ApiError::Forbidden => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::NotCancellable { .. } => "not_cancellable",
            ApiError::IdempotencyInProgress => "idempotency_in_progress",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::RateLimited { .. } | ApiError::TooManyOpenTasks { .. } => "rate_limited",
            ApiError::Internal(_) => "internal",
            ApiError::Unavailable { .. } => "unavailable",
        }
    }

    /// Builds the error response: status, `{"error": {...}}` body, and `Allow` / `Retry-After`
    /// headers where they apply. Internal causes are logged here.
    pub fn into_response(self) -> Response<Bytes> {
        match &self {
            ApiError::Internal(source) => {
                tracing::error!(error = %source, cause = ?source.source(), "internal error")
            }
            ApiError::Unavailable { source, .. } => {
                tracing::warn!(error = %source, "backend unavailable")
            }
            _ => {}
        }
        let mut error = json!({"code": self.code(), "message": self.to_string()});
        if let ApiError::InvalidRequest { param: Some(p), .. } = &self {
            error["param"] = json!(p);
        }
        let body = serde_json::to_vec(&json!({ "error": error })).unwrap_or_default();
        let mut resp = Response::new(Bytes::from(body));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self {
            ApiError::MethodNotAllowed { allow } => {
                h.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ApiError::RateLimited { retry_after }
            | ApiError::TooManyOpenTasks { retry_after, .. }
            | ApiError::Unavailable { retry_after, .. } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            // A 409 that retrying cannot fix: tell clients that retry 409s by default
            // (openai-python and other Stainless-generated SDKs) not to.
            ApiError::NotCancellable { .. } => {
                h.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            _ => {}
        }
        resp
    }
}

fn quota_message(needed: Option<u64>, available: u64) -> String {
    match needed {
        Some(n) => format!("this task costs {n} credits; the account has {available}"),
        None => format!("the account has too few credits ({available} available)"),
    }
}

impl From<PortError> for ApiError {
    fn from(e: PortError) -> Self {
        match e {
            PortError::NotFound => ApiError::NotFound("task not found"),
            PortError::InsufficientCredits { available } => ApiError::InsufficientQuota {
                needed: None,
                available,
            },
            PortError::ReservationLost => ApiError::IdempotencyInProgress,
            PortError::TooManyOpenTasks { limit } => ApiError::TooManyOpenTasks {
                limit,
                retry_after: 1,
            },
            PortError::Rejected(TransitionError::NotCancellable(s)) => {
                ApiError::NotCancellable { status: s.as_str() }
            }
            PortError::Rejected(other) => ApiError::Internal(Box::new(other)),
            PortError::Unavailable(source) => ApiError::Unavailable {
                retry_after: 1,
                source,
            },
            PortError::Internal(source) => ApiError::Internal(source),
            PortError::Halted => ApiError::Unavailable {
                retry_after: 1,
                source: Box::new(PortError::Halted),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_the_shape_and_no_internal_text() {
        let e = ApiError::Internal("database file /secret/path is locked".into());
        let resp = e.into_response();
        assert_eq!(resp.status(), 500);
        let body: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(body["error"]["code"], "internal");
        assert!(!body.to_string().contains("secret"));
    }

    #[test]
    fn invalid_request_names_the_param() {
        let resp = ApiError::invalid("duration", "too long").into_response();
        let body: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(body["error"]["param"], "duration");
        assert_eq!(resp.headers()["content-type"], "application/json");
    }

    #[test]
    fn retryable_errors_carry_retry_after() {
        let resp = ApiError::RateLimited { retry_after: 3 }.into_response();
        assert_eq!(resp.headers()["retry-after"], "3");
        let resp = ApiError::MethodNotAllowed { allow: "GET" }.into_response();
        assert_eq!(resp.headers()["allow"], "GET");
    }
}
