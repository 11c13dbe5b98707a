//! A Lambda Runtime API emulator on 127.0.0.1, serving one function process as Lambda's does:
//! the function asks `GET /2018-06-01/runtime/invocation/next`, gets the next queued event with
//! the invocation headers (request id, deadline, function ARN, trace id), and posts its answer
//! to `.../invocation/{id}/response` (or `.../error`, or `.../init/error` when it cannot start).
//! Requests outside the Runtime API, or about an unknown invocation, are recorded
//! ([`RuntimeApi::unexpected`]).
//!
//! Start a function binary with `AWS_LAMBDA_RUNTIME_API` set to [`RuntimeApi::addr`], queue
//! events with [`RuntimeApi::enqueue`] and await each [`Reply`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

/// The path prefix of every Runtime API route.
const RUNTIME_PREFIX: &str = "/2018-06-01/runtime/";

/// An event waiting for the function to ask for it.
struct Invocation {
    request_id: String,
    trace_id: String,
    event: String,
}

/// What a function posted for one invocation.
#[derive(Debug)]
pub enum Reply {
    /// `POST /runtime/invocation/{id}/response`: the function's result, as JSON.
    Response(Value),
    /// `POST /runtime/invocation/{id}/error`: the `Lambda-Runtime-Function-Error-Type` header
    /// and the diagnostic body (`errorType`, `errorMessage`).
    Error {
        /// The `Lambda-Runtime-Function-Error-Type` header.
        error_type: Option<String>,
        /// The body.
        diagnostic: Value,
    },
}

/// One invocation and what the function answered.
#[derive(Debug)]
pub struct Invoked {
    /// `Lambda-Runtime-Aws-Request-Id` of the invocation.
    pub request_id: String,
    /// `Lambda-Runtime-Trace-Id` of the invocation.
    pub trace_id: String,
    /// What the function posted.
    pub reply: Reply,
}

/// A report on `POST /runtime/init/error`.
#[derive(Debug, Clone)]
pub struct InitError {
    /// The `Lambda-Runtime-Function-Error-Type` header.
    pub error_type: Option<String>,
    /// The body.
    pub diagnostic: Value,
}

/// What the emulator has seen and what it still has to hand out.
struct RuntimeState {
    function_name: String,
    queue: mpsc::UnboundedSender<Invocation>,
    pending: tokio::sync::Mutex<mpsc::UnboundedReceiver<Invocation>>,
    awaiting: Mutex<HashMap<String, oneshot::Sender<Reply>>>,
    /// How many `next` requests arrived (a long poll counts when it arrives).
    next_requests: watch::Sender<usize>,
    first_next_at: Mutex<Option<Instant>>,
    init_errors: Mutex<Vec<InitError>>,
    /// Requests that are not part of the Runtime API, or name an unknown invocation.
    unexpected: Mutex<Vec<String>>,
}

/// A Lambda Runtime API on 127.0.0.1 serving one function process, as Lambda's does.
pub struct RuntimeApi {
    addr: SocketAddr,
    state: Arc<RuntimeState>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl RuntimeApi {
    /// Starts an emulator on 127.0.0.1 for the function `function_name` (its ARN names it).
    pub async fn start(function_name: &str) -> RuntimeApi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the Runtime API emulator");
        let addr = listener.local_addr().expect("its address");
        let (queue, pending) = mpsc::unbounded_channel();
        let state = Arc::new(RuntimeState {
            function_name: function_name.to_string(),
            queue,
            pending: tokio::sync::Mutex::new(pending),
            awaiting: Mutex::new(HashMap::new()),
            next_requests: watch::channel(0).0,
            first_next_at: Mutex::new(None),
            init_errors: Mutex::new(Vec::new()),
            unexpected: Mutex::new(Vec::new()),
        });
        let shared = state.clone();
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_connection(stream, shared.clone()));
            }
        });
        RuntimeApi {
            addr,
            state,
            server,
        }
    }

    /// Queues `event` for the function's next `next` request; returns the invocation's request
    /// id and trace id, and where its [`Reply`] arrives.
    pub fn enqueue(&self, event: &str) -> (String, String, oneshot::Receiver<Reply>) {
        let request_id = uuid_like();
        let trace_id = trace_id();
        let (tx, rx) = oneshot::channel();
        self.state
            .awaiting
            .lock()
            .unwrap()
            .insert(request_id.clone(), tx);
        self.state
            .queue
            .send(Invocation {
                request_id: request_id.clone(),
                trace_id: trace_id.clone(),
                event: event.to_string(),
            })
            .expect("the emulator holds its own queue");
        (request_id, trace_id, rx)
    }
    /// A command that starts the function binary at `path` as Lambda would behind this
    /// Runtime API: nothing of the caller's environment, and the Lambda variables of a
    /// function named as this API's with `memory` MB (JSON logs at INFO, no instance metadata).
    /// The caller adds the function's own configuration.
    pub fn command(
        &self,
        path: impl AsRef<std::ffi::OsStr>,
        memory: u32,
    ) -> tokio::process::Command {
        let name = &self.state.function_name;
        let mut cmd = tokio::process::Command::new(path);
        cmd.env_clear()
            .env("AWS_LAMBDA_RUNTIME_API", self.addr().to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", name)
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", memory.to_string())
            .env("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{name}"))
            .env(
                "AWS_LAMBDA_LOG_STREAM_NAME",
                "2025/07/01/[$LATEST]0123456789abcdef0123456789abcdef",
            )
            .env("AWS_LAMBDA_LOG_FORMAT", "JSON")
            .env("AWS_LAMBDA_LOG_LEVEL", "INFO")
            .env("AWS_EC2_METADATA_DISABLED", "true");
        cmd
    }

    /// Where it listens: the value of `AWS_LAMBDA_RUNTIME_API` for the function.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many `next` requests arrived (a long poll counts when it arrives).
    pub fn next_requests(&self) -> usize {
        *self.state.next_requests.borrow()
    }

    /// When the first `next` request arrived.
    pub fn first_next_at(&self) -> Option<Instant> {
        *self.state.first_next_at.lock().unwrap()
    }

    /// The reports on `POST /runtime/init/error`.
    pub fn init_errors(&self) -> Vec<InitError> {
        self.state.init_errors.lock().unwrap().clone()
    }

    /// Requests that are not part of the Runtime API, or name an unknown invocation.
    pub fn unexpected(&self) -> Vec<String> {
        self.state.unexpected.lock().unwrap().clone()
    }
}

/// A request as the runtime client sends it.
struct HttpRequest {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// Serves one keep-alive connection of the runtime client (hyper): requests one after another.
async fn serve_connection(stream: TcpStream, state: Arc<RuntimeState>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    while let Ok(Some(req)) = read_request(&mut reader).await {
        let resp = answer(&state, req).await;
        if write.write_all(&resp).await.is_err() {
            return;
        }
    }
}

/// Reads one HTTP/1.1 request (`Content-Length` or chunked body); `None` at end of stream.
async fn read_request<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Option<HttpRequest>> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or_default().to_string();
    let path = words.next().unwrap_or_default().to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let chunked = headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        let mut body = Vec::new();
        loop {
            let mut size = String::new();
            r.read_line(&mut size).await?;
            let size = size.trim().split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size, 16).map_err(std::io::Error::other)?;
            if size == 0 {
                // Trailers, up to the blank line.
                loop {
                    let mut t = String::new();
                    if r.read_line(&mut t).await? == 0 || t.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).await?;
            chunk.truncate(size);
            body.extend_from_slice(&chunk);
        }
        body
    } else {
        let len = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        r.read_exact(&mut body).await?;
        body
    };
    Ok(Some(HttpRequest {
        method,
        path,
        headers,
        body,
    }))
}

fn http_response(status: u16, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        _ => "Not Found",
    };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\n");
    out.push_str("content-type: application/json\r\n");
    out.push_str(&format!("content-length: {}\r\n", body.len()));
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

fn accepted() -> Vec<u8> {
    http_response(202, &[], br#"{"status":"OK"}"#)
}

fn json_body(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

/// Answers one Runtime API request.
async fn answer(state: &RuntimeState, req: HttpRequest) -> Vec<u8> {
    let route = req.path.strip_prefix(RUNTIME_PREFIX).unwrap_or_default();
    let error_type = req
        .headers
        .get("lambda-runtime-function-error-type")
        .cloned();
    if req.method == "GET" && route == "invocation/next" {
        return next_invocation(state).await;
    }
    if req.method == "POST" && route == "init/error" {
        state.init_errors.lock().unwrap().push(InitError {
            error_type,
            diagnostic: json_body(&req.body),
        });
        return accepted();
    }
    let invocation = route.strip_prefix("invocation/").and_then(|rest| {
        rest.strip_suffix("/response")
            .map(|id| (id, true))
            .or_else(|| rest.strip_suffix("/error").map(|id| (id, false)))
    });
    if let Some((id, ok)) = invocation
        && req.method == "POST"
    {
        let reply = if ok {
            Reply::Response(json_body(&req.body))
        } else {
            Reply::Error {
                error_type,
                diagnostic: json_body(&req.body),
            }
        };
        let waiter = state.awaiting.lock().unwrap().remove(id);
        return match waiter {
            Some(tx) => {
                let _ = tx.send(reply);
                accepted()
            }
            None => {
                state
                    .unexpected
                    .lock()
                    .unwrap()
                    .push(format!("{} {} (unknown invocation)", req.method, req.path));
                http_response(
                    400,
                    &[],
                    br#"{"errorMessage":"Invalid request ID","errorType":"InvalidRequestID"}"#,
                )
            }
        };
    }
    state
        .unexpected
        .lock()
        .unwrap()
        .push(format!("{} {}", req.method, req.path));
    http_response(
        404,
        &[],
        br#"{"errorMessage":"Unknown resource","errorType":"NotFound"}"#,
    )
}

/// The long poll: waits for the next queued event and hands it out with its headers.
async fn next_invocation(state: &RuntimeState) -> Vec<u8> {
    state
        .first_next_at
        .lock()
        .unwrap()
        .get_or_insert_with(Instant::now);
    state.next_requests.send_modify(|n| *n += 1);
    let Some(inv) = state.pending.lock().await.recv().await else {
        return http_response(404, &[], b"{}");
    };
    let deadline = SystemTime::now() + Duration::from_secs(900);
    let deadline_ms = deadline
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    let arn = format!(
        "arn:aws:lambda:us-east-1:123456789012:function:{}",
        state.function_name
    );
    http_response(
        200,
        &[
            ("Lambda-Runtime-Aws-Request-Id", inv.request_id),
            ("Lambda-Runtime-Deadline-Ms", deadline_ms.to_string()),
            ("Lambda-Runtime-Invoked-Function-Arn", arn),
            ("Lambda-Runtime-Trace-Id", inv.trace_id),
        ],
        inv.event.as_bytes(),
    )
}

/// A request id shaped like Lambda's (a UUID).
fn uuid_like() -> String {
    let h = format!("{:032x}", ulid::Ulid::new().0);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// An X-Ray trace header shaped like Lambda's.
fn trace_id() -> String {
    let h = format!("{:032x}", ulid::Ulid::new().0);
    let epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    format!(
        "Root=1-{epoch:08x}-{};Parent={};Sampled=0",
        &h[8..32],
        &h[0..16]
    )
}

/// An API Gateway (HTTP API, payload 2.0) response as the function posted it.
pub struct GatewayAnswer {
    /// `statusCode`.
    pub status: u64,
    /// `headers`.
    pub headers: Map<String, Value>,
    /// `body`, parsed as JSON.
    pub body: Value,
}

impl GatewayAnswer {
    /// A response header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(Value::as_str)
    }
}

impl Invoked {
    /// The response of an HTTP function, checked against the HTTP API response format.
    pub fn gateway(&self) -> GatewayAnswer {
        let Reply::Response(wire) = &self.reply else {
            panic!("an error instead of a response: {:?}", self.reply);
        };
        let status = wire["statusCode"]
            .as_u64()
            .unwrap_or_else(|| panic!("a numeric statusCode: {wire}"));
        assert_eq!(wire["isBase64Encoded"], false, "{wire}");
        assert_eq!(wire["cookies"], json!([]), "{wire}");
        let headers = wire["headers"]
            .as_object()
            .unwrap_or_else(|| panic!("a headers object: {wire}"))
            .clone();
        let body = wire["body"]
            .as_str()
            .unwrap_or_else(|| panic!("a text body: {wire}"));
        let body =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("a JSON body ({e}): {wire}"));
        GatewayAnswer {
            status,
            headers,
            body,
        }
    }

    /// The result of a non-HTTP function.
    pub fn response(&self) -> &Value {
        match &self.reply {
            Reply::Response(v) => v,
            other => panic!("an error instead of a response: {other:?}"),
        }
    }
}
