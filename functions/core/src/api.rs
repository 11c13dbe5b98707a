//! Request handling for every endpoint of API.md over `http` types.
//!
//! [`Api::handle`] is the whole HTTP API: the local server calls it for each request, and each
//! Lambda function calls it with the request API Gateway delivered. Routing, authentication,
//! validation, idempotency, credits and sync waiting all happen here.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;
use tracing::Instrument;

use crate::account::{Account, hash_api_key};
use crate::error::ApiError;
use crate::ports::{IdempotencyClaim, ListQuery, PortError, Reservation, WorkMessage};
use crate::task::{Callback, Task, TaskInput, TaskStatus, Transition};
use crate::validate::{SubmitRequest, SubmitRules, check_idempotency_key, parse_submit};
use crate::view::{TaskView, task_view};
use crate::{App, is_task_id};

/// The routes of the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v1/tasks`: GET list, POST submit.
    Tasks,
    /// `/v1/tasks/sync`: POST submit and wait.
    Sync,
    /// `/v1/tasks/{id}`: GET status.
    Task(String),
    /// `/v1/tasks/{id}/cancel`: POST cancel.
    Cancel(String),
    /// `/v1/account`: GET.
    Account,
    /// `/v1/models`: GET.
    Models,
    /// `/v1/upstream/{provider}/{task_id}`: POST, an upstream's callback about a task's run
    /// (authenticated by the per-task token in `?token=`, not by an API key).
    Upstream {
        /// The provider the callback claims to come from.
        provider: String,
        /// The task.
        task_id: String,
    },
}

impl Route {
    /// Matches a request path.
    pub fn parse(path: &str) -> Option<Route> {
        let rest = path.strip_prefix("/v1/")?;
        let parts: Vec<&str> = rest.split('/').collect();
        Some(match parts.as_slice() {
            ["tasks"] => Route::Tasks,
            ["tasks", "sync"] => Route::Sync,
            ["tasks", id] if !id.is_empty() => Route::Task((*id).to_string()),
            ["tasks", id, "cancel"] if !id.is_empty() => Route::Cancel((*id).to_string()),
            ["account"] => Route::Account,
            ["models"] => Route::Models,
            ["upstream", provider, task_id] if !provider.is_empty() && !task_id.is_empty() => {
                Route::Upstream {
                    provider: (*provider).to_string(),
                    task_id: (*task_id).to_string(),
                }
            }
            _ => return None,
        })
    }

    /// The task the route is about, if any (as the path gives it: not checked to be an id).
    pub fn task_id(&self) -> Option<&str> {
        match self {
            Route::Task(id) | Route::Cancel(id) | Route::Upstream { task_id: id, .. } => Some(id),
            _ => None,
        }
    }

    /// The methods the route answers, as an `Allow` header value: the one table of them, which
    /// [`Route::accepts`] reads too.
    pub fn allow(&self) -> &'static str {
        match self {
            Route::Tasks => "GET, POST",
            Route::Sync | Route::Cancel(_) | Route::Upstream { .. } => "POST",
            Route::Task(_) | Route::Account | Route::Models => "GET",
        }
    }

    /// Whether the route answers `method` (otherwise: 405 with [`Route::allow`]).
    pub fn accepts(&self, method: &Method) -> bool {
        self.allow().split(", ").any(|m| m == method.as_str())
    }
}

/// The HTTP API over the shared [`App`].
#[derive(Clone)]
pub struct Api {
    app: Arc<App>,
    /// Handles upstream callbacks, which end tasks like a worker does.
    processor: crate::processor::Processor,
}

/// Which submit flavour a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Submit {
    /// `POST /v1/tasks` (may carry `Prefer: wait=N`).
    Async,
    /// `POST /v1/tasks/sync`.
    Sync,
}

impl Api {
    /// An API over `app`.
    pub fn new(app: Arc<App>) -> Self {
        let processor = crate::processor::Processor::new(app.clone());
        Api { app, processor }
    }

    /// The largest body a request to `path` may have: an upstream's callback carries the
    /// outputs of Cog models inline ([`crate::upstream::MAX_CALLBACK_BYTES`]); every other
    /// request is held to [`crate::Config::max_body_bytes`].
    pub fn body_limit(&self, path: &str) -> usize {
        match Route::parse(path) {
            Some(Route::Upstream { .. }) => crate::upstream::MAX_CALLBACK_BYTES,
            _ => self.app.config.max_body_bytes,
        }
    }

    /// The shared dependencies.
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Answers one request. Never panics on input; every failure has the API error shape.
    pub async fn handle(&self, req: Request<Bytes>) -> Response<Bytes> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        // Every log line of a request about a task carries its id: known from the path
        // (status, cancel, upstream callbacks) or recorded once a submit has made it.
        let span = tracing::info_span!("request", task_id = tracing::field::Empty);
        if let Some(route) = Route::parse(&path)
            && let Some(id) = route.task_id().filter(|id| is_task_id(id))
        {
            span.record("task_id", id);
        }
        let resp = self
            .dispatch(req)
            .instrument(span)
            .await
            .unwrap_or_else(ApiError::into_response);
        tracing::debug!(%method, %path, status = resp.status().as_u16(), "request");
        resp
    }

    async fn dispatch(&self, req: Request<Bytes>) -> Result<Response<Bytes>, ApiError> {
        let route = Route::parse(req.uri().path()).ok_or(ApiError::NotFound("no such route"))?;
        if !route.accepts(req.method()) {
            return Err(ApiError::MethodNotAllowed {
                allow: route.allow(),
            });
        }
        let limit = self.body_limit(req.uri().path());
        if req.body().len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        if let Route::Upstream { provider, task_id } = &route {
            return self.upstream_callback(provider, task_id, &req).await;
        }
        let account = self.authenticate(req.headers()).await?;
        if let Some(limiter) = &self.app.limiter
            && let Err(wait) = limiter.check(&account.id)
        {
            return Err(ApiError::RateLimited {
                retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
            });
        }
        match route {
            Route::Tasks if req.method() == Method::POST => {
                self.submit(&account, &req, Submit::Async).await
            }
            Route::Tasks => self.list(&account, req.uri().query().unwrap_or("")).await,
            Route::Sync => self.submit(&account, &req, Submit::Sync).await,
            Route::Task(id) => self.status(&account, &id).await,
            Route::Cancel(id) => self.cancel(&account, &id).await,
            Route::Account => {
                // The key lookup may come from an eventually consistent index: read the
                // account itself for its current credits.
                let account = self
                    .app
                    .store
                    .account(&account.id)
                    .await?
                    .unwrap_or(account);
                json_response(
                    StatusCode::OK,
                    &json!({
                        "account_id": account.id,
                        "credits": account.credits,
                        "open_tasks": account.open_tasks,
                        "max_open_tasks": self.app.config.max_open_tasks,
                        "webhook_secret": account.webhook_secret,
                    }),
                )
            }
            Route::Models => {
                let data: Vec<_> = self.app.registry.models().map(|m| m.describe()).collect();
                json_response(StatusCode::OK, &json!({ "data": data }))
            }
            Route::Upstream { .. } => Err(ApiError::NotFound("no such route")),
        }
    }

    /// `POST /v1/upstream/{provider}/{task_id}?token=…`: 200 `{"received": true}` once the
    /// callback is recorded or found to change nothing.
    async fn upstream_callback(
        &self,
        provider: &str,
        task_id: &str,
        req: &Request<Bytes>,
    ) -> Result<Response<Bytes>, ApiError> {
        let token = req.uri().query().and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
        });
        let callback = crate::ports::CallbackRequest {
            headers: req.headers(),
            body: req.body(),
        };
        let outcome = self
            .processor
            .upstream_callback(provider, task_id, token.as_deref(), callback)
            .await?;
        tracing::info!(task_id, provider, ?outcome, "upstream callback");
        json_response(StatusCode::OK, &json!({ "received": true }))
    }

    async fn authenticate(&self, headers: &HeaderMap) -> Result<Account, ApiError> {
        let value = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(ApiError::Unauthorized)?;
        let (scheme, key) = value.trim().split_once(' ').ok_or(ApiError::Unauthorized)?;
        let key = key.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || key.is_empty() || key.len() > 256 {
            return Err(ApiError::Unauthorized);
        }
        self.app
            .store
            .account_by_key_hash(&hash_api_key(key))
            .await?
            .ok_or(ApiError::Unauthorized)
    }

    async fn submit(
        &self,
        account: &Account,
        req: &Request<Bytes>,
        kind: Submit,
    ) -> Result<Response<Bytes>, ApiError> {
        require_json(req.headers())?;
        let rules = SubmitRules {
            allow_timeout: kind == Submit::Sync,
            callback_allow_private: self.app.config.callback_allow_private,
        };
        let sub = parse_submit(req.body(), &self.app.registry, rules)?;
        let wait = match kind {
            Submit::Sync => Some(
                sub.timeout
                    .map(|t| Duration::try_from_secs_f64(t).unwrap_or(Duration::MAX))
                    .unwrap_or(self.app.config.sync_wait_default),
            ),
            Submit::Async => prefer_wait(req.headers())?,
        }
        .map(|w| w.min(self.app.config.sync_wait_cap));
        let idempotency_key = match req.headers().get("idempotency-key") {
            None => None,
            Some(v) => {
                let k = v.to_str().map_err(|_| {
                    ApiError::invalid("Idempotency-Key", "Idempotency-Key must be printable ASCII")
                })?;
                check_idempotency_key(k)?;
                Some(k.to_string())
            }
        };
        // From here on the submit writes. It runs to its end on a task of its own: a client
        // that hangs up drops this future, and must not leave a paid task without its work
        // message, or an idempotency reservation that never completes.
        let api = self.clone();
        let owner = account.clone();
        let commit = async move {
            match idempotency_key {
                None => Ok((api.create(&owner, &sub, None).await?, false)),
                Some(key) => api.create_idempotent(&owner, &sub, key).await,
            }
        };
        // Its logs stay in the request's span (on Lambda: the invocation's request id).
        let (task, replayed) = tokio::spawn(commit.in_current_span())
            .await
            .map_err(|e| ApiError::Internal(format!("submit task ended: {e}").into()))??;
        tracing::Span::current().record("task_id", task.id.as_str());
        let task = match wait {
            Some(w) => self.wait_terminal(task, w).await?,
            None => task,
        };
        let mut view = self.view(&task).await?;
        let status = if task.status.is_terminal() && wait.is_some() {
            StatusCode::OK
        } else {
            if kind == Submit::Sync || wait.is_some() {
                view.poll_url = Some(format!("/v1/tasks/{}", task.id));
            }
            StatusCode::ACCEPTED
        };
        let mut resp = self.task_response(status, &view, &task)?;
        let h = resp.headers_mut();
        if status == StatusCode::ACCEPTED {
            h.insert(
                header::LOCATION,
                header_value(&format!("/v1/tasks/{}", task.id)),
            );
        }
        if let (Submit::Async, Some(w)) = (kind, wait) {
            h.insert(
                "preference-applied",
                header_value(&format!("wait={}", w.as_secs())),
            );
        }
        if replayed {
            h.insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        Ok(resp)
    }

    async fn create_idempotent(
        &self,
        account: &Account,
        sub: &SubmitRequest,
        key: String,
    ) -> Result<(Task, bool), ApiError> {
        let cfg = &self.app.config;
        let store = &self.app.store;
        let reservation = store
            .reserve_idempotency(
                &account.id,
                &key,
                &sub.request_hash,
                chrono::Utc::now(),
                cfg.idempotency_in_flight,
                cfg.idempotency_retain,
            )
            .await?;
        match reservation {
            Reservation::Reserved { token } => {
                let claim = IdempotencyClaim { key, token };
                match self.create(account, sub, Some(&claim)).await {
                    Ok(task) => Ok((task, false)),
                    Err(e) => {
                        if let Err(release) = store
                            .release_idempotency(&account.id, &claim.key, &claim.token)
                            .await
                        {
                            tracing::warn!(error = %release, "could not release idempotency reservation");
                        }
                        Err(e)
                    }
                }
            }
            Reservation::InProgress { request_hash } if request_hash == sub.request_hash => {
                Err(ApiError::IdempotencyInProgress)
            }
            Reservation::Completed {
                request_hash,
                task_id,
            } if request_hash == sub.request_hash => {
                let task = store.task(&task_id).await?.ok_or_else(|| {
                    ApiError::Internal(
                        format!("idempotency record names missing task {task_id}").into(),
                    )
                })?;
                Ok((task, true))
            }
            Reservation::InProgress { .. } | Reservation::Completed { .. } => {
                Err(ApiError::IdempotencyKeyReused)
            }
        }
    }

    /// Debits, stores and enqueues a new task. A failed enqueue does not fail the submit: the
    /// stored task is swept up ([`crate::sweeper`]) once the queue works again.
    async fn create(
        &self,
        account: &Account,
        sub: &SubmitRequest,
        claim: Option<&IdempotencyClaim>,
    ) -> Result<Task, ApiError> {
        let spec = self
            .app
            .registry
            .get(&sub.model)
            .ok_or_else(|| ApiError::invalid("model", "unknown model"))?;
        let cost = spec.cost(sub.duration);
        if account.credits < cost {
            return Err(ApiError::InsufficientQuota {
                needed: Some(cost),
                available: account.credits,
            });
        }
        let input = TaskInput {
            prompt: sub.prompt.clone(),
            duration: sub.duration,
            params: sub.params.clone(),
        };
        let task = Task {
            action: sub.action.clone(),
            callback: sub.callback_url.as_ref().map(Callback::pending),
            metadata: sub.metadata.clone(),
            ..Task::queued(
                self.app.new_task_id(),
                &account.id,
                &sub.model,
                input,
                cost,
                chrono::Utc::now(),
            )
        };
        self.app
            .store
            .insert_task(&task, claim, self.app.config.max_open_tasks)
            .await
            .map_err(|e| match e {
                PortError::InsufficientCredits { available } => ApiError::InsufficientQuota {
                    needed: Some(cost),
                    available,
                },
                other => other.into(),
            })?;
        let run = WorkMessage::Run {
            task_id: task.id.clone(),
        };
        if let Err(e) = self.app.queue.enqueue(&run, Duration::ZERO).await {
            // The task is stored and paid for: that is the commit point. Its wait started at
            // submit (`waiting_since`), so the sweeper enqueues it once the queue takes messages
            // again; the client keeps its 202 and its task.
            tracing::error!(task_id = %task.id, error = %e, "enqueue failed; the sweeper will queue the task");
        }
        tracing::Span::current().record("task_id", task.id.as_str());
        tracing::info!(task_id = %task.id, model = %task.model, credits = cost, "task submitted");
        crate::metrics::submitted(&task);
        Ok(task)
    }

    /// Waits until `task` is terminal or `wait` has passed, woken in-process or by polling.
    async fn wait_terminal(&self, mut task: Task, wait: Duration) -> Result<Task, ApiError> {
        let deadline = Instant::now() + wait;
        let sub = self.app.events.subscribe(&task.id);
        let mut poll = Duration::from_millis(100);
        loop {
            let now = Instant::now();
            if task.status.is_terminal() || now >= deadline {
                return Ok(task);
            }
            let notified = sub.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Re-read after registering so a change in between is not missed.
            task = self
                .app
                .store
                .task(&task.id)
                .await?
                .ok_or(ApiError::NotFound("task not found"))?;
            if task.status.is_terminal() {
                return Ok(task);
            }
            let nap = poll.min(deadline - Instant::now().min(deadline));
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(nap) => { poll = (poll * 2).min(Duration::from_secs(1)); }
            }
        }
    }

    async fn owned_task(&self, account: &Account, id: &str) -> Result<Task, ApiError> {
        if !is_task_id(id) {
            return Err(ApiError::NotFound("task not found"));
        }
        match self.app.store.task(id).await? {
            Some(t) if t.account_id == account.id => Ok(t),
            _ => Err(ApiError::NotFound("task not found")),
        }
    }

    async fn status(&self, account: &Account, id: &str) -> Result<Response<Bytes>, ApiError> {
        let task = self.owned_task(account, id).await?;
        let view = self.view(&task).await?;
        self.task_response(StatusCode::OK, &view, &task)
    }

    async fn cancel(&self, account: &Account, id: &str) -> Result<Response<Bytes>, ApiError> {
        let before = self.owned_task(account, id).await?;
        let task = self
            .app
            .store
            .update_task_from(&before, &Transition::Cancel)
            .await?;
        if before.status == TaskStatus::Queued {
            tracing::info!(task_id = %id, refunded = task.cost.credits, "task cancelled");
            crate::metrics::cancelled(&task);
            self.app.events.notify(id);
            if task.first_callback_owed() {
                let msg = WorkMessage::first_delivery(&task.id);
                if let Err(e) = self.app.queue.enqueue(&msg, Duration::ZERO).await {
                    tracing::error!(task_id = %id, error = %e, "could not enqueue the cancel webhook");
                }
            }
        }
        let view = self.view(&task).await?;
        self.task_response(StatusCode::OK, &view, &task)
    }

    async fn list(&self, account: &Account, query: &str) -> Result<Response<Bytes>, ApiError> {
        let mut q = ListQuery {
            limit: 20,
            ..ListQuery::default()
        };
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "status" => q.status = Some(TaskStatus::parse(&v).ok_or_else(|| {
                    ApiError::invalid(
                        "status",
                        "status must be one of queued, processing, completed, failed, cancelled",
                    )
                })?),
                "model" => {
                    // Characters, as openapi.yaml's `maxLength` counts them, not bytes.
                    if v.is_empty() || v.chars().count() > 64 {
                        return Err(ApiError::invalid(
                            "model",
                            "model must be 1 to 64 characters",
                        ));
                    }
                    q.model = Some(v.into_owned());
                }
                "limit" => {
                    q.limit = parse_limit(&v).ok_or_else(|| {
                        ApiError::invalid("limit", "limit must be an integer from 1 to 100")
                    })?
                }
                // An empty cursor is no cursor: the first page (openapi.yaml, `cursor`).
                "cursor" if v.is_empty() => q.before = None,
                "cursor" => q.before = Some(decode_cursor(&v)?),
                other => {
                    let name: String = other.chars().take(64).collect();
                    return Err(ApiError::invalid(
                        name.clone(),
                        format!("unknown query parameter {name:?}"),
                    ));
                }
            }
        }
        let page = self.app.store.list_tasks(&account.id, &q).await?;
        let mut data = Vec::with_capacity(page.tasks.len());
        for t in &page.tasks {
            data.push(self.view(t).await?);
        }
        let next_cursor = page.next_before.map(|id| URL_SAFE_NO_PAD.encode(id));
        json_response(StatusCode::OK, &TaskList { data, next_cursor })
    }

    async fn view(&self, task: &Task) -> Result<TaskView, ApiError> {
        Ok(task_view(
            task,
            self.app.blobs.as_ref(),
            self.app.config.result_url_ttl,
        )
        .await?)
    }

    fn task_response(
        &self,
        status: StatusCode,
        view: &TaskView,
        task: &Task,
    ) -> Result<Response<Bytes>, ApiError> {
        let mut resp = json_response(status, view)?;
        if !task.status.is_terminal() {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(self.app.config.poll_after_secs),
            );
        }
        Ok(resp)
    }
}

/// How many tasks a filtered list request reads at most per task it may return: a page of
/// `limit` tasks filtered by status or model reads at most `limit * LIST_READS_PER_TASK` of the
/// account's tasks (1,000 for the largest page), newest first, and hands back a cursor after
/// the last one read when it stopped there, so a page may hold fewer than `limit` tasks (even
/// none) while `next_cursor` is set. Without the bound `?status=queued` on an account with
/// millions of finished tasks would read all of them to fill one page: on DynamoDB a filter is
/// applied after the read (a Query page reads up to 1 MB and is charged for what it read,
/// matching or not), so the cost and time of such a request grew with the account's history.
pub const LIST_READS_PER_TASK: usize = 10;

/// The most tasks one list request for `query` reads: `limit + 1` without a filter (the page
/// and whether more follow), `limit * LIST_READS_PER_TASK` with one ([`LIST_READS_PER_TASK`]).
/// The stores stop there and answer the id of the last task read as the next cursor.
pub fn list_read_budget(query: &ListQuery) -> usize {
    let want = query.limit.saturating_add(1);
    if query.status.is_none() && query.model.is_none() {
        want
    } else {
        query.limit.saturating_mul(LIST_READS_PER_TASK).max(want)
    }
}

/// The body of `GET /v1/tasks`.
#[derive(Serialize)]
struct TaskList {
    data: Vec<TaskView>,
    next_cursor: Option<String>,
}

/// A page size from 1 to 100 in decimal digits. Like JSON Schema's `integer`, a zero fraction
/// (`20.0`) counts; an exponent (`2e1`) or a sign does not (openapi.yaml, `limit`).
fn parse_limit(v: &str) -> Option<usize> {
    let whole = match v.split_once('.') {
        None => v,
        Some((whole, zeros)) if !zeros.is_empty() && zeros.bytes().all(|b| b == b'0') => whole,
        Some(_) => return None,
    };
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    whole
        .parse::<usize>()
        .ok()
        .filter(|l| (1..=100).contains(l))
}

fn decode_cursor(c: &str) -> Result<String, ApiError> {
    URL_SAFE_NO_PAD
        .decode(c)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|id| is_task_id(id))
        .ok_or_else(|| ApiError::invalid("cursor", "cursor is not one this API returned"))
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Serializes `body` as a JSON response.
pub fn json_response(
    status: StatusCode,
    body: &impl Serialize,
) -> Result<Response<Bytes>, ApiError> {
    let bytes = serde_json::to_vec(body).map_err(|e| ApiError::Internal(Box::new(e)))?;
    let mut resp = Response::new(Bytes::from(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or(ApiError::UnsupportedMediaType)?;
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// Parses `Prefer: wait=N` (RFC 7240); other preferences are ignored.
fn prefer_wait(headers: &HeaderMap) -> Result<Option<Duration>, ApiError> {
    for v in headers.get_all("prefer") {
        let s = v
            .to_str()
            .map_err(|_| ApiError::invalid("Prefer", "Prefer must be ASCII"))?;
        // Preferences are separated by `,`; each may carry `;` parameters (RFC 7240).
        for pref in s.split(',') {
            let token = pref.split(';').next().unwrap_or("");
            let Some((k, val)) = token.split_once('=') else {
                continue;
            };
            if k.trim().eq_ignore_ascii_case("wait") {
                let secs: u64 = val.trim().trim_matches('"').parse().map_err(|_| {
                    ApiError::invalid("Prefer", "Prefer: wait must be a whole number of seconds")
                })?;
                return Ok(Some(Duration::from_secs(secs)));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_api_md() {
        assert_eq!(Route::parse("/v1/tasks"), Some(Route::Tasks));
        assert_eq!(Route::parse("/v1/tasks/sync"), Some(Route::Sync));
        assert_eq!(
            Route::parse("/v1/tasks/abc"),
            Some(Route::Task("abc".into()))
        );
        assert_eq!(
            Route::parse("/v1/tasks/abc/cancel"),
            Some(Route::Cancel("abc".into()))
        );
        assert_eq!(Route::parse("/v1/account"), Some(Route::Account));
        assert_eq!(Route::parse("/v1/tasks/"), None);
        assert_eq!(Route::parse("/v2/tasks"), None);
        assert_eq!(Route::parse("/v1/tasks/a/b/c"), None);
        assert_eq!(
            Route::parse("/v1/upstream/cog/task_1"),
            Some(Route::Upstream {
                provider: "cog".into(),
                task_id: "task_1".into()
            })
        );
        assert_eq!(Route::parse("/v1/upstream/cog"), None);
    }

    #[test]
    fn each_route_accepts_exactly_the_methods_its_allow_header_names() {
        let routes = [
            Route::Tasks,
            Route::Sync,
            Route::Task("abc".into()),
            Route::Cancel("abc".into()),
            Route::Account,
            Route::Models,
            Route::Upstream {
                provider: "cog".into(),
                task_id: "abc".into(),
            },
        ];
        let methods = [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::HEAD,
            Method::OPTIONS,
            Method::from_bytes(b"get").unwrap(),
            Method::from_bytes(b"GETPOST").unwrap(),
        ];
        for route in routes {
            let accepted: Vec<&str> = methods
                .iter()
                .filter(|m| route.accepts(m))
                .map(Method::as_str)
                .collect();
            let want = match route {
                Route::Tasks => vec!["GET", "POST"],
                Route::Sync | Route::Cancel(_) | Route::Upstream { .. } => vec!["POST"],
                Route::Task(_) | Route::Account | Route::Models => vec!["GET"],
            };
            assert_eq!(accepted, want, "{route:?}");
            assert_eq!(route.allow(), want.join(", "), "{route:?}");
        }
    }

    #[test]
    fn limit_is_a_whole_number_from_1_to_100_with_or_without_a_zero_fraction() {
        for (v, want) in [
            ("1", Some(1)),
            ("100", Some(100)),
            ("17.0", Some(17)),
            ("100.00", Some(100)),
            ("007", Some(7)),
            ("1.7e1", None),
            ("1e2", None),
            ("17.", None),
            (".0", None),
            ("+17", None),
            ("17.01", None),
            ("18446744073709551616", None),
            ("0", None),
            ("101", None),
            ("100.5", None),
            ("0.0", None),
            ("-1", None),
            ("NaN", None),
            ("inf", None),
            ("", None),
            ("abc", None),
        ] {
            assert_eq!(parse_limit(v), want, "{v:?}");
        }
    }

    #[test]
    fn prefer_wait_is_parsed_among_other_preferences() {
        let mut h = HeaderMap::new();
        h.insert("prefer", HeaderValue::from_static("respond-async, wait=7"));
        assert_eq!(prefer_wait(&h).unwrap(), Some(Duration::from_secs(7)));
        h.insert(
            "prefer",
            HeaderValue::from_static("wait=3; foo=bar, handling=lenient"),
        );
        assert_eq!(prefer_wait(&h).unwrap(), Some(Duration::from_secs(3)));
        h.insert("prefer", HeaderValue::from_static("wait=abc"));
        assert!(prefer_wait(&h).is_err());
        assert_eq!(prefer_wait(&HeaderMap::new()).unwrap(), None);
    }
}
