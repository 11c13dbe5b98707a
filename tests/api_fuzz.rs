//! Fuzzing of request parsing and validation through the whole HTTP surface, [`Api::handle`],
//! on two sets of adapters:
//!
//! - **sqlite**: the adapters `tasklane` ships for the local runtime, [`SqliteStore`] and
//!   [`SqliteQueue`] on a fresh database file and [`FileBlobs`] (the results folder with
//!   signed URLs), in a fresh temporary directory per case;
//! - **memory**: the small in-memory adapters of `tasklane_testkit::memory` (a re-implementation
//!   of the store's credit and idempotency rules), about ten times as fast, for volume.
//!
//! Each proptest case builds a fresh [`App`] and seeds it with tasks in every interesting state
//! (queued, processing, completed with an output, cancelled, another account's): submitted
//! through the API, moved on by the store's own `update_task` transitions. Then it sends 1 to 4
//! generated requests. For every answer: no panic, never 5xx, every non-2xx is
//! `application/json` with the error shape of openapi.yaml and a code of its `ErrorCode` table
//! at that code's status, and every 2xx submit carries a task id. On the results folder every
//! signed output URL an answer carries verifies and names a stored file. After the requests,
//! each account's ledger holds: `credits` is `granted` less the cost of every task not
//! refunded, and `open_tasks` counts its queued and processing tasks.
//!
//! `PROPTEST_CASES` sets the number of cases of each run (256 by default, as proptest reads it
//! natively):
//! `PROPTEST_CASES=5000 cargo test -p tasklane-local --test api_fuzz -- --nocapture`
//! prints, per backend, how many cases and requests ran, for how long and how much of that
//! went to building fixtures. A fresh database per case costs mostly disk syncs:
//! `TMPDIR=/dev/shm` puts the temporary directories in memory and the SQLite run goes about
//! twice as fast.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use chrono::Utc;
use http::{HeaderValue, Method, Request, Response, Uri, header};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use serde_json::Value;
use tasklane_core::account::{Account, hash_api_key};
use tasklane_core::api::{Api, Route};
use tasklane_core::ports::{BlobStore, ListQuery, TaskStore, WorkQueue};
use tasklane_core::providers::builtin_registry;
use tasklane_core::task::{Output, Transition};
use tasklane_core::{App, Config, is_task_id};
use tasklane_local::files::{FILES_PREFIX, FileBlobs};
use tasklane_local::sqlite::{Db, SqliteQueue, SqliteStore};
use tasklane_testkit::memory::{MemBlobs, MemQueue, MemStore};

// ---------------------------------------------------------------------------------------------
// The system under test, seeded
// ---------------------------------------------------------------------------------------------

const RICH_KEY: &str = "tl_fuzzrich0000000000000000000000000000000000000";
const POOR_KEY: &str = "tl_fuzzpoor0000000000000000000000000000000000000";
const OTHER_KEY: &str = "tl_fuzzother000000000000000000000000000000000000";

/// Where the signed URLs of the results folder point (never contacted).
const FILES_BASE: &str = "http://127.0.0.1:9";

/// The adapters a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// The in-memory adapters of `tasklane_testkit::memory`.
    Memory,
    /// SQLite store and queue, results folder, in a temporary directory.
    Sqlite,
}

/// A fresh API and the ids of the seeded tasks: queued, processing, completed (with an
/// output), cancelled (all the rich account's), and a queued task of another account.
struct Fixture {
    api: Api,
    store: Arc<dyn TaskStore>,
    /// The results folder, on the SQLite backend.
    files: Option<FileBlobs>,
    accounts: Vec<String>,
    seeds: Vec<String>,
    /// Last, so the directory goes after everything that uses it.
    _dir: Option<tempfile::TempDir>,
}

/// The App over the given adapters, with the built-in models and the default configuration.
fn app(
    store: Arc<dyn TaskStore>,
    queue: Arc<dyn WorkQueue>,
    blobs: Arc<dyn BlobStore>,
) -> Arc<App> {
    App::new(
        store,
        queue,
        blobs,
        builtin_registry(0.0),
        Config::default(),
    )
}

async fn fixture(backend: Backend) -> Fixture {
    let (app, files, dir) = match backend {
        Backend::Memory => (
            app(
                Arc::new(MemStore::default()),
                Arc::new(MemQueue::default()),
                Arc::new(MemBlobs::default()),
            ),
            None,
            None,
        ),
        Backend::Sqlite => {
            // As the local server builds them (server.rs, `embedded`).
            let dir = tempfile::tempdir().expect("temporary directory");
            let db = Db::open(&dir.path().join("tasklane.db")).expect("database opens");
            let files = FileBlobs::new(
                dir.path().join("results"),
                FILES_BASE.to_string(),
                b"fuzz signing key".to_vec(),
            );
            let app = app(
                Arc::new(SqliteStore::new(db.clone())),
                Arc::new(SqliteQueue::new(db)),
                Arc::new(files.clone()),
            );
            (app, Some(files), Some(dir))
        }
    };
    let store = app.store.clone();
    let mut accounts = Vec::new();
    for (key, credits) in [(RICH_KEY, 1_000_000_000), (POOR_KEY, 0), (OTHER_KEY, 1000)] {
        let acct = Account::create(credits, Some(key.to_string())).account;
        assert_eq!(acct.key_hash, hash_api_key(key));
        store.create_account(&acct).await.unwrap();
        accounts.push(acct.id);
    }
    let api = Api::new(app.clone());
    let submit = |key: &'static str| {
        let api = api.clone();
        async move {
            let req = Request::post("/v1/tasks")
                .header(header::AUTHORIZATION, format!("Bearer {key}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Bytes::from_static(
                    br#"{"model":"veo3","prompt":"a cat","duration":2,"callback_url":"https://example.com/hook","metadata":{"k":"v"}}"#,
                ))
                .unwrap();
            let resp = api.handle(req).await;
            assert_eq!(resp.status(), 202, "seeding failed: {:?}", resp.body());
            let v: Value = serde_json::from_slice(resp.body()).unwrap();
            v["task_id"].as_str().unwrap().to_string()
        }
    };
    let queued = submit(RICH_KEY).await;
    let processing = submit(RICH_KEY).await;
    let completed = submit(RICH_KEY).await;
    let cancelled = submit(RICH_KEY).await;
    let foreign = submit(OTHER_KEY).await;
    let lease_until = Utc::now() + chrono::Duration::hours(1);
    store
        .update_task(&processing, &Transition::Start { lease_until })
        .await
        .unwrap();
    store
        .update_task(&completed, &Transition::Start { lease_until })
        .await
        .unwrap();
    let key = format!("outputs/{completed}/0.gif");
    app.blobs
        .put(&key, Bytes::from_static(b"GIF89a"), "image/gif")
        .await
        .unwrap();
    store
        .update_task(
            &completed,
            &Transition::Complete {
                attempt: 1,
                outputs: vec![Output {
                    key,
                    content_type: "image/gif".into(),
                    size_bytes: 6,
                }],
            },
        )
        .await
        .unwrap();
    store
        .update_task(&cancelled, &Transition::Cancel)
        .await
        .unwrap();
    Fixture {
        api,
        store,
        files,
        accounts,
        seeds: vec![queued, processing, completed, cancelled, foreign],
        _dir: dir,
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// Placeholders the strategies emit and the runner resolves against the fixture.
const SEED_MARK: &str = "{SEED";
const CURSOR_MARK: &str = "{CURSOR";

/// A generated request before placeholders are resolved.
#[derive(Debug, Clone)]
struct FuzzRequest {
    method: Vec<u8>,
    /// Raw path and query; bytes not allowed in a URI are percent-encoded at send time.
    target: String,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Vec<u8>,
}

fn any_string(max: usize) -> BoxedStrategy<String> {
    prop_oneof![
        4 => proptest::string::string_regex(&format!("[a-zA-Z0-9_.~-]{{0,{max}}}")).unwrap(),
        2 => proptest::collection::vec(any::<char>(), 0..max).prop_map(|c| c.into_iter().collect()),
        1 => proptest::string::string_regex(&format!("[\\x00-\\x7f]{{0,{max}}}")).unwrap(),
    ]
    .boxed()
}

fn method() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        6 => Just(b"POST".to_vec()),
        6 => Just(b"GET".to_vec()),
        3 => prop::sample::select(vec![
            "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT", "get", "post", "Post",
        ])
        .prop_map(|m| m.as_bytes().to_vec()),
        1 => proptest::string::string_regex("[A-Za-z0-9!#$%&'*+.^_`|~-]{1,24}")
            .unwrap()
            .prop_map(String::into_bytes),
    ]
    .boxed()
}

fn task_id_like() -> BoxedStrategy<String> {
    prop_oneof![
        4 => (0usize..5).prop_map(|i| format!("{SEED_MARK}{i}}}")),
        2 => any::<u128>().prop_map(|n| format!("task_{}", ulid::Ulid(n))),
        1 => any::<u128>().prop_map(|n| format!("task_{}", ulid::Ulid(n)).to_lowercase()),
        1 => any::<u128>().prop_map(|n| ulid::Ulid(n).to_string()),
        1 => proptest::string::string_regex("task_[0-9A-Za-z]{0,30}").unwrap(),
        1 => Just("%74ask_01ARZ3NDEKTSV4RRFFQ69G5FAV".to_string()),
        1 => Just("..".to_string()),
        1 => Just("%2e%2e".to_string()),
        1 => any_string(40),
    ]
    .boxed()
}

fn path() -> BoxedStrategy<String> {
    let route = prop_oneof![
        8 => Just("/v1/tasks".to_string()),
        5 => Just("/v1/tasks/sync".to_string()),
        4 => task_id_like().prop_map(|id| format!("/v1/tasks/{id}")),
        4 => task_id_like().prop_map(|id| format!("/v1/tasks/{id}/cancel")),
        2 => Just("/v1/account".to_string()),
        2 => Just("/v1/models".to_string()),
    ];
    let mutated = (
        route.clone(),
        prop::sample::select(vec![
            "/", "//", "/x", "/cancel", "/cancel/", "%2F", "/%00", "/..", "?", "#frag", ";a=b",
        ]),
    )
        .prop_map(|(r, s)| format!("{r}{s}"));
    prop_oneof![
        20 => route,
        3 => mutated,
        1 => Just("/V1/TASKS".to_string()),
        1 => Just("/v1//tasks".to_string()),
        1 => Just("/v1/./tasks".to_string()),
        1 => Just("/v2/tasks".to_string()),
        1 => Just("/".to_string()),
        1 => Just("*".to_string()),
        1 => Just("/v1/%74asks".to_string()),
        2 => proptest::collection::vec(any_string(12), 0..8)
            .prop_map(|segs| format!("/{}", segs.join("/"))),
        2 => proptest::collection::vec(any_string(12), 0..4)
            .prop_map(|segs| format!("/v1/{}", segs.join("/"))),
        1 => (1usize..20_000).prop_map(|n| format!("/v1/tasks/{}", "a".repeat(n))),
        1 => (1usize..2_000).prop_map(|n| "/v1/tasks".repeat(n)),
    ]
    .boxed()
}

fn query() -> BoxedStrategy<String> {
    let value = prop_oneof![
        2 => prop::sample::select(vec![
            "queued", "processing", "completed", "failed", "cancelled", "QUEUED", "", "veo3",
            "demo-image", "echo", "1", "20", "100", "0", "101", "-1", "1e2", "1.0", " 5",
            "18446744073709551616", "%", "%zz", "%ff%fe", "%00", "+", "a+b", "%C3%A9",
        ])
        .prop_map(str::to_string),
        2 => (0usize..5).prop_map(|i| format!("{CURSOR_MARK}{i}}}")),
        1 => any::<u128>().prop_map(|n| URL_SAFE_NO_PAD.encode(format!("task_{}", ulid::Ulid(n)))),
        1 => any_string(80).prop_map(|s| URL_SAFE_NO_PAD.encode(s)),
        1 => (0usize..100).prop_map(|n| "x".repeat(n)),
        1 => (60usize..70).prop_map(|n| "m".repeat(n)),
        2 => any_string(30),
    ];
    let key = prop_oneof![
        6 => prop::sample::select(vec!["status", "model", "limit", "cursor"]).prop_map(str::to_string),
        1 => prop::sample::select(vec!["Status", "limit[]", "", "offset", "page", "%73tatus"])
            .prop_map(str::to_string),
        1 => any_string(80),
    ];
    let pair = prop_oneof![
        8 => (key.clone(), value).prop_map(|(k, v)| format!("{k}={v}")),
        1 => key,
        1 => Just("=".to_string()),
        1 => Just("&".to_string()),
    ];
    proptest::collection::vec(pair, 0..5)
        .prop_map(|ps| ps.join("&"))
        .boxed()
}

fn header_bytes(s: impl Strategy<Value = String> + 'static) -> BoxedStrategy<Vec<u8>> {
    s.prop_map(String::into_bytes).boxed()
}

fn authorization() -> BoxedStrategy<Option<Vec<u8>>> {
    prop_oneof![
        30 => Just(Some(format!("Bearer {RICH_KEY}").into_bytes())),
        2 => Just(Some(format!("Bearer {POOR_KEY}").into_bytes())),
        1 => Just(Some(format!("Bearer {OTHER_KEY}").into_bytes())),
        1 => Just(Some(format!("  bearer   {RICH_KEY}  ").into_bytes())),
        1 => Just(Some(format!("Basic {RICH_KEY}").into_bytes())),
        1 => Just(Some(format!("Bearer{RICH_KEY}").into_bytes())),
        1 => Just(Some(b"Bearer".to_vec())),
        1 => Just(Some(b"Bearer ".to_vec())),
        1 => Just(None),
        1 => (0usize..400).prop_map(|n| Some(format!("Bearer tl_{}", "k".repeat(n)).into_bytes())),
        1 => header_bytes(any_string(60)).prop_map(|b| Some([b"Bearer ".as_slice(), &b].concat())),
        1 => proptest::collection::vec(any::<u8>(), 0..80).prop_map(Some),
    ]
    .boxed()
}

fn content_type() -> BoxedStrategy<Option<Vec<u8>>> {
    prop_oneof![
        25 => Just(Some(b"application/json".to_vec())),
        5 => prop::sample::select(vec![
            "application/json; charset=utf-8",
            "APPLICATION/JSON",
            " application/json ",
            "application/json;",
            "text/plain",
            "application/json-patch+json",
            "application/jsonx",
            "",
            ";application/json",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
        ])
        .prop_map(|s| Some(s.as_bytes().to_vec())),
        1 => Just(None),
        1 => Just(Some(b"application/json; charset=\xff".to_vec())),
        1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Some),
    ]
    .boxed()
}

fn idempotency_key() -> BoxedStrategy<Option<Vec<u8>>> {
    prop_oneof![
        8 => Just(None),
        4 => prop::sample::select(vec!["k1", "k2"]).prop_map(|k| Some(k.as_bytes().to_vec())),
        2 => proptest::string::string_regex("[!-~]{0,300}")
            .unwrap()
            .prop_map(|k| Some(k.into_bytes())),
        1 => (250usize..260).prop_map(|n| Some("k".repeat(n).into_bytes())),
        1 => Just(Some(b"key with spaces".to_vec())),
        1 => Just(Some("cl\u{e9}".as_bytes().to_vec())),
        1 => proptest::collection::vec(any::<u8>(), 0..300).prop_map(Some),
    ]
    .boxed()
}

fn prefer() -> BoxedStrategy<Option<Vec<u8>>> {
    prop_oneof![
        10 => Just(None),
        2 => (0u64..40).prop_map(|n| Some(format!("wait={n}").into_bytes())),
        3 => prop::sample::select(vec![
            "wait=0",
            "wait=18446744073709551615",
            "wait=18446744073709551616",
            "wait=-1",
            "wait=1.5",
            "wait=abc",
            "wait=\"5\"",
            "wait=",
            "WAIT=3",
            "respond-async",
            "respond-async, wait=2",
            "wait=2; x=y, handling=lenient",
            "handling=strict",
            ",,,",
            "=",
            "wait",
        ])
        .prop_map(|s| Some(s.as_bytes().to_vec())),
        1 => header_bytes(any_string(40)).prop_map(Some),
        1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Some),
    ]
    .boxed()
}

/// JSON number literals, some beyond what f64/u64/i64 hold.
fn number_text() -> BoxedStrategy<String> {
    prop_oneof![
        3 => any::<i64>().prop_map(|n| n.to_string()),
        2 => any::<u64>().prop_map(|n| n.to_string()),
        2 => any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| serde_json::to_string(&f).unwrap()),
        3 => prop::sample::select(vec![
            "0", "-0", "0.0", "-0.0", "1", "5", "5.0", "5.5", "1e308", "-1e308", "1e309",
            "1e400", "-1e400", "1e-400", "4.9e-324", "18446744073709551615",
            "18446744073709551616", "-9223372036854775808", "-9223372036854775809",
            "123456789012345678901234567890", "1E2", "0.1e1", "20", "21", "100", "-1",
        ])
        .prop_map(str::to_string),
    ]
    .boxed()
}

/// JSON string literals: escaped arbitrary text and hand-written escapes, some invalid.
fn string_text(max: usize) -> BoxedStrategy<String> {
    prop_oneof![
        8 => any_string(max).prop_map(|s| serde_json::to_string(&s).unwrap()),
        1 => prop::sample::select(vec![
            r#""\ud800""#, r#""\udc00x""#, r#""\ud83d\ude00""#, r#""\u0000""#, r#""\x""#,
            "\"\u{1}\"", r#""unterminated"#, r#""""#, r#"" ""#, r#""\n\t""#,
        ])
        .prop_map(str::to_string),
    ]
    .boxed()
}

/// Arbitrary JSON text, nested.
fn json_text() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        Just("false".to_string()),
        number_text(),
        string_text(20),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8)
                .prop_map(|v| format!("[{}]", v.join(","))),
            proptest::collection::vec((string_text(12), inner), 0..8).prop_map(|kv| {
                let body: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k}:{v}")).collect();
                format!("{{{}}}", body.join(","))
            }),
        ]
    })
    .boxed()
}

fn model_value() -> BoxedStrategy<String> {
    prop_oneof![
        10 => prop::sample::select(vec!["veo3", "demo-image", "echo"])
            .prop_map(|m| format!("\"{m}\"")),
        1 => prop::sample::select(vec![r#""VEO3""#, r#""veo3 ""#, r#""""#, r#""ve\u006f3""#])
            .prop_map(str::to_string),
        2 => json_text(),
    ]
    .boxed()
}

fn prompt_value() -> BoxedStrategy<String> {
    prop_oneof![
        20 => proptest::string::string_regex("[a-z ]{1,40}").unwrap().prop_map(|s| serde_json::to_string(&s).unwrap()),
        2 => (1995usize..2005, prop::sample::select(vec!['x', '\u{e9}', '\u{1f600}', ' ']))
            .prop_map(|(n, c)| serde_json::to_string(&c.to_string().repeat(n)).unwrap()),
        1 => (0usize..70_000).prop_map(|n| serde_json::to_string(&"p".repeat(n)).unwrap()),
        2 => json_text(),
    ]
    .boxed()
}

fn params_value() -> BoxedStrategy<String> {
    let key = prop_oneof![
        6 => prop::sample::select(vec!["fps", "seed", "width", "height", "sleep_ms", "fail"])
            .prop_map(|k| format!("\"{k}\"")),
        1 => string_text(16),
    ];
    let value = prop_oneof![
        4 => (1i64..25).prop_map(|n| n.to_string()),
        3 => (-5i64..2000).prop_map(|n| n.to_string()),
        2 => number_text(),
        1 => Just("true".to_string()),
        1 => string_text(600),
        1 => json_text(),
    ];
    prop_oneof![
        6 => proptest::collection::vec((key, value), 0..5).prop_map(|kv| {
            let body: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k}:{v}")).collect();
            format!("{{{}}}", body.join(","))
        }),
        1 => json_text(),
    ]
    .boxed()
}

fn metadata_value() -> BoxedStrategy<String> {
    let key = prop_oneof![
        4 => proptest::string::string_regex("[a-z]{0,8}").unwrap(),
        1 => (60usize..70).prop_map(|n| "k".repeat(n)),
        1 => any_string(80),
    ]
    .prop_map(|k| serde_json::to_string(&k).unwrap());
    let value = prop_oneof![
        4 => any_string(30).prop_map(|s| serde_json::to_string(&s).unwrap()),
        1 => (505usize..520).prop_map(|n| serde_json::to_string(&"\u{e9}".repeat(n)).unwrap()),
        1 => json_text(),
    ];
    prop_oneof![
        6 => proptest::collection::vec((key, value), 0..20).prop_map(|kv| {
            let body: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k}:{v}")).collect();
            format!("{{{}}}", body.join(","))
        }),
        1 => json_text(),
    ]
    .boxed()
}

fn callback_value() -> BoxedStrategy<String> {
    prop_oneof![
        4 => Just("\"https://example.com/hook\"".to_string()),
        4 => prop::sample::select(vec![
            "https://example.com/hook",
            "https://example.com:443/h?x=1#f",
            "http://example.com/hook",
            "https://127.0.0.1/",
            "https://localhost./x",
            "https://a.localhost/",
            "https://2130706433/",
            "https://0x7f.1/",
            "https://017700000001/",
            "https://127.1/",
            "https://[::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://[fe80::1%25eth0]/",
            "https://169.254.169.254/latest/meta-data",
            "https://100.64.0.1/",
            "https://user:pass@example.com/",
            "https://@example.com/",
            "https:///path",
            "https://",
            "ftp://example.com/",
            "javascript:alert(1)",
            "file:///etc/passwd",
            "https://ex ample.com/",
            "https://xn--nxasmq6b.com/",
            "https://\u{4f8b}\u{5b50}.\u{6d4b}\u{8bd5}/",
            "https://example.com/\u{0}",
            "//example.com/",
            "",
        ])
        .prop_map(|s| serde_json::to_string(s).unwrap()),
        1 => (2030usize..2060)
            .prop_map(|n| serde_json::to_string(&format!("https://example.com/{}", "a".repeat(n))).unwrap()),
        2 => any_string(60).prop_map(|s| serde_json::to_string(&format!("https://{s}")).unwrap()),
        1 => json_text(),
    ]
    .boxed()
}

fn timeout_value() -> BoxedStrategy<String> {
    prop_oneof![
        4 => number_text(),
        2 => prop::sample::select(vec![
            "\"NaN\"", "\"Infinity\"", "\"-Infinity\"", "\"5\"", "null", "true", "[]", "{}",
            "NaN", "Infinity", "1e308", "-0", "0.001", "25", "26", "1e19",
        ])
        .prop_map(str::to_string),
        1 => json_text(),
    ]
    .boxed()
}

fn duration_value() -> BoxedStrategy<String> {
    prop_oneof![
        8 => (-3i64..25).prop_map(|n| n.to_string()),
        3 => number_text(),
        1 => prop::sample::select(vec!["\"5\"", "5.0", "5e0", "null", "[5]", "{\"s\":5}", "true"])
            .prop_map(str::to_string),
        1 => json_text(),
    ]
    .boxed()
}

/// A submit body from the real field names, values of random type, fields in random order,
/// sometimes repeated or unknown.
fn submit_body() -> BoxedStrategy<String> {
    let field = prop_oneof![
        3 => prop::option::of(prop::sample::select(vec!["\"generate\"", "\"edit\"", "null", "5"]).prop_map(str::to_string))
            .prop_map(|v| v.map(|v| ("action".to_string(), v))),
        8 => prop::option::of(prompt_value()).prop_map(|v| v.map(|v| ("prompt".to_string(), v))),
        4 => prop::option::of(duration_value()).prop_map(|v| v.map(|v| ("duration".to_string(), v))),
        4 => prop::option::of(params_value()).prop_map(|v| v.map(|v| ("params".to_string(), v))),
        3 => prop::option::of(callback_value()).prop_map(|v| v.map(|v| ("callback_url".to_string(), v))),
        3 => prop::option::of(metadata_value()).prop_map(|v| v.map(|v| ("metadata".to_string(), v))),
        3 => prop::option::of(timeout_value()).prop_map(|v| v.map(|v| ("timeout".to_string(), v))),
        1 => (any_string(20), json_text()).prop_map(|(k, v)| Some((k, v))),
        1 => json_text().prop_map(|v| Some(("model".to_string(), v))),
    ];
    (
        prop::option::weighted(0.95, model_value()),
        proptest::collection::vec(field, 0..6),
        any::<bool>(),
    )
        .prop_map(|(model, fields, model_last)| {
            let mut parts: Vec<String> = fields
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{}:{v}", serde_json::to_string(&k).unwrap()))
                .collect();
            if let Some(m) = model {
                let m = format!("\"model\":{m}");
                if model_last {
                    parts.push(m);
                } else {
                    parts.insert(0, m);
                }
            }
            format!("{{{}}}", parts.join(","))
        })
        .boxed()
}

fn body() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        10 => submit_body().prop_map(String::into_bytes),
        3 => json_text().prop_map(String::into_bytes),
        2 => proptest::collection::vec(any::<u8>(), 0..512),
        1 => Just(Vec::new()),
        1 => (1usize..20_000, prop::sample::select(vec![("[", "]"), ("{\"a\":", "}"), ("{\"model\":\"echo\",\"params\":", "}")]))
            .prop_map(|(n, (open, close))| format!("{}1{}", open.repeat(n), close.repeat(n)).into_bytes()),
        1 => (65_530usize..65_545, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
        1 => (0usize..3, submit_body()).prop_map(|(pad, b)| {
            // A valid body padded with whitespace to just around the 64 KiB limit.
            let mut v = b.into_bytes();
            v.resize(64 * 1024 - 1 + pad, b' ');
            v
        }),
        1 => submit_body().prop_map(|b| {
            // Trailing garbage and a byte-order mark.
            let mut v = b"\xef\xbb\xbf".to_vec();
            v.extend_from_slice(b.as_bytes());
            v
        }),
        1 => submit_body().prop_map(|b| format!("{b} {b}").into_bytes()),
    ]
    .boxed()
}

/// Method, target and body of a request the API routes (the right method for the path), so
/// that most cases get past routing into authentication, validation and the handlers.
fn coherent_line() -> BoxedStrategy<(Vec<u8>, String, Option<Vec<u8>>)> {
    let post = |p: &'static str| Just(b"POST".to_vec()).prop_map(move |m| (m, p.to_string()));
    prop_oneof![
        6 => (post("/v1/tasks"), body()).prop_map(|((m, p), b)| (m, p, Some(b))),
        3 => (post("/v1/tasks/sync"), body()).prop_map(|((m, p), b)| (m, p, Some(b))),
        3 => prop::option::of(query()).prop_map(|q| {
            let target = q.map_or_else(|| "/v1/tasks".to_string(), |q| format!("/v1/tasks?{q}"));
            (b"GET".to_vec(), target, None)
        }),
        2 => task_id_like().prop_map(|id| (b"GET".to_vec(), format!("/v1/tasks/{id}"), None)),
        2 => (task_id_like(), prop::option::of(body()))
            .prop_map(|(id, b)| (b"POST".to_vec(), format!("/v1/tasks/{id}/cancel"), b)),
        1 => Just((b"GET".to_vec(), "/v1/account".to_string(), None)),
        1 => Just((b"GET".to_vec(), "/v1/models".to_string(), None)),
    ]
    .boxed()
}

/// Any method, any target, any body.
fn random_line() -> BoxedStrategy<(Vec<u8>, String, Option<Vec<u8>>)> {
    (
        method(),
        path(),
        prop::option::weighted(0.3, query()),
        prop::option::of(body()),
    )
        .prop_map(|(m, path, query, body)| {
            let target = match query {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            (m, target, body)
        })
        .boxed()
}

fn request() -> BoxedStrategy<FuzzRequest> {
    (
        prop_oneof![3 => coherent_line(), 1 => random_line()],
        authorization(),
        content_type(),
        idempotency_key(),
        prefer(),
        prop::option::weighted(
            0.2,
            (
                prop::sample::select(vec![
                    "authorization",
                    "content-type",
                    "prefer",
                    "idempotency-key",
                    "x-fuzz",
                ]),
                proptest::collection::vec(any::<u8>(), 0..40),
            ),
        ),
    )
        .prop_map(|((method, target, body), auth, ct, idem, prefer, extra)| {
            let mut headers = Vec::new();
            let named = [
                ("authorization", auth),
                ("content-type", ct),
                ("idempotency-key", idem),
                ("prefer", prefer),
            ];
            for (name, v) in named {
                if let Some(v) = v {
                    headers.push((name, v));
                }
            }
            // Repeated headers: a second value of a random name.
            headers.extend(extra);
            FuzzRequest {
                method,
                target,
                headers,
                body: body.unwrap_or_default(),
            }
        })
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// Running and checking
// ---------------------------------------------------------------------------------------------

/// The `ErrorCode` table of openapi.yaml (`| \`code\` | status ...`): every code and its status.
fn documented_codes() -> Vec<(String, u16)> {
    let spec = include_str!("../openapi.yaml");
    let start = spec
        .find("    ErrorCode:")
        .expect("openapi.yaml has ErrorCode");
    let codes: Vec<(String, u16)> = spec[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with("enum:"))
        .filter_map(|l| {
            let mut cells = l.trim().strip_prefix("| `")?.splitn(2, "` | ");
            let code = cells.next()?;
            let status = cells.next()?.get(..3)?.parse().ok()?;
            Some((code.to_string(), status))
        })
        .collect();
    assert!(
        codes.len() >= 10
            && codes
                .iter()
                .any(|(c, s)| c == "invalid_request" && *s == 400),
        "openapi.yaml's ErrorCode table did not parse: {codes:?}"
    );
    codes
}

/// Percent-encodes every byte a request target may not hold, so that any generated target
/// becomes a URI (a real server would not hand the API anything else).
fn to_uri(raw: &str) -> Uri {
    if let Ok(u) = Uri::try_from(raw) {
        return u;
    }
    let mut out = String::with_capacity(raw.len() * 3);
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if !out.starts_with('/') {
        out.insert(0, '/');
    }
    Uri::try_from(out.as_str())
        .or_else(|_| Uri::try_from(out.replace('%', "%25").as_str()))
        .unwrap_or_else(|_| Uri::from_static("/"))
}

fn resolve(fx: &Fixture, s: &str) -> String {
    let mut s = s.to_string();
    for (i, id) in fx.seeds.iter().enumerate() {
        s = s.replace(&format!("{SEED_MARK}{i}}}"), id);
        s = s.replace(&format!("{CURSOR_MARK}{i}}}"), &URL_SAFE_NO_PAD.encode(id));
    }
    s
}

fn build(fx: &Fixture, r: &FuzzRequest) -> Request<Bytes> {
    let method = Method::from_bytes(&r.method).unwrap_or(Method::GET);
    let mut req = Request::new(Bytes::from(r.body.clone()));
    *req.method_mut() = method;
    *req.uri_mut() = to_uri(&resolve(fx, &r.target));
    for (name, value) in &r.headers {
        // Values a client cannot send (control bytes) are dropped, as any HTTP stack would.
        if let Ok(v) = HeaderValue::from_bytes(value) {
            req.headers_mut().append(*name, v);
        }
    }
    req
}

/// Every `result.outputs[].url` in an answer body (a task object, or a list of them).
fn output_urls<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            if let Some(outputs) = m
                .get("result")
                .and_then(|r| r.get("outputs"))
                .and_then(Value::as_array)
            {
                out.extend(outputs.iter().filter_map(|o| o["url"].as_str()));
            }
            m.values().for_each(|v| output_urls(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| output_urls(v, out)),
        _ => {}
    }
}

fn check(
    fx: &Fixture,
    codes: &[(String, u16)],
    stats: &Stats,
    method: &Method,
    uri: &Uri,
    resp: &Response<Bytes>,
) -> Result<(), TestCaseError> {
    let status = resp.status().as_u16();
    let ctx = || {
        format!(
            "{method} {uri} -> {status} {}",
            String::from_utf8_lossy(resp.body())
        )
    };
    prop_assert!(status < 500, "5xx answer: {}", ctx());
    prop_assert_eq!(
        resp.headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some("application/json"),
        "content type: {}",
        ctx()
    );
    let body: Value = serde_json::from_slice(resp.body())
        .map_err(|e| TestCaseError::fail(format!("body is not JSON ({e}): {}", ctx())))?;
    if !(200..300).contains(&status) {
        let err = &body["error"];
        let code = err["code"].as_str().unwrap_or("");
        prop_assert!(
            codes.iter().any(|(c, s)| c == code && *s == status),
            "undocumented code or code/status mismatch: {}",
            ctx()
        );
        prop_assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "message missing: {}",
            ctx()
        );
        prop_assert!(
            err.get("param").is_none_or(Value::is_string),
            "param not a string: {}",
            ctx()
        );
        if status == 405 {
            prop_assert!(
                resp.headers().contains_key(header::ALLOW),
                "no Allow: {}",
                ctx()
            );
        }
        return Ok(());
    }
    if method == Method::POST
        && matches!(Route::parse(uri.path()), Some(Route::Tasks | Route::Sync))
    {
        prop_assert!(
            body["task_id"].as_str().is_some_and(is_task_id),
            "2xx submit without task_id: {}",
            ctx()
        );
    }
    if let Some(files) = &fx.files {
        let mut urls = Vec::new();
        output_urls(&body, &mut urls);
        for url in urls {
            // What the local server's file route does with the URL (server.rs, `serve_file`).
            let signed = url
                .strip_prefix(FILES_BASE)
                .and_then(|u| u.strip_prefix(FILES_PREFIX))
                .and_then(|u| u.split_once('?'));
            let Some((key, query)) = signed else {
                return Err(TestCaseError::fail(format!(
                    "output URL {url} is not on the results folder: {}",
                    ctx()
                )));
            };
            match files.verify(key, query) {
                Ok(path) => {
                    prop_assert!(path.is_file(), "output URL {url} names no file: {}", ctx());
                    stats.urls_verified.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    return Err(TestCaseError::fail(format!(
                        "output URL {url} does not verify ({e:?}): {}",
                        ctx()
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Each account's ledger, read from the store: `credits` is `granted` less the cost of every
/// task not refunded, and `open_tasks` counts its queued and processing tasks.
async fn ledger_holds(fx: &Fixture) -> Result<(), TestCaseError> {
    for id in &fx.accounts {
        let acct = fx
            .store
            .account(id)
            .await
            .map_err(|e| TestCaseError::fail(format!("reading account {id}: {e}")))?
            .ok_or_else(|| TestCaseError::fail(format!("account {id} is gone")))?;
        let (mut charged, mut open) = (0u64, 0u64);
        let mut query = ListQuery {
            status: None,
            model: None,
            limit: 100,
            before: None,
        };
        loop {
            let page = fx
                .store
                .list_tasks(id, &query)
                .await
                .map_err(|e| TestCaseError::fail(format!("listing {id}'s tasks: {e}")))?;
            for t in &page.tasks {
                charged += if t.cost.refunded { 0 } else { t.cost.credits };
                open += u64::from(t.is_open());
            }
            match page.next_before {
                Some(b) => query.before = Some(b),
                None => break,
            }
        }
        prop_assert_eq!(
            acct.credits + charged,
            acct.granted,
            "credits + charged != granted for {:?}",
            acct
        );
        prop_assert_eq!(
            acct.open_tasks,
            open,
            "open_tasks disagrees with the tasks for {:?}",
            acct
        );
    }
    Ok(())
}

/// What a run did, printed at its end.
#[derive(Default)]
struct Stats {
    executed: AtomicU64,
    requests: AtomicU64,
    /// Time spent building and seeding fixtures.
    setup_nanos: AtomicU64,
    urls_verified: AtomicU64,
    statuses: Mutex<BTreeMap<u16, u64>>,
}

/// Runs the fuzz on `backend` and prints what ran; panics with the failing input, shrunk.
fn fuzz(backend: Backend) {
    // Paused time: sync waits (up to the 25 s cap) pass instantly, as no worker runs. The
    // SQLite adapters work on blocking threads, during which tokio does not advance time.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let codes = documented_codes();
    // `ProptestConfig::default()` reads PROPTEST_CASES (256 when unset).
    let config = ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let cases = config.cases;
    let mut runner = TestRunner::new(config);
    let stats = Stats::default();
    let started = Instant::now();
    let result = runner.run(&proptest::collection::vec(request(), 1..=4), |reqs| {
        stats.executed.fetch_add(1, Ordering::Relaxed);
        rt.block_on(async {
            let setup = Instant::now();
            let fx = fixture(backend).await;
            stats
                .setup_nanos
                .fetch_add(setup.elapsed().as_nanos() as u64, Ordering::Relaxed);
            for r in &reqs {
                let req = build(&fx, r);
                let (method, uri) = (req.method().clone(), req.uri().clone());
                let resp = fx.api.handle(req).await;
                stats.requests.fetch_add(1, Ordering::Relaxed);
                *stats
                    .statuses
                    .lock()
                    .unwrap()
                    .entry(resp.status().as_u16())
                    .or_default() += 1;
                check(&fx, &codes, &stats, &method, &uri, &resp)?;
            }
            ledger_holds(&fx).await
        })
    });
    let elapsed = started.elapsed();
    eprintln!(
        "api_fuzz ({backend:?}): {cases} cases configured, {} executed (shrinking included), {} requests, {:.1} s ({:.1} s of it building and seeding fixtures); {} signed output URLs verified; statuses: {:?}",
        stats.executed.load(Ordering::Relaxed),
        stats.requests.load(Ordering::Relaxed),
        elapsed.as_secs_f64(),
        Duration::from_nanos(stats.setup_nanos.load(Ordering::Relaxed)).as_secs_f64(),
        stats.urls_verified.load(Ordering::Relaxed),
        stats.statuses.lock().unwrap(),
    );
    if let Err(e) = result {
        panic!("{backend:?}: {e}");
    }
}

#[test]
fn no_request_makes_the_api_panic_or_answer_5xx_on_sqlite_and_the_results_folder() {
    fuzz(Backend::Sqlite);
}

#[test]
fn no_request_makes_the_api_panic_or_answer_5xx_on_the_in_memory_adapters() {
    fuzz(Backend::Memory);
}
