//! What every Lambda `main.rs` calls: tracing set up once, the HTTP handler (API Gateway HTTP
//! API or REST events into the core's [`Api`]) and the SQS handler (the core's [`Processor`]
//! with partial batch failures).

use std::sync::Arc;

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use bytes::Bytes;
use lambda_http::{Body, Request, RequestExt, Response};
use tasklane_core::App;
use tasklane_core::api::Api;
use tasklane_core::ports::WorkMessage;
use tasklane_core::processor::{Disposition, Processor};
use tracing::Instrument;

use crate::sqs::SqsQueue;

pub use tasklane_core::logging::init_or_exit as init_tracing;

/// Turns an API Gateway request into the core's request type, answers it, and turns the
/// answer back. REST (v1) events carry the stage in the path; the raw path is routed.
///
/// Result URLs in the answer are built on the API's own public URL: `TASKLANE_PUBLIC_URL`
/// when set (a custom domain), else the one the request came in on ([`public_url_of`]).
pub async fn handle_http(api: &Api, req: Request) -> Result<Response<Body>, lambda_http::Error> {
    let base = api
        .app()
        .config
        .public_url
        .clone()
        .or_else(|| public_url_of(&req));
    let path = req.raw_http_path().to_string();
    let (mut parts, body) = req.into_parts();
    let pq = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    parts.uri = pq
        .parse()
        .unwrap_or_else(|_| "/".parse().expect("static uri"));
    let bytes = match body {
        Body::Empty => Bytes::new(),
        Body::Text(t) => Bytes::from(t),
        Body::Binary(b) => Bytes::from(b),
        _ => Bytes::new(),
    };
    let resp = match base {
        Some(base) => {
            let handled = api.handle(http::Request::from_parts(parts, bytes));
            tasklane_core::result_urls::with_base_url(base, handled).await
        }
        None => api.handle(http::Request::from_parts(parts, bytes)).await,
    };
    let (parts, body) = resp.into_parts();
    let text = String::from_utf8(body.to_vec()).unwrap_or_default();
    Ok(Response::from_parts(parts, Body::Text(text)))
}

/// The public URL an API Gateway request came in on: `https://{domainName}`, followed by
/// `/{stage}` for a named stage on an `execute-api` domain (the `$default` stage of an HTTP
/// API has no path prefix; a custom domain maps its stage without one). API Gateway routes a
/// request by its domain to this API, so the domain is one of the API's own, not whatever a
/// client wrote in `Host`. `None` outside API Gateway (no request context).
pub fn public_url_of(req: &Request) -> Option<String> {
    use lambda_http::request::RequestContext;
    let (domain, stage) = match req.request_context_ref()? {
        RequestContext::ApiGatewayV2(c) => (c.domain_name.clone()?, c.stage.clone()),
        RequestContext::ApiGatewayV1(c) => (c.domain_name.clone()?, c.stage.clone()),
        _ => return None,
    };
    let domain = domain.trim_end_matches('/');
    match stage {
        Some(stage)
            if stage != "$default" && !stage.is_empty() && domain.contains(".execute-api.") =>
        {
            Some(format!("https://{domain}/{stage}"))
        }
        _ => Some(format!("https://{domain}")),
    }
}

/// Answers a signed result URL (`GET /v1/files/{key+}`, the `files` function): the key is
/// what follows `/v1/files/` in the raw path ([`tasklane_core::result_urls::answer`]).
pub async fn handle_files(
    files: &dyn tasklane_core::result_urls::SignedFiles,
    req: Request,
) -> Result<Response<Body>, lambda_http::Error> {
    use tasklane_core::result_urls::FILES_PREFIX;
    let path = req.raw_http_path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let resp = match path.strip_prefix(FILES_PREFIX) {
        Some(key) if !key.is_empty() => {
            tasklane_core::result_urls::answer(files, req.method(), key, &query).await
        }
        _ => tasklane_core::ApiError::NotFound("no such file").into_response(),
    };
    let (parts, body) = resp.into_parts();
    let text = String::from_utf8(body.to_vec()).unwrap_or_default();
    Ok(Response::from_parts(parts, Body::Text(text)))
}

/// Runs each SQS record through the processor. A record whose work must come back later, or
/// failed, is reported in `batchItemFailures` (so only it is retried, and after the queue's
/// `maxReceiveCount` it moves to the dead-letter queue); "retry later" also stretches its
/// visibility. An unparseable record is reported too, so it ends in the DLQ, not lost.
pub async fn handle_sqs(
    processor: &Processor,
    queue: &SqsQueue,
    event: SqsEvent,
) -> SqsBatchResponse {
    let mut failures = Vec::new();
    for record in event.records {
        let id = record.message_id.clone().unwrap_or_default();
        let msg: Option<WorkMessage> = record
            .body
            .as_deref()
            .and_then(|b| serde_json::from_str(b).ok());
        let Some(msg) = msg else {
            tracing::error!(message_id = %id, "unparseable work message; leaving it for the DLQ");
            failures.push(id);
            continue;
        };
        let span = tracing::info_span!("work", task_id = %msg.task_id(), message_id = %id);
        match processor.handle(&msg).instrument(span).await {
            Ok(Disposition::Done) => {}
            Ok(Disposition::RetryAfter(delay)) => {
                if let Some(handle) = record.receipt_handle.as_deref()
                    && let Err(e) = queue.change_visibility(handle, delay).await
                {
                    tracing::warn!(error = %e, "could not delay the message");
                }
                failures.push(id);
            }
            Err(e) => {
                tracing::warn!(task_id = %msg.task_id(), error = %e, "work failed; SQS retries it");
                failures.push(id);
            }
        }
    }
    batch_failures(failures)
}

/// Ends each dead-lettered SQS record's task the way exhausted work ends
/// ([`Processor::dead_letter`]). A record that cannot be handled now (a backend failed) is
/// reported so it comes back; an unparseable one is dropped with an error log, as nothing can
/// be done with it.
pub async fn handle_dead_letters(processor: &Processor, event: SqsEvent) -> SqsBatchResponse {
    let mut failures = Vec::new();
    for record in event.records {
        let id = record.message_id.clone().unwrap_or_default();
        let Some(msg) = record
            .body
            .as_deref()
            .and_then(|b| serde_json::from_str::<WorkMessage>(b).ok())
        else {
            tracing::error!(message_id = %id, body = ?record.body, "unparseable dead letter dropped");
            continue;
        };
        let span = tracing::info_span!("dead_letter", task_id = %msg.task_id(), message_id = %id);
        if let Err(e) = processor.dead_letter(&msg).instrument(span).await {
            tracing::warn!(task_id = %msg.task_id(), error = %e, "dead letter not handled; SQS retries it");
            failures.push(id);
        }
    }
    batch_failures(failures)
}

/// Runs one sweep (see [`tasklane_core::sweeper`]); the EventBridge schedule's event is ignored.
pub async fn handle_sweep(app: &App) -> Result<serde_json::Value, lambda_runtime::Error> {
    let report = tasklane_core::sweeper::sweep(app, chrono::Utc::now()).await?;
    tracing::info!(?report, "sweep");
    Ok(serde_json::json!({
        "due": report.due,
        "runs": report.runs,
        "callbacks": report.callbacks,
        "moved_on": report.moved_on,
    }))
}

fn batch_failures(ids: Vec<String>) -> SqsBatchResponse {
    let mut resp = SqsBatchResponse::default();
    resp.batch_item_failures = ids
        .into_iter()
        .map(|id| {
            let mut f = BatchItemFailure::default();
            f.item_identifier = id;
            f
        })
        .collect();
    resp
}

/// The shared dependencies of a Lambda function, built once at cold start.
pub struct Function {
    /// The core's shared dependencies (the sweeper runs on them).
    pub app: Arc<App>,
    /// The HTTP API.
    pub api: Api,
    /// The processor.
    pub processor: Processor,
    /// The work queue (for visibility changes).
    pub queue: SqsQueue,
    /// The queue of webhook deliveries (for visibility changes): its own, or the work queue.
    pub deliveries: SqsQueue,
    /// The results bucket (signed result URLs are answered on it).
    pub blobs: crate::s3::S3Blobs,
}

impl Function {
    /// Reads the settings from the environment, builds the clients and loads the model
    /// catalog (`TASKLANE_MODELS`). Exits the process with a message naming the variable (and
    /// for a catalog, the model and field) when configuration is missing or invalid.
    pub async fn from_env() -> Arc<Function> {
        init_tracing();
        let settings = match crate::AwsSettings::from_env() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "invalid configuration");
                eprintln!("tasklane: {e}");
                std::process::exit(2);
            }
        };
        // Metrics as EMF lines on stdout, which Lambda ships to CloudWatch Logs (on unless
        // TASKLANE_METRICS=off).
        if let Err(e) = tasklane_core::metrics::init(tasklane_core::metrics::MetricsMode::Emf) {
            tracing::error!(error = %e, "invalid configuration");
            eprintln!("tasklane: {e}");
            std::process::exit(2);
        }
        // Every AWS call bounded below the function's timeout (TASKLANE_AWS_TIMEOUT).
        let timeouts = match crate::settings::SdkTimeouts::from_env() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "invalid configuration");
                eprintln!("tasklane: {e}");
                std::process::exit(2);
            }
        };
        let signer = match crate::settings::result_url_signer_from_env() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "invalid configuration");
                eprintln!("tasklane: {e}");
                std::process::exit(2);
            }
        };
        let mut backends = crate::AwsBackends::connect_with(&settings, timeouts, None).await;
        if let Some(signer) = signer {
            backends.blobs = backends
                .blobs
                .with_signed_urls(signer, settings.core.public_url.clone());
        }
        let registry = match backends.registry(&settings).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "invalid model catalog");
                eprintln!("tasklane: {e}");
                std::process::exit(2);
            }
        };
        let app = backends.app_with(settings.core.clone(), registry);
        Arc::new(Function {
            app: app.clone(),
            api: Api::new(app.clone()),
            processor: Processor::new(app),
            deliveries: backends.delivery_queue().clone(),
            queue: backends.queue,
            blobs: backends.blobs,
        })
    }
}
