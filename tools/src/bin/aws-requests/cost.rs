//! `aws-requests --cost`: dollars per million tasks at AWS list prices (us-east-1, list prices
//! as of 2026-11), from the requests each lifecycle sends on the wire.
//!
//! Prices and their pages:
//! - API Gateway HTTP API: $1.00 per million requests (first 300 M a month, 512 KB units),
//!   <https://aws.amazon.com/api-gateway/pricing/>
//! - Lambda arm64: $0.20 per million requests, $0.0000133334 per GB-second,
//!   <https://aws.amazon.com/lambda/pricing/>
//! - DynamoDB on-demand (Standard table class): $0.625 per million write request units, $0.125
//!   per million read request units, <https://aws.amazon.com/dynamodb/pricing/on-demand/>
//! - SQS standard queue: $0.40 per million requests, each 64 KB chunk of a payload one request,
//!   <https://aws.amazon.com/sqs/pricing/>
//! - S3 Standard: $0.005 per 1,000 PUT, $0.0004 per 1,000 GET and HEAD,
//!   <https://aws.amazon.com/s3/pricing/>
//! - CloudWatch Logs (Standard class) ingestion: $0.50 per GB,
//!   <https://aws.amazon.com/cloudwatch/pricing/>
//!
//! DynamoDB units are computed from the requests and item sizes (the emulator's
//! `ReturnConsumedCapacity` answers constants, so it is not used): item size by DynamoDB's rule
//! (attribute names plus values), writes one unit per 1 KB and two in a transaction (a
//! `ConditionCheck` counted as a transactional write), plus, on each of `GSI1` (projecting
//! status and model) and `GSI2` (keys only), one write per 1 KB of the index entry when the
//! entry appears, disappears or changes, two when its keys move, none when nothing it holds
//! changed; reads one unit per 4 KB (strongly consistent) or half of it (eventually consistent,
//! every GSI query), each item of a `BatchGetItem` on its own. An item
//! updated inside a transaction is sized from its last seen copy (a `GetItem`, a `Query` or a
//! `PutItem`), or 1 KB when none was seen.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::Method;
use serde_json::{Value, json};
use tasklane_core::metrics::{self, MetricsSink};

use super::Bench;
use crate::metrics::Call;

const HTTP_API: f64 = 1.00 / 1e6;
const LAMBDA_REQUEST: f64 = 0.20 / 1e6;
const LAMBDA_GB_SECOND: f64 = 0.000_013_333_4;
const DDB_WRU: f64 = 0.625 / 1e6;
const DDB_RRU: f64 = 0.125 / 1e6;
const SQS_REQUEST: f64 = 0.40 / 1e6;
const S3_PUT: f64 = 0.005 / 1e3;
const S3_GET: f64 = 0.0004 / 1e3;
const LOGS_GB: f64 = 0.50;

/// Memory of every function a lifecycle invokes (template.yaml: the Globals' 256 MB; only the
/// upstream function has 512 MB, and neither lifecycle calls it).
const FUNCTION_MB: f64 = 256.0;
/// The files function's duration per download, assumed: one S3 HeadObject and an HMAC check.
const FILES_MS: f64 = 15.0;
/// Log bytes Lambda writes per invocation besides tasklane's own lines, assumed: the JSON
/// `platform.start` and `platform.report` records (about 150 and 450 bytes with X-Ray on)
/// plus one application line of about 300 bytes.
const LOG_BYTES_PER_INVOCATION: f64 = 900.0;

/// Counts the bytes of EMF lines written (as CloudWatch Logs would ingest them, with newline).
#[derive(Default)]
struct EmfBytes(Mutex<u64>);

impl MetricsSink for EmfBytes {
    fn emit(&self, line: &str) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) += line.len() as u64 + 1;
    }
}

/// What one lifecycle used.
#[derive(Default)]
struct Usage {
    http_api: f64,
    invocations: f64,
    gb_seconds: f64,
    wru: f64,
    rru: f64,
    sqs: f64,
    s3_put: f64,
    s3_get: f64,
    log_bytes: f64,
    requests: BTreeMap<String, u64>,
    /// Write units by the call that consumed them.
    wru_by_op: BTreeMap<String, f64>,
    durations: Vec<(String, f64)>,
}

/// DynamoDB's size of an attribute value (<https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/CapacityUnitCalculations.html>).
fn value_size(v: &Value) -> f64 {
    let Some((t, inner)) = v.as_object().and_then(|o| o.iter().next()) else {
        return 0.0;
    };
    match t.as_str() {
        "S" => inner.as_str().map_or(0, str::len) as f64,
        "N" => {
            let digits = inner.as_str().unwrap_or("").trim_start_matches('-').len() as f64;
            (digits / 2.0).ceil() + 1.0
        }
        "B" => inner.as_str().map_or(0, str::len) as f64 * 3.0 / 4.0,
        "BOOL" | "NULL" => 1.0,
        "M" => {
            3.0 + inner.as_object().map_or(0.0, |m| {
                m.iter()
                    .map(|(k, v)| 1.0 + k.len() as f64 + value_size(v))
                    .sum()
            })
        }
        "L" => {
            3.0 + inner
                .as_array()
                .map_or(0.0, |l| l.iter().map(|v| 1.0 + value_size(v)).sum())
        }
        _ => inner.as_array().map_or(0.0, |l| {
            l.iter()
                .map(|s| s.as_str().map_or(0, str::len) as f64)
                .sum()
        }),
    }
}

fn item_size(item: &Value) -> f64 {
    item.as_object().map_or(0.0, |m| {
        m.iter().map(|(k, v)| k.len() as f64 + value_size(v)).sum()
    })
}

fn key_of(item: &Value) -> String {
    format!("{}|{}", item["PK"], item["SK"])
}

fn kb(size: f64) -> f64 {
    (size / 1024.0).ceil().max(1.0)
}

/// Item sizes and index keys last seen, by primary key.
#[derive(Default)]
struct Shadow(HashMap<String, Value>);

impl Shadow {
    fn see(&mut self, item: &Value) {
        if item.get("PK").is_some() {
            self.0.insert(key_of(item), item.clone());
        }
    }

    /// Write units of putting `after` over what was there (table and both indexes).
    fn put(&mut self, after: &Value, factor: f64) -> f64 {
        let before = self.0.get(&key_of(after)).cloned();
        let mut units = factor * kb(item_size(after).max(before.as_ref().map_or(0.0, item_size)));
        for index in INDEXES {
            let b = before.as_ref().and_then(|b| index.entry(b));
            match (b, index.entry(after)) {
                // Nothing the index holds changed: no index write.
                (Some(b), Some(a)) if b == a => {}
                // Same keys, a projected attribute changed: the entry is rewritten.
                (Some(b), Some(a)) if index.keys(&b) == index.keys(&a) => {
                    units += kb(item_size(&a))
                }
                // The keys moved: a delete and a put.
                (Some(b), Some(a)) => units += kb(item_size(&b)) + kb(item_size(&a)),
                (Some(b), None) => units += kb(item_size(&b)),
                (None, Some(a)) => units += kb(item_size(&a)),
                (None, None) => {}
            }
        }
        self.see(after);
        units
    }

    /// Write units of updating (or checking) the item at `key` in a transaction; an indexed
    /// item's entries are counted as rewritten (what changed is not parsed).
    fn update(&mut self, key: &Value) -> f64 {
        match self.0.get(&key_of(key)) {
            Some(item) => {
                let entries: f64 = INDEXES
                    .iter()
                    .filter_map(|i| i.entry(item))
                    .map(|e| kb(item_size(&e)))
                    .sum();
                2.0 * kb(item_size(item)) + entries
            }
            None => 2.0,
        }
    }
}

/// A global secondary index as template.yaml declares it: its key attributes and what it
/// projects besides the table's and its own keys.
struct Index {
    pk: &'static str,
    sk: &'static str,
    projected: &'static [&'static str],
}

/// GSI1 (`INCLUDE` status and model) and GSI2 (`KEYS_ONLY`).
const INDEXES: [Index; 2] = [
    Index {
        pk: "GSI1PK",
        sk: "GSI1SK",
        projected: &["status", "model"],
    },
    Index {
        pk: "GSI2PK",
        sk: "GSI2SK",
        projected: &[],
    },
];

impl Index {
    /// The index entry of `item` (its keys and projected attributes), if it is in the index.
    fn entry(&self, item: &Value) -> Option<Value> {
        item.get(self.pk)?;
        let mut entry = serde_json::Map::new();
        for name in ["PK", "SK", self.pk, self.sk].iter().chain(self.projected) {
            if let Some(v) = item.get(*name) {
                entry.insert(name.to_string(), v.clone());
            }
        }
        Some(Value::Object(entry))
    }

    fn keys(&self, entry: &Value) -> (Value, Value) {
        (entry[self.pk].clone(), entry[self.sk].clone())
    }
}

fn read_units(size: f64, consistent: bool) -> f64 {
    let units = (size / 4096.0).ceil().max(1.0);
    if consistent { units } else { units / 2.0 }
}

impl Usage {
    fn add_calls(&mut self, calls: &[Call], shadow: &mut Shadow) {
        for c in calls {
            let before = self.wru;
            self.add_call(c, shadow);
            *self.wru_by_op.entry(c.op.clone()).or_default() += self.wru - before;
        }
    }

    fn add_call(&mut self, c: &Call, shadow: &mut Shadow) {
        {
            *self.requests.entry(c.op.clone()).or_default() += 1;
            let req: Value = serde_json::from_slice(&c.request).unwrap_or(Value::Null);
            let resp: Value = serde_json::from_slice(&c.response).unwrap_or(Value::Null);
            let consistent = req["ConsistentRead"].as_bool().unwrap_or(false);
            match c.op.as_str() {
                "DynamoDB.GetItem" => {
                    self.rru += read_units(item_size(&resp["Item"]), consistent);
                    shadow.see(&resp["Item"]);
                }
                "DynamoDB.Query" => {
                    let items = resp["Items"].as_array().cloned().unwrap_or_default();
                    let size: f64 = items.iter().map(item_size).sum();
                    let consistent = consistent && req.get("IndexName").is_none();
                    self.rru += read_units(size, consistent);
                    items.iter().for_each(|i| shadow.see(i));
                }
                "DynamoDB.BatchGetItem" => {
                    // Each item is charged on its own, rounded up to 4 KB.
                    for table in resp["Responses"].as_object().into_iter().flatten() {
                        for item in table.1.as_array().into_iter().flatten() {
                            let consistent =
                                req["RequestItems"][table.0.as_str()]["ConsistentRead"]
                                    .as_bool()
                                    .unwrap_or(false);
                            self.rru += read_units(item_size(item), consistent);
                            shadow.see(item);
                        }
                    }
                }
                "DynamoDB.PutItem" => self.wru += shadow.put(&req["Item"], 1.0),
                "DynamoDB.UpdateItem" | "DynamoDB.DeleteItem" => {
                    self.wru += shadow.update(&req["Key"]) / 2.0
                }
                "DynamoDB.TransactWriteItems" => {
                    for op in req["TransactItems"].as_array().cloned().unwrap_or_default() {
                        if let Some(put) = op.get("Put") {
                            self.wru += shadow.put(&put["Item"], 2.0);
                        } else if let Some(k) = ["Update", "Delete", "ConditionCheck"]
                            .iter()
                            .find_map(|k| op.get(*k))
                        {
                            self.wru += shadow.update(&k["Key"]);
                        }
                    }
                }
                "SQS.SendMessage" => {
                    let len = req["MessageBody"]
                        .as_str()
                        .map_or(c.request.len(), str::len);
                    self.sqs += (len as f64 / 65536.0).ceil().max(1.0);
                    // The event source mapping receives (batch size 1) and deletes it.
                    self.sqs += 2.0;
                }
                "S3.PutObject" => self.s3_put += 1.0,
                "S3.GetObject" | "S3.HeadObject" => self.s3_get += 1.0,
                _ => {}
            }
        }
    }

    fn invocation(&mut self, what: &str, ms: f64) {
        self.invocations += 1.0;
        self.gb_seconds += FUNCTION_MB / 1024.0 * ms.ceil() / 1000.0;
        self.log_bytes += LOG_BYTES_PER_INVOCATION;
        self.durations.push((what.to_string(), ms));
    }
}

async fn api_step(
    b: &mut Bench,
    u: &mut Usage,
    shadow: &mut Shadow,
    what: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    let start = Instant::now();
    let v = b.call(what, method, path, body, &[]).await;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    u.http_api += 1.0;
    u.invocation(what, ms);
    u.add_calls(&b.counter.take_calls(), shadow);
    v
}

async fn lifecycle(b: &mut Bench, name: &str, body: Value) -> Usage {
    let emf = Arc::new(EmfBytes::default());
    metrics::set_sink(Some(emf.clone()));
    let mut u = Usage::default();
    let mut shadow = Shadow::default();
    b.counter.take_calls();
    let t = api_step(
        b,
        &mut u,
        &mut shadow,
        "submit",
        Method::POST,
        "/v1/tasks",
        Some(body),
    )
    .await;
    let id = t["task_id"].as_str().unwrap_or_default().to_string();
    b.processor_ms = 0.0;
    b.drain(&format!("cost: run {name}")).await;
    u.invocation("processor", b.processor_ms);
    u.add_calls(&b.counter.take_calls(), &mut shadow);
    let done = api_step(
        b,
        &mut u,
        &mut shadow,
        "status (completed)",
        Method::GET,
        &format!("/v1/tasks/{id}"),
        None,
    )
    .await;
    assert_eq!(
        done["status"], "completed",
        "{name} did not complete: {done}"
    );
    // One download: GET /v1/files/{key} on the API, the files function's HeadObject, and the
    // client's GET of the S3 URL it is redirected to.
    u.http_api += 1.0;
    u.invocation("files (assumed)", FILES_MS);
    u.s3_get += 2.0;
    *u.requests
        .entry("S3.HeadObject (files)".into())
        .or_default() += 1;
    *u.requests
        .entry("S3.GetObject (client)".into())
        .or_default() += 1;
    metrics::set_sink(None);
    u.log_bytes += *emf.0.lock().unwrap_or_else(|p| p.into_inner()) as f64;
    u
}

fn report(name: &str, u: &Usage) -> f64 {
    let rows = [
        (
            "HTTP API requests",
            u.http_api,
            format!("{}", u.http_api),
            HTTP_API,
        ),
        (
            "Lambda requests",
            u.invocations,
            format!("{}", u.invocations),
            LAMBDA_REQUEST,
        ),
        (
            "Lambda GB-seconds",
            u.gb_seconds,
            format!("{:.4} GB-s", u.gb_seconds),
            LAMBDA_GB_SECOND,
        ),
        (
            "DynamoDB write units",
            u.wru,
            format!("{} WRU", u.wru),
            DDB_WRU,
        ),
        (
            "DynamoDB read units",
            u.rru,
            format!("{} RRU", u.rru),
            DDB_RRU,
        ),
        ("SQS requests", u.sqs, format!("{}", u.sqs), SQS_REQUEST),
        ("S3 PUT", u.s3_put, format!("{}", u.s3_put), S3_PUT),
        ("S3 GET/HEAD", u.s3_get, format!("{}", u.s3_get), S3_GET),
        (
            "CloudWatch Logs ingestion",
            u.log_bytes / 1e9,
            format!("{:.0} bytes", u.log_bytes),
            LOGS_GB,
        ),
    ];
    let total: f64 = rows.iter().map(|r| r.1 * r.3 * 1e6).sum();
    println!("\n### {name}\n");
    let reqs: Vec<String> = u
        .requests
        .iter()
        .map(|(k, v)| format!("{k} ×{v}"))
        .collect();
    println!("AWS requests: {}", reqs.join(", "));
    let durs: Vec<String> = u
        .durations
        .iter()
        .map(|(w, ms)| format!("{w} {ms:.1} ms"))
        .collect();
    println!("Lambda durations: {}", durs.join(", "));
    let w: Vec<String> = u
        .wru_by_op
        .iter()
        .filter(|(_, v)| **v > 0.0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!("DynamoDB write units by call: {}\n", w.join(", "));
    println!("| component | per task | $ per million tasks | share |");
    println!("|---|---:|---:|---:|");
    for (what, qty, shown, price) in &rows {
        let d = qty * price * 1e6;
        println!("| {what} | {shown} | {d:.2} | {:.0}% |", d / total * 100.0);
    }
    println!("| **total** | | **{total:.2}** | |");
    total
}

/// Runs the `echo` and `veo3` 5 s lifecycles and prints their cost per million tasks.
pub async fn run(b: &mut Bench) {
    let echo = lifecycle(b, "echo", json!({"model": "echo", "prompt": "hi"})).await;
    let veo3 = lifecycle(
        b,
        "veo3 5 s",
        json!({"model": "veo3", "prompt": "a dog", "duration": 5}),
    )
    .await;
    println!("# Cost per million tasks (us-east-1 list prices as of 2026-11)");
    report(
        "echo (submit, one status read, one result download, no webhook)",
        &echo,
    );
    report(
        "veo3 5 s (submit, one status read, one result download, no webhook)",
        &veo3,
    );
}
