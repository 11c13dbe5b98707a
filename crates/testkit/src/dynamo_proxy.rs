//! A proxy in front of the AWS emulator that gives its DynamoDB what the real service
//! guarantees and moto does not: atomic transactions, and `TransactionConflict` for
//! overlapping transactions on one item.
//!
//! moto applies a `TransactWriteItems` one action at a time on a thread per request and rolls
//! back by restoring a copy of the whole table, so two concurrent transactions can both pass a
//! condition on one item (ten concurrent submits under a cap of three stored four), and a
//! rollback can undo another request's write. DynamoDB instead isolates transactions
//! (serializable) and cancels what overlaps one in flight
//! (<https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/transaction-apis.html>,
//! "Transaction conflict handling"):
//!
//! - a `PutItem`, `UpdateItem` or `DeleteItem` on an item that an ongoing `TransactWriteItems`
//!   includes is refused with `TransactionConflictException`;
//! - a `TransactWriteItems` with an item that another ongoing `TransactWriteItems` (or
//!   `TransactGetItems`) includes is cancelled: `TransactionCanceledException` with the reason
//!   `TransactionConflict` for that item and `None` for the others;
//! - a `TransactGetItems` with an item that an ongoing `TransactWriteItems` includes is
//!   cancelled the same way.
//!
//! The proxy does exactly that. A transaction is ongoing from the moment the emulator takes it
//! (requests queue for their turn first) until it is answered; [`ProxyOptions::hold`]
//! stretches that window to what a transaction takes on the real service (two-phase, tens of
//! milliseconds), so overlaps happen at the rates they would there. Every DynamoDB request is passed to the emulator one at a time,
//! which makes moto's transactions atomic and isolated; requests for other services (SQS, S3)
//! pass through untouched and concurrently. Tables' key attributes are learned with one
//! `DescribeTable` each.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The `X-Amz-Target` prefix of DynamoDB's JSON protocol.
const TARGET_PREFIX: &str = "DynamoDB_20120810.";
/// The error type prefix DynamoDB answers with.
const ERROR_PREFIX: &str = "com.amazonaws.dynamodb.v20120810#";
/// Headers a proxy must not pass on (hop-by-hop, or recomputed by the client it uses).
const HOP_HEADERS: [&str; 5] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "host",
];

/// How the proxy behaves.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// The emulator's base URL, e.g. `http://127.0.0.1:5000`.
    pub upstream: String,
    /// How long a transaction stays ongoing after the emulator answered it (the window in
    /// which overlapping requests on its items conflict).
    pub hold: Duration,
}

/// What the proxy has done.
#[derive(Debug, Default)]
struct Counters {
    transactions: AtomicU64,
    conflicts: AtomicU64,
}

/// A key of one item: table name and its key attributes (as JSON, sorted by name).
type ItemKey = (String, String);

struct Shared {
    options: ProxyOptions,
    client: reqwest::Client,
    /// One DynamoDB request at a time reaches the emulator.
    serial: tokio::sync::Mutex<()>,
    /// Items of ongoing write transactions, and of ongoing read transactions.
    ongoing: Mutex<Ongoing>,
    /// Key attribute names per table.
    keys: Mutex<HashMap<String, Vec<String>>>,
    counters: Counters,
}

#[derive(Default)]
struct Ongoing {
    writes: HashSet<ItemKey>,
    reads: HashMap<ItemKey, usize>,
}

/// A running proxy on a loopback port of its own; stops when dropped.
pub struct DynamoProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl Drop for DynamoProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl DynamoProxy {
    /// Starts a proxy on `127.0.0.1` (a free port) in front of `options.upstream`.
    pub async fn start(options: ProxyOptions) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), options).await
    }

    /// Starts a proxy on `addr` (a loopback address) in front of `options.upstream`.
    pub async fn start_on(addr: SocketAddr, options: ProxyOptions) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            options,
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(std::io::Error::other)?,
            serial: tokio::sync::Mutex::new(()),
            ongoing: Mutex::new(Ongoing::default()),
            keys: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        });
        let app = Router::new().fallback(forward).with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(DynamoProxy {
            addr,
            shared,
            server,
        })
    }

    /// The proxy's base URL, to use as `AWS_ENDPOINT_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `TransactWriteItems` and `TransactGetItems` requests received.
    pub fn transactions(&self) -> u64 {
        self.shared.counters.transactions.load(Ordering::Relaxed)
    }

    /// Requests answered with a transaction conflict (cancelled transactions and refused
    /// single-item writes).
    pub fn conflicts(&self) -> u64 {
        self.shared.counters.conflicts.load(Ordering::Relaxed)
    }

    /// Runs until the server stops (for the standalone binary).
    pub async fn wait(&mut self) {
        let _ = (&mut self.server).await;
    }
}

/// Whether a request is a write transaction, a read transaction or a single-item write.
#[derive(Clone, Copy)]
enum Kind {
    WriteTransaction,
    ReadTransaction,
    SingleWrite,
    Other,
}

fn kind(op: &str) -> Kind {
    match op {
        "TransactWriteItems" => Kind::WriteTransaction,
        "TransactGetItems" => Kind::ReadTransaction,
        "PutItem" | "UpdateItem" | "DeleteItem" => Kind::SingleWrite,
        _ => Kind::Other,
    }
}

async fn forward(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(body) = to_bytes(body, usize::MAX).await else {
        return (StatusCode::BAD_REQUEST, "unreadable body").into_response();
    };
    let op = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.strip_prefix(TARGET_PREFIX))
        .map(str::to_string);
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let Some(op) = op else {
        return pass(&shared, parts.method, &path, &parts.headers, body).await;
    };
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let kind = kind(&op);
    let items = match kind {
        Kind::Other => Vec::new(),
        _ => match items_of(&shared, &op, &request, &parts.headers).await {
            Ok(items) => items,
            Err(resp) => return resp,
        },
    };
    // DynamoDB finishes a transaction whether or not its client waits for the answer (an SDK
    // attempt timeout drops this handler): the request runs to its end, ongoing window and
    // all, in a task of its own.
    let (method, headers) = (parts.method, parts.headers);
    let run = tokio::spawn(async move {
        // The request's turn at the emulator: only then is it ongoing (waiting behind other
        // requests for the emulator is not time a transaction spends on DynamoDB).
        let turn = shared.serial.lock().await;
        if let Some(refused) = claim(&shared, kind, &items) {
            return refused;
        }
        let resp = pass(&shared, method, &path, &headers, body).await;
        drop(turn);
        if matches!(kind, Kind::WriteTransaction | Kind::ReadTransaction) {
            if !shared.options.hold.is_zero() {
                tokio::time::sleep(shared.options.hold).await;
            }
            release(&shared, kind, &items);
        }
        resp
    });
    match run.await {
        Ok(resp) => resp,
        Err(e) => (StatusCode::BAD_GATEWAY, format!("proxy: {e}")).into_response(),
    }
}

/// Claims `items` for a request of `kind`, or answers the conflict as DynamoDB would.
fn claim(shared: &Shared, kind: Kind, items: &[ItemKey]) -> Option<Response> {
    let mut ongoing = shared.ongoing.lock().unwrap();
    let busy: Vec<bool> = items
        .iter()
        .map(|k| match kind {
            Kind::ReadTransaction => ongoing.writes.contains(k),
            _ => ongoing.writes.contains(k) || ongoing.reads.contains_key(k),
        })
        .collect();
    let refuse = match kind {
        Kind::WriteTransaction | Kind::ReadTransaction => {
            shared.counters.transactions.fetch_add(1, Ordering::Relaxed);
            busy.iter().any(|b| *b)
        }
        // A single write conflicts only with an ongoing write transaction.
        Kind::SingleWrite => items.iter().any(|k| ongoing.writes.contains(k)),
        Kind::Other => false,
    };
    if refuse {
        shared.counters.conflicts.fetch_add(1, Ordering::Relaxed);
        return Some(match kind {
            Kind::SingleWrite => conflict_exception(),
            _ => cancelled(&busy),
        });
    }
    match kind {
        Kind::WriteTransaction => ongoing.writes.extend(items.iter().cloned()),
        Kind::ReadTransaction => {
            for k in items {
                *ongoing.reads.entry(k.clone()).or_default() += 1;
            }
        }
        _ => {}
    }
    None
}

/// Ends the ongoing window of a transaction of `kind` on `items`.
fn release(shared: &Shared, kind: Kind, items: &[ItemKey]) {
    let mut ongoing = shared.ongoing.lock().unwrap();
    for k in items {
        match kind {
            Kind::WriteTransaction => {
                ongoing.writes.remove(k);
            }
            _ => {
                if let Some(n) = ongoing.reads.get_mut(k) {
                    *n -= 1;
                    if *n == 0 {
                        ongoing.reads.remove(k);
                    }
                }
            }
        }
    }
}

/// Sends the request on to the emulator as it came, and its answer back as it came.
async fn pass(
    shared: &Shared,
    method: axum::http::Method,
    path: &str,
    headers: &HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let url = format!("{}{path}", shared.options.upstream.trim_end_matches('/'));
    let mut req = shared.client.request(method, url).body(body);
    for (name, value) in headers {
        if !HOP_HEADERS.contains(&name.as_str()) {
            req = req.header(name, value);
        }
    }
    let upstream = match req.send().await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("emulator: {e}")).into_response(),
    };
    let status = upstream.status();
    let mut out = HeaderMap::new();
    for (name, value) in upstream.headers() {
        if !HOP_HEADERS.contains(&name.as_str()) {
            out.append(name, value.clone());
        }
    }
    let body = match upstream.bytes().await {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("emulator: {e}")).into_response(),
    };
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    *resp.headers_mut() = out;
    resp
}

/// The items a request writes or reads transactionally, in the request's order.
async fn items_of(
    shared: &Shared,
    op: &str,
    request: &Value,
    headers: &HeaderMap,
) -> Result<Vec<ItemKey>, Response> {
    // (table, key attributes given, or the whole item of a put)
    let mut named: Vec<(String, &Value)> = Vec::new();
    match op {
        "TransactWriteItems" | "TransactGetItems" => {
            for entry in request["TransactItems"].as_array().into_iter().flatten() {
                let Some((action, body)) = entry.as_object().and_then(|o| o.iter().next()) else {
                    continue;
                };
                let item = if action == "Put" {
                    &body["Item"]
                } else {
                    &body["Key"]
                };
                named.push((body["TableName"].as_str().unwrap_or("").to_string(), item));
            }
        }
        "PutItem" => named.push((
            request["TableName"].as_str().unwrap_or("").to_string(),
            &request["Item"],
        )),
        _ => named.push((
            request["TableName"].as_str().unwrap_or("").to_string(),
            &request["Key"],
        )),
    }
    let mut out = Vec::with_capacity(named.len());
    for (table, attrs) in named {
        let names = key_attributes(shared, &table, headers).await?;
        let key: BTreeMap<&str, &Value> = names
            .iter()
            .filter_map(|n| attrs.get(n.as_str()).map(|v| (n.as_str(), v)))
            .collect();
        out.push((table, serde_json::to_string(&key).unwrap_or_default()));
    }
    Ok(out)
}

/// A table's key attribute names, asked of the emulator once.
async fn key_attributes(
    shared: &Shared,
    table: &str,
    headers: &HeaderMap,
) -> Result<Vec<String>, Response> {
    if let Some(k) = shared.keys.lock().unwrap().get(table) {
        return Ok(k.clone());
    }
    let mut h = HeaderMap::new();
    h.insert(
        "x-amz-target",
        HeaderValue::from_static("DynamoDB_20120810.DescribeTable"),
    );
    h.insert(
        "content-type",
        HeaderValue::from_static("application/x-amz-json-1.0"),
    );
    // The emulator reads the region from the credential scope; it checks no signature.
    if let Some(auth) = headers.get("authorization") {
        h.insert("authorization", auth.clone());
    }
    let body = bytes::Bytes::from(json!({ "TableName": table }).to_string());
    let resp = {
        let _one = shared.serial.lock().await;
        pass(shared, axum::http::Method::POST, "/", &h, body).await
    };
    if !resp.status().is_success() {
        // An unknown table: let the emulator answer the request itself.
        return Ok(Vec::new());
    }
    let bytes = to_bytes(resp.into_body(), usize::MAX)
        .await
        .map_err(|_| (StatusCode::BAD_GATEWAY, "emulator").into_response())?;
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let names: Vec<String> = v["Table"]["KeySchema"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k["AttributeName"].as_str().map(str::to_string))
        .collect();
    shared
        .keys
        .lock()
        .unwrap()
        .insert(table.to_string(), names.clone());
    Ok(names)
}

fn error(type_name: &str, body: Value) -> Response {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = StatusCode::BAD_REQUEST;
    resp.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/x-amz-json-1.0"),
    );
    if let Ok(v) = HeaderValue::from_str(type_name) {
        resp.headers_mut().insert("x-amzn-errortype", v);
    }
    resp
}

/// DynamoDB's answer to a single-item write on an item an ongoing transaction holds.
fn conflict_exception() -> Response {
    error(
        "TransactionConflictException",
        json!({
            "__type": format!("{ERROR_PREFIX}TransactionConflictException"),
            "message": "Transaction is ongoing for the item",
        }),
    )
}

/// DynamoDB's answer to a transaction that overlaps an ongoing one on the `busy` items.
fn cancelled(busy: &[bool]) -> Response {
    let codes: Vec<&str> = busy
        .iter()
        .map(|b| if *b { "TransactionConflict" } else { "None" })
        .collect();
    let reasons: Vec<Value> = busy
        .iter()
        .map(|b| {
            if *b {
                json!({"Code": "TransactionConflict", "Message": "Transaction is ongoing for the item"})
            } else {
                json!({"Code": "None"})
            }
        })
        .collect();
    error(
        "TransactionCanceledException",
        json!({
            "__type": format!("{ERROR_PREFIX}TransactionCanceledException"),
            "Message": format!(
                "Transaction cancelled, please refer cancellation reasons for specific reasons [{}]",
                codes.join(", ")
            ),
            "CancellationReasons": reasons,
        }),
    )
}
